"""Hypothesis fuzzer over every public stablelse function; run in a child process.

    python tests/_fuzz_child.py

tests/test_fuzz.py runs this file with ``subprocess`` so that a crash (segfault, abort, hang) is
a test failure with the seed and the last call printed, not a lost pytest run. Environment:

    STABLELSE_FUZZ_EXAMPLES  hypothesis examples (default 300)
    STABLELSE_FUZZ_SEED      hypothesis seed (default: random, printed first)
    STABLELSE_FUZZ_LAST      file that holds the call in progress (read back after a crash)
    STABLELSE_FUZZ_ONLY      comma-separated families: scipy, loss, backward, stream, threads

Every call draws a function, an input of any dtype (float16/32/64, big-endian, longdouble,
integers, bool, complex, object, str, bytes, datetime, structured, lists, scalars, None), any
shape (0-d, empty axes, up to 32 dims), any layout (Fortran, negative, strided, zero-stride
broadcast, unaligned views of a byte buffer, read-only), axes, weights, `out` arrays (wrong
shape, dtype, read-only, overlapping, the input itself) and keyword values. The contract:

* the call returns scipy.special's result (computed in float64) or the float64 reference of the
  torch loss, with the documented result dtype and shape, and never writes its input; or
* it raises ValueError, TypeError or IndexError (AxisError counts) whose message names one of
  the function's arguments, and leaves `out` (and an in-place input) untouched.

Any other exception, a crash or a hang is a failure.
"""

from __future__ import annotations

import faulthandler
import os
import random
import re
import sys
import warnings
from collections import Counter
from typing import Any

import numpy as np
import scipy.special as sp
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelse as sl

ALLOWED = (ValueError, TypeError, IndexError)
STATS: Counter[str] = Counter()
LAST_PATH = os.environ.get("STABLELSE_FUZZ_LAST")

ARGNAMES = {
    "logsumexp": ("a", "axis", "b", "keepdims", "return_sign", "out", "algorithm"),
    "softmax": ("x", "axis", "out", "algorithm"),
    "log_softmax": ("x", "axis", "out", "algorithm"),
    "cross_entropy": (
        "logits",
        "target",
        "axis",
        "weight",
        "ignore_index",
        "reduction",
        "label_smoothing",
        "z_loss",
        "return_grad",
    ),
    "nll_loss": ("log_probs", "target", "axis", "weight", "ignore_index", "reduction"),
    "softmax_backward": ("y", "dy", "axis"),
    "log_softmax_backward": ("y", "dy", "axis"),
    "LogSumExp": ("axis", "chunk", "b", "keepdims"),
    "set_num_threads": ("n",),
}

# --------------------------------------------------------------------------- inputs

FLOAT_KINDS = ["f8", "f4", "f2", ">f8", ">f4", "g"]
OTHER_NUMERIC = ["i1", "i8", "u1", "u8", "?", ">i4"]
HOSTILE = ["c16", "c8", "O_float", "O_none", "U", "S", "M8[D]", "m8[s]", "V8", "struct"]
PY = ["list", "scalar", "none", "ragged"]

finite = st.floats(-60, 60, allow_nan=False, width=64)
special = st.sampled_from([np.inf, -np.inf, np.nan, 0.0, -0.0, 5e-324, -5e-324, 1e-310])
huge = st.sampled_from([1e30, -1e30, 3e38, -3e38, 1e300, -1e300, 1.7e308, -1.7e308, 700.0, -745.0])
elements = st.one_of(finite, finite, finite, special, huge)


@st.composite
def shapes(draw: Any, min_dims: int = 0, max_dims: int = 32) -> tuple[int, ...]:
    ndim = draw(st.one_of(st.integers(min_dims, min(4, max_dims)), st.integers(min_dims, max_dims)))
    shape, size = [], 1
    for _ in range(ndim):
        side = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 7, 0, 17, 33]))
        if size * side > 400:
            side = 1
        shape.append(side)
        size *= max(side, 1)
    return tuple(shape)


def _relayout(draw: Any, arr: np.ndarray) -> np.ndarray:
    """The same values in another memory layout."""
    layout = draw(
        st.sampled_from(["C", "C", "F", "neg", "strided", "bcast", "unaligned", "readonly"])
    )
    if arr.ndim == 0 or arr.dtype.kind == "O":
        return arr
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "neg":
        rev = (slice(None, None, -1),) * arr.ndim
        return np.ascontiguousarray(arr[rev])[rev]
    if layout == "strided":
        big = np.zeros(arr.shape[:-1] + (arr.shape[-1] * 2 + 1,), dtype=arr.dtype)
        big[..., 1::2] = arr
        return big[..., 1::2]
    if layout == "bcast":
        return np.broadcast_to(arr[:1], arr.shape)
    if layout == "unaligned" and arr.dtype.itemsize > 1:
        raw = np.zeros(arr.nbytes + 1, dtype=np.uint8)
        un = raw[1:].view(arr.dtype).reshape(arr.shape)
        un[...] = arr
        return un
    if layout == "readonly":
        arr = arr.copy()
        arr.flags.writeable = False
    return arr


