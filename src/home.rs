//! An actor's identity across incarnations: the [`ActorHome`].
//!
//! A GPU actor that faults is restarted as a new **incarnation** of the same
//! actor: the same [`ActorId`] index, the incarnation number one higher. The
//! home is what survives a restart:
//!
//! - the incarnation counter, and the rule that **no two incarnations ever
//!   serve one actor**: a new one is launched only once the previous one is
//!   *fenced* (its control block's commit word carries the fence bit, so no
//!   message it touches afterwards counts as processed, and its late writes
//!   are dropped and counted in [`ActorHome::fenced_writes`]);
//! - the messages a faulted incarnation accepted but never processed, when
//!   the launch chose [`PendingPolicy::Replay`]: the next incarnation sends
//!   them first ([`GpuSlot::replay`](crate::runtime::GpuSlot::replay)), in
//!   their original order, before any new message;
//! - the latest [`Checkpoint`] of the kernel state, which the next
//!   incarnation starts from;
//! - a bounded history of incarnations with the last message each committed.
//!
//! A hung cpu handler cannot be killed: its thread and the memory it can
//! still touch (its rings and control block) are leaked to it rather than
//! freed, and fenced.
//!
//! The framework adapters do all of this for their actors; through the
//! core API a restart reads:
//!
//! ```
//! use ringkernel::conformance::{self, Add, ChannelWaiter, Explode, Probe, Total};
//! use ringkernel::home::PendingPolicy;
//! use ringkernel::runtime::{AskError, LaunchOptions, ReplayStatus, Runtime};
//!
//! let rt = Runtime::new()?;
//! let home = rt.home::<ChannelWaiter>();
//! let opts = LaunchOptions::default()
//!     .on_fault(PendingPolicy::Replay)
//!     .checkpoint_every(1);
//! let mut first = rt.launch_in::<Probe, _>(&home, Default::default(), &opts, |_| {})?;
//! conformance::tell(&mut first, Add(40));
//! let boom = conformance::ask(&mut first, Explode()).wait();
//! assert!(matches!(boom, Err(AskError::Faulted(_))));
//!
//! // The fault fenced the incarnation; hand back what it left unprocessed
//! // (here: nothing), then start the next one. It resumes from the
//! // checkpoint taken after `Add(40)`.
//! while first.is_open() {
//!     std::thread::yield_now();
//! }
//! first.recover();
//! let mut second = rt.launch_in::<Probe, _>(&home, Default::default(), &opts, |_| {})?;
//! assert_eq!(second.incarnation(), 1);
//! assert_eq!(second.replay(), ReplayStatus::Done);
//! assert_eq!(conformance::ask(&mut second, Total()).wait()?.decode::<u64>()?, 40);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::control::ControlRef;
use crate::id::ActorId;
use crate::kernel::Payload;
use crate::link::{Link, SlotWaker};
use crate::runtime::{AskError, Fault, Waiter};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What happens to messages a faulted incarnation accepted (they were in its
/// H2K ring) but never processed.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PendingPolicy {
    /// Asks resolve with the fault; tells go to the dead-letter sink.
    #[default]
    Fail,
    /// Kept in the actor's [`ActorHome`] and sent, first and in order, by
    /// the next incarnation. If the home is dropped with no next
    /// incarnation, they fail as with [`PendingPolicy::Fail`].
    Replay,
}

/// A message handed back from a faulted incarnation, to be replayed.
#[non_exhaustive]
pub enum Replay<W> {
    /// An ask, with its caller's waiter.
    Ask {
        /// The message.
        payload: Payload,
        /// The caller.
        waiter: W,
        /// The original sender.
        src: ActorId,
    },
    /// A tell.
    Tell {
        /// The message.
        payload: Payload,
        /// The original sender.
        src: ActorId,
    },
}

impl<W> fmt::Debug for Replay<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Replay::Ask { payload, src, .. } => f
                .debug_struct("Ask")
                .field("payload", payload)
                .field("src", src)
                .finish_non_exhaustive(),
            Replay::Tell { payload, src } => f
                .debug_struct("Tell")
                .field("payload", payload)
                .field("src", src)
                .finish(),
        }
    }
}

