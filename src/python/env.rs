//! Environment variables the native code read and could not use, for the Python package to
//! turn into warnings (Rust has no warning channel of its own).

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(env_problems, m)?)?;
    Ok(())
}

/// `(variable, message)` for each `STABLELSE_*` / thread-count variable that is set to a value
/// stablelse ignored (reading them fixes the thread default and the SIMD level).
#[pyfunction]
fn env_problems() -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if let Some(problem) = crate::parallel::thread_env_problem() {
        problems.push(problem);
    }
    if let Some(msg) = crate::simd::env_problem() {
        problems.push(("STABLELSE_SIMD", msg));
    }
    problems
}
