"""Streaming log-sum-exp: the ``(max, excess)`` state of the kernels, kept across chunks.

Every chunk is reduced by the Rust kernels (``_core.lse_states``) to one float64
``(max, excess)`` pair per kept position, and pairs are combined with the one merge rule of
``src/state.rs`` (``_core.merge_states``). The same helpers serve :mod:`stablelse.dask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt

from . import _core
from ._api import _as_real_array, _weighted_result_dtype, _where_mask
from ._axes import check_axis_arg, normalize_axes

__all__ = ["LogSumExp"]

F64Array = npt.NDArray[np.float64]
AnyArray = npt.NDArray[Any]
AxisArg = Union[int, Sequence[int], None]

#: A state as one structured array (used where a single array must travel, as in Dask).
STATE_DTYPE = np.dtype([("max", np.float64), ("excess", np.float64)])


# --------------------------------------------------------------------------- state helpers


def chunk_states(
    x: AnyArray, axes: tuple[int, ...], mask: Optional[AnyArray] = None
) -> tuple[F64Array, F64Array]:
    """The ``(max, excess)`` states of float `x` reduced over `axes`.

    `x` is float32, float64, float16 or bfloat16 (the last two read and widened per block).

    Both arrays are float64, C-contiguous, shaped like `x` with `axes` removed (in `x`'s axis
    order). The reduction runs in the Rust kernels; empty reductions give ``(-inf, -1)``. With
    `mask` (a bool array of `x`'s shape, any strides), the states of the elements it keeps.
    """
    if x.size == 0:
        # Nothing to read: every state is the empty one. (Also sidesteps the kernels' pointer
        # alignment check, which an empty buffer deserialised by dask.distributed can fail.)
        kept = tuple(s for i, s in enumerate(x.shape) if i not in axes)
        return np.full(kept, -np.inf), np.full(kept, -1.0)
    mx, ex = _core.lse_states(x, tuple(axes), "auto", mask)
    return mx, ex


def merge_states(
    max_a: F64Array, excess_a: F64Array, max_b: F64Array, excess_b: F64Array
) -> tuple[F64Array, F64Array]:
    """Elementwise merge of two sets of states with the kernels' merge rule."""
    mx, ex = _core.merge_states(_dense(max_a), _dense(excess_a), _dense(max_b), _dense(excess_b))
    return mx, ex


def _dense(a: AnyArray) -> F64Array:
    """`a` as a C-contiguous float64 array of the same shape (0-d stays 0-d)."""
    return np.asarray(a, dtype=np.float64, order="C")


def merge_states_along(
    mx: F64Array, ex: F64Array, axes: tuple[int, ...]
) -> tuple[F64Array, F64Array]:
    """Merge the states of `mx`/`ex` over `axes` (kept as length-1 axes).

    A fixed pairwise tree (halving), so ``k`` states cost ``ceil(log2 k)`` vectorised merges
    and the result does not depend on anything but the input order.
    """
    for ax in axes:
        k = mx.shape[ax]
        if k == 0:
            shape = list(mx.shape)
            shape[ax] = 1
            mx = np.full(shape, -np.inf)
            ex = np.full(shape, -1.0)
            continue
        while k > 1:
            h = k // 2
            lo = [slice(None)] * mx.ndim
            hi = [slice(None)] * mx.ndim
            lo[ax] = slice(0, h)
            hi[ax] = slice(h, 2 * h)
            m2, e2 = merge_states(mx[tuple(lo)], ex[tuple(lo)], mx[tuple(hi)], ex[tuple(hi)])
            if k % 2:
                rest = [slice(None)] * mx.ndim
                rest[ax] = slice(2 * h, k)
                m2 = np.concatenate([m2, mx[tuple(rest)]], axis=ax)
                e2 = np.concatenate([e2, ex[tuple(rest)]], axis=ax)
            mx, ex = m2, e2
            k = mx.shape[ax]
    return mx, ex


def lse_of_states(mx: F64Array, ex: F64Array) -> F64Array:
    """``max + log1p(excess)`` where max is finite, else max (``-inf``, ``+inf`` or NaN)."""
    res = np.array(mx, dtype=np.float64, copy=True)
    fin = np.isfinite(res)
    res[fin] += np.log1p(ex[fin])
    return res


def _asarray(v: Any, name: str) -> AnyArray:
    """``np.asarray(v)``; a ragged nested list is a ValueError naming the argument."""
    try:
        return np.asarray(v)
    except ValueError as exc:
        raise ValueError(f"{name} is not a rectangular array of numbers: {exc}") from None


def result_dtype(a_dtype: np.dtype[Any], b_dtype: Optional[np.dtype[Any]] = None) -> np.dtype[Any]:
    """The dtype ``stablelse.logsumexp`` returns for inputs of these dtypes."""
    if b_dtype is not None:
        return np.dtype(_weighted_result_dtype(a_dtype, b_dtype))
    return np.dtype(_as_real_array(np.empty(0, dtype=a_dtype), "a")[1])


def log_weighted(x: AnyArray, b: AnyArray, who: str, what: str) -> F64Array:
    """``x + log(b)`` in float64 for weights ``b >= 0`` broadcastable to ``x``; ``b == 0``
    gives ``-inf`` whatever ``x`` holds (scipy ignores those elements).

    A ``(max, excess)`` state has no sign, so a negative weight raises ``ValueError`` naming
    `who` (the caller) and the first negative element's index in `what`.
    """
    bw, _ = _as_real_array(b, "b")
    try:
        bw = np.broadcast_to(bw, x.shape)
    except ValueError:
        raise ValueError(
            f"b with shape {b.shape} does not broadcast to {what}'s shape {x.shape}"
        ) from None
    neg = bw < 0
    if neg.any():
        idx = tuple(int(i) for i in np.argwhere(neg)[0])
        raise ValueError(
            f"b{list(idx)} = {bw[idx]} is negative (index in {what}); {who} supports weights "
            "b >= 0 only (its (max, excess) state cannot hold a negative sum): use "
            "stablelse.logsumexp(..., b=b, return_sign=True) on the whole array"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        lw = np.log(bw.astype(np.float64))
        xw = np.add(x, lw, dtype=np.float64)
    xw[bw == 0] = -np.inf
    return xw


# --------------------------------------------------------------------------- the accumulator


class LogSumExp:
    """Streaming ``logsumexp``: feed chunks, merge partial accumulators, read the result.

    ``LogSumExp(axis).update(c1).update(c2)...result()`` equals (up to rounding, see Notes)
    ``stablelse.logsumexp(np.concatenate([c1, c2, ...], axis=axis), axis=axis)`` without ever
    holding the concatenation: each chunk is reduced at once by the Rust kernels to a float64
    ``(max, excess)`` state per result element, and states combine with the kernels' merge
    rule.

    Parameters
    ----------
    axis : None or int or tuple of ints, optional
        The reduced axis, along which chunks are concatenated. ``None`` (default) reduces all
        elements: chunks of any shapes are flattened and concatenated, as
        ``np.concatenate(chunks, axis=None)``. With an int, chunks must have the same number of
        dimensions and the same shape on every other axis. With a tuple, all those axes are
        reduced; chunks must agree on the other axes and may differ in size on any reduced
        axis (each chunk contributes all its elements to each result element). Negative axes
        count from the end of the first chunk's dimensions.

    Attributes
    ----------
    axis : None or int or tuple of ints
        The `axis` argument, as given.
    state : tuple of ndarray
        See :attr:`state`.

    See Also
    --------
    stablelse.logsumexp : the one-call reduction.
    stablelse.dask.logsumexp : the same merge as the combine step of a Dask reduction.

    Notes
    -----
    Special values follow :func:`scipy.special.logsumexp` on the concatenation: an empty or
    all ``-inf`` reduction gives ``-inf``, any ``+inf`` gives ``+inf``, any NaN gives NaN,
    whichever chunks they arrive in.

    The result dtype is that of ``stablelse.logsumexp`` on the concatenation: the chunks'
    dtypes are promoted as :func:`numpy.concatenate` would (so one float64 chunk, even an
    empty one, makes a float32 stream's result float64), then float32/float64 stay, float16 is
    computed in float32 and returned as float16, integers and bools give float64.

    Accuracy: states are float64 whatever the input dtype, and a float32 result is rounded
    once at the end, so it is within 1 ULP of the exact value whatever the chunking. For
    float64 the result agrees with one call to within a few ULPs (rounding of the merges
    differs from the kernels' fixed blocking). Merging is commutative and associative up to
    that rounding.

    Weights: ``update(chunk, b)`` accepts non-negative weights only. The state has no sign, so
    it cannot hold a negative (partial) sum; negative weights raise ``ValueError``. A weighted
    chunk is reduced as ``a + log(b)`` computed in float64 (``b == 0`` drops the element
    whatever `a` holds, as scipy); the absolute error of that addition, about
    ``2**-53 * |a + log b|``, matters only for float64 results far below ``max(a)`` (tiny
    weights). There is no ``return_sign``.

    Pickling keeps the state, the axis and the dtypes; :meth:`merge` combines accumulators
    built in other processes.

    Examples
    --------
    >>> import numpy as np
    >>> from stablelse import LogSumExp, logsumexp
    >>> x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    >>> acc = LogSumExp(axis=0)
    >>> for part in np.array_split(x, 4):
    ...     _ = acc.update(part)
    >>> bool(np.array_equal(acc.result(), logsumexp(x, axis=0)))
    True
    """

    def __init__(self, axis: AxisArg = None) -> None:
        self.axis: AxisArg = check_axis_arg(axis)
        # Set by the first chunk: reduced axes (normalised), ndim, kept shape.
        self._axes: Optional[tuple[int, ...]] = None
        self._ndim: Optional[int] = None
        self._kept: Optional[tuple[int, ...]] = None
        self._max: Optional[F64Array] = None
        self._excess: Optional[F64Array] = None
        # Promoted raw dtypes of the chunks and of the weights seen so far.
        self._a_dtype: Optional[np.dtype[Any]] = None
        self._b_dtype: Optional[np.dtype[Any]] = None

    # ------------------------------------------------------------------ feeding

    def update(self, chunk: Any, b: Any = None, *, where: Any = None) -> LogSumExp:
        """Consume one chunk (concatenated after the previous ones along :attr:`axis`).

        Parameters
        ----------
        chunk : array_like
            Real numbers; integers and bools are promoted as by ``stablelse.logsumexp``.
            Complex input raises ``TypeError``. Empty chunks are allowed (they still take part
            in dtype promotion).
        b : array_like, optional
            Non-negative weights broadcastable to ``chunk.shape``; the chunk contributes
            ``log(sum(b * exp(chunk)))``. Elements with ``b == 0`` are ignored whatever
            `chunk` holds there.
        where : array_like of bool, optional
            Mask broadcastable to ``chunk.shape``: only elements where it is True take part
            (JAX's ``where=``), whatever the others hold and whatever their weight (a masked
            weight may be negative or NaN). A fully masked slice contributes nothing, so the
            stream equals one ``stablelse.logsumexp(concatenation, where=concatenated mask)``.

        Returns
        -------
        self : LogSumExp
            This accumulator, updated in place (so calls chain).

        Raises
        ------
        ValueError
            If the chunk's shape does not fit the previous ones, if `b` or `where` does not
            broadcast to the chunk, or if a kept element of `b` is negative.
        TypeError
            If `where` is not boolean.
        """
        arr = chunk if isinstance(chunk, np.ndarray) else _asarray(chunk, "chunk")
        # float16 / bfloat16 are widened block by block in the kernels (no float32 copy), unless
        # weighted: log_weighted computes x + log(b) in float64.
        x, _ = _as_real_array(arr, "chunk", half=b is None)
        mask = None if where is None else _where_mask(where, x.shape)
        raw_b: Optional[np.dtype[Any]] = None
        if b is not None:
            barr = b if isinstance(b, np.ndarray) else _asarray(b, "b")
            raw_b = barr.dtype
            if mask is not None:
                # Masked weights take no part, whatever they hold (a weight-sized temporary).
                try:
                    barr = np.where(mask, barr, barr.dtype.type(0))
                except ValueError:
                    raise ValueError(
                        f"b with shape {barr.shape} does not broadcast to the chunk's shape "
                        f"{x.shape}"
                    ) from None
            x = log_weighted(x, barr, "LogSumExp", "the chunk")
        if self.axis is None:
            # The flattened concatenation: element order does not matter, so no copy.
            if x.ndim == 0:
                x = x.reshape(1)
                mask = None if mask is None else mask.reshape(1)
        elif x.ndim == 0:
            raise ValueError(
                f"a zero-dimensional chunk cannot be concatenated along axis {self.axis}"
            )
        axes = self._fit(x)
        mx, ex = chunk_states(x, axes, mask)
        self._absorb(mx, ex)
        self._a_dtype = _promote(self._a_dtype, arr.dtype)
        if raw_b is not None:
            self._b_dtype = _promote(self._b_dtype, raw_b)
        return self

    def _fit(self, x: AnyArray) -> tuple[int, ...]:
        """The reduced axes of `x`; checks `x`'s shape against earlier chunks."""
        if self.axis is None:
            return tuple(range(x.ndim))
        if self._axes is None:
            axes = normalize_axes(self.axis, x.ndim)
            self._axes, self._ndim = axes, x.ndim
        axes = self._axes
        if x.ndim != self._ndim:
            raise ValueError(
                f"chunk has {x.ndim} dimensions, earlier chunks have {self._ndim} "
                f"(axis={self.axis!r})"
            )
        kept = tuple(s for i, s in enumerate(x.shape) if i not in axes)
        if self._kept is not None and kept != self._kept:
            want = self._template()
            raise ValueError(
                f"chunk with shape {x.shape} does not match earlier chunks of shape {want} "
                f"outside axis={self.axis!r}"
            )
        return axes

    def _template(self) -> str:
        assert self._axes is not None and self._kept is not None and self._ndim is not None
        it = iter(self._kept)
        dims = ("*" if i in self._axes else str(next(it)) for i in range(self._ndim))
        return "(" + ", ".join(dims) + ")"

    def _absorb(self, mx: F64Array, ex: F64Array) -> None:
        if self._max is None or self._excess is None:
            self._max, self._excess = mx, ex
            self._kept = mx.shape
        else:
            self._max, self._excess = merge_states(self._max, self._excess, mx, ex)

    # ------------------------------------------------------------------ combining

    def merge(self, other: LogSumExp) -> LogSumExp:
        """A new accumulator holding both streams; `self` and `other` are not modified.

        The merged stream is `self`'s chunks followed by `other`'s (the order only matters for
        rounding). An accumulator that has seen no chunk is the identity.

        Raises
        ------
        TypeError
            If `other` is not a :class:`LogSumExp`.
        ValueError
            If the axes, dimensions or kept shapes differ.
        """
        if not isinstance(other, LogSumExp):
            raise TypeError(f"other must be a LogSumExp, got {type(other).__name__}")
        if self.axis != other.axis and (self._axes is None or self._axes != other._axes):
            raise ValueError(f"cannot merge axis={self.axis!r} with axis={other.axis!r}")
        out = LogSumExp(self.axis)
        for src in (self, other):
            if src._max is None or src._excess is None:
                continue
            if out._max is not None:
                if (src._ndim, src._axes, src._kept) != (out._ndim, out._axes, out._kept):
                    raise ValueError(
                        f"cannot merge accumulators of shapes {out._template_or_scalar()} and "
                        f"{src._template_or_scalar()} (axis={self.axis!r})"
                    )
            else:
                out._axes, out._ndim = src._axes, src._ndim
            out._absorb(src._max, src._excess)
        for src in (self, other):
            out._a_dtype = _promote(out._a_dtype, src._a_dtype)
            out._b_dtype = _promote(out._b_dtype, src._b_dtype)
        return out

    def _template_or_scalar(self) -> str:
        return "()" if self.axis is None else self._template()

    # ------------------------------------------------------------------ reading

    @property
    def state(self) -> tuple[F64Array, F64Array]:
        """The ``(max, excess)`` float64 arrays, shaped like the result (copies).

        ``max`` is the largest element seen per result element and
        ``excess = sum(exp(x - max)) - 1`` the sum of the scaled terms less the one of a
        maximal element (keeping the excess rather than the sum keeps ``log1p`` accurate when
        all other terms are tiny). ``logsumexp = max + log1p(excess)`` for a finite max. No
        element (or only ``-inf``): ``(-inf, -1)``; a ``+inf``: ``max = +inf`` and ``excess``
        is meaningless; a NaN: ``max = NaN``.

        Raises
        ------
        ValueError
            If no chunk was seen and `axis` is not None (the shape is unknown).
        """
        mx, ex = self._current()
        return mx.copy(), ex.copy()

    def _current(self) -> tuple[F64Array, F64Array]:
        if self._max is None or self._excess is None:
            if self.axis is None:
                return np.array(-np.inf), np.array(-1.0)
            raise ValueError(
                f"LogSumExp(axis={self.axis!r}) has seen no chunk: the result's shape is unknown"
            )
        return self._max, self._excess

    @property
    def dtype(self) -> np.dtype[Any]:
        """The dtype of :meth:`result` (float64 before any chunk)."""
        if self._a_dtype is None:
            return np.dtype(np.float64)
        return result_dtype(self._a_dtype, self._b_dtype)

    def result(self, keepdims: bool = False) -> Any:
        """``logsumexp`` of everything seen so far (the accumulator is left unchanged).

        Parameters
        ----------
        keepdims : bool, optional
            Keep the reduced axes as length-1 dimensions (for ``axis=None`` the concatenation
            is 1-D, so the result has shape ``(1,)``).

        Returns
        -------
        res : ndarray or scalar
            As ``stablelse.logsumexp(concatenation, axis=axis, keepdims=keepdims)``: a NumPy
            scalar when 0-dimensional. Before any chunk: ``-inf`` (float64) for
            ``axis=None``.

        Raises
        ------
        ValueError
            If no chunk was seen and `axis` is not None.
        """
        mx, ex = self._current()
        res = lse_of_states(mx, ex).astype(self.dtype)
        if keepdims:
            if self.axis is None:
                res = res.reshape(1)
            else:
                assert self._axes is not None
                res = np.expand_dims(res, self._axes)
        return res[()] if res.ndim == 0 else res

    def __repr__(self) -> str:
        if self._max is None:
            seen = "no chunk"
        else:
            seen = f"shape {self._max.shape}, dtype {self.dtype}"
        return f"LogSumExp(axis={self.axis!r}) <{seen}>"

    # ------------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__dict__.update(st)


def _promote(a: Optional[np.dtype[Any]], b: Optional[np.dtype[Any]]) -> Optional[np.dtype[Any]]:
    if a is None:
        return b
    if b is None or b == a:
        return a
    return np.dtype(np.result_type(a, b))
