"""`ditkit eval --sample-dir`: shards written, reused on rerun, and every bad combination one line
before any sampling."""

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_into_a_sample_dir_then_again_reuses_its_shards(tiny_ckpt, tmp_path, capsys, digits_features_path,
                                                              monkeypatch):
    flags = ["eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", "-n", "6", "--num-ref", "12", "--batch-size", "2",
             "--shard-size", "4", "--sample-dir", str(tmp_path / "s"), "--features-path", str(digits_features_path),
             "--no-progress"]
    code, out, err = run_cli(capsys, *flags, "--out", str(tmp_path / "a.json"))
    assert code == 0, err
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["num_generated"] == 6 and first["shards"] == 2 and "legibility" in out
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "shard-000000.npz",
                                                                 "shard-000001.npz"]
    import ditkit.metrics.shards as shards

    monkeypatch.setattr(shards, "sample_batch", lambda *args, **kwargs: pytest.fail("sampled a finished shard"))
    code, _, err = run_cli(capsys, *flags, "--out", str(tmp_path / "b.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text()) == first


@pytest.mark.parametrize("extra,message", [
    (["--shard-size", "5"], "--shard-size 5 is not a multiple of --batch-size 2"),
    (["--save-samples", "png"], "--save-samples needs every image in memory, which --sample-dir avoids"),
    (["--pair-with", "."], "--pair-with needs every image in memory"),
])
def test_sample_dir_refusals_are_one_line_before_loading(tiny_ckpt, tmp_path, capsys, monkeypatch, extra, message):
    import ditkit.metrics.shards as shards

    monkeypatch.setattr(shards, "load_checkpoint", lambda *args, **kwargs: pytest.fail("loaded before the check"))
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", "--batch-size", "2",
                           "--sample-dir", str(tmp_path / "s"), *extra)
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "s").exists()


def test_sharding_flags_out_of_place_are_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    cases = [(["--ckpt", str(tiny_ckpt), "--shard-size", "4"], "--shard-size needs --sample-dir"),
             (["--samples", str(tmp_path), "--sample-dir", str(tmp_path / "s")], "with --samples, drop it"),
             (["--ckpt", str(tiny_ckpt), "--sample-dir", str(tiny_ckpt / "s")], "lies inside the checkpoint")]
    for flags, message in cases:
        code, _, err = run_cli(capsys, "eval", "--ref", "digits", *flags)
        assert code == 2 and message in err and err.count("\n") == 1, (flags, err)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc_per_node 2
    code, _, err = run_cli(capsys, "eval", "--ckpt", str(tiny_ckpt), "--ref", "digits")
    assert code == 2 and "under torchrun each process makes a share of the samples: give --sample-dir" in err
