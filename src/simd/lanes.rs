//! The lane abstraction: what an instruction set provides, and the one dispatch per call.
//!
//! Each algorithm ([`super::rows`], [`super::short`]) is written once, generic over
//! [`Lanes`]: a vector of `N` float64 lanes with its arithmetic, compares, masks, widening
//! loads, rounding stores, horizontal reductions and the instruction set's own exp. An
//! implementation is a zero-sized token (`avx512::Avx512`, `avx2::Avx2`, `neon::Neon`) that
//! only [`dispatch`] creates, inside a `#[target_feature]` function entered after run-time
//! detection. Every primitive and every algorithm is `#[inline(always)]`, so the whole kernel
//! is compiled into that function with the level's instructions; the level is matched once
//! per call, at the top. Genuinely instruction-set-specific tricks (the `vscalefpd` exp, the
//! register transposes of short rows, streaming stores, float32-lane maxima) are provided
//! methods that an implementation overrides, never a second copy of an algorithm.

use super::short::IGNORED;
use super::{scalar, Level};
use crate::real::Real;
use std::mem::MaybeUninit;

/// An instruction set's vector of `N <= 8` float64 lanes and its primitives.
///
/// # Safety
/// A value of an implementing type proves that the CPU supports its instructions: only
/// [`dispatch`] may create one, after checking the level.
pub unsafe trait Lanes: Copy {
    /// `N` float64 lanes.
    type V: Copy;
    /// One flag per lane.
    type M: Copy;
    const N: usize;
    /// Whether [`Lanes::stream`] is a non-temporal store.
    const STREAMS: bool = false;
    /// Short rows at least this long under a dense `where=` mask are staged (the masked
    /// elements `-inf`) before the short-row kernels load them; shorter ones are masked as
    /// they are loaded ([`Lanes::load_columns_kept`]).
    const STAGED_FROM: usize = 0;

    fn splat(self, v: f64) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lanes 0..N as an array (the rest zero).
    fn to_lanes(self, v: Self::V) -> [f64; 8];
    /// A vector from lanes 0..N of `a`.
    fn of_lanes(self, a: &[f64; 8]) -> Self::V;
    fn reduce_add(self, v: Self::V) -> f64;
    /// The largest lane (a NaN lane may or may not show; callers re-check).
    fn reduce_max(self, v: Self::V) -> f64;

