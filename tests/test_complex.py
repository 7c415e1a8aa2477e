"""Complex input: logsumexp, softmax and log_softmax with scipy.special's semantics.

scipy is the oracle for special values, dtypes and shapes; accuracy is checked against a
complex128 reference summed exactly with math.fsum (real and imaginary parts apart).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stablelse

try:
    import scipy
    import scipy.special as _scipy_special
except ImportError:  # the fsum-reference tests still run
    _scipy_special = None


@pytest.fixture(scope="module")
def sp():
    """scipy.special, the oracle; its complex semantics here are those of scipy 1.17."""
    if _scipy_special is None:
        pytest.skip("scipy is not installed")
    if tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 17):
        pytest.skip(f"scipy {scipy.__version__}: complex semantics matched are scipy 1.17's")
    return _scipy_special


INF, NAN = math.inf, math.nan
SPECIALS = [
    -INF,
    INF,
    NAN,
    complex(-INF, 0.0),
    complex(-INF, -0.0),
    complex(-INF, INF),
    complex(-INF, -INF),
    complex(INF, 0.0),
    complex(INF, -0.0),
    complex(INF, INF),
    complex(INF, -INF),
    complex(-INF, 0.7533),
    complex(-INF, 2.3562),
    complex(-INF, 3.9270),
    complex(-INF, 5.4978),
    complex(INF, 0.7533),
    complex(INF, 2.3562),
    complex(INF, 3.9270),
    complex(INF, 5.4978),
    complex(NAN, 1.0),
    complex(1.0, NAN),
    complex(1.0, INF),
    complex(2.0, -3.0),
    0.0,
]


def same(x, y) -> bool:
    """Equal values with NaN in the same places, real and imaginary parts apart."""
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
        return False
    for f in (np.real, np.imag):
        a, b = f(x), f(y)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return False
        if not np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)]):
            return False
    return True


def agree(got, want, rtol: float) -> bool:
    """Non-finite parts placed exactly as in `want` (NaN, signed infinity), finite parts within
    `rtol` (a float64 accumulation is not bit-identical to NumPy's float32 one)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    for f in (np.real, np.imag):
        a, b = f(got).astype(float), f(want).astype(float)
        fin = np.isfinite(a) & np.isfinite(b)
        if not same(np.where(fin, 0, a), np.where(fin, 0, b)):
            return False
        if not np.allclose(a[fin], b[fin], rtol=rtol, atol=rtol):
            return False
    return True


def ulp32(v: float) -> float:
    return float(np.spacing(np.float32(abs(v))))


def fsum_reference(a, b=None):
    """log(sum(b * exp(a))) of one lane in float64, the sum exact (math.fsum on each part)
    over the rounded terms; also the condition number sum|t| / |S|."""
    a = [complex(z) for z in a]
    b = [1.0 + 0j] * len(a) if b is None else [complex(z) for z in b]
    m = max(z.real for z, w in zip(a, b) if w != 0)
    terms = [
        w
        * complex(math.exp(z.real - m) * math.cos(z.imag), math.exp(z.real - m) * math.sin(z.imag))
        for z, w in zip(a, b)
        if w != 0
    ]
    sr = math.fsum(t.real for t in terms)
    si = math.fsum(t.imag for t in terms)
    mag = math.hypot(sr, si)
    cond = math.fsum(abs(t) for t in terms) / mag if mag else math.inf
    return complex(m + math.log(mag), math.atan2(si, sr)), complex(sr / mag, si / mag), cond


# ----------------------------------------------------------------------------- values, dtypes


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize(
    "shape, axis",
    [
        ((7,), None),
        ((5, 33), -1),
        ((5, 33), 0),
        ((4, 3, 6), (0, 2)),
        ((4, 3, 6), (1, 2)),
        ((3, 200), 1),
        ((2, 3, 4), None),
    ],
)
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_matches_scipy(dtype, shape, axis, keepdims, sp):
    rng = np.random.default_rng(sum(shape))
    a = (rng.uniform(-30, 30, shape) + 1j * rng.uniform(-40, 40, shape)).astype(dtype)
    res = stablelse.logsumexp(a, axis=axis, keepdims=keepdims)
    ref = sp.logsumexp(a, axis=axis, keepdims=keepdims)
    assert np.asarray(res).dtype == np.asarray(ref).dtype == dtype
    assert np.shape(res) == np.shape(ref)
    tol = 2e-6 if dtype == np.complex64 else 1e-13
    np.testing.assert_allclose(np.real(res), np.real(ref), rtol=tol, atol=tol)
    # Phases agree modulo 2 pi and lie in (-pi, pi].
    assert np.all(np.abs(np.imag(res)) <= np.pi)
    d = np.angle(np.exp(1j * (np.imag(res).astype(float) - np.imag(ref))))
    assert np.all(np.abs(d) < 50 * tol)


@pytest.mark.parametrize("layout", ["F", "strided", "negative"])
def test_logsumexp_any_layout(layout, sp):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((12, 10)) + 1j * rng.standard_normal((12, 10))
    a = {"F": np.asfortranarray(base), "strided": base[::2, ::3], "negative": base[::-1]}[layout]
    for axis in (0, 1, None, (0, 1)):
        np.testing.assert_allclose(
            stablelse.logsumexp(a, axis=axis), sp.logsumexp(a, axis=axis), rtol=1e-13
        )


def test_return_sign_gives_real_log_and_complex_unit(sp):
    a = np.array([1 + 1j, 2 - 1j, -2 + 3j], dtype=np.complex64)
    r, s = stablelse.logsumexp(a, return_sign=True)
    rr, ss = sp.logsumexp(a, return_sign=True)
    assert type(r) is type(rr) is np.float32
    assert type(s) is type(ss) is np.complex64
    np.testing.assert_allclose(r, rr, rtol=1e-6)
    np.testing.assert_allclose(s, ss, rtol=1e-6)
    np.testing.assert_allclose(
        s * np.exp(np.float64(r)), np.exp(a.astype(complex)).sum(), rtol=1e-6
    )


@pytest.mark.parametrize(
    "a_dtype, b_dtype",
    [
        (da, db)
        for da, db in itertools.product(
            ["complex64", "complex128", "float32", "float64", "int32"],
            ["complex64", "complex128", "float32", "float64", "int64", "bool"],
        )
        if "complex" in da + db  # real pairs take the real path (test_api.py)
    ],
)
def test_weighted_result_dtype_as_scipy(a_dtype, b_dtype, sp):
    a = np.array([2, 1], dtype=a_dtype)
    b = np.array([1, -1j if np.dtype(b_dtype).kind == "c" else 1], dtype=b_dtype)
    res = stablelse.logsumexp(a, b=b)
    ref = sp.logsumexp(a, b=b)
    assert res.dtype == ref.dtype
    tol = 1e-6 if ref.dtype == np.complex64 else 1e-14
    np.testing.assert_allclose(res, ref, rtol=tol)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # scipy's sign
def test_empty_input_is_complex_minus_inf_with_nan_sign(sp):
    a = np.zeros((0,), dtype=np.complex64)
    assert same(stablelse.logsumexp(a), sp.logsumexp(a))
    r, s = stablelse.logsumexp(a, return_sign=True)
    rr, ss = sp.logsumexp(a, return_sign=True)
    assert r.dtype == rr.dtype == np.complex64 and same(r, rr) and same(s, ss)
    a2 = np.zeros((3, 0), dtype=np.complex128)
    assert same(stablelse.logsumexp(a2, axis=1), sp.logsumexp(a2, axis=1))


def test_small_imaginary_part_keeps_relative_precision():
    x = np.array([0, 2.2204460492503132e-17j])
    res = stablelse.logsumexp(x)
    assert res.real == pytest.approx(0.6931471805599453, rel=1e-16)
    assert res.imag == pytest.approx(1.1102230246251566e-17, rel=1e-15)


def test_excess_keeps_tiny_terms():
    # log(1 + e^-40) = 4.25e-18: the excess form keeps it where log(S) rounds to 0.
    assert stablelse.logsumexp(np.array([0j, -40 + 0j])).real == pytest.approx(
        4.248354255291589e-18, rel=1e-14
    )


def test_phase_wraps_into_half_open_interval(sp):
    # A sum on the negative real axis has phase pi, never -pi.
    for a in ([np.pi * 1j], [-np.pi * 1j], [1 + 3j, 1 - 3j], [1 - 3j, 1 + 3j]):
        res = stablelse.logsumexp(np.array(a))
        ref = sp.logsumexp(np.array(a))
        assert -np.pi < res.imag <= np.pi
        assert res == pytest.approx(ref, rel=1e-15)


def test_out_keepdims_and_errors(sp):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((4, 5, 6)) + 1j * rng.standard_normal((4, 5, 6))).astype(np.complex64)
    out = np.empty((4, 1, 6), np.complex64)
    res = stablelse.logsumexp(a, axis=1, keepdims=True, out=out)
    assert res is out
    np.testing.assert_allclose(out, sp.logsumexp(a, axis=1, keepdims=True), rtol=2e-6)
    with pytest.raises(TypeError, match="out has dtype"):
        stablelse.logsumexp(a, axis=1, out=np.empty((4, 6), np.complex128))
    with pytest.raises(ValueError, match="out has shape"):
        stablelse.logsumexp(a, axis=1, out=np.empty((4, 5), np.complex64))
    outr = np.empty((4, 6), np.float32)
    r, s = stablelse.logsumexp(a, axis=1, return_sign=True, out=outr)
    assert r is outr and s.dtype == np.complex64
    with pytest.raises(ValueError, match="overlaps"):
        stablelse.logsumexp(a[:, :1, :], axis=1, out=a[:, 0, :])
    with pytest.raises(ValueError, match="does not broadcast"):
        stablelse.logsumexp(a, b=np.ones(4, np.complex64))
    with pytest.raises(np.exceptions.AxisError):
        stablelse.logsumexp(a, axis=3)


