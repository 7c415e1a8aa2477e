//! The vectorised exps of every available level against float64 references.

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

/// With `STABLELSE_REQUIRE_SIMD` set (the emulated aarch64 run sets it to `neon`), the level it
/// names must be the one dispatched to; otherwise the every-level tests could quietly compare
/// scalar with scalar on a CPU or emulator that hides the instruction set.
#[test]
fn required_level_is_the_dispatched_one() {
    if let Ok(want) = std::env::var("STABLELSE_REQUIRE_SIMD") {
        assert_eq!(level().name(), want, "STABLELSE_REQUIRE_SIMD={want}");
        assert!(available_levels().iter().any(|l| l.name() == want));
    }
}

/// Error of `got` in float32 ULPs of the exact `exp(x)` (taken as float64 exp; its own error,
/// ~1e-16 relative, is far below the float32 ULP). Specials must match exactly.
fn ulp_error_f32(x: f32, got: f32) -> f64 {
    let exact = (x as f64).exp();
    if !exact.is_finite() || exact == 0.0 || x.is_nan() {
        let want = exact as f32;
        let same = (want.is_nan() && got.is_nan()) || want.to_bits() == got.to_bits();
        return if same { 0.0 } else { f64::INFINITY };
    }
    let want = exact as f32;
    if want.is_infinite() {
        return if got == want { 0.0 } else { f64::INFINITY };
    }
    // The ULP of the float32 binade holding the exact value (subnormals: 2^-149).
    let e = exact.log2().floor().max(-126.0);
    let ulp = (e - 23.0).exp2();
    ((got as f64) - exact).abs() / ulp
}

fn levels() -> Vec<Level> {
    available_levels()
}

/// Max float32 ULP error of `exp_f32` at `level` over the bit patterns `bits`.
fn max_error_over(level: Level, bits: impl Iterator<Item = u32>) -> (f64, f32) {
    let mut worst = (0.0f64, 0.0f32);
    let mut xs = Vec::with_capacity(1 << 16);
    let mut out = vec![0.0f32; 1 << 16];
    let mut flush = |xs: &mut Vec<f32>, worst: &mut (f64, f32)| {
        let out = &mut out[..xs.len()];
        exp_f32(level, xs, out);
        for (&x, &y) in xs.iter().zip(out.iter()) {
            let err = ulp_error_f32(x, y);
            if err > worst.0 {
                *worst = (err, x);
            }
        }
        xs.clear();
    };
    for b in bits {
        xs.push(f32::from_bits(b));
        if xs.len() == 1 << 16 {
            flush(&mut xs, &mut worst);
        }
    }
    flush(&mut xs, &mut worst);
    worst
}

/// Float32 bit patterns of [-104, 89], every `step`th one (negative and positive halves).
fn range_bits(step: usize) -> impl Iterator<Item = u32> {
    let neg = (0x8000_0000u32..=(-104.0f32).to_bits()).step_by(step);
    let pos = (0u32..=89.0f32.to_bits()).step_by(step);
    neg.chain(pos)
}

#[test]
fn exp_f32_dense_sample_is_within_one_ulp() {
    for level in levels() {
        let (err, x) = max_error_over(level, range_bits(97));
        assert!(err <= 1.0, "{level:?}: {err} ULP at x = {x:e}");
    }
}

