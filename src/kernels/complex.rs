//! Complex log-sum-exp, softmax and log_softmax with `scipy.special`'s semantics.
//!
//! Inputs are interleaved `(re, im)` pairs of `f32` or `f64` (NumPy's complex64 / complex128
//! memory), laid out by a [`Batch`] counted in complex elements: element `e` is
//! `x[2 * e] + i * x[2 * e + 1]`. Outputs are interleaved pairs too, dense like the real
//! kernels' (`out[l]` per lane for log-sum-exp, `(outer, n, inner)` for softmax).
//!
//! The `(max, excess)` idea of [`crate::state`] carries over: the magnitude of `exp(a)` depends
//! only on the real part, so the shift is the largest real part `M`, and the sum of the
//! remaining terms, each `exp(re - M) * cis(im)`, is a complex excess kept apart from the
//! maximal term. The real part of the result is `M + log|1 + E| = M + log1p(2 Re E + |E|^2) / 2`,
//! exact for tiny `E` (`[0, -40]` keeps its `4e-18`), computed in `f64` and rounded once.
//!
//! Lanes that hold a non-finite element (or whose accurate result is not finite, e.g. an exact
//! cancellation) are computed by [`numpy_ops`]: a transcription of scipy's own formulas with
//! NumPy's operations (C99 `cexp`/`clog`, Smith's division, NumPy's complex `max`), evaluated
//! at the input's precision. That is what places infinities and NaNs exactly where scipy
//! does; finite lanes take the accurate path. Lanes are reduced in fixed pieces (columns in
//! tiles, long rows in blocks summed in block order), so results are bit-identical for any
//! thread count.

use crate::kernels::{Reduction, LONG_ROW_BLOCK};
use crate::layout::Batch;
use crate::parallel::{self, SendPtr};
use crate::real::Real;

/// A complex number as `(re, im)` in `f64`.
pub type C = (f64, f64);

/// Column lanes reduced together: one pass over a `(n, COL_TILE)` tile reads whole cache lines.
const COL_TILE: usize = 64;

/// An array read beside the input, laid out by its own batch with the input's
/// `(outer, n, inner)`: the complex weights `b` (interleaved pairs, [`Weights`]) or the bytes of
/// a `where` mask ([`Keep`], nonzero = kept).
#[derive(Clone, Copy)]
pub struct Laid<'a, T> {
    pub data: &'a [T],
    pub batch: Batch,
}

/// Complex weights `b` of a log-sum-exp (interleaved `(re, im)` pairs).
pub type Weights<'a, T> = Laid<'a, T>;

/// A `where` mask: one byte per complex element, nonzero = kept (NumPy's bool). Masked
/// elements take no part, whatever they or their weights hold (JAX's `where=`).
pub type Keep<'a> = Laid<'a, u8>;

impl<T> Laid<'_, T> {
    /// An error unless this array has the input's `(outer, n, inner)`.
    fn check_matches(&self, batch: &Batch, name: &str) -> Result<(), String> {
        if (self.batch.outer, self.batch.n, self.batch.inner) != (batch.outer, batch.n, batch.inner)
        {
            return Err(format!(
                "{name} batch {:?} does not match the input's batch {batch:?}",
                self.batch
            ));
        }
        Ok(())
    }
}

/// An error unless the mask (if any) holds its batch and has the input's shape.
fn check_keep(keep: Option<Keep<'_>>, batch: &Batch) -> Result<(), String> {
    let Some(m) = keep else { return Ok(()) };
    m.batch
        .check(m.data.len())
        .map_err(|e| format!("where: {e}"))?;
    m.check_matches(batch, "where")
}

/// The mask's tile matching an input tile (see [`Tile`]); `None` keeps every element.
#[derive(Clone, Copy)]
struct KeepTile<'a>(Option<(&'a [u8], Tile)>);

impl KeepTile<'_> {
    #[inline(always)]
    fn kept(&self, k: usize, j: usize) -> bool {
        self.0.is_none_or(|(m, t)| m[t.at(k, j)] != 0)
    }

    /// The kept indices `k` of lane `j` among `0..n`, or None when the mask keeps them all
    /// (or there is no mask).
    fn kept_rows(&self, n: usize, j: usize) -> Option<Vec<usize>> {
        self.0?;
        let rows: Vec<usize> = (0..n).filter(|&k| self.kept(k, j)).collect();
        (rows.len() != n).then_some(rows)
    }
}

/// A tile of `w` adjacent lanes: element `(k, j)` (k < n, j < w) is complex element
/// `base + k * kstride + j`; the lanes are `lane0..lane0 + w`.
#[derive(Clone, Copy, Debug)]
struct Tile {
    base: usize,
    w: usize,
    kstride: usize,
    n: usize,
    lane0: usize,
}

impl Tile {
    #[inline(always)]
    fn at(&self, k: usize, j: usize) -> usize {
        self.base + k * self.kstride + j
    }
}

/// The tiles covering a batch: one per row when `inner == 1`, else `COL_TILE` columns of a slab.
fn tiles_of(batch: &Batch) -> (usize, impl Fn(usize) -> Tile + Sync + Send + Copy) {
    let b = *batch;
    let per = if b.inner == 1 {
        1
    } else {
        b.inner.div_ceil(COL_TILE)
    };
    let tile = move |t: usize| {
        let (o, c) = (t / per, t % per);
        if b.inner == 1 {
            Tile {
                base: o * b.outer_stride,
                w: 1,
                kstride: 1,
                n: b.n,
                lane0: o,
            }
        } else {
            let j0 = c * COL_TILE;
            Tile {
                base: o * b.outer_stride + j0,
                w: COL_TILE.min(b.inner - j0),
                kstride: b.inner,
                n: b.n,
                lane0: o * b.inner + j0,
            }
        }
    };
    (b.outer * per, tile)
}

