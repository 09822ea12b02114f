"""`ditkit train`: one training loop on HF Accelerate (devices, mixed precision, gradient
accumulation, multi-process DDP via `accelerate launch`), or, with train.sharding=fsdp, on
PyTorch FSDP2 under torchrun (`sharding.py`; Accelerate then only forms the process group).

Exact resume: every random draw of step s (data order, noise, timesteps, label dropout, flips)
comes from generators seeded by (seed, s, ...), and checkpoints hold weights, EMA and optimizer
state, so N steps straight and N/2 + resume + N/2 give the same weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import (
    META_KEY,
    OPTIMIZER_FILE,
    find_checkpoint,
    load_optimizer_state,
    load_state,
    read_header,
    read_training_state,
    read_weights,
    resume_advice,
    save_checkpoint,
)
from ..data import build_dataset, cached_latents
from ..data.images import save_grid
from ..data.latents import load_vae
from ..data.prepared import PreparedLatents, latents_folder, vae_fingerprint
from ..diffusion.objectives import build_objective
from ..diffusion.pipeline import generate, input_size
from ..distributed.launch import Processes, require_process_group
from ..distributed.sharding import (
    SHARDED_STATE,
    check_checkpoint_kind,
    checkpoint_activations,
    ema_state,
    full_tensors,
    load_sharded,
    save_staged_checkpoint,
    shard_model,
    sharded_ema,
    update_sharded_ema,
)
from ..errors import DitkitError
from ..files import atomic_write_text, read_json, writing
from ..metrics.shards import agreed
from ..models import build_model, model_config
from ..record import DataSettings, RunRecord
from .config import TrainConfig
from .loop import MetricsLog, StepBatchSampler, step_generator
from .runfolder import TRAIN_OUTPUTS, own_run_folder

# A step loss this many times the run's first one means training diverges (warned once).
EXPLODING_LOSS = 1000.0


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device. Without one, Accelerate must be told `cpu=True`,
    or processes started by torchrun / accelerate launch do not form a (gloo) process group."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def refuse_sharding(accelerator: Accelerator) -> None:
    """Accelerate's FSDP and DeepSpeed plugins would shard the model behind the EMA and checkpoints,
    which ditkit keeps itself: they stop here instead of hanging later; ditkit's own FSDP2 path
    (train.sharding=fsdp) shards those too."""
    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DitkitError(f"ditkit train does not use Accelerate's {kind.value} plugin (its EMA and checkpoints "
                          "are ditkit's): launch without an FSDP/DeepSpeed config, and for sharded training set "
                          "train.sharding=fsdp and start with torchrun --nproc_per_node N")


def lr_at(step: int, cfg: TrainConfig, base: float | None = None) -> float:
    """Constant learning rate (`base`, default train.lr) after a linear warmup."""
    base = cfg.train.lr if base is None else base
    warmup = cfg.train.warmup_steps
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One AdamW group for every parameter, and, when train.ssm_lr is set, a second one for the SSM
    state dynamics (the parameters that modules list in `dynamics`) at that lr with no weight decay."""
    dynamics = {id(getattr(module, name)) for module in model.modules() for name in getattr(module, "dynamics", ())}
    if cfg.train.ssm_lr is None or not dynamics:
        return [{"params": list(model.parameters()), "lr": cfg.train.lr, "base_lr": cfg.train.lr,
                 "weight_decay": cfg.train.weight_decay}]
    rest = [p for p in model.parameters() if id(p) not in dynamics]
    special = [p for p in model.parameters() if id(p) in dynamics]
    return [{"params": rest, "lr": cfg.train.lr, "base_lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay},
            {"params": special, "lr": cfg.train.ssm_lr, "base_lr": cfg.train.ssm_lr, "weight_decay": 0.0}]


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warmup, (1 + s) / (10 + s) capped at `decay`: short runs get a useful EMA
    instead of one still dominated by the (zero-output) initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def load_optimizer(optimizer, folder: Path, groups: list[dict], device) -> None:
    """The saved moments and step counts (verified and finite: `load_optimizer_state`); lr and weight
    decay stay those of the current config."""
    path = folder / OPTIMIZER_FILE
    saved = load_optimizer_state(folder, device)
    if len(saved["param_groups"]) != len(groups):
        raise DitkitError(f"{path} has {len(saved['param_groups'])} optimizer parameter group(s), this config makes "
                          f"{len(groups)}: resume with the train.ssm_lr it was trained with (a number, or null)")
    refuse_misshapen_state(saved, optimizer, path)
    optimizer.load_state_dict(saved)
    restore_group_settings(optimizer, groups)


def refuse_misshapen_state(saved: dict, optimizer, path: Path) -> None:
    """Saved optimizer state that does not fit this model's parameters (another run's optimizer.pt)
    is one line here: torch would load it and fail at the first step."""
    for number, (group, mine) in enumerate(zip(saved["param_groups"], optimizer.param_groups, strict=True)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            raise DitkitError(f"{path} holds state for {len(ids or [])} parameters in group {number}, this model has "
                              f"{len(mine['params'])}: it is another model's optimizer; resume from this run's "
                              "checkpoint")
        for index, param in zip(ids, mine["params"], strict=True):
            moments = saved["state"].get(index, {})
            bad = next((name for name, value in moments.items() if isinstance(value, torch.Tensor)
                        and value.dim() > 0 and value.shape != param.shape), None)
            if bad is not None:
                raise DitkitError(f"{path} holds {bad} of shape {tuple(moments[bad].shape)} for a parameter of shape "
                                  f"{tuple(param.shape)}: it is another model's optimizer; resume from this run's "
                                  "checkpoint")


def refuse_contradictions(args: dict, derived: dict[str, tuple[object, str]]) -> None:
    """A model field the run takes from elsewhere (`derived`: {field: (value, where from)}) that
    model.args sets to something else is one line naming both: it was silently overridden before."""
    for key, (value, source) in derived.items():
        if key in args and args[key] != value:
            raise DitkitError(f"config key model.args.{key}={args[key]!r} contradicts {source}, which sets it to "
                              f"{value!r}: leave model.args.{key} unset (ditkit takes it from there) or set {value!r}")


def setup_changes(saved: RunRecord, saved_seed: int | None, mine: RunRecord, seed: int) -> list[str]:
    """What exact resume cannot survive beyond the model config, as 'key old -> new' items."""
    def sigma(record: RunRecord):  # learn_sigma means something for ddpm only
        return record.diffusion.learn_sigma if record.diffusion.objective == "ddpm" else None

    pairs = {"train.seed": (saved_seed, seed), "data.resolution": (saved.resolution, mine.resolution),
             "diffusion.objective": (saved.diffusion.objective, mine.diffusion.objective),
             "diffusion.learn_sigma": (sigma(saved), sigma(mine)),
             "diffusion.timestep_sampling": (saved.diffusion.timestep_sampling, mine.diffusion.timestep_sampling)}
    return [f"{key} {old!r} -> {new!r}" for key, (old, new) in pairs.items() if old is not None and old != new]


def restore_group_settings(optimizer, groups: list[dict]) -> None:
    """After loading optimizer state: lr and weight decay stay those of the current config."""
    for group, fresh in zip(optimizer.param_groups, groups, strict=True):
        group["base_lr"], group["weight_decay"] = fresh["base_lr"], fresh["weight_decay"]


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p.detach().float(), 1 - decay)


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out_dir = Path(cfg.train.out_dir)
        # Accelerate keeps one global state per process; a second run in the same process (a notebook,
        # distillation after sampling) may want other settings. The process group itself is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not has_accelerator(),
                                       gradient_accumulation_steps=cfg.train.grad_accum)
        refuse_sharding(self.accelerator)
        self.sharded = cfg.train.sharding == "fsdp"
        if self.sharded:
            require_process_group("train")
        self.objective = build_objective(cfg.diffusion)
        self.dataset, self.vae_path, scale = self._prepare_data()
        mixer = {key: value for key, value in (("mixer", cfg.model.mixer), ("mixer_options", cfg.model.mixer_options))
                 if value is not None}
        self.model_config = model_config(
            cfg.model.name, **{**cfg.model.args, **mixer, "in_channels": self.dataset.channels,
                               "num_classes": self.dataset.num_classes, "learn_sigma": self.objective.learn_sigma,
                               "vae_scale": scale})
        torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed only
        self.model = build_model(self.model_config)
        input_size(self.model, cfg.data.resolution, cfg.data.resolution)  # fails early on a bad resolution
        self.record = RunRecord(
            model=self.model_config, diffusion=copy.deepcopy(cfg.diffusion),
            data=DataSettings(source=cfg.data.source, resolution=cfg.data.resolution, vae=self.vae_path,
                              class_names=list(self.dataset.class_names)))

    def _prepare_data(self):
        d = self.cfg.data
        if (folder := latents_folder(d.source)) is not None:
            return self._prepared_latents(folder)
        dataset = build_dataset(d.source, d.resolution, photos_length=d.photos_length, seed=self.cfg.train.seed,
                                cache_dir=d.cache_dir, image_column=d.image_column, label_column=d.label_column,
                                labels_file=d.labels_file)
        refuse_contradictions(self.cfg.model.args, self._derived_fields(dataset))
        if d.vae is None:
            return dataset, None, 1
        vae_path = str(Path(d.vae).resolve())
        cache_dir = d.cache_dir or str(Path.home() / ".cache" / "ditkit")
        acc = self.accelerator  # every process encodes its shards of the cache
        processes = Processes(str(acc.device), acc.process_index, acc.num_processes)
        latents = cached_latents(dataset, vae_path, cache_dir, hflip=d.hflip, device=acc.device,
                                 progress=self.progress, rank=acc.process_index, world_size=acc.num_processes,
                                 agree=lambda action: agreed(processes, action))
        return latents, vae_path, latents.vae_scale

    def _prepared_latents(self, folder: Path):
        """data.source latents:DIR: the manifest gives channels, classes and the VAE (data.vae, when set,
        must be the one the latents were made with); a data.resolution or data.hflip it contradicts is refused."""
        d, dataset = self.cfg.data, PreparedLatents(folder)
        made = dataset.manifest
        if d.resolution != made["resolution"]:
            side = made["resolution"]
            raise DitkitError(f"data.resolution={d.resolution} contradicts {d.source}, prepared at {side} px: set "
                              f"data.resolution={side} (or prepare the latents again at {d.resolution})")
        if d.hflip and not made["hflip"]:
            raise DitkitError(f"data.hflip=true but {d.source} was prepared without flips (latents cannot be flipped "
                              "at training time): prepare it with --hflip, or set data.hflip=false")
        vae_path = str(Path(d.vae or made["vae"]).resolve())
        if not (Path(vae_path) / "config.json").is_file():
            where = "data.vae" if d.vae else f"the VAE {d.source} was prepared with (its manifest's vae)"
            raise DitkitError(f"{where} {vae_path} is not a diffusers VAE folder, and sampling needs it: set data.vae "
                              "to the folder of the VAE the latents were prepared with")
        if d.vae is not None and vae_fingerprint(vae_path, load_vae(vae_path)) != (
                made["vae_config_sha256"], made["vae_weights_sha256"]):
            raise DitkitError(f"data.vae {d.vae} is not the VAE {d.source} was prepared with ({made['vae']}): leave "
                              "data.vae unset (the manifest's is used) or set it to that VAE's folder")
        where = f"the data ({d.source})"
        refuse_contradictions(self.cfg.model.args, {
            "in_channels": (dataset.channels, f"{where}, {dataset.channels} latent channels"),
            "vae_scale": (dataset.vae_scale, f"{where}, its VAE's downsampling"),
            "num_classes": (dataset.num_classes, f"{where}, {dataset.num_classes} classes"),
            "learn_sigma": (self.objective.learn_sigma, "the objective (diffusion.objective, diffusion.learn_sigma)")})
        return dataset, vae_path, dataset.vae_scale

    def _derived_fields(self, dataset) -> dict[str, tuple[object, str]]:
        """The model fields the run takes from its data and objective, as {field: (value, where from)}
        (a latent run's channels from its VAE's config, when it has one: read before any encoding)."""
        d = self.cfg.data
        channels, where = dataset.channels, f"the data ({d.source} has {dataset.channels} channel(s))"
        scale = (1, "data.vae (none: pixels)")
        vae_config = Path(d.vae or "") / "config.json"
        if d.vae is not None and vae_config.is_file():
            vae = read_json(vae_config, "VAE config")
            if vae.get("in_channels", 3) != dataset.channels:
                raise DitkitError(f"data.vae {d.vae} encodes {vae.get('in_channels', 3)}-channel images and "
                                  f"{d.source} has {dataset.channels}-channel ones: use a VAE made for them, or "
                                  "train in pixels (data.vae=null)")
            channels = vae.get("latent_channels", 4)
            where = f"data.vae (its latents have {channels} channels)"
            scale = (2 ** (len(vae.get("block_out_channels", [0])) - 1), "data.vae (its downsampling)")
        elif d.vae is not None:
            return {}  # load_vae says what is missing
        return {"in_channels": (channels, where), "vae_scale": scale,
                "num_classes": (dataset.num_classes, f"the data ({d.source} has {dataset.num_classes} classes)"),
                "learn_sigma": (self.objective.learn_sigma, "the objective (diffusion.objective, "
                                "diffusion.learn_sigma)")}

    def _resume_from(self, resume: str | bool) -> tuple[dict, Path]:
        path = find_checkpoint(self.out_dir if resume is True else resume)
        if path.is_file():
            raise DitkitError(f"--resume needs a checkpoint folder (with optimizer state), not the file {path}")
        check_checkpoint_kind(path, self.sharded, "train")
        _, metadata, _ = read_header(path)
        record = RunRecord.from_json(metadata[META_KEY], source=str(path)) if META_KEY in metadata else None
        if record is None:
            raise DitkitError(f"{path / 'model.safetensors'} is not a ditkit checkpoint (no model config in its "
                              "metadata)")
        state = read_training_state(path)
        if changes := setup_changes(record, state.get("seed"), self.record, self.cfg.train.seed):
            raise DitkitError(f"checkpoint {path} was trained with other settings ({'; '.join(changes)}): exact "
                              "resume needs the same ones; resume with them, or start afresh in another out_dir")
        saved, mine = record.model_dict(), self.record.model_dict()
        if saved != mine:
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            raise DitkitError(f"checkpoint {path} was trained with another model config (differs in "
                              f"{', '.join(diff)}): resume with the config it was trained with")
        if not self.sharded:  # sharded runs load their DCP state once the model is sharded
            load_state(self.model, read_weights(path / "model.safetensors")[0], path)
        return state, path

    def train(self, resume: str | bool | None = None, overwrite: bool = False) -> Path:
        """Train (`resume`: True for out_dir's latest checkpoint, or a checkpoint path); returns the last
        checkpoint. The run owns out_dir meanwhile; `overwrite` replaces a previous run found there."""
        with self._own_out_dir(resume, overwrite):
            # A storage fault outside a checkpoint write (metrics, samples): one line, with what then works.
            with writing(self.out_dir, folder=self.out_dir, after=resume_advice(self.out_dir / "checkpoints")):
                return self._train(resume)

    def inputs(self) -> dict[str, str | None]:
        """What the run reads, which its output folder must keep clear of (a built-in dataset's name is
        no path and is skipped)."""
        d = self.cfg.data
        return {"data.source": latents_folder(d.source) or d.source, "data.vae": d.vae}

    @contextmanager
    def _own_out_dir(self, resume, overwrite: bool) -> Iterator[None]:
        """The main process holds out_dir (runfolder.own_run_folder); every process stops with its refusal."""
        acc = self.accelerator
        with ExitStack() as stack:
            refusal = None
            if acc.is_main_process:
                try:
                    stack.enter_context(own_run_folder(self.out_dir, TRAIN_OUTPUTS, resume=resume,
                                                       overwrite=overwrite, command="ditkit train",
                                                       inputs=self.inputs()))
                except DitkitError as error:
                    refusal = str(error)
            if acc.num_processes > 1:
                refusal = broadcast_object_list([refusal])[0]
            if refusal is not None:
                raise DitkitError(refusal)
            yield

    def _train(self, resume: str | bool | None) -> Path:
        cfg, acc = self.cfg, self.accelerator
        model = self.model.to(acc.device)
        if cfg.train.activation_checkpointing:
            checkpoint_activations(model)
        if self.sharded:
            bf16 = cfg.train.mixed_precision == "bf16"
            shard_model(model, acc.device, compute_dtype=torch.bfloat16 if bf16 else None)
            ema = sharded_ema(model)
        else:
            ema = copy.deepcopy(model).float().requires_grad_(False).eval()
        groups = parameter_groups(model, cfg)
        optimizer = torch.optim.AdamW(groups)
        start, last_ckpt = 0, None
        if resume:
            state, path = self._resume_from(resume)
            if self.sharded:
                self._load_sharded(path, state, model, optimizer, ema, groups)
            else:
                ema_tensors, _ = read_weights(path / "ema.safetensors")
                load_state(ema, ema_tensors, path / "ema.safetensors")
                load_optimizer(optimizer, path, groups, acc.device)
            start, last_ckpt = state["step"], path
            acc.print(f"resuming from {path} at step {start}")
        if start >= cfg.train.steps:
            acc.print(f"nothing to do: already at step {start} of {cfg.train.steps}")
            return find_checkpoint(self.out_dir)
        if not self.sharded:  # FSDP2 modules are used as they are: Accelerate would wrap them in DDP
            model, optimizer = acc.prepare(model, optimizer)
        unwrapped = acc.unwrap_model(model)
        accum = cfg.train.grad_accum
        sampler = StepBatchSampler(len(self.dataset), cfg.train.batch_size, cfg.train.seed, start * accum,
                                   cfg.train.steps * accum, acc.process_index, acc.num_processes)
        batches = iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            atomic_write_text(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        log = MetricsLog(self.out_dir, acc.is_main_process)
        log.drop_after(start)
        bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
        first_loss = None
        model.train()
        for step in range(start, cfg.train.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, group["base_lr"])
            step_loss = 0.0
            for micro in range(accum):
                x, y = next(batches)
                generator = self._micro_generator(step, micro)
                x, y = self._augment(x.to(acc.device), y.to(acc.device), unwrapped, generator)
                if self.sharded:
                    loss = self._sharded_micro_step(model, optimizer, x, y, generator, step, micro)
                else:
                    with acc.accumulate(model):
                        loss = self.objective.loss(model, x, y, generator)
                        acc.backward(loss)
                        if acc.sync_gradients and cfg.train.grad_clip:
                            acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                        self._optimizer_step(optimizer, step)
                        optimizer.zero_grad(set_to_none=True)
                step_loss += float(acc.reduce(loss.detach(), "mean")) / accum
            if not math.isfinite(step_loss):
                bar.close()
                kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                raise DitkitError(f"loss became {step_loss} at step {step + 1}; stopped, {kept}: "
                                  "lower train.lr or use mixed_precision=no")
            first_loss = step_loss if first_loss is None else first_loss
            if step_loss > EXPLODING_LOSS * first_loss and first_loss > 0:
                warnings.warn(f"loss {step_loss:.3g} at step {step + 1} is over {EXPLODING_LOSS:g}x its first value "
                              f"{first_loss:.3g}: training is diverging; lower train.lr", stacklevel=2)
                first_loss = math.inf  # warned once
            if self.sharded:
                update_sharded_ema(ema, model, ema_decay_at(step, cfg.train.ema_decay))
            else:
                update_ema(ema, unwrapped, ema_decay_at(step, cfg.train.ema_decay))
            done = step + 1
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                log.write(done, loss=window_loss / window_steps, lr=lr_at(step, cfg),
                          steps_per_sec=window_steps / elapsed,
                          samples_per_sec=window_steps * accum * cfg.train.batch_size * acc.num_processes / elapsed)
                window_loss, window_start, window_steps = 0.0, time.perf_counter(), 0
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.steps:  # before the samples: never lost
                self._check_weights(unwrapped, done, last_ckpt)
                save = self._save_sharded if self.sharded else self._save
                last_ckpt = save(unwrapped, ema, optimizer, done)
                log.plot()
            if done % cfg.train.sample_every == 0 or done == cfg.train.steps:
                self._save_samples(self._ema_model(ema) if self.sharded else ema, done)
        bar.close()
        log.close()
        return last_ckpt

    def _micro_generator(self, step: int, micro: int) -> torch.Generator:
        """The generator of one micro-batch. Sharded runs key it by the micro-batch's place in the
        global batch (micro x processes + rank), as the batch order is: N processes with grad_accum
        a draw what 1 process with grad_accum N x a draws, so a run resumes on another number of
        processes (same global batch) as it would have gone on, up to float rounding."""
        acc = self.accelerator
        if self.sharded:
            return step_generator(self.cfg.train.seed, step, micro * acc.num_processes + acc.process_index)
        return step_generator(self.cfg.train.seed, step, micro, acc.process_index)

    def _sharded_micro_step(self, model, optimizer, x, y, generator, step: int, micro: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; after the last, gradients are reduce-scattered
        (averaged over processes), clipped and the sharded optimizer steps."""
        accum, clip = self.cfg.train.grad_accum, self.cfg.train.grad_clip
        last = micro == accum - 1
        model.set_requires_gradient_sync(last)
        loss = self.objective.loss(model, x, y, generator)
        (loss / accum).backward()
        if last:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            self._optimizer_step(optimizer, step)
            optimizer.zero_grad(set_to_none=True)
        return loss

    def _optimizer_step(self, optimizer, step: int) -> None:
        try:
            optimizer.step()
        except RuntimeError as error:  # e.g. lr=1e38: lr / (1 - beta1) does not fit a float
            if "overflow" not in str(error):
                raise
            raise DitkitError(f"the optimizer step {step + 1} overflows ({error}): train.lr={self.cfg.train.lr:g} is "
                              "far too large; lower it") from error

    @torch.no_grad()
    def _check_weights(self, model: nn.Module, step: int, last_ckpt: Path | None) -> None:
        """Weights are saved only if the model's outputs (for a fixed batch, at the middle noise level)
        still have a finite mean square, as the loss needs: the step's loss was computed before its
        update, so it cannot tell whether the update diverged."""
        count = min(len(self.dataset), self.cfg.train.batch_size)
        x, y = (torch.stack([torch.as_tensor(self.dataset[i][k]) for i in range(count)]).to(self.accelerator.device)
                for k in (0, 1))
        t = torch.full((count,), 500.0, device=x.device)  # both objectives feed the model t in [0, 1000)
        out = model(x, t, None if model.y_embedder is None else y)
        if not torch.isfinite(out.float().square().mean()):
            kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise DitkitError(f"the weights diverged by step {step} (the mean square of the model's outputs is inf "
                              f"or NaN); stopped without saving them, {kept}: lower train.lr")

    def _augment(self, x, y, model, generator):
        """Random flips (pixel data; cached latents hold their flips) and label dropout for CFG."""
        if self.cfg.data.hflip and self.vae_path is None:
            flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if model.y_embedder is None:
            return x, None
        return x, model.y_embedder.drop_labels(y, generator)

    def _save(self, model, ema, optimizer, step: int) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.out_dir / "checkpoints" / f"step_{step:07d}"
        if acc.is_main_process:
            save_checkpoint(self.out_dir / "checkpoints", step, model=model, ema=ema, optimizer=optimizer,
                            record=self.record,
                            train_state={"seed": self.cfg.train.seed, "num_processes": acc.num_processes},
                            keep=self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def _load_sharded(self, path: Path, state: dict, model, optimizer, ema: dict, groups: list[dict]) -> None:
        if state.get("param_groups", len(groups)) != len(groups):
            raise DitkitError(f"{path} has {state['param_groups']} optimizer parameter group(s), this config makes "
                              f"{len(groups)}: resume with the train.ssm_lr it was trained with (a number, or null)")
        load_sharded(path / SHARDED_STATE, model, optimizer, {"ema": ema})
        restore_group_settings(optimizer, groups)

    def _save_sharded(self, model, ema: dict, optimizer, step: int) -> Path:
        """Every process writes its shards (weights, EMA, optimizer); the main process adds the full
        weights as safetensors and renames the folder into place."""
        acc, main = self.accelerator, self.accelerator.is_main_process
        return save_staged_checkpoint(
            self.out_dir / "checkpoints", step, model, optimizer, is_main=main, extra={"ema": ema},
            full_weights=lambda: (full_tensors(model.state_dict(), main), full_tensors(ema_state(model, ema), main)),
            record=self.record, keep=self.cfg.train.keep_checkpoints,
            train_state={"seed": self.cfg.train.seed, "num_processes": acc.num_processes, "sharding": "fsdp",
                         "param_groups": len(optimizer.param_groups)})

    def _ema_model(self, ema: dict) -> nn.Module | None:
        """A whole EMA model on the main process (None elsewhere) for the sample grids; every process
        takes part in gathering it."""
        if self.cfg.train.num_samples <= 0:
            return None
        full = full_tensors(ema_state(self.model, ema), keep=self.accelerator.is_main_process)
        if not self.accelerator.is_main_process:
            return None
        plain = build_model(self.model_config)
        plain.load_state_dict(full)
        return plain.to(self.accelerator.device).eval()

    def _save_samples(self, ema, step: int) -> None:
        if not self.accelerator.is_main_process or self.cfg.train.num_samples <= 0:
            return
        images = generate(ema, self.record, num=self.cfg.train.num_samples, seed=self.cfg.train.seed, progress=False)
        save_grid(images, self.out_dir / "samples" / f"step_{step:07d}.png")


def train(cfg: TrainConfig, resume: str | bool | None = None, progress: bool = True, overwrite: bool = False) -> Path:
    """Train as configured; returns the final checkpoint folder. `overwrite` replaces a previous run
    in train.out_dir (without it, or `resume`, such a folder is refused)."""
    return Trainer(cfg, progress=progress).train(resume, overwrite=overwrite)
