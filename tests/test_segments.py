"""Segment reductions against a loop of scipy calls over the segments, on random ragged data."""

import math

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
def test_unsorted_ids_equal_the_stably_sorted_offsets(data, seed):
    # Unsorted ids reduce each segment over its elements in array order: the offsets result
    # on the stably sorted input, up to the rounding of the finish (a few ULP).
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
        assert_close(got, want, 0.0, x.dtype)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@settings(max_examples=80, deadline=None)
@given(data=ragged(), seed=st.integers(0, 2**32 - 1), cols=st.integers(1, 3))
def test_out_receives_the_plain_result_bitwise_in_place_and_in_any_layout(data, seed, cols):
    # Catches an in-place write that lands before its segment's state is final, an `out`
    # view mapped to the wrong positions, and the copy path (non-contiguous out) not written.
    x1, offsets = data
    rng = np.random.default_rng(seed)
    x = (x1[:, None] + rng.integers(-3, 4, (x1.size, cols))).astype(x1.dtype)
    for name, _, kw, perm in forms(x1, offsets, rng):
        xx = x if perm is None else x[perm]
        for f in (segment_softmax, segment_log_softmax):
            with np.errstate(all="ignore"):
                want = f(xx, **kw)
                fresh = np.empty_like(xx)
                assert f(xx, **kw, out=fresh) is fresh
                np.testing.assert_array_equal(_bits(fresh), _bits(want), err_msg=name)
                strided = np.empty((xx.shape[0], 2 * cols), xx.dtype)[:, ::2]
                f(xx, **kw, out=strided)
                np.testing.assert_array_equal(_bits(strided), _bits(want), err_msg=name)
                buf = xx.copy()
                assert f(buf, **kw, out=buf) is buf
                np.testing.assert_array_equal(_bits(buf), _bits(want), err_msg=name)
                # Segments along axis 1 of the transpose: x's block is a copy, out=x still works.
                t = np.asfortranarray(xx).T
                assert f(t, **kw, axis=1, out=t) is t
                np.testing.assert_array_equal(_bits(t.T), _bits(want), err_msg=name)
        want = segment_logsumexp(xx, **kw)
        for out in (np.empty_like(want), np.empty_like(want, order="F")[..., :]):
            assert segment_logsumexp(xx, **kw, out=out) is out
            np.testing.assert_array_equal(_bits(out), _bits(want), err_msg=name)
        out = np.empty(want.T.shape, want.dtype)
        segment_logsumexp(np.ascontiguousarray(xx.T), **kw, axis=1, out=out)
        np.testing.assert_array_equal(_bits(out), _bits(want.T), err_msg=name)


def test_out_errors_name_out():
    x = np.linspace(-3, 3, 12)
    ids = np.array([0, 1, 2] * 4)
    with pytest.raises(ValueError, match=r"out has shape \(4,\), expected \(3,\)"):
        segment_logsumexp(x, ids, 3, out=np.empty(4))
    with pytest.raises(TypeError, match="out has dtype float32, expected float64"):
        segment_softmax(x, ids, 3, out=np.empty(12, np.float32))
    with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
        segment_log_softmax(x, ids, 3, out=[0.0] * 12)
    ro = np.empty(12)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        segment_softmax(x, ids, 3, out=ro)
    # Overlap is decided by element: a reversed x, or a logsumexp out inside x, is refused
    # before anything is written; an out in the gaps of a strided x is accepted.
    y = x.copy()
    for out, f in ((y[::-1], segment_softmax), (y[:3], segment_logsumexp)):
        with pytest.raises(ValueError, match="overlaps the input x"):
            f(y, ids, 3, out=out)
        np.testing.assert_array_equal(y, x)
    both = np.empty(24)
    both[::2] = x
    segment_softmax(both[::2], ids, 3, out=both[1::2])
    np.testing.assert_array_equal(both[1::2], segment_softmax(x, ids, 3))
    # Through the native layer directly: a partial overlap of a dense block.
    z = np.linspace(0, 1, 13).reshape(13, 1)
    with pytest.raises(ValueError, match="overlaps"):
        stablelse._core.segment_softmax(z[:12], z[1:], offsets=np.array([0, 12]))


