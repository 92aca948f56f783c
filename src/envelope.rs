//! The envelope: a fixed 64-byte header followed by its payload — the same
//! bytes on every backend and over the network.
//!
//! | offset | size | field | meaning |
//! |---:|---:|---|---|
//! | 0 | 2 | `magic` | [`ENVELOPE_MAGIC`] (`"RK"`) |
//! | 2 | 1 | `version` | [`PROTOCOL_VERSION`] |
//! | 3 | 1 | `flags` | [`Flags`] |
//! | 4 | 4 | `type_id` | message type id; 0 is never valid |
//! | 8 | 4 | `payload_len` | payload bytes after the header |
//! | 12 | 4 | `clock_domain` | [`ClockDomain`] that stamped `hlc` |
//! | 16 | 8 | `correlation` | [`CorrelationId`]; 0 for a tell |
//! | 24 | 8 | `src` | sending [`ActorId`] |
//! | 32 | 8 | `dst` | receiving [`ActorId`] |
//! | 40 | 8 | `hlc` | HLC word (see [`crate::hlc`]) |
//! | 48 | 8 | `seq` | per-(sender, receiver) sequence number |
//! | 56 | 8 | `trace_id` | tracing id, 0 when untraced |
//!
//! Payloads are `Pod` values copied inline after the header (no allocation
//! per message), or — for variable-size host/network messages, with the
//! `rkyv` feature — validated rkyv archives in an `OwnedEnvelope`.
//!
//! Both sides validate every header they read ([`EnvelopeHeader::decode`]):
//! a bad one is a typed [`DecodeError`], never a panic or an out-of-bounds read.

use crate::error::{DecodeError, EncodeError};
use crate::id::{ActorId, ClockDomain, CorrelationId};
use bytemuck::{Pod, Zeroable};
use std::fmt;

/// `"RK"` read as a little-endian `u16`.
pub const ENVELOPE_MAGIC: u16 = u16::from_le_bytes(*b"RK");
/// The protocol version this build writes and accepts.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of [`EnvelopeHeader`] in bytes.
pub const HEADER_SIZE: usize = 64;
/// Message type ids at or above this are the runtime's own (replies with
/// errors, fault reports); user kernels use ids in `1..SYSTEM_TYPE_BASE`.
pub const SYSTEM_TYPE_BASE: u32 = 0xFFFF_0000;

/// Envelope flag bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Pod, Zeroable)]
#[repr(transparent)]
pub struct Flags(u8);

impl Flags {
    /// The sender waits for a reply to `correlation`.
    pub const ASK: Flags = Flags(1 << 0);
    /// A reply to `correlation`.
    pub const REPLY: Flags = Flags(1 << 1);
    /// A reply that carries an error instead of a value.
    pub const ERROR: Flags = Flags(1 << 2);
    /// The payload is an rkyv archive rather than an inline `Pod` value.
    pub const ARCHIVED: Flags = Flags(1 << 3);
    /// A fault report from a device slot.
    pub const FAULT: Flags = Flags(1 << 4);
    /// K2H only: a send the device could not deliver (its K2K link was
    /// full and reports failures); the poller reports it as a dead letter
    /// once the message that sent it commits.
    pub const UNDELIVERED: Flags = Flags(1 << 5);
    /// Every bit this protocol version defines.
    pub const ALL: Flags = Flags(0x3F);

    /// No flag set.
    pub const fn empty() -> Self {
        Flags(0)
    }

    /// The raw byte.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Reads a raw byte, `None` if it sets undefined bits.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits & !Self::ALL.0 == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the bits of `other` set.
    pub const fn with(self, other: Flags) -> Self {
        Flags(self.0 | other.0)
    }

    /// `self` with the bits of `other` cleared.
    pub const fn without(self, other: Flags) -> Self {
        Flags(self.0 & !other.0)
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        self.with(rhs)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 6] = ["ASK", "REPLY", "ERROR", "ARCHIVED", "FAULT", "UNDELIVERED"];
        let mut set = f.debug_set();
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                set.entry(&format_args!("{name}"));
            }
        }
        if self.0 & !Self::ALL.0 != 0 {
            set.entry(&format_args!("{:#x}", self.0 & !Self::ALL.0));
        }
        set.finish()
    }
}

