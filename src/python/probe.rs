//! Bindings for the DRAM bandwidth probe ([`crate::probe`]), used by `python -m stablelse bench`.

use pyo3::prelude::*;

use crate::probe;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(read_write_bandwidth, m)?)?;
    Ok(())
}

/// Read bandwidth in GB/s of a parallel sum over `bytes`, best of `reps` (GIL released).
#[pyfunction]
#[pyo3(signature = (bytes = 256 << 20, reps = 5))]
fn read_bandwidth(py: Python<'_>, bytes: usize, reps: usize) -> f64 {
    py.detach(|| probe::read_bandwidth(bytes, reps))
}

/// Read + write bandwidth in GB/s of a parallel copy between two buffers of `bytes` each,
/// counting `2 * bytes` per run, best of `reps` (GIL released).
#[pyfunction]
#[pyo3(signature = (bytes = 256 << 20, reps = 5))]
fn read_write_bandwidth(py: Python<'_>, bytes: usize, reps: usize) -> f64 {
    py.detach(|| probe::read_write_bandwidth(bytes, reps))
}
