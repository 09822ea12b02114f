"""What each arm of a study will do, worked out before any training: its resolved config, its cost per
training step counted by ditkit's FLOP counter, and the steps its budget buys.

Training compute convention: one training step costs 3 forwards (the backward pass is counted as two
forwards, the usual convention) of every image in the batch:

    train step GFLOPs   = 3 x forward GFLOPs per image x batch size x gradient accumulation
    distill step GFLOPs = (teacher forward + 3 x student forward) per image x batch size

with forward FLOPs counted by `metrics.flops.config_cost` (a multiply-add = 2 FLOPs) at the training
resolution. A budget in GFLOPs then buys round(budget / step GFLOPs) steps, so arms of different cost
train on the same compute (to within half a step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..checkpoint import load_checkpoint
from ..config import resolve_config
from ..diffusion.pipeline import input_size
from ..distill import DistillConfig
from ..errors import DitkitError
from ..metrics.flops import config_cost
from ..models import build_model
from ..train import Trainer
from ..train.config import config_from_dict, load_config
from .config import ArmConfig, BudgetSection, StudyConfig

TRAIN_PASSES = 3  # forward + backward, in forwards


@dataclass
class ArmPlan:
    name: str
    kind: str  # "train" or "distill"
    label: str
    seeds: list[int]
    resolution: int  # training resolution, pixels
    batch_size: int  # images per step
    forward_gflops: float  # one image at the training resolution (the student's, for a distillation)
    step_gflops: float  # one training step (see the module docstring)
    steps: int
    points: list[tuple[float, int]]  # (fraction of the budget, step) of each evaluation
    budget: BudgetSection
    train_config: object = None  # a TrainConfig (training arms), without out_dir, steps and seed set
    model_config: object = None  # the trained model's config (training arms)
    distill_values: dict = field(default_factory=dict)  # DistillConfig fields (distillation arms)
    teacher: str | None = None  # an arm name or a checkpoint path
    student_mixer: object = None  # a distillation's student mixer (a MixerSpec of clear), swapped into its teacher

    @property
    def train_gflops(self) -> float:
        return self.steps * self.step_gflops

    def settings(self) -> dict:
        """What the run folder must have been made with to be resumed (see StageRunner.check_settings)."""
        resolved = self.train_config.to_dict() if self.train_config is not None else self.distill_values
        return {"kind": self.kind, "seeds": self.seeds, "steps": self.steps, "points": self.points,
                "teacher": self.teacher, "config": resolved}


def forward_gflops(model_config, height: int, width: int) -> float:
    return config_cost(model_config, height, width).flops / 1e9


def train_config(study: StudyConfig, arm: ArmConfig):
    """The arm's TrainConfig: its config file, the study's train_overrides, then the arm's own."""
    return load_config(resolve_config(arm.train), [*study.train_overrides, *arm.overrides])


def training_model(cfg):
    """(model config, model input height, width) exactly as `ditkit train` builds them for `cfg`."""
    trainer = Trainer(cfg, progress=False)
    side = cfg.data.resolution
    return trainer.model_config, *input_size(trainer.model, side, side)


def plan_train_arm(name: str, arm: ArmConfig, study: StudyConfig) -> ArmPlan:
    cfg = train_config(study, arm)
    model_config, height, width = training_model(cfg)
    forward = forward_gflops(model_config, height, width)
    images = cfg.train.batch_size * cfg.train.grad_accum
    return finish_plan(name, arm, study, kind="train", resolution=cfg.data.resolution, batch_size=images,
                       forward=forward, step=TRAIN_PASSES * forward * images, train_config=cfg,
                       model_config=model_config)


def teacher_model(teacher: str, plans: dict[str, ArmPlan]):
    """(model config, resolution) of a teacher arm (as it will be trained) or of a checkpoint."""
    if teacher in plans:
        return plans[teacher].model_config, plans[teacher].resolution

    _, record = load_checkpoint(teacher)
    return record.model, record.resolution