    /// `a == b` (ordered: false for NaN).
    fn eq(self, a: Self::V, b: Self::V) -> Self::M;
    /// `a > b` (ordered).
    fn gt(self, a: Self::V, b: Self::V) -> Self::M;
    fn not(self, m: Self::M) -> Self::M;
    /// `!(a == b)` (true for NaN), as one compare where the level has one: a select on an
    /// inverted mask compiles to an add and a blend where a masked add would do.
    #[inline(always)]
    fn ne(self, a: Self::V, b: Self::V) -> Self::M {
        self.not(self.eq(a, b))
    }
    fn any(self, m: Self::M) -> bool;
    fn count(self, m: Self::M) -> u64;
    /// The flagged lanes as bits, lane `k` at bit `k`.
    #[inline(always)]
    fn bits(self, m: Self::M) -> u8 {
        let v = self.to_lanes(self.select(m, self.splat(1.0), self.splat(0.0)));
        (0..Self::N).fold(0, |b, k| b | (u8::from(v[k] != 0.0) << k))
    }
    /// `m ? a : b` per lane.
    fn select(self, m: Self::M, a: Self::V, b: Self::V) -> Self::V;
    /// The lanes whose mask byte (`N` bytes at `keep`) is nonzero.
    ///
    /// # Safety
    /// `N` readable bytes at `keep`.
    #[inline(always)]
    unsafe fn kept(self, keep: *const u8) -> Self::M {
        let mut a = [0.0; 8];
        for (r, v) in a.iter_mut().enumerate().take(Self::N) {
            // SAFETY: byte r < N is readable.
            *v = if unsafe { *keep.add(r) } != 0 {
                1.0
            } else {
                0.0
            };
        }
        self.eq(self.of_lanes(&a), self.splat(1.0))
    }
    /// The target logits `x_t`, weights `w_t` and kept rows of `N` short rows at `x`, row `k`'s
    /// class `c` at `x[k * pitch + c * step]` (rows `pitch` apart, `step` 1; or the columns a
    /// group's state leaves, `pitch` 1 and `step` `N`), whose classes are `class[..N]` and
    /// weights `weight[..N]`: a row whose class is [`IGNORED`] takes `fill` (its max) as `x_t`,
    /// 0 as `w_t`, and is not kept.
    ///
    /// # Safety
    /// `class` and `weight` hold `N` entries; every class that is not [`IGNORED`] indexes
    /// inside its row, and `(N - 1) * pitch + n * step` fits an `i32`.
    #[inline(always)]
    unsafe fn index_terms<T: Real>(
        self,
        x: *const T,
        (pitch, step): (usize, usize),
        class: &[u32],
        weight: &[f64],
        fill: Self::V,
    ) -> (Self::V, Self::V, Self::M) {
        let (mut xt, mut wt, mut kept) = (self.to_lanes(fill), [0.0; 8], [0.0; 8]);
        for k in 0..Self::N {
            if class[k] != IGNORED {
                wt[k] = weight[k];
                kept[k] = 1.0;
                // SAFETY: the class indexes inside row k (the caller's contract).
                xt[k] = unsafe { *x.add(k * pitch + class[k] as usize * step) }.to_f64();
            }
        }
        let kept = self.gt(self.of_lanes(&kept), self.splat(0.0));
        (self.of_lanes(&xt), self.of_lanes(&wt), kept)
    }
    /// [`Lanes::kept`] of the `n < N` mask bytes at `keep` (the other lanes not kept). The
    /// bytes are gathered into bits rather than copied into a word and loaded: a load of
    /// bytes just stored one by one waits for them to reach the cache.
    ///
    /// # Safety
    /// `n` readable bytes at `keep`.
    #[inline(always)]
    unsafe fn kept_tail(self, keep: *const u8, n: usize) -> Self::M {
        let mut bits = 0u8;
        for k in 0..n.min(8) {
            // SAFETY: byte k < n is readable.
            bits |= u8::from(unsafe { *keep.add(k) } != 0) << k;
        }
        self.lanes_of_bits(bits)
    }
    /// The lanes whose bit is set in `bits` (bit `r` for lane `r`).
    #[inline(always)]
    fn lanes_of_bits(self, bits: u8) -> Self::M {
        // Bit r to byte r of a word: the lanes' mask bytes.
        let spread = (u64::from(bits) * 0x0101_0101_0101_0101) & 0x8040_2010_0804_0201;
        let bytes = spread.to_le_bytes();
        // SAFETY: 8 readable bytes.
        unsafe { self.kept(bytes.as_ptr()) }
    }
    /// [`Lanes::load_columns`] under a `where=` mask: the masked elements read as `-inf`.
    /// Row `r`'s 8 mask bytes at `keep + r * lane` hold its columns `c0..c0 + w` at bytes
    /// `skip..skip + w` (`skip + w <= 8`), a nonzero byte where the row keeps the column.
    /// (A level may mask each row before its transpose.)
    ///
    /// # Safety
    /// As [`Lanes::load_columns`], and the 8 bytes at `keep + r * lane` readable for every
    /// `r < rows`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn load_columns_kept<T: Real>(
        self,
        row: impl Fn(usize) -> *const T,
        rows: usize,
        c0: usize,
        w: usize,
        room: usize,
        (keep, lane, skip): (*const u8, usize, usize),
        out: &mut [MaybeUninit<Self::V>],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            let bits = word_bits(keep, lane, rows.min(Self::N), skip);
            load_columns_of_bits(self, row, rows, c0, w, room, bits, out)
        }
    }
    /// `acc + e` on the lanes of `m`, `acc` elsewhere.
    #[inline(always)]
    fn masked_add(self, acc: Self::V, m: Self::M, e: Self::V) -> Self::V {
        self.select(m, self.add(acc, e), acc)
    }
    /// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < rows`, `c < cols`: a
    /// block of rows turned into columns (a class axis before the last made rows). Element by
    /// element here; a level may move whole tiles.
    ///
    /// # Safety
    /// The `rows x cols` elements of `src` readable and of `dst` writable, disjoint.
    #[inline(always)]
    unsafe fn transpose<T: Real>(
        self,
        (src, src_stride): (*const T, usize),
        (dst, dst_stride): (*mut T, usize),
        rows: usize,
        cols: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { transpose_by_element(src, src_stride, dst, dst_stride, (0, rows), (0, cols)) }
    }

    /// `N` elements widened to float64.
    ///
    /// # Safety
    /// `N` readable elements at `p`.
    unsafe fn load<T: Real>(self, p: *const T) -> Self::V;
    /// [`Lanes::load`] kept apart from the select that takes it (the same value): a level
    /// whose selects would fold the load into a masked load, which stalls when it misses the
    /// cache, keeps the two apart. For passes that only move data (staging), whose loads
    /// miss; where the loads feed arithmetic the prefetchers keep ahead and the folded form
    /// costs less (in-place rows of 1000 under a mask: 1.06x the unmasked time apart, 0.96x
    /// folded).
    ///
    /// # Safety
    /// `N` readable elements at `p`.
    #[inline(always)]
    unsafe fn load_apart<T: Real>(self, p: *const T) -> Self::V {
        // SAFETY: forwarded from the caller.
        unsafe { self.load(p) }
    }
    /// `n < N` elements, the other lanes `-inf`.
    ///
    /// # Safety
    /// `n` readable elements at `p`.
    unsafe fn load_tail<T: Real>(self, p: *const T, n: usize) -> Self::V;
    /// `N` lanes rounded to `T`.
    ///
    /// # Safety
    /// `N` writable elements at `p`.
    unsafe fn store<T: Real>(self, p: *mut T, v: Self::V);
    /// The first `n < N` lanes rounded to `T`.
    ///
    /// # Safety
    /// `n` writable elements at `p`.
    unsafe fn store_tail<T: Real>(self, p: *mut T, v: Self::V, n: usize);
    /// A non-temporal store of `N` lanes where [`Lanes::STREAMS`], else [`Lanes::store`].
    ///
    /// # Safety
    /// `N` writable elements at `p`, aligned to `N` elements.
    #[inline(always)]
    unsafe fn stream<T: Real>(self, p: *mut T, v: Self::V) {
        // SAFETY: forwarded from the caller.
        unsafe { self.store(p, v) }
    }
    /// Orders the non-temporal stores before what follows.
    #[inline(always)]
    fn fence(self) {}
    /// A hint to fetch the line at `p` into L1 (never faults): [`super::prefetch_line`].
    #[inline(always)]
    fn prefetch(self, p: *const i8) {
        super::prefetch_line(p)
    }

    /// `exp(t)` for `t <= 710` or NaN (`-inf -> 0`, NaN -> NaN): to < 1 ULP of float64 when
    /// `full`, else to ~5e-11 relative (float32 results, rounded once).
    fn exp(self, t: Self::V, full: bool) -> Self::V;
    /// [`Lanes::exp`] for `t <= 0` or NaN, the shifted sums. A level may return anything
    /// finite and tiny for the lanes [`Lanes::summable`] drops.
    #[inline(always)]
    fn exp_nonpos(self, t: Self::V, full: bool) -> Self::V {
        self.exp(t, full)
    }
    /// [`Lanes::exp_nonpos`] without the clamp a float32-grade exp may take at `EXP_FLOOR`:
    /// the same bits for `t` in `[EXP_FLOOR, 0]` and NaN, anything at all below (callers take
    /// it only for rows whose least element lies within the clamp of their max). A level
    /// without a clamp keeps the default.
    #[inline(always)]
    fn exp_nonpos_unclamped(self, t: Self::V, full: bool) -> Self::V {
        self.exp_nonpos(t, full)
    }
    /// The lanes of `below` whose `exp_nonpos(t)` belongs in a sum (NaN kept).
    #[inline(always)]
    fn summable(self, below: Self::M, t: Self::V, full: bool) -> Self::M {
        let _ = (t, full);
        below
    }
    /// `log1p(e)` for `e >= 0` or NaN: to a few ULP of float64 when `full`, else to ~2e-12
    /// relative (float32-grade results; a level may give the full grade).
    #[inline(always)]
    fn log1p(self, e: Self::V, full: bool) -> Self::V {
        let _ = full;
        let mut a = self.to_lanes(e);
        for v in a.iter_mut().take(Self::N) {
            *v = v.ln_1p();
        }
        self.of_lanes(&a)
    }

    /// The max of `n` elements (a NaN may or may not show; callers re-check non-finite
    /// maxima and sums).
    ///
    /// # Safety
    /// `n` readable elements at `p`.
    #[inline(always)]
    unsafe fn max_of<T: Real>(self, p: *const T, n: usize) -> f64 {
        // SAFETY: forwarded from the caller.
        unsafe { max_of_widened(self, p, n) }
    }
    /// [`Lanes::max_of`] and, where the level takes it ([`Lanes::TAKES_MIN`]) and the elements
    /// are float32, the min in the same pass (`-inf` where not); NaN may or may not show in
    /// either. Written once over the level's [`Lanes::range_step`]: two running pairs, then
    /// the last elements one by one.
    ///
    /// # Safety
    /// `n` readable elements at `p`.
    #[inline(always)]
    unsafe fn range_of<T: Real>(self, p: *const T, n: usize) -> (f64, f64) {
        if T::FULL || !Self::TAKES_MIN {
            // SAFETY: forwarded from the caller.
            return (unsafe { self.max_of(p, n) }, f64::NEG_INFINITY);
        }
        let (p, step) = (p as *const f32, 2 * Self::N);
        let mut acc = [self.range_init(); 2];
        let mut i = 0;
        // SAFETY: every step reads 2N elements inside the n, the rest one by one.
        unsafe {
            while i + 2 * step <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = self.range_step(*a, p.add(i + k * step));
                }
                i += 2 * step;
            }
            if i + step <= n {
                acc[0] = self.range_step(acc[0], p.add(i));
                i += step;
            }
            let ((m0, l0), (m1, l1)) = (self.range_finish(acc[0]), self.range_finish(acc[1]));
            let (mut m, mut least) = (m0.max(m1), l0.min(l1));
            for k in i..n {
                let v = *p.add(k);
                (m, least) = (m.max(v), least.min(v));
            }
            (f64::from(m), f64::from(least))
        }
    }
    /// Whether [`Lanes::range_of`] takes the min of float32 elements (of float64 ones it
    /// takes none at any level): where the one-pass max and min cost less than the exps the
    /// min lets a row take unclamped.
    const TAKES_MIN: bool = false;
    /// A running max and min of float32 elements over steps of `2N` (a level may keep them
    /// in its own float32 lanes): the start value, one step and the reduction to
    /// `(max, min)`. These defaults widen, and keep the min as the max of the negated
    /// elements.
    #[inline(always)]
    fn range_init(self) -> [Self::V; 2] {
        [self.splat(f64::NEG_INFINITY); 2]
    }
    /// # Safety
    /// `2N` readable elements at `p`.
    #[inline(always)]
    unsafe fn range_step(self, acc: [Self::V; 2], p: *const f32) -> [Self::V; 2] {
        // SAFETY: forwarded from the caller.
        let (a, b) = unsafe { (self.load(p), self.load(p.add(Self::N))) };
        let zero = self.splat(0.0);
        let least = self.max(self.sub(zero, a), self.sub(zero, b));
        [self.max(acc[0], self.max(a, b)), self.max(acc[1], least)]
    }
    #[inline(always)]
    fn range_finish(self, acc: [Self::V; 2]) -> (f32, f32) {
        let (m, least) = (self.reduce_max(acc[0]), -self.reduce_max(acc[1]));
        (m as f32, least as f32)
    }
    /// A running max over steps of `2N` elements (a level may keep float32 in its own lanes):
    /// the start value, one step and the final reduction.
    #[inline(always)]
    fn max_init<T: Real>(self) -> [Self::V; 2] {
        [self.splat(f64::NEG_INFINITY); 2]
    }
    /// # Safety
    /// `2N` readable elements at `p`.
    #[inline(always)]
    unsafe fn max_step<T: Real>(self, acc: [Self::V; 2], p: *const T) -> [Self::V; 2] {
        // SAFETY: forwarded from the caller.
        unsafe { max_step_widened(self, acc, p) }
    }
    #[inline(always)]
    fn max_finish<T: Real>(self, acc: [Self::V; 2]) -> f64 {
        self.reduce_max(self.max(acc[0], acc[1]))
    }
    /// [`Lanes::max_step`] over the kept elements of the `2N` at `p`: those whose mask byte
    /// at `keep` is nonzero (the others take no part).
    ///
    /// # Safety
    /// `2N` readable elements at `p` and bytes at `keep`.
    #[inline(always)]
    unsafe fn max_step_kept<T: Real>(
        self,
        acc: [Self::V; 2],
        p: *const T,
        keep: *const u8,
    ) -> [Self::V; 2] {
        // SAFETY: forwarded from the caller.
        unsafe { max_step_kept_widened(self, acc, p, keep) }
    }

    /// Columns `c0..c0 + w` (`w <= N`) of up to `N` rows, row `r` starting at `row(r)`:
    /// `out[c0 + k]` holds element `c0 + k` of rows `0..N`, `-inf` past `rows`. (A level may
    /// transpose in registers.) `room >= w` elements are readable from element `c0` of every
    /// row: where a whole vector fits in it, a level loads one and drops the lanes past `w`
    /// rather than masking the load (masked loads that miss the cache stall some cores: on
    /// Zen 5, float32 rows of 8-16 from DRAM ran 2.5x slower masked).
    ///
    /// # Safety
    /// Elements `c0..c0 + room` of rows `0..rows` readable; `out` holds `c0 + w` entries.
    #[inline(always)]
    unsafe fn load_columns<T: Real>(
        self,
        row: impl Fn(usize) -> *const T,
        rows: usize,
        c0: usize,
        w: usize,
        room: usize,
        out: &mut [MaybeUninit<Self::V>],
    ) {
        // Element by element: nothing is masked, the room is not needed.
        let _ = room;
        // SAFETY: forwarded from the caller.
        unsafe { load_columns_by_element(self, row, rows, c0, w, out) }
    }
    /// The inverse of [`Lanes::load_columns`]: element `c0 + k` of row `r < rows` from lane
    /// `r` of `cols[c0 + k]`, `k < w`, each row `pitch` apart, rounded to `T`. `skip` flags
    /// rows left alone.
    ///
    /// # Safety
    /// Elements `c0..c0 + w` of rows `0..rows` writable; `cols` holds `c0 + w` entries.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store_columns<T: Real>(
        self,
        out: *mut T,
        pitch: usize,
        rows: usize,
        skip: u8,
        c0: usize,
        w: usize,
        cols: &[Self::V],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { store_columns_by_element(self, out, pitch, rows, skip, c0, w, cols) }
    }
}

