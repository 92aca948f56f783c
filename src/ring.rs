//! The SPSC ring: fixed-size slots over caller-provided memory.
//!
//! One ring per direction (H2K, K2H, each K2K edge). The region holds a
//! [`RingHeader`] followed by `capacity` slots of `slot_size` bytes:
//!
//! | offset | size | who writes | what |
//! |---:|---:|---|---|
//! | 0 | 8 | producer | `tail`: slots ever published (monotonic `u64`) |
//! | 128 | 8 | consumer | `head`: slots ever released (monotonic `u64`) |
//! | 256 | 16 | initialiser, once | magic, version, capacity, slot size |
//! | 384 | `capacity * slot_size` | producer, then consumer | the slots |
//!
//! Slot `i` of counter value `c` is `c & (capacity - 1)`. The producer writes
//! slots in `[tail, head + capacity)` and then publishes them with one
//! store-release of `tail`; the consumer reads slots in `[head, tail)` after a
//! load-acquire of `tail` and hands them back with one store-release of
//! `head`. Each side writes only its own counter, each counter owns a 128-byte
//! line, and each side caches the other's counter so that it touches the
//! other side's line only when the cached value says full (or empty).
//!
//! The type system keeps the ring single-producer single-consumer: there is
//! one [`Producer`] and one [`Consumer`], neither is `Clone`, and every
//! operation takes `&mut self`. Attaching a half to memory initialised
//! elsewhere (a device peer) is `unsafe` for exactly that reason.
//!
//! Under `--cfg ringkernel_loom` the same code runs over loom atomics and
//! loom-tracked slot cells (see the `loom` tests).

use crate::LayoutError;
use crate::envelope::{
    Envelope, EnvelopeHeader, HEADER_SIZE, HeaderCheck, encode_bytes, encode_pod,
};
use crate::error::DecodeError;
use crate::sync::{AtomicU64, Ordering};
use bytemuck::Pod;
use std::fmt;

/// `"RING"` read as a little-endian `u32`.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"RING");
/// The ring layout version this build writes and accepts.
pub const RING_VERSION: u32 = 1;
/// Size of [`RingHeader`]: three 128-byte lines.
pub const RING_HEADER_SIZE: usize = 384;
/// The default slot: a 64-byte envelope header and 64 bytes of inline payload.
pub const DEFAULT_SLOT_SIZE: u32 = 128;

/// The ring's shared header: the two counters on their own lines, then the
/// geometry. Mirrored as `rk_ring_header` in the C header.
#[repr(C, align(128))]
pub struct RingHeader {
    /// Producer-owned: slots ever published.
    pub(crate) tail: AtomicU64,
    _pad0: [u8; 120],
    /// Consumer-owned: slots ever released.
    pub(crate) head: AtomicU64,
    _pad1: [u8; 120],
    pub(crate) magic: u32,
    pub(crate) version: u32,
    pub(crate) capacity: u32,
    pub(crate) slot_size: u32,
    _pad2: [u8; 112],
}

impl RingHeader {
    fn new(layout: RingLayout) -> Self {
        RingHeader {
            tail: AtomicU64::new(0),
            _pad0: [0; 120],
            head: AtomicU64::new(0),
            _pad1: [0; 120],
            magic: RING_MAGIC,
            version: RING_VERSION,
            capacity: layout.capacity,
            slot_size: layout.slot_size,
            _pad2: [0; 112],
        }
    }

    #[cfg_attr(ringkernel_loom, allow(dead_code))]
    fn layout(&self) -> Result<RingLayout, LayoutError> {
        if self.magic != RING_MAGIC {
            return Err(LayoutError::BadRingMagic {
                found: self.magic,
                expected: RING_MAGIC,
            });
        }
        if self.version != RING_VERSION {
            return Err(LayoutError::BadRingVersion {
                found: self.version,
                expected: RING_VERSION,
            });
        }
        RingLayout::new(self.capacity, self.slot_size)
    }
}

impl fmt::Debug for RingHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingHeader")
            .field("tail", &self.tail.load(Ordering::Relaxed))
            .field("head", &self.head.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .field("slot_size", &self.slot_size)
            .finish()
    }
}

/// A ring's geometry: a power-of-two capacity and a slot size that is a
/// multiple of 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingLayout {
    capacity: u32,
    slot_size: u32,
}

impl RingLayout {
    /// Smallest capacity.
    pub const MIN_CAPACITY: u32 = 2;
    /// Largest capacity (16 Mi slots).
    pub const MAX_CAPACITY: u32 = 1 << 24;
    /// Smallest slot: one envelope header (or one raw 64-byte record).
    pub const MIN_SLOT_SIZE: u32 = 64;
    /// Largest slot.
    pub const MAX_SLOT_SIZE: u32 = 64 * 1024;

