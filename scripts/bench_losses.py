"""Time cross_entropy on 2048x32768 float32 against the DRAM ceiling measured in the same run.

    python scripts/bench_losses.py [--rows 2048] [--cols 32768] [--repeat 7] [--threads 2]

The ceiling is a plain C loop (compiled here with the system C compiler, OpenMP, the same thread
count) over 256 MiB: a float sum for the read ceiling, a scaled copy for the read+write ceiling
(bytes counted once each way). Effective GB/s = bytes the op must move / best time: the forward
reads the logits (targets are 1/4096 of that and not counted); forward + gradient reads the
logits and writes the gradient. Issue 4's bars: forward >= 0.6 of read, with grad >= 0.5 of
read+write.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import subprocess
import tempfile
import time

import numpy as np

C_SRC = r"""
#include <stddef.h>
float read_sum(const float *a, size_t n) {
    float acc[16] = {0};
    #pragma omp parallel for reduction(+:acc[:16]) schedule(static)
    for (size_t i = 0; i < n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j];
    float s = 0; for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}
void scale_copy(const float *a, float *b, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) b[i] = a[i] * 1.0001f;
}
"""


def _ceiling_lib(threads: int):
    d = pathlib.Path(tempfile.mkdtemp(prefix="stablelse-bench-"))
    (d / "c.c").write_text(C_SRC)
    so = d / "c.so"
    subprocess.run(
        ["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(d / "c.c"),
         "-o", str(so)],
        check=True,
    )
    os.environ["OMP_NUM_THREADS"] = str(threads)
    lib = ctypes.CDLL(str(so))
    lib.read_sum.restype = ctypes.c_float
    lib.read_sum.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.scale_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import stablelse as sl

    sl.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 4
    t = rng.integers(0, args.cols, size=args.rows)
    nbytes = x.nbytes

    lib = _ceiling_lib(args.threads)
    a = np.ones(64 << 20, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    t_read = best(lambda: lib.read_sum(a.ctypes.data, a.size), args.repeat)
    t_rw = best(lambda: lib.scale_copy(a.ctypes.data, b.ctypes.data, a.size), args.repeat)
    read_gbs = a.nbytes / t_read / 1e9
    rw_gbs = 2 * a.nbytes / t_rw / 1e9

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
    print(f"ceiling  read {read_gbs:6.1f} GB/s   read+write {rw_gbs:6.1f} GB/s  (C, 256 MiB)")
    print(
        f"cross_entropy {args.rows}x{args.cols} f32 forward      {t_fwd * 1e3:8.1f} ms "
        f"{fwd_gbs:6.1f} GB/s = {fwd_gbs / read_gbs:.2f} of read ceiling (bar 0.6)"
    )
    print(
        f"cross_entropy {args.rows}x{args.cols} f32 forward+grad {t_grad * 1e3:8.1f} ms "
        f"{grad_gbs:6.1f} GB/s = {grad_gbs / rw_gbs:.2f} of read+write ceiling (bar 0.5)"
    )
    print(
        f"cross_entropy {args.rows}x{args.cols} f32 grad_out=     {t_gout * 1e3:8.1f} ms "
        f"{gout_gbs:6.1f} GB/s = {gout_gbs / rw_gbs:.2f} of read+write ceiling (bar 0.5)"
    )
    print(
        f"same run: logsumexp {t_lse * 1e3:.1f} ms ({nbytes / t_lse / 1e9:.1f} GB/s), "
        f"softmax out= {t_sm * 1e3:.1f} ms ({2 * nbytes / t_sm / 1e9:.1f} GB/s)"
    )


if __name__ == "__main__":
    main()
