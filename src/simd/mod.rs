//! Instruction-set levels, detected once per process at run time, and the per-level kernels.
//!
//! `STABLELSE_SIMD=scalar|avx2|avx512|neon` forces a level (capped at what the CPU supports)
//! for tests and benchmarks. The wheel is built for the baseline target; wider instructions are
//! only used behind this detection (`#[target_feature]` functions, never `target-cpu=native`).
//!
//! Each algorithm is written once over the lane abstraction of `lanes`: the row kernels
//! (blocked two-pass and online states, the softmax / log_softmax writes) and the column
//! kernels in `rows`, the short-row kernels (rows in vector lanes) in `short`. One module per
//! instruction set (`avx512`, `avx2`, `neon`) provides the primitives and its own exp;
//! `scalar` is the reference every level is tested against. The functions here dispatch once
//! per call on a [`Level`] passed in by the caller, so tests and benches can run every level
//! in one process; `kernels` passes [`level()`].
//!
//! Accuracy: float32 inputs are widened to float64 lanes for every sum and every softmax
//! output, so `x - max` is exact and the exp (a 16-entry table and a short polynomial; on AVX2
//! a 4-entry table held in registers) is accurate to ~5e-11: results are rounded once, at the
//! end, like the scalar reference. The float32-arithmetic exp ([`exp_f32`], < 1 ULP, tested
//! exhaustively) is the standalone exp.

use std::sync::OnceLock;

/// A SIMD level the kernels can run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Neon,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    pub fn parse(name: &str) -> Option<Level> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Level::Scalar),
            "neon" => Some(Level::Neon),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            _ => None,
        }
    }
}

/// Every level this CPU supports, best last.
pub fn available_levels() -> Vec<Level> {
    let mut levels = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            levels.push(Level::Avx2);
        }
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("popcnt")
        {
            levels.push(Level::Avx512);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            levels.push(Level::Neon);
        }
    }
    levels
}

/// Whether this CPU supports `level` (detected once).
pub fn is_available(level: Level) -> bool {
    static LEVELS: OnceLock<Vec<Level>> = OnceLock::new();
    LEVELS.get_or_init(available_levels).contains(&level)
}

/// The best level available, or the one `STABLELSE_SIMD` asks for if the CPU has it.
pub fn detect() -> Level {
    let levels = available_levels();
    let best = *levels.last().unwrap_or(&Level::Scalar);
    match std::env::var("STABLELSE_SIMD")
        .ok()
        .and_then(|v| Level::parse(&v))
    {
        Some(want) if levels.contains(&want) => want,
        _ => best,
    }
}

/// Why `STABLELSE_SIMD` was not followed, when it is set (non-empty) and names no level this
/// CPU has; the Python package turns it into a warning.
pub fn env_problem() -> Option<String> {
    let value = std::env::var("STABLELSE_SIMD").ok()?;
    let want = Level::parse(&value);
    let reason = match want {
        _ if value.trim().is_empty() => return None,
        Some(l) if is_available(l) => return None,
        Some(_) => "this CPU lacks that level",
        None => "not one of scalar, avx2, avx512, neon",
    };
    Some(format!(
        "ignored STABLELSE_SIMD={value:?}: {reason}; using {}",
        level().name()
    ))
}

/// The level chosen for this process (detected on first use).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
mod lanes;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
mod rows;
pub mod scalar;
mod short;
pub(crate) use short::{
    short_rows_xent_index, IndexLoss, IndexLossOut, KeepRows, RowMask, IGNORED, SHORT_LOSS_ROW,
};

use crate::real::Real;
use crate::state::LseState;
use lanes::{dispatch, Kernel, Lanes};
pub(crate) use rows::Ahead;
use rows::{ExpScaled, LaneMap, ShiftSub};

