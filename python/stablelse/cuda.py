"""stablelse on CUDA device arrays: CuPy arrays, PyTorch CUDA tensors, JAX GPU arrays.

The functions here have the signatures of the CPU ones (``stablelse.logsumexp`` and friends,
which dispatch here for device arrays) and compute on the device that holds the input,
without a host round trip:

- Inputs are read in place through ``__cuda_array_interface__`` (v2/v3) or DLPack
  (``__dlpack__`` / ``__dlpack_device__``); stablelse never takes ownership of, or frees, the
  caller's memory.
- Work is queued on the producer's stream: PyTorch's current stream for tensors, CuPy's current
  stream for CuPy arrays, the ``stream`` of a v3 ``__cuda_array_interface__`` otherwise. Calls
  are asynchronous like any other op on that stream.
- Outputs are allocated by the input's own library (``torch.empty`` / ``cupy.empty``), so its
  caching allocator and streams apply. JAX inputs get JAX results (through DLPack); other
  producers get CuPy arrays (or PyTorch tensors when CuPy is missing).
- float32, bfloat16 and float16 are computed with float32 accumulation and returned in the
  input's dtype; float64 is computed in float64. Other dtypes raise ``TypeError``.
- The fast layout is a reduction over the last axis (rows); other axes are moved to the end
  with one copy made by the input's library.
- Kernels are compiled by NVRTC on first use for the device's own architecture (about ten
  seconds per dtype, once per machine: the CUBIN is cached under ``~/.cache/stablelse/cuda``,
  or ``$XDG_CACHE_HOME``, or ``STABLELSE_CACHE_DIR``; an empty value turns the disk cache
  off). NVRTC is found on the loader path or in the pip package ``nvidia-cuda-nvrtc``
  (``STABLELSE_NVRTC_LIB`` names the library file, ``STABLELSE_NVRTC_DIR`` a directory).
- Row length picks the kernel: one warp per row (up to 1024 elements for softmax-like ops,
  the row held in registers; up to 4096 for logsumexp and the loss alone), one block per row
  with the row cached in shared memory (up to 64 KiB of row on sm_90: 16k float32 or 32k
  16-bit elements; 32k elsewhere), clusters of 8 or 16 blocks sharing a row through
  distributed shared memory on sm_90 (up to 262144), and split rows with a (max, sum) merge
  beyond. Every tier reads a row from memory once where its cache allows.

Deviations from the CPU path (stated in each docstring): ``logsumexp`` has no ``b=`` or
``return_sign=``; ``cross_entropy`` has no ``weight=`` and no probability (soft-label)
targets, and a target outside ``[0, C)`` that is not ``ignore_index`` gives a NaN loss (and
NaN gradient row) instead of ``IndexError``, because checking would need a device
synchronisation.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _core
from ._axes import AxisLike, normalize_axes, normalize_axis
from ._spec import Reduction, check_where, loss_options, target_kind

__all__ = [
    "cross_entropy",
    "device_info",
    "info",
    "is_available",
    "log_softmax",
    "logsumexp",
    "softmax",
]


_BUILT = hasattr(_core, "_cuda_is_available")
_FLOATS = ("float32", "float64", "bfloat16", "float16")


def _register_nvrtc_dirs() -> None:
    """Tells the native loader where the pip package nvidia-cuda-nvrtc keeps libnvrtc."""
    if not _BUILT:
        return
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    for root in spec.submodule_search_locations:
        for sub in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                _core._cuda_add_nvrtc_dir(d)


_register_nvrtc_dirs()


def is_available() -> bool:
    """True when this build has CUDA support, libcuda loads and a device is present.

    Never raises: a missing driver, a machine without a GPU or a build without the ``cuda``
    feature all give ``False``.
    """
    if not _BUILT:
        return False
    try:
        return bool(_core._cuda_is_available())
    except BaseException:  # noqa: BLE001 - a probe must not raise, whatever happens below
        return False


def info() -> dict[str, Any]:
    """CUDA status: ``available``, ``driver_version``, ``nvrtc_version``, ``devices`` (name,
    compute capability, multiprocessors, memory) and ``error`` / ``nvrtc_error`` explaining
    what is missing."""
    if not _BUILT:
        return {"available": False, "built": False, "reason": "built without the cuda feature"}
    try:
        d = dict(_core._cuda_info())
    except BaseException as exc:  # noqa: BLE001
        return {"available": False, "built": True, "error": repr(exc)}
    d["built"] = True
    return d


def device_info(device: int = 0) -> dict[str, Any]:
    """Facts about one device (see :func:`info`); ``ValueError`` if it does not exist."""
    for d in info().get("devices", []):
        if d["ordinal"] == device:
            return d
    raise ValueError(f"CUDA device {device} is not available")


def _require() -> None:
    if not _BUILT:
        raise RuntimeError("this stablelse build has no CUDA support (cargo feature 'cuda')")


# --------------------------------------------------------------------------- libraries


def _library(x: Any) -> str:
    mod = type(x).__module__
    for name in ("torch", "cupy", "jax"):
        if mod == name or mod.startswith(name + ".") or mod.startswith(name + "lib"):
            return name
    return "other"


def _parse(x: Any, stream: int | None = None) -> dict[str, Any]:
    return _core._cuda_parse(x, stream)


class _Torch:
    name = "torch"

    def __init__(self) -> None:
        import torch  # noqa: PLC0415

        self.t = torch
        self.dtypes = {
            torch.float32: "float32",
            torch.float64: "float64",
            torch.bfloat16: "bfloat16",
            torch.float16: "float16",
            torch.int32: "int32",
            torch.int64: "int64",
        }

    def dtype(self, x: Any) -> str:
        return self.dtypes.get(x.dtype, str(x.dtype))

    def describe(self, x: Any, stream: int | None = None) -> dict[str, Any]:
        """What the protocols would say, read from torch directly (CAI costs tens of us and
        cannot express bfloat16)."""
        return {"ptr": x.data_ptr(), "shape": tuple(x.shape), "strides": tuple(x.stride()),
                "dtype": self.dtype(x), "readonly": False}

    def ndim(self, x: Any) -> int:
        return int(x.dim())

    def device(self, x: Any) -> int:
        if x.device.type != "cuda":
            raise ValueError(f"expected a CUDA tensor, got one on {x.device}")
        return int(x.device.index or 0)

    def stream(self, x: Any, device: int) -> int:
        return int(self.t.cuda.current_stream(device).cuda_stream)

    def permute(self, x: Any, perm: Sequence[int]) -> Any:
        return x.permute(*perm)

    def contiguous(self, x: Any) -> Any:
        return x.contiguous()

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        return x.reshape(tuple(shape))

    def empty(self, shape: Sequence[int], like: Any, dtype: Any = None) -> Any:
        return self.t.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype,
                            device=like.device)

    def fill(self, x: Any, value: float) -> None:
        x.fill_(value)

    def copy_into(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def wrap(self, y: Any, like: Any) -> Any:
        return y


class _Cupy:
    name = "cupy"

    def __init__(self) -> None:
        import cupy  # noqa: PLC0415

        self.cp = cupy

    def dtype(self, x: Any) -> str:
        return str(x.dtype)

    def describe(self, x: Any, stream: int | None = None) -> dict[str, Any]:
        es = x.itemsize
        return {"ptr": int(x.data.ptr), "shape": tuple(x.shape),
                "strides": tuple(st // es for st in x.strides), "dtype": self.dtype(x),
                "readonly": False}

    def ndim(self, x: Any) -> int:
        return int(x.ndim)

    def device(self, x: Any) -> int:
        return int(x.device.id)

    def stream(self, x: Any, device: int) -> int:
        with self.cp.cuda.Device(device):
            return int(self.cp.cuda.get_current_stream().ptr)

    def permute(self, x: Any, perm: Sequence[int]) -> Any:
        return x.transpose(tuple(perm))

    def contiguous(self, x: Any) -> Any:
        return self.cp.ascontiguousarray(x)

    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        return x.reshape(tuple(shape))

    def empty(self, shape: Sequence[int], like: Any, dtype: Any = None) -> Any:
        with self.cp.cuda.Device(like.device.id):
            return self.cp.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype)

    def fill(self, x: Any, value: float) -> None:
        x.fill(value)

    def copy_into(self, dst: Any, src: Any) -> None:
        dst[...] = src

    def wrap(self, y: Any, like: Any) -> Any:
        return y


class _Foreign:
    """JAX and other producers: read through the protocols, compute with CuPy (or torch)
    arrays, hand JAX results back through DLPack."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        try:
            self.base: Any = _Cupy()
        except ImportError:
            try:
                self.base = _Torch()
            except ImportError as exc:
                raise TypeError(
                    "stablelse.cuda needs CuPy or PyTorch to hold results for "
                    f"{kind} arrays"
                ) from exc
        self.name = self.base.name

    def adopt(self, x: Any) -> Any:
        """A CuPy array / torch tensor viewing x's memory (zero copy)."""
        if self.base.name == "cupy":
            cp = self.base.cp
            if hasattr(x, "__cuda_array_interface__"):
                try:
                    return cp.asarray(x)
                except Exception:  # noqa: BLE001 - fall back to DLPack
                    pass
            return cp.from_dlpack(x)
        return self.base.t.from_dlpack(x)

    def wrap(self, y: Any, like: Any) -> Any:
        if self.kind == "jax":
            import jax.numpy as jnp  # noqa: PLC0415

            return jnp.from_dlpack(y)
        return y