def test_longdouble_complex_keeps_its_dtype(sp):
    a = np.array([1 + 1j, 2 - 1j], dtype=np.clongdouble)
    res = stablelse.logsumexp(a)
    assert res.dtype == np.clongdouble
    assert complex(res) == pytest.approx(complex(sp.logsumexp(a.astype(complex))), rel=1e-15)


def test_bit_identical_for_any_thread_count():
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((64, 3000)) + 1j * rng.standard_normal((64, 3000))).astype(
        np.complex64
    )
    long = rng.standard_normal(300_000) + 1j * rng.standard_normal(300_000)
    before = stablelse.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            stablelse.set_num_threads(n)
            results.append(
                [
                    stablelse.logsumexp(rows, axis=1),
                    stablelse.logsumexp(rows, axis=0),
                    stablelse.logsumexp(long),
                    stablelse.softmax(rows, axis=1),
                    stablelse.log_softmax(rows, axis=0),
                ]
            )
        for other in results[1:]:
            for x, y in zip(results[0], other):
                assert np.array_equal(x, y)
    finally:
        stablelse.set_num_threads(before)


# ----------------------------------------------------------------------------- special values


@pytest.mark.parametrize("x, y", list(itertools.product(SPECIALS, repeat=2)))
def test_special_pairs_match_scipy(x, y, sp):
    with np.errstate(all="ignore"):
        for a in (np.array([x, y]), np.array([x, y, 0.5 - 1j], dtype=np.complex64)):
            a = a.astype(np.result_type(a, np.complex64))
            got, want = stablelse.logsumexp(a), sp.logsumexp(a)
            assert agree(got, want, 1e-6), (got, want)
            (r, s), (rr, ss) = (
                stablelse.logsumexp(a, return_sign=True),
                sp.logsumexp(a, return_sign=True),
            )
            assert agree(r, rr, 1e-6) and agree(s, ss, 1e-6), ((r, s), (rr, ss))
            for f in ("softmax", "log_softmax"):
                got, want = getattr(stablelse, f)(a), getattr(sp, f)(a)
                assert agree(got, want, 1e-5), (f, got, want)


