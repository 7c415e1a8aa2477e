"""The loss specification: every option of ``cross_entropy`` / ``nll_loss`` parsed once.

The NumPy, CUDA and Dask front doors all call :func:`loss_options` and :func:`target_kind`, so
one mistake gets one exception everywhere, with torch's strictness: ``label_smoothing="0.1"``
and ``z_loss=True`` are ``TypeError`` (torch refuses a string or a bool for a float argument),
an ``ignore_index`` that does not fit int64 is a ``ValueError``, and ``grad_out`` without
``return_grad=True`` is a ``ValueError`` (the return type depends on `return_grad` alone).
:class:`TargetError` is the one ``IndexError`` raised for a class index out of range; ``axis``
is interpreted by :mod:`stablelse._axes`, not here.

``where=`` (a class mask) is checked by :func:`check_where` from its shape and dtype alone, so
NumPy, device and Dask masks get the same exception; :class:`MaskedTargetError` and
:class:`MaskedProbabilityError` are the two ways a target can contradict it.
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
    "MaskedProbabilityError",
    "MaskedTargetError",
    "TargetError",
    "check_where",
    "is_full_mask",
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


def _at(position: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, position)) + "]" if position else ""


class MaskedTargetError(IndexError):
    """A class index that ``where=`` masks, in a row that keeps some class.

    An ``IndexError``, as for a class outside ``[0, C)``: with the masked classes deleted the
    index names no class of the row. ``position`` is in the target's shape; picklable.
    """

    def __init__(self, position: tuple[int, ...], value: int) -> None:
        super().__init__(position, value)
        self.position = tuple(int(i) for i in position)
        self.value = int(value)

    def __str__(self) -> str:
        return (f"target{_at(self.position)} = {self.value} is a class that where= masks "
                "in that row")

    def shifted(self, offset: tuple[int, ...]) -> MaskedTargetError:
        """The same error for a target block that starts at `offset` of the whole target."""
        return MaskedTargetError(tuple(p + o for p, o in zip(self.position, offset)), self.value)


class MaskedProbabilityError(ValueError):
    """A probability target with nonzero mass on a class that ``where=`` masks, in a row that
    keeps some class (the mass would have no class to go to). Picklable."""

    def __init__(self, position: tuple[int, ...], klass: int, value: float) -> None:
        super().__init__(position, klass, value)
        self.position = tuple(int(i) for i in position)
        self.klass = int(klass)
        self.value = float(value)

    def __str__(self) -> str:
        return (f"target{_at(self.position)} puts probability {self.value} on class "
                f"{self.klass}, which where= masks in that row")

    def shifted(self, offset: tuple[int, ...]) -> MaskedProbabilityError:
        """The same error for a target block that starts at `offset` of the whole target."""
        pos = tuple(p + o for p, o in zip(self.position, offset))
        return MaskedProbabilityError(pos, self.klass, self.value)


def core_error(exc: Exception, batch_shape: tuple[int, ...]) -> Exception:
    """A kernel's target error (a lane of the C-ordered batch) restated in `batch_shape`."""

    def pos(lane: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(lane, batch_shape)) if batch_shape else ()

    facts = getattr(exc, "masked_target", None)
    if facts is not None:
        return MaskedTargetError(pos(facts[0]), facts[1])
    facts = getattr(exc, "masked_probability", None)
    if facts is not None:
        return MaskedProbabilityError(pos(facts[0]), facts[1], facts[2])
    if isinstance(exc, IndexError):
        return TargetError.from_core(exc, batch_shape)
    return exc


def _where_facts(where: Any) -> tuple[tuple[Any, ...], Any]:
    """``(shape, dtype)`` of a mask of any array library, without copying a device array."""
    shape, dtype = getattr(where, "shape", None), getattr(where, "dtype", None)
    if shape is None or dtype is None:
        try:
            arr = np.asarray(where)
        except ValueError as exc:
            raise ValueError(f"where is not a rectangular array: {exc}") from None
        return arr.shape, arr.dtype
    return tuple(shape), dtype


def is_full_mask(where: Any, shape: tuple[Any, ...]) -> bool:
    """Whether `where` is a NumPy bool array of `shape` already: the common mask, which every
    front door takes as it is, with no check or broadcast beyond this (each costs microseconds
    a call)."""
    return type(where) is np.ndarray and where.dtype == np.bool_ and where.shape == shape


def check_where(where: Any, x_shape: tuple[Any, ...], name: str = "logits") -> None:
    """Check a ``where=`` mask against the shape of `name` (every front door calls this).

    ``TypeError`` unless it holds booleans (a NumPy, device or Dask array, or nested lists);
    ``ValueError`` unless it broadcasts to `x_shape` (NumPy's rules, without changing
    `x_shape`), or when a shape is not known yet (a Dask array with unknown chunk sizes).
    """
    if is_full_mask(where, x_shape):
        return
    shape, dtype = _where_facts(where)
    if str(dtype) not in ("bool", "torch.bool"):
        raise TypeError(f"where must be a bool array, got dtype {dtype}")
    for what, sh in (("where", shape), (name, x_shape)):
        if not _known(sh):
            raise ValueError(
                f"{what} has chunks of unknown size; call .compute_chunk_sizes() on it first"
            )
    x_shape = tuple(int(s) for s in x_shape)
    shape = tuple(int(s) for s in shape)
    ok = len(shape) <= len(x_shape) and all(
        a in (1, b) for a, b in zip(shape[::-1], x_shape[::-1])
    )
    if not ok:
        raise ValueError(f"where of shape {shape} does not broadcast to the {name}' shape "
                         f"{x_shape}")


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
    # ml_dtypes' bfloat16 is a floating type to NumPy's eyes only by name (its kind is "V");
    # the name is looked up only then (it costs a microsecond a call).
    kind = t_dtype.kind
    if kind == "V" and t_dtype.name == "bfloat16":
        kind = "f"
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
    try:
        w = np.asarray(weight)
    except ValueError as exc:
        raise ValueError(f"weight is not a rectangular array: {exc}") from None
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
