"""In-place calls at the edges: every leaf is checked before the first write, so on
any error no leaf has changed.

What could make a write fail or write some memory twice: a leaf whose elements
overlap (an expanded or ``as_strided`` view), two leaves that share memory (the same
array twice, overlapping views of one buffer: it would be scaled twice), views
autograd forbids changing in place, and dtypes without a multiply kernel (torch's
8-bit floats, which are written through a float32 product instead). The expected
outcome is worked out here independently, by enumerating the memory each leaf
touches.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import make_backend, ref_clip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradclip as gc

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
BUFFER = 64  # elements of the buffer the views are cut from


@st.composite
def layouts(draw):
    """1 to 4 views of one buffer: (offset, shape, strides) in elements, each inside
    the buffer; zero strides and overlapping strides included."""
    views = []
    for _ in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(1, 3))
        shape = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
        strides = draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim))
        span = sum((n - 1) * s for n, s in zip(shape, strides))
        if span >= BUFFER:
            continue
        offset = draw(st.integers(0, BUFFER - 1 - span))
        views.append((offset, tuple(shape), tuple(strides)))
    if not views:
        views.append((0, (2,), (1,)))
    return views


def _elements(offset, shape, strides):
    """The buffer index of every element of a view, in order."""
    idx = np.full((), offset)
    for n, s in zip(shape, strides):
        idx = np.add.outer(idx, np.arange(n) * s)
    return idx.reshape(-1)


def _expected(views):
    """("self", i) for the first view whose elements overlap, else ("shared", pairs)
    for views that share an element, else ("fine", None)."""
    elems = [_elements(*v) for v in views]
    for i, e in enumerate(elems):
        if len(np.unique(e)) < e.size:
            return "self", i
    pairs = {
        (i, j)
        for i in range(len(elems))
        for j in range(i + 1, len(elems))
        if np.intersect1d(elems[i], elems[j]).size
    }
    return ("shared", pairs) if pairs else ("fine", None)


def _make_views(b, views, dtype):
    """The buffer (of backend ``b``) and the strided views of it."""
    buf = b.asarray(np.arange(1, BUFFER + 1, dtype=np.float64) / 8, dtype)
    if b.name == "numpy":
        size = buf.itemsize
        return buf, [
            np.lib.stride_tricks.as_strided(buf[o:], shape=sh, strides=[s * size for s in st_])
            for o, sh, st_ in views
        ]
    if b.name == "torch":
        return buf, [buf.as_strided(sh, st_, o) for o, sh, st_ in views]
    cupy = b.mod  # CuPy: byte strides, as NumPy
    size = buf.itemsize
    return buf, [
        cupy.lib.stride_tricks.as_strided(buf[o:], shape=sh, strides=[s * size for s in st_])
        for o, sh, st_ in views
    ]


@pytest.mark.parametrize("name", ["numpy", "torch", "cupy", "torch_cuda"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_overlapping_layouts_are_refused_before_any_write(name, dtype):
    """Random strided views of one buffer, clipped in place: a view whose elements
    overlap is a TypeError naming it, views that share elements a ValueError naming
    two that do, and then the buffer is unchanged; otherwise each view is clipped as
    the float64 reference says, and the buffer outside the views is untouched."""
    b = make_backend(name)

    @SETTINGS
    @given(layouts(), st.floats(0.01, 100.0))
    def check(views, max_norm):
        buf, leaves = _make_views(b, views, dtype)
        before = b.to_numpy(buf).copy()  # (copies: to_numpy may return a view)
        values = [b.to_numpy(x).copy() for x in leaves]
        kind, which = _expected(views)
        if kind == "self":
            with pytest.raises(TypeError, match=re.escape(f"grads[{which}] cannot be")):
                gc.clip_by_global_norm_(leaves, max_norm)
        elif kind == "shared":
            with pytest.raises(ValueError, match="share memory") as info:
                gc.clip_by_global_norm_(leaves, max_norm)
            named = tuple(map(int, re.findall(r"grads\[(\d+)\]", str(info.value))[:2]))
            assert named in which, (named, which)
        else:
            norm = gc.clip_by_global_norm_(leaves, max_norm)
            want, want_norm = ref_clip(values, max_norm, 2)
            assert float(b.to_numpy(norm)) == pytest.approx(want_norm, rel=1e-6)
            rtol = 1e-6 if dtype == "float32" else 1e-12
            for x, w in zip(leaves, want):
                np.testing.assert_allclose(b.to_numpy(x), w, rtol=rtol)
            touched = np.zeros(BUFFER, bool)
            for v in views:
                touched[_elements(*v)] = True
            np.testing.assert_array_equal(b.to_numpy(buf)[~touched], before[~touched])
            return
        np.testing.assert_array_equal(b.to_numpy(buf), before)

    check()


def test_the_issue_example_everywhere():
    """``[a, torch.ones(1).expand(3)]``: the core (fast path and reference), the
    stateful clip and every torch drop-in refuse it before ``a`` is scaled."""
    torch = pytest.importorskip("torch")
    gct = pytest.importorskip("gradclip.torch")
    from gradclip import _backends

    def grads():
        return [torch.tensor([3.0, 4.0]), torch.ones(1).expand(3)]

    calls = [
        lambda g: gc.clip_by_global_norm_(g, 1.0),
        lambda g: gc.clip_by_global_norm_(g, 1.0, nonfinite="zero"),
        lambda g: gc.clip_stateful_(g, gc.AutoClip(history=2), gc.AutoClip(history=2).init(g[0])),
    ]
    for fast in (True, False):
        for call in calls:
            g = grads()
            with _backends.fast_paths(fast), pytest.raises(TypeError, match=r"grads\[1\]"):
                call(g)
            torch.testing.assert_close(g[0], torch.tensor([3.0, 4.0]))

    def params():
        ps = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
        for p, g in zip(ps, grads()):
            p.grad = g
        return ps

    for call in (
        lambda ps: gct.clip_grad_norm_(ps, 1.0),
        lambda ps: gct.clip_grad_norm_(ps, 1.0, foreach=False),
        lambda ps: gct.clip_grads_with_norm_(ps, 1.0, torch.tensor(5.0)),
        lambda ps: gct.clip_grad_value_(ps, 1.0),
    ):
        ps = params()
        with pytest.raises(TypeError, match=r"grads\[1\]"):
            call(ps)
        torch.testing.assert_close(ps[0].grad, torch.tensor([3.0, 4.0]))
    ps = params()
    opt = torch.optim.SGD(ps, lr=1.0)
    gct.clip_before_step(opt, 1.0)
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        opt.step()
    torch.testing.assert_close(ps[0].grad, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_the_same_array_twice_and_other_aliases(name):
    b = make_backend(name)
    x = b.asarray(np.array([3.0, 4.0]))
    buf = b.asarray(np.arange(10.0))
    for tree, where in [
        ({"a": x, "b": x}, r"grads\['a'\] and grads\['b'\]"),
        ([x, [b.asarray(np.ones(2)), x]], r"grads\[0\] and grads\[1\]\[1\]"),
        ([buf[2:6], buf[5:9]], r"grads\[0\] and grads\[1\]"),
        ([buf[::3], buf[::2]], r"grads\[0\] and grads\[1\]"),  # element 0 (and 6) in both
    ]:
        with pytest.raises(ValueError, match=where + " share memory"):
            gc.clip_by_global_norm_(tree, 1.0)
    np.testing.assert_array_equal(b.to_numpy(x), [3.0, 4.0])
    np.testing.assert_array_equal(b.to_numpy(buf), np.arange(10.0))
    # views of one buffer over disjoint elements are fine, interleaved ones too
    cuts = [lambda v: [v[0::2], v[1::2]], lambda v: [v[:5], v[5:]]]
    if name == "numpy":  # (torch has no negative strides)
        cuts.append(lambda v: [v[4::-1], v[5:]])
    for cut in cuts:
        tree = cut(b.asarray(np.arange(10.0)))
        before = [b.to_numpy(t).copy() for t in tree]
        gc.clip_by_global_norm_(tree, 1.0)
        want, _ = ref_clip(before, 1.0, 2)
        for t, w in zip(tree, want):
            np.testing.assert_allclose(b.to_numpy(t), w, rtol=1e-12)


def test_numpy_partial_overlaps_and_other_dtype_views():
    """Byte-level sharing: a float32 view of a float64 buffer, and strides that are
    not a multiple of the item size (elements that overlap in part)."""
    buf = np.arange(8.0)
    with pytest.raises(ValueError, match="share memory"):
        gc.clip_by_global_norm_([buf[:2], buf[1:3].view(np.float32)], 1.0)
    half = np.lib.stride_tricks.as_strided(buf, shape=(3,), strides=(4,))
    with pytest.raises(TypeError, match="overlap in memory"):
        gc.clip_by_global_norm_([half], 1.0)
    z = np.full(4, 1 + 1j)
    gc.clip_by_global_norm_([z.real, z.imag], 1.0)  # interleaved, disjoint
    np.testing.assert_allclose(z, np.full(4, (1 + 1j) / np.sqrt(8)))
    np.testing.assert_array_equal(buf, np.arange(8.0))


def test_autograd_views_are_refused_before_any_write():
    """Views autograd forbids changing in place with grad mode on (a view of a leaf
    that requires grad, one of several views unbind returned): a TypeError naming it,
    nothing written. Under no_grad the same views are clipped."""
    torch = pytest.importorskip("torch")
    w = torch.ones(4, requires_grad=True)
    y = w * 2
    for bad in (lambda: w[:2], lambda: y.unbind(0)[1]):
        a = torch.tensor([3.0, 4.0])
        with pytest.raises(TypeError, match=r"grads\[1\] cannot be clipped in place"):
            gc.clip_by_global_norm_([a, bad()], 1.0)
        torch.testing.assert_close(a, torch.tensor([3.0, 4.0]))
    a, view = torch.tensor([3.0, 4.0]), y.unbind(0)[1]
    with torch.no_grad():
        gc.clip_by_global_norm_([a, view], 1.0)
    want = 1.0 / float(torch.linalg.vector_norm(torch.tensor([3.0, 4.0, 2.0])))
    torch.testing.assert_close(a, torch.tensor([3.0, 4.0]) * want)
    torch.testing.assert_close(view.detach(), torch.tensor(2.0 * want))


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_torch_float8_leaves_in_place(dtype):
    """torch has no multiply for its 8-bit floats: in place they are written from the
    float32 product, so nothing is left half-scaled, and the result is the
    functional one."""
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    x8 = torch.tensor([1.0, -2.0, 0.5]).to(dt)
    want, want_norm = gc.clip_by_global_norm([torch.tensor([3.0, 4.0]), x8], 1.0)
    tree = [torch.tensor([3.0, 4.0]), x8.clone()]
    norm = gc.clip_by_global_norm_(tree, 1.0)
    torch.testing.assert_close(norm, want_norm)
    for got, w in zip(tree, want):
        assert got.dtype == w.dtype
        torch.testing.assert_close(got.float(), w.float())


def test_every_leaf_is_checked_before_the_first_write():
    """The first problem anywhere in the tree stops the call; earlier leaves, which
    would be written first, are unchanged (each kind of problem, at each position)."""
    torch = pytest.importorskip("torch")

    def problems():
        shared = torch.ones(2)
        return [
            (lambda: torch.ones(1).expand(3), TypeError),
            (lambda: torch.ones(3, dtype=torch.int32), TypeError),
            (lambda: torch.ones(3, requires_grad=True), TypeError),
            (lambda: shared, ValueError),
        ]

    @SETTINGS
    @given(st.integers(1, 5), st.data())
    def check(n, data):
        probs = problems()
        make, error = data.draw(st.sampled_from(probs))
        at = data.draw(st.integers(0, n))
        leaves = [torch.tensor([3.0, 4.0]) * (i + 1) for i in range(n)]
        bad = make()
        leaves.insert(at, bad)
        if error is ValueError:  # the shared tensor twice
            leaves.insert(data.draw(st.integers(0, len(leaves))), bad)
        before = [x.clone() for x in leaves]
        with pytest.raises(error):
            gc.clip_by_global_norm_(leaves, 0.5)
        for x, y in zip(leaves, before):
            torch.testing.assert_close(x, y)

    check()
