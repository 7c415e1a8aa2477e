//! Property tests of the dispatching kernel entry points against the scalar reference lanes
//! ([`super::scalar`]): lengths from 0 to past the long-row blocking, rows and columns, NaN / inf
//! patterns, huge and tiny (subnormal) magnitudes, f32 and f64, both algorithms, in place,
//! thread counts and the state merge.
//!
//! Every SIMD level this CPU has is checked (the `*_at` entry points), and the dispatching ones.
//! The reference is the scalar lane code called directly on each lane, so these properties hold
//! whatever SIMD level or blocking the entry points pick. Tolerances: the result may differ from
//! the reference by a few units in the last place of the output type (a vectorised `exp` and
//! another summation order), plus `eps * |max|` where `x - max` cancels; NaN and infinities
//! must match exactly.

use proptest::prelude::*;

use super::{scalar, Algorithm, Reduction};
use crate::layout::Batch;
use crate::real::Real;
use crate::simd::{self, Level};
use crate::state::LseState;

/// Elements that stress the kernels: ordinary values, the specials, huge, tiny and subnormal.
fn element() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -30.0f64..30.0,
        2 => -1.0e4f64..1.0e4,
        1 => Just(f64::NEG_INFINITY),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NAN),
        1 => prop_oneof![
            Just(0.0),
            Just(-0.0),
            Just(5e-324),
            Just(1e-310),
            Just(-745.2),
            Just(709.9),
            Just(3.0e38),
            Just(-3.0e38),
            Just(1.7e308),
            Just(-1.7e308),
        ],
    ]
}

/// Rows where the specials are rare (so most lanes are finite) or dominate (all -inf, ...).
fn lane_values(max_len: usize) -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        6 => proptest::collection::vec(-50.0f64..50.0, 0..max_len),
        4 => proptest::collection::vec(element(), 0..max_len),
        1 => (0..max_len).prop_map(|n| vec![f64::NEG_INFINITY; n]),
        1 => (1..max_len.max(2), any::<u64>()).prop_map(|(n, s)| {
            // Equal maxima (ties) among tiny terms.
            (0..n).map(|k| if (s >> (k % 64)) & 1 == 1 { 7.0 } else { -800.0 }).collect()
        }),
    ]
}

fn to_t<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn eps<T: Real>() -> f64 {
    if T::NAME == "float32" {
        f32::EPSILON as f64
    } else {
        f64::EPSILON
    }
}

/// `got` agrees with `want` (both of type T) to `ulps` units plus `eps * scale` absolute.
fn close<T: Real>(got: T, want: T, ulps: f64, scale: f64) -> Result<(), String> {
    let (g, w) = (got.to_f64(), want.to_f64());
    if w.is_nan() || g.is_nan() {
        return if w.is_nan() && g.is_nan() {
            Ok(())
        } else {
            Err(format!("NaN mismatch: got {g:e}, want {w:e}"))
        };
    }
    if w.is_infinite() || g.is_infinite() {
        return if g == w {
            Ok(())
        } else {
            Err(format!("inf mismatch: got {g:e}, want {w:e}"))
        };
    }
    // Subnormal outputs of T have an absolute, not relative, rounding error.
    let tiny = if T::NAME == "float32" {
        f32::MIN_POSITIVE as f64
    } else {
        f64::MIN_POSITIVE
    };
    let tol = ulps * eps::<T>() * w.abs() + 4.0 * eps::<T>() * scale.abs() + 2.0 * tiny;
    if (g - w).abs() <= tol {
        Ok(())
    } else {
        Err(format!("got {g:e}, want {w:e} (tol {tol:e})"))
    }
}

fn max_abs_finite(x: &[f64]) -> f64 {
    x.iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()))
}

fn reference_state<T: Real>(x: &[T], start: usize, n: usize, stride: usize) -> LseState {
    // SAFETY: callers pass lanes inside `x`.
    unsafe { scalar::lse_state_two_pass(x.as_ptr(), start, n, stride) }
}

