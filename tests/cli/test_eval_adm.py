"""`ditkit eval` with the ADM evaluator's metrics and reference batches: --ref FILE.npz, --write-ref,
the report (FID / sFID / IS / Precision / Recall and the protocol), and bad input stopped in one line
before any sampling. The Inception network is a stand-in (tests/metrics/standin_inception.py):
torch-fidelity cannot be installed beside this machine's torch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit.metrics.features as features_module
import ditkit.metrics.score as score_module
from ditkit.metrics.adm import precision_recall
from ditkit.metrics.features import InceptionFeatures
from ditkit.metrics.quality import load_samples
from ditkit.metrics.refbatch import read_reference_batch
from helpers import run_cli
from metrics.standin_inception import StandInInception

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inception(tmp_path, monkeypatch):
    """A weights file and a stand-in network built from it: `--inception-weights` flags, and the network."""
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    built = {}

    def backbone(path):
        built["net"] = StandInInception(**built.get("sizes", {}))
        return built["net"]

    monkeypatch.setattr(features_module, "_inception_backbone", backbone)
    return built, ["--features", "inception", "--inception-weights", str(weights), "--no-progress"]


def image_folder(folder, count, side=16, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_eval_against_an_adm_batch_reports_the_papers_columns(tmp_path, capsys, inception):
    built, flags = inception
    samples = image_folder(tmp_path / "samples", 12)
    pixels = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", pixels)  # an ADM batch of images: the statistics are computed from them
    code, out, err = run_cli(capsys, "eval", "--samples", str(samples), "--ref", str(tmp_path / "ref.npz"),
                             "--batch-size", "4", "--out", str(tmp_path / "eval.json"), *flags)
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_generated"] == 12 and result["num_reference"] == 10 and result["comparable_to_papers"]
    for key in ("fid", "sfid", "is_mean", "precision", "recall", "kid_mean"):
        assert isinstance(result[key], float), key
    # precision / recall of the same network's pool features, computed here directly
    net = InceptionFeatures(backbone=built["net"])
    fake = net(load_samples(samples))[0]
    real = net(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))[0]
    assert (result["precision"], result["recall"]) == pytest.approx(precision_recall(real, fake), abs=1e-12)
    assert result["protocol"] == {"samples": 12, "steps": None, "cfg_scale": None, "sampler": None,
                                  "timestep_spacing": None, "seed": None, "resolution": None,
                                  "reference": str(tmp_path / "ref.npz"), "reference_images": 10,
                                  "features": "inception"}
    assert "sFID" in out and "precision" in out and "splits of 5,000" in out
    assert "| samples | steps | guidance | spacing | sampler | reference | features | FID | sFID | IS | Precision | " \
           "Recall |" in out and "| 12 | - | - | - | - | ref.npz | inception |" in out


def test_write_ref_writes_an_adm_batch_that_reads_back(tmp_path, capsys, inception):
    built, flags = inception
    built["sizes"] = dict(pool_dim=2048, grid=17)  # the real feature sizes, which the file's layout fixes
    folder = image_folder(tmp_path / "real", 6, side=12)
    code, out, err = run_cli(capsys, "eval", "--write-ref", str(tmp_path / "ref.npz"), "--ref", str(folder),
                             "--num-ref", "6", "--with-images", *flags)
    assert code == 0, err
    written = read_reference_batch(tmp_path / "ref.npz")
    assert written.image_shape == (6, 12, 12, 3) and sorted(written.statistics) == ["mu", "mu_s", "sigma", "sigma_s"]
    assert "wrote" in out and "6 images" in out
    code, _, err = run_cli(capsys, "eval", "--write-ref", str(tmp_path / "stats.npz"), "--ref", str(folder), *flags)
    assert code == 0, err
    assert read_reference_batch(tmp_path / "stats.npz").image_shape is None


def test_digits_features_say_what_they_cannot_give_and_the_protocol(tmp_path, capsys, tiny_ckpt,
                                                                     digits_features_path):
    code, out, err = run_cli(capsys, "eval", "--ckpt", str(tiny_ckpt), "--ref", "digits", "--num", "4",
                             "--num-ref", "8", "--steps", "2", "--cfg", "1.5", "--out", str(tmp_path / "e.json"),
                             "--features-path", str(digits_features_path), "--no-progress")
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["sfid"] is None and result["precision"] is None and result["recall"] is None
    assert "sFID, precision, recall: not available with ditkit-digits features" in out
    protocol = result["protocol"]
    assert (protocol["samples"], protocol["steps"], protocol["cfg_scale"], protocol["resolution"]) == (4, 2, 1.5,
                                                                                                       "16x16")
    # the tiny run is flow matching: Euler steps, no DDPM timestep spacing
    assert protocol["sampler"] == "euler" and protocol["timestep_spacing"] is None
    assert protocol["features"] == "ditkit-digits" and "| 4 | 2 | 1.5 | - | euler | digits | ditkit-digits |" in out
    assert "| n/a | " in out  # sFID


def bad_batches(tmp_path):
    np.savez(tmp_path / "labels.npz", labels=np.arange(3))
    np.savez(tmp_path / "float.npz", np.zeros((2, 16, 16, 3), np.float32))
    np.savez(tmp_path / "small.npz", np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    return [("missing.npz", [], "does not exist"), ("labels.npz", [], "neither images"),
            ("float.npz", [], "must be uint8 images"), ("small.npz", [], "holds 8x8 images but the samples are 16x16"),
            ("stats.npz", [], "holds only Inception statistics")]


def test_bad_input_stops_in_one_line_before_sampling(tmp_path, capsys, tiny_ckpt, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the input was checked")

    monkeypatch.setattr(score_module, "sample_checkpoint", no_sampling)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    ckpt = ["eval", "--ckpt", str(tiny_ckpt), "--num", "2", "--no-progress"]
    for name, extra, message in bad_batches(tmp_path):
        code, _, err = run_cli(capsys, *ckpt, "--ref", str(tmp_path / name), *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
    cases = [([*ckpt, "--ref", "digits", "--features", "inception"], "weights-inception-2015-12-05"),
             ([*ckpt, "--ref", "digits", "--features", "inception", "--inception-weights", "nope.pth"],
              "no InceptionV3 weights at nope.pth"),
             ([*ckpt, "--ref", "digits", "--with-images"], "--with-images goes with --write-ref"),
             (["eval", "--write-ref", "r.npz", "--ref", "digits"], "add --features inception"),
             (["eval", "--write-ref", "r.txt", "--ref", "digits"], "name the reference batch with .npz"),
             (["eval", "--write-ref", "r.npz", "--ref", str(tmp_path / "small.npz")], "already is one"),
             ([*ckpt, "--write-ref", "r.npz", "--ref", "digits"], "drop --ckpt / --samples"),
             (["eval", "--write-ref", str(tmp_path / "small.npz"), "--ref", "digits", "--features", "inception"],
              "exists: give a new file name")]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_digits_features_read_an_adm_batch_s_images(tmp_path, capsys, digits_features_path):
    from ditkit.metrics.features import digits_features
    from ditkit.metrics.quality import evaluate

    samples = image_folder(tmp_path / "samples", 6)
    pixels = np.random.default_rng(2).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", pixels)
    code, _, err = run_cli(capsys, "eval", "--samples", str(samples), "--ref", str(tmp_path / "ref.npz"),
                           "--features-path", str(digits_features_path), "--batch-size", "4", "--no-progress",
                           "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    expected = evaluate(load_samples(samples), torch.from_numpy(pixels).permute(0, 3, 1, 2),
                        digits_features(digits_features_path), batch_size=4, progress=False)
    assert result["num_reference"] == 9 and result["fid"] == pytest.approx(expected["fid"], rel=1e-6)