/// The 64-byte envelope header. See the [module docs](self) for the layout.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Pod, Zeroable)]
#[repr(C, align(8))]
pub struct EnvelopeHeader {
    /// [`ENVELOPE_MAGIC`].
    pub magic: u16,
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// [`Flags`].
    pub flags: Flags,
    /// Message type id (0 is never valid).
    pub type_id: u32,
    /// Payload bytes following the header.
    pub payload_len: u32,
    /// The clock domain that stamped `hlc`.
    pub clock_domain: ClockDomain,
    /// The waiter a reply belongs to; [`CorrelationId::NONE`] for a tell.
    pub correlation: CorrelationId,
    /// The sender.
    pub src: ActorId,
    /// The receiver.
    pub dst: ActorId,
    /// HLC word of the send.
    pub hlc: u64,
    /// Sequence number per (sender, receiver).
    pub seq: u64,
    /// Tracing id; 0 when untraced.
    pub trace_id: u64,
}

const _: () = assert!(std::mem::size_of::<EnvelopeHeader>() == HEADER_SIZE);

/// Which message type ids a receiver accepts.
#[derive(Clone, Copy)]
pub enum TypeFilter<'a> {
    /// Every non-zero type id.
    Any,
    /// Exactly these ids.
    Only(&'a [u32]),
    /// Ids for which the function returns `true` (0 is still rejected).
    With(&'a (dyn Fn(u32) -> bool + Sync)),
}

impl fmt::Debug for TypeFilter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypeFilter::Any => f.write_str("Any"),
            TypeFilter::Only(ids) => f.debug_tuple("Only").field(ids).finish(),
            TypeFilter::With(_) => f.write_str("With(..)"),
        }
    }
}

/// What a receiver checks in every header it reads.
#[derive(Clone, Copy, Debug)]
pub struct HeaderCheck<'a> {
    /// The largest payload accepted (inline decoding also caps it at the slot).
    pub max_payload: u32,
    /// The message types served.
    pub types: TypeFilter<'a>,
}

impl<'a> HeaderCheck<'a> {
    /// Accepts every non-zero type id with payloads up to `max_payload` bytes.
    pub const fn any_type(max_payload: u32) -> Self {
        HeaderCheck {
            max_payload,
            types: TypeFilter::Any,
        }
    }

    /// Accepts only `types`, with payloads up to `max_payload` bytes.
    pub const fn only(max_payload: u32, types: &'a [u32]) -> Self {
        HeaderCheck {
            max_payload,
            types: TypeFilter::Only(types),
        }
    }

    #[inline]
    fn accepts_type(&self, type_id: u32) -> bool {
        type_id != 0
            && match self.types {
                TypeFilter::Any => true,
                TypeFilter::Only(ids) => ids.contains(&type_id),
                TypeFilter::With(f) => f(type_id),
            }
    }
}

impl EnvelopeHeader {
    /// A header with magic and version set, the given type and flags, and
    /// every other field zero (fill them with the `with_*` methods).
    pub const fn new(type_id: u32, flags: Flags) -> Self {
        EnvelopeHeader {
            magic: ENVELOPE_MAGIC,
            version: PROTOCOL_VERSION,
            flags,
            type_id,
            payload_len: 0,
            clock_domain: ClockDomain::from_bits(0),
            correlation: CorrelationId::NONE,
            src: ActorId::NONE,
            dst: ActorId::NONE,
            hlc: 0,
            seq: 0,
            trace_id: 0,
        }
    }

    /// Sets the sender.
    pub const fn with_src(mut self, src: ActorId) -> Self {
        self.src = src;
        self
    }

    /// Sets the receiver.
    pub const fn with_dst(mut self, dst: ActorId) -> Self {
        self.dst = dst;
        self
    }

    /// Sets the correlation id.
    pub const fn with_correlation(mut self, correlation: CorrelationId) -> Self {
        self.correlation = correlation;
        self
    }

    /// Sets the HLC stamp and the domain that made it.
    pub const fn with_stamp(mut self, hlc: u64, domain: ClockDomain) -> Self {
        self.hlc = hlc;
        self.clock_domain = domain;
        self
    }

