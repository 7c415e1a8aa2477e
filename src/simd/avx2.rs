//! AVX2 + FMA kernels: the same algorithms as [`super::avx512`] on 4 float64 lanes (8 float32
//! lanes for the float32 exp). Without `vscalefpd`/`vpermt2pd`, `2^k` is built from the
//! exponent bits in two halves (so subnormal results round once) and the 16-entry table is
//! gathered.

#![allow(clippy::missing_safety_doc)]

use super::consts::*;
use crate::state::LseState;
use std::arch::x86_64::*;

const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// `2^e` for integral float64 `e` in [-1022, 1023].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn pow2_pd(e: __m256d) -> __m256d {
    // e + 2^52 + 1023 holds the biased exponent in its low bits; shift it into place.
    let b = _mm256_add_pd(e, _mm256_set1_pd(4503599627370496.0 + 1023.0));
    _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_castpd_si256(b)))
}

/// float64 exp, as `avx512::exp_pd` (same reduction, table and polynomials).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_pd(t: __m256d, full: bool) -> __m256d {
    let t = _mm256_max_pd(_mm256_set1_pd(-746.0), t);
    let t = _mm256_min_pd(_mm256_set1_pd(710.0), t);
    let magic = _mm256_set1_pd(ROUND_MAGIC);
    let kd = _mm256_fmadd_pd(t, _mm256_set1_pd(SIXTEEN_OVER_LN2), magic);
    let kf = _mm256_sub_pd(kd, magic);
    let mut r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_OVER_16_HI), t);
    if full {
        r = _mm256_fnmadd_pd(kf, _mm256_set1_pd(LN2_OVER_16_LO), r);
    }
    let j = _mm256_and_si256(_mm256_castpd_si256(kd), _mm256_set1_epi64x(15));
    // SAFETY: j is in 0..16 and EXP2_J16 holds 16 f64.
    let tab = unsafe { _mm256_i64gather_pd::<8>(EXP2_J16.as_ptr(), j) };
    let coeffs: &[f64] = if full { &TAYLOR7 } else { &TAYLOR4 };
    let mut a = _mm256_set1_pd(coeffs[0]);
    for &c in &coeffs[1..] {
        a = _mm256_fmadd_pd(a, r, _mm256_set1_pd(c));
    }
    let y = _mm256_fmadd_pd(tab, _mm256_mul_pd(a, r), tab);
    // 2^floor(kf/16) in two factors so that neither leaves the normal range.
    let e = _mm256_floor_pd(_mm256_mul_pd(kf, _mm256_set1_pd(1.0 / 16.0)));
    let e1 = _mm256_floor_pd(_mm256_mul_pd(e, _mm256_set1_pd(0.5)));
    let e2 = _mm256_sub_pd(e, e1);
    _mm256_mul_pd(_mm256_mul_pd(y, pow2_pd(e1)), pow2_pd(e2))
}

/// float32 exp in float32 arithmetic, as `avx512::exp_ps` (< 1 ULP).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_ps(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_set1_ps(100.0), x);
    let x = _mm256_max_ps(_mm256_set1_ps(-110.0), x);
    let k = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(x, _mm256_set1_ps(F32_LOG2E)));
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(F32_LN2_HI), x);
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(F32_LN2_LO), r);
    let mut u = _mm256_set1_ps(F32_EXP_POLY[0]);
    for &c in &F32_EXP_POLY[1..] {
        u = _mm256_fmadd_ps(u, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), u, r);
    let p = _mm256_add_ps(_mm256_set1_ps(1.0), p);
    // k in [-159, 145]: 2^k as 2^k1 * 2^k2, both normal, so a subnormal result rounds once.
    let ki = _mm256_cvtps_epi32(k);
    let k1 = _mm256_srai_epi32::<1>(ki);
    let k2 = _mm256_sub_epi32(ki, k1);
    let pow = |k: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )))
    };
    _mm256_mul_ps(_mm256_mul_ps(p, pow(k1)), pow(k2))
}

