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
from functools import partial
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

try:
    import dask.array as da
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


def _softmax_block(
    x: AnyArray, st: AnyArray, *, axes: tuple[int, ...], log: bool, rdtype: np.dtype[Any]
) -> AnyArray:
    """softmax / log_softmax of a block given the merged states of its slices over `axes`.

    The block's slices are laid out as rows (the normalised axes last, one copy) and written
    by the Rust row writer with the given states, so each element gets what the NumPy path's
    kernel writes for it.
    """
    if x.size == 0:
        return np.empty(x.shape, dtype=rdtype)
    xr, _ = _as_real_array(x, "x")
    k = len(axes)
    last = tuple(range(x.ndim - k, x.ndim))
    moved = np.moveaxis(xr, axes, last)
    rows = np.ascontiguousarray(moved).reshape(math.prod(moved.shape[: x.ndim - k]), -1)
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
    y = _core.softmax_from_states(rows, mxr, exr, log).reshape(moved.shape)
    return np.moveaxis(y, last, axes).astype(rdtype, copy=False)


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
        axes=axes,
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
        try:
            return _np_cross_entropy(
                x, tb, axis=ax, weight=w, ignore_index=ignore_index, reduction=reduction,  # type: ignore[arg-type]
                label_smoothing=label_smoothing, z_loss=zl, where=m,
            )
        except (TargetError, MaskedTargetError, MaskedProbabilityError) as exc:
            if block_info is None:
                raise
            loc = block_info[0]["array-location"]
            raise exc.shifted(tuple(lo for i, (lo, _) in enumerate(loc) if i != ax)) from None

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
) -> da.Array:
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
    return_grad, grad_out
        Not supported here: ``return_grad=True`` raises ``NotImplementedError``, and
        `grad_out` without ``return_grad=True`` the same ``ValueError`` as the NumPy path.
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
    ``+inf`` then gives NaN rather than ``inf``).

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
    if opts.return_grad:
        raise NotImplementedError("stablelse.dask.cross_entropy does not return gradients")
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
    if mode == "none":
        return da.map_blocks(
            block, xr, te, *masks, drop_axis=ax, dtype=rdtype,
            meta=np.empty((0,) * (x.ndim - 1), dtype=rdtype), token="stablelse-xent-none",
        )
    width = 2 if split else 1
    chunks = tuple((width,) if i == ax else (1,) * len(c) for i, c in enumerate(xr.chunks))
    sums = da.map_blocks(
        block, xr, te, *masks, chunks=chunks, dtype=np.float64,
        meta=np.empty((0,) * x.ndim, dtype=np.float64), token="stablelse-xent-" + mode,
    )
    others = tuple(i for i in range(x.ndim) if i != ax)
    parts = sums.sum(axis=others, split_every=split_every)
    if opts.reduction == "sum":
        return parts[0].astype(rdtype)
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
    return da.map_blocks(_mean, parts, den, rdtype=rdtype, dtype=rdtype, drop_axis=0,
                         meta=np.empty((), dtype=rdtype))
