//! Runtime behaviour beyond the conformance list: launch errors, the
//! watchdog (with an injected clock), limits.

use bytemuck::{Pod, Zeroable};
use ringkernel::LayoutError;
use ringkernel::conformance::{self, ChannelWaiter, Echo, Probe};
use ringkernel::control::{FaultCode, LifecycleState};
use ringkernel::hlc::ManualClock;
use ringkernel::kernel::{BackendKind, CpuHandlers, Kernel, Message, Width};
use ringkernel::runtime::{AskError, LaunchError, LaunchOptions, Runtime, SlotEvent};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

struct NoCpu;
impl Kernel for NoCpu {
    type State = u64;
    const NAME: &'static str = "no-cpu";
}

struct Wide;
impl Kernel for Wide {
    type State = u64;
    const NAME: &'static str = "wide";
    const WIDTH: Width = Width::Block(4096);
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(CpuHandlers::<Self>::new())
    }
}

struct Twice;
impl Kernel for Twice {
    type State = u64;
    const NAME: &'static str = "twice";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new()
                .on::<Echo>(|_, _, _| Ok(()))
                .on::<Echo>(|_, _, _| Ok(())),
        )
    }
}

fn launch<K: Kernel>(
    rt: &Runtime,
    opts: &LaunchOptions,
) -> Result<ringkernel::runtime::GpuSlot<ChannelWaiter>, LaunchError> {
    rt.launch::<K, ChannelWaiter>(Zeroable::zeroed(), opts, |_| {})
}

#[test]
fn launch_errors_are_typed() {
    let rt = Runtime::new().unwrap();
    assert_eq!(
        launch::<NoCpu>(&rt, &LaunchOptions::default()).unwrap_err(),
        LaunchError::NoHandler {
            kernel: "no-cpu",
            backend: BackendKind::Cpu
        }
    );
    assert_eq!(
        launch::<Wide>(&rt, &LaunchOptions::default()).unwrap_err(),
        LaunchError::InvalidWidth(Width::Block(4096))
    );
    assert_eq!(
        launch::<Twice>(&rt, &LaunchOptions::default()).unwrap_err(),
        LaunchError::BadTypeId { type_id: 1 }
    );
    assert_eq!(
        launch::<Probe>(&rt, &LaunchOptions::default().h2k_capacity(100)).unwrap_err(),
        LaunchError::Layout(LayoutError::CapacityNotPowerOfTwo { capacity: 100 })
    );
    assert_eq!(
        launch::<Probe>(&rt, &LaunchOptions::default().slot_size(64)).unwrap_err(),
        LaunchError::SlotTooSmall { slot_size: 64 }
    );
    assert!(matches!(
        launch::<Probe>(&rt, &LaunchOptions::default().max_in_flight(0)).unwrap_err(),
        LaunchError::Layout(LayoutError::SlabCapacity { .. })
    ));
    assert_eq!(
        Runtime::builder()
            .backend(BackendKind::Cuda)
            .build()
            .unwrap_err(),
        LaunchError::NoHandler {
            kernel: "<runtime>",
            backend: BackendKind::Cuda
        }
    );
}

