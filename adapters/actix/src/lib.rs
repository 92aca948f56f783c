//! # ringkernel-actix — GPU actors for actix
//!
//! [`GpuActor<K>`] is an actix [`Actor`] whose work is done by a persistent
//! kernel `K`, launched once when the actor starts.
//!
//! | actix | GPU actor |
//! |---|---|
//! | `addr.send(Ask(msg)).await` | the envelope is written into H2K synchronously while actix processes the message; the reply sender waits in the waiter slab until the correlated reply arrives |
//! | `addr.do_send(Tell(msg))` / `try_send` | a tell (actix's `try_send` sees only its mailbox: `SendError::Full` hands the message back once [`GpuActor::mailbox_capacity`] messages wait) |
//! | full H2K ring | an ordered overflow and `ctx.wait`: the actor takes no further mailbox message until the ring drains |
//! | kernel fault | the actor stops; under `actix::Supervisor`, `Supervised::restarting` launches a new slot |
//!
//! Replies reach actix callers from the runtime's poller thread (on the cpu
//! backend, usually the slot's device thread) through the reply sender;
//! nothing polls on the arbiter.
//!
//! # Backpressure and floods of tells
//!
//! A full ring holds the actor, so its mailbox fills behind it. What a
//! sender then sees is actix's: `send` waits for mailbox room, `try_send`
//! fails with `SendError::Full` and hands the message back (size the
//! mailbox with [`GpuActor::mailbox_capacity`]), and `do_send` ignores the
//! capacity. A `do_send` loop that outruns the kernel therefore grows
//! actix's queue without bound, one heap allocation per message, and a
//! deep queue costs every message cache misses on both threads. Where a
//! producer can outrun the kernel, give it `try_send` (or `send`).
//!
//! # Examples
//!
//! ```
//! use actix::Actor;
//! use ringkernel::conformance::{Echo, Probe};
//! use ringkernel::runtime::Runtime;
//! use ringkernel_actix::{Ask, GpuActor};
//!
//! # actix_rt::System::new().block_on(async {
//! let addr = GpuActor::<Probe>::new(Runtime::new()?, Default::default()).start();
//! assert_eq!(addr.send(Ask(Echo(7))).await??, 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use ringkernel::home::{ActorHome, DeadLetter, DeadLetterReason, Replay, RouteFailure};
use ringkernel::id::ActorId;
use ringkernel::kernel::{Kernel, Message as KernelMessage, Payload, Reply};
use ringkernel::registry::{Delivery, DeliveryError, Mailbox};
use ringkernel::runtime::{
    AskError, GpuSlot, LaunchOptions, ReplayStatus, Runtime, SlotEvent, SubmitError, Waiter,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::rc::Rc;
use std::time::Duration;

/// Errors an actix caller of a GPU actor can see: the core's
/// [`CallError`](ringkernel::runtime::CallError).
pub use ringkernel::runtime::CallError as GpuError;

/// The mailbox-bypassing lifecycle handle of a [`GpuActor`] (see
/// [`GpuActor::controller`]); it follows restarts.
pub use ringkernel::runtime::ActorController as GpuController;

/// An ask: `addr.send(Ask(msg)).await` resolves with `M::Reply`.
#[derive(Debug, Clone, Copy)]
pub struct Ask<M>(pub M);

impl<M: KernelMessage> actix::Message for Ask<M> {
    type Result = Result<M::Reply, GpuError>;
}

/// A tell: `addr.do_send(Tell(msg))`. Its result says whether the kernel
/// accepted it (useful with `send`).
#[derive(Debug, Clone, Copy)]
pub struct Tell<M>(pub M);

impl<M: KernelMessage> actix::Message for Tell<M> {
    type Result = Result<(), GpuError>;
}

/// Deactivates the kernel: messages wait in H2K until [`Activate`]. While a
/// full ring holds the actor this waits in the mailbox too; use
/// [`GpuActor::controller`] to reach the kernel directly.
#[derive(Debug, Clone, Copy)]
pub struct Deactivate;

impl actix::Message for Deactivate {
    type Result = Result<(), GpuError>;
}

/// Activates the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Activate;

impl actix::Message for Activate {
    type Result = Result<(), GpuError>;
}

/// Internal: the poller reports a slot event to the actor.
struct Event(SlotEvent);

impl actix::Message for Event {
    type Result = ();
}

/// A reply sender of any reply type, parked in the waiter slab.
trait Sink: Send {
    fn complete(self: Box<Self>, outcome: Result<Reply, AskError>);
    fn is_closed(&self) -> bool;
}

struct Typed<R>(OneshotSender<Result<R, GpuError>>);

impl<R: bytemuck::Pod + Send> Sink for Typed<R> {
    fn complete(self: Box<Self>, outcome: Result<Reply, AskError>) {
        let _ = self.0.send(GpuError::decode(outcome));
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The waiter type of actix GPU actors.
pub struct ActixWaiter(Box<dyn Sink>);

impl Waiter for ActixWaiter {
    fn complete(self, outcome: Result<Reply, AskError>) {
        self.0.complete(outcome);
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl std::fmt::Debug for ActixWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActixWaiter")
    }
}

/// A message waiting for ring room, in mailbox order.
enum Queued {
    Ask(Payload, ActixWaiter),
    /// A tell, and who sent it (`NONE` for a plain actix tell).
    Tell(Payload, ActorId),
}

/// The slot and the ordered overflow, shared by the actor and the
/// responses it returns (all on the actor's arbiter thread).
struct Inner {
    slot: Option<GpuSlot<ActixWaiter>>,
    overflow: VecDeque<Queued>,
    waiting: bool,
}

/// An actix actor backed by an actor slot of kernel `K`.
pub struct GpuActor<K: Kernel> {
    runtime: Runtime,
    options: LaunchOptions,
    // Boxed: actix actors must be `Unpin`, a kernel state need not be.
    initial: Box<K::State>,
    terminate_timeout: Duration,
    /// Set on the context when the actor starts (actix's default if none).
    mailbox_capacity: Option<usize>,
    home: ActorHome<ActixWaiter>,
    inner: Rc<RefCell<Inner>>,
    controller: GpuController,
    _kernel: PhantomData<fn() -> K>,
}

impl<K: Kernel> std::fmt::Debug for GpuActor<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuActor")
            .field("kernel", &K::NAME)
            .finish_non_exhaustive()
    }
}

impl<K: Kernel> GpuActor<K> {
    /// A GPU actor on `runtime` whose kernel starts from `initial` (and
    /// restarts from it under a supervisor).
    pub fn new(runtime: Runtime, initial: K::State) -> Self {
        Self::with_options(runtime, initial, LaunchOptions::default())
    }

    /// As [`GpuActor::new`], launched with `options`.
    pub fn with_options(runtime: Runtime, initial: K::State, options: LaunchOptions) -> Self {
        GpuActor {
            home: runtime.home(),
            runtime,
            options,
            initial: Box::new(initial),
            terminate_timeout: Duration::from_secs(5),
            mailbox_capacity: None,
            controller: GpuController::new(),
            inner: Rc::new(RefCell::new(Inner {
                slot: None,
                overflow: VecDeque::new(),
                waiting: false,
            })),
            _kernel: PhantomData,
        }
    }

    /// Sets the actor's mailbox capacity when it starts (actix's
    /// `Context::set_mailbox_capacity` in `started`; actix's default is 16,
    /// and 0 means unbounded). `send` waits for room and `try_send` fails
    /// with `SendError::Full`, handing the message back, once that many
    /// messages wait; `do_send` ignores it. While a full ring holds the
    /// actor, its mailbox fills up to here. Messages sent before the actor
    /// has started see actix's default.
    #[must_use]
    pub fn mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = Some(capacity);
        self
    }

    /// A lifecycle handle that bypasses the mailbox (available once the
    /// actor has started; `Send`, usable from any thread). Take it before
    /// `start`.
    pub fn controller(&self) -> GpuController {
        self.controller.clone()
    }

    /// The actor's identity across incarnations (history, checkpoint,
    /// messages waiting for replay).
    pub fn home(&self) -> &ActorHome<ActixWaiter> {
        &self.home
    }

    fn launch(&mut self, ctx: &mut Context<Self>) {
        // Weak: the slot must not keep its own actor alive once every
        // `Addr` is gone.
        let addr = ctx.address().downgrade();
        let launched = self.runtime.launch_in::<K, ActixWaiter>(
            &self.home,
            *self.initial,
            &self.options,
            move |event| {
                // Non-blocking, and never lost to a full mailbox (`do_send`
                // ignores its capacity): the poller thread never waits on a
                // mailbox, and the actor must hear of a fault.
                if let Some(addr) = addr.upgrade() {
                    addr.do_send(Event(event));
                }
            },
        );
        match launched {
            Ok(mut slot) => {
                // What the previous incarnation handed back goes first: the
                // actor takes no mailbox message until it is all in H2K.
                let full = slot.replay() == ReplayStatus::Full;
                // A restart replaces the slot; the controller follows it.
                self.controller.set(slot.controller());
                self.inner.borrow_mut().slot = Some(slot);
                if full {
                    wait_for_room::<K>(&self.inner, ctx);
                }
            }
            Err(e) => {
                tracing::error!(kernel = K::NAME, error = %e, "launching the GPU actor failed");
                ctx.stop();
            }
        }
    }

    fn shut_down(&mut self) {
        let mut inner = self.inner.borrow_mut();
        hand_back_overflow(&mut inner);
        if let Some(mut slot) = inner.slot.take() {
            // Fence and hand back now, on the arbiter (non-blocking): a
            // supervised restart may launch the next incarnation at once.
            slot.stop();
            let timeout = self.terminate_timeout;
            // Waiting for the kernel's acknowledgement blocks: not on the
            // arbiter.
            let _ = std::thread::Builder::new()
                .name("ringkernel-terminate".into())
                .spawn(move || slot.terminate(timeout));
        }
    }
}

