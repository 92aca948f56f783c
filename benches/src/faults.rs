//! Fault workloads: restart latency and watchdog detection, one sample per
//! fault (the report prints medians of the samples).

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ringkernel::conformance::{ChannelWaiter, Echo, Explode, Nap, Probe};
use ringkernel::home::ActorHome;
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime, SlotEvent};
use ringkernel_ractor::{GpuActor, GpuActorRef, GpuMsg};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Restarts through the core API: a `Probe` slot whose handler panics,
/// relaunched in its home as the next incarnation.
pub struct CoreRestarts {
    rt: Runtime,
    home: ActorHome<ChannelWaiter>,
    slot: Option<GpuSlot<ChannelWaiter>>,
    faulted: Arc<Mutex<Option<Instant>>>,
    events: mpsc::Receiver<SlotEvent>,
    tx: Arc<Mutex<mpsc::Sender<SlotEvent>>>,
}

impl CoreRestarts {
    /// A runtime and the first incarnation.
    pub fn new() -> Self {
        let rt = Runtime::new().expect("runtime");
        let (tx, events) = mpsc::channel();
        let mut me = CoreRestarts {
            home: rt.home(),
            rt,
            slot: None,
            faulted: Arc::new(Mutex::new(None)),
            events,
            tx: Arc::new(Mutex::new(tx)),
        };
        me.slot = Some(me.launch());
        me
    }

    fn launch(&self) -> GpuSlot<ChannelWaiter> {
        let (tx, faulted) = (self.tx.clone(), self.faulted.clone());
        self.rt
            .launch_in::<Probe, _>(
                &self.home,
                Default::default(),
                &LaunchOptions::default(),
                move |e| {
                    // Stamped on the poller thread, the moment it turns the
                    // detected fault into the actor's failure.
                    *faulted.lock().unwrap() = Some(Instant::now());
                    let _ = tx.lock().unwrap().send(e);
                },
            )
            .expect("launch")
    }

    /// One restart: the handler panics; from the fault's detection to the
    /// first reply of the next incarnation.
    pub fn restart(&mut self) -> Duration {
        let slot = self.slot.as_mut().expect("a serving incarnation");
        let _ = ringkernel::conformance::ask(slot, Explode()).wait();
        let _ = self.events.recv().expect("fault event");
        let t0 = self.faulted.lock().unwrap().take().expect("fault stamped");
        slot.recover();
        self.slot = None;
        let mut next = self.launch();
        ringkernel::conformance::ask(&mut next, Echo(1))
            .wait()
            .expect("the next incarnation replies");
        let t = t0.elapsed();
        self.slot = Some(next);
        t
    }

    /// The base: a fresh actor, launch to first reply.
    pub fn fresh_launch(&self) -> Duration {
        let t0 = Instant::now();
        let mut slot = self
            .rt
            .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
            .expect("launch");
        ringkernel::conformance::ask(&mut slot, Echo(1))
            .wait()
            .expect("reply");
        let t = t0.elapsed();
        slot.terminate(Duration::from_secs(5));
        t
    }
}

impl Default for CoreRestarts {
    fn default() -> Self {
        Self::new()
    }
}

/// A ractor supervisor that restarts the GPU actor on `ActorFailed`.
struct Restarter;

type RestarterArgs = (
    GpuActor<Probe>,
    tokio::sync::mpsc::UnboundedSender<ActorRef<GpuMsg>>,
);

impl Actor for Restarter {
    type Msg = ();
    type State = RestarterArgs;
    type Arguments = RestarterArgs;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        a: RestarterArgs,
    ) -> Result<RestarterArgs, ActorProcessingErr> {
        Ok(a)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        (gpu, tx): &mut RestarterArgs,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(..) = event {
            let (fresh, _) =
                Actor::spawn_linked(None, gpu.clone(), Default::default(), myself.get_cell())
                    .await?;
            let _ = tx.send(fresh);
        }
        Ok(())
    }
}