/// Hints the cache line at `p` into L1. A hint does not access memory: it never faults,
/// wherever `p` points. x86-64 only (SSE, baseline); elsewhere nothing.
#[inline(always)]
pub(crate) fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally; SSE is baseline on x86_64.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `dst[c * dst_stride + r] = (src[r * src_stride + c] != 0) as u8` for an 8x16 tile (`r < 8`,
/// `c < 16`) of mask bytes: eight 16-byte rows in, sixteen 8-byte columns out. On x86_64 by
/// the byte, word and doubleword interleaves of SSE2 (baseline there); elsewhere as two 8x8
/// tiles of eight 8-byte words, each transposed by three rounds of swaps (a byte, two bytes,
/// then four apart).
#[inline]
pub(crate) fn mask_tile_8x16(
    (src, src_stride): (&[u8], usize),
    (dst, dst_stride): (&mut [u8], usize),
) {
    let (src_end, dst_end) = (7 * src_stride + 16, 15 * dst_stride + 8);
    assert!(
        src.len() >= src_end && dst.len() >= dst_end,
        "mask tile out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is baseline on x86_64; eight 16-byte rows of `src` and sixteen 8-byte
    // columns of `dst` lie inside the slices (asserted); unaligned loads and stores.
    unsafe {
        use std::arch::x86_64::*;
        let one = _mm_set1_epi8(1);
        let mut a = [_mm_setzero_si128(); 8];
        for (i, a) in a.iter_mut().enumerate() {
            let row = _mm_loadu_si128(src.as_ptr().add(i * src_stride) as *const __m128i);
            *a = _mm_min_epu8(row, one);
        }
        // Rows paired byte by byte, then the pairs by 16 bits, then the quads by 32 bits:
        // each 8-byte half of the last round is one column.
        let mut t = [_mm_setzero_si128(); 8];
        for k in 0..4 {
            t[2 * k] = _mm_unpacklo_epi8(a[2 * k], a[2 * k + 1]);
            t[2 * k + 1] = _mm_unpackhi_epi8(a[2 * k], a[2 * k + 1]);
        }
        // u[0..4]: rows 0-3 of columns 0-3, 4-7, 8-11, 12-15; u[4..8]: rows 4-7.
        let mut u = [_mm_setzero_si128(); 8];
        for h in [0, 1, 4, 5] {
            let k = 2 * (h % 4) + 4 * (h / 4);
            u[k] = _mm_unpacklo_epi16(t[h], t[h + 2]);
            u[k + 1] = _mm_unpackhi_epi16(t[h], t[h + 2]);
        }
        let d = dst.as_mut_ptr();
        for q in 0..4 {
            let lo = _mm_unpacklo_epi32(u[q], u[q + 4]);
            let hi = _mm_unpackhi_epi32(u[q], u[q + 4]);
            for (j, v) in [lo, hi].into_iter().enumerate() {
                let c = 4 * q + 2 * j;
                _mm_storel_epi64(d.add(c * dst_stride) as *mut __m128i, v);
                let next = d.add((c + 1) * dst_stride) as *mut __m128i;
                _mm_storel_epi64(next, _mm_unpackhi_epi64(v, v));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    for c0 in [0, 8] {
        let word = |r: usize| {
            let at = r * src_stride + c0;
            u64::from_le_bytes(src[at..at + 8].try_into().unwrap_or([0; 8]))
        };
        let mut w: [u64; 8] = std::array::from_fn(word);
        for (shift, mask) in [
            (8, 0x00FF_00FF_00FF_00FFu64),
            (16, 0x0000_FFFF_0000_FFFF),
            (32, 0x0000_0000_FFFF_FFFF),
        ] {
            let apart = shift / 8;
            for a in (0..8).filter(|a| a & apart == 0) {
                let t = ((w[a] >> shift) ^ w[a + apart]) & mask;
                w[a + apart] ^= t;
                w[a] ^= t << shift;
            }
        }
        for (k, v) in w.iter().enumerate() {
            // Any nonzero byte keeps: each byte becomes 0 or 1.
            let ones = (((v & 0x7F7F_7F7F_7F7F_7F7F) + 0x7F7F_7F7F_7F7F_7F7F) | v) >> 7;
            let at = (c0 + k) * dst_stride;
            dst[at..at + 8].copy_from_slice(&(ones & 0x0101_0101_0101_0101).to_le_bytes());
        }
    }
}

/// Hints every cache line of the `bytes` at `p` into L1 (its last byte's line too, for a span
/// that does not start on a line), as [`prefetch_line`].
#[inline]
pub(crate) fn prefetch_span(p: *const u8, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        prefetch_line(p.wrapping_add(off));
    }
    if bytes > 0 {
        prefetch_line(p.wrapping_add(bytes - 1));
    }
}

/// The longest rows the short-row kernels (one row per vector lane) take at any level: the
/// capacity of their buffers. Each level's own limit is [`short_row_limit`].
pub const SHORT_ROW: usize = 128;

/// The longest rows the short-row kernels take at `level` for float32 (`full == false`) or
/// float64 (`full`) logsumexp, log_softmax and states (softmax has its own, lower limit).
/// AVX-512 takes float32 rows of up to [`SHORT_ROW`]: rows of 65-128 from DRAM, two threads,
/// ran in 0.30-0.34 ns per element x threads against 0.34-0.51 in the row kernels
/// (logsumexp) and 0.44-0.47 against 0.48-0.70 (log_softmax `out=`). float64 rows and other
/// levels keep rows of up to 64: from DRAM float64 rows of 128 ran slower short (logsumexp
/// 0.55-0.60 against 0.48, log_softmax 0.97-1.17 against 0.84-0.90), and on AVX2 the row
/// kernels are ahead beyond 64.
pub fn short_row_limit(level: Level, full: bool) -> usize {
    match (level, full) {
        (Level::Avx512, false) => SHORT_ROW,
        _ => SHORT_ROW / 2,
    }
}

/// Columns per tile of the column kernel. A tile walks its rows one contiguous segment at a
/// time (2 KiB of float32), keeping its online lanes in L1: walking narrower tiles down the
/// rows reads a few lines per row at a stride that is often a power of two, which thrashes
/// the cache sets and defeats the prefetchers.
pub const COL_TILE: usize = 512;

/// Constants shared by every level's exp.
#[allow(dead_code, clippy::excessive_precision)]
pub(crate) mod consts {
    /// The float64 values of IEEE bit patterns (the tables below are written as bits, each the
    /// float64 nearest its exact value).
    const fn floats<const N: usize>(bits: [u64; N]) -> [f64; N] {
        let mut t = [0.0f64; N];
        let mut i = 0;
        while i < N {
            t[i] = f64::from_bits(bits[i]);
            i += 1;
        }
        t
    }

    /// `2^(j/16)`, j = 0..16, each the float64 nearest the exact value (computed in 60-digit
    /// decimal arithmetic).
    pub const EXP2_J16: [f64; 16] = {
        const BITS: [u64; 16] = [
            0x3ff0000000000000,
            0x3ff0b5586cf9890f,
            0x3ff172b83c7d517b,
            0x3ff2387a6e756238,
            0x3ff306fe0a31b715,
            0x3ff3dea64c123422,
            0x3ff4bfdad5362a27,
            0x3ff5ab07dd485429,
            0x3ff6a09e667f3bcd,
            0x3ff7a11473eb0187,
            0x3ff8ace5422aa0db,
            0x3ff9c49182a3f090,
            0x3ffae89f995ad3ad,
            0x3ffc199bdd85529c,
            0x3ffd5818dcfba487,
            0x3ffea4afa2a490da,
        ];
        floats(BITS)
    };
    /// The table's bit patterns less `j << 48`: adding `k << 48` (k = 16 k' + j) to entry j
    /// gives `2^(j/16) * 2^k'` (the float32-grade exp's integer scaling).
    pub const EXP2_J16_LESS_J: [u64; 16] = {
        let mut t = [0u64; 16];
        let mut j = 0;
        while j < 16 {
            t[j] = EXP2_J16[j].to_bits() - ((j as u64) << 48);
            j += 1;
        }
        t
    };
    /// The float32-grade exp's argument floor: `exp(-708)` is still a normal float64.
    pub const EXP_FLOOR: f64 = -708.0;
    /// `1.5 * 2^52`: adding it rounds a float64 of magnitude < 2^51 to an integer held in the
    /// low mantissa bits (two's complement modulo 2^52).
    pub const ROUND_MAGIC: f64 = 6755399441055744.0;
    pub const SIXTEEN_OVER_LN2: f64 = 23.083120654223414;
    /// `ln2/16 = HI + LO`; `HI` alone leaves an error of k * 1.4e-18 in the reduced argument.
    pub const LN2_OVER_16_HI: f64 = 0.04332169878499658;
    pub const LN2_OVER_16_LO: f64 = 1.4494042586539372e-18;
    /// Taylor coefficients of `(exp(r) - 1) / r`, highest first: degree 7 for float64 results
    /// (truncation < 1.2e-18 on |r| <= ln2/32), degree 4 for float32-grade results (< 4e-11).
    pub const TAYLOR7: [f64; 7] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
    ];
    pub const TAYLOR4: [f64; 4] = [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0];
    /// `2^(j/4)`, j = 0..4 (every fourth entry of [`EXP2_J16`]), and less `j << 50`: adding
    /// `k << 50` (k = 4 k' + j) to the latter gives `2^(j/4) * 2^k'` (AVX2's float32-grade
    /// exp, whose table lives in two registers).
    pub const EXP2_J4: [u64; 4] = {
        let mut t = [0u64; 4];
        let mut j = 0;
        while j < 4 {
            t[j] = EXP2_J16[4 * j].to_bits();
            j += 1;
        }
        t
    };
    pub const EXP2_J4_LESS_J: [u64; 4] = {
        let mut t = EXP2_J4;
        let mut j = 0;
        while j < 4 {
            t[j] -= (j as u64) << 50;
            j += 1;
        }
        t
    };
    /// `4/ln2` and `ln2/4` (float64 `ln2` scaled exactly).
    pub const FOUR_OVER_LN2: f64 = std::f64::consts::LOG2_E * 4.0;
    pub const LN2_OVER_4: f64 = std::f64::consts::LN_2 / 4.0;
    /// `exp(r) = 1 + r + r^2 a(r)` on |r| <= ln2/8 with relative error < 2.4e-11: `a`'s
    /// coefficients, highest first, fitted to the relative error (Lawson's iteration on 4001
    /// Chebyshev points against a 40-digit exp).
    pub const EXP_POLY5_J4: [f64; 4] = [
        0.00833229178110068,
        0.04168106463016073,
        0.16666668256107198,
        0.49999996708119265,
    ];
    /// `1/c` (the float64 nearest) and `log(1/c)` of that float64 (nearest, from 60-digit
    /// arithmetic) for `c = i/16` at i = 12..15 and `c = (16 + i)/16` at i = 0..8, the entry of
    /// `round(16 f) mod 16` for f in [0.75, 1.5); entries 9..11 are unused (1 and 0).
    pub const LOG_INV_C16: [[f64; 16]; 2] = {
        const BITS: [[u64; 16]; 2] = [
            [
                0x3ff0000000000000,
                0x3fee1e1e1e1e1e1e,
                0x3fec71c71c71c71c,
                0x3feaf286bca1af28,
                0x3fe999999999999a,
                0x3fe8618618618618,
                0x3fe745d1745d1746,
                0x3fe642c8590b2164,
                0x3fe5555555555555,
                0x3ff0000000000000,
                0x3ff0000000000000,
                0x3ff0000000000000,
                0x3ff5555555555555,
                0x3ff3b13b13b13b14,
                0x3ff2492492492492,
                0x3ff1111111111111,
            ],
            [
                0x0000000000000000,
                0xbfaf0a30c01162a8,
                0xbfbe27076e2af2ea,
                0xbfc5ff3070a793d6,
                0xbfcc8ff7c79a9a20,
                0xbfd1675cababa60f,
                0xbfd4618bc21c5ec2,
                0xbfd739d7f6bbd007,
                0xbfd9f323ecbf984d,
                0x0000000000000000,
                0x0000000000000000,
                0x0000000000000000,
                0x3fd269621134db91,
                0x3fca93ed3c8ad9e5,
                0x3fc1178e8227e47a,
                0x3fb08598b59e3a06,
            ],
        ];
        [floats(BITS[0]), floats(BITS[1])]
    };
    /// `ln2 = HI + LO` with `HI` short enough that `k * HI` is exact for |k| < 2^11.
    pub const LN2_HI: f64 = 0.6931471803691238;
    pub const LN2_LO: f64 = 1.9082149292705877e-10;
    pub const F32_LOG2E: f32 = std::f32::consts::LOG2_E;
    /// Below these arguments exp rounds to 0 in float32 (`exp(-104) < 2^-150`, half the least
    /// subnormal) and in float64 (`exp(-745.2) < 2^-1075`): the vector exps zero such lanes
    /// instead of computing an underflow.
    pub const F32_EXP_ZERO_BELOW: f32 = -104.0;
    pub const F64_EXP_ZERO_BELOW: f64 = -745.2;
    /// Cody-Waite split of ln2 for float32: `HI` has 16 significant bits so `k * HI` is exact.
    pub const F32_LN2_HI: f32 = 0.693_145_751_953_125;
    pub const F32_LN2_LO: f32 = 1.428_606_765_330_187e-6;
    /// SLEEF `expf_u10`: `exp(r) = 1 + r + r^2 u(r)` on |r| <= ln2/2, highest first.
    pub const F32_EXP_POLY: [f32; 6] = [
        0.000_198_527_62,
        0.001_393_043_6,
        0.008_333_361,
        0.041_666_485,
        0.166_666_67,
        0.5,
    ];
}

/// Runs a kernel written as two bodies at `level`: `|l| run`, over the level's [`Lanes`] `l`,
/// and `scalar:`, the reference. The named variables become the fields of a one-off
/// [`Kernel`] (generic over the caller's element type `T`, and over a lifetime `'a` where a
/// field borrows) and are bound by the same names in both bodies. Expands to the unsafe
/// [`dispatch`] call, so it is used inside an `unsafe` block whose `SAFETY` comment (the
/// caller's contract on the pointers) covers both bodies, which run in `unsafe` too.
macro_rules! run_kernel {
    ($level:expr, $(<$lt:lifetime>)? { $($f:ident: $t:ty),* $(,)? } -> $out:ty,
     |$l:ident| $run:expr, scalar: $scalar:expr $(,)?) => {{
        struct K<$($lt,)? T> {
            $($f: $t),*
        }
        impl<$($lt,)? T: Real> Kernel for K<$($lt,)? T> {
            type Out = $out;
            #[inline(always)]
            #[allow(unused_unsafe)]
            fn run<L: Lanes>(self, $l: L) -> $out {
                let K { $($f),* } = self;
                // SAFETY: the contract of the dispatch below, checked by its caller.
                unsafe { $run }
            }
            #[allow(unused_unsafe, unused_variables)]
            fn scalar(self) -> $out {
                let K { $($f),* } = self;
                // SAFETY: as above.
                unsafe { $scalar }
            }
        }
        dispatch($level, K { $($f),* })
    }};
}

pub(crate) mod ragged;

/// `(max, excess)` of `n` contiguous elements at `level`: blocked two-pass, or one pass with
/// a running max (`online`). The two-pass hints `next` into cache as it goes ([`Ahead`]).
///
/// # Safety
/// `x` must be readable for `n` elements, and `level` supported by this CPU.
pub(crate) unsafe fn row_state<T: Real>(
    level: Level,
    x: *const T,
    n: usize,
    online: bool,
    next: Ahead<T>,
) -> LseState {
    // SAFETY: forwarded from the caller (n readable elements at x), in both bodies.
    unsafe {
        run_kernel!(level, { x: *const T, n: usize, online: bool, next: Ahead<T> } -> LseState,
            |l| {
                if online {
                    rows::state_online(l, x, n)
                } else {
                    rows::state_two_pass(l, rows::Dense::ahead(x, next, n), n)
                }
            },
            scalar: {
                if online {
                    scalar::lse_state_online(x, 0, n, 1)
                } else {
                    scalar::lse_state_two_pass(x, 0, n, 1)
                }
            },
        )
    }
}

/// The two-pass `(max, excess)` of a row, bit-identical to [`row_state`] (two-pass), with
/// each term its sums computed kept at `terms[k]` for a write from them ([`scaled_terms`]),
/// and the index from which those terms are `exp(x[k] - max)` for the row's max (earlier
/// ones were taken against a smaller running max). `None` where the max is not finite and
/// at the scalar level: the caller then takes [`row_state`]. With a mask (`keep` not null)
/// `x[k]` is `-inf` where `keep[k] == 0`, applied as it is loaded ([`kept_row_state`]): the
/// staged row's state and terms bit for bit (its masked terms 0).
///
/// # Safety
/// `n` readable elements at `x`, `keep` null or readable for `n` bytes, `n` writable float64
/// at `terms`.
pub(crate) unsafe fn row_state_stored<T: Real>(
    level: Level,
    (x, next): (*const T, Ahead<T>),
    keep: *const u8,
    n: usize,
    terms: *mut f64,
) -> Option<(LseState, usize)> {
    // SAFETY: forwarded from the caller.
    unsafe {
        run_kernel!(level,
            { x: *const T, next: Ahead<T>, keep: *const u8, n: usize, terms: *mut f64 }
                -> Option<(LseState, usize)>,
            |l| {
                if keep.is_null() {
                    rows::state_two_pass_stored(l, rows::Dense::ahead(x, next, n), n, terms)
                } else {
                    let next = next.for_rows_of(n);
                    rows::state_two_pass_stored(l, rows::Kept { x, keep, next }, n, terms)
                }
            },
            scalar: None,
        )
    }
}

/// `out[k] = scale * terms[k]` rounded once to `T`: the write of a softmax or a loss gradient
/// from the terms [`row_state_stored`] kept (the same bits as [`exp_scaled`] from the row);
/// `stream` as in [`map_row`].
///
/// # Safety
/// `n` readable float64 at `terms`, `n` writable elements at `out`.
pub(crate) unsafe fn scaled_terms<T: Real>(
    level: Level,
    terms: *const f64,
    out: *mut T,
    (n, scale): (usize, f64),
    stream: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        run_kernel!(level,
            { terms: *const f64, out: *mut T, n: usize, scale: f64, stream: bool } -> (),
            |l| rows::map_row(l, terms, out, n, stream, rows::Scale(scale)),
            scalar: {
                for k in 0..n {
                    *out.add(k) = T::from_f64(scale * *terms.add(k));
                }
            },
        )
    }
}

/// The two-pass `(max, excess)` of a `where=` row read in place: `x[k]` where `keep[k] != 0`,
/// else `-inf`, bit-identical to [`row_state`] (two-pass) of the staged row. `None` where
/// that row needs the scalar reference (a NaN or infinite max) and at the scalar level: the
/// caller then stages the row. Hints `next` into cache as it goes ([`Ahead`]).
///
/// # Safety
/// `n` readable elements at `x` and mask bytes at `keep`; `level` supported by this CPU.
pub(crate) unsafe fn kept_row_state<T: Real>(
    level: Level,
    x: *const T,
    keep: *const u8,
    n: usize,
    next: Ahead<T>,
) -> Option<LseState> {
    // SAFETY: forwarded from the caller.
    unsafe {
        run_kernel!(level,
            { x: *const T, keep: *const u8, n: usize, next: Ahead<T> } -> Option<LseState>,
            |l| {
                let next = next.for_rows_of(n);
                rows::state_two_pass_of(l, rows::Kept { x, keep, next }, n)
            },
            scalar: None,
        )
    }
}

/// The row writes: `out[k] = f(x[k])` for `k < n`, with `f` softmax's or log_softmax's; with
/// a mask (`keep` not null) `x[k]` is `-inf` where `keep[k] == 0`, applied as it is loaded,
/// or with `masked = Some((fill, value))` enters `f` as `fill` and is stored as `value`.
struct MapRow<T, F> {
    x: *const T,
    next: Ahead<T>,
    keep: *const u8,
    masked: Option<(f64, f64)>,
    out: *mut T,
    n: usize,
    stream: bool,
    f: F,
}

impl<T: Real, F: LaneMap> Kernel for MapRow<T, F> {
    type Out = ();
    #[inline(always)]
    fn run<L: Lanes>(self, l: L) {
        let MapRow {
            x,
            next,
            keep,
            masked,
            out,
            n,
            stream,
            f,
        } = self;
        let next = next.for_rows_of(n);
        // SAFETY: the callers of map_row guarantee the buffers.
        unsafe {
            match masked {
                _ if keep.is_null() => {
                    rows::map_row_of(l, rows::Dense { x, next }, out, n, stream, f)
                }
                None => rows::map_row_of(l, rows::Kept { x, keep, next }, out, n, stream, f),
                Some((fill, value)) => {
                    let src = rows::Masked {
                        x,
                        keep,
                        fill,
                        value,
                        next,
                    };
                    rows::map_row_of(l, src, out, n, stream, f)
                }
            }
        }
    }
    fn scalar(self) {
        for k in 0..self.n {
            // SAFETY: k < n; element k is read before it is written.
            unsafe {
                let kept = self.keep.is_null() || *self.keep.add(k) != 0;
                let y = match self.masked {
                    _ if kept => self.f.scalar((*self.x.add(k)).to_f64()),
                    None => self.f.scalar(f64::NEG_INFINITY),
                    Some((_, value)) => value,
                };
                *self.out.add(k) = T::from_f64(y);
            }
        }
    }
}

/// `out[k] = f(x[k])` for `k < n` at `level`; `out` may equal `x`. `stream` asks for
/// non-temporal stores (outputs much larger than the caches) where the level has them.
/// The pass hints `next` into cache as it goes ([`Ahead`]).
///
/// # Safety
/// `x` readable and `out` writable for `n` elements, either disjoint or equal; `level`
/// supported by this CPU.
#[inline]
unsafe fn map_row<T: Real>(
    level: Level,
    x: *const T,
    next: Ahead<T>,
    out: *mut T,
    n: usize,
    stream: bool,
    f: impl LaneMap,
) {
    let (keep, masked) = (std::ptr::null(), None);
    let k = MapRow {
        x,
        next,
        keep,
        masked,
        out,
        n,
        stream,
        f,
    };
    // SAFETY: forwarded from the caller.
    unsafe { dispatch(level, k) }
}

/// The log_softmax write of a `where=` row read in place: `out[k] = (x[k] - shift) -
/// log_total` where `keep[k] != 0`, else `-inf` (the staged row's values, `shift` and
/// `log_total` finite), the mask applied as `x` is loaded. It hints no next row: a masked
/// row's next one is hinted by its state pass ([`kept_row_state`]).
///
/// # Safety
/// `x` and `keep` readable and `out` writable for `n` elements, `out` disjoint from or equal
/// to `x` and disjoint from `keep`; `level` supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kept_shift_sub<T: Real>(
    level: Level,
    x: *const T,
    keep: *const u8,
    out: *mut T,
    n: usize,
    shift: f64,
    log_total: f64,
    stream: bool,
) {
    let f = ShiftSub { shift, log_total };
    let masked = None;
    let k = MapRow {
        x,
        next: Ahead::NONE,
        keep,
        masked,
        out,
        n,
        stream,
        f,
    };
    // SAFETY: forwarded from the caller.
    unsafe { dispatch(level, k) }
}

/// The softmax write of a `where=` row read in place: `out[k] = scale * exp(x[k] - shift)`
/// where `keep[k] != 0`, else 0 (`shift` the finite max of the kept elements, `scale` finite).
/// The masked lanes are loaded as `shift` (`exp(0)`, where the `-inf` a staged row holds
/// would take the exp's slow subnormal path) and replaced by 0: the values a staged row
/// written with its masked elements set to the max, then filled with 0, holds. No next row
/// is hinted, as [`kept_shift_sub`].
///
/// # Safety
/// As [`kept_shift_sub`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kept_exp_scaled<T: Real>(
    level: Level,
    x: *const T,
    keep: *const u8,
    out: *mut T,
    n: usize,
    shift: f64,
    scale: f64,
    stream: bool,
) {
    let full = T::FULL;
    let f = ExpScaled { shift, scale, full };
    let masked = Some((shift, 0.0));
    let k = MapRow {
        x,
        next: Ahead::NONE,
        keep,
        masked,
        out,
        n,
        stream,
        f,
    };
    // SAFETY: forwarded from the caller.
    unsafe { dispatch(level, k) }
}

