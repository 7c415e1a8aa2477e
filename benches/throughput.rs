//! Headline GB/s figures next to the machine's DRAM bandwidth, measured in the same run.
//!
//! `cargo bench --bench throughput` (optionally `-- avx512` / `-- avx2` / `-- scalar` to pick
//! levels, default: all available). GB/s = bytes the op must read (+ write) / best time of
//! several runs; the DRAM ceilings come from the crate's bandwidth probe (`stablelse::probe`,
//! the one `python -m stablelse bench` uses), over a footprint several times the last-level
//! cache, on all threads.

use stablelse::kernels::{logsumexp_at, softmax_like_at, Algorithm, Reduction};
use stablelse::probe::{dram_probe_bytes, Probe};
use stablelse::simd::{available_levels, Level};
use stablelse::Batch;
use std::hint::black_box;
use std::time::Instant;

const REPS: usize = 11;

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn data(len: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 40.0 - 20.0
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let levels: Vec<Level> = available_levels()
        .into_iter()
        .filter(|l| {
            !args.iter().any(|a| Level::parse(a).is_some()) || args.iter().any(|a| a == l.name())
        })
        .collect();
    let threads = stablelse::parallel::num_threads();
    println!(
        "threads: {threads}, levels: {:?}",
        levels.iter().map(|l| l.name()).collect::<Vec<_>>()
    );

    if args.iter().any(|a| a == "flat") {
        flat(&levels);
        return;
    }
    if args.iter().any(|a| a == "sweep") {
        sweep(&levels);
        return;
    }
    if args.iter().any(|a| a == "cache") {
        in_cache(&levels);
        return;
    }
    let big = 1usize << 26; // 256 MiB of f32
    let x = data(big);
    let mut out = vec![0.0f32; big];
    let probe_bytes = dram_probe_bytes();
    let mut probe = Probe::new(probe_bytes).expect("memory for the bandwidth probe");
    let read = probe.read(REPS);
    let rw = probe.read_write(REPS);
    println!(
        "DRAM ceiling ({} MiB): read {read:.1} GB/s, read+write {rw:.1} GB/s",
        probe_bytes >> 20
    );

    struct Case {
        name: &'static str,
        rows: usize,
        n: usize,
        softmax: bool,
        alg: Algorithm,
    }
    // Reductions down axis 0 (the column kernel), on the same 256 MiB.
    for level in &levels {
        for (n, inner) in [(2048usize, 32768usize), (1 << 16, 1024), (1 << 22, 16)] {
            let mut o = vec![0.0f32; inner];
            let t = best_of(REPS, || {
                let b = Batch::contiguous(1, n, inner);
                logsumexp_at(*level, &x[..n * inner], b, Algorithm::Auto, &mut o).unwrap();
                black_box(&o);
            });
            let gbs = 4.0 * (n * inner) as f64 / t / 1e9;
            println!(
                "{:>7} logsumexp axis=0 {n}x{inner:<13} {:>8.2} ms {gbs:>7.1} GB/s  ({:.2} of the read ceiling)",
                level.name(),
                t * 1e3,
                gbs / read
            );
        }
    }
    let cases = [
        Case {
            name: "logsumexp 2048x32768",
            rows: 2048,
            n: 32768,
            softmax: false,
            alg: Algorithm::TwoPass,
        },
        Case {
            name: "logsumexp 2048x32768 online",
            rows: 2048,
            n: 32768,
            softmax: false,
            alg: Algorithm::Online,
        },
        Case {
            name: "logsumexp 1x2^26",
            rows: 1,
            n: 1 << 26,
            softmax: false,
            alg: Algorithm::TwoPass,
        },
        Case {
            name: "logsumexp 2^22x10",
            rows: 1 << 22,
            n: 10,
            softmax: false,
            alg: Algorithm::TwoPass,
        },
        Case {
            name: "softmax 2048x32768 (out=)",
            rows: 2048,
            n: 32768,
            softmax: true,
            alg: Algorithm::TwoPass,
        },
        Case {
            name: "softmax 2^21x32",
            rows: 1 << 21,
            n: 32,
            softmax: true,
            alg: Algorithm::TwoPass,
        },
        Case {
            name: "softmax 64x4096 (in L2)",
            rows: 64,
            n: 4096,
            softmax: true,
            alg: Algorithm::TwoPass,
        },
    ];
    for level in &levels {
        for c in &cases {
            let len = c.rows * c.n;
            let xs = &x[..len];
            let batch = Batch::rows(c.rows, c.n);
            let (bytes, t) = if c.softmax {
                let o = &mut out[..len];
                let reps = if len < (1 << 20) { 2000 } else { REPS };
                let t = best_of(reps, || {
                    softmax_like_at(*level, xs, batch, c.alg, Reduction::Softmax, o).unwrap();
                });
                (8.0 * len as f64, t)
            } else {
                let mut o = vec![0.0f32; c.rows];
                let t = best_of(REPS, || {
                    logsumexp_at(*level, xs, batch, c.alg, &mut o).unwrap();
                    black_box(&o);
                });
                (4.0 * len as f64, t)
            };
            let gbs = bytes / t / 1e9;
            let ceiling = if c.softmax { rw } else { read };
            println!(
                "{:>7} {:<30} {:>8.2} ms {:>7.1} GB/s  ({:.2} of the {} ceiling)",
                level.name(),
                c.name,
                t * 1e3,
                gbs,
                gbs / ceiling,
                if c.softmax { "read+write" } else { "read" }
            );
        }
    }
    // The ceiling again, after the kernels: neighbours on a shared machine move it.
    println!("DRAM read again: {:.1} GB/s", probe.read(REPS));
}

