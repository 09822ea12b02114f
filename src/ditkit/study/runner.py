"""`ditkit study`: every arm x seed trained (or distilled) and measured at its evaluation points, one
resumable stage each (`stages.StageRunner`), then the report. The out folder holds:

    study.json                                the settings it was made with (another config is refused)
    arms/ARM/seed-S/run/                      the arm's training or distillation run (checkpoints, metrics)
    arms/ARM/seed-S/eval/step_NNNNNNN.json    its measurements at one evaluation point
    report/                                   report.md, measurements.csv and the plots (`report.py`)

A stage trains to each evaluation point in turn and measures there; an interrupted one resumes at the
first point without its measurements, its training from the last checkpoint (exact resume, so the
segments add up to one straight run). A finished stage is not run again.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import find_checkpoint, load_checkpoint
from ..diffusion.pipeline import input_size
from ..distill import DistillConfig
from ..errors import DitkitError
from ..files import atomic_write_text, read_json
from ..metrics.bench import measure_point
from ..metrics.features import build_features
from ..metrics.quality import load_reference
from ..metrics.score import score_checkpoint
from ..record import Sampling
from ..train.config import config_from_dict
from ..train.runfolder import own_run_folder
from .config import StudyConfig
from .plan import ArmPlan, forward_gflops, plan_study
from .report import write_report
from .stages import Stage, StageRunner, distill_stage, format_seconds, train_stage

# What a study writes in its out folder (the outputs --overwrite removes).
STUDY_OUTPUTS = ("study.json", "arms", "report", ".stages")


def stage_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


class Study:
    """The stages' bodies and the paths and measuring tools they share."""

    def __init__(self, config: StudyConfig, plans: dict[str, ArmPlan], out_dir: str | Path, device: str = "cpu",
                 features_path: str | Path | None = None, progress: bool = True, log=print):
        self.config, self.plans = config, plans
        self.runner = StageRunner(out_dir, "study", log=log)
        self.out = self.runner.out
        self.device, self.features_path, self.progress, self.log = device, features_path, progress, log
        self._references: dict[tuple[str, int], torch.Tensor] = {}
        self._extractor = None

    # -- the folder ----------------------------------------------------------------------------
    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.out / "arms" / arm / f"seed-{seed}"

    def eval_path(self, arm: str, seed: int, step: int) -> Path:
        return self.arm_dir(arm, seed) / "eval" / f"step_{step:07d}.json"

    def settings(self) -> dict:
        """The study's sections and each arm's resolved plan, as JSON would give them back."""
        values = {key: value for key, value in asdict(self.config).items() if key != "arms"}
        for name, plan in self.plans.items():
            values[f"arms.{name}"] = {**asdict(self.config.arms[name]), "resolved": plan.settings()}
        return json.loads(json.dumps(values, default=str))

    def stages(self) -> tuple[Stage, ...]:
        stages = []
        for name, plan in self.plans.items():
            teacher = self.plans.get(plan.teacher)
            needs = (stage_name(teacher.name, teacher.seeds[0]),) if teacher else ()
            for seed in plan.seeds:
                title = f"{plan.kind} {name}, seed {seed}: {plan.steps} steps, {plan.train_gflops:,.0f} GFLOPs"
                stages.append(Stage(stage_name(name, seed), title, partial(Study.run_arm, arm=name, seed=seed),
                                    needs=needs, outputs=(str(self.arm_dir(name, seed).relative_to(self.out)),)))
        stages.append(Stage("report", "writing the report", Study.write_report,
                            needs=tuple(stage.name for stage in stages), outputs=("report",)))
        return tuple(stages)

    # -- one arm and seed ----------------------------------------------------------------------
    def run_arm(self, arm: str, seed: int) -> None:
        plan = self.plans[arm]
        for fraction, step in plan.points:
            path = self.eval_path(arm, seed, step)
            if path.is_file():  # measured before an interruption
                continue
            if plan.kind == "train":
                checkpoint, agreement = self.train_to(plan, seed, step), {}
            else:
                checkpoint, agreement = self.distill_to(plan, seed, step)
            rows = self.measure(plan, seed, fraction, step, checkpoint, agreement)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"rows": rows}, indent=2) + "\n")

    def train_to(self, plan: ArmPlan, seed: int, step: int) -> Path:
        """Train the arm's run up to `step` (from its last checkpoint); returns that step's checkpoint."""
        cfg = copy.deepcopy(plan.train_config)
        cfg.train.out_dir, cfg.train.steps, cfg.train.seed = str(self.arm_dir(plan.name, seed) / "run"), step, seed
        return train_stage(cfg, progress=self.progress)

    def teacher_checkpoint(self, plan: ArmPlan) -> tuple[Path, str]:
        """(the teacher's checkpoint, the name the distillation records for it). A teacher arm's is named
        relative to the out folder: the same teacher must stay the same when the folder moves."""
        if plan.teacher in self.plans:
            checkpoint = find_checkpoint(self.arm_dir(plan.teacher, self.plans[plan.teacher].seeds[0]) / "run")
            return checkpoint, str(checkpoint.relative_to(self.out))
        checkpoint = find_checkpoint(plan.teacher)
        return checkpoint, str(checkpoint.resolve())

    def distill_to(self, plan: ArmPlan, seed: int, step: int) -> tuple[Path, dict]:
        """Distil the arm's student up to `step`; returns (its checkpoints folder, its agreement with the
        teacher per resolution)."""
        checkpoint, recorded = self.teacher_checkpoint(plan)
        run_dir = self.arm_dir(plan.name, seed) / "run"
        cfg = config_from_dict({**plan.distill_values, "teacher": recorded, "out_dir": str(run_dir), "steps": step,
                                "seed": seed}, DistillConfig)
        agreement = distill_stage(checkpoint, recorded, cfg, device=self.device, progress=self.progress)
        return run_dir / "checkpoints", agreement["student"]

    # -- measuring -----------------------------------------------------------------------------
    def extractor(self):
        if self._extractor is None:
            self._extractor = build_features(self.config.eval.features, features_path=self.features_path,
                                             progress=self.progress)
        return self._extractor

    def reference(self, record, size: int) -> torch.Tensor:
        source = self.config.eval.reference or record.data.source
        if source is None:
            raise DitkitError("the arm's data has no source to compare with: set eval.reference (digits, photos or "
                              "an image folder)")
        if (source, size) not in self._references:
            e = self.config.eval
            self._references[source, size] = load_reference(source, e.num_reference, resolution=size, seed=e.seed)
        return self._references[source, size]

    def measure(self, plan: ArmPlan, seed: int, fraction: float, step: int, checkpoint: Path,
                agreement: dict) -> list[dict]:
        """One row per eval scale: FID/KID, legibility, agreement with the teacher (distillations),
        the sampling cost (counted GFLOPs per image, measured time and peak memory of one forward)."""
        model, record = load_checkpoint(checkpoint, device=self.device)
        base = {"arm": plan.name, "label": plan.label, "kind": plan.kind, "seed": seed, "fraction": fraction,
                "step": step, "train_gflops": step * plan.step_gflops}
        return [{**base, **self.measure_scale(model, record, checkpoint, scale * plan.resolution, agreement)}
                for scale in self.config.eval.scales]

    def measure_scale(self, model, record, checkpoint: Path, size: int, agreement: dict) -> dict:
        e = self.config.eval
        asked = Sampling(num=e.num, height=size, width=size, steps=e.sample_steps, seed=e.seed)
        scores = score_checkpoint(checkpoint, asked, self.reference(record, size), e.features,
                                  extractor=self.extractor(), features_path=self.features_path,
                                  batch_size=e.batch_size, device=self.device, seed=e.seed, progress=False)
        sampling = record.sampling(asked)
        height, width = input_size(model, size, size)
        forward = forward_gflops(record.model, height, width)
        guided = 2 if sampling.cfg_scale > 1 and record.num_classes > 0 else 1  # guidance doubles the batch
        timing = measure_point(model, record.model, height, width, torch.device(self.device), e.bench_repeats,
                               memory=True)
        paired = agreement.get(str(size), {})
        return {"resolution": size, "fid": scores.quality["fid"], "kid": scores.quality["kid_mean"],
                "legibility": scores.legibility, "psnr": paired.get("psnr"), "ssim": paired.get("ssim"),
                "forward_gflops": forward, "sampling_gflops": forward * sampling.steps * guided,
                "step_ms": timing["step_ms"], "peak_mib": timing["peak_mib"]}

    def rows(self) -> list[dict]:
        """Every measurement the stages wrote, in arm, seed and step order."""
        rows = []
        for name, plan in self.plans.items():
            for seed in plan.seeds:
                for _, step in plan.points:
                    rows += read_json(self.eval_path(name, seed, step), "measurements file")["rows"]
        return rows

    # -- the report ----------------------------------------------------------------------------
    def write_report(self) -> None:
        write_report(self.out / "report", self.config, self.plans, self.rows())


