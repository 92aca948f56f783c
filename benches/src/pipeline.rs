//! A four-stage pipeline — ingest → stage 1 → stage 2 → sink — with the
//! two middle stages as GPU actors (cpu backend) that send to the next one
//! by id (routed by the poller), against the same pipeline of native ractor
//! actors that `cast!` to the next one. Ingest and sink run on the same
//! tokio runtime in both.

use bytemuck::{Pod, Zeroable};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, Kernel, Message};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::Runtime;
use ringkernel_ractor::{GpuActor, GpuActorRef, GpuMailbox};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A reading on its way: its number and a value each stage transforms.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Item {
    /// Its number.
    pub seq: u64,
    /// The value.
    pub value: u64,
}

impl Message for Item {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

/// Ask: where this stage sends (an `ActorId`'s bits).
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Wire(pub u64);

impl Message for Wire {
    const TYPE_ID: u32 = 2;
    type Reply = u64;
}

/// A GPU stage: scales the value and sends it on.
pub struct Stage;

impl Kernel for Stage {
    /// The next stage's id bits.
    type State = u64;
    const NAME: &'static str = "pipeline-stage";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|next: &mut u64, Wire(to), ctx| {
                    *next = to;
                    ctx.reply(to);
                    Ok(())
                })
                .on(|next: &mut u64, i: Item, ctx| {
                    ctx.send(
                        ActorId::from_bits(*next),
                        Item {
                            seq: i.seq,
                            value: i.value.wrapping_mul(3).wrapping_add(1),
                        },
                    );
                    Ok(())
                }),
        )
    }
}

/// The sink of the GPU pipeline: a mailbox feeding a channel.
struct SinkBox(mpsc::UnboundedSender<u64>);

impl Mailbox for SinkBox {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        let seq = d.payload.get::<Item>().map_or(u64::MAX, |i| i.seq);
        self.0.send(seq).map_err(|_| DeliveryError::Closed(d))
    }
}

/// A native stage: scales the value and casts it on.
pub struct NativeStage;

/// What a native stage passes on, and where.
pub enum NativeMsg {
    /// A reading.
    Item(Item),
}

impl Actor for NativeStage {
    type Msg = NativeMsg;
    type State = NativeNext;
    type Arguments = NativeNext;

    async fn pre_start(
        &self,
        _: ActorRef<NativeMsg>,
        next: NativeNext,
    ) -> Result<NativeNext, ActorProcessingErr> {
        Ok(next)
    }

    async fn handle(
        &self,
        _: ActorRef<NativeMsg>,
        NativeMsg::Item(i): NativeMsg,
        next: &mut NativeNext,
    ) -> Result<(), ActorProcessingErr> {
        let i = Item {
            seq: i.seq,
            value: i.value.wrapping_mul(3).wrapping_add(1),
        };
        match next {
            NativeNext::Stage(a) => a.send_message(NativeMsg::Item(i))?,
            NativeNext::Sink(tx) => tx.send(i.seq)?,
        }
        Ok(())
    }
}

/// Where a native stage sends.
pub enum NativeNext {
    /// Another stage.
    Stage(ActorRef<NativeMsg>),
    /// The sink.
    Sink(mpsc::UnboundedSender<u64>),
}

/// Both pipelines on one tokio runtime.
pub struct Pipelines {
    /// The tokio runtime ingest and sinks run on.
    pub tokio: tokio::runtime::Runtime,
    gpu_in: GpuActorRef<Stage>,
    gpu_out: mpsc::UnboundedReceiver<u64>,
    native_in: ActorRef<NativeMsg>,
    native_out: mpsc::UnboundedReceiver<u64>,
    _rt: Runtime,
}

impl Pipelines {
    /// Builds both pipelines, stage 1 sending to stage 2 by id (routed by
    /// the poller).
    pub fn new() -> Self {
        Self::build(false)
    }

    /// As [`Pipelines::new`], stage 1 linked to stage 2 by K2K.
    pub fn linked() -> Self {
        Self::build(true)
    }

    fn build(k2k: bool) -> Self {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio");
        let rt = Runtime::new().expect("runtime");
        let (gpu_in, gpu_out, native_in, native_out) = tokio.block_on(async {
            let (tx, gpu_out) = mpsc::unbounded_channel();
            let sink = ActorId::cpu(rt.node(), 1);
            rt.registry().register(sink, Arc::new(SinkBox(tx)));
            let s2_actor = GpuActor::<Stage>::new(rt.clone());
            let s2_id = s2_actor.home().id();
            let (s2, _) = Actor::spawn(None, s2_actor, 0).await.expect("stage 2");
            rt.registry()
                .register(s2_id, Arc::new(GpuMailbox::new::<Stage>(s2.clone())));
            let s1_actor = GpuActor::<Stage>::new(rt.clone());
            let s1_id = s1_actor.home().id();
            let (s1, _) = Actor::spawn(None, s1_actor, 0).await.expect("stage 1");
            if k2k {
                rt.connect(s1_id, s2_id, ringkernel::link::LinkOptions::default())
                    .expect("connect");
            }
            let (s1, s2) = (GpuActorRef::<Stage>::new(s1), GpuActorRef::<Stage>::new(s2));
            s2.ask(Wire(sink.to_bits())).await.expect("wire");
            s1.ask(Wire(s2_id.to_bits())).await.expect("wire");

            let (tx, native_out) = mpsc::unbounded_channel();
            let (n2, _) = Actor::spawn(None, NativeStage, NativeNext::Sink(tx))
                .await
                .expect("native 2");
            let (n1, _) = Actor::spawn(None, NativeStage, NativeNext::Stage(n2))
                .await
                .expect("native 1");
            (s1, gpu_out, n1, native_out)
        });
        Pipelines {
            tokio,
            gpu_in,
            gpu_out,
            native_in,
            native_out,
            _rt: rt,
        }
    }

    /// `n` readings one at a time through the GPU pipeline (each waits for
    /// the previous to reach the sink): end-to-end latency per reading.
    pub fn gpu_one_at_a_time(&mut self, n: u64) {
        self.tokio.block_on(async {
            for seq in 0..n {
                self.gpu_in.tell(Item { seq, value: seq }).expect("tell");
                self.gpu_out.recv().await.expect("sink");
            }
        })
    }

    /// The same through the native pipeline.
    pub fn native_one_at_a_time(&mut self, n: u64) {
        self.tokio.block_on(async {
            for seq in 0..n {
                self.native_in
                    .send_message(NativeMsg::Item(Item { seq, value: seq }))
                    .expect("cast");
                self.native_out.recv().await.expect("sink");
            }
        })
    }

    /// `n` readings sent as fast as possible, then all received: time per
    /// reading (throughput).
    pub fn gpu_flood(&mut self, n: u64) {
        self.tokio.block_on(async {
            for seq in 0..n {
                self.gpu_in.tell(Item { seq, value: seq }).expect("tell");
            }
            for _ in 0..n {
                self.gpu_out.recv().await.expect("sink");
            }
        })
    }

    /// The same through the native pipeline.
    pub fn native_flood(&mut self, n: u64) {
        self.tokio.block_on(async {
            for seq in 0..n {
                self.native_in
                    .send_message(NativeMsg::Item(Item { seq, value: seq }))
                    .expect("cast");
            }
            for _ in 0..n {
                self.native_out.recv().await.expect("sink");
            }
        })
    }
}

impl Default for Pipelines {
    fn default() -> Self {
        Self::new()
    }
}