_LIBS: dict[str, Any] = {}


def _lib_for(x: Any) -> tuple[Any, Any, Any]:
    """(adapter, array in the adapter's library, wrapper adapter for the results)."""
    kind = _library(x)
    if kind not in _LIBS:
        _LIBS[kind] = {"torch": _Torch, "cupy": _Cupy}.get(kind, lambda: _Foreign(kind))()
    lib = _LIBS[kind]
    if isinstance(lib, _Foreign):
        return lib.base, lib.adopt(x), lib
    return lib, x, lib


# --------------------------------------------------------------------------- layout


def _rows_view(d: dict[str, Any], nouter: int) -> tuple[int, int, int] | None:
    """(rows, cols, row stride) when the array is rows of unit-stride elements: the last
    ``ndim - nouter`` axes C-contiguous and the outer axes collapsible to one stride."""
    shape, strides = list(d["shape"]), list(d["strides"])
    inner_shape, inner_str = shape[nouter:], strides[nouter:]
    cols = math.prod(inner_shape)
    acc = 1
    for n, s in zip(reversed(inner_shape), reversed(inner_str)):
        if n != 1 and s != acc:
            return None
        acc *= n
    rows = math.prod(shape[:nouter])
    ld = None
    expect = None
    for n, s in zip(reversed(shape[:nouter]), reversed(strides[:nouter])):
        if n == 1:
            continue
        if ld is None:
            ld, expect = s, s * n
        elif s != expect:
            return None
        else:
            expect = s * n
    if ld is None:
        ld = cols
    if rows > 1 and (ld < cols or ld <= 0):
        return None
    return rows, cols, ld


