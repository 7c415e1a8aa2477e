//! Reductions over segments of rows: log-sum-exp, softmax, log_softmax and cross-entropy per
//! group, for ragged data (candidate lists per query, edges per node, rows per key of a table).
//!
//! The input is a C-contiguous `(rows, inner)` block (`inner == 1` for a 1-D array); segment
//! `s` is a set of rows, and each of its `inner` columns is reduced separately. Segments are
//! described three ways ([`Segments`]):
//!
//! - CSR offsets, `offsets[s]..offsets[s + 1]`, and sorted ids (turned into offsets in one
//!   scan): every segment is a contiguous run of rows. Single-column segments of at most
//!   `RAGGED_ROW` (64) rows are packed one per vector lane by `simd::ragged` (the short-row
//!   kernels on segments grouped by length: a segment's sum runs over its rows in order, at
//!   most about `n` float64 roundings); longer ones take the row kernels, and `inner > 1` the
//!   column kernels. Each segment's result depends on its own rows only, so the work is split over
//!   segments and nothing depends on the split (thread count), and sorted ids give the bits
//!   of the equivalent offsets.
//! - Unsorted ids: float32 single columns with states that fit the cache are scattered,
//!   every element into its segment's running max, then its running sum
//!   ([`super::segment_scatter`]: no sort, bit-identical for any thread count, within
//!   rounding of the sorted path). Otherwise a stable two-level counting sort (chunks of rows
//!   into buckets of consecutive ids, then each cache-sized bucket by segment) hands every
//!   segment's rows, in array order, to the same segment kernels; the pieces depend on the
//!   sizes alone, so results are bit-identical for any thread count and the states are those
//!   of the sorted path on the stably sorted input. Softmax then writes every element from
//!   its segment's finished state, gathered per element.
//!
//! Ids and offsets may be read where they lie while another thread writes them: every index
//! derived from them is bounded before use, so such a race changes results or raises
//! [`SegmentError::Shape`], never an access out of bounds.
//!
//! An empty segment has the empty state: log-sum-exp `-inf`, and nothing to write for softmax.

use super::{Algorithm, Reduction};
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd::{self, Level};
use crate::state::LseState;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::ptr::null;
use std::sync::atomic::{AtomicBool, Ordering};

/// How rows are grouped into segments. Ids and offsets are `i64` as NumPy's `intp`.
#[derive(Clone, Copy, Debug)]
pub enum Segments<'a> {
    /// CSR form: segment `s` is rows `offsets[s]..offsets[s + 1]`; `offsets[0] == 0` and the
    /// last offset is the number of rows.
    Offsets(&'a [i64]),
    /// One id in `0..num_segments` per row, non-decreasing.
    SortedIds { ids: &'a [i64], num_segments: usize },
    /// One id in `0..num_segments` per row, in any order.
    Ids { ids: &'a [i64], num_segments: usize },
}

impl Segments<'_> {
    /// The number of segments (outputs of log-sum-exp per column).
    pub fn count(&self) -> usize {
        match *self {
            Segments::Offsets(o) => o.len().saturating_sub(1),
            Segments::SortedIds { num_segments, .. } | Segments::Ids { num_segments, .. } => {
                num_segments
            }
        }
    }
}

/// Why a segment reduction refused its input. Nothing is written to a caller's output when
/// one of these is returned except to outputs the caller allocated and discards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentError {
    /// `segment_ids[pos] = id` is outside `[0, num_segments)` (Python: `IndexError`).
    IdOutOfRange {
        pos: usize,
        id: i64,
        num_segments: usize,
    },
    /// `segment_ids[pos] < segment_ids[pos - 1]` although the ids were declared sorted.
    NotSorted { pos: usize, id: i64, prev: i64 },
    /// The offsets are not a CSR partition of the rows; the message says how.
    BadOffsets(String),
    /// A cross-entropy target outside its segment (Python: `IndexError`).
    TargetOutOfRange {
        segment: usize,
        target: i64,
        len: usize,
    },
    /// Sizes that do not fit together (Python: `ValueError`).
    Shape(String),
    /// A work buffer could not be allocated (Python: `MemoryError`).
    Alloc,
}

impl std::fmt::Display for SegmentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SegmentError::IdOutOfRange {
                pos,
                id,
                num_segments,
            } => write!(
                f,
                "segment_ids[{pos}] = {id} is outside [0, {num_segments}) (num_segments = {num_segments})"
            ),
            SegmentError::NotSorted { pos, id, prev } => write!(
                f,
                "segment_ids[{pos}] = {id} is smaller than segment_ids[{}] = {prev}, but sorted=True",
                pos - 1
            ),
            SegmentError::BadOffsets(msg) | SegmentError::Shape(msg) => f.write_str(msg),
            SegmentError::TargetOutOfRange {
                segment,
                target,
                len,
            } => write!(
                f,
                "target[{segment}] = {target} is outside [0, {len}) (segment {segment} has {len} elements)"
            ),
            SegmentError::Alloc => f.write_str("cannot allocate the segment work buffers"),
        }
    }
}

impl std::error::Error for SegmentError {}

/// A vector of `n` copies of `v` ([`crate::error::try_vec`]), or [`SegmentError::Alloc`].
pub(super) fn try_vec<T: Clone>(n: usize, v: T) -> Result<Vec<T>, SegmentError> {
    crate::error::try_vec(n, v).map_err(|_| SegmentError::Alloc)
}

/// The rows of `x` for `inner` columns, or why `x` is not a whole number of rows.
fn rows_of<T>(x: &[T], inner: usize) -> Result<usize, SegmentError> {
    if inner == 0 {
        return Ok(0);
    }
    if !x.len().is_multiple_of(inner) {
        return Err(SegmentError::Shape(format!(
            "x holds {} elements, not a whole number of rows of {inner}",
            x.len()
        )));
    }
    Ok(x.len() / inner)
}