@st.composite
def real_arrays(
    draw: Any, shape: tuple[int, ...] | None = None, kinds: list[str] | None = None
) -> Any:
    """A real-valued input (mostly float), any layout, or a Python list / scalar."""
    if shape is None:
        shape = draw(shapes())
    kind = draw(st.sampled_from(kinds or FLOAT_KINDS * 4 + OTHER_NUMERIC))
    if kind in FLOAT_KINDS:
        base = draw(hnp.arrays(np.float64, shape, elements=elements))
        with np.errstate(all="ignore"):
            arr = base.astype(kind)
    else:
        arr = draw(hnp.arrays(np.dtype(kind), shape))
    arr = _relayout(draw, arr)
    form = draw(st.sampled_from(["array"] * 12 + ["list", "scalar0d"]))
    if form == "list" and arr.dtype.kind in "fiub" and arr.dtype.isnative:
        return arr.tolist()
    if form == "scalar0d" and arr.ndim == 0:
        return arr[()]
    return arr


@st.composite
def hostile(draw: Any) -> Any:
    shape = draw(shapes(max_dims=3))
    kind = draw(st.sampled_from(HOSTILE + PY))
    size = int(np.prod(shape))
    if kind in ("c16", "c8"):
        return (np.ones(shape) + 1j).astype(kind)
    if kind == "O_float":
        arr = np.empty(shape, dtype=object)
        arr[...] = 1.5
        return arr
    if kind == "O_none":
        return np.empty(shape, dtype=object)
    if kind == "U":
        return np.full(shape, "1.0")
    if kind == "S":
        return np.full(shape, b"ab")
    if kind in ("M8[D]", "m8[s]"):
        return np.zeros(shape, dtype=kind)
    if kind == "V8":
        return np.zeros(shape, dtype="V8")
    if kind == "struct":
        return np.zeros(shape, dtype=[("a", "f8"), ("b", "f4")])
    if kind == "list":
        return [[1.0, 2.0], [3.0, "x"]]
    if kind == "scalar":
        return draw(st.sampled_from([1.5, 3, True, np.float32(2.0), np.int8(-3), 1e308]))
    if kind == "ragged":
        return [[1.0], [1.0, 2.0]][: max(size, 2)]
    return None


inputs = st.one_of(real_arrays(), real_arrays(), real_arrays(), real_arrays(), hostile())


def axes_for(draw: Any, ndim: int) -> Any:
    choice = draw(st.sampled_from(["none", "int", "int", "int", "tuple", "bad"]))
    if choice == "none":
        return None
    if choice == "int":
        return draw(st.integers(-ndim - 1, ndim))
    if choice == "tuple":
        k = draw(st.integers(0, max(ndim, 1)))
        axes = draw(st.lists(st.integers(-ndim, max(ndim - 1, 0)), min_size=k, max_size=k))
        return draw(st.sampled_from([tuple, list]))(axes)
    return draw(st.sampled_from([1.5, "0", np.int64(0), np.int8(-1), True, [0, "a"], (0, 0)]))


def _shape_of(v: Any) -> tuple[int, ...]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.shape(v)
    except Exception:
        return ()


def out_for(draw: Any, x: Any, shape: tuple[int, ...], dtype: np.dtype | None) -> Any:
    """An `out` argument: None most of the time, else good or bad in some way."""
    choice = draw(
        st.sampled_from(
            ["none"] * 4
            + [
                "good",
                "good",
                "strided",
                "F",
                "self",
                "wrong_shape",
                "wrong_dtype",
                "readonly",
                "list",
                "unaligned",
                "bigendian",
                "overlap",
                "zero_stride",
            ]
        )
    )
    if choice == "none" or dtype is None:
        return None
    if choice == "self":
        return x
    if choice == "list":
        return np.zeros(shape).tolist()
    if choice == "wrong_shape":
        return np.zeros(shape + (2,), dtype=dtype)
    if choice == "wrong_dtype":
        return np.zeros(shape, dtype=np.float32 if dtype != np.float32 else np.float64)
    if choice == "bigendian":
        return np.zeros(shape, dtype=dtype.newbyteorder(">"))
    if choice == "overlap" and isinstance(x, np.ndarray) and x.flags.writeable and x.ndim:
        flat = np.lib.stride_tricks.as_strided(x, shape=shape, strides=(0,) * len(shape))
        return flat
    out = np.zeros(shape, dtype=dtype)
    if choice == "strided" and out.ndim:
        big = np.zeros(shape[:-1] + (shape[-1] * 3,), dtype=dtype)
        out = big[..., ::3]
    elif choice == "F":
        out = np.asfortranarray(out)
    elif choice == "readonly":
        out.flags.writeable = False
    elif choice == "unaligned" and dtype.itemsize > 1:
        raw = np.zeros(out.nbytes + 1, dtype=np.uint8)
        out = raw[1:].view(dtype).reshape(shape)
    elif choice == "zero_stride" and out.ndim:
        out = np.lib.stride_tricks.as_strided(
            np.zeros(1, dtype=dtype), shape=shape, strides=(0,) * len(shape)
        )
    return out


# --------------------------------------------------------------------------- oracle helpers


def _f64(v: Any) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(v).astype(np.float64)


def _native(dt: np.dtype) -> np.dtype:
    return dt.newbyteorder("=") if dt.byteorder not in "=|" else dt


