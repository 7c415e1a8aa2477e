//! Bindings for the segment reductions of [`crate::kernels::segments`].
//!
//! The Python front door (`python/stablelse/_segments.py`) moves the segment axis first, hands a
//! C-contiguous `(rows, inner)` float32/float64 block, `int64` ids or offsets, and the output
//! arrays it allocated (so a failed allocation is NumPy's `MemoryError`). This layer checks the
//! arrays, releases the GIL and maps [`SegmentError`] onto `IndexError` (ids and targets out of
//! range), `MemoryError` (work buffers) and `ValueError` (everything else).

use numpy::{Element, PyArray, PyArray1, PyArray2};
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::array::{
    check_out, copy_values, dense, dense_mut, py_shape, shares_memory, try_empty, try_vec, Raw,
};
use super::reductions::f64_values;
use crate::kernels::segments::{self, SegmentError, Segments};
use crate::kernels::Reduction;
use crate::real::Real;
use crate::state::LseState;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(segment_logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(segment_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(segment_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(segment_states, m)?)?;
    m.add_function(wrap_pyfunction!(segment_softmax_from_states, m)?)?;
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

/// One index argument: the caller's dense `int64` array read where it lies, or a private
/// copy of any other layout.
enum Indices {
    Borrowed(Box<Raw>),
    Owned(Vec<i64>),
}

impl Indices {
    /// # Safety
    /// A borrowed array is held alive by the caller for as long as the slice is used.
    unsafe fn slice(&self) -> &[i64] {
        match self {
            // SAFETY: dense (checked when read) and alive by the caller's contract.
            Indices::Borrowed(raw) => unsafe { dense::<i64>(raw) }.unwrap_or(&[]),
            Indices::Owned(v) => v,
        }
    }
}

/// The segment description a call was given (ids or offsets).
///
/// Ids and offsets are read where they lie (no copy of an array the size of x): the kernels
/// read every id once per pass and bound every index they derive from it, and check what they
/// derive (segment starts, bucket cursors) before using it, so another thread changing the
/// array during the call cannot make an access go out of bounds; it can only change results
/// or raise an error.
struct SegmentArgs {
    ids: Option<Indices>,
    offsets: Option<Indices>,
}

impl SegmentArgs {
    fn read(ids: Option<&Bound<'_, PyAny>>, offsets: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        Ok(SegmentArgs {
            ids: indices_of(ids, "segment_ids")?,
            offsets: indices_of(offsets, "offsets")?,
        })
    }

    /// # Safety
    /// The arrays the arguments were read from are held alive by the caller for the call.
    unsafe fn segments(&self, num_segments: usize, sorted: bool) -> PyResult<Segments<'_>> {
        // SAFETY: the caller's contract.
        let (ids, offsets) = unsafe {
            (
                self.ids.as_ref().map(|i| i.slice()),
                self.offsets.as_ref().map(|i| i.slice()),
            )
        };
        segments_of(ids, offsets, num_segments, sorted)
    }
}

/// An optional 1-D `int64` argument: borrowed when dense, else copied once.
fn indices_of(a: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<Indices>> {
    let Some(a) = a else {
        return Ok(None);
    };
    let a = a
        .cast::<PyArray1<i64>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a 1-D int64 array")))?;
    let raw = Raw::of(a)?;
    if raw.is_dense::<i64>() {
        return Ok(Some(Indices::Borrowed(Box::new(raw))));
    }
    copy_values(&raw, 0i64).map(|v| Some(Indices::Owned(v)))
}

/// The raw fields of an input that must be dense (C-contiguous, aligned), or a `ValueError`
/// naming it.
fn dense_input<T, D: numpy::ndarray::Dimension>(
    x: &Bound<'_, PyArray<T, D>>,
    name: &str,
) -> PyResult<Raw>
where
    T: Element,
{
    let raw = Raw::of(x)?;
    if !raw.is_dense::<T>() {
        return Err(PyValueError::new_err(format!(
            "{name} must be a C-contiguous, aligned array"
        )));
    }
    Ok(raw)
}

/// The output `out` (writeable, exactly `shape`, dtype `T`, dense) sharing no element with
/// the input `x`, or an error naming it.
fn output_of<'py, T: Element>(
    py: Python<'py>,
    out: &Bound<'py, PyAny>,
    shape: &[usize],
    name: &str,
    x: &Bound<'py, PyAny>,
    rx: &Raw,
) -> PyResult<Raw> {
    let (_, raw) = check_out::<T>(out, shape, name)?;
    if !raw.is_dense::<T>() {
        return Err(PyValueError::new_err(format!(
            "{name} must be a C-contiguous, aligned array"
        )));
    }
    if shares_memory(py, x, rx, out, &raw)? {
        return Err(PyValueError::new_err(format!(
            "{name} overlaps the input x"
        )));
    }
    Ok(raw)
}