@pytest.mark.parametrize(
    "b",
    [[1, 0, 2], [0, 0, 0], [1j, -1, 0.5], [INF, 1, 1], [NAN, 1, 1], [1, -1, 0], [-2, 1, 1]],
)
@pytest.mark.parametrize(
    "a", [[1 + 1j, INF, 2], [1 + 1j, 1 + 1j, 3j], [-INF, 1j, 2 - 2j], [NAN, 1, 2], [1, 1, 1]]
)
def test_weights_with_specials_match_scipy(a, b, sp):
    a, b = np.array(a, dtype=complex), np.array(b, dtype=complex)
    with np.errstate(all="ignore"):
        got, want = stablelse.logsumexp(a, b=b), sp.logsumexp(a, b=b)
        assert agree(got, want, 1e-14), (got, want)
        (r, s), (rr, ss) = (
            stablelse.logsumexp(a, b=b, return_sign=True),
            sp.logsumexp(a, b=b, return_sign=True),
        )
        assert agree(r, rr, 1e-14) and agree(s, ss, 1e-14), ((r, s), (rr, ss))


# ----------------------------------------------------------------------------- accuracy

finite = st.floats(-60, 60, allow_nan=False, allow_infinity=False, width=32)
lanes = st.lists(st.tuples(finite, finite), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(lanes)
def test_complex64_real_part_within_one_ulp_of_fsum_reference(pairs):
    a = np.array([complex(r, i) for r, i in pairs], dtype=np.complex64)
    ref, ref_sign, cond = fsum_reference(a)
    res = stablelse.logsumexp(a)
    assert res.dtype == np.complex64
    if cond < 1e6:
        # The reference itself is good to about cond * 1e-16 absolute.
        assert abs(float(res.real) - ref.real) <= ulp32(ref.real) + cond * 4e-16 * (
            1 + abs(ref.real)
        )
        d = math.remainder(float(res.imag) - ref.imag, 2 * math.pi)
        assert abs(d) <= ulp32(ref.imag) + cond * 4e-16
        r, s = stablelse.logsumexp(a, return_sign=True)
        assert r.dtype == np.float32
        assert abs(float(r) - ref.real) <= ulp32(ref.real) + cond * 4e-16 * (1 + abs(ref.real))
        assert abs(complex(s) - ref_sign) <= 2 * ulp32(1.0) + cond * 4e-16


@settings(max_examples=200, deadline=None)
@given(lanes, st.lists(st.tuples(finite, finite), min_size=40, max_size=40))
def test_complex128_weighted_against_fsum_reference(pairs, wpairs):
    a = np.array([complex(r, i) for r, i in pairs])
    b = np.array([complex(r, i) for r, i in wpairs[: len(pairs)]])
    if not np.any(b != 0):
        return
    ref, ref_sign, cond = fsum_reference(a, b)
    if cond > 1e6:
        return
    res = stablelse.logsumexp(a, b=b)
    assert abs(res.real - ref.real) <= cond * 1e-14 * (1 + abs(ref.real))
    assert abs(math.remainder(res.imag - ref.imag, 2 * math.pi)) <= cond * 1e-14
    _, s = stablelse.logsumexp(a, b=b, return_sign=True)
    assert abs(s - ref_sign) <= cond * 1e-14


@settings(max_examples=150, deadline=None)
@given(pairs=lanes)
def test_softmax_and_log_softmax_against_fsum_reference(pairs, sp):
    a = np.array([complex(r, i) for r, i in pairs])
    lse, _, cond = fsum_reference(a)
    if cond > 1e6:
        return
    soft = stablelse.softmax(a)
    logs = stablelse.log_softmax(a)
    want = np.exp(a - lse)
    np.testing.assert_allclose(soft, want, rtol=cond * 1e-13, atol=cond * 1e-15)
    np.testing.assert_allclose(np.exp(logs), want, rtol=cond * 1e-13, atol=cond * 1e-15)
    # log_softmax keeps scipy's branch of the imaginary part: x - c with c not wrapped.
    np.testing.assert_allclose(logs, sp.log_softmax(a), rtol=1e-12, atol=cond * 1e-13)


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (1, 2)])
def test_softmax_and_log_softmax_match_scipy(dtype, axis, sp):
    rng = np.random.default_rng(4)
    x = (rng.uniform(-20, 20, (3, 7, 5)) + 1j * rng.uniform(-9, 9, (3, 7, 5))).astype(dtype)
    tol = 2e-5 if dtype == np.complex64 else 1e-12
    for f in ("softmax", "log_softmax"):
        got, want = getattr(stablelse, f)(x, axis=axis), getattr(sp, f)(x, axis=axis)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_log_softmax_top_class_keeps_relative_accuracy():
    x = np.array([1 - np.log(np.finfo(np.float32).eps), 0], dtype=np.complex64)
    got = stablelse.log_softmax(x)
    assert got[0].real == pytest.approx(-math.log1p(math.exp(-float(x[0].real))), rel=1e-6)
    assert got[0].real != 0


