"""End-to-end time of scikit-learn estimators with and without stablelse, in the same run.

    python scripts/sklearn_speed.py [--reps 5] [--scale 1.0] [--json FILE]

For each case the estimator call is timed alternately without and with stablelse in place of
scikit-learn's and scipy's logsumexp / softmax (tests/sklearn_patch.py), best of ``--reps``
each, on the same data; the share of the call's time spent in those functions comes from one
cProfile run each way (cumulative time of the logsumexp/softmax functions over the call's
total). The results are checked equal to 1e-10 before any time is reported. Needs
scikit-learn (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sklearn_patch import stablelse_in_sklearn  # noqa: E402

HOT = {"logsumexp", "_logsumexp", "softmax", "log_softmax", "inplace_softmax"}


def _blobs(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(k, d))
    y = rng.integers(0, k, size=n)
    return centers[y] + rng.normal(size=(n, d)), y


def cases(scale: float) -> list[tuple[str, Callable[[], Callable[[], Any]]]]:
    """(label, setup) pairs; setup() fits what must be fitted beforehand and returns the
    timed zero-argument call."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.mixture import GaussianMixture
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.neural_network import MLPClassifier

    def n(k: int) -> int:
        return max(100, int(k * scale))

    def gmm(covariance_type: str) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            x, _ = _blobs(n(50_000), 8, 10, 0)
            est = GaussianMixture(
                n_components=10,
                covariance_type=covariance_type,
                max_iter=20,
                tol=0.0,
                random_state=0,
            )
            return lambda: est.fit(x).means_

        return setup

    def mnb() -> Callable[[], Any]:
        rng = np.random.default_rng(1)
        y = rng.integers(0, 20, size=n(200_000))
        x = rng.poisson(lam=0.5 + (y[:, None] % 7) * np.linspace(0.05, 1.0, 50)[None, :])
        est = MultinomialNB().fit(x, y)
        return lambda: est.predict_proba(x)

    def logreg_data() -> tuple[np.ndarray, np.ndarray]:
        return _blobs(n(200_000), 20, 10, 2)

    def logreg_proba() -> Callable[[], Any]:
        x, y = logreg_data()
        est = LogisticRegression(max_iter=50).fit(x[:5000], y[:5000])
        return lambda: est.predict_proba(x)

    def logreg_fit() -> Callable[[], Any]:
        x, y = _blobs(n(20_000), 20, 10, 2)
        est = LogisticRegression(max_iter=100, tol=0.0)
        return lambda: est.fit(x, y).coef_

    def mlp() -> Callable[[], Any]:
        x, y = _blobs(n(20_000), 20, 10, 3)
        est = MLPClassifier(hidden_layer_sizes=(32,), max_iter=5, random_state=0)
        return lambda: est.fit(x, y).coefs_[-1]

    return [
        ("GaussianMixture(10, 'full').fit, 50000x8, 20 EM steps", gmm("full")),
        ("GaussianMixture(10, 'diag').fit, 50000x8, 20 EM steps", gmm("diag")),
        ("MultinomialNB.predict_proba, 200000x50, 20 classes", mnb),
        ("LogisticRegression.predict_proba, 200000x20, 10 classes", logreg_proba),
        ("LogisticRegression.fit (lbfgs), 20000x20, 10 classes", logreg_fit),
        ("MLPClassifier(32).fit, 20000x20, 10 classes, 5 epochs", mlp),
    ]


def _share(fn: Callable[[], Any], patched: bool) -> float:
    """Share of ``fn``'s time in the logsumexp/softmax functions (the stand-ins when
    ``patched``, scikit-learn's and scipy's own otherwise), from one cProfile run."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    hot = 0.0
    for (filename, _, name), (_, _, _, cumtime, _) in stats.items():
        if name not in HOT:
            continue
        own = filename.endswith("sklearn_patch.py")
        theirs = (f"{os.sep}sklearn{os.sep}" in filename) or (f"{os.sep}scipy{os.sep}" in filename)
        if (patched and own) or (not patched and theirs):
            hot += cumtime
    return hot / total if total > 0 else float("nan")


def _values(res: Any) -> np.ndarray:
    if isinstance(res, list):
        return np.concatenate([np.ravel(r) for r in res])
    return np.asarray(res, dtype=np.float64)


def run(reps: int, scale: float) -> list[dict[str, Any]]:
    import sklearn

    import stablelse

    rows = []
    print(
        f"scikit-learn {sklearn.__version__}, stablelse {stablelse.__version__} "
        f"({stablelse.info()['simd']}, {stablelse.get_num_threads()} threads), "
        f"numpy {np.__version__}; best of {reps}, alternating without/with",
        flush=True,
    )
    for label, setup in cases(scale):
        fn = setup()
        want = _values(fn())
        with stablelse_in_sklearn() as calls:
            got = _values(fn())
        n_calls = sum(calls.values())  # 0: this call never normalises in log space
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=label)
        best = {"without": float("inf"), "with": float("inf")}
        for _ in range(reps):
            for key in ("without", "with"):
                ctx = stablelse_in_sklearn() if key == "with" else _null()
                with ctx:
                    t0 = time.perf_counter()
                    fn()
                    best[key] = min(best[key], time.perf_counter() - t0)
        share_without = _share(fn, patched=False)
        with stablelse_in_sklearn():
            share_with = _share(fn, patched=True)
        row = {
            "case": label,
            "seconds_without": best["without"],
            "seconds_with": best["with"],
            "speedup": best["without"] / best["with"],
            "share_without": share_without,
            "share_with": share_with,
            "stablelse_calls": n_calls,
        }
        rows.append(row)
        print(
            f"{label}: {best['without'] * 1e3:.1f} ms -> {best['with'] * 1e3:.1f} ms "
            f"({row['speedup']:.2f}x); logsumexp/softmax {100 * share_without:.0f}% -> "
            f"{100 * share_with:.0f}% of the time; {n_calls} calls to stablelse",
            flush=True,
        )
    return rows


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| call | without | with stablelse | speed-up | time in logsumexp/softmax "
        "(without -> with) | calls |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['seconds_without'] * 1e3:.1f} ms | "
            f"{r['seconds_with'] * 1e3:.1f} ms | {r['speedup']:.2f}x | "
            f"{100 * r['share_without']:.0f}% -> {100 * r['share_with']:.0f}% | "
            f"{r['stablelse_calls']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed calls each way (5)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale on the sample counts")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # lbfgs / MLP convergence
    rows = run(args.reps, args.scale)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
