//! K2K links: a kernel's sends to a linked GPU actor go slot to slot, in
//! order, with no host thread on the path; a full ring keeps an outbox and
//! pushes back; cycles are refused at connect time unless an edge reports
//! failures; a receiver's restart carries on where it left off; closing
//! either end loses nothing silently.

use bytemuck::{Pod, Zeroable};
use ringkernel::conformance::{self, ChannelWaiter};
use ringkernel::control::LifecycleState;
use ringkernel::home::{DeadLetter, DeadLetterReason, PendingPolicy, RouteFailure};
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, HandlerError, Kernel, Message};
use ringkernel::link::{ConnectError, LinkOptions};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime, SlotEvent};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Tell: send `Value`s `first..first + count` to `to`.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Value(u64);

impl Message for Value {
    const TYPE_ID: u32 = 2;
    type Reply = ();
}

/// Ask: the receiver's tally.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Tally;

impl Message for Tally {
    const TYPE_ID: u32 = 3;
    type Reply = Counts;
}

/// Tell over K2K: the receiver's handler fails on it.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Poison;

impl Message for Poison {
    const TYPE_ID: u32 = 4;
    type Reply = ();
}

/// Tell: send one `Poison` to `to`.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct SendPoison {
    to: u64,
}

impl Message for SendPoison {
    const TYPE_ID: u32 = 5;
    type Reply = ();
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Counts {
    /// Values received.
    received: u64,
    /// The next value expected (values arrive as 0, 1, 2, ...).
    next: u64,
    /// Values that were not the one expected.
    out_of_order: u64,
    /// Receipts whose send stamp was not below the receipt stamp, or whose
    /// receipt stamp did not increase.
    bad_stamps: u64,
    last_stamp: u64,
    /// Where the tally forwards each value (0: nowhere).
    forward_to: u64,
}

/// Sends and receives: `Forward` makes `Value`s; `Value`s are counted in
/// order (and forwarded on, if `forward_to` is set).
struct Node;

impl Kernel for Node {
    type State = Counts;
    const NAME: &'static str = "k2k-node";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|_: &mut Counts, f: Forward, ctx| {
                    for v in f.first..f.first + f.count {
                        ctx.send(ActorId::from_bits(f.to), Value(v));
                    }
                    Ok(())
                })
                .on(|c: &mut Counts, v: Value, ctx| {
                    c.received += 1;
                    if v.0 != c.next {
                        c.out_of_order += 1;
                    }
                    c.next = v.0 + 1;
                    let at = ctx.stamp().hlc;
                    if ctx.sent_stamp() >= at || at <= c.last_stamp {
                        c.bad_stamps += 1;
                    }
                    c.last_stamp = at;
                    if c.forward_to != 0 {
                        ctx.send(ActorId::from_bits(c.forward_to), v);
                    }
                    Ok(())
                })
                .on(|c: &mut Counts, _: Tally, ctx| {
                    ctx.reply(*c);
                    Ok(())
                })
                .on(|_: &mut Counts, _: Poison, _| Err(HandlerError(7)))
                .on(|_: &mut Counts, p: SendPoison, ctx| {
                    ctx.send(ActorId::from_bits(p.to), Poison);
                    Ok(())
                }),
        )
    }
}

fn node(rt: &Runtime, state: Counts, opts: &LaunchOptions) -> GpuSlot<ChannelWaiter> {
    rt.launch::<Node, ChannelWaiter>(state, opts, |_| {})
        .unwrap()
}

