"""float64 NumPy references for every test: logsumexp, softmax, log_softmax, cross_entropy and
nll_loss, and their gradients.

One implementation of each formula, written from the definitions (scipy.special for the
first three, torch.nn.functional for the losses, plus stablelse's ``z_loss``), independent of
the kernels, in float64 whatever the input dtype. Tests compare against these; none of them
should carry a private copy.

- ``logsumexp(x, axis, b=None, keepdims=False)``: scipy's semantics (max-shift, a row of
  ``-inf`` gives ``-inf``, a ``+inf`` gives ``+inf``, NaN propagates; an empty axis gives
  ``-inf``; weights ``b`` scale the terms, and the result may then be NaN for a negative sum).
- ``softmax``, ``log_softmax``: ``exp(x - lse)`` and ``x - lse``.
- ``cross_entropy(logits, target, ...)``: torch's formulas (class indices with
  ``ignore_index``, or class probabilities), ``weight``, ``label_smoothing``, ``reduction``,
  and ``z_loss * lse**2`` per row (averaged over the rows that count, never weighted).
  ``cross_entropy_grad`` returns ``(loss, dloss/dlogits)``, and with ``error_scale=True`` also
  the size of the float64 rounding error one may expect of each (see :class:`LossTerms`).
- ``nll_loss(log_probs, target, ...)`` and ``nll_loss_grad``.
- ``softmax_backward(y, dy)`` and ``log_softmax_backward(y, dy)``: the VJPs, given the forward
  output ``y``.
- ``numeric_grad(f, x)``: central differences of ``sum(f(x))``, to check the analytic ones.
- ``ulps(got, want)`` and ``assert_ulps(got, want, ulps, cancelled)``: errors in ULPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

REDUCTIONS = ("mean", "sum", "none")


def f64(x: Any) -> np.ndarray:
    """``x`` as a float64 array (complex and object inputs are a test bug: refused)."""
    a = np.asarray(x)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"oracles work on real arrays, not {a.dtype}")
    return a.astype(np.float64)


# --------------------------------------------------------------------------- reductions


def _shift_and_log_sum(a: np.ndarray, axis: Any, b: Any = None) -> tuple[np.ndarray, ...]:
    """``(a - m, log(sum(b * exp(a - m))), m)`` with keepdims, ``m`` the max over ``axis``
    (0 where the max is not finite, as scipy): the max-shift that keeps every exp <= 1."""
    with np.errstate(all="ignore"):
        m = np.max(a, axis=axis, keepdims=True, initial=-np.inf)
        m = np.where(np.isfinite(m), m, 0.0)
        shifted = a - m
        e = np.exp(shifted)
        if b is not None:
            e = e * f64(b)
        return shifted, np.log(np.sum(e, axis=axis, keepdims=True)), m


def logsumexp(
    x: Any, axis: Any = None, b: Any = None, keepdims: bool = False
) -> np.ndarray | np.float64:
    """``log(sum(b * exp(x)))`` over ``axis`` (None: all axes; int or tuple), in float64."""
    _, logs, m = _shift_and_log_sum(f64(x), axis, b)
    out = logs + m
    if not keepdims:
        out = np.squeeze(out, axis=axis) if axis is not None else out.reshape(())
    return out[()] if out.ndim == 0 else out


def softmax(x: Any, axis: Any = -1) -> np.ndarray:
    """``exp(x - logsumexp(x))`` over ``axis``, in float64."""
    shifted, logs, _ = _shift_and_log_sum(f64(x), axis)
    with np.errstate(all="ignore"):
        return np.exp(shifted - logs)


def log_softmax(x: Any, axis: Any = -1) -> np.ndarray:
    """``x - logsumexp(x)`` over ``axis``, in float64, computed as ``(x - max) - log(sum)``
    so that the largest entry's ``-log(sum)`` does not cancel against ``max``."""
    shifted, logs, _ = _shift_and_log_sum(f64(x), axis)
    with np.errstate(all="ignore"):
        return shifted - logs


def logsumexp_grad(x: Any, axis: Any = None) -> np.ndarray:
    """d logsumexp / dx: the softmax over the same axes."""
    return softmax(x, axis=axis)


def softmax_backward(y: Any, dy: Any, axis: int = -1) -> np.ndarray:
    """dL/dx for ``y = softmax(x)``: ``y * (dy - sum(dy * y))``."""
    y, dy = f64(y), f64(dy)
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


