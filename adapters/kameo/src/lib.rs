//! # ringkernel-kameo — GPU actors for kameo
//!
//! [`GpuActor<K>`] is a kameo [`Actor`] whose work is done by a persistent
//! kernel `K`, launched once in `on_start`.
//!
//! | kameo | GPU actor |
//! |---|---|
//! | `actor_ref.ask(Ask(msg)).await` | the envelope is written into H2K in the handler; the reply sender (`ctx.reply_sender()`, a `DelegatedReply`) waits in the waiter slab and the runtime's poller (on the cpu backend, usually the slot's device thread) answers it |
//! | `actor_ref.tell(Tell(msg))` | a tell |
//! | full H2K ring | the handler awaits space; kameo's bounded mailbox then backs up (and `mailbox_timeout` applies to senders) |
//! | `tell(..).try_send()` to a full mailbox | kameo's `SendError::MailboxFull`, the message handed back |
//! | [`GpuArgs::controller`] | activate, deactivate and H2K depth, bypassing the mailbox |
//! | kernel fault | the actor fails (kameo's panic path): `on_panic`, and linked actors see `on_link_died` |
//! | restart | spawn a clone of the [`GpuArgs`]: the same actor, its next incarnation |
//!
//! kameo 0.19 has no restart policy of its own: a supervisor links to the
//! GPU actor and, in `on_link_died`, spawns it again from a clone of its
//! [`GpuArgs`] — which carries the actor's [`ActorHome`], so the new actor
//! is the next incarnation (latest checkpoint, replayed messages first).
//!
//! Errors come back in kameo's own shape: `SendError::HandlerError(GpuError)`.
//!
//! # Examples
//!
//! ```
//! use kameo::actor::Spawn;
//! use ringkernel::conformance::{Echo, Probe};
//! use ringkernel::runtime::Runtime;
//! use ringkernel_kameo::{Ask, GpuActor, GpuArgs};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gpu = GpuActor::<Probe>::spawn(GpuArgs::new(Runtime::new()?, Default::default()));
//! assert_eq!(gpu.ask(Ask(Echo(7))).await?, 7);
//! # Ok(())
//! # }
//! ```

use kameo::Actor;
use kameo::actor::{ActorRef, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use kameo::prelude::DelegatedReply;
use kameo::reply::ReplySender;
use ringkernel::home::{ActorHome, DeadLetter, DeadLetterReason, Replay, RouteFailure};
use ringkernel::id::ActorId;
use ringkernel::kernel::{Kernel, Message as KernelMessage, Payload, Reply};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::{
    AskError, GpuSlot, LaunchError, LaunchOptions, ReplayStatus, Runtime, SlotEvent, SubmitError,
    Waiter,
};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Errors a kameo caller of a GPU actor can see (inside kameo's
/// `SendError::HandlerError`): the core's
/// [`CallError`](ringkernel::runtime::CallError).
pub use ringkernel::runtime::CallError as GpuError;

/// The mailbox-bypassing lifecycle handle of a [`GpuActor`] (see
/// [`GpuArgs::controller`]); it follows restarts.
pub use ringkernel::runtime::ActorController as GpuController;

/// An ask: `actor_ref.ask(Ask(msg)).await` resolves with `M::Reply`.
#[derive(Debug, Clone, Copy)]
pub struct Ask<M>(pub M);

/// A tell: `actor_ref.tell(Tell(msg))`.
#[derive(Debug, Clone, Copy)]
pub struct Tell<M>(pub M);

/// Deactivates the kernel: messages wait in H2K until [`Activate`].
#[derive(Debug, Clone, Copy)]
pub struct Deactivate;

/// Activates the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Activate;

/// Internal: a slot event from the runtime's poller.
#[doc(hidden)]
#[derive(Debug)]
pub struct Event(SlotEvent);

trait Sink: Send {
    fn complete(self: Box<Self>, outcome: Result<Reply, AskError>);
    fn fail(self: Box<Self>, error: GpuError);
}

struct Typed<R: Send + 'static>(ReplySender<Result<R, GpuError>>);

impl<R: bytemuck::Pod + Send + Sync> Sink for Typed<R> {
    fn complete(self: Box<Self>, outcome: Result<Reply, AskError>) {
        self.0.send(GpuError::decode(outcome));
    }

    fn fail(self: Box<Self>, error: GpuError) {
        self.0.send(Err(error));
    }
}

/// The waiter type of kameo GPU actors: kameo's reply sender, type-erased.
pub struct KameoWaiter(Box<dyn Sink>);

impl Waiter for KameoWaiter {
    fn complete(self, outcome: Result<Reply, AskError>) {
        self.0.complete(outcome);
    }
}

impl std::fmt::Debug for KameoWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KameoWaiter")
    }
}

