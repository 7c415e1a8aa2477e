//! AVX2 + FMA: the [`Lanes`] primitives on 4 float64 lanes, and the float32 exp on 8 float32
//! lanes. Without `vscalefpd`/`vpermt2pd`, `2^k` is built from the exponent bits (in two halves
//! where subnormal results must round once); the float64 exp gathers its 16-entry table, the
//! float32-grade exp picks from a 4-entry table held in registers ([`exp_reduced_pd`]).

#![allow(clippy::missing_safety_doc)]

use super::consts::*;
use super::lanes::{log1p_terms, Kernel, Lanes};
use crate::real::Real;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// The AVX2 level; a value exists only inside [`enter`].
#[derive(Clone, Copy)]
pub struct Avx2(());

/// Runs `k` with every AVX2 primitive inlined into this function.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn enter<K: Kernel>(k: K) -> K::Out {
    k.run(Avx2(()))
}

/// `2^e` for integral float64 `e` in [-1022, 1023].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn pow2_pd(e: __m256d) -> __m256d {
    // e + 2^52 + 1023 holds the biased exponent in its low bits; shift it into place.
    let b = _mm256_add_pd(e, _mm256_set1_pd(4503599627370496.0 + 1023.0));
    _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_castpd_si256(b)))
}

/// float64 exp: for float64 results as `avx512::exp_pd` (same reduction, table and
/// polynomial); for float32-grade results by [`exp_reduced_pd`], scaled by `2^(k >> 2)` in two
/// factors so that any argument up to 710 works.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_pd(t: __m256d, full: bool) -> __m256d {
    // Lanes whose exp rounds to 0 (-inf included; NaN is not among them) are computed at 0 and
    // zeroed at the end: an underflowing multiply costs a microcode assist per vector.
    let dead = _mm256_cmp_pd::<_CMP_LT_OQ>(t, _mm256_set1_pd(F64_EXP_ZERO_BELOW));
    let t = _mm256_andnot_pd(dead, t);
    let t = _mm256_min_pd(_mm256_set1_pd(710.0), t);
    let (y, e) = if full {
        let magic = _mm256_set1_pd(ROUND_MAGIC);
        let kd = _mm256_fmadd_pd(t, _mm256_set1_pd(SIXTEEN_OVER_LN2), magic);
        let kf = _mm256_sub_pd(kd, magic);
        let r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_OVER_16_HI), t);
        let r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_OVER_16_LO), r);
        let j = _mm256_and_si256(_mm256_castpd_si256(kd), _mm256_set1_epi64x(15));
        // SAFETY: j is in 0..16 and EXP2_J16 holds 16 f64.
        let tab = unsafe { _mm256_i64gather_pd::<8>(EXP2_J16.as_ptr(), j) };
        let mut a = _mm256_set1_pd(TAYLOR7[0]);
        for &c in &TAYLOR7[1..] {
            a = _mm256_fmadd_pd(a, r, _mm256_set1_pd(c));
        }
        let y = _mm256_fmadd_pd(tab, _mm256_mul_pd(a, r), tab);
        (
            y,
            _mm256_floor_pd(_mm256_mul_pd(kf, _mm256_set1_pd(1.0 / 16.0))),
        )
    } else {
        let (tab, q, kd) = exp_reduced_pd(t, &EXP2_J4);
        let kf = _mm256_sub_pd(kd, _mm256_set1_pd(ROUND_MAGIC));
        (
            _mm256_fmadd_pd(tab, q, tab),
            _mm256_floor_pd(_mm256_mul_pd(kf, _mm256_set1_pd(0.25))),
        )
    };
    // 2^e in two factors so that neither leaves the normal range.
    let e1 = _mm256_floor_pd(_mm256_mul_pd(e, _mm256_set1_pd(0.5)));
    let e2 = _mm256_sub_pd(e, e1);
    _mm256_andnot_pd(
        dead,
        _mm256_mul_pd(_mm256_mul_pd(y, pow2_pd(e1)), pow2_pd(e2)),
    )
}