fn tally(slot: &mut GpuSlot<ChannelWaiter>) -> Counts {
    conformance::ask(slot, Tally)
        .wait()
        .unwrap()
        .decode::<Counts>()
        .unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + conformance::DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `n` values from `from` to `to`, `MAX_SENDS` per message.
fn forward(from: &mut GpuSlot<ChannelWaiter>, to: ActorId, first: u64, n: u64) {
    let per = ringkernel::kernel::MAX_SENDS as u64;
    let mut at = first;
    while at < first + n {
        let count = per.min(first + n - at);
        conformance::tell(
            from,
            Forward {
                to: to.to_bits(),
                first: at,
                count,
            },
        );
        at += count;
    }
}

fn k2k_messages() -> u64 {
    std::env::var("RINGKERNEL_K2K_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

#[test]
fn a_million_messages_between_two_kernels_never_touch_the_poller() {
    let rt = Runtime::new().unwrap();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let mut b = node(&rt, Counts::default(), &opts);
    let link = rt.connect(a.id(), b.id(), LinkOptions::default()).unwrap();
    let n = k2k_messages();
    forward(&mut a, b.id(), 0, n);
    wait_for("every value received", || tally(&mut b).received == n);
    let c = tally(&mut b);
    assert_eq!(c.next, n);
    assert_eq!(c.out_of_order, 0, "per-edge FIFO");
    assert_eq!(c.bad_stamps, 0, "stamps increase along the edge");
    assert_eq!(rt.routed_messages(), 0, "the poller routed none of them");
    let stats = rt.link_stats(link).unwrap();
    assert_eq!((stats.sent, stats.consumed, stats.outbox), (n, n, 0));
    assert_eq!(rt.dead_letters(), 0);
    a.terminate(Duration::from_secs(5));
    b.terminate(Duration::from_secs(5));
}

/// A CPU actor's mailbox that records what it gets.
#[derive(Default)]
struct Sink(Mutex<Vec<Delivery>>);

impl Mailbox for Sink {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        self.0.lock().unwrap().push(d);
        Ok(())
    }
}

#[test]
fn host_to_kernel_to_kernel_to_host_keeps_order_and_causality() {
    let rt = Runtime::new().unwrap();
    let sink = Arc::new(Sink::default());
    let cpu = ActorId::cpu(0, 1);
    rt.registry().register(cpu, sink.clone());
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let mut b = node(
        &rt,
        Counts {
            forward_to: cpu.to_bits(),
            ..Counts::default()
        },
        &opts,
    );
    rt.connect(a.id(), b.id(), LinkOptions::default()).unwrap();
    let n = 10_000;
    forward(&mut a, b.id(), 0, n);
    wait_for("every value at the sink", || {
        sink.0.lock().unwrap().len() as u64 == n
    });
    let got = sink.0.lock().unwrap();
    let values: Vec<u64> = got
        .iter()
        .map(|d| d.payload.get::<Value>().unwrap().0)
        .collect();
    assert_eq!(values, (0..n).collect::<Vec<_>>(), "FIFO across both hops");
    assert!(got.iter().all(|d| d.src == b.id()));
    assert!(
        got.windows(2).all(|w| w[0].stamp.hlc < w[1].stamp.hlc),
        "stamps increase along the edge"
    );
    assert_eq!(tally(&mut b).bad_stamps, 0);
    // Only the last hop (GPU → CPU) went through the poller.
    assert_eq!(rt.routed_messages(), n);
    drop(got);
    a.terminate(Duration::from_secs(5));
    b.terminate(Duration::from_secs(5));
}

#[test]
fn a_full_ring_keeps_an_outbox_pushes_back_and_delivers_in_order() {
    let rt = Runtime::new().unwrap();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let mut b = node(&rt, Counts::default(), &opts);
    let link = rt
        .connect(a.id(), b.id(), LinkOptions::default().capacity(4))
        .unwrap();
    b.deactivate().unwrap();
    // Acknowledged before anything is sent: a loop that read `Active` just
    // before would otherwise still serve what reaches it.
    assert!(b.wait_for_state(LifecycleState::Deactivated, conformance::DEADLINE));
    // 4 fit the ring, the outbox takes the rest of one message's sends;
    // then the sender takes no more messages (its H2K fills instead).
    forward(&mut a, b.id(), 0, 10);
    forward(&mut a, b.id(), 10, 10);
    wait_for("ring full, outbox holding", || {
        rt.link_stats(link).unwrap().outbox == 6
    });
    std::thread::sleep(Duration::from_millis(20));
    let stats = rt.link_stats(link).unwrap();
    assert_eq!((stats.sent, stats.outbox), (4, 6), "{stats:?}");
    assert_eq!(a.h2k_depth(), 1, "the second message waits in H2K");
    b.activate().unwrap();
    wait_for("all 20 received", || tally(&mut b).received == 20);
    let c = tally(&mut b);
    assert_eq!((c.next, c.out_of_order), (20, 0));
    assert_eq!(rt.link_stats(link).unwrap().outbox, 0);
    assert_eq!(rt.dead_letters(), 0);
    a.terminate(Duration::from_secs(5));
    b.terminate(Duration::from_secs(5));
}

#[test]
fn connect_refuses_cycles_unless_an_edge_reports_failures() {
    let rt = Runtime::new().unwrap();
    let opts = LaunchOptions::default();
    let a = node(&rt, Counts::default(), &opts);
    let b = node(&rt, Counts::default(), &opts);
    let c = node(&rt, Counts::default(), &opts);
    let wait = LinkOptions::default();
    rt.connect(a.id(), b.id(), wait).unwrap();
    rt.connect(b.id(), c.id(), wait).unwrap();
    match rt.connect(c.id(), a.id(), wait) {
        Err(ConnectError::Cycle { path, .. }) => {
            let path: Vec<u32> = path.iter().map(|p| p.index()).collect();
            assert_eq!(path, [a.id().index(), b.id().index(), c.id().index()]);
        }
        other => panic!("expected a cycle, got {other:?}"),
    }
    rt.connect(c.id(), a.id(), wait.report_failures(true))
        .unwrap();
    assert!(matches!(
        rt.connect(a.id(), b.id(), wait),
        Err(ConnectError::AlreadyLinked { .. })
    ));
    assert!(matches!(
        rt.connect(a.id(), a.id(), wait),
        Err(ConnectError::NotLinkable(_))
    ));
    assert!(matches!(
        rt.connect(a.id(), ActorId::cpu(0, 1), wait),
        Err(ConnectError::NotLinkable(_))
    ));
    assert!(matches!(
        rt.connect(a.id(), ActorId::gpu(0, 999), wait),
        Err(ConnectError::Unknown(_))
    ));
    assert!(matches!(
        rt.connect(b.id(), a.id(), wait.capacity(3)),
        Err(ConnectError::Capacity(_))
    ));
}

fn collecting_runtime() -> (Runtime, Arc<Mutex<Vec<DeadLetter>>>) {
    let letters = Arc::new(Mutex::new(Vec::<DeadLetter>::new()));
    let l = letters.clone();
    let rt = Runtime::builder()
        .dead_letters(move |d| l.lock().unwrap().push(d))
        .build()
        .unwrap();
    (rt, letters)
}

#[test]
fn a_full_edge_that_reports_failures_dead_letters_instead_of_waiting() {
    let (rt, letters) = collecting_runtime();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let mut b = node(&rt, Counts::default(), &opts);
    let link = rt
        .connect(
            a.id(),
            b.id(),
            LinkOptions::default().capacity(4).report_failures(true),
        )
        .unwrap();
    b.deactivate().unwrap();
    // Acknowledged before anything is sent: a loop that read `Active` just
    // before would otherwise still serve what reaches it.
    assert!(b.wait_for_state(LifecycleState::Deactivated, conformance::DEADLINE));
    forward(&mut a, b.id(), 0, 20);
    wait_for("12 dead letters", || letters.lock().unwrap().len() == 12);
    {
        let letters = letters.lock().unwrap();
        assert!(
            letters
                .iter()
                .all(|l| l.reason == DeadLetterReason::Unroutable(RouteFailure::LinkFull))
        );
        let dead: Vec<u64> = letters
            .iter()
            .map(|l| l.payload.get::<Value>().unwrap().0)
            .collect();
        assert_eq!(dead, (8..20).collect::<Vec<_>>());
    }
    // The sender never waited: it still answers.
    assert_eq!(tally(&mut a).received, 0);
    let stats = rt.link_stats(link).unwrap();
    assert_eq!((stats.sent, stats.outbox), (4, 4));
    b.activate().unwrap();
    wait_for("8 received", || tally(&mut b).received == 8);
    assert_eq!(tally(&mut b).out_of_order, 0);
    a.terminate(Duration::from_secs(5));
    b.terminate(Duration::from_secs(5));
}

/// Launches `Node` in `slot`'s home as its next incarnation.
fn restart(
    rt: &Runtime,
    slot: &mut GpuSlot<ChannelWaiter>,
    opts: &LaunchOptions,
) -> GpuSlot<ChannelWaiter> {
    slot.recover();
    rt.launch_in::<Node, ChannelWaiter>(slot.home(), Counts::default(), opts, |_| {})
        .unwrap()
}

fn faulted_events(
    rt: &Runtime,
    opts: &LaunchOptions,
) -> (GpuSlot<ChannelWaiter>, mpsc::Receiver<SlotEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let slot = rt
        .launch::<Node, ChannelWaiter>(Counts::default(), opts, move |e| {
            let _ = tx.lock().unwrap().send(e);
        })
        .unwrap();
    (slot, rx)
}

#[test]
fn a_restarted_receiver_carries_on_past_the_poison_under_replay() {
    let (rt, letters) = collecting_runtime();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let replay = LaunchOptions::default().on_fault(PendingPolicy::Replay);
    let (mut b, events) = faulted_events(&rt, &replay);
    rt.connect(a.id(), b.id(), LinkOptions::default()).unwrap();
    b.deactivate().unwrap();
    // Acknowledged before anything is sent: a loop that read `Active` just
    // before would otherwise still serve what reaches it.
    assert!(b.wait_for_state(LifecycleState::Deactivated, conformance::DEADLINE));
    // 0..10, the poison, 10..20: queued in the link while b is inactive.
    forward(&mut a, b.id(), 0, 10);
    conformance::tell(
        &mut a,
        SendPoison {
            to: b.id().to_bits(),
        },
    );
    forward(&mut a, b.id(), 10, 10);
    wait_for("21 sent", || {
        tally(&mut a).received == 0 && a.h2k_depth() == 0
    });
    b.activate().unwrap();
    let e = events.recv_timeout(conformance::DEADLINE).unwrap();
    assert!(matches!(e, SlotEvent::Faulted(_)), "{e:?}");
    let mut b2 = restart(&rt, &mut b, &replay);
    // The next incarnation serves what followed the poison; the poison
    // alone is a dead letter.
    wait_for("10 more received", || tally(&mut b2).received == 10);
    let c = tally(&mut b2);
    assert_eq!(
        (c.next, c.out_of_order),
        (20, 1),
        "10..20 after a restart from zero"
    );
    let letters = letters.lock().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].payload.type_id(), Poison::TYPE_ID);
    drop(letters);
    a.terminate(Duration::from_secs(5));
    b2.terminate(Duration::from_secs(5));
}

