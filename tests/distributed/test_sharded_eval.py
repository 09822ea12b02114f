"""`ditkit eval --sample-dir` under torchrun: 2 gloo processes write the same shards, and score
them the same, as one process."""

import json

import numpy as np
import pytest

from distributed.test_patch import torchrun
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_write_the_images_one_process_writes(tiny_ckpt, tmp_path, capsys, digits_features_path):
    def flags(name):  # 5 shards: process 0 makes 0, 2, 4 and process 1 makes 1, 3
        return ["eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", "-n", "9", "--num-ref", "12", "--batch-size",
                "2", "--shard-size", "2", "--seed", "7", "--device", "cpu", "--sample-dir", str(tmp_path / name),
                "--features-path", str(digits_features_path), "--no-progress", "--out", str(tmp_path / f"{name}.json")]

    result = torchrun("-m", "ditkit.cli.main", *flags("two"), timeout=240)
    assert result.stdout.count("wrote ") == 1  # the main process scores and writes; the other only samples
    code, _, err = run_cli(capsys, *flags("one"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "one").glob("shard-*.npz"))
    assert len(names) == 5 and names == sorted(p.name for p in (tmp_path / "two").glob("shard-*.npz"))
    for name in names:
        one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert {**one, "samples_folder": None} == {**two, "samples_folder": None} and one["num_generated"] == 9
