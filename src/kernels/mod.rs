//! Entry points over a [`Batch`]: log-sum-exp, softmax and log_softmax, two-pass or online.
//!
//! Each reduction of the batch is a *lane* `l in 0..outer*inner` (`o = l / inner`,
//! `j = l % inner`), read at `o * outer_stride + j + k * inner`. Outputs are dense: `out[l]`
//! for log-sum-exp, `(outer, n, inner)` C order for softmax. Lanes are independent and rows
//! longer than [`LONG_ROW_BLOCK`]` * 2` are cut into fixed blocks whose states merge in block
//! order, so every result is bit-identical for any thread count.

pub mod scalar;

use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::state::LseState;

/// Rows at least twice this long are split into blocks of this many elements, reduced in
/// parallel and merged in order.
pub const LONG_ROW_BLOCK: usize = 1 << 16;

/// How a lane's `(max, excess)` state is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Pick by row length (currently: two-pass).
    #[default]
    Auto,
    /// Max pass, then exp-sum pass.
    TwoPass,
    /// One pass with a running max (Milakov & Gimelshein 2018).
    Online,
}

impl Algorithm {
    /// Parses `"auto"`, `"two_pass"` or `"online"`.
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "auto" => Some(Algorithm::Auto),
            "two_pass" | "two-pass" => Some(Algorithm::TwoPass),
            "online" => Some(Algorithm::Online),
            _ => None,
        }
    }
}

/// Which normalisation a softmax-like kernel writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Softmax,
    LogSoftmax,
}

#[derive(Clone, Copy)]
struct Lane {
    start: usize,
    stride: usize,
}

#[inline]
fn lane(batch: &Batch, l: usize) -> Lane {
    let (o, j) = (l / batch.inner, l % batch.inner);
    Lane {
        start: o * batch.outer_stride + j,
        stride: batch.inner,
    }
}

/// The state of `n` elements of a lane starting at element offset `first` of the lane.
///
/// # Safety
/// The lane must lie inside the buffer behind `x`.
unsafe fn lane_state<T: Real>(
    x: *const T,
    ln: Lane,
    first: usize,
    n: usize,
    alg: Algorithm,
) -> LseState {
    let start = ln.start + first * ln.stride;
    // SAFETY: forwarded from the caller.
    unsafe {
        match alg {
            Algorithm::Online => scalar::lse_state_online(x, start, n, ln.stride),
            Algorithm::Auto | Algorithm::TwoPass => {
                scalar::lse_state_two_pass(x, start, n, ln.stride)
            }
        }
    }
}

/// The full state of a lane; long rows are blocked and merged in block order (parallel).
///
/// # Safety
/// As [`lane_state`].
unsafe fn full_lane_state<T: Real>(
    x: *const T,
    batch: &Batch,
    ln: Lane,
    alg: Algorithm,
) -> LseState {
    let n = batch.n;
    if n < 2 * LONG_ROW_BLOCK {
        // SAFETY: forwarded from the caller.
        return unsafe { lane_state(x, ln, 0, n, alg) };
    }
    let blocks = n.div_ceil(LONG_ROW_BLOCK);
    let xp = SendPtr(x as *mut T);
    let states = parallel::map_collect(blocks, LONG_ROW_BLOCK, |b| {
        let first = b * LONG_ROW_BLOCK;
        let len = LONG_ROW_BLOCK.min(n - first);
        // SAFETY: the block lies inside the lane.
        unsafe { lane_state(xp.ptr() as *const T, ln, first, len, alg) }
    });
    states
        .into_iter()
        .fold(LseState::EMPTY, |acc, s| acc.merge(s))
}

/// Calls `f(l, state)` for every lane with its finished state, in parallel pieces.
fn for_each_lane_state<T: Real, F>(x: &[T], batch: &Batch, alg: Algorithm, f: F)
where
    F: Fn(usize, LseState) + Sync + Send,
{
    let lanes = batch.count();
    let xp = SendPtr(x.as_ptr() as *mut T);
    let long = batch.n >= 2 * LONG_ROW_BLOCK;
    let run = |range: std::ops::Range<usize>| {
        for l in range {
            // SAFETY: the batch was checked against the slice length.
            let state =
                unsafe { full_lane_state(xp.ptr() as *const T, batch, lane(batch, l), alg) };
            f(l, state);
        }
    };
    if long {
        // Parallelism comes from the blocks of each row.
        run(0..lanes);
    } else {
        parallel::for_each_piece(lanes, batch.n.max(1), run);
    }
}