/// `out[k] = scale * exp(x[k] - shift)` for `k < n` at `level`, as [`map_row`].
///
/// # Safety
/// As [`map_row`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn exp_scaled<T: Real>(
    level: Level,
    x: *const T,
    next: Ahead<T>,
    out: *mut T,
    n: usize,
    shift: f64,
    scale: f64,
    stream: bool,
) {
    let full = T::FULL;
    // SAFETY: forwarded from the caller.
    unsafe {
        map_row(
            level,
            x,
            next,
            out,
            n,
            stream,
            ExpScaled { shift, scale, full },
        )
    }
}

/// `out[k] = (x[k] - shift) - log_total` for `k < n` at `level`, as [`map_row`].
///
/// # Safety
/// As [`map_row`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn shift_sub<T: Real>(
    level: Level,
    x: *const T,
    next: Ahead<T>,
    out: *mut T,
    n: usize,
    shift: f64,
    log_total: f64,
    stream: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        map_row(
            level,
            x,
            next,
            out,
            n,
            stream,
            ShiftSub { shift, log_total },
        )
    }
}

/// Rows up to this long may take the softmax with one exp per element
/// ([`softmax_stored`]), whose float64 scratch of `8 n` bytes then stays in L2.
pub const STORED_ROW: usize = 1 << 15;

