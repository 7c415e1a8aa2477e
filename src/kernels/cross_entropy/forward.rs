//! The cross-entropy forward pass and its fused gradient, over rows (`inner == 1`) or columns.

use super::spec::{
    finish, lane_classes, lane_target, plan, reduce_piece_groups, reduce_pieces, reduced,
    rescaled_weights, LaneTarget, Plan, Targets, XentOptions,
};
use crate::error::{try_vec, Error};
use crate::half::Stored;
use crate::kernels::blocking::{row_blocks, sum3, COLUMN_BLOCK};
use crate::kernels::{
    row_exp_scaled, row_scaled_terms, row_state, row_state_before, softmax_like, streams,
    Algorithm, Reduction,
};
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::simd::{IndexLoss, IndexLossOut, RowMask, IGNORED};
use crate::state::LseState;

mod masked;

use masked::LaneMask;

/// Rows whose states are computed together (see [`block_states`]); also the widest column
/// block, so a block's states fit one buffer.
const STATE_BLOCK: usize = COLUMN_BLOCK;

/// Rows up to this long take the SIMD short-row kernels (rows in vector lanes) for their states
/// and gradients on this CPU.
fn short_row<T: Real>() -> usize {
    crate::simd::short_row_limit(crate::simd::level(), T::FULL)
}

/// Rows of a pitch this large or more are copied to contiguous scratch before the short-row
/// kernels, which index rows with 32-bit offsets (so every pitch takes the same kernel).
const SHORT_PITCH_LIMIT: usize = 1 << 26;

/// Elements of a transposed column block (and of its gradient): 256 KiB of float32, within L2.
const COLUMN_SCRATCH: usize = 1 << 16;

/// Per-lane sums that the loss and gradient formulas need, from one read of the lane.
#[derive(Clone, Copy)]
struct LaneSums {
    state: LseState,
    /// `x_t` (index target).
    xt: f64,
    /// `sum_k w_k (shift - x_k)` (label smoothing) or `sum_k w_k q'_k (shift - x_k)`
    /// (probabilities).
    wsum: f64,
    /// `sum_k w_k q'_k` (probabilities).
    qsum: f64,
}

/// `(shift, log_total)` with `L = shift + log_total`: `(m, log1p(excess))` for a finite max, the
/// unshifted `(0, L)` otherwise (as [`log_softmax`](crate::kernels::scalar::log_softmax_write)).
#[inline]
fn shift_and_log_total(state: LseState) -> (f64, f64) {
    if state.max.is_finite() {
        (state.max, state.log_total())
    } else {
        (0.0, state.max)
    }
}

/// The `shift` of [`shift_and_log_total`] alone (no logarithm).
#[inline]
fn shift_of(state: LseState) -> f64 {
    if state.max.is_finite() {
        state.max
    } else {
        0.0
    }
}

/// The lane's main loss term (before reduction scaling) and `L`.
#[inline]
fn lane_loss<T: Real>(plan: &Plan<'_, T>, target: LaneTarget, s: &LaneSums) -> (f64, f64) {
    let (shift, lt) = shift_and_log_total(s.state);
    let lse = shift + lt;
    let main = match target {
        LaneTarget::Ignored => 0.0,
        LaneTarget::Class(t) => {
            let nll = plan.w(t) * (lt - (s.xt - shift));
            if plan.b > 0.0 {
                plan.a * nll + plan.b * (s.wsum + plan.w_total * lt)
            } else {
                nll
            }
        }
        LaneTarget::Probs => s.wsum + s.qsum * lt,
    };
    (main, lse)
}

/// How a lane's gradient is written: `g_k = scale * exp(x_k - m) - corr * w_k [* q'_k]`
/// (`scale = coef / S`; short rows: `coef * softmax_k - ..`), then `g_t` (index target)
/// replaced by its accurate value.
#[derive(Clone, Copy)]
struct LaneGrad {
    /// NaN gradient (non-finite max) or zero (ignored).
    fill: Option<f64>,
    shift: f64,
    scale: f64,
    coef: f64,
    corr: f64,
    /// `b` of `q'_k = a q_k + b` (probabilities): the lane's own under `where=`, whose
    /// smoothing spreads over the lane's kept classes.
    b: f64,
    target: Option<(usize, f64)>,
}

impl LaneGrad {
    const ZERO: LaneGrad = LaneGrad {
        fill: Some(0.0),
        shift: 0.0,
        scale: 0.0,
        coef: 0.0,
        corr: 0.0,
        b: 0.0,
        target: None,
    };
}

/// The lane's gradient parameters; `lse` is its log-sum-exp as [`lane_loss`] returned it (one
/// logarithm a lane, not two).
#[inline]
fn lane_grad<T: Real>(plan: &Plan<'_, T>, target: LaneTarget, s: &LaneSums, lse: f64) -> LaneGrad {
    let fill = |v: f64| LaneGrad {
        fill: Some(v),
        ..LaneGrad::ZERO
    };
    if let LaneTarget::Ignored = target {
        return fill(0.0);
    }
    if !s.state.max.is_finite() {
        return fill(f64::NAN);
    }
    let (m, excess) = (s.state.max, s.state.excess);
    let total = s.state.total();
    let zterm = 2.0 * plan.z * plan.s2 * lse;
    match target {
        LaneTarget::Class(t) => {
            let wt = plan.w(t);
            let c = plan.s1 * (plan.a * wt + plan.b * plan.w_total) + zterm;
            // g_t = c p_t - s1 (a + b) w_t = -c (S - e_t) / S + (c - s1 (a + b) w_t), with
            // S - e_t = excess - expm1(x_t - m) exact in relative terms when p_t -> 1.
            let rest = plan.s1 * plan.b * (plan.w_total - wt) + zterm;
            let gt = -c * (excess - (s.xt - m).exp_m1()) / total + rest;
            LaneGrad {
                fill: None,
                shift: m,
                scale: c / total,
                coef: c,
                corr: plan.s1 * plan.b,
                b: plan.b,
                target: Some((t, gt)),
            }
        }
        LaneTarget::Probs => LaneGrad {
            fill: None,
            shift: m,
            scale: (plan.s1 * s.qsum + zterm) / total,
            coef: plan.s1 * s.qsum + zterm,
            corr: plan.s1,
            b: plan.b,
            target: None,
        },
        LaneTarget::Ignored => unreachable!(),
    }
}

