"""Time cross_entropy on short rows against torch's ``F.cross_entropy``, in the same run.

    python scripts/bench_losses_torch.py [--cols 4 10 32 100] [--dtype float32] [--repeat 9]
                                         [--threads 2] [--grad]

Each case has 2^22 logits (rows = 2^22 / cols) and int64 targets; stablelse and torch (under
``inference_mode``; with ``--grad``, ``.backward()`` against stablelse's ``return_grad`` into a
reused ``grad_out``) are called in turns, ``--pause`` seconds apart, and each keeps its best
time. Needs torch; only the
ratio (torch time / stablelse time) means anything on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    import torch
    import torch.nn.functional as F

    import stablelse as sl

    ap = argparse.ArgumentParser()
    ap.add_argument("--cols", type=int, nargs="+", default=[4, 10, 32, 100])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grad", action="store_true")
    ap.add_argument("--cpu", action="store_true",
                    help="time CPU seconds of the process (time.process_time) rather than wall "
                         "time: a call's share of a busy machine stops counting, but any thread's "
                         "spinning does count (use with --threads 1)")
    ap.add_argument("--pause", type=float, default=0.05,
                    help="seconds between calls, so that neither library's idle worker "
                         "threads (OpenMP spins after a parallel region) run into the other's")
    args = ap.parse_args()
    sl.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu else time.perf_counter
    print(f"stablelse {sl.__file__} simd={sl.info().get('simd')} torch {torch.__version__} "
          f"threads={args.threads} dtype={args.dtype} grad={args.grad} cpu={args.cpu}")
    print(f"{'shape':>12} {'stablelse ms':>13} {'torch ms':>9} {'torch/stablelse':>16}")
    rng = np.random.default_rng(0)
    for cols in args.cols:
        rows = (1 << 22) // cols
        x = (rng.standard_normal((rows, cols)) * 3).astype(args.dtype)
        t = rng.integers(0, cols, size=rows)
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        g = np.empty_like(x)
        if args.grad:
            def ours(x=x, t=t, g=g):
                sl.cross_entropy(x, t, return_grad=True, grad_out=g)

            def theirs(xt=xt, tt=tt):
                xg = xt.detach().requires_grad_()
                F.cross_entropy(xg, tt).backward()
        else:
            def ours(x=x, t=t, g=g):
                sl.cross_entropy(x, t)

            def theirs(xt=xt, tt=tt):
                with torch.inference_mode():
                    F.cross_entropy(xt, tt)
        best = {"ours": float("inf"), "torch": float("inf")}
        ours()
        theirs()
        for _ in range(args.repeat):
            for name, fn in (("ours", ours), ("torch", theirs)):
                time.sleep(args.pause)
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
        print(f"{rows:>7}x{cols:<4} {best['ours'] * 1e3:13.2f} {best['torch'] * 1e3:9.2f} "
              f"{best['torch'] / best['ours']:15.2f}x")


if __name__ == "__main__":
    main()
