"""One way to install and remove what a feature puts on a diffusers transformer.

CLEAR (`apply_clear`), the size options (`set_size_options`) and patch-parallel sampling
(`enable_patch_parallel`) each change a transformer in place: forward hooks, swapped attention
processors, an attribute patched on a submodule. Each records what it did in a `HookSet` kept on
the transformer under its own slot, and removing the feature undoes exactly that set, in reverse
order, whatever the other features did since.

    hooks = HookSet()
    hooks.pre_hook(transformer, record_grid)
    hooks.set_processor(attn, processor)
    install(transformer, "_ditkit_clear", hooks)
    ...
    uninstall(transformer, "_ditkit_clear")   # the stock processors and no hook: as before
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class HookSet:
    """The changes one feature made to one transformer, each with its undo step."""

    def __init__(self, state: Any = None):
        self.state = state  # what the feature's hooks share (its options, the call in progress)
        self._undo: list[Callable[[], None]] = []

    def pre_hook(self, module: nn.Module, hook, with_kwargs: bool = False) -> None:
        """A forward pre-hook on `module` (hook(module, args[, kwargs]))."""
        self._undo.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs).remove)

    def post_hook(self, module: nn.Module, hook, always_call: bool = False) -> None:
        """A forward hook on `module` (hook(module, args, output)); `always_call` also after a failed call."""
        self._undo.append(module.register_forward_hook(hook, always_call=always_call).remove)

    def set_processor(self, attn: nn.Module, processor) -> None:
        """Give a diffusers attention layer `processor`; removal gives it back the one it had."""
        previous = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(previous))

    def patch_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set `obj.name` on the instance (shadowing its class's method); removal deletes it again."""
        obj.__dict__[name] = value
        self._undo.append(lambda: obj.__dict__.pop(name, None))

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Any other undo step, run at removal in its turn."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Undo every change, the last first."""
        while self._undo:
            self._undo.pop()()


def install(transformer: nn.Module, slot: str, hooks: HookSet) -> None:
    """Keep `hooks` on the transformer under `slot` (one set per feature)."""
    setattr(transformer, slot, hooks)


def installed(transformer: nn.Module, slot: str) -> HookSet | None:
    """The feature's set on the transformer, or None when it is off."""
    return getattr(transformer, slot, None)


def uninstall(transformer: nn.Module, slot: str) -> bool:
    """Remove the feature's set (nothing when it is off); True when there was one."""
    hooks = installed(transformer, slot)
    if hooks is None:
        return False
    hooks.remove()
    delattr(transformer, slot)
    return True
