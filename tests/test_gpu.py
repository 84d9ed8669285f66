"""The GPU fast paths (CuPy kernels, torch on CUDA, JAX on a GPU) against the core.

Skipped, with the reason, on machines without a CUDA device (CI); run on a GPU
machine with ``bash benchmarks/gpu.sh tests``. The backend-parametrised suites
(backends/test_fast_common.py, test_clipping.py, ...) also run on ``cupy`` and
``torch_cuda`` there; these tests add what only a GPU shows: the kernels' blocks and
tables, many leaves of mixed dtypes, the memory of an in-place call, and CUDA graph
capture. What the backends do without a GPU is tested in tests/backends/.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_ulps,
    cuda_graph,
    fast_and_reference,
    make_backend,
    ref_norm,
    same_value,
    to_float,
    ulp,
)

import gradclip as gc
from gradclip import _backends


def _cupy():
    return make_backend("cupy")  # (skips where no CUDA device is)


def _torch_cuda():
    return make_backend("torch_cuda")


def _host_trees(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """float64 NumPy leaves: sizes across block edges, many small ones, extremes."""
    sizes = [0, 1, 8191, 8192, 8193, 100_003, 3]
    mixed = [rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4) for n in sizes]
    many = [rng.standard_normal(int(n)) for n in rng.integers(1, 600, 3000)]
    return {
        "mixed sizes": mixed,
        "3000 small": many,
        "1e30": [np.array([3e30, 4e30]), np.ones(10_000)],
        "1e-30": [np.array([3e-30, 4e-30, 0.0]), np.full(9000, 1e-31)],
        "zeros": [np.zeros(5), np.zeros(20_000)],
    }


def _check(backend, fast_tree, core_tree, stored, dt, max_norm):
    """The fast in-place clip == the core's, and its norm == the float64 reference of
    the values as ``stored`` (a few ulps of the accumulation dtype)."""
    n_fast = gc.clip_by_global_norm_(fast_tree, max_norm, eps=1e-6)
    with _backends.fast_paths(False):
        n_core = gc.clip_by_global_norm_(core_tree, max_norm, eps=1e-6)
    f, c = to_float(backend, n_fast), to_float(backend, n_core)
    acc = "float64" if dt == "float64" else "float32"
    assert_ulps(f, c, acc)
    assert_ulps(f, ref_norm(stored, 2), acc)
    for x, y in zip(fast_tree, core_tree):
        assert_close(backend, x, y, rtol=2 * ulp(dt), atol=1e-38)


# -- CuPy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", ["float32", "float16", "float64"])
@pytest.mark.parametrize("case", list(_host_trees(np.random.default_rng(0))))
def test_cupy_kernels_match_core(dt, case):
    b = _cupy()
    cp = b.mod
    host = _host_trees(np.random.default_rng(1))[case]
    if dt == "float16" and case in ("1e30", "1e-30"):
        pytest.skip("not representable in float16")
    host = [h.astype(dt).astype(np.float64) for h in host]  # the values as stored
    fast = [cp.asarray(h, dtype=dt) for h in host]
    core = [cp.asarray(h, dtype=dt) for h in host]
    _check(b, fast, core, host, dt, max_norm=0.5)


@pytest.mark.parametrize("p", [2, math.inf])
def test_cupy_mixed_dtypes_and_nonfinite(p):
    cp = _cupy().mod
    rng = np.random.default_rng(2)
    tree = [cp.asarray(rng.standard_normal(n), dtype=dt)
            for n, dt in ((50_000, "float32"), (7, "float16"), (9000, "float64"))]  # fmt: skip
    got, want = (float(n) for n in fast_and_reference(lambda: gc.global_norm(tree, ord=p)))
    assert got == pytest.approx(want, rel=1e-15)
    for bad, expect in ((np.inf, math.inf), (np.nan, math.nan)):
        t = [*tree, cp.asarray([1.0, bad], dtype="float32")]
        assert same_value(float(gc.global_norm(t, ord=p)), expect)


def test_cupy_tables_follow_the_pointers():
    """The cached tables are keyed by pointers and sizes: new arrays at new addresses,
    and new values at the same addresses, are both clipped right."""
    cp = _cupy().mod
    rng = np.random.default_rng(3)
    for _ in range(3):
        host = [rng.standard_normal(n) for n in (10_000, 5, 300)]
        tree = [cp.asarray(h, dtype="float32") for h in host]
        for scale in (1.0, 10.0):
            for x in tree:
                x *= scale
            n = float(gc.global_norm(tree))
            want = ref_norm([cp.asnumpy(x) for x in tree], 2)
            assert_ulps(n, want, "float32")


def test_cupy_non_contiguous_runs_the_core():
    cp = _cupy().mod
    x = cp.asarray(np.random.default_rng(4).standard_normal((300, 200)), dtype="float32").T
    want = ref_norm([cp.asnumpy(x)], 2)
    assert_ulps(float(gc.clip_by_global_norm_([x], 1.0)), want, "float32")
    assert float(cp.linalg.norm(x)) == pytest.approx(1.0, rel=1e-5)


# -- torch on CUDA ---------------------------------------------------------------------------


@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("case", list(_host_trees(np.random.default_rng(0))))
def test_torch_cuda_matches_core(dt, case):
    b = _torch_cuda()
    torch = b.mod
    if dt == "float16" and case in ("1e30", "1e-30"):
        pytest.skip("not representable in float16")
    host = _host_trees(np.random.default_rng(1))[case]

    def make():
        return [torch.from_numpy(h).to(getattr(torch, dt)).cuda() for h in host]

    fast, core = make(), make()
    stored = [x.double().cpu().numpy() for x in fast]
    _check(b, fast, core, stored, dt, max_norm=0.5)


def test_torch_cuda_in_place_allocates_no_full_size_temporary():
    """One float32 and one bfloat16 group of GPT-2-like sizes: the call's peak extra
    CUDA memory is under 1 % of the gradients' bytes."""
    torch = _torch_cuda().mod
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=g) for n in (4_000_000, 768, 2_359_296)]
    grads += [torch.randn(1_000_000, device="cuda", generator=g).bfloat16() for _ in range(3)]
    nbytes = sum(x.numel() * x.element_size() for x in grads)
    gc.clip_by_global_norm_(grads, 1.0)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gc.clip_by_global_norm_(grads, 1.0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 0.01 * nbytes


def test_torch_cuda_multiply_is_torchs_own():
    """The scaling is torch's ``_foreach_mul_`` by the float32 scale: bit for bit what
    ``torch.nn.utils.clip_grad_norm_`` does with the same scale."""
    torch = _torch_cuda().mod
    g = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in (70_000, 3, 512)]
        ref = [x.clone() for x in xs]
        norm = gc.clip_by_global_norm_(xs, 1.0)
        scale = torch.clamp(1.0 / norm, max=1.0)
        torch._foreach_mul_(ref, scale)
        for x, r in zip(xs, ref):
            assert torch.equal(x, r)


