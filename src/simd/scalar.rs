//! The scalar level and the reference kernels: exact semantics, `f64` arithmetic for every
//! input type, std's exp.
//!
//! Each reference function works on one strided lane of a [`Batch`](crate::Batch): `n` elements starting
//! at `start`, `stride` apart (1 for rows, `inner` for columns). Float32 inputs widen to `f64`
//! exactly and `exp`/`ln_1p` run in `f64`, so a float32 result is rounded once. SIMD paths are
//! tested against these functions.

use crate::real::Real;
use crate::state::LseState;

/// `(max, excess)` of a lane by two passes: max first, then the sum of `exp(x - max)` over the
/// elements below the max plus `ties - 1` (exact, so the excess keeps tiny terms).
///
/// # Safety
/// `x.add(start + k * stride)` must be readable for `k < n`.
pub unsafe fn lse_state_two_pass<T: Real>(
    x: *const T,
    start: usize,
    n: usize,
    stride: usize,
) -> LseState {
    // SAFETY: the caller guarantees every read index is in bounds.
    let at = |k: usize| unsafe { (*x.add(start + k * stride)).to_f64() };
    let mut max = f64::NEG_INFINITY;
    for k in 0..n {
        let v = at(k);
        if v.is_nan() {
            return LseState {
                max: f64::NAN,
                excess: f64::NAN,
            };
        }
        if v > max {
            max = v;
        }
    }
    if !max.is_finite() {
        let excess = if max == f64::NEG_INFINITY { -1.0 } else { 0.0 };
        return LseState { max, excess };
    }
    let mut ties = 0.0f64;
    let mut below = 0.0f64;
    for k in 0..n {
        let v = at(k);
        if v == max {
            ties += 1.0;
        } else {
            below += (v - max).exp();
        }
    }
    LseState {
        max,
        excess: below + (ties - 1.0),
    }
}

/// `(max, excess)` of a lane in one pass, rescaling the running sum when the max grows.
///
/// # Safety
/// As [`lse_state_two_pass`].
pub unsafe fn lse_state_online<T: Real>(
    x: *const T,
    start: usize,
    n: usize,
    stride: usize,
) -> LseState {
    let mut state = LseState::EMPTY;
    for k in 0..n {
        // SAFETY: the caller guarantees every read index is in bounds.
        state.push(unsafe { (*x.add(start + k * stride)).to_f64() });
    }
    state
}

/// [`lse_state_online`] over the elements whose mask byte (laid out as `x`, when `keep` is
/// given) is nonzero: the others are pushed as `-inf`, as a staged copy holds them.
///
/// # Safety
/// As [`lse_state_online`], and the mask bytes at the same indices readable.
pub unsafe fn lse_state_online_kept<T: Real>(
    x: *const T,
    keep: Option<*const u8>,
    start: usize,
    n: usize,
    stride: usize,
) -> LseState {
    let Some(keep) = keep else {
        // SAFETY: forwarded from the caller.
        return unsafe { lse_state_online(x, start, n, stride) };
    };
    let mut state = LseState::EMPTY;
    for k in 0..n {
        let at = start + k * stride;
        // SAFETY: the caller guarantees every read index is in bounds.
        let v = unsafe {
            if *keep.add(at) != 0 {
                (*x.add(at)).to_f64()
            } else {
                f64::NEG_INFINITY
            }
        };
        state.push(v);
    }
    state
}

/// Writes `softmax` of a lane given its finished state: `exp(x - max) / S` for a finite max;
/// all NaN otherwise (scipy: `exp(x - max)` is NaN for `max = +-inf` and NaN).
/// Reads element `k` before writing element `k`, so `out` may equal `x` (same indices).
///
/// # Safety
/// `x` readable and `out` writable at `start + k * stride` / `ostart + k * ostride`, `k < n`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn softmax_write<T: Real>(
    x: *const T,
    start: usize,
    stride: usize,
    out: *mut T,
    ostart: usize,
    ostride: usize,
    n: usize,
    state: LseState,
) {
    let finite = state.max.is_finite();
    let total = state.total();
    for k in 0..n {
        // SAFETY: the caller guarantees the indices are in bounds.
        unsafe {
            let v = (*x.add(start + k * stride)).to_f64();
            let y = if finite {
                (v - state.max).exp() / total
            } else {
                f64::NAN
            };
            *out.add(ostart + k * ostride) = T::from_f64(y);
        }
    }
}

