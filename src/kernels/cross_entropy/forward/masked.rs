//! The forward pass and fused gradient under `where=` (see [`ClassMask`] for the rule).
//!
//! Lanes are taken in blocks (rows, or columns of torch's layout) in the unmasked kernels' pieces,
//! and each block goes through the unmasked kernel's own code with its mask:
//! - short rows against class indices: the fused short-row loss, reading the rows and the mask
//!   where they lie (a masked class read as `-inf`; a per-row flag makes a masked row an ignored
//!   one);
//! - longer dense rows under a mask with dense rows: [`lanes_block`], the unmasked per-lane loop,
//!   reading them in place ([`LaneMask`] `in_place`: the masked row kernels' states);
//! - every other block is staged once into per-piece scratch (at most [`STAGE_ELEMENTS`] elements
//!   or one lane for rows, the unmasked column blocks for columns), a masked class becoming `-inf`
//!   there, beside a dense copy of the block's mask bytes, then run as above (the fused short-row
//!   loss unmasked on it: the `-inf` classes are the mask, and a row whose target is `-inf` is
//!   flagged after it).
//!
//! `exp(-inf - m) = 0`, so the state is the kept classes' log-sum-exp and masked probabilities
//! are 0, and the gradient of rows whose exps fit L2 is written from the exps their state pass
//! kept. The mask is read with its strides (a broadcast mask is never expanded), and nothing of
//! the logits' size is allocated. The sums that weight every class (label smoothing, probability
//! targets) skip masked classes through the mask bytes. 16-bit logits ([`Widened`]) are widened
//! into a block buffer first (short rows too, which the compute type reads in place) and their
//! gradient rounded as it is written back. A mask keeping every class gives the unmasked result
//! bit for bit for index targets (such a lane keeps the unmasked plan); probability targets agree
//! up to the rounding of their sums.

use super::super::mask::{index_lane, index_lanes, ClassMask};
use super::*;
use crate::kernels::masked::copy_kept;

/// Elements staged per block: small enough that the scratch (at most 72 KiB for float64) is
/// reused from the heap rather than mapped afresh (and faulted in) by every piece.
const STAGE_ELEMENTS: usize = 1 << 13;

/// Bytes of mask rows a transposed mask is moved by at a time (see [`xent_masked`]), and the
/// most a window of at least a cache line of each class may take (rows of more than 2^16
/// classes take fewer lanes). Fortran-ordered masks, float32, 2 threads, ms: 2048x16384
/// 132.7 -> 15.8 (unmasked 6.8), 256x131072 110.8 -> 20.9 (28.3 with windows of 1 MiB).
const TRANSPOSED_WINDOW: usize = 1 << 16;
/// The most bytes of one such window ([`TRANSPOSED_WINDOW`]).
const TRANSPOSED_WINDOW_MAX: usize = 1 << 22;

/// Staged lanes of one block: the logits (`-inf` where masked), the mask bytes, the
/// probability targets when there are some, and each lane's kept-class count.
struct Staged<T> {
    x: Vec<T>,
    keep: Vec<u8>,
    q: Vec<T>,
    kept: [usize; STATE_BLOCK],
}

/// What a lane's plan needs to know of its kept classes.
#[derive(Clone, Copy, PartialEq)]
enum Count {
    /// How many (label smoothing spreads over them).
    Classes,
    /// Whether there is one (probability targets).
    Any,
    /// Nothing: an index target is kept or the lane is skipped.
    None,
}

impl Count {
    /// What a lane's plan needs of its mask bytes `keep`.
    fn of(self, keep: &[u8]) -> usize {
        match self {
            Count::Classes => keep.iter().map(|&b| (b != 0) as usize).sum(),
            Count::Any => keep.iter().any(|&b| b != 0) as usize,
            // A kept index target already says the lane keeps a class.
            Count::None => 1,
        }
    }
}

/// Where a block's lanes start and how its elements are spaced in one array.
#[derive(Clone, Copy)]
struct Spacing {
    base: usize,
    lane: usize,
    class: usize,
}

impl<T: Real> Staged<T> {
    fn new(n: usize, width: usize, probs: bool) -> Result<Self, Error> {
        let zero = T::from_f64(0.0);
        Ok(Staged {
            x: try_vec(n * width, zero)?,
            keep: try_vec(n * width, 0u8)?,
            q: if probs {
                try_vec(n * width, zero)?
            } else {
                Vec::new()
            },
            kept: [0; STATE_BLOCK],
        })
    }

