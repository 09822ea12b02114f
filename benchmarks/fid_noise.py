"""How far FID and legibility move with the sampling seed alone, at a study's sample count.

    python benchmarks/fid_noise.py --teacher RUN --student RUN --radius 4     # results/fid-noise-digits.md, .csv

A study evaluates every arm on the same noise and labels (sampling seed 0), so its seed spread is the
spread over training seeds at one draw of samples. This script scores the same checkpoints on other
draws: `ditkit eval` of the teacher, of the untrained student (the teacher with `clear:radius=R`
swapped in, nothing trained) and of the student, with 128 samples against 1,000 real digits
(`ditkit-digits` features, 10 sampling steps: the distillation study's settings), for each sampling
seed. The seed also draws the reference subset. A difference between arms smaller than these spreads
is not resolved by a 128-sample FID.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import write_results


def score(checkpoint: str, seed: int, args, mixer: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "scores.json"
        command = [sys.executable, "-m", "ditkit.cli.main", "eval", "--ckpt", checkpoint, "--ref", "digits",
                   "-n", str(args.num), "--num-ref", str(args.num_ref), "--steps", str(args.steps),
                   "--features", "ditkit-digits", "--seed", str(seed), "--batch-size", "64", "--device", "cpu",
                   "--no-progress", "--out", str(out)] + (["--mixer", mixer] if mixer else [])
        subprocess.run(command, check=True, capture_output=True)
        scores = json.loads(out.read_text())
    return {"fid": scores["fid"], "legibility": 100 * scores["label_accuracy"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the teacher's run folder")
    parser.add_argument("--student", required=True, help="a student's run folder (ditkit distill)")
    parser.add_argument("--radius", type=float, default=4, help="the student's radius (for the untrained student)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--num", type=int, default=128)
    parser.add_argument("--num-ref", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    arms = [("teacher", args.teacher, None), ("untrained student", args.teacher, f"clear:radius={args.radius:g}"),
            ("student", args.student, None)]
    rows, lines = [], [f"FID and legibility of one checkpoint per arm over sampling seeds {args.seeds} ({args.num} "
                       f"samples, {args.num_ref} real digits, ditkit-digits features, {args.steps} steps).", "",
                       "| arm | " + " | ".join(f"FID seed {s}" for s in args.seeds)
                       + " | FID mean | FID std | FID max - min | legibility % mean | legibility % min |",
                       "|---|" + "---|" * (len(args.seeds) + 5)]
    for label, checkpoint, mixer in arms:
        scores = [score(checkpoint, seed, args, mixer) for seed in args.seeds]
        fids, legible = [s["fid"] for s in scores], [s["legibility"] for s in scores]
        rows += [{"arm": label, "seed": seed, **s} for seed, s in zip(args.seeds, scores, strict=True)]
        lines.append(f"| {label} | " + " | ".join(f"{f:.2f}" for f in fids)
                     + f" | {statistics.mean(fids):.2f} | {statistics.stdev(fids):.2f} | {max(fids) - min(fids):.2f} "
                     f"| {statistics.mean(legible):.1f} | {min(legible):.1f} |")
        print(lines[-1], flush=True)
    write_results("\n".join(lines) + "\n", rows, args.out, "fid-noise-digits")


if __name__ == "__main__":
    main()
