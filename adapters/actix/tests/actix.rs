//! GPU actors through actix: the conformance behaviours through the
//! adapter, backpressure through a tiny ring, 16 concurrent callers, a
//! fault stopping the actor and the supervisor restarting it, and no caller
//! left hanging.

use actix::prelude::*;
use ringkernel::conformance::{
    Add, Echo, Explode, Probe, REVERSE_BATCH, Reverse, Reversed, Seq, SeqReport, Silent, Total,
};
use ringkernel::control::{FaultCode, LifecycleState};
use ringkernel::runtime::{AskError, LaunchOptions, Runtime};
use ringkernel_actix::{Activate, Ask, Deactivate, GpuActor, GpuError, Tell};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

#[actix_rt::test]
async fn conformance_through_the_adapter() {
    let addr = GpuActor::<Probe>::new(Runtime::new().unwrap(), Default::default()).start();
    assert_eq!(addr.send(Ask(Echo(3))).await.unwrap(), Ok(3));
    for v in 1..=10 {
        addr.do_send(Tell(Add(v)));
    }
    assert_eq!(addr.send(Ask(Total())).await.unwrap(), Ok(55));
    for i in 0..100_000u64 {
        addr.do_send(Tell(Seq(i)));
    }
    assert_eq!(addr.send(Ask(SeqReport())).await.unwrap(), Ok([100_000, 0]));
    assert_eq!(
        addr.send(Ask(Silent())).await.unwrap(),
        Err(GpuError::Ask(AskError::NoReply))
    );
}

#[actix_rt::test]
async fn unserved_types_are_refused() {
    let reverse = GpuActor::<Reverse>::new(Runtime::new().unwrap(), Default::default()).start();
    assert_eq!(
        reverse.send(Ask(Add(1))).await.unwrap(),
        Err(GpuError::UnknownType { type_id: 2 })
    );
    assert_eq!(
        reverse.send(Tell(Add(1))).await.unwrap(),
        Err(GpuError::UnknownType { type_id: 2 })
    );
}

/// A ring of 8 slots and 20 000 tells: the overflow and `ctx.wait` keep
/// every one, in order.
#[actix_rt::test]
async fn a_full_ring_holds_the_actor_in_order() {
    let addr = GpuActor::<Probe>::with_options(
        Runtime::new().unwrap(),
        Default::default(),
        LaunchOptions::default().h2k_capacity(8),
    )
    .start();
    for i in 0..20_000u64 {
        addr.do_send(Tell(Seq(i)));
    }
    let report = tokio::time::timeout(DEADLINE, addr.send(Ask(SeqReport())))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(report, Ok([20_000, 0]));
}

