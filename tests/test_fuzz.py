"""The hypothesis fuzzer (tests/_fuzz_child.py) in a child process, and the regressions it found.

The child calls every public function with hostile inputs and checks each result against
scipy / a float64 torch reference, or that the error is a ValueError / TypeError / IndexError
naming an argument with `out` untouched. Running it in a subprocess turns a segfault, an abort
or a hang into a failure that prints the seed and the call in progress.

Budget: STABLELSE_FUZZ_EXAMPLES (default 300 here, about 10-30 s on 2 cores); the recorded run
uses 20,000 or more:  STABLELSE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py -k child
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stablelse as sl

CHILD = Path(__file__).with_name("_fuzz_child.py")


def test_fuzz_child_process(tmp_path):
    examples = int(os.environ.get("STABLELSE_FUZZ_EXAMPLES", "300"))
    env = dict(os.environ)
    env["STABLELSE_FUZZ_EXAMPLES"] = str(examples)
    env["STABLELSE_FUZZ_LAST"] = str(tmp_path / "last_call.txt")
    env.setdefault("PYTHONFAULTHANDLER", "1")
    timeout = max(300, examples // 10)
    try:
        proc = subprocess.run(
            [sys.executable, str(CHILD)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,  # import the installed stablelse, never a source tree
        )
    except subprocess.TimeoutExpired as exc:
        last_file = tmp_path / "last_call.txt"
        last = last_file.read_text() if last_file.exists() else ""
        pytest.fail(f"fuzz child hung (> {timeout} s); stdout:\n{exc.stdout}\nlast call:\n{last}")
    out = proc.stdout + proc.stderr
    print(proc.stdout[-3000:])
    if proc.returncode != 0:
        last_file = tmp_path / "last_call.txt"
        last = last_file.read_text() if last_file.exists() else "(none)"
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        pytest.fail(f"fuzz child failed ({how}); last call:\n{last}\noutput:\n{out[-12000:]}")
    assert "FUZZ done" in proc.stdout


# --------------------------------------------------------------------------- regressions
# Each of these failed before the fix that came with it (found by the fuzzer).


def test_keepdims_and_return_sign_accept_any_truth_value():
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(
        sl.logsumexp(x, axis=1, keepdims=1), sl.logsumexp(x, axis=1, keepdims=True)
    )
    assert sl.logsumexp(x, axis=1, keepdims=0).shape == (2,)
    assert sl.logsumexp(x, axis=1, keepdims=None).shape == (2,)
    assert sl.logsumexp(x, axis=1, keepdims=np.True_).shape == (2, 1)


@pytest.mark.parametrize("axis", [1, 0])
def test_a_subnormal_weight_sum_gives_the_mean_and_its_gradient(axis):
    # "mean" divides by the kept targets' weight sum D; D = 2.2e-309 has no finite 1 / D,
    # which gave inf or NaN where torch's division is finite. The mean and its gradient are
    # ratios of weights: the same with every weight times 2**64, where D is normal.
    x = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    t = np.array([0, 2, 1])
    w = np.array([2.2250738585e-309, 5.0, 1e-310])
    t[2] = 0
    xs = x if axis == 1 else np.ascontiguousarray(x.T)
    for ls in (0.0, 0.1):
        loss, g = sl.cross_entropy(xs, t, axis=axis, weight=w, label_smoothing=ls, return_grad=True)
        scaled = sl.cross_entropy(
            xs, t, axis=axis, weight=w * 2.0**64, label_smoothing=ls, return_grad=True
        )
        assert np.isfinite(loss) and np.isfinite(g).all()
        assert loss == scaled[0]
        np.testing.assert_array_equal(g, scaled[1])
    lp = np.log(sl.softmax(x, axis=1))
    d = w[t].sum()
    want = -(w[t] * lp[np.arange(3), t]).sum() / d
    np.testing.assert_allclose(sl.nll_loss(lp, t, weight=w), want, rtol=1e-15)
    np.testing.assert_allclose(sl.cross_entropy(x, t, weight=w), want, rtol=1e-15)
    # w * log 2 keeps a subnormal's fewer bits: log 2 to about 1e-15.
    got = sl.cross_entropy(np.zeros(2), 0, axis=0, weight=np.array([2.2e-309, 1.0]))
    np.testing.assert_allclose(got, np.log(2), rtol=1e-13)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_a_ragged_weight_is_refused_naming_it(fn):
    with pytest.raises(ValueError, match="weight is not a rectangular array"):
        getattr(sl, fn)(np.zeros((1, 2)), np.array([1]), weight=[[1.0], [1.0, 2.0]])


@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_unaligned_out_is_filled(fn):
    x = np.arange(12.0).reshape(3, 4)
    want = getattr(sl, fn)(x, axis=1)
    raw = np.zeros(want.nbytes + 1, dtype=np.uint8)
    out = raw[1:].view(np.float64).reshape(want.shape)
    assert not out.flags.aligned
    res = getattr(sl, fn)(x, axis=1, out=out)
    assert res is out
    np.testing.assert_array_equal(out, want)


def test_set_num_threads_errors_name_n():
    with pytest.raises(TypeError, match=r"\bn\b"):
        sl.set_num_threads(1.5)
    with pytest.raises(ValueError, match=r"\bn\b"):
        sl.set_num_threads(2**70)
    with pytest.raises(ValueError, match=r"\bn\b"):
        sl.set_num_threads(100_000)  # would hang building 100k threads
    assert sl.get_num_threads() >= 1


def test_weighted_result_dtype_follows_scipy():
    sp = pytest.importorskip("scipy.special")
    cases = [
        (np.arange(3, dtype=np.int8), np.ones(3, np.float32)),
        (np.arange(3, dtype=np.float32), np.array([True, False, True])),
        (np.arange(3, dtype=np.float32), np.ones(3, np.int8)),
        (np.arange(3, dtype=np.float16), np.ones(3, np.float16)),
        (np.arange(3, dtype=np.float32), np.ones(3, np.int64)),
        (np.arange(3, dtype=np.int64), np.ones(3, np.int64)),
    ]
    for a, b in cases:
        want = sp.logsumexp(a, b=b)
        got = sl.logsumexp(a, b=b)
        assert np.asarray(got).dtype == np.asarray(want).dtype, (a.dtype, b.dtype)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-3)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_ndarray_subclasses_and_ragged_lists():
    m = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(sl.softmax(m, axis=1), sl.softmax(np.asarray(m), axis=1))
    np.testing.assert_allclose(sl.logsumexp(m, axis=0), sl.logsumexp(np.asarray(m), axis=0))
    with pytest.raises(ValueError, match=r"\ba\b"):
        sl.logsumexp([[1.0], [1.0, 2.0]])


def test_in_place_on_a_zero_d_array():
    x = np.array(3.0)
    assert sl.softmax(x, out=x) is x
    assert x == 1.0
    y = np.array(3.0)
    sl.log_softmax(y, out=y)
    assert y == 0.0


@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_bool_axis_is_a_type_error(fn):
    # NumPy and scipy refuse axis=True; it used to reduce axis 1 silently.
    x = np.ones((2, 3, 4))
    with pytest.raises(TypeError, match="axis"):
        getattr(sl, fn)(x, axis=True)
    with pytest.raises(TypeError, match="axis"):
        getattr(sl, fn)(x, axis=(0, np.False_))


@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_self_overlapping_out_is_refused(fn):
    # A writeable zero-stride out (np.lib.stride_tricks.as_strided) cannot hold the result:
    # every element would land on the same memory.
    x = np.array([[0.0, 1.0], [2.0, 5.0]])
    shape = (2,) if fn == "logsumexp" else (2, 2)
    out = np.lib.stride_tricks.as_strided(np.full(1, 7.0), shape=shape, strides=(0,) * len(shape))
    with pytest.raises(ValueError, match="out"):
        getattr(sl, fn)(x, axis=1, out=out)
    assert np.all(out == 7.0)


def test_empty_weighted_reduction_sign_is_minus_one_as_scipy():
    # scipy gives sign -1 for an empty reduction with or without weights.
    assert sl.logsumexp(np.zeros(0), b=np.zeros(0), return_sign=True) == (-np.inf, -1.0)
    res, sgn = sl.logsumexp(np.zeros((3, 0)), axis=1, b=np.ones(0), return_sign=True)
    np.testing.assert_array_equal(sgn, [-1.0, -1.0, -1.0])


@pytest.mark.parametrize("fn", ["logsumexp", "softmax", "log_softmax"])
def test_big_endian_float32_is_computed_as_float32(fn):
    # '>f4' went down the float64 path: twice the memory, and results 1 ULP away from the same
    # values in native order.
    x = (np.random.default_rng(3).standard_normal((3, 150_000)) * 10).astype(np.float32)
    for axis in [0, 1]:
        want = getattr(sl, fn)(x, axis=axis)
        got = getattr(sl, fn)(x.astype(">f4"), axis=axis)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def _loss_fn(name):
    f = getattr(sl, name, None)
    if f is None:
        pytest.skip(reason=f"stablelse.{name} is not in this build")
    return f


def _unaligned(a):
    raw = np.zeros(a.nbytes + 1, dtype=np.uint8)
    u = raw[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    return u


def test_zero_classes_do_not_panic():
    # A (2, 0) batch has a non-zero row stride over an empty buffer: the kernels indexed past
    # it and panicked (PanicException) instead of returning empty results.
    xent = _loss_fn("cross_entropy")
    z = np.zeros((2, 0))
    loss, grad = xent(z, np.zeros((2, 0)), return_grad=True)
    assert grad.shape == (2, 0)
    loss, grad = xent(z, np.array([-100, -100]), return_grad=True, reduction="sum")
    assert loss == 0.0 and grad.shape == (2, 0)
    with pytest.raises(IndexError, match="target"):
        xent(z, np.array([0, -100]))
    assert _loss_fn("softmax_backward")(z, z).shape == (2, 0)
    assert _loss_fn("log_softmax_backward")(z, z).shape == (2, 0)


def test_unaligned_weights_and_targets_are_accepted():
    # An unaligned (but contiguous) weight or int64 target reached the binding as is: an
    # unnamed "not contiguous or misaligned" ValueError, or "target must be C-contiguous".
    xent, nll = _loss_fn("cross_entropy"), _loss_fn("nll_loss")
    x = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    t, w = np.array([3, 0]), np.array([1.0, 2.0, 3.0, 4.0])
    for f in (xent, nll):
        want = f(x, t, weight=w)
        assert f(x, _unaligned(t), weight=_unaligned(w)) == want


def test_ragged_chunk_error_names_the_chunk():
    acc_cls = _loss_fn("LogSumExp")
    with pytest.raises(ValueError, match="chunk"):
        acc_cls().update([[1.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match=r"\bb\b"):
        acc_cls().update([1.0, 2.0], b=[[1.0], [1.0, 2.0]])


def test_logsumexp_out_overlapping_a_converted_input_is_refused():
    # float16 input is computed on a float32 copy: the overlap check saw only the copy and
    # let out write into a.
    a = np.zeros((2, 2), dtype=np.float16)
    with pytest.raises(ValueError, match="overlap"):
        sl.logsumexp(a, axis=1, out=a[:, 0])
    assert not a.any()


def test_ragged_target_error_names_the_target():
    xent = _loss_fn("cross_entropy")
    with pytest.raises(ValueError, match="target"):
        xent(np.zeros((2, 3)), [[1.0], [1.0, 2.0]])
