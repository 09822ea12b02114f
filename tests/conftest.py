import pytest
import torch
from torch import nn

from ditkit.cli.main import main
from ditkit.mixers import MIXERS, AttentionMixer, TokenMixer, registered_mixer
from ditkit.models import BACKBONES, NAMED_MODELS
from helpers import tiny_run
from mixers import windowed_mixer as windowed


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class ScaledAttention(AttentionMixer):
    """`test-scaled`: the projections of `full` plus one extra parameter."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__(dim, num_heads, qkv_bias)
        self.gain = nn.Parameter(torch.full((1,), 2.0))

    def attend(self, q, k, v, grid, num_global):
        return self.gain * torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Identity(TokenMixer):
    """`test-identity`: no weights at all."""

    def forward(self, x, grid, num_global=0):
        return x


@pytest.fixture
def scratch_mixers():
    """Register test-scaled and test-identity for one test and remove them afterwards."""
    with registered_mixer("test-scaled", ScaledAttention), registered_mixer("test-identity", Identity):
        yield


@pytest.fixture
def windowed_mixer():
    """Register `test-windowed` (tests/mixers/windowed_mixer.py) for one test."""
    with windowed.registered():
        yield


def registries() -> dict:
    return {"mixers": dict(MIXERS), "backbones": dict(BACKBONES), "models": dict(NAMED_MODELS)}


@pytest.fixture(autouse=True)
def _registries_unchanged():
    """A test's own mixers and models stay its own: every registry is as it was when the test ends
    (so nothing test-only shows in `ditkit info --list` of a later test)."""
    before = registries()
    yield
    after = registries()
    leaked = {kind: sorted(set(after[kind]) ^ set(before[kind])) for kind in before if after[kind] != before[kind]}
    assert not leaked, f"the test left the registries changed: {leaked} (register with registered_mixer)"


@pytest.fixture(scope="session")
def digits_features_path(tmp_path_factory):
    """A ditkit-digits feature extractor trained briefly (2 epochs) once per test session."""
    from ditkit.metrics.features import digits_features

    path = tmp_path_factory.mktemp("features") / "ditkit-digits.pt"
    digits_features(path, progress=False, epochs=2)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Nothing a test does lands in the user's ~/.cache/ditkit."""
    monkeypatch.setenv("DITKIT_CACHE", str(tmp_path / "ditkit-cache"))


@pytest.fixture
def one_thread():
    """Small-tensor tests: on a busy shared CPU, intra-op threads make them 10x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny digits run trained for 2 steps (helpers.tiny_run), once per test module."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "digits", *tiny_run(run, "train.steps=2"), "--no-progress"]) == 0
    return run