/// Cross-entropy of `logits` (laid out by `batch`, classes along `n`) against `targets`, with
/// torch's semantics (see the module docs), plus `z_loss * lse^2` per non-ignored lane.
///
/// Returns the reduced loss ("mean" / "sum"; for "none" the sum of the lane losses), rounded to
/// `T` once. `per_lane` (length `batch.count()`) must be given exactly for "none". With `grad`
/// (length `batch.elements()`, dense `(outer, n, inner)`), writes the gradient of the returned
/// loss (of the lane losses' sum for "none") in the same pass. Everything is validated first.
pub fn cross_entropy<T: Real>(
    logits: &[T],
    batch: Batch,
    targets: Targets<'_, T>,
    opts: &XentOptions<'_, T>,
    per_lane: Option<&mut [T]>,
    grad: Option<&mut [T]>,
) -> Result<T, Error> {
    let mut plan = plan(
        logits.len(),
        batch,
        &targets,
        opts,
        per_lane.as_ref().map(|p| p.len()),
        grad.as_ref().map(|g| g.len()),
        true,
    )?;
    if let Some(w) = rescaled_weights(&plan, grad.is_some())? {
        let opts = XentOptions {
            weight: Some(&w),
            ..*opts
        };
        return cross_entropy(logits, batch, targets, &opts, per_lane, grad);
    }
    let lanes_out = per_lane.map(|p| SendPtr(p.as_mut_ptr()));
    let grad_out = grad.map(|g| SendPtr(g.as_mut_ptr()));
    let (main, zsum, deferred) = xent_lanes(logits, &targets, &plan, opts, lanes_out, grad_out)?;
    if let Some(counts) = deferred {
        // The targets were checked by the main pass: the mean's scales now.
        plan = finish(plan, opts.reduction, counts)?;
    }
    Ok(T::from_f64(reduced(&plan, main, zsum)))
}

/// As [`cross_entropy`] for logits stored as `S` and computed in `S::Compute` (float16 /
/// bfloat16 in float32), against class indices or probabilities (in `S::Compute`), with or
/// without a mask. Each piece of rows is widened into a buffer of its thread (its
/// probabilities copied beside it) and handled by the row code (columns and masked blocks are
/// widened as they are staged), its gradient rounded to `S` as it is written; the "none"
/// losses are computed into a lane-sized buffer and rounded. The pieces, blocks and the order
/// of every sum are those of [`cross_entropy`] on the widened C-contiguous logits, so each
/// output equals that call's rounded to `S`, for any thread count. The returned loss is that
/// call's (in `S::Compute`).
pub fn cross_entropy_stored<S: Stored>(
    logits: &[S],
    batch: Batch,
    targets: Targets<'_, S::Compute>,
    opts: &XentOptions<'_, S::Compute>,
    per_lane: Option<&mut [S]>,
    grad: Option<&mut [S]>,
) -> Result<S::Compute, Error> {
    let plan = plan(
        logits.len(),
        batch,
        &targets,
        opts,
        per_lane.as_ref().map(|p| p.len()),
        grad.as_ref().map(|g| g.len()),
        false,
    )?;
    if let Some(w) = rescaled_weights(&plan, grad.is_some())? {
        let opts = XentOptions {
            weight: Some(&w),
            ..*opts
        };
        return cross_entropy_stored(logits, batch, targets, &opts, per_lane, grad);
    }
    let zero = <S::Compute as Real>::from_f64(0.0);
    let mut lanes = match per_lane {
        Some(_) => try_vec(batch.count(), zero)?,
        None => Vec::new(),
    };
    let lanes_out = per_lane.is_some().then_some(SendPtr(lanes.as_mut_ptr()));
    let grad_out = grad.map(|g| SendPtr(g.as_mut_ptr()));
    // Not deferred (`plan` was asked for none): the mean's scales are final.
    let (main, zsum, _) = xent_lanes(Widened(logits), &targets, &plan, opts, lanes_out, grad_out)?;
    let size = std::mem::size_of::<S>() as isize;
    if let Some(p) = per_lane {
        // SAFETY: `p` is a live slice of `lanes.len()` elements (checked by `plan`).
        unsafe { S::narrow_run(&lanes, p.as_mut_ptr() as *mut u8, size) };
    }
    Ok(<S::Compute as Real>::from_f64(reduced(&plan, main, zsum)))
}

/// The lanes' summed `(main, lse^2)` terms (the "none" losses to `lanes_out`, the gradient to
/// `grad_out`), by layout: under a mask, lanes in rows, or in columns. The third value is the
/// mean's denominators when the masked pass checked the targets itself ([`Plan::deferred`]).
fn xent_lanes<T: Real, C: Logits<T>>(
    logits: C,
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    opts: &XentOptions<'_, T>,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<C::Out>>,
) -> Result<(f64, f64, Option<masked::Counts>), Error> {
    let (batch, alg) = (plan.batch, opts.algorithm);
    let (main, zsum) = if batch.count() == 0 {
        (0.0, 0.0)
    } else if let (Some(mask), Targets::Indices(t)) = (&opts.mask, targets) {
        // (The fused short-row loss over rows takes per-row flags itself,
        // `short_index_block`.)
        let fused_rows = takes_short_index(plan, targets) && batch.inner == 1;
        if mask.flags_lanes() && !fused_rows {
            // A flag per lane: the unmasked loss with the masked lanes' targets ignored (a
            // lane that keeps no class is skipped as an ignored one is). The pre-pass checked
            // the targets and counted the kept lanes of the "mean".
            let t = masked::ignore_masked_lanes(t, mask, plan)?;
            let ignored = Targets::Indices(&t);
            let opts = XentOptions {
                mask: None,
                ..*opts
            };
            return xent_lanes(logits, &ignored, plan, &opts, lanes_out, grad_out);
        }
        return masked::xent_masked(logits, targets, plan, mask, alg, lanes_out, grad_out);
    } else if let Some(mask) = &opts.mask {
        return masked::xent_masked(logits, targets, plan, mask, alg, lanes_out, grad_out);
    } else if batch.inner == 1 {
        xent_rows(logits, targets, plan, alg, lanes_out, grad_out)?
    } else {
        xent_columns(logits, targets, plan, alg, lanes_out, grad_out)?
    };
    Ok((main, zsum, None))
}

/// Lanes are rows (`inner == 1`), in pieces of [`parallel::items_per_piece`]: read where they
/// lie, or (16-bit logits) each piece widened into a buffer of its thread, its probabilities
/// copied beside it at the same pitch and its gradient rounded as it is written back. The
/// pieces and blocks are the same either way, so 16-bit logits give the widened call's bits.
fn xent_rows<T: Real, C: Logits<T>>(
    logits: C,
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    alg: Algorithm,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<C::Out>>,
) -> Result<(f64, f64), Error> {
    let batch = plan.batch;
    let (n, pitch) = (batch.n, batch.outer_stride);
    let per = parallel::items_per_piece(n);
    if let Some(x) = logits.direct() {
        let rows = RowsAt {
            x,
            pitch,
            base: 0,
            stream: true,
        };
        let g = grad_out.and_then(C::direct_out);
        return reduce_pieces(batch.outer, per, n, |range| {
            rows_piece(rows, targets, plan, alg, range, lanes_out, g)
        });
    }
    reduce_pieces(batch.outer, per, n, |range| {
        let (w, zero) = (range.len(), T::from_f64(0.0));
        let mut xs = try_vec(w * n, zero)?;
        for (i, row) in xs.chunks_exact_mut(n.max(1)).enumerate() {
            logits.read_run((range.start + i) * pitch, row);
        }
        let mut qs = Vec::new();
        if let Targets::Probs(q) = targets {
            qs = try_vec(w * n, zero)?;
            for (i, row) in qs.chunks_exact_mut(n.max(1)).enumerate() {
                row.copy_from_slice(&q[(range.start + i) * pitch..][..n]);
            }
        }
        let piece_targets = match targets {
            Targets::Probs(_) => Targets::Probs(&qs),
            indices => *indices,
        };
        let mut gs = match grad_out {
            Some(_) => try_vec(w * n, zero)?,
            None => Vec::new(),
        };
        let rows = RowsAt {
            x: &xs,
            pitch: n,
            base: range.start,
            stream: false,
        };
        let g = grad_out.map(|_| SendPtr(gs.as_mut_ptr()));
        let sums = rows_piece(rows, &piece_targets, plan, alg, range.clone(), lanes_out, g)?;
        if let Some(gp) = grad_out {
            // SAFETY: the piece's rows of the dense gradient, whose length `plan` checked;
            // pieces own disjoint lanes.
            unsafe { C::write_rows(gp, range.start * n, &gs) };
        }
        Ok(sums)
    })
}

