//! The host side of GPU actors: launch, the data path of an ask, the K2H
//! poller, lifecycle, the watchdog and shutdown.
//!
//! A [`Runtime`] owns one **poller thread** (never a tokio task, never an
//! actix arbiter) that drains every actor slot's K2H ring, merges each
//! reply's HLC stamp and completes the waiting caller through its
//! [`Waiter`] — the framework's own reply handle. [`Runtime::launch`] starts
//! a kernel's actor slot on a backend and returns its [`GpuSlot`]: the one
//! writer of the slot's H2K ring, owned by the framework actor.
//!
//! Guarantees (see `docs/semantics.md`): messages from one [`GpuSlot`] are
//! processed in the order sent; every accepted ask resolves exactly once —
//! with its reply, [`AskError::NoReply`], a fault, or termination; a message
//! the kernel does not serve, a full ring and a closed slot are typed errors
//! that hand the message back.

use crate::control::{ControlRef, FaultCode, LifecycleState, SlotStatus};
use crate::doorbell::Doorbell;
use crate::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use crate::error::{LayoutError, StateError};
use crate::hlc::{DynHlc, PhysicalClock, TscClock};
use crate::home::{
    ActorHome, DeadLetter, DeadLetterReason, Ending, HomeCore, PendingPolicy, Replay, RouteFailure,
};
use crate::id::{ActorId, ActorKind, ClockDomain, CorrelationId};
use crate::kernel::{BackendKind, Kernel, MAX_INLINE, Payload, Reply, SYS_NO_REPLY};
use crate::link::{ConnectError, Link, LinkId, LinkOptions, LinkStats, WakeTarget, lock};
use crate::registry::{Delivery, DeliveryError};
use crate::ring::{Consumer, Producer, RingLayout, RingObserver};
use crate::space::SpaceWaker;
use crate::waiter::{SlabFull, WaiterSlab};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How a caller waits for its reply: the framework's reply handle
/// (ractor's `RpcReplyPort`, actix's response channel, kameo's reply sender).
/// [`Waiter::complete`] is called exactly once per accepted ask: by the
/// poller thread, the slot's device thread (cpu backend: it delivers the
/// replies it publishes), or the owner's thread when a slot closes. It runs
/// while the slot's K2H reader is held, so it must not block or call back
/// into the slot: hand the outcome to a channel or a waker.
pub trait Waiter: Send + 'static {
    /// Delivers the outcome of the ask.
    fn complete(self, outcome: Result<Reply, AskError>);

    /// Whether the caller has gone away (then the ask is not sent at all).
    fn is_closed(&self) -> bool {
        false
    }
}

/// Why an accepted ask resolved without a reply value.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// The handler ended without replying or deferring.
    #[error("the handler ended without a reply")]
    NoReply,
    /// The actor slot faulted while the ask was in flight.
    #[error("the kernel faulted ({0})")]
    Faulted(Fault),
    /// The actor was terminated while the ask was in flight.
    #[error("the actor was terminated")]
    Terminated,
}

/// What a framework caller of a GPU actor can be told, whatever the
/// framework: the adapters return it (actix and kameo directly, ractor
/// beside its own transport errors).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The ask was accepted and resolved without a value.
    #[error(transparent)]
    Ask(#[from] AskError),
    /// The kernel serves no message of this type.
    #[error("the kernel does not serve message type {type_id:#x}")]
    UnknownType {
        /// The type id.
        type_id: u32,
    },
    /// The actor's slot is closed (faulted, terminated, or not launched).
    #[error("the GPU actor is closed")]
    Closed,
    /// The reply did not decode as the message's reply type.
    #[error("reply does not decode: {0}")]
    Decode(#[from] crate::DecodeError),
}

impl CallError {
    /// Turns a waiter's outcome into a typed reply.
    ///
    /// # Errors
    /// The ask's [`AskError`], or [`CallError::Decode`] for a reply of
    /// another size than `R`.
    pub fn decode<R: bytemuck::Pod>(outcome: Result<Reply, AskError>) -> Result<R, CallError> {
        Ok(outcome?.decode::<R>()?)
    }

    /// The error for a send to a closed slot: its fault if it faulted.
    pub fn closed(fault: Option<Fault>) -> CallError {
        fault.map_or(CallError::Closed, |f| CallError::Ask(AskError::Faulted(f)))
    }
}

/// The detail of a `BadEnvelope` fault the host detected: a corrupt
/// envelope in the slot's K2H ring.
pub const HOST_DETECTED_CORRUPT_K2H: u64 = u64::MAX - 1;

/// A fault of an actor slot: its code and detail (see [`FaultCode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// What happened.
    pub code: FaultCode,
    /// Code-specific detail (a handler's error code, a type id, …).
    pub detail: u64,
    /// The incarnation that faulted.
    pub incarnation: u32,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}, detail {}, incarnation {}",
            self.code, self.detail, self.incarnation
        )
    }
}

/// A message the slot did not accept; it is handed back.
#[non_exhaustive]
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError<T> {
    /// The H2K ring (or the in-flight limit) is full: wait for
    /// [`GpuSlot::space`] and send again, in order.
    #[error("the actor's H2K ring is full")]
    Full(T),
    /// The kernel serves no message of this type.
    #[error("the kernel does not serve message type {type_id:#x}")]
    UnknownType {
        /// The message.
        value: T,
        /// Its type id.
        type_id: u32,
    },
    /// The actor faulted or was terminated.
    #[error("the actor is closed")]
    Closed(T),
}

impl<T> SubmitError<T> {
    /// Maps the message inside.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> SubmitError<U> {
        match self {
            SubmitError::Full(v) => SubmitError::Full(f(v)),
            SubmitError::UnknownType { value, type_id } => SubmitError::UnknownType {
                value: f(value),
                type_id,
            },
            SubmitError::Closed(v) => SubmitError::Closed(f(v)),
        }
    }

    /// The message that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SubmitError::Full(v)
            | SubmitError::UnknownType { value: v, .. }
            | SubmitError::Closed(v) => v,
        }
    }
}

impl<T> fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full(_) => f.write_str("Full(..)"),
            SubmitError::UnknownType { type_id, .. } => write!(f, "UnknownType({type_id:#x})"),
            SubmitError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

/// Why a kernel could not be launched.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// The kernel has no handler for the runtime's backend.
    #[error("kernel {kernel} has no handler for the {backend:?} backend")]
    NoHandler {
        /// Kernel name.
        kernel: &'static str,
        /// The backend asked for.
        backend: BackendKind,
    },
    /// A ring or waiter geometry is out of range.
    #[error("launch option out of range: {0}")]
    Layout(#[from] LayoutError),
    /// Slots must hold a header and [`MAX_INLINE`] bytes.
    #[error("slot size {slot_size} cannot hold a 64-byte header and {MAX_INLINE} payload bytes")]
    SlotTooSmall {
        /// The slot size asked for.
        slot_size: u32,
    },
    /// The declared width is not one a backend can run.
    #[error("invalid execution width {0:?}")]
    InvalidWidth(crate::kernel::Width),
    /// Two handlers were registered for one type id, or one uses a reserved id.
    #[error("message type id {type_id:#x} is reserved or registered twice")]
    BadTypeId {
        /// The offending id.
        type_id: u32,
    },
    /// The runtime already hosts its maximum number of actor slots.
    #[error("the runtime hosts at most {max} actor slots")]
    TooManySlots {
        /// The limit.
        max: usize,
    },
    /// The device thread could not be started.
    #[error("starting the device loop failed: {0}")]
    Spawn(String),
    /// The kernel's device handler declares more replies to deferred asks
    /// per run than K2H (or [`MAX_LATER`](crate::backend::MAX_LATER))
    /// allows.
    #[error(
        "the handler may answer at most {limit} deferred asks per run (K2H holds 1 + max_later \
         replies per message); it declares max_later = {max_later}"
    )]
    TooManyLater {
        /// What the kernel's device handler declares.
        max_later: u32,
        /// The most this launch allows.
        limit: u32,
    },
    /// The backend cannot honour a launch option (none is accepted and
    /// ignored).
    #[error("the {backend:?} backend does not support {what}")]
    Unsupported {
        /// The backend.
        backend: BackendKind,
        /// The option.
        what: &'static str,
    },
    /// The device backend refused the slot (its kernel does not compile,
    /// the device is lost, ...).
    #[error("the {backend:?} backend could not launch the slot: {message}")]
    Backend {
        /// The backend.
        backend: BackendKind,
        /// Why.
        message: String,
    },
    /// The actor's previous incarnation is still serving (not fenced), or
    /// has not handed back what it left unprocessed
    /// ([`GpuSlot::recover`], or dropping its slot): two incarnations never
    /// serve one actor.
    #[error("incarnation {incarnation} of this actor is still serving or not recovered")]
    IncarnationLive {
        /// The serving incarnation.
        incarnation: u16,
    },
    /// The actor's checkpoint belongs to another kernel or state layout.
    #[error("the checkpoint of kernel {kernel} ({len} bytes) does not fit this kernel's state")]
    CheckpointMismatch {
        /// The kernel that took it.
        kernel: &'static str,
        /// Its size.
        len: usize,
    },
}

/// Options of one launch. Every option is validated; none is ignored.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub(crate) h2k_capacity: u32,
    pub(crate) k2h_capacity: u32,
    pub(crate) slot_size: u32,
    pub(crate) max_in_flight: usize,
    pub(crate) auto_activate: bool,
    pub(crate) on_fault: PendingPolicy,
    pub(crate) checkpoint_every: u64,
    #[cfg(feature = "fault-injection")]
    pub(crate) injector: Option<Arc<crate::inject::FaultInjector>>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            h2k_capacity: 256,
            k2h_capacity: 256,
            slot_size: 128,
            max_in_flight: 1024,
            auto_activate: true,
            on_fault: PendingPolicy::Fail,
            checkpoint_every: 0,
            #[cfg(feature = "fault-injection")]
            injector: None,
        }
    }
}

impl LaunchOptions {
    /// H2K ring capacity (power of two; default 256).
    pub fn h2k_capacity(mut self, slots: u32) -> Self {
        self.h2k_capacity = slots;
        self
    }

    /// K2H ring capacity (power of two; default 256).
    pub fn k2h_capacity(mut self, slots: u32) -> Self {
        self.k2h_capacity = slots;
        self
    }

    /// Slot size of both rings (multiple of 64, at least 128; default 128).
    pub fn slot_size(mut self, bytes: u32) -> Self {
        self.slot_size = bytes;
        self
    }

    /// Asks in flight at once (the waiter slab; 1..=65 536; default 1024).
    pub fn max_in_flight(mut self, asks: usize) -> Self {
        self.max_in_flight = asks;
        self
    }

    /// Whether the slot starts `Active` (default) or `Deactivated`.
    pub fn auto_activate(mut self, yes: bool) -> Self {
        self.auto_activate = yes;
        self
    }

    /// What happens to accepted messages a fault leaves unprocessed
    /// (default [`PendingPolicy::Fail`]; see `docs/semantics.md`).
    pub fn on_fault(mut self, policy: PendingPolicy) -> Self {
        self.on_fault = policy;
        self
    }

    /// Checkpoints the kernel state into the actor's [`ActorHome`] every
    /// `messages` processed messages (0, the default: only on request). The
    /// next incarnation starts from the latest checkpoint.
    pub fn checkpoint_every(mut self, messages: u64) -> Self {
        self.checkpoint_every = messages;
        self
    }