def test_grad_out_is_the_returned_gradient():
    # Catches a grad_out that is checked but not written, or written in a different dtype.
    rng = np.random.default_rng(5)
    x = rng.standard_normal(50).astype(np.float32)
    ids = rng.integers(0, 6, 50)
    target = np.zeros(6, dtype=np.int64)
    loss, want = segment_cross_entropy(x, ids, target, return_grad=True)
    for g in (np.full(50, np.nan, np.float32), np.full(100, np.nan, np.float32)[::2]):
        loss2, got = segment_cross_entropy(x, ids, target, return_grad=True, grad_out=g)
        assert got is g and loss2 == loss
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="grad_out is given but return_grad is False"):
        segment_cross_entropy(x, ids, target, grad_out=np.empty(50, np.float32))
    with pytest.raises(ValueError, match="grad_out overlaps x"):
        segment_cross_entropy(x, ids, target, return_grad=True, grad_out=x)
    with pytest.raises(TypeError, match="grad_out has dtype float64"):
        segment_cross_entropy(x, ids, target, return_grad=True, grad_out=np.empty(50))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_dask_segments_across_chunks_equal_the_numpy_path(dtype, chunk):
    # Segments split across chunk boundaries (chunk 1: every segment of length > 1 spans
    # chunks), empty segments and specials: catches a merge that is not the kernels' (a wrong
    # max or excess across chunks), states of one chunk assigned to the wrong segments, and a
    # write pass that uses a chunk's own states instead of the merged ones.
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    rng = np.random.default_rng(chunk)
    lengths = rng.integers(0, 7, 20)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    x = (rng.standard_normal((n, 3)) * 30).astype(dtype)
    x[rng.integers(0, n, 4), rng.integers(0, 3, 4)] = [np.inf, -np.inf, np.nan, 1000.0]
    x[offsets[5] : offsets[6]] = -np.inf
    ids = ids_of(offsets)
    perm = rng.permutation(n)
    count = len(lengths)
    cases = [
        (x, {"offsets": offsets}),
        (x, {"segment_ids": ids, "num_segments": count, "sorted": True}),
        (x[perm], {"segment_ids": ids[perm], "num_segments": count}),
    ]
    for xx, kw in cases:
        for f, ours in (
            (sd.segment_logsumexp, segment_logsumexp),
            (sd.segment_softmax, segment_softmax),
            (sd.segment_log_softmax, segment_log_softmax),
        ):
            with np.errstate(all="ignore"):
                want = ours(xx, **kw)
                xd = da.from_array(xx, chunks=(chunk, 2))
                dkw = dict(kw)
                if "segment_ids" in dkw:
                    dkw["segment_ids"] = da.from_array(dkw["segment_ids"], chunks=chunk + 1)
                got = f(xd, **dkw).compute()
                got_t = f(xd.T, **dkw, axis=1).compute()
            assert got.dtype == want.dtype and got.shape == want.shape
            scale = np.abs(np.where(np.isfinite(want), want, 0.0)) + 30
            assert_close(got, want, scale, dtype)
            assert_close(got_t, want.T, scale.T, dtype)


def test_dask_segment_errors():
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    x = da.from_array(np.arange(10.0), chunks=3)
    ids = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    bad = ids.copy()
    bad[7] = 4
    # The position is named in the whole array, not in its chunk.
    with pytest.raises(IndexError, match=r"segment_ids\[7\] = 4 is outside \[0, 4\)"):
        sd.segment_softmax(x, da.from_array(bad, chunks=3), 4).compute()
    unsorted = ids.copy()
    unsorted[4] = 0
    with pytest.raises(ValueError, match=r"segment_ids\[4\] = 0 is smaller than segment_ids\[3\]"):
        sd.segment_logsumexp(x, unsorted, 4, sorted=True).compute()
    with pytest.raises(TypeError, match="num_segments is required"):
        sd.segment_logsumexp(x, ids)
    with pytest.raises(ValueError, match="offsets must be non-decreasing from 0 to the 10 rows"):
        sd.segment_logsumexp(x, offsets=[0, 4, 3, 10])
    with pytest.raises(ValueError, match="segment_ids has shape"):
        sd.segment_logsumexp(x, ids[:9], 4)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_dask_segment_cross_entropy_equals_the_numpy_path(chunk, reduction):
    # Unsorted ids across chunks (chunk 1: every row alone): catches a rank within the segment
    # counted per chunk instead of over the whole array (a target picked in the wrong chunk),
    # counts of earlier chunks added to the wrong segment, an ignored or empty segment
    # counted, a target found twice or not at all, and a gradient scaled or placed wrongly.
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    rng = np.random.default_rng(chunk)
    lengths = rng.integers(0, 8, 40)
    lengths[[2, 9]] = 0
    lengths[4] = 3
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    x = rng.standard_normal(n) * 5
    x[offsets[4]] = 60.0  # a confident segment, where lse - x_t would cancel
    target = np.array([rng.integers(0, k) if k else -100 for k in lengths])
    target[4], target[7] = 0, -100
    ids = ids_of(offsets)
    perm = rng.permutation(n)
    cases = [
        (x, {"offsets": offsets}),
        (x, {"segment_ids": ids, "sorted": True}),
        (x[perm], {"segment_ids": ids[perm]}),
    ]
    for xx, kw in cases:
        want, gwant = segment_cross_entropy(
            xx, target=target, reduction=reduction, return_grad=True, **kw
        )
        dkw = dict(kw)
        if "segment_ids" in dkw:
            dkw["segment_ids"] = da.from_array(dkw["segment_ids"], chunks=chunk + 1)
        xd = da.from_array(xx, chunks=chunk)
        got = sd.segment_cross_entropy(xd, target=target, reduction=reduction, **dkw).compute()
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
        np.testing.assert_allclose(got, want, rtol=4e-15, atol=1e-300)
        loss, grad = sd.segment_cross_entropy(
            xd, target=target, reduction=reduction, return_grad=True, **dkw
        )
        assert grad.chunks == xd.chunks
        np.testing.assert_allclose(loss.compute(), want, rtol=4e-15, atol=1e-300)
        np.testing.assert_allclose(grad.compute(), gwant, rtol=1e-14, atol=1e-16)


