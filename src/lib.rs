//! stablelse: numerically stable log-sum-exp, softmax, log-softmax and cross-entropy kernels.
//!
//! The kernels are plain Rust over slices; nothing outside `python` (cargo feature `python`)
//! knows about Python. Every kernel takes its input as a [`Batch`](layout::Batch) view (outer
//! rows x reduced length x inner columns) and writes into caller-owned output slices, so the
//! same code serves `cargo test`, `cargo bench` and the PyO3 layer.
//!
//! Layout of the crate:
//! - [`real`]: the `Real` trait over `f32`/`f64` (float32 accumulates in float64).
//! - [`state`]: the `(max, excess)` log-sum-exp state and its merge rule; the one merge used
//!   by SIMD lanes, row blocks, threads, streaming chunks and Dask blocks.
//! - [`layout`]: how an (outer, n, inner) reduction is described over a slice.
//! - [`kernels`]: the scalar reference kernels and the dispatching entry points.
//! - [`parallel`]: the rayon pool and deterministic work splitting.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod kernels;
pub mod layout;
pub mod parallel;
pub mod plan;
pub mod probe;
pub mod real;
pub mod simd;
pub mod state;

#[cfg(feature = "python")]
mod python;

pub use kernels::{Algorithm, Reduction};
pub use layout::Batch;
pub use real::Real;
pub use state::LseState;
