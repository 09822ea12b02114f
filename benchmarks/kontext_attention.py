"""CLEAR with a Kontext context image: attention over both images' tokens, full vs CLEAR on the plane.

    python benchmarks/kontext_attention.py --threads 1   # writes results/kontext-attention-cpu.md and .csv

FluxKontextPipeline puts the context image's tokens after the generated image's, both on one position
plane (`ditkit.mixers.positions`). For each size it times one attention call (batch 1, 4 heads of 64,
512 text tokens, the context as large as the generated image, r = 8, no pooling) three ways: full
attention over text + both images (what stock Kontext computes), CLEAR's tiled positions backend over
both images (its work list cached per image layout, as in sampling: the warm-up call builds it), and
CLEAR's grid backend over the generated image alone (what FLUX without a context costs with CLEAR),
and checks the positions backend against the dense definition where that fits.
A script, not a test: CPU seconds of this process, medians of `--repeats` calls after a warm-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tables import cpu_seconds, write_results

from ditkit.mixers.clear import local_attention
from ditkit.mixers.positions import grids_positions, positions_local_attention

HEADS, HEAD_DIM, TEXT, RADIUS = 4, 64, 512, 8
PX_PER_TOKEN = 16  # FLUX: VAE /8, 2x2 packing


def plane(side: int) -> tuple:
    """The generated image, then the context at the same positions, as the CLEAR processors pass them."""
    grids = ((0, 0, side, side), (0, 0, side, side))
    return grids_positions(grids), grids


def measure(px: int, repeats: int) -> dict:
    side = px // PX_PER_TOKEN
    positions, grids = plane(side)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, TEXT + len(positions), HEAD_DIM, generator=g) for _ in range(3))
    single = TEXT + side * side
    with torch.no_grad():
        full = cpu_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats)
        clear = cpu_seconds(lambda: positions_local_attention(q, k, v, positions, RADIUS, TEXT, backend="tiled",
                                                              grids=grids), repeats)
        alone = cpu_seconds(lambda: local_attention(q[..., :single, :], k[..., :single, :], v[..., :single, :],
                                                    (side, side), RADIUS, TEXT, backend="tiled"), repeats)
        error = float("nan")
        if len(positions) <= 4096:
            tiled = positions_local_attention(q, k, v, positions, RADIUS, TEXT, backend="tiled")
            dense = positions_local_attention(q, k, v, positions, RADIUS, TEXT, backend="reference")
            error = float((tiled - dense).abs().max())
    return {"px": px, "image_tokens": len(positions), "full_s": full, "clear_s": clear, "one_image_clear_s": alone,
            "speedup": full / clear, "max_abs_diff_vs_dense": error}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(px, args.repeats) for px in args.sizes]
    lines = [f"CLEAR r={RADIUS} with a Kontext context image as large as the generated one: one attention call, "
             f"batch 1, {HEADS} heads of {HEAD_DIM}, {TEXT} text tokens, CPU seconds ({args.threads} thread(s), "
             f"median of {args.repeats}).", "",
             "| px | image tokens (both images) | full attention s | CLEAR on the plane s | full / CLEAR "
             "| CLEAR, generated image alone s | max abs diff vs dense |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        diff = "-" if row["max_abs_diff_vs_dense"] != row["max_abs_diff_vs_dense"] else \
            f"{row['max_abs_diff_vs_dense']:.1e}"
        lines.append(f"| {row['px']} | {row['image_tokens']} | {row['full_s']:.3f} | {row['clear_s']:.3f} | "
                     f"{row['speedup']:.1f}x | {row['one_image_clear_s']:.3f} | {diff} |")
    write_results("\n".join(lines) + "\n", rows, args.out, "kontext-attention-cpu")


if __name__ == "__main__":
    main()
