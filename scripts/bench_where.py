"""Time where= against the unmasked op at the same size, one run.

    python scripts/bench_where.py [--log2n 24] [--rows-of 64 1000] [--keep 0.9] [--repeat 7]
                                  [--threads 2] [--dtype float32] [--jax]

Data: 2**log2n standard-normal values in rows of each length (the last axis reduced), a random
mask keeping the fraction --keep. Each masked case is timed beside the same op without a mask on
the same data, alternating the two within each repeat so the neighbours' load hits both alike;
ms is the best time. GB/s counts the bytes the op must move: the input, the mask (one byte per
element, masked cases only) and the output (softmax). ratio is the time over the unmasked op's
time in the same run (the goal is at most 1.3). With --jax, jax.jit(jax.nn.*(where=)) is timed
too (ratio over stablelse's unmasked op). With --layouts, the masks and axes that are not rows
under a mask of their own shape are timed instead, on the same number of elements: a
key-padding mask ``(B, 1, L)`` over scores ``(B, 128, L)``, one mask row ``(1, C)`` for every
row, a reduction over the first axis of ``(R, 4096)``, over the class axis of ``(N, 100, L)``
(the layout of torch's losses), a Fortran-ordered array reduced over its last axis, and C-ordered
rows of 10 and 1024 under a Fortran-ordered mask.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import stablelse
from stablelse import _core


def best_pair(f, g, repeat):
    """Best times of f and g, interleaved so that both see the same load."""
    f()
    g()
    tf, tg = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        tf.append(time.perf_counter() - t)
        t = time.perf_counter()
        g()
        tg.append(time.perf_counter() - t)
    return min(tf), min(tg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--rows-of", type=int, nargs="+", default=[64, 1000])
    ap.add_argument("--keep", type=float, default=0.9)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--jax", action="store_true")
    ap.add_argument("--layouts", action="store_true")
    args = ap.parse_args()
    if args.threads:
        stablelse.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    size = dtype.itemsize
    print(
        f"stablelse {stablelse.__version__}, simd {_core.simd_level()}, "
        f"threads {stablelse.get_num_threads()}; 2^{args.log2n} {dtype}, "
        f"{args.keep:.0%} kept, best of {args.repeat}"
    )
    if args.layouts:
        layouts(args, rng, dtype)
        return
    print(f"{'rows of':>8} {'op':22} {'impl':16} {'ms':>9} {'GB/s':>7} {'ratio':>6}")
    for n in args.rows_of:
        rows = (1 << args.log2n) // n
        x = rng.standard_normal((rows, n)).astype(dtype)
        mask = rng.random((rows, n)) < args.keep
        out = np.empty_like(x)
        cases = [
            ("logsumexp", stablelse.logsumexp, {}, 0),
            ("softmax", stablelse.softmax, {}, 1),
            ("softmax out=", stablelse.softmax, {"out": out}, 1),
            ("log_softmax out=", stablelse.log_softmax, {"out": out}, 1),
        ]
        for name, f, kw, writes in cases:

            def masked(f=f, kw=kw, x=x, mask=mask):
                return f(x, axis=1, where=mask, **kw)

            def plain(f=f, kw=kw, x=x):
                return f(x, axis=1, **kw)

            tm, tp = best_pair(masked, plain, args.repeat)
            moved = x.size * size * (1 + writes)
            for impl, t, extra in (("where=", tm, x.size), ("unmasked", tp, 0)):
                gbs = (moved + extra) / t / 1e9
                print(f"{n:8} {name:22} {impl:16} {t * 1e3:9.2f} {gbs:7.2f} {t / tp:6.2f}")
            if args.jax and not kw:
                import jax  # noqa: PLC0415

                jf = jax.jit(lambda v, m, name=name: getattr(jax.nn, name)(v, axis=1, where=m))
                xj, mj = jax.device_put(x), jax.device_put(mask)

                def run_jax(jf=jf, xj=xj, mj=mj):
                    return jf(xj, mj).block_until_ready()

                tj, tp2 = best_pair(run_jax, plain, args.repeat)
                gbs = (moved + x.size) / tj / 1e9
                print(
                    f"{n:8} {name:22} {'jax jit where=':16} {tj * 1e3:9.2f} {gbs:7.2f} "
                    f"{tj / tp2:6.2f}"
                )


def layouts(args, rng, dtype) -> None:
    """Masked over unmasked time for the mask layouts and axes of --layouts."""
    total = 1 << args.log2n

    def data(shape, mask_shape, order="C"):
        x = np.asarray(rng.standard_normal(shape).astype(dtype), order=order)
        mask = np.asarray(rng.random(mask_shape) < args.keep, order=order)
        return x, mask

    cases = []
    for length in (64, 1024):
        x, mask = data((total // (128 * length), 128, length), (total // (128 * length), 1, length))
        cases.append((f"key padding (B,1,{length})", x, mask, -1))
    x, mask = data((total // 1024, 1024), (1, 1024))
    cases.append(("one mask row (1,1024)", x, mask, -1))
    for length in (10, 1000):
        x, mask = data((total // length, length), (total // length, 1))
        cases.append((f"row flags (R,1) over (R,{length})", x, mask, -1))
    x, mask = data((total // 4096, 4096), (total // 4096, 4096))
    cases.append(("first axis of (R,4096)", x, mask, 0))
    x, mask = data((total // (100 * 2560), 100, 2560), (total // (100 * 2560), 100, 2560))
    cases.append(("class axis of (N,100,L)", x, mask, 1))
    x, mask = data((total // 1024, 1024), (total // 1024, 1024), order="F")
    cases.append(("Fortran (R,1024), last", x, mask, -1))
    for length in (10, 1024):
        x, _ = data((total // length, length), (1, 1))
        mask = np.asfortranarray(rng.random(x.shape) < args.keep)
        cases.append((f"Fortran mask, C (R,{length})", x, mask, -1))
    size = dtype.itemsize
    print(f"{'layout':30} {'op':14} {'impl':10} {'ms':>9} {'GB/s':>7} {'ratio':>6}")
    for name, x, mask, axis in cases:
        out = np.empty_like(x)
        for op, f, kw, writes in (
            ("logsumexp", stablelse.logsumexp, {}, 0),
            ("softmax out=", stablelse.softmax, {"out": out}, 1),
        ):

            def masked(f=f, kw=kw, x=x, mask=mask, axis=axis):
                return f(x, axis=axis, where=mask, **kw)

            def plain(f=f, kw=kw, x=x, axis=axis):
                return f(x, axis=axis, **kw)

            tm, tp = best_pair(masked, plain, args.repeat)
            moved = x.size * size * (1 + writes)
            for impl, t, extra in (("where=", tm, mask.size), ("unmasked", tp, 0)):
                gbs = (moved + extra) / t / 1e9
                print(f"{name:30} {op:14} {impl:10} {t * 1e3:9.2f} {gbs:7.2f} {t / tp:6.2f}")


if __name__ == "__main__":
    main()
