//! Running a plan over arrays of any layout, with scratch bounded by threads x block.
//!
//! When the kernels read the input where it is and write a dense output (the plan's
//! [`Access::Direct`] and [`Plan::dense_out`]), the kernel runs over the whole batch. Otherwise
//! the lanes are taken in blocks of about [`BLOCK`] elements (or one lane, up to
//! `2 * LONG_ROW_BLOCK` elements; longer lanes stream through one `LONG_ROW_BLOCK`): each block
//! is copied (in work order) into a dense per-thread buffer, the kernel runs there, and the
//! block's results are copied to the output through its own strides. Blocks are disjoint sets of lanes, so an
//! output that *is* the input (in place, any view) is read before it is written, block by
//! block. The per-lane arithmetic is the kernels' own, so every path gives the same values.
//! Arrays of 16-bit floats ([`Stored`] types other than the compute type) always take the
//! blocked path: the gather widens each block to float32 and the scatter rounds it back.

use crate::half::{read_run, write_run, Stored};
use crate::kernels::{self, masked, Algorithm, Reduction, LONG_ROW_BLOCK};
use crate::layout::Batch;
use crate::parallel;
use crate::plan::Plan;
use crate::real::Real;
use crate::state::LseState;

use pyo3::marker::Ungil;
use pyo3::Python;

use super::array::{Raw, MAX_DIMS};

/// Elements per block of the blocked path: a few hundred KiB, well inside L2.
pub(crate) const BLOCK: usize = 1 << 15;

/// Lanes per direct call of the column kernels, whose per-lane parameters are scratch.
const COLUMN_LANES: usize = 1 << 13;

/// [`COLUMN_LANES`] for masked columns read in place: the staged path they replace costs
/// more than the wider scratch (a Fortran-ordered 16384x1024 float32 softmax over its last
/// axis under a mask, 2 threads: 3.0x the unmasked time staged, 1.2x read in place).
const KEPT_COLUMN_LANES: usize = 1 << 15;

/// Lanes per direct call of the column softmax over lanes of `n` elements: [`COLUMN_LANES`],
/// or as many as masked columns take for lanes long enough that the per-lane parameters
/// (computed on one thread) cost little beside the lanes' elements (float32, 2 threads:
/// 1024x16384 over axis 0, or a Fortran-ordered 16384x1024 over its last axis, 16.4 -> 9.5
/// ms; 512x32768 12 -> 10.6 ms; from 128 to 256 elements a lane softmax gained and
/// log_softmax lost up to 6%, and 16x32768 lost 1.5-2.3x).
fn column_lanes(n: usize) -> usize {
    if n >= LONG_COLUMN {
        KEPT_COLUMN_LANES
    } else {
        COLUMN_LANES
    }
}

/// Lanes of at least this many elements take the column softmax directly however wide their
/// slabs (the kernel works through [`kernels::COLUMN_STRIPE`] columns at a time): the blocked
/// path would copy each block's rows 128 bytes at a time (float32 softmax over axis 0 of
/// 1000x65536, 2 threads: 303 ms blocked, 57 ms direct).
const LONG_COLUMN: usize = 512;

/// Elements below which a binding keeps the GIL for the kernel call: releasing and taking it
/// back costs more than the work (a few hundred nanoseconds against a call of about a
/// microsecond), and other Python threads wait no longer than this work takes.
pub(crate) const DETACH_MIN_ELEMENTS: usize = 1 << 12;

