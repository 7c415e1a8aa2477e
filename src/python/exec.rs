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
use crate::kernels::{self, scalar, Algorithm, Reduction, LONG_ROW_BLOCK};
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

    /// Copies work elements `start..start + dst.len()` into `dst`.
    ///
    /// # Safety
    /// The view describes a live array of `T` that covers those elements.
    pub unsafe fn gather<T: Copy>(&self, start: usize, dst: &mut [T]) {
        let mut at = 0usize;
        self.runs(start, dst.len(), |off, stride, len| {
            // SAFETY: the run lies inside the array (caller's contract); its elements may be
            // unaligned (a view of a byte buffer).
            unsafe { read_run(self.base.offset(off), stride, &mut dst[at..at + len]) };
            at += len;
        });
    }

    /// As [`WorkView::gather`] from an array of `S`, widened to its compute type.
    ///
    /// # Safety
    /// The view describes a live array of `S` that covers those elements.
    pub unsafe fn gather_as<S: Stored>(&self, start: usize, dst: &mut [S::Compute]) {
        let mut at = 0usize;
        self.runs(start, dst.len(), |off, stride, len| {
            // SAFETY: as in gather.
            unsafe { S::widen_run(self.base.offset(off), stride, &mut dst[at..at + len]) };
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
        self.runs(start, src.len(), |off, stride, len| {
            // SAFETY: as in gather.
            unsafe { write_run(&src[at..at + len], self.base.offset(off), stride) };
            at += len;
        });
    }

    /// As [`WorkView::scatter`] into an array of `S`, rounded from its compute type.
    ///
    /// # Safety
    /// As [`WorkView::scatter`], for an array of `S`.
    pub unsafe fn scatter_as<S: Stored>(&self, start: usize, src: &[S::Compute]) {
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
                slabs: (BLOCK / slab).max(1),
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

/// Runs `f(block, elements, states)` over every block, in parallel pieces that each own one
/// scratch of `elements` values and one of `states` lane states; a failed allocation is
/// `ExecError::Memory`.
fn for_each_block<S: Copy + Send + Sync>(
    blocks: &Blocks,
    zero: S,
    elements: usize,
    states: usize,
    f: impl Fn(usize, &mut [S], &mut [LseState]) -> Result<(), ExecError> + Sync + Send,
) -> Result<(), ExecError> {
    let failed = std::sync::Mutex::new(None::<ExecError>);
    let fail = |e: ExecError| *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    // About eight blocks per piece: one allocation serves several blocks.
    parallel::for_each_piece(blocks.count(), parallel::GRAIN_ELEMENTS / 8, |range| {
        let mut scratch: Vec<S> = Vec::new();
        let mut st: Vec<LseState> = Vec::new();
        if scratch.try_reserve_exact(elements).is_err() || st.try_reserve_exact(states).is_err() {
            return fail(ExecError::Memory);
        }
        scratch.resize(elements, zero);
        st.resize(states, LseState::EMPTY);
        for b in range {
            if let Err(e) = f(b, &mut scratch, &mut st) {
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

/// Softmax or log_softmax of `x` (planned by `p`) into `out` (same shape; `out` may be `x`
/// itself, or share no element with it). Arrays of a 16-bit `S` are computed in `T` block by
/// block (the kernels never read them where they are; in place works as for any blocked plan).
///
/// # Safety
/// `x` and `out` describe live arrays of `S` of the planned shape; `out` is writeable; they
/// are the same view or share no element.
pub(crate) unsafe fn softmax<S: Stored<Compute = T>, T: Real>(
    p: &Plan,
    x: &Raw,
    out: &Raw,
    alg: Algorithm,
    what: Reduction,
) -> Result<(), ExecError> {
    if p.outer * p.n * p.inner == 0 {
        return Ok(());
    }
    let inplace = x.same_view(out);
    let xb = match p.access {
        crate::plan::Access::Direct(b) if S::NATIVE => Some(b),
        _ => None,
    };
    let ob = p.dense_out(out.layout());
    if let (Some(xb), Some(ob)) = (xb, ob) {
        let (x0, x1) = x.extent();
        let (o0, o1) = out.extent();
        let disjoint = x0 >= o1 || o0 >= x1;
        if (inplace || disjoint) && (p.inner == 1 || p.inner <= COLUMN_LANES) {
            // Column kernels keep per-lane parameters: run them a few slabs at a time.
            let step = if p.inner == 1 {
                p.outer
            } else {
                (COLUMN_LANES / p.inner).max(1)
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
    let blocks = Blocks::new(p);
    let xv = WorkView::new(x, p.perm.iter().copied());
    let ov = WorkView::new(out, p.perm.iter().copied());
    if blocks.long_lanes() {
        return for_each_long_lane::<S, T>(
            &blocks,
            2 * LONG_ROW_BLOCK,
            &xv,
            alg,
            |start, buf, state| {
                let (xs, os) = buf.split_at_mut(LONG_ROW_BLOCK);
                let mut k = 0;
                while k < blocks.n {
                    let len = LONG_ROW_BLOCK.min(blocks.n - k);
                    let at = start + k * blocks.inner;
                    // SAFETY: the views cover the planned shape; the lane is this task's own.
                    unsafe { xv.gather_step::<S>(at, blocks.inner, &mut xs[..len]) };
                    write_chunk(&xs[..len], &mut os[..len], state, what);
                    // SAFETY: as above; out is writeable.
                    unsafe { ov.scatter_step::<S>(at, blocks.inner, &os[..len]) };
                    k += len;
                }
            },
        );
    }
    for_each_block::<T>(
        &blocks,
        T::from_f64(0.0),
        blocks.elements(),
        0,
        |b, scratch, _| {
            let (batch, o0, j0) = blocks.block(b);
            let buf = &mut scratch[..batch.elements()];
            // SAFETY: the views cover the planned shape; this block's elements are its own.
            blocks.element_runs(o0, j0, &batch, |w, d, len| unsafe {
                xv.gather_as::<S>(w, &mut buf[d..d + len])
            });
            kernels::softmax_like_inplace(buf, batch, alg, what)?;
            // SAFETY: as above; out is writeable.
            blocks.element_runs(o0, j0, &batch, |w, d, len| unsafe {
                ov.scatter_as::<S>(w, &buf[d..d + len])
            });
            Ok(())
        },
    )
}

/// What a reduction writes per lane.
pub(crate) enum LaneOut<'a> {
    /// `log(sum(exp))`, into an output of the kept axes.
    Logsumexp(&'a Raw),
    /// The `(max, excess)` states, into two float64 outputs of the kept axes.
    States(&'a Raw, &'a Raw),
}

/// A reduction of `x` (planned by `p`) over its lanes. The outputs hold the kept axes, in the
/// order `kept_axes` lists them for the output arrays (`out_axes`: the output's axis for each
/// kept axis of the work order), and share no element with `x`.
///
/// # Safety
/// `x` and the outputs describe live arrays of the planned shapes (`x` and a `Logsumexp`
/// output of `S`, computed in `T`; states in float64); outputs are writeable.
pub(crate) unsafe fn reduce<S: Stored<Compute = T>, T: Real>(
    p: &Plan,
    x: &Raw,
    out_axes: &[usize],
    what: LaneOut<'_>,
    alg: Algorithm,
) -> Result<(), ExecError> {
    let count = p.outer * p.inner;
    if count == 0 {
        return Ok(());
    }
    let xb = match p.access {
        crate::plan::Access::Direct(b) if S::NATIVE => Some(b),
        _ => None,
    };
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
            let blocks = Blocks::new(p);
            let xv = WorkView::new(x, p.perm.iter().copied());
            if blocks.long_lanes() {
                return for_each_long_lane::<S, T>(
                    &blocks,
                    LONG_ROW_BLOCK,
                    &xv,
                    alg,
                    |start, _, state| {
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
                0,
                |b, scratch, _| {
                    let (batch, o0, j0) = blocks.block(b);
                    let (buf, res) = scratch.split_at_mut(blocks.elements());
                    let buf = &mut buf[..batch.elements()];
                    let res = &mut res[..batch.count()];
                    // SAFETY: the view covers the planned shape.
                    blocks.element_runs(o0, j0, &batch, |w, d, len| unsafe {
                        xv.gather_as::<S>(w, &mut buf[d..d + len])
                    });
                    kernels::logsumexp(buf, batch, alg, res)?;
                    let (start, _) = blocks.result_run(o0, j0, &batch);
                    // SAFETY: out covers the kept shape and is writeable.
                    unsafe { ov.scatter_as::<S>(start, res) };
                    Ok(())
                },
            )
        }
        LaneOut::States(mx, ex) => {
            let (mv, ev) = (view(mx), view(ex));
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
                    alg,
                    |start, _, state| {
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
                lanes,
                |b, scratch, states| {
                    let (batch, o0, j0) = blocks.block(b);
                    let buf = &mut scratch[..batch.elements()];
                    let states = &mut states[..batch.count()];
                    // SAFETY: the view covers the planned shape.
                    blocks.element_runs(o0, j0, &batch, |w, d, len| unsafe {
                        xv.gather_as::<S>(w, &mut buf[d..d + len])
                    });
                    kernels::lse_states(buf, batch, alg, states)?;
                    let (start, _) = blocks.result_run(o0, j0, &batch);
                    // SAFETY: outputs cover the kept shape and are writeable.
                    unsafe { emit_states(&mv, &ev, start, states) };
                    Ok(())
                },
            )
        }
    }
}

/// Lanes longer than a block, each streamed twice through a block-sized buffer: its state
/// from the states of its chunks (the kernels' merge rule), then `f(first work index, buffer,
/// state)`. Lanes run in parallel, each task with its own buffer of `scratch` elements.
fn for_each_long_lane<S: Stored<Compute = T>, T: Real>(
    blocks: &Blocks,
    scratch: usize,
    xv: &WorkView,
    alg: Algorithm,
    f: impl Fn(usize, &mut [T], LseState) + Sync + Send,
) -> Result<(), ExecError> {
    let failed = std::sync::atomic::AtomicBool::new(false);
    let lanes = blocks.outer * blocks.inner;
    parallel::for_each_piece(lanes, blocks.n, |range| {
        let mut buf: Vec<T> = Vec::new();
        if buf.try_reserve_exact(scratch.max(LONG_ROW_BLOCK)).is_err() {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        buf.resize(scratch.max(LONG_ROW_BLOCK), T::from_f64(0.0));
        for l in range {
            let (o, j) = (l / blocks.inner, l % blocks.inner);
            let start = o * blocks.n * blocks.inner + j;
            let mut state = LseState::EMPTY;
            let mut k = 0;
            while k < blocks.n {
                let len = LONG_ROW_BLOCK.min(blocks.n - k);
                let chunk = &mut buf[..len];
                // SAFETY: the view covers the planned shape.
                unsafe { xv.gather_step::<S>(start + k * blocks.inner, blocks.inner, chunk) };
                state = state.merge(kernels::row_state(chunk, alg));
                k += len;
            }
            f(start, &mut buf, state);
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

/// Softmax or log_softmax of one chunk of a lane whose finished state is `state`: the
/// kernels' exp-scale pass for a finite softmax, the reference writers otherwise.
fn write_chunk<T: Real>(x: &[T], out: &mut [T], state: LseState, what: Reduction) {
    if what == Reduction::Softmax && state.max.is_finite() {
        kernels::row_exp_scaled(x, state.max, 1.0 / state.total(), out);
        return;
    }
    let n = x.len().min(out.len());
    // SAFETY: both slices hold n elements and are distinct.
    unsafe {
        match what {
            Reduction::Softmax => {
                scalar::softmax_write(x.as_ptr(), 0, 1, out.as_mut_ptr(), 0, 1, n, state)
            }
            Reduction::LogSoftmax => {
                scalar::log_softmax_write(x.as_ptr(), 0, 1, out.as_mut_ptr(), 0, 1, n, state)
            }
        }
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
