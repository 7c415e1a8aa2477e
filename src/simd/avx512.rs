//! AVX-512 (F + DQ + BW + VL): the [`Lanes`] primitives on 8 float64 lanes, and this level's
//! specialisations: the `vscalefpd` table exp, float32 maxima in 16 float32 lanes, the 8x8
//! register transposes of short rows, streaming stores, a vector log1p, and the float32 exp.
//!
//! The `#[target_feature]` functions here are only reached through [`enter`], which
//! [`super::lanes::dispatch`] calls after run-time detection.

#![allow(clippy::missing_safety_doc)]

use super::consts::*;
use super::lanes::{Kernel, Lanes};
use super::short::IGNORED;
use crate::real::Real;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// The AVX-512 level; a value exists only inside [`enter`].
#[derive(Clone, Copy)]
pub struct Avx512(());

/// Runs `k` with every AVX-512 primitive inlined into this function.
///
/// # Safety
/// The CPU must support AVX-512 F, DQ, BW, VL and POPCNT.
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub(crate) unsafe fn enter<K: Kernel>(k: K) -> K::Out {
    k.run(Avx512(()))
}

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
    // Lanes whose exp rounds to 0 (x < -104, -inf included; NaN stays live) are zeroed by the
    // mask rather than scaled into the underflow, which costs a microcode assist per vector.
    let live = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(F32_EXP_ZERO_BELOW));
    _mm512_maskz_scalef_ps(live, p, k)
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
    // vscalefpd multiplies by 2^floor(kf/16): the table already supplied 2^(j/16). Lanes whose
    // exp rounds to 0 (-inf included; NaN stays live) are zeroed by the mask rather than scaled
    // into the underflow, which costs a microcode assist per vector (masks of -inf are common).
    let live = _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(t, _mm512_set1_pd(F64_EXP_ZERO_BELOW));
    _mm512_maskz_scalef_pd(live, y, _mm512_mul_pd(kf, _mm512_set1_pd(1.0 / 16.0)))
}

/// Lanes of `t = x - max` whose exp belongs in a "below the max" sum: not ties (`below`),
/// and for float32-grade sums above the clamp of [`exp_nonpos_pd`] (NaN kept, so it shows).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn summable_pd(below: __mmask8, t: __m512d, full: bool) -> __mmask8 {
    if full {
        below
    } else {
        _mm512_mask_cmp_pd_mask::<_CMP_NLE_UQ>(below, t, _mm512_set1_pd(EXP_FLOOR))
    }
}

#[inline]
fn tail_mask8(n: usize) -> __mmask8 {
    ((1u32 << n) - 1) as __mmask8
}