/// Run `f` without the GIL unless its work (`elements` values read) is small.
pub(crate) fn detach_unless_small<T, F>(py: Python<'_>, elements: usize, f: F) -> T
where
    F: Ungil + FnOnce() -> T,
    T: Ungil,
{
    if elements < DETACH_MIN_ELEMENTS {
        f()
    } else {
        py.detach(f)
    }
}

/// Why a plan could not run.
pub(crate) enum ExecError {
    /// A scratch buffer could not be allocated.
    Memory,
    /// A kernel refused its arguments (a bug in the caller: sizes are checked before).
    Kernel(String),
}

impl From<String> for ExecError {
    fn from(e: String) -> ExecError {
        ExecError::Kernel(e)
    }
}

/// An array's elements in a work order: `shape`/byte `strides` permuted, adjacent axes that
/// step evenly merged. Element `i` in C order of the work shape is at `offset(i)`.
#[derive(Clone, Copy)]
pub(crate) struct WorkView {
    base: *mut u8,
    ndim: usize,
    shape: [usize; MAX_DIMS],
    strides: [isize; MAX_DIMS],
}

// SAFETY: plain data; dereferenced only while the caller keeps the array alive.
unsafe impl Send for WorkView {}
// SAFETY: as above.
unsafe impl Sync for WorkView {}

impl WorkView {
    /// `raw` with its axes taken in the order `axes` (a permutation or a subsequence of them).
    pub fn new(raw: &Raw, axes: impl IntoIterator<Item = usize>) -> WorkView {
        let mut v = WorkView {
            base: raw.ptr,
            ndim: 0,
            shape: [0; MAX_DIMS],
            strides: [0; MAX_DIMS],
        };
        for a in axes {
            let (n, s) = (raw.shape[a], raw.strides[a]);
            if n == 1 {
                continue;
            }
            if v.ndim > 0 && v.strides[v.ndim - 1] == s * n as isize {
                v.shape[v.ndim - 1] *= n;
                v.strides[v.ndim - 1] = s;
                continue;
            }
            v.shape[v.ndim] = n;
            v.strides[v.ndim] = s;
            v.ndim += 1;
        }
        v
    }

    /// Calls `f(byte_offset, stride, len)` for the runs along the last axis that cover the
    /// elements `start..start + count` of the work order.
    fn runs(&self, start: usize, count: usize, mut f: impl FnMut(isize, isize, usize)) {
        if count == 0 {
            return;
        }
        if self.ndim == 0 {
            f(0, 0, count.min(1));
            return;
        }
        let last = self.ndim - 1;
        let mut idx = [0usize; MAX_DIMS];
        let mut rest = start;
        let mut off = 0isize;
        for d in (0..self.ndim).rev() {
            idx[d] = rest % self.shape[d];
            rest /= self.shape[d];
            off += idx[d] as isize * self.strides[d];
        }
        let mut left = count;
        while left > 0 {
            let len = (self.shape[last] - idx[last]).min(left);
            f(off, self.strides[last], len);
            left -= len;
            if left == 0 {
                break;
            }
            // Advance the odometer past the run.
            off += (len as isize) * self.strides[last];
            idx[last] += len;
            let mut d = last;
            while idx[d] == self.shape[d] && d > 0 {
                off -= self.shape[d] as isize * self.strides[d];
                idx[d] = 0;
                d -= 1;
                idx[d] += 1;
                off += self.strides[d];
            }
        }
    }

    /// The address of work elements `start..start + len` when they are one unit-stride run
    /// of aligned `T` (a block the kernels may read where it is).
    fn unit_run<T>(&self, start: usize, len: usize) -> Option<*const T> {
        let size = std::mem::size_of::<T>() as isize;
        let (mut runs, mut first) = (0, None);
        self.runs(start, len, |off, stride, l| {
            runs += 1;
            if stride == size && l == len {
                first = Some(off);
            }
        });
        // SAFETY: the offset of a run inside the array (the view's contract).
        let p = unsafe { self.base.offset(first?) } as *const T;
        (runs == 1 && (p as usize).is_multiple_of(std::mem::align_of::<T>())).then_some(p)
    }

    /// For rows of the view's last dimension (`n` elements): the length and byte stride of
    /// the innermost dimension before it with more than one index, so that the rows within
    /// one index of the dimensions above lie that stride apart (`(usize::MAX, 0)`: one row).
    fn row_run(&self, n: usize) -> Option<(usize, isize)> {
        let last = self.ndim.checked_sub(1)?;
        if self.shape[last] != n {
            return None;
        }
        let d = (0..last).rev().find(|&d| self.shape[d] > 1);
        Some(d.map_or((usize::MAX, 0), |d| (self.shape[d], self.strides[d])))
    }

    /// Whether the view's rows of `n` elements are stored transposed: consecutive rows one
    /// byte apart and a row's bytes a stride of more than one apart.
    fn transposed_rows(&self, n: usize) -> bool {
        let Some(last) = self.ndim.checked_sub(1).filter(|&last| last > 0) else {
            return false;
        };
        n >= 2 && self.shape[last] == n && self.strides[last - 1] == 1 && self.strides[last] > 1
    }

    /// A view of `len` bytes at `base`, in order.
    fn dense(base: *const u8, len: usize) -> WorkView {
        let mut v = WorkView {
            base: base as *mut u8,
            ndim: 1,
            shape: [0; MAX_DIMS],
            strides: [0; MAX_DIMS],
        };
        (v.shape[0], v.strides[0]) = (len, 1);
        v
    }

    /// Copies the rows `start / n..` of `n` work elements of a byte array into `dst` (dense
    /// rows of 0 / 1 bytes) when they are stored transposed: consecutive rows one byte apart
    /// and a row's bytes a positive stride apart (a Fortran-ordered mask over the rows of a
    /// C-ordered array). Each run of rows within one index of the dimensions above is moved by
    /// byte tiles ([`masked::transpose_mask`]). Returns `false`, writing nothing, for any other
    /// layout.
    ///
    /// # Safety
    /// The view describes a live byte array that covers the rows; `dst.len()` is a multiple
    /// of `n`.
    unsafe fn gather_transposed(&self, start: usize, n: usize, dst: &mut [u8]) -> bool {
        if !self.transposed_rows(n) || !start.is_multiple_of(n) || !dst.len().is_multiple_of(n) {
            return false;
        }
        let last = self.ndim - 1;
        let (class, period, first, rows) = (
            self.strides[last] as usize,
            self.shape[last - 1],
            start / n,
            dst.len() / n,
        );
        let mut r = 0;
        while r < rows {
            let len = (period - (first + r) % period).min(rows - r);
            let mut off = 0;
            self.runs((first + r) * n, 1, |o, _, _| off = o);
            // SAFETY: the run's `n` rows of `len` bytes, `class` apart, lie in the array
            // (caller's contract).
            let src =
                unsafe { std::slice::from_raw_parts(self.base.offset(off), (n - 1) * class + len) };
            masked::transpose_mask((src, class), (&mut dst[r * n..(r + len) * n], n), n, len);
            r += len;
        }
        true
    }

    /// Copies work elements `start..start + dst.len()` into `dst`.
    ///
    /// # Safety
    /// The view describes a live array of `T` that covers those elements.
    pub unsafe fn gather<T: Copy>(&self, start: usize, dst: &mut [T]) {
        let mut at = 0usize;
        let size = std::mem::size_of::<T>() as isize;
        self.runs(start, dst.len(), |off, stride, len| {
            let run = &mut dst[at..at + len];
            at += len;
            if stride == size {
                // SAFETY: the run lies inside the array (caller's contract); bytes have no
                // alignment, and `run` is a distinct buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.offset(off),
                        run.as_mut_ptr() as *mut u8,
                        len * size as usize,
                    )
                };
            } else if stride == 0 {
                // A broadcast axis: one element repeated.
                // SAFETY: as below.
                run.fill(unsafe { (self.base.offset(off) as *const T).read_unaligned() });
            } else {
                // SAFETY: the run lies inside the array (caller's contract); its elements may
                // be unaligned (a view of a byte buffer).
                unsafe { read_run(self.base.offset(off), stride, run) };
            }
        });
    }

    /// As [`WorkView::gather`] from an array of `S`, widened to its compute type.
    ///
    /// # Safety
    /// The view describes a live array of `S` that covers those elements.
    pub unsafe fn gather_as<S: Stored>(&self, start: usize, dst: &mut [S::Compute]) {
        if S::NATIVE {
            // SAFETY: an array of S holds values of S::Compute itself.
            return unsafe { self.gather(start, dst) };
        }
        let mut at = 0usize;
        self.runs(start, dst.len(), |off, stride, len| {
            // SAFETY: as in gather.
            unsafe { S::widen_run(self.base.offset(off), stride, &mut dst[at..at + len]) };
            at += len;
        });
    }

    /// As [`WorkView::gather_as`], with `dst[i] = -inf` wherever `keep[i] == 0` (a `where=`
    /// block hidden as it is gathered, see `kernels::masked`): unit-stride runs of a native,
    /// aligned array go through one vector select reading the array where it is.
    ///
    /// # Safety
    /// As [`WorkView::gather`]; `keep` holds at least `dst.len()` bytes.
    pub unsafe fn gather_hidden<S: Stored>(
        &self,
        start: usize,
        keep: &[u8],
        dst: &mut [S::Compute],
    ) {
        let size = std::mem::size_of::<S::Compute>() as isize;
        let align = std::mem::align_of::<S::Compute>();
        let level = crate::simd::level();
        let mut at = 0usize;
        self.runs(start, dst.len(), |off, stride, len| {
            let (run, kr) = (&mut dst[at..at + len], &keep[at..at + len]);
            // SAFETY: the run lies inside the array (caller's contract).
            let p = unsafe { self.base.offset(off) } as *const S::Compute;
            if S::NATIVE && stride == size && (p as usize).is_multiple_of(align) {
                let ninf = f64::NEG_INFINITY;
                // SAFETY: `len` aligned elements of the array (an array of S holds values of
                // S::Compute), `len` bytes of `kr`; `run` is a distinct buffer.
                unsafe {
                    crate::simd::select_kept(level, p, kr.as_ptr(), run.as_mut_ptr(), len, ninf)
                };
            } else {
                // SAFETY: forwarded (the one run at work index `start + at`).
                unsafe { self.gather_as::<S>(start + at, run) };
                masked::hide_masked(run, kr);
            }
            at += len;
        });
    }

    /// Copies the work elements `start + i * step` of an array of `S` into `dst[i]` (a lane
    /// across columns).
    ///
    /// # Safety
    /// As [`WorkView::gather_as`].
    pub unsafe fn gather_step<S: Stored>(&self, start: usize, step: usize, dst: &mut [S::Compute]) {
        if step == 1 {
            // SAFETY: forwarded.
            return unsafe { self.gather_as::<S>(start, dst) };
        }
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: forwarded.
            unsafe { self.gather_as::<S>(start + i * step, std::slice::from_mut(d)) };
        }
    }

    /// Copies `src[i]` into the work elements `start + i * step` of an array of `S`.
    ///
    /// # Safety
    /// As [`WorkView::scatter_as`].
    pub unsafe fn scatter_step<S: Stored>(&self, start: usize, step: usize, src: &[S::Compute]) {
        if step == 1 {
            // SAFETY: forwarded.
            return unsafe { self.scatter_as::<S>(start, src) };
        }
        for (i, v) in src.iter().enumerate() {
            // SAFETY: forwarded.
            unsafe { self.scatter_as::<S>(start + i * step, std::slice::from_ref(v)) };
        }
    }

    /// Copies `src` into work elements `start..start + src.len()`.
    ///
    /// # Safety
    /// As [`WorkView::gather`], and the array is writeable.
    pub unsafe fn scatter<T: Copy>(&self, start: usize, src: &[T]) {
        let mut at = 0usize;
        let size = std::mem::size_of::<T>() as isize;
        self.runs(start, src.len(), |off, stride, len| {
            let run = &src[at..at + len];
            at += len;
            if stride == size {
                // SAFETY: as in gather; the output is writeable and distinct from `src`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        run.as_ptr() as *const u8,
                        self.base.offset(off),
                        len * size as usize,
                    )
                };
            } else {
                // SAFETY: as in gather.
                unsafe { write_run(run, self.base.offset(off), stride) };
            }
        });
    }

    /// As [`WorkView::scatter`] into an array of `S`, rounded from its compute type.
    ///
    /// # Safety
    /// As [`WorkView::scatter`], for an array of `S`.
    pub unsafe fn scatter_as<S: Stored>(&self, start: usize, src: &[S::Compute]) {
        if S::NATIVE {
            // SAFETY: as in gather_as.
            return unsafe { self.scatter(start, src) };
        }
        let mut at = 0usize;
        self.runs(start, src.len(), |off, stride, len| {
            // SAFETY: as in gather.
            unsafe { S::narrow_run(&src[at..at + len], self.base.offset(off), stride) };
            at += len;
        });
    }
}

