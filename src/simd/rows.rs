//! The row and column algorithms, written once over [`Lanes`].
//!
//! Float32 inputs are widened to float64 lanes for every sum and every softmax output, so
//! `x - max` is exact and the exp error (~5e-11 for float32-grade results) is far below the
//! final rounding: a float32 result is rounded once, at the end, like the scalar reference.

use super::lanes::{max_of_source, reference_state, Lanes};
use super::{finish_state, has_nan, lane_state, COL_TILE};
use crate::real::Real;
use crate::state::LseState;
use std::mem::MaybeUninit;

/// Where a row write reads its elements and what it stores: the load policy that lets one
/// body serve a dense row ([`Dense`]) and a `where=` row read in place ([`Kept`], [`Masked`]).
/// Offsets are in elements from the row's start.
pub(crate) trait Load: Copy {
    type T: Real;
    /// `N` elements at `i`, widened.
    ///
    /// # Safety
    /// Elements `i..i + N` readable.
    unsafe fn load<L: Lanes>(self, l: L, i: usize) -> L::V;
    /// `n < N` elements at `i`, the other lanes `-inf`.
    ///
    /// # Safety
    /// Elements `i..i + n` readable.
    unsafe fn load_tail<L: Lanes>(self, l: L, i: usize, n: usize) -> L::V;
    /// What a write stores for the `N` elements at `i` that map to `y` (a masked source may
    /// put its own value at the masked lanes).
    ///
    /// # Safety
    /// As [`Load::load`].
    #[inline(always)]
    unsafe fn written<L: Lanes>(self, _l: L, _i: usize, y: L::V) -> L::V {
        y
    }
    /// [`Load::written`] for the `n < N` elements at `i`.
    ///
    /// # Safety
    /// As [`Load::load_tail`].
    #[inline(always)]
    unsafe fn written_tail<L: Lanes>(self, _l: L, _i: usize, _n: usize, y: L::V) -> L::V {
        y
    }
    /// Hints into cache element `i` of the row read after this one, for a pass that steps
    /// `step` elements at a time ([`Ahead::hint`]); nothing where the source does not know
    /// that row.
    #[inline(always)]
    fn hint_ahead<L: Lanes>(self, _l: L, _i: usize, _step: usize) {}
}

/// Where the row a caller reads after the current one starts: its elements and, for a
/// `where=` row, its mask bytes (null where there is none, or nothing to hint). Each pass
/// that computes from the current row hints the next row's line at the position it reads
/// ([`Ahead::hint`]).
///
/// The hardware prefetchers do not run ahead of a row whose passes compute from L1: without
/// the hints, the max pass of each row's first block waited on DRAM, and so did the fused
/// max of the next block where the previous row had not brought it. One hint a step keeps
/// the next row's loads spread over this row's exps, one stream, each line hinted once.
/// Float32 rows from DRAM, one thread, ns per element: 1000 elements 0.36-0.38 -> 0.26,
/// 2000-4000 0.35-0.40 -> 0.25-0.29, 8192 0.30 -> 0.25 (2^15 0.23 either way).
#[derive(Clone, Copy)]
pub(crate) struct Ahead<T> {
    pub x: *const T,
    pub keep: *const u8,
}

impl<T> Ahead<T> {
    /// Nothing to hint.
    pub(crate) const NONE: Self = Ahead {
        x: std::ptr::null(),
        keep: std::ptr::null(),
    };

    /// The row at `x` (null for none), without a mask.
    #[inline(always)]
    pub(crate) fn row(x: *const T) -> Self {
        Ahead {
            x,
            keep: std::ptr::null(),
        }
    }

    /// These hints for rows of `n` elements, or none where the rows are shorter than
    /// [`HINT_BYTES`].
    #[inline(always)]
    pub(crate) fn for_rows_of(self, n: usize) -> Self {
        if n * std::mem::size_of::<T>() >= HINT_BYTES {
            self
        } else {
            Self::NONE
        }
    }

    /// Hints into L1 the lines of the `step` elements at `i` of the row (at most two lines),
    /// and the line of their mask bytes where the step starts one. A hint never faults and
    /// changes no result.
    #[inline(always)]
    fn hint<L: Lanes>(self, l: L, i: usize, step: usize) {
        let size = std::mem::size_of::<T>();
        if !self.x.is_null() {
            let p = self.x.wrapping_add(i);
            l.prefetch(p as *const i8);
            if step * size > 64 {
                l.prefetch(p.wrapping_add(64 / size) as *const i8);
            }
        }
        if !self.keep.is_null() && i % 64 < step {
            l.prefetch(self.keep.wrapping_add(i) as *const i8);
        }
    }
}

/// How far ahead of its loads, in bytes, the fused max of a long row's next block hints its
/// own row ([`Source::hint_own`]), and the short-row kernels that only read hint theirs. A
/// loop that computes as it reads keeps too few loads in flight for every CPU's prefetchers
/// to stream the row from DRAM: on a 2-core Intel Xeon (float32, two threads, ms per 2^26
/// elements, hinted / not) logsumexp of rows of 32768 ran 8.0 / 17.7, the loss 8.5 / 15.3,
/// log_softmax 13.4 / 17.9, the loss with its gradient 36.3 / 41.7; rows of 2^22 alike.
/// 1 KiB ahead gained half as much, 8 KiB as much.
pub(crate) const AHEAD_BYTES: usize = 4096;

/// The shortest row, in bytes, that hints the next row into cache ([`Ahead`]): shorter rows
/// are read in runs the hardware prefetchers follow, and the hints cost more than they save
/// (float32 rows of 100 from DRAM, two threads: the loss 0.38 -> 0.40 ns per element with
/// them; rows of 200: 0.49 -> 0.42).
const HINT_BYTES: usize = 512;

/// Where a row algorithm that reduces reads its elements ([`Dense`], or [`Kept`]: masked
/// lanes `-inf` as they are loaded).
pub(crate) trait Source: Load {
    /// Hints into L1 the line of element `i` of this row (and of its mask byte), read
    /// [`AHEAD_BYTES`] after the element a pass is at. Never faults: `i` may lie past the row.
    fn hint_own<L: Lanes>(self, l: L, i: usize);
    /// The max of elements `i..i + n` (a NaN may or may not show).
    ///
    /// # Safety
    /// Those elements readable.
    unsafe fn max_of<L: Lanes>(self, l: L, i: usize, n: usize) -> f64;
    /// The max of elements `i..i + n` and their min where the source and level take both in
    /// one pass (`-inf` where not; NaN may or may not show in either).
    ///
    /// # Safety
    /// Those elements readable.
    #[inline(always)]
    unsafe fn range_of<L: Lanes>(self, l: L, i: usize, n: usize) -> (f64, f64) {
        // SAFETY: forwarded from the caller.
        (unsafe { self.max_of(l, i, n) }, f64::NEG_INFINITY)
    }
    /// Whether [`Source::range_of`] takes a min at level `L` (else it is `-inf`, and a pass
    /// taken only for the min would be wasted). A masked source's lanes read as `-inf`
    /// whatever the data: it takes none.
    #[inline(always)]
    fn takes_min<L: Lanes>() -> bool {
        false
    }
    /// The running max of [`Lanes::max_init`] and its steps, over this source.
    fn max_init<L: Lanes>(self, l: L) -> [L::V; 2];
    /// # Safety
    /// Elements `i..i + 2N` readable.
    unsafe fn max_step<L: Lanes>(self, l: L, acc: [L::V; 2], i: usize) -> [L::V; 2];
    fn max_finish<L: Lanes>(self, l: L, acc: [L::V; 2]) -> f64;
    /// Whether elements `i..i + n` hold a NaN.
    ///
    /// # Safety
    /// Those elements readable.
    unsafe fn has_nan(self, i: usize, n: usize) -> bool;
    /// The scalar reference state of elements `0..n`, where this source has one.
    ///
    /// # Safety
    /// Those elements readable.
    unsafe fn reference(self, n: usize) -> Option<LseState>;
}