    /// Sets the sequence number.
    pub const fn with_seq(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    /// Sets the trace id.
    pub const fn with_trace_id(mut self, trace_id: u64) -> Self {
        self.trace_id = trace_id;
        self
    }

    /// The header's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; HEADER_SIZE] {
        bytemuck::cast_ref(self)
    }

    /// Writes the header into the first 64 bytes of `buf`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`] if `buf` is shorter than 64 bytes.
    #[inline]
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<(), EncodeError> {
        match buf.get_mut(..HEADER_SIZE) {
            Some(dst) => {
                dst.copy_from_slice(self.as_bytes());
                Ok(())
            }
            None => Err(EncodeError::BufferTooSmall { len: buf.len() }),
        }
    }

    /// Reads and validates the header at the start of `bytes`.
    ///
    /// # Errors
    /// [`DecodeError`] for a short buffer, bad magic or version, undefined
    /// flag bits, a payload over `check.max_payload`, or a type id the check
    /// does not accept.
    #[inline]
    pub fn decode(bytes: &[u8], check: &HeaderCheck<'_>) -> Result<Self, DecodeError> {
        let Some(raw) = bytes.get(..HEADER_SIZE) else {
            return Err(DecodeError::Truncated { len: bytes.len() });
        };
        let header: EnvelopeHeader = bytemuck::pod_read_unaligned(raw);
        header.validate(check.max_payload, check)?;
        Ok(header)
    }

    /// Validates an already-read header against `check`, with payloads capped
    /// at `max_payload` (the smaller of the check's limit and what the
    /// container holds).
    #[inline(always)]
    fn validate(&self, max_payload: u32, check: &HeaderCheck<'_>) -> Result<(), DecodeError> {
        if self.magic != ENVELOPE_MAGIC {
            return Err(DecodeError::BadMagic {
                found: self.magic,
                expected: ENVELOPE_MAGIC,
            });
        }
        if self.version != PROTOCOL_VERSION {
            return Err(DecodeError::BadVersion {
                found: self.version,
                expected: PROTOCOL_VERSION,
            });
        }
        if Flags::from_bits(self.flags.bits()).is_none() {
            return Err(DecodeError::UnknownFlags {
                flags: self.flags.bits(),
                unknown: self.flags.bits() & !Flags::ALL.bits(),
            });
        }
        let max = max_payload.min(check.max_payload);
        if self.payload_len > max {
            return Err(DecodeError::PayloadTooLarge {
                len: self.payload_len,
                max,
            });
        }
        if !check.accepts_type(self.type_id) {
            return Err(DecodeError::UnknownType {
                type_id: self.type_id,
            });
        }
        Ok(())
    }
}

/// A validated envelope read in place from a slot: the header and a view of
/// its payload.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// The validated header.
    pub header: EnvelopeHeader,
    /// Exactly `header.payload_len` bytes.
    pub payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Validates the envelope at the start of `slot` (header, and a payload
    /// that fits inside `slot`).
    ///
    /// # Errors
    /// See [`EnvelopeHeader::decode`]; a payload longer than the rest of the
    /// slot is [`DecodeError::PayloadTooLarge`].
    #[inline(always)]
    pub fn decode(slot: &'a [u8], check: &HeaderCheck<'_>) -> Result<Self, DecodeError> {
        let Some(raw) = slot.get(..HEADER_SIZE) else {
            return Err(DecodeError::Truncated { len: slot.len() });
        };
        let header: EnvelopeHeader = bytemuck::pod_read_unaligned(raw);
        let room = u32::try_from(slot.len() - HEADER_SIZE).unwrap_or(u32::MAX);
        header.validate(room, check)?;
        let end = HEADER_SIZE + header.payload_len as usize;
        Ok(Envelope {
            header,
            payload: &slot[HEADER_SIZE..end],
        })
    }

    /// Reads the payload as an inline `Pod` value.
    ///
    /// # Errors
    /// [`DecodeError::PayloadEncoding`] if the payload is an rkyv archive,
    /// [`DecodeError::PayloadSize`] if its length is not `size_of::<T>()`.
    #[inline]
    pub fn payload_as<T: Pod>(&self) -> Result<T, DecodeError> {
        if self.header.flags.contains(Flags::ARCHIVED) {
            return Err(DecodeError::PayloadEncoding { archived: true });
        }
        if self.payload.len() != std::mem::size_of::<T>() {
            return Err(DecodeError::PayloadSize {
                expected: std::mem::size_of::<T>(),
                found: self.header.payload_len,
            });
        }
        Ok(bytemuck::pod_read_unaligned(self.payload))
    }
}