/// Why a message became a dead letter.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The incarnation faulted before processing it.
    Faulted(Fault),
    /// The actor was terminated (or dropped) before processing it.
    Terminated,
    /// A kernel addressed it to an actor the poller could not deliver to.
    Unroutable(RouteFailure),
}

/// Why the poller could not deliver a message a kernel sent.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteFailure {
    /// No mailbox is registered under the destination's id.
    UnknownActor,
    /// The destination is gone.
    Closed,
    /// The destination does not take this message type.
    Refused,
    /// The K2K link's outbox was full and the link reports failures
    /// ([`LinkOptions::report_failures`](crate::link::LinkOptions::report_failures)).
    LinkFull,
    /// The destination's overflow was full
    /// ([`ROUTE_OVERFLOW`](crate::runtime::ROUTE_OVERFLOW) parked).
    Overflow,
    /// The runtime stopped with it parked.
    Shutdown,
}

/// A tell that was accepted and will never be processed (or a message a
/// kernel sent that could not be delivered). Delivered to the
/// runtime's dead-letter sink ([`RuntimeBuilder::dead_letters`](crate::runtime::RuntimeBuilder::dead_letters)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The GPU actor (incarnation included) it was sent to.
    pub actor: ActorId,
    /// Who sent it.
    pub src: ActorId,
    /// Its sequence number in that incarnation's H2K ring.
    pub seq: u64,
    /// The message.
    pub payload: Payload,
    /// Why it was not processed.
    pub reason: DeadLetterReason,
}

/// A snapshot of a kernel's state, taken by the device loop right after a
/// committed message (every N messages, or on request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The kernel it belongs to.
    pub kernel: &'static str,
    /// The incarnation that took it.
    pub incarnation: u16,
    /// Messages that incarnation had processed when it was taken.
    pub processed: u64,
    /// The state's bytes.
    pub bytes: Vec<u8>,
}

/// How an incarnation ended.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Still serving (not fenced).
    Serving,
    /// Fenced after a fault.
    Faulted(Fault),
    /// Fenced by termination or drop.
    Terminated,
}

/// One incarnation in an [`ActorHome`]'s history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncarnationRecord {
    /// Its number.
    pub incarnation: u16,
    /// The `seq` of the last message it committed, read when it was fenced
    /// (messages with a greater `seq` count as not processed by it).
    pub committed_seq: u64,
    /// How it ended.
    pub ending: Ending,
}

/// Incarnations kept in the history.
pub const HISTORY: usize = 1024;

struct HomeState {
    /// Incarnations started (the next one's number, mod 2^16).
    started: u32,
    /// The control block of the incarnation launched last.
    live: Option<ControlRef>,
    /// Whether that incarnation's unprocessed messages have been handed
    /// back (`GpuSlot::recover`): the next one may start only then.
    live_recovered: bool,
    history: VecDeque<IncarnationRecord>,
    checkpoint: Option<Checkpoint>,
    /// K2K links into this actor, and out of it.
    inbound: Vec<Arc<Link>>,
    outbound: Vec<Arc<Link>>,
    /// The message types the last incarnation served.
    served: Vec<u32>,
    /// The home was dropped: no link attaches any more.
    gone: bool,
}

/// The part of a home the device loop sees.
pub(crate) struct HomeCore {
    pub(crate) node: u16,
    pub(crate) index: u32,
    state: Mutex<HomeState>,
    fenced_writes: AtomicU64,
    checkpoint_requested: AtomicBool,
    /// Bumped whenever the link lists change (the device loop reloads them).
    links_generation: AtomicU64,
    /// Where the live incarnation's device loop is woken (K2K senders ring it).
    pub(crate) waker: Arc<SlotWaker>,
}

impl HomeCore {
    /// The generation of the link lists.
    pub(crate) fn links_generation(&self) -> u64 {
        // Acquire: pairs with the release bump in `links_changed`; a loop that
        // sees the new number reloads the lists under the lock.
        self.links_generation.load(Ordering::Acquire)
    }

    fn links_changed(&self) {
        self.links_generation.fetch_add(1, Ordering::Release);
        // A parked device loop reloads its lists.
        self.waker.wake();
    }

    /// The link lists: (generation, inbound, outbound).
    pub(crate) fn links(&self) -> (u64, Vec<Arc<Link>>, Vec<Arc<Link>>) {
        let st = self.lock();
        let generation = self.links_generation();
        (generation, st.inbound.clone(), st.outbound.clone())
    }

