"""The command line of ``python -m stablelse bench``: options, the run, the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Callable

import stablelse

from .. import _core
from .accuracy import accuracy_suite, run_accuracy
from .compute import format_compute, run_compute
from .peers import LIBRARIES, detect_libraries
from .report import format_accuracy, format_table, jsonable, plot_sweep
from .timing import Ceilings, Progress, available_cores, machine, run_sweep, run_workloads
from .timing import sweep_lengths as _sweep_lengths
from .workloads import (
    DEFAULT_WORKLOADS,
    OP_LABEL,
    OPS,
    QUICK_SCALE,
    SHORT_COLS,
    SWEEP_OPS,
    SWEEP_TOTAL,
    Workload,
    parse_workload,
    scaled,
)

QUICK_PROBE_BYTES = 8 << 20


def _ops_list(text: str) -> tuple[str, ...]:
    """Comma-separated op names (``cross_entropy`` and ``cross_entropy+grad`` allowed)."""
    by_label = {v: k for k, v in OP_LABEL.items()}
    ops = tuple(by_label.get(s.strip(), s.strip()) for s in text.split(",") if s.strip())
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise argparse.ArgumentTypeError(f"unknown op(s) {bad}; choose from {OPS}")
    return ops


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stablelse bench",
        description="Time stablelse against NumPy, scipy, torch and JAX next to this "
        "machine's DRAM bandwidth, or (--compute) one thread's ns per element with the data "
        "in the cache, or (--accuracy) compare their float32 errors.",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"threads for every library (default: the cores available, {available_cores()})",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a run of seconds")
    p.add_argument(
        "--size",
        type=float,
        default=None,
        help="scale factor on the DRAM workloads' element counts (1.0)",
    )
    p.add_argument(
        "--workload",
        action="append",
        type=parse_workload,
        metavar="OP:RxC",
        help="run this workload instead of the default set (repeatable); OP is one of "
        f"{', '.join(OPS)}; e.g. softmax:4096x1024 or logsumexp:1x2^26",
    )
    p.add_argument(
        "--only", default=None, help="comma-separated ops to keep from the workload list"
    )
    p.add_argument(
        "--short-rows",
        action="store_true",
        help=f"keep only the workloads of short rows (at most {SHORT_COLS} columns, more "
        "than one row): every op on rows of 10 and 32 classes and three on rows of 100 by default",
    )
    p.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help="comma-separated libraries to time (default: all installed)",
    )
    p.add_argument(
        "--algorithm",
        default="auto",
        choices=("auto", "two_pass", "online"),
        help="stablelse algorithm for logsumexp/softmax/log_softmax",
    )
    p.add_argument("--reps", type=int, default=None, help="timed samples per case (5)")
    p.add_argument(
        "--budget",
        type=float,
        default=2.0,
        help="seconds per case after which sampling stops (at least 3 samples)",
    )
    p.add_argument(
        "--probe-bytes",
        type=int,
        default=None,
        help="DRAM probe footprint in bytes (default: several times the last-level cache, "
        f"here {_core.dram_probe_bytes() >> 20} MiB)",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write the results as JSON to FILE (or stdout with no FILE)",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="also sweep row lengths at a fixed total size and plot GB/s per op",
    )
    p.add_argument(
        "--sweep-ops",
        type=_ops_list,
        default=SWEEP_OPS,
        help=f"--plot: the ops of the sweep, one panel each (default {','.join(SWEEP_OPS)})",
    )
    p.add_argument(
        "--accuracy", action="store_true", help="report float32 ULP errors instead of timings"
    )
    p.add_argument(
        "--compute",
        action="store_true",
        help="report one thread's ns per element with the data in the cache, per op and SIMD "
        "level, instead of timings against peers",
    )
    p.add_argument("--cuda", action="store_true", help="run the CUDA benchmark instead")
    p.add_argument("--compile", action="store_true", help="--cuda: also time torch.compile")
    p.add_argument("--total-mb", type=int, default=None, help="--cuda: input MiB per case")
    p.add_argument("--dtypes", default=None, help="--cuda: e.g. float32,bfloat16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--label", default="", help="a note stored with the results (e.g. a commit)")
    return p


def main(argv: list[str]) -> int:
    """Runs the benchmark with command-line arguments ``argv``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads is None:
        args.threads = available_cores()
    if args.threads < 1:
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    to_stdout_json = args.json == "-"
    show = (lambda *a: print(*a, file=sys.stderr)) if to_stdout_json else print

    if args.cuda:
        return _run_cuda(args, show)

    if args.reps is None:
        args.reps = 3 if args.quick else 5
    if args.quick:
        args.budget = min(args.budget, 0.5)
    scale = args.size if args.size is not None else (QUICK_SCALE if args.quick else 1.0)
    probe_bytes = args.probe_bytes or (
        QUICK_PROBE_BYTES if args.quick else _core.dram_probe_bytes()
    )

    wanted = tuple(n.strip() for n in args.libraries.split(",") if n.strip())
    unknown = [n for n in wanted if n not in LIBRARIES]
    if unknown or "stablelse" not in wanted:
        print(f"--libraries must include stablelse and name only {LIBRARIES}", file=sys.stderr)
        return 2

    saved_threads = stablelse.get_num_threads()
    limits: Any = contextlib.nullcontext()
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    try:
        with limits:
            stablelse.set_num_threads(args.threads)
            return _run(args, wanted, scale, probe_bytes, show, to_stdout_json)
    finally:
        stablelse.set_num_threads(saved_threads)


