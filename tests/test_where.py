"""``where=`` masks on logsumexp, softmax, log_softmax, LogSumExp.update and stablelse.dask.

The oracle is JAX's semantics, computed from scipy on the kept elements of each slice: masked
elements take no part whatever they hold; a fully masked slice gives logsumexp ``-inf``,
softmax 0 and log_softmax ``-inf``; masked positions get 0 / ``-inf``. jax itself is compared
where it is installed.
"""

import sys

import numpy as np
import pytest
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import layouts
from test_buffers import _run_child
from test_segments import assert_close

import stablelse as sl

SPECIALS = [np.nan, np.inf, -np.inf, 1000.0, -1000.0, -40.0, 0.0]


def _rows(a, axes):
    """`a` with `axes` moved last and flattened: one row per slice, and the kept shape."""
    last = tuple(range(a.ndim - len(axes), a.ndim))
    moved = np.moveaxis(a, axes, last)
    kept = moved.shape[: a.ndim - len(axes)]
    return moved.reshape(int(np.prod(kept)), -1), kept, last


def _kept_slices(x, mask, axis, b, lse_sign, lse_dtype, sign_dtype):
    """Per slice of `x` along `axis`: ``lse_sign(kept x, kept b)`` and scipy's softmax and
    log_softmax of the kept elements; a fully masked slice gives -inf (sign 0), softmax 0 and
    log_softmax -inf (JAX's where=)."""
    mask = np.broadcast_to(mask, x.shape)
    axes = tuple(range(x.ndim)) if axis is None else tuple(np.atleast_1d(axis) % x.ndim)
    xr, kept, last = _rows(x, axes)
    mr = _rows(mask, axes)[0]
    br = None if b is None else _rows(np.broadcast_to(b, x.shape), axes)[0]
    lse = np.full(xr.shape[0], -np.inf, lse_dtype)
    sgn = np.zeros(xr.shape[0], sign_dtype)
    sm = np.zeros_like(xr)
    ls = np.full_like(xr, -np.inf)
    with np.errstate(all="ignore"):
        for r in range(xr.shape[0]):
            k = mr[r]
            if not k.any():
                continue
            lse[r], sgn[r] = lse_sign(xr[r][k], None if br is None else br[r][k])
            sm[r][k] = sp.softmax(xr[r][k])
            ls[r][k] = sp.log_softmax(xr[r][k])

    def back(v):
        return np.moveaxis(v.reshape(np.moveaxis(x, axes, last).shape), last, axes)

    return lse.reshape(kept), sgn.reshape(kept), back(sm), back(ls)


def oracle(x, mask, axis, b=None):
    """float64 (logsumexp, sign, softmax, log_softmax) of the kept elements (JAX's where=)."""

    def lse_sign(xk, bk):
        if bk is not None:
            return sp.logsumexp(xk, b=bk, return_sign=True)
        v = sp.logsumexp(xk)
        return v, 1.0 if v > -np.inf else (np.nan if np.isnan(v) else 0.0)

    x64 = np.asarray(x, np.float64)
    b64 = None if b is None else np.asarray(b, np.float64)
    return _kept_slices(x64, mask, axis, b64, lse_sign, np.float64, np.float64)


def check(x, mask, axis, keepdims=False):
    lse, _, sm, ls = oracle(x, mask, axis)
    scale = np.where(np.isfinite(x), np.abs(x.astype(np.float64)), 0)
    got = sl.logsumexp(x, axis=axis, keepdims=keepdims, where=mask)
    axes = tuple(range(x.ndim)) if axis is None else tuple(np.atleast_1d(axis) % x.ndim)
    lse_k = np.expand_dims(lse, axes)
    want = lse_k if keepdims else lse
    assert np.shape(got) == np.shape(want)
    # Finite results within a few ULP of the largest kept term (the terms that cancel).
    kept_scale = np.max(np.where(np.broadcast_to(mask, x.shape), scale, 0), axis=axes)
    assert_close(got, want, kept_scale.reshape(np.shape(want)), x.dtype)
    got_sm = sl.softmax(x, axis=axis, where=mask)
    got_ls = sl.log_softmax(x, axis=axis, where=mask)
    m = np.broadcast_to(mask, x.shape)
    assert (got_sm[~m] == 0).all() and (got_ls[~m] == -np.inf).all()
    assert_close(got_sm, sm, 1.0, x.dtype)
    lscale = np.where(np.isfinite(lse_k), np.abs(lse_k), 0)
    assert_close(got_ls, ls, scale + lscale, x.dtype)
    return got, got_sm, got_ls


# --------------------------------------------------------------------------- vs scipy


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    special = rng.random(shape) < draw(st.sampled_from([0.0, 0.15, 0.5]))
    x[special] = rng.choice(SPECIALS, special.sum())
    # A mask that broadcasts: some axes of length 1.
    mshape = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else n for n in shape)
    mask = rng.random(mshape) < draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    if draw(st.booleans()):
        mask = mask.copy()
        mask.reshape(-1)[: max(1, mask.size // 3)] = False  # likely a fully masked slice
    axis = draw(
        st.sampled_from([None, 0, -1, (0,), tuple(range(ndim))] + ([(0, 2)] if ndim == 3 else []))
    )
    return x, mask, axis, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(cases())
def test_where_equals_scipy_on_the_kept_elements(case):
    """Catches masked values leaking into the max or the sum (NaN / +inf at masked positions),
    fully masked slices that are not -inf / 0, broadcast masks read at the wrong element,
    and axis / keepdims mix-ups."""
    x, mask, axis, keepdims = case
    check(x, mask, axis, keepdims)


SIZES = [1, 2, 3, 8, 10, 17, 64, 100, 1000, 2049, 5000]


def _laid_out(a, kind):
    """`a`'s values in the layout `kind` (a view where the layout needs one)."""
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if kind == "negative":
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flip])[flip]
    if kind == "transposed":
        return np.ascontiguousarray(a.T).T
    if kind == "swapped" and a.ndim > 1:
        # The last two axes stored transposed: rows of the last axis one element apart.
        return np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
    return np.ascontiguousarray(a)


