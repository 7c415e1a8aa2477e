//! A DRAM bandwidth probe: the ceiling the kernels' GB/s are compared against.
//!
//! Both probes count bandwidth the way the kernels' benchmarks do: the bytes the operation
//! must read plus the bytes it must write, divided by the best wall time over `reps` runs.
//! Hardware traffic the operation does not ask for (the read-for-ownership of a written cache
//! line, prefetches) is not counted, so a kernel that streams like the probe reaches 100%.
//!
//! The loops are plain integer code over `u64` with several independent accumulators, which
//! LLVM vectorises at the baseline instruction set (SSE2 on x86-64, NEON on aarch64) without
//! `target-cpu=native`: one core then retires tens of bytes per cycle, far more than its share
//! of DRAM, so the probe measures the memory system and not the ALU. The work is spread over
//! the stablelse rayon pool ([`crate::parallel`]), i.e. `set_num_threads` threads, in chunks
//! of [`PROBE_CHUNK_BYTES`] so every thread streams long contiguous runs.

use crate::parallel::{self, SendPtr};
use std::hint::black_box;
use std::time::Instant;

/// Bytes each parallel piece of the probe streams through.
pub const PROBE_CHUNK_BYTES: usize = 4 << 20;

const WORDS_PER_CHUNK: usize = PROBE_CHUNK_BYTES / 8;

/// Independent accumulators of the read loop: enough to fill two vector registers per load
/// port at the baseline width, so the loop never waits on an add.
const LANES: usize = 16;

fn word_buffer(bytes: usize) -> Vec<u64> {
    let words = (bytes / 8).max(LANES);
    let mut buf = vec![0u64; words];
    // Touch every page with non-zero data, in parallel: a zeroed allocation may still be backed
    // by the shared zero page, which would make the reads come from cache.
    fill_words(&mut buf, 0x9e37_79b9_7f4a_7c15);
    buf
}

fn fill_words(buf: &mut [u64], seed: u64) {
    let words = buf.len();
    let p = SendPtr(buf.as_mut_ptr());
    parallel::for_each_piece(words.div_ceil(WORDS_PER_CHUNK), WORDS_PER_CHUNK, |range| {
        for c in range {
            let start = c * WORDS_PER_CHUNK;
            let len = WORDS_PER_CHUNK.min(words - start);
            // SAFETY: chunk c owns words start..start + len of the buffer.
            let chunk = unsafe { std::slice::from_raw_parts_mut(p.ptr().add(start), len) };
            for (k, w) in chunk.iter_mut().enumerate() {
                *w = seed ^ ((start + k) as u64);
            }
        }
    });
}

/// Wrapping sum of a slice with [`LANES`] independent accumulators.
#[inline]
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; LANES];
    let mut blocks = words.chunks_exact(LANES);
    for block in &mut blocks {
        for (a, &w) in acc.iter_mut().zip(block) {
            *a = a.wrapping_add(w);
        }
    }
    let tail = blocks
        .remainder()
        .iter()
        .fold(0u64, |t, &w| t.wrapping_add(w));
    acc.iter().fold(tail, |t, &a| t.wrapping_add(a))
}

/// `dst[k] = src[k] ^ key`: one read and one write stream per element.
#[inline]
fn xor_copy_words(src: &[u64], dst: &mut [u64], key: u64) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s ^ key;
    }
}

fn best_seconds(reps: usize, mut run: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        run();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best.max(1e-12)
}

/// Read bandwidth in GB/s (1e9 bytes per second) of a parallel sum over a buffer of `bytes`
/// (rounded down to whole `u64`s, at least 128 bytes), best of `reps` runs.
///
/// Bytes counted: `bytes`, once per run. For a DRAM figure use a buffer several times larger
/// than the last-level cache (256 MiB is the reference size); smaller buffers measure the caches.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let buf = word_buffer(bytes);
    let words = buf.len();
    let chunks = words.div_ceil(WORDS_PER_CHUNK);
    let seconds = best_seconds(reps, || {
        let sums = parallel::map_collect(chunks, WORDS_PER_CHUNK, |c| {
            let start = c * WORDS_PER_CHUNK;
            sum_words(&buf[start..(start + WORDS_PER_CHUNK).min(words)])
        });
        black_box(sums);
    });
    (words * 8) as f64 / seconds / 1e9
}

/// Read + write bandwidth in GB/s of a parallel copy (`dst = src ^ key`) between two buffers
/// of `bytes` each (rounded down to whole `u64`s), best of `reps` runs.
///
/// Bytes counted: `bytes` read plus `bytes` written, i.e. `2 * bytes` per run, each byte once,
/// as the kernels count `softmax(x, out=y)`; the cache's read-for-ownership of `dst` is not
/// counted. This is the ceiling for kernels that read one array and write another of the same
/// size; an in-place kernel moves the same bytes.
pub fn read_write_bandwidth(bytes: usize, reps: usize) -> f64 {
    let src = word_buffer(bytes);
    let mut dst = word_buffer(bytes);
    let words = src.len();
    let chunks = words.div_ceil(WORDS_PER_CHUNK);
    let mut key = 1u64;
    let seconds = best_seconds(reps, || {
        key = key.wrapping_add(1);
        let k = key;
        let dp = SendPtr(dst.as_mut_ptr());
        parallel::for_each_piece(chunks, WORDS_PER_CHUNK, |range| {
            for c in range {
                let start = c * WORDS_PER_CHUNK;
                let len = WORDS_PER_CHUNK.min(words - start);
                // SAFETY: chunk c owns dst[start..start + len]; dst outlives the call.
                let d = unsafe { std::slice::from_raw_parts_mut(dp.ptr().add(start), len) };
                xor_copy_words(&src[start..start + len], d, k);
            }
        });
        black_box(&dst);
    });
    (2 * words * 8) as f64 / seconds / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_matches_a_plain_sum() {
        let v: Vec<u64> = (0..1000u64).map(|k| k * 7 + u64::MAX / 3).collect();
        let plain = v.iter().fold(0u64, |t, &w| t.wrapping_add(w));
        assert_eq!(sum_words(&v), plain);
        assert_eq!(sum_words(&v[..5]), v[..5].iter().sum::<u64>());
    }

    #[test]
    fn xor_copy_writes_every_word() {
        let src: Vec<u64> = (0..100).collect();
        let mut dst = vec![0u64; 100];
        xor_copy_words(&src, &mut dst, 3);
        assert!(dst.iter().zip(&src).all(|(&d, &s)| d == s ^ 3));
    }

    #[test]
    fn probes_return_finite_positive_rates() {
        for bw in [
            read_bandwidth(1 << 20, 2),
            read_write_bandwidth(1 << 20, 2),
            read_bandwidth(0, 1),
        ] {
            assert!(bw.is_finite() && bw > 0.0, "{bw}");
        }
    }
}
