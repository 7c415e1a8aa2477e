//! Short rows (`n <= SHORT_ROW`), written once over [`Lanes`]: `N` rows per vector, one row
//! in each lane, so a group of rows needs no horizontal reduction and no per-row tail.
//!
//! A group's columns are loaded into registers (transposed where the level can), its states
//! computed lane-wise, and softmax / log_softmax written back from the same columns (the
//! exps of the state pass are reused: `softmax = exp(x - max) / S`). Rows whose max is not
//! finite or whose sum is NaN are flagged and redone by the scalar reference, which owns the
//! NaN/inf semantics.

use super::lanes::{load_columns_of_bits, reference_state, Lanes};
use super::rows::{self, map_row, select_kept, ExpScaled, ShiftSub, AHEAD_BYTES};
use super::{scalar, SHORT_ROW};
use crate::real::Real;
use crate::state::LseState;
use std::mem::MaybeUninit;

/// What the state pass leaves in the column buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// The inputs.
    Input,
    /// `exp(x - max)` (softmax).
    Exp,
    /// `x - max` (log_softmax).
    Shift,
}

/// A `where=` mask over short rows, read in place: class `k` of row `r` is kept when
/// `keep[r * lane + k * class] != 0`, else it reads as `-inf` (the value a staged copy of the
/// row would hold). Strides may be 0 (one mask row for every row, one flag per row).
#[derive(Clone, Copy)]
pub(crate) struct RowMask {
    pub(crate) keep: *const u8,
    pub(crate) lane: usize,
    pub(crate) class: usize,
    /// The bytes readable from `keep` (at least the rows' own): whether a row's 8-byte word
    /// may be read on past a row of fewer classes.
    pub(crate) bytes: usize,
}

impl RowMask {
    /// The mask of classes `c0..c0 + w` (`w <= 8`) of rows `0..rows` (`rows <= 8`), transposed
    /// byte by byte: bit `r` of byte `k` is set when row `r` keeps class `c0 + k`. For the
    /// masks that [`Lanes::load_columns_kept`] cannot read a word a row: rows under 8 classes
    /// at the mask's end, one flag a row, or classes apart in the mask.
    ///
    /// # Safety
    /// Mask bytes of classes `c0..c0 + w` of rows `0..rows` readable.
    #[inline(always)]
    unsafe fn columns(self, rows: usize, c0: usize, w: usize) -> u64 {
        // SAFETY: every read is a mask byte of class c0..c0 + w of a row < rows.
        unsafe {
            let flag = |r: usize, k: usize| -> u64 {
                u64::from(*self.keep.add(r * self.lane + (c0 + k) * self.class) != 0)
            };
            match self.class {
                // One flag for every class of a row.
                0 => (0..rows).fold(0, |v, r| v | (flag(r, 0) << r)) * 0x0101_0101_0101_0101,
                _ => (0..rows).fold(0, |v, r| {
                    (0..w).fold(v, |v, k| v | (flag(r, k) << (8 * k + r)))
                }),
            }
        }
    }
}

/// Where the short rows of a kernel lie: rows of `n` elements (the kernel's row length)
/// `pitch` apart, or ragged rows of their own lengths.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a, T> {
    /// Row `r` at `x + r * pitch`.
    Pitched { x: *const T, pitch: usize },
    /// Row `r` at `x + start[r]`, holding `len[r] <= n` elements: its columns past `len[r]`
    /// read as `-inf` (as a copy padded with `-inf` would), and a group of rows runs only
    /// up to its longest row. Elements `start[r]..start[r] + n` must be readable for every
    /// row; those past the row's own are loaded and discarded, never used.
    Ragged {
        x: *const T,
        start: &'a [usize],
        len: &'a [u8],
    },
}

impl<'a, T: Copy> Rows<'a, T> {
    /// Rows `r..r + g` (`g <= 8`) of `rows` rows of `n` elements, as a [`Group`].
    #[inline(always)]
    fn group(self, r: usize, g: usize, n: usize, rows: usize) -> Group<'a, T> {
        match self {
            Rows::Pitched { x, pitch } => {
                Group::pitched(x.wrapping_add(r * pitch), pitch, g, n, rows - r)
            }
            Rows::Ragged { x, start, len } => {
                let len = &len[r..r + g];
                Group {
                    at: Rows::Ragged {
                        x,
                        start: &start[r..r + g],
                        len,
                    },
                    rows: g,
                    n: len.iter().fold(0, |a, &b| a.max(b as usize)),
                    room: n,
                    ahead: (std::ptr::null(), 0),
                    ahead_out: std::ptr::null(),
                }
            }
        }
    }

    /// Row `k`'s start (for a ragged `k` past the rows, `x`: a lane that is not read).
    #[inline(always)]
    fn row(self, k: usize) -> *const T {
        match self {
            Rows::Pitched { x, pitch } => x.wrapping_add(k * pitch),
            Rows::Ragged { x, start, .. } => start.get(k).map_or(x, |&s| x.wrapping_add(s)),
        }
    }

    /// Hints the group of rows after rows `r..r + g` into L1 (`left` rows follow them):
    /// returns it as a span for `grp` to hint as it loads its columns where the rows are
    /// dense, else hints it now; ragged rows are hinted by their caller.
    #[inline(always)]
    fn prefetch_next<L: Lanes>(
        self,
        grp: &mut Group<'_, T>,
        r: usize,
        g: usize,
        n: usize,
        left: usize,
    ) {
        if let Rows::Pitched { x, pitch } = self {
            next_group::<L, T>(grp, x.wrapping_add(r * pitch), g, n, pitch, left);
        }
    }
}

/// Up to 8 short rows of a group: its [`Rows`], from the group's first row.
#[derive(Clone, Copy)]
struct Group<'a, T> {
    at: Rows<'a, T>,
    /// The rows present (the lanes past them read as `-inf`).
    rows: usize,
    /// The columns the group runs: its rows' length, or its longest ragged row's.
    n: usize,
    /// Elements readable from each row's start (at least `n`): a load may read whole
    /// vectors within it.
    room: usize,
    /// Bytes to hint into L1 while the group's columns are loaded (the next group's span),
    /// a share of them at each column block: `(start, bytes)`, 0 bytes for none; and the
    /// start of as many bytes of output to hint beside them (null for none), so that the
    /// next group's stores find their lines.
    ahead: (*const u8, usize),
    ahead_out: *const u8,
}

impl<T: Copy> Group<'_, T> {
    /// `rows` rows of `n` elements `pitch` apart from `x`, of `span` rows (at least `rows`)
    /// readable from `x`.
    #[inline(always)]
    fn pitched(x: *const T, pitch: usize, rows: usize, n: usize, span: usize) -> Self {
        Group {
            at: Rows::Pitched { x, pitch },
            rows,
            n,
            // From the start of the group's last row to the end of the span's.
            room: (span - rows) * pitch + n,
            ahead: (std::ptr::null(), 0),
            ahead_out: std::ptr::null(),
        }
    }

    /// Row `k`'s start.
    #[inline(always)]
    fn row(&self, k: usize) -> *const T {
        self.at.row(k)
    }

    /// Row `k`'s own length.
    #[inline(always)]
    fn len_of(&self, k: usize) -> usize {
        match self.at {
            Rows::Pitched { .. } => self.n,
            Rows::Ragged { len, .. } => len[k] as usize,
        }
    }
}

