//! The floating-point element types the kernels accept.

/// An input element type: `f32` or `f64`.
///
/// The scalar reference computes in `f64` whatever `Self` is: float32 inputs widen exactly, so
/// a float32 result is rounded once, at the end. This is what every SIMD path is tested against.
pub trait Real: Copy + Send + Sync + PartialOrd + std::fmt::Debug + 'static {
    const NAME: &'static str;
    const NAN: Self;
    const NEG_INFINITY: Self;
    /// Whether results need the float64-accurate exp (float64) or a float32-grade one whose
    /// error (~5e-11 relative) vanishes in the final rounding (float32).
    const FULL: bool;
    /// Elements per block of the two-pass row kernel: 8 KiB, so the block being summed and
    /// the next one being loaded sit in L1 together (16 KiB blocks measured 30% slower from
    /// DRAM on one thread).
    const BLOCK: usize;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Real for f32 {
    const NAME: &'static str = "float32";
    const NAN: Self = f32::NAN;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const FULL: bool = false;
    const BLOCK: usize = 2048;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    const NAME: &'static str = "float64";
    const NAN: Self = f64::NAN;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const FULL: bool = true;
    const BLOCK: usize = 1024;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}
