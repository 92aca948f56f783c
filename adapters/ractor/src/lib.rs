//! # ringkernel-ractor — GPU actors in ractor supervision trees
//!
//! [`GpuActor<K>`] is a ractor [`Actor`] whose work is done by a persistent
//! kernel `K`: spawning it launches `K` once (on the runtime's backend), and
//! every message becomes an envelope written into the kernel's H2K ring
//! *synchronously in the actor's handler*. Replies come back through the
//! runtime's poller thread (on the cpu backend, usually the slot's device
//! thread) straight into the caller's [`RpcReplyPort`], so
//! `call!`/`call_t!` and `cast!` work as for any ractor actor:
//!
//! | ractor | GPU actor |
//! |---|---|
//! | `call!(actor, GpuMsg::Ask, payload)` | ask: the `RpcReplyPort` waits in the waiter slab, the envelope goes to H2K |
//! | `cast!(actor, GpuMsg::Tell(payload))` | tell: the envelope goes to H2K |
//! | full H2K ring | the handler awaits space; later mailbox messages wait behind it, in order |
//! | kernel fault | the actor fails: its supervisor receives `SupervisionEvent::ActorFailed` |
//! | restart | the supervisor spawns a clone of the [`GpuActor`]: the same actor, its next incarnation |
//! | stop / kill | `post_stop` terminates the slot; on a kill, dropping the state is a non-blocking backstop |
//!
//! Restarts: a [`GpuActor`] carries its actor's [`ActorHome`]; spawning a
//! clone of it (from the supervisor's `handle_supervisor_evt`, on
//! `ActorFailed`) launches the next incarnation — the same actor index,
//! starting from the latest checkpoint, sending first whatever the faulted
//! incarnation handed back under [`PendingPolicy::Replay`](ringkernel::home::PendingPolicy).
//! ractor has no restart limits or back-off of its own: the supervisor
//! decides.
//!
//! [`GpuActorRef<K>`] adds typed helpers: `ask(msg).await` returns the
//! message's reply type, and a message type the kernel does not serve is a
//! typed error that hands the message back. ractor mailboxes are unbounded:
//! backpressure from a full ring holds the actor's handler, not the senders
//! (see `docs/semantics.md`).
//!
//! # Examples
//!
//! ```
//! use ractor::{Actor, call};
//! use ringkernel::conformance::{Echo, Probe};
//! use ringkernel::runtime::Runtime;
//! use ringkernel_ractor::{GpuActor, GpuActorRef, GpuMsg};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = Runtime::new()?;
//! let (actor, handle) = Actor::spawn(None, GpuActor::<Probe>::new(runtime), Default::default()).await?;
//!
//! // Exactly as any ractor actor: `call!` with the erased payload …
//! let reply = call!(actor, GpuMsg::Ask, Echo(7).into())??;
//! assert_eq!(reply.decode::<u64>()?, 7);
//!
//! // … or typed.
//! let gpu = GpuActorRef::<Probe>::new(actor.clone());
//! assert_eq!(gpu.ask(Echo(8)).await?, 8);
//!
//! actor.stop(None);
//! handle.await?;
//! # Ok(())
//! # }
//! ```

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ringkernel::control::LifecycleState;
use ringkernel::home::{ActorHome, DeadLetterReason, Replay, RouteFailure};
use ringkernel::id::ActorId;
use ringkernel::kernel::{Kernel, Message, Payload, Reply};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::{
    ActorController, AskError, CallError, Fault, GpuSlot, LaunchOptions, ReplayStatus, Runtime,
    SlotController, SlotEvent, SubmitError, Waiter,
};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Errors a GPU actor's caller can see.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// What any framework's caller can be told: the ask resolved without a
    /// value, an unserved type, a closed actor, an undecodable reply.
    #[error(transparent)]
    Call(#[from] CallError),
    /// ractor could not deliver the message or the reply (the actor is gone,
    /// or a `call_t!` timed out).
    #[error("ractor: {0}")]
    Rpc(String),
    /// A lifecycle request was refused.
    #[error(transparent)]
    State(#[from] ringkernel::StateError),
}

impl From<AskError> for GpuError {
    fn from(e: AskError) -> Self {
        GpuError::Call(CallError::Ask(e))
    }
}

impl From<ringkernel::DecodeError> for GpuError {
    fn from(e: ringkernel::DecodeError) -> Self {
        GpuError::Call(CallError::Decode(e))
    }
}

/// A send the typed handle refused; the message is handed back.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TellError<M> {
    /// The kernel serves no message of this type.
    #[error("the kernel does not serve this message type")]
    UnknownType(M),
    /// The actor is not running.
    #[error("the GPU actor is not running")]
    Stopped(M),
}

