"""cross_entropy / nll_loss / softmax_backward / log_softmax_backward against torch's semantics.

torch is not a test dependency: the references below re-implement torch's formulas
(aten/src/ATen/native/LossNLL.cpp: nll_loss, cross_entropy_loss_label_smoothing,
cross_entropy_loss_prob_target) in float64 NumPy, independently of the kernels, and gradients
are checked against central finite differences of those references. ``test_torch_refs`` also
compares against values computed by real torch (tests/data/make_torch_refs.py) when present.
"""

import itertools
import json
import pathlib

import numpy as np
import oracles
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelse as sl

inf, nan = np.inf, np.nan
OVERFLOW_BATCH = [[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]]
OVERFLOW_TARGETS = [0, 2, 1]


# --------------------------------------------------------------------------- references


def make_case(rng, shape, axis, probs, ignore):
    x = rng.normal(scale=3.0, size=shape)
    ax = axis % len(shape)
    n_classes = shape[ax]
    bshape = shape[:ax] + shape[ax + 1 :]
    if probs:
        q = rng.random(shape)
        t = q / q.sum(axis=ax, keepdims=True)
    else:
        t = rng.integers(0, n_classes, size=bshape)
        if ignore and t.size > 1:
            t.flat[1] = -100
    w = rng.uniform(0.2, 2.0, size=n_classes)
    return x, t, w


SHAPES = [((5, 4), -1), ((4,), -1), ((3, 4, 2, 2), 1), ((2, 3, 5), -1), ((6, 3), 0), ((2, 3, 4), 1)]


# --------------------------------------------------------------------------- values + grads


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("z", [0.0, 0.01])
def test_matches_torch_reference_and_finite_differences(shape, axis, probs, use_weight, ls, z):
    rng = np.random.default_rng(hash((shape, axis, probs)) % 2**32)
    x, t, w = make_case(rng, shape, axis, probs, ignore=True)
    weight = w if use_weight else None
    for reduction in ("mean", "sum", "none"):
        kw = dict(axis=axis, weight=weight, reduction=reduction, label_smoothing=ls, z_loss=z)
        want = oracles.cross_entropy(x, t, **kw)
        loss, grad = sl.cross_entropy(x, t, return_grad=True, **kw)
        np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-12)
        assert np.shape(loss) == np.shape(want)
        assert grad.shape == x.shape and grad.dtype == np.float64
        fd = oracles.numeric_grad(lambda xx, kw=kw: oracles.cross_entropy(xx, t, **kw), x)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)
        # float32: same semantics, rounded once from a float64 computation.
        l32, g32 = sl.cross_entropy(x.astype(np.float32), t, return_grad=True, **kw)
        assert g32.dtype == np.float32 and np.asarray(l32).dtype == np.float32
        want32 = oracles.cross_entropy(x.astype(np.float32), t, **kw)
        np.testing.assert_allclose(l32, want32, rtol=2e-7, atol=1e-7)
        np.testing.assert_allclose(g32, fd, rtol=1e-4, atol=1e-5)


def test_label_smoothing_matches_torch_formula_with_weights_and_ignore():
    # Hand-derived from cross_entropy_loss_label_smoothing: both terms divided by sum(w[t]).
    x = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]])
    t = np.array([1, -100, 0])
    w = np.array([0.5, 2.0, 1.0])
    lp = x - oracles.logsumexp(x, axis=-1)[:, None]
    nll = -(w[1] * lp[0, 1] + w[0] * lp[2, 0]) / (w[1] + w[0])
    smooth = -((lp[0] * w).sum() + (lp[2] * w).sum()) / (w[1] + w[0])
    want = 0.9 * nll + 0.1 / 3 * smooth
    got = sl.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    assert got == pytest.approx(want, rel=1e-14)


