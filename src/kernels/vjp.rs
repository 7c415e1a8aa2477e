//! The vector-Jacobian products of softmax and log_softmax: the gradient with respect to the
//! input from the forward output `y` and the cotangent `dy`, as `torch.autograd` computes them.

use crate::error::Error;
use crate::kernels::blocking::{row_blocks, sum3, COLUMN_BLOCK};
use crate::kernels::row_exp_scaled;
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;

/// Which vector-Jacobian product [`softmax_like_backward`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// `y = softmax(x)`: `dx = y * (dy - sum(y * dy))`.
    Softmax,
    /// `y = log_softmax(x)`: `dx = dy - exp(y) * sum(dy)`.
    LogSoftmax,
}

/// `dx = softmax_backward(y, dy)`; see [`Backward::Softmax`].
pub fn softmax_backward<T: Real>(
    y: &[T],
    dy: &[T],
    batch: Batch,
    out: &mut [T],
) -> Result<(), Error> {
    softmax_like_backward(y, dy, batch, Backward::Softmax, out)
}

/// `dx = log_softmax_backward(y, dy)`; see [`Backward::LogSoftmax`].
pub fn log_softmax_backward<T: Real>(
    y: &[T],
    dy: &[T],
    batch: Batch,
    out: &mut [T],
) -> Result<(), Error> {
    softmax_like_backward(y, dy, batch, Backward::LogSoftmax, out)
}

