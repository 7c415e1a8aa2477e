//! The rayon pool stablelse runs on, and deterministic work splitting.
//!
//! Work is always cut into the same pieces whatever the thread count (pieces depend only on the
//! problem size), and every reduction across pieces is merged in piece order, so results are
//! bit-identical for 1, 2 or 64 threads. Below [`PARALLEL_MIN_ELEMENTS`] the pieces run inline on
//! the calling thread: waking the pool costs more than it gives.

use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// Below this many elements of work a call stays on the calling thread.
pub const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Target number of elements per piece of work.
pub const GRAIN_ELEMENTS: usize = 1 << 14;

struct Pool {
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
}

static POOL: RwLock<Pool> = RwLock::new(Pool {
    threads: 0,
    pool: None,
});

/// The variables that set the default thread count, first one set (and valid) wins:
/// stablelse's own, then rayon's, then OpenMP's (Dask's nanny sets `OMP_NUM_THREADS=1` in its
/// workers, so a worker runs one stablelse thread as it runs one BLAS thread).
pub const THREAD_ENV_VARS: [&str; 3] = [
    "STABLELSE_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "OMP_NUM_THREADS",
];

/// The default thread count and, if a variable was set to something unusable, why it was
/// ignored.
struct DefaultThreads {
    threads: usize,
    /// The first variable ignored, and a message naming every one ignored.
    problem: Option<(&'static str, String)>,
}

/// The default thread count; read once (querying the cgroup CPU quota costs tens of
/// microseconds).
fn default_threads() -> usize {
    default_threads_and_problem().threads
}

fn default_threads_and_problem() -> &'static DefaultThreads {
    static DEFAULT: std::sync::OnceLock<DefaultThreads> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| read_default_threads(|var| std::env::var_os(var)))
}

/// A thread count as these variables spell it: a positive integer (OpenMP's nested list
/// `"4,2"` counts its first entry). `Ok(None)` for an empty value or `0`, which mean "the
/// default" (as for rayon); `Err` for anything else.
fn parse_threads(value: &str) -> Result<Option<usize>, ()> {
    let first = value.split(',').next().unwrap_or("").trim();
    if first.is_empty() {
        return Ok(None);
    }
    match first.parse::<usize>() {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        // More threads than a usize holds: as many as allowed.
        Err(_) if first.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(MAX_THREADS)),
        Err(_) => Err(()),
    }
}

fn read_default_threads(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> DefaultThreads {
    let mut bad: Vec<(&'static str, String)> = Vec::new();
    let mut chosen: Option<(usize, &str)> = None;
    for name in THREAD_ENV_VARS {
        let Some(raw) = var(name) else { continue };
        match raw.to_str().map(parse_threads) {
            Some(Ok(Some(n))) => {
                chosen = Some((n.min(MAX_THREADS), name));
                break;
            }
            Some(Ok(None)) => {}
            _ => bad.push((name, format!("{name}={:?}", raw.to_string_lossy()))),
        }
    }
    let (threads, source) = chosen.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus.min(MAX_THREADS), "the CPUs this process may run on")
    });
    let problem = bad.first().map(|&(first, _)| {
        let named: Vec<&str> = bad.iter().map(|(_, s)| s.as_str()).collect();
        let message = format!(
            "ignored {}: not a number of threads; using {threads} thread{} ({source})",
            named.join(", "),
            if threads == 1 { "" } else { "s" },
        );
        (first, message)
    });
    DefaultThreads { threads, problem }
}

/// Why a thread-count variable was ignored, if one was set to something that is not a number
/// of threads (`STABLELSE_NUM_THREADS=abc`): the first such variable and a message naming
/// each one; `None` when every one set was usable.
pub fn thread_env_problem() -> Option<(&'static str, String)> {
    default_threads_and_problem().problem.clone()
}

/// The number of threads stablelse uses: what [`set_num_threads`] set, else the default
/// (the first usable of [`THREAD_ENV_VARS`], else the CPUs this process may run on: its
/// affinity mask, and the cgroup CPU quota where one is set).
pub fn num_threads() -> usize {
    if LOCK_LOST_IN_FORK.load(Ordering::Acquire) {
        return 1;
    }
    let threads = POOL.read().unwrap_or_else(|e| e.into_inner()).threads;
    if threads == 0 {
        let mut guard = POOL.write().unwrap_or_else(|e| e.into_inner());
        if guard.threads == 0 {
            guard.threads = default_threads();
        }
        guard.threads
    } else {
        threads
    }
}

/// The most threads a pool may have; more only slows the pool's construction (4096 threads
/// took 46 s to start here). `set_num_threads`, the thread-count variables and
/// threadpoolctl are all clamped to it.
pub const MAX_THREADS: usize = 1024;

/// Sets the number of threads; `0` restores the default. The pool is rebuilt lazily.
pub fn set_num_threads(n: usize) {
    if LOCK_LOST_IN_FORK.load(Ordering::Acquire) {
        return;
    }
    let mut guard = POOL.write().unwrap_or_else(|e| e.into_inner());
    let n = if n == 0 {
        default_threads()
    } else {
        n.min(MAX_THREADS)
    };
    if guard.threads != n {
        guard.threads = n;
        guard.pool = None;
    }
}

/// Drops the pool without joining its threads; used in a child after `fork`, where the
/// parent's worker threads do not exist. The next parallel call builds a fresh pool.
pub fn forget_pool_after_fork() {
    // Never block here: a thread of the parent that held the lock at the moment of the fork
    // does not exist in the child, so the lock would stay held forever. If it is held, the
    // child gives up on the pool and runs every call on its own thread (same results: the
    // pieces do not depend on the thread count).
    match POOL.try_write() {
        Ok(mut guard) => {
            if let Some(pool) = guard.pool.take() {
                std::mem::forget(pool);
            }
        }
        Err(std::sync::TryLockError::Poisoned(e)) => {
            if let Some(pool) = e.into_inner().pool.take() {
                std::mem::forget(pool);
            }
        }
        Err(std::sync::TryLockError::WouldBlock) => {
            LOCK_LOST_IN_FORK.store(true, Ordering::Release);
        }
    }
}

