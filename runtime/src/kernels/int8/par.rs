//! Work splitting for the int8 ops: a fork-join of its own, sized by tract's executor, so
//! that one thread setting (`tract_linalg::multithread::multithread_tract_scope`, or the
//! default executor) drives tract's float kernels and ours alike.
//!
//! Why not tract's rayon pool: `pool.install` from the engine's thread sleeps that thread
//! and wakes the pool's, tens of µs per op, more than the whole op on the small models
//! (every split made ddpm_digits and guided_unet slower, see BENCHMARKS.md). Here the
//! calling thread runs the first part itself and `threads − 1` persistent workers spin
//! for a while on an atomic word between ops (then park), so a split costs about a µs
//! while ops follow each other.
//!
//! Every driver splits its output into units whose values do not depend on how units are
//! assigned to threads (the micro-kernel tiles and reduction blocks stay the same); a call
//! hands out equal contiguous ranges of units, whichever thread takes each, so results are
//! bit-identical for any thread count.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use tract_linalg::multithread::{current_tract_executor, Executor};

/// What a call splits: each kind has its own threshold, in its own measure of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Multiply-adds of one (image, group).
    Conv,
    /// [`Kind::Conv`] on the AMX tiles (a multiply-add costs about a third as much).
    ConvTiles,
    /// Multiply-adds of a whole convolution call split by image (see `conv_run`).
    ConvImages,
    /// Multiply-adds.
    Gemm,
    /// [`Kind::Gemm`] on the AMX tiles.
    GemmTiles,
    /// Multiply-adds, a softmax counted as `SOFTMAX_MACS` of them.
    Attention,
    /// Elements (group norm, + SiLU).
    Norm,
}

impl Kind {
    /// Work below which a call of this kind stays on the calling thread: below it, the
    /// fork-join (about a µs while the workers spin, tens of µs when they have parked)
    /// and the halves' imbalance cost more than the second thread saves. Measured with
    /// `runtime/examples/int8_threads.rs` on the project's 2-vCPU VM (BENCHMARKS.md);
    /// the tiles' on a Sapphire Rapids VM (3×3 convs of 2.4M multiply-adds ran 0.88–0.93×
    /// as fast split, of 7.2M 1.12×; GEMMs of 0.26M 0.92×, of 0.52M 1.42×).
    pub(crate) const fn min_work(self) -> usize {
        match self {
            Kind::Conv => 1 << 21,
            Kind::ConvTiles => 1 << 22,
            Kind::ConvImages => 1 << 19,
            Kind::Gemm => 1 << 18,
            Kind::GemmTiles => 1 << 19,
            Kind::Attention => 1 << 19,
            Kind::Norm => 1 << 13,
        }
    }
}

/// `TFMQC_MIN_PARALLEL_WORK` when set: one threshold for every [`Kind`] (each in its own
/// measure), so that benchmarks can move the split point from outside. Read once.
fn min_parallel_work() -> Option<usize> {
    static MIN: OnceLock<Option<usize>> = OnceLock::new();
    *MIN.get_or_init(|| parse_min_parallel_work(std::env::var("TFMQC_MIN_PARALLEL_WORK").ok()))
}

