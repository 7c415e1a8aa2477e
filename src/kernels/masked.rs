//! Lanes under a boolean mask (JAX's `where=`): log-sum-exp, states, softmax and log_softmax
//! over the elements the mask keeps, run by the unmasked kernels on a dense scratch block.
//!
//! Semantics are JAX's (`jax.nn.logsumexp` / `softmax` / `log_softmax` with `where=`): masked
//! elements take no part, whatever they hold (a NaN or `+inf` there has no effect); a fully
//! masked lane gives log-sum-exp `-inf` (the empty state), softmax 0 and log_softmax `-inf` at
//! every position; masked positions always get softmax 0 and log_softmax `-inf`. Lanes whose
//! kept elements are all `-inf` behave as the unmasked kernels on those elements (scipy:
//! softmax NaN at the kept positions).
//!
//! How: the caller copies a block of lanes into a dense buffer (the output itself when that is
//! dense, else scratch), hiding the masked elements as it copies with one vector select that
//! reads the mask bytes in registers ([`copy_kept`]; x and the mask are read where they are
//! when dense): a masked element becomes `-inf`, which is exactly "not there" for a
//! log-sum-exp: `exp(-inf - m) = 0` adds nothing to a state, and a lane of only `-inf` has the
//! empty state. The unmasked SIMD kernels then run on the block as they are (log-sum-exp and
//! states need nothing else), and softmax / log_softmax write 0 / `-inf` at the masked
//! positions afterwards (which also fixes fully masked lanes, whose every position is masked).
//! So a lane with every element kept gives the unmasked kernels' values bit for bit, and the
//! blocking (and so every result) is the same for any thread count.
//!
//! The mask is bytes, nonzero = kept (NumPy's bool is one byte; any byte value is read safely).

use super::{is_short, is_short_for, Algorithm, Reduction};
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd::{self, Ahead};
use crate::state::LseState;
use std::ptr::null;

/// `out[k] = keep[k] != 0 ? x[k] : fill` over the shortest of the three: the one select of
/// the kept elements every masked path stages its lanes with (a vector select reading the mask
/// bytes in registers, at the CPU's SIMD level).
pub fn copy_kept<T: Real>(x: &[T], keep: &[u8], out: &mut [T], fill: f64) {
    let n = x.len().min(keep.len()).min(out.len());
    // SAFETY: n elements of each; `out` is a distinct borrow (disjoint from `x`).
    unsafe {
        simd::select_kept(
            simd::level(),
            x.as_ptr(),
            keep.as_ptr(),
            out.as_mut_ptr(),
            n,
            fill,
        )
    }
}

/// `dst[c * dst_stride + r] = (src[r * src_stride + c] != 0) as u8` for `r < rows`,
/// `c < cols`: a block of mask rows turned into columns, as 0 / 1 bytes, by 8x16 tiles
/// ([`simd::mask_tile_8x16`]), the last tile of a dimension overlapping the one before; a
/// block narrower than a tile goes through a padded copy of itself.
pub fn transpose_mask(
    (src, src_stride): (&[u8], usize),
    (dst, dst_stride): (&mut [u8], usize),
    rows: usize,
    cols: usize,
) {
    // Source rows far apart (a mask stored transposed) are lines no prefetcher follows: each
    // group of eight rows hints the lines of the group `AHEAD` rows on.
    const AHEAD: usize = 64;
    for r0 in (0..rows).step_by(8) {
        for r in (r0 + AHEAD..r0 + AHEAD + 8).take_while(|&r| r < rows) {
            simd::prefetch_span(src[r * src_stride..].as_ptr(), cols);
        }
        // The last tile of a row or column longer than a tile overlaps the one before it
        // (the bytes both cover are written twice, alike), so that only a block narrower than
        // a tile takes the padded copy.
        let r0 = if rows >= 8 { r0.min(rows - 8) } else { r0 };
        let h = (rows - r0).min(8);
        for c0 in (0..cols).step_by(16) {
            let c0 = if cols >= 16 { c0.min(cols - 16) } else { c0 };
            let w = (cols - c0).min(16);
            let (s0, d0) = (r0 * src_stride + c0, c0 * dst_stride + r0);
            if h == 8 && w == 16 {
                simd::mask_tile_8x16((&src[s0..], src_stride), (&mut dst[d0..], dst_stride));
                continue;
            }
            let (mut a, mut b) = ([0u8; 128], [0u8; 128]);
            for r in 0..h {
                a[r * 16..r * 16 + w].copy_from_slice(&src[s0 + r * src_stride..][..w]);
            }
            simd::mask_tile_8x16((&a, 16), (&mut b, 8));
            for c in 0..w {
                dst[d0 + c * dst_stride..][..h].copy_from_slice(&b[c * 8..c * 8 + h]);
            }
        }
    }
}

