"""Sharded training and distillation (FSDP2, distributed/sharding.py): config errors, activation
checkpointing, staged checkpoints, and real 2-process and 1-process gloo runs under torchrun."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ditkit import DitkitError
from ditkit.checkpoint import find_checkpoint, load_checkpoint, remove_orphans, save_checkpoint, staging_folder
from ditkit.distill import DistillConfig, Distiller
from ditkit.distributed.sharding import (
    SHARDED_STATE,
    check_checkpoint_kind,
    checkpoint_activations,
    load_sharded,
    repeated_blocks,
    save_sharded,
)
from ditkit.train import load_config, train
from ditkit.train.trainer import Trainer
from helpers import tiny_backbone, tiny_run

TESTS = Path(__file__).resolve().parents[1]


def test_sharding_settings_are_checked_with_the_fix(tmp_path):
    with pytest.raises(DitkitError, match="train.sharding must be one of none, fsdp, got 'zero'"):
        load_config(None, tiny_run(tmp_path, "train.sharding=zero"))
    with pytest.raises(DitkitError, match="fp16 needs a loss scaler.*use bf16"):
        load_config(None, tiny_run(tmp_path, "train.sharding=fsdp", "train.mixed_precision=fp16"))
    with pytest.raises(DitkitError, match="activation_checkpointing must be bool"):
        load_config(None, tiny_run(tmp_path, "train.activation_checkpointing=3"))
    with pytest.raises(DitkitError, match="needs a process group: start with torchrun --nproc_per_node N"):
        Trainer(load_config(None, tiny_run(tmp_path / "run", "train.sharding=fsdp")), progress=False)
    with pytest.raises(DitkitError, match="needs a process group: start with torchrun --nproc_per_node N -m "
                                          "ditkit.cli.main distill"):
        Distiller(None, DistillConfig(sharding="fsdp"))  # refused before the teacher is used
    with pytest.raises(DitkitError, match="frozen_dtype=bf16 needs sharding=fsdp"):
        DistillConfig(frozen_dtype="bf16")
    with pytest.raises(DitkitError, match="frozen_dtype must be one of bf16, fp32"):
        DistillConfig(sharding="fsdp", frozen_dtype="fp16")
    assert DistillConfig(sharding="fsdp").frozen_dtype == "bf16" and DistillConfig().frozen_dtype == "fp32"


def test_sharded_and_unsharded_checkpoints_resume_only_their_own_way(tmp_path):
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    (sharded / SHARDED_STATE).mkdir(parents=True)
    plain.mkdir()
    with pytest.raises(DitkitError, match="written by sharded training: resume it with sharding=fsdp"):
        check_checkpoint_kind(sharded, sharded=False, command="train")
    with pytest.raises(DitkitError, match="has no sharded state.*resume it with sharding=none"):
        check_checkpoint_kind(plain, sharded=True, command="train")
    check_checkpoint_kind(sharded, sharded=True, command="train")
    check_checkpoint_kind(plain, sharded=False, command="train")


def test_a_staged_checkpoint_is_completed_or_removed_as_an_orphan(tmp_path):
    from ditkit.record import DataSettings, DiffusionSettings, RunRecord

    model = tiny_backbone("dit")
    record = RunRecord(model=model.config, diffusion=DiffusionSettings(), data=DataSettings(resolution=8))
    root = tmp_path / "checkpoints"
    killed = staging_folder(root, 2)  # every process's shards would go here; then the write is killed
    (killed / SHARDED_STATE).mkdir()
    remove_orphans(root)
    assert not killed.exists()
    staged = staging_folder(root, 2)
    (staged / SHARDED_STATE / "shard").parent.mkdir()
    (staged / SHARDED_STATE / "shard").write_text("x")
    final = save_checkpoint(root, 2, model=model, ema=model, optimizer=None, record=record, train_state={},
                            staged=staged)
    assert not staged.exists() and find_checkpoint(root) == final
    assert sorted(p.name for p in final.iterdir()) == ["ema.safetensors", "model.safetensors", SHARDED_STATE,
                                                       "training_state.json"]


def block_names(model: nn.Module) -> list[str]:
    found = {id(block) for block in repeated_blocks(model)}
    return [name for name, module in model.named_modules() if id(module) in found]


def test_blocks_are_the_outermost_ones():
    assert block_names(tiny_backbone("dit")) == ["blocks.0", "blocks.1"]
    assert block_names(tiny_backbone("udit")) == ["stages.0.0", "stages.1.0", "stages.2.0", "stages.2.1", "stages.3.0",
                                                  "stages.4.0"]  # not the pairs inside them


@pytest.mark.parametrize("backbone", ["dit", "udit", "diffussm"])
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients(backbone):
    model = tiny_backbone(backbone, randomize=0.1)
    checkpointed = copy.deepcopy(model)
    assert checkpoint_activations(checkpointed) == len(repeated_blocks(model)) > 0
    assert checkpointed.state_dict().keys() == model.state_dict().keys()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 3])
    grads, calls = [], []
    for m in (model, checkpointed):
        count = [0]
        first_linear = next(module for module in repeated_blocks(m)[0].modules() if isinstance(module, nn.Linear))
        first_linear.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        m(x, t, y).square().mean().backward()
        grads.append({name: p.grad for name, p in m.named_parameters()})
        calls.append(count[0])
    assert calls[1] == 2 * calls[0] > 0  # the checkpointed block ran again in backward
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=0, atol=1e-7), name
    with torch.no_grad():  # no recomputation without gradients
        assert torch.equal(model(x, t, y), checkpointed(x, t, y))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_state_round_trips_and_another_model_is_one_line(tmp_path):
    """DCP without a process group (one process, plain tensors): what the sharded runs save and load."""
    model = tiny_backbone("dit", randomize=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).square().mean().backward()
    optimizer.step()
    ema = {name: p.detach().clone() * 2 for name, p in model.named_parameters()}
    save_sharded(tmp_path / "state", model, optimizer, {"ema": ema})
    fresh = tiny_backbone("dit")
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_ema = {name: torch.zeros_like(p) for name, p in fresh.named_parameters()}
    load_sharded(tmp_path / "state", fresh, fresh_optimizer, {"ema": fresh_ema})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))
    assert all(torch.equal(ema[k], fresh_ema[k]) for k in ema)
    moments = [(optimizer.state[p]["exp_avg"], fresh_optimizer.state[q]["exp_avg"])
               for p, q in zip(model.parameters(), fresh.parameters(), strict=True)]
    assert all(torch.equal(a, b) for a, b in moments)
    wider = tiny_backbone("dit", hidden_size=64)
    with pytest.raises(DitkitError, match="the sharded state .* does not fit this run .*resume with the config it "
                                          "was trained with"):
        load_sharded(tmp_path / "state", wider, torch.optim.AdamW(wider.parameters()), {"ema": fresh_ema})


def test_activation_checkpointing_trains_the_same_weights(tmp_path):
    runs = {flag: train(load_config(None, tiny_run(tmp_path / str(flag), "train.steps=2", "train.num_samples=0",
                                                   f"train.activation_checkpointing={flag}")), progress=False)
            for flag in ("false", "true")}
    plain, checkpointed = (load_file(path / "model.safetensors") for path in runs.values())
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=0, atol=1e-7) for k in plain)


def torchrun(processes: int, mode: str, out: Path, script: str = "sharded_runs.py") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(TESTS / "train" / script), mode, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"),
                                                                                 str(TESTS)])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 or mode == "kill", result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_weights(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """2 gloo processes: training straight and in halves, distillation straight and in halves, student
    gradients; then 1 process resuming the 2-process halves (re-sharded)."""
    out = tmp_path_factory.mktemp("sharded")
    torchrun(2, "two", out)
    torchrun(1, "one", out)
    return out


def test_sharded_training_resumes_exactly_and_on_one_process(sharded_runs, tmp_path):
    straight, halves, on_one = (sharded_runs / name for name in ("straight", "halves", "halves-on-one"))
    state = json.loads((straight / "checkpoints" / "step_0000004" / "training_state.json").read_text())
    assert (state["num_processes"], state["sharding"]) == (2, "fsdp")
    assert (straight / "checkpoints" / "step_0000004" / SHARDED_STATE / ".metadata").is_file()
    for name in ("model", "ema"):  # same processes: bitwise
        a, b = step_weights(straight, 4, name), step_weights(halves, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        c = step_weights(on_one, 4, name)  # 1 process, same global batch: up to float rounding
        assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-6, name
    before, after = step_weights(straight, 2, "model"), step_weights(straight, 4, "model")
    assert not torch.equal(before["final_layer.linear.weight"], after["final_layer.linear.weight"])
    two, one = losses(straight), losses(on_one)
    assert len(two) == len(one) == 4 and all(abs(a / b - 1) < 1e-5 for a, b in zip(two, one, strict=True))
    # the level of an unsharded one-process run (batch 4; its own noise draws)
    plain = losses(train(load_config(None, tiny_run(tmp_path / "plain", "train.num_samples=0")), progress=False)
                   .parents[1])
    assert abs(sum(two) / sum(plain) - 1) < 0.15
    # the exported weights load in one process, without any process group
    model, record = load_checkpoint(straight)
    assert record.model == model.config and torch.equal(model.state_dict()["final_layer.linear.weight"],
                                                        step_weights(straight, 4, "ema")["final_layer.linear.weight"])


def test_a_sharded_run_killed_while_checkpointing_resumes_to_the_same_weights(sharded_runs, tmp_path):
    """Both processes SIGKILLed after writing their step-4 shards, before the checkpoint was in place:
    the resumed run drops the half-written step 4, goes on from step 2 and ends bitwise where the
    uninterrupted run (`straight`, same settings) ended."""
    run = tmp_path / "killed"
    killed = torchrun(2, "kill", run, script="killed_run.py")
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout + killed.stderr
    checkpoints = run / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-step_0000004")]  # the torn write
    assert find_checkpoint(run).name == "step_0000002"
    torchrun(2, "resume", run, script="killed_run.py")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000002", "step_0000004"]
    for name in ("model", "ema"):
        a, b = step_weights(sharded_runs / "straight", 4, name), step_weights(run, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sharded_distillation_saves_a_student_that_loads_in_one_process(sharded_runs):
    from diffusers import FluxTransformer2DModel
    from ditkit.diffusers.pipelines import load_student

    straight, halves = sharded_runs / "student", sharded_runs / "student-halves"
    gradients = json.loads((sharded_runs / "gradients.json").read_text())
    assert gradients["max_gradient"] > 0 and gradients["max_difference"] < 1e-6 * gradients["max_gradient"]
    a, b = step_weights(straight, 4, "model"), step_weights(halves, 4, "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed exactly
    assert all(t.dtype == torch.float32 for t in a.values())  # the trained weights stay fp32
    transformer = FluxTransformer2DModel.from_pretrained(sharded_runs / "flux")
    teacher = {k: v.clone() for k, v in transformer.state_dict().items()}
    distill = load_student(transformer, find_checkpoint(straight))
    assert distill["radius"] == 2
    loaded = transformer.state_dict()
    assert sorted(k for k in loaded if not torch.equal(loaded[k], teacher[k])) == sorted(
        k.removeprefix("transformer.") for k in a)
    assert all(torch.equal(loaded[k.removeprefix("transformer.")], a[k]) for k in a)


def test_sharded_loads_equal_plain_loads_and_take_a_share_of_memory(sharded_runs):
    """Teachers built on the meta device and loaded shard by shard on 2 processes (a FLUX folder split
    in two files, SD3 with its position buffer, ditkit DiT with a padded shard, U-DiT): every parameter
    and buffer, gathered, is bitwise a plain load's cast as the distiller casts; the students too,
    CLEAR's pooling weights included. And the bytes each process allocated loading."""
    flux = sorted(p.name for p in (sharded_runs / "flux").iterdir())
    assert flux == ["config.json", "diffusion_pytorch_model-00001-of-00002.safetensors",
                    "diffusion_pytorch_model-00002-of-00002.safetensors",
                    "diffusion_pytorch_model.safetensors.index.json"]
    for rank in (0, 1):
        loads = json.loads((sharded_runs / f"loads-{rank}.json").read_text())
        assert loads["differences"] == {name: {"teacher": [], "student": []} for name in ("flux", "sd3", "dit")}
        assert loads["udit"] == []
        memory = loads["memory"]
        # its shards of teacher and student, the buffers (counted at fp32), one tensor (at fp32) in flight, and
        # the one open file's mapping (booked by the profiler at the file's size; only touched pages are read)
        bound = memory["share"] + memory["buffers"] + memory["largest"] + memory["largest_file"]
        assert memory["new"] <= bound < memory["old"], memory  # loading whole first: over it
