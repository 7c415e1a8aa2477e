//! States of unsorted segments by scattering every element into its segment's running max
//! and sum, in array order, with no sort.
//!
//! Two passes over the elements. The first takes every segment's max (exact: a max does not
//! round, so its order does not matter; NaN if any element is NaN). The second adds
//! `exp(x - max)` of every element to its segment's float64 sum, kept beside the segment's
//! max in one `(max, sum)` pair (one cache line per element, not two: 0.82x the time at 2^19
//! segments, 1.05x at 2^15, where both fit the cache): a block of elements reads the maxima
//! of its segments and computes every term with one vector exp
//! ([`simd::exp_nonpos_f64`], float32-grade as the row kernels' exp for float32 results,
//! and 0 for `x = -inf`), then adds them in order. The first element equal to the max adds
//! nothing, so the sum is the excess of the `(max, excess)` [`LseState`] and the max's own
//! term of 1 never meets the small ones: an excess far below 1 keeps its bits
//! (`logsumexp([-40, 0])` is `4.2e-18`, not 0). A segment whose max is not finite is decided
//! by its max alone, as the state's rules say: NaN, `+inf`, or empty (`-inf`). Two light
//! passes cost less than one online pass that rescales a segment's sum whenever its max
//! rises: that update is a chain of dependent arithmetic per element, where the passes only
//! gather, compare and add.
//!
//! Where: float32 input (float16 is computed in float32) with single columns and at most
//! [`SCATTER_MAX_STATE_BYTES`] of states ([`applies`]). A random access per element into
//! per-segment arrays that stay in the cache costs less than the counting sort's passes over
//! work buffers of the input's size. float64 input keeps the sort: its sorted path's blocked
//! sums are more accurate than one running sum (measured: 0 against 1-4 float64 ULP on a
//! segment of 2^20 elements), which a float32 result does not show but a float64 one would.
//!
//! Accuracy: a segment's sum is taken in float64 in array order, so it differs from the
//! sorted path's (blocked vector lanes) by rounding only: at most `2 n + 1` float64
//! roundings of the total for a segment of `n` elements (each term added once in its part
//! and copy, the partial sums folded, the count of copies at the max added), and the exp's
//! own error (about `2^-34` relative, as in the row kernels for float32 results), i.e.
//! `(2 n + 1) 2^-53 + 2^-34` in the log-sum-exp, before the one rounding to float32.
//!
//! Many segments (from [`PARTITION_FROM`]): their states outgrow the core's own caches, and a
//! random access per element into the shared cache costs more than a pass over memory. The
//! elements are first partitioned by segment into buckets of 2^12 or more segments, in
//! array order, and each bucket is then scattered as above into states that stay in the
//! core's caches (one copy of each, no parts): see [`partitioned_states`]. A softmax of so
//! many segments is written through the same partition: [`partitioned_softmax_like`].
//!
//! Determinism: the rows are cut into [`parts`] chosen from the sizes alone, and with fewer
//! than [`BANKED_BELOW`] segments each part keeps [`BANKS`] copies of its arrays, element
//! `k` updating copy `k % BANKS` (so that consecutive elements of one segment do not wait for
//! each other). Each part and copy scatters into its own arrays, and they are folded in
//! order (maxima by max, sums by addition; each copy that met the max adds its 1 there). The
//! result is therefore the same for any thread count.
//!
//! Ids are read where they lie, possibly while another thread writes them: every read is
//! bounded, and only the bounded index is used. Unpartitioned, an id found out of range by
//! the second pass after the first accepted it raises the "changed while reading" error.
//! Partitioned, each id is read once for its bucket and its segment within the bucket
//! together; should the compiler load an id again while another thread changes it, the
//! element lands in another segment of its bucket (changed results, as in NumPy under such a
//! race), never outside the work tables.

use super::segments::{try_vec, SegmentError};
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd::{self, Level};
use crate::state::LseState;
use std::hint::select_unpredictable;

/// The most bytes of states (16 per segment) the scatter takes on: 2^22 segments, over 2^18
/// partitioned ([`PARTITION_FROM`]) into at most [`MAX_BUCKETS`] buckets of up to 2^14
/// segments. Beyond, the counting sort. (Measured on 2 threads, 2^24 float32 values in random
/// ids, on a machine with 2 MiB of L2 per core: logsumexp / softmax in 97-99 / 128-131 ms at
/// 2^20 segments against the sort's 124 / 186, 164-169 / 161-162 at 2^22 against 218-246 /
/// 329-346. Unpartitioned, on a machine with 16 MiB of L3, the scatter had taken 0.66-0.76x
/// the sort's time at 2^19 and the sort 0.55x the scatter's at 2^21.)
pub const SCATTER_MAX_STATE_BYTES: usize = 64 << 20;

/// Elements per block of the scatter: the gathered maxima, factors and indices stay in L1.
const BLOCK: usize = 256;

/// Rows of one part are at least this many times the number of segments, so that merging a
/// part's states costs little next to scattering its rows.
const PART_ROWS_PER_SEGMENT: usize = 16;

/// Fewer rows than this per part do not pay for waking a thread.
const PART_MIN_ROWS: usize = 1 << 16;

/// The most parts (each holds its own maxima and sums).
const MAX_PARTS: usize = 8;

/// Whether unsorted states of `T` in `inner` columns and `num_segments` segments take the
/// scatter: float32-grade input (see the module docs for float64), single columns, states
/// within [`SCATTER_MAX_STATE_BYTES`].
pub fn applies<T: Real>(inner: usize, num_segments: usize) -> bool {
    !T::FULL
        && inner == 1
        && num_segments <= SCATTER_MAX_STATE_BYTES / std::mem::size_of::<LseState>()
}