class _Rows:
    """An array laid out as rows for the kernels, with the way back to the caller's shape."""

    def __init__(self, x: Any, axes: list[int], what: str) -> None:
        _require()
        self.lib, arr, self.wrapper = _lib_for(x)
        self.device = self.lib.device(arr)
        self.stream = self.lib.stream(arr, self.device)
        d = self.lib.describe(arr, self.stream)
        self.dtype = d["dtype"]
        if self.dtype not in _FLOATS:
            raise TypeError(
                f"{what}: dtype {self.dtype} is not supported on the CUDA path "
                "(float32, float64, bfloat16, float16)"
            )
        shape = list(d["shape"])
        ndim = len(shape)
        self.shape = shape
        self.axes = axes
        self.outer = [a for a in range(ndim) if a not in axes]
        self.perm = self.outer + axes
        self.moved = self.perm != list(range(ndim))
        view = None if self.moved else _rows_view(d, len(self.outer))
        if view is None:
            arr = self.lib.contiguous(self.lib.permute(arr, self.perm))
            d = self.lib.describe(arr, self.stream)
            view = _rows_view(d, len(self.outer))
            assert view is not None
        self.arr = arr
        self.desc = d
        self.rows, self.cols, self.ld = view
        self.outer_shape = [shape[a] for a in self.outer]
        self.moved_shape = [shape[a] for a in self.perm]

    def parse(self, y: Any) -> dict[str, Any]:
        if _library(y) == self.lib.name:
            return self.lib.describe(y, self.stream)
        return _parse(y, self.stream)

    def x_arg(self) -> tuple[int, int, int, int]:
        return (int(self.desc["ptr"]), self.rows, self.cols, self.ld)

    def place(self) -> tuple[int, int]:
        return (self.device, self.stream)

    def unpermute(self, y: Any) -> Any:
        """y laid out as the moved array -> the caller's axis order (a view)."""
        if not self.moved:
            return y
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        return self.lib.permute(y, inv)