/// The first row of every segment and the end, `starts.len() == count + 1`, for the CSR forms;
/// `None` for unsorted ids. Validates offsets and sorted ids (first offending position).
fn csr_starts(seg: &Segments, rows: usize) -> Result<Option<Vec<usize>>, SegmentError> {
    match *seg {
        Segments::Ids { ids, .. } => {
            if ids.len() != rows {
                return Err(ids_len_error(ids.len(), rows));
            }
            Ok(None)
        }
        Segments::Offsets(offsets) => {
            let Some(&first) = offsets.first() else {
                return Err(SegmentError::BadOffsets(
                    "offsets must hold at least one element (offsets[0] = 0)".into(),
                ));
            };
            if first != 0 {
                return Err(SegmentError::BadOffsets(format!(
                    "offsets[0] = {first}, expected 0"
                )));
            }
            let mut starts = try_vec(offsets.len(), 0usize)?;
            let mut prev = 0i64;
            for (i, (&o, st)) in offsets.iter().zip(starts.iter_mut()).enumerate() {
                if o < prev {
                    return Err(SegmentError::BadOffsets(format!(
                        "offsets[{i}] = {o} is smaller than offsets[{}] = {prev}; offsets must be non-decreasing",
                        i - 1
                    )));
                }
                if o as u64 > rows as u64 {
                    return Err(SegmentError::BadOffsets(format!(
                        "offsets[{i}] = {o} exceeds the {rows} rows of x"
                    )));
                }
                *st = o as usize;
                prev = o;
            }
            if prev as usize != rows {
                return Err(SegmentError::BadOffsets(format!(
                    "offsets[{}] = {prev}, expected the number of rows of x, {rows}",
                    offsets.len() - 1
                )));
            }
            Ok(Some(starts))
        }
        Segments::SortedIds { ids, num_segments } => {
            if ids.len() != rows {
                return Err(ids_len_error(ids.len(), rows));
            }
            let mut starts = try_vec(num_segments + 1, rows)?;
            // Segment s starts at the first row r with ids[r] >= s: row r writes the starts of
            // ids[r - 1] + 1 ..= ids[r], so every start is written by exactly one row and
            // chunks of rows run in parallel. Segments after the last id start at `rows`.
            let sp = SendPtr(starts.as_mut_ptr());
            let chunk = 1usize << 16;
            let level = simd::level();
            let errors = parallel::map_collect(rows.div_ceil(chunk), chunk, |k| {
                let (r0, r1) = (k * chunk, ((k + 1) * chunk).min(rows));
                let prev = if r0 == 0 { -1 } else { ids[r0 - 1] };
                // SAFETY: starts holds num_segments + 1 elements.
                let (done, mut prev) = unsafe {
                    simd::ragged::sorted_id_starts(
                        level,
                        &ids[r0..r1],
                        r0,
                        prev,
                        num_segments,
                        sp.ptr(),
                    )
                };
                // The rest, row by row: the first block with an offending id, and the tail.
                let r0 = r0 + done;
                for (r, &id) in (r0..r1).zip(&ids[r0..r1]) {
                    // Runs of one id are the common case; a run starting with an invalid id
                    // is reported at its first row, by this chunk or an earlier one. Row 0
                    // has no run before it (its id may be -1, the `prev` of row 0).
                    if id == prev && r != 0 {
                        continue;
                    }
                    if id < 0 || id as u64 >= num_segments as u64 {
                        return Some(SegmentError::IdOutOfRange {
                            pos: r,
                            id,
                            num_segments,
                        });
                    }
                    if id < prev {
                        return Some(SegmentError::NotSorted { pos: r, id, prev });
                    }
                    // A previous id out of range is reported by its own chunk, first.
                    let from = (prev + 1).max(0) as usize;
                    for s in from..=id as usize {
                        // SAFETY: s <= id < num_segments; row r alone writes these starts.
                        unsafe { *sp.ptr().add(s) = r };
                    }
                    prev = id;
                }
                None
            });
            // Chunks are in row order: the first error found is the first offending row.
            if let Some(err) = errors.into_iter().flatten().next() {
                return Err(err);
            }
            // Ids read twice at chunk edges disagree only if another thread changed them
            // during the call; the row ranges must still be ranges of x.
            if starts.windows(2).any(|w| w[0] > w[1]) {
                return Err(changed_ids());
            }
            Ok(Some(starts))
        }
    }
}

/// Ids that passed validation but read differently later: another thread wrote them.
pub(super) fn changed_ids() -> SegmentError {
    SegmentError::Shape("segment_ids changed while the call was reading it".into())
}

fn ids_len_error(ids: usize, rows: usize) -> SegmentError {
    SegmentError::Shape(format!(
        "segment_ids has {ids} elements but x has {rows} rows along the segment axis"
    ))
}

/// The `(max, excess)` state of every segment and column, `out[s * inner + j]`
/// (`out.len() == seg.count() * inner`). This is what a streaming or chunked caller merges.
pub fn segment_states<T: Real>(
    x: &[T],
    inner: usize,
    seg: Segments,
    out: &mut [LseState],
) -> Result<(), SegmentError> {
    let rows = rows_of(x, inner)?;
    check_len("out", out.len(), seg.count() * inner)?;
    match csr_starts(&seg, rows)? {
        Some(starts) => csr_states(simd::level(), x, inner, &starts, out),
        None => {
            if let Segments::Ids { ids, num_segments } = seg {
                unsorted_states(x, inner, ids, num_segments, out, None)?;
            }
        }
    }
    Ok(())
}

/// `log(sum(exp(x)))` of every segment and column into `out` (`seg.count() * inner`);
/// `-inf` for an empty segment.
pub fn segment_logsumexp<T: Real>(
    x: &[T],
    inner: usize,
    seg: Segments,
    out: &mut [T],
) -> Result<(), SegmentError> {
    let rows = rows_of(x, inner)?;
    let width = seg.count() * inner;
    check_len("out", out.len(), width)?;
    match csr_starts(&seg, rows)? {
        Some(starts) if inner == 1 => {
            // The state is finished per segment: no buffer of states.
            let (xp, op) = (SendPtr(x.as_ptr() as *mut T), SendPtr(out.as_mut_ptr()));
            let level = simd::level();
            for_each_segment_piece(&starts, 1, |range| {
                // SAFETY: every segment's rows lie inside x (validated starts); the piece owns
                // out[range].
                unsafe {
                    let piece = &starts[range.start..=range.end];
                    let (x, o) = (xp.ptr() as *const T, op.ptr().add(range.start));
                    simd::ragged::logsumexp(level, x, piece, o);
                }
                for s in range {
                    let (r0, r1) = (starts[s], starts[s + 1]);
                    if !simd::ragged::is_ragged_short(r1 - r0) {
                        // SAFETY: as above.
                        unsafe {
                            let row =
                                std::slice::from_raw_parts(xp.ptr().add(r0) as *const T, r1 - r0);
                            *op.ptr().add(s) =
                                T::from_f64(super::row_state(row, Algorithm::Auto).logsumexp());
                        }
                    }
                }
            });
        }
        starts => {
            let mut states = try_vec(width, LseState::EMPTY)?;
            match (starts, seg) {
                (Some(starts), _) => csr_states(simd::level(), x, inner, &starts, &mut states),
                (None, Segments::Ids { ids, num_segments }) => {
                    unsorted_states(x, inner, ids, num_segments, &mut states, None)?
                }
                (None, _) => {}
            }
            if T::FULL {
                write_from_states(&states, out, |s| s.logsumexp());
            } else {
                // float32-grade: the vector log1p of the row kernels, a piece at a time (one
                // libm log1p per segment would cost as much as the scatter for many segments).
                let (op, level) = (SendPtr(out.as_mut_ptr()), simd::level());
                parallel::for_each_piece(states.len(), 8, |range| {
                    // SAFETY: the piece owns out[range]; the level is the process's.
                    unsafe {
                        simd::states_logsumexp(
                            level,
                            &states[range.clone()],
                            op.ptr().add(range.start),
                        )
                    };
                });
            }
        }
    }
    Ok(())
}

/// Softmax or log_softmax of every segment and column into `out` (x's shape). Rows of an
/// empty segment do not exist, so nothing is written for it; a segment's non-finite state
/// gives scipy's values (as [`super::softmax_like`]).
pub fn segment_softmax_like<T: Real>(
    x: &[T],
    inner: usize,
    seg: Segments,
    what: Reduction,
    out: &mut [T],
) -> Result<(), SegmentError> {
    check_len("out", out.len(), x.len())?;
    // SAFETY: x and out are distinct borrows of the same length.
    unsafe { softmax_like_raw(x.as_ptr(), out.as_mut_ptr(), x.len(), inner, seg, what) }
}

