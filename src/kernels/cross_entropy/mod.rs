//! Cross-entropy and NLL losses with torch's semantics, their gradient fused into the same pass
//! over the logits.
//!
//! Layout: a [`Batch`](crate::layout::Batch) `(outer, n = classes, inner)`. With `inner == 1`
//! each lane is a row (NumPy / optax layout, `axis = -1`); with `inner > 1` the class axis sits
//! in the middle (torch's `(N, C, d1, .., dk)`, lanes `inner` apart). Index targets hold one class per lane in
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
//!
//! `where=` ([`ClassMask`], read in place with its strides): the loss of each lane with its
//! masked classes deleted; a lane that keeps no class is skipped like an ignored one (see
//! [`mask`] for the whole rule).
//!
//! Modules, one concern each: [`spec`] validates the options and targets once and fixes the
//! reduction scales (the plan); [`mask`] is the class mask and its part of that pre-pass;
//! `forward` computes the loss and its fused gradient over rows or columns (`forward/masked.rs`
//! under a mask); `nll` is `nll_loss`. The softmax / log_softmax vector-Jacobian products are not
//! losses and live in [`crate::kernels::vjp`].

mod forward;
pub mod mask;
mod nll;
pub mod spec;
#[cfg(test)]
mod tests;

pub use crate::error::Error;
pub use forward::{cross_entropy, cross_entropy_stored};
pub use mask::ClassMask;
pub use nll::nll_loss;
pub use spec::{LossReduction, Targets, XentOptions};