def _span(d: dict[str, Any], esize: int) -> tuple[int, int]:
    lo = hi = int(d["ptr"])
    for n, st in zip(d["shape"], d["strides"]):
        if n == 0:
            return lo, lo
        ext = (n - 1) * st * esize
        if ext < 0:
            lo += ext
        else:
            hi += ext
    return lo, hi + esize


_ESIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def _check_out(out: Any, shape: Sequence[int], r: _Rows) -> dict[str, Any]:
    d = r.parse(out)
    if list(d["shape"]) != list(shape):
        raise ValueError(f"out has shape {tuple(d['shape'])}, expected {tuple(shape)}")
    if d["dtype"] != r.dtype:
        raise TypeError(f"out has dtype {d['dtype']}, expected {r.dtype}")
    if d["readonly"]:
        raise ValueError("out is read-only")
    es = _ESIZE[r.dtype]
    a0, a1 = _span(d, es)
    b0, b1 = _span(r.desc, es)
    same = int(d["ptr"]) == int(r.desc["ptr"]) and tuple(d["strides"]) == tuple(
        r.desc["strides"]) and tuple(d["shape"]) == tuple(r.desc["shape"])
    if a0 < b1 and b0 < a1 and not same:
        raise ValueError("out partially overlaps the input (only out=x, exactly, is allowed)")
    return d


# --------------------------------------------------------------------------- row ops


def _rowwise(op: str, x: Any, axis: AxisLike, out: Any, what: str) -> Any:
    lib0, arr0, _ = _lib_for(x)
    ndim = lib0.ndim(arr0)
    scalar = ndim == 0
    if scalar:
        x = lib0.reshape(arr0, (1,))
        axes = [0]
    else:
        axes = list(normalize_axes(axis, ndim))
    r = _Rows(x, axes, what)
    direct = None
    if out is not None and not scalar:
        od = _check_out(out, r.shape, r)
        if not r.moved:
            v = _rows_view(od, len(r.outer))
            if v is not None and v[:2] == (r.rows, r.cols):
                direct = (int(od["ptr"]), v[2])
    if direct is not None:
        y = out
    else:
        y = r.lib.empty(r.moved_shape, r.arr)
        direct = (int(r.parse(y)["ptr"]), r.cols)
    if r.rows > 0:
        _core._cuda_rows(op, r.dtype, r.place(), r.x_arg(), direct)
    if y is out:
        return out
    y = r.unpermute(y)
    if scalar:
        y = r.lib.reshape(y, ())
    if out is not None:
        _check_out(out, list(r.parse(y)["shape"]), r)
        r.lib.copy_into(out, y)
        return out
    return r.wrapper.wrap(y, x)


