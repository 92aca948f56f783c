//! Kernel definitions: what a GPU actor serves and how.
//!
//! A kernel type names its state (a `Pod` value with a fixed layout), the
//! message types it serves (each a `Pod` [`Message`] with a stable type id
//! and a `Pod` reply type), its declared execution [`Width`], and one handler
//! set per backend it supports. The cpu backend's handlers are Rust closures
//! registered in a [`CpuHandlers`]; launching a kernel on a backend it has no
//! handler for is a typed error at launch.
//!
//! A handler may reply now ([`Ctx::reply`]), later ([`Ctx::defer`] then
//! [`Ctx::reply_to`] from a later message's handler), or never (a tell). An
//! ask whose handler ends without replying or deferring resolves with
//! [`AskError::NoReply`](crate::runtime::AskError::NoReply) — it never hangs.
//!
//! # Examples
//!
//! ```
//! use bytemuck::{Pod, Zeroable};
//! use ringkernel::kernel::{CpuHandlers, Kernel, Message};
//!
//! #[derive(Clone, Copy, Pod, Zeroable)]
//! #[repr(C)]
//! struct Add(u64);
//! impl Message for Add {
//!     const TYPE_ID: u32 = 1;
//!     type Reply = u64;
//! }
//!
//! struct Counter;
//! impl Kernel for Counter {
//!     type State = u64;
//!     const NAME: &'static str = "counter";
//!     fn cpu_handlers() -> Option<CpuHandlers<Self>> {
//!         Some(CpuHandlers::<Self>::new().on::<Add>(|total, Add(n), ctx| {
//!             *total += n;
//!             ctx.reply(*total);
//!             Ok(())
//!         }))
//!     }
//! }
//! ```

use crate::envelope::{EnvelopeHeader, Flags, SYSTEM_TYPE_BASE};
use crate::hlc::Timestamp;
use crate::id::{ActorId, CorrelationId};
use bytemuck::Pod;
use std::fmt;
use std::marker::PhantomData;

/// Largest inline message or reply payload, in bytes (a 128-byte slot holds
/// a 64-byte header and this much payload).
pub const MAX_INLINE: usize = 64;

/// Type id of the runtime's reply for an ask whose handler neither replied
/// nor deferred.
pub const SYS_NO_REPLY: u32 = SYSTEM_TYPE_BASE + 1;

/// A message a kernel serves: a `Pod` value with a stable type id and a
/// `Pod` reply type, both at most [`MAX_INLINE`] bytes.
pub trait Message: Pod + Send + 'static {
    /// Stable type id, in `1..SYSTEM_TYPE_BASE`; unique within a kernel.
    const TYPE_ID: u32;
    /// What an ask of this message is answered with (`()` for tells).
    type Reply: Pod + Send + 'static;
}

/// The execution width a handler declares: how many device threads work on
/// one message. Messages to one actor are processed one at a time, in order,
/// whatever the width; the cpu backend runs every handler on one thread.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    /// One thread.
    Thread,
    /// One warp (32 threads on CUDA).
    Warp,
    /// One block of this many threads (1..=1024).
    Block(u32),
}

impl Width {
    /// Device threads per message: 1, 32, or the block's size.
    pub const fn threads(self) -> u32 {
        match self {
            Width::Thread => 1,
            Width::Warp => 32,
            Width::Block(n) => n,
        }
    }

    /// Whether the width is one a backend can run.
    pub const fn is_valid(self) -> bool {
        match self {
            Width::Thread | Width::Warp => true,
            Width::Block(n) => n >= 1 && n <= 1024,
        }
    }
}

/// Where kernels run.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Device loops on OS threads, handlers in Rust (always built).
    Cpu,
    /// A persistent CUDA kernel (crate `ringkernel-cuda`).
    Cuda,
    /// A host-driven WebGPU dispatch loop (crate `ringkernel-wgpu`).
    Wgpu,
}

/// A handler's own failure: faults the actor slot with this code as detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("handler fault {0}")]
pub struct HandlerError(pub u32);

