import pytest

from ditkit import DitkitError
from ditkit.train.config import load_config


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: DiT-S/4, args: {depth: 3}}\ntrain: {steps: 7, lr: 1e-4}\n")
    cfg = load_config(path, ["train.steps=9", "model.mixer_options.radius=4", "train.grad_clip=null"])
    assert (cfg.model.name, cfg.model.args, cfg.model.mixer_options) == ("DiT-S/4", {"depth": 3}, {"radius": 4})
    assert (cfg.train.steps, cfg.train.lr, cfg.train.grad_clip) == (9, 1e-4, None)
    assert cfg.data.source == "digits"  # defaults fill the rest


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "config has no key train.stepz: valid keys in train are out_dir, steps"),
    ("bogus.a=1", "config has no key bogus: valid keys are model, data, diffusion, train"),
    ("train.steps=many", "config key train.steps must be int, got 'many'"),
    ("train.lr=fast", "config key train.lr must be float"),
    ("data=3", "config section data must be a mapping"),
    ("train.steps", "is not key=value"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(DitkitError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(DitkitError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(DitkitError, match="not valid YAML"):
        load_config(bad)