/// The float32-grade exp's core: `t = k ln2/4 + r` with `|r| <= ln2/8`, `2^(j/4)` (`j = k & 3`)
/// picked from two registers by `vpermilpd` and a blend, and `exp(r)` by a degree-5
/// polynomial (relative error < 2.4e-11, [`EXP_POLY5_J4`]); returns the entry of `table`
/// (`EXP2_J4`, or `EXP2_J4_LESS_J` for a caller that adds `k << 50`), `q = exp(r) - 1`, so
/// that `exp(t) = 2^(k >> 2) (tab + tab q)`, and `kd`, which holds `k` in its low bits. No
/// gather: with a 16-entry table `vpgatherqq` took half the time of the sum loop on Zen 2.
/// `q(0)` is exactly 0.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_reduced_pd(t: __m256d, table: &[u64; 4]) -> (__m256d, __m256d, __m256d) {
    let magic = _mm256_set1_pd(ROUND_MAGIC);
    let kd = _mm256_fmadd_pd(t, _mm256_set1_pd(FOUR_OVER_LN2), magic);
    let kf = _mm256_sub_pd(kd, magic);
    let r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_OVER_4), t);
    let kbits = _mm256_castpd_si256(kd);
    let e = table;
    let pair = |a: u64, b: u64| {
        _mm256_castsi256_pd(_mm256_setr_epi64x(a as i64, b as i64, a as i64, b as i64))
    };
    // vpermilpd picks within each 128-bit half by bit 1 of the lane's index (k's bit 0);
    // blendv by the sign bit (k's bit 1).
    let idx = _mm256_slli_epi64::<1>(kbits);
    let tab = _mm256_blendv_pd(
        _mm256_permutevar_pd(pair(e[0], e[1]), idx),
        _mm256_permutevar_pd(pair(e[2], e[3]), idx),
        _mm256_castsi256_pd(_mm256_slli_epi64::<62>(kbits)),
    );
    // q = r + r^2 a(r), a's halves in parallel (Estrin): two FMAs after r^2 instead of four
    // in a chain, so more vectors overlap in the FP scheduler.
    let c = |k: usize| _mm256_set1_pd(EXP_POLY5_J4[k]);
    let r2 = _mm256_mul_pd(r, r);
    let hi = _mm256_fmadd_pd(c(0), r, c(1));
    let lo = _mm256_fmadd_pd(c(2), r, c(3));
    let q = _mm256_fmadd_pd(_mm256_fmadd_pd(hi, r2, lo), r2, r);
    (tab, q, kd)
}

/// [`exp_pd`] for arguments `<= 0` or NaN (the shifted sums, `t = x - max`). float64 results
/// as `exp_pd`; float32-grade results put `2^(k >> 2)` straight into the table entry's
/// exponent bits (a shift and an add instead of two floors and three multiplies), which needs
/// a normal result: the argument is clamped at -708, where exp is 3e-308, and [`summable_pd`]
/// drops the lanes below it. Above the clamp the result is bit-identical to `exp_pd`'s:
/// scaling by a power of two commutes with the rounding of a normal number.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_nonpos_pd(t: __m256d, full: bool) -> __m256d {
    if full {
        return exp_pd(t, true);
    }
    // max returns its second operand when either is NaN, so NaN passes through.
    exp_above_floor_pd(_mm256_max_pd(_mm256_set1_pd(EXP_FLOOR), t))
}

/// The float32-grade [`exp_nonpos_pd`] of `t` in `[EXP_FLOOR, 0]` or NaN, without its clamp
/// (anything at all below it: the exponent bits wrap).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_above_floor_pd(t: __m256d) -> __m256d {
    let (tab, q, kd) = exp_reduced_pd(t, &EXP2_J4_LESS_J);
    // kd << 50 = (k >> 2) << 52 (the exponent step) + (k & 3) << 50, and the table entries
    // have (j << 50) taken off, so the sum is 2^(j/4) * 2^(k >> 2) exactly.
    let tab = _mm256_castsi256_pd(_mm256_add_epi64(
        _mm256_castpd_si256(tab),
        _mm256_slli_epi64::<50>(_mm256_castpd_si256(kd)),
    ));
    _mm256_fmadd_pd(tab, q, tab)
}

/// Lanes of `t = x - max` whose exp belongs in a "below the max" sum: not ties (`below`),
/// and for float32-grade sums above the clamp of [`exp_nonpos_pd`] (NaN kept, so it shows).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn summable_pd(below: __m256d, t: __m256d, full: bool) -> __m256d {
    if full {
        below
    } else {
        _mm256_and_pd(
            below,
            _mm256_cmp_pd::<_CMP_NLE_UQ>(t, _mm256_set1_pd(EXP_FLOOR)),
        )
    }
}

