"""The memory planner against real tensors: activations planned on the meta device against the
graph a real CPU forward holds, state bytes against a real AdamW step (and a real 2-process FSDP2
step), distillation's trained set against the distiller's."""

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ditkit.metrics.memory import peak_memory, retained_memory
from ditkit.study.memory_plan import (
    ditkit_subject,
    load_subject,
    measure_activations,
    plan_memory,
    roles,
    state_bytes,
    training_step,
)
from helpers import run_cli, tiny_backbone

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TINY = {"dit": dict(depth=3, hidden_size=64, num_heads=2), "udit": {}, "diffussm": {}}
SIZE = {"dit": 32, "udit": 64, "diffussm": 32}


def planned_and_real(backbone: str):
    """The plan of a tiny model (on meta), the same model on CPU, and one real input."""
    with torch.device("meta"):
        subject = ditkit_subject(tiny_backbone(backbone, **TINY[backbone]), backbone)
    size = SIZE[backbone]
    activations = measure_activations(subject, size, size, roles(subject, "train"))
    torch.manual_seed(0)
    real = tiny_backbone(backbone, **TINY[backbone])
    x = torch.randn(subject.make_inputs(size, size)[0].shape)
    return activations, real, (x, torch.rand(1), torch.zeros(1, dtype=torch.long))


def checkpoint_blocks(model):
    """Per-block activation checkpointing, as a training loop would wrap the blocks."""
    for block in ditkit_subject(model, "real").blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)


@pytest.mark.parametrize("backbone", ["dit", "udit", "diffussm"])
def test_planned_activations_are_what_a_real_forward_holds(backbone):
    """Exact: the bytes a real forward keeps alive for backward (its output aside) are the plan's,
    with and without per-block checkpointing (which keeps the outside saves and the block inputs)."""
    activations, real, inputs = planned_and_real(backbone)
    output = inputs[0].numel() * 4 * real.config.out_channels // real.config.in_channels
    assert retained_memory(lambda: real(*inputs)) - output == activations.full
    checkpoint_blocks(real)
    held = retained_memory(lambda: real(*inputs)) - output
    assert held == activations.outside + activations.block_inputs
    assert activations.checkpointed < activations.full


@pytest.mark.parametrize("backbone", ["dit", "udit", "diffussm"])
def test_planned_step_peaks_are_a_real_steps_peaks(backbone):
    """Exact: the peak of a real forward + backward on CPU (gradients already allocated), without and
    with per-block checkpointing, is the peak the planner measured on meta; it exceeds the saved
    activations by the output, the loss and backward's temporaries (DiffuSSM's FFT buffers: +38%)."""
    activations, real, inputs = planned_and_real(backbone)

    def step():
        real(*inputs).float().square().mean().backward()

    step()  # allocates the gradients: the next steps accumulate into them
    assert peak_memory(step) == activations.peak_full > activations.full
    checkpoint_blocks(real)
    assert peak_memory(step) == activations.peak_checkpointed < activations.peak_full


def test_state_bytes_are_the_tensors_of_a_real_adamw_step():
    torch.manual_seed(0)
    model = tiny_backbone("dit", depth=2, hidden_size=32, num_heads=2)
    ema = copy.deepcopy(model).float().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    optimizer.step()
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    planned = state_bytes(roles(ditkit_subject(model, "tiny"), "train"), "fp32")
    assert planned.weights == nbytes(model.parameters())
    assert planned.grads == nbytes(p.grad for p in model.parameters())
    assert planned.optimizer == nbytes(moments)
    assert planned.ema == nbytes(ema.parameters())


def test_fsdp_rank0_state_is_a_real_two_process_fsdp2_step(tmp_path):
    out = tmp_path / "fsdp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "fsdp_memory_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(Path(f"{out}.0").read_text())
    model = tiny_backbone("dit", depth=2, hidden_size=40, num_heads=2, num_classes=4)
    planned = state_bytes(roles(ditkit_subject(model, "tiny"), "train"), "fp32", "FSDP", 2)
    assert measured == {"weights": planned.weights, "grads": planned.grads, "optimizer": planned.optimizer}
    whole = state_bytes(roles(ditkit_subject(model, "tiny"), "train"), "fp32")
    assert whole.weights / 2 <= planned.weights < whole.weights / 2 + 2 * 40 * 4  # padding: under a row per tensor


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("flux") / "transformer"
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=[4, 6, 6], guidance_embeds=True).save_pretrained(folder)
    return folder


