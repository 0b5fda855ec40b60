//! Heap allocations, counted: an allocator that passes every call to another
//! and counts allocations beside it. The binary installs it around mimalloc, so
//! `bench` can report allocations per training step (each costs time, and the
//! count shows buffers made afresh each step instead of kept).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// `A`, counting each allocation and reallocation.
pub struct Counting<A>(pub A);

/// One counter per thread (threads beyond [`SHARDS`] share), each on its own
/// cache line: a single counter that every thread adds to moved its cache line
/// between cores at each allocation, ~5% of a two-thread training step.
const SHARDS: usize = 64;

#[repr(align(128))]
struct Shard(AtomicU64);

static COUNTERS: [Shard; SHARDS] = [const { Shard(AtomicU64::new(0)) }; SHARDS];
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised, no destructor: reading it never allocates.
    static THIS_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn count_one() {
    let shard = THIS_SHARD
        .try_with(|shard| {
            if shard.get() == usize::MAX {
                shard.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            shard.get()
        })
        .unwrap_or(0);
    // A load and a store, not an atomic add: a shard is one thread's (beyond
    // SHARDS threads an allocation may go uncounted, never memory unsafe).
    let counter = &COUNTERS[shard].0;
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

// SAFETY: every call goes to `A` unchanged; the counter has no effect on memory.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// Allocations so far through any [`Counting`] allocator, on every thread (0
/// where none is installed).
pub fn allocations() -> u64 {
    COUNTERS
        .iter()
        .map(|shard| shard.0.load(Ordering::Relaxed))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_allocation() {
        let counting = Counting(std::alloc::System);
        let layout = Layout::from_size_align(64, 8).unwrap();
        let before = allocations();
        // SAFETY: a valid layout; each pointer is freed with the layout it came with.
        unsafe {
            let a = counting.alloc(layout);
            let b = counting.alloc_zeroed(layout);
            let b = counting.realloc(b, layout, 128);
            counting.dealloc(a, layout);
            counting.dealloc(b, Layout::from_size_align(128, 8).unwrap());
        }
        assert!(allocations() - before >= 3);
    }
}
