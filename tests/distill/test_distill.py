import json

import pytest
import torch

from ditkit.checkpoint import find_checkpoint, load_checkpoint, read_weights, save_checkpoint
from ditkit.cli.main import main
from ditkit.distill import (
    AttentionTaps,
    DistillConfig,
    Distiller,
    DitkitTeacher,
    LossWeights,
    PairedDenoiser,
    distillation_loss,
    teacher_samples,
)
from ditkit.errors import DitkitError
from ditkit.mixers.clear import local_pairs
from helpers import tiny_run


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny flow-matching DiT teacher whose weights are random but not zero (adaLN-Zero init
    would make every output 0 and every comparison trivially equal)."""
    root = tmp_path_factory.mktemp("teacher")
    assert main(["train", "digits", *tiny_run(root / "run", "model.args.depth=2", "diffusion.objective=flow",
                                             "diffusion.cfg_scale=1.0"), "--no-progress"]) == 0
    model, record = load_checkpoint(root / "run", ema=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(root / "ckpt", 1, model=model, ema=None, optimizer=optimizer, record=record,
                           train_state={})


def small_config(out_dir, **overrides):
    fields = dict(out_dir=str(out_dir), radius=2, num_samples=12, steps=4, batch_size=4, lr=1e-3, eval_num=2,
                  eval_steps=2, ckpt_every=2, log_every=1)
    return DistillConfig(**{**fields, **overrides})


def test_student_swaps_every_attention_and_trains_only_attention(teacher_ckpt, tmp_path):
    teacher = DitkitTeacher(teacher_ckpt)
    distiller = Distiller(teacher, small_config(tmp_path), progress=False)
    mixers = [b.mixer for b in distiller.student.blocks]
    assert all(m.name == "clear" and m.radius == 2 for m in mixers)
    assert sorted(distiller.trainable) == sorted(f"blocks.{i}.mixer.{n}" for i in range(2)
                                                 for n in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"))
    before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    distiller.run()
    after = distiller.student.state_dict()
    for name, value in after.items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in distiller.trainable), name
    teacher_state = teacher.model.state_dict()  # the teacher itself is never touched
    assert all(torch.equal(teacher_state[k], before[k]) for k in teacher_state)


def test_loss_terms_vanish_when_the_student_equals_the_teacher(teacher_ckpt):
    """With r >= the grid, clear is full attention: output and attention matching must be ~0,
    which also proves the taps pair the right layers."""
    teacher = DitkitTeacher(teacher_ckpt)
    student = teacher.make_student(radius=100, down_factor=0, backend="reference")
    taps_s = AttentionTaps(teacher.attention_taps(student))
    taps_t = AttentionTaps(teacher.attention_taps(teacher.model))
    x0 = torch.randn(3, 1, 16, 16)
    _, parts = distillation_loss(teacher.objective, PairedDenoiser(student, teacher.model), taps_s, taps_t, x0,
                                 torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0), LossWeights())
    assert len(taps_s.outputs) == len(taps_t.outputs) == 2
    assert parts["output"] < 1e-10 and parts["attention"] < 1e-10 and parts["task"] > 0.1
    student_local = teacher.make_student(radius=1.5, down_factor=0, backend="reference")
    taps_l = AttentionTaps(teacher.attention_taps(student_local))
    _, parts = distillation_loss(teacher.objective, PairedDenoiser(student_local, teacher.model), taps_l, taps_t, x0,
                                 torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0), LossWeights())
    assert parts["output"] > 1e-4 and parts["attention"] > 1e-4


def test_resume_gives_the_same_student(teacher_ckpt, tmp_path):
    straight = Distiller(DitkitTeacher(teacher_ckpt), small_config(tmp_path / "a"), progress=False)
    straight.run()
    first = Distiller(DitkitTeacher(teacher_ckpt), small_config(tmp_path / "b", steps=2), progress=False)
    first.run()
    resumed = Distiller(DitkitTeacher(teacher_ckpt), small_config(tmp_path / "b"), progress=False)
    resumed.run(resume=True)
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    per_step = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in per_step] == [1, 2, 3, 4]
    windowed = Distiller(DitkitTeacher(teacher_ckpt), small_config(tmp_path / "c", log_every=2), progress=False)
    windowed.run()
    logged = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]  # each record is the mean of its window
    for record, pair in zip(logged, (per_step[:2], per_step[2:]), strict=True):
        assert record["loss"] == pytest.approx((pair[0]["loss"] + pair[1]["loss"]) / 2)


def test_teacher_samples_are_cached_and_settings_checked(teacher_ckpt, tmp_path):
    teacher = DitkitTeacher(teacher_ckpt)
    x0, cond = teacher_samples(teacher, tmp_path, num=70, seed=3, progress=False)  # two chunks, the last short
    assert x0.shape == (70, 1, 16, 16) and cond.shape == (70,) and cond.max() < 10
    chunk = tmp_path / "chunk_00001.safetensors"
    stamp = chunk.stat().st_mtime_ns
    again, _ = teacher_samples(teacher, tmp_path, num=70, seed=3, progress=False)
    assert torch.equal(again, x0) and chunk.stat().st_mtime_ns == stamp
    chunk.unlink()  # an interrupted run: only the missing chunk is made, identically
    again, _ = teacher_samples(teacher, tmp_path, num=70, seed=3, progress=False)
    assert torch.equal(again, x0)
    with pytest.raises(DitkitError, match="other settings .*seed"):
        teacher_samples(teacher, tmp_path, num=70, seed=4, progress=False)


def test_distill_cli_writes_student_report_and_sampleable_checkpoint(teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_ckpt), "--radius", "2", "--num-samples", "8", "--steps", "3",
                 "--batch-size", "4", "--eval-num", "2", "--eval-steps", "2", "--lr", "1e-3", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "agreement.json").read_text())
    assert set(report) == {"untuned", "student", "attention_work"} and set(report["student"]) == {"16", "32"}
    # DiT-Nano/4 at 16 px sees a 4x4 token grid
    assert report["attention_work"]["16"] == pytest.approx(local_pairs((4, 4), 2) / 256)
    assert report["attention_work"]["64"] < 0.05
    assert 0 < report["untuned"]["16"]["ssim"] < 1
    assert (out / "compare-16.png").is_file() and (out / "compare-32.png").is_file()
    assert "student PSNR" in capsys.readouterr().out
    _, record = read_weights(find_checkpoint(out / "checkpoints") / "model.safetensors")
    assert record.model.mixer == "clear" and record.model.mixer_options["radius"] == 2
    assert main(["sample", "--ckpt", str(out / "checkpoints"), "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.png")]) == 0


def test_bad_distill_settings_fail_with_one_line(teacher_ckpt, tmp_path, capsys):
    assert main(["distill", "--teacher", str(teacher_ckpt), "--radius", "2", "--optimizer", "sgd",
                 "--out", str(tmp_path)]) == 2
    assert "unknown optimizer 'sgd'" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(teacher_ckpt), "--radius", "2", "--optimizer", "prodigy",
                 "--steps", "1", "--num-samples", "4", "--batch-size", "2", "--eval-num", "1", "--eval-steps", "1",
                 "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    state = torch.load(find_checkpoint(tmp_path / "p" / "checkpoints") / "optimizer.pt", weights_only=True)
    assert "d" in state["param_groups"][0]  # Prodigy's adaptive step size was used and saved


def test_a_ddpm_teacher_with_learned_sigma_is_distilled_with_its_own_objective(tmp_path):
    assert main(["train", "digits", *tiny_run(tmp_path / "ddpm", "diffusion.objective=ddpm", "diffusion.cfg_scale=1.0"),
                 "--no-progress"]) == 0
    teacher = DitkitTeacher(tmp_path / "ddpm")
    assert teacher.objective.name == "ddpm" and teacher.objective.learn_sigma
    distiller = Distiller(teacher, small_config(tmp_path / "out", steps=2), progress=False)
    report = distiller.run()
    assert set(report["student"]) == {"16", "32"}
    losses = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["task"] > 0 for r in losses)  # epsilon MSE + the variational bound of the learned variance


def test_sharded_processes_split_the_teacher_samples(tmp_path, monkeypatch):
    """2 gloo processes with a sharded tiny FLUX teacher: each generates its own chunks (3 chunks: 0 and 2
    on rank 0, 1 on rank 1, which then runs a one-sample stand-in of chunk 2 while rank 0 makes it), and
    the cache holds what one unsharded process makes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from diffusers import FluxTransformer2DModel
    from ditkit.distill import samples
    from ditkit.distill.diffusers_teacher import DiffusersTeacher

    torch.manual_seed(0)
    FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           axes_dims_rope=[4, 6, 6]).save_pretrained(tmp_path / "flux")
    tests = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tests / "distill" / "split_samples_run.py"), str(tmp_path / "flux"), str(tmp_path / "split")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "split" / "calls.json").read_text()) == [[[0, 2], [2, 1]], [[1, 2], [2, 1]]]
    monkeypatch.setattr(samples, "CHUNK", 2)
    teacher = DiffusersTeacher(tmp_path / "flux", resolution=64, steps=2)
    split = teacher_samples(teacher, tmp_path / "split" / "samples", num=5, seed=3, progress=False)  # read back
    alone = teacher_samples(teacher, tmp_path / "alone", num=5, seed=3, progress=False)
    assert torch.equal(split[1], alone[1])
    assert (split[0] - alone[0]).abs().max() < 1e-5 * alone[0].abs().max()


def test_a_fill_or_control_teacher_is_refused_before_its_weights_load(tmp_path):
    """FLUX Fill / Canny / Depth take image conditions as extra input channels (in > out): they cannot
    draw samples from noise alone, so distillation refuses them from config.json alone."""
    from ditkit.distill.diffusers_teacher import DiffusersTeacher

    (tmp_path / "fill").mkdir()
    (tmp_path / "fill" / "config.json").write_text(json.dumps({
        "_class_name": "FluxTransformer2DModel", "in_channels": 384, "out_channels": 64}))  # no weights at all
    with pytest.raises(DitkitError, match="Fill or Control model.*FLUX.1-dev"):
        DiffusersTeacher(tmp_path / "fill")


def test_the_flux_latent_channels_are_the_outputs_not_the_conditioned_inputs():
    from diffusers import FluxTransformer2DModel
    from ditkit.diffusers.adapters import find_adapter

    control = FluxTransformer2DModel(in_channels=32, out_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    assert find_adapter(control).latent_channels(control) == 4
