"""The orchestration that `ditkit study` and `ditkit quickstart` share: a resumable run of stages in
one out folder (`StageRunner`: each stage runs once, and again only when a stage it reads from ran
again), and the bodies of their training and distillation stages (`train_stage`, `distill_stage`).

A stage writes its outputs, then its marker `.stages/NAME.json` (atomically, with its time). A rerun
skips a stage that has a marker, unless a stage it reads from ran again: then its old outputs are
removed and it starts afresh. A stage without a marker (interrupted) runs again and resumes from
whatever its body left. The settings the folder was made with are kept in `NAME.json` beside the
outputs, so a resumed run never mixes two configurations.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import list_checkpoints
from ..distill import DistillConfig, Distiller, DitkitTeacher
from ..errors import DitkitError
from ..files import atomic_write_text, read_json
from ..train import TrainConfig, train


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Any], None]  # the stage's body, called with the object that holds the bodies
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads: when one reruns, so does this
    outputs: tuple[str, ...] = ()  # its work under the out folder, removed when it reruns afresh


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


class StageRunner:
    """Runs `stages` in the out folder of a run called `name`. `forget` is called when old outputs
    are removed, to drop whatever the caller loaded from them."""

    def __init__(self, out_dir: str | Path, name: str, log=print, forget: Callable[[], None] = lambda: None):
        self.out, self.name, self.log, self.forget = Path(out_dir), name, log, forget
        if self.out.exists() and not self.out.is_dir():
            raise DitkitError(f"--out {self.out} is a file: give a folder (new, or a {name}'s to resume)")

    def marker(self, stage: Stage) -> Path:
        return self.out / ".stages" / f"{stage.name}.json"

    def check_settings(self, settings: dict) -> None:
        """The out folder's settings must be these: a resumed stage must not mix two configurations."""
        path = self.out / f"{self.name}.json"
        if path.is_file():
            saved = read_json(path, f"the {self.name} settings file")
            if saved != settings:
                diff = ", ".join(sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k)))
                raise DitkitError(f"{self.out} holds a {self.name} made with other settings ({diff}): "
                                  "use another --out, or delete that folder")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")

    def run(self, stages: tuple[Stage, ...], work) -> float:
        """Every stage (its body called with `work`), skipping the ones already done; returns the seconds."""
        start, reran = time.perf_counter(), set()
        for number, stage in enumerate(stages, 1):
            header = f"[{number}/{len(stages)}] {stage.title} (at {format_seconds(time.perf_counter() - start)})"
            marker, stale = self.marker(stage), bool(reran.intersection(stage.needs))
            if marker.is_file() and not stale:
                seconds = read_json(marker, "stage marker")["seconds"]
                self.log(f"{header}: done earlier ({format_seconds(seconds)}), skipped")
                continue
            self.log(f"{header} ...")
            if stale:  # its inputs were remade: nothing it made before may be reused
                self.remove_outputs(stage)
            seconds = self._run_stage(stage, work)
            reran.add(stage.name)
            self.log(f"      {stage.name} done in {format_seconds(seconds)}")
        return time.perf_counter() - start

    def _run_stage(self, stage: Stage, work) -> float:
        """Run one stage's body, then write its marker; returns the seconds the body took."""
        began = time.perf_counter()
        stage.run(work)
        seconds = time.perf_counter() - began
        marker = self.marker(stage)
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
        return seconds

    def remove_outputs(self, stage: Stage) -> None:
        self.marker(stage).unlink(missing_ok=True)
        for name in stage.outputs:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.forget()


# ---------------------------------------------------------------- stage bodies

def train_stage(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train `cfg` into its out folder, from its last checkpoint where there is one; returns the final
    checkpoint. Without a checkpoint, what an interrupted start left (config, metrics) is the stage's
    own: replaced."""
    resume = bool(list_checkpoints(Path(cfg.train.out_dir) / "checkpoints"))
    return train(cfg, resume=resume or None, overwrite=not resume, progress=progress)


def distill_stage(checkpoint: Path, recorded: str, cfg: DistillConfig, device: str = "cpu",
                  progress: bool = True) -> dict:
    """Distil the teacher `checkpoint` into `cfg`'s out folder (resuming what is there); returns the
    agreement report. `recorded` is the name the run keeps for the teacher: distillation refuses to
    resume with "another" teacher, so one inside the out folder is named relative to it (the same
    teacher stays the same when the folder moves, or the run goes on from another cwd)."""
    teacher = DitkitTeacher(checkpoint, device=device)
    teacher.path = recorded
    return Distiller(teacher, cfg, device=device, progress=progress).run(resume=True)
