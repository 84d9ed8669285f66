"""Gradient trees: flatten to leaves with their positions, check them, rebuild.

A tree is a single array, a nested ``list``/``tuple``/``dict`` of arrays (``None``
leaves are kept), or, when JAX is imported, any node registered with
``jax.tree_util`` (flax structs, equinox modules, ...). Dicts keep their key order
and namedtuples their type, which ``jax.tree_util`` alone would not guarantee.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import _compat

__all__ = ["Tree", "check_same_structure", "flatten", "size"]

Rebuild = Callable[[Any], Any]


@dataclass(frozen=True)
class Tree:
    """The array leaves of a gradient tree, in order, and how to rebuild it."""

    leaves: Sequence[Any]
    paths: Sequence[str]
    xp: Any
    acc_dtype: Any
    device: Any
    _rebuild: Rebuild
    dtypes: frozenset[Any] | None = None  # the leaves' dtypes, where hashable

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """The tree with the same structure and ``leaves`` in place of the old ones."""
        return self._rebuild(iter(leaves))

    @functools.cached_property
    def requires_grad(self) -> bool:
        """True when a leaf is a torch tensor that requires grad (one C-level pass,
        shared by the checks of one call)."""
        torch = self.xp is not None and _compat.is_torch_namespace(self.xp)
        return torch and _compat.any_requires_grad(self.leaves)


def size(x: Any) -> int:
    """The number of elements of array ``x``."""
    return math.prod([int(s) for s in x.shape]) if x.shape else 1


class _IndexPaths(Sequence[str]):
    """``name[0]``, ``name[1]``, ...: the paths of a flat list, made only when read."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return f"{self.name}[{i % self.n}]"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.name}[{i}]" for i in range(self.n))


def _flat_sequence(tree: Any, name: str) -> tuple[Sequence[Any], Sequence[str], Rebuild] | None:
    """A ``list`` or ``tuple`` of arrays of one type (the common case, thousands of
    leaves) without a walk per leaf: the sequence itself is the leaves (never written
    to: promotions make a new list), and its paths are made only if asked for."""
    typ = type(tree)
    if (typ is not list and typ is not tuple) or not tree:
        return None
    types = set(map(type, tree))
    if len(types) != 1 or not _compat.is_array_api_obj(tree[0]):
        return None
    n = len(tree)
    return tree, _IndexPaths(name, n), lambda it: typ(itertools.islice(it, n))


def _keystr(key: Any) -> str:
    return f"[{key!r}]"


def _flatten_node(node: Any, path: str, leaves: list[Any], paths: list[str]) -> Rebuild:
    if node is None:
        return lambda it: None
    if _compat.is_array_api_obj(node):
        leaves.append(node)
        paths.append(path)
        return lambda it: next(it)
    if isinstance(node, dict):
        keys = list(node)
        subs = [_flatten_node(node[k], path + _keystr(k), leaves, paths) for k in keys]
        typ = type(node)

        def rebuild_dict(it: Any) -> Any:
            values = [sub(it) for sub in subs]
            if typ is dict:
                return dict(zip(keys, values))
            new = copy.copy(node)  # keeps a defaultdict's factory, an OrderedDict's type
            new.update(zip(keys, values))
            return new

        return rebuild_dict
    if isinstance(node, (list, tuple)):
        subs = [_flatten_node(v, f"{path}[{i}]", leaves, paths) for i, v in enumerate(node)]
        typ = type(node)
        if hasattr(node, "_fields"):  # namedtuple
            return lambda it: typ(*[sub(it) for sub in subs])
        if typ in (list, tuple):
            return lambda it: typ([sub(it) for sub in subs])
        return lambda it: typ(sub(it) for sub in subs)
    jax = sys.modules.get("jax")
    if jax is not None:
        rebuild = _flatten_jax_node(jax, node, path, leaves, paths)
        if rebuild is not None:
            return rebuild
    raise TypeError(
        f"{path} is a {type(node).__module__}.{type(node).__qualname__}, not an array: "
        "every leaf of the gradient tree must be an array (or None) from one array library"
    )


def _flatten_jax_node(
    jax: Any, node: Any, path: str, leaves: list[Any], paths: list[str]
) -> Rebuild | None:
    """Flatten one level of a node registered with ``jax.tree_util``, or ``None``."""
    tu = jax.tree_util
    keyed, treedef = tu.tree_flatten_with_path(node, is_leaf=lambda n: n is not node)
    if tu.treedef_is_leaf(treedef):
        return None
    subs = [_flatten_node(v, path + tu.keystr(k), leaves, paths) for k, v in keyed]
    return lambda it: tu.tree_unflatten(treedef, [sub(it) for sub in subs])


