"""``where=`` on cross_entropy and nll_loss: the loss of each row with its masked classes deleted.

The reference below builds exactly that: for every row it deletes the masked classes (and their
weights, probabilities, and renumbers the target), calls the float64 oracle on what is left, and
scatters the gradient back with zeros at masked classes. A row that keeps no class contributes
nothing and is not counted.
"""

from __future__ import annotations

import numpy as np
import oracles
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stablelse as sl

REDUCTIONS = ("mean", "sum", "none")


def deleted_reference(
    x,
    t,
    m,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
):
    """``(loss, grad)`` of cross_entropy with where=m, built by deleting masked classes."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    m = np.moveaxis(np.broadcast_to(m, np.moveaxis(x, -1, axis).shape), axis, -1)
    probs = np.asarray(t).dtype.kind == "f"
    tt = np.moveaxis(np.asarray(t, dtype=np.float64), axis, -1) if probs else np.asarray(t)
    n = x.shape[-1]
    w = np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)
    batch = x.shape[:-1]
    ce = np.zeros(batch)
    zt = np.zeros(batch)
    g_ce = np.zeros(x.shape)
    g_z = np.zeros(x.shape)
    den = cnt = 0.0
    for idx in np.ndindex(*batch):
        keep = m[idx]
        if not keep.any():
            continue
        xr = x[idx][keep]
        if probs:
            tr = tt[idx][keep]
        else:
            if tt[idx] == ignore_index:
                continue
            assert keep[tt[idx]], "the test drew a target on a masked class"
            tr = np.int64(np.cumsum(keep)[tt[idx]] - 1)
        loss, grad = oracles.cross_entropy_grad(
            xr, tr, weight=w[keep], reduction="sum", label_smoothing=label_smoothing
        )
        ce[idx] = loss
        g_ce[idx + (keep,)] = grad
        lse = float(oracles.logsumexp(xr))
        zt[idx] = z_loss * lse**2
        g_z[idx + (keep,)] = 2 * z_loss * lse * oracles.softmax(xr)
        den += 1.0 if probs else w[tt[idx]]
        cnt += 1.0
    with np.errstate(all="ignore"):
        if reduction == "none":
            loss, grad = ce + zt, g_ce + g_z
        elif reduction == "sum":
            loss, grad = ce.sum() + zt.sum(), g_ce + g_z
        else:
            loss = ce.sum() / den + (zt.sum() / cnt if z_loss else 0.0)
            # Rows that do not count have a zero gradient, also when none counts (0, not NaN).
            grad = (g_ce / den if den else g_ce) + (g_z / cnt if z_loss and cnt else 0.0)
    return loss, np.moveaxis(grad, -1, axis)


@st.composite
def masked_problems(draw):
    """Logits of 2 or 3 dimensions, a class axis anywhere, a mask (possibly broadcast, with
    fully masked rows), and targets that respect it."""
    ndim = draw(st.sampled_from([1, 2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=draw(st.sampled_from([1.0, 30.0])), size=shape)
    mshape = tuple(s if draw(st.booleans()) else 1 for s in shape)
    mshape = mshape[draw(st.integers(0, ndim)) :]  # drop some leading axes too
    m = rng.random(mshape) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    full = np.broadcast_to(m, shape)
    cls = np.moveaxis(full, axis, -1)
    batch = cls.shape[:-1]
    probs = draw(st.booleans())
    if probs:
        q = rng.random(cls.shape) * cls
        q = q / np.where(q.sum(-1, keepdims=True) > 0, q.sum(-1, keepdims=True), 1.0)
        target = np.moveaxis(q, -1, axis)
        ignore = -100
    else:
        ignore = draw(st.sampled_from([-100, 0]))
        t = np.empty(batch, dtype=np.int64)
        for idx in np.ndindex(*batch):
            kept = np.flatnonzero(cls[idx])
            choice = list(kept) + [ignore] if len(kept) else [rng.integers(cls.shape[-1])]
            t[idx] = rng.choice(choice)
        target = t
    opts = {
        "axis": axis,
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "label_smoothing": draw(st.sampled_from([0.0, 0.25])),
        "z_loss": draw(st.sampled_from([0.0, 0.1])),
        "ignore_index": ignore,
    }
    if draw(st.booleans()):
        opts["weight"] = rng.random(shape[axis]) + 0.5
    return x, target, m, opts


@settings(max_examples=150, deadline=None)
@given(masked_problems())
def test_where_equals_the_loss_of_each_row_with_its_masked_classes_deleted(problem):
    x, t, m, opts = problem
    want_loss, want_grad = deleted_reference(x, t, m, **opts)
    loss, grad = sl.cross_entropy(x, t, where=m, return_grad=True, **opts)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert (grad[~np.broadcast_to(m, x.shape)] == 0).all()
    assert np.array_equal(sl.cross_entropy(x, t, where=m, **opts), loss, equal_nan=True)
    x32 = x.astype(np.float32)
    l32, g32 = sl.cross_entropy(
        x32, t if t.dtype.kind != "f" else t.astype(np.float32), where=m, return_grad=True, **opts
    )
    assert l32.dtype == np.float32 and g32.dtype == np.float32
    np.testing.assert_allclose(g32, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 1), (1, 5), (5,), (6, 5)])
@pytest.mark.parametrize("axis", [-1, 0])
def test_broadcast_masks_are_read_in_place_and_agree_with_the_expanded_mask(shape, axis):
    from stablelse._losses import _mask3

    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5))
    m = rng.random(shape) < 0.6
    m.flat[0] = True
    full = np.ascontiguousarray(np.broadcast_to(m, x.shape))
    cls = np.moveaxis(full, axis, -1)
    t = np.array([np.flatnonzero(r)[0] if r.any() else 0 for r in cls])
    got = sl.cross_entropy(x, t, axis=axis, where=m, reduction="none", return_grad=True)
    want = sl.cross_entropy(x, t, axis=axis, where=full, reduction="none", return_grad=True)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    m3 = _mask3(m, x, axis % 2, "logits")
    if m.size < x.size:
        assert 0 in m3.strides and np.shares_memory(m3, m)  # never expanded


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_a_mask_keeping_every_class_gives_the_unmasked_result(dtype, axis, ls):
    rng = np.random.default_rng(2)
    x = rng.normal(scale=5, size=(40, 7, 3)).astype(dtype)
    t = rng.integers(0, 7 if axis == 1 else 3, size=(40, 3) if axis == 1 else (40, 7))
    w = rng.random(x.shape[axis]).astype(dtype) + 0.5
    for kw in ({}, {"weight": w}, {"z_loss": 1e-2}):
        plain = sl.cross_entropy(x, t, axis=axis, label_smoothing=ls, return_grad=True, **kw)
        masked = sl.cross_entropy(
            x,
            t,
            axis=axis,
            label_smoothing=ls,
            return_grad=True,
            where=np.ones(x.shape, bool),
            **kw,
        )
        assert plain[0] == masked[0] and np.array_equal(plain[1], masked[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_a_mask_keeping_every_class_gives_the_unmasked_bits_on_long_rows(dtype, ls):
    rng = np.random.default_rng(3)
    x = rng.normal(scale=5, size=(50, 300)).astype(dtype)
    t = rng.integers(0, 300, size=50)
    plain = sl.cross_entropy(x, t, label_smoothing=ls, z_loss=1e-2, return_grad=True)
    masked = sl.cross_entropy(
        x, t, label_smoothing=ls, z_loss=1e-2, return_grad=True, where=np.ones(x.shape, bool)
    )
    assert plain[0] == masked[0] and np.array_equal(plain[1], masked[1])


@pytest.mark.parametrize("n", [2, 10, 64, 100, 128])
@pytest.mark.parametrize("axis", [-1, 1])
def test_short_rows_under_a_mask_equal_the_deleted_reference_with_special_rows(n, axis):
    # 45 lanes: ragged vector groups, fully masked lanes, masked NaN/inf values, a kept
    # +inf lane, a kept NaN lane and an ignored target, through the fused short-row loss.
    rng = np.random.default_rng(n)
    x = rng.normal(scale=4, size=(45, n))
    m = rng.random((45, n)) < 0.7
    m[:, 0] = True
    m[[3, 20], :] = False
    x[~m & (rng.random((45, n)) < 0.2)] = np.nan
    x[5, ~m[5]] = np.inf
    t = np.array([rng.choice(np.flatnonzero(r)) if r.any() else 0 for r in m])
    t[7] = -100
    x[11, 0], t[11] = np.inf, 0  # L = x_t = inf: a NaN loss (the reference's too)
    x[12, 0] = np.nan
    w = rng.random(n) + 0.5
    if axis == 1:
        # torch's (N, C, d) layout: 15 x 3 lanes as columns.
        xa = x.reshape(15, 3, n).transpose(0, 2, 1)
        ma = m.reshape(15, 3, n).transpose(0, 2, 1)
        ta = t.reshape(15, 3)
    else:
        xa, ma, ta = x, m, t
    for kw in ({}, {"weight": w, "z_loss": 1e-2}):
        per = sl.cross_entropy(xa, ta, axis=axis, where=ma, reduction="none", **kw)
        _, grad = sl.cross_entropy(
            xa, ta, axis=axis, where=ma, reduction="sum", return_grad=True, **kw
        )
        with np.errstate(invalid="ignore"):
            want, wgrad = deleted_reference(xa, ta, ma, axis=axis, reduction="none", **kw)
        # L - x_t cancels when p_t -> 1: an absolute error of L's rounding.
        np.testing.assert_allclose(per, want, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(grad, wgrad, rtol=1e-12, atol=1e-15)
        assert (grad[~ma] == 0).all()  # masked classes: 0 even in the NaN lanes
        g = np.moveaxis(grad, axis, -1).reshape(45, n)
        assert (g[[3, 7, 20]] == 0).all()
        assert np.isnan(g[[11, 12]][m[[11, 12]]]).all()


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize(
    "shape, axis", [((5000, 10), -1), ((3000, 100), -1), ((40, 10, 300), 1), ((6, 100, 700), 1)]
)
def test_a_mask_keeping_every_class_gives_the_unmasked_bits_over_many_pieces(shape, axis, ls):
    # Enough lanes for several pieces and blocks: the masked path must sum in the same order.
    rng = np.random.default_rng(4)
    x = rng.normal(scale=3, size=shape)
    n = shape[axis]
    tshape = shape[:1] + shape[2:] if axis == 1 else shape[:-1]
    t = rng.integers(0, n, size=tshape)
    kw = dict(axis=axis, label_smoothing=ls, z_loss=1e-3, return_grad=True)
    plain = sl.cross_entropy(x, t, **kw)
    masked = sl.cross_entropy(x, t, where=np.ones(shape, bool), **kw)
    assert plain[0] == masked[0] and np.array_equal(plain[1], masked[1])


def test_fully_masked_rows_contribute_nothing_and_are_not_counted():
    x = np.array([[1.0, 2.0, 3.0], [np.nan, np.inf, 7.0], [0.5, 0.0, -1.0]])
    m = np.array([[True, True, False], [False, False, False], [True, True, True]])
    t = np.array([1, 2, 0])  # row 1 is padding: its target is never read
    w = np.array([2.0, 1.0, 3.0])
    none = sl.cross_entropy(x, t, where=m, weight=w, reduction="none")
    assert none[1] == 0.0
    mean, grad = sl.cross_entropy(x, t, where=m, weight=w, z_loss=0.1, return_grad=True)
    want, wgrad = deleted_reference(x, t, m, weight=w, z_loss=0.1)
    np.testing.assert_allclose(mean, want, rtol=1e-13)
    np.testing.assert_allclose(grad, wgrad, rtol=1e-12, atol=1e-15)
    assert (grad[1] == 0).all()  # masked NaN and inf are never read
    allmasked = sl.cross_entropy(x, t, where=np.zeros(3, bool))
    assert np.isnan(allmasked)  # 0 / 0, as torch's mean over all-ignored targets
    assert sl.cross_entropy(x, t, where=np.zeros(3, bool), reduction="sum") == 0.0


@pytest.mark.parametrize("n", [4, 200])  # short rows and long rows take different paths
def test_masked_gradient_is_zero_even_where_a_kept_nan_spoils_the_row(n):
    x = np.zeros((3, n))
    x[0, 1] = np.nan
    x[1, 2] = np.inf
    m = np.ones((3, n), bool)
    m[:, 3] = False
    loss, grad = sl.cross_entropy(
        x, np.zeros(3, np.int64), where=m, reduction="none", return_grad=True
    )
    assert np.isnan(loss[0]) and loss[1] == np.inf and np.isfinite(loss[2])
    assert (grad[:, 3] == 0).all()
    assert np.isnan(grad[0, m[0]]).all() and np.isnan(grad[1, m[1]]).all()


@pytest.mark.parametrize("fn", [sl.cross_entropy, sl.nll_loss])
def test_a_target_on_a_masked_class_is_an_index_error_naming_the_row(fn):
    x = np.zeros((2, 3, 4))
    t = np.zeros((2, 4), dtype=np.int64)
    m = np.ones(x.shape, bool)
    m[1, 0, 2] = False  # classes on axis 1: row [1, 2] masks class 0, its target
    with pytest.raises(IndexError, match=r"^target\[1, 2\] = 0 is a class that where= masks"):
        fn(x, t, axis=1, where=m)
    m[1, :, 2] = False  # the whole row masked: padding, no error
    assert np.isfinite(fn(x, t, axis=1, where=m))
    m[1, 0, 2] = True
    t[1, 2] = -100  # ignored
    fn(x, t, axis=1, where=m)


def test_nothing_is_written_before_a_masked_target_is_refused():
    x = np.zeros((3, 4))
    buf = np.full_like(x, 7.0)
    m = np.ones(4, bool)
    m[2] = False
    with pytest.raises(IndexError, match=r"target\[1\] = 2"):
        sl.cross_entropy(x, np.array([0, 2, 1]), where=m, return_grad=True, grad_out=buf)
    assert (buf == 7.0).all()


def test_probability_mass_on_a_masked_class_is_a_value_error_naming_the_row():
    x = np.zeros((3, 3))
    q = np.array([[0.5, 0.5, 0.0], [0.0, 0.9, 0.1], [0.2, 0.0, 0.8]])
    m = np.array([[True, True, False], [True, True, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"^target\[1\] puts probability 0.1 on class 2"):
        sl.cross_entropy(x, q, where=m)
    m[1, 2] = True  # row 2 keeps no class: its mass does not matter
    want, _ = deleted_reference(x, q, m)
    np.testing.assert_allclose(sl.cross_entropy(x, q, where=m), want, rtol=1e-14)


@pytest.mark.parametrize(
    "where,exc,msg",
    [
        (np.array([1, 0, 1]), TypeError, "where must be a bool array, got dtype int64"),
        ([[1.0, 0.0, 1.0]], TypeError, "where must be a bool array, got dtype float64"),
        (np.ones((3, 2), bool), ValueError, r"where of shape \(3, 2\) does not broadcast"),
        (np.ones((1, 2, 3), bool), ValueError, "does not broadcast to the logits' shape"),
        ("yes", TypeError, "where must be a bool array"),
    ],
)
def test_a_bad_where_is_refused_naming_it(where, exc, msg):
    with pytest.raises(exc, match=msg):
        sl.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), where=where)
    with pytest.raises(exc, match=msg.replace("logits'", "log_probs'")):
        sl.nll_loss(np.zeros((2, 3)), np.array([0, 1]), where=where)


def test_nll_loss_where_skips_rows_without_classes_and_does_not_renormalise():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 4))
    lp = np.log(oracles.softmax(x))
    m = np.ones((5, 4), bool)
    m[2] = False
    m[0, 3] = False
    t = np.array([1, 3, 0, 2, 0])
    w = rng.random(4) + 0.5
    keep = np.array([True, True, False, True, True])
    for red in REDUCTIONS:
        got = sl.nll_loss(lp, t, weight=w, reduction=red, where=m)
        want = oracles.nll_loss(lp, np.where(keep, t, -100), weight=w, reduction=red)
        np.testing.assert_allclose(got, want, rtol=1e-14)


@pytest.mark.parametrize("n", [37, 300])  # the short-row and the long-row gradient paths
def test_results_are_bit_identical_for_any_thread_count(n):
    rng = np.random.default_rng(4)
    x = rng.normal(scale=3, size=(20000, n)).astype(np.float32)
    m = rng.random((20000, n)) < 0.8
    m[::7] = False
    t = np.array([np.flatnonzero(r)[0] if r.any() else 0 for r in m])
    xc = np.ascontiguousarray(x.reshape(200, 100, n).transpose(0, 2, 1))
    mc = np.ascontiguousarray(m.reshape(200, 100, n).transpose(0, 2, 1))
    before = sl.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            sl.set_num_threads(n)
            runs.append(
                (
                    sl.cross_entropy(
                        x, t, where=m, label_smoothing=0.1, z_loss=1e-3, return_grad=True
                    ),
                    sl.cross_entropy(xc, t.reshape(200, 100), axis=1, where=mc, return_grad=True),
                    sl.nll_loss(x, t, where=m),
                )
            )
    finally:
        sl.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            if isinstance(a, tuple):
                assert a[0] == b[0] and np.array_equal(a[1], b[1])
            else:
                assert a == b


def test_dask_where_matches_the_numpy_path():
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 6))
    m = rng.random((9, 6)) < 0.5
    m[:, 1] = True
    m[4] = False
    t = np.ones(9, dtype=np.int64)
    w = rng.random(6) + 0.5
    dx = da.from_array(x, chunks=(4, 4))
    for red in REDUCTIONS:
        for kw in ({}, {"weight": w, "z_loss": 0.1}, {"label_smoothing": 0.3}):
            want = sl.cross_entropy(x, t, where=m, reduction=red, **kw)
            got = sd.cross_entropy(dx, t, where=da.from_array(m, chunks=3), reduction=red, **kw)
            np.testing.assert_allclose(got.compute(), want, rtol=1e-13)
    row = m[:1] | ~m[:1]  # a (1, C) mask broadcast over the rows
    np.testing.assert_allclose(
        sd.cross_entropy(dx, t, where=row).compute(), sl.cross_entropy(x, t, where=row), rtol=1e-13
    )
    bad = t.copy()
    bad[6] = int(np.flatnonzero(~m[6])[0])
    with pytest.raises(IndexError, match=rf"^target\[6\] = {bad[6]} is a class that where="):
        sd.cross_entropy(dx, bad, where=m).compute()


def test_cuda_refuses_where_after_the_common_check():
    import stablelse.cuda as scuda

    x, t = np.zeros((2, 3)), np.array([0, 1])
    with pytest.raises(NotImplementedError, match="where= is not supported"):
        scuda.cross_entropy(x, t, where=np.ones(3, bool))
    with pytest.raises(TypeError, match="where must be a bool array"):
        scuda.cross_entropy(x, t, where=np.ones(3))


_OPTAX_SCRIPT = """
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import optax
d = dict(np.load(sys.argv[1]))
x, t, m, q = d["x"], d["t"], d["m"], d["q"]
f = optax.softmax_cross_entropy_with_integer_labels
g = jax.grad(lambda z: f(z, t, where=m).sum())(x)
np.savez(sys.argv[2], ints=np.asarray(f(x, t, where=m)), grad=np.asarray(g),
         probs=np.asarray(optax.softmax_cross_entropy(x, q, where=m)))
