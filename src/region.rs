//! Memory that rings and control blocks live in.
//!
//! A ring never allocates its own memory: it is laid over a region the caller
//! provides, so one implementation serves ordinary heap memory (the cpu
//! backend), pinned host memory mapped into a device (cuda) and device memory
//! (K2K). [`SharedMemory`] is the contract such a region keeps;
//! [`HeapRegion`] is the ordinary-memory implementation.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every region and of every ring or control block in one: a
/// ring's counters each own a 128-byte line.
pub const REGION_ALIGN: usize = 128;

/// Memory both sides of a ring can see.
///
/// # Safety
///
/// Implementors guarantee that `base()..base() + len()`:
/// 1. is valid for reads and writes, including atomic ones, for as long as
///    the value lives, and does not move;
/// 2. starts at an address aligned to [`REGION_ALIGN`];
/// 3. is not accessed by anything but the rings and control blocks laid over
///    it (and their device-side peers).
pub unsafe trait SharedMemory: Send + Sync + 'static {
    /// The first byte.
    fn base(&self) -> NonNull<u8>;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Zeroed, 128-byte-aligned heap memory: the region of the cpu backend.
#[derive(Debug)]
pub struct HeapRegion {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl HeapRegion {
    /// Allocates `len` zeroed bytes (at least one line), aligned to
    /// [`REGION_ALIGN`]. Aborts through [`alloc::handle_alloc_error`] when the
    /// allocator fails, as `Vec` does.
    ///
    /// # Panics
    /// If `len` rounded up to a line overflows `isize`, as `Vec` does.
    pub fn zeroed(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(REGION_ALIGN);
        let layout =
            Layout::from_size_align(size, REGION_ALIGN).expect("region size overflows isize");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        HeapRegion { ptr, layout }
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `zeroed` with exactly `layout`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the allocation is owned by this value alone; concurrent access to
// its bytes is governed by the protocols laid over it, which use atomics for
// every word two sides touch.
unsafe impl Send for HeapRegion {}
// SAFETY: as for `Send`; `&HeapRegion` only hands out the base pointer.
unsafe impl Sync for HeapRegion {}

// SAFETY: the allocation lives until drop, never moves, is aligned to
// REGION_ALIGN by its layout, and is reachable only through this value.
unsafe impl SharedMemory for HeapRegion {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

/// Checks that `len` bytes at `offset` fit in `mem` and are aligned to `align`.
pub(crate) fn check_span(
    mem: &dyn SharedMemory,
    offset: usize,
    len: usize,
    align: usize,
) -> Result<NonNull<u8>, crate::LayoutError> {
    let available = mem.len().saturating_sub(offset);
    if offset > mem.len() || available < len {
        return Err(crate::LayoutError::RegionTooSmall {
            len: available,
            needed: len,
        });
    }
    let addr = (mem.base().as_ptr() as usize).wrapping_add(offset);
    if addr % align != 0 {
        return Err(crate::LayoutError::Misaligned { addr, align });
    }
    // SAFETY: `offset <= mem.len()`, so the result stays inside (or one past)
    // the region's allocation, as `add` requires.
    Ok(unsafe { mem.base().add(offset) })
}

/// A value laid at an offset of a region, keeping the region alive;
/// dereferences to it. For shared words (atomics only) that a device reads
/// in place, as a K2K link's control block or a slot's link table. The
/// value is never dropped (it must need no drop).
pub struct Placed<T: Sync> {
    ptr: NonNull<T>,
    _owner: std::sync::Arc<dyn SharedMemory>,
}

// SAFETY: the pointer is valid while `_owner` lives (held here); `T` is Sync
// (the value is shared words) and the owner is Send + Sync.
unsafe impl<T: Sync> Send for Placed<T> {}
// SAFETY: as for Send; `&Placed<T>` only gives `&T`.
unsafe impl<T: Sync> Sync for Placed<T> {}

impl<T: Sync> Placed<T> {
    /// Writes `value` at `offset` in `mem`.
    ///
    /// # Errors
    /// The span does not fit, or is not aligned for `T`.
    ///
    /// # Safety
    /// `mem[offset..offset + size_of::<T>()]` is used by nothing but this
    /// value (and its device-side peer) for as long as `mem` lives.
    pub unsafe fn init_in(
        mem: std::sync::Arc<dyn SharedMemory>,
        offset: usize,
        value: T,
    ) -> Result<Self, crate::LayoutError> {
        const {
            assert!(
                !std::mem::needs_drop::<T>(),
                "a placed value is never dropped"
            )
        };
        let ptr = check_span(&*mem, offset, size_of::<T>(), align_of::<T>())?.cast::<T>();
        // SAFETY: in bounds and aligned (checked); unused by anyone else
        // (the caller's contract).
        unsafe { ptr.as_ptr().write(value) };
        Ok(Placed { ptr, _owner: mem })
    }
}

impl<T: Sync> std::ops::Deref for Placed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: initialised in `init_in`, alive while `_owner` is, and only
        // ever shared (T: Sync).
        unsafe { self.ptr.as_ref() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_region_is_aligned_zeroed_and_rounded_up() {
        let r = HeapRegion::zeroed(200);
        assert_eq!(r.len(), 256);
        assert_eq!(r.base().as_ptr() as usize % REGION_ALIGN, 0);
        // SAFETY: the region is 256 bytes long and owned by this test.
        let bytes = unsafe { std::slice::from_raw_parts(r.base().as_ptr(), r.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn spans_are_bounds_and_alignment_checked() {
        let r = HeapRegion::zeroed(1024);
        assert!(check_span(&r, 128, 896, 128).is_ok());
        assert_eq!(
            check_span(&r, 128, 897, 128).unwrap_err(),
            crate::LayoutError::RegionTooSmall {
                len: 896,
                needed: 897
            }
        );
        assert_eq!(
            check_span(&r, 2048, 1, 128).unwrap_err(),
            crate::LayoutError::RegionTooSmall { len: 0, needed: 1 }
        );
        assert!(matches!(
            check_span(&r, 64, 64, 128).unwrap_err(),
            crate::LayoutError::Misaligned { align: 128, .. }
        ));
    }
}
