//! The memory-bandwidth probe: the ceiling the kernels' GB/s are compared against.
//!
//! This is the one probe of the project: `cargo bench --bench throughput` and
//! `python -m stablelse bench` both use it, so their ceilings are the same measurement. It is
//! not part of the documented API.
//!
//! It counts bandwidth the way the kernels' benchmarks do: the bytes the operation must read
//! plus the bytes it must write, divided by the best wall time over `reps` runs. Hardware
//! traffic the operation does not ask for (the read-for-ownership of a written cache line,
//! prefetches) is not counted, so a kernel that streams like the probe reaches 100%.
//!
//! A DRAM figure needs a buffer several times larger than the last-level cache, or part of it
//! is served from the cache: [`dram_probe_bytes`] reads the cache size from the operating
//! system and sizes the buffer from it (a fixed 256 MiB measured the cache on a machine with
//! a 260 MiB L3).
//!
//! The loops are plain integer code over `u64` with several independent accumulators, which
//! LLVM vectorises at the baseline instruction set (SSE2 on x86-64, NEON on aarch64) without
//! `target-cpu=native`: one core then retires tens of bytes per cycle, far more than its share
//! of DRAM, so the probe measures the memory system and not the ALU. The work is spread over
//! the stablelse rayon pool ([`crate::parallel`]), i.e. `set_num_threads` threads, in chunks
//! of [`PROBE_CHUNK_BYTES`] so every thread streams long contiguous runs.

use crate::parallel::{self, SendPtr};
use std::collections::TryReserveError;
use std::hint::black_box;
use std::time::Instant;

/// Bytes each parallel piece of the probe streams through.
pub const PROBE_CHUNK_BYTES: usize = 4 << 20;

/// The smallest DRAM probe, used when the cache size cannot be read.
pub const MIN_DRAM_PROBE_BYTES: usize = 256 << 20;

/// How many times the last-level cache the DRAM probe's footprint is. Caches that are not
/// strictly LRU keep part of a buffer only somewhat larger than themselves; at four times the
/// size the hits are a few percent at most.
pub const CACHE_MULTIPLE: usize = 4;

const WORDS_PER_CHUNK: usize = PROBE_CHUNK_BYTES / 8;

/// Independent accumulators of the read loop: enough to fill two vector registers per load
/// port at the baseline width, so the loop never waits on an add.
const LANES: usize = 16;

/// The total size in bytes of the last-level cache that the threads of this process can use,
/// read from `/sys/devices/system/cpu/cpu*/cache/index*` (Linux): the largest cache level of
/// the first CPU, times the number of distinct instances of that level (one per socket or
/// per core complex). `None` where the operating system does not say.
pub fn last_level_cache_bytes() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        linux::last_level_cache_bytes()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The buffer size for a DRAM figure: [`CACHE_MULTIPLE`] times the last-level cache, at
/// least [`MIN_DRAM_PROBE_BYTES`], rounded up to whole MiB.
pub fn dram_probe_bytes() -> usize {
    dram_probe_bytes_for(last_level_cache_bytes())
}

