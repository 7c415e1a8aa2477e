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

import math
import re
from functools import partial
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

try:
    import dask.array as da
    from dask import delayed
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("stablelse.dask needs dask[array]: pip install 'stablelse[dask]'") from exc

from . import _core
from ._api import _as_real_array
from ._axes import AxisLike, normalize_axes, normalize_axis
from ._losses import cross_entropy as _np_cross_entropy
from ._spec import (
    MaskedProbabilityError,
    MaskedTargetError,
    Reduction,
    TargetError,
    check_where,
    loss_options,
    target_kind,
    weight_array,
)
from ._spec import _reduction as _check_reduction
from ._stream import (
    STATE_DTYPE,
    chunk_states,
    log_weighted,
    lse_of_states,
    merge_states_along,
    result_dtype,
)

__all__ = [
    "STATE_DTYPE",
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "lse_states",
    "segment_cross_entropy",
    "segment_log_softmax",
    "segment_logsumexp",
    "segment_softmax",
    "softmax",
]

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
    masked: bool = False,
    computing_meta: bool = False,
) -> AnyArray:
    """Block -> its states over `axis`, kept as length-1 axes (a structured array).

    ``weights_chunk`` is the block of the weights, or with ``masked`` the block of the bool
    ``where`` mask (read by the kernels beside the block).
    """
    if computing_meta:
        return _empty_like_reduced(x, STATE_DTYPE)
    # float16 / bfloat16 blocks are widened per kernel block, unless weighted (x + log(b)).
    xr, _ = _as_real_array(x, "x", half=masked or weights_chunk is None)
    mask = None
    if masked:
        mask = np.asarray(weights_chunk)
    elif weights_chunk is not None:
        xr = log_weighted(xr, np.asarray(weights_chunk), "stablelse.dask.logsumexp", "a block")
    mx, ex = chunk_states(xr, axis, mask)
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


def _where_dask(where: Any, shape: tuple[int, ...]) -> da.Array:
    """`where` as a bool Dask array broadcastable to `shape`, or the error naming it."""
    w = where if isinstance(where, da.Array) else da.asarray(np.asarray(where))
    if w.dtype != np.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {w.dtype}")
    try:
        fits = np.broadcast_shapes(w.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"where with shape {w.shape} does not broadcast to the input's shape {shape}"
        )
    return w


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
    mask: Optional[da.Array] = None,
) -> da.Array:
    out_dtype = STATE_DTYPE if want == "state" else rdtype
    out_ndim = x.ndim if keepdims else x.ndim - len(axes)
    if mask is not None:
        # Masked weights take no part (weight 0 drops an element whatever it holds); without
        # weights the mask itself travels in the weights' slot, to the kernels.
        mask = da.broadcast_to(mask, x.shape).rechunk(x.chunks)
        weights = mask if weights is None else da.where(mask, weights, 0)
    return da.reduction(
        x,
        partial(_state_chunk, masked=mask is not None and weights is mask),
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
    where: Any = None,
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
    where : dask.array.Array or array_like of bool, optional
        Mask broadcastable to `a`'s shape, as :func:`stablelse.logsumexp`'s `where` (JAX's
        semantics: masked elements take no part whatever they hold or weigh; a fully masked
        reduction gives ``-inf``). Each block's mask is read by the kernels beside the block.

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
    m = None if where is None else _where_dask(where, x.shape)
    if x.ndim == 0:
        x = x.reshape(1)
        m = None if m is None else m.reshape(1)
        if keepdims:
            return logsumexp(x, axis, b, True, split_every=split_every, where=m)
    axes = _axes_of(x, axis)
    if w is not None:
        try:
            fits = np.broadcast_shapes(w.shape, x.shape) == x.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"b with shape {w.shape} does not broadcast to a's shape {x.shape}")
    return _state_reduction(x, axes, keepdims, split_every, "lse", rdtype, w, m)


# --------------------------------------------------------------------------- softmax


def _softmax_block(
    x: AnyArray,
    st: AnyArray,
    mask: Optional[AnyArray] = None,
    *,
    axes: tuple[int, ...],
    log: bool,
    rdtype: np.dtype[Any],
) -> AnyArray:
    """softmax / log_softmax of a block given the merged states of its slices over `axes`.

    The block's slices are laid out as rows (the normalised axes last, one copy) and written
    by the Rust row writer with the given states, so each element gets what the NumPy path's
    kernel writes for it; with `mask` (the block of ``where``), the writer puts 0 / ``-inf`` at
    the masked positions.
    """
    if x.size == 0:
        return np.empty(x.shape, dtype=rdtype)
    # float16 / bfloat16 rows are widened and rounded per step by the row writer (no copy).
    xr, _ = _as_real_array(x, "x", half=True)
    k = len(axes)
    last = tuple(range(x.ndim - k, x.ndim))
    moved = np.moveaxis(xr, axes, last)
    rows = np.ascontiguousarray(moved).reshape(math.prod(moved.shape[: x.ndim - k]), -1)
    keep = None
    if mask is not None:
        keep = np.ascontiguousarray(
            np.moveaxis(np.broadcast_to(mask, x.shape), axes, last)
        ).reshape(rows.shape)
    # The states are kept-dims (length 1 on `axes`); one per row, in the rows' order.
    kept = [1 if i in axes else n for i, n in enumerate(x.shape)]
    mx = np.broadcast_to(np.asarray(st["max"]), kept)
    ex = np.broadcast_to(np.asarray(st["excess"]), mx.shape)
    # Blocks deserialised by dask.distributed may be unaligned; the kernels read aligned data.
    flat = [
        np.ascontiguousarray(v, dtype=np.float64).reshape(-1)
        for v in (np.moveaxis(mx, axes, last), np.moveaxis(ex, axes, last))
    ]
    mxr, exr = (v if v.flags.aligned else v.copy() for v in flat)
    if not rows.flags.aligned:
        rows = rows.copy()
    y = _core.softmax_from_states(rows, mxr, exr, log, keep).reshape(moved.shape)
    return np.moveaxis(y, last, axes).astype(rdtype, copy=False)


