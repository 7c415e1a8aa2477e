//! The CUDA path (cargo feature `cuda`): row-wise logsumexp, softmax, log_softmax and
//! cross-entropy on device memory owned by someone else (CuPy, PyTorch, JAX).
//!
//! - Kernels live in `kernels/rows.cu` (header-free), compiled by NVRTC at first use for the
//!   device's own `sm_XX` and loaded as CUBIN ([`nvrtc`]); one module per element type.
//! - Device memory is addressed by raw pointers (`CUdeviceptr`) only: nothing here allocates,
//!   owns or frees the caller's buffers. Temporary workspace is stream-ordered
//!   (`cuMemAllocAsync` / `cuMemFreeAsync`) on the caller's stream.
//! - Every launch goes to the stream the caller names (the producer's stream), in the
//!   device's primary context (the one CuPy, PyTorch and JAX use); the calling thread's
//!   previous context is restored afterwards.
//! - cudarc panics when `libcuda` is missing; [`is_available`] probes inside `catch_unwind`
//!   and every entry point here returns `Result<_, String>` and never panics.
//!
//! Nothing in this module knows about Python.

pub mod nvrtc;

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys};

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
    fn acc_size(self) -> usize {
        if self == DType::F64 {
            8
        } else {
            4
        }
    }

    fn c_type(self) -> &'static str {
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
fn guard<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
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

fn derr(what: &str, e: result::DriverError) -> String {
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

struct Device {
    ctx: sys::CUcontext,
    cc: (i32, i32),
    sms: i32,
    /// Largest dynamic shared memory one block may opt in to, less our static use.
    smem_optin: u32,
    modules: Mutex<HashMap<DType, Arc<Module>>>,
}

struct Module {
    module: sys::CUmodule,
    functions: Mutex<HashMap<&'static str, sys::CUfunction>>,
    /// Dynamic shared memory limit raised per function (bytes).
    smem_set: Mutex<HashMap<&'static str, u32>>,
}

// SAFETY: CUDA contexts, modules and functions are process-wide handles usable from any
// thread; the maps around them are behind mutexes.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

static DEVICES: Mutex<Option<HashMap<i32, Arc<Device>>>> = Mutex::new(None);

fn device(ordinal: i32) -> Result<Arc<Device>, String> {
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
struct CtxScope(Option<sys::CUcontext>);

impl CtxScope {
    fn enter(ctx: sys::CUcontext) -> Result<CtxScope, String> {
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
    fn module(&self, dtype: DType) -> Result<Arc<Module>, String> {
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
    fn function(&self, name: &'static str) -> Result<sys::CUfunction, String> {
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

/// Mirror of `struct Params` in `kernels/rows.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Params {
    x: u64,
    y: u64,
    tgt: u64,
    loss: u64,
    ws: u64,
    count: u64,
    rows: i64,
    cols: i64,
    ldx: i64,
    ldy: i64,
    ignore_index: i64,
    chunk: i64,
    nchunks: i64,
    fchunks: i64,
    eps: f32,
    z: f32,
    scale: f32,
    flags: i32,
}

const FLAG_VEC: i32 = 1;
const FLAG_GRAD: i32 = 2;
const FLAG_TGT64: i32 = 4;
const FLAG_MEAN: i32 = 8;

/// Where to run: device ordinal and the raw `CUstream` handle (0 = legacy default stream,
/// 1 = `CU_STREAM_LEGACY`, 2 = `CU_STREAM_PER_THREAD`, else a stream of that device).
#[derive(Clone, Copy, Debug)]
pub struct Place {
    pub device: i32,
    pub stream: u64,
}

/// A batch of rows in device memory: row `r` starts at `ptr + r * ld * size` and has `cols`
/// elements with unit stride.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub ptr: u64,
    pub rows: i64,
    pub cols: i64,
    pub ld: i64,
}

/// The row-wise reductions with one output per element or per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOp {
    LogSumExp,
    Softmax,
    LogSoftmax,
}

/// Cross-entropy reduction over rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReduction {
    Mean,
    Sum,
    None,
}

struct Launcher<'a> {
    module: &'a Module,
    stream: sys::CUstream,
}

impl Launcher<'_> {
    /// Launches with `smem` bytes of dynamic shared memory, raising the kernel's limit first
    /// when it is above the default 48 KiB.
    fn launch_smem(
        &self,
        name: &'static str,
        grid: i64,
        block: u32,
        smem: u32,
        dev: &Device,
        p: &Params,
    ) -> Result<(), String> {
        if smem > 48 * 1024 {
            let f = self.module.function(name)?;
            let mut raised = self
                .module
                .smem_set
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if raised.get(name).copied().unwrap_or(0) < smem {
                if smem > dev.smem_optin {
                    return Err(format!(
                        "{name}: {smem} bytes of shared memory exceed the device's {}",
                        dev.smem_optin
                    ));
                }
                // SAFETY: f is a live function of a loaded module.
                unsafe {
                    result::function::set_function_attribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dev.smem_optin as i32,
                    )
                }
                .map_err(|e| derr(&format!("cuFuncSetAttribute({name})"), e))?;
                raised.insert(name, dev.smem_optin);
            }
        }
        self.launch_with(name, grid, block, smem, p)
    }

    /// Allows the kernel's compile-time cluster of 16 (beyond the portable 8), once.
    fn allow_cluster16(&self, name: &'static str) -> Result<(), String> {
        let f = self.module.function(name)?;
        let mut set = self
            .module
            .smem_set
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key: &'static str = match name {
            "softmax_cluster16" => "softmax_cluster16/np",
            "log_softmax_cluster16" => "log_softmax_cluster16/np",
            _ => "xent_cluster16/np",
        };
        if set.contains_key(key) {
            return Ok(());
        }
        // SAFETY: f is a live function of a loaded module.
        unsafe {
            result::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
        }
        .map_err(|e| derr(&format!("cuFuncSetAttribute({name})"), e))?;
        set.insert(key, 1);
        Ok(())
    }

    fn launch(&self, name: &'static str, grid: i64, block: u32, p: &Params) -> Result<(), String> {
        self.launch_with(name, grid, block, 0, p)
    }

    fn launch_with(
        &self,
        name: &'static str,
        grid: i64,
        block: u32,
        smem: u32,
        p: &Params,
    ) -> Result<(), String> {
        if grid <= 0 {
            return Ok(());
        }
        let grid = u32::try_from(grid)
            .map_err(|_| format!("{name}: grid of {grid} blocks is too large"))?;
        let f = self.module.function(name)?;
        let mut pc = *p;
        let mut args = [&mut pc as *mut Params as *mut c_void];
        // SAFETY: the kernel takes one `Params` by value, mirrored above; the pointers in it
        // are device addresses the caller vouched for (see the callers' safety contracts).
        unsafe {
            result::launch_kernel(f, (grid, 1, 1), (block, 1, 1), smem, self.stream, &mut args)
        }
        .map_err(|e| derr(&format!("launch of {name}"), e))
    }
}