/// Rows of the logits from lane `base` on: lane `l`'s row at `x[(l - base) * pitch..][..n]`,
/// its gradient row at `(l - base) * n` of the dense gradient given with it; `stream` as
/// [`LaneBlock`]'s.
#[derive(Clone, Copy)]
struct RowsAt<'a, T> {
    x: &'a [T],
    pitch: usize,
    base: usize,
    stream: bool,
}

/// The lanes `range` of [`xent_rows`] (one piece): their `(main, lse^2)` sums in lane order,
/// their "none" losses written to `lanes_out` and gradient rows to `grad_out` (as [`RowsAt`]).
fn rows_piece<T: Real>(
    rows: RowsAt<'_, T>,
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    alg: Algorithm,
    range: std::ops::Range<usize>,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<T>>,
) -> Result<(f64, f64), Error> {
    let n = plan.batch.n;
    let short_index = takes_short_index(plan, targets);
    let RowsAt {
        x: logits,
        pitch,
        base,
        stream,
    } = rows;
    let mut acc = (0.0f64, 0.0f64);
    let mut bufs = BlockBuffers::new();
    let mut short_lanes = ShortLanes::new();
    let mut l0 = range.start;
    while l0 < range.end {
        let w = STATE_BLOCK.min(range.end - l0);
        let first = (l0 - base) * pitch;
        let xb = &logits[first..];
        let qb = match targets {
            Targets::Probs(q) => Some(&q[first..]),
            Targets::Indices(_) => None,
        };
        if short_index {
            // SAFETY: lanes l0..l0 + w own the dense rows l0..l0 + w of the gradient,
            // whose length `plan` checked.
            let g = grad_out.map(|gp| unsafe {
                std::slice::from_raw_parts_mut(gp.ptr().add((l0 - base) * n), w * n)
            });
            let block = ShortBlock {
                x: xb,
                pitch,
                n,
                w,
                l0,
                mask: None,
            };
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
            l0 += w;
            continue;
        }
        // SAFETY: lanes l0..l0 + w own the dense rows l0..l0 + w of the gradient, whose
        // length `plan` checked.
        let g = grad_out.map(|gp| unsafe {
            std::slice::from_raw_parts_mut(gp.ptr().add((l0 - base) * n), w * n)
        });
        let block = LaneBlock {
            x: xb,
            q: qb,
            pitch,
            n,
            w,
            l0,
            mask: None,
            stream,
        };
        lanes_block(plan, targets, block, alg, &mut bufs, lanes_out, g, &mut acc)?;
        l0 += w;
    }
    Ok(acc)
}

/// `w` short rows of `x` (row `i` at `x[i * pitch..][..n]`) as a batch the short-row kernels
/// take: in place, or copied to `scratch` when the pitch is beyond their offsets.
fn short_block<'a, T: Real>(
    x: &'a [T],
    pitch: usize,
    n: usize,
    w: usize,
    scratch: &'a mut Vec<T>,
) -> Result<(&'a [T], Batch), Error> {
    if pitch < SHORT_PITCH_LIMIT {
        let batch = Batch {
            outer: w,
            outer_stride: pitch,
            n,
            inner: 1,
        };
        return Ok((&x[..(w - 1) * pitch + n], batch));
    }
    scratch.clear();
    scratch.try_reserve_exact(w * n).map_err(|_| Error::Alloc {
        bytes: w * n * std::mem::size_of::<T>(),
    })?;
    for i in 0..w {
        scratch.extend_from_slice(&x[i * pitch..i * pitch + n]);
    }
    Ok((&scratch[..], Batch::rows(w, n)))
}

/// Whether the lanes take [`short_index_block`]: short rows, class-index targets, no label
/// smoothing.
fn takes_short_index<T: Real>(plan: &Plan<'_, T>, targets: &Targets<'_, T>) -> bool {
    (1..=crate::simd::SHORT_LOSS_ROW).contains(&plan.batch.n)
        && matches!(targets, Targets::Indices(_))
        && plan.b == 0.0
}

/// `w` rows of length `n`, row `i` at `x[i * pitch..][..n]`, holding lanes `l0..l0 + w`,
/// and their `where=` mask when there is one.
#[derive(Clone, Copy)]
struct ShortBlock<'a, T> {
    x: &'a [T],
    pitch: usize,
    n: usize,
    w: usize,
    l0: usize,
    mask: Option<ShortMask<'a>>,
}

/// The mask of a [`ShortBlock`]: class `k` of row `i` is kept when
/// `keep[base + i * lane + k * class] != 0`; every such byte is inside `keep`. `hidden`: the
/// block's rows hold `-inf` at their masked classes already (a staged block).
#[derive(Clone, Copy)]
struct ShortMask<'a> {
    keep: &'a [u8],
    base: usize,
    lane: usize,
    class: usize,
    hidden: bool,
}

impl ShortMask<'_> {
    /// Whether row `i` keeps class `k`.
    fn keeps(&self, i: usize, k: usize) -> bool {
        self.keep[self.base + i * self.lane + k * self.class] != 0
    }
}

