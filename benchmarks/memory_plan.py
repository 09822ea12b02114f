"""The README's memory-planning tables: `ditkit info --train-memory` for DiT-XL/2 and FLUX.1-dev.

    python benchmarks/memory_plan.py            # writes benchmarks/results/memory-plan.md

Each case is the command shown above its table; everything runs on the meta device (seconds, no
weights, no GPU). FLUX.1-dev's transformer configuration is configs/flux1-dev-transformer.json.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ditkit.study.memory_plan import format_plan, load_subject, plan_memory

ROOT = Path(__file__).resolve().parents[1]
FLUX = "configs/flux1-dev-transformer.json"
CASES = [  # (model, resolution, regime, precision)
    ("DiT-XL/2", 256, "train", "fp32"),
    ("DiT-XL/2", 256, "train", "bf16"),
    (FLUX, 1024, "distill", "fp32"),
    (FLUX, 1024, "distill", "bf16"),
    (FLUX, 1024, "train", "bf16"),
]
PROCESSES = [1, 8, 64]


def command(model: str, resolution: int, regime: str, precision: str) -> str:
    return (f"ditkit info {shlex.quote(model)} --train-memory --resolution {resolution} --regime {regime} "
            f"--precision {precision} --processes {' '.join(map(str, PROCESSES))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory-plan.md"))
    args = parser.parse_args()
    sections = ["# Memory plans (`ditkit info --train-memory`)", "",
                "Computed on the meta device by `ditkit.study.memory_plan` (see its docstring and the README's "
                "'Planning memory'); regenerate with `python benchmarks/memory_plan.py`.", ""]
    for model, resolution, regime, precision in CASES:
        plan = plan_memory(load_subject(str(ROOT / model) if model == FLUX else model), resolution, resolution,
                           PROCESSES, regime, precision)
        table = format_plan(plan).replace(str(ROOT) + "/", "")
        print(f"$ {command(model, resolution, regime, precision)}\n{table}\n")
        sections += ["```", f"$ {command(model, resolution, regime, precision)}", table, "```", ""]
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
