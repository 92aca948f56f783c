//! The cuda backend's benches. On every machine: the c-host backend (the
//! CUDA device loop compiled as host C++) against the cpu backend, ask for
//! ask — what the C loop costs next to the Rust one. On a GPU: an ask to
//! the persistent actor-host kernel against a kernel launch per message
//! (the host spinning on a mapped flag the launch writes).

use ringkernel::conformance::{self, ChannelWaiter, Echo, Probe};
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime};
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

/// A Probe actor on the c-host backend and one on the cpu backend.
pub struct CHostBench {
    chost: GpuSlot<ChannelWaiter>,
    cpu: GpuSlot<ChannelWaiter>,
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
    _rt: Runtime,
}

impl GpuBench {
    /// `None` (with the reason printed) without a driver and device.
    pub fn new() -> Option<Self> {
        let backend = match CudaBackend::builder()
            .kernel::<Probe>()
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
        Some(GpuBench {
            backend,
            slot,
            _rt: rt,
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