#[test]
fn a_failed_receiver_dead_letters_what_it_left_under_fail() {
    let (rt, letters) = collecting_runtime();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let (mut b, events) = faulted_events(&rt, &opts);
    rt.connect(a.id(), b.id(), LinkOptions::default()).unwrap();
    b.deactivate().unwrap();
    // Acknowledged before anything is sent: a loop that read `Active` just
    // before would otherwise still serve what reaches it.
    assert!(b.wait_for_state(LifecycleState::Deactivated, conformance::DEADLINE));
    conformance::tell(
        &mut a,
        SendPoison {
            to: b.id().to_bits(),
        },
    );
    forward(&mut a, b.id(), 0, 10);
    wait_for("sent", || tally(&mut a).received == 0 && a.h2k_depth() == 0);
    b.activate().unwrap();
    let e = events.recv_timeout(conformance::DEADLINE).unwrap();
    assert!(matches!(e, SlotEvent::Faulted(_)), "{e:?}");
    let mut b2 = restart(&rt, &mut b, &opts);
    assert_eq!(letters.lock().unwrap().len(), 11);
    // The link serves the next incarnation from here on.
    forward(&mut a, b2.id(), 100, 5);
    wait_for("5 received", || tally(&mut b2).received == 5);
    assert_eq!(tally(&mut b2).next, 105);
    a.terminate(Duration::from_secs(5));
    b2.terminate(Duration::from_secs(5));
}