/// What [`GpuActor`] is spawned with. A clone is the same actor: spawning
/// it after a fault starts the actor's next incarnation.
pub struct GpuArgs<K: Kernel> {
    runtime: Runtime,
    initial: K::State,
    options: LaunchOptions,
    home: ActorHome<KameoWaiter>,
    controller: GpuController,
}

impl<K: Kernel> Clone for GpuArgs<K> {
    fn clone(&self) -> Self {
        GpuArgs {
            runtime: self.runtime.clone(),
            initial: self.initial,
            options: self.options.clone(),
            home: self.home.clone(),
            controller: self.controller.clone(),
        }
    }
}

impl<K: Kernel> std::fmt::Debug for GpuArgs<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuArgs")
            .field("kernel", &K::NAME)
            .field("home", &self.home)
            .finish_non_exhaustive()
    }
}

impl<K: Kernel> GpuArgs<K> {
    /// A kernel on `runtime` starting from `initial`, default options: a
    /// new actor.
    pub fn new(runtime: Runtime, initial: K::State) -> Self {
        GpuArgs {
            home: runtime.home(),
            runtime,
            initial,
            options: LaunchOptions::default(),
            controller: GpuController::new(),
        }
    }

    /// A lifecycle handle that bypasses the mailbox: it reaches the kernel
    /// even while a full ring holds the actor and its bounded mailbox is
    /// full. `Send`, usable from any thread; it follows the incarnations
    /// spawned from these args (or their clones).
    pub fn controller(&self) -> GpuController {
        self.controller.clone()
    }

    /// The actor's identity across incarnations (history, checkpoint,
    /// messages waiting for replay).
    pub fn home(&self) -> &ActorHome<KameoWaiter> {
        &self.home
    }

    /// Launch options.
    pub fn options(mut self, options: LaunchOptions) -> Self {
        self.options = options;
        self
    }
}

/// A kameo actor backed by an actor slot of kernel `K`.
pub struct GpuActor<K: Kernel> {
    // `None` once stopped.
    slot: Option<GpuSlot<KameoWaiter>>,
    runtime: Runtime,
    _kernel: std::marker::PhantomData<fn() -> K>,
}

impl<K: Kernel> std::fmt::Debug for GpuActor<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuActor")
            .field("kernel", &K::NAME)
            .field("slot", &self.slot)
            .finish()
    }
}

impl<K: Kernel> Actor for GpuActor<K> {
    type Args = GpuArgs<K>;
    type Error = LaunchError;

    async fn on_start(args: GpuArgs<K>, actor_ref: ActorRef<Self>) -> Result<Self, LaunchError> {
        let me = actor_ref.downgrade();
        // The poller thread must not wait on a bounded mailbox, and the
        // actor must hear of a fault even when its mailbox is full: the
        // event is sent from a task on the actor's runtime.
        let tokio = tokio::runtime::Handle::current();
        let mut slot = args.runtime.launch_in::<K, KameoWaiter>(
            &args.home,
            args.initial,
            &args.options,
            move |event| {
                if let Some(me) = me.upgrade() {
                    tokio.spawn(async move {
                        let _ = me.tell(Event(event)).send().await;
                    });
                }
            },
        )?;
        args.controller.set(slot.controller());
        // What the previous incarnation handed back goes first, in order,
        // before any message of this one's mailbox.
        while slot.replay() == ReplayStatus::Full {
            slot.space().await;
        }
        Ok(GpuActor {
            slot: Some(slot),
            runtime: args.runtime,
            _kernel: std::marker::PhantomData,
        })
    }

