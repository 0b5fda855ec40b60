//! Heap allocations, counted: an allocator that passes every call to another
//! and counts allocations beside it. The binary installs it around mimalloc, so
//! `bench` can report allocations per training step (each costs time, and the
//! count shows buffers made afresh each step instead of kept).

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

/// `A`, counting each allocation and reallocation.
pub struct Counting<A>(pub A);

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call goes to `A` unchanged; the counter has no effect on memory.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// Allocations so far through any [`Counting`] allocator, on every thread (0
/// where none is installed).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
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
