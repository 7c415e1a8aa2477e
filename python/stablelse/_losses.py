"""cross_entropy, nll_loss and the softmax / log_softmax backward products, with the semantics of
``torch.nn.functional`` on NumPy arrays.

Every call is mapped onto the kernels' ``(outer, classes, inner)`` view of the logits: the class
axis in the middle, ``inner == 1`` when it is the last axis (the NumPy / optax layout) and
``inner = d1 * ... * dk`` for torch's ``(N, C, d1, ..., dk)`` layout with ``axis=1``. Index
targets are passed as C-contiguous int64 in the logits' shape without the class axis, so the
kernel's lane order is the targets' C order. Everything is validated before any output exists.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np

from . import _core
from ._api import (
    _as_real_array,
    _check_out,
    _gpu_module,
    _is_gpu_array,
    _is_half,
    _kernel_view,
)
from ._axes import normalize_axis
from ._spec import (
    Reduction,
    check_where,
    core_error,
    first_out_of_range,
    is_full_mask,
    loss_options,
    target_kind,
    weight_array,
)

__all__ = ["cross_entropy", "log_softmax_backward", "nll_loss", "softmax_backward"]

_INT64_MAX = np.iinfo(np.int64).max


def _view3(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as ``(outer, classes, inner)``, zero copy when the kernels can read it.

    The one place this module asks the layout planner for a kernel view.
    """
    shape = x.shape
    x3 = x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))
    if x.flags.c_contiguous and x.flags.aligned:
        return x3  # a dense view: the kernels' own layout
    return _kernel_view(x3)


def _mask3(where: Any, x: np.ndarray, axis: int, name: str) -> np.ndarray:
    """``where`` as a bool ``(outer, classes, inner)`` view of `x`'s shape for the kernels.

    Broadcast axes keep stride 0 (a ``(1, C)`` or ``(N, 1)`` mask is never expanded); only a
    mask whose axes cannot be merged into three without a copy (or one with negative strides)
    is copied, as a dense bool array.
    """
    check_where(where, x.shape, name)
    m = where if is_full_mask(where, x.shape) else np.broadcast_to(np.asarray(where), x.shape)
    shape = x.shape
    m3 = m.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))
    return m3 if all(s >= 0 for s in m3.strides) else np.ascontiguousarray(m3)


def _index_targets(t: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    """Integer class targets as C-contiguous int64 of the batch shape."""
    if t.dtype.kind == "u" and t.dtype.itemsize == 8 and t.size and int(t.max()) > _INT64_MAX:
        # Values that do not fit int64 cannot reach the kernels; find the first bad one here.
        err = first_out_of_range(t, n_classes, ignore_index)
        if err is not None:
            raise err
    t = t.astype(np.int64, order="C", copy=False)  # keeps 0-d (ascontiguousarray would not)
    return t if t.flags.aligned else t.copy()  # the binding reads aligned buffers only


def _logits(
    logits: Any, axis: Any, name: str, half: bool = False
) -> tuple[np.ndarray, np.dtype, int]:
    x, rdtype = _as_real_array(logits, name, half=half)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis), got a scalar")
    return x, rdtype, normalize_axis(axis, x.ndim)


def _targets(
    target: Any, x: np.ndarray, ax: int, ignore_index: int, allow_probs: bool
) -> tuple[np.ndarray, bool]:
    """``(kernel target, is_probability)`` after torch's checks."""
    try:
        t = np.asarray(target)
    except ValueError as exc:
        raise ValueError(f"target is not a rectangular array: {exc}") from None
    kind = target_kind(t.shape, t.dtype, x.shape, ax, allow_probs, ignore_index)
    if kind == "index":
        return _index_targets(t, x.shape[ax], ignore_index), False
    return _view3(np.ascontiguousarray(t, dtype=_compute_dtype(x)), ax), True


def _compute_dtype(x: np.ndarray) -> np.dtype:
    """The dtype the kernels compute `x` in (float16 / bfloat16 in float32): the weights'."""
    return np.dtype(np.float32) if _is_half(x.dtype) else x.dtype