/// [`Lanes::max_step`] over widened lanes.
///
/// # Safety
/// `2N` readable elements at `p`.
#[inline(always)]
pub(crate) unsafe fn max_step_widened<L: Lanes, T: Real>(
    l: L,
    acc: [L::V; 2],
    p: *const T,
) -> [L::V; 2] {
    // SAFETY: forwarded from the caller.
    unsafe { [l.max(acc[0], l.load(p)), l.max(acc[1], l.load(p.add(L::N)))] }
}

/// [`Lanes::max_step_kept`] over widened lanes.
///
/// # Safety
/// `2N` readable elements at `p` and bytes at `keep`.
#[inline(always)]
pub(crate) unsafe fn max_step_kept_widened<L: Lanes, T: Real>(
    l: L,
    acc: [L::V; 2],
    p: *const T,
    keep: *const u8,
) -> [L::V; 2] {
    let ninf = l.splat(f64::NEG_INFINITY);
    // SAFETY: forwarded from the caller.
    unsafe {
        let (k0, k1) = (l.kept(keep), l.kept(keep.add(L::N)));
        let (v0, v1) = (l.load(p), l.load(p.add(L::N)));
        [
            l.max(acc[0], l.select(k0, v0, ninf)),
            l.max(acc[1], l.select(k1, v1, ninf)),
        ]
    }
}