def _softmax_like(
    x_in: Any, axis: AxisLike, log: bool, split_every: SplitEvery, where: Any = None
) -> da.Array:
    x = _as_dask(x_in, "x")
    rdtype = result_dtype(x.dtype)
    m = None if where is None else _where_dask(where, x.shape)
    scalar = x.ndim == 0
    if scalar:
        x = x.reshape(1)
        m = None if m is None else m.reshape(1)
    axes = _axes_of(x, axis)
    st = _state_reduction(x, axes, True, split_every, "state", STATE_DTYPE, mask=m)
    # The mask block beside each block of x (same chunks; broadcast axes stay cheap views).
    extra = () if m is None else (da.broadcast_to(m, x.shape).rechunk(x.chunks),)
    out = da.map_blocks(
        _softmax_block,
        x,
        st,
        *extra,
        axes=axes,
        log=log,
        rdtype=rdtype,
        dtype=rdtype,
        meta=np.empty((0,) * x.ndim, dtype=rdtype),
        token="stablelse-" + ("log_softmax" if log else "softmax"),
    )
    return out.reshape(()) if scalar else out


def softmax(
    x: Any, axis: AxisLike = None, *, split_every: SplitEvery = None, where: Any = None
) -> da.Array:
    """Lazy :func:`stablelse.softmax` of a Dask array, ``exp(x) / sum(exp(x))`` along `axis`.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Input; chunked along any axes, including the normalised ones.
    axis : None or int or tuple of ints, optional
        Axes to normalise over; ``None`` (default) uses the whole array.
    split_every : int or dict, optional
        Fan-in of the state merge tree, as for :func:`dask.array.reduction`.
    where : dask.array.Array or array_like of bool, optional
        Mask broadcastable to `x`'s shape, as :func:`stablelse.softmax`'s `where` (JAX's
        semantics: the normaliser runs over the kept elements; masked positions get 0).

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
    return _softmax_like(x, axis, False, split_every, where)


def log_softmax(
    x: Any, axis: AxisLike = None, *, split_every: SplitEvery = None, where: Any = None
) -> da.Array:
    """Lazy :func:`stablelse.log_softmax` of a Dask array, ``x - logsumexp(x, axis)``.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Input; chunked along any axes, including the normalised ones.
    axis : None or int or tuple of ints, optional
        Axes to normalise over; ``None`` (default) uses the whole array.
    split_every : int or dict, optional
        Fan-in of the state merge tree, as for :func:`dask.array.reduction`.
    where : dask.array.Array or array_like of bool, optional
        Mask broadcastable to `x`'s shape, as :func:`stablelse.log_softmax`'s `where` (JAX's
        semantics: the normaliser runs over the kept elements; masked positions get ``-inf``).

    Returns
    -------
    s : dask.array.Array
        Same shape and chunks as `x`.

    Notes
    -----
    Writes ``(x - max) - log1p(excess)`` per block, as the Rust kernel does, so the top class
    keeps its relative accuracy. Special values as :func:`stablelse.log_softmax`.
    """
    return _softmax_like(x, axis, True, split_every, where)


# --------------------------------------------------------------------------- cross_entropy


def _block_call(
    x: AnyArray,
    tb: AnyArray,
    m: Optional[AnyArray],
    w: Optional[AnyArray],
    reduction: str,
    zl: float,
    *,
    ax: int,
    ignore_index: int,
    label_smoothing: float,
    block_info: Optional[dict[Any, Any]],
    return_grad: bool = False,
) -> Any:
    """The NumPy path's loss (and gradient) of one block; a bad target is named by its
    position in the whole target, not in the block."""
    try:
        return _np_cross_entropy(
            x, tb, axis=ax, weight=w, ignore_index=ignore_index, reduction=reduction,  # type: ignore[arg-type]
            label_smoothing=label_smoothing, z_loss=zl, where=m, return_grad=return_grad,
        )
    except (TargetError, MaskedTargetError, MaskedProbabilityError) as exc:
        if block_info is None:
            raise
        loc = block_info[0]["array-location"]
        raise exc.shifted(tuple(lo for i, (lo, _) in enumerate(loc) if i != ax)) from None


def _xent_grad_block(
    x: AnyArray,
    t: AnyArray,
    *extra: AnyArray,
    ax: int,
    kind: str,
    weight: Optional[AnyArray],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    masked: bool,
    mean: bool,
    rdtype: np.dtype[Any],
    block_info: Optional[dict[Any, Any]] = None,
) -> AnyArray:
    """The gradient of the returned loss with respect to one block of logits. "sum" and
    "none": the block's own gradient of its sum (the NumPy path's bits). "mean": that of
    ``main / D + z * zterm / K`` with the whole batch's ``D + iK`` (last of `extra`), as the
    gradient of the block's sum with the z-loss scaled by ``D / K``, computed in float64 and
    divided by ``D`` before its one rounding."""
    m = extra[0] if masked else None
    tb = np.squeeze(t, ax) if kind == "index" else t
    run = partial(_block_call, tb=tb, m=m, w=weight, reduction="sum", ax=ax,
                  ignore_index=ignore_index, label_smoothing=label_smoothing,
                  block_info=block_info, return_grad=True)
    if not mean:
        return np.asarray(run(x, zl=z_loss)[1]).astype(rdtype, copy=False)
    dk = complex(np.asarray(extra[-1]).reshape(-1)[0])
    d, k = dk.real, dk.imag
    if k == 0.0:
        # No row takes part: the NumPy path writes 0 everywhere.
        return np.zeros(x.shape, dtype=rdtype)
    zl = z_loss * d / k if z_loss > 0.0 and d != k else z_loss
    g = run(np.asarray(x, dtype=np.float64), zl=zl)[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (g / d).astype(rdtype)


def _xent_block(
    x: AnyArray,
    t: AnyArray,
    m: Optional[AnyArray] = None,
    *,
    ax: int,
    kind: str,
    weight: Optional[AnyArray],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    mode: str,
    block_info: Optional[dict[Any, Any]] = None,
) -> AnyArray:
    """The loss of one block that holds every class of its rows, by the NumPy path's kernel.

    ``mode`` ``"none"``: the per-element losses. ``"sum"``: the block's sum, as an array of
    ones with the class axis kept. ``"split"``: the sum without the z-loss term and the z-loss
    term alone, along the class axis (length 2), for a weighted mean whose two terms have
    different denominators (the z term is class-weight free: a zero weight leaves only it).
    ``m`` is the block of the ``where=`` mask, if any.
    """
    tb = np.squeeze(t, ax) if kind == "index" else t

    def run(w: Optional[AnyArray], reduction: str, zl: float) -> Any:
        return _block_call(x, tb, m, w, reduction, zl, ax=ax, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, block_info=block_info)

    if mode == "none":
        return np.asarray(run(weight, "none", z_loss))
    shape = [1] * x.ndim
    if mode == "split":
        shape[ax] = 2
        main = run(weight, "sum", 0.0)
        zero = None if weight is None else np.zeros_like(weight)
        zpart = run(zero, "sum", z_loss)
        return np.array([main, zpart], dtype=np.float64).reshape(shape)
    return np.full(shape, float(run(weight, "sum", z_loss)))


def _denominator_block(t: AnyArray, *, ignore_index: int, weight: Optional[AnyArray]) -> AnyArray:
    """torch's "mean" denominators of index targets: ``sum(w[t])`` and the count, both over
    the non-ignored targets (a target out of range is reported by the loss blocks)."""
    tt = np.asarray(t)
    keep = tt != ignore_index
    if weight is None:
        w = keep.astype(np.float64)
    else:
        idx = np.clip(tt, 0, max(weight.shape[0] - 1, 0)).astype(np.intp)
        w = np.where(keep, weight[idx] if weight.size else 0.0, 0.0)
    out = np.empty(tt.shape + (2,), dtype=np.float64)
    out[..., 0] = w
    out[..., 1] = keep
    return out


def _masked_denominator_block(
    t: AnyArray,
    m: AnyArray,
    *,
    ax: int,
    kind: str,
    ignore_index: int,
    weight: Optional[AnyArray],
) -> AnyArray:
    """The "mean" denominators of one block under ``where=``: rows that keep no class count
    as ignored (the loss blocks report targets on masked classes). ``(D, K)`` along `ax`."""
    alive = np.asarray(m).any(axis=ax)
    if kind == "index":
        tt = np.squeeze(np.asarray(t), ax)
        dk = _denominator_block(np.where(alive, tt, ignore_index), ignore_index=ignore_index,
                                weight=weight)
        d, k = float(dk[..., 0].sum()), float(dk[..., 1].sum())
    else:
        d = k = float(alive.sum())
    shape = [1] * m.ndim
    shape[ax] = 2
    return np.array([d, k], dtype=np.float64).reshape(shape)


def _mean(parts: AnyArray, den: AnyArray, rdtype: np.dtype[Any]) -> AnyArray:
    """``sum / D`` (or ``main / D + z / K``) in float64, rounded once; 0 / 0 is NaN without a
    warning (torch)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if parts.shape[-1] == 2:
            res = parts[..., 0] / den[..., 0] + parts[..., 1] / den[..., 1]
        else:
            res = parts[..., 0] / den[..., 0]
    return np.asarray(res).astype(rdtype)


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_grad: bool = False,
    grad_out: Any = None,
    where: Any = None,
    split_every: SplitEvery = None,
) -> Union[da.Array, tuple[da.Array, da.Array]]:
    """Lazy :func:`stablelse.cross_entropy` of Dask `logits` against class `target`.

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Unnormalised scores, classes along `axis`, chunked in any way: the class axis is
        gathered into one chunk per block (a rechunk when it is split), so each block's rows
        are complete. Chunk along the other axes to bound the block size.
    target : dask.array.Array or array_like
        Class indices (integer, the logits' shape without `axis`) or class probabilities
        (floating, the logits' shape), as :func:`stablelse.cross_entropy` decides; rechunked
        to match `logits`.
    axis, weight, ignore_index, reduction, label_smoothing, z_loss
        As :func:`stablelse.cross_entropy`; validated at call time by the same rules.
    return_grad : bool, optional
        Also return the gradient of the returned loss (of its sum for "none") with respect to
        `logits`, as a Dask array chunked like the logits with the class axis whole.
    grad_out
        Not supported here (the gradient is returned lazily): ``NotImplementedError``; without
        ``return_grad=True`` the same ``ValueError`` as the NumPy path.
    where : dask.array.Array or array_like of bool, optional
        The class mask of :func:`stablelse.cross_entropy`, broadcastable to `logits`;
        checked at call time by the same rule, broadcast and rechunked like `logits` (a
        broadcast axis stays a zero-stride view inside each block). Under ``"mean"`` the
        denominators leave out the rows that keep no class.
    split_every : int or dict, optional
        Fan-in of the sum tree, as for :func:`dask.array.reduction`.

    Returns
    -------
    loss : dask.array.Array
        0-d for "mean" and "sum", of the targets' batch shape for "none"; in the logits'
        result dtype (float32 stays float32, integers give float64).
    grad : dask.array.Array
        Only with ``return_grad=True``: the logits' shape, in the result dtype.

    Raises
    ------
    ValueError, TypeError
        At call time, as :func:`stablelse.cross_entropy` (options, shapes, dtypes, `weight`),
        and for chunks of unknown size.
    IndexError
        At compute time, for a class index outside ``[0, C)`` that is not `ignore_index`, or
        on a class that `where` masks, naming its position in the whole target (probability
        mass on a masked class: ``ValueError``, likewise).

    Notes
    -----
    Every block is computed by the NumPy path's kernel (:func:`stablelse.cross_entropy`):
    ``"none"`` gives exactly its per-element losses. ``"sum"`` and ``"mean"`` add the blocks'
    sums in float64, each block's sum rounded to the result dtype by the kernel, so a float32
    result may differ from the NumPy path's in the last bit. ``"mean"`` divides by torch's
    denominator (``sum(w[t])`` over non-ignored index targets, the batch size for
    probabilities) and, with class weights and `z_loss`, divides the z term by the count of
    non-ignored targets as the NumPy path does (two kernel passes per block; a row holding
    ``+inf`` then gives NaN rather than ``inf``). The gradient of "none" and "sum" is the NumPy
    path's, bit for bit (each block's rows by its kernel); that of "mean" needs the whole
    batch's denominators first, and is each block's gradient of its sum (its z-loss scaled by
    ``D / K`` when those differ) computed in float64 and divided by ``D`` before one rounding,
    so a float32 result may differ from the NumPy path's in the last bit.

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
    opts = loss_options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        return_grad=return_grad,
        grad_out=grad_out,
    )
    if grad_out is not None:
        raise NotImplementedError(
            "grad_out is not supported on Dask arrays: the gradient is returned as one"
        )
    x = _as_dask(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis), got a scalar")
    ax = normalize_axis(axis, x.ndim)
    t = target if isinstance(target, da.Array) else da.asarray(target)
    kind = target_kind(t.shape, t.dtype, x.shape, ax, True, opts.ignore_index)
    if where is not None:
        check_where(where, x.shape)
    rdtype = result_dtype(x.dtype)
    n_classes = int(x.shape[ax])
    w = weight_array(weight, n_classes, np.dtype(np.float64))
    xr = x.rechunk({ax: -1})
    masks: tuple[da.Array, ...] = ()
    if where is not None:
        m = where if isinstance(where, da.Array) else da.asarray(np.asarray(where))
        lead = x.ndim - m.ndim
        # The mask's own axes take the logits' chunks, its length-1 axes stay whole: blocks
        # of the broadcast are then zero-stride views, never expanded copies.
        m = m.rechunk(tuple(
            (1,) if m.shape[i] == 1 else xr.chunks[lead + i] for i in range(m.ndim)
        ))
        masks = (da.broadcast_to(m, x.shape, chunks=xr.chunks),)
    if kind == "index":
        te = da.expand_dims(t, ax).rechunk(
            tuple((1,) if i == ax else c for i, c in enumerate(xr.chunks))
        )
    else:
        te = t.rechunk(xr.chunks)
    split = (
        opts.reduction == "mean" and kind == "index" and w is not None and opts.z_loss > 0.0
    )
    mode = opts.reduction if opts.reduction != "mean" else ("split" if split else "sum")
    block = partial(
        _xent_block,
        ax=ax,
        kind=kind,
        weight=w,
        ignore_index=opts.ignore_index,
        label_smoothing=opts.label_smoothing,
        z_loss=opts.z_loss,
        mode=mode,
    )
    grad = partial(_xent_grad, xr, te, masks, ax=ax, kind=kind, weight=w, opts=opts,
                   rdtype=rdtype)
    if mode == "none":
        loss = da.map_blocks(
            block, xr, te, *masks, drop_axis=ax, dtype=rdtype,
            meta=np.empty((0,) * (x.ndim - 1), dtype=rdtype), token="stablelse-xent-none",
        )
        return (loss, grad(None)) if opts.return_grad else loss
    width = 2 if split else 1
    chunks = tuple((width,) if i == ax else (1,) * len(c) for i, c in enumerate(xr.chunks))
    sums = da.map_blocks(
        block, xr, te, *masks, chunks=chunks, dtype=np.float64,
        meta=np.empty((0,) * x.ndim, dtype=np.float64), token="stablelse-xent-" + mode,
    )
    others = tuple(i for i in range(x.ndim) if i != ax)
    parts = sums.sum(axis=others, split_every=split_every)
    if opts.reduction == "sum":
        loss = parts[0].astype(rdtype)
        return (loss, grad(None)) if opts.return_grad else loss
    if masks:
        dchunks = tuple((2,) if i == ax else (1,) * len(c) for i, c in enumerate(xr.chunks))
        dens = da.map_blocks(
            _masked_denominator_block, te, *masks, ax=ax, kind=kind,
            ignore_index=opts.ignore_index, weight=w, chunks=dchunks, dtype=np.float64,
            meta=np.empty((0,) * x.ndim, dtype=np.float64),
        )
        den = dens.sum(axis=others, split_every=split_every)
    elif kind == "probs":
        lanes = float(math.prod(t.shape[:ax] + t.shape[ax + 1 :]))
        den = da.from_array(np.array([lanes, lanes]))
    else:
        dens = da.map_blocks(
            _denominator_block, t, ignore_index=opts.ignore_index, weight=w,
            new_axis=t.ndim, chunks=t.chunks + ((2,),), dtype=np.float64,
            meta=np.empty((0,) * (t.ndim + 1), dtype=np.float64),
        )
        den = dens.sum(axis=tuple(range(t.ndim)), split_every=split_every)
    loss = da.map_blocks(_mean, parts, den, rdtype=rdtype, dtype=rdtype, drop_axis=0,
                         meta=np.empty((), dtype=rdtype))
    return (loss, grad(den)) if opts.return_grad else loss


def _xent_grad(
    xr: da.Array,
    te: da.Array,
    masks: tuple[da.Array, ...],
    den: Optional[da.Array],
    *,
    ax: int,
    kind: str,
    weight: Optional[AnyArray],
    opts: Any,
    rdtype: np.dtype[Any],
) -> da.Array:
    """The gradient of :func:`cross_entropy`'s loss, block by block of `xr` (each block
    holding whole rows), with the batch's "mean" denominators `den` when given."""
    args: list[Any] = [xr, te, *masks]
    if den is not None:
        # (D, K) as one complex number in an array of ones along every axis, which every
        # block of the logits meets whole.
        args.append((den[0] + 1j * den[1]).reshape((1,) * xr.ndim))
    return da.map_blocks(
        _xent_grad_block, *args, dtype=rdtype, meta=np.empty((0,) * xr.ndim, dtype=rdtype),
        ax=ax, kind=kind, weight=weight, ignore_index=opts.ignore_index,
        label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, masked=bool(masks),
        mean=den is not None, rdtype=rdtype, token="stablelse-xent-grad",
    )


