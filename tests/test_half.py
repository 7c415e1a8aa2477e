"""float16 and bfloat16 inputs: computed in float32 block by block, returned in their own type.

The conversions are checked over every 16-bit pattern (and every float32 rounding boundary)
against NumPy's and ml_dtypes' casts; the results against a float64 reference rounded to the
input's type, and bit for bit against the float32 computation on a converted copy, over every
layout, ``out=`` and thread count.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numpy as np
import oracles
import pytest

import stablelse as sl
from stablelse import _core

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # optional test dependency
    ml_dtypes = None
    BF16 = None

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed")
CONVERSIONS, DEFAULT_CONVERSION = _core.half_conversions()
HALF_DTYPES = [np.dtype(np.float16), pytest.param(BF16, marks=needs_bf16, id="bfloat16")]
FUNCS = {"logsumexp": sl.logsumexp, "softmax": sl.softmax, "log_softmax": sl.log_softmax}


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _same(a, b) -> None:
    """Bit-identical arrays of the same dtype and shape (NaNs included)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(_bits(a), _bits(b))


def _all_halves() -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _float32_boundaries() -> np.ndarray:
    """Every finite float16 value, the midpoints between neighbours (float32 exact) and one
    float32 ULP either side of each, plus 2^20 random float32 bit patterns and specials."""
    h = _all_halves().view(np.float16).astype(np.float64)
    h = np.sort(h[np.isfinite(h)])
    mids = ((h[1:] + h[:-1]) / 2).astype(np.float32)
    pts = np.concatenate([h.astype(np.float32), mids, [65520.0, 65536.0, 2.0**-25, 2.0**-26]])
    pts = np.concatenate([pts, -pts]).astype(np.float32)
    b = pts.view(np.uint32)
    rand = np.random.default_rng(7).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    return np.concatenate(
        [pts, (b + 1).view(np.float32), (b - 1).view(np.float32),
         rand.astype(np.uint32).view(np.float32),
         np.array([np.inf, -np.inf, np.finfo(np.float32).max, np.finfo(np.float32).tiny],
                  dtype=np.float32)]
    )


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_float16_widens_exactly_for_every_bit_pattern(conversion):
    # Catches a wrong exponent rebias, a subnormal decoded as normal, a lost sign or payload.
    bits = _all_halves()
    got = _core.half_to_float32(bits, False, conversion)
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(np.signbit(got[nan]), np.signbit(want[nan]))


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_float32_rounds_to_float16_as_numpy(conversion):
    # Catches truncation instead of round-to-nearest-even, ties rounded away from even, a
    # subnormal result flushed to zero, 65520 not overflowing, NaN turned into infinity.
    x = _float32_boundaries()
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = _core.float32_to_half(x, False, conversion)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    back = got[nan].view(np.float16)
    assert np.isnan(back).all()
    np.testing.assert_array_equal(np.signbit(back), np.signbit(x[nan]))


def test_vector_conversions_equal_the_portable_one_bit_for_bit():
    # Catches a SIMD path that differs from the portable one (NaN payloads included), which
    # would make results depend on the machine.
    bits, x = _all_halves(), _float32_boundaries()
    w0 = _core.half_to_float32(bits, False, "portable")
    n0 = _core.float32_to_half(x, False, "portable")
    for c in CONVERSIONS:
        _same(_core.half_to_float32(bits, False, c), w0)
        _same(_core.float32_to_half(x, False, c), n0)


@needs_bf16
def test_bfloat16_conversions_match_ml_dtypes():
    # Catches truncation instead of rounding, a carry that misses the exponent, a NaN
    # rounded to infinity.
    bits = _all_halves()
    got = _core.half_to_float32(bits, True)
    want = bits.view(BF16).astype(np.float32)
    _same(got, want)  # a shift: exact, payloads included
    x = np.concatenate([_float32_boundaries(), want[np.isfinite(want)] * np.float32(1 + 2**-8)])
    x = x.astype(np.float32)
    got = _core.float32_to_half(x, True)
    with np.errstate(invalid="ignore"):
        want = x.astype(BF16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(BF16).astype(np.float32)).all()