/// `log1p(e)` for `e >= 0` in float64 lanes (< 4 ULP of float64 when `full`, 3 where
/// `k ln2 + log f` cancels; else within 2e-12 relative, by [`log1p_table_pd`]): `u = 1 + e =
/// 2^k f` with f in [sqrt(1/2), sqrt(2)), `log f = 2 atanh(s)`, s = (f-1)/(f+1), |s| < 0.172,
/// by its series to s^23 (truncation < 1e-18), plus the rounding error of `1 + e` as
/// `(e-(u-1))/u`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
pub fn log1p_pd(e: __m512d, full: bool) -> __m512d {
    if !full {
        return log1p_table_pd(e);
    }
    let one = _mm512_set1_pd(1.0);
    let u = _mm512_add_pd(one, e);
    let mut k = _mm512_getexp_pd(u);
    let mut f = _mm512_getmant_pd::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(u);
    let big = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(f, _mm512_set1_pd(std::f64::consts::SQRT_2));
    f = _mm512_mask_mul_pd(f, big, f, _mm512_set1_pd(0.5));
    k = _mm512_mask_add_pd(k, big, k, one);
    let s = _mm512_div_pd(_mm512_sub_pd(f, one), _mm512_add_pd(f, one));
    let z = _mm512_mul_pd(s, s);
    let top = super::lanes::log1p_terms(full);
    let mut p = _mm512_set1_pd(2.0 / (2 * top + 1) as f64);
    for j in (0..top).rev() {
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
    // +inf and NaN (not below +inf) pass through (`inf - inf` would make the sum NaN).
    let special = _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(e, _mm512_set1_pd(f64::INFINITY));
    _mm512_mask_mov_pd(_mm512_add_pd(log_u, c), special, e)
}

/// [`log1p_pd`] for float32-grade results (within 2e-12 relative), with no division: `u = 1 + e
/// = 2^k f` with f in [0.75, 1.5), `f = c (1 + v)` with `c` the nearest sixteenth (from a
/// 16-entry table of `1/c` and `log(1/c)`, `c = 1` exactly near 1), |v| <= 1/24, and `log1p(v)`
/// by its Taylor series to v^8 (truncation < 2e-13 relative). The rounding error of `1 + e`
/// is added as `(e - (u - 1)) 2^-k / c` (the exact quotient where it matters: `u` near 1).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn log1p_table_pd(e: __m512d) -> __m512d {
    let one = _mm512_set1_pd(1.0);
    let u = _mm512_add_pd(one, e);
    let f = _mm512_getmant_pd::<_MM_MANT_NORM_P75_1P5, _MM_MANT_SIGN_SRC>(u);
    // A mantissa of [1.5, 2) came back halved: its exponent is one more.
    let k = _mm512_getexp_pd(u);
    let k = _mm512_mask_add_pd(k, _mm512_cmp_pd_mask::<_CMP_LT_OQ>(f, one), k, one);
    // round(16 f) in [12, 24]; its low 4 bits index the table.
    let kd = _mm512_fmadd_pd(f, _mm512_set1_pd(16.0), _mm512_set1_pd(ROUND_MAGIC));
    let idx = _mm512_castpd_si512(kd);
    // SAFETY: each table holds 16 f64; two unaligned 8-lane loads read it exactly.
    let (inv, log_inv) = unsafe {
        let t = |p: *const f64| {
            _mm512_permutex2var_pd(_mm512_loadu_pd(p), idx, _mm512_loadu_pd(p.add(8)))
        };
        (t(LOG_INV_C16[0].as_ptr()), t(LOG_INV_C16[1].as_ptr()))
    };
    let v = _mm512_fmsub_pd(f, inv, one);
    let mut p = _mm512_set1_pd(-1.0 / 8.0);
    for j in (1..8).rev() {
        let c = if j % 2 == 1 { 1.0 } else { -1.0 } / j as f64;
        p = _mm512_fmadd_pd(p, v, _mm512_set1_pd(c));
    }
    let c = _mm512_sub_pd(e, _mm512_sub_pd(u, one));
    let c = _mm512_scalef_pd(_mm512_mul_pd(c, inv), _mm512_sub_pd(_mm512_setzero_pd(), k));
    let small = _mm512_sub_pd(_mm512_fmadd_pd(v, p, c), log_inv);
    let log_u = _mm512_fmadd_pd(
        k,
        _mm512_set1_pd(LN2_HI),
        _mm512_fmadd_pd(k, _mm512_set1_pd(LN2_LO), small),
    );
    let special = _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(e, _mm512_set1_pd(f64::INFINITY));
    _mm512_mask_mov_pd(log_u, special, e)
}

/// `v` as it is, through an empty `asm!` that the compiler cannot see into: a load kept
/// apart from the masked blend that takes it, which would otherwise be folded into a masked
/// load (those stall on Zen 5 when they miss the cache: rows of 10-13 under a mask ran 2.7-3.5x
/// slower from DRAM).
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn opaque_ps(mut v: __m256) -> __m256 {
    // SAFETY: an empty template; it reads and writes nothing but the register.
    unsafe {
        std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags))
    };
    v
}

