"""``python -m stablelse bench --cuda``: GB/s of the CUDA path against torch on the same tensors.

Effective bandwidth = bytes the op must move (read the input once, write the output once) /
median time, next to the device's measured copy bandwidth (a device-to-device copy, bytes read
plus bytes written) measured in the same run. Columns: ``kernel`` (stablelse's launcher called
with raw pointers: the kernels alone), ``api`` (the public ``stablelse.cuda`` call, Python
dispatch and output allocation included), ``torch`` (eager) and ``compile`` (torch.compile).
Also runnable as ``python -m stablelse.bench.cuda``.
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


class _Kernels:
    """The native launchers called with raw pointers: kernel time without Python dispatch."""

    def __init__(self, core: Any, dname: str, place: Any, xa: Any, y: Any, cols: int):
        self.core, self.dname, self.place, self.xa, self.y, self.cols = (
            core, dname, place, xa, y, cols)

    def rows(self, op: str) -> Callable[[], Any]:
        yarg = (self.y.data_ptr(), self.cols)
        return lambda: self.core._cuda_rows(op, self.dname, self.place, self.xa, yarg)

    def lse(self, out: Any) -> Callable[[], Any]:
        yarg = (out.data_ptr(), 1)
        return lambda: self.core._cuda_rows("logsumexp", self.dname, self.place, self.xa, yarg)

    def xent(self, t: Any, loss: Any, grad: bool) -> Callable[[], Any]:
        g = (self.y.data_ptr(), self.cols) if grad else None
        outs = (loss.data_ptr(), g)
        tg = (t.data_ptr(), "int64")
        return lambda: self.core._cuda_cross_entropy(
            self.dname, self.place, self.xa, tg, outs, (-100, 0.0, 0.0, "mean"))


def copy_bandwidth(torch: Any, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    b = torch.empty_like(a)
    t = _timer(torch, lambda a=a, b=b: b.copy_(a), reps)
    return 2 * nbytes / t / 1e9


def _cases(quick: bool) -> list[int]:
    if quick:
        return [4096, 32768, 131072, 262144]
    return [1024, 4096, 16384, 32768, 65536, 131072, 262144]


def run_cuda_bench(args: Any = None) -> list[dict[str, Any]]:
    """Runs the CUDA bench and prints a table; returns the rows (also written as JSON to
    ``args.json`` when set). Options read from `args`: ``quick`` (fewer shapes), ``compile``
    (also time torch.compile'd versions), ``total_mb`` (input size per case, default 512),
    ``reps``, ``dtypes`` (e.g. "float32,bfloat16"), ``cols`` (e.g. "4096,32768"), ``json``."""
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
    hdr = (f"{'op':<14}{'dtype':<10}{'shape':>14}{'kernel':>8}{'api':>7}{'torch':>7}"
           f"{'compile':>8}{'kernel %copy':>13}")
    print(hdr)
    print("-" * len(hdr))
    for dname in dtypes:
        dt = tdt[dname]
        es = torch.tensor([], dtype=dt).element_size()
        cols_arg = getattr(args, "cols", None)
        cases_cols = [int(c) for c in str(cols_arg).split(",")] if cols_arg else _cases(quick)
        for cols in cases_cols:
            rows = max(1, total // (es * cols))
            x = torch.randn((rows, cols), device="cuda", dtype=torch.float32).mul_(3).to(dt)
            t = torch.randint(0, cols, (rows,), device="cuda")
            y = torch.empty_like(x)
            nx = x.numel() * es
            lse_out = torch.empty(rows, device="cuda", dtype=dt)
            loss_out = torch.empty((), device="cuda", dtype=dt)
            place = (torch.cuda.current_device(),
                     int(torch.cuda.current_stream().cuda_stream))
            xa = (x.data_ptr(), rows, cols, cols)
            k = _Kernels(scuda._core, dname, place, xa, y, cols)
            lse_args = (lse_out,)

            def ce_grad_torch(x=x, t=t):
                xr = x.detach().requires_grad_(True)
                F.cross_entropy(xr, t).backward()
                return xr.grad

            cases = [
                ("softmax", 2 * nx, k.rows("softmax"),
                 lambda x=x, y=y: scuda.softmax(x, axis=-1, out=y),
                 lambda x=x: torch.softmax(x, -1), "softmax"),
                ("log_softmax", 2 * nx, k.rows("log_softmax"),
                 lambda x=x: scuda.log_softmax(x, axis=-1),
                 lambda x=x: torch.log_softmax(x, -1), None),
                ("logsumexp", nx, k.lse(*lse_args), lambda x=x: scuda.logsumexp(x, axis=-1),
                 lambda x=x: torch.logsumexp(x, -1), "logsumexp"),
                ("cross_entropy", nx, k.xent(t, loss_out, False),
                 lambda x=x, t=t: scuda.cross_entropy(x, t),
                 lambda x=x, t=t: F.cross_entropy(x, t), "cross_entropy"),
                ("xent+grad", 2 * nx, k.xent(t, loss_out, True),
                 lambda x=x, t=t: scuda.cross_entropy(x, t, return_grad=True),
                 ce_grad_torch, None),
            ]
            for name, nbytes, kernel, ours, theirs, cname in cases:
                t_kern = _timer(torch, kernel, reps)
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
                g = nbytes / t_kern / 1e9
                row = {
                    "op": name, "dtype": dname, "rows": rows, "cols": cols,
                    "kernel_gbs": g, "stablelse_gbs": nbytes / t_ours / 1e9,
                    "torch_gbs": nbytes / t_theirs / 1e9,
                    "compile_gbs": nbytes / t_comp / 1e9 if t_comp else None,
                    "copy_gbs": bw, "pct_copy": 100 * g / bw, "device": dev,
                }
                rows_out.append(row)
                comp = f"{row['compile_gbs']:8.0f}" if t_comp else f"{'-':>8}"
                print(f"{name:<14}{dname:<10}{f'{rows}x{cols}':>14}{g:8.0f}"
                      f"{row['stablelse_gbs']:7.0f}{row['torch_gbs']:7.0f}{comp}"
                      f"{row['pct_copy']:12.0f}%", flush=True)
            del x, t, y
            torch.cuda.empty_cache()
    path = getattr(args, "json", None)
    if path:
        with open(path, "w") as f:
            json.dump(rows_out, f, indent=1)
    return rows_out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stablelse.bench.cuda", description=__doc__)
    p.add_argument("--quick", action="store_true", help="three row lengths only")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--total-mb", type=int, default=512, help="input size per case (MiB)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--cols", help="comma-separated row lengths (default: the standard set)")
    p.add_argument("--json", help="write the rows as JSON here")
    run_cuda_bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