# --------------------------------------------------------------------------- results


def _reference(name: str, x: np.ndarray, axis) -> np.ndarray:
    x64 = x.astype(np.float32).astype(np.float64)
    if name == "logsumexp":
        return oracles.logsumexp(x64, axis)
    return getattr(oracles, name)(x64, axis)


def _check_rounded_once(got: np.ndarray, ref: np.ndarray, dtype: np.dtype) -> None:
    """`got` is `ref` rounded to `dtype`, or (within a float32 ULP of a midpoint) the other
    neighbour: 0.5 ULP of `dtype` plus 1 float32 ULP. Values below the float64 reference's own
    rounding error (the top class of a log_softmax, ``-log1p(tiny)``) pass when within it."""
    ref = np.asarray(ref)
    got64 = np.asarray(got).astype(np.float32).astype(np.float64)
    near = ref.astype(dtype).astype(np.float32).astype(np.float64)
    ok = got64 == near
    ok |= np.isnan(got64) & np.isnan(near)
    spacing = np.abs(np.spacing(ref.astype(np.float32))).astype(np.float64)
    ok |= np.abs(got64 - ref) <= np.abs(near - ref) + 2 * spacing
    finite = ref[np.isfinite(ref)]
    ok |= np.abs(got64 - ref) <= 1e-14 * (1 + np.abs(finite).max(initial=0))
    assert ok.all(), (got64[~ok][:5], np.asarray(ref)[~ok][:5])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", sorted(FUNCS))
@pytest.mark.parametrize("shape, axis", [((300, 70), -1), ((70, 300), 0), ((5, 6, 7), (0, 2)),
                                         ((4000,), None), ((3, 50000), 1)])
def test_within_half_an_ulp_of_the_float64_reference(rng, dtype, name, shape, axis):
    # Catches a result rounded twice through a coarse type, a conversion error, a float32
    # kernel fed the wrong elements.
    scale = 30.0 if dtype == BF16 else 8.0
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    got = FUNCS[name](x, axis=axis)
    assert np.asarray(got).dtype == dtype
    _check_rounded_once(got, _reference(name, x, axis), dtype)