/// `out[k] = fill` wherever `keep[k] == 0`, in place ([`copy_kept`]'s select).
pub fn fill_masked<T: Real>(out: &mut [T], keep: &[u8], fill: T) {
    let n = out.len().min(keep.len());
    let p = out.as_mut_ptr();
    // SAFETY: n elements of each, read and written in place (allowed: equal buffers).
    unsafe { simd::select_kept(simd::level(), p, keep.as_ptr(), p, n, fill.to_f64()) }
}

/// Whether `batch`'s rows are read in place beside their mask, by [`kept_row_states`],
/// [`kept_row_logsumexp`] and [`softmax_like_rows_in_place`] (the one decision): rows
/// (`inner == 1`) that the staged block would run through the short-row kernels, or through
/// the two-pass row kernel one at a time (not online, not split into long-row blocks).
pub fn reads_rows_in_place<T: Real>(batch: &Batch, alg: Algorithm) -> bool {
    batch.inner == 1
        && (is_short::<T>(simd::level(), batch)
            || (alg != Algorithm::Online && batch.n < 2 * super::LONG_ROW_BLOCK))
}

/// `f(r, state)` for each row `r` of `batch` (see [`reads_rows_in_place`]) over the kept
/// elements, reading `x` and the mask where they are (row `r`'s mask bytes at `r * lane`:
/// `lane` is `n` for a mask of the rows' shape, 0 for one row shared by all), with the states
/// of the staged block
/// (the masked elements `-inf`) bit for bit. Short rows go through the short-row kernels,
/// each group of rows staged on the stack. Longer rows become `-inf` at their masked
/// elements in registers as they are loaded, in both passes of the two-pass state, so no
/// staged copy is written; a row that needs the scalar reference (a NaN or infinite max),
/// and every row at the scalar level, is staged into `scratch` ([`copy_kept`]) and run as the
/// staged block would be.
pub fn kept_row_states<T: Real>(
    x: &[T],
    (keep, lane): (&[u8], usize),
    batch: Batch,
    alg: Algorithm,
    scratch: &mut [T],
    mut f: impl FnMut(usize, LseState),
) -> Result<(), String> {
    check_rows(x.len(), keep.len(), lane, &batch)?;
    let n = batch.n;
    let level = simd::level();
    if is_short::<T>(level, &batch) {
        let mut states = [LseState::EMPTY; 64];
        for r0 in (0..batch.outer).step_by(states.len()) {
            let rows = states.len().min(batch.outer - r0);
            // SAFETY: rows r0..r0 + rows of x and of the mask, `n` apart (checked).
            unsafe {
                let xp = x.as_ptr().add(r0 * n);
                let kp = simd::KeepRows {
                    keep: keep.as_ptr().add(r0 * lane),
                    lane,
                };
                simd::short_rows_states_kept(level, xp, kp, rows, n, &mut states);
            }
            for (r, s) in states.iter().take(rows).enumerate() {
                f(r0 + r, *s);
            }
        }
        return Ok(());
    }
    if scratch.len() < n {
        return Err(format!(
            "kept_row_states needs {n} scratch elements, got {}",
            scratch.len()
        ));
    }
    for r in 0..batch.outer {
        let at = r * batch.outer_stride;
        let (xr, kr) = (&x[at..at + n], &keep[r * lane..r * lane + n]);
        let next = next_kept(
            xr.as_ptr(),
            kr.as_ptr(),
            (batch.outer_stride, lane),
            r,
            batch.outer,
        );
        // SAFETY: n elements of the row and of its mask (checked above); the level is available.
        let state = match unsafe { simd::kept_row_state(level, xr.as_ptr(), kr.as_ptr(), n, next) }
        {
            Some(s) => s,
            None => {
                copy_kept(xr, kr, &mut scratch[..n], f64::NEG_INFINITY);
                super::row_state(&scratch[..n], alg)
            }
        };
        f(r, state);
    }
    Ok(())
}

/// Where row `r + 1` of `rows` (and its mask bytes) lies, `pitch` elements and mask bytes
/// after row `r` at `(x, keep)`, for the kernels to hint into cache while they compute row
/// `r` ([`Ahead`]); none after the last row. Only addresses: nothing is read here.
fn next_kept<T>(
    x: *const T,
    keep: *const u8,
    (pitch, lane): (usize, usize),
    r: usize,
    rows: usize,
) -> Ahead<T> {
    if r + 1 < rows {
        Ahead {
            x: x.wrapping_add(pitch),
            keep: keep.wrapping_add(lane),
        }
    } else {
        Ahead::NONE
    }
}

