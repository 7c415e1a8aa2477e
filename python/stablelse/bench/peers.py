"""The libraries timed against stablelse and how each one runs an op.

A peer is any of NumPy (the stable formula written by hand), ``scipy.special``, torch and JAX
(jitted) that imports; a missing one is reported and skipped, never an error.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

import stablelse
from stablelse._api import Algorithm

from .workloads import FLOAT, Workload

PEERS = ("numpy", "scipy", "torch", "jax")
LIBRARIES = ("stablelse", *PEERS)


@dataclass
class Library:
    name: str
    version: Optional[str]
    reason: str = ""  # why it is missing, or which parts are

    @property
    def available(self) -> bool:
        return self.version is not None


def _cross_entropy() -> Optional[Callable[..., Any]]:
    return getattr(stablelse, "cross_entropy", None)


def detect_libraries(wanted: tuple[str, ...], threads: int) -> dict[str, Library]:
    """The libraries in ``wanted`` with their versions (None: not importable), each set to
    ``threads`` threads where it has a setting for it."""
    libs: dict[str, Library] = {}
    for name in wanted:
        if name == "stablelse":
            libs[name] = Library(name, stablelse.__version__)
            if _cross_entropy() is None:
                libs[name].reason = "no stablelse.cross_entropy in this build"
        elif name == "numpy":
            libs[name] = Library(name, np.__version__)
        elif name == "scipy":
            try:
                import scipy
                import scipy.special  # noqa: F401
            except ImportError:
                libs[name] = Library(name, None, "not installed")
            else:
                libs[name] = Library(name, scipy.__version__)
        elif name == "torch":
            try:
                import torch
            except ImportError:
                libs[name] = Library(name, None, "not installed")
            else:
                torch.set_num_threads(threads)
                libs[name] = Library(name, torch.__version__)
        elif name == "jax":
            if "jax" not in sys.modules and threads == 1:
                # XLA's CPU client sizes its pool from the cores; one thread must be asked
                # for before jax is imported.
                flags = os.environ.get("XLA_FLAGS", "")
                os.environ["XLA_FLAGS"] = (
                    flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
                ).strip()
            try:
                import jax
            except ImportError:
                libs[name] = Library(name, None, "not installed")
            else:
                libs[name] = Library(name, jax.__version__)
    return libs


def np_lse(x: np.ndarray) -> np.ndarray:
    """The stable logsumexp over the last axis in plain NumPy."""
    m = x.max(axis=-1, keepdims=True)
    return np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]


def np_log_softmax(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The stable log_softmax over the last axis in plain NumPy."""
    m = x.max(axis=-1, keepdims=True)
    out = np.subtract(x, m, out=out)
    out -= np.log(np.exp(out).sum(axis=-1, keepdims=True))
    return out


def make_call(
    lib: str, w: Workload, x: np.ndarray, t: np.ndarray, algorithm: Algorithm
) -> Optional[Callable[[], Any]]:
    """A zero-argument callable that runs ``w.op`` on ``x`` (targets ``t``) with ``lib``,
    everything else (output buffers, device copies, jit) prepared; None if unsupported."""
    builders = {
        "stablelse": _stablelse_call,
        "numpy": _numpy_call,
        "scipy": _scipy_call,
        "torch": _torch_call,
        "jax": _jax_call,
    }
    if lib not in builders:
        raise ValueError(f"unknown library {lib!r}")
    return builders[lib](w, x, t, algorithm)


def _stablelse_call(
    w: Workload, x: np.ndarray, t: np.ndarray, algorithm: Algorithm
) -> Optional[Callable[[], Any]]:
    op = w.op
    if op == "logsumexp":
        return lambda: stablelse.logsumexp(x, axis=-1, algorithm=algorithm)
    if op in ("softmax", "log_softmax"):
        out = np.empty_like(x)
        fn = stablelse.softmax if op == "softmax" else stablelse.log_softmax
        return lambda: fn(x, axis=-1, out=out, algorithm=algorithm)
    ce = _cross_entropy()
    if ce is None:
        return None
    if op == "xent":
        return lambda: ce(x, t)
    if "grad_out" in inspect.signature(ce).parameters:
        # A preallocated gradient, as the NumPy peer's: no page faults in the timing.
        grad = np.empty_like(x)
        return lambda: ce(x, t, return_grad=True, grad_out=grad)
    return lambda: ce(x, t, return_grad=True)


def _numpy_call(
    w: Workload, x: np.ndarray, t: np.ndarray, algorithm: Algorithm
) -> Optional[Callable[[], Any]]:
    op, rows = w.op, w.rows
    ar = np.arange(rows)
    if op == "logsumexp":
        return lambda: np_lse(x)
    out = np.empty_like(x)
    if op == "softmax":

        def softmax() -> np.ndarray:
            np.subtract(x, x.max(axis=-1, keepdims=True), out=out)
            np.exp(out, out=out)
            np.divide(out, out.sum(axis=-1, keepdims=True), out=out)
            return out

        return softmax
    if op == "log_softmax":
        return lambda: np_log_softmax(x, out)
    if op == "xent":
        return lambda: np.mean(np_lse(x) - x[ar, t])

    def xent_grad() -> tuple[Any, np.ndarray]:
        m = x.max(axis=-1, keepdims=True)
        np.subtract(x, m, out=out)
        np.exp(out, out=out)
        s = out.sum(axis=-1, keepdims=True)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - x[ar, t])
        np.divide(out, s, out=out)
        out[ar, t] -= 1
        np.multiply(out, FLOAT(1.0 / rows), out=out)
        return loss, out

    return xent_grad