def flatten(
    tree: Any,
    name: str = "grads",
    *,
    inplace: bool = False,
    allow_empty: bool = False,
) -> Tree:
    """Flatten ``tree`` and check that its leaves are arrays of one library.

    Integer leaves are promoted to the namespace's default floating dtype; with
    ``inplace`` they are a ``TypeError``, and so is any leaf that cannot be written
    in place (checked here, before anything is computed or written).
    """
    flat = _flat_sequence(tree, name)
    if flat is not None:
        leaves, paths, rebuild = flat
    else:
        leaves, paths = [], []
        rebuild = _flatten_node(tree, name, leaves, paths)
    if not leaves:
        if allow_empty:
            return Tree(leaves, paths, None, None, None, rebuild)
        raise ValueError(f"{name} has no array leaves (only None or empty containers)")

    xp = _namespace(leaves, paths)
    dev = _compat.device(leaves[0])
    try:
        kinds = {dt: _compat.dtype_kind(xp, dt) for dt in {x.dtype for x in leaves}}
    except TypeError:  # an unhashable dtype: leaf by leaf
        kinds = None
    if kinds is None or any(k not in ("low", "float", "complex") for k in kinds.values()):
        leaves = _promote_or_raise(xp, leaves, paths, promote_int=not inplace)
        kinds = None
    acc = _compat.accumulation_dtype(xp, [x.dtype for x in leaves] if kinds is None else kinds)
    out = Tree(leaves, paths, xp, acc, dev, rebuild, None if kinds is None else frozenset(kinds))
    bad = _compat.first_unwritable(leaves, lambda: out.requires_grad) if inplace else None
    if bad is not None:
        raise TypeError(
            f"{paths[bad[0]]} cannot be clipped in place: {bad[1]}; "
            "use the functional form gradclip.clip_by_global_norm, which returns new arrays"
        )
    return out


def _promote_or_raise(
    xp: Any, leaves: Sequence[Any], paths: Sequence[str], *, promote_int: bool
) -> list[Any]:
    """The leaves with integer ones promoted to the default float (a new list); a
    ``TypeError`` naming the first leaf that is not floating point."""
    out = list(leaves)
    for i, x in enumerate(leaves):
        kind = _compat.dtype_kind(xp, x.dtype)
        if kind == "int" and promote_int:
            out[i] = xp.astype(x, _compat.default_float(xp, _compat.device(x)))
        elif kind == "long":
            raise TypeError(
                f"{paths[i]} has dtype {x.dtype}, wider than float64, which gradclip does "
                "not take: its norm is accumulated in float64, which cannot hold values "
                "beyond float64's range; cast the leaf to float64 (x.astype(np.float64))"
            )
        elif kind not in ("low", "float", "complex"):
            hint = (
                "; integer gradients are promoted only by the functional form, "
                "use it or pass a floating array"
                if kind == "int"
                else ""
            )
            raise TypeError(
                f"{paths[i]} has dtype {x.dtype}, but gradients must be floating point{hint}"
            )
    return out


def _namespace(leaves: Sequence[Any], paths: Sequence[str]) -> Any:
    """The one namespace of all leaves; a ``TypeError`` naming two that differ, or a
    masked array."""
    types = set(map(type, leaves))
    _reject_masked(types, leaves, paths)
    if len(types) == 1:
        return _compat.array_namespace(leaves[0])
    seen: dict[type, tuple[Any, int]] = {}
    first: tuple[Any, int] | None = None
    for i, x in enumerate(leaves):
        typ = type(x)
        if typ not in seen:
            seen[typ] = (_compat.array_namespace(x), i)
        xp, j = seen[typ]
        if first is None:
            first = (xp, j)
        elif xp is not first[0]:
            a, b = leaves[first[1]], x
            raise TypeError(
                f"all leaves must come from one array library, but {paths[first[1]]} is a "
                f"{_compat.library_name(a)} array ({type(a).__name__}) and {paths[i]} is a "
                f"{_compat.library_name(b)} array ({type(b).__name__})"
            )
    assert first is not None
    return first[0]


def _masked_types() -> tuple[type, ...]:
    """The masked array types of the libraries loaded (none exist before their module
    is imported, so nothing is imported here)."""
    out = []
    ma = sys.modules.get("numpy.ma")
    if ma is not None:
        out.append(ma.MaskedArray)
    masked = sys.modules.get("torch.masked")
    if masked is not None and hasattr(masked, "MaskedTensor"):
        out.append(masked.MaskedTensor)
    return tuple(out)


def _reject_masked(types: set[type], leaves: Sequence[Any], paths: Sequence[str]) -> None:
    """A ``TypeError`` naming the first masked leaf: a mask is not honoured anywhere
    (the fast paths read the data under it, the reference may not), so none is taken."""
    masked = _masked_types()
    if not masked or not any(issubclass(t, masked) for t in types):
        return
    i = next(i for i, x in enumerate(leaves) if isinstance(x, masked))
    raise TypeError(
        f"{paths[i]} is a masked array ({type(leaves[i]).__module__}."
        f"{type(leaves[i]).__qualname__}), which gradclip does not take: masks are not "
        "honoured; pass the values with the masked ones filled in (NumPy: x.filled(0), "
        "torch: x.to_tensor(0)) or the data under the mask (x.data, x.get_data())"
    )


def check_same_structure(a: Tree, b: Tree, names: tuple[str, str]) -> None:
    """A ``ValueError`` naming the first position where two trees differ."""
    pa = [p[len(names[0]) :] for p in a.paths]
    pb = [p[len(names[1]) :] for p in b.paths]
    if pa == pb:
        return
    for ka, kb in zip(pa, pb):
        if ka != kb:
            raise ValueError(
                f"{names[0]} and {names[1]} differ in structure: {names[0]}{ka} vs {names[1]}{kb}"
            )
    raise ValueError(f"{names[0]} has {len(pa)} array leaves but {names[1]} has {len(pb)}")
