//! GPU actors on the wgpu backend through the actix and kameo adapters,
//! unchanged: asks, tells, order, `NoReply`, and a kernel fault that the
//! framework's supervision restarts with no caller left hanging. On
//! lavapipe in CI (`RINGKERNEL_REQUIRE_WGPU=1`); skips with a reason
//! elsewhere.

mod common;
use common::*;
use ringkernel::conformance::{Add, Echo, Explode, Probe, Seq, SeqReport, Silent, Total};
use ringkernel::control::FaultCode;
use ringkernel::runtime::AskError;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

#[actix_rt::test]
async fn through_actix() {
    use actix::prelude::*;
    use ringkernel_actix::{Ask, GpuActor, GpuError, Tell};
    let Some(rt) = runtime() else { return };
    let addr = GpuActor::<Probe>::new(rt.clone(), Default::default()).start();
    assert_eq!(addr.send(Ask(Echo(3))).await.unwrap(), Ok(3));
    for v in 1..=10 {
        addr.do_send(Tell(Add(v)));
    }
    assert_eq!(addr.send(Ask(Total())).await.unwrap(), Ok(55));
    for i in 0..20_000u64 {
        addr.do_send(Tell(Seq(i)));
    }
    assert_eq!(addr.send(Ask(SeqReport())).await.unwrap(), Ok([20_000, 0]));
    assert_eq!(
        addr.send(Ask(Silent())).await.unwrap(),
        Err(GpuError::Ask(AskError::NoReply))
    );
    // A fault under actix's Supervisor: the next incarnation serves again.
    let sup =
        actix::Supervisor::start(move |_| GpuActor::<Probe>::new(rt.clone(), Default::default()));
    assert_eq!(sup.send(Ask(Echo(1))).await.unwrap(), Ok(1));
    match sup.send(Ask(Explode())).await.unwrap() {
        Err(GpuError::Ask(AskError::Faulted(f))) => assert_eq!(f.code, FaultCode::HandlerPanic),
        other => panic!("expected a fault, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout(DEADLINE, sup.send(Ask(Echo(2))))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_kameo() {
    use kameo::actor::Spawn;
    use kameo::error::SendError;
    use ringkernel_kameo::{Ask, GpuActor, GpuArgs, GpuError, Tell};
    let Some(rt) = runtime() else { return };
    let gpu = GpuActor::<Probe>::spawn(GpuArgs::new(rt, Default::default()));
    assert_eq!(gpu.ask(Ask(Echo(3))).await.unwrap(), 3);
    for v in 1..=10 {
        gpu.tell(Tell(Add(v))).await.unwrap();
    }
    assert_eq!(gpu.ask(Ask(Total())).await.unwrap(), 55);
    for i in 0..20_000u64 {
        gpu.tell(Tell(Seq(i))).await.unwrap();
    }
    assert_eq!(gpu.ask(Ask(SeqReport())).await.unwrap(), [20_000, 0]);
    match gpu.ask(Ask(Silent())).await {
        Err(SendError::HandlerError(GpuError::Ask(AskError::NoReply))) => {}
        other => panic!("expected NoReply, got {other:?}"),
    }
    // A kernel fault fails the ask with it and fails the actor.
    match gpu.ask(Ask(Explode())).await {
        Err(SendError::HandlerError(GpuError::Ask(AskError::Faulted(f)))) => {
            assert_eq!(f.code, FaultCode::HandlerPanic)
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    tokio::time::timeout(DEADLINE, gpu.wait_for_shutdown())
        .await
        .expect("the faulted actor stops");
}
