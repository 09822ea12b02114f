"""Fault injection over every command (issue 27): each `ditkit` command is run against a full disk,
a read-only output location and an output that is one of its inputs, and must answer in one line
("ditkit: error: ..."), exit non-zero, change no input file and leave no torn file behind.

A full disk is a tiny tmpfs and a read-only location a read-only tmpfs, where the test may mount
one (root with mount rights, as on CI); else a full disk is injected as ENOSPC at the sync every
ditkit write goes through, and a read-only location is a folder without write permission (which
binds everyone but root: as root without mount rights that case is skipped, and says so).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from ditkit import checkpoint as checkpoint_module
from ditkit import files as files_module
from ditkit.cli.main import main
from helpers import run_cli, tiny_run
from study.test_study import TINY_STUDY

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- fault locations

def mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def fill(file: Path) -> None:
    """Write `file` until its disk has no byte left."""
    handle = os.open(file, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(handle, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(handle)


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written in."""
    folder = tmp_path / "read-only"
    if mount_tmpfs(folder, "size=64k,ro"):
        try:
            yield folder
        finally:
            unmount(folder)
        return
    if os.geteuid() == 0:
        pytest.skip("root without mount rights: a read-only folder cannot be made here")
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a disk that fills after a few KiB."""
    folder = tmp_path / "full"
    if mount_tmpfs(folder, "size=64k"):
        try:
            fill(folder / "filler")
            yield folder
        finally:
            unmount(folder)
        return

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files_module, "fsync_file", no_space)
    monkeypatch.setattr(checkpoint_module, "fsync_file", no_space)
    yield folder


# ---------------------------------------------------------------- inputs shared by the commands

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_ckpt):
    """What the commands read: a tiny train run, an official-layout DiT file, a tiny FLUX pipeline
    with prompt embeddings, and the ditkit-digits features."""
    from safetensors.torch import save_file

    from convert.test_official_dit import official_state
    from ditkit.data.images import save_image_folder
    from ditkit.metrics.features import digits_features
    from tiny_diffusers import flux_pipeline, tiny_vae

    root = tmp_path_factory.mktemp("inputs")
    torch.save(official_state(depth=1, width=64, classes=10, side=8), root / "official.pt")
    torch.manual_seed(0)
    flux_pipeline(encoders=False).save_pretrained(root / "flux")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              root / "embeds.safetensors")
    digits_features(root / "features.pt", progress=False, epochs=1)
    save_image_folder(torch.rand(4, 3, 16, 16) * 2 - 1, root / "images" / "cats")
    (root / "study.yaml").write_text(yaml.safe_dump(TINY_STUDY))
    tiny_vae().save_pretrained(root / "vae")
    assert main(["convert", str(root / "official.pt"), "--num-heads", "4", "--resolution", "16", "--vae",
                 str(root / "vae"), "--out", str(root / "converted")]) == 0
    return {"run": tiny_ckpt, "official": root / "official.pt", "converted": root / "converted", "flux": root / "flux",
            "embeds": root / "embeds.safetensors", "features": root / "features.pt",
            "images": root / "images", "study": root / "study.yaml", "vae": root / "vae"}


def commands(i: dict, out: Path) -> dict[str, list[str]]:
    """Each command, small, writing to `out` (a folder or a file inside it)."""
    run, features = str(i["run"]), str(i["features"])
    return {
        "train": ["train", "digits", *tiny_run(out / "run"), "--no-progress"],
        "distill": ["distill", "--teacher", run, "--radius", "2", "--steps", "2", "--num-samples", "4",
                    "--out", str(out / "student"), "--no-progress"],
        "sample": ["sample", "--ckpt", run, "--num", "2", "--steps", "2", "--no-progress",
                   "--out", str(out / "grid.png")],
        "eval": ["eval", "--ckpt", run, "--ref", "digits", "--num", "4", "--num-ref", "4", "--steps", "2",
                 "--features-path", features, "--out", str(out / "eval.json"), "--no-progress"],
        "eval-features": ["eval", "--ckpt", run, "--ref", "digits", "--num", "4", "--num-ref", "4", "--steps", "2",
                          "--features-path", str(out / "features.pt"), "--no-progress"],
        "convert": ["convert", str(i["official"]), "--num-heads", "4", "--resolution", "16", "--out",
                    str(out / "converted")],
        "export": ["export", str(i["converted"]), str(out / "exported"), "--approximate-timesteps"],
        "generate": ["generate", "--pipeline", str(i["flux"]), "--prompt-embeds", str(i["embeds"]), "--height", "32",
                     "--width", "32", "--steps", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress",
                     "--out", str(out / "image.png")],
        "bench": ["bench", "--models", "DiT-Nano/4", "--resolutions", "16", "--repeats", "1", "--threads", "1",
                  "--out", str(out / "bench")],
        "quickstart": ["quickstart", "--scale", "tiny", "--out", str(out / "quickstart"), "--features-path", features,
                       "--no-progress"],
        "study": ["study", str(i["study"]), "--out", str(out / "study"), "--features-path", features, "--no-progress"],
        "prepare": ["prepare", str(i["images"]), "--vae", str(i["vae"]), "--resolution", "16", "--out",
                    str(out / "latents"), "--shard-size", "2", "--batch-size", "2", "--no-progress"],
        "train-latent-cache": ["train", "digits", *tiny_run(i["images"].parent / "cached"),
                               f"data.source={i['images']}", f"data.vae={i['vae']}", f"data.cache_dir={out / 'cache'}",
                               "--no-progress"],
    }


COMMANDS = ["train", "distill", "sample", "eval", "eval-features", "convert", "export", "generate", "bench",
            "quickstart", "study", "train-latent-cache", "prepare"]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots`, by content hash."""
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            if path.name != ".ditkit.lock":
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def torn(folder: Path) -> list[str]:
    """Files an interrupted write left: atomic writes' temporaries and checkpoint staging folders."""
    return [str(p) for p in folder.rglob("*") if files_module.TEMPORARY.match(p.name) or p.name.startswith(".tmp-")]


