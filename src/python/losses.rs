//! Bindings for cross_entropy, nll_loss and the softmax / log_softmax backward products.
//!
//! The Python layer (`python/stablelse/_losses.py`) normalises the arguments: logits as a 3-D
//! `(outer, classes, inner)` float32/float64 view (class axis in the middle, `inner == 1` for
//! the last axis), index targets as C-contiguous int64 in the shape of the logits without the
//! class axis, probability targets and weights in the logits' compute dtype. float16 /
//! bfloat16 logits (with float32 weights and probabilities) come as they are: the kernels widen
//! them per block. This module checks the layouts, releases the GIL and calls
//! [`crate::kernels::cross_entropy`]; kernel errors become
//! Python exceptions through `super::errors`. Buffers are read through their raw fields
//! (`super::array`); weights are copied once, and index targets are read in place when dense
//! (else copied): the kernels bound every target they read, so another thread changing them
//! between validation and use changes results but never reads out of bounds.

use std::borrow::Cow;

use numpy::{Element, PyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::array::{check_out, copy_values, dense, shares_memory, try_empty, Raw, MAX_DIMS};
use super::errors::to_pyerr;
use super::exec::{self, WorkView};
use super::half::as_bf16;
use super::reductions::{batch3, parse_algorithm, slice3, value_error};
use crate::error::Error;
use crate::half::{Stored, F16};
use crate::kernels::cross_entropy::{self as xent, ClassMask, LossReduction, Targets, XentOptions};
use crate::kernels::vjp::{self, Backward};
use crate::kernels::Algorithm;
use crate::layout::Batch;
use crate::real::Real;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_common, m)?)?;
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

/// The class weights (1-D, the logits' dtype, any layout), copied: a private, contiguous
/// vector that no other thread can change during the call.
fn weight_of<T: Real + Element>(weight: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<T>>> {
    let Some(w) = weight else {
        return Ok(None);
    };
    let w = w
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| PyTypeError::new_err(format!("weight must be a 1-D {} array", T::NAME)))?;
    if w.ndim() != 1 {
        return Err(PyTypeError::new_err(format!(
            "weight must be a 1-D {} array",
            T::NAME
        )));
    }
    copy_values(&Raw::of(w)?, T::from_f64(0.0)).map(Some)
}

/// The index targets (int64): read where they lie when dense and aligned (the common call:
/// no pass and no allocation of the targets' size), else copied once into a dense vector.
/// Read in place, another thread may change a target between the validation and the
/// kernels: every read in the kernels is bounded (a value outside the classes takes the
/// ignored lane's path), so such a race changes results, as it would in NumPy, but never
/// reads outside the logits.
fn targets_of<'a>(t: &'a Bound<'_, PyArrayDyn<i64>>) -> PyResult<Cow<'a, [i64]>> {
    let raw = Raw::of(t)?;
    // SAFETY: `t` holds the array alive for 'a.
    match unsafe { dense::<i64>(&raw) } {
        Some(ts) => Ok(Cow::Borrowed(ts)),
        None => copy_values(&raw, 0i64).map(Cow::Owned),
    }
}

/// The raw fields of `where=`: a 3-D bool array of the logits' `(outer, classes, inner)` shape,
/// any non-negative strides (0 for a broadcast axis), read in place.
fn mask_of(mask: Option<&Bound<'_, PyAny>>, shape: &[usize]) -> PyResult<Option<Raw>> {
    let Some(m) = mask else {
        return Ok(None);
    };
    let m = m
        .cast::<PyArrayDyn<bool>>()
        .map_err(|_| PyTypeError::new_err("where must be a 3-D bool array"))?;
    let raw = Raw::of(m)?;
    if raw.shape() != shape {
        return Err(value_error(format!(
            "where has shape {:?}, expected the logits' {:?}",
            raw.shape(),
            shape
        )));
    }
    if raw.strides().iter().any(|&s| s < 0) {
        return Err(value_error("where must have non-negative strides"));
    }
    Ok(Some(raw))
}

