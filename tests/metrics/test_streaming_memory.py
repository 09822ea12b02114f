"""The streaming pass over a samples folder holds one shard at a time: its peak memory at 2,000
samples is within 10% of that at 200 (benchmarks/eval_streaming.py measures it on a real model; here
random 96 px shards and a stand-in feature network keep it short).

The passes run in a fresh process: the heap of a long-lived one (this test session) hides the growth
that glibc's handling of per-batch temporaries causes without `streaming.release_free_memory`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditkit.metrics.score import score_sample_folder
from ditkit.metrics.shards import FORMAT, KIND, shard_path, write_shard

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
SIDE, SHARD = 96, 200  # all 2,000 images as uint8 are 53 MiB, as float32 211 MiB
HIGH_WATER = Path("/proc/self/clear_refs")


class MeanColour(torch.nn.Module):
    """A stand-in feature network: the mean colour (3 features) and two of its channels as logits."""

    def forward(self, images):
        colours = images.float().mean(dim=(2, 3))
        return colours, colours[:, :2]


def random_samples(folder: Path, num: int) -> Path:
    folder.mkdir()
    settings = {"num": num, "batch_size": 50, "shard_size": SHARD, "height": SIDE, "width": SIDE}
    (folder / "manifest.json").write_text(json.dumps({"kind": KIND, "format": FORMAT, "settings": settings}))
    rng = np.random.default_rng(num)
    for index in range(-(-num // SHARD)):
        count = min(SHARD, num - index * SHARD)
        write_shard(shard_path(folder, index), rng.integers(0, 256, (count, SIDE, SIDE, 3), dtype=np.uint8), None)
    return folder


def status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def pass_memory(folder: Path, reference: torch.Tensor) -> tuple[float, float]:
    """(peak, rise above the start) of one streaming pass, in MiB: the high-water mark is reset first."""
    HIGH_WATER.write_text("5")
    before = status_mib("VmRSS")
    scores = score_sample_folder(folder, reference, extractor=MeanColour(), batch_size=50, progress=False)
    assert scores.quality["num_generated"] == int(folder.name)
    return status_mib("VmHWM"), status_mib("VmHWM") - before


def measure(folders: list[Path]) -> list[tuple[float, float]]:
    """`pass_memory` of each folder in turn, in one fresh process, after a first pass over the first
    (first-use allocations: lazy imports, torchmetrics' set-up)."""
    child = ("import json, sys, torch; from pathlib import Path; from test_streaming_memory import SIDE, pass_memory; "
             "reference = torch.randint(0, 256, (64, 3, SIDE, SIDE), dtype=torch.uint8); folders = sys.argv[1:]; "
             "pass_memory(Path(folders[0]), reference); "
             "print(json.dumps([pass_memory(Path(f), reference) for f in folders[1:]]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    result = subprocess.run([sys.executable, "-c", child, *map(str, folders)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HIGH_WATER.exists(), reason="needs Linux's resettable high-water mark")
def test_the_streaming_pass_peak_does_not_grow_with_the_sample_count(tmp_path):
    folders = [random_samples(tmp_path / str(num), num) for num in (50, 200, 2000)]
    (small_peak, small_rise), (large_peak, large_rise) = measure(folders)
    assert large_peak <= 1.1 * small_peak, f"peak {large_peak:.0f} MiB at 2,000 samples vs {small_peak:.0f} at 200"
    assert large_rise <= small_rise + 20, f"rise {large_rise:.0f} MiB at 2,000 samples vs {small_rise:.0f} at 200"
