//! Tests that need NVRTC or nothing at all: compiling every kernel, the availability probe and
//! the tier policy.

use super::launch::block_threads;
use super::*;

/// The pip package nvidia-cuda-nvrtc's lib directories, found through python3.
fn register_pip_nvrtc() {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia, os\nfor p in nvidia.__path__:\n  for s in ('cu13/lib', 'cuda_nvrtc/lib'):\n    print(os.path.join(p, s))",
        ])
        .output();
    if let Ok(out) = out {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            nvrtc::add_search_dir(line.trim());
        }
    }
}

#[test]
fn kernels_compile_for_sm80_and_sm90() {
    register_pip_nvrtc();
    // Compile for real, not from a CUBIN cache left by an earlier run.
    std::env::set_var("STABLELSE_CACHE_DIR", "");
    if let Err(e) = nvrtc::ensure_loaded() {
        if std::env::var_os("STABLELSE_REQUIRE_NVRTC").is_some() {
            panic!("{e}");
        }
        eprintln!("skipped: {e}");
        return;
    }
    // NVRTC is thread-safe: the eight programs compile side by side.
    std::thread::scope(|sc| {
        let jobs: Vec<_> = ["sm_80", "sm_90"]
            .into_iter()
            .flat_map(|arch| DType::ALL.into_iter().map(move |dt| (arch, dt)))
            .map(|(arch, dt)| sc.spawn(move || (arch, dt, compile_for_arch(dt, arch))))
            .collect();
        for j in jobs {
            let (arch, dt, r) = j.join().expect("compile thread");
            let cubin = r.unwrap_or_else(|e| panic!("{e}"));
            // An ELF image.
            assert_eq!(&cubin[..4], b"\x7fELF", "{arch} {dt:?}");
        }
    });
}

#[test]
fn availability_probe_does_not_panic() {
    // On a machine without libcuda this is false; with one, true or false; never a panic.
    let _ = is_available();
    let _ = driver_version();
}

#[test]
fn tiers() {
    let ro = TierFacts {
        sms: 132,
        pass2: false,
        cacheable: true,
        clusters: true,
        vec_width: 4,
    };
    let rw = TierFacts { pass2: true, ..ro };
    let rw80 = TierFacts {
        clusters: false,
        ..rw
    };
    assert_eq!(choose_tier(1000, 10, ro), Tier::Warp);
    assert_eq!(choose_tier(1000, 4096, ro), Tier::Warp);
    assert_eq!(choose_tier(1000, 512, rw), Tier::WarpRegisters);
    assert_eq!(choose_tier(1000, 1024, rw), Tier::WarpRegisters);
    assert_eq!(choose_tier(1000, 1025, rw), Tier::Cached { threads: 128 });
    assert_eq!(choose_tier(4096, 4096, rw), Tier::Cached { threads: 128 });
    assert_eq!(choose_tier(4096, 32768, ro), Tier::Block { threads: 512 });
    assert_eq!(block_threads(4096, 8), 128);
    assert_eq!(block_threads(65536, 8), 512);
    assert_eq!(choose_tier(4096, 8192, rw), Tier::Cached { threads: 256 });
    assert_eq!(choose_tier(4096, 16384, rw), Tier::Cached { threads: 512 });
    assert_eq!(
        choose_tier(4096, 32768, rw),
        Tier::Cluster {
            size: 8,
            chunk: 4096
        }
    );
    assert_eq!(
        choose_tier(4096, 32768, rw80),
        Tier::Cached { threads: 512 }
    );
    let rw16 = TierFacts { vec_width: 8, ..rw };
    assert_eq!(
        choose_tier(4096, 32768, rw16),
        Tier::Cached { threads: 512 }
    );
    assert_eq!(
        choose_tier(4096, 32768, rw80),
        Tier::Cached { threads: 512 }
    );
    assert_eq!(
        choose_tier(64, 262144, rw),
        Tier::Cluster {
            size: 16,
            chunk: 16384
        }
    );
    assert_eq!(
        choose_tier(64, 131072, rw),
        Tier::Cluster {
            size: 8,
            chunk: 16384
        }
    );
    assert_eq!(
        choose_tier(8, 16384, rw),
        Tier::Cluster {
            size: 8,
            chunk: 2048
        }
    );
    assert!(matches!(choose_tier(64, 262144, rw80), Tier::Split { .. }));
    let unaligned = TierFacts {
        cacheable: false,
        ..rw
    };
    assert_eq!(
        choose_tier(4096, 4096, unaligned),
        Tier::Block { threads: 128 }
    );
    match choose_tier(64, 262144, ro) {
        Tier::Split { chunk, nchunks } => {
            assert!(chunk * nchunks >= 262144 && chunk % 64 == 0);
            assert!(64 * nchunks >= 4 * 132);
        }
        t => panic!("{t:?}"),
    }
    assert!(matches!(choose_tier(4, 16384, ro), Tier::Split { .. }));
}
