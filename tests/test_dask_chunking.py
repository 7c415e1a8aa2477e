"""stablelse.dask on any chunking, against the NumPy path (a Hypothesis property).

Apart from ``test_dask.py`` so that no distributed cluster is running while Hypothesis draws:
the cluster's scheduler runs in this process, and its IO loop thread draws from Python's
global ``random`` (``distributed.utils_comm.gather_from_workers``, ``dask.sizeof``), which
Hypothesis reports against whatever strategy is being drawn at that moment.
"""

from __future__ import annotations

import numpy as np
import oracles
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablelse

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
sd = pytest.importorskip("stablelse.dask")


@st.composite
def chunked_arrays(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = draw(hnp.arrays(dtype, shape, elements=st.floats(-300, 300, width=32)))
    chunks = []
    for n in shape:
        cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=3)))) if n > 1 else []
        chunks.append(tuple(np.diff([0, *cuts, n]).tolist()))
    axis = draw(st.sampled_from([None, *range(len(shape)), tuple(range(len(shape)))]))
    return x, tuple(chunks), axis


@settings(max_examples=40, deadline=None)
@given(chunked_arrays(), st.integers(2, 4))
def test_any_chunking_matches_numpy_path(case, split_every):
    x, chunks, axis = case
    dx = da.from_array(x, chunks=chunks)
    got_l, got_s = dask.compute(
        sd.logsumexp(dx, axis=axis, split_every=split_every),
        sd.log_softmax(dx, axis=axis, split_every=split_every),
        scheduler="sync",
    )
    # float32 is summed in float64 and rounded once, so both paths agree to 1 ULP. float64 is
    # summed in float64: when the result is tiny (log1p of a tiny excess) each path's summation
    # error is up to about one ULP per term relative to the result, so the bound grows with the
    # number of terms reduced; and where the max and the log of the sum cancel (`[-1, -1, -1]`
    # gives ln 3 - 1) each path's rounding of the log is an ULP of the max, not of the result.
    terms = x.size if axis is None else int(np.prod([x.shape[a] for a in np.atleast_1d(axis)]))
    want_l = stablelse.logsumexp(x, axis=axis)
    if x.dtype == np.float32:
        oracles.assert_ulps(got_l, want_l, ulps=1)
    else:
        oracles.assert_ulps(got_l, want_l, ulps=4 + terms, cancelled=np.max(x, axis=axis))
    want_s = stablelse.log_softmax(x, axis=axis)
    if x.dtype == np.float32:
        oracles.assert_ulps(got_s, want_s, ulps=1)
    else:
        np.testing.assert_allclose(got_s, want_s, rtol=1e-14, atol=1e-14)