/// The kernels' view of a mask read by [`mask_of`].
///
/// # Safety
/// The mask's array outlives the view.
unsafe fn class_mask<'a>(raw: &Raw) -> ClassMask<'a> {
    let st = raw.strides();
    let strides = [st[0] as usize, st[1] as usize, st[2] as usize];
    let len = if raw.size() == 0 {
        0
    } else {
        1 + raw
            .shape()
            .iter()
            .zip(strides)
            .map(|(&n, s)| (n - 1) * s)
            .sum::<usize>()
    };
    // SAFETY: the strides are non-negative, so the elements lie in [data, data + len).
    let keep = unsafe { std::slice::from_raw_parts(raw.data::<u8>() as *const u8, len) };
    ClassMask { keep, strides }
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

/// How a cross_entropy call reads its logits and shapes its results: the kernel batch of the
/// logits, the shape of the per-lane losses (`"none"`) and of the gradient.
struct XentView<'a> {
    raw: &'a Raw,
    batch: Batch,
    lanes: &'a [usize],
    grad: &'a [usize],
    mask: Option<Raw>,
}

#[allow(clippy::too_many_arguments)]
fn xent_typed<'py, S: Stored + Element>(
    py: Python<'py>,
    logits: &Bound<'py, PyArrayDyn<S>>,
    view: XentView<'_>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    args: XentArgs,
    return_grad: bool,
    grad_out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>>
where
    S::Compute: Element,
{
    let (rx, batch) = (view.raw, view.batch);
    let shape = [batch.outer, batch.n, batch.inner];
    let weight = weight_of::<S::Compute>(weight)?;
    let opts = XentOptions {
        weight: weight.as_deref(),
        ignore_index: args.ignore_index,
        reduction: args.reduction,
        label_smoothing: args.label_smoothing,
        z_loss: args.z_loss,
        algorithm: args.algorithm,
        // SAFETY: the caller holds the mask's array for the call.
        mask: view.mask.as_ref().map(|m| unsafe { class_mask(m) }),
    };
    // The gradient goes straight into a dense grad_out; any other layout gets the kernel's
    // dense result copied into it.
    let mut direct_grad = None;
    let mut bounce_to = None;
    if let Some(g) = grad_out {
        let (garr, graw) = check_out::<S>(g, &shape, "grad_out")?;
        if shares_memory(py, logits.as_any(), rx, g, &graw)?
            || shares_memory(py, target, &raw_any(target)?, g, &graw)?
        {
            return Err(value_error("grad_out overlaps the logits or the target"));
        }
        match batch3(&graw, "grad_out") {
            Ok(b) if b.is_contiguous() => direct_grad = Some((garr, graw)),
            _ => bounce_to = Some((garr, graw)),
        }
    }
    let per_lane = match opts.reduction {
        // SAFETY: every element is written by the kernel before the array is returned.
        LossReduction::None => Some(unsafe { try_empty::<S>(py, view.lanes)? }),
        _ => None,
    };
    let fresh_grad = if direct_grad.is_none() && (return_grad || bounce_to.is_some()) {
        // SAFETY: as above.
        Some(unsafe { try_empty::<S>(py, view.grad)? })
    } else {
        None
    };
    let rp = per_lane.as_ref().map(Raw::of).transpose()?;
    let rg = match (&direct_grad, &fresh_grad) {
        (Some((_, r)), _) => Some(*r),
        (None, Some(g)) => Some(Raw::of(g)?),
        _ => None,
    };
    let (count, elements) = (batch.count(), batch.elements());
    let total = if let Ok(t) = target.cast::<PyArrayDyn<i64>>() {
        let ts = targets_of(t)?;
        exec::detach_unless_small(py, elements, || {
            // SAFETY: logits hold the batch for the call; the outputs are dense, writeable
            // and disjoint from the inputs (checked above or new).
            unsafe {
                if S::NATIVE {
                    // S is its compute type: the kernel reads the arrays where they are.
                    let xs = slice3::<S::Compute>(rx, &batch)
                        .map_err(|_| Error::Layout("logits".into()))?;
                    let (ps, gs) = outputs::<S::Compute>(rp, rg, count, elements);
                    xent::cross_entropy(xs, batch, Targets::Indices(&ts), &opts, ps, gs)
                } else {
                    let xs = slice3::<S>(rx, &batch).map_err(|_| Error::Layout("logits".into()))?;
                    let (ps, gs) = outputs::<S>(rp, rg, count, elements);
                    xent::cross_entropy_stored(xs, batch, Targets::Indices(&ts), &opts, ps, gs)
                }
            }
        })
        .map_err(|e| to_pyerr(py, e))?
    } else if let Ok(q) = target.cast::<PyArrayDyn<S::Compute>>() {
        let rq = Raw::of(q)?;
        if classless_as_rows(batch3(&rq, "target")?) != batch {
            return Err(value_error(
                "probability targets must have the logits' shape and layout",
            ));
        }
        exec::detach_unless_small(py, elements, || {
            // SAFETY: the target holds the batch for the call.
            let qs = unsafe { slice3::<S::Compute>(&rq, &batch) }
                .map_err(|_| Error::Layout("target".into()))?;
            let targets = Targets::Probs(qs);
            // SAFETY: logits hold the batch for the call; outputs as above.
            unsafe {
                if S::NATIVE {
                    let xs = slice3::<S::Compute>(rx, &batch)
                        .map_err(|_| Error::Layout("logits".into()))?;
                    let (ps, gs) = outputs::<S::Compute>(rp, rg, count, elements);
                    xent::cross_entropy(xs, batch, targets, &opts, ps, gs)
                } else {
                    // 16-bit logits against probabilities in their compute type.
                    let xs = slice3::<S>(rx, &batch).map_err(|_| Error::Layout("logits".into()))?;
                    let (ps, gs) = outputs::<S>(rp, rg, count, elements);
                    xent::cross_entropy_stored(xs, batch, targets, &opts, ps, gs)
                }
            }
        })
        .map_err(|e| to_pyerr(py, e))?
    } else {
        return Err(PyTypeError::new_err(format!(
            "target must be an int64 array of class indices or a 3-D {} array of probabilities",
            <S::Compute as Real>::NAME
        )));
    };
    let loss: Bound<'py, PyAny> = match per_lane {
        Some(p) => p.into_any(),
        None => numpy_scalar(py, total)?,
    };
    let grad: Bound<'py, PyAny> = match (direct_grad, bounce_to, fresh_grad) {
        (Some((g, _)), _, _) => g.into_any(),
        (None, Some((g, graw)), Some(fresh)) => {
            let fr = Raw::of(&fresh)?;
            // SAFETY: both arrays are live, of the same (outer, n, inner) shape; grad_out is
            // writeable and shares nothing with the fresh result.
            unsafe {
                let src = std::slice::from_raw_parts(fr.data::<S>() as *const S, elements);
                WorkView::new(&graw, 0..graw.ndim).scatter(0, src);
            }
            g.into_any()
        }
        (None, None, Some(fresh)) => fresh.into_any(),
        _ => py.None().into_bound(py),
    };
    PyTuple::new(py, [loss, grad])
}

