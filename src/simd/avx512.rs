//! AVX-512 (F + DQ + BW + VL) kernels: the vectorised exps and the row/column building blocks.
//!
//! Everything here is `#[target_feature]`; the dispatcher in [`super`] only calls it after
//! run-time detection. Float32 inputs are widened to float64 lanes for every sum and for the
//! softmax write (the difference `x - max` is then exact and the exp is accurate to ~1e-11), so
//! a float32 result is rounded once, at the end, like the scalar reference.

#![allow(clippy::missing_safety_doc)]

use super::consts::*;
use crate::state::LseState;
use std::arch::x86_64::*;

const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// float32 exp with float32 arithmetic (max error < 1 ULP over the whole float32 range):
/// `x = k ln2 + r` (Cody-Waite, two constants), a degree-6 polynomial on |r| <= ln2/2
/// (SLEEF's `expf_u10` coefficients), and `vscalefps` for `2^k` (correct overflow to +inf
/// and a single rounding into the subnormals).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub fn exp_ps(x: __m512) -> __m512 {
    // Clamps keep k finite (so r is never inf - inf); min/max return their second operand
    // when either is NaN, so NaN passes through.
    let x = _mm512_min_ps(_mm512_set1_ps(100.0), x);
    let x = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
    let k = _mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(x, _mm512_set1_ps(F32_LOG2E)));
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(F32_LN2_HI), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(F32_LN2_LO), r);
    let mut u = _mm512_set1_ps(F32_EXP_POLY[0]);
    for &c in &F32_EXP_POLY[1..] {
        u = _mm512_fmadd_ps(u, r, _mm512_set1_ps(c));
    }
    // exp(r) = 1 + (r + r^2 u): the small part is summed first, then 1 once.
    let p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), u, r);
    let p = _mm512_add_ps(_mm512_set1_ps(1.0), p);
    _mm512_scalef_ps(p, k)
}

/// float64 exp by a 16-entry table: `t = (16 k' + j) ln2/16 + r`, |r| <= ln2/32, so
/// `exp(t) = 2^k' 2^(j/16) (1 + q(r))`. `full` uses a two-constant reduction and the degree-7
/// Taylor q (truncation 1.2e-18, result < 1 ULP of float64); otherwise one constant and
/// degree 4 (relative error < 5e-11), ample for float32 results that are rounded once.
/// -inf -> 0, +inf -> +inf, NaN -> NaN, underflow rounded once by `vscalefpd`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub fn exp_pd(t: __m512d, full: bool) -> __m512d {
    exp_scalef_pd(_mm512_min_pd(_mm512_set1_pd(710.0), t), full)
}

/// [`exp_pd`] for arguments `<= 0` or NaN (the shifted sums, `t = x - max`). float64 results
/// as `exp_pd`; float32-grade results put `2^floor(k/16)` straight into the table entry's
/// exponent bits (two integer ops instead of a multiply and `vscalefpd` on the FMA ports),
/// which needs a normal result: the argument is clamped at -708, where exp is 3e-308, and
/// callers that must see an exact 0 there mask it out (`t <= -708` is below anything a
/// float32 result can hold).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub fn exp_nonpos_pd(t: __m512d, full: bool) -> __m512d {
    if full {
        return exp_scalef_pd(t, true);
    }
    let t = _mm512_max_pd(_mm512_set1_pd(EXP_FLOOR), t);
    let magic = _mm512_set1_pd(ROUND_MAGIC);
    let kd = _mm512_fmadd_pd(t, _mm512_set1_pd(SIXTEEN_OVER_LN2), magic);
    let kf = _mm512_sub_pd(kd, magic);
    let r = _mm512_fnmadd_pd(kf, _mm512_set1_pd(LN2_OVER_16_HI), t);
    // SAFETY: EXP2_J16_LESS_J holds 16 u64; two unaligned 8-lane loads read it exactly.
    let (lo, hi) = unsafe {
        (
            _mm512_loadu_si512(EXP2_J16_LESS_J.as_ptr() as *const __m512i),
            _mm512_loadu_si512(EXP2_J16_LESS_J.as_ptr().add(8) as *const __m512i),
        )
    };
    let kbits = _mm512_castpd_si512(kd);
    // kbits << 48 = (k >> 4) << 52 (the exponent step) + (k & 15) << 48, and the table entries
    // have (j << 48) taken off, so the sum is 2^(j/16) * 2^(k >> 4) exactly.
    let tab = _mm512_permutex2var_epi64(lo, kbits, hi);
    let tab = _mm512_castsi512_pd(_mm512_add_epi64(tab, _mm512_slli_epi64::<48>(kbits)));
    let mut a = _mm512_set1_pd(TAYLOR4[0]);
    for &c in &TAYLOR4[1..] {
        a = _mm512_fmadd_pd(a, r, _mm512_set1_pd(c));
    }
    _mm512_fmadd_pd(tab, _mm512_mul_pd(a, r), tab)
}