    /// Stages `w` lanes of `n` classes: logits spaced by `xs`, mask bytes by `ms`, and
    /// what `count` asks of each lane's kept classes.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        x: &[T],
        xs: Spacing,
        keep: &[u8],
        ms: Spacing,
        n: usize,
        w: usize,
        count: Count,
    ) {
        let masked = T::from_f64(f64::NEG_INFINITY);
        let select = |d: &mut [T], kd: &mut [u8], xr: &[T], kr: &[u8]| {
            copy_kept(xr, kr, d, f64::NEG_INFINITY);
            for (kd, &m) in kd.iter_mut().zip(kr) {
                *kd = (m != 0) as u8;
            }
        };
        if xs.class == 1 && xs.lane == n && ms.class == 1 && ms.lane == n {
            // Dense rows under a dense mask: the whole block in one loop that vectorises.
            let (x0, m0) = (xs.base, ms.base);
            let (xb, kb) = (&x[x0..x0 + w * n], &keep[m0..m0 + w * n]);
            select(&mut self.x[..w * n], &mut self.keep[..w * n], xb, kb);
        } else if n <= short_row::<T>()
            && xs.class == 1
            && xs.lane == n
            && ms.class == 1
            && ms.lane == 0
        {
            // One mask row for every short lane (`(1, C)`): its bytes repeated, then one flat
            // loop rather than a loop per lane of a few elements.
            let row = &keep[ms.base..ms.base + n];
            for kd in self.keep[..w * n].chunks_exact_mut(n.max(1)) {
                kd.copy_from_slice(row);
            }
            let xb = &x[xs.base..xs.base + w * n];
            copy_kept(
                xb,
                &self.keep[..w * n],
                &mut self.x[..w * n],
                f64::NEG_INFINITY,
            );
        } else if xs.class == 1 && ms.class == 1 {
            for jj in 0..w {
                let (x0, m0) = (xs.base + jj * xs.lane, ms.base + jj * ms.lane);
                let (d, kd) = (&mut self.x[jj * n..][..n], &mut self.keep[jj * n..][..n]);
                select(d, kd, &x[x0..x0 + n], &keep[m0..m0 + n]);
            }
        } else if xs.class == 1 && ms.class == 0 {
            // One flag per row (an `(N, 1)` mask): copy the row or mask all of it.
            for jj in 0..w {
                let x0 = xs.base + jj * xs.lane;
                let kk = keep[ms.base + jj * ms.lane] != 0;
                let (d, kd) = (&mut self.x[jj * n..][..n], &mut self.keep[jj * n..][..n]);
                if kk {
                    d.copy_from_slice(&x[x0..x0 + n]);
                } else {
                    d.fill(masked);
                }
                kd.fill(kk as u8);
            }
        } else {
            // Columns (a class axis before the last): the logits and the mask bytes each
            // transposed into rows, then the masked classes set to -inf in one vector select.
            if xs.lane == 1 && n > 0 && w > 0 {
                let src = &x[xs.base..xs.base + (n - 1) * xs.class + w];
                let dst = &mut self.x[..w * n];
                // SAFETY: `src` holds n lines of w logits `class` apart, `dst` w rows of n.
                unsafe {
                    let (s, d) = ((src.as_ptr(), xs.class), (dst.as_mut_ptr(), n));
                    crate::simd::transpose(crate::simd::level(), s, d, n, w);
                }
            } else {
                for k in 0..n {
                    for jj in 0..w {
                        self.x[jj * n + k] = x[xs.base + jj * xs.lane + k * xs.class];
                    }
                }
            }
            if ms.lane == 1 && n > 0 && w > 0 {
                let src = &keep[ms.base..ms.base + (n - 1) * ms.class + w];
                let dst = &mut self.keep[..w * n];
                crate::kernels::masked::transpose_mask((src, ms.class), (dst, n), n, w);
            } else {
                for k in 0..n {
                    for jj in 0..w {
                        let m0 = ms.base + jj * ms.lane;
                        self.keep[jj * n + k] = (keep[m0 + k * ms.class] != 0) as u8;
                    }
                }
            }
            crate::kernels::masked::fill_masked(&mut self.x[..w * n], &self.keep[..w * n], masked);
        }
        for (jj, kept) in self.kept[..w].iter_mut().enumerate() {
            *kept = count.of(&self.keep[jj * n..][..n]);
        }
    }

    /// Stages the probability targets of the same lanes (laid out like the logits).
    fn stage_probs(&mut self, q: &[T], xs: Spacing, n: usize, w: usize) {
        for jj in 0..w {
            let q0 = xs.base + jj * xs.lane;
            for (k, d) in self.q[jj * n..][..n].iter_mut().enumerate() {
                *d = q[q0 + k * xs.class];
            }
        }
    }
}

/// The mask of a block of lanes of `n` classes (as [`LaneBlock`] takes it): lane `i` keeps
/// class `k` where `keep[i * lane + k] != 0`, and `kept[i]` is what its plan needs to know of its
/// kept classes ([`Count`]). A staged block holds the bytes densely (`lane == n`) beside logits
/// that are `-inf` at the masked classes; a block read in place (`in_place`) has the user's
/// logits and mask rows, the masked classes read as `-inf` by the kernels that load them.
#[derive(Clone, Copy)]
pub(super) struct LaneMask<'a> {
    keep: &'a [u8],
    lane: usize,
    kept: &'a [usize],
    in_place: bool,
}

impl<'a> LaneMask<'a> {
    /// Lane `i`'s mask bytes.
    pub(super) fn lane(&self, i: usize, n: usize) -> &'a [u8] {
        &self.keep[i * self.lane..][..n]
    }

    /// Whether the block's logits are the user's (masked classes not `-inf`).
    pub(super) fn in_place(&self) -> bool {
        self.in_place
    }

    /// The states of the in-place rows `rows` of `x` (row `i` at `i * n`, dense) over their
    /// kept classes, into `states` from its start: the staged rows' ([`block_states`]) bit
    /// for bit.
    pub(super) fn kept_states<T: Real>(
        &self,
        x: &[T],
        (n, rows): (usize, std::ops::Range<usize>),
        alg: Algorithm,
        scratch: &mut Vec<T>,
        states: &mut [LseState],
    ) -> Result<(), Error> {
        if scratch.len() < n {
            *scratch = try_vec(n, T::from_f64(0.0))?;
        }
        let keep = (&self.keep[rows.start * self.lane..], self.lane);
        let batch = Batch::rows(rows.len(), n);
        let x = &x[rows.start * n..rows.end * n];
        let put = |r: usize, s: LseState| states[r] = s;
        crate::kernels::masked::kept_row_states(x, keep, batch, alg, scratch, put)
            .map_err(Error::Layout)
    }

    /// Lane `i`'s plan, target and sums with its masked classes deleted, from its staged
    /// logits `x`, probabilities and `state`. Its target is ignored when the lane keeps no
    /// class (or, refused by the pre-pass, a racing writer's masked target).
    pub(super) fn lane_sums<'p, T: Real>(
        &self,
        plan: &Plan<'p, T>,
        i: usize,
        target: LaneTarget,
        x: &[T],
        probs: Option<&[T]>,
        state: LseState,
    ) -> (Plan<'p, T>, LaneTarget, LaneSums) {
        let (keep, kept) = (self.lane(i, x.len()), self.kept[i]);
        let target = match target {
            _ if kept == 0 => LaneTarget::Ignored,
            LaneTarget::Class(t) if keep[t] == 0 => LaneTarget::Ignored,
            t => t,
        };
        let lp = match plan.label_smoothing > 0.0 {
            true => lane_plan(plan, keep, kept),
            false => *plan,
        };
        let sums = masked_sums(&lp, x, keep, target, probs, state);
        (lp, target, sums)
    }
}