    /// Injects faults into the device loop (cpu backend, feature
    /// `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn inject(mut self, injector: Arc<crate::inject::FaultInjector>) -> Self {
        self.injector = Some(injector);
        self
    }

    fn validate(&self) -> Result<(RingLayout, RingLayout), LaunchError> {
        let h2k = RingLayout::new(self.h2k_capacity, self.slot_size)?;
        let k2h = RingLayout::new(self.k2h_capacity, self.slot_size)?;
        if (h2k.max_payload() as usize) < MAX_INLINE {
            return Err(LaunchError::SlotTooSmall {
                slot_size: self.slot_size,
            });
        }
        if self.max_in_flight == 0 || self.max_in_flight > WaiterSlab::<()>::MAX_CAPACITY {
            return Err(LayoutError::SlabCapacity {
                capacity: self.max_in_flight,
                max: WaiterSlab::<()>::MAX_CAPACITY,
            }
            .into());
        }
        Ok((h2k, k2h))
    }
}

/// Monotonic time in ns since the clock was made: the watchdog's default
/// clock (wall time may jump; a watchdog must not).
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl PhysicalClock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    node: u16,
    backend: BackendKind,
    max_slots: usize,
    watchdog: Duration,
    watchdog_clock: Arc<dyn PhysicalClock>,
    host_clock: Arc<dyn PhysicalClock>,
    dead_letters: Option<DeadLetterSink>,
    device: Option<Arc<dyn crate::backend::DeviceBackend>>,
}

type DeadLetterSink = Arc<dyn Fn(DeadLetter) + Send + Sync>;

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("node", &self.node)
            .field("backend", &self.backend)
            .field("max_slots", &self.max_slots)
            .field("watchdog", &self.watchdog)
            .finish_non_exhaustive()
    }
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        RuntimeBuilder {
            node: 0,
            backend: BackendKind::Cpu,
            max_slots: 1024,
            watchdog: Duration::from_secs(5),
            watchdog_clock: Arc::new(MonotonicClock::default()),
            host_clock: Arc::new(TscClock::new()),
            dead_letters: None,
            device: None,
        }
    }
}

impl RuntimeBuilder {
    /// The node id of this runtime (default 0).
    pub fn node(mut self, node: u16) -> Self {
        self.node = node;
        self
    }

    /// The backend kernels run on (default [`BackendKind::Cpu`]). A GPU
    /// backend needs its device: see [`RuntimeBuilder::device`].
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = backend;
        self
    }

    /// Launches every slot on `device` (a GPU backend crate's, e.g.
    /// `ringkernel_wgpu::WgpuBackend`); sets the backend to its kind.
    pub fn device(mut self, device: Arc<dyn crate::backend::DeviceBackend>) -> Self {
        self.backend = device.kind();
        self.device = Some(device);
        self
    }

    /// Most actor slots this runtime hosts at once (default 1024).
    pub fn max_slots(mut self, slots: usize) -> Self {
        self.max_slots = slots;
        self
    }

    /// How long a slot with pending work may go without progress before the
    /// watchdog faults it (default 5 s).
    pub fn watchdog(mut self, limit: Duration) -> Self {
        self.watchdog = limit;
        self
    }

    /// The clock the watchdog measures with (default [`MonotonicClock`];
    /// tests inject a [`ManualClock`](crate::hlc::ManualClock)).
    pub fn watchdog_clock(mut self, clock: Arc<dyn PhysicalClock>) -> Self {
        self.watchdog_clock = clock;
        self
    }

    /// The physical clock under the host's HLC (default: the TSC clock,
    /// re-anchored to wall time). Device loops keep their own clocks; a
    /// skewed host clock is how tests show every domain boundary merges.
    pub fn host_clock(mut self, clock: Arc<dyn PhysicalClock>) -> Self {
        self.host_clock = clock;
        self
    }

    /// Where tells that were accepted and will never be processed go (a
    /// fault or termination left them in H2K), and messages kernels sent
    /// that could not be delivered. Called on the thread that recovers the
    /// slot (the actor's own) or on the poller thread: it must not block.
    /// Without a sink they are logged; [`Runtime::dead_letters`] counts them
    /// either way.
    pub fn dead_letters(mut self, sink: impl Fn(DeadLetter) + Send + Sync + 'static) -> Self {
        self.dead_letters = Some(Arc::new(sink));
        self
    }

    /// Starts the runtime and its poller thread.
    ///
    /// # Errors
    /// [`LaunchError::NoHandler`] for a backend this build cannot run (only
    /// `Cpu` lives in the core), [`LaunchError::Spawn`] if the poller thread
    /// cannot start.
    pub fn build(self) -> Result<Runtime, LaunchError> {
        // A GPU backend needs its device (its crate gives one).
        if self.device.as_ref().map_or(BackendKind::Cpu, |d| d.kind()) != self.backend {
            return Err(LaunchError::NoHandler {
                kernel: "<runtime>",
                backend: self.backend,
            });
        }
        let hlc = Arc::new(DynHlc::with_clock(
            ClockDomain::host(self.node),
            self.host_clock,
        ));
        let shared = Arc::new(PollerShared {
            bell: Doorbell::new(),
            thread: OnceLock::new(),
            incoming: Mutex::new(Vec::new()),
            has_incoming: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            hlc: hlc.clone(),
            watchdog_ns: self.watchdog.as_nanos().min(u64::MAX as u128) as u64,
            watchdog_clock: self.watchdog_clock,
            registry: crate::registry::Registry::new(hlc),
            dead_letters: self.dead_letters,
            dead_letter_count: AtomicU64::new(0),
            routed: AtomicU64::new(0),
            spinners: AtomicUsize::new(0),
            max_spinners: std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .max(1),
        });
        let for_thread = shared.clone();
        let join = std::thread::Builder::new()
            .name(format!("ringkernel-poller-{}", self.node))
            .spawn(move || poller_loop(&for_thread))
            .map_err(|e| LaunchError::Spawn(e.to_string()))?;
        let _ = shared.thread.set(join.thread().clone());
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                node: self.node,
                backend: self.backend,
                max_slots: self.max_slots,
                live_slots: Arc::new(AtomicUsize::new(0)),
                next_index: AtomicU32::new(0),
                poller: shared,
                join: Mutex::new(Some(join)),
                homes: Mutex::new(std::collections::HashMap::new()),
                links: Mutex::new(LinkGraph::default()),
                device: self.device,
            }),
        })
    }
}

/// A GPU-actor runtime: one poller thread and the actor slots it serves.
/// Cheap to clone; the poller stops when the runtime and every slot it
/// launched are dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("node", &self.inner.node)
            .field("backend", &self.inner.backend)
            .field("slots", &self.inner.live_slots.load(Ordering::Relaxed))
            .finish()
    }
}

struct RuntimeInner {
    node: u16,
    backend: BackendKind,
    max_slots: usize,
    live_slots: Arc<AtomicUsize>,
    next_index: AtomicU32,
    poller: Arc<PollerShared>,
    join: Mutex<Option<JoinHandle<()>>>,
    /// Every home made here, by actor index (for `connect`).
    homes: Mutex<std::collections::HashMap<u32, std::sync::Weak<HomeCore>>>,
    links: Mutex<LinkGraph>,
    /// The device backend slots launch on (`None`: the cpu backend).
    device: Option<Arc<dyn crate::backend::DeviceBackend>>,
}

/// A device slot's control block and rings, laid out in one region of the
/// backend's memory: control block, H2K, K2H (each at a 128-byte offset).
#[allow(clippy::type_complexity)]
fn slot_memory(
    device: &dyn crate::backend::DeviceBackend,
    h2k: crate::ring::RingLayout,
    k2h: crate::ring::RingLayout,
) -> Result<
    (
        ControlRef,
        (crate::ring::Producer, crate::ring::Consumer),
        (crate::ring::Producer, crate::ring::Consumer),
    ),
    String,
> {
    use crate::region::REGION_ALIGN;
    let at_h2k = crate::control::CONTROL_BLOCK_SIZE.next_multiple_of(REGION_ALIGN);
    let at_k2h = (at_h2k + h2k.region_bytes()).next_multiple_of(REGION_ALIGN);
    let bytes = at_k2h + k2h.region_bytes();
    let mem = device.slot_memory(bytes)?;
    if mem.len() < bytes {
        return Err(format!(
            "the backend gave {} bytes of slot memory, {bytes} were asked",
            mem.len()
        ));
    }
    // SAFETY: the region is fresh from the backend, for this slot alone;
    // the three spans are disjoint, and each half not used here is handed
    // to the device loop (the runtime's only other user of the region).
    unsafe {
        let control = ControlRef::init_in(mem.clone(), 0).map_err(|e| e.to_string())?;
        let h2k =
            crate::ring::Ring::init_in(mem.clone(), at_h2k, h2k).map_err(|e| e.to_string())?;
        let k2h = crate::ring::Ring::init_in(mem, at_k2h, k2h).map_err(|e| e.to_string())?;
        Ok((control, h2k, k2h))
    }
}

/// A kernel's code for the backend it launches on.
enum Code<K: Kernel> {
    Cpu(crate::kernel::CpuHandlers<K>),
    Device(
        Arc<dyn crate::backend::DeviceBackend>,
        crate::backend::DeviceCode,
    ),
}

/// The K2K links of a runtime, as a graph of actor indices.
#[derive(Default)]
struct LinkGraph {
    next: u32,
    edges: Vec<(u32, u32, bool, std::sync::Weak<Link>)>,
}

impl LinkGraph {
    /// Drops the edges of closed links.
    fn prune(&mut self) {
        self.edges
            .retain(|(_, _, _, l)| l.upgrade().is_some_and(|l| l.control.closed() == 0));
    }

    /// A path of waiting edges from `start` to `goal`, if there is one.
    fn waiting_path(&self, start: u32, goal: u32) -> Option<Vec<u32>> {
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![vec![start]];
        while let Some(path) = stack.pop() {
            let at = *path.last()?;
            if at == goal {
                return Some(path);
            }
            if !seen.insert(at) {
                continue;
            }
            for &(from, to, waits, _) in &self.edges {
                if from == at && waits {
                    let mut next = path.clone();
                    next.push(to);
                    stack.push(next);
                }
            }
        }
        None
    }
}

impl RuntimeInner {
    fn dead_letter(&self, letter: DeadLetter) {
        self.poller.dead_letter(letter);
    }
}

impl PollerShared {
    /// Hands a letter to the dead-letter sink (and counts it).
    pub(crate) fn dead_letter(&self, letter: DeadLetter) {
        self.dead_letter_count.fetch_add(1, Ordering::Relaxed);
        match &self.dead_letters {
            Some(sink) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(letter))).is_err()
                {
                    tracing::error!("the dead-letter sink panicked");
                }
            }
            None => {
                tracing::warn!(actor = ?letter.actor, seq = letter.seq, reason = ?letter.reason, "dead letter")
            }
        }
    }
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.poller.shutdown.store(true, Ordering::Release);
        self.poller.wake();
        let join = self.join.lock().map(|mut j| j.take()).unwrap_or(None);
        if let Some(join) = join {
            // The poller never blocks on user code, so this join is bounded.
            let _ = join.join();
        }
    }
}

/// What the poller tells the framework adapter about a slot.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotEvent {
    /// The slot faulted; every in-flight ask has been failed.
    Faulted(Fault),
}

type EventSink = Box<dyn Fn(SlotEvent) + Send + Sync>;