/// Writes `header` followed by the inline `Pod` `payload` into `slot`,
/// setting `payload_len` and clearing `ARCHIVED`. Returns the header as
/// written.
///
/// # Errors
/// [`EncodeError::PayloadTooLarge`] if header and payload do not fit in `slot`.
#[inline]
pub fn encode_pod<T: Pod>(
    slot: &mut [u8],
    header: &EnvelopeHeader,
    payload: &T,
) -> Result<EnvelopeHeader, EncodeError> {
    let header = EnvelopeHeader {
        flags: header.flags.without(Flags::ARCHIVED),
        ..*header
    };
    encode_bytes(slot, &header, bytemuck::bytes_of(payload))
}

/// Writes `header` followed by the raw `payload` bytes into `slot`, setting
/// `payload_len`. Returns the header as written. (For typed payloads use
/// [`encode_pod`].)
///
/// # Errors
/// [`EncodeError::PayloadTooLarge`] if header and payload do not fit in `slot`.
#[inline]
pub fn encode_bytes(
    slot: &mut [u8],
    header: &EnvelopeHeader,
    payload: &[u8],
) -> Result<EnvelopeHeader, EncodeError> {
    let end = HEADER_SIZE + payload.len();
    if slot.len() < end {
        return Err(EncodeError::PayloadTooLarge {
            len: payload.len(),
            max: slot.len().saturating_sub(HEADER_SIZE),
        });
    }
    let mut header = *header;
    header.payload_len = payload.len() as u32;
    slot[..HEADER_SIZE].copy_from_slice(header.as_bytes());
    slot[HEADER_SIZE..end].copy_from_slice(payload);
    Ok(header)
}

#[cfg(feature = "rkyv")]
pub use archived::OwnedEnvelope;

#[cfg(feature = "rkyv")]
mod archived {
    use super::*;
    use rkyv::api::high::{HighSerializer, HighValidator};
    use rkyv::bytecheck::CheckBytes;
    use rkyv::de::Pool;
    use rkyv::rancor::{self, Strategy};
    use rkyv::ser::allocator::ArenaHandle;
    use rkyv::util::AlignedVec;
    use rkyv::{Archive, Deserialize, Serialize};

    /// An envelope that owns its payload: for variable-size host/network
    /// messages (rkyv archives) and for envelopes read off the wire.
    ///
    /// The wire form is the 64-byte header followed by exactly
    /// `payload_len` bytes.
    #[derive(Clone, Debug)]
    pub struct OwnedEnvelope {
        header: EnvelopeHeader,
        payload: AlignedVec,
    }

    fn archive_error(e: rancor::Error) -> DecodeError {
        DecodeError::Archive {
            reason: e.to_string(),
        }
    }

    impl OwnedEnvelope {
        /// Archives `value` with rkyv as the payload of `header` (which gets
        /// `ARCHIVED` set and its `payload_len` filled in).
        ///
        /// # Errors
        /// [`EncodeError::Archive`] if rkyv fails, [`EncodeError::PayloadTooLarge`]
        /// if the archive exceeds `max_payload` bytes.
        pub fn archive<T>(
            header: EnvelopeHeader,
            value: &T,
            max_payload: u32,
        ) -> Result<Self, EncodeError>
        where
            T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
        {
            let payload =
                rkyv::to_bytes::<rancor::Error>(value).map_err(|e| EncodeError::Archive {
                    reason: e.to_string(),
                })?;
            if payload.len() > max_payload as usize {
                return Err(EncodeError::PayloadTooLarge {
                    len: payload.len(),
                    max: max_payload as usize,
                });
            }
            let mut header = header;
            header.flags = header.flags.with(Flags::ARCHIVED);
            header.payload_len = payload.len() as u32;
            Ok(OwnedEnvelope { header, payload })
        }