/// The number of parts the rows are cut into: a function of the sizes only (never of the
/// thread count), so the merged result is the same for any thread count.
pub fn parts(rows: usize, num_segments: usize) -> usize {
    let per_part = PART_MIN_ROWS.max(num_segments.saturating_mul(PART_ROWS_PER_SEGMENT));
    (rows / per_part).clamp(1, MAX_PARTS)
}

/// The `(max, excess)` state of every segment (`out.len() == num_segments`) of the 1-D `x`
/// with one id per element, by scattering. The first id outside `[0, num_segments)` is
/// reported by position.
pub fn scatter_states<T: Real>(
    x: &[T],
    ids: &[i64],
    num_segments: usize,
    out: &mut [LseState],
) -> Result<(), SegmentError> {
    let rows = x.len();
    debug_assert_eq!(ids.len(), rows);
    debug_assert_eq!(out.len(), num_segments);
    if num_segments >= PARTITION_FROM {
        return partitioned_states(x, ids, num_segments, out);
    }
    let parts = parts(rows, num_segments);
    let banks = banks(num_segments);
    // Part p scatters into its `banks` copies of the maxima, then of the (max, sum) pairs,
    // at [p * banks * num_segments..][..banks * num_segments], and marks in its bitmap of
    // `words` words the copies that met their max. The sum pass reads a segment's max beside
    // its sum, one line per element rather than two.
    let own = banks * num_segments;
    let words = own.div_ceil(64);
    let mut maxima = try_vec(parts * own, f32::NEG_INFINITY)?;
    let mut pairs = try_vec(parts * own, [0.0f64; 2])?;
    let mut met = try_vec(parts * words, 0u64)?;
    // Whole blocks per part; the last part takes the rest.
    let per = (rows / parts).next_multiple_of(BLOCK);
    let part_rows = |p: usize| {
        let r0 = (p * per).min(rows);
        let r1 = if p + 1 == parts {
            rows
        } else {
            ((p + 1) * per).min(rows)
        };
        r0..r1
    };
    let (mp, sp, bp) = (
        SendPtr(maxima.as_mut_ptr()),
        SendPtr(pairs.as_mut_ptr()),
        SendPtr(met.as_mut_ptr()),
    );
    let errors = parallel::map_collect(parts, rows.div_ceil(parts), |p| {
        let r = part_rows(p);
        // SAFETY: part p owns its slice of maxima.
        let maxima = unsafe { part_of(mp, p, own) };
        max_pass(
            Split(&x[r.clone()], &ids[r.clone()]),
            banks,
            maxima,
            num_segments,
        )
        .map_err(|k| SegmentError::IdOutOfRange {
            pos: r.start + k,
            id: ids[r.start + k],
            num_segments,
        })
    });
    // Parts are in row order: the first error found is the first offending position.
    if let Some(err) = errors.into_iter().filter_map(Result::err).next() {
        return Err(err);
    }
    // Every part's sums are taken below the maxima of the whole array (exact, any order).
    fold_parts(&mut maxima, num_segments, parts * banks, |m, o| {
        *m = top(*m, o)
    });
    let (maxima, level) = (&maxima[..num_segments], simd::level());
    let changed = parallel::map_collect(parts, rows.div_ceil(parts), |p| {
        let r = part_rows(p);
        // SAFETY: part p owns its slices of pairs and met.
        let (pairs, met) = unsafe { (part_of(sp, p, own), part_of(bp, p, words)) };
        for copy in pairs.chunks_exact_mut(num_segments.max(1)) {
            for (pair, &m) in copy.iter_mut().zip(maxima) {
                pair[0] = f64::from(m);
            }
        }
        sum_pass(
            level,
            Split(&x[r.clone()], &ids[r]),
            banks,
            num_segments,
            pairs,
            met,
        )
    });
    if changed.into_iter().any(|ok| !ok) {
        return Err(super::segments::changed_ids());
    }
    fold_parts(&mut pairs, num_segments, parts * banks, |s, o| s[1] += o[1]);
    let op = SendPtr(out.as_mut_ptr());
    parallel::for_each_piece(num_segments, 4, |range| {
        for s in range {
            let state = finish(maxima[s], pairs[s][1], || {
                copies_at_max(&met, words, banks, num_segments, s)
            });
            // SAFETY: pieces own disjoint s < num_segments == out.len().
            unsafe { *op.ptr().add(s) = state };
        }
    });
    Ok(())
}

/// The state of a segment from its max, the sum of its terms below the max and the number
/// of copies that met the max (`copies`, asked only for a finite max). A max that is not
/// finite decides alone: NaN, `+inf`, or empty.
fn finish(max: f32, sum: f64, copies: impl FnOnce() -> f64) -> LseState {
    let max = f64::from(max);
    if max.is_nan() {
        LseState {
            max,
            excess: f64::NAN,
        }
    } else if max == f64::INFINITY {
        LseState { max, excess: 0.0 }
    } else if max == f64::NEG_INFINITY {
        LseState::EMPTY
    } else {
        // At least one copy met the max; each added 1 for every further element at it.
        LseState {
            max,
            excess: sum + (copies() - 1.0),
        }
    }
}