def _real_dtype(v: Any) -> np.dtype | None:
    """stablelse's compute dtype rule for one input (None: not a real numeric input)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dt = np.asarray(v).dtype
    except Exception:
        return None
    if dt.kind == "f":
        return _native(dt)
    if dt.kind in "biu":
        return np.dtype(np.float64)
    return None


def assert_close(got: Any, want: Any, dtype: np.dtype, what: str, scale: Any = None) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert _native(got.dtype) == _native(dtype), f"{what}: dtype {got.dtype} != {dtype}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    eps = float(np.finfo(dtype if dtype.itemsize <= 8 else np.float64).eps)
    with np.errstate(all="ignore"):
        # The reference is float64 and rounded to the result dtype for comparison.
        w = w.astype(dtype).astype(np.float64) if dtype.itemsize < 8 else w
        nan_g, nan_w = np.isnan(g), np.isnan(w)
        assert np.array_equal(nan_g, nan_w), f"{what}: NaN at {np.argwhere(nan_g != nan_w)[:4]}"
        inf_w = np.isinf(w)
        assert np.array_equal(g[inf_w], w[inf_w]), f"{what}: inf mismatch {g[inf_w]} {w[inf_w]}"
        fin = np.isfinite(w)
        assert np.all(np.isfinite(g[fin])), f"{what}: got non-finite where finite expected"
        tiny = float(np.finfo(dtype if dtype.itemsize <= 8 else np.float64).tiny)
        atol = np.full(w.shape, 4 * tiny)
        if scale is not None:
            atol = atol + 32 * eps * np.broadcast_to(_f64(scale), w.shape)
        err = np.abs(g - w)
        # Rounded once to the result dtype, plus float64 summation-order differences.
        rtol = 16 * eps + 256 * float(np.finfo(np.float64).eps)
        bad = fin & (err > rtol * np.abs(w) + atol)
    assert not bad.any(), (
        f"{what}: got {g[bad][:4]} want {w[bad][:4]} (dtype {dtype}, at {np.argwhere(bad)[:4]})"
    )


def check_error(fn: str, exc: BaseException) -> None:
    """An exception from stablelse must be an allowed type naming an argument."""
    if not isinstance(exc, ALLOWED):
        raise AssertionError(f"{fn} raised {type(exc).__name__}: {exc}") from exc
    msg = str(exc)
    names = ARGNAMES[fn]
    if not re.search(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", msg):
        raise AssertionError(f"{fn}: message {msg!r} names none of {names}") from exc


def snapshot(*arrays: Any) -> list[tuple[Any, bytes | None]]:
    out = []
    for a in arrays:
        if isinstance(a, np.ndarray) and a.dtype.kind != "O":
            out.append((a, np.array(a, copy=True).tobytes()))
    return out


def unchanged(snap: list[tuple[Any, bytes | None]], what: str) -> None:
    for a, before in snap:
        assert np.array(a, copy=True).tobytes() == before, f"{what} was written"


def describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        flags = "".join(
            k[0] for k in ("C_CONTIGUOUS", "F_CONTIGUOUS", "WRITEABLE", "ALIGNED") if v.flags[k]
        )
        vals = np.array2string(v.ravel()[:64], threshold=64) if v.dtype.kind != "V" else "..."
        return (
            f"ndarray(shape={v.shape}, dtype={v.dtype.str}, strides={v.strides}, "
            f"flags={flags}, values={vals})"
        )
    r = repr(v)
    return r if len(r) < 300 else r[:300] + "..."


def record(fn: str, kwargs: dict[str, Any]) -> None:
    if LAST_PATH:
        text = f"{fn}(" + ", ".join(f"{k}={describe(v)}" for k, v in kwargs.items()) + ")\n"
        with open(LAST_PATH, "w") as f:
            f.write(text)


def call(fn: str, f: Any, kwargs: dict[str, Any], outs: tuple[Any, ...] = ()) -> Any:
    """Calls ``f(**kwargs)``; on an allowed error checks that `outs` and inputs are unchanged
    and returns the exception, else the result."""
    record(fn, kwargs)
    snap = snapshot(*kwargs.values(), *outs)
    STATS[fn] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = f(**kwargs)
    except Exception as exc:  # noqa: BLE001 - classified by check_error
        check_error(fn, exc)
        unchanged(snap, "an argument (after an error)")
        STATS[fn + ":raised"] += 1
        return exc
    # Inputs that are not an out are never written.
    outs_ids = {id(o) for o in outs if o is not None}
    unchanged(
        [(a, b) for a, b in snap if id(a) not in outs_ids and not _aliases(a, outs)], "an input"
    )
    return res


def _aliases(a: Any, outs: tuple[Any, ...]) -> bool:
    return any(isinstance(o, np.ndarray) and np.shares_memory(a, o) for o in outs if o is not None)


def scipy_call(fn: str, *args: Any, **kw: Any) -> tuple[Any, BaseException | None]:
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return getattr(sp, fn)(*args, **kw), None
    except Exception as exc:  # noqa: BLE001
        return None, exc


# --------------------------------------------------------------------------- scipy functions


def _is_complex(v: Any) -> bool:
    try:
        return np.asarray(v).dtype.kind == "c"
    except Exception:
        return False


def _size(v: Any) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(np.asarray(v).size)
    except Exception:
        return -1


def _expected_dtype(fn: str, x: Any, b: Any = None) -> np.dtype:
    dx = _real_dtype(x)
    assert dx is not None
    if b is None:
        if fn == "logsumexp":
            return dx
        # softmax / log_softmax: small ints are promoted to float64 (documented deviation).
        return dx
    # Weights: as scipy, result_type of the raw dtypes, then the promotion rules.
    db = _real_dtype(b)
    raw = np.result_type(np.asarray(x).dtype, np.asarray(b).dtype)
    assert db is not None
    if raw.kind != "f":
        return np.dtype(np.float64)
    return _native(raw)


def check_scipy_fn(fn: str, kwargs: dict[str, Any], res: Any) -> None:
    """Compares a successful stablelse call with scipy computed in float64."""
    main = "a" if fn == "logsumexp" else "x"
    x = kwargs[main]
    kw = _scipy_kwargs(kwargs, main)
    xdt = _real_dtype(x)
    assert xdt is not None, f"{fn} accepted a non-real input {describe(x)}"
    if _size(x) == 0 or ("b" in kw and kw["b"] is not None and _size(kw["b"]) == 0):
        # scipy raises on empty softmax input and mishandles empty logsumexp (axis=() on an
        # empty array reduces it); the reference for empty input is NumPy's sum of exp.
        want, exc = _empty_reference(fn, x, kw)
    else:
        want, exc = scipy_call(fn, _f64(x), **kw)
        if exc is None and fn == "logsumexp" and kw.get("b") is not None:
            # scipy documents NaN for a negative sum without return_sign, but returns -inf
            # when exp(max) underflows (a = -1000, b = -1): take the sign from scipy itself.
            signed, _ = scipy_call(fn, _f64(x), **{**kw, "return_sign": True})
            if not kw.get("return_sign"):
                want = np.where(np.asarray(signed[1]) < 0, np.nan, want)[()]
            # All weights of a lane zero and exp(a) overflowing the input dtype: scipy (on the
            # input's own dtypes) and stablelse give NaN, not log(0) = -inf (the weighted
            # kernel's fallback multiplies inf by 0).
            native, nexc = scipy_call(fn, np.asarray(x), **{**kw, "b": np.asarray(kwargs["b"])})
            if nexc is None:
                nat = np.asarray(native[0] if kw.get("return_sign") else native)
                if np.shape(nat) == np.shape(want[0] if kw.get("return_sign") else want):
                    got0 = np.asarray(res[0] if kw.get("return_sign") else res)
                    # Either answer is accepted there: -inf (exact) or scipy's NaN.
                    fix = np.isnan(nat) & np.isneginf(
                        np.asarray(want[0] if kw.get("return_sign") else want)
                    )
                    fix = fix & np.isnan(got0) if got0.shape == fix.shape else fix
                    if fix.any():
                        if kw.get("return_sign"):
                            want = (
                                np.where(fix, np.nan, want[0])[()],
                                np.where(fix, np.nan, want[1])[()],
                            )
                        else:
                            want = np.where(fix, np.nan, want)[()]
    if exc is not None:
        # A 0-d input takes axis 0 / -1 (as scipy's logsumexp; scipy's softmax refuses it).
        if np.ndim(x) == 0 and isinstance(exc, np.exceptions.AxisError):
            return
        raise AssertionError(f"{fn} succeeded where scipy raised {exc!r}")
    rdtype = _expected_dtype(fn, x, kwargs.get("b"))
    out = kwargs.get("out")
    if fn == "logsumexp" and kwargs.get("return_sign"):
        assert isinstance(res, tuple) and len(res) == 2, "return_sign gives (res, sign)"
        r, s = res
        assert_close(s, want[1], rdtype, "sign")
        want = want[0]
    else:
        r = res
    scale = None
    if fn in ("logsumexp", "log_softmax"):
        fx = _f64(x)
        with np.errstate(all="ignore"):
            scale = np.max(np.abs(np.where(np.isfinite(fx), fx, 0)), initial=1.0)
    assert_close(r, want, rdtype, fn, scale)
    if np.ndim(want) == 0 and out is None:
        assert not isinstance(r, np.ndarray), f"{fn}: a 0-d result must be a scalar"
    if out is not None:
        assert np.array_equal(np.asarray(out), np.asarray(r), equal_nan=True), "out != result"
        if fn != "logsumexp" or np.ndim(out) > 0:
            assert r is out, f"{fn} must return out"


def _scipy_kwargs(kwargs: dict[str, Any], main: str) -> dict[str, Any]:
    kw = {k: v for k, v in kwargs.items() if k not in (main, "out", "algorithm")}
    if "b" in kw and kw["b"] is not None:
        kw["b"] = _f64(kw["b"])
    if isinstance(kw.get("axis"), list):
        kw["axis"] = tuple(kw["axis"])  # a stablelse extension; scipy takes tuples only
    return kw


def _empty_reference(fn: str, x: Any, kw: dict[str, Any]) -> tuple[Any, BaseException | None]:
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            a = _f64(x)
            if a.ndim == 0:
                a = a.reshape(1)
            axis = kw.get("axis")
            if fn != "logsumexp":
                np.sum(a, axis=axis)  # validates axis
                return np.exp(a) if fn == "softmax" else a, None
            b = kw.get("b")
            if b is not None:
                a, b = np.broadcast_arrays(a, b)
            terms = np.exp(a) if b is None else b * np.exp(a)
            s = np.sum(terms, axis=axis, keepdims=bool(kw.get("keepdims")))
            res = np.log(np.abs(s)) if kw.get("return_sign") else np.log(s)
            if kw.get("return_sign"):
                sign = np.where(s == 0, -1.0, np.sign(s))
                return (res[()], sign[()]), None
            return res[()], None
    except Exception as exc:  # noqa: BLE001
        return None, exc


@st.composite
def scipy_calls(draw: Any) -> tuple[str, dict[str, Any]]:
    fn = draw(st.sampled_from(["logsumexp", "softmax", "log_softmax"]))
    x = draw(inputs)
    ndim = len(_shape_of(x))
    kwargs: dict[str, Any] = {"a" if fn == "logsumexp" else "x": x}
    if draw(st.booleans()):
        kwargs["axis"] = axes_for(draw, ndim)
    if fn == "logsumexp":
        if draw(st.integers(0, 3)) == 0:
            shp = _shape_of(x)
            k = draw(st.integers(0, len(shp)))
            bshape = tuple(draw(st.sampled_from([s, 1])) for s in shp[len(shp) - k :])
            if draw(st.integers(0, 9)) == 0:
                bshape = bshape + (2,)  # most likely does not broadcast
            bel = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, -1.0, np.nan, np.inf]))
            b = draw(
                st.one_of(
                    real_arrays(bshape),
                    hnp.arrays(np.float64, bshape, elements=bel),
                    hostile(),
                )
            )
            kwargs["b"] = b
        for k in ("keepdims", "return_sign"):
            if draw(st.booleans()):
                kwargs[k] = draw(st.sampled_from([True, False, 0, 1, np.True_, None]))
    if draw(st.integers(0, 5)) == 0:
        kwargs["algorithm"] = draw(st.sampled_from(["auto", "two_pass", "online", "fast", None]))
    # An out of the shape and dtype the result will have (when it can be known).
    xdt = _real_dtype(x)
    if xdt is not None and draw(st.integers(0, 2)) == 0:
        rshape: tuple[int, ...] | None = _shape_of(x)
        if fn == "logsumexp":
            probe, exc = scipy_call(
                "logsumexp",
                np.zeros(_shape_of(x)),
                axis=kwargs.get("axis"),
                keepdims=bool(kwargs.get("keepdims")),
            )
            rshape = np.shape(probe) if exc is None else None
            if "b" in kwargs:
                rshape = None if _real_dtype(kwargs["b"]) is None else rshape
        if rshape is not None:
            rdt = _expected_dtype(fn, x, kwargs.get("b")) if fn == "logsumexp" else xdt
            if rdt.kind == "f" and not (fn == "logsumexp" and "b" in kwargs and rshape != ()):
                kwargs["out"] = out_for(draw, x, rshape, rdt)
    return fn, kwargs


def _has_bool_axis(axis: Any) -> bool:
    items = axis if isinstance(axis, (tuple, list)) else [axis]
    return any(isinstance(a, (bool, np.bool_)) for a in items)


def run_scipy_call(fn: str, kwargs: dict[str, Any]) -> None:
    out = kwargs.get("out")
    x = kwargs.get("a", kwargs.get("x"))
    inplace = out is not None and out is x
    if isinstance(out, np.ndarray) and out.flags.writeable and not inplace:
        if out.dtype.kind == "f" and out.strides and 0 not in out.strides:
            out[...] = 7.0  # sentinel: must survive an error untouched
    # The reference is computed from the input as it was: an `out` that aliases the input
    # (in place, or a view of it) may legitimately overwrite it.
    x_before = np.array(x, copy=True) if isinstance(x, np.ndarray) and x.dtype.kind != "O" else None
    res = call(fn, getattr(sl, fn), kwargs, outs=(out,) if out is not None else ())
    if isinstance(res, BaseException):
        ok_to_raise = (
            _real_dtype(x) is None
            or ("b" in kwargs and _real_dtype(kwargs["b"]) is None)
            or out is not None
            or kwargs.get("algorithm") not in (None, "auto", "two_pass", "online")
            or ("algorithm" in kwargs and kwargs["algorithm"] is None)
            or _has_bool_axis(kwargs.get("axis"))  # refused as NumPy does (scipy: not always)
        )
        if not ok_to_raise:
            main = "a" if fn == "logsumexp" else "x"
            _, sexc = scipy_call(fn, _f64(x), **_scipy_kwargs(kwargs, main))
            if sexc is None:
                raise AssertionError(f"{fn} raised {res!r} where scipy succeeds") from res
        return
    if x_before is not None:
        kwargs = dict(kwargs)
        kwargs["a" if fn == "logsumexp" else "x"] = x_before
    if _is_complex(kwargs["a" if fn == "logsumexp" else "x"]) or _is_complex(kwargs.get("b")):
        check_complex_scipy_fn(fn, kwargs, res)
        return
    check_scipy_fn(fn, kwargs, res)


def check_complex_scipy_fn(fn: str, kwargs: dict[str, Any], res: Any) -> None:
    """Complex input: the result's shape and dtype are scipy's on the same input (values and
    special-value placement are checked in test_complex.py and by scipy's own suite)."""
    main = "a" if fn == "logsumexp" else "x"
    kw = {k: v for k, v in kwargs.items() if k not in (main, "out", "algorithm")}
    if isinstance(kw.get("axis"), list):
        kw["axis"] = tuple(kw["axis"])
    want, exc = scipy_call(fn, kwargs[main], **kw)
    if exc is not None or _size(kwargs[main]) == 0:
        return
    pairs = zip(res, want) if kw.get("return_sign") else [(res, want)]
    for got, ref in pairs:
        got, ref = np.asarray(got), np.asarray(ref)
        assert got.shape == ref.shape, f"{fn}: shape {got.shape}, scipy {ref.shape}"
        assert got.dtype == ref.dtype, f"{fn}: dtype {got.dtype}, scipy {ref.dtype}"


# --------------------------------------------------------------------------- losses


def _as_compute(w: Any, x: Any) -> np.ndarray:
    """Weights as the kernels see them: in the logits' compute dtype (float16 -> float32)."""
    dt = _real_dtype(x)
    dt = np.dtype(np.float32) if dt is not None and dt.itemsize <= 4 else np.dtype(np.float64)
    with np.errstate(all="ignore"):
        return np.asarray(w).astype(dt)


def ref_cross_entropy(x, t, ax, w, ii, red, ls, zl, probs):  # noqa: ANN001
    """float64 reference of torch's cross_entropy (+ stablelse's z_loss) and its gradient."""
    xm = np.moveaxis(_f64(x), ax, -1)
    C = xm.shape[-1]
    lse = sp.logsumexp(xm, axis=-1)
    logp = xm - lse[..., None]
    p = np.exp(logp)
    wv = np.ones(C) if w is None else _f64(_as_compute(w, x))
    if probs:
        q = np.moveaxis(_f64(t), ax, -1) * (1 - ls) + (ls / C if C else 0.0)
        a = q * wv
        valid = np.ones(xm.shape[:-1], dtype=bool)
        denom = float(valid.sum())
    else:
        t = np.asarray(t).astype(np.int64)
        valid = t != ii
        tc = np.where(valid, t, 0)
        a = np.zeros(xm.shape)
        np.put_along_axis(a, tc[..., None], (1 - ls) * wv[tc][..., None], axis=-1)
        a = a + (ls / C if C else 0.0) * wv
        a[~valid] = 0
        denom = float(wv[tc][valid].sum())
    per_ce = -(a * logp).sum(-1)
    per_z = zl * lse**2 * valid
    count = float(valid.sum())
    g_ce = a.sum(-1)[..., None] * p - a
    g_z = (2 * zl * lse * valid)[..., None] * p
    if red == "none":
        loss, grad = per_ce + per_z, g_ce + g_z
    elif red == "sum":
        loss, grad = per_ce.sum() + per_z.sum(), g_ce + g_z
    else:
        loss = per_ce.sum() / denom + (per_z.sum() / count if zl else 0.0)
        grad = g_ce / denom + (g_z / count if zl else 0.0)
    # logp = x - lse cancels: its float64 error is eps * |x|, not eps * |logp|.
    xmax = np.max(np.abs(xm), axis=-1, keepdims=True, initial=0.0)
    elem_scale = (np.abs(a) * (np.abs(logp) + xmax)).sum(-1) + np.abs(per_z)
    scale = elem_scale if red == "none" else elem_scale.sum()
    # Gradient entries sum_c(a) * p - a cancel: error ~ eps * sum|a| * (1 + |x|); the z-loss
    # term 2 z lse p carries p's error, eps * |x| relative, as well.
    gscale = (np.abs(a).sum(-1, keepdims=True) + np.abs(2 * zl * lse)[..., None]) * (1 + xmax)
    if red == "mean":
        scale = scale / max(denom, 1e-300)
        gscale = gscale / max(min(denom, count), 1e-300)
    gscale = np.broadcast_to(gscale, grad.shape)
    return loss, np.moveaxis(grad, -1, ax), scale, np.moveaxis(gscale, -1, ax)


@st.composite
def loss_calls(draw: Any) -> tuple[str, dict[str, Any]]:
    fn = draw(st.sampled_from(["cross_entropy", "nll_loss"]))
    # One call in three gets hostile values anywhere; the others are valid but for a target
    # out of range now and then, so that the value checks below see many results.
    bad = draw(st.integers(0, 2)) == 0

    def pick(good: list[Any], hostile_values: list[Any]) -> Any:
        return draw(st.sampled_from(good + hostile_values if bad else good))

    shp = draw(shapes(min_dims=1, max_dims=4))
    main = "logits" if fn == "cross_entropy" else "log_probs"
    x = draw(st.one_of(real_arrays(shp), hostile()) if bad else real_arrays(shp))
    kwargs: dict[str, Any] = {main: x}
    ndim = len(_shape_of(x))
    if bad:
        axis = draw(st.one_of(st.integers(-ndim - 1, ndim), st.sampled_from([1.5, None])))
    else:
        axis = draw(st.integers(-ndim, max(ndim - 1, 0))) if ndim else -1
    if axis != -1 or draw(st.booleans()):
        kwargs["axis"] = axis
    xs = _shape_of(x)
    try:
        ax = int(axis) % ndim if ndim and type(axis) is int and -ndim <= axis < ndim else None
    except Exception:
        ax = None
    C = xs[ax] if ax is not None else 3
    batch = xs[:ax] + xs[ax + 1 :] if ax is not None else ()
    ii = pick([-100, -100, -100, 0, 1, -1], [2**63 - 1, 2**64, "x", 1.0])
    if ii != -100:
        kwargs["ignore_index"] = ii
    tkind = pick(["index", "index", "probs"], ["bad"])
    if tkind == "index":
        lo = -1 if isinstance(ii, int) and ii != -100 else 0
        tdt = draw(st.sampled_from(["i8", "i4", "u1", "i1", "u8", ">i8"]))
        vals = draw(hnp.arrays(np.int64, batch, elements=st.integers(lo, max(C - 1, 0))))
        if isinstance(ii, int) and -(2**63) <= ii < 2**63 and draw(st.booleans()) and vals.size:
            vals.flat[0] = ii  # some ignored targets
        if draw(st.integers(0, 19)) == 0 and vals.size:
            vals.flat[-1] = C + draw(st.integers(0, 3))  # out of range
        with np.errstate(all="ignore"):
            target: Any = vals.astype(tdt) if tdt[-2:] != "u8" or (vals >= 0).all() else vals
        if draw(st.integers(0, 6)) == 0:
            target = target.tolist()
    elif tkind == "probs":
        target = draw(
            st.one_of(
                hnp.arrays(np.float64, xs, elements=st.floats(0, 1)),
                real_arrays(xs, kinds=["f4", "f8", "f2", ">f8"]),
            )
        )
    else:
        target = draw(
            st.one_of(
                hostile(),
                real_arrays(batch, kinds=["f8"]),
                real_arrays(xs, kinds=["i8"]),
                st.just(None),
            )
        )
    kwargs["target"] = target
    if draw(st.integers(0, 2)) == 0:
        good_w = [
            hnp.arrays(np.float64, (C,), elements=st.floats(0, 3)),
            real_arrays((C,), kinds=["f4", "f8", "i8"]),
        ]
        kwargs["weight"] = draw(
            st.one_of(*good_w, real_arrays((C + 1,)), hostile()) if bad else st.one_of(*good_w)
        )
    if draw(st.booleans()):
        kwargs["reduction"] = pick(["mean", "sum", "none"], ["avg", None])
    if fn == "cross_entropy":
        if draw(st.integers(0, 2)) == 0:
            kwargs["label_smoothing"] = pick(
                [0.0, 0.1, 1.0, np.float32(0.2)], [-0.1, 1.5, np.nan, "x"]
            )
        if draw(st.integers(0, 2)) == 0:
            kwargs["z_loss"] = pick([0.0, 1e-4, 0.5], [-1.0, np.inf, "x"])
        if draw(st.booleans()):
            kwargs["return_grad"] = pick([True, False, 1], [])
    return fn, kwargs


def run_loss_call(fn: str, kwargs: dict[str, Any]) -> None:
    f = getattr(sl, fn, None)
    if f is None:
        return
    res = call(fn, f, kwargs)
    if isinstance(res, BaseException):
        return
    main = "logits" if fn == "cross_entropy" else "log_probs"
    x, t = kwargs[main], kwargs["target"]
    xdt = _real_dtype(x)
    assert xdt is not None, f"{fn} accepted non-real {main}"
    xa = np.asarray(x)
    ax = kwargs.get("axis", -1) % xa.ndim
    w = kwargs.get("weight")
    ta = np.asarray(t)
    probs = ta.shape == xa.shape and ta.dtype.kind == "f"
    red = kwargs.get("reduction", "mean")
    ii = kwargs.get("ignore_index", -100)
    ls = float(kwargs.get("label_smoothing", 0.0))
    zl = float(kwargs.get("z_loss", 0.0))
    grad_wanted = bool(kwargs.get("return_grad", False))
    if grad_wanted:
        assert isinstance(res, tuple) and len(res) == 2
        loss, grad = res
    else:
        loss, grad = res, None
    if not probs:
        tv = ta.astype(np.int64) if ta.dtype.kind in "iu" else ta
        bad = (tv != ii) & ((tv < 0) | (tv >= xa.shape[ax]))
        assert not np.any(bad), f"{fn} accepted an out-of-range target"
    fx = _f64(x)
    if not np.all(np.isfinite(fx)) or np.any(np.abs(fx) > 1e15) or xa.shape[ax] == 0:
        return  # IEEE specials, huge values, no classes: the contract checks above suffice
    if w is not None and not np.all(np.isfinite(_f64(_as_compute(w, x)))):
        return
    if probs and not np.all(np.abs(_f64(t)) < 1e15):
        return  # infinite or huge probabilities: no meaningful reference
    if fn == "nll_loss":
        # nll is cross_entropy's nll term with the input taken as log-probabilities.
        xm = np.moveaxis(fx, ax, -1)
        tv = np.asarray(t).astype(np.int64)
        valid = tv != ii
        tc = np.where(valid, tv, 0)
        wv = np.ones(xm.shape[-1]) if w is None else _f64(_as_compute(w, x))
        per = -wv[tc] * np.take_along_axis(xm, tc[..., None], -1)[..., 0] * valid
        want = per if red == "none" else per.sum()
        if red == "mean":
            with np.errstate(all="ignore"):
                want = per.sum() / wv[tc][valid].sum()
        scale = np.abs(per).sum() / (1 if red != "mean" else max(wv[tc][valid].sum(), 1e-300))
        assert_close(loss, want, xdt, fn, scale)
        return
    with np.errstate(all="ignore"):
        want, want_g, scale, gscale = ref_cross_entropy(x, t, ax, w, ii, red, ls, zl, probs)
    if xdt == np.float16:
        return  # float16 rounding of huge losses: contract checks only
    assert_close(loss, want, xdt, fn, scale)
    if grad is not None and not (red == "mean" and not np.all(np.isfinite(want_g))):
        # (All targets ignored or zero-weighted under "mean": loss NaN, gradient unspecified.)
        assert_close(grad, want_g, xdt, fn + " grad", gscale)


@st.composite
def backward_calls(draw: Any) -> tuple[str, dict[str, Any]]:
    fn = draw(st.sampled_from(["softmax_backward", "log_softmax_backward"]))
    shp = draw(shapes(max_dims=5))
    y = draw(st.one_of(real_arrays(shp), real_arrays(shp), hostile()))
    dshape = shp if draw(st.integers(0, 7)) else shp + (1,)
    dy = draw(st.one_of(real_arrays(dshape), real_arrays(dshape), hostile()))
    kwargs: dict[str, Any] = {"y": y, "dy": dy}
    if draw(st.booleans()):
        kwargs["axis"] = draw(
            st.one_of(st.integers(-len(shp) - 1, len(shp)), st.sampled_from([None, 1.5, (0,)]))
        )
    return fn, kwargs


def run_backward_call(fn: str, kwargs: dict[str, Any]) -> None:
    f = getattr(sl, fn, None)
    if f is None:
        return
    res = call(fn, f, kwargs)
    if isinstance(res, BaseException):
        return
    y, dy = kwargs["y"], kwargs["dy"]
    ry, rd = _real_dtype(y), _real_dtype(dy)
    assert ry is not None and rd is not None, f"{fn} accepted a non-real input"
    yf, df = _f64(y), _f64(dy)
    if yf.ndim == 0:
        yf, df = yf.reshape(1), df.reshape(1)
    ax = kwargs.get("axis", -1) % yf.ndim
    with np.errstate(all="ignore"):
        if fn == "softmax_backward":
            s = (yf * df).sum(axis=ax, keepdims=True)
            want = yf * (df - s)
            scale = np.abs(yf) * (np.abs(df) + np.abs(yf * df).sum(axis=ax, keepdims=True))
        else:
            s = df.sum(axis=ax, keepdims=True)
            want = df - np.exp(yf) * s
            scale = np.abs(df) + np.exp(yf) * np.abs(df).sum(axis=ax, keepdims=True)
    want = want.reshape(np.shape(y))
    scale = scale.reshape(np.shape(y))
    rdtype = np.result_type(ry, rd)
    if not (np.all(np.isfinite(want)) and np.all(np.isfinite(scale))):
        assert np.shape(res) == np.shape(want), f"{fn}: shape {np.shape(res)}"
        return
    assert_close(res, want, rdtype, fn, scale)


# --------------------------------------------------------------------------- LogSumExp, threads


@st.composite
def stream_calls(draw: Any) -> tuple[str, dict[str, Any]]:
    x = draw(st.one_of(real_arrays(), real_arrays(), hostile()))
    ndim = len(_shape_of(x))
    axis = axes_for(draw, ndim)
    split = draw(st.integers(0, 5))
    return "LogSumExp", {"axis": axis, "chunk": x, "split": split}


def run_stream_call(fn: str, kwargs: dict[str, Any]) -> None:
    cls = getattr(sl, "LogSumExp", None)
    if cls is None:
        return
    axis, x, split = kwargs["axis"], kwargs["chunk"], kwargs["split"]

    def go() -> Any:
        acc = cls(axis=axis)
        xa = np.asarray(x) if isinstance(x, np.ndarray) else x
        splittable = isinstance(xa, np.ndarray) and xa.ndim > 0
        if type(axis) is int and splittable and -xa.ndim <= axis < xa.ndim:
            k = min(split, xa.shape[axis])
            acc.update(np.take(xa, range(k), axis=axis))
            acc.update(np.take(xa, range(k, xa.shape[axis]), axis=axis))
        else:
            acc.update(xa)
        return acc.result()

    res = call(fn, lambda **_: go(), {"axis": axis, "chunk": x})
    if isinstance(res, BaseException):
        return
    want, exc = scipy_call("logsumexp", _f64(x), axis=axis)
    if exc is not None:
        return
    xdt = _real_dtype(x)
    assert xdt is not None
    fx = _f64(x)
    with np.errstate(all="ignore"):
        scale = np.max(np.abs(np.where(np.isfinite(fx), fx, 0)), initial=1.0)
    assert_close(res, want, xdt, "LogSumExp", scale)


def run_threads_call(fn: str, kwargs: dict[str, Any]) -> None:
    n = kwargs["n"]
    try:
        res = call(fn, sl.set_num_threads, {"n": n})
        if not isinstance(res, BaseException):
            assert sl.get_num_threads() >= 1
            x = np.linspace(-5, 5, 70_000).reshape(2, -1).astype(np.float32)
            assert_close(
                sl.logsumexp(x, axis=1),
                sp.logsumexp(x.astype(np.float64), axis=1),
                np.dtype(np.float32),
                "logsumexp after set_num_threads",
                5.0,
            )
    finally:
        sl.set_num_threads(0)


threads_calls = st.tuples(
    st.just("set_num_threads"),
    st.fixed_dictionaries({"n": st.sampled_from([0, 1, 2, 3, -1, 2**70, 1.5, "2", None, True])}),
)

RUNNERS = {
    "scipy": (scipy_calls(), run_scipy_call),
    "loss": (loss_calls(), run_loss_call),
    "backward": (backward_calls(), run_backward_call),
    "stream": (stream_calls(), run_stream_call),
    "threads": (threads_calls, run_threads_call),
}
WEIGHTS = ["scipy"] * 10 + ["loss"] * 4 + ["backward"] * 2 + ["stream", "threads"]
if os.environ.get("STABLELSE_FUZZ_ONLY"):  # e.g. "loss,backward"
    WEIGHTS = [w for w in WEIGHTS if w in os.environ["STABLELSE_FUZZ_ONLY"].split(",")]


def main() -> int:
    faulthandler.enable()
    n = int(os.environ.get("STABLELSE_FUZZ_EXAMPLES", "300"))
    s = int(os.environ.get("STABLELSE_FUZZ_SEED", random.randrange(2**32)))
    present = [
        k
        for k in (
            "cross_entropy",
            "nll_loss",
            "softmax_backward",
            "log_softmax_backward",
            "LogSumExp",
        )
        if hasattr(sl, k)
    ]
    print(f"FUZZ seed={s} examples={n} stablelse={sl.__version__} extra={present}", flush=True)

    @seed(s)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.sampled_from(WEIGHTS).flatmap(lambda k: st.tuples(st.just(k), RUNNERS[k][0])))
    def fuzz(case: tuple[str, tuple[str, dict[str, Any]]]) -> None:
        kind, (fn, kwargs) = case
        RUNNERS[kind][1](fn, kwargs)

    fuzz()
    calls = sum(v for k, v in STATS.items() if ":" not in k)
    raised = sum(v for k, v in STATS.items() if k.endswith(":raised"))
    print(f"FUZZ done: seed={s} calls={calls} raised={raised} per-function={dict(STATS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