/// A contiguous row read as it is, hinting the row read after it ([`Ahead`]).
#[derive(Clone, Copy)]
pub(crate) struct Dense<T> {
    pub x: *const T,
    pub next: Ahead<T>,
}

impl<T> Dense<T> {
    /// The row at `x`, hinting nothing.
    #[inline(always)]
    pub(crate) fn new(x: *const T) -> Self {
        Dense::ahead(x, Ahead::NONE, 0)
    }

    /// The row of `n` elements at `x`, hinting `next` ([`Ahead::for_rows_of`]).
    #[inline(always)]
    pub(crate) fn ahead(x: *const T, next: Ahead<T>, n: usize) -> Self {
        Dense {
            x,
            next: next.for_rows_of(n),
        }
    }
}

impl<T: Real> Load for Dense<T> {
    type T = T;
    #[inline(always)]
    fn hint_ahead<L: Lanes>(self, l: L, i: usize, step: usize) {
        self.next.hint(l, i, step)
    }
    #[inline(always)]
    unsafe fn load<L: Lanes>(self, l: L, i: usize) -> L::V {
        // SAFETY: forwarded from the caller.
        unsafe { l.load(self.x.add(i)) }
    }
    #[inline(always)]
    unsafe fn load_tail<L: Lanes>(self, l: L, i: usize, n: usize) -> L::V {
        // SAFETY: forwarded from the caller.
        unsafe { l.load_tail(self.x.add(i), n) }
    }
}

impl<T: Real> Source for Dense<T> {
    #[inline(always)]
    fn hint_own<L: Lanes>(self, l: L, i: usize) {
        l.prefetch(self.x.wrapping_add(i) as *const i8);
    }
    #[inline(always)]
    fn takes_min<L: Lanes>() -> bool {
        L::TAKES_MIN && !T::FULL
    }
    #[inline(always)]
    unsafe fn max_of<L: Lanes>(self, l: L, i: usize, n: usize) -> f64 {
        // SAFETY: forwarded from the caller.
        unsafe { l.max_of(self.x.add(i), n) }
    }
    #[inline(always)]
    unsafe fn range_of<L: Lanes>(self, l: L, i: usize, n: usize) -> (f64, f64) {
        // SAFETY: forwarded from the caller.
        unsafe { l.range_of(self.x.add(i), n) }
    }
    #[inline(always)]
    fn max_init<L: Lanes>(self, l: L) -> [L::V; 2] {
        l.max_init::<T>()
    }
    #[inline(always)]
    unsafe fn max_step<L: Lanes>(self, l: L, acc: [L::V; 2], i: usize) -> [L::V; 2] {
        // SAFETY: forwarded from the caller.
        unsafe { l.max_step(acc, self.x.add(i)) }
    }
    #[inline(always)]
    fn max_finish<L: Lanes>(self, l: L, acc: [L::V; 2]) -> f64 {
        l.max_finish::<T>(acc)
    }
    #[inline(always)]
    unsafe fn has_nan(self, i: usize, n: usize) -> bool {
        // SAFETY: forwarded from the caller.
        has_nan(unsafe { self.x.add(i) }, n)
    }
    #[inline(always)]
    unsafe fn reference(self, n: usize) -> Option<LseState> {
        // SAFETY: forwarded from the caller.
        Some(unsafe { reference_state(self.x, n) })
    }
}

/// A contiguous row and its `where=` mask bytes, read in place: element `k` is `x[k]` where
/// `keep[k] != 0`, else `-inf` (the value a staged block would hold), so the algorithms see
/// exactly the staged row's lanes without the staging pass. `next` as [`Dense`]'s.
#[derive(Clone, Copy)]
pub(crate) struct Kept<T> {
    pub x: *const T,
    pub keep: *const u8,
    pub next: Ahead<T>,
}

/// A `where=` row written from `x` in place: the masked elements enter the map as `fill` and
/// are stored as `value`. The softmax write loads them as the row's max (a cheap `exp(0)`,
/// where `exp(-inf)` would take the exp's slow subnormal path) and stores 0.
#[derive(Clone, Copy)]
pub(crate) struct Masked<T> {
    pub x: *const T,
    pub keep: *const u8,
    pub fill: f64,
    pub value: f64,
    pub next: Ahead<T>,
}

/// `N` elements of `x` at `i`, `fill` where the mask bytes at `keep + i` are 0.
///
/// # Safety
/// `N` elements and mask bytes at `i` readable.
#[inline(always)]
unsafe fn load_kept<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: *const u8,
    i: usize,
    fill: f64,
) -> L::V {
    // SAFETY: forwarded from the caller.
    unsafe { l.select(l.kept(keep.add(i)), l.load(x.add(i)), l.splat(fill)) }
}

/// [`load_kept`] of the `n < N` elements at `i`.
///
/// # Safety
/// `n` elements and mask bytes at `i` readable.
#[inline(always)]
unsafe fn load_kept_tail<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: *const u8,
    i: usize,
    n: usize,
    fill: f64,
) -> L::V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let v = l.load_tail(x.add(i), n);
        l.select(l.kept_tail(keep.add(i), n), v, l.splat(fill))
    }
}

impl<T: Real> Load for Kept<T> {
    type T = T;
    #[inline(always)]
    fn hint_ahead<L: Lanes>(self, l: L, i: usize, step: usize) {
        self.next.hint(l, i, step)
    }
    #[inline(always)]
    unsafe fn load<L: Lanes>(self, l: L, i: usize) -> L::V {
        // SAFETY: forwarded from the caller (N elements and N mask bytes at i).
        unsafe { load_kept(l, self.x, self.keep, i, f64::NEG_INFINITY) }
    }
    #[inline(always)]
    unsafe fn load_tail<L: Lanes>(self, l: L, i: usize, n: usize) -> L::V {
        // SAFETY: forwarded from the caller.
        unsafe { load_kept_tail(l, self.x, self.keep, i, n, f64::NEG_INFINITY) }
    }
}

