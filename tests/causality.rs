//! Causal order end to end: random graphs of CPU and GPU actors (cpu
//! backend) pass random causal chains to each other by id — GPU actors with
//! `Ctx::send`, over a K2K link where the graph has one (slot to slot, never
//! seen by the poller) and routed by the poller elsewhere; CPU actors
//! through the registry — and
//! every receive is logged with its HLC stamp. Checked: no loss, no
//! duplicates, FIFO per (sender, receiver) edge, and the receive stamps of
//! each chain strictly increasing — which needs every happens-before edge to
//! advance the clock: the send after the receive that caused it (program
//! order: a tick after a merge), and each send before its receive (the
//! poller's merge, the slot's merge on dequeue, the host's tick).

use bytemuck::{Pod, Zeroable};
use proptest::prelude::*;
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, Kernel, Message, Payload};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::{LaunchOptions, Runtime, Waiter};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const MAX_HOPS: usize = 12;
const MAX_ACTORS: usize = 8;

/// One hop of a causal chain: the route is a list of actor slots.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Hop {
    run: u32,
    chain: u32,
    step: u32,
    len: u32,
    /// Per-edge sequence number the sender gave it.
    edge_seq: u64,
    route: [u8; MAX_HOPS],
    _pad: [u8; 4],
}

impl Message for Hop {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

/// A receive, as logged.
#[derive(Clone, Copy, Debug)]
struct Recv {
    chain: u32,
    step: u32,
    actor: u8,
    from: u8,
    edge_seq: u64,
    received: u64,
}

static LOG: Mutex<Vec<(u32, Recv)>> = Mutex::new(Vec::new());
static RUN: AtomicU32 = AtomicU32::new(1);
/// Actor slot index → ActorId bits, per run (the kernel reads it).
static IDS: Mutex<Vec<(u32, Vec<u64>)>> = Mutex::new(Vec::new());

fn id_of(run: u32, slot: u8) -> ActorId {
    let ids = IDS.lock().unwrap();
    let (_, v) = ids.iter().find(|(r, _)| *r == run).expect("run registered");
    ActorId::from_bits(v[slot as usize])
}

/// The next hop of `h`, received by `actor`, or `None` at the chain's end.
fn next(h: &Hop, edge: &mut [u64; MAX_ACTORS]) -> Option<(u8, Hop)> {
    let step = h.step + 1;
    if step >= h.len {
        return None;
    }
    let to = h.route[step as usize];
    edge[to as usize] += 1;
    Some((
        to,
        Hop {
            step,
            edge_seq: edge[to as usize],
            ..*h
        },
    ))
}

/// GPU actors: log the receive, pass the chain on with `Ctx::send`.
struct Relay;

/// Per-destination send counters of one GPU actor.
#[derive(Clone, Copy, Default, Pod, Zeroable)]
#[repr(C)]
struct Edges([u64; MAX_ACTORS]);

impl Kernel for Relay {
    type State = Edges;
    const NAME: &'static str = "causal-relay";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(CpuHandlers::new().on(|edges: &mut Edges, h: Hop, ctx| {
            let me = h.route[h.step as usize];
            // The device's stamp of the receive (after its merge).
            let received = ctx.stamp().hlc;
            if let Some((to, hop)) = next(&h, &mut edges.0) {
                ctx.send(id_of(h.run, to), hop);
            }
            LOG.lock().unwrap().push((
                h.run,
                Recv {
                    chain: h.chain,
                    step: h.step,
                    actor: me,
                    from: if h.step == 0 {
                        u8::MAX
                    } else {
                        h.route[h.step as usize - 1]
                    },
                    edge_seq: h.edge_seq,
                    received,
                },
            ));
            Ok(())
        }))
    }
}

/// A waiter no test uses (GPU actors only get tells here).
struct NoWaiter;
impl Waiter for NoWaiter {
    fn complete(self, _: Result<ringkernel::kernel::Reply, ringkernel::runtime::AskError>) {}
}

/// The adapter's part for a GPU actor: its mailbox, a thread that owns the
/// slot and tells it what arrives.
struct GpuBox(Mutex<mpsc::Sender<Delivery>>);

impl Mailbox for GpuBox {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        self.0
            .lock()
            .unwrap()
            .send(d)
            .map_err(|e| DeliveryError::Closed(e.0))
    }
}

/// A CPU actor: a thread that logs and passes the chain on through the
/// registry.
struct CpuBox(Mutex<mpsc::Sender<Delivery>>);

