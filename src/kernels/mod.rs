//! Entry points over a [`Batch`]: log-sum-exp, softmax and log_softmax, two-pass or online.
//!
//! Each reduction of the batch is a *lane* `l in 0..outer*inner` (`o = l / inner`,
//! `j = l % inner`), read at `o * outer_stride + j + k * inner`. Outputs are dense: `out[l]`
//! for log-sum-exp, `(outer, n, inner)` C order for softmax. Lanes are independent and rows
//! longer than [`LONG_ROW_BLOCK`]` * 2` are cut into fixed blocks whose states merge in block
//! order, so every result is bit-identical for any thread count.
//!
//! Paths, by layout: contiguous rows go to the SIMD row kernels of [`crate::simd`] (rows of up
//! to [`simd::short_row_limit`] elements to the short-row kernels, one row per vector lane, on
//! every SIMD level); column batches (`inner > 1`) to the column kernel, `COL_TILE` columns
//! per streaming pass; other strided lanes to the scalar reference. The `*_at` functions take
//! the SIMD level explicitly (tests, benches); the others use [`simd::level()`].

mod blocking;
pub mod complex;
pub mod cross_entropy;
pub mod from_states;
pub mod masked;
mod segment_scatter;
pub mod segments;
pub mod vjp;

/// The scalar reference kernels (they live with the scalar SIMD level).
pub use crate::simd::scalar;

use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd::{self, Ahead, Level};
use crate::state::LseState;
use std::ptr::null;

/// Rows at least twice this long are split into blocks of this many elements, reduced in
/// parallel and merged in order.
pub const LONG_ROW_BLOCK: usize = 1 << 16;

/// Softmax outputs of at least this many bytes are written with non-temporal stores.
pub const STREAM_BYTES: usize = 64 << 20;

/// Rows shorter than this many bytes are never streamed: each streamed row ends with a store
/// fence and starts and ends on partial cache lines, which costs more than the
/// read-for-ownership traffic it saves (float32 softmax on rows of 100 ran at half the speed
/// of cached stores).
pub const STREAM_ROW_BYTES: usize = 4 << 10;

/// Whether the rows of `batch` are written with non-temporal stores: the output is far larger
/// than the last-level cache (it will not be read back from there) and each row is long
/// enough for whole streamed lines to outweigh its fence.
pub fn streams<T>(batch: &Batch) -> bool {
    let size = std::mem::size_of::<T>();
    batch.elements() * size >= STREAM_BYTES && batch.n * size >= STREAM_ROW_BYTES
}

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

/// Where row `l + 1` of a row batch (`inner == 1`) starts when it is below `end` (a thread's
/// piece reads it after row `l`), else null: the row kernels hint it into cache while they
/// compute row `l` ([`simd::row_state`]). Only an address: nothing is read here.
pub(crate) fn next_row<T>(x: *mut T, batch: &Batch, l: usize, end: usize) -> *const T {
    if batch.inner == 1 && l + 1 < end {
        x.wrapping_add(lane(batch, l + 1).start)
    } else {
        null()
    }
}

/// The state of `n` elements of a lane starting at element offset `first` of the lane.
/// Contiguous lanes (rows) run at `level`, hinting the row at `next` (null for none, else the
/// row this thread reads next) into cache as [`simd::row_state`] does; strided single lanes
/// use the scalar reference.
///
/// # Safety
/// The lane must lie inside the buffer behind `x`; `level` must be available.
unsafe fn lane_state<T: Real>(
    level: Level,
    x: *const T,
    ln: Lane,
    (first, n): (usize, usize),
    alg: Algorithm,
    next: *const T,
) -> LseState {
    let start = ln.start + first * ln.stride;
    // SAFETY: forwarded from the caller.
    unsafe {
        if ln.stride == 1 {
            let online = alg == Algorithm::Online;
            return simd::row_state(level, x.add(start), n, online, Ahead::row(next));
        }
        match alg {
            Algorithm::Online => scalar::lse_state_online(x, start, n, ln.stride),
            Algorithm::Auto | Algorithm::TwoPass => {
                scalar::lse_state_two_pass(x, start, n, ln.stride)
            }
        }
    }
}

/// The full state of a lane; long rows are blocked and merged in block order, the blocks in
/// parallel with `split` (else in turn: the caller runs rows in parallel,
/// [`long_rows_in_parallel`]). `next` as in [`lane_state`] (unused by long rows, which
/// stream).
///
/// # Safety
/// As [`lane_state`].
unsafe fn full_lane_state<T: Real>(
    level: Level,
    x: *const T,
    batch: &Batch,
    (ln, split): (Lane, bool),
    alg: Algorithm,
    next: *const T,
) -> LseState {
    let n = batch.n;
    if n < 2 * LONG_ROW_BLOCK {
        // SAFETY: forwarded from the caller.
        return unsafe { lane_state(level, x, ln, (0, n), alg, next) };
    }
    let blocks = n.div_ceil(LONG_ROW_BLOCK);
    let xp = SendPtr(x as *mut T);
    let block = |b: usize| {
        let first = b * LONG_ROW_BLOCK;
        let len = LONG_ROW_BLOCK.min(n - first);
        // SAFETY: the block lies inside the lane.
        unsafe { lane_state(level, xp.ptr() as *const T, ln, (first, len), alg, null()) }
    };
    let merge = |acc: LseState, s: LseState| acc.merge(s);
    if split {
        let states = parallel::map_collect(blocks, LONG_ROW_BLOCK, block);
        states.into_iter().fold(LseState::EMPTY, merge)
    } else {
        (0..blocks).map(block).fold(LseState::EMPTY, merge)
    }
}

