"""The typed training config: dataclasses loaded from YAML (`ditkit.config`), with `key=value` overrides.

    model:     {name: DiT-S/2, mixer: "clear:radius=8", args: {depth: 6}}
    data:      {source: digits, resolution: 32, hflip: false, vae: null}
    diffusion: {objective: flow, ...}
    train:     {out_dir: runs/x, steps: 1000, batch_size: 64, lr: 1e-4, ...}

Unknown keys are errors that list the valid ones, so a typo never silently does nothing; every
number is checked against the range declared on its field when the config loads, so a value that
would crash or silently do nothing later (train.grad_accum=0, train.lr=nan) fails before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as loader
from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, SEED, check_fields, one_of, ranged
from ..errors import DitkitError
from ..mixers import MixerSpec
from ..models import model_config
from ..record import DiffusionSettings

MIXED_PRECISIONS = ("no", "fp16", "bf16")
SHARDINGS = ("none", "fsdp")  # fsdp: distributed/sharding.py


@dataclass
class ModelSection:
    """The model: a named config, its mixer (the one place that sets it) and field overrides."""

    name: str = "DiT-Nano/4"  # a named config: `ditkit info --list` shows them
    # A MixerSpec: clear, or clear:radius=8,down_factor=4. Default: the backbone's own (full for DiT,
    # downsampled for U-DiT). Read as its name here and its options in mixer_options.
    mixer: str | None = None
    mixer_options: dict | None = None  # options merged into the spec's (they win)
    args: dict = field(default_factory=dict)  # overrides of the backbone's config fields, but for the mixer

    def __post_init__(self):
        for key in ("mixer", "mixer_options"):
            if key in self.args:
                raise DitkitError(f"config key model.args.{key} would set the mixer in a second place: set "
                                  f"model.{key} instead (e.g. model.mixer=clear:radius=8)")
        if self.mixer is not None:
            spec = self.mixer_spec()
            self.mixer = spec.name
            if spec.options or self.mixer_options is not None:
                self.mixer_options = dict(spec.options)
        model_config(self.name, **self.args)  # the name and every field's range, before any work

    def mixer_spec(self) -> MixerSpec | None:
        """The mixer that `mixer` and `mixer_options` name, validated (None: the backbone's own)."""
        if self.mixer is None:
            return None
        try:
            return MixerSpec.parse(self.mixer).merged(self.mixer_options)
        except DitkitError as error:
            raise DitkitError(f"config key model.mixer: {error}") from error


@dataclass
class DataSection:
    # digits, photos, a path (an image folder, a datasets folder, parquet files, WebDataset shards), or
    # latents:DIR (from ditkit prepare)
    source: str = "digits"
    resolution: int = ranged(32, AT_LEAST_1)  # pixels
    hflip: bool = False  # random horizontal flips (not for digits!)
    vae: str | None = None  # local diffusers AutoencoderKL folder: train in its latent space
    cache_dir: str | None = None  # latent cache, folder listings, shard indexes; default ~/.cache/ditkit
    image_column: str = "image"  # a datasets / parquet source's image column
    label_column: str = "label"  # its label column (the key of a WebDataset .json label)
    labels_file: str | None = None  # class names, line i naming label i, for a source without its own
    photos_length: int = ranged(2000, AT_LEAST_1)  # crops per epoch of the `photos` dataset
    num_workers: int = ranged(0, AT_LEAST_0)

    def __post_init__(self):
        check_fields(self, "data.")


DiffusionSection = DiffusionSettings  # stored as is in every checkpoint's run record


@dataclass
class TrainSection:
    out_dir: str = "runs/digits"
    steps: int = ranged(2000, AT_LEAST_1)
    batch_size: int = ranged(64, AT_LEAST_1)  # per process, per micro-batch
    grad_accum: int = ranged(1, AT_LEAST_1)
    lr: float = ranged(1e-4, POSITIVE)
    weight_decay: float = ranged(0.0, AT_LEAST_0)
    # SSM state dynamics (A, dt), no weight decay; null: lr and weight_decay as the rest
    ssm_lr: float | None = ranged(1e-3, POSITIVE)
    warmup_steps: int = ranged(0, AT_LEAST_0)
    grad_clip: float | None = ranged(1.0, AT_LEAST_0)
    ema_decay: float = ranged(0.9999, FRACTION)
    mixed_precision: str = one_of("no", MIXED_PRECISIONS)  # Accelerate's
    seed: int = ranged(0, SEED)
    log_every: int = ranged(25, AT_LEAST_1)
    sample_every: int = ranged(500, AT_LEAST_1)
    ckpt_every: int = ranged(500, AT_LEAST_1)
    keep_checkpoints: int = ranged(3, AT_LEAST_0)
    num_samples: int = ranged(16, AT_LEAST_0)  # images in each sample grid
    # none (one process, or DDP under torchrun) or fsdp (FSDP2 under torchrun)
    sharding: str = one_of("none", SHARDINGS)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)

    def __post_init__(self):
        check_fields(self, "train.")
        if self.sharding == "fsdp" and self.mixed_precision == "fp16":
            raise DitkitError("train.mixed_precision=fp16 needs a loss scaler that sharded training does not have: "
                              "use bf16 with train.sharding=fsdp")
        if not self.out_dir:
            raise DitkitError("config key train.out_dir must name a folder, got an empty string")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(values: dict[str, Any] | None, kind: type | None = None, prefix: str = ""):
    """A typed config of `kind` (default TrainConfig) from nested values (see `ditkit.config`)."""
    return loader.config_from_dict(values, kind or TrainConfig, prefix)


def load_config(path: str | Path | None, overrides: list[str] = (), kind: type | None = None,
                settings: dict[str, Any] | None = None):
    """A YAML file (or nothing), then `settings` ({dotted key: value}, e.g. from command-line flags), then
    `key=value` overrides -> a typed config of `kind` (default TrainConfig; see `ditkit.config`)."""
    return loader.load_config(path, overrides, kind=kind or TrainConfig, settings=settings)
