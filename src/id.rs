//! Identifiers that travel in envelope headers: actor ids, correlation ids
//! and clock domains. Each is a `#[repr(transparent)]` integer so it is the
//! same bytes in Rust, C and WGSL.

use bytemuck::{Pod, Zeroable};
use std::fmt;

/// What kind of actor an [`ActorId`] names.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActorKind {
    /// An ordinary actor running on the host (actix, ractor, kameo).
    Cpu,
    /// A GPU actor: one actor slot of a kernel.
    Gpu,
}

impl ActorKind {
    const fn code(self) -> u64 {
        match self {
            ActorKind::Cpu => 1,
            ActorKind::Gpu => 2,
        }
    }
}

/// One address space for CPU and GPU actors.
///
/// Bits, most significant first: node (16) · kind (8) · index (24) ·
/// incarnation (16). The all-zero id, [`ActorId::NONE`], names no actor (an
/// anonymous host sender). The incarnation distinguishes restarts of one
/// slot; it wraps after 65 536 restarts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Pod, Zeroable)]
#[repr(transparent)]
pub struct ActorId(u64);

impl ActorId {
    /// No actor.
    pub const NONE: ActorId = ActorId(0);
    /// The largest actor index (24 bits).
    pub const MAX_INDEX: u32 = (1 << 24) - 1;

    /// Builds an id; `index` is truncated to its 24 bits.
    pub const fn new(node: u16, kind: ActorKind, index: u32, incarnation: u16) -> Self {
        ActorId(
            (node as u64) << 48
                | kind.code() << 40
                | ((index & Self::MAX_INDEX) as u64) << 16
                | incarnation as u64,
        )
    }

    /// A GPU actor's id on `node`, incarnation 0.
    pub const fn gpu(node: u16, index: u32) -> Self {
        Self::new(node, ActorKind::Gpu, index, 0)
    }

    /// A CPU actor's id on `node`, incarnation 0.
    pub const fn cpu(node: u16, index: u32) -> Self {
        Self::new(node, ActorKind::Cpu, index, 0)
    }

    /// The raw word, as it travels.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// Reads a raw word. Any word is accepted; [`ActorId::kind`] tells whether
    /// it names an actor.
    pub const fn from_bits(bits: u64) -> Self {
        ActorId(bits)
    }

    /// The node the actor lives on.
    pub const fn node(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// CPU or GPU; `None` for [`ActorId::NONE`] or an undefined kind code.
    pub const fn kind(self) -> Option<ActorKind> {
        match (self.0 >> 40) & 0xFF {
            1 => Some(ActorKind::Cpu),
            2 => Some(ActorKind::Gpu),
            _ => None,
        }
    }

    /// The actor's index on its node (for a GPU actor: its slot).
    pub const fn index(self) -> u32 {
        ((self.0 >> 16) & Self::MAX_INDEX as u64) as u32
    }

    /// The incarnation of the slot this id was issued for.
    pub const fn incarnation(self) -> u16 {
        self.0 as u16
    }

    /// The same actor in another incarnation.
    pub const fn with_incarnation(self, incarnation: u16) -> Self {
        ActorId(self.0 & !0xFFFF | incarnation as u64)
    }
}

impl fmt::Debug for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            None if self.0 == 0 => f.write_str("ActorId(NONE)"),
            None => write!(f, "ActorId({:#018x})", self.0),
            Some(kind) => write!(
                f,
                "ActorId({:?} {}:{}#{})",
                kind,
                self.node(),
                self.index(),
                self.incarnation()
            ),
        }
    }
}

/// Matches a reply to the waiter that asked: (incarnation, generation, index)
/// of a slot in the [`crate::waiter::WaiterSlab`].
///
/// Bits, most significant first: incarnation (16) · generation (32) · index
/// (16). Generations start at 1, so a live id is never 0; 0 is
/// [`CorrelationId::NONE`], carried by tells.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Pod, Zeroable)]
#[repr(transparent)]
pub struct CorrelationId(u64);