def log_softmax_backward(y: Any, dy: Any, axis: int = -1) -> np.ndarray:
    """dL/dx for ``y = log_softmax(x)``: ``dy - exp(y) * sum(dy)``."""
    y, dy = f64(y), f64(dy)
    return dy - np.exp(y) * np.sum(dy, axis=axis, keepdims=True)


# --------------------------------------------------------------------------- losses


@dataclass
class LossTerms:
    """A loss, its gradient, and the size of the float64 rounding error of each.

    ``loss_scale`` bounds the magnitudes that cancel in the loss (``|a| * (|logp| + max|x|)``
    summed, since ``logp = x - lse`` cancels with an error of ``eps * |x|``), ``grad_scale``
    those in each gradient entry (``sum(a) * p - a`` cancels with an error of
    ``eps * sum|a| * (1 + max|x|)``); a test may allow ``k * eps * scale``.
    """

    loss: Any
    grad: np.ndarray
    loss_scale: Any
    grad_scale: np.ndarray


def _class_weights(weight: Any, n_classes: int) -> np.ndarray:
    return np.ones(n_classes) if weight is None else f64(weight)


def _loss_parts(
    logits: Any,
    target: Any,
    axis: int,
    weight: Any,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> dict[str, Any]:
    """Everything the loss and its gradient are made of, classes on the last axis.

    The per-row loss is ``-sum_c(a_c * logp_c) + z_loss * lse**2`` with ``a`` the target
    distribution times the class weights (zero on ignored rows); its gradient is
    ``sum(a) * p - a + 2 * z_loss * lse * p``.
    """
    x = np.moveaxis(f64(logits), axis, -1)
    n = x.shape[-1]
    lse = np.asarray(logsumexp(x, axis=-1))
    logp = log_softmax(x, axis=-1)
    with np.errstate(all="ignore"):
        p = np.exp(logp)
    w = _class_weights(weight, n)
    ls = float(label_smoothing)
    smooth = ls / n if n else 0.0
    t = np.asarray(target)
    if t.dtype.kind == "f":  # class probabilities
        q = np.moveaxis(f64(t), axis, -1) * (1 - ls) + smooth
        a = q * w
        valid = np.ones(x.shape[:-1], dtype=bool)
        denom = float(valid.sum())
    else:
        t = t.astype(np.int64)
        valid = t != ignore_index
        tc = np.where(valid, t, 0)
        a = np.zeros(x.shape)
        if n:
            np.put_along_axis(a, tc[..., None], (1 - ls) * w[tc][..., None], axis=-1)
        a = a + smooth * w
        a[~valid] = 0
        denom = float(w[tc][valid].sum()) if n else 0.0
    return {
        "x": x, "lse": lse, "logp": logp, "p": p, "a": a, "valid": valid, "denom": denom,
        "count": float(valid.sum()), "z": float(z_loss),
    }  # fmt: skip


def cross_entropy_grad(
    logits: Any,
    target: Any,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    error_scale: bool = False,
) -> Any:
    """torch's ``cross_entropy`` (+ ``z_loss``) and its gradient with respect to the logits,
    in float64: ``(loss, grad)``, or a :class:`LossTerms` with ``error_scale=True``.

    ``reduction="mean"`` divides the cross-entropy by the summed weights of the rows that
    count (by the number of rows for probability targets) and the z-loss by the number of
    rows that count: torch's rule, so a batch whose targets are all ignored gives NaN.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}")
    d = _loss_parts(logits, target, axis, weight, ignore_index, label_smoothing, z_loss)
    a, logp, p, lse, valid, zl = d["a"], d["logp"], d["p"], d["lse"], d["valid"], d["z"]
    with np.errstate(all="ignore"):
        per_ce = -(a * np.where(a != 0, logp, 0.0)).sum(-1)
        per_z = zl * lse**2 * valid
        g_ce = a.sum(-1)[..., None] * p - a
        g_z = (2 * zl * lse * valid)[..., None] * p
        if reduction == "none":
            loss, grad = per_ce + per_z, g_ce + g_z
        elif reduction == "sum":
            loss, grad = per_ce.sum() + per_z.sum(), g_ce + g_z
        else:
            denom, count = d["denom"], d["count"]
            loss = per_ce.sum() / denom + (per_z.sum() / count if zl else 0.0)
            grad = g_ce / denom + (g_z / count if zl else 0.0)
    grad = np.moveaxis(grad, -1, axis)
    if not error_scale:
        return loss, grad
    x = d["x"]
    xmax = np.max(np.abs(x), axis=-1, keepdims=True, initial=0.0)
    with np.errstate(all="ignore"):
        elem = (np.abs(a) * (np.abs(np.where(a != 0, logp, 0.0)) + xmax)).sum(-1)
        elem = elem + np.abs(per_z)
        scale = elem if reduction == "none" else elem.sum()
        gscale = np.abs(a).sum(-1, keepdims=True) * (1 + xmax) + np.abs(2 * zl * lse)[..., None]
        if reduction == "mean":
            scale = scale / max(d["denom"], 1e-300)
            gscale = gscale / max(min(d["denom"], d["count"]), 1e-300)
    gscale = np.moveaxis(np.broadcast_to(gscale, a.shape), -1, axis)
    return LossTerms(loss, grad, scale, gscale)


def cross_entropy(
    logits: Any,
    target: Any,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Any:
    """torch's ``cross_entropy`` (+ ``z_loss``) in float64; see :func:`cross_entropy_grad`."""
    loss, _ = cross_entropy_grad(
        logits, target, axis, weight, ignore_index, reduction, label_smoothing, z_loss
    )
    return loss


def nll_loss_grad(
    log_probs: Any,
    target: Any,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Any, np.ndarray]:
    """torch's ``nll_loss`` and its gradient with respect to ``log_probs``, in float64."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}")
    lp = np.moveaxis(f64(log_probs), axis, -1)
    w = _class_weights(weight, lp.shape[-1])
    t = np.asarray(target).astype(np.int64)
    valid = t != ignore_index
    tc = np.where(valid, t, 0)
    wt = w[tc] * valid
    per = -np.take_along_axis(lp, tc[..., None], -1)[..., 0] * wt
    grad = np.zeros(lp.shape)
    np.put_along_axis(grad, tc[..., None], -wt[..., None], axis=-1)
    if reduction == "none":
        loss: Any = per
    elif reduction == "sum":
        loss = per.sum()
    else:
        with np.errstate(all="ignore"):
            loss = per.sum() / wt.sum()
            grad = grad / wt.sum()
    return loss, np.moveaxis(grad, -1, axis)


def nll_loss(
    log_probs: Any,
    target: Any,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Any:
    """torch's ``nll_loss`` in float64; see :func:`nll_loss_grad`."""
    return nll_loss_grad(log_probs, target, axis, weight, ignore_index, reduction)[0]


# --------------------------------------------------------------------------- checks


def numeric_grad(f: Any, x: Any, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``sum(f(x))``, float64."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (np.sum(f(xp)) - np.sum(f(xm))) / (2 * h)
    return g


def ulps(got: Any, want: Any, dtype: Optional[Any] = None) -> float:
    """The largest distance from ``got`` to ``want`` in ULPs of ``dtype`` (default: ``got``'s)
    at ``want``; equal values (NaN with NaN, inf with inf) count as 0."""
    g = np.asarray(got)
    dt = np.dtype(dtype or (g.dtype if g.dtype.kind == "f" else np.float64))
    g64, w64 = f64(g), f64(want)
    same = (g64 == w64) | (np.isnan(g64) & np.isnan(w64))
    with np.errstate(all="ignore"):
        spacing = np.spacing(np.abs(w64).astype(dt)).astype(np.float64)
        err = np.where(same, 0.0, np.abs(g64 - w64) / spacing)
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else 0.0


def assert_ulps(got, want, ulps=1, cancelled=None):
    """Same shape, dtype, non-finite values; finite values within `ulps` of `want`'s dtype,
    plus 2 ULP of `cancelled` (a term of the result's size or larger that cancels in it)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin], want[~fin])
    err = np.abs(got[fin].astype(np.float64) - want[fin].astype(np.float64))
    tol = ulps * np.spacing(np.abs(want[fin])).astype(np.float64)
    if cancelled is not None:
        big = np.abs(np.broadcast_to(np.asarray(cancelled, dtype=want.dtype), want.shape)[fin])
        tol = tol + 2 * np.spacing(big).astype(np.float64)
    assert np.all(err <= tol), (err - tol).max()
