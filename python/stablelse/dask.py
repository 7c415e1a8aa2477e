"""stablelse on Dask arrays: ``logsumexp``, ``softmax``, ``log_softmax`` and ``cross_entropy``.

Install with ``pip install stablelse[dask]``. Every function is lazy: it returns a Dask array
(a 0-d one for a reduced loss) and ``.compute()`` runs on any scheduler, including a
``dask.distributed`` cluster.

How the reductions run: each block is reduced by the Rust kernels to float64
``(max, excess)`` states (a structured array with fields ``max`` and ``excess``,
:data:`STATE_DTYPE`); the blocks' states are merged with the kernels' merge rule as the combine
and aggregate steps of :func:`dask.array.reduction`, so the reduced axis may be split across
any number of chunks. ``softmax`` / ``log_softmax`` reduce to states first and then map every
block with its broadcast state; ``cross_entropy`` picks the target logit inside the one block
of the class axis that holds it.

Importing :mod:`stablelse` does not import Dask; importing this module does.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("stablelse.dask needs dask[array]: pip install 'stablelse[dask]'") from exc

from ._api import _as_real_array
from ._axes import AxisLike, normalize_axes, normalize_axis
from ._stream import (
    STATE_DTYPE,
    chunk_states,
    log_weighted,
    lse_of_states,
    merge_states_along,
    result_dtype,
)

__all__ = ["STATE_DTYPE", "cross_entropy", "log_softmax", "logsumexp", "lse_states", "softmax"]

AnyArray = npt.NDArray[Any]
SplitEvery = Union[int, dict[int, int], None]


# --------------------------------------------------------------------------- state reduction


def _pack(mx: AnyArray, ex: AnyArray) -> AnyArray:
    out = np.empty(mx.shape, dtype=STATE_DTYPE)
    out["max"] = mx
    out["excess"] = ex
    return out


def _empty_like_reduced(x: AnyArray, dtype: Any) -> AnyArray:
    return np.empty((0,) * x.ndim, dtype=dtype)


def _state_chunk(
    x: AnyArray,
    weights_chunk: Optional[AnyArray] = None,
    *,
    axis: tuple[int, ...],
    keepdims: bool,
    computing_meta: bool = False,
) -> AnyArray:
    """Block -> its states over `axis`, kept as length-1 axes (a structured array)."""
    if computing_meta:
        return _empty_like_reduced(x, STATE_DTYPE)
    xr, _ = _as_real_array(x, "x")
    if weights_chunk is not None:
        xr = log_weighted(xr, np.asarray(weights_chunk), "stablelse.dask.logsumexp", "a block")
    mx, ex = chunk_states(xr, axis)
    shape = tuple(1 if i in axis else s for i, s in enumerate(x.shape))
    return _pack(mx.reshape(shape), ex.reshape(shape))


def _merged(s: AnyArray, axis: tuple[int, ...]) -> tuple[AnyArray, AnyArray]:
    return merge_states_along(np.asarray(s["max"]), np.asarray(s["excess"]), axis)


def _state_combine(
    s: AnyArray, axis: tuple[int, ...], keepdims: bool, computing_meta: bool = False
) -> AnyArray:
    """Concatenated block states -> one state per kept position (keepdims)."""
    if computing_meta or s.dtype != STATE_DTYPE:
        return _empty_like_reduced(s, STATE_DTYPE)
    return _pack(*_merged(s, axis))


def _state_aggregate(
    s: AnyArray,
    axis: tuple[int, ...],
    keepdims: bool,
    want: str,
    rdtype: np.dtype[Any],
    computing_meta: bool = False,
) -> AnyArray:
    """Final merge; returns the states (``want="state"``) or the log-sum-exp in `rdtype`."""
    out_dtype = STATE_DTYPE if want == "state" else rdtype
    if computing_meta or s.dtype != STATE_DTYPE:
        ndim = s.ndim if keepdims else s.ndim - len(axis)
        return np.empty((0,) * ndim, dtype=out_dtype)
    mx, ex = _merged(s, axis)
    if not keepdims:
        mx, ex = np.squeeze(mx, axis), np.squeeze(ex, axis)
    if want == "state":
        return _pack(mx, ex)
    return lse_of_states(mx, ex).astype(rdtype)


def _as_dask(x: Any, name: str) -> da.Array:
    arr = x if isinstance(x, da.Array) else da.asarray(x)
    # Fails early, with the same message as the NumPy path, for complex or object dtypes.
    _as_real_array(np.empty(0, dtype=arr.dtype), name)
    return arr


def _axes_of(x: da.Array, axis: AxisLike) -> tuple[int, ...]:
    return normalize_axes(axis, x.ndim)


def lse_states(
    x: Any, axis: AxisLike = None, *, keepdims: bool = False, split_every: SplitEvery = None
) -> da.Array:
    """The ``(max, excess)`` states of `x` over `axis`, as a lazy structured array.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Real input, chunked in any way (the reduced axes may span many chunks).
    axis : None or int or tuple of ints, optional
        Axes to reduce; ``None`` (default) reduces all.
    keepdims : bool, optional
        Keep the reduced axes with length 1.
    split_every : int or dict, optional
        Fan-in of the merge tree, as for :func:`dask.array.reduction`.

    Returns
    -------
    states : dask.array.Array
        dtype :data:`STATE_DTYPE` (fields ``max`` and ``excess``, float64); see
        :attr:`stablelse.LogSumExp.state` for the convention. ``logsumexp = max +
        log1p(excess)`` where ``max`` is finite.
    """
    xd = _as_dask(x, "x")
    if xd.ndim == 0:
        xd = xd.reshape(1)
    axes = _axes_of(xd, axis)
    return _state_reduction(xd, axes, keepdims, split_every, "state", STATE_DTYPE)


def _state_reduction(
    x: da.Array,
    axes: tuple[int, ...],
    keepdims: bool,
    split_every: SplitEvery,
    want: str,
    rdtype: np.dtype[Any],
    weights: Optional[da.Array] = None,
) -> da.Array:
    out_dtype = STATE_DTYPE if want == "state" else rdtype
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    return da.reduction(
        x,
        _state_chunk,
        partial(_state_aggregate, want=want, rdtype=rdtype),
        combine=_state_combine,
        axis=axes,
        keepdims=keepdims,
        # The intermediate blocks are states; `meta` sets the final dtype.
        dtype=STATE_DTYPE,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0,) * out_ndim, dtype=out_dtype),
        name="stablelse-lse-" + want,
        weights=weights,
    )


# --------------------------------------------------------------------------- logsumexp


def logsumexp(
    a: Any,
    axis: AxisLike = None,
    b: Any = None,
    keepdims: bool = False,
    *,
    split_every: SplitEvery = None,
) -> da.Array:
    """Lazy :func:`stablelse.logsumexp` of a Dask array.

    Parameters
    ----------
    a : dask.array.Array or array_like
        Input; chunked along any axes, including the reduced ones. Integers and bools give
        float64, float16 is computed in float32 and returned as float16 (as the NumPy path).
    axis : None or int or tuple of ints, optional
        Axes to reduce; ``None`` (default) reduces all.
    b : dask.array.Array or array_like, optional
        Non-negative weights broadcastable to `a`'s shape (not the other way round). Elements
        with ``b == 0`` are ignored whatever `a` holds there.
    keepdims : bool, optional
        Keep the reduced axes with length 1.
    split_every : int or dict, optional
        Fan-in of the merge tree, as for :func:`dask.array.reduction`.

    Returns
    -------
    res : dask.array.Array
        0-d when everything is reduced; ``.compute()`` gives what
        ``stablelse.logsumexp(a.compute(), axis, keepdims=keepdims)`` gives (a 0-d ndarray
        rather than a NumPy scalar), up to rounding.

    Notes
    -----
    Each block is reduced by the Rust kernels to float64 ``(max, excess)`` states; the states
    are merged in a fixed tree with the kernels' merge rule, and a float32 result is rounded
    once at the end, so it is within 1 ULP of exact for any chunking. Special values follow
    scipy (empty or all ``-inf`` -> ``-inf``, any ``+inf`` -> ``+inf``, any NaN -> NaN).

    Deviations from the NumPy path: weights must be non-negative (as for
    :class:`stablelse.LogSumExp`; a negative weight raises ``ValueError`` at compute time, and
    a weighted block is reduced as ``a + log(b)`` in float64); no `return_sign`, no `out`.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import stablelse.dask as sd
    >>> x = da.from_array(np.arange(12.0).reshape(3, 4), chunks=(2, 2))
    >>> sd.logsumexp(x, axis=1).compute()
    array([ 3.4401897,  7.4401897, 11.4401897])
    """
    x = _as_dask(a, "a")
    w = None if b is None else _as_dask(b, "b")
    rdtype = result_dtype(x.dtype, None if w is None else w.dtype)
    if x.ndim == 0:
        x = x.reshape(1)
        if keepdims:
            return logsumexp(x, axis, b, True, split_every=split_every)
    axes = _axes_of(x, axis)
    if w is not None:
        try:
            fits = np.broadcast_shapes(w.shape, x.shape) == x.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"b with shape {w.shape} does not broadcast to a's shape {x.shape}")
    return _state_reduction(x, axes, keepdims, split_every, "lse", rdtype, w)


# --------------------------------------------------------------------------- softmax


def _softmax_block(x: AnyArray, st: AnyArray, log: bool, rdtype: np.dtype[Any]) -> AnyArray:
    """softmax / log_softmax of a block given the (broadcast) states of its slices.

    The same formulas as ``src/kernels/scalar.rs``: ``exp(x - max) / (1 + excess)`` and
    ``(x - max) - log1p(excess)`` for a finite max; NaN (softmax) or scipy's unshifted
    ``x - lse`` (log_softmax) otherwise. Computed in float64, rounded once.
    """
    if x.size == 0:
        return np.empty(x.shape, dtype=rdtype)
    mx = np.asarray(st["max"])
    ex = np.asarray(st["excess"])
    fin = np.isfinite(mx)
    xf = np.array(x, dtype=np.float64, copy=True)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if log:
            shift = np.where(fin, mx, 0.0)
            log_total = np.where(fin, np.log1p(ex), mx)
            xf -= shift
            xf -= log_total
        else:
            xf -= np.where(fin, mx, 0.0)
            np.exp(xf, out=xf)
            xf /= np.where(fin, 1.0 + ex, np.nan)
    return xf.astype(rdtype, copy=False)


def _softmax_like(x_in: Any, axis: AxisLike, log: bool, split_every: SplitEvery) -> da.Array:
    x = _as_dask(x_in, "x")
    rdtype = result_dtype(x.dtype)
    scalar = x.ndim == 0
    if scalar:
        x = x.reshape(1)
    axes = _axes_of(x, axis)
    st = _state_reduction(x, axes, True, split_every, "state", STATE_DTYPE)
    out = da.map_blocks(
        _softmax_block,
        x,
        st,
        log=log,
        rdtype=rdtype,
        dtype=rdtype,
        meta=np.empty((0,) * x.ndim, dtype=rdtype),
        token="stablelse-" + ("log_softmax" if log else "softmax"),
    )
    return out.reshape(()) if scalar else out


def softmax(x: Any, axis: AxisLike = None, *, split_every: SplitEvery = None) -> da.Array:
    """Lazy :func:`stablelse.softmax` of a Dask array, ``exp(x) / sum(exp(x))`` along `axis`.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Input; chunked along any axes, including the normalised ones.
    axis : None or int or tuple of ints, optional
        Axes to normalise over; ``None`` (default) uses the whole array.
    split_every : int or dict, optional
        Fan-in of the state merge tree, as for :func:`dask.array.reduction`.

    Returns
    -------
    s : dask.array.Array
        Same shape and chunks as `x`, dtype as the NumPy path.

    Notes
    -----
    Two steps: a state reduction over `axis` (as :func:`logsumexp`), then a blockwise map
    writing ``exp(x - max) / (1 + excess)`` with each block's broadcast state, so `x` is read
    twice (persist it first if it is expensive to produce). Special values as scipy: a slice
    with ``+inf``, only ``-inf`` or a NaN is NaN throughout.
    """
    return _softmax_like(x, axis, False, split_every)


def log_softmax(x: Any, axis: AxisLike = None, *, split_every: SplitEvery = None) -> da.Array:
    """Lazy :func:`stablelse.log_softmax` of a Dask array, ``x - logsumexp(x, axis)``.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Input; chunked along any axes, including the normalised ones.
    axis : None or int or tuple of ints, optional
        Axes to normalise over; ``None`` (default) uses the whole array.
    split_every : int or dict, optional
        Fan-in of the state merge tree, as for :func:`dask.array.reduction`.

    Returns
    -------
    s : dask.array.Array
        Same shape and chunks as `x`.

    Notes
    -----
    Writes ``(x - max) - log1p(excess)`` per block, as the Rust kernel does, so the top class
    keeps its relative accuracy. Special values as :func:`stablelse.log_softmax`.
    """
    return _softmax_like(x, axis, True, split_every)


# --------------------------------------------------------------------------- cross_entropy

_REDUCTIONS = ("mean", "sum", "none")


def _xent_block(
    x: AnyArray,
    t: AnyArray,
    st: AnyArray,
    *,
    ax: int,
    n_classes: int,
    ignore_index: int,
    weight: Optional[AnyArray],
    block_info: Optional[dict[Any, Any]] = None,
) -> AnyArray:
    """Weighted per-row loss contributed by one block of the class axis (keepdims on `ax`).

    Only the block whose class range holds a row's target contributes ``w[t] * (lse - x_t)``;
    every other block contributes exactly 0, so summing over the class blocks is exact.
    """
    if block_info is None or t.size == 0:
        return np.zeros(t.shape, dtype=np.float64)
    lo, hi = block_info[0]["array-location"][ax]
    tt = np.asarray(t).astype(np.int64, copy=False)
    if lo == 0:
        bad = (tt != ignore_index) & ((tt < 0) | (tt >= n_classes))
        if bad.any():
            local = np.argwhere(bad)[0]
            start = [s for s, _ in block_info[1]["array-location"]]
            idx = [int(i) + int(s) for i, s in zip(local, start)]
            del idx[ax]
            raise IndexError(
                f"target{idx} = {tt[tuple(local)]} is outside [0, {n_classes})"
                f" and is not ignore_index ({ignore_index})"
            )
    inblk = (tt != ignore_index) & (tt >= lo) & (tt < hi)
    if x.shape[ax] == 0 or not inblk.any():
        return np.zeros(tt.shape, dtype=np.float64)
    local_t = np.where(inblk, tt - lo, 0)
    xt = np.take_along_axis(x, local_t, axis=ax).astype(np.float64)
    mx = np.asarray(st["max"])
    ex = np.asarray(st["excess"])
    fin = np.isfinite(mx)
    with np.errstate(invalid="ignore", over="ignore"):
        # (max - x_t) + log1p(excess) keeps the accuracy of a near-zero loss.
        loss = np.where(fin, (mx - xt) + np.log1p(np.where(fin, ex, 0.0)), mx - xt)
        if weight is not None:
            loss = loss * weight[np.where(inblk, tt, 0)]
    return np.where(inblk, loss, 0.0)


def _xent_weight_block(t: AnyArray, *, ignore_index: int, weight: Optional[AnyArray]) -> AnyArray:
    tt = np.asarray(t).astype(np.int64, copy=False)
    keep = tt != ignore_index
    if weight is None:
        return keep.astype(np.float64)
    idx = np.clip(tt, 0, weight.shape[0] - 1)
    return np.where(keep, weight[idx], 0.0)


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    split_every: SplitEvery = None,
) -> da.Array:
    """Lazy softmax cross-entropy of Dask `logits` against integer class `target`.

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Unnormalised scores, classes along `axis`. Chunked in any way, including along the
        class axis.
    target : dask.array.Array or array_like of int
        Class indices, shaped like `logits` without `axis`; rechunked to match `logits`.
    axis : int, optional
        The class axis; -1 (default) is the NumPy / optax layout, 1 is torch's
        ``(N, C, d1, ...)`` layout.
    weight : array_like, optional
        Per-class weights of length C (a small in-memory array).
    ignore_index : int, optional
        Targets equal to this contribute nothing and are left out of the mean (default -100).
    reduction : {"mean", "sum", "none"}, optional
        ``"mean"`` is the weighted mean over the non-ignored rows, as torch
        (``sum(w[t] * loss) / sum(w[t])``, NaN when every row is ignored); ``"none"`` returns
        ``w[t] * loss`` per row (0 where ignored).

    Returns
    -------
    loss : dask.array.Array
        0-d for "mean" and "sum", the shape of `target` for "none"; in the logits' result
        dtype (float32 stays float32, integers give float64).

    Raises
    ------
    ValueError
        Bad `reduction`, shapes or `weight` (at call time).
    TypeError
        Non-integer `target` (soft labels are not supported here).
    IndexError
        At compute time, for a target outside ``[0, C)`` that is not `ignore_index`.

    Notes
    -----
    Per row, ``loss = (max - x[t]) + log1p(excess)`` from the row's merged state (the same
    reduction as :func:`logsumexp`), so the logits are read twice: once for the states and
    once to pick ``x[t]`` in the one class block that holds it. Everything is computed in
    float64 and rounded once. Not supported (unlike ``stablelse.cross_entropy``):
    `label_smoothing`, `z_loss`, soft labels, gradients.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import stablelse.dask as sd
    >>> logits = da.from_array(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), chunks=(1, 2))
    >>> target = da.from_array(np.array([0, 2]), chunks=1)
    >>> sd.cross_entropy(logits, target, reduction="none").compute()
    array([0.23954477, 1.09861229])
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    x = _as_dask(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes)")
    ax = normalize_axis(axis, x.ndim)
    rdtype = result_dtype(x.dtype)
    n_classes = x.shape[ax]
    if not isinstance(n_classes, int) or np.isnan(n_classes):
        raise ValueError("logits must have a known number of classes along axis")
    t = target if isinstance(target, da.Array) else da.asarray(target)
    row_shape = tuple(s for i, s in enumerate(x.shape) if i != ax)
    if t.shape != row_shape:
        raise ValueError(
            f"target has shape {t.shape}, expected {row_shape} (logits' shape {x.shape} "
            f"without axis {ax})"
        )
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"target must hold integer class indices, got dtype {t.dtype} (soft labels are "
            "not supported by stablelse.dask.cross_entropy)"
        )
    w: Optional[AnyArray] = None
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != (n_classes,):
            raise ValueError(f"weight has shape {w.shape}, expected ({n_classes},)")
    ignore_index = operator.index(ignore_index)

    st = _state_reduction(x, (ax,), True, split_every, "state", STATE_DTYPE)
    te = da.expand_dims(t, ax).rechunk(
        tuple((1,) if i == ax else c for i, c in enumerate(x.chunks))
    )
    contrib_chunks = tuple((1,) * len(c) if i == ax else c for i, c in enumerate(x.chunks))
    contrib = da.map_blocks(
        _xent_block,
        x,
        te,
        st,
        ax=ax,
        n_classes=n_classes,
        ignore_index=ignore_index,
        weight=w,
        dtype=np.float64,
        chunks=contrib_chunks,
        meta=np.empty((0,) * x.ndim, dtype=np.float64),
        token="stablelse-xent-rows",
    )
    rows = contrib.sum(axis=ax, split_every=split_every)
    if reduction == "none":
        return rows.astype(rdtype)
    total = rows.sum(split_every=split_every)
    if reduction == "sum":
        return total.astype(rdtype)
    tw = da.map_blocks(
        _xent_weight_block,
        t,
        ignore_index=ignore_index,
        weight=w,
        dtype=np.float64,
        meta=np.empty((0,) * t.ndim, dtype=np.float64),
    )
    denom = tw.sum(split_every=split_every)
    return da.map_blocks(_ratio, total, denom, rdtype=rdtype, dtype=rdtype)


def _ratio(num: AnyArray, den: AnyArray, rdtype: np.dtype[Any]) -> AnyArray:
    """``num / den`` in float64 rounded once; 0 / 0 is NaN without a warning (torch)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.true_divide(num, den)).astype(rdtype)
