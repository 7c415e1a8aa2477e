//! torch's `nll_loss`: the target entries of log-probabilities, weighted and reduced.

use super::mask::ClassMask;
use super::spec::{
    lane_target, plan, reduce_pieces, LaneTarget, LossReduction, Targets, XentOptions,
};
use crate::error::Error;
use crate::half::Stored;
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;

/// torch's `nll_loss` of `log_probs` (laid out by `batch`) against index targets: the lane loss
/// is `-w_t * log_probs[t]`, 0 for ignored lanes; "mean" divides by the sum of `w_t` over
/// non-ignored lanes (NaN when there are none). Same contract as
/// [`cross_entropy`](super::cross_entropy); only the target elements are read.
///
/// With `mask` (`where=`), a lane that keeps no class is skipped like an ignored one, and a
/// target on a masked class of any other lane is [`Error::MaskedTarget`]; log-probabilities
/// are taken as given (no renormalisation over the kept classes).
///
/// `log_probs` and the "none" losses are stored as `S` and computed in `S::Compute` (float16 /
/// bfloat16 in float32): each target element is widened as it is read and each lane loss
/// rounded to `S` from its `S::Compute` value, as on a widened copy; the returned loss is in
/// `S::Compute`.
#[allow(clippy::too_many_arguments)]
pub fn nll_loss<S: Stored>(
    log_probs: &[S],
    batch: Batch,
    targets: &[i64],
    weight: Option<&[S::Compute]>,
    ignore_index: i64,
    reduction: LossReduction,
    per_lane: Option<&mut [S]>,
    mask: Option<ClassMask<'_>>,
) -> Result<S::Compute, Error> {
    let opts = XentOptions {
        weight,
        ignore_index,
        reduction,
        mask,
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
        false,
    )?;
    let lanes_out = per_lane.map(|p| SendPtr(p.as_mut_ptr()));
    let per = parallel::items_per_piece(1);
    let (main, _) = reduce_pieces(batch.count(), per, 1, |range| {
        let mut acc = 0.0f64;
        for l in range {
            let kept = |t: usize| {
                mask.is_none_or(|m| {
                    let (base, stride) = m.lane(&batch, l);
                    m.any_kept(base, stride, batch.n) && m.keeps(base, stride, t)
                })
            };
            let v = match lane_target(&targets, l, plan.ignore_index, batch.n) {
                LaneTarget::Class(t) if kept(t) => {
                    let (o, j) = (l / batch.inner, l % batch.inner);
                    let at = &log_probs[o * batch.outer_stride + t * batch.inner + j];
                    let mut x = [<S::Compute as Real>::from_f64(0.0)];
                    // SAFETY: one element of `log_probs`.
                    unsafe { S::widen_run((at as *const S).cast(), 0, &mut x) };
                    -(plan.w(t) * x[0].to_f64())
                }
                _ => 0.0,
            };
            if let Some(op) = lanes_out {
                let v = [<S::Compute as Real>::from_f64(v)];
                // SAFETY: lane l owns per_lane[l]; the length was checked by `plan`.
                unsafe { S::narrow_run(&v, op.ptr().add(l).cast(), 0) };
            }
            acc += v;
        }
        Ok((acc, 0.0))
    })?;
    Ok(<S::Compute as Real>::from_f64(main / plan.d1))
}
