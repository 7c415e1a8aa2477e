"""How the bench times: best-of-N samples taken in turns across libraries, with the
bandwidth probe sampled in the same turns, and the machine it ran on."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

import stablelse

from .. import _core
from .peers import Library, loss_value, make_call
from .workloads import SWEEP_LENGTHS, Workload, inputs


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's count."""
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# Before each sample taken in turns: a pause, so that the worker threads of the library
# sampled before it stop spinning (OpenMP pools such as torch's keep the cores busy for
# several milliseconds after a call, and made the next library's 0.2 ms call 2x slower), then
# untimed calls of short ops, so that this library's own threads are awake and its data warm.
SETTLE_PAUSE_S = 0.02
SETTLE_WARM_S = 0.01


class Sampler:
    """Best-of-N timing of one zero-argument callable, one sample at a time, so that several
    libraries can be sampled in turns: on a shared machine, load that comes and goes then
    weighs on all of them alike. Calls shorter than 2 ms are repeated inside a sample. With
    ``settle``, each sample starts after :data:`SETTLE_PAUSE_S` and, for calls shorter than
    2 ms, :data:`SETTLE_WARM_S` of untimed calls."""

    def __init__(self, fn: Callable[[], Any], settle: bool = False):
        self.fn = fn
        self.settle = settle
        self.result = fn()  # warm-up: jit, page faults of outputs; kept for the sanity check
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        self.inner = 1 if first >= 2e-3 else max(1, math.ceil(2e-3 / max(first, 1e-7)))
        self.best = first if self.inner == 1 else math.inf
        self.spent = first
        self.samples = 1 if self.inner == 1 else 0

    def wants_more(self, reps: int, budget_s: float) -> bool:
        """At most ``reps`` samples; at least 3 unless a sample ran past ``budget_s``."""
        if self.samples >= reps:
            return False
        return self.samples < 3 or self.spent <= budget_s

    def sample(self) -> None:
        if self.settle:
            time.sleep(SETTLE_PAUSE_S)
            if self.inner > 1:
                end = time.perf_counter() + SETTLE_WARM_S
                while time.perf_counter() < end:
                    self.fn()
        t0 = time.perf_counter()
        for _ in range(self.inner):
            self.fn()
        dt = time.perf_counter() - t0
        self.spent += dt
        self.samples += 1
        self.best = min(self.best, dt / self.inner)


def best_time(fn: Callable[[], Any], reps: int, budget_s: float) -> tuple[float, Any]:
    """Best seconds per call of ``fn`` (see :class:`Sampler`) and its warm-up result."""
    s = Sampler(fn)
    while s.wants_more(reps, budget_s):
        s.sample()
    return s.best, s.result