/// Stream-ordered scratch memory, freed on the same stream when dropped.
struct Scratch {
    ptr: u64,
    stream: sys::CUstream,
}

impl Scratch {
    fn new(bytes: usize, stream: sys::CUstream) -> Result<Scratch, String> {
        if bytes == 0 {
            return Ok(Scratch { ptr: 0, stream });
        }
        // SAFETY: an allocation on the caller's stream, used only by kernels on that stream.
        let ptr = unsafe { result::malloc_async(stream, bytes) }
            .map_err(|e| derr("cuMemAllocAsync", e))?;
        Ok(Scratch { ptr, stream })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by cuMemAllocAsync on this stream, freed once, after the
            // kernels that use it in stream order.
            let _ = unsafe { result::free_async(self.ptr, self.stream) };
        }
    }
}

/// Launch geometry for `rows x cols`: which tier and how the split tiers chunk a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// One warp per row, 8 rows per 256-thread block.
    Warp,
    /// One warp per row with the row (at most 1024, aligned) held in registers.
    WarpRegisters,
    /// One block of `threads` (at most 512) per row, re-reading the row for a second pass.
    Block { threads: u32 },
    /// One block per row, the row cached in shared memory between the passes.
    Cached { threads: u32 },
    /// A cluster of `size` (8 or 16) blocks per row (sm_90), each caching a `chunk` of it.
    Cluster { size: u32, chunk: i64 },
    /// `nchunks` chunks of `chunk` elements per row, one 512-thread block each.
    Split { chunk: i64, nchunks: i64 },
}

