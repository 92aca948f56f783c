//! K2K one-way: a source kernel's handler sends `Value`s to a linked sink
//! kernel (both cpu-backend GPU actors, each on its own device thread);
//! against rtrb carrying the same 128-byte slots between two threads.

use bytemuck::{Pod, Zeroable};
use ringkernel::conformance::{self, ChannelWaiter};
use ringkernel::id::ActorId;
use ringkernel::kernel::{CpuHandlers, Kernel, MAX_SENDS, Message};
use ringkernel::link::LinkOptions;
use ringkernel::runtime::{GpuSlot, LaunchOptions, Runtime};
use std::time::Duration;

/// Tell: send `count` values to `to`.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Emit {
    /// The receiver's id bits.
    pub to: u64,
    /// How many.
    pub count: u64,
}

impl Message for Emit {
    const TYPE_ID: u32 = 1;
    type Reply = ();
}

/// What travels over the link.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Value(pub u64);

impl Message for Value {
    const TYPE_ID: u32 = 2;
    type Reply = ();
}

/// Ask: values received so far.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
pub struct Count;

impl Message for Count {
    const TYPE_ID: u32 = 3;
    type Reply = u64;
}

/// Source and sink in one kernel type.
pub struct Node;

impl Kernel for Node {
    type State = u64;
    const NAME: &'static str = "bench-k2k";
    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::new()
                .on(|_: &mut u64, e: Emit, ctx| {
                    let to = ActorId::from_bits(e.to);
                    for v in 0..e.count {
                        ctx.send(to, Value(v));
                    }
                    Ok(())
                })
                .on(|n: &mut u64, _: Value, _| {
                    *n += 1;
                    Ok(())
                })
                .on(|n: &mut u64, _: Count, ctx| {
                    ctx.reply(*n);
                    Ok(())
                }),
        )
    }
}

/// Two linked kernels.
pub struct K2kPair {
    _rt: Runtime,
    source: GpuSlot<ChannelWaiter>,
    sink: GpuSlot<ChannelWaiter>,
    received: u64,
}

impl Default for K2kPair {
    fn default() -> Self {
        Self::new()
    }
}

impl K2kPair {
    /// Launches and links them.
    pub fn new() -> Self {
        let rt = Runtime::new().expect("runtime");
        let opts = LaunchOptions::default();
        let source = rt
            .launch::<Node, ChannelWaiter>(0, &opts, |_| {})
            .expect("launch");
        let sink = rt
            .launch::<Node, ChannelWaiter>(0, &opts, |_| {})
            .expect("launch");
        rt.connect(source.id(), sink.id(), LinkOptions::default())
            .expect("connect");
        K2kPair {
            _rt: rt,
            source,
            sink,
            received: 0,
        }
    }

    /// Sends `n` values over the link and waits until the sink has them.
    pub fn one_way(&mut self, n: u64) {
        let to = self.sink.id().to_bits();
        let mut left = n;
        while left > 0 {
            let count = left.min(MAX_SENDS as u64);
            conformance::tell(&mut self.source, Emit { to, count });
            left -= count;
        }
        self.received += n;
        loop {
            let got = conformance::ask(&mut self.sink, Count)
                .wait()
                .expect("count")
                .decode::<u64>()
                .expect("u64");
            if got >= self.received {
                break;
            }
            // Seldom: each ask wakes the poller, which then spins a while.
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}
