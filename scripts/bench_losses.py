"""Time cross_entropy on 2048x32768 float32 against the DRAM ceiling measured in the same run.

    python scripts/bench_losses.py [--rows 2048] [--cols 32768] [--repeat 7] [--threads N]

The ceiling is stablelse's own bandwidth probe (``stablelse._core.BandwidthProbe``, the one
``python -m stablelse bench`` and ``cargo bench --bench throughput`` use), over a footprint
several times the last-level cache, with the same thread count: a parallel sum for the read
ceiling, a copy for the read+write ceiling (bytes counted once each way). Effective GB/s =
bytes the op must move / best time: the forward reads the logits (targets are 1/4096 of that
and not counted); forward + gradient reads the logits and writes the gradient. The targets:
forward >= 0.6 of the read ceiling, with the gradient >= 0.5 of the read+write ceiling.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import stablelse as sl
    from stablelse import _core
    from stablelse.bench.timing import available_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--probe-bytes", type=int, default=None, help="probe footprint")
    args = ap.parse_args()

    sl.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 4
    t = rng.integers(0, args.cols, size=args.rows)
    nbytes = x.nbytes

    probe = _core.BandwidthProbe(args.probe_bytes)
    read_gbs = probe.read(args.repeat)
    rw_gbs = probe.read_write(args.repeat)

    t_fwd = best(lambda: sl.cross_entropy(x, t), args.repeat)
    t_grad = best(lambda: sl.cross_entropy(x, t, return_grad=True), args.repeat)
    g = np.empty_like(x)
    t_gout = best(lambda: sl.cross_entropy(x, t, return_grad=True, grad_out=g), args.repeat)
    fwd_gbs = nbytes / t_fwd / 1e9
    grad_gbs = 2 * nbytes / t_grad / 1e9
    gout_gbs = 2 * nbytes / t_gout / 1e9
    # The same run's logsumexp and softmax(out=): the row primitives the losses are built on.
    t_lse = best(lambda: sl.logsumexp(x, axis=-1), args.repeat)
    t_sm = best(lambda: sl.softmax(x, axis=-1, out=g), args.repeat)
    info = sl.info()
    print(f"stablelse {info.get('version')} simd={info.get('simd')} threads={args.threads}")
    print(
        f"ceiling  read {read_gbs:6.1f} GB/s   read+write {rw_gbs:6.1f} GB/s  "
        f"(stablelse probe, {probe.bytes >> 20} MiB)"
    )
    print(
        f"cross_entropy {args.rows}x{args.cols} f32 forward      {t_fwd * 1e3:8.1f} ms "
        f"{fwd_gbs:6.1f} GB/s = {fwd_gbs / read_gbs:.2f} of read ceiling (target 0.6)"
    )
    print(
        f"cross_entropy {args.rows}x{args.cols} f32 forward+grad {t_grad * 1e3:8.1f} ms "
        f"{grad_gbs:6.1f} GB/s = {grad_gbs / rw_gbs:.2f} of read+write ceiling (target 0.5)"
    )
    print(
        f"cross_entropy {args.rows}x{args.cols} f32 grad_out=     {t_gout * 1e3:8.1f} ms "
        f"{gout_gbs:6.1f} GB/s = {gout_gbs / rw_gbs:.2f} of read+write ceiling (target 0.5)"
    )
    print(
        f"same run: logsumexp {t_lse * 1e3:.1f} ms ({nbytes / t_lse / 1e9:.1f} GB/s), "
        f"softmax out= {t_sm * 1e3:.1f} ms ({2 * nbytes / t_sm / 1e9:.1f} GB/s)"
    )


if __name__ == "__main__":
    main()
