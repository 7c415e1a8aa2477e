//! 16-bit floats (IEEE float16 and bfloat16) as stored elements, computed in float32.
//!
//! The kernels compute in `f32` or `f64`. A float16 or bfloat16 array is never copied whole:
//! each block of lanes is widened to float32 into a per-thread buffer as it is gathered, the
//! float32 kernels run there, and the results are narrowed back as they are written
//! ([`Stored`]). Both conversions are exact or correctly rounded (round to nearest, ties to
//! even), so every path gives the same bits:
//!
//! - float16 -> float32 and bfloat16 -> float32 are exact (subnormals, infinities and NaN
//!   payloads included);
//! - float32 -> float16 and float32 -> bfloat16 round to nearest even, overflow to infinity,
//!   keep subnormal results, and turn a NaN into a quiet NaN of the same sign that keeps the
//!   leading payload bits (as x86's `vcvtps2ph` and the IEEE 754 conversion do).
//!
//! On x86-64 the float16 conversions use F16C (`vcvtph2ps` / `vcvtps2ph`, 8 lanes) or AVX-512
//! (16 lanes) when the SIMD level chosen for the process ([`crate::simd::level`]) has them;
//! elsewhere (and at the scalar level) the portable functions below, which the vector paths
//! are tested against bit for bit over every input. bfloat16 is a shift and an integer
//! rounding, which the compiler vectorises.
//!
//! ```
//! use stablelse::half::{f16_to_f32, f32_to_f16, bf16_to_f32, f32_to_bf16};
//! assert_eq!(f16_to_f32(0x3c00), 1.0);
//! assert_eq!(f32_to_f16(65520.0), 0x7c00); // the tie above 65504 rounds to infinity
//! assert_eq!(f32_to_f16(5.960464477539063e-8), 0x0001); // the smallest subnormal
//! assert_eq!(bf16_to_f32(0x3f80), 1.0);
//! assert_eq!(f32_to_bf16(1.00390625), 0x3f80); // a tie: to the even neighbour
//! ```

use crate::real::Real;

/// An IEEE 754 binary16 value, by its bits.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct F16(pub u16);

/// A bfloat16 value (the upper half of a float32), by its bits.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bf16(pub u16);

/// The float16 `h` as a float32 (exact).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in float32 (a normal number there).
            let v = man as f32 * (1.0 / 16_777_216.0);
            return f32::from_bits(v.to_bits() | sign);
        }
        // Infinity or NaN; a signalling NaN becomes quiet, as `vcvtph2ps` does.
        0x1f if man != 0 => sign | 0x7fc0_0000 | (man << 13),
        0x1f => sign | 0x7f80_0000,
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// The float32 `f` rounded to the nearest float16 (ties to even).
#[inline]
pub fn f32_to_f16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let a = x & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        // NaN: quiet, with the leading payload bits.
        return sign | 0x7e00 | ((a >> 13) & 0x3ff) as u16;
    }
    if a >= 0x477f_f000 {
        // 65520 and above (the tie between 65504 and 2^16 goes to the even 2^16): infinity.
        return sign | 0x7c00;
    }
    if a >= 0x3880_0000 {
        // At least 2^-14: normal. Rebias the exponent (127 -> 15) and round 23 -> 10 bits;
        // a carry out of the mantissa steps the exponent, which is what rounding up means.
        let m = a - (112 << 23);
        return sign | ((m + 0xfff + ((m >> 13) & 1)) >> 13) as u16;
    }
    if a <= 0x3300_0000 {
        // At most 2^-25, half the smallest subnormal (a tie, to the even zero).
        return sign;
    }
    // Subnormal result: the value in units of 2^-24, rounded to an integer (ties to even);
    // rounding up from 0x3ff gives 0x400, the smallest normal, correctly encoded.
    let e = a >> 23;
    let mant = (a & 0x007f_ffff) | 0x0080_0000;
    let shift = 126 - e; // 14..=24: the value is mant * 2^(e - 150) = (mant >> shift) * 2^-24
    let q = mant >> shift;
    let rem = mant & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let up = (rem > half || (rem == half && q & 1 == 1)) as u32;
    sign | (q + up) as u16
}