impl Runtime {
    /// A runtime with default options on the cpu backend.
    ///
    /// # Errors
    /// As [`RuntimeBuilder::build`].
    pub fn new() -> Result<Self, LaunchError> {
        RuntimeBuilder::default().build()
    }

    /// Configures a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// The backend this runtime launches kernels on.
    pub fn backend(&self) -> BackendKind {
        self.inner.backend
    }

    /// The node id.
    pub fn node(&self) -> u16 {
        self.inner.node
    }

    /// A new actor identity on this runtime: launch its incarnations with
    /// [`Runtime::launch_in`].
    pub fn home<W: Waiter>(&self) -> ActorHome<W> {
        let index = self.inner.next_index.fetch_add(1, Ordering::Relaxed);
        let runtime = Arc::downgrade(&self.inner);
        let home = ActorHome::new(
            self.inner.node,
            index,
            Box::new(move |letter| {
                if let Some(rt) = runtime.upgrade() {
                    rt.dead_letter(letter);
                }
            }),
        );
        let mut homes = lock(&self.inner.homes);
        homes.retain(|_, h| h.strong_count() > 0);
        homes.insert(index, Arc::downgrade(home.core()));
        home
    }

    /// Links GPU actor `from` to GPU actor `to` with a K2K ring: from now
    /// on `from`'s handlers' sends to `to` (any incarnation) go slot to slot,
    /// with no host thread on the path (see [`link`](crate::link)). The link
    /// outlives restarts of either actor and closes when either's home is
    /// dropped.
    ///
    /// # Errors
    /// [`ConnectError`]: an actor unknown here (or never launched), not two
    /// distinct GPU actors of this runtime, linked already, a bad capacity,
    /// or an edge that would close a cycle of waiting links.
    pub fn connect(
        &self,
        from: ActorId,
        to: ActorId,
        options: LinkOptions,
    ) -> Result<LinkId, ConnectError> {
        for id in [from, to] {
            if id.node() != self.inner.node || id.kind() != Some(ActorKind::Gpu) {
                return Err(ConnectError::NotLinkable(id));
            }
        }
        if self
            .inner
            .device
            .as_ref()
            .is_some_and(|d| !d.serves_links())
        {
            // The backend's loop does not serve links.
            return Err(ConnectError::Unsupported(self.inner.backend));
        }
        if from.index() == to.index() {
            return Err(ConnectError::NotLinkable(from));
        }
        crate::ring::RingLayout::with_capacity(options.capacity)?;
        let find = |id: ActorId| {
            lock(&self.inner.homes)
                .get(&id.index())
                .and_then(std::sync::Weak::upgrade)
                .filter(|h| !h.is_gone() && !h.served().is_empty())
                .ok_or(ConnectError::Unknown(id))
        };
        let (sender, receiver) = (find(from)?, find(to)?);
        let mut graph = lock(&self.inner.links);
        graph.prune();
        if self
            .inner
            .device
            .as_ref()
            .is_some_and(|d| d.links_in_place())
        {
            // Checked under the graph's lock: concurrent connects cannot
            // both take the last row.
            // Its device reads each slot's links from a table of fixed rows.
            let max = crate::link::MAX_SLOT_LINKS;
            if sender.links().2.len() >= max {
                return Err(ConnectError::SlotLinks {
                    actor: from,
                    inbound: false,
                });
            }
            if receiver.links().1.len() >= max {
                return Err(ConnectError::SlotLinks {
                    actor: to,
                    inbound: true,
                });
            }
        }
        if sender.links_to(to.index()) {
            return Err(ConnectError::AlreadyLinked { from, to });
        }
        if !options.report_failures
            && let Some(path) = graph.waiting_path(to.index(), from.index())
        {
            let node = self.inner.node;
            return Err(ConnectError::Cycle {
                from,
                to,
                path: path
                    .into_iter()
                    .map(|i| ActorId::new(node, ActorKind::Gpu, i, 0))
                    .collect(),
            });
        }
        let id = LinkId(graph.next);
        if graph.next >= crate::link::MAX_LINKS {
            return Err(ConnectError::TooManyLinks);
        }
        graph.next += 1;
        let link = Arc::new(Link::new(
            id,
            (from.with_incarnation(0), to.with_incarnation(0)),
            options,
            receiver.waker.clone(),
            Arc::downgrade(&sender),
            receiver.served(),
            &|bytes| match &self.inner.device {
                // Where its device can serve the link in place.
                Some(d) => d.slot_memory(bytes),
                None => Ok(Arc::new(crate::region::HeapRegion::zeroed(bytes))),
            },
        )?);
        if !receiver.attach_inbound(link.clone()) {
            return Err(ConnectError::Unknown(to));
        }
        if !sender.attach_outbound(link.clone()) {
            receiver.detach_inbound(&link);
            return Err(ConnectError::Unknown(from));
        }
        graph.edges.push((
            from.index(),
            to.index(),
            !options.report_failures,
            Arc::downgrade(&link),
        ));
        tracing::debug!(?from, ?to, link = id.get(), "linked");
        Ok(id)
    }

    /// The counters of a link, while it is open.
    pub fn link_stats(&self, id: LinkId) -> Option<LinkStats> {
        lock(&self.inner.links)
            .edges
            .iter()
            .filter_map(|(_, _, _, l)| l.upgrade())
            .find(|l| l.id == id && !l.receiver_gone())
            .map(|l| l.stats())
    }

    /// Messages kernels sent that the poller routed (K2K sends never are).
    pub fn routed_messages(&self) -> u64 {
        self.inner.poller.routed.load(Ordering::Relaxed)
    }

    /// This runtime's registry: mailboxes of CPU and GPU actors by id, and
    /// topics (see [`registry`](crate::registry)).
    pub fn registry(&self) -> &crate::registry::Registry {
        &self.inner.poller.registry
    }

    /// Reports a message that was accepted and can never be delivered (an
    /// adapter's refusal after the fact) to the dead-letter sink.
    pub fn report_dead_letter(&self, letter: DeadLetter) {
        self.inner.dead_letter(letter);
    }

    /// The number of dead letters so far (see [`RuntimeBuilder::dead_letters`]).
    pub fn dead_letters(&self) -> u64 {
        self.inner.poller.dead_letter_count.load(Ordering::Relaxed)
    }

    /// Launches an actor slot of kernel `K` with initial `state`, as a new
    /// actor (its first incarnation). The kernel is launched once and keeps
    /// its state between messages. `events` receives the slot's
    /// [`SlotEvent`]s on the poller thread (it must not block).
    ///
    /// # Errors
    /// [`LaunchError`]: no handler for this backend, an option out of range,
    /// a bad declaration, too many slots, or a failed thread start.
    pub fn launch<K: Kernel, W: Waiter>(
        &self,
        state: K::State,
        options: &LaunchOptions,
        events: impl Fn(SlotEvent) + Send + Sync + 'static,
    ) -> Result<GpuSlot<W>, LaunchError> {
        self.launch_in::<K, W>(&self.home(), state, options, events)
    }

    /// Launches the next incarnation of the actor `home`: the same actor
    /// index, the incarnation number one higher, starting from the home's
    /// latest checkpoint if it has one (else from `state`). Messages the
    /// previous incarnation handed back for replay wait in the home until
    /// [`GpuSlot::replay`] sends them.
    ///
    /// # Errors
    /// As [`Runtime::launch`], and [`LaunchError::IncarnationLive`] while
    /// the previous incarnation is not fenced,
    /// [`LaunchError::CheckpointMismatch`] for a checkpoint of another
    /// state type.
    pub fn launch_in<K: Kernel, W: Waiter>(
        &self,
        home: &ActorHome<W>,
        state: K::State,
        options: &LaunchOptions,
        events: impl Fn(SlotEvent) + Send + Sync + 'static,
    ) -> Result<GpuSlot<W>, LaunchError> {
        let (h2k_layout, k2h_layout) = options.validate()?;
        if !K::WIDTH.is_valid() {
            return Err(LaunchError::InvalidWidth(K::WIDTH));
        }
        let no_handler = LaunchError::NoHandler {
            kernel: K::NAME,
            backend: self.inner.backend,
        };
        let (code, mut served) = match &self.inner.device {
            None => {
                let Some(handlers) = K::cpu_handlers() else {
                    return Err(no_handler);
                };
                let served = handlers.type_ids();
                (Code::Cpu(handlers), served)
            }
            Some(device) => {
                let code = crate::backend::DeviceCode::of::<K>();
                let Some(types) = code
                    .types_for(device.kind())
                    .filter(|_| device.has_handler(&code))
                else {
                    return Err(no_handler);
                };
                // No option is accepted and ignored.
                if !device.supports_width(K::WIDTH.threads()) {
                    return Err(LaunchError::Unsupported {
                        backend: self.inner.backend,
                        what: "an execution width wider than its handlers can run",
                    });
                }
                if options.checkpoint_every > 0 {
                    return Err(LaunchError::Unsupported {
                        backend: self.inner.backend,
                        what: "checkpoint_every",
                    });
                }
                #[cfg(feature = "fault-injection")]
                if options.injector.is_some() {
                    return Err(LaunchError::Unsupported {
                        backend: self.inner.backend,
                        what: "fault injection",
                    });
                }
                let max_later = code.max_later_for(device.kind());
                let limit = crate::backend::MAX_LATER.min(k2h_layout.capacity() - 1);
                if max_later > limit {
                    return Err(LaunchError::TooManyLater { max_later, limit });
                }
                (Code::Device(device.clone(), code), types.to_vec())
            }
        };
        served.sort_unstable();
        for pair in served.windows(2) {
            if pair[0] == pair[1] {
                return Err(LaunchError::BadTypeId { type_id: pair[0] });
            }
        }
        if let Some(&bad) = served
            .iter()
            .find(|&&t| t == 0 || t >= crate::envelope::SYSTEM_TYPE_BASE)
        {
            return Err(LaunchError::BadTypeId { type_id: bad });
        }
        if let Some(c) = home.checkpoint()
            && (c.kernel != K::NAME || c.bytes.len() != std::mem::size_of::<K::State>())
        {
            return Err(LaunchError::CheckpointMismatch {
                kernel: c.kernel,
                len: c.bytes.len(),
            });
        }
        let live = &self.inner.live_slots;
        if live.fetch_add(1, Ordering::AcqRel) >= self.inner.max_slots {
            live.fetch_sub(1, Ordering::AcqRel);
            return Err(LaunchError::TooManySlots {
                max: self.inner.max_slots,
            });
        }
        let guard = SlotCount(live.clone());

        // A device backend gives the memory its device sees (pinned and
        // mapped on CUDA); the cpu backend's is the heap.
        let (control, (h2k, h2k_rx), (k2h_tx, k2h)) = match &self.inner.device {
            None => (
                ControlRef::new(),
                crate::ring::Ring::new(h2k_layout),
                crate::ring::Ring::new(k2h_layout),
            ),
            Some(device) => slot_memory(&**device, h2k_layout, k2h_layout).map_err(|message| {
                LaunchError::Backend {
                    backend: self.inner.backend,
                    message,
                }
            })?,
        };
        let (incarnation, checkpoint) = home
            .core()
            .begin(&control, &served)
            .map_err(|incarnation| LaunchError::IncarnationLive { incarnation })?;
        let state = checkpoint.map_or(state, |c| bytemuck::pod_read_unaligned(&c.bytes));
        let index = home.core().index;
        let id = ActorId::new(self.inner.node, ActorKind::Gpu, index, incarnation);
        // From here on a failure must fence the incarnation it began, or the
        // home could never start another.
        let abort = |e: String| {
            control.fence();
            home.core().ended(incarnation, 0, Ending::Terminated);
            home.core().recovered(&control);
            LaunchError::Spawn(e)
        };
        // The device side reads the incarnation it serves from the control
        // block (its acknowledgements carry it; a link's commit word is
        // keyed by it).
        control
            .begin_incarnation(u32::from(incarnation))
            .map_err(|e| abort(e.to_string()))?;
        let waiters = WaiterSlab::new(options.max_in_flight, incarnation)
            .map_err(|e| abort(e.to_string()))?;
        let shared = Arc::new(SlotShared {
            id,
            name: K::NAME,
            control: control.clone(),
            home: home.core().clone(),
            policy: options.on_fault,
            waiters,
            h2k: h2k.observer(),
            closed: AtomicBool::new(false),
            fault: OnceLock::new(),
            device: OnceLock::new(),
            space: Arc::new(SpaceWaker::default()),
            bad_replies: AtomicU64::new(0),
            link_fences: OnceLock::new(),
            backend: match &code {
                Code::Device(b, _) => Some(b.clone()),
                Code::Cpu(_) => None,
            },
            events: Box::new(events),
            _count: guard,
        });
        let reader = K2hReader::new(k2h);
        for target in [
            LifecycleState::Launched,
            if options.auto_activate {
                LifecycleState::Active
            } else {
                LifecycleState::Deactivated
            },
        ] {
            control.request(target).map_err(|e| abort(e.to_string()))?;
        }
        let (thread, device) = match code {
            Code::Cpu(handlers) => {
                let device = crate::cpu::spawn::<K>(crate::cpu::SlotParts {
                    id,
                    node: self.inner.node,
                    state,
                    handlers,
                    served: served.clone(),
                    control: control.clone(),
                    h2k: h2k_rx,
                    k2h: k2h_tx,
                    poller: self.inner.poller.clone(),
                    deliver: reply_drain(&shared, reader.clone(), self.inner.poller.clone()),
                    space: shared.space.clone(),
                    max_in_flight: options.max_in_flight,
                    home: home.core().clone(),
                    checkpoint_every: options.checkpoint_every,
                    #[cfg(feature = "fault-injection")]
                    injector: options.injector.clone(),
                })
                .map_err(|e| abort(e.to_string()))?;
                (device.thread().clone(), Some(device))
            }
            Code::Device(backend, code) => {
                let poller = self.inner.poller.clone();
                let space = shared.space.clone();
                let thread = backend
                    .launch(crate::backend::DeviceSlot {
                        id,
                        kernel: K::NAME,
                        control: control.clone(),
                        h2k: h2k_rx,
                        k2h: k2h_tx,
                        served: served.clone(),
                        width: K::WIDTH.threads(),
                        state: bytemuck::bytes_of(&state).to_vec(),
                        domain: ClockDomain::unit(self.inner.node, (index as u16).wrapping_add(1)),
                        code,
                        wake_host: Box::new(move || poller.wake()),
                        wake_senders: Box::new(move || space.wake_if_wanted()),
                        links: crate::link::LinkPort::new(
                            home.core().clone(),
                            self.inner.poller.clone(),
                            id,
                            served.clone(),
                        ),
                    })
                    .map_err(|message| {
                        let _ = abort(String::new());
                        LaunchError::Backend {
                            backend: self.inner.backend,
                            message,
                        }
                    })?;
                (thread, None)
            }
        };
        let _ = shared.device.set(thread.clone());
        // K2K senders ring this incarnation's doorbell from now on.
        home.core().waker.set(Some(WakeTarget {
            control: control.clone(),
            thread,
        }));
        // A sender that rang the old doorbell meanwhile: the new loop looks
        // again.
        home.core().waker.wake();
        self.inner.poller.add(Box::new(PolledSlot {
            shared: shared.clone(),
            reader,
            watch: Watch::default(),
            links: Vec::new(),
            links_generation: u64::MAX,
        }));
        tracing::debug!(kernel = K::NAME, actor = ?id, incarnation, "launched");
        Ok(GpuSlot {
            shared,
            h2k,
            served: served.into_boxed_slice(),
            seq: 0,
            device,
            runtime: self.inner.clone(),
            home: home.clone(),
            settled: None,
        })
    }
}

