//! Bindings for complex logsumexp, softmax and log_softmax (`python/stablelse/_complex.py`).
//!
//! complex64 / complex128 arrays reach [`crate::kernels::complex`] as interleaved `(re, im)`
//! slices of `f32` / `f64`; layouts are checked by the same [`batch3`] as the real bindings,
//! arrays are read through their raw fields ([`super::array`]), never the numpy crate's borrow
//! flags, and results are allocated fallibly (`MemoryError`).

use numpy::{Complex32, Complex64, Element, PyArray3};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::array::{dense_mut, try_empty, Raw};
use super::reductions::{batch3, slice3, value_error};
use crate::kernels::complex::{self as kc, Keep, Weights};
use crate::kernels::Reduction;
use crate::layout::Batch;
use crate::real::Real;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(logsumexp_complex, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_complex, m)?)?;
    Ok(())
}

/// A NumPy complex element type and the real type of its parts.
trait Pair: Element {
    type R: Real;
}
impl Pair for Complex32 {
    type R = f32;
}
impl Pair for Complex64 {
    type R = f64;
}

/// The interleaved parts of a complex slice.
fn parts<C: Pair>(s: &[C]) -> &[C::R] {
    // SAFETY: num-complex's `Complex<T>` is `#[repr(C)] { re: T, im: T }`, so `len` complex
    // values are `2 * len` consecutive `T`s with the same alignment.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const C::R, 2 * s.len()) }
}

fn parts_mut<C: Pair>(s: &mut [C]) -> &mut [C::R] {
    // SAFETY: as `parts`; the borrow is exclusive and covers the same memory.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut C::R, 2 * s.len()) }
}

/// The fields and batch of a `where` mask: a 3-D bool array (the front door lays it out like
/// the input; the kernels check the shapes match), or a `TypeError` naming `where`.
fn keep_of(mask: Option<&Bound<'_, PyAny>>) -> PyResult<Option<(Raw, Batch)>> {
    let Some(m) = mask else { return Ok(None) };
    let m = m
        .cast::<PyArray3<bool>>()
        .map_err(|_| PyTypeError::new_err("where must be a 3-D bool array"))?;
    let raw = Raw::of(m)?;
    let batch = batch3(&raw, "where")?;
    Ok(Some((raw, batch)))
}

/// The mask's bytes for the kernels (NumPy's bool is one byte, read as `u8`).
///
/// # Safety
/// As [`slice3`]: the mask is held by the caller for the call.
unsafe fn keep_slice<'a>(keep: Option<(Raw, Batch)>) -> PyResult<Option<Keep<'a>>> {
    let Some((raw, batch)) = keep else {
        return Ok(None);
    };
    // SAFETY: the caller's contract; reading the bool bytes as u8 accepts any byte value.
    let data = unsafe { slice3::<u8>(&raw, &batch)? };
    Ok(Some(Keep { data, batch }))
}

