"""``--compute``: one thread, data in the cache: nanoseconds per element of every op at
every SIMD level this CPU has.

The kernels' cost where memory is not the limit: float32 rows of 1 MiB (a few cache-resident
shapes, from one long-row batch to rows of 10 classes), every op on the same rows, ``out=``
given where an op writes an array. Each level runs in its own child process with
``STABLELSE_SIMD`` set (the level is chosen once per process) and one thread. A case's time
is the best over ``reps`` samples of the CPU time of ``calls`` calls (``time.process_time``:
time the process was not running is not counted), divided by the elements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from .. import _core

SHAPES = ((64, 4096), (4096, 64), (8192, 32), (16384, 10))
QUICK_SHAPES = ((16, 256), (256, 16))
OPS = ("logsumexp", "softmax", "log_softmax", "cross_entropy", "cross_entropy+grad")
CHILD_TIMEOUT_S = 600


def _best_ns(fn: Callable[[], object], elements: int, reps: int, calls: int) -> float:
    """The best over ``reps`` samples of the CPU time per call of ``fn``, in ns per element."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t) / calls)
    return best / elements * 1e9


def _calls(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> dict[str, Callable[[], object]]:
    """Each op on the rows ``x`` (class targets ``t``), writing to ``y`` where it writes."""
    import stablelse as sl

    return {
        "logsumexp": lambda: sl.logsumexp(x, axis=-1),
        "softmax": lambda: sl.softmax(x, axis=-1, out=y),
        "log_softmax": lambda: sl.log_softmax(x, axis=-1, out=y),
        "cross_entropy": lambda: sl.cross_entropy(x, t),
        "cross_entropy+grad": lambda: sl.cross_entropy(x, t, return_grad=True, grad_out=y),
    }


def time_ops(shapes: tuple[tuple[int, int], ...], reps: int, calls: int) -> list[dict[str, Any]]:
    """ns per element of every op on every shape, in this process (its SIMD level and
    thread count as set)."""
    rng = np.random.default_rng(0)
    rows = []
    for r, c in shapes:
        x = rng.standard_normal((r, c)).astype(np.float32)
        fns = _calls(x, rng.integers(0, c, r), np.empty_like(x))
        ns = {op: _best_ns(fns[op], x.size, reps, calls) for op in OPS}
        rows.append({"shape": f"{r}x{c}", "ns_per_element": ns})
    return rows


def _child() -> None:
    """The child process: times every op at the level its environment set; one JSON line."""
    args = json.loads(sys.argv[1])
    shapes = tuple(tuple(s) for s in args["shapes"])
    rows = time_ops(shapes, args["reps"], args["calls"])  # type: ignore[arg-type]
    print(json.dumps({"simd": _core.simd_level(), "rows": rows}))


def run_compute(quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every op on every shape at every available SIMD level, each level in a child process
    with one thread. Returns ``{"levels": [...], "results": [{"simd", "shape",
    "ns_per_element": {op: ns}}]}``; a level whose child failed is reported in ``"errors"``."""
    shapes = QUICK_SHAPES if quick else SHAPES
    spec = {"shapes": shapes, "reps": 3 if quick else 15, "calls": 2 if quick else 40}
    levels = list(_core.available_simd_levels())
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for level in levels:
        progress(level)
        env = {**os.environ, "STABLELSE_SIMD": level, "STABLELSE_NUM_THREADS": "1"}
        code = "from stablelse.bench.compute import _child; _child()"
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, json.dumps(spec)],
                env=env,
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            errors[level] = f"no result in {CHILD_TIMEOUT_S} s"
            continue
        if done.returncode != 0:
            errors[level] = (done.stderr.strip().splitlines() or ["failed"])[-1]
            continue
        out = json.loads(done.stdout.strip().splitlines()[-1])
        results += [{"simd": out["simd"], **row} for row in out["rows"]]
    return {"levels": levels, "results": results, "errors": errors}


def format_compute(report: dict[str, Any]) -> str:
    """The table: one line per shape and level, ns per element of each op."""
    lines = [
        "One thread, float32 rows in the cache: ns per element (CPU time, best of the samples; "
        "softmax, log_softmax and the gradient written to out=)",
        "| shape | SIMD | " + " | ".join(OPS) + " |",
        "|---|---|" + "---:|" * len(OPS),
    ]
    order = {lv: i for i, lv in enumerate(report["levels"])}
    rows = report["results"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        same = sorted((r for r in rows if r["shape"] == shape), key=lambda r: order[r["simd"]])
        for row in same:
            ns = row["ns_per_element"]
            lines.append(
                f"| {shape} | {row['simd']} | " + " | ".join(f"{ns[op]:.2f}" for op in OPS) + " |"
            )
    for level, why in report["errors"].items():
        lines.append(f"{level}: {why}")
    return "\n".join(lines)