/// An input element type seen as 4 float64 lanes.
pub trait Lanes: Copy + 'static + crate::Real {
    const FULL: bool;
    const BLOCK: usize;
    unsafe fn load4(p: *const Self) -> __m256d;
    unsafe fn store4(p: *mut Self, v: __m256d);
    unsafe fn max(p: *const Self, n: usize) -> f64;
}

/// Loads `n < 4` elements, the other lanes `-inf`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_tail<T: Lanes>(p: *const T, n: usize) -> __m256d {
    let mut buf = [T::NEG_INFINITY; 4];
    // SAFETY: the caller guarantees n readable elements, n < 4.
    unsafe {
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        T::load4(buf.as_ptr())
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store_tail<T: Lanes>(p: *mut T, v: __m256d, n: usize) {
    let mut buf = [T::NEG_INFINITY; 4];
    // SAFETY: the caller guarantees n writable elements, n < 4.
    unsafe {
        T::store4(buf.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
}

impl Lanes for f32 {
    const FULL: bool = false;
    const BLOCK: usize = 2048;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const f32) -> __m256d {
        // SAFETY: the caller guarantees 4 readable elements.
        _mm256_cvtps_pd(unsafe { _mm_loadu_ps(p) })
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store4(p: *mut f32, v: __m256d) {
        // SAFETY: the caller guarantees 4 writable elements.
        unsafe { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max(p: *const f32, n: usize) -> f64 {
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let mut i = 0;
        // SAFETY: every load is within the n elements.
        unsafe {
            while i + 32 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_max_ps(*acc, _mm256_loadu_ps(p.add(i + 8 * a)));
                }
                i += 32;
            }
        }
        let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        // SAFETY: lanes holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let mut best = f32::NEG_INFINITY;
        // A NaN anywhere makes the result NaN (f32::max would drop it): NaN poisons `best`.
        for v in lanes
            .into_iter()
            .chain((i..n).map(|k| unsafe { *p.add(k) }))
        {
            if v.is_nan() || best.is_nan() {
                best = f32::NAN;
            } else if v > best {
                best = v;
            }
        }
        best as f64
    }
}

impl Lanes for f64 {
    const FULL: bool = true;
    const BLOCK: usize = 1024;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const f64) -> __m256d {
        // SAFETY: the caller guarantees 4 readable elements.
        unsafe { _mm256_loadu_pd(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store4(p: *mut f64, v: __m256d) {
        // SAFETY: the caller guarantees 4 writable elements.
        unsafe { _mm256_storeu_pd(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max(p: *const f64, n: usize) -> f64 {
        let mut acc = [_mm256_set1_pd(f64::NEG_INFINITY); 4];
        let mut i = 0;
        // SAFETY: every load is within the n elements.
        unsafe {
            while i + 16 <= n {
                for (a, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_max_pd(*acc, _mm256_loadu_pd(p.add(i + 4 * a)));
                }
                i += 16;
            }
        }
        let m = _mm256_max_pd(_mm256_max_pd(acc[0], acc[1]), _mm256_max_pd(acc[2], acc[3]));
        let mut lanes = [0.0f64; 4];
        // SAFETY: lanes holds 4 f64.
        unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), m) };
        let mut best = f64::NEG_INFINITY;
        for v in lanes
            .into_iter()
            .chain((i..n).map(|k| unsafe { *p.add(k) }))
        {
            if v.is_nan() || best.is_nan() {
                best = f64::NAN;
            } else if v > best {
                best = v;
            }
        }
        best
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256d) -> f64 {
    let mut a = [0.0f64; 4];
    // SAFETY: a holds 4 f64.
    unsafe { _mm256_storeu_pd(a.as_mut_ptr(), v) };
    (a[0] + a[1]) + (a[2] + a[3])
}

/// Sum of `exp(x - m)` over the `n` elements at `p` that are `!= m` (NaN included) and the
/// count of ties, fused with the max of the `qn` elements of the next block at `q` (see
/// `avx512::sum_below_max_next`: the next block's loads overlap this block's exps).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_below_max_next<T: Lanes>(
    p: *const T,
    n: usize,
    m: f64,
    q: *const T,
    qn: usize,
) -> (__m256d, u64, f64) {
    let mv = _mm256_set1_pd(m);
    let mut acc = [_mm256_setzero_pd(); 2];
    let mut mx = [_mm256_set1_pd(f64::NEG_INFINITY); 2];
    let mut ties = 0u64;
    let mut step = |x: __m256d, acc: &mut __m256d| {
        let e = exp_pd(_mm256_sub_pd(x, mv), T::FULL);
        let tie = _mm256_cmp_pd::<_CMP_EQ_OQ>(x, mv);
        ties += _mm256_movemask_pd(tie).count_ones() as u64;
        *acc = _mm256_add_pd(*acc, _mm256_andnot_pd(tie, e));
    };
    let (mut i, mut qi) = (0, 0);
    // SAFETY: loads stay within the n elements at p and the qn at q; tail lanes are -inf.
    unsafe {
        while i + 8 <= n {
            if qi + 8 <= qn {
                mx[0] = _mm256_max_pd(mx[0], T::load4(q.add(qi)));
                mx[1] = _mm256_max_pd(mx[1], T::load4(q.add(qi + 4)));
                qi += 8;
            }
            step(T::load4(p.add(i)), &mut acc[0]);
            step(T::load4(p.add(i + 4)), &mut acc[1]);
            i += 8;
        }
        while i < n {
            let x = if i + 4 <= n {
                T::load4(p.add(i))
            } else {
                load_tail(p.add(i), n - i)
            };
            step(x, &mut acc[0]);
            i += 4;
        }
        while qi < qn {
            let x = if qi + 4 <= qn {
                T::load4(q.add(qi))
            } else {
                load_tail(q.add(qi), qn - qi)
            };
            mx[0] = _mm256_max_pd(mx[0], x);
            qi += 4;
        }
    }
    let mut lanes = [0.0f64; 4];
    // SAFETY: lanes holds 4 f64.
    unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_max_pd(mx[0], mx[1])) };
    let next_max = lanes.into_iter().fold(f64::NEG_INFINITY, f64::max);
    (_mm256_add_pd(acc[0], acc[1]), ties, next_max)
}

/// Two-pass `(max, excess)` of a contiguous row in L1 blocks, each block's exp-sum fused
/// with the next block's max, merged by the online rule (see `avx512::state_two_pass`).
/// A NaN may hide from the vector max (`maxpd` drops it), but then the max is finite and the
/// NaN shows in the sum; an all `-inf` block is checked for NaN explicitly.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn state_two_pass<T: Lanes>(x: *const T, n: usize) -> LseState {
    let mut m = f64::NEG_INFINITY;
    let mut below = _mm256_setzero_pd();
    let mut ties = 0u64;
    let mut start = 0;
    let mut len = T::BLOCK.min(n);
    // SAFETY: the first block lies inside the row.
    let mut bm = unsafe { T::max(x, len) };
    while len > 0 {
        let next = start + len;
        let next_len = T::BLOCK.min(n - next);
        // SAFETY: this block and the next lie inside the row.
        let (p, q) = unsafe { (x.add(start), x.add(next)) };
        let next_max;
        if bm.is_finite() {
            if bm > m {
                let scale = (m - bm).exp();
                below = _mm256_mul_pd(below, _mm256_set1_pd(scale));
                below = _mm256_add_pd(below, _mm256_set_pd(0.0, 0.0, 0.0, ties as f64 * scale));
                ties = 0;
                m = bm;
            }
            // SAFETY: as above.
            let (b, t, nm) = unsafe { sum_below_max_next(p, len, m, q, next_len) };
            below = _mm256_add_pd(below, b);
            ties += t;
            next_max = nm;
        } else if bm == f64::NEG_INFINITY && !super::has_nan(p, len) {
            // SAFETY: as above.
            next_max = unsafe { T::max(q, next_len) };
        } else {
            // SAFETY: the whole row is readable.
            return unsafe { crate::kernels::scalar::lse_state_two_pass(x, 0, n, 1) };
        }
        start = next;
        len = next_len;
        bm = next_max;
    }
    super::finish_state(m, hsum(below), ties)
}

/// Per-lane online `(max, below, ties)`, as `avx512::OnlineLanes`.
#[derive(Clone, Copy)]
pub struct OnlineLanes {
    m: __m256d,
    below: __m256d,
    ties: __m256d,
}

impl OnlineLanes {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn new() -> OnlineLanes {
        OnlineLanes {
            m: _mm256_set1_pd(f64::NEG_INFINITY),
            below: _mm256_setzero_pd(),
            ties: _mm256_setzero_pd(),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn push(&mut self, x: __m256d, full: bool) {
        let gt = _mm256_cmp_pd::<_CMP_GT_OQ>(x, self.m);
        if _mm256_movemask_pd(gt) != 0 {
            let m_new = _mm256_blendv_pd(self.m, x, gt);
            let scale = exp_pd(_mm256_sub_pd(self.m, m_new), full);
            let total = _mm256_mul_pd(_mm256_add_pd(self.below, self.ties), scale);
            self.below = _mm256_blendv_pd(self.below, total, gt);
            self.ties = _mm256_andnot_pd(gt, self.ties);
            self.m = m_new;
        }
        let tie = _mm256_cmp_pd::<_CMP_EQ_OQ>(x, self.m);
        let e = exp_pd(_mm256_sub_pd(x, self.m), full);
        self.below = _mm256_add_pd(self.below, _mm256_andnot_pd(tie, e));
        self.ties = _mm256_add_pd(self.ties, _mm256_and_pd(tie, _mm256_set1_pd(1.0)));
    }

    #[target_feature(enable = "avx2,fma")]
    fn states(&self) -> [LseState; 4] {
        let (mut m, mut b, mut t) = ([0.0f64; 4], [0.0f64; 4], [0.0f64; 4]);
        // SAFETY: each array holds 4 f64.
        unsafe {
            _mm256_storeu_pd(m.as_mut_ptr(), self.m);
            _mm256_storeu_pd(b.as_mut_ptr(), self.below);
            _mm256_storeu_pd(t.as_mut_ptr(), self.ties);
        }
        std::array::from_fn(|l| super::lane_state(m[l], b[l], t[l]))
    }
}

/// One-pass `(max, excess)` of a contiguous row: 8 online lanes merged in lane order.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn state_online<T: Lanes>(x: *const T, n: usize) -> LseState {
    let mut lanes = [OnlineLanes::new(), OnlineLanes::new()];
    let mut i = 0;
    // SAFETY: loads stay within the n elements; tail lanes are -inf.
    unsafe {
        while i + 8 <= n {
            lanes[0].push(T::load4(x.add(i)), T::FULL);
            lanes[1].push(T::load4(x.add(i + 4)), T::FULL);
            i += 8;
        }
        while i < n {
            let v = if i + 4 <= n {
                T::load4(x.add(i))
            } else {
                load_tail(x.add(i), n - i)
            };
            lanes[0].push(v, T::FULL);
            i += 4;
        }
    }
    let mut s = LseState::EMPTY;
    for l in &lanes {
        for st in l.states() {
            s = s.merge(st);
        }
    }
    s
}

/// Applies `f` to 4-lane vectors of `x`, writing `out`; `out` may equal `x`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn map<T: Lanes>(x: *const T, out: *mut T, n: usize, f: impl Fn(__m256d) -> __m256d) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements; each vector is read first.
    unsafe {
        while i + 4 <= n {
            T::store4(out.add(i), f(T::load4(x.add(i))));
            i += 4;
        }
        if i < n {
            store_tail(out.add(i), f(load_tail(x.add(i), n - i)), n - i);
        }
    }
}

/// `out[k] = scale * exp(x[k] - shift)`; `out` may equal `x`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_scaled<T: Lanes>(x: *const T, out: *mut T, n: usize, shift: f64, scale: f64) {
    let (sh, sc) = (_mm256_set1_pd(shift), _mm256_set1_pd(scale));
    // SAFETY: forwarded from the caller.
    unsafe {
        map(x, out, n, |v| {
            _mm256_mul_pd(exp_pd(_mm256_sub_pd(v, sh), T::FULL), sc)
        })
    }
}

/// `out[k] = (x[k] - shift) - log_total`; `out` may equal `x`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn shift_sub<T: Lanes>(x: *const T, out: *mut T, n: usize, shift: f64, log_total: f64) {
    let (sh, lt) = (_mm256_set1_pd(shift), _mm256_set1_pd(log_total));
    // SAFETY: forwarded from the caller.
    unsafe { map(x, out, n, |v| _mm256_sub_pd(_mm256_sub_pd(v, sh), lt)) }
}

