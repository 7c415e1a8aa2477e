//! softmax / log_softmax of rows whose `(max, excess)` states were computed elsewhere: a block
//! of a larger array whose normalised axis is split across blocks (a Dask chunk), given the
//! merged states of its rows. Each row is written by the row writer that
//! [`softmax_like`](crate::kernels::softmax_like) uses for rows that are not short, so such a
//! row gets the bits it would get there (short rows there go through a transposed kernel and
//! may differ in the last bit).

use crate::error::Error;
use crate::half::Stored;
use crate::kernels::{masked, next_row, write_row, Reduction};
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd;
use crate::state::LseState;

/// Elements of a row widened, written and rounded per step by
/// [`softmax_like_from_states_stored`]: a multiple of every vector width, so the steps' tails
/// are the row's tail and each element gets the bits the row writer gives the widened row.
const STEP: usize = 2048;

/// Checks `batch` (rows only) against the lengths of `x`, `states` and `out`.
fn check_rows(batch: Batch, x: usize, states: usize, out: usize) -> Result<(), Error> {
    if batch.inner != 1 {
        return Err(Error::Unsupported(
            "states are applied to rows only (inner == 1)",
        ));
    }
    batch.check(x).map_err(Error::Layout)?;
    for (what, expected, got) in [
        ("states", batch.count(), states),
        ("output", batch.elements(), out),
    ] {
        if expected != got {
            return Err(Error::ShapeMismatch {
                what,
                expected,
                got,
            });
        }
    }
    Ok(())
}

/// Writes `softmax` (or `log_softmax`) of every row of `x` (rows of `batch.n` elements,
/// `batch.inner == 1`) into the dense `out`, normalising row `r` by `states[r]` instead of its
/// own elements' state.
pub fn softmax_like_from_states<T: Real>(
    x: &[T],
    batch: Batch,
    states: &[LseState],
    what: Reduction,
    out: &mut [T],
) -> Result<(), Error> {
    check_rows(batch, x.len(), states.len(), out.len())?;
    let level = simd::level();
    let (n, pitch) = (batch.n, batch.outer_stride);
    let (xp, op) = (SendPtr(x.as_ptr() as *mut T), SendPtr(out.as_mut_ptr()));
    parallel::for_each_piece(batch.outer, 2 * n.max(1), |range| {
        for r in range.clone() {
            // The next row of the piece, hinted into cache as this one is written.
            let next = next_row(xp.ptr(), &batch, r, range.end);
            // SAFETY: row r lies inside x (checked by `batch.check`) and owns row r of the dense
            // out (length checked); `level` is the detected one; out does not alias x.
            unsafe {
                let xr = (xp.ptr() as *const T).add(r * pitch);
                write_row(
                    level,
                    (xr, next),
                    op.ptr().add(r * n),
                    n,
                    states[r],
                    what,
                    false,
                );
            }
        }
    });
    Ok(())
}

/// As [`softmax_like_from_states`] for rows stored as `S` and computed in `S::Compute`
/// (float16 / bfloat16 in float32), with the masked positions of `keep` (one byte per element,
/// nonzero = kept) written as a masked softmax writes them. Each row is widened [`STEP`]
/// elements at a time into a buffer of the thread, written there and rounded into `out`, so `x`
/// is never copied whole; every element equals the compute-type result on the widened row,
/// rounded once.
pub fn softmax_like_from_states_stored<S: Stored>(
    x: &[S],
    batch: Batch,
    states: &[LseState],
    what: Reduction,
    keep: Option<&[u8]>,
    out: &mut [S],
) -> Result<(), Error> {
    check_rows(batch, x.len(), states.len(), out.len())?;
    if let Some(k) = keep {
        if k.len() != out.len() {
            return Err(Error::ShapeMismatch {
                what: "where",
                expected: out.len(),
                got: k.len(),
            });
        }
    }
    let level = simd::level();
    let (n, pitch) = (batch.n, batch.outer_stride);
    let size = std::mem::size_of::<S>();
    let (xp, op) = (SendPtr(x.as_ptr() as *mut S), SendPtr(out.as_mut_ptr()));
    parallel::for_each_piece(batch.outer, 2 * n.max(1), |range| {
        let zero = <S::Compute as Real>::from_f64(0.0);
        let (mut wide, mut res) = ([zero; STEP], [zero; STEP]);
        for r in range {
            for c in (0..n).step_by(STEP) {
                let len = STEP.min(n - c);
                let (w, o) = (&mut wide[..len], &mut res[..len]);
                // SAFETY: elements c..c + len of row r lie inside x (checked by `check_rows`)
                // and inside row r of the dense out, which this piece owns; `level` is the
                // detected one; the buffers are the thread's own.
                unsafe {
                    let xr = (xp.ptr() as *const u8).add((r * pitch + c) * size);
                    S::widen_run(xr, size as isize, w);
                    write_row(
                        level,
                        (w.as_ptr(), std::ptr::null()),
                        o.as_mut_ptr(),
                        len,
                        states[r],
                        what,
                        false,
                    );
                    if let Some(k) = keep {
                        masked::finish_masked_chunk(o, &k[r * n + c..][..len], what);
                    }
                    S::narrow_run(o, op.ptr().add(r * n + c) as *mut u8, size as isize);
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{lse_states, softmax_like, Algorithm};

    #[test]
    fn own_states_give_what_softmax_like_writes() {
        for n in [37, 1000] {
            let batch = Batch::rows(3, n);
            let x: Vec<f64> = (0..batch.elements())
                .map(|i| ((i * 7919) % 101) as f64 / 9.0 - 5.0)
                .collect();
            let mut states = vec![LseState::EMPTY; 3];
            lse_states(&x, batch, Algorithm::Auto, &mut states).unwrap();
            for what in [Reduction::Softmax, Reduction::LogSoftmax] {
                let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                softmax_like(&x, batch, Algorithm::Auto, what, &mut a).unwrap();
                softmax_like_from_states(&x, batch, &states, what, &mut b).unwrap();
                if n > 64 && what == Reduction::LogSoftmax {
                    assert_eq!(a, b); // the same row writer
                } else {
                    // Short rows and softmax rows in cache sum in their own order.
                    for (p, q) in a.iter().zip(&b) {
                        assert!((p - q).abs() <= 1e-15 * p.abs().max(1.0), "{p} {q}");
                    }
                }
            }
        }
        let batch = Batch::rows(3, 37);
        let x = vec![0.0f64; batch.elements()];
        let states = [LseState::EMPTY; 2];
        let err = softmax_like_from_states(&x, batch, &states, Reduction::Softmax, &mut [0.0; 111]);
        assert!(matches!(
            err,
            Err(Error::ShapeMismatch { what: "states", .. })
        ));
    }
}
