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