/// The loss of a [`ShortBlock`] against class indices (no label smoothing) by the fused
/// short-row kernel (states, `L`, `x_t`, the loss and the gradient into the dense `g`, a
/// vector of rows at a time); rows it flags (a non-finite max or a NaN) are redone here by
/// the general row path, and left flagged in `lanes.redo`. Each lane's target (a class `< n`
/// or ignored) is read once, into `lanes.class`. Under a mask the kernel reads the rows' mask
/// beside them (rows that already hold `-inf` at their masked classes, a staged block, go
/// through the unmasked kernel); a target the mask hides is left to the pre-pass, which
/// refuses it in a row that keeps some class: such a row keeps none, is flagged, and is
/// skipped here. Lane `(main, lse^2)` terms are added to `acc` in lane order, and "none"
/// losses written to `lanes_out`.
#[allow(clippy::too_many_arguments)]
fn short_index_block<T: Real>(
    plan: &Plan<'_, T>,
    targets: &Targets<'_, T>,
    block: ShortBlock<'_, T>,
    alg: Algorithm,
    scratch: &mut Vec<T>,
    lanes: &mut ShortLanes,
    lanes_out: Option<SendPtr<T>>,
    mut g: Option<&mut [T]>,
    acc: &mut (f64, f64),
) -> Result<(), Error> {
    let ShortBlock {
        x,
        pitch,
        n,
        w,
        l0,
        mask,
    } = block;
    let ShortLanes {
        class,
        weight,
        main,
        lse,
        redo,
    } = lanes;
    if !lane_classes(
        plan,
        targets,
        l0,
        IGNORED,
        &mut class[..w],
        &mut weight[..w],
    ) {
        return Err(Error::Layout("short-row loss targets".into()));
    }
    // A flag per row (the same for all its classes): a masked row is an ignored one, and the
    // kept rows run unmasked.
    let flags = mask.filter(|m| m.class == 0);
    if let Some(m) = flags {
        for (i, (c, wt)) in class[..w].iter_mut().zip(&mut weight[..w]).enumerate() {
            if !m.keeps(i, 0) {
                (*c, *wt) = (IGNORED, 0.0);
            }
        }
    }
    let mask = mask.filter(|m| m.class != 0);
    // Rows that hold -inf at their masked classes run through the unmasked kernel (the same
    // columns, without the mask's loads); a row whose target is masked is found after it.
    let hidden = mask.is_some_and(|m| m.hidden);
    let mut out = IndexLossOut {
        main: &mut main[..w],
        lse: &mut lse[..w],
        redo: &mut redo[..w],
    };
    let p = IndexLoss {
        class: &class[..w],
        weight: &weight[..w],
        s1: plan.s1,
        z2: 2.0 * plan.z * plan.s2,
        // SAFETY: `base` and every byte the strides reach from it are inside `keep`.
        mask: mask.filter(|_| !hidden).map(|m| RowMask {
            keep: unsafe { m.keep.as_ptr().add(m.base) },
            lane: m.lane,
            class: m.class,
            bytes: m.keep.len().saturating_sub(m.base),
        }),
    };
    let gp = match g.as_mut() {
        Some(g) if g.len() == w * n => Some(g.as_mut_ptr()),
        Some(_) => return Err(Error::Layout("gradient block length".into())),
        None => None,
    };
    let (xs, batch) = short_block(x, pitch, n, w, scratch)?;
    // SAFETY: `xs` holds w rows of n elements `outer_stride` apart (short_block), `gp` w * n
    // elements; every class is IGNORED or < n (lane_target); p and out hold w entries; the
    // mask's bytes of the w rows are inside `keep` (ShortMask).
    unsafe {
        crate::simd::short_rows_xent_index(
            crate::simd::level(),
            xs.as_ptr(),
            w,
            n,
            batch.outer_stride,
            p,
            &mut out,
            gp,
        );
    }
    if hidden {
        // A target at -inf: a masked one (or a kept -inf, which the row path gives the same
        // loss) is the row path's, as the masked kernel would have flagged it.
        for (i, (&c, r)) in class[..w].iter().zip(redo[..w].iter_mut()).enumerate() {
            let at = i * batch.outer_stride + c as usize;
            *r |= c != IGNORED && xs[at].to_f64() == f64::NEG_INFINITY;
        }
    }
    // `main` and `lse` become each lane's (main, lse^2) terms, summed in a fixed order: a
    // lane the kernel did not redo in plain loops, then the redone lanes (rare: a row with a
    // NaN or an infinity, a fully masked row) one by one. The lse^2 terms only feed the z-loss.
    if plan.z > 0.0 {
        for (z, &c) in lse[..w].iter_mut().zip(&class[..w]) {
            *z = if c == IGNORED { 0.0 } else { *z * *z };
        }
    }
    // A fold, not a search: it vectorises.
    if redo[..w].iter().fold(false, |any, &r| any | r) {
        for i in flagged(&redo[..w]) {
            let target = match class[i] {
                IGNORED => LaneTarget::Ignored,
                // A masked target: the row keeps no class (the pre-pass refused it in any
                // other), so it is skipped.
                c if mask.is_some_and(|m| !m.keeps(i, c as usize)) => LaneTarget::Ignored,
                c => LaneTarget::Class(c as usize),
            };
            let gi = g.as_deref_mut().map(|g| &mut g[i * n..(i + 1) * n]);
            (main[i], lse[i]) = redo_lane(plan, (x, pitch, n), i, mask, target, alg, gi);
        }
    }
    if lanes_out.is_some() {
        for i in 0..w {
            write_lane(plan, main[i], lse[i], l0 + i, lanes_out);
        }
    }
    acc.0 += fixed_sum(&main[..w]);
    if plan.z > 0.0 {
        acc.1 += fixed_sum(&lse[..w]);
    }
    Ok(())
}

/// The positions `redo` flags, in order, found through a bit per flag (eight flags to a
/// multiply) rather than by testing each flag in turn: a redone lane is rare, and a loop that
/// branches on every flag of a block costs more than the lanes it finds (a `where=` loss of
/// rows of 10 with one fully masked row in 64 spent a tenth of its time in two such loops).
pub(super) fn flagged(redo: &[bool]) -> impl Iterator<Item = usize> + '_ {
    redo.chunks(64).enumerate().flat_map(|(c, chunk)| {
        let mut bits = 0u64;
        for (k, eight) in chunk.chunks(8).enumerate() {
            // A bool is the byte 0 or 1: byte i of `word` is flag i, and the multiply gathers
            // the eight into its top byte, flag i at bit 56 + i.
            let mut word = [0u8; 8];
            for (w, &r) in word.iter_mut().zip(eight) {
                *w = u8::from(r);
            }
            let word = u64::from_le_bytes(word);
            bits |= (word.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * k);
        }
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                c * 64 + i
            })
        })
    })
}

/// Lane `i` of a block of [`short_index_block`] that its kernel flagged, by the row path: its
/// `(main, lse^2)` terms, and its gradient into `g` when given. An ignored lane (a row that
/// keeps no class, say) gets what the row path gives it, a zero loss and a zero gradient,
/// without reading the row again; a masked row is read as its staged copy holds it.
fn redo_lane<T: Real>(
    plan: &Plan<'_, T>,
    (x, pitch, n): (&[T], usize, usize),
    i: usize,
    mask: Option<ShortMask<'_>>,
    target: LaneTarget,
    alg: Algorithm,
    g: Option<&mut [T]>,
) -> (f64, f64) {
    if matches!(target, LaneTarget::Ignored) {
        if let Some(g) = g {
            g.fill(T::from_f64(0.0));
        }
        return (0.0, 0.0);
    }
    let mut row = &x[i * pitch..i * pitch + n];
    let mut staged = [T::from_f64(f64::NEG_INFINITY); crate::simd::SHORT_LOSS_ROW];
    if let Some(m) = mask {
        // The row as a staged copy holds it: masked classes -inf.
        for (k, s) in staged.iter_mut().enumerate().take(n) {
            if m.keeps(i, k) {
                *s = row[k];
            }
        }
        row = &staged[..n];
    }
    let sums = row_sums(plan, row, target, None, row_state(row, alg));
    let (main, lse) = lane_loss(plan, target, &sums);
    if let Some(g) = g {
        let lg = lane_grad(plan, target, &sums, lse);
        write_row_grad(plan, row, None, None, lg, g, None, false);
        if let Some(m) = mask {
            // NaN and zero fills reach every class; a masked one's gradient is 0.
            for (k, gk) in g.iter_mut().enumerate() {
                if !m.keeps(i, k) {
                    *gk = T::from_f64(0.0);
                }
            }
        }
    }
    (main, lse * lse)
}

/// The per-lane buffers of [`short_index_block`], one set per piece.
struct ShortLanes {
    class: [u32; STATE_BLOCK],
    weight: [f64; STATE_BLOCK],
    main: [f64; STATE_BLOCK],
    lse: [f64; STATE_BLOCK],
    redo: [bool; STATE_BLOCK],
}

