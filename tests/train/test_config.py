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


def test_ranges_are_declared_on_the_fields_and_checked_on_direct_construction():
    from ditkit.train.config import TrainSection

    with pytest.raises(DitkitError, match=r"config key train.steps must be at least 1, got 0"):
        TrainSection(steps=0)
    with pytest.raises(DitkitError, match=r"config key train.sharding must be one of none, fsdp, got 'zero'"):
        TrainSection(sharding="zero")


def test_a_range_error_names_where_the_section_sits_in_a_larger_config():
    from ditkit.config import config_from_dict
    from ditkit.distill import DistillConfig

    with pytest.raises(DitkitError, match=r"config key arms.r2.distill.radius must be greater than 0, got -1.0"):
        config_from_dict({"radius": -1}, DistillConfig, "arms.r2.distill.")


def test_builtin_configs_resolve_by_name_on_the_ground_floor(tmp_path):
    from ditkit.config import BUILTIN_CONFIGS, resolve_config

    assert resolve_config("digits") == BUILTIN_CONFIGS / "digits.yaml"
    with pytest.raises(DitkitError, match="neither a file nor a built-in config .*digits"):
        resolve_config(str(tmp_path / "nope"))


@pytest.mark.parametrize("overrides", [
    ["model.mixer=clear:radius=8,down_factor=2"],
    ["model.mixer=clear", "model.mixer_options={radius: 8, down_factor: 2}"],
    ["model.mixer=clear:radius=3,down_factor=2", "model.mixer_options.radius=8"],  # the options win
])
def test_model_mixer_takes_a_spec_meaning_the_same_as_mixer_and_mixer_options(overrides):
    from ditkit.mixers import MixerSpec

    model = load_config(None, overrides).model
    assert (model.mixer, model.mixer_options) == ("clear", {"radius": 8, "down_factor": 2})
    assert model.mixer_spec() == MixerSpec.parse("clear:radius=8,down_factor=2")


@pytest.mark.parametrize("override,message", [
    ("model.mixer=clear:radius=0", "config key model.mixer: clear radius must be at least 1 token, got 0"),
    ("model.mixer=clear:window=2", "config key model.mixer: mixer 'clear' has no option window: it accepts"),
    ("model.mixer=nope", "config key model.mixer: unknown mixer 'nope': choose one of"),
    ("model.args.mixer=clear", "config key model.args.mixer would set the mixer in a second place: set model.mixer"),
    ("model.args.mixer_options={radius: 2}", "config key model.args.mixer_options would set the mixer in a second"),
])
def test_the_mixer_is_validated_when_the_config_is_read_and_set_in_one_place(override, message):
    with pytest.raises(DitkitError, match=message):
        load_config(None, [override])


def test_distill_takes_its_clear_settings_as_a_spec_or_as_fields():
    from ditkit.config import config_from_dict
    from ditkit.distill import DistillConfig
    from ditkit.mixers import MixerSpec

    spec = config_from_dict({"mixer": "clear:radius=4,down_factor=2"}, DistillConfig)
    fields = config_from_dict({"radius": 4, "down_factor": 2}, DistillConfig)
    assert (spec.radius, spec.down_factor, spec.backend) == (fields.radius, fields.down_factor, fields.backend)
    assert spec.mixer_spec() == fields.mixer_spec() == MixerSpec("clear", {"radius": 4, "down_factor": 2,
                                                                           "backend": "auto"})
    assert config_from_dict({"mixer": "clear:radius=4", "radius": 4}, DistillConfig).radius == 4  # agree: fine
    for values, message in (({"mixer": "clear:radius=4", "radius": 3}, "give the CLEAR settings once"),
                            ({"mixer": "full"}, "config key mixer must be clear"),
                            ({"down_factor": 1}, "clear down_factor must be 0 \\(off\\) or >= 2"),
                            ({"backend": "cuda"}, "unknown clear backend 'cuda'")):
        with pytest.raises(DitkitError, match=message):
            config_from_dict(values, DistillConfig)


@pytest.mark.parametrize("override,message", [
    ("model.args.depth=0", "model.args.depth must be at least 1, got 0"),
    ("model.args.depth=-1", "model.args.depth must be at least 1, got -1"),
    ("model.args.depth=abc", "model.args.depth must be a whole number at least 1, got 'abc'"),
    ("model.args.class_dropout_prob=2", r"model.args.class_dropout_prob must be in \[0, 1\), got 2"),
    ("model.args.num_heads=3", "model.args.num_heads=3 does not divide model.args.hidden_size=128 .*num_heads=2"),
    ("model.args.num_heads=0", "model.args.num_heads must be at least 1, got 0"),
    ("model.args.hidden_size=0", "model.args.hidden_size must be at least 1, got 0"),
    ("model.args.patch_size=0", "model.args.patch_size must be at least 1, got 0"),
    ("model.args.mlp_ratio=0", "model.args.mlp_ratio must be greater than 0, got 0"),
    ("model.name=DiT-Nope", "unknown model 'DiT-Nope'"),
    ("model.args.depthz=2", "has no field depthz"),
    ("train.seed=100000000000000000000", r"train.seed must be in \[0, 18446744073709551616\)"),
    ("diffusion.cfg_scale=-2", "diffusion.cfg_scale must be a finite number at least 0 .*got -2.0"),
])
def test_every_model_and_run_setting_is_checked_when_the_config_loads(override, message):
    with pytest.raises(DitkitError, match=message) as error:
        load_config(None, ["model.name=DiT-Nano/4", override])
    assert "\n" not in str(error.value)


def test_a_seed_of_64_bits_is_taken_and_a_u_dit_needs_a_block():
    assert load_config(None, [f"train.seed={2**64 - 1}"]).train.seed == 2**64 - 1
    with pytest.raises(DitkitError, match=r"model.args.depths must be 5 whole numbers .*got \[0, 0, 0, 0, 0\]"):
        load_config(None, ["model.name=U-DiT-Nano", "model.args.depths=[0, 0, 0, 0, 0]"])


@pytest.mark.parametrize("weights,message", [
    ({"task": -1}, "weights.task must be at least 0, got -1"),
    ({"task": 0, "output": 0, "attention": 0}, "weights.task, weights.output and weights.attention are all 0"),
])
def test_distill_loss_weights_are_checked_when_the_config_loads(weights, message):
    from ditkit.config import config_from_dict
    from ditkit.distill import DistillConfig

    with pytest.raises(DitkitError, match=message):
        config_from_dict({"weights": weights}, DistillConfig)


@pytest.mark.parametrize("content,message", [
    (b"- model: {name: DiT-S/4}\n", "holds a list, not a mapping of sections"),
    ("model: {name: DiT-S/4}  # caf\u00e9\n".encode("latin-1"), "is not UTF-8 text .*save it as UTF-8"),
    (b"just words\n", "holds a str, not a mapping of sections"),
])
def test_a_config_file_that_is_not_a_utf8_mapping_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(DitkitError, match=message):
        load_config(path)