#[test]
#[ignore = "exhaustive over ~2.2e9 floats; run with `cargo test --release -- --ignored`"]
fn exp_f32_exhaustive_is_within_one_ulp() {
    for level in levels() {
        let t = std::time::Instant::now();
        let (err, x) = max_error_over(level, range_bits(1));
        eprintln!(
            "exp_f32 {level:?}: max {err:.4} ULP at x = {x:e} over every float32 in [-104, 89] ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        assert!(err <= 1.0, "{level:?}: {err} ULP at x = {x:e}");
    }
}

#[test]
fn exp_specials_are_exact() {
    let xs32 = [
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        -87.5,
        -103.9,
        -104.0,
        -150.0,
        -1e30,
        88.72,
        88.73,
        1e30,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        1e-45,
    ];
    let xs64 = [
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NAN,
        0.0,
        -0.0,
        -708.5,
        -745.0,
        -746.0,
        -1e300,
        709.78,
        709.79,
        1e300,
        f64::MIN_POSITIVE,
        5e-324,
    ];
    for level in levels() {
        let mut out = [0.0f32; 16];
        exp_f32(level, &xs32, &mut out);
        for (&x, &y) in xs32.iter().zip(&out) {
            assert!(ulp_error_f32(x, y) <= 1.0, "{level:?} exp({x:e}) = {y:e}");
        }
        let mut out = [0.0f64; 14];
        exp_f64(level, &xs64, &mut out);
        for (&x, &y) in xs64.iter().zip(&out) {
            let want = x.exp();
            let ok = (want.is_nan() && y.is_nan())
                || want == y
                || (want - y).abs() <= 2.0 * f64::EPSILON * want.abs()
                || (want < 1e-300 && (want - y).abs() <= 5e-324);
            assert!(ok, "{level:?} exp({x:e}) = {y:e}, want {want:e}");
        }
    }
}

#[test]
fn exp_is_plus_zero_below_the_underflow_and_subnormal_just_above_it() {
    // The vector exps zero the lanes below the thresholds rather than computing the
    // underflow; every argument there must still give +0, and those just above the right
    // subnormal, mixed in one vector with -inf and NaN.
    use super::consts::{F32_EXP_ZERO_BELOW, F64_EXP_ZERO_BELOW};
    let t32 = F32_EXP_ZERO_BELOW;
    let xs32 = [
        t32 - 0.01,
        t32,
        t32 + 0.01,
        -103.5,
        -100.0,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0,
    ];
    let t64 = F64_EXP_ZERO_BELOW;
    let xs64 = [
        t64 - 0.01,
        t64,
        t64 + 0.01,
        -745.1,
        -740.0,
        f64::NEG_INFINITY,
        f64::NAN,
        1.0,
    ];
    for level in levels() {
        let mut out = [1.0f32; 8];
        exp_f32(level, &xs32, &mut out);
        for (&x, &y) in xs32.iter().zip(&out) {
            let want = (x as f64).exp() as f32;
            let same = (want.is_nan() && y.is_nan()) || want.to_bits() == y.to_bits();
            assert!(
                same || ulp_error_f32(x, y) <= 1.0,
                "{level:?} exp({x:e}) = {y:e}"
            );
            if x < t32 {
                assert_eq!(y.to_bits(), 0, "{level:?} exp({x:e}) = {y:e}");
            }
        }
        let mut out = [1.0f64; 8];
        exp_f64(level, &xs64, &mut out);
        for (&x, &y) in xs64.iter().zip(&out) {
            let want = x.exp();
            let ok = (want.is_nan() && y.is_nan())
                || (want - y).abs() <= 2.0 * f64::EPSILON * want.abs() + 5e-324;
            assert!(ok, "{level:?} exp({x:e}) = {y:e}, want {want:e}");
            if x < t64 {
                assert_eq!(y.to_bits(), 0, "{level:?} exp({x:e}) = {y:e}");
            }
        }
    }
}

#[test]
fn exp_f64_is_within_one_ulp_of_std() {
    // std's exp is itself within 1 ULP, so agreement to 1 ULP bounds ours by 2; the
    // construction (table exact to 0.5 ULP, q to 1e-18, one final rounding) gives < 1.
    let mut rng = Rng::new(5);
    let xs: Vec<f64> = (0..200_000)
        .map(|i| match i % 3 {
            0 => rng.uniform(-745.0, 709.7),
            1 => rng.uniform(-1.0, 1.0),
            _ => rng.uniform(-30.0, 30.0),
        })
        .collect();
    let mut out = vec![0.0; xs.len()];
    for level in levels() {
        exp_f64(level, &xs, &mut out);
        let mut worst = 0.0f64;
        for (&x, &y) in xs.iter().zip(&out) {
            let want = x.exp();
            let ulp = if want < f64::MIN_POSITIVE {
                5e-324
            } else {
                f64::EPSILON * 2f64.powi(want.log2().floor() as i32)
            };
            worst = worst.max((y - want).abs() / ulp);
        }
        assert!(worst <= 1.0, "{level:?}: {worst} ULP from std");
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn streaming_stores_write_the_same_bits_at_any_alignment() {
    if !is_available(Level::Avx512) {
        return;
    }
    let x: Vec<f32> = (0..1100).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for offset in 0..9 {
        for n in (0..40).chain([1000, 1091 - offset]) {
            let (mut a, mut b) = (vec![0.0f32; n + offset], vec![0.0f32; n + offset]);
            let (mut c, mut d) = (vec![0.0f64; n + offset], vec![0.0f64; n + offset]);
            // SAFETY: AVX-512 is available; every buffer holds offset + n elements.
            unsafe {
                let l = Level::Avx512;
                exp_scaled(
                    l,
                    x.as_ptr(),
                    Ahead::NONE,
                    a.as_mut_ptr().add(offset),
                    n,
                    3.0,
                    0.5,
                    true,
                );
                exp_scaled(
                    l,
                    x.as_ptr(),
                    Ahead::NONE,
                    b.as_mut_ptr().add(offset),
                    n,
                    3.0,
                    0.5,
                    false,
                );
                shift_sub(
                    l,
                    x64.as_ptr(),
                    Ahead::NONE,
                    c.as_mut_ptr().add(offset),
                    n,
                    3.0,
                    0.5,
                    true,
                );
                shift_sub(
                    l,
                    x64.as_ptr(),
                    Ahead::NONE,
                    d.as_mut_ptr().add(offset),
                    n,
                    3.0,
                    0.5,
                    false,
                );
            }
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{offset} {n}"
            );
            assert!(
                c.iter().zip(&d).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{offset} {n}"
            );
        }
    }
}

/// The shifted sums' exp at every level: float32-grade within 1e-10 relative (AVX2's, with its
/// 4-entry table, within 3e-11), float64 within ~1 float64 ULP; NaN stays NaN (the default NaN and a
/// widened float32 NaN with a payload), 0 gives exactly 1, and the lanes at or below the clamp
/// are 0 in a sum's map.
#[test]
fn sum_exp_is_float32_grade_on_nonpositive_arguments() {
    let t: Vec<f64> = (0..400_000)
        .flat_map(|i| {
            let base = -707.9 * (i as f64 / 400_000.0);
            (0..8).map(move |l| base - l as f64 * 1e-3)
        })
        .collect();
    let mut got = vec![0.0; t.len()];
    for level in levels() {
        for full in [false, true] {
            exp_nonpos_f64(level, &t, &mut got, full);
            let worst = t
                .iter()
                .zip(&got)
                .map(|(&t, &g)| ((g - t.exp()) / t.exp()).abs())
                .fold(0.0, f64::max);
            let bound = match (full, level) {
                (true, _) => 3e-16,
                (false, Level::Avx2) => 3e-11,
                // 1e-10 relative is 1/1000 of a float32 ULP.
                (false, _) => 1e-10,
            };
            assert!(
                worst < bound,
                "{level:?} full={full}: relative error {worst}"
            );
        }
        let payload = f64::from(f32::from_bits(0x7fc0_1234));
        let t = [
            f64::NAN,
            payload,
            f64::NEG_INFINITY,
            -1e300,
            -746.0,
            0.0,
            -0.0,
            -1e-300,
        ];
        for full in [false, true] {
            let mut g = [1.0; 8];
            exp_nonpos_f64(level, &t, &mut g, full);
            assert!(g[0].is_nan() && g[1].is_nan(), "{level:?}");
            assert_eq!(&g[2..5], &[0.0; 3], "{level:?}");
            assert_eq!(&g[5..], &[1.0; 3], "{level:?}");
        }
    }
}

/// AVX2's float32-grade exp for the shifted sums scales in the exponent bits: the same bits
/// as the general exp wherever the result is normal (t >= -708), NaN through, and the lanes
/// below the clamp finite (the sums drop them).
#[test]
#[cfg(target_arch = "x86_64")]
fn avx2_sum_exp_has_the_general_exps_bits_above_the_clamp() {
    use std::arch::x86_64::*;
    if !is_available(Level::Avx2) {
        return;
    }
    #[target_feature(enable = "avx2,fma")]
    fn run(t: &[f64; 4]) -> ([f64; 4], [f64; 4]) {
        let (mut a, mut b) = ([0.0; 4], [0.0; 4]);
        // SAFETY: the arrays hold 4 f64.
        unsafe {
            let v = _mm256_loadu_pd(t.as_ptr());
            _mm256_storeu_pd(a.as_mut_ptr(), avx2::exp_nonpos_pd(v, false));
            _mm256_storeu_pd(b.as_mut_ptr(), avx2::exp_pd(v, false));
        }
        (a, b)
    }
    for i in 0..400_000 {
        let base = -707.99 * (i as f64 / 400_000.0);
        let t: [f64; 4] = std::array::from_fn(|l| base - l as f64 * 2.5e-3);
        // SAFETY: AVX2 and FMA are available (checked above).
        let (got, want) = unsafe { run(&t) };
        for l in 0..4 {
            assert_eq!(got[l].to_bits(), want[l].to_bits(), "exp({})", t[l]);
        }
    }
    let t = [f64::NAN, f64::NEG_INFINITY, -1e300, -0.0];
    // SAFETY: as above.
    let (got, _) = unsafe { run(&t) };
    assert!(got[0].is_nan());
    assert!(got[1].is_finite() && got[1] < 1e-307 && got[2] == got[1]);
    assert_eq!(got[3], 1.0);
}

/// `select_kept` at every level gives the scalar level's bits: every length across the vector
/// widths and their tails, copies and in place, any nonzero mask byte counting as kept, NaN and
/// infinities kept as they are, masked NaN never showing.
#[test]
fn select_kept_matches_scalar_at_every_level() {
    fn check<T: Real + PartialEq + std::fmt::Debug>(to: fn(f64) -> T) {
        let mut rng = Rng::new(7);
        for n in 0..70 {
            let x: Vec<T> = (0..n)
                .map(|k| match k % 11 {
                    3 => to(f64::NAN),
                    5 => to(f64::INFINITY),
                    7 => to(f64::NEG_INFINITY),
                    _ => to(rng.uniform(-50.0, 50.0)),
                })
                .collect();
            let keep: Vec<u8> = (0..n)
                .map(|_| [0u8, 1, 2, 255][rng.next_u64() as usize % 4])
                .collect();
            let bits = |v: &[T]| v.iter().map(|t| t.to_f64().to_bits()).collect::<Vec<_>>();
            let want: Vec<T> = x
                .iter()
                .zip(&keep)
                .map(|(&v, &k)| if k != 0 { v } else { to(-3.5) })
                .collect();
            for level in levels() {
                let mut out = vec![to(0.0); n];
                // SAFETY: n elements each; out is its own buffer; the level is available.
                unsafe { select_kept(level, x.as_ptr(), keep.as_ptr(), out.as_mut_ptr(), n, -3.5) };
                assert_eq!(bits(&out), bits(&want), "{} n={n} copy", level.name());
                let mut inplace = x.clone();
                let p = inplace.as_mut_ptr();
                // SAFETY: as above, in place (allowed: equal buffers).
                unsafe { select_kept(level, p, keep.as_ptr(), p, n, -3.5) };
                assert_eq!(
                    bits(&inplace),
                    bits(&want),
                    "{} n={n} in place",
                    level.name()
                );
            }
        }
    }
    check::<f32>(|v| v as f32);
    check::<f64>(|v| v);
}

/// The `where=` row kernels reading x and the mask in place (the state, the stored-exp
/// softmax, the softmax and log_softmax writes) give at every level the bits of the same
/// kernels on the staged row (masked elements `-inf`; the softmax write with them at the max,
/// then 0): rows of one vector to several L1 blocks, tails, masked NaN and infinities, kept
/// NaN and infinities (a masked lane read, a mask byte misread in a tail or in the float32
/// max, a NaN lost by the max). A kernel may decline (`None` / `false`) only where the staged
/// row declines too or needs the reference. With every element kept the staged row holds no
/// `-inf`, so a dense stored softmax takes its exps unclamped: the same bits.
#[test]
fn kept_rows_equal_the_staged_rows_at_every_level() {
    fn check<T: Real>(to: fn(f64) -> T) {
        let mut rng = Rng::new(11);
        let bits = |v: &[T]| v.iter().map(|t| t.to_f64().to_bits()).collect::<Vec<_>>();
        for n in [1, 7, 8, 9, 16, 17, 63, 64, 65, 1000, 2048, 2049, 5003] {
            for case in 0..6 {
                let mut x: Vec<T> = (0..n).map(|_| to(rng.uniform(-30.0, 30.0))).collect();
                let mut keep: Vec<u8> = (0..n)
                    .map(|_| !rng.next_u64().is_multiple_of(10) as u8)
                    .collect();
                let k = rng.next_u64() as usize % n;
                match case {
                    1 => (x[k], keep[k]) = (to(f64::NAN), 0),
                    2 => (x[k], keep[k]) = (to(f64::INFINITY), 0),
                    3 => (x[k], keep[k]) = (to(f64::NAN), 2),
                    4 => (x[n - 1], keep[n - 1]) = (to(f64::INFINITY), 255),
                    5 => keep.fill(1),
                    _ => {}
                }
                let hide = |fill: f64| -> Vec<T> {
                    x.iter()
                        .zip(&keep)
                        .map(|(&v, &b)| if b != 0 { v } else { to(fill) })
                        .collect()
                };
                let staged = hide(f64::NEG_INFINITY);
                let (xp, kp) = (x.as_ptr(), keep.as_ptr());
                for level in levels() {
                    let name = level.name();
                    let mut e = vec![0.0; n];
                    let (mut got, mut want) = (vec![to(0.0); n], vec![to(0.0); n]);
                    // SAFETY: n elements, mask bytes and scratch each; the level is available.
                    unsafe {
                        let s = row_state(level, staged.as_ptr(), n, false, Ahead::NONE);
                        if let Some(k) = kept_row_state(level, xp, kp, n, Ahead::NONE) {
                            assert_eq!(
                                (k.max.to_bits(), k.excess.to_bits()),
                                (s.max.to_bits(), s.excess.to_bits()),
                                "{name} n={n} case {case} state"
                            );
                        } else {
                            assert!(level == Level::Scalar || !s.max.is_finite(), "{name} n={n}");
                        }
                        let a = softmax_stored(
                            level,
                            xp,
                            Ahead::NONE,
                            kp,
                            got.as_mut_ptr(),
                            n,
                            e.as_mut_ptr(),
                            false,
                        );
                        let null = std::ptr::null();
                        let b = softmax_stored(
                            level,
                            staged.as_ptr(),
                            Ahead::NONE,
                            null,
                            want.as_mut_ptr(),
                            n,
                            e.as_mut_ptr(),
                            false,
                        );
                        assert_eq!(a, b, "{name} n={n} case {case} stored");
                        if a {
                            assert_eq!(bits(&got), bits(&want), "{name} n={n} case {case} stored");
                        }
                        if !s.max.is_finite() {
                            continue;
                        }
                        let scale = 1.0 / s.total();
                        kept_exp_scaled(level, xp, kp, got.as_mut_ptr(), n, s.max, scale, false);
                        let at_max = hide(s.max);
                        exp_scaled(
                            level,
                            at_max.as_ptr(),
                            Ahead::NONE,
                            want.as_mut_ptr(),
                            n,
                            s.max,
                            scale,
                            false,
                        );
                        for (w, &b) in want.iter_mut().zip(&keep) {
                            if b == 0 {
                                *w = to(0.0);
                            }
                        }
                        assert_eq!(bits(&got), bits(&want), "{name} n={n} case {case} exp");
                        let lt = s.log_total();
                        kept_shift_sub(level, xp, kp, got.as_mut_ptr(), n, s.max, lt, false);
                        shift_sub(
                            level,
                            staged.as_ptr(),
                            Ahead::NONE,
                            want.as_mut_ptr(),
                            n,
                            s.max,
                            lt,
                            false,
                        );
                        assert_eq!(bits(&got), bits(&want), "{name} n={n} case {case} log");
                    }
                }
            }
        }
    }
    check::<f32>(|v| v as f32);
    check::<f64>(|v| v);
}

/// Short rows (one per lane) whose max sits in several columns, with `-inf`, `+inf` and NaN
/// moved through every column position, for every `n` up to [`SHORT_ROW`], against the
/// scalar reference at every level: the tie count (kept apart from the sum), a dropped or
/// doubled exp, a stored exp of a `-inf` lane, or a NaN/inf row not redone each show as an
/// error far above the tolerance. Rows with small integer values hold many ties; one has
/// every other term under `e^-27` (float32-grade rows must sum it again with the ties apart).
#[test]
fn short_rows_with_ties_and_specials_at_every_column_match_scalar() {
    let mut rng = Rng::new(91);
    let rows = 11;
    for n in 1..=SHORT_ROW {
        for p in 0..n {
            let mut x = vec![0.0f64; rows * n];
            for (i, v) in x.iter_mut().enumerate() {
                *v = if (i / n) % 2 == 0 {
                    rng.uniform(-3.0, 2.0).round()
                } else {
                    rng.uniform(-20.0, 20.0)
                };
            }
            let row = |r: usize| r * n;
            x[row(0)..row(1)].fill(1.5); // every column a tie
            x[row(1) + p] = 40.0; // the max at p and at the column after
            x[row(1) + (p + 1) % n] = 40.0;
            x[row(3) + p] = f64::NEG_INFINITY;
            x[row(4) + p] = f64::NAN;
            x[row(5) + p] = f64::INFINITY;
            x[row(6) + p] = f64::NEG_INFINITY; // -inf in a row of integer ties
            x[row(7)..row(8)].fill(f64::NEG_INFINITY);
            x[row(9) + p] = 25.0; // a lone max, the last column stays below it
            x[row(10) + p] = 30.0; // a lone max whose excess a whole sum cannot know
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            for level in levels() {
                check_short_rows(level, &x, n, rows, 1e-14, |a, b| agree(a, b, 1e-13));
                check_short_rows(level, &x32, n, rows, 1e-9, |a, b| {
                    (a.is_nan() && b.is_nan())
                        || (a as f32).to_bits().abs_diff((b as f32).to_bits()) <= 1
                });
            }
        }
    }
}

fn agree(a: f64, b: f64, rel: f64) -> bool {
    (a.is_nan() && b.is_nan())
        || a == b
        || (a - b).abs() <= rel * a.abs().max(b.abs())
        || (a - b).abs() < 1e-300
}

/// The short-row states, logsumexps, softmax and log_softmax of `rows` rows of `n` at
/// `level` against [`Level::Scalar`]: the max equal, the rest within `rel` (states) or as
/// `same` says (outputs).
fn check_short_rows<T: crate::real::Real>(
    level: Level,
    x: &[T],
    n: usize,
    rows: usize,
    rel: f64,
    same: impl Fn(f64, f64) -> bool,
) {
    let run = |lv: Level| {
        let mut st = vec![LseState::EMPTY; rows];
        let mut lse = vec![T::from_f64(0.0); rows];
        let mut sm = vec![T::from_f64(0.0); rows * n];
        let mut lsm = vec![T::from_f64(0.0); rows * n];
        // SAFETY: rows * n readable elements; every output holds what it is given.
        unsafe {
            short_rows_states(lv, x.as_ptr(), rows, n, n, &mut st);
            short_rows_logsumexp(lv, x.as_ptr(), rows, n, n, lse.as_mut_ptr());
            short_rows_softmax(lv, x.as_ptr(), rows, n, n, sm.as_mut_ptr(), false);
            short_rows_softmax(lv, x.as_ptr(), rows, n, n, lsm.as_mut_ptr(), true);
        }
        (st, lse, sm, lsm)
    };
    let (a, b) = (run(level), run(Level::Scalar));
    for r in 0..rows {
        let (p, q) = (a.0[r], b.0[r]);
        // `==`: which of `-0.0` and `0.0` a row's max is depends on the order of its compares.
        let same_max = p.max == q.max || (p.max.is_nan() && q.max.is_nan());
        assert!(same_max, "{level:?} n={n} row {r}: {p:?} {q:?}");
        if p.max.is_finite() {
            assert!(
                agree(p.excess, q.excess, rel),
                "{level:?} n={n} row {r}: {p:?} {q:?}"
            );
        }
        let (u, v) = (a.1[r].to_f64(), b.1[r].to_f64());
        assert!(same(u, v), "{level:?} n={n} row {r}: lse {u} {v}");
    }
    for (i, ((s, t), (u, v))) in a.2.iter().zip(&b.2).zip(a.3.iter().zip(&b.3)).enumerate() {
        let (s, t, u, v) = (s.to_f64(), t.to_f64(), u.to_f64(), v.to_f64());
        assert!(same(s, t), "{level:?} n={n} softmax [{i}]: {s} {t}");
        assert!(same(u, v), "{level:?} n={n} log_softmax [{i}]: {u} {v}");
    }
}

/// A row that hints the next one into cache ([`Ahead`]) computes the same bits as one that
/// hints nothing, whether the hinted row is the real next one or lies past the end of the
/// allocation (a hint never faults): states, kept terms and every row write, unmasked and
/// read in place beside a mask (with the next row's mask bytes hinted too).
#[test]
fn hinting_the_next_row_changes_no_bits() {
    fn check<T: crate::real::Real>(level: Level, rng: &mut Rng) {
        let b = T::BLOCK;
        for n in [100, 1000, b + 1, 3 * b + 5] {
            let buf: Vec<T> = (0..2 * n)
                .map(|_| T::from_f64(rng.uniform(-30.0, 30.0)))
                .collect();
            let mask: Vec<u8> = (0..2 * n).map(|k| u8::from(k % 7 != 3)).collect();
            let (x, keep) = (buf.as_ptr(), mask.as_ptr());
            let hints = [
                Ahead::NONE,
                Ahead::row(x.wrapping_add(n)),
                Ahead {
                    x: x.wrapping_add(n),
                    keep: keep.wrapping_add(n),
                },
                Ahead {
                    x: x.wrapping_add(2 * n),
                    keep: keep.wrapping_add(2 * n),
                },
            ];
            let run = |next: Ahead<T>, keep: *const u8| {
                let mut terms = vec![0.0f64; n];
                let (mut sm, mut e) = (vec![T::from_f64(0.0); n], vec![0.0f64; n]);
                let (mut es, mut ss) = (vec![T::from_f64(0.0); n], vec![T::from_f64(0.0); n]);
                // SAFETY: x and the mask hold 2n elements; every buffer holds n.
                unsafe {
                    let st = if keep.is_null() {
                        row_state(level, x, n, false, next)
                    } else {
                        kept_row_state(level, x, keep, n, next).unwrap_or(LseState::EMPTY)
                    };
                    let kept = row_state_stored(level, (x, next), keep, n, terms.as_mut_ptr());
                    let (out, e) = (sm.as_mut_ptr(), e.as_mut_ptr());
                    let stored = softmax_stored(level, x, next, keep, out, n, e, false);
                    if keep.is_null() {
                        exp_scaled(level, x, next, es.as_mut_ptr(), n, st.max, 0.5, false);
                        shift_sub(level, x, next, ss.as_mut_ptr(), n, st.max, 0.25, false);
                    } else {
                        let (es, ss) = (es.as_mut_ptr(), ss.as_mut_ptr());
                        kept_exp_scaled(level, x, keep, es, n, st.max, 0.5, false);
                        kept_shift_sub(level, x, keep, ss, n, st.max, 0.25, false);
                    }
                    let bits = |v: &[T]| v.iter().map(|t| t.to_f64().to_bits()).collect::<Vec<_>>();
                    let kept = kept.map(|(s, from)| (s.max.to_bits(), s.excess.to_bits(), from));
                    let state = (st.max.to_bits(), st.excess.to_bits());
                    let terms: Vec<u64> = terms.iter().map(|t| t.to_bits()).collect();
                    (state, kept, terms, stored, bits(&sm), bits(&es), bits(&ss))
                }
            };
            for keep in [std::ptr::null(), keep] {
                let want = run(Ahead::NONE, keep);
                for next in &hints[1..] {
                    assert!(run(*next, keep) == want, "{} {n}", level.name());
                }
            }
        }
    }
    let mut rng = Rng::new(41);
    for level in levels() {
        check::<f32>(level, &mut rng);
        check::<f64>(level, &mut rng);
    }
}

/// The exps a row's state pass keeps give the states and the scaled writes of the two-exp path,
/// bit for bit, at every level: rows of one and of many blocks whose max comes early, late or
/// in the middle, every tail length, ties, `-inf` (a whole block of it too) and terms far below
/// the float32-grade clamp; rows the kept path declines (a non-finite max, the scalar level)
/// say so.
#[test]
fn kept_terms_give_the_two_exp_bits_at_every_level() {
    fn check<T: crate::real::Real>(level: Level, rng: &mut Rng) {
        let b = T::BLOCK;
        let lens = (65..=b)
            .step_by(37)
            .chain([b - 1, b, b + 1, 3 * b + 5, 9 * b]);
        for (c, n) in lens.enumerate() {
            let spread = [3.0, 40.0, 1500.0][c % 3];
            let mut x: Vec<T> = (0..n)
                .map(|_| T::from_f64(rng.uniform(-spread, spread)))
                .collect();
            x[n / 2] = T::NEG_INFINITY;
            x[n / 3] = x[n / 5];
            // The max in the first, a middle or the last block.
            let top = [0, n / 2, n - 1][c % 3];
            x[top] = T::from_f64(spread + 1.0);
            if n > 4 * b {
                x[b..2 * b].fill(T::NEG_INFINITY);
            }
            let mut terms = vec![0.0f64; n];
            // SAFETY: x holds n elements, terms n.
            let kept = unsafe {
                row_state_stored(
                    level,
                    (x.as_ptr(), Ahead::NONE),
                    std::ptr::null(),
                    n,
                    terms.as_mut_ptr(),
                )
            };
            // SAFETY: as above.
            let want = unsafe { row_state(level, x.as_ptr(), n, false, Ahead::NONE) };
            let Some((st, from)) = kept else {
                assert_eq!(level, Level::Scalar, "{n}");
                continue;
            };
            assert_eq!(
                (st.max.to_bits(), st.excess.to_bits()),
                (want.max.to_bits(), want.excess.to_bits()),
                "{} {n}",
                level.name()
            );
            assert!(from <= top && from % b == 0, "{} {n}: {from}", level.name());
            let scale = 0.37 / st.total();
            let (mut a, mut e) = (vec![T::from_f64(0.0); n], vec![T::from_f64(0.0); n]);
            // SAFETY: every buffer holds n elements.
            unsafe {
                scaled_terms(
                    level,
                    terms[from..].as_ptr(),
                    a[from..].as_mut_ptr(),
                    (n - from, scale),
                    false,
                );
                exp_scaled(
                    level,
                    x.as_ptr(),
                    Ahead::NONE,
                    e.as_mut_ptr(),
                    n,
                    st.max,
                    scale,
                    false,
                );
            }
            for k in from..n {
                assert_eq!(
                    a[k].to_f64().to_bits(),
                    e[k].to_f64().to_bits(),
                    "{} {n} {k}",
                    level.name()
                );
            }
            x[n / 4] = T::from_f64(f64::NAN);
            // SAFETY: as above.
            let nan = unsafe {
                row_state_stored(
                    level,
                    (x.as_ptr(), Ahead::NONE),
                    std::ptr::null(),
                    n,
                    terms.as_mut_ptr(),
                )
            };
            assert!(
                nan.is_none_or(|(s, _)| s.excess.is_nan()),
                "{} {n}",
                level.name()
            );
        }
    }
    let mut rng = Rng::new(41);
    for level in levels() {
        check::<f32>(level, &mut rng);
        check::<f64>(level, &mut rng);
    }
}

/// float32-grade rows are summed whole (ties and all) and summed again with the ties apart
/// where the whole sum cannot know the excess: rows of one and of many blocks whose other terms
/// are all tiny beside a lone max (`[0, -40, ...]`, excess ~4e-18 per element, lost to the
/// rounding of `1 + excess` if the retry were missing), with two tied maxima (excess >= 1),
/// and at the threshold between the two (others at -12 and -17), against the scalar reference
/// at every level: the excess to 1e-9 relative.
#[test]
fn peaked_rows_keep_their_tiny_excess_at_every_level() {
    let b = <f32 as crate::real::Real>::BLOCK;
    for n in [65, 100, 1000, b - 1, b, b + 1, 3 * b + 5] {
        for (case, below) in [-40.0f32, -12.0, -17.0, -40.0].into_iter().enumerate() {
            let mut x = vec![below; n];
            for top in [0, n / 2, n - 1] {
                x[top] = 0.5;
                if case == 3 {
                    x[(top + 7) % n] = 0.5;
                }
                // SAFETY: x holds n elements.
                let want = unsafe { scalar::lse_state_two_pass(x.as_ptr(), 0, n, 1) };
                for level in levels() {
                    // SAFETY: as above.
                    let got = unsafe { row_state(level, x.as_ptr(), n, false, Ahead::NONE) };
                    assert_eq!(got.max, want.max, "{} n={n} case {case}", level.name());
                    assert!(
                        agree(got.excess, want.excess, 1e-9),
                        "{} n={n} case {case} top {top}: {got:?} {want:?}",
                        level.name()
                    );
                }
                x[top] = below;
                x[(top + 7) % n] = below;
            }
        }
    }
}

/// The vector `log1p` of the x86 levels (the short rows' `max + log1p(excess)`) against std's
/// over `[0, 1e300]`: the full grade within 4 float64 ULP (3 seen where `k ln2 + log f`
/// cancels, e near 0.46), the float32 grade within 2e-12 relative; 0, +inf and NaN exact.
#[test]
#[cfg(target_arch = "x86_64")]
fn vector_log1p_meets_each_grade_against_std() {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx2,fma")]
    fn avx2_run(e: &[f64; 4], full: bool) -> [f64; 4] {
        let mut out = [0.0; 4];
        // SAFETY: both arrays hold 4 f64.
        unsafe {
            _mm256_storeu_pd(
                out.as_mut_ptr(),
                avx2::log1p_pd(_mm256_loadu_pd(e.as_ptr()), full),
            )
        };
        out
    }
    #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,popcnt")]
    fn avx512_run(e: &[f64; 4], full: bool) -> [f64; 4] {
        let mut buf = [0.0; 8];
        buf[..4].copy_from_slice(e);
        // SAFETY: buf holds 8 f64.
        unsafe {
            _mm512_storeu_pd(
                buf.as_mut_ptr(),
                avx512::log1p_pd(_mm512_loadu_pd(buf.as_ptr()), full),
            )
        };
        [buf[0], buf[1], buf[2], buf[3]]
    }
    type Run = fn(&[f64; 4], bool) -> [f64; 4];
    let mut runs: Vec<(&str, Run)> = Vec::new();
    if is_available(Level::Avx2) {
        // SAFETY (both): the level's features were detected.
        runs.push(("avx2", |e, full| unsafe { avx2_run(e, full) }));
    }
    if is_available(Level::Avx512) {
        runs.push(("avx512", |e, full| unsafe { avx512_run(e, full) }));
    }
    let ulp = |v: f64| f64::from_bits(v.to_bits() + 1) - v;
    let mut rng = Rng::new(7);
    for (name, run) in runs
        .iter()
        .flat_map(|&(n, r)| [((n, true), r), ((n, false), r)])
    {
        let (name, full) = name;
        let run = |e: &[f64; 4]| run(e, full);
        let near = |got: f64, want: f64| {
            if full {
                (got - want).abs() <= 4.0 * ulp(want)
            } else {
                (got - want).abs() <= 2e-12 * want
            }
        };
        for i in 0..200_000 {
            // Magnitudes from 1e-320 to 1e300, and the ranges around sqrt(2) - 1, 0.5 (the
            // table's edges) and 1.
            let e: [f64; 4] = std::array::from_fn(|l| match (i + l) % 4 {
                0 => 10f64.powf(rng.uniform(-320.0, 300.0)),
                1 => rng.uniform(0.3, 0.5),
                2 => rng.uniform(0.45, 0.55),
                _ => rng.uniform(0.0, 3.0),
            });
            let got = run(&e);
            for l in 0..4 {
                let want = e[l].ln_1p();
                assert!(
                    near(got[l], want),
                    "{name} full {full} log1p({}) = {} vs {want}",
                    e[l],
                    got[l]
                );
            }
        }
        let got = run(&[0.0, f64::INFINITY, f64::NAN, 5e-324]);
        assert_eq!(
            (got[0], got[1], got[3]),
            (0.0, f64::INFINITY, 5e-324),
            "{name}"
        );
        assert!(got[2].is_nan(), "{name}");
    }
}

#[test]
fn transpose_moves_every_element_at_every_level() {
    fn check<T: Real>(level: Level) {
        for (rows, cols) in [
            (0, 5),
            (3, 0),
            (1, 1),
            (8, 8),
            (9, 17),
            (16, 24),
            (23, 7),
            (100, 10),
        ] {
            let (src_stride, dst_stride) = (cols + 3, rows + 2);
            let src: Vec<T> = (0..rows * src_stride)
                .map(|i| T::from_f64(i as f64 * 0.5 - 7.0))
                .collect();
            let mut dst = vec![T::from_f64(f64::NAN); cols * dst_stride];
            // SAFETY: src holds rows lines of src_stride, dst cols lines of dst_stride.
            unsafe {
                let (s, d) = ((src.as_ptr(), src_stride), (dst.as_mut_ptr(), dst_stride));
                transpose(level, s, d, rows, cols);
            }
            for c in 0..cols {
                for r in 0..dst_stride {
                    let got = dst[c * dst_stride + r].to_f64();
                    if r < rows {
                        let want = src[r * src_stride + c].to_f64();
                        assert_eq!(got, want, "{} {rows}x{cols} ({r}, {c})", level.name());
                    } else {
                        // Past the block: untouched.
                        assert!(got.is_nan(), "{} {rows}x{cols} ({r}, {c})", level.name());
                    }
                }
            }
        }
    }
    for level in levels() {
        check::<f32>(level);
        check::<f64>(level);
    }
}

/// The float32 max and min of one pass ([`Lanes::range_of`]) at every level, against a plain
/// scan: every length to 70 (whole vectors and the tails), the extremes first, last and inside.
/// A level that takes no min reports `-inf` for it.
#[test]
fn range_of_is_the_rows_max_and_min() {
    let mut rng = Rng::new(11);
    for level in levels() {
        for n in 1..=70usize {
            for at in [0, n - 1, n / 2] {
                let mut x: Vec<f32> = (0..n).map(|_| rng.uniform(-5.0, 5.0) as f32).collect();
                x[at] = 9.5;
                x[n - 1 - at] = -9.5;
                let top = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let least = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let p = x.as_ptr();
                // SAFETY: n readable elements at p; the level is available.
                let got = unsafe {
                    run_kernel!(level, { p: *const T, n: usize } -> (f64, f64),
                    |l| l.range_of(p, n),
                    scalar: {
                        let top = (0..n).fold(f64::NEG_INFINITY, |m, k| m.max((*p.add(k)).to_f64()));
                        (top, f64::NEG_INFINITY)
                    })
                };
                assert_eq!(got.0, f64::from(top), "{level:?} n={n} at={at}");
                let want = [f64::from(least), f64::NEG_INFINITY];
                assert!(want.contains(&got.1), "{level:?} n={n} at={at}: {got:?}");
                // The level's steps themselves (the widening defaults where a level takes no
                // min), over the whole steps that fit.
                // SAFETY: as above; every step reads 2N elements inside the n.
                let (steps, stepped) = unsafe {
                    run_kernel!(level, { p: *const T, n: usize } -> (Option<(f32, f32)>, usize),
                    |l| {
                        let step = 2 * lane_count(l);
                        let mut acc = l.range_init();
                        let mut i = 0;
                        while i + step <= n {
                            acc = l.range_step(acc, (p as *const f32).add(i));
                            i += step;
                        }
                        ((i > 0).then(|| l.range_finish(acc)), i)
                    },
                    scalar: (None, 0))
                };
                if let Some((m, low)) = steps {
                    let part = &x[..stepped];
                    assert_eq!(m, part.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)));
                    assert_eq!(low, part.iter().fold(f32::INFINITY, |a, &v| a.min(v)));
                }
            }
        }
    }
}

