//! The driver side: loading libcuda, the primary context of each device, and the NVRTC-compiled
//! modules and their functions, cached per device and element type.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};

use super::nvrtc;

/// The kernel source, embedded at build time.
pub const ROWS_CU: &str = include_str!("kernels/rows.cu");

/// Element types the kernels handle; float32 accumulation for all but float64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Bytes per accumulator (float64 accumulates in double).
    pub(super) fn acc_size(self) -> usize {
        if self == DType::F64 {
            8
        } else {
            4
        }
    }

    pub(super) fn c_type(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::BF16 => "slse_bf16",
            DType::F16 => "slse_f16",
        }
    }

    /// The NumPy-style name (`"float32"`, `"bfloat16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
}

/// The source NVRTC compiles for one element type.
pub fn kernel_source(dtype: DType) -> String {
    // The shared-memory-cached tiers hold float32; float64 rows use the re-reading tiers.
    let extra = if dtype == DType::F64 {
        "#define SLSE_NO_CACHED\n"
    } else {
        ""
    };
    format!("#define SLSE_T {}\n{extra}{}", dtype.c_type(), ROWS_CU)
}

/// Compiles the kernels of one element type for `arch` (`"sm_80"`, `"sm_90"`) and returns
/// the CUBIN; needs NVRTC only, no driver and no GPU.
pub fn compile_for_arch(dtype: DType, arch: &str) -> Result<Arc<Vec<u8>>, String> {
    guard(|| nvrtc::compile_cubin(&kernel_source(dtype), arch, "rows.cu"))
}

/// Runs `f`, turning a panic (cudarc panics when a library is missing) into an error.
pub(super) fn guard<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(format!("CUDA is unavailable: {msg}"))
        }
    }
}

pub(super) fn derr(what: &str, e: result::DriverError) -> String {
    let name = e
        .error_name()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    format!("{what} failed: {name}")
}

fn init_driver() -> Result<i32, String> {
    // SAFETY: dlopen of libcuda by its usual names only.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver) was not found".to_string());
    }
    result::init().map_err(|e| derr("cuInit", e))?;
    result::device::get_count().map_err(|e| derr("cuDeviceGetCount", e))
}

/// Number of CUDA devices; an error when there is no driver or it fails to initialise.
pub fn device_count() -> Result<i32, String> {
    guard(init_driver)
}

/// True when libcuda loads, initialises and reports at least one device. Never panics.
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

/// The driver's CUDA version as `(major, minor)` (13.0 for driver 580).
pub fn driver_version() -> Result<(i32, i32), String> {
    guard(|| {
        init_driver()?;
        let mut v = 0;
        // SAFETY: the driver is initialised and v is valid for writes.
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| derr("cuDriverGetVersion", e))?;
        Ok((v / 1000, (v % 1000) / 10))
    })
}

/// Facts about one device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: i32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    pub total_memory: usize,
}

/// Name, compute capability, SM count and memory of device `ordinal`.
pub fn device_info(ordinal: i32) -> Result<DeviceInfo, String> {
    guard(|| {
        let dev = device(ordinal)?;
        let d = result::device::get(ordinal).map_err(|e| derr("cuDeviceGet", e))?;
        let name = result::device::get_name(d).map_err(|e| derr("cuDeviceGetName", e))?;
        // SAFETY: d comes from cuDeviceGet.
        let total_memory =
            unsafe { result::device::total_mem(d) }.map_err(|e| derr("cuDeviceTotalMem", e))?;
        Ok(DeviceInfo {
            ordinal,
            name,
            compute_capability: dev.cc,
            multiprocessors: dev.sms,
            total_memory,
        })
    })
}

pub(super) struct Device {
    pub(super) ctx: sys::CUcontext,
    pub(super) cc: (i32, i32),
    pub(super) sms: i32,
    /// Largest dynamic shared memory one block may opt in to, less our static use.
    pub(super) smem_optin: u32,
    pub(super) modules: Mutex<HashMap<DType, Arc<Module>>>,
}

pub(super) struct Module {
    pub(super) module: sys::CUmodule,
    pub(super) functions: Mutex<HashMap<&'static str, sys::CUfunction>>,
    /// Dynamic shared memory limit raised per function (bytes).
    pub(super) smem_set: Mutex<HashMap<&'static str, u32>>,
}

