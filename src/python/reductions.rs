//! Bindings for logsumexp, softmax, log_softmax, the lane states and the thread pool.
//!
//! The Python layer (`python/stablelse/_api.py`) maps any `axis` onto a 3-D
//! `(outer, n, inner)` view and hands it here; this module checks that the view is a layout
//! the kernels read directly (see [`crate::layout`]) and raises `ValueError` otherwise.

use numpy::{Element, PyArray2, PyArray3, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::kernels::{self, Algorithm, Reduction};
use crate::layout::Batch;
use crate::real::Real;
use crate::state::LseState;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rows_fast, m)?)?;
    m.add_function(wrap_pyfunction!(logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(logsumexp_weighted, m)?)?;
    m.add_function(wrap_pyfunction!(softmax, m)?)?;
    m.add_function(wrap_pyfunction!(lse_states, m)?)?;
    m.add_function(wrap_pyfunction!(merge_states, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_simd_levels, m)?)?;
    Ok(())
}

pub(crate) fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

pub(crate) fn parse_algorithm(name: &str) -> PyResult<Algorithm> {
    Algorithm::parse(name).ok_or_else(|| {
        value_error(format!(
            "algorithm must be 'auto', 'two_pass' or 'online', got {name:?}"
        ))
    })
}

/// The kernel batch of a 3-D `(outer, n, inner)` array, or why the kernels cannot read it.
pub(crate) fn batch_of<T: Element>(arr: &Bound<'_, PyArray3<T>>, name: &str) -> PyResult<Batch> {
    let shape = arr.shape();
    let (outer, n, inner) = (shape[0], shape[1], shape[2]);
    if outer == 0 || n == 0 || inner == 0 {
        // Nothing is read: strides and the data pointer of an empty array are irrelevant.
        return Ok(Batch::contiguous(outer, n, inner));
    }
    if !(arr.data() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(value_error(format!(
            "{name}: the data pointer is not aligned"
        )));
    }
    let item = std::mem::size_of::<T>() as isize;
    let s = arr.strides();
    let bad = || {
        value_error(format!(
            "{name}: layout not supported by the kernels: shape {shape:?}, strides {s:?}"
        ))
    };
    let elems = |stride: isize| -> PyResult<usize> {
        if stride < 0 || stride % item != 0 {
            return Err(bad());
        }
        Ok((stride / item) as usize)
    };
    // Strides of length-1 (or empty) axes are irrelevant; the others must be the dense ones.
    if inner > 1 && n > 0 && elems(s[2])? != 1 {
        return Err(bad());
    }
    if n > 1 && elems(s[1])? != inner {
        return Err(bad());
    }
    let outer_stride = if outer > 1 { elems(s[0])? } else { n * inner };
    Ok(Batch {
        outer,
        n,
        inner,
        outer_stride,
    })
}

/// The elements behind `arr` that `batch` indexes, as a slice.
///
/// # Safety
/// `batch` must come from [`batch_of`] on `arr`, and the array must stay alive and unmodified
/// (it is borrowed through the numpy crate's borrow checker by the caller) while the slice lives.
pub(crate) unsafe fn slice_of<'a, T: Element>(
    arr: &Bound<'_, PyArray3<T>>,
    batch: &Batch,
) -> PyResult<&'a [T]> {
    let len = batch.required_len().map_err(value_error)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: batch_of checked that every index the batch reaches lies inside the array.
    Ok(unsafe { std::slice::from_raw_parts(arr.data() as *const T, len) })
}

/// A dense, writeable output array of exactly `shape`, or a `ValueError` naming `out`.
pub(crate) fn check_out<T: Element, D: numpy::ndarray::Dimension>(
    out: &Bound<'_, numpy::PyArray<T, D>>,
    shape: &[usize],
) -> PyResult<()> {
    if out.shape() != shape {
        return Err(value_error(format!(
            "out has shape {:?}, expected {shape:?}",
            out.shape()
        )));
    }
    if !out.is_c_contiguous() {
        return Err(value_error("out must be C-contiguous"));
    }
    Ok(())
}

fn same_memory<T: Element>(a: &Bound<'_, PyArray3<T>>, b: &Bound<'_, PyArray3<T>>) -> bool {
    a.data() == b.data() && a.shape() == b.shape() && a.strides() == b.strides()
}