/// The slices of a dense input and a dense output checked by [`dense_input`] / [`output_of`].
///
/// # Safety
/// Both arrays are live for the call; `out` is writeable and shares no element with `x`.
unsafe fn slices<'a, T, O>(x: &Raw, out: &Raw) -> Result<(&'a [T], &'a mut [O]), SegmentError> {
    // SAFETY: the caller's contract.
    match unsafe { (dense::<T>(x), dense_mut::<O>(out)) } {
        (Some(xs), Some(os)) => Ok((xs, os)),
        _ => Err(SegmentError::Shape(
            "x and the outputs must be dense".into(),
        )),
    }
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
    let rx = dense_input(x, "x")?;
    let inner = rx.shape[1];
    let args = SegmentArgs::read(ids, offsets)?;
    // SAFETY: the index arrays are arguments of this call, held by the caller.
    let seg = unsafe { args.segments(num_segments, sorted)? };
    let ro = output_of::<T>(py, out, &[seg.count(), inner], "out", x.as_any(), &rx)?;
    py.detach(|| {
        // SAFETY: checked above; x and out are held by the caller for the call.
        let (xs, os) = unsafe { slices::<T, T>(&rx, &ro)? };
        segments::segment_logsumexp(xs, inner, seg, os)
    })
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
    let rx = dense_input(x, "x")?;
    let inner = rx.shape[1];
    let args = SegmentArgs::read(ids, offsets)?;
    // SAFETY: the index arrays are arguments of this call, held by the caller.
    let seg = unsafe { args.segments(num_segments, sorted)? };
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    let (_, ro) = check_out::<T>(out, rx.shape(), "out")?;
    if rx.same_view(&ro) {
        if !ro.is_dense::<T>() {
            return Err(PyValueError::new_err(
                "out must be a C-contiguous, aligned array",
            ));
        }
        return py
            .detach(|| {
                // SAFETY: x is out, dense and writeable (checked above), held by the caller.
                let buf = unsafe { dense_mut::<T>(&ro) }
                    .ok_or_else(|| SegmentError::Shape("out must be dense".into()))?;
                segments::segment_softmax_like_inplace(buf, inner, seg, what)
            })
            .map_err(segment_error);
    }
    let ro = output_of::<T>(py, out, rx.shape(), "out", x.as_any(), &rx)?;
    py.detach(|| {
        // SAFETY: checked above; x and out are held by the caller for the call.
        let (xs, os) = unsafe { slices::<T, T>(&rx, &ro)? };
        segments::segment_softmax_like(xs, inner, seg, what, os)
    })
    .map_err(segment_error)
}

/// softmax (or log_softmax with `log=True`) of every segment of the rows of a C-contiguous
/// 2-D `x` into `out` (x's shape and dtype): `x` itself (in place) or an array sharing no
/// element with it.
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
    let rx = dense_input(x, "x")?;
    let args = SegmentArgs::read(ids, offsets)?;
    // SAFETY: the index arrays are arguments of this call, held by the caller.
    let seg = unsafe { args.segments(num_segments, sorted)? };
    let ts = match indices_of(Some(target), "target")? {
        // The targets are small (one per segment) and indexed after validation: a copy.
        Some(Indices::Borrowed(raw)) => copy_values(&raw, 0i64)?,
        Some(Indices::Owned(v)) => v,
        None => Vec::new(),
    };
    let rl = output_of::<f64>(py, losses, &[seg.count()], "losses", x.as_any(), &rx)?;
    let rg = grad
        .map(|g| output_of::<T>(py, g, rx.shape(), "grad", x.as_any(), &rx))
        .transpose()?;
    if let Some(rg) = &rg {
        if shares_memory(py, losses, &rl, grad.unwrap_or(losses), rg)? {
            return Err(PyValueError::new_err("grad overlaps losses"));
        }
    }
    let scale = move |count: usize| if mean { 1.0 / count as f64 } else { 1.0 };
    let r = py
        .detach(|| {
            // SAFETY: checked above; x, losses and grad are held by the caller for the call
            // and share no element.
            let (xs, ls) = unsafe { slices::<T, f64>(&rx, &rl)? };
            let gs = match rg {
                // SAFETY: as above.
                Some(rg) => Some(unsafe { slices::<T, T>(&rx, &rg)? }.1),
                None => None,
            };
            segments::segment_cross_entropy(xs, seg, &ts, ignore_index, ls, gs, scale)
        })
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

