//! `where=` for the losses: a boolean mask over the classes, read in place beside the logits.
//!
//! The rule is one sentence: a masked loss equals the loss of each lane with its masked classes
//! deleted. So the normaliser is the log-sum-exp of the kept classes, label smoothing spreads
//! `label_smoothing / C_kept` over the kept classes (and `W` is the kept classes' weight), the
//! z-loss uses the kept log-sum-exp, and the gradient is 0 at masked classes. A lane with no
//! kept class has nothing to predict: it is skipped like an ignored target (no loss, no
//! gradient, not counted by "mean") whatever its target holds. In a lane with kept classes an
//! index target on a masked class, or a probability target with nonzero mass on one, does not
//! exist in the reduced problem and is refused ([`Error::MaskedTarget`],
//! [`Error::MaskedProbability`]) by the pre-pass, before any logit is read.

use super::spec::{Plan, Targets};
use crate::error::Error;
use crate::layout::Batch;
use crate::parallel;
use crate::real::Real;

/// A class mask of a [`Batch`]: element `(o, k, j)` (lane `o * inner + j`, class `k`) is kept
/// when `keep[o * strides[0] + k * strides[1] + j * strides[2]] != 0`. Strides may be 0, so a
/// broadcast mask (one row of classes for every lane, or one flag per lane) is read as it is,
/// never expanded. Bytes rather than `bool`: any nonzero byte keeps.
#[derive(Clone, Copy, Debug)]
pub struct ClassMask<'a> {
    /// The mask's elements; `strides` index into it.
    pub keep: &'a [u8],
    /// Element strides along `(outer, classes, inner)`.
    pub strides: [usize; 3],
}

impl ClassMask<'_> {
    /// Whether the mask keeps or masks each lane whole (one flag per lane, the same for all
    /// its classes): such a loss against class indices is the unmasked one with the masked
    /// lanes' targets ignored.
    pub(super) fn flags_lanes(&self) -> bool {
        self.strides[1] == 0
    }

    /// Checks that every element of `batch` indexes inside `keep`.
    pub(super) fn check(&self, batch: &Batch) -> Result<(), Error> {
        if batch.elements() == 0 {
            return Ok(());
        }
        let [s0, s1, s2] = self.strides;
        let last = [(batch.outer, s0), (batch.n, s1), (batch.inner, s2)]
            .iter()
            .try_fold(0usize, |acc, &(len, s)| {
                (len - 1).checked_mul(s).and_then(|v| acc.checked_add(v))
            });
        match last {
            Some(last) if last < self.keep.len() => Ok(()),
            _ => Err(Error::Layout(format!(
                "where holds {} elements, too few for strides {:?} over {:?}",
                self.keep.len(),
                self.strides,
                [batch.outer, batch.n, batch.inner]
            ))),
        }
    }

    /// The offset of class 0 of lane `l` and the stride between classes.
    #[inline]
    pub(super) fn lane(&self, batch: &Batch, l: usize) -> (usize, usize) {
        if batch.inner == 1 {
            // Rows: no division per lane.
            return (l * self.strides[0], self.strides[1]);
        }
        let (o, j) = (l / batch.inner, l % batch.inner);
        (o * self.strides[0] + j * self.strides[2], self.strides[1])
    }

    /// For a mask with one flag per lane ([`ClassMask::flags_lanes`]): `f(l0, flags)` for
    /// consecutive runs of `lanes` in order, `flags` the bytes of lanes `l0..` (a slice where
    /// the flags are contiguous, else a copy of up to 256 of them), so that a loop over a run
    /// vectorises.
    pub(super) fn flag_runs(
        &self,
        batch: &Batch,
        lanes: std::ops::Range<usize>,
        mut f: impl FnMut(usize, &[u8]),
    ) {
        let [s0, _, s2] = self.strides;
        let inner = batch.inner.max(1);
        let mut copy = [0u8; 256];
        let mut l = lanes.start;
        while l < lanes.end {
            // Lanes within one slab are `s2` apart (rows, `inner == 1`: `s0` apart).
            let (base, step, len) = match batch.inner {
                1 => (l * s0, s0, lanes.end - l),
                _ => {
                    let (o, j) = (l / inner, l % inner);
                    (o * s0 + j * s2, s2, (inner - j).min(lanes.end - l))
                }
            };
            let len = if step == 1 {
                f(l, &self.keep[base..base + len]);
                len
            } else {
                let len = len.min(copy.len());
                for (i, c) in copy[..len].iter_mut().enumerate() {
                    *c = self.keep[base + i * step];
                }
                f(l, &copy[..len]);
                len
            };
            l += len;
        }
    }

    /// Whether class `k` of the lane at `base` is kept.
    #[inline]
    pub(super) fn keeps(&self, base: usize, stride: usize, k: usize) -> bool {
        self.keep[base + k * stride] != 0
    }

    /// Whether the lane at `base` keeps any of its `n` classes.
    #[inline]
    pub(super) fn any_kept(&self, base: usize, stride: usize, n: usize) -> bool {
        match stride {
            _ if n == 0 => false,
            0 => self.keep[base] != 0,
            1 => self.keep[base..base + n].iter().any(|&b| b != 0),
            _ => (0..n).any(|k| self.keep[base + k * stride] != 0),
        }
    }
}