fn rows_fast_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, numpy::PyArrayDyn<T>>,
    axis: Option<isize>,
    keepdims: bool,
    op: u8,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let shape = x.shape();
    let ndim = shape.len() as isize;
    let last_axis = match axis {
        Some(a) => ndim > 0 && (a == -1 || a == ndim - 1),
        None => ndim == 1,
    };
    let size: usize = shape.iter().product();
    let aligned = (x.data() as usize).is_multiple_of(std::mem::align_of::<T>());
    if !last_axis || size == 0 || !aligned || !x.is_c_contiguous() {
        return Ok(None);
    }
    let n = shape[ndim as usize - 1];
    let batch = Batch::rows(size / n, n);
    let xr = x.readonly();
    let xs = xr.as_slice().map_err(|e| value_error(e.to_string()))?;
    if op == 0 {
        let mut oshape = shape[..shape.len() - 1].to_vec();
        if keepdims {
            oshape.push(1);
        }
        // SAFETY: every element is written by the kernel before the array is returned.
        let out = unsafe { numpy::PyArrayDyn::<T>::new(py, oshape, false) };
        let mut or = out.readwrite();
        let os = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
        py.detach(|| kernels::logsumexp(xs, batch, Algorithm::Auto, os))
            .map_err(value_error)?;
        drop((or, xr));
        if out.ndim() == 0 {
            return Ok(Some(out.get_item(())?));
        }
        return Ok(Some(out.into_any()));
    }
    let what = if op == 2 {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    let out = match out {
        None => {
            // SAFETY: every element is written by the kernel before the array is returned.
            unsafe { numpy::PyArrayDyn::<T>::new(py, shape.to_vec(), false) }
        }
        Some(o) => {
            // Anything but a dense out of the right shape and dtype, disjoint from x or x
            // itself, goes to the full planner, which names the problem.
            let Ok(o) = o.cast::<numpy::PyArrayDyn<T>>() else {
                return Ok(None);
            };
            let aligned = (o.data() as usize).is_multiple_of(std::mem::align_of::<T>());
            if o.shape() != shape || !o.is_c_contiguous() || !aligned {
                return Ok(None);
            }
            let bytes = size * std::mem::size_of::<T>();
            let (xb, ob) = (x.data() as usize, o.data() as usize);
            if ob == xb {
                drop(xr);
                let Ok(mut or) = o.try_readwrite() else {
                    return Ok(None);
                };
                let buf = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
                py.detach(|| kernels::softmax_like_inplace(buf, batch, Algorithm::Auto, what))
                    .map_err(value_error)?;
                drop(or);
                return Ok(Some(o.clone().into_any()));
            }
            if ob < xb + bytes && xb < ob + bytes {
                return Ok(None);
            }
            o.clone()
        }
    };
    let Ok(mut or) = out.try_readwrite() else {
        return Ok(None);
    };
    let os = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    py.detach(|| kernels::softmax_like(xs, batch, Algorithm::Auto, what, os))
        .map_err(value_error)?;
    drop((or, xr));
    Ok(Some(out.into_any()))
}

/// The common call in one native step: op 0 = logsumexp, 1 = softmax, 2 = log_softmax over
/// the last axis of a C-contiguous, non-empty float32/float64 array (`axis` -1 or ndim-1, or
/// None for 1-D), into a new array or, for softmax/log_softmax, into a dense `out` of the same
/// shape and dtype that is disjoint from `x` or is `x` itself (in place). Returns None when the
/// call is not of that form; the Python layer then plans it in full (and raises its errors).
#[pyfunction]
#[pyo3(signature = (x, axis, keepdims, op, out = None))]
fn rows_fast<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    axis: Option<isize>,
    keepdims: bool,
    op: u8,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if let Ok(x) = x.cast::<numpy::PyArrayDyn<f32>>() {
        rows_fast_typed(py, x, axis, keepdims, op, out)
    } else if let Ok(x) = x.cast::<numpy::PyArrayDyn<f64>>() {
        rows_fast_typed(py, x, axis, keepdims, op, out)
    } else {
        Ok(None)
    }
}

fn lse_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray3<T>>,
    alg: Algorithm,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let batch = batch_of(x, "x")?;
    let shape = [batch.outer, batch.inner];
    let out = match out {
        Some(o) => {
            let o = o
                .cast::<PyArray2<T>>()
                .map_err(|_| PyTypeError::new_err(format!("out must be a 2-D {} array", T::NAME)))?
                .clone();
            check_out(&o, &shape)?;
            o
        }
        // SAFETY: every element is written by the kernel before the array is returned.
        None => unsafe { PyArray2::<T>::new(py, shape, false) },
    };
    let xr = x.readonly();
    let mut or = out
        .try_readwrite()
        .map_err(|e| value_error(format!("out cannot be written: {e}")))?;
    // SAFETY: `xr` keeps x borrowed for the call.
    let xs = unsafe { slice_of(x, &batch)? };
    let os = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    py.detach(|| kernels::logsumexp(xs, batch, alg, os))
        .map_err(value_error)?;
    drop(xr);
    Ok(out.into_any())
}