/// Checks logsumexp, softmax, log_softmax (out of place and in place) and the lane states of
/// one `(outer, n, inner)` block against the scalar lanes.
fn check_block<T: Real>(vals: &[f64], outer: usize, n: usize, inner: usize) -> Result<(), String> {
    let x: Vec<T> = to_t(vals);
    let batch = Batch::contiguous(outer, n, inner);
    let scale = max_abs_finite(vals);
    let levels: Vec<Option<Level>> = simd::available_levels()
        .into_iter()
        .map(Some)
        .chain([None])
        .collect();
    let algs = [Algorithm::Auto, Algorithm::TwoPass, Algorithm::Online];
    for (level, a) in levels.iter().flat_map(|&l| algs.map(|a| (l, a))) {
        let alg = format!("{a:?} at {}", level.map_or("dispatch", Level::name));
        let mut lse = vec![T::NAN; batch.count()];
        let mut states = vec![LseState::EMPTY; batch.count()];
        match level {
            Some(lv) => {
                super::logsumexp_at(lv, &x, batch, a, &mut lse)?;
                super::lse_states_at(lv, &x, batch, a, &mut states)?;
            }
            None => {
                super::logsumexp(&x, batch, a, &mut lse)?;
                super::lse_states(&x, batch, a, &mut states)?;
            }
        }
        for what in [Reduction::Softmax, Reduction::LogSoftmax] {
            let mut out = vec![T::NAN; batch.elements()];
            let mut inplace = x.clone();
            match level {
                Some(lv) => {
                    super::softmax_like_at(lv, &x, batch, a, what, &mut out)?;
                    super::softmax_like_inplace_at(lv, &mut inplace, batch, a, what)?;
                }
                None => {
                    super::softmax_like(&x, batch, a, what, &mut out)?;
                    super::softmax_like_inplace(&mut inplace, batch, a, what)?;
                }
            }
            for (k, (p, q)) in out.iter().zip(&inplace).enumerate() {
                if p.to_f64().to_bits() != q.to_f64().to_bits() {
                    return Err(format!(
                        "{alg} {what:?}: in place differs at {k}: {p:?} {q:?}"
                    ));
                }
            }
            for l in 0..batch.count() {
                let (o, j) = (l / inner, l % inner);
                let start = o * n * inner + j;
                let st = reference_state(&x, start, n, inner);
                let mut want = vec![T::NAN; n];
                // SAFETY: the lane is inside x; `want` holds n elements at stride 1.
                unsafe {
                    match what {
                        Reduction::Softmax => scalar::softmax_write(
                            x.as_ptr(),
                            start,
                            inner,
                            want.as_mut_ptr(),
                            0,
                            1,
                            n,
                            st,
                        ),
                        Reduction::LogSoftmax => scalar::log_softmax_write(
                            x.as_ptr(),
                            start,
                            inner,
                            want.as_mut_ptr(),
                            0,
                            1,
                            n,
                            st,
                        ),
                    }
                }
                let row_scale = if what == Reduction::LogSoftmax {
                    scale
                } else {
                    0.0
                };
                for (k, w) in want.iter().enumerate() {
                    close(out[start + k * inner], *w, 8.0, row_scale)
                        .map_err(|e| format!("{alg} {what:?} lane {l} element {k}: {e}"))?;
                }
                if what == Reduction::Softmax {
                    close(lse[l], T::from_f64(st.logsumexp()), 4.0, scale)
                        .map_err(|e| format!("{alg} logsumexp lane {l}: {e}"))?;
                    close(
                        T::from_f64(states[l].logsumexp()),
                        T::from_f64(st.logsumexp()),
                        4.0,
                        scale,
                    )
                    .map_err(|e| format!("{alg} lse_states lane {l}: {e}"))?;
                }
            }
        }
    }
    Ok(())
}

/// Splitting a lane anywhere and merging the two states gives the state of the whole lane.
fn check_merge(vals: &[f64], cut: usize) -> Result<(), String> {
    let cut = cut.min(vals.len());
    let x: Vec<f64> = vals.to_vec();
    let whole = reference_state(&x, 0, x.len(), 1);
    let left = super::row_state(&x[..cut], Algorithm::Online);
    let right = super::row_state(&x[cut..], Algorithm::TwoPass);
    for merged in [left.merge(right), right.merge(left)] {
        close(
            merged.logsumexp(),
            whole.logsumexp(),
            8.0,
            max_abs_finite(vals),
        )
        .map_err(|e| format!("merge at {cut}: {e}"))?;
    }
    Ok(())
}