    /// Message types the actor serves (those of its last incarnation).
    pub(crate) fn served(&self) -> Vec<u32> {
        self.lock().served.clone()
    }

    /// Whether a link `from → to` exists already.
    pub(crate) fn links_to(&self, to: u32) -> bool {
        self.lock().outbound.iter().any(|l| l.to.index() == to)
    }

    /// Whether the home was dropped.
    pub(crate) fn is_gone(&self) -> bool {
        self.lock().gone
    }

    /// Adds a link out of this actor; `false` if the home is gone.
    pub(crate) fn attach_outbound(&self, link: Arc<Link>) -> bool {
        let mut st = self.lock();
        if st.gone {
            return false;
        }
        st.outbound.push(link);
        drop(st);
        self.links_changed();
        true
    }

    /// Adds a link into this actor (a live incarnation serves it at once);
    /// `false` if the home is gone.
    pub(crate) fn attach_inbound(&self, link: Arc<Link>) -> bool {
        let mut st = self.lock();
        if st.gone {
            return false;
        }
        if let Some(live) = &st.live
            && !live.is_fenced()
        {
            link.reopen(st.started.wrapping_sub(1) as u16);
        }
        st.inbound.push(link);
        drop(st);
        self.links_changed();
        true
    }

    /// Removes a link from the outbound list (its receiver is gone).
    pub(crate) fn detach_outbound(&self, link: &Link) {
        self.lock().outbound.retain(|l| l.id != link.id);
        self.links_changed();
    }

    /// Fences every link into this actor that `incarnation` serves (it
    /// commits no more of their messages); returns how many each had
    /// consumed.
    pub(crate) fn fence_links(&self, incarnation: u16) -> Vec<(crate::link::LinkId, u64)> {
        self.lock()
            .inbound
            .iter()
            .filter_map(|l| Some((l.id, l.control.fence_epoch(incarnation)?)))
            .collect()
    }

    /// Removes a link from the inbound list (its connect failed).
    pub(crate) fn detach_inbound(&self, link: &Link) {
        self.lock().inbound.retain(|l| l.id != link.id);
        self.links_changed();
    }

    /// Takes both link lists (the home is going away).
    fn take_links(&self) -> (Vec<Arc<Link>>, Vec<Arc<Link>>) {
        let mut st = self.lock();
        st.gone = true;
        let taken = (
            std::mem::take(&mut st.inbound),
            std::mem::take(&mut st.outbound),
        );
        drop(st);
        self.links_changed();
        taken
    }