/// The compute ceiling of each kernel: one thread, 256 KiB of float32 that stays in L2,
/// best of many runs (`cargo bench --bench throughput -- cache`). On x86-64 with AVX2 and FMA,
/// first the machine's: a plain logsumexp loop with no accuracy goal ([`plain`]).
fn in_cache(levels: &[Level]) {
    stablelse::parallel::set_num_threads(1);
    let (rows, n) = (16, 4096);
    let len = rows * n;
    let x = data(len);
    let mut out = vec![0.0f32; len];
    let mut lse = vec![0.0f32; rows];
    let gbs = |bytes: usize, t: f64| bytes as f64 / t / 1e9;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected.
        let t = best_of(300, || unsafe {
            plain::logsumexp_rows(black_box(&x), n, &mut lse)
        });
        println!(
            "   plain logsumexp (f32 exp, f64 sums) 16x4096 in L2, 1 thread: {:>6.1} GB/s, {:.2} ns/element",
            gbs(4 * len, t),
            t * 1e9 / len as f64
        );
    }
    for &level in levels {
        for (name, alg) in [
            ("two_pass", Algorithm::TwoPass),
            ("online", Algorithm::Online),
        ] {
            let t = best_of(300, || {
                logsumexp_at(level, &x, Batch::rows(rows, n), alg, &mut lse).unwrap();
                black_box(&lse);
            });
            println!(
                "{:>7} logsumexp {name:<9} 16x4096 in L2, 1 thread: {:>6.1} GB/s, {:.2} ns/element",
                level.name(),
                gbs(4 * len, t),
                t * 1e9 / len as f64
            );
        }
        for (name, what) in [
            ("softmax", Reduction::Softmax),
            ("log_softmax", Reduction::LogSoftmax),
        ] {
            let t = best_of(300, || {
                softmax_like_at(
                    level,
                    &x,
                    Batch::rows(rows, n),
                    Algorithm::TwoPass,
                    what,
                    &mut out,
                )
                .unwrap();
            });
            println!(
                "{:>7} {name:<19} 16x4096 in L2, 1 thread: {:>6.1} GB/s, {:.2} ns/element",
                level.name(),
                gbs(8 * len, t),
                t * 1e9 / len as f64
            );
        }
        for (n, inner) in [(256usize, 256usize), (64, 1024), (4096, 16), (16, 4096)] {
            let t = best_of(300, || {
                let b = Batch::contiguous(1, n, inner);
                logsumexp_at(
                    level,
                    &x[..n * inner],
                    b,
                    Algorithm::Auto,
                    &mut out[..inner],
                )
                .unwrap();
            });
            println!(
                "{:>7} logsumexp axis=0 {n}x{inner} in L2, 1 thread: {:.2} ns/element",
                level.name(),
                t * 1e9 / (n * inner) as f64
            );
        }
        let t = best_of(300, || {
            stablelse::simd::exp_f32(level, black_box(&x), &mut out)
        });
        println!(
            "{:>7} exp_f32             65536 in L2, 1 thread: {:>6.1} GB/s, {:.2} ns/element",
            level.name(),
            gbs(8 * len, t),
            t * 1e9 / len as f64
        );
        for (n, rows) in [
            (4usize, 16384usize),
            (10, 6553),
            (16, 4096),
            (32, 2048),
            (64, 1024),
        ] {
            let t = best_of(300, || {
                logsumexp_at(
                    level,
                    &x[..rows * n],
                    Batch::rows(rows, n),
                    Algorithm::TwoPass,
                    &mut out[..rows],
                )
                .unwrap();
            });
            println!(
                "{:>7} logsumexp short {rows}x{n} in L2, 1 thread: {:>6.1} GB/s, {:.2} ns/element",
                level.name(),
                gbs(4 * rows * n, t),
                t * 1e9 / (rows * n) as f64
            );
        }
    }
}

