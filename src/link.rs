//! K2K links: a handler's sends to another GPU actor, slot to slot, with no
//! host thread on the path.
//!
//! A link is one SPSC [`ring`](crate::ring) of envelopes from a sending actor
//! to a receiving actor (both GPU actors of one runtime), set up by
//! [`Runtime::connect`](crate::runtime::Runtime::connect), plus a
//! [`LinkControl`] block. It belongs to the two actors' *homes*, not to one
//! incarnation: it outlives restarts on either side.
//!
//! ## Sender
//!
//! A handler's send to a linked actor is staged with the message's other
//! effects. Once the message commits, the staged sends join the link's
//! *outbox* (in the order they were made) and the loop moves the outbox into
//! the ring as far as it has room, then rings the receiver's doorbell. So
//! only committed messages' sends ever reach a receiver, and a full ring
//! costs the sender nothing but an outbox: it goes on serving its inbound
//! rings. When an outbox reaches the link's capacity the sender stops taking
//! new messages until it drains — backpressure along the graph, which is why
//! [`Runtime::connect`](crate::runtime::Runtime::connect) refuses an edge that
//! would close a cycle. An edge declared with
//! [`LinkOptions::report_failures`] is allowed in a cycle: a send that finds
//! its outbox at capacity is reported as a dead letter
//! ([`LinkFull`](crate::home::RouteFailure::LinkFull)) instead of waiting.
//!
//! ## Receiver and the link's commit word
//!
//! The receiver serves a link's messages like its H2K messages: it merges the
//! stamp, runs the handler, publishes what it made, and commits — here by a
//! CAS on the link's commit word (`epoch << 48 | consumed << 1 | fenced`),
//! where `epoch` is the receiver's incarnation. The ring's head only moves
//! past committed messages. When the receiver's incarnation ends, the host
//! fences the word with a `fetch_or` (a late commit of the old incarnation
//! then fails), hands back what it left per the
//! [`PendingPolicy`](crate::home::PendingPolicy), and the next incarnation
//! reopens the word with its own epoch and carries on from `consumed`.
//!
//! A handler that serves a link message and *routes* a send through the host
//! marks it with the link and position ([`origin_of_link`]); the poller holds
//! it until the link's commit word passes that position, as it holds the
//! sends of H2K messages until the control block's commit word does.
//!
//! ## Closing
//!
//! When either actor's home is dropped, the link closes: what waits in the
//! sender's outbox is reported as dead letters; a link whose receiver is gone
//! also dead-letters what waits in the ring, and the sender's later sends to
//! it take the routed path (where an unknown receiver is a dead letter). A
//! link whose sender is gone is drained by its receiver.
//!
//! On the cpu backend the ring's producer end (and the outbox) and its
//! consumer end each sit behind a lock that a device loop takes per batch,
//! never across a handler; the host takes them only to close or hand back.
//! The two ends never contend with each other.
//!
//! A backend whose device loop runs on the host side of a dispatch (wgpu)
//! serves links through a [`LinkPort`]: the same rings, outboxes and commit
//! words, moved by its host loop between dispatches (host-mediated K2K).

use crate::control::ControlRef;
use crate::envelope::{Envelope, EnvelopeHeader, HeaderCheck};
use crate::error::DecodeError;
use crate::id::ActorId;
use crate::kernel::MAX_INLINE;
use crate::region::{Placed, REGION_ALIGN, SharedMemory};
use crate::ring::{Consumer, Producer, RingObserver};
use bytemuck::Zeroable;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;

/// `"RKLK"` read as a little-endian `u32`.
pub const LINK_MAGIC: u32 = u32::from_le_bytes(*b"RKLK");
/// The link control layout version.
pub const LINK_VERSION: u32 = 2;
/// Size of [`LinkControl`] in bytes.
pub const LINK_CONTROL_SIZE: usize = 256;
/// The fence bit of a link's commit word.
pub const LINK_FENCED: u64 = 1;
/// Bits of a link's commit word that count consumed messages (above the
/// fence bit, below the epoch).
pub const LINK_CONSUMED_BITS: u32 = 47;
/// `closed` bit: the receiver is gone for good.
pub const LINK_RECEIVER_GONE: u64 = 1;
/// `closed` bit: the sender is gone for good.
pub const LINK_SENDER_GONE: u64 = 2;

/// How long closing a link waits for a device sender to finish publishing.
pub const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most K2K links one actor slot of a backend whose device serves them
/// in place (cuda, c-host) has each way: its link table's rows.
pub const MAX_SLOT_LINKS: usize = 16;

/// Links one runtime can make (ids are 23 bits in an origin word).
pub const MAX_LINKS: u32 = 1 << 23;

/// The routed-origin marker: a routed send's `seq` with this bit set names
/// a link message (see [`origin_of_link`]), not an H2K `seq`.
pub const ORIGIN_LINK: u64 = 1 << 63;
const ORIGIN_POS_BITS: u32 = 40;
const ORIGIN_POS_MASK: u64 = (1 << ORIGIN_POS_BITS) - 1;
const CONSUMED_MASK: u64 = (1 << LINK_CONSUMED_BITS) - 1;

/// Link slots hold well-formed envelopes with inline payloads.
const CHECK: HeaderCheck<'static> = HeaderCheck::any_type(MAX_INLINE as u32);

/// The origin word of a message served from link `link` at position `pos`
/// (messages consumed before it): what its routed sends carry in `seq`, and
/// what the control block's `serving` says while it is in a handler.
pub const fn origin_of_link(link: LinkId, pos: u64) -> u64 {
    ORIGIN_LINK | ((link.0 as u64 & 0x7F_FFFF) << ORIGIN_POS_BITS) | (pos & ORIGIN_POS_MASK)
}

/// Splits an origin word made by [`origin_of_link`]: the link and the low
/// 40 bits of the position; `None` for an H2K `seq`.
pub const fn link_of_origin(origin: u64) -> Option<(LinkId, u64)> {
    if origin & ORIGIN_LINK == 0 {
        return None;
    }
    Some((
        LinkId(((origin >> ORIGIN_POS_BITS) & 0x7F_FFFF) as u32),
        origin & ORIGIN_POS_MASK,
    ))
}

/// Whether `consumed` has passed the message at (40-bit) position `pos`,
/// comparing modulo 2^40 (the two are never 2^39 apart: at most a ring's
/// worth of messages is unconsumed).
pub(crate) fn passed(consumed: u64, pos: u64) -> bool {
    let d = consumed.wrapping_sub(pos.wrapping_add(1)) & ORIGIN_POS_MASK;
    d < (1 << (ORIGIN_POS_BITS - 1))
}

