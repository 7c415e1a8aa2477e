"""Time cross_entropy with where= against the unmasked call on the same data, in the same run.

    python scripts/bench_losses_where.py [--repeat 7] [--threads N] [--dtype float32]

Shapes: 2^22 x 10 (short rows) and 2^14 x 1000, float32 by default. For each, with and
without the gradient (written into a reused ``grad_out``, so page faults of a fresh array do
not count), it times the unmasked loss, a full mask (about 90% of the classes kept, 1 row in 64
fully masked), a broadcast ``(1, C)`` mask, an ``(N, 1)`` flag per row and the full mask in
Fortran order, interleaving the calls and keeping each one's best time. Only the ratios mean
anything on a shared machine: the goal is masked <= 1.3x the unmasked time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    import stablelse as sl
    from stablelse.bench.timing import available_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    sl.set_num_threads(args.threads)
    info = sl.info()
    print(f"stablelse {info.get('version')} simd={info.get('simd')} threads={args.threads} "
          f"dtype={args.dtype}")
    print(f"{'shape':>12} {'grad':>5} {'unmasked ms':>12} {'full mask':>16} {'(1, C) mask':>16} "
          f"{'(N, 1) flags':>16} {'Fortran mask':>16}")
    rng = np.random.default_rng(0)
    for rows, cols in ((1 << 22, 10), (1 << 14, 1000)):
        x = (rng.standard_normal((rows, cols), dtype=np.float32) * 4).astype(args.dtype)
        m = rng.random((rows, cols)) < 0.9
        m[:, 0] = True
        m[::64] = False
        t = np.zeros(rows, dtype=np.int64)  # class 0 is kept in every row that keeps any
        row = np.ones((1, cols), dtype=bool)
        row[0, cols // 2] = False
        flags = rng.random((rows, 1)) < 0.9  # whole rows kept or masked
        mf = np.asfortranarray(m)
        g = np.empty_like(x)
        for grad in (False, True):
            kw = {"return_grad": True, "grad_out": g} if grad else {}
            masks = {"plain": None, "full": m, "row": row, "flags": flags, "fortran": mf}
            calls = {
                name: lambda kw=kw, w=w, x=x, t=t: sl.cross_entropy(x, t, where=w, **kw)
                for name, w in masks.items()
            }
            best = dict.fromkeys(calls, float("inf"))
            for fn in calls.values():
                fn()  # warm up
            for _ in range(args.repeat):
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
            base = best["plain"]
            print(f"{rows:>7}x{cols:<4} {str(grad):>5} {base * 1e3:12.1f} "
                  f"{best['full'] * 1e3:9.1f} {best['full'] / base:5.2f}x "
                  f"{best['row'] * 1e3:9.1f} {best['row'] / base:5.2f}x "
                  f"{best['flags'] * 1e3:9.1f} {best['flags'] / base:5.2f}x "
                  f"{best['fortran'] * 1e3:9.1f} {best['fortran'] / base:5.2f}x")


if __name__ == "__main__":
    main()
