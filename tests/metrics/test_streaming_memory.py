"""The streaming pass over a samples folder holds one shard at a time: its peak memory at 2,000
samples is within 10% of that at 200 (benchmarks/eval_streaming.py measures it on a real model;
here random 96 px shards and a stand-in feature network keep it to seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ditkit.metrics.shards import FORMAT, KIND, shard_path, write_shard

SRC = Path(__file__).resolve().parents[2] / "src"
SIDE, SHARD = 96, 200  # all 2,000 images as float32 would be 221 MiB: far more than 10% of the process

# Runs in a fresh process: the high-water mark is reset when the pass starts, so it is the pass's own peak.
CHILD = """
import json, sys
from pathlib import Path
import torch
from ditkit.metrics.score import score_sample_folder

class MeanColour(torch.nn.Module):
    def forward(self, images):
        colours = images.float().mean(dim=(2, 3))
        return colours, colours[:, :2]

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

side = int(sys.argv[2])
reference = torch.randint(0, 256, (64, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
Path("/proc/self/clear_refs").write_text("5")
scores = score_sample_folder(sys.argv[1], reference, extractor=MeanColour(), batch_size=50, progress=False)
print(json.dumps({"peak_mib": status("VmHWM"), "num": scores.quality["num_generated"]}))
"""


def random_samples(folder: Path, num: int) -> Path:
    folder.mkdir()
    settings = {"num": num, "batch_size": 50, "shard_size": SHARD, "height": SIDE, "width": SIDE}
    (folder / "manifest.json").write_text(json.dumps({"kind": KIND, "format": FORMAT, "settings": settings}))
    rng = np.random.default_rng(0)
    for index in range(num // SHARD):
        write_shard(shard_path(folder, index), rng.integers(0, 256, (SHARD, SIDE, SIDE, 3), dtype=np.uint8), None)
    return folder


def streaming_peak_mib(folder: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(SIDE)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["num"] == int(folder.name)
    return measured["peak_mib"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc high-water mark")
def test_the_streaming_pass_peak_does_not_grow_with_the_sample_count(tmp_path):
    small, large = (streaming_peak_mib(random_samples(tmp_path / str(num), num)) for num in (200, 2000))
    assert large <= 1.1 * small, f"peak {large:.0f} MiB at 2,000 samples vs {small:.0f} MiB at 200"
