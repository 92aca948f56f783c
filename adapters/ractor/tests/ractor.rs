//! GPU actors through ractor: the conformance behaviours through the
//! adapter, a supervision tree with CPU actors, concurrent callers, faults
//! seen by the supervisor, and no caller left hanging.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent, call, call_t, cast};
use ringkernel::conformance::{
    Add, Echo, Explode, Probe, REVERSE_BATCH, Reverse, Reversed, Seq, SeqReport, Silent, Total,
};
use ringkernel::control::LifecycleState;
use ringkernel::runtime::{AskError, CallError, LaunchOptions, Runtime};
use ringkernel_ractor::{GpuActor, GpuActorRef, GpuError, GpuMsg, TellError};
use std::time::Duration;
use tokio::sync::mpsc;

const DEADLINE: Duration = Duration::from_secs(20);

/// A supervisor that spawns one GPU actor of kernel `K` and reports every
/// supervision event it receives.
struct Supervisor;

enum SupMsg {
    Spawn(ractor::RpcReplyPort<ActorRef<GpuMsg>>),
}

struct SupArgs {
    runtime: Runtime,
    events: mpsc::UnboundedSender<String>,
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupArgs;
    type Arguments = SupArgs;

    async fn pre_start(
        &self,
        _: ActorRef<SupMsg>,
        args: SupArgs,
    ) -> Result<SupArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupMsg>,
        msg: SupMsg,
        state: &mut SupArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::Spawn(port) => {
                let (gpu, _) = Actor::spawn_linked(
                    None,
                    GpuActor::<Probe>::new(state.runtime.clone()),
                    Default::default(),
                    myself.get_cell(),
                )
                .await?;
                let _ = port.send(gpu);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        state: &mut SupArgs,
    ) -> Result<(), ActorProcessingErr> {
        let line = match evt {
            SupervisionEvent::ActorFailed(cell, err) => format!("failed {} {err}", cell.get_id()),
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                format!("terminated {}", cell.get_id())
            }
            SupervisionEvent::ActorStarted(cell) => format!("started {}", cell.get_id()),
            _ => "other".into(),
        };
        let _ = state.events.send(line);
        Ok(())
    }
}