/// The bfloat16 `b` as a float32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The float32 `f` rounded to the nearest bfloat16 (ties to even).
#[inline]
pub fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: quiet, with the leading payload bits (rounding could carry it to infinity).
        return ((x >> 16) | 0x0040) as u16;
    }
    // Overflow rounds to infinity through the carry into the exponent.
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// How the float16 conversions run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// The portable functions above.
    Portable,
    /// x86 F16C, 8 lanes.
    F16c,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Conversion {
    pub fn name(self) -> &'static str {
        match self {
            Conversion::Portable => "portable",
            Conversion::F16c => "f16c",
            Conversion::Avx512 => "avx512",
        }
    }
}

/// The conversion of the process's SIMD level: AVX-512 at the AVX-512 level, F16C at the AVX2
/// level when the CPU has it, the portable one otherwise (`STABLELSE_SIMD=scalar` included).
pub fn conversion() -> Conversion {
    use std::sync::OnceLock;
    static CONVERSION: OnceLock<Conversion> = OnceLock::new();
    *CONVERSION.get_or_init(|| {
        let best = match crate::simd::level() {
            crate::simd::Level::Avx512 => Conversion::Avx512,
            crate::simd::Level::Avx2 => Conversion::F16c,
            _ => Conversion::Portable,
        };
        if supported(best) {
            best
        } else {
            Conversion::Portable
        }
    })
}

/// Every float16 conversion this CPU can run (the tests compare them all).
pub fn available_conversions() -> Vec<Conversion> {
    [Conversion::Portable, Conversion::F16c, Conversion::Avx512]
        .into_iter()
        .filter(|&c| supported(c))
        .collect()
}

/// Whether this CPU can run conversion `c` (detected once).
fn supported(c: Conversion) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static X86: OnceLock<(bool, bool)> = OnceLock::new();
        let (f16c, avx512) = *X86.get_or_init(|| {
            (
                std::arch::is_x86_feature_detected!("avx")
                    && std::arch::is_x86_feature_detected!("f16c"),
                std::arch::is_x86_feature_detected!("avx512f"),
            )
        });
        match c {
            Conversion::Portable => true,
            Conversion::F16c => f16c,
            Conversion::Avx512 => avx512,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        c == Conversion::Portable
    }
}

/// Widens `src` into `dst` (the shorter length) with conversion `c` (which this CPU has:
/// [`available_conversions`]; an unavailable one falls back to the portable functions).
pub fn widen_f16(c: Conversion, src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c; // only the portable conversion exists here
    #[cfg(target_arch = "x86_64")]
    {
        if c != Conversion::Portable && supported(c) {
            // SAFETY: the CPU has the instructions (checked just above).
            done = unsafe {
                match c {
                    Conversion::Avx512 => x86::widen_avx512(src, dst),
                    _ => x86::widen_f16c(src, dst),
                }
            };
        }
    }
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16_to_f32(s);
    }
}

/// Narrows `src` into `dst` (the shorter length) with conversion `c`, as [`widen_f16`].
pub fn narrow_f16(c: Conversion, src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c; // only the portable conversion exists here
    #[cfg(target_arch = "x86_64")]
    {
        if c != Conversion::Portable && supported(c) {
            // SAFETY: the CPU has the instructions (checked just above).
            done = unsafe {
                match c {
                    Conversion::Avx512 => x86::narrow_avx512(src, dst),
                    _ => x86::narrow_f16c(src, dst),
                }
            };
        }
    }
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f32_to_f16(s);
    }
}

/// Widens bfloat16 `src` into `dst` (the shorter length).
pub fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(s);
    }
}

/// Narrows `src` into bfloat16 `dst` (the shorter length).
pub fn narrow_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(s);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Widens the whole 8-element groups; returns how many elements were done.
    #[target_feature(enable = "avx,f16c")]
    pub(super) fn widen_f16c(src: &[u16], dst: &mut [f32]) -> usize {
        let n = src.len().min(dst.len()) / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n, inside both slices; unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        n
    }

    /// Narrows the whole 8-element groups (round to nearest even); returns the count done.
    #[target_feature(enable = "avx,f16c")]
    pub(super) fn narrow_f16c(src: &[f32], dst: &mut [u16]) -> usize {
        let n = src.len().min(dst.len()) / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: as in widen_f16c.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
        }
        n
    }

    /// As [`widen_f16c`], 16 lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn widen_avx512(src: &[u16], dst: &mut [f32]) -> usize {
        let n = src.len().min(dst.len()) / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n, inside both slices; unaligned loads and stores.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        n
    }

    /// As [`narrow_f16c`], 16 lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn narrow_avx512(src: &[f32], dst: &mut [u16]) -> usize {
        let n = src.len().min(dst.len()) / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: as in widen_avx512.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(i));
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
            }
        }
        n
    }
}