/// [`segment_softmax_like`] in place: `buf` holds x and receives the result. Every element
/// is read (into its segment's state) before it is written.
pub fn segment_softmax_like_inplace<T: Real>(
    buf: &mut [T],
    inner: usize,
    seg: Segments,
    what: Reduction,
) -> Result<(), SegmentError> {
    let p = buf.as_mut_ptr();
    // SAFETY: x and out are the same buffer of buf.len() elements.
    unsafe { softmax_like_raw(p as *const T, p, buf.len(), inner, seg, what) }
}

/// # Safety
/// `x` readable and `out` writable for `len` elements; they are disjoint or equal.
unsafe fn softmax_like_raw<T: Real>(
    x: *const T,
    out: *mut T,
    len: usize,
    inner: usize,
    seg: Segments,
    what: Reduction,
) -> Result<(), SegmentError> {
    // SAFETY: the caller's contract. Nothing is written through `out` while `xs` is used,
    // except elements of other segments (disjoint) or after their segment's state is final.
    let xs = unsafe { std::slice::from_raw_parts(x, len) };
    let rows = rows_of(xs, inner)?;
    let level = simd::level();
    let (xp, op) = (SendPtr(x as *mut T), SendPtr(out));
    match (csr_starts(&seg, rows)?, seg) {
        (Some(starts), _) => {
            // SAFETY: forwarded.
            unsafe { csr_softmax_like(level, xp, len, inner, &starts, what, op) };
        }
        (None, Segments::Ids { ids, num_segments })
            if super::segment_scatter::partitions::<T>(inner, num_segments) =>
        {
            let exp = what == Reduction::Softmax;
            // SAFETY: forwarded.
            unsafe {
                super::segment_scatter::partitioned_softmax_like(xs, ids, num_segments, exp, op)?
            };
        }
        (None, Segments::Ids { ids, num_segments }) => {
            let mut states = try_vec(num_segments * inner, LseState::EMPTY)?;
            // A separate output is about to be overwritten: it holds the sorted values in the
            // meantime (no fresh buffer of x's size to fault in).
            let work = (!std::ptr::eq(x, out)).then(|| {
                // SAFETY: out is writable for len elements, disjoint from x, and unused until
                // the states are final.
                unsafe { std::slice::from_raw_parts_mut(out as *mut MaybeUninit<T>, len) }
            });
            unsorted_states(xs, inner, ids, num_segments, &mut states, work)?;
            let params = WriteParams::of::<T>(&states, what == Reduction::Softmax)?;
            // SAFETY: forwarded; every state is final.
            unsafe {
                gather_write(
                    level,
                    xp,
                    len,
                    inner,
                    ids,
                    &params,
                    what == Reduction::Softmax,
                    op,
                )
            };
        }
        (None, _) => {}
    }
    Ok(())
}

/// Softmax or log_softmax of every element of a C-contiguous `(rows, inner)` block `x` from
/// the finished state of its segment, `states[ids[r] * inner + j]`: how one chunk of a larger
/// array is written once the states of all its chunks are merged. The writes are those of the
/// unsorted path of [`segment_softmax_like`].
pub fn segment_softmax_from_states<T: Real>(
    x: &[T],
    inner: usize,
    ids: &[i64],
    states: &[LseState],
    what: Reduction,
    out: &mut [T],
) -> Result<(), SegmentError> {
    let rows = rows_of(x, inner)?;
    check_len("out", out.len(), x.len())?;
    if ids.len() != rows {
        return Err(ids_len_error(ids.len(), rows));
    }
    if inner == 0 {
        return Ok(());
    }
    if !states.len().is_multiple_of(inner) {
        return Err(SegmentError::Shape(format!(
            "{} states are not a whole number of segments of {inner} columns",
            states.len()
        )));
    }
    let num_segments = states.len() / inner;
    if let Some((pos, &id)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id < 0 || id as u64 >= num_segments as u64)
    {
        return Err(SegmentError::IdOutOfRange {
            pos,
            id,
            num_segments,
        });
    }
    let exp = what == Reduction::Softmax;
    let params = WriteParams::of::<T>(states, exp)?;
    let (xp, op) = (SendPtr(x.as_ptr() as *mut T), SendPtr(out.as_mut_ptr()));
    // SAFETY: x and out are distinct borrows of x.len() elements; ids are in range.
    unsafe { gather_write(simd::level(), xp, x.len(), inner, ids, &params, exp, op) };
    Ok(())
}

fn check_len(name: &str, len: usize, need: usize) -> Result<(), SegmentError> {
    if len != need {
        return Err(SegmentError::Shape(format!(
            "{name} holds {len} elements, expected {need}"
        )));
    }
    Ok(())
}

/// `out[q] = f(states[q])` in parallel pieces.
fn write_from_states<T: Real>(
    states: &[LseState],
    out: &mut [T],
    f: impl Fn(LseState) -> f64 + Sync,
) {
    let op = SendPtr(out.as_mut_ptr());
    parallel::for_each_piece(states.len(), 8, |range| {
        for q in range {
            // SAFETY: q < states.len() == out.len(); pieces own disjoint q.
            unsafe { *op.ptr().add(q) = T::from_f64(f(states[q])) };
        }
    });
}

/// Calls `f(range)` for consecutive ranges of segments covering them all, in parallel pieces
/// weighted by the mean segment size (`inner` columns per row). Each segment must be
/// computed on its own, so that the result does not depend on how the segments are grouped.
fn for_each_segment_piece<F>(starts: &[usize], inner: usize, f: F)
where
    F: Fn(Range<usize>) + Sync + Send,
{
    let count = starts.len().saturating_sub(1);
    if count == 0 {
        return;
    }
    let rows = starts[count];
    let per_segment = (rows * inner).div_ceil(count).max(1);
    parallel::for_each_piece(count, per_segment, f);
}

/// Calls `f(s, r0, r1)` for every segment (rows `r0..r1`) in parallel pieces.
fn for_each_segment<F>(starts: &[usize], inner: usize, f: F)
where
    F: Fn(usize, usize, usize) + Sync + Send,
{
    for_each_segment_piece(starts, inner, |range| {
        for s in range {
            f(s, starts[s], starts[s + 1]);
        }
    });
}

/// States of contiguous-row segments: the ragged short-row kernel for segments of
/// `1..=RAGGED_ROW` (64) rows and the row kernel for longer ones (`inner == 1`), or the column
/// kernel.
fn csr_states<T: Real>(
    level: Level,
    x: &[T],
    inner: usize,
    starts: &[usize],
    out: &mut [LseState],
) {
    let (xp, op) = (SendPtr(x.as_ptr() as *mut T), SendPtr(out.as_mut_ptr()));
    if inner == 1 {
        for_each_segment_piece(starts, 1, |range| {
            // SAFETY: every segment's rows lie inside x (validated starts); the piece owns
            // out[range].
            unsafe {
                let piece = &starts[range.start..=range.end];
                let (x, o) = (xp.ptr() as *const T, op.ptr().add(range.start));
                simd::ragged::states(level, x, piece, o);
            }
            for s in range {
                let (r0, r1) = (starts[s], starts[s + 1]);
                if !simd::ragged::is_ragged_short(r1 - r0) {
                    // SAFETY: as above.
                    unsafe {
                        let row = std::slice::from_raw_parts(xp.ptr().add(r0) as *const T, r1 - r0);
                        *op.ptr().add(s) = super::row_state(row, Algorithm::Auto);
                    }
                }
            }
        });
        return;
    }
    for_each_segment(starts, inner, |s, r0, r1| {
        // SAFETY: rows r0..r1 lie inside x (validated starts); segment s owns
        // out[s * inner..(s + 1) * inner].
        unsafe {
            let slab =
                std::slice::from_raw_parts(xp.ptr().add(r0 * inner) as *const T, (r1 - r0) * inner);
            let o = std::slice::from_raw_parts_mut(op.ptr().add(s * inner), inner);
            if r1 == r0 {
                o.fill(LseState::EMPTY);
            } else {
                let batch = Batch::contiguous(1, r1 - r0, inner);
                // Cannot fail: the level is the process's and the sizes match by construction.
                let _ = super::lse_states_at(level, slab, batch, Algorithm::Auto, o);
            }
        }
    });
}