#[test]
fn slot_limit_is_enforced_and_freed() {
    let rt = Runtime::builder().max_slots(2).build().unwrap();
    let mut a = launch::<Probe>(&rt, &LaunchOptions::default()).unwrap();
    let _b = launch::<Probe>(&rt, &LaunchOptions::default()).unwrap();
    assert_eq!(
        launch::<Probe>(&rt, &LaunchOptions::default()).unwrap_err(),
        LaunchError::TooManySlots { max: 2 }
    );
    a.terminate(conformance::DEADLINE);
    drop(a);
    // The poller lets go of a terminated slot; then a new one fits.
    let deadline = std::time::Instant::now() + conformance::DEADLINE;
    loop {
        match launch::<Probe>(&rt, &LaunchOptions::default()) {
            Ok(_) => break,
            Err(LaunchError::TooManySlots { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

static GATE: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Block;
impl Message for Block {
    const TYPE_ID: u32 = 1;
    type Reply = u64;
}

struct Hang;
impl Kernel for Hang {
    type State = u64;
    const NAME: &'static str = "hang";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(CpuHandlers::<Self>::new().on::<Block>(|_, _, ctx| {
            while !GATE.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            ctx.reply(1);
            Ok(())
        }))
    }
}

/// The watchdog fires on a slot with pending work and no progress — and not
/// on an idle or deactivated one — measured on an injected clock.
#[test]
fn watchdog_fires_only_on_pending_work_without_progress() {
    let clock = Arc::new(ManualClock::new(1));
    let rt = Runtime::builder()
        .watchdog(Duration::from_secs(10))
        .watchdog_clock(clock.clone())
        .build()
        .unwrap();
    let (tx, events) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let mut idle = launch::<Probe>(&rt, &LaunchOptions::default()).unwrap();
    let mut parked = launch::<Probe>(&rt, &LaunchOptions::default().auto_activate(false)).unwrap();
    let mut hung = rt
        .launch::<Hang, ChannelWaiter>(0, &LaunchOptions::default(), move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .unwrap();
    let waiting = conformance::ask(&mut parked, Echo(1));
    let blocked = conformance::ask(&mut hung, Block);
    // Let every slot settle, then jump the clock past the limit repeatedly.
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..20 {
        clock.advance(Duration::from_secs(11));
        if let Ok(event) = events.recv_timeout(Duration::from_millis(300)) {
            let SlotEvent::Faulted(fault) = event else {
                panic!("{event:?}")
            };
            assert_eq!(fault.code, FaultCode::Watchdog);
            break;
        }
    }
    assert_eq!(
        hung.fault().map(|f| f.code),
        Some(FaultCode::Watchdog),
        "the hung slot was not detected"
    );
    assert!(matches!(blocked.wait(), Err(AskError::Faulted(_))));
    assert!(
        idle.is_open() && idle.fault().is_none(),
        "an idle slot must not fire"
    );
    assert!(
        parked.is_open() && parked.fault().is_none(),
        "a deactivated slot must not fire"
    );
    assert_eq!(parked.status().state, LifecycleState::Deactivated);
    parked.activate().unwrap();
    assert_eq!(waiting.wait().unwrap().decode::<u64>().unwrap(), 1);
    GATE.store(true, Ordering::Release);
    idle.terminate(conformance::DEADLINE);
    parked.terminate(conformance::DEADLINE);
    hung.terminate(conformance::DEADLINE);
}

/// Answers twice: once as asked, once more to the same (then stale)
/// correlation, and once to an id of another incarnation.
struct Stale;

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Twice2(u64);

impl Message for Twice2 {
    const TYPE_ID: u32 = 1;
    type Reply = u64;
}

impl Kernel for Stale {
    type State = u64;
    const NAME: &'static str = "stale";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new().on::<Twice2>(|_, Twice2(v), ctx| {
                if let Some(d) = ctx.defer() {
                    let raw = d.to_raw();
                    ctx.reply_to(d, v);
                    // Late: the waiter was just taken by the first reply.
                    ctx.reply_to(ringkernel::kernel::Deferred::<u64>::from_raw(raw, 1), v + 1);
                    // Foreign: the same slot index under another incarnation.
                    let foreign = raw[0] ^ (7 << 48);
                    ctx.reply_to(
                        ringkernel::kernel::Deferred::<u64>::from_raw([foreign, raw[1]], 1),
                        v + 2,
                    );
                }
                Ok(())
            }),
        )
    }
}

/// Replies to stale or unknown correlation ids are counted and dropped; the
/// caller gets the first reply only and the slot keeps serving.
#[test]
fn stale_and_foreign_replies_are_counted_not_delivered() {
    let rt = Runtime::new().unwrap();
    let mut slot = launch::<Stale>(&rt, &LaunchOptions::default()).unwrap();
    for i in 0..10u64 {
        let r = conformance::ask(&mut slot, Twice2(i)).wait().unwrap();
        assert_eq!(r.decode::<u64>(), Ok(i));
    }
    // The extra replies follow their ask's reply in K2H: the next ask's
    // reply comes after them, so by now all but the last two are counted.
    let deadline = std::time::Instant::now() + conformance::DEADLINE;
    while slot.late_replies() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "late replies not counted: {}",
            slot.late_replies()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(slot.late_replies(), 20);
    assert_eq!(slot.bad_replies(), 0);
    assert!(slot.is_open());
    slot.terminate(Duration::from_secs(5));
}

