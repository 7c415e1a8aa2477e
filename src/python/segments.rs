//! Bindings for the segment reductions of [`crate::kernels::segments`].
//!
//! The Python front door (`python/stablelse/_segments.py`) moves the segment axis first, hands a
//! C-contiguous `(rows, inner)` float32/float64 block, `int64` ids or offsets, and the output
//! arrays it allocated (so a failed allocation is NumPy's `MemoryError`). This layer checks the
//! arrays, releases the GIL and maps [`SegmentError`] onto `IndexError` (ids and targets out of
//! range), `MemoryError` (work buffers) and `ValueError` (everything else).

use numpy::{Element, PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::kernels::masked;
use crate::kernels::segments::{self, SegmentError, Segments};
use crate::kernels::Reduction;
use crate::real::Real;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(segment_logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(segment_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(masked_rows, m)?)?;
    m.add_function(wrap_pyfunction!(segment_cross_entropy, m)?)?;
    Ok(())
}

fn segment_error(err: SegmentError) -> PyErr {
    match err {
        SegmentError::IdOutOfRange { .. } | SegmentError::TargetOutOfRange { .. } => {
            PyIndexError::new_err(err.to_string())
        }
        SegmentError::Alloc => PyMemoryError::new_err(err.to_string()),
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// A contiguous `int64` vector argument as a slice (the caller holds the borrow).
fn index_slice<'a>(arr: &'a numpy::PyReadonlyArray1<'_, i64>, name: &str) -> PyResult<&'a [i64]> {
    arr.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous int64 array")))
}

/// The segment description from the keyword arguments, exactly one of `ids` / `offsets`.
fn segments_of<'a>(
    ids: Option<&'a [i64]>,
    offsets: Option<&'a [i64]>,
    num_segments: usize,
    sorted: bool,
) -> PyResult<Segments<'a>> {
    match (ids, offsets) {
        (Some(ids), None) if sorted => Ok(Segments::SortedIds { ids, num_segments }),
        (Some(ids), None) => Ok(Segments::Ids { ids, num_segments }),
        (None, Some(offsets)) => Ok(Segments::Offsets(offsets)),
        _ => Err(PyValueError::new_err(
            "give exactly one of segment_ids and offsets",
        )),
    }
}

/// Both readonly borrows of the optional index arrays.
type Indices<'py> = (
    Option<numpy::PyReadonlyArray1<'py, i64>>,
    Option<numpy::PyReadonlyArray1<'py, i64>>,
);

fn borrow_indices<'py>(
    ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
) -> PyResult<Indices<'py>> {
    let get = |a: Option<&Bound<'py, PyAny>>, name: &str| -> PyResult<_> {
        match a {
            None => Ok(None),
            Some(a) => {
                let a = a.cast::<PyArray1<i64>>().map_err(|_| {
                    PyTypeError::new_err(format!("{name} must be a 1-D int64 array"))
                })?;
                Ok(Some(a.try_readonly().map_err(|e| {
                    PyValueError::new_err(format!("{name} cannot be read: {e}"))
                })?))
            }
        }
    };
    Ok((get(ids, "segment_ids")?, get(offsets, "offsets")?))
}

/// The `(rows, inner)` data of `x` as a slice, with `inner`.
fn block_of<'a, T: Element>(x: &'a numpy::PyReadonlyArray2<'_, T>) -> PyResult<(&'a [T], usize)> {
    let inner = x.shape()[1];
    let xs = x
        .as_slice()
        .map_err(|_| PyValueError::new_err("x must be a C-contiguous array"))?;
    Ok((xs, inner))
}

fn writable<'py, T: Element, D: numpy::ndarray::Dimension>(
    out: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<numpy::PyReadwriteArray<'py, T, D>> {
    let out = out.cast::<numpy::PyArray<T, D>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a {}-D array of the input's dtype",
            D::NDIM.unwrap_or(0)
        ))
    })?;
    if !out.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous"
        )));
    }
    out.try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be written: {e}")))
}

