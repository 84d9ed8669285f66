"""The torch backend (``gradclip._backends._torch``): its CPU paths, and its device
path run on CPU tensors.

Plain CPU tensors take blocked norms (rows of a large tensor, small ones concatenated
in batches, strided ones through NumPy views, the C kernels where built) and a
widened 16-bit multiply; other devices take grouped foreach norms and multiplies.
Each must give what the reference gives (``fast_paths(False)``), to a few ulps, and
tensors that need autograd or are traced must take the reference. That the torch path
matches the reference on every common case is checked in test_fast_common.py; CUDA
itself in test_gpu.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_ulps,
    clip_fast_and_reference,
    make_backend,
    random_tree,
    ref_norm,
    ulp,
)

import gradclip as gc
from gradclip import _backends, _reference, _tree

torch = pytest.importorskip("torch")
from gradclip._backends import _torch  # noqa: E402

# -- the CPU paths (blocked rows, concatenated small tensors, NumPy views) --------------------


@pytest.mark.parametrize("inplace", [True, False])
def test_torch_cpu_many_small_and_large_tensors_match_core(inplace):
    """Hundreds of small tensors of two dtypes (concatenated in batches), large ones
    (blocked rows; bfloat16 widened through the buffer), a strided one (NumPy views):
    the same norm as the core to a few ulps, the same clipped values."""
    g = torch.Generator().manual_seed(0)

    def make():
        g.manual_seed(0)
        xs = [
            torch.randn(int(n), generator=g) * 3
            for n in torch.randint(1, 300, (400,), generator=g)
        ]
        xs += [torch.randn(5, 7, generator=g).to(torch.bfloat16) for _ in range(50)]
        xs += [
            torch.randn(70_001, generator=g),
            torch.randn(300, 257, generator=g).to(torch.bfloat16),
        ]
        xs.append(torch.randn(600, 500, generator=g).t())  # strided
        return xs

    a, n1, b, n2 = clip_fast_and_reference(make, inplace, eps=1e-6)
    assert_ulps(float(n1), float(n2), "float32")
    exact = ref_norm([x.double().numpy() for x in make()], 2)
    assert_ulps(float(n1), exact, "float32")
    backend = make_backend("torch")
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert_close(backend, x, y, rtol=2 * ulp(x.dtype))


@pytest.mark.parametrize("widen", [True, False])
@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_torch_cpu_widened_multiply_is_torchs_own_bit_for_bit(dt, widen, monkeypatch):
    """16-bit tensors scaled through the float32 buffer (large contiguous ones, in
    pieces, when there are enough of them) or by ``_foreach_mul_`` (the others) round
    exactly as torch's own ``mul_`` by a float32 scale: once, from the float32
    product."""
    if widen:
        monkeypatch.setattr(_torch, "WIDE_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(3)
    dtype = getattr(torch, dt)
    xs = [torch.randn(n, generator=g).to(dtype) for n in (100_003, 4096, 17, 1)]
    xs.append(torch.randn(300, 200, generator=g).to(dtype).t())  # strided
    s = torch.tensor(0.7071067, dtype=torch.float32)
    want = [x.clone().mul_(s) for x in xs]
    _torch._widened_mul_(xs, s, 4096, [x.numel() for x in xs])
    for x, w in zip(xs, want):
        assert torch.equal(x, w)


def test_torch_cpu_extreme_values_take_the_exact_path():
    for values, dt in (([3e30, 4e30], torch.float32), ([3e-30, 4e-30], torch.float32),
                       ([1e30] * 2000, torch.bfloat16)):  # fmt: skip
        xs = [torch.tensor(values, dtype=dt)] + [torch.tensor(values[:1], dtype=dt)] * 300
        exact = ref_norm([x.double().numpy() for x in xs], 2)
        got = float(gc.global_norm(xs))
        assert math.isfinite(got) and got == pytest.approx(exact, rel=1e-6)


# -- the device path, run on the CPU ----------------------------------------------------------


def _foreach_norm(tree, p):
    """The norm from the device path's per-leaf terms, combined as the reference does."""
    terms = _torch.leaf_terms(_torch.TorchPath(tree, "device"), p)
    return float(_reference.combine(tree, terms, p))


