"""Global norms of gradients sharded over processes or devices, each shard counted once.

The engines communicate; gradclip decides what each rank contributes. With torch,
``process_group=`` (a group, a list of groups forming a grid, or a ``DeviceMesh``)
all-reduces the ranks' contributions, and DTensor (FSDP2) leaves reduce over their own
mesh. With JAX, ``axis_name=`` (inside ``shard_map``/``pmap``) reduces over those
axes; sharded arrays under plain ``jit`` need nothing, XLA inserts the collectives.

A leaf replicated over some groups (``replicated=``) is counted by the rank whose
index is 0 in each of them only; the others contribute 0. The ranks' local norms
``n_r`` are then combined without overflow by two scalar collectives, ``M = max_r
n_r`` and ``S = sum_r (n_r / M) ** p``, to ``M * S ** (1/p)`` (the scaled form of
:mod:`._reference`, so no term exceeds 1 for any ``p``). Nothing is read back to the
host: ranks are host integers (torch) or ``lax.axis_index`` on the device (JAX).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _backends, _compat, _tree
from ._reference import divide, power, safe_scale, scaled_root

__all__ = ["tree_norm"]

Reduce = Callable[[Any], Any]


def tree_norm(
    plan: _backends.Plan,
    p: float,
    *,
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> Any:
    """The global ``p``-norm of ``plan``'s tree over the ranks, or the local one when
    nothing is distributed (no group, no axis name, no DTensor leaf)."""
    tree = plan.tree
    ranks = _plan(tree, process_group, axis_name, replicated)
    if ranks is None:
        return plan.norm(p)
    return _reduce_norm(
        tree, _local_norm(tree, ranks.buckets, p), ranks.reduce_max, ranks.reduce_sum, p
    )


@dataclass
class _Plan:
    """The leaves each rank counts (in buckets sharing one owner mask) and the
    reductions over all the groups."""

    buckets: list[tuple[list[Any], Any]]  # (local leaves, True or a traced bool)
    reduce_max: Reduce
    reduce_sum: Reduce


def _plan(tree: _tree.Tree, process_group: Any, axis_name: Any, replicated: Any) -> Any:
    if process_group is not None and axis_name is not None:
        raise ValueError(
            "pass process_group= (torch) or axis_name= (JAX), not both: one array library "
            "has one way to communicate"
        )
    if axis_name is not None:
        return _jax_plan(tree, axis_name, _markers(tree, replicated))
    dtensor = _dtensor_type() if _compat.is_torch_namespace(tree.xp) else None
    has_dtensor = dtensor is not None and any(
        issubclass(t, dtensor) for t in set(map(type, tree.leaves))
    )
    if process_group is None and not has_dtensor:
        if replicated is not None:
            _markers(tree, replicated)  # still checked: a bad tree of markers is an error
        return None
    markers = _markers(tree, replicated)
    return _torch_plan(tree, process_group, markers, dtensor if has_dtensor else None)


# -- the combination over ranks -----------------------------------------------------------


def _local_norm(tree: _tree.Tree, buckets: list[tuple[list[Any], Any]], p: float) -> Any:
    """This rank's norm of the leaves it counts, in the tree's accumulation dtype."""
    xp = tree.xp
    zero = xp.zeros((), dtype=tree.acc_dtype, device=tree.device)
    norms = []
    for leaves, mask in buckets:
        n = _backends.plan(_tree.flatten(leaves)).norm(p)
        n = n if n.dtype == tree.acc_dtype else xp.astype(n, tree.acc_dtype)
        norms.append(n if mask is True else xp.where(mask, n, zero))
    if not norms:
        return zero
    return norms[0] if len(norms) == 1 else _backends.plan(_tree.flatten(norms)).norm(p)


def _reduce_norm(
    tree: _tree.Tree, local: Any, reduce_max: Reduce, reduce_sum: Reduce, p: float
) -> Any:
    """``M * (sum_r (n_r / M) ** p) ** (1/p)`` with ``M = max_r n_r``; NaN on any rank
    gives NaN everywhere (collectives' MAX need not propagate NaN, so it travels as a
    flag beside the largest non-NaN norm)."""
    xp = tree.xp
    nan = xp.isnan(local)
    flag = xp.astype(nan, local.dtype)
    both = reduce_max(xp.stack([xp.where(nan, xp.zeros_like(local), local), flag]))
    big, any_nan = both[0], both[1] > 0
    if math.isinf(p):
        norm = big
    else:
        scale = _compat.stop_gradient(xp, big)  # a constant to autodiff, as in _reference
        r = divide(xp, local, safe_scale(xp, scale))
        norm = scaled_root(xp, scale, reduce_sum(power(xp, r, p)), p)
    return xp.where(any_nan, xp.full_like(norm, math.nan), norm)


# -- which leaves count where: the replicated= markers ----------------------------------


def _markers(tree: _tree.Tree, replicated: Any) -> list[Any]:
    """One marker per leaf: ``False`` (a shard), ``True`` (replicated over every group)
    or the groups/axes it is replicated over."""
    if replicated is None:
        return [False] * len(tree.leaves)
    if callable(replicated):
        return [_none_false(replicated(path)) for path in tree.paths]
    given: dict[str, Any] = {}
    _marker_leaves(replicated, "grads", given)  # the root name of _tree.flatten's paths
    out = []
    for path in tree.paths:
        hit = [k for k in given if path.startswith(k) and path[len(k) : len(k) + 1] in "[."]
        if not hit:
            raise ValueError(
                f"replicated= has no marker for {path}: give a tree with the structure of "
                "grads (or a prefix of it), or a function of the leaf's path"
            )
        out.append(_none_false(given[max(hit, key=len)]))
    return out


def _none_false(marker: Any) -> Any:
    return False if marker is None else marker


def _marker_leaves(node: Any, path: str, out: dict[str, Any]) -> None:
    """``{path: marker}`` for a tree of markers, with the paths of :mod:`._tree`."""
    if isinstance(node, dict):
        for k, v in node.items():
            _marker_leaves(v, f"{path}[{k!r}]", out)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _marker_leaves(v, f"{path}[{i}]", out)
    else:
        jax = sys.modules.get("jax")
        if jax is not None and node is not None and not isinstance(node, (bool, str)):
            tu = jax.tree_util
            keyed, treedef = tu.tree_flatten_with_path(node, is_leaf=lambda n: n is not node)
            if not tu.treedef_is_leaf(treedef):
                for k, v in keyed:
                    _marker_leaves(v, path + tu.keystr(k), out)
                return
        out[path] = node


def _bad_marker(path: str, marker: Any, kinds: str) -> TypeError:
    return TypeError(
        f"replicated= marks {path} with {marker!r}; a marker is True (the same values on "
        f"every rank), False or None (a shard), or {kinds} it is replicated over"
    )


# -- JAX: axis names inside shard_map / pmap ----------------------------------------------


def _jax_plan(tree: _tree.Tree, axis_name: Any, markers: list[Any]) -> _Plan:
    if not _compat.is_jax_array(tree.leaves[0]):
        raise TypeError(
            f"axis_name= is for JAX arrays inside shard_map or pmap, but grads are "
            f"{_compat.library_name(tree.leaves[0])} arrays; with torch pass process_group="
        )
    axes = _axis_tuple(axis_name, "axis_name")
    lax = sys.modules["jax"].lax
    groups: dict[tuple[str, ...], list[Any]] = {}
    for x, path, m in zip(tree.leaves, tree.paths, markers):
        if m is True:
            rep = axes
        elif m is False:
            rep = ()
        else:
            try:
                rep = _axis_tuple(m, path)
            except (TypeError, ValueError):
                raise _bad_marker(path, m, "the axis name(s)") from None
        groups.setdefault(rep, []).append(x)
    buckets = []
    for rep, leaves in groups.items():
        mask: Any = True
        for a in rep:
            first = lax.axis_index(a) == 0
            mask = first if mask is True else mask & first
        buckets.append((leaves, mask))
    return _Plan(buckets, lambda v: lax.pmax(v, axes), lambda v: lax.psum(v, axes))


def _axis_tuple(names: Any, what: str) -> tuple[Any, ...]:
    names = tuple(names) if isinstance(names, (tuple, list, frozenset, set)) else (names,)
    if not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"{what} must be an axis name (str) or a tuple of them, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names an axis twice: {names!r}; each shard must count once")
    return names


# -- torch.distributed: process groups, DeviceMesh, DTensor -------------------------------


def _dtensor_type() -> Any:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _is_group(obj: Any) -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and isinstance(obj, dist.ProcessGroup)


def _groups(spec: Any, what: str) -> list[Any]:
    """A group, a list of groups or a DeviceMesh (its dimensions' groups) as a list."""
    if _is_group(spec):
        return [spec]
    if hasattr(spec, "get_all_groups") and hasattr(spec, "mesh"):  # DeviceMesh
        return list(spec.get_all_groups())
    if isinstance(spec, (list, tuple, frozenset, set)) and spec:
        out = []
        for g in spec:
            out += _groups(g, what)
        return out
    raise TypeError(
        f"{what} must be a torch.distributed ProcessGroup, a list of them or a DeviceMesh, "
        f"got {spec!r}"
    )


def _torch_plan(tree: _tree.Tree, process_group: Any, markers: list[Any], dtensor: Any) -> _Plan:
    if not _compat.is_torch_namespace(tree.xp):
        raise TypeError(
            f"process_group= is for torch tensors, but grads are "
            f"{_compat.library_name(tree.leaves[0])} arrays; with JAX pass axis_name="
        )
    dist = sys.modules["torch.distributed"]
    reduce_over = [] if process_group is None else _groups(process_group, "process_group")
    mesh = None
    if dtensor is not None:
        mesh = _one_mesh(tree, dtensor)
        reduce_over += [mesh.get_group(i) for i in range(mesh.ndim)]
    _check_grid(dist, reduce_over)

    counted = []
    for x, path, m in zip(tree.leaves, tree.paths, markers):
        rep: list[Any] = list(reduce_over) if m is True else []
        if m not in (True, False):
            try:
                rep = _groups(m, path)
            except TypeError:
                raise _bad_marker(path, m, "the process group(s)") from None
        if mesh is not None:
            # a plain tensor beside DTensors is the same on every rank of the mesh, as
            # FSDP2 leaves the parameters it does not shard
            dims = range(mesh.ndim)
            if isinstance(x, dtensor):
                x, dims = _dtensor_local(x)
            rep += [mesh.get_group(i) for i in dims]
        if all(_rank_in(dist, g, path) == 0 for g in rep):
            counted.append(x)
    return _Plan(
        [(counted, True)] if counted else [],
        _all_reduce(dist, reduce_over, dist.ReduceOp.MAX),
        _all_reduce(dist, reduce_over, dist.ReduceOp.SUM),
    )


def _one_mesh(tree: _tree.Tree, dtensor: Any) -> Any:
    meshes = [
        (x.device_mesh, path) for x, path in zip(tree.leaves, tree.paths) if isinstance(x, dtensor)
    ]
    mesh, first = meshes[0]
    for other, path in meshes[1:]:
        if other != mesh:
            raise ValueError(
                f"{first} and {path} are DTensors on different device meshes; gradclip "
                "reduces over one mesh (plus process_group=): clip each mesh's gradients "
                "with process_group= naming the groups that join them"
            )
    return mesh


def _dtensor_local(x: Any) -> tuple[Any, list[int]]:
    """The local shard of a DTensor and the mesh dimensions it is replicated over
    (a pending sum, ``Partial``, is reduced first: its local values are not a shard)."""
    if any(pl.is_partial() for pl in x.placements):
        from torch.distributed.tensor import Replicate  # torch is loaded: x is a DTensor

        x = x.redistribute(
            x.device_mesh, [Replicate() if pl.is_partial() else pl for pl in x.placements]
        )
    return x.to_local(), [i for i, pl in enumerate(x.placements) if pl.is_replicate()]


def _rank_in(dist: Any, group: Any, path: str) -> int:
    rank = dist.get_rank(group=group)
    if rank < 0:
        raise ValueError(
            f"{path} is marked replicated over a process group this rank "
            f"({dist.get_rank()}) is not in"
        )
    return rank


def _check_grid(dist: Any, groups: Sequence[Any]) -> None:
    """Reducing over two groups that share more than this rank would count the shards
    of the shared ranks twice."""
    ranks = [set(dist.get_process_group_ranks(g)) for g in groups]
    for i in range(len(ranks)):
        for j in range(i):
            both = ranks[i] & ranks[j]
            if len(both) > 1:
                raise ValueError(
                    f"the process groups to reduce over share ranks {sorted(both)}: their "
                    "shards would be counted twice; pass groups that meet only in this "
                    "rank (the rows and columns of a grid, a DeviceMesh's dimensions)"
                )


def _all_reduce(dist: Any, groups: list[Any], op: Any) -> Reduce:
    def reduce(v: Any) -> Any:
        v = v.clone()  # all_reduce writes in place
        for g in groups:
            dist.all_reduce(v, op=op, group=g)
        return v

    return reduce
