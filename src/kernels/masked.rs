//! Lanes under a boolean mask (JAX's `where=`): log-sum-exp, states, softmax and log_softmax
//! over the elements the mask keeps, run by the unmasked kernels on a dense scratch block.
//!
//! Semantics are JAX's (`jax.nn.logsumexp` / `softmax` / `log_softmax` with `where=`): masked
//! elements take no part, whatever they hold (a NaN or `+inf` there has no effect); a fully
//! masked lane gives log-sum-exp `-inf` (the empty state), softmax 0 and log_softmax `-inf` at
//! every position; masked positions always get softmax 0 and log_softmax `-inf`. Lanes whose
//! kept elements are all `-inf` behave as the unmasked kernels on those elements (scipy:
//! softmax NaN at the kept positions).
//!
//! How: the caller copies a block of lanes into a dense buffer (it needs one anyway for
//! layouts the kernels cannot read in place) and the mask block beside it. A masked element
//! becomes `-inf`, which is exactly "not there" for a log-sum-exp: `exp(-inf - m) = 0` adds
//! nothing to a state, and a lane of only `-inf` has the empty state. The unmasked SIMD kernels
//! then run on the block as they are, and softmax / log_softmax write 0 / `-inf` at the masked
//! positions afterwards (which also fixes fully masked lanes, whose every position is masked).
//! So a lane with every element kept gives the unmasked kernels' values bit for bit, and the
//! blocking (and so every result) is the same for any thread count.
//!
//! The mask is bytes, nonzero = kept (NumPy's bool is one byte; any byte value is read safely).

use super::{Algorithm, Reduction};
use crate::layout::Batch;
use crate::real::Real;
use crate::state::LseState;

/// `x[k] = -inf` wherever `keep[k] == 0`: the masked elements leave the reduction.
pub fn hide_masked<T: Real>(x: &mut [T], keep: &[u8]) {
    let hidden = T::from_f64(f64::NEG_INFINITY);
    for (v, &k) in x.iter_mut().zip(keep) {
        // A select, not a branch: the loop vectorises.
        *v = if k != 0 { *v } else { hidden };
    }
}

/// `out[k] = fill` wherever `keep[k] == 0`.
fn fill_masked<T: Real>(out: &mut [T], keep: &[u8], fill: T) {
    for (v, &k) in out.iter_mut().zip(keep) {
        *v = if k != 0 { *v } else { fill };
    }
}

/// The value softmax (0) or log_softmax (`-inf`) takes at a masked position.
pub fn masked_value<T: Real>(what: Reduction) -> T {
    T::from_f64(match what {
        Reduction::Softmax => 0.0,
        Reduction::LogSoftmax => f64::NEG_INFINITY,
    })
}

fn check(buf: usize, keep: usize, batch: &Batch) -> Result<(), String> {
    if keep != buf {
        return Err(format!(
            "mask holds {keep} elements, the block {buf}; they must match"
        ));
    }
    if !batch.is_contiguous() {
        return Err("a masked block must be a contiguous batch".into());
    }
    batch.check(buf)
}

/// Log-sum-exp of the kept elements of every lane of the dense block `buf` into `out`.
/// `buf` is scratch: its masked elements are overwritten with `-inf`.
pub fn logsumexp_masked<T: Real>(
    buf: &mut [T],
    keep: &[u8],
    batch: Batch,
    alg: Algorithm,
    out: &mut [T],
) -> Result<(), String> {
    check(buf.len(), keep.len(), &batch)?;
    hide_masked(buf, keep);
    super::logsumexp(buf, batch, alg, out)
}

/// The `(max, excess)` states of the kept elements of every lane of the dense block `buf`
/// (a fully masked lane has the empty state). `buf` is scratch, as in [`logsumexp_masked`].
pub fn lse_states_masked<T: Real>(
    buf: &mut [T],
    keep: &[u8],
    batch: Batch,
    alg: Algorithm,
    out: &mut [LseState],
) -> Result<(), String> {
    check(buf.len(), keep.len(), &batch)?;
    hide_masked(buf, keep);
    super::lse_states(buf, batch, alg, out)
}

/// Softmax or log_softmax of the kept elements of every lane of the dense block `buf`, in
/// place; masked positions get 0 (softmax) or `-inf` (log_softmax).
pub fn softmax_like_masked<T: Real>(
    buf: &mut [T],
    keep: &[u8],
    batch: Batch,
    alg: Algorithm,
    what: Reduction,
) -> Result<(), String> {
    check(buf.len(), keep.len(), &batch)?;
    hide_masked(buf, keep);
    super::softmax_like_inplace(buf, batch, alg, what)?;
    fill_masked(buf, keep, masked_value(what));
    Ok(())
}