    /// Validates a geometry.
    ///
    /// # Errors
    /// [`LayoutError::CapacityNotPowerOfTwo`], [`LayoutError::CapacityOutOfRange`]
    /// or [`LayoutError::BadSlotSize`].
    pub const fn new(capacity: u32, slot_size: u32) -> Result<Self, LayoutError> {
        if !capacity.is_power_of_two() {
            return Err(LayoutError::CapacityNotPowerOfTwo { capacity });
        }
        if capacity < Self::MIN_CAPACITY || capacity > Self::MAX_CAPACITY {
            return Err(LayoutError::CapacityOutOfRange {
                capacity,
                min: Self::MIN_CAPACITY,
                max: Self::MAX_CAPACITY,
            });
        }
        if slot_size % 64 != 0 || slot_size < Self::MIN_SLOT_SIZE || slot_size > Self::MAX_SLOT_SIZE
        {
            return Err(LayoutError::BadSlotSize {
                slot_size,
                min: Self::MIN_SLOT_SIZE,
                max: Self::MAX_SLOT_SIZE,
            });
        }
        Ok(RingLayout {
            capacity,
            slot_size,
        })
    }

    /// `capacity` slots of the default 128 bytes.
    ///
    /// # Errors
    /// As [`RingLayout::new`].
    pub const fn with_capacity(capacity: u32) -> Result<Self, LayoutError> {
        Self::new(capacity, DEFAULT_SLOT_SIZE)
    }

    /// Number of slots.
    pub const fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Bytes per slot.
    pub const fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// The largest inline payload after a 64-byte envelope header.
    pub const fn max_payload(&self) -> u32 {
        self.slot_size.saturating_sub(HEADER_SIZE as u32)
    }

    /// Bytes the ring occupies in a region: header plus slots.
    pub const fn region_bytes(&self) -> usize {
        RING_HEADER_SIZE + self.capacity as usize * self.slot_size as usize
    }
}

/// The ring had no free slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ring is full")]
pub struct RingFull;

/// A byte record that could not be pushed (the caller still holds it).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// No free slot; retry after the consumer releases some.
    #[error("ring is full")]
    Full,
    /// The record is longer than a slot.
    #[error("record of {len} bytes exceeds the {max}-byte slot")]
    TooLarge {
        /// Bytes in the record.
        len: usize,
        /// Bytes in a slot.
        max: usize,
    },
}

/// A message that could not be sent; the message is handed back.
#[non_exhaustive]
#[derive(Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError<T> {
    /// No free slot; retry after the consumer releases some.
    #[error("ring is full")]
    Full(T),
    /// Header and payload do not fit in one slot.
    #[error("payload of {len} bytes exceeds the {max}-byte inline payload of a slot")]
    TooLarge {
        /// The message.
        value: T,
        /// Payload bytes.
        len: usize,
        /// Inline payload bytes of a slot.
        max: usize,
    },
}

impl<T> SendError<T> {
    /// The message that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(v) | SendError::TooLarge { value: v, .. } => v,
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("Full(..)"),
            SendError::TooLarge { len, max, .. } => f
                .debug_struct("TooLarge")
                .field("len", len)
                .field("max", max)
                .finish_non_exhaustive(),
        }
    }
}

pub use mem::Ring;
use mem::RingMem;

#[cfg(not(ringkernel_loom))]
mod mem {
    //! Ring memory over a [`SharedMemory`] region (raw pointers).
    use super::*;
    use crate::region::{HeapRegion, REGION_ALIGN, SharedMemory, check_span};
    use std::ptr::NonNull;
    use std::sync::Arc;

    /// A view of one ring inside a region, keeping the region alive.
    #[derive(Clone)]
    pub(crate) struct RingMem {
        header: NonNull<RingHeader>,
        slots: NonNull<u8>,
        mask: u64,
        slot_size: usize,
        _owner: Arc<dyn SharedMemory>,
    }

    // SAFETY: the pointers point into memory kept alive by `_owner`, which is
    // Send + Sync; which side may touch which slot is governed by the SPSC
    // protocol, and the counters are atomics.
    unsafe impl Send for RingMem {}
    // SAFETY: as for `Send`; shared access only reads the atomic counters.
    unsafe impl Sync for RingMem {}

    impl RingMem {
        /// # Safety
        /// `base` points at an initialised ring of `layout` inside `owner`.
        unsafe fn new(base: NonNull<u8>, layout: RingLayout, owner: Arc<dyn SharedMemory>) -> Self {
            RingMem {
                header: base.cast(),
                // SAFETY: the ring's span (header + slots) lies inside the
                // region, so the slot area starts inside it too.
                slots: unsafe { base.add(RING_HEADER_SIZE) },
                mask: u64::from(layout.capacity) - 1,
                slot_size: layout.slot_size as usize,
                _owner: owner,
            }
        }