/// A bit for each of the first `rows` lanes (`rows <= 8`).
#[inline(always)]
fn row_bits(rows: usize) -> u8 {
    (0xFFu16 >> (8 - rows.min(8))) as u8
}

/// One column of a sum with the ties apart: `e` into `below` where `summed` (the lane is off
/// the max and [`Lanes::summable`] keeps it), and `other` (off the max) counted. Both adds take
/// their masks as they are (masked adds, no inversion or blend).
#[inline(always)]
fn split_step<L: Lanes>(
    l: L,
    (below, others): (L::V, L::V),
    other: L::M,
    summed: L::M,
    e: L::V,
) -> (L::V, L::V) {
    (
        l.masked_add(below, summed, e),
        l.masked_add(others, other, l.splat(1.0)),
    )
}

/// `(max, excess)` lanes of up to `N` short rows (`grp.rows` of them valid; with `mask`,
/// their masked classes read as `-inf`) and a bit per row to redo with the reference;
/// `buf[k]` is left holding column `k` as `keep` says, for `k < grp.n`.
///
/// # Safety
/// Elements `0..grp.n` of the group's rows readable, and their mask bytes;
/// `grp.n <= buf.len()`.
#[inline(always)]
unsafe fn group_state<L: Lanes, T: Real>(
    l: L,
    grp: Group<'_, T>,
    buf: &mut [MaybeUninit<L::V>],
    keep: Keep,
    mask: Option<RowMask>,
) -> (L::V, L::V, u8) {
    let (n, rows) = (grp.n, grp.rows.min(L::N));
    // A ragged row's lanes past its length read as -inf.
    // A ragged group's row starts, taken once for all its columns.
    let ragged = match grp.at {
        Rows::Ragged { len, .. } => {
            let mut a = [0.0; 8];
            for (v, &k) in a.iter_mut().zip(len) {
                *v = k as f64;
            }
            let row: [*const T; 8] = super::array8(|i| grp.row(i));
            Some((l.of_lanes(&a), row))
        }
        Rows::Pitched { .. } => None,
    };
    let ninf = l.splat(f64::NEG_INFINITY);
    let blocks = n.div_ceil(L::N);
    for c0 in (0..n).step_by(L::N) {
        let w = (n - c0).min(L::N);
        if grp.ahead.1 > 0 {
            // This block's share of the hinted span: a few lines per block rather than the
            // whole span at once, which would queue behind the block's own loads.
            let (j, bytes) = (c0 / L::N, grp.ahead.1);
            let (lo, hi) = (bytes * j / blocks, bytes * (j + 1) / blocks);
            super::prefetch_span(grp.ahead.0.wrapping_add(lo), hi - lo);
            if !grp.ahead_out.is_null() {
                super::prefetch_span(grp.ahead_out.wrapping_add(lo), hi - lo);
            }
        }
        // SAFETY: the caller's contract; buf holds n entries or more. A full group
        // passes the constant N, so the per-row checks of the load fold away.
        unsafe {
            if let Some((len, row)) = ragged {
                // Loaded into registers and blended there: a blend of what buf holds would
                // compile to a masked store, slow on some cores.
                let mut cols = [MaybeUninit::<L::V>::uninit(); 8];
                let room = grp.room - c0;
                l.load_columns(|i| row[i].wrapping_add(c0), rows, 0, w, room, &mut cols);
                for (k, c) in cols.iter().enumerate().take(w) {
                    let inside = l.gt(len, l.splat((c0 + k) as f64));
                    buf[c0 + k].write(l.select(inside, c.assume_init(), ninf));
                }
            } else if let Some(mask) = mask {
                let row = |i: usize| grp.row(i);
                let room = grp.room - c0;
                // A row of fewer than 8 classes reads its word on into the rows after it
                // (the bytes past its classes are not used) where the mask holds them.
                let words = n >= 8 || (rows - 1) * mask.lane + 8 <= mask.bytes;
                if mask.class == 1 && words {
                    // Each row's 8 mask bytes from class c0, or its last 8 with the classes
                    // before c0 skipped.
                    let (start, skip) = if c0 + 8 <= n.max(8) {
                        (c0, 0)
                    } else {
                        (n - 8, c0 + 8 - n)
                    };
                    let words = (mask.keep.add(start), mask.lane, skip);
                    l.load_columns_kept(row, rows, c0, w, room, words, buf);
                } else {
                    let bits = mask.columns(rows, c0, w);
                    load_columns_of_bits(l, row, rows, c0, w, room, bits, buf);
                }
            } else {
                let row = |i: usize| grp.row(i);
                let room = grp.room - c0;
                if rows == L::N {
                    l.load_columns(row, L::N, c0, w, room, buf);
                } else {
                    l.load_columns(row, rows, c0, w, room, buf);
                }
            }
        }
    }
    // Four running maxima, so the compares overlap rather than wait on each other. The max
    // of a row without NaN is the same in any order; a row with a NaN is redone whatever
    // its max (its sum is NaN).
    let mut acc = [l.splat(f64::NEG_INFINITY); 4];
    let quads = buf[..n].chunks_exact(4);
    let rest = quads.remainder();
    for q in quads {
        for (a, b) in acc.iter_mut().zip(q) {
            // SAFETY: the first n entries were written above.
            *a = l.max(*a, unsafe { b.assume_init() });
        }
    }
    for (a, b) in acc.iter_mut().zip(rest) {
        // SAFETY: as above.
        *a = l.max(*a, unsafe { b.assume_init() });
    }
    let m = l.max(l.max(acc[0], acc[1]), l.max(acc[2], acc[3]));
    let one = l.splat(1.0);
    // float32-grade rows are summed whole (ties and clamped lanes inside the sum, no compares:
    // [`rows::whole_sum_decides`]), and the lanes whose excess that cannot know are summed
    // again from `buf` with the ties apart. The adds keep the columns' order.
    let full = T::FULL;
    let mut total = l.splat(0.0);
    let mut below_others = (l.splat(0.0), l.splat(0.0));
    for b in buf.iter_mut().take(n) {
        // SAFETY: as above.
        let v = unsafe { b.assume_init() };
        let t = l.sub(v, m);
        let e = l.exp_nonpos(t, full);
        if full {
            let other = l.ne(v, m);
            below_others = split_step(l, below_others, other, l.summable(other, t, full), e);
        } else {
            total = l.add(total, e);
        }
        match keep {
            Keep::Input => {}
            Keep::Exp => {
                // The lanes a float32-grade exp clamps (`-inf`, a masked class, among them)
                // are stored as 0, as every kept term is. A NaN lane's row is redone.
                b.write(rows::stored_term::<L, T>(l, t, e));
            }
            Keep::Shift => {
                b.write(t);
            }
        }
    }
    // The lanes off the max are counted, not the ties (`ties = n - others`, exact).
    let split_excess =
        |(below, others): (L::V, L::V)| l.add(below, l.sub(l.sub(l.splat(n as f64), others), one));
    let excess = if full {
        split_excess(below_others)
    } else {
        let whole = l.sub(total, one);
        // The lanes that cannot know their excess (NaN lanes compare false: they are redone).
        let slack = l.splat(rows::whole_sum_slack(n + 8));
        let unsure = l.gt(l.mul(total, slack), whole);
        if !l.any(unsure) {
            whole
        } else {
            let mut sums = (l.splat(0.0), l.splat(0.0));
            for b in buf.iter().take(n) {
                // SAFETY: as above.
                let v = unsafe { b.assume_init() };
                // From what buf holds now: the inputs, the shifts (a tie is `t == 0`) or the
                // kept terms (a tie is a term of exactly 1; the clamped lanes hold 0).
                sums = match keep {
                    Keep::Exp => {
                        let other = l.ne(v, one);
                        split_step(l, sums, other, other, v)
                    }
                    Keep::Input | Keep::Shift => {
                        let (other, t) = match keep {
                            Keep::Shift => (l.ne(v, l.splat(0.0)), v),
                            _ => (l.ne(v, m), l.sub(v, m)),
                        };
                        let e = l.exp_nonpos(t, full);
                        split_step(l, sums, other, l.summable(other, t, full), e)
                    }
                };
            }
            // Per lane, so that a row's bits do not depend on the rows grouped with it.
            l.select(unsure, split_excess(sums), whole)
        }
    };
    // `excess + (m - m)` is NaN exactly where the max is not finite or the sum is NaN. Taken
    // as bits, with no branch: rows to redo come unpredictably (a `where=` row that keeps no
    // class has a max of -inf), and a mispredicted test per such group cost more than the bits.
    let check = l.add(excess, l.sub(m, m));
    let redo = l.bits(l.not(l.eq(check, check))) & row_bits(rows);
    (m, excess, redo)
}