# --------------------------------------------------------------------------- segments


def _segment_layout(
    x_in: Any, segment_ids: Any, num_segments: Any, offsets: Any, axis: Any, sorted: bool
) -> tuple[da.Array, int, da.Array, int, bool]:
    """`x` with the segment axis first, that axis, one int64 id per row as a Dask array
    chunked like it (derived from `offsets` in the CSR form), the number of segments and
    whether the ids are sorted."""
    from ._segments import _num_segments, _offsets_of  # noqa: PLC0415

    x = _as_dask(x_in, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (the segment axis)")
    ax = normalize_axis(axis, x.ndim)
    xm = da.moveaxis(x, ax, 0)
    rows = xm.shape[0]
    if math.isnan(rows):
        raise ValueError(
            "x has chunks of unknown size along the segment axis; call compute_chunk_sizes()"
        )
    offs, count = _offsets_of(segment_ids, offsets, num_segments)
    if offs is not None:
        if offs.size == 0 or offs[0] != 0 or offs[-1] != rows or (np.diff(offs) < 0).any():
            raise ValueError(
                f"offsets must be non-decreasing from 0 to the {rows} rows of x along axis {ax}"
            )
        # Row r belongs to the last segment starting at or before it.
        ids = da.map_blocks(
            lambda r: np.searchsorted(offs, r, side="right") - 1,
            da.arange(rows, chunks=(xm.chunks[0],), dtype=np.int64),
            dtype=np.int64,
        )
        return xm, ax, ids, count, True
    if num_segments is None:
        raise TypeError("num_segments is required with segment_ids on Dask arrays")
    count = _num_segments(num_segments)
    ids = segment_ids if isinstance(segment_ids, da.Array) else da.asarray(np.asarray(segment_ids))
    if ids.ndim != 1 or ids.shape[0] != rows:
        raise ValueError(
            f"segment_ids has shape {ids.shape} but x has {rows} positions along axis {ax}"
        )
    if ids.dtype.kind not in "iu":
        raise TypeError(f"segment_ids must hold integers, got dtype {ids.dtype}")
    return xm, ax, ids.rechunk((xm.chunks[0],)), count, bool(sorted)


def _segment_block(xb: AnyArray) -> AnyArray:
    """A block as the kernels' aligned C-contiguous ``(rows, inner)`` float array."""
    xr, _ = _as_real_array(xb, "x")
    x2 = np.ascontiguousarray(xr).reshape(xb.shape[0], -1)
    return x2 if x2.flags.aligned else x2.copy()


def _segment_state_block(
    xb: AnyArray,
    ib: AnyArray,
    *,
    count: int,
    sorted: bool,
    block_info: Optional[dict[Any, Any]] = None,
) -> AnyArray:
    """One block's states of every segment, ``(1, count, *other axes)``."""
    from ._segments import _index_array  # noqa: PLC0415

    # The ids broadcast along the other axes (length 1): one per row, none in an empty block.
    arr = np.asarray(ib)
    ids = _index_array(arr[(slice(None),) + (0,) * (arr.ndim - 1)], "segment_ids")
    kw: dict[str, Any] = {"segment_ids": ids, "num_segments": count, "sorted": sorted}
    shape = (1, count) + xb.shape[1:]
    try:
        if xb.size == 0:
            if xb.shape[0]:
                # No columns: nothing to reduce, but the ids are still checked.
                _core.segment_states(np.zeros((xb.shape[0], 1)), **kw)
            return _pack(np.full(shape, -np.inf), np.full(shape, -1.0))
        mx, ex = _core.segment_states(_segment_block(xb), **kw)
    except (IndexError, ValueError) as exc:
        if block_info is None:
            raise
        # Name the position in the whole array, not in the block.
        start = int(block_info[0]["array-location"][0][0])
        msg = re.sub(
            r"segment_ids\[(\d+)\]", lambda m: f"segment_ids[{int(m[1]) + start}]", str(exc)
        )
        raise type(exc)(msg) from None
    return _pack(mx.reshape(shape), ex.reshape(shape))


def _states_identity(
    s: AnyArray, axis: tuple[int, ...], keepdims: bool, computing_meta: bool = False
) -> AnyArray:
    return _empty_like_reduced(s, STATE_DTYPE) if computing_meta else s


def _segment_reduction(
    xm: da.Array,
    ids: da.Array,
    count: int,
    sorted: bool,
    split_every: SplitEvery,
    want: str,
    rdtype: np.dtype[Any],
) -> da.Array:
    """The merged states (``want="state"``) or log-sum-exp of every segment, ``(count, *other
    axes)``: one block of states per chunk of rows, merged across the chunks by the state
    reduction's combine and aggregate steps (the kernels' merge rule)."""
    # The ids broadcast along the other axes, so each block of x meets its rows' ids.
    idb = ids.reshape((ids.shape[0],) + (1,) * (xm.ndim - 1))
    per_block = da.map_blocks(
        _segment_state_block,
        xm,
        idb,
        new_axis=1,
        chunks=((1,) * len(xm.chunks[0]), (count,)) + xm.chunks[1:],
        dtype=STATE_DTYPE,
        meta=np.empty((0,) * (xm.ndim + 1), dtype=STATE_DTYPE),
        count=count,
        sorted=sorted,
    )
    out_dtype = STATE_DTYPE if want == "state" else rdtype
    return da.reduction(
        per_block,
        _states_identity,
        partial(_state_aggregate, want=want, rdtype=rdtype),
        combine=_state_combine,
        axis=0,
        keepdims=False,
        dtype=STATE_DTYPE,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0,) * xm.ndim, dtype=out_dtype),
        name="stablelse-segment-" + want,
    )