/// Decrements the runtime's slot count when the slot is gone.
struct SlotCount(Arc<AtomicUsize>);

impl Drop for SlotCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Completes a waiter; a panicking `Waiter` implementation must not take
/// the poller (and every other slot's callers) down with it.
pub(crate) fn complete<W: Waiter>(waiter: W, outcome: Result<Reply, AskError>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| waiter.complete(outcome))).is_err()
    {
        tracing::error!("a Waiter::complete implementation panicked");
    }
}

/// What the sender, the poller and the device loop share about one slot.
pub(crate) struct SlotShared<W> {
    id: ActorId,
    name: &'static str,
    control: ControlRef,
    home: Arc<HomeCore>,
    policy: PendingPolicy,
    waiters: WaiterSlab<W>,
    h2k: RingObserver,
    closed: AtomicBool,
    fault: OnceLock<Fault>,
    device: OnceLock<Thread>,
    space: Arc<SpaceWaker>,
    bad_replies: AtomicU64,
    /// How far this incarnation had consumed each link into it when it was
    /// fenced (final for its epoch).
    link_fences: OnceLock<Vec<(LinkId, u64)>>,
    /// The device backend serving the slot (none on the cpu backend).
    backend: Option<Arc<dyn crate::backend::DeviceBackend>>,
    events: EventSink,
    _count: SlotCount,
}

impl<W: Waiter> SlotShared<W> {
    fn wake_device(&self) {
        if let Some(t) = self.device.get() {
            self.control.doorbell().ring(|| t.unpark());
        }
    }

    fn wake_device_lazy(&self) {
        if let Some(t) = self.device.get() {
            self.control.doorbell().ring_lazy(|| t.unpark());
        }
    }

    /// Fences the incarnation (no commit of its device loop succeeds from
    /// now on) and records how it ended; returns the last committed `seq`.
    fn fence(&self, ending: Ending) -> u64 {
        if let Some(b) = &self.backend {
            b.quiesce(&self.control);
        }
        let committed = self.control.fence();
        let links = self.home.fence_links(self.id.incarnation());
        let _ = self.link_fences.set(links);
        self.home.ended(self.id.incarnation(), committed, ending);
        committed
    }

    /// Closes the slot and fails every waiter with `error`. Idempotent.
    fn close_and_sweep(&self, error: AskError) -> usize {
        self.closed.store(true, Ordering::Release);
        // Pairs with the fence in `GpuSlot::ask` after it published: either
        // the sender sees `closed` and takes its waiter back, or this sweep
        // sees the waiter it inserted.
        fence(Ordering::SeqCst);
        let swept = self.waiters.sweep(|_, w| complete(w, Err(error)));
        self.space.wake_if_wanted();
        swept
    }
}

/// The writing end of one GPU actor: owned by the framework actor, the only
/// writer of the slot's H2K ring.
pub struct GpuSlot<W: Waiter> {
    shared: Arc<SlotShared<W>>,
    h2k: Producer,
    served: Box<[u32]>,
    seq: u64,
    device: Option<JoinHandle<()>>,
    runtime: Arc<RuntimeInner>,
    home: ActorHome<W>,
    /// Set by [`GpuSlot::recover`]: the fault it settled with (if any) and
    /// whether it kept messages for replay. `hand_back` follows it, so
    /// every message of one incarnation gets one disposition.
    settled: Option<(Option<Fault>, bool)>,
}

/// What [`GpuSlot::recover`] did with the messages a fenced incarnation
/// left unprocessed in its H2K ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Asks resolved with the fault (or `Terminated`).
    pub failed_asks: usize,
    /// Tells handed to the dead-letter sink.
    pub dead_letters: usize,
    /// Messages kept in the home for the next incarnation.
    pub replayed: usize,
    /// The `seq` of the last message the incarnation committed.
    pub committed_seq: u64,
}

/// Where [`GpuSlot::replay`] stopped.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayStatus {
    /// Every handed-back message was sent.
    Done,
    /// The ring is full: await [`GpuSlot::space`] and call again.
    Full,
    /// This incarnation closed too; the rest waits for the next one.
    Closed,
}

impl<W: Waiter> fmt::Debug for GpuSlot<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuSlot")
            .field("id", &self.shared.id)
            .field("kernel", &self.shared.name)
            .field("status", &self.status())
            .finish()
    }
}

/// A handle on a slot's lifecycle that does not own its H2K ring: cheap to
/// clone and usable from any thread, e.g. to activate an actor whose own
/// handler is held by a full ring.
#[derive(Clone)]
pub struct SlotController {
    control: ControlRef,
    h2k: RingObserver,
    device: Option<Thread>,
    id: ActorId,
}

impl fmt::Debug for SlotController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotController")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SlotController {
    fn request(&self, state: LifecycleState) -> Result<(), StateError> {
        self.control.request(state)?;
        if let Some(t) = &self.device {
            self.control.doorbell().ring(|| t.unpark());
        }
        Ok(())
    }

    /// Requests `Active`.
    ///
    /// # Errors
    /// [`StateError::InvalidTransition`].
    pub fn activate(&self) -> Result<(), StateError> {
        self.request(LifecycleState::Active)
    }

    /// Requests `Deactivated`.
    ///
    /// # Errors
    /// [`StateError::InvalidTransition`].
    pub fn deactivate(&self) -> Result<(), StateError> {
        self.request(LifecycleState::Deactivated)
    }

    /// The device side's status.
    ///
    /// # Errors
    /// [`StateError::UnknownState`] for a corrupt control block.
    pub fn status(&self) -> Result<SlotStatus, StateError> {
        self.control.status()
    }

    /// Messages waiting in H2K.
    pub fn h2k_depth(&self) -> u64 {
        self.h2k.len()
    }

    /// The actor's id.
    pub fn id(&self) -> ActorId {
        self.id
    }
}

/// The lifecycle handle of an actor across its incarnations: the
/// [`SlotController`] of whichever incarnation serves now. An adapter
/// [`set`](ActorController::set)s it at each launch, so a handle taken
/// before the actor first starts follows every restart. It bypasses the
/// actor's mailbox (cheap to clone, usable from any thread): it reaches a
/// kernel whose actor a full ring holds.
#[derive(Clone, Debug, Default)]
pub struct ActorController(Arc<Mutex<Option<SlotController>>>);

impl ActorController {
    /// A handle with no incarnation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `controller` the serving incarnation's. For adapters: call it
    /// at each launch, before anything that waits on the new slot (its
    /// replay), so the handle reaches the incarnation that is starting.
    pub fn set(&self, controller: SlotController) {
        *lock(&self.0) = Some(controller);
    }

    /// The serving incarnation's controller; `None` before the first launch.
    pub fn current(&self) -> Option<SlotController> {
        lock(&self.0).clone()
    }

    /// Activates the kernel.
    ///
    /// # Errors
    /// [`CallError::Closed`] before the actor started, or when the
    /// incarnation's state refuses the transition (it faulted or stopped).
    pub fn activate(&self) -> Result<(), CallError> {
        let current = self.current().ok_or(CallError::Closed)?;
        current.activate().map_err(|_| CallError::Closed)
    }

    /// Deactivates the kernel: messages wait in H2K until activation.
    ///
    /// # Errors
    /// As [`ActorController::activate`].
    pub fn deactivate(&self) -> Result<(), CallError> {
        let current = self.current().ok_or(CallError::Closed)?;
        current.deactivate().map_err(|_| CallError::Closed)
    }

