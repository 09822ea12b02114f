"""The papers' form of claim, read from a study's measurements: how much training compute each arm
needs to reach the baseline's final quality ("arm X matches DiT at k x its compute"), what sampling
costs at that quality, and a student's gap to its teacher.

Reaching a target: each seed's curve (quality at each evaluation point against counted training
GFLOPs) is followed in order of compute; between the two evaluations around the first crossing the
compute is interpolated linearly in log compute (quality is close to linear in log compute over a
short span; the choice is stated in the report). A first evaluation that already reaches the target
gives only an upper bound (<=), a curve that never reaches it gives none. k = that compute / the
baseline's final training compute, per seed; shown as mean ± std over seeds.

Ties: the arm's final mean and the baseline's differ by no more than the sum of their standard
deviations over seeds (the rule of the report's reading): then the arm ties the baseline, and no k is
read into the difference. With one seed the spread is unknown and the reading says so. Legibility is
a share of the evaluated samples, so it also has a sampling error the seeds do not show (every arm
is scored on the same sampling seed): a legibility difference within twice the standard error of a
difference of two shares, 2 sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2) with n = samples x seeds, is a
tie too (one digit of 128 read otherwise is 0.8%, within it).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

AHEAD, TIE, BEHIND = "ahead", "tie", "behind"
MATCHED = {"fid": ("FID", True), "legibility": ("legibility", False)}  # key: (title, lower is better)


@dataclass(frozen=True)
class Reach:
    gflops: float
    exact: bool  # False: the first evaluation already reached the target (an upper bound)


def curve(rows: list[dict], arm: str, seed, key: str, resolution: int) -> list[tuple[float, float]]:
    """(training GFLOPs, value) of one arm and seed at one resolution, trained points only, by compute."""
    points = [(float(r["train_gflops"]), float(r[key])) for r in rows
              if r["arm"] == arm and r["seed"] == seed and int(r["resolution"]) == resolution
              and float(r["train_gflops"]) > 0 and r[key] not in (None, "")]
    return sorted(points)


def reaches(value: float, target: float, lower_is_better: bool) -> bool:
    return value <= target if lower_is_better else value >= target


def compute_to_reach(points: list[tuple[float, float]], target: float, lower_is_better: bool) -> Reach | None:
    """Training GFLOPs at which the curve `points` first reaches `target` (see the module docstring)."""
    for index, (gflops, value) in enumerate(points):
        if not reaches(value, target, lower_is_better):
            continue
        if index == 0:
            return Reach(gflops, exact=False)
        (c0, v0), (c1, v1) = points[index - 1], (gflops, value)
        share = (target - v0) / (v1 - v0)  # v0 misses and v1 reaches: a share in (0, 1]
        return Reach(math.exp(math.log(c0) + share * (math.log(c1) - math.log(c0))), exact=True)
    return None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def final_values(rows: list[dict], arm: str, key: str, resolution: int) -> list[float]:
    """The arm's value at its last trained evaluation point, one per seed."""
    seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
    return [points[-1][1] for seed in seeds if (points := curve(rows, arm, seed, key, resolution))]


def sampling_error(a: float, b: float, samples_a: int, samples_b: int) -> float:
    """Twice the standard error of the difference of two shares a and b (in [0, 1]) measured on
    samples_a and samples_b samples."""
    return 2 * math.sqrt(a * (1 - a) / samples_a + b * (1 - b) / samples_b)


def verdict(arm: list[float], base: list[float], lower_is_better: bool,
            samples: int | None = None) -> tuple[str, bool]:
    """(ahead / tie / behind of the arm's mean against the baseline's, whether the difference's noise
    is known): a difference within the sum of the standard deviations is a tie. A side measured with one
    seed (a teacher trained once) adds no spread of its own; with one seed on both the spread is unknown.
    `samples` (images per evaluation) marks the values as shares of them (legibility): a difference
    within their `sampling_error` is a tie too, and that noise is known with any number of seeds."""
    (a, sa), (b, sb) = mean_std(arm), mean_std(base)
    stds = [std for std in (sa, sb) if std is not None]
    known = bool(stds) or bool(samples)
    floor = sampling_error(a, b, samples * len(arm), samples * len(base)) if samples else 0.0
    if a == b or abs(a - b) <= max(sum(stds), floor):
        return TIE, known
    return (AHEAD if (a < b) == lower_is_better else BEHIND), known