fn states_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray2<T>>,
    ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let rx = dense_input(x, "x")?;
    let inner = rx.shape[1];
    let args = SegmentArgs::read(ids, offsets)?;
    // SAFETY: the index arrays are arguments of this call, held by the caller.
    let seg = unsafe { args.segments(num_segments, sorted)? };
    let shape = [seg.count(), inner];
    let mut states = try_vec(seg.count() * inner, LseState::EMPTY)?;
    py.detach(|| {
        // SAFETY: x is held by the caller for the call and is dense (checked above).
        let xs = unsafe { dense::<T>(&rx) }
            .ok_or_else(|| SegmentError::Shape("x must be dense".into()))?;
        segments::segment_states(xs, inner, seg, &mut states)
    })
    .map_err(segment_error)?;
    // SAFETY: every element is written below before the arrays are returned.
    let (mx, ex) = unsafe { (try_empty::<f64>(py, &shape)?, try_empty::<f64>(py, &shape)?) };
    let (rm, re) = (Raw::of(&mx)?, Raw::of(&ex)?);
    // SAFETY: both arrays are new, dense and private to this call.
    if let (Some(ms), Some(es)) = unsafe { (dense_mut::<f64>(&rm), dense_mut::<f64>(&re)) } {
        for ((m, e), s) in ms.iter_mut().zip(es.iter_mut()).zip(&states) {
            (*m, *e) = (s.max, s.excess);
        }
    }
    Ok((mx.into_any(), ex.into_any()))
}

/// The float64 `(max, excess)` states of every segment of the rows of a C-contiguous 2-D
/// `x`, two `(num_segments, x.shape[1])` arrays: what chunks of a larger array merge.
#[pyfunction]
#[pyo3(signature = (x, segment_ids = None, offsets = None, num_segments = 0, sorted = false))]
fn segment_states<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    segment_ids: Option<&Bound<'py, PyAny>>,
    offsets: Option<&Bound<'py, PyAny>>,
    num_segments: usize,
    sorted: bool,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    if let Ok(x) = x.cast::<PyArray2<f32>>() {
        states_typed(py, x, segment_ids, offsets, num_segments, sorted)
    } else if let Ok(x) = x.cast::<PyArray2<f64>>() {
        states_typed(py, x, segment_ids, offsets, num_segments, sorted)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32 or float64 array",
        ))
    }
}

#[allow(clippy::too_many_arguments)]
fn from_states_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray2<T>>,
    out: &Bound<'py, PyAny>,
    ids: &Bound<'py, PyAny>,
    max: &Bound<'py, PyAny>,
    excess: &Bound<'py, PyAny>,
    log: bool,
) -> PyResult<()> {
    let rx = dense_input(x, "x")?;
    let inner = rx.shape[1];
    let ids = indices_of(Some(ids), "segment_ids")?;
    // SAFETY: the ids array is an argument of this call, held by the caller.
    let ids = unsafe { ids.as_ref().map_or(&[][..], |i| i.slice()) };
    let (ms, mshape) = f64_values(max, "max", None)?;
    let (es, _) = f64_values(excess, "excess", Some(&mshape))?;
    let mut states = try_vec(ms.len(), LseState::EMPTY)?;
    for ((s, &m), &e) in states.iter_mut().zip(&ms).zip(&es) {
        *s = LseState { max: m, excess: e };
    }
    let ro = output_of::<T>(py, out, rx.shape(), "out", x.as_any(), &rx)?;
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    py.detach(|| {
        // SAFETY: checked above; x and out are held by the caller for the call.
        let (xs, os) = unsafe { slices::<T, T>(&rx, &ro)? };
        segments::segment_softmax_from_states(xs, inner, ids, &states, what, os)
    })
    .map_err(segment_error)
}

/// softmax (or log_softmax with `log=True`) of the rows of a C-contiguous 2-D `x` into `out`
/// (x's shape and dtype, disjoint from x), each element normalised by the float64 state
/// `(max, excess)[segment_ids[r], j]` of its segment (`max` / `excess` of shape
/// `(num_segments, x.shape[1])`, any layout).
#[pyfunction]
#[pyo3(signature = (x, out, segment_ids, max, excess, log = false))]
fn segment_softmax_from_states<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    segment_ids: &Bound<'py, PyAny>,
    max: &Bound<'py, PyAny>,
    excess: &Bound<'py, PyAny>,
    log: bool,
) -> PyResult<()> {
    if let Ok(x) = x.cast::<PyArray2<f32>>() {
        from_states_typed(py, x, out, segment_ids, max, excess, log)
    } else if let Ok(x) = x.cast::<PyArray2<f64>>() {
        from_states_typed(py, x, out, segment_ids, max, excess, log)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32 or float64 array",
        ))
    }
}