impl<T: Real> Load for Masked<T> {
    type T = T;
    #[inline(always)]
    fn hint_ahead<L: Lanes>(self, l: L, i: usize, step: usize) {
        self.next.hint(l, i, step)
    }
    #[inline(always)]
    unsafe fn load<L: Lanes>(self, l: L, i: usize) -> L::V {
        // SAFETY: forwarded from the caller (N elements and N mask bytes at i).
        unsafe { load_kept(l, self.x, self.keep, i, self.fill) }
    }
    #[inline(always)]
    unsafe fn load_tail<L: Lanes>(self, l: L, i: usize, n: usize) -> L::V {
        // SAFETY: forwarded from the caller.
        unsafe { load_kept_tail(l, self.x, self.keep, i, n, self.fill) }
    }
    #[inline(always)]
    unsafe fn written<L: Lanes>(self, l: L, i: usize, y: L::V) -> L::V {
        // SAFETY: forwarded from the caller (N mask bytes at i).
        unsafe { l.select(l.kept(self.keep.add(i)), y, l.splat(self.value)) }
    }
    #[inline(always)]
    unsafe fn written_tail<L: Lanes>(self, l: L, i: usize, n: usize, y: L::V) -> L::V {
        // SAFETY: forwarded from the caller.
        unsafe { l.select(l.kept_tail(self.keep.add(i), n), y, l.splat(self.value)) }
    }
}

impl<T: Real> Source for Kept<T> {
    #[inline(always)]
    fn hint_own<L: Lanes>(self, l: L, i: usize) {
        l.prefetch(self.x.wrapping_add(i) as *const i8);
        if i % 64 < 2 * L::N {
            l.prefetch(self.keep.wrapping_add(i) as *const i8);
        }
    }
    #[inline(always)]
    unsafe fn max_of<L: Lanes>(self, l: L, i: usize, n: usize) -> f64 {
        let step = 2 * L::N;
        let (mut a, mut b) = (self.max_init(l), self.max_init(l));
        let mut k = 0;
        // SAFETY: every load is within the n elements; two chains hide the max's latency.
        unsafe {
            while k + 2 * step <= n {
                a = self.max_step(l, a, i + k);
                b = self.max_step(l, b, i + k + step);
                k += 2 * step;
            }
            if k + step <= n {
                a = self.max_step(l, a, i + k);
                k += step;
            }
            let m = max_keeping_nan(self.max_finish(l, a), self.max_finish(l, b));
            if k == n {
                return m;
            }
            max_keeping_nan(m, max_of_source(l, self, i + k, n - k))
        }
    }
    #[inline(always)]
    fn max_init<L: Lanes>(self, l: L) -> [L::V; 2] {
        l.max_init::<T>()
    }
    #[inline(always)]
    unsafe fn max_step<L: Lanes>(self, l: L, acc: [L::V; 2], i: usize) -> [L::V; 2] {
        // SAFETY: forwarded from the caller.
        unsafe { l.max_step_kept(acc, self.x.add(i), self.keep.add(i)) }
    }
    #[inline(always)]
    fn max_finish<L: Lanes>(self, l: L, acc: [L::V; 2]) -> f64 {
        l.max_finish::<T>(acc)
    }
    #[inline(always)]
    unsafe fn has_nan(self, i: usize, n: usize) -> bool {
        // SAFETY: forwarded from the caller.
        (i..i + n).any(|k| unsafe { *self.keep.add(k) != 0 && (*self.x.add(k)).to_f64().is_nan() })
    }
    #[inline(always)]
    unsafe fn reference(self, _n: usize) -> Option<LseState> {
        None
    }
}

/// How a state pass adds its terms `exp(x - m)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sum {
    /// Only the lanes below the max, the ties to it counted apart, the lanes below the exp's
    /// clamp dropped: float64 results, and a float32-grade row its whole sum cannot decide
    /// ([`whole_sum_decides`]).
    Split,
    /// Every lane: the ties' exact 1s and the clamped lanes' tiny values inside the sum.
    Whole,
    /// As [`Sum::Whole`], the exps taken without their clamp (no element of the row below
    /// it) and kept as they are.
    WholeUnclamped,
}

impl Sum {
    /// The mode of a partial last vector, whose lanes past the row are `-inf`: clamped.
    fn clamped(self) -> Self {
        match self {
            Sum::WholeUnclamped => Sum::Whole,
            other => other,
        }
    }
}

/// Sum of `exp(x - m)` over the `n` elements of `src` at `p` (`m` finite, `>=` every non-NaN
/// element) as `mode` says: [`Sum::Split`] over those `!= m` (NaN included) and the count of
/// those `== m`; the whole sums over all of them (as [`sum_step`] adds them) and a count of 0.
/// Fused with the max of the `qn` elements of the *next* block at `q`: the next block's DRAM
/// loads are issued while this block's exps run from L1, so memory and arithmetic overlap
/// instead of taking turns. Each step hints the next row's element at its position
/// ([`Ahead`]), and the next block's line [`AHEAD_BYTES`] past its max's loads.
///
/// # Safety
/// `n` readable elements at `p`, `qn` at `q`; with [`Sum::WholeUnclamped`], none below
/// `m + EXP_FLOOR`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sum_below_max_next<L: Lanes, S: Source>(
    l: L,
    src: S,
    p: usize,
    n: usize,
    m: f64,
    (q, qn): (usize, usize),
    terms: Option<*mut f64>,
    mode: Sum,
) -> (L::V, u64, f64) {
    let full = S::T::FULL;
    let mv = l.splat(m);
    let mut acc = [l.splat(0.0); 2];
    let mut mx = src.max_init(l);
    let mut ties = 0u64;
    let (mut i, mut qi) = (0, 0);
    let w = L::N;
    let ahead = AHEAD_BYTES / std::mem::size_of::<S::T>();
    // SAFETY: loads stay within the n elements at p and the qn at q; tail lanes are -inf
    // (below the max, exp = 0; neutral for the max).
    unsafe {
        // The terms go to terms[k..] where asked, by a function rather than a closure: a
        // closure called from four places may be left out of line.
        while i + 2 * w <= n {
            if qi + 2 * w <= qn {
                src.hint_own(l, q + qi + ahead);
                mx = src.max_step(l, mx, q + qi);
                qi += 2 * w;
            }
            src.hint_ahead(l, p + i, 2 * w);
            let (x0, x1) = (src.load(l, p + i), src.load(l, p + i + w));
            let te0 = sum_step(l, x0, mv, &mut acc[0], &mut ties, full, mode);
            let te1 = sum_step(l, x1, mv, &mut acc[1], &mut ties, full, mode);
            keep_terms::<L, S::T>(l, terms, mode, i, w, te0);
            keep_terms::<L, S::T>(l, terms, mode, i + w, w, te1);
            i += 2 * w;
        }
        if i + w <= n {
            let x = src.load(l, p + i);
            let te = sum_step(l, x, mv, &mut acc[0], &mut ties, full, mode);
            keep_terms::<L, S::T>(l, terms, mode, i, w, te);
            i += w;
        }
        if i < n {
            // The tail's lanes past n are -inf: clamped either way (the same bits above it).
            let x = src.load_tail(l, p + i, n - i);
            let te = sum_step(l, x, mv, &mut acc[1], &mut ties, full, mode.clamped());
            keep_terms::<L, S::T>(l, terms, mode, i, n - i, te);
        }
    }
    let mut next_max = src.max_finish(l, mx);
    if qi < qn {
        // SAFETY: the rest of the next block is readable.
        next_max = max_keeping_nan(next_max, unsafe { src.max_of(l, q + qi, qn - qi) });
    }
    (l.add(acc[0], acc[1]), ties, next_max)
}