/// Whether `rows` rows of at least `2 * LONG_ROW_BLOCK` elements run a row per task, each
/// row's blocks in turn, rather than one row after another with its blocks in parallel:
/// where there are rows enough to keep every thread busy (at most a quarter of a thread's
/// share left over). Both merge the same blocks in the same order (the same bits); a row a
/// task saves the pool's wake-ups for every row (float32 rows of 2^17 from DRAM, 2 threads,
/// ns per element: logsumexp 0.31-0.35 -> 0.21, softmax `out=` 0.67-0.87 -> 0.51,
/// log_softmax `out=` 0.57-0.72 -> 0.31).
fn long_rows_in_parallel(rows: usize) -> bool {
    rows >= 4 * parallel::num_threads()
}

/// Calls `f(l, states)` with the finished states of lanes `l..l + states.len()`, every lane
/// once, in parallel pieces. Column batches (`inner > 1`) go through the column kernel,
/// `COL_TILE` lanes at a time; rows come in runs of up to 64.
fn for_each_lane_state<T: Real, F>(level: Level, x: &[T], batch: &Batch, alg: Algorithm, f: F)
where
    F: Fn(usize, &[LseState]) + Sync + Send,
{
    let lanes = batch.count();
    let xp = SendPtr(x.as_ptr() as *mut T);
    if batch.inner > 1 && batch.n > 0 {
        // SAFETY: the batch was checked against the slice length.
        unsafe { for_each_column_state(level, x.as_ptr(), None, batch, 0..batch.inner, f) };
        return;
    }
    let in_parallel = batch.n < 2 * LONG_ROW_BLOCK || long_rows_in_parallel(lanes);
    let run = |range: std::ops::Range<usize>| {
        // Runs of up to 64 lanes' states, so that `f` can finish them a vector at a time.
        let mut states = [LseState::EMPTY; 64];
        let mut first = range.start;
        while first < range.end {
            let k = (range.end - first).min(states.len());
            for (j, s) in states[..k].iter_mut().enumerate() {
                let l = lane(batch, first + j);
                let next = next_row(xp.ptr(), batch, first + j, range.end);
                let ln = (l, !in_parallel);
                // SAFETY: the batch was checked against the slice length.
                *s = unsafe { full_lane_state(level, xp.ptr() as *const T, batch, ln, alg, next) };
            }
            f(first, &states[..k]);
            first += k;
        }
    };
    if in_parallel {
        parallel::for_each_piece(lanes, batch.n.max(1), run);
    } else {
        // Parallelism comes from the blocks of each row.
        run(0..lanes);
    }
}

/// [`for_each_lane_state`] of a column batch (`inner > 1`) over its columns `cols` of every
/// slab: the column kernel, `COL_TILE` lanes at a time, in parallel pieces, `f(l, states)`
/// with `l = o * cols.len() + (j - cols.start)` for slab `o` and column `j`; with `keep` (mask
/// bytes laid out as `x`) over the elements it keeps, the others read as `-inf`.
///
/// # Safety
/// The batch's elements readable at `x` (and at `keep`); `cols` within `0..batch.inner`.
unsafe fn for_each_column_state<T: Real, F>(
    level: Level,
    x: *const T,
    keep: Option<*const u8>,
    batch: &Batch,
    cols: std::ops::Range<usize>,
    f: F,
) where
    F: Fn(usize, &[LseState]) + Sync + Send,
{
    let (xp, kp) = (SendPtr(x as *mut T), keep.map(|k| SendPtr(k as *mut u8)));
    let width = cols.len();
    let tiles = width.div_ceil(simd::COL_TILE);
    let run = |range: std::ops::Range<usize>| {
        let mut states = vec![LseState::EMPTY; simd::COL_TILE];
        for item in range {
            let (o, t) = (item / tiles, item % tiles);
            let j0 = t * simd::COL_TILE;
            let w = simd::COL_TILE.min(width - j0);
            let at = o * batch.outer_stride + cols.start + j0;
            // SAFETY: the tile's w columns of slab o lie inside the batch (the caller's).
            unsafe {
                let p = (xp.ptr() as *const T).add(at);
                let k = kp.map(|k| (k.ptr() as *const u8).add(at));
                simd::column_states(level, p, k, batch.n, batch.inner, w, &mut states);
            }
            f(o * width + j0, &states[..w]);
        }
    };
    parallel::for_each_piece(batch.outer * tiles, batch.n * simd::COL_TILE, run);
}

