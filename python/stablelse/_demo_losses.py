"""The losses part of ``python -m stablelse demo``: a loss and its gradient on an overflowing batch.

The demo batch has a row ``[1000, 1, -1000]`` whose target is class 2. Computed naively,
softmax overflows (``exp(1000) = inf``), the target probability is ``1 / inf = 0``, the loss
``-log(0)`` is ``inf`` and backpropagation through it gives NaN gradients. stablelse computes
``logsumexp(x) - x[t]`` directly, with the gradient ``softmax(x) - one_hot(t)``, all finite.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEMO_BATCH = [[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]]
DEMO_TARGETS = [0, 2, 1]


def _naive_loss_and_grad(x: np.ndarray, t: np.ndarray) -> tuple[np.floating, np.ndarray]:
    """``mean(-log(softmax(x)[t]))`` and its gradient by the chain rule, both naive."""
    rows = np.arange(len(t))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(x)
        p = e / e.sum(axis=1, keepdims=True)
        loss = -np.log(p[rows, t]).mean()
        # dL/dp = -1 / (N p_t) at the target; then the softmax Jacobian p * (dp - <p, dp>).
        dp = np.zeros_like(p)
        dp[rows, t] = -1.0 / (len(t) * p[rows, t])
        grad = p * (dp - (p * dp).sum(axis=1, keepdims=True))
    return loss, grad


def demo_losses(print_fn: Callable[..., None] = print) -> bool:
    """Prints the naive vs stablelse cross-entropy on the demo batch; True if all is well."""
    import stablelse  # noqa: PLC0415 - imported late: this module is imported by stablelse

    x = np.array(DEMO_BATCH, dtype=np.float32)
    t = np.array(DEMO_TARGETS)
    print_fn(f"Cross-entropy on the same batch, targets {DEMO_TARGETS}:")
    naive_loss, naive_grad = _naive_loss_and_grad(x, t)
    print_fn(f"naive -log(softmax(x)[t]).mean() = {naive_loss}")
    print_fn("  row 1: softmax(x)[2] = exp(-1000) / exp(1000) = 0 / inf = 0, and -log(0) = inf")
    print_fn("naive gradient (chain rule through softmax):")
    print_fn(naive_grad)
    print_fn("  row 1 is NaN: -1/p_t = -inf times p = 0 or NaN")
    loss, grad = stablelse.cross_entropy(x, t, return_grad=True)
    per = stablelse.cross_entropy(x, t, reduction="none")
    x64 = x.astype(np.float64)
    m = x64.max(axis=1)
    lse = m + np.log(np.exp(x64 - m[:, None]).sum(axis=1))
    formula = lse - x64[np.arange(3), t]
    print_fn()
    print_fn(f"stablelse.cross_entropy(x, t) = {loss!r}")
    print_fn(f"  per row (reduction='none'): {per}")
    print_fn(f"  logsumexp(x) - x[t] per row: {formula.astype(np.float32)}")
    print_fn("stablelse gradient (return_grad=True, softmax(x) - one_hot(t), / N):")
    print_fn(grad)
    ok = bool(
        np.isinf(naive_loss)
        and np.isnan(naive_grad).any()
        and np.isfinite(loss)
        and np.isfinite(grad).all()
        and np.allclose(per, formula, rtol=1e-6)
        and np.isclose(loss, formula.mean(), rtol=1e-6)
    )
    print_fn(f"  loss and gradient are finite and match the log-sum-exp formula: {ok}")
    return ok
