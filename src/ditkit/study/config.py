"""The typed config of a study (`ditkit study CONFIG.yaml key=value ...`), loaded like training configs:

    title: backbones at matched compute
    seeds: [0, 1]
    budget: {gflops: 20000}          # per arm and seed; or {steps: 500}
    train_overrides: [train.batch_size=32]   # for every training arm, before the arm's own overrides
    distill: {batch_size: 32}        # DistillConfig fields for every distillation arm, before the arm's own
    eval: {at: [0.5, 1.0], features: ditkit-digits, num: 256, scales: [1]}
    arms:
      dit:  {train: digits, overrides: [model.name=DiT-Nano/4]}
      udit: {train: digits, overrides: [model.name=U-DiT-Nano]}
      r2:   {teacher: dit, distill: {radius: 2}, budget: {steps: 200}, seeds: [0]}

An arm is a training setup (`train`: a config name or path, plus key=value `overrides`) or a CLEAR
distillation (`teacher`: another arm, whose first seed's final checkpoint teaches, or a checkpoint
path; `distill`: DistillConfig fields). An arm set to null is left out (`arms.udit=null`). Unknown keys
are errors that list the valid ones, as in every ditkit config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..config import SEED, config_from_dict, ranged
from ..errors import DitkitError
from ..record import POSITION_SCALINGS

SEEDS_RULE = f"seeds (whole numbers {SEED})"  # what torch.manual_seed takes
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # arm names become folder names
# DistillConfig keys the study sets itself (the teacher, the folder, the budget, the seeds).
STUDY_SET_DISTILL_KEYS = {"teacher": "the arm's teacher", "out_dir": "the study's --out", "steps": "the arm's budget",
                          "seed": "the study's seeds"}


def check_numbers(values: list, name: str, kind: type, accepts, rule: str) -> None:
    """Every item of the list `values` (config key `name`) is a `kind` that `accepts` allows (`rule`
    says what that is), and none repeats; a one-line error otherwise."""
    if not values:
        raise DitkitError(f"config key {name} must list at least one value")
    for value in values:
        number = isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or
                                                                                      isinstance(value, int))
        if not number or not math.isfinite(value) or not accepts(value):
            raise DitkitError(f"config key {name} must list {rule}, got {value!r}")
    if len(set(values)) < len(values):
        raise DitkitError(f"config key {name} lists a value twice: {values}")


@dataclass
class BudgetSection:
    """What each arm trains, per seed: training compute (`gflops`, counted by ditkit) or `steps`."""

    gflops: float | None = None  # steps = gflops / the arm's counted GFLOPs per training step
    steps: int | None = None

    def check(self, where: str) -> None:
        if (self.gflops is None) == (self.steps is None):
            raise DitkitError(f"{where} must set one of gflops (training compute) or steps, got "
                              f"gflops={self.gflops}, steps={self.steps}")
        if self.gflops is not None and not (math.isfinite(self.gflops) and self.gflops > 0):
            raise DitkitError(f"{where}.gflops must be a positive number, got {self.gflops!r}")
        if self.steps is not None and self.steps < 1:
            raise DitkitError(f"{where}.steps must be at least 1, got {self.steps}")


@dataclass
class EvalSection:
    """When and how every arm is measured: at fractions `at` of its budget, `num` samples (the same
    seed, hence the same noise and labels, for every arm) at each multiple `scales` of its training size."""

    # fractions of the budget, in [0, 1]; 0 = before training: a distillation's student as swapped in (the
    # teacher with CLEAR attention, nothing trained); a training arm skips it (its untrained network draws noise)
    at: list = field(default_factory=lambda: [1.0])
    features: str = "ditkit-digits"  # FID/KID features: ditkit-digits (offline) or inception
    num: int = 256  # samples per arm, seed, point and scale
    reference: str | None = None  # reference images (digits, photos, a folder); default: the arm's data
    num_reference: int = 1000
    scales: list = field(default_factory=lambda: [1])  # multiples of the training resolution
    sample_steps: int | None = None  # default: each arm's diffusion.sample_steps
    batch_size: int = 64
    bench_repeats: int = 3  # timed forwards per point (sampling step time), after a warm-up
    seed: int = ranged(0, SEED)  # sampling seed
    # scales above 1 through CLEAR's upscale chain: a 1x base, upsampled, noised to this strength and
    # denoised at the full size by the same model (default: sampled directly at the full size)
    chain_strength: float | None = None
    positions: str = "none"  # position scaling at scales above 1: none, ntk, interpolate (the digits chain's)

    def __post_init__(self):
        check_numbers(self.at, "eval.at", float, lambda f: 0 <= f <= 1, "fractions in [0, 1]")
        self.at = sorted(float(f) for f in self.at)
        check_numbers(self.scales, "eval.scales", int, lambda s: s >= 1, "whole multiples of at least 1")
        for name in ("num", "num_reference"):
            if getattr(self, name) < 2:
                raise DitkitError(f"config key eval.{name} must be at least 2 (FID needs two images), got "
                                  f"{getattr(self, name)}")
        for name in ("batch_size", "bench_repeats", "sample_steps"):
            if (getattr(self, name) or 1) < 1:
                raise DitkitError(f"config key eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.positions not in POSITION_SCALINGS:
            raise DitkitError(f"config key eval.positions must be one of {', '.join(POSITION_SCALINGS)}, got "
                              f"{self.positions!r}")
        strength = self.chain_strength
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int | float)
                                     or not 0 < strength <= 1):
            raise DitkitError(f"config key eval.chain_strength must be a noise level in (0, 1], got {strength!r}")


@dataclass
class ArmConfig:
    """One arm: a training setup or a distillation (see the module docstring)."""

    train: str | None = None  # a training config: a built-in name (digits) or a YAML path
    overrides: list = field(default_factory=list)  # its key=value overrides, e.g. model.name=U-DiT-Nano
    teacher: str | None = None  # a distillation's teacher: an arm name or a checkpoint path
    distill: dict = field(default_factory=dict)  # DistillConfig fields of the distillation
    seeds: list | None = None  # default: the study's
    budget: dict | None = None  # default: the study's
    label: str | None = None  # the arm in the report (default: its name)

    @property
    def kind(self) -> str:
        return "distill" if self.teacher is not None else "train"

    def check(self, name: str) -> None:
        if not ARM_NAME.fullmatch(name):
            raise DitkitError(f"arm name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
        if (self.train is None) == (self.teacher is None):
            raise DitkitError(f"arm {name} must set one of train (a training config) or teacher (a distillation)")
        if self.train is not None and self.distill:
            raise DitkitError(f"arm {name} sets distill but no teacher: add teacher (an arm or a checkpoint)")
        if self.teacher is not None and self.overrides:
            raise DitkitError(f"arm {name} is a distillation: give its settings under distill, not overrides")
        for key in sorted(set(self.distill) & set(STUDY_SET_DISTILL_KEYS)):
            raise DitkitError(f"arms.{name}.distill.{key} is set by the study ({STUDY_SET_DISTILL_KEYS[key]}): "
                              "remove it")
        if self.seeds is not None:
            check_numbers(self.seeds, f"arms.{name}.seeds", int, SEED.accepts, SEEDS_RULE)
        if any(not isinstance(item, str) for item in self.overrides):
            raise DitkitError(f"config key arms.{name}.overrides must list key=value strings, got {self.overrides}")

    def budget_section(self, default: BudgetSection, name: str) -> BudgetSection:
        if self.budget is None:
            return default
        budget = config_from_dict(self.budget, BudgetSection, f"arms.{name}.budget.")
        budget.check(f"arms.{name}.budget")
        return budget


@dataclass
class StudyConfig:
    title: str = "ditkit study"
    seeds: list = field(default_factory=lambda: [0])
    budget: BudgetSection = field(default_factory=BudgetSection)
    train_overrides: list = field(default_factory=list)
    distill: dict = field(default_factory=dict)
    eval: EvalSection = field(default_factory=EvalSection)
    arms: dict = field(default_factory=dict)

    def __post_init__(self):
        check_numbers(self.seeds, "seeds", int, SEED.accepts, SEEDS_RULE)
        self.budget.check("budget")
        arms = {name: values for name, values in self.arms.items() if values is not None}  # null: left out
        if not arms:
            raise DitkitError("the study has no arms: add some under arms (each a train or a teacher setup)")
        self.arms = {str(name): arm if isinstance(arm, ArmConfig) else config_from_dict(arm, ArmConfig, f"arms.{name}.")
                     for name, arm in arms.items()}
        for name, arm in self.arms.items():
            arm.check(name)
            self._check_teacher(name, arm)

    def _check_teacher(self, name: str, arm: ArmConfig) -> None:
        teacher = self.arms.get(arm.teacher)
        if teacher is not None and teacher.kind != "train":
            raise DitkitError(f"arm {name}'s teacher {arm.teacher} is itself a distillation: teach with a "
                              "training arm or a checkpoint")

    def seeds_of(self, name: str) -> list[int]:
        return self.arms[name].seeds or self.seeds