/// The `(max, excess)` state of every lane, written to `out` (length `batch.count()`).
/// This is what streaming accumulators and Dask chunks keep and merge.
pub fn lse_states<T: Real>(
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    out: &mut [LseState],
) -> Result<(), String> {
    batch.check(x.len())?;
    check_out(out.len(), batch.count())?;
    let op = SendPtr(out.as_mut_ptr());
    for_each_lane_state(x, &batch, alg, |l, s| {
        // SAFETY: lane l owns out[l]; lanes are distinct.
        unsafe { *op.ptr().add(l) = s };
    });
    Ok(())
}

/// `log(sum(exp(x)))` of every lane into `out` (length `batch.count()`).
pub fn logsumexp<T: Real>(
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    out: &mut [T],
) -> Result<(), String> {
    batch.check(x.len())?;
    check_out(out.len(), batch.count())?;
    let op = SendPtr(out.as_mut_ptr());
    for_each_lane_state(x, &batch, alg, |l, s| {
        // SAFETY: lane l owns out[l]; lanes are distinct.
        unsafe { *op.ptr().add(l) = T::from_f64(s.logsumexp()) };
    });
    Ok(())
}

/// scipy's weighted log-sum-exp (`b` laid out by `bbatch`, same `outer`/`n`/`inner` as
/// `batch`, `outer_stride` may be 0 to broadcast) into `out`, and the sign into `sign`.
pub fn logsumexp_weighted<T: Real>(
    a: &[T],
    batch: Batch,
    b: &[T],
    bbatch: Batch,
    out: &mut [T],
    sign: Option<&mut [T]>,
) -> Result<(), String> {
    batch.check(a.len())?;
    bbatch.check(b.len())?;
    if (bbatch.outer, bbatch.n, bbatch.inner) != (batch.outer, batch.n, batch.inner) {
        return Err(format!(
            "b batch {bbatch:?} does not match a batch {batch:?}"
        ));
    }
    check_out(out.len(), batch.count())?;
    let return_sign = sign.is_some();
    let sp = match sign {
        Some(s) => {
            check_out(s.len(), batch.count())?;
            Some(SendPtr(s.as_mut_ptr()))
        }
        None => None,
    };
    let (ap, bp, op) = (
        SendPtr(a.as_ptr() as *mut T),
        SendPtr(b.as_ptr() as *mut T),
        SendPtr(out.as_mut_ptr()),
    );
    parallel::for_each_piece(batch.count(), 2 * batch.n.max(1), |range| {
        for l in range {
            let (la, lb) = (lane(&batch, l), lane(&bbatch, l));
            // SAFETY: both batches were checked against their slices; lane l owns out[l].
            unsafe {
                let (v, s) = scalar::logsumexp_weighted_lane(
                    ap.ptr() as *const T,
                    la.start,
                    la.stride,
                    bp.ptr() as *const T,
                    lb.start,
                    lb.stride,
                    batch.n,
                    return_sign,
                );
                *op.ptr().add(l) = v;
                if let Some(sp) = sp {
                    *sp.ptr().add(l) = s;
                }
            }
        }
    });
    Ok(())
}

/// Softmax or log_softmax of every lane of `x` into the dense `(outer, n, inner)` `out`.
pub fn softmax_like<T: Real>(
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    out: &mut [T],
) -> Result<(), String> {
    batch.check(x.len())?;
    check_out(out.len(), batch.elements())?;
    // SAFETY: x and out are distinct borrows, both checked against the batch.
    unsafe { softmax_like_raw(x.as_ptr(), batch, alg, what, out.as_mut_ptr()) };
    Ok(())
}

