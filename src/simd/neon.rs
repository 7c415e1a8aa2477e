//! NEON (aarch64): the [`Lanes`] primitives on 2 float64 lanes, and the float32 exp on 4
//! float32 lanes. The 16-entry table is read lane by lane. Compiled only for aarch64 (x86
//! builds skip this module by cfg); tested on aarch64 hosts and, in CI, under qemu user-mode
//! emulation by `scripts/test-aarch64`.

#![allow(clippy::missing_safety_doc)]

use super::consts::*;
use super::lanes::{Kernel, Lanes};
use crate::real::Real;
use std::arch::aarch64::*;

/// The NEON level; a value exists only inside [`enter`].
#[derive(Clone, Copy)]
pub struct Neon(());

/// Runs `k` with every NEON primitive inlined into this function.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn enter<K: Kernel>(k: K) -> K::Out {
    k.run(Neon(()))
}

/// `2^e` for integral float64 `e` in [-1022, 1023].
#[inline]
#[target_feature(enable = "neon")]
fn pow2_pd(e: float64x2_t) -> float64x2_t {
    let b = vaddq_s64(vcvtq_s64_f64(e), vdupq_n_s64(1023));
    vreinterpretq_f64_s64(vshlq_n_s64::<52>(b))
}

/// float64 exp, as `avx512::exp_pd`. `fmax`/`fmin` propagate NaN, so the clamps keep it.
#[inline]
#[target_feature(enable = "neon")]
pub fn exp_pd(t: float64x2_t, full: bool) -> float64x2_t {
    let t = vmaxq_f64(vdupq_n_f64(-746.0), t);
    let t = vminq_f64(vdupq_n_f64(710.0), t);
    let kf = vrndnq_f64(vmulq_f64(t, vdupq_n_f64(SIXTEEN_OVER_LN2)));
    let mut r = vfmsq_f64(t, kf, vdupq_n_f64(LN2_OVER_16_HI));
    if full {
        r = vfmsq_f64(r, kf, vdupq_n_f64(LN2_OVER_16_LO));
    }
    // NaN converts to 0, so the index is always in range.
    let j = vandq_s64(vcvtq_s64_f64(kf), vdupq_n_s64(15));
    let tab = [
        EXP2_J16[vgetq_lane_s64::<0>(j) as usize],
        EXP2_J16[vgetq_lane_s64::<1>(j) as usize],
    ];
    // SAFETY: tab holds 2 f64.
    let tab = unsafe { vld1q_f64(tab.as_ptr()) };
    let coeffs: &[f64] = if full { &TAYLOR7 } else { &TAYLOR4 };
    let mut a = vdupq_n_f64(coeffs[0]);
    for &c in &coeffs[1..] {
        a = vfmaq_f64(vdupq_n_f64(c), a, r);
    }
    let y = vfmaq_f64(tab, tab, vmulq_f64(a, r));
    let e = vrndmq_f64(vmulq_f64(kf, vdupq_n_f64(1.0 / 16.0)));
    let e1 = vrndmq_f64(vmulq_f64(e, vdupq_n_f64(0.5)));
    let e2 = vsubq_f64(e, e1);
    vmulq_f64(vmulq_f64(y, pow2_pd(e1)), pow2_pd(e2))
}

/// float32 exp in float32 arithmetic, as `avx2::exp_ps`.
#[inline]
#[target_feature(enable = "neon")]
pub fn exp_ps(x: float32x4_t) -> float32x4_t {
    let x = vminq_f32(vdupq_n_f32(100.0), x);
    let x = vmaxq_f32(vdupq_n_f32(-110.0), x);
    let k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(F32_LOG2E)));
    let r = vfmsq_f32(x, k, vdupq_n_f32(F32_LN2_HI));
    let r = vfmsq_f32(r, k, vdupq_n_f32(F32_LN2_LO));
    let mut u = vdupq_n_f32(F32_EXP_POLY[0]);
    for &c in &F32_EXP_POLY[1..] {
        u = vfmaq_f32(vdupq_n_f32(c), u, r);
    }
    let p = vfmaq_f32(r, vmulq_f32(r, r), u);
    let p = vaddq_f32(vdupq_n_f32(1.0), p);
    let ki = vcvtq_s32_f32(k);
    let k1 = vshrq_n_s32::<1>(ki);
    let k2 = vsubq_s32(ki, k1);
    let pow =
        |k: int32x4_t| vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(k, vdupq_n_s32(127))));
    vmulq_f32(vmulq_f32(p, pow(k1)), pow(k2))
}