/// Restarts through a ractor supervision tree.
pub struct RactorRestarts {
    /// The tokio runtime the callers run on.
    pub tokio: tokio::runtime::Runtime,
    rt: Runtime,
    current: ActorRef<GpuMsg>,
    restarted: tokio::sync::mpsc::UnboundedReceiver<ActorRef<GpuMsg>>,
    _restarter: ActorRef<()>,
}

impl RactorRestarts {
    /// A supervisor and its GPU actor.
    pub fn new() -> Self {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio");
        let rt = Runtime::new().expect("runtime");
        let gpu = GpuActor::<Probe>::new(rt.clone());
        let (tx, restarted) = tokio::sync::mpsc::unbounded_channel();
        let (current, restarter) = tokio.block_on(async {
            let (restarter, _) = Actor::spawn(None, Restarter, (gpu.clone(), tx))
                .await
                .expect("supervisor");
            let (current, _) =
                Actor::spawn_linked(None, gpu, Default::default(), restarter.get_cell())
                    .await
                    .expect("GPU actor");
            (current, restarter)
        });
        RactorRestarts {
            tokio,
            rt,
            current,
            restarted,
            _restarter: restarter,
        }
    }

    /// One restart as a caller sees it: from the error its panicking ask
    /// resolves with (the fault, detected and swept) to the first reply of
    /// the actor the supervisor spawned in its place.
    pub fn restart(&mut self) -> Duration {
        self.tokio.block_on(async {
            let gpu = GpuActorRef::<Probe>::new(self.current.clone());
            let failed = gpu.ask(Explode()).await;
            let t0 = Instant::now();
            assert!(failed.is_err(), "the handler panics");
            let fresh = self.restarted.recv().await.expect("restarted");
            let reply = GpuActorRef::<Probe>::new(fresh.clone()).ask(Echo(1)).await;
            let t = t0.elapsed();
            assert_eq!(reply.ok(), Some(1));
            self.current = fresh;
            t
        })
    }

    /// The base: spawning a fresh GPU actor, to its first reply.
    pub fn fresh_spawn(&self) -> Duration {
        self.tokio.block_on(async {
            let t0 = Instant::now();
            let (a, h) = Actor::spawn(
                None,
                GpuActor::<Probe>::new(self.rt.clone()),
                Default::default(),
            )
            .await
            .expect("spawn");
            let reply = GpuActorRef::<Probe>::new(a.clone()).ask(Echo(1)).await;
            let t = t0.elapsed();
            assert_eq!(reply.ok(), Some(1));
            a.stop(None);
            let _ = h.await;
            t
        })
    }
}

impl Default for RactorRestarts {
    fn default() -> Self {
        Self::new()
    }
}

/// Watchdog detection on a runtime whose limit is `limit`.
pub struct WatchdogDetection {
    rt: Runtime,
    /// The limit.
    pub limit: Duration,
}

impl WatchdogDetection {
    /// A runtime with this watchdog limit.
    pub fn new(limit: Duration) -> Self {
        WatchdogDetection {
            rt: Runtime::builder().watchdog(limit).build().expect("runtime"),
            limit,
        }
    }

    /// The poller's watchdog tick for this limit (its poll interval when
    /// idle): a quarter of the limit, at least 1 ms.
    pub fn poll_interval(&self) -> Duration {
        (self.limit / 4).max(Duration::from_millis(1))
    }

    /// One hang: from the ask that starts a handler sleeping 20× the limit
    /// (with a second ask pending behind it) to the watchdog's fault.
    pub fn detect(&self) -> Duration {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut slot = self
            .rt
            .launch::<Probe, ChannelWaiter>(
                Default::default(),
                &LaunchOptions::default(),
                move |e| {
                    if let SlotEvent::Faulted(_) = e {
                        let _ = tx.try_send(Instant::now());
                    }
                },
            )
            .expect("launch");
        let hang = (self.limit * 20).as_millis() as u64;
        let t0 = Instant::now();
        let _hung = ringkernel::conformance::ask(&mut slot, Nap(hang));
        let _behind = ringkernel::conformance::ask(&mut slot, Nap(0));
        let at = rx.recv().expect("the watchdog fires");
        slot.recover();
        at - t0
    }
}