/// [`opaque_ps`] for float64 rows.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn opaque_pd(mut v: __m512d) -> __m512d {
    // SAFETY: as in opaque_ps.
    unsafe {
        std::arch::asm!("/* {0} */", inout(zmm_reg) v, options(pure, nomem, nostack, preserves_flags))
    };
    v
}

/// The 8x8 transpose of float32 lanes: `out[k][i] = r[i][k]`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn transpose8_ps(r: [__m256; 8]) -> [__m256; 8] {
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
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// The 8x8 transpose of float64 lanes: `out[k][i] = r[i][k]`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
fn transpose8_pd(r: [__m512d; 8]) -> [__m512d; 8] {
    // Pairs of rows interleaved, then pairs of pairs, then the two halves of the rows.
    let t: [__m512d; 8] = super::array8(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        }
    });
    let lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    let s: [__m512d; 8] = super::array8(|i| {
        let (h, odd, second) = (i / 4, (i / 2) % 2, i % 2);
        let (a, b) = (t[4 * h + odd], t[4 * h + 2 + odd]);
        _mm512_permutex2var_pd(a, if second == 0 { lo } else { hi }, b)
    });
    // s[4h + 2 odd + second] holds rows 4h..4h+4 of columns c = odd + 2 second and c + 4.
    let first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    let last = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    super::array8(|k| {
        let c = k % 4;
        let (odd, second) = (c % 2, c / 2);
        let j = 2 * odd + second;
        _mm512_permutex2var_pd(s[j], if k < 4 { first } else { last }, s[4 + j])
    })
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

// SAFETY: an `Avx512` exists only inside `enter`, which runs after detection.
unsafe impl Lanes for Avx512 {
    type V = __m512d;
    type M = __mmask8;
    const N: usize = 8;
    const STREAMS: bool = true;
    // Never: each row is masked before its transpose ([`Lanes::load_columns_kept`]). On Zen 5
    // (2 threads, 2^24 float32, 90% kept), logsumexp `where=` over the unmasked op: rows of
    // 20-64 1.07-1.29x masked so, 1.34-1.48x staged; rows of 10-14 staged 2.0-2.7x. (At the
    // AVX2 level, which masks each column as it loads it, staging stays ahead at rows of
    // 10-14: 1.1-1.6x against 1.4-1.9x.)
    const STAGED_FROM: usize = usize::MAX;

