"""``python -m stablelse bench``: stablelse against its peers, next to this machine's ceiling.

Times stablelse and every installed peer (NumPy's stable formula written by hand,
``scipy.special``, torch, JAX jitted) in the same process, on the workloads of DESIGN.md
section 4, and measures the DRAM read and read+write bandwidth in the same run with the native
probe (``stablelse._core.read_bandwidth`` / ``read_write_bandwidth``). Missing peers are
skipped and the report says so.

Effective bandwidth is ``bytes the op must read + bytes it must write`` over the best time of
several calls: float32 logits read once, the result (and gradient) written once, int64 targets
read once; temporaries a library chooses to make are its own cost. The ceiling for an op that
writes as much as it reads is the read+write probe, for the others the read probe.

``--accuracy`` reports instead the largest float32 error in ULPs of logsumexp and log_softmax
against an exact float64 reference (``math.fsum`` of ``exp(x - max)``) over the suite of
DESIGN.md section 4, for stablelse and each peer.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

import stablelse

from . import _core

FLOAT = np.float32
ITEM = 4
TARGET_ITEM = 8  # int64 class indices

OPS = ("logsumexp", "softmax", "log_softmax", "xent", "xent_grad")
OP_LABEL = {
    "logsumexp": "logsumexp",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "xent": "cross_entropy",
    "xent_grad": "cross_entropy+grad",
}
PEERS = ("numpy", "scipy", "torch", "jax")
LIBRARIES = ("stablelse", *PEERS)

# The DESIGN.md section 4 workloads: (op, rows, columns, kind). "dram" workloads are compared
# with the DRAM ceiling, "cache" ones with the probe at their own size, "latency" ones report
# microseconds per call.
DESIGN_WORKLOADS = (
    ("logsumexp", 2048, 32768, "dram"),
    ("logsumexp", 1, 1 << 26, "dram"),
    ("softmax", 2048, 32768, "dram"),
    ("log_softmax", 2048, 32768, "dram"),
    ("xent", 2048, 32768, "dram"),
    ("xent_grad", 2048, 32768, "dram"),
    ("logsumexp", 1 << 22, 10, "dram"),
    ("softmax", 1 << 21, 32, "dram"),
    ("softmax", 64, 4096, "cache"),
    ("logsumexp", 8, 10, "latency"),
    ("softmax", 8, 10, "latency"),
)

DRAM_PROBE_BYTES = 256 << 20
QUICK_SCALE = 1.0 / 256
SWEEP_TOTAL = 1 << 25  # 128 MiB of float32: four times the L3 of the reference box
SWEEP_LENGTHS = (10, 32, 128, 1024, 4096, 32768, 1 << 18, 1 << 21)
SWEEP_OPS = ("logsumexp", "softmax")


@dataclass(frozen=True)
class Workload:
    op: str
    rows: int
    cols: int
    kind: str = "dram"

    @property
    def name(self) -> str:
        return f"{OP_LABEL[self.op]} {_shape_label(self.rows)}x{_shape_label(self.cols)}"

    @property
    def elements(self) -> int:
        return self.rows * self.cols

    def traffic(self) -> tuple[int, int]:
        """(bytes read, bytes written) that the op must move."""
        n = self.elements * ITEM
        if self.op == "logsumexp":
            return n, self.rows * ITEM
        if self.op in ("softmax", "log_softmax"):
            return n, n
        if self.op == "xent":
            return n + self.rows * TARGET_ITEM, ITEM
        return n + self.rows * TARGET_ITEM, n + ITEM

    @property
    def nbytes(self) -> int:
        r, w = self.traffic()
        return r + w

    @property
    def writes(self) -> bool:
        r, w = self.traffic()
        return w * 4 >= r


def _shape_label(n: int) -> str:
    if n >= 1 << 16 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return str(n)


def _parse_workload(spec: str) -> Workload:
    """``OP:ROWSxCOLS`` (e.g. ``softmax:4096x1024``; ``2^20`` allowed) -> Workload."""
    try:
        op, shape = spec.split(":")
        rows_s, cols_s = shape.lower().split("x")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--workload {spec!r}: expected OP:ROWSxCOLS, e.g. softmax:4096x1024"
        ) from None
    op = {"cross_entropy": "xent", "cross_entropy+grad": "xent_grad"}.get(op, op)
    if op not in OPS:
        raise argparse.ArgumentTypeError(f"--workload {spec!r}: op must be one of {OPS}")

    def num(s: str) -> int:
        s = s.strip()
        v = 2 ** int(s[2:]) if s.startswith("2^") else int(s)
        if v < 1:
            raise argparse.ArgumentTypeError(f"--workload {spec!r}: sizes must be >= 1")
        return v

    rows, cols = num(rows_s), num(cols_s)
    kind = "latency" if rows * cols <= 1024 else "dram"
    return Workload(op, rows, cols, kind)


def _scaled(w: Workload, scale: float) -> Workload:
    """``w`` with its element count scaled (rows, or columns of a single row)."""
    if w.kind != "dram" or scale == 1.0:
        return w
    if w.rows == 1:
        return Workload(w.op, 1, max(16, round(w.cols * scale)), w.kind)
    return Workload(w.op, max(1, round(w.rows * scale)), w.cols, w.kind)


# --------------------------------------------------------------------------- libraries


@dataclass
class Library:
    name: str
    version: Optional[str]
    reason: str = ""  # why it is missing, or which parts are

    @property
    def available(self) -> bool:
        return self.version is not None


def _cross_entropy() -> Optional[Callable[..., Any]]:
    return getattr(stablelse, "cross_entropy", None)


def _detect_libraries(wanted: tuple[str, ...], threads: int) -> dict[str, Library]:
    libs: dict[str, Library] = {}
    for name in wanted:
        if name == "stablelse":
            libs[name] = Library(name, stablelse.__version__)
            if _cross_entropy() is None:
                libs[name].reason = "no stablelse.cross_entropy in this build"
        elif name == "numpy":
            libs[name] = Library(name, np.__version__)
        elif name == "scipy":
            try:
                import scipy
                import scipy.special  # noqa: F401
            except ImportError:
                libs[name] = Library(name, None, "not installed")
            else:
                libs[name] = Library(name, scipy.__version__)
        elif name == "torch":
            try:
                import torch
            except ImportError:
                libs[name] = Library(name, None, "not installed")
            else:
                torch.set_num_threads(threads)
                libs[name] = Library(name, torch.__version__)
        elif name == "jax":
            if "jax" not in sys.modules and threads == 1:
                # XLA's CPU client sizes its pool from the cores; one thread must be asked
                # for before jax is imported.
                flags = os.environ.get("XLA_FLAGS", "")
                os.environ["XLA_FLAGS"] = (
                    flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
                ).strip()
            try:
                import jax
            except ImportError:
                libs[name] = Library(name, None, "not installed")
            else:
                libs[name] = Library(name, jax.__version__)
    return libs


def _np_lse(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]


def _np_log_softmax(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    out = np.subtract(x, m, out=out)
    out -= np.log(np.exp(out).sum(axis=-1, keepdims=True))
    return out


def _make_call(
    lib: str, w: Workload, x: np.ndarray, t: np.ndarray, algorithm: str
) -> Optional[Callable[[], Any]]:
    """A zero-argument callable that runs ``w.op`` on ``x`` (targets ``t``) with ``lib``,
    everything else (output buffers, device copies, jit) prepared; None if unsupported."""
    op, rows = w.op, w.rows
    ar = np.arange(rows)
    if lib == "stablelse":
        if op == "logsumexp":
            return lambda: stablelse.logsumexp(x, axis=-1, algorithm=algorithm)
        if op in ("softmax", "log_softmax"):
            out = np.empty_like(x)
            fn = stablelse.softmax if op == "softmax" else stablelse.log_softmax
            return lambda: fn(x, axis=-1, out=out, algorithm=algorithm)
        ce = _cross_entropy()
        if ce is None:
            return None
        if op == "xent":
            return lambda: ce(x, t)
        if "grad_out" in inspect.signature(ce).parameters:
            # A preallocated gradient, as the NumPy peer's: no page faults in the timing.
            grad = np.empty_like(x)
            return lambda: ce(x, t, return_grad=True, grad_out=grad)
        return lambda: ce(x, t, return_grad=True)

    if lib == "numpy":
        if op == "logsumexp":
            return lambda: _np_lse(x)
        out = np.empty_like(x)
        if op == "softmax":

            def softmax() -> np.ndarray:
                np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
                np.exp(out, out=out)
                np.divide(out, out.sum(axis=-1, keepdims=True), out=out)
                return out

            return softmax
        if op == "log_softmax":
            return lambda: _np_log_softmax(x, out)
        if op == "xent":
            return lambda: np.mean(_np_lse(x) - x[ar, t])

        def xent_grad() -> tuple[Any, np.ndarray]:
            m = x.max(axis=-1, keepdims=True)
            np.subtract(x, m, out=out)
            np.exp(out, out=out)
            s = out.sum(axis=-1, keepdims=True)
            loss = np.mean(np.log(s[:, 0]) + m[:, 0] - x[ar, t])
            np.divide(out, s, out=out)
            out[ar, t] -= 1
            np.multiply(out, FLOAT(1.0 / rows), out=out)
            return loss, out

        return xent_grad

    if lib == "scipy":
        import scipy.special as sp

        if op == "logsumexp":
            return lambda: sp.logsumexp(x, axis=-1)
        if op == "softmax":
            return lambda: sp.softmax(x, axis=-1)
        if op == "log_softmax":
            return lambda: sp.log_softmax(x, axis=-1)
        if op == "xent":
            return lambda: np.mean(sp.logsumexp(x, axis=-1) - x[ar, t])

        def sp_xent_grad() -> tuple[Any, np.ndarray]:
            loss = np.mean(sp.logsumexp(x, axis=-1) - x[ar, t])
            g = sp.softmax(x, axis=-1)
            g[ar, t] -= 1
            g *= FLOAT(1.0 / rows)
            return loss, g

        return sp_xent_grad

    if lib == "torch":
        import torch
        import torch.nn.functional as F

        xt = torch.from_numpy(x)
        tt = torch.from_numpy(t)

        def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with torch.inference_mode():
                    return f()

            return run

        if op == "logsumexp":
            return no_grad(lambda: torch.logsumexp(xt, dim=-1))
        if op == "softmax":
            return no_grad(lambda: torch.softmax(xt, dim=-1))
        if op == "log_softmax":
            return no_grad(lambda: torch.log_softmax(xt, dim=-1))
        if op == "xent":
            return no_grad(lambda: F.cross_entropy(xt, tt))
        xg = xt.clone().requires_grad_(True)

        def torch_xent_grad() -> Any:
            xg.grad = None
            loss = F.cross_entropy(xg, tt)
            loss.backward()
            return loss, xg.grad

        return torch_xent_grad

    if lib == "jax":
        import jax
        import jax.numpy as jnp

        xj = jax.device_put(x)
        tj = jax.device_put(t.astype(np.int32))

        def loss_fn(a: Any, tgt: Any) -> Any:
            picked = jnp.take_along_axis(a, tgt[:, None], axis=-1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(a, axis=-1) - picked)

        if op == "logsumexp":
            f = jax.jit(lambda a: jax.nn.logsumexp(a, axis=-1))
            return lambda: f(xj).block_until_ready()
        if op == "softmax":
            f = jax.jit(lambda a: jax.nn.softmax(a, axis=-1))
            return lambda: f(xj).block_until_ready()
        if op == "log_softmax":
            f = jax.jit(lambda a: jax.nn.log_softmax(a, axis=-1))
            return lambda: f(xj).block_until_ready()
        if op == "xent":
            g = jax.jit(loss_fn)
            return lambda: g(xj, tj).block_until_ready()
        vg = jax.jit(jax.value_and_grad(loss_fn))
        return lambda: jax.block_until_ready(vg(xj, tj))
    raise ValueError(f"unknown library {lib!r}")


def _loss_value(res: Any) -> Optional[float]:
    """The scalar (or first-row) value of a result, for the cross-library sanity check."""
    try:
        if isinstance(res, tuple):
            res = res[0]
        if hasattr(res, "detach"):
            res = res.detach().numpy()
        a = np.asarray(res, dtype=np.float64).ravel()
        return float(a[0]) if a.size else None
    except Exception:
        return None


# --------------------------------------------------------------------------- timing


class _Sampler:
    """Best-of-N timing of one zero-argument callable, one sample at a time, so that several
    libraries can be sampled in turns: on a shared machine, load that comes and goes then
    weighs on all of them alike. Calls shorter than 2 ms are repeated inside a sample."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
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
        t0 = time.perf_counter()
        for _ in range(self.inner):
            self.fn()
        dt = time.perf_counter() - t0
        self.spent += dt
        self.samples += 1
        self.best = min(self.best, dt / self.inner)


