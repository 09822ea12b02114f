"""Training from `data.source: latents:DIR`: the same weights as the data.vae latent cache, exact
resume with DataLoader workers, flat resident memory, and one-line refusals of contradicting settings."""

import json

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from data.prepared_helpers import image_folder, vae_folder
from distributed.test_patch import torchrun
from ditkit.checkpoint import META_KEY, read_header
from ditkit.data import ImageFolderDataset, PreparedLatents, prepare_latents
from ditkit.data.prepared import ShardPlan, write_manifest, write_shard
from ditkit.errors import DitkitError
from ditkit.train import load_config, train
from helpers import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def prepared(tmp_path):
    """A tiny image folder, a tiny VAE and the folder's latents with flips, prepared as the latent
    cache encodes them (batches of 16, fp32)."""
    images, vae = image_folder(tmp_path / "images"), vae_folder(tmp_path / "vae")
    prepare_latents(ImageFolderDataset(images, 16), vae, tmp_path / "latents", source_name=str(images),
                    resolution=16, hflip=True, shard_size=16, batch_size=16, progress=False)
    return images, vae, tmp_path / "latents"


def weights(run, step, name="model"):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors")


def assert_same_weights(a, b, step=4):
    for name in ("model", "ema"):
        x, y = weights(a, step, name), weights(b, step, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_latents_dir_trains_as_the_latent_cache_bit_for_bit(prepared, tmp_path):
    images, vae, latents = prepared
    model = ["model.name=DiT-Nano/2", "data.hflip=true", "train.num_samples=2"]
    train(load_config(None, tiny_run(tmp_path / "cached", *model, f"data.source={images}", f"data.vae={vae}",
                                     f"data.cache_dir={tmp_path / 'cache'}")), progress=False)
    train(load_config(None, tiny_run(tmp_path / "prepared", *model, f"data.source=latents:{latents}")),
          progress=False)
    assert_same_weights(tmp_path / "cached", tmp_path / "prepared")
    config = json.loads((tmp_path / "prepared" / "config.json").read_text())
    assert config["data"]["vae"] is None  # taken from the manifest, recorded in the checkpoint:
    _, metadata, _ = read_header(tmp_path / "prepared")
    assert json.loads(metadata[META_KEY])["data"]["vae"] == str(vae.resolve())
    cache = next((tmp_path / "cache").glob("latents-*"))
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "shard-000000.safetensors"]


def test_resume_with_two_workers_is_exact(prepared, tmp_path):
    _, _, latents = prepared
    extra = [f"data.source=latents:{latents}", "data.num_workers=2", "model.name=DiT-Nano/2", "train.num_samples=0"]
    train(load_config(None, tiny_run(tmp_path / "straight", *extra)), progress=False)
    train(load_config(None, tiny_run(tmp_path / "halves", *extra, "train.steps=2")), progress=False)
    train(load_config(None, tiny_run(tmp_path / "halves", *extra)), resume=True, progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "halves")
    assert not torch.equal(weights(tmp_path / "straight", 2)["final_layer.linear.weight"],
                           weights(tmp_path / "straight", 4)["final_layer.linear.weight"])


def test_settings_that_contradict_the_manifest_are_one_line(prepared, tmp_path):
    _, vae, latents = prepared
    source = f"data.source=latents:{latents}"
    with pytest.raises(DitkitError, match=r"data.resolution=32 contradicts latents:.*prepared at 16 px: set "
                                          r"data.resolution=16"):
        train(load_config(None, tiny_run(tmp_path / "a", source, "data.resolution=32")), progress=False)
    other = vae_folder(tmp_path / "other-vae", seed=1, scaling_factor=0.25)
    with pytest.raises(DitkitError, match="data.vae .*other-vae is not the VAE latents:.* was prepared with"):
        train(load_config(None, tiny_run(tmp_path / "b", source, f"data.vae={other}")), progress=False)
    with pytest.raises(DitkitError, match="model.args.in_channels=3 contradicts the data .* 4 latent channels"):
        train(load_config(None, tiny_run(tmp_path / "c", source, "model.args.in_channels=3")), progress=False)
    moved = tmp_path / "moved-vae"
    vae.rename(moved)
    with pytest.raises(DitkitError, match="the VAE latents:.* was prepared with .*vae is not a diffusers VAE folder, "
                                          "and sampling needs it: set data.vae"):
        train(load_config(None, tiny_run(tmp_path / "d", source)), progress=False)
    train(load_config(None, tiny_run(tmp_path / "e", source, f"data.vae={moved}", "train.steps=1",
                                     "train.num_samples=0")), progress=False)  # the same VAE, moved


def synthetic_latents(folder, count, shard_size=1000):
    """A prepared folder of `count` random fp16 latents (4 x 32 x 32: 8 KB an item) and its manifest."""
    plan = ShardPlan(count, shard_size, shard_size)
    settings = {"kind": "ditkit prepared latents", "format": 1, "source": "synthetic", "hflip": False,
                "dtype": "fp16", "channels": 4, "latent_size": [32, 32], "resolution": 256, "vae_scale": 8,
                "num_classes": 10, "class_names": [str(i) for i in range(10)], "vae": "none"}
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for k in range(plan.shards):
        n = len(plan.bounds(k))
        write_shard(folder, k, {"latents": torch.randn(n, 4, 32, 32, generator=generator).half(),
                                "labels": torch.arange(n) % 10, "indices": torch.arange(n) + k * shard_size}, [])
    write_manifest(folder, settings, plan)
    return PreparedLatents(folder)


def resident_after_reading(data) -> int:
    total = 0.0
    for i in range(len(data)):
        total += float(data[i][0][0, 0, 0])
    assert np.isfinite(total)
    return psutil.Process().memory_info().rss


def test_resident_memory_does_not_grow_with_the_number_of_items(tmp_path):
    small, large = synthetic_latents(tmp_path / "small", 2_000), synthetic_latents(tmp_path / "large", 20_000)
    assert len(large) == 20_000 and large[12_345][1] == 12_345 % 1000 % 10
    after_small = resident_after_reading(small)
    after_large = resident_after_reading(large)  # 160 MB of latents read, one item at a time
    assert after_large < after_small * 1.1 + (16 << 20), (after_small >> 20, after_large >> 20)


def test_two_processes_build_the_latent_cache_one_process_builds(prepared, tmp_path):
    """Under torchrun every process of a data.vae run takes part in the cache (rank 0 claims the
    folder and writes the manifest, the others wait for it): the same files as one process makes."""
    images, vae, _ = prepared
    settings = [f"data.source={images}", f"data.vae={vae}", "model.name=DiT-Nano/2", "train.steps=1",
                "train.num_samples=0", "train.batch_size=2"]
    torchrun("-m", "ditkit.cli.main", "train", "digits",
             *tiny_run(tmp_path / "two", *settings, f"data.cache_dir={tmp_path / 'two-cache'}"), "--no-progress",
             timeout=300)
    train(load_config(None, tiny_run(tmp_path / "one", *settings, f"data.cache_dir={tmp_path / 'one-cache'}")),
          progress=False)
    one, two = (next((tmp_path / name).glob("latents-*")) for name in ("one-cache", "two-cache"))
    assert one.name == two.name
    assert sorted(p.name for p in two.iterdir()) == ["manifest.json", "shard-000000.safetensors"]
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in ("manifest.json",
                                                                                   "shard-000000.safetensors"))