    /// Messages waiting in H2K.
    ///
    /// # Errors
    /// [`CallError::Closed`] before the actor started.
    pub fn h2k_depth(&self) -> Result<u64, CallError> {
        Ok(self.current().ok_or(CallError::Closed)?.h2k_depth())
    }
}

/// What [`GpuSlot::terminate`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TerminateReport {
    /// Whether the device loop acknowledged `Terminated` within the timeout.
    pub acknowledged: bool,
    /// Messages left unprocessed in the H2K ring (their asks are among the
    /// failed waiters; tells among them are dead letters).
    pub unprocessed: u64,
    /// Asks failed with [`AskError::Terminated`].
    pub failed_asks: usize,
}

impl<W: Waiter> GpuSlot<W> {
    /// The actor's id.
    pub fn id(&self) -> ActorId {
        self.shared.id
    }

    /// The kernel's name.
    pub fn kernel_name(&self) -> &'static str {
        self.shared.name
    }

    /// The message type ids the kernel serves.
    pub fn served_types(&self) -> &[u32] {
        &self.served
    }

    /// The actor's identity across incarnations.
    pub fn home(&self) -> &ActorHome<W> {
        &self.home
    }

    /// The incarnation this slot serves.
    pub fn incarnation(&self) -> u16 {
        self.shared.id.incarnation()
    }

    /// Hands back what a fenced incarnation left unprocessed: every message
    /// still in H2K past the last one it committed. Asks resolve with the
    /// fault, tells become dead letters — or, under
    /// [`PendingPolicy::Replay`] after a fault, both wait in the
    /// [`ActorHome`] for the next incarnation. Then every other waiter
    /// (asks the kernel took and never answered) fails.
    ///
    /// Adapters call it when they handle [`SlotEvent::Faulted`];
    /// [`GpuSlot::terminate`] and `Drop` call it too. Only the first call
    /// does anything; a slot that is not closed is left alone.
    pub fn recover(&mut self) -> Recovery {
        if self.settled.is_some() || self.is_open() {
            return Recovery::default();
        }
        let fault = self.fault();
        let (error, reason, ending) = match fault {
            Some(f) => (
                AskError::Faulted(f),
                DeadLetterReason::Faulted(f),
                Ending::Faulted(f),
            ),
            None => (
                AskError::Terminated,
                DeadLetterReason::Terminated,
                Ending::Terminated,
            ),
        };
        let committed = self.shared.fence(ending);
        let replay = fault.is_some() && self.shared.policy == PendingPolicy::Replay;
        self.settled = Some((fault, replay));
        // The message that was in a handler when the incarnation failed may
        // be what killed it: it is failed, never replayed (a poison message
        // would otherwise fault every incarnation after it).
        let serving = self.shared.control.serving();
        let culprit = (replay && serving > committed).then_some(serving);
        // After a fault under `Fail`, the poller has already failed every
        // waiter (promptly, without waiting for this call).
        let swept = fault.is_some() && !replay;
        let mut report = Recovery {
            committed_seq: committed,
            ..Recovery::default()
        };
        let mut replays = Vec::new();
        let mut letters = Vec::new();
        let check = HeaderCheck::any_type(MAX_INLINE as u32);
        let (shared, actor) = (&self.shared, self.shared.id);
        self.h2k.unconsumed_with(&check, |env| {
            let Ok(env) = env else { return };
            let h = env.header;
            if h.seq <= committed {
                return;
            }
            let payload = Payload::from_parts(h.type_id, env.payload);
            if h.flags.contains(Flags::ASK) {
                if swept {
                    return;
                }
                // A waiter already taken was answered (or swept) before.
                let Ok(waiter) = shared.waiters.take(h.correlation) else {
                    return;
                };
                if replay && culprit != Some(h.seq) {
                    replays.push(Replay::Ask {
                        payload,
                        waiter,
                        src: h.src,
                    });
                } else {
                    report.failed_asks += 1;
                    complete(waiter, Err(error));
                }
            } else if replay && culprit != Some(h.seq) {
                replays.push(Replay::Tell {
                    payload,
                    src: h.src,
                });
            } else {
                letters.push(DeadLetter {
                    actor,
                    src: h.src,
                    seq: h.seq,
                    payload,
                    reason,
                });
            }
        });
        // Links into the actor: what this incarnation left in them waits for
        // the next one (replay) — except the message in a handler when it
        // failed — or is dead-lettered (fail, stop).
        let incarnation = self.shared.id.incarnation();
        let (_, inbound, _) = self.home.core().links();
        for link in inbound {
            let (epoch, _, _) = link.control.commit_state();
            if epoch != incarnation {
                continue;
            }
            let (consumed, pending) = link.unconsumed();
            let poisoned = crate::link::link_of_origin(serving)
                .is_some_and(|(id, pos)| id == link.id && !crate::link::passed(consumed, pos));
            let lost = if replay {
                usize::from(poisoned && !pending.is_empty())
            } else {
                pending.len()
            };
            for m in &pending[..lost] {
                letters.push(DeadLetter {
                    actor,
                    src: m.header.src,
                    seq: 0,
                    payload: Payload::from_parts(m.header.type_id, m.payload()),
                    reason,
                });
            }
            link.hand_back(lost as u64);
        }
        report.replayed = replays.len();
        report.dead_letters = letters.len();
        self.home.push_front_replays(replays);
        for letter in letters {
            self.runtime.dead_letter(letter);
        }
        report.failed_asks += self.shared.close_and_sweep(error);
        // The next incarnation may start now.
        self.home.core().recovered(&self.shared.control);
        tracing::debug!(actor = ?actor, ?report, "recovered");
        report
    }

    /// Stops the slot without waiting (what `Drop` does): stops intake,
    /// asks the device loop to terminate, and [`recover`](GpuSlot::recover)s
    /// at once — fencing the incarnation, so a message it has not committed
    /// by now is handed back, never processed. [`GpuSlot::terminate`] is
    /// the graceful stop that waits for the device loop first.
    pub fn stop(&mut self) -> Recovery {
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.shared.control.request(LifecycleState::Terminated);
        self.shared.wake_device();
        self.recover()
    }

    /// Applies the slot's [`PendingPolicy`] to a message the actor accepted
    /// but had not sent to H2K when the slot closed (an adapter's ordered
    /// overflow): kept for replay after a fault under
    /// [`PendingPolicy::Replay`] (behind what [`GpuSlot::recover`] kept),
    /// else failed — an ask resolves with the fault or `Terminated`, a tell
    /// becomes a dead letter.
    pub fn hand_back(&mut self, item: Replay<W>) {
        let (fault, replay) = self.settled.unwrap_or_else(|| {
            let fault = self.fault();
            (
                fault,
                fault.is_some() && self.shared.policy == PendingPolicy::Replay,
            )
        });
        if replay {
            self.home.push_back_replay(item);
            return;
        }
        let error = fault.map_or(AskError::Terminated, AskError::Faulted);
        let reason = fault.map_or(DeadLetterReason::Terminated, DeadLetterReason::Faulted);
        match item {
            Replay::Ask { waiter, .. } => complete(waiter, Err(error)),
            Replay::Tell { payload, src } => self.runtime.dead_letter(DeadLetter {
                actor: self.shared.id,
                src,
                seq: 0,
                payload,
                reason,
            }),
        }
    }

    /// Reports a message this actor accepted and can never serve (say, a
    /// delivery of a type its kernel does not serve) as a dead letter.
    pub fn dead_letter(&self, payload: Payload, src: ActorId, reason: DeadLetterReason) {
        self.runtime.dead_letter(DeadLetter {
            actor: self.shared.id,
            src,
            seq: 0,
            payload,
            reason,
        });
    }

    /// Sends the messages an earlier incarnation handed back for replay,
    /// oldest first; call it before sending anything new.
    pub fn replay(&mut self) -> ReplayStatus {
        while let Some(item) = self.home.pop_replay() {
            let result = match item {
                Replay::Ask {
                    payload,
                    waiter,
                    src,
                } => self.ask(payload, waiter, src).map(|_| ()).map_err(|e| {
                    e.map(|(payload, waiter)| Replay::Ask {
                        payload,
                        waiter,
                        src,
                    })
                }),
                Replay::Tell { payload, src } => self
                    .tell(payload, src)
                    .map_err(|e| e.map(|payload| Replay::Tell { payload, src })),
            };
            match result {
                Ok(()) => {}
                Err(SubmitError::Full(item)) => {
                    self.home.unpop_replay(item);
                    return ReplayStatus::Full;
                }
                Err(SubmitError::Closed(item)) => {
                    self.home.unpop_replay(item);
                    return ReplayStatus::Closed;
                }
                // Another kernel was launched in this home: it can never
                // serve the message.
                Err(SubmitError::UnknownType { value, .. }) => match value {
                    Replay::Ask { waiter, .. } => complete(waiter, Err(AskError::NoReply)),
                    Replay::Tell { payload, src } => self.runtime.dead_letter(DeadLetter {
                        actor: self.shared.id,
                        src,
                        seq: 0,
                        payload,
                        reason: DeadLetterReason::Terminated,
                    }),
                },
            }
        }
        ReplayStatus::Done
    }

    /// A lifecycle handle that does not own the H2K ring.
    pub fn controller(&self) -> SlotController {
        SlotController {
            control: self.shared.control.clone(),
            h2k: self.shared.h2k.clone(),
            device: self.shared.device.get().cloned(),
            id: self.shared.id,
        }
    }

    /// Whether the slot still accepts messages.
    pub fn is_open(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire)
    }

    /// The fault that closed the slot, if one did.
    pub fn fault(&self) -> Option<Fault> {
        self.shared.fault.get().copied()
    }

    /// The device side's status (state, heartbeat, processed count, fault).
    pub fn status(&self) -> SlotStatus {
        self.shared.control.status().unwrap_or(SlotStatus {
            state: LifecycleState::Faulted,
            incarnation: 0,
            heartbeat: 0,
            processed: 0,
            fault: FaultCode::BadEnvelope,
            fault_detail: u64::MAX,
        })
    }

    /// Messages published to the kernel and not yet consumed.
    pub fn h2k_depth(&self) -> u64 {
        self.shared.h2k.len()
    }

    /// Replies that arrived for asks already resolved (late, or after a
    /// sweep), or with ids of another incarnation.
    pub fn late_replies(&self) -> u64 {
        let s = self.shared.waiters.stats();
        s.late + s.foreign + s.invalid
    }

    /// K2H envelopes that failed validation (a device bug), dropped.
    pub fn bad_replies(&self) -> u64 {
        self.shared.bad_replies.load(Ordering::Relaxed)
    }

    fn check<T>(&self, value: T, type_id: u32) -> Result<T, SubmitError<T>> {
        if !self.is_open() {
            return Err(SubmitError::Closed(value));
        }
        if self.served.binary_search(&type_id).is_err() {
            return Err(SubmitError::UnknownType { value, type_id });
        }
        Ok(value)
    }

    fn header(&mut self, payload: &Payload, flags: Flags, src: ActorId) -> EnvelopeHeader {
        let stamp = self.runtime.poller.hlc.tick();
        self.seq += 1;
        EnvelopeHeader::new(payload.type_id(), flags)
            .with_src(src)
            .with_dst(self.shared.id)
            .with_seq(self.seq)
            .with_stamp(stamp.hlc, stamp.domain)
    }

    fn publish(&mut self, header: &EnvelopeHeader, payload: &Payload) -> bool {
        let pushed = self.h2k.try_send_bytes(header, payload.bytes()).is_ok();
        if pushed {
            if header.flags.contains(Flags::ASK) {
                self.shared.wake_device();
            } else if self.h2k.half_full() {
                // Half the ring waits: end a nap now, before the stream
                // fills the ring and its sender stalls.
                self.shared.wake_device();
            } else {
                // A tell can wait out the nap of a loop between the batches
                // of a stream (at most DEVICE_NAP).
                self.shared.wake_device_lazy();
            }
        }
        pushed
    }

    /// Sends an ask: parks `waiter` in the waiter slab, stamps the envelope
    /// and publishes it to H2K, synchronously. Returns the correlation id,
    /// or [`CorrelationId::NONE`] when the waiter was already closed (then
    /// nothing is sent).
    ///
    /// # Errors
    /// [`SubmitError`] with the message and the waiter: `Full` (await
    /// [`GpuSlot::space`] and retry, keeping order), `UnknownType`, `Closed`.
    pub fn ask(
        &mut self,
        payload: Payload,
        waiter: W,
        src: ActorId,
    ) -> Result<CorrelationId, SubmitError<(Payload, W)>> {
        let (payload, waiter) = self.check((payload, waiter), payload.type_id())?;
        if waiter.is_closed() {
            return Ok(CorrelationId::NONE);
        }
        if !self.h2k.has_room() {
            return Err(SubmitError::Full((payload, waiter)));
        }
        let correlation = match self.shared.waiters.insert(waiter) {
            Ok(c) => c,
            Err(SlabFull(waiter)) => return Err(SubmitError::Full((payload, waiter))),
        };
        let header = self
            .header(&payload, Flags::ASK, src)
            .with_correlation(correlation);
        let _span = tracing::trace_span!("ask", actor = ?self.shared.id, ?correlation, trace_id = header.trace_id, hlc = header.hlc).entered();
        let published = self.publish(&header, &payload);
        // The doorbell's SeqCst fence (in `publish`) orders the insert above
        // before this load; pairs with the fence in `close_and_sweep`.
        fence(Ordering::SeqCst);
        if !published {
            if let Ok(waiter) = self.shared.waiters.take(correlation) {
                return Err(SubmitError::Full((payload, waiter)));
            }
        } else if !self.is_open() && self.shared.control.committed() < header.seq {
            // The slot closed concurrently, and it is fenced before it is
            // closed, so a message not committed by now never will be: take
            // the waiter back (unless a sweep already failed it) and report
            // the message unsent. A committed one has its reply on the way.
            if let Ok(waiter) = self.shared.waiters.take(correlation) {
                return Err(SubmitError::Closed((payload, waiter)));
            }
        }
        Ok(correlation)
    }

    /// Sends a tell: stamps the envelope and publishes it to H2K.
    ///
    /// # Errors
    /// [`SubmitError`] with the message: `Full`, `UnknownType`, `Closed`.
    pub fn tell(&mut self, payload: Payload, src: ActorId) -> Result<(), SubmitError<Payload>> {
        let payload = self.check(payload, payload.type_id())?;
        if !self.h2k.has_room() {
            return Err(SubmitError::Full(payload));
        }
        let header = self.header(&payload, Flags::empty(), src);
        let _span = tracing::trace_span!("tell", actor = ?self.shared.id, trace_id = header.trace_id, hlc = header.hlc).entered();
        if self.publish(&header, &payload) {
            Ok(())
        } else {
            Err(SubmitError::Full(payload))
        }
    }

    /// Polls for room to send: ready when the H2K ring has a free slot and a
    /// waiter is free, or the slot closed (the next send then says why).
    pub fn poll_space(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.has_space() {
            return Poll::Ready(());
        }
        self.shared.space.register(cx.waker());
        if self.has_space() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn has_space(&mut self) -> bool {
        !self.is_open() || (self.h2k.free_slots() > 0 && self.shared.waiters.has_free())
    }

    /// Waits until [`GpuSlot::poll_space`] is ready.
    pub fn space(&mut self) -> Space<'_, W> {
        Space { slot: self }
    }

    /// Requests `Active`: the device loop serves the messages waiting in H2K.
    ///
    /// # Errors
    /// [`StateError::InvalidTransition`] from a state that cannot activate.
    pub fn activate(&self) -> Result<(), StateError> {
        self.shared.control.request(LifecycleState::Active)?;
        self.shared.wake_device();
        Ok(())
    }

    /// Requests `Deactivated`: the device loop stops dequeuing; asks wait in
    /// H2K (up to their callers' timeouts) and are served on activation.
    ///
    /// # Errors
    /// [`StateError::InvalidTransition`] from a state that cannot deactivate.
    pub fn deactivate(&self) -> Result<(), StateError> {
        self.shared.control.request(LifecycleState::Deactivated)?;
        self.shared.wake_device();
        Ok(())
    }

    /// Waits until the device side acknowledges `state` (or `timeout`).
    pub fn wait_for_state(&self, state: LifecycleState, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s == state)
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(LifecycleState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if self.shared.control.acked_state().is_ok_and(&done) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Terminates the actor in the shutdown order: stop intake, request
    /// `Terminated` and wait for the acknowledgement (up to `timeout`), fail
    /// the remaining waiters, join the device loop (a loop that did not
    /// acknowledge is left running and fenced: the slot is closed).
    pub fn terminate(&mut self, timeout: Duration) -> TerminateReport {
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.shared.control.request(LifecycleState::Terminated);
        self.shared.wake_device();
        // A faulted loop has already exited: its final state is the
        // acknowledgement.
        let acknowledged = self.wait_until(timeout, |s| s.is_final());
        let unprocessed = self.h2k_depth();
        let recovery = self.recover();
        let failed_asks = recovery.failed_asks;
        if acknowledged && let Some(device) = self.device.take() {
            let _ = device.join();
        }
        tracing::debug!(actor = ?self.shared.id, acknowledged, unprocessed, failed_asks, "terminated");
        TerminateReport {
            acknowledged,
            unprocessed,
            failed_asks,
        }
    }
}