/// Softmax of `n` contiguous elements at `level` with one exp per element, keeping the exps
/// in the float64 scratch `e` between the sum and the write (the outputs are those of the
/// state pass followed by [`exp_scaled`], up to the sum's rounding). With a mask (`keep` not
/// null) `x[k]` is `-inf` where `keep[k] == 0`, applied as it is loaded: the staged row's
/// outputs bit for bit, 0 at the masked positions. Returns `false`, with nothing written, for
/// rows with a NaN or an infinity (of those read), and at the scalar level: the caller then
/// takes the two-exp path. The sum pass hints `next` into cache as it goes ([`Ahead`]).
///
/// # Safety
/// `x` readable and `out` writable for `n` elements, disjoint or equal; `keep` null or
/// readable for `n` bytes, disjoint from `out`; `e` writable for `n` float64; `level`
/// supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn softmax_stored<T: Real>(
    level: Level,
    x: *const T,
    next: Ahead<T>,
    keep: *const u8,
    out: *mut T,
    n: usize,
    e: *mut f64,
    stream: bool,
) -> bool {
    // SAFETY: forwarded from the caller (the buffers).
    unsafe {
        run_kernel!(level,
            { x: *const T, next: Ahead<T>, keep: *const u8, out: *mut T, n: usize, e: *mut f64,
              stream: bool } -> bool,
            |l| {
                if keep.is_null() {
                    rows::softmax_stored(l, rows::Dense::ahead(x, next, n), out, n, e, stream)
                } else {
                    let next = next.for_rows_of(n);
                    rows::softmax_stored(l, rows::Kept { x, keep, next }, out, n, e, stream)
                }
            },
            scalar: false,
        )
    }
}

