"""Reliability: threads, set_num_threads under load, fork, memory growth, reference leaks on
errors, peak memory of softmax with out=, unaligned / big-endian inputs and a > 2**31 element
array (slow).

Every function family is exercised when ``stablelse`` has it (the losses, the LogSumExp
accumulator); absent ones are skipped with a reason. Nothing here
asserts on time: the timeouts only turn a deadlock into a failure.

Budgets (environment):
    STABLELSE_LEAK_CALLS   calls per function in the RSS test (default 100000)
    STABLELSE_PEAK_MIB     input size of the peak-memory test (default 64; recorded: 1024)
"""

import gc
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import stablelse as sl

psutil = pytest.importorskip("psutil")

LEAK_CALLS = int(os.environ.get("STABLELSE_LEAK_CALLS", "100000"))
PEAK_MIB = int(os.environ.get("STABLELSE_PEAK_MIB", "64"))


def _need(name):
    f = getattr(sl, name, None)
    if f is None:
        pytest.skip(reason=f"stablelse.{name} is not in this build")
    return f


def _rss():
    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------- call table


def _inputs(rng):
    x = (rng.standard_normal((64, 300)) * 8).astype(np.float32)
    x64 = rng.standard_normal((33, 7, 40)) * 30
    long_row = (rng.standard_normal(200_000) * 5).astype(np.float32)  # blocked, parallel
    t = rng.integers(0, 300, size=64)
    t[::7] = -100
    probs = sl.softmax(rng.standard_normal((64, 300)), axis=1).astype(np.float32)
    return x, x64, long_row, t, probs


def call_table(rng):
    """``name -> (callable, family)`` over shared read-only inputs; each call returns arrays."""
    x, x64, long_row, t, probs = _inputs(rng)
    w = np.linspace(0.5, 2.0, 300).astype(np.float32)
    calls = {
        "logsumexp rows": lambda: sl.logsumexp(x, axis=1),
        "logsumexp cols": lambda: sl.logsumexp(x, axis=0),
        "logsumexp tuple": lambda: sl.logsumexp(x64, axis=(0, 2), keepdims=True),
        "logsumexp b sign": lambda: sl.logsumexp(x64, axis=1, b=x64[0] > 0, return_sign=True),
        "logsumexp long": lambda: sl.logsumexp(long_row),
        "softmax rows": lambda: sl.softmax(x, axis=1),
        "softmax cols F": lambda: sl.softmax(np.asfortranarray(x64[0]), axis=0),
        "softmax long": lambda: sl.softmax(long_row),
        "log_softmax": lambda: sl.log_softmax(x64, axis=-1),
        "log_softmax online": lambda: sl.log_softmax(x, axis=1, algorithm="online"),
    }
    if hasattr(sl, "cross_entropy"):
        calls["cross_entropy grad"] = lambda: sl.cross_entropy(
            x, t, weight=w, label_smoothing=0.1, return_grad=True
        )
        calls["cross_entropy probs"] = lambda: sl.cross_entropy(x, probs, reduction="none")
        calls["cross_entropy axis0"] = lambda: sl.cross_entropy(x.T, t, axis=0, reduction="sum")
    if hasattr(sl, "nll_loss"):
        lp = sl.log_softmax(x, axis=1)
        calls["nll_loss"] = lambda: sl.nll_loss(lp, t, reduction="none")
    if hasattr(sl, "softmax_backward"):
        y, dy = sl.softmax(x, axis=1), x / 10
        calls["softmax_backward"] = lambda: sl.softmax_backward(y, dy)
    if hasattr(sl, "log_softmax_backward"):
        ly = sl.log_softmax(x, axis=1)
        calls["log_softmax_backward"] = lambda: sl.log_softmax_backward(ly, x / 10)
    if hasattr(sl, "LogSumExp"):
        parts = np.array_split(x, 4, axis=0)

        def stream():
            acc = sl.LogSumExp(axis=0)
            for p in parts:
                acc.update(p)
            return acc.result()

        calls["LogSumExp"] = stream
    return calls


def _bits(res):
    if isinstance(res, tuple):
        return tuple(_bits(r) for r in res)
    a = np.ascontiguousarray(res)
    return a.dtype.str, a.shape, a.tobytes()


# --------------------------------------------------------------------------- threads


def test_sixteen_threads_call_every_function_concurrently(rng):
    calls = call_table(rng)
    want = {name: _bits(f()) for name, f in calls.items()}
    names = list(calls)
    barrier = threading.Barrier(16)
    errors = []

    def work(k):
        try:
            barrier.wait(timeout=60)
            for i in range(12):
                name = names[(k + i) % len(names)]
                got = _bits(calls[name]())
                if got != want[name]:
                    errors.append(f"thread {k}: {name} differs from the single-threaded result")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread deadlocked"
    assert not errors, errors[:5]


