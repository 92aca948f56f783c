//! The cpu backend: each actor slot is served by a device thread running the
//! same device loop a GPU runs, over the same rings and control block, with
//! the kernel's Rust handlers. It is the default backend and the reference
//! the GPU backends must match byte for byte.

use crate::control::{ControlRef, FaultCode, LifecycleState};
use crate::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use crate::hlc::Hlc;
use crate::home::{DeadLetter, DeadLetterReason, HomeCore, RouteFailure};
use crate::id::{ActorId, ClockDomain, CorrelationId};
use crate::kernel::Payload;
use crate::kernel::{
    CpuHandlers, Kernel, MAX_INLINE, MAX_SENDS, ReplySink, SYS_NO_REPLY, TOO_MANY_SENDS,
};
use crate::link::{Link, LinkTx, OutLink, Staged};
use crate::ring::{Consumer, Producer};
use crate::runtime::{
    DEVICE_NAP, DEVICE_NAP_BELOW, Idle, PollerShared, ReplyDrain, device_spin_budget,
};
use crate::space::SpaceWaker;
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Everything a device loop needs, moved onto its thread.
pub(crate) struct SlotParts<K: Kernel> {
    pub(crate) id: ActorId,
    pub(crate) node: u16,
    pub(crate) state: K::State,
    pub(crate) handlers: CpuHandlers<K>,
    pub(crate) served: Vec<u32>,
    pub(crate) control: ControlRef,
    pub(crate) h2k: Consumer,
    pub(crate) k2h: Producer,
    pub(crate) poller: Arc<PollerShared>,
    /// Delivers what the loop published to K2H, on this thread.
    pub(crate) deliver: ReplyDrain,
    pub(crate) space: Arc<SpaceWaker>,
    pub(crate) max_in_flight: usize,
    pub(crate) home: Arc<HomeCore>,
    pub(crate) checkpoint_every: u64,
    #[cfg(feature = "fault-injection")]
    pub(crate) injector: Option<Arc<crate::inject::FaultInjector>>,
}

/// Starts the device thread of one actor slot.
pub(crate) fn spawn<K: Kernel>(parts: SlotParts<K>) -> std::io::Result<JoinHandle<()>> {
    let name = format!("ringkernel-{}-{}", K::NAME, parts.id.index());
    std::thread::Builder::new()
        .name(name)
        .spawn(move || DeviceLoop::new(parts).run())
}

/// A message made by a handler, waiting for K2H room.
type Pending = Staged;

/// A handler's replies and sends are staged; the loop publishes them after
/// the handler returns and, for K2H, before it commits the message (so a
/// fenced incarnation's replies are never published, and a committed
/// message's replies are in K2H before its commit is visible); K2K sends go
/// to their links' outboxes once the message is committed.
struct Replies<'a> {
    outbox: &'a mut VecDeque<Pending>,
    outbox_limit: usize,
    clock: &'a Hlc,
    /// Physical time, read once for the batch.
    now: u64,
    src: ActorId,
    /// Messages this handler sent to other actors.
    sends: usize,
    /// Of those, the ones staged in `outbox` (routed, not K2K).
    routed: usize,
    /// Origin word of the message being served: its routed sends carry it.
    origin: u64,
    /// Links out of this actor, and the K2K sends staged for them.
    outbound: &'a [OutLink],
    k2k: &'a mut Vec<(usize, Staged)>,
}

