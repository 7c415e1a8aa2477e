"""The one place where an ``axis`` argument is interpreted.

Every front door (the NumPy functions, the losses, the VJPs, :class:`~stablelse.LogSumExp`,
:mod:`stablelse.dask` and :mod:`stablelse.cuda`) calls these, so the same mistake gets the
same exception everywhere:

- ``TypeError`` when an axis is not an integer (``True`` is not axis 1, as in NumPy);
- :class:`numpy.exceptions.AxisError` (a ``ValueError`` and an ``IndexError``) when it is out
  of bounds;
- ``ValueError`` for a repeated axis or an empty tuple where one axis is needed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

AxisLike = Union[int, Sequence[int], None]

__all__ = ["AxisLike", "check_axis_arg", "normalize_axes", "normalize_axis"]


_MANY = "axis must be an int, a tuple of ints or None"
_ONE = "axis must be an int"


def _as_index(ax: Any, expected: str) -> int:
    if isinstance(ax, (bool, np.bool_)):
        raise TypeError(f"{expected}, got bool")
    try:
        return operator.index(ax)
    except TypeError:
        raise TypeError(f"{expected}, got {type(ax).__name__}") from None


def _items(axis: Any) -> list[Any]:
    return list(axis) if isinstance(axis, (tuple, list)) else [axis]


def normalize_axes(axis: AxisLike, ndim: int) -> tuple[int, ...]:
    """``axis`` as a sorted tuple of distinct non-negative axes (NumPy / scipy rules).

    ``None`` means every axis. A 0-d array accepts axis 0 and -1 (as scipy's logsumexp).
    """
    if type(axis) is int and -ndim <= axis < ndim:
        return (axis % ndim,)  # the common call, answered before the general rules
    if axis is None:
        return tuple(range(ndim))
    axes = []
    for ax in _items(axis):
        a = _as_index(ax, _MANY)
        if not -ndim <= a < max(ndim, 1) or (ndim == 0 and a not in (0, -1)):
            raise np.exceptions.AxisError(
                f"axis {a} is out of bounds for an array of dimension {ndim}"
            )
        axes.append(a % ndim if ndim else 0)
    if len(set(axes)) != len(axes):
        raise ValueError(f"duplicate value in axis: {axis!r}")
    return tuple(sorted(axes))


def normalize_axis(axis: Any, ndim: int) -> int:
    """One axis (the class axis of a loss or a VJP) as a non-negative int."""
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim  # the common call, answered before the general rules
    a = _as_index(axis, _ONE)
    if not -ndim <= a < ndim:
        raise np.exceptions.AxisError(f"axis {a} is out of bounds for an array of dimension {ndim}")
    return a % ndim


def check_axis_arg(axis: AxisLike) -> int | tuple[int, ...] | None:
    """Validate ``axis`` before the array's rank is known (the streaming accumulator).

    Types and literal repeats are refused at once; bounds are checked by
    :func:`normalize_axes` once the first chunk gives the rank.
    """
    if axis is None:
        return None
    norm = tuple(_as_index(a, _MANY) for a in _items(axis))
    if not norm:
        raise ValueError("axis must not be an empty tuple")
    if len(set(norm)) != len(norm):
        raise ValueError(f"duplicate value in axis: {axis!r}")
    return norm if isinstance(axis, (tuple, list)) else norm[0]
