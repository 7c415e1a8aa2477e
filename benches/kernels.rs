//! Criterion benches of the kernels, grouped by kernel, parameterised by row length and SIMD
//! level, reported as GB/s (`Throughput::Bytes` = bytes read, plus bytes written for softmax).
//!
//! Each case covers about 8 MiB of float32 (rows x length fixed), so long rows stream from
//! L3/DRAM and short rows measure the per-row overhead. Sample sizes are small so that a
//! default `cargo bench` stays within minutes on 2 cores; pass a filter to go deeper, e.g.
//! `cargo bench --bench kernels -- 'logsumexp_two_pass/f32/avx512'`.
//!
//! The `probe` group is the crate's bandwidth probe (`stablelse::probe`, the ceiling of
//! `python -m stablelse bench` and `cargo bench --bench throughput`) over the same 8 MiB
//! footprint as the f32 cases, so each kernel's GB/s reads against what plain streaming
//! reaches at that size.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stablelse::kernels::{logsumexp_at, softmax_like_at, Algorithm, Reduction};
use stablelse::probe::Probe;
use stablelse::simd::{available_levels, exp_f32, exp_f64};
use stablelse::{Batch, Real};
use std::hint::black_box;
use std::time::Duration;

const LENGTHS: [usize; 5] = [10, 32, 1024, 32768, 1 << 20];
const ELEMENTS: usize = 1 << 21;

fn data<T: Real>(len: usize) -> Vec<T> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f64(((s >> 11) as f64 / (1u64 << 53) as f64) * 40.0 - 20.0)
        })
        .collect()
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600));
    g
}

/// Rows of `n` covering about ELEMENTS elements.
fn rows_for(n: usize) -> usize {
    (ELEMENTS / n).max(1)
}

fn bench_lse<T: Real>(c: &mut Criterion, alg: Algorithm, name: &str) {
    let mut g = configure(c, &format!("{name}/{}", T::NAME));
    let x = data::<T>(ELEMENTS.max(1 << 20));
    for level in available_levels() {
        for n in LENGTHS {
            let rows = rows_for(n);
            let mut out = vec![T::from_f64(0.0); rows];
            g.throughput(Throughput::Bytes(
                (rows * n * std::mem::size_of::<T>()) as u64,
            ));
            g.bench_with_input(BenchmarkId::new(level.name(), n), &n, |b, &n| {
                b.iter(|| {
                    logsumexp_at(level, &x[..rows * n], Batch::rows(rows, n), alg, &mut out)
                        .unwrap();
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

fn bench_softmax<T: Real>(c: &mut Criterion, what: Reduction, name: &str) {
    let mut g = configure(c, &format!("{name}/{}", T::NAME));
    let x = data::<T>(ELEMENTS.max(1 << 20));
    let mut out = vec![T::from_f64(0.0); x.len()];
    for level in available_levels() {
        for n in LENGTHS {
            let rows = rows_for(n);
            let len = rows * n;
            g.throughput(Throughput::Bytes(
                (2 * len * std::mem::size_of::<T>()) as u64,
            ));
            g.bench_with_input(BenchmarkId::new(level.name(), n), &n, |b, &n| {
                b.iter(|| {
                    softmax_like_at(
                        level,
                        &x[..len],
                        Batch::rows(rows, n),
                        Algorithm::TwoPass,
                        what,
                        &mut out[..len],
                    )
                    .unwrap();
                })
            });
        }
    }
    g.finish();
}

/// Reductions down axis 0 of an (n, inner) array: the column kernel.
fn bench_columns<T: Real>(c: &mut Criterion) {
    let mut g = configure(c, &format!("logsumexp_columns/{}", T::NAME));
    let x = data::<T>(ELEMENTS);
    for level in available_levels() {
        for inner in LENGTHS {
            let n = rows_for(inner);
            let mut out = vec![T::from_f64(0.0); inner];
            g.throughput(Throughput::Bytes(
                (n * inner * std::mem::size_of::<T>()) as u64,
            ));
            g.bench_with_input(
                BenchmarkId::new(level.name(), inner),
                &inner,
                |b, &inner| {
                    b.iter(|| {
                        logsumexp_at(
                            level,
                            &x[..n * inner],
                            Batch::contiguous(1, n, inner),
                            Algorithm::Auto,
                            &mut out,
                        )
                        .unwrap();
                        black_box(&out);
                    })
                },
            );
        }
    }
    g.finish();
}

fn bench_exp(c: &mut Criterion) {
    let mut g = configure(c, "exp");
    let len = 1 << 14; // in L1/L2: the exp's own cost
    let x32 = data::<f32>(len);
    let x64 = data::<f64>(len);
    let (mut o32, mut o64) = (vec![0.0f32; len], vec![0.0f64; len]);
    for level in available_levels() {
        g.throughput(Throughput::Bytes((len * 4) as u64));
        g.bench_function(BenchmarkId::new("f32", level.name()), |b| {
            b.iter(|| exp_f32(level, black_box(&x32), &mut o32))
        });
        g.throughput(Throughput::Bytes((len * 8) as u64));
        g.bench_function(BenchmarkId::new("f64", level.name()), |b| {
            b.iter(|| exp_f64(level, black_box(&x64), &mut o64))
        });
    }
    g.finish();
}

fn bench_probe(c: &mut Criterion) {
    let mut g = configure(c, "probe");
    let bytes = ELEMENTS * std::mem::size_of::<f32>();
    let Ok(mut probe) = Probe::new(bytes) else {
        return;
    };
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("read", |b| b.iter(|| black_box(probe.read(1))));
    g.bench_function("read_write", |b| b.iter(|| black_box(probe.read_write(1))));
    g.finish();
}

fn kernels(c: &mut Criterion) {
    bench_probe(c);
    bench_exp(c);
    bench_lse::<f32>(c, Algorithm::TwoPass, "logsumexp_two_pass");
    bench_lse::<f32>(c, Algorithm::Online, "logsumexp_online");
    bench_lse::<f64>(c, Algorithm::TwoPass, "logsumexp_two_pass");
    bench_lse::<f64>(c, Algorithm::Online, "logsumexp_online");
    bench_softmax::<f32>(c, Reduction::Softmax, "softmax");
    bench_softmax::<f32>(c, Reduction::LogSoftmax, "log_softmax");
    bench_softmax::<f64>(c, Reduction::Softmax, "softmax");
    bench_softmax::<f64>(c, Reduction::LogSoftmax, "log_softmax");
    bench_columns::<f32>(c);
    bench_columns::<f64>(c);
}

criterion_group!(benches, kernels);
criterion_main!(benches);
