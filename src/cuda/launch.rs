//! Launch policy: the parameter block the kernels read, the tier chosen for a row length and
//! device, the launches themselves and stream-ordered scratch memory.

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use super::driver::{derr, DType, Device, Module};
use super::ops::Rows;

/// Mirror of `struct Params` in `kernels/rows.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Params {
    pub(super) x: u64,
    pub(super) y: u64,
    pub(super) tgt: u64,
    pub(super) loss: u64,
    pub(super) ws: u64,
    pub(super) count: u64,
    pub(super) rows: i64,
    pub(super) cols: i64,
    pub(super) ldx: i64,
    pub(super) ldy: i64,
    pub(super) ignore_index: i64,
    pub(super) chunk: i64,
    pub(super) nchunks: i64,
    pub(super) fchunks: i64,
    pub(super) eps: f32,
    pub(super) z: f32,
    pub(super) scale: f32,
    pub(super) flags: i32,
}

pub(super) const FLAG_VEC: i32 = 1;
pub(super) const FLAG_GRAD: i32 = 2;
pub(super) const FLAG_TGT64: i32 = 4;
pub(super) const FLAG_MEAN: i32 = 8;

pub(super) struct Launcher<'a> {
    pub(super) module: &'a Module,
    pub(super) stream: sys::CUstream,
}

impl Launcher<'_> {
    /// Launches with `smem` bytes of dynamic shared memory, raising the kernel's limit first
    /// when it is above the default 48 KiB.
    pub(super) fn launch_smem(
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
    pub(super) fn allow_cluster16(&self, name: &'static str) -> Result<(), String> {
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

    pub(super) fn launch(
        &self,
        name: &'static str,
        grid: i64,
        block: u32,
        p: &Params,
    ) -> Result<(), String> {
        self.launch_with(name, grid, block, 0, p)
    }

    pub(super) fn launch_with(
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
pub(super) struct Scratch {
    pub(super) ptr: u64,
    pub(super) stream: sys::CUstream,
}

impl Scratch {
    pub(super) fn new(bytes: usize, stream: sys::CUstream) -> Result<Scratch, String> {
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
pub(super) fn block_threads(cols: i64, vec_width: i64) -> u32 {
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

pub(super) fn check_rows(what: &str, r: &Rows) -> Result<(), String> {
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

pub(super) fn vec_ok(dtype: DType, x: &Rows, y: Option<(u64, i64)>) -> bool {
    let es = dtype.size() as i64;
    match y {
        None => true,
        Some((yp, ldy)) => {
            (x.ptr.wrapping_sub(yp)) % 16 == 0 && ((x.ld - ldy) * es).rem_euclid(16) == 0
        }
    }
}

/// Runs tier `tier` of kernel family `fam` (`"lse"`, `"softmax"`, `"log_softmax"`, `"xent"`).
pub(super) fn run_rows(
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
