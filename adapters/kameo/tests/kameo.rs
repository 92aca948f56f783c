//! GPU actors through kameo: the conformance behaviours through the
//! adapter, 16 concurrent callers, a fault failing the actor (seen by a
//! linked actor, which restarts it), and no caller left hanging.

use kameo::Actor;
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::error::{ActorStopReason, SendError};
use kameo::prelude::*;
use ringkernel::conformance::{
    Add, Echo, Explode, Nap, Probe, REVERSE_BATCH, Reverse, Reversed, Seq, SeqReport, Silent, Total,
};
use ringkernel::control::LifecycleState;
use ringkernel::runtime::{AskError, LaunchOptions, Runtime};
use ringkernel_kameo::{
    Activate, Ask, Deactivate, GpuActor, GpuArgs, GpuController, GpuError, Tell,
};
use std::ops::ControlFlow;
use std::time::Duration;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);

fn handler_error<M, E: Clone>(e: SendError<M, E>) -> Option<E> {
    match e {
        SendError::HandlerError(e) => Some(e),
        _ => None,
    }
}

/// Waits until the kernel acknowledges `Deactivated`. The request takes
/// effect when the device loop next looks; a loop that read `Active` just
/// before would otherwise still serve what reaches it.
async fn deactivated(controller: &GpuController) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while controller.current().unwrap().status().unwrap().state != LifecycleState::Deactivated {
        assert!(tokio::time::Instant::now() < deadline, "never deactivated");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_the_adapter() {
    let gpu = GpuActor::<Probe>::spawn(GpuArgs::new(Runtime::new().unwrap(), Default::default()));
    assert_eq!(gpu.ask(Ask(Echo(3))).await.unwrap(), 3);
    for v in 1..=10 {
        gpu.tell(Tell(Add(v))).await.unwrap();
    }
    assert_eq!(gpu.ask(Ask(Total())).await.unwrap(), 55);
    for i in 0..100_000u64 {
        gpu.tell(Tell(Seq(i))).await.unwrap();
    }
    assert_eq!(gpu.ask(Ask(SeqReport())).await.unwrap(), [100_000, 0]);
    let err = gpu.ask(Ask(Silent())).await.unwrap_err();
    assert_eq!(handler_error(err), Some(GpuError::Ask(AskError::NoReply)));
    // Unserved types: typed errors in kameo's own shape.
    let reverse =
        GpuActor::<Reverse>::spawn(GpuArgs::new(Runtime::new().unwrap(), Default::default()));
    let err = reverse.ask(Ask(Add(1))).await.unwrap_err();
    assert_eq!(
        handler_error(err),
        Some(GpuError::UnknownType { type_id: 2 })
    );
    gpu.stop_gracefully().await.unwrap();
    gpu.wait_for_shutdown().await;
    // After stop: an error, not a hang.
    let after = tokio::time::timeout(DEADLINE, gpu.ask(Ask(Echo(1))))
        .await
        .expect("no hang");
    assert!(after.is_err());
}

/// A small ring with a bounded kameo mailbox: backpressure holds the
/// handler, and every tell arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ring_backs_up_the_mailbox_in_order() {
    let args = GpuArgs::<Probe>::new(Runtime::new().unwrap(), Default::default())
        .options(LaunchOptions::default().h2k_capacity(8));
    let gpu = GpuActor::<Probe>::spawn_with_mailbox(args, kameo::mailbox::bounded(16));
    for i in 0..20_000u64 {
        gpu.tell(Tell(Seq(i))).await.unwrap();
    }
    let report = tokio::time::timeout(DEADLINE, gpu.ask(Ask(SeqReport())))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(report, [20_000, 0]);
}