impl ShortLanes {
    fn new() -> Self {
        ShortLanes {
            class: [IGNORED; STATE_BLOCK],
            weight: [0.0; STATE_BLOCK],
            main: [0.0; STATE_BLOCK],
            lse: [0.0; STATE_BLOCK],
            redo: [false; STATE_BLOCK],
        }
    }
}

/// The sum of `v` in an order fixed by its length alone: eight interleaved partial sums,
/// added pairwise, then the tail in order.
fn fixed_sum(v: &[f64]) -> f64 {
    let mut part = [0.0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (p, &x) in part.iter_mut().zip(c) {
            *p += x;
        }
    }
    let quad = [
        part[0] + part[4],
        part[1] + part[5],
        part[2] + part[6],
        part[3] + part[7],
    ];
    let mut total = (quad[0] + quad[2]) + (quad[1] + quad[3]);
    for &x in tail {
        total += x;
    }
    total
}

/// `w` lanes of the logits laid out as rows, lane `l0 + i` at `x[i * pitch..][..n]` (its
/// probabilities at the same place in `q`), for the per-lane path (not the fused short-row
/// loss). Under `where=` the lanes are staged (a masked class `-inf`) with their `mask`.
/// `stream`: the gradient rows go where the caller asked, not to a buffer, and may be
/// streamed ([`streams_grad`]).
#[derive(Clone, Copy)]
struct LaneBlock<'a, T> {
    x: &'a [T],
    q: Option<&'a [T]>,
    pitch: usize,
    n: usize,
    w: usize,
    l0: usize,
    mask: Option<LaneMask<'a>>,
    stream: bool,
}

impl<'a, T> LaneBlock<'a, T> {
    /// Lane `l0 + i`'s logits and probabilities.
    fn lane(&self, i: usize) -> (&'a [T], Option<&'a [T]>) {
        let row = i * self.pitch..i * self.pitch + self.n;
        (&self.x[row.clone()], self.q.map(|q| &q[row]))
    }

    /// Lane `l0 + i`'s mask bytes, under `where=`.
    fn keep(&self, i: usize) -> Option<&'a [u8]> {
        self.mask.map(|m| m.lane(i, self.n))
    }
}

/// The per-piece buffers of [`lanes_block`] (`scratch` also of [`short_index_block`]), reused
/// from block to block.
struct BlockBuffers<T> {
    scratch: Vec<T>,
    states: [LseState; STATE_BLOCK],
    grads: [LaneGrad; STATE_BLOCK],
    terms: Vec<f64>,
}

impl<T> BlockBuffers<T> {
    fn new() -> Self {
        BlockBuffers {
            scratch: Vec::new(),
            states: [LseState::EMPTY; STATE_BLOCK],
            grads: [LaneGrad::ZERO; STATE_BLOCK],
            terms: Vec::new(),
        }
    }
}

/// Whether the gradient of the rows of `plan` (`n` classes) is written from the exps their
/// states pass kept ([`crate::kernels::row_state_stored`]), not from a second exp of each
/// logit: two-pass rows longer than the short-row kernels' whose exps fit L2, and, of
/// logits far larger than the caches ([`streams`]), at most [`KEPT_TERMS_FROM_DRAM`] long.
/// The same bits either way.
fn keeps_terms<T: Real>(plan: &Plan<'_, T>, n: usize, alg: Algorithm) -> bool {
    let long = n > KEPT_TERMS_FROM_DRAM && streams::<T>(&plan.batch);
    n > short_row::<T>() && n <= crate::simd::STORED_ROW && !long && alg != Algorithm::Online
}

/// The longest rows from DRAM whose gradient is written from kept exps: longer ones, whose
/// float64 terms (8 bytes an element, 128 KiB here) share L2 with the row, the next row's
/// hinted lines and the gradient, took longer than a second exp from the row (float32 from
/// DRAM, 2 threads, ns per element: rows of 16384 0.76 -> 0.61, 32768 0.76 -> 0.57; 8192
/// level; in L2, rows of 32768, the kept exps stay ahead, 0.50 against 0.535).
const KEPT_TERMS_FROM_DRAM: usize = 8192;

/// The losses (added to `acc`, "none" losses to `lanes_out`) and, with `g` (`w * n`, dense),
/// the gradients of one [`LaneBlock`]. Rows and columns (transposed into rows) both come
/// through here, so both layouts give the same bits; so do staged `where=` blocks, each lane
/// with its masked classes deleted ([`LaneMask::lane_sums`]) and a gradient of 0 at them.
#[allow(clippy::too_many_arguments)]
fn lanes_block<T: Real>(
    plan: &Plan<'_, T>,
    targets: &Targets<'_, T>,
    b: LaneBlock<'_, T>,
    alg: Algorithm,
    bufs: &mut BlockBuffers<T>,
    lanes_out: Option<SendPtr<T>>,
    g: Option<&mut [T]>,
    acc: &mut (f64, f64),
) -> Result<(), Error> {
    let LaneBlock {
        x: xb,
        pitch,
        n,
        w,
        l0,
        mask,
        ..
    } = b;
    // The loss of lane i from its state, and its gradient's parameters when asked.
    let mut lane = |i: usize, state: LseState, grad: bool| -> LaneGrad {
        let l = l0 + i;
        let (x, probs) = b.lane(i);
        let target = lane_target(targets, l, plan.ignore_index, n);
        let own;
        let (plan, target, sums) = match mask {
            None => (plan, target, row_sums(plan, x, target, probs, state)),
            Some(m) => {
                let (lp, target, sums) = m.lane_sums(plan, i, target, x, probs, state);
                own = lp;
                (&own, target, sums)
            }
        };
        let (main, zt, lse) = lane_outputs(plan, target, &sums, l, lanes_out);
        acc.0 += main;
        acc.1 += zt;
        if grad {
            lane_grad(plan, target, &sums, lse)
        } else {
            LaneGrad::ZERO
        }
    };
    // Masked rows read in place (their masked classes loaded as `-inf`).
    let in_place = mask.filter(|m| m.in_place());
    match g {
        Some(g) if keeps_terms(plan, n, alg) => {
            // One row at a time: its state keeps the exps, its gradient is written from them.
            if bufs.terms.len() < n {
                bufs.terms = try_vec(n, 0.0)?;
            }
            let terms = &mut bufs.terms[..n];
            for i in 0..w {
                let (x, probs) = b.lane(i);
                let keep = in_place.map(|m| m.lane(i, n));
                let next = (i + 1 < w).then(|| b.lane(i + 1).0);
                let kept = crate::kernels::row_state_stored(x, next, keep, terms);
                let state = match (kept, in_place) {
                    (Some((s, _)), _) => s,
                    (None, None) => row_state(x, alg),
                    (None, Some(m)) => {
                        let one = &mut bufs.states[..1];
                        m.kept_states(xb, (n, i..i + 1), alg, &mut bufs.scratch, one)?;
                        one[0]
                    }
                };
                let lg = lane(i, state, true);
                let from = kept.map(|(_, from)| (&terms[..], from));
                let gi = &mut g[i * n..(i + 1) * n];
                write_row_grad(plan, x, probs, b.keep(i), lg, gi, from, b.stream);
            }
        }
        g => {
            match in_place {
                Some(m) => {
                    m.kept_states(xb, (n, 0..w), alg, &mut bufs.scratch, &mut bufs.states)?
                }
                None => block_states(xb, pitch, n, w, alg, &mut bufs.scratch, &mut bufs.states)?,
            }
            for i in 0..w {
                bufs.grads[i] = lane(i, bufs.states[i], g.is_some());
            }
            if let Some(g) = g {
                block_grads(plan, b, &bufs.grads[..w], alg, &mut bufs.scratch, g)?;
            }
        }
    }
    Ok(())
}

