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

use crate::{Program, SLOT_BYTES, SlotCell, WgpuDevice, WgpuError};
use ringkernel::control::{ControlRef, FaultCode, LifecycleState};
use ringkernel::doorbell::Doorbell;
use ringkernel::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use ringkernel::hlc::{PhysicalClock, TscClock};
use ringkernel::id::ActorId;
use ringkernel::kernel::MAX_INLINE;
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

/// How long the loop spins, idle, before it parks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

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
    /// Messages taken into dispatches in flight (still in H2K, first).
    in_flight: usize,
    /// K2H slots reserved for them.
    in_flight_outs: usize,
    /// Messages committed by this incarnation (its heartbeat).
    processed: u64,
    /// `seq` of the last message committed.
    committed: u64,
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
                    in_flight: 0,
                    in_flight_outs: 0,
                    processed: 0,
                    committed: 0,
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
                    || (s.acked == LifecycleState::Active && !s.slot.h2k.observer().is_empty())
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
        park_all(&doorbells, &has_work, &|| {
            std::thread::park_timeout(std::time::Duration::from_millis(50))
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
                match take_batch(s, self.pipelined) {
                    Ok(Some((messages, headers, outs))) => batches.push(Batch {
                        slot: i,
                        messages,
                        headers,
                        outs,
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
            s.in_flight = 0;
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
                    s.in_flight += b.messages.len();
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
            s.in_flight -= b.messages.len();
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
            // sends follow their run's own.
            let mut all_published = true;
            for made in &out.messages {
                let published = made
                    .reply
                    .as_ref()
                    .is_none_or(|env| s.slot.k2h.try_push(env).is_ok());
                let later = made
                    .later
                    .iter()
                    .all(|env| s.slot.k2h.try_push(env).is_ok());
                all_published &= published && later;
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
                let last = b.headers[committed_now - 1].seq;
                if !c.commit(s.committed, last) {
                    c.ack(LifecycleState::Terminated, incarnation);
                    leaving.push(b.slot);
                    continue;
                }
                s.committed = last;
                s.slot.h2k.release_next(committed_now);
                (s.slot.wake_senders)();
                s.processed += committed_now as u64;
                c.record_progress(s.processed, s.processed);
            }
            let fault = cell.fault;
            s.slot.cell = cell;
            if fault != 0 {
                // The message after the last committed one raised it.
                let poison = &b.headers[committed_now];
                c.begin_serving(
                    poison.seq,
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

/// Copies out what the slot may serve now: its pending H2K envelopes, as
/// many as K2H has room to answer. `Err`: a fault (code, detail).
#[allow(clippy::type_complexity)]
fn take_batch(
    s: &mut Served,
    pipelined: bool,
) -> Result<Option<(Vec<[u8; SLOT_BYTES]>, Vec<EnvelopeHeader>, usize)>, (FaultCode, u64)> {
    // Each message may make its reply (an ask) and `max_later` replies to
    // deferred asks or sends: K2H must have room for all of them, and for
    // those of the messages in flight, which (first in H2K) are skipped.
    let later = s.slot.program.kernel().max_later as usize;
    let mut free = s.slot.k2h.free_slots().saturating_sub(s.in_flight_outs);
    let mut reserved = 0;
    let skip = s.in_flight;
    // Pipelined, at most half the ring per dispatch, so that under load the
    // next batch is there to take while this one is in flight.
    let ring = s.slot.h2k.capacity();
    let most = if pipelined { ring / 2 } else { ring }.clamp(1, crate::MAX_BATCH);
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
                    let need = usize::from(h.flags.contains(Flags::ASK)) + later;
                    if need > free {
                        break;
                    }
                    free -= need;
                    reserved += need;
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
        if skip > 0 {
            // A bad envelope after messages in flight: met again once they
            // have completed (a fault must not overtake their commit).
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
    Ok(Some((messages, headers, reserved)))
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
