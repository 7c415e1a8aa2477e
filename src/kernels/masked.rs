//! Masked rows: log-sum-exp, softmax and log_softmax over the elements a boolean mask keeps,
//! the mask read beside the data (no masked copy of the input).
//!
//! Semantics are JAX's `where=` (`jax.nn.logsumexp` / `softmax` / `log_softmax`): masked
//! elements take no part; a fully masked row gives log-sum-exp `-inf`, softmax 0 at every
//! position and log_softmax `-inf`; masked positions get softmax 0 and log_softmax `-inf`.
//! The kept elements of a row go through the one online update of [`LseState`], and are written
//! with the same parameters as the unmasked kernels (`write_params` in `kernels`), so a row with
//! every element kept gives the unmasked reference's values.
//!
//! This is the scalar kernel: one pass per row for the state, one for the write; rows are split
//! over threads in fixed pieces, so results are bit-identical for any thread count.

use super::Reduction;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::state::LseState;

/// The state of the kept elements of one row.
fn masked_state<T: Real>(x: &[T], keep: &[bool]) -> LseState {
    let mut s = LseState::EMPTY;
    for (&v, &k) in x.iter().zip(keep) {
        if k {
            s.push(v.to_f64());
        }
    }
    s
}

fn check(len: usize, mask: usize, n: usize, out: usize, out_need: usize) -> Result<(), String> {
    if mask != len {
        return Err(format!(
            "mask holds {mask} elements, x holds {len}; they must match"
        ));
    }
    if n == 0 && len != 0 || n != 0 && !len.is_multiple_of(n) {
        return Err(format!("x holds {len} elements, not whole rows of {n}"));
    }
    if out != out_need {
        return Err(format!("output holds {out} elements, expected {out_need}"));
    }
    Ok(())
}

/// Log-sum-exp of the kept elements of each contiguous row of `n` into `out` (one per row).
pub fn logsumexp_rows_masked<T: Real>(
    x: &[T],
    mask: &[bool],
    n: usize,
    out: &mut [T],
) -> Result<(), String> {
    let rows = x.len().checked_div(n).unwrap_or(0);
    check(x.len(), mask.len(), n, out.len(), rows)?;
    let op = SendPtr(out.as_mut_ptr());
    parallel::for_each_piece(rows, n.max(1), |range| {
        for r in range {
            let s = masked_state(&x[r * n..(r + 1) * n], &mask[r * n..(r + 1) * n]);
            // SAFETY: row r owns out[r]; r < rows == out.len().
            unsafe { *op.ptr().add(r) = T::from_f64(s.logsumexp()) };
        }
    });
    Ok(())
}

/// Softmax or log_softmax of the kept elements of each contiguous row of `n` into `out`
/// (x's size): masked positions get 0 (softmax) or `-inf` (log_softmax).
pub fn softmax_rows_masked<T: Real>(
    x: &[T],
    mask: &[bool],
    n: usize,
    what: Reduction,
    out: &mut [T],
) -> Result<(), String> {
    check(x.len(), mask.len(), n, out.len(), x.len())?;
    let rows = x.len().checked_div(n).unwrap_or(0);
    let exp = what == Reduction::Softmax;
    let op = SendPtr(out.as_mut_ptr());
    parallel::for_each_piece(rows, 2 * n.max(1), |range| {
        for r in range {
            let (xr, kr) = (&x[r * n..(r + 1) * n], &mask[r * n..(r + 1) * n]);
            let (b, a) = super::write_params(masked_state(xr, kr), exp);
            for (k, (&v, &keep)) in xr.iter().zip(kr).enumerate() {
                let y = match (keep, exp) {
                    (true, true) => a * (v.to_f64() - b).exp(),
                    (true, false) => (v.to_f64() - b) - a,
                    (false, true) => 0.0,
                    (false, false) => f64::NEG_INFINITY,
                };
                // SAFETY: row r owns out[r * n..(r + 1) * n].
                unsafe { *op.ptr().add(r * n + k) = T::from_f64(y) };
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_masked_rows_and_masked_positions() {
        let x = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mask = [true, false, true, false, false, false];
        let mut lse = [0.0; 2];
        logsumexp_rows_masked(&x, &mask, 3, &mut lse).unwrap();
        let want = 3.0 + (-2.0f64).exp().ln_1p();
        assert!((lse[0] - want).abs() < 1e-15 && lse[1] == f64::NEG_INFINITY);
        let mut sm = [9.0; 6];
        softmax_rows_masked(&x, &mask, 3, Reduction::Softmax, &mut sm).unwrap();
        assert_eq!(sm[1], 0.0);
        assert_eq!(sm[3..], [0.0; 3]);
        assert!((sm[0] + sm[2] - 1.0).abs() < 1e-15);
        let mut ls = [9.0; 6];
        softmax_rows_masked(&x, &mask, 3, Reduction::LogSoftmax, &mut ls).unwrap();
        assert_eq!(ls[1], f64::NEG_INFINITY);
        assert_eq!(ls[3..], [f64::NEG_INFINITY; 3]);
        assert!((ls[2] - (3.0 - want)).abs() < 1e-15);
    }

    #[test]
    fn all_kept_matches_the_unmasked_reference() {
        let x = [0.5f32, -40.0, 3.25, 1e30, -1e30, 7.0, 7.0, 0.0];
        let mask = [true; 8];
        let mut a = [0.0f32; 2];
        let mut b = [0.0f32; 2];
        logsumexp_rows_masked(&x, &mask, 4, &mut a).unwrap();
        crate::kernels::logsumexp(&x, crate::Batch::rows(2, 4), crate::Algorithm::Auto, &mut b)
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let mut out = [0.0f64; 1];
        assert!(logsumexp_rows_masked(&[1.0, 2.0], &[true], 2, &mut out).is_err());
        assert!(logsumexp_rows_masked(&[1.0, 2.0, 3.0], &[true; 3], 2, &mut out).is_err());
    }
}
