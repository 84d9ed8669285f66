"""The CuPy backend: one kernel launch per dtype group, over a table of pointers.

The leaves of one dtype are described by a table on the device (their pointers and
sizes, each block's leaf and first element) and cut into blocks of ``BLOCK``
elements. One ``RawKernel`` launch gives every block the reference's ``(m, s)``
term (the largest magnitude, NaN sticky, and the sum of ``(|x| / m) ** 2``: squares
of 16/32-bit values summed in float64, float64 blocks in two sweeps); one more
single-block launch combines them as ``gradclip._reference.combine`` does. The
scaling is one launch per group, reading the scale from device memory. Only
C-contiguous float16/float32/float64 leaves on one device qualify; the tables of the
last few trees stay on the device, so a training loop copies nothing.

The planning is plain NumPy and is tested on the CPU (``emulate_terms`` stands in
for the kernel); the kernels are checked against the reference on a GPU.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _reference
from .._tree import Tree

__all__ = ["BLOCK", "Plan", "combine", "emulate_terms", "groups", "plan", "select"]

BLOCK = 8192  # elements per CUDA block
THREADS = 256
FINISH_THREADS = 1024

# dtype -> (C type, expression widening element v to double, C type of the scale)
_CTYPES = {
    "float16": ("__half", "(double)__half2float(v)", "float"),
    "float32": ("float", "(double)(v)", "float"),
    "float64": ("double", "(v)", "double"),
}

_NP = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}

# The table of a group: int64 [ptrs (n), sizes (n), leaf (blocks), start (blocks)].
_HEAD = r"""
#include <cuda_fp16.h>
#define WIDEN(v) ({widen})
__device__ __forceinline__ double nan_max(double m, double a) {{
    return (m != m || a <= m) ? m : a;  // a NaN stays
}}
"""

_TERMS_SRC = (
    _HEAD
    + r"""
