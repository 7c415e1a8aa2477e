//! The PyO3 binding layer (cargo feature `python`): the only code that knows about Python.
//!
//! Each submodule borrows NumPy buffers (zero copy), validates them, releases the GIL with
//! `py.detach`, calls a kernel from [`crate::kernels`] and returns. Kernel errors are `String`s
//! turned into `ValueError`; nothing panics across the boundary.

use pyo3::prelude::*;

mod array;
#[cfg(feature = "cuda")]
mod cuda;
mod exec;
mod losses;
mod plan;
mod probe;
mod reductions;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    reductions::register(m)?;
    losses::register(m)?;
    plan::register(m)?;
    probe::register(m)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    Ok(())
}
