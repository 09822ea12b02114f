"""Run by tests/parallel/test_patch.py under torchrun (2 processes, gloo): each case builds the same
random DiT on every process and compares its patch-parallel forward with the single-process one.
Rank 0 writes {case: {"max_diff", "scale", "halo_bytes", "allgather_bytes"}} as JSON to argv[1]."""

import sys
from pathlib import Path

import torch

from ditkit.distributed import STATS, PatchParallelDiT
from ditkit.mixers import register_mixer
from ditkit.models import build_model, model_config
from ditkit.models.extrapolation import set_extrapolation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest's pythonpath has it
from worker_cases import run_cases  # noqa: E402  (this script's folder, first on sys.path)

from mixers import windowed_mixer  # noqa: E402  (test-windowed: a mixer in one file)

register_mixer(windowed_mixer.NAME)(windowed_mixer.WindowedAttention)  # this worker process's own registry

CASES = {  # name: (mixer, options, token grid, batch)
    "clear": ("clear", {"radius": 2}, (8, 8), 2),
    "clear-pooled": ("clear", {"radius": 3, "down_factor": 2}, (8, 6), 2),
    "clear-pooled-odd-strips": ("clear", {"radius": 2, "down_factor": 2}, (6, 4), 1),
    "clear-radius-beyond-strip": ("clear", {"radius": 6}, (7, 4), 1),
    "clear-tiled-backend": ("clear", {"radius": 3, "backend": "tiled"}, (9, 5), 1),
    "full-unequal-strips": ("full", {}, (7, 5), 3),
    "downsampled-fallback": ("downsampled", {}, (6, 6), 1),
    "clear-beyond-training-size": ("clear", {"radius": 2}, (8, 6), 1),  # attention scale + ntk positions
    "full-beyond-training-size": ("full", {}, (7, 5), 1),
    "new-mixer-default-path": ("test-windowed", {}, (8, 6), 2),
    "new-mixer-beyond-training-size": ("test-windowed", {}, (6, 4), 1),
}


def random_model(mixer, options):
    torch.manual_seed(0)  # the same weights on every process
    config = model_config("DiT-Nano/4", depth=2, hidden_size=32, num_heads=2, in_channels=1, num_classes=10,
                          mixer=mixer, mixer_options=options)
    model = build_model(config).eval()
    with torch.no_grad():  # DiT's init zeroes adaLN and the output: randomise everything instead
        for param in model.parameters():
            param.normal_(0, 0.1)
    return model


def run_case(name, mixer, options, grid, batch):
    model = random_model(mixer, options)
    x = torch.randn(batch, 1, grid[0] * 4, grid[1] * 4)
    if name.endswith("beyond-training-size"):  # as if trained at half the size
        set_extrapolation(model, x.shape[-2:], (grid[0] * 2, grid[1] * 2), attention_scale=True, positions="ntk")
    t, y = torch.rand(batch) * 1000, torch.arange(batch) % 10
    with torch.no_grad():
        single = model(x, t, y)
        result = {}
        for exchange in ("allgather", "halo"):
            STATS.reset()
            parallel = PatchParallelDiT(model, kv_exchange=exchange)(x, t, y)
            result[f"{exchange}_bytes"] = STATS.received
            result[f"{exchange}_diff"] = (parallel - single).abs().max().item()
    result["scale"] = single.abs().max().item()
    result["max_diff"] = max(result.pop("allgather_diff"), result.pop("halo_diff"))
    return result


if __name__ == "__main__":
    run_cases(CASES, run_case)