/// A link's shared control words: two 128-byte lines, one per writer.
///
/// | line | writer | field |
/// |---|---|---|
/// | 0 | receiver (the host's one write: the fence, and the reopen) | `commit`: `epoch << 48 \| consumed << 1 \| fenced` |
/// | 1 | host | `closed`: [`LINK_RECEIVER_GONE`] \| [`LINK_SENDER_GONE`]; magic, version, capacity; and `publishing`, the one word a *device* sender writes here |
///
/// `publishing` is how a device-side sender (the C loop) and the host's
/// close agree without a lock: the sender stores 1, fences (SeqCst), then
/// reads `closed`; the host sets `closed` (SeqCst), then waits for
/// `publishing` to be 0 before it takes what is in the ring. So either the
/// sender sees the link closed (and routes its sends), or the host sees it
/// publishing and waits until its sends are in the ring. The cpu backend's
/// sender holds the producer lock instead and leaves the word 0.
#[repr(C, align(128))]
pub struct LinkControl {
    pub(crate) commit: AtomicU64,
    _pad0: [u8; 120],
    pub(crate) closed: AtomicU64,
    pub(crate) magic: u32,
    pub(crate) version: u32,
    pub(crate) capacity: u32,
    pub(crate) publishing: AtomicU32,
    _pad1: [u8; 104],
}

const _: () = assert!(std::mem::size_of::<LinkControl>() == LINK_CONTROL_SIZE);

impl fmt::Debug for LinkControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (epoch, consumed, fenced) = self.commit_state();
        f.debug_struct("LinkControl")
            .field("epoch", &epoch)
            .field("consumed", &consumed)
            .field("fenced", &fenced)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

const fn commit_word(epoch: u16, consumed: u64, fenced: bool) -> u64 {
    ((epoch as u64) << 48) | ((consumed & CONSUMED_MASK) << 1) | fenced as u64
}

impl LinkControl {
    /// A link control block: fenced (no receiver incarnation serves it yet).
    pub fn new(capacity: u32) -> Self {
        LinkControl {
            commit: AtomicU64::new(commit_word(0, 0, true)),
            _pad0: [0; 120],
            closed: AtomicU64::new(0),
            magic: LINK_MAGIC,
            version: LINK_VERSION,
            capacity,
            publishing: AtomicU32::new(0),
            _pad1: [0; 104],
        }
    }

    /// `(epoch, consumed, fenced)`.
    pub fn commit_state(&self) -> (u16, u64, bool) {
        // Acquire: pairs with the receiver's release CAS in `commit`, so a
        // host that sees `consumed` also sees what the receiver published
        // before committing it.
        let w = self.commit.load(Ordering::Acquire);
        (
            (w >> 48) as u16,
            (w >> 1) & CONSUMED_MASK,
            w & LINK_FENCED != 0,
        )
    }

    /// Receiver: commits the message at `consumed` for incarnation `epoch`;
    /// fails once the host has fenced the word (or reopened it for another
    /// incarnation).
    pub fn commit(&self, epoch: u16, consumed: u64) -> bool {
        // Release: publishes the K2H envelopes written before (pairs with
        // the host's AcqRel `fence` and the poller's acquire in
        // `commit_state`).
        self.commit
            .compare_exchange(
                commit_word(epoch, consumed, false),
                commit_word(epoch, consumed + 1, false),
                Ordering::Release,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Host: fences the word if incarnation `epoch` serves it (a word
    /// already reopened for a later incarnation is left alone); returns how
    /// many messages it consumed then, or `None` for another epoch.
    pub fn fence_epoch(&self, epoch: u16) -> Option<u64> {
        let mut w = self.commit.load(Ordering::Acquire);
        loop {
            if (w >> 48) as u16 != epoch {
                return None;
            }
            // AcqRel: pairs with the receiver's release CAS (as `fence`).
            match self.commit.compare_exchange(
                w,
                w | LINK_FENCED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((w >> 1) & CONSUMED_MASK),
                Err(now) => w = now,
            }
        }
    }

    /// Host: fences the word whatever its epoch (the receiver is gone for
    /// good); returns how many messages it consumed.
    pub fn fence(&self) -> u64 {
        // AcqRel: pairs with the receiver's release CAS, as the control
        // block's fence does.
        (self.commit.fetch_or(LINK_FENCED, Ordering::AcqRel) >> 1) & CONSUMED_MASK
    }

    /// Host: reopens a fenced word for incarnation `epoch`, skipping `skip`
    /// messages (handed back by the host). Returns the new `consumed`.
    pub fn reopen(&self, epoch: u16, skip: u64) -> u64 {
        let mut w = self.commit.load(Ordering::Acquire);
        loop {
            let consumed = ((w >> 1) & CONSUMED_MASK) + skip;
            // Only the fenced word is ever reopened; the receiver cannot move
            // it meanwhile (its CAS expects an unfenced word).
            match self.commit.compare_exchange(
                w,
                commit_word(epoch, consumed, false),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return consumed,
                Err(now) => w = now,
            }
        }
    }

    /// The `closed` bits.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Acquire)
    }

    /// The ring's capacity, as set up.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Whether the magic and version are this layout's.
    pub fn is_valid(&self) -> bool {
        self.magic == LINK_MAGIC && self.version == LINK_VERSION
    }
}

/// `flags` bit of a [`LinkRow`]: the link reports failures (a send it has
/// no room for is a dead letter, never a wait).
pub const LINK_ROW_REPORTS_FAILURES: u32 = 1;

/// One row of a slot's [`LinkTable`]: a link as the device loop serves it.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct LinkRow {
    /// `rk_link_control*`.
    pub control: AtomicU64,
    /// `rk_ring_header*` of the link's ring.
    pub ring: AtomicU64,
    /// The other actor's id bits, incarnation 0 (the receiver of an
    /// outbound link, the sender of an inbound one).
    pub peer: AtomicU64,
    /// Outbound: `const uint32_t*`, the receiver's served types (sorted);
    /// sends of other types take the routed path.
    pub served: AtomicU64,
    /// How many served types.
    pub n_served: AtomicU32,
    /// The link's id.
    pub id: AtomicU32,
    /// [`LINK_ROW_REPORTS_FAILURES`].
    pub flags: AtomicU32,
    /// The ring's slots.
    pub capacity: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<LinkRow>() == 64);

/// Where a [`LinkTable`]'s rows start: [`MAX_SLOT_LINKS`] inbound rows,
/// then as many outbound.
pub const LINK_TABLE_ROWS_AT: usize = 128;

/// A device slot's K2K links, in memory its loop reads (cuda, c-host): the
/// host rewrites the rows when the slot's links change (a connect, a
/// departure), under a seqlock — `generation` odd while it writes — and the
/// loop copies them between messages, then says which generation it took
/// (`seen`; the host keeps a dropped link's memory until then).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct LinkTable {
    /// The seqlock word (host): even when the rows are whole.
    pub generation: AtomicU64,
    /// Inbound rows in use.
    pub n_in: AtomicU32,
    /// Outbound rows in use.
    pub n_out: AtomicU32,
    /// The generation the device loop took last (device, store-release).
    pub seen: AtomicU64,
    _pad: [u64; 13],
    /// Links into the slot.
    pub inbound: [LinkRow; MAX_SLOT_LINKS],
    /// Links out of the slot.
    pub outbound: [LinkRow; MAX_SLOT_LINKS],
}