/// The plain loop of [`in_cache`]: per row the max, then `exp(x - max)` in float32 (a degree-5
/// Taylor polynomial after a two-constant ln 2 reduction, about 3e-6 relative), converted and
/// added in four float64 accumulators, 16 elements per step; no NaN or infinity handling.
/// What this machine does for logsumexp without the kernels' float64-lane exp and its
/// 0.5-ULP results: the ceiling their compute time reads against.
#[cfg(target_arch = "x86_64")]
mod plain {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_ps(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let k = _mm256_round_ps::<0>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 120.0);
        for c in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
        _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)))
    }

    /// `out[i]` = logsumexp of row `i` of `x` (rows of `n`, a multiple of 16).
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn logsumexp_rows(x: &[f32], n: usize, out: &mut [f32]) {
        for (row, o) in x.chunks_exact(n).zip(out.iter_mut()) {
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in row.chunks_exact(8) {
                // SAFETY: c holds 8 elements.
                m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
            }
            let mut lanes = [0.0f32; 8];
            // SAFETY: lanes holds 8 elements.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
            let top = lanes.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let mv = _mm256_set1_ps(top);
            let mut s = [_mm256_setzero_pd(); 4];
            for c in row.chunks_exact(16) {
                // SAFETY: c holds 16 elements.
                let (a, b) = unsafe {
                    (
                        _mm256_loadu_ps(c.as_ptr()),
                        _mm256_loadu_ps(c.as_ptr().add(8)),
                    )
                };
                let (a, b) = (exp_ps(_mm256_sub_ps(a, mv)), exp_ps(_mm256_sub_ps(b, mv)));
                s[0] = _mm256_add_pd(s[0], _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
                s[1] = _mm256_add_pd(s[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(a)));
                s[2] = _mm256_add_pd(s[2], _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
                s[3] = _mm256_add_pd(s[3], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(b)));
            }
            let total = _mm256_add_pd(_mm256_add_pd(s[0], s[1]), _mm256_add_pd(s[2], s[3]));
            let mut sums = [0.0f64; 4];
            // SAFETY: sums holds 4 elements.
            unsafe { _mm256_storeu_pd(sums.as_mut_ptr(), total) };
            *o = (f64::from(top) + sums.iter().sum::<f64>().ln()) as f32;
        }
    }
}

/// logsumexp GB/s over total sizes 256 KiB .. 256 MiB (rows of 32768), 1 and 2 threads, next
/// to the read ceiling (`cargo bench --bench throughput -- sweep`): where the cache cliff is.
fn sweep(levels: &[Level]) {
    let x = data(1 << 26);
    let probe = Probe::new(dram_probe_bytes()).expect("memory for the bandwidth probe");
    for threads in [1, 2] {
        stablelse::parallel::set_num_threads(threads);
        println!("threads {threads}: DRAM read {:.1} GB/s", probe.read(REPS));
        for &level in levels {
            for shift in [16usize, 18, 20, 22, 24, 26] {
                let len = 1usize << shift;
                let rows = (len / 32768).max(1);
                let n = len / rows;
                let mut o = vec![0.0f32; rows];
                let reps = (1usize << 28 >> shift).clamp(5, 200);
                let t = best_of(reps, || {
                    logsumexp_at(
                        level,
                        &x[..len],
                        Batch::rows(rows, n),
                        Algorithm::TwoPass,
                        &mut o,
                    )
                    .unwrap();
                    black_box(&o);
                });
                println!(
                    "{:>7} logsumexp {rows}x{n} ({} KiB): {:.1} GB/s",
                    level.name(),
                    len * 4 / 1024,
                    4.0 * len as f64 / t / 1e9
                );
            }
        }
    }
}

/// logsumexp and softmax GB/s over row lengths 4 .. 2^24 at a fixed 64 MiB float32 input
/// (`cargo bench --bench throughput -- flat`): the issue wants every length within 2x of the
/// best.
fn flat(levels: &[Level]) {
    let len = 1usize << 24;
    let x = data(len);
    let mut out = vec![0.0f32; len];
    for &level in levels {
        for shift in (2..=24).step_by(2) {
            let n = 1usize << shift;
            let rows = len / n;
            let mut o = vec![0.0f32; rows];
            let t = best_of(5, || {
                logsumexp_at(level, &x, Batch::rows(rows, n), Algorithm::TwoPass, &mut o).unwrap();
                black_box(&o);
            });
            let ts = best_of(5, || {
                softmax_like_at(
                    level,
                    &x,
                    Batch::rows(rows, n),
                    Algorithm::TwoPass,
                    Reduction::Softmax,
                    &mut out,
                )
                .unwrap();
            });
            println!(
                "{:>7} {rows}x{n}: logsumexp {:.1} GB/s, softmax {:.1} GB/s",
                level.name(),
                4.0 * len as f64 / t / 1e9,
                8.0 * len as f64 / ts / 1e9
            );
        }
    }
}