/// Softmax-like over contiguous-row segments, each written from its own finished state.
///
/// # Safety
/// `xp` readable and `op` writable for `len` elements (x's), disjoint or equal; `starts`
/// validated against the rows.
unsafe fn csr_softmax_like<T: Real>(
    level: Level,
    xp: SendPtr<T>,
    len: usize,
    inner: usize,
    starts: &[usize],
    what: Reduction,
    op: SendPtr<T>,
) {
    let inplace = std::ptr::eq(xp.ptr(), op.ptr());
    debug_assert!(starts.last().is_none_or(|&r| r * inner <= len));
    if inner == 1 {
        let log = what == Reduction::LogSoftmax;
        for_each_segment_piece(starts, 2, |range| {
            let x = xp.ptr() as *const T;
            // SAFETY: every segment's rows lie inside x and out (validated starts) and belong
            // to this piece alone; each is read before it is written.
            unsafe {
                let piece = &starts[range.start..=range.end];
                simd::ragged::softmax(level, x, piece, op.ptr(), log);
            }
            for s in range {
                let (r0, r1) = (starts[s], starts[s + 1]);
                if r1 > r0 && !simd::ragged::is_ragged_short(r1 - r0) {
                    // SAFETY: as above; the state is final before the first write.
                    unsafe {
                        let (xr, n) = (x.add(r0), r1 - r0);
                        let row = std::slice::from_raw_parts(xr, n);
                        let state = super::row_state(row, Algorithm::Auto);
                        super::write_row(
                            level,
                            (xr, null()),
                            op.ptr().add(r0),
                            n,
                            state,
                            what,
                            false,
                        );
                    }
                }
            }
        });
        return;
    }
    for_each_segment(starts, 2 * inner, |_, r0, r1| {
        if r1 == r0 {
            return;
        }
        let (first, n) = (r0 * inner, (r1 - r0) * inner);
        // SAFETY: elements first..first+n lie inside x and out and belong to this segment
        // alone; in place, the state is final before the first write.
        unsafe {
            let xr = xp.ptr().add(first) as *const T;
            let or = op.ptr().add(first);
            let batch = Batch::contiguous(1, r1 - r0, inner);
            // Cannot fail: the level is the process's and the sizes match by construction.
            let _ = if inplace {
                let buf = std::slice::from_raw_parts_mut(or, n);
                super::softmax_like_inplace_at(level, buf, batch, Algorithm::Auto, what)
            } else {
                let slab = std::slice::from_raw_parts(xr, n);
                let o = std::slice::from_raw_parts_mut(or, n);
                super::softmax_like_at(level, slab, batch, Algorithm::Auto, what, o)
            };
        }
    });
}

/// The most buckets the first level of the unsorted path uses (one output stream each).
const SORT_BUCKETS: usize = 64;

/// A vector of `n` uninitialised elements, or [`SegmentError::Alloc`]. Skipping the fill
/// saves a pass over memory that is about to be overwritten. It asks for huge pages
/// ([`crate::error::advise_huge_pages`]).
pub(super) fn try_uninit<T>(n: usize) -> Result<Vec<MaybeUninit<T>>, SegmentError> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| SegmentError::Alloc)?;
    // SAFETY: MaybeUninit needs no initialisation; the capacity was reserved.
    unsafe { out.set_len(n) };
    crate::error::advise_huge_pages(out.as_ptr() as usize, std::mem::size_of_val(out.as_slice()));
    Ok(out)
}

/// Copies one row of `inner` elements; a plain move for the common `inner == 1` (a call to
/// `memcpy` per element costs more than the rest of the sort).
///
/// # Safety
/// `src` readable and `dst` writable for `inner` elements, not overlapping.
#[inline(always)]
unsafe fn copy_row<T: Copy>(src: *const T, dst: *mut T, inner: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        if inner == 1 {
            *dst = *src;
        } else {
            std::ptr::copy_nonoverlapping(src, dst, inner);
        }
    }
}

/// Where each bucket of a chunk starting at row `r0` starts, from the buckets' counts, into
/// `starts` (one more than the buckets: the last is the chunk's end).
pub(super) fn bucket_starts(r0: usize, count: &[usize], starts: &mut [usize]) {
    let mut run = r0;
    for (s, &c) in starts.iter_mut().zip(count) {
        *s = run;
        run += c;
    }
    starts[count.len()] = run;
}

/// Rows of the first level of the unsorted path handled together: their ids, values and sorted
/// copies stay in the cache between the count and the scatter.
const SORT_CHUNK: usize = 1 << 16;

