//! The per-slot control block and the lifecycle state machine.
//!
//! ```text
//! Created ──► Launched ──► Active ◄──► Deactivated
//!                │           │              │
//!                └───────────┴──────┬───────┘
//!                                   ▼
//!                   Terminated   Faulted ──► Terminated
//! ```
//!
//! Any state but `Terminated` may go to `Terminated`; `Launched`, `Active`
//! and `Deactivated` may go to `Faulted`. A restart is not an edge: it starts
//! a new *incarnation* of the slot ([`ControlBlock::begin_incarnation`]),
//! whose lifecycle begins again at `Created`.
//!
//! The block is three 128-byte lines, one per writer, so the host's requests,
//! the device's acknowledgements and the doorbell never share a line:
//!
//! | line | writer | fields |
//! |---|---|---|
//! | 0 | host | magic, version, requested state, incarnation |
//! | 1 | device | acknowledged state and incarnation, fault code, heartbeat, processed count, fault detail, commit word (the host's one write here: the fence), the `seq` being served |
//! | 2 | sleeper (device) / read by wakers | the [`Doorbell`] |

use crate::doorbell::Doorbell;
use crate::error::StateError;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::fmt;

/// `"RKCB"` read as a little-endian `u32`.
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"RKCB");
/// The control block layout version.
pub const CONTROL_VERSION: u32 = 2;
/// The fence bit of the control block's commit word.
pub const COMMIT_FENCED: u64 = 1;
/// Size of [`ControlBlock`] in bytes.
pub const CONTROL_BLOCK_SIZE: usize = 384;

/// Where an actor slot is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum LifecycleState {
    /// Memory laid out, nothing running.
    Created = 0,
    /// The device loop serves the slot but has not been activated.
    Launched = 1,
    /// Serving messages.
    Active = 2,
    /// Alive, serving no messages; H2K fills up and is served on activation.
    Deactivated = 3,
    /// Stopped for good (this incarnation).
    Terminated = 4,
    /// Stopped by a fault (this incarnation); see the fault code.
    Faulted = 5,
}

impl LifecycleState {
    /// Every state, in code order.
    pub const ALL: [LifecycleState; 6] = [
        LifecycleState::Created,
        LifecycleState::Launched,
        LifecycleState::Active,
        LifecycleState::Deactivated,
        LifecycleState::Terminated,
        LifecycleState::Faulted,
    ];

    /// Reads a control word.
    ///
    /// # Errors
    /// [`StateError::UnknownState`] for a value that is no state.
    pub const fn from_u32(value: u32) -> Result<Self, StateError> {
        match value {
            0 => Ok(LifecycleState::Created),
            1 => Ok(LifecycleState::Launched),
            2 => Ok(LifecycleState::Active),
            3 => Ok(LifecycleState::Deactivated),
            4 => Ok(LifecycleState::Terminated),
            5 => Ok(LifecycleState::Faulted),
            _ => Err(StateError::UnknownState { value }),
        }
    }

    /// Whether `self → next` is an edge of the state machine.
    pub const fn can_become(self, next: LifecycleState) -> bool {
        use LifecycleState::*;
        matches!(
            (self, next),
            (Created, Launched)
                | (Launched, Active)
                | (Launched, Deactivated)
                | (Active, Deactivated)
                | (Deactivated, Active)
                | (
                    Created | Launched | Active | Deactivated | Faulted,
                    Terminated
                )
                | (Launched | Active | Deactivated, Faulted)
        )
    }

    /// `next` if `self → next` is allowed.
    ///
    /// # Errors
    /// [`StateError::InvalidTransition`].
    pub const fn transition(self, next: LifecycleState) -> Result<LifecycleState, StateError> {
        if self.can_become(next) {
            Ok(next)
        } else {
            Err(StateError::InvalidTransition {
                from: self,
                to: next,
            })
        }
    }

    /// Whether the incarnation is over (`Terminated` or `Faulted`).
    pub const fn is_final(self) -> bool {
        matches!(self, LifecycleState::Terminated | LifecycleState::Faulted)
    }
}