"""


def test_optax_gives_the_same_losses_and_gradients_where_it_agrees(tmp_path):
    # optax runs in a child process: JAX's threads must not live in this one, which the
    # reliability tests fork.
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("optax") is None:
        pytest.skip("optax is not installed")
    rng = np.random.default_rng(6)
    x = rng.normal(scale=4, size=(50, 9))
    m = rng.random((50, 9)) < 0.6
    m[::5] = False
    t = np.array([rng.choice(np.flatnonzero(r)) if r.any() else 0 for r in m])
    q = rng.random((50, 9)) * m
    q = q / np.where(q.sum(1, keepdims=True) > 0, q.sum(1, keepdims=True), 1)
    np.savez(tmp_path / "in.npz", x=x, t=t, m=m, q=q)
    subprocess.run(
        [sys.executable, "-c", _OPTAX_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        check=True,
        timeout=300,
    )
    want = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(
        sl.cross_entropy(x, t, where=m, reduction="none"), want["ints"], rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        sl.cross_entropy(x, t, where=m, reduction="sum", return_grad=True)[1],
        want["grad"],
        rtol=1e-12,
        atol=1e-14,
    )
    np.testing.assert_allclose(
        sl.cross_entropy(x, q, where=m, reduction="none"), want["probs"], rtol=1e-12, atol=1e-14
    )


def _mask_form(m, form):
    """`m` (N, C) as the layout `form` hands the kernels: dense, a (1, C) or (N, 1) broadcast,
    a class stride of 2, or Fortran order (lane stride 1, class stride N)."""
    if form == "row":
        return m[:1]
    if form == "lane":
        return m[:, :1]
    if form == "strided":
        wide = np.zeros((m.shape[0], 2 * m.shape[1]), bool)
        wide[:, ::2] = m
        return wide[:, ::2]
    if form == "fortran":
        return np.asfortranarray(m)
    return m


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["full", "row", "lane", "strided", "fortran"])
@pytest.mark.parametrize("n", [1, 3, 8, 9, 10, 17, 100, 128])
def test_masked_short_rows_read_in_place_equal_the_kernel_on_rows_holding_minus_inf(dtype, form, n):
    # The fused short-row loss reads the rows and the mask where they lie. Its results must be
    # those of the same kernel on a copy whose masked classes hold -inf (what a staged block
    # holds), targets of rows that keep nothing ignored: bit for bit, loss and gradient, over
    # ragged vector groups and blocks, a row pitch, every mask layout, masked targets of fully
    # masked rows, masked NaN/inf, and kept inf/NaN rows (which the row path redoes).
    rng = np.random.default_rng(n)
    rows = 1037
    wide = (rng.normal(scale=4, size=(rows, n + 5))).astype(dtype)
    x = wide[:, :n]  # rows n + 5 apart
    m = rng.random((rows, n)) < 0.7
    m[:, n // 2] = True
    if form == "row":
        m[:] = m[0]
    elif form == "lane":
        m[:] = m[:, :1]
    else:
        m[rng.random(rows) < 0.05] = False
    x[~m & (rng.random((rows, n)) < 0.2)] = np.nan
    x[9, ~m[9]] = np.inf
    kept_rows = np.flatnonzero(m.any(axis=1))
    t = np.array([rng.choice(np.flatnonzero(r)) if r.any() else rng.integers(n) for r in m])
    t[kept_rows[3]] = -100
    x[kept_rows[4], t[kept_rows[4]]] = np.inf  # L = x_t = inf
    x[kept_rows[5], t[kept_rows[5]]] = np.nan
    x[kept_rows[6], t[kept_rows[6]]] = -np.inf  # a kept -inf target: an inf loss
    ref_x = np.where(m, x, dtype(-np.inf))
    ref_t = np.where(m.any(axis=1), t, -100)
    w = (rng.random(n) + 0.5).astype(dtype)
    where = _mask_form(m, form)
    for kw in ({}, {"weight": w, "z_loss": 1e-2}):
        with np.errstate(all="ignore"):
            per = sl.cross_entropy(x, t, where=where, reduction="none", **kw)
            want = sl.cross_entropy(ref_x, ref_t, reduction="none", **kw)
            assert np.array_equal(per.view(np.uint8), want.view(np.uint8))
            # (The weighted mean's denominator is summed by the mask's pre-pass, in its own
            # order: only its last bit may differ, so that case is left to the other tests.)
            for red in ("sum",) if kw else ("mean", "sum"):
                loss, g = sl.cross_entropy(x, t, where=where, reduction=red, return_grad=True, **kw)
                wl, wg = sl.cross_entropy(ref_x, ref_t, reduction=red, return_grad=True, **kw)
                assert loss.tobytes() == wl.tobytes()
                assert np.array_equal(g[m].view(np.uint8), wg[m].view(np.uint8))
                assert (g[~m] == 0).all()


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_forward_only_masked_loss_checks_its_targets_in_the_main_pass_as_the_pre_pass_does(
    reduction, weighted, layout
):
    # Without a gradient or per-row losses, short rows check their targets against the mask
    # in the kernel's pass (nothing is written before a refusal there); so do unweighted
    # columns (the class axis before the last, staged block by block). The loss must have the
    # pre-pass's bits (the "mean" denominator summed in the same pieces) and a refusal must
    # name the same first bad row, whichever kind of error comes first, over many pieces.
    rng = np.random.default_rng(11)
    rows, n = 40000, 10
    x = rng.normal(scale=3, size=(rows, n))
    m = rng.random((rows, n)) < 0.8
    m[::97] = False
    t = np.array([rng.choice(np.flatnonzero(r)) if r.any() else rng.integers(n) for r in m])
    t[5::13] = -100
    w = rng.random(n) + 0.5 if weighted else None

    slabs = 4  # columns: rows r = o * (rows // slabs) + j as lanes (o, j) of (4, n, 10000)

    def lay(a):
        if layout == "rows":
            return a
        return np.moveaxis(a.reshape(slabs, rows // slabs, -1), 2, 1)

    def name(r):
        return f"target[{r}]" if layout == "rows" else f"target[{r // 10000}, {r % 10000}]"

    def both(tt):
        outs = []
        axis = -1 if layout == "rows" else 1
        xl, ml, tl = lay(x), lay(m), tt if layout == "rows" else tt.reshape(slabs, -1)
        for grad in (False, True):  # the deferred check, then the pre-pass
            try:
                res = sl.cross_entropy(
                    xl, tl, axis=axis, where=ml, weight=w, reduction=reduction, return_grad=grad
                )
                outs.append(res[0] if grad else res)
            except IndexError as exc:
                outs.append(str(exc))
        return outs

    fwd, pre = both(t)
    assert np.float64(fwd).tobytes() == np.float64(pre).tobytes()
    # Rows that keep some classes and mask others, far apart (different pieces).
    some = np.flatnonzero(m.any(axis=1) & ~m.all(axis=1))
    a, b = some[1000], some[30000 * len(some) // rows]
    # ... and next to each other (one block).
    c = some[np.flatnonzero(np.diff(some) == 1)[50]]
    for masked_row, out_row in ((a, b), (b, a), (c, c + 1), (c + 1, c)):
        first = min(masked_row, out_row)
        tt = t.copy()
        tt[masked_row] = np.flatnonzero(~m[masked_row])[0]
        tt[out_row] = n + 4
        fwd, pre = both(tt)
        assert isinstance(fwd, str) and fwd == pre
        assert fwd.startswith(name(first))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [2, 5, 10, 64, 100, 128])
def test_short_rows_under_a_dense_mask_equal_a_strided_mask(dtype, n):
    """The fused short-row loss stages each group of rows dense in the logits and the mask (or
    under a (1, C) mask) with its masked classes at -inf; a strided mask is applied to each
    loaded column instead. The
    loss, the lane losses and the gradient must be the same bits (a group staged from the wrong
    rows, a tail group, a masked NaN read), also with rows that keep no class, kept NaN and
    +inf, and ignored targets. (A mask of the logits' shape also takes the front door's one
    native call, the strided one its general path: the two must agree as well.)"""
    rng = np.random.default_rng(200 + n)
    rows = 5003
    x = (rng.standard_normal((rows, n)) * 8).astype(dtype)
    keep = rng.random((rows, n)) < 0.85
    t = rng.integers(0, n, rows)
    keep[np.arange(rows), t] = True
    x[2::89, 0], keep[2::89, 0] = np.inf, True
    x[3::83, n // 2], keep[3::83, n // 2] = np.nan, True
    x[5::79][~keep[5::79]] = np.nan
    keep[1::97] = False
    t[6::71] = -100
    # A (1, C) mask is repeated for a group of rows and staged as a dense one.
    row = np.ones((1, n), bool)
    row[0, -1] = False
    t_row = np.where(t == n - 1, 0, t)
    cases = [(keep, t), (row, t_row)]
    for red in ("mean", "none"):
        for kw in ({}, {"return_grad": True}, {"z_loss": 1e-3, "return_grad": True}):
            for mask, tt in cases:
                strided = np.empty((rows, 2 * n), bool)[:, ::2]
                strided[...] = mask
                a = sl.cross_entropy(x, tt, where=mask, reduction=red, **kw)
                b = sl.cross_entropy(x, tt, where=strided, reduction=red, **kw)
                _same_bits(a, b)


def _same_bits(a, b):
    """The loss (and its per-lane losses or gradient, for a tuple) of two calls, bit for bit."""
    for u, v in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
        u, v = np.asarray(u), np.asarray(v)
        bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[u.dtype.itemsize]
        np.testing.assert_array_equal(u.view(bits), v.view(bits))


def _rows_under_a_mask(rng, rows, n, dtype):
    """Logits `(rows, n)` with a mask keeping about 80% of the classes and every row's target,
    masked NaN and inf, rows that keep nothing, ignored targets, and probability targets with
    no mass on a masked class."""
    x = (rng.standard_normal((rows, n)) * 8).astype(dtype)
    keep = rng.random((rows, n)) < 0.8
    t = rng.integers(0, n, rows)
    keep[np.arange(rows), t] = True
    x[5::7][~keep[5::7]] = np.nan
    x[6::9][~keep[6::9]] = np.inf
    keep[1::17] = False
    t[4::19] = -100
    q = rng.random((rows, n)) * keep
    q = (q / np.where(q.sum(1, keepdims=True) > 0, q.sum(1, keepdims=True), 1)).astype(dtype)
    return x, keep, t, q


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [65, 100, 1000, 3000])
def test_long_rows_under_a_dense_mask_equal_a_strided_mask(dtype, n):
    """Rows longer than the short-row kernels' under a mask whose rows are dense (the logits'
    shape or one (1, C) row) are read in place, the masked classes loaded as -inf; a strided
    mask is staged, the masked classes written as -inf first. Loss, lane losses and gradient
    must be the same bits for class and probability targets, label smoothing, weights and the
    z-loss, also with rows that keep nothing, masked NaN / inf, kept inf / NaN (the rows the
    kernels redo on a staged copy) and ignored targets."""
    rng = np.random.default_rng(300 + n)
    x, keep, t, q = _rows_under_a_mask(rng, 67, n, dtype)
    x[2::13, 1], keep[2::13, 1] = np.inf, True
    x[3::11, n // 2], keep[3::11, n // 2] = np.nan, True
    row = np.ones((1, n), bool)
    row[0, ::3] = False
    t_row = np.where((t < 0) | row[0, t % n], t, 1)
    w = (rng.random(n) + 0.5).astype(dtype)
    cases = [(keep, t), (keep, q), (row, t_row)]
    options = (
        {"reduction": "mean"},
        {"reduction": "none", "return_grad": True},
        {"reduction": "sum", "label_smoothing": 0.1, "weight": w, "return_grad": True},
        {"reduction": "mean", "z_loss": 1e-3, "label_smoothing": 0.2, "return_grad": True},
    )
    for kw in options:
        for mask, tt in cases:
            strided = np.empty((mask.shape[0], 2 * n), bool)[:, ::2]
            strided[...] = mask
            with np.errstate(all="ignore"):
                a = sl.cross_entropy(x, tt, where=mask, **kw)
                b = sl.cross_entropy(x, tt, where=strided, **kw)
            _same_bits(a, b)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "flag_shape"),
    [((3001, 10), -1, (3001, 1)), ((200, 300), -1, (200, 1)), ((5, 7, 300), 1, (5, 1, 300))],
)
def test_a_flag_per_row_equals_the_dense_mask(dtype, shape, axis, flag_shape):
    """A mask that keeps or masks each row whole (an `(N, 1)` flag) runs the unmasked loss
    with the masked rows' targets ignored. Loss, per-row losses and gradient must be the bits
    of the same mask made dense, for every reduction, weights, label smoothing, the z-loss
    and an ignore_index that names a class; and an out-of-range target in a masked row is
    still refused. Flags that are not contiguous (3 bytes apart) too."""
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 6).astype(dtype)
    n = shape[axis]
    lanes = np.moveaxis(x, axis, -1).shape[:-1]
    t = rng.integers(0, n, lanes)
    t.reshape(-1)[::13] = -100
    flag = rng.random(flag_shape) < 0.8
    dense = np.broadcast_to(flag, shape).copy()
    x[~dense] = np.nan  # masked rows hold anything
    w = (rng.random(n) + 0.5).astype(dtype)
    options = (
        {"reduction": "mean"},
        {"reduction": "sum", "return_grad": True},
        {"reduction": "none", "return_grad": True, "z_loss": 1e-3},
        {"reduction": "mean", "weight": w, "label_smoothing": 0.1, "return_grad": True},
        {"reduction": "mean", "ignore_index": 3, "weight": w},
    )
    # The same flags 3 bytes apart (read through a copy, a few hundred lanes at a time).
    spaced = np.zeros(flag_shape[:-1] + (3 * flag_shape[-1],), bool)[..., ::3]
    spaced[...] = flag
    for kw in options:
        tt = np.where(t == -100, kw.get("ignore_index", -100), t)
        b = sl.cross_entropy(x, tt, axis=axis, where=dense, **kw)
        for f in (flag, spaced):
            a = sl.cross_entropy(x, tt, axis=axis, where=f, **kw)
            _same_bits(a, b)
    masked_lane = np.flatnonzero(~np.moveaxis(dense, axis, -1).any(-1).reshape(-1))[0]
    bad = t.copy()
    bad.reshape(-1)[masked_lane] = n + 2
    with pytest.raises(IndexError, match=f"target\\[{masked_lane}\\]|{n + 2}"):
        sl.cross_entropy(x, bad, axis=axis, where=flag)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("n", [3, 10, 64, 65, 1000])
def test_a_mask_stored_transposed_equals_the_dense_mask(dtype, n):
    """A Fortran-ordered mask over C-ordered logits (consecutive rows one byte apart) has its
    rows moved into dense rows by byte tiles, a window of rows at a time (about 64 KiB of mask
    bytes, several of the loss's pieces when rows are long), before the fused short-row loss
    or the per-lane loss reads them. Loss, lane losses and gradient must be the bits of the
    C-ordered mask for class and probability targets, label smoothing, weights, the z-loss,
    rows that keep nothing, masked NaN / inf and ignored targets, across windows (two whole
    windows and a partial one at every row length)."""
    rng = np.random.default_rng(500 + n)
    x, keep, t, q = _rows_under_a_mask(rng, 200_000 // n + 3, n, dtype)
    w = (rng.random(n) + 0.5).astype(dtype)
    fortran = np.asfortranarray(keep)
    options = (
        {"reduction": "mean"},
        {"reduction": "none", "return_grad": True},
        {"reduction": "sum", "label_smoothing": 0.1, "weight": w, "return_grad": True},
        {"reduction": "mean", "z_loss": 1e-3, "return_grad": True},
    )
    for kw in options:
        for tt in (t, q):
            with np.errstate(all="ignore"):
                a = sl.cross_entropy(x, tt, where=fortran, **kw)
                b = sl.cross_entropy(x, tt, where=keep, **kw)
            _same_bits(a, b)
