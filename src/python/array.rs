//! NumPy arrays as the bindings use them: raw fields read under the GIL, no borrow flags.
//!
//! The numpy crate's dynamic borrow flags raise a `PanicException` when two Python threads
//! share a buffer and stay set in a child after `fork`. NumPy itself lets threads race on a
//! buffer's values and decides overlap by element; so do we. [`Raw`] copies an array's data
//! pointer, shape, strides and flags while the GIL is held (another thread may reshape the
//! Python object later; the copy stays valid because the array object, and so its buffer, is
//! kept alive by the caller's reference for the whole call). Every allocation here is
//! fallible and surfaces as `MemoryError`.

use std::ffi::c_int;

use numpy::npyffi::{self, npy_intp, PY_ARRAY_API};
use numpy::prelude::*;
use numpy::{Element, PyArrayDyn};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// NumPy's largest number of dimensions (64 since NumPy 2; 32 before).
pub(crate) const MAX_DIMS: usize = 64;

/// An array's data pointer, shape, byte strides and flags, copied under the GIL.
#[derive(Clone, Copy)]
pub(crate) struct Raw {
    pub ptr: *mut u8,
    pub ndim: usize,
    pub shape: [usize; MAX_DIMS],
    pub strides: [isize; MAX_DIMS],
    pub itemsize: usize,
    pub writeable: bool,
}

// SAFETY: a Raw is plain data; the pointer is only dereferenced by code that holds a
// reference to the array object for as long as it uses it.
unsafe impl Send for Raw {}
// SAFETY: as above.
unsafe impl Sync for Raw {}

impl Raw {
    /// The fields of `arr`.
    #[inline]
    pub fn of<T: Element, D: numpy::ndarray::Dimension>(
        arr: &Bound<'_, numpy::PyArray<T, D>>,
    ) -> PyResult<Raw> {
        let ndim = arr.ndim();
        if ndim > MAX_DIMS {
            return Err(PyValueError::new_err(format!(
                "arrays of more than {MAX_DIMS} dimensions are not supported"
            )));
        }
        let mut raw = Raw {
            ptr: arr.data() as *mut u8,
            ndim,
            shape: [0; MAX_DIMS],
            strides: [0; MAX_DIMS],
            itemsize: std::mem::size_of::<T>(),
            writeable: false,
        };
        raw.shape[..ndim].copy_from_slice(arr.shape());
        raw.strides[..ndim].copy_from_slice(arr.strides());
        // SAFETY: `arr` is a live ndarray; its flags field is read under the GIL.
        let flags = unsafe { (*arr.as_array_ptr()).fields.flags };
        raw.writeable = flags & npyffi::NPY_ARRAY_WRITEABLE != 0;
        Ok(raw)
    }

    /// A placeholder for "no array": empty, it overlaps nothing.
    pub fn empty() -> Raw {
        Raw {
            ptr: std::ptr::null_mut(),
            ndim: 1,
            shape: [0; MAX_DIMS],
            strides: [0; MAX_DIMS],
            itemsize: 1,
            writeable: false,
        }
    }

    /// The data pointer as a `T` pointer (a method, so closures capture the whole `Raw`).
    pub fn data<T>(&self) -> *mut T {
        self.ptr as *mut T
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape[..self.ndim]
    }

    pub fn strides(&self) -> &[isize] {
        &self.strides[..self.ndim]
    }

    pub fn size(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn layout(&self) -> crate::plan::ArrayLayout<'_> {
        crate::plan::ArrayLayout {
            shape: self.shape(),
            strides: self.strides(),
            itemsize: self.itemsize,
            addr: self.ptr as usize,
        }
    }

    /// The byte range `[lo, hi)` the elements occupy (empty for an empty array).
    pub fn extent(&self) -> (usize, usize) {
        let base = self.ptr as usize;
        if self.size() == 0 {
            return (base, base);
        }
        let (mut lo, mut hi) = (0isize, 0isize);
        for (&n, &s) in self.shape().iter().zip(self.strides()) {
            let reach = (n as isize - 1) * s;
            if reach < 0 {
                lo += reach;
            } else {
                hi += reach;
            }
        }
        (
            base.wrapping_add_signed(lo),
            base.wrapping_add_signed(hi) + self.itemsize,
        )
    }

    /// Same elements in the same order: `out=x` in place.
    pub fn same_view(&self, other: &Raw) -> bool {
        self.ptr == other.ptr
            && self.itemsize == other.itemsize
            && self.shape() == other.shape()
            && self.strides() == other.strides()
    }

    /// Two elements of a non-empty array at the same address (a zero stride, or strides that
    /// fold the array onto itself); such an array cannot hold a result.
    pub fn has_zero_stride(&self) -> bool {
        self.size() > 1
            && self
                .shape()
                .iter()
                .zip(self.strides())
                .any(|(&n, &s)| n > 1 && s == 0)
    }
}

/// The elements of an array in C order, copied into a new vector (or `MemoryError`): a
/// private copy that no other thread can change between validation and use.
pub(crate) fn copy_values<T: Copy>(raw: &Raw, zero: T) -> PyResult<Vec<T>> {
    let mut v = try_vec(raw.size(), zero)?;
    // SAFETY: the caller holds the array alive; the view covers its own elements.
    unsafe { super::exec::WorkView::new(raw, 0..raw.ndim).gather(0, &mut v) };
    Ok(v)
}

