//! The waiter slab: where callers wait for their replies.
//!
//! Preallocated (no allocation per ask) and lock-free. An insert takes a free
//! entry and returns its [`CorrelationId`] = (incarnation, generation,
//! index); the id travels in the envelope and comes back on the reply.
//! Resolving is an **atomic take**: a compare-and-swap moves the entry from
//! `LIVE(gen)` to `TAKEN(gen)`, so when a reply races a fault sweep (or a
//! timeout), exactly one of them gets the waiter. A late reply — for a
//! reused entry (older generation), a dead incarnation, or an index out of
//! range — is counted and refused, never a panic.
//!
//! Entry states (one `u64`: generation in the high half, state in the low):
//!
//! ```text
//! FREE(g) ──insert──► LIVE(g) ──take(g)──► TAKEN(g) ──► FREE(g+1) ──► …
//! ```
//!
//! Free entries form a Treiber stack with a 32-bit tag against ABA; entries
//! are never deallocated while the slab lives, so following a stale `next`
//! is harmless (the tagged CAS fails).

use crate::error::LayoutError;
use crate::id::CorrelationId;
use crate::sync::{AtomicU32, AtomicU64, Ordering, UnsafeCell};
use std::fmt;
use std::mem::MaybeUninit;

const FREE: u64 = 0;
const LIVE: u64 = 1;
const TAKEN: u64 = 2;
const NIL: u32 = u32::MAX;

#[inline(always)]
const fn word(generation: u32, state: u64) -> u64 {
    (generation as u64) << 32 | state
}

/// Why a correlation id resolved no waiter.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    /// The waiter was already resolved (reply, sweep or timeout), or the
    /// entry was reused: a late reply.
    #[error("late: the waiter for {0:?} was already resolved")]
    Late(CorrelationId),
    /// The id belongs to another incarnation of the actor.
    #[error("foreign: {0:?} belongs to another incarnation")]
    Foreign(CorrelationId),
    /// The index is outside the slab (a corrupt id).
    #[error("invalid: {0:?} indexes no waiter")]
    Invalid(CorrelationId),
}

/// The slab is full; the waiter is handed back.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("waiter slab is full")]
pub struct SlabFull<W>(pub W);

impl<W> fmt::Debug for SlabFull<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlabFull(..)")
    }
}

/// Counts of ids that resolved nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabStats {
    /// Late replies (already resolved, or reused entry).
    pub late: u64,
    /// Ids of another incarnation.
    pub foreign: u64,
    /// Ids indexing no entry.
    pub invalid: u64,
}

struct Entry<W> {
    state: AtomicU64,
    next_free: AtomicU32,
    value: UnsafeCell<MaybeUninit<W>>,
}

/// A fixed-capacity, lock-free map from correlation ids to waiters `W`
/// (reply ports, oneshot senders, wakers).
///
/// # Examples
///
/// ```
/// use ringkernel::waiter::{TakeError, WaiterSlab};
///
/// let slab = WaiterSlab::new(16, 1)?;
/// let id = slab.insert("caller A").unwrap();
/// assert_eq!(slab.take(id), Ok("caller A"));
/// assert_eq!(slab.take(id), Err(TakeError::Late(id))); // resolved once
/// # Ok::<(), ringkernel::LayoutError>(())
/// ```
pub struct WaiterSlab<W> {
    entries: Box<[Entry<W>]>,
    /// Top of the free stack: tag (32, high) · index (32, low; NIL = empty).
    free_head: AtomicU64,
    incarnation: u16,
    late: AtomicU64,
    foreign: AtomicU64,
    invalid: AtomicU64,
}

// SAFETY: waiters are moved in by `insert` and out by exactly one `take`
// (the LIVE→TAKEN CAS makes it exclusive); a `W` is never shared between
// threads, only sent, so `W: Send` suffices for both.
unsafe impl<W: Send> Send for WaiterSlab<W> {}
// SAFETY: as for `Send`.
unsafe impl<W: Send> Sync for WaiterSlab<W> {}