/// Why a slot faulted (the control block's fault code).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultCode {
    /// No fault.
    None,
    /// A cpu handler panicked.
    HandlerPanic,
    /// A device handler reported a fault (detail: the handler's code).
    HandlerFault,
    /// An inbound envelope failed validation (detail: which check).
    BadEnvelope,
    /// An inbound message type has no handler (detail: the type id).
    UnknownMessageType,
    /// The slot had pending work and made no progress past the watchdog limit.
    Watchdog,
    /// The device reported an error (sticky on CUDA: every slot of the device).
    DeviceError,
    /// The device loop exited without being asked to.
    UnexpectedExit,
    /// A code this build does not know.
    Other(u32),
}

impl FaultCode {
    /// The control-word value.
    pub const fn to_u32(self) -> u32 {
        match self {
            FaultCode::None => 0,
            FaultCode::HandlerPanic => 1,
            FaultCode::HandlerFault => 2,
            FaultCode::BadEnvelope => 3,
            FaultCode::UnknownMessageType => 4,
            FaultCode::Watchdog => 5,
            FaultCode::DeviceError => 6,
            FaultCode::UnexpectedExit => 7,
            FaultCode::Other(v) => v,
        }
    }

    /// Reads a control word (unknown values become [`FaultCode::Other`]).
    pub const fn from_u32(value: u32) -> Self {
        match value {
            0 => FaultCode::None,
            1 => FaultCode::HandlerPanic,
            2 => FaultCode::HandlerFault,
            3 => FaultCode::BadEnvelope,
            4 => FaultCode::UnknownMessageType,
            5 => FaultCode::Watchdog,
            6 => FaultCode::DeviceError,
            7 => FaultCode::UnexpectedExit,
            v => FaultCode::Other(v),
        }
    }
}

/// The control block of one actor slot. Mirrored as `rk_control_block` in
/// the C header; see the [module docs](self) for who writes what.
#[repr(C, align(128))]
pub struct ControlBlock {
    // Line 0: host-written.
    pub(crate) magic: u32,
    pub(crate) version: u32,
    pub(crate) requested_state: AtomicU32,
    pub(crate) incarnation: AtomicU32,
    _pad0: [u8; 112],
    // Line 1: device-written.
    pub(crate) acked_state: AtomicU32,
    pub(crate) acked_incarnation: AtomicU32,
    pub(crate) fault_code: AtomicU32,
    _reserved: u32,
    pub(crate) heartbeat: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) fault_detail: AtomicU64,
    /// The commit word: `last committed seq << 1 | fenced`. The device
    /// advances it with a CAS per message; the host fences it once with a
    /// `fetch_or` (the only host write on this line).
    pub(crate) commit: AtomicU64,
    /// `seq` of the message the device loop is running (or ran last).
    pub(crate) serving: AtomicU64,
    /// Its correlation id (0 for a tell).
    pub(crate) serving_correlation: AtomicU64,
    _pad1: [u8; 64],
    // Line 2: the doorbell.
    pub(crate) doorbell: Doorbell,
    _pad2: [u8; 124],
}

/// A snapshot of the device-written line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotStatus {
    /// The acknowledged state.
    pub state: LifecycleState,
    /// The incarnation the device is serving.
    pub incarnation: u32,
    /// Bumped by the device loop as it makes progress.
    pub heartbeat: u64,
    /// Messages processed by this incarnation.
    pub processed: u64,
    /// The fault code (meaningful when `state` is `Faulted`).
    pub fault: FaultCode,
    /// Fault detail (a type id, a handler's code, …).
    pub fault_detail: u64,
}