/// The plan of one lane with its masked classes deleted: smoothing over `C_kept` classes and
/// `W` the kept classes' weight (only the smoothing terms read `W`). A lane that keeps every
/// class has the unmasked plan itself (its `W` summed as the unmasked loss sums it), so that
/// its loss and gradient are the unmasked lane's bits.
fn lane_plan<'a, T: Real>(plan: &Plan<'a, T>, keep: &[u8], kept: usize) -> Plan<'a, T> {
    if kept == 0 || kept == keep.len() {
        return *plan;
    }
    let w_total = match plan.weight {
        Some(w) => sum3(
            w,
            keep,
            w,
            |wk, k, _| if k != 0 { wk.to_f64() } else { 0.0 },
        ),
        None => kept as f64,
    };
    Plan {
        b: plan.label_smoothing / kept as f64,
        w_total,
        ..*plan
    }
}

/// [`row_sums`] over the kept classes of a staged lane.
fn masked_sums<T: Real>(
    plan: &Plan<'_, T>,
    x: &[T],
    keep: &[u8],
    target: LaneTarget,
    probs: Option<&[T]>,
    state: LseState,
) -> LaneSums {
    let mut sums = LaneSums {
        state,
        xt: 0.0,
        wsum: 0.0,
        qsum: 0.0,
    };
    let shift = shift_of(state);
    let w = plan.weight;
    let (a, b) = (plan.a, plan.b);
    match target {
        LaneTarget::Ignored => return row_sums(plan, x, target, probs, state),
        LaneTarget::Class(t) => {
            sums.xt = x[t].to_f64();
            if b > 0.0 {
                let parts = row_blocks(x.len(), |r| {
                    let (xr, kr) = (&x[r.clone()], &keep[r.clone()]);
                    let d = |v: T, k: u8| if k != 0 { shift - v.to_f64() } else { 0.0 };
                    match w {
                        Some(w) => sum3(xr, kr, &w[r], |v, k, wk| {
                            if k != 0 {
                                wk.to_f64() * (shift - v.to_f64())
                            } else {
                                0.0
                            }
                        }),
                        None => sum3(xr, kr, xr, |v, k, _| d(v, k)),
                    }
                });
                sums.wsum = parts.sum();
            }
        }
        LaneTarget::Probs => {
            let q = probs.expect("probability targets");
            let qw = |qk: T, k: u8, wk: f64| {
                if k != 0 {
                    wk * (a * qk.to_f64() + b)
                } else {
                    0.0
                }
            };
            let parts = row_blocks(x.len(), |r| {
                let (xr, qr, kr) = (&x[r.clone()], &q[r.clone()], &keep[r.clone()]);
                let wr = |k: usize| w.map_or(1.0, |w| w[r.start + k].to_f64());
                let mut ws = 0.0;
                let mut qs = 0.0;
                // Same terms as the unmasked sums, masked classes contributing 0.
                let terms = xr.iter().zip(qr).zip(kr).enumerate();
                for (k, ((&v, &qk), &kk)) in terms {
                    let wq = qw(qk, kk, wr(k));
                    if kk != 0 {
                        ws += wq * (shift - v.to_f64());
                    }
                    qs += wq;
                }
                (ws, qs)
            });
            for (ws, qs) in parts {
                sums.wsum += ws;
                sums.qsum += qs;
            }
        }
    }
    sums
}

/// The pre-pass's checks ([`index_lane`]) of the rows `l0..l0 + class.len()` after the fused
/// loss ran them, their "mean" weights and count added to `counted` as the pre-pass adds
/// them. `class` and `redo` are the rows' targets as the fused loss read them (`IGNORED`
/// where ignored, out of range or in a row a per-row flag masks) and its redo flags, which
/// every row whose target the mask hides carries. Without weights, the targets are checked
/// for range in one vector scan and the named classes counted in another (each counted weight
/// is 1, so the pre-pass's float sum is the count, exactly), and only the redone rows are
/// checked one by one; a target out of range or weights send the block through the
/// pre-pass's own checks ([`index_lanes`]), which report the first refusal in lane order.
#[inline(never)]
fn check_lanes<T: Real>(
    plan: &Plan<'_, T>,
    t: &[i64],
    mask: &ClassMask<'_>,
    l0: usize,
    (class, redo): (&[u32], &[bool]),
    counted: &mut (f64, usize),
) -> Result<(), Error> {
    let lanes = l0..l0 + class.len();
    let (ignore, n) = (plan.ignore_index, plan.batch.n as u64);
    // Whether a target is out of range; if none is, the classes the rows name (a row a
    // per-row flag masks is read as ignored there).
    let level = crate::simd::level();
    let (_, bad) = crate::simd::count_targets(level, &t[lanes.clone()], ignore, n);
    if plan.weight.is_some() || bad {
        *counted = index_lanes(plan, t, mask, lanes, *counted)?;
        return Ok(());
    }
    // A named target that is not redone is kept (the kernel flags the masked ones). A fold,
    // not a search: it vectorises, and a redo is rare.
    let mut skipped = 0;
    if redo.iter().fold(false, |any, &r| any | r) {
        for i in flagged(redo).filter(|&i| class[i] != IGNORED) {
            skipped += index_lane(plan, t, mask, l0 + i)?.is_none() as usize;
        }
    }
    let named = class.iter().filter(|&&c| c != IGNORED).count();
    let counts = named - skipped;
    *counted = (counted.0 + counts as f64, counted.1 + counts);
    Ok(())
}

