"""The run record: what a checkpoint says about itself, typed.

Every ditkit checkpoint carries, in its safetensors metadata under "ditkit", the JSON of a
`RunRecord`:

    model      the backbone config (rebuilds the model), or the diffusers class and folder of a
               distilled diffusers student
    diffusion  the objective it was trained with and its sampling defaults (sampler, steps, guidance)
    data       the training resolution, the data source, the VAE folder of latent runs, class names
    distill    for students: the teacher and the CLEAR settings they were distilled with
    origin     for converted published weights: the source format and file
    format     the record layout's version (FORMAT)

The record owns the defaults: `record.sampling(...)` fills every sampling setting a caller leaves
unset (size, steps, sampler, guidance) from the run, so the CLI, the quickstart and the metrics
never work them out again.

Upgrade: records written before `format` existed (ditkit 0.1) have the same layout with fewer
diffusion keys; they load with the missing keys at their defaults (learn_sigma true, uniform
timesteps, the objective's own sampler, and the timestep spacing they were sampled with: "trailing"
for ditkit's DDPM runs, the carried diffusers scheduler config's own). A record of a newer format,
or one with keys this ditkit does not know, is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import check_fields, one_of
from .errors import DitkitError
from .models.registry import config_from_dict, config_to_dict

FORMAT = 1
OBJECTIVES = ("flow", "ddpm")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
POSITION_SCALINGS = ("none", "ntk", "interpolate")
# The samplers of each objective, the first its default (diffusion/sampling.py builds them).
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler",)}
# How a DDPM sampler spaces its steps over the 1000 training steps: "official" is DiT / ADM's
# `space_timesteps` respacing with the official posterior (ddpm sampler only; diffusion/respacing.py);
# the others are diffusers' spacings ("trailing" starts at the last step, ditkit's own default).
OFFICIAL_SPACING = "official"
TIMESTEP_SPACINGS = (OFFICIAL_SPACING, "trailing", "leading", "linspace")
DEFAULT_SPACING = "trailing"


@dataclass
class DiffusionSettings:
    """The objective a model is trained with and how it samples by default (the `diffusion:` section
    of a training config, stored as is in the record)."""

    objective: str = "flow"  # flow (rectified flow, FLUX/SD3) or ddpm (DiT)
    learn_sigma: bool = True  # ddpm only: learn the variance (IDDPM hybrid loss), as DiT
    timestep_sampling: str = "uniform"  # flow only: uniform or logit_normal
    sampler: str | None = None  # default: ddpm for ddpm, euler for flow
    sample_steps: int = 50
    cfg_scale: float = 1.5
    guidance_channels: int | None = None  # guide only the first N output channels (official DiT: 3); null: all
    # A diffusers scheduler config (with its "_class_name", e.g. a DiTPipeline's scheduler/): when
    # set, sampling builds it with `from_config` unless a sampler is named explicitly.
    scheduler: dict | None = None
    # Denoise as diffusers' DiTPipeline does: the scheduler steps on the epsilon channels only (its
    # own variance, not a learned one), on the batch doubled for guidance (a stochastic scheduler
    # draws the same noise), and guidance applies only when cfg_scale > 1.
    step_like_dit_pipeline: bool = False
    # ddpm only (see TIMESTEP_SPACINGS). Unset: "trailing", or the carried scheduler config's own.
    timestep_spacing: str | None = one_of(None, TIMESTEP_SPACINGS)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise DitkitError(f"unknown objective {self.objective!r}: use {' or '.join(OBJECTIVES)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise DitkitError(f"unknown timestep_sampling {self.timestep_sampling!r}: "
                              f"use {' or '.join(TIMESTEP_SAMPLINGS)}")
        check_sampling_numbers(self.sample_steps, self.cfg_scale, "diffusion.sample_steps", "diffusion.cfg_scale")
        check_sampler(self.objective, self.sampler, "diffusion.sampler")
        if self.guidance_channels is not None and self.guidance_channels < 1:
            raise DitkitError(f"diffusion.guidance_channels must be at least 1 or null (all), "
                              f"got {self.guidance_channels}")
        named = isinstance(self.scheduler, dict) and isinstance(self.scheduler.get("_class_name"), str)
        if self.scheduler is not None and not named:
            raise DitkitError("diffusion.scheduler must be a diffusers scheduler config with its _class_name "
                              "(e.g. a pipeline's scheduler/scheduler_config.json), or null")
        check_fields(self, "diffusion.")  # the choices declared on the fields (timestep_spacing)
        if self.timestep_spacing is None and self.objective == "ddpm":
            self.timestep_spacing = (self.scheduler or {}).get("timestep_spacing") or DEFAULT_SPACING
        check_spacing(self.objective, self.sampler, self.timestep_spacing, "diffusion.timestep_spacing",
                      "diffusion.sampler")


def check_sampling_numbers(steps: int, cfg_scale: float, steps_name: str = "steps", cfg_name: str = "cfg") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DitkitError(f"{steps_name} must be a whole number of at least 1, got {steps!r}")
    # Guidance is uncond + cfg * (cond - uncond), as DiT's: 0 samples the unconditional model, 1 the
    # conditional one (no guidance), above 1 guides. A negative scale steers away from the class asked for.
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise DitkitError(f"{cfg_name} must be a finite number at least 0 (0 = unconditional, 1 = no guidance, "
                          f"above 1 = guided), got {cfg_scale!r}")


def check_sampler(objective: str, sampler: str | None, name: str = "sampler") -> None:
    """A sampler that does not fit the objective fails here, not at the first sample of a run."""
    if sampler is None:
        return
    if sampler not in SAMPLERS[objective]:
        raise DitkitError(f"{name} {sampler!r} does not fit the {objective} objective: "
                          f"use {' or '.join(SAMPLERS[objective])}")


def check_spacing(objective: str, sampler: str | None, spacing: str | None, name: str = "timestep spacing",
                  sampler_name: str = "sampler") -> None:
    """A spacing that is unknown or does not fit the objective / sampler fails in one line."""
    if spacing is None:
        return
    if spacing not in TIMESTEP_SPACINGS:
        raise DitkitError(f"{name} must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    if objective != "ddpm":
        raise DitkitError(f"{name} {spacing!r} applies to the ddpm objective only: the {objective} sampler "
                          "has one spacing; leave it unset")
    if spacing == OFFICIAL_SPACING and sampler not in (None, "ddpm"):
        raise DitkitError(f"{name} official is DiT's DDPM sampler, not {sampler}: use {sampler_name} ddpm, "
                          f"or another spacing ({', '.join(TIMESTEP_SPACINGS[1:])})")


@dataclass
class DataSettings:
    """What the model was trained on."""

    resolution: int  # pixels, square
    source: str | None = None  # digits, photos, an image folder; None for diffusers students
    vae: str | None = None  # the diffusers AutoencoderKL folder of a latent-space run
    class_names: list[str] = field(default_factory=list)
    prompt_embeds: str | None = None  # diffusers students: the prompt embeddings they were distilled on

    def __post_init__(self):
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise DitkitError(f"data.resolution must be a positive whole number of pixels, got {self.resolution!r}")
        self.class_names = [str(name) for name in self.class_names]


@dataclass(frozen=True)
class DiffusersModel:
    """The model of a distilled diffusers student: its transformer class and the teacher's folder."""

    diffusers: str
    path: str


