//! The cpu backend: each actor slot is served by a device thread running the
//! same device loop a GPU runs, over the same rings and control block, with
//! the kernel's Rust handlers. It is the default backend and the reference
//! the GPU backends must match byte for byte.

use crate::control::{ControlBlock, FaultCode, LifecycleState};
use crate::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use crate::hlc::Hlc;
use crate::id::{ActorId, ClockDomain, CorrelationId};
use crate::kernel::{CpuHandlers, Kernel, MAX_INLINE, ReplySink, SYS_NO_REPLY};
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

/// Replies go straight to K2H while it has room, else to a bounded outbox
/// that the loop drains before it dequeues again.
struct Replies<'a> {
    k2h: &'a mut Producer,
    outbox: &'a mut VecDeque<Pending>,
    outbox_limit: usize,
    clock: &'a Hlc,
    src: ActorId,
    sent: usize,
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
        let pushed =
            self.outbox.is_empty() && self.k2h.try_send_bytes(&header, &payload[..len]).is_ok();
        if pushed {
            self.sent += 1;
        } else if self.outbox.len() >= self.outbox_limit {
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
    state: K::State,
    handlers: CpuHandlers<K>,
    served: Vec<u32>,
    control: Arc<ControlBlock>,
    h2k: Consumer,
    k2h: Producer,
    poller: Arc<PollerShared>,
    space: Arc<SpaceWaker>,
    outbox: VecDeque<Pending>,
    outbox_limit: usize,
    clock: Hlc,
    acked: LifecycleState,
    processed: u64,
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

impl<K: Kernel> DeviceLoop<K> {
    fn new(p: SlotParts<K>) -> Self {
        DeviceLoop {
            id: p.id,
            state: p.state,
            handlers: p.handlers,
            served: p.served,
            control: p.control,
            h2k: p.h2k,
            k2h: p.k2h,
            poller: p.poller,
            space: p.space,
            outbox: VecDeque::with_capacity(p.max_in_flight),
            // Every queued reply answers a distinct ask in flight (at most
            // the waiter slab's capacity), plus the one being served.
            outbox_limit: p.max_in_flight + 1,
            clock: Hlc::new(ClockDomain::unit(
                p.node,
                (p.id.index() as u16).wrapping_add(1),
            )),
            acked: LifecycleState::Created,
            processed: 0,
            last_send: 0,
            send_gap_ns: u64::MAX,
        }
    }

    fn ack(&mut self, state: LifecycleState) {
        if self.acked != state {
            self.acked = state;
            self.control.ack(state, 0);
            self.poller.wake();
        }
    }

    fn fault(&mut self, code: FaultCode, detail: u64) {
        self.acked = LifecycleState::Faulted;
        self.control.report_fault(code, detail, 0);
        self.poller.wake();
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
                self.flush_outbox();
                self.ack(LifecycleState::Terminated);
                return Step::Exit;
            }
            LifecycleState::Created | LifecycleState::Launched => {
                self.ack(LifecycleState::Launched);
                return Step::Idle;
            }
            LifecycleState::Deactivated => {
                self.ack(LifecycleState::Deactivated);
                return if self.flush_outbox() > 0 {
                    Step::Worked
                } else {
                    Step::Idle
                };
            }
            LifecycleState::Active => self.ack(LifecycleState::Active),
        }
        let mut worked = self.flush_outbox();
        if !self.outbox.is_empty() {
            return if worked > 0 { Step::Worked } else { Step::Idle };
        }
        let check = HeaderCheck::only(MAX_INLINE as u32, &self.served);
        let mut taken = 0;
        let mut fault = None;
        {
            let mut batch = self.h2k.batch();
            // Dequeue only with a K2H slot reserved (and nothing queued
            // before it), so the reply this message may need has room.
            while taken < BATCH && self.outbox.is_empty() && self.k2h.has_room() {
                let handlers = &self.handlers;
                let state = &mut self.state;
                let mut replies = Replies {
                    k2h: &mut self.k2h,
                    outbox: &mut self.outbox,
                    outbox_limit: self.outbox_limit,
                    clock: &self.clock,
                    src: self.id,
                    sent: 0,
                };
                let clock = &self.clock;
                let (last_send, send_gap) = (&mut self.last_send, &mut self.send_gap_ns);
                let Some(outcome) = batch.try_recv_with(&check, |env| {
                    // The sender's pace sizes the idle spin (see `Idle`).
                    *send_gap = env.header.hlc.saturating_sub(*last_send);
                    *last_send = env.header.hlc;
                    let stamp = clock.receive(env.header.hlc);
                    let Some((_, handler)) = handlers
                        .entries
                        .iter()
                        .find(|(t, _)| *t == env.header.type_id)
                    else {
                        return Err((FaultCode::UnknownMessageType, u64::from(env.header.type_id)));
                    };
                    let mut answered = false;
                    let header = env.header;
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
                    match result {
                        Err(_) => Err((FaultCode::HandlerPanic, 0)),
                        Ok(Err(e)) => Err((FaultCode::HandlerFault, u64::from(e.0))),
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
                            Ok(())
                        }
                    }
                }) else {
                    break;
                };
                if replies.sent > 0 {
                    // Now, not at the end of the batch: a slow handler later
                    // in the batch must not delay this message's reply.
                    self.poller.wake();
                }
                taken += 1;
                match outcome {
                    Ok(Ok(())) => {
                        self.processed += 1;
                        // Per message, so a long batch of slow but
                        // progressing handlers never looks hung.
                        self.control.record_progress(self.processed, self.processed);
                    }
                    Ok(Err(f)) => {
                        fault = Some(f);
                        break;
                    }
                    Err(e) => {
                        tracing::error!(actor = ?self.id, error = %e, "invalid envelope in H2K");
                        fault = Some((FaultCode::BadEnvelope, 0));
                        break;
                    }
                }
            }
        }
        worked += taken;
        if taken > 0 {
            self.space.wake_if_wanted();
        }
        if let Some((code, detail)) = fault {
            self.fault(code, detail);
            return Step::Exit;
        }
        if worked > 0 { Step::Worked } else { Step::Idle }
    }

    /// Moves queued replies into K2H; returns how many.
    fn flush_outbox(&mut self) -> usize {
        let mut moved = 0;
        while let Some(p) = self.outbox.front() {
            if self
                .k2h
                .try_send_bytes(&p.header, &p.bytes[..p.len])
                .is_err()
            {
                break;
            }
            self.outbox.pop_front();
            moved += 1;
        }
        if moved > 0 {
            self.poller.wake();
        }
        moved
    }
}