/// The targets `t` with those of the lanes a per-lane mask ([`ClassMask::flags_lanes`])
/// masks set to the plan's `ignore_index`, in parallel pieces.
pub(super) fn ignore_masked_lanes<T>(
    t: &[i64],
    mask: &ClassMask<'_>,
    plan: &Plan<'_, T>,
) -> Result<Vec<i64>, Error> {
    let (ignore, batch) = (plan.ignore_index, plan.batch);
    let mut out = try_vec(t.len(), ignore)?;
    let dst = SendPtr(out.as_mut_ptr());
    let lanes = t.len().min(batch.count());
    parallel::for_each_piece(lanes, 1, |range| {
        mask.flag_runs(&batch, range, |l0, flags| {
            // SAFETY: lanes l0.. of this piece, inside `out` (as long as `t`).
            let d = unsafe { std::slice::from_raw_parts_mut(dst.ptr().add(l0), flags.len()) };
            for ((d, &v), &flag) in d.iter_mut().zip(&t[l0..]).zip(flags) {
                *d = if flag != 0 { v } else { ignore };
            }
        })
    });
    Ok(out)
}

/// The masked cross-entropy over every lane: `(main, lse^2)` sums as [`xent_rows`] /
/// [`xent_columns`], gradients dense with 0 at masked classes. A `deferred` plan has its
/// targets checked here, each block after the kernel has read its rows' mask, and gets
/// the "mean" denominators `(D, K)` back, summed as [`masked_denominators`] sums them.
///
/// [`masked_denominators`]: super::super::mask::masked_denominators
pub(super) fn xent_masked<T: Real, C: Logits<T>>(
    logits: C,
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    mask: &ClassMask<'_>,
    alg: Algorithm,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<C::Out>>,
) -> Result<(f64, f64, Option<Counts>), Error> {
    let batch = plan.batch;
    let (n, inner) = (batch.n, batch.inner);
    let rows = inner == 1;
    let short_index = takes_short_index(plan, targets);
    // The unmasked kernels' pieces and (for the short-row loss, which sums a block at a time)
    // blocks, so that a mask keeping every class gives their bits at any size: rows in
    // pieces of lanes, columns in pieces of column blocks.
    let width = if !rows {
        column_block_width(n, inner)
    } else if short_index {
        STATE_BLOCK.min(batch.outer)
    } else {
        (STAGE_ELEMENTS / n.max(1))
            .clamp(1, STATE_BLOCK)
            .min(batch.outer)
    };
    let blocks_per_slab = if rows { 1 } else { inner.div_ceil(width) };
    let (units, unit_elements) = if rows {
        (batch.outer, n)
    } else {
        (batch.outer * blocks_per_slab, n * width)
    };
    // Dense rows longer than the short-row kernels' under a mask whose rows are dense too:
    // read in place by the masked row kernels (the staged block's states bit for bit).
    // A mask whose rows are stored transposed (consecutive rows one byte apart, a row's bytes
    // further apart: a Fortran-ordered mask over C-ordered rows) has each block's mask rows
    // moved into dense rows by byte tiles first, then read as a mask with dense rows.
    let transposed = rows && n > 1 && mask.strides[0] == 1 && mask.strides[1] > 1;
    let in_place = rows
        && !short_index
        && n > short_row::<T>()
        && batch.outer_stride == n
        && (mask.strides[1] == 1 || transposed)
        && logits.direct().is_some()
        && crate::kernels::masked::reads_rows_in_place::<T>(&batch, alg);
    // Rows the fused short-row loss reads where they lie (16-bit rows widened first), and
    // the rows read in place.
    let unstaged = (short_index && rows) || in_place;
    let probs = matches!(targets, Targets::Probs(_));
    let count = match (plan.label_smoothing > 0.0, probs) {
        (true, _) => Count::Classes,
        (false, true) => Count::Any,
        (false, false) => Count::None,
    };
    let per = parallel::items_per_piece(unit_elements);
    // Each piece's (D, K) when the checks are deferred: for rows the pre-pass's pieces (lanes
    // in pieces of `items_per_piece(n)`, as here); for columns, counts without weights.
    let deferred = plan.deferred && short_index && targets_are_indices(targets);
    let mut counts = match deferred {
        true => try_vec(units.div_ceil(per.max(1)), (0.0f64, 0usize))?,
        false => Vec::new(),
    };
    let counts_out = SendPtr(counts.as_mut_ptr());
    // Transposed mask rows: a window of lanes at a time, of about `TRANSPOSED_WINDOW` bytes
    // and at least a cache line of each class's bytes, so that each class's bytes are read as
    // a stream. A piece of long rows is a few lanes, so one call takes the pieces of a window
    // (their sums still kept apart, in piece order).
    let group = match transposed {
        true => (TRANSPOSED_WINDOW / n.max(1))
            .max(64)
            .min(TRANSPOSED_WINDOW_MAX / n.max(1))
            .max(1)
            .div_ceil(per.max(1)),
        false => 1,
    };
    let (main, zsum) = reduce_piece_groups(units, per, group, unit_elements, |span| {
        let zero = T::from_f64(0.0);
        // The fused loss's rows and the longer rows read in place stage nothing.
        let staged_width = if unstaged { 0 } else { width };
        let mut st = Staged::<T>::new(n, staged_width, probs)?;
        let mut short_lanes = ShortLanes::new();
        // 16-bit logits: each block widened (and for columns transposed, through a line of
        // the block) before it is staged, and its gradient rounded as it is written back.
        let (mut wide, mut line) = match logits.direct() {
            Some(_) => (Vec::new(), Vec::new()),
            None => (try_vec(n * width, zero)?, try_vec(width, zero)?),
        };
        let through_buffer = !rows || logits.direct().is_none();
        let mut gs = match (grad_out, through_buffer) {
            (Some(_), true) => try_vec(n * width, zero)?,
            _ => Vec::new(),
        };
        let mut bufs = BlockBuffers::new();
        // A transposed mask: the span's mask rows moved into dense rows once (lanes of rows
        // are 1 byte apart in the mask, a lane's classes `strides[1]` apart).
        let mask_rows = match transposed {
            true => {
                let (class, len) = (mask.strides[1], span.len());
                let base = span.start * mask.strides[0];
                // Every byte is written by the transposition: no pass of zeros first.
                let mut dst = crate::error::try_zeroed_bytes(n * len)?;
                let src = &mask.keep[base..base + (n - 1) * class + len];
                crate::kernels::masked::transpose_mask((src, class), (&mut dst, n), n, len);
                dst
            }
            false => Vec::new(),
        };
        let mut sums = Vec::with_capacity(group);
        for start in span.clone().step_by(per.max(1)) {
            let range = start..(start + per.max(1)).min(span.end);
            let mut acc = (0.0f64, 0.0f64);
            let mut counted = (0.0f64, 0usize);
            let mut next = range.start;
            while next < range.end {
                // The block's lanes l0..l0 + w are consecutive in lane order.
                let (o, j0, w) = if rows {
                    let w = width.min(range.end - next);
                    (next, 0, w)
                } else {
                    let (o, jb) = (next / blocks_per_slab, next % blocks_per_slab);
                    (o, jb * width, width.min(inner - jb * width))
                };
                next = if rows { next + w } else { next + 1 };
                let l0 = o * inner + j0;
                let [s0, s1, s2] = mask.strides;
                let xs = Spacing {
                    base: o * batch.outer_stride + j0,
                    lane: if rows { batch.outer_stride } else { 1 },
                    class: inner,
                };
                let mut ms = Spacing {
                    base: o * s0 + j0 * s2,
                    lane: if rows { s0 } else { s2 },
                    class: s1,
                };
                let mut keep = mask.keep;
                if transposed {
                    (keep, ms) = (
                        &mask_rows[(l0 - span.start) * n..],
                        Spacing {
                            base: 0,
                            lane: n,
                            class: 1,
                        },
                    );
                }
                // SAFETY: lanes l0..l0 + w own the dense rows l0..l0 + w of the gradient, whose
                // length `plan` checked.
                let direct_g = match grad_out.and_then(C::direct_out) {
                    Some(gp) if rows => {
                        Some(unsafe { std::slice::from_raw_parts_mut(gp.ptr().add(l0 * n), w * n) })
                    }
                    _ => None,
                };
                // Every other block is staged (masked classes at -inf).
                if !unstaged {
                    stage(
                        &mut st,
                        logits,
                        xs,
                        keep,
                        ms,
                        (n, w, count),
                        (&mut wide, &mut line),
                    );
                }
                let g = match (direct_g, grad_out) {
                    (Some(g), _) => Some(g),
                    (None, Some(_)) => Some(&mut gs[..w * n]),
                    (None, None) => None,
                };
                if short_index {
                    // The fused short-row loss. Rows are read where they lie (16-bit rows widened
                    // first), the kernel reading the mask beside them (a masked class as `-inf`,
                    // so its probability and gradient are 0); columns are staged (transposed)
                    // first, as unmasked.
                    let row_mask = ShortMask {
                        keep,
                        base: ms.base,
                        lane: ms.lane,
                        class: ms.class,
                        hidden: false,
                    };
                    let staged_mask = ShortMask {
                        keep: &st.keep,
                        base: 0,
                        lane: n,
                        class: 1,
                        hidden: true,
                    };
                    let (x, pitch, block_mask) = match (rows, logits.direct()) {
                        (true, Some(x)) => (&x[xs.base..], xs.lane, row_mask),
                        (true, None) => {
                            for (jj, row) in wide.chunks_exact_mut(n.max(1)).take(w).enumerate() {
                                logits.read_run(xs.base + jj * xs.lane, row);
                            }
                            (&wide[..], n, row_mask)
                        }
                        (false, _) => (&st.x[..], n, staged_mask),
                    };
                    let block = ShortBlock {
                        x,
                        pitch,
                        n,
                        w,
                        l0,
                        mask: Some(block_mask),
                    };
                    // A masked target is the kernel's to skip (short_index_block).
                    short_index_block(
                        plan,
                        targets,
                        block,
                        alg,
                        &mut bufs.scratch,
                        &mut short_lanes,
                        lanes_out,
                        g,
                        &mut acc,
                    )?;
                    if let (true, Targets::Indices(t)) = (deferred, targets) {
                        // The block's mask is in cache now: the pre-pass's checks (a vector scan,
                        // the flagged lanes one by one).
                        let lanes = (&short_lanes.class[..w], &short_lanes.redo[..w]);
                        check_lanes(plan, t, mask, l0, lanes, &mut counted)?;
                    }
                } else if let (true, Some(x)) = (in_place, logits.direct()) {
                    // Dense rows and their mask rows, read where they are.
                    let keep = &keep[ms.base..];
                    for (i, kept) in st.kept[..w].iter_mut().enumerate() {
                        *kept = count.of(&keep[i * ms.lane..][..n]);
                    }
                    let block = LaneBlock {
                        x: &x[xs.base..],
                        q: match targets {
                            Targets::Probs(q) => Some(&q[xs.base..]),
                            Targets::Indices(_) => None,
                        },
                        pitch: n,
                        n,
                        w,
                        l0,
                        mask: Some(LaneMask {
                            keep,
                            lane: ms.lane,
                            kept: &st.kept,
                            in_place: true,
                        }),
                        stream: false,
                    };
                    lanes_block(plan, targets, block, alg, &mut bufs, lanes_out, g, &mut acc)?;
                } else {
                    if let Targets::Probs(q) = targets {
                        st.stage_probs(q, xs, n, w);
                    }
                    let block = LaneBlock {
                        x: &st.x,
                        q: probs.then_some(&st.q[..]),
                        pitch: n,
                        n,
                        w,
                        l0,
                        mask: Some(LaneMask {
                            keep: &st.keep,
                            lane: n,
                            kept: &st.kept,
                            in_place: false,
                        }),
                        stream: false,
                    };
                    lanes_block(plan, targets, block, alg, &mut bufs, lanes_out, g, &mut acc)?;
                }
                write_back::<T, C>(
                    grad_out,
                    through_buffer,
                    &gs,
                    (o, j0, w, n, inner),
                    &mut line,
                );
            }
            if deferred {
                // SAFETY: one slot per piece, written by that piece alone.
                unsafe { *counts_out.ptr().add(range.start / per.max(1)) = counted };
            }
            sums.push(acc);
        }
        Ok(sums)
    })?;
    // Summed in piece order, as the pre-pass does.
    let dk = deferred.then(|| {
        counts
            .iter()
            .fold((0.0, 0.0), |acc, &(d, k)| (acc.0 + d, acc.1 + k as f64))
    });
    Ok((main, zsum, dk))
}

