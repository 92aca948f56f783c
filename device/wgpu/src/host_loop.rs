//! The host-driven loop that stands in for a persistent kernel on WebGPU:
//! one thread per device serves every actor slot given to it, over the
//! same protocol objects as the cpu backend — each slot's control block,
//! its H2K ring (read) and K2H ring (written).
//!
//! Per round: every slot's requested state is acknowledged; each active
//! slot's pending H2K envelopes are copied out (as many as K2H has room to
//! answer, at most [`MAX_BATCH`](crate::MAX_BATCH), after those already in
//! flight), checked against its served types; one dispatch per kernel
//! serves all its slots' batches and is submitted *before* the dispatches
//! of the previous round are completed — so under load two dispatches are
//! in flight, the newer taking each slot's cell from the older on the
//! device. Completing a dispatch, per slot in order: its replies are
//! published to K2H (the shader answers an ask its handler did not with
//! `NoReply`), the batch is committed with one CAS of the commit word
//! (refused once the host fenced the incarnation: nothing published after
//! that), its H2K slots released, progress recorded, and a fault the
//! handler reported becomes the slot's fault, naming the message that
//! raised it. A state change, a fence or a departure first completes what
//! is in flight. With nothing to do, the thread parks on every slot's
//! doorbell at once.
//!
//! K2K links are host-mediated (see [`LinkPort`]): a slot's batch comes
//! from H2K or from one link into it, in turns, and a link batch commits
//! message by message on the link's commit word (routed sends made serving
//! it carry its origin); a completed run's sends to a linked actor join the
//! link after the run's message commits. A slot whose waiting link's outbox
//! is full takes nothing new, and beats its heartbeat while it waits (held
//! per batch, an outbox may pass its capacity by one batch's sends).
//! Outboxes are flushed every round, whatever the slot's state.

use crate::{Program, SLOT_BYTES, SlotCell, WgpuDevice, WgpuError};
use ringkernel::control::{ControlRef, FaultCode, LifecycleState};
use ringkernel::doorbell::Doorbell;
use ringkernel::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use ringkernel::hlc::{PhysicalClock, TscClock};
use ringkernel::id::ActorId;
use ringkernel::kernel::MAX_INLINE;
use ringkernel::link::{InboundLink, LinkId, LinkPort, StagedSends};
use ringkernel::ring::{Consumer, Producer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};

/// The fault detail of a dispatch the device failed (its message).
pub const DEVICE_FAILED: u64 = 0xD15_0000;

/// The fault detail of replies that did not fit the K2H room reserved for
/// them (a bug of the loop, reported rather than lost).
pub const K2H_OVERRUN: u64 = 0xD15_0001;

/// The fault detail of a commit refused while the incarnation was not
/// fenced (a bug of the loop, reported rather than left hanging).
pub const COMMIT_REFUSED: u64 = 0xD15_0002;

/// How long the loop spins, idle, before it parks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// How long the loop sleeps while committed K2K sends wait in an outbox
/// for room in their ring (a receiver does not wake its senders).
const OUTBOX_RETRY: std::time::Duration = std::time::Duration::from_micros(200);

/// One actor slot, handed to the loop: its protocol ends and its kernel.
pub struct LoopSlot {
    /// The actor.
    pub id: ActorId,
    /// Its control block (the loop acknowledges, commits, reports).
    pub control: ControlRef,
    /// The H2K ring's consumer end.
    pub h2k: Consumer,
    /// The K2H ring's producer end.
    pub k2h: Producer,
    /// Message types it serves (sorted).
    pub served: Vec<u32>,
    /// Its state, HLC and clock domain.
    pub cell: SlotCell,
    /// Its kernel, compiled for this loop's device.
    pub program: Arc<Program>,
    /// Wakes whoever drains K2H (the runtime's poller).
    pub wake_host: Box<dyn Fn() + Send>,
    /// Wakes senders waiting for H2K room.
    pub wake_senders: Box<dyn Fn() + Send>,
    /// Its K2K links (host-mediated: the loop moves their messages between
    /// dispatches); `None` for a slot outside a runtime.
    pub links: Option<LinkPort>,
}

