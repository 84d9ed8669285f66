"""Derivatives of the norm and of the clip: finite and accurate wherever they are.

The norm is taken without overflow (scaled by the largest magnitude); its derivative
must be as well. ``jax.grad`` and torch's autograd of the global norm and of
``clip_by_global_norm`` are checked against float64 formulas, element by element,
over float32 magnitudes from 1e-37 to 1e38 and float64 ones from 1e-300 to 1e300,
for ``ord`` 0.5, 1, 1.5, 2, 3 and inf; at a zero gradient every order has a finite
derivative (0 for finite ones). Per-leaf norms (``clip_by_norm``), complex leaves,
second derivatives and the homogeneity of the derivative (the same at ``x`` and at
``k x``) are checked too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gradclip as gc

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)

ORDS = [0.5, 1, 1.5, 2, 3, math.inf]
RTOL = {"float32": 2e-5, "float64": 1e-11}  # float32: logs of ratios near 1e-76 lose 1e-5
EXPONENTS = {"float32": (-37, 37), "float64": (-300, 299)}  # (normal: XLA flushes below)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


# -- float64 references ----------------------------------------------------------------------


def ref_norm(flat: np.ndarray, p: float) -> float:
    a = np.abs(flat.astype(np.float64))
    m = float(a.max())
    if m == 0 or math.isinf(p):
        return m
    return m * math.fsum((a / m) ** p) ** (1 / p)


def ref_grad(flat: np.ndarray, p: float) -> np.ndarray:
    """``sign(x) (|x| / n) ** (p - 1)`` in float64: through logarithms where the ratio
    underflows; 0 at zero elements and a zero norm; for inf, 1 at the largest
    magnitude (tests draw distinct magnitudes)."""
    x = flat.astype(np.float64)
    a = np.abs(x)
    n = ref_norm(flat, p)
    if n == 0:
        return np.zeros_like(x)
    if math.isinf(p):
        return np.sign(x) * (a == n)
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        r = a / n
        logs = (p - 1) * (np.log(np.where(a > 0, a, 1.0)) - math.log(n))
        w = np.where(r >= 1e-300, r ** (p - 1), np.exp(logs))
    return np.sign(x) * np.where(a > 0, w, 0.0)


def assert_grad(
    got: np.ndarray,
    want: np.ndarray,
    dtype: str,
    rtol: float | None = None,
    size: np.ndarray | None = None,
) -> None:
    """Element by element: relative to the float64 derivative (or to ``size``, the
    size of terms that cancel in it) where that is a normal number of ``dtype``,
    within the smallest normal number below that, and inf (or past the largest finite
    number) where it overflows."""
    fi = np.finfo(dtype)
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = want.reshape(-1)
    size = np.abs(want) if size is None else size.reshape(-1)
    rtol = RTOL[dtype] if rtol is None else rtol
    for g, w, z in zip(got, want, size):
        if abs(w) > float(fi.max):
            assert abs(g) >= float(fi.max) / 2, (g, w)
        elif z >= float(fi.smallest_normal):
            assert abs(g - w) <= rtol * z, (g, w, z)
        else:
            assert abs(g) <= 2 * float(fi.smallest_normal), (g, w)


@st.composite
def gradients(draw: Any, dtype: str, p: float) -> np.ndarray:
    """1 to 6 elements of magnitudes anywhere in ``dtype``'s normal range, or close
    together (one decade), some zero; distinct magnitudes (the inf-norm's derivative
    is a one-hot then)."""
    lo, hi = EXPONENTS[dtype]
    n = draw(st.integers(1, 6))
    if draw(st.booleans()):
        exps = draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))
    else:
        e = draw(st.floats(lo, hi - 1))
        exps = [e + d for d in draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))]
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
    zeros = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    x = np.array(
        [0.0 if z and i else s * 10.0**e for i, (s, e, z) in enumerate(zip(signs, exps, zeros))]
    )
    x = x.astype(dtype)
    a = np.abs(x.astype(np.float64))
    assume(len(set(a[a > 0])) == int((a > 0).sum()))
    assume(ref_norm(x, p) <= float(np.finfo(dtype).max))
    return x


def jax_grad(fn: Any, x: np.ndarray, jit: bool = False) -> np.ndarray:
    g = jax.grad(fn)
    return np.asarray((jax.jit(g) if jit else g)(jnp.asarray(x)))


def torch_grad(fn: Any, x: np.ndarray) -> np.ndarray:
    t = torch.tensor(x, requires_grad=True)
    fn(t).backward()
    return t.grad.numpy()


# -- the global norm ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", ORDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(data=st.data())
def test_norm_derivative_matches_float64_on_every_magnitude(p, dtype, data):
    x = data.draw(gradients(dtype, p))
    want = ref_grad(x, p)
    norm = lambda v: gc.global_norm(v, ord=p)  # noqa: E731
    assert_grad(jax_grad(norm, x), want, dtype)
    assert_grad(jax_grad(norm, x, jit=True), want, dtype)
    assert_grad(torch_grad(norm, x), want, dtype)


@pytest.mark.parametrize(
    ("x", "dtype"),
    [([3e30, 4e30], "float32"), ([3e-30, 4e-30], "float32"), ([3e200, 4e200], "float64")],
)
def test_the_issues_examples(x, dtype):
    """``jax.grad(gc.global_norm)`` at [3e30, 4e30] was [0.6, 3.3], at [3e-30, 4e-30]
    [nan, -inf] (the scale's square over- or underflowed in the automatic one)."""
    x = np.array(x, dtype=dtype)
    for got in (jax_grad(gc.global_norm, x), torch_grad(gc.global_norm, x)):
        np.testing.assert_allclose(got, [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("p", ORDS)
def test_derivative_at_a_zero_gradient_is_finite(p):
    """0 for every finite order (a subgradient; ``ord=0.5`` gave NaN), finite for inf;
    and for ``p < 1`` 0 at a zero element beside nonzero ones."""
    zeros = np.zeros((2, 3))
    norm = lambda v: gc.global_norm(v, ord=p)  # noqa: E731
    for got in (jax_grad(norm, zeros), jax_grad(norm, zeros, jit=True), torch_grad(norm, zeros)):
        assert np.all(np.isfinite(got))
        if not math.isinf(p):
            assert not got.any()
    x = np.array([0.0, 3.0, -4.0])
    for got in (jax_grad(norm, x), torch_grad(norm, x)):
        assert_grad(got, ref_grad(x, p), "float64")


@pytest.mark.parametrize("p", ORDS)
def test_derivative_through_the_clip_at_a_zero_gradient_is_the_identity(p):
    W = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])

    def loss(v: Any) -> Any:
        clipped, _ = gc.clip_by_global_norm(v, 1.0, ord=p)
        return (clipped * (jnp.asarray(W) if isinstance(v, jax.Array) else torch.tensor(W))).sum()

    for got in (jax_grad(loss, np.zeros((2, 3))), torch_grad(loss, np.zeros((2, 3)))):
        np.testing.assert_array_equal(got, W)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.integers(-30, 30), p=st.sampled_from([1.5, 2, 3]))