@st.composite
def layout_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.sampled_from(SIZES), min_size=ndim, max_size=ndim)))
    while np.prod(shape) > 400_000:
        shape = shape[1:]
    ndim = len(shape)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mshape = tuple(1 if draw(st.integers(0, 3)) == 0 else n for n in shape)
    mask = rng.random(mshape) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    mask.reshape(-1)[: mask.size // 5 * draw(st.integers(0, 1))] = False
    axis = draw(st.sampled_from([None, -1, 0] + ([1, (0, 1)] if ndim > 1 else [])))
    kinds = ["C", "F", "strided", "negative", "transposed", "swapped"]
    return (
        shape,
        dtype,
        rng,
        mask,
        axis,
        draw(st.sampled_from(kinds)),
        draw(st.sampled_from(kinds + ["broadcast"])),
        draw(st.sampled_from(kinds[:3])),
    )


@settings(max_examples=80, deadline=None)
@given(layout_cases())
def test_random_layouts_at_block_sizes_equal_scipy_on_the_kept_elements(case):
    """Rows of 1 to 5000 (the short-row kernels, the blocks, the row-order copy of a
    transposed mask), x and the mask each in one of six layouts (the mask also broadcast),
    out= in three, against scipy on the kept elements, with NaN and infinities at masked
    positions: catches a mask read at the wrong element or a masked value leaking in on a path
    the small shapes above never take."""
    shape, dtype, rng, mask, axis, xkind, mkind, okind = case
    # A vectorised form of `oracle` (which calls scipy slice by slice, too slow at these
    # sizes): scipy's `b=` drops the masked elements, which holds because every kept value is
    # finite here (NaN and infinities only at masked positions; `oracle` covers kept ones).
    full = np.broadcast_to(mask, shape)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    poison = ~full & (rng.random(shape) < 0.3)
    x[poison] = rng.choice([np.nan, np.inf, -np.inf], poison.sum())
    xv = _laid_out(x, xkind)
    mv = np.broadcast_to(mask, shape) if mkind == "broadcast" else _laid_out(full, mkind)
    axes = tuple(range(len(shape))) if axis is None else tuple(np.atleast_1d(axis) % len(shape))
    kept = np.where(full, x, 0).astype(np.float64)
    with np.errstate(all="ignore"):
        lse = sp.logsumexp(kept, axis=axes, b=full.astype(np.float64), keepdims=True)
    finite = np.where(np.isfinite(lse), lse, 0.0)
    tol = 4e-6 if dtype == np.float32 else 1e-13
    scale = np.max(np.abs(kept), axis=axes, keepdims=True, initial=0.0) + 1
    got = sl.logsumexp(xv, axis=axis, where=mv, keepdims=True)
    np.testing.assert_array_equal(got == -np.inf, lse == -np.inf)
    with np.errstate(invalid="ignore"):
        assert np.all(np.abs(np.where(np.isfinite(lse), got - lse, 0)) <= tol * scale)
    want_sm = np.where(full & np.isfinite(lse), np.exp(kept - finite), 0.0)
    want_ls = np.where(full, kept - lse, -np.inf)
    for f, want, sc in (
        (sl.softmax, want_sm, 1.0),
        (sl.log_softmax, want_ls, np.abs(kept) + np.abs(finite) + 1),
    ):
        out = _laid_out(np.zeros(shape, dtype), okind)
        assert f(xv, axis=axis, where=mv, out=out) is out
        np.testing.assert_array_equal(out == -np.inf, want == -np.inf)
        with np.errstate(invalid="ignore"):
            assert np.all(np.abs(np.where(want == -np.inf, 0, out - want)) <= tol * sc)


def test_masked_nan_and_inf_have_no_effect_and_fully_masked_slices():
    x = np.array([[np.nan, 1.0, np.inf, 2.0], [5.0, 6.0, 7.0, 8.0], [-np.inf, -np.inf, 3.0, 0.0]])
    m = np.array([[False, True, False, True], [False] * 4, [True, True, False, False]])
    lse = sl.logsumexp(x, axis=1, where=m)
    np.testing.assert_array_equal(lse[1:], [-np.inf, -np.inf])
    assert lse[0] == pytest.approx(sp.logsumexp([1.0, 2.0]), rel=1e-15)
    sm = sl.softmax(x, axis=1, where=m)
    np.testing.assert_array_equal(sm[1], 0.0)
    # Kept elements all -inf: as the unmasked op on them (scipy: NaN), masked still 0.
    assert np.isnan(sm[2, :2]).all() and (sm[2, 2:] == 0).all()
    ls = sl.log_softmax(x, axis=1, where=m)
    np.testing.assert_array_equal(ls[1], -np.inf)
    assert np.isnan(ls[2, :2]).all() and (ls[2, 2:] == -np.inf).all()
    # A kept +inf: as without a mask.
    assert sl.logsumexp([np.inf, np.nan], where=[True, False]) == np.inf


def test_long_lanes_and_column_batches():
    """Lanes longer than two kernel blocks stream through a chunk buffer, and the leading axis
    runs as columns: catches a mask chunk out of step with its data chunk."""
    rng = np.random.default_rng(1)
    n = (1 << 17) + 5000
    x = rng.standard_normal((2, n)).astype(np.float32)
    x[0, 7] = np.nan
    m = rng.random((2, n)) < 0.5
    m[0, 7] = False
    m[1, : n // 2] = False
    check(x, m, 1)
    check(np.ascontiguousarray(x.T), np.ascontiguousarray(m.T), 0)
    y = rng.standard_normal((50, 40))
    check(y, rng.random((50, 1)) < 0.5, 0)


def test_all_kept_is_bit_identical_to_no_mask():
    """The masked path runs the unmasked kernels on blocks: any kept-everywhere difference is
    a wrong hidden value or block boundary."""
    rng = np.random.default_rng(2)
    for shape, axis in [((300, 64), 1), ((200, 1000), 1), ((2, 140000), 1), ((30, 50), 0)]:
        x = rng.standard_normal(shape).astype(np.float32)
        ones = np.ones(shape, bool)
        for f in (sl.logsumexp, sl.softmax, sl.log_softmax):
            a = f(x, axis=axis, where=ones)
            b = f(x, axis=axis)
            np.testing.assert_array_equal(
                np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)
            )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layout_of_x_mask_and_out(dtype):
    """Catches a mask read in the wrong work order (transposed, strided, negative, unaligned x;
    broadcast, Fortran, negative masks) and masked writes into out of any layout / in place."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 4, 7)) * 4).astype(dtype)
    x[0, 1, 2] = np.nan
    base = rng.random((3, 4, 7)) < 0.6
    base[0, 1, 2] = False
    base[1, 2] = False
    masks = {
        "C": base,
        "F": np.asfortranarray(base),
        "negative": np.ascontiguousarray(base[::-1, :, ::-1])[::-1, :, ::-1],
        "broadcast": np.broadcast_to(base[:1, :, :1], base.shape),
    }
    for axis in [None, 0, 2, (0, 2), (1, 2)]:
        for mname, m in masks.items():
            lse, _, sm, ls = oracle(x, m, axis)
            for name, v in layouts(x):
                got = sl.logsumexp(v, axis=axis, where=m)
                np.testing.assert_allclose(got, lse, rtol=4e-6, err_msg=f"{name}/{mname}")
                for fn, want in (("softmax", sm), ("log_softmax", ls)):
                    f = getattr(sl, fn)
                    for oname, out in layouts(np.zeros(x.shape, dtype)):
                        assert f(v, axis=axis, where=m, out=out) is out
                        np.testing.assert_allclose(
                            out, want, rtol=4e-6, atol=1e-6, err_msg=f"{fn} {name}/{mname}/{oname}"
                        )
                    w = v.copy() if name == "C" else v
                    before = w.copy()
                    f(w, axis=axis, where=m, out=w)
                    np.testing.assert_allclose(
                        w, want, rtol=4e-6, atol=1e-6, err_msg=f"{fn} in place {name}"
                    )
                    w[...] = before


def test_logsumexp_out_layouts_and_keepdims():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 6, 7))
    m = rng.random((5, 6, 7)) < 0.5
    m[2, :, 3] = False
    lse = oracle(x, m, 1)[0]
    out = np.zeros((7, 5)).T
    assert sl.logsumexp(x, axis=1, where=m, out=out) is out
    np.testing.assert_allclose(out, lse, rtol=1e-14)
    assert out[2, 3] == -np.inf
    k = sl.logsumexp(x, axis=(0, 2), keepdims=True, where=m)
    assert k.shape == (1, 6, 1)
    np.testing.assert_allclose(k.reshape(6), oracle(x, m, (0, 2))[0], rtol=1e-14)


def test_b_and_return_sign_combine_with_the_mask():
    """Masked elements leave the sum whatever their weight: a NaN or negative weight at a
    masked position changes nothing; the sign of a fully masked slice is 0."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 9))
    b = rng.standard_normal(9)
    m = rng.random((4, 9)) < 0.6
    m[3] = False
    bb = np.broadcast_to(b, x.shape).copy()
    bb[~m] = np.nan
    for weights in (b, bb):
        res, sgn = sl.logsumexp(x, axis=1, b=weights, where=m, return_sign=True)
        want, wsgn, _, _ = oracle(x, m, 1, b=np.where(m, weights, 0))
        np.testing.assert_allclose(res, want, rtol=1e-13)
        np.testing.assert_array_equal(sgn, wsgn)
    res, sgn = sl.logsumexp(x, axis=1, where=m, return_sign=True)
    assert res[3] == -np.inf and sgn[3] == 0 and (sgn[:3] == 1).all()
    # b=0 drops an element whatever a holds (scipy), and so does the mask.
    assert sl.logsumexp([np.nan, 1.0, 2.0], b=[0.0, 1.0, 5.0], where=[True, True, False]) == 1.0


def test_dtypes_and_zero_dimensional_input():
    m = np.array([True, False, True])
    r = sl.logsumexp(np.array([1, 2, 3]), where=m)
    assert r.dtype == np.float64 and r == pytest.approx(sp.logsumexp([1, 3]))
    h = sl.softmax(np.array([1, 2, 3], np.float16), where=m)
    assert h.dtype == np.float16 and h[1] == 0
    assert sl.logsumexp(np.float32(2.0), where=False) == -np.inf
    assert sl.softmax(3.0, where=True) == 1.0
    out = np.empty(3, np.float16)
    assert sl.log_softmax(np.array([1, 2, 3], np.float16), where=m, out=out) is out
    assert out[1] == -np.inf


# --------------------------------------------------------------------------- errors


def test_errors_name_where():
    x = np.zeros((2, 3))
    for f in (sl.logsumexp, sl.softmax, sl.log_softmax):
        with pytest.raises(TypeError, match="where must be a boolean array"):
            f(x, where=np.ones((2, 3), int))
        with pytest.raises(ValueError, match="where with shape"):
            f(x, where=np.ones((3, 3), bool))
        with pytest.raises(ValueError, match="where with shape"):
            f(x, where=np.ones((2, 2, 3), bool))  # would grow x
        with pytest.raises(ValueError, match="where is not a rectangular"):
            f(x, where=[[True], [True, False]])
        with pytest.raises(ValueError, match="where with shape"):
            f(x.astype(complex), where=np.ones((3, 3), bool))
        with pytest.raises(TypeError, match="where must be a boolean array"):
            f(x.astype(complex), where=np.ones((2, 3), int))
    with pytest.raises(TypeError, match="where"):
        sl.LogSumExp(axis=1).update(x, where=[[1, 0, 1]])
    with pytest.raises(ValueError, match="where"):
        sl.LogSumExp(axis=1).update(x, where=np.ones(2, bool))


def test_out_overlapping_the_mask_is_refused():
    buf = np.zeros(64, np.uint8)
    out = buf[:24].view(np.float64)
    where = buf.view(bool)[:3]
    with pytest.raises(ValueError, match="overlaps where"):
        sl.softmax(np.zeros(3), where=where, out=out)
    assert (buf == 0).all()


def test_native_binding_checks_the_mask():
    from stablelse import _core

    with pytest.raises(ValueError, match="where has shape"):
        _core.logsumexp(np.zeros((2, 3)), (1,), False, "auto", None, np.ones((2, 2), bool))
    with pytest.raises(TypeError, match="where must be a bool ndarray"):
        _core.softmax(np.zeros((2, 3)), (1,), False, "auto", None, np.ones((2, 3)))


# --------------------------------------------------------------------------- complex


def complex_oracle(x, mask, axis, b=None, return_sign=False):
    """scipy's complex (logsumexp[, sign], softmax, log_softmax) of the kept elements of each
    slice; a fully masked slice gives -inf (sign 0), softmax 0 and log_softmax -inf."""

    def lse_sign(xk, bk):
        value, sign = sp.logsumexp(xk, b=bk, return_sign=True)
        return (value if return_sign else sp.logsumexp(xk, b=bk)), sign

    rdt = x.dtype if b is None else np.result_type(x.dtype, np.asarray(b).dtype)
    lse_dtype = np.finfo(rdt).dtype if return_sign else rdt
    return _kept_slices(x, mask, axis, b, lse_sign, lse_dtype, rdt)


COMPLEX_SPECIALS = [
    np.nan,
    np.inf,
    -np.inf,
    complex(-np.inf, 1.0),
    complex(np.inf, 2.0),
    complex(1.0, np.nan),
    complex(1.0, np.inf),
    30.0,
    -30.0,
]


@st.composite
def complex_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([np.complex64, np.complex128]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape) * 5 + 1j * rng.standard_normal(shape) * 3
    special = rng.random(shape) < draw(st.sampled_from([0.0, 0.2, 0.5]))
    x[special] = rng.choice(np.array(COMPLEX_SPECIALS, complex), special.sum())
    mshape = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else n for n in shape)
    mask = rng.random(mshape) < draw(st.sampled_from([0.0, 0.4, 0.9, 1.0]))
    b = None
    if draw(st.booleans()):
        b = rng.choice(np.array([1, -1, 0.5j, 2, 0, np.inf]), shape).astype(complex)
    axis = draw(st.sampled_from([None, 0, -1, tuple(range(ndim))]))
    return x.astype(dtype), mask, axis, b, draw(st.booleans())