/// [`Lanes::max_of`] over widened lanes.
///
/// # Safety
/// `n` readable elements at `p`.
#[inline(always)]
pub(crate) unsafe fn max_of_widened<L: Lanes, T: Real>(l: L, p: *const T, n: usize) -> f64 {
    // SAFETY: forwarded from the caller.
    unsafe { max_of_source(l, super::rows::Dense::new(p), 0, n) }
}

/// The max of elements `i..i + n` of `src` over widened lanes, four vectors per step.
///
/// # Safety
/// Those elements readable.
#[inline(always)]
pub(crate) unsafe fn max_of_source<L: Lanes, S: super::rows::Source>(
    l: L,
    src: S,
    i: usize,
    n: usize,
) -> f64 {
    let ninf = l.splat(f64::NEG_INFINITY);
    let mut acc = [ninf; 4];
    let (w, mut k) = (L::N, 0);
    // SAFETY: every load is within the n elements.
    unsafe {
        while k + 4 * w <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                *acc = l.max(*acc, src.load(l, i + k + w * a));
            }
            k += 4 * w;
        }
        while k + w <= n {
            acc[0] = l.max(acc[0], src.load(l, i + k));
            k += w;
        }
        if k < n {
            acc[1] = l.max(acc[1], src.load_tail(l, i + k, n - k));
        }
    }
    let m = l.max(l.max(acc[0], acc[1]), l.max(acc[2], acc[3]));
    l.reduce_max(m)
}

