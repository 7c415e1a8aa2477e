//! Bindings for logsumexp, softmax, log_softmax, the lane states and the thread pool.
//!
//! The Python layer (`python/stablelse/_api.py`) normalises `axis` and converts foreign inputs;
//! these functions take a float32/float64 ndarray and the normalised axes, ask the planner
//! ([`crate::plan`]) how the kernels see it, and run it ([`super::exec`]) into a new array or
//! an `out` of any writeable layout. Arrays are read through their raw fields
//! ([`super::array`]), never the numpy crate's borrow flags.

use numpy::{Element, PyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use super::array::{check_out, copy_values, shares_memory, try_empty, Raw, MAX_DIMS};
use super::exec::{self, ExecError, LaneOut};
use super::half::as_bf16;
use crate::half::{Stored, F16};
use crate::kernels::{self, Algorithm, Reduction};
use crate::layout::Batch;
use crate::plan::{self, Access, Plan};
use crate::real::Real;
use crate::state::LseState;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
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
            "algorithm must be one of ('auto', 'two_pass', 'online'), got '{name}'"
        ))
    })
}

/// The `algorithm` argument, any Python object: a `ValueError` (as for any unknown name)
/// unless it is one of the three names.
pub(crate) fn algorithm_of(obj: &Bound<'_, PyAny>) -> PyResult<Algorithm> {
    if let Ok(s) = obj.cast::<PyString>() {
        if let Some(alg) = Algorithm::parse(&s.to_cow()?) {
            return Ok(alg);
        }
    }
    Err(value_error(format!(
        "algorithm must be one of ('auto', 'two_pass', 'online'), got {}",
        obj.repr()?
    )))
}

/// An execution error as a Python exception.
pub(crate) fn exec_error(e: ExecError) -> PyErr {
    match e {
        ExecError::Memory => PyMemoryError::new_err("cannot allocate scratch memory"),
        ExecError::Kernel(msg) => value_error(msg),
    }
}

/// The normalised axes tuple (sorted, distinct, in range: `_axes.normalize_axes`).
fn axes_of(axes: &Bound<'_, PyAny>) -> PyResult<([usize; MAX_DIMS], usize)> {
    let mut out = [0usize; MAX_DIMS];
    let tuple = axes
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("axes must be a tuple of ints"))?;
    if tuple.len() > MAX_DIMS {
        return Err(value_error("too many axes"));
    }
    for (slot, item) in out.iter_mut().zip(tuple.iter()) {
        *slot = item.extract()?;
    }
    Ok((out, tuple.len()))
}

/// The plan of `raw` over the normalised `axes`, or a `ValueError`.
fn plan_of(raw: &Raw, axes: &[usize]) -> PyResult<Plan> {
    plan::plan(raw.layout(), axes).map_err(|e| value_error(e.0))
}

/// The fields of the `where` mask: a bool ndarray of exactly `shape` (the front door broadcasts
/// it; zero strides are fine), or a precise error naming `where`.
fn mask_of(mask: Option<&Bound<'_, PyAny>>, shape: &[usize]) -> PyResult<Option<Raw>> {
    let Some(m) = mask else { return Ok(None) };
    let arr = m
        .cast::<PyArrayDyn<bool>>()
        .map_err(|_| PyTypeError::new_err("where must be a bool ndarray of the input's shape"))?;
    let raw = Raw::of(arr)?;
    if raw.shape() != shape {
        return Err(value_error(format!(
            "where has shape {}, expected the input's shape {}",
            super::array::py_shape(raw.shape()),
            super::array::py_shape(shape)
        )));
    }
    Ok(Some(raw))
}