/// The states of every column of `batch` (`inner > 1`) over the elements `keep` (laid out as
/// `x`) keeps, `f(l, states)` for lanes `l..l + states.len()`: `x` and the mask read where
/// they are by the column kernel, each masked element read as `-inf`, so the states are those
/// of `x` with its masked elements at `-inf` bit for bit.
pub fn kept_column_states<T: Real>(
    x: &[T],
    keep: &[u8],
    batch: Batch,
    f: impl Fn(usize, &[LseState]) + Sync + Send,
) -> Result<(), String> {
    batch.check(x.len())?;
    batch.check(keep.len())?;
    if batch.inner < 2 {
        return Err(format!(
            "kept_column_states needs columns, got inner {}",
            batch.inner
        ));
    }
    if batch.n > 0 {
        // SAFETY: the batch was checked against both slices.
        unsafe {
            let k = Some(keep.as_ptr());
            for_each_column_state(simd::level(), x.as_ptr(), k, &batch, 0..batch.inner, f)
        };
    } else {
        let empty = [LseState::EMPTY; 64];
        for l in (0..batch.count()).step_by(empty.len()) {
            f(l, &empty[..empty.len().min(batch.count() - l)]);
        }
    }
    Ok(())
}

/// [`kept_column_states`] finished into `log(sum(exp))` of every lane, written to `out`
/// (length `batch.count()`).
pub fn kept_column_logsumexp<T: Real>(
    x: &[T],
    keep: &[u8],
    batch: Batch,
    out: &mut [T],
) -> Result<(), String> {
    check_out(out.len(), batch.count())?;
    let (level, op) = (simd::level(), SendPtr(out.as_mut_ptr()));
    kept_column_states(x, keep, batch, |l, s| {
        // SAFETY: lanes l..l + s.len() own their entries of out; runs are disjoint.
        unsafe { simd::states_logsumexp(level, s, op.ptr().add(l)) };
    })
}

/// The `(max, excess)` state of every lane, written to `out` (length `batch.count()`).
/// This is what streaming accumulators and Dask chunks keep and merge, and what a loss over
/// a batch of rows starts from: rows of up to [`simd::short_row_limit`] elements take the
/// short-row kernels (a vector of rows at a time, no per-row reductions or tails).
pub fn lse_states<T: Real>(
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    out: &mut [LseState],
) -> Result<(), String> {
    lse_states_at(simd::level(), x, batch, alg, out)
}