    async fn on_stop(
        &mut self,
        _: WeakActorRef<Self>,
        _: ActorStopReason,
    ) -> Result<(), LaunchError> {
        if let Some(mut slot) = self.slot.take() {
            // Waiting for the kernel's acknowledgement blocks: not on an
            // async worker.
            if let Ok(report) =
                tokio::task::spawn_blocking(move || slot.terminate(Duration::from_secs(5))).await
            {
                tracing::debug!(kernel = K::NAME, ?report, "GPU actor stopped");
            }
        }
        Ok(())
    }
}

impl<K: Kernel, M: KernelMessage> Message<Ask<M>> for GpuActor<K>
where
    M::Reply: Sync,
{
    type Reply = DelegatedReply<Result<M::Reply, GpuError>>;

    // Not `async fn`: kameo boxes the handler's future with each message,
    // so the work runs when kameo calls `handle` and the future keeps only
    // what waits for ring room (rare, boxed).
    fn handle(
        &mut self,
        Ask(msg): Ask<M>,
        ctx: &mut Context<Self, Self::Reply>,
    ) -> impl Future<Output = Self::Reply> + Send {
        let (delegated, sender) = ctx.reply_sender();
        let wait = sender.and_then(|tx| {
            let waiter = KameoWaiter(Box::new(Typed(tx)));
            match self.slot.as_mut() {
                Some(slot) => ask_now(slot, Payload::new(msg), waiter),
                None => {
                    fail(waiter, GpuError::Closed);
                    None
                }
            }
        });
        async move {
            if let Some(wait) = wait {
                wait.await;
            }
            delegated
        }
    }
}

/// What is left of a message the ring had no room for: awaited by the
/// handler, so the mailbox behind it waits too (backpressure in order).
/// Boxed: the common case (room in the ring) keeps the handler's future,
/// which kameo boxes per message, small.
type Wait<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Pushes an ask with its waiter in the slab, or answers the waiter;
/// `Some` when the ring is full (the rest waits for room).
fn ask_now(
    slot: &mut GpuSlot<KameoWaiter>,
    payload: Payload,
    waiter: KameoWaiter,
) -> Option<Wait<'_, ()>> {
    match slot.ask(payload, waiter, ActorId::NONE) {
        Ok(_) => None,
        Err(SubmitError::Full(back)) => Some(Box::pin(async move {
            let mut item = back;
            loop {
                slot.space().await;
                match slot.ask(item.0, item.1, ActorId::NONE) {
                    Err(SubmitError::Full(back)) => item = back,
                    other => return ask_refused(slot, other.map(|_| ())),
                }
            }
        })),
        Err(e) => {
            ask_refused(slot, Err(e));
            None
        }
    }
}

/// What becomes of an ask the slot did not take for a reason other than a
/// full ring.
fn ask_refused(
    slot: &mut GpuSlot<KameoWaiter>,
    result: Result<(), SubmitError<(Payload, KameoWaiter)>>,
) {
    match result {
        Ok(()) | Err(SubmitError::Full(_)) => {}
        Err(SubmitError::UnknownType {
            value: (_, w),
            type_id,
        }) => fail(w, GpuError::UnknownType { type_id }),
        Err(SubmitError::Closed((payload, waiter))) => {
            // The slot's pending policy: replayed after a fault, or failed.
            slot.hand_back(Replay::Ask {
                payload,
                waiter,
                src: ActorId::NONE,
            });
        }
        Err(e) => {
            let (_, w) = e.into_inner();
            fail(w, GpuError::Closed);
        }
    }
}

