"""`prepare_latents` and `PreparedLatents`: shards equal to the latent cache's algorithm, hflip items,
a killed run resumed, P-independent bytes (2 gloo processes), a finished folder verified, refusals."""

import json
import shutil

import pytest
import torch

import ditkit.data.prepared as prepared
from data.prepared_helpers import image_folder, vae_folder
from ditkit.data import ImageFolderDataset
from ditkit.data.folder import Unreadable
from ditkit.data.latents import encode, load_vae
from ditkit.data.prepared import PreparedLatents, prepare_latents, shard_path
from ditkit.errors import DitkitError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path):
    return image_folder(tmp_path / "images"), vae_folder(tmp_path / "vae")


def prepare(images, vae, out, **options):
    options = {"resolution": 16, "shard_size": 4, "batch_size": 2, "progress": False, "poll_seconds": 0.01,
               **options}
    return prepare_latents(ImageFolderDataset(images, options["resolution"]), vae, out, source_name=str(images),
                           **options)


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))} | {"manifest": (folder / "manifest.json")
                                                                                .read_bytes()}


def todays_latents(images, vae, hflip, batch_size=2):
    """The latent cache's algorithm before the shards: batches of the dataset, latent_dist.mean times the
    scaling factor, each batch's flips after it; here as (latents, flipped latents, labels) in item order."""
    dataset, model = ImageFolderDataset(images, 16), load_vae(vae)
    latents, flipped, labels = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = torch.stack([x for x, _ in items])
        latents.append(model.encode(batch).latent_dist.mean * model.config.scaling_factor)
        if hflip:
            flipped.append(model.encode(batch.flip(-1)).latent_dist.mean * model.config.scaling_factor)
        labels += [y for _, y in items]
    return torch.cat(latents), torch.cat(flipped) if hflip else None, labels


def test_items_are_the_latent_cache_algorithm_and_hflip_items_are_flipped_encodes(inputs, tmp_path):
    images, vae = inputs
    manifest = prepare(images, vae, tmp_path / "out", hflip=True)
    assert (manifest["count"], manifest["items"], len(manifest["shards"])) == (10, 20, 3)
    assert manifest["class_names"] == ["cat", "dog"] and manifest["channels"] == 4
    latents, flipped, labels = todays_latents(images, vae, hflip=True)
    data = PreparedLatents(tmp_path / "out")
    assert len(data) == 20 and data.num_classes == 2 and data.channels == 4
    for j in range(10):
        (x, y), (fx, fy) = data[2 * j], data[2 * j + 1]
        assert torch.equal(x, latents[j]) and torch.equal(fx, flipped[j]) and y == fy == labels[j]
    assert not torch.equal(latents, flipped)
    direct = encode(load_vae(vae), ImageFolderDataset(images, 16)[3][0][None].flip(-1))[0]
    torch.testing.assert_close(data[7][0], direct, rtol=1e-5, atol=1e-6)  # item 7: the flip of image 3


def test_fp16_storage_rounds_the_fp32_latents(inputs, tmp_path):
    images, vae = inputs
    prepare(images, vae, tmp_path / "fp32")
    prepare(images, vae, tmp_path / "fp16", dtype="fp16")
    full, half = PreparedLatents(tmp_path / "fp32"), PreparedLatents(tmp_path / "fp16")
    assert shard_path(tmp_path / "fp16", 0).stat().st_size < shard_path(tmp_path / "fp32", 0).stat().st_size
    assert torch.equal(half[5][0], full[5][0].half().float())


def test_a_killed_run_continues_from_its_finished_shards(inputs, tmp_path, monkeypatch):
    images, vae = inputs
    prepare(images, vae, tmp_path / "straight", hflip=True)
    real_write, written = prepared.write_shard, []

    def killed_after_one(folder, index, tensors, skipped):
        if written:
            raise KeyboardInterrupt
        written.append(index)
        return real_write(folder, index, tensors, skipped)

    monkeypatch.setattr(prepared, "write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(images, vae, tmp_path / "resumed", hflip=True)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir() if not p.name.startswith(".")) == \
        ["progress.json", "shard-000000.json", "shard-000000.safetensors"]
    monkeypatch.setattr(prepared, "write_shard", real_write)
    encoded = []
    real_encode = prepared.encode_shard
    monkeypatch.setattr(prepared, "encode_shard", lambda *a, **k: encoded.append(a[3]) or real_encode(*a, **k))
    prepare(images, vae, tmp_path / "resumed", hflip=True)
    assert encoded == [1, 2]  # the finished shard was kept
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "straight")
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "manifest.json", *(f"shard-{k:06d}.safetensors" for k in range(3))]