/// The mask tile of every tile number (the tiles of the mask's own batch).
fn keep_tiles<'a>(keep: Option<Keep<'a>>) -> impl Fn(usize) -> KeepTile<'a> + Sync + Send + Copy {
    let tiles = keep.map(|m| (m.data, tiles_of(&m.batch).1));
    move |t| KeepTile(tiles.map(|(data, f)| (data, f(t))))
}

#[inline(always)]
fn load<T: Real>(x: &[T], e: usize) -> C {
    (x[2 * e].to_f64(), x[2 * e + 1].to_f64())
}

#[inline(always)]
fn cmul(a: C, b: C) -> C {
    (a.0 * b.0 - a.1 * b.1, a.0 * b.1 + a.1 * b.0)
}

#[inline(always)]
fn cadd(a: C, b: C) -> C {
    (a.0 + b.0, a.1 + b.1)
}

/// `exp(re) * cis(im)` for finite `im` and `re <= 0` (the shifted terms of the finite path).
#[inline(always)]
fn exp_cis(re: f64, im: f64) -> C {
    let t = re.exp();
    let (s, c) = im.sin_cos();
    (t * c, t * s)
}

/// `log|1 + e|` and `arg(1 + e)`, the first exact for tiny `e` (the excess form).
#[inline]
fn log1p_excess(e: C) -> C {
    let w = e.0 * (2.0 + e.0) + e.1 * e.1;
    (0.5 * w.ln_1p(), e.1.atan2(1.0 + e.0))
}

fn check_pairs<T>(x: &[T], batch: &Batch, name: &str) -> Result<(), String> {
    if !x.len().is_multiple_of(2) {
        return Err(format!(
            "{name}: an interleaved complex buffer has an odd length"
        ));
    }
    batch.check(x.len() / 2).map_err(|e| format!("{name}: {e}"))
}

fn check_len(len: usize, need: usize, name: &str) -> Result<(), String> {
    if len != need {
        return Err(format!("{name} holds {len} values, expected {need}"));
    }
    Ok(())
}

// ------------------------------------------------------------------------------ log-sum-exp

/// Pass-1 state of one lane: the largest real part among weighted elements, the last index
/// holding it (scipy's choice among ties), and whether the lane needs [`numpy_ops`].
#[derive(Clone, Copy, Debug)]
struct MaxState {
    max: f64,
    imax: usize,
    special: bool,
}

impl MaxState {
    const EMPTY: MaxState = MaxState {
        max: f64::NEG_INFINITY,
        imax: usize::MAX,
        special: false,
    };

    /// Merges the state of a later block (ties go to the later, i.e. larger, index).
    fn merge_later(self, later: MaxState) -> MaxState {
        let mut m =
            if later.imax != usize::MAX && (self.imax == usize::MAX || later.max >= self.max) {
                later
            } else {
                self
            };
        m.special = self.special || later.special;
        m
    }
}

/// One tile of `a` and, with weights and a mask, the matching tiles of `b` and `where`.
#[derive(Clone, Copy)]
struct WeightedTile<'a, T> {
    a: &'a [T],
    tile: Tile,
    b: Option<(&'a [T], Tile)>,
    keep: KeepTile<'a>,
}

impl<T: Real> WeightedTile<'_, T> {
    #[inline(always)]
    fn elem(&self, k: usize, j: usize) -> C {
        load(self.a, self.tile.at(k, j))
    }

    /// The weight of element `(k, j)`; None without weights.
    #[inline(always)]
    fn weight(&self, k: usize, j: usize) -> Option<C> {
        self.b.map(|(data, t)| load(data, t.at(k, j)))
    }

    /// Pass 1 over rows `k0..k1` (lane `j` of the tile updates `states[j]`).
    fn max_pass(&self, k0: usize, k1: usize, states: &mut [MaxState]) {
        for k in k0..k1 {
            for (j, st) in states.iter_mut().enumerate().take(self.tile.w) {
                if !self.keep.kept(k, j) {
                    continue; // JAX's where=: a masked element is not there
                }
                let (re, im) = self.elem(k, j);
                if let Some((br, bi)) = self.weight(k, j) {
                    if br == 0.0 && bi == 0.0 {
                        continue; // scipy: a zero weight removes the element, whatever `a` holds
                    }
                    if !(br.is_finite() && bi.is_finite()) {
                        st.special = true;
                    }
                }
                if !(im.is_finite() && (re.is_finite() || re == f64::NEG_INFINITY)) {
                    st.special = true;
                }
                if re >= st.max {
                    st.max = re;
                    st.imax = k;
                }
            }
        }
    }

    /// Pass 2: `sums[j] += sum b * exp(re - M) * cis(im)` over rows `k0..k1`, skipping each
    /// lane's maximal element, zero weights and masked elements; only lanes whose pass-1
    /// state is ordinary.
    fn sum_pass(&self, k0: usize, k1: usize, states: &[MaxState], sums: &mut [C]) {
        for k in k0..k1 {
            for (j, (st, sum)) in states.iter().zip(sums.iter_mut()).enumerate() {
                if st.special || st.imax == k || !st.max.is_finite() || !self.keep.kept(k, j) {
                    continue;
                }
                let (re, im) = self.elem(k, j);
                let term = match self.weight(k, j) {
                    Some(bv) if bv.0 == 0.0 && bv.1 == 0.0 => continue,
                    Some(bv) => cmul(bv, exp_cis(re - st.max, im)),
                    None => exp_cis(re - st.max, im),
                };
                *sum = cadd(*sum, term);
            }
        }
    }

    /// Writes every lane's `(value, sign)` through `write(lane, ...)`.
    fn finish(
        &self,
        states: &[MaxState],
        sums: &[C],
        return_sign: bool,
        write: impl Fn(usize, (C, C)),
    ) {
        for (j, (&st, &sum)) in states.iter().zip(sums).enumerate() {
            let mut res = None;
            if st.imax != usize::MAX && !st.special && st.max.is_finite() {
                let wtop = self.weight(st.imax, j).unwrap_or((1.0, 0.0));
                res = lse_finish(st, self.elem(st.imax, j), wtop, sum, return_sign);
            }
            let (v, s) = res.unwrap_or_else(|| {
                let get = |k: usize| (self.elem(k, j), self.weight(k, j));
                match self.keep.kept_rows(self.tile.n, j) {
                    None => numpy_ops::logsumexp_lane::<T>(self.tile.n, get, return_sign),
                    // A fully masked lane: -inf with sign 0 (JAX), not the empty lane's NaN.
                    Some(rows) if rows.is_empty() => ((f64::NEG_INFINITY, 0.0), (0.0, 0.0)),
                    // scipy's formulas over the kept elements alone.
                    Some(rows) => {
                        numpy_ops::logsumexp_lane::<T>(rows.len(), |i| get(rows[i]), return_sign)
                    }
                }
            });
            write(
                self.tile.lane0 + j,
                numpy_ops::wrap_result(v, s, return_sign),
            );
        }
    }
}