def test_dask_segments_of_an_empty_array():
    # No rows: every segment is empty (-inf, nothing to write, no loss); an empty block's ids
    # used to fail a reshape.
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    xe = da.from_array(np.zeros(0), chunks=1)
    np.testing.assert_array_equal(sd.segment_logsumexp(xe, offsets=[0, 0, 0]).compute(),
                                  [-np.inf, -np.inf])
    assert sd.segment_softmax(xe, offsets=[0, 0, 0]).compute().shape == (0,)
    ids = da.from_array(np.zeros(0, np.int64), chunks=1)
    x2 = da.from_array(np.zeros((0, 3)), chunks=(1, 2))
    assert np.isneginf(sd.segment_logsumexp(x2, ids, 2).compute()).all()
    loss, grad = sd.segment_cross_entropy(
        xe, target=[-100, -100], offsets=[0, 0, 0], reduction="none", return_grad=True
    )
    np.testing.assert_array_equal(loss.compute(), [0.0, 0.0])
    assert grad.compute().shape == (0,)
    with pytest.raises(IndexError, match=r"target\[0\] = 0 is outside \[0, 0\)"):
        sd.segment_cross_entropy(xe, target=[0, -100], offsets=[0, 0, 0]).compute()


def test_dask_segment_cross_entropy_errors():
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    x = da.from_array(np.arange(10.0, dtype=np.float32), chunks=3)
    ids = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    loss = sd.segment_cross_entropy(x, da.from_array(ids, chunks=4), [1, 0, 1, 2])
    assert loss.dtype == np.float32
    np.testing.assert_allclose(
        loss.compute(), segment_cross_entropy(x.compute(), ids, [1, 0, 1, 2]), rtol=1e-6
    )
    with pytest.raises(IndexError, match=r"target\[1\] = 3 is outside \[0, 3\) \(segment 1"):
        sd.segment_cross_entropy(x, ids, [1, 3, 1, 2]).compute()
    bad = ids.copy()
    bad[8] = 4
    with pytest.raises(IndexError, match=r"segment_ids\[8\] = 4 is outside \[0, 4\)"):
        sd.segment_cross_entropy(x, da.from_array(bad, chunks=3), [0, 0, 0, 0]).compute()
    with pytest.raises(IndexError, match=r"target\[1\] = 3 is outside"):
        sd.segment_cross_entropy(x, ids, [1, 3, 1, 2], return_grad=True)[1].compute()
    loss, grad = sd.segment_cross_entropy(x, ids, [1, 0, 1, -100], return_grad=True)
    want, gwant = segment_cross_entropy(x.compute(), ids, [1, 0, 1, -100], return_grad=True)
    assert grad.dtype == np.float32 and not grad[7:].compute().any()
    np.testing.assert_allclose(grad.compute(), gwant, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="target has 3 elements but there are 4 segments"):
        sd.segment_cross_entropy(x, ids, [0, 0, 0], num_segments=4)
    with pytest.raises(TypeError, match="missing the target"):
        sd.segment_cross_entropy(x, ids)