/// The `(max, excess)` states of `w` rows of length `n`, row `i` at `x[i * pitch..][..n]`.
/// Short rows take the SIMD short-row kernels (a vector of rows at a time, read in place);
/// longer rows use [`row_state`]. Rows and columns both come through here, so both layouts
/// give the same bits.
fn block_states<T: Real>(
    x: &[T],
    pitch: usize,
    n: usize,
    w: usize,
    alg: Algorithm,
    scratch: &mut Vec<T>,
    states: &mut [LseState],
) -> Result<(), Error> {
    if (1..=short_row::<T>()).contains(&n) {
        let (xs, batch) = short_block(x, pitch, n, w, scratch)?;
        crate::kernels::lse_states(xs, batch, alg, &mut states[..w]).map_err(Error::Layout)?;
    } else {
        for (i, st) in states.iter_mut().enumerate().take(w) {
            // The next row is hinted into cache as this one finishes.
            let next = (i + 1 < w).then(|| &x[(i + 1) * pitch..(i + 1) * pitch + n]);
            *st = row_state_before(&x[i * pitch..i * pitch + n], next, alg);
        }
    }
    Ok(())
}

/// Writes the gradients `grads` of the first `grads.len()` lanes of `b` to the dense `g`
/// (`grads.len() * n`). Short rows are written as softmax by the SIMD short-row kernel, then
/// scaled per row; longer rows by [`write_row_grad`]. Rows and columns both come through
/// here; masked classes get 0.
fn block_grads<T: Real>(
    plan: &Plan<'_, T>,
    b: LaneBlock<'_, T>,
    grads: &[LaneGrad],
    alg: Algorithm,
    scratch: &mut Vec<T>,
    g: &mut [T],
) -> Result<(), Error> {
    let (w, n) = (grads.len(), b.n);
    if !(1..=short_row::<T>()).contains(&n) {
        for (i, &lg) in grads.iter().enumerate() {
            let (x, probs) = b.lane(i);
            let gi = &mut g[i * n..(i + 1) * n];
            write_row_grad(plan, x, probs, b.keep(i), lg, gi, None, b.stream);
        }
        return Ok(());
    }
    let (xs, batch) = short_block(b.x, b.pitch, n, w, scratch)?;
    softmax_like(xs, batch, alg, Reduction::Softmax, g).map_err(Error::Layout)?;
    for (i, lg) in grads.iter().enumerate() {
        let gi = &mut g[i * n..(i + 1) * n];
        if let Some(v) = lg.fill {
            gi.fill(T::from_f64(v));
        } else {
            scale_and_correct(plan, lg, gi, b.lane(i).1, plan.weight, lg.coef);
            if let Some((t, gt)) = lg.target {
                gi[t] = T::from_f64(gt);
            }
        }
        if let Some(keep) = b.keep(i) {
            // The smoothing and probability terms and the fills reach every class.
            zero_masked(gi, keep);
        }
    }
    Ok(())
}

/// The lane's `(main, lse^2, lse)` terms (the first two 0 for ignored lanes), its "none" loss
/// written to `per_lane[l]` when asked.
#[inline]
fn lane_outputs<T: Real>(
    plan: &Plan<'_, T>,
    target: LaneTarget,
    sums: &LaneSums,
    l: usize,
    lanes_out: Option<SendPtr<T>>,
) -> (f64, f64, f64) {
    let (main, lse) = lane_loss(plan, target, sums);
    let zt = match target {
        LaneTarget::Ignored => 0.0,
        _ => lse * lse,
    };
    write_lane(plan, main, zt, l, lanes_out);
    (main, zt, lse)
}

/// Lane `l`'s "none" loss, `main + z * lse^2`, written to `per_lane[l]` when asked.
#[inline]
fn write_lane<T: Real>(
    plan: &Plan<'_, T>,
    main: f64,
    zt: f64,
    l: usize,
    lanes_out: Option<SendPtr<T>>,
) {
    if let Some(op) = lanes_out {
        let v = if plan.z > 0.0 {
            main + plan.z * zt
        } else {
            main
        };
        // SAFETY: lane l owns per_lane[l]; the length was checked by `plan`, and each lane is
        // handled by exactly one piece.
        unsafe { *op.ptr().add(l) = T::from_f64(v) };
    }
}

/// The sums of one row that its loss and gradient need.
fn row_sums<T: Real>(
    plan: &Plan<'_, T>,
    x: &[T],
    target: LaneTarget,
    probs: Option<&[T]>,
    state: LseState,
) -> LaneSums {
    let mut sums = LaneSums {
        state: LseState::EMPTY,
        xt: 0.0,
        wsum: 0.0,
        qsum: 0.0,
    };
    if let LaneTarget::Ignored = target {
        return sums;
    }
    if x.is_empty() {
        // No classes: log_softmax is empty and every sum is 0 (torch).
        sums.state = LseState {
            max: 0.0,
            excess: 0.0,
        };
        return sums;
    }
    sums.state = state;
    let shift = shift_of(state);
    match target {
        LaneTarget::Class(t) => {
            sums.xt = x[t].to_f64();
            if plan.b > 0.0 {
                let parts = row_blocks(x.len(), |r| {
                    let xr = &x[r.clone()];
                    match plan.weight {
                        Some(w) => {
                            sum3(xr, &w[r], xr, |v, wk, _| wk.to_f64() * (shift - v.to_f64()))
                        }
                        None => sum3(xr, xr, xr, |v, _, _| shift - v.to_f64()),
                    }
                });
                sums.wsum = parts.sum();
            }
        }
        LaneTarget::Probs => {
            let q = probs.expect("probability targets");
            let (a, b) = (plan.a, plan.b);
            let parts = row_blocks(x.len(), |r| {
                let (xr, qr) = (&x[r.clone()], &q[r.clone()]);
                match plan.weight {
                    Some(w) => {
                        let wr = &w[r];
                        let wq = |qk: T, wk: T| wk.to_f64() * (a * qk.to_f64() + b);
                        (
                            sum3(xr, qr, wr, |v, qk, wk| wq(qk, wk) * (shift - v.to_f64())),
                            sum3(qr, wr, qr, |qk, wk, _| wq(qk, wk)),
                        )
                    }
                    None => (
                        sum3(xr, qr, xr, |v, qk, _| {
                            (a * qk.to_f64() + b) * (shift - v.to_f64())
                        }),
                        sum3(qr, qr, qr, |qk, _, _| a * qk.to_f64() + b),
                    ),
                }
            });
            for (ws, qs) in parts {
                sums.wsum += ws;
                sums.qsum += qs;
            }
        }
        LaneTarget::Ignored => {}
    }
    sums
}

