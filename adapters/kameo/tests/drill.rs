//! The fault drill through kameo: sequence-numbered asks from several
//! senders while faults are injected at random points; a linked supervisor
//! spawns the next incarnation from a clone of the `GpuArgs` whenever the
//! GPU actor dies of a fault. `ringkernel::drill` checks the guarantees
//! (see `docs/semantics.md`).
//!
//! Asks only: kameo drops the messages still queued behind an actor that
//! dies (an ask's caller then sees an error; a tell has no one to tell), so
//! a tell's fate cannot be accounted for exactly here; tells are drilled
//! through actix and the core.
//!
//! `RINGKERNEL_DRILL_MESSAGES` sets the size (default 10^5).

use kameo::Actor;
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::error::{ActorStopReason, SendError};
use ringkernel::drill::{self, DrillKernel, Outcome, Sent};
use ringkernel::home::PendingPolicy;
use ringkernel_kameo::{Ask, GpuActor, GpuArgs};
use std::ops::ControlFlow;
use std::time::Duration;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(30);
const SENDERS: u32 = 16;

type Gpu = GpuActor<DrillKernel>;

/// Spawns the next incarnation when the GPU actor dies of a fault.
struct Restarter {
    args: GpuArgs<DrillKernel>,
    current: watch::Sender<ActorRef<Gpu>>,
}

impl Actor for Restarter {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(args: Self, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(args)
    }

    async fn on_link_died(
        &mut self,
        me: WeakActorRef<Self>,
        _: kameo::actor::ActorId,
        reason: ActorStopReason,
    ) -> Result<ControlFlow<ActorStopReason>, Self::Error> {
        if matches!(reason, ActorStopReason::Panicked(_)) {
            let fresh = Gpu::spawn(self.args.clone());
            if let Some(me) = me.upgrade() {
                fresh.link(&me).await;
            }
            let _ = self.current.send(fresh);
        }
        Ok(ControlFlow::Continue(()))
    }
}

/// kameo 0.19 can strand an ask sent while its actor dies (the message, which
/// holds a strong ref to the actor's own mailbox, can outlive the drained
/// receiver): kameo's own reply timeout resolves those. It is far above
/// any reply time here (a hang injected for 100 ms is the slowest), so an
/// ask that times out never reached the GPU actor.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

static STRANDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn send(current: watch::Receiver<ActorRef<Gpu>>, work: drill::Work) -> Sent {
    // One ask in flight per sender (kameo 0.19's `enqueue` panics when the
    // actor is gone, so asks are not pipelined through it): the ask is sent
    // and awaited here, and its outcome handed over ready.
    let mut current = current;
    loop {
        let actor = current.borrow_and_update().clone();
        let ask = actor.ask(Ask(work)).reply_timeout(REPLY_TIMEOUT).send();
        let outcome = match tokio::time::timeout(DEADLINE, ask).await {
            Err(_) => None,
            Ok(Ok(r)) => Some(Outcome::Reply(r)),
            Ok(Err(SendError::ActorNotRunning(_))) => {
                // Not delivered: the actor is gone. Wait for its next
                // incarnation.
                if tokio::time::timeout(DEADLINE, current.changed())
                    .await
                    .is_err()
                {
                    return Sent::Refused;
                }
                continue;
            }
            Ok(Err(SendError::Timeout(None))) => {
                STRANDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(Outcome::Failed(None))
            }
            Ok(Err(_)) => Some(Outcome::Failed(None)),
        };
        return Sent::Ask(Box::pin(async move { outcome }));
    }
}

async fn run(policy: PendingPolicy, seed: u64) {
    let drill::Setup {
        messages: n,
        ledger,
        runtime,
        injector,
        options,
    } = drill::Setup::new(SENDERS, policy, seed);
    let args = GpuArgs::<DrillKernel>::new(runtime, 0).options(options);
    let home = args.home().clone();
    let first = Gpu::spawn(args.clone());
    let (tx, rx) = watch::channel(first.clone());
    let restarter = Restarter::spawn(Restarter { args, current: tx });
    first.link(&restarter).await;

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (ledger, rx) = (ledger.clone(), rx.clone());
        senders.push(tokio::spawn(async move {
            drill::run_sender(&ledger, s, n / u64::from(SENDERS), 1, 0, |w, _| {
                send(rx.clone(), w)
            })
            .await;
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    // Wind down: no more faults; the current incarnation serves (replays
    // included) a last ask, then stops.
    injector.stop();
    drill::run_barrier(&ledger, SENDERS, |w| send(rx.clone(), w)).await;
    // No restarts from here on, then stop whichever incarnation is current.
    restarter.stop_gracefully().await.unwrap();
    restarter.wait_for_shutdown().await;
    let last = rx.borrow().clone();
    let _ = last.stop_gracefully().await;
    last.wait_for_shutdown().await;

    let deadline = std::time::Instant::now() + DEADLINE;
    while !drill::all_ended(&home.history()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the last incarnation never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = ledger.check(&home.history());
    eprintln!(
        "kameo drill ({policy:?}, {n} messages): {report:?}, injected {}, fenced writes {}, asks kameo stranded {}",
        injector.injected(),
        home.fenced_writes(),
        STRANDED.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(report.faults > 0, "the drill injected no fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_replay_policy() {
    run(PendingPolicy::Replay, 0x5eed_0021).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_fail_policy() {
    run(PendingPolicy::Fail, 0x5eed_0022).await;
}
