//! Typed errors of the protocol core.
//!
//! Every enum is `#[non_exhaustive]`: a new way to fail is a new variant, and
//! callers match the ones they can act on. Errors of operations that were
//! given a value (a push, a waiter insert) hand the value back; those live
//! beside their operation ([`crate::ring::SendError`],
//! [`crate::waiter::SlabFull`]).

use thiserror::Error;

/// A ring geometry, a waiter slab size or a memory region that cannot be used.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// Ring capacities are powers of two, so an index is `counter & (capacity - 1)`.
    #[error("ring capacity {capacity} is not a power of two")]
    CapacityNotPowerOfTwo {
        /// The capacity asked for.
        capacity: u32,
    },
    /// The capacity is a power of two but outside the supported range.
    #[error("ring capacity {capacity} is outside {min}..={max}")]
    CapacityOutOfRange {
        /// The capacity asked for.
        capacity: u32,
        /// Smallest supported capacity.
        min: u32,
        /// Largest supported capacity.
        max: u32,
    },
    /// Slot sizes are multiples of 64 bytes within a bounded range.
    #[error("slot size {slot_size} is not a multiple of 64 in {min}..={max}")]
    BadSlotSize {
        /// The slot size asked for.
        slot_size: u32,
        /// Smallest supported slot size.
        min: u32,
        /// Largest supported slot size.
        max: u32,
    },
    /// The memory region is smaller than the layout needs.
    #[error("region of {len} bytes is too small: {needed} bytes needed")]
    RegionTooSmall {
        /// Bytes available from the requested offset on.
        len: usize,
        /// Bytes the layout needs.
        needed: usize,
    },
    /// The memory region (at the requested offset) is not aligned as the layout needs.
    #[error("region address {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// The address that was given.
        addr: usize,
        /// The alignment the layout needs.
        align: usize,
    },
    /// Attaching to memory that does not hold an initialised ring.
    #[error("ring header magic is {found:#010x}, expected {expected:#010x}")]
    BadRingMagic {
        /// The magic word found.
        found: u32,
        /// The magic word of a ring header.
        expected: u32,
    },
    /// Attaching to a ring written by another protocol version.
    #[error("ring header version is {found}, this build speaks {expected}")]
    BadRingVersion {
        /// The version found.
        found: u32,
        /// The version this build writes.
        expected: u32,
    },
    /// A waiter slab's capacity is outside the range correlation ids can address.
    #[error("waiter slab capacity {capacity} is outside 1..={max}")]
    SlabCapacity {
        /// The capacity asked for.
        capacity: usize,
        /// The largest capacity a correlation id can index.
        max: usize,
    },
}

/// An envelope header (or payload) that failed validation.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than an envelope header.
    #[error("{len} bytes is shorter than the 64-byte envelope header")]
    Truncated {
        /// Bytes that were given.
        len: usize,
    },
    /// The magic number is wrong: not an envelope, or corrupted.
    #[error("envelope magic is {found:#06x}, expected {expected:#06x}")]
    BadMagic {
        /// The magic found.
        found: u16,
        /// The envelope magic.
        expected: u16,
    },
    /// The envelope was written by another protocol version.
    #[error("envelope version is {found}, this build speaks {expected}")]
    BadVersion {
        /// The version found.
        found: u8,
        /// The version this build writes.
        expected: u8,
    },
    /// Flag bits that no version of the protocol defines are set.
    #[error("envelope flags {flags:#04x} set undefined bits {unknown:#04x}")]
    UnknownFlags {
        /// The whole flags byte.
        flags: u8,
        /// The undefined bits among them.
        unknown: u8,
    },
    /// The payload length exceeds what the slot (or the configured limit) holds.
    #[error("payload length {len} exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload length in the header.
        len: u32,
        /// The largest payload allowed here.
        max: u32,
    },
    /// The message type id is not one the receiver serves (or is the reserved 0).
    #[error("message type id {type_id:#x} is not served here")]
    UnknownType {
        /// The type id in the header.
        type_id: u32,
    },
    /// The payload does not have the size of the type it is read as.
    #[error("payload is {found} bytes, the type read from it has {expected}")]
    PayloadSize {
        /// `size_of` the requested type.
        expected: usize,
        /// The payload length in the header.
        found: u32,
    },
    /// The payload is encoded differently from how it is being read
    /// (an rkyv archive read as `Pod`, or the reverse).
    #[error("payload encoding mismatch: the header says rkyv={archived}")]
    PayloadEncoding {
        /// Whether the header's `ARCHIVED` flag is set.
        archived: bool,
    },
    /// An rkyv archive failed validation.
    #[error("archived payload is invalid: {reason}")]
    Archive {
        /// What the validator reported.
        reason: String,
    },
}

/// A value that could not be encoded into an envelope.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The payload does not fit (an inline slot, or the network payload limit).
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Bytes the payload needs.
        len: usize,
        /// Bytes available.
        max: usize,
    },
    /// The destination buffer cannot even hold the header.
    #[error("buffer of {len} bytes is shorter than the 64-byte envelope header")]
    BufferTooSmall {
        /// Bytes available.
        len: usize,
    },
    /// rkyv failed to serialise the value.
    #[error("archiving the payload failed: {reason}")]
    Archive {
        /// What the serialiser reported.
        reason: String,
    },
}

/// A clock stamp that cannot be merged.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HlcError {
    /// A network stamp lies further ahead of local physical time than the
    /// configured bound (only network boundaries check this).
    #[error(
        "stamp {stamp:#x} is {ahead_ns} ns ahead of physical time, beyond the {max_drift_ns} ns bound"
    )]
    DriftExceeded {
        /// The stamp that was received.
        stamp: u64,
        /// How far ahead of local physical time it is, in ns.
        ahead_ns: u64,
        /// The configured bound, in ns.
        max_drift_ns: u64,
    },
}

/// A lifecycle word or transition that the state machine does not allow.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    /// A control word holds a value that is no lifecycle state.
    #[error("{value} is not a lifecycle state")]
    UnknownState {
        /// The raw value.
        value: u32,
    },
    /// The transition is not an edge of the lifecycle state machine.
    #[error("lifecycle transition {from:?} -> {to:?} is not allowed")]
    InvalidTransition {
        /// The current state.
        from: crate::control::LifecycleState,
        /// The state asked for.
        to: crate::control::LifecycleState,
    },
    /// A new incarnation may only start from a slot that is not running.
    #[error("a new incarnation cannot start while the slot is {state:?}")]
    SlotBusy {
        /// The acknowledged state of the slot.
        state: crate::control::LifecycleState,
    },
}
