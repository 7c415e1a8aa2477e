//! The planner ([`crate::plan`]) as Python sees it: `_core.plan(...)` returns a `Plan`.
//!
//! Front doors that need a 3-D view of their own (the losses, weighted logsumexp, complex
//! input; through `python/stablelse/_plan.py`) call this instead of deciding layouts
//! themselves.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::plan::{self, Access, ArrayLayout};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Plan>()?;
    m.add_function(wrap_pyfunction!(plan_layout, m)?)?;
    Ok(())
}

/// How the kernels see an array reduced over some of its axes (see `src/plan.rs`).
///
/// `perm` is the work order of the input's axes (the reduced ones adjacent, at
/// `first:first + reduced`); `outer, n, inner` the kernels' lanes; `direct` whether the
/// kernels read the array where it is in that order (else it is copied once, or block by
/// block); `outer_stride` the element pitch of the outer axes when direct.
#[pyclass(frozen, get_all, module = "stablelse._core")]
pub struct Plan {
    perm: Vec<usize>,
    first: usize,
    reduced: usize,
    outer: usize,
    n: usize,
    inner: usize,
    direct: bool,
    outer_stride: usize,
    kept: Vec<usize>,
}

#[pymethods]
impl Plan {
    fn __repr__(&self) -> String {
        format!(
            "Plan(perm={:?}, first={}, reduced={}, outer={}, n={}, inner={}, direct={}, \
             outer_stride={})",
            self.perm,
            self.first,
            self.reduced,
            self.outer,
            self.n,
            self.inner,
            self.direct,
            self.outer_stride
        )
    }
}

impl From<plan::Plan> for Plan {
    fn from(p: plan::Plan) -> Plan {
        let kept = p.kept().collect();
        let (direct, outer_stride) = match p.access {
            Access::Direct(b) => (true, b.outer_stride),
            Access::Gather => (false, p.n * p.inner),
        };
        Plan {
            perm: p.perm,
            first: p.first,
            reduced: p.reduced,
            outer: p.outer,
            n: p.n,
            inner: p.inner,
            direct,
            outer_stride,
            kept,
        }
    }
}

/// Plans a reduction over `axes` (normalised: sorted, distinct, in range) of an array of
/// `shape` with byte `strides`, `itemsize` bytes per element and data at address `addr`.
#[pyfunction]
#[pyo3(name = "plan")]
fn plan_layout(
    shape: Vec<usize>,
    strides: Vec<isize>,
    itemsize: usize,
    addr: usize,
    axes: Vec<usize>,
) -> PyResult<Plan> {
    let layout = ArrayLayout {
        shape: &shape,
        strides: &strides,
        itemsize,
        addr,
    };
    plan::plan(layout, &axes)
        .map(Plan::from)
        .map_err(|e| PyValueError::new_err(e.0))
}