def segment_logsumexp(
    x: Any,
    segment_ids: Any = None,
    num_segments: Any = None,
    *,
    offsets: Any = None,
    axis: int = 0,
    sorted: bool = False,
    split_every: SplitEvery = None,
) -> da.Array:
    """Lazy :func:`stablelse.segment_logsumexp` of a Dask array.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Real input, chunked in any way: a segment may span any number of chunks along `axis`.
    segment_ids : dask.array.Array or array_like of int, optional
        One id per position along `axis`, in ``[0, num_segments)``; rechunked to `x`'s chunks
        along `axis`. Exactly one of `segment_ids` and `offsets` is given.
    num_segments : int
        The number of segments; required with `segment_ids` (the ids are not read at call
        time). With `offsets` it defaults to ``len(offsets) - 1``.
    offsets : array_like of int, optional
        CSR form as :func:`stablelse.segment_logsumexp`, a NumPy array known at call time
        (validated then).
    axis : int, optional
        The segment axis (default 0).
    sorted : bool, optional
        Promise that the ids are non-decreasing; checked within each chunk (``ValueError`` at
        compute time), not across chunk boundaries.
    split_every : int or dict, optional
        Fan-in of the merge tree over the chunks of `axis`, as for
        :func:`dask.array.reduction`.

    Returns
    -------
    res : dask.array.Array
        `x`'s shape with `axis` replaced by `num_segments` (one chunk along it), in the
        NumPy path's result dtype.

    Raises
    ------
    IndexError
        At compute time, an id outside ``[0, num_segments)``, naming its position in the
        whole `segment_ids`.

    Notes
    -----
    Every chunk of rows is reduced by the Rust kernels to float64 ``(max, excess)`` states
    of all segments (an absent segment has the empty state); the chunks' states are merged
    with the kernels' merge rule in a fixed tree, as :func:`logsumexp` merges its blocks, so
    a segment split across chunks gives the NumPy path's value up to rounding (within a few
    ULP), and the same bits for any scheduler. Each chunk produces ``num_segments`` states
    per column: chunk along `axis` in pieces large against ``num_segments``.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import stablelse.dask as sd
    >>> x = da.from_array(np.array([1000.0, 1000.0, 0.0, -1.0, 2.0]), chunks=2)
    >>> sd.segment_logsumexp(x, da.from_array([0, 0, 2, 2, 2], chunks=2), 4).compute()
    array([1000.69314718,          -inf,    2.16984602,          -inf])
    """
    xm, ax, ids, count, srt = _segment_layout(x, segment_ids, num_segments, offsets, axis, sorted)
    rdtype = result_dtype(xm.dtype)
    res = _segment_reduction(xm, ids, count, srt, split_every, "lse", rdtype)
    return da.moveaxis(res, 0, ax)