/// Writes the masked positions of a chunk of a softmax-like output whose kept positions are
/// written already (the chunks of lanes too long for one block).
pub fn finish_masked_chunk<T: Real>(out: &mut [T], keep: &[u8], what: Reduction) {
    fill_masked(out, keep, masked_value(what));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_masked_lanes_and_masked_positions() {
        let x = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let keep = [1u8, 0, 1, 0, 0, 0];
        let b = Batch::rows(2, 3);
        let mut lse = [0.0; 2];
        logsumexp_masked(&mut x.clone(), &keep, b, Algorithm::Auto, &mut lse).unwrap();
        let want = 3.0 + (-2.0f64).exp().ln_1p();
        assert!((lse[0] - want).abs() < 1e-15 && lse[1] == f64::NEG_INFINITY);
        let mut sm = x;
        softmax_like_masked(&mut sm, &keep, b, Algorithm::Auto, Reduction::Softmax).unwrap();
        assert_eq!(sm[1], 0.0);
        assert_eq!(sm[3..], [0.0; 3]);
        assert!((sm[0] + sm[2] - 1.0).abs() < 1e-15);
        let mut ls = x;
        softmax_like_masked(&mut ls, &keep, b, Algorithm::Auto, Reduction::LogSoftmax).unwrap();
        assert_eq!(ls[1], f64::NEG_INFINITY);
        assert_eq!(ls[3..], [f64::NEG_INFINITY; 3]);
        assert!((ls[2] - (3.0 - want)).abs() < 1e-15);
        let mut st = [LseState::EMPTY; 2];
        lse_states_masked(&mut x.clone(), &keep, b, Algorithm::Auto, &mut st).unwrap();
        assert_eq!(st[1].max, f64::NEG_INFINITY);
    }

    #[test]
    fn masked_nan_and_inf_have_no_effect_kept_specials_do() {
        let x = [f64::NAN, 1.0, f64::INFINITY, 2.0];
        let keep = [0u8, 1, 0, 1];
        let mut sm = x;
        softmax_like_masked(
            &mut sm,
            &keep,
            Batch::rows(1, 4),
            Algorithm::Auto,
            Reduction::Softmax,
        )
        .unwrap();
        assert_eq!((sm[0], sm[2]), (0.0, 0.0));
        assert!((sm[3] - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 1e-15);
        // Kept elements all -inf: the unmasked op on them (NaN), masked positions still 0.
        let mut sm = [f64::NEG_INFINITY, f64::NEG_INFINITY, 3.0];
        let keep = [1u8, 1, 0];
        softmax_like_masked(
            &mut sm,
            &keep,
            Batch::rows(1, 3),
            Algorithm::Auto,
            Reduction::Softmax,
        )
        .unwrap();
        assert!(sm[0].is_nan() && sm[1].is_nan() && sm[2] == 0.0);
    }

    #[test]
    fn all_kept_matches_the_unmasked_kernels_bitwise() {
        let x = [0.5f32, -40.0, 3.25, 1e30, -1e30, 7.0, 7.0, 0.0];
        let keep = [1u8; 8];
        let (mut a, mut b) = ([0.0f32; 2], [0.0f32; 2]);
        let batch = Batch::rows(2, 4);
        logsumexp_masked(&mut x.clone(), &keep, batch, Algorithm::Auto, &mut a).unwrap();
        super::super::logsumexp(&x, batch, Algorithm::Auto, &mut b).unwrap();
        assert_eq!(a, b);
        let mut s = x;
        softmax_like_masked(&mut s, &keep, batch, Algorithm::Auto, Reduction::Softmax).unwrap();
        let mut t = [0.0f32; 8];
        super::super::softmax_like(&x, batch, Algorithm::Auto, Reduction::Softmax, &mut t).unwrap();
        assert_eq!(s, t);
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let mut out = [0.0f64; 1];
        let b = Batch::rows(1, 2);
        assert!(logsumexp_masked(&mut [1.0, 2.0], &[1], b, Algorithm::Auto, &mut out).is_err());
        let b = Batch::rows(1, 3);
        assert!(logsumexp_masked(&mut [1.0, 2.0], &[1, 1], b, Algorithm::Auto, &mut out).is_err());
    }
}