/// [`lse_states`] at an explicit SIMD level (tests and benchmarks).
pub fn lse_states_at<T: Real>(
    level: Level,
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    out: &mut [LseState],
) -> Result<(), String> {
    check_level(level)?;
    batch.check(x.len())?;
    check_out(out.len(), batch.count())?;
    let op = SendPtr(out.as_mut_ptr());
    if is_short::<T>(level, &batch) {
        let xp = SendPtr(x.as_ptr() as *mut T);
        for_each_row_group(&batch, |r0, rows| {
            // SAFETY: rows r0..r0+rows lie inside x (checked); they own out[r0..r0+rows].
            unsafe {
                let p = (xp.ptr() as *const T).add(r0 * batch.outer_stride);
                let o = std::slice::from_raw_parts_mut(op.ptr().add(r0), rows);
                simd::short_rows_states(level, p, rows, batch.n, batch.outer_stride, o);
            }
        });
        return Ok(());
    }
    for_each_lane_state(level, x, &batch, alg, |l, s| {
        // SAFETY: lanes l..l + s.len() own their entries of out; runs are disjoint.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), op.ptr().add(l), s.len()) };
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
    logsumexp_at(simd::level(), x, batch, alg, out)
}

/// [`logsumexp`] at an explicit SIMD level (tests and benchmarks).
pub fn logsumexp_at<T: Real>(
    level: Level,
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    out: &mut [T],
) -> Result<(), String> {
    check_level(level)?;
    batch.check(x.len())?;
    check_out(out.len(), batch.count())?;
    let op = SendPtr(out.as_mut_ptr());
    if is_short::<T>(level, &batch) {
        let xp = SendPtr(x.as_ptr() as *mut T);
        for_each_row_group(&batch, |r0, rows| {
            // SAFETY: rows r0..r0+rows lie inside x (checked); they own out[r0..r0+rows].
            unsafe {
                let p = (xp.ptr() as *const T).add(r0 * batch.outer_stride);
                let o = op.ptr().add(r0);
                simd::short_rows_logsumexp(level, p, rows, batch.n, batch.outer_stride, o);
            }
        });
        return Ok(());
    }
    for_each_lane_state(level, x, &batch, alg, |l, s| {
        // SAFETY: lanes l..l + s.len() own their entries of out; runs are disjoint.
        unsafe { simd::states_logsumexp(level, s, op.ptr().add(l)) };
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
    softmax_like_at(simd::level(), x, batch, alg, what, out)
}

/// [`softmax_like`] at an explicit SIMD level (tests and benchmarks).
pub fn softmax_like_at<T: Real>(
    level: Level,
    x: &[T],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    out: &mut [T],
) -> Result<(), String> {
    check_level(level)?;
    batch.check(x.len())?;
    check_out(out.len(), batch.elements())?;
    // SAFETY: x and out are distinct borrows, both checked against the batch.
    unsafe { softmax_like_raw(level, x.as_ptr(), batch, alg, what, out.as_mut_ptr()) };
    Ok(())
}

/// Softmax or log_softmax in place over a dense `(outer, n, inner)` buffer.
pub fn softmax_like_inplace<T: Real>(
    buf: &mut [T],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
) -> Result<(), String> {
    softmax_like_inplace_at(simd::level(), buf, batch, alg, what)
}

/// [`softmax_like_inplace`] at an explicit SIMD level (tests and benchmarks).
pub fn softmax_like_inplace_at<T: Real>(
    level: Level,
    buf: &mut [T],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
) -> Result<(), String> {
    check_level(level)?;
    if !batch.is_contiguous() {
        return Err("an in-place softmax needs a contiguous batch".into());
    }
    batch.check(buf.len())?;
    let p = buf.as_mut_ptr();
    // SAFETY: every kernel reads element k of a lane before writing element k of the same lane,
    // and the lane's state is complete before its first write.
    unsafe { softmax_like_raw(level, p as *const T, batch, alg, what, p) };
    Ok(())
}

/// # Safety
/// `x` holds `batch`; `out` holds `batch.elements()` elements; `out` is either disjoint from
/// `x` or equal to it with a contiguous batch; `level` is available.
unsafe fn softmax_like_raw<T: Real>(
    level: Level,
    x: *const T,
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    out: *mut T,
) {
    let (xp, op) = (SendPtr(x as *mut T), SendPtr(out));
    let n = batch.n;
    if batch.inner > 1 {
        // SAFETY: forwarded from the caller.
        unsafe { softmax_like_columns(level, xp, None, batch, what, op) };
        return;
    }
    let log = what == Reduction::LogSoftmax;
    if is_short_for::<T>(level, &batch, what, alg) {
        for_each_row_group(&batch, |r0, rows| {
            // SAFETY: rows r0..r0+rows lie inside x and own their outputs; in place means
            // out == x with pitch n, and each row is read before it is written.
            unsafe {
                let p = (xp.ptr() as *const T).add(r0 * batch.outer_stride);
                let o = op.ptr().add(r0 * n);
                simd::short_rows_softmax(level, p, rows, n, batch.outer_stride, o, log);
            }
        });
        return;
    }
    let stream = streams::<T>(&batch);
    // Writes elements first..first+len of row l from its finished state. Each output is
    // written once; elements are read before they are written (in place is fine).
    let write = move |l: usize, (first, len): (usize, usize), state: LseState, next| {
        let ln = lane(&batch, l);
        // SAFETY: the caller's contract; each (row, block) writes only its own elements.
        unsafe {
            let xr = (xp.ptr() as *const T).add(ln.start + first);
            let or = op.ptr().add(l * n + first);
            write_row(level, (xr, next), or, len, state, what, stream);
        }
    };
    if what == Reduction::LogSoftmax && level != Level::Scalar && n < 2 * LONG_ROW_BLOCK {
        // Short rows eight at a time: their states, their log totals in one vector, then
        // their writes (a log1p per row, waited on before its write, took 40% of the time of
        // rows of 100); longer rows, whose eight would leave L1 before their writes, one by
        // one. Writing each chunk only after the next one's states (so that no write waits
        // on its log1p) measured no faster.
        let chunk = log_total_chunk::<T>(n);
        parallel::for_each_piece(batch.count(), 2 * n.max(1), |range| {
            let (mut states, mut logs) = ([LseState::EMPTY; 8], [0.0; 8]);
            for r0 in range.clone().step_by(chunk) {
                let rows = r0..(r0 + chunk).min(range.end);
                let k = rows.len();
                for (s, l) in states.iter_mut().zip(rows.clone()) {
                    // Rows one at a time hint the next one; rows in eights, read in runs the
                    // hardware prefetchers follow, hint nothing (hinting each row's place in
                    // the next eight: rows of 300 0.40 -> 0.45 ns per element).
                    let next = if chunk == 1 {
                        next_row(xp.ptr(), &batch, l, range.end)
                    } else {
                        null()
                    };
                    // SAFETY: the lane lies inside x.
                    *s = unsafe {
                        lane_state(
                            level,
                            xp.ptr() as *const T,
                            lane(&batch, l),
                            (0, n),
                            alg,
                            next,
                        )
                    };
                }
                // SAFETY: the level is available (checked by the caller).
                unsafe { simd::states_log_totals::<T>(level, &states[..k], &mut logs[..k]) };
                for ((l, s), lt) in rows.zip(states).zip(logs) {
                    let ln = lane(&batch, l);
                    // SAFETY: as `write`: row l's elements and outputs are its own, and every
                    // row of the chunk is read (its state) before any of them is written.
                    unsafe {
                        let xr = ((xp.ptr() as *const T).add(ln.start), null());
                        write_row_with(level, xr, op.ptr().add(l * n), n, s, lt, what, stream);
                    }
                }
            }
        });
        return;
    }
    if n >= 2 * LONG_ROW_BLOCK {
        let blocks = n.div_ceil(LONG_ROW_BLOCK);
        let block = |b: usize| {
            (
                b * LONG_ROW_BLOCK,
                LONG_ROW_BLOCK.min(n - b * LONG_ROW_BLOCK),
            )
        };
        // SAFETY: the lane lies inside x.
        let state = |l: usize, split: bool| unsafe {
            let ln = (lane(&batch, l), split);
            full_lane_state(level, xp.ptr() as *const T, &batch, ln, alg, null())
        };
        if long_rows_in_parallel(batch.count()) {
            parallel::for_each_piece(batch.count(), n, |range| {
                for l in range {
                    let s = state(l, false);
                    (0..blocks).for_each(|b| write(l, block(b), s, null()));
                }
            });
        } else {
            for l in 0..batch.count() {
                let s = state(l, true);
                parallel::for_each_piece(blocks, LONG_ROW_BLOCK, |range| {
                    range.for_each(|b| write(l, block(b), s, null()));
                });
            }
        }
        return;
    }
    // Softmax rows in cache keep their exps for the write (one exp per element instead of
    // two), in the thread's float64 scratch; without the scratch they take the two-exp path.
    let stored = what == Reduction::Softmax
        && alg != Algorithm::Online
        && level != Level::Scalar
        && n <= simd::STORED_ROW;
    parallel::for_each_piece(batch.count(), 2 * n.max(1), |range| {
        with_exp_scratch(if stored { n } else { 0 }, |scratch| {
            for l in range.clone() {
                let ln = lane(&batch, l);
                let next = next_row(xp.ptr(), &batch, l, range.end);
                if let (Some(e), 1) = (scratch, ln.stride) {
                    // SAFETY: the lane's n elements lie inside x, row l's n outputs are its
                    // own (in place: the same elements), and the scratch holds n float64.
                    let done = unsafe {
                        let xr = (xp.ptr() as *const T).add(ln.start);
                        let or = op.ptr().add(l * n);
                        simd::softmax_stored(level, xr, Ahead::row(next), null(), or, n, e, stream)
                    };
                    if done {
                        continue;
                    }
                }
                // SAFETY: the lane lies inside x; its state is complete before any write.
                let state =
                    unsafe { lane_state(level, xp.ptr() as *const T, ln, (0, n), alg, null()) };
                write(l, (0, n), state, next);
            }
        })
    });
}

thread_local! {
    /// Each thread's float64 scratch for the softmax with stored exps (at most
    /// [`simd::STORED_ROW`] entries, kept between calls).
    static EXP_SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with room for `n > 0` float64 from this thread's scratch, or with `None` when
/// `n == 0` or the room cannot be had ([`with_scratch`]).
fn with_exp_scratch<R>(n: usize, f: impl FnOnce(Option<*mut f64>) -> R) -> R {
    if n == 0 {
        return f(None);
    }
    with_scratch(&EXP_SCRATCH, n, |room| f(room.map(|r| r.as_mut_ptr())))
}

/// Runs `f` with the first `n` elements of this thread's scratch `key` (kept between calls;
/// grown, zero-filled, when shorter), or with `None` where the room cannot be had: the
/// allocation failed, or the scratch is already in use on this thread.
fn with_scratch<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    n: usize,
    f: impl FnOnce(Option<&mut [T]>) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < n {
                *v = Vec::new();
                if v.try_reserve_exact(n).is_err() {
                    return f(None);
                }
                v.resize(n, T::default());
            }
            f(Some(&mut v[..n]))
        }
        Err(_) => f(None),
    })
}

/// The most bytes of eight rows that a log_softmax reduces before it writes them (their log
/// totals taken in one vector). Float32 rows from DRAM, one thread, ns per element, one row at
/// a time (the scalar log1p) / eight: 100 elements 0.68 / 0.49, 300 0.44 / 0.38; eight rows
/// of 16 KiB were slower (500 elements 0.47 / 0.58, 1000 in fours 0.40 / 0.47).
const LOG_TOTAL_CHUNK_BYTES: usize = 10 << 10;

/// How many log_softmax rows of `n` elements take their log totals in one vector: eight
/// where eight rows fit [`LOG_TOTAL_CHUNK_BYTES`], else one.
pub(crate) fn log_total_chunk<T>(n: usize) -> usize {
    if 8 * n * std::mem::size_of::<T>() <= LOG_TOTAL_CHUNK_BYTES {
        8
    } else {
        1
    }
}

/// `log S` of a log_softmax row's state for its write ([`log_total_at`]); 0 (unused) for
/// softmax and where the max is not finite.
pub(crate) fn write_log_total<T: Real>(level: Level, s: LseState, what: Reduction) -> f64 {
    if what == Reduction::LogSoftmax && s.max.is_finite() {
        log_total_at::<T>(level, s)
    } else {
        0.0
    }
}

/// Softmax or log_softmax of `n` contiguous elements given the row's finished state.
///
/// # Safety
/// `x` readable and `out` writable for `n` elements, disjoint or equal; `level` available.
pub(crate) unsafe fn write_row<T: Real>(
    level: Level,
    x: (*const T, *const T),
    out: *mut T,
    n: usize,
    state: LseState,
    what: Reduction,
    stream: bool,
) {
    let log_total = write_log_total::<T>(level, state, what);
    // SAFETY: forwarded from the caller.
    unsafe { write_row_with(level, x, out, n, state, log_total, what, stream) }
}

/// [`write_row`] given the state's `log S` for a log_softmax
/// ([`simd::states_log_totals`], the same bits whether taken for one row or many; unused
/// where the max is not finite, and by softmax).
///
/// # Safety
/// As [`write_row`].
#[allow(clippy::too_many_arguments)]
unsafe fn write_row_with<T: Real>(
    level: Level,
    (x, next): (*const T, *const T),
    out: *mut T,
    n: usize,
    state: LseState,
    log_total: f64,
    what: Reduction,
    stream: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if !state.max.is_finite() {
            // scipy's NaN / unshifted semantics live in the reference writers.
            match what {
                Reduction::Softmax => scalar::softmax_write(x, 0, 1, out, 0, 1, n, state),
                Reduction::LogSoftmax => scalar::log_softmax_write(x, 0, 1, out, 0, 1, n, state),
            }
            return;
        }
        match what {
            Reduction::Softmax => {
                let scale = 1.0 / state.total();
                simd::exp_scaled(level, x, Ahead::row(next), out, n, state.max, scale, stream)
            }
            Reduction::LogSoftmax => simd::shift_sub(
                level,
                x,
                Ahead::row(next),
                out,
                n,
                state.max,
                log_total,
                stream,
            ),
        }
    }
}