def _writes_equal(f, x, axis, where, want, bits):
    """`f(x, axis, where=where)` as a new array, into `out=` and in place: each the bits
    `want` (viewed as `bits`)."""
    np.testing.assert_array_equal(f(x, axis=axis, where=where).view(bits), want)
    out = np.empty_like(x)
    f(x, axis=axis, where=where, out=out)
    np.testing.assert_array_equal(out.view(bits), want)
    inplace = x.copy()
    f(inplace, axis=axis, where=where, out=inplace)
    np.testing.assert_array_equal(inplace.view(bits), want)


def _agree(got, want, rtol):
    """Non-finite parts where `want` has them (NaN, signed infinity), finite parts within
    `rtol` of `want`'s magnitude."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got, want)
    for f in (np.real, np.imag):
        g, w = f(got).astype(float), f(want).astype(float)
        fin = np.isfinite(w)
        np.testing.assert_array_equal(np.where(fin, 0, g), np.where(fin, 0, w))
        np.testing.assert_allclose(g[fin], w[fin], rtol=rtol, atol=rtol)


@settings(max_examples=150, deadline=None)
@given(complex_cases())
def test_complex_where_equals_scipy_on_the_kept_elements(case):
    """The complex kernels under a mask: catches masked NaN / inf leaking into the lexical
    max or the sum, masked weights taking part, fully masked slices that are not -inf / 0 /
    -inf (sign 0), and broadcast masks read at the wrong element."""
    x, mask, axis, b, rs = case
    tol = 1e-4 if x.dtype == np.complex64 else 1e-10
    lse, sgn, sm, ls = complex_oracle(x, mask, axis, b, rs)
    with np.errstate(all="ignore"):
        got = sl.logsumexp(x, axis=axis, b=b, where=mask, return_sign=rs)
    if rs:
        _agree(got[0], lse[()], tol)
        _agree(got[1], sgn[()], tol)
    else:
        # Phases compared modulo 2 pi by comparing exp(i phase) where the value is finite.
        got = np.asarray(got)
        _agree(np.real(got), np.real(lse), tol)
        fin = np.isfinite(lse)
        np.testing.assert_allclose(
            np.exp(1j * np.imag(got)[fin].astype(float)),
            np.exp(1j * np.imag(lse)[fin]),
            rtol=tol,
            atol=tol,
        )
    if b is None:
        _agree(sl.softmax(x, axis=axis, where=mask), sm.astype(x.dtype), tol)
        _agree(sl.log_softmax(x, axis=axis, where=mask), ls.astype(x.dtype), tol)


def test_complex_where_semantics_and_all_kept_bit_identical():
    x = np.array([[1 + 1j, 2 - 1j, np.nan], [0j, 1j, 2j], [np.inf, 1, 3j]])
    m = np.array([[True, True, False], [False] * 3, [False, True, True]])
    lse, sgn = sl.logsumexp(x, axis=1, where=m, return_sign=True)
    assert lse[0] == pytest.approx(sp.logsumexp([1 + 1j, 2 - 1j], return_sign=True)[0])
    assert lse[1] == -np.inf and sgn[1] == 0  # JAX: fully masked gives sign 0
    np.testing.assert_array_equal(sl.softmax(x, axis=1, where=m)[1], 0)
    ls = sl.log_softmax(x, axis=1, where=m)
    np.testing.assert_array_equal(ls[1], -np.inf)
    assert ls[0, 2] == -np.inf and ls[2, 0] == -np.inf  # masked NaN / inf: -inf + 0j
    # A mask that keeps everything gives the unmasked kernels' bits, long rows and columns too.
    rng = np.random.default_rng(5)
    for shape, axis in [((3, 50), 1), ((40, 70), 0), ((1, 3 * 65536 + 5), 1)]:
        y = rng.standard_normal(shape) * 4 + 1j * rng.standard_normal(shape)
        ones = np.ones(shape, bool)
        for f in (sl.softmax, sl.log_softmax):
            np.testing.assert_array_equal(f(y, axis=axis, where=ones), f(y, axis=axis))
        np.testing.assert_array_equal(
            sl.logsumexp(y, axis=axis, where=ones), sl.logsumexp(y, axis=axis)
        )


def test_complex_where_equals_jax():
    jax = pytest.importorskip("jax")
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(11)
        x = rng.standard_normal((5, 8)) * 3 + 1j * rng.standard_normal((5, 8))
        x[0, 0] = np.nan
        mask = rng.random((5, 8)) < 0.6
        mask[0, 0] = False
        mask[3] = False
        for axis in (0, 1):
            for f in ("logsumexp", "softmax", "log_softmax"):
                got = getattr(sl, f)(x, axis=axis, where=mask)
                want = np.asarray(getattr(jax.nn, f)(x, axis=axis, where=mask))
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        got = sl.logsumexp(x, axis=1, where=mask, return_sign=True)
        want = jax.scipy.special.logsumexp(x, axis=1, where=mask, return_sign=True)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-15)
    finally:
        jax.config.update("jax_enable_x64", x64)


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    "shape,axis", [((4000, 64), 1), ((300, 1000), 1), ((3, 140000), 1), ((500, 300), 0)]
)
def test_bit_identical_for_any_thread_count(shape, axis):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    m = rng.random(shape) < 0.9
    before = sl.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            sl.set_num_threads(n)
            results.append(
                [
                    np.asarray(f(x, axis=axis, where=m)).copy()
                    for f in (sl.logsumexp, sl.softmax, sl.log_softmax)
                ]
                + list(sl.LogSumExp(axis=axis).update(x, where=m).state)
            )
    finally:
        sl.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# --------------------------------------------------------------------------- jax


def test_equals_jax():
    jax = pytest.importorskip("jax")
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        _check_against_jax(jax)
    finally:
        jax.config.update("jax_enable_x64", x64)


def _check_against_jax(jax):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 9)) * 20
    x[0, 0], x[1, 1] = np.nan, np.inf
    mask = rng.random((6, 9)) < 0.5
    mask[0, 0] = mask[1, 1] = False
    mask[2] = False
    mask[4] = True
    for axis in (0, 1):
        np.testing.assert_allclose(
            sl.logsumexp(x, axis=axis, where=mask),
            jax.nn.logsumexp(x, axis=axis, where=mask),
            rtol=1e-14,
        )
        np.testing.assert_allclose(
            sl.softmax(x, axis=axis, where=mask),
            jax.nn.softmax(x, axis=axis, where=mask),
            rtol=1e-13,
            atol=1e-300,
        )
        # JAX forms log(1 + tiny) for the top element and loses it: absolute error eps * |x|.
        np.testing.assert_allclose(
            sl.log_softmax(x, axis=axis, where=mask),
            jax.nn.log_softmax(x, axis=axis, where=mask),
            rtol=1e-13,
            atol=1e-12,
        )
    b = rng.standard_normal(9)
    got = sl.logsumexp(x, axis=1, b=b, where=mask, return_sign=True)
    want = jax.nn.logsumexp(x, axis=1, b=b, where=mask, return_sign=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-13)
    np.testing.assert_array_equal(got[1], want[1])
    xi = np.array([[-np.inf, -np.inf, 3.0]])
    mi = np.array([[True, True, False]])
    for f in ("softmax", "log_softmax"):
        np.testing.assert_array_equal(
            getattr(sl, f)(xi, axis=1, where=mi), getattr(jax.nn, f)(xi, axis=1, where=mi)
        )


# --------------------------------------------------------------------------- streaming, dask


def test_streaming_update_equals_one_call():
    """Catches a mask chunk applied to the wrong data chunk, fully masked chunks that are not
    the identity, and masked weights that still count."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    x[1, 3] = np.nan
    m = rng.random((5, 40)) < 0.7
    m[1, 3] = False
    m[2] = False
    m[:, 10:20] = False  # a fully masked chunk
    b = rng.random((5, 40)) + 0.1
    b[~m] = -1.0  # negative weights are refused unless masked
    acc, wacc = sl.LogSumExp(axis=1), sl.LogSumExp(axis=1)
    for i in range(0, 40, 10):
        acc.update(x[:, i : i + 10], where=m[:, i : i + 10])
        wacc.update(x[:, i : i + 10], b[:, i : i + 10], where=m[:, i : i + 10])
    np.testing.assert_array_equal(acc.result(), sl.logsumexp(x, axis=1, where=m))
    np.testing.assert_allclose(
        wacc.result(), sl.logsumexp(x, axis=1, b=np.where(m, b, 0), where=m), rtol=1e-6
    )
    none = sl.LogSumExp()
    none.update(x, where=m).update(np.float32(5.0), where=False)
    assert none.result() == sl.logsumexp(x, where=m)