// SAFETY: CUDA contexts, modules and functions are process-wide handles usable from any
// thread; the maps around them are behind mutexes.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

static DEVICES: Mutex<Option<HashMap<i32, Arc<Device>>>> = Mutex::new(None);

pub(super) fn device(ordinal: i32) -> Result<Arc<Device>, String> {
    let mut devs = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    let devs = devs.get_or_insert_with(HashMap::new);
    if let Some(d) = devs.get(&ordinal) {
        return Ok(d.clone());
    }
    let n = init_driver()?;
    if ordinal < 0 || ordinal >= n {
        return Err(format!(
            "CUDA device {ordinal} does not exist ({n} device(s))"
        ));
    }
    let d = result::device::get(ordinal).map_err(|e| derr("cuDeviceGet", e))?;
    let attr = |a| {
        // SAFETY: d comes from cuDeviceGet.
        unsafe { result::device::get_attribute(d, a) }.map_err(|e| derr("cuDeviceGetAttribute", e))
    };
    use sys::CUdevice_attribute::*;
    let cc = (
        attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let optin = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    // Static shared memory of the cached kernels is under 1 KiB.
    let smem_optin = (optin.max(0) as u32).saturating_sub(1024);
    // The primary context is retained for the life of the process (never released): the
    // frameworks whose memory we address share it.
    // SAFETY: d comes from cuDeviceGet.
    let ctx = unsafe { result::primary_ctx::retain(d) }
        .map_err(|e| derr("cuDevicePrimaryCtxRetain", e))?;
    let dev = Arc::new(Device {
        ctx,
        cc,
        sms,
        smem_optin,
        modules: Mutex::new(HashMap::new()),
    });
    devs.insert(ordinal, dev.clone());
    Ok(dev)
}

/// Makes `ctx` current for the life of the guard and restores the previous one.
pub(super) struct CtxScope(Option<sys::CUcontext>);

impl CtxScope {
    pub(super) fn enter(ctx: sys::CUcontext) -> Result<CtxScope, String> {
        let prev = result::ctx::get_current().map_err(|e| derr("cuCtxGetCurrent", e))?;
        if prev != Some(ctx) {
            // SAFETY: ctx is a retained primary context.
            unsafe { result::ctx::set_current(ctx) }.map_err(|e| derr("cuCtxSetCurrent", e))?;
            Ok(CtxScope(Some(prev.unwrap_or(std::ptr::null_mut()))))
        } else {
            Ok(CtxScope(None))
        }
    }
}

impl Drop for CtxScope {
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            // SAFETY: prev was current before (or null, which unbinds).
            let _ = unsafe { result::ctx::set_current(prev) };
        }
    }
}

impl Device {
    pub(super) fn module(&self, dtype: DType) -> Result<Arc<Module>, String> {
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = mods.get(&dtype) {
            return Ok(m.clone());
        }
        let arch = format!("sm_{}{}", self.cc.0, self.cc.1);
        let cubin = nvrtc::compile_cubin(&kernel_source(dtype), &arch, "rows.cu")?;
        // SAFETY: cubin is a complete CUBIN image from NVRTC for this device's arch; the
        // context is current (the caller holds a CtxScope).
        let module = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }
            .map_err(|e| derr(&format!("cuModuleLoadData ({arch} CUBIN)"), e))?;
        let m = Arc::new(Module {
            module,
            functions: Mutex::new(HashMap::new()),
            smem_set: Mutex::new(HashMap::new()),
        });
        mods.insert(dtype, m.clone());
        Ok(m)
    }
}

impl Module {
    pub(super) fn function(&self, name: &'static str) -> Result<sys::CUfunction, String> {
        let mut fns = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&f) = fns.get(name) {
            return Ok(f);
        }
        let cname = CString::new(name).map_err(|_| "bad kernel name".to_string())?;
        // SAFETY: the module is loaded and never unloaded.
        let f = unsafe { result::module::get_function(self.module, cname) }
            .map_err(|e| derr(&format!("cuModuleGetFunction({name})"), e))?;
        fns.insert(name, f);
        Ok(f)
    }
}
