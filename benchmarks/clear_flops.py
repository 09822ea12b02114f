"""The attention-FLOPs saving `ditkit generate` prints, for FLUX.1-dev and CLEAR's five released files.

    python benchmarks/clear_flops.py        # writes benchmarks/results/clear-attention-flops.md and .csv

Builds FluxTransformer2DModel with FLUX.1-dev's configuration on the meta device (no weights, no
download) and, for each official file (`clear_local_32` ... `clear_local_8_down_4`: radius and down
factor read from the name as `ditkit generate --student FILE` reads them) at 1024..8192 px, counts one
transformer call's attention FLOPs, full and CLEAR, with `ditkit.diffusers.attention_cost`, the function
generate uses; 512 text tokens (FluxPipeline's T5 length). The last column is generate's own line.
A count, not a measurement: the same on every machine.
"""

from __future__ import annotations

import argparse

import torch
from flux import FLUX_DEV, PX_PER_TOKEN, TEXT_TOKENS
from tables import write_results

from ditkit.diffusers.attention_cost import attention_cost, describe
from ditkit.diffusers.official_clear import settings_from_name

OFFICIAL_FILES = ("clear_local_32", "clear_local_16", "clear_local_8", "clear_local_16_down_4",
                  "clear_local_8_down_4")


def flux_dev_on_meta():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV)


def rows(sizes: list[int]) -> list[dict]:
    transformer = flux_dev_on_meta()
    table = []
    for px in sizes:
        grid = (px // PX_PER_TOKEN, px // PX_PER_TOKEN)
        for name in OFFICIAL_FILES:
            settings = settings_from_name(f"{name}.safetensors")
            radius, down = settings["radius"], settings["down_factor"]
            cost = attention_cost(transformer, grid, TEXT_TOKENS, radius, down)
            table.append({"px": px, "file": f"{name}.safetensors", "radius": radius, "down_factor": down,
                          "full_tflops": cost.full / 1e12, "clear_tflops": cost.clear / 1e12,
                          "share_pct": 100 * cost.fraction, "times_fewer": cost.factor,
                          "line": describe(cost, radius, down, px, px)})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["# CLEAR's released FLUX.1-dev files: attention FLOPs per transformer call", "",
             "FluxTransformer2DModel with FLUX.1-dev's configuration (19 double + 38 single blocks, 24 heads x 128) "
             f"on the meta device; {TEXT_TOKENS} text tokens, one image (batch 1), a multiply-add = 2 FLOPs; "
             "attention only (the projections and MLPs cost the same both ways). Counted by "
             "`ditkit.diffusers.attention_cost`, the count `ditkit generate` prints (last column). Written by "
             "benchmarks/clear_flops.py.", "",
             "| px | official file | full attention TFLOPs | CLEAR TFLOPs | share of full | x fewer | "
             "ditkit generate prints |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['px']} | {r['file']} | {r['full_tflops']:.1f} | {r['clear_tflops']:.1f} | "
                     f"{r['share_pct']:.1f}% | {r['times_fewer']:.1f} | {r['line']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="clear-attention-flops")
    args = parser.parse_args()
    table = rows(args.sizes)
    write_results(markdown(table), table, args.out, args.name)


if __name__ == "__main__":
    main()