def run_study(config: StudyConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
              device: str = "cpu", features_path: str | Path | None = None, progress: bool = True,
              log=print) -> Path:
    """Run (or, with `resume`, continue) the study in `out_dir`; returns the path of its report.md. Every
    arm is planned first, so a bad arm fails before any work; the folder is locked meanwhile, and one
    holding a study made with another config is refused."""
    plans = plan_study(config)
    study = Study(config, plans, out_dir, device=device, features_path=features_path, progress=progress, log=log)
    with own_run_folder(study.out, STUDY_OUTPUTS, resume=resume, overwrite=overwrite, command="ditkit study",
                        checkpointed=False):
        study.runner.check_settings(study.settings())
        log(f"ditkit study {config.title!r} in {study.out}: {len(plans)} arms (device {device})")
        for plan in plans.values():
            log(f"  {plan.name:16s} {plan.kind:7s} {plan.forward_gflops:8.3f} GFLOPs/image forward, "
                f"{plan.step_gflops:9.2f} GFLOPs/step x {plan.steps} steps = {plan.train_gflops:,.0f} GFLOPs, "
                f"seeds {plan.seeds}")
        seconds = study.runner.run(study.stages(), study)
    log(f"study finished in {format_seconds(seconds)}: {study.out / 'report' / 'report.md'}")
    return study.out / "report" / "report.md"
