//! Bindings for cross_entropy, nll_loss and the softmax / log_softmax backward products.
//!
//! The Python layer (`python/stablelse/_losses.py`) normalises the arguments: logits as a 3-D
//! `(outer, classes, inner)` float32/float64 view (class axis in the middle, `inner == 1` for
//! the last axis), index targets as C-contiguous int64 in the shape of the logits without the
//! class axis, probability targets and weights in the logits' dtype. This module checks the
//! layouts, releases the GIL and calls [`crate::kernels::cross_entropy`]; kernel errors become
//! Python exceptions through `super::errors`.

use numpy::{Element, PyArray1, PyArray3, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::errors::to_pyerr;
use super::reductions::{batch_of, check_out, parse_algorithm, slice_of, value_error};
use crate::kernels::cross_entropy::{self as xent, LossReduction, Targets, XentOptions};
use crate::kernels::vjp::{self, Backward};
use crate::kernels::Algorithm;
use crate::real::Real;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(nll_loss, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    Ok(())
}

fn parse_reduction(name: &str) -> PyResult<LossReduction> {
    LossReduction::parse(name).ok_or_else(|| {
        value_error(format!(
            "reduction must be 'mean', 'sum' or 'none', got {name:?}"
        ))
    })
}

/// The class weights as a slice (1-D, contiguous, the logits' dtype), borrowed for the call.
fn weight_of<'py, T: Real + Element>(
    weight: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<numpy::PyReadonlyArray1<'py, T>>> {
    match weight {
        None => Ok(None),
        Some(w) => {
            let w = w.cast::<PyArray1<T>>().map_err(|_| {
                PyTypeError::new_err(format!("weight must be a 1-D {} array", T::NAME))
            })?;
            let r = w.try_readonly().map_err(|e| value_error(e.to_string()))?;
            r.as_slice().map_err(|e| value_error(e.to_string()))?;
            Ok(Some(r))
        }
    }
}

/// The scalar options of a cross_entropy call (the weight is borrowed per dtype).
#[derive(Clone, Copy)]
struct XentArgs {
    ignore_index: i64,
    reduction: LossReduction,
    label_smoothing: f64,
    z_loss: f64,
    algorithm: Algorithm,
}

