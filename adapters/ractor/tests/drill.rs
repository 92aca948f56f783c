//! The fault drill through ractor: sequence-numbered asks from several
//! senders while faults are injected at random points; a ractor supervisor
//! restarts the GPU actor (the next incarnation) on every `ActorFailed`.
//! `ringkernel::drill` checks the guarantees (see `docs/semantics.md`).
//!
//! Asks only: ractor drops casts still queued behind an actor that stops
//! (the adapter drains its mailbox before failing, which leaves only sends
//! racing the drain), so a cast's fate cannot be accounted for exactly here;
//! tells are drilled through actix and the core.
//!
//! `RINGKERNEL_DRILL_MESSAGES` sets the size (default 10^5).

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ringkernel::drill::{self, DrillKernel, Outcome, Sent};
use ringkernel::home::PendingPolicy;
use ringkernel::kernel::Payload;
use ringkernel_ractor::{GpuActor, GpuMsg};
use std::time::Duration;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(30);
const SENDERS: u32 = 4;

/// Restarts the GPU actor whenever it fails and publishes the new ref.
struct Restarter;

struct RestarterState {
    gpu: GpuActor<DrillKernel>,
    current: watch::Sender<ActorRef<GpuMsg>>,
    restarts: u64,
}

impl Actor for Restarter {
    type Msg = ();
    type State = RestarterState;
    type Arguments = (GpuActor<DrillKernel>, watch::Sender<ActorRef<GpuMsg>>);

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        (gpu, current): Self::Arguments,
    ) -> Result<RestarterState, ActorProcessingErr> {
        Ok(RestarterState {
            gpu,
            current,
            restarts: 0,
        })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut RestarterState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, _) = event {
            // The same actor, its next incarnation.
            let (fresh, _) =
                Actor::spawn_linked(None, state.gpu.clone(), 0, myself.get_cell()).await?;
            state.restarts += 1;
            let _ = state.current.send(fresh);
        }
        Ok(())
    }
}

async fn send(current: watch::Receiver<ActorRef<GpuMsg>>, work: drill::Work) -> Sent {
    let mut current = current;
    loop {
        let actor = current.borrow_and_update().clone();
        let (tx, rx) = ractor::concurrency::oneshot();
        if actor
            .send_message(GpuMsg::Ask(Payload::new(work), tx.into()))
            .is_ok()
        {
            return Sent::Ask(Box::pin(async move {
                match tokio::time::timeout(DEADLINE, rx).await {
                    Err(_) => None,
                    Ok(Ok(Ok(reply))) => {
                        Some(Outcome::Reply(reply.decode().expect("a drill reply")))
                    }
                    // An error from the kernel, or ractor dropped the port
                    // of a message queued behind a failing actor.
                    Ok(Ok(Err(_)) | Err(_)) => Some(Outcome::Failed(None)),
                }
            }));
        }
        // The actor is gone: wait for its next incarnation.
        if tokio::time::timeout(DEADLINE, current.changed())
            .await
            .is_err()
        {
            return Sent::Refused;
        }
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
    let gpu = GpuActor::<DrillKernel>::with_options(runtime, options);
    let home = gpu.home().clone();
    let (first, _) = Actor::spawn(None, gpu.clone(), 0).await.unwrap();
    let (tx, rx) = watch::channel(first.clone());
    let (restarter, restarter_done) = Actor::spawn(None, Restarter, (gpu, tx)).await.unwrap();
    first.link(restarter.get_cell());

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (ledger, rx) = (ledger.clone(), rx.clone());
        senders.push(tokio::spawn(async move {
            drill::run_sender(&ledger, s, n / u64::from(SENDERS), 32, 0, |w, _| {
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
    restarter.stop(None);
    restarter_done.await.unwrap();
    // (A supervisor that stops takes its children with it.)
    let last = rx.borrow().clone();
    let _ = last.stop_and_wait(None, None).await;
    // A child killed with its supervisor skips `post_stop`: its slot ends
    // when its state is dropped. Wait for that.
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
        "ractor drill ({policy:?}, {n} messages): {report:?}, injected {}, fenced writes {}",
        injector.injected(),
        home.fenced_writes()
    );
    assert!(report.faults > 0, "the drill injected no fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_replay_policy() {
    run(PendingPolicy::Replay, 0x5eed_0001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_fail_policy() {
    run(PendingPolicy::Fail, 0x5eed_0002).await;
}