        /// Wraps an inline `Pod` payload (for sending a `Pod` message over the
        /// network path).
        pub fn pod<T: Pod>(header: EnvelopeHeader, value: &T) -> Self {
            let mut payload = AlignedVec::new();
            payload.extend_from_slice(bytemuck::bytes_of(value));
            let mut header = header;
            header.flags = header.flags.without(Flags::ARCHIVED);
            header.payload_len = payload.len() as u32;
            OwnedEnvelope { header, payload }
        }

        /// The header.
        pub fn header(&self) -> &EnvelopeHeader {
            &self.header
        }

        /// The payload bytes.
        pub fn payload(&self) -> &[u8] {
            &self.payload
        }

        /// Borrows the envelope as an [`Envelope`] view.
        pub fn as_envelope(&self) -> Envelope<'_> {
            Envelope {
                header: self.header,
                payload: &self.payload,
            }
        }

        /// Validates the archive and returns a zero-copy view of it.
        ///
        /// # Errors
        /// [`DecodeError::PayloadEncoding`] if the payload is not an archive,
        /// [`DecodeError::Archive`] if it fails rkyv's validation.
        pub fn access<T>(&self) -> Result<&T::Archived, DecodeError>
        where
            T: Archive,
            T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
        {
            if !self.header.flags.contains(Flags::ARCHIVED) {
                return Err(DecodeError::PayloadEncoding { archived: false });
            }
            rkyv::access::<T::Archived, rancor::Error>(&self.payload).map_err(archive_error)
        }

        /// Validates the archive and deserialises it.
        ///
        /// # Errors
        /// As [`OwnedEnvelope::access`], plus rkyv's deserialisation errors.
        pub fn deserialize<T>(&self) -> Result<T, DecodeError>
        where
            T: Archive,
            T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                + Deserialize<T, Strategy<Pool, rancor::Error>>,
        {
            let archived = self.access::<T>()?;
            rkyv::deserialize::<T, rancor::Error>(archived).map_err(archive_error)
        }

        /// The wire form: header bytes, then the payload.
        pub fn to_wire(&self) -> Vec<u8> {
            let mut out = Vec::with_capacity(HEADER_SIZE + self.payload.len());
            out.extend_from_slice(self.header.as_bytes());
            out.extend_from_slice(&self.payload);
            out
        }