def logsumexp(
    a: Any,
    axis: AxisLike = None,
    b: Any = None,
    keepdims: bool = False,
    return_sign: bool = False,
    *,
    out: Any = None,
) -> Any:
    """``log(sum(exp(a)))`` over `axis` of a CUDA array, on its device.

    Same semantics as :func:`stablelse.logsumexp` (scipy's): ``-inf`` for an empty or all
    ``-inf`` slice, ``+inf`` if any ``+inf``, NaN if any NaN; result in the input's dtype.

    Parameters
    ----------
    a : CUDA array (CuPy, torch, JAX or any ``__cuda_array_interface__`` / DLPack producer)
        float32, float64, bfloat16 or float16.
    axis : None or int or tuple of ints, optional
        Axes to reduce; None (default) reduces all of them.
    keepdims : bool, optional
        Keep the reduced axes as length-1 dimensions.
    out : CUDA array, optional
        Receives the result (right shape and dtype); returned.

    Notes
    -----
    ``b=`` and ``return_sign=`` are not supported on the CUDA path (``NotImplementedError``).
    Accumulation is in float32 for 16- and 32-bit inputs (float64 for float64); the float32
    result is within a few ULPs of the exact value (the CPU path rounds once).
    """
    if b is not None:
        raise NotImplementedError("logsumexp: b= is not supported on the CUDA path")
    if return_sign:
        raise NotImplementedError("logsumexp: return_sign=True is not supported on the CUDA path")
    lib0, arr0, _ = _lib_for(a)
    ndim = lib0.ndim(arr0)
    if ndim == 0:
        a = lib0.reshape(arr0, (1,))
        axes = [0]
    else:
        axes = list(normalize_axes(axis, ndim))
    r = _Rows(a, axes, "a")
    if keepdims and ndim > 0:
        rshape = [1 if i in axes else n for i, n in enumerate(r.shape)]
    else:
        rshape = list(r.outer_shape)
    y = None
    if out is not None:
        od = _check_out(out, rshape, r)
        if _rows_view(od, len(rshape)) in ((r.rows, 1, 1), (r.rows, 1, 0)) or r.rows <= 1:
            y = out
    if y is None:
        y = r.lib.empty(r.outer_shape, r.arr)
    if r.rows > 0:
        _core._cuda_rows("logsumexp", r.dtype, r.place(), r.x_arg(),
                         (int(r.parse(y)["ptr"]), 1))
    if y is out:
        return out
    y = r.lib.reshape(y, rshape)
    if out is not None:
        r.lib.copy_into(out, y)
        return out
    return r.wrapper.wrap(y, a)


def softmax(x: Any, axis: AxisLike = None, *, out: Any = None) -> Any:
    """``exp(x) / sum(exp(x))`` over `axis` of a CUDA array, on its device.

    Semantics of :func:`stablelse.softmax` (scipy's): a slice whose maximum is not finite
    (``+inf``, all ``-inf``, NaN) gives NaN throughout the slice. `axis` None (default)
    normalises over all elements. Result in the input's dtype (float32 accumulation for 16-bit
    inputs); `out` may be given (and may be `x` itself).

    Notes
    -----
    The last axis is the fast layout; other axes are moved to the end with one copy and the
    result is returned as a view in the caller's axis order.
    """
    return _rowwise("softmax", x, axis, out, "x")


def log_softmax(x: Any, axis: AxisLike = None, *, out: Any = None) -> Any:
    """``x - logsumexp(x)`` over `axis` of a CUDA array, on its device.

    Semantics of :func:`stablelse.log_softmax`: computed as ``(x - max) - log1p(excess)`` so
    the top class keeps full relative accuracy; a slice whose maximum is not finite gives NaN.
    See :func:`softmax` for layouts, dtypes and `out`.
    """
    return _rowwise("log_softmax", x, axis, out, "x")


# --------------------------------------------------------------------------- losses