/// From this many segments on, the scatter first partitions the elements by segment into
/// buckets ([`bucket_bits`]; one pass that writes every element once), and then
/// scatters each bucket into states that stay in the core's own caches: the states of all
/// segments (20 bytes each, 5 MiB here) no longer fit them, and a random access per element
/// into the shared cache costs more than the partition's passes. Measured on one machine
/// with 2 MiB of L2 per core (2 threads, 2^24 float32 values in random ids, logsumexp /
/// softmax, ms): unpartitioned 38-45 / 57-67 up to 2^16 segments, 70-77 / 94 at 2^17, 87 /
/// 134 at 2^18; partitioned 74-78 / 103-112 from 2^13 to 2^18.
const PARTITION_FROM: usize = 1 << 18;

/// The fewest segments per bucket of the partitioned scatter, as a power of two
/// ([`bucket_bits`]).
const BUCKET_BITS: u32 = 12;

/// The most buckets (a bucket's index is a byte; a line of entries each in the partition).
const MAX_BUCKETS: usize = 256;

/// The bits of a segment's index within its bucket for `num_segments` segments: buckets of
/// `2^BUCKET_BITS` segments, larger ones where that would make more than [`MAX_BUCKETS`]
/// (16 bits at most: [`simd::bucket_codes`]; 2^16 segments' work tables take 1.3 MiB).
fn bucket_bits(num_segments: usize) -> u32 {
    let fewest = num_segments.div_ceil(MAX_BUCKETS).next_power_of_two();
    BUCKET_BITS.max(fewest.trailing_zeros())
}

/// Rows partitioned together: their entries, in row order and grouped, stay in the cache
/// between the encoding and the write, and their positions fit 16 bits.
const CHUNK: usize = 1 << 16;

