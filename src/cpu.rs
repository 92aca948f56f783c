//! The cpu backend: each actor slot is served by a device thread running the
//! same device loop a GPU runs, over the same rings and control block, with
//! the kernel's Rust handlers. It is the default backend and the reference
//! the GPU backends must match byte for byte.

use crate::control::{ControlBlock, FaultCode, LifecycleState};
use crate::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use crate::hlc::Hlc;
use crate::home::HomeCore;
use crate::id::{ActorId, ClockDomain, CorrelationId};
use crate::kernel::{
    CpuHandlers, Kernel, MAX_INLINE, MAX_SENDS, ReplySink, SYS_NO_REPLY, TOO_MANY_SENDS,
};
use crate::ring::{Consumer, Producer};
use crate::runtime::{Idle, PollerShared, device_spin_budget};
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
    pub(crate) control: Arc<ControlBlock>,
    pub(crate) h2k: Consumer,
    pub(crate) k2h: Producer,
    pub(crate) poller: Arc<PollerShared>,
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

/// A reply made by a handler, waiting for K2H room.
struct Pending {
    header: EnvelopeHeader,
    len: usize,
    bytes: [u8; MAX_INLINE],
}

/// A handler's replies are staged in a bounded outbox; the loop publishes
/// them to K2H after the handler returns and before it commits the message
/// (so a fenced incarnation's replies are never published, and a committed
/// message's replies are in K2H before its commit is visible).
struct Replies<'a> {
    outbox: &'a mut VecDeque<Pending>,
    outbox_limit: usize,
    clock: &'a Hlc,
    src: ActorId,
    /// Messages this handler sent to other actors.
    sends: usize,
    /// `seq` of the message being served: its sends carry it.
    origin: u64,
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
        let stamp = self.clock.tick();
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
            // The poller routes it only once this message is committed.
            header.seq = self.origin;
        }
        // Sends do not count against the replies' bound.
        if !is_send && self.outbox.len().saturating_sub(self.sends) >= self.outbox_limit {
            // More replies than asks can be in flight: a handler answered a
            // deferred ask twice. The extra reply could only be late.
            tracing::warn!(actor = ?self.src, correlation = ?to, "reply beyond the in-flight limit dropped");
        } else {
            let mut bytes = [0u8; MAX_INLINE];
            bytes[..len].copy_from_slice(&payload[..len]);
            self.outbox.push_back(Pending { header, len, bytes });
        }
    }
}

struct DeviceLoop<K: Kernel> {
    id: ActorId,
    incarnation: u16,
    state: K::State,
    handlers: CpuHandlers<K>,
    served: Vec<u32>,
    control: Arc<ControlBlock>,
    h2k: Consumer,
    k2h: Producer,
    poller: Arc<PollerShared>,
    space: Arc<SpaceWaker>,
    home: Arc<HomeCore>,
    #[cfg(feature = "fault-injection")]
    injector: Option<Arc<crate::inject::FaultInjector>>,
    outbox: VecDeque<Pending>,
    outbox_limit: usize,
    clock: Hlc,
    acked: LifecycleState,
    progress: Progress,
    /// A message served whose replies wait in the outbox: its `seq`, and
    /// whether a fault is injected after its commit.
    pending: Option<(u64, bool)>,
    /// Send stamp of the last message served, and its gap to the one before.
    last_send: u64,
    send_gap_ns: u64,
}

/// Messages served between two looks at the control block.
const BATCH: usize = 64;

enum Step {
    Worked,
    Idle,
    Exit,
}