def test_derivative_is_the_same_at_x_and_at_k_x(dtype, seed, scale, p):
    """The norm is homogeneous of degree 1, so its derivative is of degree 0: the
    same at ``x`` and at ``x * 10**k``, for trees of several leaves and dtypes."""
    k = 10.0 ** (scale * (1 if dtype == "float32" else 9))
    rng = np.random.default_rng(seed)
    x = [rng.standard_normal(5).astype(dtype), rng.standard_normal((2, 3)).astype(dtype)]
    y = [(v * k).astype(dtype) for v in x]
    assume(all(np.all(np.isfinite(v)) for v in y))
    jx = jax.grad(lambda t: gc.global_norm(t, ord=p))([jnp.asarray(v) for v in x])
    jy = jax.grad(lambda t: gc.global_norm(t, ord=p))([jnp.asarray(v) for v in y])
    for a, b in zip(jx, jy):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=RTOL[dtype] * 10)
    tx = [torch.tensor(v, requires_grad=True) for v in x]
    ty = [torch.tensor(v, requires_grad=True) for v in y]
    gc.global_norm(tx, ord=p).backward()
    gc.global_norm(ty, ord=p).backward()
    for a, b in zip(tx, ty):
        np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=RTOL[dtype] * 10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_leaves_get_their_derivative_in_their_dtype(dtype):
    x = np.array([3e3, -4e3, 1.0])
    want = ref_grad(x, 2)
    got = jax.grad(gc.global_norm)(jnp.asarray(x, dtype=dtype))
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=2**-7)
    t = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
    gc.global_norm(t).backward()
    assert t.grad.dtype == t.dtype
    np.testing.assert_allclose(t.grad.double().numpy(), want, rtol=2**-7)