def test_softmax_scalar_out_and_in_place(sp):
    assert stablelse.softmax(1 + 2j) == pytest.approx(sp.softmax(1 + 2j))
    x = np.array([[1 + 1j, 2 - 1j], [3j, -1 + 0.5j]])
    want = sp.log_softmax(x, axis=0)
    out = np.empty_like(x)
    assert stablelse.log_softmax(x, axis=0, out=out) is out
    np.testing.assert_allclose(out, want, rtol=1e-14)
    y = x.copy()
    assert stablelse.log_softmax(y, axis=0, out=y) is y
    np.testing.assert_allclose(y, want, rtol=1e-14)
    with pytest.raises(ValueError, match="partially overlaps"):
        stablelse.softmax(x[0], out=x.reshape(-1)[1:3])


@pytest.mark.parametrize("seed", range(4))
def test_random_mixtures_with_specials_match_scipy(seed, sp):
    """Small arrays with a fifth of the elements special (inf, nan, 0 in either part), any
    axis, weights with zeros and infinities: every result agrees with scipy."""
    rng = np.random.default_rng(seed)
    vals = [np.inf, -np.inf, np.nan, 0.0, 1.0, -2.5, 30.0]
    for it in range(100):
        shape = tuple(rng.integers(1, 5, rng.integers(1, 4)))
        dt = (np.complex64, np.complex128)[it % 2]
        a = rng.standard_normal(shape) * 5 + 1j * rng.standard_normal(shape) * 5
        mask = rng.random(shape) < 0.2
        a[mask] = [
            complex(r, i)
            for r, i in zip(rng.choice(vals, mask.sum()), rng.choice(vals, mask.sum()))
        ]
        a = a.astype(dt)
        axis = (None, 0, -1, tuple(range(len(shape))))[it % 4]
        b = rng.choice([0, 1, -1, 2j, np.inf, 0.5], shape).astype(complex) if it % 3 else None
        tol = 1e-4 if dt == np.complex64 else 1e-10
        with np.errstate(all="ignore"):
            for rs in (False, True):
                got = stablelse.logsumexp(a, axis=axis, b=b, return_sign=rs)
                want = sp.logsumexp(a, axis=axis, b=b, return_sign=rs)
                for g, w in zip(got, want) if rs else [(got, want)]:
                    assert agree(g, w, tol), (a, b, axis, rs, g, w)
            for f in ("softmax", "log_softmax"):
                g, w = getattr(stablelse, f)(a, axis=axis), getattr(sp, f)(a, axis=axis)
                assert agree(g, w, tol), (f, a, axis, g, w)


def test_functions_without_complex_support_say_so():
    """The losses, segments and streaming states take real input only; the error names the
    argument and where complex input is taken."""
    x = np.ones((2, 3), complex)
    calls = [
        lambda: stablelse.cross_entropy(x, np.array([0, 1])),
        lambda: stablelse.segment_logsumexp(x[0], np.array([0, 0, 1])),
        lambda: stablelse.LogSumExp(axis=1).update(x),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"is complex \(complex128\); this function takes real"):
            call()