/// The table exp with `vscalefpd` (any argument <= 710, NaN allowed).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn exp_scalef_pd(t: __m512d, full: bool) -> __m512d {
    let t = _mm512_max_pd(_mm512_set1_pd(-746.0), t);
    // kd holds round(16 t / ln2) in its low mantissa bits; its low 4 bits index the table.
    let magic = _mm512_set1_pd(ROUND_MAGIC);
    let kd = _mm512_fmadd_pd(t, _mm512_set1_pd(SIXTEEN_OVER_LN2), magic);
    let kf = _mm512_sub_pd(kd, magic);
    let mut r = _mm512_fnmadd_pd(kf, _mm512_set1_pd(LN2_OVER_16_HI), t);
    if full {
        r = _mm512_fnmadd_pd(kf, _mm512_set1_pd(LN2_OVER_16_LO), r);
    }
    // SAFETY: EXP2_J16 holds 16 f64; two unaligned 8-lane loads read it exactly.
    let (lo, hi) = unsafe {
        (
            _mm512_loadu_pd(EXP2_J16.as_ptr()),
            _mm512_loadu_pd(EXP2_J16.as_ptr().add(8)),
        )
    };
    let tab = _mm512_permutex2var_pd(lo, _mm512_castpd_si512(kd), hi);
    let coeffs: &[f64] = if full { &TAYLOR7 } else { &TAYLOR4 };
    let mut a = _mm512_set1_pd(coeffs[0]);
    for &c in &coeffs[1..] {
        a = _mm512_fmadd_pd(a, r, _mm512_set1_pd(c));
    }
    let q = _mm512_mul_pd(a, r);
    let y = _mm512_fmadd_pd(tab, q, tab);
    // vscalefpd multiplies by 2^floor(kf/16): the table already supplied 2^(j/16).
    _mm512_scalef_pd(y, _mm512_mul_pd(kf, _mm512_set1_pd(1.0 / 16.0)))
}

/// Lanes of `t = x - max` whose exp belongs in a "below the max" sum: not ties (`below`),
/// and for float32-grade sums above the clamp of [`exp_nonpos_pd`] (NaN kept, so it shows).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn summable(below: __mmask8, t: __m512d, full: bool) -> __mmask8 {
    if full {
        below
    } else {
        _mm512_mask_cmp_pd_mask::<_CMP_NLE_UQ>(below, t, _mm512_set1_pd(EXP_FLOOR))
    }
}

/// An input element type as seen by the float64-lane kernels: 8 elements per vector.
pub trait Lanes: Copy + 'static + crate::Real {
    /// Whether results need the full float64 exp (float64 inputs) or the float32-grade one.
    const FULL: bool;
    /// Elements per block of the two-pass row kernel: 8 KiB, so the block being summed and
    /// the next one being loaded sit in L1 together (16 KiB blocks measured 30% slower from
    /// DRAM on one thread).
    const BLOCK: usize;
    /// Loads 8 elements widened to f64.
    unsafe fn load8(p: *const Self) -> __m512d;
    /// Loads `n < 8` elements, the rest of the lanes `-inf`.
    unsafe fn load_tail(p: *const Self, n: usize) -> __m512d;
    /// Stores 8 lanes rounded to `Self`.
    unsafe fn store8(p: *mut Self, v: __m512d);
    /// Stores the first `n < 8` lanes.
    unsafe fn store_tail(p: *mut Self, v: __m512d, n: usize);
    /// Stores 8 lanes with a non-temporal store; `p` aligned to 8 elements.
    unsafe fn stream8(p: *mut Self, v: __m512d);
    /// The max of `n` elements (NaN may or may not show; callers re-check non-finite maxima).
    unsafe fn max(p: *const Self, n: usize) -> f64;
    /// A running max over 16-element steps in the element type's own lanes (float32 maxes
    /// 16 lanes at once, no widening): the start value, one step, and the final reduction.
    unsafe fn max_init() -> [__m512d; 2];
    unsafe fn max16(acc: [__m512d; 2], p: *const Self) -> [__m512d; 2];
    unsafe fn max_finish(acc: [__m512d; 2]) -> f64;
}

#[inline]
fn tail_mask8(n: usize) -> __mmask8 {
    ((1u32 << n) - 1) as __mmask8
}