/// float32 exp of `n` elements in float32 arithmetic.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_f32(x: *const f32, out: *mut f32, n: usize) {
    let mut i = 0;
    // SAFETY: reads and writes stay within the n elements.
    unsafe {
        while i + 8 <= n {
            _mm256_storeu_ps(out.add(i), exp_ps(_mm256_loadu_ps(x.add(i))));
            i += 8;
        }
        if i < n {
            let mut buf = [0.0f32; 8];
            std::ptr::copy_nonoverlapping(x.add(i), buf.as_mut_ptr(), n - i);
            _mm256_storeu_ps(buf.as_mut_ptr(), exp_ps(_mm256_loadu_ps(buf.as_ptr())));
            std::ptr::copy_nonoverlapping(buf.as_ptr(), out.add(i), n - i);
        }
    }
}

/// float64 exp of `n` elements.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_f64(x: *const f64, out: *mut f64, n: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { map(x, out, n, |v| exp_pd(v, true)) }
}

/// Online states of `w <= COL_TILE` adjacent columns of an `(n, inner)` slab.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn column_states<T: Lanes>(
    x: *const T,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    const V: usize = super::COL_TILE / 4;
    let mut lanes = [OnlineLanes::new(); V];
    let vecs = w.div_ceil(4);
    for k in 0..n {
        // SAFETY: row k of the tile holds w readable elements.
        let row = unsafe { x.add(k * inner) };
        for (v, lane) in lanes.iter_mut().enumerate().take(vecs) {
            let left = w - 4 * v;
            // SAFETY: as above; the last vector is filled with -inf past the tile width.
            let xv = unsafe {
                if left >= 4 {
                    T::load4(row.add(4 * v))
                } else {
                    load_tail(row.add(4 * v), left)
                }
            };
            lane.push(xv, T::FULL);
        }
    }
    for (v, lane) in lanes.iter().enumerate().take(vecs) {
        for (l, s) in lane.states().into_iter().enumerate() {
            if 4 * v + l < w {
                out[4 * v + l] = s;
            }
        }
    }
}