/// A handler that answers eight deferred asks at once, into a K2H ring of
/// four slots: the message commits only once all its replies are out, and
/// every caller gets its own reply.
#[test]
fn replies_beyond_k2h_room_are_all_delivered() {
    use ringkernel::conformance::{REVERSE_BATCH, Reverse, Reversed};
    let rt = Runtime::new().unwrap();
    let mut slot = launch::<Reverse>(&rt, &LaunchOptions::default().k2h_capacity(4)).unwrap();
    for round in 0..5u64 {
        let asks: Vec<_> = (0..REVERSE_BATCH as u64)
            .map(|i| {
                (
                    round * 100 + i,
                    conformance::ask(&mut slot, Reversed(round * 100 + i)),
                )
            })
            .collect();
        for (v, p) in asks {
            assert_eq!(p.wait().unwrap().decode::<u64>(), Ok(v * 10));
        }
    }
    assert_eq!(slot.status().processed, 5 * REVERSE_BATCH as u64);
    slot.terminate(Duration::from_secs(5));
}

/// A device backend whose loop acknowledges `Launched`, `Active`, and then
/// `Terminated` — without anyone asking: a misbehaving device.
struct LeavingBackend;

impl ringkernel::backend::DeviceBackend for LeavingBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Wgpu
    }

    fn launch(&self, slot: ringkernel::backend::DeviceSlot) -> Result<std::thread::Thread, String> {
        let t = std::thread::spawn(move || {
            let c = &slot.control;
            let incarnation = u32::from(slot.id.incarnation());
            c.ack(LifecycleState::Launched, incarnation);
            while c.requested_state() != Ok(LifecycleState::Active) {
                std::thread::sleep(Duration::from_millis(1));
            }
            c.ack(LifecycleState::Active, incarnation);
            (slot.wake_host)();
            // Leaves once an ask is waiting, without serving it.
            while slot.h2k.observer().is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
            c.ack(LifecycleState::Terminated, incarnation);
            (slot.wake_host)();
        });
        Ok(t.thread().clone())
    }
}

/// A device loop that leaves unasked fails its slot (`UnexpectedExit`):
/// the ask waiting in H2K resolves, the owner hears of the fault — nothing
/// hangs on a slot nobody serves (the watchdog watches only active slots).
#[test]
fn a_device_loop_that_leaves_unasked_faults_the_slot() {
    let rt = Runtime::builder()
        .device(Arc::new(LeavingBackend))
        .build()
        .unwrap();
    let (tx, events) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let mut slot = rt
        .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .unwrap();
    match conformance::ask(&mut slot, Echo(1)).wait() {
        Err(AskError::Faulted(f)) => {
            assert_eq!(f.code, FaultCode::UnexpectedExit);
            assert_eq!(f.detail, ringkernel::runtime::UNASKED_TERMINATED);
        }
        other => panic!("an ask to a loop that left: {other:?}"),
    }
    assert!(matches!(
        events.recv_timeout(conformance::DEADLINE),
        Ok(SlotEvent::Faulted(_))
    ));
}

/// Records the name of the thread that completed the ask.
struct ThreadWaiter(mpsc::SyncSender<(Option<String>, bool)>);

impl ringkernel::runtime::Waiter for ThreadWaiter {
    fn complete(self, outcome: Result<ringkernel::kernel::Reply, AskError>) {
        let name = std::thread::current().name().map(str::to_owned);
        let _ = self.0.send((name, outcome.is_ok()));
    }
}

/// On the cpu backend the slot's device thread delivers the replies it
/// publishes (when the poller is not reading its K2H just then): over a
/// run of sequential asks, most replies reach their callers from the
/// device thread, none from the caller's, and every one resolves.
#[test]
fn the_device_thread_delivers_its_own_replies() {
    let rt = Runtime::new().unwrap();
    let mut slot = rt
        .launch::<Probe, ThreadWaiter>(Zeroable::zeroed(), &LaunchOptions::default(), |_| {})
        .unwrap();
    let me = ringkernel::id::ActorId::cpu(rt.node(), 1);
    let (n, mut from_device, mut from_poller) = (200, 0, 0);
    for i in 0..n {
        let (tx, rx) = mpsc::sync_channel(1);
        slot.ask(Echo(i).into(), ThreadWaiter(tx), me)
            .unwrap_or_else(|_| panic!("ask {i} refused"));
        let (name, ok) = rx.recv_timeout(conformance::DEADLINE).expect("resolved");
        assert!(ok, "ask {i} failed");
        match name.as_deref() {
            Some(n) if n.starts_with("ringkernel-probe-") => from_device += 1,
            Some(n) if n.starts_with("ringkernel-poller-") => from_poller += 1,
            other => panic!("ask {i} completed on {other:?}"),
        }
    }
    assert_eq!(from_device + from_poller, n);
    assert!(
        from_device > n / 2,
        "the device thread delivered {from_device} of {n}"
    );
    slot.terminate(Duration::from_secs(5));
}