/// The kernel's views of the per-lane losses (`count`) and the gradient (`elements`), typed
/// as `T`.
///
/// # Safety
/// The arrays of `rp` and `rg` are live, dense, writeable arrays of `T` of those lengths,
/// disjoint from every input, and nothing else uses them during the call.
unsafe fn outputs<'a, T>(
    rp: Option<Raw>,
    rg: Option<Raw>,
    count: usize,
    elements: usize,
) -> (Option<&'a mut [T]>, Option<&'a mut [T]>) {
    // SAFETY: the caller's contract.
    unsafe {
        (
            rp.map(|r| std::slice::from_raw_parts_mut(r.data::<T>(), count)),
            rg.map(|r| std::slice::from_raw_parts_mut(r.data::<T>(), elements)),
        )
    }
}

/// `value` as a NumPy scalar of its dtype (what the Python functions return).
fn numpy_scalar<'py, T: Element + Copy>(py: Python<'py>, value: T) -> PyResult<Bound<'py, PyAny>> {
    let mut v = value;
    let descr = T::get_dtype(py);
    // SAFETY: `v` is a live `T` and `descr` its dtype; PyArray_Scalar copies the value and
    // does not steal the descriptor; a null result has set a Python error.
    unsafe {
        let obj = numpy::npyffi::PY_ARRAY_API.PyArray_Scalar(
            py,
            (&mut v as *mut T).cast(),
            descr.as_ptr().cast(),
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(py, obj)
    }
}