/// The log-sum-exp of each row of `batch` (see [`reads_rows_in_place`]) over the kept
/// elements into `out`, read in place as [`kept_row_states`] reads them: the values of the
/// staged block bit for bit (short rows through the short-row log-sum-exp kernel, as the
/// staged block runs them).
pub fn kept_row_logsumexp<T: Real>(
    x: &[T],
    (keep, lane): (&[u8], usize),
    batch: Batch,
    alg: Algorithm,
    scratch: &mut [T],
    out: &mut [T],
) -> Result<(), String> {
    check_rows(x.len(), keep.len(), lane, &batch)?;
    if out.len() < batch.outer {
        return Err(format!("{} rows for {} results", batch.outer, out.len()));
    }
    let level = simd::level();
    if is_short::<T>(level, &batch) {
        // SAFETY: the rows of x and of the mask, `n` apart (checked), and `outer` results.
        unsafe {
            let kp = simd::KeepRows {
                keep: keep.as_ptr(),
                lane,
            };
            let o = out.as_mut_ptr();
            simd::short_rows_logsumexp_kept(level, x.as_ptr(), kp, batch.outer, batch.n, o)
        };
        return Ok(());
    }
    // The states of a group of rows at a time, finished as the staged block's are (the
    // level's vector log1p for results of type T).
    const GROUP: usize = 64;
    let mut states = [LseState::EMPTY; GROUP];
    let n = batch.n;
    for r0 in (0..batch.outer).step_by(GROUP) {
        let rows = GROUP.min(batch.outer - r0);
        let (xr, kr) = (&x[r0 * n..(r0 + rows) * n], &keep[r0 * lane..]);
        let group = Batch::rows(rows, n);
        kept_row_states(xr, (kr, lane), group, alg, scratch, |r, s| states[r] = s)?;
        // SAFETY: the level is this CPU's; `rows` results of out from r0 (checked above).
        unsafe { simd::states_logsumexp(level, &states[..rows], out.as_mut_ptr().add(r0)) };
    }
    Ok(())
}

/// Checks that `batch` is dense rows (`outer_stride == n`, as the short-row kernels read a
/// mask beside them) inside `x`, and that the mask holds its rows `lane` apart.
fn check_rows(x: usize, keep: usize, lane: usize, batch: &Batch) -> Result<(), String> {
    batch.check(x)?;
    let need = match batch.outer {
        0 => 0,
        rows => (rows - 1) * lane + batch.n,
    };
    if keep < need {
        return Err(format!("{keep} mask bytes for {need}"));
    }
    if batch.inner != 1 || batch.outer_stride != batch.n {
        return Err(format!(
            "masked rows read in place must be dense rows, got inner {} and stride {}",
            batch.inner, batch.outer_stride
        ));
    }
    Ok(())
}

