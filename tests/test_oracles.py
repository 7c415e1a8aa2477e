"""The shared float64 references agree with scipy, with their own finite differences and with
each other (index targets vs one-hot probabilities, cross_entropy vs nll_loss of
log_softmax), so a test that trusts them trusts one checked formula."""

import numpy as np
import oracles
import pytest
import scipy.special as sp

inf, nan = np.inf, np.nan


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2)])
def test_reductions_match_scipy(axis):
    rng = np.random.default_rng(0)
    x = rng.normal(scale=20, size=(3, 4, 5))
    np.testing.assert_allclose(oracles.logsumexp(x, axis=axis), sp.logsumexp(x, axis=axis))
    kd = oracles.logsumexp(x, axis=axis, keepdims=True)
    np.testing.assert_allclose(kd, sp.logsumexp(x, axis=axis, keepdims=True))
    b = rng.uniform(0, 2, size=x.shape)
    np.testing.assert_allclose(oracles.logsumexp(x, axis=axis, b=b), sp.logsumexp(x, axis, b))
    if axis is not None:
        np.testing.assert_allclose(oracles.softmax(x, axis), sp.softmax(x, axis))
        np.testing.assert_allclose(oracles.log_softmax(x, axis), sp.log_softmax(x, axis))


def test_special_values_follow_scipy():
    rows = np.array(
        [[1000.0, 1.0, -1000.0], [-inf, -inf, -inf], [inf, 0.0, 1.0], [nan, 0.0, 1.0]]
    )
    with np.errstate(all="ignore"):
        want = sp.logsumexp(rows, axis=1)
    np.testing.assert_array_equal(oracles.logsumexp(rows, axis=1), want)
    assert oracles.logsumexp(np.zeros((2, 0)), axis=1).tolist() == [-inf, -inf]
    assert oracles.logsumexp([1000.0, 1000.0]) == 1000.0 + np.log(2.0)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5))
    dy = rng.normal(size=x.shape)
    y = oracles.softmax(x)
    num = oracles.numeric_grad(lambda v: (oracles.softmax(v) * dy).sum(), x)
    np.testing.assert_allclose(oracles.softmax_backward(y, dy), num, atol=1e-8)
    ly = oracles.log_softmax(x)
    num = oracles.numeric_grad(lambda v: (oracles.log_softmax(v) * dy).sum(), x)
    np.testing.assert_allclose(oracles.log_softmax_backward(ly, dy), num, atol=1e-8)
    num = oracles.numeric_grad(lambda v: oracles.logsumexp(v, axis=-1), x)
    np.testing.assert_allclose(oracles.logsumexp_grad(x, axis=-1), num, atol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probs", [False, True])
def test_loss_gradients_match_finite_differences(reduction, probs):
    rng = np.random.default_rng(2)
    x = rng.normal(scale=3, size=(4, 2, 5))  # classes on axis 1
    w = rng.uniform(0.2, 2, size=2)
    if probs:
        q = rng.random(x.shape)
        t = q / q.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, 2, size=(4, 5))
        t[0, 0] = -100
    kw = dict(axis=1, weight=w, reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    loss, grad = oracles.cross_entropy_grad(x, t, **kw)
    num = oracles.numeric_grad(lambda v: oracles.cross_entropy(v, t, **kw), x)
    np.testing.assert_allclose(grad, num, atol=1e-7)
    assert np.shape(loss) == ((4, 5) if reduction == "none" else ())
    terms = oracles.cross_entropy_grad(x, t, error_scale=True, **kw)
    np.testing.assert_array_equal(terms.grad, grad)
    assert np.all(np.asarray(terms.loss_scale) >= np.abs(terms.loss))
    assert terms.grad_scale.shape == x.shape and np.all(terms.grad_scale >= np.abs(grad))


def test_index_targets_equal_one_hot_probabilities_and_nll_of_log_softmax():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=4, size=(6, 7))
    t = rng.integers(0, 7, size=6)
    onehot = np.eye(7)[t]
    for red in ("mean", "sum", "none"):
        a = oracles.cross_entropy(x, t, reduction=red)
        np.testing.assert_allclose(a, oracles.cross_entropy(x, onehot, reduction=red))
        lp = oracles.log_softmax(x)
        np.testing.assert_allclose(a, oracles.nll_loss(lp, t, reduction=red))
    # torch's weighted mean: divide by the weights of the targets that count
    w = rng.uniform(0.5, 2, size=7)
    t2 = t.copy()
    t2[2] = -100
    per = -oracles.log_softmax(x)[np.arange(6), np.where(t2 < 0, 0, t2)] * w[t2.clip(0)]
    keep = t2 != -100
    want = per[keep].sum() / w[t2[keep]].sum()
    np.testing.assert_allclose(oracles.cross_entropy(x, t2, weight=w), want)
    # the overflow batch: finite where the naive formula is inf
    batch = np.array([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]])
    assert np.isfinite(oracles.cross_entropy(batch, [0, 2, 1]))


def test_nll_gradient_and_all_ignored_mean_is_nan():
    rng = np.random.default_rng(4)
    lp = rng.normal(size=(5, 3))
    t = np.array([0, 2, -100, 1, 1])
    w = np.array([0.5, 1.5, 2.0])
    for red in ("mean", "sum", "none"):
        _, g = oracles.nll_loss_grad(lp, t, weight=w, reduction=red)
        num = oracles.numeric_grad(
            lambda v, red=red: oracles.nll_loss(v, t, weight=w, reduction=red), lp
        )
        np.testing.assert_allclose(g, num, atol=1e-7)
    assert np.isnan(oracles.cross_entropy(lp, np.full(5, -100)))
    # a -inf logit outside the target does not turn the loss into NaN (torch picks logp[t])
    x = np.array([[0.0, -inf, 1.0]])
    assert np.isfinite(oracles.cross_entropy(x, [0]))


def test_ulps():
    one = np.float32(1.0)
    assert oracles.ulps(np.nextafter(one, np.float32(2)), 1.0) == 1.0
    assert oracles.ulps(np.float32([inf, nan]), [inf, nan]) == 0.0
    assert oracles.ulps(np.float32(nan), 1.0) == inf