/// `out[k] = keep[k] != 0 ? x[k] : fill` for `k < n` at `level` (a `where=` mask applied as
/// the elements are copied, or in place when `out` equals `x`).
///
/// # Safety
/// `x` and `keep` readable and `out` writable for `n` elements; `out` disjoint from or equal
/// to `x`; `level` supported by this CPU.
pub(crate) unsafe fn select_kept<T: Real>(
    level: Level,
    x: *const T,
    keep: *const u8,
    out: *mut T,
    n: usize,
    fill: f64,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        run_kernel!(level, { x: *const T, keep: *const u8, out: *mut T, n: usize, fill: f64 } -> (),
            |l| rows::select_kept(l, x, keep, out, n, fill),
            scalar: {
                let fill = T::from_f64(fill);
                for k in 0..n {
                    *out.add(k) = if *keep.add(k) != 0 { *x.add(k) } else { fill };
                }
            },
        )
    }
}

/// `dst[c * dst_stride + r] = src[r * src_stride + c]` for `r < rows`, `c < cols` at `level`
/// ([`Lanes::transpose`]).
///
/// # Safety
/// The `rows x cols` elements of `src` readable and of `dst` writable, disjoint; `level`
/// supported by this CPU.
pub(crate) unsafe fn transpose<T: Real>(
    level: Level,
    (src, src_stride): (*const T, usize),
    (dst, dst_stride): (*mut T, usize),
    rows: usize,
    cols: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        run_kernel!(level,
            { src: *const T, src_stride: usize, dst: *mut T, dst_stride: usize, rows: usize,
              cols: usize } -> (),
            |l| l.transpose::<T>((src, src_stride), (dst, dst_stride), rows, cols),
            scalar: lanes::transpose_by_element(
                src, src_stride, dst, dst_stride, (0, rows), (0, cols)
            ),
        )
    }
}

/// The column write pass at `level`: `out[j] = a[j] * exp(x[j] - b[j])` when `exp`, else
/// `out[j] = (x[j] - b[j]) - a[j]`, for `j < n`.
///
/// # Safety
/// `x`, `b`, `a` readable and `out` writable for `n` elements; `out` disjoint from or equal
/// to `x`; `level` supported by this CPU.
pub(crate) unsafe fn lanes_write<T: Real>(
    level: Level,
    x: *const T,
    out: *mut T,
    n: usize,
    b: *const f64,
    a: *const f64,
    exp: bool,
) {
    // SAFETY: forwarded from the caller (the buffers; element j is read before it is written).
    unsafe {
        run_kernel!(level,
            { x: *const T, out: *mut T, n: usize, b: *const f64, a: *const f64, exp: bool } -> (),
            |l| rows::lanes_write(l, x, out, n, b, a, exp),
            scalar: for j in 0..n {
                let d = (*x.add(j)).to_f64() - *b.add(j);
                let y = if exp { *a.add(j) * d.exp() } else { d - *a.add(j) };
                *out.add(j) = T::from_f64(y);
            },
        )
    }
}

/// States of `w <= COL_TILE` adjacent columns of an `(n, inner)` C-order slab at `x`, one
/// streaming pass down the rows; `out[j]` for column `j < w`. With `keep` (mask bytes laid
/// out as `x`), over the elements whose byte is nonzero (the others read as `-inf`).
///
/// # Safety
/// `x.add(k * inner + j)` (and `keep.add(k * inner + j)`) readable for `k < n`, `j < w`;
/// `level` supported by this CPU.
pub(crate) unsafe fn column_states<T: Real>(
    level: Level,
    x: *const T,
    keep: Option<*const u8>,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    debug_assert!(w <= COL_TILE && out.len() >= w);
    // SAFETY: forwarded from the caller (the slab).
    unsafe {
        run_kernel!(level, <'a> { x: *const T, keep: Option<*const u8>, n: usize, inner: usize,
                                  w: usize, out: &'a mut [LseState] } -> (),
            |l| match keep {
                None => rows::column_states(l, x, None, n, inner, w, out),
                Some(k) => rows::column_states(l, x, Some(k), n, inner, w, out),
            },
            scalar: for (j, o) in out.iter_mut().enumerate().take(w) {
                *o = scalar::lse_state_online_kept(x, keep, j, n, inner);
            },
        )
    }
}

/// `[f(0), f(1), f(2), f(3)]`, as `std::array::from_fn` but written out in the caller:
/// `from_fn` calls `f` from a generic function of its own, which does not have the caller's
/// target features, so a closure of vector intrinsics given to it may stay out of line: on
/// AVX2 a call per column loaded made `where=` logsumexp on rows of 32-64 take 1.4x the
/// unmasked op's time (1.1x written out).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn array4<V>(mut f: impl FnMut(usize) -> V) -> [V; 4] {
    [f(0), f(1), f(2), f(3)]
}

