"""logsumexp / softmax / log_softmax against scipy.special: values, specials, shapes, dtypes,
layouts, out=, and bad arguments."""

import itertools
import math
import threading

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelse as sl

inf, nan = np.inf, np.nan

SPECIAL_ROWS = [
    [inf, 1.0],
    [-inf, -inf],
    [inf, -inf],
    [inf, inf],
    [nan, 1.0],
    [1.0, nan, inf],
    [-inf, nan],
    [-inf, 0.0],
    [1000.0, 1.0, -1000.0],
    [-1000.0, -1000.0],
    [5e-324, 0.0, -5e-324],
    [1.7e308, 1.7e308],
    [-1.7e308, 0.0],
    [3.0],
]


def assert_same(got, want, rtol, atol=0.0):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)])
    np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol)


def scipy_ref(fn, x, **kw):
    """scipy's result computed in float64 and cast to scipy's own result dtype: scipy computes
    float32 in float32 and loses accuracy near 0 (log_softmax of the top class), we do not."""
    with np.errstate(all="ignore"):
        want_dtype = np.asarray(getattr(sp, fn)(x, **kw)).dtype
        want = getattr(sp, fn)(np.asarray(x, dtype=np.float64), **kw)
    return np.asarray(want).astype(want_dtype)


def tol(dtype):
    return 2e-6 if np.dtype(dtype) == np.float32 else 1e-13


