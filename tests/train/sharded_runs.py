"""Sharded (FSDP2) runs for tests/train/test_sharding.py, started by torchrun: one launch does several
runs, so the test pays the process start-up once.

    torchrun --nproc_per_node 2 sharded_runs.py two OUT     train straight and in halves; distill a FLUX
                                                           teacher straight and in halves; gradients
                                                           of the sharded student (OUT/gradients.json)
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

    teacher = out / "flux"
    if dist.get_rank() == 0:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=[4, 6, 6]).save_pretrained(teacher)
    dist.barrier()
    run(*distill_args(teacher, out / "student", 4))
    run(*distill_args(teacher, out / "student-halves", 2))
    run(*distill_args(teacher, out / "student-halves", 4), "--resume")
    result = student_gradients(teacher)
    if dist.get_rank() == 0:
        (out / "gradients.json").write_text(json.dumps(result))


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
