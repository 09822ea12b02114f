"""`ditkit prepare`: one process and 2 gloo processes under torchrun write the same bytes; refusals."""

import pytest

from data.prepared_helpers import image_folder, vae_folder
from distributed.test_patch import torchrun
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def flags(images, vae, out, *extra):
    return ["prepare", str(images), "--vae", str(vae), "--resolution", "16", "--out", str(out), "--shard-size", "4",
            "--batch-size", "2", "--device", "cpu", "--no-progress", *extra]


def test_two_processes_write_the_bytes_one_process_writes(tmp_path, capsys):
    images, vae = image_folder(tmp_path / "images"), vae_folder(tmp_path / "vae")
    code, out, err = run_cli(capsys, *flags(images, vae, tmp_path / "one", "--hflip"))
    assert code == 0, err
    assert "prepared 20 latent items (10 images, with their flips) in 3 shard(s)" in out
    result = torchrun("-m", "ditkit.cli.main", *flags(images, vae, tmp_path / "two", "--hflip"), timeout=240)
    assert result.stdout.count("prepared 20 latent items") == 1  # the main process reports
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["manifest.json", *(f"shard-{k:06d}.safetensors" for k in range(3))]
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    code, out, err = run_cli(capsys, *flags(images, vae, tmp_path / "two", "--hflip"))  # verified, not rebuilt
    assert code == 0 and "prepared 20 latent items" in out, err


def test_refusals_are_one_line(tmp_path, capsys):
    images, vae = image_folder(tmp_path / "images", per_class=1), vae_folder(tmp_path / "vae")
    code, _, err = run_cli(capsys, *flags(f"latents:{tmp_path}", vae, tmp_path / "out"))
    assert code == 2 and "is prepared latents already: give the images" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, *flags(images, tmp_path / "novae", tmp_path / "out"))
    assert code == 2 and "no AutoencoderKL at" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, *flags(images, vae, tmp_path / "out", "--dtype", "fp8"))
    assert code == 2 and "--dtype 'fp8' is not a storage type: use fp16 or fp32" in err
    assert not (tmp_path / "out").exists()
