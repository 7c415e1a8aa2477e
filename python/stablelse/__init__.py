"""stablelse: numerically stable logsumexp, softmax, log_softmax and cross-entropy.

Rust SIMD kernels behind a NumPy API with scipy.special's semantics (and torch's for the
losses). See ``help(stablelse.logsumexp)`` and the README for the exact contract.
"""

from ._api import (
    get_num_threads,
    info,
    log_softmax,
    logsumexp,
    set_num_threads,
    softmax,
)
from ._core import __version__
from ._stream import LogSumExp

__all__ = [
    "LogSumExp",
    "__version__",
    "get_num_threads",
    "info",
    "log_softmax",
    "logsumexp",
    "set_num_threads",
    "softmax",
]
