//! The scalar level: the reference kernels of [`crate::kernels::scalar`] behind the same
//! interface as the SIMD levels. float64 arithmetic throughout, std's exp.

use crate::kernels::{scalar as reference, Algorithm};
use crate::real::Real;
use crate::state::LseState;

/// # Safety
/// `x` readable for `n` elements.
pub unsafe fn row_state<T: Real>(x: *const T, n: usize, alg: Algorithm) -> LseState {
    // SAFETY: forwarded from the caller.
    unsafe {
        match alg {
            Algorithm::Online => reference::lse_state_online(x, 0, n, 1),
            Algorithm::Auto | Algorithm::TwoPass => reference::lse_state_two_pass(x, 0, n, 1),
        }
    }
}

/// # Safety
/// `x` readable and `out` writable for `n` elements, disjoint or equal.
pub unsafe fn exp_scaled<T: Real>(x: *const T, out: *mut T, n: usize, shift: f64, scale: f64) {
    for k in 0..n {
        // SAFETY: k < n; element k is read before it is written.
        unsafe { *out.add(k) = T::from_f64(scale * ((*x.add(k)).to_f64() - shift).exp()) };
    }
}

/// # Safety
/// As [`exp_scaled`].
pub unsafe fn shift_sub<T: Real>(x: *const T, out: *mut T, n: usize, shift: f64, log_total: f64) {
    for k in 0..n {
        // SAFETY: k < n; element k is read before it is written.
        unsafe { *out.add(k) = T::from_f64(((*x.add(k)).to_f64() - shift) - log_total) };
    }
}

/// # Safety
/// `x.add(k * inner + j)` readable for `k < n`, `j < w`.
pub unsafe fn column_states<T: Real>(
    x: *const T,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    for (j, o) in out.iter_mut().enumerate().take(w) {
        // SAFETY: forwarded from the caller.
        *o = unsafe { reference::lse_state_online(x, j, n, inner) };
    }
}

/// `out[j] = a[j] * exp(x[j] - b[j])` (`exp`) or `(x[j] - b[j]) - a[j]`.
///
/// # Safety
/// `x`, `b`, `a` readable and `out` writable for `n` elements; `out` disjoint from or equal
/// to `x`.
pub unsafe fn lanes_write<T: Real>(
    x: *const T,
    out: *mut T,
    n: usize,
    b: *const f64,
    a: *const f64,
    exp: bool,
) {
    for j in 0..n {
        // SAFETY: j < n; element j is read before it is written.
        unsafe {
            let d = (*x.add(j)).to_f64() - *b.add(j);
            *out.add(j) = T::from_f64(if exp {
                *a.add(j) * d.exp()
            } else {
                d - *a.add(j)
            });
        }
    }
}

pub fn exp_f32(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64).exp() as f32;
    }
}

pub fn exp_f64(x: &[f64], out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v.exp();
    }
}
