//! GPU actors on the wgpu backend through the ractor adapter, unchanged:
//! `call!`/`cast!`, state kept, in-order delivery, `NoReply`,
//! deactivation, and a fault seen by the supervisor with no caller left
//! hanging. On lavapipe in CI (`RINGKERNEL_REQUIRE_WGPU=1`); skips with a
//! reason elsewhere.

mod common;
use common::*;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent, call, cast};
use ringkernel::conformance::{Add, Echo, Explode, Probe, Seq, SeqReport, Silent, Total};
use ringkernel::control::LifecycleState;
use ringkernel::runtime::{AskError, CallError, Runtime};
use ringkernel_ractor::{GpuActor, GpuActorRef, GpuError, GpuMsg};
use std::time::Duration;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wgpu_actor_behaves_as_any_ractor_actor() {
    let Some(rt) = runtime() else { return };
    let (actor, handle) =
        Actor::spawn(None, GpuActor::<Probe>::new(rt.clone()), Default::default())
            .await
            .unwrap();
    let gpu = GpuActorRef::<Probe>::new(actor.clone());
    let r = call!(actor, GpuMsg::Ask, Echo(3).into()).unwrap().unwrap();
    assert_eq!(r.decode::<u64>().unwrap(), 3);
    for v in 1..=10 {
        cast!(actor, GpuMsg::Tell(Add(v).into())).unwrap();
    }
    assert_eq!(gpu.ask(Total()).await.unwrap(), 55);
    for i in 0..20_000u64 {
        gpu.tell(Seq(i)).unwrap();
    }
    assert_eq!(gpu.ask(SeqReport()).await.unwrap(), [20_000, 0]);
    assert_eq!(
        gpu.ask(Silent()).await,
        Err(GpuError::Call(CallError::Ask(AskError::NoReply)))
    );
    gpu.deactivate().await.unwrap();
    // Acknowledged before the ask: a loop that read `Active` just before
    // would otherwise still serve it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while gpu.status().await.unwrap().state != LifecycleState::Deactivated {
        assert!(tokio::time::Instant::now() < deadline, "never deactivated");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let waiting = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.ask(Echo(11)).await }
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while gpu.status().await.unwrap().h2k_depth != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gpu.activate().await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 11);
    actor.stop(None);
    handle.await.unwrap();
}

struct Supervisor;

impl Actor for Supervisor {
    type Msg = ();
    type State = mpsc::UnboundedSender<String>;
    type Arguments = (
        Runtime,
        mpsc::UnboundedSender<String>,
        mpsc::UnboundedSender<ActorRef<GpuMsg>>,
    );

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        (rt, events, spawned): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (gpu, _) = Actor::spawn_linked(
            None,
            GpuActor::<Probe>::new(rt),
            Default::default(),
            myself.get_cell(),
        )
        .await?;
        let _ = spawned.send(gpu);
        Ok(events)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        evt: SupervisionEvent,
        events: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = evt {
            let _ = events.send(err.to_string());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wgpu_kernel_fault_reaches_the_supervisor_and_no_caller_hangs() {
    let Some(rt) = runtime() else { return };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (spawned_tx, mut spawned) = mpsc::unbounded_channel();
    let (sup, sup_handle) = Actor::spawn(None, Supervisor, (rt, events_tx, spawned_tx))
        .await
        .unwrap();
    let gpu = GpuActorRef::<Probe>::new(spawned.recv().await.unwrap());
    let callers: Vec<_> = (0..4u64)
        .map(|c| {
            let gpu = gpu.clone();
            tokio::spawn(async move {
                let mut ok = 0u64;
                for i in 0.. {
                    match gpu.ask(Echo(c * 1000 + i)).await {
                        Ok(v) => {
                            assert_eq!(v, c * 1000 + i);
                            ok += 1;
                        }
                        Err(_) => return ok,
                    }
                }
                ok
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let boom = gpu.ask(Explode()).await;
    assert!(boom.is_err(), "{boom:?}");
    for c in callers {
        let served = tokio::time::timeout(DEADLINE, c)
            .await
            .expect("a caller hung")
            .unwrap();
        assert!(served > 0);
    }
    let failed = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("no ActorFailed")
        .unwrap();
    assert!(failed.contains("HandlerPanic"), "{failed}");
    sup.stop(None);
    sup_handle.await.unwrap();
}
