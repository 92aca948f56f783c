//! GPU actor (cpu backend) vs native actor workloads, per framework.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ringkernel::conformance::{Add, Echo, Probe, Total};
use ringkernel::runtime::Runtime;
use ringkernel_ractor::{GpuActor, GpuActorRef};
use std::hint::black_box;

/// A native ractor actor doing what the `Probe` kernel does for `Echo`,
/// `Add` and `Total`.
pub struct NativeProbe;

/// Messages of [`NativeProbe`].
pub enum NativeMsg {
    /// Ask: echo.
    Echo(u64, RpcReplyPort<u64>),
    /// Tell: add.
    Add(u64),
    /// Ask: total.
    Total(RpcReplyPort<u64>),
}

impl Actor for NativeProbe {
    type Msg = NativeMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<NativeMsg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _: ActorRef<NativeMsg>,
        msg: NativeMsg,
        total: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NativeMsg::Echo(v, port) => {
                let _ = port.send(v);
            }
            NativeMsg::Add(v) => *total += v,
            NativeMsg::Total(port) => {
                let _ = port.send(*total);
            }
        }
        Ok(())
    }
}

/// A native ractor actor that hands each message to a thread of its own
/// over a std channel, which does what [`NativeProbe`] does and answers
/// the port itself: what a ractor user writes by hand to run work off the
/// tokio workers, and the same three threads (sender, actor, a thread that
/// serves) as a GPU actor on the cpu backend. The bench report compares
/// the GPU actor with it to separate the cost of a third thread on few
/// cores from the cost of the ring protocol.
pub struct Handoff;

impl Actor for Handoff {
    type Msg = NativeMsg;
    type State = std::sync::mpsc::Sender<NativeMsg>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<NativeMsg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(handoff_thread(|msg, total| match msg {
            NativeMsg::Echo(v, port) => {
                let _ = port.send(v);
            }
            NativeMsg::Add(v) => *total += v,
            NativeMsg::Total(port) => {
                let _ = port.send(*total);
            }
        }))
    }

    async fn handle(
        &self,
        _: ActorRef<NativeMsg>,
        msg: NativeMsg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        tx.send(msg)
            .map_err(|_| "the handoff thread is gone".into())
    }
}

/// Both actors of the ractor comparison, on one tokio runtime.
pub struct RactorPair {
    /// The tokio runtime the callers run on.
    pub tokio: tokio::runtime::Runtime,
    gpu: GpuActorRef<Probe>,
    native: ActorRef<NativeMsg>,
    handoff: ActorRef<NativeMsg>,
    _rk: Runtime,
}

impl RactorPair {
    /// Spawns a GPU actor (cpu backend) and a native actor.
    pub fn new() -> Self {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio");
        let rk = Runtime::new().expect("ringkernel runtime");
        let (gpu, native, handoff) = tokio.block_on(async {
            let (g, _) = Actor::spawn(None, GpuActor::<Probe>::new(rk.clone()), Default::default())
                .await
                .expect("spawn gpu");
            let (n, _) = Actor::spawn(None, NativeProbe, ())
                .await
                .expect("spawn native");
            let (h, _) = Actor::spawn(None, Handoff, ())
                .await
                .expect("spawn handoff");
            (GpuActorRef::new(g), n, h)
        });
        RactorPair {
            tokio,
            gpu,
            native,
            handoff,
            _rk: rk,
        }
    }