/// `out[j] = a[j] * exp(x[j] - b[j])` or `(x[j] - b[j]) - a[j]`, as `avx512::lanes_write`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn lanes_write<T: Lanes>(
    x: *const T,
    out: *mut T,
    n: usize,
    b: *const f64,
    a: *const f64,
    exp: bool,
) {
    let f = |v: __m256d, bv: __m256d, av: __m256d| {
        if exp {
            _mm256_mul_pd(av, exp_pd(_mm256_sub_pd(v, bv), T::FULL))
        } else {
            _mm256_sub_pd(_mm256_sub_pd(v, bv), av)
        }
    };
    let mut i = 0;
    // SAFETY: all arrays hold n elements; each vector is read before it is written.
    unsafe {
        while i + 4 <= n {
            let y = f(
                T::load4(x.add(i)),
                _mm256_loadu_pd(b.add(i)),
                _mm256_loadu_pd(a.add(i)),
            );
            T::store4(out.add(i), y);
            i += 4;
        }
        while i < n {
            let v = T::from_f64(*a.add(i) * ((*x.add(i)).to_f64() - *b.add(i)).exp());
            let w = T::from_f64(((*x.add(i)).to_f64() - *b.add(i)) - *a.add(i));
            *out.add(i) = if exp { v } else { w };
            i += 1;
        }
    }
}
