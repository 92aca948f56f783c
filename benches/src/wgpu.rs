//! The wgpu backend (a real adapter: lavapipe in CI, or a GPU): an ask
//! through the runtime against the bare floor of one dispatch with its
//! readback; tells' throughput against the cpu backend's; per-message time
//! of a 1024-message dispatch against a 1-message one; a relay's sends over
//! a (host-mediated) K2K link against the same sends routed by the poller.

use ringkernel::conformance::{
    self, Add, ChannelWaiter, Echo, Forward, Probe, ProbeState, Relay, SeqReport, Total,
};
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
    /// Relays and their receivers: linked, and not.
    linked: Forwarding,
    routed: Forwarding,
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
        let linked = Forwarding::new(&rt, true);
        let routed = Forwarding::new(&rt, false);
        Some(WgpuBench {
            backend,
            program,
            slot,
            cpu_slot,
            serial_slot,
            total: 0,
            linked,
            routed,
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

    /// `n` values through a relay to its receiver over their K2K link.
    pub fn linked_forwards(&mut self, n: u64) {
        self.linked.forward(n);
    }

    /// The same through a relay not linked to its receiver: the poller
    /// routes each send to the receiver's mailbox.
    pub fn routed_forwards(&mut self, n: u64) {
        self.routed.forward(n);
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

/// Values sent before waiting for the receiver: the routed path parks at
/// most [`ROUTE_OVERFLOW`](ringkernel::runtime::ROUTE_OVERFLOW) deliveries
/// per destination beyond its mailbox and dead-letters the rest, where a
/// link holds the sender back instead; a chunk stays within both.
const CHUNK: u64 = 1024;

/// A relay forwarding `Seq`s to a Probe, over a link or routed.
struct Forwarding {
    linked: bool,
    relay: GpuSlot<ChannelWaiter>,
    sink: Arc<SinkMailbox>,
    sent: u64,
}

/// The receiver's mailbox in the registry (routed sends go through it into
/// its H2K ring, as an adapter's mailbox puts them); the bench's own asks
/// take the same lock.
struct SinkMailbox(std::sync::Mutex<GpuSlot<ChannelWaiter>>);

impl SinkMailbox {
    fn slot(&self) -> std::sync::MutexGuard<'_, GpuSlot<ChannelWaiter>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ringkernel::registry::Mailbox for SinkMailbox {
    fn try_deliver(
        &self,
        d: ringkernel::registry::Delivery,
    ) -> Result<(), ringkernel::registry::DeliveryError> {
        match self.slot().tell(d.payload, d.src) {
            Ok(()) => Ok(()),
            // The poller parks it and retries.
            Err(_) => Err(ringkernel::registry::DeliveryError::Full(d)),
        }
    }
}

impl Forwarding {
    fn new(rt: &Runtime, link: bool) -> Self {
        let opts = LaunchOptions::default();
        let relay = rt
            .launch::<Relay, ChannelWaiter>(0, &opts, |_| {})
            .expect("launch");
        let sink = rt
            .launch::<Probe, ChannelWaiter>(Default::default(), &opts, |_| {})
            .expect("launch");
        let id = sink.id();
        let sink = Arc::new(SinkMailbox(std::sync::Mutex::new(sink)));
        if link {
            rt.connect(relay.id(), id, ringkernel::link::LinkOptions::default())
                .expect("connect");
        } else {
            rt.registry().register(id, sink.clone());
        }
        Forwarding {
            linked: link,
            relay,
            sink,
            sent: 0,
        }
    }

    /// `n` values through the relay, in chunks of [`CHUNK`], each waited
    /// for until the receiver has seen it all.
    fn forward(&mut self, n: u64) {
        let to = self.sink.slot().id().to_bits();
        let mut left = n;
        while left > 0 {
            let chunk = left.min(CHUNK);
            left -= chunk;
            for _ in 0..chunk {
                conformance::tell(&mut self.relay, Forward(to, self.sent));
                self.sent += 1;
            }
            loop {
                let pending = conformance::ask(&mut self.sink.slot(), SeqReport());
                let [seen, disorder]: [u64; 2] =
                    pending.wait().expect("report").decode().expect("[u64; 2]");
                assert_eq!(disorder, 0, "in order (linked: {})", self.linked);
                if seen >= self.sent {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
}
