//! Kernels sending to other actors by id (`Ctx::send`): the poller routes
//! each message through the runtime's registry without ever waiting on a
//! mailbox; a full mailbox parks it in a bounded per-destination overflow;
//! what cannot be delivered is a dead letter. HLC stamps survive the hop.

use bytemuck::{Pod, Zeroable};
use ringkernel::conformance::{self, ChannelWaiter};
use ringkernel::control::FaultCode;
use ringkernel::home::{DeadLetter, DeadLetterReason, RouteFailure};
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, Kernel, Message};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::{GpuSlot, LaunchOptions, ROUTE_OVERFLOW, Runtime, SlotEvent};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Tell: send `count` `Value`s, `first..first + count`, to `to`.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Forward {
    to: u64,
    first: u64,
    count: u64,
}

impl Message for Forward {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

/// What the relay sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Value(u64);

impl Message for Value {
    const TYPE_ID: u32 = 2;
    type Reply = ();
}

/// Ask: answered once everything before it was sent.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Sync;

impl Message for Sync {
    const TYPE_ID: u32 = 3;
    type Reply = u64;
}

/// Ask: send `Value`s like `Forward`, then reply with how many.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct ForwardAsk {
    to: u64,
    count: u64,
}

impl Message for ForwardAsk {
    const TYPE_ID: u32 = 4;
    type Reply = u64;
}

struct Relay;

impl Kernel for Relay {
    type State = u64;
    const NAME: &'static str = "relay";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|sent: &mut u64, f: Forward, ctx| {
                    for v in f.first..f.first + f.count {
                        ctx.send(ActorId::from_bits(f.to), Value(v));
                        *sent += 1;
                    }
                    Ok(())
                })
                .on(|sent: &mut u64, _: Sync, ctx| {
                    ctx.reply(*sent);
                    Ok(())
                })
                .on(|sent: &mut u64, f: ForwardAsk, ctx| {
                    for v in 0..f.count {
                        ctx.send(ActorId::from_bits(f.to), Value(v));
                        *sent += 1;
                    }
                    ctx.reply(f.count);
                    Ok(())
                }),
        )
    }
}

/// A mailbox that records, and refuses (`Full`) while `full` is set.
#[derive(Default)]
struct Sink {
    got: Mutex<Vec<Delivery>>,
    full: AtomicBool,
}

impl Mailbox for Sink {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        if self.full.load(Ordering::Acquire) {
            return Err(DeliveryError::Full(d));
        }
        self.got.lock().unwrap().push(d);
        Ok(())
    }
}

fn relay(rt: &Runtime) -> GpuSlot<ChannelWaiter> {
    rt.launch::<Relay, ChannelWaiter>(0, &LaunchOptions::default(), |_| {})
        .unwrap()
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + conformance::DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn values(sink: &Sink) -> Vec<u64> {
    sink.got
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.payload.get::<Value>().unwrap().0)
        .collect()
}

#[test]
fn a_kernel_reaches_a_cpu_actor_in_order_with_increasing_stamps() {
    let rt = Runtime::new().unwrap();
    let mut slot = relay(&rt);
    let sink = Arc::new(Sink::default());
    let cpu = ActorId::cpu(0, 1);
    rt.registry().register(cpu, sink.clone());
    let n = 20_000u64;
    for first in (0..n).step_by(100) {
        conformance::tell(
            &mut slot,
            Forward {
                to: cpu.to_bits(),
                first,
                count: 100,
            },
        );
    }
    assert_eq!(
        conformance::ask(&mut slot, Sync)
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(n)
    );
    wait_for("every value delivered", || {
        sink.got.lock().unwrap().len() as u64 == n
    });
    assert_eq!(values(&sink), (0..n).collect::<Vec<_>>(), "per-edge FIFO");
    let got = sink.got.lock().unwrap();
    assert!(got.iter().all(|d| d.src == slot.id() && d.dst == cpu));
    assert!(
        got.windows(2).all(|w| w[0].stamp.hlc < w[1].stamp.hlc),
        "stamps strictly increase along the edge"
    );
    assert_eq!(rt.dead_letters(), 0);
    drop(got);
    slot.terminate(Duration::from_secs(5));
}