/// float32 exp of `n` elements in float32 arithmetic.
#[target_feature(enable = "neon")]
pub unsafe fn exp_f32(x: *const f32, out: *mut f32, n: usize) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements.
    unsafe {
        while i + 4 <= n {
            vst1q_f32(out.add(i), exp_ps(vld1q_f32(x.add(i))));
            i += 4;
        }
        if i < n {
            let mut buf = [0.0f32; 4];
            std::ptr::copy_nonoverlapping(x.add(i), buf.as_mut_ptr(), n - i);
            vst1q_f32(buf.as_mut_ptr(), exp_ps(vld1q_f32(buf.as_ptr())));
            std::ptr::copy_nonoverlapping(buf.as_ptr(), out.add(i), n - i);
        }
    }
}

// SAFETY: a `Neon` exists only inside `enter`, which runs after detection.
unsafe impl Lanes for Neon {
    type V = float64x2_t;
    /// All ones on the flagged lanes.
    type M = uint64x2_t;
    const N: usize = 2;

    // SAFETY (every primitive below): a value of `Neon` proves the CPU has the features.
    #[inline(always)]
    fn splat(self, v: f64) -> float64x2_t {
        unsafe { vdupq_n_f64(v) }
    }
    #[inline(always)]
    fn add(self, a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vaddq_f64(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vsubq_f64(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vmulq_f64(a, b) }
    }
    #[inline(always)]
    fn div(self, a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vdivq_f64(a, b) }
    }
    #[inline(always)]
    fn max(self, a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vmaxq_f64(a, b) }
    }
    #[inline(always)]
    fn to_lanes(self, v: float64x2_t) -> [f64; 8] {
        let mut a = [0.0; 8];
        unsafe { vst1q_f64(a.as_mut_ptr(), v) };
        a
    }
    #[inline(always)]
    fn of_lanes(self, a: &[f64; 8]) -> float64x2_t {
        unsafe { vld1q_f64(a.as_ptr()) }
    }
    #[inline(always)]
    fn reduce_add(self, v: float64x2_t) -> f64 {
        unsafe { vaddvq_f64(v) }
    }
    #[inline(always)]
    fn reduce_max(self, v: float64x2_t) -> f64 {
        unsafe { vmaxvq_f64(v) }
    }
    #[inline(always)]
    fn eq(self, a: float64x2_t, b: float64x2_t) -> uint64x2_t {
        unsafe { vceqq_f64(a, b) }
    }
    #[inline(always)]
    fn gt(self, a: float64x2_t, b: float64x2_t) -> uint64x2_t {
        unsafe { vcgtq_f64(a, b) }
    }
    #[inline(always)]
    fn not(self, m: uint64x2_t) -> uint64x2_t {
        unsafe { vreinterpretq_u64_u32(vmvnq_u32(vreinterpretq_u32_u64(m))) }
    }
    #[inline(always)]
    fn any(self, m: uint64x2_t) -> bool {
        unsafe { vmaxvq_u32(vreinterpretq_u32_u64(m)) != 0 }
    }
    #[inline(always)]
    fn count(self, m: uint64x2_t) -> u64 {
        unsafe { vaddvq_u64(vshrq_n_u64::<63>(m)) }
    }
    #[inline(always)]
    fn select(self, m: uint64x2_t, a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vbslq_f64(m, a, b) }
    }
    #[inline(always)]
    fn masked_add(self, acc: float64x2_t, m: uint64x2_t, e: float64x2_t) -> float64x2_t {
        unsafe {
            vaddq_f64(
                acc,
                vreinterpretq_f64_u64(vandq_u64(vreinterpretq_u64_f64(e), m)),
            )
        }
    }

    #[inline(always)]
    unsafe fn load<T: Real>(self, p: *const T) -> float64x2_t {
        // SAFETY: the caller guarantees 2 readable elements.
        unsafe {
            if T::FULL {
                vld1q_f64(p as *const f64)
            } else {
                vcvt_f64_f32(vld1_f32(p as *const f32))
            }
        }
    }
    #[inline(always)]
    unsafe fn load_tail<T: Real>(self, p: *const T, n: usize) -> float64x2_t {
        let mut buf = [T::NEG_INFINITY; 2];
        // SAFETY: the caller guarantees n < 2 readable elements.
        unsafe {
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
            self.load(buf.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn store<T: Real>(self, p: *mut T, v: float64x2_t) {
        // SAFETY: the caller guarantees 2 writable elements.
        unsafe {
            if T::FULL {
                vst1q_f64(p as *mut f64, v)
            } else {
                vst1_f32(p as *mut f32, vcvt_f32_f64(v))
            }
        }
    }
    #[inline(always)]
    unsafe fn store_tail<T: Real>(self, p: *mut T, v: float64x2_t, n: usize) {
        let mut buf = [T::NEG_INFINITY; 2];
        // SAFETY: the caller guarantees n < 2 writable elements.
        unsafe {
            self.store(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
        }
    }

    #[inline(always)]
    fn exp(self, t: float64x2_t, full: bool) -> float64x2_t {
        unsafe { exp_pd(t, full) }
    }
}
