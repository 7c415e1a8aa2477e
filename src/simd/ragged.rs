//! Ragged short rows: contiguous rows of different lengths, `1..=RAGGED_ROW` elements each (the
//! segments of a CSR partition), run by the short-row kernels of [`super::short`], one row per
//! vector lane.
//!
//! A row kernel pays a fixed cost per row (horizontal maxima and sums, tails, a libm log, a
//! mispredicted loop exit) that dwarfs the arithmetic of a row of ~32 elements. Here the rows
//! of a window of [`WINDOW`] consecutive rows are ordered by length (a counting sort) and
//! taken [`GROUP`] at a time. The short-row kernels read a group's rows where they lie, one
//! per lane, each as far as the group's longest, its lanes past its own end read as `-inf`
//! (the last rows, whose reads would pass the end of the rows, are copied into a block
//! padded with `-inf` instead); they compute every row's state in its own lane, the
//! logsumexp with one vector log per group, and the softmax from the exps of the state pass,
//! written into a block and copied out row by row.
//!
//! The padding changes no result: `-inf` leaves the max alone, and its exp is 0, kept out of
//! the sum (or added as an exact 0). Each lane is computed on its own, so a row's result is
//! the same whatever rows share its group: bit-identical for any split of the rows into
//! pieces (thread count), and equal to the short-row kernels' result for the same elements
//! as a row of a 2-D batch. The sum runs over the row in element order: its rounding error is
//! at most about `n` float64 roundings for a row of `n` elements (plus the exp's ~5e-11
//! relative error for float32-grade results), as for any short row.
//!
//! Rows of other lengths (0, or more than [`RAGGED_ROW`]) are left to the caller.

use super::lanes::{dispatch, reference_state, Kernel, Lanes};
use super::{scalar, short, Level, SHORT_ROW};

/// The longest ragged rows taken here: rows of up to 64 elements, as the short-row kernels
/// take at every level (longer ragged rows were not measured packed).
pub(crate) const RAGGED_ROW: usize = SHORT_ROW / 2;
use crate::real::Real;
use crate::state::LseState;
use std::mem::MaybeUninit;

/// Rows handled together by one call of a short-row kernel (a multiple of every level's `N`).
const GROUP: usize = 8;

/// Consecutive rows ordered by length together, so that a group's rows have similar lengths
/// and little of its block is padding.
const WINDOW: usize = 64;

/// Whether a row of `len` elements is one of this module's.
#[inline(always)]
pub(crate) fn is_ragged_short(len: usize) -> bool {
    (1..=RAGGED_ROW).contains(&len)
}

/// What a pass over the rows produces, per row `s` of `starts`.
#[derive(Clone, Copy)]
enum Out<T> {
    /// `out[s]` = the `(max, excess)` state.
    States(*mut LseState),
    /// `out[s]` = logsumexp.
    Lse(*mut T),
    /// Elements `starts[s]..starts[s + 1]` of `out` = softmax, or log_softmax when `log`.
    Softmax(*mut T, bool),
}