def test_set_num_threads_while_other_threads_compute(rng):
    calls = call_table(rng)
    want = {name: _bits(f()) for name, f in calls.items()}
    names = list(calls)
    stop = threading.Event()
    errors = []
    done = []

    def work(k):
        try:
            i = 0
            while not stop.is_set() or i < len(names):
                name = names[(k + i) % len(names)]
                if _bits(calls[name]()) != want[name]:
                    errors.append(f"{name} changed while the pool was resized")
                i += 1
            done.append(i)
        except Exception as exc:  # pragma: no cover
            errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for th in workers:
        th.start()
    try:
        for n in [1, 3, 2, 0, 4, 1, 0] * 5:
            sl.set_num_threads(n)
            assert sl.get_num_threads() >= 1
            sl.logsumexp(np.ones(300_000, np.float32))  # rebuild the pool under load
    finally:
        stop.set()
        for th in workers:
            th.join(timeout=300)
        sl.set_num_threads(0)
    assert not any(th.is_alive() for th in workers), "a worker deadlocked"
    assert not errors, errors[:5]
    assert len(done) == len(workers)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_while_other_threads_use_the_pool(rng):
    # The parent's pool is busy in other threads at the moment of fork; the child gets none of
    # those threads and must build its own pool instead of waiting on the copied one.
    x = rng.standard_normal((512, 2048)).astype(np.float32)
    want = _bits(sl.softmax(x, axis=1))
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sl.softmax(x, axis=1)

    spinners = [threading.Thread(target=spin) for _ in range(3)]
    for th in spinners:
        th.start()
    try:
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:  # child: compute, compare, exit without running pytest's teardown
                try:
                    ok = _bits(sl.softmax(x, axis=1)) == want
                    ok &= np.isfinite(sl.logsumexp(np.ones(400_000, np.float32)))
                    os._exit(0 if ok else 3)
                except BaseException:
                    os._exit(4)
            pids.append(pid)
        statuses = [_wait_or_kill(pid, 120) for pid in pids]
    finally:
        stop.set()
        for th in spinners:
            th.join()
    assert statuses == [0, 0, 0], f"child exit statuses {statuses} (-9: deadlocked, killed)"