/// The largest of 8 float32 lanes (a NaN lane may or may not show; callers re-check).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce_max_ps(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// `0, 1, 2, 3` in the 64-bit lanes (the lane each compares its column count with).
const LANE_INDEX: __m256i = unsafe { std::mem::transmute([0i64, 1, 2, 3]) };

/// A 4x4 float32 transpose: `out[k]` holds element `k` of `r[0..4]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose4_ps(r: [__m128; 4]) -> [__m128; 4] {
    let t0 = _mm_unpacklo_ps(r[0], r[1]);
    let t1 = _mm_unpacklo_ps(r[2], r[3]);
    let t2 = _mm_unpackhi_ps(r[0], r[1]);
    let t3 = _mm_unpackhi_ps(r[2], r[3]);
    [
        _mm_movelh_ps(t0, t1),
        _mm_movehl_ps(t1, t0),
        _mm_movelh_ps(t2, t3),
        _mm_movehl_ps(t3, t2),
    ]
}

/// A 4x4 float64 transpose: `out[k]` holds element `k` of `r[0..4]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose4_pd(r: [__m256d; 4]) -> [__m256d; 4] {
    let t0 = _mm256_unpacklo_pd(r[0], r[1]);
    let t1 = _mm256_unpackhi_pd(r[0], r[1]);
    let t2 = _mm256_unpacklo_pd(r[2], r[3]);
    let t3 = _mm256_unpackhi_pd(r[2], r[3]);
    [
        _mm256_permute2f128_pd::<0x20>(t0, t2),
        _mm256_permute2f128_pd::<0x20>(t1, t3),
        _mm256_permute2f128_pd::<0x31>(t0, t2),
        _mm256_permute2f128_pd::<0x31>(t1, t3),
    ]
}

/// `log1p(e)` for `e >= 0` or NaN in float64 lanes, as `avx512::log1p_pd` (< 4 ULP of float64
/// when `full`, else within 2e-12 relative): `u = 1 + e = 2^k f`, with the exponent and
/// mantissa taken from the bits (AVX2 has no `getexp` / `getmant`); `+inf` and NaN are
/// returned as they are.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn log1p_pd(e: __m256d, full: bool) -> __m256d {
    let one = _mm256_set1_pd(1.0);
    let u = _mm256_add_pd(one, e);
    let bits = _mm256_castpd_si256(u);
    // u >= 1: its biased exponent, as a float64 by the 2^52 trick, less the bias.
    let two52 = _mm256_set1_pd(4503599627370496.0);
    let biased = _mm256_or_si256(_mm256_srli_epi64::<52>(bits), _mm256_castpd_si256(two52));
    let mut k = _mm256_sub_pd(
        _mm256_castsi256_pd(biased),
        _mm256_set1_pd(4503599627370496.0 + 1023.0),
    );
    let mant = _mm256_and_si256(bits, _mm256_set1_epi64x(0x000f_ffff_ffff_ffff));
    let mut f = _mm256_castsi256_pd(_mm256_or_si256(mant, _mm256_castpd_si256(one)));
    let big = _mm256_cmp_pd::<_CMP_GT_OQ>(f, _mm256_set1_pd(std::f64::consts::SQRT_2));
    f = _mm256_blendv_pd(f, _mm256_mul_pd(f, _mm256_set1_pd(0.5)), big);
    k = _mm256_add_pd(k, _mm256_and_pd(big, one));
    let s = _mm256_div_pd(_mm256_sub_pd(f, one), _mm256_add_pd(f, one));
    let z = _mm256_mul_pd(s, s);
    let top = log1p_terms(full);
    let mut p = _mm256_set1_pd(2.0 / (2 * top + 1) as f64);
    for j in (0..top).rev() {
        p = _mm256_fmadd_pd(p, z, _mm256_set1_pd(2.0 / (2 * j + 1) as f64));
    }
    let log_f = _mm256_mul_pd(s, p);
    let log_u = _mm256_fmadd_pd(
        k,
        _mm256_set1_pd(LN2_HI),
        _mm256_fmadd_pd(k, _mm256_set1_pd(LN2_LO), log_f),
    );
    // The rounding error of 1 + e, divided exactly (it can be the whole result).
    let c = _mm256_div_pd(_mm256_sub_pd(e, _mm256_sub_pd(u, one)), u);
    let y = _mm256_add_pd(log_u, c);
    // +inf and NaN (not below +inf) pass through.
    let special = _mm256_cmp_pd::<_CMP_NLT_UQ>(e, _mm256_set1_pd(f64::INFINITY));
    _mm256_blendv_pd(y, e, special)
}