/// States of unsorted segments: scattered where [`super::segment_scatter::applies`], else
/// through a stable two-level counting sort into the sorted path.
///
/// First level: the rows are cut into chunks of [`SORT_CHUNK`]; each chunk counts its rows
/// per bucket of consecutive segment ids (at most [`SORT_BUCKETS`]) and scatters them, in
/// array order, into its own region of two work buffers (values and ids within the bucket),
/// grouped by bucket. The ids are read from memory once: the scatter re-reads them from the
/// cache. Second level: each bucket gathers its pieces from every chunk in chunk order (so
/// its rows stay in array order), sorts them by segment into a scratch buffer small enough
/// for the cache, and reduces its segments there with the row kernels of the sorted path, as
/// contiguous runs. Every segment is thus reduced over its rows in array order, exactly as
/// the sorted path reduces the stably sorted input; the pieces depend on the sizes alone, so
/// the result is the same for any thread count. Ids are validated by the first level; the
/// first offending position is reported. `work`, when it holds `x.len()` elements, is used as
/// the values' work buffer instead of a fresh one.
fn unsorted_states<T: Real>(
    x: &[T],
    inner: usize,
    ids: &[i64],
    num_segments: usize,
    out: &mut [LseState],
    work: Option<&mut [MaybeUninit<T>]>,
) -> Result<(), SegmentError> {
    let rows = ids.len();
    debug_assert_eq!(x.len(), rows * inner);
    debug_assert_eq!(out.len(), num_segments * inner);
    if super::segment_scatter::applies::<T>(inner, num_segments) {
        return super::segment_scatter::scatter_states(x, ids, num_segments, out);
    }
    let bits = usize::BITS - num_segments.saturating_sub(1).leading_zeros();
    // Local ids within a bucket are u32; 2^40 segments could not be allocated anyway.
    if bits > 40 {
        return Err(SegmentError::Alloc);
    }
    let shift = bits.saturating_sub(SORT_BUCKETS.trailing_zeros());
    let buckets = if num_segments == 0 {
        1
    } else {
        ((num_segments - 1) >> shift) + 1
    };
    let chunks = rows.div_ceil(SORT_CHUNK).max(1);
    // pieces[k * (buckets + 1) + b]: where bucket b of chunk k starts in the work buffers;
    // pieces[k * (buckets + 1) + buckets] is the chunk's end.
    let stride = buckets + 1;
    let mut pieces = try_vec(chunks * stride, 0usize)?;
    let mut own_x: Vec<MaybeUninit<T>>;
    let tmp_x: &mut [MaybeUninit<T>] = match work {
        Some(w) if w.len() == x.len() => w,
        _ => {
            own_x = try_uninit::<T>(x.len())?;
            &mut own_x
        }
    };
    let mut tmp_local = try_uninit::<u32>(rows)?;
    let (tp, lp) = (
        SendPtr(tmp_x.as_mut_ptr() as *mut T),
        SendPtr(tmp_local.as_mut_ptr() as *mut u32),
    );
    let pp = SendPtr(pieces.as_mut_ptr());
    let mask = (1usize << shift) - 1;
    let changed = AtomicBool::new(false);
    let errors = parallel::map_collect(chunks, SORT_CHUNK * inner.max(1), |k| {
        let (r0, r1) = ((k * SORT_CHUNK).min(rows), ((k + 1) * SORT_CHUNK).min(rows));
        // SAFETY: chunk k owns pieces[k * stride..(k + 1) * stride].
        let starts = unsafe { std::slice::from_raw_parts_mut(pp.ptr().add(k * stride), stride) };
        let mut count = [0usize; SORT_BUCKETS];
        for (r, &id) in (r0..r1).zip(&ids[r0..r1]) {
            if id < 0 || id as u64 >= num_segments as u64 {
                return Some(SegmentError::IdOutOfRange {
                    pos: r,
                    id,
                    num_segments,
                });
            }
            count[((id as usize) >> shift) & (SORT_BUCKETS - 1)] += 1;
        }
        bucket_starts(r0, &count[..buckets], starts);
        // Cursors and ends of this chunk's buckets. The ids are read again (from the cache):
        // one changed since the count (another thread) is caught by the bounds below, never
        // written outside this chunk's region, and reported after the pass.
        let mut cur = [0usize; SORT_BUCKETS];
        cur[..buckets].copy_from_slice(&starts[..buckets]);
        for (r, &id) in (r0..r1).zip(&ids[r0..r1]) {
            let id = id as usize;
            let b = id >> shift;
            match (cur.get_mut(b), starts.get(b + 1)) {
                (Some(slot), Some(&end)) if id < num_segments && *slot < end => {
                    let p = *slot;
                    *slot += 1;
                    // SAFETY: r0 <= p < r1: the chunk's own rows of both buffers; row r
                    // lies inside x.
                    unsafe {
                        *lp.ptr().add(p) = (id & mask) as u32;
                        copy_row(x.as_ptr().add(r * inner), tp.ptr().add(p * inner), inner);
                    }
                }
                _ => changed.store(true, Ordering::Relaxed),
            }
        }
        // Every cursor at its end means every row of the chunk was written exactly once.
        if cur[..buckets] != starts[1..] {
            changed.store(true, Ordering::Relaxed);
        }
        None
    });
    // Chunks are in row order: the first error found is the first offending position.
    if let Some(err) = errors.into_iter().flatten().next() {
        return Err(err);
    }
    if changed.into_inner() {
        return Err(changed_ids());
    }
    // SAFETY: the first level wrote every row of both buffers exactly once (checked above).
    let (tmp_x, tmp_local) = unsafe {
        (
            std::slice::from_raw_parts(tmp_x.as_ptr() as *const T, x.len()),
            std::slice::from_raw_parts(tmp_local.as_ptr() as *const u32, rows),
        )
    };
    let pieces = &pieces;
    let piece = |k: usize, b: usize| pieces[k * stride + b]..pieces[k * stride + b + 1];
    let bucket_len = |b: usize| (0..chunks).map(|k| piece(k, b).len()).sum::<usize>();
    // Second level: each bucket sorts its rows by local id into a scratch buffer and reduces
    // its segments there.
    let failed = AtomicBool::new(false);
    let op = SendPtr(out.as_mut_ptr());
    let per_bucket = (rows * inner.max(1)).div_ceil(buckets).max(1);
    let level = simd::level();
    parallel::for_each_piece(buckets, per_bucket, |range| {
        // One scratch and one cursor array per piece of buckets, sized for its largest
        // bucket: a fresh allocation per bucket would be a fresh mapping for large buckets.
        let most = range.clone().map(bucket_len).max().unwrap_or(0);
        let (Ok(mut scratch), Ok(mut starts)) = (
            try_uninit::<T>(most * inner),
            try_vec((1usize << shift).min(num_segments) + 1, 0usize),
        ) else {
            failed.store(true, Ordering::Relaxed);
            return;
        };
        for b in range {
            let n = bucket_len(b);
            let base = b << shift;
            let segs = ((b + 1) << shift).min(num_segments) - base;
            let starts = &mut starts[..segs + 1];
            starts.fill(0);
            for k in 0..chunks {
                for &l in &tmp_local[piece(k, b)] {
                    starts[l as usize + 1] += 1;
                }
            }
            for s in 1..=segs {
                starts[s] += starts[s - 1];
            }
            // Cursors: starts[l] advanced in place, then shifted back below.
            let sp = scratch.as_mut_ptr() as *mut T;
            for k in 0..chunks {
                let range = piece(k, b);
                for (p, &l) in range.clone().zip(&tmp_local[range]) {
                    let slot = &mut starts[l as usize];
                    // SAFETY: slot < n (counting sort); row p lies inside tmp_x.
                    unsafe {
                        copy_row(tmp_x.as_ptr().add(p * inner), sp.add(*slot * inner), inner)
                    };
                    *slot += 1;
                }
            }
            for s in (1..=segs).rev() {
                starts[s] = starts[s - 1];
            }
            starts[0] = 0;
            // SAFETY: the scatter wrote every row of the scratch; bucket b owns the states of
            // segments base..base + segs.
            unsafe {
                let sorted = std::slice::from_raw_parts(sp as *const T, n * inner);
                let o = std::slice::from_raw_parts_mut(op.ptr().add(base * inner), segs * inner);
                csr_states(level, sorted, inner, starts, o);
            }
        }
    });
    if failed.into_inner() {
        return Err(SegmentError::Alloc);
    }
    Ok(())
}

/// Per state the parameters of the gathered write ([`gather_write`]).
enum WriteParams {
    /// `(b, a)` of [`super::write_params`]: `a * exp(x - b)` (softmax) or `(x - b) - a`
    /// (log_softmax).
    Pair(Vec<[f64; 2]>),
    /// A softmax's `b = max + ln(1 + excess)` (NaN for a state without a finite max), written
    /// as `exp(x - b)`: half the bytes of [`WriteParams::Pair`] to gather at random per element,
    /// for the same results within the exp's error. `b` rounds to float64 where the pair's
    /// `a` does, an error of `2^-53 |b|` relative in the result, under `2^-37` for the maxima
    /// this form is taken for ([`COMPACT_MAX`]).
    Lse(Vec<f64>),
}

/// The largest `|max|` over the states for which a softmax gathers [`WriteParams::Lse`].
const COMPACT_MAX: f64 = 65536.0;