        #[inline(always)]
        pub(crate) fn header(&self) -> &RingHeader {
            // SAFETY: the header was initialised before this view was made and
            // lives as long as `_owner`; its geometry is never written again
            // and its counters are atomics.
            unsafe { self.header.as_ref() }
        }

        #[inline(always)]
        pub(crate) fn slot_size(&self) -> usize {
            self.slot_size
        }

        /// The ring's first byte (its header) in the region.
        pub(crate) fn base(&self) -> NonNull<u8> {
            self.header.cast()
        }

        #[inline(always)]
        fn slot_ptr(&self, counter: u64) -> *mut u8 {
            // SAFETY: `counter & mask < capacity`, so the offset stays inside
            // the slot area of the region.
            unsafe {
                self.slots
                    .as_ptr()
                    .add((counter & self.mask) as usize * self.slot_size)
            }
        }

        /// Runs `f` on the slot of `counter`.
        ///
        /// # Safety
        /// No one writes that slot while `f` runs: the consumer reading
        /// `head <= counter < tail` (tail acquired), or the producer reading
        /// a slot it published, while it stages nothing (`&mut` producer).
        #[inline(always)]
        pub(crate) unsafe fn with_slot<R>(&self, counter: u64, f: impl FnOnce(&[u8]) -> R) -> R {
            // SAFETY: the caller owns the slot, so no one writes it while `f`
            // reads; the slice stays inside the slot.
            f(unsafe { std::slice::from_raw_parts(self.slot_ptr(counter), self.slot_size) })
        }

        /// Runs `f` on the slot of `counter`, mutably.
        ///
        /// # Safety
        /// The calling half owns that slot under the SPSC protocol (the
        /// producer: `tail <= counter < head + capacity`).
        #[inline(always)]
        pub(crate) unsafe fn with_slot_mut<R>(
            &self,
            counter: u64,
            f: impl FnOnce(&mut [u8]) -> R,
        ) -> R {
            // SAFETY: the caller owns the slot exclusively, so no one else
            // reads or writes it while `f` runs.
            f(unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(counter), self.slot_size) })
        }
    }

    /// Constructors of ring halves.
    ///
    /// [`Ring::new`] builds both halves over fresh heap memory. The `unsafe`
    /// constructors lay a ring over (or attach to one in) a caller-provided
    /// [`SharedMemory`] region — pinned memory mapped into a device, device
    /// memory — where the other half may be device code.
    #[derive(Debug)]
    pub struct Ring(());

    impl Ring {
        /// A ring of `layout` in its own zeroed heap region, as its two halves.
        #[allow(
            clippy::new_ret_no_self,
            reason = "a ring is its two halves, as rtrb's RingBuffer::new"
        )]
        pub fn new(layout: RingLayout) -> (Producer, Consumer) {
            let region: Arc<dyn SharedMemory> = Arc::new(HeapRegion::zeroed(layout.region_bytes()));
            // SAFETY: the region is fresh, exactly as large as the layout
            // needs, aligned, and reachable only through these two halves.
            unsafe { Self::init_in(region, 0, layout) }.expect("a fresh region fits its own layout")
        }

        /// Initialises a ring of `layout` at `offset` in `mem` (zeroed
        /// counters, geometry written) and returns both halves. Drop the half
        /// whose peer lives on a device.
        ///
        /// # Errors
        /// [`LayoutError::RegionTooSmall`] or [`LayoutError::Misaligned`]
        /// (offsets must be multiples of 128).
        ///
        /// # Safety
        /// 1. `mem[offset..offset + layout.region_bytes()]` is used by nothing
        ///    but this ring for as long as any half of it lives.
        /// 2. No other half of a ring in that span exists, here or on a device,
        ///    until the one returned for that role is dropped.
        pub unsafe fn init_in(
            mem: Arc<dyn SharedMemory>,
            offset: usize,
            layout: RingLayout,
        ) -> Result<(Producer, Consumer), LayoutError> {
            let base = check_span(&*mem, offset, layout.region_bytes(), REGION_ALIGN)?;
            // SAFETY: the span is in bounds and aligned for RingHeader (checked
            // above) and, by the caller's contract, no one else uses it.
            unsafe {
                base.cast::<RingHeader>()
                    .as_ptr()
                    .write(RingHeader::new(layout))
            };
            // SAFETY: the ring at `base` was just initialised inside `mem`.
            let ring = unsafe { RingMem::new(base, layout, mem) };
            Ok((Producer::attach(ring.clone()), Consumer::attach(ring)))
        }

        /// Attaches a producer to a ring already initialised at `offset`.
        ///
        /// # Errors
        /// Bounds and alignment as [`Ring::init_in`]; a header that is no ring
        /// ([`LayoutError::BadRingMagic`], [`LayoutError::BadRingVersion`]) or
        /// holds an invalid geometry.
        ///
        /// # Safety
        /// 1. The span holds a ring initialised by [`Ring::init_in`] or by
        ///    device code following `ringkernel_protocol.h`, used by nothing
        ///    else while this half lives.
        /// 2. No other producer of it exists until this one is dropped.
        pub unsafe fn attach_producer(
            mem: Arc<dyn SharedMemory>,
            offset: usize,
        ) -> Result<Producer, LayoutError> {
            // SAFETY: forwarded from the caller.
            unsafe { Self::attach(mem, offset) }.map(Producer::attach)
        }

        /// Attaches a consumer to a ring already initialised at `offset`.
        ///
        /// # Errors
        /// As [`Ring::attach_producer`].
        ///
        /// # Safety
        /// As [`Ring::attach_producer`], for the consumer role.
        pub unsafe fn attach_consumer(
            mem: Arc<dyn SharedMemory>,
            offset: usize,
        ) -> Result<Consumer, LayoutError> {
            // SAFETY: forwarded from the caller.
            unsafe { Self::attach(mem, offset) }.map(Consumer::attach)
        }

        /// # Safety
        /// As [`Ring::attach_producer`].
        unsafe fn attach(
            mem: Arc<dyn SharedMemory>,
            offset: usize,
        ) -> Result<RingMem, LayoutError> {
            let base = check_span(&*mem, offset, RING_HEADER_SIZE, REGION_ALIGN)?;
            // SAFETY: the header span is in bounds and aligned; by contract it
            // holds an initialised ring whose geometry is no longer written.
            let layout = unsafe { base.cast::<RingHeader>().as_ref() }.layout()?;
            check_span(&*mem, offset, layout.region_bytes(), REGION_ALIGN)?;
            // SAFETY: the whole ring span is in bounds, initialised by contract.
            Ok(unsafe { RingMem::new(base, layout, mem) })
        }
    }
}