/// Elements converted per step when a run is strided or misaligned (through a stack buffer).
const RUN_CHUNK: usize = 256;

/// An element type as stored in an array, and the kernel type it is computed in.
///
/// `f32` and `f64` are their own compute types (the kernels may read such arrays where they
/// are); [`F16`] and [`Bf16`] are computed in `f32`, converted per run of elements.
pub trait Stored: Copy + Send + Sync + 'static {
    /// The type the kernels compute in.
    type Compute: Real;
    /// Whether `Self` is `Compute` itself, so the kernels can read the array in place.
    const NATIVE: bool;

    /// Reads `dst.len()` elements from `src`, `stride` bytes apart, as `Compute` values.
    ///
    /// # Safety
    /// Every element read lies inside a live array of `Self` (possibly unaligned).
    unsafe fn widen_run(src: *const u8, stride: isize, dst: &mut [Self::Compute]);

    /// Writes `src` to the elements at `dst`, `stride` bytes apart, rounded to `Self`.
    ///
    /// # Safety
    /// Every element written lies inside a live, writeable array of `Self`.
    unsafe fn narrow_run(src: &[Self::Compute], dst: *mut u8, stride: isize);
}

/// Copies `dst.len()` values of `T` from `src`, `stride` bytes apart, into `dst`.
///
/// # Safety
/// Every element read lies inside a live array of `T` (possibly unaligned).
#[inline]
pub unsafe fn read_run<T: Copy>(src: *const u8, stride: isize, dst: &mut [T]) {
    for (i, d) in dst.iter_mut().enumerate() {
        // SAFETY: the caller's contract.
        *d = unsafe { (src.offset(i as isize * stride) as *const T).read_unaligned() };
    }
}

/// Copies `src` into the values of `T` at `dst`, `stride` bytes apart.
///
/// # Safety
/// Every element written lies inside a live, writeable array of `T` (possibly unaligned).
#[inline]
pub unsafe fn write_run<T: Copy>(src: &[T], dst: *mut u8, stride: isize) {
    for (i, &s) in src.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { (dst.offset(i as isize * stride) as *mut T).write_unaligned(s) };
    }
}

/// Widens a run of 16-bit values with `widen` over slices: in place when the run is dense
/// and aligned, through a stack buffer otherwise.
///
/// # Safety
/// As [`Stored::widen_run`] for a 16-bit type.
#[inline]
unsafe fn widen_run16(
    src: *const u8,
    stride: isize,
    dst: &mut [f32],
    widen: impl Fn(&[u16], &mut [f32]),
) {
    if stride == 2 && (src as usize).is_multiple_of(2) {
        // SAFETY: dense and aligned u16 elements inside the array (the caller's contract).
        let s = unsafe { std::slice::from_raw_parts(src as *const u16, dst.len()) };
        return widen(s, dst);
    }
    let mut tmp = [0u16; RUN_CHUNK];
    for (c, chunk) in dst.chunks_mut(RUN_CHUNK).enumerate() {
        let t = &mut tmp[..chunk.len()];
        // SAFETY: the caller's contract, from element c * RUN_CHUNK on.
        unsafe { read_run(src.offset((c * RUN_CHUNK) as isize * stride), stride, t) };
        widen(t, chunk);
    }
}

/// As [`widen_run16`], the other way.
///
/// # Safety
/// As [`Stored::narrow_run`] for a 16-bit type.
#[inline]
unsafe fn narrow_run16(
    src: &[f32],
    dst: *mut u8,
    stride: isize,
    narrow: impl Fn(&[f32], &mut [u16]),
) {
    if stride == 2 && (dst as usize).is_multiple_of(2) {
        // SAFETY: dense and aligned u16 elements inside the array (the caller's contract).
        let d = unsafe { std::slice::from_raw_parts_mut(dst as *mut u16, src.len()) };
        return narrow(src, d);
    }
    let mut tmp = [0u16; RUN_CHUNK];
    for (c, chunk) in src.chunks(RUN_CHUNK).enumerate() {
        let t = &mut tmp[..chunk.len()];
        narrow(chunk, t);
        // SAFETY: the caller's contract, from element c * RUN_CHUNK on.
        unsafe { write_run(t, dst.offset((c * RUN_CHUNK) as isize * stride), stride) };
    }
}