def best_time(fn: Callable[[], Any], reps: int, budget_s: float) -> tuple[float, Any]:
    """Best seconds per call of ``fn`` (see :class:`_Sampler`) and its warm-up result."""
    s = _Sampler(fn)
    while s.wants_more(reps, budget_s):
        s.sample()
    return s.best, s.result


class _Progress:
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


# --------------------------------------------------------------------------- runs


def _machine(threads: int) -> dict[str, Any]:
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
        "threads": threads,
        "simd": info.get("simd"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def measure_ceilings(probe_bytes: int, reps: int) -> dict[str, float]:
    """DRAM read and read+write bandwidth (GB/s) from the native probe."""
    return {
        "read": _core.read_bandwidth(probe_bytes, reps),
        "read_write": _core.read_write_bandwidth(probe_bytes, reps),
    }


def _inputs(w: Workload, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((w.rows, w.cols), dtype=FLOAT)
    t = rng.integers(0, w.cols, size=w.rows, dtype=np.int64)
    return x, t


def _entry(lib: str, w: Workload, sampler: _Sampler) -> dict[str, Any]:
    sec = sampler.best
    return {
        "library": lib,
        "seconds": sec,
        "us_per_call": sec * 1e6,
        "gbps": w.nbytes / sec / 1e9,
        "samples": sampler.samples,
        "value": _loss_value(sampler.result),
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
    per round, in a rotating order); ``probe`` (a bandwidth in GB/s) runs once per round too,
    and its best is returned as the ceiling measured alongside."""
    entries: dict[str, dict[str, Any]] = {}
    samplers: dict[str, _Sampler] = {}
    for name in names:
        try:  # a peer that cannot run this op is reported, not fatal
            fn = _make_call(name, w, x, t, args.algorithm)
            if fn is None:
                entries[name] = _error(name, "not available")
            else:
                samplers[name] = _Sampler(fn)
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
    probe_bytes: int,
    progress: _Progress,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    results = []
    names = [n for n, lib in libs.items() if lib.available]
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for w in workloads:
        progress.step(w.name)
        key = (w.rows, w.cols)
        if key not in cache:
            cache.clear()  # keep one input alive at a time: they can be 256 MiB
            cache[key] = _inputs(w, rng)
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
        if w.kind != "latency":
            size = probe_bytes if w.kind == "dram" else max(read, 1 << 12)
            bw = _core.read_write_bandwidth if w.writes else _core.read_bandwidth
            probe = lambda bw=bw, size=size: bw(size, 2)  # noqa: E731
        row["libraries"], ceiling = time_libraries(names, w, x, t, args, probe)
        if ceiling is not None:
            row["ceiling_gbps"] = ceiling
            row["ceiling"] = "read+write" if w.writes else "read"
        _finish_row(row)
        results.append(row)
        progress.done(len(names))
    return results


def _finish_row(row: dict[str, Any]) -> None:
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
        ref = ours.get("value")
        if ref is not None and row["op"] in ("logsumexp", "xent", "xent_grad"):
            for e in libs.values():
                v = e.get("value")
                if v is not None and not math.isclose(v, ref, rel_tol=1e-3, abs_tol=1e-3):
                    e["mismatch"] = f"result {v!r} differs from stablelse's {ref!r}"


def run_sweep(
    libs: dict[str, Library],
    args: argparse.Namespace,
    total: int,
    progress: _Progress,
) -> list[dict[str, Any]]:
    """GB/s vs row length at a fixed total size, for the plot."""
    rng = np.random.default_rng(1)
    names = [n for n, lib in libs.items() if lib.available]
    lengths = sorted({c for c in SWEEP_LENGTHS if c <= total} | {total})
    out: list[dict[str, Any]] = []
    for cols in lengths:
        rows = max(1, total // cols)
        x, t = _inputs(Workload("logsumexp", rows, cols), rng)
        for op in SWEEP_OPS:
            w = Workload(op, rows, cols)
            progress.step(f"sweep {op} C={cols}")
            entries, _ = time_libraries(names, w, x, t, args)
            progress.done(len(names))
            out += [{"op": op, "rows": rows, "cols": cols, **e} for e in entries.values()]
        del x, t
    return out


# --------------------------------------------------------------------------- accuracy


def _ulp32(ref: np.ndarray) -> np.ndarray:
    """The float32 ULP at each exact value: 2**(floor(log2|ref|) - 23), at least 2**-149."""
    _, e = np.frexp(np.abs(ref))
    return np.maximum(np.ldexp(1.0, (e - 24).astype(np.int32)), 2.0**-149)


def _ulp_error(got: Any, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    same = (got == ref) | (np.isnan(got) & np.isnan(ref))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(same, 0.0, np.abs(got - ref) / _ulp32(ref))
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else 0.0


def _exact_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 logsumexp and log_softmax of each row of float32 ``x``: max-shift, then
    ``math.fsum`` of the float64 exponentials (an exactly rounded sum)."""
    lse = np.empty(x.shape[0])
    lsm = np.empty(x.shape, dtype=np.float64)
    for i, row in enumerate(x.astype(np.float64)):
        m = row.max()
        if not np.isfinite(m):
            lse[i] = m
            lsm[i] = row - m
            continue
        shifted = row - m  # exact: a difference of two float32 values
        logs = math.log(math.fsum(np.exp(shifted).tolist()))
        lse[i] = m + logs
        lsm[i] = shifted - logs
    return lse, lsm


def accuracy_suite(quick: bool) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(2026)
    rows, cols = (16, 1000) if quick else (256, 1000)
    long = 1 << (16 if quick else 24)
    return [
        ("normal", rng.standard_normal((rows, cols)).astype(FLOAT)),
        ("uniform +-1e3", rng.uniform(-1e3, 1e3, (rows, cols)).astype(FLOAT)),
        (f"2^{long.bit_length() - 1} row", rng.standard_normal((2, long)).astype(FLOAT)),
        ("[1000, 1, -1000]", np.array([[1000.0, 1.0, -1000.0]], dtype=FLOAT)),
    ]


def _accuracy_fns(lib: str) -> tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], Any]]:
    if lib == "stablelse":
        return (
            lambda x: stablelse.logsumexp(x, axis=-1),
            lambda x: stablelse.log_softmax(x, axis=-1),
        )
    if lib == "numpy":
        return _np_lse, _np_log_softmax
    if lib == "scipy":
        import scipy.special as sp

        return (lambda x: sp.logsumexp(x, axis=-1), lambda x: sp.log_softmax(x, axis=-1))
    if lib == "torch":
        import torch

        return (
            lambda x: torch.logsumexp(torch.from_numpy(x), dim=-1).numpy(),
            lambda x: torch.log_softmax(torch.from_numpy(x), dim=-1).numpy(),
        )
    if lib == "jax":
        import jax

        lse = jax.jit(lambda a: jax.nn.logsumexp(a, axis=-1))
        lsm = jax.jit(lambda a: jax.nn.log_softmax(a, axis=-1))
        return (lambda x: np.asarray(lse(x)), lambda x: np.asarray(lsm(x)))
    raise ValueError(lib)


