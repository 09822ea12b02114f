"""Evaluation at scale: sampling throughput and peak memory of `ditkit eval --sample-dir` (shards,
then a streaming pass) against the in-memory path, at two sample counts.

    OMP_NUM_THREADS=1 python benchmarks/eval_streaming.py               # tiny DiT, 64 px RGB, 200 and 2,000
    python benchmarks/eval_streaming.py --nums 1000 10000 --resolution 128 --device cuda

It trains a tiny DiT for two steps on the built-in `photos` (the weights do not matter here, only
the work), then measures, for each sample count N, each in a fresh process (peak RSS is a process's
high-water mark, so phases cannot share one):
  sample      `metrics.shards.sample_shards`: N samples into .npz shards
  stream      `metrics.score.score_sample_folder`: FID/KID/IS (ditkit-digits features) of the shards,
              read one shard at a time, against `--num-ref` photos
  in-memory   today's path for small runs: `sample_checkpoint` (every sample in one tensor), then
              `score_images`
and reports seconds, images per second, the phase's peak RSS (the high-water mark, reset when the
phase starts) and its rise above the RSS before the phase (after imports). Memory independent of N
shows as equal peaks at both counts. Writes eval-streaming-<device>.md and .csv to --out (Linux only:
it reads /proc/self/status). A script, not a test: numbers depend on the machine.
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

import torch

from ditkit.cli.main import main as ditkit
from ditkit.metrics.bench import device_name, write_csv
from ditkit.metrics.features import digits_features
from ditkit.metrics.quality import sample_checkpoint
from ditkit.metrics.score import score_images, score_sample_folder
from ditkit.metrics.shards import sample_shards
from ditkit.record import Sampling

PHASES = ("sample", "stream", "in-memory")


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now; VmHWM: resident high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/self/status: this benchmark needs Linux")


def reset_peak() -> None:
    """Start the high-water mark afresh from the resident memory now (Linux >= 4.0), so that it
    measures the phase alone; ru_maxrss cannot, as it keeps the parent's peak across fork and exec."""
    Path("/proc/self/clear_refs").write_text("5")


def run_phase(phase: str, args) -> dict:
    """One measurement, in this (fresh) process."""
    sampling = Sampling(num=args.num, steps=args.steps)
    scoring = dict(num_reference=args.num_ref, features_path=args.features_path, batch_size=args.batch_size,
                   device=args.device, progress=False)
    reset_peak()
    before = status_mib("VmRSS")
    began = time.perf_counter()
    if phase == "sample":
        sample_shards(args.ckpt, sampling, args.folder, batch_size=args.batch_size, shard_size=args.shard_size,
                      progress=False)
    elif phase == "stream":
        score_sample_folder(args.folder, "photos", **scoring)
    else:
        images, record = sample_checkpoint(args.ckpt, sampling, batch_size=args.batch_size, device=args.device,
                                           progress=False)
        score_images(images, "photos", record=record, **scoring)
    seconds = time.perf_counter() - began
    return {"samples": args.num, "path": phase, "seconds": round(seconds, 2),
            "images_per_s": round(args.num / seconds, 1) if phase != "stream" else "",
            "peak_rss_mib": round(status_mib("VmHWM")), "rise_mib": round(status_mib("VmHWM") - before)}


def measure(phase: str, args, num: int, folder: Path) -> dict:
    """`run_phase` in a fresh Python process; its row."""
    command = [sys.executable, __file__, "--child", phase, "--ckpt", str(args.ckpt), "--folder", str(folder),
               "--num", str(num), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--shard-size", str(args.shard_size), "--num-ref", str(args.num_ref), "--device", args.device,
               "--features-path", str(args.features_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{phase} at {num} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_checkpoint(folder: Path, resolution: int) -> Path:
    run = folder / "run"
    code = ditkit(["train", "digits", "data.source=photos", "model.name=DiT-Nano/4", "model.args.depth=1",
                   "model.args.hidden_size=32", "model.args.num_heads=2", f"data.resolution={resolution}",
                   "train.batch_size=4", "train.steps=2", "train.ckpt_every=2", "train.sample_every=1000",
                   f"train.out_dir={run}", "--no-progress"])
    if code:
        raise SystemExit("training the tiny checkpoint failed")
    return run


def table(rows: list[dict], args) -> str:
    lines = [f"Tiny DiT-Nano/4 (depth 1) at {args.resolution} px RGB, {args.steps} sampling steps, batch "
             f"{args.batch_size}, shards of {args.shard_size}; ditkit-digits features, {args.num_ref} reference "
             f"photos; {device_name(args.device)}; each phase a fresh process.", "",
             "| samples | path | seconds | images/s | peak RSS MiB | rise MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['samples']} | {r['path']} | {r['seconds']} | {r['images_per_s']} | {r['peak_rss_mib']} | "
              f"{r['rise_mib']} |" for r in rows]
    lines += ["", "sample: sampling into shards; stream: the statistics of the shards; in-memory: sampling into one "
              "tensor, then its statistics. Peak: the phase's high-water mark; rise: above the RSS before it."]
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nums", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--num-ref", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    for hidden in ("--ckpt", "--folder", "--features-path"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--num", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_phase(args.child, args)))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        args.ckpt = tiny_checkpoint(Path(tmp), args.resolution)
        args.features_path = Path(tmp) / "ditkit-digits.pt"
        digits_features(args.features_path, progress=False)  # trained once, not inside a measurement
        rows = [measure(phase, args, num, Path(tmp) / f"samples-{num}") for num in args.nums for phase in PHASES]
    name = f"eval-streaming-{'cpu' if args.device == 'cpu' else 'gpu'}"
    text = table(rows, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    write_csv(rows, out / f"{name}.csv")
    print(f"wrote {out / name}.md and .csv")


if __name__ == "__main__":
    main()