/// `f(q, states[q])` for every state, computed in parallel pieces.
fn per_state<P: Copy + Send + Sync>(
    states: &[LseState],
    f: impl Fn(usize, LseState) -> P + Sync,
) -> Result<Vec<P>, SegmentError> {
    let Some(&first) = states.first() else {
        return Ok(Vec::new());
    };
    let mut params = try_vec(states.len(), f(0, first))?;
    let pp = SendPtr(params.as_mut_ptr());
    parallel::for_each_piece(states.len(), 8, |range| {
        for q in range {
            // SAFETY: pieces own disjoint q < params.len().
            unsafe { *pp.ptr().add(q) = f(q, states[q]) };
        }
    });
    Ok(params)
}

/// Per state the pair `(b, a)` of [`super::write_params`] for results of `T`, with `a` of a
/// softmax scaled by `scale(q)` (the loss gradient's weight; 1 for softmax).
fn try_params<T: Real>(
    states: &[LseState],
    exp: bool,
    scale: impl Fn(usize) -> f64 + Sync,
) -> Result<Vec<[f64; 2]>, SegmentError> {
    per_state(states, |q, s| {
        let (b, a) = super::write_params::<T>(crate::simd::level(), s, exp);
        [b, if exp { a * scale(q) } else { a }]
    })
}

impl WriteParams {
    /// The softmax (`exp`) or log_softmax parameters of `states` for results of `T`:
    /// [`WriteParams::Lse`] for a float32-grade softmax whose every finite max is within
    /// [`COMPACT_MAX`] (`2^-37` would show in a float64 result), else the pairs.
    fn of<T: Real>(states: &[LseState], exp: bool) -> Result<Self, SegmentError> {
        let compact = exp
            && !T::FULL
            && states
                .iter()
                .all(|s| !s.max.is_finite() || s.max.abs() <= COMPACT_MAX);
        if !compact {
            return try_params::<T>(states, exp, |_| 1.0).map(Self::Pair);
        }
        let lse = per_state(states, |_, s| {
            if s.max.is_finite() {
                s.max + s.log_total()
            } else {
                f64::NAN
            }
        })?;
        Ok(Self::Lse(lse))
    }
}

/// Elements gathered per call of the lane write.
const GATHER: usize = 256;

/// Writes every element of unsorted segments from its segment's parameters:
/// `out = a * exp(x - b)` (softmax) or `(x - b) - a` (log_softmax), the column write pass of
/// the kernels with `(b, a)` gathered per element. Ids were validated by the states pass.
///
/// # Safety
/// `xp` readable and `op` writable for `len` elements, disjoint or equal (each element is
/// read before it is written).
#[allow(clippy::too_many_arguments)]
unsafe fn gather_write<T: Real>(
    level: Level,
    xp: SendPtr<T>,
    len: usize,
    inner: usize,
    ids: &[i64],
    params: &WriteParams,
    exp: bool,
    op: SendPtr<T>,
) {
    // SAFETY: forwarded.
    unsafe {
        match params {
            WriteParams::Pair(p) => {
                gather_write_with(level, xp, len, inner, ids, p, exp, op, |q| {
                    p.get(q).map_or((f64::NAN, f64::NAN), |&[b, a]| (b, a))
                })
            }
            WriteParams::Lse(p) => gather_write_with(level, xp, len, inner, ids, p, exp, op, |q| {
                (p.get(q).copied().unwrap_or(f64::NAN), 1.0)
            }),
        }
    }
}

/// [`gather_write`] with the parameters `(b, a)` of state `q` from `get(q)` (NaN for a `q`
/// out of range), which reads them from `params` (fetched ahead where they outgrow the cache).
///
/// # Safety
/// As [`gather_write`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gather_write_with<T: Real, P: Sync>(
    level: Level,
    xp: SendPtr<T>,
    len: usize,
    inner: usize,
    ids: &[i64],
    params: &[P],
    exp: bool,
    op: SendPtr<T>,
    get: impl Fn(usize) -> (f64, f64) + Sync,
) {
    let chunks = len.div_ceil(GATHER);
    parallel::for_each_piece(chunks, 2 * GATHER, |range| {
        let (mut b, mut a) = ([0.0f64; GATHER], [0.0f64; GATHER]);
        let last = params.len().saturating_sub(1);
        let far =
            inner == 1 && super::segment_scatter::fetches_ahead(std::mem::size_of_val(params));
        for c in range {
            let e0 = c * GATHER;
            let n = GATHER.min(len - e0);
            for k in 0..n {
                let e = e0 + k;
                // The next chunk's parameters are fetched while this one is written.
                if far {
                    if let Some(&id) = ids.get(e + GATHER) {
                        simd::prefetch_line(params.as_ptr().wrapping_add((id as usize).min(last)));
                    }
                }
                let (r, j) = if inner == 1 {
                    (e, 0)
                } else {
                    (e / inner, e % inner)
                };
                let q = ids.get(r).map_or(usize::MAX, |&id| id as usize * inner + j);
                (b[k], a[k]) = get(q);
            }
            // SAFETY: elements e0..e0+n lie inside x and out and belong to this chunk.
            unsafe {
                simd::lanes_write(
                    level,
                    (xp.ptr() as *const T).add(e0),
                    op.ptr().add(e0),
                    n,
                    b.as_ptr(),
                    a.as_ptr(),
                    exp,
                );
            }
        }
    });
}

/// The result of [`segment_cross_entropy`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegmentLoss {
    /// The sum of the losses of the segments whose target is not `ignore_index`.
    pub sum: f64,
    /// How many segments count (the mean's denominator).
    pub count: usize,
}