def test_dask_equals_numpy():
    da = pytest.importorskip("dask.array")
    import stablelse.dask as sd

    rng = np.random.default_rng(9)
    x = rng.standard_normal((7, 11))
    x[0, 2] = np.nan
    m = rng.random((7, 11)) < 0.6
    m[0, 2] = False
    m[3] = False
    xd = da.from_array(x, chunks=(3, 4))
    for where in (m, da.from_array(m, chunks=(4, 3)), m[:1]):
        for axis in (None, 0, 1, (0, 1)):
            np.testing.assert_allclose(
                sd.logsumexp(xd, axis=axis, where=where).compute(),
                sl.logsumexp(x, axis=axis, where=where),
                rtol=1e-14,
            )
        for fn in ("softmax", "log_softmax"):
            for axis in (0, 1):
                np.testing.assert_allclose(
                    getattr(sd, fn)(xd, axis=axis, where=where).compute(),
                    getattr(sl, fn)(x, axis=axis, where=where),
                    rtol=1e-13,
                )
    b = rng.random(11)
    np.testing.assert_allclose(
        sd.logsumexp(xd, axis=1, b=b, where=m).compute(),
        sl.logsumexp(x, axis=1, b=b, where=m),
        rtol=1e-13,
    )
    with pytest.raises(TypeError, match="where"):
        sd.logsumexp(xd, where=np.ones((7, 11), int))
    with pytest.raises(ValueError, match="where"):
        sd.softmax(xd, where=np.ones((2, 11), bool))


