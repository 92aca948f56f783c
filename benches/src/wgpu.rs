//! The wgpu backend (a real adapter: lavapipe in CI, or a GPU): an ask
//! through the runtime against the bare floor of one dispatch with its
//! readback; tells' throughput against the cpu backend's; per-message time
//! of a 1024-message dispatch against a 1-message one.

use ringkernel::conformance::{self, Add, ChannelWaiter, Echo, Probe, ProbeState, Total};
use ringkernel::envelope::{EnvelopeHeader, Flags, encode_pod};
use ringkernel::id::{ActorId, ClockDomain, CorrelationId};
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime};
use ringkernel_wgpu::{Program, SLOT_BYTES, SlotCell, WgpuBackend, WgslKernel};
use std::sync::Arc;

/// A wgpu runtime with one Probe actor, and the bare device beside it.
pub struct WgpuBench {
    backend: Arc<WgpuBackend>,
    program: Program,
    slot: GpuSlot<ChannelWaiter>,
    cpu_slot: GpuSlot<ChannelWaiter>,
    /// A Probe actor on a second backend that keeps one dispatch in flight.
    serial_slot: GpuSlot<ChannelWaiter>,
    total: u64,
    _rt: Runtime,
    _cpu: Runtime,
    _serial: Runtime,
}

fn echo(n: u64) -> [u8; SLOT_BYTES] {
    let header = EnvelopeHeader::new(Echo::TYPE_ID, Flags::ASK)
        .with_src(ActorId::cpu(0, 1))
        .with_dst(ActorId::gpu(0, 2))
        .with_correlation(CorrelationId::from_bits(n + 1))
        .with_stamp(n, ClockDomain::host(0))
        .with_seq(n + 1);
    let mut slot = [0u8; SLOT_BYTES];
    encode_pod(&mut slot, &header, &Echo(n)).expect("fits");
    slot
}

use ringkernel::kernel::Message;

impl WgpuBench {
    /// `None` (with the reason printed) without a WebGPU adapter.
    pub fn new() -> Option<Self> {
        let backend = match WgpuBackend::new() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("wgpu benches skipped: {e}");
                return None;
            }
        };
        let program = backend
            .device()
            .compile(&WgslKernel {
                name: "probe",
                state_words: (std::mem::size_of::<ProbeState>() / 4) as u32,
                handler: conformance::PROBE_WGSL,
                max_later: 0,
                width: 1,
            })
            .expect("probe compiles");
        let rt = Runtime::builder()
            .device(backend.clone())
            .build()
            .expect("runtime");
        let opts = LaunchOptions::default();
        let slot = rt
            .launch::<Probe, ChannelWaiter>(Default::default(), &opts, |_| {})
            .expect("launch");
        let cpu = Runtime::new().expect("runtime");
        let cpu_slot = cpu
            .launch::<Probe, ChannelWaiter>(Default::default(), &opts, |_| {})
            .expect("launch");
        let serial = Runtime::builder()
            .device(WgpuBackend::with_in_flight(1).expect("a second device"))
            .build()
            .expect("runtime");
        let serial_slot = serial
            .launch::<Probe, ChannelWaiter>(Default::default(), &opts, |_| {})
            .expect("launch");
        Some(WgpuBench {
            backend,
            program,
            slot,
            cpu_slot,
            serial_slot,
            total: 0,
            _rt: rt,
            _cpu: cpu,
            _serial: serial,
        })
    }

    /// `n` sequential asks through the runtime (H2K → dispatch → K2H →
    /// poller → caller).
    pub fn asks(&mut self, n: u64) {
        for i in 0..n {
            let v = conformance::ask(&mut self.slot, Echo(i))
                .wait()
                .expect("reply")
                .decode::<u64>()
                .expect("u64");
            debug_assert_eq!(v, i);
        }
    }

    /// `n` bare dispatches of one message, each with its readback.
    pub fn bare_dispatches(&mut self, n: u64) {
        self.dispatch_batches(n, 1);
    }

    /// `n` messages in dispatches of `batch`.
    pub fn dispatch_batches(&mut self, n: u64, batch: usize) {
        let messages: Vec<[u8; SLOT_BYTES]> = (0..batch as u64).map(echo).collect();
        let mut cells = [SlotCell {
            hlc: 0,
            domain: 0,
            fault: 0,
            state: vec![0; std::mem::size_of::<ProbeState>() / 4],
        }];
        let mut done = 0;
        while done < n {
            let out = self
                .backend
                .device()
                .dispatch(&self.program, 1, &mut cells, &[&messages])
                .expect("dispatch");
            done += out[0].processed as u64;
        }
    }

    /// `n` tells then one ask that sees them, on wgpu.
    pub fn wgpu_tells(&mut self, n: u64) {
        Self::tells(&mut self.slot, &mut self.total, n);
    }

    /// The same on a wgpu backend keeping one dispatch in flight.
    pub fn serial_tells(&mut self, n: u64) {
        let mut total = 0;
        Self::tells(&mut self.serial_slot, &mut total, n);
    }

    /// The same on the cpu backend.
    pub fn cpu_tells(&mut self, n: u64) {
        let mut total = 0;
        Self::tells(&mut self.cpu_slot, &mut total, n);
    }

    fn tells(slot: &mut GpuSlot<ChannelWaiter>, total: &mut u64, n: u64) {
        let before = conformance::ask(slot, Total())
            .wait()
            .expect("total")
            .decode::<u64>()
            .expect("u64");
        for _ in 0..n {
            conformance::tell(slot, Add(1));
        }
        let after = conformance::ask(slot, Total())
            .wait()
            .expect("total")
            .decode::<u64>()
            .expect("u64");
        assert_eq!(after - before, n);
        *total = after;
    }
}
