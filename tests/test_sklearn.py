"""scikit-learn as a client: estimators that normalise in log space give the same fit with
stablelse in place of scipy's and scikit-learn's own logsumexp / softmax (float64, 1e-12).

Skipped when scikit-learn is not installed. The replacement is tests/sklearn_patch.py; each
test also checks that stablelse was really called, so a scikit-learn release that moves a
name makes the test fail instead of comparing scikit-learn with itself.
"""

import importlib.util

import numpy as np
import pytest
from sklearn_patch import stablelse_in_sklearn

# scikit-learn is imported inside the tests, not at collection: importing it loads scipy's
# compiled modules into every other test module's process too.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)

RTOL = 1e-12


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12, err_msg=what)


def _blobs(n=600, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(k, d))
    y = rng.integers(0, k, size=n)
    x = centers[y] + rng.normal(size=(n, d))
    return x, y


def _fit_both(make, fit, outputs):
    """Fits ``make()`` without and with stablelse; returns both sets of ``outputs(model)`` and
    the calls stablelse served."""
    plain = outputs(fit(make()))
    with stablelse_in_sklearn() as calls:
        patched = outputs(fit(make()))
    return plain, patched, calls


def test_gaussian_mixture():
    from sklearn.mixture import GaussianMixture

    x, _ = _blobs()

    def outputs(m):
        return {
            "weights": m.weights_,
            "means": m.means_,
            "covariances": m.covariances_,
            "lower_bound": np.array(m.lower_bound_),
            "n_iter": np.array(m.n_iter_),
            "predict_proba": m.predict_proba(x),
            "score_samples": m.score_samples(x),
        }

    plain, patched, calls = _fit_both(
        lambda: GaussianMixture(n_components=3, max_iter=50, random_state=0),
        lambda m: m.fit(x),
        outputs,
    )
    assert calls["logsumexp"] > 0
    for k in plain:
        _close(patched[k], plain[k], k)


def test_multinomial_nb():
    from sklearn.naive_bayes import MultinomialNB

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, size=400)
    x = rng.poisson(lam=1.0 + y[:, None] * np.linspace(0.1, 2.0, 30)[None, :])

    def outputs(m):
        return {"log_proba": m.predict_log_proba(x), "proba": m.predict_proba(x)}

    plain, patched, calls = _fit_both(MultinomialNB, lambda m: m.fit(x, y), outputs)
    assert calls["logsumexp"] > 0
    for k in plain:
        _close(patched[k], plain[k], k)


def test_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(k=4, seed=2)

    def outputs(m):
        return {"coef": m.coef_, "proba": m.predict_proba(x), "log_proba": m.predict_log_proba(x)}

    plain, patched, calls = _fit_both(
        lambda: LogisticRegression(max_iter=200), lambda m: m.fit(x, y), outputs
    )
    assert calls["softmax"] + calls["logsumexp"] > 0
    for k in plain:
        _close(patched[k], plain[k], k)


def test_mlp_classifier():
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = _blobs(n=300, k=3, seed=3)

    def fit(m):
        with pytest.warns(ConvergenceWarning):
            return m.fit(x, y)

    def outputs(m):
        return {
            "coefs": np.concatenate([c.ravel() for c in m.coefs_]),
            "loss_curve": np.array(m.loss_curve_),
            "proba": m.predict_proba(x),
        }

    plain, patched, calls = _fit_both(
        lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0),
        fit,
        outputs,
    )
    assert calls["softmax"] > 0
    for k in plain:
        _close(patched[k], plain[k], k)


def test_in_place_softmax_on_sklearn_views_matches():
    # scikit-learn's softmax(X, copy=False) normalises X in place, sometimes on slices.
    from sklearn.utils.extmath import softmax as sk_softmax

    rng = np.random.default_rng(4)
    base = rng.normal(scale=5, size=(8, 6))
    want = sk_softmax(base.copy())
    with stablelse_in_sklearn() as calls:
        from sklearn.utils import extmath

        got = base.copy()
        res = extmath.softmax(got, copy=False)
    assert calls["softmax"] == 1
    assert res is got or np.shares_memory(res, got)
    _close(got, want, "in place")


def test_patch_is_undone():
    import scipy.special
    from sklearn.neural_network import _base

    before = (scipy.special.logsumexp, _base.ACTIVATIONS["softmax"])
    with stablelse_in_sklearn():
        assert scipy.special.logsumexp is not before[0]
    assert (scipy.special.logsumexp, _base.ACTIVATIONS["softmax"]) == before
