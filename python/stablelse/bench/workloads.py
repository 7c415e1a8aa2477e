"""What is timed: the ops, the workloads (op x shape), the bytes each must move, its inputs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

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
LOSS_OPS = ("xent", "xent_grad")

# The default workloads: (op, rows, columns, kind). "dram" workloads are compared with the DRAM
# ceiling, "cache" ones with the probe at their own size, "latency" ones report microseconds
# per call. Long rows, short rows (10 and 32 classes: where classification lives; every op),
# rows of 100 and 1000 (with a classifier's training step: the loss with its gradient), one
# row of 2^26, a batch that fits in L2, and single calls on 8 x 10.
DEFAULT_WORKLOADS = (
    ("logsumexp", 2048, 32768, "dram"),
    ("logsumexp", 1, 1 << 26, "dram"),
    ("softmax", 2048, 32768, "dram"),
    ("log_softmax", 2048, 32768, "dram"),
    ("xent", 2048, 32768, "dram"),
    ("xent_grad", 2048, 32768, "dram"),
    ("logsumexp", 1 << 22, 10, "dram"),
    ("softmax", 1 << 22, 10, "dram"),
    ("log_softmax", 1 << 22, 10, "dram"),
    ("xent", 1 << 22, 10, "dram"),
    ("xent_grad", 1 << 22, 10, "dram"),
    ("logsumexp", 1 << 21, 32, "dram"),
    ("softmax", 1 << 21, 32, "dram"),
    ("log_softmax", 1 << 21, 32, "dram"),
    ("xent", 1 << 21, 32, "dram"),
    ("xent_grad", 1 << 21, 32, "dram"),
    ("logsumexp", 1 << 18, 100, "dram"),
    ("softmax", 1 << 18, 100, "dram"),
    ("xent", 1 << 18, 100, "dram"),
    ("softmax", 1 << 15, 1000, "dram"),
    ("xent", 1 << 15, 1000, "dram"),
    ("xent_grad", 1 << 15, 1000, "dram"),
    ("softmax", 64, 4096, "cache"),
    ("logsumexp", 8, 10, "latency"),
    ("softmax", 8, 10, "latency"),
    ("xent", 8, 10, "latency"),
)

QUICK_SCALE = 1.0 / 256

# Rows up to this many classes count as short (--short-rows, the plot's short-row panel).
SHORT_COLS = 128

# The row-length sweep behind the plot: a fixed total size (128 MiB of float32, several times
# the L3 of the machines this was written on), rows from 10 to 2^21 columns.
SWEEP_TOTAL = 1 << 25
SWEEP_LENGTHS = (10, 32, 128, 1024, 4096, 32768, 1 << 18, 1 << 21)
SWEEP_OPS = ("logsumexp", "softmax", "xent", "xent_grad")


@dataclass(frozen=True)
class Workload:
    op: str
    rows: int
    cols: int
    kind: str = "dram"

    @property
    def name(self) -> str:
        return f"{OP_LABEL[self.op]} {shape_label(self.rows)}x{shape_label(self.cols)}"

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
        """Whether the op writes about as much as it reads (its ceiling is read+write)."""
        r, w = self.traffic()
        return w * 4 >= r


def shape_label(n: int) -> str:
    if n >= 1 << 16 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return str(n)


def parse_workload(spec: str) -> Workload:
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
        try:
            v = 2 ** int(s[2:]) if s.startswith("2^") else int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--workload {spec!r}: {s!r} is not a size (an integer or 2^K)"
            ) from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"--workload {spec!r}: sizes must be >= 1")
        return v

    rows, cols = num(rows_s), num(cols_s)
    kind = "latency" if rows * cols <= 1024 else "dram"
    return Workload(op, rows, cols, kind)


def scaled(w: Workload, scale: float) -> Workload:
    """``w`` with its element count scaled (rows, or columns of a single row)."""
    if w.kind != "dram" or scale == 1.0:
        return w
    if w.rows == 1:
        return Workload(w.op, 1, max(16, round(w.cols * scale)), w.kind)
    return Workload(w.op, max(1, round(w.rows * scale)), w.cols, w.kind)


def inputs(w: Workload, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """float32 standard-normal logits of ``w``'s shape and int64 targets, one per row."""
    x = rng.standard_normal((w.rows, w.cols), dtype=FLOAT)
    t = rng.integers(0, w.cols, size=w.rows, dtype=np.int64)
    return x, t