/// The messages a [`GpuActor`] handles.
#[derive(Debug)]
pub enum GpuMsg {
    /// An ask; the reply (or why there is none) goes to the port.
    Ask(Payload, RpcReplyPort<Result<Reply, GpuError>>),
    /// A tell.
    Tell(Payload),
    /// A delivery from the runtime's registry (a send by id or a publish):
    /// a tell that keeps its sender.
    Deliver(Delivery),
    /// Stop dequeuing: messages wait in H2K until [`GpuMsg::Activate`].
    Deactivate(RpcReplyPort<Result<(), GpuError>>),
    /// Serve again.
    Activate(RpcReplyPort<Result<(), GpuError>>),
    /// The slot's status (state, heartbeat, processed, H2K depth).
    Status(RpcReplyPort<GpuStatus>),
    /// From the runtime's poller: the slot faulted. Fails the actor.
    #[doc(hidden)]
    Event(SlotEvent),
}

/// What [`GpuMsg::Status`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuStatus {
    /// The device side's state.
    pub state: LifecycleState,
    /// Messages processed by this incarnation.
    pub processed: u64,
    /// Messages waiting in H2K.
    pub h2k_depth: u64,
    /// The actor id of the slot.
    pub id: ActorId,
}

/// The waiter of ractor GPU actors: the caller's reply port, parked in the
/// waiter slab.
pub struct Port(RpcReplyPort<Result<Reply, GpuError>>);

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Port")
    }
}

impl Waiter for Port {
    fn complete(self, outcome: Result<Reply, AskError>) {
        // The caller may have timed out and gone: nothing to deliver then.
        let _ = self.0.send(outcome.map_err(GpuError::from));
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A ractor actor backed by an actor slot of kernel `K`.
///
/// `Arguments` is the kernel's initial state. A clone is the same actor:
/// spawning it after a fault starts its next incarnation.
pub struct GpuActor<K: Kernel> {
    runtime: Runtime,
    options: LaunchOptions,
    terminate_timeout: Duration,
    controller: ActorController,
    home: ActorHome<Port>,
    _kernel: PhantomData<fn() -> K>,
}

impl<K: Kernel> Clone for GpuActor<K> {
    fn clone(&self) -> Self {
        GpuActor {
            runtime: self.runtime.clone(),
            options: self.options.clone(),
            terminate_timeout: self.terminate_timeout,
            controller: self.controller.clone(),
            home: self.home.clone(),
            _kernel: PhantomData,
        }
    }
}

impl<K: Kernel> std::fmt::Debug for GpuActor<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuActor")
            .field("kernel", &K::NAME)
            .field("options", &self.options)
            .finish()
    }
}

impl<K: Kernel> GpuActor<K> {
    /// A GPU actor on `runtime` with default [`LaunchOptions`].
    pub fn new(runtime: Runtime) -> Self {
        Self::with_options(runtime, LaunchOptions::default())
    }

    /// A GPU actor on `runtime` launched with `options`.
    pub fn with_options(runtime: Runtime, options: LaunchOptions) -> Self {
        GpuActor {
            home: runtime.home(),
            runtime,
            options,
            terminate_timeout: Duration::from_secs(5),
            controller: ActorController::new(),
            _kernel: PhantomData,
        }
    }

    /// The actor's identity across incarnations (history, checkpoint,
    /// messages waiting for replay).
    pub fn home(&self) -> &ActorHome<Port> {
        &self.home
    }

    /// A lifecycle handle that bypasses the mailbox, available once the
    /// actor has started. Take it before spawning: while a full H2K ring
    /// holds the actor's handler, a `GpuMsg::Activate` waits in the mailbox
    /// behind the blocked message, but this handle still reaches the kernel.
    pub fn controller(&self) -> GpuController {
        GpuController(self.controller.clone())
    }