/// Stores the `len <= N` terms `(t, e)` of a block at `terms[k..]` where asked: as
/// [`stored_term`] keeps them, or as they are where the exps were taken unclamped (a full
/// vector of a [`Sum::WholeUnclamped`] pass; the tail's were clamped).
///
/// # Safety
/// `terms`, when given, writable for `k + len` float64.
#[inline(always)]
unsafe fn keep_terms<L: Lanes, T: Real>(
    l: L,
    terms: Option<*mut f64>,
    mode: Sum,
    k: usize,
    len: usize,
    (t, e): (L::V, L::V),
) {
    if let Some(p) = terms {
        let v = if mode == Sum::WholeUnclamped && len == L::N {
            e
        } else {
            stored_term::<L, T>(l, t, e)
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            if len == L::N {
                l.store(p.add(k), v);
            } else {
                l.store_tail(p.add(k), v, len);
            }
        }
    }
}

/// The larger of two maxima, NaN if either is (`f64::max` would drop it).
#[inline(always)]
fn max_keeping_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Adds `exp(x - m)` to `acc` as `mode` says; returns every lane's `t = x - m` and
/// `exp_nonpos(t)`. [`Sum::Split`] adds only the lanes below `m` and counts the ties (popcount
/// on the scalar ports, which the vector code leaves idle); the whole sums add every lane, the
/// ties' exact 1s and the clamped lanes' tiny values included (see [`whole_sum_decides`]).
/// [`Sum::WholeUnclamped`] (no lane below the clamp) takes [`Lanes::exp_nonpos_unclamped`].
#[inline(always)]
fn sum_step<L: Lanes>(
    l: L,
    x: L::V,
    mv: L::V,
    acc: &mut L::V,
    ties: &mut u64,
    full: bool,
    mode: Sum,
) -> (L::V, L::V) {
    let t = l.sub(x, mv);
    let e = if mode == Sum::WholeUnclamped {
        l.exp_nonpos_unclamped(t, full)
    } else {
        l.exp_nonpos(t, full)
    };
    if mode == Sum::Split {
        let tie = l.eq(x, mv);
        *ties += l.count(tie);
        *acc = l.masked_add(*acc, l.summable(l.not(tie), t, full), e);
    } else {
        *acc = l.add(*acc, e);
    }
    (t, e)
}

/// Whether a float32-grade state summed whole (`S = 1 + excess` with the ties and the clamped
/// lanes inside the sum: [`Sum::Whole`]) knows its excess well enough: to `2^-28` relative, a
/// sixteenth of a float32 ULP of `log1p(excess)` at worst, against the sum's rounding bound of
/// `adds * 2^-53 * S` (`adds` per accumulator lane, the block merges and the final steps).
/// A row whose other terms are all tiny beside its max (the case the split exists for:
/// `logsumexp([0, -40])` is 4e-18, not 0) fails and is summed again with the ties apart. The
/// clamped lanes add under `n * 1e-307` to a sum of at least 1. Non-finite and empty states
/// pass (their excess is not used, or is exact).
#[inline(always)]
pub(crate) fn whole_sum_decides(s: LseState, adds: usize) -> bool {
    if !s.max.is_finite() || !s.excess.is_finite() {
        return true;
    }
    s.excess >= (1.0 + s.excess) * whole_sum_slack(adds)
}

/// The least `excess / S` a whole sum of `adds` rounded adds per lane decides:
/// `adds * 2^-53 <= 2^-28 * excess / S` ([`whole_sum_decides`]).
#[inline(always)]
pub(crate) fn whole_sum_slack(adds: usize) -> f64 {
    adds as f64 * f64::powi(2.0, -25)
}

/// Two-pass `(max, excess)` of a contiguous row, blocked for L1: each block's max, then the
/// exp-sum of the same block while it is in L1 (fused with the next block's max), blocks
/// merged by the online rule. Non-finite maxima go to the scalar reference, which owns the
/// NaN/inf semantics.
///
/// # Safety
/// `n` readable elements at `x`.
#[inline(always)]
pub(crate) unsafe fn state_two_pass<L: Lanes, T: Real>(l: L, x: Dense<T>, n: usize) -> LseState {
    // SAFETY: forwarded from the caller.
    match unsafe { state_two_pass_of(l, x, n) } {
        Some(s) => s,
        // SAFETY: as above (Dense always has its reference, so this is not reached).
        None => unsafe { reference_state(x.x, n) },
    }
}

/// [`state_two_pass`] over any [`Source`]; `None` where the row needs the scalar reference
/// and `src` has none (the caller then stages the row).
///
/// # Safety
/// `n` readable elements of `src`.
#[inline(always)]
pub(crate) unsafe fn state_two_pass_of<L: Lanes, S: Source>(
    l: L,
    src: S,
    n: usize,
) -> Option<LseState> {
    // SAFETY: forwarded from the caller.
    unsafe { state_two_pass_keeping(l, src, n, None) }.map(|(s, _)| s)
}

/// [`state_two_pass_of`], keeping each term the sums computed at `terms` (as [`stored_term`]
/// keeps it) when given: returns with the state the index from which the terms are
/// `exp(x - max)` for the row's final max (the start of the block that raised it last;
/// earlier terms were taken against a smaller running max).
///
/// # Safety
/// `n` readable elements of `src`; `n` writable float64 at `terms` when given.
#[inline(always)]
unsafe fn state_two_pass_keeping<L: Lanes, S: Source>(
    l: L,
    src: S,
    n: usize,
    terms: Option<*mut f64>,
) -> Option<(LseState, usize)> {
    // float32-grade rows are summed whole first (no tie compare, no clamp mask: a fifth of
    // the pass's vector work), and again with the ties apart where that cannot decide.
    let full = S::T::FULL;
    // With terms to keep, a float32-grade whole sum of a dense row that spans less than the
    // exp's clamp (its least element within 708 of its max: no `-inf`) takes its exps
    // unclamped, and its kept terms need no zeroing either; a pass of float32 max and min
    // decides it, where the level takes the min in that pass (a masked source, whose `-inf`
    // lanes always fall below, or a level without, keeps the clamp and skips the pass).
    let unclamped = !full && S::takes_min::<L>() && terms.is_some() && {
        // SAFETY: forwarded from the caller.
        let (top, least) = unsafe { src.range_of(l, 0, n) };
        within_clamp(top, least)
    };
    let mode = if full {
        Sum::Split
    } else if unclamped {
        Sum::WholeUnclamped
    } else {
        Sum::Whole
    };
    // SAFETY: forwarded from the caller.
    let whole = unsafe { state_two_pass_summed(l, src, n, terms, mode) }?;
    let b = S::T::BLOCK;
    let adds = n.min(b).div_ceil(2 * L::N) + 2 * n.div_ceil(b) + 8;
    if full || whole_sum_decides(whole.0, adds) {
        return Some(whole);
    }
    // SAFETY: as above.
    unsafe { state_two_pass_summed(l, src, n, terms, Sum::Split) }
}

