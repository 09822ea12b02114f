"""Whole-model cost across resolutions: parameters, FLOPs, latency per sampling step and peak
memory of named models with each mixer, plus the fitted log-log scaling exponent per series.

One sampling step = one forward of the whole model at batch 1 (no CFG: guidance doubles the
batch, so about twice the time and activations), float32, under torch.inference_mode; latency
is the median of a few runs after a warm-up. FLOPs are counted on the meta device (nothing is
computed) as executed by the mixer's kernel; a multiply-add counts 2 (GMACs = half).

    rows = run_bench(["DiT-S/2", "U-DiT-S"], ["full", "clear"], [256, 512, 1024])
    write_report(rows, "bench-out")   # bench.md, bench.csv, bench.png
"""

from __future__ import annotations

import csv
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import DitkitError
from ..files import atomic_path, atomic_write_text
from ..mixers.registry import mixer_class, mixer_options
from ..models import build_model, model_config
from .flops import config_cost, count_parameters
from .memory import peak_memory

COLUMNS = ("model", "mixer", "resolution", "tokens", "params_m", "gmacs", "gflops", "step_ms", "peak_mib", "status")


# ---------------------------------------------------------------- helpers shared with benchmarks/attention.py

def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], object], device: torch.device | str, repeats: int = 3,
               slow_seconds: float = 1.0) -> list[float]:
    """Seconds of `repeats` calls after one warm-up call (which is returned first). A warm-up slower
    than `slow_seconds` is timed once more only: slow cases vary little relative to their length."""
    device = torch.device(device)
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if times[0] > slow_seconds and len(times) == 2:
            break
    return times