thread_local! {
    /// Each thread's entries of one chunk of the partition, in row order and grouped by
    /// bucket ([`CHUNK`] of each, kept between calls: 1 MiB).
    static CODES: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's room for a chunk's entries, in row order and grouped, or with
/// `None` where it cannot be had ([`super::with_scratch`]).
fn with_codes<R>(f: impl FnOnce(Option<(&mut [u64], &mut [u64])>) -> R) -> R {
    super::with_scratch(&CODES, 2 * CHUNK, |room| {
        f(room.map(|r| r.split_at_mut(CHUNK)))
    })
}

/// A partitioned entry's value and segment within its bucket (the codes of
/// [`simd::bucket_codes`]; the entry's position within its chunk is its top 16 bits).
#[inline(always)]
fn decode(e: u64) -> (f32, u64) {
    (f32::from_bits(e as u32), (e >> 32) & 0xFFFF)
}

/// The elements of one call partitioned by bucket of segments: [`Partition::new`].
struct Partition {
    /// The buffer of the entries; `ptr` points at the first, `rows` of them (aligned to a
    /// cache line).
    _buf: Vec<std::mem::MaybeUninit<u64>>,
    ptr: SendPtr<u64>,
    rows: usize,
    /// `pieces[k * (buckets + 1) + b]`: where bucket `b` of chunk `k` starts; the chunk's
    /// last one is its end.
    pieces: Vec<usize>,
    chunks: usize,
    buckets: usize,
    /// Segments per bucket (a power of two, [`bucket_bits`]).
    bucket: usize,
}

impl Partition {
    /// First pass, by chunks of [`CHUNK`] rows: each chunk encodes its rows (bucket, and the
    /// entry of [`simd::bucket_codes`]: value, segment within the bucket, position) in one
    /// branch-free pass, counts them per bucket, groups the entries by bucket in the cache and
    /// writes them, in array order within each bucket, into its own region of one buffer. The
    /// first id outside `[0, num_segments)` is reported by position.
    fn new<T: Real>(x: &[T], ids: &[i64], num_segments: usize) -> Result<Self, SegmentError> {
        let rows = x.len();
        let bits = bucket_bits(num_segments);
        let buckets = num_segments.div_ceil(1 << bits);
        if buckets > MAX_BUCKETS || bits > 16 {
            return Err(SegmentError::Alloc);
        }
        let chunks = rows.div_ceil(CHUNK).max(1);
        let stride = buckets + 1;
        let mut pieces = try_vec(chunks * stride, 0usize)?;
        // Aligned to whole cache lines, with up to 7 words in front.
        let mut buf = super::segments::try_uninit::<u64>(rows + 7)?;
        let front = buf.as_ptr().align_offset(64).min(7);
        let (ep, pp) = (
            SendPtr(buf[front..].as_mut_ptr() as *mut u64),
            SendPtr(pieces.as_mut_ptr()),
        );
        let level = simd::level();
        let errors = parallel::map_collect(chunks, CHUNK, |k| {
            with_codes(|codes| {
                let (r0, r1) = ((k * CHUNK).min(rows), ((k + 1) * CHUNK).min(rows));
                let (ids, x) = (&ids[r0..r1], &x[r0..r1]);
                // SAFETY: chunk k owns pieces[k * stride..(k + 1) * stride].
                let starts =
                    unsafe { std::slice::from_raw_parts_mut(pp.ptr().add(k * stride), stride) };
                // Each row's bucket and entry, from one read of its id (a branch-free pass).
                let mut bucket = [0u8; CHUNK];
                let Some((codes, grouped)) = codes else {
                    return Some(SegmentError::Alloc);
                };
                let key = (bits, num_segments as u64, (buckets - 1) as u8);
                let n = r1 - r0;
                if !simd::bucket_codes(level, x, ids, key, &mut bucket[..n], &mut codes[..n]) {
                    let r = ids
                        .iter()
                        .position(|&id| id < 0 || id as u64 >= num_segments as u64);
                    return Some(r.map_or_else(super::segments::changed_ids, |r| {
                        SegmentError::IdOutOfRange {
                            pos: r0 + r,
                            id: ids[r],
                            num_segments,
                        }
                    }));
                }
                let mut count = [0usize; MAX_BUCKETS];
                for &b in &bucket[..n] {
                    count[usize::from(b)] += 1;
                }
                super::segments::bucket_starts(r0, &count[..buckets], starts);
                // The chunk's entries grouped by bucket in the cache first (its region of the
                // buffer holds its buckets' pieces one after the other, so the grouped entries
                // are the region as it will be), then the region copied out whole: a write
                // stream per bucket into memory would overflow the core's store queues (measured,
                // 2^24 float32 values in 2^19 segments, 2 threads: logsumexp in 0.82x the time
                // of writing each entry into the buffer directly; writing the lines past the
                // caches instead of copying them was no faster).
                let mut cur = [0usize; MAX_BUCKETS];
                for (c, &s) in cur.iter_mut().zip(&starts[..buckets]) {
                    *c = s - r0;
                }
                for (&b, &e) in bucket[..n].iter().zip(&*codes) {
                    // Bucket b (below `buckets`) was counted count[b] times: its cursor stays
                    // inside its piece.
                    let slot = cur[usize::from(b)];
                    if let Some(g) = grouped.get_mut(slot) {
                        *g = e;
                    }
                    cur[usize::from(b)] = slot + 1;
                }
                // SAFETY: the region [r0, r1) is this chunk's own, and every entry of it was
                // just grouped (each row is counted once).
                unsafe { std::ptr::copy_nonoverlapping(grouped.as_ptr(), ep.ptr().add(r0), n) };
                None
            })
        });
        if let Some(err) = errors.into_iter().flatten().next() {
            return Err(err);
        }
        Ok(Self {
            _buf: buf,
            ptr: ep,
            rows,
            pieces,
            chunks,
            buckets,
            bucket: 1 << bits,
        })
    }

    /// The entries (every one written by [`Partition::new`]).
    fn entries(&self) -> *mut u64 {
        self.ptr.ptr()
    }

    /// Where bucket `b` of chunk `k` lies among the entries.
    fn piece(&self, k: usize, b: usize) -> std::ops::Range<usize> {
        let at = k * (self.buckets + 1) + b;
        self.pieces[at]..self.pieces[at + 1]
    }

    /// The entries of bucket `b` of chunk `k`, hinting the next piece of the same walk
    /// (`next`) into the cache: the pieces lie apart in memory.
    fn read(&self, k: usize, b: usize, next: Option<(usize, usize)>) -> &[u64] {
        if let Some((k2, b2)) = next {
            for p in self.piece(k2, b2).step_by(8) {
                simd::prefetch_line(self.entries().wrapping_add(p));
            }
        }
        let r = self.piece(k, b);
        // SAFETY: every entry was written by the first pass; the range lies inside them.
        unsafe { std::slice::from_raw_parts(self.entries().add(r.start), r.len()) }
    }
}

/// One bucket's work tables, reused from bucket to bucket.
struct Tables {
    maxima: Vec<f32>,
    pairs: Vec<[f64; 2]>,
    met: Vec<u64>,
    /// The bucket's states ([`Tables::states`]).
    states: Vec<LseState>,
}

impl Tables {
    /// Tables for buckets of `segments` segments.
    fn new(segments: usize) -> Result<Self, SegmentError> {
        Ok(Self {
            maxima: try_vec(segments, f32::NEG_INFINITY)?,
            pairs: try_vec(segments, [0.0f64; 2])?,
            met: try_vec(segments.div_ceil(64), 0u64)?,
            states: try_vec(segments, LseState::EMPTY)?,
        })
    }

    /// Second pass, for bucket `b`: its pieces from every chunk in chunk order (so its
    /// elements in array order) scattered into the maxima, then the sums, of its segments
    /// with the passes of the unpartitioned scatter, one copy each; the states of its `segs`
    /// segments into `self.states[..segs]`.
    fn states(&mut self, level: Level, part: &Partition, b: usize, segs: usize) {
        let (maxima, pairs, met) = (
            &mut self.maxima[..segs],
            &mut self.pairs[..segs],
            &mut self.met[..segs.div_ceil(64)],
        );
        maxima.fill(f32::NEG_INFINITY);
        met.fill(0);
        let next = |k: usize| (k + 1 < part.chunks).then_some((k + 1, b));
        // Every segment within the bucket is below segs, unless its id changed while the
        // partition read it: the pass then stops there, reading nothing outside the tables.
        for k in 0..part.chunks {
            let _ = max_pass(Entries(part.read(k, b, next(k))), 1, maxima, segs);
        }
        for (pair, &m) in pairs.iter_mut().zip(&*maxima) {
            *pair = [f64::from(m), 0.0];
        }
        for k in 0..part.chunks {
            sum_pass(level, Entries(part.read(k, b, None)), 1, segs, pairs, met);
        }
        let words = met.len();
        for (s, state) in self.states[..segs].iter_mut().enumerate() {
            *state = finish(maxima[s], pairs[s][1], || {
                copies_at_max(met, words, 1, segs, s)
            });
        }
    }
}

/// Whether unsorted segments of `T` in `inner` columns go through the partition: the
/// scatter's inputs ([`applies`]) with at least [`PARTITION_FROM`] segments.
pub fn partitions<T: Real>(inner: usize, num_segments: usize) -> bool {
    applies::<T>(inner, num_segments) && num_segments >= PARTITION_FROM
}

/// Calls `f(b, tables)` for every bucket, in parallel pieces, each with its own tables.
fn for_each_bucket(
    part: &Partition,
    f: impl Fn(usize, &mut Tables) + Sync + Send,
) -> Result<(), SegmentError> {
    let failed = std::sync::atomic::AtomicBool::new(false);
    parallel::for_each_piece(part.buckets, part.rows.div_ceil(part.buckets), |range| {
        let Ok(mut tables) = Tables::new(part.bucket) else {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        for b in range {
            f(b, &mut tables);
        }
    });
    if failed.into_inner() {
        return Err(SegmentError::Alloc);
    }
    Ok(())
}

/// The states of many segments through a partition ([`PARTITION_FROM`]): [`Partition::new`],
/// then [`Tables::states`] per bucket. Every segment's sum is taken in array order by one
/// copy, whatever the threads.
///
/// Measured on one machine (2 threads, 2^24 float32 values in 2^19 random segments of 1-64,
/// 2 MiB of L2 per core): 83 ms against 96-105 ms for the unpartitioned scatter, whose
/// `(max, sum)` pairs (8 MiB) are read from the shared cache at every element
/// ([`PARTITION_FROM`]).
fn partitioned_states<T: Real>(
    x: &[T],
    ids: &[i64],
    num_segments: usize,
    out: &mut [LseState],
) -> Result<(), SegmentError> {
    let part = Partition::new(x, ids, num_segments)?;
    let (op, level) = (SendPtr(out.as_mut_ptr()), simd::level());
    for_each_bucket(&part, |b, tables| {
        let base = b * part.bucket;
        let segs = (num_segments - base).min(part.bucket);
        // SAFETY: bucket b owns the states of segments base..base + segs.
        let out = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(base), segs) };
        tables.states(level, &part, b, segs);
        out.copy_from_slice(&tables.states[..segs]);
    })
}

