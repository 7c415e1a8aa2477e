"""The one-call path of cross_entropy (aligned C-contiguous float logits, int64 targets) must
give exactly what the general path gives: values, result types and shapes, and exceptions."""

import numpy as np
import pytest

import stablelse as sl
from stablelse._axes import normalize_axis


def _both(fn, x, *args, **kw):
    fast = fn(x, *args, **kw)
    slow = fn(np.asfortranarray(x), *args, **kw)
    return fast, slow


def _same(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
        return
    assert type(a) is type(b)
    assert np.asarray(a).dtype == np.asarray(b).dtype
    assert np.shape(a) == np.shape(b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("return_grad", [False, True])
def test_matches_general_path_2d(dtype, reduction, return_grad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 10)).astype(dtype)
    t = rng.integers(0, 10, size=8)
    t[3] = -100
    fast, slow = _both(sl.cross_entropy, x, t, reduction=reduction, return_grad=return_grad,
                       label_smoothing=0.1, z_loss=0.01)
    _same(fast, slow)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_general_path_class_axis_in_the_middle(reduction):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    t = rng.integers(0, 5, size=(2, 3, 4))
    fast, slow = _both(sl.cross_entropy, x, t, axis=1, reduction=reduction, return_grad=True)
    _same(fast, slow)
    assert fast[1].shape == x.shape


def test_unbatched_and_empty():
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    t = np.array(2)
    _same(sl.cross_entropy(x, t), sl.cross_entropy(x[::-1].copy()[::-1], t.astype(np.int32)))
    e = np.zeros((0, 4))
    _same(sl.cross_entropy(e, np.zeros(0, np.int64), reduction="none"),
          sl.cross_entropy(np.asfortranarray(e), np.zeros(0, np.int32), reduction="none"))


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "target, kw",
    [
        (np.array([0, 1, 2, 9, 1, 0, 2, 1]), {}),  # out of range at [3]
        (np.zeros(7, np.int64), {}),  # wrong shape
        (np.zeros((8, 1), np.int64), {}),  # wrong rank
        (np.zeros(8, np.int64), {"axis": 2}),  # axis out of bounds
        (np.zeros(8, np.int64), {"axis": True}),  # bool axis
        (np.zeros(8, np.int64), {"reduction": "avg"}),
        (np.zeros(8, np.int64), {"label_smoothing": 2.0}),
    ],
)
def test_same_errors_as_general_path(target, kw):
    x = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
    fast = _error(lambda: sl.cross_entropy(x, target, **kw))
    slow = _error(lambda: sl.cross_entropy(np.asfortranarray(x), target.astype(np.int32), **kw))
    assert fast == slow


def test_target_error_position():
    x = np.zeros((2, 3, 4), np.float64)
    t = np.zeros((2, 4), np.int64)
    t[1, 2] = 3
    with pytest.raises(IndexError, match=r"target\[1, 2\] = 3 is outside \[0, 3\)"):
        sl.cross_entropy(x, t, axis=1)


def test_dtype_refused_before_axis():
    x = np.zeros((2, 3), np.complex64)
    with pytest.raises(TypeError, match="complex"):
        sl.cross_entropy(x, np.zeros(2, np.int64), axis=5)


def test_normalize_axis_fast_case_same_rule():
    for ndim in (1, 2, 3):
        for ax in range(-ndim, ndim):
            assert normalize_axis(ax, ndim) == normalize_axis(np.int64(ax), ndim)
    for bad in (3, -4):
        with pytest.raises(np.exceptions.AxisError) as a:
            normalize_axis(bad, 3)
        with pytest.raises(np.exceptions.AxisError) as b:
            normalize_axis(np.int64(bad), 3)
        assert str(a.value) == str(b.value)


@pytest.mark.parametrize("fn", [sl.softmax, sl.log_softmax])
def test_small_softmax_in_place_and_new(fn):
    x = np.random.default_rng(3).normal(size=(8, 10)).astype(np.float32)
    ref = fn(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(fn(x, axis=-1), ref, rtol=1e-6, atol=1e-6)
    y = x.copy()
    assert fn(y, axis=-1, out=y) is y
    np.testing.assert_array_equal(y, fn(x, axis=-1))
