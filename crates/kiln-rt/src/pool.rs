//! Threads and the deterministic split of work.

use std::ops::Range;

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

/// A fixed number of worker threads.
pub struct Pool {
    threads: usize,
    pool: rayon::ThreadPool,
}

impl Pool {
    /// A pool of `threads` workers (at least one).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kiln-worker-{i}"))
            .build()
            .expect("the OS can start worker threads");
        Pool { threads, pool }
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
        let mut ranges = split(n, self.threads, align).into_iter();
        let first = ranges.next();
        self.pool.scope(|s| {
            let f = &f;
            for r in ranges {
                s.spawn(move |_| f(r));
            }
            // The first range runs here while the workers take the rest.
            if let Some(r) = first {
                f(r);
            }
        });
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
}
