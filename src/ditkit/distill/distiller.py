"""`ditkit distill`: CLEAR's linearization of a pre-trained full-attention DiT.

1. the teacher generates `num_samples` samples (cached; `samples.py`);
2. the student is the teacher with every attention mixer swapped for `clear` (radius r, optional
   pooled tokens); only its attention projections (and pooling weights) train;
3. loss = teacher's objective + output matching + attention-output matching (`losses.py`),
   AdamW or Prodigy, gradient clipping; checkpoints and exact resume as in training;
4. agreement with the teacher on held-out seeds (same noise, same conditions): PSNR and SSIM at
   the training resolution and at 2x, for the untuned student (swapped, no training) and the
   distilled one, with side-by-side PNGs.

With `sharding: fsdp` (under torchrun) teacher and student are sharded per block with FSDP2
(distributed/sharding.py): their frozen weights in `frozen_dtype` (bf16), the trained projections fp32
units of their own (computing in bf16) whose AdamW state is sharded too. A teacher from
`load_teacher` is then built on the meta device, its student too, and each process reads only its
shards of the weights (distributed/sharded_load.py): a 12B teacher never sits whole on any process.
Every process samples and evaluates together (the sharded forwards are collective) and trains on
its own slice of each batch; the main process writes the reports and the checkpoints' safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoint import (
    find_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    read_training_state,
    read_weights,
    save_checkpoint,
)
from ..config import AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_fields, one_of, ranged
from ..data.images import image_grid, save_image
from ..diffusion.sampling import sample
from ..distributed.launch import require_process_group
from ..distributed.sharded_load import check_weights, load_shards, materialize
from ..distributed.sharding import (
    DTYPES,
    SHARDED_STATE,
    broadcast_refusal,
    check_checkpoint_kind,
    checkpoint_activations,
    from_main,
    full_tensors,
    load_sharded,
    save_staged_checkpoint,
    shard_model,
)
from ..errors import DitkitError
from ..files import atomic_path, atomic_write_text, read_json
from ..metrics.agreement import agreement
from ..mixers import MixerSpec
from ..mixers.clear import initial_added_parameters, local_pairs
from ..train.config import SHARDINGS
from ..train.loop import MetricsLog, StepBatchSampler, step_generator
from ..train.runfolder import own_run_folder
from .losses import AttentionTaps, LossWeights, PairedDenoiser, distillation_loss
from .samples import teacher_samples
from .teacher import Teacher

OPTIMIZERS = ("adamw", "prodigy")
STUDENT_OPTIONS = ("radius", "down_factor", "backend")  # the clear options a distillation sets
# What a distillation writes in its folder (the outputs --overwrite removes).
DISTILL_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "tensorboard", "distill.json", "teacher_samples", "eval",
                   "agreement.json", "compare-*.png")


@dataclass
class DistillConfig:
    """A distillation: the teacher, the student's CLEAR settings, training and the report. Loaded
    like training configs (`ditkit distill CONFIG.yaml key=value ...`); unset values have defaults."""

    # a ditkit checkpoint, a diffusers transformer or pipeline folder, or a hub repository ORG/NAME in the
    # local Hugging Face cache (its pipeline's transformer; never downloaded)
    teacher: str | None = None
    teacher_revision: str | None = None  # with teacher ORG/NAME: the cached branch, tag or commit (default main)
    resolution: int | None = ranged(None, AT_LEAST_1)  # training pixels (default: the teacher's; 512 for diffusers)
    # sampling steps of the teacher's samples (default: its own; 28 for diffusers)
    teacher_steps: int | None = ranged(None, AT_LEAST_1)
    prompt_embeds: str | None = None  # diffusers teachers: safetensors of prompt embeddings (default: random)
    out_dir: str = "runs/distill"
    # The student's CLEAR settings: a MixerSpec of clear (clear:radius=8,down_factor=4), or the three
    # fields below; either fills the other (they must agree where both are given).
    mixer: str | None = None
    radius: float = ranged(8, POSITIVE)
    down_factor: int = ranged(0, AT_LEAST_0)
    backend: str = "auto"
    num_samples: int = ranged(1024, AT_LEAST_1)  # teacher samples to train on (CLEAR: 10K)
    steps: int = ranged(500, AT_LEAST_1)
    batch_size: int = ranged(32, AT_LEAST_1)
    optimizer: str = "adamw"  # or "prodigy" (CLEAR's choice)
    lr: float | None = ranged(None, POSITIVE)  # default: 1e-4 for adamw, 1.0 for prodigy (it adapts the step size)
    weight_decay: float = ranged(1e-4, AT_LEAST_0)
    grad_clip: float = ranged(1.0, AT_LEAST_0)
    weights: LossWeights = field(default_factory=LossWeights)
    # match attention outputs of every k-th attention layer (CLEAR: every 4th)
    attention_every: int = ranged(1, AT_LEAST_1)
    seed: int = ranged(0, SEED)
    log_every: int = ranged(10, AT_LEAST_1)
    ckpt_every: int = ranged(250, AT_LEAST_1)
    keep_checkpoints: int = ranged(2, AT_LEAST_0)
    eval_num: int = ranged(8, AT_LEAST_1)  # held-out samples for the agreement report
    eval_steps: int | None = ranged(None, AT_LEAST_1)  # sampling steps for the report (default: the teacher's)
    # none, or fsdp: FSDP2 under torchrun (teacher and student sharded per block)
    sharding: str = one_of("none", SHARDINGS)
    frozen_dtype: str | None = one_of(None, tuple(DTYPES))  # sharded runs: bf16 (default) or fp32, every frozen weight
    activation_checkpointing: bool = False  # recompute the student's block activations in backward

    def __post_init__(self):
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        if self.optimizer not in OPTIMIZERS:
            raise DitkitError(f"unknown optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        if self.lr is None:
            self.lr = 1.0 if self.optimizer == "prodigy" else 1e-4
        if self.frozen_dtype is None:
            self.frozen_dtype = "bf16" if self.sharding == "fsdp" else "fp32"
        check_fields(self, "")
        self._read_mixer()
        if self.frozen_dtype != "fp32" and self.sharding != "fsdp":
            raise DitkitError(f"frozen_dtype={self.frozen_dtype} needs sharding=fsdp (its units compute the fp32 "
                              "projections in that dtype): set sharding=fsdp, or frozen_dtype=fp32")


    def _read_mixer(self) -> None:
        """Fill radius, down_factor and backend from `mixer` (or check them as a spec of clear)."""
        fields = {key: getattr(self, key) for key in STUDENT_OPTIONS}
        if self.mixer is None:
            self.mixer_spec()  # the three fields, validated as clear's options
            return
        try:
            spec = MixerSpec.parse(self.mixer)
        except DitkitError as error:
            raise DitkitError(f"config key mixer: {error}") from error
        if spec.name != "clear" or set(spec.options) - set(STUDENT_OPTIONS):
            raise DitkitError(f"config key mixer must be clear with options among {', '.join(STUDENT_OPTIONS)} "
                              f"(the student's CLEAR), got {self.mixer!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in STUDENT_OPTIONS}
        for key, value in spec.options.items():
            if fields[key] not in (defaults[key], value):
                raise DitkitError(f"config key mixer sets {key}={value} and config key {key} sets {fields[key]}: "
                                  "give the CLEAR settings once")
            setattr(self, key, value)
        self.mixer = str(spec)
        self.mixer_spec()  # with the fields the spec left out

    def mixer_spec(self) -> MixerSpec:
        """The student's mixer: clear with this distillation's radius, down_factor and backend, validated."""
        try:
            return MixerSpec("clear", {key: getattr(self, key) for key in STUDENT_OPTIONS})
        except DitkitError as error:
            raise DitkitError(f"distill config: {error}") from error


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
    result = agreement(reference, images)
    return {"psnr": result["psnr"], "ssim": result["ssim"]}


class Distiller:
    def __init__(self, teacher: Teacher, cfg: DistillConfig, device: str | torch.device = "cpu",
                 progress: bool = True):
        self.teacher, self.cfg, self.device, self.progress = teacher, cfg, torch.device(device), progress
        self.sharded = cfg.sharding == "fsdp"
        self.rank, self.world = require_process_group("distill") if self.sharded else (0, 1)
        self.is_main = self.rank == 0
        self.out_dir = Path(cfg.out_dir)
        if teacher.pending_weights is None:
            self.student = teacher.make_student(cfg.radius, cfg.down_factor, cfg.backend).to(self.device)
        else:  # a teacher built on the meta device: its student too, both loaded once sharded
            if not self.sharded:
                raise DitkitError("the teacher was built without its weights (for sharding=fsdp): load it with "
                                  "load_teacher of a config with sharding=none, or distil with sharding=fsdp")
            with torch.device("meta"):  # what CLEAR adds is built there too (initial values come at load)
                self.student = teacher.make_student(cfg.radius, cfg.down_factor, cfg.backend)
        self.student.requires_grad_(False)
        self.trainable = teacher.trainable_parameters(self.student)
        if not self.trainable:
            raise DitkitError("the student has no attention parameters to train: is the teacher an attention model?")
        for p in self.trainable.values():
            p.requires_grad_(True)
        self.record = teacher.student_record(self.student, {
            "teacher": teacher.describe(), "radius": cfg.radius, "down_factor": cfg.down_factor})
        if cfg.activation_checkpointing:
            checkpoint_activations(self.student)
        if self.sharded:
            self._shard()

    def _shard(self) -> None:
        """Frozen weights in frozen_dtype, trained ones fp32 in FSDP units of their own (a unit holds
        one dtype), then blocks and roots; the teacher alike. The trained ones keep the teacher's
        fp32 values (not rounded through bf16). fully_shard makes new parameters, so the trained
        ones are looked up again."""
        frozen = DTYPES[self.cfg.frozen_dtype]
        trained = {name: p.data for name, p in self.trainable.items()}  # fp32, not rounded through bf16
        self.teacher.model.to(frozen)
        self.student.to(frozen)
        for name, p in self.trainable.items():
            p.data = trained[name].float()
        compute = None if frozen == torch.float32 else frozen
        shard_model(self.student, self.device, first_units=self._trained_units(), compute_dtype=compute)
        shard_model(self.teacher.model, self.device, compute_dtype=compute)
        if self.teacher.pending_weights is not None:
            self._load_shards()
        self.trainable = self.teacher.trainable_parameters(self.student)

    def _load_shards(self) -> None:
        """Teacher and student built on the meta device, now sharded: each process allocates its
        shards and reads its rows of the teacher's weights into both (distributed/sharded_load.py); the
        student's CLEAR additions take their initial values. Both are checked against the files
        before anything is allocated."""
        files = self.teacher.pending_weights
        added = initial_added_parameters(self.student)
        models = ((self.teacher.model, {}), (self.student, added))
        for model, initial in models:
            check_weights(model, files, initial)
        for model, initial in models:
            materialize(model, self.device)
            load_shards(model, files, initial)
        self.teacher.pending_weights = None

    def _trained_units(self) -> list[nn.Module]:
        """The modules that own the trained parameters, innermost first; each must own no frozen ones."""
        owners = {name.rpartition(".")[0] for name in self.trainable}
        for owner in owners:
            own = {f"{owner}.{name}" for name, _ in self.student.get_submodule(owner).named_parameters(recurse=False)}
            if not own <= self.trainable.keys():
                raise DitkitError(f"{owner} holds trained and frozen weights: sharding=fsdp needs them in separate "
                                  "modules; use sharding=none for this teacher")
        return [self.student.get_submodule(owner) for owner in sorted(owners, key=lambda o: -o.count("."))]

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
        if not self.is_main:
            return
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
        check_checkpoint_kind(path, self.sharded, "distill")
        tensors, record = read_weights(path / "model.safetensors")
        mine = self.record.to_dict()
        if record.to_dict()["distill"] != mine["distill"] or record.model_dict() != mine["model"]:
            raise DitkitError(f"checkpoint {path} comes from another distillation (teacher, radius or model "
                              "differ): resume with the settings it was made with")
        state = read_training_state(path)
        if self.sharded:
            load_sharded(path / SHARDED_STATE, self.student, optimizer, model_keys=self.trainable)
        else:
            self.student.load_state_dict({k: v.to(self.device) for k, v in tensors.items()}, strict=False)
            optimizer.load_state_dict(load_optimizer_state(path, self.device))
        return state["step"]

    def run(self, resume: str | bool | None = None, overwrite: bool = False) -> dict:
        """Distil (`resume`: True for the output folder's latest checkpoint, or a checkpoint path); returns
        the agreement report. The run owns its output folder meanwhile; `overwrite` replaces a previous
        distillation found there (without it, or `resume`, such a folder is refused)."""
        with ExitStack() as stack:
            refusal = None
            if self.is_main:  # one process holds the folder; all stop with its refusal
                try:
                    stack.enter_context(own_run_folder(self.out_dir, DISTILL_OUTPUTS, resume=resume,
                                                       overwrite=overwrite, command="ditkit distill",
                                                       inputs=self.inputs()))
                except DitkitError as error:
                    refusal = str(error)
            broadcast_refusal(refusal)
            return self._run(resume)

    def inputs(self) -> dict[str, str | None]:
        """What the distillation reads, which its output folder must keep clear of."""
        return {"teacher": self.cfg.teacher, "prompt embeddings file": self.cfg.prompt_embeds}

    def _run(self, resume: str | bool | None) -> dict:
        cfg, teacher = self.cfg, self.teacher
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            atomic_write_text(self.out_dir / "distill.json", json.dumps(
                {"teacher": teacher.describe(), **asdict(cfg)}, indent=2, default=str))
        # Sharded: the processes split the chunks of samples, and each writes them all (atomically).
        x_all, cond_all = teacher_samples(teacher, self.out_dir / "teacher_samples", cfg.num_samples, cfg.seed,
                                          self.progress and self.is_main, self.rank, self.world)
        agreement_path = self.out_dir / "agreement.json"
        agreement = read_json(agreement_path, "agreement report") if agreement_path.is_file() else {}
        if self.sharded:  # the main process's view decides whether the (collective) baseline runs
            agreement = from_main(agreement)
        if "untuned" not in agreement:  # the baseline: attention swapped, nothing trained
            agreement = {"untuned": self.evaluate("untuned")}
            if self.is_main:
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
        batches = StepBatchSampler(len(x_all), cfg.batch_size, cfg.seed, start, cfg.steps, self.rank, self.world)
        log = MetricsLog(self.out_dir, enabled=self.is_main)
        log.drop_after(start)
        bar = tqdm(total=cfg.steps, initial=start, desc="distill", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main))
        params = list(self.trainable.values())
        self.student.train()
        window_sums: dict[str, float] = {}
        window_steps = 0
        for step, indices in zip(range(start, cfg.steps), batches, strict=True):
            # sharded: each process's slice of the batch draws its own noise, keyed by its rank
            generator = step_generator(cfg.seed, step, self.rank) if self.sharded else step_generator(cfg.seed, step)
            x0 = x_all[indices].to(self.device)
            cond = None if cond_all is None else teacher.drop_conditions(cond_all[indices], generator).to(self.device)
            loss, parts = distillation_loss(teacher.objective, paired, student_taps, teacher_taps, x0, cond,
                                            generator, cfg.weights)
            parts = self._mean_over_processes(parts)
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
                if self.sharded:
                    self._save_sharded(optimizer, done)
                else:
                    save_checkpoint(self.out_dir / "checkpoints", done, model=teacher.student_state(self.student),
                                    ema=None, optimizer=optimizer, record=self.record,
                                    train_state={"seed": cfg.seed}, keep=cfg.keep_checkpoints)
                log.plot()
        bar.close()
        student_taps.remove()
        teacher_taps.remove()

    def _mean_over_processes(self, parts: dict[str, float]) -> dict[str, float]:
        """The loss terms averaged over processes (sharded: each saw its own slice of the batch)."""
        if not self.sharded:
            return parts
        values = torch.tensor(list(parts.values()), dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        torch.distributed.all_reduce(values)
        return dict(zip(parts, (values / self.world).tolist(), strict=True))

    def _save_sharded(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Every process writes its shards of the trained weights and their AdamW state; the main
        process adds the student's whole weights (what `student_state` saves) and completes it."""
        save_staged_checkpoint(
            self.out_dir / "checkpoints", step, self.student, optimizer, is_main=self.is_main,
            model_keys=self.trainable,
            full_weights=lambda: (full_tensors(self.teacher.student_state(self.student), self.is_main), None),
            record=self.record, keep=self.cfg.keep_checkpoints,
            train_state={"seed": self.cfg.seed, "num_processes": self.world, "sharding": "fsdp"})


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
