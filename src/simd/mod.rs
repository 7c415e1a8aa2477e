//! Instruction-set levels, detected once per process at run time, and the per-level kernels.
//!
//! `STABLELSE_SIMD=scalar|avx2|avx512|neon` forces a level (capped at what the CPU supports)
//! for tests and benchmarks. The wheel is built for the baseline target; wider instructions are
//! only used behind this detection (`#[target_feature]` functions, never `target-cpu=native`).
//!
//! One module per instruction set (`avx512`, `avx2`, `neon`, `scalar`), each with its own
//! vectorised exp and the same building blocks: the blocked two-pass and the online row state,
//! the column state, the softmax / log_softmax write, and (AVX-512) the short-row kernels.
//! The functions here dispatch on a [`Level`] passed in by the caller, so tests and benches
//! can run every level in one process; `kernels` passes [`level()`].
//!
//! Accuracy: float32 inputs are widened to float64 lanes for every sum and every softmax
//! output, so `x - max` is exact and the exp (a 16-entry table and a short polynomial) is
//! accurate to ~5e-11: results are rounded once, at the end, like the scalar reference. The
//! float32-arithmetic exp ([`exp_f32`], < 1 ULP, tested exhaustively) is the standalone exp.

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
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;

use crate::kernels::Algorithm;
use crate::real::Real;
use crate::state::LseState;
use std::any::TypeId;

/// Rows up to this long take the short-row kernels (8 rows per vector) where a level has them.
pub const SHORT_ROW: usize = 64;

/// Columns per tile of the column kernel. A tile walks its rows one contiguous segment at a
/// time (2 KiB of float32), keeping its online lanes in L1: walking narrower tiles down the
/// rows reads a few lines per row at a stride that is often a power of two, which thrashes
/// the cache sets and defeats the prefetchers.
pub const COL_TILE: usize = 512;

/// Constants shared by every level's exp.
#[allow(dead_code, clippy::excessive_precision)]
pub(crate) mod consts {
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
        let mut t = [0.0f64; 16];
        let mut j = 0;
        while j < 16 {
            t[j] = f64::from_bits(BITS[j]);
            j += 1;
        }
        t
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
    /// `ln2 = HI + LO` with `HI` short enough that `k * HI` is exact for |k| < 2^11.
    pub const LN2_HI: f64 = 0.6931471803691238;
    pub const LN2_LO: f64 = 1.9082149292705877e-10;
    pub const F32_LOG2E: f32 = std::f32::consts::LOG2_E;
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

#[inline(always)]
fn cast<T: 'static, U: 'static>(p: *const T) -> Option<*const U> {
    (TypeId::of::<T>() == TypeId::of::<U>()).then_some(p as *const U)
}

#[inline(always)]
fn cast_mut<T: 'static, U: 'static>(p: *mut T) -> Option<*mut U> {
    (TypeId::of::<T>() == TypeId::of::<U>()).then_some(p as *mut U)
}

/// Runs `$body` with `$x` rebound to the concrete `f32`/`f64` pointer behind a generic one.
macro_rules! by_type {
    ($T:ty, $x:ident, $body:expr) => {
        if let Some($x) = cast::<$T, f32>($x) {
            $body
        } else if let Some($x) = cast::<$T, f64>($x) {
            $body
        } else {
            unreachable!("Real is only implemented for f32 and f64")
        }
    };
}

/// `(max, excess)` of `n` contiguous elements at `level`.
///
/// # Safety
/// `x` must be readable for `n` elements, and `level` supported by this CPU.
pub(crate) unsafe fn row_state<T: Real>(
    level: Level,
    x: *const T,
    n: usize,
    alg: Algorithm,
) -> LseState {
    let online = alg == Algorithm::Online;
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked the level; x is readable for n elements.
        Level::Avx512 => unsafe {
            by_type!(
                T,
                x,
                if online {
                    avx512::state_online(x, n)
                } else {
                    avx512::state_two_pass(x, n)
                }
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe {
            by_type!(
                T,
                x,
                if online {
                    avx2::state_online(x, n)
                } else {
                    avx2::state_two_pass(x, n)
                }
            )
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Level::Neon => unsafe {
            by_type!(
                T,
                x,
                if online {
                    neon::state_online(x, n)
                } else {
                    neon::state_two_pass(x, n)
                }
            )
        },
        // SAFETY: as above.
        _ => unsafe { scalar::row_state(x, n, alg) },
    }
}

/// `out[k] = scale * exp(x[k] - shift)` for `k < n` at `level`; `out` may equal `x`.
/// `stream` asks for non-temporal stores (outputs much larger than the caches) where the
/// level has them.
///
/// # Safety
/// `x` readable and `out` writable for `n` elements, either disjoint or equal; `level`
/// supported by this CPU.
pub(crate) unsafe fn exp_scaled<T: Real>(
    level: Level,
    x: *const T,
    out: *mut T,
    n: usize,
    shift: f64,
    scale: f64,
    stream: bool,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = stream; // only the AVX-512 level has streaming stores
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx512 => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                avx512::exp_scaled(x, cast_mut(o).unwrap(), n, shift, scale, stream)
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx2 => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                avx2::exp_scaled(x, cast_mut(o).unwrap(), n, shift, scale)
            )
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the caller's contract.
        Level::Neon => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                neon::exp_scaled(x, cast_mut(o).unwrap(), n, shift, scale)
            )
        },
        // SAFETY: the caller's contract.
        _ => unsafe { scalar::exp_scaled(x, out, n, shift, scale) },
    }
}