/// [`group_state`] of rows under `mask`. A group dense in x and the mask (rows and mask rows
/// `n` apart) of rows of at least [`Lanes::STAGED_FROM`] is staged into `staged` with its masked
/// elements at `-inf` by one vector select over the whole group, then loaded as an unmasked
/// group: the same columns, at a fraction of the cost of masking each loaded column. Other
/// groups mask their columns as they load them.
///
/// # Safety
/// As [`group_state`].
#[inline(always)]
unsafe fn group_state_kept<L: Lanes, T: Real>(
    l: L,
    grp: Group<'_, T>,
    buf: &mut [MaybeUninit<L::V>],
    keep: Keep,
    mask: RowMask,
    staged: &mut [MaybeUninit<T>],
) -> (L::V, L::V, u8) {
    let (n, rows) = (grp.n, grp.rows.min(L::N));
    let dense = matches!(grp.at, Rows::Pitched { pitch, .. } if pitch == n);
    // SAFETY: forwarded from the caller; the group's rows * n elements and mask bytes are
    // readable when it is dense, and `staged` holds them.
    unsafe {
        if mask.class == 1
            && mask.lane == n
            && dense
            && n >= L::STAGED_FROM
            && rows * n <= staged.len()
        {
            let s = staged.as_mut_ptr() as *mut T;
            select_kept(l, grp.row(0), mask.keep, s, rows * n, f64::NEG_INFINITY);
            let staged = Group {
                ahead: grp.ahead,
                ahead_out: grp.ahead_out,
                ..Group::pitched(s, n, rows, n, rows)
            };
            return group_state(l, staged, buf, keep, None);
        }
        group_state(l, grp, buf, keep, Some(mask))
    }
}

/// [`group_state`] of a group of short rows, under a `where=` mask when `keep` is given (the
/// group's first mask row, the bytes between mask rows and the mask bytes readable from the
/// first), through [`group_state_kept`].
///
/// # Safety
/// As [`group_state_kept`] with a mask, else as [`group_state`].
#[inline(always)]
unsafe fn group_state_of<L: Lanes, T: Real>(
    l: L,
    grp: Group<'_, T>,
    keep: Option<(*const u8, usize, usize)>,
    buf: &mut [MaybeUninit<L::V>],
    kind: Keep,
    staged: &mut [MaybeUninit<T>],
) -> (L::V, L::V, u8) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match keep {
            Some((k, lane, mask_bytes)) => {
                let mask = RowMask {
                    keep: k,
                    lane,
                    class: 1,
                    bytes: mask_bytes,
                };
                group_state_kept(l, grp, buf, kind, mask, staged)
            }
            None => group_state(l, grp, buf, kind, None),
        }
    }
}

/// The reference state of the short row at `x`, over the elements its mask bytes `keep`
/// keep when given: the row staged with its masked elements at `-inf`, as a staged block
/// holds it.
///
/// # Safety
/// `n <= SHORT_ROW` elements readable at `x`, and as many mask bytes at `keep`.
#[inline(always)]
unsafe fn row_reference<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: Option<*const u8>,
    n: usize,
) -> LseState {
    // SAFETY: forwarded from the caller; the staged row holds n <= SHORT_ROW elements.
    unsafe {
        match keep {
            Some(k) => {
                let mut row = [MaybeUninit::<T>::uninit(); SHORT_ROW];
                let s = row.as_mut_ptr() as *mut T;
                select_kept(l, x, k, s, n, f64::NEG_INFINITY);
                reference_state(s, n)
            }
            None => reference_state(x, n),
        }
    }
}

/// The `where=` mask bytes of a kernel's rows: row `r`'s `n` bytes at `keep + r * lane`
/// (`lane` is `n` for a mask of the rows' shape, 0 for one mask row that every row shares).
#[derive(Clone, Copy)]
pub(crate) struct KeepRows {
    pub(crate) keep: *const u8,
    pub(crate) lane: usize,
}

/// The rows a short-row kernel walks `N` at a time: `rows` rows of `x` of at most `n`
/// elements, with their `where=` mask bytes when `keep` is given, a group after each hinted
/// into L1 as `hint` says.
#[derive(Clone, Copy)]
struct Source<'a, T> {
    x: Rows<'a, T>,
    keep: Option<KeepRows>,
    rows: usize,
    n: usize,
    hint: Option<Hints>,
    /// The output's rows (dense, `n` apart) when the groups write them: hinted beside the
    /// next group's rows. Null for none.
    out: *const T,
}

