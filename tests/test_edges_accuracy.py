"""Accuracy on every path and layout, and the dtypes and views at the edges.

The norm's promise (relative error at most 1e-6 against float64 for a float32
accumulation) is checked on every path that computes it: NumPy and torch on the CPU
with the C kernels and without (``_native.lib = None``, as ``GRADCLIP_NATIVE=0``),
on one thread and on two, torch Parameters, the Array API reference
(``fast_paths(False)``) and JAX, for float32, float16 and bfloat16 leaves, over
layouts made to break float32 sums: lanes that start with a large square and then
add small ones whose squares fall just below half an ulp of it (each lost entirely),
values with few significant bits after a full-precision prefix (which a sampled
guess of the layout misses), strided, 2-D and many small leaves.

Then: big-endian and long double NumPy leaves, torch views with the negative bit set,
masked arrays (rejected everywhere, naming the leaf), the phase of clipped complex
values (also infinite ones), and JAX's flush of subnormal inputs on the CPU (a
platform limit, pinned here).
"""

from __future__ import annotations

import cmath
import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradclip as gc
from gradclip import _tree
from gradclip._backends import _host, _native, fast_paths

ml_dtypes = pytest.importorskip("ml_dtypes")
torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)

BOUND = 1e-6  # the promised relative error of a float32-accumulated norm
BF16 = np.dtype(ml_dtypes.bfloat16)
LIB = _native.lib
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


def exact_norm(arrays: list[np.ndarray]) -> float:
    """The 2-norm of every element, from float64 values (exact for 16/32-bit ones)
    scaled by the largest magnitude and summed by ``math.fsum``."""
    flat = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    a = np.abs(flat)
    m = float(a.max())
    if m == 0 or not math.isfinite(m):
        return m
    return m * math.sqrt(math.fsum((a / m) ** 2))


def rel(got: Any, want: float) -> float:
    got = got.detach() if isinstance(got, torch.Tensor) else got
    return abs(float(got) - want) / want


# -- the paths -----------------------------------------------------------------------------