class Progress:
    """tqdm if installed (and wanted), else a plain line per step on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.n = 0
        self.total = total
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="case", file=sys.stderr, leave=False)

    def step(self, desc: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(desc[:48])
        else:
            print(f"[{self.n + 1}/{self.total}] {desc}", file=sys.stderr, flush=True)

    def done(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def machine(threads: int) -> dict[str, Any]:
    """The CPU, its cores and caches, the SIMD level and the software the run used."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    info = stablelse.info()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_available": available_cores(),
        "last_level_cache_bytes": _core.last_level_cache_bytes(),
        "threads": threads,
        "simd": info.get("simd"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


class Ceilings:
    """The bandwidth probe at one footprint, its buffers allocated once for the whole run."""

    def __init__(self, probe_bytes: int):
        self.probe = _core.BandwidthProbe(probe_bytes)

    @property
    def bytes(self) -> int:
        return int(self.probe.bytes)

    def measure(self, reps: int) -> dict[str, float]:
        """Read and read+write bandwidth (GB/s), best of ``reps`` each."""
        return {"read": self.probe.read(reps), "read_write": self.probe.read_write(reps)}

    def one(self, writes: bool) -> float:
        """One sample of the ceiling for an op that writes (read+write) or only reads: one
        pass over a DRAM-sized footprint, the best of three over a small one (a pass of a
        millisecond or less is at the mercy of one interruption)."""
        reps = 1 if self.bytes >= 64 << 20 else 3
        return float(self.probe.read_write(reps) if writes else self.probe.read(reps))


def _entry(lib: str, w: Workload, sampler: Sampler) -> dict[str, Any]:
    sec = sampler.best
    return {
        "library": lib,
        "seconds": sec,
        "us_per_call": sec * 1e6,
        "gbps": w.nbytes / sec / 1e9,
        "samples": sampler.samples,
        "value": loss_value(sampler.result),
    }


def _error(lib: str, exc: BaseException | str) -> dict[str, Any]:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {"library": lib, "error": msg}


def time_libraries(
    names: list[str],
    w: Workload,
    x: np.ndarray,
    t: np.ndarray,
    args: argparse.Namespace,
    probe: Optional[Callable[[], float]] = None,
) -> tuple[dict[str, dict[str, Any]], Optional[float]]:
    """Times ``w`` with every library in ``names``, sampling them in turns (one sample each
    per round, in a rotating order, each settled first unless ``--quick``); ``probe`` (a
    bandwidth in GB/s) runs once per round too, and its best is returned as the ceiling
    measured alongside."""
    entries: dict[str, dict[str, Any]] = {}
    samplers: dict[str, Sampler] = {}
    for name in names:
        try:  # a peer that cannot run this op is reported, not fatal
            fn = make_call(name, w, x, t, args.algorithm)
            if fn is None:
                entries[name] = _error(name, "not available")
            else:
                samplers[name] = Sampler(fn, settle=not args.quick)
        except Exception as exc:
            entries[name] = _error(name, exc)
    ceiling = probe() if probe is not None else None
    order = list(samplers)
    for k in range(args.reps):
        live = [n for n in order if samplers[n].wants_more(args.reps, args.budget)]
        if not live:
            break
        shift = k % len(live)
        for name in live[shift:] + live[:shift]:
            try:
                samplers[name].sample()
            except Exception as exc:
                entries[name] = _error(name, exc)
                order.remove(name)
                del samplers[name]
        if probe is not None and ceiling is not None:
            ceiling = max(ceiling, probe())
    for name, sampler in samplers.items():
        entries[name] = _entry(name, w, sampler)
    return {n: entries[n] for n in names if n in entries}, ceiling


def run_workloads(
    workloads: list[Workload],
    libs: dict[str, Library],
    args: argparse.Namespace,
    dram: Ceilings,
    progress: Progress,
) -> list[dict[str, Any]]:
    """One result row per workload: every library's best time and GB/s, the ceiling sampled
    in turns with them, the speed-ups and a cross-library sanity check of the values."""
    rng = np.random.default_rng(0)
    results = []
    names = [n for n, lib in libs.items() if lib.available]
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for w in workloads:
        progress.step(w.name)
        key = (w.rows, w.cols)
        if key not in cache:
            cache.clear()  # keep one input alive at a time: they can be 256 MiB
            cache[key] = inputs(w, rng)
        x, t = cache[key]
        read, written = w.traffic()
        row: dict[str, Any] = {
            "workload": w.name,
            "op": w.op,
            "shape": [w.rows, w.cols],
            "kind": w.kind,
            "bytes_read": read,
            "bytes_written": written,
        }
        probe: Optional[Callable[[], float]] = None
        if w.kind == "dram":
            probe = lambda writes=w.writes: dram.one(writes)  # noqa: E731
        elif w.kind == "cache":
            # The probe at the workload's own footprint: the cache's bandwidth.
            local = Ceilings(max(read + written, 1 << 12))
            probe = lambda writes=w.writes, p=local: p.one(writes)  # noqa: E731
        row["libraries"], ceiling = time_libraries(names, w, x, t, args, probe)
        if ceiling is not None:
            row["ceiling_gbps"] = ceiling
            row["ceiling"] = "read+write" if w.writes else "read"
        finish_row(row)
        results.append(row)
        progress.done(len(names))
    return results


def finish_row(row: dict[str, Any]) -> None:
    """Adds the fraction of the ceiling, the speed-ups over each peer and a sanity check."""
    libs = row["libraries"]
    ours = libs.get("stablelse", {})
    ceiling = row.get("ceiling_gbps")
    for entry in libs.values():
        if "gbps" in entry and ceiling:
            entry["fraction_of_ceiling"] = entry["gbps"] / ceiling
    if "seconds" in ours:
        row["speedup"] = {
            n: e["seconds"] / ours["seconds"]
            for n, e in libs.items()
            if n != "stablelse" and "seconds" in e
        }
        if row["speedup"]:
            fastest = min(row["speedup"], key=row["speedup"].__getitem__)
            row["fastest_peer"] = {"library": fastest, "speedup": row["speedup"][fastest]}
        ref = ours.get("value")
        if ref is not None and row["op"] in ("logsumexp", "xent", "xent_grad"):
            for e in libs.values():
                v = e.get("value")
                if v is not None and not math.isclose(v, ref, rel_tol=1e-3, abs_tol=1e-3):
                    e["mismatch"] = f"result {v!r} differs from stablelse's {ref!r}"


def sweep_lengths(total: int) -> list[int]:
    """The row lengths of the sweep at ``total`` elements."""
    return sorted({c for c in SWEEP_LENGTHS if c <= total} | {total})


def run_sweep(
    libs: dict[str, Library],
    args: argparse.Namespace,
    total: int,
    ops: tuple[str, ...],
    progress: Progress,
) -> list[dict[str, Any]]:
    """GB/s vs row length at a fixed total size, for the plot."""
    rng = np.random.default_rng(1)
    names = [n for n, lib in libs.items() if lib.available]
    out: list[dict[str, Any]] = []
    for cols in sweep_lengths(total):
        rows = max(1, total // cols)
        x, t = inputs(Workload("logsumexp", rows, cols), rng)
        for op in ops:
            w = Workload(op, rows, cols)
            progress.step(f"sweep {op} C={cols}")
            entries, _ = time_libraries(names, w, x, t, args)
            progress.done(len(names))
            out += [{"op": op, "rows": rows, "cols": cols, **e} for e in entries.values()]
        del x, t
    return out