def _finish_loss(
    loss: Any, rdtype: np.dtype, batch_shape: tuple[int, ...]
) -> Union[np.ndarray, np.floating]:
    if isinstance(loss, np.ndarray):
        res = loss.reshape(batch_shape)
        if res.dtype != rdtype:
            res = res.astype(rdtype)
        return res[()] if res.ndim == 0 else res
    return rdtype.type(loss)


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
    grad_out: Optional[np.ndarray] = None,
    where: Any = None,
) -> Any:
    """Cross-entropy between logits and class targets, computed stably from raw logits.

    ``torch.nn.functional.cross_entropy`` on NumPy arrays: ``log_softmax`` followed by the
    negative log-likelihood, fused so that ``logsumexp`` is never formed from overflowing
    exponentials. With ``return_grad=True`` the gradient with respect to `logits` is computed
    in the same pass over the logits.

    Parameters
    ----------
    logits : array_like
        Unnormalised scores. ``(C,)`` (unbatched), ``(N, C)`` or any shape with the classes
        along `axis`. float32 and float64 are computed natively; integers and bools are
        promoted to float64. float16 and bfloat16 (``ml_dtypes.bfloat16``) are computed in
        float32 and the loss, the per-element losses and the gradient returned in the logits'
        dtype, as torch does: each equals the float32 result on the widened logits, rounded
        once more. They are widened a block of rows (or, the class axis not last, of columns)
        at a time: no float32 copy of the logits; class weights and probability targets are
        then used in float32.
    target : array_like
        Either class indices, of any integer dtype, with the shape of `logits` without `axis`
        (a scalar for unbatched logits), or class probabilities, floating, with the shape of
        `logits` (soft labels). Which one is decided by the shape, as torch does.
    axis : int, optional
        The class axis. Default -1 (the NumPy / optax layout); ``axis=1`` gives torch's
        ``(N, C, d1, ..., dk)`` layout.
    weight : array_like, optional
        A weight per class, shape ``(C,)``.
    ignore_index : int, optional
        Index targets equal to this contribute no loss and no gradient and are not counted by
        ``"mean"``. Default -100. Must be negative with probability targets (torch).
    reduction : {"mean", "sum", "none"}, optional
        ``"mean"`` (default): for index targets ``sum(w[t] * loss) / sum(w[t])`` over the
        non-ignored targets (NaN when all are ignored); for probability targets the mean over
        the batch elements. ``"sum"``: the sum. ``"none"``: one loss per batch element, of
        the shape of `logits` without `axis` (0 for ignored targets).
    label_smoothing : float, optional
        In ``[0, 1]``. As torch: for index targets the loss is
        ``(1 - ls) * nll + ls / C * sum_j(-w[j] * log_softmax(x)[j])``, ignored targets
        excluded and, under ``"mean"``, the smoothing term divided by the same ``sum(w[t])``;
        probability targets become ``target * (1 - ls) + ls / C``.
    z_loss : float, optional
        Coefficient of PaLM's auxiliary loss ``z_loss * logsumexp(x)**2``, added for each
        non-ignored batch element, not class-weighted; averaged over the non-ignored elements
        (a count, not weights) under ``"mean"``. stablelse extension; default 0.
    return_grad : bool, optional
        Also return the gradient of the returned loss (of its sum for ``"none"``) with respect
        to `logits`. stablelse extension.
    grad_out : ndarray, optional
        Preallocated writeable array of the shape and dtype of the gradient to write it into
        (needs ``return_grad=True``; it is the returned ``grad``). It must not overlap the
        inputs. Reusing it across calls avoids the page faults of a fresh logits-sized array,
        which on some machines cost as much as the kernel. stablelse extension.
    where : array_like of bool, optional
        Which classes take part, broadcastable to the shape of `logits` (a ``(C,)`` or
        ``(1, C)`` mask for every row, a per-row ``(N, 1)`` flag, or a full mask). The rule:
        the result equals calling the loss on each row with its masked classes deleted (see
        Notes). Default None: every class. optax's extension; torch has none.

    Returns
    -------
    loss : ndarray or scalar
        A NumPy scalar of the result dtype for ``"mean"`` / ``"sum"``; for ``"none"`` an array
        of the shape of `logits` without `axis` (a scalar for unbatched logits).
    grad : ndarray
        Only with ``return_grad=True``: ``d loss / d logits``, same shape and dtype as `logits`
        (C-contiguous).

    Raises
    ------
    IndexError
        A class index outside ``[0, C)`` that is not `ignore_index`; the message names the
        first one, e.g. ``target[3] = 7 is outside [0, 5)``. Also a class index that `where`
        masks in a row that keeps some class (``target[3] = 2 is a class that where= masks in
        that row``): with the masked classes deleted it indexes no class, so it is the same
        error as an index out of range.
    ValueError
        Shape mismatches, a bad `reduction`, a `weight` of the wrong shape, `label_smoothing`
        outside ``[0, 1]``, a negative or non-finite `z_loss`, an `ignore_index` outside int64,
        `grad_out` without ``return_grad=True``, a `where` that does not broadcast to
        `logits`, and a probability target with nonzero mass on a class that `where` masks in
        a row that keeps some class (that mass would have no class to go to; the message names
        the row and the class).
    TypeError
        Non-numeric or complex inputs, float class indices, integer probabilities, a `where`
        that is not boolean; as torch, a str or bool for `label_smoothing` or `z_loss`, a
        non-integer `ignore_index`, a non-str `reduction` (and here a non-bool
        `return_grad`).

    Notes
    -----
    The loss of a batch element is ``logsumexp(x) - x[t]``, with ``logsumexp`` computed as
    ``m + log1p(sum(exp(x - m)) - 1)`` (``m = max(x)``), in float64 for every input dtype and
    rounded once; reductions sum per-element losses in float64 in a fixed order, so results do
    not depend on the thread count. The gradient is
    ``softmax(x) * c - (one_hot(t) and smoothing terms)``; its target entry ``p_t - 1`` is
    computed without cancellation, so it keeps full relative accuracy when ``p_t`` is near 1.

    Deviations from torch: ``axis`` defaults to -1 (torch's class dimension is 1); `z_loss`,
    `return_grad` and integer logits are extensions; a batch element whose logits contain
    ``+inf`` gets the IEEE result ``inf - x[t]`` (``+inf`` unless the target logit is ``+inf``)
    where torch's ``log_softmax`` gives NaN, and a NaN gradient; float32 results are usually
    more accurate than torch's (float64 accumulation), so they may differ in the last bits.

    ``where=``: the loss equals calling ``cross_entropy`` on each row with its masked classes
    deleted. So a masked class takes no part in ``logsumexp`` (a masked NaN or ``inf`` is
    never read); `label_smoothing` spreads ``ls / C_kept`` over the row's kept classes (and
    its weighted form uses the kept classes' weights); `z_loss` uses the kept ``logsumexp``;
    the gradient is 0 at masked positions; `ignore_index` works as without a mask. A row that
    keeps no class has no problem left: it contributes 0 loss and 0 gradient and is left out
    of ``"mean"``'s denominator (its ``w[t]`` and its count), like an ignored target, whatever
    its target holds (padding rows need no special target). A row that keeps some class but
    whose index target is masked is an ``IndexError``; probability targets with nonzero mass
    on a masked class are a ``ValueError`` (both name the row, and are raised before anything
    is written). The mask is read by the kernels beside the logits, never as a masked copy; a
    broadcast mask keeps its zero strides.

    Against optax 0.2 (``softmax_cross_entropy_with_integer_labels(..., where=)`` and
    ``softmax_cross_entropy(..., where=)``, which return per-row losses): the same losses and
    gradients for rows that keep a class, and 0 for a fully masked row (but a ``.mean()`` of
    optax's rows counts it); for an index target on a masked class optax returns
    ``logsumexp(kept) - x[t]`` where stablelse raises; probability mass on a masked class is
    silently dropped by optax. optax has no label smoothing inside the loss:
    ``optax.smooth_labels`` spreads ``ls / C`` over all C classes and the mass on masked
    classes is then dropped, where stablelse spreads ``ls / C_kept`` over the kept ones. torch
    has no ``where=``; the nearest is ``logits.masked_fill(~where, -inf)``, which gives NaN for
    a fully masked row, ``inf`` for a target on a masked class, ``inf`` whenever
    `label_smoothing` > 0 and a class is masked (its smoothing term reads ``-inf``), and NaN
    for probability targets (``0 * -inf`` at the masked classes).

    Examples
    --------
    The overflow batch of ``python -m stablelse demo``, where ``-log(softmax(x)[t])`` computed
    naively is ``inf``:

    >>> import numpy as np
    >>> from stablelse import cross_entropy
    >>> x = np.array([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]])
    >>> loss, grad = cross_entropy(x, [0, 2, 1], return_grad=True)
    >>> round(float(loss), 4)
    667.2749
    >>> bool(np.isfinite(grad).all())
    True
    """
    if type(logits) is not np.ndarray and _is_gpu_array(logits):
        return _gpu_module().cross_entropy(
            logits,
            target,
            axis=axis,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            return_grad=return_grad,
            grad_out=grad_out,
            where=where,
        )
    opts = loss_options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        return_grad=return_grad,
        grad_out=grad_out,
    )
    if (
        type(logits) is np.ndarray
        and type(target) is np.ndarray
        and weight is None
        and grad_out is None
        and (where is None or is_full_mask(where, logits.shape))
        and logits.ndim
        and logits.dtype.kind == "f"  # other dtypes are refused before axis is read
    ):
        # The common call (aligned C-contiguous float32/float64 logits, aligned int64 class
        # indices of the batch shape, a C-contiguous mask of the logits' shape or none) in one
        # native call, where every conversion below is the identity; NotImplemented sends
        # anything else down the general path.
        try:
            res = _core.cross_entropy_common(
                logits, target, normalize_axis(axis, logits.ndim), *opts, where
            )
        except (IndexError, ValueError) as exc:
            raise core_error(exc, target.shape) from None
        if res is not NotImplemented:
            return res
    x, rdtype, ax = _logits(logits, axis, "logits", half=True)
    ii = opts.ignore_index
    t3, probs = _targets(target, x, ax, ii, allow_probs=True)
    w = weight_array(weight, x.shape[ax], _compute_dtype(x))
    x3 = _view3(x, ax)
    if probs:
        x3 = np.ascontiguousarray(x3)  # the kernel reads both with one layout
    m3 = None if where is None else _mask3(where, x, ax, "logits")
    g_direct = None
    if grad_out is not None:
        _check_out(grad_out, x.shape, rdtype, "grad_out")
        for name, arr in (("logits", x3), ("target", t3), ("weight", w), ("where", m3)):
            if arr is not None and np.shares_memory(grad_out, arr):
                raise ValueError(f"grad_out overlaps {name}")
        if grad_out.dtype == x.dtype and grad_out.flags.c_contiguous:
            g_direct = grad_out.reshape(x3.shape)
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    try:
        raw, g3 = _core.cross_entropy(
            x3, t3, w, ii, opts.reduction, opts.label_smoothing, opts.z_loss,
            opts.return_grad, "auto", g_direct, m3,
        )
    except (IndexError, ValueError) as exc:
        raise core_error(exc, batch_shape) from None
    loss = _finish_loss(raw, rdtype, batch_shape)
    if g3 is None:
        return loss
    if grad_out is not None:
        if g_direct is None:
            np.copyto(grad_out, g3.reshape(x.shape), casting="unsafe")
        return loss, grad_out
    grad = g3.reshape(x.shape)
    if grad.dtype != rdtype:
        grad = grad.astype(rdtype)
    return loss, grad