fn lse_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray2<T>>,
    out: &Bound<'py, PyAny>,
    ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
) -> PyResult<()> {
    let xr = x
        .try_readonly()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let (xs, inner) = block_of(&xr)?;
    let (ir, or) = borrow_indices(ids, offsets)?;
    let ids = ir
        .as_ref()
        .map(|a| index_slice(a, "segment_ids"))
        .transpose()?;
    let offs = or.as_ref().map(|a| index_slice(a, "offsets")).transpose()?;
    let seg = segments_of(ids, offs, num_segments, sorted)?;
    let mut ow = writable::<T, numpy::Ix2>(out, "out")?;
    if ow.shape() != [seg.count(), inner] {
        return Err(PyValueError::new_err(format!(
            "out has shape {:?}, expected {:?}",
            ow.shape(),
            [seg.count(), inner]
        )));
    }
    let os = ow
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.detach(|| segments::segment_logsumexp(xs, inner, seg, os))
        .map_err(segment_error)
}

/// logsumexp of every segment of the rows of a C-contiguous 2-D `x` into `out`
/// (`(num_segments, x.shape[1])`, x's dtype).
#[pyfunction]
#[pyo3(signature = (x, out, segment_ids = None, offsets = None, num_segments = 0, sorted = false))]
fn segment_logsumexp<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    segment_ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
) -> PyResult<()> {
    if let Ok(x) = x.cast::<PyArray2<f32>>() {
        lse_typed(py, x, out, segment_ids, offsets, num_segments, sorted)
    } else if let Ok(x) = x.cast::<PyArray2<f64>>() {
        lse_typed(py, x, out, segment_ids, offsets, num_segments, sorted)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32 or float64 array",
        ))
    }
}

#[allow(clippy::too_many_arguments)]
fn softmax_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray2<T>>,
    out: &Bound<'py, PyAny>,
    ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
    log: bool,
) -> PyResult<()> {
    if out.is(x) {
        return Err(PyValueError::new_err("out must not be x"));
    }
    let xr = x
        .try_readonly()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let (xs, inner) = block_of(&xr)?;
    let (ir, or) = borrow_indices(ids, offsets)?;
    let ids = ir
        .as_ref()
        .map(|a| index_slice(a, "segment_ids"))
        .transpose()?;
    let offs = or.as_ref().map(|a| index_slice(a, "offsets")).transpose()?;
    let seg = segments_of(ids, offs, num_segments, sorted)?;
    let mut ow = writable::<T, numpy::Ix2>(out, "out")?;
    if ow.shape() != xr.shape() {
        return Err(PyValueError::new_err(format!(
            "out has shape {:?}, expected x's {:?}",
            ow.shape(),
            xr.shape()
        )));
    }
    let os = ow
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    py.detach(|| segments::segment_softmax_like(xs, inner, seg, what, os))
        .map_err(segment_error)
}

/// softmax (or log_softmax with `log=True`) of every segment of the rows of a C-contiguous
/// 2-D `x` into `out` (x's shape and dtype, not x itself).
#[pyfunction]
#[pyo3(signature = (x, out, segment_ids = None, offsets = None, num_segments = 0, sorted = false, log = false))]
#[allow(clippy::too_many_arguments)]
fn segment_softmax<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    segment_ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
    log: bool,
) -> PyResult<()> {
    if let Ok(x) = x.cast::<PyArray2<f32>>() {
        softmax_typed(py, x, out, segment_ids, offsets, num_segments, sorted, log)
    } else if let Ok(x) = x.cast::<PyArray2<f64>>() {
        softmax_typed(py, x, out, segment_ids, offsets, num_segments, sorted, log)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32 or float64 array",
        ))
    }
}

#[allow(clippy::too_many_arguments)]
fn xent_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray1<T>>,
    target: &Bound<'py, PyAny>,
    losses: &Bound<'py, PyAny>,
    grad: Option<&Bound<'py, PyAny>>,
    ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
    ignore_index: i64,
    mean: bool,
) -> PyResult<(f64, usize)> {
    let xr = x
        .try_readonly()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let xs = xr
        .as_slice()
        .map_err(|_| PyValueError::new_err("x must be a contiguous array"))?;
    let (ir, or) = borrow_indices(ids, offsets)?;
    let ids = ir
        .as_ref()
        .map(|a| index_slice(a, "segment_ids"))
        .transpose()?;
    let offs = or.as_ref().map(|a| index_slice(a, "offsets")).transpose()?;
    let seg = segments_of(ids, offs, num_segments, sorted)?;
    let (tr, _) = borrow_indices(Some(target), None)?;
    let ts = tr
        .as_ref()
        .map(|a| index_slice(a, "target"))
        .transpose()?
        .unwrap_or(&[]);
    let mut lw = writable::<f64, numpy::Ix1>(losses, "losses")?;
    let ls = lw
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let mut gw = grad
        .map(|g| {
            if g.is(x) {
                return Err(PyValueError::new_err("grad must not be x"));
            }
            writable::<T, numpy::Ix1>(g, "grad")
        })
        .transpose()?;
    let gs = match gw.as_mut() {
        Some(g) => Some(
            g.as_slice_mut()
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
        ),
        None => None,
    };
    let scale = move |count: usize| if mean { 1.0 / count as f64 } else { 1.0 };
    let r = py
        .detach(|| segments::segment_cross_entropy(xs, seg, ts, ignore_index, ls, gs, scale))
        .map_err(segment_error)?;
    Ok((r.sum, r.count))
}