/// What a dispatch loop has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Dispatches submitted.
    pub dispatches: u64,
    /// Of those, submitted while another was in flight.
    pub overlapped: u64,
}

#[derive(Default)]
struct Counters {
    dispatches: std::sync::atomic::AtomicU64,
    overlapped: std::sync::atomic::AtomicU64,
}

/// A running dispatch loop.
pub struct DispatchLoop {
    counters: Arc<Counters>,
    incoming: Mutex<mpsc::Sender<LoopSlot>>,
    stop: Arc<AtomicBool>,
    thread: Thread,
    join: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DispatchLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchLoop")
            .field("thread", &self.thread.name())
            .finish_non_exhaustive()
    }
}

impl DispatchLoop {
    /// Starts the loop's thread on `device`.
    ///
    /// # Errors
    /// The thread could not start.
    pub fn start(device: Arc<WgpuDevice>) -> std::io::Result<Self> {
        Self::start_with(device, 2)
    }

    /// Starts the loop with at most `in_flight` dispatches in flight (1 or
    /// 2; anything else is 2).
    ///
    /// # Errors
    /// The thread could not start.
    pub fn start_with(device: Arc<WgpuDevice>, in_flight: usize) -> std::io::Result<Self> {
        let pipelined = in_flight != 1;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let counters = Arc::new(Counters::default());
        let counting = counters.clone();
        let join = std::thread::Builder::new()
            .name("ringkernel-wgpu".into())
            .spawn(move || Runner::new(device, rx, stopping, counting, pipelined).run())?;
        Ok(DispatchLoop {
            counters,
            incoming: Mutex::new(tx),
            stop,
            thread: join.thread().clone(),
            join: Some(join),
        })
    }

    /// Hands a slot to the loop.
    pub fn add(&self, slot: LoopSlot) {
        if let Ok(tx) = self.incoming.lock() {
            let _ = tx.send(slot);
        }
        self.thread.unpark();
    }

    /// Dispatches so far, and how many overlapped another.
    pub fn stats(&self) -> DispatchStats {
        DispatchStats {
            dispatches: self.counters.dispatches.load(Ordering::Relaxed),
            overlapped: self.counters.overlapped.load(Ordering::Relaxed),
        }
    }

    /// The loop's thread: what a slot's doorbell wakes.
    pub fn thread(&self) -> &Thread {
        &self.thread
    }
}

impl Drop for DispatchLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread.unpark();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct Served {
    slot: LoopSlot,
    acked: LifecycleState,
    /// H2K messages taken into dispatches in flight (still in H2K, first).
    h2k_in_flight: usize,
    /// Link messages taken into dispatches in flight, per link (still in
    /// the link's ring, first).
    link_in_flight: Vec<(LinkId, usize)>,
    /// K2H slots reserved for what is in flight.
    in_flight_outs: usize,
    /// Messages committed by this incarnation.
    processed: u64,
    /// Its heartbeat: per commit, and per round held by a full K2K link.
    beats: u64,
    /// `seq` of the last H2K message committed.
    committed: u64,
    /// Whether the next batch looks at the links before H2K (they take
    /// turns, so neither starves the other).
    links_first: bool,
}

impl Served {
    /// Counts `n` messages of link `id` into (or, negative, out of) flight.
    fn add_link_in_flight(&mut self, id: LinkId, n: isize) {
        match self.link_in_flight.iter().position(|(l, _)| *l == id) {
            Some(i) => {
                let left = self.link_in_flight[i].1.saturating_add_signed(n);
                if left == 0 {
                    self.link_in_flight.swap_remove(i);
                } else {
                    self.link_in_flight[i].1 = left;
                }
            }
            None if n > 0 => self.link_in_flight.push((id, n as usize)),
            None => {}
        }
    }
}

/// A dispatch in flight, and what the host needs to complete it.
struct Flight {
    program: Arc<Program>,
    pending: crate::Pending,
    batches: Vec<Batch>,
    cells: Vec<SlotCell>,
}

