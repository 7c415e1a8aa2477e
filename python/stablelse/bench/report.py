"""What the bench prints and writes: the Markdown tables, the plot and the JSON document."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from .peers import LIBRARIES, PEERS, Library
from .workloads import OP_LABEL, SHORT_COLS


def _fmt_rate(e: dict[str, Any], latency: bool) -> str:
    if "seconds" not in e:
        return "-"
    s = f"{e['us_per_call']:.1f} us" if latency else f"{e['gbps']:.1f}"
    return s + (" !" if "mismatch" in e else "")


def _markdown(lines: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(c.ljust(wd) for c, wd in zip(r, widths)) + " |" for r in lines]
    out.insert(1, "|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return out


def format_table(
    results: list[dict[str, Any]], libs: dict[str, Library], ceilings: dict[str, float]
) -> str:
    """One row per workload: stablelse's GB/s (or us per call), its share of the ceiling,
    every peer's GB/s with stablelse's speed-up over it, and the speed-up over the fastest
    peer."""
    peers = [n for n in PEERS if n in libs and libs[n].available]
    head = ["workload", "stablelse GB/s", "of ceiling"]
    head += [f"{p} GB/s (speed-up)" for p in peers]
    head.append("vs fastest peer")
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
        fastest = row.get("fastest_peer")
        cells.append(f"{fastest['speedup']:.2f}x {fastest['library']}" if fastest else "-")
        lines.append(cells)
    return "\n".join(_markdown(lines))


def format_accuracy(report: dict[str, dict[str, dict[str, float]]]) -> str:
    """One table per function: each library's largest ULP error per case of the suite."""
    out: list[str] = []
    for what in ("logsumexp", "log_softmax"):
        cases = [c for c in next(iter(report.values()))[what] if c != "max"] if report else []
        lines = [["library", *cases, "max"]]
        for lib, per in report.items():
            errs = per[what]
            lines.append([lib, *(_fmt_ulp(errs[c]) for c in cases), _fmt_ulp(errs["max"])])
        out.append(f"{what}: max float32 error in ULPs of the exact result")
        out += _markdown(lines)
        out.append("")
    return "\n".join(out)


def _fmt_ulp(v: float) -> str:
    if math.isnan(v):
        return "error"
    if math.isinf(v):
        return "inf"
    return f"{v:.2f}" if v < 100 else f"{v:.3g}"


def plot_sweep(
    sweep: list[dict[str, Any]],
    ceilings: dict[str, float],
    path: str,
    title: str,
    ops: tuple[str, ...],
    results: Optional[list[dict[str, Any]]] = None,
) -> Optional[str]:
    """Writes the GB/s-vs-row-length chart to ``path``, one panel per op (the reductions on
    the first row, the losses on the second), and, when ``results`` hold short-row workloads
    (at most ``SHORT_COLS`` columns), a last panel of their GB/s per library; returns why
    not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    ops = tuple(op for op in ops if any(e["op"] == op for e in sweep)) or ops
    short = [
        r
        for r in results or []
        if r["kind"] == "dram" and 1 < r["shape"][0] and r["shape"][1] <= SHORT_COLS
    ]
    panels = len(ops) + (1 if short else 0)
    ncols = min(2, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, op in zip(flat, ops):
        writes = op not in ("logsumexp", "xent")
        for lib in LIBRARIES:
            pts = sorted(
                (e["cols"], e["gbps"])
                for e in sweep
                if e["op"] == op and e["library"] == lib and "gbps" in e
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lib, lw=2.5 if lib == "stablelse" else 1.2)
        key = "read_write" if writes else "read"
        label = f"DRAM {key.replace('_', '+')} ceiling {ceilings[key]:.0f} GB/s"
        ax.axhline(ceilings[key], color="k", ls="--", lw=1, label=label)
        top = max([ceilings[key]] + [e["gbps"] for e in sweep if "gbps" in e and e["op"] == op])
        ax.set_ylim(0, top * 1.4)  # room for the legend above the ceiling line
        ax.legend(fontsize=8, loc="upper center", ncol=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length (columns), fixed total size")
        ax.set_title(f"{OP_LABEL[op]}, float32")
        ax.grid(True, which="both", alpha=0.3)
    if short:
        _short_row_panel(flat[len(ops)], short)
    for ax in flat[panels:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("effective GB/s (read + write) / best time")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _short_row_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Grouped bars: each short-row workload's GB/s per library."""
    libs = [n for n in LIBRARIES if any("gbps" in r["libraries"].get(n, {}) for r in rows)]
    width = 0.8 / max(1, len(libs))
    for i, lib in enumerate(libs):
        xs = [j + (i - (len(libs) - 1) / 2) * width for j in range(len(rows))]
        ys = [r["libraries"].get(lib, {}).get("gbps", 0.0) for r in rows]
        ax.bar(xs, ys, width, label=lib, edgecolor="k" if lib == "stablelse" else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["workload"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("effective GB/s (read + write) / best time")
    ax.set_title("short rows: softmax and losses, float32")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(True, axis="y", alpha=0.3)


def jsonable(obj: Any) -> Any:
    """``obj`` with NumPy scalars as Python numbers and non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