impl Default for ControlBlock {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlBlock {
    /// A block in state `Created`, incarnation 0.
    pub fn new() -> Self {
        ControlBlock {
            magic: CONTROL_MAGIC,
            version: CONTROL_VERSION,
            requested_state: AtomicU32::new(LifecycleState::Created as u32),
            incarnation: AtomicU32::new(0),
            _pad0: [0; 112],
            acked_state: AtomicU32::new(LifecycleState::Created as u32),
            acked_incarnation: AtomicU32::new(0),
            fault_code: AtomicU32::new(0),
            _reserved: 0,
            heartbeat: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            fault_detail: AtomicU64::new(0),
            commit: AtomicU64::new(0),
            serving: AtomicU64::new(0),
            serving_correlation: AtomicU64::new(0),
            _pad1: [0; 64],
            doorbell: Doorbell::new(),
            _pad2: [0; 124],
        }
    }

    /// Whether magic and version are this build's.
    pub fn is_valid(&self) -> bool {
        self.magic == CONTROL_MAGIC && self.version == CONTROL_VERSION
    }

    /// The slot's doorbell.
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    // ---- host side -------------------------------------------------------

    /// Host: asks the device to move to `next`, if the transition from the
    /// currently requested state is allowed. Ring the doorbell afterwards.
    ///
    /// # Errors
    /// [`StateError::InvalidTransition`]; a corrupt word is
    /// [`StateError::UnknownState`].
    pub fn request(&self, next: LifecycleState) -> Result<(), StateError> {
        // Only the host writes this word, but from more than one thread (the
        // slot's owner and its `SlotController`s): a compare-exchange, so
        // each transition is checked against the state it replaces (a
        // controller's `Active` must not overwrite a concurrent stop's
        // `Terminated`). Relaxed loads: the compare-exchange re-checks the
        // value read, and the device never writes this word.
        let mut raw = self.requested_state.load(Ordering::Relaxed);
        loop {
            let current = LifecycleState::from_u32(raw)?;
            if current != next {
                current.transition(next)?;
            }
            // Release pairs with the device's load-acquire of the requested
            // state (`requested_state()`; `ld.acquire.sys` on CUDA):
            // everything the host wrote before the request is visible when
            // the device acts on it.
            match self.requested_state.compare_exchange_weak(
                raw,
                next as u32,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => raw = actual,
            }
        }
    }

    /// Host: starts incarnation `incarnation`: resets both lines to
    /// `Created`. Allowed only while the device side is not running the slot
    /// (acknowledged `Created`, `Terminated` or `Faulted`); a late write from
    /// the old incarnation is recognised by its incarnation number.
    ///
    /// # Errors
    /// [`StateError::SlotBusy`] while the slot is launched.
    pub fn begin_incarnation(&self, incarnation: u32) -> Result<(), StateError> {
        let acked = self.acked_state()?;
        if !(acked == LifecycleState::Created || acked.is_final()) {
            return Err(StateError::SlotBusy { state: acked });
        }
        self.incarnation.store(incarnation, Ordering::Relaxed);
        self.fault_code.store(0, Ordering::Relaxed);
        self.fault_detail.store(0, Ordering::Relaxed);
        self.processed.store(0, Ordering::Relaxed);
        self.commit.store(0, Ordering::Relaxed);
        self.serving.store(0, Ordering::Relaxed);
        self.serving_correlation.store(0, Ordering::Relaxed);
        self.acked_state
            .store(LifecycleState::Created as u32, Ordering::Relaxed);
        // Publishes the reset above; pairs with the device's acquire of the
        // requested state when it launches the new incarnation.
        self.requested_state
            .store(LifecycleState::Created as u32, Ordering::Release);
        Ok(())
    }

    /// Host: fences the incarnation: from now on no commit of its device
    /// loop succeeds, so nothing it does afterwards can count as processed.
    /// Returns the sequence number of the last message it committed
    /// (messages with a greater `seq` were not processed). Idempotent.
    pub fn fence(&self) -> u64 {
        // AcqRel: the acquire half pairs with the device's release CAS in
        // `commit`, so every reply the device published before a commit we
        // observe is visible to the K2H drain that follows the fence.
        self.commit.fetch_or(COMMIT_FENCED, Ordering::AcqRel) >> 1
    }

