"""The contract every named model keeps, checked for each one in NAMED_MODELS (as timm tests every
registered model): it builds, runs at any multiple of its `downsample`, survives a checkpoint round
trip, asks for labels when class-conditional, and its config record round-trips.

Large models run shrunk to their backbone's tiny widths and depths (tests/helpers.py), keeping
their own patch or hourglass; their full size is built on the meta device, which allocates nothing."""

import re

import pytest
import torch

from ditkit import DitkitError
from ditkit.checkpoint import load_checkpoint, save_checkpoint
from ditkit.models import NAMED_MODELS, build_model, config_from_dict, config_to_dict, model_config
from ditkit.record import DataSettings, DiffusionSettings, RunRecord
from helpers import tiny_backbone

RECORD_KEYS = {  # a checkpoint's model record per backbone: old checkpoints must keep loading
    "dit": {"backbone", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes",
            "class_dropout_prob", "learn_sigma", "mixer", "mixer_options", "vae_scale",
            "timestep_freq_shift", "mlp_norm_eps", "pos_embed_base_grid"},  # diffusers' conventions (issue 17)
    "udit": {"backbone", "in_channels", "hidden_size", "num_heads", "depths", "mlp_ratio", "num_classes",
             "class_dropout_prob", "learn_sigma", "mixer", "mixer_options", "vae_scale"},
    "diffussm": {"backbone", "in_channels", "hidden_size", "depth", "num_heads", "hourglass", "state_size",
                 "num_classes", "class_dropout_prob", "learn_sigma", "mixer", "mixer_options", "vae_scale"},
}

names = pytest.mark.parametrize("name", list(NAMED_MODELS))


def module_paths(model) -> set[str]:
    """State-dict keys with list indices blanked: "blocks.3.mlp.fc1.weight" -> "blocks.#.mlp.fc1.weight"."""
    return {re.sub(r"\.\d+(?=\.)", ".#", key) for key in model.state_dict()}


def run(model, height, width, labels=True):
    """One forward pass on a batch of 2 without gradients."""
    x = torch.randn(2, model.config.in_channels, height, width)
    y = torch.tensor([0, model.config.num_classes - 1]) if labels else None
    with torch.no_grad():
        return model(x, torch.tensor([1.0, 500.0]), y)


def training_record(config) -> RunRecord:
    """The record a training run stores with its weights (what Trainer writes)."""
    return RunRecord(model=config, diffusion=DiffusionSettings(), data=DataSettings(resolution=32, source="digits"))


@names
def test_full_size_builds_with_the_structure_of_its_tiny_twin(name):
    """Built at full size on the meta device (shapes only, no memory): the same modules, up to the
    number of blocks, as the shrunk model the other tests run."""
    with torch.device("meta"):
        full = build_model(model_config(name))
    assert module_paths(full) == module_paths(tiny_backbone(name))


@names
def test_output_shape_at_two_sizes(name):
    model = tiny_backbone(name, randomize=0.05)
    d = model.config.downsample
    for height, width in [(d, d), (2 * d, 3 * d)]:  # the smallest input, and a larger non-square one
        out = run(model, height, width)
        assert out.shape == (2, model.config.out_channels, height, width) and torch.isfinite(out).all()


@names
def test_checkpoint_round_trip_gives_the_same_outputs(name, tmp_path):
    model = tiny_backbone(name, randomize=0.05).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    save_checkpoint(tmp_path, 1, model=model, ema=None, optimizer=optimizer,
                    record=training_record(model.config), train_state={})
    loaded, record = load_checkpoint(tmp_path)
    assert loaded.config == model.config and record.model_dict() == config_to_dict(model.config)
    d = model.config.downsample
    x, t, y = torch.randn(2, 3, d, 2 * d), torch.tensor([1.0, 500.0]), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


@names
def test_missing_labels_is_a_one_line_error_and_unconditional_needs_none(name):
    model = tiny_backbone(name)
    d = model.config.downsample
    with pytest.raises(DitkitError, match=r"^this model is class-conditional: pass class labels$"):
        run(model, d, d, labels=False)
    unconditional = tiny_backbone(name, num_classes=0)
    assert unconditional.y_embedder is None
    assert run(unconditional, d, d, labels=False).shape[-2:] == (d, d)


@names
def test_config_record_round_trips(name):
    config = model_config(name, mixer_options={"a": 1})
    record = config_to_dict(config)
    assert set(record) == RECORD_KEYS[record["backbone"]]
    assert config_from_dict(record) == config
    with pytest.raises(DitkitError, match="has no field depht"):
        model_config(name, depht=3)


def test_load_checkpoint_swaps_to_a_mixer_spec_or_its_text(tmp_path):
    from ditkit.mixers import MixerSpec

    config = tiny_backbone("dit").config
    save_checkpoint(tmp_path, 1, model=build_model(config), ema=None, optimizer=None, record=training_record(config),
                    train_state={})
    loaded = [load_checkpoint(tmp_path, ema=False, mixer=mixer, mixer_options=options)
              for mixer, options in ((MixerSpec("clear", {"radius": 2}), None), ("clear:radius=5", {"radius": 2}))]
    for model, record in loaded:
        assert (record.model.mixer, record.model.mixer_options) == ("clear", {"radius": 2})
        assert all(m.radius == 2 for m in model.modules() if getattr(m, "name", "") == "clear")
    with pytest.raises(DitkitError, match="mixer 'clear' has no option rad"):
        load_checkpoint(tmp_path / "missing", mixer="clear:rad=2")  # the spec fails before the file is read


def test_the_registries_refuse_a_second_registration():
    from ditkit.models import DiT, DiTConfig
    from ditkit.models.registry import register_backbone, register_model

    before = dict(NAMED_MODELS)
    with pytest.raises(ValueError, match="model 'DiT-XL/2' is registered twice"):
        register_model("DiT-XL/2", "dit", depth=1)
    with pytest.raises(ValueError, match="backbone 'dit' is registered twice"):
        register_backbone("dit", DiTConfig)(DiT)
    with pytest.raises(ValueError, match="names backbone 'unet', which is not registered"):
        register_model("UNet-S", "unet")
    assert NAMED_MODELS == before and NAMED_MODELS["DiT-XL/2"][1]["depth"] == 28