@dataclass(frozen=True, eq=False)  # eq=False: labels is a tensor
class Sampling:
    """How to sample. Every field left None is taken from the run record by `RunRecord.sampling`."""

    num: int = 16
    height: int | None = None  # pixels; default: the training resolution
    width: int | None = None
    steps: int | None = None  # default: diffusion.sample_steps
    cfg_scale: float | None = None  # default: diffusion.cfg_scale (1 = no guidance)
    sampler: str | None = None  # default: diffusion.sampler, else the objective's own
    seed: int = 0
    labels: Tensor | None = None  # class labels; default: 0, 1, 2, ... cycled
    attention_scale: bool = False  # proportional attention scale beyond the training size
    positions: str = "none"  # position scaling beyond the training size: none, ntk, interpolate
    timestep_spacing: str | None = None  # default: diffusion.timestep_spacing

    def __post_init__(self):
        if isinstance(self.num, bool) or not isinstance(self.num, int) or self.num < 1:
            raise DitkitError(f"the number of images must be at least 1, got {self.num!r}")
        for side in (self.height, self.width):
            if side is not None and side < 1:
                raise DitkitError(f"the image size must be positive, got {self.height}x{self.width}")
        if self.steps is not None or self.cfg_scale is not None:
            check_sampling_numbers(1 if self.steps is None else self.steps,
                                   1.0 if self.cfg_scale is None else self.cfg_scale)
        if self.positions not in POSITION_SCALINGS:
            raise DitkitError(f"unknown position scaling {self.positions!r}: choose one of "
                              f"{', '.join(POSITION_SCALINGS)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise DitkitError(f"unknown timestep spacing {self.timestep_spacing!r}: choose one of "
                              f"{', '.join(TIMESTEP_SPACINGS)}")


