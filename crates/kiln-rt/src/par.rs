//! Data parallelism of the reference kernels: on a [`Pool`] when the caller runs them inside
//! [`with_pool`], else on rayon.
//!
//! The JIT engine runs its compiled linears on its own pool, whose workers spin between
//! jobs (decode calls hundreds of short kernels per token). Reference kernels that used
//! rayon (or matrixmultiply's threads) in between then fought those spinning workers for
//! the two cores: MiniLM's attention ran on about one core. Inside [`with_pool`] every
//! kernel shares the engine's threads instead. The split never changes results: each
//! chunk's values depend on that chunk alone.

use crate::pool::Pool;
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    /// The pool of the innermost [`with_pool`] on this thread (null outside).
    static CURRENT: Cell<*const Pool> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` with the reference kernels it calls (on this thread) parallel on `pool`.
pub fn with_pool<R>(pool: &Pool, f: impl FnOnce() -> R) -> R {
    struct Restore(*const Pool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(pool)));
    f()
}

/// The threads that parallel kernels run on here: the pool's, or rayon's.
pub fn threads() -> usize {
    let pool = CURRENT.with(|c| c.get());
    // SAFETY: as in `for_each_chunk_init`.
    if pool.is_null() { rayon::current_num_threads() } else { unsafe { &*pool }.threads() }
}

/// A pointer shared by threads that each touch a disjoint part of what it points at (or
/// only read it). Whoever dereferences it upholds that; the type only lets it cross
/// threads.
pub struct SharedPtr<T>(pub *mut T);

impl<T> Clone for SharedPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedPtr<T> {}

// SAFETY: dereferences are the users' responsibility (disjoint writes, shared reads).
unsafe impl<T: Send> Send for SharedPtr<T> {}
unsafe impl<T: Send> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// Of a pointer to read only.
    pub fn of(p: *const T) -> SharedPtr<T> {
        SharedPtr(p.cast_mut())
    }

    pub fn get(self) -> *mut T {
        self.0
    }
}

/// `f(i, chunk)` for the chunks of `chunk` elements of `data` (the last may be shorter),
/// in parallel.
pub fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_chunk_init(data, chunk, || (), |_, i, c| f(i, c));
}

/// [`for_each_chunk`] with scratch state made by `init` once per thread's share of chunks
/// (rayon: per split), passed to every call.
pub fn for_each_chunk_init<T: Send, S>(
    data: &mut [T],
    chunk: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let pool = CURRENT.with(|c| c.get());
    if pool.is_null() {
        data.par_chunks_mut(chunk).enumerate().for_each_init(&init, |s, (i, c)| f(s, i, c));
        return;
    }
    // SAFETY: set by `with_pool` from a reference that outlives its call, which is running.
    let pool = unsafe { &*pool };
    let (len, base) = (data.len(), SharedPtr(data.as_mut_ptr()));
    pool.for_ranges(len.div_ceil(chunk), 1, 2, |range| {
        let mut state = init();
        for i in range {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: the ranges of `for_ranges` are disjoint, so chunk `i` is formed by this
            // thread only, and it lies inside `data`, which is borrowed for the whole call.
            let c = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            f(&mut state, i, c);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk is visited once with its index, on rayon and on a pool, nested or not.
    #[test]
    fn chunks_are_visited_once_with_their_index() {
        let pool = Pool::new(2);
        for on_pool in [false, true] {
            let mut data = vec![0usize; 1000];
            let run = |data: &mut Vec<usize>| {
                for_each_chunk_init(data, 7, || 1usize, |one, i, c| c.iter_mut().for_each(|v| *v += i + *one));
            };
            if on_pool {
                with_pool(&pool, || run(&mut data))
            } else {
                run(&mut data)
            }
            let want: Vec<usize> = (0..1000).map(|j| j / 7 + 1).collect();
            assert_eq!(data, want, "on pool: {on_pool}");
        }
        with_pool(&pool, || with_pool(&pool, || ()));
        assert!(CURRENT.with(|c| c.get()).is_null(), "with_pool restores the previous pool");
    }
}