#[test]
fn a_receiver_gone_for_good_loses_nothing_silently() {
    let (rt, letters) = collecting_runtime();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let mut b = node(&rt, Counts::default(), &opts);
    let b_id = b.id();
    let link = rt
        .connect(a.id(), b_id, LinkOptions::default().capacity(4))
        .unwrap();
    b.deactivate().unwrap();
    // Acknowledged before anything is sent: a loop that read `Active` just
    // before would otherwise still serve what reaches it.
    assert!(b.wait_for_state(LifecycleState::Deactivated, conformance::DEADLINE));
    forward(&mut a, b_id, 0, 6);
    wait_for("outbox holding", || {
        rt.link_stats(link).unwrap().outbox == 2
    });
    // The receiver stops and its home goes: 6 dead letters (ring, then
    // outbox, in send order).
    b.terminate(Duration::from_secs(5));
    drop(b);
    wait_for("6 dead letters", || letters.lock().unwrap().len() == 6);
    let dead: Vec<u64> = letters
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.payload.get::<Value>().unwrap().0)
        .collect();
    assert_eq!(dead, (0..6).collect::<Vec<_>>());
    assert!(rt.link_stats(link).is_none(), "the link is closed");
    // Later sends take the routed path, to nobody.
    forward(&mut a, b_id, 6, 1);
    wait_for("a 7th dead letter", || letters.lock().unwrap().len() == 7);
    assert_eq!(
        letters.lock().unwrap()[6].reason,
        DeadLetterReason::Unroutable(RouteFailure::UnknownActor)
    );
    a.terminate(Duration::from_secs(5));
}

