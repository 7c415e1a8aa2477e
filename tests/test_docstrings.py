"""Every example in the public docstrings runs and prints what it shows.

The modules behind the NumPy API, the segment functions, the streaming accumulator and the
Dask front end are run through doctest; stablelse.torch is run by test_torch.py (it needs
torch). A docstring whose output drifted from the code fails here.
"""

import doctest
import importlib

import numpy as np
import pytest

MODULES = [
    "stablelse._api",
    "stablelse._losses",
    "stablelse._segments",
    "stablelse._stream",
    "stablelse.dask",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if np.lib.NumpyVersion(np.__version__) < "2.0.0":
        pytest.skip("the examples show NumPy 2's scalar reprs (np.float64(...))")
    if name == "stablelse.dask":
        pytest.importorskip("dask")
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, report=True)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