/// The rows `starts[s]..starts[s + 1]` of `x` holding `1..=RAGGED_ROW` elements, grouped and
/// run as described in the module docs, writing `out` for each. A group's rows are read in
/// place, each up to the group's longest (the elements past a row's own read and discarded,
/// as [`short::Rows::Ragged`] says), where that stays inside the rows, `..starts.last()`;
/// the last rows are copied, padded.
///
/// The next window's elements are prefetched while a window computes, so the groups read
/// from the cache in whatever order they take the rows.
///
/// # Safety
/// `starts` non-decreasing, elements `..starts.last()` readable at `x`; `out` writable for
/// every row's result (softmax: disjoint from `x` or equal to it; a row is read before it is
/// written, and the elements past a row's own that it reads are discarded).
#[inline(always)]
unsafe fn run<L: Lanes, T: Real>(l: L, x: *const T, starts: &[usize], out: Out<T>) {
    let rows = starts.len().saturating_sub(1);
    let end = starts.last().copied().unwrap_or(0);
    // One group's padded rows (uninitialised: only what a group wrote is read).
    let mut block = [MaybeUninit::<T>::uninit(); GROUP * RAGGED_ROW];
    let bp = block.as_mut_ptr() as *mut T;
    let mut index = [0.0; 8];
    for (k, v) in index.iter_mut().enumerate() {
        *v = k as f64;
    }
    let index = l.of_lanes(&index);
    // A softmax into another array hints its outputs beside its inputs.
    let out_hint = match out {
        Out::Softmax(o, _) if !std::ptr::eq(o, x) => Some(o as *const T),
        _ => None,
    };
    let line = 64 / std::mem::size_of::<T>();
    // Per row of the window: its length (0: not short); per rank of the length order, its
    // row.
    let mut lens = [0u8; WINDOW];
    let mut order = [0u8; WINDOW];
    let mut w0 = 0;
    while w0 < rows {
        let w = (rows - w0).min(WINDOW);
        // Counting sort of the window's short rows by length.
        let mut first = [0u8; RAGGED_ROW + 2];
        for (k, n) in lens.iter_mut().enumerate().take(w) {
            let d = starts[w0 + k + 1] - starts[w0 + k];
            *n = if is_ragged_short(d) { d as u8 } else { 0 };
            first[*n as usize + 1] += 1;
        }
        for n in 1..first.len() {
            first[n] += first[n - 1];
        }
        for (k, &n) in lens.iter().enumerate().take(w) {
            let slot = &mut first[n as usize];
            order[*slot as usize] = k as u8;
            *slot += 1;
        }
        // Rows of length 0 (here: not short) sort first; the short ones are ranks skip..w.
        let mut r0 = first[0] as usize;
        // The next window's elements are hinted into L1 a share per group: hinted all at
        // once, they were measured to help little (the misses queue behind each other).
        let (mut next, b) = (starts[w0 + w], starts[(w0 + w + WINDOW).min(rows)]);
        let groups = (w - r0).div_ceil(GROUP).max(1);
        let share = (b - next).div_ceil(line).div_ceil(groups) * line;
        while r0 < w {
            let g = (w - r0).min(GROUP);
            let stop = (next + share).min(b);
            while next < stop {
                l.prefetch(x.wrapping_add(next) as *const i8);
                if let Some(o) = out_hint {
                    l.prefetch(o.wrapping_add(next) as *const i8);
                }
                next += line;
            }
            let ranked = &order[r0..r0 + g];
            // Ascending lengths: the last row of the group is its longest.
            let width = lens[ranked[g - 1] as usize] as usize;
            // SAFETY: each row lies inside x (the caller's contract); read in place, the
            // kernels read columns 0..width of every row of the group, inside `end`; else
            // each is copied into its own row of the block, padded to the group's width. A
            // softmax row is written after its state is final; another row reads its elements
            // only to discard them.
            unsafe {
                let mut start = [0; GROUP];
                let mut len = [0; GROUP];
                for (i, &k) in ranked.iter().enumerate() {
                    (start[i], len[i]) = (starts[w0 + k as usize], lens[k as usize]);
                }
                // Read in place where every row's `width` elements lie inside the rows;
                // else (the last rows) copied into the block, padded.
                let last = start[..g].iter().fold(0, |a, &b| a.max(b));
                let src = if last + width <= end {
                    short::Rows::Ragged {
                        x,
                        start: &start[..g],
                        len: &len[..g],
                    }
                } else {
                    for i in 0..g {
                        let dst = bp.add(i * RAGGED_ROW);
                        copy_padded(l, x, end, start[i], len[i] as usize, dst, width, index);
                    }
                    short::Rows::Pitched {
                        x: bp as *const T,
                        pitch: RAGGED_ROW,
                    }
                };
                match out {
                    Out::States(o) => {
                        let mut states = [LseState::EMPTY; GROUP];
                        short::states(l, src, g, width, &mut states);
                        for (&k, st) in ranked.iter().zip(states) {
                            *o.add(w0 + k as usize) = st;
                        }
                    }
                    Out::Lse(o) => {
                        let mut lse = [MaybeUninit::<T>::uninit(); GROUP];
                        let lp = lse.as_mut_ptr() as *mut T;
                        short::logsumexp(l, src, g, width, lp);
                        for (&k, v) in ranked.iter().zip(lse) {
                            *o.add(w0 + k as usize) = v.assume_init();
                        }
                    }
                    Out::Softmax(o, log) => {
                        // The group's rows written `width` apart, then each row's own
                        // elements copied out.
                        let mut done = [MaybeUninit::<T>::uninit(); GROUP * RAGGED_ROW];
                        let dp = done.as_mut_ptr() as *mut T;
                        short::softmax(l, src, g, width, dp, log);
                        for i in 0..g {
                            let n = len[i] as usize;
                            std::ptr::copy_nonoverlapping(dp.add(i * width), o.add(start[i]), n);
                        }
                    }
                }
            }
            r0 += g;
        }
        w0 += w;
    }
}

