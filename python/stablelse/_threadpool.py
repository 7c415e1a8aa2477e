"""The thread pool as the ecosystem expects it: environment variables and threadpoolctl.

Default thread count (read once, by the native module): ``STABLELSE_NUM_THREADS``, else
``RAYON_NUM_THREADS``, else ``OMP_NUM_THREADS`` (Dask's nanny sets it to 1 in each worker),
else the CPUs this process may run on. A variable set to something unusable
(``STABLELSE_NUM_THREADS=abc``, ``STABLELSE_SIMD=bogus`` or a SIMD level this CPU lacks) is
ignored with one ``RuntimeWarning`` at import that names it.

threadpoolctl: ``threadpool_limits(1)`` limits stablelse's pool too. Registered at import when
threadpoolctl is installed, through its custom-controller API. threadpoolctl finds controllers
by the file name of loaded shared libraries; ours is the native module
``stablelse/_core.abi3.so``, and the controller ignores any other library that happens to share
that file name.
"""

from __future__ import annotations

import os
import warnings

from . import _core


def _is_ours(filepath: str | None) -> bool:
    return filepath is not None and os.path.basename(os.path.dirname(filepath)) == "stablelse"


def register() -> bool:
    """Registers the controller; returns False when threadpoolctl is not installed."""
    try:
        import threadpoolctl  # noqa: PLC0415
    except ImportError:
        return False
    if getattr(threadpoolctl, "_stablelse_registered", False):
        return True

    class StablelseController(threadpoolctl.LibController):  # type: ignore[misc]
        user_api = "stablelse"
        internal_api = "stablelse"
        filename_prefixes = ("_core.abi3", "_core.cpython")

        def get_num_threads(self) -> int | None:
            return _core.get_num_threads() if _is_ours(self.filepath) else None

        def set_num_threads(self, num_threads: int) -> None:
            if _is_ours(self.filepath):
                _core.set_num_threads(int(num_threads))

        def get_version(self) -> str | None:
            return _core.__version__ if _is_ours(self.filepath) else None

    threadpoolctl.register(StablelseController)
    threadpoolctl._stablelse_registered = True  # type: ignore[attr-defined]
    return True


def warn_env_problems() -> None:
    """One ``RuntimeWarning`` per environment variable the native module ignored."""
    for _var, message in _core.env_problems():
        warnings.warn(f"stablelse {message}", RuntimeWarning, stacklevel=3)