/// The threshold a `TFMQC_MIN_PARALLEL_WORK` value asks for; none when it is unset or
/// not a number.
fn parse_min_parallel_work(value: Option<String>) -> Option<usize> {
    value.and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
thread_local! {
    /// Tests' threshold for every kind on this thread (0: split every call).
    static TEST_MIN_WORK: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` with every int8 call on this thread splitting whatever its size (tests: the
/// default thresholds keep their small shapes on one thread).
#[cfg(test)]
pub(crate) fn split_everything<R>(f: impl FnOnce() -> R) -> R {
    let before = TEST_MIN_WORK.replace(Some(0));
    let r = f();
    TEST_MIN_WORK.set(before);
    r
}

#[cfg(test)]
thread_local! {
    /// Tests: only whole images split ([`Kind::ConvImages`], every call), nothing else.
    static TEST_IMAGES_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the convolutions on this thread splitting by image only, whatever their
/// size (tests: the path a small batched convolution takes at 2 threads).
#[cfg(test)]
pub(crate) fn split_images_only<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::with_local(&TEST_IMAGES_ONLY, true, f)
}

/// Whether a call of `kind` doing `work` splits over the threads.
pub(crate) fn worth_splitting(kind: Kind, work: usize) -> bool {
    #[cfg(test)]
    if TEST_IMAGES_ONLY.get() {
        return kind == Kind::ConvImages && threads() > 1;
    }
    #[cfg(test)]
    if let Some(min) = TEST_MIN_WORK.get() {
        return work >= min && threads() > 1;
    }
    work >= min_parallel_work().unwrap_or(kind.min_work()) && threads() > 1
}

/// Runs `f(i)` for every `i` in `0..n`: when `split` (see [`worth_splitting`]), in equal
/// contiguous ranges, one per thread of tract's current executor, the calling thread
/// taking a range too; else on the calling thread. Calls from inside a range, and calls
/// while another thread's split holds the workers, run on their own thread.
pub(crate) fn for_each(n: usize, split: bool, f: impl Fn(usize) + Sync + Send) {
    let parts = if split && n > 1 && !IN_PART.get() {
        threads().min(n).min(MAX_PARTS)
    } else {
        1
    };
    if parts <= 1 || !pool().run(n, parts, &f) {
        (0..n).for_each(f);
    }
}

thread_local! {
    /// Threads of the int8 ops on this thread when set ([`with_int8_threads`]), whatever
    /// tract's executor is.
    static INT8_THREADS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` with the int8 ops on this thread splitting over `threads` threads (this
/// thread and the workers), whatever tract's executor: an int8 engine runs tract's own
/// ops on one thread inside it (see `Engine::run_plan`).
pub(crate) fn with_int8_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    crate::scoped::with_local(&INT8_THREADS, Some(threads), f)
}

/// Threads of the int8 ops: [`with_int8_threads`]'s count where set, else those of
/// tract's current executor (1 when single-threaded).
pub(crate) fn threads() -> usize {
    if let Some(n) = INT8_THREADS.get() {
        return n;
    }
    match current_tract_executor() {
        Executor::SingleThread => 1,
        Executor::MultiThread(pool) => pool.current_num_threads(),
        Executor::RayonGlobal => rayon::current_num_threads(),
    }
}

/// How long a worker spins for the next split before it parks: long enough to bridge
/// the float ops between two int8 ops of a step, short enough that an idle engine gives
/// its cores back at once. `TFMQC_INT8_SPIN_US` overrides it (benchmarks). Read once.
fn spin_time() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("TFMQC_INT8_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(SPIN_US);
        Duration::from_micros(us)
    })
}

/// Busy-wait rounds (a `pause` each, tens of ns) before a waiting thread yields its core.
const PAUSE_SPINS: u32 = 64;

/// Default of [`spin_time`], µs.
const SPIN_US: u64 = 200;

/// Bits of the claim word that count parts (and hold the part count).
const PART_BITS: u32 = 12;
/// Most parts of one split (threads beyond it take no part).
const MAX_PARTS: usize = (1 << PART_BITS) - 1;
/// Where the split's number starts in the claim word.
const EPOCH_SHIFT: u32 = 2 * PART_BITS;

thread_local! {
    /// Set on the workers, and on a caller while it runs its own parts: a split inside
    /// a part runs on its thread.
    static IN_PART: Cell<bool> = const { Cell::new(false) };
}

/// The split in flight: the caller's closure, its lifetime erased (see [`Pool::run`]).
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n: usize,
    parts: usize,
}

/// Persistent workers and the state of the one split they serve at a time.
struct Pool {
    /// `split number << EPOCH_SHIFT | parts << PART_BITS | next part to take`. A new
    /// split number publishes a job; a thread takes a part by a compare-and-swap that
    /// checks the split number, so a late worker never takes a part of a later split.
    claim: AtomicU64,
    /// Parts of the current split finished.
    done: AtomicUsize,
    /// Held by the thread whose split the workers serve.
    busy: AtomicBool,
    /// Written by the `busy` holder before it publishes the split; read by a thread that
    /// took a part, while the holder waits for `done`.
    job: UnsafeCell<Option<Job>>,
    /// The first panic of a part of the current split, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    workers: RwLock<Vec<Thread>>,
}

