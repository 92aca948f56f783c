//! A mixed CPU/GPU actor pipeline on the cpu backend (no GPU needed):
//!
//! ```text
//! Ingest (CPU) ─tell─► Transform (GPU) ═K2K═► Aggregate (GPU) ─send by id─► Sink (CPU)
//! ```
//!
//! The GPU actors' handlers address their next stage by `ActorId`
//! (`Ctx::send`). Transform is linked to Aggregate (`Runtime::connect`), so
//! that hop goes slot to slot over a K2K ring with no host thread on the
//! path; Aggregate → Sink is routed by the runtime's poller through the
//! registry into the sink's mailbox. HLC stamps merge at every boundary.
//! Prints per-stage counts, the end-to-end latency of each reading
//! (p50/p99), throughput, and what went over the link.
//!
//! `cargo run --release -p ringkernel-ractor --example pipeline [-- READINGS]`

use bytemuck::{Pod, Zeroable};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, Kernel, Message};
use ringkernel::link::LinkOptions;
use ringkernel::registry::Delivery;
use ringkernel::runtime::Runtime;
use ringkernel_ractor::{CpuMailbox, GpuActor, GpuActorRef, GpuMailbox};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A raw reading, stamped with the ingest time (ns on the demo's clock).
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Raw {
    seq: u64,
    millivolts: i64,
    t0: u64,
}
impl Message for Raw {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

/// A calibrated reading.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Calibrated {
    seq: u64,
    microvolts: i64,
    t0: u64,
}
impl Message for Calibrated {
    const TYPE_ID: u32 = 2;
    type Reply = ();
}

/// The running aggregate after one more reading.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Running {
    seq: u64,
    count: u64,
    mean: i64,
    t0: u64,
}
impl Message for Running {
    const TYPE_ID: u32 = 3;
    type Reply = ();
}

/// Where a stage sends: the next stage's id (set before the first reading).
#[derive(Clone, Copy, Default, Pod, Zeroable)]
#[repr(C)]
struct Next {
    to: u64,
    processed: u64,
}

/// Ask: wire the stage to the next one.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Wire(u64);
impl Message for Wire {
    const TYPE_ID: u32 = 9;
    type Reply = u64;
}

struct Transform;
impl Kernel for Transform {
    type State = Next;
    const NAME: &'static str = "transform";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|s: &mut Next, Wire(to), ctx| {
                    s.to = to;
                    ctx.reply(s.processed);
                    Ok(())
                })
                .on(|s: &mut Next, r: Raw, ctx| {
                    s.processed += 1;
                    // Calibration: gain 1.0025, offset −120 µV.
                    let microvolts = r.millivolts * 1000 * 10_025 / 10_000 - 120;
                    ctx.send(
                        ActorId::from_bits(s.to),
                        Calibrated {
                            seq: r.seq,
                            microvolts,
                            t0: r.t0,
                        },
                    );
                    Ok(())
                }),
        )
    }
}

#[derive(Clone, Copy, Default, Pod, Zeroable)]
#[repr(C)]
struct AggState {
    next: Next,
    sum: i64,
}

struct Aggregate;
impl Kernel for Aggregate {
    type State = AggState;
    const NAME: &'static str = "aggregate";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|s: &mut AggState, Wire(to), ctx| {
                    s.next.to = to;
                    ctx.reply(s.next.processed);
                    Ok(())
                })
                .on(|s: &mut AggState, c: Calibrated, ctx| {
                    s.next.processed += 1;
                    s.sum += c.microvolts;
                    ctx.send(
                        ActorId::from_bits(s.next.to),
                        Running {
                            seq: c.seq,
                            count: s.next.processed,
                            mean: s.sum / s.next.processed as i64,
                            t0: c.t0,
                        },
                    );
                    Ok(())
                }),
        )
    }
}

/// The sink: records end-to-end latencies; answers when all have come.
struct Sink;

enum SinkMsg {
    Got(Delivery),
    Expect(u64, oneshot::Sender<SinkReport>),
}

impl From<Delivery> for SinkMsg {
    fn from(d: Delivery) -> Self {
        SinkMsg::Got(d)
    }
}

#[derive(Debug, Default)]
struct SinkReport {
    received: u64,
    in_order: bool,
    latencies_ns: Vec<u64>,
    last: Option<(u64, i64)>,
}

struct SinkState {
    epoch: Instant,
    next_seq: u64,
    report: SinkReport,
    waiting: Option<(u64, oneshot::Sender<SinkReport>)>,
}

impl Actor for Sink {
    type Msg = SinkMsg;
    type State = SinkState;
    type Arguments = Instant;

