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

/// `STABLELSE_NUM_THREADS`, else the number of cores; read once (querying the cgroup CPU
/// quota costs tens of microseconds).
fn default_threads() -> usize {
    static DEFAULT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(read_default_threads)
}

fn read_default_threads() -> usize {
    std::env::var("STABLELSE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .min(MAX_THREADS)
}

/// The number of threads stablelse uses (`STABLELSE_NUM_THREADS`, else all cores).
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

/// Sets the number of threads; `0` restores the default. The pool is rebuilt lazily.
/// The most threads a pool may have; more only slows the pool's construction (4096 threads
/// took 46 s to start here). `set_num_threads`, `STABLELSE_NUM_THREADS` and threadpoolctl
/// are all clamped to it.
pub const MAX_THREADS: usize = 1024;

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