impl<'a, T: Real> Source<'a, T> {
    /// Rows `r..r + g`.
    #[inline(always)]
    fn group(self, r: usize, g: usize) -> Group<'a, T> {
        self.x.group(r, g, self.n, self.rows)
    }

    /// Row `r`'s mask bytes.
    #[inline(always)]
    fn keep_of(self, r: usize) -> Option<*const u8> {
        self.keep.map(|k| k.keep.wrapping_add(r * k.lane))
    }

    /// The state of rows `r..r + g` ([`group_state_of`]), the group after them hinted.
    ///
    /// # Safety
    /// As [`group_state_of`] for the group.
    #[inline(always)]
    unsafe fn state<L: Lanes>(
        self,
        l: L,
        (r, g): (usize, usize),
        buf: &mut [MaybeUninit<L::V>],
        kind: Keep,
        staged: &mut [MaybeUninit<T>],
    ) -> (L::V, L::V, u8) {
        let mut grp = self.group(r, g);
        if let Some(hints) = self.hint {
            let left = self.rows - r - g;
            hints.aim::<L, T>(&mut grp, self.x, (r, g, self.n, left), self.out);
        }
        // The mask rows from row r on are readable.
        let keep = self.keep.map(|k| {
            let bytes = (self.rows - r - 1) * k.lane + self.n;
            (k.keep.wrapping_add(r * k.lane), k.lane, bytes)
        });
        // SAFETY: forwarded from the caller.
        unsafe { group_state_of(l, grp, keep, buf, kind, staged) }
    }

    /// The reference state of row `k` of `grp`, the group of rows from `r`.
    ///
    /// # Safety
    /// As [`row_reference`] for the row.
    #[inline(always)]
    unsafe fn reference<L: Lanes>(self, l: L, grp: Group<'_, T>, r: usize, k: usize) -> LseState {
        // SAFETY: forwarded from the caller.
        unsafe { row_reference(l, grp.row(k), self.keep_of(r + k), grp.len_of(k)) }
    }
}

/// logsumexp of `rows` short rows (`n <= SHORT_ROW` elements, or ragged rows of at most
/// `n`) into `out[r]`.
///
/// # Safety
/// The rows readable, `out` writable for `rows` elements.
#[inline(always)]
pub(crate) unsafe fn logsumexp<L: Lanes, T: Real>(
    l: L,
    x: Rows<'_, T>,
    rows: usize,
    n: usize,
    out: *mut T,
) {
    // SAFETY: forwarded from the caller.
    unsafe { logsumexp_groups(l, x, None, rows, n, out) }
}

/// [`logsumexp`] of `rows` dense short rows (`n` apart) over the elements their mask bytes
/// `keep` (`n` a row) keep: the values of the rows staged with their masked elements at
/// `-inf` and run through [`logsumexp`], bit for bit.
///
/// # Safety
/// `x` readable for `rows * n` elements and `keep` for as many bytes, `out` writable for
/// `rows` elements.
#[inline(always)]
pub(crate) unsafe fn logsumexp_kept<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: KeepRows,
    rows: usize,
    n: usize,
    out: *mut T,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let x = Rows::Pitched { x, pitch: n };
        logsumexp_groups(l, x, Some(keep), rows, n, out)
    }
}

/// [`logsumexp`] and [`logsumexp_kept`] (`keep`, mask rows `n` apart, given only with rows
/// `n` apart).
///
/// # Safety
/// As [`logsumexp_kept`] with a mask, else as [`logsumexp`].
#[inline(always)]
unsafe fn logsumexp_groups<L: Lanes, T: Real>(
    l: L,
    x: Rows<'_, T>,
    keep: Option<KeepRows>,
    rows: usize,
    n: usize,
    out: *mut T,
) {
    // Uninitialised: zeroing it per group would cost more than the rows.
    let mut staged = [MaybeUninit::<T>::uninit(); 8 * SHORT_ROW];
    let mut one_buf = [[MaybeUninit::<L::V>::uninit(); SHORT_ROW]];
    let src = Source {
        x,
        keep,
        rows,
        n,
        hint: Hints::Reads.of(n),
        out: std::ptr::null(),
    };
    let init = (l.splat(0.0), l.splat(0.0), 0u8);
    in_batches::<L, _, _>(
        rows,
        BATCH,
        &mut one_buf,
        init,
        #[inline(always)]
        |buf, r, g| {
            // SAFETY: rows r..r+g are readable (and their mask bytes).
            unsafe { src.state(l, (r, g), buf, Keep::Input, &mut staged) }
        },
        #[inline(always)]
        |_, r, g, (m, excess, redo)| {
            // SAFETY: out[r..r+g] writable; rows r..r+g readable (and their mask bytes).
            unsafe {
                let lse = l.add(m, l.log1p(excess, T::FULL));
                if g == L::N {
                    l.store(out.add(r), lse);
                } else {
                    l.store_tail(out.add(r), lse, g);
                }
                let grp = src.group(r, g);
                for k in set_bits(redo) {
                    let state = src.reference(l, grp, r, k);
                    *out.add(r + k) = T::from_f64(state.logsumexp());
                }
            }
        },
    );
}

/// The positions of the set bits of `bits`, lowest first (none, at the cost of one test,
/// when it is 0).
#[inline(always)]
fn set_bits(mut bits: u8) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (bits != 0).then(|| {
            let k = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            k
        })
    })
}

/// The most groups of short rows whose states [`in_batches`] takes before it finishes any.
const BATCH: usize = 4;

/// Groups of `N` rows (the last of fewer) of `rows` rows, `depth` (1..=`BATCH`) at a time:
/// `state(buf, r, g)` of each group of a batch (rows `r..r + g`), then
/// `finish(buf, r, g, state)` of each. The
/// per-row work that follows a state (a log, a division, the writes) is a long chain of
/// dependent arithmetic: taken group by group, the core waits on it; a batch's states are
/// independent, so their chains overlap. Group `i` of a batch works in `bufs[i]`, or in
/// `bufs[0]` when there are fewer (one buffer serves where the finish does not read it).
#[inline(always)]
fn in_batches<L: Lanes, B, S: Copy>(
    rows: usize,
    depth: usize,
    bufs: &mut [B],
    init: S,
    mut state: impl FnMut(&mut B, usize, usize) -> S,
    mut finish: impl FnMut(&mut B, usize, usize, S),
) {
    // Group i's buffer (a compare, not a division by the count).
    let count = bufs.len();
    let own = |i: usize| if i < count { i } else { 0 };
    let mut held = [(0, 0, init); BATCH];
    let mut r = 0;
    while r < rows {
        let mut k = 0;
        while k < depth.clamp(1, BATCH) && r < rows {
            let g = (rows - r).min(L::N);
            held[k] = (r, g, state(&mut bufs[own(k)], r, g));
            k += 1;
            r += g;
        }
        for (i, &(r, g, s)) in held[..k].iter().enumerate() {
            finish(&mut bufs[own(i)], r, g, s);
        }
    }
}