def test_z_loss_is_a_count_mean_not_weighted():
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]])
    t = np.array([0, 1, -100])
    w = np.array([3.0, 0.5])
    base = sl.cross_entropy(x, t, weight=w)
    with_z = sl.cross_entropy(x, t, weight=w, z_loss=0.1)
    lse = oracles.logsumexp(x, axis=-1)
    assert with_z - base == pytest.approx(0.1 * (lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-12)
    per = sl.cross_entropy(x, t, weight=w, z_loss=0.1, reduction="none")
    assert per[2] == 0.0


def test_overflow_example_naive_is_inf_and_nan_stablelse_is_finite():
    x = np.array(OVERFLOW_BATCH, dtype=np.float32)
    t = np.array(OVERFLOW_TARGETS)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(x)
        p = e / e.sum(axis=1, keepdims=True)
        naive_loss = -np.log(p[np.arange(3), t]).mean()
        # Backprop by hand through -mean(log p_t) and the softmax Jacobian.
        dp = np.zeros_like(p)
        dp[np.arange(3), t] = -1.0 / (3 * p[np.arange(3), t])
        naive_grad = p * (dp - (p * dp).sum(axis=1, keepdims=True))
    assert naive_loss == inf
    assert np.isnan(naive_grad[1]).all()
    loss, grad = sl.cross_entropy(x, t, return_grad=True)
    x64 = x.astype(np.float64)
    want = np.mean(oracles.logsumexp(x64, axis=-1) - x64[np.arange(3), t])
    assert np.isfinite(loss) and loss == pytest.approx(want, rel=1e-7)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad[1], [1 / 3, 0, -1 / 3], rtol=1e-7)
    assert sl.cross_entropy(x, t, reduction="none")[1] == 2000.0


def test_target_gradient_keeps_relative_accuracy():
    # p_0 - 1 = -e^-40 / (1 + e^-40); the naive softmax - one_hot gives exactly 0.
    loss, grad = sl.cross_entropy(np.array([0.0, -40.0]), 0, return_grad=True)
    want = -np.exp(-40.0) / (1 + np.exp(-40.0))
    assert grad[0] == pytest.approx(want, rel=1e-15)
    assert loss == pytest.approx(np.log1p(np.exp(-40.0)), rel=1e-15)