    fn lock(&self) -> MutexGuard<'_, HomeState> {
        // A panic while holding this lock cannot leave the state torn (every
        // update is a single assignment or push), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts writes of a fenced incarnation that were dropped.
    pub(crate) fn count_fenced(&self, n: u64) {
        self.fenced_writes.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether a checkpoint was requested; clears the request.
    pub(crate) fn take_checkpoint_request(&self) -> bool {
        self.checkpoint_requested.load(Ordering::Relaxed)
            && self.checkpoint_requested.swap(false, Ordering::Relaxed)
    }

    /// Stores a checkpoint from `incarnation`; refused (and counted as a
    /// fenced write) unless that incarnation is the current one.
    pub(crate) fn store_checkpoint(
        &self,
        kernel: &'static str,
        control: &ControlRef,
        incarnation: u16,
        processed: u64,
        bytes: &[u8],
    ) -> bool {
        let mut st = self.lock();
        // The serving incarnation is known by its control block (its 16-bit
        // number repeats after 65 536 restarts).
        let current = st
            .live
            .as_ref()
            .is_some_and(|cb| ControlRef::ptr_eq(cb, control) && !cb.is_fenced());
        if !current {
            drop(st);
            self.count_fenced(1);
            return false;
        }
        match &mut st.checkpoint {
            // Reuses the buffer: no allocation per checkpoint.
            Some(c) if c.bytes.len() == bytes.len() => {
                c.bytes.copy_from_slice(bytes);
                c.kernel = kernel;
                c.incarnation = incarnation;
                c.processed = processed;
            }
            other => {
                *other = Some(Checkpoint {
                    kernel,
                    incarnation,
                    processed,
                    bytes: bytes.to_vec(),
                })
            }
        }
        true
    }

    /// Starts the next incarnation with `control`, if the previous one is
    /// fenced and has handed back what it left unprocessed. Returns its
    /// number and the checkpoint to start from.
    pub(crate) fn begin(
        &self,
        control: &ControlRef,
        served: &[u32],
    ) -> Result<(u16, Option<Checkpoint>), u16> {
        let mut st = self.lock();
        if let Some(prev) = &st.live
            && !(prev.is_fenced() && st.live_recovered)
        {
            return Err(st.started.wrapping_sub(1) as u16);
        }
        let incarnation = st.started as u16;
        st.started = st.started.wrapping_add(1);
        st.live = Some(control.clone());
        st.live_recovered = false;
        served.clone_into(&mut st.served);
        // The new incarnation serves the links into the actor from where the
        // last one (and the host's hand-back) left them.
        for l in &st.inbound {
            l.reopen(incarnation);
        }
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(IncarnationRecord {
            incarnation,
            committed_seq: 0,
            ending: Ending::Serving,
        });
        Ok((incarnation, st.checkpoint.clone()))
    }

    /// The incarnation of `control` has handed back its unprocessed
    /// messages.
    pub(crate) fn recovered(&self, control: &ControlRef) {
        let mut st = self.lock();
        if st
            .live
            .as_ref()
            .is_some_and(|cb| ControlRef::ptr_eq(cb, control))
        {
            st.live_recovered = true;
        }
    }

    /// Records how `incarnation` ended (first ending wins).
    pub(crate) fn ended(&self, incarnation: u16, committed_seq: u64, ending: Ending) {
        let mut st = self.lock();
        if let Some(r) = st
            .history
            .iter_mut()
            .rev()
            .find(|r| r.incarnation == incarnation)
            && r.ending == Ending::Serving
        {
            r.committed_seq = committed_seq;
            r.ending = ending;
        }
    }
}

/// Where a home's dropped replays go: the runtime's dead-letter sink, if
/// the runtime is still there.
pub(crate) type DeadLetterTap = Box<dyn Fn(DeadLetter) + Send + Sync>;

struct HomeInner<W: Waiter> {
    core: Arc<HomeCore>,
    replay: Mutex<VecDeque<Replay<W>>>,
    dead_letters: DeadLetterTap,
}

impl<W: Waiter> Drop for HomeInner<W> {
    /// No next incarnation will come: replayed asks resolve with the fault
    /// that handed them back, replayed tells become dead letters.
    fn drop(&mut self) {
        let queue = std::mem::take(self.replay.get_mut().unwrap_or_else(|p| p.into_inner()));
        let (fault, incarnation) = {
            let st = self.core.lock();
            let fault = st.history.iter().rev().find_map(|r| match r.ending {
                Ending::Faulted(f) => Some(f),
                _ => None,
            });
            (fault, st.started.wrapping_sub(1) as u16)
        };
        let error = fault.map_or(AskError::Terminated, AskError::Faulted);
        let reason = fault.map_or(DeadLetterReason::Terminated, DeadLetterReason::Faulted);
        let actor = ActorId::new(
            self.core.node,
            crate::id::ActorKind::Gpu,
            self.core.index,
            incarnation,
        );
        let letter = |src: ActorId, to: ActorId, payload: Payload, reason| DeadLetter {
            actor: to,
            src,
            seq: 0,
            payload,
            reason,
        };
        // The actor is gone for good: links out of it deliver what is in
        // their rings and lose their outboxes; links into it lose both, and
        // their senders route from now on (to nobody).
        let (inbound, outbound) = self.core.take_links();
        for l in outbound {
            for s in l.close_sender() {
                (self.dead_letters)(letter(
                    s.header.src,
                    s.header.dst,
                    Payload::from_parts(s.header.type_id, s.payload()),
                    DeadLetterReason::Terminated,
                ));
            }
        }
        for l in inbound {
            for s in l.close_receiver() {
                // Addressed to this actor (a malformed envelope's own `dst`
                // may be anything).
                (self.dead_letters)(letter(
                    s.header.src,
                    l.to,
                    Payload::from_parts(s.header.type_id, s.payload()),
                    reason,
                ));
            }
            if let Some(sender) = l.sender_home.upgrade() {
                sender.detach_outbound(&l);
            }
        }
        for r in queue {
            match r {
                Replay::Ask { waiter, .. } => crate::runtime::complete(waiter, Err(error)),
                Replay::Tell { payload, src } => (self.dead_letters)(DeadLetter {
                    actor,
                    src,
                    seq: 0,
                    payload,
                    reason,
                }),
            }
        }
    }
}

/// The identity of one GPU actor across its incarnations (see the
/// [module docs](self)). Cheap to clone; a framework adapter keeps it in
/// what its supervisor restarts from.
pub struct ActorHome<W: Waiter> {
    inner: Arc<HomeInner<W>>,
}

impl<W: Waiter> Clone for ActorHome<W> {
    fn clone(&self) -> Self {
        ActorHome {
            inner: self.inner.clone(),
        }
    }
}

impl<W: Waiter> fmt::Debug for ActorHome<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActorHome")
            .field("index", &self.inner.core.index)
            .field("incarnations", &self.incarnations())
            .field("fenced_writes", &self.fenced_writes())
            .finish_non_exhaustive()
    }
}