struct Runner {
    device: Arc<WgpuDevice>,
    /// Two dispatches in flight (else one at a time).
    pipelined: bool,
    flights: Vec<Flight>,
    counters: Arc<Counters>,
    incoming: mpsc::Receiver<LoopSlot>,
    stop: Arc<AtomicBool>,
    slots: Vec<Served>,
    clock: TscClock,
}

/// What one slot brings to a round.
struct Batch {
    slot: usize,
    messages: Vec<[u8; SLOT_BYTES]>,
    headers: Vec<EnvelopeHeader>,
    /// K2H slots reserved for what its messages may make.
    outs: usize,
    /// Where its messages came from.
    source: Source,
}

/// Where a batch's messages came from: H2K, or a K2K link (and the
/// position of the first there). A batch never mixes them: each source
/// commits on its own word.
enum Source {
    H2k,
    Link(InboundLink, u64),
}

impl Runner {
    fn new(
        device: Arc<WgpuDevice>,
        incoming: mpsc::Receiver<LoopSlot>,
        stop: Arc<AtomicBool>,
        counters: Arc<Counters>,
        pipelined: bool,
    ) -> Self {
        Runner {
            device,
            pipelined,
            flights: Vec::new(),
            counters,
            incoming,
            stop,
            slots: Vec::new(),
            clock: TscClock::new(),
        }
    }

    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            while let Ok(slot) = self.incoming.try_recv() {
                slot.control
                    .ack(LifecycleState::Launched, slot.control.incarnation());
                (slot.wake_host)();
                self.slots.push(Served {
                    slot,
                    acked: LifecycleState::Launched,
                    h2k_in_flight: 0,
                    link_in_flight: Vec::new(),
                    in_flight_outs: 0,
                    processed: 0,
                    beats: 0,
                    committed: 0,
                    links_first: false,
                });
            }
            if !self.round() && !self.spin() {
                self.park();
            }
        }
    }

    /// Whether any slot has something to do (acquire loads throughout).
    fn has_work(slots: &[Served], stop: &AtomicBool) -> bool {
        stop.load(Ordering::Acquire)
            || slots.iter().any(|s| {
                let c = &s.slot.control;
                c.is_fenced()
                    || c.requested_state() != Ok(s.acked)
                    || (s.acked == LifecycleState::Active
                        && !s.slot.links.as_ref().is_some_and(LinkPort::blocked)
                        && (!s.slot.h2k.observer().is_empty()
                            || s.slot.links.as_ref().is_some_and(LinkPort::has_work)))
            })
    }

    /// Spins a while for work before parking: a caller asking one at a
    /// time sends its next ask soon after its reply, and catching it awake
    /// saves a wake-up. Returns whether work came.
    fn spin(&self) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < SPIN {
            if Self::has_work(&self.slots, &self.stop) {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Parks on every slot's doorbell at once: each is marked parked and
    /// fenced before the one re-check of all of them.
    fn park(&mut self) {
        let doorbells: Vec<&Doorbell> = self
            .slots
            .iter()
            .map(|s| s.slot.control.doorbell())
            .collect();
        let slots = &self.slots;
        let stop = &self.stop;
        let has_work = || Self::has_work(slots, stop);
        let outbox_waiting = slots
            .iter()
            .any(|s| s.slot.links.as_ref().is_some_and(|l| l.outbox_waiting()));
        let timeout = if outbox_waiting {
            OUTBOX_RETRY
        } else {
            std::time::Duration::from_millis(50)
        };
        park_all(&doorbells, &has_work, &|| {
            std::thread::park_timeout(timeout)
        });
    }

    /// Whether the slot's state is changing (a fence, a request not yet
    /// acknowledged): what is in flight completes first.
    fn changing(s: &Served) -> bool {
        let c = &s.slot.control;
        c.is_fenced()
            || c.requested_state().map(|r| match r {
                LifecycleState::Created => LifecycleState::Launched,
                other => other,
            }) != Ok(s.acked)
    }

    /// One round; returns whether it did anything. New batches are
    /// submitted before the dispatches in flight are completed, so the
    /// device runs the new ones while the host publishes the old: a slot
    /// with a backlog has two dispatches in flight, the second chained on
    /// the first's cell on the device.
    fn round(&mut self) -> bool {
        let mut worked = false;
        let mut leaving = Vec::new();
        // Acknowledgements and departures never race a dispatch; one at a
        // time, what is in flight completes before anything is taken.
        if !self.flights.is_empty() && (!self.pipelined || self.slots.iter().any(Self::changing)) {
            self.complete_all(&mut leaving);
            worked = true;
        }
        let mut batches = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if leaving.contains(&i) {
                continue;
            }
            let c = s.slot.control.clone();
            let incarnation = c.incarnation();
            if c.is_fenced() {
                c.ack(LifecycleState::Terminated, incarnation);
                leaving.push(i);
                worked = true;
                continue;
            }
            // Committed K2K sends move on whatever the state (a deactivated
            // or departing sender still delivers what it committed).
            let blocked = match s.slot.links.as_mut() {
                Some(links) => {
                    links.refresh();
                    worked |= links.flush() > 0;
                    links.blocked()
                }
                None => false,
            };
            let requested = match c.requested_state() {
                Ok(r) => r,
                Err(_) => {
                    c.report_fault(FaultCode::BadEnvelope, u64::MAX, incarnation);
                    leaving.push(i);
                    continue;
                }
            };
            let next = match requested {
                LifecycleState::Terminated | LifecycleState::Faulted => {
                    c.ack(LifecycleState::Terminated, incarnation);
                    (s.slot.wake_host)();
                    leaving.push(i);
                    worked = true;
                    continue;
                }
                LifecycleState::Created => LifecycleState::Launched,
                other => other,
            };
            if next != s.acked {
                s.acked = next;
                c.ack(next, incarnation);
                (s.slot.wake_host)();
                worked = true;
            }
            if next == LifecycleState::Active {
                if blocked {
                    // Waiting for a receiver to take what this one sent is
                    // backpressure, not a hang: the watchdog sees a
                    // heartbeat.
                    s.beats += 1;
                    c.record_progress(s.beats, s.processed);
                    continue;
                }
                let taken = take_batch(s, self.pipelined);
                if let Some(refused) = s.slot.links.as_mut().map(LinkPort::take_refused)
                    && refused > 0
                {
                    // Committed and reported by the port, as processed.
                    s.processed += refused;
                    s.beats += refused;
                    c.record_progress(s.beats, s.processed);
                }
                match taken {
                    Ok(Some(taken)) => batches.push(Batch {
                        slot: i,
                        messages: taken.messages,
                        headers: taken.headers,
                        outs: taken.outs,
                        source: taken.source,
                    }),
                    Ok(None) => {}
                    Err(code) => {
                        c.report_fault(code.0, code.1, incarnation);
                        (s.slot.wake_host)();
                        leaving.push(i);
                    }
                }
            }
        }
        worked |= !batches.is_empty();
        // One dispatch per kernel, serving all its slots' batches, chained
        // on the dispatches in flight; then those complete.
        let old = std::mem::take(&mut self.flights);
        while !batches.is_empty() {
            let program = self.slots[batches[0].slot].slot.program.clone();
            let (mine, rest): (Vec<Batch>, Vec<Batch>) = batches
                .into_iter()
                .partition(|b| Arc::ptr_eq(&self.slots[b.slot].slot.program, &program));
            batches = rest;
            if let Some(f) = self.submit(program, mine, &old, &mut leaving) {
                self.flights.push(f);
            }
        }
        for f in old {
            self.complete(f, &mut leaving);
        }
        if !leaving.is_empty() {
            // Indices stay valid while dispatches are in flight: drain first.
            self.complete_all(&mut leaving);
            leaving.sort_unstable();
            leaving.dedup();
            for i in leaving.into_iter().rev() {
                self.slots.swap_remove(i);
            }
        }
        worked
    }

    fn complete_all(&mut self, leaving: &mut Vec<usize>) {
        for f in std::mem::take(&mut self.flights) {
            self.complete(f, leaving);
        }
    }

    /// Faults every slot of a dispatch the device failed: none of its
    /// messages was processed (their H2K slots are intact, so the host
    /// hands every one back).
    fn failed(&mut self, batches: &[Batch], e: &WgpuError, leaving: &mut Vec<usize>) {
        tracing::error!(error = %e, "wgpu dispatch failed");
        for b in batches {
            if leaving.contains(&b.slot) {
                continue;
            }
            let s = &mut self.slots[b.slot];
            s.h2k_in_flight = 0;
            s.link_in_flight.clear();
            s.in_flight_outs = 0;
            let c = &s.slot.control;
            c.report_fault(FaultCode::DeviceError, DEVICE_FAILED, c.incarnation());
            (s.slot.wake_host)();
            leaving.push(b.slot);
        }
    }

    fn submit(
        &mut self,
        program: Arc<Program>,
        batches: Vec<Batch>,
        in_flight: &[Flight],
        leaving: &mut Vec<usize>,
    ) -> Option<Flight> {
        let cells: Vec<SlotCell> = batches
            .iter()
            .map(|b| self.slots[b.slot].slot.cell.clone())
            .collect();
        // A slot in a dispatch in flight takes its cell from that one.
        let chain: Vec<Option<(&crate::Pending, usize)>> = batches
            .iter()
            .map(|b| {
                in_flight
                    .iter()
                    .filter(|f| Arc::ptr_eq(&f.program, &program))
                    .find_map(|f| {
                        let j = f.batches.iter().position(|x| x.slot == b.slot)?;
                        Some((&f.pending, j))
                    })
            })
            .collect();
        let inputs: Vec<&[[u8; SLOT_BYTES]]> = batches.iter().map(|b| &b.messages[..]).collect();
        let now = self.clock.now_ns();
        // wgpu panics on some operations of a lost device: a panic is a
        // failed dispatch like any other, not the end of the loop's thread.
        let submitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.device.submit(&program, now, &cells, &inputs, &chain)
        }))
        .unwrap_or_else(|_| Err(WgpuError::Operation("wgpu panicked".into())));
        match submitted {
            Ok(pending) => {
                self.counters.dispatches.fetch_add(1, Ordering::Relaxed);
                if !in_flight.is_empty() {
                    self.counters.overlapped.fetch_add(1, Ordering::Relaxed);
                }
                for b in &batches {
                    let s = &mut self.slots[b.slot];
                    match &b.source {
                        Source::H2k => s.h2k_in_flight += b.messages.len(),
                        Source::Link(l, _) => {
                            s.add_link_in_flight(l.id(), b.messages.len() as isize)
                        }
                    }
                    s.in_flight_outs += b.outs;
                }
                Some(Flight {
                    program,
                    pending,
                    batches,
                    cells,
                })
            }
            Err(e) => {
                self.failed(&batches, &e, leaving);
                None
            }
        }
    }

    fn complete(&mut self, flight: Flight, leaving: &mut Vec<usize>) {
        let Flight {
            pending,
            batches,
            mut cells,
            ..
        } = flight;
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.device.wait(pending, &mut cells)
        }))
        .unwrap_or_else(|_| Err(WgpuError::Operation("wgpu panicked".into())));
        let outcomes = match waited {
            Ok(o) => o,
            Err(e) => {
                self.failed(&batches, &e, leaving);
                return;
            }
        };
        for ((b, cell), out) in batches.iter().zip(cells).zip(outcomes) {
            if leaving.contains(&b.slot) {
                // It left after an earlier dispatch (a fault): this one's
                // messages stay in H2K, for the host to hand back.
                continue;
            }
            let s = &mut self.slots[b.slot];
            match &b.source {
                Source::H2k => s.h2k_in_flight -= b.messages.len(),
                Source::Link(l, _) => s.add_link_in_flight(l.id(), -(b.messages.len() as isize)),
            }
            s.in_flight_outs -= b.outs;
            let c = s.slot.control.clone();
            let incarnation = c.incarnation();
            if c.is_fenced() {
                // Fenced during the dispatch: publish nothing.
                c.ack(LifecycleState::Terminated, incarnation);
                leaving.push(b.slot);
                continue;
            }
            // Replies in message order (the shader answers an ask its
            // handler did not with NoReply); replies to deferred asks and
            // sends follow their run's own. Sends to linked actors are
            // staged for their links; routed sends made serving a link
            // message carry its origin (the poller holds them until the
            // link's commit passes it).
            // One list for the batch (a link's room counts what earlier
            // messages staged), cut per message where a link batch commits
            // message by message.
            let mut sends = StagedSends::default();
            let mut marks = Vec::with_capacity(out.messages.len());
            let mut all_published = true;
            for (j, made) in out.messages.iter().enumerate() {
                let published = made
                    .reply
                    .as_ref()
                    .is_none_or(|env| s.slot.k2h.try_push(env).is_ok());
                let mut later = true;
                for env in &made.later {
                    let origin = match &b.source {
                        Source::H2k => None,
                        Source::Link(l, first) => Some(l.origin(first + j as u64)),
                    };
                    later &= match route_send(env, origin, s.slot.links.as_ref(), &mut sends) {
                        Routed::Staged => true,
                        Routed::K2h(env) => s.slot.k2h.try_push(&env).is_ok(),
                        Routed::AsIs => s.slot.k2h.try_push(env).is_ok(),
                    };
                }
                all_published &= published && later;
                marks.push(sends.len());
            }
            if !all_published {
                // Room was reserved before the batch was taken: a reply that
                // did not fit is a bug here, reported as a device fault so
                // every caller resolves.
                c.report_fault(FaultCode::DeviceError, K2H_OVERRUN, incarnation);
                (s.slot.wake_host)();
                leaving.push(b.slot);
                continue;
            }
            let committed_now = out.processed;
            if committed_now > 0 {
                let ok = match &b.source {
                    Source::H2k => {
                        // One commit for the batch; its K2K sends join their
                        // links after it, in message order.
                        let last = b.headers[committed_now - 1].seq;
                        let prev = s.committed;
                        let ok = match s.slot.links.as_mut() {
                            Some(links) => links.commit_with(&mut sends, || c.commit(prev, last)),
                            None => c.commit(prev, last),
                        };
                        if ok {
                            s.committed = last;
                            s.slot.h2k.release_next(committed_now);
                            (s.slot.wake_senders)();
                        }
                        ok
                    }
                    Source::Link(l, first) => {
                        // A link's word commits one message at a time, each
                        // message's sends joining their links after it.
                        let links = s.slot.links.as_mut().expect("a link batch has its port");
                        let epoch = s.slot.id.incarnation();
                        let mut ok = true;
                        let mut taken = 0;
                        for (j, &mark) in marks.iter().enumerate() {
                            let mut mine = sends.split_front(mark - taken);
                            taken = mark;
                            if !links.commit_with(&mut mine, || l.commit(epoch, first + j as u64)) {
                                ok = false;
                                break;
                            }
                        }
                        if !ok {
                            // The rest will never commit either.
                            links.drop_fenced(&mut sends);
                        }
                        l.release_committed();
                        ok
                    }
                };
                if !ok {
                    if c.is_fenced() {
                        // The host fenced the incarnation: it hands back
                        // what was not committed.
                        c.ack(LifecycleState::Terminated, incarnation);
                    } else {
                        // Refused without a fence: a bug here, reported as
                        // a fault so nothing waits on a loop that left.
                        c.report_fault(FaultCode::DeviceError, COMMIT_REFUSED, incarnation);
                        (s.slot.wake_host)();
                    }
                    leaving.push(b.slot);
                    continue;
                }
                s.processed += committed_now as u64;
                s.beats += committed_now as u64;
                c.record_progress(s.beats, s.processed);
            }
            let fault = cell.fault;
            s.slot.cell = cell;
            if fault != 0 {
                // The message after the last committed one raised it.
                let poison = &b.headers[committed_now];
                let serving = match &b.source {
                    Source::H2k => poison.seq,
                    Source::Link(l, first) => l.origin(first + committed_now as u64),
                };
                c.begin_serving(
                    serving,
                    if poison.flags.contains(Flags::ASK) {
                        poison.correlation.to_bits()
                    } else {
                        0
                    },
                );
                if fault == crate::RK_PANIC {
                    c.report_fault(FaultCode::HandlerPanic, 0, incarnation);
                } else if fault == crate::RK_REPLY_TOO_LARGE {
                    c.report_fault(FaultCode::HandlerFault, crate::REPLY_TOO_LARGE, incarnation);
                } else {
                    c.report_fault(
                        FaultCode::HandlerFault,
                        u64::from(fault.saturating_sub(crate::RK_FAULT)),
                        incarnation,
                    );
                }
                leaving.push(b.slot);
            }
            (s.slot.wake_host)();
        }
    }
}