impl<K: Kernel> Actor for GpuActor<K> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(capacity) = self.mailbox_capacity {
            ctx.set_mailbox_capacity(capacity);
        }
        self.launch(ctx);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.shut_down();
    }
}

impl<K: Kernel> Supervised for GpuActor<K> {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // The faulted slot is closed; a fresh one is launched in `started`.
        self.shut_down();
    }
}

impl<K: Kernel> Handler<Event> for GpuActor<K> {
    type Result = ();

    fn handle(&mut self, Event(event): Event, ctx: &mut Context<Self>) {
        if let SlotEvent::Faulted(fault) = event {
            tracing::warn!(kernel = K::NAME, %fault, "GPU actor stops: its kernel faulted");
            // Hand back what the incarnation left unprocessed (H2K first,
            // then the overflow behind it) before the restart.
            let mut inner = self.inner.borrow_mut();
            if let Some(slot) = inner.slot.as_mut() {
                slot.recover();
            }
            hand_back_overflow(&mut inner);
            ctx.stop();
        }
    }
}

/// The overflow never reached H2K: each item gets the slot's policy (kept
/// for replay after a fault, else failed / dead-lettered).
fn hand_back_overflow(inner: &mut Inner) {
    let items: Vec<Queued> = inner.overflow.drain(..).collect();
    for q in items {
        let item = match q {
            Queued::Ask(payload, waiter) => Replay::Ask {
                payload,
                waiter,
                src: ActorId::NONE,
            },
            Queued::Tell(payload, src) => Replay::Tell { payload, src },
        };
        match inner.slot.as_mut() {
            Some(slot) => slot.hand_back(item),
            None => {
                if let Replay::Ask { waiter, .. } = item {
                    waiter.complete(Err(AskError::Terminated));
                }
            }
        }
    }
}