# --------------------------------------------------------------------------- memory


def test_masked_in_place_softmax_adds_no_input_sized_buffer():
    """A broadcast mask and out=x: scratch stays block-sized (no masked copy of x, no copy of
    the broadcast mask)."""
    code = """
        import resource, numpy as np, stablelse as sl
        x = np.random.default_rng(0).standard_normal((2, 1 << 24)).astype(np.float32)
        keep = np.broadcast_to(np.array([[True], [False]]), x.shape)
        sl.softmax(np.zeros((2, 1 << 16), np.float32), axis=1, where=keep[:, : 1 << 16])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sl.softmax(x, axis=1, out=x, where=keep)
        sl.log_softmax(x, axis=0, out=x, where=keep)
        r = sl.logsumexp(x, axis=1, where=keep)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert r[1] == -np.inf and (x[1] == -np.inf).all()
        print("GROWN_KIB", grown)
    """
    rc, out = _run_child(code)
    assert rc == 0, out[-2000:]
    grown = int(out.split("GROWN_KIB")[1].split()[0])
    assert grown < 24 * 1024, f"peak RSS grew by {grown} KiB for a 128 MiB input"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [3, 64, 1000, 40000])
def test_dense_blocks_written_in_out_equal_the_staged_path(dtype, n):
    """A block dense in x, the mask and out is hidden straight into out and finished there;
    a strided out takes the staged scratch path. Both must give the same bits, also for rows
    whose kept elements are +inf, NaN or all -inf, fully masked rows, and in place (a wrong
    fill left in out, a masked value read, a row past the stored-exp length)."""
    rng = np.random.default_rng(n)
    rows = 12
    x = (rng.standard_normal((rows, n)) * 5).astype(dtype)
    keep = rng.random((rows, n)) < 0.8
    keep[1] = False
    x[2, 0], keep[2, 0] = np.inf, True
    x[3, 1], keep[3, 1] = np.nan, True
    x[4, :], keep[4, :] = -np.inf, True
    keep[4, n // 2] = False
    x[5, keep[5] == 0] = np.nan  # masked NaN: no effect
    for f in (sl.softmax, sl.log_softmax):
        dense = np.empty_like(x)
        f(x, axis=1, where=keep, out=dense)
        strided = np.empty((rows, 2 * n), dtype)[:, ::2]
        f(x, axis=1, where=keep, out=strided)
        inplace = x.copy()
        f(inplace, axis=1, where=keep, out=inplace)
        bits = np.uint32 if dtype == np.float32 else np.uint64
        want = np.ascontiguousarray(strided).view(bits)
        np.testing.assert_array_equal(dense.view(bits), want)
        np.testing.assert_array_equal(inplace.view(bits), want)
        assert np.all(dense[~keep] == (0.0 if f is sl.softmax else -np.inf))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [37, 1000, 5003, 40000, 140001])
