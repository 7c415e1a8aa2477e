//! The loss specification: torch's options, the targets, and the plan that validates them all
//! before any logit is read or output written.

use std::ops::Range;

use super::mask::{defers_masked_checks, masked_denominators, ClassMask};
use crate::error::Error;
use crate::kernels::Algorithm;
use crate::layout::Batch;
use crate::parallel;
use crate::real::Real;

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

/// Options of [`cross_entropy`](super::cross_entropy) (torch's keyword arguments plus `z_loss`).
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
    /// `where=`: the classes each lane keeps (see [`ClassMask`]); `None` keeps every class.
    pub mask: Option<ClassMask<'a>>,
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
            mask: None,
        }
    }
}

/// What a lane's target is, after validation.
#[derive(Clone, Copy)]
pub(super) enum LaneTarget {
    Ignored,
    Class(usize),
    Probs,
}

/// Everything about a call that does not depend on the logits.
#[derive(Clone, Copy)]
pub(super) struct Plan<'a, T> {
    pub(super) batch: Batch,
    pub(super) ignore_index: i64,
    pub(super) weight: Option<&'a [T]>,
    pub(super) label_smoothing: f64,
    /// `a = 1 - label_smoothing`, `b = label_smoothing / n`.
    pub(super) a: f64,
    pub(super) b: f64,
    /// `W = sum_k w_k`.
    pub(super) w_total: f64,
    /// Reduction scales of the main term and of the z term: `1 / D` and `1 / K` for "mean"
    /// (the gradient's factors), else 1.
    pub(super) s1: f64,
    pub(super) s2: f64,
    /// The mean's denominators `D` and `K` themselves, which the reduced loss divides by
    /// (1 for "sum" and "none"): `1 / D` overflows for a subnormal `D`.
    pub(super) d1: f64,
    pub(super) d2: f64,
    pub(super) z: f64,
    /// The targets are checked against a `where=` mask, and the mean's scales set, by the
    /// main pass ([`defers_masked_checks`]), not before it.
    pub(super) deferred: bool,
}

impl<T: Real> Plan<'_, T> {
    #[inline]
    pub(super) fn w(&self, k: usize) -> f64 {
        match self.weight {
            Some(w) => w[k].to_f64(),
            None => 1.0,
        }
    }
}