/// Set in a forked child whose pool lock was held by a parent thread at the fork.
static LOCK_LOST_IN_FORK: AtomicBool = AtomicBool::new(false);

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    if LOCK_LOST_IN_FORK.load(Ordering::Acquire) {
        return None;
    }
    {
        let guard = POOL.read().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = &guard.pool {
            return Some(pool.clone());
        }
    }
    let mut guard = POOL.write().unwrap_or_else(|e| e.into_inner());
    if guard.threads == 0 {
        guard.threads = default_threads();
    }
    if guard.pool.is_none() {
        guard.pool = rayon::ThreadPoolBuilder::new()
            .num_threads(guard.threads)
            .thread_name(|i| format!("stablelse-{i}"))
            .build()
            .ok()
            .map(Arc::new);
    }
    guard.pool.clone()
}

/// Number of items per piece when each item costs `item_elements` elements of work.
pub fn items_per_piece(item_elements: usize) -> usize {
    (GRAIN_ELEMENTS / item_elements.max(1)).max(1)
}

/// Calls `f` on consecutive ranges covering `0..items`, each of `items_per_piece(item_elements)`
/// items (the last may be shorter), in parallel when the total work is large enough.
/// `f` must only write state owned by its range; the pieces are the same for any thread count.
pub fn for_each_piece<F>(items: usize, item_elements: usize, f: F)
where
    F: Fn(Range<usize>) + Sync + Send,
{
    if items == 0 {
        return;
    }
    let per = items_per_piece(item_elements);
    let pieces = items.div_ceil(per);
    let range = |p: usize| p * per..((p + 1) * per).min(items);
    let total = items.saturating_mul(item_elements.max(1));
    if pieces == 1 || total < PARALLEL_MIN_ELEMENTS || num_threads() == 1 {
        (0..pieces).for_each(|p| f(range(p)));
        return;
    }
    match pool() {
        Some(pool) => pool.install(|| (0..pieces).into_par_iter().for_each(|p| f(range(p)))),
        None => (0..pieces).for_each(|p| f(range(p))),
    }
}

/// Maps `f` over `0..items` (each item costing `item_elements`), returning results in index
/// order, in parallel when the work is large enough.
pub fn map_collect<R, F>(items: usize, item_elements: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Sync + Send,
{
    let total = items.saturating_mul(item_elements.max(1));
    if items <= 1 || total < PARALLEL_MIN_ELEMENTS || num_threads() == 1 {
        return (0..items).map(f).collect();
    }
    match pool() {
        Some(pool) => pool.install(|| (0..items).into_par_iter().map(f).collect()),
        None => (0..items).map(f).collect(),
    }
}

/// A raw pointer that may cross threads. Users guarantee disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer; a method (not `.0`) so closures capture the whole `Send` wrapper.
    #[inline(always)]
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}
// SAFETY: only used to hand disjoint output ranges to pieces of one parallel call.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; the pointer itself is never mutated.
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn with(vars: &[(&str, &str)]) -> DefaultThreads {
        let vars: Vec<(String, OsString)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        read_default_threads(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn cpus() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    #[test]
    fn first_usable_variable_wins() {
        let d = with(&[("STABLELSE_NUM_THREADS", "3"), ("OMP_NUM_THREADS", "1")]);
        assert_eq!((d.threads, d.problem), (3, None));
        let d = with(&[("RAYON_NUM_THREADS", "5"), ("OMP_NUM_THREADS", "1")]);
        assert_eq!(d.threads, 5);
        let d = with(&[("OMP_NUM_THREADS", "1")]);
        assert_eq!(d.threads, 1);
        let d = with(&[("OMP_NUM_THREADS", "4,2")]);
        assert_eq!(d.threads, 4);
        assert_eq!(with(&[]).threads, cpus());
    }

    #[test]
    fn empty_and_zero_mean_the_default() {
        let d = with(&[("STABLELSE_NUM_THREADS", ""), ("RAYON_NUM_THREADS", "0")]);
        assert_eq!((d.threads, d.problem), (cpus(), None));
        let d = with(&[("STABLELSE_NUM_THREADS", "0"), ("OMP_NUM_THREADS", "2")]);
        assert_eq!((d.threads, d.problem), (2, None));
    }

    #[test]
    fn a_bad_value_is_named_and_the_next_variable_used() {
        let d = with(&[("STABLELSE_NUM_THREADS", "abc"), ("OMP_NUM_THREADS", "1")]);
        assert_eq!(d.threads, 1);
        let (var, msg) = d.problem.expect("a problem");
        assert_eq!(var, "STABLELSE_NUM_THREADS");
        assert!(msg.contains("STABLELSE_NUM_THREADS=\"abc\""), "{msg}");
        assert!(msg.contains("using 1 thread (OMP_NUM_THREADS)"), "{msg}");
        let d = with(&[("RAYON_NUM_THREADS", "-2")]);
        assert_eq!(d.threads, cpus());
        assert_eq!(d.problem.expect("a problem").0, "RAYON_NUM_THREADS");
    }

    #[test]
    fn huge_values_are_clamped() {
        let d = with(&[("STABLELSE_NUM_THREADS", "99999999999999999999999")]);
        assert_eq!((d.threads, d.problem), (MAX_THREADS, None));
        assert_eq!(
            with(&[("STABLELSE_NUM_THREADS", "5000")]).threads,
            MAX_THREADS
        );
    }
}
