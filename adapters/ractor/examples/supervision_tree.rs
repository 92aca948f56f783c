//! A small ractor supervision tree with a GPU actor serving CPU actors, on
//! the cpu backend by default (no GPU needed).
//!
//! ```text
//! Supervisor ─┬─ Scorer   (GPU actor: kernel `Stats`, launched once, keeps its state)
//!             ├─ Sensor 0 (CPU actor: casts readings to the scorer, then asks for a summary)
//!             ├─ Sensor 1
//!             └─ Sensor 2
//! ```
//!
//! Then a bad reading makes the kernel's handler fault; the supervisor sees
//! `ActorFailed` and spawns a clone of the scorer's `GpuActor`: the same
//! actor's next incarnation, which starts from the kernel state the last
//! one checkpointed and serves again.
//!
//! `cargo run --release -p ringkernel-ractor --example supervision_tree`
//!
//! `-- --backend cuda` runs the scorer in the persistent CUDA actor-host
//! kernel (falling back to the cpu backend, saying why, without a GPU);
//! `-- --backend c-host` runs the same CUDA C++ handler in the device loop
//! compiled for the host; `-- --backend wgpu` runs its WGSL handler on
//! WebGPU (falling back to the cpu backend without an adapter).
//! Kernel-state checkpoints are a cpu-backend feature: elsewhere the
//! restarted scorer starts from a fresh state.

use bytemuck::{Pod, Zeroable};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent, call};
use ringkernel::backend::{CudaHandler, WgslHandler};
use ringkernel::kernel::{BackendKind, CpuHandlers, HandlerError, Kernel, Message};
use ringkernel::runtime::{LaunchOptions, Runtime};
use ringkernel_ractor::{GpuActor, GpuActorRef, GpuMsg};
use std::time::Duration;

/// Tell: one sensor reading (milli-units). A negative reading is a fault.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Reading {
    sensor: u32,
    value: i32,
}
impl Message for Reading {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

/// Ask: (count, sum, max) over all readings so far.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Summary;
impl Message for Summary {
    const TYPE_ID: u32 = 2;
    type Reply = [i64; 3];
}

/// The kernel's state, kept on the device between messages.
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
#[repr(C)]
struct StatsState {
    count: i64,
    sum: i64,
    max: i64,
}

struct Stats;
impl Kernel for Stats {
    type State = StatsState;
    const NAME: &'static str = "stats";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new()
                .on::<Reading>(|s, r, _| {
                    if r.value < 0 {
                        return Err(HandlerError(r.sensor));
                    }
                    s.count += 1;
                    s.sum += i64::from(r.value);
                    s.max = s.max.max(i64::from(r.value));
                    Ok(())
                })
                .on::<Summary>(|s, _, ctx| {
                    ctx.reply([s.count, s.sum, s.max]);
                    Ok(())
                }),
        )
    }

    fn cuda() -> Option<CudaHandler> {
        Some(CudaHandler {
            source: STATS_CUDA,
            types: &[Reading::TYPE_ID, Summary::TYPE_ID],
            max_later: 0,
        })
    }

    fn wgsl() -> Option<WgslHandler> {
        Some(WgslHandler {
            source: STATS_WGSL,
            types: &[Reading::TYPE_ID, Summary::TYPE_ID],
            max_later: 0,
        })
    }
}

/// The same handlers in WGSL (the wgpu backend): the state's three `i64`s
/// are six `u32` words, low word first; readings are never negative once
/// accepted, so the sums carry into the high words and `max` stays in the
/// low one.
const STATS_WGSL: &str = r#"
fn stats_add(state: ptr<function, array<u32, RK_STATE_WORDS>>, at: u32, v: u32) {
    let lo = (*state)[at] + v;
    (*state)[at + 1u] = (*state)[at + 1u] + select(0u, 1u, lo < v);
    (*state)[at] = lo;
}

fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    if msg.type_id == 1u {
        let sensor = msg.payload[0];
        let value = bitcast<i32>(msg.payload[1]);
        if value < 0 {
            return RK_FAULT + sensor;
        }
        stats_add(state, 0u, 1u);
        stats_add(state, 2u, u32(value));
        if u32(value) > (*state)[4] {
            (*state)[4] = u32(value);
        }
        return RK_DONE;
    }
    (*reply).len = 24u;
    for (var i = 0u; i < 6u; i = i + 1u) {
        (*reply).payload[i] = (*state)[i];
    }
    return RK_REPLIED;
}
"#;

/// The same handlers in CUDA C++ (the cuda and c-host backends).
const STATS_CUDA: &str = r#"
struct StatsState { int64_t count, sum, max; };

RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    StatsState* s = (StatsState*)state;
    if (msg->type_id == 1) {
        uint32_t sensor = rk_get_u32(payload, 0);
        int value = (int)rk_get_u32(payload, 4);
        if (value < 0) return RK_FAULT + sensor;
        s->count += 1;
        s->sum += value;
        if (value > s->max) s->max = value;
        return RK_DONE;
    }
    int64_t summary[3] = {s->count, s->sum, s->max};
    return rk_reply_bytes(reply, summary, 24);
}
"#;