def test_rows_read_in_place_equal_the_staged_and_unmasked_paths(dtype, n):
    """logsumexp, lane states, log_softmax and softmax of rows dense in x and the mask read both
    where they are, the mask applied as each vector is loaded (max, sum and write passes). They must
    equal, bit for bit, the staged path (x strided) and the unmasked op on x with its masked
    elements set to -inf, also for kept +inf / NaN / all -inf rows, fully masked rows, masked
    NaN and +inf (a masked value read, a lost NaN, a wrong tail mask, a block skipped)."""
    from stablelse import _stream

    rng = np.random.default_rng(n)
    rows = 256 if n < 10000 else 16  # enough rows to meet a one-ULP difference in the finish
    x = (rng.standard_normal((rows, n)) * 5).astype(dtype)
    keep = rng.random((rows, n)) < 0.8
    keep[1] = False
    x[2, 0], keep[2, 0] = np.inf, True
    x[3, 1], keep[3, 1] = np.nan, True
    x[4, :], keep[4, :] = -np.inf, True
    keep[4, n // 2] = False
    x[5, keep[5] == 0] = np.nan
    x[6, keep[6] == 0] = np.inf
    x[7, -1], keep[7, -1] = 1e30 if dtype == np.float64 else 3e38, True  # max in the tail
    keep[8, : n - 3] = False  # only the tail kept
    x[9, n - 1], keep[9, n - 1] = np.nan, True  # kept NaN in the tail
    keep[10, n // 3 :] = False
    hidden = np.where(keep, x, -np.inf).astype(dtype)
    strided = np.empty((rows, 2 * n), dtype)[:, ::2]
    strided[...] = x
    bits = np.uint32 if dtype == np.float32 else np.uint64
    dense = sl.logsumexp(x, axis=1, where=keep)
    staged = sl.logsumexp(strided, axis=1, where=keep)
    plain = sl.logsumexp(hidden, axis=1)
    np.testing.assert_array_equal(dense.view(bits), staged.view(bits))
    np.testing.assert_array_equal(dense.view(bits), plain.view(bits))
    # log_softmax: dense out= and in place read x in place; a strided out stages.
    want = np.empty((rows, 2 * n), dtype)[:, ::2]
    sl.log_softmax(x, axis=1, where=keep, out=want)
    want = np.ascontiguousarray(want).view(bits)
    np.testing.assert_array_equal(sl.log_softmax(x, axis=1, where=keep).view(bits), want)
    inplace = x.copy()
    sl.log_softmax(inplace, axis=1, where=keep, out=inplace)
    np.testing.assert_array_equal(inplace.view(bits), want)
    hidden_ls = sl.log_softmax(hidden, axis=1)
    ok = np.isfinite(plain)  # rows whose kept state is finite: the unmasked op's bits
    np.testing.assert_array_equal(hidden_ls[ok].view(bits), want[ok])
    assert np.all(np.isneginf(sl.log_softmax(x, axis=1, where=keep)[~keep]))
    # softmax: the same three routes (the stored-exp kernel reading x and the mask in place).
    want = np.empty((rows, 2 * n), dtype)[:, ::2]
    sl.softmax(x, axis=1, where=keep, out=want)
    want = np.ascontiguousarray(want).view(bits)
    got = sl.softmax(x, axis=1, where=keep)
    np.testing.assert_array_equal(got.view(bits), want)
    inplace = x.copy()
    sl.softmax(inplace, axis=1, where=keep, out=inplace)
    np.testing.assert_array_equal(inplace.view(bits), want)
    np.testing.assert_array_equal(sl.softmax(hidden, axis=1)[ok].view(bits), want[ok])
    assert np.all(got[~keep].view(bits) == 0)  # +0.0 at every masked position
    got = _stream.chunk_states(x, (1,), keep)
    for want in (_stream.chunk_states(strided, (1,), keep), _stream.chunk_states(hidden, (1,))):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.view(np.uint64), b.view(np.uint64))


@pytest.mark.parametrize("n", [1029, 40000, 131075])
def test_masked_rows_streamed_into_a_large_out_equal_rows_written_through_the_cache(n):
    """An output of 64 MiB or more in rows of 4 KiB or more is written with non-temporal stores,
    the rows read in place (the mask applied as x is loaded): its bits must equal those of the
    same rows computed in halves small enough to be written through the cache (a wrong head or
    tail of a streamed row, a mask byte misread next to a vector boundary of out, a masked
    value streamed)."""
    rng = np.random.default_rng(n)
    rows = -(-(1 << 24) // n)
    x = rng.standard_normal((rows, n), dtype=np.float32)
    keep = rng.random((rows, n), dtype=np.float32) < 0.9
    keep[3] = False
    half = rows // 2
    for f, masked in ((sl.softmax, 0.0), (sl.log_softmax, -np.inf)):
        got = f(x, axis=1, where=keep)
        for part in (slice(0, half), slice(half, rows)):
            want = f(x[part], axis=1, where=keep[part])
            np.testing.assert_array_equal(got[part].view(np.uint32), want.view(np.uint32))
        assert np.all(got[~keep] == masked)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 10, 13, 15, 16, 33, 64])