/// Copies the `n` elements of `x` at `r` to `dst` and fills `dst[n..width]` with `-inf`, in
/// whole vectors (up to the next multiple of `N` past `width`, inside a block row): each
/// vector is loaded whole while it lies inside the first `len` elements of `x` and its lanes
/// past the row masked, so the copy does not branch on the row's length.
///
/// # Safety
/// `n <= width <= RAGGED_ROW`; `len` readable elements at `x`, `r + n <= len`; `dst` writable
/// for `width` rounded up to a multiple of `N`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn copy_padded<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    len: usize,
    r: usize,
    n: usize,
    dst: *mut T,
    width: usize,
    index: L::V,
) {
    let ninf = l.splat(f64::NEG_INFINITY);
    let mut c = 0;
    // SAFETY: whole loads stay within x's len elements, tails within the row; stores within
    // the caller's bound.
    unsafe {
        while c < width {
            let v = if r + c + L::N <= len {
                let keep = l.gt(l.splat(n as f64 - c as f64), index);
                l.select(keep, l.load(x.add(r + c)), ninf)
            } else {
                l.load_tail(x.add(r + c), n.saturating_sub(c).min(L::N - 1))
            };
            l.store(dst.add(c), v);
            c += L::N;
        }
    }
}

/// Runs [`run`] at `level`; the scalar level takes the reference per row.
///
/// # Safety
/// As [`run`]; `level` supported by this CPU.
unsafe fn run_at<T: Real>(level: Level, x: *const T, starts: &[usize], out: Out<T>) {
    // SAFETY: forwarded from the caller (the rows and the outputs).
    unsafe {
        run_kernel!(level, <'a> { x: *const T, starts: &'a [usize], out: Out<T> } -> (),
            |l| run(l, x, starts, out),
            scalar: for s in 0..starts.len().saturating_sub(1) {
                let (r0, n) = (starts[s], starts[s + 1] - starts[s]);
                if !is_ragged_short(n) {
                    continue;
                }
                let state = reference_state(x.add(r0), n);
                match out {
                    Out::States(o) => *o.add(s) = state,
                    Out::Lse(o) => *o.add(s) = T::from_f64(state.logsumexp()),
                    Out::Softmax(o, true) => {
                        scalar::log_softmax_write(x, r0, 1, o, r0, 1, n, state)
                    }
                    Out::Softmax(o, false) => scalar::softmax_write(x, r0, 1, o, r0, 1, n, state),
                }
            },
        )
    }
}

/// The `(max, excess)` state of every row `s` (`starts[s]..starts[s + 1]` of `x`) holding
/// `1..=RAGGED_ROW` elements into `out[s]`; other rows' states are left alone.
///
/// # Safety
/// `starts` non-decreasing with every row readable at `x`; `out` writable for
/// `starts.len() - 1` states; `level` supported by this CPU.
pub(crate) unsafe fn states<T: Real>(
    level: Level,
    x: *const T,
    starts: &[usize],
    out: *mut LseState,
) {
    // SAFETY: forwarded from the caller.
    unsafe { run_at(level, x, starts, Out::States(out)) }
}

