"""Where the Arrow sources' anonymous memory goes: glibc's heap, not the data. Resident memory of a
short training run from a Hugging Face `datasets` folder at two sizes, under glibc's default malloc
and under settings that change how it returns memory.

    OMP_NUM_THREADS=1 python benchmarks/arrow_memory.py       # 10K and 100K rows, ~8 min; results/arrow-memory-cpu.md

`benchmarks/data_startup.py` found the `datasets` and parquet sources' anonymous RSS growing with the
number of rows (about +80 to +160 MiB from 10K to 100K) while the same reads without training steps
stayed flat. Each run here is that benchmark's measurement (DiT-Nano/4 at 32 px, batch 64, 50 steps,
a fresh process) from the same `save_to_disk` folder, with the environment of its row:
  default     glibc as it comes (its mmap threshold rises after large blocks are freed, so later large
              buffers come from the heap, whose freed pages stay resident)
  system pool ARROW_DEFAULT_MEMORY_POOL=system: pyarrow allocates with malloc instead of mimalloc
  arena 1     MALLOC_ARENA_MAX=1: one malloc arena
  mmap 64K    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536: blocks of 64 KiB and more are
              mapped and unmapped on their own (the threshold no longer rises) and the heap is trimmed
A script, not a test: memory and speed depend on the machine, the allocator and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import data_startup as ds
from tables import write_results

SETTINGS = {"default": {}, "system pool": {"ARROW_DEFAULT_MEMORY_POOL": "system"},
            "arena 1": {"MALLOC_ARENA_MAX": "1"},
            "mmap 64K": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}}


def run(data: Path, environment: dict, steps: int, out: Path) -> dict:
    env = {**os.environ, "BENCH_T0": repr(time.time()), **environment}
    command = [sys.executable, ds.__file__, "--measure", json.dumps(ds.sources(data)["datasets (save_to_disk)"]),
               "--steps", str(steps), "--loader-batches", "20", "--run-dir", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in args.sizes:
            data = Path(scratch) / f"n{n}"
            ds.write_folder(data / "folder", n)
            ds.write_hf(data / "folder", data)
            for name, environment in SETTINGS.items():
                result = run(data, environment, args.steps, data / "runs" / name.replace(" ", "-"))
                rows.append({"setting": name, "rows": n, "anon_mib": result["anon_mib"], "rss_mib": result["rss_mib"],
                             "train_items_s": result["train_items_s"]})
                print(rows[-1], flush=True)
    sizes = args.sizes
    lines = [f"Training from a `datasets` save_to_disk folder: DiT-Nano/4 at 32 px, batch 64, {args.steps} steps, one "
             "process per row; resident memory after the last step (anonymous part, and all) and training items/s.",
             "", "| malloc setting | " + " | ".join(f"anon MiB at {n:,} rows" for n in sizes)
             + " | " + " | ".join(f"RSS MiB at {n:,} rows" for n in sizes)
             + " | " + " | ".join(f"items/s at {n:,} rows" for n in sizes) + " |",
             "|---|" + "---|" * (3 * len(sizes))]
    for name in SETTINGS:
        mine = {row["rows"]: row for row in rows if row["setting"] == name}
        cells = [f"{mine[n][key]:.0f}" for key in ("anon_mib", "rss_mib") for n in sizes] + \
            [f"{mine[n]['train_items_s']:.1f}" for n in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_results("\n".join(lines) + "\n", rows, args.out, "arrow-memory-cpu")


if __name__ == "__main__":
    main()