/// float32 exp in float32 arithmetic, as `avx512::exp_ps` (< 1 ULP).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_ps(x: __m256) -> __m256 {
    // As exp_pd: lanes whose exp rounds to 0 are computed at 0 and zeroed at the end.
    let dead = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(F32_EXP_ZERO_BELOW));
    let x = _mm256_andnot_ps(dead, x);
    let x = _mm256_min_ps(_mm256_set1_ps(100.0), x);
    let k = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(x, _mm256_set1_ps(F32_LOG2E)));
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(F32_LN2_HI), x);
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(F32_LN2_LO), r);
    let mut u = _mm256_set1_ps(F32_EXP_POLY[0]);
    for &c in &F32_EXP_POLY[1..] {
        u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), u, r);
    let p = _mm256_add_ps(_mm256_set1_ps(1.0), p);
    // k in [-159, 145]: 2^k as 2^k1 * 2^k2, both normal, so a subnormal result rounds once.
    let ki = _mm256_cvtps_epi32(k);
    let k1 = _mm256_srai_epi32::<1>(ki);
    let k2 = _mm256_sub_epi32(ki, k1);
    let pow = |k: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_andnot_ps(dead, _mm256_mul_ps(_mm256_mul_ps(p, pow(k1)), pow(k2)))
}

/// float32 exp of `n` elements in float32 arithmetic.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_f32(x: *const f32, out: *mut f32, n: usize) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements.
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(out.add(i), exp_ps(_mm256_loadu_ps(x.add(i))));
            i += 8;
        }
        if i < n {
            let mut buf = [0.0f32; 8];
            std::ptr::copy_nonoverlapping(x.add(i), buf.as_mut_ptr(), n - i);
            _mm256_storeu_ps(buf.as_mut_ptr(), exp_ps(_mm256_loadu_ps(buf.as_ptr())));
            std::ptr::copy_nonoverlapping(buf.as_ptr(), out.add(i), n - i);
        }
    }
}

// SAFETY: an `Avx2` exists only inside `enter`, which runs after detection.
unsafe impl Lanes for Avx2 {
    type V = __m256d;
    /// All ones on the flagged lanes.
    type M = __m256d;
    const N: usize = 4;

    // SAFETY (every primitive below): a value of `Avx2` proves the CPU has the features.
    #[inline(always)]
    fn splat(self, v: f64) -> __m256d {
        unsafe { _mm256_set1_pd(v) }
    }
    #[inline(always)]
    fn add(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_add_pd(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_sub_pd(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_mul_pd(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_div_pd(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_max_pd(a, b) }
    }
    #[inline(always)]
    fn to_lanes(self, v: __m256d) -> [f64; 8] {
        let mut a = [0.0; 8];
        unsafe { _mm256_storeu_pd(a.as_mut_ptr(), v) };
        a
    }
    #[inline(always)]
    fn of_lanes(self, a: &[f64; 8]) -> __m256d {
        unsafe { _mm256_loadu_pd(a.as_ptr()) }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m256d) -> f64 {
        let a = self.to_lanes(v);
        (a[0] + a[1]) + (a[2] + a[3])
    }
    #[inline(always)]
    fn reduce_max(self, v: __m256d) -> f64 {
        let a = self.to_lanes(v);
        a[..4].iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    #[inline(always)]
    fn eq(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_EQ_OQ>(a, b) }
    }
    #[inline(always)]
    fn gt(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_GT_OQ>(a, b) }
    }
    #[inline(always)]
    fn not(self, m: __m256d) -> __m256d {
        unsafe { _mm256_xor_pd(m, _mm256_castsi256_pd(_mm256_set1_epi64x(-1))) }
    }
    #[inline(always)]
    fn ne(self, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_cmp_pd::<_CMP_NEQ_UQ>(a, b) }
    }
    #[inline(always)]
    fn any(self, m: __m256d) -> bool {
        unsafe { _mm256_movemask_pd(m) != 0 }
    }
    #[inline(always)]
    fn bits(self, m: __m256d) -> u8 {
        unsafe { _mm256_movemask_pd(m) as u8 }
    }
    #[inline(always)]
    fn count(self, m: __m256d) -> u64 {
        unsafe { _mm256_movemask_pd(m).count_ones() as u64 }
    }
    #[inline(always)]
    fn select(self, m: __m256d, a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_blendv_pd(b, a, m) }
    }
    #[inline(always)]
    fn masked_add(self, acc: __m256d, m: __m256d, e: __m256d) -> __m256d {
        unsafe { _mm256_add_pd(acc, _mm256_and_pd(m, e)) }
    }