impl<W: Waiter> Drop for GpuSlot<W> {
    /// Non-blocking backstop (e.g. a ractor actor killed without
    /// `post_stop`): closes the slot, fails its waiters and asks the device
    /// loop to terminate, without waiting for it.
    fn drop(&mut self) {
        if self.device.is_some() || self.is_open() {
            self.stop();
        }
    }
}

/// Future of [`GpuSlot::space`].
pub struct Space<'a, W: Waiter> {
    slot: &'a mut GpuSlot<W>,
}

impl<W: Waiter> std::future::Future for Space<'_, W> {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.slot.poll_space(cx)
    }
}

impl<W: Waiter> fmt::Debug for Space<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Space")
    }
}

// ---------------------------------------------------------------------------
// The poller.

pub(crate) struct PollerShared {
    bell: Doorbell,
    thread: OnceLock<Thread>,
    incoming: Mutex<Vec<Box<dyn PollSlot>>>,
    has_incoming: AtomicBool,
    shutdown: AtomicBool,
    pub(crate) hlc: Arc<DynHlc>,
    watchdog_ns: u64,
    watchdog_clock: Arc<dyn PhysicalClock>,
    registry: crate::registry::Registry,
    dead_letters: Option<DeadLetterSink>,
    dead_letter_count: AtomicU64,
    /// Kernel sends routed by the poller.
    routed: AtomicU64,
    /// cpu device loops of this runtime spinning idle now, and how many
    /// may (half the cores, at least one): more would take the CPU from
    /// the threads that give them work.
    spinners: AtomicUsize,
    max_spinners: usize,
}

impl PollerShared {
    /// Wakes the poller if it is parked (device loops call this after
    /// publishing to K2H or changing state).
    /// Takes one of the runtime's spinning turns for an idle cpu device
    /// loop; `false` when they are all taken (then it parks at once).
    pub(crate) fn start_spinning(&self) -> bool {
        // Relaxed: a count, ordering nothing else.
        self.spinners
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_spinners).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a turn taken by [`PollerShared::start_spinning`].
    pub(crate) fn stop_spinning(&self) {
        self.spinners.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn wake(&self) {
        if let Some(t) = self.thread.get() {
            self.bell.ring(|| t.unpark());
        }
    }

    fn add(&self, slot: Box<dyn PollSlot>) {
        if let Ok(mut v) = self.incoming.lock() {
            v.push(slot);
        }
        self.has_incoming.store(true, Ordering::Release);
        self.wake();
    }
}

trait PollSlot: Send {
    /// Drains K2H and checks state and watchdog; returns work done.
    fn poll(&mut self, p: &PollerShared, router: &mut Router) -> usize;
    /// Whether K2H holds replies or the slot has a fault not yet handled.
    fn has_replies(&mut self) -> bool;
    /// Whether the slot is gone for good and may be dropped by the poller.
    fn finished(&self) -> bool;
}

#[derive(Default)]
struct Watch {
    heartbeat: u64,
    since_ns: u64,
}

/// A send the kernel made, held until the message that sent it is
/// committed: the origin of that message, the delivery, and whether it is a
/// dead letter rather than a delivery.
type Held = (u64, Delivery, bool);

/// The reading end of one slot's K2H ring: the poller's, and on the cpu
/// backend also the slot's own device thread's, which drains what it just
/// published when the lock is free (see [`ReplyDrain`]). One reader at a
/// time, by the lock.
pub(crate) struct K2hReader {
    k2h: Consumer,
    held: std::collections::VecDeque<Held>,
    /// Corrupt envelopes a device-thread drain met, for the poller to fault
    /// the slot on.
    bad: usize,
}

impl K2hReader {
    fn new(k2h: Consumer) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(K2hReader {
            k2h,
            held: std::collections::VecDeque::new(),
            bad: 0,
        }))
    }

    /// Drains K2H: completes waiters, holds sends; returns (envelopes,
    /// corrupt ones, whether it stopped at a send). `replies_only` (the
    /// device thread's drain) stops at the first envelope that is not a
    /// reply and leaves it in K2H for the poller: the device thread never
    /// moves a kernel's sends out of K2H, so a full K2H still holds back a
    /// kernel that sends faster than the poller routes.
    fn drain<W: Waiter>(
        &mut self,
        shared: &SlotShared<W>,
        p: &PollerShared,
        replies_only: bool,
    ) -> (usize, usize, bool) {
        let check = HeaderCheck::any_type(MAX_INLINE as u32);
        let (mut done, mut bad) = (0, 0);
        let held = &mut self.held;
        let mut batch = self.k2h.batch();
        while let Some(env) = batch.try_recv_with(&check, |e| Reply::new(e.header, e.payload)) {
            if replies_only
                && !env
                    .as_ref()
                    .is_ok_and(|r| r.header().flags.contains(Flags::REPLY))
            {
                // Read, not taken: the poller's.
                batch.release_first(done);
                return (done, bad, true);
            }
            done += 1;
            let Ok(reply) = env else {
                shared.bad_replies.fetch_add(1, Ordering::Relaxed);
                bad += 1;
                continue;
            };
            let h = *reply.header();
            // Merge at the domain boundary before completing the waiter or
            // delivering.
            let stamp = p.hlc.receive(h.hlc);
            if !h.flags.contains(Flags::REPLY) {
                // A message the kernel addressed to another actor: it leaves
                // once the message that sent it (`h.seq`) is committed.
                held.push_back((
                    h.seq,
                    Delivery {
                        payload: Payload::from_parts(h.type_id, reply.bytes()),
                        src: h.src,
                        dst: h.dst,
                        stamp,
                    },
                    h.flags.contains(Flags::UNDELIVERED),
                ));
                continue;
            }
            let _span = tracing::trace_span!("reply", actor = ?shared.id, correlation = ?h.correlation, trace_id = h.trace_id, hlc = h.hlc).entered();
            match shared.waiters.take(h.correlation) {
                Ok(w) if h.flags.contains(Flags::ERROR) && h.type_id == SYS_NO_REPLY => {
                    complete(w, Err(AskError::NoReply))
                }
                Ok(w) => complete(w, Ok(reply)),
                // Late, foreign or invalid: counted by the slab.
                Err(_) => {}
            }
        }
        (done, bad, false)
    }
}