#[cfg(ringkernel_loom)]
mod mem {
    //! Ring memory for loom: the same header, with loom atomics, and slots in
    //! loom-tracked cells so that loom checks every slot access against the
    //! counters' orderings.
    use super::*;
    use crate::sync::UnsafeCell;
    use std::sync::Arc;

    struct LoomRing {
        header: RingHeader,
        slots: Box<[UnsafeCell<Box<[u8]>>]>,
    }

    #[derive(Clone)]
    pub(crate) struct RingMem {
        inner: Arc<LoomRing>,
        mask: u64,
        slot_size: usize,
    }

    // SAFETY: slot cells are accessed only by the half that owns the slot
    // under the SPSC protocol, which is exactly what loom checks.
    unsafe impl Send for RingMem {}
    // SAFETY: as for `Send`.
    unsafe impl Sync for RingMem {}

    impl RingMem {
        pub(crate) fn header(&self) -> &RingHeader {
            &self.inner.header
        }

        pub(crate) fn slot_size(&self) -> usize {
            self.slot_size
        }

        /// # Safety
        /// As in the non-loom build.
        pub(crate) unsafe fn with_slot<R>(&self, counter: u64, f: impl FnOnce(&[u8]) -> R) -> R {
            let cell = &self.inner.slots[(counter & self.mask) as usize];
            // SAFETY: the caller owns the slot; loom verifies it.
            cell.with(|p| f(unsafe { &**p }))
        }

        /// # Safety
        /// As in the non-loom build.
        pub(crate) unsafe fn with_slot_mut<R>(
            &self,
            counter: u64,
            f: impl FnOnce(&mut [u8]) -> R,
        ) -> R {
            let cell = &self.inner.slots[(counter & self.mask) as usize];
            // SAFETY: the caller owns the slot exclusively; loom verifies it.
            cell.with_mut(|p| f(unsafe { &mut **p }))
        }
    }

    /// Constructors of ring halves (loom build: heap only).
    #[derive(Debug)]
    pub struct Ring(());

    impl Ring {
        /// A ring of `layout` in its own memory, as its two halves.
        #[allow(
            clippy::new_ret_no_self,
            reason = "a ring is its two halves, as rtrb's RingBuffer::new"
        )]
        pub fn new(layout: RingLayout) -> (Producer, Consumer) {
            let slots = (0..layout.capacity)
                .map(|_| UnsafeCell::new(vec![0u8; layout.slot_size as usize].into_boxed_slice()))
                .collect();
            let ring = RingMem {
                inner: Arc::new(LoomRing {
                    header: RingHeader::new(layout),
                    slots,
                }),
                mask: u64::from(layout.capacity) - 1,
                slot_size: layout.slot_size as usize,
            };
            (Producer::attach(ring.clone()), Consumer::attach(ring))
        }
    }
}

/// Reads a ring's counters from outside both halves (depth gauges, the
/// watchdog, tests). Never writes.
#[derive(Clone)]
pub struct RingObserver {
    ring: RingMem,
}