/// The `(max, excess)` state of each of `rows` short rows (as [`logsumexp`]'s) into
/// `out[r]`.
///
/// # Safety
/// The rows readable; `out` holds `rows` states.
#[inline(always)]
pub(crate) unsafe fn states<L: Lanes, T: Real>(
    l: L,
    x: Rows<'_, T>,
    rows: usize,
    n: usize,
    out: &mut [LseState],
) {
    // SAFETY: forwarded from the caller.
    unsafe { states_groups(l, x, None, rows, n, out) }
}

/// [`states`] of `rows` dense short rows (`n` apart) over the elements their mask bytes
/// `keep` (`n` a row) keep: the states of the rows staged with their masked elements at
/// `-inf`, bit for bit.
///
/// # Safety
/// `x` readable for `rows * n` elements and `keep` for as many bytes; `out` holds `rows`
/// states.
#[inline(always)]
pub(crate) unsafe fn states_kept<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: KeepRows,
    rows: usize,
    n: usize,
    out: &mut [LseState],
) {
    // SAFETY: forwarded from the caller.
    unsafe { states_groups(l, Rows::Pitched { x, pitch: n }, Some(keep), rows, n, out) }
}

/// [`states`] and [`states_kept`] (`keep`, mask rows `n` apart, given only with rows `n`
/// apart).
///
/// # Safety
/// As [`states_kept`] with a mask, else as [`states`].
#[inline(always)]
unsafe fn states_groups<L: Lanes, T: Real>(
    l: L,
    x: Rows<'_, T>,
    keep: Option<KeepRows>,
    rows: usize,
    n: usize,
    out: &mut [LseState],
) {
    let mut buf = [MaybeUninit::<L::V>::uninit(); SHORT_ROW];
    let mut staged = [MaybeUninit::<T>::uninit(); 8 * SHORT_ROW];
    let src = Source {
        x,
        keep,
        rows,
        n,
        hint: Hints::Reads.of(n),
        out: std::ptr::null(),
    };
    let mut r = 0;
    while r < rows {
        let g = (rows - r).min(L::N);
        // SAFETY: rows r..r+g are readable (and their mask bytes).
        unsafe {
            let (m, excess, redo) = src.state(l, (r, g), &mut buf, Keep::Input, &mut staged);
            let (ms, es) = (l.to_lanes(m), l.to_lanes(excess));
            let grp = src.group(r, g);
            for k in 0..g {
                out[r + k] = if redo & (1 << k) != 0 {
                    src.reference(l, grp, r, k)
                } else {
                    LseState {
                        max: ms[k],
                        excess: es[k],
                    }
                };
            }
        }
        r += g;
    }
}

/// Softmax (`log = false`) or log_softmax of `rows` short rows (as [`logsumexp`]'s) into
/// the dense `out` (`rows x n`; a ragged row's elements past its own are left alone): states
/// `N` rows per vector, then the columns of the state pass scaled (or shifted) and stored
/// back row-wise.
///
/// # Safety
/// The rows readable, `out` writable for `rows * n` elements, disjoint from the rows or equal
/// to them when pitched `n` apart.
#[inline(always)]
pub(crate) unsafe fn softmax<L: Lanes, T: Real>(
    l: L,
    x: Rows<'_, T>,
    rows: usize,
    n: usize,
    out: *mut T,
    log: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe { softmax_groups(l, x, None, rows, n, out, log) }
}

/// [`softmax`] of `rows` dense short rows (`n` apart) under a `where=` mask read in place
/// beside them (`keep`, the rows' mask bytes, `n` apart): a masked class reads as `-inf`, so
/// its softmax is 0 and its log_softmax `-inf`, the values of the rows staged with their
/// masked classes at `-inf` and run through [`softmax`] bit for bit. A row that needs the
/// reference (fully masked, a kept NaN or infinity) is staged into `out` and redone there, its
/// masked positions set afterwards, as the staged rows are.
///
/// # Safety
/// `x` readable and `out` writable for `rows * n` elements, equal or disjoint; `keep`
/// readable for as many bytes, disjoint from `out`.
#[inline(always)]
pub(crate) unsafe fn softmax_kept<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    keep: KeepRows,
    rows: usize,
    n: usize,
    out: *mut T,
    log: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        softmax_groups(
            l,
            Rows::Pitched { x, pitch: n },
            Some(keep),
            rows,
            n,
            out,
            log,
        )
    }
}

/// [`softmax`] and [`softmax_kept`] (`keep`, mask rows `n` apart, given only with rows `n`
/// apart).
///
/// # Safety
/// As [`softmax_kept`] with a mask, else as [`softmax`].
#[inline(always)]
unsafe fn softmax_groups<L: Lanes, T: Real>(
    l: L,
    x: Rows<'_, T>,
    keep: Option<KeepRows>,
    rows: usize,
    n: usize,
    out: *mut T,
    log: bool,
) {
    let mut bufs = [[MaybeUninit::<L::V>::uninit(); SHORT_ROW]; BATCH];
    let mut staged = [MaybeUninit::<T>::uninit(); 8 * SHORT_ROW];
    let kind = if log { Keep::Shift } else { Keep::Exp };
    let src = Source {
        x,
        keep,
        rows,
        n,
        hint: Hints::Rows.of(n),
        out: hinted_out(x, n, out),
    };
    let init = (l.splat(0.0), 0u8);
    // In place (out == x, pitch == n), every row of a batch is read before any is written,
    // and a redone row is written only by the reference, after the others of its group.
    let depth = if n < GROUPED_FROM { BATCH } else { 1 };
    in_batches::<L, _, _>(
        rows,
        depth,
        &mut bufs,
        init,
        #[inline(always)]
        |buf, r, g| {
            // SAFETY: rows r..r+g are readable (and their mask bytes).
            let (_, excess, redo) = unsafe { src.state(l, (r, g), buf, kind, &mut staged) };
            (excess, redo)
        },
        #[inline(always)]
        |buf, r, g, (excess, redo)| {
            // SAFETY: rows r..r+g are readable, their outputs writable; buf holds the
            // group's columns, as its state pass left them.
            unsafe {
                let (grp, o) = (src.group(r, g), out.add(r * n));
                // Per row: softmax = e * (1 / S), log_softmax = t - log1p(excess).
                let factor = if log {
                    l.log1p(excess, T::FULL)
                } else {
                    let one = l.splat(1.0);
                    l.div(one, l.add(one, excess))
                };
                // A ragged group's columns run to its longest row (its store writes each
                // row that far, inside the row's n elements of `out`).
                let w = grp.n;
                for b in buf.iter_mut().take(w) {
                    let v = b.assume_init();
                    b.write(if log {
                        l.sub(v, factor)
                    } else {
                        l.mul(v, factor)
                    });
                }
                let cols = std::slice::from_raw_parts(buf.as_ptr() as *const L::V, w);
                for c0 in (0..w).step_by(L::N) {
                    l.store_columns(o, n, g, redo, c0, (w - c0).min(L::N), cols);
                }
                for k in set_bits(redo) {
                    let (xr, or) = (grp.row(k), o.add(k * n));
                    match src.keep_of(r + k) {
                        None => redo_row(l, xr, or, grp.len_of(k), log),
                        Some(kr) => {
                            let masked = if log { f64::NEG_INFINITY } else { 0.0 };
                            select_kept(l, xr, kr, or, n, f64::NEG_INFINITY);
                            redo_row(l, or, or, n, log);
                            select_kept(l, or, kr, or, n, masked);
                        }
                    }
                }
            }
        },
    );
}