    async fn pre_start(
        &self,
        _: ActorRef<SinkMsg>,
        epoch: Instant,
    ) -> Result<SinkState, ActorProcessingErr> {
        Ok(SinkState {
            epoch,
            next_seq: 0,
            report: SinkReport {
                in_order: true,
                ..SinkReport::default()
            },
            waiting: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<SinkMsg>,
        msg: SinkMsg,
        st: &mut SinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SinkMsg::Got(d) => {
                if let Some(r) = d.payload.get::<Running>() {
                    let now = st.epoch.elapsed().as_nanos() as u64;
                    st.report.latencies_ns.push(now.saturating_sub(r.t0));
                    st.report.in_order &= r.seq == st.next_seq;
                    st.next_seq += 1;
                    st.report.received += 1;
                    st.report.last = Some((r.count, r.mean));
                }
            }
            SinkMsg::Expect(n, tx) => st.waiting = Some((n, tx)),
        }
        if let Some((n, _)) = &st.waiting
            && st.report.received >= *n
            && let Some((_, tx)) = st.waiting.take()
        {
            let fresh = SinkReport {
                in_order: true,
                ..SinkReport::default()
            };
            let _ = tx.send(std::mem::replace(&mut st.report, fresh));
        }
        Ok(())
    }
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_nanos(sorted.get(i).copied().unwrap_or(0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let readings: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let rt = Runtime::new()?;
    let epoch = Instant::now();

    // The stages: two GPU actors, linked, and a CPU sink registered by id.
    let transform_actor = GpuActor::<Transform>::new(rt.clone());
    let transform_id = transform_actor.home().id();
    let (transform, _) = Actor::spawn(None, transform_actor, Next::default()).await?;
    let aggregate_actor = GpuActor::<Aggregate>::new(rt.clone());
    let aggregate_id = aggregate_actor.home().id();
    let (aggregate, _) = Actor::spawn(None, aggregate_actor, AggState::default()).await?;
    let (sink, _) = Actor::spawn(None, Sink, epoch).await?;
    let sink_id = ActorId::cpu(rt.node(), 1);
    let registry = rt.registry();
    // Registered too, for anyone who routes to it; the transform's sends
    // take the link.
    registry.register(
        aggregate_id,
        Arc::new(GpuMailbox::new::<Aggregate>(aggregate.clone())),
    );
    registry.register(sink_id, Arc::new(CpuMailbox(sink.clone())));
    let link = rt.connect(transform_id, aggregate_id, LinkOptions::default())?;
    let transform = GpuActorRef::<Transform>::new(transform);
    let aggregate = GpuActorRef::<Aggregate>::new(aggregate);
    transform.ask(Wire(aggregate_id.to_bits())).await?;
    aggregate.ask(Wire(sink_id.to_bits())).await?;
    println!(
        "pipeline: ingest (CPU) → transform {transform_id:?} (GPU) ═K2K═► aggregate {aggregate_id:?} (GPU) → sink {sink_id:?} (CPU), {:?} backend",
        rt.backend()
    );

    // Ingest: the CPU side tells every reading to the transform stage.
    let (tx, done) = oneshot::channel();
    sink.send_message(SinkMsg::Expect(readings, tx))?;
    let start = Instant::now();
    for seq in 0..readings {
        let t0 = epoch.elapsed().as_nanos() as u64;
        transform
            .tell(Raw {
                seq,
                millivolts: 1000 + (seq % 100) as i64,
                t0,
            })
            .map_err(|e| e.to_string())?;
    }
    let report = tokio::time::timeout(Duration::from_secs(120), done).await??;
    let elapsed = start.elapsed();

    // Latency unloaded: one reading at a time through the whole pipeline.
    let paced = 2_000;
    let mut unloaded = Vec::with_capacity(paced as usize);
    let mut in_order = report.in_order;
    for k in 0..paced {
        let seq = readings + k;
        let (tx, done) = oneshot::channel();
        sink.send_message(SinkMsg::Expect(1, tx))?;
        transform
            .tell(Raw {
                seq,
                millivolts: 1000,
                t0: epoch.elapsed().as_nanos() as u64,
            })
            .map_err(|e| e.to_string())?;
        let r = tokio::time::timeout(Duration::from_secs(10), done).await??;
        in_order &= r.received == 1 && r.in_order;
        unloaded.extend(r.latencies_ns);
    }
    let transformed = transform.ask(Wire(aggregate_id.to_bits())).await?;
    let aggregated = aggregate.ask(Wire(sink_id.to_bits())).await?;

    let mut lat = report.latencies_ns.clone();
    lat.sort_unstable();
    unloaded.sort_unstable();
    println!("ingest:    {} readings sent", readings + paced);
    println!("transform: {transformed} processed");
    println!("aggregate: {aggregated} processed");
    println!(
        "sink:      {} received, in order: {in_order}, last running of the flood (count, mean µV): {:?}",
        report.received + unloaded.len() as u64,
        report.last
    );
    println!(
        "flooded:  {readings} readings in {elapsed:?}: {:.0} readings/s; end to end p50 {:?}, p99 {:?} (queueing included)",
        readings as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
    );
    println!(
        "one at a time: {paced} readings, end to end p50 {:?}, p99 {:?}",
        percentile(&unloaded, 0.50),
        percentile(&unloaded, 0.99),
    );
    let over_link = rt.link_stats(link).map_or(0, |s| s.consumed);
    println!(
        "K2K transform → aggregate: {over_link} messages slot to slot; routed by the poller: {} (aggregate → sink)",
        rt.routed_messages()
    );
    println!("dead letters: {}", rt.dead_letters());
    if report.received != readings || !in_order || rt.dead_letters() != 0 {
        return Err("the pipeline lost, duplicated or reordered readings".into());
    }
    if over_link != readings + paced || rt.routed_messages() != readings + paced {
        return Err("a transform → aggregate message missed the link".into());
    }
    Ok(())
}
