"""Smoke tests of ``python -m stablelse bench``: it runs on tiny sizes and writes well-formed
JSON. Nothing here asserts on a timing."""

import importlib.util
import json
import math

import pytest

from stablelse import _bench


def _finite_or_none(v):
    return v is None or (isinstance(v, (int, float)) and math.isfinite(v))


def test_quick_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert _bench.main(["--quick", "--no-progress", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert {"machine", "libraries", "ceilings", "results"} <= doc.keys()
    assert doc["ceilings"]["read_gbps"] > 0 and doc["ceilings"]["read_write_gbps"] > 0
    assert len(doc["results"]) == len(_bench.DESIGN_WORKLOADS)
    for row in doc["results"]:
        assert row["bytes_read"] > 0 and row["bytes_written"] > 0
        for name, entry in row["libraries"].items():
            assert name in _bench.LIBRARIES
            if "seconds" in entry:
                assert entry["seconds"] > 0 and entry["gbps"] > 0
            else:
                assert entry["error"]
        assert all(_finite_or_none(v) for v in row.get("speedup", {}).values())
    lse = doc["results"][0]["libraries"]["stablelse"]
    assert lse["gbps"] > 0 and 0 < lse["fraction_of_ceiling"]
    out = capsys.readouterr().out
    assert "DRAM ceiling" in out and "| logsumexp" in out


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
        "--probe-bytes",
        str(1 << 20),
    ]
    assert _bench.main(argv) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [r["workload"] for r in doc["results"]] == ["softmax 16x128", "logsumexp 1x4096"]
    assert "DRAM ceiling" in captured.err


def test_accuracy_quick(tmp_path):
    path = tmp_path / "acc.json"
    assert _bench.main(["--accuracy", "--quick", "--no-progress", "--json", str(path)]) == 0
    acc = json.loads(path.read_text())["accuracy"]
    ours = acc["stablelse"]
    for what in ("logsumexp", "log_softmax"):
        assert set(ours[what]) >= {"normal", "[1000, 1, -1000]", "max"}
        assert all(v is None or v >= 0 for v in ours[what].values())


def test_plot_quick(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    argv = [
        "--quick",
        "--no-progress",
        "--reps",
        "1",
        "--libraries",
        "stablelse,numpy",
        "--only",
        "logsumexp",
        "--plot",
        str(png),
    ]
    assert _bench.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments():
    with pytest.raises(SystemExit):
        _bench.main(["--workload", "softmax:abc"])
    assert _bench.main(["--libraries", "numpy"]) == 2


@pytest.mark.skipif(
    importlib.util.find_spec("stablelse._bench_cuda") is not None,
    reason="the CUDA benchmark is installed; this checks the message without it",
)
def test_cuda_unavailable_is_reported(capsys):
    assert _bench.main(["--cuda"]) == 0
    assert "unavailable" in capsys.readouterr().out