fn lse_typed<'py, C: Pair>(
    py: Python<'py>,
    a: &Bound<'py, PyArray3<C>>,
    b: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
    return_sign: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let b = match b {
        Some(b) => Some(
            b.cast::<PyArray3<C>>()
                .map_err(|_| PyTypeError::new_err("b must be a 3-D complex array of a's dtype"))?,
        ),
        None => None,
    };
    let ra = Raw::of(a)?;
    let rb = b.map(|b| Raw::of(b)).transpose()?;
    let batch = batch3(&ra, "a")?;
    let bbatch = rb.as_ref().map(|rb| batch3(rb, "b")).transpose()?;
    let keep = keep_of(mask)?;
    let shape = [batch.outer, batch.inner];
    // SAFETY: every element is written by the kernel before the arrays are returned.
    let (out, sign) = unsafe { (try_empty::<C>(py, &shape)?, try_empty::<C>(py, &shape)?) };
    let (ro, rs) = (Raw::of(&out)?, Raw::of(&sign)?);
    py.detach(|| {
        // SAFETY: a (and b, where) are held by the caller for the call and hold their
        // batches; out and sign are new, dense and private to this call.
        let (as_, bs, ks, os, ss) = unsafe {
            (
                slice3::<C>(&ra, &batch)?,
                match (rb, bbatch) {
                    (Some(rb), Some(bb)) => Some((slice3::<C>(&rb, &bb)?, bb)),
                    _ => None,
                },
                keep_slice(keep)?,
                dense_mut::<C>(&ro),
                dense_mut::<C>(&rs),
            )
        };
        let (Some(os), Some(ss)) = (os, ss) else {
            return Err(value_error("the results are not dense"));
        };
        kc::logsumexp_complex(
            parts(as_),
            batch,
            bs.map(|(data, batch)| Weights {
                data: parts(data),
                batch,
            }),
            ks,
            parts_mut(os),
            if return_sign {
                Some(parts_mut(ss))
            } else {
                None
            },
        )
        .map_err(value_error)
    })?;
    let sign = if return_sign {
        sign.into_any()
    } else {
        py.None().into_bound(py)
    };
    PyTuple::new(py, [out.into_any(), sign])
}

/// scipy's complex logsumexp over axis 1 of a 3-D complex64/complex128 `a` (and `b` of the
/// same dtype and shape, and a bool `where` of the same shape): returns `(res, sign)` as
/// complex `(outer, inner)` arrays; with `return_sign` the imaginary part of `res` is 0,
/// without it `sign` is None.
#[pyfunction]
#[pyo3(signature = (a, b = None, return_sign = false, r#where = None))]
fn logsumexp_complex<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: Option<&Bound<'py, PyAny>>,
    return_sign: bool,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    if let Ok(a) = a.cast::<PyArray3<Complex32>>() {
        lse_typed(py, a, b, r#where, return_sign)
    } else if let Ok(a) = a.cast::<PyArray3<Complex64>>() {
        lse_typed(py, a, b, r#where, return_sign)
    } else {
        Err(PyTypeError::new_err(
            "a must be a 3-D complex64 or complex128 array",
        ))
    }
}

fn softmax_typed<'py, C: Pair>(
    py: Python<'py>,
    x: &Bound<'py, PyArray3<C>>,
    mask: Option<&Bound<'py, PyAny>>,
    what: Reduction,
) -> PyResult<Bound<'py, PyAny>> {
    let rx = Raw::of(x)?;
    let batch = batch3(&rx, "x")?;
    let keep = keep_of(mask)?;
    // SAFETY: every element is written by the kernel before the array is returned.
    let out = unsafe { try_empty::<C>(py, &[batch.outer, batch.n, batch.inner])? };
    let ro = Raw::of(&out)?;
    py.detach(|| {
        // SAFETY: x (and where) are held by the caller for the call and hold their batches;
        // out is new, dense and private to this call.
        let (xs, ks, os) = unsafe {
            (
                slice3::<C>(&rx, &batch)?,
                keep_slice(keep)?,
                dense_mut::<C>(&ro),
            )
        };
        let os = os.ok_or_else(|| value_error("the result is not dense"))?;
        kc::softmax_like_complex(parts(xs), batch, ks, what, parts_mut(os)).map_err(value_error)
    })?;
    Ok(out.into_any())
}

/// scipy's complex softmax (or log_softmax when `log`) over axis 1 of a 3-D complex64 /
/// complex128 array (over the elements a bool `where` of its shape keeps), into a new
/// C-contiguous `(outer, n, inner)` array.
#[pyfunction]
#[pyo3(signature = (x, log = false, r#where = None))]
fn softmax_complex<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    log: bool,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    if let Ok(x) = x.cast::<PyArray3<Complex32>>() {
        softmax_typed(py, x, r#where, what)
    } else if let Ok(x) = x.cast::<PyArray3<Complex64>>() {
        softmax_typed(py, x, r#where, what)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 3-D complex64 or complex128 array",
        ))
    }
}
