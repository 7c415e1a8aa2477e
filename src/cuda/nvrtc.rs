//! NVRTC: find `libnvrtc`, compile a `.cu` source to CUBIN for one `sm_XX`, cache the result.
//!
//! CUBIN, never PTX: PTX from an NVRTC newer than the driver (NVRTC 13.5 on a 13.0 driver) is
//! refused with `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`, while CUBIN for the device's own
//! architecture loads on any driver that knows the architecture.
//!
//! The library comes from the system loader path when it is there, else from a directory
//! registered with [`add_search_dir`] (the Python layer passes the `nvidia-cuda-nvrtc` pip
//! package's `lib` directories) or named by `STABLELSE_NVRTC_DIR`, or the file named by
//! `STABLELSE_NVRTC_LIB`. Such a file is opened once with `RTLD_GLOBAL` and kept open;
//! cudarc's own `dlopen("libnvrtc.so.13")` then finds it by its soname.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cudarc::nvrtc::{result, sys};

static SEARCH_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static LOADED: Mutex<bool> = Mutex::new(false);

type CubinKey = (u64, (i32, i32), String);
static CUBINS: Mutex<Option<HashMap<CubinKey, Arc<Vec<u8>>>>> = Mutex::new(None);

/// Registers a directory that may hold `libnvrtc.so*`, tried when the loader cannot find it.
pub fn add_search_dir(dir: impl Into<PathBuf>) {
    let dir = dir.into();
    let mut dirs = SEARCH_DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if !dirs.contains(&dir) {
        dirs.push(dir);
    }
}

fn candidate_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("STABLELSE_NVRTC_LIB") {
        files.push(PathBuf::from(f));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("STABLELSE_NVRTC_DIR") {
        dirs.extend(std::env::split_paths(&d));
    }
    dirs.extend(
        SEARCH_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned(),
    );
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so"))
            })
            .collect();
        // Newest soname first: libnvrtc.so.13 before libnvrtc.so.12.
        found.sort();
        found.reverse();
        files.extend(found);
    }
    files
}

fn open_global(path: &Path) -> bool {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading libnvrtc runs its initialisers, which have no preconditions.
    match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(lib) => {
            // Kept for the life of the process: cudarc holds symbols from it.
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Makes sure cudarc can load NVRTC; an error names what was searched.
pub fn ensure_loaded() -> Result<(), String> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if *loaded {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { sys::is_culib_present() } {
        *loaded = true;
        return Ok(());
    }
    let files = candidate_files();
    for f in &files {
        // SAFETY: as above; the soname check below decides whether cudarc can now see it.
        if open_global(f) && unsafe { sys::is_culib_present() } {
            *loaded = true;
            return Ok(());
        }
    }
    Err(format!(
        "NVRTC (libnvrtc.so.13) was not found on the loader path nor in {files:?}; \
         install the pip package nvidia-cuda-nvrtc or set STABLELSE_NVRTC_LIB"
    ))
}

/// The NVRTC version `(major, minor)`.
pub fn version() -> Result<(i32, i32), String> {
    ensure_loaded()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is loaded; both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

fn log_of(prog: sys::nvrtcProgram) -> String {
    // SAFETY: prog is a live program.
    match unsafe { result::get_program_log(prog) } {
        Ok(chars) => {
            let bytes: Vec<u8> = chars
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c.to_ne_bytes()[0])
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

fn compile_uncached(src: &str, arch: &str, name: &str) -> Result<Vec<u8>, String> {
    let csrc = CString::new(src).map_err(|_| "kernel source holds a NUL byte".to_string())?;
    let cname = CString::new(name).map_err(|_| "kernel name holds a NUL byte".to_string())?;
    let prog = result::create_program(&csrc, Some(&cname))
        .map_err(|e| format!("nvrtcCreateProgram failed: {e:?}"))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
    ];
    // SAFETY: prog is live until destroy_program below; buffers are sized by NVRTC.
    let out = unsafe {
        match result::compile_program(prog, &opts) {
            Err(e) => Err(format!(
                "NVRTC could not compile {name} for {arch}: {e:?}\n{}",
                log_of(prog)
            )),
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(format!("nvrtcGetCUBINSize failed: {e:?}")),
                    Ok(()) if size == 0 => Err(format!(
                        "NVRTC produced no CUBIN for {arch} (a virtual compute_XX target?)"
                    )),
                    Ok(()) => {
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                            .result()
                            .map(|_| buf)
                            .map_err(|e| format!("nvrtcGetCUBIN failed: {e:?}"))
                    }
                }
            }
        }
    };
    // SAFETY: prog came from create_program and is destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// The on-disk CUBIN cache directory: `STABLELSE_CACHE_DIR`, else `$XDG_CACHE_HOME/stablelse`,
/// else `~/.cache/stablelse`; `STABLELSE_CACHE_DIR=""` turns it off.
fn disk_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("STABLELSE_CACHE_DIR") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("stablelse")),
    }
    .map(|d| d.join("cuda"))
}

fn disk_load(path: &Path) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok()?;
    // A CUBIN is an ELF image; anything else (a torn write) is recompiled.
    (data.len() > 64 && data.starts_with(b"\x7fELF")).then_some(data)
}

fn disk_store(path: &Path, data: &[u8]) {
    // Best effort: write a private temporary file, then rename it into place atomically.
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&tmp, data).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Compiles `src` to CUBIN for `arch` (`"sm_90"`), cached per (source hash, NVRTC version,
/// arch) for the life of the process and on disk (see `disk_cache_dir`), so only the first
/// use on a machine pays NVRTC's seconds.
pub fn compile_cubin(src: &str, arch: &str, name: &str) -> Result<Arc<Vec<u8>>, String> {
    let ver = version()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    let key = (h.finish(), ver, arch.to_string());
    if let Some(c) = CUBINS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok(c.clone());
    }
    let file = disk_cache_dir().map(|d| {
        d.join(format!(
            "{:016x}-nvrtc{}.{}-{arch}.cubin",
            key.0, ver.0, ver.1
        ))
    });
    let cubin = match file.as_deref().and_then(disk_load) {
        Some(c) => Arc::new(c),
        None => {
            let c = Arc::new(compile_uncached(src, arch, name)?);
            if let Some(f) = &file {
                disk_store(f, &c);
            }
            c
        }
    };
    CUBINS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, cubin.clone());
    Ok(cubin)
}
