"""``--accuracy``: the largest float32 error in ULPs of logsumexp and log_softmax, for
stablelse and each peer, against an exact float64 reference (``math.fsum`` of the shifted
exponentials)."""

from __future__ import annotations

import math

import numpy as np

from .peers import Library, accuracy_fns
from .timing import Progress
from .workloads import FLOAT


def _ulp32(ref: np.ndarray) -> np.ndarray:
    """The float32 ULP at each exact value: 2**(floor(log2|ref|) - 23), at least 2**-149."""
    _, e = np.frexp(np.abs(ref))
    return np.maximum(np.ldexp(1.0, (e - 24).astype(np.int32)), 2.0**-149)


def ulp_error(got: object, ref: np.ndarray) -> float:
    """The largest error of ``got`` in float32 ULPs of ``ref``; a NaN where ``ref`` has a
    number counts as an infinite error."""
    g = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    same = (g == ref) | (np.isnan(g) & np.isnan(ref))
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(same, 0.0, np.abs(g - ref) / _ulp32(ref))
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else 0.0


def exact_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    """(name, float32 rows): normal, wide uniform, one long row, and the overflow case."""
    rng = np.random.default_rng(2026)
    rows, cols = (16, 1000) if quick else (256, 1000)
    long = 1 << (16 if quick else 24)
    return [
        ("normal", rng.standard_normal((rows, cols)).astype(FLOAT)),
        ("uniform +-1e3", rng.uniform(-1e3, 1e3, (rows, cols)).astype(FLOAT)),
        (f"2^{long.bit_length() - 1} row", rng.standard_normal((2, long)).astype(FLOAT)),
        ("[1000, 1, -1000]", np.array([[1000.0, 1.0, -1000.0]], dtype=FLOAT)),
    ]


def run_accuracy(
    libs: dict[str, Library], quick: bool, progress: Progress
) -> dict[str, dict[str, dict[str, float]]]:
    """{library: {"logsumexp" | "log_softmax": {case: max ULP error, "max": ...}}}."""
    names = [n for n, lib in libs.items() if lib.available]
    report: dict[str, dict[str, dict[str, float]]] = {
        n: {"logsumexp": {}, "log_softmax": {}} for n in names
    }
    for case, x in accuracy_suite(quick):
        progress.step(f"accuracy reference {case}")
        ref_lse, ref_lsm = exact_rows(x)
        for name in names:
            progress.step(f"accuracy {case} {name}")
            lse_fn, lsm_fn = accuracy_fns(name)
            for what, fn, ref in (("logsumexp", lse_fn, ref_lse), ("log_softmax", lsm_fn, ref_lsm)):
                try:
                    with np.errstate(all="ignore"):
                        err = ulp_error(fn(x), ref)
                except Exception:
                    err = math.nan
                report[name][what][case] = err
            progress.done()
    for per in report.values():
        for errs in per.values():
            vals = [v for v in errs.values() if not math.isnan(v)]
            errs["max"] = max(vals) if vals else math.nan
    return report