/// The pre-pass of a masked call: validates the targets against the mask (first bad lane in
/// lane order) and returns `(D, K)`, the "mean" denominators (the weight of the kept index
/// targets, or the lane count for probabilities; and the count of lanes that take part).
/// Out-of-range targets were not yet checked: this does it, in the same lane order.
pub(super) fn masked_denominators<T: Real>(
    plan: &Plan<'_, T>,
    targets: &Targets<'_, T>,
    mask: &ClassMask<'_>,
) -> Result<(f64, f64), Error> {
    let batch = plan.batch;
    let (n, lanes) = (batch.n, batch.count());
    let per = parallel::items_per_piece(n);
    let pieces = lanes.div_ceil(per.max(1));
    let [s0, stride, s2] = mask.strides;
    let inner = batch.inner.max(1);
    let partials = parallel::map_collect(pieces, per * n.max(1), |p| {
        let lanes = p * per..((p + 1) * per).min(lanes);
        let q = match targets {
            Targets::Indices(t) => return index_lanes(plan, t, mask, lanes, (0.0, 0)),
            Targets::Probs(q) => q,
        };
        let (mut d, mut kept) = (0.0f64, 0usize);
        // Lane l = o * inner + j, stepped without a division a lane.
        let (mut o, mut j) = (lanes.start / inner, lanes.start % inner);
        for l in lanes {
            let (lo, lj) = (o, j);
            j += 1;
            if j == inner {
                (o, j) = (o + 1, 0);
            }
            let base = lo * s0 + lj * s2;
            if !mask.any_kept(base, stride, n) {
                continue;
            }
            let qbase = lo * batch.outer_stride + lj;
            for k in 0..n {
                let v = q[qbase + k * batch.inner].to_f64();
                if v != 0.0 && !mask.keeps(base, stride, k) {
                    return Err(Error::MaskedProbability {
                        position: l,
                        class: k,
                        value: v,
                    });
                }
            }
            d += 1.0;
            kept += 1;
        }
        Ok((d, kept))
    });
    partials
        .into_iter()
        .try_fold((0.0, 0.0), |acc, piece: Result<(f64, usize), Error>| {
            let (d, k) = piece?;
            Ok((acc.0 + d, acc.1 + k as f64))
        })
}