/// The result of a tell the slot took (or refused for good), or what
/// waits for ring room.
enum TellStep<'a> {
    Done(Result<(), GpuError>),
    Wait(Wait<'a, Result<(), GpuError>>),
}

impl TellStep<'_> {
    async fn finish(self) -> Result<(), GpuError> {
        match self {
            TellStep::Done(r) => r,
            TellStep::Wait(w) => w.await,
        }
    }
}

/// Pushes a tell from `src`; a type the slot does not serve is an error
/// when `refuse_unknown`, else a dead letter.
fn tell_now(
    slot: &mut GpuSlot<KameoWaiter>,
    payload: Payload,
    src: ActorId,
    refuse_unknown: bool,
) -> TellStep<'_> {
    match slot.tell(payload, src) {
        Ok(()) => TellStep::Done(Ok(())),
        Err(SubmitError::Full(back)) => TellStep::Wait(Box::pin(async move {
            let mut payload = back;
            loop {
                slot.space().await;
                match slot.tell(payload, src) {
                    Err(SubmitError::Full(back)) => payload = back,
                    other => return tell_refused(slot, other, src, refuse_unknown),
                }
            }
        })),
        other => TellStep::Done(tell_refused(slot, other, src, refuse_unknown)),
    }
}

/// What becomes of a tell the slot did not take for a reason other than a
/// full ring.
fn tell_refused(
    slot: &mut GpuSlot<KameoWaiter>,
    result: Result<(), SubmitError<Payload>>,
    src: ActorId,
    refuse_unknown: bool,
) -> Result<(), GpuError> {
    match result {
        Ok(()) | Err(SubmitError::Full(_)) => Ok(()),
        Err(SubmitError::UnknownType { type_id, .. }) if refuse_unknown => {
            Err(GpuError::UnknownType { type_id })
        }
        // `GpuMailbox` refuses unserved types before sending; a mailbox
        // made for another kernel lets them through.
        Err(SubmitError::UnknownType { value, .. }) => {
            slot.dead_letter(
                value,
                src,
                DeadLetterReason::Unroutable(RouteFailure::Refused),
            );
            Ok(())
        }
        Err(e) => {
            // Accepted by the mailbox: the slot's pending policy (replayed
            // after a fault, or a dead letter).
            slot.hand_back(Replay::Tell {
                payload: e.into_inner(),
                src,
            });
            Ok(())
        }
    }
}

/// Answers a waiter that was refused before reaching the kernel.
fn fail(w: KameoWaiter, e: GpuError) {
    w.0.fail(e);
}

/// A delivery from the runtime's registry (a send by id or a publish), as
/// a kameo message: a GPU actor takes it as a tell; an ordinary actor that
/// handles it can be reached through a [`CpuMailbox`].
#[derive(Debug, Clone, Copy)]
pub struct Delivered(pub Delivery);

impl<K: Kernel> Message<Delivered> for GpuActor<K> {
    type Reply = ();

    fn handle(
        &mut self,
        Delivered(d): Delivered,
        _: &mut Context<Self, ()>,
    ) -> impl Future<Output = ()> + Send {
        let step = match self.slot.as_mut() {
            Some(slot) => tell_now(slot, d.payload, d.src, false),
            None => {
                // Accepted by the mailbox of a stopped actor: a dead letter.
                self.runtime.report_dead_letter(DeadLetter {
                    actor: d.dst,
                    src: d.src,
                    seq: 0,
                    payload: d.payload,
                    reason: DeadLetterReason::Unroutable(RouteFailure::Closed),
                });
                TellStep::Done(Ok(()))
            }
        };
        async move {
            // Refusals became dead letters.
            let _ = step.finish().await;
        }
    }
}