    #[inline(always)]
    unsafe fn kept(self, keep: *const u8) -> __m256d {
        // SAFETY: the caller guarantees 4 readable bytes.
        unsafe {
            let b = _mm_cvtsi32_si128(std::ptr::read_unaligned(keep as *const i32));
            let masked = _mm256_cmpeq_epi64(_mm256_cvtepu8_epi64(b), _mm256_setzero_si256());
            self.not(_mm256_castsi256_pd(masked))
        }
    }
    #[inline(always)]
    unsafe fn load<T: Real>(self, p: *const T) -> __m256d {
        // SAFETY: the caller guarantees 4 readable elements.
        unsafe {
            if T::FULL {
                _mm256_loadu_pd(p as *const f64)
            } else {
                _mm256_cvtps_pd(_mm_loadu_ps(p as *const f32))
            }
        }
    }
    #[inline(always)]
    unsafe fn load_tail<T: Real>(self, p: *const T, n: usize) -> __m256d {
        // A masked load rather than a copy into a buffer loaded whole: that load would wait
        // for the copy's narrower stores to reach the cache.
        // SAFETY: masked lanes are not accessed; the first n < 4 are readable.
        unsafe {
            let lanes = _mm_cmpgt_epi32(_mm_set1_epi32(n as i32), _mm_setr_epi32(0, 1, 2, 3));
            let v = if T::FULL {
                _mm256_maskload_pd(p as *const f64, _mm256_cvtepi32_epi64(lanes))
            } else {
                _mm256_cvtps_pd(_mm_maskload_ps(p as *const f32, lanes))
            };
            let ninf = _mm256_set1_pd(f64::NEG_INFINITY);
            let inside = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(lanes));
            _mm256_blendv_pd(ninf, v, inside)
        }
    }
    #[inline(always)]
    unsafe fn store<T: Real>(self, p: *mut T, v: __m256d) {
        // SAFETY: the caller guarantees 4 writable elements.
        unsafe {
            if T::FULL {
                _mm256_storeu_pd(p as *mut f64, v)
            } else {
                _mm_storeu_ps(p as *mut f32, _mm256_cvtpd_ps(v))
            }
        }
    }
    #[inline(always)]
    unsafe fn store_tail<T: Real>(self, p: *mut T, v: __m256d, n: usize) {
        let mut buf = [T::NEG_INFINITY; 4];
        // SAFETY: the caller guarantees n < 4 writable elements.
        unsafe {
            self.store(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
        }
    }

    #[inline(always)]
    fn exp(self, t: __m256d, full: bool) -> __m256d {
        unsafe { exp_pd(t, full) }
    }
    #[inline(always)]
    fn log1p(self, e: __m256d, full: bool) -> __m256d {
        unsafe { log1p_pd(e, full) }
    }
    #[inline(always)]
    fn exp_nonpos(self, t: __m256d, full: bool) -> __m256d {
        unsafe { exp_nonpos_pd(t, full) }
    }
    #[inline(always)]
    fn exp_nonpos_unclamped(self, t: __m256d, full: bool) -> __m256d {
        unsafe {
            if full {
                exp_pd(t, true)
            } else {
                exp_above_floor_pd(t)
            }
        }
    }
    #[inline(always)]
    fn summable(self, below: __m256d, t: __m256d, full: bool) -> __m256d {
        unsafe { summable_pd(below, t, full) }
    }

    /// float32: 8 lanes at a time in float32 (no widening for a max).
    #[inline(always)]
    unsafe fn max_of<T: Real>(self, p: *const T, n: usize) -> f64 {
        if T::FULL {
            // SAFETY: forwarded from the caller.
            return unsafe { super::lanes::max_of_widened(self, p, n) };
        }
        let p = p as *const f32;
        // SAFETY: every load is within the n elements (full vectors, then a scalar tail).
        unsafe {
            let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_max_ps(*acc, _mm256_loadu_ps(p.add(i + 8 * a)));
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_max_ps(acc[0], _mm256_loadu_ps(p.add(i)));
                i += 8;
            }
            let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
            let tail = (i..n).fold(f32::NEG_INFINITY, |m, k| m.max(*p.add(k)));
            f64::from(reduce_max_ps(m).max(tail))
        }
    }
    const TAKES_MIN: bool = true;
    /// float32: the max and the min in 8 float32 lanes, no widening.
    #[inline(always)]
    fn range_init(self) -> [__m256d; 2] {
        // SAFETY: AVX is enabled (this level).
        unsafe {
            [
                _mm256_castps_pd(_mm256_set1_ps(f32::NEG_INFINITY)),
                _mm256_castps_pd(_mm256_set1_ps(f32::INFINITY)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn range_step(self, acc: [__m256d; 2], p: *const f32) -> [__m256d; 2] {
        // SAFETY: the caller guarantees 8 readable elements.
        unsafe {
            let v = _mm256_loadu_ps(p);
            [
                _mm256_castps_pd(_mm256_max_ps(_mm256_castpd_ps(acc[0]), v)),
                _mm256_castps_pd(_mm256_min_ps(_mm256_castpd_ps(acc[1]), v)),
            ]
        }
    }
    #[inline(always)]
    fn range_finish(self, acc: [__m256d; 2]) -> (f32, f32) {
        // SAFETY: AVX is enabled (this level). The min is minus the max of the negations.
        unsafe {
            let least = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_castpd_ps(acc[1]));
            (
                reduce_max_ps(_mm256_castpd_ps(acc[0])),
                -reduce_max_ps(least),
            )
        }
    }
    #[inline(always)]
    fn max_init<T: Real>(self) -> [__m256d; 2] {
        // float64 -inf, or float32 -inf in both halves of each lane.
        let bits = if T::FULL {
            f64::NEG_INFINITY.to_bits()
        } else {
            u64::from(f32::NEG_INFINITY.to_bits()) * 0x1_0000_0001
        };
        [self.splat(f64::from_bits(bits)); 2]
    }
    /// float32: the 8 elements in one float32 max.
    #[inline(always)]
    unsafe fn max_step<T: Real>(self, acc: [__m256d; 2], p: *const T) -> [__m256d; 2] {
        // SAFETY: the caller guarantees 8 readable elements.
        unsafe {
            if T::FULL {
                super::lanes::max_step_widened(self, acc, p)
            } else {
                let v = _mm256_loadu_ps(p as *const f32);
                let m = _mm256_max_ps(_mm256_castpd_ps(acc[0]), v);
                [_mm256_castps_pd(m), acc[1]]
            }
        }
    }
    /// float32: 8 lanes at a time in float32, the masked lanes `-inf` by one blend.
    #[inline(always)]
    unsafe fn max_step_kept<T: Real>(
        self,
        acc: [__m256d; 2],
        p: *const T,
        keep: *const u8,
    ) -> [__m256d; 2] {
        // SAFETY: the caller guarantees 8 readable elements and mask bytes.
        unsafe {
            if T::FULL {
                super::lanes::max_step_kept_widened(self, acc, p, keep)
            } else {
                let b = _mm_loadl_epi64(keep as *const __m128i);
                let masked = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(b), _mm256_setzero_si256());
                let v = _mm256_blendv_ps(
                    _mm256_loadu_ps(p as *const f32),
                    _mm256_set1_ps(f32::NEG_INFINITY),
                    _mm256_castsi256_ps(masked),
                );
                let m = _mm256_max_ps(_mm256_castpd_ps(acc[0]), v);
                [_mm256_castps_pd(m), acc[1]]
            }
        }
    }
    #[inline(always)]
    fn max_finish<T: Real>(self, acc: [__m256d; 2]) -> f64 {
        unsafe {
            if T::FULL {
                self.reduce_max(_mm256_max_pd(acc[0], acc[1]))
            } else {
                let m = _mm256_max_ps(_mm256_castpd_ps(acc[0]), _mm256_castpd_ps(acc[1]));
                f64::from(reduce_max_ps(m))
            }
        }
    }

    /// 4x4 transposes in registers of the rows' pieces, each loaded whole (a masked load for
    /// a tail of fewer than 4 columns).
    #[inline(always)]
    unsafe fn load_columns<T: Real>(
        self,
        row: impl Fn(usize) -> *const T,
        rows: usize,
        c0: usize,
        w: usize,
        room: usize,
        out: &mut [MaybeUninit<__m256d>],
    ) {
        let rows = rows.min(4);
        // A whole vector where the room holds one.
        let lw = if room >= 4 { 4 } else { w };
        // SAFETY: only elements c0..c0 + lw of rows 0..rows are read (w, or 4 where `room`
        // holds 4; the masked load reads no lane past w); out holds c0 + w entries.
        unsafe {
            let cols = if T::FULL {
                let mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(w as i64), LANE_INDEX);
                let r: [__m256d; 4] = super::array4(|i| {
                    let p = (row(i) as *const f64).add(c0);
                    match (i < rows, lw) {
                        (false, _) => _mm256_set1_pd(f64::NEG_INFINITY),
                        (true, 4) => _mm256_loadu_pd(p),
                        (true, _) => _mm256_maskload_pd(p, mask),
                    }
                });
                transpose4_pd(r)
            } else {
                let mask = _mm_cmpgt_epi32(_mm_set1_epi32(w as i32), _mm_setr_epi32(0, 1, 2, 3));
                let r: [__m128; 4] = super::array4(|i| {
                    let p = (row(i) as *const f32).add(c0);
                    match (i < rows, lw) {
                        (false, _) => _mm_set1_ps(f32::NEG_INFINITY),
                        (true, 4) => _mm_loadu_ps(p),
                        (true, _) => _mm_maskload_ps(p, mask),
                    }
                });
                transpose4_ps(r).map(|c| _mm256_cvtps_pd(c))
            };
            for (o, c) in out[c0..c0 + w].iter_mut().zip(cols) {
                o.write(c);
            }
        }
    }

    /// The same transposes back; a tail of fewer than 4 columns by narrower stores.
    #[inline(always)]
    unsafe fn store_columns<T: Real>(
        self,
        out: *mut T,
        pitch: usize,
        rows: usize,
        skip: u8,
        c0: usize,
        w: usize,
        cols: &[__m256d],
    ) {
        let col = |k: usize| {
            if k < w {
                cols[c0 + k]
            } else {
                _mm256_setzero_pd()
            }
        };
        let rows = (0..rows.min(4)).filter(|i| skip & (1 << i) == 0);
        // SAFETY: only elements c0..c0 + w of the rows below `rows` not in `skip` are
        // written; cols holds c0 + w entries.
        unsafe {
            if T::FULL {
                let r = transpose4_pd(super::array4(col));
                for i in rows {
                    let p = out.add(i * pitch + c0) as *mut f64;
                    let lo = _mm256_castpd256_pd128(r[i]);
                    match w {
                        4 => _mm256_storeu_pd(p, r[i]),
                        3 => {
                            _mm_storeu_pd(p, lo);
                            _mm_store_sd(p.add(2), _mm256_extractf128_pd::<1>(r[i]));
                        }
                        2 => _mm_storeu_pd(p, lo),
                        _ => _mm_store_sd(p, lo),
                    }
                }
            } else {
                let r = transpose4_ps(super::array4(|k| _mm256_cvtpd_ps(col(k))));
                for i in rows {
                    let p = out.add(i * pitch + c0) as *mut f32;
                    let two = _mm_castps_pd(r[i]);
                    match w {
                        4 => _mm_storeu_ps(p, r[i]),
                        3 => {
                            _mm_store_sd(p as *mut f64, two);
                            _mm_store_ss(p.add(2), _mm_movehl_ps(r[i], r[i]));
                        }
                        2 => _mm_store_sd(p as *mut f64, two),
                        _ => _mm_store_ss(p, r[i]),
                    }
                }
            }
        }
    }
}