/// Writes `log_softmax` of a lane given its finished state: `(x - max) - log1p(excess)` for a
/// finite max; otherwise scipy's unshifted form `x - log(sum exp(x))` with the log being
/// `+inf` (some `+inf`), `-inf` (all `-inf` or empty) or NaN. Same aliasing rule as
/// [`softmax_write`].
///
/// # Safety
/// As [`softmax_write`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn log_softmax_write<T: Real>(
    x: *const T,
    start: usize,
    stride: usize,
    out: *mut T,
    ostart: usize,
    ostride: usize,
    n: usize,
    state: LseState,
) {
    let (shift, log_total) = if state.max.is_finite() {
        (state.max, state.log_total())
    } else {
        (0.0, state.max)
    };
    for k in 0..n {
        // SAFETY: the caller guarantees the indices are in bounds.
        unsafe {
            let v = (*x.add(start + k * stride)).to_f64();
            *out.add(ostart + k * ostride) = T::from_f64((v - shift) - log_total);
        }
    }
}

/// scipy's weighted log-sum-exp of one lane: `log|sum b_i exp(a_i)|` and its sign.
///
/// Elements with `b == 0` are skipped whatever `a` is (scipy's decade-old feature). The terms at
/// the max are summed apart (`m`) from the rest (`s`) and the result is
/// `log1p(s/m) + log|m| + max`; where that is not finite (infinite or NaN max, weights at the
/// max cancelling) scipy falls back to the direct `log|sum b exp(a)|` in the input precision,
/// and so do we. Without `return_sign` a negative sum gives NaN. An empty lane is `-inf` with
/// sign -1, as scipy gives it.
///
/// # Safety
/// As [`lse_state_two_pass`], for `a` and for `b` (with its own start and stride).
#[allow(clippy::too_many_arguments)]
pub unsafe fn logsumexp_weighted_lane<T: Real>(
    a: *const T,
    start: usize,
    stride: usize,
    b: *const T,
    bstart: usize,
    bstride: usize,
    n: usize,
    return_sign: bool,
) -> (T, T) {
    // SAFETY: the caller guarantees every read index is in bounds.
    let at = |k: usize| unsafe {
        (
            (*a.add(start + k * stride)).to_f64(),
            (*b.add(bstart + k * bstride)).to_f64(),
        )
    };
    if n == 0 {
        return (T::from_f64(f64::NEG_INFINITY), T::from_f64(-1.0));
    }
    let mut max = f64::NEG_INFINITY;
    let mut nan = false;
    for k in 0..n {
        let (av, bv) = at(k);
        if bv == 0.0 {
            continue;
        }
        if av.is_nan() {
            nan = true;
        } else if av > max {
            max = av;
        }
    }
    if !nan && max.is_finite() {
        let (mut m, mut s) = (0.0f64, 0.0f64);
        for k in 0..n {
            let (av, bv) = at(k);
            if bv == 0.0 {
                continue;
            }
            if av == max {
                m += bv;
            } else {
                s += bv * (av - max).exp();
            }
        }
        let ratio = if s == 0.0 { s } else { s / m };
        let sign = sign_of(ratio + 1.0) * sign_of(m);
        let folded = if ratio < -1.0 { -ratio - 2.0 } else { ratio };
        let out = folded.ln_1p() + m.abs().ln() + max;
        if out.is_finite() {
            let out = if !return_sign && sign < 0.0 {
                f64::NAN
            } else {
                out
            };
            return (T::from_f64(out), T::from_f64(sign));
        }
    }
    // scipy's direct formula, rounded to the input precision term by term as NumPy would.
    let mut sum = 0.0f64;
    for k in 0..n {
        let (av, bv) = at(k);
        let term = T::from_f64(bv * T::from_f64(av.exp()).to_f64());
        sum = T::from_f64(sum + term.to_f64()).to_f64();
    }
    let sign = sign_of(sum);
    let out = if return_sign {
        sum.abs().ln()
    } else {
        sum.ln()
    };
    (T::from_f64(out), T::from_f64(sign))
}

/// NumPy's `sign`: -1, 0, +1, or NaN.
fn sign_of(v: f64) -> f64 {
    if v.is_nan() {
        f64::NAN
    } else if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// `out[k] = exp(x[k])`, float32 results of the float64 exp.
pub fn exp_f32(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64).exp() as f32;
    }
}

/// `out[k] = exp(x[k])`.
pub fn exp_f64(x: &[f64], out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.exp();
    }
}
