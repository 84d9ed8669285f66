"""CuPy fast path: one kernel launch per dtype group, over a table of pointers.

One launch per leaf loses to torch's fused foreach kernels on many small tensors, so
the leaves of one dtype are described by a table (a device array of data pointers
and sizes) and cut into blocks of ``BLOCK`` elements; one ``RawKernel`` launch gives
every block its ``(m, s)`` term of the core (``m`` the largest magnitude, ``s`` the
sum of ``(|x| / d) ** 2`` with ``d = m`` when finite and > 0, else 1: two sweeps over
the block, the second from cache), and the core's combination runs on the block
terms. The scaling is one launch per group too, reading the scale from device
memory (no host synchronisation). Only C-contiguous float16/float32/float64 leaves
qualify (CuPy has no bfloat16); anything else runs the core.

The planning (groups, tables, blocks) is plain Python and NumPy and is tested on the
CPU, with :func:`emulate_terms` standing in for the kernel; the kernels themselves
are compiled only on a GPU. GPU timings have not been measured yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _clipping, _norms, _tree

__all__ = ["BLOCK", "Plan", "emulate_terms", "global_norm_impl", "plan", "scale_impl"]

BLOCK = 8192  # elements per CUDA block: 32 KiB of float32, re-read from L1/L2
THREADS = 256

_CTYPES = {"float16": ("__half", "float"), "float32": ("float", "float"),
           "float64": ("double", "double")}  # fmt: skip

_TERMS_SRC = r"""
#include <cuda_fp16.h>
extern "C" __global__ void gradclip_terms_{name}(
    const unsigned long long* ptrs, const long long* sizes,
    const int* block_leaf, const long long* block_start, int block_len,
    {acc}* out_m, {acc}* out_s)
{{
    __shared__ {acc} red[{threads}];
    const int b = blockIdx.x;
    const {t}* x = (const {t}*)ptrs[block_leaf[b]];
    const long long lo = block_start[b];
    long long hi = lo + block_len;
    if (hi > sizes[block_leaf[b]]) hi = sizes[block_leaf[b]];
    // sweep 1: the largest magnitude, NaN sticky
    {acc} m = 0;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {{
        {acc} a = fabs(({acc})x[i]);
        if (a > m || a != a) m = (m != m) ? m : a;
    }}
    red[threadIdx.x] = m;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {{
        if (threadIdx.x < k) {{
            {acc} o = red[threadIdx.x + k], v = red[threadIdx.x];
            if (o > v || o != o) red[threadIdx.x] = (v != v) ? v : o;
        }}
        __syncthreads();
    }}
    m = red[0];
    __syncthreads();
    const {acc} d = (m > 0 && isfinite(m)) ? m : ({acc})1;
    // sweep 2: the scaled sum of squares (the block is in cache now)
    {acc} s = 0;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {{
        {acc} y = fabs(({acc})x[i]) / d;
        s += y * y;
    }}
    red[threadIdx.x] = s;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {{
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }}
    if (threadIdx.x == 0) {{ out_m[b] = m; out_s[b] = red[0]; }}
}}
"""

_SCALE_SRC = r"""
#include <cuda_fp16.h>
extern "C" __global__ void gradclip_scale_{name}(
    const unsigned long long* ptrs, const long long* sizes,
    const int* block_leaf, const long long* block_start, int block_len,
    const {acc}* scale)
{{
    const int b = blockIdx.x;
    {t}* x = ({t}*)ptrs[block_leaf[b]];
    const long long lo = block_start[b];
    long long hi = lo + block_len;
    if (hi > sizes[block_leaf[b]]) hi = sizes[block_leaf[b]];
    const {acc} s = *scale;
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x)
        x[i] = ({t})(({acc})x[i] * s);
}}
"""


@dataclass(frozen=True)
class Plan:
    """The blocks of one dtype group: block ``b`` covers elements
    ``[start[b], min(start[b] + BLOCK, sizes[leaf[b]]))`` of leaf ``leaf[b]``."""

    indices: list[int]  # positions of the group's leaves in the tree
    sizes: np.ndarray  # int64, one per leaf of the group
    leaf: np.ndarray  # int32, one per block
    start: np.ndarray  # int64, one per block


def plan(sizes: Sequence[int], indices: Sequence[int], block: int = BLOCK) -> Plan:
    """Cut leaves of ``sizes`` elements into blocks of at most ``block`` (empty leaves
    get none)."""
    sizes_a = np.asarray(sizes, dtype=np.int64)
    counts = -(-sizes_a // block)  # ceil
    leaf = np.repeat(np.arange(len(sizes_a), dtype=np.int32), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(leaf.size, dtype=np.int64) - first) * block
    return Plan(list(indices), sizes_a, leaf, start)


def groups(dtypes: Sequence[str], sizes: Sequence[int]) -> dict[str, Plan]:
    """One plan per dtype name, leaves in tree order."""
    by: dict[str, list[int]] = {}
    for i, dt in enumerate(dtypes):
        by.setdefault(dt, []).append(i)
    return {dt: plan([sizes[i] for i in idx], idx) for dt, idx in by.items()}


def emulate_terms(arrays: Sequence[np.ndarray], p: Plan, acc: Any) -> tuple[np.ndarray, ...]:
    """What the terms kernel computes, in NumPy (for tests on machines without a GPU)."""
    flat = [np.asarray(arrays[i]).reshape(-1) for i in p.indices]
    ms, ss = [], []
    for leaf, lo in zip(p.leaf, p.start):
        a = np.abs(flat[leaf][lo : lo + BLOCK].astype(acc))
        m = a.max() if not np.isnan(a).any() else acc(np.nan)
        d = m if np.isfinite(m) and m > 0 else acc(1)
        ms.append(m)
        ss.append(np.sum((a / d) ** 2, dtype=acc))
    return np.asarray(ms, dtype=acc), np.asarray(ss, dtype=acc)


def combine(xp: Any, ms: Any, ss: Any, p: float) -> Any:
    """The core's combination (``_norms._combine``) of stacked block terms."""
    big = xp.max(ms)
    if math.isinf(p):
        return big
    scale = _norms._safe_scale(xp, big)
    r = _norms._safe_scale(xp, ms) / scale
    return _norms._scaled_root(xp, scale, xp.sum(r * r * ss), p)