def test_a_damaged_unfinished_shard_is_made_again(inputs, tmp_path, monkeypatch):
    images, vae = inputs
    prepare(images, vae, tmp_path / "straight")
    monkeypatch.setattr(prepared, "write_manifest", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare(images, vae, tmp_path / "out")
    monkeypatch.undo()
    path = shard_path(tmp_path / "out", 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size and header, another sha256
    path.write_bytes(bytes(data))
    encoded = []
    real_encode = prepared.encode_shard
    monkeypatch.setattr(prepared, "encode_shard", lambda *a, **k: encoded.append(a[3]) or real_encode(*a, **k))
    prepare(images, vae, tmp_path / "out")
    assert encoded == [1]
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "straight")


def test_a_finished_folder_is_verified_not_rebuilt(inputs, tmp_path, monkeypatch):
    images, vae = inputs
    first = prepare(images, vae, tmp_path / "out")
    before = shard_bytes(tmp_path / "out")
    real_encode = prepared.encode_shard
    monkeypatch.setattr(prepared, "encode_shard", lambda *a, **k: pytest.fail("a finished folder was re-encoded"))
    assert prepare(images, vae, tmp_path / "out") == first
    path = shard_path(tmp_path / "out", 2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DitkitError, match=r"shard-000002.safetensors of the prepared latents is not as its manifest "
                                          r"says \(another sha256.*: delete that shard and rerun the same ditkit "
                                          "prepare command, which makes it again"):
        prepare(images, vae, tmp_path / "out")
    PreparedLatents(tmp_path / "out")  # opening checks sizes and headers only (the checksums are prepare's)
    path.unlink()  # as the message says: the deleted shard, and only it, is made again
    encoded = []
    monkeypatch.setattr(prepared, "encode_shard", lambda *a, **k: encoded.append(a[3]) or real_encode(*a, **k))
    assert prepare(images, vae, tmp_path / "out") == first
    assert encoded == [2] and shard_bytes(tmp_path / "out") == before


class OneUnreadable(ImageFolderDataset):
    """A source whose item 5 (dog/000.png) cannot be decoded when it is read."""

    def read(self, index):
        if index == 5:
            raise Unreadable(str(self.samples[index][0]), "broken data stream")
        return super().read(index)


def test_unreadable_files_are_skipped_and_named_in_the_manifest(inputs, tmp_path):
    images, vae = inputs
    with pytest.warns(UserWarning, match="skipping unreadable image .*000.png: broken data stream"):
        manifest = prepare_latents(OneUnreadable(images, 16), vae, tmp_path / "out", source_name=str(images),
                                   resolution=16, shard_size=4, batch_size=2, progress=False)
    assert manifest["count"] == 9 and manifest["skipped"] == [
        {"item": 5, "name": str(images / "dog" / "000.png"), "reason": "broken data stream"}]
    assert [s["count"] for s in manifest["shards"]] == [4, 3, 2]
    data, full = PreparedLatents(tmp_path / "out"), ImageFolderDataset(images, 16)
    assert len(data) == 9 and [data[i][1] for i in range(9)] == [0] * 5 + [1] * 4
    latents, _, _ = todays_latents(images, vae, hflip=False)
    assert torch.equal(data[3][0], latents[3]) and torch.equal(data[8][0], latents[9])  # the batches skip it too
    assert full.samples[5][0].is_file()


def test_another_preparation_in_the_folder_is_refused_before_any_work(inputs, tmp_path, monkeypatch):
    images, vae = inputs
    prepare(images, vae, tmp_path / "out")
    monkeypatch.setattr(prepared, "encode_shard", lambda *a, **k: pytest.fail("encoded before refusing"))
    other_vae = vae_folder(tmp_path / "vae2", seed=1, scaling_factor=0.25)
    with pytest.raises(DitkitError, match=r"out holds latents prepared otherwise \(vae_config_sha256 .*use another "
                                          "--out or delete it"):
        prepare(images, other_vae, tmp_path / "out")
    with pytest.raises(DitkitError, match=r"prepared otherwise \(resolution 16 there, 8 here.*use another --out"):
        prepare(images, vae, tmp_path / "out", resolution=8)
    with pytest.raises(DitkitError, match=r"prepared otherwise \(hflip False there, True here"):
        prepare(images, vae, tmp_path / "out", hflip=True)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    with pytest.raises(DitkitError, match="stray holds files that are not prepared latents.*notes.txt"):
        prepare(images, vae, tmp_path / "stray")


def test_bad_input_is_one_line_before_any_work(inputs, tmp_path, monkeypatch):
    images, vae = inputs
    monkeypatch.setattr(prepared, "encode_shard", lambda *a, **k: pytest.fail("encoded before refusing"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DitkitError, match="no image files"):
        prepare(tmp_path / "empty", vae, tmp_path / "out")
    with pytest.raises(DitkitError, match="source .* has no items"):
        prepare_latents([], vae, tmp_path / "out", source_name="nothing", resolution=16)
    with pytest.raises(DitkitError, match="--shard-size 5 is not a multiple of --batch-size 2"):
        prepare(images, vae, tmp_path / "out", shard_size=5)
    with pytest.raises(DitkitError, match="--dtype 'bf16' is not a storage type"):
        prepare(images, vae, tmp_path / "out", dtype="bf16")
    with pytest.raises(DitkitError, match="--resolution 15 is not a multiple of the VAE's downsampling 2"):
        prepare(images, vae, tmp_path / "out", resolution=15)
    with pytest.raises(DitkitError, match="makes 16 px images, not the resolution 32 to record"):
        prepare_latents(ImageFolderDataset(images, 16), vae, tmp_path / "out", source_name="x", resolution=32)
    with pytest.raises(DitkitError, match="--out .* lies inside the source"):
        prepare(images, vae, images / "latents")
    assert not (tmp_path / "out").exists()


def test_opening_a_damaged_folder_is_one_line(inputs, tmp_path):
    images, vae = inputs
    prepare(images, vae, tmp_path / "out")
    with pytest.raises(DitkitError, match="missing do not exist: make them with ditkit prepare"):
        PreparedLatents(tmp_path / "missing")
    shard_path(tmp_path / "out", 1).unlink()
    with pytest.raises(DitkitError, match=r"shard-000001.safetensors .* manifest says \(missing\): rerun"):
        PreparedLatents(tmp_path / "out")
    shutil.copy(shard_path(tmp_path / "out", 2), shard_path(tmp_path / "out", 1))  # 2 items, not 4
    with pytest.raises(DitkitError, match=r"shard-000001.safetensors .* says \(\d+ bytes, \d+ expected\)"):
        PreparedLatents(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (tmp_path / "out" / "manifest.json").write_text(json.dumps({**manifest, "kind": "other"}))
    with pytest.raises(DitkitError, match="is not a ditkit prepared-latents manifest"):
        PreparedLatents(tmp_path / "out")
