"""The token-mixer contract, checked for every registered mixer: the built-ins, the one-file mixer
in windowed_mixer.py and the one registered below. A mixer that passes works everywhere a mixer
is used (backbones, weight swaps, patch-parallel sampling).

Strip execution runs in one process: one thread per strip, the strips' collectives implemented
with a barrier (`thread_strips.ThreadStrip`), so no process is started per mixer.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from torch import Tensor, nn

from ditkit import DitkitError
from ditkit.mixers import MIXERS, Grid, TokenMixer, build_mixer, registered_mixer, swap_mixers
from mixers import windowed_mixer
from thread_strips import on_thread_strips

DIM, HEADS = 16, 2


class RowMean(TokenMixer):
    """Not attention: each image token plus the mean of its row, then `proj` (a name `full` has too)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        image = x[:, num_global:].unflatten(1, grid)
        image = image + image.mean(dim=2, keepdim=True)
        return self.proj(torch.cat([x[:, :num_global], image.flatten(1, 2)], dim=1))


TEST_MIXERS = {windowed_mixer.NAME: windowed_mixer.WindowedAttention, "test-row-mean": RowMean}
CASES = ([(name, {}) for name in sorted(MIXERS)] + [(name, {}) for name in TEST_MIXERS]
         + [("clear", {"radius": 2, "down_factor": 2})])
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in options.items()) for name, options in CASES]


@pytest.fixture(autouse=True)
def test_mixers():
    """The test mixers are registered for each test of the contract, and removed after it."""
    with ExitStack() as stack:
        for name, cls in TEST_MIXERS.items():
            stack.enter_context(registered_mixer(name, cls))
        yield


def multiple(name: str, options: dict) -> int:
    return MIXERS[name].grid_multiple(**options)


def grid_for(name: str, options: dict) -> Grid:
    """At least 5 x 3 tokens, each side a multiple of what the mixer needs."""
    m = multiple(name, options)
    return m * -(-5 // m), m * -(-3 // m)


def random_mixer(name: str, options: dict) -> TokenMixer:
    """The mixer with every weight perturbed: zero-initialised weights would hide gradients."""
    mixer = build_mixer(name, DIM, HEADS, **options).eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mixer


def tokens(grid: Grid, num_global: int = 0, batch: int = 2) -> Tensor:
    return torch.randn(batch, num_global + grid[0] * grid[1], DIM)


parametrize_cases = pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)


@parametrize_cases
def test_output_shape_equals_input_shape(name, options, one_thread):
    grid = grid_for(name, options)
    x = tokens(grid)
    assert random_mixer(name, options)(x, grid).shape == x.shape


@parametrize_cases
def test_attention_work_is_a_share_of_the_pairs_or_none(name, options):
    work = build_mixer(name, DIM, HEADS, **options).attention_work(grid_for(name, options))
    assert work is None or 0 < work <= 1


@parametrize_cases
def test_global_tokens_are_kept_or_refused_with_a_ditkit_error(name, options, one_thread):
    mixer, grid = random_mixer(name, options), grid_for(name, options)
    x = tokens(grid, num_global=3)
    if mixer.accepts_global_tokens:
        assert mixer(x, grid, 3).shape == x.shape
    else:
        with pytest.raises(DitkitError):
            mixer(x, grid, 3)


@parametrize_cases
def test_grids_of_the_grid_multiple_work_and_others_are_refused(name, options, one_thread):
    mixer, m = random_mixer(name, options), multiple(name, options)
    for grid in [(m, m), (2 * m, 3 * m)]:
        assert mixer(tokens(grid), grid).shape == tokens(grid).shape
    if m > 1:
        with pytest.raises(DitkitError):
            mixer(tokens((m + 1, m)), (m + 1, m))


@parametrize_cases
def test_gradients_reach_every_parameter(name, options, one_thread):
    mixer, grid = random_mixer(name, options).train(), grid_for(name, options)
    out = mixer(tokens(grid), grid)
    (out * torch.randn_like(out)).sum().backward()
    for param_name, param in mixer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@parametrize_cases
def test_swap_from_full_keeps_shared_weights_or_refuses(name, options, one_thread):
    model = nn.Sequential(random_mixer("full", {}))
    full_weights = {k: v.clone() for k, v in model[0].state_dict().items()}
    new_keys = build_mixer(name, DIM, HEADS, **options).state_dict().keys()
    if not set(full_weights) <= set(new_keys):  # it would drop weights of full
        with pytest.raises(DitkitError, match="cannot take over"):
            swap_mixers(model, name, **options)
        return
    added = swap_mixers(model, name, **options)
    assert model[0].name == name
    assert sorted(added) == sorted(f"0.{k}" for k in set(new_keys) - set(full_weights))
    for key, value in model[0].state_dict().items():
        if key in full_weights:
            assert torch.equal(value, full_weights[key]), key


def run_on_strips(mixer: TokenMixer, x: Tensor, grid: Grid, parts: int, kv_exchange: str = "halo") -> Tensor:
    """`mixer` run as patch-parallel sampling runs it, one thread per strip; the strips' outputs
    concatenated in image order."""
    outputs = on_thread_strips(grid, parts, kv_exchange, lambda strip: mixer.forward_strip(x[:, strip.tokens], strip))
    return torch.cat(outputs, dim=1)


@parametrize_cases
@pytest.mark.parametrize("kv_exchange", ["halo", "allgather"])
def test_strip_execution_equals_whole_grid_execution(name, options, kv_exchange, one_thread):
    mixer, grid = random_mixer(name, options), grid_for(name, options)
    x = tokens(grid)
    with torch.no_grad():
        whole = mixer(x, grid)
    for parts in (1, 2, 3):
        torch.testing.assert_close(run_on_strips(mixer, x, grid, parts, kv_exchange), whole, atol=1e-5, rtol=1e-5)


def test_strips_on_threads_reach_beyond_their_neighbours(one_thread):
    """clear with a halo wider than a strip: each strip reads rows of several others, still exact."""
    mixer, grid = random_mixer("clear", {"radius": 3}), (7, 3)
    x = tokens(grid)
    with torch.no_grad():
        torch.testing.assert_close(run_on_strips(mixer, x, grid, 5), mixer(x, grid), atol=1e-5, rtol=1e-5)