    /// How long `post_stop` waits for the kernel to acknowledge termination
    /// (default 5 s; a kernel that does not is fenced and left behind).
    pub fn terminate_timeout(mut self, timeout: Duration) -> Self {
        self.terminate_timeout = timeout;
        self
    }
}

/// The actor's state: its slot (the one writer of its H2K ring).
pub struct GpuActorState {
    slot: Option<GpuSlot<Port>>,
    /// Set by a fault: the actor drains its mailbox, then fails.
    failed: Option<Fault>,
}

impl std::fmt::Debug for GpuActorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuActorState")
            .field("slot", &self.slot)
            .finish()
    }
}

/// What is left of a message the ring had no room for: awaited by
/// [`GpuActor::handle`], so the mailbox behind it waits too (backpressure in
/// order). Boxed: the common case (room in the ring) stays a small future
/// that ractor moves per message.
type Wait<'a> = Pin<Box<dyn Future<Output = Result<(), ActorProcessingErr>> + Send + 'a>>;

/// Pushes a tell, or hands it back or dead-letters it; `Some` when the ring is
/// full (the rest waits for room).
fn tell_now(slot: &mut GpuSlot<Port>, payload: Payload, src: ActorId) -> Option<Wait<'_>> {
    match slot.tell(payload, src) {
        Ok(()) => None,
        Err(SubmitError::Full(back)) => Some(Box::pin(async move {
            let mut payload = back;
            loop {
                slot.space().await;
                match slot.tell(payload, src) {
                    Err(SubmitError::Full(back)) => payload = back,
                    other => {
                        tell_refused(slot, other, src);
                        return Ok(());
                    }
                }
            }
        })),
        other => {
            tell_refused(slot, other, src);
            None
        }
    }
}

/// What becomes of a tell the slot did not take for a reason other than a
/// full ring.
fn tell_refused(slot: &mut GpuSlot<Port>, result: Result<(), SubmitError<Payload>>, src: ActorId) {
    match result {
        Ok(()) | Err(SubmitError::Full(_)) => {}
        Err(SubmitError::Closed(payload)) => slot.hand_back(Replay::Tell { payload, src }),
        Err(e) => {
            // ractor's cast has no way back to the sender: the refusal is a
            // dead letter (the typed handle and `GpuMailbox` check before
            // sending).
            slot.dead_letter(
                e.into_inner(),
                src,
                DeadLetterReason::Unroutable(RouteFailure::Refused),
            );
        }
    }
}

/// Pushes an ask with its port in the waiter slab, or answers the port; `Some`
/// when the ring is full (the rest waits for room).
fn ask_now(
    slot: &mut GpuSlot<Port>,
    payload: Payload,
    port: Port,
    me: ActorId,
) -> Result<Option<Wait<'_>>, ActorProcessingErr> {
    match slot.ask(payload, port, me) {
        Ok(_) => Ok(None),
        Err(SubmitError::Full(back)) => Ok(Some(Box::pin(async move {
            let mut item = back;
            loop {
                slot.space().await;
                match slot.ask(item.0, item.1, me) {
                    Err(SubmitError::Full(back)) => item = back,
                    other => return ask_refused(slot, other.map(|_| ()), me),
                }
            }
        }))),
        Err(e) => ask_refused(slot, Err(e), me).map(|()| None),
    }
}

/// What becomes of an ask the slot did not take for a reason other than a
/// full ring.
fn ask_refused(
    slot: &mut GpuSlot<Port>,
    result: Result<(), SubmitError<(Payload, Port)>>,
    me: ActorId,
) -> Result<(), ActorProcessingErr> {
    match result {
        Ok(()) | Err(SubmitError::Full(_)) => Ok(()),
        Err(SubmitError::UnknownType {
            value: (_, port),
            type_id,
        }) => {
            let _ = port.0.send(Err(CallError::UnknownType { type_id }.into()));
            Ok(())
        }
        Err(SubmitError::Closed((payload, waiter))) => {
            // The slot's pending policy: replayed after a fault, or failed.
            slot.hand_back(Replay::Ask {
                payload,
                waiter,
                src: me,
            });
            Ok(())
        }
        Err(e) => Err(format!("unexpected submit error {e:?}").into()),
    }
}

