//! Scalar reference kernels against a naive float64 formula.

use super::*;

pub(crate) use crate::simd::tests::Rng;

/// Naive, exactly-summed (two-sum compensated) float64 reference: max shift, then log of the sum.
fn naive_lse(x: &[f64]) -> f64 {
    if x.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for &v in x {
        let t = (v - m).exp();
        let y = t - c;
        let z = s + y;
        c = (z - s) - y;
        s = z;
    }
    m + s.ln()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * b.abs().max(1.0)
}

fn random_row(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.uniform(-scale, scale)).collect()
}

#[test]
fn logsumexp_rows_match_reference_for_lengths_0_to_70_and_large() {
    let mut rng = Rng::new(1);
    let mut lengths: Vec<usize> = (0..=70).collect();
    lengths.extend([
        127,
        128,
        129,
        1000,
        4095,
        4096,
        4097,
        100_000,
        2 * LONG_ROW_BLOCK + 5,
    ]);
    for &n in &lengths {
        for scale in [1.0, 30.0, 1000.0] {
            let row = random_row(&mut rng, n, scale);
            let want = naive_lse(&row);
            let row32: Vec<f32> = row.iter().map(|&v| v as f32).collect();
            let want32 = naive_lse(&row32.iter().map(|&v| v as f64).collect::<Vec<_>>());
            for alg in [Algorithm::TwoPass, Algorithm::Online] {
                let mut out = [0.0f64];
                logsumexp(&row, Batch::rows(1, n), alg, &mut out).unwrap();
                assert!(
                    close(out[0], want, 1e-13),
                    "n={n} {alg:?} {} {want}",
                    out[0]
                );
                let mut out32 = [0.0f32];
                logsumexp(&row32, Batch::rows(1, n), alg, &mut out32).unwrap();
                // One rounding at the end: the float32 result is the nearest float to the exact.
                assert!(
                    close(out32[0] as f64, want32, 0.51 * f32::EPSILON as f64),
                    "n={n} {alg:?} {} {want32}",
                    out32[0]
                );
            }
        }
    }
}

#[test]
fn specials_rows() {
    let inf = f64::INFINITY;
    let nan = f64::NAN;
    let cases: &[(&[f64], f64)] = &[
        (&[], -inf),
        (&[-inf, -inf], -inf),
        (&[inf, 1.0], inf),
        (&[inf, -inf], inf),
        (&[inf, inf], inf),
        (&[nan, 1.0], nan),
        (&[1.0, nan, inf], nan),
        (&[-inf, 0.0], 0.0),
        (&[1000.0, 1.0, -1000.0], 1000.0),
    ];
    for &(row, want) in cases {
        for alg in [Algorithm::TwoPass, Algorithm::Online] {
            let mut out = [0.0f64];
            logsumexp(row, Batch::rows(1, row.len()), alg, &mut out).unwrap();
            assert!(close(out[0], want, 0.0), "{row:?} {alg:?} -> {}", out[0]);
        }
    }
}

#[test]
fn overflow_row_softmax_and_log_softmax_are_finite() {
    let row = [1000.0f32, 1.0, -1000.0];
    let mut sm = [0.0f32; 3];
    let mut lsm = [0.0f32; 3];
    softmax_like(
        &row,
        Batch::rows(1, 3),
        Algorithm::Auto,
        Reduction::Softmax,
        &mut sm,
    )
    .unwrap();
    softmax_like(
        &row,
        Batch::rows(1, 3),
        Algorithm::Auto,
        Reduction::LogSoftmax,
        &mut lsm,
    )
    .unwrap();
    assert_eq!(sm, [1.0, 0.0, 0.0]);
    assert_eq!(lsm, [0.0, -999.0, -2000.0]);
}

#[test]
fn log_softmax_keeps_the_top_class_relative_accuracy() {
    // scipy issue 19521: log_softmax(float32[1 - ln(eps), 0])[0] is tiny but not 0.
    let eps = f32::EPSILON as f64;
    let x = [(1.0 - eps.ln()) as f32, 0.0f32];
    let mut out = [0.0f32; 2];
    softmax_like(
        &x,
        Batch::rows(1, 2),
        Algorithm::TwoPass,
        Reduction::LogSoftmax,
        &mut out,
    )
    .unwrap();
    let exact = -((-(x[0] as f64)).exp()).ln_1p();
    assert!(out[0] != 0.0);
    assert!(((out[0] as f64) - exact).abs() <= 0.5 * (exact.abs() * f32::EPSILON as f64));
}

#[test]
fn softmax_matches_reference_rows_and_columns_and_in_place() {
    let mut rng = Rng::new(7);
    for &(outer, n, inner) in &[
        (3, 5, 1),
        (2, 7, 4),
        (1, 70, 3),
        (4, 1, 2),
        (5, 0, 3),
        (0, 4, 1),
    ] {
        let batch = Batch::contiguous(outer, n, inner);
        let x = random_row(&mut rng, batch.elements(), 20.0);
        for what in [Reduction::Softmax, Reduction::LogSoftmax] {
            for alg in [Algorithm::TwoPass, Algorithm::Online] {
                let mut out = vec![0.0; x.len()];
                softmax_like(&x, batch, alg, what, &mut out).unwrap();
                for o in 0..outer {
                    for j in 0..inner {
                        let lane: Vec<f64> = (0..n).map(|k| x[(o * n + k) * inner + j]).collect();
                        let lse = naive_lse(&lane);
                        for k in 0..n {
                            let v = lane[k] - lse;
                            let want = if what == Reduction::Softmax {
                                v.exp()
                            } else {
                                v
                            };
                            let got = out[(o * n + k) * inner + j];
                            assert!(close(got, want, 1e-13), "{what:?} {got} {want}");
                        }
                    }
                }
                let mut buf = x.clone();
                softmax_like_inplace(&mut buf, batch, alg, what).unwrap();
                assert_eq!(buf, out);
            }
        }
    }
}