def assert_one_line_refusal(code: int, err: str, *expected: str) -> None:
    assert code != 0 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ditkit: error: "), err
    for text in expected:
        assert text in lines[0], err


# ---------------------------------------------------------------- the cases

@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_location_is_one_line_and_changes_nothing(command, inputs, read_only, capsys):
    before = snapshot(*inputs.values())
    code, _, err = run_cli(capsys, *commands(inputs, read_only)[command])
    assert_one_line_refusal(code, err, str(read_only))
    assert snapshot(*inputs.values()) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_line_naming_the_file_and_tears_nothing(command, inputs, full_disk, capsys):
    before = snapshot(*inputs.values())
    code, _, err = run_cli(capsys, *commands(inputs, full_disk)[command])
    assert_one_line_refusal(code, err, str(full_disk), "full")
    assert snapshot(*inputs.values()) == before
    assert torn(full_disk) == []


def over_inputs(i: dict) -> dict[str, list[str]]:
    """Commands whose output is (or holds, or replaces a file of) one of their inputs."""
    run, step = i["run"], sorted((i["run"] / "checkpoints").glob("step_*"))[-1]
    eval_args = ["eval", "--ckpt", str(run), "--ref", "digits", "--num", "4", "--num-ref", "4", "--steps", "2",
                 "--features-path", str(i["features"]), "--no-progress"]
    return {
        "train-over-its-data": ["train", "digits", *tiny_run(i["images"]), "data.source=" + str(i["images"]),
                                "--no-progress"],
        "distill-over-its-teacher": ["distill", "--teacher", str(run), "--radius", "2", "--steps", "1",
                                     "--num-samples", "4", "--out", str(run), "--overwrite", "--no-progress"],
        "eval-json-over-a-checkpoint": [*eval_args, "--out", str(step / "model.safetensors")],
        "eval-samples-into-a-run": [*eval_args, "--out", str(i["features"].with_name("e.json")), "--save-samples",
                                    str(run)],
        "eval-features-over-weights": [*eval_args[:-3], "--features-path", str(step / "ema.safetensors"),
                                       "--no-progress"],
        "convert-into-its-source-folder": ["convert", str(i["official"]), "--num-heads", "4", "--resolution", "16",
                                           "--out", str(i["official"].parent)],
        "export-over-its-checkpoint": ["export", str(i["converted"]), str(i["converted"]), "--approximate-timesteps"],
        "sample-over-a-checkpoint": ["sample", "--ckpt", str(run), "--num", "2", "--steps", "2", "--no-progress",
                                     "--out", str(step / "model.safetensors")],
        "generate-over-a-weights-file": ["generate", "--pipeline", str(i["flux"]), "--prompt-embeds",
                                         str(i["embeds"]), "--height", "32", "--width", "32", "--steps", "1",
                                         "--dtype", "fp32", "--device", "cpu", "--no-progress", "--out",
                                         str(i["embeds"])],
    }


OVER_INPUTS = {  # case -> what the one line says
    "train-over-its-data": "is the data.source", "distill-over-its-teacher": "is the teacher",
    "eval-json-over-a-checkpoint": "exists and is not a JSON file", "eval-samples-into-a-run": "holds other files",
    "eval-features-over-weights": "will not replace it", "convert-into-its-source-folder": "contains the source",
    "export-over-its-checkpoint": "exists and is not empty", "sample-over-a-checkpoint": "no image extension",
    "generate-over-a-weights-file": "generate writes PNG files",
}


@pytest.mark.parametrize("case", OVER_INPUTS)
def test_an_output_over_an_input_is_one_line_and_changes_nothing(case, inputs, capsys):
    before = snapshot(*inputs.values())
    code, _, err = run_cli(capsys, *over_inputs(inputs)[case])
    assert_one_line_refusal(code, err, OVER_INPUTS[case])
    assert snapshot(*inputs.values()) == before
