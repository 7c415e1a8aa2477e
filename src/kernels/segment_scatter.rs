//! States of unsorted segments by scattering every element into its segment's state, in
//! array order, with no sort.
//!
//! Every element updates the `(max, excess)` [`LseState`] of its segment in place, the online
//! update of [`LseState::push`]: `x <= max` adds `exp(x - max)` to the excess; `x > max`
//! rescales the excess by `exp(max - x)` and makes `x` the max. Both factors are
//! `exp(-|x - max|)`, so a block of elements gathers the maxima of its segments and computes
//! every factor with one vector exp ([`simd::exp_nonpos_f64`], float32-grade as the row
//! kernels' exp for float32 results); the scalar update then adds or multiplies without a
//! branch. An element whose segment's max changed earlier in the same
//! block gets its factor recomputed by the same exp, so the result is the sequential update
//! in array order whatever the blocks; an element whose value or max is not finite takes
//! [`LseState::push`] itself, which then computes no exp, so special values follow the
//! state's rules exactly.
//!
//! Where: float32 input (float16 is computed in float32) with single columns and at most
//! [`SCATTER_MAX_STATE_BYTES`] of states ([`applies`]). A random access per element into
//! states that stay in the cache costs less than the counting sort's passes over work
//! buffers of the input's size. float64 input keeps the sort: its sorted path's blocked sums
//! are more accurate than one running sum (measured: 0 against 1-4 float64 ULP on a segment
//! of 2^20 elements), which a float32 result does not show but a float64 one would.
//!
//! Accuracy: a segment's total is summed in float64 in array order, so it differs from the
//! sorted path's (blocked vector lanes) by rounding only: at most about `3 n` float64
//! roundings of the total for a segment of `n` elements (one per add, two per rescale), and
//! the exp's own error (about `2^-34` relative, as in the row kernels for float32 results),
//! i.e. `3 n 2^-53 + 2^-34` in the log-sum-exp, before the one rounding to float32.
//!
//! Determinism: the rows are cut into [`parts`] chosen from the sizes alone; each part scatters
//! into its own states (the first into the output), and the parts are merged in part order
//! with [`LseState::merge`]. The result is therefore the same for any thread count.
//!
//! Ids are read where they lie, possibly while another thread writes them: each id is read
//! once and bounded, and only the bounded index is used.

use super::segments::SegmentError;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd::{self, Level};
use crate::state::LseState;
use std::hint::select_unpredictable;

/// The most bytes of states (16 per segment) the scatter takes on, about a server's L3: a
/// random access per element that misses it goes to DRAM, where the counting sort's streams
/// may win. (Measured on one thread, 2^22 float32 rows of random ids: the scatter took 0.77x
/// the sort's time at 2^17 segments and 0.71x at 2^23, on a machine whose L3 holds both.)
pub const SCATTER_MAX_STATE_BYTES: usize = 32 << 20;

/// Elements per block of the scatter: the gathered maxima, factors and indices stay in L1.
const BLOCK: usize = 256;

/// Rows of one part are at least this many times the number of segments, so that merging a
/// part's states costs little next to scattering its rows.
const PART_ROWS_PER_SEGMENT: usize = 16;

/// Fewer rows than this per part do not pay for waking a thread.
const PART_MIN_ROWS: usize = 1 << 16;

/// The most parts (each beyond the first holds its own states).
const MAX_PARTS: usize = 8;

/// Whether unsorted states of `T` in `inner` columns and `num_segments` segments take the
/// scatter: float32-grade input (see the module docs for float64), single columns, states
/// within [`SCATTER_MAX_STATE_BYTES`].
pub fn applies<T: Real>(inner: usize, num_segments: usize) -> bool {
    !T::FULL
        && inner == 1
        && num_segments <= SCATTER_MAX_STATE_BYTES / std::mem::size_of::<LseState>()
}