def cross_entropy(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_grad: bool = False,
    grad_out: Any = None,
    where: Any = None,
) -> Any:
    """Cross-entropy of CUDA `logits` against integer class `target`, on the device.

    Per row: ``lse - (1 - eps) * x[t] - eps / C * sum(x) + z_loss * lse**2`` with
    ``lse = logsumexp(x)`` and ``eps = label_smoothing`` (torch's ``F.cross_entropy`` plus
    PaLM's z-loss).

    Parameters
    ----------
    logits : CUDA array, float32 / float64 / bfloat16 / float16
        Classes along `axis` (default -1; ``axis=1`` is torch's (N, C, d1, ...) layout).
    target : CUDA int32 / int64 array
        Class indices, of logits' shape without `axis`.
    ignore_index : int
        Targets equal to it contribute 0 loss and a zero gradient and are not counted by
        ``"mean"``.
    reduction : {"mean", "sum", "none"}
        "mean" divides the sum by the number of non-ignored targets (NaN if there is none).
    label_smoothing : float in [0, 1]
    z_loss : float
    return_grad : bool
        Also return ``dlogits`` computed in the same pass over the logits: the gradient of the
        returned loss (of its sum for ``"none"``).
    grad_out : CUDA array, optional
        With `return_grad`, receives the gradient (logits' shape and dtype) and is returned.
    where : array, optional
        Not supported on the CUDA path: a mask is checked as on the CPU (a non-bool or
        non-broadcastable mask gets the same exception), then refused with
        ``NotImplementedError``.

    Returns
    -------
    loss, or (loss, dlogits). The loss is a 0-d array (or of target's shape for "none") and
    the gradient has logits' shape, both in logits' dtype.

    Notes
    -----
    Deviations from the CPU path: ``weight=`` and probability targets are not supported
    (``NotImplementedError``); a target outside ``[0, C)`` other than `ignore_index` gives a
    NaN loss and NaN gradient row rather than ``IndexError`` (checking needs a device sync).
    """
    opts = loss_options(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        return_grad=return_grad,
        grad_out=grad_out,
    )
    if where is not None:
        check_where(where, tuple(getattr(logits, "shape", np.shape(logits))))
        raise NotImplementedError("cross_entropy: where= is not supported on the CUDA path")
    if weight is not None:
        raise NotImplementedError("cross_entropy: weight= is not supported on the CUDA path")
    lib0, arr0, _ = _lib_for(logits)
    ndim = lib0.ndim(arr0)
    if ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes)")
    ax = normalize_axis(axis, ndim)
    r = _Rows(logits, [ax], "logits")
    tlib, tarr, _ = _lib_for(target)
    td = tlib.describe(tarr)
    t_dtype = np.dtype("float32" if td["dtype"] in _FLOATS else td["dtype"])
    kind = target_kind(tuple(td["shape"]), t_dtype, tuple(r.shape), ax, True, opts.ignore_index)
    if kind == "probs":
        raise NotImplementedError(
            "cross_entropy: probability (soft-label) targets are not supported on the CUDA path"
        )
    if td["dtype"] not in ("int32", "int64"):
        raise TypeError(f"target must hold int32 or int64 class indices, got {td['dtype']}")
    # One int per row, in the rows' order (the outer axes keep their order).
    tarr = tlib.contiguous(tarr)
    td = r.parse(tarr)
    if opts.reduction == "none":
        loss = r.lib.empty(r.outer_shape, r.arr)
    else:
        loss = r.lib.empty((), r.arr)
    grad = None
    gptr = None
    if opts.return_grad:
        if grad_out is not None:
            gd = _check_out(grad_out, r.shape, r)
            v = None if r.moved else _rows_view(gd, len(r.outer))
            if v is not None and v[:2] == (r.rows, r.cols):
                grad, gptr = grad_out, (int(gd["ptr"]), v[2])
        if grad is None:
            grad = r.lib.empty(r.moved_shape, r.arr)
            gptr = (int(r.parse(grad)["ptr"]), r.cols)
    _core._cuda_cross_entropy(
        r.dtype,
        r.place(),
        r.x_arg(),
        (int(td["ptr"]), td["dtype"]),
        (int(r.parse(loss)["ptr"]), gptr),
        (opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.reduction),
    )
    loss = r.wrapper.wrap(loss, logits)
    if grad is None:
        return loss
    if grad_out is not None:
        if grad is not grad_out:
            r.lib.copy_into(grad_out, r.unpermute(grad))
        return loss, grad_out
    return loss, r.wrapper.wrap(r.unpermute(grad), logits)