/// The cpu backend's device thread delivers the replies it just published
/// itself, when the poller is not reading its K2H at that moment: the same
/// drain under the same lock, minus routing (held sends and corrupt
/// envelopes are left for the poller). Saves the reply a hop through the
/// poller thread — on a machine with few cores, a wake-up per ask.
/// Returns whether the poller has nothing left to do for it.
pub(crate) type ReplyDrain = Box<dyn Fn() -> bool + Send>;

fn reply_drain<W: Waiter>(
    shared: &Arc<SlotShared<W>>,
    reader: Arc<Mutex<K2hReader>>,
    p: Arc<PollerShared>,
) -> ReplyDrain {
    // Weak: a device thread that never ends (a hung handler, left running
    // fenced) must not keep the poller from dropping the slot.
    let shared = Arc::downgrade(shared);
    Box::new(move || {
        let Some(shared) = shared.upgrade() else {
            return false;
        };
        // Busy: the poller is reading it now.
        let Some(mut r) = try_read(&reader) else {
            return false;
        };
        let (done, bad, at_send) = r.drain(&shared, &p, true);
        r.bad += bad;
        if done > 0 {
            // Senders waiting for a free waiter.
            shared.space.wake_if_wanted();
        }
        !at_send && r.held.is_empty() && r.bad == 0
    })
}

/// The reader, unless someone else is reading (then they deliver what is
/// there, or ring the poller for it).
fn try_read(reader: &Mutex<K2hReader>) -> Option<std::sync::MutexGuard<'_, K2hReader>> {
    match reader.try_lock() {
        Ok(r) => Some(r),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

struct PolledSlot<W> {
    shared: Arc<SlotShared<W>>,
    reader: Arc<Mutex<K2hReader>>,
    watch: Watch,
    /// Links into the actor (their commit words commit the sends of link
    /// messages), as of `links_generation`.
    links: Vec<Arc<Link>>,
    links_generation: u64,
}

impl<W: Waiter> PolledSlot<W> {
    /// Turns a detected fault into the actor's failure: fence the
    /// incarnation (its device loop commits nothing more), deliver the
    /// replies it published before its last commit, close the slot, fail
    /// every waiter (unless the policy replays: then the owner's
    /// [`GpuSlot::recover`] sorts them) and tell the adapter.
    fn fault(&mut self, p: &PollerShared, router: &mut Router, fault: Fault) {
        if self.shared.fault.set(fault).is_ok() {
            tracing::warn!(actor = ?self.shared.id, kernel = self.shared.name, %fault, "actor slot faulted");
            self.shared.fence(Ending::Faulted(fault));
            self.drain(p, router, true);
            if self.shared.policy == PendingPolicy::Replay {
                // The ask that was in a handler when the device reported the
                // fault is failed, not replayed: resolve it now rather than
                // when the owner recovers. (The device has stopped, so
                // `serving` and its correlation are a consistent pair.)
                let control = &self.shared.control;
                let serving = control.serving();
                if control.acked_state() == Ok(LifecycleState::Faulted)
                    && serving > control.committed()
                    && control.serving_correlation() != 0
                    && let Ok(w) = self
                        .shared
                        .waiters
                        .take(CorrelationId::from_bits(control.serving_correlation()))
                {
                    complete(w, Err(AskError::Faulted(fault)));
                }
                self.shared.closed.store(true, Ordering::Release);
                fence(Ordering::SeqCst);
                self.shared.space.wake_if_wanted();
            } else {
                self.shared.close_and_sweep(AskError::Faulted(fault));
            }
            self.shared.wake_device();
            // The adapter's callback must not take the poller down with it.
            let events = &self.shared.events;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                events(SlotEvent::Faulted(fault))
            }))
            .is_err()
            {
                tracing::error!(actor = ?self.shared.id, "the slot event callback panicked");
            }
        }
    }
}

impl<W: Waiter> PolledSlot<W> {
    /// Drains K2H: completes waiters, routes the sends whose messages
    /// committed; returns (envelopes, corrupt ones).
    /// Unless `wait`, a reader busy on the device thread is left to it
    /// (it delivers what it finds, and rings the poller for the rest).
    fn drain(&mut self, p: &PollerShared, router: &mut Router, wait: bool) -> (usize, usize) {
        let reader = self.reader.clone();
        let mut r = if wait {
            crate::link::lock(&reader)
        } else {
            match try_read(&reader) {
                Some(r) => r,
                None => return (0, 0),
            }
        };
        let (done, bad, _) = r.drain(&self.shared, p, false);
        let bad = bad + std::mem::take(&mut r.bad);
        if done > 0 {
            // The device loop may be parked waiting for K2H room, and a
            // sender for a free waiter.
            self.shared.wake_device();
            self.shared.space.wake_if_wanted();
        }
        self.release_held(&mut r.held, p, router);
        (done, bad)
    }

    /// Routes the held sends whose message has committed; drops (and
    /// counts as fenced writes) those of a fenced incarnation that never
    /// will — that message is handed back, so its sends must not leave.
    /// Reloads the links into the actor if they changed.
    fn refresh_links(&mut self) {
        if self.shared.home.links_generation() != self.links_generation {
            (self.links_generation, self.links, _) = self.shared.home.links();
        }
    }

    fn release_held(
        &mut self,
        held: &mut std::collections::VecDeque<Held>,
        p: &PollerShared,
        router: &mut Router,
    ) {
        if held.is_empty() {
            return;
        }
        let (committed, fenced) = self.shared.control.commit_state();
        while let Some(&(origin, d, undelivered)) = held.front() {
            let (done, fenced) = match crate::link::link_of_origin(origin) {
                None => (origin <= committed, fenced),
                Some((id, pos)) => match self.shared.link_fences.get() {
                    // Fenced: what it had consumed then is final.
                    Some(fences) => (
                        fences
                            .iter()
                            .any(|&(l, c)| l == id && crate::link::passed(c, pos)),
                        true,
                    ),
                    // Live: the word is this incarnation's (a fenced word
                    // waits for the fence's snapshot above).
                    None => {
                        self.refresh_links();
                        let done = self.links.iter().any(|l| {
                            let (_, consumed, fenced) = l.control.commit_state();
                            l.id == id && !fenced && crate::link::passed(consumed, pos)
                        });
                        (done, false)
                    }
                },
            };
            if done {
                if undelivered {
                    Router::dead(p, d, RouteFailure::LinkFull);
                } else {
                    router.route(p, d);
                }
                held.pop_front();
            } else if fenced {
                self.shared.home.count_fenced(held.len() as u64);
                held.clear();
            } else {
                break;
            }
        }
    }
}

impl<W: Waiter> PollSlot for PolledSlot<W> {
    fn poll(&mut self, p: &PollerShared, router: &mut Router) -> usize {
        // The state is read before draining: a device publishes its replies
        // before it acknowledges `Faulted` (store-release), so every reply
        // made before a fault is drained before the fault's sweep below.
        let status = self.shared.control.status();
        // A faulted slot's replies must all be drained before its sweep:
        // wait for a device-thread drain in progress.
        let faulted = status
            .as_ref()
            .is_ok_and(|s| s.state == LifecycleState::Faulted);
        let (done, bad) = self.drain(p, router, faulted);
        if self.shared.fault.get().is_some() {
            return done;
        }
        let incarnation = u32::from(self.shared.id.incarnation());
        if bad > 0 {
            // A corrupt K2H envelope may have been a reply: its caller
            // would wait forever, so the slot faults (the runtime goes on
            // serving every other slot).
            self.fault(
                p,
                router,
                Fault {
                    code: FaultCode::BadEnvelope,
                    detail: HOST_DETECTED_CORRUPT_K2H,
                    incarnation,
                },
            );
            return done;
        }
        if let Ok(status) = status {
            if status.state == LifecycleState::Faulted {
                self.fault(
                    p,
                    router,
                    Fault {
                        code: status.fault,
                        detail: status.fault_detail,
                        incarnation,
                    },
                );
            } else if status.state == LifecycleState::Terminated
                && !self.shared.control.is_fenced()
                && self
                    .shared
                    .control
                    .requested_state()
                    .is_ok_and(|r| !r.is_final())
            {
                // The device loop left without being asked (no request, no
                // fence, no fault): nothing serves the slot any more, so it
                // fails — every caller resolves — rather than hang.
                self.fault(
                    p,
                    router,
                    Fault {
                        code: FaultCode::UnexpectedExit,
                        detail: UNASKED_TERMINATED,
                        incarnation,
                    },
                );
            } else if status.state == LifecycleState::Active && {
                self.refresh_links();
                let incarnation = self.shared.id.incarnation();
                !self.shared.h2k.is_empty() || self.links.iter().any(|l| l.has_inbound(incarnation))
            } {
                let now = p.watchdog_clock.now_ns();
                if status.heartbeat != self.watch.heartbeat || self.watch.since_ns == 0 {
                    self.watch = Watch {
                        heartbeat: status.heartbeat,
                        since_ns: now.max(1),
                    };
                } else if now.saturating_sub(self.watch.since_ns) >= p.watchdog_ns {
                    self.fault(
                        p,
                        router,
                        Fault {
                            code: FaultCode::Watchdog,
                            detail: p.watchdog_ns,
                            incarnation,
                        },
                    );
                }
            } else {
                self.watch.since_ns = 0;
            }
        }
        done
    }

    fn has_replies(&mut self) -> bool {
        let unhandled_fault = self.shared.fault.get().is_none()
            && self.shared.control.acked_state() == Ok(LifecycleState::Faulted);
        // Busy: the device thread is reading it, and rings the poller for
        // whatever it leaves.
        unhandled_fault
            || try_read(&self.reader)
                .is_some_and(|mut r| !r.held.is_empty() || r.bad > 0 || !r.k2h.is_empty())
    }

    fn finished(&self) -> bool {
        // Only the poller holds the slot once the sender side is gone.
        Arc::strong_count(&self.shared) == 1 && self.shared.closed.load(Ordering::Acquire)
    }
}

/// The [`FaultCode::UnexpectedExit`] detail of a device loop that
/// acknowledged `Terminated` while nobody had asked it to.
pub const UNASKED_TERMINATED: u64 = 2;

/// How long the poller spins, idle, before it parks: a reply usually follows
/// an ask within a few µs, and catching it awake saves a futex wake.
pub(crate) const POLLER_SPIN: Duration = Duration::from_micros(50);

/// The most a device loop spins, idle, before it parks (and the widest gap
/// between messages it spins for at all), after a tell. Measured on two
/// vCPUs (docs/BENCHMARKS.md): 50 µs costs a pipeline of GPU stages passing
/// readings one at a time half again its latency, the stages' spinning
/// taking the CPU from the threads between them; 25 µs keeps it as it was.
pub(crate) const DEVICE_SPIN_CAP: Duration = Duration::from_micros(25);

