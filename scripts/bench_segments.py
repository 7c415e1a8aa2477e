"""Time segment_logsumexp / segment_softmax against NumPy, torch and JAX compositions, one run.

    python scripts/bench_segments.py [--log2n 24] [--max-len 64] [--repeat 5] [--threads 2]
                                     [--peer-python /path/to/python]

Data: 2**log2n float32 values in random segments of length 1..max-len (about 2**19 segments
for the defaults). "sorted" hands the segments as sorted ids (NumPy: ``np.maximum.reduceat``
and ``np.add.reduceat`` at the segment starts; stablelse: ``sorted=True``; CSR offsets are
timed too); "unsorted" shuffles the values and their ids (NumPy: ``np.maximum.at`` and
``np.add.at``; JAX: ``segment_max`` + gather + ``segment_sum`` under jit; torch:
``scatter_reduce("amax")`` + gather + ``index_add_``, and ``torch.segment_reduce`` for sorted
segments). Each peer computes in float32 as a user would write it. torch is timed in this
process when importable, else by the interpreter given as ``--peer-python`` (one with torch),
run from here on the same data with the same threads, between the other timings. The read
bandwidth of the machine (stablelse's native probe, same threads) is measured in the same run:
effective GB/s = bytes the op must read (values + ids, + the output written for softmax) /
best time. Only ratios from one run count.
where= is timed by scripts/bench_where.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def numpy_sorted(x, starts, ids, softmax):
    m = np.maximum.reduceat(x, starts)
    e = np.exp(x - m[ids])
    s = np.add.reduceat(e, starts)
    if softmax:
        return e / s[ids]
    return m + np.log(s)


def numpy_unsorted(x, ids, count, softmax):
    m = np.full(count, -np.inf, dtype=x.dtype)
    np.maximum.at(m, ids, x)
    e = np.exp(x - m[ids])
    s = np.zeros(count, dtype=x.dtype)
    np.add.at(s, ids, e)
    if softmax:
        return e / s[ids]
    return m + np.log(s)


def torch_fns():
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None

    def scatter(x, ids, count, softmax):
        m = torch.full((count,), -torch.inf, dtype=x.dtype).scatter_reduce(
            0, ids, x, "amax", include_self=True
        )
        e = torch.exp(x - m[ids])
        s = torch.zeros(count, dtype=x.dtype).index_add_(0, ids, e)
        return e / s[ids] if softmax else m + torch.log(s)

    def segment(x, ids, offsets, softmax):
        m = torch.segment_reduce(x, "max", offsets=offsets)
        e = torch.exp(x - m[ids])
        s = torch.segment_reduce(e, "sum", offsets=offsets)
        return e / s[ids] if softmax else m + torch.log(s)

    return torch, scatter, segment


def torch_rows(data, repeat, threads):
    """[(case, op, impl, seconds)] of the torch compositions on `data` (the bench's arrays)."""
    fns = torch_fns()
    if fns is None:
        return []
    torch, scatter, segment = fns
    torch.set_num_threads(threads)
    count = int(data["count"])
    offsets = torch.from_numpy(data["offsets"])
    out = []
    for case, xk, ik in (("sorted", "x", "ids"), ("unsorted", "xu", "idsu")):
        xx, ii = torch.from_numpy(data[xk]), torch.from_numpy(data[ik])
        for op, softmax in (("logsumexp", False), ("softmax", True)):
            t = best(functools.partial(scatter, xx, ii, count, softmax), repeat)
            out.append((case, op, "torch scatter", t))
            if case == "sorted":
                t = best(functools.partial(segment, xx, ii, offsets, softmax), repeat)
                out.append((case, op, "torch segment_reduce", t))
    return out


def torch_worker(path, repeat, threads):
    with np.load(path) as data:
        rows = torch_rows(dict(data), repeat, threads)
    json.dump(rows, sys.stdout)


def run_jax(f, x, ids):
    return f(x, ids).block_until_ready()


def jax_fns(count, sorted_ids):
    try:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
    except ImportError:
        return None

    def lse(x, ids):
        m = jax.ops.segment_max(x, ids, count, indices_are_sorted=sorted_ids)
        s = jax.ops.segment_sum(jnp.exp(x - m[ids]), ids, count, indices_are_sorted=sorted_ids)
        return m + jnp.log(s)

    def softmax(x, ids):
        m = jax.ops.segment_max(x, ids, count, indices_are_sorted=sorted_ids)
        e = jnp.exp(x - m[ids])
        s = jax.ops.segment_sum(e, ids, count, indices_are_sorted=sorted_ids)
        return e / s[ids]

    return jax.jit(lse), jax.jit(softmax), jax


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument(
        "--peer-python", help="an interpreter with torch, used when torch is not importable here"
    )
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args.torch_worker, args.repeat, args.threads or 1)
        return

    import stablelse  # noqa: PLC0415
    from stablelse import _core  # noqa: PLC0415

    if args.threads:
        stablelse.set_num_threads(args.threads)
    threads = stablelse.get_num_threads()
    rng = np.random.default_rng(0)
    n = 1 << args.log2n
    lengths = rng.integers(1, args.max_len + 1, n // ((args.max_len + 1) // 2) + 16)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets < n]
    offsets = np.append(offsets, n).astype(np.int64)
    count = offsets.size - 1
    x = rng.standard_normal(n).astype(np.float32) * 4
    ids = np.repeat(np.arange(count, dtype=np.int64), np.diff(offsets))
    perm = rng.permutation(n)
    xu, idsu = x[perm], ids[perm]
    starts = offsets[:-1]

    read_gbs = _core.read_bandwidth(256 << 20, 5)
    in_bytes = n * (4 + 8)
    rows = []

    def add(case, op, peer, seconds, nbytes):
        rows.append(
            {
                "case": case,
                "op": op,
                "impl": peer,
                "ms": seconds * 1e3,
                "GB/s": nbytes / seconds / 1e9,
            }
        )

    jf = {} if args.no_jax else {"sorted": jax_fns(count, True), "unsorted": jax_fns(count, False)}
    for case, xx, ii in (("sorted", x, ids), ("unsorted", xu, idsu)):
        for op, softmax in (("logsumexp", False), ("softmax", True)):
            nbytes = in_bytes + (4 * n if softmax else 4 * count)
            ours = stablelse.segment_softmax if softmax else stablelse.segment_logsumexp
            kw = {"num_segments": count, "sorted": case == "sorted"}
            add(
                case,
                op,
                "stablelse",
                best(functools.partial(ours, xx, ii, **kw), args.repeat),
                nbytes,
            )
            if case == "sorted":
                add(
                    case,
                    op,
                    "stablelse offsets=",
                    best(functools.partial(ours, xx, offsets=offsets), args.repeat),
                    nbytes,
                )
                add(
                    case,
                    op,
                    "numpy reduceat",
                    best(functools.partial(numpy_sorted, xx, starts, ii, softmax), args.repeat),
                    nbytes,
                )
            else:
                add(
                    case,
                    op,
                    "numpy ufunc.at",
                    best(functools.partial(numpy_unsorted, xx, ii, count, softmax), args.repeat),
                    nbytes,
                )
            fns = jf.get(case)
            if fns:
                lse_j, sm_j, jax = fns
                xj, ij = jax.device_put(xx), jax.device_put(ii.astype(np.int32))
                f = sm_j if softmax else lse_j
                add(
                    case,
                    op,
                    "jax jit",
                    best(functools.partial(run_jax, f, xj, ij), args.repeat),
                    nbytes,
                )

    data = {"x": x, "ids": ids, "xu": xu, "idsu": idsu, "offsets": offsets, "count": count}
    if torch_fns() is not None:
        trows = torch_rows(data, args.repeat, threads)
    elif args.peer_python:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "data.npz")
            np.savez(path, **data)
            cmd = [args.peer_python, __file__, "--torch-worker", path]
            cmd += ["--repeat", str(args.repeat), "--threads", str(threads)]
            trows = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
    else:
        trows = []
    for case, op, impl, seconds in trows:
        softmax = op == "softmax"
        add(case, op, impl, seconds, in_bytes + (4 * n if softmax else 4 * count))


    print(
        f"stablelse {stablelse.__version__}, simd {_core.simd_level()}, threads {threads}; "
        f"n = 2^{args.log2n} float32 in {count} segments of 1..{args.max_len}; "
        f"read bandwidth {read_gbs:.1f} GB/s (native probe, 256 MiB)"
    )
    print(f"{'case':9} {'op':10} {'impl':22} {'ms':>9} {'GB/s':>7} {'x vs best peer':>15}")
    for case in ("sorted", "unsorted"):
        for op in ("logsumexp", "softmax"):
            group = [r for r in rows if r["case"] == case and r["op"] == op]
            peers = [r["ms"] for r in group if not r["impl"].startswith("stablelse")]
            for r in group:
                ratio = min(peers) / r["ms"] if peers else float("nan")
                print(
                    f"{case:9} {op:10} {r['impl']:22} {r['ms']:9.2f} {r['GB/s']:7.2f} {ratio:15.2f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"read_GBps": read_gbs, "threads": threads, "segments": count, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