def _run_cuda(args: argparse.Namespace, show: Callable[..., None]) -> int:
    """``--cuda``: hands over to :func:`stablelse.bench.cuda.run_cuda_bench`."""
    try:
        from . import cuda
    except ImportError as exc:
        show(f"CUDA benchmark unavailable: {exc}")
        return 0
    to_stdout = args.json == "-"
    cuda_args = argparse.Namespace(**{**vars(args), "json": None if to_stdout else args.json})
    try:
        rows = cuda.run_cuda_bench(cuda_args)
    except ImportError as exc:
        show(f"CUDA benchmark unavailable: {exc}")
        return 0
    if to_stdout:
        print(json.dumps(jsonable({"cuda": rows or []}), indent=1))
    return 0


def _run(
    args: argparse.Namespace,
    wanted: tuple[str, ...],
    scale: float,
    probe_bytes: int,
    show: Callable[..., None],
    to_stdout_json: bool,
) -> int:
    libs = detect_libraries(wanted, args.threads)
    mach = machine(args.threads)
    doc: dict[str, Any] = {
        "stablelse": stablelse.__version__,
        "machine": mach,
        "libraries": {n: {"version": lib.version, "note": lib.reason} for n, lib in libs.items()},
        "units": "GB/s = (bytes the op must read + write) / best time; 1 GB = 1e9 bytes",
        "label": args.label,
    }
    llc = mach["last_level_cache_bytes"]
    show(
        f"stablelse {stablelse.__version__} ({mach['simd']}), {mach['cpu']}, "
        f"{mach['cores_available']} cores available"
        + (f", {llc >> 20} MiB last-level cache" if llc else "")
        + f", {args.threads} threads, float32"
        + (f" [{args.label}]" if args.label else "")
    )
    for n, lib in libs.items():
        if not lib.available:
            show(f"  skipping {n}: {lib.reason}")
        elif lib.reason:
            show(f"  {n}: {lib.reason}")

    if args.accuracy:
        suite = accuracy_suite(args.quick)
        n_libs = sum(lib.available for lib in libs.values())
        progress = Progress(len(suite) * n_libs, not args.no_progress)
        report = run_accuracy(libs, args.quick, progress)
        progress.close()
        doc["accuracy"] = report
        show(format_accuracy(report))
    elif args.compute:
        note = (lambda level: None) if args.no_progress else (lambda level: show(f"  {level} ..."))
        compute = run_compute(args.quick, note)
        doc["compute"] = compute
        show(format_compute(compute))
    else:
        _run_timings(args, libs, mach, doc, scale, probe_bytes, show)

    if args.json is not None:
        text = json.dumps(jsonable(doc), indent=1)
        if to_stdout_json:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            show(f"JSON written to {args.json}")
    return 0