/// How the blocked path cuts `(outer, n, inner)` lanes: `slabs` whole `(n, inner)` slabs per
/// block, or (when one slab is larger than a block) `cols` columns of one slab.
#[derive(Clone, Copy)]
struct Blocks {
    outer: usize,
    n: usize,
    inner: usize,
    slabs: usize,
    cols: usize,
}

impl Blocks {
    fn new(p: &Plan) -> Blocks {
        // A slab costs its elements, and at least one unit per lane (empty lanes still
        // produce results).
        let slab = p.n.max(1).saturating_mul(p.inner);
        if slab <= BLOCK {
            Blocks {
                outer: p.outer,
                n: p.n,
                inner: p.inner,
                // No more slabs than the array holds: each piece's scratch is a block's size.
                slabs: (BLOCK / slab).clamp(1, p.outer.max(1)),
                cols: p.inner,
            }
        } else {
            Blocks {
                outer: p.outer,
                n: p.n,
                inner: p.inner,
                slabs: 1,
                cols: (BLOCK / p.n.max(1)).max(1).min(p.inner),
            }
        }
    }

    /// Lanes the kernels cut into blocks themselves: streamed through a buffer of one such
    /// block, lane by lane, with the kernels' blocking (so the values are theirs, bit for
    /// bit). Shorter lanes fit a buffer of at most `2 * LONG_ROW_BLOCK` elements.
    fn long_lanes(&self) -> bool {
        self.n >= 2 * LONG_ROW_BLOCK
    }

    fn whole_slabs(&self) -> bool {
        self.cols == self.inner
    }

    fn count(&self) -> usize {
        if self.whole_slabs() {
            self.outer.div_ceil(self.slabs)
        } else {
            self.outer * self.inner.div_ceil(self.cols)
        }
    }

    /// Elements of the largest block.
    fn elements(&self) -> usize {
        self.slabs * self.n * self.cols
    }

    /// Block `b`: its dense batch, the work ranges `(start, len)` of its elements (one per
    /// lane element row), and its first lane and lane count in `(outer, inner)` order.
    fn block(&self, b: usize) -> (Batch, usize, usize) {
        if self.whole_slabs() {
            let o0 = b * self.slabs;
            let o1 = (o0 + self.slabs).min(self.outer);
            (Batch::contiguous(o1 - o0, self.n, self.inner), o0, 0)
        } else {
            let per = self.inner.div_ceil(self.cols);
            let (o, j0) = (b / per, (b % per) * self.cols);
            let w = self.cols.min(self.inner - j0);
            (Batch::contiguous(1, self.n, w), o, j0)
        }
    }

    /// Calls `f(work_start, dense_start, len)` for the element runs of block `(o0, j0, batch)`.
    fn element_runs(
        &self,
        o0: usize,
        j0: usize,
        batch: &Batch,
        mut f: impl FnMut(usize, usize, usize),
    ) {
        if self.whole_slabs() {
            let slab = self.n * self.inner;
            f(o0 * slab, 0, batch.outer * slab);
        } else {
            for k in 0..self.n {
                f(
                    (o0 * self.n + k) * self.inner + j0,
                    k * batch.inner,
                    batch.inner,
                );
            }
        }
    }

    /// The `(outer, inner)` result positions of block `(o0, j0, batch)`: one run.
    fn result_run(&self, o0: usize, j0: usize, batch: &Batch) -> (usize, usize) {
        (o0 * self.inner + j0, batch.outer * batch.inner)
    }
}

