"""Done when: a diffusers transformer ditkit does not support is one adapter, written in this one
file and edited nowhere else, and then passes the same contract as FLUX, SD3 and PixArt
(`diffusers_contract`): CLEAR, patch-parallel strips, size options, students.

The example is diffusers' class-conditional `DiTTransformer2DModel` (DiT-XL/2 in diffusers'
layout): self-attention over image tokens only, a PatchEmbed with sin-cos positions, and an output
projection named `proj_out_2` (not `proj_out`), so the adapter names its `output_module`. Its
registration is scoped to the tests here (a fixture), never left in the global registry.
"""

import pytest
import torch
from torch import nn

from diffusers import DiTTransformer2DModel
from diffusers_contract import (
    STRIP_CASES,
    check_covering_radius_equals_stock,
    check_size_options_off_are_stock,
    check_strips_equal_the_whole,
    check_student_round_trip,
)
from ditkit.diffusers.adapters import ADAPTERS, PatchEmbedAdapter, register_adapter, unregister_adapter
from ditkit.diffusers.clear import apply_clear
from ditkit.diffusers.size_options import set_size_options
from ditkit.errors import DitkitError


class DiTAdapter(PatchEmbedAdapter):
    """diffusers' DiT: everything but the output projection's name is PatchEmbedAdapter's."""

    class_name, label, layout = "DiTTransformer2DModel", "DiT", "image_only"

    def output_module(self, transformer: nn.Module) -> nn.Module:
        return transformer.proj_out_2  # the last token-wise layer; the output is unpatchified after it


def tiny_dit(grid=(6, 6)):
    """A 2-block DiT at `grid` tokens (square: DiT unpatchifies to a square image), 10 classes."""
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                  norm_num_groups=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    inputs = dict(hidden_states=torch.randn(2, 4, 2 * grid[0], 2 * grid[1]), timestep=torch.tensor([500, 200]),
                  class_labels=torch.tensor([3, 7]))
    return model, inputs, "image_only"


@pytest.fixture
def dit_adapter():
    """DiT supported for one test, and unsupported again afterwards."""
    adapter = register_adapter(DiTAdapter())
    yield adapter
    unregister_adapter(adapter.class_name)


def test_unsupported_until_registered_and_only_for_the_test(dit_adapter):
    unregister_adapter("DiTTransformer2DModel")
    with pytest.raises(DitkitError, match="apply_clear supports FluxTransformer2DModel.*not DiTTransformer2DModel"):
        apply_clear(tiny_dit()[0], radius=2)
    register_adapter(dit_adapter)
    assert apply_clear(tiny_dit()[0], radius=2) == [f"transformer_blocks.{i}.attn1" for i in range(2)]
    with pytest.raises(DitkitError, match="registered already .DiTAdapter.: unregister_adapter it first"):
        register_adapter(DiTAdapter())


def test_the_registration_does_not_leak():
    assert "DiTTransformer2DModel" not in ADAPTERS


def test_covering_radius_equals_stock(dit_adapter, one_thread):
    check_covering_radius_equals_stock(tiny_dit)


@pytest.mark.parametrize("grid, parts, kv_exchange, down_factor", STRIP_CASES)
def test_strips_equal_the_whole(dit_adapter, grid, parts, kv_exchange, down_factor, one_thread):
    check_strips_equal_the_whole(tiny_dit, grid, parts, kv_exchange, down_factor)


def test_size_options_off_are_stock(dit_adapter, one_thread):
    check_size_options_off_are_stock(tiny_dit)


def test_positions_are_refused_as_already_interpolated(dit_adapter):
    with pytest.raises(DitkitError, match="DiT already interpolates"):
        set_size_options(tiny_dit()[0], positions="interpolate")


def test_student_round_trip(dit_adapter, tmp_path, one_thread):
    check_student_round_trip(tiny_dit, tmp_path)