macro_rules! native_stored {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            type Compute = $t;
            const NATIVE: bool = true;
            #[inline]
            unsafe fn widen_run(src: *const u8, stride: isize, dst: &mut [$t]) {
                // SAFETY: forwarded.
                unsafe { read_run(src, stride, dst) }
            }
            #[inline]
            unsafe fn narrow_run(src: &[$t], dst: *mut u8, stride: isize) {
                // SAFETY: forwarded.
                unsafe { write_run(src, dst, stride) }
            }
        }
    )*};
}
native_stored!(f32, f64);

impl Stored for F16 {
    type Compute = f32;
    const NATIVE: bool = false;
    unsafe fn widen_run(src: *const u8, stride: isize, dst: &mut [f32]) {
        let c = conversion();
        // SAFETY: forwarded.
        unsafe { widen_run16(src, stride, dst, |s, d| widen_f16(c, s, d)) }
    }
    unsafe fn narrow_run(src: &[f32], dst: *mut u8, stride: isize) {
        let c = conversion();
        // SAFETY: forwarded.
        unsafe { narrow_run16(src, dst, stride, |s, d| narrow_f16(c, s, d)) }
    }
}

impl Stored for Bf16 {
    type Compute = f32;
    const NATIVE: bool = false;
    unsafe fn widen_run(src: *const u8, stride: isize, dst: &mut [f32]) {
        // SAFETY: forwarded.
        unsafe { widen_run16(src, stride, dst, widen_bf16) }
    }
    unsafe fn narrow_run(src: &[f32], dst: *mut u8, stride: isize) {
        // SAFETY: forwarded.
        unsafe { narrow_run16(src, dst, stride, narrow_bf16) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every float32 whose rounding to float16 is decided near a boundary: each float16 `h`,
    /// the midpoints to its neighbours and one float32 ULP either side of them, plus wide
    /// samples of the float32 line.
    fn boundary_inputs() -> Vec<f32> {
        let mut v = Vec::new();
        for h in 0..=0xffffu16 {
            let x = f16_to_f32(h);
            if !x.is_finite() {
                continue;
            }
            let up = f16_to_f32(h.wrapping_add(1));
            let mid = ((x as f64 + up as f64) / 2.0) as f32; // exact: float16 has 11 bits
            for y in [x, mid] {
                let b = y.to_bits();
                v.extend([y, f32::from_bits(b.wrapping_sub(1)), f32::from_bits(b + 1)]);
            }
        }
        let mut s: u32 = 0x1234_5678;
        for _ in 0..1 << 20 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            v.push(f32::from_bits(s));
        }
        v.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            65520.0,
        ]);
        v
    }

    /// The float16 nearest `x` (ties to even), by exhaustive comparison in float64.
    fn nearest_f16(x: f32) -> u16 {
        let sign = if x.is_sign_negative() { 0x8000 } else { 0 };
        let a = x.abs() as f64;
        if a >= 65520.0 {
            return sign | 0x7c00;
        }
        // The float16 magnitudes are increasing in their bits: binary search the floor.
        let (mut lo, mut hi) = (0u16, 0x7bffu16);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if f16_to_f32(mid) as f64 <= a {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let below = f16_to_f32(lo) as f64;
        if below == a || lo == 0x7bff {
            return sign | lo;
        }
        let above = f16_to_f32(lo + 1) as f64;
        let pick = match (a - below).partial_cmp(&(above - a)) {
            Some(std::cmp::Ordering::Less) => lo,
            Some(std::cmp::Ordering::Greater) => lo + 1,
            _ if lo & 1 == 0 => lo,
            _ => lo + 1,
        };
        sign | pick
    }

    #[test]
    fn widen_is_exact_for_every_float16() {
        for h in 0..=0xffffu16 {
            let x = f16_to_f32(h);
            if h & 0x7c00 == 0x7c00 && h & 0x3ff != 0 {
                assert!(x.is_nan());
                assert_eq!(x.to_bits() >> 31, (h >> 15) as u32);
                continue;
            }
            let exp = ((h >> 10) & 0x1f) as i32;
            let man = (h & 0x3ff) as f64;
            let mag = match exp {
                0 => man * 2f64.powi(-24),
                31 => f64::INFINITY,
                _ => (1.0 + man / 1024.0) * 2f64.powi(exp - 15),
            };
            let want = if h & 0x8000 != 0 { -mag } else { mag };
            assert_eq!(x as f64, want, "{h:#06x}");
            assert_eq!(x.is_sign_negative(), h & 0x8000 != 0);
            // Round trip.
            assert_eq!(f32_to_f16(x), h, "{h:#06x}");
        }
    }

    #[test]
    fn narrow_rounds_to_nearest_even() {
        for x in boundary_inputs() {
            if x.is_nan() {
                continue;
            }
            assert_eq!(
                f32_to_f16(x),
                nearest_f16(x),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn nan_stays_nan_and_keeps_its_sign() {
        for bits in [
            0x7f80_0001u32,
            0x7fc0_0000,
            0x7f80_2000,
            0xff80_0001,
            0x7fff_ffff,
        ] {
            let x = f32::from_bits(bits);
            let h = f32_to_f16(x);
            assert!(f16_to_f32(h).is_nan());
            assert_eq!(h >> 15, (bits >> 31) as u16);
            let b = f32_to_bf16(x);
            assert!(bf16_to_f32(b).is_nan());
            assert_eq!(b >> 15, (bits >> 31) as u16);
        }
    }

    #[test]
    fn vector_conversions_match_portable_bit_for_bit() {
        let halves: Vec<u16> = (0..=0xffffu16).collect();
        let floats = boundary_inputs();
        for c in available_conversions() {
            // Odd lengths and offsets exercise the scalar tails.
            for skip in [0usize, 3] {
                let src = &halves[skip..];
                let mut w = vec![0f32; src.len()];
                widen_f16(c, src, &mut w);
                for (&h, &x) in src.iter().zip(&w) {
                    assert_eq!(
                        x.to_bits(),
                        f16_to_f32(h).to_bits(),
                        "{} {h:#06x}",
                        c.name()
                    );
                }
                let src = &floats[skip..];
                let mut n = vec![0u16; src.len()];
                narrow_f16(c, src, &mut n);
                for (&x, &h) in src.iter().zip(&n) {
                    assert_eq!(h, f32_to_f16(x), "{} {:#010x}", c.name(), x.to_bits());
                }
            }
        }
    }

    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        for b in 0..=0xffffu16 {
            let x = bf16_to_f32(b);
            assert_eq!(x.to_bits(), (b as u32) << 16);
            if !x.is_nan() {
                assert_eq!(f32_to_bf16(x), b);
            }
        }
        let one = 0x3f80_0000u32;
        assert_eq!(f32_to_bf16(f32::from_bits(one + 0x8000)), 0x3f80); // tie, even below
        assert_eq!(f32_to_bf16(f32::from_bits(one + 0x8001)), 0x3f81);
        assert_eq!(f32_to_bf16(f32::from_bits(one + 0x1_8000)), 0x3f82); // tie, even above
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80); // overflow
        assert_eq!(f32_to_bf16(f32::from_bits(1)), 0); // smallest subnormal float32
    }

    #[test]
    fn runs_convert_strided_and_misaligned_elements() {
        // Every other element of a byte buffer at an odd address; no NaNs (a signalling NaN
        // comes back quiet), both signs.
        let vals: Vec<u16> = (0..1000u16).map(|i| i.wrapping_mul(97) & 0xbbff).collect();
        let mut bytes = vec![0u8; 1 + 4 * vals.len()];
        for (i, v) in vals.iter().enumerate() {
            bytes[1 + 4 * i..3 + 4 * i].copy_from_slice(&v.to_ne_bytes());
        }
        let mut got = vec![0f32; vals.len()];
        // SAFETY: 1000 elements, 4 bytes apart, from byte 1 of the buffer.
        unsafe { <F16 as Stored>::widen_run(bytes.as_ptr().add(1), 4, &mut got) };
        for (v, g) in vals.iter().zip(&got) {
            assert_eq!(g.to_bits(), f16_to_f32(*v).to_bits());
        }
        let mut back = vec![0u8; bytes.len()];
        // SAFETY: as above, writeable.
        unsafe { <F16 as Stored>::narrow_run(&got, back.as_mut_ptr().add(1), 4) };
        assert!(back == bytes, "the round trip changed the buffer");
        // SAFETY: as above.
        unsafe { <Bf16 as Stored>::widen_run(bytes.as_ptr().add(1), 4, &mut got) };
        for (v, g) in vals.iter().zip(&got) {
            assert_eq!(g.to_bits(), bf16_to_f32(*v).to_bits());
        }
    }
}