impl ReplySink for Replies<'_> {
    fn send_reply(
        &mut self,
        to: CorrelationId,
        dst: ActorId,
        type_id: u32,
        flags: Flags,
        payload: &[u8],
    ) {
        let stamp = self.clock.tick_at(self.now);
        let mut header = EnvelopeHeader::new(type_id, flags)
            .with_src(self.src)
            .with_dst(dst)
            .with_correlation(to)
            .with_stamp(stamp.hlc, stamp.domain);
        let len = payload.len().min(MAX_INLINE);
        header.payload_len = len as u32;
        let is_send = !flags.contains(Flags::REPLY);
        if is_send {
            self.sends += 1;
            if self.sends > MAX_SENDS {
                // Reported by the loop as a fault of this message.
                return;
            }
            if let Some(i) = self
                .outbound
                .iter()
                .position(|o| o.link.to == dst.with_incarnation(0))
            {
                let o = &self.outbound[i];
                // Types the receiver does not serve take the routed path
                // (where the adapter refuses them as dead letters).
                if !o.link.receiver_gone() && o.link.served.binary_search(&type_id).is_ok() {
                    // Room: the ring's, and as much again in the outbox.
                    if !o.link.report_failures
                        || o.link.in_ring()
                            + o.outbox
                            + self.k2k.iter().filter(|(j, _)| *j == i).count()
                            < 2 * o.link.capacity
                    {
                        self.k2k.push((i, Staged::new(header, &payload[..len])));
                        return;
                    }
                    // Full, and the edge reports failures: a dead letter,
                    // once this message commits.
                    header.flags = header.flags.with(Flags::UNDELIVERED);
                }
            }
            // The poller routes it only once this message is committed.
            header.seq = self.origin;
            self.routed += 1;
        }
        // Sends do not count against the replies' bound.
        if !is_send && self.outbox.len().saturating_sub(self.routed) >= self.outbox_limit {
            // More replies than asks can be in flight: a handler answered a
            // deferred ask twice. The extra reply could only be late.
            tracing::warn!(actor = ?self.src, correlation = ?to, "reply beyond the in-flight limit dropped");
        } else {
            self.outbox.push_back(Staged::new(header, &payload[..len]));
        }
    }
}

/// Where the message being served came from: H2K (its `seq`), or link
/// `inbound[i]` at position `pos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    H2k(u64),
    Link(usize, u64),
}

struct DeviceLoop<K: Kernel> {
    id: ActorId,
    incarnation: u16,
    state: K::State,
    handlers: CpuHandlers<K>,
    served: Vec<u32>,
    control: ControlRef,
    h2k: Consumer,
    k2h: Producer,
    poller: Arc<PollerShared>,
    deliver: ReplyDrain,
    /// Replies were published to K2H since the last delivery.
    published: bool,
    /// Held while spinning idle; given back before serving anything (a
    /// handler must not hold it), and on any exit, unwinding too.
    turn: Option<SpinTurn>,
    space: Arc<SpaceWaker>,
    home: Arc<HomeCore>,
    #[cfg(feature = "fault-injection")]
    injector: Option<Arc<crate::inject::FaultInjector>>,
    outbox: VecDeque<Pending>,
    outbox_limit: usize,
    clock: Hlc,
    acked: LifecycleState,
    progress: Progress,
    /// A message served whose replies wait in the outbox: its origin, and
    /// whether a fault is injected after its commit.
    pending: Option<(Origin, bool)>,
    /// Send stamp of the last H2K message served, and its gap to the one
    /// before.
    last_send: u64,
    send_gap_ns: u64,
    /// Whether the last H2K message served was an ask (its caller's next
    /// ask follows the reply: see `device_spin_budget`).
    last_was_ask: bool,
    /// K2K links, as of `links_generation`.
    links_generation: u64,
    inbound: Vec<Arc<Link>>,
    outbound: Vec<OutLink>,
    /// K2K sends of the message being served.
    k2k: Vec<(usize, Staged)>,
    /// Messages copied out of an inbound ring, being served.
    inbuf: Vec<Staged>,
    /// Physical time, read once per batch (one clock read per batch, not
    /// per message: the HLC's counter orders the batch's stamps).
    now: u64,
}

/// One of the runtime's turns to spin idle ([`PollerShared::start_spinning`]),
/// given back when dropped.
struct SpinTurn(Arc<PollerShared>);

impl SpinTurn {
    fn take(poller: &Arc<PollerShared>) -> Option<Self> {
        poller
            .start_spinning()
            .then(|| SpinTurn(Arc::clone(poller)))
    }
}

impl Drop for SpinTurn {
    fn drop(&mut self) {
        self.0.stop_spinning();
    }
}

/// Messages served between two looks at the control block.
const BATCH: usize = 64;

/// How long a loop whose K2K outboxes wait for ring room sleeps at most
/// (receivers do not ring senders when they free room).
const OUTBOX_RETRY: std::time::Duration = std::time::Duration::from_micros(50);

enum Step {
    Worked,
    Idle,
    Exit,
}