/// Runs `f(block, elements, mask, states)` over every block, in parallel pieces that each own
/// one scratch of `elements` values, one of `mask` mask bytes and one of `states` lane states;
/// a failed allocation is `ExecError::Memory`.
fn for_each_block<S: Copy + Send + Sync>(
    blocks: &Blocks,
    zero: S,
    elements: usize,
    mask: usize,
    states: usize,
    f: impl Fn(usize, &mut [S], &mut [u8], &mut [LseState]) -> Result<(), ExecError> + Sync + Send,
) -> Result<(), ExecError> {
    let failed = std::sync::Mutex::new(None::<ExecError>);
    let fail = |e: ExecError| *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    // About eight blocks per piece: one allocation serves several blocks.
    parallel::for_each_piece(blocks.count(), parallel::GRAIN_ELEMENTS / 8, |range| {
        let mut scratch: Vec<S> = Vec::new();
        let mut keep: Vec<u8> = Vec::new();
        let mut st: Vec<LseState> = Vec::new();
        if scratch.try_reserve_exact(elements).is_err()
            || keep.try_reserve_exact(mask).is_err()
            || st.try_reserve_exact(states).is_err()
        {
            return fail(ExecError::Memory);
        }
        scratch.resize(elements, zero);
        keep.resize(mask, 0);
        st.resize(states, LseState::EMPTY);
        for b in range {
            if let Err(e) = f(b, &mut scratch, &mut keep, &mut st) {
                return fail(e);
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The elements of a direct batch as a slice.
///
/// # Safety
/// `raw` holds `batch` (the plan said so) and stays alive while the slice is used.
pub(crate) unsafe fn slice_of<'a, T>(raw: &Raw, batch: &Batch) -> Result<&'a [T], ExecError> {
    let len = batch.required_len()?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(raw.data::<T>() as *const T, len) })
}

/// # Safety
/// As [`slice_of`], for an array nothing else reads during the call.
unsafe fn slice_mut_of<'a, T>(raw: &Raw, batch: &Batch) -> Result<&'a mut [T], ExecError> {
    let len = batch.required_len()?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(raw.data::<T>(), len) })
}

/// The plan's direct batch of `x` when the kernels read it where it is: arrays of a 16-bit
/// `S` and masked lanes always take the blocked path (the mask block is gathered beside the
/// block of `x`).
fn direct_batch<S: Stored>(p: &Plan, mask: Option<&Raw>) -> Option<Batch> {
    match (p.access, mask) {
        (crate::plan::Access::Direct(b), None) if S::NATIVE => Some(b),
        _ => None,
    }
}

/// Softmax or log_softmax of `x` (planned by `p`) into `out` (same shape; `out` may be `x`
/// itself, or share no element with it), over the elements `mask` keeps if one is given (a
/// bool array of `x`'s shape, any strides, zero strides included; see `kernels::masked`).
/// Arrays of a 16-bit `S` are computed in `T` block by block (the kernels never read them where
/// they are; in place works as for any blocked plan).
///
/// # Safety
/// `x` and `out` describe live arrays of `S` of the planned shape, `mask` one of bytes; `out`
/// is writeable; `x` and `out` are the same view or share no element; `mask` shares no element
/// with `out`.
pub(crate) unsafe fn softmax<S: Stored<Compute = T>, T: Real>(
    p: &Plan,
    x: &Raw,
    mask: Option<&Raw>,
    out: &Raw,
    alg: Algorithm,
    what: Reduction,
) -> Result<(), ExecError> {
    if p.outer * p.n * p.inner == 0 {
        return Ok(());
    }
    if let Some(m) = mask.filter(|m| flags_lanes(p, m)) {
        // A flag per lane: the unmasked op, then the masked lanes filled.
        // SAFETY: the caller's contract.
        unsafe { softmax::<S, T>(p, x, None, out, alg, what)? };
        let ov = WorkView::new(out, p.perm.iter().copied());
        let value = masked::masked_value::<T>(what);
        let mut fill = Vec::new();
        fill.try_reserve_exact(p.n).map_err(|_| ExecError::Memory)?;
        fill.resize(p.n, value);
        let (n, inner) = (p.n, p.inner);
        for_each_flag_chunk(p, m, |l0, flags| {
            // Rows dense in out: filled where they are.
            let rows = (S::NATIVE && inner == 1)
                .then(|| ov.unit_run::<T>(l0 * n, flags.len() * n))
                .flatten();
            for (i, _) in flags.iter().enumerate().filter(|(_, &k)| k == 0) {
                let l = l0 + i;
                match rows {
                    // SAFETY: the chunk's rows of out (an array of S holds values of T),
                    // writeable; the lane is row i of the run.
                    Some(op) => unsafe {
                        std::slice::from_raw_parts_mut((op as *mut T).add(i * n), n).fill(value)
                    },
                    // SAFETY: out covers the planned shape and is writeable.
                    None => unsafe {
                        ov.scatter_step::<S>((l / inner) * n * inner + l % inner, inner, &fill)
                    },
                }
            }
        });
        return Ok(());
    }
    let inplace = x.same_view(out);
    let xb = direct_batch::<S>(p, mask);
    let ob = p.dense_out(out.layout());
    if let (Some(xb), Some(ob)) = (xb, ob) {
        let (x0, x1) = x.extent();
        let (o0, o1) = out.extent();
        let disjoint = x0 >= o1 || o0 >= x1;
        let lanes = column_lanes(p.n);
        if (inplace || disjoint) && (p.inner == 1 || p.inner <= lanes || p.n >= LONG_COLUMN) {
            // Column kernels keep per-lane parameters: run them a few slabs at a time.
            let step = if p.inner == 1 {
                p.outer
            } else {
                (lanes / p.inner).max(1)
            };
            let mut o = 0;
            while o < p.outer {
                let rows = step.min(p.outer - o);
                let sub = Batch { outer: rows, ..xb };
                let osub = Batch::contiguous(rows, p.n, p.inner);
                // SAFETY: slabs o..o+rows of the checked batches; x and out are the same
                // dense view (in place) or disjoint.
                unsafe {
                    if inplace {
                        let buf = slice_mut_of::<T>(out, &ob)?;
                        let buf = &mut buf[o * ob.outer_stride..][..osub.elements()];
                        kernels::softmax_like_inplace(buf, osub, alg, what)?;
                    } else {
                        let xs = slice_of::<T>(x, &xb)?;
                        let xs = &xs[o * xb.outer_stride..];
                        let os = slice_mut_of::<T>(out, &ob)?;
                        let os = &mut os[o * ob.outer_stride..][..osub.elements()];
                        kernels::softmax_like(xs, sub, alg, what, os)?;
                    }
                }
                o += rows;
            }
            return Ok(());
        }
    }
    // Masked columns of x and the mask where they are, out dense: the column kernel reads
    // them directly, a few slabs at a time (as the unmasked columns above).
    // SAFETY: the caller's contract.
    if let (Some((xs, ks, xb)), Some(ob)) = (unsafe { kept_columns::<S, T>(p, x, mask)? }, ob) {
        let (x0, x1) = x.extent();
        let (o0, o1) = out.extent();
        if (inplace || x0 >= o1 || o0 >= x1) && p.inner <= KEPT_COLUMN_LANES {
            let step = (KEPT_COLUMN_LANES / p.inner).max(1);
            let mut o = 0;
            while o < p.outer {
                let rows = step.min(p.outer - o);
                let sub = Batch { outer: rows, ..xb };
                // SAFETY: slabs o..o+rows of the checked batches; out is x itself or
                // disjoint from it, and shares no element with the mask (the caller's).
                unsafe {
                    let at = o * xb.outer_stride;
                    let op = out.data::<T>().add(o * ob.outer_stride);
                    let (xp, kp) = (xs.as_ptr().add(at), ks.as_ptr().add(at));
                    kernels::kept_column_softmax_like(xp, kp, sub, what, op);
                }
                o += rows;
            }
            return Ok(());
        }
    }
    let blocks = Blocks::new(p);
    let xv = WorkView::new(x, p.perm.iter().copied());
    let (mv, _rows) = mask_in_row_order(mask, p)?;
    let ov = WorkView::new(out, p.perm.iter().copied());
    // Blocks that write out directly stream as the kernels would over the whole batch.
    let stream = kernels::streams::<T>(&Batch::contiguous(p.outer, p.n, p.inner));
    if blocks.long_lanes() {
        // Rows dense in x, the mask and out: read and written where they are.
        let len = p.outer * p.n;
        let dense = mv
            .as_ref()
            .filter(|_| S::NATIVE && p.inner == 1 && alg != Algorithm::Online)
            .and_then(|mv| {
                Some((
                    xv.unit_run::<T>(0, len)?,
                    mv.unit_run::<u8>(0, len)?,
                    ov.unit_run::<T>(0, len)? as *mut T,
                ))
            });
        if let Some((xp, kp, op)) = dense {
            let batch = Batch::rows(p.outer, p.n);
            // SAFETY: `len` aligned elements of x and out (arrays of S hold values of T) and
            // mask bytes; out is writeable, shares no element with the mask, and is x itself
            // or disjoint from it.
            unsafe {
                masked::softmax_like_long_rows_in_place(xp, kp, op, batch, alg, what, stream)
            };
            return Ok(());
        }
        return for_each_long_lane::<S, T>(
            &blocks,
            2 * LONG_ROW_BLOCK,
            &xv,
            mv.as_ref(),
            alg,
            |start, buf, kbuf, state| {
                let (xs, os) = buf.split_at_mut(LONG_ROW_BLOCK);
                let mut k = 0;
                while k < blocks.n {
                    let len = LONG_ROW_BLOCK.min(blocks.n - k);
                    let at = start + k * blocks.inner;
                    // SAFETY: the views cover the planned shape; the lane is this task's own.
                    let keep = unsafe {
                        gather_chunk::<S, T>(&xv, mv.as_ref(), at, &blocks, xs, kbuf, len)
                    };
                    write_chunk(&xs[..len], &mut os[..len], state, what);
                    if let Some(keep) = keep {
                        masked::finish_masked_chunk(&mut os[..len], keep, what);
                    }
                    // SAFETY: as above; out is writeable.
                    unsafe { ov.scatter_step::<S>(at, blocks.inner, &os[..len]) };
                    k += len;
                }
            },
        );
    }
    let simd_level = crate::simd::level();
    let (mask_len, lanes) = match mv {
        Some(_) => (blocks.elements(), blocks.slabs * blocks.cols),
        None => (0, 0),
    };
    for_each_block::<T>(
        &blocks,
        T::from_f64(0.0),
        blocks.elements(),
        mask_len,
        lanes,
        |b, scratch, keep, states| {
            let (batch, o0, j0) = blocks.block(b);
            let buf = &mut scratch[..batch.elements()];
            if let Some(mv) = &mv {
                // A block dense in x, the mask and out (in the work order): hidden straight
                // into out and finished there, the mask read where it is.
                let len = batch.elements();
                let start = o0 * blocks.n * blocks.inner;
                let dense = (S::NATIVE && blocks.whole_slabs())
                    .then(|| Some((xv.unit_run::<T>(start, len)?, ov.unit_run::<T>(start, len)?)))
                    .flatten();
                let n = batch.n;
                let runs = dense
                    .filter(|_| masked::reads_rows_in_place::<T>(&batch, alg))
                    .and_then(|_| mask_runs(mv, start, batch.outer, n, keep));
                if let (Some((xp, op)), Some(runs)) = (dense, runs) {
                    for run in runs {
                        let sub = Batch::rows(run.rows, n);
                        // SAFETY: the run's rows of x and out (arrays of S hold values of T)
                        // and its mask rows, this block's own; out is writeable, shares no
                        // element with the mask, and is x itself or disjoint from it.
                        unsafe {
                            let (xr, or) = (xp.add(run.row * n), (op as *mut T).add(run.row * n));
                            let keep = (run.keep, run.lane);
                            masked::softmax_like_rows_in_place(
                                xr, keep, or, sub, alg, what, stream,
                            );
                        }
                    }
                    return Ok(());
                }
                let kp = dense.and_then(|_| mv.unit_run::<u8>(start, len));
                if let (Some((xp, op)), Some(kp)) = (dense, kp) {
                    let op = op as *mut T;
                    // SAFETY: `len` aligned elements of x and out (arrays of S hold values of
                    // T) and mask bytes, this block's own; out is writeable, shares no element
                    // with the mask, and is x itself or disjoint from it.
                    unsafe {
                        crate::simd::select_kept(simd_level, xp, kp, op, len, f64::NEG_INFINITY);
                        let (os, keep) = (
                            std::slice::from_raw_parts_mut(op, len),
                            std::slice::from_raw_parts(kp, len),
                        );
                        masked::softmax_like_masked(os, keep, batch, alg, what, states)?;
                    }
                    return Ok(());
                }
                let keep = &mut keep[..batch.elements()];
                gather_hidden::<S, T>(&blocks, o0, j0, &batch, &xv, Some(mv), buf, keep, true);
                masked::softmax_like_masked(buf, keep, batch, alg, what, states)?;
            } else {
                // SAFETY: the views cover the planned shape; this block's elements are its own.
                blocks.element_runs(o0, j0, &batch, |w, d, len| unsafe {
                    xv.gather_as::<S>(w, &mut buf[d..d + len])
                });
                kernels::softmax_like_inplace(buf, batch, alg, what)?;
            }
            // SAFETY: as above; out is writeable.
            blocks.element_runs(o0, j0, &batch, |w, d, len| unsafe {
                ov.scatter_as::<S>(w, &buf[d..d + len])
            });
            Ok(())
        },
    )
}

/// What a reduction writes per lane.
#[derive(Clone, Copy)]
pub(crate) enum LaneOut<'a> {
    /// `log(sum(exp))`, into an output of the kept axes.
    Logsumexp(&'a Raw),
    /// The `(max, excess)` states, into two float64 outputs of the kept axes.
    States(&'a Raw, &'a Raw),
}

/// A reduction of `x` (planned by `p`) over its lanes, of the elements `mask` keeps if one is
/// given (as in [`softmax`]). The outputs hold the kept axes, in the order `kept_axes` lists
/// them for the output arrays (`out_axes`: the output's axis for each kept axis of the work
/// order), and share no element with `x` or `mask`.
///
/// # Safety
/// `x`, `mask` and the outputs describe live arrays of the planned shapes (`x` and a
/// `Logsumexp` output of `S`, computed in `T`; `mask` of bytes; states in float64); outputs
/// are writeable.
pub(crate) unsafe fn reduce<S: Stored<Compute = T>, T: Real>(
    p: &Plan,
    x: &Raw,
    mask: Option<&Raw>,
    out_axes: &[usize],
    what: LaneOut<'_>,
    alg: Algorithm,
) -> Result<(), ExecError> {
    let count = p.outer * p.inner;
    if count == 0 {
        return Ok(());
    }
    if let Some(m) = mask.filter(|m| flags_lanes(p, m)) {
        // A flag per lane: the unmasked reduction, then the masked lanes' results set.
        // SAFETY: the caller's contract.
        unsafe { reduce::<S, T>(p, x, None, out_axes, what, alg)? };
        for_each_flag_chunk(p, m, |l0, flags| match what {
            LaneOut::Logsumexp(out) => {
                let ov = WorkView::new(out, out_axes.iter().copied());
                match ov.unit_run::<T>(l0, flags.len()).filter(|_| S::NATIVE) {
                    // SAFETY: the chunk's results (an array of S holds values of T), writeable.
                    Some(op) => unsafe {
                        let res = std::slice::from_raw_parts_mut(op as *mut T, flags.len());
                        masked::fill_masked(res, flags, T::NEG_INFINITY);
                    },
                    None => {
                        for (i, _) in flags.iter().enumerate().filter(|(_, &k)| k == 0) {
                            // SAFETY: out covers the kept shape and is writeable.
                            unsafe { ov.scatter_as::<S>(l0 + i, &[T::NEG_INFINITY]) };
                        }
                    }
                }
            }
            LaneOut::States(mx, ex) => {
                let mv = WorkView::new(mx, out_axes.iter().copied());
                let ev = WorkView::new(ex, out_axes.iter().copied());
                for (i, _) in flags.iter().enumerate().filter(|(_, &k)| k == 0) {
                    // SAFETY: the outputs cover the kept shape and are writeable.
                    unsafe { emit_states(&mv, &ev, l0 + i, &[LseState::EMPTY]) };
                }
            }
        });
        return Ok(());
    }
    let xb = direct_batch::<S>(p, mask);
    let (kv, _rows) = mask_in_row_order(mask, p)?;
    let mask_len = |blocks: &Blocks| if kv.is_some() { blocks.elements() } else { 0 };
    let view = |r: &Raw| WorkView::new(r, out_axes.iter().copied());
    // The output is dense C in the work order when its axes, taken in that order, step by
    // exactly the elements after them.
    let dense = |r: &Raw| -> bool {
        let mut expected = r.itemsize as isize;
        for &a in out_axes.iter().rev() {
            if r.shape[a] != 1 && r.strides[a] != expected {
                return false;
            }
            expected *= r.shape[a] as isize;
        }
        true
    };
    match what {
        LaneOut::Logsumexp(out) => {
            if let (Some(xb), true) = (xb, dense(out)) {
                // SAFETY: x holds the batch; out holds `count` dense elements, disjoint from x.
                unsafe {
                    let xs = slice_of::<T>(x, &xb)?;
                    let os = std::slice::from_raw_parts_mut(out.data::<T>(), count);
                    kernels::logsumexp(xs, xb, alg, os)?;
                }
                return Ok(());
            }
            let ov = view(out);
            // SAFETY: the caller's contract.
            if let Some((xs, ks, b)) = unsafe { kept_columns::<S, T>(p, x, mask)? } {
                let mut res: Vec<T> = Vec::new();
                res.try_reserve_exact(count)
                    .map_err(|_| ExecError::Memory)?;
                res.resize(count, T::from_f64(0.0));
                kernels::kept_column_logsumexp(xs, ks, b, &mut res)?;
                // SAFETY: out covers the kept shape and is writeable.
                unsafe { ov.scatter_as::<S>(0, &res) };
                return Ok(());
            }
            let blocks = Blocks::new(p);
            let xv = WorkView::new(x, p.perm.iter().copied());
            if blocks.long_lanes() {
                return for_each_long_lane::<S, T>(
                    &blocks,
                    LONG_ROW_BLOCK,
                    &xv,
                    kv.as_ref(),
                    alg,
                    |start, _, _, state| {
                        let v = [T::from_f64(state.logsumexp())];
                        // SAFETY: out covers the kept shape and is writeable.
                        unsafe { ov.scatter_as::<S>(lane_of(&blocks, start), &v) };
                    },
                );
            }
            let lanes = blocks.slabs * blocks.cols;
            for_each_block::<T>(
                &blocks,
                T::from_f64(0.0),
                blocks.elements() + lanes,
                mask_len(&blocks),
                0,
                |b, scratch, keep, _| {
                    let (batch, o0, j0) = blocks.block(b);
                    let (buf, res) = scratch.split_at_mut(blocks.elements());
                    let buf = &mut buf[..batch.elements()];
                    let res = &mut res[..batch.count()];
                    let (start, _) = blocks.result_run(o0, j0, &batch);
                    if let Some((xs, runs)) =
                        rows_in_place::<S, T>(&blocks, o0, j0, &batch, &xv, &kv, alg, keep)
                    {
                        for run in runs {
                            // SAFETY: the run's mask rows lie in the live mask.
                            let (xr, keep, sub) = unsafe { run.rows_of(xs, batch.n) };
                            let res = &mut res[run.row..run.row + run.rows];
                            masked::kept_row_logsumexp(xr, keep, sub, alg, buf, res)?;
                        }
                        // SAFETY: out covers the kept shape and is writeable.
                        unsafe { ov.scatter_as::<S>(start, res) };
                        return Ok(());
                    }
                    gather_hidden::<S, T>(
                        &blocks,
                        o0,
                        j0,
                        &batch,
                        &xv,
                        kv.as_ref(),
                        buf,
                        keep,
                        false,
                    );
                    kernels::logsumexp(buf, batch, alg, res)?;
                    // SAFETY: out covers the kept shape and is writeable.
                    unsafe { ov.scatter_as::<S>(start, res) };
                    Ok(())
                },
            )
        }
        LaneOut::States(mx, ex) => {
            let (mv, ev) = (view(mx), view(ex));
            // SAFETY: the caller's contract.
            if let Some((xs, ks, b)) = unsafe { kept_columns::<S, T>(p, x, mask)? } {
                kernels::kept_column_states(xs, ks, b, |l, s| {
                    // SAFETY: outputs cover the kept shape and are writeable; lanes l.. are
                    // this piece's own.
                    unsafe { emit_states(&mv, &ev, l, s) }
                })?;
                return Ok(());
            }
            let blocks = Blocks::new(p);
            let xv = WorkView::new(x, p.perm.iter().copied());
            if let Some(xb) = xb {
                // Direct: the kernel over slabs of lanes, states into a lane-sized scratch.
                let step = (BLOCK / p.inner.max(1)).max(1);
                let mut states: Vec<LseState> = Vec::new();
                states
                    .try_reserve_exact(step.min(p.outer) * p.inner)
                    .map_err(|_| ExecError::Memory)?;
                let mut o = 0;
                while o < p.outer {
                    let rows = step.min(p.outer - o);
                    let sub = Batch { outer: rows, ..xb };
                    states.clear();
                    states.resize(sub.count(), LseState::EMPTY);
                    // SAFETY: slabs o..o+rows of the checked batch.
                    unsafe {
                        let xs = &slice_of::<T>(x, &xb)?[o * xb.outer_stride..];
                        kernels::lse_states(xs, sub, alg, &mut states)?;
                        emit_states(&mv, &ev, o * p.inner, &states);
                    }
                    o += rows;
                }
                return Ok(());
            }
            if blocks.long_lanes() {
                return for_each_long_lane::<S, T>(
                    &blocks,
                    LONG_ROW_BLOCK,
                    &xv,
                    kv.as_ref(),
                    alg,
                    |start, _, _, state| {
                        // SAFETY: outputs cover the kept shape and are writeable.
                        unsafe { emit_states(&mv, &ev, lane_of(&blocks, start), &[state]) };
                    },
                );
            }
            let lanes = blocks.slabs * blocks.cols;
            for_each_block::<T>(
                &blocks,
                T::from_f64(0.0),
                blocks.elements(),
                mask_len(&blocks),
                lanes,
                |b, scratch, keep, states| {
                    let (batch, o0, j0) = blocks.block(b);
                    let buf = &mut scratch[..batch.elements()];
                    let states = &mut states[..batch.count()];
                    let (start, _) = blocks.result_run(o0, j0, &batch);
                    if let Some((xs, runs)) =
                        rows_in_place::<S, T>(&blocks, o0, j0, &batch, &xv, &kv, alg, keep)
                    {
                        for run in runs {
                            // SAFETY: the run's mask rows lie in the live mask.
                            let (xr, keep, sub) = unsafe { run.rows_of(xs, batch.n) };
                            let at = &mut states[run.row..run.row + run.rows];
                            masked::kept_row_states(xr, keep, sub, alg, buf, |r, s| at[r] = s)?;
                        }
                        // SAFETY: outputs cover the kept shape and are writeable.
                        unsafe { emit_states(&mv, &ev, start, states) };
                        return Ok(());
                    }
                    gather_hidden::<S, T>(
                        &blocks,
                        o0,
                        j0,
                        &batch,
                        &xv,
                        kv.as_ref(),
                        buf,
                        keep,
                        false,
                    );
                    kernels::lse_states(buf, batch, alg, states)?;
                    // SAFETY: outputs cover the kept shape and are writeable.
                    unsafe { emit_states(&mv, &ev, start, states) };
                    Ok(())
                },
            )
        }
    }
}

/// Whether `mask` keeps or masks each lane whole: the same along every reduced axis (an
/// `(R, 1)` mask over rows of `x`, say). Such a reduction is the unmasked one with the masked
/// lanes' results set ([`for_each_flag_chunk`]): nothing is staged, and a kept lane's
/// result is the unmasked one, as it is under a mask keeping its every element.
fn flags_lanes(p: &Plan, mask: &Raw) -> bool {
    let reduced = &p.perm[p.first..p.first + p.reduced];
    reduced
        .iter()
        .all(|&a| mask.shape[a] == 1 || mask.strides[a] == 0)
}

/// Lanes whose flags are read at once by [`for_each_flag_chunk`].
const FLAG_CHUNK: usize = 1 << 12;

/// `f(l0, flags)` for the chunks of lanes `l0..l0 + flags.len()` (in the work order of the
/// kept axes) with their flags under a per-lane mask ([`flags_lanes`]) that masks some lane
/// of the chunk, chunks in parallel (each writes its own lanes' results). `mask` describes a
/// live byte array of the planned shape (the callers' contract).
fn for_each_flag_chunk(p: &Plan, mask: &Raw, f: impl Fn(usize, &[u8]) + Sync + Send) {
    let kv = WorkView::new(mask, p.kept());
    let count = p.count();
    let chunk = |c: usize| {
        let l0 = c * FLAG_CHUNK;
        let len = FLAG_CHUNK.min(count - l0);
        let mut flags = [0u8; FLAG_CHUNK];
        // SAFETY: the mask covers the planned shape; its kept axes index every lane once.
        unsafe { kv.gather::<u8>(l0, &mut flags[..len]) };
        if flags[..len].iter().fold(false, |any, &k| any | (k == 0)) {
            f(l0, &flags[..len]);
        }
    };
    crate::parallel::for_each_piece(count.div_ceil(FLAG_CHUNK), FLAG_CHUNK * p.n, |cs| {
        cs.for_each(chunk)
    });
}

/// `x`, its mask and their batch, read where they are ([`kept_columns`]).
type KeptColumns<'a, T> = (&'a [T], &'a [u8], Batch);

/// `x` and the mask as slices where they are, and their batch, when a masked reduction over
/// columns (`inner > 1`) runs the column kernel on them directly
/// ([`kernels::kept_column_states`]): `x` holds `T` itself and is read where it is, and the
/// mask lies as `x` does (the same batch in the work order). Staging such columns block by
/// block would read a few elements of every row per block.
///
/// # Safety
/// `x` and `mask` describe live arrays of the planned shape (`x` of `S`, `mask` of bytes).
unsafe fn kept_columns<'a, S: Stored<Compute = T>, T: Real>(
    p: &Plan,
    x: &Raw,
    mask: Option<&Raw>,
) -> Result<Option<KeptColumns<'a, T>>, ExecError> {
    let (Some(mask), crate::plan::Access::Direct(xb)) = (mask, p.access) else {
        return Ok(None);
    };
    if !S::NATIVE || xb.inner < 2 || mask.itemsize != 1 || p.direct_batch(mask.layout()) != Some(xb)
    {
        return Ok(None);
    }
    // SAFETY: the caller's contract; both arrays hold the batch.
    unsafe {
        Ok(Some((
            slice_of::<T>(x, &xb)?,
            slice_of::<u8>(mask, &xb)?,
            xb,
        )))
    }
}

