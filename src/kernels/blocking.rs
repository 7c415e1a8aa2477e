//! Fixed-order blocking shared by the loss and vector-Jacobian kernels: how a long row is cut
//! into blocks (and run in parallel) and how a block's sums are accumulated, both depending on
//! the lengths alone so that results are bit-identical for any thread count.

use std::ops::Range;

use crate::kernels::LONG_ROW_BLOCK;
use crate::parallel;

/// At most this many columns form one block when the reduced axis is not last: wide enough
/// for contiguous reads along `inner`.
pub(crate) const COLUMN_BLOCK: usize = 128;

/// Calls `f` on fixed blocks of `0..n` (one block below `2 * LONG_ROW_BLOCK`, without
/// allocating), in parallel for long rows, yielding the results in block order. The blocking
/// depends only on `n`.
pub(crate) fn row_blocks<R: Send, F>(
    n: usize,
    f: F,
) -> std::iter::Chain<std::option::IntoIter<R>, std::vec::IntoIter<R>>
where
    F: Fn(Range<usize>) -> R + Sync + Send,
{
    if n < 2 * LONG_ROW_BLOCK {
        return Some(f(0..n)).into_iter().chain(Vec::new());
    }
    let blocks = parallel::map_collect(n.div_ceil(LONG_ROW_BLOCK), LONG_ROW_BLOCK, |b| {
        let first = b * LONG_ROW_BLOCK;
        f(first..(first + LONG_ROW_BLOCK).min(n))
    });
    None.into_iter().chain(blocks)
}

/// `sum_k f(a_k, b_k, c_k)` over three equal-length slices in `f64`, with eight interleaved
/// accumulators: independent adds that vectorise (no bounds checks inside a chunk), in an
/// order fixed by the length alone. Pass the same slice twice for fewer operands.
#[inline]
pub(crate) fn sum3<A: Copy, B: Copy, C: Copy>(
    a: &[A],
    b: &[B],
    c: &[C],
    f: impl Fn(A, B, C) -> f64,
) -> f64 {
    debug_assert!(a.len() == b.len() && a.len() == c.len());
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .map(|((&p, &q), &r)| f(p, q, r))
        .sum();
    let mut acc = [0.0f64; 8];
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for i in 0..8 {
            acc[i] += f(xa[i], xb[i], xc[i]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}
