//! The operations: row-wise logsumexp / softmax / log_softmax and the fused cross-entropy,
//! each validating its rows and queuing its launches on the caller's stream.

use cudarc::driver::{result, sys};

use super::driver::{derr, device, guard, CtxScope, DType};
use super::launch::{
    check_rows, run_rows, vec_ok, Launcher, Params, Scratch, FLAG_GRAD, FLAG_MEAN, FLAG_TGT64,
    FLAG_VEC,
};
pub use crate::kernels::cross_entropy::LossReduction;

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