/// The accurate result of a finite lane from its max state and excess sum, or `None` when it
/// is not finite (then scipy's own formulas decide). Returns `(value, sign)`; with
/// `return_sign` the value's imaginary part is 0.
fn lse_finish(st: MaxState, top: C, wtop: C, sum: C, return_sign: bool) -> Option<(C, C)> {
    if st.special || !st.max.is_finite() {
        return None;
    }
    // The maximal term u = b_top * cis(im_top); E = sum / u, so S = u (1 + E).
    let u = cmul(wtop, (top.1.cos(), top.1.sin()));
    let e = smith_div(sum, u);
    let (log_mag, _) = log1p_excess(e);
    let re = log_mag + wtop.0.hypot(wtop.1).ln() + st.max;
    let s = cadd(u, sum);
    let value = if return_sign {
        (re, 0.0)
    } else {
        (re, s.1.atan2(s.0))
    };
    if !(value.0.is_finite() && value.1.is_finite()) {
        return None;
    }
    let norm = s.0.hypot(s.1);
    let sign = (s.0 / norm, s.1 / norm);
    if !(sign.0.is_finite() && sign.1.is_finite()) {
        return None;
    }
    Some((value, sign))
}

/// Complex `log(sum(b * exp(a)))` of every lane of `a` (interleaved pairs laid out by
/// `batch`), with scipy's semantics: the result's imaginary part lies in `(-pi, pi]`; with
/// `sign`, `out` gets `log|sum|` (imaginary part 0) and `sign` the complex unit `sum / |sum|`.
/// Zero weights remove their element, and so does `keep` where it is 0 (a fully masked lane
/// gives `-inf` with sign 0, as JAX's `where=`). `out` and `sign` hold `2 * batch.count()`
/// values.
///
/// ```
/// use stablelse::kernels::complex::logsumexp_complex;
/// use stablelse::Batch;
/// // log(e^(1+2i) + e^(1-2i)) = 1 + log(2 cos 2) (cos 2 < 0, so the phase is pi)
/// let a = [1.0f64, 2.0, 1.0, -2.0];
/// let mut out = [0.0f64; 2];
/// logsumexp_complex(&a, Batch::rows(1, 2), None, None, &mut out, None).unwrap();
/// assert!((out[0] - (1.0 + (-2.0 * 2f64.cos()).ln())).abs() < 1e-15);
/// assert!((out[1] - std::f64::consts::PI).abs() < 1e-15);
/// ```
pub fn logsumexp_complex<T: Real>(
    a: &[T],
    batch: Batch,
    b: Option<Weights<'_, T>>,
    keep: Option<Keep<'_>>,
    out: &mut [T],
    sign: Option<&mut [T]>,
) -> Result<(), String> {
    check_pairs(a, &batch, "a")?;
    if let Some(bw) = b {
        check_pairs(bw.data, &bw.batch, "b")?;
        bw.check_matches(&batch, "b")?;
    }
    check_keep(keep, &batch)?;
    check_len(out.len(), 2 * batch.count(), "out")?;
    let return_sign = sign.is_some();
    let sp = match sign {
        Some(s) => {
            check_len(s.len(), 2 * batch.count(), "sign")?;
            Some(SendPtr(s.as_mut_ptr()))
        }
        None => None,
    };
    let op = SendPtr(out.as_mut_ptr());
    let write = move |lane: usize, (v, s): (C, C)| {
        // SAFETY: each lane is finished by exactly one piece, which owns its two values
        // of out (and of sign); both hold 2 * count values (checked above).
        unsafe {
            *op.ptr().add(2 * lane) = T::from_f64(v.0);
            *op.ptr().add(2 * lane + 1) = T::from_f64(v.1);
            if let Some(sp) = sp {
                *sp.ptr().add(2 * lane) = T::from_f64(s.0);
                *sp.ptr().add(2 * lane + 1) = T::from_f64(s.1);
            }
        }
    };
    let (count, tile_of) = tiles_of(&batch);
    let btile_of = b.map(|bw| (bw.data, tiles_of(&bw.batch).1));
    let ktile_of = keep_tiles(keep);
    let view = |t: usize| WeightedTile {
        a,
        tile: tile_of(t),
        b: btile_of.map(|(data, f)| (data, f(t))),
        keep: ktile_of(t),
    };
    if batch.inner == 1 && batch.n >= 2 * LONG_ROW_BLOCK {
        // Long rows: blocks of each row in parallel, merged in block order.
        let n = batch.n;
        let blocks = n.div_ceil(LONG_ROW_BLOCK);
        let range = |blk: usize| (blk * LONG_ROW_BLOCK, ((blk + 1) * LONG_ROW_BLOCK).min(n));
        for t in 0..count {
            let v = view(t);
            let parts = parallel::map_collect(blocks, LONG_ROW_BLOCK, |blk| {
                let (k0, k1) = range(blk);
                let mut st = [MaxState::EMPTY];
                v.max_pass(k0, k1, &mut st);
                st[0]
            });
            let st = [parts
                .into_iter()
                .fold(MaxState::EMPTY, MaxState::merge_later)];
            let sums = parallel::map_collect(blocks, LONG_ROW_BLOCK, |blk| {
                let (k0, k1) = range(blk);
                let mut s = [(0.0, 0.0)];
                v.sum_pass(k0, k1, &st, &mut s);
                s[0]
            });
            let sum = sums.into_iter().fold((0.0, 0.0), cadd);
            v.finish(&st, &[sum], return_sign, write);
        }
        return Ok(());
    }
    let per_tile = batch.n.max(1) * if batch.inner == 1 { 1 } else { COL_TILE };
    parallel::for_each_piece(count, 2 * per_tile, |range| {
        let mut states = vec![MaxState::EMPTY; COL_TILE];
        let mut sums = vec![(0.0, 0.0); COL_TILE];
        for t in range {
            let v = view(t);
            let (st, su) = (&mut states[..v.tile.w], &mut sums[..v.tile.w]);
            st.fill(MaxState::EMPTY);
            su.fill((0.0, 0.0));
            v.max_pass(0, v.tile.n, st);
            v.sum_pass(0, v.tile.n, st, su);
            v.finish(st, su, return_sign, write);
        }
    });
    Ok(())
}