/// How serving one message ended, before its commit.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
enum Served {
    /// The handler returned; commit it (then fault, if injected so).
    Done { fault_after: bool },
    /// A fault: the message is not processed.
    Fault(FaultCode, u64),
    /// The incarnation was fenced meanwhile: leave quietly.
    Fenced,
    /// Injected: the loop exits without a word.
    Exit,
    /// A link message of a type this kernel does not serve (the sender's
    /// view of the receiver's types was stale): committed, and reported as
    /// a dead letter.
    Refused,
}

/// How a run of messages ended early: the loop ends (`Some(Step)` after
/// reporting), or it stops for now (`None`).
type Stop = Option<Step>;

impl<K: Kernel> DeviceLoop<K> {
    fn new(p: SlotParts<K>) -> Self {
        DeviceLoop {
            id: p.id,
            incarnation: p.id.incarnation(),
            state: p.state,
            handlers: p.handlers,
            served: p.served,
            control: p.control,
            h2k: p.h2k,
            k2h: p.k2h,
            poller: p.poller,
            deliver: p.deliver,
            published: false,
            turn: None,
            space: p.space,
            home: p.home,
            #[cfg(feature = "fault-injection")]
            injector: p.injector,
            outbox: VecDeque::with_capacity(p.max_in_flight),
            // Every queued reply answers a distinct ask in flight (at most
            // the waiter slab's capacity), plus the one being served.
            outbox_limit: p.max_in_flight + 1,
            clock: Hlc::new(ClockDomain::unit(
                p.node,
                (p.id.index() as u16).wrapping_add(1),
            )),
            acked: LifecycleState::Created,
            progress: Progress {
                committed: 0,
                processed: 0,
                beats: 0,
                checkpoint_every: p.checkpoint_every,
            },
            pending: None,
            last_send: 0,
            send_gap_ns: u64::MAX,
            last_was_ask: false,
            links_generation: u64::MAX,
            inbound: Vec::new(),
            outbound: Vec::new(),
            k2k: Vec::new(),
            inbuf: Vec::with_capacity(BATCH),
            now: 0,
        }
    }

    fn ack(&mut self, state: LifecycleState) {
        if self.acked != state {
            self.acked = state;
            self.control.ack(state, u32::from(self.incarnation));
            self.poller.wake();
        }
    }

    fn fault(&mut self, code: FaultCode, detail: u64) {
        self.acked = LifecycleState::Faulted;
        self.control
            .report_fault(code, detail, u32::from(self.incarnation));
        self.poller.wake();
    }

    /// The host fenced this incarnation: stop without another write the
    /// host could mistake for progress.
    fn leave_fenced(&mut self) {
        self.acked = LifecycleState::Terminated;
        self.control
            .ack(LifecycleState::Terminated, u32::from(self.incarnation));
    }

    fn run(mut self) {
        // Anything that escapes the loop (a panic outside a handler, or a
        // return that did not acknowledge a final state) is a fault the
        // host must hear of: every in-flight ask then resolves.
        let outcome = catch_unwind(AssertUnwindSafe(|| self.serve()));
        if outcome.is_err() || !self.acked.is_final() {
            self.fault(FaultCode::UnexpectedExit, u64::from(outcome.is_err()));
        }
    }