def _segment_softmax_block(
    xb: AnyArray, ib: AnyArray, st: AnyArray, *, log: bool, rdtype: np.dtype[Any]
) -> AnyArray:
    """softmax / log_softmax of a block of rows from the merged states of all segments."""
    if xb.size == 0:
        return np.empty(xb.shape, dtype=rdtype)
    x2 = _segment_block(xb)
    states = np.asarray(st).reshape(st.shape[0], -1)
    out = np.empty_like(x2)
    _core.segment_softmax_from_states(
        x2,
        out,
        np.ascontiguousarray(ib, dtype=np.int64),
        np.ascontiguousarray(states["max"]),
        np.ascontiguousarray(states["excess"]),
        log,
    )
    return out.reshape(xb.shape).astype(rdtype, copy=False)


def _segment_softmax_like(
    x: Any,
    segment_ids: Any,
    num_segments: Any,
    offsets: Any,
    axis: int,
    sorted: bool,
    split_every: SplitEvery,
    log: bool,
) -> da.Array:
    xm, ax, ids, count, srt = _segment_layout(x, segment_ids, num_segments, offsets, axis, sorted)
    rdtype = result_dtype(xm.dtype)
    st = _segment_reduction(xm, ids, count, srt, split_every, "state", STATE_DTYPE)
    others = "".join(chr(ord("a") + i) for i in range(xm.ndim - 1))
    out = da.blockwise(
        _segment_softmax_block,
        "r" + others,
        xm,
        "r" + others,
        ids,
        "r",
        st,
        "s" + others,
        concatenate=True,
        dtype=rdtype,
        meta=np.empty((0,) * xm.ndim, dtype=rdtype),
        log=log,
        rdtype=rdtype,
        name="stablelse-segment-" + ("log_softmax" if log else "softmax"),
    )
    return da.moveaxis(out, 0, ax)