impl Lanes for f32 {
    const FULL: bool = false;
    const BLOCK: usize = 2048;
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max_init() -> [__m512d; 2] {
        [_mm512_castps_pd(_mm512_set1_ps(f32::NEG_INFINITY)); 2]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max16(acc: [__m512d; 2], p: *const f32) -> [__m512d; 2] {
        // SAFETY: the caller guarantees 16 readable elements.
        let v = unsafe { _mm512_loadu_ps(p) };
        [
            _mm512_castps_pd(_mm512_max_ps(_mm512_castpd_ps(acc[0]), v)),
            acc[1],
        ]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max_finish(acc: [__m512d; 2]) -> f64 {
        let m = _mm512_max_ps(_mm512_castpd_ps(acc[0]), _mm512_castpd_ps(acc[1]));
        _mm512_reduce_max_ps(m) as f64
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn load8(p: *const f32) -> __m512d {
        // SAFETY: the caller guarantees 8 readable elements.
        _mm512_cvtps_pd(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn load_tail(p: *const f32, n: usize) -> __m512d {
        let fill = _mm256_set1_ps(f32::NEG_INFINITY);
        // SAFETY: masked lanes are not accessed; the first n are readable.
        _mm512_cvtps_pd(unsafe { _mm256_mask_loadu_ps(fill, tail_mask8(n), p) })
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn store8(p: *mut f32, v: __m512d) {
        // SAFETY: the caller guarantees 8 writable elements.
        unsafe { _mm256_storeu_ps(p, _mm512_cvtpd_ps(v)) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn stream8(p: *mut f32, v: __m512d) {
        // SAFETY: the caller guarantees 8 writable elements, 32-byte aligned.
        unsafe { _mm256_stream_ps(p, _mm512_cvtpd_ps(v)) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn store_tail(p: *mut f32, v: __m512d, n: usize) {
        // SAFETY: only the first n lanes are written.
        unsafe { _mm256_mask_storeu_ps(p, tail_mask8(n), _mm512_cvtpd_ps(v)) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max(p: *const f32, n: usize) -> f64 {
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = [ninf; 4];
        let mut i = 0;
        // SAFETY: every load is within the n elements (full vectors, then a masked tail).
        unsafe {
            while i + 64 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_max_ps(*acc, _mm512_loadu_ps(p.add(i + 16 * a)));
                }
                i += 64;
            }
            while i + 16 <= n {
                acc[0] = _mm512_max_ps(acc[0], _mm512_loadu_ps(p.add(i)));
                i += 16;
            }
            if i < n {
                let m = ((1u32 << (n - i)) - 1) as __mmask16;
                acc[1] = _mm512_max_ps(acc[1], _mm512_mask_loadu_ps(ninf, m, p.add(i)));
            }
        }
        let m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
        _mm512_reduce_max_ps(m) as f64
    }
}

impl Lanes for f64 {
    const FULL: bool = true;
    const BLOCK: usize = 1024;
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max_init() -> [__m512d; 2] {
        [_mm512_set1_pd(f64::NEG_INFINITY); 2]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max16(acc: [__m512d; 2], p: *const f64) -> [__m512d; 2] {
        // SAFETY: the caller guarantees 16 readable elements.
        unsafe {
            [
                _mm512_max_pd(acc[0], _mm512_loadu_pd(p)),
                _mm512_max_pd(acc[1], _mm512_loadu_pd(p.add(8))),
            ]
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max_finish(acc: [__m512d; 2]) -> f64 {
        _mm512_reduce_max_pd(_mm512_max_pd(acc[0], acc[1]))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn load8(p: *const f64) -> __m512d {
        // SAFETY: the caller guarantees 8 readable elements.
        unsafe { _mm512_loadu_pd(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn load_tail(p: *const f64, n: usize) -> __m512d {
        let fill = _mm512_set1_pd(f64::NEG_INFINITY);
        // SAFETY: masked lanes are not accessed; the first n are readable.
        unsafe { _mm512_mask_loadu_pd(fill, tail_mask8(n), p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn store8(p: *mut f64, v: __m512d) {
        // SAFETY: the caller guarantees 8 writable elements.
        unsafe { _mm512_storeu_pd(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn stream8(p: *mut f64, v: __m512d) {
        // SAFETY: the caller guarantees 8 writable elements, 64-byte aligned.
        unsafe { _mm512_stream_pd(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn store_tail(p: *mut f64, v: __m512d, n: usize) {
        // SAFETY: only the first n lanes are written.
        unsafe { _mm512_mask_storeu_pd(p, tail_mask8(n), v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    unsafe fn max(p: *const f64, n: usize) -> f64 {
        let ninf = _mm512_set1_pd(f64::NEG_INFINITY);
        let mut acc = [ninf; 4];
        let mut i = 0;
        // SAFETY: every load is within the n elements.
        unsafe {
            while i + 32 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_max_pd(*acc, _mm512_loadu_pd(p.add(i + 8 * a)));
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm512_max_pd(acc[0], _mm512_loadu_pd(p.add(i)));
                i += 8;
            }
            if i < n {
                acc[1] = _mm512_max_pd(acc[1], Self::load_tail(p.add(i), n - i));
            }
        }
        let m = _mm512_max_pd(_mm512_max_pd(acc[0], acc[1]), _mm512_max_pd(acc[2], acc[3]));
        _mm512_reduce_max_pd(m)
    }
}

/// Sum of `exp(x - m)` over the `n` elements at `p` that are `!= m` (NaN included) and the
/// count of those `== m` (`m` finite, `>=` every non-NaN element), fused with the max of the
/// `qn` elements of the *next* block at `q`: the next block's DRAM loads are issued while this
/// block's exps run from L1, so memory and arithmetic overlap instead of taking turns.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
unsafe fn sum_below_max_next<T: Lanes>(
    p: *const T,
    n: usize,
    m: f64,
    q: *const T,
    qn: usize,
) -> (__m512d, u64, f64) {
    let mv = _mm512_set1_pd(m);
    let mut acc = [_mm512_setzero_pd(); 2];
    // SAFETY: the level's features are enabled here.
    let mut mx = unsafe { T::max_init() };
    // Ties are counted with popcnt on the scalar ports, which the vector code leaves idle.
    let mut ties = 0u64;
    let mut i = 0;
    let mut qi = 0;
    let mut step = |x: __m512d, acc: &mut __m512d| {
        let t = _mm512_sub_pd(x, mv);
        let e = exp_nonpos_pd(t, T::FULL);
        let below = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(x, mv);
        ties += u64::from((!below).count_ones());
        *acc = _mm512_mask_add_pd(*acc, summable(below, t, T::FULL), *acc, e);
    };
    // SAFETY: loads stay within the n elements at p and the qn at q; tail lanes are -inf
    // (below the max, exp = 0; neutral for the max).
    unsafe {
        while i + 16 <= n {
            if qi + 16 <= qn {
                mx = T::max16(mx, q.add(qi));
                qi += 16;
            }
            step(T::load8(p.add(i)), &mut acc[0]);
            step(T::load8(p.add(i + 8)), &mut acc[1]);
            i += 16;
        }
        if i + 8 <= n {
            step(T::load8(p.add(i)), &mut acc[0]);
            i += 8;
        }
        if i < n {
            step(T::load_tail(p.add(i), n - i), &mut acc[1]);
        }
    }
    // SAFETY: as above.
    let mut next_max = unsafe { T::max_finish(mx) };
    if qi < qn {
        // SAFETY: the rest of the next block is readable.
        let rest = unsafe { T::max(q.add(qi), qn - qi) };
        // A NaN from either part must survive (f64::max would drop it).
        next_max = if rest.is_nan() || next_max.is_nan() {
            f64::NAN
        } else {
            next_max.max(rest)
        };
    }
    (_mm512_add_pd(acc[0], acc[1]), ties, next_max)
}

/// Two-pass `(max, excess)` of a contiguous row, blocked for L1: each block's max, then the
/// exp-sum of the same block while it is in L1 (fused with the next block's max), blocks
/// merged by the online rule. Non-finite maxima go to the scalar reference, which owns the
/// NaN/inf semantics.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn state_two_pass<T: Lanes>(x: *const T, n: usize) -> LseState {
    let mut m = f64::NEG_INFINITY;
    let mut below = _mm512_setzero_pd();
    let mut ties = 0u64;
    let mut start = 0;
    let mut len = T::BLOCK.min(n);
    // SAFETY: the first block lies inside the row.
    let mut bm = unsafe { T::max(x, len) };
    while len > 0 {
        let next = start + len;
        let next_len = T::BLOCK.min(n - next);
        // SAFETY: this block and the next lie inside the row.
        let (p, q) = unsafe { (x.add(start), x.add(next)) };
        let next_max;
        if bm.is_finite() {
            if bm > m {
                // Everything so far is below the new max: fold the ties into the sum, rescale.
                let scale = (m - bm).exp();
                below = _mm512_mul_pd(below, _mm512_set1_pd(scale));
                let carried = _mm512_set_pd(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ties as f64 * scale);
                below = _mm512_add_pd(below, carried);
                ties = 0;
                m = bm;
            }
            // SAFETY: as above.
            let (b, t, nm) = unsafe { sum_below_max_next(p, len, m, q, next_len) };
            below = _mm512_add_pd(below, b);
            ties += t;
            next_max = nm;
        } else if bm == f64::NEG_INFINITY && !super::has_nan(p, len) {
            // SAFETY: as above.
            next_max = unsafe { T::max(q, next_len) };
        } else {
            // SAFETY: the whole row is readable.
            return unsafe { crate::kernels::scalar::lse_state_two_pass(x, 0, n, 1) };
        }
        start = next;
        len = next_len;
        bm = next_max;
    }
    super::finish_state(m, _mm512_reduce_add_pd(below), ties)
}

/// Per-lane online state: running max, sum of exp(x - max) over the elements below it, and
/// the count of elements equal to it (kept apart so the excess keeps tiny terms).
#[derive(Clone, Copy)]
pub struct OnlineLanes {
    pub m: __m512d,
    pub below: __m512d,
    pub ties: __m512d,
}

impl OnlineLanes {
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    pub fn new() -> OnlineLanes {
        OnlineLanes {
            m: _mm512_set1_pd(f64::NEG_INFINITY),
            below: _mm512_setzero_pd(),
            ties: _mm512_setzero_pd(),
        }
    }

    /// Adds one element per lane (Milakov & Gimelshein's update, rescaling only the lanes
    /// whose max grows; that branch is rare after the first few vectors of a row).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    pub fn push(&mut self, x: __m512d, full: bool) {
        let gt = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(x, self.m);
        if gt != 0 {
            let m_new = _mm512_mask_mov_pd(self.m, gt, x);
            // exp(m - m_new) is 1 on unchanged lanes and 0 when m was -inf or m_new is +inf.
            let scale = exp_scalef_pd(_mm512_sub_pd(self.m, m_new), full);
            let total = _mm512_add_pd(self.below, self.ties);
            self.below = _mm512_mask_mul_pd(self.below, gt, total, scale);
            self.ties = _mm512_mask_mov_pd(self.ties, gt, _mm512_setzero_pd());
            self.m = m_new;
        }
        // Ties compare x with m (not x - m with 0), so +inf == +inf is a tie, not NaN.
        let tie = _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(x, self.m);
        let t = _mm512_sub_pd(x, self.m);
        let e = exp_nonpos_pd(t, full);
        self.below = _mm512_mask_add_pd(self.below, summable(!tie, t, full), self.below, e);
        self.ties = _mm512_mask_add_pd(self.ties, tie, self.ties, _mm512_set1_pd(1.0));
    }

    /// The 8 lane states merged in lane order.
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    pub fn states(&self) -> [LseState; 8] {
        let (mut m, mut b, mut t) = ([0.0f64; 8], [0.0f64; 8], [0.0f64; 8]);
        // SAFETY: each array holds 8 f64.
        unsafe {
            _mm512_storeu_pd(m.as_mut_ptr(), self.m);
            _mm512_storeu_pd(b.as_mut_ptr(), self.below);
            _mm512_storeu_pd(t.as_mut_ptr(), self.ties);
        }
        std::array::from_fn(|l| super::lane_state(m[l], b[l], t[l]))
    }
}

/// One-pass `(max, excess)` of a contiguous row: 16 online lanes (two vectors), merged in
/// lane order at the end.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn state_online<T: Lanes>(x: *const T, n: usize) -> LseState {
    let mut lanes = [OnlineLanes::new(), OnlineLanes::new()];
    let mut i = 0;
    // SAFETY: loads stay within the n elements; tail lanes are -inf (no contribution).
    unsafe {
        while i + 16 <= n {
            lanes[0].push(T::load8(x.add(i)), T::FULL);
            lanes[1].push(T::load8(x.add(i + 8)), T::FULL);
            i += 16;
        }
        if i + 8 <= n {
            lanes[0].push(T::load8(x.add(i)), T::FULL);
            i += 8;
        }
        if i < n {
            lanes[1].push(T::load_tail(x.add(i), n - i), T::FULL);
        }
    }
    let mut s = LseState::EMPTY;
    for l in &lanes {
        for st in l.states() {
            s = s.merge(st);
        }
    }
    s
}

/// Applies `f` to 8-lane vectors of `x`, writing `out` (`out` may equal `x`: each vector is
/// read before it is written). With `stream`, the aligned body uses non-temporal stores: an
/// output far larger than the caches then costs no read-for-ownership traffic.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
unsafe fn map_rows<T: Lanes>(
    x: *const T,
    out: *mut T,
    n: usize,
    stream: bool,
    f: impl Fn(__m512d) -> __m512d,
) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements; stream stores are aligned.
    unsafe {
        if stream {
            // Elements up to the next 8-element (vector) boundary of `out`, done masked.
            let size = std::mem::size_of::<T>();
            let head = ((8 * size - (out as usize) % (8 * size)) % (8 * size) / size).min(n);
            if head > 0 {
                T::store_tail(out, f(T::load_tail(x, head)), head);
                i = head;
            }
            while i + 8 <= n {
                T::stream8(out.add(i), f(T::load8(x.add(i))));
                i += 8;
            }
            _mm_sfence();
        }
        while i + 8 <= n {
            T::store8(out.add(i), f(T::load8(x.add(i))));
            i += 8;
        }
        if i < n {
            T::store_tail(out.add(i), f(T::load_tail(x.add(i), n - i)), n - i);
        }
    }
}

/// `out[k] = scale * exp(x[k] - shift)` for `k < n`; `out` may equal `x`.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn exp_scaled<T: Lanes>(
    x: *const T,
    out: *mut T,
    n: usize,
    shift: f64,
    scale: f64,
    stream: bool,
) {
    let (sh, sc) = (_mm512_set1_pd(shift), _mm512_set1_pd(scale));
    // SAFETY: forwarded from the caller.
    unsafe {
        map_rows(x, out, n, stream, |v| {
            _mm512_mul_pd(exp_pd(_mm512_sub_pd(v, sh), T::FULL), sc)
        })
    }
}

/// `out[k] = (x[k] - shift) - log_total` for `k < n`; `out` may equal `x`.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn shift_sub<T: Lanes>(
    x: *const T,
    out: *mut T,
    n: usize,
    shift: f64,
    log_total: f64,
    stream: bool,
) {
    let (sh, lt) = (_mm512_set1_pd(shift), _mm512_set1_pd(log_total));
    // SAFETY: forwarded from the caller.
    unsafe {
        map_rows(x, out, n, stream, |v| {
            _mm512_sub_pd(_mm512_sub_pd(v, sh), lt)
        })
    }
}

/// float32 exp of `n` elements (the float32-arithmetic exp, < 1 ULP).
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn exp_f32(x: *const f32, out: *mut f32, n: usize) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements.
    unsafe {
        while i + 16 <= n {
            _mm512_storeu_ps(out.add(i), exp_ps(_mm512_loadu_ps(x.add(i))));
            i += 16;
        }
        if i < n {
            let m = ((1u32 << (n - i)) - 1) as __mmask16;
            let v = exp_ps(_mm512_maskz_loadu_ps(m, x.add(i)));
            _mm512_mask_storeu_ps(out.add(i), m, v);
        }
    }
}

/// float64 exp of `n` elements (< 1 ULP).
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn exp_f64(x: *const f64, out: *mut f64, n: usize) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements.
    unsafe {
        while i + 8 <= n {
            _mm512_storeu_pd(out.add(i), exp_pd(_mm512_loadu_pd(x.add(i)), true));
            i += 8;
        }
        if i < n {
            let m = tail_mask8(n - i);
            let v = exp_pd(_mm512_maskz_loadu_pd(m, x.add(i)), true);
            _mm512_mask_storeu_pd(out.add(i), m, v);
        }
    }
}

/// How many rows ahead the column kernel prefetches.
const COL_PREFETCH_ROWS: usize = 2;

/// Online states of `w` adjacent columns (`w <= COL_TILE`) of an `(n, inner)` C-order slab
/// starting at `x`: one streaming pass down the rows, each row reading `w` contiguous elements.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn column_states<T: Lanes>(
    x: *const T,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    const V: usize = super::COL_TILE / 8;
    let mut lanes = [OnlineLanes::new(); V];
    let vecs = w.div_ceil(8);
    for k in 0..n {
        // SAFETY: row k of the tile holds w readable elements.
        let row = unsafe { x.add(k * inner) };
        // Rows are `inner` apart, usually on different pages, where hardware prefetchers
        // stop: fetch the tile's segment COL_PREFETCH_ROWS rows ahead (never faults).
        let ahead = row.wrapping_add(COL_PREFETCH_ROWS * inner) as *const i8;
        for line in (0..w * std::mem::size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
        }
        for (v, lane) in lanes.iter_mut().enumerate().take(vecs) {
            let left = w - 8 * v;
            // SAFETY: as above; the last vector is masked to the tile width.
            let xv = unsafe {
                if left >= 8 {
                    T::load8(row.add(8 * v))
                } else {
                    T::load_tail(row.add(8 * v), left)
                }
            };
            lane.push(xv, T::FULL);
        }
    }
    for (v, lane) in lanes.iter().enumerate().take(vecs) {
        for (l, s) in lane.states().into_iter().enumerate() {
            if 8 * v + l < w {
                out[8 * v + l] = s;
            }
        }
    }
}

/// `log1p(e)` for `e >= 0` in float64 lanes (< 2 ULP of float64): `u = 1 + e = 2^k f` with
/// f in [sqrt(1/2), sqrt(2)), `log f = 2 atanh(s)`, s = (f-1)/(f+1), |s| < 0.172, by its
/// series to s^23 (truncation < 1e-18), plus the rounding error of `1 + e` as `(e-(u-1))/u`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub fn log1p_pd(e: __m512d) -> __m512d {
    let one = _mm512_set1_pd(1.0);
    let u = _mm512_add_pd(one, e);
    let mut k = _mm512_getexp_pd(u);
    let mut f = _mm512_getmant_pd::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(u);
    let big = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(f, _mm512_set1_pd(std::f64::consts::SQRT_2));
    f = _mm512_mask_mul_pd(f, big, f, _mm512_set1_pd(0.5));
    k = _mm512_mask_add_pd(k, big, k, one);
    let s = _mm512_div_pd(_mm512_sub_pd(f, one), _mm512_add_pd(f, one));
    let z = _mm512_mul_pd(s, s);
    let mut p = _mm512_set1_pd(2.0 / 23.0);
    for j in (0..11).rev() {
        p = _mm512_fmadd_pd(p, z, _mm512_set1_pd(2.0 / (2 * j + 1) as f64));
    }
    let log_f = _mm512_mul_pd(s, p);
    let log_u = _mm512_fmadd_pd(
        k,
        _mm512_set1_pd(LN2_HI),
        _mm512_fmadd_pd(k, _mm512_set1_pd(LN2_LO), log_f),
    );
    // The correction can be the whole result (the top class of log_softmax, e ~ 1e-15), so
    // it is divided exactly, not scaled by an approximate reciprocal.
    let c = _mm512_div_pd(_mm512_sub_pd(e, _mm512_sub_pd(u, one)), u);
    _mm512_add_pd(log_u, c)
}

/// Gathers element `k` of up to 8 rows `pitch` apart (lanes past `rows` are `-inf`).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
unsafe fn gather_column<T: Lanes>(p: *const T, idx: __m256i, mask: __mmask8) -> __m512d {
    // SAFETY: the caller guarantees the masked lanes' addresses are readable.
    unsafe {
        if T::FULL {
            let src = _mm512_set1_pd(f64::NEG_INFINITY);
            _mm512_mask_i32gather_pd::<8>(src, mask, idx, p as *const f64)
        } else {
            let src = _mm256_set1_ps(f32::NEG_INFINITY);
            _mm512_cvtps_pd(_mm256_mmask_i32gather_ps::<4>(
                src,
                mask,
                idx,
                p as *const f32,
            ))
        }
    }
}

/// Columns `c0..c0+w` (`w <= 8`) of up to 8 float32 rows `pitch` apart, transposed in
/// registers and widened: `out[c0 + k]` holds element `c0 + k` of rows 0..8 (`-inf` past
/// `rows` and past `w`).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
unsafe fn transpose_rows_f32(
    x: *const f32,
    pitch: usize,
    rows: usize,
    c0: usize,
    w: usize,
    out: &mut [std::mem::MaybeUninit<__m512d>],
) {
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let cmask = tail_mask8(w);
    let r: [__m256; 8] = std::array::from_fn(|i| {
        if i < rows {
            // SAFETY: the caller guarantees w readable elements of row i from column c0.
            unsafe { _mm256_mask_loadu_ps(ninf, cmask, x.add(i * pitch + c0)) }
        } else {
            ninf
        }
    });
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let cols = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (k, c) in cols.iter().enumerate().take(w) {
        out[c0 + k].write(_mm512_cvtps_pd(*c));
    }
}

/// `(max, excess)` of 8 short rows (`n <= SHORT_ROW`, `pitch` apart, `rows <= 8` of them
/// valid) with the rows in the lanes: no horizontal reductions. Lanes whose max is not finite
/// or whose sum is NaN are flagged in the returned mask for the scalar reference.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
unsafe fn short_group_state<T: Lanes>(
    x: *const T,
    n: usize,
    pitch: usize,
    rows: usize,
) -> (__m512d, __m512d, __mmask8) {
    // Uninitialised: zeroing 4 KiB per group of 8 rows would cost more than the rows.
    let mut buf = [std::mem::MaybeUninit::<__m512d>::uninit(); super::SHORT_ROW];
    let mask = tail_mask8(rows.min(8));
    let idx = _mm256_mullo_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(pitch as i32),
    );
    let mut m = _mm512_set1_pd(f64::NEG_INFINITY);
    if !T::FULL {
        // float32 rows: transposing 8x8 tiles in registers is cheaper than gathers.
        for c0 in (0..n).step_by(8) {
            // SAFETY: T is f32 (not FULL); elements c0..min(n, c0+8) of each valid row are
            // readable.
            unsafe {
                transpose_rows_f32(x as *const f32, pitch, rows, c0, (n - c0).min(8), &mut buf)
            };
        }
        for b in buf.iter().take(n) {
            // SAFETY: the first n entries were written above.
            m = _mm512_max_pd(m, unsafe { b.assume_init() });
        }
    } else {
        for (k, b) in buf.iter_mut().enumerate().take(n) {
            // SAFETY: element k of each valid row is readable.
            let v = unsafe { gather_column(x.add(k), idx, mask) };
            b.write(v);
            m = _mm512_max_pd(m, v);
        }
    }
    let mut below = _mm512_setzero_pd();
    let mut ties = _mm512_setzero_pd();
    let one = _mm512_set1_pd(1.0);
    for b in buf.iter().take(n) {
        // SAFETY: the first n entries were written above.
        let b = unsafe { b.assume_init_ref() };
        let t = _mm512_sub_pd(*b, m);
        let e = exp_nonpos_pd(t, T::FULL);
        let tie = _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(*b, m);
        below = _mm512_mask_add_pd(below, summable(!tie, t, T::FULL), below, e);
        ties = _mm512_mask_add_pd(ties, tie, ties, one);
    }
    let excess = _mm512_add_pd(below, _mm512_sub_pd(ties, one));
    // Finite max (|m| < inf) and a non-NaN sum: the vector result is right; others are redone.
    let finite = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(_mm512_abs_pd(m), _mm512_set1_pd(f64::INFINITY))
        & _mm512_cmp_pd_mask::<_CMP_ORD_Q>(excess, excess);
    (m, excess, !finite & mask)
}

/// logsumexp of `rows` short rows (`n <= SHORT_ROW`, `pitch` apart) into `out[r]`, 8 rows
/// per vector.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn short_rows_logsumexp<T: Lanes>(
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    out: *mut T,
) {
    let mut r = 0;
    while r < rows {
        let g = (rows - r).min(8);
        // SAFETY: rows r..r+g are readable, out[r..r+g] writable.
        unsafe {
            let p = x.add(r * pitch);
            let (m, excess, redo) = short_group_state(p, n, pitch, g);
            let lse = _mm512_add_pd(m, log1p_pd(excess));
            if g == 8 {
                T::store8(out.add(r), lse);
            } else {
                T::store_tail(out.add(r), lse, g);
            }
            for l in 0..g {
                if redo & (1 << l) != 0 {
                    let s = crate::kernels::scalar::lse_state_two_pass(p, l * pitch, n, 1);
                    *out.add(r + l) = T::from_f64(s.logsumexp());
                }
            }
        }
        r += g;
    }
}

/// Softmax or log_softmax of `rows` short rows (`pitch` apart) into the dense `out`
/// (`rows x n`): states 8 rows per vector, then each row written once from its state.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn short_rows_softmax<T: Lanes>(
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    out: *mut T,
    log: bool,
) {
    let mut r = 0;
    while r < rows {
        let g = (rows - r).min(8);
        // SAFETY: rows r..r+g are readable, their outputs writable; in place (out == x,
        // pitch == n) reads a row before writing it and the states are complete first.
        unsafe {
            let p = x.add(r * pitch);
            let (m, excess, redo) = short_group_state(p, n, pitch, g);
            let (mut ms, mut es) = ([0.0f64; 8], [0.0f64; 8]);
            _mm512_storeu_pd(ms.as_mut_ptr(), m);
            _mm512_storeu_pd(es.as_mut_ptr(), excess);
            let logs = if log {
                let mut l = [0.0f64; 8];
                _mm512_storeu_pd(l.as_mut_ptr(), log1p_pd(excess));
                l
            } else {
                [0.0; 8]
            };
            for l in 0..g {
                let (xr, or) = (p.add(l * pitch), out.add((r + l) * n));
                let state = if redo & (1 << l) != 0 {
                    crate::kernels::scalar::lse_state_two_pass(xr, 0, n, 1)
                } else {
                    LseState {
                        max: ms[l],
                        excess: es[l],
                    }
                };
                if !state.max.is_finite() {
                    if log {
                        crate::kernels::scalar::log_softmax_write(xr, 0, 1, or, 0, 1, n, state);
                    } else {
                        crate::kernels::scalar::softmax_write(xr, 0, 1, or, 0, 1, n, state);
                    }
                } else if log {
                    shift_sub(xr, or, n, state.max, logs[l], false);
                } else {
                    exp_scaled(xr, or, n, state.max, 1.0 / state.total(), false);
                }
            }
        }
        r += g;
    }
}

/// `out[j] = a[j] * exp(x[j] - b[j])` (`exp = true`) or `out[j] = (x[j] - b[j]) - a[j]` for
/// `j < n`: the column kernels' write pass, each column with its own shift and scale/log.
/// `out` may equal `x`.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub unsafe fn lanes_write<T: Lanes>(
    x: *const T,
    out: *mut T,
    n: usize,
    b: *const f64,
    a: *const f64,
    exp: bool,
) {
    let f = |v: __m512d, bv: __m512d, av: __m512d| {
        if exp {
            _mm512_mul_pd(av, exp_pd(_mm512_sub_pd(v, bv), T::FULL))
        } else {
            _mm512_sub_pd(_mm512_sub_pd(v, bv), av)
        }
    };
    let mut i = 0;
    // SAFETY: all five arrays hold n elements; each vector is read before it is written.
    unsafe {
        while i + 8 <= n {
            let y = f(
                T::load8(x.add(i)),
                _mm512_loadu_pd(b.add(i)),
                _mm512_loadu_pd(a.add(i)),
            );
            T::store8(out.add(i), y);
            i += 8;
        }
        if i < n {
            let k = tail_mask8(n - i);
            let (bv, av) = (
                _mm512_maskz_loadu_pd(k, b.add(i)),
                _mm512_maskz_loadu_pd(k, a.add(i)),
            );
            T::store_tail(out.add(i), f(T::load_tail(x.add(i), n - i), bv, av), n - i);
        }
    }
}