/// `[f(0), ..., f(7)]`, written out in the caller for the reason `array4` gives.
#[inline(always)]
pub(crate) fn array8<V>(mut f: impl FnMut(usize) -> V) -> [V; 8] {
    [f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7)]
}

/// The longest rows the short-row softmax takes at `level` for float32 (`full == false`) or
/// float64 (`full`) results; longer ones take the row kernels (each exp kept for its write,
/// rows stored as they lie). On AVX2, one thread in L2, `softmax(out=)` in ns per element,
/// short rows / row kernels: float32 rows of 32 1.79 / 1.88, 40 1.76 / 1.93, 48 1.77 / 1.62,
/// 64 1.74 / 1.49; float64 rows of 24 3.6 / 3.6, 32 3.55 / 3.05, 48 3.48 / 2.82. log_softmax
/// keeps the short rows (float32 rows of 32: 1.9 against 3.0-3.4 in the row kernels). On
/// AVX-512 the softmax keeps rows of up to 64 in the short-row kernels: from DRAM (two
/// threads, float32) rows of 100 and 128 ran in 0.52-0.54 ns per element x threads there
/// against 0.41-0.49 in the row kernels, level in L2 (0.42).
pub(crate) fn short_softmax_limit(level: Level, full: bool) -> usize {
    match (level, full) {
        (Level::Avx2, false) => 40,
        (Level::Avx2, true) => 24,
        (Level::Avx512, _) => SHORT_ROW / 2,
        _ => short_row_limit(level, full),
    }
}

/// Whether `level` has the short-row kernels (rows in vector lanes) for `pitch` (the
/// AVX-512 gathers index rows with 32-bit offsets).
pub(crate) fn has_short_rows(level: Level, pitch: usize) -> bool {
    level != Level::Scalar && pitch < (1 << 27)
}

/// Row `r`'s reference state, of `n` elements among rows `pitch` apart at `x`.
///
/// # Safety
/// Row `r` readable.
unsafe fn short_reference<T: Real>(x: *const T, r: usize, n: usize, pitch: usize) -> LseState {
    // SAFETY: row r is readable.
    unsafe { scalar::lse_state_two_pass(x, r * pitch, n, 1) }
}

/// `max + log1p(excess)` of each state into `out`, rounded to `T` (a non-finite max gives
/// itself), `N` states per vector.
///
/// # Safety
/// `out` writable for `states.len()` elements; `level` supported by this CPU.
pub(crate) unsafe fn states_logsumexp<T: Real>(level: Level, states: &[LseState], out: *mut T) {
    // SAFETY: forwarded from the caller (out).
    unsafe {
        run_kernel!(level, <'a> { states: &'a [LseState], out: *mut T } -> (),
            |l| rows::logsumexp_of_states(l, states, out),
            scalar: for (k, s) in states.iter().enumerate() {
                *out.add(k) = T::from_f64(s.logsumexp());
            },
        )
    }
}

/// `log S = log1p(excess)` of each state, what log_softmax takes from `x - max`, into `out`
/// (as long as `states`): at a SIMD level by its vector log1p for results of type `T`, as
/// the short-row kernels take it, lane by lane (a state gets the same bits alone or among
/// others); at the scalar level by [`LseState::log_total`].
///
/// # Safety
/// `level` supported by this CPU.
pub(crate) unsafe fn states_log_totals<T: Real>(
    level: Level,
    states: &[LseState],
    out: &mut [f64],
) {
    debug_assert_eq!(states.len(), out.len());
    // The result type, which picks the log1p's grade.
    let grade = std::marker::PhantomData::<T>;
    // SAFETY: forwarded from the caller (the level).
    unsafe {
        run_kernel!(level, <'a> { states: &'a [LseState], out: &'a mut [f64], grade: std::marker::PhantomData<T> } -> (),
            |l| {
                let _ = grade;
                rows::log_totals_of_states::<_, T>(l, states, out)
            },
            scalar: for (o, s) in out.iter_mut().zip(states) {
                *o = s.log_total();
            },
        )
    }
}

/// logsumexp of `rows` rows of `n <= SHORT_ROW` elements, `pitch` apart, into `out`.
///
/// # Safety
/// The rows readable, `out` writable for `rows` elements; `level` supported by this CPU.
pub(crate) unsafe fn short_rows_logsumexp<T: Real>(
    level: Level,
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    out: *mut T,
) {
    debug_assert!(n <= SHORT_ROW);
    // SAFETY: forwarded from the caller (the rows and out).
    unsafe {
        run_kernel!(level, { x: *const T, rows: usize, n: usize, pitch: usize, out: *mut T } -> (),
            |l| short::logsumexp(l, short::Rows::Pitched { x, pitch }, rows, n, out),
            scalar: for r in 0..rows {
                *out.add(r) = T::from_f64(short_reference(x, r, n, pitch).logsumexp());
            },
        )
    }
}

/// The `(max, excess)` state of each of `rows` short rows (`n <= SHORT_ROW` elements, `pitch`
/// apart) into `out[r]`, `N` rows per vector: the per-row states a loss over short rows needs.
///
/// # Safety
/// The rows readable; `out` holds `rows` states; `level` supported by this CPU.
pub(crate) unsafe fn short_rows_states<T: Real>(
    level: Level,
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    out: &mut [LseState],
) {
    debug_assert!(n <= SHORT_ROW && out.len() >= rows);
    // SAFETY: forwarded from the caller (the rows).
    unsafe {
        run_kernel!(level, <'a> { x: *const T, rows: usize, n: usize, pitch: usize,
                                  out: &'a mut [LseState] } -> (),
            |l| short::states(l, short::Rows::Pitched { x, pitch }, rows, n, out),
            scalar: for (r, o) in out.iter_mut().enumerate().take(rows) {
                *o = short_reference(x, r, n, pitch);
            },
        )
    }
}

/// Row `r`'s reference state over the elements its mask bytes keep (rows `n` apart, mask
/// rows as `keep` says, `n <= SHORT_ROW`): the row staged with its masked elements at `-inf`.
///
/// # Safety
/// Row `r` and its mask bytes readable.
unsafe fn short_kept_reference<T: Real>(
    x: *const T,
    keep: KeepRows,
    r: usize,
    n: usize,
) -> LseState {
    let mut row = [T::NEG_INFINITY; SHORT_ROW];
    for (k, v) in row.iter_mut().enumerate().take(n) {
        // SAFETY: element k of row r and its mask byte are readable.
        unsafe {
            if *keep.keep.add(r * keep.lane + k) != 0 {
                *v = *x.add(r * n + k);
            }
        }
    }
    // SAFETY: the staged row holds n elements.
    unsafe { short_reference(row.as_ptr(), 0, n, n) }
}