/// Softmax (`exp`) or log_softmax of unsorted segments through the partition
/// ([`partitions`]), into `out` (`x.len()` elements, disjoint from `x` or equal to it). Each
/// bucket takes its states ([`Tables::states`]) and writes every element's result over its
/// entry, from its segment's parameters (in the cache, as the states); a last pass by chunks
/// puts the results at their positions, within the chunk's part of `out` (in the cache). A
/// random read per element of parameters in the shared cache would cost more than these two
/// passes. The results are those of the row kernels' write from the same states.
///
/// # Safety
/// `out` writable for `x.len()` elements; `x` is not read through other references while
/// this runs if they are the same memory (every element is read before any is written).
pub unsafe fn partitioned_softmax_like<T: Real>(
    x: &[T],
    ids: &[i64],
    num_segments: usize,
    exp: bool,
    out: SendPtr<T>,
) -> Result<(), SegmentError> {
    let part = Partition::new(x, ids, num_segments)?;
    let level = simd::level();
    let ep = SendPtr(part.entries());
    for_each_bucket(&part, |b, tables| {
        let base = b * part.bucket;
        let segs = (num_segments - base).min(part.bucket);
        tables.states(level, &part, b, segs);
        // The parameters of the write, over the pairs of the tables.
        let params = &mut tables.pairs[..segs];
        super::write_params_of::<T>(level, &tables.states[..segs], exp, params);
        let zero = T::from_f64(0.0);
        let (mut xs, mut bs, mut as_) = ([zero; BLOCK], [0.0f64; BLOCK], [0.0f64; BLOCK]);
        for k in 0..part.chunks {
            let r = part.piece(k, b);
            for b0 in r.clone().step_by(BLOCK) {
                let n = (r.end - b0).min(BLOCK);
                // SAFETY: bucket b owns its pieces' entries (written by the first pass).
                let es = unsafe { std::slice::from_raw_parts_mut(ep.ptr().add(b0), n) };
                for (j, &e) in es.iter().enumerate() {
                    let (v, local) = decode(e);
                    let [pb, pa] = params.get(local as usize).copied().unwrap_or([f64::NAN; 2]);
                    (xs[j], bs[j], as_[j]) = (T::from_f64(f64::from(v)), pb, pa);
                }
                // SAFETY: n elements of each buffer; the write reads each before writing it.
                unsafe {
                    simd::lanes_write(
                        level,
                        xs.as_ptr(),
                        xs.as_mut_ptr(),
                        n,
                        bs.as_ptr(),
                        as_.as_ptr(),
                        exp,
                    )
                };
                for (e, y) in es.iter_mut().zip(&xs) {
                    // Exact: a float32-grade result is a float32 value.
                    *e = (*e & !0xFFFF_FFFF) | u64::from((y.to_f64() as f32).to_bits());
                }
            }
        }
    })?;
    parallel::for_each_piece(part.chunks, CHUNK, |range| {
        for k in range {
            let r0 = k * CHUNK;
            for b in 0..part.buckets {
                let next = (b + 1 < part.buckets).then_some((k, b + 1));
                for &e in part.read(k, b, next) {
                    let pos = (e >> 48) as usize;
                    let y = T::from_f64(f64::from(f32::from_bits(e as u32)));
                    // SAFETY: pos < CHUNK and r0 + pos < x.len() (the row the entry came
                    // from); chunk k owns out[r0..r0 + CHUNK].
                    unsafe { *out.ptr().add((r0 + pos).min(part.rows - 1)) = y };
                }
            }
        }
    });
    Ok(())
}