/// How a completed run's later envelope leaves.
enum Routed {
    /// Staged for its K2K link (it joins the link once its message commits).
    Staged,
    /// Into K2H, rewritten (its origin, or marked undelivered).
    K2h([u8; SLOT_BYTES]),
    /// Into K2H as the shader made it.
    AsIs,
}

/// Routes one envelope a run made after its reply: a reply to a deferred
/// ask goes to K2H as is; a send goes to its link if the slot has one to its
/// destination, else to K2H (with `origin` as its `seq` if given).
fn route_send(
    env: &[u8; SLOT_BYTES],
    origin: Option<u64>,
    links: Option<&LinkPort>,
    sends: &mut StagedSends,
) -> Routed {
    if origin.is_none() && links.is_none_or(|l| !l.has_outbound()) {
        return Routed::AsIs;
    }
    let check = HeaderCheck::any_type(MAX_INLINE as u32);
    let Ok(envelope) = ringkernel::envelope::Envelope::decode(env, &check) else {
        // Malformed: the poller finds it so and faults the slot.
        return Routed::AsIs;
    };
    let mut header = envelope.header;
    if header.flags.contains(Flags::REPLY) {
        return Routed::AsIs;
    }
    if let Some(links) = links {
        match links.stage(header, envelope.payload, sends) {
            None => return Routed::Staged,
            Some(h) => header = h,
        }
    }
    if let Some(origin) = origin {
        header.seq = origin;
    }
    let mut out = *env;
    match header.encode_into(&mut out) {
        Ok(()) => Routed::K2h(out),
        Err(_) => Routed::AsIs,
    }
}

