"""Sharded (FSDP2) runs for tests/train/test_sharding.py, started by torchrun: one launch does several
runs, so the test pays the process start-up once.

    torchrun --nproc_per_node 2 sharded_runs.py two OUT     train straight and in halves; distill a FLUX
                                                           teacher (its weights split in two files)
                                                           straight and in halves; gradients of the
                                                           sharded student (OUT/gradients.json); teachers
                                                           and students loaded shard by shard vs plain
                                                           loads, and the bytes each process allocates
                                                           loading (OUT/loads-RANK.json)
    torchrun --nproc_per_node 1 sharded_runs.py one OUT     resume the halves (copied to OUT/*-on-one)
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ditkit.cli.main import main
from helpers import tiny_run

TRAIN = ["train.num_samples=0", "train.batch_size=2", "train.sharding=fsdp", "train.activation_checkpointing=true"]


def distill_args(teacher: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--radius", "2", "--resolution", "64", "--teacher-steps", "2",
            "--num-samples", "4", "--steps", str(steps), "--batch-size", "2", "--eval-num", "2", "--lr", "1e-3",
            "--ckpt-every", "2", "--out", str(out), "--no-progress", "sharding=fsdp", *extra]


def run(*argv: str) -> None:
    code = main(list(argv))
    assert code == 0, f"ditkit {' '.join(argv)} exited with {code}"


def student_gradients(teacher: Path) -> dict[str, float]:
    """The largest difference between the gradients of the trained weights of a sharded student
    (fp32 frozen weights, with and without activation checkpointing) and of an unsharded one, on the
    same batch: every process feeds the same batch, so the averaged sharded gradient is the plain one."""
    from ditkit.distill import DistillConfig, Distiller
    from ditkit.distill.diffusers_teacher import DiffusersTeacher
    from ditkit.distill.losses import AttentionTaps, LossWeights, PairedDenoiser, distillation_loss
    from ditkit.train.loop import step_generator

    def gradients(sharded: bool, recompute: bool = False) -> dict[str, torch.Tensor]:
        t = DiffusersTeacher(teacher, resolution=64, steps=2)
        extra = dict(sharding="fsdp", frozen_dtype="fp32", activation_checkpointing=recompute) if sharded else {}
        distiller = Distiller(t, DistillConfig(out_dir="unused", radius=2, **extra), progress=False)
        paired = PairedDenoiser(distiller.student, t.model)
        taps = [AttentionTaps(t.attention_taps(model)) for model in (distiller.student, t.model)]
        x0 = torch.randn(2, *t.input_shape(64, 64), generator=torch.Generator().manual_seed(1))
        loss, _ = distillation_loss(t.objective, paired, *taps, x0, torch.tensor([0, 1]), step_generator(3),
                                    LossWeights())
        loss.backward()
        return {name: (p.grad.full_tensor() if sharded else p.grad) for name, p in distiller.trainable.items()}

    plain = gradients(False)
    differences = []
    for sharded in (gradients(True), gradients(True, recompute=True)):
        assert plain.keys() == sharded.keys()
        differences += [(plain[k] - sharded[k]).abs().max().item() for k in plain]
    return {"max_difference": max(differences), "max_gradient": max(g.abs().max().item() for g in plain.values())}


def two(out: Path) -> None:
    run("train", "digits", *tiny_run(out / "straight", *TRAIN, "train.steps=4"), "--no-progress")
    run("train", "digits", *tiny_run(out / "halves", *TRAIN, "train.steps=2"), "--no-progress")
    dist.barrier()
    if dist.get_rank() == 0:  # the stopped run, to be resumed on one process later
        import shutil

        shutil.copytree(out / "halves", out / "halves-on-one")
    dist.barrier()
    run("train", "digits", *tiny_run(out / "halves", *TRAIN, "train.steps=4"), "--resume", "--no-progress")

    if dist.get_rank() == 0:
        make_teachers(out)
    dist.barrier()
    teacher = out / "flux"
    run(*distill_args(teacher, out / "student", 4))
    run(*distill_args(teacher, out / "student-halves", 2))
    run(*distill_args(teacher, out / "student-halves", 4), "--resume")
    result = student_gradients(teacher)
    if dist.get_rank() == 0:
        (out / "gradients.json").write_text(json.dumps(result))
    loads = {"differences": {name: load_differences(out / name, down_factor)
                             for name, down_factor in (("flux", 2), ("sd3", 0), ("dit", 2))},
             "udit": teacher_load_differences(out / "udit"), "memory": load_memory(teacher)}
    (out / f"loads-{dist.get_rank()}.json").write_text(json.dumps(loads))


def make_teachers(out: Path) -> None:
    """Tiny teachers with random weights: a FLUX folder split in two safetensors files with an index
    (FLUX.1's layout), an SD3 folder (a persistent position buffer), and ditkit DiT (5 class rows:
    a shard with padding) and U-DiT checkpoints."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from ditkit.checkpoint import save_checkpoint
    from ditkit.record import DataSettings, DiffusionSettings, RunRecord
    from helpers import tiny_backbone

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    flux.save_pretrained(out / "flux", max_shard_size=sum(p.nbytes for p in flux.parameters()) * 3 // 5)
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                          pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).save_pretrained(out / "sd3")
    for backbone, extra in (("dit", {"num_classes": 4}), ("udit", {})):
        model = tiny_backbone(backbone, randomize=0.2, **extra)
        record = RunRecord(model=model.config, diffusion=DiffusionSettings(objective="flow"),
                           data=DataSettings(resolution=8))
        save_checkpoint(out / backbone, 1, model=model, ema=model, optimizer=None, record=record, train_state={})