/// logsumexp over axis 1 of a 3-D float32/float64 array: returns `(outer, inner)`.
#[pyfunction]
#[pyo3(signature = (x, algorithm = "auto", out = None))]
fn logsumexp<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    algorithm: &str,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let alg = parse_algorithm(algorithm)?;
    if let Ok(x) = x.cast::<PyArray3<f32>>() {
        lse_typed(py, x, alg, out)
    } else if let Ok(x) = x.cast::<PyArray3<f64>>() {
        lse_typed(py, x, alg, out)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 3-D float32 or float64 array",
        ))
    }
}

fn weighted_typed<'py, T: Real + Element>(
    py: Python<'py>,
    a: &Bound<'py, PyArray3<T>>,
    b: &Bound<'py, PyAny>,
    return_sign: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let b = b
        .cast::<PyArray3<T>>()
        .map_err(|_| PyTypeError::new_err(format!("b must be a 3-D {} array like a", T::NAME)))?;
    let batch = batch_of(a, "a")?;
    let bbatch = batch_of(b, "b")?;
    let shape = [batch.outer, batch.inner];
    // SAFETY: every element is written by the kernel before the arrays are returned.
    let out = unsafe { PyArray2::<T>::new(py, shape, false) };
    let sign = unsafe { PyArray2::<T>::new(py, shape, false) };
    let (ar, br) = (a.readonly(), b.readonly());
    let (mut or, mut sr) = (out.readwrite(), sign.readwrite());
    // SAFETY: `ar` and `br` keep the inputs borrowed for the call.
    let (as_, bs) = unsafe { (slice_of(a, &batch)?, slice_of(b, &bbatch)?) };
    let os = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    let ss = sr.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    py.detach(|| {
        kernels::logsumexp_weighted(
            as_,
            batch,
            bs,
            bbatch,
            os,
            if return_sign { Some(ss) } else { None },
        )
    })
    .map_err(value_error)?;
    drop((ar, br, or, sr));
    PyTuple::new(py, [out.into_any(), sign.into_any()])
}

/// scipy's weighted logsumexp over axis 1 of 3-D `a` and `b` (same shape, b's outer stride
/// may be 0): returns `(res, sign)`; `res` is NaN where the sum is negative unless `return_sign`.
#[pyfunction]
#[pyo3(signature = (a, b, return_sign = false))]
fn logsumexp_weighted<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    return_sign: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    if let Ok(a) = a.cast::<PyArray3<f32>>() {
        weighted_typed(py, a, b, return_sign)
    } else if let Ok(a) = a.cast::<PyArray3<f64>>() {
        weighted_typed(py, a, b, return_sign)
    } else {
        Err(PyTypeError::new_err(
            "a must be a 3-D float32 or float64 array",
        ))
    }
}

fn softmax_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray3<T>>,
    what: Reduction,
    alg: Algorithm,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let batch = batch_of(x, "x")?;
    let shape = [batch.outer, batch.n, batch.inner];
    let out = match out {
        Some(o) => {
            let o = o
                .cast::<PyArray3<T>>()
                .map_err(|_| PyTypeError::new_err(format!("out must be a 3-D {} array", T::NAME)))?
                .clone();
            check_out(&o, &shape)?;
            o
        }
        // SAFETY: every element is written by the kernel before the array is returned.
        None => unsafe { PyArray3::<T>::new(py, shape, false) },
    };
    if same_memory(x, &out) {
        if !batch.is_contiguous() {
            return Err(value_error("in-place softmax needs a C-contiguous array"));
        }
        let mut or = out
            .try_readwrite()
            .map_err(|e| value_error(format!("out cannot be written: {e}")))?;
        let buf = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
        py.detach(|| kernels::softmax_like_inplace(buf, batch, alg, what))
            .map_err(value_error)?;
        drop(or);
        return Ok(out.into_any());
    }
    let xr = x.readonly();
    let mut or = out
        .try_readwrite()
        .map_err(|_| value_error("out overlaps the input or is borrowed elsewhere"))?;
    // SAFETY: `xr` keeps x borrowed for the call.
    let xs = unsafe { slice_of(x, &batch)? };
    let os = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    py.detach(|| kernels::softmax_like(xs, batch, alg, what, os))
        .map_err(value_error)?;
    drop((xr, or));
    Ok(out.into_any())
}

/// softmax (or log_softmax when `log`) over axis 1 of a 3-D float32/float64 array, into a new
/// C-contiguous array or `out` (which may be `x` itself for an in-place update).
#[pyfunction]
#[pyo3(signature = (x, log = false, algorithm = "auto", out = None))]
fn softmax<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    log: bool,
    algorithm: &str,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let alg = parse_algorithm(algorithm)?;
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    if let Ok(x) = x.cast::<PyArray3<f32>>() {
        softmax_typed(py, x, what, alg, out)
    } else if let Ok(x) = x.cast::<PyArray3<f64>>() {
        softmax_typed(py, x, what, alg, out)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 3-D float32 or float64 array",
        ))
    }
}