/// K2H room for a batch: each message may make its reply (an ask) and
/// `max_later` replies to deferred asks or sends.
struct Room {
    free: usize,
    reserved: usize,
    later: usize,
}

impl Room {
    /// Reserves room for one message; `false` if there is none.
    fn take(&mut self, ask: bool) -> bool {
        let need = usize::from(ask) + self.later;
        if need > self.free {
            return false;
        }
        self.free -= need;
        self.reserved += need;
        true
    }
}

/// A batch taken from one source.
struct Taken {
    messages: Vec<[u8; SLOT_BYTES]>,
    headers: Vec<EnvelopeHeader>,
    outs: usize,
    source: Source,
}

/// Copies out what the slot may serve now — its pending H2K envelopes or
/// those of one K2K link into it, taking turns — as many as K2H has room
/// to answer. `Err`: a fault (code, detail).
fn take_batch(s: &mut Served, pipelined: bool) -> Result<Option<Taken>, (FaultCode, u64)> {
    // K2H must have room for all a message may make, and for what the
    // messages in flight may.
    let mut room = Room {
        free: s.slot.k2h.free_slots().saturating_sub(s.in_flight_outs),
        reserved: 0,
        later: s.slot.program.kernel().max_later as usize,
    };
    // Pipelined, at most half the ring per dispatch, so that under load the
    // next batch is there to take while this one is in flight.
    let ring = s.slot.h2k.capacity();
    let most = if pipelined { ring / 2 } else { ring }.clamp(1, crate::MAX_BATCH);
    let links_first = s.links_first;
    let mut taken = None;
    for from_links in [links_first, !links_first] {
        taken = if from_links {
            take_link(s, &mut room, most)?
        } else {
            take_h2k(s, &mut room, most)?
        };
        if taken.is_some() {
            s.links_first = !from_links;
            break;
        }
    }
    Ok(taken.map(|(messages, headers, source)| Taken {
        messages,
        headers,
        outs: room.reserved,
        source,
    }))
}