/// A CPU actor that feeds readings to the scorer.
struct Sensor;
impl Actor for Sensor {
    type Msg = RpcReplyPort<[i64; 3]>;
    type State = (u32, GpuActorRef<Stats>);
    type Arguments = (u32, GpuActorRef<Stats>);

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        port: Self::Msg,
        (id, scorer): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for i in 0..1000 {
            scorer
                .tell(Reading {
                    sensor: *id,
                    value: (*id as i32 + 1) * 10 + i % 7,
                })
                .map_err(|e| e.to_string())?;
        }
        let summary = scorer.ask(Summary).await?;
        let _ = port.send(summary);
        Ok(())
    }
}

enum SupMsg {
    Scorer(RpcReplyPort<ActorRef<GpuMsg>>),
}

struct Supervisor;
impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = (GpuActor<Stats>, Option<ActorRef<GpuMsg>>);
    type Arguments = Runtime;

    async fn pre_start(
        &self,
        myself: ActorRef<SupMsg>,
        rt: Runtime,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Checkpoint the kernel state after every message, so a restart
        // picks up where the faulted incarnation left off (cpu backend).
        let options = if rt.backend() == BackendKind::Cpu {
            LaunchOptions::default().checkpoint_every(1)
        } else {
            LaunchOptions::default()
        };
        let gpu = GpuActor::<Stats>::with_options(rt, options);
        let (scorer, _) = Actor::spawn_linked(
            Some("scorer".into()),
            gpu.clone(),
            StatsState::default(),
            myself.get_cell(),
        )
        .await?;
        Ok((gpu, Some(scorer)))
    }

    async fn handle(
        &self,
        _: ActorRef<SupMsg>,
        msg: SupMsg,
        (_, scorer): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupMsg::Scorer(port) = msg;
        if let Some(s) = scorer {
            let _ = port.send(s.clone());
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        (gpu, scorer): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            println!(
                "supervisor: {} failed: {err}",
                cell.get_name().unwrap_or_default()
            );
            // A clone of the GpuActor is the same actor: this spawns its
            // next incarnation.
            let (fresh, _) = Actor::spawn_linked(
                Some("scorer-2".into()),
                gpu.clone(),
                StatsState::default(),
                myself.get_cell(),
            )
            .await?;
            println!(
                "supervisor: restarted the scorer as {}, incarnation {} of actor {:?}",
                fresh.get_name().unwrap_or_default(),
                gpu.home().incarnations() - 1,
                gpu.home().id()
            );
            *scorer = Some(fresh);
        }
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = match ringkernel_cuda::backend_arg().as_str() {
        "wgpu" => ringkernel_wgpu::runtime_or_cpu()?,
        other => ringkernel_cuda::runtime_named(other, |b| b.kernel::<Stats>())?,
    };
    println!("runtime: {:?} backend, node {}", rt.backend(), rt.node());
    let (sup, sup_handle) = Actor::spawn(Some("supervisor".into()), Supervisor, rt.clone()).await?;
    let scorer = GpuActorRef::<Stats>::new(call!(sup, SupMsg::Scorer)?);

    let mut sensors = Vec::new();
    for id in 0..3 {
        let (s, _) = Actor::spawn_linked(
            Some(format!("sensor-{id}")),
            Sensor,
            (id, scorer.clone()),
            sup.get_cell(),
        )
        .await?;
        sensors.push(s);
    }
    for (id, s) in sensors.iter().enumerate() {
        let [count, sum, max] = call!(s, |port| port)?;
        println!("sensor-{id}: scorer has seen {count} readings so far (sum {sum}, max {max})");
    }
    let [count, sum, max] = scorer.ask(Summary).await?;
    println!(
        "scorer (GPU actor, state kept across {count} messages): mean {:.2}, max {max}",
        sum as f64 / count as f64
    );

    println!("sending a bad reading: the kernel's handler faults");
    scorer
        .tell(Reading {
            sensor: 9,
            value: -1,
        })
        .map_err(|e| e.to_string())?;
    let after = scorer.ask(Summary).await;
    println!("an ask racing the fault resolves, never hangs: {after:?}");
    let mut fresh = None;
    for _ in 0..200 {
        let s = call!(sup, SupMsg::Scorer)?;
        if s.get_id() != scorer.actor().get_id() {
            fresh = Some(GpuActorRef::<Stats>::new(s));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fresh = fresh.ok_or("the supervisor did not restart the scorer")?;
    fresh
        .tell(Reading {
            sensor: 0,
            value: 42,
        })
        .map_err(|e| e.to_string())?;
    let from = if rt.backend() == BackendKind::Cpu {
        "the checkpointed state"
    } else {
        "a fresh state (no checkpoints on this backend)"
    };
    println!(
        "new incarnation serves again, from {from} (count, sum, max): {:?}",
        fresh.ask(Summary).await?
    );

    for s in sensors {
        s.stop(None);
    }
    sup.stop(None);
    sup_handle.await?;
    Ok(())
}
