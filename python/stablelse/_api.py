"""logsumexp, softmax and log_softmax with scipy.special's semantics.

This module keeps what is Python's: the public signatures, scipy's dtype rules and the
conversion of foreign objects to arrays. ``axis`` is interpreted by :mod:`stablelse._axes`;
how the kernels see the array (a direct view, a transpose, or blocks copied through a small
buffer) is decided by the one planner in ``src/plan.rs``, and a float32/float64 ndarray goes
to the native module in one call.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, Optional

import numpy as np

from . import _complex, _core
from ._axes import AxisLike, normalize_axes
from ._plan import kernel_view, kernel_view3, reduced_to_user, view_as
from ._spec import is_full_mask

Algorithm = Literal["auto", "two_pass", "online"]
_ALGORITHMS = ("auto", "two_pass", "online")

#: The 3-D kernel view of an ``(outer, n, inner)`` array (the losses' class axis).
_kernel_view = kernel_view3


# --------------------------------------------------------------------------- input handling


def _is_gpu_array(x: Any) -> bool:
    """True for device arrays (CuPy, torch CUDA tensors, JAX GPU arrays)."""
    if isinstance(x, np.ndarray):
        return False
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        kind = dev()[0]
    except Exception:
        return False
    return int(kind) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged


def _gpu_module() -> Any:
    try:
        from . import cuda  # type: ignore[attr-defined,unused-ignore]  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise TypeError(
            "a CUDA device array was given but this stablelse build has no CUDA support"
        ) from exc
    return cuda


def _is_bfloat16(dt: np.dtype) -> bool:
    """Whether `dt` is a bfloat16 dtype (``ml_dtypes.bfloat16``), recognised by its name and
    size, so that nothing is imported when no package providing it is installed."""
    return dt.kind == "V" and dt.itemsize == 2 and dt.fields is None and dt.name == "bfloat16"


def _is_half(dt: np.dtype) -> bool:
    """Whether `dt` is float16 or bfloat16: computed in float32, returned in its own type."""
    return (dt.kind == "f" and dt.itemsize == 2) or _is_bfloat16(dt)


def _as_real_array(a: Any, name: str, half: bool = False) -> tuple[np.ndarray, np.dtype]:
    """``a`` as a native-endian float32/float64 array, and the dtype the result must have.

    Integers and bools become float64 (as scipy's logsumexp); float16 and bfloat16 are computed
    in float32 and the result returned in the input's type; longdouble is computed in float64
    (a documented deviation). With `half`, float16 and bfloat16 arrays are returned as they are
    (native byte order): the native reductions widen them block by block, with no copy.
    """
    if type(a) is np.ndarray:
        arr = a
    else:
        # Subclasses (np.matrix keeps two dimensions through reshape) become plain arrays.
        try:
            arr = np.asarray(a)
        except ValueError as exc:
            raise ValueError(f"{name} is not a rectangular array of numbers: {exc}") from None
    dt = arr.dtype
    if dt.kind == "f" and not dt.isnative:
        # Byte-swapped floats: the same type in native order (">f4" is float32, not float64).
        arr = arr.astype(dt.newbyteorder("="))
        dt = arr.dtype
    if dt == np.float32 or dt == np.float64:
        return arr, dt
    if _is_half(dt):
        return (arr if half else arr.astype(np.float32)), dt
    kind = dt.kind
    if kind == "f":
        return arr.astype(np.float64), dt.newbyteorder("=")
    if kind in "biu":
        return arr.astype(np.float64), np.dtype(np.float64)
    if kind == "c":
        raise TypeError(
            f"{name} is complex ({dt}); this function takes real input only (complex input "
            "is taken by logsumexp, softmax and log_softmax on NumPy arrays)"
        )
    raise TypeError(f"{name} must be a real numeric array, got dtype {dt}")


def _weighted_result_dtype(a_dtype: np.dtype, b_dtype: np.dtype) -> np.dtype:
    """As scipy: the result type of the raw dtypes (so float32 ``a`` with bool or int8 weights
    stays float32), float64 when that is not floating."""
    rdtype = np.result_type(a_dtype, b_dtype)
    if rdtype.kind == "f" or _is_bfloat16(rdtype):
        return rdtype.newbyteorder("=")
    return np.dtype(np.float64)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")


def _check_out(
    out: Any, shape: tuple[int, ...], dtype: np.dtype, name: str = "out"
) -> np.ndarray:
    """`out` if it can receive a result of `shape` and `dtype`, else the error naming `name`."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} has shape {out.shape}, expected {shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if out.size > 1 and any(st == 0 and n > 1 for st, n in zip(out.strides, out.shape)):
        raise ValueError(
            f"{name} has a zero stride: its elements overlap and cannot hold a result"
        )
    return out


def _where_mask(where: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`where` as a bool array of `shape` (itself, or a broadcast view: no copy), or the error
    naming it.

    As NumPy's ufuncs, the mask must be boolean (``where=[1, 0]`` is a ``TypeError``; JAX raises
    ``ValueError`` for it) and must broadcast to the input's shape without growing it.
    """
    if is_full_mask(where, shape):
        return where
    try:
        w = where if isinstance(where, np.ndarray) else np.asarray(where)
    except ValueError as exc:
        raise ValueError(f"where is not a rectangular array of booleans: {exc}") from None
    if w.dtype != np.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {w.dtype}")
    try:
        return np.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(
            f"where with shape {w.shape} does not broadcast to the input's shape {shape}"
        ) from None


def _where_unsupported_on_gpu(where: Any) -> None:
    """A ``NotImplementedError`` naming `where` for CUDA device arrays (the CUDA kernels
    take no mask)."""
    if where is not None:
        raise NotImplementedError(
            "where= is not supported for CUDA device arrays; apply the mask before the call "
            "(for example, set masked elements to -inf)"
        )


def _reduced_shape(
    shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool
) -> tuple[int, ...]:
    if keepdims:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _scalarize(res: np.ndarray) -> Any:
    return res[()] if res.ndim == 0 else res


# --------------------------------------------------------------------------- logsumexp


def _weighted_trailing(
    a: np.ndarray, b: np.ndarray, axes: tuple[int, ...], keepdims: Any, return_sign: bool
) -> Any:
    """Weighted logsumexp of C-ordered `a` and `b` (same shape and float dtype) over `axes` when
    they are trailing axes (the last ones, or all): ``(outer, n, 1)`` reshapes handed to the
    kernel, the result in the caller's shape. ``None`` for other axes."""
    first = axes[0]
    if axes != tuple(range(first, a.ndim)):
        return None
    outer = math.prod(a.shape[:first])
    n = math.prod(a.shape[first:])
    res, sgn = _core.logsumexp_weighted(
        a.reshape(outer, n, 1), b.reshape(outer, n, 1), bool(return_sign)
    )
    kept = a.shape[:first]
    shape = kept + (1,) * (a.ndim - first) if keepdims else kept
    res = _scalarize(res.reshape(shape))
    return (res, _scalarize(sgn.reshape(shape))) if return_sign else res


def logsumexp(
    a: Any,
    axis: AxisLike = None,
    b: Any = None,
    keepdims: bool = False,
    return_sign: bool = False,
    *,
    out: Optional[np.ndarray] = None,
    algorithm: Algorithm = "auto",
    where: Any = None,
) -> Any:
    """Compute the log of the sum of exponentials of input elements.

    ``log(sum(b * exp(a)))`` computed without overflow or underflow, with the semantics of
    :func:`scipy.special.logsumexp`.

    Parameters
    ----------
    a : array_like
        Input array. Integers and bools are promoted to float64; float16 and bfloat16
        (``ml_dtypes.bfloat16``) are computed in float32 and returned in the input's type
        (scipy's rule), each block of lanes widened as it is read, with no copy of `a` (with
        `b`, `a` is converted once). Complex `a` (or `b`) is supported as in scipy.
    axis : None or int or tuple of ints, optional
        Axis or axes to reduce. ``None`` (default) reduces all axes.
    b : array_like, optional
        Weights, broadcastable with `a`; may be negative. Elements with ``b == 0`` are ignored,
        whatever `a` holds there (as scipy).
    keepdims : bool, optional
        Keep the reduced axes as length-1 dimensions.
    return_sign : bool, optional
        Also return the sign of the sum; without it a negative sum gives NaN.
    out : ndarray, optional
        Preallocated writeable array of the result's shape and dtype, of any layout, to write
        the result into (not the sign). It must share no element with `a`. stablelse
        extension.
    algorithm : {"auto", "two_pass", "online"}, optional
        Kernel: max pass then exp-sum pass, or one pass with a running maximum.
        stablelse extension.
    where : array_like of bool, optional
        Mask broadcastable to `a` (to the broadcast shape of `a` and `b` with weights): only
        elements where it is True take part, as ``jax.nn.logsumexp(..., where=)``. A masked
        element is excluded whatever it holds (NaN, ``+inf``) and whatever its weight. A fully
        masked reduction gives ``-inf`` (sign 0 with `return_sign`). Read by the kernels beside
        `a`, never a masked copy of `a`. stablelse extension (scipy has no `where`).

    Returns
    -------
    res : ndarray or scalar
        The result; a NumPy scalar when it is 0-dimensional (as scipy).
    sgn : ndarray or scalar
        Only with ``return_sign``: +1, 0 or -1 (NaN where the result is NaN; -1 for an empty
        reduction, as scipy).

    Notes
    -----
    Special values follow scipy: an all ``-inf`` (or empty) reduction gives ``-inf``; any
    ``+inf`` gives ``+inf``; any NaN gives NaN. The sum is kept as ``1 + excess`` where the
    excess omits one maximal term, so ``logsumexp([0, -40])`` is ``4.25e-18`` rather than 0, and
    float32 inputs are summed in float64 and rounded once: results are within 1 ULP of exact.
    float16 and bfloat16 results are the float32 results rounded to the input's type: within
    0.5 ULP of that type plus 1 float32 ULP (1/8192 of a float16 ULP) of exact.

    Complex input: the imaginary part of the result lies in ``(-pi, pi]``; with
    `return_sign` the result is the real ``log|sum|`` and the sign the complex unit
    ``sum / |sum|``; infinities and NaNs land where scipy puts them. complex64 stays
    complex64, summed in float64 (the real part is within 1 ULP).

    Deviations from scipy: `out` and `algorithm` are extensions (`algorithm` is ignored for
    complex input); longdouble input is computed in float64. Calls on CUDA device arrays run
    on the device (see :mod:`stablelse.cuda`).

    The gradient of ``logsumexp`` with respect to `a` is ``softmax(a)`` (times `b`, divided by
    the signed sum, when weights are given).

    Masks (`where`) follow JAX: the result is that of the kept elements alone, so kept
    elements that are all ``-inf`` give ``-inf`` as without a mask. `where` must be boolean
    (``TypeError`` otherwise, as NumPy's ufuncs; JAX raises ``ValueError``) and must broadcast
    to the input without growing it (``ValueError``). With `b`, the weights of the kept elements
    take part as without a mask (the weights are masked, ``b`` where `where` else 0, in one
    weights-sized temporary). torch has no ``where=``: a torch user writes
    ``torch.logsumexp(x.masked_fill(~mask, -torch.inf), dim)`` (a masked copy of `x`; same
    values, fully masked rows included). Complex input takes `where` with the same rules
    (scipy's complex formulas over the kept elements; a fully masked slice gives ``-inf + 0j``
    and, with `return_sign`, sign 0, as JAX); the mask is laid out in the kernels' order in a
    one-byte-per-element temporary. CUDA device arrays do not take `where`
    (``NotImplementedError``).

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import logsumexp
    >>> float(logsumexp(np.arange(10.0)))
    9.45862974442671
    >>> logsumexp([1, 2], b=[1, -1], return_sign=True)
    (np.float64(1.5413248546129181), np.float64(-1.0))
    >>> logsumexp([[0.0, np.nan], [1.0, 2.0]], axis=1, where=[[True, False], [False, False]])
    array([  0., -inf])
    >>> logsumexp(np.array([1 + 1j, np.nan]), where=np.array([True, False]))
    np.complex128(1+1j)
    """
    if type(a) is np.ndarray and b is None and not return_sign and a.ndim:
        # float32/float64 arrays in one native call; NotImplemented for anything else.
        mask = None if where is None else _where_mask(where, a.shape)
        res = _core.logsumexp(a, normalize_axes(axis, a.ndim), keepdims, algorithm, out, mask)
        if res is not NotImplemented:
            return res
    if (
        type(a) is np.ndarray
        and type(b) is np.ndarray
        and where is None
        and out is None
        and a.ndim
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.dtype in (np.float32, np.float64)
        and a.flags.c_contiguous
        and b.flags.c_contiguous
        and a.flags.aligned
        and b.flags.aligned
    ):
        # Weights of a's shape and dtype, both C-ordered, reduced over the trailing axes: the
        # kernels' (outer, n, 1) view is a reshape, with no planning in Python.
        res = _weighted_trailing(a, b, normalize_axes(axis, a.ndim), keepdims, return_sign)
        if res is not None:
            return res
    if _is_gpu_array(a):
        _where_unsupported_on_gpu(where)
        return _gpu_module().logsumexp(
            a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign, out=out
        )
    _check_algorithm(algorithm)
    if _complex.is_complex(a) or _complex.is_complex(b):
        return _complex.logsumexp(a, axis, b, keepdims, return_sign, out, where)
    x, rdtype = _as_real_array(a, "a", half=b is None)
    bw: np.ndarray | None = None
    if b is not None:
        bw, _ = _as_real_array(b, "b")
        rdtype = _weighted_result_dtype(np.asarray(a).dtype, np.asarray(b).dtype)
        try:
            if bw.shape != x.shape or bw.dtype != x.dtype:  # (both costs microseconds a call)
                common = np.result_type(x.dtype, bw.dtype)
                x, bw = np.broadcast_arrays(
                    x.astype(common, copy=False), bw.astype(common, copy=False)
                )
        except ValueError:
            raise ValueError(
                f"b with shape {np.shape(b)} does not broadcast against a with shape "
                f"{np.shape(a)}"
            ) from None
    mask = None if where is None else _where_mask(where, x.shape)
    if bw is not None and mask is not None:
        # A masked element leaves the sum whatever its weight (NaN, negative): weight 0 does
        # exactly that in the weighted kernel (scipy ignores b == 0 whatever a holds).
        bw = np.where(mask, bw, bw.dtype.type(0))
        mask = None
    if x.ndim == 0:
        x = x.reshape(1)
        bw = bw.reshape(1) if bw is not None else None
        mask = mask.reshape(1) if mask is not None else None
    axes = normalize_axes(axis, x.ndim)
    keepdims = bool(keepdims)
    direct = False
    if out is not None:
        _check_out(out, _reduced_shape(x.shape, axes, keepdims), rdtype)
        if any(
            isinstance(v, np.ndarray) and np.may_share_memory(out, v) and np.shares_memory(out, v)
            for v in (x, a)  # x may be a converted copy of a (float16, big-endian, ...)
        ):
            raise ValueError("out overlaps the input a")
        direct = bw is None and out.dtype == x.dtype

    sgn: Any = None
    if bw is None:
        res = np.asarray(
            _core.logsumexp(x, axes, keepdims, algorithm, out if direct else None, mask)
        )
        if return_sign:
            sgn = np.array(res > -np.inf, dtype=res.dtype)
            sgn[np.isnan(res)] = np.nan
            if x.size == 0 or any(x.shape[i] == 0 for i in axes):
                sgn[...] = -1.0
    else:
        x3, plan = kernel_view(x, axes)
        res2, sgn2 = _core.logsumexp_weighted(x3, view_as(bw, plan), bool(return_sign))
        res = reduced_to_user(res2, plan, x.shape, keepdims)
        if return_sign:
            sgn = reduced_to_user(sgn2, plan, x.shape, keepdims)
    if res.dtype != rdtype:
        res = res.astype(rdtype)
    if out is not None:
        if not direct:
            np.copyto(out, res)
        res = out
    res = _scalarize(res)
    if return_sign:
        if sgn.dtype != rdtype:
            sgn = sgn.astype(rdtype)
        return res, _scalarize(sgn)
    return res


# --------------------------------------------------------------------------- softmax


def _softmax_like(
    x_in: Any,
    axis: AxisLike,
    out: np.ndarray | None,
    algorithm: str,
    log: bool,
    where: Any = None,
) -> Any:
    """softmax / log_softmax of anything but a float32/float64 ndarray of 1+ dimensions:
    converted by scipy's dtype rules, then computed natively."""
    _check_algorithm(algorithm)
    if _complex.is_complex(x_in):
        return _complex.softmax_like(x_in, axis, out, log, where)
    x, rdtype = _as_real_array(x_in, "x", half=True)
    mask = None if where is None else _where_mask(where, x.shape)
    scalar = x.ndim == 0
    if scalar:
        x = x.reshape(1)
        mask = mask.reshape(1) if mask is not None else None
    axes = normalize_axes(axis, x.ndim)
    if out is not None:
        _check_out(out, () if scalar else x.shape, rdtype)
        if out.dtype == x.dtype:
            # Same compute dtype: the native call writes `out` (in place when it is x).
            _core.softmax(x, axes, log, algorithm, out.reshape(1) if scalar else out, mask)
            return out
    res = _core.softmax(x, axes, log, algorithm, None, mask)
    if out is not None:
        np.copyto(out, res.reshape(out.shape), casting="unsafe")
        return out
    if res.dtype != rdtype:
        res = res.astype(rdtype)
    if scalar:
        return res.reshape(())[()]
    return res


def softmax(
    x: Any,
    axis: AxisLike = None,
    *,
    out: Optional[np.ndarray] = None,
    algorithm: Algorithm = "auto",
    where: Any = None,
) -> Any:
    r"""Compute the softmax function, ``exp(x) / sum(exp(x))`` along `axis`.

    Semantics of :func:`scipy.special.softmax`: the result has the shape of `x` and sums to 1
    along `axis`.

    Parameters
    ----------
    x : array_like
        Input array. Integers and bools are promoted to float64; float16 and bfloat16
        (``ml_dtypes.bfloat16``) are computed in float32 block by block, with no copy of `x`,
        and returned in the input's type (scipy's rule). Complex input is computed as scipy
        computes it.
    axis : None or int or tuple of ints, optional
        Axis or axes to normalise over. ``None`` (default) uses the whole array.
    out : ndarray, optional
        Writeable array of `x`'s shape and the result dtype, of any layout. ``out=x`` updates
        `x` in place, on any view of it (no second array: at most a block-sized buffer per
        thread); any other overlap with `x` raises ``ValueError``. stablelse extension.
    algorithm : {"auto", "two_pass", "online"}, optional
        Kernel used for the normaliser; stablelse extension.
    where : array_like of bool, optional
        Mask broadcastable to `x`: the normaliser runs over the elements where it is True
        only, as ``jax.nn.softmax(..., where=)``; masked positions get 0, whatever
        they hold (NaN, ``+inf``). Read by the kernels beside `x`, never a masked copy of `x`.
        stablelse extension (scipy has no `where`).

    Returns
    -------
    s : ndarray or scalar
        ``exp(x - logsumexp(x, axis, keepdims=True))``.

    Notes
    -----
    As scipy, a slice containing ``+inf``, only ``-inf``, or a NaN gives NaN everywhere in that
    slice. Each output is ``exp(x - max) / S`` with ``S`` summed in float64 for float32 input.
    float16 and bfloat16 outputs are the float32 ones rounded to the input's type (within 0.5
    ULP of that type plus 1 float32 ULP of exact).

    Deviations from scipy: an empty input returns an empty result (scipy raises
    ``ValueError``); small integer types are promoted to float64 (scipy's NumPy ufuncs give
    float16 for int8/uint8/bool). The gradient of ``logsumexp`` is ``softmax``.

    Masks (`where`) follow JAX: kept elements get the softmax of the kept elements alone,
    masked positions 0, and a fully masked slice 0 everywhere; a slice whose kept
    elements are all ``-inf`` (or hold ``+inf`` / NaN) gives NaN at its kept positions, as
    without a mask. `where` must be boolean (``TypeError`` otherwise, as NumPy's ufuncs; JAX
    raises ``ValueError``) and must broadcast to `x` without growing it (``ValueError``).
    torch has no ``where=``: a torch user writes ``torch.softmax(x.masked_fill(~mask,
    -torch.inf), dim)``, which copies `x` and gives NaN (not 0) in fully masked rows;
    ``.masked_fill(~mask, 0.0)`` on the result fixes them. Complex input takes `where` with
    the same rules (scipy's complex softmax of the kept elements, ``0j`` at masked positions,
    as JAX). CUDA device arrays do not take `where` (``NotImplementedError``).

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import softmax
    >>> softmax(np.array([1000.0, 1.0, -1000.0]))
    array([1., 0., 0.])
    >>> softmax(np.array([0.0, np.nan, 0.0]), where=np.array([True, False, True]))
    array([0.5, 0. , 0.5])
    >>> softmax(np.array([1j, 1j, np.nan]), where=np.array([True, True, False]))
    array([0.5+0.j, 0.5+0.j, 0. +0.j])
    """
    if type(x) is np.ndarray and x.ndim:
        # float32/float64 arrays in one native call; NotImplemented for anything else.
        mask = None if where is None else _where_mask(where, x.shape)
        res = _core.softmax(x, normalize_axes(axis, x.ndim), False, algorithm, out, mask)
        if res is not NotImplemented:
            return res
    if _is_gpu_array(x):
        _where_unsupported_on_gpu(where)
        return _gpu_module().softmax(x, axis=axis, out=out)
    return _softmax_like(x, axis, out, algorithm, log=False, where=where)


def log_softmax(
    x: Any,
    axis: AxisLike = None,
    *,
    out: Optional[np.ndarray] = None,
    algorithm: Algorithm = "auto",
    where: Any = None,
) -> Any:
    r"""Compute the logarithm of the softmax function, ``x - logsumexp(x, axis)``.

    Semantics of :func:`scipy.special.log_softmax`.

    Parameters
    ----------
    x : array_like
        Input array (dtype rules as :func:`softmax`).
    axis : None or int or tuple of ints, optional
        Axis or axes to normalise over. ``None`` (default) uses the whole array.
    out : ndarray, optional
        As for :func:`softmax`; ``out=x`` works in place.
    algorithm : {"auto", "two_pass", "online"}, optional
        Kernel used for the normaliser; stablelse extension.
    where : array_like of bool, optional
        Mask broadcastable to `x`: the normaliser runs over the elements where it is True
        only, as ``jax.nn.log_softmax(..., where=)``; masked positions get ``-inf``, whatever
        they hold (NaN, ``+inf``). Read by the kernels beside `x`, never a masked copy of `x`.
        stablelse extension (scipy has no `where`).

    Returns
    -------
    s : ndarray or scalar
        ``exp(s)`` sums to 1 along `axis` (over the kept elements with `where`).

    Notes
    -----
    Each output is ``(x - max) - log1p(excess)``, where ``excess`` is the sum of
    ``exp(x - max)`` over all but one maximal element. The top class therefore keeps its
    relative accuracy: for float32 ``[1 - log(eps), 0]`` the first output is about
    ``-4.4e-8``, not 0 (scipy issue 19521). Special values follow scipy: with a ``+inf`` in the
    slice, ``+inf`` entries give NaN and the others ``-inf``; an all ``-inf`` slice gives NaN;
    NaN anywhere gives NaN.

    Deviations from scipy: as :func:`softmax` (empty input, small integer promotion).

    Masks (`where`) follow JAX: kept elements get the log_softmax of the kept elements alone,
    masked positions ``-inf``, and a fully masked slice ``-inf`` everywhere; a slice whose kept
    elements are all ``-inf`` (or hold ``+inf`` / NaN) gives NaN at its kept positions, as
    without a mask. `where` must be boolean (``TypeError`` otherwise, as NumPy's ufuncs; JAX
    raises ``ValueError``) and must broadcast to `x` without growing it (``ValueError``).
    torch has no ``where=``: a torch user writes ``torch.log_softmax(x.masked_fill(~mask,
    -torch.inf), dim)``, which copies `x` and gives NaN (not ``-inf``) in fully masked rows;
    ``.masked_fill(~mask, -torch.inf)`` on the result fixes them. Complex input takes `where`
    with the same rules (``-inf + 0j`` at masked positions, as JAX; kept elements follow
    scipy's complex formulas, where JAX gives NaN for some special values). CUDA device arrays
    do not take `where` (``NotImplementedError``).

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import log_softmax
    >>> log_softmax(np.array([1000.0, 1.0]))
    array([   0., -999.])
    """
    if type(x) is np.ndarray and x.ndim:
        # float32/float64 arrays in one native call; NotImplemented for anything else.
        mask = None if where is None else _where_mask(where, x.shape)
        res = _core.softmax(x, normalize_axes(axis, x.ndim), True, algorithm, out, mask)
        if res is not NotImplemented:
            return res
    if _is_gpu_array(x):
        _where_unsupported_on_gpu(where)
        return _gpu_module().log_softmax(x, axis=axis, out=out)
    return _softmax_like(x, axis, out, algorithm, log=True, where=where)


# --------------------------------------------------------------------------- threads, info


#: The largest thread count set_num_threads accepts.
MAX_THREADS = 1024


def set_num_threads(n: int) -> None:
    """Set the number of threads stablelse's kernels use (0 restores the default).

    The default is ``STABLELSE_NUM_THREADS``, else ``RAYON_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else the CPUs this process may run on. Results are
    bit-identical for any thread count. At most ``MAX_THREADS`` (1024): building a pool of
    tens of thousands of threads takes minutes and looks like a hang.
    """
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    if not 0 <= n <= MAX_THREADS:
        raise ValueError(f"n must be in [0, {MAX_THREADS}], got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads stablelse's kernels use."""
    return int(_core.get_num_threads())


def info() -> dict[str, Any]:
    """Version, SIMD level chosen, levels available, threads, and CUDA status."""
    cuda: dict[str, Any]
    try:
        from . import cuda as _cuda  # type: ignore[attr-defined,unused-ignore]  # noqa: PLC0415

        cuda = _cuda.info() if hasattr(_cuda, "info") else {"available": _cuda.is_available()}
    except ImportError:
        cuda = {"available": False, "reason": "built without the cuda feature"}
    return {
        "version": _core.__version__,
        "simd": _core.simd_level(),
        "simd_available": list(_core.available_simd_levels()),
        "threads": get_num_threads(),
        "cuda": cuda,
    }
