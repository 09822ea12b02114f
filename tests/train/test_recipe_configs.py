"""The ImageNet recipe configs under configs/ (docs/data.md) load, carry the papers' settings, and
name `ditkit prepare` when their latents are not there yet."""

from pathlib import Path

import pytest

from ditkit.errors import DitkitError
from ditkit.train import load_config
from ditkit.train.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {"imagenet-256-dit-xl-2.yaml": "DiT-XL/2", "imagenet-256-u-dit-b.yaml": "U-DiT-B",
           "imagenet-256-diffussm-xl.yaml": "DiffuSSM-XL"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_configs_load_with_the_papers_settings(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.name == RECIPES[name]
    assert (cfg.data.source, cfg.data.resolution, cfg.data.hflip) == ("latents:/data/imagenet-256-latents", 256, True)
    assert (cfg.diffusion.objective, cfg.diffusion.learn_sigma) == ("ddpm", True)
    assert cfg.train.batch_size * 8 == 256  # per process, on 8 GPUs
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.grad_clip) == (1e-4, 0, 0, None)
    assert cfg.train.ema_decay == 0.9999 and cfg.train.steps == 400_000
    assert cfg.train.ssm_lr == 1e-3  # the default; only DiffuSSM has SSM dynamics it applies to


def test_a_recipe_without_its_latents_names_prepare(tmp_path):
    cfg = load_config(CONFIGS / "imagenet-256-dit-xl-2.yaml", [f"data.source=latents:{tmp_path / 'none'}"])
    with pytest.raises(DitkitError, match="none do not exist: make them with ditkit prepare SOURCE --vae PATH"):
        Trainer(cfg, progress=False)