@pytest.mark.parametrize("num_segments", [3, 5000, 70000])
def test_unsorted_ids_over_many_sort_chunks_equal_the_sorted_offsets(num_segments):
    # 300k rows: several chunks of the sort's first level and, for 70000 segments, buckets of
    # many segments; catches pieces of a bucket gathered out of chunk order, a piece skipped
    # (both change or lose a segment's values), and a dependence on the thread count (bits).
    rng = np.random.default_rng(num_segments)
    n = 300_000
    ids = rng.integers(0, num_segments, n)
    x = rng.standard_normal(n) * 20
    order = np.argsort(ids, kind="stable")
    offsets = np.searchsorted(ids[order], np.arange(num_segments + 1)).astype(np.int64)
    want_lse = segment_logsumexp(x[order], offsets=offsets)
    want_sm = np.empty_like(x)
    want_sm[order] = segment_softmax(x[order], offsets=offsets)
    before = stablelse.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            stablelse.set_num_threads(threads)
            lse = segment_logsumexp(x, ids, num_segments)
            runs.append((lse, segment_softmax(x, ids, num_segments)))
    finally:
        stablelse.set_num_threads(before)
    for lse, sm in runs:
        np.testing.assert_array_equal(_bits(lse), _bits(runs[0][0]))
        np.testing.assert_array_equal(_bits(sm), _bits(runs[0][1]))
    assert_close(runs[0][0], want_lse, 0.0, np.float64)
    assert_close(runs[0][1], want_sm, 0.0, np.float64)


# --- Sorted ids and offsets: short segments packed into vector lanes -------------------------
# Segments of 1..64 rows are grouped by length, padded with -inf and reduced one per lane by the
# short-row kernels; longer ones take the row kernels. These tests cover lengths on both sides
# of the threshold, every tail length of the vectors, and mixes in which a segment's neighbours
# (its group, its padding, its piece of the parallel split) change.

SHORT_ROW = 64


@st.composite
def ragged_long(draw):
    """Segments of 0..SHORT_ROW + 40 elements, most of them short, with specials sprinkled."""
    lengths = draw(
        st.lists(
            st.one_of(st.integers(0, SHORT_ROW), st.integers(0, SHORT_ROW + 40)),
            max_size=40,
        )
    )
    n = sum(lengths)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * draw(st.sampled_from([1.0, 30.0, 400.0]))
    k = draw(st.integers(0, min(n, 6)))
    x[rng.choice(n, k, replace=False)] = rng.choice(SPECIALS, k)
    x = x.astype(draw(st.sampled_from([np.float32, np.float64])))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return x, offsets


@settings(max_examples=120, deadline=None)
@given(data=ragged_long())
def test_packed_segments_equal_a_scipy_loop_and_sorted_ids_equal_offsets_bitwise(data):
    # Catches a result scattered to the wrong segment after the length sort, padding that is
    # not neutral (a group's width, NaN/inf rows redone on the padded copy), the threshold
    # between the packed and the row kernels, and sorted ids reduced differently from offsets.
    x, offsets = data
    segs = segments_of(x, offsets)
    ids = ids_of(offsets)
    count = len(offsets) - 1
    lse = segment_logsumexp(x, offsets=offsets)
    scale = np.array([np.max(np.abs(s[np.isfinite(s)]), initial=0.0) for s in segs])
    assert_close(lse, oracle_lse(segs), scale, x.dtype)
    np.testing.assert_array_equal(
        _bits(segment_logsumexp(x, ids, count, sorted=True)), _bits(lse)
    )
    for log in (False, True):
        f = sp.log_softmax if log else sp.softmax
        ours = segment_log_softmax if log else segment_softmax
        got = ours(x, offsets=offsets)
        with np.errstate(all="ignore"):
            want = np.concatenate([f(s) if s.size else np.zeros(0) for s in segs] + [np.zeros(0)])
            lses = np.repeat(oracle_lse(segs), np.diff(offsets))
            sc = np.abs(x.astype(np.float64)) + np.where(np.isfinite(lses), np.abs(lses), 0.0)
            sc = np.where(np.isfinite(sc), sc if log else want * sc, 0.0)
        assert_close(got, want, sc, x.dtype)
        np.testing.assert_array_equal(_bits(ours(x, ids, count, sorted=True)), _bits(got))
        inplace = x.copy()
        ours(inplace, offsets=offsets, out=inplace)
        np.testing.assert_array_equal(_bits(inplace), _bits(got))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_packed_segment_is_the_short_row_of_its_elements_bitwise(dtype):
    # Every length 1..SHORT_ROW + 2 (all tails of 2-, 4- and 8-lane vectors), shuffled so each
    # window mixes lengths: a segment's logsumexp is bit for bit that of the same elements as a
    # 2-D row, whatever group it lands in. Catches padding that changes a sum (a finite fill,
    # an exp of -inf that is not exactly 0), a group wider or narrower than its longest row,
    # and tails copied short or long.
    rng = np.random.default_rng(5)
    lengths = rng.permutation(np.repeat(np.arange(1, SHORT_ROW + 3), 5))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = (rng.standard_normal(offsets[-1]) * 10).astype(dtype)
    x[offsets[3]] = np.inf
    x[offsets[7] + 1] = np.nan
    x[offsets[11] : offsets[12]] = -np.inf
    got = segment_logsumexp(x, offsets=offsets)
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        want = stablelse.logsumexp(x[a:b][None, :], axis=1)
        np.testing.assert_array_equal(_bits(got[s : s + 1]), _bits(want), err_msg=f"{s} {b - a}")


