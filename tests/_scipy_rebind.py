"""pytest plugin: scipy.special's logsumexp, softmax and log_softmax rebound to stablelse's.

Loaded with ``-p _scipy_rebind`` by ``test_scipy_suite.py`` in a subprocess that runs scipy's
own installed ``scipy/special/tests/test_logsumexp.py``. That file imports the three names from
``scipy.special`` when it is collected, so replacing them in ``pytest_configure`` (before
collection) makes every test call stablelse. scipy's test decorators look each function up
in its table of array-API capabilities; stablelse's functions get the entries of the scipy
functions they replace.
"""

from __future__ import annotations

from typing import Any

NAMES = ("logsumexp", "softmax", "log_softmax")


def pytest_configure(config: Any) -> None:
    import scipy.special  # noqa: PLC0415
    from scipy._lib._array_api import xp_capabilities_table  # noqa: PLC0415

    import stablelse  # noqa: PLC0415

    for name in NAMES:
        theirs = getattr(scipy.special, name)
        ours = getattr(stablelse, name)
        if theirs in xp_capabilities_table:
            xp_capabilities_table[ours] = xp_capabilities_table[theirs]
        setattr(scipy.special, name, ours)


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """Refuse to run if a test module kept scipy's own functions (say scipy changed how the
    file imports them): the run would silently test scipy instead of stablelse."""
    import stablelse  # noqa: PLC0415

    for item in items:
        module = getattr(item, "module", None)
        for name in NAMES:
            bound = getattr(module, name, None)
            if bound is not None and bound is not getattr(stablelse, name):
                raise RuntimeError(f"{module.__name__}.{name} is not stablelse's {name}")
