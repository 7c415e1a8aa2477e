"""Make scikit-learn compute its log-sum-exps and softmaxes with stablelse.

scikit-learn normalises in log space in a handful of places, each of which imports its
function by name: ``scipy.special.logsumexp`` (LDA and older releases everywhere), its own
``sklearn.utils._array_api._logsumexp`` (GaussianMixture, the naive Bayes classifiers, the
multinomial loss), ``sklearn.utils.extmath.softmax(X, copy=...)`` (LogisticRegression,
calibration, discriminant analysis, NCA, AdaBoost) and ``inplace_softmax`` (the output layer
of MLPClassifier, looked up in ``sklearn.neural_network._base.ACTIVATIONS``).
:func:`stablelse_in_sklearn` replaces every one of those names that exists in the installed
release, for the duration of a ``with`` block, and counts the calls, so a test can check that
stablelse really ran. Used by tests/test_sklearn.py and scripts/sklearn_speed.py.
"""

from __future__ import annotations

import contextlib
import importlib
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

import stablelse

# (module, attribute) pairs naming a logsumexp, by calling convention.
SCIPY_STYLE = [
    ("scipy.special", "logsumexp"),
    ("sklearn.mixture._base", "logsumexp"),
    ("sklearn.naive_bayes", "logsumexp"),
    ("sklearn.decomposition._lda", "logsumexp"),
]
SKLEARN_LSE = [
    ("sklearn.utils._array_api", "_logsumexp"),
    ("sklearn.mixture._base", "_logsumexp"),
    ("sklearn.naive_bayes", "_logsumexp"),
    ("sklearn._loss.loss", "_logsumexp"),
]
SKLEARN_SOFTMAX = [
    ("sklearn.utils.extmath", "softmax"),
    ("sklearn.linear_model._logistic", "softmax"),
    ("sklearn._loss.loss", "softmax"),
    ("sklearn._loss.link", "softmax"),
    ("sklearn.calibration", "softmax"),
    ("sklearn.discriminant_analysis", "softmax"),
    ("sklearn.neighbors._nca", "softmax"),
    ("sklearn.ensemble._weight_boosting", "softmax"),
]


def _is_numpy(a: Any) -> bool:
    """A real NumPy array (not an array-API array, a sparse matrix or complex numbers)."""
    return isinstance(a, np.ndarray) and a.dtype.kind in "fiub"


def _replacements(calls: Counter[str]) -> dict[str, Callable[..., Any]]:
    """The stablelse stand-ins, each counting its calls and handing anything that is not a
    real NumPy array (array-API namespaces, sparse input) back to the original."""

    def scipy_logsumexp(original: Callable[..., Any]) -> Callable[..., Any]:
        def logsumexp(a: Any, axis: Any = None, b: Any = None, **kw: Any) -> Any:
            if not _is_numpy(a):
                return original(a, axis=axis, b=b, **kw)
            calls["logsumexp"] += 1
            return stablelse.logsumexp(a, axis=axis, b=b, **kw)

        return logsumexp

    def scipy_softmax(a: Any, axis: Any = None) -> Any:
        calls["softmax"] += 1
        return stablelse.softmax(a, axis=axis)

    def scipy_log_softmax(a: Any, axis: Any = None) -> Any:
        calls["log_softmax"] += 1
        return stablelse.log_softmax(a, axis=axis)

    def sklearn_logsumexp(original: Callable[..., Any]) -> Callable[..., Any]:
        def _logsumexp(array: Any, axis: Any = None, xp: Any = None) -> Any:
            if not _is_numpy(array):
                return original(array, axis=axis, xp=xp)
            calls["logsumexp"] += 1
            return stablelse.logsumexp(array, axis=axis)

        return _logsumexp

    def sklearn_softmax(original: Callable[..., Any]) -> Callable[..., Any]:
        def softmax(X: Any, copy: bool = True) -> Any:
            if not _is_numpy(X) or X.dtype.kind != "f":
                return original(X, copy=copy)
            calls["softmax"] += 1
            # copy=False: normalise X in place, as scikit-learn's own does
            return stablelse.softmax(X, axis=1, out=None if copy else X)

        return softmax

    def inplace_softmax(X: Any) -> None:
        calls["softmax"] += 1
        stablelse.softmax(X, axis=1, out=X)

    return {
        "scipy_logsumexp": scipy_logsumexp,  # type: ignore[dict-item]
        "scipy_softmax": scipy_softmax,
        "scipy_log_softmax": scipy_log_softmax,
        "sklearn_logsumexp": sklearn_logsumexp,  # type: ignore[dict-item]
        "sklearn_softmax": sklearn_softmax,  # type: ignore[dict-item]
        "inplace_softmax": inplace_softmax,
    }


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@contextlib.contextmanager
def stablelse_in_sklearn() -> Iterator[Counter[str]]:
    """Within the block, scikit-learn's logsumexp/softmax calls on NumPy arrays run in
    stablelse; yields a Counter of the calls made (``"logsumexp"``, ``"softmax"``, ...)."""
    calls: Counter[str] = Counter()
    new = _replacements(calls)
    saved: list[tuple[Any, str, Any]] = []

    def patch(mod: Any, name: str, value: Any) -> None:
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

    try:
        for modname, attr in SCIPY_STYLE:
            mod = _module(modname)
            if mod is not None and hasattr(mod, attr):
                patch(mod, attr, new["scipy_logsumexp"](getattr(mod, attr)))
        special = _module("scipy.special")
        if special is not None:
            patch(special, "softmax", new["scipy_softmax"])
            patch(special, "log_softmax", new["scipy_log_softmax"])
        for modname, attr in SKLEARN_LSE:
            mod = _module(modname)
            if mod is not None and hasattr(mod, attr):
                patch(mod, attr, new["sklearn_logsumexp"](getattr(mod, attr)))
        for modname, attr in SKLEARN_SOFTMAX:
            mod = _module(modname)
            if mod is not None and hasattr(mod, attr):
                patch(mod, attr, new["sklearn_softmax"](getattr(mod, attr)))
        nn = _module("sklearn.neural_network._base")
        activations = getattr(nn, "ACTIVATIONS", None)
        if isinstance(activations, dict) and "softmax" in activations:
            old = activations["softmax"]
            activations["softmax"] = new["inplace_softmax"]
            saved.append((activations, "__item__softmax", old))
        yield calls
    finally:
        for obj, name, value in reversed(saved):
            if name == "__item__softmax":
                obj["softmax"] = value
            else:
                setattr(obj, name, value)