impl<W> fmt::Debug for WaiterSlab<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaiterSlab")
            .field("capacity", &self.capacity())
            .field("incarnation", &self.incarnation)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<W> WaiterSlab<W> {
    /// The largest capacity (a correlation id's index has 16 bits).
    pub const MAX_CAPACITY: usize = 1 << 16;

    /// A slab of `capacity` waiters for actor incarnation `incarnation`.
    ///
    /// # Errors
    /// [`LayoutError::SlabCapacity`] unless `1 <= capacity <= MAX_CAPACITY`.
    pub fn new(capacity: usize, incarnation: u16) -> Result<Self, LayoutError> {
        if capacity == 0 || capacity > Self::MAX_CAPACITY {
            return Err(LayoutError::SlabCapacity {
                capacity,
                max: Self::MAX_CAPACITY,
            });
        }
        let entries = (0..capacity)
            .map(|i| Entry {
                state: AtomicU64::new(word(1, FREE)),
                next_free: AtomicU32::new(if i + 1 < capacity {
                    (i + 1) as u32
                } else {
                    NIL
                }),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Ok(WaiterSlab {
            entries,
            free_head: AtomicU64::new(0),
            incarnation,
            late: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
        })
    }

    /// Number of entries.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The incarnation whose ids this slab issues.
    pub fn incarnation(&self) -> u16 {
        self.incarnation
    }

    /// Counts of ids that resolved nothing.
    pub fn stats(&self) -> SlabStats {
        SlabStats {
            late: self.late.load(Ordering::Relaxed),
            foreign: self.foreign.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }

    /// Whether an insert would find a free entry right now (a snapshot).
    pub fn has_free(&self) -> bool {
        // Pairs with the Release CAS in `push_free`.
        self.free_head.load(Ordering::Acquire) as u32 != NIL
    }

    fn pop_free(&self) -> Option<usize> {
        // Acquire pairs with the Release CAS in `push_free`: the entry's
        // `next_free`, its FREE state and the previous owner's read of the
        // value all happen before we reuse it.
        let mut head = self.free_head.load(Ordering::Acquire);
        loop {
            let index = head as u32;
            if index == NIL {
                return None;
            }
            // May be stale if another thread pops and pushes this entry
            // meanwhile; then the tag has moved and the CAS below fails.
            let next = self.entries[index as usize]
                .next_free
                .load(Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(next);
            match self.free_head.compare_exchange_weak(
                head,
                new,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(index as usize),
                Err(seen) => head = seen,
            }
        }
    }

    fn push_free(&self, index: usize) {
        let mut head = self.free_head.load(Ordering::Relaxed);
        loop {
            self.entries[index]
                .next_free
                .store(head as u32, Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | index as u64;
            // Release publishes `next_free`, the FREE state and our read of
            // the value; pairs with the Acquire in `pop_free`.
            match self.free_head.compare_exchange_weak(
                head,
                new,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => head = seen,
            }
        }
    }

    /// Parks `waiter` and returns the id its reply must carry.
    ///
    /// # Errors
    /// [`SlabFull`] with the waiter when every entry is in use.
    pub fn insert(&self, waiter: W) -> Result<CorrelationId, SlabFull<W>> {
        let Some(index) = self.pop_free() else {
            return Err(SlabFull(waiter));
        };
        let entry = &self.entries[index];
        // Relaxed: popping the entry made it ours; the pop's Acquire ordered
        // the previous owner's FREE store before this load.
        let generation = (entry.state.load(Ordering::Relaxed) >> 32) as u32;
        // SAFETY: the entry is FREE and was popped by this thread alone, so no
        // one reads or writes its value until we publish LIVE below.
        entry.value.with_mut(|p| unsafe { (*p).write(waiter) });
        // Publishes the value; pairs with the Acquire CAS in `take`.
        entry.state.store(word(generation, LIVE), Ordering::Release);
        Ok(CorrelationId::new(
            self.incarnation,
            generation,
            index as u16,
        ))
    }

    /// Resolves `id`: returns its waiter exactly once, whoever asks first.
    ///
    /// # Errors
    /// [`TakeError`] (and a count in [`WaiterSlab::stats`]) when `id` is
    /// late, foreign or invalid.
    pub fn take(&self, id: CorrelationId) -> Result<W, TakeError> {
        if id.incarnation() != self.incarnation {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return Err(TakeError::Foreign(id));
        }
        let index = id.index() as usize;
        if index >= self.entries.len() {
            self.invalid.fetch_add(1, Ordering::Relaxed);
            return Err(TakeError::Invalid(id));
        }
        self.claim(index, id.generation()).ok_or_else(|| {
            self.late.fetch_add(1, Ordering::Relaxed);
            TakeError::Late(id)
        })
    }

    /// Moves entry `index` from LIVE(`generation`) to TAKEN, reads its value
    /// out and frees the entry; `None` if the entry is not LIVE(`generation`).
    fn claim(&self, index: usize, generation: u32) -> Option<W> {
        let entry = &self.entries[index];
        // The one winner of LIVE(g) → TAKEN(g) owns the value. Acquire pairs
        // with the Release store of LIVE in `insert`.
        entry
            .state
            .compare_exchange(
                word(generation, LIVE),
                word(generation, TAKEN),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        // SAFETY: we won the CAS, so the value is initialised (published by
        // insert's Release store) and no one else will read it.
        let waiter = entry.value.with(|p| unsafe { (*p).assume_init_read() });
        // Generation 0 is never used, so a live id is never all-zero.
        let next = match generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        // Relaxed: published by push_free's Release CAS.
        entry.state.store(word(next, FREE), Ordering::Relaxed);
        self.push_free(index);
        Some(waiter)
    }

    /// Takes every live waiter and hands it to `f` — the fault sweep. Waiters
    /// that a concurrent reply takes first are not swept (each resolves
    /// once). Stop inserting before sweeping: an insert that races the sweep
    /// may be missed by it.
    pub fn sweep(&self, mut f: impl FnMut(CorrelationId, W)) -> usize {
        let mut swept = 0;
        for (index, entry) in self.entries.iter().enumerate() {
            let state = entry.state.load(Ordering::Relaxed);
            if state & 0xFFFF_FFFF != LIVE {
                continue;
            }
            let generation = (state >> 32) as u32;
            // Losing this race to a reply is expected, not a late reply.
            if let Some(w) = self.claim(index, generation) {
                f(
                    CorrelationId::new(self.incarnation, generation, index as u16),
                    w,
                );
                swept += 1;
            }
        }
        swept
    }
}

impl<W> Drop for WaiterSlab<W> {
    fn drop(&mut self) {
        for entry in self.entries.iter() {
            let live = entry.state.load(Ordering::Relaxed) & 0xFFFF_FFFF == LIVE;
            if live {
                // SAFETY: `&mut self`: no other thread can touch the slab, and
                // a LIVE entry holds an initialised value nobody took.
                entry.value.with_mut(|p| unsafe { (*p).assume_init_drop() });
            }
        }
    }
}

#[cfg(all(test, not(ringkernel_loom)))]
mod tests;

#[cfg(all(test, ringkernel_loom))]
mod loom_tests;