@contextlib.contextmanager
def two_threads() -> Iterator[None]:
    """The host paths on two threads, with units of 4096 elements (small inputs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_native, "threads", lambda: 2)
        mp.setattr(_native, "PER_THREAD", 1 << 10)
        mp.setattr(_native, "CHUNK", 1 << 12)
        mp.setattr(_host, "CHUNK", 1 << 12)
        yield


@contextlib.contextmanager
def kernels(on: bool) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if not on:
            mp.setattr(_native, "lib", None)
        yield


def _torch(a: np.ndarray) -> Any:
    if a.dtype == BF16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a.copy())


def paths(make: Callable[[Callable[[np.ndarray], Any]], list[Any]]) -> dict[str, Any]:
    """The norm of the tree ``make(convert)`` on every path (``convert`` turns a
    C-contiguous NumPy base array into the library's array; ``make`` applies the
    layout's views)."""
    out = {}
    for on in (True, False) if LIB is not None else (False,):
        for threads in (1, 2):
            with kernels(on), two_threads() if threads == 2 else contextlib.nullcontext():
                tag = f"kernels={on} threads={threads}"
                out[f"numpy {tag}"] = gc.global_norm(make(np.array))
                out[f"torch {tag}"] = gc.global_norm(make(_torch))
    params = [torch.nn.Parameter(t, requires_grad=False) for t in make(_torch)]
    out["torch Parameter"] = gc.global_norm(params)
    with fast_paths(False):
        out["numpy reference"] = gc.global_norm(make(np.array))
        out["torch reference"] = gc.global_norm(make(_torch))
    out["jax"] = gc.global_norm(make(lambda a: jnp.asarray(a)))
    return out


# -- adversarial layouts ---------------------------------------------------------------------

LAYOUTS = ["flat", "rows", "leaves", "transposed", "mixed"]


def layout(base: np.ndarray, kind: str) -> Callable[[Callable[[np.ndarray], Any]], list[Any]]:
    """The tree of ``base`` (1-D) in layout ``kind``, for any library."""
    n = base.size
    if kind == "flat":
        return lambda conv: [conv(base)]
    if kind == "rows":
        return lambda conv: [conv(base.reshape(-1, 256))]
    if kind == "leaves":
        return lambda conv: [conv(r) for r in base.reshape(-1, 1024)]
    if kind == "transposed":
        return lambda conv: [conv(base.reshape(-1, 64)).T]
    cut = n // 2
    return lambda conv: [conv(base[:cut])] + [conv(r) for r in base[cut:].reshape(-1, 512)]


def lanes_that_lose(
    dtype: str, n: int, block: int, big: int, lead: str, e: int, frac: float, seed: int
) -> np.ndarray:
    """Blocks of ``block`` elements whose first ``big`` are large and the rest small,
    with squares ``2**-e`` of the large ones' (just below half an ulp of them for
    ``e = 24``): a float32 lane that adds them after a large square drops them all."""
    rng = np.random.default_rng(seed)
    lead_values = {
        "ones": np.ones(n),
        "odd": np.full(n, 1 + 2.0**-23),  # low bits set: not taken for a short value
        "random": rng.standard_normal(n) + 3,
    }[lead]
    x = np.full(n, 2.0 ** (-e / 2) * frac) * lead_values
    first = np.arange(n) % block < big
    x[first] = lead_values[first]
    x *= rng.choice([-1.0, 1.0], n)
    return x.astype(BF16 if dtype == "bfloat16" else dtype)


def few_bits_after_a_prefix(dtype: str, n: int, seed: int) -> np.ndarray:
    """Values with 8 significant bits (bfloat16's) after 32 full-precision ones."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n, dtype=np.float32) + 3
    a = ((a.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)
    a[:32] = rng.standard_normal(32)
    return a.astype(BF16 if dtype == "bfloat16" else dtype)


@SETTINGS
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    n=st.sampled_from([1 << 14, 1 << 17, 1 << 19]),
    block=st.sampled_from([8, 33, 256, 1024, 4096, 1 << 14]),
    big=st.integers(1, 64),
    lead=st.sampled_from(["ones", "odd", "random"]),
    e=st.integers(20, 28),
    frac=st.sampled_from([1.0, 1 - 2.0**-11, 1 - 2.0**-8, 0.9]),
    kind=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
# one float32 BLAS dot per 2**18 elements (the kernels off): off by 1.2e-4
@example("float32", 1 << 19, 1 << 14, 32, "odd", 24, 1 - 2.0**-10, "flat", 0)
# torch's row norms and dots over small tensors: off by 7.4e-6
@example("float32", 1 << 19, 1 << 14, 1, "odd", 24, 1 - 2.0**-10, "leaves", 0)
@example("float16", 1 << 19, 4096, 1, "ones", 24, 1.0, "leaves", 0)
def test_norm_of_adversarial_layouts_is_accurate_on_every_path(
    dtype, n, block, big, lead, e, frac, kind, seed
):
    base = lanes_that_lose(dtype, n, block, min(big, block), lead, e, frac, seed)
    make = layout(base, kind)
    want = exact_norm(make(np.array))
    errors = {name: rel(v, want) for name, v in paths(make).items()}
    assert max(errors.values()) <= BOUND, errors


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_norm_of_few_bits_after_a_full_prefix_is_accurate_on_every_path(dtype, kind):
    """The NumPy path once guessed the layout from the first 32 values of a chunk: a
    full-precision prefix sent 2**20 short values to one float32 dot (off by 1e-5)."""
    make = layout(few_bits_after_a_prefix(dtype, 1 << 20, 7), kind)
    want = exact_norm(make(np.array))
    errors = {name: rel(v, want) for name, v in paths(make).items()}
    assert max(errors.values()) <= BOUND, errors


@pytest.mark.skipif(LIB is None, reason="the C kernels are not built here")
@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    block=st.sampled_from([32, 64, 256, 1024, 2048]),
    big=st.integers(1, 64),
    lead=st.sampled_from(["ones", "odd", "random"]),
    frac=st.sampled_from([1.0, 1 - 2.0**-11, 1 - 2.0**-8]),
    seed=st.integers(0, 2**16),
)
@example("float32", 1024, 1, "odd", 1 - 2.0**-11, 0)  # rows of 32 squares a lane: 1.8e-6
def test_kernel_sum_of_squares_is_within_its_bound_for_any_layout(
    dtype, block, big, lead, frac, seed
):
    """The C kernel's float32 lanes add at most 8 squares before a row's lanes are
    added: its sum is within 16 * 2**-24 of exact whatever the values."""
    x = lanes_that_lose(dtype, 1 << 14, block, min(big, block), lead, 24, frac, seed)
    want = math.fsum(np.asarray(x, dtype=np.float64) ** 2)
    assert abs(_native.sumsq(x) - want) <= 16 * 2.0**-24 * want


def test_torch_parameters_and_subclasses_are_as_accurate_as_plain_tensors():
    """A CPU Parameter took torch's foreach norm (off by 1.2e-5 over 2**20 normals);
    it takes the host path now, and other subclasses the reference."""

    class Tagged(torch.Tensor):
        pass

    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    want = exact_norm([x])
    t = torch.from_numpy(x)
    trees = {
        "tensor": t,
        "parameter": torch.nn.Parameter(t, requires_grad=False),
        "subclass": t.as_subclass(Tagged),
        "parameter requiring grad": torch.nn.Parameter(t.clone()),
    }
    for name, tree in trees.items():
        assert rel(gc.global_norm(tree), want) <= BOUND, name
        clipped, norm = gc.clip_by_global_norm(tree, 1.0)
        assert rel(norm, want) <= BOUND, name
        assert rel(exact_norm([clipped.detach().numpy()]), 1.0) <= 1e-6, name


def test_trees_on_the_cpu_and_a_device_take_the_reference():
    """On the CPU torch's foreach norm adds thousands of squares per float32 lane: a
    tree spread over the CPU and another device takes the reference."""
    from gradclip._backends import _torch

    tree = _tree.flatten([torch.ones(3), torch.ones(3, device="meta")])
    assert _torch.select(tree) is None


# -- dtypes: big-endian, long double ---------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    order=st.sampled_from([">", "<"]),
    kind=st.sampled_from(["f8", "c16", "f4", "f2"]),
    exponent=st.integers(-300, 300),
    n=st.integers(1, 3000),
    inplace=st.booleans(),
    fast=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(">", "f8", 300, 2, False, True, 0)  # [3e300, 4e300] in float32: inf, zeroed step
def test_other_byte_orders_accumulate_as_their_width(
    order, kind, exponent, n, inplace, fast, seed
):
    """A float wider than 32 bits accumulates in float64 in either byte order (a
    big-endian float64 was summed in float32: 1e300 gave an infinite norm and zeros),
    and the clipped leaves keep their dtype, byte order included."""
    dt = np.dtype(order + kind)
    finfo = np.finfo(dt)
    exponent = int(np.clip(exponent, math.log10(finfo.tiny) + 2, math.log10(finfo.max) - 4))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0**exponent
    if dt.kind == "c":
        x = x + 1j * rng.standard_normal(n) * 10.0**exponent
    x = x.astype(dt)
    wide = dt.itemsize > (8 if dt.kind == "c" else 4)
    want = exact_norm([np.abs(x)])
    with fast_paths(fast):
        norm = gc.global_norm(x)
        assert norm.dtype == (np.float64 if wide else np.float32)
        assert rel(norm, want) <= (1e-12 if wide else BOUND)
        if inplace:
            y = x.copy()
            gc.clip_by_global_norm_(y, want / 2)
        else:
            y, _ = gc.clip_by_global_norm(x, want / 2)
    assert y.dtype == dt
    tol = 2 * float(np.finfo(dt).eps)  # (and half the spacing of subnormal values)
    half = x.astype(np.complex128) * 0.5
    np.testing.assert_allclose(
        y.astype(np.complex128), half, rtol=tol, atol=finfo.smallest_subnormal
    )
    for fn in (gc.clip_by_value, gc.clip_by_norm):
        assert fn(x, 1.0).dtype == dt


@pytest.mark.skipif(
    np.finfo(np.longdouble).bits <= 64, reason="long double is float64 on this platform"
)
@pytest.mark.parametrize("dtype", [np.longdouble, np.clongdouble])
def test_long_double_is_a_type_error_naming_the_leaf(dtype):
    """A float64 sum cannot hold long double values beyond float64's range (1e400):
    such a leaf is refused, on every path, before anything is written."""
    tree = {"w": np.ones(3), "b": np.array([1e30, 2.0]).astype(dtype)}
    for fast in (True, False):
        with fast_paths(fast):
            for call in (
                lambda: gc.global_norm(tree),
                lambda: gc.clip_by_global_norm(tree, 1.0),
                lambda: gc.clip_by_global_norm_(tree, 1.0),
                lambda: gc.clip_by_norm(tree, 1.0),
                lambda: gc.clip_by_value(tree, 1.0),
            ):
                with pytest.raises(TypeError, match=r"grads\['b'\].*wider than float64"):
                    call()
    np.testing.assert_array_equal(tree["w"], np.ones(3))


# -- torch views with the negative bit --------------------------------------------------------


def _neg_views(dtype: Any, n: int) -> tuple[list[Any], list[Any]]:
    """Leaves with the negative bit set (``x.conj().imag`` of a complex tensor, and
    ``torch._neg_view``) beside plain ones, and their values as plain tensors."""
    rng = np.random.default_rng(n)
    z = torch.from_numpy(rng.standard_normal(n) + 1j * rng.standard_normal(n))
    imag = z.conj().imag.to(dtype) if dtype == torch.float64 else None
    base = torch.from_numpy(rng.standard_normal(n)).to(dtype)
    leaves = [torch._neg_view(base), torch.from_numpy(rng.standard_normal(7)).to(dtype)]
    if imag is not None:
        leaves.append(z.conj().imag)
    assert any(x.is_neg() for x in leaves)
    return leaves, [x.resolve_neg().clone() for x in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [5, 5000])
@pytest.mark.parametrize("native", [True, False])
def test_torch_views_with_the_negative_bit(dtype, n, native):
    """``x.numpy()``, ``x.view(torch.int16)`` and in-place foreach calls refuse views
    with the negative bit: the fast path reads them without it (the same magnitudes)
    and scales their memory (the same product), with the reference's results."""
    with kernels(native and LIB is not None):
        for p in (2, math.inf, 1):
            leaves, plain = _neg_views(dtype, n)
            with fast_paths(False):
                want = gc.global_norm(plain, ord=p)
            assert float(gc.global_norm(leaves, ord=p)) == pytest.approx(float(want), rel=1e-6)
        leaves, plain = _neg_views(dtype, n)
        with fast_paths(False):
            want, _ = gc.clip_by_global_norm(plain, 1.0)
        got, _ = gc.clip_by_global_norm(leaves, 1.0)
        tol = 4 * torch.finfo(dtype).eps  # ulps: the norms differ in their last bits
        for g, w in zip(got, want):
            torch.testing.assert_close(g.resolve_neg(), w, rtol=tol, atol=0)
        gc.clip_by_global_norm_(leaves, 1.0)  # every leaf scaled: none left half done
        for g, w in zip(leaves, want):
            torch.testing.assert_close(g.resolve_neg(), w, rtol=tol, atol=0)


# -- masked arrays ---------------------------------------------------------------------------


def _masked_trees() -> list[tuple[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.masked is a prototype
        from torch.masked import masked_tensor

        t = masked_tensor(torch.tensor([3.0, 4.0, 100.0]), torch.tensor([True, True, False]))
    m = np.ma.masked_array([3.0, 4.0, 100.0], mask=[0, 0, 1])
    return [
        ("numpy", {"w": np.ones(3), "b": [m]}),
        ("torch", {"w": torch.ones(3), "b": [t]}),
    ]


@pytest.mark.parametrize(("lib", "tree"), _masked_trees())
@pytest.mark.parametrize("fast", [True, False])
def test_masked_arrays_are_a_type_error_naming_the_leaf(lib, tree, fast):
    """The fast paths read the data under a mask and the reference may honour it (the
    norm was 100.1 on one and 5 on the other): no path takes a masked array."""
    calls = {
        "global_norm": lambda: gc.global_norm(tree),
        "clip_by_global_norm": lambda: gc.clip_by_global_norm(tree, 1.0),
        "clip_by_global_norm_": lambda: gc.clip_by_global_norm_(tree, 1.0),
        "clip_by_norm": lambda: gc.clip_by_norm(tree, 1.0),
        "clip_by_value": lambda: gc.clip_by_value(tree, 1.0),
        "adaptive_grad_clip": lambda: gc.adaptive_grad_clip(tree, tree, 0.1),
        "per_example_clip": lambda: gc.per_example_clip(tree, max_norm=1.0),
    }
    with fast_paths(fast):
        for name, call in calls.items():
            with pytest.raises(TypeError, match=r"grads\['b'\]\[0\] is a masked array"):
                call()
            assert float(tree["w"].sum()) == 3.0, name  # nothing written


# -- clip_by_value of complex values ---------------------------------------------------------

PARTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, 1e308, -1e308, 3e38, 1e-300]),
)


