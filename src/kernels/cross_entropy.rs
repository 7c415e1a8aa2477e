//! Cross-entropy and NLL losses with torch's semantics, their gradient fused into the same pass
//! over the logits, and the softmax / log_softmax vector-Jacobian products.
//!
//! Layout: a [`Batch`] `(outer, n = classes, inner)`. With `inner == 1` each lane is a row
//! (NumPy / optax layout, `axis = -1`); with `inner > 1` the class axis sits in the middle
//! (torch's `(N, C, d1, .., dk)`, lanes `inner` apart). Index targets hold one class per lane in
//! lane order `l = o * inner + j`; probability targets use the logits' batch. Gradients and
//! per-lane losses are written dense.
//!
//! Formulas, per non-ignored lane with `L = logsumexp(x)`, `logp = x - L`, weights `w` (1 if
//! absent), `W = sum w`, `a = 1 - label_smoothing`, `b = label_smoothing / C`:
//! - index target `t`: `loss = a * w_t * (L - x_t) + b * sum_k w_k (L - x_k) + z * L^2`;
//!   gradient `g_k = c * p_k - s1 * b * w_k - [k == t] * s1 * a * w_t` with
//!   `c = s1 * (a * w_t + b * W) + 2 * z * s2 * L`.
//! - probability target `q`, `q' = a * q + b`: `loss = -sum_k w_k q'_k logp_k + z * L^2`;
//!   gradient `g_k = c * p_k - s1 * w_k q'_k` with `c = s1 * sum_k w_k q'_k + 2 z s2 L`.
//!
//! `s1`, `s2` are the reduction's scales: 1 for "sum" / "none"; for "mean" (torch) `s1 = 1 / D`
//! with `D = sum of w_t` over non-ignored lanes (index targets) or the lane count (probability
//! targets), and `s2 = 1 / K`, `K` the number of non-ignored lanes (z-loss is not
//! class-weighted). Both are known from the targets alone, so a pre-pass over the (small)
//! targets validates them and fixes the scales before any logit is read or output written;
//! then every lane is read once from memory: its state, its loss and its gradient are computed
//! while the row is in cache.
//!
//! Numerics: everything is computed in `f64` (float32 widens exactly); lane losses are summed
//! per fixed piece of lanes and the pieces merged in piece order, so results are bit-identical
//! for any thread count. `L - x_k` is formed as `(m - x_k) + log1p(excess)` (no cancellation of
//! two large terms), and the target's gradient `p_t - 1 = -(excess - expm1(x_t - m)) / S` keeps
//! its relative accuracy when `p_t` is close to 1. A lane whose max is not finite has
//! `logp = x - L` in IEEE arithmetic (loss `+inf` for a `+inf` logit off the target, NaN for
//! NaN), and a NaN gradient.

use std::fmt;
use std::ops::Range;

use crate::kernels::{row_exp_scaled, row_state, Algorithm, LONG_ROW_BLOCK};
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;
use crate::state::LseState;

/// At most this many columns form one block when the class axis is not last: wide enough for
/// contiguous reads along `inner`.
const COLUMN_BLOCK: usize = 128;

/// Rows whose states are computed together (see [`block_states`]); also the widest column
/// block, so a block's states fit one buffer.
const STATE_BLOCK: usize = COLUMN_BLOCK;

/// Rows up to this long are reduced in transposed blocks by the SIMD column kernel.
const SHORT_ROW: usize = 64;

/// Elements of a transposed column block (and of its gradient): 256 KiB of float32, within L2.
const COLUMN_SCRATCH: usize = 1 << 16;

/// torch's `reduction` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LossReduction {
    /// Per-lane losses.
    None,
    /// Weighted mean over non-ignored lanes (index targets) or mean over lanes (probabilities).
    #[default]
    Mean,
    /// Sum over lanes.
    Sum,
}

impl LossReduction {
    /// Parses `"none"`, `"mean"` or `"sum"`.
    pub fn parse(name: &str) -> Option<LossReduction> {
        match name {
            "none" => Some(LossReduction::None),
            "mean" => Some(LossReduction::Mean),
            "sum" => Some(LossReduction::Sum),
            _ => None,
        }
    }
}

/// The targets of a loss.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a, T> {
    /// One class index per lane, in lane order (`batch.count()` of them).
    Indices(&'a [i64]),
    /// Class probabilities laid out like the logits (same [`Batch`]).
    Probs(&'a [T]),
}

/// Why a loss was refused. Nothing has been written when one is returned.
#[derive(Clone, Debug, PartialEq)]
pub enum LossError {
    /// The first lane (in lane order) whose target is outside `[0, n_classes)` and is not
    /// `ignore_index`.
    TargetOutOfRange {
        position: usize,
        value: i64,
        n_classes: usize,
    },
    /// Any other invalid argument.
    Invalid(String),
}

impl fmt::Display for LossError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossError::TargetOutOfRange {
                position,
                value,
                n_classes,
            } => write!(
                f,
                "target[{position}] = {value} is outside [0, {n_classes})"
            ),
            LossError::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for LossError {}

impl From<String> for LossError {
    fn from(msg: String) -> Self {
        LossError::Invalid(msg)
    }
}

/// Options of [`cross_entropy`] (torch's keyword arguments plus `z_loss`).
#[derive(Clone, Copy, Debug)]
pub struct XentOptions<'a, T> {
    /// Per-class weights (`n` of them).
    pub weight: Option<&'a [T]>,
    /// Index targets equal to this are ignored (no loss, no gradient, not counted).
    pub ignore_index: i64,
    pub reduction: LossReduction,
    /// In `[0, 1]`.
    pub label_smoothing: f64,
    /// Coefficient of PaLM's auxiliary `lse^2` term; finite and `>= 0`.
    pub z_loss: f64,
    /// How each lane's `(max, excess)` state is computed.
    pub algorithm: Algorithm,
}

impl<T> Default for XentOptions<'_, T> {
    fn default() -> Self {
        XentOptions {
            weight: None,
            ignore_index: -100,
            reduction: LossReduction::Mean,
            label_smoothing: 0.0,
            z_loss: 0.0,
            algorithm: Algorithm::Auto,
        }
    }
}

/// What a lane's target is, after validation.
#[derive(Clone, Copy)]
enum LaneTarget {
    Ignored,
    Class(usize),
    Probs,
}

/// Everything about a call that does not depend on the logits.
struct Plan<'a, T> {
    batch: Batch,
    ignore_index: i64,
    weight: Option<&'a [T]>,
    /// `a = 1 - label_smoothing`, `b = label_smoothing / n`.
    a: f64,
    b: f64,
    /// `W = sum_k w_k`.
    w_total: f64,
    /// Reduction scales of the main term and of the z term.
    s1: f64,
    s2: f64,
    z: f64,
}

impl<T: Real> Plan<'_, T> {
    #[inline]
    fn w(&self, k: usize) -> f64 {
        match self.weight {
            Some(w) => w[k].to_f64(),
            None => 1.0,
        }
    }
}

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

/// How a lane's gradient is written: `g_k = scale * exp(x_k - m) - corr * w_k [* q'_k]`, then
/// `g_t` (index target) replaced by its accurate value.
#[derive(Clone, Copy)]
struct LaneGrad {
    /// NaN gradient (non-finite max) or zero (ignored).
    fill: Option<f64>,
    shift: f64,
    scale: f64,
    corr: f64,
    target: Option<(usize, f64)>,
}