/// The common call in one step: `x` of any rank with the class axis `axis` (normalised), C
/// contiguous and aligned, and an aligned int64 `t` of `x`'s shape without `axis`. `None`
/// for anything else: the general path then converts and validates.
fn common_view<T: Element>(
    x: &Bound<'_, PyArrayDyn<T>>,
    t: &Bound<'_, PyArrayDyn<i64>>,
    axis: usize,
) -> PyResult<Option<(Raw, Batch)>> {
    let (rx, rt) = (Raw::of(x)?, Raw::of(t)?);
    let (xs, ts) = (rx.shape(), rt.shape());
    if axis >= xs.len()
        || ts.len() + 1 != xs.len()
        || ts[..axis] != xs[..axis]
        || ts[axis..] != xs[axis + 1..]
        || rx.data::<T>().align_offset(std::mem::align_of::<T>()) != 0
        || rt.data::<i64>().align_offset(std::mem::align_of::<i64>()) != 0
    {
        return Ok(None);
    }
    let mut expected = std::mem::size_of::<T>();
    for (&n, &st) in xs.iter().zip(rx.strides()).rev() {
        if n > 1 && usize::try_from(st).ok() != Some(expected) {
            return Ok(None);
        }
        expected = expected.saturating_mul(n);
    }
    let inner: usize = xs[axis + 1..].iter().product();
    let outer: usize = xs[..axis].iter().product();
    let batch = classless_as_rows(Batch::contiguous(outer, xs[axis], inner));
    Ok(Some((rx, batch)))
}

/// A C-ordered bool `mask` of the logits' shape as the 3-D `(outer, classes, inner)` mask of
/// `batch` (the same bytes), or `None` for any other mask.
fn common_mask(mask: &Bound<'_, PyAny>, shape: &[usize], batch: Batch) -> PyResult<Option<Raw>> {
    let Ok(m) = mask.cast::<PyArrayDyn<bool>>() else {
        return Ok(None);
    };
    let raw = Raw::of(m)?;
    if raw.shape() != shape || !raw.is_dense::<u8>() {
        return Ok(None);
    }
    let (mut dims, mut steps) = ([0usize; MAX_DIMS], [0isize; MAX_DIMS]);
    dims[..3].copy_from_slice(&[batch.outer, batch.n, batch.inner]);
    steps[..3].copy_from_slice(&[(batch.n * batch.inner) as isize, batch.inner as isize, 1]);
    Ok(Some(Raw {
        ndim: 3,
        shape: dims,
        strides: steps,
        ..raw
    }))
}

#[allow(clippy::too_many_arguments)]
fn common_typed<'py, T: Real + Element + Stored<Compute = T>>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    t: &Bound<'py, PyAny>,
    axis: usize,
    args: XentArgs,
    return_grad: bool,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let Ok(ti) = t.cast::<PyArrayDyn<i64>>() else {
        return Ok(py.NotImplemented().into_bound(py));
    };
    let Some((raw, batch)) = common_view(x, ti, axis)? else {
        return Ok(py.NotImplemented().into_bound(py));
    };
    let mask = match mask {
        None => None,
        Some(m) => match common_mask(m, x.shape(), batch)? {
            Some(raw) => Some(raw),
            None => return Ok(py.NotImplemented().into_bound(py)),
        },
    };
    let view = XentView {
        raw: &raw,
        batch,
        lanes: ti.shape(),
        grad: x.shape(),
        mask,
    };
    let res = xent_typed(py, x, view, t, None, args, return_grad, None)?;
    if return_grad {
        Ok(res.into_any())
    } else {
        res.get_item(0)
    }
}

/// Cross-entropy of `logits` of any rank with class indices along `axis` (normalised by the
/// Python layer), without weights or `grad_out`: the loss (a NumPy scalar of the logits'
/// dtype, or an array of the target's shape for "none"), or `(loss, grad)` with the grad of
/// the logits' shape. Returns `NotImplemented` unless the logits are C-contiguous aligned
/// float32/float64 and the target an aligned int64 array of the logits' shape without
/// `axis`, and `where` (when given) a C-contiguous bool array of the logits' shape: the Python
/// layer's general path converts and validates everything else.
#[pyfunction]
#[pyo3(signature = (logits, target, axis, ignore_index, reduction, label_smoothing, z_loss,
    return_grad, r#where = None))]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_common<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    axis: usize,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    return_grad: bool,
    r#where: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = XentArgs {
        ignore_index,
        reduction: parse_reduction(reduction)?,
        label_smoothing,
        z_loss,
        algorithm: Algorithm::Auto,
    };
    if let Ok(x) = logits.cast::<PyArrayDyn<f32>>() {
        common_typed(py, x, target, axis, args, return_grad, r#where)
    } else if let Ok(x) = logits.cast::<PyArrayDyn<f64>>() {
        common_typed(py, x, target, axis, args, return_grad, r#where)
    } else {
        Ok(py.NotImplemented().into_bound(py))
    }
}

/// Lanes of zero classes hold no element, so they have no layout: read them as rows (in the
/// same lane order), which no kernel path steps through.
fn classless_as_rows(batch: Batch) -> Batch {
    if batch.n == 0 {
        Batch::rows(batch.count(), 0)
    } else {
        batch
    }
}

/// The raw fields of `obj` if it is an ndarray of a dtype the losses take (for overlap
/// checks), else an empty placeholder that overlaps nothing.
fn raw_any(obj: &Bound<'_, PyAny>) -> PyResult<Raw> {
    if let Ok(a) = obj.cast::<PyArrayDyn<i64>>() {
        return Raw::of(a);
    }
    if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        return Raw::of(a);
    }
    if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
        return Raw::of(a);
    }
    Ok(Raw::empty())
}