/// Softmax or log_softmax in place over a dense `(outer, n, inner)` buffer.
pub fn softmax_like_inplace<T: Real>(
    buf: &mut [T],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
) -> Result<(), String> {
    if !batch.is_contiguous() {
        return Err("an in-place softmax needs a contiguous batch".into());
    }
    batch.check(buf.len())?;
    let p = buf.as_mut_ptr();
    // SAFETY: every kernel reads element k of a lane before writing element k of the same lane,
    // and the lane's state is complete before its first write.
    unsafe { softmax_like_raw(p as *const T, batch, alg, what, p) };
    Ok(())
}

/// # Safety
/// `x` holds `batch`; `out` holds `batch.elements()` elements; `out` is either disjoint from
/// `x` or equal to it with a contiguous batch.
unsafe fn softmax_like_raw<T: Real>(
    x: *const T,
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    out: *mut T,
) {
    let (xp, op) = (SendPtr(x as *mut T), SendPtr(out));
    let n = batch.n;
    let write = move |ln: Lane, l: usize, first: usize, len: usize, state: LseState| {
        let (o, j) = (l / batch.inner, l % batch.inner);
        let ostart = o * n * batch.inner + j + first * batch.inner;
        let start = ln.start + first * ln.stride;
        // SAFETY: the caller's contract; each (lane, block) writes only its own elements.
        unsafe {
            match what {
                Reduction::Softmax => scalar::softmax_write(
                    xp.ptr() as *const T,
                    start,
                    ln.stride,
                    op.ptr(),
                    ostart,
                    batch.inner,
                    len,
                    state,
                ),
                Reduction::LogSoftmax => scalar::log_softmax_write(
                    xp.ptr() as *const T,
                    start,
                    ln.stride,
                    op.ptr(),
                    ostart,
                    batch.inner,
                    len,
                    state,
                ),
            }
        }
    };
    if n >= 2 * LONG_ROW_BLOCK {
        let blocks = n.div_ceil(LONG_ROW_BLOCK);
        for l in 0..batch.count() {
            let ln = lane(&batch, l);
            // SAFETY: the lane lies inside x.
            let state = unsafe { full_lane_state(xp.ptr() as *const T, &batch, ln, alg) };
            parallel::for_each_piece(blocks, LONG_ROW_BLOCK, |range| {
                for b in range {
                    let first = b * LONG_ROW_BLOCK;
                    write(ln, l, first, LONG_ROW_BLOCK.min(n - first), state);
                }
            });
        }
        return;
    }
    parallel::for_each_piece(batch.count(), 2 * n.max(1), |range| {
        for l in range {
            let ln = lane(&batch, l);
            // SAFETY: the lane lies inside x; its state is complete before any write.
            let state = unsafe { lane_state(xp.ptr() as *const T, ln, 0, n, alg) };
            write(ln, l, 0, n, state);
        }
    });
}

/// The `(max, excess)` state of one contiguous row, at the process's SIMD level.
/// The row primitive that the losses and the streaming accumulator build on.
pub fn row_state<T: Real>(x: &[T], alg: Algorithm) -> LseState {
    // SAFETY: the lane is the whole slice.
    unsafe {
        full_lane_state(
            x.as_ptr(),
            &Batch::rows(1, x.len()),
            Lane {
                start: 0,
                stride: 1,
            },
            alg,
        )
    }
}

/// `out[k] = scale * exp(x[k] - shift)` over one contiguous row, at the process's SIMD level:
/// the write pass of softmax (`shift = max`, `scale = 1 / S`) and of the loss gradients.
pub fn row_exp_scaled<T: Real>(x: &[T], shift: f64, scale: f64, out: &mut [T]) {
    assert_eq!(
        x.len(),
        out.len(),
        "row_exp_scaled: x and out differ in length"
    );
    for (o, &v) in out.iter_mut().zip(x) {
        *o = T::from_f64(scale * (v.to_f64() - shift).exp());
    }
}

fn check_out(len: usize, need: usize) -> Result<(), String> {
    if len != need {
        return Err(format!("output holds {len} elements, expected {need}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