@pytest.mark.parametrize("n", [2, 10, 100, 1000, 5000])
def test_float32_loss_of_a_dominant_class_keeps_relative_accuracy(n):
    # Every other class 40 below the target: the loss is (n - 1) e^-40 (4.2e-18 a class), which
    # a float32-grade sum holding the target's exact 1 would round to 0 (short rows, the fused
    # loss with its gradient, long rows and rows of several blocks alike).
    x = np.full((3, n), -40.0, np.float32)
    t = np.array([0, n // 2, n - 1])
    x[np.arange(3), t] = 0.0
    want = np.log1p((n - 1) * np.exp(-40.0))
    a = sl.cross_entropy(x, t, reduction="none")
    b, grad = sl.cross_entropy(x, t, reduction="none", return_grad=True)
    np.testing.assert_allclose(a, want, rtol=1e-6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(grad[np.arange(3), t], -want, rtol=1e-6)
    np.testing.assert_allclose(sl.logsumexp(x, axis=1), want, rtol=1e-6)
    np.testing.assert_allclose(sl.log_softmax(x, axis=1)[np.arange(3), t], -want, rtol=1e-6)


# --------------------------------------------------------------------------- shapes, dtypes


def test_unbatched_and_k_dimensional_shapes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=5)
    assert sl.cross_entropy(x, 3) == pytest.approx(oracles.cross_entropy(x, np.array(3)))
    none = sl.cross_entropy(x, 3, reduction="none")
    assert np.ndim(none) == 0
    q = rng.random(5)
    q /= q.sum()
    assert sl.cross_entropy(x, q) == pytest.approx(oracles.cross_entropy(x, q))
    x4 = rng.normal(size=(2, 3, 4, 5))
    t4 = rng.integers(0, 3, size=(2, 4, 5))
    per = sl.cross_entropy(x4, t4, axis=1, reduction="none")
    assert per.shape == (2, 4, 5)
    np.testing.assert_allclose(per, oracles.cross_entropy(x4, t4, axis=1, reduction="none"))


@pytest.mark.parametrize("tdtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64])
def test_any_integer_target_dtype(tdtype):
    x = np.arange(12.0).reshape(4, 3) / 7
    t = np.array([0, 2, 1, 1], dtype=tdtype)
    assert sl.cross_entropy(x, t) == pytest.approx(oracles.cross_entropy(x, t.astype(np.int64)))


def test_dtypes_float16_int_and_layouts():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 7))
    t = rng.integers(0, 7, size=6)
    l16, g16 = sl.cross_entropy(x.astype(np.float16), t, return_grad=True)
    assert np.asarray(l16).dtype == np.float16 and g16.dtype == np.float16
    assert np.asarray(sl.cross_entropy(np.arange(6).reshape(2, 3), [0, 1])).dtype == np.float64
    want = sl.cross_entropy(x, t, reduction="none")
    # Fortran order, a row-pitched view, and the class axis first.
    np.testing.assert_array_equal(sl.cross_entropy(np.asfortranarray(x), t, reduction="none"), want)
    wide = np.zeros((6, 10))
    wide[:, :7] = x
    np.testing.assert_array_equal(sl.cross_entropy(wide[:, :7], t, reduction="none"), want)
    np.testing.assert_array_equal(sl.cross_entropy(x.T, t, axis=0, reduction="none"), want)
    _, g = sl.cross_entropy(x.T, t, axis=0, return_grad=True)
    np.testing.assert_array_equal(g, sl.cross_entropy(x, t, return_grad=True)[1].T)


def test_all_ignored_and_empty():
    x = np.ones((3, 4))
    t = np.full(3, -100)
    assert np.isnan(sl.cross_entropy(x, t))
    assert sl.cross_entropy(x, t, reduction="sum") == 0.0
    loss, g = sl.cross_entropy(x, t, return_grad=True, reduction="sum")
    assert (g == 0).all()
    np.testing.assert_array_equal(sl.cross_entropy(x, t, reduction="none"), 0.0)
    assert np.isnan(sl.cross_entropy(np.ones((0, 4)), np.zeros(0, dtype=int)))
    assert np.isnan(sl.cross_entropy(np.ones((0, 4)), np.ones((0, 4))))
    # ignore_index may be a valid class.
    assert sl.cross_entropy(x, [0, 1, 2], ignore_index=1) == pytest.approx(np.log(4))


def test_non_finite_logits_give_ieee_results():
    x = np.array([[inf, 1.0, 0.0], [0.0, nan, 1.0], [0.0, -inf, 1.0], [inf, 0.0, 0.0]])
    loss, g = sl.cross_entropy(x, [1, 0, 0, 0], reduction="none", return_grad=True)
    assert loss[0] == inf and np.isnan(loss[1]) and np.isnan(loss[3])
    assert loss[2] == pytest.approx(np.log1p(np.e) - 0.0 + 0.0)
    assert np.isnan(g[0]).all() and np.isnan(g[1]).all()
    assert np.isfinite(g[2]).all() and g[2, 1] == 0.0


def test_determinism_across_thread_counts():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=10, size=(300, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, size=300)
    before = sl.get_num_threads()
    try:
        res = []
        for n in (1, 2, 3):
            sl.set_num_threads(n)
            res.append(sl.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-4, return_grad=True))
    finally:
        sl.set_num_threads(before)
    for loss, g in res[1:]:
        assert loss.tobytes() == res[0][0].tobytes()
        assert g.tobytes() == res[0][1].tobytes()


@pytest.mark.parametrize("n", [2048, 32768])
def test_a_gradient_far_larger_than_the_caches_has_the_bits_of_smaller_calls(n):
    # 64 MiB of float32 logits: the gradient rows are streamed, and rows of 32768 take a
    # second exp rather than kept ones; the same rows in calls of a quarter of the size are
    # written through the cache from kept exps. Loss "none" and gradient bits must agree.
    rng = np.random.default_rng(11)
    rows = (64 << 20) // (4 * n)
    x = rng.normal(scale=4, size=(rows, n)).astype(np.float32)
    t = rng.integers(0, n, size=rows)
    t[1] = -100  # an ignored row: its gradient is filled with zeros
    x[2, 5] = np.inf  # a row of NaN
    loss, g = sl.cross_entropy(x, t, reduction="none", return_grad=True)
    part = rows // 4
    for k in range(4):
        r = slice(k * part, (k + 1) * part)
        lk, gk = sl.cross_entropy(x[r], t[r], reduction="none", return_grad=True)
        assert lk.tobytes() == loss[r].tobytes()
        assert gk.tobytes() == g[r].tobytes()