def segment_softmax(
    x: Any,
    segment_ids: Any = None,
    num_segments: Any = None,
    *,
    offsets: Any = None,
    axis: int = 0,
    sorted: bool = False,
    split_every: SplitEvery = None,
) -> da.Array:
    """Lazy :func:`stablelse.segment_softmax` of a Dask array.

    Parameters
    ----------
    x, segment_ids, num_segments, offsets, axis, sorted, split_every
        As :func:`segment_logsumexp`.

    Returns
    -------
    s : dask.array.Array
        Same shape and chunks as `x`.

    Notes
    -----
    Two steps: the merged states of every segment (as :func:`segment_logsumexp`), then a
    blockwise write of every element from its segment's state by the kernels' write (the
    NumPy path's unsorted-ids write), so `x` is read twice (persist it first if it is
    expensive to produce). Special values as :func:`stablelse.segment_softmax`.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import stablelse.dask as sd
    >>> x = da.from_array(np.array([1.0, 1.0, 5.0, 2.0, 3.0]), chunks=2)
    >>> sd.segment_softmax(x, offsets=[0, 2, 3, 5]).compute()
    array([0.5       , 0.5       , 1.        , 0.26894142, 0.73105858])
    """
    return _segment_softmax_like(
        x, segment_ids, num_segments, offsets, axis, sorted, split_every, False
    )