impl RingObserver {
    /// The ring's first byte (see [`Producer::ring_base`]).
    #[cfg(not(ringkernel_loom))]
    pub fn ring_base(&self) -> std::ptr::NonNull<u8> {
        self.ring.base()
    }

    /// Slots published and not yet released: `tail - head`.
    pub fn len(&self) -> u64 {
        let h = self.ring.header();
        // Acquire both: the reading is a snapshot; head first so the
        // difference cannot go negative (head never passes tail).
        let head = h.head.load(Ordering::Acquire);
        let tail = h.tail.load(Ordering::Acquire);
        tail.wrapping_sub(head)
    }

    /// Whether no slot is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots ever published.
    pub fn published(&self) -> u64 {
        self.ring.header().tail.load(Ordering::Acquire)
    }

    /// Slots ever released.
    pub fn released(&self) -> u64 {
        self.ring.header().head.load(Ordering::Acquire)
    }
}

impl fmt::Debug for RingObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RingObserver")
            .field(self.ring.header())
            .finish()
    }
}

/// The writing half of a ring.
pub struct Producer {
    ring: RingMem,
    /// Local copy of `tail` (this half is its only writer).
    tail: u64,
    /// Last `head` read from the consumer's line.
    cached_head: u64,
    capacity: u64,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("tail", &self.tail)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Producer {
    /// The ring's first byte (its `rk_ring_header`) in its region, for a
    /// device peer that takes over this half's role: device code given this
    /// address follows the protocol of `ringkernel_protocol.h`. Getting the
    /// address is safe; touching the ring through it is not, and this half
    /// must not be used while such a peer runs. The region stays alive as
    /// long as this half does.
    #[cfg(not(ringkernel_loom))]
    pub fn ring_base(&self) -> std::ptr::NonNull<u8> {
        self.ring.base()
    }

    fn attach(ring: RingMem) -> Self {
        let h = ring.header();
        // Acquire on our own counter: a previous producer of this ring (an
        // earlier attach) may have written it on another thread.
        let tail = h.tail.load(Ordering::Acquire);
        // Pairs with the consumer's store-release of head (`Consumer::release`
        // here; `st.release.sys` on a device): slots below head are free.
        let cached_head = h.head.load(Ordering::Acquire);
        let capacity = u64::from(h.capacity);
        Producer {
            ring,
            tail,
            cached_head,
            capacity,
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.ring.slot_size()
    }

    /// A read-only view of the counters.
    pub fn observer(&self) -> RingObserver {
        RingObserver {
            ring: self.ring.clone(),
        }
    }

    /// Free slots right now (reads the consumer's counter).
    pub fn free_slots(&mut self) -> usize {
        self.refresh_head();
        (self.capacity - (self.tail - self.cached_head)) as usize
    }

    /// Whether at least half the ring holds published messages the consumer
    /// has not released. Cheap: reads the consumer's counter only when the
    /// cached copy says so (at most once per half a ring of messages while
    /// the consumer keeps up).
    #[inline]
    pub fn half_full(&mut self) -> bool {
        let half = self.capacity / 2;
        if self.tail - self.cached_head < half {
            return false;
        }
        self.refresh_head();
        self.tail - self.cached_head >= half
    }

    /// Whether a slot is free. Cheap: reads the consumer's counter (a line
    /// the other side writes) only when the cached copy says full; use
    /// [`Producer::free_slots`] for a fresh count.
    #[inline]
    pub fn has_room(&mut self) -> bool {
        self.has_room_at(0)
    }

    #[inline]
    fn refresh_head(&mut self) {
        // Pairs with the consumer's store-release of head: its reads of the
        // released slots happened before we overwrite them.
        self.cached_head = self.ring.header().head.load(Ordering::Acquire);
    }

    /// Whether the slot `offset` places after the published tail is free.
    #[inline(always)]
    fn has_room_at(&mut self, offset: u64) -> bool {
        if self.tail + offset - self.cached_head < self.capacity {
            return true;
        }
        self.refresh_head();
        self.tail + offset - self.cached_head < self.capacity
    }

    /// Writes the slot `offset` places after the published tail.
    #[inline(always)]
    fn stage_with<R>(
        &mut self,
        offset: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, RingFull> {
        if !self.has_room_at(offset) {
            return Err(RingFull);
        }
        // SAFETY: `tail + offset < head + capacity` (checked), so the slot is
        // outside what the consumer may read, and this half is the only writer.
        Ok(unsafe { self.ring.with_slot_mut(self.tail + offset, f) })
    }

    /// Publishes `n` staged slots with one store.
    #[inline(always)]
    fn publish(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.tail += n;
        // Publishes the staged slots' bytes; pairs with the consumer's
        // load-acquire of tail (`Consumer::refresh_tail`; `ld.acquire.sys` on
        // a device).
        self.ring.header().tail.store(self.tail, Ordering::Release);
    }

    /// Fills the next free slot with `f` and publishes it.
    ///
    /// # Errors
    /// [`RingFull`]; `f` was not called.
    #[inline]
    pub fn try_push_with<R>(&mut self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, RingFull> {
        let r = self.stage_with(0, f)?;
        self.publish(1);
        Ok(r)
    }

    /// Copies `record` into the next free slot and publishes it.
    ///
    /// # Errors
    /// [`PushError::TooLarge`] or [`PushError::Full`].
    #[inline]
    pub fn try_push(&mut self, record: &[u8]) -> Result<(), PushError> {
        if record.len() > self.slot_size() {
            return Err(PushError::TooLarge {
                len: record.len(),
                max: self.slot_size(),
            });
        }
        self.try_push_with(|slot| slot[..record.len()].copy_from_slice(record))
            .map_err(|RingFull| PushError::Full)
    }

    /// Encodes `header` and the inline `Pod` `payload` into the next free
    /// slot and publishes it. Returns the header as written.
    ///
    /// # Errors
    /// [`SendError::Full`] or [`SendError::TooLarge`], with the payload.
    #[inline]
    pub fn try_send<T: Pod>(
        &mut self,
        header: &EnvelopeHeader,
        payload: T,
    ) -> Result<EnvelopeHeader, SendError<T>> {
        send_staged(self, 0, header, payload).inspect(|_| self.publish(1))
    }

    /// Encodes `header` and raw `payload` bytes into the next free slot and
    /// publishes it. Returns the header as written.
    ///
    /// # Errors
    /// [`PushError::TooLarge`] or [`PushError::Full`]; the caller keeps the bytes.
    #[inline]
    pub fn try_send_bytes(
        &mut self,
        header: &EnvelopeHeader,
        payload: &[u8],
    ) -> Result<EnvelopeHeader, PushError> {
        let max = self.slot_size() - HEADER_SIZE;
        if payload.len() > max {
            return Err(PushError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        match self.try_push_with(|slot| encode_bytes(slot, header, payload)) {
            Ok(Ok(written)) => Ok(written),
            // The size was checked above, so encoding into a slot cannot fail.
            Ok(Err(_)) => Err(PushError::TooLarge {
                len: payload.len(),
                max,
            }),
            Err(RingFull) => Err(PushError::Full),
        }
    }

    /// Runs `f` on every envelope published and not yet released by the
    /// consumer, oldest first, validated against `check`. The host uses it
    /// after fencing a faulted slot to hand back what was never processed.
    ///
    /// The consumer may go on reading (or releasing) these slots meanwhile;
    /// their bytes stay as written because only this half writes slots, and
    /// `&mut self` keeps it from writing while `f` runs.
    pub fn unconsumed_with(
        &mut self,
        check: &HeaderCheck<'_>,
        mut f: impl FnMut(Result<Envelope<'_>, DecodeError>),
    ) {
        // Pairs with the consumer's store-release of head.
        let head = self.ring.header().head.load(Ordering::Acquire);
        for counter in head..self.tail {
            // SAFETY: `head <= counter < tail`: the slot was published by
            // this half and is not written again before this half stages a
            // new message there, which `&mut self` rules out while we read;
            // the consumer only reads it.
            unsafe {
                self.ring
                    .with_slot(counter, |slot| f(Envelope::decode(slot, check)))
            };
        }
    }

    /// Starts a batch: slots written through it are published with one store
    /// when it is dropped (or [`WriteBatch::publish`]ed).
    pub fn batch(&mut self) -> WriteBatch<'_> {
        WriteBatch {
            producer: self,
            staged: 0,
        }
    }
}

#[inline(always)]
fn send_staged<T: Pod>(
    p: &mut Producer,
    offset: u64,
    header: &EnvelopeHeader,
    payload: T,
) -> Result<EnvelopeHeader, SendError<T>> {
    let max = p.slot_size() - HEADER_SIZE;
    let len = std::mem::size_of::<T>();
    if len > max {
        return Err(SendError::TooLarge {
            value: payload,
            len,
            max,
        });
    }
    match p.stage_with(offset, |slot| encode_pod(slot, header, &payload)) {
        Ok(Ok(written)) => Ok(written),
        // The size was checked above, so encoding into a slot cannot fail.
        Ok(Err(_)) => Err(SendError::TooLarge {
            value: payload,
            len,
            max,
        }),
        Err(RingFull) => Err(SendError::Full(payload)),
    }
}

/// Slots written as one batch and published with one store-release.
///
/// Dropping the batch publishes what it staged: a staged message was
/// accepted, and an accepted message is never dropped.
pub struct WriteBatch<'a> {
    producer: &'a mut Producer,
    staged: u64,
}

impl fmt::Debug for WriteBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBatch")
            .field("staged", &self.staged)
            .finish()
    }
}

impl WriteBatch<'_> {
    /// Fills the next free slot with `f` (published with the batch).
    ///
    /// # Errors
    /// [`RingFull`]; `f` was not called.
    #[inline]
    pub fn try_push_with<R>(&mut self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, RingFull> {
        let r = self.producer.stage_with(self.staged, f)?;
        self.staged += 1;
        Ok(r)
    }

    /// Copies `record` into the next free slot (published with the batch).
    ///
    /// # Errors
    /// [`PushError::TooLarge`] or [`PushError::Full`].
    pub fn try_push(&mut self, record: &[u8]) -> Result<(), PushError> {
        let max = self.producer.slot_size();
        if record.len() > max {
            return Err(PushError::TooLarge {
                len: record.len(),
                max,
            });
        }
        self.try_push_with(|slot| slot[..record.len()].copy_from_slice(record))
            .map_err(|RingFull| PushError::Full)
    }

    /// Encodes an envelope into the next free slot (published with the batch).
    ///
    /// # Errors
    /// [`SendError::Full`] or [`SendError::TooLarge`], with the payload.
    #[inline]
    pub fn try_send<T: Pod>(
        &mut self,
        header: &EnvelopeHeader,
        payload: T,
    ) -> Result<EnvelopeHeader, SendError<T>> {
        let written = send_staged(self.producer, self.staged, header, payload)?;
        self.staged += 1;
        Ok(written)
    }

    /// Encodes `header` and raw `payload` bytes into the next free slot
    /// (published with the batch).
    ///
    /// # Errors
    /// [`PushError::TooLarge`] or [`PushError::Full`]; the caller keeps the bytes.
    #[inline]
    pub fn try_send_bytes(
        &mut self,
        header: &EnvelopeHeader,
        payload: &[u8],
    ) -> Result<EnvelopeHeader, PushError> {
        let max = self.producer.slot_size() - HEADER_SIZE;
        if payload.len() > max {
            return Err(PushError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        match self
            .producer
            .stage_with(self.staged, |slot| encode_bytes(slot, header, payload))
        {
            Ok(Ok(written)) => {
                self.staged += 1;
                Ok(written)
            }
            // The size was checked above, so encoding into a slot cannot fail.
            Ok(Err(_)) => Err(PushError::TooLarge {
                len: payload.len(),
                max,
            }),
            Err(RingFull) => Err(PushError::Full),
        }
    }

    /// Slots staged so far.
    pub fn len(&self) -> usize {
        self.staged as usize
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.staged == 0
    }

    /// Publishes the staged slots now; returns how many.
    pub fn publish(mut self) -> usize {
        let n = std::mem::take(&mut self.staged);
        self.producer.publish(n);
        n as usize
    }
}

impl Drop for WriteBatch<'_> {
    fn drop(&mut self) {
        self.producer.publish(self.staged);
    }
}

/// The reading half of a ring.
pub struct Consumer {
    ring: RingMem,
    /// Local copy of `head` (this half is its only writer).
    head: u64,
    /// Last `tail` read from the producer's line.
    cached_tail: u64,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("head", &self.head)
            .finish()
    }
}

impl Consumer {
    /// The ring's first byte (its `rk_ring_header`) in its region, for a
    /// device peer that takes over this half's role: device code given this
    /// address follows the protocol of `ringkernel_protocol.h`. Getting the
    /// address is safe; touching the ring through it is not, and this half
    /// must not be used while such a peer runs. The region stays alive as
    /// long as this half does.
    #[cfg(not(ringkernel_loom))]
    pub fn ring_base(&self) -> std::ptr::NonNull<u8> {
        self.ring.base()
    }

    fn attach(ring: RingMem) -> Self {
        let h = ring.header();
        // Acquire on our own counter: an earlier consumer may have written it.
        let head = h.head.load(Ordering::Acquire);
        // Pairs with the producer's store-release of tail.
        let cached_tail = h.tail.load(Ordering::Acquire);
        Consumer {
            ring,
            head,
            cached_tail,
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        (self.ring.header().capacity) as usize
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.ring.slot_size()
    }

    /// A read-only view of the counters.
    pub fn observer(&self) -> RingObserver {
        RingObserver {
            ring: self.ring.clone(),
        }
    }

    #[inline]
    fn refresh_tail(&mut self) {
        // Pairs with the producer's store-release of tail (`Producer::publish`;
        // `st.release.sys` on a device): the published slots' bytes are visible.
        self.cached_tail = self.ring.header().tail.load(Ordering::Acquire);
    }

    /// Whether slot `offset` places after head is published.
    #[inline(always)]
    fn has_slot(&mut self, offset: u64) -> bool {
        if self.head + offset < self.cached_tail {
            return true;
        }
        self.refresh_tail();
        self.head + offset < self.cached_tail
    }

    /// Published slots not yet released (reads the producer's counter).
    pub fn len(&mut self) -> usize {
        self.refresh_tail();
        (self.cached_tail - self.head) as usize
    }

    /// Whether nothing is published (reads the producer's counter).
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    #[inline(always)]
    fn read_at<R>(&mut self, offset: u64, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        if !self.has_slot(offset) {
            return None;
        }
        // SAFETY: `head + offset < tail` as acquired, so the producer has
        // published this slot and will not write it until head passes it.
        Some(unsafe { self.ring.with_slot(self.head + offset, f) })
    }

    #[inline(always)]
    fn release(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.head += n;
        // Hands the slots back; pairs with the producer's load-acquire of head
        // (`Producer::refresh_head`; `ld.acquire.sys` on a device), so our
        // reads of them happen before it overwrites them.
        self.ring.header().head.store(self.head, Ordering::Release);
    }

    /// Runs `f` on the oldest published slot without releasing it.
    pub fn peek_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.read_at(0, f)
    }

    /// Runs `f` on the oldest published slot, then releases it.
    #[inline]
    pub fn try_pop_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let r = self.read_at(0, f)?;
        self.release(1);
        Some(r)
    }

    /// Validates the oldest envelope against `check`, runs `f` on it, and
    /// releases the slot. A slot that fails validation is released too (and
    /// reported), so one bad envelope never jams the ring.
    #[inline]
    pub fn try_recv_with<R>(
        &mut self,
        check: &HeaderCheck<'_>,
        f: impl FnOnce(Envelope<'_>) -> R,
    ) -> Option<Result<R, DecodeError>> {
        self.try_pop_with(|slot| Envelope::decode(slot, check).map(f))
    }

    /// Takes the ring's released head as this half's own: for a ring whose
    /// consuming side a device loop moves in place (a K2K link a device
    /// serves), before the host reads it while that loop is stopped.
    pub(crate) fn resync(&mut self) {
        // Pairs with the device consumer's store-release of head.
        self.head = self.ring.header().head.load(Ordering::Acquire);
    }

    /// Starts a batch: slots read through it are released with one store when
    /// it is dropped (or [`ReadBatch::release`]d).
    pub fn batch(&mut self) -> ReadBatch<'_> {
        ReadBatch {
            consumer: self,
            taken: 0,
        }
    }

    /// Releases the next `n` slots (at most those published), read earlier
    /// through a batch that released none; returns how many.
    pub fn release_next(&mut self, n: usize) -> usize {
        let mut batch = self.batch();
        for _ in 0..n {
            if batch.try_pop_with(|_| ()).is_none() {
                break;
            }
        }
        batch.release()
    }
}

/// Slots read as one batch and released with one store-release, when
/// dropped or by [`ReadBatch::release`] / [`ReadBatch::release_first`].
pub struct ReadBatch<'a> {
    consumer: &'a mut Consumer,
    taken: u64,
}

impl fmt::Debug for ReadBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBatch")
            .field("taken", &self.taken)
            .finish()
    }
}