/// A `ValueError` if the output `o` shares an element with the mask.
fn check_mask_apart(
    py: Python<'_>,
    mask: Option<(&Bound<'_, PyAny>, &Raw)>,
    o: &Bound<'_, PyAny>,
    oraw: &Raw,
) -> PyResult<()> {
    if let Some((m, mraw)) = mask {
        if shares_memory(py, m, mraw, o, oraw)? {
            return Err(value_error("out overlaps where"));
        }
    }
    Ok(())
}

/// The kernel batch of a 3-D `(outer, n, inner)` array read as it is, or why not.
pub(crate) fn batch3(raw: &Raw, name: &str) -> PyResult<Batch> {
    if raw.ndim != 3 {
        return Err(value_error(format!("{name} must be 3-D")));
    }
    let p = plan_of(raw, &[1])?;
    match p.access {
        Access::Direct(b) if p.perm == [0, 1, 2] => Ok(b),
        _ => Err(value_error(format!(
            "{name}: layout not supported by the kernels: shape {:?}, strides {:?}",
            raw.shape(),
            raw.strides()
        ))),
    }
}

/// The elements of a batch read by [`batch3`] as a slice.
///
/// # Safety
/// `batch` comes from [`batch3`] on `raw`, whose array outlives the slice.
pub(crate) unsafe fn slice3<'a, T>(raw: &Raw, batch: &Batch) -> PyResult<&'a [T]> {
    // SAFETY: the caller's contract.
    unsafe { exec::slice_of(raw, batch) }.map_err(exec_error)
}

/// `raw` with the axes of a work-order array put back in the input's order: axis `perm[i]`
/// of the result is axis `i` of `raw`.
fn unpermute(raw: &Raw, perm: &[usize]) -> Raw {
    let mut r = *raw;
    for (i, &a) in perm.iter().enumerate() {
        r.shape[a] = raw.shape[i];
        r.strides[a] = raw.strides[i];
    }
    r
}

/// `arr.transpose(order)` as a new view (a NumPy call: only transposed plans need it).
fn transposed<'py>(arr: Bound<'py, PyAny>, order: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    if order.iter().enumerate().all(|(i, &a)| i == a) {
        return Ok(arr);
    }
    arr.call_method1("transpose", (PyTuple::new(arr.py(), order)?,))
}

/// A 0-d result as a NumPy scalar (as scipy returns), anything else as is.
fn scalarize(arr: Bound<'_, PyAny>, ndim: usize) -> PyResult<Bound<'_, PyAny>> {
    if ndim == 0 {
        arr.get_item(())
    } else {
        Ok(arr)
    }
}

/// The shape of a reduction's result: the kept axes, with length-1 reduced axes if
/// `keepdims`.
fn result_shape(shape: &[usize], axes: &[usize], keepdims: bool) -> ([usize; MAX_DIMS], usize) {
    let mut out = [0usize; MAX_DIMS];
    let mut k = 0;
    for (a, &n) in shape.iter().enumerate() {
        let reduced = axes.contains(&a);
        if keepdims || !reduced {
            out[k] = if reduced { 1 } else { n };
            k += 1;
        }
    }
    (out, k)
}

#[allow(clippy::too_many_arguments)]
fn lse_typed<'py, T: Stored + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    axes: &[usize],
    keepdims: bool,
    alg: Algorithm,
    out: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let raw = Raw::of(x)?;
    let mraw = mask_of(mask, raw.shape())?;
    let mref = mraw.as_ref();
    let p = plan_of(&raw, axes)?;
    let ndim = raw.ndim;
    let shape = raw.shape();
    let reduced = |a: usize| axes.contains(&a);
    if let Some(o) = out {
        let (rshape, k) = result_shape(shape, axes, keepdims);
        let (oarr, oraw) = check_out::<T>(o, &rshape[..k], "out")?;
        if shares_memory(py, x.as_any(), &raw, o, &oraw)? {
            return Err(value_error("out overlaps the input a"));
        }
        check_mask_apart(py, mask.zip(mref), o, &oraw)?;
        // The output's axis for each kept axis, in work order.
        let mut out_axes = [0usize; MAX_DIMS];
        for (slot, a) in out_axes.iter_mut().zip(p.kept()) {
            *slot = if keepdims {
                a
            } else {
                (0..a).filter(|&b| !reduced(b)).count()
            };
        }
        let kept = ndim - axes.len();
        // SAFETY: x and out are live for the call, out writeable and disjoint from x.
        exec::detach_unless_small(py, raw.size(), || unsafe {
            exec::reduce::<T, _>(
                &p,
                &raw,
                mref,
                &out_axes[..kept],
                LaneOut::Logsumexp(&oraw),
                alg,
            )
        })
        .map_err(exec_error)?;
        return scalarize(oarr.into_any(), k);
    }
    // A new result, dense in the work order of the kept axes (returned as a view in the
    // input's order); with keepdims the reduced axes are length-1 axes in place.
    let mut kept_buf = [0usize; MAX_DIMS];
    let mut nk = 0;
    for a in p.kept() {
        kept_buf[nk] = a;
        nk += 1;
    }
    let kept = &kept_buf[..nk];
    let sorted = kept.windows(2).all(|w| w[0] < w[1]);
    let (mut wshape, mut k) = result_shape(shape, axes, keepdims);
    if !sorted {
        for (slot, &a) in wshape.iter_mut().zip(kept) {
            *slot = shape[a];
        }
        k = kept.len();
    }
    // SAFETY: every element is written below before the array is returned.
    let res = unsafe { try_empty::<T>(py, &wshape[..k])? };
    let rraw = Raw::of(&res)?;
    let mut out_axes = [0usize; MAX_DIMS];
    for (i, slot) in out_axes[..nk].iter_mut().enumerate() {
        *slot = if sorted && keepdims { kept[i] } else { i };
    }
    let out_axes = &out_axes[..nk];
    // SAFETY: x and res are live for the call; res is new, dense and writeable.
    exec::detach_unless_small(py, raw.size(), || unsafe {
        exec::reduce::<T, _>(&p, &raw, mref, out_axes, LaneOut::Logsumexp(&rraw), alg)
    })
    .map_err(exec_error)?;
    if sorted {
        return scalarize(res.into_any(), k);
    }
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.sort_by_key(|&i| kept[i]);
    let mut res = transposed(res.into_any(), &order)?;
    if keepdims {
        let kshape: Vec<usize> = (0..ndim)
            .map(|a| if reduced(a) { 1 } else { shape[a] })
            .collect();
        res = res.call_method1("reshape", (PyTuple::new(py, kshape)?,))?;
    }
    Ok(res)
}