#[inline]
fn lane_grad<T: Real>(plan: &Plan<'_, T>, target: LaneTarget, s: &LaneSums) -> LaneGrad {
    let fill = |v: f64| LaneGrad {
        fill: Some(v),
        shift: 0.0,
        scale: 0.0,
        corr: 0.0,
        target: None,
    };
    if let LaneTarget::Ignored = target {
        return fill(0.0);
    }
    if !s.state.max.is_finite() {
        return fill(f64::NAN);
    }
    let (m, excess) = (s.state.max, s.state.excess);
    let total = s.state.total();
    let lse = m + s.state.log_total();
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
                corr: plan.s1 * plan.b,
                target: Some((t, gt)),
            }
        }
        LaneTarget::Probs => LaneGrad {
            fill: None,
            shift: m,
            scale: (plan.s1 * s.qsum + zterm) / total,
            corr: plan.s1,
            target: None,
        },
        LaneTarget::Ignored => unreachable!(),
    }
}

/// Calls `f` on fixed blocks of `0..n` (one block below `2 * LONG_ROW_BLOCK`, without
/// allocating), in parallel for long rows, yielding the results in block order. The blocking
/// depends only on `n`.
fn row_blocks<R: Send, F>(
    n: usize,
    f: F,
) -> std::iter::Chain<std::option::IntoIter<R>, std::vec::IntoIter<R>>
where
    F: Fn(Range<usize>) -> R + Sync + Send,
{
    if n < 2 * LONG_ROW_BLOCK {
        return Some(f(0..n)).into_iter().chain(Vec::new());
    }
    let blocks = parallel::map_collect(n.div_ceil(LONG_ROW_BLOCK), LONG_ROW_BLOCK, |b| {
        let first = b * LONG_ROW_BLOCK;
        f(first..(first + LONG_ROW_BLOCK).min(n))
    });
    None.into_iter().chain(blocks)
}

