import json

import pytest
import torch

from helpers import run_cli, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_a_checkpoint_then_its_saved_samples(tmp_path, capsys, digits_features_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "digits", *tiny_run(run), "--no-progress")[0] == 0
    features = ["--features-path", str(digits_features_path), "--no-progress"]
    code, out, err = run_cli(capsys, "eval", "--ckpt", str(run), "--ref", "digits", "--num", "8", "--num-ref", "16",
                             "--steps", "2", "--save-samples", str(tmp_path / "s"), "--out", str(tmp_path / "a.json"),
                             *features)
    assert code == 0, err
    assert "FID" in out and "KID" in out and "IS" in out and "not with papers" in out
    scores = json.loads((tmp_path / "a.json").read_text())
    assert scores["num_generated"] == 8 and scores["num_reference"] == 16 and scores["features"] == "ditkit-digits"
    assert len(list((tmp_path / "s").glob("*.png"))) == 8
    # legibility: the saved samples (classes 0..7 in order) read by the same classifier
    from ditkit.metrics.features import digits_features
    from ditkit.metrics.quality import label_accuracy, load_samples

    saved = load_samples(tmp_path / "s", 8, 16)
    expected = label_accuracy(digits_features(digits_features_path), saved, torch.arange(8))
    assert scores["label_accuracy"] == pytest.approx(expected, abs=1 / 8 + 1e-6) and "legibility" in out
    code, out, err = run_cli(capsys, "eval", "--samples", str(tmp_path / "s"), "--ref", "digits", "--num-ref", "16",
                             "--pair-with", str(tmp_path / "s"), "--out", str(tmp_path / "b.json"), *features)
    assert code == 0, err
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["fid"] == pytest.approx(scores["fid"], rel=0.05)  # the same images, read back from PNG
    assert again["agreement"]["ssim"] == pytest.approx(1.0) and "paired      PSNR inf dB" in out
    assert again["agreement"]["psnr"] is None  # identical images: inf, written as null
    assert "label_accuracy" not in again  # image folders carry no labels


@pytest.mark.parametrize("argv,message", [
    (["eval", "--ref", "digits"], "give either --ckpt"),
    (["eval", "--samples", "no-such-folder", "--ref", "digits"], "does not exist"),
    (["eval", "--samples", ".", "--ckpt", "x", "--ref", "digits"], "give either --ckpt"),
])
def test_eval_input_errors_are_one_line(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_eval_with_inception_and_no_weights_says_how_to_get_them(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(folder / f"{i}.png")
    code, _, err = run_cli(capsys, "eval", "--samples", str(folder), "--ref", "digits", "--features", "inception",
                           "--no-progress")
    assert code == 2 and "weights-inception-2015-12-05" in err and "--inception-weights" in err