fn delivery_error<M>(e: kameo::error::SendError<M>, d: Delivery) -> DeliveryError {
    match e {
        kameo::error::SendError::MailboxFull(_) => DeliveryError::Full(d),
        _ => DeliveryError::Closed(d),
    }
}

/// A GPU actor's mailbox for the runtime's
/// [`Registry`](ringkernel::registry::Registry): deliveries become tells,
/// through the actor's mailbox like any other message. A full kameo
/// mailbox hands the delivery back (`Full`).
pub struct GpuMailbox<K: Kernel> {
    actor: ActorRef<GpuActor<K>>,
    served: Vec<u32>,
}

impl<K: Kernel> std::fmt::Debug for GpuMailbox<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMailbox")
            .field("kernel", &K::NAME)
            .finish_non_exhaustive()
    }
}

impl<K: Kernel> GpuMailbox<K> {
    /// The mailbox of a spawned GPU actor.
    pub fn new(actor: ActorRef<GpuActor<K>>) -> Self {
        let served = ringkernel::kernel::served_types::<K>();
        GpuMailbox { actor, served }
    }
}

impl<K: Kernel> Mailbox for GpuMailbox<K> {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        if self.served.binary_search(&d.payload.type_id()).is_err() {
            return Err(DeliveryError::Refused(d));
        }
        self.actor
            .tell(Delivered(d))
            .try_send()
            .map_err(|e| delivery_error(e, d))
    }
}

/// An ordinary kameo actor's mailbox for the registry: any actor that
/// handles [`Delivered`].
pub struct CpuMailbox<A: Actor + Message<Delivered>>(pub ActorRef<A>);

impl<A: Actor + Message<Delivered>> std::fmt::Debug for CpuMailbox<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CpuMailbox").field(&self.0.id()).finish()
    }
}

impl<A: Actor + Message<Delivered>> Mailbox for CpuMailbox<A> {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        self.0
            .tell(Delivered(d))
            .try_send()
            .map_err(|e| delivery_error(e, d))
    }
}

impl<K: Kernel, M: KernelMessage> Message<Tell<M>> for GpuActor<K> {
    type Reply = Result<(), GpuError>;

    fn handle(
        &mut self,
        Tell(msg): Tell<M>,
        _: &mut Context<Self, Self::Reply>,
    ) -> impl Future<Output = Self::Reply> + Send {
        let step = match self.slot.as_mut() {
            Some(slot) => tell_now(slot, Payload::new(msg), ActorId::NONE, true),
            None => TellStep::Done(Err(GpuError::Closed)),
        };
        step.finish()
    }
}

impl<K: Kernel> Message<Deactivate> for GpuActor<K> {
    type Reply = Result<(), GpuError>;

    async fn handle(&mut self, _: Deactivate, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let slot = self.slot.as_ref().ok_or(GpuError::Closed)?;
        slot.deactivate().map_err(|_| GpuError::Closed)
    }
}

impl<K: Kernel> Message<Activate> for GpuActor<K> {
    type Reply = Result<(), GpuError>;

    async fn handle(&mut self, _: Activate, _: &mut Context<Self, Self::Reply>) -> Self::Reply {
        let slot = self.slot.as_ref().ok_or(GpuError::Closed)?;
        slot.activate().map_err(|_| GpuError::Closed)
    }
}

impl<K: Kernel> Message<Event> for GpuActor<K> {
    type Reply = Result<(), GpuError>;

    async fn handle(
        &mut self,
        Event(event): Event,
        _: &mut Context<Self, Self::Reply>,
    ) -> Self::Reply {
        match event {
            // An error from a tell's handler is kameo's panic path: the actor
            // stops (`on_panic`) and linked actors see it die.
            SlotEvent::Faulted(fault) => {
                // Hand back what the incarnation left unprocessed before a
                // supervisor can start the next one.
                if let Some(slot) = self.slot.as_mut() {
                    slot.recover();
                }
                Err(GpuError::Ask(AskError::Faulted(fault)))
            }
            _ => Ok(()),
        }
    }
}