#[test]
fn wide_slabs_are_written_a_stripe_at_a_time_with_each_lanes_own_values() {
    // Slabs wider than a stripe: every lane's softmax equals that of the same lane in a
    // narrow batch of its neighbours, bit for bit, on both sides of the stripe's edge.
    let mut rng = Rng::new(11);
    let (outer, n, inner) = (2, 3, COLUMN_STRIPE + 20);
    let batch = Batch::contiguous(outer, n, inner);
    let x = random_row(&mut rng, batch.elements(), 30.0);
    for what in [Reduction::Softmax, Reduction::LogSoftmax] {
        let mut out = vec![0.0; x.len()];
        softmax_like(&x, batch, Algorithm::Auto, what, &mut out).unwrap();
        let mut buf = x.clone();
        softmax_like_inplace(&mut buf, batch, Algorithm::Auto, what).unwrap();
        assert_eq!(buf, out);
        for j0 in [0, COLUMN_STRIPE - 10, inner - 8] {
            let w = 8.min(inner - j0);
            let narrow = Batch::contiguous(outer, n, w);
            let at = |o: usize, k: usize, j: usize| (o * n + k) * inner + j0 + j;
            let xs: Vec<f64> = (0..narrow.elements())
                .map(|e| x[at(e / (n * w), e / w % n, e % w)])
                .collect();
            let mut want = vec![0.0; xs.len()];
            softmax_like(&xs, narrow, Algorithm::Auto, what, &mut want).unwrap();
            for (e, &v) in want.iter().enumerate() {
                let got = out[at(e / (n * w), e / w % n, e % w)];
                assert_eq!(got.to_bits(), v.to_bits(), "{what:?} column {}", j0 + e % w);
            }
        }
    }
}

#[test]
fn columns_match_rows_of_the_transpose() {
    let mut rng = Rng::new(3);
    let (n, inner) = (37, 11);
    let x = random_row(&mut rng, n * inner, 50.0);
    let mut cols = vec![0.0; inner];
    logsumexp(
        &x,
        Batch::contiguous(1, n, inner),
        Algorithm::Online,
        &mut cols,
    )
    .unwrap();
    for j in 0..inner {
        let lane: Vec<f64> = (0..n).map(|k| x[k * inner + j]).collect();
        assert!(close(cols[j], naive_lse(&lane), 1e-13));
    }
}

#[test]
fn strided_rows_and_broadcast_rows() {
    // Rows of 5 inside a pitch of 8, and the same row broadcast 3 times (stride 0).
    let data: Vec<f64> = (0..24).map(|i| i as f64 * 0.5).collect();
    let batch = Batch {
        outer: 3,
        n: 5,
        inner: 1,
        outer_stride: 8,
    };
    let mut out = vec![0.0; 3];
    logsumexp(&data, batch, Algorithm::TwoPass, &mut out).unwrap();
    for o in 0..3 {
        assert!(close(out[o], naive_lse(&data[o * 8..o * 8 + 5]), 1e-14));
    }
    let bcast = Batch {
        outer: 3,
        n: 5,
        inner: 1,
        outer_stride: 0,
    };
    logsumexp(&data, bcast, Algorithm::Online, &mut out).unwrap();
    assert!(out.iter().all(|&v| close(v, naive_lse(&data[..5]), 1e-14)));
}