fn xent_typed<'py, T: Real + Element>(
    py: Python<'py>,
    logits: &Bound<'py, PyArray3<T>>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    args: XentArgs,
    return_grad: bool,
    grad_out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let batch = batch_of(logits, "logits")?;
    let shape = [batch.outer, batch.n, batch.inner];
    let grad_out = match grad_out {
        Some(g) => {
            let g = g
                .cast::<PyArray3<T>>()
                .map_err(|_| {
                    PyTypeError::new_err(format!("grad_out must be a 3-D {} array", T::NAME))
                })?
                .clone();
            check_out(&g, &shape)?;
            Some(g)
        }
        None => None,
    };
    let weight = weight_of::<T>(weight)?;
    let opts = XentOptions {
        weight: weight.as_ref().map(|w| w.as_slice()).transpose()?,
        ignore_index: args.ignore_index,
        reduction: args.reduction,
        label_smoothing: args.label_smoothing,
        z_loss: args.z_loss,
        algorithm: args.algorithm,
    };
    let xr = logits.readonly();
    // SAFETY: `xr` keeps the logits borrowed for the call.
    let xs = unsafe { slice_of(logits, &batch)? };
    let per_lane = (opts.reduction == LossReduction::None)
        // SAFETY: every element is written by the kernel before the array is returned.
        .then(|| unsafe { PyArray1::<T>::new(py, batch.count(), false) });
    let grad = match grad_out {
        Some(g) => Some(g),
        // SAFETY: as above.
        None => return_grad.then(|| unsafe { PyArray3::<T>::new(py, shape, false) }),
    };
    let mut pr = per_lane.as_ref().map(|p| p.readwrite());
    let mut gr = grad
        .as_ref()
        .map(|g| {
            g.try_readwrite()
                .map_err(|e| value_error(format!("grad_out cannot be written: {e}")))
        })
        .transpose()?;
    let ps = pr
        .as_mut()
        .map(|p| p.as_slice_mut().map_err(|e| value_error(e.to_string())))
        .transpose()?;
    let gs = gr
        .as_mut()
        .map(|g| g.as_slice_mut().map_err(|e| value_error(e.to_string())))
        .transpose()?;
    let total = if let Ok(t) = target.cast::<PyArrayDyn<i64>>() {
        let tr = t.try_readonly().map_err(|e| value_error(e.to_string()))?;
        let ts = tr
            .as_slice()
            .map_err(|_| value_error("target must be C-contiguous int64"))?;
        py.detach(|| xent::cross_entropy(xs, batch, Targets::Indices(ts), &opts, ps, gs))
            .map_err(|e| to_pyerr(py, e))?
    } else if let Ok(q) = target.cast::<PyArray3<T>>() {
        if batch_of(q, "target")? != batch {
            return Err(value_error(
                "probability targets must have the logits' shape and layout",
            ));
        }
        let qr = q.readonly();
        // SAFETY: `qr` keeps the target borrowed for the call.
        let qs = unsafe { slice_of(q, &batch)? };
        let total = py
            .detach(|| xent::cross_entropy(xs, batch, Targets::Probs(qs), &opts, ps, gs))
            .map_err(|e| to_pyerr(py, e))?;
        drop(qr);
        total
    } else {
        return Err(PyTypeError::new_err(format!(
            "target must be an int64 array of class indices or a 3-D {} array of probabilities",
            T::NAME
        )));
    };
    drop((xr, pr, gr));
    let loss: Bound<'py, PyAny> = match per_lane {
        Some(p) => p.into_any(),
        None => total.to_f64().into_pyobject(py)?.into_any(),
    };
    let grad: Bound<'py, PyAny> = match grad {
        Some(g) => g.into_any(),
        None => py.None().into_bound(py),
    };
    PyTuple::new(py, [loss, grad])
}

/// Cross-entropy over axis 1 of 3-D `logits`: returns `(loss, grad or None)`; `loss` is a float
/// (rounded to the logits' dtype) for "mean"/"sum" and a 1-D array of lane losses for "none".
/// `grad_out` (dense `(outer, n, inner)`, not overlapping the inputs) receives the gradient
/// instead of a new array; it implies `return_grad`.
#[pyfunction]
#[pyo3(signature = (logits, target, weight = None, ignore_index = -100, reduction = "mean",
    label_smoothing = 0.0, z_loss = 0.0, return_grad = false, algorithm = "auto", grad_out = None))]
#[allow(clippy::too_many_arguments)]
fn cross_entropy<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    return_grad: bool,
    algorithm: &str,
    grad_out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let args = XentArgs {
        ignore_index,
        reduction: parse_reduction(reduction)?,
        label_smoothing,
        z_loss,
        algorithm: parse_algorithm(algorithm)?,
    };
    if let Ok(x) = logits.cast::<PyArray3<f32>>() {
        xent_typed(py, x, target, weight, args, return_grad, grad_out)
    } else if let Ok(x) = logits.cast::<PyArray3<f64>>() {
        xent_typed(py, x, target, weight, args, return_grad, grad_out)
    } else {
        Err(PyTypeError::new_err(
            "logits must be a 3-D float32 or float64 array",
        ))
    }
}