def differences(model: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    """Names of the tensors (parameters and every buffer) whose gathered values or dtype differ
    from the reference's, or that only one of the two has."""
    from torch.distributed.tensor import DTensor

    got = dict(model.named_parameters()) | dict(model.named_buffers())
    want = dict(reference.named_parameters()) | dict(reference.named_buffers())
    found = sorted(got.keys() ^ want.keys())
    for name in sorted(got.keys() & want.keys()):  # the same order on every process: gathers are collective
        full = got[name].full_tensor() if isinstance(got[name], DTensor) else got[name]
        if full.dtype != want[name].dtype or not torch.equal(full.detach().cpu(), want[name].detach()):
            found.append(name)
    return found


def distill_config(teacher: Path, down_factor: int, **extra):
    from ditkit.distill import DistillConfig

    return DistillConfig(teacher=str(teacher), out_dir="unused", radius=2, down_factor=down_factor,
                         resolution=64 if (teacher / "config.json").is_file() else None, **extra)


def load_differences(teacher: Path, down_factor: int) -> dict[str, list[str]]:
    """Teacher and student of a sharded distiller (loaded shard by shard, load_teacher's way) against
    a plain load cast as the distiller casts: frozen weights bf16, trained ones fp32 from the file."""
    from ditkit.distill import Distiller, load_teacher

    sharded = Distiller(load_teacher(distill_config(teacher, down_factor, sharding="fsdp")),
                        distill_config(teacher, down_factor, sharding="fsdp"), progress=False)
    plain = load_teacher(distill_config(teacher, down_factor))
    student = plain.make_student(2, down_factor, "auto")
    trained = {name: p.data for name, p in plain.trainable_parameters(student).items()}
    plain.model.to(torch.bfloat16)
    student.to(torch.bfloat16)
    for name, p in plain.trainable_parameters(student).items():
        p.data = trained[name]
    return {"teacher": differences(sharded.teacher.model, plain.model),
            "student": differences(sharded.student, student)}


def teacher_load_differences(checkpoint: Path) -> list[str]:
    """A teacher alone (U-DiT: CLEAR cannot take over its mixers) sharded and loaded in fp32."""
    from ditkit.distill import DitkitTeacher
    from ditkit.distributed.sharded_load import load_shards, materialize
    from ditkit.distributed.sharding import shard_model

    empty = DitkitTeacher(checkpoint, empty=True)
    shard_model(empty.model, torch.device("cpu"))
    materialize(empty.model, torch.device("cpu"))
    load_shards(empty.model, empty.pending_weights)
    return differences(empty.model, DitkitTeacher(checkpoint).model)


def allocated_peak(fn) -> int:
    """Peak bytes PyTorch's CPU allocator holds while `fn()` runs, above what it held before: every
    allocation and free as the profiler records them. (ditkit.metrics.memory's dispatch tracker
    does not see storage-level copies such as deepcopy's, so it would undercount the old path.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def load_memory(teacher: Path) -> dict[str, int]:
    """Peak bytes this process allocates building a sharded distiller of the FLUX teacher: loaded
    shard by shard (new) and loaded whole first (old); and what its shards and buffers take."""
    from ditkit.distill import Distiller, load_teacher
    from ditkit.distill.diffusers_teacher import DiffusersTeacher

    cfg = distill_config(teacher, 2, sharding="fsdp")
    new = allocated_peak(lambda: Distiller(load_teacher(cfg), cfg, progress=False))
    old = allocated_peak(lambda: Distiller(DiffusersTeacher(teacher, resolution=64), cfg, progress=False))
    distiller = Distiller(load_teacher(cfg), cfg, progress=False)
    models = (distiller.teacher.model, distiller.student)
    processes = dist.get_world_size()
    share = sum(-(-p.shape[0] // processes) * (p.numel() // p.shape[0]) * p.element_size()
                for model in models for p in model.parameters())
    return {"new": new, "old": old, "share": share,
            "buffers": sum(b.numel() * 4 for model in models for _, b in model.named_buffers()),
            "largest": max(p.numel() * 4 for p in distiller.teacher.model.parameters()),
            "largest_file": max(file.stat().st_size for file in teacher.glob("*.safetensors"))}


def one(out: Path) -> None:
    """The same global batch on one process: grad_accum 2 x batch 2 instead of 2 processes x batch 2."""
    run("train", "digits", *tiny_run(out / "halves-on-one", *TRAIN, "train.steps=4", "train.grad_accum=2"),
        "--resume", "--no-progress")


if __name__ == "__main__":
    import gc

    dist.init_process_group("gloo")
    {"two": two, "one": one}[sys.argv[1]](Path(sys.argv[2]))
    gc.collect()  # sharded modules (and any communication they hold) go while the process group lives
    dist.barrier()
    dist.destroy_process_group()