#[test]
fn weighted_matches_scipy_cases() {
    let mut out = [0.0f64];
    let mut sign = [0.0f64];
    let run = |a: &[f64], b: &[f64], out: &mut [f64], sign: Option<&mut [f64]>| {
        logsumexp_weighted(
            a,
            Batch::rows(1, a.len()),
            b,
            Batch::rows(1, b.len()),
            out,
            sign,
        )
        .unwrap()
    };
    // scipy docs: logsumexp([1,2], b=[1,-1], return_sign=True) == (1.5413248546129181, -1.0)
    run(&[1.0, 2.0], &[1.0, -1.0], &mut out, Some(&mut sign));
    assert!(close(out[0], 1.5413248546129181, 1e-15) && sign[0] == -1.0);
    run(&[1.0, 2.0], &[1.0, -1.0], &mut out, None);
    assert!(out[0].is_nan());
    // Zero weights skip the element whatever it is.
    run(&[f64::INFINITY, 1.0], &[0.0, 1.0], &mut out, None);
    assert_eq!(out[0], 1.0);
    // Cancelling weights: log(0) = -inf with sign 0.
    run(&[1.0, 1.0], &[1.0, -1.0], &mut out, Some(&mut sign));
    assert!(out[0] == f64::NEG_INFINITY && sign[0] == 0.0);
    // arange(10) with b = arange(10, 0, -1): 9.9170178533034665
    let a: Vec<f64> = (0..10).map(|i| i as f64).collect();
    let b: Vec<f64> = (1..=10).rev().map(|i| i as f64).collect();
    run(&a, &b, &mut out, None);
    assert!(close(out[0], 9.917_017_853_303_466, 1e-15));
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng::new(11);
    let n = 3 * LONG_ROW_BLOCK + 17;
    let x: Vec<f32> = (0..2 * n)
        .map(|_| rng.uniform(-40.0, 40.0) as f32)
        .collect();
    let mut reference: Option<(Vec<f32>, Vec<f32>)> = None;
    for threads in [1, 2, 3] {
        crate::parallel::set_num_threads(threads);
        let mut lse = vec![0.0f32; 2];
        logsumexp(&x, Batch::rows(2, n), Algorithm::Online, &mut lse).unwrap();
        let mut sm = vec![0.0f32; x.len()];
        softmax_like(
            &x,
            Batch::rows(2, n),
            Algorithm::TwoPass,
            Reduction::Softmax,
            &mut sm,
        )
        .unwrap();
        match &reference {
            None => reference = Some((lse, sm)),
            Some((l0, s0)) => {
                assert_eq!(
                    l0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    lse.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                assert!(s0.iter().zip(&sm).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
    crate::parallel::set_num_threads(0);
}

#[test]
fn bad_sizes_are_errors_not_panics() {
    let x = [1.0f64; 4];
    let mut out = [0.0f64; 2];
    assert!(logsumexp(&x, Batch::rows(2, 3), Algorithm::Auto, &mut out).is_err());
    assert!(logsumexp(&x, Batch::rows(2, 2), Algorithm::Auto, &mut out[..1]).is_err());
    let huge = Batch {
        outer: usize::MAX,
        n: 2,
        inner: 1,
        outer_stride: usize::MAX,
    };
    assert!(logsumexp(&x, huge, Algorithm::Auto, &mut out).is_err());
}

// ---- Every SIMD level against the scalar reference -------------------------------------

use crate::simd::{available_levels, Level};

/// Two float32 values agree to within one unit in the last place (or are both NaN).
fn within_ulp32(a: f32, b: f32, ulps: u32) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a == b {
        return true;
    }
    if a.is_sign_negative() != b.is_sign_negative() {
        return a.abs() <= f32::from_bits(ulps) && b.abs() <= f32::from_bits(ulps);
    }
    a.to_bits().abs_diff(b.to_bits()) <= ulps
}

fn agree64(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan())
        || a == b
        || (a - b).abs() <= rel * a.abs().max(b.abs())
        || (a - b).abs() < 1e-300
}

fn test_lengths(rng: &mut Rng) -> Vec<usize> {
    let mut lengths: Vec<usize> = (0..=70).collect();
    lengths.extend([127, 128, 129, 255, 256, 257, 4095, 4096, 4097, 8191, 8193]);
    lengths.extend((0..12).map(|_| rng.uniform(1.0, 20_000.0) as usize));
    lengths
}

/// Checks logsumexp / softmax / log_softmax of one f32 row at `level` against the scalar level
/// and, for logsumexp, against the exactly summed reference (one rounding: <= 0.51 ULP).
fn check_row_f32(level: Level, row: &[f32], what: &str) {
    let n = row.len();
    let wide: Vec<f64> = row.iter().map(|&v| v as f64).collect();
    let exact = naive_lse(&wide);
    for alg in [Algorithm::TwoPass, Algorithm::Online] {
        let (mut got, mut reference) = ([0.0f32], [0.0f32]);
        logsumexp_at(level, row, Batch::rows(1, n), alg, &mut got).unwrap();
        logsumexp_at(Level::Scalar, row, Batch::rows(1, n), alg, &mut reference).unwrap();
        assert!(
            within_ulp32(got[0], reference[0], 1),
            "{level:?} {alg:?} {what} n={n}: {} vs scalar {}",
            got[0],
            reference[0]
        );
        if exact.is_finite() {
            assert!(
                close(got[0] as f64, exact, 0.51 * f32::EPSILON as f64),
                "{level:?} {alg:?} {what} n={n}: {} vs exact {exact}",
                got[0]
            );
        }
        for red in [Reduction::Softmax, Reduction::LogSoftmax] {
            let (mut got, mut reference) = (vec![0.0f32; n], vec![0.0f32; n]);
            softmax_like_at(level, row, Batch::rows(1, n), alg, red, &mut got).unwrap();
            softmax_like_at(
                Level::Scalar,
                row,
                Batch::rows(1, n),
                alg,
                red,
                &mut reference,
            )
            .unwrap();
            for k in 0..n {
                assert!(
                    within_ulp32(got[k], reference[k], 1),
                    "{level:?} {alg:?} {red:?} {what} n={n} k={k}: {} vs scalar {}",
                    got[k],
                    reference[k]
                );
            }
            let mut inplace = row.to_vec();
            softmax_like_inplace_at(level, &mut inplace, Batch::rows(1, n), alg, red).unwrap();
            assert!(inplace
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}

fn check_row_f64(level: Level, row: &[f64], what: &str) {
    let n = row.len();
    for alg in [Algorithm::TwoPass, Algorithm::Online] {
        let (mut got, mut reference) = ([0.0f64], [0.0f64]);
        logsumexp_at(level, row, Batch::rows(1, n), alg, &mut got).unwrap();
        logsumexp_at(Level::Scalar, row, Batch::rows(1, n), alg, &mut reference).unwrap();
        assert!(
            agree64(got[0], reference[0], 1e-14),
            "{level:?} {alg:?} {what} n={n}: {} vs scalar {}",
            got[0],
            reference[0]
        );
        for red in [Reduction::Softmax, Reduction::LogSoftmax] {
            let (mut got, mut reference) = (vec![0.0f64; n], vec![0.0f64; n]);
            softmax_like_at(level, row, Batch::rows(1, n), alg, red, &mut got).unwrap();
            softmax_like_at(
                Level::Scalar,
                row,
                Batch::rows(1, n),
                alg,
                red,
                &mut reference,
            )
            .unwrap();
            for k in 0..n {
                assert!(
                    agree64(got[k], reference[k], 1e-13),
                    "{level:?} {alg:?} {red:?} {what} n={n} k={k}: {} vs scalar {}",
                    got[k],
                    reference[k]
                );
            }
        }
    }
}

#[test]
fn every_level_matches_scalar_on_random_rows() {
    let mut rng = Rng::new(21);
    for level in available_levels() {
        for n in test_lengths(&mut rng) {
            for scale in [1.0, 30.0, 1000.0] {
                let row = random_row(&mut rng, n, scale);
                let row32: Vec<f32> = row.iter().map(|&v| v as f32).collect();
                check_row_f32(level, &row32, "uniform");
                check_row_f64(level, &row, "uniform");
            }
        }
    }
}

/// Rows built from specials: -inf, +inf, NaN, subnormals, huge magnitudes, the overflow row.
fn special_rows() -> Vec<(String, Vec<f64>)> {
    let (inf, nan) = (f64::INFINITY, f64::NAN);
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        ("overflow".into(), vec![1000.0, 1.0, -1000.0]),
        ("-overflow".into(), vec![-1000.0, 1.0, 1000.0]),
        ("all -inf".into(), vec![-inf; 37]),
        ("tiny terms".into(), vec![0.0, -40.0, -80.0, -100.0, -103.0]),
        ("huge".into(), vec![3e38, -3e38, 1e30, 0.0]),
        (
            "subnormals".into(),
            vec![1e-45, -1e-45, 1e-40, 0.0, -0.0, 1e-310],
        ),
        ("ties".into(), vec![2.5; 33]),
    ];
    for &n in &[1usize, 7, 8, 9, 17, 100, 4100, 9000] {
        for (name, v) in [("+inf", inf), ("-inf", -inf), ("nan", nan)] {
            for pos in [0, n / 2, n - 1] {
                let mut row: Vec<f64> = (0..n).map(|k| (k as f64 * 0.37).sin() * 20.0).collect();
                row[pos] = v;
                rows.push((format!("{name} at {pos} of {n}"), row));
            }
        }
        // -inf everywhere but one NaN, and -inf everywhere but one finite value.
        let mut row = vec![-inf; n];
        row[n - 1] = nan;
        rows.push((format!("-inf row with nan, n={n}"), row));
        let mut row = vec![-inf; n];
        row[n / 3] = -5.0;
        rows.push((format!("-inf row with one value, n={n}"), row));
        let mut row = vec![1e-42; n];
        row[n / 2] = -1e-44;
        rows.push((format!("subnormal row n={n}"), row));
        let mut row: Vec<f64> = (0..n).map(|k| -(k as f64)).collect();
        row.reverse(); // increasing: the online max grows at every element
        rows.push((format!("increasing n={n}"), row));
        rows.push((
            format!("alternating +-1000 n={n}"),
            (0..n)
                .map(|k| if k % 2 == 0 { 1000.0 } else { -1000.0 })
                .collect(),
        ));
    }
    rows
}

#[test]
fn every_level_matches_scalar_on_special_rows() {
    for level in available_levels() {
        for (name, row) in special_rows() {
            let row32: Vec<f32> = row.iter().map(|&v| v as f32).collect();
            check_row_f32(level, &row32, &name);
            check_row_f64(level, &row, &name);
        }
    }
}

#[test]
fn every_level_matches_scalar_on_long_rows_blocks_and_states() {
    let mut rng = Rng::new(5);
    let n = 2 * LONG_ROW_BLOCK + 4097;
    let x: Vec<f32> = (0..n).map(|_| rng.uniform(-60.0, 60.0) as f32).collect();
    for level in available_levels() {
        for alg in [Algorithm::TwoPass, Algorithm::Online] {
            let (mut a, mut b) = ([LseState::EMPTY], [LseState::EMPTY]);
            lse_states_at(level, &x, Batch::rows(1, n), alg, &mut a).unwrap();
            lse_states_at(Level::Scalar, &x, Batch::rows(1, n), alg, &mut b).unwrap();
            assert_eq!(a[0].max, b[0].max);
            assert!(
                agree64(a[0].excess, b[0].excess, 1e-10),
                "{level:?} {a:?} {b:?}"
            );
        }
    }
}

#[test]
fn every_level_matches_scalar_on_columns_strided_and_in_place() {
    let mut rng = Rng::new(9);
    let shapes = [
        (1, 37, 11),
        (2, 5, 40),
        (3, 64, 33),
        (1, 1, 9),
        (2, 300, 70),
        (2, 7, 1100),
        (1, 0, 5),
    ];
    for level in available_levels() {
        for &(outer, n, inner) in &shapes {
            let batch = Batch::contiguous(outer, n, inner);
            let mut x = random_row(&mut rng, batch.elements(), 40.0);
            if x.len() > 3 {
                x[1] = f64::NEG_INFINITY;
                x[2] = 1e-300;
            }
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            for alg in [Algorithm::TwoPass, Algorithm::Online] {
                let (mut a, mut b) = (vec![0.0f32; batch.count()], vec![0.0f32; batch.count()]);
                logsumexp_at(level, &x32, batch, alg, &mut a).unwrap();
                logsumexp_at(Level::Scalar, &x32, batch, alg, &mut b).unwrap();
                assert!(
                    a.iter().zip(&b).all(|(&p, &q)| within_ulp32(p, q, 1)),
                    "{level:?} {a:?} {b:?}"
                );
                let (mut a, mut b) = (vec![0.0f64; batch.count()], vec![0.0f64; batch.count()]);
                logsumexp_at(level, &x, batch, alg, &mut a).unwrap();
                logsumexp_at(Level::Scalar, &x, batch, alg, &mut b).unwrap();
                assert!(a.iter().zip(&b).all(|(&p, &q)| agree64(p, q, 1e-14)));
                for red in [Reduction::Softmax, Reduction::LogSoftmax] {
                    let (mut a, mut b) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
                    softmax_like_at(level, &x32, batch, alg, red, &mut a).unwrap();
                    softmax_like_at(Level::Scalar, &x32, batch, alg, red, &mut b).unwrap();
                    assert!(a.iter().zip(&b).all(|(&p, &q)| within_ulp32(p, q, 1)));
                    let mut c = x32.clone();
                    softmax_like_inplace_at(level, &mut c, batch, alg, red).unwrap();
                    assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
                }
            }
        }
        // Strided rows (pitch 13 > n = 9) and a broadcast row (pitch 0).
        let data: Vec<f32> = (0..60).map(|i| (i as f32 * 0.7).cos() * 30.0).collect();
        for batch in [
            Batch {
                outer: 4,
                n: 9,
                inner: 1,
                outer_stride: 13,
            },
            Batch {
                outer: 3,
                n: 9,
                inner: 1,
                outer_stride: 0,
            },
            Batch {
                outer: 2,
                n: 4,
                inner: 3,
                outer_stride: 20,
            },
        ] {
            for alg in [Algorithm::TwoPass, Algorithm::Online] {
                let (mut a, mut b) = (vec![0.0f32; batch.count()], vec![0.0f32; batch.count()]);
                logsumexp_at(level, &data, batch, alg, &mut a).unwrap();
                logsumexp_at(Level::Scalar, &data, batch, alg, &mut b).unwrap();
                assert!(
                    a.iter().zip(&b).all(|(&p, &q)| within_ulp32(p, q, 1)),
                    "{batch:?}"
                );
                let (mut a, mut b) = (
                    vec![0.0f32; batch.elements()],
                    vec![0.0f32; batch.elements()],
                );
                softmax_like_at(level, &data, batch, alg, Reduction::Softmax, &mut a).unwrap();
                softmax_like_at(Level::Scalar, &data, batch, alg, Reduction::Softmax, &mut b)
                    .unwrap();
                assert!(
                    a.iter().zip(&b).all(|(&p, &q)| within_ulp32(p, q, 1)),
                    "{batch:?}"
                );
            }
        }
    }
}

#[test]
fn every_level_is_bit_identical_for_1_2_3_threads() {
    let mut rng = Rng::new(13);
    let long = 3 * LONG_ROW_BLOCK + 17;
    let cases: Vec<(Batch, Vec<f32>)> = [
        Batch::rows(2, long),
        Batch::rows(3000, 40),
        Batch::rows(40, 3000),
        Batch::contiguous(3, 500, 100),
        Batch::contiguous(2, 40, 1300),
    ]
    .into_iter()
    .map(|b| {
        (
            b,
            (0..b.elements())
                .map(|_| rng.uniform(-40.0, 40.0) as f32)
                .collect(),
        )
    })
    .collect();
    for level in available_levels() {
        for (batch, x) in &cases {
            let mut reference: Option<(Vec<u32>, Vec<u32>)> = None;
            for threads in [1, 2, 3] {
                crate::parallel::set_num_threads(threads);
                for alg in [Algorithm::TwoPass, Algorithm::Online] {
                    let mut lse = vec![0.0f32; batch.count()];
                    logsumexp_at(level, x, *batch, alg, &mut lse).unwrap();
                    let mut sm = vec![0.0f32; x.len()];
                    softmax_like_at(level, x, *batch, alg, Reduction::Softmax, &mut sm).unwrap();
                    let bits = (
                        lse.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        sm.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    );
                    if alg == Algorithm::TwoPass {
                        match &reference {
                            None => reference = Some(bits),
                            Some(r) => assert!(*r == bits, "{level:?} {batch:?} threads={threads}"),
                        }
                    }
                }
            }
        }
    }
    crate::parallel::set_num_threads(0);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn element() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -100.0f32..100.0,
            2 => -1e4f32..1e4,
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NAN),
            1 => Just(0.0f32),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn every_level_matches_scalar(row in proptest::collection::vec(element(), 0..300)) {
            for level in available_levels() {
                check_row_f32(level, &row, "proptest");
            }
        }
    }
}

#[test]
fn every_level_matches_scalar_on_batches_of_short_rows() {
    let mut rng = Rng::new(17);
    let specials = [
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NAN,
        1e-310,
        1000.0,
        -1000.0,
    ];
    for level in available_levels() {
        for n in [1usize, 2, 3, 7, 8, 9, 10, 16, 31, 32, 33, 63, 64, 65] {
            for rows in [1usize, 5, 8, 13, 300] {
                let mut x = random_row(&mut rng, rows * n, 30.0);
                for (i, v) in x.iter_mut().enumerate() {
                    if i % 37 == 5 {
                        *v = specials[(i / 37) % specials.len()];
                    }
                }
                let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let batch = Batch::rows(rows, n);
                let (mut a, mut b) = (vec![0.0f32; rows], vec![0.0f32; rows]);
                logsumexp_at(level, &x32, batch, Algorithm::Auto, &mut a).unwrap();
                logsumexp_at(Level::Scalar, &x32, batch, Algorithm::Auto, &mut b).unwrap();
                for r in 0..rows {
                    assert!(
                        within_ulp32(a[r], b[r], 1),
                        "{level:?} n={n} row {r}: {} {}",
                        a[r],
                        b[r]
                    );
                    let exact = naive_lse(
                        &x32[r * n..(r + 1) * n]
                            .iter()
                            .map(|&v| v as f64)
                            .collect::<Vec<_>>(),
                    );
                    if exact.is_finite() {
                        assert!(
                            close(a[r] as f64, exact, 0.51 * f32::EPSILON as f64),
                            "{level:?} n={n} row {r}"
                        );
                    }
                }
                let (mut a, mut b) = (vec![0.0f64; rows], vec![0.0f64; rows]);
                logsumexp_at(level, &x, batch, Algorithm::Auto, &mut a).unwrap();
                logsumexp_at(Level::Scalar, &x, batch, Algorithm::Auto, &mut b).unwrap();
                assert!(
                    a.iter().zip(&b).all(|(&p, &q)| agree64(p, q, 1e-14)),
                    "{level:?} n={n}"
                );
                for red in [Reduction::Softmax, Reduction::LogSoftmax] {
                    let (mut a, mut b) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
                    softmax_like_at(level, &x32, batch, Algorithm::Auto, red, &mut a).unwrap();
                    softmax_like_at(Level::Scalar, &x32, batch, Algorithm::Auto, red, &mut b)
                        .unwrap();
                    assert!(
                        a.iter().zip(&b).all(|(&p, &q)| within_ulp32(p, q, 1)),
                        "{level:?} {red:?} n={n}"
                    );
                    let mut c = x32.clone();
                    softmax_like_inplace_at(level, &mut c, batch, Algorithm::Auto, red).unwrap();
                    assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
                    let (mut a, mut b) = (vec![0.0f64; x.len()], vec![0.0f64; x.len()]);
                    softmax_like_at(level, &x, batch, Algorithm::Auto, red, &mut a).unwrap();
                    softmax_like_at(Level::Scalar, &x, batch, Algorithm::Auto, red, &mut b)
                        .unwrap();
                    assert!(
                        a.iter().zip(&b).all(|(&p, &q)| agree64(p, q, 1e-13)),
                        "{level:?} {red:?} n={n}"
                    );
                }
            }
        }
    }
}

/// The per-row states of a batch of short rows (what a loss over short rows starts from):
/// every level's short-row kernel against the scalar reference, with NaN/inf rows redone,
/// rows `pitch > n` apart, and a count of rows that is not a multiple of any vector width.
#[test]
fn every_level_matches_scalar_on_short_row_states() {
    let mut rng = Rng::new(23);
    let specials = [f64::NEG_INFINITY, f64::INFINITY, f64::NAN, -1000.0];
    for level in available_levels() {
        for n in [1usize, 2, 5, 10, 17, 32, 64] {
            for (rows, pitch) in [(1usize, n), (13, n), (37, n + 3)] {
                let mut x = random_row(&mut rng, rows * pitch, 30.0);
                for (i, v) in x.iter_mut().enumerate() {
                    if i % 41 == 7 {
                        *v = specials[(i / 41) % specials.len()];
                    }
                }
                let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let batch = Batch {
                    outer: rows,
                    outer_stride: pitch,
                    n,
                    inner: 1,
                };
                let mut a = vec![LseState::EMPTY; rows];
                let mut b = vec![LseState::EMPTY; rows];
                lse_states_at(level, &x32, batch, Algorithm::Auto, &mut a).unwrap();
                lse_states_at(Level::Scalar, &x32, batch, Algorithm::Auto, &mut b).unwrap();
                for (r, (p, q)) in a.iter().zip(&b).enumerate() {
                    let same_max =
                        p.max.to_bits() == q.max.to_bits() || (p.max.is_nan() && q.max.is_nan());
                    assert!(same_max, "{level:?} n={n} row {r}: {p:?} {q:?}");
                    let (u, v) = (p.logsumexp(), q.logsumexp());
                    assert!(agree64(u, v, 1e-9), "{level:?} n={n} row {r}: {p:?} {q:?}");
                }
                lse_states_at(level, &x, batch, Algorithm::Auto, &mut a).unwrap();
                lse_states_at(Level::Scalar, &x, batch, Algorithm::Auto, &mut b).unwrap();
                for (r, (p, q)) in a.iter().zip(&b).enumerate() {
                    let (u, v) = (p.logsumexp(), q.logsumexp());
                    assert!(agree64(u, v, 1e-14), "{level:?} n={n} row {r}: {p:?} {q:?}");
                }
            }
        }
    }
}

/// The float32 softmax of `row`, each element rounded once from float64 with `f64::exp`.
fn exact_softmax_f32(row: &[f32]) -> Vec<f32> {
    let m = row
        .iter()
        .fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
    let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|&v| (v / s) as f32).collect()
}

/// Softmax rows in cache keep their exps in a float64 scratch for the write (one exp per
/// element). The rows here cross the sum's block size (where the blocked state would rescale
/// when the max comes late), the scratch limit, and hold the cases where every term but the
/// max underflows, the max is last, or the row is a ramp. A wrong scratch index, a stale
/// exp, a missing rescale or a lost tail lane shows as an error far above 1 ULP.
#[test]
fn softmax_with_stored_exps_is_within_one_ulp_at_every_level() {
    use crate::simd::STORED_ROW;
    let mut rng = Rng::new(77);
    let mut rows: Vec<(String, Vec<f32>)> = Vec::new();
    for n in [65, 71, 1023, 1024, 1025, 2047, 2048, 2049, 4096, 6143, 6145] {
        rows.push((
            format!("uniform n={n}"),
            (0..n).map(|_| rng.uniform(-20.0, 20.0) as f32).collect(),
        ));
        let mut late: Vec<f32> = (0..n).map(|_| rng.uniform(-5.0, 5.0) as f32).collect();
        late[n - 1] = 30.0;
        rows.push((format!("max last n={n}"), late));
        let mut one: Vec<f32> = (0..n).map(|_| rng.uniform(-900.0, -200.0) as f32).collect();
        one[n / 3] = 1.5;
        rows.push((format!("all but one underflow n={n}"), one));
        rows.push((
            format!("ramp n={n}"),
            (0..n).map(|k| k as f32 * 0.01).collect(),
        ));
        let mut holes: Vec<f32> = (0..n).map(|_| rng.uniform(-3.0, 3.0) as f32).collect();
        for k in (0..n).step_by(7) {
            holes[k] = f32::NEG_INFINITY;
        }
        rows.push((format!("-inf every 7th n={n}"), holes));
    }
    for n in [STORED_ROW - 1, STORED_ROW, STORED_ROW + 1] {
        rows.push((
            format!("long n={n}"),
            (0..n).map(|_| rng.uniform(-10.0, 10.0) as f32).collect(),
        ));
    }
    for level in available_levels() {
        for (name, row) in &rows {
            let n = row.len();
            let exact = exact_softmax_f32(row);
            let mut got = vec![0.0f32; n];
            softmax_like_at(
                level,
                row,
                Batch::rows(1, n),
                Algorithm::TwoPass,
                Reduction::Softmax,
                &mut got,
            )
            .unwrap();
            for k in 0..n {
                assert!(
                    within_ulp32(got[k], exact[k], 1),
                    "{level:?} {name} k={k}: {} vs {}",
                    got[k],
                    exact[k]
                );
                if row[k] == f32::NEG_INFINITY {
                    assert_eq!(got[k].to_bits(), 0, "{level:?} {name} k={k}");
                }
            }
            // float64: the float64 exp (< 1 ULP) times 1 / S.
            let row64: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            let m = row64.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            let s: f64 = row64.iter().map(|&v| (v - m).exp()).sum();
            let mut got64 = vec![0.0f64; n];
            let b = Batch::rows(1, n);
            softmax_like_at(
                level,
                &row64,
                b,
                Algorithm::TwoPass,
                Reduction::Softmax,
                &mut got64,
            )
            .unwrap();
            for k in 0..n {
                let want = (row64[k] - m).exp() / s;
                assert!(
                    agree64(got64[k], want, 1e-14),
                    "{level:?} {name} float64 k={k}: {} vs {want}",
                    got64[k]
                );
            }
            let mut inplace = row.clone();
            softmax_like_inplace_at(
                level,
                &mut inplace,
                Batch::rows(1, n),
                Algorithm::TwoPass,
                Reduction::Softmax,
            )
            .unwrap();
            assert!(
                inplace
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{level:?} {name}: in place differs"
            );
        }
    }
}

/// Memory that ends where an inaccessible page begins: a read or write past the end of a
/// slice placed at its end faults, so a kernel that loads whole vectors past a row must keep
/// them inside what it was given.
#[cfg(target_os = "linux")]
mod guarded {
    use std::ffi::c_void;

    extern "C" {
        fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: i32,
            flags: i32,
            fd: i32,
            off: i64,
        ) -> *mut c_void;
        fn mprotect(addr: *mut c_void, len: usize, prot: i32) -> i32;
        fn munmap(addr: *mut c_void, len: usize) -> i32;
        fn sysconf(name: i32) -> i64;
    }
    const PROT_NONE: i32 = 0;
    const PROT_READ_WRITE: i32 = 1 | 2;
    const MAP_PRIVATE_ANONYMOUS: i32 = 0x02 | 0x20;
    const SC_PAGESIZE: i32 = 30;

    pub(super) struct Guarded {
        base: *mut u8,
        total: usize,
        open: usize,
    }

    impl Guarded {
        /// Room for `bytes` (at least one page) before a page that may not be touched.
        pub(super) fn new(bytes: usize) -> Guarded {
            // SAFETY: plain libc calls; the mapping is checked before use.
            unsafe {
                let page = sysconf(SC_PAGESIZE) as usize;
                let open = bytes.div_ceil(page).max(1) * page;
                let total = open + page;
                let base = mmap(
                    std::ptr::null_mut(),
                    total,
                    PROT_READ_WRITE,
                    MAP_PRIVATE_ANONYMOUS,
                    -1,
                    0,
                );
                assert!(base as isize != -1, "mmap");
                let base = base as *mut u8;
                assert_eq!(mprotect(base.add(open) as *mut c_void, page, PROT_NONE), 0);
                Guarded { base, total, open }
            }
        }

        /// `src` copied to the last `src.len()` elements before the guard.
        pub(super) fn at_end<T: Copy>(&mut self, src: &[T]) -> &mut [T] {
            let bytes = std::mem::size_of_val(src);
            assert!(bytes <= self.open);
            // SAFETY: the bytes lie in the open part of the mapping, which is aligned for
            // any T whose size divides the page (the slice ends on the page boundary).
            unsafe {
                let p = self.base.add(self.open - bytes) as *mut T;
                std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len());
                std::slice::from_raw_parts_mut(p, src.len())
            }
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { munmap(self.base as *mut c_void, self.total) };
        }
    }
}

