"""The planner (``src/plan.rs``) for NumPy arrays: kernel views and results in user order.

Front doors that need a 3-D ``(outer, n, inner)`` array of their own rather than one native
call go through :func:`kernel_view` (weighted ``logsumexp``, complex input) or
:func:`kernel_view3` (the losses' class axis); the native reductions, the streaming accumulator
and Dask's block functions plan inside ``_core``. ``axes`` is always the normalised tuple of
:func:`stablelse._axes.normalize_axes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = [
    "full_to_user",
    "kernel_view",
    "kernel_view3",
    "plan",
    "reduced_to_user",
    "view_as",
]

AnyArray = npt.NDArray[Any]


def plan(x: AnyArray, axes: Sequence[int]) -> _core.Plan:
    """How the kernels see `x` reduced over `axes` (sorted, distinct, in range)."""
    addr = int(x.__array_interface__["data"][0])
    return _core.plan(x.shape, x.strides, x.itemsize, addr, tuple(axes))


def kernel_view(x: AnyArray, axes: Sequence[int]) -> tuple[AnyArray, _core.Plan]:
    """`x` as the 3-D ``(outer, n, inner)`` array the kernels read, and its plan.

    A view (maybe transposed) when the planner reads `x` directly; otherwise the one dense
    copy, in the plan's work order.
    """
    p = plan(x, axes)
    w = x.transpose(p.perm)
    if not p.direct:
        w = np.array(w, order="C", copy=True)  # also aligns: a copy is always made
    return w.reshape(p.outer, p.n, p.inner), p


def kernel_view3(x3: AnyArray) -> AnyArray:
    """A 3-D ``(outer, n, inner)`` array as the kernels read it in its own axis order (lanes
    along axis 1, as the losses' class axis): itself when they can, else the one dense copy."""
    p = plan(x3, (1,))
    if p.direct and list(p.perm) == [0, 1, 2]:
        return x3
    return np.array(x3, order="C", copy=True)


def view_as(arr: AnyArray, p: _core.Plan) -> AnyArray:
    """`arr`, of the planned input's shape, as 3-D in `p`'s work order (weights read beside
    the input): a view when the kernels can read it so, else the one copy."""
    return kernel_view3(arr.transpose(p.perm).reshape(p.outer, p.n, p.inner))


def reduced_to_user(
    res: AnyArray, p: _core.Plan, shape: Sequence[int], keepdims: bool = False
) -> AnyArray:
    """A reduction's ``(outer, inner)`` result (work order) in the input's axis order."""
    kept = p.kept
    res = res.reshape([shape[a] for a in kept])
    order = sorted(range(len(kept)), key=kept.__getitem__)
    res = res.transpose(order)
    if keepdims:
        reduced = set(p.perm[p.first : p.first + p.reduced])
        res = res.reshape([1 if a in reduced else n for a, n in enumerate(shape)])
    return res


def full_to_user(res: AnyArray, p: _core.Plan, shape: Sequence[int]) -> AnyArray:
    """A ``(outer, n, inner)`` result laid out in work order, as a view in the input's order."""
    perm = p.perm
    inv = [0] * len(perm)
    for i, a in enumerate(perm):
        inv[a] = i
    return res.reshape([shape[a] for a in perm]).transpose(inv)