def loglog_slope(xs: Iterable[float], ys: Iterable[float]) -> float | None:
    """Least-squares slope of log y against log x (1 = linear, 2 = quadratic); None below 2 points."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x and y]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


def write_csv(rows: list[dict], path: Path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- measuring

def series_label(row: dict) -> str:
    return f"{row['model']} + {row['mixer']}"


def mixer_overrides(mixer: str, options: dict) -> dict:
    """The config fields for `mixer`, with the given options that this mixer accepts."""
    accepted = mixer_options(mixer)
    return {"mixer": mixer, "mixer_options": {k: v for k, v in options.items() if k in accepted}}


def describe_mixer(mixer: str, options: dict) -> str:
    return mixer + "".join(f" {k}={v}" for k, v in options.items())


def measure_point(model, config, height: int, width: int, device: torch.device, repeats: int,
                  memory: bool) -> dict:
    """Time and peak memory of one forward at (height, width) input cells."""
    x = torch.randn(1, config.in_channels, height, width, device=device)
    t = torch.full((1,), 500.0, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if config.num_classes > 0 else None
    with torch.inference_mode():
        times = timed_runs(lambda: model(x, t, y), device, repeats)
        step = statistics.median(times[1:]) if len(times) > 1 else times[0]
        peak = peak_memory(lambda: model(x, t, y), device) / 2**20 if memory else None
    return {"step_ms": step * 1e3, "peak_mib": peak}


def run_bench(models: list[str], mixers: list[str], resolutions: list[int], *, mixer_opts: dict | None = None,
              max_seconds: float = 10.0, max_memory_mib: float | None = None, repeats: int = 3,
              device: str = "cpu", memory: bool = True, progress: bool = True, log=print,
              model_args: dict | None = None) -> list[dict]:
    """One row per (model, mixer, resolution in pixels). A series stops ("skipped (budget)") after a
    step slower than `max_seconds` or a peak above `max_memory_mib`, or before a step whose time,
    projected from the last one at the same ms per GFLOP, exceeds `max_seconds`. A combination the
    model or the size does not allow is a row with status "skipped (<why>)". `model_args` overrides
    config fields of every model (e.g. in_channels=1, vae_scale=1 for a pixel-space model)."""
    from tqdm.auto import tqdm

    for name in models:  # a typo fails at once, not after an hour of measuring
        model_config(name, **(model_args or {}))
    for name in mixers:
        mixer_class(name)
    device = torch.device(device)
    rows = []
    combos = [(m, x) for m in models for x in mixers]
    for model_name, mixer in tqdm(combos, desc="bench", disable=not progress):
        rows += _run_series(model_name, mixer, mixer_opts or {}, sorted(resolutions), device, max_seconds,
                            max_memory_mib, repeats, memory, log, model_args or {})
    return rows


def _run_series(model_name, mixer, options, resolutions, device, max_seconds, max_memory_mib, repeats, memory, log,
                model_args):
    overrides = mixer_overrides(mixer, options)
    base = {"model": model_name, "mixer": describe_mixer(mixer, overrides["mixer_options"])}
    try:  # a model may not take every mixer (e.g. a backbone without attention)
        config = model_config(model_name, **{**model_args, **overrides})
        torch.manual_seed(0)
        model = build_model(config).to(device).eval()
    except (DitkitError, TypeError, ValueError) as error:
        log(f"  {base['model']} + {base['mixer']}: skipped ({error})")
        return [{**base, "resolution": r, "tokens": None, "status": f"skipped ({error})"} for r in resolutions]
    rows, over_budget, ms_per_gflop = [], False, None
    for pixels in resolutions:
        row = {**base, "resolution": pixels}
        multiple = config.vae_scale * config.downsample
        if pixels % multiple:
            row["status"] = f"skipped (size must be a multiple of {multiple} px)"
        else:
            side = pixels // config.vae_scale
            cost = config_cost(config, side, side)  # on the meta device: free, so known even when skipped
            row.update(tokens=config.tokens(side, side), params_m=count_parameters(model) / 1e6,
                       gmacs=cost.macs / 1e9, gflops=cost.flops / 1e9)
            projected = None if ms_per_gflop is None else ms_per_gflop * row["gflops"]
            if over_budget:
                row["status"] = "skipped (budget)"
            elif projected is not None and projected > max_seconds * 1e3:
                row["status"], over_budget = f"skipped (budget: ~{projected / 1e3:.0f} s projected)", True
            else:
                row.update(measure_point(model, config, side, side, device, repeats, memory), status="ok")
                ms_per_gflop = row["step_ms"] / row["gflops"]
                over_budget = (row["step_ms"] > max_seconds * 1e3
                               or (max_memory_mib is not None and (row["peak_mib"] or 0) > max_memory_mib))
        rows.append({c: row.get(c) for c in COLUMNS})
        log(format_row(rows[-1]))
    del model
    return rows


# ---------------------------------------------------------------- reporting

def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"  {row['model']:10s} {row['mixer']:20s} {row['resolution']:5d}px  {row['status']}"
    return (f"  {row['model']:10s} {row['mixer']:20s} {row['resolution']:5d}px {row['tokens']:7d} tokens "
            f"{row['gmacs']:9.1f} GMACs {row['step_ms']:10.1f} ms/step {_number(row['peak_mib']):>10s} MiB")


def fitted_slopes(rows: list[dict]) -> dict[str, dict]:
    """Per series: log-log slope of step time and of FLOPs against tokens, and the points fitted."""
    slopes = {}
    for label in dict.fromkeys(series_label(r) for r in rows):
        timed = [r for r in rows if series_label(r) == label and r["status"] == "ok"]
        counted = [r for r in rows if series_label(r) == label and r["gflops"] is not None]
        slopes[label] = {"time": loglog_slope([r["tokens"] for r in timed], [r["step_ms"] for r in timed]),
                         "flops": loglog_slope([r["tokens"] for r in counted], [r["gflops"] for r in counted]),
                         "points": len(timed), "flops_points": len(counted)}
    return slopes


def markdown_report(rows: list[dict], title: str = "") -> str:
    lines = [f"# {title or 'ditkit bench'}", "",
             "| model | mixer | px | tokens | params (M) | GMACs | GFLOPs | ms / step | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['model']} | {r['mixer']} | {r['resolution']} | {r['tokens']:,} | "
                         f"{r['params_m']:.1f} | {r['gmacs']:,.1f} | {r['gflops']:,.1f} | {r['step_ms']:,.1f} | "
                         f"{_number(r['peak_mib'])} | |")
        elif r["gmacs"] is not None:  # skipped for budget: its size and FLOPs are still known
            lines.append(f"| {r['model']} | {r['mixer']} | {r['resolution']} | {r['tokens']:,} | "
                         f"{r['params_m']:.1f} | {r['gmacs']:,.1f} | {r['gflops']:,.1f} | | | {r['status']} |")
        else:
            lines.append(f"| {r['model']} | {r['mixer']} | {r['resolution']} | | | | | | | {r['status']} |")
    lines += ["", "Fitted log-log slope against tokens (1 = linear, 2 = quadratic; FLOPs are counted at "
              "every size, time only where it was measured):", "",
              "| model + mixer | time slope | timed points | FLOPs slope | FLOP points |", "|---|---|---|---|---|"]
    for label, s in fitted_slopes(rows).items():
        lines.append(f"| {label} | {_number(s['time'], 2)} | {s['points']} | {_number(s['flops'], 2)} | "
                     f"{s['flops_points']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    slopes = fitted_slopes(rows)
    for color, (label, s) in enumerate(slopes.items()):
        series = [r for r in rows if series_label(r) == label]
        for ax, key, fit in ((axes[0], "step_ms", s["time"]), (axes[1], "gflops", s["flops"])):
            points = [(r["tokens"], r[key]) for r in series if r[key] is not None]
            if points:  # FLOPs are known past the time budget too
                ax.loglog(*zip(*points, strict=True), marker="o", color=f"C{color}",
                          label=label + ("" if fit is None else f" (slope {fit:.2f})"))
    for ax, ylabel in zip(axes, ("time per sampling step (ms)", "forward GFLOPs (multiply-add = 2)"), strict=True):
        ax.set(xlabel="tokens", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")  # explicit: `path` may be a temporary name without the extension
    plt.close(fig)


def write_report(rows: list[dict], out_dir: str | Path, stem: str = "bench", title: str = "") -> list[Path]:
    """<stem>.md (table + fitted slopes), <stem>.csv and <stem>.png (log-log) in `out_dir`."""
    if not rows:
        raise DitkitError("nothing was measured: give at least one model, mixer and resolution")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.png"]
    atomic_write_text(paths[0], markdown_report(rows, title) + "\n")
    with atomic_path(paths[1]) as tmp:
        write_csv(rows, tmp)
    with atomic_path(paths[2]) as tmp:
        plot(rows, tmp)
    return paths