// ------------------------------------------------------------------------------ softmax

/// Pass-1 state of a softmax lane: NumPy's complex maximum (largest real part, then largest
/// imaginary part; first occurrence), and whether the lane holds a non-finite value.
#[derive(Clone, Copy, Debug)]
struct LexMax {
    re: f64,
    im: f64,
    k: usize,
    special: bool,
}

impl LexMax {
    const EMPTY: LexMax = LexMax {
        re: f64::NEG_INFINITY,
        im: f64::NEG_INFINITY,
        k: usize::MAX,
        special: false,
    };
}

fn softmax_max_pass<T: Real>(x: &[T], tile: &Tile, keep: KeepTile, states: &mut [LexMax]) {
    for k in 0..tile.n {
        for (j, st) in states.iter_mut().enumerate().take(tile.w) {
            if !keep.kept(k, j) {
                continue;
            }
            let (re, im) = load(x, tile.at(k, j));
            if !(re.is_finite() && im.is_finite()) {
                st.special = true;
            } else if st.k == usize::MAX || re > st.re || (re == st.re && im > st.im) {
                *st = LexMax {
                    re,
                    im,
                    k,
                    special: st.special,
                };
            }
        }
    }
}

/// Pass 2: the excess `E = sum exp(re - M) cis(im - theta)` over all but the maximal element
/// (and the masked ones).
fn softmax_sum_pass<T: Real>(
    x: &[T],
    tile: &Tile,
    keep: KeepTile,
    states: &[LexMax],
    sums: &mut [C],
) {
    for k in 0..tile.n {
        for j in 0..tile.w {
            let st = states[j];
            if st.special || st.k == k || !keep.kept(k, j) {
                continue;
            }
            let (re, im) = load(x, tile.at(k, j));
            sums[j] = cadd(sums[j], exp_cis(re - st.re, im - st.im));
        }
    }
}

/// The per-lane constants of the write pass, `log|1 + E|` and `arg(1 + E)`, or `None` for the
/// lanes [`numpy_ops`] computes.
fn softmax_finish(st: &LexMax, e: C) -> Option<C> {
    if st.special || st.k == usize::MAX {
        return None;
    }
    let l = log1p_excess(e);
    (l.0.is_finite() && l.1.is_finite()).then_some(l)
}