/// What the tier choice depends on besides the shape.
#[derive(Clone, Copy, Debug)]
pub struct TierFacts {
    /// Multiprocessors on the device.
    pub sms: i32,
    /// The op writes per-element outputs (a second pass over the row).
    pub pass2: bool,
    /// Rows and outputs are 16-byte aligned and the type is 16/32-bit: the cached tiers apply.
    pub cacheable: bool,
    /// Thread-block clusters are available (compute capability 9.0 and up).
    pub clusters: bool,
    /// Elements per 16-byte vector (4 for float32, 8 for 16-bit types, 2 for float64).
    pub vec_width: i64,
}

const CACHED_MAX: i64 = 32768;

/// Threads for one block per row: about 8 vectors per thread (fewer threads leave the
/// block-wide merge too much of the work), 128 to 512.
fn block_threads(cols: i64, vec_width: i64) -> u32 {
    let want = cols / (vec_width.max(1) * 8);
    let mut t = 128i64;
    while t < want && t < 512 {
        t *= 2;
    }
    t as u32
}
/// Largest per-block cache of the cluster tiers: 64 KiB leaves room for 3 blocks per SM.
const CLUSTER_CACHE_BYTES: i64 = 65536;

/// Tuning knobs for new devices, read once: `STABLELSE_CUDA_WARP_MAX` (longest row given to
/// one warp), `STABLELSE_CUDA_CACHED_MAX` (longest row cached by one block before clusters
/// take over), `STABLELSE_CUDA_CLUSTER_CACHE` (bytes cached per cluster block).
fn knob(name: &str) -> Option<i64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn warp_max() -> Option<i64> {
    static W: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    *W.get_or_init(|| knob("STABLELSE_CUDA_WARP_MAX"))
}

fn cached_max() -> i64 {
    static W: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *W.get_or_init(|| knob("STABLELSE_CUDA_CACHED_MAX").unwrap_or(CACHED_MAX))
}

fn cluster_cache_bytes() -> i64 {
    static W: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *W.get_or_init(|| knob("STABLELSE_CUDA_CLUSTER_CACHE").unwrap_or(CLUSTER_CACHE_BYTES))
}

/// Picks the tier. Read-only ops (logsumexp, the loss alone): a warp per row up to 4096, a
/// block per row up to 32k (while the rows fill the device), split rows beyond, merged by a
/// second tiny pass. Ops with outputs per element: a warp per row up to 1024 (the row in
/// registers), then one block caching the row in shared memory (up to 64 KiB on sm_90, 32k
/// elements elsewhere), then clusters of 8 or 16 blocks caching a chunk each (up to 256k on
/// sm_90), so a row is read from memory once; beyond that (or unaligned rows, or float64)
/// the block and split tiers re-read it.
pub fn choose_tier(rows: i64, cols: i64, f: TierFacts) -> Tier {
    let sms = f.sms.max(1) as i64;
    let few_rows = rows < 2 * sms;
    // Measured on H100: a warp per row wins for read-only rows up to 4k, and for two-pass
    // rows up to 1024 when the row stays in the warp's registers.
    if f.pass2 && f.cacheable && cols <= 1024 && warp_max().is_none() {
        return Tier::WarpRegisters;
    }
    let warp_limit = if f.pass2 { 1024 } else { 4096 };
    if cols <= warp_max().unwrap_or(warp_limit) {
        return Tier::Warp;
    }
    if f.pass2 && f.cacheable {
        // Measured on H100: one block caching up to 64 KiB beats a cluster (float32 16k,
        // 16-bit 32k); past that clusters of small caches win.
        let bytes = 16 / f.vec_width.max(1);
        let cmax = if f.clusters {
            cached_max()
                .min(CLUSTER_CACHE_BYTES / bytes)
                .min(CACHED_MAX)
        } else {
            cached_max().min(CACHED_MAX)
        };
        let want_cluster = f.clusters && (cols > cmax || (few_rows && cols >= 8192));
        if cols <= cmax && !want_cluster {
            return Tier::Cached {
                threads: block_threads(cols, f.vec_width),
            };
        }
        if want_cluster && cols <= 8 * CACHED_MAX {
            // Caches of at most 64 KiB leave room for 3 blocks per SM, so one block's reads
            // overlap another's writes; clusters of 16 only when 8 would need more.
            let chunk8 = ((cols + 7) / 8 + 7) / 8 * 8;
            let chunk16 = ((cols + 15) / 16 + 7) / 8 * 8;
            let cache = cluster_cache_bytes();
            if chunk8 * bytes <= cache || chunk16 * bytes > cache {
                return Tier::Cluster {
                    size: 8,
                    chunk: chunk8,
                };
            }
            return Tier::Cluster {
                size: 16,
                chunk: chunk16,
            };
        }
    }
    if cols <= 32768 && !(few_rows && cols >= 8192) {
        return Tier::Block {
            threads: block_threads(cols, f.vec_width),
        };
    }
    let want = ((4 * sms + rows - 1) / rows).max(1);
    let chunk = (cols + want - 1) / want;
    let chunk = chunk.clamp(4096, 32768);
    let chunk = (chunk + 63) / 64 * 64;
    Tier::Split {
        chunk,
        nchunks: (cols + chunk - 1) / chunk,
    }
}

