"""The loss specification: every option of ``cross_entropy`` / ``nll_loss`` parsed once.

The NumPy, CUDA and Dask front doors all call :func:`loss_options` and :func:`target_kind`, so
one mistake gets one exception everywhere, with torch's strictness: ``label_smoothing="0.1"``
and ``z_loss=True`` are ``TypeError`` (torch refuses a string or a bool for a float argument),
an ``ignore_index`` that does not fit int64 is a ``ValueError``, and ``grad_out`` without
``return_grad=True`` is a ``ValueError`` (the return type depends on `return_grad` alone).
:class:`TargetError` is the one ``IndexError`` raised for a class index out of range; ``axis``
is interpreted by :mod:`stablelse._axes`, not here.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, NamedTuple, Optional

import numpy as np

__all__ = [
    "REDUCTIONS",
    "LossOptions",
    "Reduction",
    "TargetError",
    "loss_options",
    "target_kind",
    "weight_array",
]

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum", "none")
_REDUCTION_SET = frozenset(REDUCTIONS)
_new_tuple = tuple.__new__
_INT64 = (-(2**63), 2**63 - 1)


class LossOptions(NamedTuple):
    """The scalar options of a loss call, validated."""

    ignore_index: int
    reduction: Reduction
    label_smoothing: float
    z_loss: float
    return_grad: bool


class TargetError(IndexError):
    """A class index outside ``[0, classes)`` that is not ``ignore_index``.

    ``position`` is the index of the offending element in the target's shape (``()`` for a
    scalar target). The constructor's arguments are the exception's ``args``, so it survives
    pickling (Dask workers).
    """

    def __init__(self, position: tuple[int, ...], value: int, classes: int) -> None:
        super().__init__(position, value, classes)
        self.position = tuple(int(i) for i in position)
        self.value = int(value)
        self.classes = int(classes)

    def __str__(self) -> str:
        at = "[" + ", ".join(map(str, self.position)) + "]" if self.position else ""
        return f"target{at} = {self.value} is outside [0, {self.classes})"

    def shifted(self, offset: tuple[int, ...]) -> TargetError:
        """The same error for a target block that starts at `offset` of the whole target."""
        return TargetError(tuple(p + o for p, o in zip(self.position, offset)), self.value,
                           self.classes)

    @classmethod
    def from_core(cls, exc: IndexError, batch_shape: tuple[int, ...]) -> IndexError:
        """The kernels' out-of-range error (a lane of the C-ordered target) in `batch_shape`."""
        facts = getattr(exc, "target_error", None)
        if facts is None:
            return exc
        lane, value, classes = facts
        pos = tuple(int(i) for i in np.unravel_index(lane, batch_shape)) if batch_shape else ()
        return cls(pos, value, classes)


def _float_option(name: str, value: Any) -> float:
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _reduction(reduction: Any) -> Reduction:
    if reduction == "mean" and type(reduction) is str:
        return "mean"
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction  # type: ignore[return-value]  # checked against REDUCTIONS


def _ignore_index(ignore_index: Any) -> int:
    if type(ignore_index) is not int:
        if isinstance(ignore_index, (bool, np.bool_)):
            raise TypeError("ignore_index must be an int, got bool")
        try:
            ignore_index = operator.index(ignore_index)
        except TypeError:
            raise TypeError(
                f"ignore_index must be an int, got {type(ignore_index).__name__}"
            ) from None
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index {ignore_index} does not fit in int64")
    return int(ignore_index)


