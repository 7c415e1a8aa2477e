"""Type stubs for the native module ``stablelse._core`` (private; use ``stablelse``)."""

from typing import Optional

import numpy as np
import numpy.typing as npt

__version__: str

_Float = np.floating
_Arr = npt.NDArray[_Float]

def logsumexp(x: _Arr, algorithm: str = "auto", out: Optional[_Arr] = None) -> _Arr: ...
def logsumexp_weighted(a: _Arr, b: _Arr, return_sign: bool = False) -> tuple[_Arr, _Arr]: ...
def softmax(
    x: _Arr, log: bool = False, algorithm: str = "auto", out: Optional[_Arr] = None
) -> _Arr: ...
def lse_states(
    x: _Arr, algorithm: str = "auto"
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def merge_states(
    max_a: npt.NDArray[np.float64],
    excess_a: npt.NDArray[np.float64],
    max_b: npt.NDArray[np.float64],
    excess_b: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def available_simd_levels() -> list[str]: ...
