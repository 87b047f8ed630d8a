//! Thread count of a computation: tract's float kernels split their work over tract's
//! executor (a rayon pool), and the int8 kernels over the calling thread and `threads − 1`
//! workers of their own (`kernels::int8::par`) sized by the same executor, so one setting
//! drives the two.

use std::collections::HashMap;
use std::sync::Mutex;

use tract_linalg::multithread::{multithread_tract_scope, Executor};

/// One pool per thread count, built on first use (building a pool spawns threads).
static POOLS: Mutex<Option<HashMap<usize, Executor>>> = Mutex::new(None);

/// Runs `f` (any model calls: [`crate::Engine::run`], [`crate::Denoiser::denoise`], a
/// whole sampling loop) with tract's kernels and the int8 kernels on `threads` threads of
/// a pool shared by every call with the same count; `threads <= 1` runs on the calling
/// thread only. Results are bit-identical for any thread count. The int8 kernels' workers
/// wait about 200 µs for the next op after each (yielding their core), then sleep.
///
/// ```no_run
/// # fn main() -> tfmqc_runtime::Result<()> {
/// let engine = tfmqc_runtime::Engine::load_int8("model.q.onnx".as_ref(), tfmqc_runtime::Optimize::Full)?.0;
/// # let inputs = vec![];
/// let out = tfmqc_runtime::with_threads(2, || engine.run(inputs))?;
/// # Ok(()) }
/// ```
pub fn with_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    let executor = if threads <= 1 {
        Executor::SingleThread
    } else {
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .get_or_insert_with(HashMap::new)
            .entry(threads)
            .or_insert_with(|| Executor::multithread_with_name(threads, "tfmqc"))
            .clone()
    };
    multithread_tract_scope(executor, f)
}