def nll_loss(
    log_probs: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    where: Any = None,
) -> Any:
    """Negative log-likelihood of class indices under log-probabilities.

    ``torch.nn.functional.nll_loss`` on NumPy arrays: the loss of a batch element is
    ``-weight[t] * log_probs[t]``. ``nll_loss(log_softmax(x, axis), t)`` equals
    ``cross_entropy(x, t)``; prefer the latter, which never forms ``log_softmax`` in memory.

    Parameters
    ----------
    log_probs : array_like
        Log-probabilities (e.g. from :func:`stablelse.log_softmax`), classes along `axis`.
        Same dtype rules as :func:`cross_entropy`; float16 and bfloat16 are read in place,
        any layout (only the target entries are read), never copied.
    target : array_like of int
        Class indices, any integer dtype, of the shape of `log_probs` without `axis`.
    axis : int, optional
        The class axis; default -1 (torch's is 1).
    weight : array_like, optional
        A weight per class, shape ``(C,)``.
    ignore_index : int, optional
        Targets equal to this are skipped. Default -100.
    reduction : {"mean", "sum", "none"}, optional
        As :func:`cross_entropy` with index targets: ``"mean"`` is
        ``sum(w[t] * loss) / sum(w[t])`` over non-ignored targets (NaN if none).
    where : array_like of bool, optional
        Which classes exist, broadcastable to `log_probs`; as :func:`cross_entropy`: a row
        that keeps no class contributes 0 and is not counted by ``"mean"``, and a target on a
        masked class of any other row is an ``IndexError``. The log-probabilities are taken as
        given (not renormalised over the kept classes: pass ``log_softmax(x, where=...)``).

    Returns
    -------
    loss : ndarray or scalar
        A scalar for ``"mean"`` / ``"sum"``, else an array of the targets' shape.

    Raises
    ------
    IndexError
        A target outside ``[0, C)`` that is not `ignore_index` (the first is named), or on a
        class that `where` masks in a row that keeps some class.
    ValueError, TypeError
        As :func:`cross_entropy`; float targets are a ``TypeError``.

    Notes
    -----
    Deviations from torch: `axis` defaults to -1; the sum is taken in float64 and rounded once.
    Only the target entries of `log_probs` are read.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import log_softmax, nll_loss
    >>> lp = log_softmax(np.array([[1.0, 2.0, 3.0]]), axis=-1)
    >>> round(float(nll_loss(lp, [2])), 6)
    0.407606
    """
    opts = loss_options(ignore_index=ignore_index, reduction=reduction)
    # float16 / bfloat16 log-probabilities are read in place: only the target entries.
    x, rdtype, ax = _logits(log_probs, axis, "log_probs", half=True)
    t, _ = _targets(target, x, ax, opts.ignore_index, allow_probs=False)
    w = weight_array(weight, x.shape[ax], _compute_dtype(x))
    m3 = None if where is None else _mask3(where, x, ax, "log_probs")
    batch_shape = x.shape[:ax] + x.shape[ax + 1 :]
    try:
        loss = _core.nll_loss(_view3(x, ax), t, w, opts.ignore_index, opts.reduction, m3)
    except IndexError as exc:
        raise core_error(exc, batch_shape) from None
    return _finish_loss(loss, rdtype, batch_shape)


