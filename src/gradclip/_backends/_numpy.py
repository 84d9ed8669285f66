"""The NumPy backend: the host paths of ``._host`` for real floating point arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _reference
from .._tree import Tree
from . import _host

__all__ = ["select"]


def select(tree: Tree) -> NumPyPath | None:
    """The fast path for a tree of NumPy arrays of float16 to float64 or bfloat16
    (complex and other dtypes: the reference)."""
    for dt in {x.dtype for x in tree.leaves}:
        if not ((dt.kind == "f" and dt.itemsize in (2, 4, 8)) or dt.name == "bfloat16"):
            return None
    return NumPyPath(tree)


class NumPyPath:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def norm(self, p: float) -> Any:
        if p != 2 and not math.isinf(p):
            return None
        tree = self.tree
        with np.errstate(over="ignore"):  # a float32 norm beyond 3.4e38 is inf
            value = _host.norm_of_arrays(tree.leaves, p, tree.acc_dtype)
            return np.asarray(value, dtype=tree.acc_dtype)

    def scale(self, scale: Any, norm: Any, nonfinite: str, inplace: bool) -> Sequence | None:
        if nonfinite == "zero":
            return None
        tree = self.tree
        casts: dict[Any, Any] = {}
        by_dtype = {x.dtype: x for x in tree.leaves}
        factors = {dt: _reference.cast_scale(tree, casts, scale, x) for dt, x in by_dtype.items()}
        if inplace:
            # NumPy arrays live on the host: reading the scale waits on nothing, and
            # x * 1 is x bit for bit, so a scale of 1 writes nothing
            if float(scale) != 1.0:
                _host.scale_arrays(tree.leaves, factors)
            return tree.leaves
        outs = [np.empty_like(x, order="C") for x in tree.leaves]
        _host.scale_arrays(tree.leaves, factors, outs)
        return outs