/// logsumexp of `rows` dense short rows (`n <= SHORT_ROW`) over the elements their mask
/// bytes (`keep`, `n` a row, read in place) keep into `out`: the values of the rows staged
/// with their masked elements at `-inf` and run through [`short_rows_logsumexp`].
///
/// # Safety
/// `x` readable for `rows * n` elements and the rows' mask bytes; `out` writable for `rows`
/// elements; `level` supported by this CPU.
pub(crate) unsafe fn short_rows_logsumexp_kept<T: Real>(
    level: Level,
    x: *const T,
    keep: KeepRows,
    rows: usize,
    n: usize,
    out: *mut T,
) {
    debug_assert!(n <= SHORT_ROW);
    // SAFETY: forwarded from the caller (the rows, their mask bytes and out).
    unsafe {
        run_kernel!(level,
            { x: *const T, keep: KeepRows, rows: usize, n: usize, out: *mut T } -> (),
            |l| short::logsumexp_kept(l, x, keep, rows, n, out),
            scalar: for r in 0..rows {
                *out.add(r) = T::from_f64(short_kept_reference(x, keep, r, n).logsumexp());
            },
        )
    }
}

/// The `(max, excess)` states of `rows` dense short rows (`n <= SHORT_ROW`) over the
/// elements their mask bytes (`keep`, `n` a row, read in place) keep into `out[r]`: the
/// states of the rows staged with their masked elements at `-inf` ([`short_rows_states`]).
///
/// # Safety
/// `x` readable for `rows * n` elements and the rows' mask bytes; `out` holds `rows` states;
/// `level` supported by this CPU.
pub(crate) unsafe fn short_rows_states_kept<T: Real>(
    level: Level,
    x: *const T,
    keep: KeepRows,
    rows: usize,
    n: usize,
    out: &mut [LseState],
) {
    debug_assert!(n <= SHORT_ROW && out.len() >= rows);
    // SAFETY: forwarded from the caller (the rows and their mask bytes).
    unsafe {
        run_kernel!(level, <'a> { x: *const T, keep: KeepRows, rows: usize, n: usize,
                                  out: &'a mut [LseState] } -> (),
            |l| short::states_kept(l, x, keep, rows, n, out),
            scalar: for (r, o) in out.iter_mut().enumerate().take(rows) {
                *o = short_kept_reference(x, keep, r, n);
            },
        )
    }
}

/// Softmax (`log = false`) or log_softmax of `rows` short rows into the dense `out`.
///
/// # Safety
/// As [`short_rows_logsumexp`], `out` writable for `rows * n` elements, disjoint from the
/// rows or equal to them with `pitch == n`.
pub(crate) unsafe fn short_rows_softmax<T: Real>(
    level: Level,
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    out: *mut T,
    log: bool,
) {
    debug_assert!(n <= SHORT_ROW);
    // SAFETY: forwarded from the caller (the rows and out; each row is read before it is
    // written).
    unsafe {
        run_kernel!(level,
            { x: *const T, rows: usize, n: usize, pitch: usize, out: *mut T, log: bool } -> (),
            |l| short::softmax(l, short::Rows::Pitched { x, pitch }, rows, n, out, log),
            scalar: for r in 0..rows {
                let state = short_reference(x, r, n, pitch);
                let (xr, or) = (x.add(r * pitch), out.add(r * n));
                if log {
                    scalar::log_softmax_write(xr, 0, 1, or, 0, 1, n, state);
                } else {
                    scalar::softmax_write(xr, 0, 1, or, 0, 1, n, state);
                }
            },
        )
    }
}

/// Softmax (`log = false`) or log_softmax of `rows` dense short rows (`n <= SHORT_ROW`)
/// under a `where=` mask read in place beside them (`keep`, `n` bytes a row): the values of
/// the rows staged with their masked elements at `-inf`, then run through
/// [`short_rows_softmax`], with 0 (softmax) or `-inf` (log_softmax) at the masked positions.
///
/// # Safety
/// `x` readable and `out` writable for `rows * n` elements, equal or disjoint; the rows' mask
/// bytes readable, disjoint from `out`; `level` supported by this CPU.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn short_rows_softmax_kept<T: Real>(
    level: Level,
    x: *const T,
    keep: KeepRows,
    rows: usize,
    n: usize,
    out: *mut T,
    log: bool,
) {
    debug_assert!(n <= SHORT_ROW);
    // SAFETY: forwarded from the caller (the rows, their mask bytes and out; each row is read
    // before it is written).
    unsafe {
        run_kernel!(level,
            { x: *const T, keep: KeepRows, rows: usize, n: usize, out: *mut T, log: bool } -> (),
            |l| short::softmax_kept(l, x, keep, rows, n, out, log),
            scalar: for r in 0..rows {
                // The staged row, reduced and written by the reference, masked positions set.
                let (xr, or) = (x.add(r * n), out.add(r * n));
                let kr = keep.keep.add(r * keep.lane);
                for k in 0..n {
                    *or.add(k) = if *kr.add(k) != 0 { *xr.add(k) } else { T::NEG_INFINITY };
                }
                let state = short_reference(or, 0, n, n);
                let masked = if log {
                    scalar::log_softmax_write(or, 0, 1, or, 0, 1, n, state);
                    T::NEG_INFINITY
                } else {
                    scalar::softmax_write(or, 0, 1, or, 0, 1, n, state);
                    T::from_f64(0.0)
                };
                for k in 0..n {
                    if *kr.add(k) == 0 {
                        *or.add(k) = masked;
                    }
                }
            },
        )
    }
}