/// Stages `w` lanes of `n` classes of `logits` (spaced by `xs`) under the mask bytes spaced
/// by `ms`: read in place when stored as `T`, else widened into `wide` first (columns
/// transposed through `line`).
#[allow(clippy::too_many_arguments)]
fn stage<T: Real, C: Logits<T>>(
    st: &mut Staged<T>,
    logits: C,
    xs: Spacing,
    keep: &[u8],
    ms: Spacing,
    (n, w, count): (usize, usize, Count),
    (wide, line): (&mut [T], &mut [T]),
) {
    if let Some(x) = logits.direct() {
        st.stage(x, xs, keep, ms, n, w, count);
        return;
    }
    if xs.class == 1 {
        for (jj, row) in wide.chunks_exact_mut(n.max(1)).take(w).enumerate() {
            logits.read_run(xs.base + jj * xs.lane, row);
        }
    } else {
        logits.transpose_in(xs.base, xs.class, n, w, wide, line);
    }
    let dense = Spacing {
        base: 0,
        lane: n,
        class: 1,
    };
    st.stage(wide, dense, keep, ms, n, w, count);
}

/// Writes a block's gradient from the buffer `gs` when it went through one: the rows
/// `l0 = o * inner + j0..` (`inner == 1`) or the columns `j0..j0 + w` of slab `o`.
fn write_back<T: Real, C: Logits<T>>(
    grad_out: Option<SendPtr<C::Out>>,
    through_buffer: bool,
    gs: &[T],
    (o, j0, w, n, inner): (usize, usize, usize, usize, usize),
    line: &mut [T],
) {
    let Some(gp) = grad_out.filter(|_| through_buffer) else {
        return;
    };
    // SAFETY: the block's lanes own these rows or columns of the dense gradient, whose
    // length `plan` checked; blocks own disjoint lanes.
    unsafe {
        if inner == 1 {
            C::write_rows(gp, o * n, &gs[..w * n]);
        } else {
            C::scatter(gp, gs, o * n * inner + j0, n, inner, w, line);
        }
    }
}