/// Bytes of the mask one task of [`mask_in_row_order`] moves at a time (at least 64 rows).
const ROW_ORDER_WINDOW: usize = 1 << 20;

/// The work view of a mask, with a mask stored transposed over rows too long for a block to
/// hold 16 of them ([`WorkView::transposed_rows`]: a Fortran-ordered mask over C-ordered rows
/// of more than 2048 elements) first copied into dense rows, windows of at least 64 rows
/// (about 1 MiB) at a time in parallel, then read as a mask with dense rows. Moved a block at
/// a time, such rows read a few bytes of each class's cache line per block. The copy (one
/// byte per element, the mask's own size) is returned beside the view, which points into it;
/// it comes from the allocator's zeroed pages ([`crate::error::try_zeroed_bytes`]), faulted
/// in by the parallel windows that write it rather than by a serial pass of zeros first.
/// Float32, 2 threads, `logsumexp` of 2^25 elements, ms: rows of 16384 copied 20.5
/// (unmasked 6.2; with a pass of zeros first, 39.1); a block at a time / copied, rows of
/// 4096 35.7 / 21.9, of 4000 22.3 / 13.9, of 2500 20.6 / 17.6, of 2048 20.7 / 24.4, of 2000
/// 13.1 / 14.9: rows of 2048 and shorter stay a block at a time, with no copy.
fn mask_in_row_order(
    mask: Option<&Raw>,
    p: &Plan,
) -> Result<(Option<WorkView>, Vec<u8>), ExecError> {
    let Some(kv) = mask.map(|m| WorkView::new(m, p.perm.iter().copied())) else {
        return Ok((None, Vec::new()));
    };
    let (n, rows) = (p.n, p.outer);
    if p.inner != 1 || n.saturating_mul(16) <= BLOCK || !kv.transposed_rows(n) {
        return Ok((Some(kv), Vec::new()));
    }
    let total = rows.checked_mul(n).ok_or(ExecError::Memory)?;
    // Every byte is written below: no pass of zeros first.
    let mut dense = crate::error::try_zeroed_bytes(total).map_err(|_| ExecError::Memory)?;
    let window = (ROW_ORDER_WINDOW / n).max(64);
    let out = parallel::SendPtr(dense.as_mut_ptr());
    parallel::for_each_piece(rows.div_ceil(window), window * n, |range| {
        for w in range {
            let (r0, r1) = (w * window, ((w + 1) * window).min(rows));
            // SAFETY: rows r0..r1 of the copy, this piece's own.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.ptr().add(r0 * n), (r1 - r0) * n) };
            // SAFETY: the view covers every row of the plan; its rows are stored transposed
            // (checked above), so every row is written.
            let moved = unsafe { kv.gather_transposed(r0 * n, n, dst) };
            debug_assert!(moved, "a transposed mask's rows were not moved");
        }
    });
    Ok((Some(WorkView::dense(dense.as_ptr(), total)), dense))
}