    /// Whether the incarnation has been fenced.
    pub fn is_fenced(&self) -> bool {
        // Pairs with the `fetch_or` in `fence`; the device checks this
        // between messages and before publishing.
        self.commit.load(Ordering::Acquire) & COMMIT_FENCED != 0
    }

    /// The commit word in one read: (last committed `seq`, fenced).
    pub fn commit_state(&self) -> (u64, bool) {
        // Pairs with the device's release CAS in `commit`.
        let w = self.commit.load(Ordering::Acquire);
        (w >> 1, w & COMMIT_FENCED != 0)
    }

    /// The sequence number of the last committed message.
    pub fn committed(&self) -> u64 {
        self.commit.load(Ordering::Acquire) >> 1
    }

    /// `seq` of the message the device loop was running when it last said
    /// so: if it is above [`ControlBlock::committed`], that message was in
    /// a handler when the incarnation failed (it may be what killed it).
    pub fn serving(&self) -> u64 {
        // Pairs with the store-release in `begin_serving`; a host that
        // reads it after acquiring `Faulted` or fencing sees the device's
        // last store before those.
        self.serving.load(Ordering::Acquire)
    }

    /// The correlation id of the message [`ControlBlock::serving`] names (0
    /// for a tell). Consistent with it once the device has stopped
    /// (acknowledged `Faulted`).
    pub fn serving_correlation(&self) -> u64 {
        self.serving_correlation.load(Ordering::Relaxed)
    }

    /// The incarnation the host wants served.
    pub fn incarnation(&self) -> u32 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// The device-written line, read as one snapshot (fields are read with
    /// acquire loads, state last-written-first so the fault code a `Faulted`
    /// state refers to is visible).
    ///
    /// # Errors
    /// [`StateError::UnknownState`] for a corrupt state word.
    pub fn status(&self) -> Result<SlotStatus, StateError> {
        // Acquire pairs with the device's store-release of the state in
        // `ack`/`report_fault`, which follows its writes of code and detail.
        let state = self.acked_state()?;
        Ok(SlotStatus {
            state,
            incarnation: self.acked_incarnation.load(Ordering::Acquire),
            heartbeat: self.heartbeat.load(Ordering::Acquire),
            processed: self.processed.load(Ordering::Acquire),
            fault: FaultCode::from_u32(self.fault_code.load(Ordering::Relaxed)),
            fault_detail: self.fault_detail.load(Ordering::Relaxed),
        })
    }

    /// The acknowledged state.
    ///
    /// # Errors
    /// [`StateError::UnknownState`] for a corrupt word.
    pub fn acked_state(&self) -> Result<LifecycleState, StateError> {
        LifecycleState::from_u32(self.acked_state.load(Ordering::Acquire))
    }

    // ---- device side -----------------------------------------------------

    /// Device: the state the host requests.
    ///
    /// # Errors
    /// [`StateError::UnknownState`] for a corrupt word.
    pub fn requested_state(&self) -> Result<LifecycleState, StateError> {
        // Pairs with the store-release in `request`.
        LifecycleState::from_u32(self.requested_state.load(Ordering::Acquire))
    }

    /// Device: acknowledges `state` for `incarnation`.
    pub fn ack(&self, state: LifecycleState, incarnation: u32) {
        self.acked_incarnation.store(incarnation, Ordering::Relaxed);
        // Pairs with the host's load-acquire in `acked_state`/`status`.
        self.acked_state.store(state as u32, Ordering::Release);
    }

    /// Device: records progress (single writer: the device loop keeps the
    /// counters and stores them; no read-modify-write on the hot path).
    pub fn record_progress(&self, heartbeat: u64, processed: u64) {
        self.processed.store(processed, Ordering::Relaxed);
        // Pairs with the host's acquire in `status`; the watchdog compares
        // successive heartbeats.
        self.heartbeat.store(heartbeat, Ordering::Release);
    }

