"""Segment reductions against a loop of scipy calls over the segments, on random ragged data."""

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import stablelse
from stablelse import (
    segment_cross_entropy,
    segment_log_softmax,
    segment_logsumexp,
    segment_softmax,
)

SPECIALS = [np.nan, np.inf, -np.inf, 0.0, 1000.0, -1000.0, -40.0]


@st.composite
def ragged(draw, max_segments=12, max_len=9):
    """Values in segments of random length (0 and 1 included), with NaN/inf sprinkled in."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=0, max_size=max_segments))
    n = sum(lengths)
    finite = st.floats(-1e4, 1e4, allow_nan=False, width=64)
    values = draw(
        st.lists(
            st.one_of(finite, finite, finite, st.sampled_from(SPECIALS)), min_size=n, max_size=n
        )
    )
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = np.array(values, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return x, offsets


def ids_of(offsets):
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def segments_of(x, offsets, axis=0):
    """The scipy oracle's inputs: each segment of x (float64), in order."""
    x64 = np.asarray(x, dtype=np.float64)
    return [
        np.take(x64, np.arange(offsets[s], offsets[s + 1]), axis=axis)
        for s in range(len(offsets) - 1)
    ]


def assert_close(got, want, scale, dtype):
    """Equal NaN/inf placement; finite values within a few ULP of `scale` (the size of the
    terms that cancel, so a wrong max, sum or sign still fails)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf])
    ok = np.isfinite(want)
    assert np.isfinite(got[ok]).all()
    eps = np.finfo(dtype).eps
    tol = 8 * eps * (np.abs(want[ok]) + np.abs(np.broadcast_to(scale, want.shape)[ok]) + 1.0)
    err = np.abs(got[ok] - want[ok])
    assert (err <= tol).all(), (got, want)


def oracle_lse(segs):
    return np.array([sp.logsumexp(s) if s.size else -np.inf for s in segs])


def forms(x, offsets, rng):
    """The three descriptions of the same segments, the unsorted one shuffled, with the
    permutation that maps the shuffled positions back."""
    ids = ids_of(offsets)
    perm = rng.permutation(x.size)
    count = len(offsets) - 1
    return [
        ("offsets", x, {"offsets": offsets}, None),
        ("sorted", x, {"segment_ids": ids, "num_segments": count, "sorted": True}, None),
        ("unsorted", x[perm], {"segment_ids": ids[perm], "num_segments": count}, perm),
    ]


@settings(max_examples=150, deadline=None)
@given(data=ragged(), seed=st.integers(0, 2**32 - 1))
def test_segment_logsumexp_equals_scipy_loop(data, seed):
    x, offsets = data
    segs = segments_of(x, offsets)
    want = oracle_lse(segs)
    scale = np.array([np.max(np.abs(s[np.isfinite(s)]), initial=0.0) for s in segs])
    for name, xx, kw, _ in forms(x, offsets, np.random.default_rng(seed)):
        got = segment_logsumexp(xx, **kw)
        assert got.dtype == x.dtype, name
        assert_close(got, want, scale, x.dtype)


@settings(max_examples=150, deadline=None)
@given(data=ragged(), seed=st.integers(0, 2**32 - 1), log=st.booleans())
def test_segment_softmax_equals_scipy_loop(data, seed, log):
    x, offsets = data
    segs = segments_of(x, offsets)
    f = sp.log_softmax if log else sp.softmax
    ours = segment_log_softmax if log else segment_softmax
    with np.errstate(all="ignore"):
        want = np.concatenate([f(s) if s.size else np.zeros(0) for s in segs] + [np.zeros(0)])
    # log_softmax cancels x against the lse; softmax's exponent carries x's rounding.
    lse = np.repeat(oracle_lse(segs), np.diff(offsets))
    scale = np.abs(x.astype(np.float64)) + np.where(np.isfinite(lse), np.abs(lse), 0.0)
    with np.errstate(all="ignore"):
        if not log:
            scale = want * scale
        scale = np.where(np.isfinite(scale), scale, 0.0)
    for name, xx, kw, perm in forms(x, offsets, np.random.default_rng(seed)):
        got = ours(xx, **kw)
        assert got.shape == x.shape and got.dtype == x.dtype, name
        if perm is not None:
            back = np.empty_like(got)
            back[perm] = got
            got = back
        if log:
            assert_close(got, want, scale, x.dtype)
        else:
            # Softmax values are relative: a few ULP of the value itself (plus underflow).
            assert_close(got, want, scale, x.dtype)


@settings(max_examples=60, deadline=None)
@given(data=ragged(max_segments=6, max_len=5), cols=st.integers(1, 3), axis=st.sampled_from([0, 1]))
def test_segments_of_rows_reduce_each_column(data, cols, axis):
    x, offsets = data
    rng = np.random.default_rng(len(x))
    x2 = np.stack([x] + [rng.permutation(x) for _ in range(cols - 1)], axis=1)
    xa = x2 if axis == 0 else x2.T.copy()
    ids = ids_of(offsets)
    got = segment_logsumexp(xa, ids, len(offsets) - 1, axis=axis)
    segs = segments_of(xa, offsets, axis=axis)
    per = [sp.logsumexp(s, axis=axis) if s.size else np.full(cols, -np.inf) for s in segs]
    want = np.stack(per, axis=axis) if segs else np.moveaxis(np.zeros((0, cols)), 0, axis)
    assert_close(got, want, 1e4, x.dtype)
    sm = segment_softmax(xa, ids, axis=axis, num_segments=len(offsets) - 1)
    with np.errstate(all="ignore"):
        smw = np.concatenate(
            [sp.softmax(s, axis=axis) if s.size else s for s in segs] or [xa * 0.0], axis=axis
        )
    assert_close(sm, smw, smw * 2e4, x.dtype)


def big_ragged(rng, n_segments, max_len, dtype):
    lengths = rng.integers(0, max_len + 1, n_segments)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = (rng.standard_normal(offsets[-1]) * 30).astype(dtype)
    return x, offsets


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_for_any_thread_count(dtype):
    # Large enough that the unsorted path cuts its rows into several blocks and every path
    # runs in parallel pieces.
    rng = np.random.default_rng(5)
    x, offsets = big_ragged(rng, 3000, 200, dtype)
    x[rng.integers(0, x.size, 20)] = -np.inf
    runs = []
    before = stablelse.get_num_threads()
    try:
        for threads in (1, 2, 3, 7):
            stablelse.set_num_threads(threads)
            res = []
            for _, xx, kw, _ in forms(x, offsets, np.random.default_rng(1)):
                res += [
                    segment_logsumexp(xx, **kw),
                    segment_softmax(xx, **kw),
                    segment_log_softmax(xx, **kw),
                ]
            runs.append(res)
    finally:
        stablelse.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    # ... and the blocked, merged unsorted result is still the scipy loop's.
    segs = segments_of(x, offsets)
    assert_close(runs[0][6], oracle_lse(segs), 1e3, dtype)


def test_empty_segments_give_minus_inf_and_nothing_to_write():
    x = np.array([3.0, 1.0])
    np.testing.assert_array_equal(
        segment_logsumexp(x, [2, 2], num_segments=4),
        [-np.inf, -np.inf, stablelse.logsumexp(x), -np.inf],
    )
    np.testing.assert_array_equal(segment_logsumexp(np.zeros(0), offsets=[0, 0, 0]), [-np.inf] * 2)
    assert segment_softmax(np.zeros(0), [], num_segments=3).shape == (0,)
    assert segment_logsumexp(np.zeros(0), []).shape == (0,)
    # Columns of an empty segment of rows are -inf too.
    got = segment_logsumexp(np.ones((2, 3)), [0, 0], num_segments=2)
    np.testing.assert_array_equal(got[1], [-np.inf] * 3)


def test_out_of_range_ids_raise_index_error_naming_the_position():
    x = np.arange(5.0)
    with pytest.raises(IndexError, match=r"segment_ids\[3\] = 7 is outside \[0, 4\)"):
        segment_logsumexp(x, [0, 1, 2, 7, 0], num_segments=4)
    with pytest.raises(IndexError, match=r"segment_ids\[1\] = -1"):
        segment_softmax(x, [0, -1, 2, 3, 0], num_segments=4)
    with pytest.raises(IndexError, match=r"segment_ids\[4\] = 9"):
        segment_log_softmax(x, [0, 1, 2, 3, 9], num_segments=4, sorted=True)
    with pytest.raises(IndexError, match=r"segment_ids\[0\] = 5"):
        segment_logsumexp(np.zeros((2, 0)), [5, 0], num_segments=2)


def test_unsorted_index_error_names_the_first_position_in_a_blocked_call():
    # Many rows: the unsorted path works in several blocks; the first bad one is named.
    ids = np.zeros(1 << 20, dtype=np.int64)
    ids[700_000] = 3
    ids[900_000] = -2
    with pytest.raises(IndexError, match=r"segment_ids\[700000\] = 3"):
        segment_logsumexp(np.zeros(ids.size, np.float32), ids, num_segments=2)


def test_bad_offsets_and_broken_promises_raise_value_error():
    x = np.arange(4.0)
    with pytest.raises(ValueError, match=r"segment_ids\[2\] = 0 is smaller than segment_ids\[1\]"):
        segment_logsumexp(x, [0, 1, 0, 1], sorted=True)
    with pytest.raises(ValueError, match=r"offsets\[0\] = 1, expected 0"):
        segment_logsumexp(x, offsets=[1, 4])
    with pytest.raises(ValueError, match=r"offsets\[2\] = 1 is smaller"):
        segment_logsumexp(x, offsets=[0, 2, 1, 4])
    with pytest.raises(ValueError, match=r"offsets\[1\] = 3, expected the number of rows of x, 4"):
        segment_logsumexp(x, offsets=[0, 3])
    with pytest.raises(ValueError, match=r"exceeds the 4 rows"):
        segment_softmax(x, offsets=[0, 9, 4])
    with pytest.raises(ValueError, match="segment_ids has 3 elements but x has 4"):
        segment_logsumexp(x, [0, 0, 0])
    with pytest.raises(TypeError, match="exactly one of segment_ids and offsets"):
        segment_logsumexp(x)
    with pytest.raises(TypeError, match="exactly one of segment_ids and offsets"):
        segment_logsumexp(x, [0, 0, 0, 0], offsets=[0, 4])
    with pytest.raises(TypeError, match="segment_ids must hold integers"):
        segment_logsumexp(x, [0.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="num_segments = 3 but offsets describes 1"):
        segment_logsumexp(x, offsets=[0, 4], num_segments=3)
    with pytest.raises(ValueError, match="num_segments must be non-negative"):
        segment_logsumexp(x, [0, 0, 0, 0], num_segments=-1)


def test_dtypes_follow_logsumexp():
    ids = [0, 1, 1]
    assert segment_logsumexp(np.array([1, 2, 3]), ids).dtype == np.float64
    assert segment_logsumexp(np.array([1, 2, 3], np.float16), ids).dtype == np.float16
    assert segment_softmax(np.array([1, 2, 3], np.float32), ids).dtype == np.float32
    # Any integer type of ids (Polars ranks are u32, pd.factorize gives intp).
    for idt in (np.int32, np.uint32, np.int64, np.uint8):
        np.testing.assert_array_equal(
            segment_logsumexp(np.array([1.0, 2.0, 3.0]), np.array(ids, idt)),
            segment_logsumexp(np.array([1.0, 2.0, 3.0]), ids),
        )


def test_log_softmax_keeps_the_top_elements_tiny_value():
    # scipy rounds log(1 + e^-40) to 0 for the top element; the excess form does not.
    got = segment_log_softmax(np.array([0.0, -40.0, 5.0]), offsets=[0, 2, 3])
    assert got[0] == -4.248354255291589e-18
    got32 = segment_log_softmax(np.array([0.0, -40.0], np.float32), [0, 0])
    assert got32[0] == np.float32(-4.248354255291589e-18)


# ----------------------------------------------------------------------------- cross-entropy


@settings(max_examples=100, deadline=None)
@given(
    data=ragged(),
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_segment_cross_entropy_equals_per_segment_loss_and_gradient(data, seed, reduction):
    x, offsets = data
    x = np.where(np.isfinite(x), x, 1.0).astype(x.dtype)  # the loss's specials are below
    rng = np.random.default_rng(seed)
    lengths = np.diff(offsets)
    target = np.array(
        [rng.integers(0, n) if n and rng.random() < 0.8 else -100 for n in lengths], dtype=np.int64
    )
    segs = segments_of(x, offsets)
    losses = np.array([sp.logsumexp(s) - s[t] if t >= 0 else 0.0 for s, t in zip(segs, target)])
    grad = np.zeros(x.size)
    for s, (seg, t) in enumerate(zip(segs, target)):
        if t >= 0:
            g = sp.softmax(seg)
            g[t] -= 1
            grad[offsets[s] : offsets[s + 1]] = g
    count = int((target >= 0).sum())
    if reduction == "mean":
        want = losses.sum() / count if count else np.nan
        grad = grad / count if count else grad
    else:
        want = losses if reduction == "none" else losses.sum()
    scale = np.abs(losses).sum() + np.abs(x).max(initial=0) * max(count, 1)
    for name, xx, kw, perm in forms(x, offsets, rng):
        if name == "unsorted":
            # Targets count within the segment in array order: re-derive them after the
            # shuffle from the original positions of the positives.
            tgt = target.copy()
            for s in range(len(lengths)):
                if target[s] >= 0:
                    members = np.flatnonzero(kw["segment_ids"] == s)
                    tgt[s] = int(np.flatnonzero(perm[members] == offsets[s] + target[s])[0])
        else:
            tgt = target
        loss, g = segment_cross_entropy(xx, target=tgt, reduction=reduction, return_grad=True, **kw)
        assert g.dtype == x.dtype and g.shape == x.shape
        if perm is not None:
            back = np.empty_like(g)
            back[perm] = g
            g = back
        assert_close(loss, want, scale, x.dtype)
        assert_close(g, grad, 1.0, x.dtype)


def test_segment_cross_entropy_errors_and_ignored_segments():
    x = np.array([1.0, 2.0, 3.0])
    with pytest.raises(IndexError, match=r"target\[1\] = 0 is outside \[0, 0\)"):
        segment_cross_entropy(x, target=[2, 0], offsets=[0, 3, 3])
    with pytest.raises(IndexError, match=r"target\[0\] = 3 is outside \[0, 3\)"):
        segment_cross_entropy(x, [0, 0, 0], target=[3])
    with pytest.raises(ValueError, match="reduction must be"):
        segment_cross_entropy(x, [0, 0, 0], target=[0], reduction="avg")
    with pytest.raises(ValueError, match="target has 1 elements but there are 2 segments"):
        segment_cross_entropy(x, target=[0], offsets=[0, 1, 3])
    loss, g = segment_cross_entropy(x, target=[-100, -100], offsets=[0, 1, 3], return_grad=True)
    assert np.isnan(loss) and (g == 0).all()
    loss = segment_cross_entropy(x, target=[1, 5], offsets=[0, 3, 3], ignore_index=5)
    assert loss == pytest.approx(sp.logsumexp(x) - 2.0, rel=1e-15)
    # An overflowing segment: IEEE inf - x_t, NaN gradient, the other segment untouched.
    loss, g = segment_cross_entropy(
        np.array([np.inf, 0.0, 1.0]),
        target=[1, 0],
        offsets=[0, 2, 3],
        reduction="none",
        return_grad=True,
    )
    assert loss[0] == np.inf and loss[1] == 0.0
    assert np.isnan(g[:2]).all() and g[2] == 0.0


@settings(max_examples=80, deadline=None)
@given(data=ragged(), seed=st.integers(0, 2**32 - 1))
def test_unsorted_ids_equal_the_stably_sorted_offsets_bitwise(data, seed):
    # Unsorted ids reduce each segment over its elements in array order, through the same
    # row kernels as offsets: bit for bit the offsets result on the stably sorted input.
    x, offsets = data
    rng = np.random.default_rng(seed)
    perm = rng.permutation(x.size)
    xu, iu = x[perm], ids_of(offsets)[perm]
    xs = xu[np.argsort(iu, kind="stable")]
    count = len(offsets) - 1
    for f in (segment_logsumexp, segment_softmax, segment_log_softmax):
        got = f(xu, iu, count)
        want = f(xs, offsets=offsets)
        if f is not segment_logsumexp:
            want = want[np.argsort(np.argsort(iu, kind="stable"))]
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