/// Softmax or log_softmax of `batch`'s rows (see [`reads_rows_in_place`]) over the kept
/// elements, reading `x` and the mask where they are and writing `out` once, with the same
/// values as the staged path ([`softmax_like_masked`] on the staged block) bit for bit:
///
/// - short rows: the short-row kernels with the mask read beside the rows (a masked element
///   loaded as `-inf`, as the staged block holds it);
/// - softmax rows up to `STORED_ROW`: the stored-exp kernel with the masked elements loaded
///   as `-inf`, whose stored exp is 0, so the masked outputs are 0 with no fill pass;
/// - longer softmax rows and log_softmax: the state as [`kept_row_states`], then one write
///   that loads the masked elements as the max (softmax: `exp(0)`, not the slow `exp(-inf)`)
///   or `-inf` (log_softmax) and stores 0 / `-inf` there;
/// - a row whose state is not finite (fully masked, a kept NaN or infinity) is staged into
///   `out` and finished as the staged block finishes it.
///
/// `stream` asks for non-temporal stores (`kernels::streams` of the whole output). Row `r`'s
/// mask bytes are at `keep + r * lane`.
///
/// # Safety
/// `x` readable and `out` writable for `batch.elements()` elements, `out` equal to `x` or
/// disjoint from it; every row's mask bytes readable, disjoint from `out`; `batch` is a
/// contiguous row batch.
pub unsafe fn softmax_like_rows_in_place<T: Real>(
    x: *const T,
    (keep, lane): (*const u8, usize),
    out: *mut T,
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    stream: bool,
) {
    let (n, rows) = (batch.n, batch.outer);
    let level = simd::level();
    let softmax = what == Reduction::Softmax;
    if is_short_for::<T>(level, &batch, what, alg) {
        // SAFETY: the caller's contract (rows of n elements and mask bytes, n apart).
        unsafe {
            let kp = simd::KeepRows { keep, lane };
            simd::short_rows_softmax_kept(level, x, kp, rows, n, out, !softmax)
        };
        return;
    }
    if !softmax {
        // log_softmax: the states of up to eight rows, their log totals in one vector, then
        // their writes, as the unmasked rows take them (a vector log1p a row, waited on
        // before its write, cost float32 rows of 256 under a mask a sixth of their time).
        // Every row of a chunk is read (its state) before any is written. Rows one at a time
        // hint the next one; rows in eights hint nothing, as unmasked.
        let chunk = super::log_total_chunk::<T>(n);
        let (mut states, mut logs) = ([LseState::EMPTY; 8], [0.0; 8]);
        for r0 in (0..rows).step_by(chunk) {
            let k = chunk.min(rows - r0);
            // SAFETY: as below, for rows r0..r0 + k.
            unsafe {
                for (j, s) in states[..k].iter_mut().enumerate() {
                    let r = r0 + j;
                    let (xr, kr, or) = (x.add(r * n), keep.add(r * lane), out.add(r * n));
                    let next = match chunk {
                        1 => next_kept(xr, kr, (n, lane), r, rows),
                        _ => Ahead::NONE,
                    };
                    *s = match simd::kept_row_state(level, xr, kr, n, next) {
                        Some(s) => s,
                        None => staged_state(xr, kr, or, n, alg),
                    };
                }
                simd::states_log_totals::<T>(level, &states[..k], &mut logs[..k]);
                for (j, (&s, &lt)) in states[..k].iter().zip(&logs[..k]).enumerate() {
                    let r = r0 + j;
                    let (xr, kr, or) = (x.add(r * n), keep.add(r * lane), out.add(r * n));
                    write_kept(xr, kr, or, n, (s, lt), what, stream);
                }
            }
        }
        return;
    }
    let stored = n <= simd::STORED_ROW;
    super::with_exp_scratch(if stored { n } else { 0 }, |e| {
        for r in 0..rows {
            // SAFETY: row r's n elements of x, out and the mask (the caller's contract); the
            // staged copy and every write go through raw pointers, so out may equal x; the
            // exp scratch holds n float64.
            unsafe {
                let (xr, kr, or) = (x.add(r * n), keep.add(r * lane), out.add(r * n));
                let next = next_kept(xr, kr, (n, lane), r, rows);
                let state = if stored {
                    if let Some(e) = e {
                        if simd::softmax_stored(level, xr, next, kr, or, n, e, stream) {
                            continue;
                        }
                    }
                    None
                } else {
                    simd::kept_row_state(level, xr, kr, n, next)
                };
                let s = match state {
                    Some(s) => s,
                    None => staged_state(xr, kr, or, n, alg),
                };
                write_kept(xr, kr, or, n, (s, 0.0), what, stream);
            }
        }
    });
}

/// Softmax or log_softmax of `batch`'s rows of at least `2 * LONG_ROW_BLOCK` elements over
/// the kept elements, reading `x` and the mask where they are: each row's state merges the
/// in-place states of its `LONG_ROW_BLOCK` chunks in order, then each chunk is written as
/// [`softmax_like_rows_in_place`] writes a row; the chunks of a row run in parallel. The same
/// values as the staged lanes (chunks gathered with the masked elements `-inf`) bit for bit.
///
/// # Safety
/// As [`softmax_like_rows_in_place`] (no scratch); `alg` is not online.
pub unsafe fn softmax_like_long_rows_in_place<T: Real>(
    x: *const T,
    keep: *const u8,
    out: *mut T,
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    stream: bool,
) {
    let n = batch.n;
    let block = super::LONG_ROW_BLOCK;
    let chunks = n.div_ceil(block);
    let (xp, kp, op) = (SendPtr(x as *mut T), SendPtr(keep as *mut u8), SendPtr(out));
    // Chunk c of row r: its pointers into x, the mask and out, and its length.
    let at = move |r: usize, c: usize| {
        let first = r * n + c * block;
        // SAFETY: the chunk lies inside row r (the caller's contract).
        unsafe {
            let p = (xp.ptr() as *const T).add(first);
            (p, (kp.ptr() as *const u8).add(first), op.ptr().add(first))
        }
    };
    for r in 0..batch.outer {
        let states = parallel::map_collect(chunks, block, |c| {
            let (xr, kr, or) = at(r, c);
            let len = block.min(n - c * block);
            // SAFETY: the chunk's elements of x, the mask and out, this task's own.
            unsafe {
                match simd::kept_row_state(simd::level(), xr, kr, len, Ahead::NONE) {
                    Some(s) => s,
                    None => staged_state(xr, kr, or, len, alg),
                }
            }
        });
        let state = states.into_iter().fold(LseState::EMPTY, |a, s| a.merge(s));
        let lt = super::write_log_total::<T>(simd::level(), state, what);
        parallel::for_each_piece(chunks, block, |range| {
            for c in range {
                let (xr, kr, or) = at(r, c);
                let len = block.min(n - c * block);
                // SAFETY: as above.
                unsafe { write_kept(xr, kr, or, len, (state, lt), what, stream) };
            }
        });
    }
}

