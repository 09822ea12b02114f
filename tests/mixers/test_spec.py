"""MixerSpec: one way to write a mixer and its options, validated against the registered mixer when read."""

import pytest

from ditkit import DitkitError
from ditkit.mixers import MixerSpec, TokenMixer, swap_mixers
from ditkit.mixers.clear import ClearAttention
from helpers import tiny_backbone


@pytest.mark.parametrize("text,name,options", [
    ("clear", "clear", {}),
    ("clear:radius=8,down_factor=4", "clear", {"radius": 8, "down_factor": 4}),
    (" clear : radius = 2.5 , backend = tiled ", "clear", {"radius": 2.5, "backend": "tiled"}),
    ("clear:radius=1e9", "clear", {"radius": 1e9}),  # YAML leaves 1e9 a string: still a number
    ("ssm:state_size=8,hourglass=2", "ssm", {"state_size": 8, "hourglass": 2}),
    ("downsampled:factor=2", "downsampled", {"factor": 2}),
])
def test_a_spec_parses_to_a_name_and_options(text, name, options):
    spec = MixerSpec.parse(text)
    assert (spec.name, spec.options) == (name, options)
    assert spec == MixerSpec(name, options) and hash(spec) == hash(MixerSpec(name, options))


@pytest.mark.parametrize("spec", [
    MixerSpec("clear"), MixerSpec("clear", {"backend": "tiled", "radius": 2.5, "down_factor": 2}),
    MixerSpec("clear", {"radius": 1e20, "qkv_bias": False}), MixerSpec("downsampled", {"kernel_size": 3}),
])
def test_str_is_canonical_and_parses_back(spec):
    text = str(spec)
    assert MixerSpec.parse(text) == spec and str(MixerSpec.parse(text)) == text


def test_str_lists_the_options_in_the_mixers_own_order():
    assert str(MixerSpec("clear", {"backend": "tiled", "down_factor": 4, "radius": 8})) == (
        "clear:radius=8,down_factor=4,backend=tiled")


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown mixer 'nope': choose one of clear, downsampled, full, ssm"),
    ("clear:rad=2", "mixer 'clear' has no option rad: it accepts qkv_bias, radius, down_factor, backend"),
    ("full:radius=2", "mixer 'full' has no option radius: it accepts qkv_bias"),
    ("clear:radius=big", "mixer 'clear' option radius must be float, got 'big'"),
    ("clear:down_factor=true", "mixer 'clear' option down_factor must be int, got True"),
    ("clear:down_factor=2.5", "mixer 'clear' option down_factor must be int, got 2.5"),
    ("clear:radius=0", "clear radius must be at least 1 token, got 0"),
    ("clear:down_factor=1", "clear down_factor must be 0 \\(off\\) or >= 2, got 1"),
    ("clear:backend=cuda", "unknown clear backend 'cuda': choose one of auto, reference, tiled, flex"),
    ("clear:radius=.inf", "option value '.inf' is not a finite number"),
    ("clear:radius=nan", "option value 'nan' is not a finite number"),
    ("clear:radius", "mixer option 'radius' is not key=value \\(e.g. clear:radius=8\\)"),
    ("clear:radius=[2", "is not a YAML scalar"),
    (":radius=2", "is no mixer name"),
])
def test_a_bad_spec_is_one_line_naming_the_valid_ones(text, message):
    with pytest.raises(DitkitError, match=message) as error:
        MixerSpec.parse(text)
    assert "\n" not in str(error.value)


def test_made_directly_it_is_validated_too():
    with pytest.raises(DitkitError, match="has no option window"):
        MixerSpec("clear", {"window": 2})


def test_option_falls_back_to_the_mixers_default_and_merged_options_win():
    spec = MixerSpec.parse("clear:radius=16")
    assert (spec.option("radius"), spec.option("down_factor"), spec.option("backend")) == (16, 0, "auto")
    assert spec.merged({"radius": 4, "down_factor": 2}) == MixerSpec("clear", {"radius": 4, "down_factor": 2})
    assert spec.merged(None) is spec
    with pytest.raises(DitkitError, match="radius must be at least 1"):
        spec.merged({"radius": 0})


def test_swap_mixers_takes_a_spec_its_text_or_a_name_and_options(one_thread):
    for mixer, options in ((MixerSpec("clear", {"radius": 2}), {}), ("clear:radius=2", {}), ("clear", {"radius": 2}),
                           ("clear:radius=5", {"radius": 2})):
        model = tiny_backbone("dit")
        swap_mixers(model, mixer, **options)
        mixers = [m for m in model.modules() if isinstance(m, TokenMixer)]
        assert mixers and all(isinstance(m, ClearAttention) and m.radius == 2 for m in mixers)


def test_a_registered_mixer_is_scoped_to_its_block_and_never_registered_twice():
    from ditkit.mixers import MIXERS, registered_mixer, unregister_mixer
    from mixers.windowed_mixer import NAME, WindowedAttention

    with registered_mixer(NAME, WindowedAttention):
        assert MixerSpec.parse(f"{NAME}:window=4").option("window") == 4
        with pytest.raises(ValueError, match=f"mixer '{NAME}' is registered twice"):
            registered_mixer(NAME, WindowedAttention).__enter__()
    assert NAME not in MIXERS
    with pytest.raises(DitkitError, match=f"unknown mixer '{NAME}'"):
        MixerSpec.parse(NAME)
    with pytest.raises(DitkitError, match="is not registered"):
        unregister_mixer(NAME)
