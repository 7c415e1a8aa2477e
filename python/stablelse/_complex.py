"""Complex input for logsumexp, softmax and log_softmax, with scipy.special's semantics.

The arithmetic runs in Rust (``src/kernels/complex.rs``); this module chooses the dtypes,
maps ``axis`` onto the kernels' ``(outer, n, inner)`` view with the planner (``src/plan.rs``) and
gives the results their shape. complex64 is computed with float64 accumulation and rounded
once, as float32 is. A `where` mask is laid out in the same work order (one byte per element,
a mask-sized temporary) and read by the kernels beside the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _api, _core, _plan
from ._axes import AxisLike, normalize_axes

__all__ = ["is_complex", "logsumexp", "softmax_like"]


def is_complex(v: Any) -> bool:
    """True when `v` (an array, an array-like or None) holds complex numbers."""
    if v is None:
        return False
    dt = getattr(v, "dtype", None)
    if dt is None:
        try:
            dt = np.asarray(v).dtype
        except (ValueError, TypeError):
            return False  # the real path names the problem
    return isinstance(dt, np.dtype) and dt.kind == "c"


class _Layout:
    """One call's kernel view (the planner's, as for the real path) and the way back to the
    caller's axis order. The only place this module touches the planner."""

    def __init__(self, x: np.ndarray, axes: tuple[int, ...]):
        self.x3, self.plan = _plan.kernel_view(x, axes)
        self.shape = x.shape

    def view3(self, arr: np.ndarray) -> np.ndarray:
        """`arr` (shaped like `x`, e.g. the weights) in the same work order as `x`."""
        p = self.plan
        return np.ascontiguousarray(arr.transpose(p.perm)).reshape(p.outer, p.n, p.inner)

    def reduced(self, res2: np.ndarray, keepdims: bool) -> np.ndarray:
        return _plan.reduced_to_user(res2, self.plan, self.shape, keepdims)

    def full(self, res3: np.ndarray) -> np.ndarray:
        return _plan.full_to_user(res3, self.plan, self.shape)


def _compute_dtype(rdtype: np.dtype) -> np.dtype:
    """complex64 is computed as complex64 (float64 sums); anything wider as complex128."""
    return np.dtype(np.complex64) if rdtype == np.complex64 else np.dtype(np.complex128)


def _as_array(v: Any, name: str) -> np.ndarray:
    if type(v) is np.ndarray:
        return v
    try:
        return np.asarray(v)
    except ValueError as exc:
        raise ValueError(f"{name} is not a rectangular array of numbers: {exc}") from None


def _check_numeric(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")


def logsumexp(
    a: Any,
    axis: AxisLike = None,
    b: Any = None,
    keepdims: bool = False,
    return_sign: bool = False,
    out: np.ndarray | None = None,
    where: Any = None,
) -> Any:
    """:func:`stablelse.logsumexp` for complex `a` or `b` (see its docstring)."""
    x = _as_array(a, "a")
    bw = None if b is None else _as_array(b, "b")
    _check_numeric(x, "a")
    if bw is not None:
        _check_numeric(bw, "b")
    # As scipy: the promoted dtype of a and b (ints and complex64 give complex128).
    rdtype = x.dtype if bw is None else np.result_type(x.dtype, bw.dtype)
    rdtype = rdtype.newbyteorder("=")
    cdtype = _compute_dtype(rdtype)
    x = x.astype(cdtype, copy=False)
    if bw is not None:
        try:
            x, bw = np.broadcast_arrays(x, bw.astype(cdtype, copy=False))
        except ValueError:
            raise ValueError(
                f"b with shape {np.shape(b)} does not broadcast against a with shape {np.shape(a)}"
            ) from None
    mask = None if where is None else _api._where_mask(where, x.shape)
    if x.ndim == 0:
        x = x.reshape(1)
        bw = bw.reshape(1) if bw is not None else None
        mask = mask.reshape(1) if mask is not None else None
    axes = normalize_axes(axis, x.ndim)
    lay = _Layout(x, axes)
    user_shape = lay.reduced(np.empty((lay.plan.outer, lay.plan.inner), np.int8), keepdims).shape
    # scipy returns log|sum| (real) with the sign, except for an empty input: -inf + 0j.
    real_result = return_sign and x.size != 0
    odtype = np.finfo(rdtype).dtype if real_result else rdtype
    if out is not None:
        _api._check_out(out, user_shape, odtype)
        if any(isinstance(v, np.ndarray) and np.shares_memory(out, v) for v in (x, a, b)):
            raise ValueError("out overlaps the input a or b")

    res2, sgn2 = _core.logsumexp_complex(
        lay.x3,
        None if bw is None else lay.view3(bw),
        bool(return_sign),
        None if mask is None else lay.view3(mask),
    )
    res = lay.reduced(res2, keepdims)
    if real_result:
        res = res.real
    res = res.astype(odtype, copy=False)
    if out is not None:
        np.copyto(out, res)
        res = out
    res = _api._scalarize(res)
    if sgn2 is None:
        return res
    sgn = lay.reduced(sgn2, keepdims)
    return res, _api._scalarize(sgn.astype(rdtype, copy=False))


def softmax_like(
    x_in: Any, axis: AxisLike, out: np.ndarray | None, log: bool, where: Any = None
) -> Any:
    """:func:`stablelse.softmax` / :func:`stablelse.log_softmax` for complex `x`."""
    x = _as_array(x_in, "x")
    rdtype = x.dtype.newbyteorder("=")
    x = x.astype(_compute_dtype(rdtype), copy=False)
    mask = None if where is None else _api._where_mask(where, x.shape)
    scalar = x.ndim == 0
    if scalar:
        x = x.reshape(1)
        mask = mask.reshape(1) if mask is not None else None
    axes = normalize_axes(axis, x.ndim)
    if out is not None:
        _api._check_out(out, () if scalar else x.shape, rdtype)
        same = isinstance(x_in, np.ndarray) and out is x_in
        if not same and isinstance(x_in, np.ndarray) and np.shares_memory(out, x_in):
            raise ValueError("out partially overlaps the input x; pass out=x for in place")
    lay = _Layout(x, axes)
    res = lay.full(
        _core.softmax_complex(lay.x3, bool(log), None if mask is None else lay.view3(mask))
    )
    if out is not None:
        # The kernel wrote a fresh array, so out may be x itself.
        np.copyto(out, res.reshape(out.shape), casting="unsafe")
        return out
    res = res.astype(rdtype, copy=False)
    if scalar:
        return res.reshape(())[()]
    return res
