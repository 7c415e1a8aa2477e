import os

import numpy as np
import pytest


def pytest_report_header(config):
    import stablelse

    info = stablelse.info()
    return (
        f"stablelse {info['version']}: simd={info['simd']} (STABLELSE_SIMD="
        f"{os.environ.get('STABLELSE_SIMD', '')!r}), threads={info['threads']}"
    )


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
