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
import os
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ditkit.checkpoint import tensor_checksums

ROOT = Path(__file__).resolve().parents[1]
HASHES = {
    "crc32 (zlib)": lambda data: zlib.crc32(data),
    "adler32 (zlib)": lambda data: zlib.adler32(data),
    "blake2b-128": lambda data: hashlib.blake2b(data, digest_size=16).digest(),
    "sha1": lambda data: hashlib.sha1(data).digest(),
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "md5": lambda data: hashlib.md5(data).digest(),
}


def fastest(repeats: int, works: dict[str, object]) -> dict[str, float]:
    """{name: the fastest of `repeats` timed runs of works[name]()}. The runs are interleaved (each
    round times every work once), so a busy spell on a shared machine slows all of them alike, and the
    minimum keeps the least disturbed run."""
    best = dict.fromkeys(works, float("inf"))
    for _ in range(repeats):
        for name, work in works.items():
            start = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(megabytes: int, repeats: int) -> list[tuple[str, float]]:
    """(what, seconds per GB) for loading a `megabytes` safetensors file of 16 tensors, then each hash,
    then CRC-32 over the tensors on as many threads as ditkit uses (`checkpoint.tensor_checksums`)."""
    torch.manual_seed(0)
    tensors = {f"block.{i}.weight": torch.randn(megabytes * 2**20 // 4 // 16) for i in range(16)}
    gigabytes = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_file(tensors, path)
        load_file(path)  # into the page cache
        targets = {name: torch.empty_like(t) for name, t in tensors.items()}

        def load_into_model():  # safetensors maps the file: the bytes are read when copied into the weights
            for name, tensor in load_file(path).items():
                targets[name].copy_(tensor)

        works = {"load (safetensors from the page cache, copied into the weights)": load_into_model}
        works.update({name: lambda digest=digest: [digest(v) for v in views] for name, digest in HASHES.items()})
        threads = min(8, os.cpu_count() or 1)
        works[f"crc32 on {threads} threads (ditkit's check)"] = lambda: tensor_checksums(tensors)
        seconds = fastest(repeats, works)
    return [(name, value / gigabytes) for name, value in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checksum-cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.megabytes, args.repeats)
    lines = [f"Hashing a checkpoint's tensors against loading them: {args.megabytes} MB of float32 in 16 tensors, "
             f"one CPU thread (but the last row), best of {args.repeats} (`benchmarks/checksum_cost.py`).", "",
             "| what | seconds per GB | seconds for a 12B model in bf16 (24 GB) |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.3f} | {seconds * 24:.1f} |" for name, seconds in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
