//! The PyO3 binding layer (cargo feature `python`): the only code that knows about Python.
//!
//! Each submodule borrows NumPy buffers (zero copy), validates them, releases the GIL with
//! `py.detach`, calls a kernel from [`crate::kernels`] and returns. Kernel errors (`String`s, or the
//! crate's typed [`Error`](crate::Error) through `errors`) become Python exceptions; nothing
//! panics across the boundary.

use pyo3::prelude::*;

mod blocks;
mod complex;
#[cfg(all(feature = "cuda", target_os = "linux"))]
mod cuda;
mod env;
mod errors;
mod losses;
mod plan;
mod probe;
mod reductions;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    reductions::register(m)?;
    complex::register(m)?;
    losses::register(m)?;
    blocks::register(m)?;
    plan::register(m)?;
    probe::register(m)?;
    env::register(m)?;
    #[cfg(all(feature = "cuda", target_os = "linux"))]
    cuda::register(m)?;
    Ok(())
}