/// softmax or log_softmax of every lane of complex `x` (interleaved pairs laid out by
/// `batch`) into the dense `(outer, n, inner)` `out` (`2 * batch.elements()` values).
///
/// log_softmax is `x - c` with `c = (M + log|S|) + i (theta + arg S)`, `M + i theta` NumPy's
/// complex maximum of the lane and `S = sum exp(x - M - i theta)`: scipy's formula, so the
/// imaginary parts are scipy's (not wrapped). softmax is `exp(x - M) / S`, magnitude and phase
/// computed apart.
///
/// With `keep`, masked elements take no part and get `0` (softmax) or `-inf` (log_softmax),
/// imaginary part 0, as JAX's `where=`; a fully masked lane gets that everywhere.
///
/// ```
/// use stablelse::kernels::complex::softmax_like_complex;
/// use stablelse::{Batch, Reduction};
/// let x = [0.0f64, 1.0, 0.0, -1.0];
/// let mut out = [0.0f64; 4];
/// softmax_like_complex(&x, Batch::rows(1, 2), None, Reduction::Softmax, &mut out).unwrap();
/// // e^i / (e^i + e^-i) = e^i / (2 cos 1)
/// assert!((out[0] - 0.5).abs() < 1e-15 && (out[1] - 1f64.tan() / 2.0).abs() < 1e-15);
/// ```
pub fn softmax_like_complex<T: Real>(
    x: &[T],
    batch: Batch,
    keep: Option<Keep<'_>>,
    what: Reduction,
    out: &mut [T],
) -> Result<(), String> {
    check_pairs(x, &batch, "x")?;
    check_len(out.len(), 2 * batch.elements(), "out")?;
    check_keep(keep, &batch)?;
    let masked: C = match what {
        Reduction::Softmax => (0.0, 0.0),
        Reduction::LogSoftmax => (f64::NEG_INFINITY, 0.0),
    };
    let (count, tile_of) = tiles_of(&batch);
    let ktile_of = keep_tiles(keep);
    let op = SendPtr(out.as_mut_ptr());
    let (n, inner) = (batch.n, batch.inner);
    let per_tile = n.max(1) * if inner == 1 { 1 } else { COL_TILE };
    parallel::for_each_piece(count, 3 * per_tile, |range| {
        let mut states = vec![LexMax::EMPTY; COL_TILE];
        let mut sums = vec![(0.0, 0.0); COL_TILE];
        let mut consts: Vec<Option<(f64, f64, f64)>> = vec![None; COL_TILE];
        let mut lane_buf: Vec<C> = Vec::new();
        for t in range {
            let (tile, kt) = (tile_of(t), ktile_of(t));
            let (st, su) = (&mut states[..tile.w], &mut sums[..tile.w]);
            st.fill(LexMax::EMPTY);
            su.fill((0.0, 0.0));
            softmax_max_pass(x, &tile, kt, st);
            softmax_sum_pass(x, &tile, kt, st, su);
            // Output element (k, j) of the tile is dense element o * n * inner + k * inner + j.
            let (o, j0) = (tile.lane0 / inner, tile.lane0 % inner);
            let dst = |k: usize, j: usize| o * n * inner + k * inner + j0 + j;
            let put = |e: usize, v: C| {
                // SAFETY: every output element belongs to exactly one tile, written once by
                // the piece that owns the tile; out holds 2 * elements values (checked).
                unsafe {
                    *op.ptr().add(2 * e) = T::from_f64(v.0);
                    *op.ptr().add(2 * e + 1) = T::from_f64(v.1);
                }
            };
            // Lanes [`numpy_ops`] computes (over their kept elements) are written one by one;
            // the others row by row, so a column tile's output is written in whole cache lines.
            for j in 0..tile.w {
                consts[j] = softmax_finish(&st[j], su[j]).map(|(l, a)| (l, a, (-l).exp()));
                if consts[j].is_none() {
                    let rows = kt.kept_rows(n, j);
                    let at = |i: usize| rows.as_ref().map_or(i, |r| r[i]);
                    lane_buf.clear();
                    lane_buf.extend(
                        (0..rows.as_ref().map_or(n, Vec::len)).map(|i| load(x, tile.at(at(i), j))),
                    );
                    numpy_ops::softmax_lane::<T>(&mut lane_buf, what);
                    if rows.is_some() {
                        for k in 0..n {
                            put(dst(k, j), masked);
                        }
                    }
                    for (i, v) in lane_buf.iter().enumerate() {
                        put(dst(at(i), j), *v);
                    }
                }
            }
            for k in 0..n {
                for (j, (c, s)) in consts.iter().zip(st.iter()).enumerate().take(tile.w) {
                    let Some((log_s, arg_s, inv_s)) = *c else {
                        continue;
                    };
                    if !kt.kept(k, j) {
                        put(dst(k, j), masked);
                        continue;
                    }
                    let (re, im) = load(x, tile.at(k, j));
                    let (dr, di) = (re - s.re, (im - s.im) - arg_s);
                    let v = match what {
                        Reduction::LogSoftmax => (dr - log_s, di),
                        Reduction::Softmax => {
                            let m = dr.exp() * inv_s;
                            let (sn, cs) = di.sin_cos();
                            (m * cs, m * sn)
                        }
                    };
                    put(dst(k, j), v);
                }
            }
        }
    });
    Ok(())
}

fn smith_div(a: C, b: C) -> C {
    numpy_ops::div(a, b, |v| v)
}

/// scipy's formulas with NumPy's complex operations, for the lanes the accurate path does not
/// take (non-finite elements, non-finite results). Every operation rounds to the input's
/// precision (`rt::<T>`), as NumPy computes complex64 in complex64.
pub mod numpy_ops {
    use super::{cadd, C};
    use crate::kernels::Reduction;
    use crate::real::Real;
    use std::f64::consts::PI;

    /// Rounds to `T`'s precision.
    #[inline]
    fn rt<T: Real>(v: f64) -> f64 {
        T::from_f64(v).to_f64()
    }

    fn r<T: Real>(z: C) -> C {
        (rt::<T>(z.0), rt::<T>(z.1))
    }

    fn is_finite(z: C) -> bool {
        z.0.is_finite() && z.1.is_finite()
    }

    /// C99 `cexp` (Annex G special values), as NumPy's `exp`.
    pub fn exp<T: Real>(z: C) -> C {
        let (x, y) = z;
        if y == 0.0 {
            return (rt::<T>(x.exp()), y);
        }
        if x == f64::NEG_INFINITY {
            return if y.is_finite() {
                (0.0 * y.cos(), 0.0 * y.sin())
            } else {
                (0.0, 0.0f64.copysign(y))
            };
        }
        if !y.is_finite() {
            return if x == f64::INFINITY {
                (f64::INFINITY, f64::NAN)
            } else {
                (f64::NAN, f64::NAN)
            };
        }
        if x.is_nan() {
            return (f64::NAN, f64::NAN);
        }
        let t = rt::<T>(x.exp());
        let (s, c) = y.sin_cos();
        r::<T>((t * rt::<T>(c), t * rt::<T>(s)))
    }

    /// C99 `clog`: `log|z| + i atan2(im, re)` (hypot and atan2 give Annex G's special values).
    pub fn log<T: Real>(z: C) -> C {
        r::<T>((z.0.hypot(z.1).ln(), z.1.atan2(z.0)))
    }

    /// NumPy's complex `log1p`: `log(1 + z)` evaluated as written.
    pub fn log1p<T: Real>(z: C) -> C {
        log::<T>((rt::<T>(z.0 + 1.0), z.1))
    }

    /// NumPy's complex multiplication (no C99 infinity recovery).
    pub fn mul<T: Real>(a: C, b: C) -> C {
        r::<T>((
            rt::<T>(a.0 * b.0) - rt::<T>(a.1 * b.1),
            rt::<T>(a.0 * b.1) + rt::<T>(a.1 * b.0),
        ))
    }