fn dram_probe_bytes_for(llc: Option<usize>) -> usize {
    let want = llc.map_or(0, |c| c.saturating_mul(CACHE_MULTIPLE));
    let mib = 1usize << 20;
    want.max(MIN_DRAM_PROBE_BYTES)
        .div_ceil(mib)
        .saturating_mul(mib)
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::BTreeSet;
    use std::fs;

    /// `"491520K"`, `"32M"`, `"1G"` or a plain byte count -> bytes.
    pub(super) fn parse_size(s: &str) -> Option<usize> {
        let s = s.trim();
        let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((k, _)) => s.split_at(k),
            None => (s, ""),
        };
        let n: usize = digits.parse().ok()?;
        let scale = match unit.trim() {
            "" => 1,
            "K" | "k" | "KB" | "KiB" => 1 << 10,
            "M" | "MB" | "MiB" => 1 << 20,
            "G" | "GB" | "GiB" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(scale)
    }

    fn read(path: &str) -> Option<String> {
        fs::read_to_string(path).ok()
    }

    pub(super) fn last_level_cache_bytes() -> Option<usize> {
        // The largest data or unified cache of cpu0, by level.
        let base = "/sys/devices/system/cpu/cpu0/cache";
        let mut best: Option<(u32, String, usize)> = None;
        for entry in fs::read_dir(base).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("index") {
                continue;
            }
            let dir = format!("{base}/{name}");
            let kind = read(&format!("{dir}/type")).unwrap_or_default();
            if kind.trim() == "Instruction" {
                continue;
            }
            let level: u32 = read(&format!("{dir}/level"))?.trim().parse().ok()?;
            let size = parse_size(&read(&format!("{dir}/size"))?)?;
            if best.as_ref().is_none_or(|(l, _, _)| level > *l) {
                best = Some((level, name, size));
            }
        }
        let (_, index, size) = best?;
        // Distinct instances of that level among the online CPUs: each has its own copy.
        let mut instances = BTreeSet::new();
        for entry in fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_cpu = name
                .strip_prefix("cpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !is_cpu {
                continue;
            }
            let path = format!("/sys/devices/system/cpu/{name}/cache/{index}/shared_cpu_list");
            if let Some(list) = read(&path) {
                instances.insert(list.trim().to_owned());
            }
        }
        size.checked_mul(instances.len().max(1))
    }
}

/// Buffers kept between measurements, so that a benchmark can sample the ceiling in turns
/// with its timings without paying for the allocation and the page faults each time.
///
/// The read probe sums all of `src`; the read+write probe copies the first half of `src` into
/// `dst` (half the size), so both probes stream the same footprint, `bytes`.
pub struct Probe {
    src: Vec<u64>,
    dst: Vec<u64>,
    key: u64,
}

impl Probe {
    /// Allocates and touches the buffers for a footprint of `bytes` (rounded down to whole
    /// `u64`s, at least 256 bytes). A failed allocation is returned, never an abort.
    pub fn new(bytes: usize) -> Result<Self, TryReserveError> {
        let words = (bytes / 8).max(2 * LANES);
        let src = word_buffer(words, 0x9e37_79b9_7f4a_7c15)?;
        let dst = word_buffer(words / 2, 0x2545_f491_4f6c_dd1d)?;
        Ok(Self { src, dst, key: 1 })
    }

    /// The footprint in bytes each probe streams through.
    pub fn bytes(&self) -> usize {
        self.src.len() * 8
    }

    /// Read bandwidth in GB/s (1e9 bytes per second) of a parallel sum over the buffer, best
    /// of `reps` runs. Bytes counted: [`Probe::bytes`], once per run.
    pub fn read(&self, reps: usize) -> f64 {
        let words = self.src.len();
        let chunks = words.div_ceil(WORDS_PER_CHUNK);
        let src = &self.src;
        let seconds = best_seconds(reps, || {
            let sums = parallel::map_collect(chunks, WORDS_PER_CHUNK, |c| {
                let start = c * WORDS_PER_CHUNK;
                sum_words(&src[start..(start + WORDS_PER_CHUNK).min(words)])
            });
            black_box(sums);
        });
        (words * 8) as f64 / seconds / 1e9
    }