/// Rows `row..row + rows` of a block whose mask rows lie `lane` bytes apart from `keep`.
#[derive(Clone, Copy)]
struct MaskRun {
    row: usize,
    rows: usize,
    keep: *const u8,
    lane: usize,
}

impl MaskRun {
    /// The run's rows of the block `xs` (rows of `n`), its mask bytes with their row spacing,
    /// and its batch: the arguments of the masked row kernels.
    ///
    /// # Safety
    /// The run came from [`mask_runs`] over a live mask (and its scratch, still untouched),
    /// for the block `xs`.
    unsafe fn rows_of<'a, T>(&self, xs: &'a [T], n: usize) -> (&'a [T], (&'a [u8], usize), Batch) {
        let len = self.rows.saturating_sub(1) * self.lane + n;
        // SAFETY: the caller's contract: every mask row of the run lies in the array.
        let keep = unsafe { std::slice::from_raw_parts(self.keep, len) };
        let x = &xs[self.row * n..][..self.rows * n];
        (x, (keep, self.lane), Batch::rows(self.rows, n))
    }
}

/// The mask rows of the work elements `start..start + rows * n` (rows of `n`) as runs of
/// rows with evenly spaced mask rows: one run where the mask rows are dense, else a run for
/// each index of the dimensions above the innermost outer dimension (a mask broadcast along
/// it, as a key-padding mask over a batch of queries, has its rows 0 bytes apart). `None`
/// when a mask row is not `n` contiguous bytes or rows run backwards, unless the rows are
/// stored transposed ([`WorkView::gather_transposed`]): then they are moved into `scratch`
/// (at least `rows * n` bytes), one run.
fn mask_runs(
    kv: &WorkView,
    start: usize,
    rows: usize,
    n: usize,
    scratch: &mut [u8],
) -> Option<Vec<MaskRun>> {
    let dense = |keep: *const u8| {
        Some(vec![MaskRun {
            row: 0,
            rows,
            keep,
            lane: n,
        }])
    };
    // Transposed rows first: their test is a few compares, the unit-run test walks the rows.
    let staged = &mut scratch[..rows * n];
    // SAFETY: the view covers the block's rows (the caller's plan).
    if unsafe { kv.gather_transposed(start, n, staged) } {
        return dense(staged.as_ptr());
    }
    if let Some(keep) = kv.unit_run::<u8>(start, rows * n) {
        return dense(keep);
    }
    let (period, lane) = kv.row_run(n)?;
    let lane = usize::try_from(lane).ok()?;
    let (first, mut r) = (start / n.max(1), 0);
    let mut runs = Vec::new();
    while r < rows {
        let len = (period - (first + r) % period).min(rows - r);
        let keep = kv.unit_run::<u8>((first + r) * n, n)?;
        runs.push(MaskRun {
            row: r,
            rows: len,
            keep,
            lane,
        });
        r += len;
    }
    Some(runs)
}

