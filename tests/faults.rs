//! Faults on the cpu backend, one injected fault at a time, through the
//! core API: detection, fencing, hand-back (fail or replay), incarnations,
//! checkpoints, late writes (feature `fault-injection`; see
//! `docs/semantics.md`, *Faults*).

use ringkernel::conformance::{
    self, Add, ChannelWaiter, Echo, Explode, Nap, Pending, Probe, Total,
};
use ringkernel::control::FaultCode;
use ringkernel::drill::{DrillKernel, Ledger, Outcome};
use ringkernel::home::{ActorHome, Ending, PendingPolicy};
use ringkernel::inject::{FaultInjector, INJECTED_DETAIL, Injection};
use ringkernel::runtime::{
    AskError, Fault, GpuSlot, HOST_DETECTED_CORRUPT_K2H, LaunchError, LaunchOptions, ReplayStatus,
    Runtime, SlotEvent,
};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const N: u64 = 12;
const AT: u64 = 4;

struct Rig {
    rt: Runtime,
    ledger: Arc<Ledger>,
    home: ActorHome<ChannelWaiter>,
    events: mpsc::Receiver<SlotEvent>,
    tx: Mutex<mpsc::Sender<SlotEvent>>,
}

impl Rig {
    fn new(watchdog: Duration) -> Self {
        let ledger = Arc::new(Ledger::new(1));
        let sink = ledger.clone();
        let rt = Runtime::builder()
            .watchdog(watchdog)
            .dead_letters(move |l| sink.dead_letter(&l))
            .build()
            .unwrap();
        let (tx, events) = mpsc::channel();
        Rig {
            home: rt.home(),
            rt,
            ledger,
            events,
            tx: Mutex::new(tx),
        }
    }

    fn launch(&self, options: &LaunchOptions) -> GpuSlot<ChannelWaiter> {
        let tx = self.tx.lock().unwrap().clone();
        let tx = Mutex::new(tx);
        self.rt
            .launch_in::<DrillKernel, _>(&self.home, 0, options, move |e| {
                let _ = tx.lock().unwrap().send(e);
            })
            .unwrap()
    }

    fn fault(&self) -> Fault {
        match self
            .events
            .recv_timeout(conformance::DEADLINE)
            .expect("no fault event")
        {
            SlotEvent::Faulted(f) => f,
            other => panic!("unexpected event {other:?}"),
        }
    }

    /// Sends `N` messages (every third a tell) while the slot is
    /// deactivated, so they all wait in H2K, then activates it.
    fn send(&self, slot: &mut GpuSlot<ChannelWaiter>, from: u64) -> Vec<(u64, Pending)> {
        let mut asks = Vec::new();
        for seq in from..from + N {
            let w = self.ledger.work(0, seq);
            if seq % 3 == 2 {
                conformance::tell(slot, w);
                self.ledger.accepted(0, seq, false);
            } else {
                asks.push((seq, conformance::ask(slot, w)));
                self.ledger.accepted(0, seq, true);
            }
        }
        slot.activate().unwrap();
        asks
    }

    fn resolve(&self, asks: Vec<(u64, Pending)>) {
        for (seq, p) in asks {
            let outcome = match p.wait() {
                Ok(r) => Outcome::Reply(r.decode().unwrap()),
                Err(e) => Outcome::Failed(Some(e)),
            };
            self.ledger.resolved(0, seq, outcome);
        }
    }
}

fn inactive() -> LaunchOptions {
    LaunchOptions::default().auto_activate(false)
}

/// One injection at message `AT` under the default policy: the fault is
/// the right one, the messages before it are processed, those after it are
/// handed back failed, and the ledger balances.
fn one_fault(
    what: Injection,
) -> (
    Fault,
    ringkernel::drill::DrillReport,
    ringkernel::runtime::Recovery,
) {
    let rig = Rig::new(Duration::from_secs(5));
    let opts = inactive().inject(Arc::new(FaultInjector::at([(AT, what)])));
    let mut slot = rig.launch(&opts);
    let asks = rig.send(&mut slot, 0);
    let fault = rig.fault();
    let recovery = slot.recover();
    rig.resolve(asks);
    slot.terminate(Duration::from_secs(5));
    let report = rig.ledger.check(&rig.home.history());
    assert_eq!(report.accepted, N);
    (fault, report, recovery)
}