# -- on the GPU -------------------------------------------------------------------------------

_kernels: dict[tuple[str, str], Any] = {}


def _kernel(kind: str, dtype: str) -> Any:
    import cupy

    key = (kind, dtype)
    if key not in _kernels:
        t, acc = _CTYPES[dtype]
        src = (_TERMS_SRC if kind == "terms" else _SCALE_SRC).format(
            name=dtype, t=t, acc=acc, threads=THREADS
        )
        _kernels[key] = cupy.RawKernel(src, f"gradclip_{kind}_{dtype}")
    return _kernels[key]


def _device_plan(cp: Any, leaves: Sequence[Any], p: Plan) -> tuple[Any, ...]:
    ptrs = cp.asarray(np.asarray([leaves[i].data.ptr for i in p.indices], dtype=np.uint64))
    return ptrs, cp.asarray(p.sizes), cp.asarray(p.leaf), cp.asarray(p.start)


def _qualifies(tree: _tree.Tree) -> bool:
    dev = tree.leaves[0].device
    return all(
        x.dtype.name in _CTYPES and x.flags.c_contiguous and x.device == dev for x in tree.leaves
    )


def global_norm_impl(tree: _tree.Tree) -> Callable[[_tree.Tree, float], Any] | None:
    if not _qualifies(tree):
        return None

    def norm(tree: _tree.Tree, p: float) -> Any:
        import cupy as cp

        if p != 2 and not math.isinf(p):
            from . import _backends

            with _backends.fast_paths(False):
                return _norms.tree_norm(tree, p)
        acc = np.dtype(tree.acc_dtype)
        ms, ss = [], []
        for dt, pl in groups(
            [x.dtype.name for x in tree.leaves], [x.size for x in tree.leaves]
        ).items():
            if pl.leaf.size == 0:
                continue
            kacc = np.dtype(_CTYPES[dt][1])
            m = cp.empty(pl.leaf.size, dtype=kacc)
            s = cp.empty(pl.leaf.size, dtype=kacc)
            args = (*_device_plan(cp, tree.leaves, pl), np.int32(BLOCK), m, s)
            _kernel("terms", dt)((pl.leaf.size,), (THREADS,), args)
            ms.append(m.astype(acc, copy=False))
            ss.append(s.astype(acc, copy=False))
        if not ms:
            return cp.zeros((), dtype=acc)
        return combine(cp, cp.concatenate(ms), cp.concatenate(ss), p)

    return norm


def scale_impl(tree: _tree.Tree, *, inplace: bool) -> Callable[[_tree.Tree, Any], Any] | None:
    if not inplace or not _qualifies(tree):
        return None  # functional: the core's x * s is one kernel per leaf anyway

    def scale(tree: _tree.Tree, scale: Any) -> list[Any]:
        import cupy as cp

        casts: dict[Any, Any] = {}
        for dt, pl in groups(
            [x.dtype.name for x in tree.leaves], [x.size for x in tree.leaves]
        ).items():
            if pl.leaf.size == 0:
                continue
            s = _clipping._cast(tree, casts, scale, tree.leaves[pl.indices[0]])
            s = s.astype(np.dtype(_CTYPES[dt][1]), copy=False)
            args = (*_device_plan(cp, tree.leaves, pl), np.int32(BLOCK), s)
            _kernel("scale", dt)((pl.leaf.size,), (THREADS,), args)
        return tree.leaves

    return scale