/// A kernel type.
pub trait Kernel: Send + Sync + Sized + 'static {
    /// The state each actor of this kernel keeps between messages.
    type State: Pod + Send;
    /// Name, for logs and errors.
    const NAME: &'static str;
    /// Declared execution width of the handlers.
    const WIDTH: Width = Width::Thread;

    /// The cpu backend's handlers; `None` if the kernel has none.
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        None
    }

    /// The wgpu backend's handler, in WGSL; `None` if the kernel has none.
    fn wgsl() -> Option<crate::backend::WgslHandler> {
        None
    }

    /// The cuda backend's handler, in CUDA C++; `None` if the kernel has
    /// none.
    fn cuda() -> Option<crate::backend::CudaHandler> {
        None
    }
}

/// Messages one handler run may send to other actors ([`Ctx::send`]);
/// more fault the actor (`HandlerFault`, detail [`TOO_MANY_SENDS`]) rather
/// than vanish.
pub const MAX_SENDS: usize = 256;

/// The `HandlerFault` detail of a handler that sent more than
/// [`MAX_SENDS`] messages.
pub const TOO_MANY_SENDS: u64 = 0x2_0000_0000;

/// The message type ids kernel `K` serves (by its handlers for any
/// backend), sorted; empty for a kernel without handlers. Adapters refuse
/// other types before sending.
pub fn served_types<K: Kernel>() -> Vec<u32> {
    let mut served = K::cpu_handlers().map(|h| h.type_ids()).unwrap_or_default();
    served.extend(K::wgsl().map_or(&[][..], |w| w.types));
    served.extend(K::cuda().map_or(&[][..], |c| c.types));
    served.sort_unstable();
    served.dedup();
    served
}

/// An inline message payload, type-erased: what travels through an actor's
/// mailbox to its H2K ring.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    type_id: u32,
    len: u32,
    bytes: [u8; MAX_INLINE],
}

impl Payload {
    /// Wraps a message.
    pub fn new<M: Message>(msg: M) -> Self {
        const {
            assert!(
                std::mem::size_of::<M>() <= MAX_INLINE,
                "message exceeds MAX_INLINE bytes"
            )
        };
        let mut bytes = [0u8; MAX_INLINE];
        let raw = bytemuck::bytes_of(&msg);
        bytes[..raw.len()].copy_from_slice(raw);
        Payload {
            type_id: M::TYPE_ID,
            len: raw.len() as u32,
            bytes,
        }
    }

    /// A payload of `type_id` with these bytes (at most [`MAX_INLINE`];
    /// longer input is cut there). Used to hand back a message read from a
    /// ring.
    pub fn from_parts(type_id: u32, bytes: &[u8]) -> Self {
        let len = bytes.len().min(MAX_INLINE);
        let mut inline = [0u8; MAX_INLINE];
        inline[..len].copy_from_slice(&bytes[..len]);
        Payload {
            type_id,
            len: len as u32,
            bytes: inline,
        }
    }

    /// The message type id.
    pub fn type_id(&self) -> u32 {
        self.type_id
    }

    /// The payload bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Reads the payload back as `M`, if it is one.
    pub fn get<M: Message>(&self) -> Option<M> {
        (self.type_id == M::TYPE_ID && self.len as usize == std::mem::size_of::<M>())
            .then(|| bytemuck::pod_read_unaligned(self.bytes()))
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("type_id", &self.type_id)
            .field("len", &self.len)
            .finish()
    }
}

impl<M: Message> From<M> for Payload {
    fn from(msg: M) -> Self {
        Payload::new(msg)
    }
}

/// A reply as it reached the host: its stamp and its inline bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    header: EnvelopeHeader,
    bytes: [u8; MAX_INLINE],
}

impl Reply {
    pub(crate) fn new(header: EnvelopeHeader, payload: &[u8]) -> Self {
        let mut bytes = [0u8; MAX_INLINE];
        let n = payload.len().min(MAX_INLINE);
        bytes[..n].copy_from_slice(&payload[..n]);
        Reply { header, bytes }
    }