    // SAFETY (every primitive below): a value of `Avx512` proves the CPU has the features.
    #[inline(always)]
    fn splat(self, v: f64) -> __m512d {
        unsafe { _mm512_set1_pd(v) }
    }
    #[inline(always)]
    fn add(self, a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_add_pd(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_sub_pd(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_mul_pd(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_div_pd(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_max_pd(a, b) }
    }
    #[inline(always)]
    fn to_lanes(self, v: __m512d) -> [f64; 8] {
        let mut a = [0.0; 8];
        unsafe { _mm512_storeu_pd(a.as_mut_ptr(), v) };
        a
    }
    #[inline(always)]
    fn of_lanes(self, a: &[f64; 8]) -> __m512d {
        unsafe { _mm512_loadu_pd(a.as_ptr()) }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m512d) -> f64 {
        unsafe { _mm512_reduce_add_pd(v) }
    }
    #[inline(always)]
    fn reduce_max(self, v: __m512d) -> f64 {
        unsafe { _mm512_reduce_max_pd(v) }
    }
    #[inline(always)]
    fn eq(self, a: __m512d, b: __m512d) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(a, b) }
    }
    #[inline(always)]
    fn gt(self, a: __m512d, b: __m512d) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_GT_OQ>(a, b) }
    }
    #[inline(always)]
    fn not(self, m: __mmask8) -> __mmask8 {
        !m
    }
    #[inline(always)]
    fn ne(self, a: __m512d, b: __m512d) -> __mmask8 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(a, b) }
    }
    #[inline(always)]
    fn any(self, m: __mmask8) -> bool {
        m != 0
    }
    #[inline(always)]
    fn bits(self, m: __mmask8) -> u8 {
        m
    }
    #[inline(always)]
    fn count(self, m: __mmask8) -> u64 {
        u64::from(m.count_ones())
    }
    #[inline(always)]
    fn select(self, m: __mmask8, a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_mask_mov_pd(b, m, a) }
    }
    #[inline(always)]
    fn masked_add(self, acc: __m512d, m: __mmask8, e: __m512d) -> __m512d {
        unsafe { _mm512_mask_add_pd(acc, m, acc, e) }
    }

    /// Whole 8x8 tiles loaded as 8 rows, transposed in registers and stored as 8 columns;
    /// the edges element by element.
    #[inline(always)]
    unsafe fn transpose<T: Real>(
        self,
        (src, src_stride): (*const T, usize),
        (dst, dst_stride): (*mut T, usize),
        rows: usize,
        cols: usize,
    ) {
        let (full_rows, full_cols) = (rows - rows % 8, cols - cols % 8);
        // SAFETY: every tile lies inside the block (the caller's contract).
        unsafe {
            for r0 in (0..full_rows).step_by(8) {
                for c0 in (0..full_cols).step_by(8) {
                    let at = |i: usize| src.add((r0 + i) * src_stride + c0);
                    let to = |k: usize| dst.add((c0 + k) * dst_stride + r0);
                    if T::FULL {
                        let r: [__m512d; 8] =
                            super::array8(|i| _mm512_loadu_pd(at(i) as *const f64));
                        for (k, c) in transpose8_pd(r).iter().enumerate() {
                            _mm512_storeu_pd(to(k) as *mut f64, *c);
                        }
                    } else {
                        let r: [__m256; 8] =
                            super::array8(|i| _mm256_loadu_ps(at(i) as *const f32));
                        for (k, c) in transpose8_ps(r).iter().enumerate() {
                            _mm256_storeu_ps(to(k) as *mut f32, *c);
                        }
                    }
                }
            }
            let by_element = super::lanes::transpose_by_element::<T>;
            by_element(
                src,
                src_stride,
                dst,
                dst_stride,
                (0, full_rows),
                (full_cols, cols),
            );
            by_element(
                src,
                src_stride,
                dst,
                dst_stride,
                (full_rows, rows),
                (0, cols),
            );
        }
    }

    /// A whole group's rows masked before their transpose: each row's 8 mask bytes tested at
    /// once (one `vptestmb`) and its loaded vector blended with `-inf` under them, so a
    /// column costs no mask work of its own. Partial groups and tails without room take the
    /// bits' transpose.
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
        out: &mut [MaybeUninit<__m512d>],
    ) {
        // SAFETY: whole rows of 8 elements from c0 (room) and their 8 mask bytes are
        // readable (the caller's contract); out holds c0 + w entries.
        unsafe {
            if rows < 8 || room < 8 {
                let bits = super::lanes::word_bits(keep, lane, rows.min(8), skip);
                return super::lanes::load_columns_of_bits(self, row, rows, c0, w, room, bits, out);
            }
            let shift = _mm_cvtsi64_si128((8 * skip) as i64);
            let kept = |i: usize| {
                let b = _mm_loadl_epi64(keep.add(i * lane) as *const __m128i);
                let b = if skip == 0 {
                    b
                } else {
                    _mm_srl_epi64(b, shift)
                };
                _mm_test_epi8_mask(b, b) as __mmask8
            };
            if T::FULL {
                let ninf = _mm512_set1_pd(f64::NEG_INFINITY);
                let r: [__m512d; 8] = super::array8(|i| {
                    let v = opaque_pd(_mm512_loadu_pd((row(i) as *const f64).add(c0)));
                    _mm512_mask_blend_pd(kept(i), ninf, v)
                });
                for (k, c) in transpose8_pd(r).iter().enumerate().take(w) {
                    out[c0 + k].write(*c);
                }
            } else {
                let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
                let r: [__m256; 8] = super::array8(|i| {
                    let v = opaque_ps(_mm256_loadu_ps((row(i) as *const f32).add(c0)));
                    _mm256_mask_blend_ps(kept(i), ninf, v)
                });
                for (k, c) in transpose8_ps(r).iter().enumerate().take(w) {
                    out[c0 + k].write(_mm512_cvtps_pd(*c));
                }
            }
        }
    }
    #[inline(always)]
    fn lanes_of_bits(self, bits: u8) -> __mmask8 {
        bits
    }
    #[inline(always)]
    unsafe fn kept(self, keep: *const u8) -> __mmask8 {
        // SAFETY: the caller guarantees 8 readable bytes.
        unsafe {
            let b = _mm_loadl_epi64(keep as *const __m128i);
            _mm_test_epi8_mask(b, b) as __mmask8
        }
    }
    #[inline(always)]
    unsafe fn index_terms<T: Real>(
        self,
        x: *const T,
        (pitch, step): (usize, usize),
        class: &[u32],
        weight: &[f64],
        fill: __m512d,
    ) -> (__m512d, __m512d, __mmask8) {
        // One gather of the eight targets (rows `pitch` apart, 32-bit offsets) and one load of
        // the weights, where a loop would store eight lanes and load them back as a vector.
        // SAFETY: 8 classes and weights (the caller's contract); only the kept rows' targets
        // are read, each inside its row, at an offset that fits an i32.
        unsafe {
            let cls = _mm256_loadu_si256(class.as_ptr() as *const __m256i);
            let kept = _mm256_cmpneq_epu32_mask(cls, _mm256_set1_epi32(IGNORED as i32));
            let rows = _mm256_mullo_epi32(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32(pitch as i32),
            );
            // `step` is a constant where this is inlined: 1 adds the classes as they are.
            let at = _mm256_add_epi32(
                rows,
                _mm256_mullo_epi32(cls, _mm256_set1_epi32(step as i32)),
            );
            let xt = if T::FULL {
                _mm512_mask_i32gather_pd::<8>(fill, kept, at, x as *const f64)
            } else {
                let g =
                    _mm256_mmask_i32gather_ps::<4>(_mm256_setzero_ps(), kept, at, x as *const f32);
                _mm512_mask_blend_pd(kept, fill, _mm512_cvtps_pd(g))
            };
            (xt, _mm512_maskz_loadu_pd(kept, weight.as_ptr()), kept)
        }
    }
    #[inline(always)]
    unsafe fn kept_tail(self, keep: *const u8, n: usize) -> __mmask8 {
        // SAFETY: the masked bytes are not accessed; the first n < 8 are readable.
        unsafe {
            let b = _mm_maskz_loadu_epi8(tail_mask8(n) as __mmask16, keep as *const i8);
            _mm_test_epi8_mask(b, b) as __mmask8
        }
    }
    #[inline(always)]
    unsafe fn load<T: Real>(self, p: *const T) -> __m512d {
        // SAFETY: the caller guarantees 8 readable elements.
        unsafe {
            if T::FULL {
                _mm512_loadu_pd(p as *const f64)
            } else {
                _mm512_cvtps_pd(_mm256_loadu_ps(p as *const f32))
            }
        }
    }
    /// The load behind an empty `asm!`: folded into the `vmovapd`/`vblendmpd` of a select it
    /// becomes a masked load (`vcvtps2pd (mem), zmm{k}`), which on Zen 5 stalls when it misses
    /// the cache: staging float32 rows of 1000 under a mask took as long as the loss itself.
    /// (The kept float32 max below keeps its load apart too: its pass is light enough to
    /// miss.)
    #[inline(always)]
    unsafe fn load_apart<T: Real>(self, p: *const T) -> __m512d {
        // SAFETY: the caller guarantees 8 readable elements.
        unsafe {
            if T::FULL {
                opaque_pd(_mm512_loadu_pd(p as *const f64))
            } else {
                _mm512_cvtps_pd(opaque_ps(_mm256_loadu_ps(p as *const f32)))
            }
        }
    }
    #[inline(always)]
    unsafe fn load_tail<T: Real>(self, p: *const T, n: usize) -> __m512d {
        // SAFETY: masked lanes are not accessed; the first n are readable.
        unsafe {
            if T::FULL {
                let fill = _mm512_set1_pd(f64::NEG_INFINITY);
                _mm512_mask_loadu_pd(fill, tail_mask8(n), p as *const f64)
            } else {
                let fill = _mm256_set1_ps(f32::NEG_INFINITY);
                _mm512_cvtps_pd(_mm256_mask_loadu_ps(fill, tail_mask8(n), p as *const f32))
            }
        }
    }
    #[inline(always)]
    unsafe fn store<T: Real>(self, p: *mut T, v: __m512d) {
        // SAFETY: the caller guarantees 8 writable elements.
        unsafe {
            if T::FULL {
                _mm512_storeu_pd(p as *mut f64, v)
            } else {
                _mm256_storeu_ps(p as *mut f32, _mm512_cvtpd_ps(v))
            }
        }
    }
    #[inline(always)]
    unsafe fn store_tail<T: Real>(self, p: *mut T, v: __m512d, n: usize) {
        // SAFETY: only the first n lanes are written.
        unsafe {
            if T::FULL {
                _mm512_mask_storeu_pd(p as *mut f64, tail_mask8(n), v)
            } else {
                _mm256_mask_storeu_ps(p as *mut f32, tail_mask8(n), _mm512_cvtpd_ps(v))
            }
        }
    }
    #[inline(always)]
    unsafe fn stream<T: Real>(self, p: *mut T, v: __m512d) {
        // SAFETY: the caller guarantees 8 writable elements, aligned to 8 elements.
        unsafe {
            if T::FULL {
                _mm512_stream_pd(p as *mut f64, v)
            } else {
                _mm256_stream_ps(p as *mut f32, _mm512_cvtpd_ps(v))
            }
        }
    }
    #[inline(always)]
    fn fence(self) {
        unsafe { _mm_sfence() }
    }

    #[inline(always)]
    fn exp(self, t: __m512d, full: bool) -> __m512d {
        unsafe { exp_pd(t, full) }
    }
    #[inline(always)]
    fn exp_nonpos(self, t: __m512d, full: bool) -> __m512d {
        unsafe { exp_nonpos_pd(t, full) }
    }
    #[inline(always)]
    fn summable(self, below: __mmask8, t: __m512d, full: bool) -> __mmask8 {
        unsafe { summable_pd(below, t, full) }
    }
    #[inline(always)]
    fn log1p(self, e: __m512d, full: bool) -> __m512d {
        unsafe { log1p_pd(e, full) }
    }

    /// float32: 16 lanes at a time in float32, no widening.
    #[inline(always)]
    unsafe fn max_of<T: Real>(self, p: *const T, n: usize) -> f64 {
        if T::FULL {
            // SAFETY: forwarded from the caller.
            return unsafe { super::lanes::max_of_widened(self, p, n) };
        }
        let p = p as *const f32;
        // SAFETY: every load is within the n elements (full vectors, then a masked tail).
        unsafe {
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut acc = [ninf; 4];
            let mut i = 0;
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
            let m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
            _mm512_reduce_max_ps(m) as f64
        }
    }
    const TAKES_MIN: bool = true;
    /// float32: the max and the min in 16 float32 lanes, no widening (rows within the exp's
    /// clamp of their max then take their kept exps unclamped).
    #[inline(always)]
    fn range_init(self) -> [__m512d; 2] {
        // SAFETY: AVX-512 F is enabled (this level).
        unsafe {
            [
                _mm512_castps_pd(_mm512_set1_ps(f32::NEG_INFINITY)),
                _mm512_castps_pd(_mm512_set1_ps(f32::INFINITY)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn range_step(self, acc: [__m512d; 2], p: *const f32) -> [__m512d; 2] {
        // SAFETY: the caller guarantees 16 readable elements.
        unsafe {
            let v = _mm512_loadu_ps(p);
            [
                _mm512_castps_pd(_mm512_max_ps(_mm512_castpd_ps(acc[0]), v)),
                _mm512_castps_pd(_mm512_min_ps(_mm512_castpd_ps(acc[1]), v)),
            ]
        }
    }
    #[inline(always)]
    fn range_finish(self, acc: [__m512d; 2]) -> (f32, f32) {
        // SAFETY: AVX-512 F is enabled (this level).
        unsafe {
            (
                _mm512_reduce_max_ps(_mm512_castpd_ps(acc[0])),
                _mm512_reduce_min_ps(_mm512_castpd_ps(acc[1])),
            )
        }
    }
    #[inline(always)]
    fn max_init<T: Real>(self) -> [__m512d; 2] {
        unsafe {
            if T::FULL {
                [_mm512_set1_pd(f64::NEG_INFINITY); 2]
            } else {
                [_mm512_castps_pd(_mm512_set1_ps(f32::NEG_INFINITY)); 2]
            }
        }
    }
    #[inline(always)]
    unsafe fn max_step<T: Real>(self, acc: [__m512d; 2], p: *const T) -> [__m512d; 2] {
        // SAFETY: the caller guarantees 16 readable elements.
        unsafe {
            if T::FULL {
                super::lanes::max_step_widened(self, acc, p)
            } else {
                let v = _mm512_loadu_ps(p as *const f32);
                let m = _mm512_max_ps(_mm512_castpd_ps(acc[0]), v);
                [_mm512_castps_pd(m), acc[1]]
            }
        }
    }
    /// float32: 16 lanes at a time in float32, the mask applied by the max itself (the load
    /// does not wait for the mask bytes).
    #[inline(always)]
    unsafe fn max_step_kept<T: Real>(
        self,
        acc: [__m512d; 2],
        p: *const T,
        keep: *const u8,
    ) -> [__m512d; 2] {
        // SAFETY: the caller guarantees 16 readable elements and mask bytes.
        unsafe {
            if T::FULL {
                super::lanes::max_step_kept_widened(self, acc, p, keep)
            } else {
                let b = _mm_loadu_si128(keep as *const __m128i);
                let k = _mm_test_epi8_mask(b, b);
                let a = _mm512_castpd_ps(acc[0]);
                // Kept apart from the masked max (a masked load if folded: see load_apart).
                let v = _mm512_castpd_ps(opaque_pd(_mm512_castps_pd(_mm512_loadu_ps(
                    p as *const f32,
                ))));
                [_mm512_castps_pd(_mm512_mask_max_ps(a, k, a, v)), acc[1]]
            }
        }
    }
    #[inline(always)]
    fn max_finish<T: Real>(self, acc: [__m512d; 2]) -> f64 {
        unsafe {
            if T::FULL {
                _mm512_reduce_max_pd(_mm512_max_pd(acc[0], acc[1]))
            } else {
                let m = _mm512_max_ps(_mm512_castpd_ps(acc[0]), _mm512_castpd_ps(acc[1]));
                _mm512_reduce_max_ps(m) as f64
            }
        }
    }

    /// An 8x8 transpose in registers (float32, and float64 where `room` holds whole rows of
    /// 8); else one gather per float64 column.
    #[inline(always)]
    unsafe fn load_columns<T: Real>(
        self,
        row: impl Fn(usize) -> *const T,
        rows: usize,
        c0: usize,
        w: usize,
        room: usize,
        out: &mut [MaybeUninit<__m512d>],
    ) {
        let mask = tail_mask8(rows.min(8));
        // SAFETY: only the masked lanes' addresses (elements c0..c0+w of rows 0..rows, or
        // c0..c0+8 where `room` holds them) are read; out holds c0 + w entries.
        unsafe {
            if T::FULL && room >= 8 && rows == 8 {
                // Whole rows and a transpose: on Zen 5, float64 rows of 10-64 took 0.65-0.75x
                // the time of the gathers below in L2, 0.35-0.7x from DRAM.
                let r: [__m512d; 8] =
                    super::array8(|i| _mm512_loadu_pd((row(i) as *const f64).add(c0)));
                for (k, c) in transpose8_pd(r).iter().enumerate().take(w) {
                    out[c0 + k].write(*c);
                }
                return;
            }
            if T::FULL {
                // Gathers for a partial group or a tail without room. Each row's byte
                // offset from the first (0 for the lanes past `rows`, which are not read).
                let base = row(0) as *const f64;
                let offset: [i64; 8] = super::array8(|i| {
                    let d = (row(i) as isize).wrapping_sub(base as isize);
                    if i < rows {
                        d as i64
                    } else {
                        0
                    }
                });
                let idx = _mm512_loadu_si512(offset.as_ptr() as *const _);
                let src = _mm512_set1_pd(f64::NEG_INFINITY);
                for (k, o) in out.iter_mut().enumerate().skip(c0).take(w) {
                    o.write(_mm512_mask_i64gather_pd::<1>(src, mask, idx, base.add(k)));
                }
                return;
            }
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let cmask = tail_mask8(w);
            let whole = room >= 8;
            let r: [__m256; 8] = super::array8(|i| {
                let p = (row(i) as *const f32).add(c0);
                if i < rows {
                    if whole {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_mask_loadu_ps(ninf, cmask, p)
                    }
                } else {
                    ninf
                }
            });
            for (k, c) in transpose8_ps(r).iter().enumerate().take(w) {
                out[c0 + k].write(_mm512_cvtps_pd(*c));
            }
        }
    }

    /// The same transpose back; a whole vector of columns by a plain store (a masked store
    /// only for a tail).
    #[inline(always)]
    unsafe fn store_columns<T: Real>(
        self,
        out: *mut T,
        pitch: usize,
        rows: usize,
        skip: u8,
        c0: usize,
        w: usize,
        cols: &[__m512d],
    ) {
        let mask = tail_mask8(rows.min(8)) & !skip;
        // SAFETY: only elements c0..c0+w of the unmasked rows are written; cols holds c0 + w
        // entries.
        unsafe {
            if T::FULL {
                let out = out as *mut f64;
                let c: [__m512d; 8] = super::array8(|k| {
                    if k < w {
                        cols[c0 + k]
                    } else {
                        _mm512_setzero_pd()
                    }
                });
                let cmask = tail_mask8(w);
                for (i, r) in transpose8_pd(c).iter().enumerate() {
                    if mask & (1 << i) != 0 {
                        let p = out.add(i * pitch + c0);
                        if w == 8 {
                            _mm512_storeu_pd(p, *r);
                        } else {
                            _mm512_mask_storeu_pd(p, cmask, *r);
                        }
                    }
                }
                return;
            }
            let out = out as *mut f32;
            let c: [__m256; 8] = super::array8(|k| {
                if k < w {
                    _mm512_cvtpd_ps(cols[c0 + k])
                } else {
                    _mm256_setzero_ps()
                }
            });
            let cmask = tail_mask8(w);
            for (i, r) in transpose8_ps(c).iter().enumerate() {
                if mask & (1 << i) != 0 {
                    let p = out.add(i * pitch + c0);
                    if w == 8 {
                        _mm256_storeu_ps(p, *r);
                    } else {
                        _mm256_mask_storeu_ps(p, cmask, *r);
                    }
                }
            }
        }
    }
}