fn states_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray3<T>>,
    alg: Algorithm,
) -> PyResult<Bound<'py, PyTuple>> {
    let batch = batch_of(x, "x")?;
    let xr = x.readonly();
    // SAFETY: `xr` keeps x borrowed for the call.
    let xs = unsafe { slice_of(x, &batch)? };
    let mut states = vec![LseState::EMPTY; batch.count()];
    py.detach(|| kernels::lse_states(xs, batch, alg, &mut states))
        .map_err(value_error)?;
    drop(xr);
    let shape = [batch.outer, batch.inner];
    let max = numpy::PyArray1::from_iter(py, states.iter().map(|s| s.max)).reshape(shape)?;
    let excess = numpy::PyArray1::from_iter(py, states.iter().map(|s| s.excess)).reshape(shape)?;
    PyTuple::new(py, [max.into_any(), excess.into_any()])
}

/// The `(max, excess)` float64 states of every lane of a 3-D float array, each `(outer, inner)`.
/// `logsumexp = max + log1p(excess)` for a finite max; see `LseState`.
#[pyfunction]
#[pyo3(signature = (x, algorithm = "auto"))]
fn lse_states<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    algorithm: &str,
) -> PyResult<Bound<'py, PyTuple>> {
    let alg = parse_algorithm(algorithm)?;
    if let Ok(x) = x.cast::<PyArray3<f32>>() {
        states_typed(py, x, alg)
    } else if let Ok(x) = x.cast::<PyArray3<f64>>() {
        states_typed(py, x, alg)
    } else {
        Err(PyTypeError::new_err(
            "x must be a 3-D float32 or float64 array",
        ))
    }
}

/// Merges two sets of `(max, excess)` float64 states elementwise (same shapes, contiguous)
/// with the one merge rule of `LseState`; returns new `(max, excess)` arrays.
#[pyfunction]
fn merge_states<'py>(
    py: Python<'py>,
    max_a: numpy::PyReadonlyArrayDyn<'py, f64>,
    excess_a: numpy::PyReadonlyArrayDyn<'py, f64>,
    max_b: numpy::PyReadonlyArrayDyn<'py, f64>,
    excess_b: numpy::PyReadonlyArrayDyn<'py, f64>,
) -> PyResult<Bound<'py, PyTuple>> {
    let shape = max_a.shape().to_vec();
    for (name, arr) in [
        ("excess_a", &excess_a),
        ("max_b", &max_b),
        ("excess_b", &excess_b),
    ] {
        if arr.shape() != shape.as_slice() {
            return Err(value_error(format!(
                "{name} has shape {:?}, expected {shape:?}",
                arr.shape()
            )));
        }
    }
    let (ma, ea, mb, eb) = (
        max_a.as_array(),
        excess_a.as_array(),
        max_b.as_array(),
        excess_b.as_array(),
    );
    let merged: Vec<LseState> = ma
        .iter()
        .zip(ea.iter())
        .zip(mb.iter().zip(eb.iter()))
        .map(|((&m1, &e1), (&m2, &e2))| {
            LseState {
                max: m1,
                excess: e1,
            }
            .merge(LseState {
                max: m2,
                excess: e2,
            })
        })
        .collect();
    let max =
        numpy::PyArray1::from_iter(py, merged.iter().map(|s| s.max)).reshape(shape.clone())?;
    let excess = numpy::PyArray1::from_iter(py, merged.iter().map(|s| s.excess)).reshape(shape)?;
    PyTuple::new(py, [max.into_any(), excess.into_any()])
}

/// Sets the number of threads of stablelse's pool; 0 restores the default.
#[pyfunction]
fn set_num_threads(n: usize) {
    crate::parallel::set_num_threads(n)
}

/// Forgets the thread pool in a child process after `fork` (its worker threads were not
/// copied); the next parallel call builds a new pool. Registered with `os.register_at_fork`.
#[pyfunction]
fn after_fork_in_child() {
    crate::parallel::forget_pool_after_fork()
}

/// The number of threads stablelse uses.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::parallel::num_threads()
}

/// The SIMD level chosen for this process.
#[pyfunction]
fn simd_level() -> &'static str {
    crate::simd::level().name()
}

/// Every SIMD level this CPU supports.
#[pyfunction]
fn available_simd_levels() -> Vec<&'static str> {
    crate::simd::available_levels()
        .into_iter()
        .map(|l| l.name())
        .collect()
}