    /// Device: commits the message with sequence number `seq` (its replies
    /// are already published), after `prev`, the last one it committed.
    /// Fails — and the message does not count as processed — when the host
    /// has fenced the incarnation.
    pub fn commit(&self, prev: u64, seq: u64) -> bool {
        // Release: publishes the replies (and K2H tail) written before;
        // pairs with the host's AcqRel `fetch_or` in `fence`. Only the
        // device advances the word, so `prev` is exact unless fenced.
        self.commit
            .compare_exchange(prev << 1, seq << 1, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    /// Device: the loop starts running the message `seq` (an ask's
    /// correlation id, or 0).
    pub fn begin_serving(&self, seq: u64, correlation: u64) {
        self.serving_correlation
            .store(correlation, Ordering::Relaxed);
        // Publishes the correlation with it; pairs with the host's
        // load-acquire in `serving` (and with its acquire of `Faulted`).
        self.serving.store(seq, Ordering::Release);
    }

    /// Device: reports a fault and acknowledges `Faulted` for `incarnation`.
    pub fn report_fault(&self, code: FaultCode, detail: u64, incarnation: u32) {
        self.fault_detail.store(detail, Ordering::Relaxed);
        self.fault_code.store(code.to_u32(), Ordering::Relaxed);
        // The state store-release in `ack` publishes code and detail.
        self.ack(LifecycleState::Faulted, incarnation);
    }
}

impl fmt::Debug for ControlBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlBlock")
            .field("requested", &self.requested_state())
            .field("incarnation", &self.incarnation())
            .field("status", &self.status())
            .field("doorbell", &self.doorbell)
            .finish()
    }
}

/// A shared handle to a [`ControlBlock`]: in its own heap allocation
/// ([`ControlRef::new`]) or laid in a [`SharedMemory`](crate::region::SharedMemory) region a device
/// sees too ([`ControlRef::init_in`]). Dereferences to the block; clones
/// share it, and the memory lives as long as any clone.
#[derive(Clone)]
pub struct ControlRef {
    ptr: std::ptr::NonNull<ControlBlock>,
    _owner: ControlOwner,
}

#[derive(Clone)]
enum ControlOwner {
    Heap(#[allow(dead_code, reason = "keeps the block alive")] std::sync::Arc<ControlBlock>),
    #[cfg(not(ringkernel_loom))]
    Region(
        #[allow(dead_code, reason = "keeps the region alive")]
        std::sync::Arc<dyn crate::region::SharedMemory>,
    ),
}

// SAFETY: the pointer is valid for as long as the owner lives (each clone
// holds it); ControlBlock is Sync (atomics only) and the owner is Send.
unsafe impl Send for ControlRef {}
// SAFETY: as for Send; `&ControlRef` only gives `&ControlBlock`.
unsafe impl Sync for ControlRef {}

impl ControlRef {
    /// A fresh block (state `Created`, incarnation 0) on the heap.
    pub fn new() -> Self {
        let block = std::sync::Arc::new(ControlBlock::new());
        ControlRef {
            ptr: std::ptr::NonNull::from(&*block),
            _owner: ControlOwner::Heap(block),
        }
    }

    /// Lays a fresh block at `offset` in `mem`.
    ///
    /// # Errors
    /// [`LayoutError::RegionTooSmall`](crate::LayoutError) or
    /// [`LayoutError::Misaligned`](crate::LayoutError) (offsets are
    /// multiples of 128).
    ///
    /// # Safety
    /// `mem[offset..offset + CONTROL_BLOCK_SIZE]` is used by nothing but this
    /// block (and its device-side peer) for as long as `mem` lives.
    #[cfg(not(ringkernel_loom))]
    pub unsafe fn init_in(
        mem: std::sync::Arc<dyn crate::region::SharedMemory>,
        offset: usize,
    ) -> Result<Self, crate::LayoutError> {
        let base = crate::region::check_span(
            &*mem,
            offset,
            CONTROL_BLOCK_SIZE,
            crate::region::REGION_ALIGN,
        )?;
        let ptr = base.cast::<ControlBlock>();
        // SAFETY: the span is in bounds and aligned for ControlBlock
        // (checked), and by the caller's contract no one else uses it.
        unsafe { ptr.as_ptr().write(ControlBlock::new()) };
        Ok(ControlRef {
            ptr,
            _owner: ControlOwner::Region(mem),
        })
    }