#[test]
fn a_link_never_takes_a_send_meant_for_a_cpu_actor_with_the_same_index() {
    let rt = Runtime::new().unwrap();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let b = node(&rt, Counts::default(), &opts);
    rt.connect(a.id(), b.id(), LinkOptions::default()).unwrap();
    let sink = Arc::new(Sink::default());
    let cpu = ActorId::cpu(0, b.id().index());
    rt.registry().register(cpu, sink.clone());
    forward(&mut a, cpu, 0, 3);
    wait_for("3 at the CPU actor", || sink.0.lock().unwrap().len() == 3);
    assert_eq!(rt.routed_messages(), 3);
    a.terminate(Duration::from_secs(5));
}

/// Serves only `Tally`: what a relaunched receiver may turn into.
struct TallyOnly;

impl Kernel for TallyOnly {
    type State = Counts;
    const NAME: &'static str = "k2k-tally-only";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(CpuHandlers::new().on(|c: &mut Counts, _: Tally, ctx| {
            ctx.reply(*c);
            Ok(())
        }))
    }
}

#[test]
fn a_link_message_the_new_receiver_does_not_serve_is_a_dead_letter() {
    let (rt, letters) = collecting_runtime();
    let opts = LaunchOptions::default();
    let mut a = node(&rt, Counts::default(), &opts);
    let mut b = node(&rt, Counts::default(), &opts);
    rt.connect(a.id(), b.id(), LinkOptions::default()).unwrap();
    b.stop();
    let mut b2 = rt
        .launch_in::<TallyOnly, ChannelWaiter>(b.home(), Counts::default(), &opts, |_| {})
        .unwrap();
    forward(&mut a, b2.id(), 0, 2);
    wait_for("2 dead letters", || letters.lock().unwrap().len() == 2);
    assert!(
        letters
            .lock()
            .unwrap()
            .iter()
            .all(|l| l.reason == DeadLetterReason::Unroutable(RouteFailure::Refused))
    );
    // The receiver did not fault on them.
    assert_eq!(tally(&mut b2).received, 0);
    a.terminate(Duration::from_secs(5));
    b2.terminate(Duration::from_secs(5));
}