/// The number of parts the rows are cut into: a function of the sizes only (never of the
/// thread count), so the merged result is the same for any thread count.
pub fn parts(rows: usize, num_segments: usize) -> usize {
    let per_part = PART_MIN_ROWS.max(num_segments.saturating_mul(PART_ROWS_PER_SEGMENT));
    (rows / per_part).clamp(1, MAX_PARTS)
}

/// The `(max, excess)` state of every segment (`out.len() == num_segments`) of the 1-D `x`
/// with one id per element, by scattering. The first id outside `[0, num_segments)` is
/// reported by position.
pub fn scatter_states<T: Real>(
    x: &[T],
    ids: &[i64],
    num_segments: usize,
    out: &mut [LseState],
) -> Result<(), SegmentError> {
    let rows = x.len();
    debug_assert_eq!(ids.len(), rows);
    debug_assert_eq!(out.len(), num_segments);
    let parts = parts(rows, num_segments);
    // Part p > 0 scatters into own[(p - 1) * num_segments..p * num_segments].
    let mut own = Vec::new();
    own.try_reserve_exact((parts - 1) * num_segments)
        .map_err(|_| SegmentError::Alloc)?;
    own.resize((parts - 1) * num_segments, LseState::EMPTY);
    out.fill(LseState::EMPTY);
    let (op, wp) = (SendPtr(out.as_mut_ptr()), SendPtr(own.as_mut_ptr()));
    let level = simd::level();
    // Whole blocks per part; the last part takes the rest.
    let per = (rows / parts).next_multiple_of(BLOCK);
    let errors = parallel::map_collect(parts, rows.div_ceil(parts), |p| {
        let r0 = (p * per).min(rows);
        let r1 = if p + 1 == parts {
            rows
        } else {
            ((p + 1) * per).min(rows)
        };
        // SAFETY: part 0 owns out, part p > 0 owns its slice of own; both hold
        // num_segments states.
        let states = unsafe {
            let base = if p == 0 {
                op.ptr()
            } else {
                wp.ptr().add((p - 1) * num_segments)
            };
            std::slice::from_raw_parts_mut(base, num_segments)
        };
        scatter_ids(level, &x[r0..r1], &ids[r0..r1], r0, states).err()
    });
    // Parts are in row order: the first error found is the first offending position.
    if let Some(err) = errors.into_iter().flatten().next() {
        return Err(err);
    }
    if parts > 1 {
        let own = &own;
        parallel::for_each_piece(num_segments, parts, |range| {
            for s in range {
                // SAFETY: pieces own disjoint s < num_segments == out.len().
                let o = unsafe { &mut *op.ptr().add(s) };
                for p in 1..parts {
                    *o = o.merge(own[(p - 1) * num_segments + s]);
                }
            }
        });
    }
    Ok(())
}

/// Scatters `x` (ids `ids`, the first at row `first`) straight into `states`.
fn scatter_ids<T: Real>(
    level: Level,
    x: &[T],
    ids: &[i64],
    first: usize,
    states: &mut [LseState],
) -> Result<(), SegmentError> {
    let num_segments = states.len();
    let mut scratch = Block {
        q: [0; BLOCK],
        gathered: [0.0; BLOCK],
        t: [0.0; BLOCK],
        e: [0.0; BLOCK],
    };
    for (b, (xb, ib)) in x.chunks(BLOCK).zip(ids.chunks(BLOCK)).enumerate() {
        let next = ids.get((b + 1) * BLOCK..).unwrap_or(&[]);
        scatter_block(level, xb, ib, next, states, &mut scratch).map_err(|k| {
            SegmentError::IdOutOfRange {
                pos: first + b * BLOCK + k,
                id: ib[k],
                num_segments,
            }
        })?;
    }
    Ok(())
}