    /// Read + write bandwidth in GB/s of a parallel copy (`dst = src ^ key`) of half the
    /// footprint, best of `reps` runs.
    ///
    /// Bytes counted: the half read plus the half written, i.e. [`Probe::bytes`] per run, each
    /// byte once, as the kernels count `softmax(x, out=y)`; the cache's read-for-ownership of
    /// `dst` is not counted. This is the ceiling for kernels that read one array and write
    /// another of the same size; an in-place kernel moves the same bytes.
    pub fn read_write(&mut self, reps: usize) -> f64 {
        let words = self.dst.len();
        let chunks = words.div_ceil(WORDS_PER_CHUNK);
        let src = &self.src[..words];
        let dp = SendPtr(self.dst.as_mut_ptr());
        let mut key = self.key;
        let seconds = best_seconds(reps, || {
            key = key.wrapping_add(1);
            let k = key;
            parallel::for_each_piece(chunks, WORDS_PER_CHUNK, |range| {
                for c in range {
                    let start = c * WORDS_PER_CHUNK;
                    let len = WORDS_PER_CHUNK.min(words - start);
                    // SAFETY: chunk c owns dst[start..start + len]; dst outlives the call and
                    // nothing else reads or writes it meanwhile (`&mut self`).
                    let d = unsafe { std::slice::from_raw_parts_mut(dp.ptr().add(start), len) };
                    xor_copy_words(&src[start..start + len], d, k);
                }
            });
            black_box(dp.ptr());
        });
        self.key = key;
        (2 * words * 8) as f64 / seconds / 1e9
    }
}

/// Read bandwidth in GB/s over a fresh buffer of `bytes`, best of `reps` runs (see
/// [`Probe::read`]).
pub fn read_bandwidth(bytes: usize, reps: usize) -> Result<f64, TryReserveError> {
    Ok(Probe::new(bytes)?.read(reps))
}

/// Read + write bandwidth in GB/s over fresh buffers with a footprint of `bytes`, best of
/// `reps` runs (see [`Probe::read_write`]).
pub fn read_write_bandwidth(bytes: usize, reps: usize) -> Result<f64, TryReserveError> {
    Ok(Probe::new(bytes)?.read_write(reps))
}

fn word_buffer(words: usize, seed: u64) -> Result<Vec<u64>, TryReserveError> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(words)?;
    buf.resize(words, 0);
    // Touch every page with non-zero data, in parallel: a zeroed allocation may still be backed
    // by the shared zero page, which would make the reads come from cache.
    fill_words(&mut buf, seed);
    Ok(buf)
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
        let mut p = Probe::new(1 << 20).unwrap();
        assert_eq!(p.bytes(), 1 << 20);
        for bw in [
            p.read(2),
            p.read_write(2),
            p.read_write(1),
            read_bandwidth(0, 1).unwrap(),
            read_write_bandwidth(100, 1).unwrap(),
        ] {
            assert!(bw.is_finite() && bw > 0.0, "{bw}");
        }
    }

    #[test]
    fn read_write_writes_the_destination() {
        let mut p = Probe::new(1 << 16).unwrap();
        p.read_write(1);
        let half = p.dst.len();
        assert!(p.dst.iter().zip(&p.src[..half]).all(|(&d, &s)| d == s ^ 2));
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        assert!(Probe::new(usize::MAX).is_err());
        assert!(read_bandwidth(usize::MAX / 2, 1).is_err());
    }

    #[test]
    fn dram_size_is_several_caches_and_at_least_the_minimum() {
        assert_eq!(dram_probe_bytes_for(None), MIN_DRAM_PROBE_BYTES);
        assert_eq!(dram_probe_bytes_for(Some(2 << 20)), MIN_DRAM_PROBE_BYTES);
        // A 260 MiB L3: 256 MiB would measure the cache.
        assert_eq!(dram_probe_bytes_for(Some(260 << 20)), 1040 << 20);
        assert_eq!(
            dram_probe_bytes_for(Some((480 << 20) + 5)),
            (1920 << 20) + (1 << 20)
        );
        assert!(dram_probe_bytes() >= MIN_DRAM_PROBE_BYTES);
        if let Some(llc) = last_level_cache_bytes() {
            assert!(dram_probe_bytes() >= CACHE_MULTIPLE * llc);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(linux::parse_size("491520K\n"), Some(491520 << 10));
        assert_eq!(linux::parse_size("2048K"), Some(2 << 20));
        assert_eq!(linux::parse_size("32M"), Some(32 << 20));
        assert_eq!(linux::parse_size("1G"), Some(1 << 30));
        assert_eq!(linux::parse_size("4096"), Some(4096));
        assert_eq!(linux::parse_size("12Q"), None);
        assert_eq!(linux::parse_size(""), None);
    }
}
