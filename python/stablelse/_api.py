"""logsumexp, softmax and log_softmax with scipy.special's semantics.

Every call is mapped onto the kernels' one shape, ``(outer, n, inner)``: ``outer * inner``
independent reductions of length ``n`` (see ``src/layout.rs``). Reducing the last axes of a
C-contiguous array gives ``inner == 1`` (rows); reducing leading axes gives columns. A Fortran
array is handled as its transpose. Only layouts the kernels cannot read directly (a tuple of
non-adjacent axes, negative or odd strides, unaligned or byte-swapped data) are copied, once.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from . import _complex, _core
from ._axes import AxisLike, normalize_axes

_ALGORITHMS = ("auto", "two_pass", "online")


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


def _as_real_array(a: Any, name: str) -> tuple[np.ndarray, np.dtype]:
    """``a`` as a native-endian float32/float64 array, and the dtype the result must have.

    Integers and bools become float64 (as scipy's logsumexp); float16 is computed in float32 and
    the result returned as float16; longdouble is computed in float64 (a documented deviation).
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
    kind = dt.kind
    if kind == "f":
        if dt.itemsize == 2:
            return arr.astype(np.float32), np.dtype(np.float16)
        return arr.astype(np.float64), dt.newbyteorder("=")
    if kind in "biu":
        return arr.astype(np.float64), np.dtype(np.float64)
    if kind == "c":
        raise TypeError(f"{name} is complex ({dt}); stablelse supports real inputs only")
    raise TypeError(f"{name} must be a real numeric array, got dtype {dt}")


def _weighted_result_dtype(a_dtype: np.dtype, b_dtype: np.dtype) -> np.dtype:
    """As scipy: the result type of the raw dtypes (so float32 ``a`` with bool or int8 weights
    stays float32), float64 when that is not floating."""
    rdtype = np.result_type(a_dtype, b_dtype)
    return rdtype.newbyteorder("=") if rdtype.kind == "f" else np.dtype(np.float64)


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")


def _kernel_view(x3: np.ndarray) -> np.ndarray:
    """``x3`` if the kernels read its layout directly (see src/layout.rs), else a dense copy."""
    o, n, i = x3.shape
    s0, s1, s2 = x3.strides
    it = x3.itemsize
    ok = (
        x3.flags.aligned
        and (i <= 1 or n == 0 or s2 == it)
        and (n <= 1 or s1 == i * it)
        and (o <= 1 or (s0 >= 0 and s0 % it == 0))
    )
    return x3 if ok else np.array(x3, order="C", copy=True)


class _Plan:
    """How one call maps the user's array onto ``(outer, n, inner)``.

    ``work`` is the array the kernels see (maybe transposed or with axes moved), ``axes`` the
    reduced axes of ``work``, ``transposed`` whether ``work`` is ``x.T``.
    """

    __slots__ = ("work", "axes", "transposed", "moved", "outer", "n", "inner")

    def __init__(self, x: np.ndarray, axes: tuple[int, ...]):
        ndim = x.ndim
        self.transposed = ndim > 1 and x.flags.f_contiguous and not x.flags.c_contiguous
        if self.transposed:
            axes = tuple(sorted(ndim - 1 - a for a in axes))
        self.moved: tuple[int, ...] | None = None
        if axes and axes[-1] - axes[0] + 1 != len(axes):
            # Non-adjacent axes: move them to the end (the reshape to 3-D then copies).
            self.moved = axes
            axes = tuple(range(ndim - len(axes), ndim))
        self.axes = axes
        self.work = self.transform(x)
        shape = self.work.shape
        first, last = (axes[0], axes[-1]) if axes else (ndim, ndim - 1)
        self.outer = math.prod(shape[:first])
        self.n = math.prod(shape[first : last + 1])
        self.inner = math.prod(shape[last + 1 :])

    def transform(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (shaped like the input) in the work array's axis order."""
        if self.transposed:
            arr = arr.T
        if self.moved is not None:
            ndim = arr.ndim
            arr = np.moveaxis(arr, self.moved, range(ndim - len(self.moved), ndim))
        return arr

    def view3(self, arr: np.ndarray | None = None) -> np.ndarray:
        """The kernel view of ``arr`` (default: the work array), laid out like the work array."""
        w = self.work if arr is None else self.transform(arr)
        return _kernel_view(w.reshape(self.outer, self.n, self.inner))

    def reduced_shape(self, keepdims: bool) -> tuple[int, ...]:
        """Result shape of a reduction, in the *work* array's axis order."""
        shape = self.work.shape
        if keepdims:
            return tuple(1 if a in self.axes else s for a, s in enumerate(shape))
        return tuple(s for a, s in enumerate(shape) if a not in self.axes)

    def unwork_reduced(self, res: np.ndarray, keepdims: bool, ndim: int) -> np.ndarray:
        """A reduction result (in work order) back in the user's axis order."""
        if self.moved is not None and keepdims:
            # Work order is (kept..., reduced...) with reduced sizes 1: restore positions.
            res = np.moveaxis(res, range(ndim - len(self.moved), ndim), self.moved)
        if self.transposed:
            res = res.T
        return res

    def unwork_full(self, res3: np.ndarray) -> np.ndarray:
        """A softmax result (3-D, work layout) back in the user's shape and axis order."""
        res = res3.reshape(self.work.shape)
        if self.moved is not None:
            ndim = res.ndim
            res = np.moveaxis(res, range(ndim - len(self.moved), ndim), self.moved)
        if self.transposed:
            res = res.T
        return res


def _check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if any(st == 0 and n > 1 for st, n in zip(out.strides, out.shape)):
        raise ValueError("out has a zero stride: its elements overlap and cannot hold a result")
    return out


def _scalarize(res: np.ndarray) -> Any:
    return res[()] if res.ndim == 0 else res


# --------------------------------------------------------------------------- logsumexp


def logsumexp(
    a: Any,
    axis: AxisLike = None,
    b: Any = None,
    keepdims: bool = False,
    return_sign: bool = False,
    *,
    out: np.ndarray | None = None,
    algorithm: str = "auto",
) -> Any:
    """Compute the log of the sum of exponentials of input elements.

    ``log(sum(b * exp(a)))`` computed without overflow or underflow, with the semantics of
    :func:`scipy.special.logsumexp`.

    Parameters
    ----------
    a : array_like
        Input array. Integers and bools are promoted to float64; float16 is computed in
        float32 and returned as float16. Complex `a` (or `b`) is supported as in scipy.
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
        Preallocated writeable array of the result's shape and dtype to write the result
        into (not the sign). It must not overlap `a`. stablelse extension.
    algorithm : {"auto", "two_pass", "online"}, optional
        Kernel: max pass then exp-sum pass, or one pass with a running maximum.
        stablelse extension.

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

    Complex input: the imaginary part of the result lies in ``(-pi, pi]``; with
    `return_sign` the result is the real ``log|sum|`` and the sign the complex unit
    ``sum / |sum|``; infinities and NaNs land where scipy puts them. complex64 stays
    complex64, summed in float64 (the real part is within 1 ULP).

    Deviations from scipy: `out` and `algorithm` are extensions (`algorithm` is ignored for
    complex input); longdouble input is computed in float64. Calls on CUDA device arrays run
    on the device (see :mod:`stablelse.cuda`).

    The gradient of ``logsumexp`` with respect to `a` is ``softmax(a)`` (times `b`, divided by
    the signed sum, when weights are given).

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import logsumexp
    >>> float(logsumexp(np.arange(10.0)))
    9.45862974442671
    >>> logsumexp([1, 2], b=[1, -1], return_sign=True)
    (np.float64(1.5413248546129181), np.float64(-1.0))
    """
    if (
        type(a) is np.ndarray
        and b is None
        and out is None
        and not return_sign
        and algorithm == "auto"
        and (axis is None or type(axis) is int)
    ):
        # The common call (rows of a C-contiguous array) in one native step; None otherwise.
        res = _core.rows_fast(a, axis, bool(keepdims), 0)
        if res is not None:
            return res
    if _is_gpu_array(a):
        return _gpu_module().logsumexp(
            a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign, out=out
        )
    _check_algorithm(algorithm)
    if _complex.is_complex(a) or _complex.is_complex(b):
        return _complex.logsumexp(a, axis, b, keepdims, return_sign, out)
    x, rdtype = _as_real_array(a, "a")
    bw: np.ndarray | None = None
    if b is not None:
        bw, _ = _as_real_array(b, "b")
        common = np.result_type(x.dtype, bw.dtype)
        rdtype = _weighted_result_dtype(np.asarray(a).dtype, np.asarray(b).dtype)
        try:
            x, bw = np.broadcast_arrays(x.astype(common, copy=False), bw.astype(common, copy=False))
        except ValueError:
            raise ValueError(
                f"b with shape {np.shape(b)} does not broadcast against a with shape "
                f"{np.shape(a)}"
            ) from None
    if x.ndim == 0:
        x = x.reshape(1)
        bw = bw.reshape(1) if bw is not None else None
    axes = normalize_axes(axis, x.ndim)
    plan = _Plan(x, axes)
    rshape_work = plan.reduced_shape(keepdims)
    # The user-visible result shape.
    user_shape = plan.unwork_reduced(np.empty(rshape_work, dtype=np.int8), keepdims, x.ndim).shape
    if out is not None:
        _check_out(out, user_shape, rdtype)
        if any(
            isinstance(v, np.ndarray) and np.may_share_memory(out, v) and np.shares_memory(out, v)
            for v in (x, a)  # x may be a converted copy of a (float16, big-endian, ...)
        ):
            raise ValueError("out overlaps the input a")

    x3 = plan.view3()
    if b is None:
        direct = (
            out is not None
            and out.dtype == x.dtype
            and out.flags.c_contiguous
            and out.flags.aligned
            and not plan.transposed
            and plan.moved is None
        )
        res2 = _core.logsumexp(
            x3,
            algorithm,
            out.reshape(plan.outer, plan.inner) if direct and out is not None else None,
        )
        sgn2 = None
        if return_sign:
            sgn2 = (res2 > -np.inf).astype(res2.dtype)
            sgn2[np.isnan(res2)] = np.nan
            if plan.n == 0:
                sgn2[...] = -1.0
    else:
        direct = False
        b3 = plan.view3(bw)
        res2, sgn2 = _core.logsumexp_weighted(x3, b3, bool(return_sign))
        if not return_sign:
            sgn2 = None
        elif plan.n == 0:
            sgn2[...] = -1.0  # as scipy, and as the unweighted path above

    res = plan.unwork_reduced(res2.reshape(rshape_work), keepdims, x.ndim)
    if res.dtype != rdtype:
        res = res.astype(rdtype)
    if out is not None:
        if not direct:
            np.copyto(out, res)
        res = out
    res = _scalarize(res)
    if return_sign:
        assert sgn2 is not None
        sgn = plan.unwork_reduced(sgn2.reshape(rshape_work), keepdims, x.ndim)
        if sgn.dtype != rdtype:
            sgn = sgn.astype(rdtype)
        return res, _scalarize(sgn)
    return res


# --------------------------------------------------------------------------- softmax


_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _softmax_rows_fast(
    x: np.ndarray, axis: AxisLike, log: bool, out: np.ndarray | None
) -> np.ndarray | None:
    """softmax over the last axis of a C-contiguous float32/float64 array (into a dense,
    disjoint or identical ``out``), or None when the call needs the full planner."""
    if axis is None or type(axis) is int:
        res: np.ndarray | None = _core.rows_fast(x, axis, False, 2 if log else 1, out)
        return res
    return None


def _softmax_like(
    x_in: Any, axis: AxisLike, out: np.ndarray | None, algorithm: str, log: bool
) -> Any:
    _check_algorithm(algorithm)
    if _complex.is_complex(x_in):
        return _complex.softmax_like(x_in, axis, out, log)
    x, rdtype = _as_real_array(x_in, "x")
    scalar = x.ndim == 0
    if scalar:
        x = x.reshape(1)
    axes = normalize_axes(axis, x.ndim)
    user_shape = () if scalar else x.shape
    inplace = False
    user_out = out
    if out is not None:
        _check_out(out, user_shape, rdtype)
        if scalar:
            out = out.reshape(1)  # a view, laid out like x
        if np.may_share_memory(out, x):
            same = (
                out.dtype == x.dtype
                and out.shape == x.shape
                and out.strides == x.strides
                and out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
            )
            if not same and np.shares_memory(out, x):
                raise ValueError("out partially overlaps the input x; pass out=x for in place")
            inplace = same
    plan = _Plan(x, axes)
    x3 = plan.view3()
    out3 = None
    if out is not None and out.dtype == x.dtype:
        if inplace:
            # A copy was made if the layout was not kernel-readable; then write back below.
            out3 = x3 if np.shares_memory(x3, x) else None
        elif plan.moved is None:
            o = out.T if plan.transposed else out
            if o.flags.c_contiguous and o.flags.aligned:
                out3 = o.reshape(plan.outer, plan.n, plan.inner)
    res3 = _core.softmax(x3, log, algorithm, out3)
    if out is not None and out3 is not None:
        return user_out
    res = plan.unwork_full(res3)
    if out is not None:
        np.copyto(out, res, casting="unsafe")
        return user_out
    if res.dtype != rdtype:
        res = res.astype(rdtype)
    if scalar:
        return res.reshape(())[()]
    return res


def softmax(
    x: Any, axis: AxisLike = None, *, out: np.ndarray | None = None, algorithm: str = "auto"
) -> Any:
    r"""Compute the softmax function, ``exp(x) / sum(exp(x))`` along `axis`.

    Semantics of :func:`scipy.special.softmax`: the result has the shape of `x` and sums to 1
    along `axis`.

    Parameters
    ----------
    x : array_like
        Input array. Integers and bools are promoted to float64; float16 is computed in float32
        and returned as float16. Complex input is computed as scipy computes it.
    axis : None or int or tuple of ints, optional
        Axis or axes to normalise over. ``None`` (default) uses the whole array.
    out : ndarray, optional
        Writeable array of `x`'s shape and the result dtype. ``out=x`` updates `x` in place (no
        second array); any other overlap with `x` raises ``ValueError``. stablelse extension.
    algorithm : {"auto", "two_pass", "online"}, optional
        Kernel used for the normaliser; stablelse extension.

    Returns
    -------
    s : ndarray or scalar
        ``exp(x - logsumexp(x, axis, keepdims=True))``.

    Notes
    -----
    As scipy, a slice containing ``+inf``, only ``-inf``, or a NaN gives NaN everywhere in that
    slice. Each output is ``exp(x - max) / S`` with ``S`` summed in float64 for float32 input.

    Deviations from scipy: an empty input returns an empty result (scipy raises
    ``ValueError``); small integer types are promoted to float64 (scipy's NumPy ufuncs give
    float16 for int8/uint8/bool). The gradient of ``logsumexp`` is ``softmax``.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import softmax
    >>> softmax(np.array([1000.0, 1.0, -1000.0]))
    array([1., 0., 0.])
    """
    if type(x) is np.ndarray and algorithm == "auto":
        res = _softmax_rows_fast(x, axis, False, out)
        if res is not None:
            return res
    if _is_gpu_array(x):
        return _gpu_module().softmax(x, axis=axis, out=out)
    return _softmax_like(x, axis, out, algorithm, log=False)


def log_softmax(
    x: Any, axis: AxisLike = None, *, out: np.ndarray | None = None, algorithm: str = "auto"
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

    Returns
    -------
    s : ndarray or scalar
        ``exp(s)`` sums to 1 along `axis`.

    Notes
    -----
    Each output is ``(x - max) - log1p(excess)``, where ``excess`` is the sum of
    ``exp(x - max)`` over all but one maximal element. The top class therefore keeps its
    relative accuracy: for float32 ``[1 - log(eps), 0]`` the first output is about
    ``-4.4e-8``, not 0 (scipy issue 19521). Special values follow scipy: with a ``+inf`` in the
    slice, ``+inf`` entries give NaN and the others ``-inf``; an all ``-inf`` slice gives NaN;
    NaN anywhere gives NaN.

    Deviations from scipy: as :func:`softmax` (empty input, small integer promotion).

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import log_softmax
    >>> log_softmax(np.array([1000.0, 1.0]))
    array([   0., -999.])
    """
    if type(x) is np.ndarray and algorithm == "auto":
        res = _softmax_rows_fast(x, axis, True, out)
        if res is not None:
            return res
    if _is_gpu_array(x):
        return _gpu_module().log_softmax(x, axis=axis, out=out)
    return _softmax_like(x, axis, out, algorithm, log=True)


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
