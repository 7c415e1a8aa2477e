"""Command line: ``python -m stablelse demo | info | bench [...]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import numpy as np

import stablelse

DEMO_BATCH = [[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]]


def _naive_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def demo(print_fn: Callable[..., None] = print) -> int:
    """A batch whose naive softmax overflows, while stablelse stays finite and exact."""
    np.set_printoptions(precision=6, suppress=True)
    logits = np.array(DEMO_BATCH, dtype=np.float32)
    print_fn("stablelse demo: a batch of logits (float32) with a row of +-1000")
    print_fn(logits)
    print_fn()
    print_fn("Naive NumPy softmax, exp(x) / sum(exp(x)):")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        naive = _naive_softmax(logits)
        naive_log = np.log(naive)
    print_fn(naive)
    print_fn("  row 1 is NaN: exp(1000) overflows to inf and inf / inf = NaN")
    print_fn("naive log(softmax(x)):")
    print_fn(naive_log)
    print_fn()
    lsm = stablelse.log_softmax(logits, axis=-1)
    sm = stablelse.softmax(logits, axis=-1)
    print_fn("stablelse.softmax(x, axis=-1):")
    print_fn(sm)
    print_fn("stablelse.log_softmax(x, axis=-1):")
    print_fn(lsm)
    lse = stablelse.logsumexp(logits, axis=-1)
    print_fn("stablelse.logsumexp(x, axis=-1):", lse)
    ok = bool(np.isfinite(lsm).all() and np.isfinite(sm).all() and np.isfinite(lse).all())
    ref = np.log(np.exp(np.float64(1000.0) - 1000.0) + np.exp(1.0 - 1000.0)) + 1000.0
    print_fn(f"  row 1: logsumexp = {lse[1]!r} (exact {ref!r}); every value is finite: {ok}")
    try:
        from ._demo_losses import demo_losses
    except ImportError:
        pass
    else:
        print_fn()
        ok = bool(demo_losses(print_fn)) and ok
    return 0 if ok else 1


def info(print_fn: Callable[..., None] = print) -> int:
    """Prints version, SIMD level, threads and CUDA status."""
    print_fn(json.dumps(stablelse.info(), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The benchmark has its own options (and --help); hand them over untouched.
        try:
            from .bench import main as bench_main
        except ImportError as exc:
            print(f"the benchmark is not available: {exc}", file=sys.stderr)
            return 2
        return int(bench_main(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m stablelse", description="stablelse command line"
    )
    parser.add_argument("--version", action="version", version=f"stablelse {stablelse.__version__}")
    parser.add_argument(
        "command",
        choices=["demo", "info", "bench"],
        help="demo: naive vs stable softmax on overflowing logits; info: build and machine; "
        "bench: see `bench --help`",
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        return demo()
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return info()


if __name__ == "__main__":
    sys.exit(main())
