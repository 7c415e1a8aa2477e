"""Type stubs for the native module ``stablelse._core`` (private; use ``stablelse``)."""

from collections.abc import Sequence
from types import NotImplementedType
from typing import Any, Optional, Union, final

import numpy as np
import numpy.typing as npt

__version__: str

_Float = np.floating
_Arr = npt.NDArray[_Float]

_F64 = npt.NDArray[np.float64]

# Reductions (src/python/reductions.rs). `axes` is the normalised tuple of
# stablelse._axes.normalize_axes; NotImplemented means "not a float32/float64/float16/bfloat16
# ndarray of one or more dimensions" (the caller converts it first). float16 and bfloat16 are
# computed in float32 block by block and returned (and written to `out`) in their own dtype.
def logsumexp(
    x: Any,
    axes: tuple[int, ...],
    keepdims: bool,
    algorithm: Any,
    out: Optional[_Arr] = None,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> Union[_Arr, np.floating, NotImplementedType]: ...
def logsumexp_weighted(a: _Arr, b: _Arr, return_sign: bool = False) -> tuple[_Arr, _Arr]: ...
def softmax(
    x: Any,
    axes: tuple[int, ...],
    log: bool,
    algorithm: Any,
    out: Optional[_Arr] = None,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> Union[_Arr, NotImplementedType]: ...
def logsumexp_complex(
    a: npt.NDArray[np.complexfloating], b: Optional[npt.NDArray[np.complexfloating]] = None,
    return_sign: bool = False,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> tuple[npt.NDArray[np.complexfloating], Optional[npt.NDArray[np.complexfloating]]]: ...
def softmax_complex(
    x: npt.NDArray[np.complexfloating], log: bool = False,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> npt.NDArray[np.complexfloating]: ...
def lse_states(
    x: _Arr,
    axes: tuple[int, ...],
    algorithm: str = "auto",
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> tuple[_F64, _F64]: ...
def merge_states(
    max_a: _F64,
    excess_a: _F64,
    max_b: _F64,
    excess_b: _F64,
) -> tuple[_F64, _F64]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def env_problems() -> list[tuple[str, str]]: ...
def available_simd_levels() -> list[str]: ...
def after_fork_in_child() -> None: ...

# Bandwidth probe (src/python/probe.rs); footprint default: several times the last-level cache.
@final
class BandwidthProbe:
    def __new__(cls, bytes: Optional[int] = None) -> BandwidthProbe: ...
    @property
    def bytes(self) -> int: ...
    def read(self, reps: int = 5) -> float: ...
    def read_write(self, reps: int = 5) -> float: ...

def read_bandwidth(bytes: Optional[int] = None, reps: int = 5) -> float: ...
def read_write_bandwidth(bytes: Optional[int] = None, reps: int = 5) -> float: ...
def last_level_cache_bytes() -> Optional[int]: ...
def dram_probe_bytes() -> int: ...

# The planner (src/plan.rs, src/python/plan.rs).
@final
class Plan:
    """How the kernels see an array reduced over some of its axes."""

    @property
    def perm(self) -> list[int]: ...
    @property
    def first(self) -> int: ...
    @property
    def reduced(self) -> int: ...
    @property
    def outer(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def inner(self) -> int: ...
    @property
    def direct(self) -> bool: ...
    @property
    def outer_stride(self) -> int: ...
    @property
    def kept(self) -> list[int]: ...

def plan(
    shape: Sequence[int], strides: Sequence[int], itemsize: int, addr: int, axes: Sequence[int]
) -> Plan: ...

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
    mask: Optional[npt.NDArray[np.bool_]] = None,  # where=: 3-D bool, non-negative strides
) -> tuple[Union[np.floating[Any], _Arr], Optional[_Arr]]: ...
def cross_entropy_common(
    logits: Any,
    target: Any,
    axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    return_grad: bool,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> Any: ...
def nll_loss(
    log_probs: _Arr,
    target: npt.NDArray[np.int64],
    weight: Optional[_Arr] = None,
    ignore_index: int = ...,  # -100
    reduction: str = "mean",
    mask: Optional[npt.NDArray[np.bool_]] = None,
) -> Union[float, _Arr]: ...
def softmax_from_states(
    x: _Arr,
    max: _Arr,
    excess: _Arr,
    log: bool = False,
    where: Optional[npt.NDArray[np.bool_]] = None,
) -> _Arr: ...
def softmax_backward(y: _Arr, dy: _Arr, log: bool = False) -> _Arr: ...

# CUDA (cargo feature "cuda", src/cuda/): private entry points of stablelse.cuda, which
# validates every argument first. Device arrays are described by plain tuples / dicts.
def _cuda_add_nvrtc_dir(path: str) -> None: ...
def _cuda_compile(dtype: str, arch: str) -> int: ...
def _cuda_cross_entropy(
    dtype: str, place: Any, x: Any, targets: Any, outputs: Any, options: Any
) -> None: ...
def _cuda_info() -> dict[str, Any]: ...
def _cuda_is_available() -> bool: ...
def _cuda_parse(obj: Any, stream: Any = None) -> dict[str, Any]: ...
def _cuda_rows(op: str, dtype: str, place: Any, x: Any, y: Any) -> None: ...

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
def segment_states(
    x: _Arr,
    segment_ids: Optional[npt.NDArray[np.int64]] = None,
    offsets: Optional[npt.NDArray[np.int64]] = None,
    num_segments: int = 0,
    sorted: bool = False,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def segment_softmax_from_states(
    x: _Arr,
    out: _Arr,
    segment_ids: npt.NDArray[np.int64],
    max: npt.NDArray[np.float64],
    excess: npt.NDArray[np.float64],
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
    ignore_index: int = ...,  # -100
    mean: bool = True,
) -> tuple[float, int]: ...
# float16 / bfloat16 conversions (src/python/half.rs), for the tests. `conversion`: "auto" (the
# process's), or one of half_conversions()[0]: "portable", "f16c", "avx512".
def half_conversions() -> tuple[list[str], str]: ...
def half_to_float32(
    bits: npt.NDArray[np.uint16], bfloat16: bool = False, conversion: str = "auto"
) -> npt.NDArray[np.float32]: ...
def float32_to_half(
    x: npt.NDArray[np.float32], bfloat16: bool = False, conversion: str = "auto"
) -> npt.NDArray[np.uint16]: ...

# float16 / bfloat16 in the losses and the block kernels: cross_entropy (class indices, no
# mask, inner == 1; widened per piece of rows) and nll_loss take 3-D float16 / bfloat16 logits
# and return per-lane losses and gradients in that dtype, the "mean"/"sum" loss in float32
# (rounded by the caller); weights are then float32. softmax_from_states takes 2-D
# float16 / bfloat16 rows and returns that dtype.