impl Mailbox for CpuBox {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        self.0
            .lock()
            .unwrap()
            .send(d)
            .map_err(|e| DeliveryError::Closed(e.0))
    }
}

fn cpu_actor(run: u32, me: u8, id: ActorId, rt: Arc<Runtime>, rx: mpsc::Receiver<Delivery>) {
    let mut edges = [0u64; MAX_ACTORS];
    while let Ok(d) = rx.recv() {
        let h = d.payload.get::<Hop>().expect("a hop");
        // Host actors share the host clock, which merged this stamp before
        // delivering it: the send below ticks past it.
        let received = d.stamp.hlc;
        if let Some((to, hop)) = next(&h, &mut edges) {
            rt.registry()
                .send(id, id_of(run, to), Payload::new(hop))
                .expect("every actor is registered");
        }
        LOG.lock().unwrap().push((
            run,
            Recv {
                chain: h.chain,
                step: h.step,
                actor: me,
                from: if h.step == 0 {
                    u8::MAX
                } else {
                    h.route[h.step as usize - 1]
                },
                edge_seq: h.edge_seq,
                received,
            },
        ));
    }
}

fn check_run(
    run: u32,
    gpus: usize,
    cpus: usize,
    links: &[(u8, u8)],
    chains: &[Vec<u8>],
    skew_ms: i64,
) {
    // The host's physical clock is skewed against the devices' (ahead or
    // behind by `skew_ms`): only the merges at every domain boundary keep
    // the stamps of a chain increasing.
    let skew = skew_ms * 1_000_000;
    let host_clock = move || {
        let now = ringkernel::hlc::PhysicalClock::now_ns(&ringkernel::hlc::SystemClock);
        now.saturating_add_signed(skew)
    };
    let rt = Arc::new(
        Runtime::builder()
            .host_clock(Arc::new(host_clock))
            .build()
            .unwrap(),
    );
    let mut ids = Vec::new();
    let mut slots = Vec::new();
    let mut threads = Vec::new();
    // GPU actors are slots 0..gpus, CPU actors the rest.
    for _ in 0..gpus {
        let slot = rt
            .launch::<Relay, NoWaiter>(Edges::default(), &LaunchOptions::default(), |_| {})
            .unwrap();
        ids.push(slot.id());
        slots.push(slot);
    }
    for i in 0..cpus {
        ids.push(ActorId::cpu(0, 100 + i as u32));
    }
    // K2K links between GPU actors: waiting edges where they close no
    // cycle, edges that report failures where they do (rings of 1024 never
    // fill here, so nothing is reported).
    let mut linked = std::collections::HashSet::new();
    for &(a, b) in links {
        let (a, b) = (a as usize % gpus, b as usize % gpus);
        if a == b || !linked.insert((a, b)) {
            continue;
        }
        let opts = ringkernel::link::LinkOptions::default();
        match rt.connect(ids[a], ids[b], opts) {
            Ok(_) => {}
            Err(ringkernel::link::ConnectError::Cycle { .. }) => {
                rt.connect(ids[a], ids[b], opts.report_failures(true))
                    .unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    IDS.lock()
        .unwrap()
        .push((run, ids.iter().map(|i| i.to_bits()).collect()));
    for (i, mut slot) in slots.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Delivery>();
        rt.registry()
            .register(ids[i], Arc::new(GpuBox(Mutex::new(tx))));
        threads.push(std::thread::spawn(move || {
            while let Ok(d) = rx.recv() {
                let mut p = d.payload;
                loop {
                    match slot.tell(p, d.src) {
                        Ok(()) => break,
                        Err(ringkernel::runtime::SubmitError::Full(back)) => {
                            p = back;
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            slot.terminate(Duration::from_secs(5));
        }));
    }
    for (i, &id) in ids.iter().enumerate().skip(gpus) {
        let (tx, rx) = mpsc::channel::<Delivery>();
        rt.registry().register(id, Arc::new(CpuBox(Mutex::new(tx))));
        let reg = rt.clone();
        threads.push(std::thread::spawn(move || {
            cpu_actor(run, i as u8, id, reg, rx)
        }));
    }
    // Start every chain from the host.
    let mut expected = 0;
    // Hops a GPU actor sends that the poller routes (not over a link).
    let routed = chains
        .iter()
        .flat_map(|r| r.windows(2))
        .filter(|w| (w[0] as usize) < gpus && !linked.contains(&(w[0] as usize, w[1] as usize)))
        .count() as u64;
    for (c, route) in chains.iter().enumerate() {
        let mut r = [0u8; MAX_HOPS];
        r[..route.len()].copy_from_slice(route);
        let hop = Hop {
            run,
            chain: c as u32,
            step: 0,
            len: route.len() as u32,
            edge_seq: 0,
            route: r,
            _pad: [0; 4],
        };
        expected += route.len();
        rt.registry()
            .send(ActorId::NONE, ids[route[0] as usize], Payload::new(hop))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = LOG
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| *r == run)
            .count();
        if got >= expected {
            break;
        }
        assert!(Instant::now() < deadline, "lost hops: {got} of {expected}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Let duplicates, if any, arrive before checking.
    std::thread::sleep(Duration::from_millis(20));
    let log: Vec<Recv> = {
        let mut l = LOG.lock().unwrap();
        let mine = l
            .iter()
            .filter(|(r, _)| *r == run)
            .map(|(_, x)| *x)
            .collect();
        l.retain(|(r, _)| *r != run);
        mine
    };
    assert_eq!(log.len(), expected, "duplicates");
    let mut by_chain: HashMap<u32, Vec<Recv>> = HashMap::new();
    for r in &log {
        by_chain.entry(r.chain).or_default().push(*r);
    }
    for (c, route) in chains.iter().enumerate() {
        let mut hops = by_chain.remove(&(c as u32)).expect("chain seen");
        hops.sort_by_key(|h| h.step);
        assert_eq!(
            hops.iter().map(|h| h.step).collect::<Vec<_>>(),
            (0..route.len() as u32).collect::<Vec<_>>(),
            "every hop once"
        );
        for (h, &actor) in hops.iter().zip(route) {
            assert_eq!(h.actor, actor);
        }
        for w in hops.windows(2) {
            assert!(
                w[0].received < w[1].received,
                "chain {c}: hop {} not after hop {}",
                w[1].step,
                w[0].step
            );
        }
    }
    // FIFO per edge: per (from, to), receives in the order the sender
    // numbered them, in each receiver's log order.
    let mut last: HashMap<(u8, u8), u64> = HashMap::new();
    for r in &log {
        if r.from == u8::MAX {
            continue;
        }
        let e = last.entry((r.from, r.actor)).or_insert(0);
        assert!(
            r.edge_seq > *e,
            "edge {}→{}: {} after {}",
            r.from,
            r.actor,
            r.edge_seq,
            *e
        );
        *e = r.edge_seq;
    }
    assert_eq!(rt.routed_messages(), routed, "K2K hops bypass the poller");
    // Shut down: closing the mailboxes ends the threads.
    for id in &ids {
        rt.registry().unregister(*id);
    }
    for t in threads {
        t.join().unwrap();
    }
}

fn chains(actors: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(
        proptest::collection::vec(0..actors as u8, 1..MAX_HOPS),
        1..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn causal_chains_across_cpu_and_gpu_actors(
        gpus in 1usize..4,
        cpus in 1usize..4,
        links in proptest::collection::vec((0u8..4, 0u8..4), 0..8),
        seed_chains in chains(MAX_ACTORS),
        skew_ms in prop_oneof![Just(-1000i64), Just(0), Just(1000)],
    ) {
        let n = gpus + cpus;
        let chains: Vec<Vec<u8>> = seed_chains
            .into_iter()
            .map(|c| c.into_iter().map(|a| a % n as u8).collect())
            .collect();
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        check_run(run, gpus, cpus, &links, &chains, skew_ms);
    }
}

/// The chain that needs the poller's merge: GPU → CPU → CPU with the host
/// clock behind the device's (a poller passing the device's stamp on
/// without merging it would let the CPU hop's send go backwards).
#[test]
fn gpu_then_cpu_then_cpu_with_the_host_behind() {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    check_run(run, 1, 2, &[], &[vec![0, 1, 2], vec![0, 2, 1, 0, 1]], -1000);
}

/// The chain that needs the merge on dequeue: CPU → GPU with the host
/// clock ahead of the device's.
#[test]
fn cpu_then_gpu_with_the_host_ahead() {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    check_run(run, 1, 1, &[], &[vec![1, 0, 1, 0]], 1000);
}

/// GPU → (K2K) GPU → (K2K) GPU → CPU → GPU, over a cycle of links (one edge
/// reports failures), with the host clock ahead: the link hops carry the
/// stamps the slots merge on dequeue.
#[test]
fn chains_over_a_cycle_of_links() {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    check_run(
        run,
        3,
        1,
        &[(0, 1), (1, 2), (2, 0)],
        &[vec![0, 1, 2, 3, 0, 1], vec![2, 0, 1, 2, 0], vec![3, 1, 2]],
        1000,
    );
}
