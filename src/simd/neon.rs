//! NEON (aarch64) kernels: the same algorithms as [`super::avx2`] on 2 float64 lanes (4
//! float32 lanes for the float32 exp). The 16-entry table is read lane by lane. Compiled and
//! tested only on aarch64 hosts (the CI's ARM runner); x86 builds skip this module by cfg.

#![allow(clippy::missing_safety_doc)]

use super::consts::*;
use crate::state::LseState;
use std::arch::aarch64::*;

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

/// An input element type seen as 2 float64 lanes.
pub trait Lanes: Copy + 'static + crate::Real {
    const FULL: bool;
    const BLOCK: usize;
    unsafe fn load2(p: *const Self) -> float64x2_t;
    unsafe fn store2(p: *mut Self, v: float64x2_t);
}

impl Lanes for f32 {
    const FULL: bool = false;
    const BLOCK: usize = 2048;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load2(p: *const f32) -> float64x2_t {
        // SAFETY: the caller guarantees 2 readable elements.
        vcvt_f64_f32(unsafe { vld1_f32(p) })
    }
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn store2(p: *mut f32, v: float64x2_t) {
        // SAFETY: the caller guarantees 2 writable elements.
        unsafe { vst1_f32(p, vcvt_f32_f64(v)) }
    }
}

impl Lanes for f64 {
    const FULL: bool = true;
    const BLOCK: usize = 1024;
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load2(p: *const f64) -> float64x2_t {
        // SAFETY: the caller guarantees 2 readable elements.
        unsafe { vld1q_f64(p) }
    }
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn store2(p: *mut f64, v: float64x2_t) {
        // SAFETY: the caller guarantees 2 writable elements.
        unsafe { vst1q_f64(p, v) }
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_tail<T: Lanes>(p: *const T) -> float64x2_t {
    let buf = [
        // SAFETY: the caller guarantees one readable element.
        unsafe { *p },
        T::NEG_INFINITY,
    ];
    // SAFETY: buf holds 2 elements.
    unsafe { T::load2(buf.as_ptr()) }
}

/// The max of `n` elements; NaN anywhere gives NaN (`fmax` propagates it).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn block_max<T: Lanes>(p: *const T, n: usize) -> f64 {
    let mut acc = [vdupq_n_f64(f64::NEG_INFINITY); 4];
    let mut i = 0;
    // SAFETY: every load is within the n elements.
    unsafe {
        while i + 8 <= n {
            for (a, acc) in acc.iter_mut().enumerate() {
                *acc = vmaxq_f64(*acc, T::load2(p.add(i + 2 * a)));
            }
            i += 8;
        }
        while i < n {
            let v = if i + 2 <= n {
                T::load2(p.add(i))
            } else {
                load_tail(p.add(i))
            };
            acc[0] = vmaxq_f64(acc[0], v);
            i += 2;
        }
    }
    let m = vmaxq_f64(vmaxq_f64(acc[0], acc[1]), vmaxq_f64(acc[2], acc[3]));
    vmaxvq_f64(m)
}

/// Sum of `exp(x - m)` over the elements `!= m` (NaN included) and the count of ties.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn sum_below<T: Lanes>(p: *const T, n: usize, m: f64) -> (float64x2_t, u64) {
    let mv = vdupq_n_f64(m);
    let mut acc = [vdupq_n_f64(0.0); 2];
    let mut ties = vdupq_n_u64(0);
    let mut i = 0;
    let mut step = |x: float64x2_t, acc: &mut float64x2_t| {
        let e = exp_pd(vsubq_f64(x, mv), T::FULL);
        let tie = vceqq_f64(x, mv);
        ties = vsubq_u64(ties, tie); // a tie lane is all ones, i.e. -1
        let kept = vbicq_u64(vreinterpretq_u64_f64(e), tie);
        *acc = vaddq_f64(*acc, vreinterpretq_f64_u64(kept));
    };
    // SAFETY: loads stay within the n elements; the tail lane is -inf (exp = 0).
    unsafe {
        while i + 4 <= n {
            step(T::load2(p.add(i)), &mut acc[0]);
            step(T::load2(p.add(i + 2)), &mut acc[1]);
            i += 4;
        }
        while i < n {
            let v = if i + 2 <= n {
                T::load2(p.add(i))
            } else {
                load_tail(p.add(i))
            };
            step(v, &mut acc[0]);
            i += 2;
        }
    }
    (vaddq_f64(acc[0], acc[1]), vaddvq_u64(ties))
}

