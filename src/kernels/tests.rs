//! Scalar reference kernels against a naive float64 formula.

use super::*;

/// A small deterministic generator (xorshift64*), so tests need no extra crates.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
}

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
fn seeds_row_softmax_and_log_softmax_are_finite() {
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
