import pytest
import torch
from torch import nn

from ditkit.mixers import MIXERS, AttentionMixer, TokenMixer, register_mixer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def scratch_mixers():
    """Register mixers for one test and remove them afterwards."""
    before = dict(MIXERS)

    @register_mixer("test-scaled")
    class ScaledAttention(AttentionMixer):  # same projections plus one extra parameter
        def __init__(self, dim, num_heads, qkv_bias=True):
            super().__init__(dim, num_heads, qkv_bias)
            self.gain = nn.Parameter(torch.full((1,), 2.0))

        def attend(self, q, k, v, grid, num_global):
            return self.gain * torch.nn.functional.scaled_dot_product_attention(q, k, v)

    @register_mixer("test-identity")
    class Identity(TokenMixer):  # no weights at all
        def forward(self, x, grid, num_global=0):
            return x

    yield
    MIXERS.clear()
    MIXERS.update(before)


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
