"""Run by tests/parallel/test_diffusers_patch.py under torchrun (2 processes, gloo): each case builds the
same tiny random diffusers transformer with CLEAR on every process and compares its patch-parallel
forward (halo and all-gather exchanges) with the single-process one. Rank 0 writes
{case: {"max_diff", "scale", "local_change", "halo_bytes", "allgather_bytes"}} as JSON to argv[1]."""

import sys
from pathlib import Path

import torch

from ditkit.diffusers.clear import apply_clear
from ditkit.diffusers.patch_parallel import patch_parallel
from ditkit.diffusers.size_options import set_size_options
from ditkit.distributed import STATS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest's pythonpath has it
from worker_cases import run_cases  # noqa: E402  (this script's folder, first on sys.path)

from tiny_diffusers import flux_ids, run, tiny_flux, tiny_pixart, tiny_sd3  # noqa: E402

CASES = {  # name: (model, CLEAR options, token grid)
    "flux": ("flux", {"radius": 2}, (8, 6)),
    "flux-pooled": ("flux", {"radius": 3, "down_factor": 2}, (8, 6)),
    "flux-strips-shorter-than-halo": ("flux", {"radius": 5}, (5, 4)),  # halo 4, strips of 3 and 2 rows
    "sd3": ("sd3", {"radius": 2}, (8, 6)),  # its last block is context_pre_only
    "sd3-interpolated-positions": ("sd3", {"radius": 2}, (9, 6)),  # + attention scale, as if trained at 4 x 3
    "pixart": ("pixart", {"radius": 2}, (7, 6)),
    "pixart-pooled": ("pixart", {"radius": 2, "down_factor": 2}, (8, 4)),
}


def model_and_inputs(kind, grid):
    torch.manual_seed(0)  # the same weights and inputs on every process
    model, inputs, _ = {"flux": tiny_flux, "sd3": tiny_sd3, "pixart": tiny_pixart}[kind]()
    if kind == "flux":
        inputs.update(hidden_states=torch.randn(2, grid[0] * grid[1], 4), img_ids=flux_ids(grid))
    else:
        inputs["hidden_states"] = torch.randn(2, 4, 2 * grid[0], 2 * grid[1])
    return model.eval(), inputs


def run_case(name, kind, options, grid):
    model, inputs = model_and_inputs(kind, grid)
    if name.endswith("interpolated-positions"):
        set_size_options(model, train_grid=(4, 3), attention_scale=True, positions="interpolate")
    stock = run(model, inputs)
    apply_clear(model, **options)
    single = run(model, inputs)
    result = {"scale": single.abs().max().item(), "local_change": (single - stock).abs().max().item()}
    diffs = []
    for exchange in ("allgather", "halo"):
        STATS.reset()
        with patch_parallel(model, kv_exchange=exchange):
            parallel = run(model, inputs)
        result[f"{exchange}_bytes"] = STATS.received
        diffs.append((parallel - single).abs().max().item())
    result["max_diff"] = max(diffs)
    return result


if __name__ == "__main__":
    run_cases(CASES, run_case)