impl<K: Kernel> GpuActor<K> {
    /// Serves one mailbox message; `Some` when it waits for ring room.
    fn serve<'a>(
        &self,
        myself: &ActorRef<GpuMsg>,
        msg: GpuMsg,
        state: &'a mut GpuActorState,
    ) -> Result<Option<Wait<'a>>, ActorProcessingErr> {
        let Some(slot) = state.slot.as_mut() else {
            return Ok(None);
        };
        let me = ActorId::cpu(
            self.runtime.node(),
            (myself.get_id().pid() & 0xFF_FFFF) as u32,
        );
        match msg {
            GpuMsg::Ask(payload, port) => return ask_now(slot, payload, Port(port), me),
            GpuMsg::Tell(payload) => return Ok(tell_now(slot, payload, me)),
            GpuMsg::Deliver(d) => return Ok(tell_now(slot, d.payload, d.src)),
            GpuMsg::Deactivate(port) => {
                let _ = port.send(slot.deactivate().map_err(GpuError::from));
            }
            GpuMsg::Activate(port) => {
                let _ = port.send(slot.activate().map_err(GpuError::from));
            }
            GpuMsg::Status(port) => {
                let st = slot.status();
                let _ = port.send(GpuStatus {
                    state: st.state,
                    processed: st.processed,
                    h2k_depth: slot.h2k_depth(),
                    id: slot.id(),
                });
            }
            GpuMsg::Event(SlotEvent::Faulted(fault)) => {
                // Hand back what the incarnation left unprocessed before the
                // supervisor can start the next one.
                let recovery = slot.recover();
                tracing::debug!(kernel = K::NAME, ?recovery, "GPU actor fails");
                state.failed = Some(fault);
                // ractor drops what is queued behind an actor that fails:
                // drain first (messages already queued meet the closed slot
                // and get its pending policy; later sends are refused), then
                // fail from `post_stop`.
                if myself.drain().is_err() {
                    return Err(Box::new(KernelFaulted {
                        kernel: K::NAME,
                        fault,
                    }));
                }
            }
            GpuMsg::Event(other) => tracing::debug!(?other, "slot event"),
        }
        Ok(None)
    }
}

/// The actor failed because its kernel faulted.
#[derive(Debug, thiserror::Error)]
#[error("GPU actor {kernel} faulted: {fault}")]
pub struct KernelFaulted {
    /// Kernel name.
    pub kernel: &'static str,
    /// The fault.
    pub fault: Fault,
}

impl<K: Kernel> Actor for GpuActor<K> {
    type Msg = GpuMsg;
    type State = GpuActorState;
    type Arguments = K::State;

    async fn pre_start(
        &self,
        myself: ActorRef<GpuMsg>,
        state: K::State,
    ) -> Result<GpuActorState, ActorProcessingErr> {
        let me = myself.clone();
        let mut slot =
            self.runtime
                .launch_in::<K, Port>(&self.home, state, &self.options, move |event| {
                    // Non-blocking: the poller thread must never wait on a mailbox.
                    let _ = me.send_message(GpuMsg::Event(event));
                })?;
        // Before the replay: while it waits for ring room (no mailbox
        // message is taken meanwhile), the controller is the way to reach
        // this incarnation, e.g. to activate a kernel launched inactive.
        self.controller.set(slot.controller());
        // What the previous incarnation handed back goes first, in order,
        // before any message of this one's mailbox.
        while slot.replay() == ReplayStatus::Full {
            slot.space().await;
        }
        tracing::debug!(kernel = K::NAME, actor = ?slot.id(), ractor = %myself.get_id(), "GPU actor started");
        Ok(GpuActorState {
            slot: Some(slot),
            failed: None,
        })
    }

