//! How many threads the weight numerics (range search, Hessians, GPTQ) may use.
//!
//! The model calls take their threads from tract's executor, which the caller sets
//! (`tfmqc_runtime::with_threads`); the numerics spawn their own scoped threads. Both
//! follow `--threads`: this cap is the numerics' side of it, process-wide like a thread
//! pool (results never depend on it).

use std::sync::atomic::{AtomicUsize, Ordering};

/// 0: every core.
static CAP: AtomicUsize = AtomicUsize::new(0);

/// Caps the numerics at `threads` threads (0: every core).
pub fn set_cap(threads: usize) {
    CAP.store(threads, Ordering::Relaxed);
}

/// The threads the numerics may use: the machine's cores, capped by [`set_cap`].
pub fn available() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    match CAP.load(Ordering::Relaxed) {
        0 => cores,
        cap => cap.min(cores),
    }
}