/// [`state_two_pass_keeping`] with its terms added as `mode` says.
///
/// # Safety
/// As [`state_two_pass_keeping`].
#[inline(always)]
unsafe fn state_two_pass_summed<L: Lanes, S: Source>(
    l: L,
    src: S,
    n: usize,
    terms: Option<*mut f64>,
    mode: Sum,
) -> Option<(LseState, usize)> {
    let mut final_from = 0;
    let mut m = f64::NEG_INFINITY;
    let mut below = l.splat(0.0);
    let mut ties = 0u64;
    let mut start = 0;
    let mut len = S::T::BLOCK.min(n);
    // SAFETY: the first block lies inside the row.
    let mut bm = unsafe { src.max_of(l, 0, len) };
    while len > 0 {
        let next = start + len;
        let next_len = S::T::BLOCK.min(n - next);
        let next_max;
        if bm.is_finite() {
            if bm > m {
                // Everything so far is below the new max: fold the ties into the sum, rescale.
                let scale = (m - bm).exp();
                below = l.mul(below, l.splat(scale));
                let mut carried = [0.0; 8];
                carried[0] = ties as f64 * scale;
                below = l.add(below, l.of_lanes(&carried));
                ties = 0;
                m = bm;
                final_from = start;
            }
            let kept = terms.map(|p| p.wrapping_add(start));
            let q = (next, next_len);
            // SAFETY: this block and the next lie inside the row, its terms inside `terms`.
            let (b, t, nm) = unsafe {
                // The unclamped pass as its own copy of the loop (a constant mode).
                if mode == Sum::WholeUnclamped {
                    let unclamped = Sum::WholeUnclamped;
                    sum_below_max_next(l, src, start, len, m, q, kept, unclamped)
                } else {
                    sum_below_max_next(l, src, start, len, m, q, kept, mode)
                }
            };
            below = l.add(below, b);
            ties += t;
            next_max = nm;
        // SAFETY: as above.
        } else if bm == f64::NEG_INFINITY && !unsafe { src.has_nan(start, len) } {
            if let Some(p) = terms {
                // A block of -inf: every term is exp(-inf) = 0.
                // SAFETY: the block's terms lie inside `terms`.
                unsafe { std::ptr::write_bytes(p.add(start), 0, len) };
            }
            // SAFETY: as above.
            next_max = unsafe { src.max_of(l, next, next_len) };
        } else {
            // SAFETY: the whole row is readable.
            return unsafe { src.reference(n) }.map(|s| (s, n));
        }
        start = next;
        len = next_len;
        bm = next_max;
    }
    Some((finish_state(m, l.reduce_add(below), ties), final_from))
}

/// [`state_two_pass`] of a row with each term its sums computed kept at `terms` (as
/// [`stored_term`] keeps it), for a write that would otherwise compute it again: the same
/// state bits. Returns the state and the index from which the kept terms are `exp(x - max)`
/// for the row's max (before it they were taken against a smaller running max, and the
/// write computes them again). `None` where the max is not finite (the caller takes
/// [`state_two_pass`]). Over a [`Kept`] source the masked terms are kept as 0.
///
/// # Safety
/// `n` readable elements of `src`, `n` writable float64 at `terms`.
#[inline(always)]
pub(crate) unsafe fn state_two_pass_stored<L: Lanes, S: Source>(
    l: L,
    src: S,
    n: usize,
    terms: *mut f64,
) -> Option<(LseState, usize)> {
    // SAFETY: forwarded from the caller.
    let (state, from) = unsafe { state_two_pass_keeping(l, src, n, Some(terms)) }?;
    state.max.is_finite().then_some((state, from))
}

/// Softmax of a row that fits in cache with one exp per element: the row's max, then one
/// pass that stores each `exp(x - max)` in float64 at `e` and sums them, then `out = e / S`
/// from there. Over a [`Kept`] source the masked lanes are `-inf`, whose stored exp is 0: the
/// output is 0 there, the staged row's value, with no fill pass. Unlike the log-sum-exp states, the sum keeps no ties apart (only `S` is
/// needed, not `S - 1`), and terms a float32-grade exp clamps (`<= exp(-708)`) stay in it:
/// they change `S` by less than `n * 1e-307`. Each output is the float64 exp times `1 / S`,
/// rounded once, as in the two-exp write ([`ExpScaled`]). Returns `false`, having written
/// nothing, when the max or the sum is not finite (a NaN or an infinity in the row): the
/// caller takes the reference.
///
/// # Safety
/// `n` readable elements of `src`, `n` writable at `out` (disjoint from or equal to the
/// source's elements), `n` writable float64 at `e`.
#[inline(always)]
pub(crate) unsafe fn softmax_stored<L: Lanes, S: Source>(
    l: L,
    src: S,
    out: *mut S::T,
    n: usize,
    e: *mut f64,
    stream: bool,
) -> bool {
    // SAFETY: forwarded from the caller; every e[k] is written by the sum before it is read.
    unsafe {
        let (m, least) = src.range_of(l, 0, n);
        if !m.is_finite() {
            return false;
        }
        let total = sum_exp_store(l, src, n, m, least, e);
        if !total.is_finite() {
            return false;
        }
        map_row(l, e as *const f64, out, n, stream, Scale(1.0 / total));
    }
    true
}

/// Whether every element of a row with max `top` and least element `least` (`-inf` where
/// unknown) lies within the float32-grade exp's clamp: its exps may be taken unclamped.
#[inline(always)]
fn within_clamp(top: f64, least: f64) -> bool {
    least - top >= super::consts::EXP_FLOOR
}

/// `exp(t)` for `t <= 0` as the stored softmax keeps it: float32-grade exps are clamped at
/// `EXP_FLOOR` (a normal number), so the lanes below it (-inf among them) are zeroed here;
/// otherwise the write's `e / S` would compute a float64 underflow, a microcode assist per
/// vector. NaN stays NaN (the comparison is false), so a NaN row still shows in the sum.
#[inline(always)]
fn stored_exp<L: Lanes, T: Real>(l: L, t: L::V) -> L::V {
    stored_term::<L, T>(l, t, l.exp_nonpos(t, T::FULL))
}

