"""The seed papers' claims against the studies' miniature results: a table generated from the study
folders (each a `study.json` and a `measurements.csv`, as committed under benchmarks/results/), never
typed by hand (`python benchmarks/study_claims.py` writes benchmarks/results/study-claims.md).

Each claim names the study and the arm that tests it and how: `match` reads the arm against the
study's baseline (its first training arm, DiT) with the compute-to-match reading of `matching.py`;
`student` reads a distilled student against its teacher at a multiple of the training size. The
verdict: reproduces, ties or does not (a difference within the seed spread, or for legibility within
its sampling error, is a tie), or not
measurable where the baseline (or teacher) itself is not yet legible (below `LEGIBLE`): then the
samples are not digits yet and no ranking of them tests a claim.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..files import read_json
from .matching import AHEAD, BEHIND, TIE, final_values, match_arm, student_gaps

LEGIBLE = 0.9  # the baseline's final legibility below which a study tests no claim
REPRODUCES, TIES, DOES_NOT = "reproduces", "ties", "does not"


@dataclass(frozen=True)
class Claim:
    paper: str
    text: str  # the claim in the paper's form
    study: str  # the study folder's name
    arm: str
    kind: str  # "match" (the arm against the baseline) or "student" (against its teacher)
    scale: int = 1  # students: the multiple of the training size read
    tie: str = TIES  # the verdict a tie gives: TIES, or REPRODUCES where the claim is "as good as"


CLAIMS = (
    Claim("U-DiT (arXiv 2405.02730)", "downsampled-token attention in a U shape beats DiT at a fraction of its "
          "compute (U-DiT-B beats DiT-XL/2 at ~1/6 of its FLOPs)", "study-backbones", "udit", "match"),
    Claim("U-DiT (arXiv 2405.02730), its idea in a plain DiT (ditkit's ablation)", "attention over downsampled "
          "tokens beats full attention at matched compute", "study-backbones", "dit-downsampled", "match"),
    Claim("U-DiT (arXiv 2405.02730), its idea in a plain DiT (ditkit's ablation)", "the same at 64 px, where "
          "attention is a larger share of the FLOPs", "study-backbones-64", "dit-downsampled", "match"),
    Claim("DiffuSSM (arXiv 2311.18257)", "attention-free, DiT-level quality with fewer total training FLOPs "
          "(~13-20% less)", "study-backbones", "diffussm", "match"),
    Claim("CLEAR (arXiv 2412.16112)", "a local-attention student reaches its full-attention teacher's quality "
          "after short distillation", "study-distillation", "student", "student", 1, REPRODUCES),
    Claim("CLEAR (arXiv 2412.16112)", "and keeps it at higher resolution, through the upscale chain (4x)",
          "study-distillation", "student", "student", 4, REPRODUCES),
)


@dataclass
class StudyResults:
    """One study folder read back: its rows (measurements.csv) and each arm's resolved plan."""

    name: str
    rows: list[dict]
    arms: dict[str, dict]  # name -> the resolved plan of study.json (kind, seeds, steps, teacher, ...)
    samples: int | None = None  # images per evaluation (study.json's eval.num): legibility's sampling error

    @property
    def baseline(self) -> str | None:
        return next((name for name, plan in self.arms.items() if plan["kind"] == "train"), None)

    def resolution(self, arm: str) -> int:
        """The arm's training size: its smallest measured one (the study measures at multiples of it)."""
        return min(int(r["resolution"]) for r in self.rows if r["arm"] == arm)