    /// `n` sequential asks to the GPU actor.
    pub fn gpu_asks(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                black_box(self.gpu.ask(Echo(i)).await.expect("reply"));
            }
        })
    }

    /// `n` sequential `call`s to the native actor.
    pub fn native_calls(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                black_box(ractor::call!(self.native, NativeMsg::Echo, i).expect("reply"));
            }
        })
    }

    /// `n` tells to the GPU actor, then one ask that sees them all processed.
    pub fn gpu_tells(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                self.gpu.tell(Add(i)).expect("tell");
            }
            black_box(self.gpu.ask(Total()).await.expect("total"));
        })
    }

    /// `n` casts to the native actor, then one call that sees them all.
    pub fn native_casts(&self, n: u64) {
        Self::casts(&self.tokio, &self.native, n)
    }

    /// `n` sequential `call`s to the [`Handoff`] actor.
    pub fn handoff_calls(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                black_box(ractor::call!(self.handoff, NativeMsg::Echo, i).expect("reply"));
            }
        })
    }

    /// `n` casts to the [`Handoff`] actor, then one call that sees them all.
    pub fn handoff_casts(&self, n: u64) {
        Self::casts(&self.tokio, &self.handoff, n)
    }

    fn casts(tokio: &tokio::runtime::Runtime, to: &ActorRef<NativeMsg>, n: u64) {
        tokio.block_on(async {
            for i in 0..n {
                ractor::cast!(to, NativeMsg::Add(i)).expect("cast");
            }
            black_box(ractor::call!(to, NativeMsg::Total).expect("total"));
        })
    }
}

impl Default for RactorPair {
    fn default() -> Self {
        Self::new()
    }
}

/// The core path of an ask without any actor framework: a plain thread
/// asks a GPU actor slot (cpu backend) and blocks on a std channel; the
/// baseline is the same round trip to an echo thread over std channels.
pub struct CorePair {
    slot: ringkernel::runtime::GpuSlot<ringkernel::conformance::ChannelWaiter>,
    to_echo: std::sync::mpsc::SyncSender<u64>,
    from_echo: std::sync::mpsc::Receiver<u64>,
    _rk: Runtime,
}

impl CorePair {
    /// Launches a `Probe` slot and an echo thread.
    pub fn new() -> Self {
        let rk = Runtime::new().expect("ringkernel runtime");
        let slot = rk
            .launch::<Probe, ringkernel::conformance::ChannelWaiter>(
                Default::default(),
                &ringkernel::runtime::LaunchOptions::default(),
                |_| {},
            )
            .expect("launch");
        let (to_echo, rx) = std::sync::mpsc::sync_channel::<u64>(1);
        let (tx, from_echo) = std::sync::mpsc::sync_channel::<u64>(1);
        std::thread::spawn(move || {
            while let Ok(v) = rx.recv() {
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        CorePair {
            slot,
            to_echo,
            from_echo,
            _rk: rk,
        }
    }

    /// `n` sequential blocking asks to the slot.
    pub fn slot_asks(&mut self, n: u64) {
        for i in 0..n {
            let r = ringkernel::conformance::ask(&mut self.slot, Echo(i))
                .wait()
                .expect("reply");
            black_box(r.decode::<u64>().expect("u64"));
        }
    }

    /// `n` sequential round trips to the echo thread.
    pub fn echo_thread_round_trips(&mut self, n: u64) {
        for i in 0..n {
            self.to_echo.send(i).expect("echo thread");
            black_box(self.from_echo.recv().expect("echo thread"));
        }
    }
}

impl Default for CorePair {
    fn default() -> Self {
        Self::new()
    }
}

/// What the actix and kameo handoff actors pass to their thread.
enum Handed {
    Echo(u64, tokio::sync::oneshot::Sender<u64>),
    Add(u64),
    Total(tokio::sync::oneshot::Sender<u64>),
}

/// Spawns the thread of a handoff actor: it serves each message sent on
/// the returned channel with `serve`, over a running total (what `Probe`'s
/// state is).
fn handoff_thread<M: Send + 'static>(
    mut serve: impl FnMut(M, &mut u64) + Send + 'static,
) -> std::sync::mpsc::Sender<M> {
    let (tx, rx) = std::sync::mpsc::channel::<M>();
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            let mut total = 0u64;
            while let Ok(msg) = rx.recv() {
                serve(msg, &mut total);
            }
        })
        .expect("spawn the handoff thread");
    tx
}