/// The index targets of `lanes` checked against the mask ([`index_lane`], in lane order: the
/// first refusal is the error) and the "mean" sums `(D, K)` of those that count, added to
/// `counted` one lane at a time. One flag per lane without weights is counted in a
/// branch-free loop (each weight is 1: the float sum is the count, exactly), unless a target
/// is out of range (then the lane-by-lane checks name it).
pub(super) fn index_lanes<T: Real>(
    plan: &Plan<'_, T>,
    t: &[i64],
    mask: &ClassMask<'_>,
    lanes: std::ops::Range<usize>,
    counted: (f64, usize),
) -> Result<(f64, usize), Error> {
    let [s0, _, s2] = mask.strides;
    let inner = plan.batch.inner.max(1);
    let (ignore, classes) = (plan.ignore_index, plan.batch.n as u64);
    if mask.flags_lanes() && plan.weight.is_none() {
        let (mut bad, mut kept) = (false, 0);
        mask.flag_runs(&plan.batch, lanes.clone(), |l0, flags| {
            for (&v, &flag) in t[l0..l0 + flags.len()].iter().zip(flags) {
                let named = v != ignore;
                bad |= named & !crate::simd::names_class(v, ignore, classes);
                kept += usize::from(named & (flag != 0));
            }
        });
        if !bad {
            return Ok((counted.0 + kept as f64, counted.1 + kept));
        }
    }
    let (mut d, mut k) = counted;
    // Lane l = o * inner + j, stepped without a division a lane.
    let (mut o, mut j) = (lanes.start / inner, lanes.start % inner);
    for l in lanes {
        let base = o * s0 + j * s2;
        j += 1;
        if j == inner {
            (o, j) = (o + 1, 0);
        }
        if let Some(w) = index_lane_at(plan, t, mask, l, base)? {
            d += w;
            k += 1;
        }
    }
    Ok((d, k))
}

/// Lane `l`'s index target checked against the mask: `Some(w_t)` for a lane that counts in
/// "mean", `None` for one that is skipped (ignored, or keeping no class); an out-of-range
/// target, or one the mask hides in a lane that keeps some class, is refused.
#[inline(always)]
pub(super) fn index_lane<T: Real>(
    plan: &Plan<'_, T>,
    t: &[i64],
    mask: &ClassMask<'_>,
    l: usize,
) -> Result<Option<f64>, Error> {
    index_lane_at(plan, t, mask, l, mask.lane(&plan.batch, l).0)
}

/// [`index_lane`] of lane `l`, whose class 0 lies at `base` of the mask.
#[inline(always)]
fn index_lane_at<T: Real>(
    plan: &Plan<'_, T>,
    t: &[i64],
    mask: &ClassMask<'_>,
    l: usize,
    base: usize,
) -> Result<Option<f64>, Error> {
    let n = plan.batch.n;
    let value = t[l];
    if value == plan.ignore_index {
        return Ok(None);
    }
    if value < 0 || value as u64 >= n as u64 {
        return Err(Error::TargetOutOfRange {
            position: l,
            value,
            classes: n,
        });
    }
    let stride = mask.strides[1];
    // The target's own flag first: a kept target settles the lane in one read.
    if !mask.keeps(base, stride, value as usize) {
        if !mask.any_kept(base, stride, n) {
            return Ok(None);
        }
        return Err(Error::MaskedTarget { position: l, value });
    }
    Ok(Some(plan.w(value as usize)))
}

/// Whether a masked call checks its targets in its main pass rather than in a pre-pass: the
/// fused short-row loss, writing nothing but the reduced loss (no gradient, no per-lane
/// losses), so a refused target still leaves every output unwritten, and the mask is read
/// once, beside the logits (or in the staged block), instead of twice. Over rows, read in
/// place, its "mean" weights are summed in the pre-pass's pieces; columns (a class axis
/// before the last) are blocks of other pieces, so there only without weights (whose sum is
/// the count, in any order) and not for a flag per lane (the unmasked loss on ignored
/// targets, which checks nothing).
pub(super) fn defers_masked_checks<T: Real>(
    plan: &Plan<'_, T>,
    targets: &Targets<'_, T>,
    mask: &ClassMask<'_>,
    (per_lane_len, grad_len): (Option<usize>, Option<usize>),
) -> bool {
    let batch = plan.batch;
    let columns_count = plan.weight.is_none() && !mask.flags_lanes();
    per_lane_len.is_none()
        && grad_len.is_none()
        && (batch.inner == 1 || columns_count)
        && (1..=crate::simd::SHORT_LOSS_ROW).contains(&batch.n)
        && matches!(targets, Targets::Indices(_))
        && plan.label_smoothing == 0.0
}