def _scipy_call(
    w: Workload, x: np.ndarray, t: np.ndarray, algorithm: Algorithm
) -> Optional[Callable[[], Any]]:
    import scipy.special as sp

    op, rows = w.op, w.rows
    ar = np.arange(rows)
    if op == "logsumexp":
        return lambda: sp.logsumexp(x, axis=-1)
    if op == "softmax":
        return lambda: sp.softmax(x, axis=-1)
    if op == "log_softmax":
        return lambda: sp.log_softmax(x, axis=-1)
    if op == "xent":
        return lambda: np.mean(sp.logsumexp(x, axis=-1) - x[ar, t])

    def xent_grad() -> tuple[Any, np.ndarray]:
        loss = np.mean(sp.logsumexp(x, axis=-1) - x[ar, t])
        g = sp.softmax(x, axis=-1)
        g[ar, t] -= 1
        g *= FLOAT(1.0 / rows)
        return loss, g

    return xent_grad


def _torch_call(
    w: Workload, x: np.ndarray, t: np.ndarray, algorithm: Algorithm
) -> Optional[Callable[[], Any]]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    op = w.op
    xt = torch.from_numpy(x)
    tt = torch.from_numpy(t)

    def no_grad(f: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return f()

        return run

    if op == "logsumexp":
        return no_grad(lambda: torch.logsumexp(xt, dim=-1))
    if op == "softmax":
        return no_grad(lambda: torch.softmax(xt, dim=-1))
    if op == "log_softmax":
        return no_grad(lambda: torch.log_softmax(xt, dim=-1))
    if op == "xent":
        return no_grad(lambda: F.cross_entropy(xt, tt))
    xg = xt.clone().requires_grad_(True)

    def xent_grad() -> Any:
        xg.grad = None
        loss = F.cross_entropy(xg, tt)
        loss.backward()
        return loss, xg.grad

    return xent_grad


def _jax_call(
    w: Workload, x: np.ndarray, t: np.ndarray, algorithm: Algorithm
) -> Optional[Callable[[], Any]]:
    import jax
    import jax.numpy as jnp

    op = w.op
    xj = jax.device_put(x)
    tj = jax.device_put(t.astype(np.int32))

    def loss_fn(a: Any, tgt: Any) -> Any:
        picked = jnp.take_along_axis(a, tgt[:, None], axis=-1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(a, axis=-1) - picked)

    if op == "logsumexp":
        f = jax.jit(lambda a: jax.nn.logsumexp(a, axis=-1))
        return lambda: f(xj).block_until_ready()
    if op == "softmax":
        f = jax.jit(lambda a: jax.nn.softmax(a, axis=-1))
        return lambda: f(xj).block_until_ready()
    if op == "log_softmax":
        f = jax.jit(lambda a: jax.nn.log_softmax(a, axis=-1))
        return lambda: f(xj).block_until_ready()
    if op == "xent":
        g = jax.jit(loss_fn)
        return lambda: g(xj, tj).block_until_ready()
    vg = jax.jit(jax.value_and_grad(loss_fn))
    return lambda: jax.block_until_ready(vg(xj, tj))


def loss_value(res: Any) -> Optional[float]:
    """The scalar (or first-row) value of a result, for the cross-library sanity check."""
    try:
        if isinstance(res, tuple):
            res = res[0]
        if hasattr(res, "detach"):
            res = res.detach().numpy()
        a = np.asarray(res, dtype=np.float64).ravel()
        return float(a[0]) if a.size else None
    except Exception:
        return None


def accuracy_fns(lib: str) -> tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], Any]]:
    """``lib``'s logsumexp and log_softmax over the last axis, NumPy in, array-like out."""
    if lib == "stablelse":
        return (
            lambda x: stablelse.logsumexp(x, axis=-1),
            lambda x: stablelse.log_softmax(x, axis=-1),
        )
    if lib == "numpy":
        return np_lse, np_log_softmax
    if lib == "scipy":
        import scipy.special as sp

        return (lambda x: sp.logsumexp(x, axis=-1), lambda x: sp.log_softmax(x, axis=-1))
    if lib == "torch":
        import torch

        return (
            lambda x: torch.logsumexp(torch.from_numpy(x), dim=-1).numpy(),
            lambda x: torch.log_softmax(torch.from_numpy(x), dim=-1).numpy(),
        )
    if lib == "jax":
        import jax

        lse = jax.jit(lambda a: jax.nn.logsumexp(a, axis=-1))
        lsm = jax.jit(lambda a: jax.nn.log_softmax(a, axis=-1))
        return (lambda x: np.asarray(lse(x)), lambda x: np.asarray(lsm(x)))
    raise ValueError(lib)