@pytest.mark.parametrize("p", [2, math.inf])
@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16", "float64"])
def test_torch_foreach_terms_match_core(dt, p):
    """The foreach (non-CPU) path's per-leaf terms, combined by the core, on CPU tensors.

    torch's CPU norm kernel is less accurate than CUDA's, hence 1e-6 here.
    """
    b = make_backend("torch")
    rng = np.random.default_rng(8)
    tree = _tree.flatten(random_tree(b, [dt, "float32"], rng))
    got = _foreach_norm(tree, p)
    with _backends.fast_paths(False):
        want = float(_reference.tree_norm(tree, p))
    assert got == pytest.approx(want, rel=1e-6)
    for values in ([3e30, 4e30], [np.inf, 1.0], [np.nan, np.inf]):
        if dt == "float16" and abs(values[0]) > 1e5:
            continue
        t = _tree.flatten([b.asarray(np.array(values), dt)])
        got = _foreach_norm(t, p)
        want = ref_norm([np.array(values, dtype=np.float64)], p)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-2)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_torch_clip_scale_matches_core_bit_for_bit(dt):
    """torch's three-kernel scale (a CPU scalar for ``max_norm``, the quotient
    overwritten where it is not used) against the core's, at the edges: zero and
    infinite norms and thresholds, 0/0 and inf/inf, NaN, a threshold that overflows
    float32, 0-d thresholds of torch and NumPy."""
    dtype = getattr(torch, dt)
    three = math.nextafter(3.0, 4.0)
    norms = [0.0, 1.0, 2.5, 3.0, three, 1e30, 1e300, math.inf, math.nan]
    limits = [0.0, 3.0, 1e39, math.inf, np.float64(3.0), torch.tensor(3.0, dtype=torch.float64)]
    for n, m, eps in itertools.product(norms, limits, [0.0, 1e-6]):
        norm = torch.tensor(n, dtype=dtype)
        got = _torch.select(_tree.flatten(norm)).clip_scale(norm, m, eps)
        want = gc.clip_scale(norm, m, eps=eps)  # the reference's
        assert got.dtype == want.dtype and got.shape == ()
        assert got.numpy().tobytes() == want.numpy().tobytes(), (n, m, eps, got, want)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dts", [["float32"], ["bfloat16"], ["float16", "float32"]])
def test_torch_device_path_on_cpu_matches_core(dts, inplace, monkeypatch):
    """The path of CUDA tensors (float64 foreach norms, their norm, the three-kernel
    scale, one foreach multiply per group), run on CPU tensors, against the core."""
    monkeypatch.setattr(_torch, "_kind", lambda tree: "device")
    monkeypatch.setattr(_torch.TorchPath, "on_cuda", property(lambda self: True))
    b = make_backend("torch")
    rng = np.random.default_rng(9)
    grads = random_tree(b, dts, rng, big=True)
    core = {k: v.clone() for k, v in grads.items()}
    with _backends.fast_paths(False):
        want_norm = gc.clip_by_global_norm_(core, 1.0, eps=1e-6)
    if inplace:
        norm = gc.clip_by_global_norm_(grads, 1.0, eps=1e-6)
        got = grads
    else:
        got, norm = gc.clip_by_global_norm(grads, 1.0, eps=1e-6)
    assert_ulps(float(norm), float(want_norm), "float32")
    for k in core:
        tol = 2.0**-7 if got[k].dtype == torch.bfloat16 else 2.0**-10  # an ulp of the leaf
        torch.testing.assert_close(got[k], core[k], rtol=tol, atol=0)


def test_torch_traced_and_autograd_use_the_core():
    """Tensors that require grad take the reference's norm, with its overflow-free
    derivative (the autograd path), never the host or foreach paths."""
    from gradclip._backends import _torch

    x = torch.ones(3, requires_grad=True)
    assert type(_backends.plan(_tree.flatten([x])).fast) is _torch.AutogradPath
    n = gc.global_norm([x * 2.0])
    n.backward()
    np.testing.assert_allclose(x.grad.numpy(), np.full(3, 2 / math.sqrt(3)), rtol=1e-6)


def test_torch_func_transforms_use_the_core():
    """Inside ``torch.func.vmap`` and ``grad`` the leaves are functorch wrappers:
    the core runs (per example, differentiably), not the host path."""
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    norms = torch.func.vmap(lambda r: gc.global_norm([r, r[:2]]))(x)
    want = torch.sqrt((x**2).sum(1) + (x[:, :2] ** 2).sum(1))
    torch.testing.assert_close(norms, want)
    g = torch.func.grad(lambda r: gc.global_norm([r]))(x[0])
    torch.testing.assert_close(g, x[0] / torch.linalg.vector_norm(x[0]))