/// The "mean" denominators `(D, K)`: the weight of the counted targets and their number.
pub(super) type Counts = (f64, f64);

/// Whether the targets are class indices.
fn targets_are_indices<T>(targets: &Targets<'_, T>) -> bool {
    matches!(targets, Targets::Indices(_))
}

/// Writes the gradient rows `gs` of `w` columns back to the columns `j0..j0 + w` of one
/// `(n, inner)` slab of the dense gradient at `gp`, starting at `gbase = o * n * inner + j0`.
pub(super) fn scatter_columns<T: Real>(
    gp: SendPtr<T>,
    gs: &[T],
    gbase: usize,
    n: usize,
    inner: usize,
    w: usize,
) {
    for k in 0..n {
        for jj in 0..w {
            // SAFETY: (k, j0 + jj) of slab o in the dense gradient, whose length `plan`
            // checked; units own disjoint column blocks.
            unsafe { *gp.ptr().add(gbase + k * inner + jj) = gs[jj * n + k] };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::{cross_entropy, nll_loss, LossReduction, Targets, XentOptions};
    use super::*;

    /// The masked call against the unmasked kernel on each lane with its masked classes
    /// deleted: rows and columns, a broadcast mask, smoothing, weights and the z-loss.
    #[test]
    fn masked_lanes_equal_the_lanes_with_masked_classes_deleted() {
        let (outer, n, inner) = (5usize, 7usize, 3usize);
        let x: Vec<f64> = (0..outer * n * inner)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) * 0.7)
            .collect();
        let w: Vec<f64> = (0..n).map(|k| 0.5 + k as f64 * 0.25).collect();
        // One mask row of classes broadcast over every lane, except lane 4 masked fully.
        let row = [true, false, true, true, false, true, true];
        for inner in [1, inner] {
            let batch = Batch::contiguous(outer, n, inner);
            let mut keep = vec![0u8; batch.elements()];
            for o in 0..outer {
                for k in 0..n {
                    for j in 0..inner {
                        keep[(o * n + k) * inner + j] = (row[k] && o * inner + j != 4) as u8;
                    }
                }
            }
            let x = &x[..batch.elements()];
            let t: Vec<i64> = (0..batch.count()).map(|l| [0, 2, 3, 5, 6][l % 5]).collect();
            let opts = XentOptions {
                weight: Some(&w[..]),
                label_smoothing: 0.2,
                z_loss: 0.01,
                reduction: LossReduction::None,
                mask: Some(ClassMask {
                    keep: &keep,
                    strides: [n * inner, inner, 1],
                }),
                ..XentOptions::default()
            };
            let mut per = vec![0.0; batch.count()];
            let mut grad = vec![9.0; batch.elements()];
            cross_entropy(
                x,
                batch,
                Targets::Indices(&t),
                &opts,
                Some(&mut per),
                Some(&mut grad),
            )
            .unwrap();
            let kept: Vec<usize> = (0..n).filter(|&k| row[k]).collect();
            for l in 0..batch.count() {
                let (o, j) = (l / inner, l % inner);
                let at = |k: usize| (o * n + k) * inner + j;
                if l == 4 {
                    assert_eq!(per[l], 0.0);
                    assert!((0..n).all(|k| grad[at(k)] == 0.0));
                    continue;
                }
                let xr: Vec<f64> = kept.iter().map(|&k| x[at(k)]).collect();
                let wr: Vec<f64> = kept.iter().map(|&k| w[k]).collect();
                let tr = kept.iter().position(|&k| k as i64 == t[l]).unwrap() as i64;
                let one = XentOptions {
                    weight: Some(&wr[..]),
                    label_smoothing: 0.2,
                    z_loss: 0.01,
                    reduction: LossReduction::Sum,
                    ..XentOptions::default()
                };
                let mut g = vec![0.0; xr.len()];
                let want = cross_entropy(
                    &xr,
                    Batch::rows(1, xr.len()),
                    Targets::Indices(&[tr]),
                    &one,
                    None,
                    Some(&mut g),
                )
                .unwrap();
                assert!(
                    (per[l] - want).abs() <= 1e-13 * want.abs().max(1.0),
                    "lane {l}"
                );
                for (i, &k) in kept.iter().enumerate() {
                    assert!((grad[at(k)] - g[i]).abs() <= 1e-14, "lane {l} class {k}");
                }
                assert!((0..n).filter(|&k| !row[k]).all(|k| grad[at(k)] == 0.0));
            }
        }
    }

    #[test]
    fn a_zero_stride_mask_is_read_in_place_and_targets_are_checked_against_it() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let batch = Batch::rows(2, 3);
        let keep = [1u8, 0, 1];
        let mask = ClassMask {
            keep: &keep,
            strides: [0, 1, 0],
        };
        let opts = XentOptions {
            mask: Some(mask),
            reduction: LossReduction::Sum,
            ..XentOptions::default()
        };
        let got = cross_entropy(&x, batch, Targets::Indices(&[0, 2]), &opts, None, None).unwrap();
        let deleted = [1.0f32, 3.0, 4.0, 6.0];
        let plain = XentOptions {
            reduction: LossReduction::Sum,
            ..XentOptions::default()
        };
        let want = cross_entropy(
            &deleted,
            Batch::rows(2, 2),
            Targets::Indices(&[0, 1]),
            &plain,
            None,
            None,
        )
        .unwrap();
        assert_eq!(got, want);
        let err = cross_entropy(&x, batch, Targets::Indices(&[0, 1]), &opts, None, None);
        assert_eq!(
            err.unwrap_err(),
            Error::MaskedTarget {
                position: 1,
                value: 1
            }
        );
        let lp = [-1.0f64, -2.0, -3.0, -4.0, -5.0, -6.0];
        let err = nll_loss(
            &lp,
            batch,
            &[0, 1],
            None,
            -100,
            LossReduction::Sum,
            None,
            Some(mask),
        );
        assert!(matches!(err, Err(Error::MaskedTarget { position: 1, .. })));
        let short = ClassMask {
            keep: &keep[..2],
            strides: [0, 1, 0],
        };
        let err = nll_loss(
            &lp,
            batch,
            &[0, 0],
            None,
            -100,
            LossReduction::Sum,
            None,
            Some(short),
        );
        assert!(matches!(err, Err(Error::Layout(_))));
    }

    /// Short rows read in place under a mask give the unmasked kernel's bits on a copy whose
    /// masked classes hold `-inf` (a row keeping no class ignored): every group size of the
    /// level, a row pitch, dense, `(1, C)` and strided masks, NaN/inf behind the mask.
    #[test]
    fn masked_short_rows_read_in_place_equal_the_kernel_on_rows_holding_minus_inf() {
        let rows = 37usize;
        for n in [1usize, 3, 8, 10, 17, 100] {
            let pitch = n + 3;
            let x: Vec<f32> = (0..rows * pitch)
                .map(|i| match i % 29 {
                    7 => f32::NAN,
                    11 => f32::INFINITY,
                    _ => ((i * 37 % 23) as f32 - 11.0) * 0.7,
                })
                .collect();
            // [dense, (1, C) broadcast, class stride 2]
            for form in 0..3 {
                let (lane, class) = [(n, 1), (0, 1), (2 * n, 2)][form];
                let keep: Vec<u8> = (0..rows.max(1) * 2 * n)
                    .map(|i| (i % 5 != 2 && i % 7 != 3) as u8)
                    .collect();
                // Every 9th row keeps no class (where the mask has a row per row).
                let mut m = keep.clone();
                for r in (4..rows).step_by(9).filter(|_| lane != 0) {
                    for k in 0..n {
                        m[r * lane + k * class] = 0;
                    }
                }
                let keeps = |r: usize, k: usize| m[r * lane + k * class] != 0;
                let t: Vec<i64> = (0..rows)
                    .map(|r| (0..n).find(|&k| keeps(r, k)).unwrap_or(0) as i64)
                    .collect();
                let mut staged = vec![0.0f32; rows * n];
                let mut ref_t = t.clone();
                for r in 0..rows {
                    for k in 0..n {
                        staged[r * n + k] = if keeps(r, k) {
                            x[r * pitch + k]
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                    if !(0..n).any(|k| keeps(r, k)) {
                        ref_t[r] = -100;
                    }
                }
                let batch = Batch {
                    outer: rows,
                    outer_stride: pitch,
                    n,
                    inner: 1,
                };
                let opts = XentOptions {
                    z_loss: 0.01,
                    reduction: LossReduction::None,
                    mask: Some(ClassMask {
                        keep: &m,
                        strides: [lane, class, 0],
                    }),
                    ..XentOptions::default()
                };
                let (mut per, mut grad) = (vec![0.0f32; rows], vec![9.0f32; rows * n]);
                let x = &x[..(rows - 1) * pitch + n];
                let t = Targets::Indices(&t);
                cross_entropy(x, batch, t, &opts, Some(&mut per), Some(&mut grad)).unwrap();
                let plain = XentOptions { mask: None, ..opts };
                let (mut want, mut wgrad) = (vec![0.0f32; rows], vec![9.0f32; rows * n]);
                let rt = Targets::Indices(&ref_t);
                let rb = Batch::rows(rows, n);
                cross_entropy(&staged, rb, rt, &plain, Some(&mut want), Some(&mut wgrad)).unwrap();
                for r in 0..rows {
                    assert_eq!(
                        per[r].to_bits(),
                        want[r].to_bits(),
                        "n {n} form {form} row {r}"
                    );
                    for k in 0..n {
                        let (g, w) = (grad[r * n + k], wgrad[r * n + k]);
                        if keeps(r, k) {
                            assert_eq!(g.to_bits(), w.to_bits(), "n {n} form {form} ({r}, {k})");
                        } else {
                            assert_eq!(g, 0.0, "n {n} form {form} ({r}, {k})");
                        }
                    }
                }
            }
        }
    }

    /// Rows longer than the short-row kernels' under a full mask give the unmasked kernel's
    /// bits on a copy whose masked classes hold `-inf`, with 0 at masked classes: rows whose
    /// gradient is written from the exps their state pass kept (the max in a later block, so
    /// the earlier exps are computed again), rows longer than that, and online states; float32
    /// and float64, a row keeping no class, NaN behind the mask.
    #[test]
    fn masked_long_rows_equal_the_kernel_on_rows_holding_minus_inf() {
        fn check<T: Real>(n: usize, algorithm: Algorithm) {
            let rows = 5usize;
            let mut x: Vec<T> = (0..rows * n)
                .map(|i| T::from_f64(((i * 37 % 23) as f64 - 11.0) * 0.7))
                .collect();
            let mut m: Vec<u8> = (0..rows * n)
                .map(|i| (i % 5 != 2 && i % 7 != 3) as u8)
                .collect();
            for r in 0..rows {
                // The row's max near its end, kept; a NaN it masks.
                x[r * n + n - 3] = T::from_f64(20.0 + r as f64);
                m[r * n + n - 3] = 1;
                x[r * n + 2] = T::from_f64(f64::NAN);
                m[r * n + 2] = 0;
            }
            m[3 * n..4 * n].fill(0);
            let keeps = |r: usize, k: usize| m[r * n + k] != 0;
            let t: Vec<i64> = (0..rows)
                .map(|r| (0..n).find(|&k| keeps(r, k)).map_or(-100, |k| k as i64))
                .collect();
            let minus_inf = T::from_f64(f64::NEG_INFINITY);
            let staged: Vec<T> = (0..rows * n)
                .map(|i| if m[i] != 0 { x[i] } else { minus_inf })
                .collect();
            let w: Vec<T> = (0..n).map(|k| T::from_f64(0.5 + (k % 4) as f64)).collect();
            let batch = Batch::rows(rows, n);
            let opts = XentOptions {
                weight: Some(&w[..]),
                z_loss: 0.01,
                reduction: LossReduction::None,
                algorithm,
                mask: Some(ClassMask {
                    keep: &m,
                    strides: [n, 1, 0],
                }),
                ..XentOptions::default()
            };
            let zero = T::from_f64(0.0);
            let (mut per, mut grad) = (vec![zero; rows], vec![T::from_f64(9.0); rows * n]);
            let tt = Targets::Indices(&t);
            cross_entropy(&x, batch, tt, &opts, Some(&mut per), Some(&mut grad)).unwrap();
            let plain = XentOptions { mask: None, ..opts };
            let (mut want, mut wgrad) = (vec![zero; rows], vec![T::from_f64(9.0); rows * n]);
            let tt = Targets::Indices(&t);
            cross_entropy(
                &staged,
                batch,
                tt,
                &plain,
                Some(&mut want),
                Some(&mut wgrad),
            )
            .unwrap();
            let bits = |v: T| v.to_f64().to_bits();
            for r in 0..rows {
                assert_eq!(bits(per[r]), bits(want[r]), "n {n} row {r}");
                for k in 0..n {
                    let g = grad[r * n + k];
                    let w = if keeps(r, k) { wgrad[r * n + k] } else { zero };
                    assert_eq!(bits(g), bits(w), "n {n} ({r}, {k})");
                }
            }
        }
        let long = crate::simd::STORED_ROW + 100;
        for n in [short_row::<f32>() + 1, 1000, 5000, long] {
            for alg in [Algorithm::Auto, Algorithm::Online] {
                check::<f32>(n, alg);
                check::<f64>(n, alg);
            }
        }
    }

    #[test]
    fn probability_mass_on_a_masked_class_is_refused() {
        let x = [0.0f64; 6];
        let q = [0.5, 0.5, 0.0, 0.2, 0.0, 0.8];
        let keep = [1u8, 1, 0, 1, 1, 0];
        let opts = XentOptions {
            mask: Some(ClassMask {
                keep: &keep,
                strides: [3, 1, 0],
            }),
            ..XentOptions::default()
        };
        let err = cross_entropy(&x, Batch::rows(2, 3), Targets::Probs(&q), &opts, None, None);
        assert_eq!(
            err.unwrap_err(),
            Error::MaskedProbability {
                position: 1,
                class: 2,
                value: 0.8
            }
        );
    }
}