impl Raw {
    /// Whether the elements lie in C order with no gaps, at an address aligned for `T`
    /// (strides of length-1 axes do not matter; an empty array always qualifies).
    pub fn is_dense<T>(&self) -> bool {
        if self.size() == 0 {
            return true;
        }
        let mut step = self.itemsize as isize;
        for (&n, &s) in self.shape().iter().zip(self.strides()).rev() {
            if n > 1 && s != step {
                return false;
            }
            step *= n as isize;
        }
        self.itemsize == std::mem::size_of::<T>()
            && (self.ptr as usize).is_multiple_of(std::mem::align_of::<T>())
    }
}

/// The elements of a dense array ([`Raw::is_dense`]) as a slice, or `None` for any other
/// layout.
///
/// # Safety
/// `raw` describes a live array of `T` that outlives the slice.
pub(crate) unsafe fn dense<'a, T>(raw: &Raw) -> Option<&'a [T]> {
    if !raw.is_dense::<T>() {
        return None;
    }
    if raw.size() == 0 {
        return Some(&[]);
    }
    // SAFETY: dense and aligned: `size` consecutive `T`s from the data pointer.
    Some(unsafe { std::slice::from_raw_parts(raw.data::<T>() as *const T, raw.size()) })
}

/// As [`dense`], writeable.
///
/// # Safety
/// As [`dense`]; the array is writeable and nothing else in this call reads or writes it
/// while the slice is used.
pub(crate) unsafe fn dense_mut<'a, T>(raw: &Raw) -> Option<&'a mut [T]> {
    if !raw.is_dense::<T>() {
        return None;
    }
    if raw.size() == 0 {
        return Some(&mut []);
    }
    // SAFETY: as in `dense`; exclusive by the caller's contract.
    Some(unsafe { std::slice::from_raw_parts_mut(raw.data::<T>(), raw.size()) })
}

/// Whether the arrays `a` and `b` (with fields `ra`, `rb`) share an element, decided exactly
/// as `numpy.shares_memory` does; disjoint byte ranges answer without asking NumPy.
pub(crate) fn shares_memory(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    ra: &Raw,
    b: &Bound<'_, PyAny>,
    rb: &Raw,
) -> PyResult<bool> {
    let ((a0, a1), (b0, b1)) = (ra.extent(), rb.extent());
    if a0 >= b1 || b0 >= a1 {
        return Ok(false);
    }
    py.import("numpy")?
        .getattr("shares_memory")?
        .call1((a, b))?
        .is_truthy()
}

/// A new, uninitialised C-ordered array of `shape`, or `MemoryError`.
///
/// # Safety
/// The caller writes every element before the array is seen by Python.
pub(crate) unsafe fn try_empty<'py, T: Element>(
    py: Python<'py>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let mut dims = [0 as npy_intp; MAX_DIMS];
    if shape.len() > MAX_DIMS {
        return Err(PyValueError::new_err("too many dimensions"));
    }
    for (d, &n) in dims.iter_mut().zip(shape) {
        *d = npy_intp::try_from(n).map_err(|_| PyMemoryError::new_err("array is too large"))?;
    }
    // SAFETY: the NumPy C API is called under the GIL with a valid descriptor (whose
    // reference it steals) and `shape.len()` dimensions.
    let ptr = unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            T::get_dtype(py).into_dtype_ptr(),
            shape.len() as c_int,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        )
    };
    if ptr.is_null() {
        return Err(PyErr::take(py)
            .unwrap_or_else(|| PyMemoryError::new_err("cannot allocate the result array")));
    }
    // SAFETY: a new reference to an ndarray of dtype T, as just created.
    Ok(unsafe { Bound::from_owned_ptr(py, ptr).cast_into_unchecked() })
}

/// A vector of `len` copies of `value`, or `MemoryError` ([`crate::error::try_vec`]).
pub(crate) fn try_vec<T: Clone>(len: usize, value: T) -> PyResult<Vec<T>> {
    crate::error::try_vec(len, value).map_err(|e| PyMemoryError::new_err(e.to_string()))
}

/// The writeable output `out` of exactly `shape` and dtype `T`, or an error naming `name`.
pub(crate) fn check_out<'py, T: Element>(
    out: &Bound<'py, PyAny>,
    shape: &[usize],
    name: &str,
) -> PyResult<(Bound<'py, PyArrayDyn<T>>, Raw)> {
    let arr = match out.cast::<PyArrayDyn<T>>() {
        Ok(a) => a.clone(),
        Err(_) => {
            return Err(match out.cast::<numpy::PyUntypedArray>() {
                Ok(u) => PyTypeError::new_err(format!(
                    "{name} has dtype {}, expected {}",
                    u.dtype(),
                    T::get_dtype(out.py())
                )),
                Err(_) => PyTypeError::new_err(format!(
                    "{name} must be a numpy.ndarray, got {}",
                    out.get_type().name()?
                )),
            })
        }
    };
    let raw = Raw::of(&arr)?;
    if raw.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "{name} has shape {}, expected {}",
            py_shape(raw.shape()),
            py_shape(shape)
        )));
    }
    if !raw.writeable {
        return Err(PyValueError::new_err(format!("{name} is read-only")));
    }
    if raw.has_zero_stride() {
        return Err(PyValueError::new_err(format!(
            "{name} has a zero stride: its elements overlap and cannot hold a result"
        )));
    }
    Ok((arr, raw))
}

/// A shape as Python prints a tuple: `(3,)`, `(2, 4)`.
pub(crate) fn py_shape(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
