//! The fault drill through actix: sequence-numbered asks and tells from
//! several senders while faults are injected at random points; the GPU
//! actor runs under `actix::Supervisor`, whose restart launches the next
//! incarnation (same `Addr`, mailbox kept). `ringkernel::drill` checks the
//! guarantees (see `docs/semantics.md`).
//!
//! `RINGKERNEL_DRILL_MESSAGES` sets the size (default 10^5).

use actix::prelude::*;
use ringkernel::drill::{self, DrillKernel, Outcome, Sent};
use ringkernel::home::PendingPolicy;
use ringkernel_actix::{Ask, GpuActor, Tell};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);
/// One ask in flight per sender (actix defers a send to a full mailbox
/// until it is polled, which would reorder a pipelined sender).
const SENDERS: u32 = 16;

async fn send(addr: Addr<GpuActor<DrillKernel>>, work: drill::Work, ask: bool) -> Sent {
    if ask {
        let request = addr.send(Ask(work));
        return Sent::Ask(Box::pin(async move {
            match tokio::time::timeout(DEADLINE, request).await {
                Err(_) => None,
                Ok(Ok(Ok(r))) => Some(Outcome::Reply(r)),
                Ok(Ok(Err(_)) | Err(_)) => Some(Outcome::Failed(None)),
            }
        }));
    }
    match tokio::time::timeout(DEADLINE, addr.send(Tell(work))).await {
        Ok(Ok(Ok(()))) => Sent::Tell,
        _ => Sent::Refused,
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
    let gpu = GpuActor::<DrillKernel>::with_options(runtime, 0, options);
    let home = gpu.home().clone();
    let addr = Supervisor::start(move |_| gpu);

    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (ledger, addr) = (ledger.clone(), addr.clone());
        senders.push(actix_rt::spawn(async move {
            drill::run_sender(&ledger, s, n / u64::from(SENDERS), 1, 4, |w, ask| {
                send(addr.clone(), w, ask)
            })
            .await;
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    // Wind down: no more faults; a last ask is served by the current
    // incarnation (replays first), then the actor stops.
    injector.stop();
    drill::run_barrier(&ledger, SENDERS, |w| send(addr.clone(), w, true)).await;
    // With its last `Addr` gone the actor stops for good (no restart);
    // `stopped` terminates the slot on a helper thread: wait for it.
    drop(addr);
    let deadline = Instant::now() + DEADLINE;
    while !drill::all_ended(&home.history()) {
        assert!(
            Instant::now() < deadline,
            "the last incarnation never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = ledger.check(&home.history());
    eprintln!(
        "actix drill ({policy:?}, {n} messages): {report:?}, injected {}, fenced writes {}",
        injector.injected(),
        home.fenced_writes()
    );
    assert!(report.faults > 0, "the drill injected no fault");
}

#[actix_rt::test]
async fn drill_replay_policy() {
    run(PendingPolicy::Replay, 0x5eed_0011).await;
}

#[actix_rt::test]
async fn drill_fail_policy() {
    run(PendingPolicy::Fail, 0x5eed_0012).await;
}