def _layouts(x: np.ndarray):
    """Views of `x` (2-D) in several layouts, all of the same values."""
    yield "C", x
    yield "F", np.asfortranarray(x)
    big = np.zeros((x.shape[0] * 2, x.shape[1] * 3), dtype=x.dtype)
    big[::2, ::3] = x
    yield "strided", big[::2, ::3]
    yield "reversed", np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1]
    raw = np.zeros(x.size * 2 + 1, dtype=np.uint8)[1:].view(x.dtype).reshape(x.shape)
    raw[...] = x
    yield "misaligned", raw


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", sorted(FUNCS))
@pytest.mark.parametrize("axis", [0, 1, (0, 1), None])
def test_every_layout_equals_float32_rounded(rng, dtype, name, axis):
    # Widening is exact and the float32 kernels give the same values on every path, so each
    # result must be the float32 result rounded, bit for bit: catches a block converted with
    # the wrong stride or offset, a lane left unconverted, a scatter that writes float32 bits.
    x = (rng.standard_normal((37, 300)) * 6).astype(dtype)
    f = FUNCS[name]
    want = np.asarray(f(x.astype(np.float32), axis=axis)).astype(dtype)
    for label, v in _layouts(x):
        got = f(v, axis=axis)
        assert np.asarray(got).dtype == dtype, label
        _same(got, want)
        if name == "logsumexp" and axis is not None:
            _same(f(v, axis=axis, keepdims=True),
                  np.asarray(f(x.astype(np.float32), axis=axis, keepdims=True)).astype(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_out_of_any_layout_and_in_place(rng, dtype, name):
    # Catches an out written as float32, a partially written out, in place that reads an
    # element after it was overwritten.
    x = (rng.standard_normal((40, 90)) * 5).astype(dtype)
    f = FUNCS[name]
    for axis in (0, 1, None):
        want = np.asarray(f(x.astype(np.float32), axis=axis)).astype(dtype)
        for label, o in _layouts(np.zeros_like(x)):
            res = f(x, axis=axis, out=o)
            assert res is o, label
            _same(np.ascontiguousarray(o), want)
        for label, v in _layouts(x):
            v = v.copy() if label == "C" else v
            res = f(v, axis=axis, out=v)
            assert res is v
            _same(np.ascontiguousarray(v), want)
            v[...] = x  # restore the shared buffer of the next view


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_logsumexp_out_and_keepdims(rng, dtype):
    x = (rng.standard_normal((6, 7, 8)) * 5).astype(dtype)
    for axis, keepdims in [((0, 2), False), ((0, 2), True), (1, True), (None, False)]:
        want = np.asarray(sl.logsumexp(x.astype(np.float32), axis=axis, keepdims=keepdims))
        want = want.astype(dtype)
        out = np.zeros(want.shape[::-1], dtype=dtype).T
        res = sl.logsumexp(x, axis=axis, keepdims=keepdims, out=out)
        assert res is out or (out.ndim == 0 and res == out[()])
        _same(out.copy(), want)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_result_dtypes_as_scipy(dtype):
    # scipy.special returns the input's float type for float16 (and bfloat16 for softmax).
    x = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=dtype)
    for f in FUNCS.values():
        assert np.asarray(f(x, axis=1)).dtype == dtype
        assert np.asarray(f(x[0, 0])).dtype == dtype  # 0-d: the general path
    r, s = sl.logsumexp(x, axis=1, return_sign=True)
    assert r.dtype == dtype and s.dtype == dtype
    r = sl.logsumexp(x, axis=1, b=np.ones(3, dtype=dtype))
    assert r.dtype == dtype
    np.testing.assert_allclose(r.astype(np.float32), sl.logsumexp(x.astype(np.float32), axis=1),
                               rtol=1e-2)
    swapped = x.astype(x.dtype.newbyteorder(">")) if dtype.kind == "f" else x
    _same(sl.softmax(swapped, axis=1), sl.softmax(x, axis=1))


def test_out_of_another_dtype_is_refused():
    x = np.ones((3, 4), dtype=np.float16)
    with pytest.raises(TypeError, match="out has dtype float32, expected float16"):
        sl.softmax(x, axis=1, out=np.empty((3, 4), np.float32))
    with pytest.raises(TypeError, match="out has dtype float32, expected float16"):
        sl.logsumexp(x, axis=1, out=np.empty(3, np.float32))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_special_values(dtype):
    # As the float32 path: -inf rows, +inf, NaN; and the largest float16 stays finite.
    inf, nan = np.inf, np.nan
    x = np.array([[-inf, -inf], [inf, 0.0], [nan, 1.0], [0.0, -inf]], dtype=dtype)
    for name, f in FUNCS.items():
        want = np.asarray(f(x.astype(np.float32), axis=1)).astype(dtype)
        np.testing.assert_array_equal(np.asarray(f(x, axis=1)).astype(np.float32),
                                      want.astype(np.float32), err_msg=name)
    if dtype == np.float16:
        assert sl.logsumexp(np.array([65504.0, 65504.0], np.float16)) == np.float16(65504.0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_long_lanes_and_columns(rng, dtype):
    # Lanes longer than twice the kernels' long-row block stream through one block: rows
    # (contiguous runs) and columns (one element per run).
    n = 2 * (1 << 16) + 37
    x = (rng.standard_normal((n, 2)) * 4).astype(dtype)
    for name, f in FUNCS.items():
        for v, axis in ((x, 0), (np.ascontiguousarray(x.T), 1)):
            want = np.asarray(f(v.astype(np.float32), axis=axis)).astype(dtype)
            _same(f(v, axis=axis), want)
            if name != "logsumexp":
                y = v.copy()
                assert f(y, axis=axis, out=y) is y  # in place, chunk by chunk
                _same(y, want)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_bit_identical_for_any_thread_count(rng, dtype):
    # Catches per-thread buffers that leak between blocks or a block split that depends on
    # the thread count.
    x = (rng.standard_normal((300, 1000)) * 5).astype(dtype)
    views = [x, x.T, x[:, ::3], np.asfortranarray(x)]
    try:
        sl.set_num_threads(1)
        one = [[f(v, axis=a) for v in views for a in (0, 1)] for f in FUNCS.values()]
        sl.set_num_threads(4)
        four = [[f(v, axis=a) for v in views for a in (0, 1)] for f in FUNCS.values()]
    finally:
        sl.set_num_threads(0)
    for r1, r4 in zip(one, four):
        for a, b in zip(r1, r4):
            _same(a, b)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_lane_states_of_half_arrays(rng, dtype):
    x = (rng.standard_normal((20, 30)) * 4).astype(dtype)
    for got, want in zip(_core.lse_states(x, (1,)), _core.lse_states(x.astype(np.float32), (1,))):
        _same(got, want)


@pytest.mark.parametrize("name", ["softmax", "logsumexp"])
def test_no_input_sized_copy(name):
    # A float32 copy of the input (the old path) is 2x the input's bytes; NumPy reports its
    # allocations to tracemalloc, the kernels' per-thread buffers are a few hundred KiB.
    x = np.random.default_rng(1).standard_normal(1 << 22).astype(np.float16).reshape(1024, -1)
    out = np.empty_like(x) if name == "softmax" else np.empty(1024, np.float16)
    f = FUNCS[name]
    f(x, axis=1, out=out)
    tracemalloc.start()
    try:
        f(x, axis=1, out=out)
        f(x, axis=0, out=out if name == "softmax" else np.empty(x.shape[1], np.float16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 8, peak


def test_recognised_without_importing_ml_dtypes():
    # float16 inputs must not import ml_dtypes (or fail when it is absent).
    code = (
        "import sys; sys.modules['ml_dtypes'] = None\n"
        "import numpy as np, stablelse as sl\n"
        "x = np.arange(6, dtype=np.float16).reshape(2, 3)\n"
        "assert sl.softmax(x, axis=1).dtype == np.float16\n"
        "assert sl.logsumexp(x.astype(np.int8)).dtype == np.float64\n"
        "assert sl.log_softmax(np.zeros(3, 'V2').view(np.float16)).dtype == np.float16\n"
        "try:\n"
        "    sl.softmax(np.zeros(3, 'V2'))\n"
        "except TypeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('a 2-byte void array was taken for bfloat16')\n"
        "assert 'ml_dtypes' not in sys.modules or sys.modules['ml_dtypes'] is None\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------- stream and Dask


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_stream_states_equal_float32(rng, dtype, masked):
    # Catches a chunk read with the wrong element type (bytes of a 16-bit array taken as
    # float32) or a state that depends on the stored type.
    chunks = [(rng.standard_normal((n, 40)) * 6).astype(dtype) for n in (7, 300, 1)]
    masks = [rng.random(c.shape) < 0.7 if masked else None for c in chunks]
    for axis in (0, 1, None):
        half, wide = sl.LogSumExp(axis=axis), sl.LogSumExp(axis=axis)
        pairs = list(zip(chunks, masks)) if axis != 1 else [(chunks[1], masks[1])] * 2
        for c, m in pairs:
            half.update(c, where=m)
            wide.update(c.astype(np.float32), where=m)
        for got, want in zip(half.state, wide.state):
            _same(got, want)
        assert half.result().dtype == dtype


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_stream_weighted_chunks(rng, dtype):
    # Weights take the float64 path (x + log b): same states as float32 with the same weights.
    x = (rng.standard_normal((50, 8)) * 3).astype(dtype)
    b = rng.random((50, 8))
    half = sl.LogSumExp(axis=0).update(x, b=b)
    wide = sl.LogSumExp(axis=0).update(x.astype(np.float32), b=b)
    for got, want in zip(half.state, wide.state):
        _same(got, want)


def test_stream_update_makes_no_input_sized_copy():
    # Catches LogSumExp.update widening the whole chunk to float32 (2x its bytes).
    x = np.random.default_rng(1).standard_normal(1 << 22).astype(np.float16).reshape(1024, -1)
    acc = sl.LogSumExp(axis=1).update(x)
    tracemalloc.start()
    try:
        acc.update(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 8, peak


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_rows_from_states_equal_float32_rounded(rng, dtype, log, masked):
    # Rows longer than the writer's step (2048) and not a multiple of it: catches a step
    # written at the wrong offset, a lost tail, a mask applied to the wrong step, and float32
    # bits written into the 16-bit result.
    for n in (5, 2048, 5000):
        x = (rng.standard_normal((7, n)) * 5).astype(dtype)
        x[1, 3] = np.inf
        x[2, :] = -np.inf
        keep = rng.random(x.shape) < 0.8 if masked else None
        mx, ex = _core.lse_states(x, (1,), "auto", keep)
        got = _core.softmax_from_states(x, mx, ex, log, keep)
        want = _core.softmax_from_states(x.astype(np.float32), mx, ex, log, keep)
        _same(got, want.astype(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_rows_from_states_any_thread_count(rng, dtype):
    x = (rng.standard_normal((600, 3000)) * 5).astype(dtype)
    mx, ex = _core.lse_states(x, (1,))
    try:
        sl.set_num_threads(1)
        one = _core.softmax_from_states(x, mx, ex)
        sl.set_num_threads(4)
        four = _core.softmax_from_states(x, mx, ex)
    finally:
        sl.set_num_threads(0)
    _same(one, four)


def test_rows_from_states_make_no_copy():
    # The result (nbytes) is the only input-sized allocation: no float32 copy of the rows.
    x = np.random.default_rng(2).standard_normal(1 << 22).astype(np.float16).reshape(1024, -1)
    mx, ex = _core.lse_states(x, (1,))
    _core.softmax_from_states(x, mx, ex)
    tracemalloc.start()
    try:
        _core.softmax_from_states(x, mx, ex)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes + x.nbytes // 8, peak


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dask_equals_float32(rng, dtype):
    # Catches the Dask blocks' states or softmax rows read in the wrong type, or a result
    # dtype other than the input's.
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sld

    x = (rng.standard_normal((60, 50)) * 5).astype(dtype)
    keep = rng.random(x.shape) < 0.8
    xh, xw = da.from_array(x, chunks=(25, 20)), da.from_array(x.astype(np.float32), chunks=(25, 20))
    for axis in (0, 1, None):
        got, want = sld.lse_states(xh, axis=axis).compute(), sld.lse_states(xw, axis=axis).compute()
        for field in ("max", "excess"):
            _same(got[field], want[field])
        for where in (None, keep):
            assert sld.logsumexp(xh, axis=axis, where=where).compute().dtype == dtype
            if axis is None:
                continue
            for f in (sld.softmax, sld.log_softmax):
                got = f(xh, axis=axis, where=where).compute()
                want = f(xw, axis=axis, where=where).compute()
                _same(got, want.astype(dtype))


# --------------------------------------------------------------------------- losses


def _same_loss(got, want, dtype) -> None:
    """A loss (scalar or array) equal to the float32 one rounded to `dtype`, bit for bit."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == dtype
    _same(got, want.astype(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [5, 300, 20000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_equals_float32_rounded(rng, dtype, n, reduction):
    # Short rows (the fused short-row kernel), rows in cache, and rows longer than a piece:
    # catches a piece widened at the wrong row or pitch, a gradient row narrowed at the wrong
    # offset, per-lane losses written to the wrong lane, and a mean scaled per piece.
    rows = max(3, 60000 // n)
    wide = (rng.standard_normal((rows, n + 3)) * 4).astype(dtype)
    x = wide[:, 1 : n + 1]  # rows with a pitch that is not n
    t = rng.integers(0, n, rows)
    t[1] = -100
    w = rng.random(n)
    for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"weight": w}):
        got, g = sl.cross_entropy(x, t, reduction=reduction, return_grad=True, **opts)
        want, gw = sl.cross_entropy(x.astype(np.float32), t, reduction=reduction,
                                    return_grad=True, **opts)
        _same_loss(got, want, dtype)
        assert g.dtype == dtype and g.shape == x.shape
        _same(g, gw.astype(dtype))
        _same(sl.cross_entropy(x, t, reduction=reduction, **opts), got)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cross_entropy_grad_out_and_special_values(rng, dtype):
    # grad_out dense (written by the kernel) and strided (copied); NaN / inf logits.
    x = (rng.standard_normal((40, 70)) * 4).astype(dtype)
    x[3, 5], x[4, 6], x[5, :] = np.nan, np.inf, -np.inf
    t = rng.integers(0, 70, 40)
    want, gw = sl.cross_entropy(x.astype(np.float32), t, return_grad=True)
    for out in (np.empty_like(x), np.empty((70, 40), dtype).T):
        loss, g = sl.cross_entropy(x, t, return_grad=True, grad_out=out)
        assert g is out
        _same_loss(loss, want, dtype)
        _same(g, gw.astype(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_losses_of_every_target_kind_equal_float32_rounded(rng, dtype):
    # Index and probability targets, with or without where=, the class axis not last: the
    # logits widened per block give the float32 call's results rounded, in the logits' dtype.
    x = (rng.standard_normal((6, 9, 11)) * 3).astype(dtype)
    t = rng.integers(0, 9, (6, 11))
    q = rng.dirichlet(np.ones(9), (6, 11)).transpose(0, 2, 1).astype(np.float32)
    keep = rng.random(x.shape) < 0.8
    keep[np.arange(6)[:, None], t, np.arange(11)] = True
    for tgt, kw in ((t, {}), (q, {}), (t, {"where": keep})):
        got, g = sl.cross_entropy(x, tgt, axis=1, return_grad=True, **kw)
        want, gw = sl.cross_entropy(x.astype(np.float32), tgt, axis=1, return_grad=True, **kw)
        _same_loss(got, want, dtype)
        _same(g, gw.astype(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape,axis", [((37, 10), -1), ((300, 70), -1), ((5, 1000), -1),
                                        ((6, 9, 13), 1), ((3, 40), 0)])
@pytest.mark.parametrize("mask_shape", ["full", "classes", "lanes"])
def test_masked_cross_entropy_equals_float32_rounded(rng, dtype, shape, axis, mask_shape):
    # where= on 16-bit logits, widened as each block is staged (short rows, rows whose exps
    # are kept for the gradient, columns; dense and broadcast masks): catches a block widened
    # at the wrong place, a gradient rounded at the wrong offset, a mask read against the
    # staged block instead of the logits.
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    ax = axis % len(shape)
    mshape = {"full": shape,
              "classes": tuple(s if i == ax else 1 for i, s in enumerate(shape)),
              "lanes": tuple(1 if i == ax else s for i, s in enumerate(shape))}[mask_shape]
    keep = rng.random(mshape) < 0.8
    kept = np.moveaxis(np.broadcast_to(keep, shape), ax, -1)
    t = np.full(kept.shape[:-1], -100, np.int64)
    for idx in np.ndindex(*t.shape):
        k = np.flatnonzero(kept[idx])
        if k.size:
            t[idx] = rng.choice(k)
    for opts in ({}, {"label_smoothing": 0.1, "reduction": "none"}, {"reduction": "sum"}):
        got, g = sl.cross_entropy(x, t, axis=axis, where=keep, return_grad=True, **opts)
        want, gw = sl.cross_entropy(x.astype(np.float32), t, axis=axis, where=keep,
                                    return_grad=True, **opts)
        _same_loss(got, want, dtype)
        _same(g, gw.astype(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape,axis", [((37, 10), -1), ((300, 70), -1), ((5, 1000), -1),
                                        ((6, 9, 13), 1), ((20000, 40), -1)])
@pytest.mark.parametrize("masked", [False, True])
def test_probability_targets_equal_float32_rounded(rng, dtype, shape, axis, masked):
    # 16-bit logits against float32 probabilities: catches probabilities read at the wrong
    # row of a piece (rows), of a staged block (where=) or of a column block.
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    ax = axis % len(shape)
    lanes = tuple(s for i, s in enumerate(shape) if i != ax)
    q = np.moveaxis(rng.dirichlet(np.ones(shape[ax]), lanes), -1, ax).astype(np.float32)
    keep = None
    if masked:
        keep = rng.random(shape) < 0.8
        q = np.where(keep, q, 0).astype(np.float32)
    for opts in ({}, {"label_smoothing": 0.1, "reduction": "none"}):
        got, g = sl.cross_entropy(x, q, axis=axis, where=keep, return_grad=True, **opts)
        want, gw = sl.cross_entropy(x.astype(np.float32), q, axis=axis, where=keep,
                                    return_grad=True, **opts)
        _same_loss(got, want, dtype)
        _same(g, gw.astype(dtype))


def test_bfloat16_probability_targets_are_floating(rng):
    # ml_dtypes' bfloat16 has NumPy kind "V": it must still count as class probabilities
    # (and another 1-byte ml_dtypes float type must not).
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = (rng.standard_normal((6, 9)) * 3).astype(ml_dtypes.bfloat16)
    q = rng.dirichlet(np.ones(9), 6).astype(ml_dtypes.bfloat16)
    got, g = sl.cross_entropy(x, q, return_grad=True)
    want, gw = sl.cross_entropy(x.astype(np.float32), q.astype(np.float32), return_grad=True)
    _same_loss(got, want, x.dtype)
    _same(g, gw.astype(x.dtype))
    with pytest.raises(TypeError, match="float class probabilities"):
        sl.cross_entropy(x, np.zeros((6, 9), ml_dtypes.float8_e4m3fn))


@pytest.mark.parametrize("kind", ["where", "probabilities"])
def test_losses_make_no_copy_of_the_logits(kind):
    # Catches where= or probability targets on float16 logits widening them all to float32
    # (2x their bytes); the float32 probabilities are read where they lie.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1 << 12, 1000)).astype(np.float16)
    if kind == "where":
        t, kw = rng.integers(0, 1000, x.shape[0]), {"where": np.ones(1000, dtype=bool)}
    else:
        t, kw = rng.dirichlet(np.ones(1000), x.shape[0]).astype(np.float32), {}
    grad = np.empty_like(x)
    sl.cross_entropy(x, t, return_grad=True, grad_out=grad, **kw)
    tracemalloc.start()
    try:
        sl.cross_entropy(x, t, return_grad=True, grad_out=grad, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 8, peak


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_equals_float32_rounded(rng, dtype, reduction):
    # Catches a target element read as the wrong type or at the wrong place.
    x = (rng.standard_normal((30, 8, 5)) * 3).astype(dtype)
    t = rng.integers(0, 8, (30, 5))
    t[2, 3] = -100
    w = rng.random(8)
    for v, ax, tt in ((x, 1, t), (x.transpose(0, 2, 1), 2, t), (x[:, :, 0], -1, t[:, 0])):
        got = sl.nll_loss(v, tt, weight=w, reduction=reduction, axis=ax)
        want = sl.nll_loss(v.astype(np.float32), tt, weight=w, reduction=reduction, axis=ax)
        _same_loss(got, want, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_losses_bit_identical_for_any_thread_count(rng, dtype):
    # Many pieces: catches a mean summed in thread order or a piece buffer reused wrongly.
    x = (rng.standard_normal((3000, 500)) * 4).astype(dtype)
    t = rng.integers(0, 500, 3000)
    res = []
    try:
        for threads in (1, 4):
            sl.set_num_threads(threads)
            res.append([sl.cross_entropy(x, t, reduction=r, return_grad=True, z_loss=1e-3)
                        for r in ("mean", "none")]
                       + [sl.nll_loss(x, t, reduction="mean")])
    finally:
        sl.set_num_threads(0)
    for a, b in zip(*res):
        if isinstance(a, tuple):
            for p, q in zip(a, b):
                _same(p, q)
        else:
            _same(a, b)


@pytest.mark.parametrize("grad", [False, True])
def test_losses_make_no_input_sized_copy(grad):
    # A float32 copy of the logits is 2x their bytes; with the gradient, the result itself
    # (nbytes) is the only input-sized allocation.
    x = np.random.default_rng(3).standard_normal(1 << 22).astype(np.float16).reshape(4096, -1)
    t = np.random.default_rng(4).integers(0, x.shape[1], x.shape[0])
    sl.cross_entropy(x, t, return_grad=grad)
    tracemalloc.start()
    try:
        sl.cross_entropy(x, t, return_grad=grad)
        if not grad:
            sl.nll_loss(x, t)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (x.nbytes if grad else 0) + x.nbytes // 8, peak


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n", [5, 300])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_with_the_class_axis_not_last_equals_float32_rounded(
    rng, dtype, n, reduction
):
    # torch's (N, C, d) layout read in place, a column block widened at a time: short and
    # long lanes, several column blocks per slab and a ragged last one, ignored targets and
    # special values. Catches a line widened at the wrong offset, a gradient line narrowed
    # into the wrong columns, and lane losses in the wrong lane.
    d = 700 if n == 5 else 90
    x = (rng.standard_normal((3, n, d)) * 4).astype(dtype)
    x[0, 1, 7], x[1, 2, 8], x[2, :, 9] = np.nan, np.inf, -np.inf
    t = rng.integers(0, n, (3, d))
    t[1, 3] = -100
    w = rng.random(n)
    for opts in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}, {"weight": w}):
        got, g = sl.cross_entropy(x, t, axis=1, reduction=reduction, return_grad=True, **opts)
        want, gw = sl.cross_entropy(x.astype(np.float32), t, axis=1, reduction=reduction,
                                    return_grad=True, **opts)
        _same_loss(got, want, dtype)
        assert g.dtype == dtype and g.shape == x.shape
        _same(g, gw.astype(dtype))
        out = np.empty_like(x)
        loss, g2 = sl.cross_entropy(x, t, axis=1, reduction=reduction, return_grad=True,
                                    grad_out=out, **opts)
        assert g2 is out
        _same(out, g)
        _same_loss(loss, want, dtype)


@pytest.mark.parametrize("grad", [False, True])
def test_losses_with_the_class_axis_not_last_make_no_input_sized_copy(grad):
    # The copy path allocated a float32 copy of the logits (2x their bytes) and, with the
    # gradient, a float32 gradient cast back (another 2x).
    x = np.random.default_rng(3).standard_normal(1 << 22).astype(np.float16).reshape(64, 16, -1)
    t = np.random.default_rng(4).integers(0, 16, (64, x.shape[2]))
    sl.cross_entropy(x, t, axis=1, return_grad=grad)
    tracemalloc.start()
    try:
        sl.cross_entropy(x, t, axis=1, return_grad=grad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (x.nbytes if grad else 0) + x.nbytes // 8, peak