def test_packed_segments_are_bit_identical_for_any_thread_count_and_in_place():
    # 400k float32 values in segments of 0..100 (several pieces of the parallel split, windows
    # of every composition): logsumexp, softmax and log_softmax bit-identical for 1, 2 and 3
    # threads, from offsets and from sorted ids, and in place.
    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 101, 8000)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = (rng.standard_normal(offsets[-1]) * 8).astype(np.float32)
    x[rng.choice(x.size, 20, replace=False)] = rng.choice(SPECIALS, 20)
    ids = ids_of(offsets)
    count = len(offsets) - 1
    before = stablelse.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            stablelse.set_num_threads(threads)
            for f in (segment_logsumexp, segment_softmax, segment_log_softmax):
                runs.append((threads, f.__name__, "offsets", f(x, offsets=offsets)))
                runs.append((threads, f.__name__, "ids", f(x, ids, count, sorted=True)))
                if f is not segment_logsumexp:
                    buf = x.copy()
                    f(buf, offsets=offsets, out=buf)
                    runs.append((threads, f.__name__, "in place", buf))
    finally:
        stablelse.set_num_threads(before)
    first = {name: a for t, name, form, a in runs if t == 1 and form == "offsets"}
    for t, name, form, a in runs:
        np.testing.assert_array_equal(_bits(a), _bits(first[name]), err_msg=f"{t} {name} {form}")


# Unsorted float32 ids: the scatter (each segment's max, then its sum, in array order).

SCATTER_MAX_SEGMENTS = 2**22  # 64 MiB of 16-byte states; more segments take the sort


def _exact_states(x, ids, count):
    """Per segment: (max, exact excess = sum exp(x - max) - 1 by fsum, length), float64."""
    x64 = x.astype(np.float64)
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(count + 1))
    out = []
    for s in range(count):
        seg = x64[order[bounds[s]:bounds[s + 1]]]
        m = np.max(seg, initial=-np.inf)
        if np.isfinite(m):
            excess = math.fsum(list(np.exp(seg - m)) + [-1.0])
        else:
            excess = np.nan
        out.append((m, excess, seg.size))
    return out


def _exact_lse(states):
    return np.array(
        [m + math.log1p(e) if np.isfinite(m) else m for m, e, _ in states], dtype=np.float64
    )


def _within_scatter_bound(got, want, n, what):
    """The documented bound: 0.5 float32 ULP plus (3 n + 4) 2**-53 + 2**-34 absolute (lse),
    relative plus 2**-32 (softmax); special values placed as in the exact result. 2**-34 is
    the float32-grade exp's relative error (every term's, so the sum's)."""
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    ok = np.isfinite(want)
    half_ulp = 0.5 * np.spacing(np.abs(want[ok]).astype(np.float32)).astype(np.float64)
    sums = (3 * n[ok] + 4) * 2.0**-53 + 2.0**-34
    if what == "softmax":
        tol = half_ulp + want[ok] * (sums + 2.0**-32)
    else:
        tol = half_ulp + sums * (1 + np.abs(want[ok])) + 4 * 2.0**-53 * np.abs(want[ok])
    err = np.abs(got[ok] - want[ok])
    assert (err <= tol).all(), (got[ok][err > tol], want[ok][err > tol])