type Messages = (Vec<[u8; SLOT_BYTES]>, Vec<EnvelopeHeader>, Source);

/// Copies out pending H2K envelopes, after those in flight.
fn take_h2k(
    s: &mut Served,
    room: &mut Room,
    most: usize,
) -> Result<Option<Messages>, (FaultCode, u64)> {
    let skip = s.h2k_in_flight;
    let check = HeaderCheck::only(MAX_INLINE as u32, &s.slot.served);
    let mut messages = Vec::new();
    let mut headers = Vec::new();
    let mut bad = None;
    {
        let mut batch = s.slot.h2k.batch();
        for _ in 0..skip {
            if batch.try_pop_with(|_| ()).is_none() {
                break;
            }
        }
        while messages.len() < most {
            let got = batch.try_pop_with(|bytes| {
                let mut slot = [0u8; SLOT_BYTES];
                let n = bytes.len().min(SLOT_BYTES);
                slot[..n].copy_from_slice(&bytes[..n]);
                (
                    slot,
                    ringkernel::envelope::Envelope::decode(bytes, &check).map(|e| e.header),
                )
            });
            match got {
                Some((slot, Ok(h))) => {
                    if !room.take(h.flags.contains(Flags::ASK)) {
                        break;
                    }
                    messages.push(slot);
                    headers.push(h);
                }
                Some((_, Err(e))) => {
                    bad = Some(e);
                    break;
                }
                None => break,
            }
        }
        batch.release_first(0);
    }
    if messages.is_empty() {
        if skip > 0 || !s.link_in_flight.is_empty() {
            // A bad envelope after messages in flight (from any source):
            // met again once they have completed (a fault must not overtake
            // their commit).
            return Ok(None);
        }
        return match bad {
            Some(ringkernel::DecodeError::UnknownType { type_id }) => {
                Err((FaultCode::UnknownMessageType, u64::from(type_id)))
            }
            Some(_) => Err((FaultCode::BadEnvelope, 0)),
            None => Ok(None),
        };
    }
    // A bad envelope after good ones is met again next round, first.
    Ok(Some((messages, headers, Source::H2k)))
}

