"""threadpoolctl integration: ``threadpool_limits(1)`` limits stablelse's pool too.

Registered at import when threadpoolctl is installed, through its custom-controller API.
threadpoolctl finds controllers by the file name of loaded shared libraries; ours is the
native module ``stablelse/_core.abi3.so``, and the controller ignores any other library that
happens to share that file name.
"""

from __future__ import annotations

import os

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