/// The state of a row staged into `out` (the masked elements `-inf`): the row a staged block
/// holds, reduced as the staged block reduces it. Reading the row in place after this is
/// still right when `out` is `x`: only masked elements changed.
///
/// # Safety
/// `n` elements of `x` and mask bytes readable, `n` of `out` writable (equal to `x` or
/// disjoint), not online.
unsafe fn staged_state<T: Real>(
    x: *const T,
    keep: *const u8,
    out: *mut T,
    n: usize,
    alg: Algorithm,
) -> LseState {
    // SAFETY: the caller's contract; the slice is rebuilt after the select wrote it.
    unsafe {
        simd::select_kept(simd::level(), x, keep, out, n, f64::NEG_INFINITY);
        super::row_state(std::slice::from_raw_parts(out, n), alg)
    }
}

/// Writes softmax or log_softmax of a `where=` row read in place from its kept elements'
/// `state` (and, for log_softmax, its `log S`, [`super::write_log_total`]): with a finite
/// max, one pass that applies the mask as `x` is loaded; otherwise the row is staged into
/// `out` and written by the reference writers, the masked positions then set, as the staged
/// path does.
///
/// # Safety
/// As [`staged_state`].
unsafe fn write_kept<T: Real>(
    x: *const T,
    keep: *const u8,
    out: *mut T,
    n: usize,
    (s, log_total): (LseState, f64),
    what: Reduction,
    stream: bool,
) {
    let level = simd::level();
    // SAFETY: the caller's contract.
    unsafe {
        if s.max.is_finite() {
            match what {
                Reduction::Softmax => {
                    let scale = 1.0 / s.total();
                    simd::kept_exp_scaled(level, x, keep, out, n, s.max, scale, stream)
                }
                Reduction::LogSoftmax => {
                    simd::kept_shift_sub(level, x, keep, out, n, s.max, log_total, stream)
                }
            }
            return;
        }
        simd::select_kept(level, x, keep, out, n, f64::NEG_INFINITY);
        super::write_row(level, (out, null()), out, n, s, what, stream);
        simd::select_kept(level, out, keep, out, n, masked_value::<T>(what).to_f64());
    }
}

/// `x[k] = -inf` wherever `keep[k] == 0`: the masked elements leave the reduction.
pub fn hide_masked<T: Real>(x: &mut [T], keep: &[u8]) {
    fill_masked(x, keep, T::NEG_INFINITY);
}

/// The value softmax (0) or log_softmax (`-inf`) takes at a masked position.
pub fn masked_value<T: Real>(what: Reduction) -> T {
    T::from_f64(match what {
        Reduction::Softmax => 0.0,
        Reduction::LogSoftmax => f64::NEG_INFINITY,
    })
}

fn check(buf: usize, keep: usize, batch: &Batch) -> Result<(), String> {
    if keep != buf {
        return Err(format!(
            "mask holds {keep} elements, the block {buf}; they must match"
        ));
    }
    if !batch.is_contiguous() {
        return Err("a masked block must be a contiguous batch".into());
    }
    batch.check(buf)
}

