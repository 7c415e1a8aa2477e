"""Benchmark: logsumexp of a large float32 Dask array on a local cluster (not a test).

Run ``python -m stablelse.bench.dask`` (defaults: 4 GiB float32 in 64 MiB chunks, a
``LocalCluster`` of 2 worker processes with 1 thread each on loopback). The array is generated
chunk by chunk on the workers and never materialised whole: each block is a per-process cached
standard-normal block plus a per-block offset (one fused add, so the generator costs about one
write per element, far less than a random-number generator would).

Printed figures (effective GB/s = the array's bytes / best wall time):

* ``generate only``: the same graph reduced by a trivial per-block function (``block[:1]``),
  i.e. generation + scheduling, the floor for anything on this array;
* ``stablelse.dask.logsumexp``: end to end, with the Rust kernels per block and the
  ``(max, excess)`` merge as the combine step;
* ``... cached block``: the same, every block being the worker's one cached block (no
  generation: the reduction and Dask's overhead alone);
* ``dask.array naive stable lse``: ``m + log(sum(exp(x - m)))`` with Dask's own ops, for
  comparison (it generates the array twice, since ``m`` is needed first);
* ``stablelse.logsumexp``: one call on an in-memory NumPy array (default 1 GiB; ``--inmem-gib``),
  with the kernels' default thread count and with 1 thread.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Callable

import dask.array as da
import distributed
import numpy as np

import stablelse
import stablelse.dask as sd

_BASE: dict[int, Any] = {}


def _gen_block(block_id: Any = None, *, n: int, fresh: bool = True) -> Any:
    """Block ``block_id`` of the synthetic array: a cached N(0, 1) block plus a small offset
    (``fresh``), or the cached block itself, read-only (isolates the reduction's cost)."""
    base = _BASE.get(n)
    if base is None:
        base = np.random.default_rng(12345).standard_normal(n, dtype=np.float32)
        base.flags.writeable = False
        _BASE[n] = base
    if not fresh:
        return base
    k = block_id[0] if block_id is not None else 0
    return base + np.float32((k % 97) * 1e-3)


def _first(block: Any) -> Any:
    return block[:1].copy()


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - platform dependent
        return "n/a"


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stablelse.bench.dask", description=__doc__)
    p.add_argument("--gib", type=float, default=4.0, help="array size in GiB (default 4)")
    p.add_argument("--chunk-mib", type=int, default=64, help="chunk size in MiB (default 64)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    p.add_argument("--inmem-gib", type=float, default=1.0, help="in-memory array, GiB")
    p.add_argument("--skip-naive", action="store_true", help="skip the naive dask.array lse")
    args = p.parse_args(argv)

    item = 4
    chunk = args.chunk_mib * (1 << 20) // item
    nchunks = max(1, int(round(args.gib * (1 << 30) / item / chunk)))
    n = chunk * nchunks
    nbytes = n * item

    def gen(fresh: bool = True) -> Any:
        return da.map_blocks(
            _gen_block,
            n=chunk,
            fresh=fresh,
            dtype=np.float32,
            chunks=((chunk,) * nchunks,),
            meta=np.empty((0,), np.float32),
        )

    rows: list[tuple[str, float, str]] = []
    print(
        f"array: {nbytes / 2**30:.2f} GiB float32, {nchunks} chunks of {args.chunk_mib} MiB; "
        f"cluster: {args.workers} worker processes x 1 thread; cpus: {os.cpu_count()}; "
        f"simd: {stablelse.info()['simd']}; load average: {_load()}"
    )
    with (
        distributed.LocalCluster(
            n_workers=args.workers,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # One kernel thread per worker process: the cluster has one core per worker.
        client.run(stablelse.set_num_threads, 1)
        client.run(lambda: _gen_block((0,), n=chunk) is not None)

        t, _ = _best(
            lambda: client.compute(
                gen().map_blocks(_first, chunks=((1,) * nchunks,)).sum(), sync=True
            ),
            args.repeat,
        )
        rows.append(("generate only (floor)", t, ""))

        t, res = _best(lambda: client.compute(sd.logsumexp(gen()), sync=True), args.repeat)
        rows.append(("stablelse.dask.logsumexp", t, f"= {float(res):.9g}"))

        t, res = _best(
            lambda: client.compute(sd.logsumexp(gen(fresh=False)), sync=True), args.repeat
        )
        rows.append(("stablelse.dask.logsumexp, cached block", t, f"= {float(res):.9g}"))

        if not args.skip_naive:

            def naive() -> Any:
                x = gen()
                m = x.max()
                return client.compute(m + da.log(da.exp(x - m).sum()), sync=True)

            t, res2 = _best(naive, args.repeat)
            rows.append(("dask.array naive stable lse", t, f"= {float(res2):.9g}"))

    # Single call on an in-memory array (same generator, so the same kind of values).
    m_n = int(args.inmem_gib * (1 << 30)) // item
    m_chunks = max(1, m_n // chunk)
    x = np.concatenate([_gen_block((k,), n=chunk) for k in range(m_chunks)])
    threads = stablelse.get_num_threads()
    t, r = _best(lambda: stablelse.logsumexp(x), args.repeat)
    in_rows = [(f"stablelse.logsumexp in memory, {threads} threads", t, f"= {float(r):.9g}")]
    stablelse.set_num_threads(1)
    t, r = _best(lambda: stablelse.logsumexp(x), args.repeat)
    in_rows.append(("stablelse.logsumexp in memory, 1 thread", t, f"= {float(r):.9g}"))
    stablelse.set_num_threads(0)

    print(f"load average after: {_load()} (figures from a shared machine move with it)")
    print(f"{'what':48s} {'bytes':>9s} {'best s':>8s} {'GB/s':>7s}")
    for name, t, note in rows:
        print(f"{name:48s} {nbytes / 2**30:7.2f}Gi {t:8.3f} {nbytes / t / 1e9:7.2f} {note}")
    for name, t, note in in_rows:
        print(f"{name:48s} {x.nbytes / 2**30:7.2f}Gi {t:8.3f} {x.nbytes / t / 1e9:7.2f} {note}")


if __name__ == "__main__":
    # Run the importable module's main, so tasks pickle `_gen_block` by reference and each
    # worker keeps its cached base block (a `__main__` function would be pickled by value).
    from stablelse.bench.dask import main as _main

    _main()