/// The vector-Jacobian product of softmax or log_softmax from the forward output `y` and the
/// cotangent `dy` (both laid out by `batch`) into the dense `(outer, n, inner)` `out`. The lane
/// sum is taken in `f64` in a fixed order, so the result does not depend on the thread count.
pub fn softmax_like_backward<T: Real>(
    y: &[T],
    dy: &[T],
    batch: Batch,
    what: Backward,
    out: &mut [T],
) -> Result<(), Error> {
    batch.check(y.len()).map_err(Error::Layout)?;
    batch.check(dy.len()).map_err(Error::Layout)?;
    if out.len() != batch.elements() {
        return Err(Error::ShapeMismatch {
            what: "output",
            expected: batch.elements(),
            got: out.len(),
        });
    }
    let (n, inner) = (batch.n, batch.inner);
    let op = SendPtr(out.as_mut_ptr());
    if inner == 1 {
        parallel::for_each_piece(batch.outer, 2 * n.max(1), |range| {
            for l in range {
                let start = l * batch.outer_stride;
                let (yr, dr) = (&y[start..start + n], &dy[start..start + n]);
                let dot: f64 = row_blocks(n, |r| match what {
                    Backward::Softmax => {
                        let yb = &yr[r.clone()];
                        sum3(yb, &dr[r], yb, |a, b, _| a.to_f64() * b.to_f64())
                    }
                    Backward::LogSoftmax => {
                        let d = &dr[r];
                        sum3(d, d, d, |a, _, _| a.to_f64())
                    }
                })
                .sum();
                // SAFETY: lane l owns the dense row l of out, whose length was checked.
                let o = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(l * n), n) };
                let orow = SendPtr(o.as_mut_ptr());
                row_blocks(n, |r| {
                    // SAFETY: the blocks of one row are disjoint ranges of o.
                    let ob =
                        unsafe { std::slice::from_raw_parts_mut(orow.ptr().add(r.start), r.len()) };
                    match what {
                        Backward::Softmax => {
                            for (k, ok) in r.zip(ob.iter_mut()) {
                                let yk = yr[k].to_f64();
                                *ok = T::from_f64(yk * (dr[k].to_f64() - dot));
                            }
                        }
                        Backward::LogSoftmax => {
                            // exp(y) * sum(dy) through the SIMD write primitive, then dy - that.
                            row_exp_scaled(&yr[r.clone()], 0.0, dot, ob, false);
                            for (k, ok) in r.zip(ob.iter_mut()) {
                                *ok = T::from_f64(dr[k].to_f64() - ok.to_f64());
                            }
                        }
                    }
                })
                .for_each(drop); // the blocks ran for their writes
            }
        });
        return Ok(());
    }
    let blocks_per_slab = inner.div_ceil(COLUMN_BLOCK);
    let units = batch.outer * blocks_per_slab;
    let unit_elements = 2 * n * COLUMN_BLOCK.min(inner);
    parallel::for_each_piece(units, unit_elements, |range| {
        for u in range {
            let (o, jb) = (u / blocks_per_slab, u % blocks_per_slab);
            let j0 = jb * COLUMN_BLOCK;
            let width = COLUMN_BLOCK.min(inner - j0);
            let base = o * batch.outer_stride + j0;
            let mut dot = [0.0f64; COLUMN_BLOCK];
            for k in 0..n {
                let row = base + k * inner;
                for (jj, d) in dot.iter_mut().enumerate().take(width) {
                    let dk = dy[row + jj].to_f64();
                    *d += match what {
                        Backward::Softmax => y[row + jj].to_f64() * dk,
                        Backward::LogSoftmax => dk,
                    };
                }
            }
            let obase = o * n * inner + j0;
            for k in 0..n {
                let row = base + k * inner;
                for (jj, &d) in dot.iter().enumerate().take(width) {
                    let (yk, dk) = (y[row + jj].to_f64(), dy[row + jj].to_f64());
                    let v = match what {
                        Backward::Softmax => yk * (dk - d),
                        Backward::LogSoftmax => dk - yk.exp() * d,
                    };
                    // SAFETY: (k, column) of this unit's block in the dense out; units own
                    // disjoint column blocks and the length was checked.
                    unsafe { *op.ptr().add(obase + k * inner + jj) = T::from_f64(v) };
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::Rng;
    use crate::kernels::{Algorithm, LONG_ROW_BLOCK};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn backward_vjps_on_long_rows() {
        let mut rng = Rng::new(21);
        let n = 2 * LONG_ROW_BLOCK + 3;
        let batch = Batch::rows(1, n);
        let y: Vec<f64> = (0..n).map(|_| rng.uniform(0.0, 2.0 / n as f64)).collect();
        let dy: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dot: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let sdy: f64 = dy.iter().sum();
        let mut out = vec![0.0; n];
        softmax_backward(&y, &dy, batch, &mut out).unwrap();
        for k in [0, 1, LONG_ROW_BLOCK, n - 1] {
            assert!(close(out[k], y[k] * (dy[k] - dot), 1e-12));
        }
        log_softmax_backward(&y, &dy, batch, &mut out).unwrap();
        for k in [0, 1, LONG_ROW_BLOCK, n - 1] {
            assert!(close(out[k], dy[k] - y[k].exp() * sdy, 1e-12));
        }
    }

    #[test]
    fn backward_vjps_match_the_jacobian() {
        let mut rng = Rng::new(8);
        for &(outer, n, inner) in &[(3, 6, 1), (2, 5, 4), (1, 3, 200)] {
            let batch = Batch::contiguous(outer, n, inner);
            let x: Vec<f64> = (0..batch.elements())
                .map(|_| rng.uniform(-3.0, 3.0))
                .collect();
            let dy: Vec<f64> = (0..batch.elements())
                .map(|_| rng.uniform(-1.0, 1.0))
                .collect();
            let mut sm = vec![0.0; x.len()];
            let mut lsm = vec![0.0; x.len()];
            crate::kernels::softmax_like(
                &x,
                batch,
                Algorithm::Auto,
                crate::kernels::Reduction::Softmax,
                &mut sm,
            )
            .unwrap();
            crate::kernels::softmax_like(
                &x,
                batch,
                Algorithm::Auto,
                crate::kernels::Reduction::LogSoftmax,
                &mut lsm,
            )
            .unwrap();
            let mut dx = vec![0.0; x.len()];
            let mut dxl = vec![0.0; x.len()];
            softmax_backward(&sm, &dy, batch, &mut dx).unwrap();
            log_softmax_backward(&lsm, &dy, batch, &mut dxl).unwrap();
            for o in 0..outer {
                for j in 0..inner {
                    let idx = |k: usize| (o * n + k) * inner + j;
                    for i in 0..n {
                        // J_softmax[k][i] = s_k (d_ki - s_i); J_log_softmax[k][i] = d_ki - s_i.
                        let (mut want, mut want_l) = (0.0, 0.0);
                        for k in 0..n {
                            let d = if k == i { 1.0 } else { 0.0 };
                            want += dy[idx(k)] * sm[idx(k)] * (d - sm[idx(i)]);
                            want_l += dy[idx(k)] * (d - sm[idx(i)]);
                        }
                        assert!(close(dx[idx(i)], want, 1e-13), "{} {want}", dx[idx(i)]);
                        assert!(
                            close(dxl[idx(i)], want_l, 1e-13),
                            "{} {want_l}",
                            dxl[idx(i)]
                        );
                    }
                }
            }
        }
    }
}