extern "C" __global__ void gradclip_terms_{name}(
    const long long* table, int n, int blocks, int block_len, double* out_m, double* out_s)
{{
    __shared__ double red[{threads}];
    const int b = blockIdx.x;
    const long long leaf = table[2 * n + b];
    const {t}* x = (const {t}*)table[leaf];
    const long long lo = table[2 * n + blocks + b];
    long long hi = lo + block_len;
    if (hi > table[n + leaf]) hi = table[n + leaf];
    double m = 0, s = 0;
    #pragma unroll 4
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {{
        const double a = fabs(WIDEN(x[i]));
        m = nan_max(m, a);
        if (!{two_sweeps}) s += a * a;  // float64 holds every finite square
    }}
    red[threadIdx.x] = m;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {{
        if (threadIdx.x < k) red[threadIdx.x] = nan_max(red[threadIdx.x], red[threadIdx.x + k]);
        __syncthreads();
    }}
    m = red[0];
    __syncthreads();
    const double d = (m > 0 && isfinite(m)) ? m : 1.0;
    if ({two_sweeps}) {{  // float64 leaves: the scaled squares, from the cache
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {{
            const double y = fabs(WIDEN(x[i])) / d;
            s += y * y;
        }}
    }} else {{
        s = s / (d * d);
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
)

# The reference's combine of every block's (m, s), in one block: the largest m, then the
# sum of (m_b / scale)^2 * s_b, then scale * sqrt(sum) (the inf-norm: the largest m).
_FINISH_SRC = (
    _HEAD
    + r"""
extern "C" __global__ void gradclip_finish_{name}(
    const double* ms, const double* ss, int blocks, int inf_norm, {t}* out)
{{
    __shared__ double red[{threads}];
    double big = 0;
    for (int i = threadIdx.x; i < blocks; i += blockDim.x) {{
        big = nan_max(big, ms[i]);
    }}
    red[threadIdx.x] = big;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {{
        if (threadIdx.x < k) red[threadIdx.x] = nan_max(red[threadIdx.x], red[threadIdx.x + k]);
        __syncthreads();
    }}
    big = red[0];
    __syncthreads();
    const double scale = (big > 0 && isfinite(big)) ? big : 1.0;
    double acc = 0;
    for (int i = threadIdx.x; i < blocks; i += blockDim.x) {{
        const double m = ms[i];
        const double r = m > 0 ? ((isfinite(m) ? m : 1.0) / scale) : 0.0;
        acc += r * r * ss[i];
    }}
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {{
        if (threadIdx.x < k) red[threadIdx.x] += red[threadIdx.x + k];
        __syncthreads();
    }}
    if (threadIdx.x == 0) {{
        const double t = red[0];
        *out = ({t})(inf_norm ? big : (t > 0 ? scale * sqrt(t) : t));
    }}
}}
"""
)

_SCALE_SRC = (
    _HEAD
    + r"""
extern "C" __global__ void gradclip_scale_{name}(
    const long long* table, int n, int blocks, int block_len, const {acc}* scale)
{{
    const int b = blockIdx.x;
    const long long leaf = table[2 * n + b];
    {t}* x = ({t}*)table[leaf];
    const long long lo = table[2 * n + blocks + b];
    long long hi = lo + block_len;
    if (hi > table[n + leaf]) hi = table[n + leaf];
    const {acc} s = *scale;
    #pragma unroll 4
    for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x)
        x[i] = ({t})(({acc})x[i] * s);
}}
"""
)


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


def emulate_terms(arrays: Sequence[np.ndarray], p: Plan) -> tuple[np.ndarray, ...]:
    """What the terms kernel computes (float64 ``m`` and ``s`` per block), in NumPy,
    for tests on machines without a GPU."""
    flat = [np.asarray(arrays[i]).reshape(-1) for i in p.indices]
    ms, ss = [], []
    for leaf, lo in zip(p.leaf, p.start):
        x = flat[leaf][lo : lo + BLOCK]
        a = np.abs(x.astype(np.float64))
        m = a.max() if not np.isnan(a).any() else np.nan
        d = m if np.isfinite(m) and m > 0 else 1.0
        ms.append(m)
        ss.append(np.sum((a / d) ** 2) if x.dtype == np.float64 else np.sum(a * a) / (d * d))
    return np.asarray(ms, dtype=np.float64), np.asarray(ss, dtype=np.float64)


def combine(xp: Any, ms: Any, ss: Any, p: float) -> Any:
    """What the finish kernel computes: the reference's combination
    (``gradclip._reference.combine``) of stacked block terms."""
    big = xp.max(ms)
    if math.isinf(p):
        return big
    scale = _reference.safe_scale(xp, big)
    r = xp.where(ms > 0, _reference.safe_scale(xp, ms), xp.zeros_like(ms)) / scale
    return _reference.scaled_root(xp, scale, xp.sum(r * r * ss), p)


# -- on the GPU -------------------------------------------------------------------------------

_DTYPE = operator.attrgetter("dtype")
_CONTIGUOUS = operator.attrgetter("flags.c_contiguous")
_DEVICE_ID = operator.attrgetter("device.id")
_kernels: dict[tuple[str, str], Any] = {}
_tables: OrderedDict[tuple[Any, ...], Any] = OrderedDict()  # the last few trees' tables
TABLES = 8


def _kernel(kind: str, dtype: str) -> Any:
    import cupy

    key = (kind, dtype)
    if key not in _kernels:
        t, widen, acc = _CTYPES[dtype]
        src = {"terms": _TERMS_SRC, "scale": _SCALE_SRC, "finish": _FINISH_SRC}[kind]
        threads = FINISH_THREADS if kind == "finish" else THREADS
        code = src.format(
            name=dtype, t=t, widen=widen, acc=acc, threads=threads,
            two_sweeps=int(dtype == "float64"),
        )  # fmt: skip
        _kernels[key] = cupy.RawKernel(code, f"gradclip_{kind}_{dtype}")
    return _kernels[key]


def table(p: Plan, ptrs: Sequence[int]) -> np.ndarray:
    """The group's table as the kernels read it: int64 pointers, sizes, and each
    block's leaf and first element."""
    return np.concatenate(
        [np.asarray(ptrs, dtype=np.uint64).view(np.int64), p.sizes, p.leaf.astype(np.int64),
         p.start]
    )  # fmt: skip


def _launches(tree: Tree) -> list[tuple[str, Plan, Any]]:
    """``(dtype, plan, table on the device)`` per dtype group with elements; the same
    pointers and sizes (a training loop's gradients) reuse the tables already on the
    device."""
    import cupy as cp

    leaves = tree.leaves
    ptrs = [x.data.ptr for x in leaves]
    sizes = [x.size for x in leaves]
    # dtype objects, not names: NumPy makes each name in Python (3.5 us a leaf)
    key = (tuple(map(_DTYPE, leaves)), tuple(ptrs), tuple(sizes), leaves[0].device.id)
    found = _tables.get(key)
    if found is None:
        found = []
        for dt, pl in groups([dt.name for dt in key[0]], sizes).items():
            if pl.leaf.size:
                found.append((dt, pl, cp.asarray(table(pl, [ptrs[i] for i in pl.indices]))))
        _tables[key] = found
        if len(_tables) > TABLES:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return found


def _launch(kind: str, dt: str, pl: Plan, tab: Any, *args: Any) -> None:
    n, blocks = len(pl.indices), pl.leaf.size
    head = (tab, np.int32(n), np.int32(blocks), np.int32(BLOCK))
    _kernel(kind, dt)((blocks,), (THREADS,), (*head, *args))


def select(tree: Tree) -> CupyPath | None:
    """The fast path for C-contiguous float16/float32/float64 arrays on one device."""
    leaves = tree.leaves
    dev = leaves[0].device.id
    if (
        all(dt.name in _CTYPES for dt in set(map(_DTYPE, leaves)))
        and all(map(_CONTIGUOUS, leaves))
        and all(d == dev for d in map(_DEVICE_ID, leaves))
    ):
        return CupyPath(tree)
    return None


class CupyPath:
    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    @functools.cached_property
    def launches(self) -> list[tuple[str, Plan, Any]]:
        return _launches(self.tree)

    def norm(self, p: float) -> Any:
        import cupy as cp

        if p != 2 and not math.isinf(p):
            return None
        acc = np.dtype(self.tree.acc_dtype)
        total = sum(pl.leaf.size for _, pl, _ in self.launches)
        if not total:
            return cp.zeros((), dtype=acc)
        out = cp.empty((), dtype=acc)
        ms = cp.empty(total, dtype=np.float64)
        ss = cp.empty(total, dtype=np.float64)
        at = 0
        for dt, pl, tab in self.launches:
            nb = pl.leaf.size
            _launch("terms", dt, pl, tab, ms[at : at + nb], ss[at : at + nb])
            at += nb
        args = (ms, ss, np.int32(total), np.int32(math.isinf(p)), out)
        _kernel("finish", acc.name)((1,), (FINISH_THREADS,), args)
        return out

    def scale(self, scale: Any, norm: Any, nonfinite: str, inplace: bool) -> list[Any] | None:
        if not inplace or nonfinite == "zero":
            return None  # functional: the reference's x * s is one kernel per leaf anyway
        tree = self.tree
        casts: dict[Any, Any] = {}
        for dt, pl, tab in self.launches:
            s = _reference.cast_scale(tree, casts, scale, tree.leaves[pl.indices[0]])
            s = s.astype(_NP[_CTYPES[dt][2]], copy=False)
            _launch("scale", dt, pl, tab, s)
        return tree.leaves