@settings(max_examples=150, deadline=None)
@given(data=ragged(max_segments=20, max_len=40), seed=st.integers(0, 2**32 - 1))
def test_unsorted_float32_is_within_the_documented_bound_of_an_exact_sum(data, seed):
    # Catches a wrong rescale when an element raises its segment's max, a factor taken for
    # the wrong max, special values (NaN, +-inf, empty and all -inf segments, length 1)
    # handled otherwise than by the state's rules, and sums lost to the excess form
    # ([0, -40] keeps its 4e-18).
    x, offsets = data
    x = x.astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(x.size)
    xu, iu = x[perm], ids_of(offsets)[perm]
    count = len(offsets) - 1
    states = _exact_states(xu, iu, count)
    n = np.array([k for _, _, k in states], dtype=np.float64)
    _within_scatter_bound(segment_logsumexp(xu, iu, count), _exact_lse(states), n, "lse")
    with np.errstate(all="ignore"):
        m = np.array([st[0] for st in states])[iu]
        excess = np.array([st[1] for st in states])[iu]
        x64 = xu.astype(np.float64)
        want_sm = np.where(np.isfinite(m), np.exp(x64 - m) / (1 + excess), np.nan)
        want_ls = np.where(np.isfinite(m), (x64 - m) - np.log1p(excess), x64 - m)
    _within_scatter_bound(segment_softmax(xu, iu, count), want_sm, n[iu], "softmax")
    _within_scatter_bound(segment_log_softmax(xu, iu, count), want_ls, n[iu], "lse")


def test_unsorted_float32_keeps_the_tiny_excess():
    x = np.array([-40.0, 0.0, 5.0, -40.0, 5.0], dtype=np.float32)
    got = segment_logsumexp(x, [0, 0, 1, 1, 1], 2)
    assert got[0] == np.float32(4.248354255291589e-18)
    np.testing.assert_array_equal(segment_log_softmax(x, [0, 0, 1, 1, 1], 2)[1],
                                  np.float32(-4.248354255291589e-18))


@pytest.mark.parametrize("count", [7, 500, 40_000, 300_000])
def test_unsorted_float32_bits_do_not_depend_on_the_thread_count(count):
    # 600k rows: the scatter cuts the rows into several parts for 7 and 500 segments (each
    # with its own states, merged in part order), one for 40000; 300000 segments are
    # partitioned into buckets first (chunks of rows, buckets of segments); catches a merge
    # order, a part boundary or a chunk order that follows the thread count.
    rng = np.random.default_rng(count)
    ids = rng.integers(0, count, 600_000)
    x = (rng.standard_normal(ids.size) * 30).astype(np.float32)
    x[rng.integers(0, x.size, 30)] = -np.inf
    runs = []
    before = stablelse.get_num_threads()
    try:
        for threads in (1, 2, 3, 7):
            stablelse.set_num_threads(threads)
            runs.append([f(x, ids, count) for f in
                         (segment_logsumexp, segment_softmax, segment_log_softmax)])
    finally:
        stablelse.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(_bits(a), _bits(b))
    states = _exact_states(x, ids, count)
    n = np.array([k for _, _, k in states], dtype=np.float64)
    _within_scatter_bound(runs[0][0], _exact_lse(states), n, "lse")


@pytest.mark.parametrize("fn", [segment_softmax, segment_log_softmax])
def test_unsorted_float16_of_many_segments_is_float32_rounded_once_more(fn):
    # 300000 segments take the partition, which carries values and results as float32: a
    # float16 input must give the float32 path's results rounded to float16 (within the one
    # extra rounding), at every position.
    rng = np.random.default_rng(16)
    ids = rng.integers(0, 300_000, 600_000)
    x = (rng.standard_normal(ids.size) * 4).astype(np.float16)
    got = fn(x, ids, 300_000)
    want = fn(x.astype(np.float32), ids, 300_000)
    assert got.dtype == np.float16
    ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
    assert (np.abs(got.astype(np.float32) - want) <= ulp).all()


def test_unsorted_float32_names_the_first_bad_id_across_parts():
    ids = np.zeros(700_000, dtype=np.int64)
    ids[650_000] = -3
    ids[400_123] = 5
    ids[400_200] = 9
    x = np.zeros(ids.size, np.float32)
    with pytest.raises(IndexError, match=r"segment_ids\[400123\] = 5 is outside \[0, 5\)"):
        segment_logsumexp(x, ids, num_segments=5)
    with pytest.raises(IndexError, match=r"segment_ids\[400123\] = 5"):
        segment_softmax(x, ids, num_segments=5)