def run_accuracy(
    libs: dict[str, Library], quick: bool, progress: _Progress
) -> dict[str, dict[str, dict[str, float]]]:
    """{library: {"logsumexp" | "log_softmax": {case: max ULP error, "max": ...}}}."""
    names = [n for n, lib in libs.items() if lib.available]
    report: dict[str, dict[str, dict[str, float]]] = {
        n: {"logsumexp": {}, "log_softmax": {}} for n in names
    }
    for case, x in accuracy_suite(quick):
        progress.step(f"accuracy reference {case}")
        ref_lse, ref_lsm = _exact_rows(x)
        for name in names:
            progress.step(f"accuracy {case} {name}")
            lse_fn, lsm_fn = _accuracy_fns(name)
            for what, fn, ref in (("logsumexp", lse_fn, ref_lse), ("log_softmax", lsm_fn, ref_lsm)):
                try:
                    with np.errstate(all="ignore"):
                        err = _ulp_error(fn(x), ref)
                except Exception:
                    err = math.nan
                report[name][what][case] = err
            progress.done()
    for per in report.values():
        for errs in per.values():
            vals = [v for v in errs.values() if not math.isnan(v)]
            errs["max"] = max(vals) if vals else math.nan
    return report


# --------------------------------------------------------------------------- output