def test_float32_loss_is_rounded_once():
    rng = np.random.default_rng(4)
    x = rng.normal(scale=5, size=(64, 513)).astype(np.float32)
    t = rng.integers(0, 513, size=64)
    want = np.float32(oracles.cross_entropy(x.astype(np.float64), t, reduction="sum"))
    got = sl.cross_entropy(x, t, reduction="sum")
    assert abs(float(got) - float(want)) <= np.spacing(want)


# --------------------------------------------------------------------------- errors


def test_out_of_range_target_names_the_first_position():
    x = np.zeros((5, 5))
    with pytest.raises(IndexError, match=r"^target\[3\] = 7 is outside \[0, 5\)$"):
        sl.cross_entropy(x, [0, 1, 2, 7, 9])
    with pytest.raises(IndexError, match=r"target\[0\] = -1 is outside"):
        sl.cross_entropy(x, [-1, 1, 2, 7, 9], return_grad=True)
    with pytest.raises(IndexError, match=r"target\[1, 0\] = 3 is outside \[0, 2\)"):
        sl.cross_entropy(np.zeros((2, 2, 3)), [[0, 1, 0], [3, 0, 0]], axis=1)
    with pytest.raises(IndexError, match=r"^target = 5 is outside \[0, 5\)$"):
        sl.cross_entropy(np.zeros(5), 5)
    with pytest.raises(IndexError, match=r"target\[1\] = 18446744073709551615"):
        sl.cross_entropy(np.zeros((2, 3)), np.array([0, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(IndexError, match=r"target\[2\] = 4"):
        sl.nll_loss(np.zeros((3, 4)), [0, -100, 4])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(target=[0, 1]), ValueError, "target has shape"),
        (dict(target=np.zeros((3, 5))), ValueError, "target has shape"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(weight=np.ones(3)), ValueError, "weight"),
        (dict(weight=np.ones((4, 1))), ValueError, "weight"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=nan), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(target=[0.0, 1.0, 2.0]), TypeError, "integer dtype"),
        (dict(target=np.zeros((3, 4), dtype=int)), TypeError, "floating dtype"),
        (dict(target=["a", "b", "c"]), TypeError, "target"),
        (dict(target=np.full((3, 4), 0.25), ignore_index=0), ValueError, "ignore_index"),
        (dict(axis=2), np.exceptions.AxisError, "axis 2"),
        (dict(logits=np.zeros((3, 4), dtype=complex)), TypeError, "complex"),
        (dict(logits=np.float64(1.0), target=0), ValueError, "at least one dimension"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(logits=np.zeros((3, 4)), target=[0, 1, 2])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sl.cross_entropy(args.pop("logits"), args.pop("target"), **args)


# --------------------------------------------------------------------------- nll_loss


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_matches_reference(shape, axis, reduction):
    rng = np.random.default_rng(5)
    x, t, w = make_case(rng, shape, axis, probs=False, ignore=True)
    lp = sl.log_softmax(x, axis=axis)
    for weight in (None, w):
        got = sl.nll_loss(lp, t, axis=axis, weight=weight, reduction=reduction)
        want = oracles.nll_loss(lp, t, axis=axis, weight=weight, reduction=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        ce = sl.cross_entropy(x, t, axis=axis, weight=weight, reduction=reduction)
        np.testing.assert_allclose(got, ce, rtol=1e-12)
    with pytest.raises(TypeError):
        sl.nll_loss(lp, np.moveaxis(lp, axis, -1)[..., 0] * 0.0, axis=axis)


# --------------------------------------------------------------------------- backward VJPs


@pytest.mark.parametrize("shape,axis", [((5,), -1), ((3, 6), -1), ((6, 3), 0), ((2, 4, 3), 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_and_log_softmax_backward(shape, axis, dtype):
    rng = np.random.default_rng(6)
    x = rng.normal(size=shape)
    dy = rng.normal(size=shape)
    tol = dict(rtol=1e-7, atol=1e-8) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    # d/dx sum(dy * softmax(x)) by finite differences (float64 scipy-free reference).
    def sm(xx):
        e = np.exp(xx - xx.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    fd = oracles.numeric_grad(lambda xx: dy * sm(xx), x)
    y = sl.softmax(x.astype(dtype), axis=axis)
    got = sl.softmax_backward(y, dy.astype(dtype), axis=axis)
    assert got.dtype == dtype and got.shape == shape
    np.testing.assert_allclose(got, fd, **tol)
    fd_log = oracles.numeric_grad(lambda xx: dy * np.log(sm(xx)), x)
    ylog = sl.log_softmax(x.astype(dtype), axis=axis)
    got = sl.log_softmax_backward(ylog, dy.astype(dtype), axis=axis)
    np.testing.assert_allclose(got, fd_log, **tol)


def test_backward_errors_and_cross_entropy_identity():
    with pytest.raises(ValueError, match="shape"):
        sl.softmax_backward(np.ones(3), np.ones(4))
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    t = np.array([2, 0])
    dy = np.zeros_like(x)
    dy[np.arange(2), t] = -1.0
    g = sl.log_softmax_backward(sl.log_softmax(x, axis=-1), dy)
    np.testing.assert_allclose(g, sl.cross_entropy(x, t, reduction="sum", return_grad=True)[1])


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(-50, 50),
    ),
    shift=st.floats(-1e3, 1e3),
    data=st.data(),
)
def test_properties_shift_invariance_grad_rows_sum_to_zero(x, shift, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    ax = axis % x.ndim
    bshape = x.shape[:ax] + x.shape[ax + 1 :]
    t = data.draw(hnp.arrays(np.int64, bshape, elements=st.integers(0, x.shape[ax] - 1)))
    loss, g = sl.cross_entropy(x, t, axis=axis, reduction="sum", return_grad=True)
    assert loss >= 0
    np.testing.assert_allclose(loss, oracles.cross_entropy(x, t, axis=axis, reduction="sum"),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.sum(axis=axis), 0.0, atol=1e-12)
    shifted = sl.cross_entropy(x + shift, t, axis=axis, reduction="none")
    np.testing.assert_allclose(shifted, sl.cross_entropy(x, t, axis=axis, reduction="none"),
                               rtol=1e-9, atol=1e-9 * max(1.0, abs(shift)))


# --------------------------------------------------------------------------- torch + demo

TORCH_REFS = pathlib.Path(__file__).parent / "data" / "torch_refs.json"


def _torch_ref_cases():
    if not TORCH_REFS.exists():
        return []
    return json.loads(TORCH_REFS.read_text())["cases"]


@pytest.mark.skipif(
    not TORCH_REFS.exists(),
    reason="tests/data/torch_refs.json not generated (run tests/data/make_torch_refs.py "
    "where torch is installed)",
)
@pytest.mark.parametrize("case", _torch_ref_cases(), ids=lambda c: c["name"])
def test_torch_refs(case):
    dtype = np.dtype(case["dtype"])
    x = np.array(case["logits"], dtype=dtype).reshape(case["shape"])
    t = np.array(case["target"], dtype=np.float64 if case["probs"] else np.int64)
    t = t.reshape(case["target_shape"]).astype(dtype) if case["probs"] else t.reshape(
        case["target_shape"])
    kw = dict(case["kwargs"])
    if kw.get("weight") is not None:
        kw["weight"] = np.array(kw["weight"], dtype=dtype)
    fn = sl.cross_entropy if case["fn"] == "cross_entropy" else sl.nll_loss
    if case["fn"] == "cross_entropy":
        loss, grad = fn(x, t, return_grad=True, **kw)
    else:
        loss, grad = fn(x, t, **kw), None
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    want = np.array(case["loss"], dtype=np.float64)
    np.testing.assert_allclose(np.asarray(loss, dtype=np.float64), want.reshape(np.shape(loss)),
                               rtol=rtol, atol=rtol)
    if grad is not None and case.get("grad") is not None:
        np.testing.assert_allclose(grad, np.array(case["grad"]).reshape(x.shape),
                                   rtol=max(rtol, 1e-10) * 10, atol=rtol)


def test_demo_losses_shows_inf_nan_then_finite():
    from stablelse._demo_losses import demo_losses

    lines = []
    ok = demo_losses(lambda *a, **k: lines.append(" ".join(map(str, a))))
    text = "\n".join(lines)
    assert ok is True
    assert "inf" in text and "nan" in text
    assert "667.27" in text


@pytest.mark.parametrize("combo", list(itertools.product([False, True], repeat=2)))
def test_return_grad_does_not_change_the_loss(combo):
    probs, weighted = combo
    rng = np.random.default_rng(7)
    x, t, w = make_case(rng, (7, 9), -1, probs, ignore=True)
    kw = dict(weight=w if weighted else None, label_smoothing=0.05, z_loss=0.001)
    for reduction in ("mean", "sum", "none"):
        a = sl.cross_entropy(x, t, reduction=reduction, **kw)
        b, _ = sl.cross_entropy(x, t, reduction=reduction, return_grad=True, **kw)
        np.testing.assert_array_equal(a, b)


def test_grad_out_receives_the_gradient():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    t = rng.integers(0, 6, size=5)
    loss, want = sl.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
    buf = np.full_like(x, 7.0)
    loss2, g = sl.cross_entropy(x, t, return_grad=True, grad_out=buf, label_smoothing=0.1)
    assert g is buf and loss2 == loss
    np.testing.assert_array_equal(buf, want)
    fbuf = np.asfortranarray(np.zeros_like(x))  # not C-contiguous: written through a copy
    assert sl.cross_entropy(x, t, return_grad=True, grad_out=fbuf, label_smoothing=0.1)[1] is fbuf
    np.testing.assert_array_equal(fbuf, want)
    x4 = rng.normal(size=(2, 3, 4))
    t4 = rng.integers(0, 3, size=(2, 4))
    g4 = np.empty_like(x4)
    sl.cross_entropy(x4, t4, axis=1, return_grad=True, grad_out=g4)
    np.testing.assert_array_equal(g4, sl.cross_entropy(x4, t4, axis=1, return_grad=True)[1])
    with pytest.raises(ValueError, match="shape"):
        sl.cross_entropy(x, t, return_grad=True, grad_out=np.empty((6, 5), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        sl.cross_entropy(x, t, return_grad=True, grad_out=np.empty((5, 6)))
    with pytest.raises(ValueError, match="overlaps logits"):
        sl.cross_entropy(x, t, return_grad=True, grad_out=x)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        sl.cross_entropy(x, t, return_grad=True, grad_out=ro)
    bad = np.full_like(x, 7.0)
    with pytest.raises(IndexError):
        sl.cross_entropy(x, [0, 1, 2, 3, 99], return_grad=True, grad_out=bad)
    assert (bad == 7.0).all()  # validated before anything was written


# --------------------------------------------------------------------------- one specification
# The NumPy, CUDA and Dask front doors parse the options with one function, so each mistake
# raises the same exception from each of them. The CUDA door validates before it looks at the
# arrays, so these run without a GPU; the Dask door validates at call time.

def _front_doors():
    doors = [("numpy", sl.cross_entropy, np.asarray)]
    import stablelse.cuda as scuda

    doors.append(("cuda", scuda.cross_entropy, np.asarray))
    try:
        import dask.array as da

        import stablelse.dask as sd
    except ImportError:  # pragma: no cover - dask is a test dependency
        return doors
    doors.append(("dask", sd.cross_entropy, lambda a: da.from_array(np.asarray(a), chunks=1)))
    return doors


BAD_OPTIONS = [
    # (keyword arguments, exception, message)
    ({"grad_out": np.empty((2, 3))}, ValueError, "grad_out is given but return_grad is False"),
    ({"ignore_index": 2**63}, ValueError, "ignore_index 9223372036854775808 does not fit"),
    ({"ignore_index": -(2**63) - 1}, ValueError, "does not fit in int64"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an int, got bool"),
    ({"ignore_index": 1.0}, TypeError, "ignore_index must be an int, got float"),
    ({"label_smoothing": "0.1"}, TypeError, "label_smoothing must be a float, got str"),
    ({"label_smoothing": True}, TypeError, "label_smoothing must be a float, got bool"),
    ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    ({"z_loss": True}, TypeError, "z_loss must be a float, got bool"),
    ({"z_loss": "1e-4"}, TypeError, "z_loss must be a float, got str"),
    ({"z_loss": float("nan")}, ValueError, "z_loss must be finite"),
    ({"reduction": "avg"}, ValueError, "reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    ({"reduction": b"mean"}, TypeError, "reduction must be a str, got bytes"),
    ({"return_grad": "yes"}, TypeError, "return_grad must be a bool, got str"),
    ({"axis": True}, TypeError, "axis must be an int, got bool"),
    ({"axis": 2}, np.exceptions.AxisError, "axis 2 is out of bounds"),
    ({"where": np.array([1, 0, 1])}, TypeError, "where must be a bool array, got dtype int64"),
    ({"where": [[True, False, True]] * 3}, ValueError, r"where of shape \(3, 3\) does not"),
    ({"where": np.ones((1, 2, 3), bool)}, ValueError, "does not broadcast to the logits' shape"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_OPTIONS, ids=lambda v: repr(v)[:40])
@pytest.mark.parametrize("door", _front_doors(), ids=lambda d: d[0])
def test_every_front_door_refuses_the_same_options_alike(door, kwargs, exc, msg):
    name, fn, wrap = door
    if name == "cuda" and "axis" in kwargs:
        pytest.skip(reason="the CUDA door reads the rank from a device array's library")
    with pytest.raises(exc, match=msg):
        fn(wrap(np.zeros((2, 3))), wrap(np.array([0, 1])), **kwargs)


def test_integral_and_numpy_scalars_are_accepted_as_floats():
    x, t = np.array([[1.0, 2.0, 0.5]]), np.array([1])
    want = sl.cross_entropy(x, t, label_smoothing=0.0, z_loss=1.0)
    for ls, zl in [(0, 1), (np.float32(0.0), np.int64(1)), (np.float64(0.0), 1.0)]:
        assert sl.cross_entropy(x, t, label_smoothing=ls, z_loss=zl) == want
    assert sl.cross_entropy(x, t, ignore_index=np.int64(-100), return_grad=np.True_)[0] == (
        sl.cross_entropy(x, t)
    )


def test_grad_out_needs_return_grad():
    x, t = np.zeros((2, 3)), np.array([0, 1])
    buf = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="grad_out is given but return_grad is False"):
        sl.cross_entropy(x, t, grad_out=buf)
    assert (buf == 7.0).all()
    assert sl.cross_entropy(x, t, return_grad=True, grad_out=buf)[1] is buf


@pytest.mark.parametrize("fn", [sl.cross_entropy, sl.nll_loss])
def test_out_of_range_target_is_named_in_the_targets_shape(fn):
    x = np.zeros((2, 3, 4))
    t = np.zeros((2, 4), dtype=np.int64)
    t[1, 2] = 3  # classes on axis 1: 3 is out of range
    with pytest.raises(IndexError, match=r"^target\[1, 2\] = 3 is outside \[0, 3\)$"):
        fn(x, t, axis=1)
    with pytest.raises(IndexError, match=r"^target = -1 is outside \[0, 3\)$"):
        fn(np.zeros(3), np.array(-1))  # an unbatched call: a scalar target


def test_uint64_target_is_printed_as_uint64():
    t = np.array([[0, 1], [2**64 - 1, 0]], dtype=np.uint64)
    for fn in (sl.cross_entropy, sl.nll_loss):
        with pytest.raises(IndexError, match=r"^target\[1, 0\] = 18446744073709551615 is outside"):
            fn(np.zeros((2, 2, 3)), t)
    small_first = np.array([5, 2**63], dtype=np.uint64)  # the first bad one in C order
    with pytest.raises(IndexError, match=r"^target\[0\] = 5 is outside \[0, 3\)$"):
        sl.cross_entropy(np.zeros((2, 3)), small_first)


def test_target_error_is_an_index_error_that_pickles():
    import pickle

    from stablelse._spec import TargetError

    e = TargetError((1, 0), 3, 2)
    assert isinstance(e, IndexError) and str(e) == "target[1, 0] = 3 is outside [0, 2)"
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and back.position == (1, 0)
    assert str(e.shifted((4, 5))) == "target[5, 5] = 3 is outside [0, 2)"


@pytest.mark.parametrize(
    "call",
    [
        lambda x, **k: sl.cross_entropy(x, np.array([0, 1]), **k),
        lambda x, **k: sl.nll_loss(x, np.array([0, 1]), **k),
        lambda x, **k: sl.softmax_backward(x, x, **k),
        lambda x, **k: sl.log_softmax_backward(x, x, **k),
        lambda x, **k: sl.logsumexp(x, **k),
        lambda x, **k: sl.softmax(x, **k),
        lambda x, **k: sl.LogSumExp(**k),
    ],
)
def test_axis_true_is_refused_by_every_function(call):
    with pytest.raises(TypeError, match="got bool"):
        call(np.zeros((2, 3)), axis=True)