/// The thread of the actix and kameo handoff actors (see [`Handoff`]).
fn handed_thread() -> std::sync::mpsc::Sender<Handed> {
    handoff_thread(|msg, total| match msg {
        Handed::Echo(v, reply) => {
            let _ = reply.send(v);
        }
        Handed::Add(v) => *total += v,
        Handed::Total(reply) => {
            let _ = reply.send(*total);
        }
    })
}

/// Hands an ask to the handoff thread; the receiver gets its answer.
fn hand_ask(
    tx: &std::sync::mpsc::Sender<Handed>,
    f: impl FnOnce(tokio::sync::oneshot::Sender<u64>) -> Handed,
) -> tokio::sync::oneshot::Receiver<u64> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(f(reply)).expect("the handoff thread is gone");
    answer
}

/// The actix version of [`Handoff`]: answers through a `ResponseFuture`.
pub struct HandoffActix {
    tx: std::sync::mpsc::Sender<Handed>,
}

impl actix::Actor for HandoffActix {
    type Context = actix::Context<Self>;
}

impl actix::Handler<NEcho> for HandoffActix {
    type Result = actix::ResponseFuture<u64>;
    fn handle(&mut self, NEcho(v): NEcho, _: &mut Self::Context) -> Self::Result {
        let answer = hand_ask(&self.tx, |r| Handed::Echo(v, r));
        Box::pin(async move { answer.await.expect("handoff answer") })
    }
}

impl actix::Handler<NAdd> for HandoffActix {
    type Result = ();
    fn handle(&mut self, NAdd(v): NAdd, _: &mut Self::Context) {
        self.tx
            .send(Handed::Add(v))
            .expect("the handoff thread is gone");
    }
}

impl actix::Handler<NTotal> for HandoffActix {
    type Result = actix::ResponseFuture<u64>;
    fn handle(&mut self, _: NTotal, _: &mut Self::Context) -> Self::Result {
        let answer = hand_ask(&self.tx, Handed::Total);
        Box::pin(async move { answer.await.expect("handoff answer") })
    }
}

/// The kameo version of [`Handoff`]: the handler awaits the thread's answer.
pub struct HandoffKameo {
    tx: std::sync::mpsc::Sender<Handed>,
}

impl kameo::Actor for HandoffKameo {
    type Args = ();
    type Error = std::convert::Infallible;
    async fn on_start(_: (), _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(HandoffKameo {
            tx: handed_thread(),
        })
    }
}

impl kameo::message::Message<NEcho> for HandoffKameo {
    type Reply = u64;
    async fn handle(&mut self, NEcho(v): NEcho, _: &mut kameo::message::Context<Self, u64>) -> u64 {
        let answer = hand_ask(&self.tx, |r| Handed::Echo(v, r));
        answer.await.expect("handoff answer")
    }
}

impl kameo::message::Message<NAdd> for HandoffKameo {
    type Reply = ();
    async fn handle(&mut self, NAdd(v): NAdd, _: &mut kameo::message::Context<Self, ()>) {
        self.tx
            .send(Handed::Add(v))
            .expect("the handoff thread is gone");
    }
}

impl kameo::message::Message<NTotal> for HandoffKameo {
    type Reply = u64;
    async fn handle(&mut self, _: NTotal, _: &mut kameo::message::Context<Self, u64>) -> u64 {
        let answer = hand_ask(&self.tx, Handed::Total);
        answer.await.expect("handoff answer")
    }
}

/// A native actix actor doing what `Probe` does for `Echo` and `Add`.
#[derive(Default)]
pub struct NativeActix {
    total: u64,
}

impl actix::Actor for NativeActix {
    type Context = actix::Context<Self>;
}

/// Native actix ask.
pub struct NEcho(pub u64);
impl actix::Message for NEcho {
    type Result = u64;
}

/// Native actix tell.
pub struct NAdd(pub u64);
impl actix::Message for NAdd {
    type Result = ();
}

/// Native actix ask of the total.
pub struct NTotal;
impl actix::Message for NTotal {
    type Result = u64;
}