/// `out[k] = exp(x[k])` in float32 arithmetic at `level` (< 1 ULP; the vectorised exp itself).
///
/// # Panics
/// If the slices differ in length or `level` is not available on this CPU.
pub fn exp_f32(level: Level, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "exp_f32: x and out differ in length");
    assert!(is_available(level), "level {level:?} is not available");
    let (n, xp, op) = (x.len(), x.as_ptr(), out.as_mut_ptr());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is available; both slices hold n elements.
        Level::Avx512 => unsafe { avx512::exp_f32(xp, op, n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { avx2::exp_f32(xp, op, n) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Level::Neon => unsafe { neon::exp_f32(xp, op, n) },
        _ => scalar::exp_f32(x, out),
    }
}

/// `out[k] = exp(t[k])` for the terms `t[k] <= 0` of a sum below its max (0 for `-inf`,
/// for terms too small to matter and for `t[k] > 0`): the float64 exp (< 1 ULP) when `full`,
/// else to ~5e-11 relative, as the row kernels use for float32 results.
///
/// # Panics
/// If the slices differ in length or `level` is not available on this CPU.
pub fn exp_nonpos_f64(level: Level, t: &[f64], out: &mut [f64], full: bool) {
    assert_eq!(
        t.len(),
        out.len(),
        "exp_nonpos_f64: t and out differ in length"
    );
    assert!(is_available(level), "level {level:?} is not available");
    // SAFETY: the level is available; both slices hold n elements.
    unsafe {
        map_row(
            level,
            t.as_ptr(),
            Ahead::NONE,
            out.as_mut_ptr(),
            t.len(),
            false,
            rows::ExpNonpos { full },
        )
    }
}

/// `out[k] = exp(x[k])` in float64 at `level` (< 1 ULP).
///
/// # Panics
/// If the slices differ in length or `level` is not available on this CPU.
pub fn exp_f64(level: Level, x: &[f64], out: &mut [f64]) {
    assert_eq!(x.len(), out.len(), "exp_f64: x and out differ in length");
    assert!(is_available(level), "level {level:?} is not available");
    // exp(x) = 1 * exp(x - 0), the float64 exp.
    let f = ExpScaled {
        shift: 0.0,
        scale: 1.0,
        full: true,
    };
    // SAFETY: the level is available; both slices hold n elements.
    unsafe {
        map_row(
            level,
            x.as_ptr(),
            Ahead::NONE,
            out.as_mut_ptr(),
            x.len(),
            false,
            f,
        )
    }
}

/// A row's state from the blocked two-pass sums: `below` sums exp(x - m) over the elements
/// under the max (NaN if any element was NaN), `ties` counts the elements equal to it.
pub(crate) fn finish_state(m: f64, below: f64, ties: u64) -> LseState {
    if m == f64::NEG_INFINITY {
        LseState::EMPTY
    } else if below.is_nan() {
        LseState {
            max: f64::NAN,
            excess: f64::NAN,
        }
    } else {
        LseState {
            max: m,
            excess: below + (ties as f64 - 1.0),
        }
    }
}

/// One online lane's `(max, excess)` from its `(max, below, ties)` triple.
pub(crate) fn lane_state(m: f64, below: f64, ties: f64) -> LseState {
    if below.is_nan() {
        LseState {
            max: f64::NAN,
            excess: f64::NAN,
        }
    } else if m == f64::NEG_INFINITY {
        LseState::EMPTY
    } else if m == f64::INFINITY {
        LseState {
            max: m,
            excess: 0.0,
        }
    } else {
        LseState {
            max: m,
            excess: below + (ties - 1.0),
        }
    }
}

/// Whether the class target `v` names one of `n` classes: not `ignore` and in `[0, n)`
/// (branch-free, for the loops that vectorise it).
#[inline(always)]
pub(crate) fn names_class(v: i64, ignore: i64, n: u64) -> bool {
    (v != ignore) & ((v as u64) < n)
}

/// The class a target `v` that [`names_class`] accepted names, bounded below `n` by the
/// arithmetic that produces it. Targets are read where they lie, possibly while another
/// thread writes them, and the compiler may load `v` again for each use (the vectorised
/// loops of AVX2 did: the class came from a second load the check had not seen, and the
/// loss read outside its row). A class made this way is below `n` whatever was loaded: a
/// changed result, never an index outside the row.
#[inline(always)]
pub(crate) fn bounded_class(v: i64, n: u64) -> u64 {
    (v as u64).min(n.saturating_sub(1))
}

/// The rows of a chunk of unsorted segment ids, encoded for a partition by bucket in one
/// branch-free pass compiled for `level` (where it vectorises). With `key = (bits, n, last)`:
/// for row `r`, `bucket[r]` is `ids[r] >> bits`, at most `last` (so always a bucket of the
/// partition, whatever was read), and `code[r]` holds the float32 bits of `x[r]` in its low
/// 32 bits, the low `bits` of the id (its segment within the bucket; `bits <= 16`) at bit 32
/// and `r` (`< 2^16`) at bit 48. Returns whether every id lies in `[0, n)`; where one does
/// not, the bytes and codes are meaningless.
pub(crate) fn bucket_codes<T: Real>(
    level: Level,
    x: &[T],
    ids: &[i64],
    key: (u32, u64, u8),
    bucket: &mut [u8],
    code: &mut [u64],
) -> bool {
    #[inline(always)]
    fn scan<T: Real>(
        x: &[T],
        ids: &[i64],
        (bits, n, last): (u32, u64, u8),
        bucket: &mut [u8],
        code: &mut [u64],
    ) -> bool {
        let local = (1u64 << bits) - 1;
        let mut bad = 0u64;
        let rows = x.len().min(ids.len()).min(bucket.len()).min(code.len());
        for r in 0..rows {
            let id = ids[r] as u64;
            bad |= u64::from(id >= n);
            bucket[r] = (id >> bits).min(u64::from(last)) as u8;
            let v = (x[r].to_f64() as f32).to_bits();
            code[r] = u64::from(v) | ((id & local) << 32) | ((r as u64 & 0xFFFF) << 48);
        }
        bad == 0
    }
    // SAFETY: the level is the caller's, supported by this CPU; the scan uses slices only.
    unsafe {
        run_kernel!(level, <'a> { x: &'a [T], ids: &'a [i64], key: (u32, u64, u8), bucket: &'a mut [u8], code: &'a mut [u64] } -> bool,
            |l| {
                let _ = l;
                scan(x, ids, key, bucket, code)
            },
            scalar: scan(x, ids, key, bucket, code),
        )
    }
}

/// How many of the class targets `t` are kept (not `ignore`), and whether a kept one is
/// outside `[0, n)`: one branch-free scan, compiled for `level` (where it vectorises).
pub(crate) fn count_targets(level: Level, t: &[i64], ignore: i64, n: u64) -> (usize, bool) {
    #[inline(always)]
    fn scan(t: &[i64], ignore: i64, n: u64) -> (usize, bool) {
        let (mut kept, mut bad) = (0u64, 0u64);
        for &v in t {
            let k = v != ignore;
            kept += u64::from(k);
            bad |= u64::from(k & !names_class(v, ignore, n));
        }
        (kept as usize, bad != 0)
    }
    // The kernel takes a value type; this scan has none.
    let grade = std::marker::PhantomData::<f64>;
    // SAFETY: the level is the caller's, supported by this CPU; the scan reads `t` only.
    unsafe {
        run_kernel!(level, <'a> { t: &'a [i64], ignore: i64, n: u64, grade: std::marker::PhantomData<T> } -> (usize, bool),
            |l| {
                let _ = (l, grade);
                scan(t, ignore, n)
            },
            scalar: scan(t, ignore, n),
        )
    }
}

/// The class of each target of `t` (`ignored` where it is `ignore` or outside `[0, n)`) and
/// its weight, 1 or 0 (unweighted classes): one branch-free loop compiled for `level`.
pub(crate) fn unweighted_classes(
    level: Level,
    t: &[i64],
    ignore: i64,
    n: u64,
    ignored: u32,
    class: &mut [u32],
    weight: &mut [f64],
) {
    #[inline(always)]
    fn fill(t: &[i64], ignore: i64, n: u64, ignored: u32, class: &mut [u32], weight: &mut [f64]) {
        for ((c, w), &v) in class.iter_mut().zip(weight.iter_mut()).zip(t) {
            let kept = names_class(v, ignore, n);
            *c = if kept {
                bounded_class(v, n) as u32
            } else {
                ignored
            };
            *w = if kept { 1.0 } else { 0.0 };
        }
    }
    // The kernel takes a value type; this loop has none.
    let grade = std::marker::PhantomData::<f64>;
    // SAFETY: the level is the caller's, supported by this CPU; the loop stays in the slices.
    unsafe {
        run_kernel!(level, <'a> { t: &'a [i64], ignore: i64, n: u64, ignored: u32,
                                  class: &'a mut [u32], weight: &'a mut [f64],
                                  grade: std::marker::PhantomData<T> } -> (),
            |l| {
                let _ = (l, grade);
                fill(t, ignore, n, ignored, class, weight)
            },
            scalar: fill(t, ignore, n, ignored, class, weight),
        )
    }
}

/// Whether any of `n` elements at `p` is NaN (the slow path behind an all `-inf` block).
pub(crate) fn has_nan<T: Real>(p: *const T, n: usize) -> bool {
    // SAFETY: callers pass a readable block of n elements.
    (0..n).any(|k| unsafe { (*p.add(k)).to_f64().is_nan() })
}

#[cfg(test)]
pub(crate) mod tests;