/// logsumexp of a float32/float64 ndarray of at least one dimension over the normalised
/// `axes`, into a new array (a NumPy scalar when 0-d) or into `out` (any writeable layout of
/// the result's shape and dtype, sharing no element with `x` or `where`), of the elements the
/// bool array `where` (of `x`'s shape, any strides) keeps if given. Returns `NotImplemented`
/// for any other input; the Python layer converts it first.
#[pyfunction]
#[pyo3(signature = (x, axes, keepdims, algorithm, out = None, r#where = None))]
fn logsumexp<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    axes: &Bound<'py, PyAny>,
    keepdims: &Bound<'py, PyAny>,
    algorithm: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (ax, na) = axes_of(axes)?;
    let keepdims = keepdims.is_truthy()?;
    let alg = algorithm_of(algorithm)?;
    if let Ok(x) = x.cast::<PyArrayDyn<f32>>() {
        if x.ndim() > 0 {
            return lse_typed(py, x, &ax[..na], keepdims, alg, out, r#where);
        }
    } else if let Ok(x) = x.cast::<PyArrayDyn<f64>>() {
        if x.ndim() > 0 {
            return lse_typed(py, x, &ax[..na], keepdims, alg, out, r#where);
        }
    } else if let Ok(x) = x.cast::<PyArrayDyn<F16>>() {
        if x.ndim() > 0 {
            return lse_typed(py, x, &ax[..na], keepdims, alg, out, r#where);
        }
    } else if let Some(x) = as_bf16(x) {
        if x.ndim() > 0 {
            return lse_typed(py, &x, &ax[..na], keepdims, alg, out, r#where);
        }
    }
    Ok(py.NotImplemented().into_bound(py))
}

fn weighted_typed<'py, T: Real + Element>(
    py: Python<'py>,
    a: &Bound<'py, PyArrayDyn<T>>,
    b: &Bound<'py, PyAny>,
    return_sign: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let b = b
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| PyTypeError::new_err(format!("b must be a 3-D {} array like a", T::NAME)))?;
    let (ra, rb) = (Raw::of(a)?, Raw::of(b)?);
    let batch = batch3(&ra, "a")?;
    let bbatch = batch3(&rb, "b")?;
    let shape = [batch.outer, batch.inner];
    // SAFETY: every element is written by the kernel before the arrays are returned.
    let (out, sign) = unsafe { (try_empty::<T>(py, &shape)?, try_empty::<T>(py, &shape)?) };
    let (ro, rs) = (Raw::of(&out)?, Raw::of(&sign)?);
    let count = batch.count();
    // SAFETY: a and b hold their batches; out and sign are new, dense, of `count` elements.
    let res = py.detach(|| unsafe {
        let (as_, bs) = (slice3::<T>(&ra, &batch)?, slice3::<T>(&rb, &bbatch)?);
        let os = std::slice::from_raw_parts_mut(ro.data::<T>(), count);
        let ss = std::slice::from_raw_parts_mut(rs.data::<T>(), count);
        kernels::logsumexp_weighted(as_, batch, bs, bbatch, os, return_sign.then_some(ss))
            .map_err(value_error)
    });
    res?;
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
    if let Ok(a) = a.cast::<PyArrayDyn<f32>>() {
        weighted_typed(py, a, b, return_sign)
    } else if let Ok(a) = a.cast::<PyArrayDyn<f64>>() {
        weighted_typed(py, a, b, return_sign)
    } else {
        Err(PyTypeError::new_err(
            "a must be a 3-D float32 or float64 array",
        ))
    }
}

#[allow(clippy::too_many_arguments)]
fn softmax_typed<'py, T: Stored + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    axes: &[usize],
    what: Reduction,
    alg: Algorithm,
    out: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let raw = Raw::of(x)?;
    let mraw = mask_of(mask, raw.shape())?;
    let mref = mraw.as_ref();
    let p = plan_of(&raw, axes)?;
    if let Some(o) = out {
        let (oarr, oraw) = check_out::<T>(o, raw.shape(), "out")?;
        if !raw.same_view(&oraw) && shares_memory(py, x.as_any(), &raw, o, &oraw)? {
            return Err(value_error(
                "out partially overlaps the input x; pass out=x for in place",
            ));
        }
        check_mask_apart(py, mask.zip(mref), o, &oraw)?;
        // SAFETY: x and out are live for the call; out is writeable and is x or disjoint.
        exec::detach_unless_small(py, raw.size(), || unsafe {
            exec::softmax::<T, _>(&p, &raw, mref, &oraw, alg, what)
        })
        .map_err(exec_error)?;
        return Ok(oarr.into_any());
    }
    let mut wshape = [0usize; MAX_DIMS];
    for (slot, &a) in wshape.iter_mut().zip(&p.perm) {
        *slot = raw.shape[a];
    }
    // SAFETY: every element is written below before the array is returned.
    let res = unsafe { try_empty::<T>(py, &wshape[..raw.ndim])? };
    let rraw = unpermute(&Raw::of(&res)?, &p.perm);
    // SAFETY: x and res are live; res is new, writeable and disjoint from x.
    exec::detach_unless_small(py, raw.size(), || unsafe {
        exec::softmax::<T, _>(&p, &raw, mref, &rraw, alg, what)
    })
    .map_err(exec_error)?;
    let mut inv = [0usize; MAX_DIMS];
    for (i, &a) in p.perm.iter().enumerate() {
        inv[a] = i;
    }
    transposed(res.into_any(), &inv[..p.perm.len()])
}

