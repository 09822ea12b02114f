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


def test_a_parquet_source_prepares_the_latents_of_its_image_folder(tmp_path, capsys):
    """The same images as parquet (datasets' to_parquet, renamed columns) give the same latents as
    the image folder they were written from."""
    datasets = pytest.importorskip("datasets")
    import torch

    from ditkit.data import PreparedLatents

    images, vae = image_folder(tmp_path / "images", per_class=2), vae_folder(tmp_path / "vae")
    rows = [(str(path), label) for label, name in enumerate(("cat", "dog"))
            for path in sorted((images / name).iterdir())]
    features = datasets.Features({"picture": datasets.Image(), "class": datasets.ClassLabel(names=["cat", "dog"])})
    table = datasets.Dataset.from_dict({"picture": [p for p, _ in rows], "class": [y for _, y in rows]},
                                       features=features)
    table.cast_column("picture", datasets.Image(decode=False)).to_parquet(str(tmp_path / "train.parquet"))
    assert run_cli(capsys, *flags(images, vae, tmp_path / "from-folder"))[0] == 0
    code, out, err = run_cli(capsys, *flags(tmp_path / "train.parquet", vae, tmp_path / "from-parquet",
                                            "--image-column", "picture", "--label-column", "class",
                                            "--cache-dir", str(tmp_path / "cache")))
    assert code == 0 and "prepared 4 latent items" in out, err
    folder, parquet = PreparedLatents(tmp_path / "from-folder"), PreparedLatents(tmp_path / "from-parquet")
    assert len(folder) == len(parquet) == 4 and parquet.class_names == ["cat", "dog"]
    for index in range(4):
        assert torch.equal(folder[index][0], parquet[index][0]) and folder[index][1] == parquet[index][1]