/// The highest power of `z = s^2` in the vector `log1p`'s series `log f = 2 atanh(s) =
/// 2 s sum z^j / (2j + 1)`, `|s| < 0.172`: to `s^23` (truncation < 1e-18) for float64 results,
/// to `s^13` (< 2e-12 relative, below the float32-grade exp's 5e-11) for float32-grade ones.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn log1p_terms(full: bool) -> usize {
    if full {
        11
    } else {
        6
    }
}

/// [`Lanes::load_columns`] one element at a time.
///
/// # Safety
/// As [`Lanes::load_columns`].
#[inline(always)]
pub(crate) unsafe fn load_columns_by_element<L: Lanes, T: Real>(
    l: L,
    row: impl Fn(usize) -> *const T,
    rows: usize,
    c0: usize,
    w: usize,
    out: &mut [MaybeUninit<L::V>],
) {
    for (k, o) in out.iter_mut().enumerate().skip(c0).take(w) {
        let mut a = [f64::NEG_INFINITY; 8];
        for (r, v) in a.iter_mut().enumerate().take(rows.min(L::N)) {
            // SAFETY: element k of row r is readable.
            *v = unsafe { (*row(r).add(k)).to_f64() };
        }
        o.write(l.of_lanes(&a));
    }
}

/// [`Lanes::load_columns`] with column `c0 + k` kept on the lanes whose bit is set in byte `k`
/// of `bits` (bit `r` for row `r`), `-inf` on the others. The columns are masked in registers
/// and written once: a select written back over what `out` holds would compile to masked
/// stores, which the loads that follow cannot take their data from.
///
/// # Safety
/// As [`Lanes::load_columns`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn load_columns_of_bits<L: Lanes, T: Real>(
    l: L,
    row: impl Fn(usize) -> *const T,
    rows: usize,
    c0: usize,
    w: usize,
    room: usize,
    bits: u64,
    out: &mut [MaybeUninit<L::V>],
) {
    let mut cols = [MaybeUninit::<L::V>::uninit(); 8];
    // SAFETY: forwarded from the caller; cols holds w <= 8 entries.
    unsafe { l.load_columns(|i| row(i).wrapping_add(c0), rows, 0, w, room, &mut cols) };
    let ninf = l.splat(f64::NEG_INFINITY);
    for (k, c) in cols.iter().enumerate().take(w) {
        let kept = l.lanes_of_bits((bits >> (8 * k)) as u8);
        // SAFETY: the first w entries were written above.
        out[c0 + k].write(l.select(kept, unsafe { c.assume_init() }, ninf));
    }
}

