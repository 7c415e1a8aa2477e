"""stablelse: numerically stable logsumexp, softmax, log_softmax and cross-entropy.

Rust SIMD kernels behind a NumPy API with scipy.special's semantics (and torch's for the
losses). See ``help(stablelse.logsumexp)`` and the README for the exact contract.
"""

import os as _os

from . import _core
from ._api import (
    get_num_threads,
    info,
    log_softmax,
    logsumexp,
    set_num_threads,
    softmax,
)
from ._core import __version__
from ._losses import cross_entropy, log_softmax_backward, nll_loss, softmax_backward
from ._segments import (  # noqa: F401  (exported below)
    segment_cross_entropy,
    segment_log_softmax,
    segment_logsumexp,
    segment_softmax,
)
from ._stream import LogSumExp
from ._threadpool import register as _register_threadpoolctl
from ._threadpool import warn_env_problems as _warn_env_problems

_register_threadpoolctl()
_warn_env_problems()

if hasattr(_os, "register_at_fork"):
    # A forked child has none of the parent's pool threads: drop the pool, build anew on use.
    _os.register_at_fork(after_in_child=_core.after_fork_in_child)

__all__ = [
    "LogSumExp",
    "__version__",
    "cross_entropy",
    "get_num_threads",
    "info",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "nll_loss",
    "segment_cross_entropy",
    "segment_log_softmax",
    "segment_logsumexp",
    "segment_softmax",
    "set_num_threads",
    "softmax",
    "softmax_backward",
]