/// [`xent_typed`] of 3-D `(outer, classes, inner)` logits: 1-D lane losses, a 3-D gradient.
#[allow(clippy::too_many_arguments)]
fn xent_3d<'py, S: Stored + Element>(
    py: Python<'py>,
    logits: &Bound<'py, PyArrayDyn<S>>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    args: XentArgs,
    return_grad: bool,
    grad_out: Option<&Bound<'py, PyAny>>,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>>
where
    S::Compute: Element,
{
    let raw = Raw::of(logits)?;
    let batch = classless_as_rows(batch3(&raw, "logits")?);
    let view = XentView {
        raw: &raw,
        batch,
        lanes: &[batch.count()],
        grad: &[batch.outer, batch.n, batch.inner],
        mask: mask_of(mask, raw.shape())?,
    };
    xent_typed(
        py,
        logits,
        view,
        target,
        weight,
        args,
        return_grad,
        grad_out,
    )
}

/// Cross-entropy over axis 1 of 3-D `logits`: returns `(loss, grad or None)`; `loss` is a float
/// (rounded to the logits' dtype) for "mean"/"sum" and a 1-D array of lane losses for "none".
/// `grad_out` (dense `(outer, n, inner)`, not overlapping the inputs) receives the gradient
/// instead of a new array; it implies `return_grad`. `mask` (`where=`) is a bool array of the
/// logits' shape, any non-negative strides (see [`ClassMask`]).
#[pyfunction]
#[pyo3(signature = (logits, target, weight = None, ignore_index = -100, reduction = "mean",
    label_smoothing = 0.0, z_loss = 0.0, return_grad = false, algorithm = "auto", grad_out = None,
    mask = None))]
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
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let args = XentArgs {
        ignore_index,
        reduction: parse_reduction(reduction)?,
        label_smoothing,
        z_loss,
        algorithm: parse_algorithm(algorithm)?,
    };
    if let Ok(x) = logits.cast::<PyArrayDyn<f32>>() {
        xent_3d(py, x, target, weight, args, return_grad, grad_out, mask)
    } else if let Ok(x) = logits.cast::<PyArrayDyn<f64>>() {
        xent_3d(py, x, target, weight, args, return_grad, grad_out, mask)
    } else if let Ok(x) = logits.cast::<PyArrayDyn<F16>>() {
        xent_3d(py, x, target, weight, args, return_grad, grad_out, mask)
    } else if let Some(x) = as_bf16(logits) {
        xent_3d(py, &x, target, weight, args, return_grad, grad_out, mask)
    } else {
        Err(PyTypeError::new_err(
            "logits must be a 3-D float32, float64, float16 or bfloat16 array",
        ))
    }
}

fn nll_typed<'py, T: Stored + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    ignore_index: i64,
    reduction: LossReduction,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>>