impl actix::Handler<NEcho> for NativeActix {
    type Result = u64;
    fn handle(&mut self, NEcho(v): NEcho, _: &mut Self::Context) -> u64 {
        v
    }
}

impl actix::Handler<NAdd> for NativeActix {
    type Result = ();
    fn handle(&mut self, NAdd(v): NAdd, _: &mut Self::Context) {
        self.total += v;
    }
}

impl actix::Handler<NTotal> for NativeActix {
    type Result = u64;
    fn handle(&mut self, _: NTotal, _: &mut Self::Context) -> u64 {
        self.total
    }
}

/// A GPU actor and a native actor, each on its own arbiter (thread), asked
/// from the system's thread: "an actor on another thread" for both.
pub struct ActixPair {
    system: actix_rt::SystemRunner,
    gpu: actix::Addr<ringkernel_actix::GpuActor<Probe>>,
    native: actix::Addr<NativeActix>,
    handoff: actix::Addr<HandoffActix>,
}

impl ActixPair {
    /// Starts both actors on arbiters of a new actix system.
    pub fn new() -> Self {
        let system = actix_rt::System::new();
        let rk = Runtime::new().expect("ringkernel runtime");
        let (gpu, native, handoff) = system.block_on(async move {
            let gpu_arbiter = actix::Arbiter::new();
            let native_arbiter = actix::Arbiter::new();
            let gpu = <ringkernel_actix::GpuActor<Probe> as actix::Actor>::start_in_arbiter(
                &gpu_arbiter.handle(),
                move |_| ringkernel_actix::GpuActor::new(rk, Default::default()),
            );
            let native =
                <NativeActix as actix::Actor>::start_in_arbiter(&native_arbiter.handle(), |_| {
                    NativeActix { total: 0 }
                });
            let handoff =
                <HandoffActix as actix::Actor>::start_in_arbiter(&native_arbiter.handle(), |_| {
                    HandoffActix {
                        tx: handed_thread(),
                    }
                });
            (gpu, native, handoff)
        });
        ActixPair {
            system,
            gpu,
            native,
            handoff,
        }
    }

    /// `n` sequential asks to the GPU actor.
    pub fn gpu_asks(&self, n: u64) {
        self.system.block_on(async {
            for i in 0..n {
                black_box(
                    self.gpu
                        .send(ringkernel_actix::Ask(Echo(i)))
                        .await
                        .expect("mailbox")
                        .expect("reply"),
                );
            }
        })
    }

    /// `n` sequential asks to the native actor.
    pub fn native_asks(&self, n: u64) {
        self.system.block_on(async {
            for i in 0..n {
                black_box(self.native.send(NEcho(i)).await.expect("reply"));
            }
        })
    }

    /// `n` tells (`do_send`) to the GPU actor, then an ask that sees them.
    pub fn gpu_tells(&self, n: u64) {
        self.system.block_on(async {
            for i in 0..n {
                self.gpu.do_send(ringkernel_actix::Tell(Add(i)));
            }
            black_box(
                self.gpu
                    .send(ringkernel_actix::Ask(Total()))
                    .await
                    .expect("mailbox")
                    .expect("total"),
            );
        })
    }

    /// `n` tells (`do_send`) to the native actor, then an ask that sees them.
    pub fn native_tells(&self, n: u64) {
        self.system.block_on(async {
            for i in 0..n {
                self.native.do_send(NAdd(i));
            }
            black_box(self.native.send(NTotal).await.expect("total"));
        })
    }

    /// `n` sequential asks to the [`HandoffActix`] actor.
    pub fn handoff_asks(&self, n: u64) {
        self.system.block_on(async {
            for i in 0..n {
                black_box(self.handoff.send(NEcho(i)).await.expect("reply"));
            }
        })
    }

    /// `n` tells (`do_send`) to the [`HandoffActix`] actor, then an ask.
    pub fn handoff_tells(&self, n: u64) {
        self.system.block_on(async {
            for i in 0..n {
                self.handoff.do_send(NAdd(i));
            }
            black_box(self.handoff.send(NTotal).await.expect("total"));
        })
    }
}