def _backward(y: Any, dy: Any, axis: int, log: bool) -> Any:
    yv, ry = _as_real_array(y, "y")
    dv, rd = _as_real_array(dy, "dy")
    if yv.shape != dv.shape:
        raise ValueError(f"dy has shape {dv.shape}, expected y's shape {yv.shape}")
    common = np.result_type(yv.dtype, dv.dtype)
    rdtype = np.result_type(ry, rd)
    scalar = yv.ndim == 0
    if scalar:
        yv, dv = yv.reshape(1), dv.reshape(1)
    ax = normalize_axis(axis, yv.ndim)
    y3 = np.ascontiguousarray(_view3(yv, ax), dtype=common)
    d3 = np.ascontiguousarray(_view3(dv, ax), dtype=common)
    res = _core.softmax_backward(y3, d3, log).reshape(yv.shape)
    if res.dtype != rdtype:
        res = res.astype(rdtype)
    return res.reshape(())[()] if scalar else res


def softmax_backward(y: Any, dy: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of softmax: the gradient with respect to its input.

    For ``y = softmax(x, axis)`` and an upstream gradient ``dy = dL/dy``, returns
    ``dL/dx = y * (dy - sum(y * dy, axis))``, what ``torch.autograd`` computes for
    ``torch.softmax``.

    Parameters
    ----------
    y : array_like
        The softmax output (not the logits).
    dy : array_like
        The gradient of the loss with respect to `y`, same shape as `y`.
    axis : int, optional
        The axis softmax was taken over; default -1.

    Returns
    -------
    dx : ndarray
        Same shape as `y`; dtype the common float dtype of `y` and `dy` (float16 computed in
        float32).

    Notes
    -----
    The sum is taken in float64 and each result rounded once. The gradient of
    ``logsumexp(x)`` is ``softmax(x)``: ``softmax_backward`` is the second-order building
    block, and ``log_softmax_backward`` the one for log-probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import softmax, softmax_backward
    >>> y = softmax(np.array([0.0, 0.0]))
    >>> softmax_backward(y, np.array([1.0, 0.0]))
    array([ 0.25, -0.25])
    """
    return _backward(y, dy, axis, log=False)


def log_softmax_backward(y: Any, dy: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of log_softmax: the gradient with respect to its input.

    For ``y = log_softmax(x, axis)`` and ``dy = dL/dy``, returns
    ``dL/dx = dy - exp(y) * sum(dy, axis)``, what ``torch.autograd`` computes for
    ``torch.log_softmax``.

    Parameters
    ----------
    y : array_like
        The log_softmax output (not the logits).
    dy : array_like
        The gradient of the loss with respect to `y`, same shape as `y`.
    axis : int, optional
        The axis log_softmax was taken over; default -1.

    Returns
    -------
    dx : ndarray
        Same shape as `y`, dtype as :func:`softmax_backward`.

    Notes
    -----
    With ``dy = -one_hot(t)`` this is the cross-entropy gradient ``softmax(x) - one_hot(t)``;
    :func:`cross_entropy` with ``return_grad=True`` computes that directly from the logits,
    in one pass and with better accuracy at ``p_t`` close to 1.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import log_softmax, log_softmax_backward
    >>> y = log_softmax(np.array([0.0, 0.0]))
    >>> log_softmax_backward(y, np.array([-1.0, 0.0]))
    array([-0.5,  0.5])
    """
    return _backward(y, dy, axis, log=True)
