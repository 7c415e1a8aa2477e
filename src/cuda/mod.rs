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
//!
//! Modules: `driver` loads libcuda, owns the per-device context and the compiled modules;
//! `launch` is the launch policy (the `Params` block the kernels read, which tier runs a row
//! of a given length, stream-ordered scratch); `ops` are the entry points, one per operation.

mod driver;
mod launch;
pub mod nvrtc;
mod ops;
#[cfg(test)]
mod tests;

pub use driver::{
    compile_for_arch, device_count, device_info, driver_version, is_available, kernel_source,
    DType, DeviceInfo, ROWS_CU,
};
pub use launch::{choose_tier, Tier, TierFacts};
pub use ops::{
    cross_entropy, rows_op, LossReduction, Place, RowOp, Rows, TargetType, Targets, XentOptions,
};