def _wait_or_kill(pid, timeout_s):
    """The child's exit code, or -9 after killing it when it has not exited in timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9


# --------------------------------------------------------------------------- memory


def _small_calls():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]], dtype=np.float32)
    x64 = x.astype(np.float64)
    out = np.empty_like(x)
    t = np.array([0, 2])
    calls = {
        "logsumexp": lambda: sl.logsumexp(x, axis=1),
        "logsumexp general": lambda: sl.logsumexp(x64, axis=0, b=x64, return_sign=True),
        "softmax": lambda: sl.softmax(x, axis=-1),
        "softmax out": lambda: sl.softmax(x64.T, axis=0, out=np.empty((3, 2))),
        "log_softmax": lambda: sl.log_softmax(x, axis=1, out=out),
    }
    if hasattr(sl, "cross_entropy"):
        calls["cross_entropy"] = lambda: sl.cross_entropy(x, t, return_grad=True)
    if hasattr(sl, "nll_loss"):
        calls["nll_loss"] = lambda: sl.nll_loss(x, t)
    if hasattr(sl, "softmax_backward"):
        calls["softmax_backward"] = lambda: sl.softmax_backward(x, x)
    if hasattr(sl, "log_softmax_backward"):
        calls["log_softmax_backward"] = lambda: sl.log_softmax_backward(x, x)
    if hasattr(sl, "LogSumExp"):
        calls["LogSumExp"] = lambda: sl.LogSumExp(axis=1).update(x).result()
    return calls


def _growth(f, n, warm=2000):
    for _ in range(warm):
        f()
    gc.collect()
    before = _rss()
    for _ in range(n):
        f()
    gc.collect()
    return before, _rss()


def test_rss_does_not_grow_over_many_small_calls(capsys):
    # A leak of one small array (~100 bytes) per call is 10 MB over 100,000 calls.
    report = []
    for name, f in _small_calls().items():
        before, after = _growth(f, LEAK_CALLS)
        report.append(
            f"{name}: {LEAK_CALLS} calls, RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
        )
        assert after - before < 4 * 2**20 + LEAK_CALLS * 8, report[-1]
    with capsys.disabled():
        print("\n" + "\n".join(report))


def test_rss_does_not_grow_over_medium_calls(rng, capsys):
    # Each call allocates about 1 MiB; 200 leaked results would be 200 MiB.
    calls = call_table(rng)
    report = []
    for name, f in calls.items():
        before, after = _growth(f, 200, warm=20)
        report.append(f"{name}: 200 calls, RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
        assert after - before < 24 * 2**20, report[-1]
    with capsys.disabled():
        print("\n" + "\n".join(report))


def _failing_calls():
    """Calls that fail after validation has started: each must drop every temporary."""
    x = np.ones((256, 1024), dtype=np.float32)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    fails = {
        "softmax read-only out": lambda: sl.softmax(x, axis=1, out=ro),
        "softmax overlapping out": lambda: sl.softmax(x[:, 1:], axis=1, out=x[:, :-1]),
        "logsumexp b shape": lambda: sl.logsumexp(x, axis=1, b=np.ones(3)),
        "log_softmax bad axis": lambda: sl.log_softmax(x, axis=(0, 5)),
        "logsumexp complex b shape": lambda: sl.logsumexp(x + 0j, axis=1, b=np.ones(3)),
    }
    if hasattr(sl, "cross_entropy"):
        t = np.zeros(256, dtype=np.int64)
        t[-1] = 5000  # out of range, found late (after the loss buffers exist)
        fails["cross_entropy bad target"] = lambda: sl.cross_entropy(x, t, return_grad=True)
        fails["nll_loss bad target"] = lambda: sl.nll_loss(x, t)
    if hasattr(sl, "softmax_backward"):
        fails["softmax_backward shape"] = lambda: sl.softmax_backward(x, x[:, :3])
    return x, fails


def test_no_leak_when_a_call_raises():
    x, fails = _failing_calls()
    for name, f in fails.items():
        refs = sys.getrefcount(x)

        def g(f=f, name=name):
            try:
                f()
            except (ValueError, TypeError, IndexError):
                return
            raise AssertionError(f"{name} did not raise")

        before, after = _growth(g, 300, warm=20)
        assert sys.getrefcount(x) == refs, f"{name} leaks references to its input"
        # One leaked 1 MiB buffer per call would be 300 MiB.
        assert after - before < 24 * 2**20, f"{name}: RSS {before} -> {after}"


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import stablelse as sl

    mib, dtype, axis, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    n_cols = 4096
    rows = mib * 2**20 // (np.dtype(dtype).itemsize * n_cols)
    x = np.empty((rows, n_cols), dtype=dtype)
    for i in range(0, rows, 256):  # touch every page, in pieces
        x[i : i + 256] = np.linspace(-20, 20, n_cols, dtype=dtype)
    out = x if mode == "inplace" else np.zeros_like(x) if mode == "out" else None
    sl.softmax(x[:4], axis=axis, out=None if out is None else out[:4])  # load code, pool
    def hwm():
        # VmHWM: this process's peak RSS. (getrusage's ru_maxrss survives exec, so in a child
        # of a big pytest process it starts at the parent's size and hides the call's peak.)
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = hwm()
    res = sl.softmax(x, axis=axis, out=out)
    after = hwm()
    assert out is None or res is out
    assert abs(float(res.sum(dtype=np.float64)) - (rows if axis else n_cols)) < 1e-2 * rows
    r = {"input": x.nbytes, "before": before, "after": after, "extra": after - before}
    print(json.dumps(r))
    """
)