    /// The reply's header (its stamp, source and correlation).
    pub fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    /// The payload bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..(self.header.payload_len as usize).min(MAX_INLINE)]
    }

    /// Reads the payload as the reply type `R`.
    ///
    /// # Errors
    /// [`DecodeError::PayloadSize`](crate::DecodeError::PayloadSize) if the
    /// length differs from `size_of::<R>()`.
    pub fn decode<R: Pod>(&self) -> Result<R, crate::DecodeError> {
        if self.bytes().len() != std::mem::size_of::<R>() {
            return Err(crate::DecodeError::PayloadSize {
                expected: std::mem::size_of::<R>(),
                found: self.header.payload_len,
            });
        }
        Ok(bytemuck::pod_read_unaligned(self.bytes()))
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("type_id", &self.header.type_id)
            .field("correlation", &self.header.correlation)
            .field("hlc", &self.header.hlc)
            .finish()
    }
}

/// An ask whose reply was deferred: answer it later with [`Ctx::reply_to`].
#[must_use = "a deferred ask resolves only when replied to"]
pub struct Deferred<R> {
    pub(crate) correlation: CorrelationId,
    pub(crate) src: ActorId,
    pub(crate) type_id: u32,
    _reply: PhantomData<fn(R)>,
}

impl<R> fmt::Debug for Deferred<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred")
            .field("correlation", &self.correlation)
            .finish()
    }
}

impl<R> Deferred<R> {
    /// The handle as two words, to keep it in a `Pod` kernel state.
    pub fn to_raw(self) -> [u64; 2] {
        [self.correlation.to_bits(), self.src.to_bits()]
    }

    /// Rebuilds a handle from [`Deferred::to_raw`] and the message type id
    /// it answers.
    pub fn from_raw(raw: [u64; 2], type_id: u32) -> Self {
        Deferred {
            correlation: CorrelationId::from_bits(raw[0]),
            src: ActorId::from_bits(raw[1]),
            type_id,
            _reply: PhantomData,
        }
    }
}

// Manual impls: `R` need not be Clone/Pod for the handle to be copied into a
// kernel's state.
impl<R> Clone for Deferred<R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Deferred<R> {}

/// Where a device loop puts the replies its handlers make.
pub(crate) trait ReplySink {
    /// Sends one reply envelope (header already stamped by the sink).
    fn send_reply(
        &mut self,
        to: CorrelationId,
        dst: ActorId,
        type_id: u32,
        flags: Flags,
        payload: &[u8],
    );
}

/// What a handler sees of the message it serves and how it answers.
pub struct Ctx<'a, R> {
    pub(crate) header: &'a EnvelopeHeader,
    pub(crate) stamp: Timestamp,
    pub(crate) sink: &'a mut dyn ReplySink,
    pub(crate) answered: &'a mut bool,
    _reply: PhantomData<fn(R)>,
}