    // Not `async fn`: ractor boxes and moves the handler's future with each
    // message, so the work runs when ractor calls `handle` and the future
    // keeps only what waits for ring room (rare, boxed).
    fn handle(
        &self,
        myself: ActorRef<GpuMsg>,
        msg: GpuMsg,
        state: &mut GpuActorState,
    ) -> impl Future<Output = Result<(), ActorProcessingErr>> + Send {
        let step = self.serve(&myself, msg, state);
        async move {
            match step {
                Ok(Some(wait)) => wait.await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<GpuMsg>,
        state: &mut GpuActorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(mut slot) = state.slot.take() {
            let timeout = self.terminate_timeout;
            // Waiting for the kernel's acknowledgement blocks: not on a
            // tokio worker.
            let report = tokio::task::spawn_blocking(move || slot.terminate(timeout)).await?;
            tracing::debug!(kernel = K::NAME, ?report, "GPU actor stopped");
        }
        match state.failed.take() {
            // The supervisor sees `ActorFailed`.
            Some(fault) => Err(Box::new(KernelFaulted {
                kernel: K::NAME,
                fault,
            })),
            None => Ok(()),
        }
    }
}

/// The mailbox-bypassing lifecycle handle of a [`GpuActor`] (see
/// [`GpuActor::controller`]).
#[derive(Clone, Debug)]
pub struct GpuController(ActorController);

impl GpuController {
    /// The serving incarnation's controller (it follows restarts).
    fn get(&self) -> Result<SlotController, GpuError> {
        self.0
            .current()
            .ok_or(GpuError::Rpc("the GPU actor has not started".into()))
    }

    /// Activates the kernel.
    ///
    /// # Errors
    /// [`GpuError::State`] for a refused transition, [`GpuError::Rpc`]
    /// before the actor started.
    pub fn activate(&self) -> Result<(), GpuError> {
        Ok(self.get()?.activate()?)
    }

    /// Deactivates the kernel.
    ///
    /// # Errors
    /// As [`GpuController::activate`].
    pub fn deactivate(&self) -> Result<(), GpuError> {
        Ok(self.get()?.deactivate()?)
    }

    /// Messages waiting in H2K.
    ///
    /// # Errors
    /// [`GpuError::Rpc`] before the actor started.
    pub fn h2k_depth(&self) -> Result<u64, GpuError> {
        Ok(self.get()?.h2k_depth())
    }
}

/// A typed handle on a [`GpuActor<K>`]: asks return the message's reply
/// type, and messages `K` does not serve are refused before sending.
pub struct GpuActorRef<K: Kernel> {
    actor: ActorRef<GpuMsg>,
    served: Arc<[u32]>,
    _kernel: PhantomData<fn() -> K>,
}

impl<K: Kernel> Clone for GpuActorRef<K> {
    fn clone(&self) -> Self {
        GpuActorRef {
            actor: self.actor.clone(),
            served: self.served.clone(),
            _kernel: PhantomData,
        }
    }
}

impl<K: Kernel> std::fmt::Debug for GpuActorRef<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuActorRef")
            .field("kernel", &K::NAME)
            .field("actor", &self.actor.get_id())
            .finish()
    }
}

impl<K: Kernel> GpuActorRef<K> {
    /// Wraps the ref of a spawned [`GpuActor<K>`].
    pub fn new(actor: ActorRef<GpuMsg>) -> Self {
        let served = ringkernel::kernel::served_types::<K>();
        GpuActorRef {
            actor,
            served: served.into(),
            _kernel: PhantomData,
        }
    }

    /// The underlying ractor ref (for `call!`, `cast!`, supervision).
    pub fn actor(&self) -> &ActorRef<GpuMsg> {
        &self.actor
    }

    fn serves(&self, type_id: u32) -> bool {
        self.served.binary_search(&type_id).is_ok()
    }

    /// Asks and waits for the typed reply.
    ///
    /// # Errors
    /// [`GpuError`]: an unserved type, the actor gone, or the ask resolving
    /// without a reply.
    pub async fn ask<M: Message>(&self, msg: M) -> Result<M::Reply, GpuError> {
        self.ask_inner(msg, None).await
    }

    /// As [`GpuActorRef::ask`], giving up after `timeout` (then the reply,
    /// if it comes, is dropped and counted late).
    ///
    /// # Errors
    /// As [`GpuActorRef::ask`], and [`GpuError::Rpc`] on timeout.
    pub async fn ask_timeout<M: Message>(
        &self,
        msg: M,
        timeout: Duration,
    ) -> Result<M::Reply, GpuError> {
        self.ask_inner(msg, Some(timeout)).await
    }