/// A short row with a non-finite max or a NaN, written from the reference state.
///
/// # Safety
/// `n` readable elements at `x`, `n` writable at `out`, disjoint or equal.
#[inline(always)]
unsafe fn redo_row<L: Lanes, T: Real>(l: L, x: *const T, out: *mut T, n: usize, log: bool) {
    // SAFETY: forwarded from the caller.
    unsafe { write_state_row(l, x, out, n, reference_state(x, n), log) }
}

/// Softmax (`log = false`) or log_softmax of the `n` elements at `x` into `out` from their
/// finished `state`: the row write, or scipy's values from the reference writers when the
/// max is not finite.
///
/// # Safety
/// `n` readable elements at `x`, `n` writable at `out`, disjoint or equal.
#[inline(always)]
unsafe fn write_state_row<L: Lanes, T: Real>(
    l: L,
    x: *const T,
    out: *mut T,
    n: usize,
    state: LseState,
    log: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if !state.max.is_finite() {
            if log {
                scalar::log_softmax_write(x, 0, 1, out, 0, 1, n, state);
            } else {
                scalar::softmax_write(x, 0, 1, out, 0, 1, n, state);
            }
        } else if log {
            let f = ShiftSub {
                shift: state.max,
                log_total: state.log_total(),
            };
            map_row(l, x, out, n, false, f);
        } else {
            let f = ExpScaled {
                shift: state.max,
                scale: 1.0 / state.total(),
                full: T::FULL,
            };
            map_row(l, x, out, n, false, f);
        }
    }
}

/// Rows up to this long take [`xent_index`]: longer than [`SHORT_ROW`], since a loss
/// row's horizontal reductions and per-row scalar work cost more than a softmax's. (float32,
/// AVX-512, ns per element, short rows against the row kernels: one thread in L2, rows of 150
/// 0.30 / 0.43 and with the gradient 0.50 / 0.91, rows of 256 0.27 / 0.35 and 0.46 / 0.67;
/// two threads from DRAM, rows of 193 0.35 / 0.45 and 0.71 / 0.82, rows of 256 0.32 / 0.40
/// and 0.63 / 0.70.)
pub(crate) const SHORT_LOSS_ROW: usize = 2 * SHORT_ROW;

/// A row of a short-row loss whose target is ignored (no loss, a zero gradient).
pub(crate) const IGNORED: u32 = u32::MAX;

/// The per-row inputs of the cross-entropy of short rows against class indices (no label
/// smoothing): each row's target class ([`IGNORED`] or `< n`) and its weight `w_t`, and the
/// gradient's scales, `c = s1 * w_t + z2 * lse` per row.
#[derive(Clone, Copy)]
pub(crate) struct IndexLoss<'a> {
    pub(crate) class: &'a [u32],
    pub(crate) weight: &'a [f64],
    /// The reduction's scale of the main term.
    pub(crate) s1: f64,
    /// `2 * z_loss * s2`: the z-term's share of the gradient coefficient, per unit of lse.
    pub(crate) z2: f64,
    /// The rows' `where=` mask (row `r`'s bytes at `r * lane`); a masked class reads as
    /// `-inf`, so its probability and gradient are 0. A row's target must be kept.
    pub(crate) mask: Option<RowMask>,
}

/// The per-row outputs of [`xent_index`]: the main loss term `w_t * (L - x_t)` (0 for an
/// ignored row), `L = logsumexp` and whether the row must be redone by the caller's reference
/// path (a non-finite max or a NaN sum, or a target the mask hides; its outputs, gradient
/// included, are then left alone).
pub(crate) struct IndexLossOut<'a> {
    pub(crate) main: &'a mut [f64],
    pub(crate) lse: &'a mut [f64],
    pub(crate) redo: &'a mut [bool],
}

