"""`ditkit eval --sample-dir` under torchrun: 2 gloo processes, resuming a run that one process
began and was killed in, write the same shards, and score them the same, as one process."""

import json

import numpy as np
import pytest

import ditkit.metrics.shards as shards
from distributed.test_patch import torchrun
from ditkit.metrics.shards import sample_shards
from ditkit.record import Sampling
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_write_the_images_one_process_writes(tiny_ckpt, tmp_path, capsys, digits_features_path,
                                                           monkeypatch):
    def flags(name):  # 5 shards of 2 samples (the last of 1)
        return ["eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", "-n", "9", "--num-ref", "12", "--batch-size",
                "2", "--shard-size", "2", "--seed", "7", "--device", "cpu", "--sample-dir", str(tmp_path / name),
                "--features-path", str(digits_features_path), "--no-progress", "--out", str(tmp_path / f"{name}.json")]

    real_write = shards.write_shard

    def killed_after_one(path, images, labels):
        if path.name != "shard-000000.npz":
            raise KeyboardInterrupt
        real_write(path, images, labels)

    monkeypatch.setattr(shards, "write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):  # one process begins with the same settings as the command line
        sample_shards(tiny_ckpt, Sampling(num=9, seed=7), tmp_path / "two", batch_size=2, shard_size=2,
                      progress=False)
    monkeypatch.setattr(shards, "write_shard", real_write)
    assert [p.name for p in (tmp_path / "two").glob("shard-*")] == ["shard-000000.npz"]
    result = torchrun("-m", "ditkit.cli.main", *flags("two"), timeout=240)  # the 4 others: 2 each
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