/// Writes one row's gradient (dense, `g.len() == x.len()`), with 0 at the classes `keep`
/// masks when given (`x` then holds `-inf` there, as staged).
#[allow(clippy::too_many_arguments)]
fn write_row_grad<T: Real>(
    plan: &Plan<'_, T>,
    x: &[T],
    probs: Option<&[T]>,
    keep: Option<&[u8]>,
    lg: LaneGrad,
    g: &mut [T],
    terms: Option<(&[f64], usize)>,
    stream: bool,
) {
    // Written once and not read back here (no correction pass, no mask): streamed where the
    // gradient is the caller's and far larger than the caches, as softmax outputs are.
    let stream =
        stream && streams_grad(plan) && probs.is_none() && keep.is_none() && lg.corr == 0.0;
    if let Some(v) = lg.fill {
        g.fill(T::from_f64(v));
        if let Some(keep) = keep {
            zero_masked(g, keep);
        }
        return;
    }
    let gp = SendPtr(g.as_mut_ptr());
    row_blocks(x.len(), |r| {
        // SAFETY: the blocks of one row are disjoint ranges of g.
        let gb = unsafe { std::slice::from_raw_parts_mut(gp.ptr().add(r.start), r.len()) };
        // The exps its state pass kept from `from` on (taken against the row's max), and
        // the earlier ones computed again.
        let (e, from) = terms.unwrap_or((&[], x.len()));
        let split = from.clamp(r.start, r.end);
        let (head, tail) = gb.split_at_mut(split - r.start);
        // A masked class (`-inf`) gets exp 0: the vector exps zero underflowing lanes at no cost.
        row_exp_scaled(&x[r.start..split], lg.shift, lg.scale, head, stream);
        if !tail.is_empty() {
            row_scaled_terms(&e[split..r.end], lg.scale, tail, stream);
        }
        let probs = probs.map(|q| &q[r.clone()]);
        let w = plan.weight.map(|w| &w[r.clone()]);
        scale_and_correct(plan, &lg, gb, probs, w, 1.0);
        if let Some(keep) = keep {
            if lg.corr != 0.0 {
                // The smoothing and probability terms reach every class.
                zero_masked(gb, &keep[r]);
            } else {
                // Only the exps taken of the row: 0 at masked classes for a staged row (`-inf`)
                // and in the kept terms; those of an in-place row's masked logits are not.
                zero_masked(&mut gb[..split - r.start], &keep[r.start..split]);
            }
        }
    })
    .for_each(drop); // the blocks ran for their writes
    if let Some((t, gt)) = lg.target {
        g[t] = T::from_f64(gt);
    }
}

/// Whether the gradient rows of `plan` may be written with non-temporal stores where they go
/// to the caller's gradient ([`LaneBlock`]): rows over the last axis of an output that
/// [`streams`] decides, as a softmax of the logits' shape would be.
fn streams_grad<T: Real>(plan: &Plan<'_, T>) -> bool {
    plan.batch.inner == 1 && streams::<T>(&plan.batch)
}

/// Sets `g[k]` to 0 where `keep[k] == 0` (a vector select).
fn zero_masked<T: Real>(g: &mut [T], keep: &[u8]) {
    crate::kernels::masked::fill_masked(g, keep, T::from_f64(0.0));
}

/// `g_k = mul * g_k - corr * w_k [* q'_k]` over one row (block) of the lane `lg` describes:
/// `q` and `w` cover the same classes as `g`. `mul == 1` leaves `g_k` exact; a zero `corr`
/// skips the weights.
fn scale_and_correct<T: Real>(
    plan: &Plan<'_, T>,
    lg: &LaneGrad,
    g: &mut [T],
    q: Option<&[T]>,
    w: Option<&[T]>,
    mul: f64,
) {
    let (a, b, corr) = (plan.a, lg.b, lg.corr);
    match (q, w) {
        (Some(q), Some(w)) => {
            for ((gk, &qk), &wk) in g.iter_mut().zip(q).zip(w) {
                let wq = wk.to_f64() * (a * qk.to_f64() + b);
                *gk = T::from_f64(mul * gk.to_f64() - corr * wq);
            }
        }
        (Some(q), None) => {
            for (gk, &qk) in g.iter_mut().zip(q) {
                *gk = T::from_f64(mul * gk.to_f64() - corr * (a * qk.to_f64() + b));
            }
        }
        (None, Some(w)) if corr != 0.0 => {
            for (gk, &wk) in g.iter_mut().zip(w) {
                *gk = T::from_f64(mul * gk.to_f64() - corr * wk.to_f64());
            }
        }
        (None, None) if corr != 0.0 => {
            for gk in g.iter_mut() {
                *gk = T::from_f64(mul * gk.to_f64() - corr);
            }
        }
        _ if mul != 1.0 => {
            for gk in g.iter_mut() {
                *gk = T::from_f64(mul * gk.to_f64());
            }
        }
        _ => {}
    }
}

/// Columns per block when the class axis is not last: each block of `(n, width)` is
/// transposed into `width` contiguous rows (at most [`COLUMN_SCRATCH`] elements), so columns go
/// through the same SIMD row primitives, exp and accuracy as rows.
fn column_block_width(n: usize, inner: usize) -> usize {
    (COLUMN_SCRATCH / n.max(1))
        .clamp(1, COLUMN_BLOCK)
        .min(inner)
}

/// Lanes are columns of `(n, inner)` slabs (torch's `(N, C, d1, ..)`): blocks of columns are
/// gathered into row scratch (reads contiguous along `inner`), handled by the row code, and
/// their gradient rows scattered back. The blocking depends only on the sizes.
///
/// The logits are stored as `S` and computed in `T = S::Compute`: a 16-bit column block is
/// widened as it is transposed and its gradient rounded to `S` as it is scattered back, so
/// each output is the float32 computation's, rounded once.
fn xent_columns<T: Real, C: Logits<T>>(
    logits: C,
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    alg: Algorithm,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<C::Out>>,
) -> Result<(f64, f64), Error> {
    let batch = plan.batch;
    let (n, inner) = (batch.n, batch.inner);
    let width = column_block_width(n, inner);
    let blocks_per_slab = inner.div_ceil(width);
    let units = batch.outer * blocks_per_slab;
    let unit_elements = n * width;
    let per = parallel::items_per_piece(unit_elements);
    let short_index = takes_short_index(plan, targets);
    reduce_pieces(units, per, unit_elements, |range| {
        let mut acc = (0.0f64, 0.0f64);
        let zero = T::from_f64(0.0);
        let mut xs = try_vec(n * width, zero)?;
        let mut qs = match targets {
            Targets::Probs(_) => try_vec(n * width, zero)?,
            Targets::Indices(_) => Vec::new(),
        };
        let mut gs = match grad_out {
            Some(_) => try_vec(n * width, zero)?,
            None => Vec::new(),
        };
        // A line of the block in the compute type (16-bit logits only).
        let mut line = match C::WIDENS {
            true => try_vec(width, zero)?,
            false => Vec::new(),
        };
        let mut bufs = BlockBuffers::new();
        let mut short_lanes = ShortLanes::new();
        for u in range {
            let (o, jb) = (u / blocks_per_slab, u % blocks_per_slab);
            let j0 = jb * width;
            let w = width.min(inner - j0);
            let base = o * batch.outer_stride + j0;
            logits.transpose_in(base, inner, n, w, &mut xs, &mut line);
            if let Targets::Probs(q) = targets {
                q.transpose_in(base, inner, n, w, &mut qs, &mut []);
            }
            if short_index {
                let g = grad_out.map(|_| &mut gs[..w * n]);
                let block = ShortBlock {
                    x: &xs,
                    pitch: n,
                    n,
                    w,
                    l0: o * inner + j0,
                    mask: None,
                };
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
            } else {
                let block = LaneBlock {
                    x: &xs,
                    q: match targets {
                        Targets::Probs(_) => Some(&qs[..]),
                        Targets::Indices(_) => None,
                    },
                    pitch: n,
                    n,
                    w,
                    l0: o * inner + j0,
                    mask: None,
                    stream: false,
                };
                let g = grad_out.map(|_| &mut gs[..w * n]);
                lanes_block(plan, targets, block, alg, &mut bufs, lanes_out, g, &mut acc)?;
            }
            if let Some(gp) = grad_out {
                // SAFETY: slab o's columns j0..j0 + w of the dense gradient, whose length
                // `plan` checked; units own disjoint column blocks.
                unsafe { C::scatter(gp, &gs, o * n * inner + j0, n, inner, w, &mut line) };
            }
        }
        Ok(acc)
    })
}