/// Cross-entropy of `rows` short rows (`pitch` apart) against class indices, `N` rows per
/// vector: each group's states, `L = m + log1p(excess)` (vector log1p) and the gathered
/// `x_t` give the loss lane-wise; with `grad` (dense `rows x n`) the gradient
/// `g_k = c * exp(x_k - m) / S` is written from the exps of the state pass, and the target's
/// `g_t = -c * (S - e_t) / S + z2 * L`, with `S - e_t` exact when the target is the max
/// (`excess`) and at least 1 otherwise, so `p_t -> 1` loses no relative accuracy. `p.mask`
/// is read only when `MASKED`; `grad` is given exactly when `GRAD` (each compiled apart, so
/// that what a group keeps and writes is known where its columns are walked).
///
/// # Safety
/// The rows readable, `grad` writable for `rows * n` elements; `p` and `out` hold `rows`
/// entries; every class that is not [`IGNORED`] is `< n`; `n <= SHORT_LOSS_ROW`; with
/// `p.mask`, the mask bytes of every row readable.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn xent_index<L: Lanes, T: Real, const MASKED: bool, const GRAD: bool>(
    l: L,
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    p: IndexLoss<'_>,
    out: &mut IndexLossOut<'_>,
    grad: Option<*mut T>,
) {
    let grad = grad.filter(|_| GRAD);
    let mut buf = [MaybeUninit::<L::V>::uninit(); SHORT_LOSS_ROW];
    let mut staged = [MaybeUninit::<T>::uninit(); 8 * SHORT_LOSS_ROW];
    let keep = if GRAD { Keep::Exp } else { Keep::Input };
    // One mask row for every row (a `(1, C)` mask): repeated once for a group of rows, so
    // that each group is staged as a dense one rather than masked column by column.
    let mut repeated = [0u8; 8 * SHORT_LOSS_ROW];
    let shared = p
        .mask
        .filter(|m| MASKED && m.lane == 0 && m.class == 1 && L::N * n <= repeated.len())
        .map(|m| {
            for row in repeated.chunks_exact_mut(n.max(1)).take(L::N) {
                // SAFETY: the mask row's n bytes are readable (the caller's contract).
                row.copy_from_slice(unsafe { std::slice::from_raw_parts(m.keep, n) });
            }
            RowMask {
                keep: repeated.as_ptr(),
                lane: n,
                class: 1,
                bytes: repeated.len(),
            }
        });
    let mut r = 0;
    while r < rows {
        let g = (rows - r).min(L::N);
        // SAFETY: rows r..r+g are readable (and their gradient rows writable); their classes
        // index inside the row.
        unsafe {
            let px = x.add(r * pitch);
            let mut grp = Group::pitched(px, pitch, g, n, rows - r);
            if let Some(hints) = Hints::loss(GRAD, n).of(n) {
                let at = Rows::Pitched { x, pitch };
                let out = grad.map_or(std::ptr::null(), |gp| gp as *const T);
                hints.aim::<L, T>(&mut grp, at, (r, g, n, rows - r - g), out);
            }
            // A constant `None` unmasked: the mask code compiles away.
            let mask = shared.or_else(|| {
                p.mask.filter(|_| MASKED).map(|m| RowMask {
                    keep: m.keep.add(r * m.lane),
                    bytes: m.bytes.saturating_sub(r * m.lane),
                    ..m
                })
            });
            let (m, excess, mut redo) = match mask {
                Some(mk) => group_state_kept(l, grp, &mut buf, keep, mk, &mut staged),
                None => group_state(l, grp, &mut buf, keep, None),
            };
            // An ignored row's x_t is its max: every term below stays finite.
            let (cls, wts) = (&p.class[r..r + g], &p.weight[r..r + g]);
            // Under a mask the forward loss reads x_t from the loaded columns (column c's lane k
            // at c * N + k), where a masked class reads as -inf; the gradient's columns hold
            // exps, so it reads x_t from the rows.
            let (xtv, wtv, kept) = if g == L::N {
                match mask {
                    Some(_) if !GRAD => {
                        l.index_terms(buf.as_ptr() as *const f64, (1, L::N), cls, wts, m)
                    }
                    _ => l.index_terms(px, (pitch, 1), cls, wts, m),
                }
            } else {
                let (mut xt, mut wt, mut kept) = (l.to_lanes(m), [0.0f64; 8], [0.0f64; 8]);
                for (k, (&c, &w)) in cls.iter().zip(wts).enumerate() {
                    if c != IGNORED {
                        (wt[k], kept[k]) = (w, 1.0);
                        xt[k] = match mask {
                            Some(_) if !GRAD => l.to_lanes(buf[c as usize].assume_init())[k],
                            _ => (*px.add(k * pitch + c as usize)).to_f64(),
                        };
                    }
                }
                let kept = l.gt(l.of_lanes(&kept), l.splat(0.0));
                (l.of_lanes(&xt), l.of_lanes(&wt), kept)
            };
            // A masked target (or a kept -inf one, which the reference path gives the same
            // loss) makes the row the caller's, to skip or refuse: found by its x_t of -inf in
            // the forward loss, by the target's mask byte with the gradient. An ignored row's
            // max (its x_t) is -inf only where the state already redoes it.
            match mask {
                Some(_) if !GRAD => {
                    redo |= l.bits(l.eq(xtv, l.splat(f64::NEG_INFINITY))) & row_bits(g);
                }
                Some(mk) => {
                    for (k, &c) in cls.iter().enumerate() {
                        if c != IGNORED {
                            let flag = *mk.keep.add(k * mk.lane + c as usize * mk.class);
                            redo |= u8::from(flag == 0) << k;
                        }
                    }
                }
                None => {}
            }
            let lt = l.log1p(excess, T::FULL);
            let main = l.mul(wtv, l.sub(lt, l.sub(xtv, m)));
            let lse = l.add(m, lt);
            // An ignored row's main term is already +0 (weight 0 times `lt >= 0`) unless the
            // row is redone, which rewrites it.
            let (pm, pl) = (
                out.main[r..r + g].as_mut_ptr(),
                out.lse[r..r + g].as_mut_ptr(),
            );
            if g == L::N {
                l.store(pm, main);
                l.store(pl, lse);
            } else {
                l.store_tail(pm, main, g);
                l.store_tail(pl, lse, g);
            }
            for (k, o) in out.redo[r..r + g].iter_mut().enumerate() {
                *o = redo & (1 << k) != 0;
            }
            let Some(gp) = grad else {
                r += g;
                continue;
            };
            // Lane-wise: c = s1 * w_t + z2 * L, factor = c / S, g_t = z2 * L - c * others / S,
            // with others = S - e_t (excess when the target is the max). An ignored row's
            // factor and g_t are 0: a zero gradient row.
            let et = l.exp_nonpos(l.sub(xtv, m), T::FULL);
            let total = l.add(l.splat(1.0), excess);
            let zterm = l.mul(l.splat(p.z2), lse);
            let c = l.add(l.mul(l.splat(p.s1), wtv), zterm);
            let others = l.select(l.eq(xtv, m), excess, l.sub(total, et));
            let zero = l.splat(0.0);
            let f = l.select(kept, l.div(c, total), zero);
            let gt = l.to_lanes(l.sub(zterm, l.div(l.mul(c, others), total)));
            for b in buf.iter_mut().take(n) {
                b.write(l.mul(b.assume_init(), f));
            }
            let cols = std::slice::from_raw_parts(buf.as_ptr() as *const L::V, n);
            let o = gp.add(r * n);
            for c0 in (0..n).step_by(L::N) {
                l.store_columns(o, n, g, redo, c0, (n - c0).min(L::N), cols);
            }
            for (k, &v) in gt.iter().enumerate().take(g) {
                let c = p.class[r + k];
                if c != IGNORED && redo & (1 << k) == 0 {
                    *o.add(k * n + c as usize) = T::from_f64(v);
                }
            }
        }
        r += g;
    }
}

/// What a short-row kernel does with its rows, which decides from which row length it hints
/// a group into L1 as it loads the group before, and which: the next group (and its output
/// lines beside it, where the kernel writes rows), or for a kernel that only reads, the rows
/// [`AHEAD_BYTES`] past it, as the long rows' passes hint. The hardware's streams keep up
/// with neither loop on every CPU. Measured (two threads from DRAM, float32, AVX-512, ms
/// per 2^22 rows of 10, hinted / not): on a 2-core Intel Xeon, log_softmax 21.9 / 28.4,
/// softmax 21.5 / 28.5, the loss 21.6 / 23.4 and with its gradient 47.2 / 50.5; rows of 16
/// softmax 18.6 / 25.2; the loss's rows of 4 ran 5-17% slower hinted. logsumexp of 2^26
/// elements, 4 KiB ahead / the next group / none: rows of 4 24.4 / 28.8 / 25.7, of 10
/// 15.4 / 16.9 / 17.4, of 16 13.1 / 13.9 / 13.9 (the loss ran 5% slower 4 KiB ahead on rows
/// of 16 and 32). On Zen 5 hinting the next group of rows under 16 cost up to 5%, and the
/// output rows of 16 5-10%. The loss without its gradient reads as logsumexp does, and
/// below 16 classes hints as it does ([`Hints::loss`]).
#[derive(Clone, Copy)]
enum Hints {
    /// Reads rows, writes a value per row (logsumexp, the states).
    Reads,
    /// Writes rows of the input's size (softmax, log_softmax).
    Rows,
    /// A loss: reads rows, writes a value per row and, with the gradient, rows.
    Loss,
}