/// Concurrent asks through a ring of 2 to a slow handler (`Nap`: 1 ms):
/// the handler waits for room (the mailbox behind it) whenever the ring is
/// full, and each caller still gets its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_through_a_full_ring_each_get_their_own_reply() {
    let args = GpuArgs::<Probe>::new(Runtime::new().unwrap(), Default::default())
        .options(LaunchOptions::default().h2k_capacity(2));
    let gpu = GpuActor::<Probe>::spawn_with_mailbox(args, kameo::mailbox::bounded(64));
    let callers: Vec<_> = (0..16u64)
        .map(|c| {
            let gpu = gpu.clone();
            tokio::spawn(async move {
                let mut naps = Vec::new();
                for r in 0..4u64 {
                    naps.push(gpu.ask(Ask(Nap(1))).await.unwrap());
                    let v = c * 1_000_000 + r;
                    assert_eq!(gpu.ask(Ask(Echo(v))).await.unwrap(), v);
                }
                naps
            })
        })
        .collect();
    let mut naps = Vec::new();
    for c in callers {
        naps.extend(
            tokio::time::timeout(DEADLINE * 3, c)
                .await
                .expect("a caller hung")
                .unwrap(),
        );
    }
    // The handler counts its naps: each of the 64 replies is a different
    // count, so none went to another caller.
    naps.sort_unstable();
    assert_eq!(naps, (1..=64).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_callers_each_get_their_own_reply() {
    let gpu = GpuActor::<Reverse>::spawn(GpuArgs::new(Runtime::new().unwrap(), Default::default()));
    assert_eq!(16 % REVERSE_BATCH, 0);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let callers: Vec<_> = (0..16u64)
        .map(|c| {
            let (gpu, barrier) = (gpu.clone(), barrier.clone());
            tokio::spawn(async move {
                for r in 0..100u64 {
                    barrier.wait().await;
                    let v = c * 1_000_000 + r;
                    assert_eq!(gpu.ask(Ask(Reversed(v))).await.unwrap(), v * 10);
                }
            })
        })
        .collect();
    for c in callers {
        tokio::time::timeout(DEADLINE * 3, c)
            .await
            .expect("a caller hung")
            .unwrap();
    }
}

/// A supervisor linked to the GPU actor: on its death it reports and spawns
/// a new one.
struct Supervisor {
    runtime: Runtime,
    events: mpsc::UnboundedSender<(String, ActorRef<GpuActor<Probe>>)>,
}

impl Actor for Supervisor {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(args: Self, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(args)
    }

    async fn on_link_died(
        &mut self,
        me: WeakActorRef<Self>,
        _: ActorId,
        reason: ActorStopReason,
    ) -> Result<ControlFlow<ActorStopReason>, Self::Error> {
        let fresh =
            GpuActor::<Probe>::spawn(GpuArgs::new(self.runtime.clone(), Default::default()));
        if let Some(me) = me.upgrade() {
            fresh.link(&me).await;
        }
        let _ = self.events.send((format!("{reason:?}"), fresh));
        Ok(ControlFlow::Continue(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_fails_the_actor_and_the_linked_supervisor_restarts_it() {
    let rt = Runtime::new().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sup = Supervisor::spawn(Supervisor {
        runtime: rt.clone(),
        events: tx,
    });
    let gpu = GpuActor::<Probe>::spawn(GpuArgs::new(rt, Default::default()));
    gpu.link(&sup).await;
    assert_eq!(gpu.ask(Ask(Echo(1))).await.unwrap(), 1);
    let boom = tokio::time::timeout(DEADLINE, gpu.ask(Ask(Explode())))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(matches!(
        handler_error(boom),
        Some(GpuError::Ask(AskError::Faulted(_)))
    ));
    let (reason, fresh) = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("link died")
        .unwrap();
    assert!(
        reason.contains("HandlerPanic") || reason.contains("Panicked"),
        "{reason}"
    );
    assert_eq!(
        fresh.ask(Ask(Echo(2))).await.unwrap(),
        2,
        "the restarted actor serves"
    );
}

/// Deactivated: tells wait in H2K and an ask waits for activation; then
/// every message is served, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivate_then_activate() {
    let args = GpuArgs::<Probe>::new(Runtime::new().unwrap(), Default::default());
    let controller = args.controller();
    let gpu = GpuActor::<Probe>::spawn(args);
    gpu.ask(Deactivate).await.unwrap();
    deactivated(&controller).await;
    for i in 0..100u64 {
        gpu.tell(Tell(Seq(i))).await.unwrap();
    }
    let waiting = {
        let gpu = gpu.clone();
        tokio::spawn(async move { gpu.ask(Ask(SeqReport())).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "served while deactivated");
    gpu.ask(Activate).await.unwrap();
    let report = tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap();
    assert_eq!(report, [100, 0]);
}

/// An ordinary kameo actor that records what the registry delivers.
struct Recorder(mpsc::UnboundedSender<ringkernel::registry::Delivery>);

impl Actor for Recorder {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(args: Self, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(args)
    }
}

impl Message<ringkernel_kameo::Delivered> for Recorder {
    type Reply = ();

    async fn handle(&mut self, d: ringkernel_kameo::Delivered, _: &mut Context<Self, ()>) {
        let _ = self.0.send(d.0);
    }
}

/// One address space: a publish reaches a GPU actor and a CPU actor
/// through the registry; an unserved type is refused and handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_publish_reaches_gpu_and_cpu_actors() {
    use ringkernel::id::ActorId;
    use ringkernel::kernel::Payload;
    use ringkernel::registry::DeliveryError;
    use ringkernel_kameo::{CpuMailbox, GpuMailbox};
    use std::sync::Arc;

    let rt = Runtime::new().unwrap();
    let args = GpuArgs::<Probe>::new(rt.clone(), Default::default());
    let gpu_id = args.home().id();
    let gpu = GpuActor::<Probe>::spawn(args);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cpu = Recorder::spawn(Recorder(tx));
    let cpu_id = ActorId::cpu(rt.node(), 1);
    let reg = rt.registry();
    reg.register(gpu_id, Arc::new(GpuMailbox::new(gpu.clone())));
    reg.register(cpu_id, Arc::new(CpuMailbox(cpu.clone())));
    reg.subscribe("sums/+", gpu_id).unwrap();
    reg.subscribe("sums/#", cpu_id).unwrap();
    for v in 1..=10 {
        let r = reg.publish(cpu_id, "sums/a", Payload::new(Add(v))).unwrap();
        assert_eq!((r.delivered, r.refused.len()), (2, 0), "{r:?}");
    }
    assert_eq!(gpu.ask(Ask(Total())).await.unwrap(), 55);
    for _ in 0..10 {
        let d = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.src, cpu_id);
    }
    let unserved = Payload::from_parts(0x77, &[1]);
    let back = reg.send(cpu_id, gpu_id, unserved).unwrap_err();
    assert!(matches!(back, DeliveryError::Refused(d) if d.payload == unserved));
}

/// A full ring holds the handler, so kameo's bounded mailbox fills:
/// `try_send` then fails in kameo's shape, `SendError::MailboxFull`, handing
/// the tell back; the controller reaches the kernel past the full mailbox,
/// and every tell `try_send` accepted is served, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_send_to_a_full_mailbox_hands_the_message_back() {
    let args = GpuArgs::<Probe>::new(Runtime::new().unwrap(), Default::default())
        .options(LaunchOptions::default().h2k_capacity(8));
    let controller = args.controller();
    assert_eq!(controller.activate(), Err(GpuError::Closed), "not started");
    let gpu = GpuActor::<Probe>::spawn_with_mailbox(args, kameo::mailbox::bounded(4));
    gpu.ask(Deactivate).await.unwrap();
    deactivated(&controller).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (mut accepted, mut refused_in_a_row) = (0u64, 0);
    // Until the ring is full and the mailbox has stayed full for 20 tries
    // a millisecond apart.
    while refused_in_a_row < 20 || controller.h2k_depth() != Ok(8) {
        match gpu.tell(Tell(Seq(accepted))).try_send() {
            Ok(()) => {
                accepted += 1;
                refused_in_a_row = 0;
            }
            Err(SendError::MailboxFull(Tell(Seq(back)))) => {
                assert_eq!(back, accepted, "the refused tell is handed back");
                refused_in_a_row += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => panic!("unexpected: {e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mailbox never filled"
        );
    }
    // The ring's 8, the mailbox's 4, and the one the handler holds waiting
    // for room once it has taken it.
    assert!((12..=13).contains(&accepted), "{accepted} tells accepted");
    assert_eq!(controller.h2k_depth(), Ok(8));
    controller.activate().unwrap();
    let report = tokio::time::timeout(DEADLINE, gpu.ask(Ask(SeqReport())))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(report, [accepted, 0]);
}