def test_short_rows_read_beside_the_mask_equal_the_staged_path(dtype, n):
    """Short rows dense in x, the mask and out go through the short-row kernels with the mask
    read beside them, each group of rows masked as it is loaded or staged, as the SIMD level
    does it (softmax, log_softmax, logsumexp and the lane states); x strided takes the staged
    block. Both
    must give the same bits over many groups and blocks (a tail group, a block boundary, a mask
    byte read for the wrong row), in place too, also for fully masked rows, kept NaN / +inf /
    all -inf rows and masked NaN / +inf, and the unmasked op's bits on x with the masked
    elements at -inf where the kept state is finite."""
    rng = np.random.default_rng(100 + n)
    rows = 20011
    x = (rng.standard_normal((rows, n)) * 30).astype(dtype)
    keep = rng.random((rows, n)) < 0.85
    keep[1::101] = False
    x[2::103, 0], keep[2::103, 0] = np.inf, True
    x[3::107, n // 2], keep[3::107, n // 2] = np.nan, True
    x[4::109] = -np.inf
    x[5::113][~keep[5::113]] = np.nan
    x[6::127][~keep[6::127]] = np.inf
    x[7::131] = -800.0
    x[7::131, 0], keep[7::131, 0] = 0.0, True
    hidden = np.where(keep, x, -np.inf).astype(dtype)
    strided = np.empty((rows, 2 * n), dtype)[:, ::2]
    strided[...] = x
    bits = np.uint32 if dtype == np.float32 else np.uint64
    plain = sl.logsumexp(hidden, axis=1)
    ok = np.isfinite(plain)
    got = sl.logsumexp(x, axis=1, where=keep)
    staged = sl.logsumexp(strided, axis=1, where=keep)
    np.testing.assert_array_equal(got.view(bits), staged.view(bits))
    np.testing.assert_array_equal(got.view(bits), plain.view(bits))
    from stablelse import _stream

    got = _stream.chunk_states(x, (1,), keep)
    for want in (_stream.chunk_states(strided, (1,), keep), _stream.chunk_states(hidden, (1,))):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.view(np.uint64), b.view(np.uint64))
    for f, masked in ((sl.softmax, 0.0), (sl.log_softmax, -np.inf)):
        want = f(strided, axis=1, where=keep).view(bits)
        for threads in (1, 2):
            sl.set_num_threads(threads)
            try:
                _writes_equal(f, x, 1, keep, want, bits)
            finally:
                sl.set_num_threads(0)
        np.testing.assert_array_equal(f(hidden, axis=1)[ok].view(bits), want[ok])
        assert np.all(want.view(dtype)[~keep] == masked)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through ctypes")
def test_short_rows_and_masks_that_end_at_an_unreadable_page():
    """The short-row kernels read whole vectors of a row and whole 8-byte words of its mask
    past a short row, into the rows after it, where the arrays hold them. With the input and
    the mask ending right before a page that cannot be read, every row length and group of
    rows must read nothing past their ends (a read there kills the process) and give the
    bits of the same call on ordinary copies."""
    code = """
        import ctypes, mmap
        import numpy as np, stablelse as sl

        libc = ctypes.CDLL(None, use_errno=True)
        keep_alive = []

        def at_end(a):
            # `a`'s bytes copied to the very end of a mapping whose next page is unreadable.
            size = -(-a.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE + mmap.PAGESIZE
            m = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            assert libc.mprotect(ctypes.c_void_p(addr + size - mmap.PAGESIZE),
                                 mmap.PAGESIZE, 0) == 0
            out = np.frombuffer(m, a.dtype, a.size, size - mmap.PAGESIZE - a.nbytes)
            out = out.reshape(a.shape)
            out[...] = a
            keep_alive.append(m)
            return out

        rng = np.random.default_rng(7)
        for dtype in (np.float32, np.float64):
            for n in [*range(1, 17), 20, 33, 64, 100]:
                for rows in (1, 7, 8, 9, 17):
                    x = rng.standard_normal((rows, n)).astype(dtype)
                    keep = rng.random((rows, n)) < 0.8
                    t = rng.integers(0, n, rows)
                    keep[np.arange(rows), t] = True
                    gx, gkeep = at_end(x), at_end(keep)
                    for f in (sl.logsumexp, sl.softmax, sl.log_softmax):
                        want = f(x, axis=1, where=keep)
                        got = f(gx, axis=1, where=gkeep)
                        assert np.array_equal(got, want, equal_nan=True), (f, dtype, n, rows)
                    want = sl.cross_entropy(x, t, where=keep, return_grad=True)
                    got = sl.cross_entropy(gx, t, where=gkeep, return_grad=True)
                    assert got[0] == want[0] and np.array_equal(got[1], want[1])
                    assert sl.cross_entropy(gx, t, where=gkeep) == want[0]
        print("ok")
    """
    rc, out = _run_child(code)
    assert rc == 0 and out.strip().endswith("ok"), out[-2000:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((4096, 300), 0),
        ((7, 513, 33), 1),
        ((3, 100, 20), 0),
        ((70000, 3), 0),
        ((5, 0, 9), 1),
        ((40, 9000), 0),
    ],
)
def test_masked_columns_read_in_place_equal_the_staged_path(dtype, shape, axis):
    """Columns (a reduced axis before the last) whose mask lies as x does are read where they
    are by the column kernel, each masked element read as -inf; a mask of another layout
    stages x block by block. Both must give the same bits: logsumexp, the streaming states,
    softmax and log_softmax (new array, out= and in place), with masked NaN / +inf, kept +inf
    and fully masked columns."""
    rng = np.random.default_rng(len(shape) + shape[axis])
    x = (rng.standard_normal(shape) * 20).astype(dtype)
    keep = rng.random(shape) < 0.8
    if x.size:
        x.flat[::97] = np.nan
        keep.flat[::97] = False
        x.flat[5::131] = np.inf
        keep.flat[5::131] = True
        np.moveaxis(keep, axis, 0)[:, ..., 0] = False
    strided = np.empty((*shape, 2), bool)[..., 0]
    strided[...] = keep
    bits = np.uint32 if dtype == np.float32 else np.uint64
    got = sl.logsumexp(x, axis=axis, where=keep)
    staged = sl.logsumexp(x, axis=axis, where=strided)
    np.testing.assert_array_equal(got.view(bits), staged.view(bits))
    hidden = np.where(keep, x, -np.inf).astype(dtype)
    np.testing.assert_array_equal(got.view(bits), sl.logsumexp(hidden, axis=axis).view(bits))
    a = sl.LogSumExp(axis=axis).update(x, where=keep).result()
    b = sl.LogSumExp(axis=axis).update(x, where=strided).result()
    np.testing.assert_array_equal(a.view(bits), b.view(bits))
    for f in (sl.softmax, sl.log_softmax):
        want = f(x, axis=axis, where=strided).view(bits)
        _writes_equal(f, x, axis, keep, want, bits)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 10, 16, 33, 64, 100, 1000])