def segment_log_softmax(
    x: Any,
    segment_ids: Any = None,
    num_segments: Any = None,
    *,
    offsets: Any = None,
    axis: int = 0,
    sorted: bool = False,
    split_every: SplitEvery = None,
) -> da.Array:
    """Lazy :func:`stablelse.segment_log_softmax` of a Dask array.

    Parameters
    ----------
    x, segment_ids, num_segments, offsets, axis, sorted, split_every
        As :func:`segment_logsumexp`.

    Returns
    -------
    s : dask.array.Array
        Same shape and chunks as `x`.

    Notes
    -----
    As :func:`segment_softmax`, writing ``(x - max) - log1p(excess)``.
    """
    return _segment_softmax_like(
        x, segment_ids, num_segments, offsets, axis, sorted, split_every, True
    )


def _segment_count_block(
    ib: AnyArray, *, count: int, block_info: Optional[dict[Any, Any]] = None
) -> AnyArray:
    """How many rows of a block each segment holds, ``(1, count)``; an id outside
    ``[0, count)`` raises IndexError naming its position in the whole `segment_ids`."""
    ids = np.asarray(ib, dtype=np.int64)
    bad = (ids < 0) | (ids >= count)
    if bad.any():
        k = int(np.argmax(bad))
        start = int(block_info[0]["array-location"][0][0]) if block_info else 0
        raise IndexError(
            f"segment_ids[{start + k}] = {int(ids[k])} is outside [0, {count}) "
            f"(num_segments = {count})"
        )
    return np.bincount(ids, minlength=count)[None, :count]