where
    T::Compute: Element,
{
    let rx = Raw::of(x)?;
    let batch = classless_as_rows(batch3(&rx, "log_probs")?);
    let rm = mask_of(mask, rx.shape())?;
    let weight = weight_of::<T::Compute>(weight)?;
    let t = target
        .cast::<PyArrayDyn<i64>>()
        .map_err(|_| PyTypeError::new_err("target must be an int64 array of class indices"))?;
    let ts = targets_of(t)?;
    let per_lane = match reduction {
        // SAFETY: every element is written by the kernel before the array is returned.
        LossReduction::None => Some(unsafe { try_empty::<T>(py, &[batch.count()])? }),
        _ => None,
    };
    let rp = per_lane.as_ref().map(Raw::of).transpose()?;
    let count = batch.count();
    let total = py
        .detach(|| {
            // SAFETY: log_probs hold the batch; the per-lane output is new, of `count`.
            let xs = unsafe { slice3::<T>(&rx, &batch) }
                .map_err(|_| Error::Layout("log_probs".into()))?;
            let ps = rp.map(|r| unsafe { std::slice::from_raw_parts_mut(r.data::<T>(), count) });
            xent::nll_loss(
                xs,
                batch,
                &ts,
                weight.as_deref(),
                ignore_index,
                reduction,
                ps,
                // SAFETY: the caller holds the mask's array for the call.
                rm.as_ref().map(|m| unsafe { class_mask(m) }),
            )
        })
        .map_err(|e| to_pyerr(py, e))?;
    Ok(match per_lane {
        Some(p) => p.into_any(),
        None => total.to_f64().into_pyobject(py)?.into_any(),
    })
}

/// NLL loss over axis 1 of 3-D `log_probs` with int64 class targets: a float for
/// "mean"/"sum", a 1-D array of lane losses for "none". `mask` as in [`cross_entropy`].
#[pyfunction]
#[pyo3(signature = (log_probs, target, weight = None, ignore_index = -100, reduction = "mean",
    mask = None))]
fn nll_loss<'py>(
    py: Python<'py>,
    log_probs: &Bound<'py, PyAny>,
    target: &Bound<'py, PyAny>,
    weight: Option<&Bound<'py, PyAny>>,
    ignore_index: i64,
    reduction: &str,
    mask: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let reduction = parse_reduction(reduction)?;
    if let Ok(x) = log_probs.cast::<PyArrayDyn<f32>>() {
        nll_typed(py, x, target, weight, ignore_index, reduction, mask)
    } else if let Ok(x) = log_probs.cast::<PyArrayDyn<f64>>() {
        nll_typed(py, x, target, weight, ignore_index, reduction, mask)
    } else if let Ok(x) = log_probs.cast::<PyArrayDyn<F16>>() {
        nll_typed(py, x, target, weight, ignore_index, reduction, mask)
    } else if let Some(x) = as_bf16(log_probs) {
        nll_typed(py, &x, target, weight, ignore_index, reduction, mask)
    } else {
        Err(PyTypeError::new_err(
            "log_probs must be a 3-D float32, float64, float16 or bfloat16 array",
        ))
    }
}

fn backward_typed<'py, T: Real + Element>(
    py: Python<'py>,
    y: &Bound<'py, PyArrayDyn<T>>,
    dy: &Bound<'py, PyAny>,
    what: Backward,
) -> PyResult<Bound<'py, PyAny>> {
    let dy = dy
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| PyTypeError::new_err(format!("dy must be a 3-D {} array like y", T::NAME)))?;
    let (ry, rd) = (Raw::of(y)?, Raw::of(dy)?);
    let batch = classless_as_rows(batch3(&ry, "y")?);
    if classless_as_rows(batch3(&rd, "dy")?) != batch {
        return Err(value_error("dy must have y's shape and layout"));
    }
    // SAFETY: every element is written by the kernel before the array is returned.
    let out = unsafe { try_empty::<T>(py, &[batch.outer, batch.n, batch.inner])? };
    let ro = Raw::of(&out)?;
    let elements = batch.elements();
    py.detach(|| {
        // SAFETY: y and dy hold the batch; out is new and dense.
        unsafe {
            let (ys, ds) = (slice3::<T>(&ry, &batch), slice3::<T>(&rd, &batch));
            let (ys, ds) = (
                ys.map_err(|_| Error::Layout("y".into()))?,
                ds.map_err(|_| Error::Layout("dy".into()))?,
            );
            let os = std::slice::from_raw_parts_mut(ro.data::<T>(), elements);
            vjp::softmax_like_backward(ys, ds, batch, what, os)
        }
    })
    .map_err(|e| to_pyerr(py, e))?;
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
    if let Ok(y) = y.cast::<PyArrayDyn<f32>>() {
        backward_typed(py, y, dy, what)
    } else if let Ok(y) = y.cast::<PyArrayDyn<f64>>() {
        backward_typed(py, y, dy, what)
    } else {
        Err(PyTypeError::new_err(
            "y must be a 3-D float32 or float64 array",
        ))
    }
}