/// `e = exp_nonpos(t)` as it is kept for a later write: float32-grade lanes below the clamp
/// (`t < EXP_FLOOR`) as 0, as [`stored_exp`] explains.
#[inline(always)]
pub(crate) fn stored_term<L: Lanes, T: Real>(l: L, t: L::V, e: L::V) -> L::V {
    if T::FULL {
        return e;
    }
    l.select(l.gt(l.splat(super::consts::EXP_FLOOR), t), l.splat(0.0), e)
}

/// `sum exp(x - m)` over the `n` elements of `src` (`m` finite, `>=` every non-NaN element; a
/// NaN makes the sum NaN), storing each term at `e` (as [`stored_term`] keeps it). Where the
/// row's least element `least` (from the max pass; `-inf` where unknown) lies within the
/// clamp of `m`, float32-grade terms are taken without the exp's clamp and without zeroing the
/// lanes below it (three vector ops per vector fewer; the same bits). A NaN the max pass hid
/// from `least` makes the sum NaN, which the caller sees.
///
/// # Safety
/// `n` readable elements of `src`, `n` writable float64 at `e`.
#[inline(always)]
unsafe fn sum_exp_store<L: Lanes, S: Source>(
    l: L,
    src: S,
    n: usize,
    m: f64,
    least: f64,
    e: *mut f64,
) -> f64 {
    // SAFETY: forwarded from the caller.
    unsafe {
        if !S::T::FULL && within_clamp(m, least) {
            sum_exp_store_with(l, src, n, m, e, false)
        } else {
            sum_exp_store_with(l, src, n, m, e, true)
        }
    }
}

/// [`sum_exp_store`]'s pass: with `clamp`, each term as [`stored_exp`] takes it; without, by
/// [`Lanes::exp_nonpos_unclamped`] (the last partial vector still clamped: its lanes past `n`
/// are `-inf`).
///
/// # Safety
/// As [`sum_exp_store`], and without `clamp` no element below `m + EXP_FLOOR`.
#[inline(always)]
unsafe fn sum_exp_store_with<L: Lanes, S: Source>(
    l: L,
    src: S,
    n: usize,
    m: f64,
    e: *mut f64,
    clamp: bool,
) -> f64 {
    let mv = l.splat(m);
    let mut acc = [l.splat(0.0); 2];
    let term = |t: L::V| {
        if clamp {
            stored_exp::<L, S::T>(l, t)
        } else {
            l.exp_nonpos_unclamped(t, S::T::FULL)
        }
    };
    let (w, mut i) = (L::N, 0);
    // SAFETY: loads and stores stay within the n elements; tail lanes are -inf (exp 0, or a
    // clamped term under 1e-307) and are not stored.
    unsafe {
        while i + 2 * w <= n {
            src.hint_ahead(l, i, 2 * w);
            for (k, acc) in acc.iter_mut().enumerate() {
                let v = term(l.sub(src.load(l, i + k * w), mv));
                l.store(e.add(i + k * w), v);
                *acc = l.add(*acc, v);
            }
            i += 2 * w;
        }
        if i + w <= n {
            let v = term(l.sub(src.load(l, i), mv));
            l.store(e.add(i), v);
            acc[0] = l.add(acc[0], v);
            i += w;
        }
        if i < n {
            let v = stored_exp::<L, S::T>(l, l.sub(src.load_tail(l, i, n - i), mv));
            l.store_tail(e.add(i), v, n - i);
            acc[1] = l.add(acc[1], v);
        }
    }
    l.reduce_add(l.add(acc[0], acc[1]))
}

/// Per-lane online state: running max, sum of exp(x - max) over the elements below it, and
/// the count of elements equal to it (kept apart so the excess keeps tiny terms).
#[derive(Clone, Copy)]
pub(crate) struct OnlineLanes<L: Lanes> {
    m: L::V,
    below: L::V,
    ties: L::V,
}

impl<L: Lanes> OnlineLanes<L> {
    #[inline(always)]
    pub(crate) fn new(l: L) -> Self {
        OnlineLanes {
            m: l.splat(f64::NEG_INFINITY),
            below: l.splat(0.0),
            ties: l.splat(0.0),
        }
    }

    /// Adds one element per lane (Milakov & Gimelshein's update, rescaling only the lanes
    /// whose max grows; that branch is rare after the first few vectors of a row).
    #[inline(always)]
    pub(crate) fn push(&mut self, l: L, x: L::V, full: bool) {
        let gt = l.gt(x, self.m);
        if l.any(gt) {
            let m_new = l.select(gt, x, self.m);
            // exp(m - m_new) is 1 on unchanged lanes and 0 when m was -inf or m_new is +inf.
            let scale = l.exp(l.sub(self.m, m_new), full);
            let total = l.add(self.below, self.ties);
            self.below = l.select(gt, l.mul(total, scale), self.below);
            self.ties = l.select(gt, l.splat(0.0), self.ties);
            self.m = m_new;
        }
        // Ties compare x with m (not x - m with 0), so +inf == +inf is a tie, not NaN.
        let tie = l.eq(x, self.m);
        let t = l.sub(x, self.m);
        let e = l.exp_nonpos(t, full);
        self.below = l.masked_add(self.below, l.summable(l.not(tie), t, full), e);
        self.ties = l.masked_add(self.ties, tie, l.splat(1.0));
    }

    /// Lane `k`'s state, `k < N`.
    #[inline(always)]
    pub(crate) fn states(&self, l: L) -> [LseState; 8] {
        let (m, b, t) = (
            l.to_lanes(self.m),
            l.to_lanes(self.below),
            l.to_lanes(self.ties),
        );
        // `from_fn`, not `array8`: the eight lane finishes written out in the long-row kernels
        // made logsumexp of one row of 2^26 take 1.4x the time on AVX2.
        std::array::from_fn(|k| lane_state(m[k], b[k], t[k]))
    }
}

/// One-pass `(max, excess)` of a contiguous row: `2N` online lanes, merged in lane order.
///
/// # Safety
/// `n` readable elements at `x`.
#[inline(always)]
pub(crate) unsafe fn state_online<L: Lanes, T: Real>(l: L, x: *const T, n: usize) -> LseState {
    let mut lanes = [OnlineLanes::new(l), OnlineLanes::new(l)];
    let (w, mut i) = (L::N, 0);
    // SAFETY: loads stay within the n elements; tail lanes are -inf (no contribution).
    unsafe {
        while i + 2 * w <= n {
            lanes[0].push(l, l.load(x.add(i)), T::FULL);
            lanes[1].push(l, l.load(x.add(i + w)), T::FULL);
            i += 2 * w;
        }
        if i + w <= n {
            lanes[0].push(l, l.load(x.add(i)), T::FULL);
            i += w;
        }
        if i < n {
            lanes[1].push(l, l.load_tail(x.add(i), n - i), T::FULL);
        }
    }
    let mut s = LseState::EMPTY;
    for ln in &lanes {
        for st in ln.states(l).into_iter().take(w) {
            s = s.merge(st);
        }
    }
    s
}

