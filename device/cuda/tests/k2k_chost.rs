//! K2K links served in place by the C device loop (`kernels/rk_loop.cuh`),
//! on the c-host backend: what differs from the cpu backend's outboxes is
//! checked here — a full link holds its sender's messages in H2K (the loop
//! takes none until the link has room for its sends), a full edge that
//! reports failures dead-letters at once, a receiver gone for good loses
//! nothing silently, and a slot's link table has fixed rows.

use ringkernel::conformance::{ChannelWaiter, Forward, Probe, Relay, Seq, SeqReport, ask, tell};
use ringkernel::control::LifecycleState;
use ringkernel::home::{DeadLetter, DeadLetterReason, RouteFailure};
use ringkernel::kernel::Kernel;
use ringkernel::link::{ConnectError, LinkOptions, MAX_SLOT_LINKS};
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime};
use ringkernel_cuda::CHostBackend;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

fn runtime() -> (Runtime, Arc<Mutex<Vec<DeadLetter>>>) {
    let letters = Arc::new(Mutex::new(Vec::<DeadLetter>::new()));
    let l = letters.clone();
    let rt = Runtime::builder()
        .device(CHostBackend::new())
        .dead_letters(move |d| l.lock().unwrap().push(d))
        .build()
        .unwrap();
    (rt, letters)
}