/// Checks everything that does not need the logits and returns the plan: shapes, options,
/// every target (first bad one reported), and the reduction scales. With `may_defer`, a
/// masked call whose main pass can check the targets itself ([`defers_masked_checks`])
/// returns a `deferred` plan instead.
pub(super) fn plan<'a, T: Real>(
    logits_len: usize,
    batch: Batch,
    targets: &Targets<'_, T>,
    opts: &XentOptions<'a, T>,
    per_lane_len: Option<usize>,
    grad_len: Option<usize>,
    may_defer: bool,
) -> Result<Plan<'a, T>, Error> {
    batch.check(logits_len).map_err(Error::Layout)?;
    let n = batch.n;
    let ls = opts.label_smoothing;
    if !(0.0..=1.0).contains(&ls) {
        return Err(Error::InvalidOption {
            name: "label_smoothing",
            domain: "in [0, 1]",
            value: ls,
        });
    }
    if !(opts.z_loss.is_finite() && opts.z_loss >= 0.0) {
        return Err(Error::InvalidOption {
            name: "z_loss",
            domain: "finite and >= 0",
            value: opts.z_loss,
        });
    }
    let lengths = [
        ("weight", opts.weight.map(|w| w.len()), n),
        ("gradient", grad_len, batch.elements()),
    ];
    for (what, got, expected) in lengths {
        match got {
            Some(got) if got != expected => {
                return Err(Error::ShapeMismatch {
                    what,
                    expected,
                    got,
                })
            }
            _ => {}
        }
    }
    match (opts.reduction, per_lane_len) {
        (LossReduction::None, Some(len)) if len == batch.count() => {}
        (LossReduction::None, got) => {
            return Err(Error::ShapeMismatch {
                what: "per-lane output",
                expected: batch.count(),
                got: got.unwrap_or(0),
            })
        }
        (_, None) => {}
        (_, Some(_)) => {
            return Err(Error::Unsupported(
                "a per-lane output is only written for reduction 'none'",
            ))
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
    let plan = Plan {
        batch,
        ignore_index: opts.ignore_index,
        weight: opts.weight,
        label_smoothing: ls,
        a: 1.0 - ls,
        b: if n > 0 { ls / n as f64 } else { 0.0 },
        w_total,
        s1: 1.0,
        s2: 1.0,
        d1: 1.0,
        d2: 1.0,
        z: opts.z_loss,
        deferred: false,
    };
    if let Some(mask) = &opts.mask {
        mask.check(&batch)?;
    }
    let (denominator, kept) = match targets {
        Targets::Indices(t) => {
            if t.len() != batch.count() {
                return Err(Error::ShapeMismatch {
                    what: "targets",
                    expected: batch.count(),
                    got: t.len(),
                });
            }
            if let Some(mask) = &opts.mask {
                let outputs = (per_lane_len, grad_len);
                if may_defer && defers_masked_checks(&plan, targets, mask, outputs) {
                    return Ok(Plan {
                        deferred: true,
                        ..plan
                    });
                }
                return finish(
                    plan,
                    opts.reduction,
                    masked_denominators(&plan, targets, mask)?,
                );
            }
            let (ignore, classes) = (opts.ignore_index, n as u64);
            // A target is kept unless ignored; a kept one must name a class.
            let kept_at = |v: i64| v != ignore;
            let bad_at = |v: i64| kept_at(v) && !crate::simd::names_class(v, ignore, classes);
            // One vector scan counts; the first bad target is looked for only when there is
            // one.
            let (kept, bad) = crate::simd::count_targets(crate::simd::level(), t, ignore, classes);
            if let Some(position) = bad.then(|| t.iter().position(|&v| bad_at(v))).flatten() {
                return Err(Error::TargetOutOfRange {
                    position,
                    value: t[position],
                    classes: n,
                });
            }
            // Without weights the denominator is the count; with them, the kept targets'
            // weights summed in lane order.
            let d = match opts.weight {
                None => kept as f64,
                Some(_) => t
                    .iter()
                    .filter(|&&v| kept_at(v))
                    .fold(0.0, |d, &v| d + plan.w(v as usize)),
            };
            (d, kept as f64)
        }
        Targets::Probs(q) => {
            if opts.ignore_index >= 0 {
                return Err(Error::Unsupported(
                    "ignore_index is not supported for class-probability targets",
                ));
            }
            batch.check(q.len()).map_err(Error::Layout)?;
            if let Some(mask) = &opts.mask {
                return finish(
                    plan,
                    opts.reduction,
                    masked_denominators(&plan, targets, mask)?,
                );
            }
            let lanes = batch.count() as f64;
            (lanes, lanes)
        }
    };
    finish(plan, opts.reduction, (denominator, kept))
}

/// The plan with the reduction scales of `(D, K)`: `1 / D` and `1 / K` for "mean".
pub(super) fn finish<T>(
    mut plan: Plan<'_, T>,
    reduction: LossReduction,
    (denominator, kept): (f64, f64),
) -> Result<Plan<'_, T>, Error> {
    if reduction == LossReduction::Mean {
        (plan.s1, plan.s2) = (1.0 / denominator, 1.0 / kept);
        (plan.d1, plan.d2) = (denominator, kept);
    }
    Ok(plan)
}

/// The reduced loss from the lanes' summed `(main, lse^2)` terms: each divided by its
/// denominator (torch divides too; a subnormal `D` has no finite `1 / D`).
pub(super) fn reduced<T>(plan: &Plan<'_, T>, main: f64, zsum: f64) -> f64 {
    let mut total = main / plan.d1;
    if plan.z > 0.0 {
        total += plan.z * zsum / plan.d2;
    }
    total
}

/// For a gradient (`grad`) under "mean" whose weight sum `D` is subnormal (its `1 / D`, the
/// gradient's factor, overflows): the weights times 2^64, exactly, with which the mean and
/// its gradient are the same (a ratio of weights) and `1 / D` finite. `None` otherwise.
pub(super) fn rescaled_weights<T: Real>(
    plan: &Plan<'_, T>,
    grad: bool,
) -> Result<Option<Vec<T>>, Error> {
    let Some(w) = plan.weight.filter(|_| grad) else {
        return Ok(None);
    };
    if plan.s1.is_finite() || plan.d1 == 0.0 || !plan.d1.is_finite() {
        return Ok(None);
    }
    let mut out = crate::error::try_vec(w.len(), T::from_f64(0.0))?;
    for (o, v) in out.iter_mut().zip(w) {
        *o = T::from_f64(v.to_f64() * 2f64.powi(64));
    }
    Ok(Some(out))
}

