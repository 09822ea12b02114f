"""Peak memory of a call: CUDA's allocator statistics, or on CPU (and on the meta device) a
dispatch-mode tracker of the bytes held by tensors the call creates (inputs that already exist are
not counted)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode


def _storage_key(t: torch.Tensor) -> int:
    """One key per storage: its data pointer, or on meta (where every pointer is 0) its address."""
    storage = t.untyped_storage()
    return storage._cdata if t.device.type == "meta" else storage.data_ptr()


class _LiveBytes(TorchDispatchMode):
    """Bytes alive in the storages the ops create: on real devices, or (`meta`) on the meta device,
    where nothing is allocated but every tensor knows its size."""

    def __init__(self, meta: bool = False):
        super().__init__()
        self.meta = meta
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, tensors alive]
        self.current = self.peak = self.largest = 0

    def _counts(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (t.device.type == "meta") == self.meta

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, tensor: torch.Tensor, input_storages: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = _storage_key(tensor)
        if key == 0 or (key in input_storages and key not in self.live):  # a view of memory that existed before
            return
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, storage.nbytes())
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if self._counts(t)}
        for t in out if isinstance(out, tuple | list) else (out,):
            if self._counts(t):
                self._track(t, inputs)
        return out


def largest_tensor(fn: Callable[[], object]) -> int:
    """Bytes of the largest tensor storage `fn()` creates (on any device): shows whether a call
    ever materialises an N x N score matrix or mask."""
    with _LiveBytes() as tracker:
        fn()
    return tracker.largest


def retained_memory(fn: Callable[[], object]) -> int:
    """Bytes of the tensors `fn()` creates that are still alive when it returns, its result held:
    for a forward that returns an output needing grad, its autograd graph's saved tensors plus the output."""
    with _LiveBytes() as tracker:
        result = fn()  # noqa: F841  (held until the count is read)
        held = tracker.current
    return held


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while `fn()` runs, above what existed before. On "meta" the bytes its
    tensors would take: a training step of a model too large for this machine, measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveBytes(meta=device.type == "meta") as tracker:
        fn()
    return tracker.peak
