//! The PyO3 binding layer (cargo feature `python`): the only code that knows about Python.
//!
//! Each submodule reads NumPy buffers through their raw fields (zero copy, no borrow flags:
//! [`array`]), asks the planner how the kernels see them, validates, releases the GIL with
//! `py.detach`, runs the kernels ([`exec`] for any layout) and returns. Allocation failures
//! are `MemoryError`; kernel errors (`String`s, or the crate's typed [`Error`](crate::Error)
//! through `errors`) become Python exceptions; nothing panics across the boundary.

use pyo3::prelude::*;

mod array;
mod blocks;
mod complex;
#[cfg(all(feature = "cuda", target_os = "linux"))]
mod cuda;
mod env;
mod errors;
mod exec;
mod half;
mod losses;
mod plan;
mod probe;
mod reductions;
mod segments;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    initialise_lazy_state(m.py())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    reductions::register(m)?;
    half::register(m)?;
    complex::register(m)?;
    losses::register(m)?;
    blocks::register(m)?;
    plan::register(m)?;
    probe::register(m)?;
    segments::register(m)?;
    env::register(m)?;
    #[cfg(all(feature = "cuda", target_os = "linux"))]
    cuda::register(m)?;
    Ok(())
}

/// Fills every lazily initialised global now, at import, under the GIL and before any thread of
/// the user's can be inside a call: a cell that another thread is initialising when the process
/// forks stays "being initialised" forever in the child, and the child's first call would wait
/// on it. (NumPy's C API table, the SIMD level and the default thread count are such cells.)
fn initialise_lazy_state(py: Python<'_>) -> PyResult<()> {
    // Creating an array loads NumPy's C API table into its cell.
    let _ = numpy::PyArray1::<f64>::zeros(py, 0, false);
    let _ = crate::simd::level();
    let _ = crate::simd::available_levels();
    let _ = crate::half::conversion();
    let _ = crate::parallel::thread_env_problem();
    Ok(())
}