def _run_timings(
    args: argparse.Namespace,
    libs: dict[str, Any],
    mach: dict[str, Any],
    doc: dict[str, Any],
    scale: float,
    probe_bytes: int,
    show: Callable[..., None],
) -> None:
    workloads = list(args.workload or [Workload(*w) for w in DEFAULT_WORKLOADS])
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        keep |= {k for k, v in OP_LABEL.items() if v in keep}
        workloads = [w for w in workloads if w.op in keep]
    if args.short_rows:
        workloads = [w for w in workloads if w.kind == "dram" and w.cols <= SHORT_COLS]
    workloads = [scaled(w, scale) for w in workloads]
    n_libs = sum(lib.available for lib in libs.values())
    sweep_total = max(1024, round(SWEEP_TOTAL * scale))
    sweep_ops = tuple(args.sweep_ops)
    n_sweep = len(_sweep_lengths(sweep_total)) * len(sweep_ops) * n_libs if args.plot else 0
    progress = Progress(len(workloads) * n_libs + n_sweep, not args.no_progress)
    progress.step("bandwidth probe")
    dram = Ceilings(probe_bytes)
    before = dram.measure(5)
    results = run_workloads(workloads, libs, args, dram, progress)
    sweep = run_sweep(libs, args, sweep_total, sweep_ops, progress) if args.plot else []
    after = dram.measure(5)
    progress.close()
    ceilings = {k: max(before[k], after[k]) for k in before}
    for row in results:
        if row["kind"] == "dram":
            key = "read_write" if row["ceiling"] == "read+write" else "read"
            ceilings[key] = max(ceilings[key], row["ceiling_gbps"])
    llc = mach["last_level_cache_bytes"]
    doc["ceilings"] = {
        "probe_bytes": dram.bytes,
        "last_level_cache_bytes": llc,
        "read_gbps": ceilings["read"],
        "read_write_gbps": ceilings["read_write"],
        "before": before,
        "after": after,
        "note": "native probe (stablelse._core.BandwidthProbe) over a footprint several "
        "times the last-level cache; read+write copies half the footprint into a second "
        "buffer and counts each byte once. The run's ceiling is the best of the probes "
        "before, after and between the workloads; each row's ceiling_gbps is the best probe "
        "sampled in turns with that row's timings",
    }
    doc["results"] = results
    doc["sweep"] = sweep
    in_cache = llc is not None and dram.bytes < 2 * llc
    show(
        f"DRAM ceiling ({dram.bytes >> 20} MiB, {args.threads} threads, best of the run): "
        f"read {ceilings['read']:.1f} GB/s (before {before['read']:.1f}, after "
        f"{after['read']:.1f}), read+write {ceilings['read_write']:.1f} GB/s (before "
        f"{before['read_write']:.1f}, after {after['read_write']:.1f})"
        + (" -- the probe fits in the last-level cache: a cache figure" if in_cache else "")
    )
    show(format_table(results, libs, ceilings))
    show(
        "GB/s = (bytes the op must read + write) / best time; 'of ceiling' = stablelse "
        "GB/s / the probe's best, sampled in turns with that row's timings (read+write "
        "probe for ops that write their input's size); speed-up = peer time / stablelse "
        "time; latency rows in microseconds per call; '!' = result differs"
    )
    for row in results:
        for n, e in row["libraries"].items():
            if "error" in e:
                show(f"  {row['workload']}: {n}: {e['error']}")
            if "mismatch" in e:
                show(f"  {row['workload']}: {n}: {e['mismatch']}")
    if args.plot:
        title = (
            f"stablelse {stablelse.__version__} ({mach['simd']}) on {mach['cpu']}, "
            f"{args.threads} threads, {sweep_total} float32 elements"
            + (f"\n{args.label}" if args.label else "")
        )
        why = plot_sweep(sweep, ceilings, args.plot, title, sweep_ops, results)
        show(f"plot not written: {why}" if why else f"plot written to {args.plot}")