# -- the clip ----------------------------------------------------------------------------------


def ref_clip_grad(
    x: np.ndarray, w: np.ndarray, m: float, p: float
) -> tuple[np.ndarray, float, np.ndarray]:
    """d/dx and d/dm of ``sum(w * clip(x))``: ``w`` below the threshold, else
    ``(m / n) (w - (w . x / n) g)`` and ``w . x / n`` (``g`` the norm's derivative);
    and the size of the two terms of d/dx, which may cancel (the scale of its error)."""
    n = ref_norm(x, p)
    if n <= m:
        return w.astype(np.float64), 0.0, np.abs(w)
    x64 = x.astype(np.float64)
    wx = math.fsum(w * (x64 / n))
    g = ref_grad(x, p)
    return (m / n) * (w - wx * g), wx, (m / n) * (np.abs(w) + np.abs(wx * g))


def _check_clip_derivative(x: np.ndarray, dtype: str, p: float, ratio: float) -> None:
    n = ref_norm(x, p)
    m = n * ratio
    w = np.linspace(-2.0, 1.7, x.size)
    want_x, want_m, size = ref_clip_grad(x, w, m, p)
    rtol = RTOL[dtype] * 10

    def loss(v: Any, mn: Any) -> Any:
        jax_leaf = isinstance(v, jax.Array)
        wt = jnp.asarray(w, dtype=dtype) if jax_leaf else torch.tensor(w, dtype=v.dtype)
        return (gc.clip_by_global_norm(v, mn, ord=p)[0] * wt).sum()

    # d/dm = w . x / n: its terms' size bounds its error (they may cancel)
    m_tol = rtol * math.fsum(np.abs(w * x.astype(np.float64))) / ref_norm(x, p)
    gx, gm = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(m, dtype=dtype))
    assert_grad(gx, want_x, dtype, rtol=rtol, size=size)
    assert abs(float(gm) - want_m) <= m_tol
    tx = torch.tensor(x, requires_grad=True)
    tm = torch.tensor(m, dtype=tx.dtype, requires_grad=True)
    loss(tx, tm).backward()
    assert_grad(tx.grad.numpy(), want_x, dtype, rtol=rtol, size=size)
    assert abs(float(tm.grad) - want_m) <= m_tol