/// `sum_k f(a_k, b_k, c_k)` over three equal-length slices in `f64`, with eight interleaved
/// accumulators: independent adds that vectorise (no bounds checks inside a chunk), in an
/// order fixed by the length alone. Pass the same slice twice for fewer operands.
#[inline]
fn sum3<A: Copy, B: Copy, C: Copy>(a: &[A], b: &[B], c: &[C], f: impl Fn(A, B, C) -> f64) -> f64 {
    debug_assert!(a.len() == b.len() && a.len() == c.len());
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .map(|((&p, &q), &r)| f(p, q, r))
        .sum();
    let mut acc = [0.0f64; 8];
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for i in 0..8 {
            acc[i] += f(xa[i], xb[i], xc[i]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Checks everything that does not need the logits and returns the plan: shapes, options,
/// every target (first bad one reported), and the reduction scales.
fn plan<'a, T: Real>(
    logits_len: usize,
    batch: Batch,
    targets: &Targets<'_, T>,
    opts: &XentOptions<'a, T>,
    per_lane_len: Option<usize>,
    grad_len: Option<usize>,
) -> Result<Plan<'a, T>, LossError> {
    batch.check(logits_len)?;
    let n = batch.n;
    let ls = opts.label_smoothing;
    if !(0.0..=1.0).contains(&ls) {
        return Err(LossError::Invalid(format!(
            "label_smoothing must be in [0, 1], got {ls}"
        )));
    }
    if !(opts.z_loss.is_finite() && opts.z_loss >= 0.0) {
        return Err(LossError::Invalid(format!(
            "z_loss must be finite and >= 0, got {}",
            opts.z_loss
        )));
    }
    if let Some(w) = opts.weight {
        if w.len() != n {
            return Err(LossError::Invalid(format!(
                "weight must have one entry per class ({n}), got {}",
                w.len()
            )));
        }
    }
    match (opts.reduction, per_lane_len) {
        (LossReduction::None, Some(len)) if len == batch.count() => {}
        (LossReduction::None, _) => {
            return Err(LossError::Invalid(format!(
                "reduction 'none' needs a per-lane output of {} elements",
                batch.count()
            )))
        }
        (_, None) => {}
        (_, Some(_)) => {
            return Err(LossError::Invalid(
                "a per-lane output is only written for reduction 'none'".into(),
            ))
        }
    }
    if let Some(len) = grad_len {
        if len != batch.elements() {
            return Err(LossError::Invalid(format!(
                "gradient holds {len} elements, expected {}",
                batch.elements()
            )));
        }
    }
    let mut w_total = 0.0;
    if let Some(w) = opts.weight {
        for &v in w {
            w_total += v.to_f64();
        }
    } else {
        w_total = n as f64;
    }
    let mut plan = Plan {
        batch,
        ignore_index: opts.ignore_index,
        weight: opts.weight,
        a: 1.0 - ls,
        b: if n > 0 { ls / n as f64 } else { 0.0 },
        w_total,
        s1: 1.0,
        s2: 1.0,
        z: opts.z_loss,
    };
    let (denominator, kept) = match targets {
        Targets::Indices(t) => {
            if t.len() != batch.count() {
                return Err(LossError::Invalid(format!(
                    "{} targets for {} lanes",
                    t.len(),
                    batch.count()
                )));
            }
            let (mut d, mut kept) = (0.0f64, 0usize);
            for (position, &value) in t.iter().enumerate() {
                if value == opts.ignore_index {
                    continue;
                }
                if value < 0 || value as u64 >= n as u64 {
                    return Err(LossError::TargetOutOfRange {
                        position,
                        value,
                        n_classes: n,
                    });
                }
                d += plan.w(value as usize);
                kept += 1;
            }
            (d, kept as f64)
        }
        Targets::Probs(q) => {
            if opts.ignore_index >= 0 {
                return Err(LossError::Invalid(
                    "ignore_index is not supported for class-probability targets".into(),
                ));
            }
            batch.check(q.len())?;
            let lanes = batch.count() as f64;
            (lanes, lanes)
        }
    };
    if opts.reduction == LossReduction::Mean {
        plan.s1 = 1.0 / denominator;
        plan.s2 = 1.0 / kept;
    }
    Ok(plan)
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
) -> Result<T, LossError> {
    let plan = plan(
        logits.len(),
        batch,
        &targets,
        opts,
        per_lane.as_ref().map(|p| p.len()),
        grad.as_ref().map(|g| g.len()),
    )?;
    let lanes_out = per_lane.map(|p| SendPtr(p.as_mut_ptr()));
    let grad_out = grad.map(|g| SendPtr(g.as_mut_ptr()));
    let (main, zsum) = if batch.count() == 0 {
        (0.0, 0.0)
    } else if batch.inner == 1 {
        xent_rows(logits, &targets, &plan, opts.algorithm, lanes_out, grad_out)
    } else {
        xent_columns(logits, &targets, &plan, opts.algorithm, lanes_out, grad_out)
    };
    let mut total = main * plan.s1;
    if plan.z > 0.0 {
        total += plan.z * zsum * plan.s2;
    }
    Ok(T::from_f64(total))
}

/// The target of lane `l`.
#[inline]
fn lane_target<T>(targets: &Targets<'_, T>, l: usize, ignore_index: i64) -> LaneTarget {
    match targets {
        Targets::Indices(t) if t[l] == ignore_index => LaneTarget::Ignored,
        // Validated by `plan`.
        Targets::Indices(t) => LaneTarget::Class(t[l] as usize),
        Targets::Probs(_) => LaneTarget::Probs,
    }
}

/// Sums `(main, lse^2)` of every lane in fixed pieces of `per` units, merged in piece order.
fn reduce_pieces<F>(units: usize, per: usize, unit_elements: usize, f: F) -> (f64, f64)
where
    F: Fn(Range<usize>) -> (f64, f64) + Sync + Send,
{
    let pieces = units.div_ceil(per.max(1));
    let partials = parallel::map_collect(pieces, per * unit_elements.max(1), |p| {
        f(p * per..((p + 1) * per).min(units))
    });
    partials
        .into_iter()
        .fold((0.0, 0.0), |acc, (m, z)| (acc.0 + m, acc.1 + z))
}

/// Lanes are rows (`inner == 1`): each row is reduced by [`row_state`] and its gradient written
/// by [`row_exp_scaled`], the SIMD-dispatched row primitives.
fn xent_rows<T: Real>(
    logits: &[T],
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    alg: Algorithm,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<T>>,
) -> (f64, f64) {
    let batch = plan.batch;
    let n = batch.n;
    let ignore = plan.ignore_index;
    let per = parallel::items_per_piece(n);
    reduce_pieces(batch.outer, per, n, |range| {
        let mut acc = (0.0f64, 0.0f64);
        let mut scratch = Vec::new();
        let mut states = [LseState::EMPTY; STATE_BLOCK];
        let mut l0 = range.start;
        while l0 < range.end {
            let w = STATE_BLOCK.min(range.end - l0);
            let first = l0 * batch.outer_stride;
            block_states(
                &logits[first..],
                batch.outer_stride,
                n,
                w,
                alg,
                &mut scratch,
                &mut states,
            );
            for (i, &state) in states.iter().enumerate().take(w) {
                let l = l0 + i;
                let start = l * batch.outer_stride;
                let x = &logits[start..start + n];
                let target = lane_target(targets, l, ignore);
                let probs = match targets {
                    Targets::Probs(q) => Some(&q[start..start + n]),
                    Targets::Indices(_) => None,
                };
                let sums = row_sums(plan, x, target, probs, state);
                let (main, zt) = lane_outputs(plan, target, &sums, l, lanes_out);
                if let Some(gp) = grad_out {
                    // SAFETY: lane l owns the dense row l of the gradient, checked by `plan`.
                    let g = unsafe { std::slice::from_raw_parts_mut(gp.ptr().add(l * n), n) };
                    write_row_grad(plan, x, probs, lane_grad(plan, target, &sums), g);
                }
                acc.0 += main;
                acc.1 += zt;
            }
            l0 += w;
        }
        acc
    })
}

/// The `(max, excess)` states of `w` rows of length `n`, row `i` at `x[i * pitch..][..n]`.
/// Short rows are transposed into an `(n, w)` block and reduced by the SIMD column kernel
/// (rows in vector lanes), which costs a fraction of one [`row_state`] call per row; longer
/// rows use [`row_state`]. Rows and columns both come through here, so both layouts give the
/// same bits.
fn block_states<T: Real>(
    x: &[T],
    pitch: usize,
    n: usize,
    w: usize,
    alg: Algorithm,
    scratch: &mut Vec<T>,
    states: &mut [LseState],
) {
    if (1..=SHORT_ROW).contains(&n) && w > 1 {
        scratch.clear();
        scratch.resize(n * w, T::from_f64(0.0));
        for i in 0..w {
            for (k, &v) in x[i * pitch..i * pitch + n].iter().enumerate() {
                scratch[k * w + i] = v;
            }
        }
        crate::kernels::lse_states(scratch, Batch::contiguous(1, n, w), alg, &mut states[..w])
            .expect("the block matches its batch");
    } else {
        for (i, st) in states.iter_mut().enumerate().take(w) {
            *st = row_state(&x[i * pitch..i * pitch + n], alg);
        }
    }
}

/// The lane's `(main, lse^2)` terms (0 for ignored lanes), its "none" loss written to
/// `per_lane[l]` when asked.
#[inline]
fn lane_outputs<T: Real>(
    plan: &Plan<'_, T>,
    target: LaneTarget,
    sums: &LaneSums,
    l: usize,
    lanes_out: Option<SendPtr<T>>,
) -> (f64, f64) {
    let (main, lse) = lane_loss(plan, target, sums);
    let zt = match target {
        LaneTarget::Ignored => 0.0,
        _ => lse * lse,
    };
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
    (main, zt)
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

/// Writes one row's gradient (dense, `g.len() == x.len()`).
fn write_row_grad<T: Real>(
    plan: &Plan<'_, T>,
    x: &[T],
    probs: Option<&[T]>,
    lg: LaneGrad,
    g: &mut [T],
) {
    if let Some(v) = lg.fill {
        g.fill(T::from_f64(v));
        return;
    }
    let gp = SendPtr(g.as_mut_ptr());
    row_blocks(x.len(), |r| {
        // SAFETY: the blocks of one row are disjoint ranges of g.
        let gb = unsafe { std::slice::from_raw_parts_mut(gp.ptr().add(r.start), r.len()) };
        row_exp_scaled(&x[r.clone()], lg.shift, lg.scale, gb);
        let (a, b) = (plan.a, plan.b);
        match (probs, plan.weight) {
            (Some(q), Some(w)) => {
                for ((gk, &qk), &wk) in gb.iter_mut().zip(&q[r.clone()]).zip(&w[r]) {
                    let wq = wk.to_f64() * (a * qk.to_f64() + b);
                    *gk = T::from_f64(gk.to_f64() - lg.corr * wq);
                }
            }
            (Some(q), None) => {
                for (gk, &qk) in gb.iter_mut().zip(&q[r]) {
                    *gk = T::from_f64(gk.to_f64() - lg.corr * (a * qk.to_f64() + b));
                }
            }
            (None, Some(w)) if lg.corr != 0.0 => {
                for (gk, &wk) in gb.iter_mut().zip(&w[r]) {
                    *gk = T::from_f64(gk.to_f64() - lg.corr * wk.to_f64());
                }
            }
            (None, None) if lg.corr != 0.0 => {
                for gk in gb.iter_mut() {
                    *gk = T::from_f64(gk.to_f64() - lg.corr);
                }
            }
            _ => {}
        }
    })
    .for_each(drop); // the blocks ran for their writes
    if let Some((t, gt)) = lg.target {
        g[t] = T::from_f64(gt);
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
fn xent_columns<T: Real>(
    logits: &[T],
    targets: &Targets<'_, T>,
    plan: &Plan<'_, T>,
    alg: Algorithm,
    lanes_out: Option<SendPtr<T>>,
    grad_out: Option<SendPtr<T>>,
) -> (f64, f64) {
    let batch = plan.batch;
    let (n, inner) = (batch.n, batch.inner);
    let width = column_block_width(n, inner);
    let blocks_per_slab = inner.div_ceil(width);
    let units = batch.outer * blocks_per_slab;
    let unit_elements = n * width;
    let per = parallel::items_per_piece(unit_elements);
    reduce_pieces(units, per, unit_elements, |range| {
        let mut acc = (0.0f64, 0.0f64);
        let mut xs = vec![T::from_f64(0.0); n * width];
        let mut qs = match targets {
            Targets::Probs(_) => vec![T::from_f64(0.0); n * width],
            Targets::Indices(_) => Vec::new(),
        };
        let mut gs = match grad_out {
            Some(_) => vec![T::from_f64(0.0); n * width],
            None => Vec::new(),
        };
        let mut scratch = Vec::new();
        let mut states = [LseState::EMPTY; STATE_BLOCK];
        for u in range {
            let (o, jb) = (u / blocks_per_slab, u % blocks_per_slab);
            let j0 = jb * width;
            let w = width.min(inner - j0);
            let base = o * batch.outer_stride + j0;
            transpose_in(&logits[base..], inner, n, w, &mut xs);
            if let Targets::Probs(q) = targets {
                transpose_in(&q[base..], inner, n, w, &mut qs);
            }
            block_states(&xs, n, n, w, alg, &mut scratch, &mut states);
            for jj in 0..w {
                let l = o * inner + j0 + jj;
                let x = &xs[jj * n..(jj + 1) * n];
                let target = lane_target(targets, l, plan.ignore_index);
                let probs = match targets {
                    Targets::Probs(_) => Some(&qs[jj * n..(jj + 1) * n]),
                    Targets::Indices(_) => None,
                };
                let sums = row_sums(plan, x, target, probs, states[jj]);
                let (main, zt) = lane_outputs(plan, target, &sums, l, lanes_out);
                if grad_out.is_some() {
                    let g = &mut gs[jj * n..(jj + 1) * n];
                    write_row_grad(plan, x, probs, lane_grad(plan, target, &sums), g);
                }
                acc.0 += main;
                acc.1 += zt;
            }
            if let Some(gp) = grad_out {
                let gbase = o * n * inner + j0;
                for k in 0..n {
                    for jj in 0..w {
                        // SAFETY: (k, j0 + jj) of slab o in the dense gradient, whose length
                        // `plan` checked; units own disjoint column blocks.
                        unsafe { *gp.ptr().add(gbase + k * inner + jj) = gs[jj * n + k] };
                    }
                }
            }
        }
        acc
    })
}

/// `rows[jj * n + k] = src[k * inner + jj]` for `k < n`, `jj < w`: a column block as rows.
fn transpose_in<T: Real>(src: &[T], inner: usize, n: usize, w: usize, rows: &mut [T]) {
    for k in 0..n {
        let line = &src[k * inner..k * inner + w];
        for (jj, &v) in line.iter().enumerate() {
            rows[jj * n + k] = v;
        }
    }
}

/// torch's `nll_loss` of `log_probs` (laid out by `batch`) against index targets: the lane loss
/// is `-w_t * log_probs[t]`, 0 for ignored lanes; "mean" divides by the sum of `w_t` over
/// non-ignored lanes (NaN when there are none). Same contract as [`cross_entropy`]; only the
/// target elements are read.
pub fn nll_loss<T: Real>(
    log_probs: &[T],
    batch: Batch,
    targets: &[i64],
    weight: Option<&[T]>,
    ignore_index: i64,
    reduction: LossReduction,
    per_lane: Option<&mut [T]>,
) -> Result<T, LossError> {
    let opts = XentOptions {
        weight,
        ignore_index,
        reduction,
        ..XentOptions::default()
    };
    let targets = Targets::Indices(targets);
    let plan = plan(
        log_probs.len(),
        batch,
        &targets,
        &opts,
        per_lane.as_ref().map(|p| p.len()),
        None,
    )?;
    let lanes_out = per_lane.map(|p| SendPtr(p.as_mut_ptr()));
    let per = parallel::items_per_piece(1);
    let (main, _) = reduce_pieces(batch.count(), per, 1, |range| {
        let mut acc = 0.0f64;
        for l in range {
            let v = match lane_target(&targets, l, plan.ignore_index) {
                LaneTarget::Class(t) => {
                    let (o, j) = (l / batch.inner, l % batch.inner);
                    let x = log_probs[o * batch.outer_stride + t * batch.inner + j].to_f64();
                    -(plan.w(t) * x)
                }
                _ => 0.0,
            };
            if let Some(op) = lanes_out {
                // SAFETY: lane l owns per_lane[l]; the length was checked by `plan`.
                unsafe { *op.ptr().add(l) = T::from_f64(v) };
            }
            acc += v;
        }
        (acc, 0.0)
    });
    Ok(T::from_f64(main * plan.s1))
}

/// Which vector-Jacobian product [`softmax_like_backward`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// `y = softmax(x)`: `dx = y * (dy - sum(y * dy))`.
    Softmax,
    /// `y = log_softmax(x)`: `dx = dy - exp(y) * sum(dy)`.
    LogSoftmax,
}

/// `dx = softmax_backward(y, dy)`; see [`Backward::Softmax`].
pub fn softmax_backward<T: Real>(
    y: &[T],
    dy: &[T],
    batch: Batch,
    out: &mut [T],
) -> Result<(), String> {
    softmax_like_backward(y, dy, batch, Backward::Softmax, out)
}

/// `dx = log_softmax_backward(y, dy)`; see [`Backward::LogSoftmax`].
pub fn log_softmax_backward<T: Real>(
    y: &[T],
    dy: &[T],
    batch: Batch,
    out: &mut [T],
) -> Result<(), String> {
    softmax_like_backward(y, dy, batch, Backward::LogSoftmax, out)
}

/// The vector-Jacobian product of softmax or log_softmax from the forward output `y` and the
/// cotangent `dy` (both laid out by `batch`) into the dense `(outer, n, inner)` `out`. The lane
/// sum is taken in `f64` in a fixed order, so the result does not depend on the thread count.
pub fn softmax_like_backward<T: Real>(
    y: &[T],
    dy: &[T],
    batch: Batch,
    what: Backward,
    out: &mut [T],
) -> Result<(), String> {
    batch.check(y.len())?;
    batch.check(dy.len())?;
    if out.len() != batch.elements() {
        return Err(format!(
            "output holds {} elements, expected {}",
            out.len(),
            batch.elements()
        ));
    }
    let (n, inner) = (batch.n, batch.inner);
    let op = SendPtr(out.as_mut_ptr());
    if inner == 1 {
        parallel::for_each_piece(batch.outer, 2 * n.max(1), |range| {
            for l in range {
                let start = l * batch.outer_stride;
                let (yr, dr) = (&y[start..start + n], &dy[start..start + n]);
                let dot: f64 = row_blocks(n, |r| match what {
                    Backward::Softmax => {
                        let yb = &yr[r.clone()];
                        sum3(yb, &dr[r], yb, |a, b, _| a.to_f64() * b.to_f64())
                    }
                    Backward::LogSoftmax => {
                        let d = &dr[r];
                        sum3(d, d, d, |a, _, _| a.to_f64())
                    }
                })
                .sum();
                // SAFETY: lane l owns the dense row l of out, whose length was checked.
                let o = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(l * n), n) };
                let orow = SendPtr(o.as_mut_ptr());
                row_blocks(n, |r| {
                    // SAFETY: the blocks of one row are disjoint ranges of o.
                    let ob =
                        unsafe { std::slice::from_raw_parts_mut(orow.ptr().add(r.start), r.len()) };
                    match what {
                        Backward::Softmax => {
                            for (k, ok) in r.zip(ob.iter_mut()) {
                                let yk = yr[k].to_f64();
                                *ok = T::from_f64(yk * (dr[k].to_f64() - dot));
                            }
                        }
                        Backward::LogSoftmax => {
                            // exp(y) * sum(dy) through the SIMD write primitive, then dy - that.
                            row_exp_scaled(&yr[r.clone()], 0.0, dot, ob);
                            for (k, ok) in r.zip(ob.iter_mut()) {
                                *ok = T::from_f64(dr[k].to_f64() - ok.to_f64());
                            }
                        }
                    }
                })
                .for_each(drop); // the blocks ran for their writes
            }
        });
        return Ok(());
    }
    let blocks_per_slab = inner.div_ceil(COLUMN_BLOCK);
    let units = batch.outer * blocks_per_slab;
    let unit_elements = 2 * n * COLUMN_BLOCK.min(inner);
    parallel::for_each_piece(units, unit_elements, |range| {
        for u in range {
            let (o, jb) = (u / blocks_per_slab, u % blocks_per_slab);
            let j0 = jb * COLUMN_BLOCK;
            let width = COLUMN_BLOCK.min(inner - j0);
            let base = o * batch.outer_stride + j0;
            let mut dot = [0.0f64; COLUMN_BLOCK];
            for k in 0..n {
                let row = base + k * inner;
                for (jj, d) in dot.iter_mut().enumerate().take(width) {
                    let dk = dy[row + jj].to_f64();
                    *d += match what {
                        Backward::Softmax => y[row + jj].to_f64() * dk,
                        Backward::LogSoftmax => dk,
                    };
                }
            }
            let obase = o * n * inner + j0;
            for k in 0..n {
                let row = base + k * inner;
                for (jj, &d) in dot.iter().enumerate().take(width) {
                    let (yk, dk) = (y[row + jj].to_f64(), dy[row + jj].to_f64());
                    let v = match what {
                        Backward::Softmax => yk * (dk - d),
                        Backward::LogSoftmax => dk - yk.exp() * d,
                    };
                    // SAFETY: (k, column) of this unit's block in the dense out; units own
                    // disjoint column blocks and the length was checked.
                    unsafe { *op.ptr().add(obase + k * inner + jj) = T::from_f64(v) };
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::Rng;

    /// An independent float64 re-implementation of torch's formulas (log_softmax, then the
    /// weighted NLL / smoothing / probability sums, then the reduction), plus the z-loss term.
    #[derive(Clone, Copy)]
    struct Ref<'a> {
        x: &'a [f64],
        batch: Batch,
        weight: Option<&'a [f64]>,
        ignore: i64,
        ls: f64,
        z: f64,
        reduction: LossReduction,
    }

    enum RefTarget<'a> {
        Idx(&'a [i64]),
        Prob(&'a [f64]),
    }

    impl Ref<'_> {
        fn lane(&self, l: usize) -> Vec<f64> {
            let (o, j) = (l / self.batch.inner, l % self.batch.inner);
            (0..self.batch.n)
                .map(|k| self.x[o * self.batch.outer_stride + k * self.batch.inner + j])
                .collect()
        }
        fn w(&self, k: usize) -> f64 {
            self.weight.map_or(1.0, |w| w[k])
        }
        /// (per-lane losses, reduced loss).
        fn eval(&self, t: &RefTarget) -> (Vec<f64>, f64) {
            let c = self.batch.n as f64;
            let lanes = self.batch.count();
            let mut per = vec![0.0; lanes];
            let (mut nll_sum, mut smooth_sum, mut z_sum, mut denom, mut kept) =
                (0.0, 0.0, 0.0, 0.0, 0.0);
            for (l, p) in per.iter_mut().enumerate() {
                let x = self.lane(l);
                let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let logp: Vec<f64> = x.iter().map(|v| v - lse).collect();
                match t {
                    RefTarget::Idx(t) => {
                        if t[l] == self.ignore {
                            continue;
                        }
                        let tl = t[l] as usize;
                        let nll = -self.w(tl) * logp[tl];
                        let smooth: f64 = -(0..x.len()).map(|k| self.w(k) * logp[k]).sum::<f64>();
                        *p = (1.0 - self.ls) * nll + self.ls / c * smooth + self.z * lse * lse;
                        nll_sum += nll;
                        smooth_sum += smooth;
                        denom += self.w(tl);
                    }
                    RefTarget::Prob(q) => {
                        let q = &q[l * x.len()..(l + 1) * x.len()];
                        let v: f64 = -(0..x.len())
                            .map(|k| self.w(k) * (q[k] * (1.0 - self.ls) + self.ls / c) * logp[k])
                            .sum::<f64>();
                        *p = v + self.z * lse * lse;
                        nll_sum += v;
                        denom += 1.0;
                    }
                }
                z_sum += lse * lse;
                kept += 1.0;
            }
            let total = match self.reduction {
                LossReduction::Mean => {
                    let base = match t {
                        RefTarget::Idx(_) => {
                            (1.0 - self.ls) * nll_sum / denom + self.ls / c * smooth_sum / denom
                        }
                        RefTarget::Prob(_) => nll_sum / denom,
                    };
                    base + if self.z > 0.0 {
                        self.z * z_sum / kept
                    } else {
                        0.0
                    }
                }
                _ => per.iter().sum(),
            };
            (per, total)
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * b.abs().max(1.0)
    }

    /// Probability targets in the dense layout of `batch`, lane-major for the reference.
    fn random_probs(rng: &mut Rng, batch: Batch) -> (Vec<f64>, Vec<f64>) {
        let (n, inner) = (batch.n, batch.inner);
        let mut lane_major = vec![0.0; batch.elements()];
        let mut dense = vec![0.0; batch.elements()];
        for l in 0..batch.count() {
            let raw: Vec<f64> = (0..n).map(|_| rng.uniform(0.0, 1.0)).collect();
            let s: f64 = raw.iter().sum();
            let (o, j) = (l / inner, l % inner);
            for k in 0..n {
                lane_major[l * n + k] = raw[k] / s;
                dense[o * n * inner + k * inner + j] = raw[k] / s;
            }
        }
        (lane_major, dense)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        x: &[f64],
        batch: Batch,
        targets: Targets<'_, f64>,
        weight: Option<&[f64]>,
        ls: f64,
        z: f64,
        reduction: LossReduction,
        with_grad: bool,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let opts = XentOptions {
            weight,
            label_smoothing: ls,
            z_loss: z,
            reduction,
            ..XentOptions::default()
        };
        let mut per = vec![0.0; batch.count()];
        let mut grad = vec![0.0; batch.elements()];
        let total = cross_entropy(
            x,
            batch,
            targets,
            &opts,
            (reduction == LossReduction::None).then_some(&mut per[..]),
            with_grad.then_some(&mut grad[..]),
        )
        .unwrap();
        (total, per, grad)
    }

    #[test]
    fn matches_reference_and_finite_differences_for_every_option() {
        let mut rng = Rng::new(11);
        for &(outer, n, inner) in &[(5, 7, 1), (3, 4, 5), (1, 9, 1), (2, 3, 130)] {
            let batch = Batch::contiguous(outer, n, inner);
            let x: Vec<f64> = (0..batch.elements())
                .map(|_| rng.uniform(-4.0, 4.0))
                .collect();
            let w: Vec<f64> = (0..n).map(|_| rng.uniform(0.2, 2.0)).collect();
            let mut t: Vec<i64> = (0..batch.count())
                .map(|_| (rng.next_u64() % n as u64) as i64)
                .collect();
            if t.len() > 1 {
                t[0] = -100;
            }
            let (q_lane, q_dense) = random_probs(&mut rng, batch);
            for weight in [None, Some(&w[..])] {
                for ls in [0.0, 0.3] {
                    for z in [0.0, 0.05] {
                        for reduction in
                            [LossReduction::Mean, LossReduction::Sum, LossReduction::None]
                        {
                            for probs in [false, true] {
                                let targets = if probs {
                                    Targets::Probs(&q_dense[..])
                                } else {
                                    Targets::Indices(&t[..])
                                };
                                let rt = if probs {
                                    RefTarget::Prob(&q_lane)
                                } else {
                                    RefTarget::Idx(&t)
                                };
                                let r = Ref {
                                    x: &x,
                                    batch,
                                    weight,
                                    ignore: -100,
                                    ls,
                                    z,
                                    reduction,
                                };
                                let (want_per, want) = r.eval(&rt);
                                let (got, per, grad) =
                                    run(&x, batch, targets, weight, ls, z, reduction, true);
                                let what = format!("{outer}x{n}x{inner} w={} ls={ls} z={z} {reduction:?} probs={probs}", weight.is_some());
                                assert!(close(got, want, 1e-13), "{what}: {got} vs {want}");
                                if reduction == LossReduction::None {
                                    for (a, b) in per.iter().zip(&want_per) {
                                        assert!(close(*a, *b, 1e-13), "{what}: {a} vs {b}");
                                    }
                                }
                                // Central differences of the reference's returned loss.
                                let h = 1e-5;
                                for i in 0..x.len() {
                                    let mut xp = x.clone();
                                    xp[i] += h;
                                    let mut xm = x.clone();
                                    xm[i] -= h;
                                    let f = |xs: &[f64]| Ref { x: xs, ..r }.eval(&rt).1;
                                    let fd = (f(&xp) - f(&xm)) / (2.0 * h);
                                    assert!(
                                        (grad[i] - fd).abs() <= 1e-7 * fd.abs().max(1.0),
                                        "{what} grad[{i}]: {} vs {fd}",
                                        grad[i]
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn columns_equal_rows_of_the_transpose_bitwise() {
        // Columns are gathered into rows and run through the row code: same bits. n * inner
        // exceeds one scratch block, so blocks narrower than COLUMN_BLOCK and a ragged last
        // block are exercised too.
        let mut rng = Rng::new(13);
        for &(outer, n, inner) in &[(2, 700, 150), (3, 5, 300), (1, 70_000, 3)] {
            let cols = Batch::contiguous(outer, n, inner);
            let x: Vec<f32> = (0..cols.elements())
                .map(|_| rng.uniform(-20.0, 20.0) as f32)
                .collect();
            let t: Vec<i64> = (0..cols.count())
                .map(|l| {
                    if l % 7 == 3 {
                        -100
                    } else {
                        (rng.next_u64() % n as u64) as i64
                    }
                })
                .collect();
            let w: Vec<f32> = (0..n).map(|k| 0.5 + (k % 5) as f32).collect();
            let mut xt = vec![0.0f32; x.len()];
            for o in 0..outer {
                for k in 0..n {
                    for j in 0..inner {
                        xt[(o * inner + j) * n + k] = x[(o * n + k) * inner + j];
                    }
                }
            }
            let opts = XentOptions {
                weight: Some(&w[..]),
                label_smoothing: 0.1,
                z_loss: 1e-3,
                reduction: LossReduction::None,
                ..XentOptions::default()
            };
            let rows = Batch::rows(outer * inner, n);
            let (mut pc, mut pr) = (vec![0.0f32; cols.count()], vec![0.0f32; cols.count()]);
            let (mut gc, mut gr) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
            cross_entropy(
                &x,
                cols,
                Targets::Indices(&t),
                &opts,
                Some(&mut pc),
                Some(&mut gc),
            )
            .unwrap();
            cross_entropy(
                &xt,
                rows,
                Targets::Indices(&t),
                &opts,
                Some(&mut pr),
                Some(&mut gr),
            )
            .unwrap();
            assert_eq!(pc, pr, "{cols:?}");
            for o in 0..outer {
                for k in 0..n {
                    for j in 0..inner {
                        let (a, b) = (gc[(o * n + k) * inner + j], gr[(o * inner + j) * n + k]);
                        assert_eq!(a.to_bits(), b.to_bits(), "{cols:?} {o} {k} {j}");
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Identities of the unweighted index-target loss: it is >= 0, invariant under a shift of
        /// a row, and (without smoothing weights or z-loss) its gradient rows sum to 0 (softmax
        /// sums to 1); label smoothing keeps the gradient row sums at 0 too.
        #[test]
        fn loss_identities(
            rows in 1usize..6,
            n in 1usize..40,
            seed in 0u64..1000,
            shift in -500.0f64..500.0,
            ls in 0.0f64..1.0,
        ) {
            let mut rng = Rng::new(seed);
            let batch = Batch::rows(rows, n);
            let x: Vec<f64> = (0..rows * n).map(|_| rng.uniform(-30.0, 30.0)).collect();
            let t: Vec<i64> = (0..rows).map(|_| (rng.next_u64() % n as u64) as i64).collect();
            let opts = XentOptions {
                label_smoothing: ls,
                reduction: LossReduction::None,
                ..XentOptions::default()
            };
            let mut per = vec![0.0; rows];
            let mut g = vec![0.0; rows * n];
            cross_entropy(&x, batch, Targets::Indices(&t), &opts, Some(&mut per), Some(&mut g))
                .unwrap();
            let xs: Vec<f64> = x.iter().map(|v| v + shift).collect();
            let mut per_s = vec![0.0; rows];
            cross_entropy(&xs, batch, Targets::Indices(&t), &opts, Some(&mut per_s), None)
                .unwrap();
            for r in 0..rows {
                proptest::prop_assert!(per[r] >= 0.0);
                proptest::prop_assert!((per[r] - per_s[r]).abs() <= 1e-12 * (1.0 + shift.abs()) * 64.0);
                let row_sum: f64 = g[r * n..(r + 1) * n].iter().sum();
                proptest::prop_assert!(row_sum.abs() <= 1e-14 * n as f64, "{row_sum}");
            }
        }
    }

    #[test]
    fn float32_rounds_once_and_sums_in_float64() {
        let mut rng = Rng::new(5);
        let batch = Batch::rows(64, 1000);
        let x32: Vec<f32> = (0..batch.elements())
            .map(|_| rng.uniform(-8.0, 8.0) as f32)
            .collect();
        let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let t: Vec<i64> = (0..64).map(|i| (i * 37 % 1000) as i64).collect();
        let opts32 = XentOptions::<f32>::default();
        let opts64 = XentOptions::<f64>::default();
        let mut g32 = vec![0.0f32; x32.len()];
        let mut g64 = vec![0.0f64; x64.len()];
        let l32 = cross_entropy(
            &x32,
            batch,
            Targets::Indices(&t),
            &opts32,
            None,
            Some(&mut g32),
        )
        .unwrap();
        let l64 = cross_entropy(
            &x64,
            batch,
            Targets::Indices(&t),
            &opts64,
            None,
            Some(&mut g64),
        )
        .unwrap();
        assert_eq!(l32, l64 as f32);
        for (a, b) in g32.iter().zip(&g64) {
            assert!(
                (*a as f64 - b).abs() <= 0.5 * f32::EPSILON as f64 * b.abs() + 1e-45,
                "{a} {b}"
            );
        }
    }

    #[test]
    fn seeds_batch_has_finite_loss_and_gradient() {
        // The seeds' batch: a naive softmax-then-log gives loss inf and NaN gradients.
        let x = [2.0f32, 1.0, 0.1, 1000.0, 1.0, -1000.0, 3.0, 2.0, 1.0];
        let t = [0i64, 2, 1];
        let mut g = [0.0f32; 9];
        let loss = cross_entropy(
            &x,
            Batch::rows(3, 3),
            Targets::Indices(&t),
            &XentOptions::default(),
            None,
            Some(&mut g),
        )
        .unwrap();
        let lse = |r: &[f64]| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        };
        let rows: Vec<Vec<f64>> = x
            .chunks(3)
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect();
        let want: f64 = (0..3)
            .map(|i| lse(&rows[i]) - rows[i][t[i] as usize])
            .sum::<f64>()
            / 3.0;
        assert!(
            loss.is_finite() && (loss as f64 - want).abs() <= 1e-6 * want,
            "{loss} {want}"
        );
        assert!((want - 667.2749).abs() < 1e-3, "{want}");
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // Row 2: softmax is (1, 0, 0) and the target is class 2.
        assert_eq!(&g[3..6], &[1.0 / 3.0, 0.0, -1.0 / 3.0]);
    }

    #[test]
    fn target_gradient_keeps_relative_accuracy_near_one() {
        // p_0 = 1 / (1 + e^-40): g_0 = p_0 - 1 = -e^-40 / (1 + e^-40) ~ -4.25e-18, not 0.
        let x = [0.0f64, -40.0];
        let mut g = [0.0; 2];
        cross_entropy(
            &x,
            Batch::rows(1, 2),
            Targets::Indices(&[0]),
            &XentOptions::default(),
            None,
            Some(&mut g),
        )
        .unwrap();
        let want = -(-40.0f64).exp() / (1.0 + (-40.0f64).exp());
        assert!(
            (g[0] - want).abs() <= 2.0 * f64::EPSILON * want.abs(),
            "{} {want}",
            g[0]
        );
        assert!((g[1] + want).abs() <= 2.0 * f64::EPSILON * want.abs());
    }

    #[test]
    fn bit_identical_for_any_thread_count() {
        let mut rng = Rng::new(9);
        for batch in [
            Batch::rows(700, 333),
            Batch::contiguous(4, 50, 700),
            Batch::rows(1, 2 * LONG_ROW_BLOCK + 17),
        ] {
            let x: Vec<f32> = (0..batch.elements())
                .map(|_| rng.uniform(-30.0, 30.0) as f32)
                .collect();
            let t: Vec<i64> = (0..batch.count())
                .map(|_| (rng.next_u64() % batch.n as u64) as i64)
                .collect();
            let opts = XentOptions {
                label_smoothing: 0.1,
                z_loss: 1e-4,
                ..XentOptions::default()
            };
            let mut results = Vec::new();
            for threads in [1, 2, 3] {
                parallel::set_num_threads(threads);
                let mut g = vec![0.0f32; x.len()];
                let l = cross_entropy(&x, batch, Targets::Indices(&t), &opts, None, Some(&mut g))
                    .unwrap();
                results.push((
                    l.to_bits(),
                    g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ));
            }
            parallel::set_num_threads(0);
            assert!(results.windows(2).all(|w| w[0] == w[1]), "{batch:?}");
        }
    }

    #[test]
    fn long_rows_match_reference() {
        let mut rng = Rng::new(4);
        let n = 2 * LONG_ROW_BLOCK + 5;
        let batch = Batch::rows(2, n);
        let x: Vec<f64> = (0..2 * n).map(|_| rng.uniform(-10.0, 10.0)).collect();
        let t = [7i64, (n - 1) as i64];
        let r = Ref {
            x: &x,
            batch,
            weight: None,
            ignore: -100,
            ls: 0.2,
            z: 0.01,
            reduction: LossReduction::Sum,
        };
        let (_, want) = r.eval(&RefTarget::Idx(&t));
        let (got, _, grad) = run(
            &x,
            batch,
            Targets::Indices(&t),
            None,
            0.2,
            0.01,
            LossReduction::Sum,
            true,
        );
        assert!(close(got, want, 1e-12), "{got} {want}");
        // Spot-check gradient entries against the closed form.
        let m = x[..n].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + x[..n].iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let c = 0.8 + 0.2 + 2.0 * 0.01 * lse;
        for k in [0usize, 7, 70_000, n - 1] {
            let p = (x[k] - lse).exp();
            let want = c * p - 0.2 / n as f64 - if k == 7 { 0.8 } else { 0.0 };
            assert!(close(grad[k], want, 1e-12), "{k}: {} {want}", grad[k]);
        }
    }

    #[test]
    fn invalid_targets_are_reported_before_anything_is_written() {
        let x = [0.0f64; 10];
        let mut g = [7.0f64; 10];
        let mut per = [7.0f64; 2];
        let opts = XentOptions {
            reduction: LossReduction::None,
            ..XentOptions::default()
        };
        let err = cross_entropy(
            &x,
            Batch::rows(2, 5),
            Targets::Indices(&[1, 5]),
            &opts,
            Some(&mut per),
            Some(&mut g),
        )
        .unwrap_err();
        assert_eq!(
            err,
            LossError::TargetOutOfRange {
                position: 1,
                value: 5,
                n_classes: 5
            }
        );
        assert_eq!(err.to_string(), "target[1] = 5 is outside [0, 5)");
        assert_eq!((g, per), ([7.0; 10], [7.0; 2]));
        let err = cross_entropy(
            &x,
            Batch::rows(2, 5),
            Targets::Indices(&[-1, 0]),
            &XentOptions::default(),
            None,
            None,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            LossError::TargetOutOfRange {
                position: 0,
                value: -1,
                ..
            }
        ));
        for opts in [
            XentOptions {
                label_smoothing: 1.5,
                ..XentOptions::default()
            },
            XentOptions {
                label_smoothing: f64::NAN,
                ..XentOptions::default()
            },
            XentOptions {
                z_loss: -1.0,
                ..XentOptions::default()
            },
            XentOptions {
                weight: Some(&[1.0, 2.0][..]),
                ..XentOptions::default()
            },
        ] {
            assert!(matches!(
                cross_entropy(
                    &x,
                    Batch::rows(2, 5),
                    Targets::Indices(&[0, 0]),
                    &opts,
                    None,
                    None
                ),
                Err(LossError::Invalid(_))
            ));
        }
        // ignore_index may be a valid class; it is skipped, not checked.
        let opts = XentOptions {
            ignore_index: 3,
            ..XentOptions::default()
        };
        let l = cross_entropy(
            &x,
            Batch::rows(2, 5),
            Targets::Indices(&[3, 1]),
            &opts,
            None,
            None,
        )
        .unwrap();
        assert!(close(l, 5.0f64.ln(), 1e-15));
    }

    #[test]
    fn all_ignored_mean_is_nan_and_sum_is_zero() {
        let x = [1.0f64, 2.0, 3.0, 4.0];
        let t = [-100i64, -100];
        let mut g = [1.0; 4];
        let l = cross_entropy(
            &x,
            Batch::rows(2, 2),
            Targets::Indices(&t),
            &XentOptions {
                z_loss: 0.1,
                ..XentOptions::default()
            },
            None,
            Some(&mut g),
        )
        .unwrap();
        assert!(l.is_nan());
        assert_eq!(g, [0.0; 4]);
        let opts = XentOptions {
            reduction: LossReduction::Sum,
            ..XentOptions::default()
        };
        assert_eq!(
            cross_entropy(
                &x,
                Batch::rows(2, 2),
                Targets::Indices(&t),
                &opts,
                None,
                None
            )
            .unwrap(),
            0.0
        );
    }

    #[test]
    fn non_finite_logits_follow_ieee() {
        let inf = f64::INFINITY;
        let opts = XentOptions {
            reduction: LossReduction::None,
            ..XentOptions::default()
        };
        let x = [inf, 1.0, 0.0, inf, f64::NAN, 0.0, -inf, -inf];
        let batch = Batch::rows(4, 2);
        let mut per = [0.0; 4];
        let mut g = [0.0; 8];
        cross_entropy(
            &x,
            batch,
            Targets::Indices(&[1, 1, 1, 0]),
            &opts,
            Some(&mut per),
            Some(&mut g),
        )
        .unwrap();
        assert_eq!(per[0], inf); // lse = +inf, target finite
        assert!(per[1].is_nan()); // lse = +inf, target +inf
        assert!(per[2].is_nan()); // NaN logit
        assert!(per[3].is_nan()); // all -inf: -inf - -inf
        assert!(g[..2].iter().all(|v| v.is_nan()));
        // A -inf off the target is fine: p = 0 there.
        let x = [0.0f64, -inf];
        let l = cross_entropy(
            &x,
            Batch::rows(1, 2),
            Targets::Indices(&[0]),
            &XentOptions::default(),
            None,
            Some(&mut g[..2]),
        )
        .unwrap();
        assert_eq!((l, g[0], g[1]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn nll_loss_matches_reference() {
        let mut rng = Rng::new(2);
        for &(outer, n, inner) in &[(6, 5, 1), (2, 4, 3)] {
            let batch = Batch::contiguous(outer, n, inner);
            let x: Vec<f64> = (0..batch.elements())
                .map(|_| rng.uniform(-5.0, 0.0))
                .collect();
            let w: Vec<f64> = (0..n).map(|k| 0.5 + k as f64).collect();
            let mut t: Vec<i64> = (0..batch.count())
                .map(|_| (rng.next_u64() % n as u64) as i64)
                .collect();
            t[1] = -100;
            let (mut num, mut den) = (0.0, 0.0);
            let mut want_per = vec![0.0; batch.count()];
            for l in 0..batch.count() {
                if t[l] == -100 {
                    continue;
                }
                let (o, j) = (l / inner, l % inner);
                let tl = t[l] as usize;
                want_per[l] = -w[tl] * x[(o * n + tl) * inner + j];
                num += want_per[l];
                den += w[tl];
            }
            let mean = nll_loss(&x, batch, &t, Some(&w), -100, LossReduction::Mean, None).unwrap();
            assert!(close(mean, num / den, 1e-14));
            let mut per = vec![0.0; batch.count()];
            nll_loss(
                &x,
                batch,
                &t,
                Some(&w),
                -100,
                LossReduction::None,
                Some(&mut per),
            )
            .unwrap();
            assert_eq!(per, want_per);
            let err =
                nll_loss(&x, batch, &[0; 3], None, -100, LossReduction::Sum, None).unwrap_err();
            assert!(matches!(err, LossError::Invalid(_)));
        }
    }

    #[test]
    fn backward_vjps_on_long_rows() {
        let mut rng = Rng::new(21);
        let n = 2 * LONG_ROW_BLOCK + 3;
        let batch = Batch::rows(1, n);
        let y: Vec<f64> = (0..n).map(|_| rng.uniform(0.0, 2.0 / n as f64)).collect();
        let dy: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dot: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let sdy: f64 = dy.iter().sum();
        let mut out = vec![0.0; n];
        softmax_backward(&y, &dy, batch, &mut out).unwrap();
        for k in [0, 1, LONG_ROW_BLOCK, n - 1] {
            assert!(close(out[k], y[k] * (dy[k] - dot), 1e-12));
        }
        log_softmax_backward(&y, &dy, batch, &mut out).unwrap();
        for k in [0, 1, LONG_ROW_BLOCK, n - 1] {
            assert!(close(out[k], dy[k] - y[k].exp() * sdy, 1e-12));
        }
    }

    #[test]
    fn backward_vjps_match_the_jacobian() {
        let mut rng = Rng::new(8);
        for &(outer, n, inner) in &[(3, 6, 1), (2, 5, 4), (1, 3, 200)] {
            let batch = Batch::contiguous(outer, n, inner);
            let x: Vec<f64> = (0..batch.elements())
                .map(|_| rng.uniform(-3.0, 3.0))
                .collect();
            let dy: Vec<f64> = (0..batch.elements())
                .map(|_| rng.uniform(-1.0, 1.0))
                .collect();
            let mut sm = vec![0.0; x.len()];
            let mut lsm = vec![0.0; x.len()];
            crate::kernels::softmax_like(
                &x,
                batch,
                Algorithm::Auto,
                crate::kernels::Reduction::Softmax,
                &mut sm,
            )
            .unwrap();
            crate::kernels::softmax_like(
                &x,
                batch,
                Algorithm::Auto,
                crate::kernels::Reduction::LogSoftmax,
                &mut lsm,
            )
            .unwrap();
            let mut dx = vec![0.0; x.len()];
            let mut dxl = vec![0.0; x.len()];
            softmax_backward(&sm, &dy, batch, &mut dx).unwrap();
            log_softmax_backward(&lsm, &dy, batch, &mut dxl).unwrap();
            for o in 0..outer {
                for j in 0..inner {
                    let idx = |k: usize| (o * n + k) * inner + j;
                    for i in 0..n {
                        // J_softmax[k][i] = s_k (d_ki - s_i); J_log_softmax[k][i] = d_ki - s_i.
                        let (mut want, mut want_l) = (0.0, 0.0);
                        for k in 0..n {
                            let d = if k == i { 1.0 } else { 0.0 };
                            want += dy[idx(k)] * sm[idx(k)] * (d - sm[idx(i)]);
                            want_l += dy[idx(k)] * (d - sm[idx(i)]);
                        }
                        assert!(close(dx[idx(i)], want, 1e-13), "{} {want}", dx[idx(i)]);
                        assert!(
                            close(dxl[idx(i)], want_l, 1e-13),
                            "{} {want_l}",
                            dxl[idx(i)]
                        );
                    }
                }
            }
        }
    }
}