/// How many of the copies (parts and banks) of segment `s` met its max, from the parts'
/// bitmaps of `words` words each.
fn copies_at_max(met: &[u64], words: usize, banks: usize, num_segments: usize, s: usize) -> f64 {
    let copies = met.len() / words.max(1) * banks;
    let count = (0..copies)
        .filter(|&c| {
            let q = (c / banks) * words * 64 + (c % banks) * num_segments + s;
            met.get(q / 64).is_some_and(|w| w & (1 << (q % 64)) != 0)
        })
        .count();
    count as f64
}

/// Part `p`'s `n` elements of per-part arrays at `ptr`.
///
/// # Safety
/// `ptr` holds at least `(p + 1) * n` elements, and the caller owns part `p`'s.
unsafe fn part_of<'a, V>(ptr: SendPtr<V>, p: usize, n: usize) -> &'a mut [V] {
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(p * n), n) }
}

/// Folds the per-part arrays `all[p * n..(p + 1) * n]` into the first, part by part in
/// order for every element (so the result does not depend on the threads).
fn fold_parts<V: Copy + Send + Sync>(
    all: &mut [V],
    n: usize,
    parts: usize,
    fold: impl Fn(&mut V, V) + Sync + Send,
) {
    if parts < 2 {
        return;
    }
    let (first, rest) = all.split_at_mut(n);
    let (fp, rest) = (SendPtr(first.as_mut_ptr()), &*rest);
    parallel::for_each_piece(n, parts, |range| {
        for s in range {
            // SAFETY: pieces own disjoint s < n == first.len().
            let acc = unsafe { &mut *fp.ptr().add(s) };
            for p in 1..parts {
                fold(acc, rest[(p - 1) * n + s]);
            }
        }
    });
}

/// Fewer segments than this are scattered into [`BANKS`] copies of their maxima and sums, by
/// position: with few segments, consecutive elements mostly update the same one, and each
/// update would wait for the last.
const BANKED_BELOW: usize = 256;

/// The copies of the maxima and sums of few segments; element `k` of a part updates copy
/// `k % BANKS` (parts start at whole blocks, so that is the row's position modulo `BANKS`).
const BANKS: usize = 4;

/// The copies each part keeps of the maxima and sums of `num_segments` segments.
fn banks(num_segments: usize) -> usize {
    if num_segments < BANKED_BELOW {
        BANKS
    } else {
        1
    }
}

/// Whether a pass that reads per-segment data at random (`bytes` of it) fetches the
/// segments of elements ahead: only beyond 2 MiB. Below, the out-of-order core overlaps the
/// misses by itself and the fetches only cost instructions (measured on one thread, 2^24
/// float32 values in random ids, the passes here: 0.85-0.90x the time up to 2^15 segments,
/// 0.92x at 2^16, 0.98x at 2^17, no difference from 2^18 to 2^20; the softmax write
/// 0.93-0.98x at 2^10 segments).
pub(super) fn fetches_ahead(bytes: usize) -> bool {
    bytes > 2 << 20
}

/// How far ahead the passes fetch the next elements' segments.
const AHEAD: usize = 64;

/// The max of `m` and `v`, NaN if either is NaN (without a branch on the data).
#[inline(always)]
fn top(m: f32, v: f32) -> f32 {
    select_unpredictable(v > m || v.is_nan(), v, m)
}

/// The elements a pass reads, in order: each one's value and its segment as read (not yet
/// bounded).
trait Elements: Copy {
    fn len(self) -> usize;
    fn at(self, k: usize) -> (f32, u64);
}

/// Values beside their ids, as the caller gave them.
#[derive(Clone, Copy)]
struct Split<'a, T>(&'a [T], &'a [i64]);

impl<T: Real> Elements for Split<'_, T> {
    #[inline(always)]
    fn len(self) -> usize {
        self.0.len().min(self.1.len())
    }
    #[inline(always)]
    fn at(self, k: usize) -> (f32, u64) {
        // Exact: float32-grade values are float32 values.
        (self.0[k].to_f64() as f32, self.1[k] as u64)
    }
}

/// Partitioned [`entry`]s: the value and the segment within the bucket.
#[derive(Clone, Copy)]
struct Entries<'a>(&'a [u64]);

impl Elements for Entries<'_> {
    #[inline(always)]
    fn len(self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn at(self, k: usize) -> (f32, u64) {
        decode(self.0[k])
    }
}

/// The max of every segment's elements into `maxima` (NaN if any is NaN), which holds
/// `copies` copies of `num_segments` maxima (element `k` updates copy `k % copies`, a power
/// of two); `Err(k)` at the first element whose id is not a segment.
fn max_pass(
    xs: impl Elements,
    copies: usize,
    maxima: &mut [f32],
    num_segments: usize,
) -> Result<(), usize> {
    let last = num_segments.saturating_sub(1);
    let bank = copies - 1;
    let far = fetches_ahead(num_segments * 12);
    for k in 0..xs.len() {
        if far && k + AHEAD < xs.len() {
            let next = xs.at(k + AHEAD).1;
            simd::prefetch_line(maxima.as_ptr().wrapping_add((next as usize).min(last)));
        }
        // One read of each id, bounded here; only the bounded index is used.
        let (v, id) = xs.at(k);
        if id >= num_segments as u64 {
            return Err(k);
        }
        let Some(m) = maxima.get_mut((k & bank) * num_segments + id as usize) else {
            return Err(k);
        };
        *m = top(*m, v);
    }
    Ok(())
}