/// Two-pass `(max, excess)` of a contiguous row in L1 blocks (see `avx512::state_two_pass`).
#[target_feature(enable = "neon")]
pub unsafe fn state_two_pass<T: Lanes>(x: *const T, n: usize) -> LseState {
    let mut m = f64::NEG_INFINITY;
    let mut below = vdupq_n_f64(0.0);
    let mut ties = 0u64;
    let mut start = 0;
    while start < n {
        let len = T::BLOCK.min(n - start);
        // SAFETY: the block lies inside the row.
        let p = unsafe { x.add(start) };
        // SAFETY: as above.
        let bm = unsafe { block_max(p, len) };
        if !bm.is_finite() {
            if bm == f64::NEG_INFINITY && !super::has_nan(p, len) {
                start += len;
                continue;
            }
            // SAFETY: the whole row is readable.
            return unsafe { crate::kernels::scalar::lse_state_two_pass(x, 0, n, 1) };
        }
        if bm > m {
            let scale = (m - bm).exp();
            below = vmulq_f64(below, vdupq_n_f64(scale));
            below = vsetq_lane_f64::<0>(vgetq_lane_f64::<0>(below) + ties as f64 * scale, below);
            ties = 0;
            m = bm;
        }
        // SAFETY: as above.
        let (b, t) = unsafe { sum_below(p, len, m) };
        below = vaddq_f64(below, b);
        ties += t;
        start += len;
    }
    super::finish_state(m, vaddvq_f64(below), ties)
}

/// Per-lane online `(max, below, ties)`, as `avx512::OnlineLanes`.
#[derive(Clone, Copy)]
struct OnlineLanes {
    m: float64x2_t,
    below: float64x2_t,
    ties: float64x2_t,
}

impl OnlineLanes {
    #[inline]
    #[target_feature(enable = "neon")]
    fn new() -> OnlineLanes {
        OnlineLanes {
            m: vdupq_n_f64(f64::NEG_INFINITY),
            below: vdupq_n_f64(0.0),
            ties: vdupq_n_f64(0.0),
        }
    }

    #[inline]
    #[target_feature(enable = "neon")]
    fn push(&mut self, x: float64x2_t, full: bool) {
        let gt = vcgtq_f64(x, self.m);
        if vmaxvq_u32(vreinterpretq_u32_u64(gt)) != 0 {
            let m_new = vbslq_f64(gt, x, self.m);
            let scale = exp_pd(vsubq_f64(self.m, m_new), full);
            let total = vmulq_f64(vaddq_f64(self.below, self.ties), scale);
            self.below = vbslq_f64(gt, total, self.below);
            self.ties = vbslq_f64(gt, vdupq_n_f64(0.0), self.ties);
            self.m = m_new;
        }
        let tie = vceqq_f64(x, self.m);
        let e = exp_pd(vsubq_f64(x, self.m), full);
        let kept = vbicq_u64(vreinterpretq_u64_f64(e), tie);
        self.below = vaddq_f64(self.below, vreinterpretq_f64_u64(kept));
        self.ties = vaddq_f64(
            self.ties,
            vbslq_f64(tie, vdupq_n_f64(1.0), vdupq_n_f64(0.0)),
        );
    }

    #[target_feature(enable = "neon")]
    fn states(&self) -> [LseState; 2] {
        std::array::from_fn(|l| {
            let (m, b, t) = if l == 0 {
                (
                    vgetq_lane_f64::<0>(self.m),
                    vgetq_lane_f64::<0>(self.below),
                    vgetq_lane_f64::<0>(self.ties),
                )
            } else {
                (
                    vgetq_lane_f64::<1>(self.m),
                    vgetq_lane_f64::<1>(self.below),
                    vgetq_lane_f64::<1>(self.ties),
                )
            };
            super::lane_state(m, b, t)
        })
    }
}