/// An elementwise map of float64 lanes (the softmax and log_softmax writes), and the same
/// map for the scalar level.
pub(crate) trait LaneMap: Copy {
    fn apply<L: Lanes>(self, l: L, v: L::V) -> L::V;
    fn scalar(self, v: f64) -> f64;
}

/// `scale * exp(x - shift)`, with the float64 exp when `full` (float64 results).
#[derive(Clone, Copy)]
pub(crate) struct ExpScaled {
    pub shift: f64,
    pub scale: f64,
    pub full: bool,
}

impl LaneMap for ExpScaled {
    #[inline(always)]
    fn apply<L: Lanes>(self, l: L, v: L::V) -> L::V {
        l.mul(
            l.exp(l.sub(v, l.splat(self.shift)), self.full),
            l.splat(self.scale),
        )
    }
    fn scalar(self, v: f64) -> f64 {
        self.scale * (v - self.shift).exp()
    }
}

/// `exp(t)` for `t <= 0` or NaN (0 for `-inf` and wherever [`Lanes::summable`] drops the
/// term, and for `t > 0`), with the float64 exp when `full`: the terms of a sum below its max.
#[derive(Clone, Copy)]
pub(crate) struct ExpNonpos {
    pub full: bool,
}

impl LaneMap for ExpNonpos {
    #[inline(always)]
    fn apply<L: Lanes>(self, l: L, t: L::V) -> L::V {
        let nonpos = l.not(l.gt(t, l.splat(0.0)));
        let keep = l.summable(nonpos, t, self.full);
        l.select(keep, l.exp_nonpos(t, self.full), l.splat(0.0))
    }
    fn scalar(self, t: f64) -> f64 {
        if t > 0.0 {
            0.0
        } else {
            t.exp()
        }
    }
}

/// `scale * x`.
#[derive(Clone, Copy)]
pub(crate) struct Scale(pub f64);

impl LaneMap for Scale {
    #[inline(always)]
    fn apply<L: Lanes>(self, l: L, v: L::V) -> L::V {
        l.mul(v, l.splat(self.0))
    }
    fn scalar(self, v: f64) -> f64 {
        self.0 * v
    }
}

/// `(x - shift) - log_total`.
#[derive(Clone, Copy)]
pub(crate) struct ShiftSub {
    pub shift: f64,
    pub log_total: f64,
}

impl LaneMap for ShiftSub {
    #[inline(always)]
    fn apply<L: Lanes>(self, l: L, v: L::V) -> L::V {
        l.sub(l.sub(v, l.splat(self.shift)), l.splat(self.log_total))
    }
    fn scalar(self, v: f64) -> f64 {
        (v - self.shift) - self.log_total
    }
}

/// Applies `f` to `N`-lane vectors of `x` (widened), writing `out` (rounded; `out` may equal
/// `x`: each vector is read before it is written). With `stream` (where the level streams),
/// the aligned body uses non-temporal stores: an output far larger than the caches then costs
/// no read-for-ownership traffic. Cached stores hint the output line [`AHEAD_BYTES`] on (the
/// next rows' lines, for rows shorter than that): a store that misses waits on its line, and
/// the hardware's streams do not fetch ahead of stores fast enough. Measured on a 2-core
/// Intel Xeon, 2^26 float32 from DRAM, 2 threads, ms: rows of 1000 softmax 29.9 -> 22.8,
/// log_softmax 29.8 -> 24.0, the loss with its gradient 52.8 -> 47.1; rows of 500 log_softmax
/// 29.7 -> 25.3; in cache no change.
///
/// # Safety
/// `n` readable elements at `x`, `n` writable at `out`, disjoint or equal.
#[inline(always)]
pub(crate) unsafe fn map_row<L: Lanes, S: Real, T: Real>(
    l: L,
    x: *const S,
    out: *mut T,
    n: usize,
    stream: bool,
    f: impl LaneMap,
) {
    // SAFETY: forwarded from the caller.
    unsafe { map_row_of(l, Dense::new(x), out, n, stream, f) }
}

/// [`map_row`] over any [`Load`] (each vector stored as [`Load::written`] makes it).
///
/// # Safety
/// `n` readable elements of `src`, `n` writable at `out`, disjoint or equal.
#[inline(always)]
pub(crate) unsafe fn map_row_of<L: Lanes, S: Load, T: Real>(
    l: L,
    src: S,
    out: *mut T,
    n: usize,
    stream: bool,
    f: impl LaneMap,
) {
    let (w, mut i) = (L::N, 0);
    // SAFETY: reads and writes stay within the n elements; stream stores are aligned.
    unsafe {
        if stream && L::STREAMS {
            // Elements up to the next vector boundary of `out`, done masked.
            let size = std::mem::size_of::<T>();
            let head = ((w * size - (out as usize) % (w * size)) % (w * size) / size).min(n);
            if head > 0 {
                let y = f.apply(l, src.load_tail(l, 0, head));
                l.store_tail(out, src.written_tail(l, 0, head, y), head);
                i = head;
            }
            while i + w <= n {
                src.hint_ahead(l, i, w);
                let y = f.apply(l, src.load(l, i));
                l.stream(out.add(i), src.written(l, i, y));
                i += w;
            }
            l.fence();
        }
        let size = std::mem::size_of::<T>();
        while i + w <= n {
            src.hint_ahead(l, i, w);
            if (i * size) % 64 < w * size {
                // The output line AHEAD_BYTES on, once a line: cached stores then find their
                // lines in L1 rather than each waiting on its own read for ownership.
                let at = (out as *const u8).wrapping_add(i * size + AHEAD_BYTES);
                l.prefetch(at as *const i8);
            }
            let y = f.apply(l, src.load(l, i));
            l.store(out.add(i), src.written(l, i, y));
            i += w;
        }
        if i < n {
            let y = f.apply(l, src.load_tail(l, i, n - i));
            l.store_tail(out.add(i), src.written_tail(l, i, n - i, y), n - i);
        }
    }
}

