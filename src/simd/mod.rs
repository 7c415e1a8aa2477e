//! Instruction-set levels, detected once per process at run time.
//!
//! `STABLELSE_SIMD=scalar|avx2|avx512|neon` forces a level (capped at what the CPU supports)
//! for tests and benchmarks. The wheel is built for the baseline target; wider instructions are
//! only used behind this detection.

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

/// The level chosen for this process (detected on first use).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}
