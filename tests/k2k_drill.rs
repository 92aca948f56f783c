//! A fault drill over a K2K link: a sender streams numbered values to a
//! receiver whose device loop fails at random points (every injected kind),
//! restarted under `PendingPolicy::Replay` as new incarnations by a
//! supervisor loop here. Checked, from the receiver's handler log, the
//! link's commit word at the end of each incarnation and the dead letters:
//! every value processed exactly once or dead-lettered (the poison) exactly
//! once; nothing lost; processed values in send order across incarnations;
//! incarnations never overlapping.

use bytemuck::{Pod, Zeroable};
use ringkernel::conformance::{self, ChannelWaiter};
use ringkernel::drill;
use ringkernel::home::{DeadLetter, PendingPolicy};
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, Kernel, MAX_SENDS, Message};
use ringkernel::link::LinkOptions;
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime, SlotEvent};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Emit {
    to: u64,
    first: u64,
    count: u64,
}

impl Message for Emit {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Value(u64);

impl Message for Value {
    const TYPE_ID: u32 = 2;
    type Reply = ();
}

/// Every run of the receiver's handler: (value, incarnation).
static RUNS: Mutex<Vec<(u64, u16)>> = Mutex::new(Vec::new());

struct Node;

impl Kernel for Node {
    type State = u64;
    const NAME: &'static str = "k2k-drill";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|_: &mut u64, e: Emit, ctx| {
                    for v in e.first..e.first + e.count {
                        ctx.send(ActorId::from_bits(e.to), Value(v));
                    }
                    Ok(())
                })
                .on(|n: &mut u64, v: Value, ctx| {
                    *n += 1;
                    RUNS.lock().unwrap().push((v.0, ctx.actor().incarnation()));
                    Ok(())
                }),
        )
    }
}

/// A runtime with the drills' watchdog, collecting its dead letters.
fn drill_runtime() -> (Runtime, Arc<Mutex<Vec<DeadLetter>>>) {
    let letters = Arc::new(Mutex::new(Vec::<DeadLetter>::new()));
    let l = letters.clone();
    let rt = Runtime::builder()
        .watchdog(drill::WATCHDOG)
        .dead_letters(move |d| l.lock().unwrap().push(d))
        .build()
        .unwrap();
    (rt, letters)
}

/// The injector's seed: `RINGKERNEL_DRILL_SEED`, else `default`.
fn drill_seed(default: u64) -> u64 {
    std::env::var("RINGKERNEL_DRILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Handles the fault events so far: each faulted incarnation is recovered
/// and the next launched in its home. Returns how many restarted.
fn restart_on_faults(
    faults: &mpsc::Receiver<SlotEvent>,
    slot: &mut GpuSlot<ChannelWaiter>,
    rt: &Runtime,
    opts: &LaunchOptions,
    events: &mpsc::Sender<SlotEvent>,
) -> usize {
    let mut restarts = 0;
    while let Ok(e) = faults.try_recv() {
        if let SlotEvent::Faulted(_) = e {
            slot.recover();
            *slot = launch(rt, Some(slot.home()), opts, events);
            restarts += 1;
        }
    }
    restarts
}

/// The injected panics happen on device threads: keep them out of the
/// output (once for the process).
fn quiet_device_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("ringkernel-"))
            {
                hook(info)
            }
        }));
    });
}

fn launch(
    rt: &Runtime,
    home: Option<&ringkernel::home::ActorHome<ChannelWaiter>>,
    opts: &LaunchOptions,
    events: &mpsc::Sender<SlotEvent>,
) -> GpuSlot<ChannelWaiter> {
    let tx = Mutex::new(events.clone());
    let on_event = move |e| {
        let _ = tx.lock().unwrap().send(e);
    };
    match home {
        Some(h) => rt.launch_in::<Node, ChannelWaiter>(h, 0, opts, on_event),
        None => rt.launch::<Node, ChannelWaiter>(0, opts, on_event),
    }
    .unwrap()
}

