//! How a batch of reductions is laid out over a slice.
//!
//! Every reduction is seen as `(outer, n, inner)`: `outer * inner` independent reductions of
//! length `n`. Element `(o, k, j)` lives at `o * outer_stride + k * inner + j`. With `inner == 1`
//! this is a batch of rows (axis = last), `outer_stride` being the row pitch (it may exceed
//! `n` for a sliced view, or be 0 for a broadcast row). With `inner > 1` each `(n, inner)` slab
//! is C-contiguous and the reduction runs down its columns (axis = first, or a middle axis).
//! The Python layer maps any `axis` argument onto this form, copying only when it must.

/// The shape of a batch of reductions over one slice; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub outer: usize,
    pub n: usize,
    pub inner: usize,
    pub outer_stride: usize,
}

impl Batch {
    /// `rows` contiguous rows of length `n`.
    pub fn rows(rows: usize, n: usize) -> Batch {
        Batch {
            outer: rows,
            n,
            inner: 1,
            outer_stride: n,
        }
    }

    /// A C-contiguous `(outer, n, inner)` block.
    pub fn contiguous(outer: usize, n: usize, inner: usize) -> Batch {
        Batch {
            outer,
            n,
            inner,
            outer_stride: n * inner,
        }
    }

    /// Number of reductions, which is the number of outputs of `logsumexp`.
    pub fn count(&self) -> usize {
        self.outer * self.inner
    }

    /// Number of elements the batch covers (the size of a softmax output).
    pub fn elements(&self) -> usize {
        self.outer * self.n * self.inner
    }

    /// True when the batch is exactly one dense C-contiguous block.
    pub fn is_contiguous(&self) -> bool {
        self.outer <= 1 || self.outer_stride == self.n * self.inner
    }

    /// The smallest slice length the batch may index, or an error if the sizes overflow.
    pub fn required_len(&self) -> Result<usize, String> {
        if self.outer == 0 || self.n == 0 || self.inner == 0 {
            return Ok(0);
        }
        let slab = self.n.checked_mul(self.inner);
        let last = (self.outer - 1).checked_mul(self.outer_stride);
        match (slab, last) {
            (Some(slab), Some(last)) => last
                .checked_add(slab)
                .ok_or_else(|| "array is too large".to_string()),
            _ => Err("array is too large".to_string()),
        }
    }

    /// Checks that a slice of `len` elements holds the batch.
    pub fn check(&self, len: usize) -> Result<(), String> {
        let need = self.required_len()?;
        if need > len {
            return Err(format!(
                "batch {self:?} needs {need} elements but the buffer holds {len}"
            ));
        }
        Ok(())
    }
}