const _: () = assert!(std::mem::offset_of!(LinkTable, inbound) == LINK_TABLE_ROWS_AT);
const _: () =
    assert!(std::mem::offset_of!(LinkTable, outbound) == LINK_TABLE_ROWS_AT + 64 * MAX_SLOT_LINKS);

impl LinkTable {
    /// Rewrites the rows under the seqlock (one writer at a time); `addr`
    /// turns a host pointer into the device's address of it. Returns the
    /// generation written.
    fn write(
        &self,
        inbound: &[Arc<Link>],
        outbound: &[OutLink],
        addr: &dyn Fn(*const u8) -> Option<u64>,
    ) -> u64 {
        let g = self.generation.load(Ordering::Relaxed);
        self.generation.store(g | 1, Ordering::Relaxed);
        // Orders the odd generation before the rows' stores: a reader that
        // sees any new row sees the generation moved (pairs with the
        // reader's fence before its second load of the generation).
        std::sync::atomic::fence(Ordering::Release);
        for (row, l) in self.inbound.iter().zip(inbound) {
            l.fill_row(row, l.from, addr);
        }
        for (row, o) in self.outbound.iter().zip(outbound) {
            o.link.fill_row(row, o.link.to, addr);
        }
        self.n_in
            .store(inbound.len().min(MAX_SLOT_LINKS) as u32, Ordering::Relaxed);
        self.n_out
            .store(outbound.len().min(MAX_SLOT_LINKS) as u32, Ordering::Relaxed);
        // Publishes the rows; pairs with the reader's acquire load.
        self.generation.store((g | 1) + 1, Ordering::Release);
        (g | 1) + 1
    }
}

/// Identifies a link within its runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub(crate) u32);

impl LinkId {
    /// The raw number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// How [`Runtime::connect`](crate::runtime::Runtime::connect) sets up a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkOptions {
    pub(crate) capacity: u32,
    pub(crate) report_failures: bool,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            capacity: 1024,
            report_failures: false,
        }
    }
}

impl LinkOptions {
    /// Ring slots (a power of two, 2..=2^24); the outbox holds as many
    /// again before the sender waits. Default 1024.
    pub fn capacity(mut self, slots: u32) -> Self {
        self.capacity = slots;
        self
    }

    /// A send that finds the outbox at capacity is reported as a dead letter
    /// instead of waiting; such an edge may close a cycle.
    pub fn report_failures(mut self, yes: bool) -> Self {
        self.report_failures = yes;
        self
    }
}

/// Why [`Runtime::connect`](crate::runtime::Runtime::connect) refused a link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No GPU actor with this index lives on this runtime.
    #[error("no GPU actor {0:?} on this runtime")]
    Unknown(ActorId),
    /// K2K links join two distinct GPU actors of one runtime.
    #[error("a K2K link needs two distinct GPU actors of this runtime: {0:?}")]
    NotLinkable(ActorId),
    /// The two are linked already.
    #[error("{from:?} → {to:?} is linked already")]
    AlreadyLinked {
        /// The sender.
        from: ActorId,
        /// The receiver.
        to: ActorId,
    },
    /// The edge would close a cycle of waiting edges (full rings could
    /// deadlock it); declare it with [`LinkOptions::report_failures`].
    #[error("{from:?} → {to:?} closes a cycle of K2K links: {path:?}")]
    Cycle {
        /// The sender.
        from: ActorId,
        /// The receiver.
        to: ActorId,
        /// The existing path from `to` back to `from`.
        path: Vec<ActorId>,
    },
    /// This runtime's backend does not serve K2K links yet.
    #[error("the {0:?} backend does not serve K2K links yet")]
    Unsupported(crate::kernel::BackendKind),
    /// The runtime made [`MAX_LINKS`] links already.
    #[error("the runtime made {} links already", MAX_LINKS)]
    TooManyLinks,
    /// The capacity is out of range.
    #[error("bad link capacity: {0}")]
    Capacity(#[from] crate::error::LayoutError),
    /// The backend had no memory for the link.
    #[error("no memory for the link: {0}")]
    Memory(String),
    /// An actor of a backend whose device serves links in place has as
    /// many links this way as it can: [`MAX_SLOT_LINKS`] in, as many out.
    #[error("{actor:?} has as many K2K links as a device slot serves (inbound: {inbound})")]
    SlotLinks {
        /// The actor.
        actor: ActorId,
        /// Whether its inbound links (else its outbound ones) are full.
        inbound: bool,
    },
}

/// Counters of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Messages the sender put into the ring.
    pub sent: u64,
    /// Messages the receiver committed.
    pub consumed: u64,
    /// Committed sends waiting in the outbox.
    pub outbox: usize,
    /// Messages reported as dead letters by this link.
    pub dead_letters: u64,
}

/// A message made by a handler: an envelope header and its inline payload.
#[derive(Clone, Copy)]
pub(crate) struct Staged {
    pub(crate) header: EnvelopeHeader,
    pub(crate) len: usize,
    pub(crate) bytes: [u8; MAX_INLINE],
}

impl Staged {
    pub(crate) fn new(header: EnvelopeHeader, payload: &[u8]) -> Self {
        let len = payload.len().min(MAX_INLINE);
        let mut bytes = [0u8; MAX_INLINE];
        bytes[..len].copy_from_slice(&payload[..len]);
        Staged { header, len, bytes }
    }