/// softmax (or log_softmax when `log`) of a float32/float64 ndarray of at least one
/// dimension over the normalised `axes`, into a new array or `out` (any writeable layout of
/// `x`'s shape and dtype; `x` itself for in place, else sharing no element with it). Returns
/// `NotImplemented` for any other input. With `where` (a bool array of `x`'s shape, any
/// strides), over the elements it keeps: 0 (softmax) or `-inf` (log_softmax) elsewhere.
#[pyfunction]
#[pyo3(signature = (x, axes, log, algorithm, out = None, r#where = None))]
#[allow(clippy::too_many_arguments)]
fn softmax<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    axes: &Bound<'py, PyAny>,
    log: bool,
    algorithm: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let (ax, na) = axes_of(axes)?;
    let alg = algorithm_of(algorithm)?;
    let what = if log {
        Reduction::LogSoftmax
    } else {
        Reduction::Softmax
    };
    if let Ok(x) = x.cast::<PyArrayDyn<f32>>() {
        if x.ndim() > 0 {
            return softmax_typed(py, x, &ax[..na], what, alg, out, r#where);
        }
    } else if let Ok(x) = x.cast::<PyArrayDyn<f64>>() {
        if x.ndim() > 0 {
            return softmax_typed(py, x, &ax[..na], what, alg, out, r#where);
        }
    } else if let Ok(x) = x.cast::<PyArrayDyn<F16>>() {
        if x.ndim() > 0 {
            return softmax_typed(py, x, &ax[..na], what, alg, out, r#where);
        }
    } else if let Some(x) = as_bf16(x) {
        if x.ndim() > 0 {
            return softmax_typed(py, &x, &ax[..na], what, alg, out, r#where);
        }
    }
    Ok(py.NotImplemented().into_bound(py))
}

fn states_typed<'py, T: Stored + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    axes: &[usize],
    alg: Algorithm,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let raw = Raw::of(x)?;
    let mraw = mask_of(mask, raw.shape())?;
    let mref = mraw.as_ref();
    let p = plan_of(&raw, axes)?;
    let kshape: Vec<usize> = (0..raw.ndim)
        .filter(|a| !axes.contains(a))
        .map(|a| raw.shape[a])
        .collect();
    // SAFETY: every element is written below before the arrays are returned.
    let (mx, ex) = unsafe {
        (
            try_empty::<f64>(py, &kshape)?,
            try_empty::<f64>(py, &kshape)?,
        )
    };
    let (rm, re) = (Raw::of(&mx)?, Raw::of(&ex)?);
    let out_axes: Vec<usize> = p
        .kept()
        .map(|a| (0..a).filter(|b| !axes.contains(b)).count())
        .collect();
    // SAFETY: x and the new outputs are live for the call.
    py.detach(|| unsafe {
        exec::reduce::<T, _>(&p, &raw, mref, &out_axes, LaneOut::States(&rm, &re), alg)
    })
    .map_err(exec_error)?;
    PyTuple::new(py, [mx.into_any(), ex.into_any()])
}

/// The `(max, excess)` float64 states of every lane of a float32/float64 array reduced over
/// the normalised `axes`: two C-contiguous arrays of the kept axes, in the input's order.
/// `logsumexp = max + log1p(excess)` for a finite max; see `LseState`. With `where` (a bool
/// array of `x`'s shape), the states of the kept elements (`(-inf, -1)` for none).
#[pyfunction]
#[pyo3(signature = (x, axes, algorithm = "auto", r#where = None))]
fn lse_states<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    axes: &Bound<'py, PyAny>,
    algorithm: &str,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (ax, na) = axes_of(axes)?;
    let alg = parse_algorithm(algorithm)?;
    if let Ok(x) = x.cast::<PyArrayDyn<f32>>() {
        states_typed(py, x, &ax[..na], alg, r#where)
    } else if let Ok(x) = x.cast::<PyArrayDyn<f64>>() {
        states_typed(py, x, &ax[..na], alg, r#where)
    } else if let Ok(x) = x.cast::<PyArrayDyn<F16>>() {
        states_typed(py, x, &ax[..na], alg, r#where)
    } else if let Some(x) = as_bf16(x) {
        states_typed(py, &x, &ax[..na], alg, r#where)
    } else {
        Err(PyTypeError::new_err(
            "x must be a float32, float64, float16 or bfloat16 array",
        ))
    }
}

/// The elements of a float64 array in C order, copied (any layout).
pub(crate) fn f64_values(
    a: &Bound<'_, PyAny>,
    name: &str,
    shape: Option<&[usize]>,
) -> PyResult<(Vec<f64>, Vec<usize>)> {
    let arr = a
        .cast::<PyArrayDyn<f64>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a float64 array")))?;
    let raw = Raw::of(arr)?;
    if let Some(s) = shape {
        if raw.shape() != s {
            return Err(value_error(format!(
                "{name} has shape {:?}, expected {s:?}",
                raw.shape()
            )));
        }
    }
    Ok((copy_values(&raw, 0f64)?, raw.shape().to_vec()))
}

/// Merges two sets of `(max, excess)` float64 states elementwise (same shapes) with the one
/// merge rule of `LseState`; returns new C-contiguous `(max, excess)` arrays.
#[pyfunction]
fn merge_states<'py>(
    py: Python<'py>,
    max_a: &Bound<'py, PyAny>,
    excess_a: &Bound<'py, PyAny>,
    max_b: &Bound<'py, PyAny>,
    excess_b: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let (ma, shape) = f64_values(max_a, "max_a", None)?;
    let (ea, _) = f64_values(excess_a, "excess_a", Some(&shape))?;
    let (mb, _) = f64_values(max_b, "max_b", Some(&shape))?;
    let (eb, _) = f64_values(excess_b, "excess_b", Some(&shape))?;
    // SAFETY: every element is written below before the arrays are returned.
    let (mx, ex) = unsafe { (try_empty::<f64>(py, &shape)?, try_empty::<f64>(py, &shape)?) };
    let (rm, re) = (Raw::of(&mx)?, Raw::of(&ex)?);
    // SAFETY: both arrays are new, C-contiguous, of ma.len() elements.
    let (ms, es) = unsafe {
        (
            std::slice::from_raw_parts_mut(rm.data::<f64>(), ma.len()),
            std::slice::from_raw_parts_mut(re.data::<f64>(), ma.len()),
        )
    };
    for (i, (m, e)) in ms.iter_mut().zip(es.iter_mut()).enumerate() {
        let s = LseState {
            max: ma[i],
            excess: ea[i],
        }
        .merge(LseState {
            max: mb[i],
            excess: eb[i],
        });
        *m = s.max;
        *e = s.excess;
    }
    PyTuple::new(py, [mx.into_any(), ex.into_any()])
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