/// Copies out the messages waiting in one K2K link into the slot, after
/// those in flight, each addressed to this incarnation.
fn take_link(
    s: &mut Served,
    room: &mut Room,
    most: usize,
) -> Result<Option<Messages>, (FaultCode, u64)> {
    let id = s.slot.id;
    let Served {
        slot,
        link_in_flight,
        h2k_in_flight,
        ..
    } = s;
    let nothing_in_flight = *h2k_in_flight == 0 && link_in_flight.is_empty();
    let Some(links) = slot.links.as_mut() else {
        return Ok(None);
    };
    let in_flight = |l: LinkId| {
        link_in_flight
            .iter()
            .find(|(x, _)| *x == l)
            .map_or(0, |(_, n)| *n)
    };
    let mut messages = Vec::new();
    let mut headers = Vec::new();
    let taken = links.take(most, in_flight, |h, payload| {
        if !room.take(h.flags.contains(Flags::ASK)) {
            return false;
        }
        // The link delivers to whichever incarnation serves it.
        let h = EnvelopeHeader { dst: id, ..*h };
        let mut slot = [0u8; SLOT_BYTES];
        match ringkernel::envelope::encode_bytes(&mut slot, &h, payload) {
            Ok(h) => {
                messages.push(slot);
                headers.push(h);
                true
            }
            Err(_) => false,
        }
    });
    match taken {
        None => Ok(None),
        Some(b) if b.count == 0 => {
            // A fault waits for everything in flight to commit first.
            if b.bad.is_some() && nothing_in_flight {
                Err((FaultCode::BadEnvelope, 1))
            } else {
                Ok(None)
            }
        }
        Some(b) => Ok(Some((messages, headers, Source::Link(b.link, b.first)))),
    }
}

/// Marks every doorbell parked (each with its fence), re-checks once, and
/// sleeps only if nothing has work.
fn park_all(doorbells: &[&Doorbell], has_work: &dyn Fn() -> bool, sleep: &dyn Fn()) {
    match doorbells.split_first() {
        None => {
            if !has_work() {
                sleep();
            }
        }
        Some((d, rest)) => {
            d.park(|| false, || park_all(rest, has_work, sleep));
        }
    }
}
