"""The default thread count and the SIMD level as set by the environment, in fresh processes.

Order: STABLELSE_NUM_THREADS, RAYON_NUM_THREADS, OMP_NUM_THREADS (Dask's nanny sets it to 1 in
each worker), else the CPUs this process may run on. A value stablelse cannot use warns once,
with a RuntimeWarning naming the variable, instead of being ignored in silence.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

import stablelse

THREAD_VARS = ("STABLELSE_NUM_THREADS", "RAYON_NUM_THREADS", "OMP_NUM_THREADS")

# Prints the thread count, the SIMD level and every warning raised by the import.
_CHILD = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import stablelse
print(json.dumps({
    "threads": stablelse.get_num_threads(),
    "simd": stablelse.info()["simd"],
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
}))
"""


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_child(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and k != "STABLELSE_SIMD"}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=full, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    ("env", "threads"),
    [
        ({"STABLELSE_NUM_THREADS": "3", "RAYON_NUM_THREADS": "5", "OMP_NUM_THREADS": "1"}, 3),
        ({"RAYON_NUM_THREADS": "5", "OMP_NUM_THREADS": "1"}, 5),
        ({"OMP_NUM_THREADS": "1"}, 1),
        ({"OMP_NUM_THREADS": "3,2"}, 3),  # OpenMP's nested list: the outer level
        ({"STABLELSE_NUM_THREADS": "", "OMP_NUM_THREADS": "2"}, 2),  # empty = not set
        ({"STABLELSE_NUM_THREADS": "0", "OMP_NUM_THREADS": "2"}, 2),  # 0 = the default
        ({"STABLELSE_NUM_THREADS": "5000"}, 1024),  # clamped, as set_num_threads
    ],
)
def test_default_thread_count_follows_the_environment(env, threads):
    got = run_child(**env)
    assert got["threads"] == threads
    assert got["warnings"] == []


def test_without_variables_the_default_is_the_cpus_we_may_run_on():
    # The affinity mask, lowered further by a cgroup CPU quota where one is set.
    assert 1 <= run_child()["threads"] <= _cpus()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API")
def test_the_default_counts_the_affinity_mask_not_the_machine():
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " + _CHILD
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    assert json.loads(out.stdout)["threads"] == 1


@pytest.mark.parametrize(
    ("env", "var", "threads"),
    [
        ({"STABLELSE_NUM_THREADS": "abc"}, "STABLELSE_NUM_THREADS", None),
        ({"STABLELSE_NUM_THREADS": "-1", "OMP_NUM_THREADS": "1"}, "STABLELSE_NUM_THREADS", 1),
        ({"RAYON_NUM_THREADS": "2.5"}, "RAYON_NUM_THREADS", None),
        ({"OMP_NUM_THREADS": "many"}, "OMP_NUM_THREADS", None),
    ],
)
def test_a_bad_thread_count_warns_once_naming_the_variable(env, var, threads):
    got = run_child(**env)
    if threads is not None:
        assert got["threads"] == threads
    assert len(got["warnings"]) == 1, got["warnings"]
    category, message = got["warnings"][0]
    assert category == "RuntimeWarning"
    assert f'{var}="{env[var]}"' in message
    assert f"using {got['threads']} thread" in message


def test_a_bogus_simd_level_warns_and_the_best_level_is_used():
    best = stablelse._core.available_simd_levels()[-1]
    got = run_child(STABLELSE_SIMD="bogus")
    assert got["simd"] == best
    assert [c for c, _ in got["warnings"]] == ["RuntimeWarning"]
    assert 'STABLELSE_SIMD="bogus"' in got["warnings"][0][1]
    assert f"using {best}" in got["warnings"][0][1]


def test_a_simd_level_this_cpu_lacks_warns():
    levels = set(stablelse._core.available_simd_levels())
    missing = next(lv for lv in ("neon", "avx512", "avx2") if lv not in levels)
    got = run_child(STABLELSE_SIMD=missing)
    assert got["simd"] == stablelse._core.available_simd_levels()[-1]
    assert len(got["warnings"]) == 1
    assert f'STABLELSE_SIMD="{missing}"' in got["warnings"][0][1]
    assert "lacks" in got["warnings"][0][1]


def test_usable_simd_levels_do_not_warn():
    for level in stablelse._core.available_simd_levels():
        got = run_child(STABLELSE_SIMD=level)
        assert (got["simd"], got["warnings"]) == (level, [])
    assert run_child(STABLELSE_SIMD="")["warnings"] == []


def _worker_threads() -> int:
    import stablelse as sl

    return sl.get_num_threads()


def test_dask_worker_processes_run_one_stablelse_thread_each():
    """Dask's nanny sets OMP_NUM_THREADS=1 in each worker process: stablelse follows it, so
    n workers on n cores do not run n * n threads."""
    distributed = pytest.importorskip("distributed")
    env_before = {k: os.environ.pop(k) for k in THREAD_VARS if k in os.environ}
    try:
        cluster = distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        with cluster, distributed.Client(cluster) as client:
            per_worker = client.run(_worker_threads)
    finally:
        os.environ.update(env_before)
    assert len(per_worker) == 2
    assert set(per_worker.values()) == {1}, per_worker