/// Submits `item` now if nothing waits before it, else queues it; on a
/// full ring, makes the actor wait (in order) until the ring drains.
fn submit<K: Kernel>(inner: &Rc<RefCell<Inner>>, item: Queued, ctx: &mut Context<GpuActor<K>>) {
    let mut guard = inner.borrow_mut();
    if !guard.overflow.is_empty() {
        guard.overflow.push_back(item);
        return;
    }
    match try_submit(&mut guard, item) {
        None => {}
        Some(back) => {
            guard.overflow.push_back(back);
            drop(guard);
            wait_for_room::<K>(inner, ctx);
        }
    }
}

/// Tries one item; hands it back when the ring is full.
fn try_submit(inner: &mut Inner, item: Queued) -> Option<Queued> {
    let Some(slot) = inner.slot.as_mut() else {
        if let Queued::Ask(_, w) = item {
            w.complete(Err(AskError::Terminated));
        }
        return None;
    };
    let me = ActorId::NONE;
    match item {
        Queued::Ask(payload, waiter) => match slot.ask(payload, waiter, me) {
            Ok(_) => None,
            Err(SubmitError::Full((p, w))) => Some(Queued::Ask(p, w)),
            Err(SubmitError::UnknownType { value: (_, w), .. }) => {
                // Checked by the handler before; kept for completeness.
                w.complete(Err(AskError::Terminated));
                None
            }
            Err(SubmitError::Closed((payload, waiter))) => {
                slot.hand_back(Replay::Ask {
                    payload,
                    waiter,
                    src: me,
                });
                None
            }
            Err(_) => None,
        },
        Queued::Tell(payload, src) => match slot.tell(payload, src) {
            Ok(()) => None,
            Err(SubmitError::Full(p)) => Some(Queued::Tell(p, src)),
            Err(e) => {
                // Unserved types are refused before they are queued; a
                // closed slot applies its policy.
                slot.hand_back(Replay::Tell {
                    payload: e.into_inner(),
                    src,
                });
                None
            }
        },
    }
}