/// Online states of `w <= COL_TILE` adjacent columns of an `(n, inner)` C-order slab at `x`:
/// one streaming pass down the rows, each row reading `w` contiguous elements. With `keep`
/// (mask bytes laid out as `x`), the elements whose byte is 0 read as `-inf`, as a staged
/// copy holds them, and are never looked at.
///
/// # Safety
/// `x.add(k * inner + j)` (and `keep.add(k * inner + j)`) readable for `k < n`, `j < w`;
/// `out` holds `w` states.
#[inline(always)]
pub(crate) unsafe fn column_states<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: Option<*const u8>,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    /// How many rows ahead the column kernel prefetches.
    const PREFETCH_ROWS: usize = 2;
    // Every level has N >= 2; only the first `vecs` entries are initialised and used.
    let mut lanes = [MaybeUninit::<OnlineLanes<L>>::uninit(); COL_TILE / 2];
    let vecs = w.div_ceil(L::N);
    for ln in lanes.iter_mut().take(vecs) {
        ln.write(OnlineLanes::new(l));
    }
    for k in 0..n {
        // SAFETY: row k of the tile holds w readable elements.
        let row = unsafe { x.add(k * inner) };
        // Rows are `inner` apart, usually on different pages, where hardware prefetchers
        // stop: fetch the tile's segment PREFETCH_ROWS rows ahead (never faults).
        let ahead = row.wrapping_add(PREFETCH_ROWS * inner) as *const i8;
        for line in (0..w * std::mem::size_of::<T>()).step_by(64) {
            l.prefetch(ahead.wrapping_add(line));
        }
        let kept = keep.map(|kp| kp.wrapping_add(k * inner));
        if let Some(kr) = kept {
            let ahead = kr.wrapping_add(PREFETCH_ROWS * inner) as *const i8;
            for line in (0..w).step_by(64) {
                l.prefetch(ahead.wrapping_add(line));
            }
        }
        for (v, ln) in lanes.iter_mut().enumerate().take(vecs) {
            let (left, i) = (w - L::N * v, L::N * v);
            let ninf = f64::NEG_INFINITY;
            // SAFETY: as above; the last vector is -inf past the tile width. Entry v < vecs
            // was initialised above.
            unsafe {
                let xv = match (kept, left >= L::N) {
                    (None, true) => l.load(row.add(i)),
                    (None, false) => l.load_tail(row.add(i), left),
                    (Some(kr), true) => load_kept(l, row, kr, i, ninf),
                    (Some(kr), false) => load_kept_tail(l, row, kr, i, left, ninf),
                };
                ln.assume_init_mut().push(l, xv, T::FULL);
            }
        }
    }
    for (v, ln) in lanes.iter().enumerate().take(vecs) {
        // SAFETY: entry v < vecs was initialised above.
        let states = unsafe { ln.assume_init_ref() }.states(l);
        for (k, s) in states.into_iter().enumerate().take(L::N) {
            if L::N * v + k < w {
                out[L::N * v + k] = s;
            }
        }
    }
}

/// `out[j] = a[j] * exp(x[j] - b[j])` (`exp`) or `out[j] = (x[j] - b[j]) - a[j]` for
/// `j < n`: the column kernels' write pass, each column with its own shift and scale/log.
/// `out` may equal `x`.
///
/// # Safety
/// `x`, `b`, `a` readable and `out` writable for `n` elements; `out` disjoint from or equal
/// to `x`.
#[inline(always)]
pub(crate) unsafe fn lanes_write<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    out: *mut T,
    n: usize,
    b: *const f64,
    a: *const f64,
    exp: bool,
) {
    let (w, mut i) = (L::N, 0);
    // SAFETY: all arrays hold n elements; each vector is read before it is written.
    unsafe {
        while i + w <= n {
            let y = column_write(
                l,
                l.load(x.add(i)),
                l.load(b.add(i)),
                l.load(a.add(i)),
                exp,
                T::FULL,
            );
            l.store(out.add(i), y);
            i += w;
        }
        if i < n {
            let k = n - i;
            let (bv, av) = (l.load_tail(b.add(i), k), l.load_tail(a.add(i), k));
            let y = column_write(l, l.load_tail(x.add(i), k), bv, av, exp, T::FULL);
            l.store_tail(out.add(i), y, k);
        }
    }
}

/// One vector of [`lanes_write`].
#[inline(always)]
fn column_write<L: Lanes>(l: L, v: L::V, bv: L::V, av: L::V, exp: bool, full: bool) -> L::V {
    if exp {
        l.mul(av, l.exp(l.sub(v, bv), full))
    } else {
        l.sub(l.sub(v, bv), av)
    }
}

/// `out[k] = keep[k] != 0 ? x[k] : fill` for `k < n` (`out` may equal `x`): the mask applied
/// in registers as the elements are read, the masked lanes never looked at.
///
/// # Safety
/// `x` and `keep` readable and `out` writable for `n` elements; `out` disjoint from or equal
/// to `x`.
#[inline(always)]
pub(super) unsafe fn select_kept<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: *const u8,
    out: *mut T,
    n: usize,
    fill: f64,
) {
    let f = l.splat(fill);
    let w = L::N;
    let mut i = 0;
    // SAFETY: every access is within the n elements; element k is read before it is written.
    unsafe {
        while i + 2 * w <= n {
            let a = l.select(l.kept(keep.add(i)), l.load_apart(x.add(i)), f);
            let b = l.select(l.kept(keep.add(i + w)), l.load_apart(x.add(i + w)), f);
            l.store(out.add(i), a);
            l.store(out.add(i + w), b);
            i += 2 * w;
        }
        while i < n {
            if *keep.add(i) == 0 {
                *out.add(i) = T::from_f64(fill);
            } else if !std::ptr::eq(x, out) {
                *out.add(i) = *x.add(i);
            }
            i += 1;
        }
    }
}

/// `max + log1p(excess)` of each state into `out[k]`, rounded to `T`, `N` states per vector
/// with the level's vector log1p (a libm call per row cost 14% of rows of 100); a state whose
/// max is not finite gives its max, as [`LseState::logsumexp`].
///
/// # Safety
/// `out` writable for `states.len()` elements.
#[inline(always)]
pub(crate) unsafe fn logsumexp_of_states<L: Lanes, T: Real>(
    l: L,
    states: &[LseState],
    out: *mut T,
) {
    for (i, group) in states.chunks(L::N).enumerate() {
        let (mut m, mut e) = ([0.0; 8], [0.0; 8]);
        for (k, s) in group.iter().enumerate() {
            (m[k], e[k]) = (s.max, s.excess);
        }
        let (m, e) = (l.of_lanes(&m), l.of_lanes(&e));
        // m - m is 0 exactly where m is finite (NaN for infinities and NaN).
        let finite = l.eq(l.sub(m, m), l.splat(0.0));
        let v = l.select(finite, l.add(m, l.log1p(e, T::FULL)), m);
        // SAFETY: out holds states.len() elements; this group's are at i * N.
        unsafe {
            if group.len() == L::N {
                l.store(out.add(i * L::N), v);
            } else {
                l.store_tail(out.add(i * L::N), v, group.len());
            }
        }
    }
}

/// `log1p(excess)` of each state into `out` (`out.len() == states.len()`), `N` states per
/// vector, as [`Lanes::log1p`] for results of type `T`: lane by lane, so a state gets the same
/// bits alone or among others.
#[inline(always)]
pub(crate) fn log_totals_of_states<L: Lanes, T: Real>(l: L, states: &[LseState], out: &mut [f64]) {
    for (group, o) in states.chunks(L::N).zip(out.chunks_mut(L::N)) {
        let mut e = [0.0; 8];
        for (k, s) in group.iter().enumerate() {
            e[k] = s.excess;
        }
        let v = l.to_lanes(l.log1p(l.of_lanes(&e), T::FULL));
        o.copy_from_slice(&v[..o.len()]);
    }
}