/// The mask words of [`Lanes::load_columns_kept`] transposed for [`load_columns_of_bits`]:
/// bit `r` of byte `k` set where row `r < rows` keeps column `k`.
///
/// # Safety
/// The 8 bytes at `keep + r * lane` readable for every `r < rows`.
#[inline(always)]
pub(crate) unsafe fn word_bits(keep: *const u8, lane: usize, rows: usize, skip: usize) -> u64 {
    (0..rows).fold(0u64, |acc, r| {
        // SAFETY: the caller's 8 bytes of row r.
        let word = unsafe { std::ptr::read_unaligned(keep.add(r * lane) as *const u64) };
        acc | (nonzero_bytes(word >> (8 * skip)) << r)
    })
}

/// The bytes of `v` that are nonzero, as 1 (and 0 elsewhere).
#[inline(always)]
fn nonzero_bytes(v: u64) -> u64 {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    ((((v & LOW) + LOW) | v) >> 7) & 0x0101_0101_0101_0101
}

/// [`Lanes::store_columns`] one element at a time.
///
/// # Safety
/// As [`Lanes::store_columns`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn store_columns_by_element<L: Lanes, T: Real>(
    l: L,
    out: *mut T,
    pitch: usize,
    rows: usize,
    skip: u8,
    c0: usize,
    w: usize,
    cols: &[L::V],
) {
    for (k, c) in cols.iter().enumerate().skip(c0).take(w) {
        let a = l.to_lanes(*c);
        for (r, v) in a.iter().enumerate().take(rows.min(L::N)) {
            if skip & (1 << r) == 0 {
                // SAFETY: element k of row r is writable.
                unsafe { *out.add(r * pitch + k) = T::from_f64(*v) };
            }
        }
    }
}