    fn serve(&mut self) {
        self.ack(LifecycleState::Launched);
        let mut idle = Idle::new(std::time::Duration::ZERO);
        let mut napped = false;
        loop {
            match self.step() {
                Step::Exit => return,
                Step::Worked => {
                    self.turn = None;
                    idle.reset();
                    idle.set_budget(device_spin_budget(self.send_gap_ns, self.last_was_ask));
                    napped = false;
                }
                Step::Idle => {
                    // Between the batches of a tell stream (and not right
                    // after a nap that brought nothing): nap, and leave the
                    // CPU to the producers. The last round emptied every
                    // ring.
                    // A caller asking one at a time wants the loop awake
                    // (its ask would end the nap with a futex wake).
                    let stream = !napped
                        && !self.last_was_ask
                        && self.acked == LifecycleState::Active
                        && self.send_gap_ns < DEVICE_NAP_BELOW.as_nanos() as u64
                        && self.outbox.is_empty()
                        && !self.links_blocked();
                    // Held by a full link: nothing to spin for. Spinning
                    // takes one of the runtime's turns.
                    if !stream && !self.links_blocked() && !idle.should_park() {
                        if self.turn.is_none() {
                            self.turn = SpinTurn::take(&self.poller);
                        }
                        if self.turn.is_some() {
                            std::hint::spin_loop();
                            continue;
                        }
                    }
                    self.turn = None;
                    let acked = self.acked;
                    let incarnation = self.incarnation;
                    let blocked = self.links_blocked();
                    // Lists are reloaded only between messages.
                    let can_refresh = self.pending.is_none() && self.k2k.is_empty();
                    let (control, h2k, k2h) = (&self.control, &mut self.h2k, &mut self.k2h);
                    let outbox_blocked = !self.outbox.is_empty();
                    let inbound = &self.inbound;
                    let links_generation = self.links_generation;
                    let home = &self.home;
                    let has_work = || {
                        control.requested_state() != Ok(acked)
                            || control.is_fenced()
                            || (can_refresh && home.links_generation() != links_generation)
                            || (acked == LifecycleState::Active
                                && !blocked
                                && k2h.free_slots() > 0
                                && (!h2k.is_empty()
                                    || inbound.iter().any(|l| l.has_inbound(incarnation))))
                            || (outbox_blocked && k2h.free_slots() > 0)
                    };
                    if stream {
                        // Tells published meanwhile (lazy rings) wait for
                        // its end; anything else ends it.
                        control
                            .doorbell()
                            .nap(has_work, || std::thread::park_timeout(DEVICE_NAP));
                        napped = true;
                    } else if self.outbound.iter().any(|o| o.outbox > 0) {
                        control
                            .doorbell()
                            .park(has_work, || std::thread::park_timeout(OUTBOX_RETRY));
                    } else {
                        control.doorbell().park(has_work, std::thread::park);
                    }
                    idle.reset();
                }
            }
        }
    }

    /// One round, then the replies it published go to their callers: from
    /// this thread if the poller is not reading K2H just now, else the
    /// poller is rung.
    fn step(&mut self) -> Step {
        let step = self.round();
        self.announce();
        step
    }

    /// Delivers the replies published since the last call (or rings the
    /// poller for them).
    fn announce(&mut self) {
        if std::mem::take(&mut self.published) && !(self.deliver)() {
            self.poller.wake();
        }
    }