def load_study(folder: str | Path) -> StudyResults | None:
    """The study in `folder` (study.json and measurements.csv), or None where it has not been written."""
    folder = Path(folder)
    if not (folder / "study.json").is_file() or not (folder / "measurements.csv").is_file():
        return None
    settings = read_json(folder / "study.json", "study settings")
    arms = {key.removeprefix("arms."): value["resolved"] for key, value in settings.items() if key.startswith("arms.")}
    with (folder / "measurements.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return StudyResults(folder.name, rows, arms, settings.get("eval", {}).get("num"))


def legibility_of(study: StudyResults, arm: str, resolution: int) -> float | None:
    values = final_values(study.rows, arm, "legibility", resolution)
    return statistics.fmean(values) if values else None


def combine(verdicts: list[str], tie: str) -> str:
    """All ahead: reproduces; any behind: does not; otherwise a tie (`tie`)."""
    if any(v == BEHIND for v in verdicts):
        return DOES_NOT
    return REPRODUCES if all(v == AHEAD for v in verdicts) else tie


def read_match(claim: Claim, study: StudyResults) -> tuple[str, str]:
    baseline, resolution = study.baseline, study.resolution(study.baseline)
    matches = [m for key in ("fid", "legibility")
               if (m := match_arm(study.rows, claim.arm, baseline, key, resolution, study.samples))]
    label = next(r["label"] for r in study.rows if r["arm"] == baseline)
    result = "; ".join(m.sentence(label) for m in matches)
    # "matches at k x" needs every seed there: an arm ahead in the mean with a seed short of it is no lead.
    verdicts = [TIE if m.verdict == AHEAD and len(m.ratios) < m.seeds else m.verdict for m in matches]
    return result, combine(verdicts, claim.tie)


def read_student(claim: Claim, study: StudyResults) -> tuple[str, str]:
    teacher = study.arms[claim.arm]["teacher"]
    resolution = claim.scale * study.resolution(claim.arm)
    seed = teaching_seed(study, teacher)
    gaps = [g for g in student_gaps(study.rows, claim.arm, teacher, resolution, seed, study.samples)
            if g.key in ("fid", "legibility")]
    parts = []
    for gap in gaps:
        shown = (lambda v: f"{100 * v:.1f}%") if gap.key == "legibility" else (lambda v: f"{v:.3g}")
        untrained = f", untrained {shown(statistics.fmean(gap.untrained))}" if gap.untrained else ""
        parts.append(f"{'FID' if gap.key == 'fid' else 'legibility'} at {resolution} px: student "
                     f"{shown(statistics.fmean(gap.final))} vs teacher {shown(statistics.fmean(gap.teacher))}"
                     f"{untrained} ({gap.verdict})")
    return "; ".join(parts), combine([g.verdict for g in gaps], claim.tie)


def teaching_seed(study: StudyResults, teacher: str) -> str | None:
    """The teacher arm's first seed (its checkpoint teaches), as measurements.csv spells it."""
    seeds = study.arms.get(teacher, {}).get("seeds")
    return str(seeds[0]) if seeds else None


def read_claim(claim: Claim, study: StudyResults | None) -> tuple[str, str]:
    """(the miniature result, the verdict) of one claim."""
    if study is None or claim.arm not in study.arms:
        return "not run yet", "-"
    reference = study.baseline if claim.kind == "match" else study.arms[claim.arm]["teacher"]
    legible = legibility_of(study, reference, study.resolution(reference))
    if legible is None or legible < LEGIBLE:
        shown = "unmeasured" if legible is None else f"{100 * legible:.1f}%"
        return (f"{reference} reaches only {shown} legibility at its final point: its samples are not yet "
                "digits, so the ranking tests nothing", "not measurable")
    return read_match(claim, study) if claim.kind == "match" else read_student(claim, study)


def claims_table(results: str | Path, claims: tuple[Claim, ...] = CLAIMS) -> str:
    """The claims table as markdown, from the study folders under `results` (links relative to it)."""
    results = Path(results)
    studies = {name: load_study(results / name) for name in dict.fromkeys(c.study for c in claims)}
    lines = ["# The seed papers' claims in miniature", "",
             "Generated by `python benchmarks/study_claims.py` from the studies' `study.json` and "
             "`measurements.csv` (nothing typed by hand). Each claim is read on one arm of one study: against "
             "the study's baseline (its first training arm, DiT) with the compute-to-match reading (the training "
             "compute each arm needs to reach the baseline's final FID and legibility, interpolated linearly in "
             "log compute on its curve; k = that compute / the baseline's), or a student against its teacher. "
             "A difference within the seed spread (the sum of the standard deviations over seeds) is a tie, and "
             "so is a legibility difference within its sampling error (twice the standard error of a difference "
             "of two shares of the evaluated samples: every arm is scored on one sampling seed). A "
             f"study whose baseline is below {100 * LEGIBLE:.0f}% legibility at its final point tests nothing.",
             "", "| paper | claim | study | miniature result | verdict |", "|---|---|---|---|---|"]
    for claim in claims:
        result, verdict = read_claim(claim, studies[claim.study])
        link = f"[{claim.study}]({claim.study}/report.md)" if studies[claim.study] else claim.study
        lines.append(f"| {claim.paper} | {claim.text} | {link}, arm `{claim.arm}` | {result} | **{verdict}** |")
    return "\n".join(lines) + "\n"