def _fmt_rate(e: dict[str, Any], latency: bool) -> str:
    if "seconds" not in e:
        return "-"
    s = f"{e['us_per_call']:.1f} us" if latency else f"{e['gbps']:.1f}"
    return s + (" !" if "mismatch" in e else "")


def format_table(
    results: list[dict[str, Any]], libs: dict[str, Library], ceilings: dict[str, float]
) -> str:
    peers = [n for n in PEERS if n in libs and libs[n].available]
    head = ["workload", "stablelse GB/s", "of ceiling"]
    head += [f"{p} GB/s (speed-up)" for p in peers]
    lines = [head]
    for row in results:
        lat = row["kind"] == "latency"
        ours = row["libraries"].get("stablelse", {})
        frac = ours.get("fraction_of_ceiling")
        cells = [
            row["workload"] + (" (in cache)" if row["kind"] == "cache" else ""),
            _fmt_rate(ours, lat),
            f"{100 * frac:.0f}% of {row['ceiling_gbps']:.0f}" if frac is not None else "-",
        ]
        for p in peers:
            e = row["libraries"].get(p, {})
            sp = row.get("speedup", {}).get(p)
            cells.append(_fmt_rate(e, lat) + (f" ({sp:.1f}x)" if sp is not None else ""))
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |" for r in lines]
    out.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return "\n".join(out)


