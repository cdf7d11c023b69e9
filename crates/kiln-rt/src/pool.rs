//! Threads and the deterministic split of work.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Splits `0..n` into `parts` contiguous ranges whose lengths differ by at most one and
/// are multiples of `align` except the last (so a kernel's tiles are not cut). Empty
/// ranges are dropped. The split depends only on its arguments, never on timing.
pub fn split(n: usize, parts: usize, align: usize) -> Vec<Range<usize>> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let parts = parts.clamp(1, units.max(1));
    let (base, extra) = (units / parts, units % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = (base + usize::from(p < extra)) * align;
        let end = (start + len).min(n);
        if end > start {
            out.push(start..end);
        }
        start = end;
    }
    out
}

/// A fixed number of worker threads that spin briefly between jobs.
///
/// Decoding one token calls a few hundred kernels of tens of microseconds each; waking a
/// sleeping thread for each costs about as much as the kernel. Workers therefore spin on a
/// job counter for a while ([`SPIN_ROUNDS`]) after each job before they sleep on a condition
/// variable, and the caller runs the first part itself.
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// One job at a time: `for_ranges` from several threads takes turns.
    dispatch: Mutex<()>,
}

/// Spin-loop rounds a worker polls for the next job before sleeping (~100-200 us).
pub const SPIN_ROUNDS: u32 = 1 << 13;

/// The current job: a type-erased `&dyn Fn(part)` valid until every worker has finished
/// it (the caller waits for that before returning, so the borrow outlives every use).
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Incremented for each job; a worker runs a job when it sees a new value.
    generation: AtomicU64,
    job: std::cell::UnsafeCell<Option<Job>>,
    /// Workers still running the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the dispatching thread while no worker reads it (before
// the generation is published, after every worker finished the previous job) and read by
// workers only between seeing a new generation and decrementing `pending`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

impl Pool {
    /// A pool of `threads` workers (at least one; the calling thread counts as one).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: std::cell::UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|part| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-worker-{part}"))
                    .spawn(move || worker(&shared, part))
                    .expect("the OS can start worker threads")
            })
            .collect();
        Pool { threads, shared, workers, dispatch: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on the ranges of [`split`]`(n, threads, align)`, in parallel, and waits.
    /// Below `min_parallel` units of work everything runs on the calling thread.
    pub fn for_ranges(&self, n: usize, align: usize, min_parallel: usize, f: impl Fn(Range<usize>) + Sync) {
        if self.threads == 1 || n < min_parallel {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let ranges = split(n, self.threads, align);
        let part = |i: usize| {
            if let Some(r) = ranges.get(i) {
                f(r.clone());
            }
        };
        self.run(&part);
    }

    /// Runs `part(i)` for every `i` in `0..threads`, part 0 on the calling thread.
    fn run(&self, part: &(dyn Fn(usize) + Sync)) {
        let _turn = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erasing the lifetime of `part`: this function does not return before every
        // worker has finished with it (`pending` reaches 0 below), even if `part(0)` panics.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(part) };
        // SAFETY: no worker reads `job` now: the previous job has no pending worker.
        unsafe { *s.job.get() = Some(job) };
        s.pending.store(self.threads - 1, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| part(0)));
        while s.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if let Err(e) = mine {
            std::panic::resume_unwind(e);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kiln worker thread panicked");
        }
    }
}

fn worker(s: &Shared, part: usize) {
    let mut seen = 0u64;
    loop {
        let mut rounds = 0u32;
        loop {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            if rounds < SPIN_ROUNDS {
                rounds += 1;
                std::hint::spin_loop();
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            let guard = s
                .wake
                .wait_while(guard, |_| {
                    s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            rounds = 0;
        }
        // SAFETY: the dispatcher wrote the job before publishing this generation and keeps
        // it alive until `pending` reaches 0.
        let job = unsafe { (*s.job.get()).expect("a job is set before its generation") };
        // SAFETY: see `Pool::run`: the closure outlives the job.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*job)(part) }));
        if result.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once_and_respects_alignment() {
        for n in 0..70 {
            for parts in 1..5 {
                for align in [1, 4, 8] {
                    let r = split(n, parts, align);
                    let mut next = 0;
                    for (i, range) in r.iter().enumerate() {
                        assert_eq!(range.start, next);
                        if i + 1 < r.len() {
                            assert_eq!(range.len() % align, 0, "n={n} parts={parts} align={align}: {r:?}");
                        }
                        next = range.end;
                    }
                    assert_eq!(next, n);
                    assert!(r.len() <= parts);
                }
            }
        }
        assert_eq!(split(10, 2, 4), vec![0..8, 8..10]);
        assert_eq!(split(10, 2, 1), vec![0..5, 5..10]);
    }

    #[test]
    fn for_ranges_visits_every_index_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
            pool.for_ranges(100, 4, 0, |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    /// Many short jobs in a row (workers spinning), then jobs after the workers fell
    /// asleep, from several threads taking turns: every index exactly once each time.
    #[test]
    fn jobs_back_to_back_after_sleep_and_from_several_threads() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pool = Pool::new(3);
        let count = |pool: &Pool| {
            let hits = AtomicUsize::new(0);
            pool.for_ranges(10, 1, 0, |r| {
                hits.fetch_add(r.len(), Ordering::Relaxed);
            });
            hits.load(Ordering::Relaxed)
        };
        for _ in 0..2000 {
            assert_eq!(count(&pool), 10);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(count(&pool), 10);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..300 {
                        assert_eq!(count(&pool), 10);
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_part_reaches_the_caller() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.for_ranges(2, 1, 0, |r| assert!(r.start == 0, "part {r:?} fails"));
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let hits = std::sync::atomic::AtomicUsize::new(0);
        pool.for_ranges(2, 1, 0, |r| {
            hits.fetch_add(r.len(), std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(hits.into_inner(), 2);
    }
}