/// logsumexp of every row `s` holding `1..=RAGGED_ROW` elements into `out[s]`, as [`states`].
///
/// # Safety
/// As [`states`], `out` writable for `starts.len() - 1` elements.
pub(crate) unsafe fn logsumexp<T: Real>(level: Level, x: *const T, starts: &[usize], out: *mut T) {
    // SAFETY: forwarded from the caller.
    unsafe { run_at(level, x, starts, Out::Lse(out)) }
}

/// Softmax (`log = false`) or log_softmax of every row holding `1..=RAGGED_ROW` elements into
/// the same elements of `out`, as [`states`].
///
/// # Safety
/// As [`states`]; `out` writable where `x` is readable, disjoint from `x` or equal to it.
pub(crate) unsafe fn softmax<T: Real>(
    level: Level,
    x: *const T,
    starts: &[usize],
    out: *mut T,
    log: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe { run_at(level, x, starts, Out::Softmax(out, log)) }
}

/// Ids checked per block of the sorted-id scan ([`sorted_id_starts`]): one `u64` of run
/// boundaries.
const ID_BLOCK: usize = 64;

/// Blocks ahead of the one checked whose ids are prefetched.
const ID_PREFETCH: usize = 16;

/// The sorted-id scan over whole blocks of [`ID_BLOCK`] ids, written once and compiled at
/// every level (the compare loops vectorize under the level's `#[target_feature]`).
struct IdScan<'a> {
    ids: &'a [i64],
    base: usize,
    prev: i64,
    count: usize,
    starts: *mut usize,
}

impl Kernel for IdScan<'_> {
    type Out = (usize, i64);
    #[inline(always)]
    fn run<L: Lanes>(self, l: L) -> (usize, i64) {
        // SAFETY: the contract of `sorted_id_starts`.
        unsafe { id_scan(self, |p| l.prefetch(p)) }
    }
    fn scalar(self) -> (usize, i64) {
        // SAFETY: as above.
        unsafe { id_scan(self, |_| ()) }
    }
}

/// # Safety
/// As [`sorted_id_starts`].
#[inline(always)]
unsafe fn id_scan(k: IdScan, prefetch: impl Fn(*const i8)) -> (usize, i64) {
    let IdScan {
        ids,
        base,
        mut prev,
        count,
        starts,
    } = k;
    let Some(last) = count.checked_sub(1) else {
        return (0, prev);
    };
    let n = count as u64;
    let mut done = 0;
    for blk in ids.chunks_exact(ID_BLOCK) {
        let Ok(blk) = <&[i64; ID_BLOCK]>::try_from(blk) else {
            break;
        };
        // The hardware prefetcher alone leaves the scan well below the memory bandwidth.
        let ahead = blk.as_ptr().wrapping_add(ID_PREFETCH * ID_BLOCK) as *const i8;
        for line in 0..ID_BLOCK * 8 / 64 {
            prefetch(ahead.wrapping_add(line * 64));
        }
        // Branch-free over the block: any id out of range or below the one before it, and
        // the mask of rows whose id differs from the one before (the runs' first rows).
        let mut bad = (blk[0] < prev) | (blk[0] as u64 >= n);
        for j in 1..ID_BLOCK {
            bad |= (blk[j] < blk[j - 1]) | (blk[j] as u64 >= n);
        }
        if bad {
            break;
        }
        let mut mask = (blk[0] != prev) as u64;
        for j in 1..ID_BLOCK {
            mask |= ((blk[j] != blk[j - 1]) as u64) << j;
        }
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            // Read again: clamp, in case another thread changed the ids since the check.
            let p = if j == 0 { prev } else { blk[j - 1] };
            let from = p.saturating_add(1).clamp(0, count as i64) as usize;
            let to = blk[j].clamp(0, last as i64) as usize;
            let r = base + done + j;
            // SAFETY: to <= last < count. Then the empty segments before it (rare).
            unsafe { *starts.add(to) = r };
            for s in from..to {
                // SAFETY: s < to.
                unsafe { *starts.add(s) = r };
            }
        }
        prev = blk[ID_BLOCK - 1];
        done += ID_BLOCK;
    }
    (done, prev)
}

