//! Fault drills (feature `fault-injection`): the kernel, the bookkeeping and
//! the checks that every adapter's drill shares.
//!
//! A drill sends sequence-numbered messages from several senders to one GPU
//! actor of the [`DrillKernel`] while a [`FaultInjector`]
//! makes its device loop fail at random points, and the adapter's supervisor
//! restarts it as new incarnations. The [`Ledger`] records what the
//! framework accepted and how each message ended; the kernel's handler logs
//! every message it runs, with the incarnation and H2K `seq` it ran under.
//! [`Ledger::check`] then joins the two with the actor's
//! [`IncarnationRecord`]s (which say up to which `seq` each incarnation
//! committed) and asserts, per sender:
//!
//! A run of the handler *counts* (the message was processed) if its
//! incarnation committed it, or — for an ask — if its reply reached the
//! caller: a device publishes a reply before it commits, so the one message
//! in flight when the host fences may be answered and still lose the commit
//! race; its waiter was taken by the reply, so it is never handed back.
//!
//! - processed + reported failed = accepted, and every ask resolved;
//! - nothing processed twice;
//! - processed messages in the order each sender sent them;
//! - incarnations never overlapped: in the order the handler ran them,
//!   committed messages never go back to an older incarnation;
//! - the actor served again after every restart: each incarnation committed
//!   something or died of a fault of its own, and the drill's last ask is
//!   answered.

use crate::home::{DeadLetter, Ending, IncarnationRecord};
use crate::inject::{FaultInjector, Injection};
use crate::kernel::{CpuHandlers, Kernel, Message};
use crate::runtime::{AskError, Fault, HOST_DETECTED_CORRUPT_K2H};
use bytemuck::{Pod, Zeroable};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A drill message: who sent it, its number in that sender's stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Work {
    /// The drill it belongs to (see [`Ledger::new`]).
    pub drill: u32,
    /// The sender.
    pub sender: u32,
    /// Its sequence number at that sender (from 0).
    pub seq: u64,
}

impl Message for Work {
    const TYPE_ID: u32 = 0x0D01;
    /// `[incarnation, H2K seq]` of the incarnation that processed it.
    type Reply = [u64; 2];
}

/// The drill's kernel: logs each message it serves and replies with where
/// it ran.
#[derive(Debug)]
pub struct DrillKernel;

impl Kernel for DrillKernel {
    /// Messages processed.
    type State = u64;
    const NAME: &'static str = "drill";

    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(CpuHandlers::new().on(|processed: &mut u64, w: Work, ctx| {
            *processed += 1;
            let incarnation = ctx.actor().incarnation();
            log(w.drill).push(Run {
                sender: w.sender,
                seq: w.seq,
                incarnation,
                slot_seq: ctx.seq(),
            });
            ctx.reply([u64::from(incarnation), ctx.seq()]);
            Ok(())
        }))
    }
}

/// One run of the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    sender: u32,
    seq: u64,
    incarnation: u16,
    slot_seq: u64,
}

static LOGS: Mutex<Option<HashMap<u32, Vec<Run>>>> = Mutex::new(None);
static NEXT_DRILL: AtomicU32 = AtomicU32::new(1);

struct Log(MutexGuard<'static, Option<HashMap<u32, Vec<Run>>>>, u32);

impl Log {
    fn push(&mut self, run: Run) {
        self.0
            .get_or_insert_with(HashMap::new)
            .entry(self.1)
            .or_default()
            .push(run);
    }
}

fn log(drill: u32) -> Log {
    Log(LOGS.lock().unwrap_or_else(|p| p.into_inner()), drill)
}

/// How one ask ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Replied: `[incarnation, H2K seq]`.
    Reply([u64; 2]),
    /// Resolved with an error that says the kernel faulted or the actor
    /// stopped (the adapter maps its own error to this).
    Failed(Option<AskError>),
}

#[derive(Default)]
struct Sender {
    /// Per seq: 0 not accepted, 1 ask, 2 tell.
    kind: Vec<u8>,
    outcomes: HashMap<u64, Vec<Outcome>>,
    dead: HashMap<u64, u32>,
}

/// What a drill recorded on the host side; see the [module docs](self).
pub struct Ledger {
    drill: u32,
    senders: Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("drill", &self.drill)
            .finish_non_exhaustive()
    }
}