    fn round(&mut self) -> Step {
        if self.control.is_fenced() {
            self.leave_fenced();
            return Step::Exit;
        }
        let requested = match self.control.requested_state() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(actor = ?self.id, error = %e, "corrupt control block");
                self.fault(FaultCode::BadEnvelope, u64::MAX);
                return Step::Exit;
            }
        };
        self.refresh_links();
        let mut worked = self.flush_links();
        match requested {
            LifecycleState::Terminated | LifecycleState::Faulted => {
                // Best effort: replies already made reach their callers
                // rather than resolving as `Terminated`.
                if let Err(step) = self.settle() {
                    return step;
                }
                // Before the acknowledgement: its waiter then sweeps what
                // is left as `Terminated`.
                self.announce();
                self.ack(LifecycleState::Terminated);
                return Step::Exit;
            }
            LifecycleState::Created | LifecycleState::Launched => {
                self.ack(LifecycleState::Launched);
                return Step::Idle;
            }
            LifecycleState::Deactivated => {
                self.ack(LifecycleState::Deactivated);
                let queued = self.outbox.len();
                return match self.settle() {
                    Err(step) => step,
                    Ok(_) if self.outbox.len() < queued || worked > 0 => Step::Worked,
                    Ok(_) => Step::Idle,
                };
            }
            LifecycleState::Active => self.ack(LifecycleState::Active),
        }
        let queued = self.outbox.len();
        match self.settle() {
            Err(step) => return step,
            Ok(false) => {
                return if self.outbox.len() < queued || worked > 0 {
                    Step::Worked
                } else {
                    Step::Idle
                };
            }
            Ok(true) => worked += queued,
        }
        self.refresh_links();
        match self.serve_h2k() {
            Ok(n) => worked += n,
            Err(step) => return step,
        }
        for i in 0..self.inbound.len() {
            match self.serve_link(i) {
                Ok(n) => worked += n,
                Err(step) => return step,
            }
        }
        if self.links_blocked() {
            // Waiting for a receiver to take what this one sent is
            // backpressure, not a hang: the watchdog sees a heartbeat.
            self.progress.beats += 1;
            self.control
                .record_progress(self.progress.beats, self.progress.processed);
        }
        if worked > 0 { Step::Worked } else { Step::Idle }
    }

    /// Reloads the link lists if they changed (between messages only: a
    /// staged or pending message refers to them by index).
    fn refresh_links(&mut self) {
        let generation = self.home.links_generation();
        if generation == self.links_generation || self.pending.is_some() || !self.k2k.is_empty() {
            return;
        }
        let (generation, inbound, outbound) = self.home.links();
        self.links_generation = generation;
        self.inbound = inbound;
        self.outbound = OutLink::all(outbound);
    }

    /// Moves what K2K outboxes hold into their rings; returns how many.
    fn flush_links(&mut self) -> usize {
        OutLink::flush_all(&mut self.outbound)
    }

    /// Whether a waiting link's outbox is at capacity: take no new message.
    fn links_blocked(&self) -> bool {
        OutLink::any_blocked(&self.outbound)
    }

    /// Serves what waits in H2K (a batch); returns how many were taken.
    fn serve_h2k(&mut self) -> Result<usize, Step> {
        if self.links_blocked() {
            return Ok(0);
        }
        let check = HeaderCheck::only(MAX_INLINE as u32, &self.served);
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.clear();
        let mut bad = None;
        {
            let mut batch = self.h2k.batch();
            while buf.len() < BATCH {
                match batch.try_recv_with(&check, |env| {
                    Staged::push(&mut buf, env.header, env.payload);
                }) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        bad = Some(e);
                        break;
                    }
                    None => break,
                }
            }
            // Released below, as far as committed.
            batch.release_first(0);
        }
        let (taken, committed, stop) = self.serve_run(&buf, |i, s| {
            let _ = i;
            Origin::H2k(s.header.seq)
        });
        self.inbuf = buf;
        // The H2K head never passes a message that is not committed: what
        // the host finds there after a fence is exactly what was not
        // processed.
        self.h2k.release_next(committed);
        if taken > 0 {
            self.space.wake_if_wanted();
        }
        if let Some(stop) = stop {
            return Err(stop);
        }
        if let Some(e) = bad
            && taken == self.inbuf.len()
            && self.pending.is_none()
        {
            tracing::error!(actor = ?self.id, error = %e, "invalid envelope in H2K");
            self.fault(FaultCode::BadEnvelope, 0);
            return Err(Step::Exit);
        }
        Ok(taken)
    }

    /// Serves what waits in the link `inbound[i]` (a batch).
    fn serve_link(&mut self, i: usize) -> Result<usize, Step> {
        let link = self.inbound[i].clone();
        if self.links_blocked() || !link.has_inbound(self.incarnation) {
            return Ok(0);
        }
        let mut buf = std::mem::take(&mut self.inbuf);
        buf.clear();
        let Some((first, bad)) = link.take(self.incarnation, 0, BATCH, &mut buf) else {
            self.inbuf = buf;
            return Ok(0);
        };
        let (taken, _, stop) = self.serve_run(&buf, |j, _| Origin::Link(i, first + j as u64));
        self.inbuf = buf;
        // Frees the ring up to what was committed (the sender may be
        // waiting for room).
        link.release_committed();
        if let Some(stop) = stop {
            return Err(stop);
        }
        if let Some(e) = bad
            && taken == self.inbuf.len()
            && self.pending.is_none()
        {
            tracing::error!(actor = ?self.id, error = %e, link = link.id.get(), "invalid envelope in a K2K link");
            self.fault(FaultCode::BadEnvelope, 1);
            return Err(Step::Exit);
        }
        Ok(taken)
    }

    /// Serves `buf` in order while a reply has room and no outbox waits;
    /// returns (served, committed, how the loop ends if it does).
    fn serve_run(
        &mut self,
        buf: &[Staged],
        origin: impl Fn(usize, &Staged) -> Origin,
    ) -> (usize, usize, Stop) {
        let (mut taken, mut committed) = (0, 0);
        if !buf.is_empty() {
            self.turn = None;
            use crate::hlc::PhysicalClock;
            self.now = self.clock.clock().now_ns();
        }
        while taken < buf.len()
            && self.outbox.is_empty()
            && self.k2h.has_room()
            && !self.links_blocked()
            && !self.control.is_fenced()
        {
            let msg = &buf[taken];
            let from = origin(taken, msg);
            taken += 1;
            match self.serve_one(msg, from) {
                Served::Done { fault_after } => {
                    // Publish the replies, then commit: a fenced
                    // incarnation publishes nothing, and a committed
                    // message's replies are in K2H before its commit is
                    // visible to the host's fence.
                    if self.control.is_fenced() {
                        self.home
                            .count_fenced(1 + (self.outbox.len() + self.k2k.len()) as u64);
                        self.outbox.clear();
                        self.k2k.clear();
                        self.leave_fenced();
                        return (taken, committed, Some(Step::Exit));
                    }
                    self.published |= flush(&mut self.k2h, &mut self.outbox) > 0;
                    if !self.outbox.is_empty() {
                        // More replies than K2H has room for: the message
                        // stays uncommitted (and unreleased) until they are
                        // all published.
                        self.pending = Some((from, fault_after));
                        return (taken, committed, None);
                    }
                    match self.commit(from, fault_after) {
                        Ok(()) => {
                            committed += 1;
                            // Its reply goes now, not after the batch.
                            self.announce();
                        }
                        Err(end) => return (taken, committed, Some(self.end(end))),
                    }
                }
                Served::Fault(code, detail) => {
                    self.fault(code, detail);
                    return (taken, committed, Some(Step::Exit));
                }
                Served::Fenced => {
                    self.leave_fenced();
                    return (taken, committed, Some(Step::Exit));
                }
                Served::Exit => return (taken, committed, Some(Step::Exit)),
                Served::Refused => match self.commit(from, false) {
                    Ok(()) => {
                        committed += 1;
                        self.poller.dead_letter(DeadLetter {
                            actor: self.id,
                            src: msg.header.src,
                            seq: msg.header.seq,
                            payload: Payload::from_parts(msg.header.type_id, msg.payload()),
                            reason: DeadLetterReason::Unroutable(RouteFailure::Refused),
                        });
                    }
                    Err(end) => return (taken, committed, Some(self.end(end))),
                },
            }
        }
        (taken, committed, None)
    }

    /// Reports how the loop ends after a failed commit.
    fn end(&mut self, end: Option<(FaultCode, u64)>) -> Step {
        match end {
            None => self.leave_fenced(),
            Some((code, detail)) => self.fault(code, detail),
        }
        Step::Exit
    }

    /// Runs the handler of one message, staging what it makes.
    fn serve_one(&mut self, msg: &Staged, from: Origin) -> Served {
        // Asked once per message (not per empty poll).
        #[cfg(feature = "fault-injection")]
        let injection = self.injector.as_ref().and_then(|i| i.next());
        let mut header = msg.header;
        let origin_word = match from {
            Origin::H2k(seq) => {
                // The sender's pace sizes the idle spin (see `Idle`).
                self.send_gap_ns = header.hlc.saturating_sub(self.last_send);
                self.last_send = header.hlc;
                self.last_was_ask = header.flags.contains(Flags::ASK);
                seq
            }
            Origin::Link(i, pos) => {
                // The link delivers to whichever incarnation serves it.
                header.dst = self.id;
                crate::link::origin_of_link(self.inbound[i].id, pos)
            }
        };
        let stamp = self.clock.receive_at(header.hlc, self.now);
        // Before anything can fail: the host's hand-back tells the message
        // that was in a handler from the rest.
        self.control.begin_serving(
            origin_word,
            if header.flags.contains(Flags::ASK) {
                header.correlation.to_bits()
            } else {
                0
            },
        );
        #[cfg(feature = "fault-injection")]
        let mut corrupt = false;
        #[cfg(feature = "fault-injection")]
        match injection {
            Some(crate::inject::Injection::Panic) => {
                return Served::Fault(FaultCode::HandlerPanic, INJECTED_DETAIL);
            }
            Some(crate::inject::Injection::Exit) => return Served::Exit,
            Some(crate::inject::Injection::Hang(d)) => {
                std::thread::sleep(d);
                if self.control.is_fenced() {
                    return Served::Fenced;
                }
            }
            Some(crate::inject::Injection::CorruptReply) => corrupt = true,
            _ => {}
        }
        let Some((_, handler)) = self
            .handlers
            .entries
            .iter()
            .find(|(t, _)| *t == header.type_id)
        else {
            if let Origin::Link(..) = from {
                return Served::Refused;
            }
            return Served::Fault(FaultCode::UnknownMessageType, u64::from(header.type_id));
        };
        let mut answered = false;
        let staged = self.outbox.len();
        let mut replies = Replies {
            outbox: &mut self.outbox,
            outbox_limit: self.outbox_limit,
            clock: &self.clock,
            now: self.now,
            src: self.id,
            sends: 0,
            routed: 0,
            origin: origin_word,
            outbound: &self.outbound,
            k2k: &mut self.k2k,
        };
        let state = &mut self.state;
        let result = catch_unwind(AssertUnwindSafe(|| {
            handler(
                state,
                msg.payload(),
                &header,
                stamp,
                &mut replies,
                &mut answered,
            )
        }));
        let outcome = match result {
            Err(_) => Served::Fault(FaultCode::HandlerPanic, 0),
            Ok(Err(e)) => Served::Fault(FaultCode::HandlerFault, u64::from(e.0)),
            Ok(Ok(())) if replies.sends > MAX_SENDS => {
                Served::Fault(FaultCode::HandlerFault, TOO_MANY_SENDS)
            }
            Ok(Ok(())) => {
                if header.flags.contains(Flags::ASK) && !answered {
                    replies.send_reply(
                        header.correlation,
                        header.src,
                        SYS_NO_REPLY,
                        Flags::REPLY | Flags::ERROR,
                        &[],
                    );
                }
                Served::Done { fault_after: false }
            }
        };
        if let Served::Fault(..) = outcome {
            // A failed handler's replies and sends are not published.
            self.outbox.truncate(staged);
            self.k2k.clear();
        }
        #[cfg(feature = "fault-injection")]
        let outcome = match (outcome, injection) {
            (Served::Done { .. }, Some(crate::inject::Injection::FaultAfterReply)) => {
                Served::Done { fault_after: true }
            }
            (Served::Done { fault_after }, _) if corrupt => {
                corrupt_last_reply(&mut self.outbox, staged);
                Served::Done { fault_after }
            }
            (o, _) => o,
        };
        outcome
    }

    /// Commits a served message whose replies are published: by the control
    /// block's commit word (H2K) or the link's (K2K). Then its K2K sends
    /// go to their links, and progress (and a due checkpoint) is recorded.
    /// `Err` says how the loop ends: `None` fenced (the commit lost to the
    /// host's fence; nothing counts), `Some` an injected fault after it.
    fn commit(&mut self, from: Origin, fault_after: bool) -> Result<(), Option<(FaultCode, u64)>> {
        if self.k2k.is_empty() {
            // The common case: no link to hold.
            if !self.commit_word(from) {
                self.home.count_fenced(1);
                return Err(None);
            }
        } else {
            // The producer ends of the links this message sends on are held
            // across the commit and the push: an incarnation started after a
            // fence of this one cannot slip its sends in between (FIFO per
            // edge across a restart). Taken in list order; only the sender's
            // incarnations and the host (briefly, to close) take them.
            let links: Vec<(usize, Arc<Link>)> = self
                .outbound
                .iter()
                .enumerate()
                .filter(|(i, _)| self.k2k.iter().any(|(j, _)| j == i))
                .map(|(i, o)| (i, o.link.clone()))
                .collect();
            let mut held: Vec<_> = links.iter().map(|(i, l)| (*i, l.lock_tx())).collect();
            if !self.commit_word(from) {
                self.home.count_fenced(1 + self.k2k.len() as u64);
                self.k2k.clear();
                return Err(None);
            }
            for (i, tx) in &mut held {
                self.push_k2k(*i, tx);
            }
            drop(held);
            self.k2k.clear();
        }
        let p = &mut self.progress;
        p.processed += 1;
        p.beats += 1;
        if (p.checkpoint_every > 0 && p.processed % p.checkpoint_every == 0)
            || self.home.take_checkpoint_request()
        {
            checkpoint::<K>(
                &self.home,
                &self.control,
                self.incarnation,
                p.processed,
                &self.state,
            );
        }
        // Per message, so a long batch of slow but progressing handlers never
        // looks hung. After the checkpoint: a host that sees this count knows
        // the message's checkpoint decision is made.
        self.control.record_progress(p.beats, p.processed);
        if fault_after {
            // Committed, its reply published, and then the fault strikes
            // before its slot is released.
            return Err(Some((FaultCode::HandlerFault, INJECTED_DETAIL)));
        }
        Ok(())
    }

    /// Wins the commit of a served message against the host's fence (see
    /// [`DeviceLoop::commit`]).
    fn commit_word(&mut self, from: Origin) -> bool {
        match from {
            Origin::H2k(seq) => {
                let ok = self.control.commit(self.progress.committed, seq);
                if ok {
                    self.progress.committed = seq;
                }
                ok
            }
            Origin::Link(i, pos) => self.inbound[i].control.commit(self.incarnation, pos),
        }
    }

    /// Hands the committed message's K2K sends to their links, in the order
    /// they were made per link.
    fn push_k2k(&mut self, i: usize, tx: &mut LinkTx) {
        let o = &mut self.outbound[i];
        let mine = self.k2k.iter().filter(|(j, _)| *j == i).map(|(_, s)| *s);
        match o.link.push(tx, mine, &mut o.wake) {
            Ok(left) => o.outbox = left,
            Err(lost) => {
                // The link closed meanwhile.
                for s in lost {
                    self.poller.dead_letter(DeadLetter {
                        actor: s.header.dst,
                        src: s.header.src,
                        seq: 0,
                        payload: Payload::from_parts(s.header.type_id, s.payload()),
                        reason: DeadLetterReason::Terminated,
                    });
                }
            }
        }
    }

    /// Publishes queued replies and, once they are all out, commits and
    /// releases a message that was waiting for them. `Ok(true)`: nothing is
    /// left waiting; `Ok(false)`: K2H is still full; `Err`: the loop ends.
    fn settle(&mut self) -> Result<bool, Step> {
        if self.control.is_fenced() {
            self.home
                .count_fenced((self.outbox.len() + self.k2k.len()) as u64);
            self.outbox.clear();
            self.k2k.clear();
            self.leave_fenced();
            return Err(Step::Exit);
        }
        self.published |= flush(&mut self.k2h, &mut self.outbox) > 0;
        if !self.outbox.is_empty() {
            return Ok(false);
        }
        let Some((from, fault_after)) = self.pending.take() else {
            return Ok(true);
        };
        let committed = self.commit(from, fault_after);
        if committed.is_ok() {
            match from {
                // It is still the oldest slot of H2K: release it now.
                Origin::H2k(_) => {
                    self.h2k.release_next(1);
                    self.space.wake_if_wanted();
                }
                Origin::Link(i, _) => self.inbound[i].release_committed(),
            }
        }
        match committed {
            Ok(()) => Ok(true),
            Err(end) => Err(self.end(end)),
        }
    }
}