/// Softmax or log_softmax of the kept elements of every lane of the dense block `buf`, in
/// place; masked positions get 0 (softmax) or `-inf` (log_softmax). The masked elements of
/// `buf` are hidden already ([`hide_masked`], or a gather that hides them). `states` is
/// scratch of `batch.count()` lane states (softmax only).
///
/// log_softmax, and softmax rows short enough for the kernels' stored-exp path (which zeroes
/// the exps of `-inf` without an underflow), run the in-place kernel on the hidden block:
/// `-inf - max - log S` is the masked value, `exp(-inf)` is 0, and the fill afterwards fixes
/// fully masked lanes. Other softmax lanes do not: there `exp(-inf)` is exact but takes the
/// exp's subnormal path (microcode assists, about 6x the cost of the whole write), so the
/// states come first, every masked element is set to its lane's maximum (a cheap `exp(0)`),
/// the kernels' write pass runs, and the masked positions are overwritten with 0.
pub fn softmax_like_masked<T: Real>(
    buf: &mut [T],
    keep: &[u8],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
    states: &mut [LseState],
) -> Result<(), String> {
    check(buf.len(), keep.len(), &batch)?;
    // The states are scratch for one of the paths below; they are checked whichever runs, so
    // the same arguments are refused alike at every SIMD level.
    let have = states.len();
    let states = states
        .get_mut(..batch.count())
        .ok_or_else(|| format!("{have} lane states for {} lanes", batch.count()))?;
    let (n, inner) = (batch.n, batch.inner);
    if what == Reduction::LogSoftmax
        || (inner == 1
            && n <= simd::STORED_ROW
            && !is_short_for::<T>(simd::level(), &batch, what, alg))
    {
        super::softmax_like_inplace(buf, batch, alg, what)?;
        fill_masked(buf, keep, masked_value(what));
        return Ok(());
    }
    super::lse_states(buf, batch, alg, states)?;
    let level = simd::level();
    let zero = masked_value::<T>(what);
    if inner == 1 {
        for ((row, kr), s) in buf
            .chunks_exact_mut(n.max(1))
            .zip(keep.chunks_exact(n.max(1)))
            .zip(states.iter())
        {
            if s.max.is_finite() {
                fill_masked(row, kr, T::from_f64(s.max));
            }
            // SAFETY: the row is `n` elements, written in place (allowed: equal buffers).
            unsafe {
                super::write_row(
                    level,
                    (row.as_ptr(), null()),
                    row.as_mut_ptr(),
                    n,
                    *s,
                    what,
                    false,
                )
            };
            fill_masked(row, kr, zero);
        }
        return Ok(());
    }
    // Column batches: the column write, `COLS` lanes at a time with their parameters.
    const COLS: usize = 64;
    let (mut b, mut a) = ([0f64; COLS], [0f64; COLS]);
    for o in 0..batch.outer {
        let mut j0 = 0;
        while j0 < inner {
            let w = COLS.min(inner - j0);
            let lanes = &states[o * inner + j0..][..w];
            for (i, s) in lanes.iter().enumerate() {
                (b[i], a[i]) = super::write_params::<T>(simd::level(), *s, true);
            }
            for k in 0..n {
                let at = (o * n + k) * inner + j0;
                let (row, kr) = (&mut buf[at..at + w], &keep[at..at + w]);
                for ((v, &kk), s) in row.iter_mut().zip(kr).zip(lanes) {
                    if kk == 0 && s.max.is_finite() {
                        *v = T::from_f64(s.max);
                    }
                }
                // SAFETY: `w` elements and parameters, written in place (equal buffers).
                unsafe {
                    simd::lanes_write(
                        level,
                        row.as_ptr(),
                        row.as_mut_ptr(),
                        w,
                        b.as_ptr(),
                        a.as_ptr(),
                        true,
                    )
                };
                fill_masked(row, kr, zero);
            }
            j0 += w;
        }
    }
    Ok(())
}