    /// Appends `(header, payload)` to `out`, built in place: a staged copy
    /// built on the stack and then moved reads back the payload bytes just
    /// written by a narrower copy, which stalls store forwarding (`perf` of
    /// ractor tells: 40 % of `DeviceLoop::run`'s samples).
    #[inline(always)]
    pub(crate) fn push(out: &mut Vec<Staged>, header: EnvelopeHeader, payload: &[u8]) {
        let len = payload.len().min(MAX_INLINE);
        out.push(Staged {
            header,
            len,
            bytes: [0; MAX_INLINE],
        });
        if let Some(s) = out.last_mut() {
            s.bytes[..len].copy_from_slice(&payload[..len]);
        }
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// A slot that is no valid envelope: its first 64 bytes as they are,
    /// no payload (for a dead letter that says what was there).
    pub(crate) fn malformed(slot: &[u8]) -> Self {
        let header = slot
            .get(..crate::envelope::HEADER_SIZE)
            .map_or(EnvelopeHeader::zeroed(), bytemuck::pod_read_unaligned);
        Staged::new(header, &[])
    }
}

/// Where a device loop is woken: its control block's doorbell and its
/// thread. Swapped by the host at each incarnation.
#[derive(Clone)]
pub(crate) struct WakeTarget {
    pub(crate) control: ControlRef,
    pub(crate) thread: Thread,
}

/// An actor's current [`WakeTarget`], shared by its home and every link into
/// it; `generation` lets a sender cache it.
#[derive(Default)]
pub(crate) struct SlotWaker {
    generation: AtomicU64,
    target: Mutex<Option<WakeTarget>>,
}

impl SlotWaker {
    pub(crate) fn set(&self, target: Option<WakeTarget>) {
        *lock(&self.target) = target;
        // Release: a sender that sees the new generation reloads the target
        // under the lock.
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn get(&self) -> Option<WakeTarget> {
        lock(&self.target).clone()
    }

    /// Rings the doorbell of the live incarnation (if any).
    pub(crate) fn wake(&self) {
        if let Some(t) = self.get() {
            t.control.doorbell().ring(|| t.thread.unpark());
        }
    }
}

/// A sender's cached copy of its receiver's [`WakeTarget`].
#[derive(Default)]
pub(crate) struct CachedWake {
    generation: u64,
    target: Option<WakeTarget>,
}

impl CachedWake {
    /// Rings the receiver's doorbell (wakes it if it is parked).
    pub(crate) fn wake(&mut self, waker: &SlotWaker) {
        // SeqCst: after the tail store, before the generation load, so a
        // receiver incarnation that parks on its new doorbell after the host
        // installed it (and rang it) either sees the messages or is seen
        // here under its new generation (the doorbell's own handshake).
        std::sync::atomic::fence(Ordering::SeqCst);
        let g = waker.generation();
        if g != self.generation {
            self.target = waker.get();
            self.generation = g;
        }
        if let Some(t) = &self.target {
            t.control.doorbell().ring(|| t.thread.unpark());
        }
    }
}

/// The producer end: the ring's producer and the outbox.
pub(crate) struct LinkTx {
    pub(crate) producer: Producer,
    pub(crate) outbox: VecDeque<Staged>,
    /// `seq` of the last send made over the link (per sender and receiver).
    next_seq: u64,
}

/// One K2K link (see the [module docs](self)).
pub(crate) struct Link {
    pub(crate) id: LinkId,
    pub(crate) from: ActorId,
    pub(crate) to: ActorId,
    pub(crate) report_failures: bool,
    pub(crate) capacity: usize,
    /// At the start of the link's region (the backend's memory, so a device
    /// loop can serve the link in place); the receiver's served types
    /// follow it, then the ring.
    pub(crate) control: Placed<LinkControl>,
    pub(crate) tx: Mutex<LinkTx>,
    pub(crate) rx: Mutex<Consumer>,
    pub(crate) observer: RingObserver,
    /// The receiver's doorbell.
    pub(crate) receiver: Arc<SlotWaker>,
    /// The sender's home (to detach the link when the receiver goes).
    pub(crate) sender_home: std::sync::Weak<crate::home::HomeCore>,
    /// Message types the receiver serves: others take the routed path.
    pub(crate) served: Vec<u32>,
    pub(crate) sent: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    /// Messages past `consumed` the host handed back (failed) while the
    /// word was fenced; the next incarnation starts after them.
    skipped: AtomicU64,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("control", &*self.control)
            .finish_non_exhaustive()
    }
}

/// Locks, ignoring poison: every critical section here is a few pushes,
/// pops and counter stores that leave the data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    pub(crate) fn new(
        id: LinkId,
        (from, to): (ActorId, ActorId),
        options: LinkOptions,
        receiver: Arc<SlotWaker>,
        sender_home: std::sync::Weak<crate::home::HomeCore>,
        served: Vec<u32>,
        memory: &dyn Fn(usize) -> Result<Arc<dyn SharedMemory>, String>,
    ) -> Result<Self, ConnectError> {
        let layout = crate::ring::RingLayout::new(
            options.capacity,
            crate::ring::DEFAULT_SLOT_SIZE.max((crate::envelope::HEADER_SIZE + MAX_INLINE) as u32),
        )?;
        let at_served = LINK_CONTROL_SIZE;
        let at_ring = (at_served + 4 * served.len()).next_multiple_of(REGION_ALIGN);
        let mem = memory(at_ring + layout.region_bytes()).map_err(ConnectError::Memory)?;
        // SAFETY: the region is fresh and this link's alone: the control
        // block, the served list and the ring are disjoint spans of it.
        let (control, (producer, consumer)) = unsafe {
            let control = Placed::init_in(mem.clone(), 0, LinkControl::new(options.capacity))?;
            for (i, t) in served.iter().enumerate() {
                Placed::init_in(mem.clone(), at_served + 4 * i, AtomicU32::new(*t))?;
            }
            (control, crate::ring::Ring::init_in(mem, at_ring, layout)?)
        };
        Ok(Link {
            id,
            from,
            to,
            report_failures: options.report_failures,
            capacity: options.capacity as usize,
            control,
            observer: consumer.observer(),
            tx: Mutex::new(LinkTx {
                producer,
                outbox: VecDeque::new(),
                next_seq: 0,
            }),
            rx: Mutex::new(consumer),
            receiver,
            sender_home,
            served,
            sent: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        })
    }

    /// Writes this link's row (`peer`: the actor at its other end; `addr`:
    /// the device's address of a host pointer, 0 where it has none, which
    /// the loop refuses).
    fn fill_row(&self, row: &LinkRow, peer: ActorId, addr: &dyn Fn(*const u8) -> Option<u64>) {
        let control = std::ptr::from_ref::<LinkControl>(&self.control).cast::<u8>();
        row.control
            .store(addr(control).unwrap_or(0), Ordering::Relaxed);
        row.ring.store(
            addr(self.observer.ring_base().as_ptr()).unwrap_or(0),
            Ordering::Relaxed,
        );
        row.peer.store(peer.to_bits(), Ordering::Relaxed);
        // The served list follows the control block in the link's region.
        row.served.store(
            addr(control.wrapping_add(LINK_CONTROL_SIZE)).unwrap_or(0),
            Ordering::Relaxed,
        );
        row.n_served
            .store(self.served.len() as u32, Ordering::Relaxed);
        row.id.store(self.id.0, Ordering::Relaxed);
        row.flags.store(
            if self.report_failures {
                LINK_ROW_REPORTS_FAILURES
            } else {
                0
            },
            Ordering::Relaxed,
        );
        row.capacity.store(self.capacity as u32, Ordering::Relaxed);
    }

    /// Whether the receiver is gone for good.
    pub(crate) fn receiver_gone(&self) -> bool {
        self.control.closed() & LINK_RECEIVER_GONE != 0
    }

    /// Messages in the ring (sent, not yet released by the receiver).
    pub(crate) fn in_ring(&self) -> usize {
        self.observer.len() as usize
    }

    /// Receiver: whether incarnation `epoch` has a message to serve here.
    pub(crate) fn has_inbound(&self, epoch: u16) -> bool {
        let (e, consumed, fenced) = self.control.commit_state();
        !fenced && e == epoch && self.observer.published() > consumed
    }

    /// Sender: appends committed sends to the outbox (numbering them per
    /// link) and moves what fits into the ring, waking the receiver.
    /// Returns what is left in the outbox; sends to a receiver that is gone
    /// come back.
    pub(crate) fn push(
        &self,
        tx: &mut LinkTx,
        staged: impl IntoIterator<Item = Staged>,
        wake: &mut CachedWake,
    ) -> Result<usize, Vec<Staged>> {
        if self.control.closed() != 0 {
            // Closed while these were being committed: the host took the
            // outbox already; these are the caller's to report.
            let lost: Vec<Staged> = staged.into_iter().collect();
            self.dead_letters
                .fetch_add(lost.len() as u64, Ordering::Relaxed);
            return Err(lost);
        }
        let mut moved = 0;
        {
            // Straight into the ring while it has room and nothing waits
            // before them; the rest joins the outbox.
            let mut batch = tx.producer.batch();
            let mut direct = tx.outbox.is_empty();
            for mut s in staged {
                tx.next_seq += 1;
                s.header.seq = tx.next_seq;
                if direct && batch.try_send_bytes(&s.header, s.payload()).is_ok() {
                    moved += 1;
                } else {
                    direct = false;
                    tx.outbox.push_back(s);
                }
            }
        }
        if moved > 0 {
            self.sent.fetch_add(moved, Ordering::Relaxed);
            wake.wake(&self.receiver);
        }
        if !tx.outbox.is_empty() {
            self.flush_locked(tx, wake);
        }
        Ok(tx.outbox.len())
    }

    /// Sender: the producer end, for a [`Link::push`] (held across the
    /// commit of the message whose sends it pushes).
    pub(crate) fn lock_tx(&self) -> MutexGuard<'_, LinkTx> {
        lock(&self.tx)
    }

    /// Sender: moves what fits of the outbox into the ring; returns what is
    /// left in it.
    pub(crate) fn flush(&self, wake: &mut CachedWake) -> usize {
        let mut tx = lock(&self.tx);
        if !tx.outbox.is_empty() && !self.receiver_gone() {
            self.flush_locked(&mut tx, wake);
        }
        tx.outbox.len()
    }

    fn flush_locked(&self, tx: &mut LinkTx, wake: &mut CachedWake) -> usize {
        let LinkTx {
            producer, outbox, ..
        } = tx;
        let mut moved = 0;
        {
            let mut batch = producer.batch();
            while let Some(s) = outbox.front() {
                if batch.try_send_bytes(&s.header, s.payload()).is_err() {
                    break;
                }
                outbox.pop_front();
                moved += 1;
            }
            // Dropping the batch publishes it (one store-release of the tail).
        }
        if moved > 0 {
            self.sent.fetch_add(moved as u64, Ordering::Relaxed);
            wake.wake(&self.receiver);
        }
        moved
    }

    /// Sender: committed sends waiting in the outbox.
    pub(crate) fn outbox_len(&self) -> usize {
        lock(&self.tx).outbox.len()
    }

    /// Receiver: releases the ring up to what incarnation `epoch` committed,
    /// then copies out up to `max` messages after it and the `skip` taken
    /// already (in flight), each checked as an
    /// envelope. Returns the position of the first one (`consumed`) and the
    /// error of a malformed one (which ends the batch), or `None` if the
    /// link is not this incarnation's to serve.
    pub(crate) fn take(
        &self,
        epoch: u16,
        skip: usize,
        max: usize,
        out: &mut Vec<Staged>,
    ) -> Option<(u64, Option<DecodeError>)> {
        let mut rx = lock(&self.rx);
        let (e, consumed, fenced) = self.control.commit_state();
        if fenced || e != epoch {
            return None;
        }
        release_to(&mut rx, &self.observer, consumed);
        let mut batch = rx.batch();
        let mut skipped = 0u64;
        while skipped < skip as u64 && batch.try_pop_with(|_| ()).is_some() {
            skipped += 1;
        }
        let mut bad = None;
        while out.len() < max {
            match batch.try_recv_with(&CHECK, |env| Staged::push(out, env.header, env.payload)) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    bad = Some(e);
                    break;
                }
                None => break,
            }
        }
        // Nothing is released until it is committed.
        batch.release_first(0);
        Some((consumed + skipped, bad))
    }

    /// Receiver: releases the ring up to what was committed.
    pub(crate) fn release_committed(&self) {
        let mut rx = lock(&self.rx);
        let (_, consumed, _) = self.control.commit_state();
        release_to(&mut rx, &self.observer, consumed);
    }

    /// Host: copies out every message in the ring past `consumed` and what
    /// was handed back already (the receiver is fenced, so nothing else
    /// moves the head meanwhile), and the position of the first. A
    /// malformed one is listed too, with its raw header and no payload, so
    /// positions stay true: a malformed poison is handed back like another.
    pub(crate) fn unconsumed(&self) -> (u64, Vec<Staged>) {
        let (_, consumed, _) = self.control.commit_state();
        let skipped = self.skipped.load(Ordering::Relaxed);
        let mut out = Vec::new();
        let mut rx = lock(&self.rx);
        release_to(&mut rx, &self.observer, consumed);
        let mut batch = rx.batch();
        let mut at = 0;
        while let Some(s) = batch.try_pop_with(|slot| match Envelope::decode(slot, &CHECK) {
            Ok(env) => Staged::new(env.header, env.payload),
            Err(_) => Staged::malformed(slot),
        }) {
            if at >= skipped {
                out.push(s);
            }
            at += 1;
        }
        batch.release_first(0);
        (consumed + skipped, out)
    }

    /// Host: the first `n` of [`Link::unconsumed`] were handed back (failed);
    /// the next incarnation starts after them.
    pub(crate) fn hand_back(&self, n: u64) {
        self.skipped.fetch_add(n, Ordering::Relaxed);
        self.dead_letters.fetch_add(n, Ordering::Relaxed);
    }

    /// Host: a new incarnation `epoch` of the receiver serves the link, past
    /// what was handed back.
    pub(crate) fn reopen(&self, epoch: u16) {
        self.control
            .reopen(epoch, self.skipped.swap(0, Ordering::Relaxed));
    }

    /// Host: the receiver is gone for good. Returns what will never be
    /// delivered: what is in the ring past `consumed`, then the outbox.
    pub(crate) fn close_receiver(&self) -> Vec<Staged> {
        let outbox: Vec<Staged> = {
            let mut tx = lock(&self.tx);
            // Under the producer lock: nothing enters the ring after this
            // from a host-side sender. SeqCst: pairs with a device sender's
            // fence between its `publishing` store and its load of `closed`.
            self.control
                .closed
                .fetch_or(LINK_RECEIVER_GONE, Ordering::SeqCst);
            tx.outbox.drain(..).collect()
        };
        self.wait_publish();
        self.control.fence();
        let (_, mut lost) = self.unconsumed();
        lost.extend(outbox);
        self.dead_letters
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        lost
    }

    /// Host: waits until a device sender that had not seen the link closed
    /// has published its sends into the ring (see [`LinkControl`]); at most
    /// [`PUBLISH_WAIT`] (a device that stalls longer loses what it had not
    /// published, and says so in the log).
    fn wait_publish(&self) {
        let deadline = std::time::Instant::now() + PUBLISH_WAIT;
        // SeqCst: the other half of the handshake (after the `closed` RMW).
        while self.control.publishing.load(Ordering::SeqCst) != 0 {
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    link = self.id.0,
                    "a device sender did not finish publishing"
                );
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Host: the sender is gone for good. Returns its outbox (never to be
    /// sent); what is in the ring stays for the receiver.
    pub(crate) fn close_sender(&self) -> Vec<Staged> {
        let mut tx = lock(&self.tx);
        self.control
            .closed
            .fetch_or(LINK_SENDER_GONE, Ordering::AcqRel);
        let lost: Vec<Staged> = tx.outbox.drain(..).collect();
        self.dead_letters
            .fetch_add(lost.len() as u64, Ordering::Relaxed);
        lost
    }

    pub(crate) fn stats(&self) -> LinkStats {
        LinkStats {
            // The ring's tail: a device sender (the C loop) publishes
            // without this counter.
            sent: self
                .sent
                .load(Ordering::Relaxed)
                .max(self.observer.published()),
            consumed: self.control.commit_state().1,
            outbox: self.outbox_len(),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
        }
    }
}

/// An actor slot's K2K links, for a device backend whose *host* loop moves
/// link messages (host-mediated K2K: the wgpu backend, between dispatches).
/// Given in [`DeviceSlot::links`](crate::backend::DeviceSlot::links).
///
/// The protocol is the cpu backend's (see the [module docs](self)): a
/// handler's sends to a linked actor are staged ([`LinkPort::stage`]) and
/// join the link only once their message commits
/// ([`LinkPort::commit_with`]); the receiver serves a link's messages in
/// batches ([`LinkPort::take`]) and commits each on the link's commit word
/// ([`InboundLink::commit`]), so a fenced incarnation's late commit fails
/// and the next incarnation carries on where the last one committed; a
/// sender whose waiting link's outbox is at capacity takes no new message
/// ([`LinkPort::blocked`]).
pub struct LinkPort {
    home: Arc<crate::home::HomeCore>,
    poller: Arc<crate::runtime::PollerShared>,
    id: ActorId,
    incarnation: u16,
    served: Vec<u32>,
    generation: u64,
    inbound: Vec<Arc<Link>>,
    outbound: Vec<OutLink>,
    /// Where the next [`LinkPort::take`] starts looking (round robin).
    cursor: usize,
    /// See [`LinkPort::take_refused`].
    refused: u64,
    /// Reused by [`LinkPort::take`].
    buf: Vec<Staged>,
    /// Links a [`LinkTable`] listed before its generation `.0`, kept until
    /// the device loop took that generation.
    retired: Vec<(u64, Vec<Arc<Link>>)>,
}

/// A K2K link out of an actor, as a device loop (or a [`LinkPort`]) sees
/// it.
pub(crate) struct OutLink {
    pub(crate) link: Arc<Link>,
    pub(crate) wake: CachedWake,
    /// Committed sends left in its outbox, as of the last push or flush.
    pub(crate) outbox: usize,
}

impl OutLink {
    /// The view of each of `links`.
    pub(crate) fn all(links: Vec<Arc<Link>>) -> Vec<OutLink> {
        links
            .into_iter()
            .map(|link| OutLink {
                outbox: link.outbox_len(),
                link,
                wake: CachedWake::default(),
            })
            .collect()
    }

    /// Moves what the outboxes hold into their rings, waking receivers;
    /// returns how many moved.
    pub(crate) fn flush_all(out: &mut [OutLink]) -> usize {
        let mut moved = 0;
        for o in out {
            if o.outbox > 0 {
                let left = o.link.flush(&mut o.wake);
                moved += o.outbox.saturating_sub(left);
                o.outbox = left;
            }
        }
        moved
    }

    /// Whether a waiting link's outbox is at capacity: take no new message.
    pub(crate) fn any_blocked(out: &[OutLink]) -> bool {
        out.iter()
            .any(|o| !o.link.report_failures && o.outbox >= o.link.capacity)
    }
}

impl fmt::Debug for LinkPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkPort")
            .field("inbound", &self.inbound.len())
            .field("outbound", &self.outbound.len())
            .finish_non_exhaustive()
    }
}