/// Cross-entropy of every segment of a contiguous 1-D `x` against `target` (the position of
/// the positive element within each segment, `ignore_index` to leave a segment out): writes
/// the per-segment losses (float64) into `losses` and, with `grad`, the gradient of the sum
/// (or of the mean, `mean=True`). Returns `(sum of losses, counted segments)`.
#[pyfunction]
#[pyo3(signature = (x, target, losses, grad = None, segment_ids = None, offsets = None,
                    num_segments = 0, sorted = false, ignore_index = -100, mean = true))]
#[allow(clippy::too_many_arguments)]
fn segment_cross_entropy<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    losses: &Bound<'py, PyAny>,
    grad: Option<&Bound<'py, PyAny>>,
    segment_ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
    ignore_index: i64,
    mean: bool,
) -> PyResult<(f64, usize)> {
    if let Ok(x) = x.cast::<PyArray1<f32>>() {
        xent_typed(
            py,
            x,
            target,
            losses,
            grad,
            segment_ids,
            offsets,
            num_segments,
            sorted,
            ignore_index,
            mean,
        )
    } else if let Ok(x) = x.cast::<PyArray1<f64>>() {
        xent_typed(
            py,
            x,
            target,
            losses,
            grad,
            segment_ids,
            offsets,
            num_segments,
            sorted,
            ignore_index,
            mean,
        )
    } else {
        Err(PyTypeError::new_err(
            "x must be a 1-D float32 or float64 array",
        ))
    }
}

fn masked_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray2<T>>,
    mask: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    op: u8,
) -> PyResult<()> {
    let xr = x
        .try_readonly()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let (xs, n) = block_of(&xr)?;
    let mask = mask
        .cast::<PyArray2<bool>>()
        .map_err(|_| PyTypeError::new_err("mask must be a 2-D bool array"))?;
    let mr = mask
        .try_readonly()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    if mr.shape() != xr.shape() {
        return Err(PyValueError::new_err(format!(
            "mask has shape {:?}, x has {:?}; they must match",
            mr.shape(),
            xr.shape()
        )));
    }
    let ms = mr
        .as_slice()
        .map_err(|_| PyValueError::new_err("mask must be C-contiguous"))?;
    if op == 0 {
        let mut ow = writable::<T, numpy::Ix1>(out, "out")?;
        let os = ow
            .as_slice_mut()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        return py
            .detach(|| masked::logsumexp_rows_masked(xs, ms, n, os))
            .map_err(PyValueError::new_err);
    }
    if out.is(x) {
        return Err(PyValueError::new_err("out must not be x"));
    }
    let what = if op == 2 {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    let mut ow = writable::<T, numpy::Ix2>(out, "out")?;
    let os = ow
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.detach(|| masked::softmax_rows_masked(xs, ms, n, what, os))
        .map_err(PyValueError::new_err)
}

/// JAX-style `where=` over the rows of a C-contiguous 2-D `x` with a bool `mask` of its
/// shape: `op` 0 writes logsumexp per row into the 1-D `out`, 1 softmax and 2 log_softmax into
/// the 2-D `out`.
#[pyfunction]
#[pyo3(signature = (x, mask, out, op))]
fn masked_rows<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    mask: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    op: u8,
) -> PyResult<()> {
    if op > 2 {
        return Err(PyValueError::new_err(format!(
            "op must be 0, 1 or 2, got {op}"
        )));
    }
    if let Ok(x) = x.cast::<PyArray2<f32>>() {
        masked_typed(py, x, mask, out, op)
    } else if let Ok(x) = x.cast::<PyArray2<f64>>() {
        masked_typed(py, x, mask, out, op)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32 or float64 array",
        ))
    }
}