/// How serving one message ended, before its commit.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
enum Served {
    /// The handler returned; commit `seq` (then fault, if injected so).
    Done { seq: u64, fault_after: bool },
    /// A fault: the message is not processed.
    Fault(FaultCode, u64),
    /// The incarnation was fenced meanwhile: leave quietly.
    Fenced,
    /// Injected: the loop exits without a word.
    Exit,
}

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
                checkpoint_every: p.checkpoint_every,
            },
            pending: None,
            last_send: 0,
            send_gap_ns: u64::MAX,
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
        loop {
            match self.step() {
                Step::Exit => return,
                Step::Worked => {
                    idle.reset();
                    idle.set_budget(device_spin_budget(self.send_gap_ns));
                }
                Step::Idle => {
                    if !idle.should_park() {
                        std::hint::spin_loop();
                        continue;
                    }
                    let acked = self.acked;
                    let (control, h2k, k2h) = (&self.control, &mut self.h2k, &mut self.k2h);
                    let outbox_blocked = !self.outbox.is_empty();
                    let has_work = || {
                        control.requested_state() != Ok(acked)
                            || control.is_fenced()
                            || (acked == LifecycleState::Active
                                && !h2k.is_empty()
                                && k2h.free_slots() > 0)
                            || (outbox_blocked && k2h.free_slots() > 0)
                    };
                    control.doorbell().park(has_work, std::thread::park);
                    idle.reset();
                }
            }
        }
    }

    fn step(&mut self) -> Step {
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
        match requested {
            LifecycleState::Terminated | LifecycleState::Faulted => {
                // Best effort: replies already made reach their callers
                // rather than resolving as `Terminated`.
                if let Err(step) = self.settle() {
                    return step;
                }
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
                    Ok(_) if self.outbox.len() < queued => Step::Worked,
                    Ok(_) => Step::Idle,
                };
            }
            LifecycleState::Active => self.ack(LifecycleState::Active),
        }
        let queued = self.outbox.len();
        let mut worked = 0;
        match self.settle() {
            Err(step) => return step,
            Ok(false) => {
                return if self.outbox.len() < queued {
                    Step::Worked
                } else {
                    Step::Idle
                };
            }
            Ok(true) => worked += queued,
        }
        let check = HeaderCheck::only(MAX_INLINE as u32, &self.served);
        let mut taken = 0;
        let mut committed_in_batch = 0;
        let mut exit = None;
        {
            let mut batch = self.h2k.batch();
            // Dequeue only with a K2H slot reserved (and nothing queued
            // before it), so the reply this message may need has room.
            while taken < BATCH
                && self.outbox.is_empty()
                && self.k2h.has_room()
                && !self.control.is_fenced()
            {
                let handlers = &self.handlers;
                let state = &mut self.state;
                let mut replies = Replies {
                    outbox: &mut self.outbox,
                    outbox_limit: self.outbox_limit,
                    clock: &self.clock,
                    src: self.id,
                    sends: 0,
                    origin: 0,
                };
                let clock = &self.clock;
                let control = &self.control;
                let (last_send, send_gap) = (&mut self.last_send, &mut self.send_gap_ns);
                #[cfg(feature = "fault-injection")]
                let injector = &self.injector;
                let Some(outcome) = batch.try_recv_with(&check, |env| {
                    // Asked once per message (not per empty poll).
                    #[cfg(feature = "fault-injection")]
                    let injection = injector.as_ref().and_then(|i| i.next());
                    // The sender's pace sizes the idle spin (see `Idle`).
                    *send_gap = env.header.hlc.saturating_sub(*last_send);
                    *last_send = env.header.hlc;
                    let stamp = clock.receive(env.header.hlc);
                    // Before anything can fail: the host's hand-back tells
                    // the message that was in a handler from the rest.
                    control.begin_serving(
                        env.header.seq,
                        if env.header.flags.contains(Flags::ASK) {
                            env.header.correlation.to_bits()
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
                            if control.is_fenced() {
                                return Served::Fenced;
                            }
                        }
                        Some(crate::inject::Injection::CorruptReply) => corrupt = true,
                        _ => {}
                    }
                    let Some((_, handler)) = handlers
                        .entries
                        .iter()
                        .find(|(t, _)| *t == env.header.type_id)
                    else {
                        return Served::Fault(
                            FaultCode::UnknownMessageType,
                            u64::from(env.header.type_id),
                        );
                    };
                    let mut answered = false;
                    let header = env.header;
                    replies.origin = header.seq;
                    let staged = replies.outbox.len();
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        handler(
                            state,
                            env.payload,
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
                            Served::Done {
                                seq: header.seq,
                                fault_after: false,
                            }
                        }
                    };
                    if let Served::Fault(..) = outcome {
                        // A failed handler's replies are not published.
                        replies.outbox.truncate(staged);
                    }
                    #[cfg(feature = "fault-injection")]
                    let outcome = match (outcome, injection) {
                        (
                            Served::Done { seq, .. },
                            Some(crate::inject::Injection::FaultAfterReply),
                        ) => Served::Done {
                            seq,
                            fault_after: true,
                        },
                        (Served::Done { seq, fault_after }, _) if corrupt => {
                            corrupt_last_reply(replies.outbox, staged);
                            Served::Done { seq, fault_after }
                        }
                        (o, _) => o,
                    };
                    outcome
                }) else {
                    break;
                };
                taken += 1;
                let served = match outcome {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(actor = ?self.id, error = %e, "invalid envelope in H2K");
                        Served::Fault(FaultCode::BadEnvelope, 0)
                    }
                };
                match served {
                    Served::Done { seq, fault_after } => {
                        // Publish the replies, then commit: a fenced
                        // incarnation publishes nothing, and a committed
                        // message's replies are in K2H before its commit
                        // is visible to the host's fence.
                        if self.control.is_fenced() {
                            self.home.count_fenced(1 + self.outbox.len() as u64);
                            self.outbox.clear();
                            exit = Some(None);
                            break;
                        }
                        flush(&mut self.k2h, &mut self.outbox, &self.poller);
                        if !self.outbox.is_empty() {
                            // More replies than K2H has room for: the
                            // message stays uncommitted (and its H2K slot
                            // unreleased) until they are all published.
                            self.pending = Some((seq, fault_after));
                            break;
                        }
                        match commit::<K>(
                            &mut self.progress,
                            &self.control,
                            &self.home,
                            self.incarnation,
                            &self.state,
                            seq,
                            fault_after,
                        ) {
                            Ok(()) => committed_in_batch += 1,
                            Err(e) => {
                                exit = Some(e);
                                break;
                            }
                        }
                    }
                    Served::Fault(code, detail) => {
                        exit = Some(Some((code, detail)));
                        break;
                    }
                    Served::Fenced => {
                        exit = Some(None);
                        break;
                    }
                    Served::Exit => {
                        batch.release_first(committed_in_batch);
                        return Step::Exit;
                    }
                }
            }
            // The H2K head never passes a message that is not committed:
            // what the host finds there after a fence is exactly what was
            // not processed.
            batch.release_first(committed_in_batch);
        }
        worked += taken;
        if taken > 0 {
            self.space.wake_if_wanted();
        }
        match exit {
            Some(Some((code, detail))) => {
                self.fault(code, detail);
                return Step::Exit;
            }
            Some(None) => {
                self.leave_fenced();
                return Step::Exit;
            }
            None => {}
        }
        if worked > 0 { Step::Worked } else { Step::Idle }
    }

    fn flush_outbox(&mut self) -> usize {
        flush(&mut self.k2h, &mut self.outbox, &self.poller)
    }

    /// Commits the message `seq` (its replies are published); see
    /// [`commit`].
    fn commit(&mut self, seq: u64, fault_after: bool) -> Result<(), Option<(FaultCode, u64)>> {
        commit::<K>(
            &mut self.progress,
            &self.control,
            &self.home,
            self.incarnation,
            &self.state,
            seq,
            fault_after,
        )
    }

    /// Publishes queued replies and, once they are all out, commits and
    /// releases a message that was waiting for them. `Ok(true)`: nothing is
    /// left waiting; `Ok(false)`: K2H is still full; `Err`: the loop ends.
    fn settle(&mut self) -> Result<bool, Step> {
        if self.control.is_fenced() {
            self.home.count_fenced(self.outbox.len() as u64);
            self.outbox.clear();
            self.leave_fenced();
            return Err(Step::Exit);
        }
        self.flush_outbox();
        if !self.outbox.is_empty() {
            return Ok(false);
        }
        let Some((seq, fault_after)) = self.pending.take() else {
            return Ok(true);
        };
        let committed = self.commit(seq, fault_after);
        if let Ok(()) = committed {
            // It is still the oldest slot of H2K: release it now.
            let mut batch = self.h2k.batch();
            let _ = batch.try_pop_with(|_| ());
            batch.release_first(1);
            self.space.wake_if_wanted();
        }
        match committed {
            Ok(()) => Ok(true),
            Err(None) => {
                self.leave_fenced();
                Err(Step::Exit)
            }
            Err(Some((code, detail))) => {
                self.fault(code, detail);
                Err(Step::Exit)
            }
        }
    }
}