def plan_distill_arm(name: str, arm: ArmConfig, study: StudyConfig, plans: dict[str, ArmPlan]) -> ArmPlan:
    values = {**study.distill, **arm.distill}
    cfg = config_from_dict(values, DistillConfig, f"arms.{name}.distill.")  # checks every key and value
    teacher_config, teacher_resolution = teacher_model(arm.teacher, plans)
    resolution = cfg.resolution or teacher_resolution
    student_config = dataclasses.replace(teacher_config, mixer="clear", mixer_options={
        "radius": cfg.radius, "down_factor": cfg.down_factor, "backend": cfg.backend})
    with torch.device("meta"):
        height, width = input_size(build_model(student_config), resolution, resolution)
    student = forward_gflops(student_config, height, width)
    teacher = forward_gflops(teacher_config, height, width)
    return finish_plan(name, arm, study, kind="distill", resolution=resolution, batch_size=cfg.batch_size,
                       forward=student, step=(teacher + TRAIN_PASSES * student) * cfg.batch_size,
                       distill_values=values, teacher=arm.teacher, student_mixer=cfg.mixer_spec())


def budget_steps(name: str, budget: BudgetSection, step_gflops: float) -> int:
    if budget.steps is not None:
        return budget.steps
    if budget.gflops < step_gflops:
        raise DitkitError(f"arm {name}: budget.gflops={budget.gflops:g} buys no training step (one costs "
                          f"{step_gflops:.4g} GFLOPs): raise the budget to at least {step_gflops:.4g}")
    return round(budget.gflops / step_gflops)


def evaluation_points(name: str, kind: str, fractions: list[float], steps: int) -> list[tuple[float, int]]:
    """(fraction, step) of each evaluation. Fraction 0 is step 0, the untrained start: measured for a
    distillation (its student as swapped in), skipped for a training arm (noise, nothing to compare)."""
    if kind == "train":
        fractions = [fraction for fraction in fractions if fraction > 0]
        if not fractions:
            raise DitkitError(f"arm {name} trains from scratch: eval.at must list a fraction above 0 (a training "
                              "arm skips 0, its untrained network)")
    points = [(fraction, 0 if fraction == 0 else max(1, round(fraction * steps))) for fraction in fractions]
    if len({step for _, step in points}) < len(points):
        raise DitkitError(f"arm {name} trains {steps} step(s): too few to evaluate at {len(points)} points "
                          "(eval.at): raise the budget or give fewer points")
    return points


def finish_plan(name: str, arm: ArmConfig, study: StudyConfig, *, kind: str, resolution: int, batch_size: int,
                forward: float, step: float, **resolved) -> ArmPlan:
    budget = arm.budget_section(study.budget, name)
    steps = budget_steps(name, budget, step)
    return ArmPlan(name=name, kind=kind, label=arm.label or name, seeds=study.seeds_of(name), resolution=resolution,
                   batch_size=batch_size, forward_gflops=forward, step_gflops=step, steps=steps,
                   points=evaluation_points(name, kind, study.eval.at, steps), budget=budget, **resolved)


def plan_study(study: StudyConfig) -> dict[str, ArmPlan]:
    """Every arm's plan, training arms first (a distillation's teacher arm trains before it); a bad
    arm (unknown model or mixer, a budget too small for one step) fails here, naming the arm."""
    plans: dict[str, ArmPlan] = {}
    ordered = sorted(study.arms.items(), key=lambda item: item[1].kind != "train")
    for name, arm in ordered:
        try:
            plans[name] = (plan_train_arm(name, arm, study) if arm.kind == "train"
                           else plan_distill_arm(name, arm, study, plans))
        except DitkitError as error:
            message = str(error)
            raise DitkitError(message if message.startswith(f"arm {name}") else f"arm {name}: {message}") from error
    return plans