def _libs() -> dict[str, Callable[[np.ndarray], Any]]:
    import array_api_strict as xps

    return {
        "numpy": lambda a: a,
        "torch": torch.from_numpy,
        "jax": jnp.asarray,
        "array_api_strict": xps.asarray,
    }


@settings(max_examples=60, deadline=None)
@given(
    re=st.lists(PARTS, min_size=1, max_size=8),
    im=st.lists(PARTS, min_size=8, max_size=8),
    c=st.sampled_from([0.0, 1e-3, 1.0, 2.5, 1e30]),
    single=st.booleans(),
)
@example(re=[math.inf], im=[math.inf] * 8, c=1.0, single=False)  # was NaN + NaN j
def test_clip_by_value_keeps_the_phase_of_complex_values(re, im, c, single):
    """A complex element beyond ``clip_value`` becomes ``clip_value`` in its own
    direction, also an infinite one (``inf + inf j`` at pi/4, ``x * (c / |x|)`` gave
    NaN) or one whose magnitude overflows; NaN stays NaN; the others are unchanged."""
    dt = np.complex64 if single else np.complex128
    with np.errstate(over="ignore", invalid="ignore"):
        z = (np.array(re) + 1j * np.array(im[: len(re)])).astype(dt)
        mags = np.abs(z)  # in the leaf's own precision (complex64: inf beyond 3.4e38)
    tiny = float(np.finfo(dt).smallest_normal)
    for name, conv in _libs().items():
        out = np.asarray(gc.clip_by_value(conv(z), c)).astype(np.complex128)
        for x, mag, y in zip(z.astype(np.complex128), mags, out):
            if name == "jax" and 0 < mag < tiny:
                continue  # XLA on the CPU reads a subnormal magnitude as 0 (see below)
            if math.isnan(x.real) or math.isnan(x.imag):
                assert math.isnan(y.real) or math.isnan(y.imag), (name, x, y)
            elif mag <= c:
                assert y == x, (name, x, y)
            else:
                assert abs(y) == pytest.approx(c, rel=1e-6), (name, x, y)
                direction = cmath.exp(1j * np.angle(x))  # np.angle(inf + inf j) is pi/4
                assert abs(y - c * direction) <= 1e-6 * c, (name, x, y)