impl ReadBatch<'_> {
    /// Runs `f` on the next published slot (released with the batch).
    #[inline]
    pub fn try_pop_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let r = self.consumer.read_at(self.taken, f)?;
        self.taken += 1;
        Some(r)
    }

    /// Validates the next envelope and runs `f` on it (released with the batch).
    #[inline]
    pub fn try_recv_with<R>(
        &mut self,
        check: &HeaderCheck<'_>,
        f: impl FnOnce(Envelope<'_>) -> R,
    ) -> Option<Result<R, DecodeError>> {
        self.try_pop_with(|slot| Envelope::decode(slot, check).map(f))
    }

    /// Slots taken so far.
    pub fn len(&self) -> usize {
        self.taken as usize
    }

    /// Whether nothing was taken.
    pub fn is_empty(&self) -> bool {
        self.taken == 0
    }

    /// Releases only the first `n` slots taken (at most all of them); the
    /// rest stay published, to be read again. Returns how many were released.
    pub fn release_first(mut self, n: usize) -> usize {
        let n = (n as u64).min(self.taken);
        self.taken = 0;
        self.consumer.release(n);
        n as usize
    }

    /// Releases the slots taken now; returns how many.
    pub fn release(mut self) -> usize {
        let n = std::mem::take(&mut self.taken);
        self.consumer.release(n);
        n as usize
    }
}

impl Drop for ReadBatch<'_> {
    /// Releases what was taken — unless the thread is unwinding: then the
    /// slots stay published, to be read again (a reader that panicked may
    /// not have finished with them).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.consumer.release(self.taken);
        }
    }
}

#[cfg(all(test, not(ringkernel_loom)))]
mod tests;

#[cfg(all(test, ringkernel_loom))]
mod loom_tests;
