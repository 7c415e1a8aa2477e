"""Peak memory and time of cross_entropy on float16 logits with the class axis not last.

    python scripts/bench_losses_half.py mem grad|nograd    (one child process per figure)
    python scripts/bench_losses_half.py speed

(64, 1000, 512) float16 logits (62.5 MiB), classes along axis 1 (torch's layout), int64
targets. ``mem`` prints the growth of the process's peak RSS during one call (``grad``
writes into a preallocated ``grad_out`` that the call faults in itself); run it in a fresh
process per figure. ``speed`` times the float16 call against the same call on a float32
copy made beforehand, best of 5, in the same run.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

import stablelse as sl

SHAPE = (64, 1000, 512)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.empty(SHAPE, np.float16)
    for i in range(SHAPE[0]):  # a slab at a time, so making the data sets no RSS peak
        x[i] = rng.standard_normal(SHAPE[1:], dtype=np.float32) * 3
    t = rng.integers(0, SHAPE[1], (SHAPE[0], SHAPE[2]))
    return x, t


def main() -> None:
    x, t = data()
    if sys.argv[1] == "mem":
        grad = sys.argv[2] == "grad"
        kw = {"return_grad": True, "grad_out": np.empty_like(x)} if grad else {}
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        sl.cross_entropy(x, t, axis=1, **kw)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{sys.argv[2]}: +{(peak - base) / 2**20:.1f} MiB peak RSS in the call "
              f"(logits {x.nbytes / 2**20:.1f} MiB)")
        return
    x32 = x.astype(np.float32)

    def best(f, k: int = 5) -> float:
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    for grad in (False, True):
        h = best(lambda grad=grad: sl.cross_entropy(x, t, axis=1, return_grad=grad))
        f = best(lambda grad=grad: sl.cross_entropy(x32, t, axis=1, return_grad=grad))
        print(f"return_grad={grad}: float16 {h:.1f} ms, float32 {f:.1f} ms")


if __name__ == "__main__":
    main()