@pytest.mark.parametrize("count", [SCATTER_MAX_SEGMENTS, SCATTER_MAX_SEGMENTS + 1])
def test_scatter_boundary_gives_results_within_the_bound_on_both_sides(count):
    # The last segment count of the scatter and the first of the sort: both within the
    # bound. The float64 states (before the float32 rounding hides the summation order) are
    # the offsets path's bit for bit on the sort's side only, which pins where the switch
    # lies.
    rng = np.random.default_rng(count)
    used = rng.choice(count, 2000, replace=False)
    ids = used[rng.integers(0, used.size, 100_000)]
    x = (rng.standard_normal(ids.size) * 10).astype(np.float32)
    got = segment_logsumexp(x, ids, count)
    order = np.argsort(ids, kind="stable")
    offsets = np.searchsorted(ids[order], np.arange(count + 1)).astype(np.int64)
    dense = np.sort(used)
    states = _exact_states(x, np.searchsorted(dense, ids), dense.size)
    n = np.array([k for _, _, k in states], dtype=np.float64)
    _within_scatter_bound(got[dense], _exact_lse(states), n, "lse")
    assert np.isneginf(np.delete(got, dense)).all()
    excess = stablelse._core.segment_states(x[:, None], segment_ids=ids, num_segments=count)[1]
    want_excess = stablelse._core.segment_states(x[order][:, None], offsets=offsets)[1]
    same = np.array_equal(_bits(excess[dense]), _bits(want_excess[dense]))
    if stablelse._core.simd_level() == "scalar":
        # The scalar level's sorted path sums each segment in array order too.
        assert same
    else:
        assert same == (count > SCATTER_MAX_SEGMENTS)


def test_float64_long_unsorted_segment_keeps_the_sorted_states():
    # float64 stays on the sort (its blocked sums: about 0 ULP here, where one running sum
    # is off by a few ULP); float32 scatters within its bound.
    rng = np.random.default_rng(3)
    n = 1 << 20
    x = rng.standard_normal(n)
    ids = np.zeros(n, dtype=np.int64)
    ids[rng.integers(0, n, 1000)] = 1
    got = segment_logsumexp(x, ids, 2)
    order = np.argsort(ids, kind="stable")
    offsets = np.searchsorted(ids[order], np.arange(3)).astype(np.int64)
    for a, b in zip(
        stablelse._core.segment_states(x[:, None], segment_ids=ids, num_segments=2),
        stablelse._core.segment_states(x[order][:, None], offsets=offsets),
    ):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    states = _exact_states(x, ids, 2)
    want = _exact_lse(states)
    assert np.abs(got - want).max() <= 2 * np.spacing(want).max()
    x32 = x.astype(np.float32)
    states = _exact_states(x32, ids, 2)
    n_seg = np.array([k for _, _, k in states], dtype=np.float64)
    _within_scatter_bound(segment_logsumexp(x32, ids, 2), _exact_lse(states), n_seg, "lse")



# --- Sorted ids: the id scan (blocks of ids checked at once, pieces of rows in parallel) -------
# Sorted ids are checked in blocks of 64 compared at once, in pieces of 65536 rows that run in
# parallel; an offending block is rescanned row by row. These tests put run boundaries, gaps,
# unsorted and out-of-range ids at every position around the vector and block widths, the
# piece edges and the end, and require the first offending row to be the one named.

ID_PIECE = 1 << 16
_NEAR = sorted(set(range(18)) | set(range(56, 72)) | {127, 128, 129, 191, 192, 193})


def _positions(n):
    """Positions near vector widths, blocks, the pieces of the parallel split and the end."""
    near = set(_NEAR) | set(range(max(n - 17, 0), n))
    if n > ID_PIECE:
        near |= {ID_PIECE + d for d in range(-9, 10)}
    return sorted(p for p in near if 0 <= p < n)


def _offsets_of(ids, num_segments):
    return np.searchsorted(ids, np.arange(num_segments + 1)).astype(np.int64)


def _with_threads(threads, f, *args, **kwargs):
    before = stablelse.get_num_threads()
    try:
        stablelse.set_num_threads(threads)
        return f(*args, **kwargs)
    finally:
        stablelse.set_num_threads(before)


