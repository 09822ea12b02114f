"""What verifying a checkpoint's tensors costs: seconds per GB to hash the raw bytes with each hash
the standard library offers, against seconds per GB to load the same safetensors file.

    OMP_NUM_THREADS=1 python benchmarks/checksum_cost.py   # writes benchmarks/results/checksum-cpu.md

The file is read once before timing, so loading is timed from the page cache (the fastest a load can
be, the case where hashing weighs most); one thread, as a loader on a busy machine gets. A 12B model
in bf16 is 24 GB: multiply the seconds per GB by 24 for what a check adds to its load.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
HASHES = {
    "crc32 (zlib)": lambda data: zlib.crc32(data),
    "adler32 (zlib)": lambda data: zlib.adler32(data),
    "blake2b-128": lambda data: hashlib.blake2b(data, digest_size=16).digest(),
    "sha1": lambda data: hashlib.sha1(data).digest(),
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "md5": lambda data: hashlib.md5(data).digest(),
}


def best_of(repeats: int, work) -> float:
    """The fastest of `repeats` timed runs of `work()` (the least disturbed by the shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(megabytes: int, repeats: int) -> list[tuple[str, float]]:
    """(what, seconds per GB) for loading a `megabytes` safetensors file of 16 tensors, then each hash."""
    torch.manual_seed(0)
    tensors = {f"block.{i}.weight": torch.randn(megabytes * 2**20 // 4 // 16) for i in range(16)}
    gigabytes = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_file(tensors, path)
        load_file(path)  # into the page cache
        targets = {name: torch.empty_like(t) for name, t in tensors.items()}

        def load_into_model():  # safetensors maps the file: the bytes are read when copied into the weights
            for name, tensor in load_file(path).items():
                targets[name].copy_(tensor)

        rows = [("load (safetensors from the page cache, copied into the weights)",
                 best_of(repeats, load_into_model) / gigabytes)]
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values()]
    for name, digest in HASHES.items():
        rows.append((name, best_of(repeats, lambda digest=digest: [digest(v) for v in views]) / gigabytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checksum-cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.megabytes, args.repeats)
    lines = [f"Hashing a checkpoint's tensors against loading them: {args.megabytes} MB of float32 in 16 tensors, "
             f"one CPU thread, best of {args.repeats} (`benchmarks/checksum_cost.py`).", "",
             "| what | seconds per GB | seconds for a 12B model in bf16 (24 GB) |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.3f} | {seconds * 24:.1f} |" for name, seconds in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
