"""Patch-parallel sampling: strips, the halo plan, and 2-process (gloo, torchrun) equality with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditkit import DitkitError
from ditkit.cli.main import main
from ditkit.distributed import PatchParallelDiT, halo_plan, rows_needed, strip_bounds
from ditkit.models import build_model, model_config
from ditkit.train import load_config
from ditkit.train.trainer import Trainer
from helpers import tiny_run

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def torchrun(*args, timeout=120):
    """Two processes on this machine; --standalone picks a free port (tests may run side by side)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_strips_follow_tensor_split_and_cover_the_grid():
    for rows, parts in [(8, 2), (7, 2), (10, 4), (5, 5)]:
        expected = [len(chunk) for chunk in torch.tensor_split(torch.arange(rows), parts)]
        bounds = strip_bounds(rows, parts)
        assert [stop - start for start, stop in bounds] == expected
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    with pytest.raises(DitkitError, match="3 rows, fewer than the 4 processes"):
        strip_bounds(3, 4)


def test_a_strip_shorter_than_the_halo_reads_from_several_neighbours():
    bounds = strip_bounds(10, 4)  # heights 3, 3, 2, 2
    receives, sends = halo_plan(bounds, rank=1, halo=4)
    assert rows_needed(bounds, 1, 4) == (0, 10)
    assert receives == [(0, 0, 3), (2, 6, 8), (3, 8, 10)]
    assert sends == [(0, 3, 6), (2, 3, 6), (3, 4, 6)]  # rank 3 needs rows 4.. (its first row 8 minus 4)
    for rank in range(4):  # every receive is some peer's send
        for peer, lo, hi in halo_plan(bounds, rank, 4)[0]:
            assert (rank, lo, hi) in halo_plan(bounds, peer, 4)[1]


def random_model(backbone_name="DiT-Nano/4", **fields):
    model = build_model(model_config(backbone_name, **fields)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    return model


def test_one_process_is_one_strip_and_the_plain_forward(one_thread):
    model = random_model(depth=1, hidden_size=32, num_heads=2, in_channels=1, num_classes=10, mixer="clear",
                         mixer_options={"radius": 2, "down_factor": 2})
    x, t, y = torch.randn(2, 1, 24, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(PatchParallelDiT(model)(x, t, y), model(x, t, y), atol=1e-6, rtol=0)


def test_udit_refuses_with_the_fix():
    with torch.device("meta"):
        udit = build_model(model_config("U-DiT-S"))
    with pytest.raises(DitkitError, match="supports DiT models, not udit.*--parallel none"):
        PatchParallelDiT(udit)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "results.json"
    torchrun(str(HERE / "patch_worker.py"), str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["clear", "clear-pooled", "clear-pooled-odd-strips", "clear-radius-beyond-strip",
                                  "clear-tiled-backend", "full-unequal-strips", "downsampled-fallback",
                                  "clear-beyond-training-size", "full-beyond-training-size"])
def test_two_processes_equal_one_process(two_process_results, case):
    result = two_process_results[case]
    assert result["max_diff"] < 1e-5 and result["scale"] > 0.5  # outputs of size ~1, equal within fp32 noise


def test_the_halo_moves_fewer_bytes_than_an_all_gather(two_process_results):
    for case in ("clear", "clear-pooled", "clear-tiled-backend"):
        assert two_process_results[case]["halo_bytes"] < two_process_results[case]["allgather_bytes"]
    # a halo reaching past the neighbour's strip reads all of it: no saving, still exact
    beyond = two_process_results["clear-radius-beyond-strip"]
    assert beyond["halo_bytes"] == beyond["allgather_bytes"]


@pytest.mark.parametrize("case", ["new-mixer-default-path", "new-mixer-beyond-training-size"])
def test_a_mixer_registered_in_one_file_runs_exactly_on_strips(two_process_results, case):
    """tests/mixers/windowed_mixer.py defines no strip execution: the default hook gathers the grid."""
    result = two_process_results[case]
    assert result["max_diff"] < 1e-5 and result["scale"] > 0.5
    assert result["halo_bytes"] == result["allgather_bytes"] > 0  # the default path has no halo to exploit


def random_checkpoint(tmp_path, *overrides) -> Path:
    """A tiny DDPM checkpoint with random weights (DiT's init outputs zeros, which any split reproduces)."""
    trainer = Trainer(load_config(None, tiny_run(tmp_path / "run", "diffusion.objective=ddpm", *overrides)),
                      progress=False)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.normal_(0, 0.1)
    path = tmp_path / "random.safetensors"
    save_file(trainer.model.state_dict(), path, metadata={"ditkit": trainer.record.to_json()})
    return path


def test_cli_patch_parallel_sampling_equals_one_process(tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path)
    common = ["sample", "--ckpt", str(ckpt), "--resolution", "28x16", "-n", "3", "--steps", "3", "--cfg", "2",
              "--seed", "5", "--mixer", "clear", "--mixer-opt", "radius=2", "--device", "cpu",
              "--attention-scale", "--position-scaling", "ntk"]  # trained at 16 px: the size options apply
    assert main([*common, "--out", str(tmp_path / "one.png")]) == 0
    result = torchrun("-m", "ditkit.cli.main", *common, "--parallel", "patch", "--out", str(tmp_path / "two.png"))
    assert result.stdout.count("wrote") == 1  # rank 0 only
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=int)
    two = np.asarray(Image.open(tmp_path / "two.png"), dtype=int)
    assert one.shape == two.shape and one.std() > 10  # random weights: not a flat image
    assert np.abs(one - two).max() <= 1 and (one == two).mean() > 0.99  # 8-bit rounding of equal floats


def test_cli_patch_without_torchrun_is_one_strip(tmp_path, capsys):
    ckpt = random_checkpoint(tmp_path)
    common = ["sample", "--ckpt", str(ckpt), "--num", "2", "--steps", "2", "--mixer", "full", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--parallel", "patch", "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
