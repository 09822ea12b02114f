"""Local attention of one patch-parallel strip: queries from the whole region vs its own rows only.

    python benchmarks/strip_attention.py            # tiled backend, CPU, one thread

A strip attends over its region (its rows plus `halo(r)` rows from each neighbour). Attending from
every region row, zero queries on the neighbours' rows and their outputs dropped, is what strips did
before `local_attention(query_rows=...)`; with `query_rows` only the strip's own rows are queries.
For each case it times both calls on the middle strip (the one with the most halo rows), batch 1,
4 heads of 64 and 64 text tokens as the FLUX transformer of `distributed.py --flux`, and checks that the
own rows agree. Narrow grids stand for wide ones: the saving depends on the rows, not the columns.
A script, not a test: numbers depend on the machine and its load; the CPU time (this process's
work) is steadier than the wall time on shared cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tables import cpu_seconds

from ditkit.distributed import strip_bounds
from ditkit.metrics.bench import write_csv
from ditkit.mixers.clear import halo, local_attention
from ditkit.mixers.strip import rows_needed

CASES = [  # (label, token grid, radius, strips)
    ("FLUX 1024 px, 2 strips", (64, 64), 8, 2),
    ("FLUX 2048 px, 2 strips", (128, 128), 8, 2),
    ("FLUX 2048 px, 8 strips", (128, 128), 8, 8),
    ("FLUX 8K rows (512 x 64), 8 strips, r=16", (512, 64), 16, 8),
]
HEADS, HEAD_DIM, TEXT = 4, 64, 64


def measure(label: str, grid: tuple[int, int], radius: float, strips: int, repeats: int) -> dict:
    H, W = grid
    bounds = strip_bounds(H, strips)
    rank = strips // 2
    first, last = rows_needed(bounds, rank, halo(radius, grid))
    own = (bounds[rank][0] - first, bounds[rank][1] - first)
    region = (last - first, W)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, HEADS, TEXT + region[0] * W, HEAD_DIM, generator=g) for _ in range(2))
    q = torch.randn(1, HEADS, TEXT + (own[1] - own[0]) * W, HEAD_DIM, generator=g)
    own_tokens = slice(TEXT + own[0] * W, TEXT + own[1] * W)
    q_region = torch.zeros_like(k)  # the neighbours' rows as zero queries
    q_region[..., :TEXT, :], q_region[..., own_tokens, :] = q[..., :TEXT, :], q[..., TEXT:, :]

    def region_queries():
        return local_attention(q_region, k, v, region, radius, TEXT, backend="tiled")

    def own_queries():
        return local_attention(q, k, v, region, radius, TEXT, backend="tiled", query_rows=own)

    with torch.no_grad():
        diff = (region_queries()[..., own_tokens, :] - own_queries()[..., TEXT:, :]).abs().max().item()
        before, after = cpu_seconds(region_queries, repeats), cpu_seconds(own_queries, repeats)
    return {"case": label, "grid": f"{H}x{W}", "radius": radius, "strips": strips,
            "own_rows": own[1] - own[0], "region_rows": region[0], "cpu_s_region_queries": round(before, 4),
            "cpu_s_own_queries": round(after, 4), "speedup": round(before / after, 2), "max_abs_diff": diff}


def markdown(rows: list[dict], repeats: int) -> str:
    lines = [f"Local attention of the middle strip, tiled backend, CPU, 1 thread, float32, batch 1, {HEADS} heads "
             f"x {HEAD_DIM}, {TEXT} text tokens; median CPU seconds of {repeats} calls after a warm-up", "",
             "| case | token grid | r | strips | own rows | region rows | CPU s, region queries "
             "| CPU s, own rows (query_rows) | speedup | max abs diff |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['case']} | {r['grid']} | {r['radius']:g} | {r['strips']} | {r['own_rows']} "
                     f"| {r['region_rows']} | {r['cpu_s_region_queries']:.3f} | {r['cpu_s_own_queries']:.3f} "
                     f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(*case, args.repeats) for case in CASES]
    text = markdown(rows, args.repeats)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strip-attention-cpu.md").write_text(text + "\n")
    write_csv(rows, args.out / "strip-attention-cpu.csv")


if __name__ == "__main__":
    main()
