"""The dispatcher: one fast path per array library behind the reference math.

``plan`` looks at a tree once per call and picks the fast path of its library
(``_numpy``, ``_torch``, ``_jax``, ``_cupy``), which works out what it needs to
know of the tree (kind, dtype groups, sizes) once and keeps it for the call. Each
step of the call (the norm, the scale, the multiply) asks the fast path first; a
fast path declines a step by returning ``None``, and the reference math of
``gradclip._reference`` runs instead. A fast path imports neither this module
nor anything above it, and it computes what the reference computes, to a few ulps.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .. import _compat, _reference
from .._tree import Tree

__all__ = ["Plan", "enabled", "fast_paths", "plan"]

# Per thread; not a ContextVar, whose get/set torch.compile cannot trace (graph breaks).
_STATE = threading.local()


@contextlib.contextmanager
def fast_paths(on: bool) -> Iterator[None]:
    """Switch the backend fast paths on or off inside a ``with`` block.

    ``with fast_paths(False):`` runs the pure Array API reference, which every fast
    path must agree with (and what ``foreach=False`` selects in ``gradclip.torch``).
    """
    old = enabled()
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = old


def enabled() -> bool:
    return getattr(_STATE, "on", True)


class Plan:
    """How one call computes on one tree: its library's fast path, else the reference."""

    __slots__ = ("fast", "tree")

    def __init__(self, tree: Tree, fast: Any) -> None:
        self.tree, self.fast = tree, fast

    def norm(self, p: float) -> Any:
        """The tree's global ``p``-norm, in its accumulation dtype."""
        out = None if self.fast is None else self.fast.norm(p)
        return _reference.tree_norm(self.tree, p) if out is None else out

    def clip_scale(self, norm: Any, max_norm: Any, eps: float) -> Any:
        """``min(1, max_norm / (norm + eps))`` as a 0-d array of the norm's dtype."""
        fast = getattr(self.fast, "clip_scale", None)
        out = None if fast is None else fast(norm, max_norm, eps)
        return _reference.clip_scale(norm, max_norm, eps=eps) if out is None else out

    def scale(self, scale: Any, norm: Any, nonfinite: str, *, inplace: bool) -> list[Any]:
        """Every leaf times the 0-d ``scale`` (zeros under ``nonfinite="zero"`` when
        the norm is not finite), in place when asked."""
        out = None if self.fast is None else self.fast.scale(scale, norm, nonfinite, inplace)
        if out is None:
            out = _reference.scale_leaves(self.tree, scale, norm, nonfinite, inplace=inplace)
        return out

    def compiled(self, step: Callable[..., Any], **static: Any) -> Callable[..., Any] | None:
        """``step`` compiled once for the library (eager JAX: one dispatch for the whole
        call instead of one per operation), or ``None``."""
        fast = getattr(self.fast, "compiled", None)
        return None if fast is None else fast(step, **static)


def plan(tree: Tree) -> Plan:
    """The plan of one call on ``tree``: the fast path is chosen here, once."""
    if not enabled() or not tree.leaves:
        return Plan(tree, None)
    module = _module(type(tree.leaves[0]), tree.leaves[0])
    return Plan(tree, None if module is None else module.select(tree))


# the fast-path module by the type of a tree's first leaf (imported on first use)
_MODULES: dict[type, Any] = {}


def _module(typ: type, x: Any) -> Any:
    mod = _MODULES.get(typ, False)
    if mod is False:
        mod = _MODULES[typ] = _find_module(x)
    return mod


def _find_module(x: Any) -> Any:
    if _compat.is_numpy_array(x):
        from . import _numpy as mod
    elif _compat.is_torch_array(x):
        from . import _torch as mod
    elif _compat.is_jax_array(x):
        from . import _jax as mod
    elif _compat.is_cupy_array(x):
        from . import _cupy as mod
    else:
        return None
    return mod