/// A link into the slot, as a batch taken from it names it.
#[derive(Clone, Debug)]
pub struct InboundLink(Arc<Link>);

impl InboundLink {
    /// The link.
    pub fn id(&self) -> LinkId {
        self.0.id
    }

    /// The origin word of the message at `pos`: what the control block's
    /// `serving` says while it is served, and the `seq` its routed sends
    /// carry (the poller holds them until the link's commit passes it).
    pub fn origin(&self, pos: u64) -> u64 {
        origin_of_link(self.0.id, pos)
    }

    /// Commits the message at `pos` for incarnation `epoch`; `false` once
    /// the host fenced the link for this incarnation (publish nothing more).
    pub fn commit(&self, epoch: u16, pos: u64) -> bool {
        self.0.control.commit(epoch, pos)
    }

    /// Frees the ring up to what was committed (the sender may be waiting
    /// for room).
    pub fn release_committed(&self) {
        self.0.release_committed();
    }
}

/// What [`LinkPort::take`] took from one link.
#[derive(Debug)]
pub struct LinkBatch {
    /// The link.
    pub link: InboundLink,
    /// The position of the first message given (messages the link had
    /// delivered before it).
    pub first: u64,
    /// Messages given, in order, from `first` on.
    pub count: usize,
    /// A malformed envelope that ended the batch. With `count == 0` and
    /// nothing of this link in flight, the slot faults
    /// ([`BadEnvelope`](crate::control::FaultCode::BadEnvelope)).
    pub bad: Option<DecodeError>,
}