/// `out[k] = (x[k] - shift) - log_total` for `k < n` at `level`; `out` may equal `x`.
///
/// # Safety
/// As [`exp_scaled`].
pub(crate) unsafe fn shift_sub<T: Real>(
    level: Level,
    x: *const T,
    out: *mut T,
    n: usize,
    shift: f64,
    log_total: f64,
    stream: bool,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = stream; // only the AVX-512 level has streaming stores
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx512 => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                avx512::shift_sub(x, cast_mut(o).unwrap(), n, shift, log_total, stream)
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx2 => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                avx2::shift_sub(x, cast_mut(o).unwrap(), n, shift, log_total)
            )
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the caller's contract.
        Level::Neon => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                neon::shift_sub(x, cast_mut(o).unwrap(), n, shift, log_total)
            )
        },
        // SAFETY: the caller's contract.
        _ => unsafe { scalar::shift_sub(x, out, n, shift, log_total) },
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
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx512 => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                avx512::lanes_write(x, cast_mut(o).unwrap(), n, b, a, exp)
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx2 => unsafe {
            let o = out;
            by_type!(
                T,
                x,
                avx2::lanes_write(x, cast_mut(o).unwrap(), n, b, a, exp)
            )
        },
        // SAFETY: the caller's contract (NEON uses the scalar write for columns).
        _ => unsafe { scalar::lanes_write(x, out, n, b, a, exp) },
    }
}

/// States of `w <= COL_TILE` adjacent columns of an `(n, inner)` C-order slab at `x`, one
/// streaming pass down the rows; `out[j]` for column `j < w`.
///
/// # Safety
/// `x.add(k * inner + j)` readable for `k < n`, `j < w`; `level` supported by this CPU.
pub(crate) unsafe fn column_states<T: Real>(
    level: Level,
    x: *const T,
    n: usize,
    inner: usize,
    w: usize,
    out: &mut [LseState],
) {
    debug_assert!(w <= COL_TILE && out.len() >= w);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx512 => unsafe { by_type!(T, x, avx512::column_states(x, n, inner, w, out)) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Level::Avx2 => unsafe { by_type!(T, x, avx2::column_states(x, n, inner, w, out)) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the caller's contract.
        Level::Neon => unsafe { by_type!(T, x, neon::column_states(x, n, inner, w, out)) },
        // SAFETY: the caller's contract.
        _ => unsafe { scalar::column_states(x, n, inner, w, out) },
    }
}

/// Whether `level` has the short-row kernels (rows in vector lanes) for `pitch`.
pub(crate) fn has_short_rows(level: Level, pitch: usize) -> bool {
    level == Level::Avx512 && pitch < (1 << 27)
}

/// logsumexp of `rows` rows of `n <= SHORT_ROW` elements, `pitch` apart, into `out`.
///
/// # Safety
/// The rows readable, `out` writable for `rows` elements; `has_short_rows(level, pitch)`.
pub(crate) unsafe fn short_rows_logsumexp<T: Real>(
    level: Level,
    x: *const T,
    rows: usize,
    n: usize,
    pitch: usize,
    out: *mut T,
) {
    debug_assert!(n <= SHORT_ROW && has_short_rows(level, pitch));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        let o = out;
        by_type!(
            T,
            x,
            avx512::short_rows_logsumexp(x, rows, n, pitch, cast_mut(o).unwrap())
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{level:?} {x:?} {rows} {n} {pitch} {out:?}: no short-row kernel")
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
    debug_assert!(n <= SHORT_ROW && has_short_rows(level, pitch));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract.
    unsafe {
        let o = out;
        by_type!(
            T,
            x,
            avx512::short_rows_softmax(x, rows, n, pitch, cast_mut(o).unwrap(), log)
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{level:?} {x:?} {rows} {n} {pitch} {out:?} {log}: no short-row kernel")
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

/// `out[k] = exp(x[k])` in float64 at `level` (< 1 ULP).
///
/// # Panics
/// If the slices differ in length or `level` is not available on this CPU.
pub fn exp_f64(level: Level, x: &[f64], out: &mut [f64]) {
    assert_eq!(x.len(), out.len(), "exp_f64: x and out differ in length");
    assert!(is_available(level), "level {level:?} is not available");
    let (n, xp, op) = (x.len(), x.as_ptr(), out.as_mut_ptr());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is available; both slices hold n elements.
        Level::Avx512 => unsafe { avx512::exp_f64(xp, op, n) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { avx2::exp_f64(xp, op, n) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Level::Neon => unsafe { neon::exp_f64(xp, op, n) },
        _ => scalar::exp_f64(x, out),
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

/// Whether any of `n` elements at `p` is NaN (the slow path behind an all `-inf` block).
pub(crate) fn has_nan<T: Real>(p: *const T, n: usize) -> bool {
    // SAFETY: callers pass a readable block of n elements.
    (0..n).any(|k| unsafe { (*p.add(k)).to_f64().is_nan() })
}

#[cfg(test)]
mod tests;