# -- JAX on the CPU: subnormal inputs are flushed ---------------------------------------------


@pytest.mark.parametrize(("dtype", "value"), [("float32", 1e-39), ("float64", 1e-310)])
def test_jax_cpu_flushes_subnormal_inputs_to_zero(dtype, value):
    """XLA on the CPU treats subnormal inputs and results as zero in every arithmetic
    operation (a platform limit, in the numerics page): a tree of subnormal gradients
    has norm 0 there and is multiplied by a scale of 1 into zeros, where NumPy and
    torch give the accurate norm. Normal inputs as small as the smallest normal number
    are accurate on JAX too."""
    if jax.default_backend() != "cpu":
        pytest.skip("the flush is XLA's on the CPU")
    x = np.full(10_000, value, dtype=dtype)
    want = exact_norm([x])  # 1e-37: normal
    assert rel(gc.global_norm(x), want) <= BOUND
    assert rel(gc.global_norm(torch.from_numpy(x)), want) <= BOUND
    assert float(gc.global_norm(jnp.asarray(x))) == 0.0
    clipped, _ = gc.clip_by_global_norm(jnp.asarray(x), 1.0)
    assert not np.asarray(clipped).any()
    tiny = np.full(10_000, np.finfo(dtype).smallest_normal * 3, dtype=dtype)
    assert rel(gc.global_norm(jnp.asarray(tiny)), exact_norm([tiny])) <= BOUND