impl Hints {
    /// The hints of the loss over rows of `n` classes, with or without its gradient: the
    /// forward loss writes a value per row, and under 16 classes it fetches 4 KiB ahead as
    /// the kernels that only read (2^26 float32 from DRAM, 2 threads, ms, the next group /
    /// 4 KiB ahead: rows of 8 37.5 / 35.5, of 10 33.8 / 31.5, of 12 30.4 / 28.3, of 4 61.0 /
    /// 59.9); from 16 on, and with the gradient, the next group (4 KiB ahead ran 4-11% slower
    /// on rows of 16 to 64).
    #[inline(always)]
    fn loss(grad: bool, n: usize) -> Self {
        if !grad && n < 16 {
            Hints::Reads
        } else {
            Hints::Loss
        }
    }

    /// Whether rows of `n` elements are hinted.
    #[inline(always)]
    fn on(self, n: usize) -> bool {
        n >= match self {
            Hints::Reads | Hints::Rows => 1,
            Hints::Loss => 8,
        }
    }

    /// These hints for rows of `n` elements, or none.
    #[inline(always)]
    fn of(self, n: usize) -> Option<Self> {
        self.on(n).then_some(self)
    }

    /// How far past the next group, in bytes, the hinted rows start.
    #[inline(always)]
    fn ahead(self) -> usize {
        match self {
            Hints::Reads => AHEAD_BYTES,
            Hints::Rows | Hints::Loss => 0,
        }
    }

    /// Aims `grp`, the `g` rows of `x` from row `r` (`n` elements, `left` rows after them),
    /// at what these hints fetch as it loads its columns: the next group's rows, [`Hints::ahead`]
    /// on, and beside them the output rows `out` (dense, `n` apart; null for none) of the
    /// next group.
    #[inline(always)]
    fn aim<L: Lanes, T: Real>(
        self,
        grp: &mut Group<'_, T>,
        x: Rows<'_, T>,
        (r, g, n, left): (usize, usize, usize, usize),
        out: *const T,
    ) {
        x.prefetch_next::<L>(grp, r, g, n, left);
        if grp.ahead.1 > 0 && !out.is_null() {
            grp.ahead_out = out.wrapping_add((r + g) * n) as *const u8;
        }
        grp.ahead.0 = grp.ahead.0.wrapping_add(self.ahead());
    }
}

/// Rows at least this long are written group by group ([`softmax_groups`]); shorter ones in
/// batches of groups. Batched, rows of 32 from DRAM ran 1.1-1.2x slower (two threads,
/// float32, Zen 5; 7-11% slower on the Intel Xeon), rows of 10-24 1.05-1.3x faster.
const GROUPED_FROM: usize = 32;

/// The output rows [`softmax_groups`] hints (null for none): dense rows written apart from
/// their input (in place, the rows hinted are the output's).
#[inline(always)]
fn hinted_out<T>(x: Rows<'_, T>, n: usize, out: *mut T) -> *const T {
    match x {
        Rows::Pitched { x, .. } if !std::ptr::eq(x, out) && Hints::Rows.on(n) => out,
        _ => std::ptr::null(),
    }
}

/// Hints the group of up to `N` rows that follows the `g` rows at `x` into L1 (`left` rows
/// remain): dense rows (`pitch == n`) are one span, handed to `grp` to hint a share at each
/// column block it loads; other rows are hinted now, as [`prefetch_rows`].
#[inline(always)]
fn next_group<L: Lanes, T>(
    grp: &mut Group<'_, T>,
    x: *const T,
    g: usize,
    n: usize,
    pitch: usize,
    left: usize,
) {
    let next = x.wrapping_add(g * pitch);
    let rows = left.min(L::N);
    if pitch == n {
        grp.ahead = (next as *const u8, rows * n * std::mem::size_of::<T>());
    } else {
        prefetch_rows(next, n, pitch, rows);
    }
}

/// Hints the `rows` rows of `n` elements at `x` (`pitch` apart) into L1: the next group's,
/// fetched while this group is computed (8 rows `pitch` apart defeat the hardware
/// prefetcher's page-local streams). Never faults.
#[inline(always)]
fn prefetch_rows<T>(x: *const T, n: usize, pitch: usize, rows: usize) {
    let size = std::mem::size_of::<T>();
    if pitch == n {
        // One span: every line it touches.
        super::prefetch_span(x as *const u8, rows * n * size);
        return;
    }
    for r in 0..rows {
        super::prefetch_span(x.wrapping_add(r * pitch) as *const u8, n * size);
    }
}

/// [`xent_index`] at `level` (compiled apart with and without a mask, and with and without
/// the gradient); at the scalar level every row is flagged for the caller's reference path.
///
/// # Safety
/// As [`xent_index`]; `level` supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn short_rows_xent_index<T: Real>(
    level: super::Level,
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    p: IndexLoss<'_>,
    out: &mut IndexLossOut<'_>,
    grad: Option<*mut T>,
) {
    debug_assert!(n <= SHORT_LOSS_ROW && p.class.len() >= rows && out.redo.len() >= rows);
    // Masked and unmasked are kernels of their own, each entered apart: the masked one's
    // staging buffers stay out of the unmasked one's frame.
    struct K<'a, 'b, 'c, T, const MASKED: bool> {
        x: *const T,
        rows: usize,
        n: usize,
        pitch: usize,
        p: IndexLoss<'a>,
        out: &'b mut IndexLossOut<'c>,
        grad: Option<*mut T>,
    }
    impl<T: Real, const MASKED: bool> super::lanes::Kernel for K<'_, '_, '_, T, MASKED> {
        type Out = ();
        #[inline(always)]
        fn run<L: Lanes>(self, l: L) {
            // SAFETY: the caller of short_rows_xent_index guarantees the buffers.
            unsafe {
                let (x, rows, n, pitch, p, grad) =
                    (self.x, self.rows, self.n, self.pitch, self.p, self.grad);
                match grad {
                    Some(_) => {
                        xent_index::<L, T, MASKED, true>(l, x, rows, n, pitch, p, self.out, grad)
                    }
                    None => {
                        xent_index::<L, T, MASKED, false>(l, x, rows, n, pitch, p, self.out, None)
                    }
                }
            }
        }
        fn scalar(self) {
            self.out.redo[..self.rows].fill(true);
        }
    }
    /// Enters the kernel compiled for `MASKED`.
    ///
    /// # Safety
    /// As [`short_rows_xent_index`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn enter<T: Real, const MASKED: bool>(
        level: super::Level,
        x: *const T,
        rows: usize,
        n: usize,
        pitch: usize,
        p: IndexLoss<'_>,
        out: &mut IndexLossOut<'_>,
        grad: Option<*mut T>,
    ) {
        let k = K::<T, MASKED> {
            x,
            rows,
            n,
            pitch,
            p,
            out,
            grad,
        };
        // SAFETY: forwarded from the caller.
        unsafe { super::lanes::dispatch(level, k) }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        if p.mask.is_some() {
            enter::<T, true>(level, x, rows, n, pitch, p, out, grad)
        } else {
            enter::<T, false>(level, x, rows, n, pitch, p, out, grad)
        }
    }
}