/// Sends a message's handler made to linked actors, held until it commits
/// (see [`LinkPort::commit_with`]).
#[derive(Default)]
pub struct StagedSends(Vec<(Arc<Link>, Staged)>);

impl StagedSends {
    /// Whether none is staged.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many are staged.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Takes the first `n` (the sends of the first messages of a batch,
    /// committed one message at a time).
    pub fn split_front(&mut self, n: usize) -> StagedSends {
        let rest = self.0.split_off(n.min(self.0.len()));
        StagedSends(std::mem::replace(&mut self.0, rest))
    }
}

impl fmt::Debug for StagedSends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StagedSends").field(&self.0.len()).finish()
    }
}

impl LinkPort {
    pub(crate) fn new(
        home: Arc<crate::home::HomeCore>,
        poller: Arc<crate::runtime::PollerShared>,
        id: ActorId,
        served: Vec<u32>,
    ) -> Self {
        let mut port = LinkPort {
            home,
            poller,
            id,
            incarnation: id.incarnation(),
            served,
            generation: u64::MAX,
            inbound: Vec::new(),
            outbound: Vec::new(),
            cursor: 0,
            refused: 0,
            buf: Vec::new(),
            retired: Vec::new(),
        };
        port.refresh();
        port
    }

    /// Reloads the link lists if [`Runtime::connect`](crate::runtime::Runtime::connect)
    /// or a departure changed them; returns whether they changed. Batches
    /// and staged sends name their links, so this may run at any time.
    pub fn refresh(&mut self) -> bool {
        let generation = self.home.links_generation();
        if generation == self.generation {
            return false;
        }
        let (generation, inbound, outbound) = self.home.links();
        self.generation = generation;
        self.inbound = inbound;
        self.outbound = OutLink::all(outbound);
        true
    }

