//! PyO3 shims for the CUDA path (cargo features `python` + `cuda`): availability and device
//! facts, the `__cuda_array_interface__` / DLPack parser, and launchers that take raw device
//! pointers. The public surface is `python/stablelse/cuda.py`; everything here is private
//! (`_core._cuda_*`). Nothing here owns or frees device memory, and no panic crosses into
//! Python: the kernels' host code returns `Result<_, String>`, turned into `RuntimeError`.

use std::ffi::{c_void, CStr};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyTuple};

use crate::cuda::{
    self, DType, LossReduction, Place, RowOp, Rows, TargetType, Targets, XentOptions,
};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_cuda_is_available, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_add_nvrtc_dir, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_parse, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_rows, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_cross_entropy, m)?)?;
    Ok(())
}

fn rt(e: String) -> PyErr {
    PyRuntimeError::new_err(e)
}

/// True when libcuda loads and reports a device; never raises or panics.
#[pyfunction]
fn _cuda_is_available(py: Python<'_>) -> bool {
    py.detach(cuda::is_available)
}

/// Adds a directory searched for `libnvrtc.so*` when the loader cannot find it.
#[pyfunction]
fn _cuda_add_nvrtc_dir(path: &str) {
    cuda::nvrtc::add_search_dir(path);
}

/// A dict of facts: available, driver / NVRTC versions, devices, and why not when not.
#[pyfunction]
fn _cuda_info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let count = py.detach(cuda::device_count);
    d.set_item("available", matches!(count, Ok(n) if n > 0))?;
    match &count {
        Ok(_) => d.set_item("error", py.None())?,
        Err(e) => d.set_item("error", e)?,
    }
    d.set_item("driver_version", py.detach(cuda::driver_version).ok())?;
    match py.detach(cuda::nvrtc::version) {
        Ok(v) => {
            d.set_item("nvrtc_version", v)?;
            d.set_item("nvrtc_error", py.None())?;
        }
        Err(e) => {
            d.set_item("nvrtc_version", py.None())?;
            d.set_item("nvrtc_error", e)?;
        }
    }
    let devices = pyo3::types::PyList::empty(py);
    for i in 0..count.unwrap_or(0) {
        if let Ok(info) = py.detach(|| cuda::device_info(i)) {
            let dd = PyDict::new(py);
            dd.set_item("ordinal", info.ordinal)?;
            dd.set_item("name", info.name)?;
            dd.set_item("compute_capability", info.compute_capability)?;
            dd.set_item("multiprocessors", info.multiprocessors)?;
            dd.set_item("total_memory", info.total_memory)?;
            devices.append(dd)?;
        }
    }
    d.set_item("devices", devices)?;
    Ok(d)
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    Ok(match name {
        "float32" => DType::F32,
        "float64" => DType::F64,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        _ => {
            return Err(PyTypeError::new_err(format!(
            "dtype {name} is not supported on the CUDA path (float32, float64, bfloat16, float16)"
        )))
        }
    })
}

/// Compiles the kernels for `dtype` and `arch` (`"sm_90"`) with NVRTC; returns the CUBIN size.
/// Needs NVRTC only (no driver, no GPU).
#[pyfunction]
fn _cuda_compile(py: Python<'_>, dtype: &str, arch: &str) -> PyResult<usize> {
    let dt = parse_dtype(dtype)?;
    let arch = arch.to_string();
    py.detach(move || cuda::compile_for_arch(dt, &arch))
        .map(|c| c.len())
        .map_err(rt)
}

// ---- __cuda_array_interface__ and DLPack -----------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: [u32; 2],
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const KDL_CUDA: i32 = 2;
const KDL_CUDA_MANAGED: i32 = 13;
const DLPACK_FLAG_READ_ONLY: u64 = 1;

fn dl_dtype(t: DLDataType) -> PyResult<(&'static str, usize)> {
    if t.lanes != 1 {
        return Err(PyTypeError::new_err(format!(
            "DLPack dtype with {} lanes is not supported",
            t.lanes
        )));
    }
    Ok(match (t.code, t.bits) {
        (2, 32) => ("float32", 4),
        (2, 64) => ("float64", 8),
        (2, 16) => ("float16", 2),
        (4, 16) => ("bfloat16", 2),
        (0, 32) => ("int32", 4),
        (0, 64) => ("int64", 8),
        (0, 16) => ("int16", 2),
        (0, 8) => ("int8", 1),
        (1, 8) => ("uint8", 1),
        (6, 8) => ("bool", 1),
        (c, b) => {
            return Err(PyTypeError::new_err(format!(
                "DLPack dtype (code {c}, {b} bits) is not supported"
            )))
        }
    })
}

