//! The host-driven loop that stands in for a persistent kernel on WebGPU:
//! one thread per device serves every actor slot given to it, over the
//! same protocol objects as the cpu backend — each slot's control block,
//! its H2K ring (read) and K2H ring (written).
//!
//! Per round: every slot's requested state is acknowledged; each active
//! slot's pending H2K envelopes are copied out (as many as K2H has room to
//! answer, at most [`MAX_BATCH`](crate::MAX_BATCH)), checked against its
//! served types; one dispatch per kernel serves all its slots' batches; then
//! per slot, in order: its replies are published to K2H (an ask its handler
//! did not answer gets `NoReply`), the batch is committed with one CAS of
//! the commit word (refused once the host fenced the incarnation: nothing
//! published after that), its H2K slots released, progress recorded, and a
//! fault the handler reported becomes the slot's fault, naming the message
//! that raised it. With nothing to do, the thread parks on every slot's
//! doorbell at once.

use crate::{Program, SLOT_BYTES, SlotCell, WgpuDevice};
use ringkernel::control::{ControlRef, FaultCode, LifecycleState};
use ringkernel::doorbell::Doorbell;
use ringkernel::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use ringkernel::hlc::{PhysicalClock, TscClock};
use ringkernel::id::ActorId;
use ringkernel::kernel::{MAX_INLINE, SYS_NO_REPLY};
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

/// A running dispatch loop.
pub struct DispatchLoop {
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
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let join = std::thread::Builder::new()
            .name("ringkernel-wgpu".into())
            .spawn(move || Runner::new(device, rx, stopping).run())?;
        Ok(DispatchLoop {
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
    /// Messages committed by this incarnation (its heartbeat).
    processed: u64,
    /// `seq` of the last message committed.
    committed: u64,
}

struct Runner {
    device: Arc<WgpuDevice>,
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
}

impl Runner {
    fn new(
        device: Arc<WgpuDevice>,
        incoming: mpsc::Receiver<LoopSlot>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Runner {
            device,
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

    /// One round; returns whether it did anything.
    fn round(&mut self) -> bool {
        let mut worked = false;
        let mut batches = Vec::new();
        let mut leaving = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
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
                match take_batch(s) {
                    Ok(Some((messages, headers))) => batches.push(Batch {
                        slot: i,
                        messages,
                        headers,
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
        // One dispatch per kernel, serving all its slots' batches.
        while !batches.is_empty() {
            let program = self.slots[batches[0].slot].slot.program.clone();
            let (mine, rest): (Vec<Batch>, Vec<Batch>) = batches
                .into_iter()
                .partition(|b| Arc::ptr_eq(&self.slots[b.slot].slot.program, &program));
            batches = rest;
            self.serve(&program, mine, &mut leaving);
        }
        leaving.sort_unstable();
        leaving.dedup();
        for i in leaving.into_iter().rev() {
            self.slots.swap_remove(i);
        }
        worked
    }

    fn serve(&mut self, program: &Program, batches: Vec<Batch>, leaving: &mut Vec<usize>) {
        let mut cells: Vec<SlotCell> = batches
            .iter()
            .map(|b| self.slots[b.slot].slot.cell.clone())
            .collect();
        let inputs: Vec<&[[u8; SLOT_BYTES]]> = batches.iter().map(|b| &b.messages[..]).collect();
        let now = self.clock.now_ns();
        // wgpu panics on some operations of a lost device: a panic is a
        // failed dispatch like any other, not the end of the loop's thread.
        let dispatched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.device.dispatch(program, now, &mut cells, &inputs)
        }))
        .unwrap_or_else(|_| Err(crate::WgpuError::Operation("wgpu panicked".into())));
        let outcomes = match dispatched {
            Ok(o) => o,
            Err(e) => {
                // The device failed the dispatch: no message of it was
                // processed; every slot in it faults (their H2K is intact,
                // so the host hands every message back).
                tracing::error!(error = %e, "wgpu dispatch failed");
                for b in &batches {
                    let s = &self.slots[b.slot];
                    let c = &s.slot.control;
                    c.report_fault(FaultCode::DeviceError, DEVICE_FAILED, c.incarnation());
                    (s.slot.wake_host)();
                    leaving.push(b.slot);
                }
                return;
            }
        };
        for ((b, cell), out) in batches.iter().zip(cells).zip(outcomes) {
            let s = &mut self.slots[b.slot];
            let c = s.slot.control.clone();
            let incarnation = c.incarnation();
            if c.is_fenced() {
                // Fenced during the dispatch: publish nothing.
                c.ack(LifecycleState::Terminated, incarnation);
                leaving.push(b.slot);
                continue;
            }
            let mut hlc = cell.hlc;
            // Replies in message order; an ask with no reply (and not
            // deferred) gets NoReply; replies to deferred asks follow their
            // run's own.
            let mut all_published = true;
            for (h, made) in b.headers[..out.processed].iter().zip(&out.messages) {
                let published = match &made.reply {
                    Some(env) => s.slot.k2h.try_push(env).is_ok(),
                    None if h.flags.contains(Flags::ASK) && !made.deferred => {
                        hlc = hlc.saturating_add(1).max(now & !0xF);
                        let no_reply =
                            EnvelopeHeader::new(SYS_NO_REPLY, Flags::REPLY | Flags::ERROR)
                                .with_src(h.dst)
                                .with_dst(h.src)
                                .with_correlation(h.correlation)
                                .with_stamp(
                                    hlc,
                                    ringkernel::id::ClockDomain::from_bits(cell.domain),
                                );
                        s.slot.k2h.try_send_bytes(&no_reply, &[]).is_ok()
                    }
                    None => true,
                };
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
            let mut cell = cell;
            cell.hlc = hlc;
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
) -> Result<Option<(Vec<[u8; SLOT_BYTES]>, Vec<EnvelopeHeader>)>, (FaultCode, u64)> {
    // Each message may make its reply and `max_later` replies to deferred
    // asks: K2H must have room for all of them.
    let outs = 1 + s.slot.program.kernel().max_later as usize;
    let room = (s.slot.k2h.free_slots() / outs).min(crate::MAX_BATCH);
    if room == 0 {
        return Ok(None);
    }
    let check = HeaderCheck::only(MAX_INLINE as u32, &s.slot.served);
    let mut messages = Vec::new();
    let mut headers = Vec::new();
    let mut bad = None;
    {
        let mut batch = s.slot.h2k.batch();
        while messages.len() < room {
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
        return match bad {
            Some(ringkernel::DecodeError::UnknownType { type_id }) => {
                Err((FaultCode::UnknownMessageType, u64::from(type_id)))
            }
            Some(_) => Err((FaultCode::BadEnvelope, 0)),
            None => Ok(None),
        };
    }
    // A bad envelope after good ones is met again next round, first.
    Ok(Some((messages, headers)))
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