/// The gap between messages below which a cpu device loop that finds H2K
/// empty naps instead of spinning: a sender streaming tells keeps filling
/// the ring meanwhile, and the loop's CPU goes to the threads producing
/// them (on a machine with few cores, a spinning loop takes it from them).
pub(crate) const DEVICE_NAP_BELOW: Duration = Duration::from_micros(4);

/// How long a nap lasts at most (the timer's slack may add to it). Asks,
/// state requests and K2K sends end it at once, and so does a tell that
/// finds half the ring waiting; other tells wait it out.
pub(crate) const DEVICE_NAP: Duration = Duration::from_micros(20);

/// As [`DEVICE_SPIN_CAP`], after an ask: a caller asking one at a time
/// sends its next ask one framework round trip after the reply (15–20 µs
/// through ractor or kameo on two vCPUs), and a loop still awake then saves
/// that ask a futex wake — and keeps the round trip short, so the gap stays
/// under the cap (a parked loop lengthens it past a smaller cap, and the
/// loop then never spins again).
pub(crate) const ASK_SPIN_CAP: Duration = Duration::from_micros(50);

/// Decides when an idle loop parks: after spinning for its budget.
///
/// The poller's budget is fixed. A device loop sets its own from the gap
/// between the send stamps of the last two messages it served (4× the gap,
/// at most [`DEVICE_SPIN_CAP`]): a sender streaming tells, or a caller
/// asking one at a time (its next ask follows the reply within a framework
/// round trip, since the device thread delivers the reply itself), keeps
/// it spinning, so neither pays a futex wake; a sender whose messages come
/// further apart than the cap lets it park at once and leave the CPU to
/// the threads that produce them.
pub(crate) struct Idle {
    since: Option<Instant>,
    budget: Duration,
    rounds: u32,
}

impl Idle {
    /// Spins for `budget` before parking.
    pub(crate) fn new(budget: Duration) -> Self {
        Idle {
            since: None,
            budget,
            rounds: 0,
        }
    }

    /// Changes the budget of the next idle period.
    pub(crate) fn set_budget(&mut self, budget: Duration) {
        self.budget = budget;
    }

    /// The loop did work.
    pub(crate) fn reset(&mut self) {
        self.since = None;
    }

    /// Called on an idle round: whether the loop should park now. Reads the
    /// clock every 32 rounds only (a clock read costs more than a spin).
    pub(crate) fn should_park(&mut self) -> bool {
        if self.budget.is_zero() {
            return true;
        }
        match self.since {
            None => {
                self.since = Some(Instant::now());
                self.rounds = 0;
                false
            }
            Some(t) => {
                self.rounds = self.rounds.wrapping_add(1);
                self.rounds % 32 == 0 && t.elapsed() >= self.budget
            }
        }
    }
}

/// The spin budget for a device loop whose last two messages were sent
/// `gap_ns` apart, the last an ask or not (see [`Idle`]).
pub(crate) fn device_spin_budget(gap_ns: u64, after_ask: bool) -> Duration {
    let cap = if after_ask {
        ASK_SPIN_CAP
    } else {
        DEVICE_SPIN_CAP
    };
    let gap = Duration::from_nanos(gap_ns);
    if gap > cap {
        Duration::ZERO
    } else {
        (gap * 4).clamp(Duration::from_micros(2), cap)
    }
}

/// Messages the poller routes from kernels to other actors' mailboxes: a
/// full mailbox parks the delivery in a per-destination overflow (FIFO,
/// bounded by [`ROUTE_OVERFLOW`]), retried every poll; the poller never
/// waits on a mailbox. What cannot be delivered is a dead letter.
#[derive(Default)]
pub(crate) struct Router {
    overflow: std::collections::HashMap<ActorId, std::collections::VecDeque<Delivery>>,
}

/// Deliveries parked per destination before more become dead letters.
pub const ROUTE_OVERFLOW: usize = 1024;

impl Router {
    fn dead(p: &PollerShared, d: Delivery, why: RouteFailure) {
        p.dead_letter(DeadLetter {
            actor: d.dst,
            src: d.src,
            seq: 0,
            payload: d.payload,
            reason: DeadLetterReason::Unroutable(why),
        });
    }

    fn refused(p: &PollerShared, e: DeliveryError) {
        let why = match &e {
            DeliveryError::Unknown(_) => RouteFailure::UnknownActor,
            DeliveryError::Refused(_) => RouteFailure::Refused,
            _ => RouteFailure::Closed,
        };
        Self::dead(p, e.into_inner(), why);
    }

    /// Delivers `d`, or parks it behind what waits for the same actor.
    fn route(&mut self, p: &PollerShared, d: Delivery) {
        p.routed.fetch_add(1, Ordering::Relaxed);
        // Keyed as the registry keys mailboxes: without the incarnation.
        let key = d.dst.with_incarnation(0);
        if let Some(q) = self.overflow.get_mut(&key) {
            if q.len() < ROUTE_OVERFLOW {
                q.push_back(d);
            } else {
                Self::dead(p, d, RouteFailure::Overflow);
            }
            return;
        }
        match p.registry.deliver(d) {
            Ok(()) => {}
            Err(DeliveryError::Full(d)) => {
                self.overflow.entry(key).or_default().push_back(d);
            }
            Err(e) => Self::refused(p, e),
        }
    }

    /// Retries the parked deliveries, in order per destination; returns how
    /// many went out.
    fn retry(&mut self, p: &PollerShared) -> usize {
        let mut moved = 0;
        self.overflow.retain(|_, q| {
            while let Some(d) = q.pop_front() {
                match p.registry.deliver(d) {
                    Ok(()) => moved += 1,
                    Err(DeliveryError::Full(d)) => {
                        q.push_front(d);
                        return true;
                    }
                    Err(e) => Self::refused(p, e),
                }
            }
            false
        });
        moved
    }

    fn is_empty(&self) -> bool {
        self.overflow.is_empty()
    }

    /// The runtime stops: what is still parked is a dead letter.
    fn shut_down(&mut self, p: &PollerShared) {
        for (_, q) in self.overflow.drain() {
            for d in q {
                Self::dead(p, d, RouteFailure::Shutdown);
            }
        }
    }
}

fn poller_loop(p: &PollerShared) {
    let mut slots: Vec<Box<dyn PollSlot>> = Vec::new();
    let mut router = Router::default();
    let mut idle = Idle::new(POLLER_SPIN);
    let tick = Duration::from_nanos((p.watchdog_ns / 4).clamp(1_000_000, 1_000_000_000));
    loop {
        if p.has_incoming.swap(false, Ordering::AcqRel)
            && let Ok(mut v) = p.incoming.lock()
        {
            slots.append(&mut v);
        }
        let mut done = 0;
        for s in slots.iter_mut() {
            done += s.poll(p, &mut router);
        }
        if !router.is_empty() {
            done += router.retry(p);
        }
        // A slot whose owner is gone gets one last drain: its last sends
        // may have been published after the poll above.
        for s in slots.iter_mut().filter(|s| s.finished()) {
            s.poll(p, &mut router);
        }
        slots.retain(|s| !s.finished());
        if p.shutdown.load(Ordering::Acquire) && slots.is_empty() {
            router.shut_down(p);
            return;
        }
        if done > 0 {
            idle.reset();
            continue;
        }
        if !idle.should_park() {
            std::hint::spin_loop();
            continue;
        }
        let has_work = || {
            p.has_incoming.load(Ordering::Acquire)
                || p.shutdown.load(Ordering::Acquire)
                || slots.iter_mut().any(|s| s.has_replies())
        };
        // Parked deliveries are retried at least every millisecond.
        let timeout = if router.is_empty() {
            tick
        } else {
            tick.min(Duration::from_millis(1))
        };
        p.bell.park(has_work, || std::thread::park_timeout(timeout));
        idle.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_error_maps_outcomes_and_faults() {
        let mut header = crate::envelope::EnvelopeHeader::new(1, Flags::REPLY);
        header.payload_len = 8;
        let reply = Reply::new(header, &7u64.to_le_bytes());
        assert_eq!(CallError::decode::<u64>(Ok(reply)), Ok(7));
        assert!(matches!(
            CallError::decode::<u32>(Ok(reply)),
            Err(CallError::Decode(_))
        ));
        assert_eq!(
            CallError::decode::<u64>(Err(AskError::NoReply)),
            Err(CallError::Ask(AskError::NoReply))
        );
        assert_eq!(CallError::closed(None), CallError::Closed);
        let fault = Fault {
            code: FaultCode::Watchdog,
            detail: 1,
            incarnation: 0,
        };
        assert_eq!(
            CallError::closed(Some(fault)),
            CallError::Ask(AskError::Faulted(fault))
        );
    }

    #[test]
    fn actor_controller_follows_the_incarnation_it_is_given() {
        use crate::conformance::{ChannelWaiter, Probe};
        let handle = ActorController::new();
        assert_eq!(handle.activate(), Err(CallError::Closed), "no incarnation");
        assert_eq!(handle.h2k_depth(), Err(CallError::Closed));
        let rt = Runtime::new().unwrap();
        let mut first = rt
            .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
            .unwrap();
        let clone = handle.clone();
        clone.set(first.controller());
        assert_eq!(handle.current().map(|c| c.id()), Some(first.id()));
        assert_eq!(handle.deactivate(), Ok(()));
        assert!(first.wait_for_state(LifecycleState::Deactivated, Duration::from_secs(20)));
        assert_eq!(handle.h2k_depth(), Ok(0));
        assert_eq!(handle.activate(), Ok(()));
        assert!(first.wait_for_state(LifecycleState::Active, Duration::from_secs(20)));
        // A stopped incarnation refuses; the next one set serves.
        first.terminate(Duration::from_secs(20));
        assert_eq!(handle.activate(), Err(CallError::Closed));
        let second = rt
            .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
            .unwrap();
        handle.set(second.controller());
        assert_eq!(clone.current().map(|c| c.id()), Some(second.id()));
        assert_eq!(clone.deactivate(), Ok(()));
        assert!(second.wait_for_state(LifecycleState::Deactivated, Duration::from_secs(20)));
    }

    #[test]
    fn idle_spins_its_budget_and_device_budget_follows_the_send_gap() {
        let mut idle = Idle::new(Duration::from_millis(1));
        assert!(!idle.should_park());
        std::thread::sleep(Duration::from_millis(2));
        // The clock is read every 32 rounds.
        assert!((0..32).any(|_| idle.should_park()), "the budget is spent");
        idle.reset();
        assert!(!idle.should_park(), "a new idle period spins again");
        idle.set_budget(Duration::ZERO);
        assert!(idle.should_park(), "a zero budget parks at once");

        assert_eq!(
            device_spin_budget(u64::MAX, true),
            Duration::ZERO,
            "sparse asks: park at once"
        );
        assert_eq!(device_spin_budget(60_000, true), Duration::ZERO);
        assert_eq!(
            device_spin_budget(40_000, true),
            ASK_SPIN_CAP,
            "a caller asking one at a time through a framework"
        );
        assert_eq!(
            device_spin_budget(40_000, false),
            Duration::ZERO,
            "tells that far apart: park"
        );
        assert_eq!(
            device_spin_budget(300, false),
            Duration::from_micros(2),
            "a tell stream: spin"
        );
        assert_eq!(
            device_spin_budget(5_000, true),
            Duration::from_micros(20),
            "sequential asks a few µs apart: spin through the gap"
        );
        assert_eq!(device_spin_budget(20_000, false), DEVICE_SPIN_CAP);
    }
}