#[test]
fn a_receiver_failing_at_random_loses_and_repeats_nothing_over_its_link() {
    quiet_device_panics();
    let n = (drill::messages() / 5).max(1000);
    let (rt, letters) = drill_runtime();
    let seed = drill_seed(0x4b32_4b00);
    let injector = drill::injector(seed, n);
    let opts = LaunchOptions::default().on_fault(PendingPolicy::Replay);
    let receiver_opts = opts.clone().inject(injector.clone());
    let (events, faults) = mpsc::channel();
    let mut sender = rt.launch::<Node, ChannelWaiter>(0, &opts, |_| {}).unwrap();
    let mut receiver = launch(&rt, None, &receiver_opts, &events);
    let link = rt
        .connect(
            sender.id(),
            receiver.id(),
            LinkOptions::default().capacity(256),
        )
        .unwrap();
    let to = receiver.id().to_bits();
    // The sender's feed runs beside the supervisor: it waits for H2K room
    // while the receiver is down.
    let feed = std::thread::spawn(move || {
        let mut first = 0;
        while first < n {
            let count = (MAX_SENDS as u64).min(n - first);
            conformance::tell(&mut sender, Emit { to, first, count });
            first += count;
        }
        sender
    });
    // Supervise: each fault ends an incarnation; note how far it had
    // consumed the link, recover (hand back) and start the next.
    let mut ends: Vec<(u16, u64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rt.link_stats(link).unwrap().consumed < n {
        assert!(
            Instant::now() < deadline,
            "drill stuck: {:?}",
            rt.link_stats(link)
        );
        match faults.recv_timeout(Duration::from_millis(5)) {
            Ok(SlotEvent::Faulted(_)) => {
                receiver.recover();
                let consumed = rt.link_stats(link).unwrap().consumed;
                ends.push((receiver.incarnation(), consumed));
                receiver = launch(&rt, Some(receiver.home()), &receiver_opts, &events);
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
    }
    injector.stop();
    ends.push((receiver.incarnation(), n));
    let mut sender = feed.join().unwrap();
    receiver.terminate(Duration::from_secs(5));
    sender.terminate(Duration::from_secs(5));
    assert!(ends.len() > 5, "faults were injected: {ends:?}");

    // A run counts if its incarnation committed its position (value v is
    // the link's message v: nothing else travels on it).
    let runs = std::mem::take(&mut *RUNS.lock().unwrap());
    let consumed_by = |inc: u16| ends.iter().find(|(i, _)| *i == inc).map(|(_, c)| *c);
    let mut counted = Vec::new();
    let mut last_inc = None;
    for &(v, inc) in &runs {
        let c = consumed_by(inc).expect("every incarnation ended");
        if v < c {
            counted.push(v);
            // Incarnations never overlap: counted runs never go back.
            assert!(
                last_inc <= Some(inc),
                "incarnation {inc} after {last_inc:?}"
            );
            last_inc = Some(inc);
        }
    }
    let dead: Vec<u64> = letters
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.payload.get::<Value>().expect("a value").0)
        .collect();
    assert!(
        counted.windows(2).all(|w| w[0] < w[1]),
        "processed once each, in send order"
    );
    let mut all: Vec<u64> = counted.iter().chain(&dead).copied().collect();
    all.sort_unstable();
    let first_wrong = all.iter().zip(0..n).position(|(&a, b)| a != b);
    assert!(
        all.len() as u64 == n && first_wrong.is_none(),
        "each value processed or dead-lettered, exactly once: {} of {n}, first wrong at {first_wrong:?} ({} dead letters, {} ends)",
        all.len(),
        dead.len(),
        ends.len()
    );
    assert!(dead.len() < ends.len(), "only poisons are dead letters");
    eprintln!(
        "k2k drill: {n} values, {} incarnations, {} faults injected, {} runs of the handler, {} dead letters (poisons)",
        ends.len(),
        injector.injected(),
        runs.len(),
        dead.len()
    );
}

/// The sender's side: values its handler sent, as the receiver got them.
static GOT: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// A receiver that only records.
struct Recorder;

impl Kernel for Recorder {
    type State = u64;
    const NAME: &'static str = "k2k-drill-recorder";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(CpuHandlers::new().on(|n: &mut u64, v: Value, _| {
            *n += 1;
            GOT.lock().unwrap().push(v.0);
            Ok(())
        }))
    }
}

