"""The diffusers adapter contract (`diffusers_contract`) over every registered adapter, each with its
tiny model from `tiny_diffusers.TINY`. A new transformer is its adapter file plus its factory in TINY."""

import pytest

from diffusers_contract import (
    STRIP_CASES,
    check_covering_radius_equals_stock,
    check_size_options_off_are_stock,
    check_strips_equal_the_whole,
    check_student_round_trip,
)
from ditkit.diffusers.adapters import ADAPTERS
from tiny_diffusers import TINY

NAMES = list(ADAPTERS)


def test_every_registered_adapter_has_a_tiny_model():
    assert set(NAMES) <= set(TINY), f"add a tiny factory to tiny_diffusers.TINY for {set(NAMES) - set(TINY)}"


@pytest.mark.parametrize("name", NAMES)
def test_covering_radius_equals_stock(name, one_thread):
    check_covering_radius_equals_stock(TINY[name])


@pytest.mark.parametrize("grid, parts, kv_exchange, down_factor", STRIP_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_strips_equal_the_whole(name, grid, parts, kv_exchange, down_factor, one_thread):
    check_strips_equal_the_whole(TINY[name], grid, parts, kv_exchange, down_factor)


@pytest.mark.parametrize("name", NAMES)
def test_size_options_off_are_stock(name, one_thread):
    check_size_options_off_are_stock(TINY[name])


@pytest.mark.parametrize("name", NAMES)
def test_student_round_trip(name, tmp_path, one_thread):
    check_student_round_trip(TINY[name], tmp_path)