/// scipy's weighted logsumexp: the kernel against the scalar lane, with a zero-stride `b`.
fn check_weighted<T: Real>(a: &[f64], b: &[f64], rows: usize) -> Result<(), String> {
    let n = b.len();
    let av: Vec<T> = to_t(&a[..rows * n]);
    let bv: Vec<T> = to_t(b);
    let batch = Batch::rows(rows, n);
    let bbatch = Batch {
        outer: rows,
        n,
        inner: 1,
        outer_stride: 0,
    };
    let (mut out, mut sign) = (vec![T::NAN; rows], vec![T::NAN; rows]);
    super::logsumexp_weighted(&av, batch, &bv, bbatch, &mut out, Some(&mut sign))?;
    for r in 0..rows {
        // SAFETY: row r and b lie inside their slices.
        let (w, s) = unsafe {
            scalar::logsumexp_weighted_lane(av.as_ptr(), r * n, 1, bv.as_ptr(), 0, 1, n, true)
        };
        close(out[r], w, 8.0, max_abs_finite(a)).map_err(|e| format!("weighted row {r}: {e}"))?;
        close(sign[r], s, 0.0, 0.0).map_err(|e| format!("sign row {r}: {e}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn rows_match_scalar_f32(vals in lane_values(200), rows in 1usize..4) {
        let n = vals.len() / rows;
        check_block::<f32>(&vals[..rows * n], rows, n, 1).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn rows_match_scalar_f64(vals in lane_values(200), rows in 1usize..4) {
        let n = vals.len() / rows;
        check_block::<f64>(&vals[..rows * n], rows, n, 1).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn columns_match_scalar(vals in lane_values(240), inner in 2usize..20, outer in 1usize..3) {
        let n = vals.len() / (inner * outer);
        let m = outer * n * inner;
        check_block::<f32>(&vals[..m], outer, n, inner).map_err(TestCaseError::fail)?;
        check_block::<f64>(&vals[..m], outer, n, inner).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn merge_of_split_lanes(vals in lane_values(300), cut in 0usize..300) {
        check_merge(&vals, cut).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn weighted_matches_scalar(
        a in proptest::collection::vec(element(), 60),
        b in proptest::collection::vec(prop_oneof![4 => -2.0f64..2.0, 1 => Just(0.0)], 1..20),
        rows in 1usize..3,
    ) {
        check_weighted::<f32>(&a, &b, rows).map_err(TestCaseError::fail)?;
        check_weighted::<f64>(&a, &b, rows).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    // Long rows are cut into blocks of LONG_ROW_BLOCK merged in order, in parallel: few cases.
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn long_rows_match_scalar_for_any_thread_count(
        seed in any::<u64>(),
        extra in 0usize..3000,
        special in 0usize..4,
    ) {
        let n = 2 * super::LONG_ROW_BLOCK + extra;
        let mut state = seed | 1;
        let mut vals: Vec<f64> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 * 60.0 - 30.0
            })
            .collect();
        match special {
            1 => vals[n - 1] = f64::INFINITY,
            2 => vals[n / 2] = f64::NAN,
            3 => vals[n - 3] = 1e4, // the max in the last block
            _ => {}
        }
        let x: Vec<f32> = to_t(&vals);
        let want = <f32 as Real>::from_f64(reference_state(&x, 0, n, 1).logsumexp());
        let batch = Batch::rows(1, n);
        for level in simd::available_levels() {
            let mut results = Vec::new();
            for threads in [1, 3] {
                crate::parallel::set_num_threads(threads);
                let mut lse = [0.0f32];
                super::logsumexp_at(level, &x, batch, Algorithm::Auto, &mut lse)
                    .map_err(TestCaseError::fail)?;
                let mut sm = vec![0.0f32; n];
                super::softmax_like_at(level, &x, batch, Algorithm::Auto, Reduction::Softmax, &mut sm)
                    .map_err(TestCaseError::fail)?;
                results.push((lse[0].to_bits(), sm.iter().map(|v| v.to_bits()).collect::<Vec<_>>()));
            }
            crate::parallel::set_num_threads(0);
            prop_assert!(results[0] == results[1], "{}: results depend on the thread count", level.name());
            close(f32::from_bits(results[0].0), want, 4.0, max_abs_finite(&vals))
                .map_err(|e| TestCaseError::fail(format!("{}: {e}", level.name())))?;
        }
    }
}