// SAFETY: `job` is written only by the `busy` holder while no part is taken (the
// previous split's parts are all done) and read only by threads holding a part of the
// current split; the closure it points to is `Sync` and outlives the split (the caller
// returns only when every part is done).
unsafe impl Sync for Pool {}
unsafe impl Send for Pool {}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        claim: AtomicU64::new(0),
        done: AtomicUsize::new(0),
        busy: AtomicBool::new(false),
        job: UnsafeCell::new(None),
        panic: Mutex::new(None),
        workers: RwLock::new(Vec::new()),
    })
}

impl Pool {
    /// Runs `f` over `0..n` in `parts` ranges on this thread and the workers; false (and
    /// nothing run) when another thread's split holds the workers.
    fn run(&'static self, n: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        if self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.spawn_workers(parts - 1);
        // SAFETY: only the lifetime is erased; the pointer is dropped from use before
        // this function returns (every part done, see the wait below).
        let f: *const (dyn Fn(usize) + Sync + 'static) =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), _>(f as *const _) };
        // SAFETY: we hold `busy` and every part of the previous split is done, so no
        // thread reads `job`.
        unsafe { *self.job.get() = Some(Job { f, n, parts }) };
        self.done.store(0, Ordering::Relaxed);
        let epoch = ((self.claim.load(Ordering::Relaxed) >> EPOCH_SHIFT) + 1) & EPOCH_MASK;
        // SeqCst pairs with the worker's check before it parks: either it sees the new
        // split, or its park returns at the unpark below.
        self.claim.store(
            epoch << EPOCH_SHIFT | (parts as u64) << PART_BITS,
            Ordering::SeqCst,
        );
        for worker in self
            .workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .take(parts - 1)
        {
            worker.unpark();
        }
        let was_in_part = IN_PART.replace(true);
        self.take_parts(epoch);
        IN_PART.set(was_in_part);
        // Parts taken by workers are running: wait for them, spinning first (they are
        // µs away), then yielding (to a worker that shares this core, or was
        // descheduled on a loaded machine).
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < parts {
            if spins < PAUSE_SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        // SAFETY: every part is done; nobody reads `job` until the next split.
        unsafe { *self.job.get() = None };
        let panicked = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.busy.store(false, Ordering::Release);
        if let Some(payload) = panicked {
            panic::resume_unwind(payload);
        }
        true
    }

    /// Takes and runs parts of split `epoch` until none is left.
    fn take_parts(&self, epoch: u64) {
        let mut word = self.claim.load(Ordering::Acquire);
        loop {
            let part = (word & MAX_PARTS as u64) as usize;
            let parts = ((word >> PART_BITS) & MAX_PARTS as u64) as usize;
            if word >> EPOCH_SHIFT != epoch || part >= parts {
                return;
            }
            match self.claim.compare_exchange_weak(
                word,
                word + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    // SAFETY: a taken part keeps the job published and its closure
                    // alive: the caller waits for this part's `done`.
                    let job = unsafe { (*self.job.get()).expect("a split publishes its job") };
                    let f = unsafe { &*job.f };
                    let range = part * job.n / job.parts..(part + 1) * job.n / job.parts;
                    if let Err(payload) =
                        panic::catch_unwind(AssertUnwindSafe(|| range.for_each(f)))
                    {
                        self.panic
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(payload);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    word = self.claim.load(Ordering::Acquire);
                }
                Err(now) => word = now,
            }
        }
    }

    /// Starts workers until there are `count` (fewer if the OS refuses threads: the
    /// caller then takes their parts).
    fn spawn_workers(&'static self, count: usize) {
        if self.workers.read().unwrap_or_else(|e| e.into_inner()).len() >= count {
            return;
        }
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        while workers.len() < count {
            let spawned = thread::Builder::new()
                .name(format!("tfmqc-int8-{}", workers.len() + 1))
                .spawn(move || self.work());
            match spawned {
                Ok(handle) => workers.push(handle.thread().clone()),
                Err(_) => return,
            }
        }
    }

    /// A worker's life: wait for a split, take its parts, again.
    fn work(&self) -> ! {
        IN_PART.set(true);
        let mut seen = self.claim.load(Ordering::Acquire) >> EPOCH_SHIFT;
        loop {
            seen = self.wait(seen);
            self.take_parts(seen);
        }
    }

    /// Waits for a split other than `seen`: spins for [`spin_time`], then parks.
    fn wait(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let spin = spin_time();
        let mut spins = 0u32;
        loop {
            let epoch = self.claim.load(Ordering::SeqCst) >> EPOCH_SHIFT;
            if epoch != seen {
                return epoch;
            }
            spins = spins.saturating_add(1);
            if spins < PAUSE_SPINS {
                std::hint::spin_loop();
            } else if start.elapsed() < spin {
                // Yielding, not pausing: a thread that wants this core (tract's pool
                // running a float op, the caller itself when the scheduler put both on
                // one core, another process) gets it at once, and this one looks again
                // within a µs when the core is free.
                thread::yield_now();
            } else {
                // Returns at once if an unpark came since (a token), else sleeps until
                // the next split's unpark; either way the loop looks again.
                thread::park();
            }
        }
    }
}

/// Split numbers wrap within the claim word's high bits.
const EPOCH_MASK: u64 = (1 << (64 - EPOCH_SHIFT)) - 1;

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
    use tract_linalg::multithread::multithread_tract_scope;

    #[test]
    fn the_split_threshold_is_the_kinds_unless_a_number_overrides_it() {
        assert_eq!(parse_min_parallel_work(None), None);
        assert_eq!(parse_min_parallel_work(Some("65536".into())), Some(65536));
        assert_eq!(parse_min_parallel_work(Some(" 1024 ".into())), Some(1024));
        assert_eq!(parse_min_parallel_work(Some("many".into())), None);
        multithread_tract_scope(Executor::multithread(2), || {
            for kind in [
                Kind::Conv,
                Kind::ConvTiles,
                Kind::Gemm,
                Kind::GemmTiles,
                Kind::Attention,
                Kind::Norm,
            ] {
                assert!(!worth_splitting(kind, kind.min_work() - 1));
                assert!(worth_splitting(kind, kind.min_work()));
            }
        });
        // One thread never splits.
        assert!(!worth_splitting(Kind::Gemm, usize::MAX));
    }

    /// Every index runs once, in the ranges of the split, for any thread count; and the
    /// pool serves split after split (the workers spin, park and wake).
    #[test]
    fn every_index_runs_once_whatever_the_threads() {
        for threads in [1, 2, 3, 5] {
            multithread_tract_scope(Executor::multithread(threads), || {
                for n in [0, 1, 2, 3, 7, 64, 1000] {
                    for round in 0..3 {
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        for_each(n, true, |i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "{threads} threads, n {n}, round {round}"
                        );
                        if round == 1 {
                            // Long enough for the workers to park.
                            thread::sleep(spin_time() * 3);
                        }
                    }
                }
            });
        }
    }

    /// A split inside a part runs on that part's thread, and splits from several threads
    /// at once (one holds the workers, the others run alone) all complete.
    #[test]
    fn nested_and_concurrent_splits_complete() {
        let total = |n: usize| {
            let sum = AtomicUsize::new(0);
            for_each(n, true, |i| {
                for_each(10, true, |j| {
                    sum.fetch_add(i * 10 + j, Ordering::Relaxed);
                });
            });
            sum.into_inner()
        };
        let want = |n: usize| (0..n * 10).sum::<usize>();
        thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    multithread_tract_scope(Executor::multithread(2 + t % 2), || {
                        for n in [1, 5, 100, 333] {
                            for _ in 0..20 {
                                assert_eq!(total(n), want(n));
                            }
                        }
                    })
                });
            }
        });
    }

    /// A panic in a part (a worker's or the caller's) reaches the caller with its message,
    /// after every other part has finished, and the pool goes on serving.
    #[test]
    fn a_panicking_part_panics_the_caller_and_the_pool_survives() {
        multithread_tract_scope(Executor::multithread(2), || {
            for bad in [0, 99] {
                let result = panic::catch_unwind(|| {
                    for_each(100, true, |i| {
                        assert!(i != bad, "unit {i} fails");
                    })
                });
                let payload = result.expect_err("the part's panic reaches the caller");
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(message, format!("unit {bad} fails"));
            }
            let count = AtomicUsize::new(0);
            for_each(100, true, |_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(count.into_inner(), 100);
        });
    }
}