/// Adds `exp(x - max)` of every element to its segment's sum, a block of [`BLOCK`] at a
/// time: `pairs` holds the `copies` copies of every segment's `(max, sum)`, the max that of
/// the whole array. The block's maxima are read, its terms computed by one vector exp (0 for
/// `x = -inf`; the segments whose max is not finite are decided by the max alone) and added
/// in order. The first element of each copy equal to its max (`x - max == 0`: a float64
/// difference of two distinct float32 values is never 0) adds nothing and sets the copy's
/// bit in `met`; later ones add their term of 1. The max's own 1 thus never meets the small
/// terms: an excess far below 1 keeps its bits (`logsumexp([-40, 0])` is `4.2e-18`, not 0),
/// and once a copy adds a 1 the excess is at least 1. `false` when
/// an id no longer names a segment (another thread wrote it since the max pass checked it);
/// only bounded indices are used.
fn sum_pass(
    level: Level,
    xs: impl Elements,
    copies: usize,
    num_segments: usize,
    pairs: &mut [[f64; 2]],
    met: &mut [u64],
) -> bool {
    let last = num_segments.saturating_sub(1);
    let bank = copies - 1;
    let far = fetches_ahead(num_segments * 12);
    let (mut q, mut t, mut e) = ([0usize; BLOCK], [0.0f64; BLOCK], [0.0f64; BLOCK]);
    let mut ok = true;
    let len = xs.len();
    for b0 in (0..len).step_by(BLOCK) {
        let n = (len - b0).min(BLOCK);
        for k in 0..n {
            let (v, id) = xs.at(b0 + k);
            ok &= id < num_segments as u64;
            let s = (id as usize).min(last);
            // The next block's pairs are read after this block's exp.
            if far && b0 + BLOCK + k < len {
                let next = xs.at(b0 + BLOCK + k).1;
                let at = (k & bank) * num_segments + (next as usize).min(last);
                simd::prefetch_line(pairs.as_ptr().wrapping_add(at));
            }
            q[k] = (k & bank) * num_segments + s;
            t[k] = f64::from(v) - pairs.get(q[k]).map_or(f64::NAN, |p| p[0]);
            // At the max: rare (about once per segment), so the branch is predicted.
            if t[k] == 0.0 {
                let bit = 1u64 << (q[k] % 64);
                if let Some(word) = met.get_mut(q[k] / 64) {
                    if *word & bit == 0 {
                        *word |= bit;
                        t[k] = f64::NEG_INFINITY;
                    }
                }
            }
        }
        simd::exp_nonpos_f64(level, &t[..n], &mut e[..n], false);
        for k in 0..n {
            if let Some(pair) = pairs.get_mut(q[k]) {
                pair[1] += e[k];
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar;

    /// A deterministic pseudo-random stream (xorshift) for test data.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Values and unsorted ids, with a sprinkle of special values.
    fn data(seed: u64, rows: usize, segments: u64) -> (Vec<f32>, Vec<i64>) {
        let mut rng = Rng(seed);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let xs = (0..rows)
            .map(|_| match rng.below(4000) {
                k @ 0..3 => specials[k as usize],
                k => (k as f32 - 2000.0) / 37.0,
            })
            .collect();
        let ids = (0..rows).map(|_| rng.below(segments) as i64).collect();
        (xs, ids)
    }

    fn states(xs: &[f32], ids: &[i64], segments: usize) -> Vec<LseState> {
        let mut out = vec![LseState::EMPTY; segments];
        scatter_states(xs, ids, segments, &mut out).unwrap();
        out
    }

    #[test]
    fn matches_the_two_pass_reference_per_segment() {
        let (xs, ids) = data(5, 200_000, 3000);
        assert!(parts(xs.len(), 3000) > 1);
        let got = states(&xs, &ids, 3000);
        let mut rows = vec![Vec::new(); 3000];
        for (&x, &id) in xs.iter().zip(&ids) {
            rows[id as usize].push(x as f64);
        }
        for s in 0..3000 {
            // SAFETY: the row holds rows[s].len() elements.
            let want = unsafe { scalar::lse_state_two_pass(rows[s].as_ptr(), 0, rows[s].len(), 1) };
            let (g, w) = (got[s].logsumexp(), want.logsumexp());
            let n = rows[s].len() as f64;
            // The sums' roundings, and the float32-grade exp (2^-34 relative, every term).
            let tol = (3.0 * n + 4.0) * f64::EPSILON / 2.0
                + 4.0 * f64::EPSILON * w.abs()
                + 2f64.powi(-34);
            assert!(
                g.to_bits() == w.to_bits() || (g - w).abs() <= tol,
                "segment {s} of {n}: {g} vs {w}"
            );
        }
        let specials = [
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            1.0,
            f32::NAN,
            2.0,
            f32::INFINITY,
        ];
        let got = states(&specials, &[0, 0, 2, 2, 3, 3], 4);
        assert_eq!(got[0].logsumexp(), f64::NEG_INFINITY);
        assert_eq!(got[1].logsumexp(), f64::NEG_INFINITY);
        assert!(got[2].logsumexp().is_nan());
        assert_eq!(got[3].logsumexp(), f64::INFINITY);
    }

    #[test]
    fn elements_equal_to_the_max_are_counted_not_summed() {
        // The max's own term never meets the small ones: an excess of e^-40 keeps its bits
        // (1 + e^-40 would round to 1), and two elements at the max give 1 + e^-45.
        let got = states(&[-40.0, 0.0, 5.0, -40.0, 5.0, 7.0], &[0, 0, 1, 1, 1, 2], 3);
        let tiny = |t: f64| {
            let mut e = [0.0];
            simd::exp_nonpos_f64(simd::level(), &[t], &mut e, false);
            e[0]
        };
        assert_eq!(got[0].excess, tiny(-40.0));
        assert_eq!(got[1].excess, tiny(-45.0) + 1.0);
        assert_eq!((got[2].max, got[2].excess), (7.0, 0.0));
    }

    #[test]
    fn the_same_bits_for_any_thread_count() {
        let (xs, ids) = data(9, 600_000, 500);
        assert_eq!(parts(xs.len(), 500), MAX_PARTS);
        let mut runs = Vec::new();
        for threads in [1, 2, 3] {
            crate::parallel::set_num_threads(threads);
            runs.push(states(&xs, &ids, 500));
        }
        crate::parallel::set_num_threads(0);
        let bits = |r: &Vec<LseState>| -> Vec<(u64, u64)> {
            r.iter()
                .map(|s| (s.max.to_bits(), s.excess.to_bits()))
                .collect()
        };
        assert_eq!(bits(&runs[0]), bits(&runs[1]));
        assert_eq!(bits(&runs[0]), bits(&runs[2]));
    }

    #[test]
    fn blocks_never_show_in_the_bits() {
        // Increasing values: most elements raise their segment's max. Elements of an extra
        // segment in front move every block boundary; the other segments' states must not
        // change. With few segments (banked) an element's copy is its position modulo
        // BANKS, so there the shifts keep it.
        let rows = 5000;
        let xs: Vec<f32> = (0..rows).map(|r| (r as f32) * 0.01 - 20.0).collect();
        for (segments, shifts) in [(3i64, [4usize, 28, 252]), (300, [1, 7, 255])] {
            let total = segments as usize + 1;
            assert_eq!(banks(total) > 1, segments == 3);
            let ids: Vec<i64> = (0..rows as i64).map(|r| r % segments).collect();
            let base = states(&xs, &ids, total);
            for shift in shifts {
                let mut xs2 = vec![0.5f32; shift];
                xs2.extend_from_slice(&xs);
                let mut ids2 = vec![segments; shift];
                ids2.extend_from_slice(&ids);
                let got = states(&xs2, &ids2, total);
                for s in 0..segments as usize {
                    assert_eq!(got[s].max.to_bits(), base[s].max.to_bits());
                    assert_eq!(
                        got[s].excess.to_bits(),
                        base[s].excess.to_bits(),
                        "{shift} {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn partitioned_states_equal_the_unpartitioned_scatter_of_one_part() {
        // Both take each segment's sum in array order by one copy: the same bits. Rows over
        // several chunks, segments over several buckets and a partial last bucket, special
        // values; catches a piece gathered out of order, a lost line of the partition (the
        // lines shared between pieces), a local id or bucket mixed up. Buckets of 2^12
        // segments, then of 2^13 (over a million segments: at most 256 buckets).
        let widths = [
            (PARTITION_FROM + 3 * (1 << BUCKET_BITS) + 17, 12),
            ((1 << 20) + 3, 13),
        ];
        for (segments, bits) in widths {
            assert_eq!(bucket_bits(segments), bits);
            assert!(segments.div_ceil(1 << bits) <= MAX_BUCKETS);
            partitioned_states_equal_one_part(segments);
        }
    }

    fn partitioned_states_equal_one_part(segments: usize) {
        let (xs, ids) = data(11, 5 * CHUNK + 333, segments as u64);
        let got = states(&xs, &ids, segments);
        let mut want = vec![LseState::EMPTY; segments];
        let mut maxima = vec![f32::NEG_INFINITY; segments];
        max_pass(Split(&xs, &ids), 1, &mut maxima, segments).unwrap();
        let mut pairs: Vec<[f64; 2]> = maxima.iter().map(|&m| [f64::from(m), 0.0]).collect();
        let mut met = vec![0u64; segments.div_ceil(64)];
        assert!(sum_pass(
            simd::level(),
            Split(&xs, &ids),
            1,
            segments,
            &mut pairs,
            &mut met
        ));
        let words = met.len();
        for s in 0..segments {
            want[s] = finish(maxima[s], pairs[s][1], || {
                copies_at_max(&met, words, 1, segments, s)
            });
        }
        for s in 0..segments {
            let (g, w) = (got[s], want[s]);
            assert!(
                g.max.to_bits() == w.max.to_bits() && g.excess.to_bits() == w.excess.to_bits(),
                "segment {s}: {g:?} vs {w:?}"
            );
        }
    }

    #[test]
    fn partitioned_names_the_first_bad_id_across_chunks() {
        let segments = PARTITION_FROM;
        let (xs, mut ids) = data(4, 3 * CHUNK, segments as u64);
        ids[3 * CHUNK - 1] = -1;
        ids[CHUNK + 5] = segments as i64;
        ids[CHUNK + 9] = i64::MAX;
        let mut out = vec![LseState::EMPTY; segments];
        let err = scatter_states(&xs, &ids, segments, &mut out).unwrap_err();
        assert_eq!(
            err,
            SegmentError::IdOutOfRange {
                pos: CHUNK + 5,
                id: segments as i64,
                num_segments: segments
            }
        );
    }

    #[test]
    fn the_first_bad_id_is_named_across_parts() {
        let (xs, mut ids) = data(3, 400_000, 10);
        assert!(parts(xs.len(), 10) >= 4);
        ids[390_000] = -1;
        ids[250_001] = 10;
        ids[250_007] = 99;
        let mut out = vec![LseState::EMPTY; 10];
        let err = scatter_states(&xs, &ids, 10, &mut out).unwrap_err();
        assert_eq!(
            err,
            SegmentError::IdOutOfRange {
                pos: 250_001,
                id: 10,
                num_segments: 10
            }
        );
    }
}