/// Columns per stripe of the column softmax (`softmax_like_columns`): the per-lane states and
/// write parameters (32 bytes a lane) of one stripe of every slab are its scratch, so that it
/// stays bounded (1 MiB for one slab) however wide the slabs are.
pub const COLUMN_STRIPE: usize = 1 << 15;

/// Softmax-like over column batches, a stripe of at most [`COLUMN_STRIPE`] columns of every
/// slab at a time: the column kernel's states, then a write pass. With `keep` (mask bytes
/// laid out as `x`), over the kept elements: the states of `x` with its masked elements at
/// `-inf`, and 0 (softmax) or `-inf` (log_softmax) written at them. Each lane's values are
/// its own whatever the stripes.
///
/// # Safety
/// As [`softmax_like_raw`], and the batch's mask bytes readable at `keep`, sharing nothing
/// with `out`.
unsafe fn softmax_like_columns<T: Real>(
    level: Level,
    xp: SendPtr<T>,
    keep: Option<SendPtr<u8>>,
    batch: Batch,
    what: Reduction,
    op: SendPtr<T>,
) {
    let (n, inner) = (batch.n, batch.inner);
    if n == 0 {
        return;
    }
    let exp = what == Reduction::Softmax;
    let fill = masked::masked_value::<T>(what).to_f64();
    let stripe = inner.min(COLUMN_STRIPE);
    let mut states = vec![LseState::EMPTY; batch.outer * stripe];
    let (mut b, mut a) = (vec![0.0f64; states.len()], vec![0.0f64; states.len()]);
    for c0 in (0..inner).step_by(stripe) {
        let w = stripe.min(inner - c0);
        let sp = SendPtr(states.as_mut_ptr());
        let collect = |l: usize, s: &[LseState]| {
            // SAFETY: lanes l..l + s.len() own their entries of states; runs are disjoint.
            unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), sp.ptr().add(l), s.len()) };
        };
        let (x, k) = (xp.ptr() as *const T, keep.map(|k| k.ptr() as *const u8));
        // SAFETY: the caller's contract (the batch at x and at keep); the stripe lies in it.
        unsafe { for_each_column_state(level, x, k, &batch, c0..c0 + w, collect) };
        let lanes = batch.outer * w;
        for ((b, a), s) in b.iter_mut().zip(a.iter_mut()).zip(&states[..lanes]) {
            (*b, *a) = write_params::<T>(level, *s, exp);
        }
        let (b, a) = (&b, &a);
        parallel::for_each_piece(batch.outer * n, 2 * w, |range| {
            for item in range {
                let (o, k) = (item / n, item % n);
                // SAFETY: the stripe of row (o, k) of the slab lies inside x and out and is
                // this item's own; the parameters cover the stripe's columns of slab o.
                unsafe {
                    let at = o * batch.outer_stride + k * inner + c0;
                    let xr = (xp.ptr() as *const T).add(at);
                    let or = op.ptr().add((o * n + k) * inner + c0);
                    let (bo, ao) = (b.as_ptr().add(o * w), a.as_ptr().add(o * w));
                    simd::lanes_write(level, xr, or, w, bo, ao, exp);
                    if let Some(kp) = keep {
                        let kr = (kp.ptr() as *const u8).add(at);
                        simd::select_kept(level, or, kr, or, w, fill);
                    }
                }
            }
        });
    }
}

