"""`ditkit distill`: CLEAR's linearization of a pre-trained full-attention DiT.

1. the teacher generates `num_samples` samples (cached; `samples.py`);
2. the student is the teacher with every attention mixer swapped for `clear` (radius r, optional
   pooled tokens); only its attention projections (and pooling weights) train;
3. loss = teacher's objective + output matching + attention-output matching (`losses.py`),
   AdamW or Prodigy, gradient clipping; checkpoints and exact resume as in training;
4. agreement with the teacher on held-out seeds (same noise, same conditions): PSNR and SSIM at
   the training resolution and at 2x, for the untuned student (swapped, no training) and the
   distilled one, with side-by-side PNGs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.images import image_grid, save_image
from ..diffusion.sampling import sample
from ..errors import DitkitError
from ..files import atomic_path, atomic_write_text, read_json
from ..mixers.clear import local_pairs
from ..train.checkpoint import find_checkpoint, list_checkpoints, load_torch_file, read_weights, save_checkpoint
from ..train.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, check_ranges
from ..train.loop import MetricsLog, StepBatchSampler, step_generator
from ..train.runfolder import own_run_folder
from .losses import AttentionTaps, LossWeights, PairedDenoiser, distillation_loss
from .samples import teacher_samples
from .teacher import Teacher

OPTIMIZERS = ("adamw", "prodigy")
# What a distillation writes in its folder (the outputs --overwrite removes).
DISTILL_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "tensorboard", "distill.json", "teacher_samples", "eval",
                   "agreement.json", "compare-*.png")
RANGES = {"resolution": AT_LEAST_1, "teacher_steps": AT_LEAST_1, "radius": POSITIVE, "down_factor": AT_LEAST_0,
          "num_samples": AT_LEAST_1, "steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE,
          "weight_decay": AT_LEAST_0, "grad_clip": AT_LEAST_0, "attention_every": AT_LEAST_1, "seed": AT_LEAST_0,
          "log_every": AT_LEAST_1, "ckpt_every": AT_LEAST_1, "keep_checkpoints": AT_LEAST_0, "eval_num": AT_LEAST_1,
          "eval_steps": AT_LEAST_1}


@dataclass
class DistillConfig:
    """A distillation: the teacher, the student's CLEAR settings, training and the report. Loaded
    like training configs (`ditkit distill CONFIG.yaml key=value ...`); unset values have defaults."""

    teacher: str | None = None  # a ditkit checkpoint, or a diffusers transformer folder
    resolution: int | None = None  # training resolution in pixels (default: the teacher's; 512 for diffusers)
    teacher_steps: int | None = None  # sampling steps of the teacher's samples (default: its own; 28 for diffusers)
    prompt_embeds: str | None = None  # diffusers teachers: safetensors of prompt embeddings (default: random)
    out_dir: str = "runs/distill"
    radius: float = 8
    down_factor: int = 0
    backend: str = "auto"
    num_samples: int = 1024  # teacher samples to train on (CLEAR: 10K)
    steps: int = 500
    batch_size: int = 32
    optimizer: str = "adamw"  # or "prodigy" (CLEAR's choice)
    lr: float | None = None  # default: 1e-4 for adamw, 1.0 for prodigy (it adapts the step size itself)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    weights: LossWeights = field(default_factory=LossWeights)
    attention_every: int = 1  # match attention outputs of every k-th attention layer (CLEAR: every 4th)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    eval_num: int = 8  # held-out samples for the agreement report
    eval_steps: int | None = None  # sampling steps for the report (default: the teacher's)

    def __post_init__(self):
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        if self.optimizer not in OPTIMIZERS:
            raise DitkitError(f"unknown optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        if self.lr is None:
            self.lr = 1.0 if self.optimizer == "prodigy" else 1e-4
        check_ranges(self, RANGES, "distill ")


def build_optimizer(cfg: DistillConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise DitkitError("optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from error
        return Prodigy(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def images_agreement(reference: Tensor, images: Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of `images` against `reference`, both (B, C, H, W) in [-1, 1]."""
    from ..metrics.agreement import agreement

    result = agreement(reference, images)
    return {"psnr": result["psnr"], "ssim": result["ssim"]}