/// A kernel written once over [`Lanes`], with the scalar reference for [`Level::Scalar`].
pub(crate) trait Kernel {
    type Out;
    /// The kernel at a SIMD level; implementations are `#[inline(always)]`, so the body is
    /// compiled into the level's `#[target_feature]` entry.
    fn run<L: Lanes>(self, l: L) -> Self::Out;
    /// The kernel at the scalar level.
    fn scalar(self) -> Self::Out;
}

/// Runs `k` at `level`: the one match on the level per call.
///
/// # Safety
/// `level` must be supported by this CPU, and `k`'s own contract hold.
#[inline]
pub(crate) unsafe fn dispatch<K: Kernel>(level: Level, k: K) -> K::Out {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked the level.
        Level::Avx512 => unsafe { super::avx512::enter(k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { super::avx2::enter(k) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Level::Neon => unsafe { super::neon::enter(k) },
        _ => k.scalar(),
    }
}

/// The scalar reference `(max, excess)` of `n` contiguous elements (the vector kernels'
/// fallback for rows with a NaN or infinite max).
///
/// # Safety
/// `n` readable elements at `x`.
#[inline(always)]
pub(crate) unsafe fn reference_state<T: Real>(x: *const T, n: usize) -> crate::state::LseState {
    // SAFETY: forwarded from the caller.
    unsafe { scalar::lse_state_two_pass(x, 0, n, 1) }
}

/// [`Lanes::transpose`] of rows `r0..r1` and columns `c0..c1`, element by element.
///
/// # Safety
/// As [`Lanes::transpose`] for those rows and columns.
#[inline(always)]
pub(crate) unsafe fn transpose_by_element<T: Copy>(
    src: *const T,
    src_stride: usize,
    dst: *mut T,
    dst_stride: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
) {
    for r in r0..r1 {
        for c in c0..c1 {
            // SAFETY: the caller's contract.
            unsafe { *dst.add(c * dst_stride + r) = *src.add(r * src_stride + c) };
        }
    }
}