fn launch<K: Kernel>(rt: &Runtime) -> GpuSlot<ChannelWaiter> {
    rt.launch::<K, ChannelWaiter>(
        bytemuck::Zeroable::zeroed(),
        &LaunchOptions::default(),
        |_| {},
    )
    .expect("launch")
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn report(slot: &mut GpuSlot<ChannelWaiter>) -> [u64; 2] {
    ask(slot, SeqReport())
        .wait()
        .expect("reply")
        .decode()
        .expect("report")
}

fn values(letters: &[DeadLetter]) -> Vec<u64> {
    letters
        .iter()
        .map(|l| l.payload.get::<Seq>().expect("a Seq").0)
        .collect()
}

/// A Relay linked to a Probe by a link of `options`, the Probe deactivated,
/// and `n` values told to the Relay to forward to it.
fn relay_to_a_paused_sink(
    rt: &Runtime,
    options: LinkOptions,
    n: u64,
) -> (
    GpuSlot<ChannelWaiter>,
    GpuSlot<ChannelWaiter>,
    ringkernel::link::LinkId,
) {
    let mut relay = launch::<Relay>(rt);
    let sink = launch::<Probe>(rt);
    let link = rt.connect(relay.id(), sink.id(), options).unwrap();
    sink.deactivate().unwrap();
    // Acknowledged before anything is sent: a loop that read `Active` just
    // before would otherwise still serve what reaches it.
    assert!(sink.wait_for_state(LifecycleState::Deactivated, DEADLINE));
    for v in 0..n {
        tell(&mut relay, Forward(sink.id().to_bits(), v));
    }
    (relay, sink, link)
}

#[test]
fn a_full_link_holds_the_senders_messages_until_it_has_room() {
    let (rt, letters) = runtime();
    let (mut relay, mut sink, link) =
        relay_to_a_paused_sink(&rt, LinkOptions::default().capacity(4), 10);
    // Four sends fill the link; the relay takes no message whose send
    // could not go in, so the other six wait in its H2K (no outbox).
    wait_for("the link full", || rt.link_stats(link).unwrap().sent == 4);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(relay.h2k_depth(), 6);
    let stats = rt.link_stats(link).unwrap();
    assert_eq!((stats.sent, stats.outbox), (4, 0));
    sink.activate().unwrap();
    wait_for("all ten", || report(&mut sink)[0] == 10);
    assert_eq!(report(&mut sink), [10, 0], "[seen, out of order]");
    assert!(letters.lock().unwrap().is_empty());
    relay.terminate(DEADLINE);
    sink.terminate(DEADLINE);
}

#[test]
fn a_full_edge_that_reports_failures_dead_letters_at_once() {
    let (rt, letters) = runtime();
    let (mut relay, mut sink, link) = relay_to_a_paused_sink(
        &rt,
        LinkOptions::default().capacity(4).report_failures(true),
        20,
    );
    wait_for("16 dead letters", || letters.lock().unwrap().len() == 16);
    {
        let letters = letters.lock().unwrap();
        assert!(
            letters
                .iter()
                .all(|l| l.reason == DeadLetterReason::Unroutable(RouteFailure::LinkFull)),
            "{letters:?}"
        );
        assert_eq!(values(&letters), (4..20).collect::<Vec<_>>());
    }
    assert_eq!(rt.link_stats(link).unwrap().sent, 4);
    sink.activate().unwrap();
    wait_for("4 received", || report(&mut sink)[0] == 4);
    assert_eq!(report(&mut sink), [4, 0]);
    relay.terminate(DEADLINE);
    sink.terminate(DEADLINE);
}

#[test]
fn a_receiver_gone_for_good_loses_nothing_silently() {
    let (rt, letters) = runtime();
    let (mut relay, mut sink, link) =
        relay_to_a_paused_sink(&rt, LinkOptions::default().capacity(4), 6);
    wait_for("the link full", || rt.link_stats(link).unwrap().sent == 4);
    // The receiver stops and its home goes: the four in the ring are dead
    // letters; the relay then sees the link closed and routes the other
    // two, to nobody.
    sink.terminate(DEADLINE);
    drop(sink);
    wait_for("6 dead letters", || letters.lock().unwrap().len() == 6);
    let letters = letters.lock().unwrap().clone();
    assert_eq!(values(&letters), (0..6).collect::<Vec<_>>());
    assert!(
        letters[4..]
            .iter()
            .all(|l| l.reason == DeadLetterReason::Unroutable(RouteFailure::UnknownActor)),
        "{letters:?}"
    );
    assert!(rt.link_stats(link).is_none(), "the link is closed");
    relay.terminate(DEADLINE);
}

#[test]
fn a_slot_has_as_many_links_as_its_table_has_rows() {
    let (rt, _) = runtime();
    let mut hub = launch::<Relay>(&rt);
    let mut spokes: Vec<_> = (0..=MAX_SLOT_LINKS).map(|_| launch::<Probe>(&rt)).collect();
    for s in &spokes[..MAX_SLOT_LINKS] {
        rt.connect(hub.id(), s.id(), LinkOptions::default())
            .unwrap();
    }
    let last = spokes[MAX_SLOT_LINKS].id();
    assert_eq!(
        rt.connect(hub.id(), last, LinkOptions::default()),
        Err(ConnectError::SlotLinks {
            actor: hub.id(),
            inbound: false,
        })
    );
    // Every row serves: one value down each link.
    for s in &spokes[..MAX_SLOT_LINKS] {
        tell(&mut hub, Forward(s.id().to_bits(), 0));
    }
    for s in &mut spokes[..MAX_SLOT_LINKS] {
        wait_for("a value on each link", || report(s)[0] == 1);
    }
    hub.terminate(DEADLINE);
    for mut s in spokes {
        s.terminate(DEADLINE);
    }
}

#[test]
fn a_sender_held_by_a_full_link_is_no_hung_slot() {
    let rt = Runtime::builder()
        .device(CHostBackend::new())
        .watchdog(Duration::from_millis(200))
        .build()
        .unwrap();
    let (mut relay, mut sink, link) =
        relay_to_a_paused_sink(&rt, LinkOptions::default().capacity(4), 10);
    wait_for("the link full", || rt.link_stats(link).unwrap().sent == 4);
    // Held with work waiting for five watchdog periods: it beats, so it
    // is not taken for hung.
    std::thread::sleep(Duration::from_secs(1));
    assert!(relay.is_open(), "the held sender was faulted");
    assert_eq!(relay.h2k_depth(), 6);
    sink.activate().unwrap();
    wait_for("all ten", || report(&mut sink)[0] == 10);
    relay.terminate(DEADLINE);
    sink.terminate(DEADLINE);
}