#[test]
fn injected_panic_fails_what_was_not_processed() {
    let (fault, report, recovery) = one_fault(Injection::Panic);
    assert_eq!(
        (fault.code, fault.detail),
        (FaultCode::HandlerPanic, INJECTED_DETAIL)
    );
    assert_eq!(report.processed, AT);
    assert_eq!(report.failed, N - AT);
    assert_eq!(recovery.committed_seq, AT, "seq counts from 1");
    // The poller failed the asks at once; the tells among the unprocessed
    // (every third message) became dead letters.
    assert_eq!(recovery.dead_letters, 3);
}

#[test]
fn injected_exit_is_an_unexpected_exit() {
    let (fault, report, _) = one_fault(Injection::Exit);
    assert_eq!(fault.code, FaultCode::UnexpectedExit);
    assert_eq!((report.processed, report.failed), (AT, N - AT));
}

#[test]
fn corrupt_k2h_header_faults_the_slot_and_loses_only_that_reply() {
    let (fault, report, _) = one_fault(Injection::CorruptReply);
    assert_eq!(
        (fault.code, fault.detail),
        (FaultCode::BadEnvelope, HOST_DETECTED_CORRUPT_K2H)
    );
    // Message AT was processed (committed) but its reply was destroyed: its
    // caller was told it failed, and it was not handed back.
    assert_eq!(report.lost_replies, 1);
    assert_eq!(report.processed + report.failed, N);
}

#[test]
fn fault_between_reply_and_release_hands_back_nothing_processed() {
    let (fault, report, recovery) = one_fault(Injection::FaultAfterReply);
    assert_eq!(
        (fault.code, fault.detail),
        (FaultCode::HandlerFault, INJECTED_DETAIL)
    );
    // Message AT was committed and replied to; its H2K slot was never
    // released, and it is not handed back as failed.
    assert_eq!(report.processed, AT + 1);
    assert_eq!(report.failed, N - AT - 1);
    assert_eq!(recovery.committed_seq, AT + 1);
}

#[test]
fn replay_policy_serves_the_unprocessed_in_the_next_incarnation_in_order() {
    let rig = Rig::new(Duration::from_secs(5));
    let injector = Arc::new(FaultInjector::at([(AT, Injection::Panic)]));
    let opts = inactive().on_fault(PendingPolicy::Replay).inject(injector);
    let mut first = rig.launch(&opts);
    assert_eq!(first.incarnation(), 0);
    let asks = rig.send(&mut first, 0);
    rig.fault();
    // The message in the handler when it panicked is failed; the rest is
    // kept for the next incarnation.
    let recovery = first.recover();
    assert_eq!(recovery.replayed, (N - AT - 1) as usize);
    assert_eq!(rig.home.pending_replays(), (N - AT - 1) as usize);
    let mut second = rig.launch(&LaunchOptions::default().on_fault(PendingPolicy::Replay));
    assert_eq!(second.incarnation(), 1);
    assert_eq!(
        second.id().index(),
        first.id().index(),
        "same actor, new incarnation"
    );
    assert_eq!(second.replay(), ReplayStatus::Done);
    drop(first);
    rig.resolve(asks);
    second.terminate(Duration::from_secs(5));
    let report = rig.ledger.check(&rig.home.history());
    assert_eq!((report.processed, report.failed), (N - 1, 1), "{report:?}");
    assert_eq!(report.incarnations, 2);
}

#[test]
fn a_second_incarnation_never_starts_while_the_first_serves() {
    let rig = Rig::new(Duration::from_secs(5));
    let mut first = rig.launch(&LaunchOptions::default());
    let err = rig
        .rt
        .launch_in::<DrillKernel, _>(&rig.home, 0, &LaunchOptions::default(), |_| {})
        .unwrap_err();
    assert_eq!(err, LaunchError::IncarnationLive { incarnation: 0 });
    first.terminate(Duration::from_secs(5));
    let mut second = rig.launch(&LaunchOptions::default());
    assert_eq!(second.incarnation(), 1);
    second.terminate(Duration::from_secs(5));
    let endings: Vec<_> = rig.home.history().iter().map(|r| r.ending).collect();
    assert_eq!(endings, [Ending::Terminated, Ending::Terminated]);
}

