"""The streaming LogSumExp accumulator against one stablelse.logsumexp call."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelse
from stablelse import LogSumExp, logsumexp

INF, NAN = np.inf, np.nan


def assert_close_lse(got, want, x_absmax, dtype):
    """Agreement up to rounding: a few ULPs of the result, or of the inputs' magnitude.

    The condition number of logsumexp w.r.t. absolute input errors is 1, so rounding of the
    order of eps * max|x| is all that different summation orders may differ by.
    """
    eps = np.finfo(dtype).eps
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=2 * eps, atol=4 * eps * max(1.0, x_absmax))


def split_points(draw, n):
    k = draw(st.integers(0, min(n, 6)))
    return sorted(draw(st.lists(st.integers(0, n), min_size=k, max_size=k)))


def chunks_of(x, axis, cuts):
    ax = 0 if axis is None else axis
    if axis is None:
        x = x.reshape(-1)
    return np.split(x, cuts, axis=ax)


def merge_tree(draw, accs):
    """Merges a list of accumulators in an order (binary tree) drawn by hypothesis."""
    if len(accs) == 1:
        return accs[0]
    k = draw(st.integers(1, len(accs) - 1))
    return merge_tree(draw, accs[:k]).merge(merge_tree(draw, accs[k:]))


finite = {"allow_nan": False, "allow_infinity": False, "min_value": -1e3, "max_value": 1e3}


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=7))
    x = draw(hnp.arrays(dtype, shape, elements=st.floats(width=32, **finite)))
    axis = draw(st.sampled_from([None, *range(-len(shape), len(shape))]))
    n = x.size if axis is None else shape[axis]
    return x, axis, split_points(draw, n)


@settings(max_examples=150, deadline=None)
@given(cases(), st.data())
def test_random_chunkings_and_merge_trees_match_one_call(case, data):
    x, axis, cuts = case
    parts = chunks_of(x, axis, cuts)
    kept = () if axis is None else x.shape[:axis] + x.shape[axis:][1:]
    if math.prod(kept) == 0:
        # (The one-call path rejects some of these empty layouts, e.g. (0, 1, 2) on axis 1.)
        want = np.empty(kept, x.dtype)
    else:
        want = logsumexp(x, axis=axis)
    absmax = float(np.max(np.abs(x))) if x.size else 0.0

    seq = LogSumExp(axis)
    for p in parts:
        assert seq.update(p) is seq
    got = seq.result()
    assert np.shape(got) == np.shape(want)
    assert np.asarray(got).dtype == x.dtype
    assert_close_lse(got, want, absmax, x.dtype)

    accs = [LogSumExp(axis).update(p) for p in parts]
    tree = merge_tree(data.draw, accs)
    assert_close_lse(tree.result(), want, absmax, x.dtype)
    # Merging leaves the operands alone.
    for acc, p in zip(accs, parts):
        np.testing.assert_array_equal(acc.result(), LogSumExp(axis).update(p).result())


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
        elements=st.sampled_from([-INF, INF, NAN, -3.0, 0.0, 2.5, 700.0, -800.0]),
    ),
    st.data(),
)
def test_special_values_in_any_chunk_follow_scipy(x, data):
    axis = data.draw(st.sampled_from([None, 0, x.ndim - 1]))
    n = x.size if axis is None else x.shape[axis]
    parts = chunks_of(x, axis, split_points(data.draw, n))
    accs = [LogSumExp(axis).update(p) for p in parts]
    got = merge_tree(data.draw, accs).result()
    want = logsumexp(x, axis=axis)
    # Exactly the same non-finite values; finite ones up to rounding.
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isfinite(want)], want[~np.isfinite(want)])
    fin = np.isfinite(want)
    assert_close_lse(got[fin], want[fin], 800.0, np.float64)


@pytest.mark.parametrize(
    "chunks, want",
    [
        ([[-INF], [1.0, -INF], []], 1.0),
        ([[-INF, -INF], [-INF]], -INF),
        ([[1.0], [INF], [2.0]], INF),
        ([[INF], [INF]], INF),
        ([[1.0], [NAN], [INF]], NAN),
        ([[-INF], [NAN]], NAN),
        ([[INF], [NAN]], NAN),
        ([[NAN], [-INF]], NAN),
    ],
)
def test_special_chunks(chunks, want):
    acc = LogSumExp()
    for c in chunks:
        acc.update(np.asarray(c, dtype=np.float64))
    np.testing.assert_array_equal(acc.result(), want)
    np.testing.assert_array_equal(acc.result(), logsumexp(np.concatenate(chunks)))


def test_empty_chunks_and_no_chunk():
    assert LogSumExp().result() == -INF
    assert LogSumExp().result(keepdims=True).shape == (1,)
    mx, ex = LogSumExp().state
    assert (mx, ex) == (-INF, -1.0)
    acc = LogSumExp().update(np.array([], dtype=np.float32)).update(np.zeros((0, 3), np.float32))
    assert acc.result() == -INF and acc.result().dtype == np.float32
    acc.update(np.float32([2.0]))
    assert acc.result() == np.float32(2.0)

    # Along an axis: empty chunks only fix the kept shape.
    col = LogSumExp(axis=0).update(np.zeros((0, 3)))
    np.testing.assert_array_equal(col.result(), [-INF] * 3)
    col.update(np.array([[0.0, 1.0, -INF]])).update(np.zeros((0, 3)))
    np.testing.assert_array_equal(col.result(), [0.0, 1.0, -INF])
    with pytest.raises(ValueError, match="seen no chunk"):
        LogSumExp(axis=0).result()
    with pytest.raises(ValueError, match="seen no chunk"):
        _ = LogSumExp(axis=1).state


def test_state_convention():
    acc = LogSumExp().update([0.0, -40.0])
    mx, ex = acc.state
    assert mx == 0.0 and ex == pytest.approx(math.exp(-40.0), rel=1e-15)
    # The excess keeps the tiny term that log(1 + 4e-18) would lose.
    assert acc.result() == pytest.approx(4.248354255291589e-18, rel=1e-14)
    mx, ex = LogSumExp(axis=1).update([[1.0, 1.0], [INF, 0.0]]).state
    assert mx.shape == (2,) and mx[0] == 1.0 and ex[0] == 1.0 and mx[1] == INF
    # state returns copies.
    mx[:] = 0
    assert LogSumExp(axis=1).update([[1.0, 1.0]]).state[0][0] == 1.0


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (1, 2)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_axes_layouts_and_keepdims(axis, order):
    rng = np.random.default_rng(1)
    x = np.asarray(rng.normal(size=(6, 5, 4)) * 10, order=order)
    along = 0 if axis is None else (axis[0] if isinstance(axis, tuple) else axis)
    parts = np.array_split(x, 3, axis=along)
    acc = LogSumExp(axis)
    for p in parts:
        acc.update(p)
    for kd in (False, True):
        want = logsumexp(x, axis=axis, keepdims=kd)
        if axis is None and kd:
            want = want.reshape(1)  # the concatenation along axis=None is flat
        got = acc.result(keepdims=kd)
        assert np.shape(got) == np.shape(want)
        assert_close_lse(got, want, float(np.abs(x).max()), np.float64)


def test_tuple_axes_chunks_may_differ_on_other_reduced_axes():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(2, 7, 5))
    acc = LogSumExp(axis=(0, 1)).update(a).update(b)
    want = logsumexp(np.concatenate([a.reshape(-1, 5), b.reshape(-1, 5)]), axis=0)
    assert_close_lse(acc.result(), want, 5.0, np.float64)


def test_pickle_round_trip_mid_stream():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    acc = LogSumExp(axis=0).update(x[:4])
    clone = pickle.loads(pickle.dumps(acc))
    assert repr(clone) == repr(acc)
    for a, b in zip(clone.state, acc.state):
        np.testing.assert_array_equal(a, b)
    clone.update(x[4:])
    np.testing.assert_array_equal(clone.result(), logsumexp(x, axis=0))
    # The original is untouched and the two can still be merged.
    assert acc.merge(LogSumExp(0).update(x[4:])).result().dtype == np.float32
    empty = pickle.loads(pickle.dumps(LogSumExp(axis=0)))
    np.testing.assert_array_equal(empty.merge(clone).result(), clone.result())


def test_dtypes_follow_the_concatenation():
    assert LogSumExp().update(np.arange(5)).result().dtype == np.float64
    assert LogSumExp().update([True, False]).result().dtype == np.float64
    h = LogSumExp().update(np.float16([1.0, 2.0]))
    assert h.result().dtype == np.float16
    assert h.result() == logsumexp(np.float16([1.0, 2.0]))
    f = LogSumExp().update(np.float32([1.0])).update(np.float64([2.0]))
    assert f.result().dtype == np.float64
    # np.concatenate([float32, int8]) is float32, [float32, int64] float64.
    g = LogSumExp().update(np.float32([1.0])).merge(LogSumExp().update(np.int8([3])))
    assert g.result().dtype == np.float32
    g = g.merge(LogSumExp().update(np.int64([3])))
    assert g.result().dtype == np.float64
    with pytest.raises(TypeError, match="complex"):
        LogSumExp().update(np.array([1j]))


def test_weights():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3)) * 5
    b = rng.uniform(0, 2, size=(8, 3))
    b[2, 1] = 0.0
    x[2, 1] = NAN  # ignored because its weight is 0, as stablelse.logsumexp
    acc = LogSumExp(axis=0)
    for xs, bs in zip(np.array_split(x, 3), np.array_split(b, 3)):
        acc.update(xs, b=bs)
    assert_close_lse(acc.result(), logsumexp(x, axis=0, b=b), 10.0, np.float64)
    # Broadcast weights, float32 data stays float32.
    x32 = x[:, :1].astype(np.float32)
    one = (
        LogSumExp(axis=0).update(x32[:5], b=np.float32(0.5)).update(x32[5:], b=np.float32([[2.0]]))
    )
    assert one.result().dtype == np.float32
    ref = logsumexp(x32.astype(np.float64), axis=0, b=np.r_[[0.5] * 5, [2.0] * 3][:, None])
    assert_close_lse(one.result(), ref, 1.0, np.float32)
    with pytest.raises(ValueError, match=r"b\[1\] = -1.0 is negative"):
        LogSumExp().update([1.0, 2.0], b=[1.0, -1.0])
    with pytest.raises(ValueError, match="does not broadcast"):
        LogSumExp().update([1.0, 2.0], b=[1.0, 2.0, 3.0])


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(0, 30), elements=st.floats(-50, 50)),
    st.data(),
)
def test_weighted_random_chunkings_match_one_call(x, data):
    b = data.draw(
        hnp.arrays(np.float64, x.shape, elements=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 7.0]))
    )
    cuts = split_points(data.draw, x.size)
    accs = [LogSumExp().update(xs, b=bs) for xs, bs in zip(np.split(x, cuts), np.split(b, cuts))]
    got = merge_tree(data.draw, accs).result()
    want = logsumexp(x, b=b)
    if np.isneginf(want):
        assert got == want
    else:
        assert_close_lse(got, want, 60.0, np.float64)


def test_errors():
    acc = LogSumExp(axis=0).update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 4\) does not match .*\(\*, 3\)"):
        acc.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 dimensions"):
        acc.update(np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(LogSumExp(axis=0).update(np.zeros((1, 4))))
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(LogSumExp(axis=1))
    with pytest.raises(TypeError, match="LogSumExp"):
        acc.merge(np.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(np.exceptions.AxisError, match="axis 2 is out of bounds"):
        LogSumExp(axis=2).update(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="zero-dimensional"):
        LogSumExp(axis=0).update(np.float64(1.0))
    with pytest.raises(TypeError, match="axis"):
        LogSumExp(axis=1.5)  # type: ignore[arg-type]
    # An empty accumulator is the identity of merge.
    m = LogSumExp(axis=0).merge(acc).merge(LogSumExp(axis=0))
    np.testing.assert_array_equal(m.result(), acc.result())


def test_exported():
    assert stablelse.LogSumExp is LogSumExp
    assert "LogSumExp" in stablelse.__all__


def test_float32_accuracy_2_pow_26_in_1000_chunks():
    """2**26 float32 elements in 1000 uneven chunks: within 1 float32 ULP of float64 truth."""
    n = 1 << 26
    rng = np.random.default_rng(5)
    cuts = np.sort(rng.choice(np.arange(1, n), size=999, replace=False))
    bounds = np.r_[0, cuts, n]
    gen = np.random.default_rng(6)
    chunks = [
        (gen.standard_normal(int(hi - lo), dtype=np.float32) * np.float32(8.0))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    acc = LogSumExp()
    for c in chunks:
        acc.update(c)
    got = acc.result()
    assert got.dtype == np.float32

    m = max(float(c.max()) for c in chunks)
    total = math.fsum(float(np.sum(np.exp(c.astype(np.float64) - m))) for c in chunks)
    ref = m + math.log(total)
    assert abs(float(got) - ref) <= np.spacing(np.float32(ref)), (float(got), ref)
    # One call over the concatenation agrees (it also rounds once).
    assert abs(float(logsumexp(np.concatenate(chunks))) - float(got)) <= np.spacing(got)


def test_weighted_result_dtype_matches_one_call():
    a = np.arange(6, dtype=np.float32)
    b = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    acc = LogSumExp().update(a[:3], b=b[:3]).update(a[3:], b=b[3:])
    want = logsumexp(a, b=b)
    got = acc.result()
    assert np.asarray(got).dtype == np.asarray(want).dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