fn check_rows(what: &str, r: &Rows) -> Result<(), String> {
    if r.rows < 0 || r.cols < 0 {
        return Err(format!("{what}: negative shape ({}, {})", r.rows, r.cols));
    }
    if r.rows > 1 && r.ld < r.cols {
        return Err(format!(
            "{what}: row stride {} is shorter than the row ({} elements)",
            r.ld, r.cols
        ));
    }
    if r.ptr == 0 && r.rows > 0 && r.cols > 0 {
        return Err(format!("{what}: null device pointer"));
    }
    Ok(())
}

fn vec_ok(dtype: DType, x: &Rows, y: Option<(u64, i64)>) -> bool {
    let es = dtype.size() as i64;
    match y {
        None => true,
        Some((yp, ldy)) => {
            (x.ptr.wrapping_sub(yp)) % 16 == 0 && ((x.ld - ldy) * es).rem_euclid(16) == 0
        }
    }
}

/// Runs tier `tier` of kernel family `fam` (`"lse"`, `"softmax"`, `"log_softmax"`, `"xent"`).
fn run_rows(
    dev: &Device,
    dtype: DType,
    l: &Launcher,
    fam: &str,
    needs_pass2: bool,
    mut p: Params,
) -> Result<(), String> {
    let name = |tier: &str| -> &'static str {
        // Kernel names are a small fixed set; leak-free static lookup.
        match (fam, tier) {
            ("lse", "warp") => "lse_warp",
            ("lse", "block") => "lse_block",
            ("lse", "partial") => "lse_partial",
            ("lse", "final") => "lse_final",
            ("softmax", "warp") => "softmax_warp",
            ("softmax", "block") => "softmax_block",
            ("softmax", "partial") => "softmax_partial",
            ("softmax", "final") => "softmax_final",
            ("log_softmax", "warp") => "log_softmax_warp",
            ("log_softmax", "block") => "log_softmax_block",
            ("log_softmax", "partial") => "log_softmax_partial",
            ("log_softmax", "final") => "log_softmax_final",
            ("xent", "warp") => "xent_warp",
            ("xent", "block") => "xent_block",
            ("xent", "partial") => "xent_partial",
            ("softmax", "warpreg") => "softmax_warpreg",
            ("log_softmax", "warpreg") => "log_softmax_warpreg",
            ("xent", "warpreg") => "xent_warpreg",
            ("softmax", "cached") => "softmax_cached",
            ("log_softmax", "cached") => "log_softmax_cached",
            ("xent", "cached") => "xent_cached",
            ("softmax", "cluster8") => "softmax_cluster8",
            ("log_softmax", "cluster8") => "log_softmax_cluster8",
            ("xent", "cluster8") => "xent_cluster8",
            ("softmax", "cluster16") => "softmax_cluster16",
            ("log_softmax", "cluster16") => "log_softmax_cluster16",
            ("xent", "cluster16") => "xent_cluster16",
            _ => "xent_final",
        }
    };
    let es = dtype.size() as i64;
    let aligned = |ptr: u64, ld: i64| ptr.is_multiple_of(16) && (ld * es) % 16 == 0;
    let facts = TierFacts {
        sms: dev.sms,
        pass2: needs_pass2,
        cacheable: dtype != DType::F64
            && aligned(p.x, p.ldx)
            && (!needs_pass2 || aligned(p.y, p.ldy)),
        clusters: dev.cc.0 >= 9,
        vec_width: 16 / es,
    };
    match choose_tier(p.rows, p.cols, facts) {
        Tier::Warp => l.launch(name("warp"), (p.rows + 7) / 8, 256, &p),
        Tier::WarpRegisters => l.launch(name("warpreg"), (p.rows + 7) / 8, 256, &p),
        Tier::Block { threads } => l.launch(name("block"), p.rows, threads, &p),
        Tier::Cached { threads } => {
            p.chunk = p.cols;
            let smem = (p.cols * es) as u32;
            l.launch_smem(name("cached"), p.rows, threads, smem, dev, &p)
        }
        Tier::Cluster { size: 16, chunk } => {
            p.chunk = chunk;
            let smem = (chunk * es) as u32;
            let threads = block_threads(chunk, 16 / es);
            let r = l.allow_cluster16(name("cluster16")).and_then(|_| {
                l.launch_smem(name("cluster16"), p.rows * 16, threads, smem, dev, &p)
            });
            if r.is_ok() {
                return r;
            }
            // A device that cannot co-schedule 16 blocks: clusters of 8 with twice the chunk.
            p.chunk = ((p.cols + 7) / 8 + 7) / 8 * 8;
            let smem = (p.chunk * es) as u32;
            let threads = block_threads(p.chunk, 16 / es);
            l.launch_smem(name("cluster8"), p.rows * 8, threads, smem, dev, &p)
        }
        Tier::Cluster { chunk, .. } => {
            p.chunk = chunk;
            let smem = (chunk * es) as u32;
            let threads = block_threads(chunk, 16 / es);
            l.launch_smem(name("cluster8"), p.rows * 8, threads, smem, dev, &p)
        }
        Tier::Split { chunk, nchunks } => {
            let ws = Scratch::new(
                (p.rows as usize) * (nchunks as usize) * 4 * dtype.acc_size(),
                l.stream,
            )?;
            p.ws = ws.ptr;
            p.chunk = chunk;
            p.nchunks = nchunks;
            p.fchunks = if needs_pass2 { nchunks } else { 1 };
            l.launch(name("partial"), p.rows * nchunks, 512, &p)?;
            l.launch(name("final"), p.rows * p.fchunks, 512, &p)
        }
    }
}