impl Default for ActixPair {
    fn default() -> Self {
        Self::new()
    }
}

/// A native kameo actor doing what `Probe` does for `Echo` and `Add`.
pub struct NativeKameo {
    total: u64,
}

impl kameo::Actor for NativeKameo {
    type Args = ();
    type Error = std::convert::Infallible;
    async fn on_start(_: (), _: kameo::actor::ActorRef<Self>) -> Result<Self, Self::Error> {
        Ok(NativeKameo { total: 0 })
    }
}

impl kameo::message::Message<NEcho> for NativeKameo {
    type Reply = u64;
    async fn handle(&mut self, NEcho(v): NEcho, _: &mut kameo::message::Context<Self, u64>) -> u64 {
        v
    }
}

impl kameo::message::Message<NAdd> for NativeKameo {
    type Reply = ();
    async fn handle(&mut self, NAdd(v): NAdd, _: &mut kameo::message::Context<Self, ()>) {
        self.total += v;
    }
}

impl kameo::message::Message<NTotal> for NativeKameo {
    type Reply = u64;
    async fn handle(&mut self, _: NTotal, _: &mut kameo::message::Context<Self, u64>) -> u64 {
        self.total
    }
}

/// A GPU actor and a native kameo actor on one tokio runtime.
pub struct KameoPair {
    tokio: tokio::runtime::Runtime,
    gpu: kameo::actor::ActorRef<ringkernel_kameo::GpuActor<Probe>>,
    native: kameo::actor::ActorRef<NativeKameo>,
    handoff: kameo::actor::ActorRef<HandoffKameo>,
}

impl KameoPair {
    /// Spawns both actors.
    pub fn new() -> Self {
        use kameo::actor::Spawn;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio");
        let rk = Runtime::new().expect("ringkernel runtime");
        let (gpu, native, handoff) = tokio.block_on(async move {
            (
                ringkernel_kameo::GpuActor::<Probe>::spawn(ringkernel_kameo::GpuArgs::new(
                    rk,
                    Default::default(),
                )),
                NativeKameo::spawn(()),
                HandoffKameo::spawn(()),
            )
        });
        KameoPair {
            tokio,
            gpu,
            native,
            handoff,
        }
    }

    /// `n` sequential asks to the GPU actor.
    pub fn gpu_asks(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                black_box(
                    self.gpu
                        .ask(ringkernel_kameo::Ask(Echo(i)))
                        .await
                        .expect("reply"),
                );
            }
        })
    }

    /// `n` sequential asks to the native actor.
    pub fn native_asks(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                black_box(self.native.ask(NEcho(i)).await.expect("reply"));
            }
        })
    }

    /// `n` tells to the GPU actor, then an ask that sees them.
    pub fn gpu_tells(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                self.gpu
                    .tell(ringkernel_kameo::Tell(Add(i)))
                    .await
                    .expect("tell");
            }
            black_box(
                self.gpu
                    .ask(ringkernel_kameo::Ask(Total()))
                    .await
                    .expect("total"),
            );
        })
    }

    /// `n` tells to the native actor, then an ask that sees them.
    pub fn native_tells(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                self.native.tell(NAdd(i)).await.expect("tell");
            }
            black_box(self.native.ask(NTotal).await.expect("total"));
        })
    }

    /// `n` sequential asks to the [`HandoffKameo`] actor.
    pub fn handoff_asks(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                black_box(self.handoff.ask(NEcho(i)).await.expect("reply"));
            }
        })
    }

    /// `n` tells to the [`HandoffKameo`] actor, then an ask that sees them.
    pub fn handoff_tells(&self, n: u64) {
        self.tokio.block_on(async {
            for i in 0..n {
                self.handoff.tell(NAdd(i)).await.expect("tell");
            }
            black_box(self.handoff.ask(NTotal).await.expect("total"));
        })
    }
}

impl Default for KameoPair {
    fn default() -> Self {
        Self::new()
    }
}