    /// NumPy's complex division (Smith's method), each step rounded by `rt`.
    pub fn div(a: C, b: C, rt: impl Fn(f64) -> f64) -> C {
        let (ar, ai, br, bi) = (a.0, a.1, b.0, b.1);
        if br.abs() >= bi.abs() {
            if br == 0.0 && bi == 0.0 {
                return (rt(ar / br.abs()), rt(ai / br.abs()));
            }
            let rat = rt(bi / br);
            let scl = rt(1.0 / rt(br + rt(bi * rat)));
            (
                rt(rt(ar + rt(ai * rat)) * scl),
                rt(rt(ai - rt(ar * rat)) * scl),
            )
        } else {
            let rat = rt(br / bi);
            let scl = rt(1.0 / rt(bi + rt(br * rat)));
            (
                rt(rt(rt(ar * rat) + ai) * scl),
                rt(rt(rt(ai * rat) - ar) * scl),
            )
        }
    }

    fn cdiv<T: Real>(a: C, b: C) -> C {
        div(a, b, rt::<T>)
    }

    /// The array-API `sign` scipy uses: `z / |z|`, and 0 for 0.
    pub fn sign<T: Real>(z: C) -> C {
        if z.0 == 0.0 && z.1 == 0.0 {
            return (0.0, 0.0);
        }
        cdiv::<T>(z, (rt::<T>(z.0.hypot(z.1)), 0.0))
    }

    fn sub<T: Real>(a: C, b: C) -> C {
        r::<T>((a.0 - b.0, a.1 - b.1))
    }

    fn add<T: Real>(a: C, b: C) -> C {
        r::<T>(cadd(a, b))
    }

    /// scipy's `_wrap_radians`: `x` if `|x| < pi`, else `-((-x + pi) mod 2 pi - pi)` with
    /// NumPy's floored remainder.
    pub fn wrap_radians(x: f64) -> f64 {
        if x.abs() < PI {
            return x;
        }
        let a = -x + PI;
        let b = 2.0 * PI;
        let mut m = a % b;
        if m != 0.0 {
            if (b < 0.0) != (m < 0.0) {
                m += b;
            }
        } else {
            m = 0.0f64.copysign(b);
        }
        -(m - PI)
    }

    /// scipy's last step for complex results, `real + wrap(imag) * 1j` evaluated with NumPy's
    /// complex arithmetic (a NaN imaginary part makes the real part NaN, as in scipy), applied
    /// to the value, or to the sign when `return_sign`.
    pub fn wrap_result(v: C, s: C, return_sign: bool) -> (C, C) {
        let f = |z: C| {
            let w = wrap_radians(z.1);
            (z.0 + (w * 0.0 - 0.0), 0.0 + w)
        };
        if return_sign {
            (v, f(s))
        } else {
            (f(v), s)
        }
    }

    /// scipy's complex `logsumexp` of one lane, transcribed: `get(k)` gives element `k` and its
    /// weight. Returns `(value, sign)` before [`wrap_result`]; with `return_sign` the value is
    /// real (imaginary part 0). A lane of no elements gives `-inf` and a NaN sign, as scipy.
    pub fn logsumexp_lane<T: Real>(
        n: usize,
        get: impl Fn(usize) -> (C, Option<C>),
        return_sign: bool,
    ) -> (C, C) {
        const NEG_INF: C = (f64::NEG_INFINITY, 0.0);
        if n == 0 {
            return (NEG_INF, (f64::NAN, f64::NAN));
        }
        let weighted = get(0).1.is_some();
        let one: C = (1.0, 0.0);
        // Zero weights remove their element.
        let elem = |k: usize| {
            let (a, b) = get(k);
            match b {
                Some(b) if b.0 == 0.0 && b.1 == 0.0 => (NEG_INF, b),
                Some(b) => (a, b),
                None => (a, one),
            }
        };
        // The element with the largest real part (the last of ties); NaN propagates.
        let mut max = f64::NEG_INFINITY;
        let mut nan = false;
        for k in 0..n {
            let re = elem(k).0 .0;
            if re.is_nan() {
                nan = true;
            } else if re > max {
                max = re;
            }
        }
        let imax = if nan {
            None
        } else {
            (0..n).rev().find(|&k| elem(k).0 .0 == max)
        };
        let is_max = |k: usize| imax.is_none_or(|i| i == k);
        let a_max = match imax {
            Some(i) => elem(i).0,
            None => (0..n).fold((0.0, 0.0), |acc, k| add::<T>(acc, elem(k).0)),
        };
        let mut m = (0.0, 0.0);
        let mut s = (0.0, 0.0);
        for k in 0..n {
            let (a, b) = elem(k);
            let mask = if is_max(k) { one } else { (0.0, 0.0) };
            m = add::<T>(m, if weighted { mul::<T>(b, mask) } else { mask });
            let a = if is_max(k) { NEG_INF } else { a };
            let e = exp::<T>(sub::<T>(a, a_max));
            s = add::<T>(s, if weighted { mul::<T>(b, e) } else { e });
        }
        if !(s.0 == 0.0 && s.1 == 0.0) {
            s = cdiv::<T>(s, m);
        }
        let sp1 = (rt::<T>(s.0 + 1.0), s.1);
        let phase = exp::<T>((a_max.1 * 0.0 - 0.0, a_max.1 + 0.0));
        let sgn = mul::<T>(mul::<T>(sign::<T>(sp1), sign::<T>(m)), phase);
        let mut out = add::<T>(add::<T>(log1p::<T>(s), log::<T>(m)), a_max);
        let finite = if return_sign {
            out = (out.0, 0.0);
            out.0.is_finite()
        } else {
            is_finite(out)
        };
        if finite {
            return (out, sgn);
        }
        // Where the result is not finite scipy takes log(sum(b * exp(a))) of the original a.
        let mut sum = (0.0, 0.0);
        for k in 0..n {
            let (a, b) = get(k);
            let e = exp::<T>(a);
            sum = add::<T>(sum, b.map_or(e, |b| mul::<T>(b, e)));
        }
        if return_sign {
            ((rt::<T>(sum.0.hypot(sum.1)).ln(), 0.0), sign::<T>(sum))
        } else {
            (log::<T>(sum), sgn)
        }
    }

