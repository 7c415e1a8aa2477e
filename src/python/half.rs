//! float16 and bfloat16 NumPy arrays: the numpy crate's element types for them, and the
//! conversions exposed for the tests.
//!
//! float16 is NumPy's own `float16`. bfloat16 is a dtype that a package registers with NumPy
//! (`ml_dtypes.bfloat16`, which JAX uses); it is recognised by its name and size, so nothing is
//! imported and nothing fails when no such package is installed. Both are computed in float32,
//! block by block ([`crate::half::Stored`]).

use numpy::npyffi::{NPY_TYPES, PY_ARRAY_API};
use numpy::{
    Element, PyArrayDescr, PyArrayDescrMethods, PyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::array::{dense, try_empty, Raw};
use crate::half::{self, Bf16, Conversion, F16};

// SAFETY: F16 is a plain 16-bit value laid out as NumPy's float16.
unsafe impl Element for F16 {
    const IS_COPY: bool = true;

    fn get_dtype(py: Python<'_>) -> Bound<'_, PyArrayDescr> {
        // SAFETY: NumPy's C API, under the GIL, for a built-in type number: a new reference
        // to its descriptor (never null for a built-in type).
        unsafe {
            let descr = PY_ARRAY_API.PyArray_DescrFromType(py, NPY_TYPES::NPY_HALF as _);
            Bound::from_owned_ptr(py, descr.cast()).cast_into_unchecked()
        }
    }

    fn clone_ref(&self, _py: Python<'_>) -> Self {
        *self
    }
}

/// The bfloat16 dtype, as first seen on an input array ([`as_bf16`]).
static BFLOAT16: PyOnceLock<Py<PyArrayDescr>> = PyOnceLock::new();

// SAFETY: Bf16 is a plain 16-bit value laid out as a bfloat16 dtype's elements.
unsafe impl Element for Bf16 {
    const IS_COPY: bool = true;

    /// The dtype recorded by [`as_bf16`]. Only arrays that [`as_bf16`] accepted are treated
    /// as bfloat16, so it is set by then; before, a structured dtype no input can have.
    fn get_dtype(py: Python<'_>) -> Bound<'_, PyArrayDescr> {
        if let Some(d) = BFLOAT16.get(py) {
            return d.bind(py).clone();
        }
        PyArrayDescr::new(py, [("stablelse: no bfloat16 dtype seen", "u2")])
            .unwrap_or_else(|_| PyArrayDescr::object(py))
    }

    fn clone_ref(&self, _py: Python<'_>) -> Self {
        *self
    }
}

/// Whether `dtype` is a bfloat16 dtype: 2 bytes, a user-defined kind, named "bfloat16".
fn is_bfloat16(dtype: &Bound<'_, PyArrayDescr>) -> bool {
    dtype.itemsize() == 2
        && dtype.kind() == b'V'
        && !dtype.has_fields()
        && dtype
            .getattr("name")
            .and_then(|n| n.extract::<String>())
            .is_ok_and(|n| n == "bfloat16")
}

/// `x` as a bfloat16 array, if it is one (the first bfloat16 dtype seen becomes the one
/// results are made of; an array of another package's "bfloat16" is not taken).
pub(crate) fn as_bf16<'py>(x: &Bound<'py, PyAny>) -> Option<Bound<'py, PyArrayDyn<Bf16>>> {
    let arr = x.cast::<PyUntypedArray>().ok()?;
    let dtype = arr.dtype();
    if !is_bfloat16(&dtype) {
        return None;
    }
    let py = x.py();
    BFLOAT16.get_or_init(py, || dtype.clone().unbind());
    x.cast::<PyArrayDyn<Bf16>>().ok().cloned()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(half_conversions, m)?)?;
    m.add_function(wrap_pyfunction!(half_to_float32, m)?)?;
    m.add_function(wrap_pyfunction!(float32_to_half, m)?)?;
    Ok(())
}

/// The conversion named `name` ("portable", "f16c", "avx512", or "auto": the process's).
fn conversion_of(name: &str) -> PyResult<Conversion> {
    if name == "auto" {
        return Ok(half::conversion());
    }
    half::available_conversions()
        .into_iter()
        .find(|c| c.name() == name)
        .ok_or_else(|| PyValueError::new_err(format!("conversion {name:?} is not available")))
}

/// The float16 conversions this CPU runs, and the one this process uses first.
#[pyfunction]
fn half_conversions() -> (Vec<&'static str>, &'static str) {
    let all = half::available_conversions()
        .iter()
        .map(|c| c.name())
        .collect();
    (all, half::conversion().name())
}

/// The 16-bit patterns `bits` (a 1-D C-contiguous uint16 array) read as float16 (or bfloat16)
/// and widened to float32 with `conversion`. For the tests.
#[pyfunction]
#[pyo3(signature = (bits, bfloat16 = false, conversion = "auto"))]
fn half_to_float32<'py>(
    py: Python<'py>,
    bits: &Bound<'py, PyAny>,
    bfloat16: bool,
    conversion: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let c = conversion_of(conversion)?;
    let arr = bits
        .cast::<PyArrayDyn<u16>>()
        .map_err(|_| PyTypeError::new_err("bits must be a uint16 array"))?;
    let raw = Raw::of(arr)?;
    // SAFETY: `arr` is alive for the call.
    let src = unsafe { dense::<u16>(&raw) }
        .ok_or_else(|| PyValueError::new_err("bits must be C-contiguous"))?;
    // SAFETY: every element is written below.
    let out = unsafe { try_empty::<f32>(py, raw.shape())? };
    let oraw = Raw::of(&out)?;
    // SAFETY: new, dense, of the same size.
    let dst = unsafe { std::slice::from_raw_parts_mut(oraw.data::<f32>(), src.len()) };
    if bfloat16 {
        half::widen_bf16(src, dst);
    } else {
        half::widen_f16(c, src, dst);
    }
    Ok(out)
}

/// float32 values `x` (a C-contiguous array) rounded to float16 (or bfloat16) with
/// `conversion`, as their uint16 bit patterns. For the tests.
#[pyfunction]
#[pyo3(signature = (x, bfloat16 = false, conversion = "auto"))]
fn float32_to_half<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    bfloat16: bool,
    conversion: &str,
) -> PyResult<Bound<'py, PyArrayDyn<u16>>> {
    let c = conversion_of(conversion)?;
    let arr = x
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| PyTypeError::new_err("x must be a float32 array"))?;
    let raw = Raw::of(arr)?;
    // SAFETY: `arr` is alive for the call.
    let src = unsafe { dense::<f32>(&raw) }
        .ok_or_else(|| PyValueError::new_err("x must be C-contiguous"))?;
    // SAFETY: every element is written below.
    let out = unsafe { try_empty::<u16>(py, raw.shape())? };
    let oraw = Raw::of(&out)?;
    // SAFETY: new, dense, of the same size.
    let dst = unsafe { std::slice::from_raw_parts_mut(oraw.data::<u16>(), src.len()) };
    if bfloat16 {
        half::narrow_bf16(src, dst);
    } else {
        half::narrow_f16(c, src, dst);
    }
    Ok(out)
}
