//! A kameo app with a supervised GPU actor (cpu backend by default) that is
//! made to fault and comes back.
//!
//! The supervisor is linked to the GPU actor; when the kernel's handler
//! panics, the GPU actor fails (kameo's panic path), the supervisor's
//! `on_link_died` sees it and spawns a new incarnation, which serves again.
//!
//! `cargo run --release -p ringkernel-kameo --example supervised_gpu_actor`
//! (`-- --backend cuda|c-host` for the CUDA handler, `-- --backend wgpu`
//! for the WGSL one; `cuda` and `wgpu` fall back to the cpu backend, saying
//! why, without a GPU or adapter).

use kameo::Actor;
use kameo::actor::{ActorRef, Spawn, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::prelude::*;
use ringkernel::conformance::{Add, Echo, Explode, Probe, Total};
use ringkernel::runtime::Runtime;
use ringkernel_kameo::{Ask, GpuActor, GpuArgs, Tell};
use std::ops::ControlFlow;
use tokio::sync::mpsc;

struct Supervisor {
    runtime: Runtime,
    restarted: mpsc::UnboundedSender<ActorRef<GpuActor<Probe>>>,
}

impl Actor for Supervisor {
    type Args = Self;
    type Error = std::convert::Infallible;

    async fn on_start(args: Self, _: ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(args)
    }

    async fn on_link_died(
        &mut self,
        me: WeakActorRef<Self>,
        id: ActorId,
        reason: ActorStopReason,
    ) -> Result<ControlFlow<ActorStopReason>, Self::Error> {
        println!("supervisor: GPU actor {id} died: {reason}");
        let fresh =
            GpuActor::<Probe>::spawn(GpuArgs::new(self.runtime.clone(), Default::default()));
        if let Some(me) = me.upgrade() {
            fresh.link(&me).await;
        }
        println!("supervisor: started a new GPU actor {}", fresh.id());
        let _ = self.restarted.send(fresh);
        Ok(ControlFlow::Continue(()))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = match ringkernel_cuda::backend_arg().as_str() {
        "wgpu" => ringkernel_wgpu::runtime_or_cpu()?,
        other => ringkernel_cuda::runtime_named(other, |b| b.kernel::<Probe>())?,
    };
    let (tx, mut restarted) = mpsc::unbounded_channel();
    let supervisor = Supervisor::spawn(Supervisor {
        runtime: runtime.clone(),
        restarted: tx,
    });
    let gpu = GpuActor::<Probe>::spawn(GpuArgs::new(runtime, Default::default()));
    gpu.link(&supervisor).await;

    for v in 1..=100 {
        gpu.tell(Tell(Add(v))).await?;
    }
    println!(
        "GPU actor {}: total after 100 tells = {}",
        gpu.id(),
        gpu.ask(Ask(Total())).await?
    );
    println!("asking it to run a handler that panics …");
    match gpu.ask(Ask(Explode())).await {
        Ok(v) => println!("unexpected reply {v}"),
        Err(e) => println!("the ask resolved with an error, not a hang: {e}"),
    }
    let fresh = restarted.recv().await.ok_or("no restart")?;
    println!(
        "new GPU actor {} echoes: {}",
        fresh.id(),
        fresh.ask(Ask(Echo(42))).await?
    );
    fresh.stop_gracefully().await?;
    fresh.wait_for_shutdown().await;
    Ok(())
}