    /// Whether two handles are the same block.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.ptr == b.ptr
    }

    /// The block's address (for a device peer: `rk_control_block*`).
    pub fn as_ptr(&self) -> *const ControlBlock {
        self.ptr.as_ptr()
    }
}

impl Default for ControlRef {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for ControlRef {
    type Target = ControlBlock;

    fn deref(&self) -> &ControlBlock {
        // SAFETY: valid while the owner lives, which `self` keeps alive.
        unsafe { self.ptr.as_ref() }
    }
}

impl fmt::Debug for ControlRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(all(test, not(ringkernel_loom)))]
mod tests {
    use super::*;
    use LifecycleState::*;

    #[test]
    fn transitions_follow_the_diagram() {
        let allowed = [
            (Created, Launched),
            (Launched, Active),
            (Launched, Deactivated),
            (Active, Deactivated),
            (Deactivated, Active),
            (Created, Terminated),
            (Launched, Terminated),
            (Active, Terminated),
            (Deactivated, Terminated),
            (Faulted, Terminated),
            (Launched, Faulted),
            (Active, Faulted),
            (Deactivated, Faulted),
        ];
        for from in LifecycleState::ALL {
            for to in LifecycleState::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        assert_eq!(
            Terminated.transition(Active),
            Err(StateError::InvalidTransition {
                from: Terminated,
                to: Active
            })
        );
    }

    #[test]
    fn state_words_round_trip_and_unknown_is_an_error() {
        for s in LifecycleState::ALL {
            assert_eq!(LifecycleState::from_u32(s as u32), Ok(s));
        }
        assert_eq!(
            LifecycleState::from_u32(6),
            Err(StateError::UnknownState { value: 6 })
        );
        for v in 0..10 {
            assert_eq!(FaultCode::from_u32(v).to_u32(), v);
        }
    }

    #[test]
    fn host_requests_and_device_acks() {
        let cb = ControlBlock::new();
        assert!(cb.is_valid());
        assert_eq!(
            cb.request(Active),
            Err(StateError::InvalidTransition {
                from: Created,
                to: Active
            })
        );
        cb.request(Launched).unwrap();
        cb.request(Active).unwrap();
        assert_eq!(cb.requested_state(), Ok(Active));
        cb.ack(Active, 0);
        cb.record_progress(3, 2);
        let st = cb.status().unwrap();
        assert_eq!((st.state, st.heartbeat, st.processed), (Active, 3, 2));
        // A running slot cannot start a new incarnation.
        assert_eq!(
            cb.begin_incarnation(1),
            Err(StateError::SlotBusy { state: Active })
        );
        cb.report_fault(FaultCode::HandlerPanic, 42, 0);
        let st = cb.status().unwrap();
        assert_eq!(
            (st.state, st.fault, st.fault_detail),
            (Faulted, FaultCode::HandlerPanic, 42)
        );
        cb.begin_incarnation(1).unwrap();
        let st = cb.status().unwrap();
        assert_eq!(
            (st.state, st.fault, st.processed),
            (Created, FaultCode::None, 0)
        );
        assert_eq!(cb.incarnation(), 1);
        cb.request(Launched).unwrap();
    }

    #[test]
    fn corrupt_state_words_are_errors_not_panics() {
        let cb = ControlBlock::new();
        cb.acked_state.store(99, Ordering::Relaxed);
        assert_eq!(cb.status(), Err(StateError::UnknownState { value: 99 }));
        cb.requested_state.store(77, Ordering::Relaxed);
        assert_eq!(
            cb.request(Launched),
            Err(StateError::UnknownState { value: 77 })
        );
    }
}