        /// Reads and validates the wire form. The payload must be exactly
        /// `payload_len` bytes and within `check.max_payload`.
        ///
        /// # Errors
        /// Every [`EnvelopeHeader::decode`] error; a length that does not
        /// match the bytes given is [`DecodeError::PayloadSize`].
        pub fn from_wire(bytes: &[u8], check: &HeaderCheck<'_>) -> Result<Self, DecodeError> {
            let header = EnvelopeHeader::decode(bytes, check)?;
            let rest = &bytes[HEADER_SIZE..];
            if rest.len() != header.payload_len as usize {
                return Err(DecodeError::PayloadSize {
                    expected: rest.len(),
                    found: header.payload_len,
                });
            }
            let mut payload = AlignedVec::with_capacity(rest.len());
            payload.extend_from_slice(rest);
            Ok(OwnedEnvelope { header, payload })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EnvelopeHeader {
        EnvelopeHeader::new(42, Flags::ASK)
            .with_src(ActorId::cpu(1, 2))
            .with_dst(ActorId::gpu(1, 3))
            .with_correlation(CorrelationId::new(1, 2, 3))
            .with_stamp(0x1234_5670, ClockDomain::unit(1, 1))
            .with_seq(9)
            .with_trace_id(77)
    }

    #[test]
    fn pod_round_trip_through_a_slot() {
        let mut slot = [0u8; 128];
        let written = encode_pod(&mut slot, &sample(), &[1u32, 2, 3, 4]).unwrap();
        assert_eq!(written.payload_len, 16);
        let env = Envelope::decode(&slot, &HeaderCheck::any_type(64)).unwrap();
        assert_eq!(env.header, written);
        assert_eq!(env.payload_as::<[u32; 4]>().unwrap(), [1, 2, 3, 4]);
        assert_eq!(
            env.payload_as::<u64>(),
            Err(DecodeError::PayloadSize {
                expected: 8,
                found: 16
            })
        );
    }

    #[test]
    fn payload_that_does_not_fit_is_refused() {
        let mut slot = [0u8; 128];
        let err = encode_pod(&mut slot, &sample(), &[0u8; 65]).unwrap_err();
        assert_eq!(err, EncodeError::PayloadTooLarge { len: 65, max: 64 });
        let err = sample().encode_into(&mut [0u8; 10]).unwrap_err();
        assert_eq!(err, EncodeError::BufferTooSmall { len: 10 });
    }

    #[test]
    fn decode_caps_payload_at_the_slot() {
        let mut slot = [0u8; 128];
        let mut h = sample();
        h.payload_len = 65;
        h.encode_into(&mut slot).unwrap();
        let err = Envelope::decode(&slot, &HeaderCheck::any_type(u32::MAX)).unwrap_err();
        assert_eq!(err, DecodeError::PayloadTooLarge { len: 65, max: 64 });
    }

    #[test]
    fn type_filters() {
        let mut slot = [0u8; 128];
        sample().encode_into(&mut slot).unwrap();
        assert!(EnvelopeHeader::decode(&slot, &HeaderCheck::only(64, &[41, 42])).is_ok());
        assert_eq!(
            EnvelopeHeader::decode(&slot, &HeaderCheck::only(64, &[41])),
            Err(DecodeError::UnknownType { type_id: 42 })
        );
        let odd = |t: u32| t % 2 == 1;
        let check = HeaderCheck {
            max_payload: 64,
            types: TypeFilter::With(&odd),
        };
        assert_eq!(
            EnvelopeHeader::decode(&slot, &check),
            Err(DecodeError::UnknownType { type_id: 42 })
        );
        EnvelopeHeader::new(0, Flags::empty())
            .encode_into(&mut slot)
            .unwrap();
        assert_eq!(
            EnvelopeHeader::decode(&slot, &HeaderCheck::any_type(64)),
            Err(DecodeError::UnknownType { type_id: 0 })
        );
    }

    #[test]
    fn flags_debug_and_bits() {
        assert_eq!(
            format!("{:?}", Flags::ASK | Flags::ARCHIVED),
            "{ASK, ARCHIVED}"
        );
        assert_eq!(Flags::from_bits(0x40), None);
        assert_eq!(Flags::from_bits(0x3F), Some(Flags::ALL));
        assert!(Flags::ALL.contains(Flags::FAULT));
    }

    #[cfg(feature = "rkyv")]
    #[test]
    fn rkyv_payload_round_trips_over_the_wire() {
        #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
        struct Job {
            name: String,
            weights: Vec<f32>,
        }
        let job = Job {
            name: "resize".into(),
            weights: vec![0.5; 100],
        };
        let env = OwnedEnvelope::archive(sample(), &job, 4096).unwrap();
        assert!(env.header().flags.contains(Flags::ARCHIVED));
        let wire = env.to_wire();
        let back = OwnedEnvelope::from_wire(&wire, &HeaderCheck::any_type(4096)).unwrap();
        assert_eq!(back.deserialize::<Job>().unwrap(), job);
        assert_eq!(back.access::<Job>().unwrap().weights.len(), 100);
        // The same bytes read as Pod are refused, and a truncated wire form too.
        assert_eq!(
            back.as_envelope().payload_as::<u64>(),
            Err(DecodeError::PayloadEncoding { archived: true })
        );
        assert!(matches!(
            OwnedEnvelope::from_wire(&wire[..wire.len() - 1], &HeaderCheck::any_type(4096)),
            Err(DecodeError::PayloadSize { .. })
        ));
        // A payload limit applies when archiving.
        assert!(matches!(
            OwnedEnvelope::archive(sample(), &job, 16),
            Err(EncodeError::PayloadTooLarge { .. })
        ));
        // Corrupted archive bytes are a typed error, never UB.
        let mut bad = wire.clone();
        let n = bad.len();
        for b in &mut bad[n - 8..] {
            *b = 0xFF;
        }
        let corrupt = OwnedEnvelope::from_wire(&bad, &HeaderCheck::any_type(4096)).unwrap();
        assert!(matches!(
            corrupt.access::<Job>(),
            Err(DecodeError::Archive { .. })
        ));
        let pod = OwnedEnvelope::pod(sample(), &7u64);
        assert_eq!(pod.as_envelope().payload_as::<u64>().unwrap(), 7);
        assert!(matches!(
            pod.access::<Job>(),
            Err(DecodeError::PayloadEncoding { archived: false })
        ));
    }
}