@pytest.mark.parametrize("p", [0.5, 1.5, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@SETTINGS
@given(data=st.data(), ratio=st.sampled_from([1e-3, 0.5, 0.999, 2.0]))
def test_clip_derivative_matches_float64_on_every_magnitude(p, dtype, ratio, data):
    """The clip's derivative by the gradients and by ``max_norm`` (a ratio of the
    norm), against float64."""
    x = data.draw(gradients(dtype, p))
    # the cotangent's sum w . x (|w| <= 2) must stay finite in the dtype
    assume(float(np.abs(x.astype(np.float64)).max()) * 20 <= float(np.finfo(dtype).max))
    m = ref_norm(x, p) * ratio
    assume(float(np.finfo(dtype).smallest_normal) * 1e3 <= m <= float(np.finfo(dtype).max))
    _check_clip_derivative(x, dtype, p, ratio)


@pytest.mark.parametrize(
    ("x", "dtype"),
    [([3e30, 4e30], "float32"), ([3e-30, 4e-30], "float32"), ([3e200, 4e200], "float64")],
)
def test_clip_derivative_the_issues_examples(x, dtype):
    """Autodiff of ``max_norm / norm`` forms ``1 / norm**2``, 0 in float32 for a norm
    of 5e30 (and in float64 for 5e200): the clip's derivative was wrong there."""
    _check_clip_derivative(np.array(x, dtype=dtype), dtype, 2, 0.5)


@pytest.mark.parametrize(
    ("x", "dtype"),
    [([3e30, 4e30], "float32"), ([3e200, 4e200], "float64"), ([3.0, 4.0], "float32")],
)
def test_clip_by_norm_derivative_at_large_values(x, dtype):
    """Per-leaf norms are differentiated automatically through the scaled form, whose
    scale is a constant to autodiff: right at 1e30 in float32 and 1e200 in float64."""
    x = np.array(x, dtype=dtype)
    w = np.array([1.0, -2.0])
    want, _, size = ref_clip_grad(x, w, 1.0, 2)

    def loss(v: Any) -> Any:
        wt = (
            jnp.asarray(w, dtype=dtype)
            if isinstance(v, jax.Array)
            else torch.tensor(w, dtype=v.dtype)
        )
        return (gc.clip_by_norm(v, 1.0) * wt).sum()

    assert_grad(jax_grad(loss, x), want, dtype, rtol=1e-5, size=size)
    assert_grad(torch_grad(loss, x), want, dtype, rtol=1e-5, size=size)


# -- second derivatives and complex leaves -----------------------------------------------------


@pytest.mark.parametrize(
    ("x", "dtype"), [([3.0, 4.0, 12.0], "float64"), ([3e30, 4e30, 12e30], "float32")]
)
def test_second_derivative_of_the_norm(x, dtype):
    """The Hessian of the 2-norm, ``(I - u u^T) / n``, through ``jax.hessian`` and
    torch's ``create_graph=True``."""
    x = np.array(x, dtype=dtype)
    x64 = x.astype(np.float64)
    n = ref_norm(x, 2)
    u = x64 / n
    want = (np.eye(x.size) - np.outer(u, u)) / n
    got = np.asarray(jax.hessian(gc.global_norm)(jnp.asarray(x)), dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 / n)
    t = torch.tensor(x, requires_grad=True)
    (g,) = torch.autograd.grad(gc.global_norm(t), t, create_graph=True)
    rows = [
        torch.autograd.grad(g[i], t, retain_graph=True)[0].double().numpy() for i in range(x.size)
    ]
    np.testing.assert_allclose(np.array(rows), want, rtol=1e-5, atol=1e-6 / n)


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_complex_leaves(scale):
    """A complex leaf's derivative follows each library's convention (torch: ``z / n``;
    JAX: what its own autodiff of the plain norm gives at moderate values), the same
    at ``z`` and at ``z * 1e30`` (complex64)."""
    rng = np.random.default_rng(3)
    z = (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64)
    plain_j = jax.grad(lambda v: jnp.sqrt(jnp.sum(jnp.abs(v) ** 2)))(jnp.asarray(z))
    got_j = jax.grad(gc.global_norm)(jnp.asarray(z * np.float32(scale)))
    np.testing.assert_allclose(np.asarray(got_j), np.asarray(plain_j), rtol=1e-5)
    t = torch.tensor(z * np.float32(scale), requires_grad=True)
    gc.global_norm(t).backward()
    np.testing.assert_allclose(t.grad.numpy(), z / np.linalg.norm(z), rtol=1e-5)