fn nll_typed<'py, T: Real + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArray3<T>>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    ignore_index: i64,
    reduction: LossReduction,
) -> PyResult<Bound<'py, PyAny>> {
    let batch = batch_of(x, "log_probs")?;
    let weight = weight_of::<T>(weight)?;
    let ws = weight.as_ref().map(|w| w.as_slice()).transpose()?;
    let t = target
        .cast::<PyArrayDyn<i64>>()
        .map_err(|_| PyTypeError::new_err("target must be an int64 array of class indices"))?;
    let tr = t.try_readonly().map_err(|e| value_error(e.to_string()))?;
    let ts = tr
        .as_slice()
        .map_err(|_| value_error("target must be C-contiguous int64"))?;
    let xr = x.readonly();
    // SAFETY: `xr` keeps log_probs borrowed for the call.
    let xs = unsafe { slice_of(x, &batch)? };
    let per_lane = (reduction == LossReduction::None)
        // SAFETY: every element is written by the kernel before the array is returned.
        .then(|| unsafe { PyArray1::<T>::new(py, batch.count(), false) });
    let mut pr = per_lane.as_ref().map(|p| p.readwrite());
    let ps = pr
        .as_mut()
        .map(|p| p.as_slice_mut().map_err(|e| value_error(e.to_string())))
        .transpose()?;
    let total = py
        .detach(|| xent::nll_loss(xs, batch, ts, ws, ignore_index, reduction, ps))
        .map_err(|e| to_pyerr(py, e))?;
    drop((xr, pr));
    Ok(match per_lane {
        Some(p) => p.into_any(),
        None => total.to_f64().into_pyobject(py)?.into_any(),
    })
}

/// NLL loss over axis 1 of 3-D `log_probs` with int64 class targets: a float for
/// "mean"/"sum", a 1-D array of lane losses for "none".
#[pyfunction]
#[pyo3(signature = (log_probs, target, weight = None, ignore_index = -100, reduction = "mean"))]
fn nll_loss<'py>(
    py: Python<'py>,
    log_probs: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    ignore_index: i64,
    reduction: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let reduction = parse_reduction(reduction)?;
    if let Ok(x) = log_probs.cast::<PyArray3<f32>>() {
        nll_typed(py, x, target, weight, ignore_index, reduction)
    } else if let Ok(x) = log_probs.cast::<PyArray3<f64>>() {
        nll_typed(py, x, target, weight, ignore_index, reduction)
    } else {
        Err(PyTypeError::new_err(
            "log_probs must be a 3-D float32 or float64 array",
        ))
    }
}

fn backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    y: &Bound<'py, PyArray3<T>>,
    dy: &Bound<'py, PyAny>,
    what: Backward,
) -> PyResult<Bound<'py, PyAny>> {
    let dy = dy
        .cast::<PyArray3<T>>()
        .map_err(|_| PyTypeError::new_err(format!("dy must be a 3-D {} array like y", T::NAME)))?;
    let batch = batch_of(y, "y")?;
    if batch_of(dy, "dy")? != batch {
        return Err(value_error("dy must have y's shape and layout"));
    }
    // SAFETY: every element is written by the kernel before the array is returned.
    let out = unsafe { PyArray3::<T>::new(py, [batch.outer, batch.n, batch.inner], false) };
    let (yr, dr) = (y.readonly(), dy.readonly());
    let mut or = out.readwrite();
    // SAFETY: `yr` and `dr` keep the inputs borrowed for the call.
    let (ys, ds) = unsafe { (slice_of(y, &batch)?, slice_of(dy, &batch)?) };
    let os = or.as_slice_mut().map_err(|e| value_error(e.to_string()))?;
    py.detach(|| vjp::softmax_like_backward(ys, ds, batch, what, os))
        .map_err(|e| to_pyerr(py, e))?;
    drop((yr, dr, or));
    Ok(out.into_any())
}

/// The vector-Jacobian product of softmax (`log = False`) or log_softmax over axis 1 of 3-D `y`
/// (the forward output) and `dy`; returns a dense 3-D array.
#[pyfunction]
#[pyo3(signature = (y, dy, log = false))]
fn softmax_backward<'py>(
    py: Python<'py>,
    y: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    log: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let what = if log {
        Backward::LogSoftmax
    } else {
        Backward::Softmax
    };
    if let Ok(y) = y.cast::<PyArray3<f32>>() {
        backward_typed(py, y, dy, what)
    } else if let Ok(y) = y.cast::<PyArray3<f64>>() {
        backward_typed(py, y, dy, what)
    } else {
        Err(PyTypeError::new_err(
            "y must be a 3-D float32 or float64 array",
        ))
    }
}
