"""Typed use of the public API: checked with ``mypy --strict`` by scripts/release-check.

    python examples/typed_usage.py

Shows the calls a pipeline makes (reductions over an axis, weights with signs, preallocated and
in-place outputs, thread control) with the annotations a strictly typed caller writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

import stablelse


def normalise_scores(scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Softmax over the last axis, written into a preallocated array."""
    out = np.empty_like(scores)
    res: npt.NDArray[np.float32] = stablelse.softmax(scores, axis=-1, out=out)
    return res


def log_partition(x: npt.NDArray[np.float64], weights: npt.NDArray[np.float64]) -> float:
    """log(sum(w * exp(x))) with the sign of the sum."""
    value, sign = stablelse.logsumexp(x, b=weights, return_sign=True)
    return float(value) if float(sign) > 0 else float("nan")


def in_place_log_softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    res: npt.NDArray[np.float64] = stablelse.log_softmax(x, axis=(0, 1), out=x)
    return res


def training_step(
    logits: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> tuple[float, npt.NDArray[np.float32]]:
    """Mean cross-entropy and its gradient in one pass over the logits."""
    loss, grad = stablelse.cross_entropy(
        logits, labels, label_smoothing=0.1, ignore_index=-100, return_grad=True
    )
    g: npt.NDArray[np.float32] = grad
    return float(loss), g


def streamed_log_partition(chunks: list[npt.NDArray[np.float64]]) -> float:
    acc = stablelse.LogSumExp(axis=None)
    for chunk in chunks:
        acc.update(chunk)
    return float(acc.result())


def main() -> int:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, 10)).astype(np.float32) * 100
    probs = normalise_scores(scores)
    assert np.allclose(probs.sum(axis=-1), 1.0, atol=1e-5)

    x = np.array([1000.0, 1.0, -1000.0])
    lse: np.float64 = stablelse.logsumexp(x)
    print("logsumexp", float(lse))
    print("signed", log_partition(x, np.array([1.0, -1.0, 2.0])))
    per_row: npt.NDArray[np.float64] = stablelse.logsumexp(
        rng.standard_normal((3, 5)), axis=1, keepdims=True
    )
    assert per_row.shape == (3, 1)
    cube = rng.standard_normal((2, 3, 4))
    assert in_place_log_softmax(cube) is cube

    labels = np.array([0, 3, -100, 9])
    loss, grad = training_step(scores, labels)
    assert grad.shape == scores.shape and np.isfinite(loss)
    nll = float(stablelse.nll_loss(stablelse.log_softmax(scores, axis=-1), labels))
    assert abs(nll - float(stablelse.cross_entropy(scores, labels))) < 1e-4
    dx = stablelse.softmax_backward(probs, np.ones_like(probs))
    assert np.abs(dx).max() < 1e-5
    parts = [rng.standard_normal(100) for _ in range(3)]
    total = streamed_log_partition(parts)
    assert abs(total - float(stablelse.logsumexp(np.concatenate(parts)))) < 1e-12

    previous: int = stablelse.get_num_threads()
    stablelse.set_num_threads(1)
    stablelse.set_num_threads(0)
    assert stablelse.get_num_threads() == previous
    details: dict[str, Any] = stablelse.info()
    version: str = stablelse.__version__
    print(version, details["simd"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
