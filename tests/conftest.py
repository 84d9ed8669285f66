"""Shared fixtures: one ``Backend`` per array library, float64 references, and the
assertions the tests share.

Every backend test runs on array-api-strict (the bare standard), NumPy, PyTorch
(CPU), JAX (with float64 enabled: on the GPU where jaxlib has one), Dask and, where a
CUDA device exists, CuPy and PyTorch on CUDA (``torch_cuda``).
A backend that cannot run here is *skipped* with the reason, never counted as passed.
The fast paths of ``gradclip._backends`` (``fast_backend``) are checked against the
reference (``fast_and_reference``): values to a few ulps (``assert_ulps``), arrays
element by element (``assert_close``).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

import gradclip as gc
from gradclip import _backends  # fast_paths(False): the reference every fast path matches

try:
    import jax

    jax.config.update("jax_enable_x64", True)  # so float64 leaves can be tested on JAX
except ImportError:  # pragma: no cover - jax is a test dependency
    jax = None

# The library's stateful clippers, with settings that clip some steps of a short run
# and not others (the torch hook and the optax transform are tested with each).
LIBRARY_CLIPPERS = {
    "autoclip": lambda: gc.AutoClip(quantile=0.5, history=3),
    "zclip": lambda: gc.ZClip(warmup_steps=2, max_norm=None),
    "quantile": lambda: gc.QuantileClip(initial_max_norm=1.0, learning_rate=0.5),
}

ALL_BACKENDS = ["array_api_strict", "numpy", "torch", "jax", "dask", "cupy", "torch_cuda"]
FAST_BACKENDS = ["numpy", "torch", "jax", "cupy", "torch_cuda"]  # those with a fast path
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
ULPS = 4  # a few units in the last place: how far a fast path may be from the reference
# the spacing of each dtype's numbers at 1 (a unit in the last place of 1.0)
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


@dataclass
class Backend:
    """How a test makes arrays of one library from NumPy and reads them back."""

    name: str
    mod: Any
    dtypes: set[str] = field(default_factory=lambda: set(FLOAT_DTYPES))
    writable: bool = True
    lazy: bool = False
    device: str = "cpu"  # torch: where its tensors are made

    def dtype(self, name: str) -> Any:
        if self.name == "numpy" and name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        if self.name == "dask":
            return np.dtype(name)
        return getattr(self.mod, name)

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A backend array with the values of NumPy array ``a`` (in ``dtype``)."""
        a = np.asarray(a)
        if dtype is not None and dtype != "bfloat16":
            a = a.astype(dtype)
        if self.name == "torch":
            t = self.mod.from_numpy(a.copy(order="C")).to(self.device)
            return t.to(self.dtype(dtype)) if dtype == "bfloat16" else t
        if self.name == "jax":
            x = self.mod.asarray(a)
            return x.astype(self.mod.bfloat16) if dtype == "bfloat16" else x
        if self.name == "dask":
            return self.mod.from_array(a, chunks=tuple(max(1, (s + 1) // 2) for s in a.shape))
        if self.name == "numpy":
            return a.astype(self.dtype(dtype)) if dtype == "bfloat16" else a.copy()
        if self.name == "cupy":
            return self.mod.asarray(a)
        return self.mod.asarray(a)  # array_api_strict

    def call(self, fn: Any, *args: Any, **options: Any) -> Any:
        """``fn(*args, **options)``; on JAX through one ``jax.jit`` (eager JAX compiles
        every operation on its own, which dominates small tests)."""
        if self.name == "jax":
            return jax.jit(lambda *a: fn(*a, **options))(*args)
        return fn(*args, **options)

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` as a float64 NumPy array (computing Dask graphs)."""
        if self.name == "torch":
            return x.detach().cpu().to(self.mod.float64).numpy()
        if self.name == "dask":
            x = x.compute()
        if self.name == "cupy":
            x = x.get()
        if self.name == "array_api_strict":
            x = np.asarray(self.mod.astype(x, self.mod.float64))
        return np.asarray(x).astype(np.float64)

    def is_native(self, x: Any) -> bool:
        """True when ``x`` is an array of this backend's library."""
        if self.name == "torch":
            return isinstance(x, self.mod.Tensor)
        if self.name == "jax":
            return isinstance(x, jax.Array)
        if self.name == "numpy":
            return isinstance(x, np.ndarray)
        if self.name == "dask":
            return type(x) is type(self.mod.asarray(0.0))
        if self.name == "cupy":
            return isinstance(x, self.mod.ndarray)
        return type(x) is type(self.mod.asarray(0.0))


def make_backend(name: str) -> Backend:
    if name == "cupy":
        cupy = pytest.importorskip("cupy")
        try:
            ok = cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            ok = False
        if not ok:
            pytest.skip("cupy: no CUDA device on this machine")
        return Backend("cupy", cupy, dtypes={"float16", "float32", "float64"})
    if name == "torch":
        return Backend("torch", pytest.importorskip("torch"))
    if name == "torch_cuda":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch: no CUDA device on this machine")
        return Backend("torch", torch, device="cuda")
    if name == "jax":
        pytest.importorskip("jax")
        return Backend("jax", importlib.import_module("jax.numpy"), writable=False, lazy=False)
    if name == "dask":
        da = pytest.importorskip("dask.array")
        return Backend("dask", da, dtypes={"float16", "float32", "float64"}, writable=False)
    if name == "numpy":
        return Backend("numpy", np)
    strict = pytest.importorskip("array_api_strict")
    return Backend("array_api_strict", strict, dtypes={"float32", "float64"})


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each array library in turn (skipped, with the reason, where unavailable)."""
    return make_backend(request.param)


@pytest.fixture(params=[b for b in ALL_BACKENDS if b not in ("jax", "dask")])
def writable_backend(request: pytest.FixtureRequest) -> Backend:
    """The libraries whose arrays can be clipped in place."""
    return make_backend(request.param)


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request: pytest.FixtureRequest) -> Backend:
    """The libraries with a fast path in ``gradclip._backends``."""
    return make_backend(request.param)


def cuda_graph(step: Any) -> tuple[Any, Any]:
    """``(graph, result)``: ``step()`` captured in a torch CUDA graph, after the
    warm-up call on a side stream that capture needs (torch's documented recipe)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


def ref_norm(arrays: list[np.ndarray], p: float) -> float:
    """The float64 (long double where it helps) p-norm of all elements as one vector."""
    flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays] or [[]])
    if flat.size == 0:
        return 0.0
    a = np.abs(flat)
    if math.isinf(p):
        return float(a.max())
    m = a.max()
    if not np.isfinite(m):
        return float(np.sum(a**p)) ** (1 / p)
    if m == 0:
        return 0.0
    return float(m * np.sum((a / m).astype(np.longdouble) ** p) ** (1 / p))


def ref_clip(arrays: list[np.ndarray], max_norm: float, p: float, eps: float = 0.0):
    """The float64 reference of Pascanu's rule: (clipped arrays, norm)."""
    n = ref_norm(arrays, p)
    scale = 1.0 if n + eps <= max_norm else max_norm / (n + eps)
    return [np.asarray(a, dtype=np.float64) * scale for a in arrays], n


def random_tree(backend: Backend, dtypes: list[str], rng: Any, big: bool = False) -> dict:
    """A dict of leaves of several shapes (0-d, empty, non-contiguous, > one chunk
    with ``big``), their dtypes taken from ``dtypes`` in turn (those ``backend`` has)."""
    shapes = [(), (0,), (7,), (33, 65), (3, 4, 5)] + ([(150_000,)] if big else [])
    tree = {}
    for i, shape in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        if dt not in backend.dtypes:
            continue
        a = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)
        tree[f"w{i}"] = backend.asarray(a, dt)
    t = backend.asarray(rng.standard_normal((40, 30)), dtypes[0])
    if backend.name in ("numpy", "torch", "jax", "cupy"):
        tree["t"] = t.T if backend.name != "torch" else t.t()  # non-contiguous
    return tree


# -- the fast paths against the reference -------------------------------------------------


def fast_and_reference(call: Any) -> tuple[Any, Any]:
    """``(call(), call())``: on the fast paths, then on the reference
    (``gradclip._backends.fast_paths(False)``)."""
    fast = call()
    with _backends.fast_paths(False):
        return fast, call()


def clip_fast_and_reference(make: Any, inplace: bool, **options: Any) -> tuple:
    """``(clipped, norm, reference clipped, reference norm)``: two trees ``make()``
    clipped to norm 1 (in place or not), on the fast paths and on the reference."""
    a, b = make(), make()
    clip = gc.clip_by_global_norm_ if inplace else gc.clip_by_global_norm
    n1 = clip(a, 1.0, **options)
    with _backends.fast_paths(False):
        n2 = clip(b, 1.0, **options)
    if not inplace:
        (a, n1), (b, n2) = n1, n2
    return a, n1, b, n2


# -- assertions, for any backend ----------------------------------------------------------


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for ``torch.float32``, ``jnp.float32``, ``np.dtype("float32")``, ..."""
    return str(dtype).rsplit(".", 1)[-1]


def ulp(dtype: Any) -> float:
    """The spacing of ``dtype``'s numbers at 1 (float32: 2**-23)."""
    return EPS[dtype_name(dtype)]


def to_float(backend: Backend, x: Any) -> float:
    """A 0-d array of ``backend`` as a Python float."""
    return float(backend.to_numpy(x))


def same_value(got: float, want: float) -> bool:
    """``got == want``, NaN equal to NaN."""
    return (math.isnan(got) and math.isnan(want)) or got == want


def assert_ulps(got: float, want: float, dtype: Any, ulps: float = ULPS) -> None:
    """``got`` within ``ulps`` units in the last place of ``dtype`` of ``want``
    (relative: ``ulps * ulp(dtype)``, no absolute slack); inf and NaN exactly."""
    if math.isfinite(want):
        assert got == pytest.approx(want, rel=ulps * ulp(dtype), abs=0), (got, want)
    else:
        assert same_value(got, want), (got, want)


def assert_close(
    backend: Backend, got: Any, want: Any, *, rtol: float, atol: float = 0.0, err_msg: str = ""
) -> None:
    """The array ``got`` of ``backend`` equals ``want`` (values, or an array of
    ``backend``) element by element, read in float64: ``np.testing.assert_allclose``
    with the same ``rtol`` and ``atol`` (NaN equal to NaN)."""
    if backend.is_native(want):
        want = backend.to_numpy(want)
    np.testing.assert_allclose(backend.to_numpy(got), want, rtol=rtol, atol=atol, err_msg=err_msg)