#[test]
fn a_hung_handler_is_fenced_and_its_late_writes_are_counted() {
    let rt = Runtime::builder()
        .watchdog(Duration::from_millis(40))
        .build()
        .unwrap();
    let home = rt.home::<ChannelWaiter>();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let mut hung = rt
        .launch_in::<Probe, _>(
            &home,
            Default::default(),
            &LaunchOptions::default(),
            move |e| {
                let _ = tx.lock().unwrap().send(e);
            },
        )
        .unwrap();
    let slow = conformance::ask(&mut hung, Nap(600));
    let behind = conformance::ask(&mut hung, Nap(0));
    let fault = match rx.recv_timeout(conformance::DEADLINE).unwrap() {
        SlotEvent::Faulted(f) => f,
        other => panic!("{other:?}"),
    };
    assert_eq!(fault.code, FaultCode::Watchdog);
    hung.recover();
    assert_eq!(slow.wait(), Err(AskError::Faulted(fault)));
    assert_eq!(behind.wait(), Err(AskError::Faulted(fault)));
    // The hung thread is still asleep in its handler; the next incarnation
    // serves meanwhile.
    let mut next = rt
        .launch_in::<Probe, _>(&home, Default::default(), &LaunchOptions::default(), |_| {})
        .unwrap();
    assert_eq!(
        conformance::ask(&mut next, Nap(0))
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(1)
    );
    // When the old handler returns, its reply and commit are dropped.
    let deadline = Instant::now() + conformance::DEADLINE;
    while home.fenced_writes() == 0 {
        assert!(
            Instant::now() < deadline,
            "the late write was never counted"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(hung.late_replies(), 0, "the fenced reply never reached K2H");
    next.terminate(Duration::from_secs(5));
}

#[test]
fn a_checkpoint_carries_the_state_into_the_next_incarnation() {
    let rt = Runtime::new().unwrap();
    let home = rt.home::<ChannelWaiter>();
    let opts = LaunchOptions::default().checkpoint_every(5);
    let mut first = rt
        .launch_in::<Probe, _>(&home, Default::default(), &opts, |_| {})
        .unwrap();
    for _ in 0..10 {
        conformance::tell(&mut first, Add(1));
    }
    assert_eq!(
        conformance::ask(&mut first, Total())
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(10)
    );
    // Two more: not yet checkpointed, and lost with the fault.
    conformance::tell(&mut first, Add(100));
    conformance::tell(&mut first, Add(100));
    assert!(conformance::ask(&mut first, Explode()).wait().is_err());
    while first.fault().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    first.recover();
    let cp = home.checkpoint().expect("checkpointed every 5 messages");
    assert_eq!((cp.incarnation, cp.processed), (0, 10));
    let mut second = rt
        .launch_in::<Probe, _>(&home, Default::default(), &opts, |_| {})
        .unwrap();
    assert_eq!(
        conformance::ask(&mut second, Total())
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(10)
    );
    // On request, too.
    conformance::tell(&mut second, Add(5));
    // Once both messages are counted, a request is served by the next one.
    let deadline = Instant::now() + conformance::DEADLINE;
    while second.status().processed < 2 {
        assert!(Instant::now() < deadline, "Add(5) never processed");
        std::thread::sleep(Duration::from_millis(1));
    }
    home.request_checkpoint();
    assert_eq!(
        conformance::ask(&mut second, Echo(1))
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(1)
    );
    // Taken after the commit, which follows the reply: wait for it.
    let deadline = Instant::now() + conformance::DEADLINE;
    let cp = loop {
        match home.checkpoint() {
            Some(cp) if cp.incarnation == 1 => break cp,
            _ => assert!(Instant::now() < deadline, "no checkpoint on request"),
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(bytemuck::pod_read_unaligned::<u64>(&cp.bytes[..8]), 15);
    second.terminate(Duration::from_secs(5));
    // A checkpoint of another kernel does not fit.
    let err = rt
        .launch_in::<DrillKernel, _>(&home, 0, &LaunchOptions::default(), |_| {})
        .unwrap_err();
    assert!(matches!(
        err,
        LaunchError::CheckpointMismatch {
            kernel: "probe",
            ..
        }
    ));
}

#[test]
fn a_corrupt_k2h_envelope_faults_one_slot_and_the_runtime_serves_the_others() {
    let rig = Rig::new(Duration::from_secs(5));
    let mut other = rig
        .rt
        .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
        .unwrap();
    let opts = LaunchOptions::default()
        .inject(Arc::new(FaultInjector::at([(0, Injection::CorruptReply)])));
    let mut bad = rig.launch(&opts);
    let p = conformance::ask(&mut bad, rig.ledger.work(0, 0));
    let got = p.wait();
    assert!(matches!(got, Err(AskError::Faulted(_))), "{got:?}");
    assert_eq!(bad.bad_replies(), 1);
    assert_eq!(
        conformance::ask(&mut other, Echo(9))
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(9)
    );
    other.terminate(Duration::from_secs(5));
}

/// A message that kills every incarnation it reaches (a poison message) is
/// failed, not replayed: the rest is replayed and served.
#[test]
fn the_message_that_faulted_is_failed_not_replayed() {
    let rt = Runtime::new().unwrap();
    let home = rt.home::<ChannelWaiter>();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let opts = inactive().on_fault(PendingPolicy::Replay);
    let mut first = rt
        .launch_in::<Probe, _>(&home, Default::default(), &opts, move |e| {
            let _ = tx.lock().unwrap().send(e);
        })
        .unwrap();
    let before = conformance::ask(&mut first, Echo(1));
    let poison = conformance::ask(&mut first, Explode());
    let after: Vec<_> = (2..5)
        .map(|v| conformance::ask(&mut first, Echo(v)))
        .collect();
    first.activate().unwrap();
    assert!(matches!(
        rx.recv_timeout(conformance::DEADLINE),
        Ok(SlotEvent::Faulted(_))
    ));
    assert_eq!(before.wait().unwrap().decode::<u64>(), Ok(1));
    // Not recovered yet: the next incarnation may not start.
    assert!(matches!(
        rt.launch_in::<Probe, _>(&home, Default::default(), &opts, |_| {}),
        Err(LaunchError::IncarnationLive { incarnation: 0 })
    ));
    // The poison ask resolved at once, before any recovery.
    assert!(
        matches!(poison.wait(), Err(AskError::Faulted(f)) if f.code == FaultCode::HandlerPanic)
    );
    let recovery = first.recover();
    assert_eq!((recovery.replayed, recovery.failed_asks), (3, 0));
    let mut second = rt
        .launch_in::<Probe, _>(&home, Default::default(), &LaunchOptions::default(), |_| {})
        .unwrap();
    assert_eq!(second.replay(), ReplayStatus::Done);
    for (v, p) in (2..5).zip(after) {
        assert_eq!(p.wait().unwrap().decode::<u64>(), Ok(v));
    }
    second.terminate(Duration::from_secs(5));
}

/// Tells handed back when the home is dropped with no next incarnation
/// still reach the dead-letter sink.
#[test]
fn replays_left_in_a_dropped_home_become_dead_letters() {
    let letters = Arc::new(Mutex::new(Vec::new()));
    let sink = letters.clone();
    let rt = Runtime::builder()
        .dead_letters(move |l| sink.lock().unwrap().push(l))
        .build()
        .unwrap();
    let home = rt.home::<ChannelWaiter>();
    let injector = Arc::new(FaultInjector::at([(0, Injection::Panic)]));
    let opts = inactive().on_fault(PendingPolicy::Replay).inject(injector);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let mut slot = rt
        .launch_in::<Probe, _>(&home, Default::default(), &opts, move |e| {
            let _ = tx.lock().unwrap().send(e);
        })
        .unwrap();
    conformance::tell(&mut slot, Add(1));
    conformance::tell(&mut slot, Add(2));
    let ask = conformance::ask(&mut slot, Total());
    slot.activate().unwrap();
    assert!(rx.recv_timeout(conformance::DEADLINE).is_ok());
    let recovery = slot.recover();
    // The first tell was in the handler (failed); the rest kept for replay.
    assert_eq!((recovery.dead_letters, recovery.replayed), (1, 2));
    drop(slot);
    drop(home);
    assert!(matches!(ask.wait(), Err(AskError::Faulted(_))));
    let letters = letters.lock().unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[1].payload.get::<Add>(), Some(Add(2)));
}
