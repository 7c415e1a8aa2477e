//! The crate's [`Error`] as a Python exception.
//!
//! `TargetOutOfRange` becomes `IndexError` whose message states the lane, carrying the facts
//! as the attribute `target_error = (lane, value, classes)`: the Python front door, which knows
//! the target's shape, restates it with the position unravelled (`target[1, 0] = 3 ...`).
//! A failed allocation becomes `MemoryError`; anything else `ValueError`.

use pyo3::exceptions::{PyIndexError, PyMemoryError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pub(crate) fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    match err {
        Error::TargetOutOfRange {
            position,
            value,
            classes,
        } => {
            let exc = PyIndexError::new_err(err.to_string());
            // Best effort: without the attribute the front door keeps the lane's message.
            let _ = exc
                .value(py)
                .setattr("target_error", (position, value, classes));
            exc
        }
        Error::MaskedTarget { position, value } => {
            let exc = PyIndexError::new_err(err.to_string());
            let _ = exc.value(py).setattr("masked_target", (position, value));
            exc
        }
        Error::MaskedProbability {
            position,
            class,
            value,
        } => {
            let exc = PyValueError::new_err(err.to_string());
            let _ = exc
                .value(py)
                .setattr("masked_probability", (position, class, value));
            exc
        }
        Error::Alloc { .. } => PyMemoryError::new_err(err.to_string()),
        _ => PyValueError::new_err(err.to_string()),
    }
}