    /// For a device loop that serves links in place: reloads the link lists
    /// if they changed (or `table` never had them) and rewrites `table`;
    /// returns whether it did. The links dropped from the lists stay alive
    /// until the next call, so run it where the loop does not hold rows of
    /// an older table (c-host: on the loop's thread, between messages).
    ///
    /// `addr` gives the device's address of a host pointer into link memory
    /// (the identity where the device is the host). The links the table no
    /// longer lists are kept until the loop says (`seen`) it took a later
    /// generation, so rows it still holds never point at freed memory.
    pub fn fill_table(
        &mut self,
        table: &LinkTable,
        addr: impl Fn(*const u8) -> Option<u64>,
    ) -> bool {
        // Pairs with the loop's store-release of `seen` after its copy.
        let seen = table.seen.load(Ordering::Acquire);
        self.retired.retain(|(g, _)| *g > seen);
        let fresh = table.generation.load(Ordering::Relaxed) == 0;
        if !fresh && self.home.links_generation() == self.generation {
            return false;
        }
        let old: Vec<Arc<Link>> = self
            .inbound
            .iter()
            .cloned()
            .chain(self.outbound.iter().map(|o| o.link.clone()))
            .collect();
        self.refresh();
        let g = table.write(&self.inbound, &self.outbound, &addr);
        if !old.is_empty() {
            self.retired.push((g, old));
        }
        true
    }

    /// Wakes the receiver of outbound link `row` of the table (after the
    /// loop published into its ring).
    pub fn wake_outbound(&mut self, row: usize) {
        if let Some(o) = self.outbound.get_mut(row) {
            o.wake.wake(&o.link.receiver);
        }
    }

    /// Wakes the sender of inbound link `row` of the table (after the loop
    /// released slots of its ring: a sender with no room waits for them).
    pub fn wake_inbound_sender(&self, row: usize) {
        if let Some(home) = self.inbound.get(row).and_then(|l| l.sender_home.upgrade()) {
            home.waker.wake();
        }
    }

    /// Whether there is link work: changed lists, or a message waiting in a
    /// link into the slot (atomic loads only: for a loop's idle check).
    pub fn has_work(&self) -> bool {
        self.home.links_generation() != self.generation
            || self.inbound.iter().any(|l| l.has_inbound(self.incarnation))
    }

    /// Whether any actor links to the slot.
    pub fn has_inbound(&self) -> bool {
        !self.inbound.is_empty()
    }

    /// Whether the slot links to any actor (else every send is routed).
    pub fn has_outbound(&self) -> bool {
        !self.outbound.is_empty()
    }

    /// Whether committed sends wait in an outbox for room in their ring
    /// (retry [`LinkPort::flush`] after a while: a receiver does not wake
    /// its senders).
    pub fn outbox_waiting(&self) -> bool {
        self.outbound.iter().any(|o| o.outbox > 0)
    }

    /// Moves what the outboxes hold into their rings, waking receivers;
    /// returns how many moved.
    pub fn flush(&mut self) -> usize {
        OutLink::flush_all(&mut self.outbound)
    }

    /// Whether a waiting link's outbox is at capacity: the slot takes no
    /// new message (from H2K or a link) until it drains — backpressure
    /// along the graph. A loop held so should still beat its heartbeat.
    pub fn blocked(&self) -> bool {
        OutLink::any_blocked(&self.outbound)
    }

    /// Copies out the messages waiting in the next link into the slot that
    /// has any (round robin over the links), after the `in_flight(link)`
    /// taken from it already: each to `each` as (header, payload), until
    /// `max` or until `each` declines one (it is taken again next time).
    /// A message of a type the slot does not serve met first, with nothing
    /// of its link in flight, is committed here and reported as a dead
    /// letter ([`RouteFailure::Refused`](crate::home::RouteFailure::Refused)),
    /// as the cpu backend does. `None`: no link has anything.
    pub fn take(
        &mut self,
        max: usize,
        in_flight: impl Fn(LinkId) -> usize,
        mut each: impl FnMut(&EnvelopeHeader, &[u8]) -> bool,
    ) -> Option<LinkBatch> {
        let n = self.inbound.len();
        let mut buf = std::mem::take(&mut self.buf);
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let link = self.inbound[i].clone();
            if !link.has_inbound(self.incarnation) {
                continue;
            }
            let skip = in_flight(link.id);
            buf.clear();
            let Some((mut first, bad)) = link.take(self.incarnation, skip, max, &mut buf) else {
                continue;
            };
            let mut count = 0;
            for s in &buf {
                if self.served.binary_search(&s.header.type_id).is_err() {
                    if count == 0 && skip == 0 && link.control.commit(self.incarnation, first) {
                        first += 1;
                        self.refused += 1;
                        link.release_committed();
                        self.poller.dead_letter(crate::home::DeadLetter {
                            actor: self.id,
                            src: s.header.src,
                            seq: s.header.seq,
                            payload: crate::kernel::Payload::from_parts(
                                s.header.type_id,
                                s.payload(),
                            ),
                            reason: crate::home::DeadLetterReason::Unroutable(
                                crate::home::RouteFailure::Refused,
                            ),
                        });
                        continue;
                    }
                    break;
                }
                if !each(&s.header, s.payload()) {
                    break;
                }
                count += 1;
            }
            let bad = if count == buf.len() { bad } else { None };
            if count == 0 && bad.is_none() {
                continue;
            }
            self.cursor = (i + 1) % n;
            self.buf = buf;
            return Some(LinkBatch {
                link: InboundLink(link),
                first,
                count,
                bad,
            });
        }
        self.buf = buf;
        None
    }

    /// A send a handler of this slot made (not a reply). `None`: staged in
    /// `sends` for its link (a link to its destination serves its type).
    /// `Some(header)`: it takes the routed path, through K2H, with this
    /// header — marked [`UNDELIVERED`](crate::envelope::Flags::UNDELIVERED)
    /// when its link reports failures and has no room (the poller reports
    /// it as a dead letter once its message commits).
    pub fn stage(
        &self,
        header: EnvelopeHeader,
        payload: &[u8],
        sends: &mut StagedSends,
    ) -> Option<EnvelopeHeader> {
        let to = header.dst.with_incarnation(0);
        let Some(o) = self.outbound.iter().find(|o| o.link.to == to) else {
            return Some(header);
        };
        let link = &o.link;
        if link.receiver_gone() || link.served.binary_search(&header.type_id).is_err() {
            // Types the receiver does not serve take the routed path (where
            // the adapter refuses them as dead letters).
            return Some(header);
        }
        let staged_here = sends.0.iter().filter(|(l, _)| Arc::ptr_eq(l, link)).count();
        if !link.report_failures || link.in_ring() + o.outbox + staged_here < 2 * link.capacity {
            sends.0.push((link.clone(), Staged::new(header, payload)));
            return None;
        }
        let mut header = header;
        header.flags = header.flags.with(crate::envelope::Flags::UNDELIVERED);
        Some(header)
    }

    /// Drops sends whose message will never commit (the incarnation was
    /// fenced), counted as fenced writes.
    pub fn drop_fenced(&self, sends: &mut StagedSends) {
        if !sends.0.is_empty() {
            self.home.count_fenced(sends.0.len() as u64);
            sends.0.clear();
        }
    }

    /// Messages of types the slot does not serve that [`LinkPort::take`]
    /// committed and reported since the last call: the loop counts them as
    /// processed (as the cpu backend does).
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }

    /// Runs `commit` (the message's commit CAS) holding the producer ends
    /// of the links `sends` go on — so an incarnation started after a fence
    /// of this one cannot slip its sends in between — and, if it succeeds,
    /// pushes them to their links in the order they were made, waking the
    /// receivers. A failed commit (the host fenced the incarnation) drops
    /// them, counted as fenced writes. Returns `commit`'s result; `sends`
    /// is empty afterwards.
    pub fn commit_with(&mut self, sends: &mut StagedSends, commit: impl FnOnce() -> bool) -> bool {
        if sends.0.is_empty() {
            return commit();
        }
        let mut links: Vec<Arc<Link>> = Vec::new();
        for (l, _) in &sends.0 {
            if !links.iter().any(|x| Arc::ptr_eq(x, l)) {
                links.push(l.clone());
            }
        }
        // Taken in the outbound list's order, as the cpu loop takes them.
        links.sort_by_key(|l| l.id);
        let mut held: Vec<_> = links.iter().map(|l| l.lock_tx()).collect();
        if !commit() {
            self.home.count_fenced(sends.0.len() as u64);
            sends.0.clear();
            return false;
        }
        for (link, tx) in links.iter().zip(held.iter_mut()) {
            let mine = sends
                .0
                .iter()
                .filter(|(l, _)| Arc::ptr_eq(l, link))
                .map(|(_, s)| *s);
            let at = self
                .outbound
                .iter()
                .position(|o| Arc::ptr_eq(&o.link, link));
            let mut spare = CachedWake::default();
            let wake = match at {
                Some(i) => &mut self.outbound[i].wake,
                None => &mut spare,
            };
            match link.push(tx, mine, wake) {
                Ok(left) => {
                    if let Some(i) = at {
                        self.outbound[i].outbox = left;
                    }
                }
                Err(lost) => {
                    // The link closed meanwhile.
                    for s in lost {
                        self.poller.dead_letter(crate::home::DeadLetter {
                            actor: s.header.dst,
                            src: s.header.src,
                            seq: 0,
                            payload: crate::kernel::Payload::from_parts(
                                s.header.type_id,
                                s.payload(),
                            ),
                            reason: crate::home::DeadLetterReason::Terminated,
                        });
                    }
                }
            }
        }
        drop(held);
        sends.0.clear();
        true
    }
}