/// Short rows (and the losses' short rows, up to twice as long) read and write nothing past
/// their last element, at every level, with the input and the output each ending at an
/// inaccessible page, and give the same bits as in ordinary memory.
#[cfg(target_os = "linux")]
#[test]
fn short_rows_stay_inside_their_buffers() {
    fn check<T: Real + std::fmt::Debug>(rng: &mut Rng) {
        for level in simd::available_levels() {
            for n in 1..=crate::simd::SHORT_LOSS_ROW + 1 {
                for rows in [1, 3, 8, 9, 17] {
                    let batch = Batch::rows(rows, n);
                    let x: Vec<T> = (0..rows * n)
                        .map(|_| T::from_f64(rng.uniform(-20.0, 20.0)))
                        .collect();
                    let (mut gx, mut go) = (
                        guarded::Guarded::new(std::mem::size_of_val(&x[..])),
                        guarded::Guarded::new(std::mem::size_of_val(&x[..])),
                    );
                    let xg = gx.at_end(&x);
                    let alg = Algorithm::Auto;
                    let mut want = vec![T::from_f64(0.0); rows];
                    logsumexp_at(level, &x, batch, alg, &mut want).unwrap();
                    let got = go.at_end(&want);
                    logsumexp_at(level, xg, batch, alg, got).unwrap();
                    assert_eq!(got, &want[..], "{level:?} logsumexp rows={rows} n={n}");
                    let mut states = vec![LseState::EMPTY; rows];
                    lse_states_at(level, &x, batch, alg, &mut states).unwrap();
                    let mut gs = guarded::Guarded::new(rows * std::mem::size_of::<LseState>());
                    let got = gs.at_end(&states);
                    lse_states_at(level, xg, batch, alg, got).unwrap();
                    assert_eq!(got, &states[..], "{level:?} states rows={rows} n={n}");
                    for what in [Reduction::Softmax, Reduction::LogSoftmax] {
                        let mut want = vec![T::from_f64(0.0); rows * n];
                        softmax_like_at(level, &x, batch, alg, what, &mut want).unwrap();
                        let got = go.at_end(&want);
                        softmax_like_at(level, xg, batch, alg, what, got).unwrap();
                        assert_eq!(got, &want[..], "{level:?} {what:?} rows={rows} n={n}");
                    }
                    if level == simd::level() {
                        let t: Vec<i64> = (0..rows as i64).map(|r| r % n as i64).collect();
                        let xent = |x: &[T], per: &mut [T], g: &mut [T]| {
                            use crate::kernels::cross_entropy::{
                                cross_entropy, LossReduction, Targets, XentOptions,
                            };
                            let opts = XentOptions {
                                reduction: LossReduction::None,
                                ..XentOptions::default()
                            };
                            let t = Targets::Indices(&t);
                            cross_entropy(x, batch, t, &opts, Some(per), Some(g)).unwrap();
                        };
                        let mut want = vec![T::from_f64(0.0); rows];
                        let mut want_g = vec![T::from_f64(0.0); rows * n];
                        xent(&x, &mut want, &mut want_g);
                        let mut gg = guarded::Guarded::new(std::mem::size_of_val(&x[..]));
                        let (got, got_g) = (go.at_end(&want), gg.at_end(&want_g));
                        xent(xg, got, got_g);
                        assert_eq!(got, &want[..], "cross_entropy rows={rows} n={n}");
                        assert_eq!(got_g, &want_g[..], "its gradient rows={rows} n={n}");
                    }
                }
            }
        }
    }
    let mut rng = Rng::new(29);
    check::<f32>(&mut rng);
    check::<f64>(&mut rng);
}