/// The block `(o0, j0, batch)` of `x` as a slice where it is and its mask rows as runs
/// ([`mask_runs`]), when the reduction can read its rows in place
/// ([`masked::reads_rows_in_place`]): a mask is given, the block is one aligned unit-stride
/// run of `x`, its mask rows are runs of `n` bytes (or stored transposed, then moved into
/// `scratch`), and `x` holds `T` itself.
#[allow(clippy::too_many_arguments)]
fn rows_in_place<'a, S: Stored<Compute = T>, T: Real>(
    blocks: &Blocks,
    o0: usize,
    j0: usize,
    batch: &Batch,
    xv: &'a WorkView,
    kv: &'a Option<WorkView>,
    alg: Algorithm,
    scratch: &mut [u8],
) -> Option<(&'a [T], Vec<MaskRun>)> {
    let kv = kv.as_ref()?;
    if !S::NATIVE || !masked::reads_rows_in_place::<T>(batch, alg) {
        return None;
    }
    let (mut runs, mut first) = (0, None);
    blocks.element_runs(o0, j0, batch, |w, d, len| {
        runs += 1;
        first = Some((w, d, len));
    });
    let (w, d, len) = first?;
    if runs != 1 || d != 0 || len != batch.elements() {
        return None;
    }
    let xp = xv.unit_run::<T>(w, len)?;
    let masks = mask_runs(kv, w, batch.outer, batch.n, scratch)?;
    // SAFETY: `len` aligned elements of x (an array of S holds values of T), live for the
    // call that planned the views, only read.
    Some((unsafe { std::slice::from_raw_parts(xp, len) }, masks))
}