fn cai_dtype(typestr: &str) -> PyResult<(&'static str, usize)> {
    Ok(match typestr {
        "<f4" => ("float32", 4),
        "<f8" => ("float64", 8),
        "<f2" => ("float16", 2),
        "<i4" => ("int32", 4),
        "<i8" => ("int64", 8),
        "<i2" => ("int16", 2),
        "|i1" => ("int8", 1),
        "|u1" => ("uint8", 1),
        "|b1" => ("bool", 1),
        _ => {
            return Err(PyTypeError::new_err(format!(
                "__cuda_array_interface__ typestr {typestr:?} is not supported"
            )))
        }
    })
}

fn c_strides(shape: &[i64]) -> Vec<i64> {
    let mut s = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc = acc.saturating_mul(shape[i].max(1));
    }
    s
}

struct Parsed {
    ptr: u64,
    shape: Vec<i64>,
    strides: Vec<i64>,
    dtype: &'static str,
    device: Option<i32>,
    readonly: bool,
    stream: Option<i64>,
    protocol: &'static str,
}

fn parse_cai(d: &Bound<'_, PyAny>) -> PyResult<Parsed> {
    let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        d.get_item(k).map_err(|_| {
            PyValueError::new_err(format!("__cuda_array_interface__ has no {k:?} entry"))
        })
    };
    let shape: Vec<i64> = get("shape")?.extract().map_err(|_| {
        PyValueError::new_err("__cuda_array_interface__ shape must be a tuple of ints")
    })?;
    if shape.iter().any(|&n| n < 0) {
        return Err(PyValueError::new_err(format!(
            "__cuda_array_interface__ shape {shape:?} has a negative extent"
        )));
    }
    let typestr: String = get("typestr")?.extract()?;
    let (dtype, size) = cai_dtype(&typestr)?;
    let (ptr, readonly): (u64, bool) = get("data")?
        .extract()
        .map_err(|_| PyValueError::new_err("__cuda_array_interface__ data must be (int, bool)"))?;
    if let Ok(mask) = d.get_item("mask") {
        if !mask.is_none() {
            return Err(PyValueError::new_err(
                "__cuda_array_interface__ with a mask is not supported",
            ));
        }
    }
    let strides = match d.get_item("strides") {
        Ok(s) if !s.is_none() => {
            let bytes: Vec<i64> = s.extract().map_err(|_| {
                PyValueError::new_err("__cuda_array_interface__ strides must be a tuple of ints")
            })?;
            if bytes.len() != shape.len() {
                return Err(PyValueError::new_err(format!(
                    "__cuda_array_interface__ strides {bytes:?} do not match shape {shape:?}"
                )));
            }
            let mut el = Vec::with_capacity(bytes.len());
            for b in bytes {
                if b % size as i64 != 0 {
                    return Err(PyValueError::new_err(format!(
                        "__cuda_array_interface__ stride of {b} bytes is not a multiple of the \
                         {size}-byte element"
                    )));
                }
                el.push(b / size as i64);
            }
            el
        }
        _ => c_strides(&shape),
    };
    let stream = match d.get_item("stream") {
        Ok(s) if !s.is_none() => {
            let v: i64 = s.extract()?;
            if v == 0 {
                return Err(PyValueError::new_err(
                    "__cuda_array_interface__ stream 0 is disallowed (ambiguous); use 1 or 2",
                ));
            }
            Some(v)
        }
        _ => None,
    };
    let n: i64 = shape.iter().product();
    if ptr == 0 && n > 0 {
        return Err(PyValueError::new_err(
            "__cuda_array_interface__ data pointer is null",
        ));
    }
    Ok(Parsed {
        ptr,
        shape,
        strides,
        dtype,
        device: None,
        readonly,
        stream,
        protocol: "cai",
    })
}