async fn spawn_probe(rt: &Runtime) -> (GpuActorRef<Probe>, ractor::concurrency::JoinHandle<()>) {
    let (actor, handle) =
        Actor::spawn(None, GpuActor::<Probe>::new(rt.clone()), Default::default())
            .await
            .expect("spawn");
    (GpuActorRef::new(actor), handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_the_adapter() {
    let rt = Runtime::new().unwrap();
    let (gpu, handle) = spawn_probe(&rt).await;
    // ask (call!, call_t!, typed)
    let r = call!(gpu.actor(), GpuMsg::Ask, Echo(3).into())
        .unwrap()
        .unwrap();
    assert_eq!(r.decode::<u64>().unwrap(), 3);
    let r = call_t!(gpu.actor(), GpuMsg::Ask, 5000, Echo(4).into())
        .unwrap()
        .unwrap();
    assert_eq!(r.decode::<u64>().unwrap(), 4);
    assert_eq!(gpu.ask(Echo(5)).await.unwrap(), 5);
    // tell (cast!) and state kept
    for v in 1..=10 {
        cast!(gpu.actor(), GpuMsg::Tell(Add(v).into())).unwrap();
    }
    assert_eq!(gpu.ask(Total()).await.unwrap(), 55);
    // in-order delivery of 100 000 tells through the mailbox and the ring
    for i in 0..100_000u64 {
        gpu.tell(Seq(i)).unwrap();
    }
    assert_eq!(gpu.ask(SeqReport()).await.unwrap(), [100_000, 0]);
    // NoReply
    assert_eq!(
        gpu.ask(Silent()).await,
        Err(GpuError::Call(CallError::Ask(AskError::NoReply)))
    );
    // deactivate / activate: asks wait in H2K and are served on activation
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
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ask never reached H2K"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gpu.activate().await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 11);
    gpu.actor().stop(None);
    handle.await.unwrap();
    // ask after stop → an error, not a hang
    let after = tokio::time::timeout(DEADLINE, gpu.ask(Echo(1)))
        .await
        .expect("no hang");
    assert!(matches!(after, Err(GpuError::Rpc(_))), "{after:?}");
    assert!(matches!(
        gpu.tell(Echo(1)),
        Err(TellError::Stopped(Echo(1)))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_message_is_a_typed_error_with_the_message_back() {
    let rt = Runtime::new().unwrap();
    let (actor, handle) = Actor::spawn(None, GpuActor::<Reverse>::new(rt), Default::default())
        .await
        .unwrap();
    let gpu = GpuActorRef::<Reverse>::new(actor.clone());
    assert_eq!(
        gpu.ask(Add(1)).await,
        Err(GpuError::Call(CallError::UnknownType { type_id: 2 }))
    );
    assert_eq!(gpu.tell(Add(2)), Err(TellError::UnknownType(Add(2))));
    // Through raw call!, the actor answers with the typed error too.
    let r = call!(actor, GpuMsg::Ask, Add(2).into()).unwrap();
    assert_eq!(
        r,
        Err(GpuError::Call(CallError::UnknownType { type_id: 2 }))
    );
    actor.stop(None);
    handle.await.unwrap();
}

/// 16 concurrent callers against the reverse-order kernel: replies come
/// back in reverse order of arrival, yet each caller gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_callers_each_get_their_own_reply() {
    let rt = Runtime::new().unwrap();
    let (actor, handle) = Actor::spawn(None, GpuActor::<Reverse>::new(rt), Default::default())
        .await
        .unwrap();
    let gpu = GpuActorRef::<Reverse>::new(actor.clone());
    assert_eq!(16 % REVERSE_BATCH, 0);
    let rounds = 200u64;
    // Every round, all 16 ask at once (two full batches), so every batch fills.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let callers: Vec<_> = (0..16u64)
        .map(|c| {
            let (gpu, barrier) = (gpu.clone(), barrier.clone());
            tokio::spawn(async move {
                for r in 0..rounds {
                    barrier.wait().await;
                    let v = c * 1_000_000 + r;
                    assert_eq!(gpu.ask(Reversed(v)).await.unwrap(), v * 10);
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
    actor.stop(None);
    handle.await.unwrap();
}

/// A supervision tree of CPU actors and a GPU actor: CPU actors ask the GPU
/// actor; then a handler panic fails it, the supervisor receives
/// `ActorFailed`, and no caller is left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_sees_a_kernel_fault_and_no_caller_hangs() {
    let rt = Runtime::new().unwrap();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (sup, sup_handle) = Actor::spawn(
        None,
        Supervisor,
        SupArgs {
            runtime: rt.clone(),
            events: events_tx,
        },
    )
    .await
    .unwrap();
    let gpu_ref = call!(sup, SupMsg::Spawn).unwrap();
    let gpu = GpuActorRef::<Probe>::new(gpu_ref.clone());
    // CPU callers (tokio tasks standing in for CPU actors) keep asking.
    let callers: Vec<_> = (0..8u64)
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
    assert!(
        matches!(
            boom,
            Err(GpuError::Call(CallError::Ask(AskError::Faulted(_)))) | Err(GpuError::Rpc(_))
        ),
        "{boom:?}"
    );
    for c in callers {
        let served = tokio::time::timeout(DEADLINE, c)
            .await
            .expect("a caller hung")
            .unwrap();
        assert!(served > 0, "callers were served before the fault");
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let failed = loop {
        let line = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("no ActorFailed")
            .unwrap();
        if line.starts_with("failed") {
            break line;
        }
    };
    assert!(failed.contains(&gpu_ref.get_id().to_string()), "{failed}");
    assert!(failed.contains("HandlerPanic"), "{failed}");
    sup.stop(None);
    sup_handle.await.unwrap();
}

/// The backstop: a killed GPU actor (no `post_stop`) still resolves its
/// callers and frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_actor_resolves_its_callers() {
    let rt = Runtime::new().unwrap();
    let (actor, handle) = Actor::spawn(
        None,
        GpuActor::<Probe>::with_options(rt, LaunchOptions::default().auto_activate(false)),
        Default::default(),
    )
    .await
    .unwrap();
    let gpu = GpuActorRef::<Probe>::new(actor.clone());
    let waiting: Vec<_> = (0..4)
        .map(|i| {
            let gpu = gpu.clone();
            tokio::spawn(async move { gpu.ask(Echo(i)).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while gpu.status().await.unwrap().h2k_depth != 4 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    actor.kill();
    handle.await.unwrap();
    for w in waiting {
        let r = tokio::time::timeout(DEADLINE, w)
            .await
            .expect("a caller hung")
            .unwrap();
        assert!(r.is_err(), "{r:?}");
    }
}

/// Deactivated with more messages than its ring holds: the actor's handler
/// waits for space, `GpuMsg::Activate` would wait behind it in the mailbox,
/// and the controller (which bypasses the mailbox) still activates it; every
/// message is then processed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_activates_an_actor_held_by_a_full_ring() {
    let rt = Runtime::new().unwrap();
    let actor_def = GpuActor::<Probe>::with_options(
        rt,
        LaunchOptions::default()
            .h2k_capacity(8)
            .auto_activate(false),
    );
    let controller = actor_def.controller();
    let (actor, handle) = Actor::spawn(None, actor_def, Default::default())
        .await
        .unwrap();
    let gpu = GpuActorRef::<Probe>::new(actor.clone());
    for i in 0..100u64 {
        gpu.tell(Seq(i)).unwrap();
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
    let report = tokio::time::timeout(DEADLINE, gpu.ask(SeqReport()))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(report, [100, 0]);
    actor.stop(None);
    handle.await.unwrap();
}

/// Asks to a deactivated actor with a ring of 8: the ninth waits in the
/// handler for room (the mailbox behind it), the controller activates, and
/// every caller gets its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_wait_in_order_for_a_full_ring() {
    let rt = Runtime::new().unwrap();
    let actor_def = GpuActor::<Probe>::with_options(
        rt,
        LaunchOptions::default()
            .h2k_capacity(8)
            .auto_activate(false),
    );
    let controller = actor_def.controller();
    let (actor, handle) = Actor::spawn(None, actor_def, Default::default())
        .await
        .unwrap();
    let gpu = GpuActorRef::<Probe>::new(actor.clone());
    let callers: Vec<_> = (0..40u64)
        .map(|i| {
            let gpu = gpu.clone();
            tokio::spawn(async move { gpu.ask(Echo(i)).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while controller.h2k_depth().unwrap() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ring never filled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    controller.activate().unwrap();
    for (i, c) in callers.into_iter().enumerate() {
        let r = tokio::time::timeout(DEADLINE, c)
            .await
            .expect("a caller hung")
            .unwrap();
        assert_eq!(r.unwrap(), i as u64);
    }
    actor.stop(None);
    handle.await.unwrap();
}

/// A plain ractor actor that records what the registry delivers to it.
struct Recorder;

struct Recorded(ringkernel::registry::Delivery);

impl From<ringkernel::registry::Delivery> for Recorded {
    fn from(d: ringkernel::registry::Delivery) -> Self {
        Recorded(d)
    }
}

impl Actor for Recorder {
    type Msg = Recorded;
    type State = mpsc::UnboundedSender<ringkernel::registry::Delivery>;
    type Arguments = mpsc::UnboundedSender<ringkernel::registry::Delivery>;

    async fn pre_start(
        &self,
        _: ActorRef<Recorded>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _: ActorRef<Recorded>,
        Recorded(d): Recorded,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(d);
        Ok(())
    }
}

/// One address space: a publish reaches a GPU actor and a CPU actor
/// through the registry; a type the kernel does not serve is refused and
/// handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_publish_reaches_gpu_and_cpu_actors() {
    use ringkernel::id::ActorId;
    use ringkernel::kernel::Payload;
    use ringkernel::registry::DeliveryError;
    use ringkernel_ractor::{CpuMailbox, GpuMailbox};
    use std::sync::Arc;

    let rt = Runtime::new().unwrap();
    let gpu_actor = GpuActor::<Probe>::new(rt.clone());
    let gpu_id = gpu_actor.home().id();
    let (gpu, _) = Actor::spawn(None, gpu_actor, Default::default())
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (cpu, _) = Actor::spawn(None, Recorder, tx).await.unwrap();
    let cpu_id = ActorId::cpu(rt.node(), 1);
    let reg = rt.registry();
    reg.register(gpu_id, Arc::new(GpuMailbox::new::<Probe>(gpu.clone())));
    reg.register(cpu_id, Arc::new(CpuMailbox(cpu.clone())));
    reg.subscribe("sums/+", gpu_id).unwrap();
    reg.subscribe("sums/#", cpu_id).unwrap();
    for v in 1..=10 {
        let r = reg.publish(cpu_id, "sums/a", Payload::new(Add(v))).unwrap();
        assert_eq!((r.delivered, r.refused.len()), (2, 0));
    }
    // One level too deep for the GPU actor's pattern.
    let r = reg
        .publish(cpu_id, "sums/a/b", Payload::new(Add(1000)))
        .unwrap();
    assert_eq!(r.delivered, 1);
    let typed = GpuActorRef::<Probe>::new(gpu.clone());
    assert_eq!(typed.ask(Total()).await.unwrap(), 55);
    for _ in 0..11 {
        let d = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.src, cpu_id);
    }
    // A type the kernel does not serve: refused before it is sent, and
    // handed back.
    let unserved = Payload::from_parts(0x77, &[1]);
    let back = reg.send(cpu_id, gpu_id, unserved).unwrap_err();
    assert!(matches!(back, DeliveryError::Refused(d) if d.payload == unserved));
    gpu.stop(None);
    cpu.stop(None);
}

/// Tell: send `Add(v)` to the actor `to`.
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Pass {
    to: u64,
    v: u64,
}

impl ringkernel::kernel::Message for Pass {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

struct Passer;

impl ringkernel::kernel::Kernel for Passer {
    type State = u64;
    const NAME: &'static str = "passer";
    fn cpu_handlers() -> Option<ringkernel::kernel::CpuHandlers<Self>> {
        Some(
            ringkernel::kernel::CpuHandlers::new().on(|_: &mut u64, p: Pass, ctx| {
                ctx.send(ringkernel::id::ActorId::from_bits(p.to), Add(p.v));
                Ok(())
            }),
        )
    }
}

/// A kernel's handler sends to another GPU actor by id: the poller routes
/// it through the registry into that actor's ractor mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_sends_to_another_gpu_actor_by_id() {
    use ringkernel_ractor::GpuMailbox;
    use std::sync::Arc;

    let rt = Runtime::new().unwrap();
    let sum_actor = GpuActor::<Probe>::new(rt.clone());
    let sum_id = sum_actor.home().id();
    let (sum, _) = Actor::spawn(None, sum_actor, Default::default())
        .await
        .unwrap();
    rt.registry()
        .register(sum_id, Arc::new(GpuMailbox::new::<Probe>(sum.clone())));
    let (passer, _) = Actor::spawn(None, GpuActor::<Passer>::new(rt.clone()), 0)
        .await
        .unwrap();
    let passer = GpuActorRef::<Passer>::new(passer);
    for v in 1..=100 {
        passer
            .tell(Pass {
                to: sum_id.to_bits(),
                v,
            })
            .unwrap();
    }
    let total = GpuActorRef::<Probe>::new(sum.clone());
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if total.ask(Total()).await.unwrap() == 5050 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not all routed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(rt.dead_letters(), 0);
}
