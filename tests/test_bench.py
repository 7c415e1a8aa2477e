"""Smoke tests of ``python -m stablelse bench``: it runs on tiny sizes and writes well-formed
JSON, its probe is sized past the last-level cache and its defaults follow the machine.
Nothing here asserts on a timing."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import stablelse
from stablelse import _core, bench
from stablelse.bench import cli, peers, timing, workloads


def _finite_or_none(v):
    return v is None or (isinstance(v, (int, float)) and math.isfinite(v))


def test_quick_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--no-progress", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert {"machine", "libraries", "ceilings", "results"} <= doc.keys()
    assert doc["ceilings"]["read_gbps"] > 0 and doc["ceilings"]["read_write_gbps"] > 0
    assert len(doc["results"]) == len(workloads.DEFAULT_WORKLOADS)
    for row in doc["results"]:
        assert row["bytes_read"] > 0 and row["bytes_written"] > 0
        for name, entry in row["libraries"].items():
            assert name in peers.LIBRARIES
            if "seconds" in entry:
                assert entry["seconds"] > 0 and entry["gbps"] > 0
            else:
                assert entry["error"]
        assert all(_finite_or_none(v) for v in row.get("speedup", {}).values())
        # stablelse ran every workload, and agrees with the peers on the values it checks
        assert "seconds" in row["libraries"]["stablelse"], row
        assert not any("mismatch" in e for e in row["libraries"].values()), row
    lse = doc["results"][0]["libraries"]["stablelse"]
    assert lse["gbps"] > 0 and 0 < lse["fraction_of_ceiling"]
    out = capsys.readouterr().out
    assert "DRAM ceiling" in out and "| logsumexp" in out


def test_default_workloads_cover_short_rows_and_losses():
    have = {(op, cols) for op, _, cols, kind in workloads.DEFAULT_WORKLOADS if kind == "dram"}
    for cols in (10, 32):
        for op in workloads.OPS:
            assert (op, cols) in have, (op, cols)
    latency = {(op, c) for op, _, c, k in workloads.DEFAULT_WORKLOADS if k == "latency"}
    assert ("xent", 10) in latency
    assert {"xent", "xent_grad"} <= set(workloads.SWEEP_OPS)


def test_json_to_stdout_and_explicit_workloads(capsys):
    argv = [
        "--no-progress",
        "--json",
        "--reps",
        "1",
        "--libraries",
        "stablelse,numpy",
        "--workload",
        "softmax:16x128",
        "--workload",
        "logsumexp:1x2^12",
        "--workload",
        "cross_entropy+grad:64x10",
        "--probe-bytes",
        str(1 << 20),
    ]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [r["workload"] for r in doc["results"]] == [
        "softmax 16x128",
        "logsumexp 1x4096",
        "cross_entropy+grad 64x10",
    ]
    assert doc["ceilings"]["probe_bytes"] == 1 << 20
    assert "DRAM ceiling" in captured.err


def test_accuracy_quick(tmp_path):
    path = tmp_path / "acc.json"
    assert bench.main(["--accuracy", "--quick", "--no-progress", "--json", str(path)]) == 0
    acc = json.loads(path.read_text())["accuracy"]
    ours = acc["stablelse"]
    for what in ("logsumexp", "log_softmax"):
        assert set(ours[what]) >= {"normal", "[1000, 1, -1000]", "max"}
        assert all(v is None or v >= 0 for v in ours[what].values())


def test_compute_quick_times_every_op_at_every_level(tmp_path, capsys):
    # Catches a level whose child process fails (its environment not passed, its JSON not
    # parsed), an op left out of the table, and a time that is not a positive number.
    path = tmp_path / "compute.json"
    argv = ["--compute", "--quick", "--no-progress", "--libraries", "stablelse"]
    assert bench.main([*argv, "--json", str(path)]) == 0
    report = json.loads(path.read_text())["compute"]
    assert report["errors"] == {}
    levels = list(_core.available_simd_levels())
    assert report["levels"] == levels
    assert sorted({r["simd"] for r in report["results"]}) == sorted(levels)
    from stablelse.bench.compute import OPS, QUICK_SHAPES

    assert len(report["results"]) == len(levels) * len(QUICK_SHAPES)
    for row in report["results"]:
        assert set(row["ns_per_element"]) == set(OPS)
        assert all(v > 0 for v in row["ns_per_element"].values())
    table = capsys.readouterr().out
    assert "| 16x256 | scalar |" in table and "cross_entropy+grad" in table


def test_plot_quick_has_a_loss_panel(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    path = tmp_path / "bench.json"
    argv = [
        "--quick",
        "--no-progress",
        "--reps",
        "1",
        "--libraries",
        "stablelse,numpy",
        "--only",
        "logsumexp",
        "--sweep-ops",
        "softmax,cross_entropy+grad",
        "--plot",
        str(png),
        "--json",
        str(path),
    ]
    assert bench.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads(path.read_text())["sweep"]
    assert {e["op"] for e in sweep} == {"softmax", "xent_grad"}
    assert {e["cols"] for e in sweep} >= {10, 32}


def test_short_rows_keeps_every_op_on_short_rows_and_names_the_fastest_peer(capsys):
    argv = ["--short-rows", "--quick", "--no-progress", "--reps", "1", "--json"]
    argv += ["--libraries", "stablelse,numpy,scipy"]
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    shapes = {tuple(r["shape"]) for r in doc["results"]}
    assert all(1 < rows and cols <= workloads.SHORT_COLS for rows, cols in shapes), shapes
    every_op = {(op, cols) for op in workloads.OPS for cols in (10, 32)}
    rows_of_100 = {("logsumexp", 100), ("softmax", 100), ("xent", 100)}
    assert {(r["op"], r["shape"][1]) for r in doc["results"]} == every_op | rows_of_100
    for row in doc["results"]:
        fastest = row["fastest_peer"]
        assert fastest["speedup"] == min(row["speedup"].values())
        assert row["speedup"][fastest["library"]] == fastest["speedup"]
    assert "vs fastest peer" in captured.err


def test_plot_has_a_short_row_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from stablelse.bench import report

    sweep = [
        {"op": "softmax", "library": lib, "rows": 1 << 10 // c, "cols": c, "gbps": 1.0 + c}
        for lib in ("stablelse", "numpy")
        for c in (10, 32)
    ]
    results = [
        {
            "workload": f"cross_entropy 64x{c}",
            "kind": "dram",
            "shape": [64, c],
            "libraries": {"stablelse": {"gbps": 2.0}, "numpy": {"gbps": 1.0}},
        }
        for c in (10, 32, 4096)
    ]
    ceilings = {"read": 10.0, "read_write": 8.0}
    png = tmp_path / "short.png"
    assert report.plot_sweep(sweep, ceilings, str(png), "t", ("softmax",), results) is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--workload", "softmax:abc"])
    with pytest.raises(SystemExit):
        bench.main(["--sweep-ops", "softmax,bogus"])
    assert bench.main(["--libraries", "numpy"]) == 2
    assert bench.main(["--threads", "0"]) == 2


def test_threads_default_to_the_cores_available():
    want = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert timing.available_cores() == want
    assert cli.build_parser().parse_args([]).threads is None  # resolved to the cores in main


def test_the_probe_is_larger_than_the_last_level_cache():
    llc = _core.last_level_cache_bytes()
    size = _core.dram_probe_bytes()
    assert size >= 256 << 20 and size % (1 << 20) == 0
    if llc is not None:
        assert size >= 4 * llc
    if sys.platform.startswith("linux") and os.path.exists(
        "/sys/devices/system/cpu/cpu0/cache/index0/size"
    ):
        assert llc is not None and llc > 0


def test_probe_object_reuses_its_buffers_and_reports_memory_errors():
    probe = _core.BandwidthProbe(1 << 20)
    assert probe.bytes == 1 << 20
    assert probe.read(1) > 0 and probe.read_write(1) > 0
    assert _core.read_bandwidth(1 << 16, 1) > 0 and _core.read_write_bandwidth(1 << 16, 1) > 0
    with pytest.raises(MemoryError):
        _core.BandwidthProbe(1 << 62)
    with pytest.raises(MemoryError):
        _core.read_bandwidth(1 << 62, 1)


def test_module_entry_points_hand_over_the_options():
    from stablelse.__main__ import main as stablelse_main

    assert stablelse_main(["bench", "--libraries", "numpy"]) == 2
    run = subprocess.run(
        [sys.executable, "-m", "stablelse.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "--sweep-ops" in run.stdout and "--threads" in run.stdout


def test_threads_are_restored_after_a_run():
    before = stablelse.get_num_threads()
    argv = ["--no-progress", "--threads", "1", "--reps", "1", "--libraries", "stablelse"]
    assert bench.main([*argv, "--workload", "logsumexp:4x16", "--probe-bytes", "65536"]) == 0
    assert stablelse.get_num_threads() == before


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is not None,
    reason="torch is installed; this checks the message without it",
)
def test_cuda_unavailable_is_reported(capsys):
    assert bench.main(["--cuda"]) == 0
    assert "unavailable" in capsys.readouterr().out