@pytest.mark.parametrize(
    "dtype,axis,mode",
    [
        ("float32", 1, "out"),
        ("float32", 1, "inplace"),
        ("float64", 0, "out"),
        ("float32", 0, "inplace"),
        ("float32", 1, "none"),
    ],
)
@pytest.mark.skipif(sys.platform == "win32", reason="reads peak RSS from /proc or resource")
def test_softmax_with_out_peak_memory_is_input_plus_output(dtype, axis, mode, tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(PEAK_MIB), dtype, str(axis), mode],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    r = json.loads(proc.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(
            f"\nsoftmax {dtype} axis={axis} {mode}: input {r['input'] / 2**20:.0f} MiB, peak RSS "
            f"{r['before'] / 2**20:.1f} -> {r['after'] / 2**20:.1f} MiB (+{r['extra'] / 2**20:.2f})"
        )
    if mode == "none":
        # The measurement sees a new result array: it would see a copy too.
        assert r["extra"] > 0.9 * r["input"], r
        return
    # The high-water mark already holds x and out; the call may add small per-thread buffers
    # but no copy of either (that would be +100% of the input).
    assert r["extra"] < 0.02 * r["input"] + 8 * 2**20, r


# --------------------------------------------------------------------------- layouts


def _unaligned(a):
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    u = raw[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_and_big_endian_large_inputs(rng, dtype):
    # Large enough that the kernels run in parallel pieces and long rows are blocked.
    x = (rng.standard_normal((3, 150_000)) * 10).astype(dtype)
    variants = {
        "unaligned": _unaligned(x),
        "big-endian": x.astype(np.dtype(dtype).newbyteorder(">")),
        "unaligned big-endian": _unaligned(x.astype(np.dtype(dtype).newbyteorder(">"))),
    }
    fns = [
        lambda v: sl.logsumexp(v, axis=1),
        lambda v: sl.logsumexp(v, axis=0),
        lambda v: sl.softmax(v, axis=1),
        lambda v: sl.log_softmax(v, axis=0),
        lambda v: sl.logsumexp(v, axis=1, b=v[0] > 0),
    ]
    if hasattr(sl, "cross_entropy"):
        t = np.array([0, 7, 149_999])
        fns.append(lambda v: sl.cross_entropy(v, t, return_grad=True))
    if hasattr(sl, "softmax_backward"):
        fns.append(lambda v: sl.softmax_backward(v, v))
    for f in fns:
        want = _bits(f(x))
        for name, v in variants.items():
            assert _bits(f(v)) == want, name


# --------------------------------------------------------------------------- > 2**31 elements

BIG_N = 2**31 + 17
CHUNK = 2**25


def _fill(x):
    """A deterministic pattern in [-8, 8) with the maximum in the last 17 elements, where a
    32-bit index would wrap around."""
    for s in range(0, x.size, CHUNK):
        i = np.arange(s, min(s + CHUNK, x.size), dtype=np.int64)
        x[s : s + i.size] = ((i * 2654435761) % 65536).astype(np.float32) / 4096 - 8
    x[-17:] = np.linspace(10, 12, 17, dtype=np.float32)


def _lse_chunked(x):
    m = max(float(x[s : s + CHUNK].max()) for s in range(0, x.size, CHUNK))
    total = 0.0
    for s in range(0, x.size, CHUNK):
        total += float(np.exp(x[s : s + CHUNK].astype(np.float64) - m).sum())
    return m + np.log(total)


@pytest.mark.slow
def test_more_than_2_to_the_31_elements(capsys):
    if psutil.virtual_memory().available < 10 * 2**30:
        pytest.skip(reason="needs 10 GiB of free memory for an 8 GiB float32 array")
    x = np.empty(BIG_N, dtype=np.float32)
    _fill(x)
    want = _lse_chunked(x)
    got = sl.logsumexp(x)
    assert abs(float(got) - want) <= 2 * np.spacing(np.float32(want)), (float(got), want)
    # The same elements as 7705 rows of 278713: row and column offsets pass 2**31.
    if BIG_N % 7705 == 0:  # 2**31 + 17 = 5 * 23 * 67 * 109 * 2557
        x2 = x.reshape(7705, BIG_N // 7705)
        rows = sl.logsumexp(x2, axis=1)
        cols = sl.logsumexp(x2, axis=0)
        m_rows, s_rows = x2.max(axis=1).astype(np.float64), np.zeros(x2.shape[0])
        m_cols, s_cols = x2.max(axis=0).astype(np.float64), np.zeros(x2.shape[1])
        for r in range(0, x2.shape[0], 64):
            blk = x2[r : r + 64].astype(np.float64)
            s_rows[r : r + 64] = np.exp(blk - m_rows[r : r + 64, None]).sum(axis=1)
            s_cols += np.exp(blk - m_cols).sum(axis=0)
        for got2, want2 in [(rows, m_rows + np.log(s_rows)), (cols, m_cols + np.log(s_cols))]:
            err = np.abs(got2.astype(np.float64) - want2)
            assert np.all(err <= 2 * np.spacing(np.abs(want2).astype(np.float32))), err.max()
    probe = np.r_[0, 12345, 2**31 - 1, 2**31, 2**31 + 5, BIG_N - 18, BIG_N - 17 : BIG_N]
    probe = np.unique(probe[probe < BIG_N])
    before = x[probe].astype(np.float64)
    res = sl.softmax(x, out=x)  # in place: no second 8 GiB array
    assert res is x
    np.testing.assert_allclose(x[probe], np.exp(before - want), rtol=4e-7, atol=1e-44)
    total = sum(float(x[s : s + CHUNK].sum(dtype=np.float64)) for s in range(0, x.size, CHUNK))
    assert abs(total - 1.0) < 1e-5, total
    with capsys.disabled():
        print(f"\n2**31+17 float32: logsumexp {float(got)!r} (ref {want!r}), softmax sum {total!r}")