/// Reads a DLPack capsule without consuming it: the capsule keeps its name, so its own
/// destructor calls the producer's deleter once the caller drops it.
fn parse_capsule(cap: &Bound<'_, PyCapsule>) -> PyResult<Parsed> {
    let name = cap
        .name()?
        .map(|n| {
            // SAFETY: the capsule is alive for this call, so its name is valid.
            unsafe { n.as_cstr() }.to_owned()
        })
        .unwrap_or_default();
    let (t, readonly): (&DLTensor, bool) = if name.as_c_str() == c"dltensor_versioned" {
        let p = cap.pointer_checked(Some(c"dltensor_versioned"))?;
        // SAFETY: a capsule so named holds a DLManagedTensorVersioned (DLPack >= 1.0), alive
        // as long as the capsule.
        let m = unsafe { &*(p.as_ptr() as *const DLManagedTensorVersioned) };
        if m.version[0] != 1 {
            return Err(PyValueError::new_err(format!(
                "DLPack major version {} is not supported",
                m.version[0]
            )));
        }
        (&m.dl_tensor, m.flags & DLPACK_FLAG_READ_ONLY != 0)
    } else if name.as_c_str() == c"dltensor" {
        let p = cap.pointer_checked(Some(c"dltensor"))?;
        // SAFETY: a capsule named "dltensor" holds a DLManagedTensor.
        let m = unsafe { &*(p.as_ptr() as *const DLManagedTensor) };
        (&m.dl_tensor, false)
    } else {
        let n: &CStr = name.as_c_str();
        return Err(PyValueError::new_err(format!(
            "expected a DLPack capsule named 'dltensor' or 'dltensor_versioned', got {n:?} \
             (a capsule can be consumed once)"
        )));
    };
    if t.device.device_type != KDL_CUDA && t.device.device_type != KDL_CUDA_MANAGED {
        return Err(PyValueError::new_err(format!(
            "DLPack tensor is on device type {} (1 = CPU), not CUDA (2)",
            t.device.device_type
        )));
    }
    let (dtype, _) = dl_dtype(t.dtype)?;
    if t.ndim < 0 || (t.ndim > 0 && t.shape.is_null()) {
        return Err(PyValueError::new_err("DLPack tensor has a bad shape"));
    }
    let nd = t.ndim as usize;
    // SAFETY: DLPack guarantees `shape` (and `strides` when non-null) hold ndim entries.
    let shape: Vec<i64> = if nd == 0 {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, nd) }.to_vec()
    };
    let strides = if t.strides.is_null() || nd == 0 {
        c_strides(&shape)
    } else {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(t.strides, nd) }.to_vec()
    };
    Ok(Parsed {
        ptr: (t.data as u64).wrapping_add(t.byte_offset),
        shape,
        strides,
        dtype,
        device: Some(t.device.device_id),
        readonly,
        stream: None,
        protocol: "dlpack",
    })
}

/// Calls `obj.__dlpack__(stream=...)` (versioned first) after checking it is on a CUDA device.
/// Stream 0 (the legacy default stream as a raw handle) is passed as DLPack's 1.
fn parse_dlpack_object<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    stream: Option<i64>,
) -> PyResult<(Parsed, Bound<'py, PyAny>)> {
    let dev = obj.call_method0("__dlpack_device__")?;
    let (dt, _id): (i32, i32) = dev.extract()?;
    if dt != KDL_CUDA && dt != KDL_CUDA_MANAGED {
        return Err(PyValueError::new_err(format!(
            "array is on DLPack device type {dt} (1 = CPU), not CUDA (2)"
        )));
    }
    let stream = stream.map(|s| if s == 0 { 1 } else { s });
    let kw = PyDict::new(py);
    kw.set_item("stream", stream)?;
    kw.set_item("max_version", (1, 0))?;
    let cap = match obj.call_method("__dlpack__", (), Some(&kw)) {
        Ok(c) => c,
        Err(e) if e.is_instance_of::<PyTypeError>(py) => {
            let kw = PyDict::new(py);
            kw.set_item("stream", stream)?;
            obj.call_method("__dlpack__", (), Some(&kw))?
        }
        Err(e) => return Err(e),
    };
    let capb = cap
        .cast::<PyCapsule>()
        .map_err(|_| PyTypeError::new_err("__dlpack__ did not return a capsule"))?;
    Ok((parse_capsule(capb)?, cap.clone()))
}