/// `ctx.wait` until the ring has room, then drains the overflow in order.
fn wait_for_room<K: Kernel>(inner: &Rc<RefCell<Inner>>, ctx: &mut Context<GpuActor<K>>) {
    if std::mem::replace(&mut inner.borrow_mut().waiting, true) {
        return;
    }
    let poll_inner = inner.clone();
    // Replays first, then the overflow, in order.
    let room = std::future::poll_fn(move |cx| {
        let mut guard = poll_inner.borrow_mut();
        match guard.slot.as_mut() {
            Some(slot) => slot.poll_space(cx),
            None => std::task::Poll::Ready(()),
        }
    });
    ctx.wait(
        actix::fut::wrap_future::<_, GpuActor<K>>(room).map(|(), act, ctx| {
            let inner = act.inner.clone();
            inner.borrow_mut().waiting = false;
            let replaying = inner
                .borrow_mut()
                .slot
                .as_mut()
                .is_some_and(|slot| slot.replay() == ReplayStatus::Full);
            if replaying {
                wait_for_room::<K>(&inner, ctx);
                return;
            }
            loop {
                let mut guard = inner.borrow_mut();
                let Some(item) = guard.overflow.pop_front() else {
                    break;
                };
                if let Some(back) = try_submit(&mut guard, item) {
                    guard.overflow.push_front(back);
                    drop(guard);
                    wait_for_room::<K>(&inner, ctx);
                    break;
                }
            }
        }),
    );
}

/// The response of an ask: pushes to H2K with actix's reply sender as the
/// waiter, synchronously, before the actor takes its next message.
pub struct GpuResponse<M: KernelMessage> {
    payload: Payload,
    refused: Option<GpuError>,
    inner: Rc<RefCell<Inner>>,
    _message: PhantomData<fn() -> M>,
}

impl<K: Kernel, M: KernelMessage> MessageResponse<GpuActor<K>, Ask<M>> for GpuResponse<M> {
    fn handle(
        self,
        ctx: &mut Context<GpuActor<K>>,
        tx: Option<OneshotSender<Result<M::Reply, GpuError>>>,
    ) {
        let Some(tx) = tx else { return };
        if let Some(e) = self.refused {
            let _ = tx.send(Err(e));
            return;
        }
        submit::<K>(
            &self.inner,
            Queued::Ask(self.payload, ActixWaiter(Box::new(Typed(tx)))),
            ctx,
        );
    }
}

impl<K: Kernel, M: KernelMessage> Handler<Ask<M>> for GpuActor<K> {
    type Result = GpuResponse<M>;

    fn handle(&mut self, Ask(msg): Ask<M>, _: &mut Context<Self>) -> GpuResponse<M> {
        let refused = self.refusal(M::TYPE_ID);
        GpuResponse {
            payload: Payload::new(msg),
            refused,
            inner: self.inner.clone(),
            _message: PhantomData,
        }
    }
}

impl<K: Kernel> GpuActor<K> {
    fn refusal(&self, type_id: u32) -> Option<GpuError> {
        let inner = self.inner.borrow();
        // A closed slot refuses nothing here: the message reaches
        // `try_submit`, which applies the slot's pending policy.
        match inner.slot.as_ref() {
            None => Some(GpuError::Closed),
            Some(slot) if slot.served_types().binary_search(&type_id).is_err() => {
                Some(GpuError::UnknownType { type_id })
            }
            Some(_) => None,
        }
    }
}

