//! Tests of the losses against an independent float64 reference of torch's formulas.

use super::*;
use crate::kernels::tests::Rng;
use crate::kernels::LONG_ROW_BLOCK;
use crate::layout::Batch;
use crate::parallel;

/// An independent float64 re-implementation of torch's formulas (log_softmax, then the
/// weighted NLL / smoothing / probability sums, then the reduction), plus the z-loss term.
#[derive(Clone, Copy)]
struct Ref<'a> {
    x: &'a [f64],
    batch: Batch,
    weight: Option<&'a [f64]>,
    ignore: i64,
    ls: f64,
    z: f64,
    reduction: LossReduction,
}

enum RefTarget<'a> {
    Idx(&'a [i64]),
    Prob(&'a [f64]),
}

impl Ref<'_> {
    fn lane(&self, l: usize) -> Vec<f64> {
        let (o, j) = (l / self.batch.inner, l % self.batch.inner);
        (0..self.batch.n)
            .map(|k| self.x[o * self.batch.outer_stride + k * self.batch.inner + j])
            .collect()
    }
    fn w(&self, k: usize) -> f64 {
        self.weight.map_or(1.0, |w| w[k])
    }
    /// (per-lane losses, reduced loss).
    fn eval(&self, t: &RefTarget) -> (Vec<f64>, f64) {
        let c = self.batch.n as f64;
        let lanes = self.batch.count();
        let mut per = vec![0.0; lanes];
        let (mut nll_sum, mut smooth_sum, mut z_sum, mut denom, mut kept) =
            (0.0, 0.0, 0.0, 0.0, 0.0);
        for (l, p) in per.iter_mut().enumerate() {
            let x = self.lane(l);
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let logp: Vec<f64> = x.iter().map(|v| v - lse).collect();
            match t {
                RefTarget::Idx(t) => {
                    if t[l] == self.ignore {
                        continue;
                    }
                    let tl = t[l] as usize;
                    let nll = -self.w(tl) * logp[tl];
                    let smooth: f64 = -(0..x.len()).map(|k| self.w(k) * logp[k]).sum::<f64>();
                    *p = (1.0 - self.ls) * nll + self.ls / c * smooth + self.z * lse * lse;
                    nll_sum += nll;
                    smooth_sum += smooth;
                    denom += self.w(tl);
                }
                RefTarget::Prob(q) => {
                    let q = &q[l * x.len()..(l + 1) * x.len()];
                    let v: f64 = -(0..x.len())
                        .map(|k| self.w(k) * (q[k] * (1.0 - self.ls) + self.ls / c) * logp[k])
                        .sum::<f64>();
                    *p = v + self.z * lse * lse;
                    nll_sum += v;
                    denom += 1.0;
                }
            }
            z_sum += lse * lse;
            kept += 1.0;
        }
        let total = match self.reduction {
            LossReduction::Mean => {
                let base = match t {
                    RefTarget::Idx(_) => {
                        (1.0 - self.ls) * nll_sum / denom + self.ls / c * smooth_sum / denom
                    }
                    RefTarget::Prob(_) => nll_sum / denom,
                };
                base + if self.z > 0.0 {
                    self.z * z_sum / kept
                } else {
                    0.0
                }
            }
            _ => per.iter().sum(),
        };
        (per, total)
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * b.abs().max(1.0)
}

/// Probability targets in the dense layout of `batch`, lane-major for the reference.
fn random_probs(rng: &mut Rng, batch: Batch) -> (Vec<f64>, Vec<f64>) {
    let (n, inner) = (batch.n, batch.inner);
    let mut lane_major = vec![0.0; batch.elements()];
    let mut dense = vec![0.0; batch.elements()];
    for l in 0..batch.count() {
        let raw: Vec<f64> = (0..n).map(|_| rng.uniform(0.0, 1.0)).collect();
        let s: f64 = raw.iter().sum();
        let (o, j) = (l / inner, l % inner);
        for k in 0..n {
            lane_major[l * n + k] = raw[k] / s;
            dense[o * n * inner + k * inner + j] = raw[k] / s;
        }
    }
    (lane_major, dense)
}

#[allow(clippy::too_many_arguments)]
fn run(
    x: &[f64],
    batch: Batch,
    targets: Targets<'_, f64>,
    weight: Option<&[f64]>,
    ls: f64,
    z: f64,
    reduction: LossReduction,
    with_grad: bool,
) -> (f64, Vec<f64>, Vec<f64>) {
    let opts = XentOptions {
        weight,
        label_smoothing: ls,
        z_loss: z,
        reduction,
        ..XentOptions::default()
    };
    let mut per = vec![0.0; batch.count()];
    let mut grad = vec![0.0; batch.elements()];
    let total = cross_entropy(
        x,
        batch,
        targets,
        &opts,
        (reduction == LossReduction::None).then_some(&mut per[..]),
        with_grad.then_some(&mut grad[..]),
    )
    .unwrap();
    (total, per, grad)
}

#[test]
fn matches_reference_and_finite_differences_for_every_option() {
    let mut rng = Rng::new(11);
    for &(outer, n, inner) in &[(5, 7, 1), (3, 4, 5), (1, 9, 1), (2, 3, 130)] {
        let batch = Batch::contiguous(outer, n, inner);
        let x: Vec<f64> = (0..batch.elements())
            .map(|_| rng.uniform(-4.0, 4.0))
            .collect();
        let w: Vec<f64> = (0..n).map(|_| rng.uniform(0.2, 2.0)).collect();
        let mut t: Vec<i64> = (0..batch.count())
            .map(|_| (rng.next_u64() % n as u64) as i64)
            .collect();
        if t.len() > 1 {
            t[0] = -100;
        }
        let (q_lane, q_dense) = random_probs(&mut rng, batch);
        for weight in [None, Some(&w[..])] {
            for ls in [0.0, 0.3] {
                for z in [0.0, 0.05] {
                    for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None]
                    {
                        for probs in [false, true] {
                            let targets = if probs {
                                Targets::Probs(&q_dense[..])
                            } else {
                                Targets::Indices(&t[..])
                            };
                            let rt = if probs {
                                RefTarget::Prob(&q_lane)
                            } else {
                                RefTarget::Idx(&t)
                            };
                            let r = Ref {
                                x: &x,
                                batch,
                                weight,
                                ignore: -100,
                                ls,
                                z,
                                reduction,
                            };
                            let (want_per, want) = r.eval(&rt);
                            let (got, per, grad) =
                                run(&x, batch, targets, weight, ls, z, reduction, true);
                            let what = format!("{outer}x{n}x{inner} w={} ls={ls} z={z} {reduction:?} probs={probs}", weight.is_some());
                            assert!(close(got, want, 1e-13), "{what}: {got} vs {want}");
                            if reduction == LossReduction::None {
                                for (a, b) in per.iter().zip(&want_per) {
                                    assert!(close(*a, *b, 1e-13), "{what}: {a} vs {b}");
                                }
                            }
                            // Central differences of the reference's returned loss.
                            let h = 1e-5;
                            for i in 0..x.len() {
                                let mut xp = x.clone();
                                xp[i] += h;
                                let mut xm = x.clone();
                                xm[i] -= h;
                                let f = |xs: &[f64]| Ref { x: xs, ..r }.eval(&rt).1;
                                let fd = (f(&xp) - f(&xm)) / (2.0 * h);
                                assert!(
                                    (grad[i] - fd).abs() <= 1e-7 * fd.abs().max(1.0),
                                    "{what} grad[{i}]: {} vs {fd}",
                                    grad[i]
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn columns_equal_rows_of_the_transpose_bitwise() {
    // Columns are gathered into rows and run through the row code: same bits. n * inner
    // exceeds one scratch block, so blocks narrower than COLUMN_BLOCK and a ragged last
    // block are exercised too.
    let mut rng = Rng::new(13);
    for &(outer, n, inner) in &[(2, 700, 150), (3, 5, 300), (1, 70_000, 3)] {
        let cols = Batch::contiguous(outer, n, inner);
        let x: Vec<f32> = (0..cols.elements())
            .map(|_| rng.uniform(-20.0, 20.0) as f32)
            .collect();
        let t: Vec<i64> = (0..cols.count())
            .map(|l| {
                if l % 7 == 3 {
                    -100
                } else {
                    (rng.next_u64() % n as u64) as i64
                }
            })
            .collect();
        let w: Vec<f32> = (0..n).map(|k| 0.5 + (k % 5) as f32).collect();
        let mut xt = vec![0.0f32; x.len()];
        for o in 0..outer {
            for k in 0..n {
                for j in 0..inner {
                    xt[(o * inner + j) * n + k] = x[(o * n + k) * inner + j];
                }
            }
        }
        let opts = XentOptions {
            weight: Some(&w[..]),
            label_smoothing: 0.1,
            z_loss: 1e-3,
            reduction: LossReduction::None,
            ..XentOptions::default()
        };
        let rows = Batch::rows(outer * inner, n);
        let (mut pc, mut pr) = (vec![0.0f32; cols.count()], vec![0.0f32; cols.count()]);
        let (mut gc, mut gr) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        cross_entropy(
            &x,
            cols,
            Targets::Indices(&t),
            &opts,
            Some(&mut pc),
            Some(&mut gc),
        )
        .unwrap();
        cross_entropy(
            &xt,
            rows,
            Targets::Indices(&t),
            &opts,
            Some(&mut pr),
            Some(&mut gr),
        )
        .unwrap();
        assert_eq!(pc, pr, "{cols:?}");
        for o in 0..outer {
            for k in 0..n {
                for j in 0..inner {
                    let (a, b) = (gc[(o * n + k) * inner + j], gr[(o * inner + j) * n + k]);
                    assert_eq!(a.to_bits(), b.to_bits(), "{cols:?} {o} {k} {j}");
                }
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Identities of the unweighted index-target loss: it is >= 0, invariant under a shift of
    /// a row, and (without smoothing weights or z-loss) its gradient rows sum to 0 (softmax
    /// sums to 1); label smoothing keeps the gradient row sums at 0 too.
    #[test]
    fn loss_identities(
        rows in 1usize..6,
        n in 1usize..40,
        seed in 0u64..1000,
        shift in -500.0f64..500.0,
        ls in 0.0f64..1.0,
    ) {
        let mut rng = Rng::new(seed);
        let batch = Batch::rows(rows, n);
        let x: Vec<f64> = (0..rows * n).map(|_| rng.uniform(-30.0, 30.0)).collect();
        let t: Vec<i64> = (0..rows).map(|_| (rng.next_u64() % n as u64) as i64).collect();
        let opts = XentOptions {
            label_smoothing: ls,
            reduction: LossReduction::None,
            ..XentOptions::default()
        };
        let mut per = vec![0.0; rows];
        let mut g = vec![0.0; rows * n];
        cross_entropy(&x, batch, Targets::Indices(&t), &opts, Some(&mut per), Some(&mut g))
            .unwrap();
        let xs: Vec<f64> = x.iter().map(|v| v + shift).collect();
        let mut per_s = vec![0.0; rows];
        cross_entropy(&xs, batch, Targets::Indices(&t), &opts, Some(&mut per_s), None)
            .unwrap();
        for r in 0..rows {
            proptest::prop_assert!(per[r] >= 0.0);
            proptest::prop_assert!((per[r] - per_s[r]).abs() <= 1e-12 * (1.0 + shift.abs()) * 64.0);
            let row_sum: f64 = g[r * n..(r + 1) * n].iter().sum();
            proptest::prop_assert!(row_sum.abs() <= 1e-14 * n as f64, "{row_sum}");
        }
    }
}

#[test]
fn float32_rounds_once_and_sums_in_float64() {
    let mut rng = Rng::new(5);
    let batch = Batch::rows(64, 1000);
    let x32: Vec<f32> = (0..batch.elements())
        .map(|_| rng.uniform(-8.0, 8.0) as f32)
        .collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let t: Vec<i64> = (0..64).map(|i| (i * 37 % 1000) as i64).collect();
    let opts32 = XentOptions::<f32>::default();
    let opts64 = XentOptions::<f64>::default();
    let mut g32 = vec![0.0f32; x32.len()];
    let mut g64 = vec![0.0f64; x64.len()];
    let l32 = cross_entropy(
        &x32,
        batch,
        Targets::Indices(&t),
        &opts32,
        None,
        Some(&mut g32),
    )
    .unwrap();
    let l64 = cross_entropy(
        &x64,
        batch,
        Targets::Indices(&t),
        &opts64,
        None,
        Some(&mut g64),
    )
    .unwrap();
    assert_eq!(l32, l64 as f32);
    for (a, b) in g32.iter().zip(&g64) {
        assert!(
            (*a as f64 - b).abs() <= 0.5 * f32::EPSILON as f64 * b.abs() + 1e-45,
            "{a} {b}"
        );
    }
}

#[test]
fn overflow_batch_has_finite_loss_and_gradient() {
    // The demo's overflow batch: a naive softmax-then-log gives loss inf and NaN gradients.
    let x = [2.0f32, 1.0, 0.1, 1000.0, 1.0, -1000.0, 3.0, 2.0, 1.0];
    let t = [0i64, 2, 1];
    let mut g = [0.0f32; 9];
    let loss = cross_entropy(
        &x,
        Batch::rows(3, 3),
        Targets::Indices(&t),
        &XentOptions::default(),
        None,
        Some(&mut g),
    )
    .unwrap();
    let lse = |r: &[f64]| {
        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    };
    let rows: Vec<Vec<f64>> = x
        .chunks(3)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect();
    let want: f64 = (0..3)
        .map(|i| lse(&rows[i]) - rows[i][t[i] as usize])
        .sum::<f64>()
        / 3.0;
    assert!(
        loss.is_finite() && (loss as f64 - want).abs() <= 1e-6 * want,
        "{loss} {want}"
    );
    assert!((want - 667.2749).abs() < 1e-3, "{want}");
    assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    // Row 2: softmax is (1, 0, 0) and the target is class 2.
    assert_eq!(&g[3..6], &[1.0 / 3.0, 0.0, -1.0 / 3.0]);
}

#[test]
fn target_gradient_keeps_relative_accuracy_near_one() {
    // p_0 = 1 / (1 + e^-40): g_0 = p_0 - 1 = -e^-40 / (1 + e^-40) ~ -4.25e-18, not 0.
    let x = [0.0f64, -40.0];
    let mut g = [0.0; 2];
    cross_entropy(
        &x,
        Batch::rows(1, 2),
        Targets::Indices(&[0]),
        &XentOptions::default(),
        None,
        Some(&mut g),
    )
    .unwrap();
    let want = -(-40.0f64).exp() / (1.0 + (-40.0f64).exp());
    assert!(
        (g[0] - want).abs() <= 2.0 * f64::EPSILON * want.abs(),
        "{} {want}",
        g[0]
    );
    assert!((g[1] + want).abs() <= 2.0 * f64::EPSILON * want.abs());
}

#[test]
fn bit_identical_for_any_thread_count() {
    let mut rng = Rng::new(9);
    for batch in [
        Batch::rows(700, 333),
        Batch::contiguous(4, 50, 700),
        Batch::rows(1, 2 * LONG_ROW_BLOCK + 17),
    ] {
        let x: Vec<f32> = (0..batch.elements())
            .map(|_| rng.uniform(-30.0, 30.0) as f32)
            .collect();
        let t: Vec<i64> = (0..batch.count())
            .map(|_| (rng.next_u64() % batch.n as u64) as i64)
            .collect();
        let opts = XentOptions {
            label_smoothing: 0.1,
            z_loss: 1e-4,
            ..XentOptions::default()
        };
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            parallel::set_num_threads(threads);
            let mut g = vec![0.0f32; x.len()];
            let l =
                cross_entropy(&x, batch, Targets::Indices(&t), &opts, None, Some(&mut g)).unwrap();
            results.push((
                l.to_bits(),
                g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ));
        }
        parallel::set_num_threads(0);
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{batch:?}");
    }
}

#[test]
fn long_rows_match_reference() {
    let mut rng = Rng::new(4);
    let n = 2 * LONG_ROW_BLOCK + 5;
    let batch = Batch::rows(2, n);
    let x: Vec<f64> = (0..2 * n).map(|_| rng.uniform(-10.0, 10.0)).collect();
    let t = [7i64, (n - 1) as i64];
    let r = Ref {
        x: &x,
        batch,
        weight: None,
        ignore: -100,
        ls: 0.2,
        z: 0.01,
        reduction: LossReduction::Sum,
    };
    let (_, want) = r.eval(&RefTarget::Idx(&t));
    let (got, _, grad) = run(
        &x,
        batch,
        Targets::Indices(&t),
        None,
        0.2,
        0.01,
        LossReduction::Sum,
        true,
    );
    assert!(close(got, want, 1e-12), "{got} {want}");
    // Spot-check gradient entries against the closed form.
    let m = x[..n].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x[..n].iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    let c = 0.8 + 0.2 + 2.0 * 0.01 * lse;
    for k in [0usize, 7, 70_000, n - 1] {
        let p = (x[k] - lse).exp();
        let want = c * p - 0.2 / n as f64 - if k == 7 { 0.8 } else { 0.0 };
        assert!(close(grad[k], want, 1e-12), "{k}: {} {want}", grad[k]);
    }
}

#[test]
fn invalid_targets_are_reported_before_anything_is_written() {
    let x = [0.0f64; 10];
    let mut g = [7.0f64; 10];
    let mut per = [7.0f64; 2];
    let opts = XentOptions {
        reduction: LossReduction::None,
        ..XentOptions::default()
    };
    let err = cross_entropy(
        &x,
        Batch::rows(2, 5),
        Targets::Indices(&[1, 5]),
        &opts,
        Some(&mut per),
        Some(&mut g),
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::TargetOutOfRange {
            position: 1,
            value: 5,
            classes: 5
        }
    );
    assert_eq!(err.to_string(), "target[1] = 5 is outside [0, 5)");
    assert_eq!((g, per), ([7.0; 10], [7.0; 2]));
    let err = cross_entropy(
        &x,
        Batch::rows(2, 5),
        Targets::Indices(&[-1, 0]),
        &XentOptions::default(),
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        Error::TargetOutOfRange {
            position: 0,
            value: -1,
            ..
        }
    ));
    for opts in [
        XentOptions {
            label_smoothing: 1.5,
            ..XentOptions::default()
        },
        XentOptions {
            label_smoothing: f64::NAN,
            ..XentOptions::default()
        },
        XentOptions {
            z_loss: -1.0,
            ..XentOptions::default()
        },
        XentOptions {
            weight: Some(&[1.0, 2.0][..]),
            ..XentOptions::default()
        },
    ] {
        assert!(matches!(
            cross_entropy(
                &x,
                Batch::rows(2, 5),
                Targets::Indices(&[0, 0]),
                &opts,
                None,
                None
            ),
            Err(Error::InvalidOption { .. } | Error::ShapeMismatch { .. })
        ));
    }
    // ignore_index may be a valid class; it is skipped, not checked.
    let opts = XentOptions {
        ignore_index: 3,
        ..XentOptions::default()
    };
    let l = cross_entropy(
        &x,
        Batch::rows(2, 5),
        Targets::Indices(&[3, 1]),
        &opts,
        None,
        None,
    )
    .unwrap();
    assert!(close(l, 5.0f64.ln(), 1e-15));
}

#[test]
fn all_ignored_mean_is_nan_and_sum_is_zero() {
    let x = [1.0f64, 2.0, 3.0, 4.0];
    let t = [-100i64, -100];
    let mut g = [1.0; 4];
    let l = cross_entropy(
        &x,
        Batch::rows(2, 2),
        Targets::Indices(&t),
        &XentOptions {
            z_loss: 0.1,
            ..XentOptions::default()
        },
        None,
        Some(&mut g),
    )
    .unwrap();
    assert!(l.is_nan());
    assert_eq!(g, [0.0; 4]);
    let opts = XentOptions {
        reduction: LossReduction::Sum,
        ..XentOptions::default()
    };
    assert_eq!(
        cross_entropy(
            &x,
            Batch::rows(2, 2),
            Targets::Indices(&t),
            &opts,
            None,
            None
        )
        .unwrap(),
        0.0
    );
}

#[test]
fn non_finite_logits_follow_ieee() {
    let inf = f64::INFINITY;
    let opts = XentOptions {
        reduction: LossReduction::None,
        ..XentOptions::default()
    };
    let x = [inf, 1.0, 0.0, inf, f64::NAN, 0.0, -inf, -inf];
    let batch = Batch::rows(4, 2);
    let mut per = [0.0; 4];
    let mut g = [0.0; 8];
    cross_entropy(
        &x,
        batch,
        Targets::Indices(&[1, 1, 1, 0]),
        &opts,
        Some(&mut per),
        Some(&mut g),
    )
    .unwrap();
    assert_eq!(per[0], inf); // lse = +inf, target finite
    assert!(per[1].is_nan()); // lse = +inf, target +inf
    assert!(per[2].is_nan()); // NaN logit
    assert!(per[3].is_nan()); // all -inf: -inf - -inf
    assert!(g[..2].iter().all(|v| v.is_nan()));
    // A -inf off the target is fine: p = 0 there.
    let x = [0.0f64, -inf];
    let l = cross_entropy(
        &x,
        Batch::rows(1, 2),
        Targets::Indices(&[0]),
        &XentOptions::default(),
        None,
        Some(&mut g[..2]),
    )
    .unwrap();
    assert_eq!((l, g[0], g[1]), (0.0, 0.0, 0.0));
}

#[test]
fn nll_loss_matches_reference() {
    let mut rng = Rng::new(2);
    for &(outer, n, inner) in &[(6, 5, 1), (2, 4, 3)] {
        let batch = Batch::contiguous(outer, n, inner);
        let x: Vec<f64> = (0..batch.elements())
            .map(|_| rng.uniform(-5.0, 0.0))
            .collect();
        let w: Vec<f64> = (0..n).map(|k| 0.5 + k as f64).collect();
        let mut t: Vec<i64> = (0..batch.count())
            .map(|_| (rng.next_u64() % n as u64) as i64)
            .collect();
        t[1] = -100;
        let (mut num, mut den) = (0.0, 0.0);
        let mut want_per = vec![0.0; batch.count()];
        for l in 0..batch.count() {
            if t[l] == -100 {
                continue;
            }
            let (o, j) = (l / inner, l % inner);
            let tl = t[l] as usize;
            want_per[l] = -w[tl] * x[(o * n + tl) * inner + j];
            num += want_per[l];
            den += w[tl];
        }
        let mean = nll_loss(
            &x,
            batch,
            &t,
            Some(&w),
            -100,
            LossReduction::Mean,
            None,
            None,
        )
        .unwrap();
        assert!(close(mean, num / den, 1e-14));
        let mut per = vec![0.0; batch.count()];
        nll_loss(
            &x,
            batch,
            &t,
            Some(&w),
            -100,
            LossReduction::None,
            Some(&mut per),
            None,
        )
        .unwrap();
        assert_eq!(per, want_per);
        let err = nll_loss(
            &x,
            batch,
            &[0; 3],
            None,
            -100,
            LossReduction::Sum,
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }));
    }
}

#[test]
fn a_target_out_of_range_after_validation_is_never_indexed() {
    // `plan` validates every target first; a value that changes afterwards (another thread
    // writing the caller's buffer) is read as ignored rather than used as an index.
    use super::spec::{lane_target, LaneTarget};
    let t = Targets::<f64>::Indices(&[2, 3, -7, i64::MAX, -100]);
    let kinds: Vec<bool> = (0..5)
        .map(|l| matches!(lane_target(&t, l, -100, 3), LaneTarget::Class(_)))
        .collect();
    assert_eq!(kinds, [true, false, false, false, false]);
    assert!(matches!(lane_target(&t, 0, 2, 3), LaneTarget::Ignored));
}

#[test]
fn pitched_short_rows_equal_contiguous_rows_and_columns_bitwise() {
    // Short rows take the short-row kernels read in place (pitched) for both the loss and the
    // gradient; the contiguous rows and the columns of the transpose must give the same bits,
    // with several state blocks, a ragged last block and both kinds of target.
    let mut rng = Rng::new(29);
    for &n in &[1usize, 7, 33, 64, 65] {
        let (outer, pitch) = (300, n + 3);
        let x: Vec<f32> = (0..outer * pitch)
            .map(|_| rng.uniform(-30.0, 30.0) as f32)
            .collect();
        let q: Vec<f32> = (0..outer * pitch)
            .map(|_| rng.uniform(0.0, 1.0) as f32)
            .collect();
        let t: Vec<i64> = (0..outer)
            .map(|l| {
                if l % 9 == 4 {
                    -100
                } else {
                    (rng.next_u64() % n as u64) as i64
                }
            })
            .collect();
        let w: Vec<f32> = (0..n).map(|k| 0.25 + (k % 3) as f32).collect();
        let dense = |v: &[f32]| -> Vec<f32> {
            (0..outer)
                .flat_map(|o| v[o * pitch..o * pitch + n].to_vec())
                .collect()
        };
        let transpose = |v: &[f32]| -> Vec<f32> {
            let mut c = vec![0.0f32; outer * n];
            for o in 0..outer {
                for k in 0..n {
                    c[k * outer + o] = v[o * n + k];
                }
            }
            c
        };
        let (xd, qd) = (dense(&x), dense(&q));
        let (xc, qc) = (transpose(&xd), transpose(&qd));
        let opts = XentOptions {
            weight: Some(&w[..]),
            label_smoothing: 0.1,
            z_loss: 1e-3,
            reduction: LossReduction::None,
            ..XentOptions::default()
        };
        let pitched = Batch {
            outer,
            outer_stride: pitch,
            n,
            inner: 1,
        };
        let cases = [
            (pitched, &x, &q),
            (Batch::rows(outer, n), &xd, &qd),
            (Batch::contiguous(1, n, outer), &xc, &qc),
        ];
        for probs in [false, true] {
            let mut outs = Vec::new();
            for (batch, xs, qs) in cases.iter() {
                let targets = if probs {
                    Targets::Probs(&qs[..])
                } else {
                    Targets::Indices(&t)
                };
                let mut per = vec![0.0f32; outer];
                let mut g = vec![0.0f32; outer * n];
                cross_entropy(
                    &xs[..],
                    *batch,
                    targets,
                    &opts,
                    Some(&mut per),
                    Some(&mut g),
                )
                .unwrap();
                if batch.inner > 1 {
                    g = transpose_back(&g, n, outer);
                }
                let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
                outs.push((bits(&per), bits(&g)));
            }
            assert!(
                outs[0] == outs[1],
                "pitched vs contiguous, n={n} probs={probs}"
            );
            assert!(outs[1] == outs[2], "rows vs columns, n={n} probs={probs}");
        }
    }
}

/// `(n, lanes)` back to `(lanes, n)`.
fn transpose_back(g: &[f32], n: usize, lanes: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; g.len()];
    for k in 0..n {
        for l in 0..lanes {
            r[l * n + k] = g[k * lanes + l];
        }
    }
    r
}

#[test]
fn short_index_rows_match_the_reference_with_special_rows_in_every_layout() {
    // Index targets without label smoothing on rows up to twice the short-row length take
    // the fused short-row kernel: loss, "none" losses and gradient against the float64
    // reference and its analytic gradient, ragged vector groups, ignored rows, rows the
    // kernel hands back (inf, NaN, all -inf), and columns equal to rows bitwise.
    let mut rng = Rng::new(29);
    let limit = crate::simd::SHORT_LOSS_ROW;
    for n in [1, 2, 8, 10, 63, 64, 65, 100, limit, limit + 1] {
        let lanes = 37;
        let batch = Batch::rows(lanes, n);
        let mut x: Vec<f64> = (0..batch.elements())
            .map(|_| rng.uniform(-30.0, 30.0))
            .collect();
        let t: Vec<i64> = (0..lanes)
            .map(|l| {
                if l % 5 == 2 {
                    -100
                } else {
                    (rng.next_u64() % n as u64) as i64
                }
            })
            .collect();
        // Lane 3: +inf off the target (loss +inf); lane 4: NaN; lane 6: all -inf.
        let off = |l: usize| (t[l] as usize + 1) % n;
        x[3 * n + off(3)] = f64::INFINITY;
        x[4 * n] = f64::NAN;
        x[6 * n..7 * n].fill(f64::NEG_INFINITY);
        let w: Vec<f64> = (0..n).map(|k| 0.5 + (k % 3) as f64).collect();
        for weight in [None, Some(&w[..])] {
            for z in [0.0, 0.01] {
                for reduction in [LossReduction::Mean, LossReduction::None] {
                    let what = format!("n={n} w={} z={z} {reduction:?}", weight.is_some());
                    let (got, per, grad) = run(
                        &x,
                        batch,
                        Targets::Indices(&t),
                        weight,
                        0.0,
                        z,
                        reduction,
                        true,
                    );
                    let r = Ref {
                        x: &x,
                        batch,
                        weight,
                        ignore: -100,
                        ls: 0.0,
                        z,
                        reduction,
                    };
                    let want_per = r.eval(&RefTarget::Idx(&t)).0;
                    // The special lanes follow IEEE (logp = x - L): NaN totals.
                    assert!(got.is_nan(), "{what}: {got}");
                    if reduction == LossReduction::None {
                        for (l, (a, b)) in per.iter().zip(&want_per).enumerate() {
                            let b = match l {
                                3 if n > 1 => f64::INFINITY,
                                3 | 4 | 6 => f64::NAN,
                                _ => *b,
                            };
                            assert!(close(*a, b, 1e-12), "{what} lane {l}: {a} vs {b}");
                        }
                        let clean: Vec<f64> = (0..lanes)
                            .filter(|l| ![3, 4, 6].contains(l))
                            .flat_map(|l| r.lane(l))
                            .collect();
                        let tc: Vec<i64> = (0..lanes)
                            .filter(|l| ![3, 4, 6].contains(l))
                            .map(|l| t[l])
                            .collect();
                        let bc = Batch::rows(tc.len(), n);
                        for red in [LossReduction::Mean, LossReduction::Sum] {
                            let (got, _, _) = run(
                                &clean,
                                bc,
                                Targets::Indices(&tc),
                                weight,
                                0.0,
                                z,
                                red,
                                false,
                            );
                            let rc = Ref {
                                x: &clean,
                                batch: bc,
                                reduction: red,
                                ..r
                            };
                            let want = rc.eval(&RefTarget::Idx(&tc)).1;
                            assert!(close(got, want, 1e-12), "{what} {red:?}: {got} vs {want}");
                        }
                        continue;
                    }
                    // The analytic gradient of the mean: s1 w_t (p - onehot) + 2 z s2 L p.
                    let kept: Vec<usize> = (0..lanes).filter(|&l| t[l] != -100).collect();
                    let s1 = 1.0 / kept.iter().map(|&l| r.w(t[l] as usize)).sum::<f64>();
                    let s2 = 1.0 / kept.len() as f64;
                    for l in 0..lanes {
                        let g = &grad[l * n..(l + 1) * n];
                        if t[l] == -100 {
                            assert!(g.iter().all(|&v| v == 0.0), "{what} lane {l}: {g:?}");
                            continue;
                        }
                        let xl = r.lane(l);
                        let m = xl.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        if !m.is_finite() || xl.iter().any(|v| v.is_nan()) {
                            assert!(g.iter().all(|v| v.is_nan()), "{what} lane {l}: {g:?}");
                            continue;
                        }
                        let s: f64 = xl.iter().map(|v| (v - m).exp()).sum();
                        let lse = m + s.ln();
                        let tl = t[l] as usize;
                        for k in 0..n {
                            let p = (xl[k] - m).exp() / s;
                            let hot = if k == tl { 1.0 } else { 0.0 };
                            let want = s1 * r.w(tl) * (p - hot) + 2.0 * z * s2 * lse * p;
                            assert!(
                                (g[k] - want).abs() <= 1e-14 + 1e-12 * want.abs(),
                                "{what} lane {l} g[{k}]: {} vs {want}",
                                g[k]
                            );
                        }
                    }
                }
            }
        }
        // Columns (the class axis in the middle) give the rows' bits.
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let opts = XentOptions {
            z_loss: 0.01,
            reduction: LossReduction::None,
            ..XentOptions::default()
        };
        let cols = Batch::contiguous(1, n, lanes);
        let mut xc = vec![0.0f32; xf.len()];
        for l in 0..lanes {
            for k in 0..n {
                xc[k * lanes + l] = xf[l * n + k];
            }
        }
        let (mut pr, mut pc) = (vec![0.0f32; lanes], vec![0.0f32; lanes]);
        let (mut gr, mut gc) = (vec![0.0f32; xf.len()], vec![0.0f32; xf.len()]);
        let ti = Targets::Indices(&t);
        cross_entropy(&xf, batch, ti, &opts, Some(&mut pr), Some(&mut gr)).unwrap();
        cross_entropy(&xc, cols, ti, &opts, Some(&mut pc), Some(&mut gc)).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pr), bits(&pc), "n={n}");
        assert_eq!(bits(&gr), bits(&transpose_back(&gc, n, lanes)), "n={n}");
    }
}

#[test]
fn flagged_finds_every_set_flag_in_order() {
    let mut rng = Rng::new(29);
    for len in 0..200 {
        for density in [0, 1, 8, 64] {
            let redo: Vec<bool> = (0..len)
                .map(|_| density > 0 && rng.next_u64().is_multiple_of(density))
                .collect();
            let want: Vec<usize> = (0..len).filter(|&i| redo[i]).collect();
            assert_eq!(forward::flagged(&redo).collect::<Vec<_>>(), want, "{len}");
        }
    }
}
