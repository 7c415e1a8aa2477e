"""Type stubs for the native module ``stablelse._core`` (private; use ``stablelse``)."""

from typing import Any, Optional, Union

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
def rows_fast(
    x: _Arr, axis: Optional[int], keepdims: bool, op: int, out: Optional[_Arr] = None
) -> Optional[_Arr]: ...
def after_fork_in_child() -> None: ...
def read_bandwidth(bytes: int = ..., reps: int = ...) -> float: ...
def read_write_bandwidth(bytes: int = ..., reps: int = ...) -> float: ...

# Losses (src/python/losses.rs): logits are 3-D (outer, classes, inner); index targets int64.
def cross_entropy(
    logits: _Arr,
    target: Union[npt.NDArray[np.int64], _Arr],
    weight: Optional[_Arr] = None,
    ignore_index: int = ...,  # -100; PyO3 shows negative defaults as ...
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_grad: bool = False,
    algorithm: str = "auto",
    grad_out: Optional[_Arr] = None,
) -> tuple[Union[float, _Arr], Optional[_Arr]]: ...
def nll_loss(
    log_probs: _Arr,
    target: npt.NDArray[np.int64],
    weight: Optional[_Arr] = None,
    ignore_index: int = ...,  # -100
    reduction: str = "mean",
) -> Union[float, _Arr]: ...
def softmax_backward(y: _Arr, dy: _Arr, log: bool = False) -> _Arr: ...

# CUDA (cargo feature "cuda", src/cuda/): private entry points of stablelse.cuda, which
# validates every argument first. Device arrays are described by plain tuples / dicts.
def _cuda_add_nvrtc_dir(path: str) -> None: ...
def _cuda_compile(dtype: str, arch: Any) -> Any: ...
def _cuda_cross_entropy(
    dtype: str, place: Any, x: Any, targets: Any, outputs: Any, options: Any
) -> Any: ...
def _cuda_info() -> dict[str, Any]: ...
def _cuda_is_available() -> bool: ...
def _cuda_parse(obj: Any, stream: Any = None) -> Any: ...
def _cuda_rows(op: str, dtype: str, place: Any, x: Any, y: Any) -> Any: ...

# Segments (src/python/segments.rs): x is a C-contiguous (rows, inner) block, ids / offsets
# int64, and the caller allocates the outputs.
def segment_logsumexp(
    x: _Arr,
    out: _Arr,
    segment_ids: Optional[npt.NDArray[np.int64]] = None,
    offsets: Optional[npt.NDArray[np.int64]] = None,
    num_segments: int = 0,
    sorted: bool = False,
) -> None: ...
def segment_softmax(
    x: _Arr,
    out: _Arr,
    segment_ids: Optional[npt.NDArray[np.int64]] = None,
    offsets: Optional[npt.NDArray[np.int64]] = None,
    num_segments: int = 0,
    sorted: bool = False,
    log: bool = False,
) -> None: ...
def segment_cross_entropy(
    x: _Arr,
    target: npt.NDArray[np.int64],
    losses: npt.NDArray[np.float64],
    grad: Optional[_Arr] = None,
    segment_ids: Optional[npt.NDArray[np.int64]] = None,
    offsets: Optional[npt.NDArray[np.int64]] = None,
    num_segments: int = 0,
    sorted: bool = False,
    ignore_index: int = -100,
    mean: bool = True,
) -> tuple[float, int]: ...
def masked_rows(x: _Arr, mask: npt.NDArray[np.bool_], out: _Arr, op: int) -> None: ...