/// Softmax or log_softmax of the columns of `batch` (`inner > 1`) over the elements `keep`
/// (laid out as `x`) keeps, into the dense `out`: `x` and the mask read where they are by the
/// column kernel (the states of `x` with its masked elements at `-inf`), the column write,
/// then 0 (softmax) or `-inf` (log_softmax) at every masked position. The values of the
/// staged block bit for bit.
///
/// # Safety
/// `x` and `keep` hold the batch; `out` is writable for `batch.elements()` dense elements and
/// is `x` itself (a contiguous batch) or disjoint from it; `keep` shares nothing with `out`.
pub unsafe fn kept_column_softmax_like<T: Real>(
    x: *const T,
    keep: *const u8,
    batch: Batch,
    what: Reduction,
    out: *mut T,
) {
    let (xp, kp, op) = (SendPtr(x as *mut T), SendPtr(keep as *mut u8), SendPtr(out));
    // SAFETY: the caller's contract.
    unsafe { softmax_like_columns(simd::level(), xp, Some(kp), batch, what, op) };
}

/// The parameters `(b, a)` of the per-element write from a lane's finished state: softmax
/// `a * exp(x - b)` (`exp`), log_softmax `(x - b) - a` (`a` the log total of
/// [`log_total_at`]). Non-finite states take the reference writers' values: softmax NaN
/// (b = NaN), log_softmax `x - max` (b = 0).
pub(crate) fn write_params<T: Real>(level: Level, s: LseState, exp: bool) -> (f64, f64) {
    params_with(s, exp, || log_total_at::<T>(level, s))
}