/// One-pass `(max, excess)` of a contiguous row: 4 online lanes merged in lane order.
#[target_feature(enable = "neon")]
pub unsafe fn state_online<T: Lanes>(x: *const T, n: usize) -> LseState {
    let mut lanes = [OnlineLanes::new(), OnlineLanes::new()];
    let mut i = 0;
    // SAFETY: loads stay within the n elements; the tail lane is -inf.
    unsafe {
        while i + 4 <= n {
            lanes[0].push(T::load2(x.add(i)), T::FULL);
            lanes[1].push(T::load2(x.add(i + 2)), T::FULL);
            i += 4;
        }
        while i < n {
            let v = if i + 2 <= n {
                T::load2(x.add(i))
            } else {
                load_tail(x.add(i))
            };
            lanes[0].push(v, T::FULL);
            i += 2;
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

#[inline]
#[target_feature(enable = "neon")]
unsafe fn map<T: Lanes>(
    x: *const T,
    out: *mut T,
    n: usize,
    f: impl Fn(float64x2_t) -> float64x2_t,
) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements; each vector is read first.
    unsafe {
        while i + 2 <= n {
            T::store2(out.add(i), f(T::load2(x.add(i))));
            i += 2;
        }
        if i < n {
            let mut buf = [T::NEG_INFINITY; 2];
            T::store2(buf.as_mut_ptr(), f(load_tail(x.add(i))));
            *out.add(i) = buf[0];
        }
    }
}

/// `out[k] = scale * exp(x[k] - shift)`; `out` may equal `x`.
#[target_feature(enable = "neon")]
pub unsafe fn exp_scaled<T: Lanes>(x: *const T, out: *mut T, n: usize, shift: f64, scale: f64) {
    let (sh, sc) = (vdupq_n_f64(shift), vdupq_n_f64(scale));
    // SAFETY: forwarded from the caller.
    unsafe {
        map(x, out, n, |v| {
            vmulq_f64(exp_pd(vsubq_f64(v, sh), T::FULL), sc)
        })
    }
}

/// `out[k] = (x[k] - shift) - log_total`; `out` may equal `x`.
#[target_feature(enable = "neon")]
pub unsafe fn shift_sub<T: Lanes>(x: *const T, out: *mut T, n: usize, shift: f64, log_total: f64) {
    let (sh, lt) = (vdupq_n_f64(shift), vdupq_n_f64(log_total));
    // SAFETY: forwarded from the caller.
    unsafe { map(x, out, n, |v| vsubq_f64(vsubq_f64(v, sh), lt)) }
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

/// float64 exp of `n` elements.
#[target_feature(enable = "neon")]
pub unsafe fn exp_f64(x: *const f64, out: *mut f64, n: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { map(x, out, n, |v| exp_pd(v, true)) }
}

/// Online states of `w <= COL_TILE` adjacent columns of an `(n, inner)` slab.
#[target_feature(enable = "neon")]
pub unsafe fn column_states<T: Lanes>(
    x: *const T,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    const V: usize = super::COL_TILE / 2;
    let mut lanes = [OnlineLanes::new(); V];
    let vecs = w.div_ceil(2);
    for k in 0..n {
        // SAFETY: row k of the tile holds w readable elements.
        let row = unsafe { x.add(k * inner) };
        for (v, lane) in lanes.iter_mut().enumerate().take(vecs) {
            // SAFETY: as above; an odd last column is padded with -inf.
            let xv = unsafe {
                if w - 2 * v >= 2 {
                    T::load2(row.add(2 * v))
                } else {
                    load_tail(row.add(2 * v))
                }
            };
            lane.push(xv, T::FULL);
        }
    }
    for (v, lane) in lanes.iter().enumerate().take(vecs) {
        for (l, s) in lane.states().into_iter().enumerate() {
            if 2 * v + l < w {
                out[2 * v + l] = s;
            }
        }
    }
}
