"""A measured evaluation row on the CPU, in the papers' columns, for the built-in digits DiT: the
protocol a paper row states (samples, steps, guidance, sampler, spacing, reference, features), with
the numbers `ditkit eval` gives for them.

    OMP_NUM_THREADS=1 python benchmarks/eval_digits_row.py            # trains `ditkit train digits` first
    python benchmarks/eval_digits_row.py --ckpt runs/digits --num 1000

Without --ckpt it trains the built-in `digits` config (DiT-Nano/4, 1,500 steps: a few minutes on 2
CPU cores) into --work, or reuses the run already there. It then runs `ditkit eval` with the
offline `ditkit-digits` features (FID, KID, IS and legibility; sFID, precision and recall need the
Inception network, whose weights cannot be downloaded here, so they read n/a) and writes
eval-digits-<device>.md and .json to --out. A script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ditkit.checkpoint import find_checkpoint, list_checkpoints
from ditkit.cli.main import main as ditkit
from ditkit.metrics.bench import device_name
from ditkit.metrics.quality import format_row


def trained_digits(work: Path) -> Path:
    """The digits run in `work`: trained here unless a finished one is there already."""
    run = work / "digits"
    if not list_checkpoints(run / "checkpoints"):
        code = ditkit(["train", "digits", f"train.out_dir={run}", "--no-progress"])
        if code != 0:
            raise SystemExit(f"training the digits model failed (exit {code})")
    return run


def relative(item: str) -> str:
    """A path of the command line as seen from the working folder (the repository, when run as documented)."""
    return os.path.relpath(item) if os.path.isabs(item) else item


def report(result: dict, command: list[str], seconds: float, device: str) -> str:
    protocol = result["protocol"]
    lines = [f"# `ditkit eval` of the digits DiT on {device}", "",
             f"Checkpoint: `{result['source']}`; {protocol['samples']} samples at {protocol['resolution']}, "
             f"seed {protocol['seed']}, against {result['num_reference']} images of `{result['reference']}`; "
             f"sampling and scoring took {seconds:.0f} s.", "",
             "```", "ditkit " + " ".join(relative(item) for item in command), "```", "",
             format_row(result), "",
             f"KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f}; IS {result['is_mean']:.2f} ± "
             f"{result['is_std']:.2f}; legibility {100 * result['label_accuracy']:.1f}% (the share of samples "
             "the digits classifier reads as the class asked for).", "",
             "`ditkit-digits` features are ditkit's own offline network: its FID is a ditkit-only scale, not "
             "comparable with published numbers; sFID, precision and recall need the Inception network."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a digits run or checkpoint (default: train one in --work)")
    parser.add_argument("--work", default="runs/eval-digits-row", help="where the digits model is trained")
    parser.add_argument("--num", type=int, default=1000, help="samples (and reference images)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    ckpt = Path(args.ckpt) if args.ckpt else trained_digits(Path(args.work))
    find_checkpoint(ckpt)  # a clear error now, before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores = out / f"eval-digits-{args.device}.json"
    command = ["eval", "--ckpt", str(ckpt), "--ref", "digits", "--num", str(args.num), "--num-ref", str(args.num),
               "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(scores), "--no-progress"]
    began = time.perf_counter()
    if ditkit(command) != 0:
        raise SystemExit("ditkit eval failed")
    seconds = time.perf_counter() - began
    result = json.loads(scores.read_text())
    text = report(result, command, seconds, device_name(args.device))
    (out / f"eval-digits-{args.device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
