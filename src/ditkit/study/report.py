"""A study's report folder, written from its measurements:

    report.md                       compute matching, a table per evaluation point (mean +/- std over
                                    seeds), a computed reading of who is ahead, the training compute each
                                    arm needs to match the baseline (the first training arm) and its
                                    sampling cost there (`matching.py`), and students against teachers
    measurements.csv                every measurement (arm, seed, point, resolution)
    quality-vs-train-compute.png    FID (and legibility) against counted training GFLOPs
    quality-vs-sampling-cost.png    the same at the end of the budget against sampling GFLOPs per image

The reading's rule: at each point, the arm with the best mean is ahead of the next one by more than
the seed spread when the difference of their means exceeds the sum of their standard deviations
over seeds; with one seed the spread is unknown and the reading says so.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_path, atomic_write_text
from .config import StudyConfig
from .matching import AHEAD, BEHIND, MATCHED, TIE, cost_at_equal_quality, match_arm, sampling_error, student_gaps
from .plan import TRAIN_PASSES, ArmPlan

COLUMNS = ("arm", "label", "kind", "seed", "fraction", "step", "train_gflops", "resolution", "fid", "kid",
           "legibility", "psnr", "ssim", "forward_gflops", "sampling_gflops", "step_ms", "peak_mib")


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    lower_is_better: bool
    format: str  # of the shown value, e.g. ",.2f"
    scale: float = 1.0  # shown as value x scale (legibility as a percentage)

    def show(self, value: float) -> str:
        return f"{value * self.scale:{self.format}}"


METRICS = (Metric("fid", "FID", True, ",.2f"), Metric("kid", "KID", True, ".4f"),
           Metric("legibility", "legibility %", False, ".1f", 100.0), Metric("psnr", "PSNR dB", False, ".2f"),
           Metric("ssim", "SSIM", False, ".3f"), Metric("sampling_gflops", "sampling GFLOPs/image", True, ".4g"),
           Metric("step_ms", "ms/forward", True, ",.1f"), Metric("peak_mib", "peak MiB", True, ",.1f"))
READ = ("fid", "legibility", "psnr")  # the quality measures the reading compares
PLOTTED = ("fid", "legibility", "psnr")


# ---------------------------------------------------------------- summaries over seeds

@dataclass
class Spread:
    mean: float
    std: float | None  # None with one seed
    n: int

    def show(self, metric: Metric) -> str:
        return metric.show(self.mean) + ("" if self.std is None else f" ± {metric.show(self.std)}")


def spread(values: list) -> Spread | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per (evaluation point, arm, resolution): each metric's Spread over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["fraction"], row["arm"], row["resolution"]), []).append(row)
    return [{"fraction": fraction, "arm": arm, "resolution": resolution, "label": group[0]["label"],
             "step": group[0]["step"], "train_gflops": group[0]["train_gflops"], "seeds": len(group),
             **{m.key: spread([r[m.key] for r in group]) for m in METRICS}}
            for (fraction, arm, resolution), group in groups.items()]


# ---------------------------------------------------------------- the reading

def compare(summaries: list[dict], metric: Metric, samples: int) -> str | None:
    """Who is ahead on `metric` among `summaries` (one point, one resolution), and whether by more
    than the seed spread (legibility: or its sampling error over `samples` images per evaluation);
    None with fewer than two arms measured."""
    measured = [s for s in summaries if s[metric.key] is not None]
    if len(measured) < 2:
        return None
    measured.sort(key=lambda s: s[metric.key].mean, reverse=not metric.lower_is_better)
    best, second = measured[0], measured[1]
    a, b = best[metric.key], second[metric.key]
    gap = abs(a.mean - b.mean)
    if gap == 0:
        return f"{metric.title}: {best['label']} and {second['label']} tie at {a.show(metric)}"
    head = (f"{metric.title}: **{best['label']}** leads ({a.show(metric)} vs {b.show(metric)} for "
            f"{second['label']}), by {metric.show(gap)}")
    floor = None
    if metric.key == "legibility":
        floor = sampling_error(a.mean, b.mean, samples * best["seeds"], samples * second["seeds"])
        if gap <= floor:
            return f"{head} <= sampling error {metric.show(floor)} of {samples} samples: not a difference"
    if a.std is None or b.std is None:
        return f"{head}; one seed, so the seed spread is unknown: run more seeds before reading a difference"
    limit = a.std + b.std
    if gap > limit:
        return f"{head} > seed spread {metric.show(limit)}: a difference beyond the seeds' noise"
    return f"{head} <= seed spread {metric.show(limit)}: within the seeds' noise, not a difference"


def reading(summaries: list[dict], fractions: list[float], samples: int) -> list[str]:
    lines = ["## Reading", "",
             "Computed from the table: at each point the arm with the best mean, and whether its lead exceeds "
             "the seed spread (rule: the difference of the two means > the sum of their standard deviations "
             "over seeds) and, for legibility, its sampling error (twice the standard error of a difference "
             f"of two shares of {samples} samples per seed: all arms are scored on one sampling seed, so the "
             "seeds do not show it).", ""]
    for fraction in fractions:
        for resolution in sorted({s["resolution"] for s in summaries if s["fraction"] == fraction}):
            here = [s for s in summaries if s["fraction"] == fraction and s["resolution"] == resolution]
            for metric in (m for m in METRICS if m.key in READ):
                if (line := compare(here, metric, samples)) is not None:
                    lines.append(f"- {100 * fraction:g}% of the budget, {resolution} px, {line}.")
    return [*lines, ""]


# ---------------------------------------------------------------- compute to match the baseline

def baseline_of(plans: dict[str, ArmPlan]) -> str | None:
    """The arm the others are matched against: the first training arm (DiT in the built-in studies)."""
    return next((name for name, plan in plans.items() if plan.kind == "train"), None)


def matching_section(rows: list[dict], plans: dict[str, ArmPlan], samples: int) -> list[str]:
    baseline = baseline_of(plans)
    others = [p for p in plans.values() if p.kind == "train" and p.name != baseline
              and p.resolution == plans[baseline].resolution]
    if not others:
        return []
    base, resolution = plans[baseline], plans[baseline].resolution
    lines = [f"## Compute to match {base.label}", "",
             f"For each arm, the training compute at which it reaches {base.label}'s final quality (the mean over "
             f"seeds at {base.train_gflops:,.4g} GFLOPs, {resolution} px), as k x {base.label}'s compute: each "
             "seed's curve is interpolated linearly in log training compute between the two evaluations around "
             "the first crossing; `<=` where its first evaluation already reaches it (an upper bound). k is the "
             "mean ± std over seeds. An arm whose final mean is within the seed spread of the baseline's (the "
             "difference <= the sum of the standard deviations; for legibility also within its sampling error, "
             "as in the reading) ties it: no k is read into that difference.", "",
             f"| arm | measure | its final | {base.label}'s final | k (x {base.label}'s compute) | reading |",
             "|---|---|---|---|---|---|"]
    sentences, costs = [], []
    for plan in others:
        matches = [m for key in MATCHED if (m := match_arm(rows, plan.name, baseline, key, resolution, samples))]
        for m in matches:
            mine, theirs = (statistics.fmean(values) for values in (m.final, m.base_final))
            lines.append(f"| {m.label} | {m.title} | {m.show(mine)} | {m.show(theirs)} | {m.k()} | {m.verdict} |")
            sentences.append(f"- {m.sentence(base.label)}.")
        costs.append(cost_line(plan, base, cost_at_equal_quality(rows, plan.name, baseline, matches, resolution)))
    return [*lines, "", *sentences, "", f"### Sampling cost at {base.label}'s final quality", "",
            "Sampling GFLOPs per image (counted) and time of one forward (measured), each against "
            f"{base.label}'s, for the arms that reach its final FID and legibility (ahead or tied); a model's "
            "cost per image does not change as it trains.", "", *costs, ""]


def cost_line(plan: ArmPlan, base: ArmPlan, cost: dict) -> str:
    if not cost:
        return f"- {plan.label}: does not reach {base.label}'s final quality within the budget: no equal-quality cost."
    parts = []
    if "sampling_gflops" in cost:
        value, ratio = cost["sampling_gflops"]
        parts.append(f"{value:.4g} sampling GFLOPs per image ({ratio:.2f} x {base.label}'s)")
    if "step_ms" in cost:
        value, ratio = cost["step_ms"]
        parts.append(f"{value:,.1f} ms per forward ({ratio:.2f} x)")
    return f"- {plan.label}: " + ", ".join(parts) + "."


# ---------------------------------------------------------------- students against teachers

def gap_section(rows: list[dict], plans: dict[str, ArmPlan], scales: list[int], samples: int) -> list[str]:
    students = [p for p in plans.values() if p.kind == "distill"]
    if not students:
        return []
    lines = ["## Students against their teachers", "",
             "Each student's final measurement against its teacher's final one (FID, legibility) and, for "
             "its agreement with the teacher (PSNR/SSIM, same noise and labels), against itself untrained "
             "(step 0: the teacher with CLEAR attention swapped in, nothing trained), where eval.at lists 0. "
             "Mean ± std over seeds (the teacher: the seed that taught); the verdict is the final student's, a "
             "difference within the seed spread a tie (a teacher trained once has no spread of its own: the "
             "student's alone counts), and for legibility one within its sampling error too.", "",
             "| student | px | measure | teacher | untrained student | student | verdict |",
             "|---|---|---|---|---|---|---|"]
    for plan in students:
        teacher = plan.teacher if plan.teacher in plans else None
        seed = plans[teacher].seeds[0] if teacher else None  # the seed whose checkpoint taught
        for scale in scales:
            for gap in student_gaps(rows, plan.name, teacher, scale * plan.resolution, seed, samples):
                metric = metric_named(gap.key)
                cells = [shown(values, metric) for values in (gap.teacher, gap.untrained, gap.final)]
                verdict = {AHEAD: "better", TIE: "tie", BEHIND: "worse", None: "-"}[gap.verdict]
                against = "vs teacher" if gap.key in ("fid", "legibility") else "vs untrained"
                lines.append(f"| {plan.label} | {gap.resolution} | {metric.title} | " + " | ".join(cells) +
                             f" | {verdict} {against if gap.verdict else ''} |")
    return [*lines, ""]


def shown(values: list[float], metric: Metric) -> str:
    summary = spread(values)
    return summary.show(metric) if summary else "-"


# ---------------------------------------------------------------- the tables

def compute_table(plans: dict[str, ArmPlan]) -> list[str]:
    lines = ["## Compute", "",
             f"Training compute is counted by ditkit's FLOP counter (a multiply-add = 2 FLOPs): a training step "
             f"costs {TRAIN_PASSES} forwards (backward = 2 forwards) of each image of the batch; a distillation "
             f"step a teacher forward plus {TRAIN_PASSES} student forwards. Steps = budget / GFLOPs per step, "
             "rounded.", "",
             "| arm | kind | forward GFLOPs/image | images/step | GFLOPs/step | steps | training GFLOPs | budget | "
             "vs budget | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for plan in plans.values():
        b = plan.budget
        target = b.gflops
        versus = f"{100 * (plan.train_gflops / target - 1):+.2f}%" if target else "-"
        shown = f"{target:,.4g} GFLOPs" if target else f"{b.steps} steps"
        lines.append(f"| {plan.label} | {plan.kind} | {plan.forward_gflops:.4g} | {plan.batch_size} | "
                     f"{plan.step_gflops:.4g} | {plan.steps:,} | {plan.train_gflops:,.4g} | {shown} | {versus} | "
                     f"{', '.join(map(str, plan.seeds))} |")
    return [*lines, ""]


def point_tables(summaries: list[dict], fractions: list[float]) -> list[str]:
    shown = [m for m in METRICS if any(s[m.key] is not None for s in summaries)]
    lines = ["## Measurements (mean ± std over seeds)", "",
             "FID/KID against real images with the chosen features; legibility: the share of samples the "
             "digits classifier reads as the class asked for; PSNR/SSIM: a student's agreement with its teacher "
             "(same noise and labels); sampling GFLOPs/image: forward GFLOPs x sampling steps (x 2 with "
             "guidance); ms/forward and peak MiB: one forward at batch 1.", ""]
    for fraction in fractions:
        here = [s for s in summaries if s["fraction"] == fraction]
        lines += [f"### {100 * fraction:g}% of the budget", "",
                  "| arm | px | step | training GFLOPs | seeds | " + " | ".join(m.title for m in shown) + " |",
                  "|---|---|---|---|---|" + "---|" * len(shown)]
        for s in here:
            cells = [s[m.key].show(m) if s[m.key] is not None else "-" for m in shown]
            lines.append(f"| {s['label']} | {s['resolution']} | {s['step']:,} | {s['train_gflops']:,.4g} | "
                         f"{s['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------- the plots

def metric_named(key: str) -> Metric:
    return next(m for m in METRICS if m.key == key)


def plot_panels(summaries: list[dict], path: Path, x_key: str, xlabel: str, label_points: bool) -> None:
    """One panel per plotted metric that was measured: each arm's means (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(s[k] is not None for s in summaries)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5.5 * max(1, len(keys)), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        metric = metric_named(key)
        for color, label in enumerate(dict.fromkeys(s["label"] for s in summaries)):
            series = [s for s in summaries if s["label"] == label and s[key] is not None]
            xs = [s[x_key].mean if isinstance(s[x_key], Spread) else s[x_key] for s in series]
            ys = [s[key].mean * metric.scale for s in series]
            errors = [(s[key].std or 0) * metric.scale for s in series]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, color=f"C{color}", label=label,
                        linestyle="" if label_points else "-")
            for x, y, s in zip(xs, ys, series, strict=True) if label_points else ():
                ax.annotate(f"{s['resolution']} px", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=xlabel, ylabel=metric.title + (" (lower is better)" if metric.lower_is_better else ""),
               xscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------- the folder

def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def settings_section(study: StudyConfig) -> list[str]:
    e = study.eval
    budget = f"{study.budget.gflops:,.0f} GFLOPs" if study.budget.gflops is not None else f"{study.budget.steps} steps"
    return [f"Study budget {budget} per arm and seed (unless an arm sets its own), seeds {study.seeds}; evaluated at "
            f"{', '.join(f'{100 * f:g}%' for f in e.at)} of each budget with {e.num} samples (sampling seed "
            f"{e.seed}: the same noise and labels for every arm) at {', '.join(f'{s}x' for s in e.scales)} the "
            f"training size, FID/KID with `{e.features}` features against {e.num_reference} real images. "
            "The settings this folder was made with: `../study.json`.", ""]


def write_report(folder: str | Path, study: StudyConfig, plans: dict[str, ArmPlan], rows: list[dict]) -> Path:
    """The report folder (see the module docstring); returns the path of report.md."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summaries = summarize(rows)
    fractions = study.eval.at
    write_csv(rows, folder / "measurements.csv")
    plot_panels([s for s in summaries if s["resolution"] == plans[s["arm"]].resolution],
                folder / "quality-vs-train-compute.png", "train_gflops", "training GFLOPs (counted)", False)
    plot_panels([s for s in summaries if s["fraction"] == fractions[-1]], folder / "quality-vs-sampling-cost.png",
                "sampling_gflops", f"sampling GFLOPs per image (at {100 * fractions[-1]:g}% of the budget)", True)
    lines = [f"# {study.title}", "", *settings_section(study), *compute_table(plans),
             *point_tables(summaries, fractions), *reading(summaries, fractions, study.eval.num),
             *matching_section(rows, plans, study.eval.num),
             *gap_section(rows, plans, study.eval.scales, study.eval.num),
             "## Plots", "", "![quality vs training compute](quality-vs-train-compute.png)", "",
             "![quality vs sampling cost](quality-vs-sampling-cost.png)", "",
             "Every measurement: [measurements.csv](measurements.csv).", ""]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    return folder / "report.md"
