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
/// best of many runs (`cargo bench --bench throughput -- cache`).
fn in_cache(levels: &[Level]) {
    stablelse::parallel::set_num_threads(1);
    let (rows, n) = (16, 4096);
    let len = rows * n;
    let x = data(len);
    let mut out = vec![0.0f32; len];
    let mut lse = vec![0.0f32; rows];
    let gbs = |bytes: usize, t: f64| bytes as f64 / t / 1e9;
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