/// How [`xent_columns`] and the masked loss read the logits and write the gradient: in the
/// compute type `T` itself (`&[T]`, rows read where they lie), or stored as 16 bits
/// ([`Widened`]), widened per run or line of a block as it is staged and rounded per run or
/// line as its gradient is written back.
pub(super) trait Logits<T: Real>: Copy + Sync {
    /// The gradient's element type.
    type Out: Copy;
    /// Whether the lines go through a buffer of `T` (of the block's width).
    const WIDENS: bool;
    /// `rows[jj * n + k] = x[base + k * inner + jj]` for `k < n`, `jj < w`: a column block
    /// as rows.
    fn transpose_in(
        self,
        base: usize,
        inner: usize,
        n: usize,
        w: usize,
        rows: &mut [T],
        line: &mut [T],
    );
    /// Writes the gradient rows `gs` of `w` columns to columns `0..w` of the `(n, inner)`
    /// slab of the dense gradient at `gp + gbase`.
    ///
    /// # Safety
    /// Those elements of the gradient writable, and no other thread's.
    #[allow(clippy::too_many_arguments)]
    unsafe fn scatter(
        gp: SendPtr<Self::Out>,
        gs: &[T],
        gbase: usize,
        n: usize,
        inner: usize,
        w: usize,
        line: &mut [T],
    );
    /// The logits themselves when stored as `T` (then read where they lie).
    fn direct(&self) -> Option<&[T]>;
    /// `out[k] = x[start + k]`: a run of a row, in `T`.
    fn read_run(self, start: usize, out: &mut [T]);
    /// Writes the dense gradient rows `g` at element `at` of the dense gradient.
    ///
    /// # Safety
    /// Those `g.len()` elements of the gradient writable, and no other thread's.
    unsafe fn write_rows(gp: SendPtr<Self::Out>, at: usize, g: &[T]);
    /// The dense gradient to write in place, when it is stored as `T` (else `None`: the rows
    /// go through a buffer and [`Logits::write_rows`]).
    fn direct_out(gp: SendPtr<Self::Out>) -> Option<SendPtr<T>>;
}

impl<T: Real> Logits<T> for &[T] {
    type Out = T;
    const WIDENS: bool = false;
    fn transpose_in(
        self,
        base: usize,
        inner: usize,
        n: usize,
        w: usize,
        rows: &mut [T],
        _: &mut [T],
    ) {
        if n == 0 || w == 0 {
            return;
        }
        let (src, dst) = (&self[base..base + (n - 1) * inner + w], &mut rows[..w * n]);
        // SAFETY: `src` holds the n lines of w elements `inner` apart, `dst` the w rows of n.
        unsafe {
            let level = crate::simd::level();
            crate::simd::transpose(level, (src.as_ptr(), inner), (dst.as_mut_ptr(), n), n, w)
        }
    }
    unsafe fn scatter(
        gp: SendPtr<T>,
        gs: &[T],
        gbase: usize,
        n: usize,
        inner: usize,
        w: usize,
        _: &mut [T],
    ) {
        masked::scatter_columns(gp, gs, gbase, n, inner, w);
    }
    fn direct(&self) -> Option<&[T]> {
        Some(self)
    }
    fn read_run(self, start: usize, out: &mut [T]) {
        out.copy_from_slice(&self[start..start + out.len()]);
    }
    unsafe fn write_rows(gp: SendPtr<T>, at: usize, g: &[T]) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(g.as_ptr(), gp.ptr().add(at), g.len()) };
    }
    fn direct_out(gp: SendPtr<T>) -> Option<SendPtr<T>> {
        Some(gp)
    }
}

/// 16-bit logits (`S::Compute` their compute type) for [`Logits`].
#[derive(Clone, Copy)]
struct Widened<'a, S>(&'a [S]);

impl<S: Stored> Logits<S::Compute> for Widened<'_, S> {
    type Out = S;
    const WIDENS: bool = true;
    fn transpose_in(
        self,
        base: usize,
        inner: usize,
        n: usize,
        w: usize,
        rows: &mut [S::Compute],
        line: &mut [S::Compute],
    ) {
        let size = std::mem::size_of::<S>() as isize;
        for k in 0..n {
            let from = &self.0[base + k * inner..][..w];
            // SAFETY: the w elements of `from`.
            unsafe { S::widen_run(from.as_ptr() as *const u8, size, &mut line[..w]) };
            for (jj, &v) in line[..w].iter().enumerate() {
                rows[jj * n + k] = v;
            }
        }
    }
    unsafe fn scatter(
        gp: SendPtr<S>,
        gs: &[S::Compute],
        gbase: usize,
        n: usize,
        inner: usize,
        w: usize,
        line: &mut [S::Compute],
    ) {
        let size = std::mem::size_of::<S>() as isize;
        for k in 0..n {
            for (jj, v) in line[..w].iter_mut().enumerate() {
                *v = gs[jj * n + k];
            }
            // SAFETY: the caller's contract (w elements of row k of the slab).
            unsafe { S::narrow_run(&line[..w], gp.ptr().add(gbase + k * inner) as *mut u8, size) };
        }
    }
    fn direct(&self) -> Option<&[S::Compute]> {
        None
    }
    fn read_run(self, start: usize, out: &mut [S::Compute]) {
        let from = &self.0[start..start + out.len()];
        // SAFETY: the out.len() elements of `from`.
        unsafe {
            S::widen_run(
                from.as_ptr() as *const u8,
                std::mem::size_of::<S>() as isize,
                out,
            )
        };
    }
    unsafe fn write_rows(gp: SendPtr<S>, at: usize, g: &[S::Compute]) {
        let size = std::mem::size_of::<S>() as isize;
        // SAFETY: the caller's contract.
        unsafe { S::narrow_run(g, gp.ptr().add(at) as *mut u8, size) };
    }
    fn direct_out(_: SendPtr<S>) -> Option<SendPtr<S::Compute>> {
        None
    }
}