/// What the loop has committed.
struct Progress {
    /// `seq` of the last message committed.
    committed: u64,
    /// Messages committed.
    processed: u64,
    /// The heartbeat: bumped per commit, and per look while backpressure
    /// from a K2K link holds the loop.
    beats: u64,
    /// Checkpoint every this many (0: on request only).
    checkpoint_every: u64,
}

/// Stores the state in the actor's home (refused there if fenced).
fn checkpoint<K: Kernel>(
    home: &HomeCore,
    control: &ControlRef,
    incarnation: u16,
    processed: u64,
    state: &K::State,
) {
    home.store_checkpoint(
        K::NAME,
        control,
        incarnation,
        processed,
        bytemuck::bytes_of(state),
    );
}

/// Moves queued replies into K2H; returns how many (the caller delivers
/// them or rings the poller).
fn flush(k2h: &mut Producer, outbox: &mut VecDeque<Pending>) -> usize {
    let mut moved = 0;
    while let Some(p) = outbox.front() {
        if k2h.try_send_bytes(&p.header, p.payload()).is_err() {
            break;
        }
        outbox.pop_front();
        moved += 1;
    }
    moved
}

/// The fault detail of injected faults.
pub(crate) const INJECTED_DETAIL: u64 = 0x1_0000_0000;

/// Injected: the reply staged last (or a new envelope, if the handler
/// staged none) gets a corrupt magic.
#[cfg(feature = "fault-injection")]
fn corrupt_last_reply(outbox: &mut VecDeque<Pending>, staged: usize) {
    if outbox.len() == staged {
        outbox.push_back(Staged::new(EnvelopeHeader::new(1, Flags::REPLY), &[]));
    }
    if let Some(p) = outbox.back_mut() {
        p.header.magic = 0xBAD0;
    }
}