/// [`write_params`] with the state's log total (asked only for a finite log_softmax) from
/// `log_total`.
fn params_with(s: LseState, exp: bool, log_total: impl FnOnce() -> f64) -> (f64, f64) {
    match (s.max.is_finite(), exp) {
        (true, true) => (s.max, 1.0 / s.total()),
        (true, false) => (s.max, log_total()),
        (false, true) => (f64::NAN, 1.0),
        (false, false) => (0.0, s.max),
    }
}

/// [`write_params`] of every state as `[b, a]` into `out`, the log totals of a log_softmax
/// taken a block of states at a time (the same bits).
pub(crate) fn write_params_of<T: Real>(
    level: Level,
    states: &[LseState],
    exp: bool,
    out: &mut [[f64; 2]],
) {
    const BLOCK: usize = 256;
    let mut lt = [0.0f64; BLOCK];
    for (ss, os) in states.chunks(BLOCK).zip(out.chunks_mut(BLOCK)) {
        if !exp {
            // SAFETY: the level is the process's.
            unsafe { simd::states_log_totals::<T>(level, ss, &mut lt[..ss.len()]) };
        }
        for ((&s, o), &l) in ss.iter().zip(os).zip(&lt) {
            let (b, a) = params_with(s, exp, || l);
            *o = [b, a];
        }
    }
}

/// The state's `log S`, what a log_softmax of results `T` takes from `x - max`, at `level`
/// (an available one): [`simd::states_log_totals`] of the one state, the bits every
/// log_softmax writer (rows, columns, `where=`) takes.
pub(crate) fn log_total_at<T: Real>(level: Level, s: LseState) -> f64 {
    let mut lt = [0.0];
    // SAFETY: the callers pass an available level (checked at their entry).
    unsafe { simd::states_log_totals::<T>(level, &[s], &mut lt) };
    lt[0]
}

/// The `(max, excess)` state of one contiguous row, at the process's SIMD level.
/// The row primitive that the losses and the streaming accumulator build on.
pub fn row_state<T: Real>(x: &[T], alg: Algorithm) -> LseState {
    row_state_before(x, None, alg)
}

/// [`row_state`] of `x`, hinting `next` (the row the caller reads after it) into cache as
/// it finishes, so that row's loads from DRAM overlap this row's exps: the same bits.
pub fn row_state_before<T: Real>(x: &[T], next: Option<&[T]>, alg: Algorithm) -> LseState {
    let next = next.map_or(null(), |r| r.as_ptr());
    // SAFETY: the lane is the whole slice; simd::level() is available.
    unsafe {
        full_lane_state(
            simd::level(),
            x.as_ptr(),
            &Batch::rows(1, x.len()),
            (
                Lane {
                    start: 0,
                    stride: 1,
                },
                true,
            ),
            alg,
            next,
        )
    }
}