#[test]
fn a_full_mailbox_parks_deliveries_in_order_and_bounds_them() {
    let letters = Arc::new(Mutex::new(Vec::<DeadLetter>::new()));
    let l = letters.clone();
    let rt = Runtime::builder()
        .dead_letters(move |d| l.lock().unwrap().push(d))
        .build()
        .unwrap();
    let mut slot = relay(&rt);
    let sink = Arc::new(Sink::default());
    sink.full.store(true, Ordering::Release);
    let cpu = ActorId::cpu(0, 7);
    rt.registry().register(cpu, sink.clone());
    let extra = 50;
    let n = ROUTE_OVERFLOW as u64 + extra;
    for first in (0..n).step_by(50) {
        conformance::tell(
            &mut slot,
            Forward {
                to: cpu.to_bits(),
                first,
                count: 50.min(n - first),
            },
        );
    }
    assert_eq!(
        conformance::ask(&mut slot, Sync)
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(n)
    );
    // Beyond the bound: counted dead letters, the newest ones.
    wait_for("overflow dead letters", || {
        letters.lock().unwrap().len() as u64 == extra
    });
    {
        let letters = letters.lock().unwrap();
        assert!(
            letters
                .iter()
                .all(|l| l.reason == DeadLetterReason::Unroutable(RouteFailure::Overflow))
        );
        let dead: Vec<u64> = letters
            .iter()
            .map(|l| l.payload.get::<Value>().unwrap().0)
            .collect();
        assert_eq!(dead, (ROUTE_OVERFLOW as u64..n).collect::<Vec<_>>());
    }
    // The mailbox takes again: the parked ones arrive, in order.
    sink.full.store(false, Ordering::Release);
    wait_for("parked deliveries", || {
        sink.got.lock().unwrap().len() == ROUTE_OVERFLOW
    });
    assert_eq!(
        values(&sink),
        (0..ROUTE_OVERFLOW as u64).collect::<Vec<_>>()
    );
    slot.terminate(Duration::from_secs(5));
}

#[test]
fn an_unknown_destination_is_a_dead_letter() {
    let letters = Arc::new(Mutex::new(Vec::<DeadLetter>::new()));
    let l = letters.clone();
    let rt = Runtime::builder()
        .dead_letters(move |d| l.lock().unwrap().push(d))
        .build()
        .unwrap();
    let mut slot = relay(&rt);
    let nobody = ActorId::cpu(0, 99);
    conformance::tell(
        &mut slot,
        Forward {
            to: nobody.to_bits(),
            first: 5,
            count: 1,
        },
    );
    wait_for("dead letter", || !letters.lock().unwrap().is_empty());
    let l = letters.lock().unwrap()[0];
    assert_eq!(
        l.reason,
        DeadLetterReason::Unroutable(RouteFailure::UnknownActor)
    );
    assert_eq!(
        (l.actor, l.src, l.payload.get::<Value>()),
        (nobody, slot.id(), Some(Value(5)))
    );
    slot.terminate(Duration::from_secs(5));
}

#[test]
fn a_handler_that_sends_without_bound_faults_instead_of_losing_messages() {
    let rt = Runtime::new().unwrap();
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let mut slot = rt
        .launch::<Relay, ChannelWaiter>(0, &LaunchOptions::default(), move |e| {
            let _ = tx.lock().unwrap().send(e);
        })
        .unwrap();
    let sink = Arc::new(Sink::default());
    let cpu = ActorId::cpu(0, 3);
    rt.registry().register(cpu, sink.clone());
    conformance::tell(
        &mut slot,
        Forward {
            to: cpu.to_bits(),
            first: 0,
            count: 10_000,
        },
    );
    let fault = match rx.recv_timeout(conformance::DEADLINE).unwrap() {
        SlotEvent::Faulted(f) => f,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (fault.code, fault.detail),
        (FaultCode::HandlerFault, ringkernel::kernel::TOO_MANY_SENDS)
    );
    // The faulting handler's sends never left, and the slot is closed.
    assert!(sink.got.lock().unwrap().is_empty());
    wait_for("the slot closes", || !slot.is_open());
}

/// Sends do not count against the bound of replies in flight: with a
/// waiter slab of 4, a handler that sends 200 messages still replies.
#[test]
fn many_sends_then_a_reply_with_a_small_in_flight_limit() {
    let rt = Runtime::new().unwrap();
    let mut slot = rt
        .launch::<Relay, ChannelWaiter>(0, &LaunchOptions::default().max_in_flight(4), |_| {})
        .unwrap();
    let sink = Arc::new(Sink::default());
    let cpu = ActorId::cpu(0, 5);
    rt.registry().register(cpu, sink.clone());
    for round in 1..=3u64 {
        let got = conformance::ask(
            &mut slot,
            ForwardAsk {
                to: cpu.to_bits(),
                count: 200,
            },
        )
        .wait();
        assert_eq!(got.unwrap().decode::<u64>(), Ok(200));
        wait_for("sends delivered", || {
            sink.got.lock().unwrap().len() as u64 == 200 * round
        });
    }
    slot.terminate(Duration::from_secs(5));
}