impl<K: Kernel> Handler<Deactivate> for GpuActor<K> {
    type Result = Result<(), GpuError>;

    fn handle(&mut self, _: Deactivate, _: &mut Context<Self>) -> Result<(), GpuError> {
        match self.inner.borrow().slot.as_ref() {
            Some(slot) => slot.deactivate().map_err(|_| GpuError::Closed),
            None => Err(GpuError::Closed),
        }
    }
}

impl<K: Kernel> Handler<Activate> for GpuActor<K> {
    type Result = Result<(), GpuError>;

    fn handle(&mut self, _: Activate, _: &mut Context<Self>) -> Result<(), GpuError> {
        match self.inner.borrow().slot.as_ref() {
            Some(slot) => slot.activate().map_err(|_| GpuError::Closed),
            None => Err(GpuError::Closed),
        }
    }
}

/// A delivery from the runtime's registry (a send by id or a publish), as
/// an actix message: a GPU actor takes it as a tell; an ordinary actor that
/// handles it can be reached through a [`CpuMailbox`].
#[derive(Debug, Clone, Copy)]
pub struct Delivered(pub Delivery);

impl actix::Message for Delivered {
    type Result = ();
}

impl<K: Kernel> Handler<Delivered> for GpuActor<K> {
    type Result = ();

    fn handle(&mut self, Delivered(d): Delivered, ctx: &mut Context<Self>) {
        match self.refusal(d.payload.type_id()) {
            None => {
                let inner = self.inner.clone();
                submit::<K>(&inner, Queued::Tell(d.payload, d.src), ctx);
            }
            // Accepted by the mailbox, never servable: a dead letter.
            Some(e) => self.runtime.report_dead_letter(DeadLetter {
                actor: d.dst,
                src: d.src,
                seq: 0,
                payload: d.payload,
                reason: DeadLetterReason::Unroutable(match e {
                    GpuError::UnknownType { .. } => RouteFailure::Refused,
                    _ => RouteFailure::Closed,
                }),
            }),
        }
    }
}

/// A GPU actor's mailbox for the runtime's
/// [`Registry`](ringkernel::registry::Registry): deliveries become tells,
/// through the actor's mailbox like any other message. A full actix
/// mailbox hands the delivery back (`Full`).
pub struct GpuMailbox<K: Kernel> {
    addr: Addr<GpuActor<K>>,
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
    /// The mailbox of a started GPU actor.
    pub fn new(addr: Addr<GpuActor<K>>) -> Self {
        let served = ringkernel::kernel::served_types::<K>();
        GpuMailbox { addr, served }
    }
}

fn delivery_error<M>(e: SendError<M>, d: Delivery) -> DeliveryError {
    match e {
        SendError::Full(_) => DeliveryError::Full(d),
        SendError::Closed(_) => DeliveryError::Closed(d),
    }
}

impl<K: Kernel> Mailbox for GpuMailbox<K> {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        if self.served.binary_search(&d.payload.type_id()).is_err() {
            return Err(DeliveryError::Refused(d));
        }
        self.addr
            .try_send(Delivered(d))
            .map_err(|e| delivery_error(e, d))
    }
}

/// An ordinary actix actor's mailbox for the registry: any actor that
/// handles [`Delivered`].
pub struct CpuMailbox(pub Recipient<Delivered>);

impl std::fmt::Debug for CpuMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CpuMailbox")
    }
}

impl Mailbox for CpuMailbox {
    fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
        self.0
            .try_send(Delivered(d))
            .map_err(|e| delivery_error(e, d))
    }
}

impl<K: Kernel, M: KernelMessage> Handler<Tell<M>> for GpuActor<K> {
    type Result = Result<(), GpuError>;

    fn handle(&mut self, Tell(msg): Tell<M>, ctx: &mut Context<Self>) -> Result<(), GpuError> {
        if let Some(e) = self.refusal(M::TYPE_ID) {
            return Err(e);
        }
        let inner = self.inner.clone();
        submit::<K>(&inner, Queued::Tell(Payload::new(msg), ActorId::NONE), ctx);
        Ok(())
    }
}
