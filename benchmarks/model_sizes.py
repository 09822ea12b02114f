"""The docs' model-size table: parameters and forward GFLOPs of the named models against their papers.

    python benchmarks/model_sizes.py            # writes benchmarks/results/model-sizes.md (seconds)

Every model is built and counted on the meta device (`ditkit.metrics.flops`, as `ditkit info` counts),
so DiT-XL/2 at 1024 px costs no memory. The paper columns are the published figures, typed here once
as references: the DiT paper (Peebles & Xie), the official U-DiT code's model table, and DiffuSSM's
paper (arXiv 2311.18257). "GFLOPs" in all three papers are multiply-adds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ditkit.diffusion.pipeline import input_size
from ditkit.metrics.flops import attention_line, model_cost, shapes_only_model

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (model, mixer or None for its default, px, paper parameters, paper GFLOPs)
    ("DiT-S/2", None, 256, "33M", "6.06"),
    ("DiT-B/2", None, 256, "130M", "23.01"),
    ("DiT-L/2", None, 256, "458M", "80.71"),
    ("DiT-XL/2", None, 256, "675M", "118.64"),
    ("DiT-XL/2", None, 512, "675M", ""),
    ("DiT-XL/2", None, 1024, "675M", ""),
    ("DiT-XL/2", "clear", 256, "", ""),
    ("DiT-XL/2", "clear", 512, "", ""),
    ("DiT-XL/2", "clear", 1024, "", ""),
    ("U-DiT-S", None, 256, "58.9M", "6.04"),
    ("U-DiT-B", None, 256, "231.3M", "22.22"),
    ("U-DiT-L", None, 256, "916.3M", "85.00"),
    ("U-DiT-S", None, 512, "58.9M", "32.9"),
    ("U-DiT-B", None, 512, "231.3M", "106.3"),
    ("U-DiT-L", None, 512, "916.3M", "374.3"),
    ("DiffuSSM-XL", None, 256, "673M", "280.3"),
    ("DiffuSSM-XL", None, 512, "673M", "1066.2"),
]
CLEAR_OPTIONS = {"radius": 8}


def row(name: str, mixer: str | None, px: int, paper_params: str, paper_gflops: str) -> str:
    model = shapes_only_model(name, mixer, CLEAR_OPTIONS if mixer == "clear" else None)
    h, w = input_size(model, px, px)
    cost = model_cost(model, h, w)
    work = attention_line(model, h, w)
    scored = work.split(" scores ")[1].split(" of ")[0] if work else ""
    label = model.config.mixer + (" r=8" if mixer == "clear" else "")
    return (f"| {name} | {label} | {px} | {model.config.tokens(h, w):,} | {paper_params} | "
            f"{cost.params / 1e6:.2f}M | {paper_gflops} | {cost.macs / 1e9:.2f} | {cost.flops / 1e9:.2f} | {scored} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model-sizes.md"))
    args = parser.parse_args()
    lines = ["# Model sizes: parameters and forward GFLOPs, ditkit's count against the papers", "",
             "Counted on the meta device by `ditkit.metrics.flops` (what `ditkit info` prints), one sample, "
             "attention and FFTs included. GMACs count a multiply-add once (the papers' \"GFLOPs\"); GFLOPs "
             "count it as 2. Pairs scored: the share of full attention's (query, key) image pairs a `clear` "
             "mixer computes. Regenerate with `python benchmarks/model_sizes.py`.", "",
             "| model | mixer | px | tokens | params (paper) | params (ditkit) | GFLOPs (paper) | GMACs (ditkit) "
             "| GFLOPs (ditkit) | pairs scored |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(*case) for case in CASES]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