class Distiller:
    def __init__(self, teacher: Teacher, cfg: DistillConfig, device: str | torch.device = "cpu",
                 progress: bool = True):
        self.teacher, self.cfg, self.device, self.progress = teacher, cfg, torch.device(device), progress
        self.out_dir = Path(cfg.out_dir)
        self.student = teacher.make_student(cfg.radius, cfg.down_factor, cfg.backend).to(self.device)
        self.student.requires_grad_(False)
        self.trainable = teacher.trainable_parameters(self.student)
        if not self.trainable:
            raise DitkitError("the student has no attention parameters to train: is the teacher an attention model?")
        for p in self.trainable.values():
            p.requires_grad_(True)
        self.record = teacher.student_record(self.student, {
            "teacher": teacher.describe(), "radius": cfg.radius, "down_factor": cfg.down_factor})

    # -- agreement ---------------------------------------------------------------------------
    def _eval_images(self, model: nn.Module, name: str, resolution: int) -> Tensor:
        """Decoded held-out samples of `model`; the teacher's are cached (they never change)."""
        path = self.out_dir / "eval" / f"{name}-{resolution}.safetensors"
        if name == "teacher" and path.is_file():
            return load_file(path)["images"]
        t, cfg = self.teacher, self.cfg
        cond = t.draw_conditions(cfg.eval_num, step_generator(cfg.seed, 0xE7A1))
        x = sample(model, t.objective, (cfg.eval_num, *t.input_shape(resolution, resolution)), labels=cond,
                   steps=cfg.eval_steps or t.steps, cfg_scale=t.cfg_scale, seed=cfg.seed + 0xE7A1,
                   sampler=t.sampler, progress=False, guidance_channels=t.guidance_channels)
        images = t.decode(x).float().cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"images": images.contiguous()}, tmp)
        return images

    def evaluate(self, name: str) -> dict[str, dict[str, float]]:
        """Agreement of the student (as it is now) with the teacher at 1x and 2x the training size."""
        self.student.eval()
        results = {}
        for resolution in (self.teacher.resolution, 2 * self.teacher.resolution):
            reference = self._eval_images(self.teacher.model, "teacher", resolution)
            results[str(resolution)] = images_agreement(reference, self._eval_images(self.student, name, resolution))
        return results

    def attention_work(self) -> dict[str, float]:
        """Image-attention work of the student relative to the teacher's full attention, at 1x, 2x, 4x."""
        work = {}
        for scale in (1, 2, 4):
            resolution = scale * self.teacher.resolution
            grid = self.teacher.token_grid(resolution, resolution)
            work[str(resolution)] = local_pairs(grid, self.cfg.radius) / (grid[0] * grid[1]) ** 2
        return work

    def _write_report(self, agreement: dict) -> None:
        atomic_write_text(self.out_dir / "agreement.json", json.dumps(agreement, indent=2))
        for resolution in (self.teacher.resolution, 2 * self.teacher.resolution):
            rows = [load_file(self.out_dir / "eval" / f"{n}-{resolution}.safetensors")["images"]
                    for n in ("teacher", "untuned", "student")]
            save_image(image_grid(torch.cat(rows), ncols=self.cfg.eval_num), self.out_dir / f"compare-{resolution}.png")

    # -- training ----------------------------------------------------------------------------
    def _resume(self, optimizer: torch.optim.Optimizer, resume: str | bool | None) -> int:
        root = self.out_dir / "checkpoints"
        if not resume or (resume is True and not list_checkpoints(root)):
            return 0
        path = find_checkpoint(root if resume is True else resume)
        tensors, record = read_weights(path / "model.safetensors")
        mine = self.record.to_dict()
        if record.to_dict()["distill"] != mine["distill"] or record.model_dict() != mine["model"]:
            raise DitkitError(f"checkpoint {path} comes from another distillation (teacher, radius or model "
                              "differ): resume with the settings it was made with")
        state = read_json(path / "training_state.json", "training state")
        self.student.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=False)
        optimizer.load_state_dict(load_torch_file(path / "optimizer.pt", self.device))
        return state["step"]

    def run(self, resume: str | bool | None = None, overwrite: bool = False) -> dict:
        """Distil (`resume`: True for the output folder's latest checkpoint, or a checkpoint path); returns
        the agreement report. The run owns its output folder meanwhile; `overwrite` replaces a previous
        distillation found there (without it, or `resume`, such a folder is refused)."""
        with own_run_folder(self.out_dir, DISTILL_OUTPUTS, resume=resume, overwrite=overwrite,
                            command="ditkit distill"):
            return self._run(resume)

    def _run(self, resume: str | bool | None) -> dict:
        cfg, teacher = self.cfg, self.teacher
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "distill.json", json.dumps(
            {"teacher": teacher.describe(), **asdict(cfg)}, indent=2, default=str))
        x_all, cond_all = teacher_samples(teacher, self.out_dir / "teacher_samples", cfg.num_samples, cfg.seed,
                                          self.progress)
        agreement_path = self.out_dir / "agreement.json"
        agreement = read_json(agreement_path, "agreement report") if agreement_path.is_file() else {}
        if "untuned" not in agreement:  # the baseline: attention swapped, nothing trained
            agreement = {"untuned": self.evaluate("untuned")}
            atomic_write_text(agreement_path, json.dumps(agreement, indent=2))

        optimizer = build_optimizer(cfg, list(self.trainable.values()))
        start = self._resume(optimizer, resume)
        self._train(optimizer, start, x_all, cond_all)
        agreement["student"] = self.evaluate("student")
        agreement["attention_work"] = self.attention_work()
        self._write_report(agreement)
        return agreement

    def _train(self, optimizer: torch.optim.Optimizer, start: int, x_all: Tensor, cond_all: Tensor | None) -> None:
        cfg, teacher = self.cfg, self.teacher
        if start >= cfg.steps:
            return
        paired = PairedDenoiser(self.student, teacher.model)
        student_taps = AttentionTaps(teacher.attention_taps(self.student)[::cfg.attention_every])
        teacher_taps = AttentionTaps(teacher.attention_taps(teacher.model)[::cfg.attention_every])
        batches = StepBatchSampler(len(x_all), cfg.batch_size, cfg.seed, start, cfg.steps)
        log = MetricsLog(self.out_dir, enabled=True)
        log.drop_after(start)
        bar = tqdm(total=cfg.steps, initial=start, desc="distill", dynamic_ncols=True, disable=not self.progress)
        params = list(self.trainable.values())
        self.student.train()
        window_sums: dict[str, float] = {}
        window_steps = 0
        for step, indices in zip(range(start, cfg.steps), batches, strict=True):
            generator = step_generator(cfg.seed, step)
            x0 = x_all[indices].to(self.device)
            cond = None if cond_all is None else teacher.drop_conditions(cond_all[indices], generator).to(self.device)
            loss, parts = distillation_loss(teacher.objective, paired, student_taps, teacher_taps, x0, cond,
                                            generator, cfg.weights)
            if not math.isfinite(parts["loss"]):
                raise DitkitError(f"distillation loss became {parts['loss']} at step {step + 1}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            done = step + 1
            window_sums = {k: window_sums.get(k, 0.0) + v for k, v in parts.items()}
            window_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                log.write(done, **{k: v / window_steps for k, v in window_sums.items()})
                window_sums, window_steps = {}, 0
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save_checkpoint(self.out_dir / "checkpoints", done, model=teacher.student_state(self.student),
                                ema=None, optimizer=optimizer, record=self.record,
                                train_state={"seed": cfg.seed}, keep=cfg.keep_checkpoints)
                log.plot()
        bar.close()
        student_taps.remove()
        teacher_taps.remove()


def format_agreement(agreement: dict, cfg: DistillConfig) -> str:
    """The report of `Distiller.run` as a table: PSNR/SSIM of the untuned and distilled students, and
    the attention work saved."""
    header = "".join(f"  {name:>12}" for name in ("untuned PSNR", "untuned SSIM", "student PSNR", "student SSIM"))
    lines = [f"student agreement with the teacher on {cfg.eval_num} held-out samples (same noise and conditions):",
             f"{'resolution':>10}{header}"]
    for resolution, student in agreement["student"].items():
        untuned = agreement["untuned"][resolution]
        lines.append(f"{resolution:>10}  {untuned['psnr']:>12.2f}  {untuned['ssim']:>12.4f}  "
                     f"{student['psnr']:>12.2f}  {student['ssim']:>12.4f}")
    work = ", ".join(f"{res} px {100 * (1 - w):.1f}%" for res, w in agreement["attention_work"].items())
    lines.append(f"image-attention FLOPs saved vs full attention at radius {cfg.radius:g}: {work}")
    return "\n".join(lines)
