//! The cuda backend's benches. On every machine: the c-host backend (the
//! CUDA device loop compiled as host C++) against the cpu backend, ask for
//! ask — what the C loop costs next to the Rust one. On a GPU: an ask to
//! the persistent actor-host kernel against a kernel launch per message
//! (the host spinning on a mapped flag the launch writes).

use ringkernel::conformance::{self, ChannelWaiter, Echo, Forward, Probe, Relay};
use ringkernel::id::ActorId;
use ringkernel::kernel::Payload;
use ringkernel::link::LinkOptions;
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime, SubmitError};
use ringkernel_cuda::{CHostBackend, CudaBackend};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The time of one ask, after sleeping `idle` first (zero: back to back).
fn timed_ask(slot: &mut GpuSlot<ChannelWaiter>, idle: Duration) -> Duration {
    if !idle.is_zero() {
        std::thread::sleep(idle);
    }
    let start = Instant::now();
    asks(slot, 1);
    start.elapsed()
}

fn asks(slot: &mut GpuSlot<ChannelWaiter>, n: u64) {
    for i in 0..n {
        let v = conformance::ask(slot, Echo(i))
            .wait()
            .expect("reply")
            .decode::<u64>()
            .expect("u64");
        debug_assert_eq!(v, i);
    }
}

fn probe(rt: &Runtime) -> GpuSlot<ChannelWaiter> {
    rt.launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
        .expect("launch")
}

/// A Relay linked to a Probe (a K2K link of 256 slots) on one runtime.
pub struct Linked {
    relay: GpuSlot<ChannelWaiter>,
    sink: GpuSlot<ChannelWaiter>,
    sent: u64,
}

impl Linked {
    fn new(rt: &Runtime) -> Self {
        let relay = rt
            .launch::<Relay, ChannelWaiter>(0, &LaunchOptions::default(), |_| {})
            .expect("launch");
        let sink = probe(rt);
        rt.connect(relay.id(), sink.id(), LinkOptions::default().capacity(256))
            .expect("connect");
        Linked {
            relay,
            sink,
            sent: 0,
        }
    }

    /// `n` tells to the relay, each forwarded over the link as a `Seq` to
    /// the sink, until the sink has processed them all.
    pub fn forward(&mut self, n: u64) {
        let to = self.sink.id().to_bits();
        for i in 0..n {
            let mut payload: Payload = Forward(to, self.sent + i).into();
            loop {
                match self.relay.tell(payload, ActorId::NONE) {
                    Ok(()) => break,
                    Err(SubmitError::Full(back)) => {
                        payload = back;
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("tell refused: {e:?}"),
                }
            }
        }
        self.sent += n;
        while self.sink.status().processed < self.sent {
            std::thread::yield_now();
        }
    }
}

/// A Probe actor on the c-host backend and one on the cpu backend.
pub struct CHostBench {
    chost: GpuSlot<ChannelWaiter>,
    cpu: GpuSlot<ChannelWaiter>,
    /// K2K on each backend.
    pub linked: (Linked, Linked),
    _rts: (Runtime, Runtime),
}

impl CHostBench {
    /// Compiles the loop (host C++) and launches both actors.
    pub fn new() -> Self {
        let c = Runtime::builder()
            .device(CHostBackend::new())
            .build()
            .expect("runtime");
        let p = Runtime::new().expect("runtime");
        CHostBench {
            chost: probe(&c),
            cpu: probe(&p),
            linked: (Linked::new(&c), Linked::new(&p)),
            _rts: (c, p),
        }
    }

    /// `n` sequential asks on the c-host backend.
    pub fn chost_asks(&mut self, n: u64) {
        asks(&mut self.chost, n);
    }

    /// `n` sequential asks on the cpu backend.
    pub fn cpu_asks(&mut self, n: u64) {
        asks(&mut self.cpu, n);
    }

    /// One ask on the c-host backend, after idling `idle`.
    pub fn chost_ask_after(&mut self, idle: Duration) -> Duration {
        timed_ask(&mut self.chost, idle)
    }
}

impl Default for CHostBench {
    fn default() -> Self {
        Self::new()
    }
}

/// A Probe actor on the GPU, and the backend for the baseline.
pub struct GpuBench {
    backend: Arc<CudaBackend>,
    slot: GpuSlot<ChannelWaiter>,
    /// K2K on the GPU, and on the cpu backend for the baseline.
    pub linked: (Linked, Linked),
    _rt: (Runtime, Runtime),
}

impl GpuBench {
    /// `None` (with the reason printed) without a driver and device.
    pub fn new() -> Option<Self> {
        let backend = match CudaBackend::builder()
            .kernel::<Probe>()
            .and_then(|b| b.kernel::<Relay>())
            .and_then(|b| b.build())
        {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cuda benches skipped: {e}");
                return None;
            }
        };
        eprintln!("cuda device: {:?}", backend.info());
        let rt = Runtime::builder()
            .device(backend.clone())
            .build()
            .expect("runtime");
        let slot = probe(&rt);
        let cpu = Runtime::new().expect("runtime");
        let linked = (Linked::new(&rt), Linked::new(&cpu));
        Some(GpuBench {
            backend,
            slot,
            linked,
            _rt: (rt, cpu),
        })
    }

    /// `n` sequential asks to the persistent kernel.
    pub fn asks(&mut self, n: u64) {
        asks(&mut self.slot, n);
    }

    /// `n` messages, a kernel launch each.
    pub fn launches(&mut self, n: u64) {
        self.backend.launch_per_message(n).expect("launches");
    }

    /// `n` messages, a CUDA-graph launch each.
    pub fn graph_launches(&mut self, n: u64) {
        self.backend
            .graph_launch_per_message(n)
            .expect("graph launches");
    }

    /// One ask to the persistent kernel, after idling `idle`.
    pub fn ask_after(&mut self, idle: Duration) -> Duration {
        timed_ask(&mut self.slot, idle)
    }

    /// One message served by a launch of its own.
    pub fn launch_once(&mut self) -> Duration {
        self.backend.launch_per_message(1).expect("a launch")
    }
}