    /// NumPy's complex `max` of a lane: lexicographic, the first NaN element wins.
    fn numpy_max(x: &[C]) -> C {
        let isnan = |z: C| z.0.is_nan() || z.1.is_nan();
        let ge = |x: C, y: C| {
            (x.0 > y.0 && !x.1.is_nan() && !y.1.is_nan()) || (x.0 == y.0 && x.1 >= y.1)
        };
        let mut acc = x[0];
        for &v in &x[1..] {
            if !(isnan(acc) || ge(acc, v)) {
                acc = v;
            }
        }
        acc
    }

    /// scipy's complex softmax / log_softmax of one lane, transcribed, in place.
    pub fn softmax_lane<T: Real>(x: &mut [C], what: Reduction) {
        if x.is_empty() {
            return;
        }
        let mut x_max = numpy_max(x);
        if what == Reduction::LogSoftmax && !is_finite(x_max) {
            x_max = (0.0, 0.0);
        }
        let mut sum = (0.0, 0.0);
        for v in x.iter_mut() {
            *v = sub::<T>(*v, x_max);
            sum = add::<T>(sum, exp::<T>(*v));
        }
        match what {
            Reduction::Softmax => {
                for v in x.iter_mut() {
                    *v = cdiv::<T>(exp::<T>(*v), sum);
                }
            }
            Reduction::LogSoftmax => {
                let l = log::<T>(sum);
                for v in x.iter_mut() {
                    *v = sub::<T>(*v, l);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lse(a: &[C], b: Option<&[C]>, sign: bool) -> (C, C) {
        let flat: Vec<f64> = a.iter().flat_map(|z| [z.0, z.1]).collect();
        let bflat: Vec<f64> = b.map_or(vec![], |b| b.iter().flat_map(|z| [z.0, z.1]).collect());
        let batch = Batch::rows(1, a.len());
        let w = b.map(|_| Weights {
            data: &bflat,
            batch,
        });
        let mut out = [0.0; 2];
        let mut sg = [0.0; 2];
        logsumexp_complex(&flat, batch, w, None, &mut out, sign.then_some(&mut sg[..])).unwrap();
        ((out[0], out[1]), (sg[0], sg[1]))
    }

    /// `log(sum(exp(a)))` summed naively (finite, well-scaled inputs only).
    fn naive(a: &[C]) -> C {
        let s = a.iter().fold((0.0, 0.0), |acc, z| {
            cadd(acc, (z.0.exp() * z.1.cos(), z.0.exp() * z.1.sin()))
        });
        (s.0.hypot(s.1).ln(), s.1.atan2(s.0))
    }

    #[test]
    fn matches_naive_sum_and_wraps_phase() {
        let a = [(1.0, 1.0), (2.0, -1.0), (-2.0, 3.0), (0.5, 39.0)];
        let (v, _) = lse(&a, None, false);
        let r = naive(&a);
        assert!(
            (v.0 - r.0).abs() < 1e-14 && (v.1 - r.1).abs() < 1e-14,
            "{v:?} {r:?}"
        );
        assert!(v.1.abs() <= std::f64::consts::PI);
    }

    #[test]
    fn excess_keeps_tiny_terms_and_small_phases() {
        let (v, _) = lse(&[(0.0, 0.0), (-40.0, 0.0)], None, false);
        assert!((v.0 - 4.248354255291589e-18).abs() < 1e-32, "{v:?}");
        let (v, _) = lse(&[(0.0, 0.0), (0.0, 2.2204460492503132e-17)], None, false);
        assert!((v.1 - 1.1102230246251566e-17).abs() < 1e-31, "{v:?}");
    }

    #[test]
    fn sign_is_the_unit_of_the_sum() {
        let a = [(1.0, 1.0), (2.0, -1.0), (-2.0, 3.0)];
        let (v, s) = lse(&a, None, true);
        let r = naive(&a);
        assert_eq!(v.1, 0.0);
        assert!((v.0 - r.0).abs() < 1e-14);
        assert!((s.0 - r.1.cos()).abs() < 1e-14 && (s.1 - r.1.sin()).abs() < 1e-14);
    }

    #[test]
    fn zero_weights_remove_elements() {
        let inf = f64::INFINITY;
        let a = [(1.0, 0.5), (inf, 0.0)];
        let b = [(2.0, 0.0), (0.0, 0.0)];
        let (v, _) = lse(&a, Some(&b), false);
        assert!((v.0 - (1.0 + 2f64.ln())).abs() < 1e-15 && (v.1 - 0.5).abs() < 1e-15);
    }

    #[test]
    fn specials_follow_c99_through_numpy_ops() {
        let inf = f64::INFINITY;
        // All -inf: log(0) = -inf, phase 0.
        let (v, _) = lse(&[(-inf, 0.0), (-inf, 0.0)], None, false);
        assert_eq!(v, (-inf, 0.0));
        // +inf with phases in opposite half planes: the real parts cancel to NaN.
        let (v, _) = lse(&[(inf, 0.7533), (inf, 2.3562)], None, false);
        assert!(v.0.is_nan() && v.1.is_nan());
        let (v, _) = lse(&[(inf, 0.0), (1.0, 1.0)], None, false);
        assert_eq!(v, (inf, 0.0));
        // Empty: -inf and a NaN sign.
        let (v, s) = lse(&[], None, true);
        assert_eq!(v.0, -inf);
        assert!(s.0.is_nan() && s.1.is_nan());
    }

    #[test]
    fn long_rows_and_columns_match_short_rows() {
        let n = 2 * LONG_ROW_BLOCK + 17;
        let x: Vec<f64> = (0..2 * n)
            .map(|i| ((i as f64) * 0.37).sin() * 5.0)
            .collect();
        let mut long = [0.0; 2];
        logsumexp_complex(&x, Batch::rows(1, n), None, None, &mut long, None).unwrap();
        // The same row as a column (inner = 3 copies) goes through the tile path.
        let mut cols = vec![0.0; 6 * n];
        for k in 0..n {
            for j in 0..3 {
                cols[2 * (3 * k + j)] = x[2 * k];
                cols[2 * (3 * k + j) + 1] = x[2 * k + 1];
            }
        }
        let mut out = [0.0; 6];
        logsumexp_complex(
            &cols,
            Batch::contiguous(1, n, 3),
            None,
            None,
            &mut out,
            None,
        )
        .unwrap();
        for j in 0..3 {
            assert!((out[2 * j] - long[0]).abs() < 1e-12 * long[0].abs().max(1.0));
            assert!((out[2 * j + 1] - long[1]).abs() < 1e-11);
        }
    }

    #[test]
    fn softmax_sums_to_one_and_log_softmax_exponentiates_to_it() {
        let x = [0.5, 2.0, -1.0, 0.25, 3.0, -7.0, 3.0, 1.0];
        let batch = Batch::rows(1, 4);
        let mut sm = [0.0; 8];
        let mut ls = [0.0; 8];
        softmax_like_complex(&x, batch, None, Reduction::Softmax, &mut sm).unwrap();
        softmax_like_complex(&x, batch, None, Reduction::LogSoftmax, &mut ls).unwrap();
        let total = (0..4).fold((0.0, 0.0), |acc, k| cadd(acc, (sm[2 * k], sm[2 * k + 1])));
        assert!(
            (total.0 - 1.0).abs() < 1e-14 && total.1.abs() < 1e-14,
            "{total:?}"
        );
        for k in 0..4 {
            let e = exp_cis(ls[2 * k], ls[2 * k + 1]);
            assert!((e.0 - sm[2 * k]).abs() < 1e-14 && (e.1 - sm[2 * k + 1]).abs() < 1e-14);
        }
    }

    #[test]
    fn a_mask_removes_its_elements_whatever_they_hold() {
        let (inf, nan) = (f64::INFINITY, f64::NAN);
        // Two rows of 3: the masked NaN / +inf take no part; the second row is fully masked.
        let x = [1.0, 1.0, nan, 0.0, 2.0, -1.0, inf, 0.0, 3.0, 1.0, 0.5, 0.5];
        let keep = [1u8, 0, 1, 0, 0, 0];
        let batch = Batch::rows(2, 3);
        let k = Some(Keep { data: &keep, batch });
        let (mut out, mut sg) = ([0.0; 4], [0.0; 4]);
        logsumexp_complex(&x, batch, None, k, &mut out, Some(&mut sg[..])).unwrap();
        let (want, want_sign) = lse(&[(1.0, 1.0), (2.0, -1.0)], None, true);
        assert_eq!((out[0], out[1]), want);
        assert_eq!((sg[0], sg[1]), want_sign);
        assert_eq!(
            (out[2], out[3], sg[2], sg[3]),
            (f64::NEG_INFINITY, 0.0, 0.0, 0.0)
        );
        for (what, masked) in [
            (Reduction::Softmax, (0.0, 0.0)),
            (Reduction::LogSoftmax, (f64::NEG_INFINITY, 0.0)),
        ] {
            let mut got = [0.0; 12];
            softmax_like_complex(&x, batch, k, what, &mut got).unwrap();
            let mut kept = [0.0; 4];
            let pair = [1.0, 1.0, 2.0, -1.0];
            softmax_like_complex(&pair, Batch::rows(1, 2), None, what, &mut kept).unwrap();
            assert_eq!([got[0], got[1], got[4], got[5]], kept);
            assert_eq!((got[2], got[3]), masked);
            assert!(got[6..].chunks(2).all(|v| (v[0], v[1]) == masked));
        }
    }

    #[test]
    fn wrap_radians_matches_scipy() {
        let pi = std::f64::consts::PI;
        let cases = [
            (-pi - 1.0, pi - 1.0),
            (-pi, pi),
            (-1.0, -1.0),
            (0.0, 0.0),
            (pi, pi),
            (pi + 1.0, -pi + 1.0),
        ];
        for (x, want) in cases {
            let got = numpy_ops::wrap_radians(x);
            assert!((got - want).abs() <= 4.0 * f64::EPSILON, "{x} {got} {want}");
        }
        assert!(numpy_ops::wrap_radians(f64::NAN).is_nan());
    }

    #[test]
    fn bad_buffers_are_errors() {
        let fails = |a: &[f64], n: usize, keep: Option<Keep<'_>>, out: &mut [f64]| {
            logsumexp_complex(a, Batch::rows(1, n), None, keep, out, None).is_err()
        };
        let mut out = [0.0f64; 2];
        assert!(fails(&[1.0], 1, None, &mut out)); // an odd number of parts
        assert!(fails(&[1.0, 0.0], 2, None, &mut out)); // fewer elements than the batch
        assert!(fails(&[1.0, 0.0], 1, None, &mut [0.0])); // out too short
        let keep = |data, n| {
            Some(Keep {
                data,
                batch: Batch::rows(1, n),
            })
        };
        assert!(fails(&[1.0, 0.0], 1, keep(&[1, 1], 2), &mut out)); // a mask of another shape
        assert!(fails(&[1.0, 0.0], 1, keep(&[], 1), &mut out)); // a mask short of its batch
        assert!(!fails(&[1.0, 0.0], 1, keep(&[1], 1), &mut out));
    }
}
