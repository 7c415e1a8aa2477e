"""``python -m stablelse bench --cuda``: GB/s of the CUDA path against torch on the same tensors.

Effective bandwidth = bytes the op must move (read the input once, write the output once) /
median time, next to the device's measured copy bandwidth (a device-to-device copy, bytes read
plus bytes written) measured in the same run. Also runnable as ``python -m stablelse._bench_cuda``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Callable


def _timer(torch: Any, fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps CUDA-event-timed runs (queued back to back)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def copy_bandwidth(torch: Any, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    b = torch.empty_like(a)
    t = _timer(torch, lambda a=a, b=b: b.copy_(a), reps)
    return 2 * nbytes / t / 1e9


def _cases(quick: bool) -> list[int]:
    return [4096, 32768, 262144] if quick else [1024, 4096, 16384, 32768, 65536, 131072, 262144]


def run_cuda_bench(args: Any = None) -> list[dict[str, Any]]:
    """Runs the CUDA bench and prints a table; returns the rows (also written as JSON to
    ``args.json`` when set). Options read from `args`: ``quick`` (fewer shapes), ``compile``
    (also time torch.compile'd versions), ``total_mb`` (input size per case, default 512),
    ``reps``, ``dtypes`` (e.g. "float32,bfloat16"), ``json``."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812

    import stablelse.cuda as scuda  # noqa: PLC0415

    if not scuda.is_available():
        print("stablelse.cuda is not available:", scuda.info(), file=sys.stderr)
        return []
    quick = bool(getattr(args, "quick", False))
    use_compile = bool(getattr(args, "compile", False))
    total = int(getattr(args, "total_mb", 512) or 512) << 20
    reps = int(getattr(args, "reps", 20) or 20)
    dtypes = str(getattr(args, "dtypes", None) or "float32,bfloat16").split(",")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth(torch)
    print(f"device: {dev}; measured copy bandwidth {bw:.0f} GB/s (read + write)")
    info = scuda.info()
    print(f"driver {info.get('driver_version')}, NVRTC {info.get('nvrtc_version')}, torch "
          f"{torch.__version__}")

    compiled: dict[str, Any] = {}
    if use_compile:
        compiled = {
            "softmax": torch.compile(lambda x: torch.softmax(x, -1)),
            "logsumexp": torch.compile(lambda x: torch.logsumexp(x, -1)),
            "cross_entropy": torch.compile(lambda x, t: F.cross_entropy(x, t)),
        }

    rows_out: list[dict[str, Any]] = []
    hdr = (f"{'op':<20}{'dtype':<10}{'shape':>16}{'stablelse':>11}{'torch':>9}"
           f"{'compile':>9}{'% copy':>8}")
    print(hdr)
    print("-" * len(hdr))
    for dname in dtypes:
        dt = tdt[dname]
        es = torch.tensor([], dtype=dt).element_size()
        for cols in _cases(quick):
            rows = max(1, total // (es * cols))
            x = torch.randn((rows, cols), device="cuda", dtype=torch.float32).mul_(3).to(dt)
            t = torch.randint(0, cols, (rows,), device="cuda")
            y = torch.empty_like(x)
            nx = x.numel() * es

            def ce_grad_torch(x=x, t=t):
                xr = x.detach().requires_grad_(True)
                F.cross_entropy(xr, t).backward()
                return xr.grad

            cases = [
                ("softmax", 2 * nx, lambda x=x, y=y: scuda.softmax(x, axis=-1, out=y),
                 lambda x=x: torch.softmax(x, -1), "softmax"),
                ("log_softmax", 2 * nx, lambda x=x: scuda.log_softmax(x, axis=-1),
                 lambda x=x: torch.log_softmax(x, -1), None),
                ("logsumexp", nx, lambda x=x: scuda.logsumexp(x, axis=-1),
                 lambda x=x: torch.logsumexp(x, -1), "logsumexp"),
                ("cross_entropy", nx, lambda x=x, t=t: scuda.cross_entropy(x, t),
                 lambda x=x, t=t: F.cross_entropy(x, t), "cross_entropy"),
                ("xent+grad", 2 * nx,
                 lambda x=x, t=t: scuda.cross_entropy(x, t, return_grad=True),
                 ce_grad_torch, None),
            ]
            for name, nbytes, ours, theirs, cname in cases:
                t_ours = _timer(torch, ours, reps)
                t_theirs = _timer(torch, theirs, reps)
                t_comp = None
                if cname and cname in compiled:
                    fn = compiled[cname]
                    call = (lambda fn=fn, x=x, t=t: fn(x, t)) if cname == "cross_entropy" \
                        else (lambda fn=fn, x=x: fn(x))
                    try:
                        t_comp = _timer(torch, call, reps)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        print(f"torch.compile {cname} failed: {exc!r}", file=sys.stderr)
                g = nbytes / t_ours / 1e9
                row = {
                    "op": name, "dtype": dname, "rows": rows, "cols": cols,
                    "stablelse_gbs": g, "torch_gbs": nbytes / t_theirs / 1e9,
                    "compile_gbs": nbytes / t_comp / 1e9 if t_comp else None,
                    "copy_gbs": bw, "pct_copy": 100 * g / bw, "device": dev,
                }
                rows_out.append(row)
                comp = f"{row['compile_gbs']:9.0f}" if t_comp else f"{'-':>9}"
                print(f"{name:<20}{dname:<10}{f'{rows}x{cols}':>16}{g:11.0f}"
                      f"{row['torch_gbs']:9.0f}{comp}{row['pct_copy']:7.0f}%", flush=True)
            del x, t, y
            torch.cuda.empty_cache()
    path = getattr(args, "json", None)
    if path:
        with open(path, "w") as f:
            json.dump(rows_out, f, indent=1)
    return rows_out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stablelse._bench_cuda", description=__doc__)
    p.add_argument("--quick", action="store_true", help="three row lengths only")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--total-mb", type=int, default=512, help="input size per case (MiB)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", help="write the rows as JSON here")
    run_cuda_bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
