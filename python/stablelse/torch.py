"""stablelse as a PyTorch training drop-in: autograd functions over the stablelse kernels.

``stablelse.torch.cross_entropy`` and :class:`CrossEntropyLoss` have the signatures of
``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss``; :func:`log_softmax`,
:func:`softmax` and :func:`logsumexp` those of ``torch.nn.functional.log_softmax``,
``torch.nn.functional.softmax`` and ``torch.logsumexp``. Each is a
``torch.autograd.Function``, so ``loss.backward()`` works in an ordinary training loop:

- the cross-entropy forward computes the loss and ``d loss / d input`` in one pass over the
  logits (``stablelse.cross_entropy(..., return_grad=True)``); its backward only multiplies
  that gradient by the incoming ``grad_output`` and never reads the logits again. When no
  gradient is needed (``torch.no_grad()``, or an input that does not require grad) only the
  loss is computed;
- softmax and log_softmax save their output and take the vector-Jacobian product from it
  (``stablelse.softmax_backward`` / ``stablelse.log_softmax_backward``); the gradient of
  logsumexp is the softmax of the saved input.

CPU tensors are handed to the CPU kernels without a copy (``tensor.detach().numpy()`` shares
the tensor's memory, any strides) and the results come back through ``torch.from_numpy``,
also without a copy. CUDA tensors go through :mod:`stablelse.cuda` (the producer's stream,
results allocated by torch's caching allocator), with that path's limits; other devices raise
``TypeError``. This module imports torch; ``import stablelse`` does not.

Deviations from torch, common to every function here:

- dtypes: float32 and float64 natively; float16 is computed in float32 and returned as
  float16; bfloat16 on the CPU is converted to float32 (one copy), computed, and the result
  and gradient converted back to bfloat16 (on the GPU it is native). Other dtypes raise
  ``TypeError`` naming the dtype (torch promotes integer input of ``logsumexp``).
- First-order gradients only: the backward functions are ``once_differentiable`` (double
  backward, ``torch.autograd.gradgradcheck`` and ``torch.func`` transforms raise).
- ``torch.compile`` does not trace into these functions: they run eagerly (a graph break).
- Non-finite slices follow stablelse's (scipy's) rules; e.g. ``log_softmax`` of a slice
  holding ``+inf`` is NaN at the ``+inf`` and ``-inf`` elsewhere, where torch gives NaN
  throughout.
- The CPU kernels use stablelse's thread pool (``stablelse.set_num_threads``), not torch's.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, TypeVar, Union, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import stablelse as _sl

from ._axes import normalize_axes
from ._spec import Reduction

__all__ = ["CrossEntropyLoss", "cross_entropy", "log_softmax", "logsumexp", "softmax"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _eager(fn: _Fn) -> _Fn:
    """Keep ``torch.compile`` out of `fn` (NumPy calls): it runs eagerly, as a graph break."""
    return cast(_Fn, torch.compiler.disable(fn))  # type: ignore[no-untyped-call,unused-ignore]


# --------------------------------------------------------------------------- tensor plumbing


def _check_input(x: Any, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: input dtype {x.dtype} is not supported "
            "(float32, float64, float16 or bfloat16)"
        )
    if x.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{fn}: tensors on device {x.device} are not supported (cpu, cuda)")


def _same_device(x: Tensor, other: Any, name: str, fn: str) -> None:
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(other).__name__}")
    if other.device != x.device:
        raise RuntimeError(
            f"{fn}: expected {name} on the input's device {x.device}, got {other.device}"
        )


def _arg(t: Tensor) -> Any:
    """``t`` as a stablelse argument: a NumPy view of a CPU tensor, the tensor on CUDA."""
    t = t.detach()
    if t.device.type != "cpu":
        return t
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        t = t.float()
    return t.numpy()


def _tensor(r: Any, dtype: torch.dtype) -> Tensor:
    """A stablelse result (NumPy on the CPU, a tensor on CUDA) as a tensor of `dtype`."""
    t: Tensor = r if isinstance(r, torch.Tensor) else torch.from_numpy(np.asarray(r))
    return t if t.dtype == dtype else t.to(dtype)


def _softmax_dim(fn: str, ndim: int, stacklevel: int) -> int:
    """torch's implicit-dim rule for softmax-like functions called with ``dim=None``."""
    warnings.warn(
        f"Implicit dimension choice for {fn} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        UserWarning,
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """torch's mapping of the deprecated ``size_average`` / ``reduce`` to ``reduction``."""
    warnings.warn(
        "size_average and reduce args will be deprecated, please use reduction instead.",
        UserWarning,
        stacklevel=3,
    )
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _class_dim(x: Tensor) -> int:
    """torch's class dimension: 1 for ``(N, C, d1, ...)``, 0 for unbatched ``(C,)``."""
    return 1 if x.dim() >= 2 else 0


def _per_element(g: Tensor, x: Tensor) -> Tensor:
    """A gradient of the batch shape, broadcastable against ``x`` along its class dim."""
    return g.unsqueeze(1) if x.dim() >= 2 else g


# --------------------------------------------------------------------------- cross-entropy


def _ce(
    x: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    opts: tuple[int, str, float, float],
    return_grad: bool,
) -> Any:
    ignore_index, reduction, label_smoothing, z_loss = opts
    return _sl.cross_entropy(
        _arg(x),
        _arg(target),
        axis=_class_dim(x),
        weight=None if weight is None else _arg(weight),
        ignore_index=ignore_index,
        # torch's signature takes any str; the loss specification rejects a wrong one.
        reduction=cast(Reduction, reduction),
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        return_grad=return_grad,
    )


def _log_softmax_value(x: Tensor, dim: int) -> Tensor:
    return _tensor(_sl.log_softmax(_arg(x), axis=dim), x.dtype)


class _CrossEntropy(torch.autograd.Function):  # type: ignore[misc,unused-ignore]
    @staticmethod
    def forward(  # type: ignore[override,unused-ignore]
        ctx: Any,
        x: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        opts: tuple[int, str, float, float],
    ) -> Tensor:
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.opts = opts
        ctx.need_weight_grad = ctx.needs_input_grad[2]
        if need_x:
            loss, grad = _ce(x, target, weight, opts, return_grad=True)
            grad = _tensor(grad, x.dtype)
        else:
            loss, grad = _ce(x, target, weight, opts, return_grad=False), None
        # The target gradient (probability targets) needs log_softmax(x): keep x only then.
        ctx.save_for_backward(grad, x if need_t else None, weight if need_t else None)
        return _tensor(loss, x.dtype)

    @staticmethod
    @once_differentiable  # type: ignore[untyped-decorator,misc,unused-ignore]
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:  # type: ignore[override,unused-ignore]
        if ctx.need_weight_grad:
            raise RuntimeError("the derivative for 'weight' is not implemented")
        grad, x, weight = ctx.saved_tensors
        _, reduction, label_smoothing, _ = ctx.opts
        # The saved gradient is that of the returned loss (of each element's loss for "none",
        # whose rows depend on their own logits only): scale it by the upstream gradient.
        dx = None
        if grad is not None:
            go = _per_element(grad_output, grad) if reduction == "none" else grad_output
            dx = grad * go
        dt = None
        if x is not None:
            cls = _class_dim(x)
            # d loss / d target = -(1 - ls) * w[c] * log_softmax(x)[c], scaled by the reduction.
            dt = _log_softmax_value(x, cls).mul_(label_smoothing - 1.0)
            if weight is not None:
                shape = [1] * x.dim()
                shape[cls] = -1
                dt.mul_(weight.to(dt.dtype).reshape(shape))
            if reduction == "none":
                dt.mul_(_per_element(grad_output, x))
            else:
                scale = grad_output
                if reduction == "mean":
                    scale = scale / max(1, x.numel() // max(1, x.shape[cls]))
                dt.mul_(scale)
        return dx, dt, None, None


@_eager
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
) -> Tensor:
    """Cross-entropy between logits and class targets; ``torch.nn.functional.cross_entropy``.

    The forward pass computes the loss and, when a gradient is needed, ``d loss / d input``
    in the same pass over the logits; the backward pass multiplies that saved gradient by the
    upstream gradient and does not read the logits again.

    Parameters
    ----------
    input : Tensor
        Unnormalised logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (classes along
        dim 1, or dim 0 when unbatched), on the CPU or a CUDA device. float32, float64,
        float16 or bfloat16.
    target : Tensor
        Class indices of any integer dtype with the shape of `input` without the class dim,
        or class probabilities (floating) of `input`'s shape, on `input`'s device.
        Probability targets may require grad.
    weight : Tensor, optional
        A weight per class, shape ``(C,)``. It may not require grad (as torch, the backward
        raises ``RuntimeError``).
    size_average, reduce : bool, optional
        Deprecated, mapped to `reduction` as torch does (with torch's warning).
    ignore_index : int, optional
        Index targets equal to it contribute no loss or gradient and are not counted by
        ``"mean"``. Default -100.
    reduction : {"mean", "sum", "none"}, optional
        As torch: ``"mean"`` is ``sum(w[t] * loss) / sum(w[t])`` over the non-ignored index
        targets (NaN when all are ignored), the mean over batch elements for probability
        targets.
    label_smoothing : float, optional
        In ``[0, 1]``, as torch.
    z_loss : float, optional
        Keyword-only stablelse extension: adds ``z_loss * logsumexp(input)**2`` per
        non-ignored batch element (PaLM's auxiliary loss), averaged over their count under
        ``"mean"``. Default 0.

    Returns
    -------
    Tensor
        0-d for ``"mean"`` / ``"sum"``, of the batch shape for ``"none"``; `input`'s dtype.

    Raises
    ------
    IndexError
        A class index outside ``[0, C)`` that is not `ignore_index` (CPU; the message names
        the first one). On CUDA such a target gives a NaN loss (:mod:`stablelse.cuda`).
    TypeError
        An unsupported dtype or device, or a non-tensor argument.
    RuntimeError
        `target` or `weight` on another device than `input`.
    ValueError
        Shapes, `reduction` or `label_smoothing` that torch would also refuse.

    Notes
    -----
    Deviations from torch (besides the module-wide ones): index targets may have any integer
    dtype (torch: int64 or uint8); float32 losses are accumulated in float64 and rounded once,
    so they can differ from torch's in the last bits; a batch element whose logits hold
    ``+inf`` has loss ``+inf`` (torch: NaN); `z_loss` is an extension. On CUDA tensors the
    limits of :func:`stablelse.cuda.cross_entropy` apply: no `weight` and no probability
    targets (``NotImplementedError``).

    Examples
    --------
    >>> import torch
    >>> from stablelse.torch import cross_entropy
    >>> x = torch.tensor([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0]], requires_grad=True)
    >>> loss = cross_entropy(x, torch.tensor([0, 2]))
    >>> loss.backward()
    >>> round(loss.item(), 3), bool(torch.isfinite(x.grad).all())
    (1000.208, True)
    """
    fn = "cross_entropy"
    _check_input(input, fn)
    _same_device(input, target, "target", fn)
    if weight is not None:
        _same_device(input, weight, "weight", fn)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    opts = (ignore_index, reduction, label_smoothing, z_loss)
    needs_grad = input.requires_grad or target.requires_grad or (
        weight is not None and weight.requires_grad
    )
    if torch.is_grad_enabled() and needs_grad:
        return _CrossEntropy.apply(input, target, weight, opts)  # type: ignore[no-any-return,unused-ignore]
    return _tensor(_ce(input, target, weight, opts, return_grad=False), input.dtype)


class CrossEntropyLoss(nn.Module):  # type: ignore[misc,unused-ignore]
    """``torch.nn.CrossEntropyLoss`` computed by :func:`stablelse.torch.cross_entropy`.

    Parameters
    ----------
    weight, size_average, ignore_index, reduce, reduction, label_smoothing
        As ``torch.nn.CrossEntropyLoss`` (`weight` is a buffer: it follows ``.to()`` and is
        in the ``state_dict``).
    z_loss : float, optional
        Keyword-only stablelse extension, see :func:`cross_entropy`.

    Notes
    -----
    The deviations of :func:`cross_entropy` apply.

    Examples
    --------
    >>> import torch
    >>> from stablelse.torch import CrossEntropyLoss
    >>> loss = CrossEntropyLoss(label_smoothing=0.1)(torch.zeros(2, 3), torch.tensor([0, 1]))
    >>> round(loss.item(), 6)
    1.098612
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "z_loss"]
    weight: Optional[Tensor]

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
        )

    def extra_repr(self) -> str:
        s = f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
        if self.label_smoothing:
            s += f", label_smoothing={self.label_smoothing}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        return s


# --------------------------------------------------------------------------- softmax family


def _vjp(y: Tensor, dy: Tensor, dim: int, log: bool) -> Tensor:
    """Gradient of softmax (``log=False``) or log_softmax from its output `y`."""
    if y.device.type == "cpu":
        fn = _sl.log_softmax_backward if log else _sl.softmax_backward
        return _tensor(fn(_arg(y), _arg(dy), axis=dim), y.dtype)
    # stablelse.cuda has no VJP kernels: the same formulas as torch ops on the device.
    if log:
        return dy - torch.exp(y) * dy.sum(dim, keepdim=True)
    return y * (dy - (y * dy).sum(dim, keepdim=True))


class _Softmax(torch.autograd.Function):  # type: ignore[misc,unused-ignore]
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, log: bool) -> Tensor:  # type: ignore[override,unused-ignore]
        fn = _sl.log_softmax if log else _sl.softmax
        y = _tensor(fn(_arg(x), axis=dim), x.dtype)
        ctx.dim, ctx.log = dim, log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable  # type: ignore[untyped-decorator,misc,unused-ignore]
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override,unused-ignore]
        (y,) = ctx.saved_tensors
        return _vjp(y, dy, ctx.dim, ctx.log), None, None


def _softmax_like(
    x: Tensor, dim: Optional[int], stacklevel: int, dtype: Optional[torch.dtype], log: bool
) -> Tensor:
    fn = "log_softmax" if log else "softmax"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(x).__name__}")
    if dtype is not None:
        x = x.to(dtype)
    _check_input(x, fn)
    if dim is None:
        dim = _softmax_dim(fn, x.dim(), stacklevel)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Softmax.apply(x, dim, log)  # type: ignore[no-any-return,unused-ignore]
    f = _sl.log_softmax if log else _sl.softmax
    return _tensor(f(_arg(x), axis=dim), x.dtype)


@_eager
def softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Softmax along `dim`; ``torch.nn.functional.softmax``.

    Parameters
    ----------
    input : Tensor
        float32, float64, float16 or bfloat16, on the CPU or a CUDA device.
    dim : int
        The dimension to normalise. ``None`` picks torch's deprecated implicit dim (with its
        warning).
    _stacklevel : int, optional
        As torch, for that warning.
    dtype : torch.dtype, optional
        Cast `input` to this dtype first (as torch).

    Returns
    -------
    Tensor
        Same shape and dtype as `input`.

    Notes
    -----
    The backward pass is ``stablelse.softmax_backward`` of the saved output on the CPU; on
    CUDA, where :mod:`stablelse.cuda` has no VJP kernels, the same formula in torch ops. A
    slice whose maximum is not finite is NaN throughout (torch: the same for ``+inf``, NaN).
    See the module docstring for the deviations common to this module.

    Examples
    --------
    >>> import torch
    >>> from stablelse.torch import softmax
    >>> softmax(torch.tensor([[1000.0, 1000.0]]), dim=1)
    tensor([[0.5000, 0.5000]])
    """
    return _softmax_like(input, dim, _stacklevel + 1, dtype, log=False)


@_eager
def log_softmax(
    input: Tensor,
    dim: Optional[int] = None,
    _stacklevel: int = 3,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Log-softmax along `dim`; ``torch.nn.functional.log_softmax``.

    Parameters are those of :func:`softmax`. The backward pass is
    ``stablelse.log_softmax_backward`` of the saved output on the CPU (torch ops on CUDA).

    Notes
    -----
    Computed as ``(x - max) - log1p(sum(exp(x - max)) - 1)``, float32 accumulated in float64,
    so the top class keeps full relative accuracy where torch may round it to 0. A slice
    holding ``+inf`` gives NaN at the ``+inf`` and ``-inf`` elsewhere (torch: NaN throughout).

    Examples
    --------
    >>> import torch
    >>> from stablelse.torch import log_softmax
    >>> log_softmax(torch.tensor([0.0, 0.0], dtype=torch.float64), dim=0)
    tensor([-0.6931, -0.6931], dtype=torch.float64)
    """
    return _softmax_like(input, dim, _stacklevel + 1, dtype, log=True)


class _LogSumExp(torch.autograd.Function):  # type: ignore[misc,unused-ignore]
    @staticmethod
    def forward(  # type: ignore[override,unused-ignore]
        ctx: Any, x: Tensor, dims: tuple[int, ...], keepdim: bool
    ) -> Tensor:
        ctx.dims, ctx.keepdim = dims, keepdim
        ctx.save_for_backward(x)
        return _tensor(_sl.logsumexp(_arg(x), axis=dims, keepdims=keepdim), x.dtype)

    @staticmethod
    @once_differentiable  # type: ignore[untyped-decorator,misc,unused-ignore]
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:  # type: ignore[override,unused-ignore]
        (x,) = ctx.saved_tensors
        # d logsumexp(x) / dx = softmax(x) over the reduced dims.
        p = _tensor(_sl.softmax(_arg(x), axis=ctx.dims), x.dtype)
        if not ctx.keepdim and x.dim() > 0:
            for d in ctx.dims:  # ascending: each unsqueeze restores one reduced dim
                dy = dy.unsqueeze(d)
        return p.mul_(dy), None, None


@_eager
def logsumexp(
    input: Tensor, dim: Union[int, tuple[int, ...], list[int]], keepdim: bool = False
) -> Tensor:
    """``log(sum(exp(input)))`` over `dim`; ``torch.logsumexp``.

    Parameters
    ----------
    input : Tensor
        float32, float64, float16 or bfloat16, on the CPU or a CUDA device.
    dim : int or tuple of ints
        The dimensions to reduce (negative allowed).
    keepdim : bool, optional
        Keep the reduced dimensions with length 1.

    Returns
    -------
    Tensor
        `input`'s dtype.

    Notes
    -----
    The gradient is the softmax of the saved input over `dim`, computed by the stablelse
    kernels. Deviations: no ``out=``; integer input raises ``TypeError`` (torch promotes it);
    float32 is accumulated in float64 and rounded once. A slice holding ``+inf`` gives
    ``+inf`` and a NaN gradient, as torch.

    Examples
    --------
    >>> import torch
    >>> from stablelse.torch import logsumexp
    >>> logsumexp(torch.tensor([[1000.0, 1000.0]], dtype=torch.float64), dim=1)
    tensor([1000.6931], dtype=torch.float64)
    """
    _check_input(input, "logsumexp")
    dims = normalize_axes(dim, input.dim())
    if torch.is_grad_enabled() and input.requires_grad:
        return _LogSumExp.apply(input, dims, keepdim)  # type: ignore[no-any-return,unused-ignore]
    return _tensor(_sl.logsumexp(_arg(input), axis=dims, keepdims=keepdim), input.dtype)