/// logsumexp / softmax / log_softmax over each row of `x`.
///
/// `y` is the output: one element per row for [`RowOp::LogSumExp`] (contiguous), else rows
/// of `x.cols` elements with row stride `ldy`. Same element type as `x`.
///
/// # Safety
/// `x` and `y` must describe device memory of device `place.device`, valid (and for `y`
/// writable, not overlapping `x` except exactly in place) until the work queued on
/// `place.stream` completes; `place.stream` must be a live stream of that device.
pub unsafe fn rows_op(
    op: RowOp,
    dtype: DType,
    place: Place,
    x: Rows,
    y: u64,
    ldy: i64,
) -> Result<(), String> {
    check_rows("x", &x)?;
    if x.rows == 0 {
        return Ok(());
    }
    if y == 0 {
        return Err("y: null device pointer".to_string());
    }
    guard(|| {
        let dev = device(place.device)?;
        let _scope = CtxScope::enter(dev.ctx)?;
        let module = dev.module(dtype)?;
        let l = Launcher {
            module: &module,
            stream: place.stream as sys::CUstream,
        };
        let (fam, pass2) = match op {
            RowOp::LogSumExp => ("lse", false),
            RowOp::Softmax => ("softmax", true),
            RowOp::LogSoftmax => ("log_softmax", true),
        };
        let vec = vec_ok(dtype, &x, if pass2 { Some((y, ldy)) } else { None });
        let p = Params {
            x: x.ptr,
            y,
            rows: x.rows,
            cols: x.cols,
            ldx: x.ld,
            ldy,
            flags: if vec { FLAG_VEC } else { 0 },
            ..Params::default()
        };
        run_rows(&dev, dtype, &l, fam, pass2, p)
    })
}

/// Integer type of cross-entropy targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetType {
    I32,
    I64,
}

/// Integer class targets in device memory, one per row.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    pub ptr: u64,
    pub ty: TargetType,
}

/// Options of the cross-entropy forward (and fused gradient).
#[derive(Clone, Copy, Debug)]
pub struct XentOptions {
    pub ignore_index: i64,
    pub label_smoothing: f32,
    pub z_loss: f32,
    pub reduction: LossReduction,
}