/// What the loop has committed.
struct Progress {
    /// `seq` of the last message committed.
    committed: u64,
    /// Messages committed.
    processed: u64,
    /// Checkpoint every this many (0: on request only).
    checkpoint_every: u64,
}

/// Commits the message `seq` (its replies are published). `Err` says how
/// the loop ends: `None` fenced (the commit lost to the host's fence;
/// nothing counts), `Some` an injected fault after the commit.
fn commit<K: Kernel>(
    p: &mut Progress,
    control: &Arc<ControlBlock>,
    home: &HomeCore,
    incarnation: u16,
    state: &K::State,
    seq: u64,
    fault_after: bool,
) -> Result<(), Option<(FaultCode, u64)>> {
    if !control.commit(p.committed, seq) {
        home.count_fenced(1);
        return Err(None);
    }
    p.committed = seq;
    p.processed += 1;
    if (p.checkpoint_every > 0 && p.processed % p.checkpoint_every == 0)
        || home.take_checkpoint_request()
    {
        checkpoint::<K>(home, control, incarnation, p.processed, state);
    }
    // Per message, so a long batch of slow but progressing handlers never
    // looks hung. After the checkpoint: a host that sees this count knows
    // the message's checkpoint decision is made.
    control.record_progress(p.processed, p.processed);
    if fault_after {
        // Committed, its reply published, and then the fault strikes
        // before its H2K slot is released.
        return Err(Some((FaultCode::HandlerFault, INJECTED_DETAIL)));
    }
    Ok(())
}

/// Stores the state in the actor's home (refused there if fenced).
fn checkpoint<K: Kernel>(
    home: &HomeCore,
    control: &Arc<ControlBlock>,
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

/// Moves queued replies into K2H; returns how many.
fn flush(k2h: &mut Producer, outbox: &mut VecDeque<Pending>, poller: &PollerShared) -> usize {
    let mut moved = 0;
    while let Some(p) = outbox.front() {
        if k2h.try_send_bytes(&p.header, &p.bytes[..p.len]).is_err() {
            break;
        }
        outbox.pop_front();
        moved += 1;
    }
    if moved > 0 {
        poller.wake();
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
        outbox.push_back(Pending {
            header: EnvelopeHeader::new(1, Flags::REPLY),
            len: 0,
            bytes: [0; MAX_INLINE],
        });
    }
    if let Some(p) = outbox.back_mut() {
        p.header.magic = 0xBAD0;
    }
}
