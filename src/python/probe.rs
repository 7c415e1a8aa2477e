//! Bindings for the bandwidth probe ([`crate::probe`]), used by `python -m stablelse bench`.

use pyo3::exceptions::PyMemoryError;
use pyo3::prelude::*;

use crate::probe;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BandwidthProbe>()?;
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(read_write_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(last_level_cache_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(dram_probe_bytes, m)?)?;
    Ok(())
}

fn no_memory(bytes: usize) -> PyErr {
    PyMemoryError::new_err(format!("cannot allocate the probe's {bytes} bytes"))
}

/// The probe's buffers, allocated once (footprint `bytes`, default: several times the
/// last-level cache); `read(reps)` and `read_write(reps)` return GB/s (GIL released).
#[pyclass(module = "stablelse._core")]
struct BandwidthProbe {
    inner: probe::Probe,
}

#[pymethods]
impl BandwidthProbe {
    #[new]
    #[pyo3(signature = (bytes = None))]
    fn new(py: Python<'_>, bytes: Option<usize>) -> PyResult<Self> {
        let bytes = bytes.unwrap_or_else(probe::dram_probe_bytes);
        let inner = py
            .detach(|| probe::Probe::new(bytes))
            .map_err(|_| no_memory(bytes))?;
        Ok(Self { inner })
    }

    /// The footprint in bytes that each measurement streams through.
    #[getter]
    fn bytes(&self) -> usize {
        self.inner.bytes()
    }

    /// Read bandwidth in GB/s of a parallel sum over the footprint, best of `reps`.
    #[pyo3(signature = (reps = 5))]
    fn read(&self, py: Python<'_>, reps: usize) -> f64 {
        let inner = &self.inner;
        py.detach(|| inner.read(reps))
    }

    /// Read + write bandwidth in GB/s of a parallel copy of half the footprint into a second
    /// buffer, counting the bytes read plus the bytes written, best of `reps`.
    #[pyo3(signature = (reps = 5))]
    fn read_write(&mut self, py: Python<'_>, reps: usize) -> f64 {
        let inner = &mut self.inner;
        py.detach(|| inner.read_write(reps))
    }
}

/// Read bandwidth in GB/s over fresh buffers of `bytes` (default: the DRAM probe size), best
/// of `reps` (GIL released).
#[pyfunction]
#[pyo3(signature = (bytes = None, reps = 5))]
fn read_bandwidth(py: Python<'_>, bytes: Option<usize>, reps: usize) -> PyResult<f64> {
    let bytes = bytes.unwrap_or_else(probe::dram_probe_bytes);
    py.detach(|| probe::read_bandwidth(bytes, reps))
        .map_err(|_| no_memory(bytes))
}

/// Read + write bandwidth in GB/s over fresh buffers with a footprint of `bytes` (default:
/// the DRAM probe size), best of `reps` (GIL released).
#[pyfunction]
#[pyo3(signature = (bytes = None, reps = 5))]
fn read_write_bandwidth(py: Python<'_>, bytes: Option<usize>, reps: usize) -> PyResult<f64> {
    let bytes = bytes.unwrap_or_else(probe::dram_probe_bytes);
    py.detach(|| probe::read_write_bandwidth(bytes, reps))
        .map_err(|_| no_memory(bytes))
}

/// The last-level cache in bytes as the operating system reports it, or None.
#[pyfunction]
fn last_level_cache_bytes() -> Option<usize> {
    probe::last_level_cache_bytes()
}

/// The DRAM probe's footprint: several times the last-level cache, at least 256 MiB.
#[pyfunction]
fn dram_probe_bytes() -> usize {
    probe::dram_probe_bytes()
}