@pytest.mark.parametrize("mixed", [True, False])
def test_torch_cuda_graph_replays_the_fast_path(mixed):
    """Captured with a Python ``max_norm`` (a CPU scalar in the scale's kernels), one
    dtype (one group, without torch's grouping) or two (two groups)."""
    torch = _torch_cuda().mod
    grads = [torch.zeros(100_000, device="cuda"), torch.zeros(300, device="cuda")]
    if mixed:
        grads[1] = grads[1].bfloat16()
    graph, norm = cuda_graph(lambda: gc.clip_by_global_norm_(grads, 1.0))
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        host = [torch.randn(x.shape, generator=gen).to(x.dtype) * (seed + 1) for x in grads]
        for x, h in zip(grads, host):
            x.copy_(h)
        want = ref_norm([h.double().numpy() for h in host], 2)
        graph.replay()
        torch.cuda.synchronize()
        assert_ulps(float(norm), want, "float32")
        assert float(gc.global_norm(grads)) == pytest.approx(1.0, rel=1e-2)


# -- JAX on a GPU ----------------------------------------------------------------------------


@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_jax_gpu_jit_matches_optax_and_the_reference(dt):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    if jax.default_backend() != "gpu":
        pytest.skip("jax: no GPU backend on this machine")
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    host = [rng.standard_normal(n) for n in (1_000_000, 768, 3, 40_000)]
    tree = [jnp.asarray(h, dtype=dt) for h in host]
    stored = [np.asarray(x, dtype=np.float64) for x in tree]
    out, norm = jax.jit(lambda g: gc.clip_by_global_norm(g, 1.0))(tree)
    assert next(iter(norm.devices())).platform == "gpu"
    assert_ulps(float(norm), ref_norm(stored, 2), "float32")
    want = optax.clip_by_global_norm(1.0).update(tree, None)[0]
    tol = ulp(dt) * 2 + (0.01 if dt == "bfloat16" else 0)  # optax sums in bfloat16
    for a, b in zip(out, want):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=tol, atol=1e-6)  # fmt: skip