@dataclass
class Match:
    """How an arm compares with the baseline on one measure (see `match_arm`)."""

    arm: str
    label: str
    key: str
    target: float  # the baseline's final mean
    base_final: list[float]  # per seed
    final: list[float]  # the arm's, per seed
    ratios: list[float]  # k per seed that reached the target
    bounded: bool  # some k is an upper bound (the first evaluation already reached the target)
    seeds: int
    verdict: str
    spread_known: bool

    @property
    def title(self) -> str:
        return MATCHED[self.key][0]

    def show(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.key == "legibility" else f"{value:.3g}"

    def k(self) -> str:
        """k over the seeds that reached the target, e.g. '0.42 ± 0.05' or '<= 0.2'."""
        if not self.ratios:
            return "-"
        mean, std = mean_std(self.ratios)
        return ("<= " if self.bounded else "") + f"{mean:.2g}" + ("" if std is None else f" ± {std:.2g}")

    def sentence(self, base_label: str) -> str:
        finals = (f"final {self.show(mean_std(self.final)[0])} vs {self.show(self.target)} for {base_label}")
        if self.verdict == TIE:
            noise = "the seed spread or the sampling error" if self.key == "legibility" else "the seed spread"
            within = f"within {noise}" if self.spread_known else "equal means (one seed: spread unknown)"
            return f"{self.label} ties {base_label} on {self.title} ({finals}, {within})"
        if self.verdict == AHEAD and len(self.ratios) == self.seeds:
            return f"{self.label} matches {base_label} on {self.title} at {self.k()} x its compute ({finals})"
        if self.verdict == AHEAD:  # ahead in the mean, but a seed never got there
            return (f"{self.label} matches {base_label} on {self.title} at {self.k()} x its compute in "
                    f"{len(self.ratios)} of {self.seeds} seeds; the others do not reach it within the budget "
                    f"({finals})")
        return f"{self.label} does not reach {base_label}'s final {self.title} within the budget ({finals})"


def match_arm(rows: list[dict], arm: str, baseline: str, key: str, resolution: int,
              samples: int | None = None) -> Match | None:
    """The compute `arm` needs to reach the baseline's final mean on `key` (fid or legibility), per seed,
    relative to the baseline's final training compute; None where either was not measured. `samples`:
    images per evaluation (legibility's sampling error)."""
    lower_is_better = MATCHED[key][1]
    base_final, final = final_values(rows, baseline, key, resolution), final_values(rows, arm, key, resolution)
    if not base_final or not final:
        return None
    target = statistics.fmean(base_final)
    budget = max(g for seed in {r["seed"] for r in rows if r["arm"] == baseline}
                 for g, _ in curve(rows, baseline, seed, key, resolution))
    seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
    reached = [reach for seed in seeds if (reach := compute_to_reach(curve(rows, arm, seed, key, resolution),
                                                                     target, lower_is_better))]
    label = next(r["label"] for r in rows if r["arm"] == arm)
    outcome, known = verdict(final, base_final, lower_is_better, samples if key == "legibility" else None)
    return Match(arm, label, key, target, base_final, final, [r.gflops / budget for r in reached],
                 any(not r.exact for r in reached), len(seeds), outcome, known)


def cost_at_equal_quality(rows: list[dict], arm: str, baseline: str, matches: list[Match], resolution: int) -> dict:
    """The arm's sampling cost per image against the baseline's, where the arm reaches the baseline's
    final quality on every matched measure (ahead or tied); the cost of a model does not change as
    it trains, so it is read at the final point. {} when the arm does not reach that quality."""
    if not matches or any(m.verdict == BEHIND or (m.verdict == AHEAD and len(m.ratios) < m.seeds) for m in matches):
        return {}
    cost = {}
    for key in ("sampling_gflops", "step_ms"):
        mine, base = final_values(rows, arm, key, resolution), final_values(rows, baseline, key, resolution)
        if mine and base:
            cost[key] = (statistics.fmean(mine), statistics.fmean(mine) / statistics.fmean(base))
    return cost


def untrained_values(rows: list[dict], arm: str, key: str, resolution: int) -> list[float]:
    """The arm's value at step 0 (a distillation's student as swapped in), one per seed."""
    return [float(r[key]) for r in rows if r["arm"] == arm and int(r["resolution"]) == resolution
            and float(r["train_gflops"]) == 0 and r[key] not in (None, "")]


@dataclass
class Gap:
    """A student against its teacher on one measure at one resolution: the teacher's final values, the
    student's untrained (step 0) and final ones, and the verdict of the final student against the
    teacher (FID, legibility) or against its untrained self (PSNR, SSIM: the teacher is the reference)."""

    key: str
    resolution: int
    teacher: list[float]
    untrained: list[float]
    final: list[float]
    verdict: str | None
    spread_known: bool


GAP_MEASURES = {"fid": True, "legibility": False, "psnr": False, "ssim": False}  # key: lower is better


def student_gaps(rows: list[dict], student: str, teacher: str | None, resolution: int,
                 teacher_seed=None, samples: int | None = None) -> list[Gap]:
    """The student's gaps on every measure it has at `resolution`; the teacher's values are those of
    `teacher_seed` (the seed that taught) where given, else of all its seeds. `samples`: images per
    evaluation (legibility's sampling error)."""
    teacher_rows = [r for r in rows if r["arm"] == teacher and (teacher_seed is None or r["seed"] == teacher_seed)]
    gaps = []
    for key, lower_is_better in GAP_MEASURES.items():
        teacher_final = final_values(teacher_rows, teacher, key, resolution) if teacher else []
        untrained, final = untrained_values(rows, student, key, resolution), final_values(rows, student, key,
                                                                                          resolution)
        reference = teacher_final if key in ("fid", "legibility") else untrained
        shares = samples if key == "legibility" else None
        outcome, known = verdict(final, reference, lower_is_better, shares) if final and reference else (None, False)
        if final:
            gaps.append(Gap(key, resolution, teacher_final, untrained, final, outcome, known))
    return gaps