/// Describes a CUDA array without copying or taking ownership.
///
/// `obj` may be a dict in `__cuda_array_interface__` form, an object exposing it, a DLPack
/// capsule, or an object with `__dlpack__` / `__dlpack_device__` (called with `stream`).
/// Returns a dict: ptr, shape, strides (in elements), dtype, device (None when unknown),
/// readonly, stream (CAI v3's, or None), protocol ("cai" / "dlpack") and keep (an object to
/// hold while the pointer is in use).
#[pyfunction]
#[pyo3(signature = (obj, stream=None))]
fn _cuda_parse<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    stream: Option<i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let (parsed, keep) = if let Ok(cap) = obj.cast::<PyCapsule>() {
        (parse_capsule(cap)?, obj.clone())
    } else if obj.cast::<PyDict>().is_ok() {
        (parse_cai(obj)?, obj.clone())
    } else {
        let has_dlpack = obj.hasattr("__dlpack__")?;
        // CAI first (zero cost); DLPack when CAI is missing or cannot express the array (torch
        // bfloat16 reports typestr "<V2").
        let cai = obj
            .getattr("__cuda_array_interface__")
            .and_then(|d| parse_cai(&d));
        match cai {
            Ok(p) => (p, obj.clone()),
            Err(e) if !has_dlpack => {
                if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) {
                    return Err(PyTypeError::new_err(format!(
                        "expected a CUDA array (__cuda_array_interface__ or __dlpack__), got {}",
                        obj.get_type().name()?
                    )));
                }
                return Err(e);
            }
            Err(e)
                if !(e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py)
                    || e.is_instance_of::<PyTypeError>(py)) =>
            {
                return Err(e)
            }
            Err(_) => parse_dlpack_object(py, obj, stream)?,
        }
    };
    let d = PyDict::new(py);
    d.set_item("ptr", parsed.ptr)?;
    d.set_item("shape", PyTuple::new(py, &parsed.shape)?)?;
    d.set_item("strides", PyTuple::new(py, &parsed.strides)?)?;
    d.set_item("dtype", parsed.dtype)?;
    d.set_item("device", parsed.device)?;
    d.set_item("readonly", parsed.readonly)?;
    d.set_item("stream", parsed.stream)?;
    d.set_item("protocol", parsed.protocol)?;
    d.set_item("keep", keep)?;
    Ok(d)
}

// ---- launchers ---------------------------------------------------------------------------

/// Row op on raw device pointers: `x = (ptr, rows, cols, ld)`, `y = (ptr, ld)`.
/// `op` is "logsumexp", "softmax" or "log_softmax".
#[pyfunction]
fn _cuda_rows(
    py: Python<'_>,
    op: &str,
    dtype: &str,
    place: (i32, u64),
    x: (u64, i64, i64, i64),
    y: (u64, i64),
) -> PyResult<()> {
    let op = match op {
        "logsumexp" => RowOp::LogSumExp,
        "softmax" => RowOp::Softmax,
        "log_softmax" => RowOp::LogSoftmax,
        _ => return Err(PyValueError::new_err(format!("unknown row op {op:?}"))),
    };
    let dt = parse_dtype(dtype)?;
    let place = Place {
        device: place.0,
        stream: place.1,
    };
    let rows = Rows {
        ptr: x.0,
        rows: x.1,
        cols: x.2,
        ld: x.3,
    };
    // SAFETY: the Python layer passes pointers it read from live arrays of `place.device`
    // (held alive across the call) and the producer's stream.
    py.detach(move || unsafe { cuda::rows_op(op, dt, place, rows, y.0, y.1) })
        .map_err(rt)
}

/// Cross-entropy on raw device pointers: logits `x = (ptr, rows, cols, ld)`, targets
/// `(ptr, "int32" | "int64")`, outputs `(loss ptr, (grad ptr, ld) or None)`, options
/// `(ignore_index, label_smoothing, z_loss, reduction)`.
#[pyfunction]
fn _cuda_cross_entropy(
    py: Python<'_>,
    dtype: &str,
    place: (i32, u64),
    x: (u64, i64, i64, i64),
    targets: (u64, String),
    outputs: (u64, Option<(u64, i64)>),
    options: (i64, f32, f32, String),
) -> PyResult<()> {
    let (loss, grad) = outputs;
    let dt = parse_dtype(dtype)?;
    let ty = match targets.1.as_str() {
        "int32" => TargetType::I32,
        "int64" => TargetType::I64,
        t => {
            return Err(PyTypeError::new_err(format!(
                "target dtype {t} is not supported on the CUDA path (int32, int64)"
            )))
        }
    };
    // The front door validated the name (stablelse._spec); this only converts it.
    let reduction = LossReduction::parse(&options.3)
        .ok_or_else(|| PyValueError::new_err(format!("unknown reduction {:?}", options.3)))?;
    let opt = XentOptions {
        ignore_index: options.0,
        label_smoothing: options.1,
        z_loss: options.2,
        reduction,
    };
    let place = Place {
        device: place.0,
        stream: place.1,
    };
    let rows = Rows {
        ptr: x.0,
        rows: x.1,
        cols: x.2,
        ld: x.3,
    };
    let tg = Targets { ptr: targets.0, ty };
    // SAFETY: as in _cuda_rows; targets, loss and grad come from live arrays on the device.
    py.detach(move || unsafe { cuda::cross_entropy(dt, place, rows, tg, loss, grad, opt) })
        .map_err(rt)
}