/// Writes the masked positions of a chunk of a softmax-like output whose kept positions are
/// written already (the chunks of lanes too long for one block).
pub fn finish_masked_chunk<T: Real>(out: &mut [T], keep: &[u8], what: Reduction) {
    fill_masked(out, keep, masked_value(what));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked_softmax<T: Real>(x: &[T], keep: &[u8], b: Batch, what: Reduction) -> Vec<T> {
        let mut buf = x.to_vec();
        hide_masked(&mut buf, keep);
        let mut st = vec![LseState::EMPTY; b.count()];
        softmax_like_masked(&mut buf, keep, b, Algorithm::Auto, what, &mut st).unwrap();
        buf
    }

    #[test]
    fn fully_masked_lanes_and_masked_positions() {
        let x = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let keep = [1u8, 0, 1, 0, 0, 0];
        let b = Batch::rows(2, 3);
        let mut hidden = x;
        hide_masked(&mut hidden, &keep);
        let mut lse = [0.0; 2];
        super::super::logsumexp(&hidden, b, Algorithm::Auto, &mut lse).unwrap();
        let want = 3.0 + (-2.0f64).exp().ln_1p();
        assert!((lse[0] - want).abs() < 1e-15 && lse[1] == f64::NEG_INFINITY);
        let sm = masked_softmax(&x, &keep, b, Reduction::Softmax);
        assert_eq!(sm[1], 0.0);
        assert_eq!(sm[3..], [0.0; 3]);
        assert!((sm[0] + sm[2] - 1.0).abs() < 1e-15);
        let ls = masked_softmax(&x, &keep, b, Reduction::LogSoftmax);
        assert_eq!(ls[1], f64::NEG_INFINITY);
        assert_eq!(ls[3..], [f64::NEG_INFINITY; 3]);
        assert!((ls[2] - (3.0 - want)).abs() < 1e-15);
        // Columns: the same lanes transposed.
        let xt = [1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0];
        let kt = [1u8, 0, 0, 0, 1, 0];
        let smt = masked_softmax(&xt, &kt, Batch::contiguous(1, 3, 2), Reduction::Softmax);
        assert_eq!(smt, [sm[0], 0.0, 0.0, 0.0, sm[2], 0.0]);
    }

    #[test]
    fn masked_nan_and_inf_have_no_effect_kept_specials_do() {
        let x = [f64::NAN, 1.0, f64::INFINITY, 2.0];
        let sm = masked_softmax(&x, &[0, 1, 0, 1], Batch::rows(1, 4), Reduction::Softmax);
        assert_eq!((sm[0], sm[2]), (0.0, 0.0));
        assert!((sm[3] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
        // Kept elements all -inf: the unmasked op on them (NaN), masked positions still 0.
        let x = [f64::NEG_INFINITY, f64::NEG_INFINITY, 3.0];
        let sm = masked_softmax(&x, &[1, 1, 0], Batch::rows(1, 3), Reduction::Softmax);
        assert!(sm[0].is_nan() && sm[1].is_nan() && sm[2] == 0.0);
    }

    #[test]
    fn all_kept_matches_the_unmasked_kernels_bitwise() {
        let x = [0.5f32, -40.0, 3.25, 1e30, -1e30, 7.0, 7.0, 0.0];
        let batch = Batch::rows(2, 4);
        for what in [Reduction::Softmax, Reduction::LogSoftmax] {
            let s = masked_softmax(&x, &[1; 8], batch, what);
            let mut t = [0.0f32; 8];
            super::super::softmax_like(&x, batch, Algorithm::Auto, what, &mut t).unwrap();
            assert_eq!(s, t);
        }
    }

    /// Short rows read in place beside their mask must equal, bit for bit at every level, the
    /// rows staged with their masked elements at `-inf` and run through the unmasked
    /// short-row kernels (log-sum-exp, states, softmax and log_softmax, these filled at the
    /// masked positions), in place or not: a mask byte misread in a tail group or column, a
    /// masked NaN or `+inf` read, a redone row (fully masked, kept NaN / `+inf` / all `-inf`)
    /// finished differently, a masked value left in `out`.
    #[test]
    fn short_rows_read_in_place_equal_the_staged_rows_at_every_level() {
        fn check<T: Real>(to: fn(f64) -> T) {
            let mut rng = crate::simd::tests::Rng::new(5);
            let bits = |v: &[T]| v.iter().map(|t| t.to_f64().to_bits()).collect::<Vec<_>>();
            let rows = 13;
            for n in (1..=simd::SHORT_ROW).filter(|n| *n <= 18 || n % 7 == 1 || *n % 64 == 0) {
                let len = rows * n;
                let mut x: Vec<T> = (0..len).map(|_| to(rng.uniform(-30.0, 30.0))).collect();
                let mut keep: Vec<u8> = (0..len)
                    .map(|_| !rng.next_u64().is_multiple_of(5) as u8)
                    .collect();
                let row = |r: usize| r * n..(r + 1) * n;
                keep[row(1)].fill(0);
                (x[2 * n], keep[2 * n]) = (to(f64::INFINITY), 1);
                (x[3 * n + n / 2], keep[3 * n + n / 2]) = (to(f64::NAN), 3);
                x[row(4)].fill(to(f64::NEG_INFINITY));
                for k in row(5).chain(row(6)) {
                    if keep[k] == 0 {
                        x[k] = to(if k < 6 * n { f64::NAN } else { f64::INFINITY });
                    }
                }
                // A kept max far above the rest: exps below anything float32 holds.
                for v in &mut x[row(7)] {
                    *v = to(-800.0);
                }
                (x[7 * n], keep[7 * n]) = (to(0.0), 1);
                keep[row(8)].fill(255);
                let staged: Vec<T> = x
                    .iter()
                    .zip(&keep)
                    .map(|(&v, &b)| if b != 0 { v } else { to(f64::NEG_INFINITY) })
                    .collect();
                for level in simd::available_levels() {
                    let what = format!("{} n={n}", level.name());
                    let (mut want, mut got) = (vec![to(0.0); rows], vec![to(1.0); rows]);
                    let mut want_st = vec![LseState::EMPTY; rows];
                    let mut got_st = vec![LseState::EMPTY; rows];
                    // SAFETY: rows * n elements and mask bytes, rows results; the level is
                    // available.
                    unsafe {
                        let (xp, sp) = (x.as_ptr(), staged.as_ptr());
                        let kp = simd::KeepRows {
                            keep: keep.as_ptr(),
                            lane: n,
                        };
                        simd::short_rows_logsumexp(level, sp, rows, n, n, want.as_mut_ptr());
                        simd::short_rows_logsumexp_kept(level, xp, kp, rows, n, got.as_mut_ptr());
                        simd::short_rows_states(level, sp, rows, n, n, &mut want_st);
                        simd::short_rows_states_kept(level, xp, kp, rows, n, &mut got_st);
                    }
                    assert_eq!(bits(&got), bits(&want), "{what} logsumexp");
                    let st = |v: &[LseState]| {
                        v.iter()
                            .map(|s| (s.max.to_bits(), s.excess.to_bits()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(st(&got_st), st(&want_st), "{what} states");
                    for log in [false, true] {
                        let masked = to(if log { f64::NEG_INFINITY } else { 0.0 });
                        let mut want = vec![to(0.0); len];
                        let (mut got, mut inplace) = (vec![to(1.0); len], x.clone());
                        // SAFETY: rows * n elements and mask bytes each; the level is available.
                        unsafe {
                            simd::short_rows_softmax(
                                level,
                                staged.as_ptr(),
                                rows,
                                n,
                                n,
                                want.as_mut_ptr(),
                                log,
                            );
                            let kp = simd::KeepRows {
                                keep: keep.as_ptr(),
                                lane: n,
                            };
                            let gp = got.as_mut_ptr();
                            simd::short_rows_softmax_kept(level, x.as_ptr(), kp, rows, n, gp, log);
                            let ip = inplace.as_mut_ptr();
                            simd::short_rows_softmax_kept(level, ip, kp, rows, n, ip, log);
                        }
                        for (w, &b) in want.iter_mut().zip(&keep) {
                            if b == 0 {
                                *w = masked;
                            }
                        }
                        let what = format!("{} n={n} log={log}", level.name());
                        assert_eq!(bits(&got), bits(&want), "{what}");
                        assert_eq!(bits(&inplace), bits(&want), "{what} in place");
                    }
                }
            }
        }
        check::<f32>(|v| v as f32);
        check::<f64>(|v| v);
    }

    #[test]
    fn transpose_mask_moves_every_byte_as_0_or_1() {
        let shapes = [
            (0, 3),
            (1, 1),
            (8, 8),
            (9, 17),
            (16, 24),
            (30, 10),
            (8, 40),
            (17, 33),
            (24, 56),
        ];
        for (rows, cols) in shapes {
            let (src_stride, dst_stride) = (cols + 5, rows + 1);
            let src: Vec<u8> = (0..rows * src_stride)
                .map(|i| [0u8, 1, 2, 0x80, 0xFF, 0x7F, 0, 0][(i * 7 + i / 3) % 8])
                .collect();
            let mut dst = vec![9u8; cols * dst_stride];
            transpose_mask((&src, src_stride), (&mut dst, dst_stride), rows, cols);
            for c in 0..cols {
                for r in 0..dst_stride {
                    let want = match r < rows {
                        true => (src[r * src_stride + c] != 0) as u8,
                        false => 9,
                    };
                    assert_eq!(dst[c * dst_stride + r], want, "{rows}x{cols} ({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let mut st = [LseState::EMPTY; 1];
        let (a, r) = (Algorithm::Auto, Reduction::Softmax);
        let b = Batch::rows(1, 2);
        assert!(softmax_like_masked(&mut [1.0, 2.0], &[1], b, a, r, &mut st).is_err());
        assert!(softmax_like_masked(&mut [1.0f64; 2], &[1, 1], b, a, r, &mut []).is_err());
        let b = Batch::rows(1, 3);
        assert!(softmax_like_masked(&mut [1.0, 2.0], &[1, 1], b, a, r, &mut st).is_err());
    }
}
