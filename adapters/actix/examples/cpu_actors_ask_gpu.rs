//! An actix app where several CPU actors ask one GPU actor (cpu backend by
//! default).
//!
//! Four `Client` actors each ask the `counter` GPU actor to add numbers and
//! report its running total; the GPU actor keeps its state between
//! messages and serves the clients' asks in mailbox order.
//!
//! `cargo run --release -p ringkernel-actix --example cpu_actors_ask_gpu`
//! (`-- --backend cuda|c-host` for the CUDA handler, `-- --backend wgpu`
//! for the WGSL one; `cuda` and `wgpu` fall back to the cpu backend, saying
//! why, without a GPU or adapter).

use actix::prelude::*;
use bytemuck::{Pod, Zeroable};
use ringkernel::kernel::{CpuHandlers, Kernel, Message as KernelMessage};
use ringkernel_actix::{Ask, GpuActor};

/// Ask: add to the total, reply with the new total.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct AddAndGet(u64);
impl KernelMessage for AddAndGet {
    const TYPE_ID: u32 = 1;
    type Reply = u64;
}

struct Counter;
impl Kernel for Counter {
    type State = u64;
    const NAME: &'static str = "counter";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new().on::<AddAndGet>(|total, AddAndGet(n), ctx| {
                *total += n;
                ctx.reply(*total);
                Ok(())
            }),
        )
    }

    fn cuda() -> Option<ringkernel::backend::CudaHandler> {
        Some(ringkernel::backend::CudaHandler {
            source: r#"
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    uint64_t* total = (uint64_t*)state;
    *total += rk_get_u64(payload, 0);
    return rk_reply_u64(reply, *total);
}
"#,
            types: &[AddAndGet::TYPE_ID],
            max_later: 0,
        })
    }

    /// The total as two `u32` words (low first), with the carry.
    fn wgsl() -> Option<ringkernel::backend::WgslHandler> {
        Some(ringkernel::backend::WgslHandler {
            source: r#"
fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    let lo = (*state)[0] + msg.payload[0];
    (*state)[1] = (*state)[1] + msg.payload[1] + select(0u, 1u, lo < msg.payload[0]);
    (*state)[0] = lo;
    (*reply).len = 8u;
    (*reply).payload[0] = (*state)[0];
    (*reply).payload[1] = (*state)[1];
    return RK_REPLIED;
}
"#,
            types: &[AddAndGet::TYPE_ID],
            max_later: 0,
        })
    }
}

/// A CPU actor that asks the GPU actor.
struct Client {
    id: u64,
    gpu: Addr<GpuActor<Counter>>,
}

impl Actor for Client {
    type Context = Context<Self>;
}

/// Run `n` asks, return the last total seen.
struct Work(u64);
impl actix::Message for Work {
    type Result = Result<u64, String>;
}

impl Handler<Work> for Client {
    type Result = ResponseFuture<Result<u64, String>>;

    fn handle(&mut self, Work(n): Work, _: &mut Context<Self>) -> Self::Result {
        let (gpu, id) = (self.gpu.clone(), self.id);
        Box::pin(async move {
            let mut last = 0;
            for _ in 0..n {
                last = gpu
                    .send(Ask(AddAndGet(id)))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            }
            Ok(last)
        })
    }
}

#[actix_rt::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = match ringkernel_cuda::backend_arg().as_str() {
        "wgpu" => ringkernel_wgpu::runtime_or_cpu()?,
        other => ringkernel_cuda::runtime_named(other, |b| b.kernel::<Counter>())?,
    };
    let backend = rt.backend();
    let gpu = GpuActor::<Counter>::new(rt, 0).start();
    let clients: Vec<_> = (1..=4)
        .map(|id| {
            Client {
                id,
                gpu: gpu.clone(),
            }
            .start()
        })
        .collect();
    let asks = 2_500;
    let started = std::time::Instant::now();
    let mut pending = Vec::new();
    for c in &clients {
        pending.push(c.send(Work(asks)));
    }
    for (i, p) in pending.into_iter().enumerate() {
        println!("client {}: last total it saw {}", i + 1, p.await??);
    }
    let total = gpu.send(Ask(AddAndGet(0))).await??;
    let expected: u64 = (1..=4).map(|id| id * asks).sum();
    println!(
        "GPU actor ({backend:?} backend) served {} asks from 4 CPU actors in {:.1} ms; total {total} (expected {expected})",
        4 * asks + 1,
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(total, expected);
    System::current().stop();
    Ok(())
}
