"""The contract every diffusers adapter keeps (`ditkit.diffusers.adapters`), as checks of one tiny
model factory (`tiny_diffusers.TINY`; factory(grid) -> model, inputs, layout):

  - CLEAR at a radius covering the grid equals the stock processors;
  - patch-parallel strips (threads in one process, `thread_strips`) each return the whole output;
  - size options off, or at the training size, are the stock transformer bit for bit;
  - a student (CLEAR with pooled tokens, its weights changed as distillation would) saved as
    `ditkit distill` saves it loads into a fresh stock transformer with the same outputs.

tests/diffusers/test_contract.py runs them over every registered adapter;
tests/diffusers/test_adapter_example.py over an adapter registered by the test itself.
"""

import threading

import torch

from ditkit.checkpoint import save_weights
from ditkit.diffusers.adapters import find_adapter
from ditkit.diffusers.clear import apply_clear, student_parameters
from ditkit.diffusers.patch_parallel import patch_parallel
from ditkit.diffusers.pipelines import load_student
from ditkit.diffusers.size_options import remove_size_options, set_size_options
from ditkit.record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord
from thread_strips import on_thread_strips
from tiny_diffusers import run

# (grid, strips, kv_exchange, down_factor); square grids, which every 2D transformer takes
STRIP_CASES = [((8, 8), 2, "halo", 0), ((8, 8), 2, "allgather", 2), ((7, 7), 3, "halo", 0)]
STUDENT_GRID = (4, 4)  # divisible by the pooling factor 2


def built(make, grid=None):
    """The tiny model (eval mode, seeded: the same weights at every call), its inputs and layout."""
    torch.manual_seed(0)
    model, inputs, layout = make() if grid is None else make(grid)
    return model.eval(), inputs, layout


def check_covering_radius_equals_stock(make):
    model, inputs, layout = built(make)
    adapter = find_adapter(model)
    assert layout == adapter.layout
    rows, columns = adapter.grid(model, (), inputs)
    stock = run(model, inputs)
    switched = apply_clear(model, radius=rows + columns)  # every key within reach of every query
    assert switched and len(switched) == len(adapter.self_attention_layers(model))
    torch.testing.assert_close(run(model, inputs), stock, atol=1e-5, rtol=1e-5)


def check_strips_equal_the_whole(make, grid, parts, kv_exchange, down_factor):
    model, inputs, _ = built(make, grid)
    assert find_adapter(model).grid(model, (), inputs) == grid
    stock = run(model, inputs)
    apply_clear(model, radius=2, down_factor=down_factor)
    whole = run(model, inputs)
    assert (whole - stock).abs().max() > 1e-3  # the window really is local
    mine, grids = threading.local(), []

    def strip_of(call_grid, exchange):  # each thread's strip, as on_thread_strips made it
        grids.append(call_grid)
        return mine.strip

    def run_strip(strip):
        mine.strip = strip
        return run(model, inputs)

    with patch_parallel(model, kv_exchange, strip_of=strip_of):
        outputs = on_thread_strips(grid, parts, kv_exchange, run_strip)
    assert grids == [grid] * parts
    for out in outputs:  # every strip holds the whole output (gathered)
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)
    assert not hasattr(model, "_ditkit_patch")
    assert torch.equal(run(model, inputs), whole)  # whole-grid calls again


def check_size_options_off_are_stock(make):
    model, inputs, _ = built(make)
    grid = find_adapter(model).grid(model, (), inputs)
    stock = run(model, inputs)
    set_size_options(model)  # both off: nothing is installed
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)
    set_size_options(model, train_grid=grid, attention_scale=True)  # at the training size: a factor of 1
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)
    set_size_options(model, train_grid=(2, 2), attention_scale=True)
    assert (run(model, inputs) - stock).abs().max() > 1e-5
    remove_size_options(model)
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)


def check_student_round_trip(make, folder):
    model, inputs, _ = built(make, STUDENT_GRID)
    apply_clear(model, radius=2, down_factor=2)
    untuned = run(model, inputs)
    trained, layers = student_parameters(model), find_adapter(model).self_attention_layers(model)
    assert sum(name.endswith("pool_weight") for name in trained) == len(layers)  # one per switched layer
    with torch.no_grad():  # as distillation would have changed them
        for p in trained.values():
            p.add_(torch.randn_like(p) * 0.1)
    student = run(model, inputs)
    assert (student - untuned).abs().max() > 1e-4
    record = RunRecord(model=DiffusersModel(type(model).__name__, str(folder / "teacher")),
                       diffusion=DiffusionSettings(sample_steps=2, cfg_scale=1.0), data=DataSettings(resolution=64),
                       distill={"radius": 2, "down_factor": 2})
    # what `ditkit distill` saves: the student's trainable weights, named within its FlowDenoiser
    save_weights(folder / "student", {f"transformer.{name}": p.detach() for name, p in trained.items()}, record)
    fresh, _, _ = built(make, STUDENT_GRID)
    assert load_student(fresh, folder / "student")["down_factor"] == 2
    torch.testing.assert_close(run(fresh, inputs), student, atol=0, rtol=0)
