"""`ditkit generate --pipeline ORG/NAME`: a pipeline from the local Hugging Face cache, never downloaded.
The cache is a fake one in a temporary HF_HOME, laid out as huggingface_hub lays it out
(hub/models--org--name/snapshots/<commit>/, refs/main naming the commit)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditkit.cli.main import main
from tiny_diffusers import HUB_COMMIT, fake_hub_cache, flux_pipeline

COMMIT = HUB_COMMIT


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """HF_HOME with a tiny FLUX pipeline cached as org/tiny-flux (offline: nothing may be fetched)."""
    torch.manual_seed(0)
    fake_hub_cache(tmp_path, monkeypatch, "org/tiny-flux", flux_pipeline(False).save_pretrained)
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              str(tmp_path / "embeds.safetensors"))
    return tmp_path


def generate(cache, out, *options):
    return main(["generate", "--prompt-embeds", str(cache / "embeds.safetensors"), "--height", "32", "--width", "32",
                 "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--no-progress", "--out", str(out), *options])


def test_repository_id_resolves_from_the_cache(cache, capsys):
    assert generate(cache, cache / "hub.png", "--pipeline", "org/tiny-flux", "--clear", "radius=2") == 0
    assert generate(cache, cache / "pinned.png", "--pipeline", "org/tiny-flux", "--revision", COMMIT,
                    "--clear", "radius=2") == 0
    folder = cache / "hf" / "hub" / "models--org--tiny-flux" / "snapshots" / COMMIT
    assert generate(cache, cache / "folder.png", "--pipeline", str(folder), "--clear", "radius=2") == 0
    images = [np.asarray(Image.open(cache / name)) for name in ("hub.png", "pinned.png", "folder.png")]
    assert images[0].shape == (32, 32, 3) and np.array_equal(images[0], images[1])
    assert np.array_equal(images[0], images[2])


def test_missing_repository_names_the_cache_and_the_fetch_command(cache, capsys):
    def refusal(*options):
        assert generate(cache, cache / "x.png", *options) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error
        return error

    hub = str(cache / "hf" / "hub")
    missing = refusal("--pipeline", "org/absent")
    assert f"Hugging Face cache ({hub})" in missing and "`hf download org/absent`" in missing
    assert "`hf download org/tiny-flux --revision v2`" in refusal("--pipeline", "org/tiny-flux", "--revision", "v2")
    folder = cache / "hf" / "hub" / "models--org--tiny-flux" / "snapshots" / COMMIT
    assert "--revision picks a snapshot of a hub repository" in refusal("--pipeline", str(folder), "--revision", "v2")