@pytest.mark.parametrize("mask_shape", ["key", "query", "scalar_row"])
def test_rows_under_a_broadcast_mask_equal_the_dense_mask(dtype, n, mask_shape):
    """A mask broadcast over rows (a key-padding mask `(B, 1, L)` over scores `(B, Q, L)`, or a
    `(1, Q, L)` mask shared by the batch) is read where it lies, one mask row for many rows;
    its results must be the bits of the same mask made dense: logsumexp, the streaming states,
    softmax and log_softmax (new array, out= and in place), over group and block boundaries,
    with fully masked rows, masked NaN / +inf and kept +inf."""
    rng = np.random.default_rng(n)
    b, q = 5, 37
    x = (rng.standard_normal((b, q, n)) * 20).astype(dtype)
    shape = {"key": (b, 1, n), "query": (1, q, n), "scalar_row": (1, 1, n)}[mask_shape]
    keep = rng.random(shape) < 0.8
    keep.reshape(-1, n)[0] = False
    x[..., 0] = np.nan
    x[1, :, -1] = np.inf
    dense = np.broadcast_to(keep, x.shape).copy()
    bits = np.uint32 if dtype == np.float32 else np.uint64
    want = sl.logsumexp(x, axis=-1, where=dense).view(bits)
    np.testing.assert_array_equal(sl.logsumexp(x, axis=-1, where=keep).view(bits), want)
    a = sl.LogSumExp(axis=-1).update(x, where=keep).result()
    c = sl.LogSumExp(axis=-1).update(x, where=dense).result()
    np.testing.assert_array_equal(a.view(bits), c.view(bits))
    for f in (sl.softmax, sl.log_softmax):
        want = f(x, axis=-1, where=dense).view(bits)
        _writes_equal(f, x, -1, keep, want, bits)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "flag_shape"),
    [
        ((1000, 10), -1, (1000, 1)),
        ((300, 100), -1, (300, 1)),
        ((7, 5000), 1, (7, 1)),
        ((10, 600), 0, (1, 600)),
        ((6, 9, 40), (1, 2), (6, 1, 1)),
        ((6, 9, 40), 1, (6, 1, 40)),
        ((4, 8, 50), (0, 2), (1, 8, 1)),
    ],
)
def test_a_flag_per_lane_equals_the_dense_mask(dtype, shape, axis, flag_shape):
    """A mask that is the same along the reduced axes (an `(R, 1)` flag per row, a flag per
    column, per slab) runs the unmasked op and sets the masked lanes after it. Its results
    must be the bits of the same mask made dense: logsumexp, the streaming states, softmax and
    log_softmax (new array, out= and in place), with NaN and +inf in masked lanes, kept +inf,
    every lane masked and none."""
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    x = (rng.standard_normal(shape) * 20).astype(dtype)
    x.reshape(-1)[::37] = np.nan
    x.reshape(-1)[5::41] = np.inf
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    flags = [rng.random(flag_shape) < 0.8, np.zeros(flag_shape, bool), np.ones(flag_shape, bool)]
    for flag in flags:
        dense = np.broadcast_to(flag, shape).copy()
        want = sl.logsumexp(x, axis=axis, where=dense)
        got = sl.logsumexp(x, axis=axis, where=flag)
        np.testing.assert_array_equal(np.asarray(got).view(bits), np.asarray(want).view(bits))
        a = sl.LogSumExp(axis=axis).update(x, where=flag).state
        c = sl.LogSumExp(axis=axis).update(x, where=dense).state
        for u, v in zip(a, c):
            np.testing.assert_array_equal(u.view(np.uint64), v.view(np.uint64))
        for f in (sl.softmax, sl.log_softmax):
            want = f(x, axis=axis, where=dense).view(bits)
            _writes_equal(f, x, axis, flag, want, bits)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [
        (300, 3),
        (1000, 10),
        (77, 17),
        (500, 64),
        (40, 1000),
        (3, 6, 100),
        (3, 50, 2049),
        (2, 9, 5000),
        (130, 20000),
    ],
)
def test_a_mask_stored_transposed_equals_the_dense_mask(dtype, shape):
    """A mask whose rows are stored transposed (Fortran order over C-ordered x, or a transposed
    view: consecutive rows one byte apart) has each block's mask rows moved into dense rows by
    byte tiles before the kernels read them (rows of more than 2048 elements: the whole mask
    copied into dense rows first, windows of at least 64 rows). logsumexp, the streaming
    states, softmax and log_softmax (new array, out= and in place) must be the bits of the
    C-ordered mask, with NaN and +inf in masked positions, kept +inf, rows masked whole and
    tile edges in both dimensions (a wrong byte of a tile, an edge tile's overlap, a run
    crossing an outer index or a window of the copy misplaced would show)."""
    rng = np.random.default_rng(shape[-1] * 7 + len(shape))
    x = (rng.standard_normal(shape) * 20).astype(dtype)
    keep = rng.random(shape) < 0.7
    x[~keep & (rng.random(shape) < 0.2)] = np.nan
    x[~keep & (rng.random(shape) < 0.2)] = np.inf
    x.reshape(-1, shape[-1])[3::11, 1] = np.inf
    keep.reshape(-1, shape[-1])[5::13] = False
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    transposed = [
        np.asfortranarray(keep),
        np.ascontiguousarray(keep.swapaxes(-1, -2)).swapaxes(-1, -2),
    ]
    for m in transposed:
        want = sl.logsumexp(x, axis=-1, where=keep)
        got = sl.logsumexp(x, axis=-1, where=m)
        np.testing.assert_array_equal(np.asarray(got).view(bits), np.asarray(want).view(bits))
        a = sl.LogSumExp(axis=-1).update(x, where=m).state
        c = sl.LogSumExp(axis=-1).update(x, where=keep).state
        for u, v in zip(a, c):
            np.testing.assert_array_equal(u.view(np.uint64), v.view(np.uint64))
        for f in (sl.softmax, sl.log_softmax):
            _writes_equal(f, x, -1, m, f(x, axis=-1, where=keep).view(bits), bits)