AXES = [None, 0, 1, 2, -1, -3, (0, 2), (1, 2), (0, 1), (2, 0), (0, 1, 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_matches_scipy_axes(rng, dtype, axis, keepdims):
    x = (rng.standard_normal((4, 5, 6)) * 10).astype(dtype)
    got = sl.logsumexp(x, axis=axis, keepdims=keepdims)
    want = scipy_ref("logsumexp", x, axis=axis, keepdims=keepdims)
    assert_same(got, want, tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_matches_scipy_axes(rng, dtype, axis, fn):
    x = (rng.standard_normal((4, 5, 6)) * 10).astype(dtype)
    got = getattr(sl, fn)(x, axis=axis)
    want = scipy_ref(fn, x, axis=axis)
    # scipy's float64 log_softmax loses ~1e-16 absolute near 0 (x - max - log(S)); we do not.
    assert_same(got, want, tol(dtype), atol=1e-12 if fn == "softmax" else 1e-15)


@pytest.mark.parametrize("row", SPECIAL_ROWS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_rows_match_scipy(row, dtype):
    x = np.array(row, dtype=np.float64)
    if dtype == np.float32 and np.any(np.abs(x[np.isfinite(x)]) > 3e38):
        pytest.skip(reason="value not representable in float32")
    x = x.astype(dtype)
    with np.errstate(all="ignore"):
        for fn in ["logsumexp", "softmax", "log_softmax"]:
            got, want = getattr(sl, fn)(x), scipy_ref(fn, x)
            assert_same(got, want, tol(dtype), atol=1e-300)
        got = sl.logsumexp(x, return_sign=True)
        want = sp.logsumexp(x, return_sign=True)
        for g, w in zip(got, want):
            assert_same(g, w, tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_rows_in_a_batch_and_as_columns(dtype):
    rows = [r for r in SPECIAL_ROWS if len(r) == 2]
    with np.errstate(all="ignore"):
        x = np.array(rows, dtype=np.float64).clip(-3e38, 3e38).astype(dtype)
        for fn in ["logsumexp", "softmax", "log_softmax"]:
            assert_same(getattr(sl, fn)(x, axis=1), scipy_ref(fn, x, axis=1), tol(dtype), 1e-300)
            assert_same(
                getattr(sl, fn)(x.T, axis=0), scipy_ref(fn, x.T, axis=0), tol(dtype), 1e-300
            )


def test_empty_inputs():
    # scipy 1.17 raises IndexError for axis=None on an empty 2-D array; its 1-D answer is -inf.
    x = np.zeros((3, 0))
    assert sl.logsumexp(x) == -inf
    assert sl.logsumexp(x, return_sign=True) == (-inf, -1.0)
    assert sl.logsumexp(x, keepdims=True).shape == (1, 1)
    # Empty arrays whose strides are all 0 (NumPy gives them for some shapes).
    z = np.zeros((0, 1, 2), np.float32)
    assert sl.logsumexp(z, axis=1).shape == (0, 2)
    assert sl.softmax(z, axis=1).shape == (0, 1, 2)
    for shape, axis in [((0,), None), ((0, 3), 0), ((0, 3), 1), ((3, 0), 1), ((3, 0), 0)]:
        x = np.zeros(shape)
        assert_same(sl.logsumexp(x, axis=axis), sp.logsumexp(x, axis=axis), 0)
        assert_same(
            sl.logsumexp(x, axis=axis, keepdims=True), sp.logsumexp(x, axis=axis, keepdims=True), 0
        )
        for g, w in zip(
            sl.logsumexp(x, axis=axis, return_sign=True),
            sp.logsumexp(x, axis=axis, return_sign=True),
        ):
            assert_same(g, w, 0)
        # scipy's softmax raises on empty input; stablelse returns an empty result.
        assert sl.softmax(x, axis=axis).shape == shape
        assert sl.log_softmax(x, axis=axis).shape == shape


def test_scalars_lists_and_zero_d():
    assert sl.logsumexp(3.0) == sp.logsumexp(3.0)
    assert type(sl.logsumexp(3.0)) is type(sp.logsumexp(3.0))
    assert sl.logsumexp([1, 2, 3]) == pytest.approx(sp.logsumexp([1, 2, 3]), rel=1e-15)
    assert sl.softmax(3.0) == 1.0
    assert sl.log_softmax(np.float32(2.0)) == 0.0
    assert np.asarray(sl.log_softmax(np.float32(2.0))).dtype == np.float32
    assert sl.logsumexp(np.array(2.0), keepdims=True).shape == (1,)


@pytest.mark.parametrize(
    "dtype,expected",
    [
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.float16, np.float16),
        (np.int8, np.float64),
        (np.int32, np.float64),
        (np.int64, np.float64),
        (np.uint16, np.float64),
        (np.bool_, np.float64),
    ],
)
def test_result_dtypes(dtype, expected):
    x = np.array([[1, 0, 1], [0, 1, 1]]).astype(dtype)
    assert np.asarray(sl.logsumexp(x, axis=1)).dtype == expected
    assert sl.softmax(x, axis=1).dtype == expected
    assert sl.log_softmax(x, axis=1).dtype == expected
    ref = sp.logsumexp(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(sl.logsumexp(x, axis=1).astype(np.float64), ref, rtol=1e-3)


def test_big_endian_and_longdouble():
    x = np.arange(12.0).reshape(3, 4)
    be = x.astype(">f8")
    np.testing.assert_array_equal(sl.logsumexp(be, axis=1), sl.logsumexp(x, axis=1))
    ld = x.astype(np.longdouble)
    assert sl.softmax(ld, axis=1).dtype == np.longdouble


def test_object_and_strings_raise_type_error():
    with pytest.raises(TypeError, match="real numeric"):
        sl.softmax(np.array(["a", "b"]))
    with pytest.raises(TypeError):
        sl.log_softmax(np.array([object()]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_and_signs_match_scipy(rng, dtype):
    a = rng.standard_normal((3, 4, 5)).astype(dtype) * 5
    bs = [
        rng.standard_normal((3, 4, 5)).astype(dtype),
        np.abs(rng.standard_normal((4, 5))).astype(dtype),  # broadcast over axis 0
        rng.standard_normal((5,)).astype(dtype),
        np.array(2.0, dtype=dtype),
        (rng.random((3, 4, 5)) > 0.5).astype(dtype),  # zero weights
    ]
    for b, axis, keep in itertools.product(bs, [None, 0, 2, (0, 2), (1, 2)], [False, True]):
        with np.errstate(all="ignore"):
            want = sp.logsumexp(a, axis=axis, b=b, keepdims=keep, return_sign=True)
        got = sl.logsumexp(a, axis=axis, b=b, keepdims=keep, return_sign=True)
        assert_same(got[1], want[1], 0)
        assert_same(got[0], want[0], 1e-5 if dtype == np.float32 else 1e-11)
        with np.errstate(all="ignore"):
            want_nosign = sp.logsumexp(a, axis=axis, b=b, keepdims=keep)
        got_nosign = sl.logsumexp(a, axis=axis, b=b, keepdims=keep)
        assert_same(got_nosign, want_nosign, 1e-5 if dtype == np.float32 else 1e-11)


def test_weight_special_cases_match_scipy():
    cases = [
        ([1, 2], [1, -1]),
        ([1, 1], [1, -1]),
        ([inf, 1], [0, 1]),
        ([inf, 1], [-1, 1]),
        ([nan, 1], [0, 1]),
        ([-inf, -inf], [1, 1]),
        ([1000, 1000, 999], [1, -1, 1]),
        ([2, 1], [1, nan]),
        ([-inf, 1], [1, 0]),
    ]
    for a, b in cases:
        a, b = np.array(a, dtype=float), np.array(b, dtype=float)
        with np.errstate(all="ignore"):
            want = sp.logsumexp(a, b=b, return_sign=True)
            want1 = sp.logsumexp(a, b=b)
        got = sl.logsumexp(a, b=b, return_sign=True)
        assert_same(got[0], want[0], 1e-14)
        assert_same(got[1], want[1], 0)
        assert_same(sl.logsumexp(a, b=b), want1, 1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (0, 4), (4, 0), (3, 0, 2)])
def test_weights_of_the_inputs_layout_take_the_reshape_path_with_the_same_bits(rng, dtype, shape):
    """C-ordered `a` and `b` of one shape and dtype, reduced over trailing axes, reach the
    kernel as reshapes; a strided `b` of the same values takes the general path. Results,
    signs, shapes, dtypes and scalar-ness must agree bit for bit (inf, negative sums, empty
    axes included)."""
    a = (rng.standard_normal(shape) * 3).astype(dtype)
    b = rng.standard_normal(shape).astype(dtype)
    if a.size > 3:
        a.flat[0] = np.inf
    strided = np.empty(shape + (2,), dtype)[..., 0]
    strided[...] = b
    nd = len(shape)
    axes = [None, -1, 0, *[tuple(range(k, nd)) for k in range(nd)]]
    for axis, keep, sign in itertools.product(axes, [False, True], [False, True]):
        with np.errstate(all="ignore"):
            got = sl.logsumexp(a, axis=axis, b=b, keepdims=keep, return_sign=sign)
            want = sl.logsumexp(a, axis=axis, b=strided, keepdims=keep, return_sign=sign)
        pairs = zip(got, want) if sign else [(got, want)]
        for u, v in pairs:
            assert type(u) is type(v) and np.shape(u) == np.shape(v)
            assert np.asarray(u).dtype == np.asarray(v).dtype
            np.testing.assert_array_equal(u, v)


def test_b_mixed_precision_promotes():
    a = np.arange(4, dtype=np.float32)
    out = sl.logsumexp(a, b=np.ones(4, dtype=np.float64))
    assert np.asarray(out).dtype == np.float64
    with pytest.raises(ValueError, match="broadcast"):
        sl.logsumexp(a, b=np.ones(3))


def layouts(x):
    """The same values in C order, Fortran order, strided, negative-strided and
    unaligned layouts."""
    yield "C", np.ascontiguousarray(x)
    yield "F", np.asfortranarray(x)
    big = np.zeros((x.shape[0] * 2, x.shape[1] * 3, x.shape[2]), dtype=x.dtype)
    big[::2, ::3] = x
    yield "strided", big[::2, ::3]
    yield "negative", np.ascontiguousarray(x[::-1, :, ::-1])[::-1, :, ::-1]
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    un = raw[1:].view(x.dtype).reshape(x.shape)
    un[...] = x
    assert not un.flags.aligned
    yield "unaligned", un
    pitch = np.zeros(x.shape[:2] + (x.shape[2] + 3,), dtype=x.dtype)
    pitch[:, :, : x.shape[2]] = x
    yield "row-pitch", pitch[:, :, : x.shape[2]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layout_gives_the_same_answer(rng, dtype):
    x = (rng.standard_normal((3, 4, 7)) * 4).astype(dtype)
    for fn in ["logsumexp", "softmax", "log_softmax"]:
        for axis in [None, 0, 1, 2, (0, 2)]:
            want = scipy_ref(fn, x, axis=axis)
            for name, v in layouts(x):
                before = v.copy()
                got = getattr(sl, fn)(v, axis=axis)
                assert_same(got, want, tol(dtype), atol=1e-12)
                np.testing.assert_array_equal(v, before, err_msg=f"{name} input was written")


def test_fortran_softmax_keeps_fortran_order():
    x = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    assert sl.softmax(x, axis=0).flags.f_contiguous


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_out_and_in_place(rng, fn):
    x = rng.standard_normal((6, 9)).astype(np.float32)
    want = scipy_ref(fn, x, axis=1)
    out = np.empty_like(x)
    res = getattr(sl, fn)(x, axis=1, out=out)
    assert res is out
    assert_same(out, want, 2e-6, 1e-12)
    # In place: out is the input itself.
    y = x.copy()
    res = getattr(sl, fn)(y, axis=1, out=y)
    assert res is y
    np.testing.assert_array_equal(y, out)
    # In place over columns and over a Fortran array.
    y = x.copy()
    getattr(sl, fn)(y, axis=0, out=y)
    assert_same(y, scipy_ref(fn, x, axis=0), 2e-6, 1e-12)
    f = np.asfortranarray(x)
    getattr(sl, fn)(f, axis=1, out=f)
    assert_same(f, want, 2e-6, 1e-12)
    # A non-contiguous out and a strided in-place update.
    big = np.zeros((6, 18), dtype=np.float32)
    getattr(sl, fn)(x, axis=1, out=big[:, ::2])
    assert_same(big[:, ::2], want, 2e-6, 1e-12)
    big[:, ::2] = x
    v = big[:, ::2]
    getattr(sl, fn)(v, axis=1, out=v)
    assert_same(big[:, ::2], want, 2e-6, 1e-12)
    # float16 input with float16 out.
    h = x.astype(np.float16)
    oh = np.empty_like(h)
    getattr(sl, fn)(h, axis=1, out=oh)
    want_h = getattr(sp, fn)(h.astype(np.float32), axis=1)
    np.testing.assert_allclose(oh, want_h, rtol=2e-3, atol=1e-3)


def test_logsumexp_out(rng):
    x = rng.standard_normal((5, 7))
    out = np.empty(5)
    assert sl.logsumexp(x, axis=1, out=out) is out
    assert_same(out, sp.logsumexp(x, axis=1), 1e-14)
    out = np.empty((1, 7))
    sl.logsumexp(x, axis=0, keepdims=True, out=out)
    assert_same(out, sp.logsumexp(x, axis=0, keepdims=True), 1e-14)
    out = np.empty(())
    sl.logsumexp(x, out=out)
    assert_same(out, np.asarray(sp.logsumexp(x)), 1e-14)
    res, sgn = sl.logsumexp(x, axis=1, out=np.empty(5), return_sign=True)
    assert_same(sgn, np.ones(5), 0)


def test_bad_out_raises_and_writes_nothing(rng):
    x = rng.standard_normal((4, 5))
    with pytest.raises(ValueError, match="shape"):
        sl.softmax(x, axis=1, out=np.empty((5, 4)))
    with pytest.raises(TypeError, match="dtype"):
        sl.softmax(x, axis=1, out=np.empty((4, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="ndarray"):
        sl.softmax(x, axis=1, out=[[0.0] * 5] * 4)
    ro = np.zeros((4, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        sl.log_softmax(x, axis=1, out=ro)
    assert not ro.any()
    buf = np.zeros((5, 5))
    buf[:4] = x
    with pytest.raises(ValueError, match="overlap"):
        sl.softmax(buf[:4], axis=1, out=buf[1:])
    np.testing.assert_array_equal(buf[:4], x)
    with pytest.raises(ValueError, match="overlap"):
        sl.logsumexp(buf, axis=1, out=buf[:, 0])
    with pytest.raises(ValueError, match="shape"):
        sl.logsumexp(x, axis=1, out=np.empty(5))


@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_bad_axis_raises(fn):
    x = np.ones((2, 3))
    f = getattr(sl, fn)
    with pytest.raises(np.exceptions.AxisError, match="axis 2 is out of bounds"):
        f(x, axis=2)
    with pytest.raises(ValueError):
        f(x, axis=-3)
    with pytest.raises(ValueError, match="duplicate"):
        f(x, axis=(0, 0))
    with pytest.raises(TypeError, match="axis"):
        f(x, axis=1.5)
    with pytest.raises(ValueError, match="algorithm"):
        f(x, algorithm="fast")


def test_log_softmax_top_class_relative_accuracy():
    # scipy issue 19521
    eps = np.finfo(np.float32).eps
    x = np.array([1 - np.log(eps), 0], dtype=np.float32)
    got = sl.log_softmax(x)
    exact = -math.log1p(math.exp(-float(x[0])))
    assert got[0] != 0
    assert abs(float(got[0]) - exact) <= 0.5 * abs(exact) * eps
    assert sl.logsumexp(np.array([0.0, -40.0])) == pytest.approx(4.248354255291589e-18, rel=1e-15)


@pytest.mark.parametrize("algorithm", ["two_pass", "online"])
def test_float32_results_are_rounded_once(rng, algorithm):
    for n in list(range(1, 70)) + [1000, 100_000]:
        x = (rng.standard_normal(n) * 30).astype(np.float32)
        exact = math.log(math.fsum(math.exp(v - float(x.max())) for v in x.astype(float))) + float(
            x.max()
        )
        got = sl.logsumexp(x, algorithm=algorithm)
        ulp = np.spacing(np.float32(abs(exact)))
        assert abs(float(got) - exact) <= 0.5 * ulp + 1e-12 * abs(exact), (n, got, exact)


def test_algorithms_agree(rng):
    x = rng.standard_normal((7, 300)).astype(np.float32)
    for fn in ["logsumexp", "softmax", "log_softmax"]:
        a = getattr(sl, fn)(x, axis=1, algorithm="two_pass")
        b = getattr(sl, fn)(x, axis=1, algorithm="online")
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-30)


def test_bit_identical_for_any_thread_count(rng):
    x = rng.standard_normal((64, 3000)).astype(np.float32) * 20
    long_row = rng.standard_normal(300_000).astype(np.float32) * 20
    # Rows long enough to be blocked: a row per task with 1 and 2 threads, one row at a time
    # with its blocks in parallel with 3 (fewer than four rows a thread); float64, whose
    # results show the order the blocks merge in.
    long_rows = rng.standard_normal((9, 140_000)) * 20
    results = []
    try:
        for threads in [1, 2, 3]:
            sl.set_num_threads(threads)
            assert sl.get_num_threads() == threads
            results.append(
                [
                    sl.logsumexp(x, axis=1),
                    sl.softmax(x, axis=1),
                    sl.log_softmax(x, axis=0),
                    sl.logsumexp(long_row),
                    sl.softmax(long_row),
                    sl.logsumexp(long_rows, axis=1),
                    sl.softmax(long_rows, axis=1),
                    sl.log_softmax(long_rows, axis=1),
                ]
            )
        one_by_one = [
            np.stack([f(row) for row in long_rows])
            for f in (sl.logsumexp, sl.softmax, sl.log_softmax)
        ]
    finally:
        sl.set_num_threads(0)

    def bits(a):
        return np.ascontiguousarray(a).view(np.uint8)

    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(bits(a), bits(b))
    for a, b in zip(results[0][-3:], one_by_one):
        assert np.array_equal(bits(a), bits(b))


def test_set_num_threads_validates():
    with pytest.raises(ValueError):
        sl.set_num_threads(-1)
    with pytest.raises(TypeError):
        sl.set_num_threads(1.5)


def test_many_python_threads(rng):
    x = rng.standard_normal((32, 513)).astype(np.float32)
    want = sl.softmax(x, axis=1)
    errors = []

    def work():
        try:
            for _ in range(50):
                np.testing.assert_array_equal(sl.softmax(x, axis=1), want)
                sl.logsumexp(x, axis=0)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_info():
    info = sl.info()
    assert info["simd"] in info["simd_available"]
    assert info["threads"] >= 1
    assert info["version"] == sl.__version__


# --------------------------------------------------------------------------- properties

finite = st.floats(-80, 80, allow_nan=False, width=64)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9), elements=finite),
    st.floats(-500, 500),
)
def test_shift_invariance(x, c):
    np.testing.assert_allclose(sl.logsumexp(x + c), sl.logsumexp(x) + c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sl.softmax(x + c, axis=-1), sl.softmax(x, axis=-1), atol=1e-12)
    s = sl.softmax(x, axis=-1)
    np.testing.assert_allclose(s.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.exp(sl.log_softmax(x, axis=-1)), s, rtol=1e-10, atol=1e-300)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-1e4, 1e4, width=32)))
def test_float32_matches_scipy_float64(x):
    want = sp.logsumexp(x.astype(np.float64))
    got = sl.logsumexp(x)
    assert abs(float(got) - want) <= np.spacing(np.float32(abs(want))) * 0.5 + 1e-30


def test_threadpoolctl_limits_stablelse():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    sl.set_num_threads(2)
    try:
        infos = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "stablelse"]
        assert len(infos) == 1 and infos[0]["num_threads"] == 2
        with threadpoolctl.threadpool_limits(limits=1, user_api="stablelse"):
            assert sl.get_num_threads() == 1
        assert sl.get_num_threads() == 2
    finally:
        sl.set_num_threads(0)


def _child_softmax(x):
    return sl.softmax(x, axis=1)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_fork_after_the_pool_was_used(rng):
    import multiprocessing as mp

    x = rng.standard_normal((256, 4096)).astype(np.float32)  # large enough to use the pool
    want = sl.softmax(x, axis=1)
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map_async(_child_softmax, [x, x]).get(timeout=60)
    for r in results:
        np.testing.assert_array_equal(r, want)