/// What [`Ledger::check`] found (it panics on a violated guarantee).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrillReport {
    /// Messages the framework accepted.
    pub accepted: u64,
    /// Of those, processed (asks: replied; tells: committed).
    pub processed: u64,
    /// Reported failed (asks: an error; tells: a dead letter).
    pub failed: u64,
    /// Asks the kernel processed whose reply a corrupt K2H envelope
    /// destroyed: the caller was told it failed.
    pub lost_replies: u64,
    /// Incarnations started.
    pub incarnations: usize,
    /// Incarnations that ended in a fault.
    pub faults: usize,
    /// Handler runs of fenced incarnations that did not commit.
    pub fenced_runs: u64,
}

impl Ledger {
    /// A ledger for `senders` senders, under a fresh drill id.
    pub fn new(senders: usize) -> Self {
        Ledger {
            drill: NEXT_DRILL.fetch_add(1, Ordering::Relaxed),
            senders: Mutex::new((0..senders).map(|_| Sender::default()).collect()),
        }
    }

    /// The message `seq` of `sender`.
    pub fn work(&self, sender: u32, seq: u64) -> Work {
        Work {
            drill: self.drill,
            sender,
            seq,
        }
    }

    fn senders(&self) -> MutexGuard<'_, Vec<Sender>> {
        self.senders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The framework accepted message `seq` of `sender` (an ask if `ask`).
    pub fn accepted(&self, sender: u32, seq: u64, ask: bool) {
        let mut s = self.senders();
        let k = &mut s[sender as usize].kind;
        if k.len() <= seq as usize {
            k.resize(seq as usize + 1, 0);
        }
        k[seq as usize] = if ask { 1 } else { 2 };
    }

    /// An ask resolved.
    pub fn resolved(&self, sender: u32, seq: u64, outcome: Outcome) {
        self.senders()[sender as usize]
            .outcomes
            .entry(seq)
            .or_default()
            .push(outcome);
    }

    /// The dead-letter sink's input (letters of other drills are ignored).
    pub fn dead_letter(&self, letter: &DeadLetter) {
        if let Some(w) = letter.payload.get::<Work>()
            && w.drill == self.drill
        {
            *self.senders()[w.sender as usize]
                .dead
                .entry(w.seq)
                .or_default() += 1;
        }
    }

