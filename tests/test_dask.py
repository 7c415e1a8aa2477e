"""stablelse.dask against the NumPy path, on the threaded scheduler and a real LocalCluster."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import oracles
import pytest

import stablelse

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
sd = pytest.importorskip("stablelse.dask")

INF, NAN = np.inf, np.nan


def test_importing_stablelse_does_not_import_dask():
    code = (
        "import sys, numpy as np, stablelse; "
        "stablelse.LogSumExp(0).update(np.ones((2, 2))).result(); "
        "stablelse.logsumexp(np.ones(3)); "
        "bad = [m for m in sys.modules if m == 'dask' or m.startswith(('dask.', 'distributed'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def cluster_client():
    cluster = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(params=["threads", "distributed"])
def compute(request):
    """A function computing a dask array, or a list of them in one graph, on the scheduler
    under test (one round trip per list keeps the cluster tests fast)."""
    if request.param == "threads":

        def run(arrs):
            many = isinstance(arrs, list)
            out = dask.compute(*(arrs if many else [arrs]), scheduler="threads")
            return list(out) if many else out[0]

        return run
    client = request.getfixturevalue("cluster_client")
    return lambda arrs: client.compute(arrs, sync=True)


def data(dtype, shape=(23, 13, 5), seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 10).astype(dtype)
    return x


AXES = [None, 0, 1, -1, (0, 2), (1, 2)]


def test_logsumexp_matches_numpy_path(compute):
    cases = [
        (dtype, axis, keepdims)
        for dtype in (np.float32, np.float64)
        for axis in AXES
        for keepdims in (False, True)
    ]
    xs = {dtype: data(dtype) for dtype in (np.float32, np.float64)}
    # chunks: every reduced axis spans several chunks.
    dxs = {dtype: da.from_array(x, chunks=(8, 5, 2)) for dtype, x in xs.items()}
    lazy = [sd.logsumexp(dxs[t], axis=a, keepdims=k, split_every=3) for t, a, k in cases]
    assert all(isinstance(r, da.Array) for r in lazy)
    for (dtype, axis, keepdims), got in zip(cases, compute(lazy)):
        want = stablelse.logsumexp(xs[dtype], axis=axis, keepdims=keepdims)
        oracles.assert_ulps(got, want, ulps=1 if dtype == np.float32 else 4)


def test_logsumexp_special_values_and_dtypes(compute):
    x = np.array([[1.0, -INF, 2.0, 0.5], [-INF, -INF, -INF, -INF], [3.0, INF, 1.0, 0.0]])
    x = np.vstack([x, [[NAN, 1.0, INF, -INF]], x[:1]])
    dx = da.from_array(x, chunks=(2, 3))
    lazy, wants = [], []
    for axis in (None, 0, 1):
        lazy.append(sd.logsumexp(dx, axis=axis))
        wants.append(stablelse.logsumexp(x, axis=axis))
    # Integers give float64, float16 stays float16, float32 stays float32.
    for arr in (np.arange(12).reshape(3, 4), np.float16(x[:1]), np.float32(x)):
        lazy.append(sd.logsumexp(da.from_array(arr, chunks=2), axis=1))
        wants.append(stablelse.logsumexp(arr, axis=1))
        assert lazy[-1].dtype == wants[-1].dtype
    # Empty reduced axis and a 0-d input.
    lazy.append(sd.logsumexp(da.zeros((3, 0), chunks=(2, 1)), axis=1))
    wants.append(np.array([-INF] * 3))
    lazy.append(sd.logsumexp(da.from_array(np.float32(2.0))))
    wants.append(np.array(np.float32(2.0)))
    for got, want in zip(compute(lazy), wants):
        oracles.assert_ulps(got, want)


def test_weighted_logsumexp(compute):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(20, 9)) * 5).astype(np.float32)
    b = rng.uniform(0, 2, size=(20, 9)).astype(np.float32)
    b[3, 4], x[3, 4] = 0.0, NAN  # a zero weight drops the element, NaN included
    dx = da.from_array(x, chunks=(6, 4))
    db = da.from_array(b, chunks=(7, 5))  # chunked differently from a
    row_w = np.float32(np.linspace(0.0, 2.0, 9))
    lazy = [sd.logsumexp(dx, axis, b=db) for axis in (None, 0, 1)]
    lazy.append(sd.logsumexp(dx, 1, b=row_w, keepdims=True))  # broadcast weights
    wants = [stablelse.logsumexp(x, axis, b=b) for axis in (None, 0, 1)]
    wants.append(stablelse.logsumexp(x, 1, b=row_w, keepdims=True))
    for got, want in zip(compute(lazy), wants):
        oracles.assert_ulps(got, want, ulps=1)
    with pytest.raises(ValueError, match="does not broadcast"):
        sd.logsumexp(dx, 1, b=np.ones(5))
    with pytest.raises(ValueError, match="is negative"):
        compute(sd.logsumexp(dx, 1, b=-db))


def test_softmax_matches_numpy_path(compute):
    cases = [
        (dtype, log, axis) for dtype in (np.float32, np.float64) for log in (0, 1) for axis in AXES
    ]
    xs = {}
    for dtype in (np.float32, np.float64):
        x = data(dtype, seed=1)
        x[3, 4, :] = [-INF, INF, 1, 2, 3]
        x[5, :, 1] = -INF
        x[7, 2, 3] = NAN
        xs[dtype] = x
    dxs = {dtype: da.from_array(x, chunks=(8, 5, 2)) for dtype, x in xs.items()}
    funcs = [(sd.softmax, stablelse.softmax), (sd.log_softmax, stablelse.log_softmax)]
    lazy = [funcs[log][0](dxs[t], axis=a, split_every=2) for t, log, a in cases]
    assert all(isinstance(r, da.Array) and r.chunks == (dxs[np.float32].chunks) for r in lazy)
    for (dtype, log, axis), got in zip(cases, compute(lazy)):
        want = funcs[log][1](xs[dtype], axis=axis)
        if dtype == np.float32:
            oracles.assert_ulps(got, want, ulps=1)  # float64 inside, rounded once: as the kernels
        else:
            # The excess is summed in another order than the kernels' blocking; a top-class
            # log_softmax, -log1p(excess), inherits that relative error.
            np.testing.assert_allclose(got, want, rtol=64 * np.finfo(np.float64).eps, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_float64_reference(compute, reduction):
    rng = np.random.default_rng(2)
    n, c = 61, 19
    logits = (rng.normal(size=(n, c)) * 4).astype(np.float32)
    target = rng.integers(0, c, size=n)
    target[[3, 17, 40]] = -100
    weight = rng.uniform(0.2, 3.0, size=c)
    dl = da.from_array(logits, chunks=(16, 5))  # the class axis spans 4 chunks
    dt = da.from_array(target, chunks=25)  # and the rows are chunked differently
    lazy = [
        sd.cross_entropy(dl, dt, weight=w, reduction=reduction, split_every=2)
        for w in (None, weight)
    ]
    assert all(isinstance(r, da.Array) and r.dtype == np.float32 for r in lazy)
    for w, got in zip((None, weight), compute(lazy)):
        want = oracles.cross_entropy(logits, target, -1, w, -100, reduction)
        assert np.shape(got) == np.shape(want)
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7)


def test_cross_entropy_torch_layout_and_ignore_index(compute):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 7, 5)) * 3  # (N, C, d1), classes on axis 1
    target = rng.integers(0, 7, size=(6, 5))
    target[0, :] = 2  # ignore_index may be a valid class
    dl = da.from_array(logits, chunks=(4, 3, 2))
    dt = da.from_array(target, chunks=(3, 5))
    reds = ("none", "mean")
    lazy = [sd.cross_entropy(dl, dt, axis=1, ignore_index=2, reduction=r) for r in reds]
    every = da.full((4,), 2, chunks=2)
    lazy.append(sd.cross_entropy(dl[:4, :, 0], every, ignore_index=2))
    got = compute(lazy)
    for r, g in zip(reds, got):
        want = oracles.cross_entropy(logits, target, 1, None, 2, r)
        np.testing.assert_allclose(g, want, rtol=1e-13, atol=1e-14)
    assert np.isnan(got[-1])  # every row ignored: 0 / 0, as torch


def test_cross_entropy_matches_the_cpu_loss(compute):
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(40, 3, 13)) * 6).astype(np.float32)  # classes on axis 2
    target = rng.integers(0, 13, size=(40, 3))
    target[::7, 1] = 5
    weight = rng.uniform(0.1, 2.0, size=13).astype(np.float32)
    dl = da.from_array(logits, chunks=(9, 2, 4))
    dt = da.from_array(target, chunks=(11, 3))
    cases = [(r, w) for r in ("mean", "sum", "none") for w in (None, weight)]
    lazy = [sd.cross_entropy(dl, dt, weight=w, ignore_index=5, reduction=r) for r, w in cases]
    for (r, w), got in zip(cases, compute(lazy)):
        want = stablelse.cross_entropy(logits, target, weight=w, ignore_index=5, reduction=r)
        assert np.asarray(got).dtype == np.asarray(want).dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-6)


def test_cross_entropy_errors(compute):
    dl = da.zeros((4, 3), chunks=2)
    with pytest.raises(ValueError, match="reduction"):
        sd.cross_entropy(dl, da.zeros(4, dtype=int), reduction="avg")
    with pytest.raises(ValueError, match=r"target has shape \(3,\); expected \(4,\)"):
        sd.cross_entropy(dl, da.zeros(3, dtype=int))
    with pytest.raises(TypeError, match="class-index target must have an integer dtype"):
        sd.cross_entropy(dl, da.zeros(4))
    with pytest.raises(ValueError, match="weight must have one entry per class"):
        sd.cross_entropy(dl, da.zeros(4, dtype=int), weight=[1.0, 2.0])
    with pytest.raises(NotImplementedError, match="grad_out is not supported on Dask arrays"):
        sd.cross_entropy(dl, da.zeros(4, dtype=int), return_grad=True, grad_out=np.empty((4, 3)))
    with pytest.raises(ValueError, match="grad_out"):
        sd.cross_entropy(dl, da.zeros(4, dtype=int), grad_out=np.empty((4, 3)))
    lazy = sd.cross_entropy(dl, da.from_array(np.array([0, 1, 3, 2]), chunks=2))
    with pytest.raises(IndexError, match=r"^target\[2\] = 3 is outside \[0, 3\)$"):
        compute(lazy)
    # The gradient alone checks its targets too, naming them in the whole array.
    _, grad = sd.cross_entropy(dl, da.from_array(np.array([0, 1, 3, 2]), chunks=2),
                               return_grad=True, reduction="mean")
    with pytest.raises(IndexError, match=r"^target\[2\] = 3 is outside \[0, 3\)$"):
        compute(grad)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("targets", ["index", "probs"])
def test_cross_entropy_gradient_equals_the_numpy_path(compute, reduction, targets):
    # Rows split over blocks along two axes (the class axis in the middle): catches a block's
    # gradient scaled by its own denominator instead of the batch's, a z-loss term scaled by
    # the weighted denominator, and a gradient block placed at the wrong rows.
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((30, 7, 4)) * 3).astype(np.float32)
    t = rng.integers(0, 7, (30, 4))
    t[3, 1] = -100
    keep = rng.random(x.shape) < 0.8
    keep[np.arange(30)[:, None], np.where(t >= 0, t, 0), np.arange(4)] = True
    q = rng.dirichlet(np.ones(7), (30, 4)).transpose(0, 2, 1) * keep  # no mass where masked
    tgt = t if targets == "index" else (q / q.sum(axis=1, keepdims=True)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, 7)
    optsets = [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}, {"where": keep}]
    if targets == "index":
        optsets += [{"weight": w, "z_loss": 1e-2}, {"weight": w, "where": keep}]
    xd = da.from_array(x, chunks=(7, 7, 3))
    td = da.from_array(tgt, chunks=(7, 3) if targets == "index" else (7, 7, 3))
    for opts in optsets:
        want, gw = stablelse.cross_entropy(x, tgt, axis=1, reduction=reduction,
                                           return_grad=True, **opts)
        loss, grad = sd.cross_entropy(xd, td, axis=1, reduction=reduction, return_grad=True,
                                      **opts)
        got, g = compute([loss, grad])
        assert g.dtype == gw.dtype == np.float32 and g.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-7)
        if reduction == "mean":
            np.testing.assert_allclose(g, gw, rtol=4e-7, atol=1e-9, err_msg=str(opts))
        else:
            np.testing.assert_array_equal(g, gw, err_msg=str(opts))


def test_cross_entropy_names_the_target_in_the_whole_array(compute):
    x = da.zeros((6, 4, 3), chunks=(2, 3, 3))  # classes on axis 2, rows in 3 x 2 blocks
    t = np.zeros((6, 4), dtype=np.int64)
    t[3, 2] = 7
    lazy = sd.cross_entropy(x, da.from_array(t, chunks=(2, 3)), reduction="none")
    with pytest.raises(IndexError, match=r"^target\[3, 2\] = 7 is outside \[0, 3\)$"):
        compute(lazy)
    big = np.array([0, 1, 2**64 - 1, 0], dtype=np.uint64)  # printed as uint64, not -1
    lazy = sd.cross_entropy(da.zeros((4, 3), chunks=2), da.from_array(big, chunks=2))
    with pytest.raises(IndexError, match=r"^target\[2\] = 18446744073709551615 is outside"):
        compute(lazy)


def test_cross_entropy_refuses_unknown_chunk_sizes_without_nan_shapes():
    t = da.from_array(np.array([0, 1, 1, 5]), chunks=2)
    t = t[t < 3]  # a boolean mask: chunk sizes unknown
    with pytest.raises(ValueError, match="unknown size") as ei:
        sd.cross_entropy(da.zeros((3, 3), chunks=2), t)
    assert "nan" not in str(ei.value)


def test_cross_entropy_options_match_the_numpy_path(compute):
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(23, 2, 9)) * 3).astype(np.float32)
    t = rng.integers(0, 9, size=(23, 2))
    t[::5, 0] = -100
    w = rng.uniform(0.3, 2.0, size=9)
    q = rng.dirichlet(np.ones(9), size=(23, 2)).astype(np.float32)
    dl = da.from_array(x, chunks=(7, 1, 4))  # the class axis split: gathered per block
    cases = []
    for red in ("mean", "sum", "none"):
        for tt, kw in (
            (t, {"label_smoothing": 0.2}),
            (t, {"z_loss": 1e-3}),
            (t, {"weight": w, "z_loss": 1e-3, "label_smoothing": 0.1}),
            (np.where(t < 0, 3, t), {"weight": w, "ignore_index": 3}),  # a class ignored
        ):
            cases.append((da.from_array(tt, chunks=(5, 2)), tt, {**kw, "reduction": red}))
        cases.append((da.from_array(q, chunks=(6, 1, 9)), q, {"reduction": red, "weight": w}))
    lazy = [sd.cross_entropy(dl, dt, **kw) for dt, _, kw in cases]
    for (_, tt, kw), got in zip(cases, compute(lazy)):
        want = stablelse.cross_entropy(x, tt, **kw)
        assert np.asarray(got).dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=3e-7, atol=1e-6, err_msg=str(kw))


def test_softmax_blocks_are_written_by_the_kernels(compute):
    rng = np.random.default_rng(13)
    x = rng.normal(size=(5, 7, 6)) * 30
    x[1, :, 2] = -np.inf  # an all -inf slice over axis 1
    dx = da.from_array(x, chunks=(2, 3, 4))
    for ax in (1, (0, 2), None):
        got = compute([sd.softmax(dx, axis=ax), sd.log_softmax(dx, axis=ax)])
        with np.errstate(invalid="ignore"):
            want = [stablelse.softmax(x, axis=ax), stablelse.log_softmax(x, axis=ax)]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-300)


def test_graph_is_lazy():
    def boom(block):
        raise RuntimeError("computed too early")

    x = da.ones((8, 6), chunks=3).map_blocks(boom, dtype=np.float64)
    t = da.zeros(8, dtype=int, chunks=4)
    built = [
        sd.logsumexp(x, axis=1),
        sd.softmax(x, axis=0),
        sd.log_softmax(x),
        sd.cross_entropy(x, t),
        sd.lse_states(x, axis=1),
    ]
    assert all(isinstance(b, da.Array) for b in built)
    with pytest.raises(RuntimeError, match="too early"):
        built[0].compute(scheduler="sync")


def test_lse_states_follow_the_convention(compute):
    x = np.array([[0.0, -40.0], [1.0, 1.0]])
    s = compute(sd.lse_states(da.from_array(x, chunks=1), axis=1))
    assert s.dtype == sd.STATE_DTYPE
    np.testing.assert_array_equal(s["max"], [0.0, 1.0])
    np.testing.assert_allclose(s["excess"], [np.exp(-40.0), 1.0], rtol=1e-15)


def test_accumulators_built_on_workers_merge_locally(cluster_client):
    """LogSumExp pickles: partial accumulators from worker processes merge on the client."""
    rng = np.random.default_rng(4)
    parts = [rng.normal(size=(n, 3)).astype(np.float32) * 20 for n in (5, 0, 9, 4)]

    def partial(chunk):
        return stablelse.LogSumExp(axis=0).update(chunk)

    accs = cluster_client.gather(cluster_client.map(partial, parts))
    merged = accs[0].merge(accs[1]).merge(accs[2].merge(accs[3]))
    want = stablelse.logsumexp(np.concatenate(parts), axis=0)
    oracles.assert_ulps(merged.result(), want, ulps=1)