def format_accuracy(report: dict[str, dict[str, dict[str, float]]]) -> str:
    out: list[dict[str, Any]] = []
    for what in ("logsumexp", "log_softmax"):
        cases = [c for c in next(iter(report.values()))[what] if c != "max"] if report else []
        head = ["library", *cases, "max"]
        lines = [head]
        for lib, per in report.items():
            errs = per[what]
            lines.append([lib, *(_fmt_ulp(errs[c]) for c in cases), _fmt_ulp(errs["max"])])
        widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
        out.append(f"{what}: max float32 error in ULPs of the exact result")
        out += ["| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |" for r in lines]
        out.insert(len(out) - len(lines) + 1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
        out.append("")
    return "\n".join(out)


def _fmt_ulp(v: float) -> str:
    if math.isnan(v):
        return "error"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if v < 100 else f"{v:.3g}"


def plot_sweep(
    sweep: list[dict[str, Any]], ceilings: dict[str, float], path: str, title: str
) -> Optional[str]:
    """Writes the GB/s-vs-row-length chart to ``path``; returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(1, len(SWEEP_OPS), figsize=(6 * len(SWEEP_OPS), 4.5))
    for ax, op in zip(np.atleast_1d(axes), SWEEP_OPS):
        for lib in LIBRARIES:
            pts = sorted(
                (e["cols"], e["gbps"])
                for e in sweep
                if e["op"] == op and e["library"] == lib and "gbps" in e
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lib, lw=2.5 if lib == "stablelse" else 1.2)
        key = "read" if op == "logsumexp" else "read_write"
        label = f"DRAM {key.replace('_', '+')} ceiling {ceilings[key]:.0f} GB/s"
        ax.axhline(ceilings[key], color="k", ls="--", lw=1, label=label)
        top = max([ceilings[key]] + [e["gbps"] for e in sweep if "gbps" in e and e["op"] == op])
        ax.set_ylim(0, top * 1.4)  # room for the legend above the ceiling line
        ax.legend(fontsize=8, loc="upper center", ncol=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length (columns), fixed total size")
        ax.set_title(f"{op}, float32")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("effective GB/s (read + write) / best time")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m stablelse bench",
        description="Time stablelse against NumPy, scipy, torch and JAX next to this "
        "machine's DRAM bandwidth, or (--accuracy) compare their float32 errors.",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for every library (2)")
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
        type=_parse_workload,
        metavar="OP:RxC",
        help="run this workload instead of the DESIGN set (repeatable); OP is one of "
        f"{', '.join(OPS)}; e.g. softmax:4096x1024 or logsumexp:1x2^26",
    )
    p.add_argument(
        "--only", default=None, help="comma-separated ops to keep from the workload list"
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
    p.add_argument("--reps", type=int, default=None, help="timed samples per case (7)")
    p.add_argument(
        "--budget",
        type=float,
        default=3.0,
        help="seconds per case after which sampling stops (at least 3 samples)",
    )
    p.add_argument(
        "--probe-bytes",
        type=int,
        default=None,
        help=f"DRAM probe buffer size in bytes ({DRAM_PROBE_BYTES})",
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
        help="also sweep row lengths at a fixed total size and plot GB/s",
    )
    p.add_argument(
        "--accuracy", action="store_true", help="report float32 ULP errors instead of timings"
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
    if args.threads < 1:
        print("--threads must be >= 1", file=sys.stderr)
        return 2
    to_stdout_json = args.json == "-"
    show = (lambda *a: print(*a, file=sys.stderr)) if to_stdout_json else print

    if args.cuda:
        return _run_cuda(args, show)

    if args.reps is None:
        args.reps = 3 if args.quick else 7
    if args.quick:
        args.budget = min(args.budget, 0.5)
    scale = args.size if args.size is not None else (QUICK_SCALE if args.quick else 1.0)
    probe_bytes = args.probe_bytes or (8 << 20 if args.quick else DRAM_PROBE_BYTES)

    wanted = tuple(n.strip() for n in args.libraries.split(",") if n.strip())
    unknown = [n for n in wanted if n not in LIBRARIES]
    if unknown or "stablelse" not in wanted:
        print(f"--libraries must include stablelse and name only {LIBRARIES}", file=sys.stderr)
        return 2

    saved_threads = stablelse.get_num_threads()
    stablelse.set_num_threads(args.threads)
    limits: Any = contextlib.nullcontext()
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    try:
        with limits:
            stablelse.set_num_threads(args.threads)
            return _main(args, wanted, scale, probe_bytes, show, to_stdout_json)
    finally:
        stablelse.set_num_threads(saved_threads)


def _run_cuda(args: argparse.Namespace, show: Callable[..., None]) -> int:
    """``--cuda``: hands over to ``stablelse._bench_cuda.run_cuda_bench`` when it exists."""
    try:
        from . import _bench_cuda  # type: ignore[attr-defined]
    except ImportError:
        show("CUDA benchmark unavailable: this build has no stablelse._bench_cuda")
        return 0
    to_stdout = args.json == "-"
    cuda_args = argparse.Namespace(**{**vars(args), "json": None if to_stdout else args.json})
    try:
        rows = _bench_cuda.run_cuda_bench(cuda_args)
    except ImportError as exc:
        show(f"CUDA benchmark unavailable: {exc}")
        return 0
    if to_stdout:
        print(json.dumps(_jsonable({"cuda": rows or []}), indent=1))
    return 0


def _main(
    args: argparse.Namespace,
    wanted: tuple[str, ...],
    scale: float,
    probe_bytes: int,
    show: Callable[..., None],
    to_stdout_json: bool,
) -> int:
    libs = _detect_libraries(wanted, args.threads)
    machine = _machine(args.threads)
    doc: dict[str, Any] = {
        "stablelse": stablelse.__version__,
        "machine": machine,
        "libraries": {n: {"version": lib.version, "note": lib.reason} for n, lib in libs.items()},
        "units": "GB/s = (bytes the op must read + write) / best time; 1 GB = 1e9 bytes",
        "label": args.label,
    }
    show(
        f"stablelse {stablelse.__version__} ({machine['simd']}), {machine['cpu']}, "
        f"{machine['cores']} cores, {args.threads} threads, float32"
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
        progress = _Progress(len(suite) * n_libs, not args.no_progress)
        report = run_accuracy(libs, args.quick, progress)
        progress.close()
        doc["accuracy"] = report
        show(format_accuracy(report))
    else:
        workloads = list(args.workload or [Workload(*w) for w in DESIGN_WORKLOADS])
        if args.only:
            keep = {s.strip() for s in args.only.split(",")}
            keep |= {k for k, v in OP_LABEL.items() if v in keep}
            workloads = [w for w in workloads if w.op in keep]
        workloads = [_scaled(w, scale) for w in workloads]
        n_libs = sum(lib.available for lib in libs.values())
        sweep_total = max(1024, round(SWEEP_TOTAL * scale))
        n_sweep = (
            len({c for c in SWEEP_LENGTHS if c <= sweep_total} | {sweep_total})
            * len(SWEEP_OPS)
            * n_libs
            if args.plot
            else 0
        )
        progress = _Progress(len(workloads) * n_libs + n_sweep, not args.no_progress)
        progress.step("DRAM probe")
        before = measure_ceilings(probe_bytes, 5)
        results = run_workloads(workloads, libs, args, probe_bytes, progress)
        sweep = run_sweep(libs, args, sweep_total, progress) if args.plot else []
        after = measure_ceilings(probe_bytes, 5)
        progress.close()
        ceilings = {k: max(before[k], after[k]) for k in before}
        for row in results:
            if row["kind"] == "dram":
                key = "read_write" if row["ceiling"] == "read+write" else "read"
                ceilings[key] = max(ceilings[key], row["ceiling_gbps"])
        doc["ceilings"] = {
            "probe_bytes": probe_bytes,
            "read_gbps": ceilings["read"],
            "read_write_gbps": ceilings["read_write"],
            "before": before,
            "after": after,
            "note": "native probe (stablelse._core.read_bandwidth / read_write_bandwidth); "
            "read+write counts each byte once (read of src + write of dst). The run's ceiling "
            "is the best of the probes before, after and between the workloads; each row's "
            "ceiling_gbps is the best probe sampled in turns with that row's timings",
        }
        doc["results"] = results
        doc["sweep"] = sweep
        show(
            f"DRAM ceiling ({probe_bytes >> 20} MiB, {args.threads} threads, best of the run): "
            f"read {ceilings['read']:.1f} GB/s (before {before['read']:.1f}, after "
            f"{after['read']:.1f}), read+write {ceilings['read_write']:.1f} GB/s (before "
            f"{before['read_write']:.1f}, after {after['read_write']:.1f})"
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
                f"stablelse {stablelse.__version__} ({machine['simd']}) on {machine['cpu']}, "
                f"{args.threads} threads, {sweep_total} float32 elements"
                + (f"\n{args.label}" if args.label else "")
            )
            why = plot_sweep(sweep, ceilings, args.plot, title)
            show(f"plot not written: {why}" if why else f"plot written to {args.plot}")

    if args.json is not None:
        text = json.dumps(_jsonable(doc), indent=1)
        if to_stdout_json:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            show(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
