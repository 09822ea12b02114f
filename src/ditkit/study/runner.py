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
import dataclasses
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import find_checkpoint, load_checkpoint
from ..diffusion.pipeline import UpscaleChain, check_labels, generate_upscaled, input_size
from ..distill import DistillConfig
from ..errors import DitkitError
from ..files import atomic_write_text, read_json
from ..metrics.bench import measure_point
from ..metrics.features import build_features
from ..metrics.quality import load_reference, sample_checkpoint
from ..metrics.score import score_images
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
        self._teacher_images: dict[tuple[str, int], torch.Tensor] = {}
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
        # Step 0 (a distillation's student as swapped in) comes last: its agreement with the teacher is
        # the one the distillation measures before it trains.
        for fraction, step in sorted(plan.points, key=lambda point: point[1] == 0):
            path = self.eval_path(arm, seed, step)
            if path.is_file():  # measured before an interruption
                continue
            mixer = None
            if step == 0:
                checkpoint, mixer = self.teacher_checkpoint(plan)[0], plan.student_mixer
                agreement = self.untuned(plan, seed)
            elif plan.kind == "train":
                checkpoint, agreement = self.train_to(plan, seed, step), {}
            else:
                checkpoint, agreement = self.distill_to(plan, seed, step)
            rows = self.measure(plan, seed, fraction, step, checkpoint, agreement, mixer)
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

    def untuned(self, plan: ArmPlan, seed: int) -> dict:
        """The agreement of the swapped-in, untrained student with its teacher, as the distillation measured
        it before training; {} where it has not run (the study then pairs the samples itself)."""
        path = self.arm_dir(plan.name, seed) / "run" / "agreement.json"
        return read_json(path, "agreement report").get("untuned", {}) if path.is_file() else {}

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
                agreement: dict, mixer=None) -> list[dict]:
        """One row per eval scale: FID/KID, legibility, agreement with the teacher (distillations),
        the sampling cost (counted GFLOPs per image, measured time and peak memory of one forward).
        `mixer`: swapped in at load (the untrained student is its teacher's checkpoint with CLEAR)."""
        model, record = load_checkpoint(checkpoint, mixer=mixer, device=self.device)
        base = {"arm": plan.name, "label": plan.label, "kind": plan.kind, "seed": seed, "fraction": fraction,
                "step": step, "train_gflops": step * plan.step_gflops}
        return [{**base, **self.measure_scale(plan, (checkpoint, mixer), model, record, scale * plan.resolution,
                                              agreement)} for scale in self.config.eval.scales]

    def chained(self, plan: ArmPlan, size: int) -> bool:
        """Whether `size` is sampled through the upscale chain (from the arm's training size)."""
        return self.config.eval.chain_strength is not None and size > plan.resolution

    def sample(self, plan: ArmPlan, loaded: tuple, model, record, asked: Sampling) -> torch.Tensor:
        """`asked.num` images in batches, classes cycled 0, 1, 2, ... over all of them: directly from the
        checkpoint `loaded` = (path, mixer swapped in), or through the chain with `model` (drawn as
        `sample_checkpoint` draws them, so legibility reads them alike)."""
        e = self.config.eval
        if not self.chained(plan, asked.height):
            checkpoint, mixer = loaded
            return sample_checkpoint(checkpoint, asked, batch_size=e.batch_size, mixer=mixer, device=self.device,
                                     progress=False)[0]
        chain = UpscaleChain(base_height=plan.resolution, base_width=plan.resolution, strength=e.chain_strength)
        labels = check_labels(model, None, asked.num)
        batches = []
        for start in range(0, asked.num, e.batch_size):
            count = min(e.batch_size, asked.num - start)
            batch = dataclasses.replace(asked, num=count, seed=asked.seed + start,
                                        labels=None if labels is None else labels[start:start + count])
            batches.append(generate_upscaled(model, record, batch, chain, progress=False).cpu())
        return torch.cat(batches)

    def teacher_images(self, plan: ArmPlan, asked: Sampling) -> torch.Tensor:
        """The teacher's images made as the student's are (same noise, labels, size and chain), to pair
        with them where the distillation measured no agreement (the chain, or sizes beyond 2x)."""
        key = (str(plan.teacher), asked.height)
        if key not in self._teacher_images:
            checkpoint = self.teacher_checkpoint(plan)[0]
            model, record = load_checkpoint(checkpoint, device=self.device)
            self._teacher_images[key] = self.sample(plan, (checkpoint, None), model, record, asked)
        return self._teacher_images[key]

    def measure_scale(self, plan: ArmPlan, loaded: tuple, model, record, size: int, agreement: dict) -> dict:
        e = self.config.eval
        asked = Sampling(num=e.num, height=size, width=size, steps=e.sample_steps, seed=e.seed,
                         positions=e.positions if size > plan.resolution else "none")
        chained = self.chained(plan, size)
        images = self.sample(plan, loaded, model, record, asked)
        paired = {} if chained else agreement.get(str(size), {})
        pair_with = self.teacher_images(plan, asked) if plan.kind == "distill" and not paired else None
        scores = score_images(images, self.reference(record, size), e.features, extractor=self.extractor(),
                              record=record, pair_with=pair_with, features_path=self.features_path,
                              batch_size=e.batch_size, device=self.device, seed=e.seed, progress=False)
        paired = scores.agreement or paired
        sampling = record.sampling(asked)
        height, width = input_size(model, size, size)
        forward = forward_gflops(record.model, height, width)
        guided = 2 if sampling.cfg_scale > 1 and record.num_classes > 0 else 1  # guidance doubles the batch
        sampling_gflops = forward * sampling.steps * guided
        if chained:  # the base pass at the training size, then the last floor(steps x strength) steps
            base = forward_gflops(record.model, *input_size(model, plan.resolution, plan.resolution))
            sampling_gflops = (base * sampling.steps + forward * int(sampling.steps * e.chain_strength)) * guided
        timing = measure_point(model, record.model, height, width, torch.device(self.device), e.bench_repeats,
                               memory=True)
        return {"resolution": size, "fid": scores.quality["fid"], "kid": scores.quality["kid_mean"],
                "legibility": scores.legibility, "psnr": paired.get("psnr"), "ssim": paired.get("ssim"),
                "forward_gflops": forward, "sampling_gflops": sampling_gflops,
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
