"""Buffers as NumPy treats them: shared between threads, inherited by a fork, allocated under
a memory limit, and ``out=`` of any writeable layout (in place on any view).

NumPy's contract is the oracle: threads that share a buffer race on its values but nothing
raises; a forked child uses every array; an allocation that fails is a ``MemoryError`` and
the process goes on; overlap is decided by element (``np.shares_memory``).
"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import scipy.special as sp
from test_api import layouts

import stablelse as sl
from stablelse import _core


def _run_child(code, timeout=240):
    """Runs `code` in a fresh interpreter; returns (returncode, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- threads, fork


def test_threads_sharing_a_buffer_raise_nothing():
    """One thread writes softmax(x, out=buf) while others read buf (also as complex, by
    segments and by the Dask block function): values race, nothing raises (the numpy crate's
    borrow flags raised PanicException and ValueError here)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 513)).astype(np.float32)
    buf = sl.softmax(x, axis=1)
    t = rng.integers(0, 513, size=64)
    # A second buffer, written by softmax and by the segment binding, that other threads read
    # as complex64 (the same memory), by segments and by the Dask block function.
    x2 = rng.standard_normal((64, 514)).astype(np.float32)
    buf2 = sl.softmax(x2, axis=1)
    cbuf = buf2.view(np.complex64)
    ids = np.repeat(np.arange(8), 8)
    flat_ids = np.repeat(np.arange(64), 514)
    mx, ex = _core.lse_states(x2, (1,))
    stop = threading.Event()
    errors = []

    def guard(f):
        def run():
            try:
                while not stop.is_set():
                    f()
            except BaseException as exc:  # noqa: BLE001 - PanicException is a BaseException
                errors.append(f"{type(exc).__name__}: {exc}")

        return run

    def stream():
        acc = sl.LogSumExp(axis=1)
        acc.update(buf)
        acc.result()

    workers = [
        guard(lambda: sl.softmax(x, axis=1, out=buf)),
        guard(lambda: sl.log_softmax(x, axis=1, out=buf)),
        guard(lambda: sl.logsumexp(buf, axis=1)),
        guard(lambda: sl.softmax(buf, axis=0)),
        guard(lambda: sl.cross_entropy(buf, t)),
        guard(stream),
        guard(lambda: sl.softmax(x2, axis=1, out=buf2)),
        guard(lambda: _core.segment_softmax(x2, buf2, segment_ids=ids, num_segments=8)),
        guard(lambda: sl.logsumexp(cbuf, axis=1)),
        guard(lambda: sl.softmax(cbuf, axis=1)),
        guard(lambda: sl.log_softmax(cbuf, axis=0)),
        guard(lambda: sl.segment_logsumexp(buf2, ids, 8)),
        guard(lambda: sl.segment_softmax(buf2, ids, 8)),
        guard(lambda: sl.segment_cross_entropy(buf2.reshape(-1), flat_ids, t, return_grad=True)),
        guard(lambda: _core.softmax_from_states(buf2, mx, ex, True)),
    ]
    threads = [threading.Thread(target=w) for w in workers]
    for th in threads:
        th.start()
    threading.Event().wait(1.5)
    stop.set()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors[:5]


def test_fork_while_another_thread_is_inside_a_call():
    """A child forked while a thread of the parent is inside a call uses the same arrays
    (borrow flags inherited from the parent made them 'already borrowed' forever)."""
    if not hasattr(os, "fork"):
        pytest.skip(reason="no os.fork on this platform")
    code = """
        import os, threading, numpy as np, stablelse as sl
        x = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
        buf = np.empty_like(x)
        inside = threading.Event()
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                inside.set()
                sl.softmax(x, axis=1, out=buf)
                sl.logsumexp(buf, axis=0)

        th = threading.Thread(target=busy, daemon=True)
        th.start()
        inside.wait()
        codes = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                try:
                    sl.softmax(x, axis=1, out=buf)
                    sl.softmax(buf, axis=1, out=buf)
                    sl.logsumexp(buf, axis=1)
                    sl.logsumexp(x)
                    os._exit(0)
                except BaseException as exc:
                    print(type(exc).__name__, exc, flush=True)
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
        stop.set()
        th.join()
        print("OK" if codes == [0] * 5 else f"child exit codes {codes}")
    """
    rc, out = _run_child(code)
    assert rc == 0 and "OK" in out, out[-2000:]


@pytest.mark.parametrize("n", [10, 33, 1000])
def test_target_changed_by_another_thread_cannot_index_out_of_bounds(n):
    """Dense targets are read in place: a target rewritten during the call gives IndexError
    (validation) or a changed result, never PanicException(index out of bounds) or a crash,
    on every path (short rows, the fused short-row loss, kept exps, where=)."""
    rng = np.random.default_rng(1)
    rows = 4096 if n < 1000 else 256
    x = rng.standard_normal((rows, n)).astype(np.float32)
    t = rng.integers(0, n, size=rows)
    where = np.ones(n, dtype=bool)
    stop = threading.Event()
    errors = []

    def flip():
        bad = np.full_like(t, 10**9)
        good = t.copy()
        while not stop.is_set():
            t[:] = bad
            t[:] = good

    th = threading.Thread(target=flip)
    th.start()
    try:
        for _ in range(100):
            for call in (
                lambda: sl.cross_entropy(x, t, return_grad=True),
                lambda: sl.cross_entropy(x, t, reduction="none"),
                lambda: sl.cross_entropy(x, t, where=where, return_grad=True),
                lambda: sl.nll_loss(x, t),
            ):
                try:
                    call()
                except IndexError:
                    pass
                except BaseException as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()
        th.join()
    assert not errors, errors[:3]


# --------------------------------------------------------------------------- memory


def test_every_function_under_a_memory_limit_raises_memory_error():
    """Under RLIMIT_AS every public function raises MemoryError (no PanicException from a
    null PyObject, no abort from a Vec) and the process stays usable; in-place softmax over
    the leading axis needs no input-sized buffer and succeeds."""
    resource = pytest.importorskip("resource")
    del resource
    code = """
        import resource, numpy as np, stablelse as sl
        from stablelse import _core
        n = 1 << 24
        x = np.zeros((2, n), dtype=np.float32)          # 128 MiB
        t = np.zeros(n, dtype=np.int64)                 # for losses over axis 0 (classes = 2)
        small = np.arange(12.0).reshape(3, 4)
        xc = x.view(np.complex64)                       # (2, n / 2), the same memory
        mx, ex = np.zeros(2), np.zeros(2)               # states of x's two rows
        sl.softmax(small, axis=1)                       # the pool exists before the limit
        sl.softmax(np.zeros((4, 1 << 16), np.float32), axis=1)
        with open("/proc/self/status") as f:
            vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize")][0]
        limit = vm + (48 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        calls = {
            "softmax": lambda: sl.softmax(x, axis=1),
            "log_softmax": lambda: sl.log_softmax(x, axis=0),
            "logsumexp": lambda: sl.logsumexp(x, axis=0),
            "cross_entropy grad": lambda: sl.cross_entropy(x, t, axis=0, return_grad=True),
            "cross_entropy none": lambda: sl.cross_entropy(x, t, axis=0, reduction="none"),
            "nll_loss": lambda: sl.nll_loss(x, t, axis=0, reduction="none"),
            "softmax_backward": lambda: sl.softmax_backward(x, x, axis=0),
            "log_softmax_backward": lambda: sl.log_softmax_backward(x, x, axis=1),
            "LogSumExp.update": lambda: sl.LogSumExp(axis=0).update(x),
            "complex logsumexp": lambda: sl.logsumexp(xc, axis=0),
            "complex softmax": lambda: sl.softmax(xc, axis=1),
            "complex log_softmax": lambda: sl.log_softmax(xc, axis=1),
            "segment_logsumexp": lambda: sl.segment_logsumexp(x, [0, 1], 2),
            "segment_softmax": lambda: sl.segment_softmax(x, [0, 1], 2),
            "segment_cross_entropy": lambda: sl.segment_cross_entropy(
                x.reshape(-1), offsets=[0, n, 2 * n], target=[0, 0], return_grad=True
            ),
            "softmax_from_states": lambda: _core.softmax_from_states(x, mx, ex),
        }
        for name, f in calls.items():
            try:
                f()
            except MemoryError:
                pass
            else:
                print("no MemoryError from", name)
            assert sl.softmax(small, axis=1).shape == (3, 4), name
        sl.softmax(x, axis=0, out=x)                    # in place: block-sized scratch only
        assert np.allclose(x[:, :8], 0.5)
        sl.log_softmax(x, axis=0, out=x)
        print("OK")
    """
    rc, out = _run_child(code)
    assert rc == 0 and "OK" in out, out[-3000:]
    assert "no MemoryError" not in out, out


def test_in_place_softmax_over_the_leading_axis_adds_no_input_sized_buffer():
    """(2, 2**24) float32 in place over axis 0 added ~321 MiB of float64 temporaries."""
    code = """
        import resource, numpy as np, stablelse as sl
        x = np.random.default_rng(0).standard_normal((2, 1 << 24)).astype(np.float32)
        sl.softmax(np.zeros((2, 1 << 16), np.float32), axis=0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sl.softmax(x, axis=0, out=x)
        sl.log_softmax(x, axis=0, out=x)
        y = x[:, ::2]
        sl.softmax(y, axis=0, out=y)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print("GROWN_KIB", grown)
    """
    rc, out = _run_child(code)
    assert rc == 0, out[-2000:]
    grown = int(out.split("GROWN_KIB")[1].split()[0])
    assert grown < 24 * 1024, f"peak RSS grew by {grown} KiB for a 128 MiB input"


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_leading_axis_of_slabs_wider_than_a_stripe_matches_scipy(fn):
    """Lanes of 512 elements in slabs 32808 wide: the column kernel takes them directly, a
    stripe of 32768 columns at a time; the columns on both sides of the stripe's edge and
    the last ones agree with scipy in float64, out of place and in place."""
    x = np.random.default_rng(5).standard_normal((512, 32768 + 40)).astype(np.float32) * 8
    cols = np.r_[0:8, 32760:32776, x.shape[1] - 8 : x.shape[1]]
    want = getattr(sp, fn)(x[:, cols].astype(np.float64), axis=0).astype(np.float32)
    got = getattr(sl, fn)(x, axis=0)
    np.testing.assert_allclose(got[:, cols], want, rtol=3e-7, atol=1e-37)
    getattr(sl, fn)(x, axis=0, out=x)
    np.testing.assert_array_equal(x, got)


# --------------------------------------------------------------------------- out= arguments


def test_empty_out_is_accepted():
    """An empty out (NumPy gives empty arrays zero strides) is a valid output."""
    for shape, axis, rshape in [((0, 3), 1, (0,)), ((3, 0), 0, (0,)), ((2, 0, 3), 2, (2, 0))]:
        for dtype in (np.float32, np.float64):
            x = np.empty(shape, dtype)
            for fn in (sl.softmax, sl.log_softmax):
                out = np.empty(shape, dtype)
                assert fn(x, axis=axis, out=out) is out
                assert fn(x, axis=axis, out=x) is x
            out = np.empty(rshape, dtype)
            assert sl.logsumexp(x, axis=axis, out=out) is out
    x = np.empty((0, 4))
    g = np.empty((0, 4))
    loss, grad = sl.cross_entropy(
        x, np.empty(0, np.int64), grad_out=g, return_grad=True, reduction="sum"
    )
    assert grad is g


def test_grad_out_errors_name_grad_out_and_unaligned_grad_out_works():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 7))
    t = rng.integers(0, 7, size=5)
    _, want = sl.cross_entropy(x, t, return_grad=True)
    raw = np.zeros(x.nbytes + 1, dtype=np.uint8)
    un = raw[1:].view(np.float64).reshape(x.shape)
    assert not un.flags.aligned
    _, got = sl.cross_entropy(x, t, grad_out=un, return_grad=True)
    assert got is un
    np.testing.assert_array_equal(un, want)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    bad = {
        "read-only": ro,
        "shape": np.empty((5, 6)),
        "dtype": np.empty(x.shape, np.float32),
        "zero stride": np.broadcast_to(np.empty(7), x.shape),
        "type": [[0.0] * 7] * 5,
    }
    for what, g in bad.items():
        with pytest.raises((ValueError, TypeError)) as info:
            sl.cross_entropy(x, t, grad_out=g, return_grad=True)
        assert "grad_out" in str(info.value), (what, str(info.value))


def test_out_sharing_no_element_with_a_strided_input_is_accepted():
    """out inside the input's address range but sharing no element (np.shares_memory is
    False) was refused."""
    b = np.random.default_rng(3).standard_normal((4, 12))
    x, out = b[:, ::2], b[:, 1::2]
    assert not np.shares_memory(x, out)
    keep = x.copy()
    for fn in ("softmax", "log_softmax"):
        getattr(sl, fn)(x, axis=1, out=out)
        np.testing.assert_allclose(out, getattr(sp, fn)(keep, axis=1), rtol=1e-13)
        np.testing.assert_array_equal(x, keep)
    lse_out = b[:, 1]
    sl.logsumexp(b[:, 2::2], axis=1, out=lse_out)
    np.testing.assert_allclose(lse_out, sp.logsumexp(b[:, 2::2], axis=1), rtol=1e-13)
    # A real overlap is still refused.
    with pytest.raises(ValueError, match="overlap"):
        sl.softmax(b[:, :6], axis=1, out=b[:, 1:7])
    with pytest.raises(ValueError, match="overlap"):
        sl.logsumexp(b, axis=1, out=b[:, 0])


def test_dense_out_in_the_gaps_of_a_row_pitched_input_is_accepted():
    """A dense logsumexp out lying in the gaps between a row-pitched input's rows (inside its
    address range, no element shared) was refused as "already borrowed"."""
    a = np.zeros((4, 16), np.float32)
    x = a[:, :8]
    x[...] = np.arange(32, dtype=np.float32).reshape(4, 8) / 7
    out = a[0, 8:12]
    assert not np.shares_memory(x, out)
    keep = x.copy()
    assert sl.logsumexp(x, axis=-1, out=out) is out
    np.testing.assert_allclose(out, sp.logsumexp(keep.astype(np.float64), axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(x, keep)


def test_zero_classes_with_the_class_axis_in_the_middle():
    """Lanes of no classes over many columns: the column path of the loss indexed past an
    empty slice (found by the fuzzer, seed 136238712)."""
    x = np.zeros((2, 0, 300), np.float32)
    t = np.full((2, 300), -100)
    assert np.isnan(sl.cross_entropy(x, t, axis=1))
    loss, grad = sl.cross_entropy(x, t, axis=1, reduction="none", return_grad=True)
    assert loss.shape == (2, 300) and grad.shape == x.shape
    assert sl.nll_loss(x, t, axis=1, reduction="sum") == 0.0
    assert sl.softmax_backward(x, x, axis=1).shape == x.shape


# --------------------------------------------------------------------------- layouts x out=


def _out_layouts(shape, dtype):
    """Writeable outputs of `shape` in every layout of the layout tests (zero-filled)."""
    return list(layouts(np.zeros(shape, dtype)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_every_layout_in_place_and_into_every_out_layout(dtype, fn):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 4, 7)) * 4).astype(dtype)
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    for axis in [None, 0, 1, 2, (0, 2), (1, 2)]:
        want = getattr(sp, fn)(x.astype(np.float64), axis=axis)
        atol = 4 * np.finfo(dtype).eps * np.abs(want).max()
        for name, v in layouts(x):
            v = v.copy() if name == "C" else v
            res = getattr(sl, fn)(v, axis=axis, out=v)
            assert res is v
            np.testing.assert_allclose(v, want, rtol=rtol, atol=atol, err_msg=f"{name} in place")
            v[...] = x
            for oname, out in _out_layouts(x.shape, dtype):
                res = getattr(sl, fn)(v, axis=axis, out=out)
                assert res is out
                np.testing.assert_allclose(
                    out, want, rtol=rtol, atol=atol, err_msg=f"{name} -> {oname}"
                )
                np.testing.assert_array_equal(v, x, err_msg=f"{name} input written")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsumexp_into_every_out_layout(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 4, 7)) * 4).astype(dtype)
    rtol = 2e-6 if dtype == np.float32 else 1e-13
    for axis, keepdims in [(0, False), (1, True), (2, False), ((0, 2), True), (None, True)]:
        want = sp.logsumexp(x.astype(np.float64), axis=axis, keepdims=keepdims)
        for name, v in layouts(x):
            for kind in ("C", "F", "strided", "negative", "unaligned"):
                big = np.zeros(tuple(2 * s for s in want.shape), dtype)
                rev = tuple(slice(None, None, -1) for _ in want.shape)
                out = {
                    "C": np.zeros(want.shape, dtype),
                    "F": np.asfortranarray(np.zeros(want.shape, dtype)),
                    "strided": big[tuple(slice(None, None, 2) for _ in want.shape)],
                    "negative": np.zeros(want.shape, dtype)[rev],
                    "unaligned": np.zeros(want.size * x.itemsize + 1, np.uint8)[1:]
                    .view(dtype)
                    .reshape(want.shape),
                }[kind]
                sl.logsumexp(v, axis=axis, keepdims=keepdims, out=out)
                np.testing.assert_allclose(out, want, rtol=rtol, err_msg=f"{name} -> {kind}")


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_in_place_on_views_whose_rows_are_not_adjacent(fn):
    """scikit-learn's softmax(X, copy=False) on slices: b[::2] and b[:, :3] in place."""
    for view in (lambda b: b[::2], lambda b: b[:, :3], lambda b: b[::-2, 1:]):
        b = np.arange(24.0).reshape(6, 4) / 7
        keep = b.copy()
        x = view(b)
        want = getattr(sp, fn)(x.copy(), axis=-1)
        assert getattr(sl, fn)(x, axis=-1, out=x) is x
        np.testing.assert_allclose(x, want, rtol=1e-13)
        # Elements outside the view are untouched.
        mask = np.ones(b.shape, bool)
        view(mask)[...] = False
        np.testing.assert_array_equal(b[mask], keep[mask])
