//! Numerically stable log-sum-exp, softmax, log-softmax and cross-entropy over slices.
//!
//! A naive `exp(x) / sum(exp(x))` overflows for `x = 1000` and underflows for `x = -1000`.
//! These kernels use the max-shift (log-sum-exp) formulation, accumulate `f32` input in `f64`
//! and round once, pick AVX-512, AVX2+FMA, NEON or scalar code at run time, and split large
//! batches over a rayon pool. Results are bit-identical for any thread count.
//!
//! The same kernels serve the `stablelse` Python package; this crate has no Python in it unless
//! the `python` feature is on.
//!
//! # The shape of a call
//!
//! Every kernel reads a slice laid out as a [`Batch`]: `outer * inner` independent reductions
//! of length `n`, element `(o, k, j)` at `o * outer_stride + k * inner + j`.
//! [`Batch::rows`] is a batch of contiguous rows (reduce the last axis);
//! [`Batch::contiguous`] with `inner > 1` reduces down columns. Outputs are caller-owned
//! slices; a wrong length is an `Err`, never a panic, and nothing is written on error.
//!
//! # Examples
//!
//! log-sum-exp of each row, where the naive formula gives `inf`:
//!
//! ```
//! use stablelse::{kernels, Algorithm, Batch};
//!
//! let x: [f32; 6] = [1000.0, 1.0, -1000.0, 2.0, 1.0, 0.1];
//! let mut lse = [0.0f32; 2];
//! kernels::logsumexp(&x, Batch::rows(2, 3), Algorithm::Auto, &mut lse)?;
//! assert_eq!(lse[0], 1000.0);
//! assert!((lse[1] - 2.417_030_3).abs() < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! softmax and log-softmax of each row (`Reduction` picks which):
//!
//! ```
//! use stablelse::{kernels, Algorithm, Batch, Reduction};
//!
//! let x: [f64; 6] = [1000.0, 1.0, -1000.0, 2.0, 1.0, 0.1];
//! let mut p = [0.0f64; 6];
//! kernels::softmax_like(&x, Batch::rows(2, 3), Algorithm::Auto, Reduction::Softmax, &mut p)?;
//! assert_eq!(p[0], 1.0);
//! assert!((p[3..].iter().sum::<f64>() - 1.0).abs() < 1e-15);
//!
//! let mut logp = [0.0f64; 6];
//! kernels::softmax_like(&x, Batch::rows(2, 3), Algorithm::Auto, Reduction::LogSoftmax, &mut logp)?;
//! assert_eq!(logp[2], -2000.0); // finite, where log(softmax(x)) would be -inf
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Reducing down columns instead (a `(3, 2)` C-order array, reduced over its first axis):
//!
//! ```
//! use stablelse::{kernels, Algorithm, Batch};
//!
//! let x: [f64; 6] = [0.0, 10.0, 0.0, 10.0, 0.0, 10.0];
//! let mut lse = [0.0f64; 2];
//! kernels::logsumexp(&x, Batch::contiguous(1, 3, 2), Algorithm::Auto, &mut lse)?;
//! assert!((lse[0] - 3f64.ln()).abs() < 1e-15);
//! assert!((lse[1] - (10.0 + 3f64.ln())).abs() < 1e-14);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Cross-entropy with torch's semantics (class-index targets, mean reduction), with its
//! gradient written in the same pass:
//!
//! ```
//! use stablelse::kernels::cross_entropy::{cross_entropy, Targets, XentOptions};
//! use stablelse::Batch;
//!
//! let logits: [f32; 6] = [1000.0, 1.0, -1000.0, 2.0, 1.0, 0.1];
//! let target = [0i64, 2];
//! let mut grad = [0.0f32; 6];
//! let loss = cross_entropy(
//!     &logits,
//!     Batch::rows(2, 3),
//!     Targets::Indices(&target),
//!     &XentOptions::default(),
//!     None,
//!     Some(&mut grad),
//! )?;
//! // Row 0 predicts its target with certainty (loss 0); row 1 costs lse - x[2].
//! assert!((loss - (2.417_030_3 - 0.1) / 2.0).abs() < 1e-6);
//! assert!(grad.iter().all(|g| g.is_finite()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Streaming: the `(max, excess)` state of a row merges with another's by one rule, the same
//! that combines SIMD lanes, threads and chunks:
//!
//! ```
//! use stablelse::LseState;
//!
//! let mut a = LseState::default();
//! for v in [1.0, 2.0] {
//!     a.push(v);
//! }
//! let mut b = LseState::default();
//! b.push(3.0);
//! let all = a.merge(b).logsumexp();
//! let exact = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
//! assert!((all - exact).abs() < 1e-15);
//! ```
//!
//! # Threads and SIMD
//!
//! [`parallel::set_num_threads`] sets the pool size; by default it is `STABLELSE_NUM_THREADS`,
//! else `RAYON_NUM_THREADS`, else `OMP_NUM_THREADS`, else the CPUs this process may run on.
//! The SIMD [`Level`] is detected once per process ([`level`]); `STABLELSE_SIMD` may ask for a
//! lower one. The `*_at` kernel variants take a level explicitly.
//!
//! # Modules
//!
//! - [`kernels`]: the entry points (log-sum-exp, softmax, losses and their gradients) and the
//!   scalar reference kernels.
//! - [`layout`]: [`Batch`], how a batch of reductions lies over a slice.
//! - [`plan`]: how a strided n-dimensional array reduced over some axes maps onto [`Batch`]es
//!   (read in place, through a transpose, or gathered).
//! - [`state`]: [`LseState`], the `(max, excess)` state and its merge rule.
//! - [`real`]: [`Real`], the trait over `f32` / `f64`.
//! - [`parallel`]: the thread pool and deterministic work splitting.

// The per-instruction-set code, the bandwidth probe and the CUDA host code are internals:
// reachable for the benches and the Python bindings, not part of the documented API.
#[cfg(all(feature = "cuda", target_os = "linux"))]
#[doc(hidden)]
pub mod cuda;
mod error;
pub mod half;
pub mod kernels;
pub mod layout;
pub mod parallel;
pub mod plan;
#[doc(hidden)]
pub mod probe;
pub mod real;
#[doc(hidden)]
pub mod simd;
pub mod state;

#[cfg(feature = "python")]
mod python;

pub use error::Error;
pub use kernels::{Algorithm, Reduction};
pub use layout::Batch;
pub use real::Real;
pub use simd::{available_levels, level, Level};
pub use state::LseState;