/// Gathers the block of `x` of `(o0, j0, batch)` into `buf`; with a mask `mv`, its masked
/// elements hidden (`-inf`: see `kernels::masked`) and the mask block into `keep` when
/// `need_keep` (else `keep` is scratch). A run that is dense in both `x` and the mask is read
/// where it is, one select over both arrays. Without a mask `keep` is not touched.
#[allow(clippy::too_many_arguments)]
fn gather_hidden<S: Stored<Compute = T>, T: Real>(
    blocks: &Blocks,
    o0: usize,
    j0: usize,
    batch: &Batch,
    xv: &WorkView,
    mv: Option<&WorkView>,
    buf: &mut [T],
    keep: &mut [u8],
    need_keep: bool,
) {
    let Some(mv) = mv else {
        // SAFETY: the view covers the planned shape; this block's elements are its own.
        blocks.element_runs(o0, j0, batch, |w, d, len| unsafe {
            xv.gather_as::<S>(w, &mut buf[d..d + len])
        });
        return;
    };
    let level = crate::simd::level();
    blocks.element_runs(o0, j0, batch, |w, d, len| {
        let (run, kr) = (&mut buf[d..d + len], &mut keep[d..d + len]);
        if !need_keep && S::NATIVE {
            if let (Some(xp), Some(kp)) = (xv.unit_run::<T>(w, len), mv.unit_run::<u8>(w, len)) {
                let ninf = f64::NEG_INFINITY;
                // SAFETY: `len` aligned elements of x (an array of S holds values of T) and
                // `len` mask bytes; `run` is this block's own scratch.
                unsafe { crate::simd::select_kept(level, xp, kp, run.as_mut_ptr(), len, ninf) };
                return;
            }
        }
        // SAFETY: the views cover the planned shape; this block's elements are its own.
        unsafe {
            let rows = blocks.whole_slabs() && blocks.inner == 1;
            if !(rows && mv.gather_transposed(w, blocks.n, kr)) {
                mv.gather(w, kr);
            }
            xv.gather_hidden::<S>(w, kr, run);
        }
    });
}

/// Gathers `len` elements of a lane from work index `at` (stepping over the inner lanes) into
/// `xs`, and with a mask the mask chunk into `keep`, hiding the masked elements of `xs`;
/// returns the mask chunk.
///
/// # Safety
/// The views cover the planned shape; `xs` and `keep` hold at least `len` elements.
unsafe fn gather_chunk<'k, S: Stored<Compute = T>, T: Real>(
    xv: &WorkView,
    mv: Option<&WorkView>,
    at: usize,
    blocks: &Blocks,
    xs: &mut [T],
    keep: &'k mut [u8],
    len: usize,
) -> Option<&'k [u8]> {
    let Some(mv) = mv else {
        // SAFETY: the caller's contract.
        unsafe { xv.gather_step::<S>(at, blocks.inner, &mut xs[..len]) };
        return None;
    };
    let keep = &mut keep[..len];
    if blocks.inner == 1 {
        // SAFETY: the caller's contract.
        unsafe {
            mv.gather(at, keep);
            xv.gather_hidden::<S>(at, keep, &mut xs[..len]);
        }
        return Some(keep);
    }
    // SAFETY: the caller's contract.
    unsafe { xv.gather_step::<S>(at, blocks.inner, &mut xs[..len]) };
    for (i, k) in keep.iter_mut().enumerate() {
        // SAFETY: the caller's contract (a lane across columns, `inner` apart).
        unsafe { mv.gather(at + i * blocks.inner, std::slice::from_mut(k)) };
    }
    masked::hide_masked(&mut xs[..len], keep);
    Some(keep)
}

/// Lanes longer than a block, each streamed twice through a block-sized buffer: its state
/// from the states of its chunks (the kernels' merge rule; with a mask, of the kept elements),
/// then `f(first work index, buffer, mask buffer, state)`. Lanes run in parallel, each task
/// with its own buffer of `scratch` elements (and `LONG_ROW_BLOCK` mask bytes with a mask).
fn for_each_long_lane<S: Stored<Compute = T>, T: Real>(
    blocks: &Blocks,
    scratch: usize,
    xv: &WorkView,
    mv: Option<&WorkView>,
    alg: Algorithm,
    f: impl Fn(usize, &mut [T], &mut [u8], LseState) + Sync + Send,
) -> Result<(), ExecError> {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let lanes = blocks.outer * blocks.inner;
    let mask_len = if mv.is_some() { LONG_ROW_BLOCK } else { 0 };
    parallel::for_each_piece(lanes, blocks.n, |range| {
        let mut buf: Vec<T> = Vec::new();
        let mut keep: Vec<u8> = Vec::new();
        if buf.try_reserve_exact(scratch.max(LONG_ROW_BLOCK)).is_err()
            || keep.try_reserve_exact(mask_len).is_err()
        {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        buf.resize(scratch.max(LONG_ROW_BLOCK), T::from_f64(0.0));
        keep.resize(mask_len, 0);
        for l in range {
            let (o, j) = (l / blocks.inner, l % blocks.inner);
            let start = o * blocks.n * blocks.inner + j;
            let mut state = LseState::EMPTY;
            let mut k = 0;
            while k < blocks.n {
                let len = LONG_ROW_BLOCK.min(blocks.n - k);
                let at = start + k * blocks.inner;
                // SAFETY: the views cover the planned shape; the buffers hold a chunk.
                unsafe { gather_chunk::<S, T>(xv, mv, at, blocks, &mut buf, &mut keep, len) };
                state = state.merge(kernels::row_state(&buf[..len], alg));
                k += len;
            }
            f(start, &mut buf, &mut keep, state);
        }
    });
    if failed.into_inner() {
        Err(ExecError::Memory)
    } else {
        Ok(())
    }
}

/// The `(outer, inner)` lane whose first element is work index `start`.
fn lane_of(blocks: &Blocks, start: usize) -> usize {
    let (o, j) = (start / (blocks.n * blocks.inner), start % blocks.inner);
    o * blocks.inner + j
}

/// Softmax or log_softmax of one chunk of a lane whose finished state is `state`, as the
/// kernels write a row ([`kernels::write_row`]: the same bits).
fn write_chunk<T: Real>(x: &[T], out: &mut [T], state: LseState, what: Reduction) {
    let n = x.len().min(out.len());
    // SAFETY: both slices hold n elements and are distinct; the process's level is available.
    unsafe {
        kernels::write_row(
            crate::simd::level(),
            (x.as_ptr(), std::ptr::null()),
            out.as_mut_ptr(),
            n,
            state,
            what,
            false,
        )
    }
}

/// # Safety
/// The views describe live, writeable float64 arrays covering `start..start + states.len()`.
unsafe fn emit_states(mv: &WorkView, ev: &WorkView, start: usize, states: &[LseState]) {
    let mut tmp = [0f64; 64];
    for (c, chunk) in states.chunks(64).enumerate() {
        let at = start + c * 64;
        for (t, s) in tmp.iter_mut().zip(chunk) {
            *t = s.max;
        }
        // SAFETY: the caller's contract.
        unsafe { mv.scatter(at, &tmp[..chunk.len()]) };
        for (t, s) in tmp.iter_mut().zip(chunk) {
            *t = s.excess;
        }
        // SAFETY: the caller's contract.
        unsafe { ev.scatter(at, &tmp[..chunk.len()]) };
    }
}