def loss_options(
    *,
    ignore_index: Any = -100,
    reduction: Any = "mean",
    label_smoothing: Any = 0.0,
    z_loss: Any = 0.0,
    return_grad: Any = False,
    grad_out: Any = None,
) -> LossOptions:
    """Validate the scalar options of ``cross_entropy`` / ``nll_loss`` (torch's rules).

    Raises ``TypeError`` for a wrong type (a str or bool where a float is expected, a
    non-integer `ignore_index`, a non-bool `return_grad`, a non-str `reduction`) and
    ``ValueError`` for a value outside its domain.
    """
    if (
        type(label_smoothing) is float
        and type(z_loss) is float
        and type(ignore_index) is int
        and type(return_grad) is bool
        and (grad_out is None or return_grad)
        and 0.0 <= label_smoothing <= 1.0
        and 0.0 <= z_loss < math.inf
        and _INT64[0] <= ignore_index <= _INT64[1]
        and reduction in _REDUCTION_SET
        and type(reduction) is str
    ):
        # tuple.__new__ skips NamedTuple's Python-level constructor: this is the per-call path.
        return _new_tuple(
            LossOptions, (ignore_index, reduction, label_smoothing, z_loss, return_grad)
        )
    # Something is unusual: the same rules, one at a time, with a message for each.
    ls = _float_option("label_smoothing", label_smoothing)
    zl = _float_option("z_loss", z_loss)
    if not 0.0 <= ls <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (math.isfinite(zl) and zl >= 0.0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss!r}")
    if not isinstance(return_grad, (bool, np.bool_)):
        raise TypeError(f"return_grad must be a bool, got {type(return_grad).__name__}")
    if grad_out is not None and not return_grad:
        raise ValueError("grad_out is given but return_grad is False")
    return LossOptions(
        _ignore_index(ignore_index), _reduction(reduction), ls, zl, bool(return_grad)
    )


def _known(shape: tuple[Any, ...]) -> bool:
    return all(isinstance(s, (int, np.integer)) for s in shape)


def target_kind(
    t_shape: tuple[Any, ...],
    t_dtype: np.dtype[Any],
    x_shape: tuple[Any, ...],
    ax: int,
    allow_probs: bool,
    ignore_index: int,
) -> Literal["index", "probs"]:
    """Which kind of target this is, decided by shape and dtype as torch does.

    ``"index"``: integer class indices shaped like the logits without `ax`; ``"probs"``: float
    class probabilities shaped like the logits (only where `allow_probs`). Anything else is a
    ``TypeError`` (wrong dtype) or ``ValueError`` (wrong shape), and so is a shape that is not
    known yet (a Dask array with unknown chunk sizes).
    """
    batch_shape = tuple(x_shape[:ax]) + tuple(x_shape[ax + 1 :])
    kind = t_dtype.kind
    t_shape = tuple(t_shape)
    if t_shape == batch_shape and kind in "iu":  # NaN sizes never compare equal
        return "index"
    for name, shape in (("target", t_shape), ("logits", x_shape)):
        if not _known(shape):
            raise ValueError(
                f"{name} has chunks of unknown size; call .compute_chunk_sizes() on it first"
            )
    if kind not in "iuf":
        raise TypeError(
            "target must hold integer class indices or float class probabilities, "
            f"got dtype {t_dtype}"
        )
    if allow_probs and t_shape == tuple(x_shape) and kind == "f":
        if ignore_index >= 0:
            raise ValueError(
                "ignore_index is not supported for class-probability targets (torch)"
            )
        return "probs"
    if t_shape == batch_shape:
        raise TypeError(f"class-index target must have an integer dtype, got {t_dtype}")
    if allow_probs and t_shape == tuple(x_shape):
        raise TypeError(f"class-probability target must have a floating dtype, got {t_dtype}")
    expected = f"{batch_shape} (class indices: the logits' shape without axis {ax})"
    if allow_probs:
        expected += f" or {tuple(x_shape)} (class probabilities)"
    raise ValueError(f"target has shape {t_shape}; expected {expected}")


def weight_array(weight: Any, classes: int, dtype: np.dtype[Any]) -> Optional[np.ndarray]:
    """The class weights as an aligned contiguous `dtype` array of shape ``(classes,)``."""
    if weight is None:
        return None
    w = np.asarray(weight)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"weight must be a real numeric array, got dtype {w.dtype}")
    if w.shape != (classes,):
        raise ValueError(f"weight must have one entry per class, shape ({classes},), got {w.shape}")
    w = np.ascontiguousarray(w, dtype=dtype)
    return w if w.flags.aligned else w.copy()  # the binding reads aligned buffers only


def first_out_of_range(
    t: np.ndarray, classes: int, ignore_index: int
) -> Optional[TargetError]:
    """The first target outside ``[0, classes)`` that is not `ignore_index`, found in Python.

    Only for what the kernels cannot be given: uint64 values above the int64 range.
    """
    ign = np.uint64(ignore_index) if ignore_index >= 0 else None
    bad = t >= np.uint64(classes)
    if ign is not None:
        bad &= t != ign
    if not bad.any():
        return None
    pos = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.ravel())), t.shape))
    return TargetError(pos, int(t[pos]), classes)
