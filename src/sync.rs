//! The atomics shim: `std` normally, `loom` under `--cfg ringkernel_loom`.
//!
//! Every module whose concurrency loom checks (ring, doorbell, control block,
//! waiter slab) takes its atomics and its `UnsafeCell` from here, so the very
//! same code is model-checked. The cfg is crate-specific so that dependencies
//! are not rebuilt under loom.

#[cfg(ringkernel_loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(ringkernel_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(ringkernel_loom))]
pub(crate) use std::sync::Mutex;
#[cfg(not(ringkernel_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};

#[cfg(ringkernel_loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `std::cell::UnsafeCell` with loom's closure-based access API, so code that
/// touches a cell reads the same under loom (which tracks each access) and
/// without it (where the closures compile away).
#[cfg(not(ringkernel_loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T: ?Sized>(std::cell::UnsafeCell<T>);

#[cfg(not(ringkernel_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }
}

#[cfg(not(ringkernel_loom))]
impl<T: ?Sized> UnsafeCell<T> {
    /// Runs `f` with a shared raw pointer to the contents.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Runs `f` with a mutable raw pointer to the contents.
    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