impl<W: Waiter> ActorHome<W> {
    pub(crate) fn new(node: u16, index: u32, dead_letters: DeadLetterTap) -> Self {
        ActorHome {
            inner: Arc::new(HomeInner {
                core: Arc::new(HomeCore {
                    node,
                    index,
                    state: Mutex::new(HomeState {
                        started: 0,
                        live: None,
                        live_recovered: false,
                        history: VecDeque::new(),
                        checkpoint: None,
                        inbound: Vec::new(),
                        outbound: Vec::new(),
                        served: Vec::new(),
                        gone: false,
                    }),
                    fenced_writes: AtomicU64::new(0),
                    checkpoint_requested: AtomicBool::new(false),
                    links_generation: AtomicU64::new(0),
                    waker: Arc::new(SlotWaker::default()),
                }),
                replay: Mutex::new(VecDeque::new()),
                dead_letters,
            }),
        }
    }

    pub(crate) fn core(&self) -> &Arc<HomeCore> {
        &self.inner.core
    }

    /// The actor's id in incarnation 0 (the index is the same in every one).
    pub fn id(&self) -> ActorId {
        ActorId::gpu(self.inner.core.node, self.inner.core.index)
    }

    /// Incarnations started so far.
    pub fn incarnations(&self) -> u32 {
        self.inner.core.lock().started
    }

    /// The last [`HISTORY`] incarnations, oldest first.
    pub fn history(&self) -> Vec<IncarnationRecord> {
        self.inner.core.lock().history.iter().copied().collect()
    }

    /// Writes of fenced incarnations that were dropped: replies, commits and
    /// checkpoints a hung or faulted incarnation made after its fence.
    pub fn fenced_writes(&self) -> u64 {
        self.inner.core.fenced_writes.load(Ordering::Relaxed)
    }

    /// The latest checkpoint, if one was taken.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.inner.core.lock().checkpoint.clone()
    }

    /// Asks the serving incarnation to take a checkpoint right after the
    /// next message it processes.
    pub fn request_checkpoint(&self) {
        self.inner
            .core
            .checkpoint_requested
            .store(true, Ordering::Relaxed);
    }

    /// Messages waiting to be replayed by the next incarnation.
    pub fn pending_replays(&self) -> usize {
        self.replays().len()
    }

    fn replays(&self) -> MutexGuard<'_, VecDeque<Replay<W>>> {
        self.inner.replay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts handed-back messages at the front of the queue, in order: they
    /// are older than anything still waiting there.
    pub(crate) fn push_front_replays(&self, items: Vec<Replay<W>>) {
        let mut q = self.replays();
        for r in items.into_iter().rev() {
            q.push_front(r);
        }
    }

    pub(crate) fn push_back_replay(&self, item: Replay<W>) {
        self.replays().push_back(item);
    }

    pub(crate) fn pop_replay(&self) -> Option<Replay<W>> {
        self.replays().pop_front()
    }

    pub(crate) fn unpop_replay(&self, r: Replay<W>) {
        self.replays().push_front(r);
    }
}