/// `L::N` of a level's value (for the tests' generic closures).
fn lane_count<L: Lanes>(_: L) -> usize {
    L::N
}

#[test]
fn bucket_codes_encode_each_row_from_its_id_at_every_level() {
    // Ids over 5 buckets of 2^12 segments (the last one partial), values with NaN and -0.
    let (bits, n) = (12u32, 4 * 4096 + 1000);
    let rows = 1000;
    let ids: Vec<i64> = (0..rows).map(|r| ((r * 7919) % n) as i64).collect();
    let x: Vec<f32> = (0..rows)
        .map(|r| match r % 97 {
            0 => f32::NAN,
            1 => -0.0,
            _ => r as f32 / 7.0 - 60.0,
        })
        .collect();
    for level in available_levels() {
        let (mut bucket, mut code) = (vec![0u8; rows], vec![0u64; rows]);
        let key = (bits, n as u64, 4u8);
        assert!(bucket_codes(level, &x, &ids, key, &mut bucket, &mut code));
        for r in 0..rows {
            let id = ids[r] as u64;
            assert_eq!(u64::from(bucket[r]), id >> bits, "{level:?} row {r}");
            let want = u64::from(x[r].to_bits()) | ((id & 0xFFF) << 32) | ((r as u64) << 48);
            assert_eq!(code[r], want, "{level:?} row {r}");
        }
        // An id out of range, negative or too large, is reported; the buckets stay in range.
        for bad in [-1i64, n as i64, i64::MAX] {
            let mut with = ids.clone();
            with[rows / 2] = bad;
            assert!(!bucket_codes(level, &x, &with, key, &mut bucket, &mut code));
            assert!(bucket.iter().all(|&b| b <= 4), "{level:?} {bad}");
        }
    }
}