/// Moves the ring's head up to `consumed` (it lags the commit word by the
/// messages committed since the last batch).
fn release_to(rx: &mut Consumer, observer: &RingObserver, consumed: u64) {
    // A device loop serving the link moves the head itself.
    rx.resync();
    let head = observer.released();
    if consumed <= head {
        return;
    }
    let mut batch = rx.batch();
    for _ in head..consumed {
        if batch.try_pop_with(|_| ()).is_none() {
            break;
        }
    }
    batch.release();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_word_commits_fences_and_reopens_per_epoch() {
        let c = LinkControl::new(8);
        // Created fenced: nobody serves it yet.
        assert_eq!(c.commit_state(), (0, 0, true));
        assert!(!c.commit(0, 0));
        assert_eq!(c.reopen(2, 0), 0);
        assert!(c.commit(2, 0));
        assert!(c.commit(2, 1));
        // A stale epoch or position never commits.
        assert!(!c.commit(1, 2));
        assert!(!c.commit(2, 1));
        assert_eq!(c.commit_state(), (2, 2, false));
        // Fencing another epoch leaves the word alone.
        assert_eq!(c.fence_epoch(1), None);
        assert_eq!(c.fence_epoch(2), Some(2));
        assert!(!c.commit(2, 2), "a fenced word refuses the late commit");
        // The next incarnation starts past one handed-back message; the old
        // one's commit fails on the epoch even though the position matches.
        assert_eq!(c.reopen(3, 1), 3);
        assert!(!c.commit(2, 3));
        assert!(c.commit(3, 3));
        assert_eq!(c.fence(), 4);
        assert_eq!(c.commit_state(), (3, 4, true));
    }

    #[test]
    fn a_malformed_message_keeps_its_place_among_the_unconsumed() {
        let link = Link::new(
            LinkId(1),
            (ActorId::gpu(0, 1), ActorId::gpu(0, 2)),
            LinkOptions::default().capacity(8),
            Arc::new(SlotWaker::default()),
            std::sync::Weak::new(),
            vec![7],
            &|bytes| Ok(Arc::new(crate::region::HeapRegion::zeroed(bytes))),
        )
        .unwrap();
        {
            let mut tx = link.lock_tx();
            let good = |v: u8| (EnvelopeHeader::new(7, crate::envelope::Flags::empty()), [v]);
            let (h, p) = good(1);
            tx.producer.try_send_bytes(&h, &p).unwrap();
            // A slot of garbage (what a corrupted device write leaves).
            tx.producer.try_push_with(|slot| slot.fill(0xAB)).unwrap();
            let (h, p) = good(3);
            tx.producer.try_send_bytes(&h, &p).unwrap();
        }
        let (first, list) = link.unconsumed();
        assert_eq!(first, 0);
        assert_eq!(list.len(), 3, "the malformed one keeps its place");
        assert_eq!(
            (list[0].payload(), list[2].payload()),
            (&[1u8][..], &[3u8][..])
        );
        assert!(list[1].payload().is_empty());
        // Handing back the first two leaves the third first.
        link.hand_back(2);
        let (first, list) = link.unconsumed();
        assert_eq!((first, list.len()), (2, 1));
        assert_eq!(list[0].payload(), &[3u8][..]);
    }

    #[test]
    fn origins_round_trip_and_positions_compare_across_the_wrap() {
        let id = LinkId(0x12_3456);
        let o = origin_of_link(id, 0xAB_CDEF_0123);
        assert_eq!(link_of_origin(o), Some((id, 0xAB_CDEF_0123)));
        assert_eq!(link_of_origin(42), None);
        assert!(passed(5, 4));
        assert!(!passed(5, 5));
        assert!(!passed(0, 7));
        // Positions are 40 bits: consumed past the wrap has passed a
        // position just before it.
        let top = (1u64 << 40) - 1;
        assert!(passed(1 << 40, top));
        assert!(!passed(top, top));
    }
}