/// The target of lane `l` of `n` classes. `plan` validated every target, but the caller's
/// buffer may be changed by another thread since: a value now out of range is read as ignored,
/// so a racing writer can change the result (as with any racing NumPy call) but never make the
/// kernel index outside a row.
#[inline]
pub(super) fn lane_target<T>(
    targets: &Targets<'_, T>,
    l: usize,
    ignore_index: i64,
    n: usize,
) -> LaneTarget {
    match targets {
        Targets::Indices(t) => {
            let v = t[l];
            if crate::simd::names_class(v, ignore_index, n as u64) {
                LaneTarget::Class(crate::simd::bounded_class(v, n as u64) as usize)
            } else {
                LaneTarget::Ignored
            }
        }
        Targets::Probs(_) => LaneTarget::Probs,
    }
}

/// The class (`ignored` when the lane has none, as [`lane_target`] reads it) and weight (0
/// when ignored) of lanes `l0..l0 + class.len()` of index targets, in branch-free loops;
/// `false` for probability targets or lanes past the targets (nothing written).
pub(super) fn lane_classes<T: Real>(
    plan: &Plan<'_, T>,
    targets: &Targets<'_, T>,
    l0: usize,
    ignored: u32,
    class: &mut [u32],
    weight: &mut [f64],
) -> bool {
    let Targets::Indices(t) = targets else {
        return false;
    };
    let Some(t) = t.get(l0..l0 + class.len()) else {
        return false;
    };
    let (ignore, n) = (plan.ignore_index, plan.batch.n as u64);
    match plan.weight {
        None => {
            let level = crate::simd::level();
            crate::simd::unweighted_classes(level, t, ignore, n, ignored, class, weight);
        }
        Some(weights) => {
            for ((c, w), &v) in class.iter_mut().zip(weight.iter_mut()).zip(t) {
                let kept = crate::simd::names_class(v, ignore, n);
                let class = crate::simd::bounded_class(v, n);
                *c = if kept { class as u32 } else { ignored };
                *w = match weights.get(class as usize) {
                    Some(wv) if kept => wv.to_f64(),
                    _ => 0.0,
                };
            }
        }
    }
    true
}

/// Sums `(main, lse^2)` of every lane in fixed pieces of `per` units, merged in piece order;
/// the first piece's error (a failed scratch allocation), if any, in piece order.
pub(super) fn reduce_pieces<F>(
    units: usize,
    per: usize,
    unit_elements: usize,
    f: F,
) -> Result<(f64, f64), Error>
where
    F: Fn(Range<usize>) -> Result<(f64, f64), Error> + Sync + Send,
{
    reduce_piece_groups(units, per, 1, unit_elements, |range| {
        f(range).map(|sums| [sums])
    })
}

/// As [`reduce_pieces`], handing `group` consecutive pieces to one call of `f`, which returns
/// each piece's sums in piece order: the same sums merged in the same order as one call per
/// piece, for callers whose consecutive pieces share work (a window of a transposed mask).
pub(super) fn reduce_piece_groups<F, P>(
    units: usize,
    per: usize,
    group: usize,
    unit_elements: usize,
    f: F,
) -> Result<(f64, f64), Error>
where
    F: Fn(Range<usize>) -> Result<P, Error> + Sync + Send,
    P: IntoIterator<Item = (f64, f64)> + Send,
{
    let span = per.max(1) * group.max(1);
    let groups = units.div_ceil(span);
    let partials = parallel::map_collect(groups, span * unit_elements.max(1), |g| {
        f(g * span..((g + 1) * span).min(units))
    });
    let mut acc = (0.0, 0.0);
    for sums in partials {
        for (m, z) in sums? {
            acc = (acc.0 + m, acc.1 + z);
        }
    }
    Ok(acc)
}