@dataclass
class RunRecord:
    """A checkpoint's record; see the module docstring."""

    model: Any  # a backbone config dataclass (models.registry), or DiffusersModel
    diffusion: DiffusionSettings
    data: DataSettings
    distill: dict | None = None
    origin: dict | None = None  # converted weights: the source format and file (convert.pretrained)

    # -- reading and writing -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Any, source: str = "the record") -> RunRecord:
        """Validate a record read from JSON; `source` names it in errors (e.g. the file)."""
        if not isinstance(values, dict):
            raise DitkitError(f"{source} is not a ditkit run record (a JSON object is expected): "
                              "use a checkpoint written by ditkit")
        values = dict(values)
        version = values.pop("format", None)  # None: written before the format was numbered (0.1)
        if version is not None and version != FORMAT:
            raise DitkitError(f"{source} has run-record format {version!r}, this ditkit reads format {FORMAT}: "
                              "use the ditkit version that wrote it, or upgrade ditkit")
        missing = [name for name in ("model", "diffusion", "data") if not isinstance(values.get(name), dict)]
        if missing:
            raise DitkitError(f"{source} is not a ditkit run record (no {', '.join(missing)} section): "
                              "use a checkpoint written by ditkit")
        unknown = sorted(set(values) - {"model", "diffusion", "data", "distill", "origin"})
        if unknown:
            raise DitkitError(f"{source} has unknown record keys {', '.join(unknown)}: "
                              "it was written by a newer ditkit or another tool")
        return cls(model=_model_from_dict(values["model"], source),
                   diffusion=_section(DiffusionSettings, values["diffusion"], "diffusion", source),
                   data=_section(DataSettings, values["data"], "data", source),
                   distill=values.get("distill"), origin=values.get("origin"))

    @classmethod
    def from_json(cls, text: str, source: str = "the record") -> RunRecord:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise DitkitError(f"{source} holds a run record that is not valid JSON ({error}): "
                              "use another checkpoint of the run") from error
        return cls.from_dict(values, source)

    def to_dict(self) -> dict[str, Any]:
        values = {"format": FORMAT, "model": self.model_dict(), "diffusion": dataclasses.asdict(self.diffusion),
                  "data": dataclasses.asdict(self.data)}
        for name in ("distill", "origin"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return json.loads(json.dumps(values))  # tuples become lists, as they come back from a file

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def model_dict(self) -> dict[str, Any]:
        """The model section as stored: equal dicts mean the same architecture."""
        if isinstance(self.model, DiffusersModel):
            return dataclasses.asdict(self.model)
        return config_to_dict(self.model)

    def with_model(self, config) -> RunRecord:
        """The same run with another model config (e.g. the mixer swapped at load time)."""
        return dataclasses.replace(self, model=config)

    # -- what callers ask of a run ---------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.data.resolution

    @property
    def vae(self) -> str | None:
        return self.data.vae

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", 0)

    def sampling(self, sampling: Sampling | None = None, **changes) -> Sampling:
        """`sampling` (with `changes`) with every unset field filled from this run's defaults."""
        sampling = dataclasses.replace(sampling or Sampling(), **changes)
        d = self.diffusion
        check_sampler(d.objective, sampling.sampler)
        filled = dataclasses.replace(
            sampling,
            height=sampling.height or self.resolution, width=sampling.width or self.resolution,
            steps=sampling.steps or d.sample_steps,
            cfg_scale=d.cfg_scale if sampling.cfg_scale is None else sampling.cfg_scale,
            sampler=sampling.sampler or d.sampler, timestep_spacing=sampling.timestep_spacing or d.timestep_spacing)
        check_spacing(d.objective, filled.sampler, filled.timestep_spacing)
        return filled

    def class_labels(self, text: str | None, num: int) -> Tensor | None:
        """Parse "3,7" or "cat,dog" (indices or this run's class names), cycled to `num` labels."""
        if text is None:
            return None
        labels = []
        for item in (part.strip() for part in text.split(",")):
            if item in self.data.class_names:
                labels.append(self.data.class_names.index(item))
            elif item.lstrip("-").isdigit():
                labels.append(int(item))
            else:
                names = ", ".join(self.data.class_names) or "none"
                raise DitkitError(f"class {item!r} is neither an index nor a class name ({names})")
        return torch.tensor([labels[i % len(labels)] for i in range(num)])


def _section(cls, values: dict, name: str, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DitkitError(f"{source} has unknown {name} keys {', '.join(unknown)}: "
                          "it was written by a newer ditkit or another tool")
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise DitkitError(f"{source} is an incomplete run record ({name}: {error}): "
                          "use a checkpoint written by ditkit") from error


def _model_from_dict(values: dict, source: str):
    if "diffusers" in values:
        return _section(DiffusersModel, values, "model", source)
    return config_from_dict(values)