impl CorrelationId {
    /// No waiter: the envelope is a tell.
    pub const NONE: CorrelationId = CorrelationId(0);

    /// Builds an id from its parts.
    pub const fn new(incarnation: u16, generation: u32, index: u16) -> Self {
        CorrelationId((incarnation as u64) << 48 | (generation as u64) << 16 | index as u64)
    }

    /// The raw word, as it travels.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// Reads a raw word (validated only when it is looked up).
    pub const fn from_bits(bits: u64) -> Self {
        CorrelationId(bits)
    }

    /// The incarnation of the waiter slab that issued it.
    pub const fn incarnation(self) -> u16 {
        (self.0 >> 48) as u16
    }

    /// The reuse generation of the waiter slot.
    pub const fn generation(self) -> u32 {
        (self.0 >> 16) as u32
    }

    /// The waiter slot.
    pub const fn index(self) -> u16 {
        self.0 as u16
    }

    /// Whether this is [`CorrelationId::NONE`].
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            f.write_str("CorrelationId(NONE)")
        } else {
            write!(
                f,
                "CorrelationId(inc {} gen {} idx {})",
                self.incarnation(),
                self.generation(),
                self.index()
            )
        }
    }
}

/// A clock domain: who stamped an HLC word. Distinguishes node *and* unit
/// (the host and each kernel of one node are different domains), and breaks
/// ties between equal HLC words into a total order.
///
/// Bits: node (16, high) · unit (16, low); unit 0 is the node's host.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug, Pod, Zeroable)]
#[repr(transparent)]
pub struct ClockDomain(u32);

impl ClockDomain {
    /// The host of `node`.
    pub const fn host(node: u16) -> Self {
        ClockDomain((node as u32) << 16)
    }

    /// Unit `unit` (1-based: 0 is the host) of `node`, e.g. one kernel.
    pub const fn unit(node: u16, unit: u16) -> Self {
        ClockDomain((node as u32) << 16 | unit as u32)
    }

    /// The raw word, as it travels.
    pub const fn to_bits(self) -> u32 {
        self.0
    }

    /// Reads a raw word.
    pub const fn from_bits(bits: u32) -> Self {
        ClockDomain(bits)
    }

    /// The node part.
    pub const fn node(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The unit part (0 = host).
    pub const fn unit_index(self) -> u16 {
        self.0 as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_id_fields_round_trip() {
        let id = ActorId::new(0xBEEF, ActorKind::Gpu, 0x00AB_CDEF, 0x1234);
        assert_eq!(id.node(), 0xBEEF);
        assert_eq!(id.kind(), Some(ActorKind::Gpu));
        assert_eq!(id.index(), 0x00AB_CDEF);
        assert_eq!(id.incarnation(), 0x1234);
        assert_eq!(ActorId::from_bits(id.to_bits()), id);
        let next = id.with_incarnation(7);
        assert_eq!((next.index(), next.incarnation()), (id.index(), 7));
        assert_eq!(ActorId::NONE.kind(), None);
        // An index wider than 24 bits is truncated, never spilling into the kind.
        assert_eq!(ActorId::cpu(1, u32::MAX).kind(), Some(ActorKind::Cpu));
    }

    #[test]
    fn correlation_id_fields_round_trip() {
        let c = CorrelationId::new(3, 0xDEAD_BEEF, 65_535);
        assert_eq!(
            (c.incarnation(), c.generation(), c.index()),
            (3, 0xDEAD_BEEF, 65_535)
        );
        assert!(!c.is_none());
        assert!(CorrelationId::NONE.is_none());
    }

    #[test]
    fn clock_domains_order_by_node_then_unit() {
        assert!(ClockDomain::host(1) < ClockDomain::unit(1, 1));
        assert!(ClockDomain::unit(1, 9) < ClockDomain::host(2));
        assert_eq!(ClockDomain::unit(4, 2).node(), 4);
        assert_eq!(ClockDomain::unit(4, 2).unit_index(), 2);
    }
}