@pytest.mark.parametrize("n", [150, ID_PIECE + 150])
def test_sorted_id_run_boundary_at_every_position_equals_offsets_bitwise(n):
    # One boundary at position b (ids 0 then 2 + gap: segment 1 and those past the last id are
    # empty, num_segments above the largest id): every start must land on b exactly.
    x = np.random.default_rng(n).standard_normal(n)
    for b in _positions(n):
        for gap in (0, 3):
            ids = np.where(np.arange(n) >= b, 1 + gap, 0).astype(np.int64)
            count = 4 + gap
            offsets = _offsets_of(ids, count)
            want = segment_logsumexp(x, offsets=offsets)
            assert want[0] == -np.inf if b == 0 else np.isclose(want[0], sp.logsumexp(x[:b]))
            for threads in (1, 2):
                got = _with_threads(threads, segment_logsumexp, x, ids, count, sorted=True)
                np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"b={b} gap={gap}")


@pytest.mark.parametrize("n", [300, 3 * ID_PIECE + 100])
def test_sorted_ids_name_exactly_the_first_unsorted_position(n):
    base = (5 + np.arange(n) // 7).astype(np.int64)
    count = int(base[-1]) + 1
    x = np.zeros(n, np.float32)
    for p in _positions(n):
        if p == 0:
            continue
        ids = base.copy()
        ids[p] = ids[p - 1] - 1
        # Later offences, in the same block and in later pieces, must not be named instead.
        for q in (p + 3, p + 64, p + ID_PIECE):
            if q < n:
                ids[q] = ids[q - 1] - 2
        msg = rf"segment_ids\[{p}\] = {ids[p]} is smaller than segment_ids\[{p - 1}\] = "
        msg += str(ids[p - 1])
        for threads in (1, 2):
            with pytest.raises(ValueError, match=msg):
                _with_threads(threads, segment_logsumexp, x, ids, count, sorted=True)
        with pytest.raises(ValueError, match=msg):
            segment_softmax(x, ids, count, sorted=True)


@pytest.mark.parametrize("n", [200, ID_PIECE + 80])
def test_sorted_ids_name_an_out_of_range_id_at_every_position_of_a_vector(n):
    base = (np.arange(n) // 5).astype(np.int64)
    count = int(base[-1]) + 1
    x = np.zeros(n)
    for p in _positions(n):
        for bad in (-1, count, 2**62):
            ids = base.copy()
            ids[p] = bad
            if p + 9 < n:
                ids[p + 9] = -7
            msg = rf"segment_ids\[{p}\] = {bad} is outside \[0, {count}\)"
            for threads in (1, 2):
                with pytest.raises(IndexError, match=msg):
                    _with_threads(threads, segment_logsumexp, x, ids, count, sorted=True)


def test_sorted_ids_starting_with_minus_one_raise_instead_of_dropping_rows():
    x = np.array([5.0, 1.0, 2.0])
    for ids in ([-1, 0, 0], [-1, -1, 0], [-1, -1, -1]):
        with pytest.raises(IndexError, match=r"segment_ids\[0\] = -1 is outside \[0, 1\)"):
            segment_logsumexp(x, ids, 1, sorted=True)


def test_sorted_ids_with_gaps_and_spare_segments_equal_offsets_bitwise():
    # Runs of 1..70 rows with gaps of up to 40 empty segments, num_segments well past the
    # largest id, over several pieces: logsumexp, softmax and log_softmax from the ids equal
    # those from the offsets, bitwise, for 1 and 2 threads.
    rng = np.random.default_rng(17)
    lengths = rng.integers(1, 71, 6000)
    lengths[rng.random(lengths.size) < 0.3] = 0
    lengths[rng.integers(0, lengths.size, 30)] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    offsets = np.concatenate([offsets, np.full(50, offsets[-1])])
    count = offsets.size - 1
    x = (rng.standard_normal(offsets[-1]) * 5).astype(np.float32)
    ids = ids_of(offsets).astype(np.int64)
    assert ids.size > 2 * ID_PIECE and int(ids.max()) < count - 40
    np.testing.assert_array_equal(_offsets_of(ids, count), offsets)
    for f in (segment_logsumexp, segment_softmax, segment_log_softmax):
        want = f(x, offsets=offsets)
        for threads in (1, 2):
            got = _with_threads(threads, f, x, ids, count, sorted=True)
            what = f"{f.__name__} {threads} threads"
            np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=what)