def test_distillation_plan_follows_the_distiller(flux_folder, tmp_path):
    """Trained set, weights and activations of a FLUX distillation, against the real distiller's
    teacher and student (8 random prompt tokens, as the distiller draws them)."""
    from ditkit.distill.diffusers_teacher import DiffusersTeacher
    from ditkit.distill.distiller import DistillConfig, Distiller
    from ditkit.distill.losses import AttentionTaps

    teacher = DiffusersTeacher(flux_folder, resolution=64)
    distiller = Distiller(teacher, DistillConfig(out_dir=str(tmp_path), radius=2), progress=False)
    subject = load_subject(str(flux_folder), text_tokens=8)
    role = roles(subject, "distill")
    assert sorted(p.shape for p in role.trained) == sorted(p.shape for p in distiller.trainable.values())
    held = {p.untyped_storage().data_ptr(): p.nbytes for m in (teacher.model, distiller.student)
            for p in m.parameters()}
    assert state_bytes(role, "fp32").weights == sum(held.values())

    activations = measure_activations(subject, 64, 64, role, distill=True)
    trained = set(distiller.trainable)  # the student's names; the teacher's parameters carry the same ones
    for name, p in teacher.model.named_parameters():
        p.requires_grad_(name in trained)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.rand(1) * 1000, torch.zeros(1, dtype=torch.long)
    output = x.numel() * 4
    assert retained_memory(lambda: teacher.model(x, t, cond)) - output == activations.full - activations.teacher
    teacher.model.requires_grad_(False)
    taps = AttentionTaps(teacher.attention_taps(teacher.model))
    assert retained_memory(lambda: (taps, teacher.model(x, t, cond))) == activations.teacher
    taps.remove()

    # the step (teacher without grad, student with, output and attention matching) on CPU peaks as on meta
    for name, p in teacher.model.named_parameters():
        p.requires_grad_(name in trained)
    subject.model, subject.taps = teacher.model, teacher.attention_taps(teacher.model)
    step = functools.partial(training_step, subject, (x, t, cond), distill=True)
    step()
    assert peak_memory(step) == activations.peak_full


def test_flux_dev_config_builds_the_12b_transformer():
    """The shipped FLUX.1-dev configuration (the README's table) is FLUX's 11.9B transformer."""
    plan = plan_memory(load_subject(str(ROOT / "configs" / "flux1-dev-transformer.json")), 1024, 1024, [8],
                       regime="distill", precision="bf16")
    assert plan.all_params == 11_901_408_320
    assert plan.activations.checkpointed < plan.activations.full / 4
    fsdp = next(r for r in plan.rows if r.strategy == "FSDP")
    ddp = next(r for r in plan.rows if r.strategy == "DDP")
    assert fsdp.state.total < ddp.state.total / 6


def test_bf16_halves_the_activations_roughly():
    with torch.device("meta"):
        subject = ditkit_subject(tiny_backbone("dit", **TINY["dit"]), "dit")
    fp32, bf16 = (measure_activations(subject, 32, 32, roles(subject, "train"), p).full for p in ("fp32", "bf16"))
    assert 0.45 * fp32 <= bf16 <= 0.6 * fp32  # fused attention's log-sum-exp stays fp32


def test_cli_prints_the_plan(capsys):
    code, out, _ = run_cli(capsys, "info", "DiT-S/2", "--train-memory", "--processes", "1", "4")
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [r[:2] for r in rows] == [["1", "DDP"], ["1", "FSDP"], ["4", "DDP"], ["4", "FSDP"]]
    assert "per-block checkpointing" in out and "256x256 px" in out


@pytest.mark.parametrize("argv, message", [
    (["info", "DiT-Q/9", "--train-memory"], "unknown model 'DiT-Q/9'"),
    (["info", "DiT-S/2", "--train-memory", "--processes", "0"], "e.g. --processes 1 8 64"),
    (["info", "DiT-S/2", "--train-memory", "--resolution", "100"], "positive multiples of 16"),
    (["info", "DiT-S/2", "--train-memory", "--device-memory", "0"], "e.g. 80"),
])
def test_cli_refusals_name_the_fix(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code != 0 and message in err


def test_plain_info_points_diffusers_configs_to_train_memory(capsys):
    code, _, err = run_cli(capsys, "info", str(ROOT / "configs" / "flux1-dev-transformer.json"))
    assert code != 0 and "--train-memory" in err


def test_a_checkpoint_is_planned_from_its_header_at_its_resolution(tmp_path, capsys):
    from ditkit.cli.main import main
    from helpers import tiny_run

    assert main(["train", "digits", *tiny_run(tmp_path / "run")]) == 0
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "run"), "--train-memory", "--processes", "2",
                           "--regime", "distill")
    assert code == 0 and "16x16 px" in out and "distill" in out
    assert len([line for line in out.splitlines() if line.split()[:1] == ["2"]]) == 2