#[test]
fn a_sender_failing_at_random_keeps_its_edge_in_order_and_exactly_once() {
    quiet_device_panics();
    const PER: u64 = 64;
    let emits = (drill::messages() / 5 / PER).max(100);
    let n = emits * PER;
    let (rt, letters) = drill_runtime();
    let seed = drill_seed(0x5e4d_0001);
    let injector = drill::injector(seed, emits);
    let opts = LaunchOptions::default()
        .on_fault(PendingPolicy::Replay)
        .inject(injector.clone());
    let (events, faults) = mpsc::channel();
    let mut receiver = rt
        .launch::<Recorder, ChannelWaiter>(0, &LaunchOptions::default(), |_| {})
        .unwrap();
    let mut sender = launch(&rt, None, &opts, &events);
    // A small ring: the sender's outbox and backpressure are exercised too.
    rt.connect(
        sender.id(),
        receiver.id(),
        LinkOptions::default().capacity(64),
    )
    .unwrap();
    let to = receiver.id().to_bits();
    let mut restarts = 0;
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "drill stuck at emit {next}");
        // Supervise: recover, start the next incarnation, send it what was
        // handed back (in order, before anything new).
        restarts += restart_on_faults(&faults, &mut sender, &rt, &opts, &events);
        match sender.replay() {
            ringkernel::runtime::ReplayStatus::Done => {}
            _ => {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
        }
        if next == emits {
            break;
        }
        let emit = Emit {
            to,
            first: next * PER,
            count: PER,
        };
        match sender.tell(emit.into(), ActorId::NONE) {
            Ok(()) => next += 1,
            // Full: wait for room; Closed: wait for the fault event (the
            // message was not taken, so it is sent again after).
            Err(_) => std::thread::sleep(Duration::from_micros(50)),
        }
    }
    // Everything sent reaches the receiver (faults go on meanwhile).
    let dead_emits = |letters: &[DeadLetter]| -> Vec<u64> {
        letters
            .iter()
            .filter_map(|d| d.payload.get::<Emit>())
            .map(|e| e.first / PER)
            .collect()
    };
    loop {
        assert!(Instant::now() < deadline, "values missing");
        restarts += restart_on_faults(&faults, &mut sender, &rt, &opts, &events);
        let _ = sender.replay();
        let dead = dead_emits(&letters.lock().unwrap()).len() as u64;
        if GOT.lock().unwrap().len() as u64 + dead * PER >= n
            && sender.home().pending_replays() == 0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    injector.stop();
    std::thread::sleep(Duration::from_millis(20));
    sender.terminate(Duration::from_secs(5));
    receiver.terminate(Duration::from_secs(5));
    let got = std::mem::take(&mut *GOT.lock().unwrap());
    let dead = dead_emits(&letters.lock().unwrap());
    assert!(restarts > 5, "faults were injected: {restarts}");
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "FIFO on the edge across restarts, nothing twice"
    );
    let expected: Vec<u64> = (0..emits)
        .filter(|e| !dead.contains(e))
        .flat_map(|e| e * PER..(e + 1) * PER)
        .collect();
    let first_wrong = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        got.len() == expected.len() && first_wrong.is_none(),
        "every value of every emit that was not a poison, exactly once: {} of {}, first wrong at {first_wrong:?}",
        got.len(),
        expected.len()
    );
    eprintln!(
        "k2k sender drill: {emits} emits of {PER}, {restarts} restarts, {} poisons (dead letters)",
        dead.len()
    );
}