/// A hint to bring the line at `p` into the cache; never faults.
#[inline(always)]
pub(super) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally; SSE is baseline on x86_64.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The per-block scratch of [`scatter_block`], made once per part.
struct Block {
    /// The bounded segment of each element.
    q: [usize; BLOCK],
    /// Its segment's max when the block started.
    gathered: [f64; BLOCK],
    /// `-|x - max|`, then its exp in `e`.
    t: [f64; BLOCK],
    e: [f64; BLOCK],
}

/// The online update of one block of at most [`BLOCK`] elements, in order; `Err(k)` when
/// `ids[k]` is not a segment (nothing of the block is applied then).
#[inline(always)]
fn scatter_block<T: Real>(
    level: Level,
    x: &[T],
    ids: &[i64],
    next: &[i64],
    states: &mut [LseState],
    scratch: &mut Block,
) -> Result<(), usize> {
    let n = x.len().min(ids.len()).min(BLOCK);
    let Block { q, gathered, t, e } = scratch;
    for k in 0..n {
        // One read of each id, bounded here; only the bounded index is used below.
        let Some((s, st)) = usize::try_from(ids[k])
            .ok()
            .and_then(|s| Some((s, states.get(s)?)))
        else {
            return Err(k);
        };
        q[k] = s;
        gathered[k] = st.max;
        t[k] = -(x[k].to_f64() - st.max).abs();
    }
    // exp(x - max) for x <= max, exp(max - x) for x > max (0 for the empty state's -inf
    // max); lanes with a non-finite x or max are unused.
    simd::exp_nonpos_f64(level, &t[..n], &mut e[..n], T::FULL);
    let last = states.len().saturating_sub(1);
    for k in 0..n {
        // The next block's states are fetched while this one computes (a prefetch of a
        // clamped index: a bad id is reported when its block comes).
        if let Some(&id) = next.get(k) {
            prefetch(states.as_ptr().wrapping_add((id as usize).min(last)));
        }
        let v = x[k].to_f64();
        // Cannot miss: q[k] was bounded above; `get_mut` keeps that visible here.
        let Some(st) = states.get_mut(q[k]) else {
            continue;
        };
        if st.max < f64::INFINITY && v.is_finite() {
            let m = st.max;
            // The max moved earlier in this block: the factor of the current max, by the
            // same exp (so the blocks never show in the result).
            let f = if m == gathered[k] {
                e[k]
            } else {
                let mut f = [0.0];
                simd::exp_nonpos_f64(level, &[-(v - m).abs()], &mut f, T::FULL);
                f[0]
            };
            // x > max: excess = (1 + excess) exp(max - x), which is 0 for the empty state
            // (-inf, -1); else excess + exp(x - max). Which one is data-dependent.
            let up = v > m;
            let (one, mul, add) = select_unpredictable(up, (1.0, f, 0.0), (0.0, 1.0, f));
            st.excess = (st.excess + one) * mul + add;
            st.max = select_unpredictable(up, v, m);
        } else {
            // A NaN or infinite value or max: the state's own rules, no exp.
            st.push(v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar;

    /// A deterministic pseudo-random stream (xorshift) for test data.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Values and unsorted ids, with a sprinkle of special values.
    fn data(seed: u64, rows: usize, segments: u64) -> (Vec<f32>, Vec<i64>) {
        let mut rng = Rng(seed);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let xs = (0..rows)
            .map(|_| match rng.below(4000) {
                k @ 0..3 => specials[k as usize],
                k => (k as f32 - 2000.0) / 37.0,
            })
            .collect();
        let ids = (0..rows).map(|_| rng.below(segments) as i64).collect();
        (xs, ids)
    }

    fn states(xs: &[f32], ids: &[i64], segments: usize) -> Vec<LseState> {
        let mut out = vec![LseState::EMPTY; segments];
        scatter_states(xs, ids, segments, &mut out).unwrap();
        out
    }

    #[test]
    fn matches_the_two_pass_reference_per_segment() {
        let (xs, ids) = data(5, 200_000, 3000);
        assert!(parts(xs.len(), 3000) > 1);
        let got = states(&xs, &ids, 3000);
        let mut rows = vec![Vec::new(); 3000];
        for (&x, &id) in xs.iter().zip(&ids) {
            rows[id as usize].push(x as f64);
        }
        for s in 0..3000 {
            // SAFETY: the row holds rows[s].len() elements.
            let want = unsafe { scalar::lse_state_two_pass(rows[s].as_ptr(), 0, rows[s].len(), 1) };
            let (g, w) = (got[s].logsumexp(), want.logsumexp());
            let n = rows[s].len() as f64;
            // The sums' roundings, and the float32-grade exp (2^-34 relative, every term).
            let tol = (3.0 * n + 4.0) * f64::EPSILON / 2.0
                + 4.0 * f64::EPSILON * w.abs()
                + 2f64.powi(-34);
            assert!(
                g.to_bits() == w.to_bits() || (g - w).abs() <= tol,
                "segment {s} of {n}: {g} vs {w}"
            );
        }
        let specials = [
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            1.0,
            f32::NAN,
            2.0,
            f32::INFINITY,
        ];
        let got = states(&specials, &[0, 0, 2, 2, 3, 3], 4);
        assert_eq!(got[0].logsumexp(), f64::NEG_INFINITY);
        assert_eq!(got[1].logsumexp(), f64::NEG_INFINITY);
        assert!(got[2].logsumexp().is_nan());
        assert_eq!(got[3].logsumexp(), f64::INFINITY);
    }

    #[test]
    fn the_same_bits_for_any_thread_count() {
        let (xs, ids) = data(9, 600_000, 500);
        assert_eq!(parts(xs.len(), 500), MAX_PARTS);
        let mut runs = Vec::new();
        for threads in [1, 2, 3] {
            crate::parallel::set_num_threads(threads);
            runs.push(states(&xs, &ids, 500));
        }
        crate::parallel::set_num_threads(0);
        let bits = |r: &Vec<LseState>| -> Vec<(u64, u64)> {
            r.iter()
                .map(|s| (s.max.to_bits(), s.excess.to_bits()))
                .collect()
        };
        assert_eq!(bits(&runs[0]), bits(&runs[1]));
        assert_eq!(bits(&runs[0]), bits(&runs[2]));
    }

    #[test]
    fn blocks_never_show_in_the_bits() {
        // Increasing values of few segments: most elements raise their segment's max, often
        // after another element of it in the same block. Elements of an extra segment in front
        // move every block boundary; the other segments' states must not change.
        let rows = 5000;
        let xs: Vec<f32> = (0..rows).map(|r| (r as f32) * 0.01 - 20.0).collect();
        let ids: Vec<i64> = (0..rows as i64).map(|r| r % 3).collect();
        let base = states(&xs, &ids, 4);
        for shift in [1usize, 7, 255] {
            let mut xs2 = vec![0.5f32; shift];
            xs2.extend_from_slice(&xs);
            let mut ids2 = vec![3i64; shift];
            ids2.extend_from_slice(&ids);
            let got = states(&xs2, &ids2, 4);
            for s in 0..3 {
                assert_eq!(got[s].max.to_bits(), base[s].max.to_bits());
                assert_eq!(
                    got[s].excess.to_bits(),
                    base[s].excess.to_bits(),
                    "{shift} {s}"
                );
            }
        }
    }

    #[test]
    fn the_first_bad_id_is_named_across_parts() {
        let (xs, mut ids) = data(3, 400_000, 10);
        assert!(parts(xs.len(), 10) >= 4);
        ids[390_000] = -1;
        ids[250_001] = 10;
        ids[250_007] = 99;
        let mut out = vec![LseState::EMPTY; 10];
        let err = scatter_states(&xs, &ids, 10, &mut out).unwrap_err();
        assert_eq!(
            err,
            SegmentError::IdOutOfRange {
                pos: 250_001,
                id: 10,
                num_segments: 10
            }
        );
    }
}