/// [`row_state`] (two-pass) of a row of at most [`simd::STORED_ROW`] elements with each term
/// its sums computed kept in `terms` (`terms.len() >= x.len()`) for a write from them
/// ([`row_scaled_terms`]); the same bits as [`row_state`]. Returns with the state the index
/// from which the kept terms are `exp(x[k] - max)` for the row's max (the write computes the
/// earlier ones again). `None` where the max is not finite, the row is longer or `terms`
/// shorter, and at the scalar level: take [`row_state`] then. With `keep` (a `where=` row,
/// read in place) the masked elements are `-inf`: the staged row's state and terms.
///
/// `next` (ignored with `keep`) is the row the caller reads after this one, hinted into cache
/// as [`row_state_before`] does.
pub fn row_state_stored<T: Real>(
    x: &[T],
    next: Option<&[T]>,
    keep: Option<&[u8]>,
    terms: &mut [f64],
) -> Option<(LseState, usize)> {
    let n = x.len();
    if n > simd::STORED_ROW || terms.len() < n || keep.is_some_and(|k| k.len() < n) {
        return None;
    }
    let kp = keep.map_or(std::ptr::null(), |k| k.as_ptr());
    // SAFETY: x holds n elements, the mask (when given) and terms at least n; the level is
    // available.
    unsafe {
        let row = (x.as_ptr(), Ahead::row(next.map_or(null(), |r| r.as_ptr())));
        simd::row_state_stored(simd::level(), row, kp, n, terms.as_mut_ptr())
    }
}

/// `out[k] = scale * terms[k]` over the shorter of the two: the write of [`row_exp_scaled`]
/// from the terms [`row_state_stored`] kept (the same bits). `stream` asks for non-temporal
/// stores, as [`row_exp_scaled`]'s.
pub fn row_scaled_terms<T: Real>(terms: &[f64], scale: f64, out: &mut [T], stream: bool) {
    let n = terms.len().min(out.len());
    // SAFETY: both slices hold at least n elements and are distinct borrows.
    unsafe {
        let (t, o) = (terms.as_ptr(), out.as_mut_ptr());
        simd::scaled_terms(simd::level(), t, o, (n, scale), stream)
    }
}

/// `out[k] = scale * exp(x[k] - shift)` over one contiguous row, at the process's SIMD level:
/// the write pass of softmax (`shift = max`, `scale = 1 / S`) and of the loss gradients.
/// `stream` asks for non-temporal stores (an output far larger than the caches, not read
/// again soon: [`streams`]) where the level has them.
pub fn row_exp_scaled<T: Real>(x: &[T], shift: f64, scale: f64, out: &mut [T], stream: bool) {
    assert_eq!(
        x.len(),
        out.len(),
        "row_exp_scaled: x and out differ in length"
    );
    // SAFETY: both slices hold x.len() elements and are distinct borrows.
    unsafe {
        simd::exp_scaled(
            simd::level(),
            x.as_ptr(),
            Ahead::NONE,
            out.as_mut_ptr(),
            x.len(),
            shift,
            scale,
            stream,
        )
    };
}

fn check_level(level: Level) -> Result<(), String> {
    if simd::is_available(level) {
        Ok(())
    } else {
        Err(format!(
            "SIMD level {} is not available on this CPU",
            level.name()
        ))
    }
}

/// Whether a row batch takes the short-row kernels (rows in vector lanes).
fn is_short<T: Real>(level: Level, batch: &Batch) -> bool {
    batch.inner == 1
        && batch.n > 0
        && batch.n <= simd::short_row_limit(level, T::FULL)
        && simd::has_short_rows(level, batch.outer_stride)
}

/// [`is_short`] for a softmax-like write: softmax rows longer than
/// [`simd::short_softmax_limit`] take the row kernels (two-pass; the online algorithm keeps
/// the short rows). The one decision for the unmasked, staged and in-place masked paths, so
/// they keep the same bits.
pub(crate) fn is_short_for<T: Real>(
    level: Level,
    batch: &Batch,
    what: Reduction,
    alg: Algorithm,
) -> bool {
    is_short::<T>(level, batch)
        && (what != Reduction::Softmax
            || alg == Algorithm::Online
            || batch.n <= simd::short_softmax_limit(level, T::FULL))
}

/// Calls `f(first_row, rows)` over the batch's rows in pieces of whole groups of 8 rows (a
/// multiple of every level's vector width), in parallel when large enough.
fn for_each_row_group<F>(batch: &Batch, f: F)
where
    F: Fn(usize, usize) + Sync + Send,
{
    let groups = batch.outer.div_ceil(8);
    parallel::for_each_piece(groups, 8 * batch.n, |range| {
        let r0 = range.start * 8;
        let r1 = (range.end * 8).min(batch.outer);
        f(r0, r1 - r0);
    });
}

fn check_out(len: usize, need: usize) -> Result<(), String> {
    if len != need {
        return Err(format!("output holds {len} elements, expected {need}"));
    }
    Ok(())
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod tests;
