//! Bindings for the kernels that compute one block of a larger array (Dask chunks).
//!
//! Arrays are read through their raw fields ([`super::array`]), never the numpy crate's
//! borrow flags; the states are copied once, and the result is allocated fallibly.

use numpy::{Element, PyArray2, PyArrayDyn};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use super::array::{dense, dense_mut, try_empty, try_vec, Raw};
use super::errors::to_pyerr;
use super::half::as_bf16;
use super::reductions::{f64_values, value_error};
use crate::error::Error;
use crate::half::{Stored, F16};
use crate::kernels::{from_states, masked, Reduction};
use crate::layout::Batch;
use crate::state::LseState;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax_from_states, m)?)?;
    Ok(())
}

fn from_states_typed<'py, T: Stored + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    max: &Bound<'py, PyAny>,
    excess: &Bound<'py, PyAny>,
    what: Reduction,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let rx = Raw::of(x)?;
    if rx.ndim != 2 {
        return Err(PyTypeError::new_err(
            "x must be a 2-D float32, float64, float16 or bfloat16 array",
        ));
    }
    if !rx.is_dense::<T>() {
        return Err(value_error("x must be a C-contiguous, aligned 2-D array"));
    }
    let rm = match mask {
        None => None,
        Some(m) => {
            let m = m
                .cast::<PyArray2<bool>>()
                .map_err(|_| PyTypeError::new_err("where must be a 2-D bool array"))?;
            let rm = Raw::of(m)?;
            if rm.shape() != rx.shape() || !rm.is_dense::<u8>() {
                return Err(value_error(
                    "where must be a C-contiguous bool array of x's shape",
                ));
            }
            Some(rm)
        }
    };
    let batch = Batch::rows(rx.shape[0], rx.shape[1]);
    let (ms, mshape) = f64_values(max, "max", None)?;
    let (es, _) = f64_values(excess, "excess", Some(&mshape))?;
    if mshape.len() != 1 {
        return Err(value_error("max and excess must be 1-D float64 arrays"));
    }
    if ms.len() != batch.outer {
        return Err(to_pyerr(
            py,
            Error::ShapeMismatch {
                what: "states",
                expected: batch.outer,
                got: ms.len(),
            },
        ));
    }
    let mut states = try_vec(batch.outer, LseState::EMPTY)?;
    for ((s, &m), &e) in states.iter_mut().zip(&ms).zip(&es) {
        *s = LseState { max: m, excess: e };
    }
    // SAFETY: every element is written by the kernel before the array is returned.
    let out = unsafe { try_empty::<T>(py, &[batch.outer, batch.n])? };
    let ro = Raw::of(&out)?;
    py.detach(|| {
        // SAFETY: the mask is held by the caller for the call and is dense (checked above).
        let keep = rm.as_ref().and_then(|rm| unsafe { dense::<u8>(rm) });
        if T::NATIVE {
            // The compute type itself (an array of T holds T::Compute values): the row writer
            // reads x and writes out in place.
            // SAFETY: x is held by the caller for the call and is dense (checked above); out
            // is new, dense and private to this call.
            let (xs, os) = unsafe { (dense::<T::Compute>(&rx), dense_mut::<T::Compute>(&ro)) };
            let (Some(xs), Some(os)) = (xs, os) else {
                return Err(Error::Layout("x and the result must be dense".into()));
            };
            from_states::softmax_like_from_states(xs, batch, &states, what, os)?;
            if let Some(keep) = keep {
                masked::finish_masked_chunk(os, keep, what);
            }
            return Ok(());
        }
        // SAFETY: as above.
        let (xs, os) = unsafe { (dense::<T>(&rx), dense_mut::<T>(&ro)) };
        let (Some(xs), Some(os)) = (xs, os) else {
            return Err(Error::Layout("x and the result must be dense".into()));
        };
        from_states::softmax_like_from_states_stored(xs, batch, &states, what, keep, os)
    })
    .map_err(|e| to_pyerr(py, e))?;
    Ok(out.into_any())
}

/// softmax (`log = False`) or log_softmax of each row of a C-contiguous 2-D float array
/// (float32, float64, or float16 / bfloat16 computed in float32 per block, no copy),
/// normalised by the given float64 `(max, excess)` state of that row (one per row, 1-D
/// arrays of any layout). With `where` (a C-contiguous bool array of x's shape), the states are
/// those of the kept elements, and masked positions get 0 (softmax) or `-inf` (log_softmax).
#[pyfunction]
#[pyo3(signature = (x, max, excess, log = false, r#where = None))]
fn softmax_from_states<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    max: &Bound<'py, PyAny>,
    excess: &Bound<'py, PyAny>,
    log: bool,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    if let Ok(x) = x.cast::<PyArrayDyn<f32>>() {
        from_states_typed(py, x, max, excess, what, r#where)
    } else if let Ok(x) = x.cast::<PyArrayDyn<f64>>() {
        from_states_typed(py, x, max, excess, what, r#where)
    } else if let Ok(x) = x.cast::<PyArrayDyn<F16>>() {
        from_states_typed(py, x, max, excess, what, r#where)
    } else if let Some(x) = as_bf16(x) {
        from_states_typed(py, &x, max, excess, what, r#where)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32, float64, float16 or bfloat16 array",
        ))
    }
}