/// The first part of the sorted-id scan of `ids` (rows `base..base + ids.len()`, after a row
/// of id `prev`, or -1 for the first row): the leading whole blocks of [`ID_BLOCK`] ids that
/// are all in `[0, count)` and non-decreasing. In them, a row `r` whose id differs from the
/// one before writes `r` to `starts[prev_id + 1..=id]`. Returns the rows done and the last id
/// read; the caller scans the rest (from the first block holding an offending id, and the
/// tail) row by row, and so reports the first offending row.
///
/// The ids may be written by another thread meanwhile: every index written is clamped below
/// `count`, so a change can only leave wrong or decreasing starts, never an access out of
/// bounds.
///
/// # Safety
/// `starts` must be writable for `count` elements, and `level` supported by this CPU.
pub(crate) unsafe fn sorted_id_starts(
    level: Level,
    ids: &[i64],
    base: usize,
    prev: i64,
    count: usize,
    starts: *mut usize,
) -> (usize, i64) {
    let k = IdScan {
        ids,
        base,
        prev,
        count,
        starts,
    };
    // SAFETY: forwarded from the caller.
    unsafe { dispatch(level, k) }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Rng;
    use super::super::{
        available_levels, short_rows_logsumexp, short_rows_softmax, short_rows_states,
    };
    use super::*;

    /// Rows of every length 0..=RAGGED_ROW + 3 (each several times, shuffled), values with a
    /// few NaN / inf / -inf rows, as CSR starts.
    fn rows(seed: u64) -> (Vec<f64>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let mut lens: Vec<usize> = (0..=RAGGED_ROW + 3).flat_map(|n| [n; 3]).collect();
        for i in (1..lens.len()).rev() {
            lens.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut x = Vec::new();
        let mut starts = vec![0];
        for (k, &n) in lens.iter().enumerate() {
            for j in 0..n {
                x.push(match (k % 17, j) {
                    (3, 0) => f64::NAN,
                    (5, 1) => f64::INFINITY,
                    (7, _) => f64::NEG_INFINITY,
                    _ => rng.uniform(-30.0, 30.0),
                });
            }
            starts.push(x.len());
        }
        (x, starts)
    }

    /// At every level, for float64 and float32: each short row's state, logsumexp, softmax
    /// and log_softmax are bit for bit the short-row kernels' on that row alone (the packing,
    /// padding and grouping change nothing) and near the exact values of that state; rows of
    /// other lengths are left alone.
    #[test]
    fn packed_rows_equal_each_row_alone_at_every_level() {
        let (x64, starts) = rows(3);
        let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        for level in available_levels() {
            check(level, &x64, &starts);
            check(level, &x32, &starts);
        }
    }

    /// A row's results depend on its own elements alone: the rows read past their ends (in
    /// place, elements already overwritten by an in-place softmax; past the last row, NaN)
    /// change nothing, at every level.
    #[test]
    fn rows_read_in_place_see_only_their_own_elements() {
        let (x, starts) = rows(5);
        let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
        for level in available_levels() {
            for log in [false, true] {
                let mut want = x.clone();
                let mut inplace = x.clone();
                // SAFETY: the starts are CSR over x; each output holds x's elements.
                unsafe {
                    softmax(level, x.as_ptr(), &starts, want.as_mut_ptr(), log);
                    let p = inplace.as_mut_ptr();
                    softmax(level, p as *const f32, &starts, p, log);
                }
                assert!(same(&want, &inplace), "{level:?} log {log}: in place");
            }
            // The first half of the rows as a piece, the elements after it NaN.
            let k = starts.len() / 2;
            let mut want = vec![0.0f32; starts.len() - 1];
            let mut poisoned = x.clone();
            poisoned[starts[k]..].fill(f32::NAN);
            let mut got = vec![0.0f32; k];
            // SAFETY: as above; the piece's rows lie before starts[k].
            unsafe {
                logsumexp(level, x.as_ptr(), &starts, want.as_mut_ptr());
                logsumexp(level, poisoned.as_ptr(), &starts[..=k], got.as_mut_ptr());
            }
            let short = |s: &usize| is_ragged_short(starts[s + 1] - starts[*s]);
            for s in (0..k).filter(short) {
                assert_eq!(want[s].to_bits(), got[s].to_bits(), "{level:?} row {s}");
            }
        }
    }

    /// Windows of rows that are all empty or long are left alone.
    #[test]
    fn windows_without_short_rows_are_left_alone() {
        let x = vec![1.0f64; 200 * (RAGGED_ROW + 1)];
        let starts: Vec<usize> = (0..=400).map(|k| k / 2 * (RAGGED_ROW + 1)).collect();
        for level in available_levels() {
            let mut lse = vec![7.0; 400];
            let mut sm = vec![7.0; x.len()];
            // SAFETY: the starts are CSR over x; each output holds what it must.
            unsafe {
                logsumexp(level, x.as_ptr(), &starts, lse.as_mut_ptr());
                softmax(level, x.as_ptr(), &starts, sm.as_mut_ptr(), false);
            }
            assert!(lse.iter().chain(&sm).all(|&v| v == 7.0), "{level:?}");
        }
    }

    fn check<T: Real>(level: Level, x: &[T], starts: &[usize]) {
        let count = starts.len() - 1;
        let sentinel = LseState {
            max: 7.0,
            excess: 7.0,
        };
        let mut got = vec![sentinel; count];
        let mut lse = vec![T::from_f64(7.0); count];
        let mut sm = vec![T::from_f64(7.0); x.len()];
        let mut lsm = vec![T::from_f64(7.0); x.len()];
        // SAFETY: the starts are CSR over x; every output holds what it must.
        unsafe {
            states(level, x.as_ptr(), starts, got.as_mut_ptr());
            logsumexp(level, x.as_ptr(), starts, lse.as_mut_ptr());
            softmax(level, x.as_ptr(), starts, sm.as_mut_ptr(), false);
            softmax(level, x.as_ptr(), starts, lsm.as_mut_ptr(), true);
        }
        for s in 0..count {
            let (r, n) = (starts[s], starts[s + 1] - starts[s]);
            let what = format!("{level:?} {} row {s} of {n}", T::NAME);
            if !is_ragged_short(n) {
                assert_eq!(got[s], sentinel, "{what}");
                assert_eq!(lse[s].to_f64(), 7.0, "{what}");
                assert!(sm[r..r + n].iter().all(|v| v.to_f64() == 7.0), "{what}");
                continue;
            }
            let mut alone = [LseState::EMPTY];
            let mut alone_lse = [T::from_f64(0.0)];
            let (mut alone_sm, mut alone_lsm) =
                (vec![T::from_f64(0.0); n], vec![T::from_f64(0.0); n]);
            // SAFETY: row s is readable; each output holds the row.
            unsafe {
                let p = x.as_ptr().add(r);
                if level == Level::Scalar {
                    alone[0] = reference_state(p, n);
                    alone_lse[0] = T::from_f64(alone[0].logsumexp());
                    let o = (alone_sm.as_mut_ptr(), alone_lsm.as_mut_ptr());
                    scalar::softmax_write(p, 0, 1, o.0, 0, 1, n, alone[0]);
                    scalar::log_softmax_write(p, 0, 1, o.1, 0, 1, n, alone[0]);
                } else {
                    short_rows_states(level, p, 1, n, n, &mut alone);
                    short_rows_logsumexp(level, p, 1, n, n, alone_lse.as_mut_ptr());
                    short_rows_softmax(level, p, 1, n, n, alone_sm.as_mut_ptr(), false);
                    short_rows_softmax(level, p, 1, n, n, alone_lsm.as_mut_ptr(), true);
                }
            }
            let st = got[s];
            let same = |a: f64, b: f64| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(
                same(st.max, alone[0].max) && same(st.excess, alone[0].excess),
                "{what}"
            );
            assert!(same(lse[s].to_f64(), alone_lse[0].to_f64()), "{what}");
            for j in 0..n {
                let k = r + j;
                assert!(
                    same(sm[k].to_f64(), alone_sm[j].to_f64()),
                    "{what}: softmax {j}"
                );
                assert!(
                    same(lsm[k].to_f64(), alone_lsm[j].to_f64()),
                    "{what}: log {j}"
                );
            }
            for k in r..r + n {
                let v = x[k].to_f64();
                let (want_sm, want_lsm) = if st.max.is_finite() {
                    let t = v - st.max;
                    (t.exp() / st.total(), t - st.log_total())
                } else {
                    let m = st.max;
                    (f64::NAN, v - m)
                };
                let tol = |w: f64| 1e-6 * w.abs().max(1e-30) + 1e-300;
                let (g, l) = (sm[k].to_f64(), lsm[k].to_f64());
                let near = |g: f64, w: f64| {
                    g == w || (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol(w)
                };
                assert!(
                    near(g, T::from_f64(want_sm).to_f64()),
                    "{what}: softmax {g} {want_sm}"
                );
                assert!(
                    near(l, T::from_f64(want_lsm).to_f64()),
                    "{what}: log {l} {want_lsm}"
                );
            }
        }
    }

    /// Sorted ids with runs of 1..70 rows and gaps (empty segments) between them.
    fn sorted_ids(rng: &mut Rng, rows: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(rows);
        let mut id = (rng.next_u64() % 3) as i64;
        while ids.len() < rows {
            let run = 1 + (rng.next_u64() % 70) as usize;
            ids.extend(std::iter::repeat_n(id, run.min(rows - ids.len())));
            id += 1 + (rng.next_u64() % 4 / 3) as i64 * (1 + (rng.next_u64() % 5) as i64);
        }
        ids
    }

    #[test]
    fn id_scan_writes_the_run_starts_and_stops_at_the_block_of_the_first_bad_id() {
        let mut rng = Rng::new(5);
        for level in available_levels() {
            for rows in [0, 1, 63, 64, 65, 127, 128, 1000, 4096 + 37] {
                let ids = sorted_ids(&mut rng, rows);
                let count = ids.last().map_or(1, |&l| l as usize + 1 + rows % 3);
                for bad in [None, Some(0), Some(1), Some(63), Some(64), Some(rows / 2)] {
                    let mut ids = ids.clone();
                    let stop = match bad {
                        Some(p) if p < rows => {
                            // Alternately below the previous id, negative and too large.
                            ids[p] = match p % 3 {
                                0 if p > 0 => ids[p - 1] - 1,
                                1 => -1,
                                _ => count as i64,
                            };
                            p / ID_BLOCK * ID_BLOCK
                        }
                        _ => rows / ID_BLOCK * ID_BLOCK,
                    };
                    for (base, prev) in [(0, -1), (1000, ids.first().map_or(0, |&f| f.min(0)))] {
                        let mut starts = vec![usize::MAX; count];
                        // SAFETY: starts holds count elements; the level is available.
                        let (done, last) = unsafe {
                            sorted_id_starts(level, &ids, base, prev, count, starts.as_mut_ptr())
                        };
                        let what = format!("{level:?} rows {rows} bad {bad:?} prev {prev}");
                        assert_eq!(done, stop, "{what}");
                        assert_eq!(last, if done == 0 { prev } else { ids[done - 1] }, "{what}");
                        // Segment s starts at the first row whose id is at least s, for the
                        // segments up to the last id of the rows done; the rest is untouched.
                        for (s, &st) in starts.iter().enumerate() {
                            let want = if s as i64 <= last && s as i64 > prev {
                                ids[..done]
                                    .iter()
                                    .position(|&i| i >= s as i64)
                                    .map(|r| r + base)
                            } else {
                                None
                            };
                            assert_eq!(st, want.unwrap_or(usize::MAX), "{what}: start {s}");
                        }
                    }
                }
            }
        }
    }
}
