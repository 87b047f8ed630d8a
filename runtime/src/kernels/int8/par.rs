//! Work splitting over tract's executor, so that one thread setting
//! (`tract_linalg::multithread::multithread_tract_scope`, or the default executor) drives
//! tract's float kernels and ours alike.
//!
//! Every driver splits its output into units whose values do not depend on how units are
//! assigned to threads (the micro-kernel tiles and reduction blocks stay the same), so
//! results are bit-identical for any thread count.

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};

/// Work (multiply-adds) below which a call stays on the calling thread: waking the
/// pool's threads costs more than a split saves on small layers, and threads left spinning
/// after a short split slow the calling thread down on SMT-sibling vCPUs (measured on
/// the project's 2-vCPU VMs: guided_unet's 16×16 layers ran 2.5× slower on 2 threads
/// than on 1 when every layer split).
pub(crate) const MIN_PARALLEL_WORK: usize = 1 << 24;

/// [`MIN_PARALLEL_WORK`], or `TFMQC_MIN_PARALLEL_WORK` (multiply-adds) when set: the
/// threshold is measured per machine, and benchmarks set it from outside. Read once.
fn min_parallel_work() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| parse_min_parallel_work(std::env::var("TFMQC_MIN_PARALLEL_WORK").ok()))
}

/// The threshold a `TFMQC_MIN_PARALLEL_WORK` value asks for; the default when it is
/// unset or not a number.
fn parse_min_parallel_work(value: Option<String>) -> usize {
    value
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(MIN_PARALLEL_WORK)
}

/// Whether a call of `work` multiply-adds splits over the pool.
pub(crate) fn worth_splitting(work: usize) -> bool {
    work >= min_parallel_work() && threads() > 1
}

/// Runs `f(i)` for every `i` in `0..n`, on the threads of tract's current executor when
/// `split` (see [`worth_splitting`]), else on the calling thread.
pub(crate) fn for_each(n: usize, split: bool, f: impl Fn(usize) + Sync + Send) {
    if n <= 1 || !split {
        (0..n).for_each(f);
        return;
    }
    match current_tract_executor() {
        Executor::SingleThread => (0..n).for_each(f),
        Executor::MultiThread(pool) => pool.install(|| (0..n).into_par_iter().for_each(f)),
        Executor::RayonGlobal => (0..n).into_par_iter().for_each(f),
    }
}

/// Threads of tract's current executor (1 when single-threaded).
pub(crate) fn threads() -> usize {
    match current_tract_executor() {
        Executor::SingleThread => 1,
        Executor::MultiThread(pool) => pool.current_num_threads(),
        Executor::RayonGlobal => rayon::current_num_threads(),
    }
}

/// A mutable slice that several threads write through, each to its own disjoint range.
pub(crate) struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a `Shared` only hands out ranges through the unsafe `range`, whose callers
// guarantee that concurrent ranges never overlap; T is plain data.
unsafe impl<T: Send> Sync for Shared<'_, T> {}
unsafe impl<T: Send> Send for Shared<'_, T> {}

impl<'a, T> Shared<'a, T> {
    pub fn new(s: &'a mut [T]) -> Self {
        Shared {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// `start..start + n` as a mutable slice (bounds-checked).
    ///
    /// # Safety
    /// No other live slice from this `Shared` may overlap the range.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, n: usize) -> &mut [T] {
        assert!(
            start <= self.len && n <= self.len - start,
            "int8: output range out of bounds"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(start), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_threshold_is_the_default_unless_a_number_overrides_it() {
        assert_eq!(parse_min_parallel_work(None), MIN_PARALLEL_WORK);
        assert_eq!(parse_min_parallel_work(Some("65536".into())), 65536);
        assert_eq!(parse_min_parallel_work(Some(" 1024 ".into())), 1024);
        assert_eq!(
            parse_min_parallel_work(Some("many".into())),
            MIN_PARALLEL_WORK
        );
    }
}
