"""Helpers shared by the benchmark scripts: markdown rows of the step-cost benchmarks (upscale.py,
flux.py), writing a table with its CSV, and CPU timing."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ditkit.metrics.bench import write_csv

STEP_COLUMNS = "| s/step | peak MiB | largest tensor MiB | one N x N fp32 MiB |"


def step_row(label: str, px: int, row: dict, ratio: str = "") -> str:
    """One measured size: time per step, peak memory, largest tensor and the N x N matrix it avoids;
    a size that was not measured shows its status (e.g. skipped) instead."""
    head = f"| {label} | {px} | {row['tokens']} |"
    if row["status"] != "ok":
        return f"{head} {row['status']} | | | | |"
    return (f"{head} {row['step_s']:.3f} | {row['peak_mib']:.0f} | {row['largest_mib']:.1f} | "
            f"{row['nxn_fp32_mib']:.0f} | {ratio} |")


def write_results(table: str, rows: list[dict], folder: str | Path, name: str) -> None:
    """Print the table and keep it, with every row as CSV, as folder/name.md and .csv."""
    print(table)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    write_csv(rows, out / f"{name}.csv")
    print(f"wrote {out / name}.md and .csv")


def cpu_seconds(fn, repeats: int) -> float:
    """Median CPU seconds (this process's work, steadier than wall time on shared cores) of `repeats`
    calls after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)