/// Cross-entropy of each row of logits `x` against integer class `targets` (one per row).
///
/// `loss` receives `x.rows` values (reduction none) or one value, in the logits' dtype.
/// `grad`, when given as `(ptr, ld)`, receives d(loss)/d(logits) (for reduction none: of the
/// sum of the losses) in the logits' dtype. Per row: `lse - (1-eps) x_t - eps/C sum_j x_j +
/// z lse^2`; a target equal to `ignore_index` gives loss 0 and a zero gradient row and is not
/// counted by "mean"; a target outside `[0, C)` gives NaN (no device-side check can raise).
///
/// # Safety
/// As [`rows_op`]; `targets` holds `x.rows` integers on the same device.
pub unsafe fn cross_entropy(
    dtype: DType,
    place: Place,
    x: Rows,
    targets: Targets,
    loss: u64,
    grad: Option<(u64, i64)>,
    opt: XentOptions,
) -> Result<(), String> {
    check_rows("logits", &x)?;
    if loss == 0 {
        return Err("loss: null device pointer".to_string());
    }
    guard(|| {
        let dev = device(place.device)?;
        let _scope = CtxScope::enter(dev.ctx)?;
        let module = dev.module(dtype)?;
        let stream = place.stream as sys::CUstream;
        let l = Launcher {
            module: &module,
            stream,
        };
        let rows = x.rows.max(0) as usize;
        // Scratch: the count of non-ignored targets (u64), then per-row float32 losses.
        let scratch = Scratch::new(rows * 4 + 16, stream)?;
        let count = scratch.ptr;
        let loss_rows = scratch.ptr + 16;
        let mut flags = if targets.ty == TargetType::I64 {
            FLAG_TGT64
        } else {
            0
        };
        if grad.is_some() {
            flags |= FLAG_GRAD;
        }
        if vec_ok(dtype, &x, grad) {
            flags |= FLAG_VEC;
        }
        let mean = opt.reduction == LossReduction::Mean;
        let p = Params {
            x: x.ptr,
            y: grad.map_or(0, |g| g.0),
            tgt: targets.ptr,
            loss: loss_rows,
            // The gradient of "mean" needs the count before the main kernel; the loss alone
            // gets it from the reduction kernel's own pass over the targets.
            count: if mean && grad.is_some() { count } else { 0 },
            rows: x.rows,
            cols: x.cols,
            ldx: x.ld,
            ldy: grad.map_or(0, |g| g.1),
            ignore_index: opt.ignore_index,
            eps: opt.label_smoothing,
            z: opt.z_loss,
            scale: 1.0,
            flags,
            ..Params::default()
        };
        if mean && grad.is_some() {
            // SAFETY: count is 8 bytes of our scratch on this stream.
            unsafe { result::memset_d8_async(count, 0, 8, stream) }
                .map_err(|e| derr("cuMemsetD8Async", e))?;
            let blocks = ((x.rows + 8191) / 8192).clamp(1, 1024);
            l.launch("xent_count", blocks, 256, &p)?;
        }
        if x.rows > 0 {
            run_rows(&dev, dtype, &l, "xent", grad.is_some(), p)?;
        }
        let q = Params {
            y: loss,
            flags: p.flags | if mean { FLAG_MEAN } else { 0 },
            ..p
        };
        match opt.reduction {
            LossReduction::None => l.launch("xent_cast", (x.rows + 255) / 256, 256, &q),
            _ if x.rows <= 8192 => l.launch("xent_reduce", 1, 1024, &q),
            _ => {
                // Two levels, fixed blocking: (sum, count) per 4096 rows, then one block.
                let chunk = 4096i64;
                let nchunks = (x.rows + chunk - 1) / chunk;
                let partials = Scratch::new(nchunks as usize * 16, stream)?;
                let q = Params {
                    ws: partials.ptr,
                    chunk,
                    nchunks,
                    ..q
                };
                l.launch("xent_reduce_partial", nchunks, 1024, &q)?;
                l.launch("xent_reduce", 1, 1024, &q)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pip package nvidia-cuda-nvrtc's lib directories, found through python3.
    fn register_pip_nvrtc() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import nvidia, os\nfor p in nvidia.__path__:\n  for s in ('cu13/lib', 'cuda_nvrtc/lib'):\n    print(os.path.join(p, s))",
            ])
            .output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                nvrtc::add_search_dir(line.trim());
            }
        }
    }

    #[test]
    fn kernels_compile_for_sm80_and_sm90() {
        register_pip_nvrtc();
        // Compile for real, not from a CUBIN cache left by an earlier run.
        std::env::set_var("STABLELSE_CACHE_DIR", "");
        if let Err(e) = nvrtc::ensure_loaded() {
            if std::env::var_os("STABLELSE_REQUIRE_NVRTC").is_some() {
                panic!("{e}");
            }
            eprintln!("skipped: {e}");
            return;
        }
        // NVRTC is thread-safe: the eight programs compile side by side.
        std::thread::scope(|sc| {
            let jobs: Vec<_> = ["sm_80", "sm_90"]
                .into_iter()
                .flat_map(|arch| DType::ALL.into_iter().map(move |dt| (arch, dt)))
                .map(|(arch, dt)| sc.spawn(move || (arch, dt, compile_for_arch(dt, arch))))
                .collect();
            for j in jobs {
                let (arch, dt, r) = j.join().expect("compile thread");
                let cubin = r.unwrap_or_else(|e| panic!("{e}"));
                // An ELF image.
                assert_eq!(&cubin[..4], b"\x7fELF", "{arch} {dt:?}");
            }
        });
    }

    #[test]
    fn availability_probe_does_not_panic() {
        // On a machine without libcuda this is false; with one, true or false; never a panic.
        let _ = is_available();
        let _ = driver_version();
    }

    #[test]
    fn tiers() {
        let ro = TierFacts {
            sms: 132,
            pass2: false,
            cacheable: true,
            clusters: true,
            vec_width: 4,
        };
        let rw = TierFacts { pass2: true, ..ro };
        let rw80 = TierFacts {
            clusters: false,
            ..rw
        };
        assert_eq!(choose_tier(1000, 10, ro), Tier::Warp);
        assert_eq!(choose_tier(1000, 4096, ro), Tier::Warp);
        assert_eq!(choose_tier(1000, 512, rw), Tier::WarpRegisters);
        assert_eq!(choose_tier(1000, 1024, rw), Tier::WarpRegisters);
        assert_eq!(choose_tier(1000, 1025, rw), Tier::Cached { threads: 128 });
        assert_eq!(choose_tier(4096, 4096, rw), Tier::Cached { threads: 128 });
        assert_eq!(choose_tier(4096, 32768, ro), Tier::Block { threads: 512 });
        assert_eq!(block_threads(4096, 8), 128);
        assert_eq!(block_threads(65536, 8), 512);
        assert_eq!(choose_tier(4096, 8192, rw), Tier::Cached { threads: 256 });
        assert_eq!(choose_tier(4096, 16384, rw), Tier::Cached { threads: 512 });
        assert_eq!(
            choose_tier(4096, 32768, rw),
            Tier::Cluster {
                size: 8,
                chunk: 4096
            }
        );
        assert_eq!(
            choose_tier(4096, 32768, rw80),
            Tier::Cached { threads: 512 }
        );
        let rw16 = TierFacts { vec_width: 8, ..rw };
        assert_eq!(
            choose_tier(4096, 32768, rw16),
            Tier::Cached { threads: 512 }
        );
        assert_eq!(
            choose_tier(4096, 32768, rw80),
            Tier::Cached { threads: 512 }
        );
        assert_eq!(
            choose_tier(64, 262144, rw),
            Tier::Cluster {
                size: 16,
                chunk: 16384
            }
        );
        assert_eq!(
            choose_tier(64, 131072, rw),
            Tier::Cluster {
                size: 8,
                chunk: 16384
            }
        );
        assert_eq!(
            choose_tier(8, 16384, rw),
            Tier::Cluster {
                size: 8,
                chunk: 2048
            }
        );
        assert!(matches!(choose_tier(64, 262144, rw80), Tier::Split { .. }));
        let unaligned = TierFacts {
            cacheable: false,
            ..rw
        };
        assert_eq!(
            choose_tier(4096, 4096, unaligned),
            Tier::Block { threads: 128 }
        );
        match choose_tier(64, 262144, ro) {
            Tier::Split { chunk, nchunks } => {
                assert!(chunk * nchunks >= 262144 && chunk % 64 == 0);
                assert!(64 * nchunks >= 4 * 132);
            }
            t => panic!("{t:?}"),
        }
        assert!(matches!(choose_tier(4, 16384, ro), Tier::Split { .. }));
    }
}