    async fn ask_inner<M: Message>(
        &self,
        msg: M,
        timeout: Option<Duration>,
    ) -> Result<M::Reply, GpuError> {
        if !self.serves(M::TYPE_ID) {
            return Err(GpuError::Call(CallError::UnknownType {
                type_id: M::TYPE_ID,
            }));
        }
        let payload = Payload::new(msg);
        let reply = self
            .actor
            .call(|port| GpuMsg::Ask(payload, port), timeout)
            .await
            .map_err(|e| GpuError::Rpc(e.to_string()))?;
        match reply {
            ractor::rpc::CallResult::Success(r) => Ok(r?.decode::<M::Reply>()?),
            ractor::rpc::CallResult::Timeout => Err(GpuError::Rpc("timed out".into())),
            ractor::rpc::CallResult::SenderError => {
                Err(GpuError::Rpc("the actor dropped the reply port".into()))
            }
        }
    }

    /// Tells, handing the message back if it cannot be sent.
    ///
    /// # Errors
    /// [`TellError`] with the message.
    pub fn tell<M: Message>(&self, msg: M) -> Result<(), TellError<M>> {
        if !self.serves(M::TYPE_ID) {
            return Err(TellError::UnknownType(msg));
        }
        self.actor
            .send_message(GpuMsg::Tell(Payload::new(msg)))
            .map_err(|_| TellError::Stopped(msg))
    }

    /// Deactivates the kernel: messages wait in H2K until activation.
    ///
    /// # Errors
    /// [`GpuError`].
    pub async fn deactivate(&self) -> Result<(), GpuError> {
        self.control(GpuMsg::Deactivate).await
    }

    /// Activates the kernel.
    ///
    /// # Errors
    /// [`GpuError`].
    pub async fn activate(&self) -> Result<(), GpuError> {
        self.control(GpuMsg::Activate).await
    }

    async fn control(
        &self,
        f: fn(RpcReplyPort<Result<(), GpuError>>) -> GpuMsg,
    ) -> Result<(), GpuError> {
        match self
            .actor
            .call(f, None)
            .await
            .map_err(|e| GpuError::Rpc(e.to_string()))?
        {
            ractor::rpc::CallResult::Success(r) => r,
            _ => Err(GpuError::Rpc("no answer".into())),
        }
    }

    /// The slot's status.
    ///
    /// # Errors
    /// [`GpuError::Rpc`] if the actor is gone.
    pub async fn status(&self) -> Result<GpuStatus, GpuError> {
        match self
            .actor
            .call(GpuMsg::Status, None)
            .await
            .map_err(|e| GpuError::Rpc(e.to_string()))?
        {
            ractor::rpc::CallResult::Success(s) => Ok(s),
            _ => Err(GpuError::Rpc("no answer".into())),
        }
    }
}

/// A GPU actor's mailbox for the runtime's [`Registry`](ringkernel::registry::Registry):
/// deliveries (sends by id, publishes) become tells, through the actor's
/// mailbox like any other message.
#[derive(Debug, Clone)]
pub struct GpuMailbox {
    actor: ActorRef<GpuMsg>,
    served: Arc<[u32]>,
}

impl GpuMailbox {
    /// The mailbox of a spawned [`GpuActor<K>`].
    pub fn new<K: Kernel>(actor: ActorRef<GpuMsg>) -> Self {
        GpuMailbox {
            served: GpuActorRef::<K>::new(actor.clone()).served,
            actor,
        }
    }
}

impl Mailbox for GpuMailbox {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        if self.served.binary_search(&d.payload.type_id()).is_err() {
            return Err(DeliveryError::Refused(d));
        }
        // ractor mailboxes are unbounded: never `Full`.
        self.actor
            .send_message(GpuMsg::Deliver(d))
            .map_err(|_| DeliveryError::Closed(d))
    }
}

/// An ordinary ractor actor's mailbox for the registry: its message type
/// converts from a [`Delivery`].
pub struct CpuMailbox<M: ractor::Message>(pub ActorRef<M>);

impl<M: ractor::Message> std::fmt::Debug for CpuMailbox<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CpuMailbox").field(&self.0.get_id()).finish()
    }
}

impl<M: ractor::Message + From<Delivery>> Mailbox for CpuMailbox<M> {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        self.0
            .send_message(M::from(d))
            .map_err(|_| DeliveryError::Closed(d))
    }
}

/// The README's quick starts, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
