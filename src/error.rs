//! The crate's error type: why a kernel refused its arguments.
//!
//! Every fallible entry point of the loss and vector-Jacobian kernels returns
//! `Result<_, Error>`, and nothing has been written to any output when it does. The variants
//! carry the facts (which argument, which lane, which sizes) rather than prose, so a caller can
//! react to them: the Python bindings map [`Error::TargetOutOfRange`] to `IndexError`,
//! [`Error::Alloc`] to `MemoryError` and the rest to `ValueError`.

use std::fmt;

/// Why a call was refused. Nothing has been written to any output when one is returned.
///
/// ```
/// use stablelse::kernels::cross_entropy::{cross_entropy, Targets, XentOptions};
/// use stablelse::{Batch, Error};
///
/// let logits = [0.0f64; 6];
/// let err = cross_entropy(
///     &logits,
///     Batch::rows(2, 3),
///     Targets::Indices(&[0, 3]),
///     &XentOptions::default(),
///     None,
///     None,
/// )
/// .unwrap_err();
/// assert_eq!(err, Error::TargetOutOfRange { position: 1, value: 3, classes: 3 });
/// assert_eq!(err.to_string(), "target[1] = 3 is outside [0, 3)");
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The first lane, in lane order, whose class index is outside `[0, classes)` and is not
    /// `ignore_index`.
    TargetOutOfRange {
        /// The lane (`o * inner + j` in a [`Batch`](crate::Batch)).
        position: usize,
        /// The offending class index.
        value: i64,
        /// The number of classes.
        classes: usize,
    },
    /// The first lane, in lane order, that keeps some class under `where=` but whose class
    /// index is a masked class.
    MaskedTarget {
        /// The lane (`o * inner + j` in a [`Batch`](crate::Batch)).
        position: usize,
        /// The masked class index.
        value: i64,
    },
    /// The first lane, in lane order, that keeps some class under `where=` but whose
    /// probability target puts nonzero mass on a masked class.
    MaskedProbability {
        /// The lane.
        position: usize,
        /// The first such class of the lane.
        class: usize,
        /// Its probability.
        value: f64,
    },
    /// A buffer whose length does not match the batch it is used with.
    ShapeMismatch {
        /// Which argument (`"weight"`, `"targets"`, `"gradient"`, ...).
        what: &'static str,
        /// The number of elements the batch needs.
        expected: usize,
        /// The number of elements given.
        got: usize,
    },
    /// A scalar option outside its domain.
    InvalidOption {
        /// The option's name (`"label_smoothing"`, `"z_loss"`).
        name: &'static str,
        /// The domain it must lie in, in words (`"in [0, 1]"`).
        domain: &'static str,
        /// The value given.
        value: f64,
    },
    /// A combination of arguments the operation does not define.
    Unsupported(&'static str),
    /// A batch layout that does not fit its buffer (see [`Batch::check`](crate::Batch::check)).
    Layout(String),
    /// Scratch memory could not be allocated.
    Alloc {
        /// The size of the failed request.
        bytes: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TargetOutOfRange {
                position,
                value,
                classes,
            } => write!(f, "target[{position}] = {value} is outside [0, {classes})"),
            Error::MaskedTarget { position, value } => write!(
                f,
                "target[{position}] = {value} is a class that where= masks in that row"
            ),
            Error::MaskedProbability {
                position,
                class,
                value,
            } => write!(
                f,
                "target[{position}] puts probability {value} on class {class}, which where= \
                 masks in that row"
            ),
            Error::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what} holds {got} elements, expected {expected}"),
            Error::InvalidOption {
                name,
                domain,
                value,
            } => write!(f, "{name} must be {domain}, got {value}"),
            Error::Unsupported(what) => f.write_str(what),
            Error::Layout(msg) => f.write_str(msg),
            Error::Alloc { bytes } => write!(f, "cannot allocate {bytes} bytes of scratch memory"),
        }
    }
}

impl std::error::Error for Error {}

/// `Vec::with_capacity` that reports a failed allocation instead of aborting the process.
pub(crate) fn try_vec<T: Clone>(len: usize, fill: T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::Alloc {
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    })?;
    v.resize(len, fill);
    Ok(v)
}

/// Buffers of at least this many bytes ask the system for huge pages ([`advise_huge_pages`]).
const HUGE_FROM: usize = 4 << 20;

/// Asks for huge pages over the whole 2 MiB pages of `[addr, addr + bytes)`, a buffer not yet
/// written: a fresh buffer of the input's size faults in a page at a time, and a fault per 4 KiB
/// costs as much as the pass that fills it (measured: 25 ms of 57 for the partition of 2^24
/// elements, 128 MiB). A hint, from [`HUGE_FROM`] bytes on: where the system declines,
/// nothing changes. Linux only.
pub(crate) fn advise_huge_pages(addr: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_FROM {
        const HUGE: usize = 2 << 20;
        let (start, end) = (addr.next_multiple_of(HUGE), (addr + bytes) / HUGE * HUGE);
        if start < end {
            // SAFETY: the range lies inside one live allocation of the caller's; the advice
            // changes how its pages are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (addr, bytes);
}

/// `len` zero bytes, or [`Error::Alloc`]: from the allocator's zeroed memory, so that a large
/// buffer comes as fresh pages the system zeroes as they are first written, with no pass that
/// writes the zeros (as [`try_vec`] with a fill of 0 makes). For a buffer that is written
/// whole right away.
pub(crate) fn try_zeroed_bytes(len: usize) -> Result<Vec<u8>, Error> {
    let failed = Error::Alloc { bytes: len };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).map_err(|_| failed.clone())?;
    // SAFETY: the layout has a nonzero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return Err(failed);
    }
    advise_huge_pages(p as usize, len);
    // SAFETY: `p` holds `len` initialised (zero) bytes, allocated by the global allocator
    // with the layout of `len` bytes, which the vector takes over.
    Ok(unsafe { Vec::from_raw_parts(p, len, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_bytes_are_zero_and_a_size_past_the_address_space_is_an_alloc_error() {
        assert!(try_zeroed_bytes(0).unwrap().is_empty());
        let v = try_zeroed_bytes(3 << 20).unwrap();
        assert_eq!((v.len(), v.capacity()), (3 << 20, 3 << 20));
        assert!(v.iter().all(|&b| b == 0));
        assert_eq!(
            try_zeroed_bytes(usize::MAX),
            Err(Error::Alloc { bytes: usize::MAX })
        );
    }
}
