//! torch's `nll_loss`: the target entries of log-probabilities, weighted and reduced.

use super::mask::ClassMask;
use super::spec::{
    lane_target, plan, reduce_pieces, LaneTarget, LossReduction, Targets, XentOptions,
};
use crate::error::Error;
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
#[allow(clippy::too_many_arguments)]
pub fn nll_loss<T: Real>(
    log_probs: &[T],
    batch: Batch,
    targets: &[i64],
    weight: Option<&[T]>,
    ignore_index: i64,
    reduction: LossReduction,
    per_lane: Option<&mut [T]>,
    mask: Option<ClassMask<'_>>,
) -> Result<T, Error> {
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
        Ok((acc, 0.0))
    })?;
    Ok(T::from_f64(main * plan.s1))
}