impl<R: Pod> Ctx<'_, R> {
    /// The sender.
    pub fn src(&self) -> ActorId {
        self.header.src
    }

    /// This actor, as addressed (its incarnation included).
    pub fn actor(&self) -> ActorId {
        self.header.dst
    }

    /// The sequence number the sender gave the message.
    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    /// The trace id (0 when untraced).
    pub fn trace_id(&self) -> u64 {
        self.header.trace_id
    }

    /// The sender's stamp of this message (an HLC word): always below
    /// [`Ctx::stamp`]'s.
    pub fn sent_stamp(&self) -> u64 {
        self.header.hlc
    }

    /// The device-side stamp of this message's receipt (after the merge).
    pub fn stamp(&self) -> Timestamp {
        self.stamp
    }

    /// Whether the sender waits for a reply.
    pub fn is_ask(&self) -> bool {
        self.header.flags.contains(Flags::ASK)
    }

    /// Replies to the current ask. A tell has no one to answer, and an ask is
    /// answered once: further replies are ignored.
    pub fn reply(&mut self, value: R) {
        if self.is_ask() && !*self.answered {
            *self.answered = true;
            self.sink.send_reply(
                self.header.correlation,
                self.header.src,
                self.header.type_id,
                Flags::REPLY,
                bytemuck::bytes_of(&value),
            );
        }
    }

    /// Defers the reply to the current ask; `None` for a tell. The ask
    /// resolves when a later handler calls [`Ctx::reply_to`] with the handle.
    pub fn defer(&mut self) -> Option<Deferred<R>> {
        if !self.is_ask() || *self.answered {
            return None;
        }
        *self.answered = true;
        Some(Deferred {
            correlation: self.header.correlation,
            src: self.header.src,
            type_id: self.header.type_id,
            _reply: PhantomData,
        })
    }

    /// Sends `msg` to another actor — a CPU actor or a GPU actor, by its id
    /// in the runtime's [`Registry`](crate::registry::Registry) — as a tell.
    /// It leaves with this message's replies (so a faulted incarnation's
    /// sends never leave), and the runtime's poller delivers it without
    /// blocking; what it cannot deliver becomes a dead letter.
    ///
    /// To a GPU actor this actor is [linked](crate::link) to (by
    /// [`Runtime::connect`](crate::runtime::Runtime::connect)), it goes
    /// slot to slot over the K2K ring once this message commits, with no
    /// host thread on the path.
    pub fn send<M: Message>(&mut self, dst: ActorId, msg: M) {
        const {
            assert!(
                std::mem::size_of::<M>() <= MAX_INLINE,
                "message exceeds MAX_INLINE bytes"
            )
        };
        self.sink.send_reply(
            CorrelationId::NONE,
            dst,
            M::TYPE_ID,
            Flags::empty(),
            bytemuck::bytes_of(&msg),
        );
    }

    /// Answers an ask deferred earlier (by this or another handler).
    pub fn reply_to<R2: Pod>(&mut self, deferred: Deferred<R2>, value: R2) {
        self.sink.send_reply(
            deferred.correlation,
            deferred.src,
            deferred.type_id,
            Flags::REPLY,
            bytemuck::bytes_of(&value),
        );
    }
}

type Handler<S> = Box<
    dyn Fn(
            &mut S,
            &[u8],
            &EnvelopeHeader,
            Timestamp,
            &mut dyn ReplySink,
            &mut bool,
        ) -> Result<(), HandlerError>
        + Send
        + Sync,
>;

/// The cpu backend's handlers of a kernel, one per message type.
pub struct CpuHandlers<K: Kernel> {
    pub(crate) entries: Vec<(u32, Handler<K::State>)>,
}

impl<K: Kernel> Default for CpuHandlers<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Kernel> fmt::Debug for CpuHandlers<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuHandlers")
            .field("kernel", &K::NAME)
            .field("types", &self.type_ids())
            .finish()
    }
}

impl<K: Kernel> CpuHandlers<K> {
    /// No handlers yet.
    pub fn new() -> Self {
        CpuHandlers {
            entries: Vec::new(),
        }
    }

    /// Registers the handler of message type `M`.
    pub fn on<M: Message>(
        mut self,
        handler: impl Fn(&mut K::State, M, &mut Ctx<'_, M::Reply>) -> Result<(), HandlerError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        const {
            assert!(
                std::mem::size_of::<M::Reply>() <= MAX_INLINE,
                "reply exceeds MAX_INLINE bytes"
            )
        };
        const {
            assert!(
                std::mem::size_of::<M>() <= MAX_INLINE,
                "message exceeds MAX_INLINE bytes"
            )
        };
        let erased: Handler<K::State> =
            Box::new(move |state, bytes, header, stamp, sink, answered| {
                // The runtime checked the type id and the payload length before
                // dispatching here, so this read cannot fail; a mismatch would be
                // a runtime bug, reported as a fault rather than a panic.
                if bytes.len() != std::mem::size_of::<M>() {
                    return Err(HandlerError(u32::MAX));
                }
                let msg: M = bytemuck::pod_read_unaligned(bytes);
                let mut ctx = Ctx {
                    header,
                    stamp,
                    sink,
                    answered,
                    _reply: PhantomData,
                };
                handler(state, msg, &mut ctx)
            });
        self.entries.push((M::TYPE_ID, erased));
        self
    }

    /// The type ids registered, in registration order.
    pub fn type_ids(&self) -> Vec<u32> {
        self.entries.iter().map(|(t, _)| *t).collect()
    }
}
