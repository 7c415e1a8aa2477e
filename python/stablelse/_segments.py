"""logsumexp, softmax, log_softmax and cross-entropy over segments (ragged groups).

A segment is a group of positions along one axis of ``x``: the candidates of one query, the
edges into one node, the rows of one key of a table. Segments are given either by one id per
position (``segment_ids``, any order, or sorted with ``sorted=True``) or by CSR ``offsets``
(segment ``i`` is ``offsets[i]:offsets[i + 1]``). The kernels read ``x`` where it lies: no
padded copy, no Python loop over groups.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from . import _core
from ._api import _as_real_array, _check_out
from ._axes import normalize_axis
from ._spec import _reduction as _check_reduction


def _index_array(a: Any, name: str) -> np.ndarray:
    """``a`` as a 1-D contiguous int64 array (zero-copy for int64 / intp input)."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.dtype.itemsize >= 8:
        big = np.flatnonzero(arr > np.iinfo(np.int64).max)
        if big.size:
            i = int(big[0])
            raise IndexError(f"{name}[{i}] = {int(arr[i])} is too large")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _num_segments(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise TypeError(f"num_segments must be an integer, got {value!r}") from None
    if isinstance(value, (bool, np.bool_)) or n != value:
        raise TypeError(f"num_segments must be an integer, got {value!r}")
    if n < 0:
        raise ValueError(f"num_segments must be non-negative, got {n}")
    return n


def _offsets_of(
    segment_ids: Any, offsets: Any, num_segments: Any
) -> tuple[Optional[np.ndarray], int]:
    """The one-of check of ``segment_ids`` / ``offsets``; for ``offsets``, the int64 offsets
    and the segment count they describe (checked against ``num_segments`` when given), else
    ``(None, -1)``."""
    if (segment_ids is None) == (offsets is None):
        raise TypeError("give exactly one of segment_ids and offsets")
    if offsets is None:
        return None, -1
    offs = _index_array(offsets, "offsets")
    count = max(offs.size - 1, 0)
    if num_segments is not None and _num_segments(num_segments) != count:
        raise ValueError(f"num_segments = {num_segments} but offsets describes {count} segments")
    return offs, count


def _same_view(a: np.ndarray, b: Any) -> bool:
    """Whether `b` is an ndarray viewing exactly `a`'s elements in `a`'s order (``out=x``)."""
    return (
        isinstance(b, np.ndarray)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


class _Segmented:
    """One call's view: ``x`` with the segment axis first as a C-contiguous ``(rows, inner)``
    block, and the segment description handed to the kernels."""

    __slots__ = ("x", "x2", "rdtype", "axis", "moved_shape", "kwargs", "count")

    def __init__(
        self,
        x: Any,
        segment_ids: Any,
        num_segments: Any,
        offsets: Any,
        axis: Any,
        sorted: bool,
    ) -> None:
        arr, self.rdtype = _as_real_array(x, "x")
        self.x = x
        if arr.ndim == 0:
            raise ValueError("x must have at least one dimension (the segment axis)")
        self.axis = normalize_axis(axis, arr.ndim)
        # np.moveaxis costs microseconds a call: skipped where the axis is already first.
        moved = arr if self.axis == 0 else np.moveaxis(arr, self.axis, 0)
        self.moved_shape = moved.shape
        rows = moved.shape[0]
        inner = math.prod(moved.shape[1:])
        self.x2 = np.ascontiguousarray(moved).reshape(rows, inner)
        offs, count = _offsets_of(segment_ids, offsets, num_segments)
        if offs is not None:
            self.kwargs: dict[str, Any] = {"offsets": offs}
        else:
            ids = _index_array(segment_ids, "segment_ids")
            if ids.size != rows:
                raise ValueError(
                    f"segment_ids has {ids.size} elements but x has {rows} along axis {self.axis}"
                )
            if num_segments is None:
                count = int(ids.max()) + 1 if ids.size else 0
                count = max(count, 0)
            else:
                count = _num_segments(num_segments)
            self.kwargs = {
                "segment_ids": ids,
                "num_segments": count,
                "sorted": bool(sorted),
            }
        self.count = count
        if inner == 0:
            # Nothing to reduce, but the segments are still checked (ids in range, offsets).
            probe = np.zeros((rows, 1), dtype=self.x2.dtype)
            _core.segment_logsumexp(probe, np.empty((count, 1), probe.dtype), **self.kwargs)

    def user_shape(self, leading: int) -> tuple[int, ...]:
        """The caller's axis order with `leading` positions along the segment axis."""
        shape = list(self.moved_shape)
        shape[0] = leading
        return tuple(shape[1 : self.axis + 1] + [leading] + shape[self.axis + 1 :])

    def check_out(self, out: Any, leading: int, name: str) -> Optional[np.ndarray]:
        """Checks `out` (shape, dtype, writeable); returns it as the kernel's C-contiguous
        ``(leading, inner)`` block when it is one (and of the compute dtype), else None."""
        _check_out(out, self.user_shape(leading), self.rdtype, name)
        if out.dtype != self.x2.dtype:
            return None
        moved = out if self.axis == 0 else np.moveaxis(out, self.axis, 0)
        if not (moved.flags.c_contiguous and moved.flags.aligned):
            return None
        return moved.reshape(leading, self.x2.shape[1])

    def overlaps(self, out: np.ndarray) -> bool:
        """Whether `out` shares an element with the input (as given or as read)."""
        return any(
            isinstance(v, np.ndarray) and np.may_share_memory(out, v) and np.shares_memory(out, v)
            for v in (self.x, self.x2)
        )

    def restore(self, y2: np.ndarray, leading: int) -> np.ndarray:
        """``y2`` (``(leading, inner)``) back in the caller's axis order and dtype."""
        y = y2.reshape((leading,) + self.moved_shape[1:])
        if self.axis != 0:
            y = np.moveaxis(y, 0, self.axis)
        return y if y.dtype == self.rdtype else y.astype(self.rdtype)


def segment_logsumexp(
    x: Any,
    segment_ids: Any = None,
    num_segments: Any = None,
    *,
    offsets: Any = None,
    axis: Any = 0,
    sorted: bool = False,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Log of the sum of exponentials of every segment of `x` along `axis`.

    ``out[s] = log(sum(exp(x[i]) for i in segment s))``, with every other axis reduced
    separately: for 2-D `x` and ``axis=0`` (segments of rows), ``out[s, j]`` reduces column
    ``j`` of the rows of segment ``s``. Equal (to rounding) to
    ``scipy.special.logsumexp(x[segment_ids == s], axis=0)`` for every ``s``.

    Parameters
    ----------
    x : array_like
        Input values, real. Integer and bool inputs are promoted to float64 and float16 is
        computed in float32, as :func:`stablelse.logsumexp`.
    segment_ids : array_like of int, optional
        One segment id per position of `x` along `axis`, each in ``[0, num_segments)``. Any
        order, unless `sorted` is True. Exactly one of `segment_ids` and `offsets` is given.
        int64 (NumPy's ``intp``, what ``pd.factorize`` and ``np.unique(...,
        return_inverse=True)`` return) is used without a copy; other integer types are
        converted once.
    num_segments : int, optional
        The number of segments. Defaults to ``max(segment_ids) + 1`` (one more pass over the
        ids), or ``len(offsets) - 1``.
    offsets : array_like of int, optional
        CSR form: segment ``i`` is ``x[offsets[i]:offsets[i + 1]]`` along `axis`.
        ``offsets[0]`` must be 0, the offsets non-decreasing, and the last one the length of
        `x` along `axis`.
    axis : int, optional
        The axis the segments run along (default 0). Negative values count from the end.
    sorted : bool, optional
        Promise that `segment_ids` is non-decreasing (JAX's ``indices_are_sorted``). The
        segments are then contiguous runs and go through the row kernels. The promise is
        checked: a decreasing id raises ``ValueError``.
    out : ndarray, optional
        Writeable array of the result's shape and dtype, of any layout, to write the result
        into (it is returned). It must not share memory with `x`. stablelse extension.

    Returns
    -------
    out : ndarray
        `x`'s shape with the `axis` dimension replaced by `num_segments`, in `x`'s dtype
        (float64 for integer input). An empty segment gives ``-inf``.

    Raises
    ------
    IndexError
        A segment id outside ``[0, num_segments)``; the message names its position.
    ValueError
        Ids not sorted although ``sorted=True``, offsets that do not partition the axis,
        lengths that do not match, or an `out` of the wrong shape or overlapping `x`.
    TypeError
        An `out` that is not an ndarray of the result dtype.

    Notes
    -----
    Per segment the result is what :func:`stablelse.logsumexp` gives for that segment: NaN
    if any element is NaN, ``+inf`` if any is ``+inf`` (and none NaN), ``-inf`` when empty
    or all ``-inf``. Sums are accumulated in float64 for float32 input. Results are
    bit-identical for any number of threads.

    Accuracy: unsorted float32 (and float16) ids with up to 2**22 segments are scattered:
    one pass takes each segment's max, a second adds each element's ``exp(x - max)`` to its
    segment's float64 sum, in array order, with no sort. The sum then rounds differently
    from the sorted forms', so the result is not bit-identical to theirs, but within ``0.5``
    ULP of the result's type plus ``(3 n + 4) 2**-53 + 2**-34`` (absolute; ``n`` the
    segment's length; ``2**-34`` is the relative error of the float32-grade exp the row
    kernels use too) of the exact value. Other
    unsorted ids (float64, more segments, several columns) are sorted stably and reduced as
    the sorted forms reduce the stably sorted input.

    Deviations from peers: JAX has no ``segment_logsumexp`` (the composition of
    ``jax.ops.segment_max`` and ``segment_sum`` gives ``-inf`` for an empty segment like
    this one, but silently drops out-of-range ids, where this raises ``IndexError``).
    ``torch_scatter.scatter_logsumexp`` (2.1) adds ``eps=1e-12`` inside the log (a bias of
    about 1e-12 relative) and maps ``-inf`` results to 0, so an empty or all ``-inf``
    segment gives 0 there and ``-inf`` here.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import segment_logsumexp
    >>> x = np.array([1000.0, 1000.0, 0.0, -1.0, 2.0])
    >>> segment_logsumexp(x, [0, 0, 2, 2, 2], num_segments=4)
    array([1000.69314718,          -inf,    2.16984602,          -inf])
    >>> segment_logsumexp(x, offsets=[0, 2, 5])
    array([1000.69314718,    2.16984602])
    """
    seg = _Segmented(x, segment_ids, num_segments, offsets, axis, sorted)
    direct = None
    if out is not None:
        direct = seg.check_out(out, seg.count, "out")
        if seg.overlaps(out):
            raise ValueError("out overlaps the input x")
    res = np.empty((seg.count, seg.x2.shape[1]), seg.x2.dtype) if direct is None else direct
    if seg.x2.shape[1]:
        _core.segment_logsumexp(seg.x2, res, **seg.kwargs)
    if out is None:
        return seg.restore(res, seg.count)
    if direct is None:
        np.copyto(out, seg.restore(res, seg.count), casting="unsafe")
    return out


def _softmax_like(
    x: Any,
    segment_ids: Any,
    num_segments: Any,
    offsets: Any,
    axis: Any,
    sorted: bool,
    log: bool,
    out: Optional[np.ndarray],
) -> np.ndarray:
    seg = _Segmented(x, segment_ids, num_segments, offsets, axis, sorted)
    rows = seg.x2.shape[0]
    # `out=x` is written in place (by the kernel when x's block is x itself, else through the
    # fresh result); any other overlap with x is refused.
    direct = None
    if out is not None:
        direct = seg.check_out(out, rows, "out")
        if not _same_view(out, seg.x) and seg.overlaps(out):
            raise ValueError("out partially overlaps the input x; pass out=x for in place")
    res = np.empty_like(seg.x2) if direct is None else direct
    if seg.x2.size:
        _core.segment_softmax(seg.x2, res, log=log, **seg.kwargs)
    if out is None:
        return seg.restore(res, rows)
    if direct is None:
        np.copyto(out, seg.restore(res, rows), casting="unsafe")
    return out


def segment_softmax(
    x: Any,
    segment_ids: Any = None,
    num_segments: Any = None,
    *,
    offsets: Any = None,
    axis: Any = 0,
    sorted: bool = False,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Softmax of `x` within every segment along `axis`.

    ``out[i] = exp(x[i]) / sum(exp(x[k]) for k in the segment of i)``, computed stably from
    the segment's ``(max, sum)``; other axes are independent. Equal (to rounding) to
    ``scipy.special.softmax(x[segment_ids == s], axis=0)`` at the positions of every ``s``.

    Parameters
    ----------
    x, segment_ids, num_segments, offsets, axis, sorted
        As :func:`segment_logsumexp`.
    out : ndarray, optional
        Writeable array of `x`'s shape and the result dtype, of any layout, to write the
        result into (it is returned). ``out=x`` works in place (for a float32/float64 `x`
        whose segment axis is its leading C-contiguous one the kernel reads each segment
        before writing it; otherwise through a copy). Any other overlap with `x` raises
        ``ValueError``. stablelse extension.

    Returns
    -------
    out : ndarray
        Same shape as `x`, in `x`'s dtype (float64 for integer input). An empty segment has
        no positions, so nothing is written for it.

    Raises
    ------
    IndexError, ValueError
        As :func:`segment_logsumexp`.

    Notes
    -----
    Per segment, scipy's values: a segment holding NaN or ``+inf``, or all ``-inf``, is NaN
    at every position (``exp(x - max)`` with a non-finite max), as
    ``scipy.special.softmax``. Bit-identical for any number of threads. Unsorted float32
    ids take the scattered sums described in :func:`segment_logsumexp` (float32 results
    within ``0.5`` ULP plus ``2**-32`` relative of exact, not bit-identical to the sorted
    forms).

    Deviations from peers: ``torch_scatter.scatter_softmax`` and PyG's ``softmax(src,
    index)`` return NaN for an all ``-inf`` segment too, but do not check the ids (an id
    outside the output is an error from torch's indexing, or undefined on some devices);
    the JAX composition (``segment_max``, gather, ``exp``, ``segment_sum``) drops
    out-of-range ids silently. Here they raise ``IndexError`` naming the position.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import segment_softmax
    >>> segment_softmax(np.array([1.0, 1.0, 5.0, 2.0, 3.0]), [0, 0, 1, 2, 2])
    array([0.5       , 0.5       , 1.        , 0.26894142, 0.73105858])
    """
    return _softmax_like(x, segment_ids, num_segments, offsets, axis, sorted, False, out)


def segment_log_softmax(
    x: Any,
    segment_ids: Any = None,
    num_segments: Any = None,
    *,
    offsets: Any = None,
    axis: Any = 0,
    sorted: bool = False,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Log-softmax of `x` within every segment along `axis`.

    ``out[i] = x[i] - logsumexp(x[k] for k in the segment of i)``, written as
    ``(x - max) - log1p(excess)`` so the top element of a confident segment keeps its tiny
    value. Equal (to rounding) to ``scipy.special.log_softmax(x[segment_ids == s], axis=0)``.

    Parameters
    ----------
    x, segment_ids, num_segments, offsets, axis, sorted
        As :func:`segment_logsumexp`.
    out : ndarray, optional
        As for :func:`segment_softmax`; ``out=x`` works in place.

    Returns
    -------
    out : ndarray
        Same shape and dtype as `x` (float64 for integer input).

    Raises
    ------
    IndexError, ValueError
        As :func:`segment_logsumexp`.

    Notes
    -----
    Per segment, scipy's values for non-finite segments: ``x - logsumexp`` unshifted, so an
    all ``-inf`` segment is NaN, a segment with ``+inf`` is NaN at the ``+inf`` and ``-inf``
    elsewhere, a NaN makes the segment NaN. Bit-identical for any number of threads.
    Unsorted float32 ids take the scattered sums described in :func:`segment_logsumexp`.

    Deviations from peers: ``torch_scatter.scatter_log_softmax`` adds ``eps=1e-12`` to the
    sum before its log (results biased by about 1e-12); ids are checked as in
    :func:`segment_softmax`.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import segment_log_softmax
    >>> segment_log_softmax(np.array([0.0, -40.0, 3.0]), offsets=[0, 2, 3])
    array([-4.24835426e-18, -4.00000000e+01,  0.00000000e+00])
    """
    return _softmax_like(x, segment_ids, num_segments, offsets, axis, sorted, True, out)


def segment_cross_entropy(
    x: Any,
    segment_ids: Any = None,
    target: Any = None,
    *,
    offsets: Any = None,
    num_segments: Any = None,
    sorted: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_grad: bool = False,
    grad_out: Optional[np.ndarray] = None,
) -> Any:
    """Softmax cross-entropy over variable-length candidate sets (listwise ranking).

    Each segment of the 1-D scores `x` is one softmax over its candidates, and
    ``target[s]`` says which candidate is the positive one, counted *within the segment*:
    ``loss[s] = logsumexp(x[seg s]) - x[seg s][target[s]]``. This is
    :func:`stablelse.cross_entropy` on rows of different lengths, with the same target
    convention as a padded ``(num_segments, max_len)`` batch (so code moving off padding
    keeps its targets).

    Parameters
    ----------
    x : array_like
        1-D scores (logits), real.
    segment_ids : array_like of int, optional
        One segment id per score (see :func:`segment_logsumexp`). With unsorted ids,
        "within the segment" counts the segment's scores in array order.
    target : array_like of int
        One index per segment, in ``[0, len(segment))``, or `ignore_index` for a segment
        with no positive (left out of the loss and of the mean's count). To convert a global
        position ``p`` of the positive score (e.g. ``np.flatnonzero(label)``) with offsets:
        ``p - offsets[s]``.
    offsets : array_like of int, optional
        CSR form, as :func:`segment_logsumexp`.
    num_segments : int, optional
        As :func:`segment_logsumexp`; defaults to ``len(target)``.
    sorted : bool, optional
        As :func:`segment_logsumexp`.
    ignore_index : int, optional
        Target value that leaves a segment out (default -100, as torch).
    reduction : {"mean", "sum", "none"}, optional
        "mean" averages over the counted segments (NaN when none counts, as torch), "sum"
        adds them, "none" returns one loss per segment (0 for ignored ones).
    return_grad : bool, optional
        Also return the gradient of the returned loss (of its sum for "none") with respect
        to `x`, from the same pass: ``softmax - onehot`` per counted segment, scaled by
        ``1 / count`` for "mean"; 0 on ignored and empty segments.
    grad_out : ndarray, optional
        Writeable array of `x`'s shape and the result dtype to write the gradient into
        (needs ``return_grad=True``; it is the returned ``grad``). It must not overlap `x`.
        Reusing it across calls avoids the page faults of a fresh array of `x`'s size.

    Returns
    -------
    loss : scalar or ndarray
        `x`'s dtype (float64 for integer input); ``(num_segments,)`` for "none".
    grad : ndarray
        Only with ``return_grad=True``: same shape and dtype as `x`.

    Raises
    ------
    IndexError
        A segment id out of range, or a target outside its segment (an empty segment's
        target must be `ignore_index`); the message names the segment and its length.
    ValueError
        As :func:`segment_logsumexp`, a bad `reduction`, or a `grad_out` of the wrong shape,
        overlapping `x`, or without ``return_grad=True``.

    Notes
    -----
    The loss of a segment is computed as ``(max - x_t) + log1p(excess)``: exact for a
    confident segment where ``lse - x_t`` would cancel. A segment holding ``+inf`` gets the
    IEEE ``inf - x_t`` and a NaN gradient, as :func:`stablelse.cross_entropy`. No peer has
    this loss: with torch one pads to ``(num_segments, max_len)`` with ``-inf`` and calls
    ``cross_entropy`` (a copy, and the padding's memory), with optax
    ``softmax_cross_entropy_with_integer_labels(where=mask)`` on the padded batch.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import segment_cross_entropy
    >>> scores = np.array([2.0, 0.5, -1.0, 0.3, 1.2])
    >>> segment_cross_entropy(scores, target=[0, 1], offsets=[0, 3, 5], reduction="none")
    array([0.2413113 , 0.34115387])
    """
    if target is None:
        raise TypeError("segment_cross_entropy() missing the target argument")
    reduction = _check_reduction(reduction)
    tgt = _index_array(target, "target")
    if num_segments is None and segment_ids is not None:
        num_segments = tgt.size
    seg = _Segmented(x, segment_ids, num_segments, offsets, 0, sorted)
    if len(seg.moved_shape) != 1:
        raise ValueError(f"x must be 1-D scores, got shape {seg.moved_shape}")
    if tgt.size != seg.count:
        raise ValueError(f"target has {tgt.size} elements but there are {seg.count} segments")
    x1 = seg.x2.reshape(-1)
    losses = np.empty(seg.count, dtype=np.float64)
    grad = np.empty_like(x1) if return_grad else None
    direct = None
    if grad_out is not None:
        if not return_grad:
            raise ValueError("grad_out is given but return_grad is False")
        direct = seg.check_out(grad_out, x1.size, "grad_out")
        if seg.overlaps(grad_out):
            raise ValueError("grad_out overlaps x")
        if direct is not None:
            grad = direct.reshape(-1)
    total, count = _core.segment_cross_entropy(
        x1,
        tgt,
        losses,
        grad,
        ignore_index=int(ignore_index),
        mean=reduction == "mean",
        **seg.kwargs,
    )
    rtype = seg.rdtype.type
    loss: Any
    if reduction == "none":
        loss = losses.astype(seg.rdtype)
    elif reduction == "sum":
        loss = rtype(total)
    else:
        loss = rtype(total / count) if count else rtype(np.nan)
    if return_grad:
        assert grad is not None
        if grad_out is not None:
            if direct is None:
                np.copyto(grad_out, grad, casting="unsafe")
            return loss, grad_out
        return loss, grad.astype(seg.rdtype, copy=False)
    return loss