    /// Checks every guarantee against the handler's log and the actor's
    /// incarnation history. Every incarnation must be over (fenced) by now.
    ///
    /// # Panics
    /// With a description of each violation found.
    pub fn check(&self, history: &[IncarnationRecord]) -> DrillReport {
        let runs = log(self.drill)
            .0
            .as_mut()
            .and_then(|m| m.remove(&self.drill))
            .unwrap_or_default();
        let mut report = DrillReport {
            incarnations: history.len(),
            ..DrillReport::default()
        };
        let mut errors = String::new();
        let mut ended: HashMap<u16, (u64, Option<Fault>)> = HashMap::new();
        for r in history {
            match r.ending {
                Ending::Serving => {
                    let _ = writeln!(errors, "incarnation {} is still serving", r.incarnation);
                }
                Ending::Faulted(f) => {
                    report.faults += 1;
                    ended.insert(r.incarnation, (r.committed_seq, Some(f)));
                }
                _ => {
                    ended.insert(r.incarnation, (r.committed_seq, None));
                }
            }
        }
        let senders = self.senders();
        // The reply each ask got: its run counts as processed even when the
        // commit after it lost the race with the fence (the reply was
        // published first, and its waiter taken by it, never handed back).
        let mut replied: HashMap<(u32, u64), [u64; 2]> = HashMap::new();
        for (id, s) in senders.iter().enumerate() {
            for (&seq, outs) in &s.outcomes {
                if let [Outcome::Reply(r)] = outs[..] {
                    replied.insert((id as u32, seq), r);
                }
            }
        }
        let committed = |r: &Run| {
            ended
                .get(&r.incarnation)
                .is_some_and(|&(c, _)| r.slot_seq <= c)
                || replied.get(&(r.sender, r.seq)) == Some(&[u64::from(r.incarnation), r.slot_seq])
        };

        // Overlap: in run order, committed runs never go back to an older
        // incarnation.
        let mut newest = 0u16;
        let mut served_in: HashMap<u16, u64> = HashMap::new();
        let mut processed: HashMap<(u32, u64), Vec<Run>> = HashMap::new();
        let mut last_seq: HashMap<u32, u64> = HashMap::new();
        for r in &runs {
            if !committed(r) {
                report.fenced_runs += 1;
                continue;
            }
            if r.incarnation < newest {
                let _ = writeln!(
                    errors,
                    "incarnation {} committed after incarnation {} had",
                    r.incarnation, newest
                );
            }
            newest = newest.max(r.incarnation);
            *served_in.entry(r.incarnation).or_default() += 1;
            if let Some(&prev) = last_seq.get(&r.sender)
                && prev >= r.seq
            {
                let _ = writeln!(
                    errors,
                    "sender {}: message {} processed after message {}",
                    r.sender, r.seq, prev
                );
            }
            last_seq.insert(r.sender, r.seq);
            processed.entry((r.sender, r.seq)).or_default().push(*r);
        }
        // Serving again after each restart: every incarnation either
        // committed something or ended in a fault of its own (one may fail
        // on its very first message); the drill's last ask proves the last
        // restart serves.
        for r in history {
            if !served_in.contains_key(&r.incarnation) && !matches!(r.ending, Ending::Faulted(_)) {
                let _ = writeln!(
                    errors,
                    "incarnation {} neither served nor faulted",
                    r.incarnation
                );
            }
        }

        for (id, s) in senders.iter().enumerate() {
            let id = id as u32;
            for (seq, &kind) in s.kind.iter().enumerate() {
                let seq = seq as u64;
                let runs = processed.get(&(id, seq)).map_or(&[][..], |v| &v[..]);
                let dead = s.dead.get(&seq).copied().unwrap_or(0);
                if runs.len() > 1 {
                    let _ = writeln!(
                        errors,
                        "sender {id} message {seq} processed {} times",
                        runs.len()
                    );
                }
                match kind {
                    0 => {
                        if !runs.is_empty() {
                            let _ = writeln!(
                                errors,
                                "sender {id} message {seq} processed but never accepted"
                            );
                        }
                        continue;
                    }
                    1 => {
                        report.accepted += 1;
                        let outs = s.outcomes.get(&seq).map_or(&[][..], |v| &v[..]);
                        match outs {
                            [] => {
                                let _ = writeln!(errors, "sender {id} ask {seq} never resolved");
                            }
                            [Outcome::Reply([inc, slot_seq])] => {
                                report.processed += 1;
                                if !runs.iter().any(|r| {
                                    u64::from(r.incarnation) == *inc && r.slot_seq == *slot_seq
                                }) {
                                    let _ = writeln!(
                                        errors,
                                        "sender {id} ask {seq} replied from no run of the handler"
                                    );
                                }
                            }
                            [Outcome::Failed(_)] => {
                                report.failed += 1;
                                if let Some(r) = runs.first() {
                                    // Processed, and the caller told it
                                    // failed: only if the reply itself was
                                    // destroyed.
                                    let corrupt =
                                        ended.get(&r.incarnation).is_some_and(|(_, f)| {
                                            f.is_some_and(|f| f.detail == HOST_DETECTED_CORRUPT_K2H)
                                        });
                                    if corrupt {
                                        report.lost_replies += 1;
                                    } else {
                                        let _ = writeln!(
                                            errors,
                                            "sender {id} ask {seq} processed but reported failed"
                                        );
                                    }
                                }
                            }
                            more => {
                                let _ = writeln!(
                                    errors,
                                    "sender {id} ask {seq} resolved {} times",
                                    more.len()
                                );
                            }
                        }
                    }
                    _ => {
                        report.accepted += 1;
                        match (runs.len(), dead) {
                            (1, 0) => report.processed += 1,
                            (0, 1) => report.failed += 1,
                            (r, d) => {
                                let _ = writeln!(
                                    errors,
                                    "sender {id} tell {seq}: processed {r} times, dead-lettered {d} times"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(
            errors.is_empty(),
            "drill {} violated its guarantees ({report:?}):\n{}",
            self.drill,
            errors.lines().take(40).collect::<Vec<_>>().join("\n")
        );
        report
    }
}

/// Messages per drill: `RINGKERNEL_DRILL_MESSAGES`, default 10^5 (the long
/// run in `.ci/run` sets 10^6).
pub fn messages() -> u64 {
    std::env::var("RINGKERNEL_DRILL_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// The watchdog limit drills run with (a hang is injected for 5× as long).
pub const WATCHDOG: Duration = Duration::from_millis(20);

/// The drills' fault mix: every kind of [`Injection`], about 40 faults per
/// drill of `messages`, seeded.
pub fn injector(seed: u64, messages: u64) -> Arc<FaultInjector> {
    Arc::new(FaultInjector::random(
        seed,
        (messages / 40).max(1),
        &[
            Injection::Panic,
            Injection::Exit,
            Injection::CorruptReply,
            Injection::FaultAfterReply,
            Injection::Hang(WATCHDOG * 5),
        ],
    ))
}

/// A reply on its way: resolves with the ask's [`Outcome`] (the adapter
/// maps its framework's errors, a deadline included, to `Failed`).
pub type PendingOutcome = Pin<Box<dyn Future<Output = Option<Outcome>> + Send>>;

/// What a sender's send did.
pub enum Sent {
    /// An ask was accepted; its outcome is on the way (`None`: it never
    /// resolved within the deadline).
    Ask(PendingOutcome),
    /// A tell was accepted.
    Tell,
    /// The framework refused it (the actor is gone; the adapter's send
    /// waits for the restart before it returns this).
    Refused,
}

impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sent::Ask(_) => "Ask",
            Sent::Tell => "Tell",
            Sent::Refused => "Refused",
        })
    }
}

/// One sender of a drill: sends `count` sequence-numbered messages through
/// `send` (every `tell_every`-th a tell, 0 for none), keeps up to `window`
/// asks in flight, and records everything in the ledger.
pub async fn run_sender<S, F>(
    ledger: &Ledger,
    sender: u32,
    count: u64,
    window: usize,
    tell_every: u64,
    mut send: S,
) where
    S: FnMut(Work, bool) -> F,
    F: Future<Output = Sent>,
{
    let mut pending: VecDeque<(u64, PendingOutcome)> = VecDeque::new();
    for seq in 0..count {
        let ask = tell_every == 0 || seq % tell_every != tell_every - 1;
        match send(ledger.work(sender, seq), ask).await {
            Sent::Ask(reply) => {
                ledger.accepted(sender, seq, true);
                pending.push_back((seq, reply));
            }
            Sent::Tell => ledger.accepted(sender, seq, false),
            Sent::Refused => {}
        }
        while pending.len() >= window.max(1) {
            let (seq, reply) = pending.pop_front().expect("window is not empty");
            if let Some(o) = reply.await {
                ledger.resolved(sender, seq, o);
            }
        }
    }
    for (seq, reply) in pending {
        if let Some(o) = reply.await {
            ledger.resolved(sender, seq, o);
        }
    }
}

/// The last ask of a drill, from the extra sender `sender`: asked (through
/// `send`, so through restarts) until the actor answers one — proof that
/// the incarnation serving at the end serves, replays included. Every
/// attempt is recorded in the ledger.
///
/// # Panics
/// If the framework refuses the ask or it never resolves.
pub async fn run_barrier<S, F>(ledger: &Ledger, sender: u32, mut send: S)
where
    S: FnMut(Work) -> F,
    F: Future<Output = Sent>,
{
    for seq in 0.. {
        let Sent::Ask(reply) = send(ledger.work(sender, seq)).await else {
            panic!("the drill's last ask was refused");
        };
        ledger.accepted(sender, seq, true);
        let outcome = reply.await.expect("the drill's last ask resolved");
        ledger.resolved(sender, seq, outcome);
        if matches!(outcome, Outcome::Reply(_)) {
            return;
        }
    }
}

/// Whether every incarnation in `history` has ended (the drill checks only
/// then).
pub fn all_ended(history: &[IncarnationRecord]) -> bool {
    history.iter().all(|r| r.ending != Ending::Serving)
}

/// What every adapter's drill starts from: a ledger for `senders` senders
/// (plus the last ask's), a runtime with the drill watchdog whose dead
/// letters feed the ledger, the seeded injector, and launch options with
/// `policy` and the injector.
#[derive(Debug)]
pub struct Setup {
    /// Messages to send (see [`messages`]).
    pub messages: u64,
    /// The ledger.
    pub ledger: Arc<Ledger>,
    /// The runtime.
    pub runtime: crate::runtime::Runtime,
    /// The injector (stop it before the wind-down).
    pub injector: Arc<FaultInjector>,
    /// Launch options for the drilled actor.
    pub options: crate::runtime::LaunchOptions,
}

impl Setup {
    /// A drill of `senders` senders under `policy`, faults seeded by `seed`.
    ///
    /// # Panics
    /// If the runtime cannot start.
    pub fn new(senders: u32, policy: crate::home::PendingPolicy, seed: u64) -> Self {
        let messages = messages();
        let ledger = Arc::new(Ledger::new(senders as usize + 1));
        let sink = ledger.clone();
        let runtime = crate::runtime::Runtime::builder()
            .watchdog(WATCHDOG)
            .dead_letters(move |l| sink.dead_letter(&l))
            .build()
            .expect("the drill's runtime starts");
        let injector = injector(seed, messages);
        let options = crate::runtime::LaunchOptions::default()
            .on_fault(policy)
            .inject(injector.clone());
        Setup {
            messages,
            ledger,
            runtime,
            injector,
            options,
        }
    }
}