/// Cross-entropy of each segment of a 1-D `x` against the position of its positive element
/// *within the segment* (`target[s]` in `0..len(s)`, or `ignore_index` to leave the segment
/// out): `loss[s] = logsumexp(x[seg s]) - x[seg s][target[s]]`, written to `losses` (0 for an
/// ignored segment). With `grad`, writes `grad_scale * (softmax(x[seg s]) - onehot(target[s]))`
/// per counted segment, 0 for ignored ones; the caller picks `grad_scale` (`1 / count` for a
/// mean) through `grad_scale(count)`.
///
/// For unsorted ids, "within the segment" counts the segment's elements in array order.
#[allow(clippy::too_many_arguments)]
pub fn segment_cross_entropy<T: Real>(
    x: &[T],
    seg: Segments,
    target: &[i64],
    ignore_index: i64,
    losses: &mut [f64],
    grad: Option<&mut [T]>,
    grad_scale: impl Fn(usize) -> f64,
) -> Result<SegmentLoss, SegmentError> {
    let rows = x.len();
    let count = seg.count();
    check_len("target", target.len(), count)?;
    check_len("losses", losses.len(), count)?;
    if let Some(g) = &grad {
        check_len("grad", g.len(), rows)?;
    }
    let level = simd::level();
    let starts = csr_starts(&seg, rows)?;
    // Lengths and positions of the targets, validated before anything is computed.
    let mut states = try_vec(count, LseState::EMPTY)?;
    let mut target_pos = try_vec(count, usize::MAX)?;
    match (&starts, seg) {
        (Some(starts), _) => {
            for s in 0..count {
                let len = starts[s + 1] - starts[s];
                let t = target[s];
                if t == ignore_index {
                    continue;
                }
                if t < 0 || t as u64 >= len as u64 {
                    return Err(SegmentError::TargetOutOfRange {
                        segment: s,
                        target: t,
                        len,
                    });
                }
                target_pos[s] = starts[s] + t as usize;
            }
            csr_states(level, x, 1, starts, &mut states);
        }
        (None, Segments::Ids { ids, num_segments }) => {
            unsorted_states(x, 1, ids, num_segments, &mut states, None)?;
            // The k-th element of segment s in array order; ids are valid after the states.
            let mut seen = try_vec(count, 0i64)?;
            for (r, &id) in ids.iter().enumerate() {
                let s = id as usize;
                if let (Some(n), Some(&t)) = (seen.get_mut(s), target.get(s)) {
                    if *n == t && t != ignore_index {
                        target_pos[s] = r;
                    }
                    *n += 1;
                }
            }
            for s in 0..count {
                let t = target[s];
                if t != ignore_index && target_pos[s] == usize::MAX {
                    return Err(SegmentError::TargetOutOfRange {
                        segment: s,
                        target: t,
                        len: seen[s] as usize,
                    });
                }
            }
        }
        (None, _) => {}
    }
    let mut sum = 0.0f64;
    let mut counted = 0usize;
    for s in 0..count {
        let p = target_pos[s];
        if target[s] == ignore_index || p == usize::MAX {
            losses[s] = 0.0;
            continue;
        }
        let st = states[s];
        let xt = x[p].to_f64();
        // (max - x_t) + log1p(excess) keeps the loss of a confident segment exact.
        let loss = if st.max.is_finite() {
            (st.max - xt) + st.log_total()
        } else {
            st.logsumexp() - xt
        };
        losses[s] = loss;
        sum += loss;
        counted += 1;
    }
    if let Some(g) = grad {
        let scale = grad_scale(counted);
        let weight = |s: usize| {
            if target_pos[s] == usize::MAX {
                0.0
            } else {
                scale
            }
        };
        let params = try_params::<T>(&states, true, weight)?;
        match (&starts, seg) {
            (Some(starts), _) => {
                let gp = SendPtr(g.as_mut_ptr());
                let xp = SendPtr(x.as_ptr() as *mut T);
                let params = &params;
                for_each_segment(starts, 2, |s, r0, r1| {
                    let [b, a] = params[s];
                    // SAFETY: rows r0..r1 lie inside x and grad and belong to segment s.
                    unsafe {
                        let g = std::slice::from_raw_parts_mut(gp.ptr().add(r0), r1 - r0);
                        if a == 0.0 {
                            g.fill(T::from_f64(0.0));
                        } else if b.is_nan() {
                            g.fill(T::NAN);
                        } else {
                            let xr = (xp.ptr() as *const T).add(r0);
                            simd::exp_scaled(
                                level,
                                xr,
                                simd::Ahead::NONE,
                                g.as_mut_ptr(),
                                r1 - r0,
                                b,
                                a,
                                false,
                            );
                        }
                    }
                });
            }
            (None, Segments::Ids { ids, .. }) => {
                let (xp, gp) = (SendPtr(x.as_ptr() as *mut T), SendPtr(g.as_mut_ptr()));
                // SAFETY: x and grad are distinct borrows of `rows` elements.
                unsafe {
                    gather_write(
                        level,
                        xp,
                        rows,
                        1,
                        ids,
                        &WriteParams::Pair(params),
                        true,
                        gp,
                    )
                };
            }
            (None, _) => {}
        }
        for &p in &target_pos {
            if p != usize::MAX {
                if let Some(v) = g.get_mut(p) {
                    *v = T::from_f64(v.to_f64() - scale);
                }
            }
        }
    }
    Ok(SegmentLoss {
        sum,
        count: counted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::scalar;

    /// A deterministic pseudo-random stream (xorshift) for test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn reference_state(xs: &[f64]) -> LseState {
        // SAFETY: the slice holds xs.len() elements.
        unsafe { scalar::lse_state_two_pass(xs.as_ptr(), 0, xs.len(), 1) }
    }

    fn ragged(seed: u64, segments: usize, max_len: u64) -> (Vec<f64>, Vec<i64>) {
        let mut rng = Rng(seed);
        let mut offsets = vec![0i64];
        let mut xs = Vec::new();
        for _ in 0..segments {
            let len = rng.below(max_len + 1);
            for _ in 0..len {
                xs.push((rng.below(20001) as f64 - 10000.0) / 97.0);
            }
            offsets.push(xs.len() as i64);
        }
        (xs, offsets)
    }

    fn close(a: f64, b: f64) -> bool {
        a == b || (a - b).abs() <= 4.0 * f64::EPSILON * a.abs().max(1.0)
    }

    #[test]
    fn offsets_match_per_segment_reference() {
        let (xs, offsets) = ragged(7, 300, 70);
        let mut out = vec![0.0; 300];
        segment_logsumexp(&xs, 1, Segments::Offsets(&offsets), &mut out).unwrap();
        for s in 0..300 {
            let row = &xs[offsets[s] as usize..offsets[s + 1] as usize];
            let want = reference_state(row).logsumexp();
            assert!(close(out[s], want), "segment {s}: {} vs {want}", out[s]);
        }
    }

    #[test]
    fn unsorted_equals_stably_sorted_bitwise_and_is_thread_invariant() {
        let (xs, offsets) = ragged(11, 5000, 40);
        let mut ids = Vec::new();
        for s in 0..5000 {
            for _ in offsets[s]..offsets[s + 1] {
                ids.push(s as i64);
            }
        }
        // A fixed shuffle of the rows.
        let mut rng = Rng(3);
        let mut perm: Vec<usize> = (0..xs.len()).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let xu: Vec<f64> = perm.iter().map(|&i| xs[i]).collect();
        let iu: Vec<i64> = perm.iter().map(|&i| ids[i]).collect();
        let seg = Segments::Ids {
            ids: &iu,
            num_segments: 5000,
        };
        // The rows of each segment in array order (a stable sort by id) give the same
        // segments as `offsets`.
        let mut order: Vec<usize> = (0..xu.len()).collect();
        order.sort_by_key(|&i| iu[i]);
        let xs_stable: Vec<f64> = order.iter().map(|&i| xu[i]).collect();
        let mut sorted = vec![0.0; 5000];
        segment_logsumexp(&xs_stable, 1, Segments::Offsets(&offsets), &mut sorted).unwrap();
        let mut runs = Vec::new();
        for threads in [1, 2, 3] {
            crate::parallel::set_num_threads(threads);
            let mut out = vec![0.0; 5000];
            segment_logsumexp(&xu, 1, seg, &mut out).unwrap();
            let mut sm = vec![0.0; xu.len()];
            segment_softmax_like(&xu, 1, seg, Reduction::Softmax, &mut sm).unwrap();
            runs.push((out, sm));
        }
        crate::parallel::set_num_threads(0);
        for r in &runs[1..] {
            assert_eq!(
                r.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                runs[0].0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                r.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                runs[0].1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        for (s, (&got, &want)) in runs[0].0.iter().zip(&sorted).enumerate() {
            // The stable sort gives each segment its rows in array order: the sorted path's
            // result, up to the rounding of the finish.
            assert!(close(got, want), "{s}: {got} {want}");
        }
    }

    #[test]
    fn bad_ids_and_offsets_name_the_position() {
        let xs = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0.0f32; 3];
        let ids = [0i64, 2, 3, 1];
        let err = segment_logsumexp(
            &xs,
            1,
            Segments::Ids {
                ids: &ids,
                num_segments: 3,
            },
            &mut out,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SegmentError::IdOutOfRange {
                pos: 2,
                id: 3,
                num_segments: 3
            }
        );
        let ids = [0i64, 2, 1, 1];
        let err = segment_logsumexp(
            &xs,
            1,
            Segments::SortedIds {
                ids: &ids,
                num_segments: 3,
            },
            &mut out,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SegmentError::NotSorted {
                pos: 2,
                id: 1,
                prev: 2
            }
        );
        let offsets = [0i64, 3, 2, 4];
        let err = segment_logsumexp(&xs, 1, Segments::Offsets(&offsets), &mut out).unwrap_err();
        assert!(matches!(err, SegmentError::BadOffsets(m) if m.contains("offsets[2] = 2")));
    }

    #[test]
    fn empty_segments_and_columns() {
        // Two columns; segment 1 is empty.
        let xs = [0.0f64, 1.0, 2.0, 3.0, 4.0, 5.0];
        let offsets = [0i64, 2, 2, 3];
        let mut out = [0.0f64; 6];
        segment_logsumexp(&xs, 2, Segments::Offsets(&offsets), &mut out).unwrap();
        let lse2 = |a: f64, b: f64| a.max(b) + (-(a - b).abs()).exp().ln_1p();
        assert!(close(out[0], lse2(0.0, 2.0)) && close(out[1], lse2(1.0, 3.0)));
        assert_eq!(out[2..4], [f64::NEG_INFINITY; 2]);
        assert_eq!(out[4..6], [4.0, 5.0]);
        let ids = [2i64, 0, 0];
        let mut uo = [0.0f64; 6];
        segment_logsumexp(
            &xs,
            2,
            Segments::Ids {
                ids: &ids,
                num_segments: 3,
            },
            &mut uo,
        )
        .unwrap();
        assert_eq!(uo[0..2], [lse2(2.0, 4.0), lse2(3.0, 5.0)]);
        assert_eq!(uo[2..4], [f64::NEG_INFINITY; 2]);
        assert_eq!(uo[4..6], [0.0, 1.0]);
    }

    #[test]
    fn partitioned_softmax_writes_the_gathered_write_of_its_states() {
        // Many segments take the partition, whose write must give the gathered write's bits
        // from the same states (the pairs' form): catches a result put at the wrong position
        // or taken with another segment's parameters, a piece or chunk left unwritten, and an
        // in-place call that reads an element after writing it. Specials and a partial last
        // chunk and bucket included.
        let segments = (1usize << 18) + 5000;
        assert!(super::super::segment_scatter::partitions::<f32>(
            1, segments
        ));
        let mut rng = Rng(21);
        let rows = 9 * (1 << 16) + 77;
        let ids: Vec<i64> = (0..rows)
            .map(|_| rng.below(segments as u64) as i64)
            .collect();
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        let xs: Vec<f32> = (0..rows)
            .map(|_| match rng.below(3000) {
                k @ 0..3 => specials[k as usize],
                k => (k as f32 - 1500.0) / 29.0,
            })
            .collect();
        let seg = || Segments::Ids {
            ids: &ids,
            num_segments: segments,
        };
        let mut states = vec![LseState::EMPTY; segments];
        segment_states(&xs, 1, seg(), &mut states).unwrap();
        for what in [Reduction::Softmax, Reduction::LogSoftmax] {
            let exp = what == Reduction::Softmax;
            let params = WriteParams::Pair(try_params::<f32>(&states, exp, |_| 1.0).unwrap());
            let mut want = xs.clone();
            let p = SendPtr(want.as_mut_ptr());
            // SAFETY: in place over want's rows elements.
            unsafe { gather_write(simd::level(), p, rows, 1, &ids, &params, exp, p) };
            let mut got = vec![0.0f32; rows];
            segment_softmax_like(&xs, 1, seg(), what, &mut got).unwrap();
            let mut inplace = xs.clone();
            segment_softmax_like_inplace(&mut inplace, 1, seg(), what).unwrap();
            for r in 0..rows {
                assert_eq!(got[r].to_bits(), want[r].to_bits(), "{what:?} row {r}");
                assert_eq!(inplace[r].to_bits(), want[r].to_bits(), "{what:?} row {r}");
            }
        }
    }

    #[test]
    fn unsorted_softmax_of_huge_maxima_keeps_its_normaliser() {
        // The compact gather writes exp(x - (max + ln S)); a max of 1e20 would absorb ln 2 and
        // give 1 for both elements of [1e20, 1e20]. The pairs keep 1/S.
        let unsorted = |xs: &[f32], ids: &[i64]| {
            let mut out = vec![0.0f32; xs.len()];
            let seg = Segments::Ids {
                ids,
                num_segments: 3,
            };
            segment_softmax_like(xs, 1, seg, Reduction::Softmax, &mut out).unwrap();
            out
        };
        let small = unsorted(&[3.0, 1.0, 3.0, -5.0, f32::NEG_INFINITY], &[0, 1, 0, 1, 2]);
        let e6 = (-6.0f64).exp();
        let want = [0.5, 1.0 / (1.0 + e6), 0.5, e6 / (1.0 + e6)];
        for (g, w) in small.iter().zip(want) {
            assert_eq!(*g, w as f32);
        }
        // A segment of -inf alone: NaN, as scipy.
        assert!(small[4].is_nan());
        let huge = unsorted(&[1e20, 2.0, 1e20, 2.0], &[0, 1, 0, 1]);
        assert_eq!(huge, [0.5; 4]);
        // Just within the compact form's maxima, the results agree with the pairs' to the
        // float32 rounding.
        let edge = unsorted(&[65536.0, 65535.0, 65536.0], &[0, 0, 1]);
        let e1 = (-1.0f64).exp();
        assert_eq!(
            edge,
            [(1.0 / (1.0 + e1)) as f32, (e1 / (1.0 + e1)) as f32, 1.0]
        );
    }

    #[test]
    fn cross_entropy_and_gradient() {
        let xs = [1.0f64, 2.0, 3.0, 5.0, 0.5];
        let offsets = [0i64, 3, 3, 5];
        let mut losses = [0.0; 3];
        let mut grad = [9.0; 5];
        let r = segment_cross_entropy(
            &xs,
            Segments::Offsets(&offsets),
            &[2, -100, 0],
            -100,
            &mut losses,
            Some(&mut grad),
            |n| 1.0 / n as f64,
        )
        .unwrap();
        assert_eq!(r.count, 2);
        let l0 = reference_state(&xs[0..3]).logsumexp() - 3.0;
        let l2 = reference_state(&xs[3..5]).logsumexp() - 5.0;
        assert!(close(losses[0], l0) && losses[1] == 0.0 && close(losses[2], l2));
        let s0: f64 = xs[0..3].iter().map(|v| v.exp()).sum();
        assert!((grad[2] - 0.5 * (3f64.exp() / s0 - 1.0)).abs() < 1e-15);
        assert!((grad[0] - 0.5 * (1f64.exp() / s0)).abs() < 1e-15);
        let err = segment_cross_entropy(
            &xs,
            Segments::Offsets(&offsets),
            &[2, 0, 0],
            -100,
            &mut losses,
            None,
            |_| 1.0,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SegmentError::TargetOutOfRange {
                segment: 1,
                target: 0,
                len: 0
            }
        );
    }
}