/// 16 concurrent callers against the reverse-order kernel: each gets its
/// own reply.
#[actix_rt::test]
async fn sixteen_concurrent_callers_each_get_their_own_reply() {
    let addr = GpuActor::<Reverse>::new(Runtime::new().unwrap(), Default::default()).start();
    assert_eq!(16 % REVERSE_BATCH, 0);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let callers: Vec<_> = (0..16u64)
        .map(|c| {
            let (addr, barrier) = (addr.clone(), barrier.clone());
            actix_rt::spawn(async move {
                for r in 0..100u64 {
                    barrier.wait().await;
                    let v = c * 1_000_000 + r;
                    assert_eq!(addr.send(Ask(Reversed(v))).await.unwrap(), Ok(v * 10));
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

/// A handler panic stops the actor; under `actix::Supervisor` it restarts
/// as a new slot and serves again. No caller hangs.
#[actix_rt::test]
async fn fault_restarts_under_a_supervisor() {
    let rt = Runtime::new().unwrap();
    let addr =
        actix::Supervisor::start(move |_| GpuActor::<Probe>::new(rt.clone(), Default::default()));
    assert_eq!(addr.send(Ask(Echo(1))).await.unwrap(), Ok(1));
    match addr.send(Ask(Explode())).await.unwrap() {
        Err(GpuError::Ask(AskError::Faulted(f))) => assert_eq!(f.code, FaultCode::HandlerPanic),
        other => panic!("expected a fault, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout(DEADLINE, addr.send(Ask(Echo(2))))
            .await
            .expect("a caller hung")
        {
            Ok(Ok(2)) => break,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await
            }
            other => panic!("the supervised actor did not come back: {other:?}"),
        }
    }
}

/// An ask to a stopped actor is an error, not a hang.
#[actix_rt::test]
async fn ask_after_stop_is_an_error() {
    let addr = GpuActor::<Probe>::new(Runtime::new().unwrap(), Default::default()).start();
    assert_eq!(addr.send(Ask(Echo(1))).await.unwrap(), Ok(1));
    // A kernel fault stops an unsupervised actor for good.
    let _ = addr.send(Ask(Explode())).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while addr.connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the faulted actor never stopped"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(addr.send(Ask(Echo(1))).await.is_err());
}

/// Deactivated: tells wait in H2K and an ask waits for activation; the
/// controller reaches the kernel even while a full ring holds the actor.
#[actix_rt::test]
async fn deactivate_then_activate_and_the_controller() {
    let actor = GpuActor::<Probe>::with_options(
        Runtime::new().unwrap(),
        Default::default(),
        LaunchOptions::default().h2k_capacity(8),
    );
    let controller = actor.controller();
    let addr = actor.start();
    assert_eq!(addr.send(Deactivate).await.unwrap(), Ok(()));
    // More tells than the ring holds: the actor waits on the full ring and
    // `Activate` through the mailbox would wait behind them.
    for i in 0..100u64 {
        addr.do_send(Tell(Seq(i)));
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while controller.h2k_depth().unwrap() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ring never filled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    controller.activate().unwrap();
    let report = tokio::time::timeout(DEADLINE, addr.send(Ask(SeqReport())))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(report, Ok([100, 0]));
    assert_eq!(addr.send(Activate).await.unwrap(), Ok(()));
}

/// An ordinary actix actor that records what the registry delivers.
struct Recorder(tokio::sync::mpsc::UnboundedSender<ringkernel::registry::Delivery>);

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<ringkernel_actix::Delivered> for Recorder {
    type Result = ();
    fn handle(&mut self, d: ringkernel_actix::Delivered, _: &mut Context<Self>) {
        let _ = self.0.send(d.0);
    }
}

/// One address space: a publish reaches a GPU actor and a CPU actor
/// through the registry; an unserved type is refused and handed back.
#[actix_rt::test]
async fn registry_publish_reaches_gpu_and_cpu_actors() {
    use ringkernel::id::ActorId;
    use ringkernel::kernel::Payload;
    use ringkernel::registry::DeliveryError;
    use ringkernel_actix::{CpuMailbox, GpuMailbox};
    use std::sync::Arc;

    let rt = Runtime::new().unwrap();
    let gpu_actor = GpuActor::<Probe>::new(rt.clone(), Default::default());
    let gpu_id = gpu_actor.home().id();
    let gpu = gpu_actor.start();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cpu = Recorder(tx).start();
    let cpu_id = ActorId::cpu(rt.node(), 1);
    let reg = rt.registry();
    reg.register(gpu_id, Arc::new(GpuMailbox::new(gpu.clone())));
    reg.register(cpu_id, Arc::new(CpuMailbox(cpu.recipient())));
    reg.subscribe("sums/+", gpu_id).unwrap();
    reg.subscribe("sums/#", cpu_id).unwrap();
    for v in 1..=10 {
        let r = reg.publish(cpu_id, "sums/a", Payload::new(Add(v))).unwrap();
        assert_eq!((r.delivered, r.refused.len()), (2, 0), "{r:?}");
    }
    assert_eq!(gpu.send(Ask(Total())).await.unwrap(), Ok(55));
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

/// A full ring holds the actor, so its mailbox fills: `try_send` then fails
/// in actix's shape, `SendError::Full`, handing the tell back; the
/// controller reaches the kernel past the full mailbox, and every tell
/// `try_send` accepted is served, in order.
#[actix_rt::test]
async fn try_send_to_a_full_mailbox_hands_the_message_back() {
    let actor = GpuActor::<Probe>::with_options(
        Runtime::new().unwrap(),
        Default::default(),
        LaunchOptions::default().h2k_capacity(8),
    )
    .mailbox_capacity(4);
    let controller = actor.controller();
    let addr = actor.start();
    assert_eq!(addr.send(Deactivate).await.unwrap(), Ok(()));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    // The request takes effect when the device loop next looks: until
    // then it may still serve what reaches the ring.
    while controller.current().unwrap().status().unwrap().state != LifecycleState::Deactivated {
        assert!(tokio::time::Instant::now() < deadline, "never deactivated");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (mut accepted, mut refused_in_a_row) = (0u64, 0);
    // Until the ring is full and the mailbox has stayed full for 20 tries
    // a millisecond apart.
    while refused_in_a_row < 20 || controller.h2k_depth() != Ok(8) {
        match addr.try_send(Tell(Seq(accepted))) {
            Ok(()) => {
                accepted += 1;
                refused_in_a_row = 0;
            }
            Err(SendError::Full(Tell(Seq(back)))) => {
                assert_eq!(back, accepted, "the refused tell is handed back");
                refused_in_a_row += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(SendError::Closed(_)) => panic!("the actor stopped"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mailbox never filled"
        );
    }
    // The ring's 8, the mailbox's 4 (not actix's default 16), and the one
    // in the overflow that holds the actor once it has taken it.
    assert!((12..=13).contains(&accepted), "{accepted} tells accepted");
    assert_eq!(controller.h2k_depth(), Ok(8));
    controller.activate().unwrap();
    let report = tokio::time::timeout(DEADLINE, addr.send(Ask(SeqReport())))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(report, Ok([accepted, 0]));
}