def _target_hits(
    ib: AnyArray, before: AnyArray, tgt: AnyArray, ignore_index: int
) -> tuple[AnyArray, AnyArray]:
    """A block's ids and which of its rows are their segment's target. A row's rank within
    its segment is the rows of that segment in earlier blocks (`before`) plus those before it
    in this block, in array order."""
    ids = np.asarray(ib, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sid = ids[order]
    rank = np.empty(ids.size, dtype=np.int64)
    rank[order] = np.arange(sid.size) - np.searchsorted(sid, sid, side="left")
    rank += np.asarray(before).reshape(-1)[ids]
    t = tgt[ids]
    return ids, (rank == t) & (t != ignore_index)


def _segment_target_block(
    xb: AnyArray, ib: AnyArray, before: AnyArray, *, tgt: AnyArray, ignore_index: int
) -> AnyArray:
    """``(1, count)``: the target score of every segment whose target row lies in this block
    (0 elsewhere)."""
    out = np.zeros((1, tgt.size), dtype=np.float64)
    ids, hit = _target_hits(ib, before, tgt, ignore_index)
    out[0, ids[hit]] = np.asarray(xb, dtype=np.float64)[hit]
    return out


def _segment_grad_block(
    xb: AnyArray,
    ib: AnyArray,
    before: AnyArray,
    st: AnyArray,
    *,
    tgt: AnyArray,
    ignore_index: int,
    scale: float,
    rdtype: np.dtype[Any],
) -> AnyArray:
    """A block's gradient ``scale * (softmax - onehot)`` from the merged states, in float64
    and rounded once; 0 in ignored segments, NaN in counted ones holding ``+inf``."""
    ids, hit = _target_hits(ib, before, tgt, ignore_index)
    m, ex = st["max"][ids], st["excess"][ids]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(np.asarray(xb, dtype=np.float64) - m) / (1.0 + ex)
        g = np.where(m == np.inf, np.nan, (p - hit) * scale)
    return np.where(tgt[ids] != ignore_index, g, 0.0).astype(rdtype)


def _per_block(
    func: Any, blocks: list[tuple[Any, ...]], shapes: list[tuple[int, ...]], dtype: Any, **kw: Any
) -> da.Array:
    """``func(*block, **kw)`` for each tuple of delayed blocks, concatenated along axis 0 as a
    Dask array (each result of its shape in `shapes`)."""
    return da.concatenate(
        [
            da.from_delayed(delayed(func, pure=True)(*blk, **kw), shape=shape, dtype=dtype,
                            meta=np.empty((0,) * len(shape), dtype=dtype))
            for blk, shape in zip(blocks, shapes)
        ],
        axis=0,
    )


def _first(a: Any, _after: Any) -> Any:
    """`a`, once `_after` has been computed (an ordering edge in the graph)."""
    return a


def _segment_loss_block(
    st: AnyArray,
    xt: AnyArray,
    lengths: AnyArray,
    *,
    tgt: AnyArray,
    ignore_index: int,
    reduction: str,
    rdtype: np.dtype[Any],
) -> AnyArray:
    """Every segment's loss ``(max - x_t) + log1p(excess)`` from its merged state, reduced;
    a target outside its segment raises IndexError as the NumPy path does."""
    counted = tgt != ignore_index
    bad = counted & ((tgt < 0) | (tgt >= lengths))
    if bad.any():
        s = int(np.argmax(bad))
        raise IndexError(
            f"target[{s}] = {int(tgt[s])} is outside [0, {int(lengths[s])}) "
            f"(segment {s} has {int(lengths[s])} elements)"
        )
    # Ignored and empty segments (excess -1) are masked out of the result.
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = np.where(counted, (st["max"] - xt) + np.log1p(st["excess"]), 0.0)
    if reduction == "none":
        return loss.astype(rdtype)
    total = math.fsum(loss[counted]) if counted.any() else 0.0
    if reduction == "mean":
        n = int(counted.sum())
        total = total / n if n else np.nan
    return np.asarray(total, dtype=rdtype)


def segment_cross_entropy(
    x: Any,
    segment_ids: Any = None,
    target: Any = None,
    *,
    offsets: Any = None,
    num_segments: Any = None,
    sorted: bool = False,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    return_grad: bool = False,
    split_every: SplitEvery = None,
) -> Union[da.Array, tuple[da.Array, da.Array]]:
    """Lazy :func:`stablelse.segment_cross_entropy` of Dask scores.

    Parameters
    ----------
    x : dask.array.Array or array_like
        1-D scores, chunked in any way: a segment may span any number of chunks.
    segment_ids, offsets, sorted, split_every
        As :func:`segment_logsumexp` (ids rechunked to `x`'s chunks).
    target : array_like of int
        One index per segment, counted within the segment in array order, as
        :func:`stablelse.segment_cross_entropy`: a NumPy array known at call time.
    num_segments : int, optional
        Defaults to ``len(target)`` (and with `offsets` to ``len(offsets) - 1``).
    ignore_index, reduction
        As :func:`stablelse.segment_cross_entropy`.
    return_grad : bool, optional
        Also return the gradient of the returned loss (of its sum for "none") with respect to
        `x`: ``softmax - onehot`` per counted segment, scaled by ``1 / count`` for "mean"; 0
        on ignored segments.

    Returns
    -------
    loss : dask.array.Array
        0-d for "mean" and "sum", ``(num_segments,)`` for "none" (0 for ignored segments),
        in the scores' result dtype.
    grad : dask.array.Array
        Only with ``return_grad=True``: `x`'s shape and chunks, in the result dtype.

    Raises
    ------
    TypeError, ValueError
        At call time, as :func:`stablelse.segment_cross_entropy` (no `target`, a bad
        `reduction`, `target` of the wrong length, `x` not 1-D).
    IndexError
        At compute time, an id outside ``[0, num_segments)`` (naming its position in the
        whole `segment_ids`), or a target outside its segment (naming the segment).

    Notes
    -----
    Three lazy steps: the merged ``(max, excess)`` state of every segment (as
    :func:`segment_logsumexp`); every row's rank within its segment, from per-chunk counts of
    every segment and their running sums over the chunks, which picks out each segment's
    target score; then ``(max - x_t) + log1p(excess)`` per segment (exact for a confident
    segment where ``lse - x_t`` would cancel). A segment split across chunks gives the NumPy
    path's loss up to the rounding of the merged state (a few ULP); "sum" and "mean" add the
    losses with ``math.fsum``. The gradient is written per chunk from the merged states in
    float64 and rounded once (the NumPy path's up to that rounding). Each chunk produces
    ``num_segments`` states and counts: chunk in pieces large against ``num_segments``.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> import stablelse.dask as sd
    >>> scores = da.from_array(np.array([2.0, 0.5, -1.0, 0.3, 1.2]), chunks=2)
    >>> sd.segment_cross_entropy(scores, target=[0, 1], offsets=[0, 3, 5],
    ...                          reduction="none").compute()
    array([0.2413113 , 0.34115387])
    """
    from ._segments import _index_array  # noqa: PLC0415

    if target is None:
        raise TypeError("segment_cross_entropy() missing the target argument")
    reduction = _check_reduction(reduction)
    tgt = _index_array(target, "target")
    if num_segments is None and segment_ids is not None:
        num_segments = tgt.size
    xm, _, ids, count, srt = _segment_layout(x, segment_ids, num_segments, offsets, 0, sorted)
    if xm.ndim != 1:
        raise ValueError(f"x must be 1-D scores, got shape {xm.shape}")
    if tgt.size != count:
        raise ValueError(f"target has {tgt.size} elements but there are {count} segments")
    rdtype = result_dtype(xm.dtype)
    states = _segment_reduction(xm, ids, count, srt, split_every, "state", STATE_DTYPE)
    blocks = len(xm.chunks[0])
    counts = da.map_blocks(
        _segment_count_block, ids, count=count, new_axis=1,
        chunks=((1,) * blocks, (count,)), dtype=np.int64,
        meta=np.empty((0, 0), dtype=np.int64),
    )
    before = da.cumsum(counts, axis=0) - counts
    targets = delayed(tgt, pure=True)  # in the graph once, not once per block
    # Block b of the scores meets row b of `before` (their chunks differ, so no blockwise).
    parts = list(zip(xm.to_delayed().ravel(), ids.to_delayed().ravel(),
                     before.to_delayed().ravel()))
    found = _per_block(_segment_target_block, parts, [(1, count)] * blocks, np.float64,
                       tgt=targets, ignore_index=int(ignore_index))
    xt = found.sum(axis=0, split_every=split_every)
    lengths = counts.sum(axis=0, split_every=split_every)
    kw = {"tgt": tgt, "ignore_index": int(ignore_index), "reduction": reduction,
          "rdtype": rdtype}
    if reduction == "none":
        loss = da.map_blocks(_segment_loss_block, states, xt, lengths, dtype=rdtype,
                             meta=np.empty((0,), dtype=rdtype), **kw)
    else:
        loss = da.map_blocks(_segment_loss_block, states, xt, lengths, drop_axis=0,
                             dtype=rdtype, meta=np.empty((), dtype=rdtype), **kw)
    if not return_grad:
        return loss
    counted = int((tgt != ignore_index).sum())
    scale = 1.0 / counted if reduction == "mean" and counted else 1.0
    # The loss is computed first: it validates the targets the gradient reads.
    merged = delayed(_first, pure=True)(states.to_delayed().ravel()[0], loss)
    grad = _per_block(_segment_grad_block, [(*p, merged) for p in parts],
                      [(rows,) for rows in xm.chunks[0]], rdtype, tgt=targets,
                      ignore_index=int(ignore_index), scale=scale, rdtype=rdtype)
    return loss, grad
