//! Bindings for the kernels that compute one block of a larger array (Dask chunks).

use numpy::{Element, PyArray2, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use super::errors::to_pyerr;
use crate::error::{try_vec, Error};
use crate::kernels::{from_states, Reduction};
use crate::layout::Batch;
use crate::real::Real;
use crate::state::LseState;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax_from_states, m)?)?;
    Ok(())
}

fn from_states_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray2<T>>,
    max: PyReadonlyArray1<'py, f64>,
    excess: PyReadonlyArray1<'py, f64>,
    what: Reduction,
) -> PyResult<Bound<'py, PyAny>> {
    let xr = x
        .try_readonly()
        .map_err(|e| to_pyerr(py, Error::Layout(e.to_string())))?;
    let xs = xr
        .as_slice()
        .map_err(|_| PyTypeError::new_err("x must be a C-contiguous 2-D array"))?;
    let (ms, es) = (max.as_slice()?, excess.as_slice()?);
    let dims = x.dims();
    let batch = Batch::rows(dims[0], dims[1]);
    if ms.len() != batch.outer || es.len() != batch.outer {
        return Err(to_pyerr(
            py,
            Error::ShapeMismatch {
                what: "states",
                expected: batch.outer,
                got: ms.len().min(es.len()),
            },
        ));
    }
    let mut states = try_vec(batch.outer, LseState::EMPTY).map_err(|e| to_pyerr(py, e))?;
    for ((s, &m), &e) in states.iter_mut().zip(ms).zip(es) {
        *s = LseState { max: m, excess: e };
    }
    let out = PyArray2::<T>::zeros(py, [batch.outer, batch.n], false);
    let mut or = out.readwrite();
    let os = or
        .as_slice_mut()
        .map_err(|e| to_pyerr(py, Error::Layout(e.to_string())))?;
    py.detach(|| from_states::softmax_like_from_states(xs, batch, &states, what, os))
        .map_err(|e| to_pyerr(py, e))?;
    drop(or);
    Ok(out.into_any())
}

/// softmax (`log = False`) or log_softmax of each row of a C-contiguous 2-D float array,
/// normalised by the given float64 `(max, excess)` state of that row (one per row).
#[pyfunction]
#[pyo3(signature = (x, max, excess, log = false))]
fn softmax_from_states<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    max: PyReadonlyArray1<'py, f64>,
    excess: PyReadonlyArray1<'py, f64>,
    log: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    if let Ok(x) = x.cast::<PyArray2<f32>>() {
        from_states_typed(py, x, max, excess, what)
    } else if let Ok(x) = x.cast::<PyArray2<f64>>() {
        from_states_typed(py, x, max, excess, what)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 2-D float32 or float64 array",
        ))
    }
}
