//! Workloads shared by the criterion benches and the `report` binary: each
//! comparison is a pair of closures (ours, baseline) doing the same work.
//!
//! Unpublished: it exists so the comparison crates (rtrb, uhlc) never become
//! dependencies of the library.

pub mod actors;
pub mod cuda;
pub mod faults;
pub mod k2k;
pub mod pipeline;
pub mod wgpu;

use bytemuck::{Pod, Zeroable};
use ringkernel::doorbell::Doorbell;
use ringkernel::envelope::{Envelope, EnvelopeHeader, Flags, HEADER_SIZE, HeaderCheck, encode_pod};
use ringkernel::hlc::Hlc;
use ringkernel::id::{ActorId, ClockDomain};
use ringkernel::ring::{Consumer, Producer, Ring, RingLayout};
use std::hint::black_box;

/// Ring capacity used by the ring benches.
pub const CAPACITY: u32 = 1024;

/// A 64-byte inline payload.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub struct Payload(pub [u64; 8]);

/// The envelope header every envelope bench sends.
pub fn header() -> EnvelopeHeader {
    EnvelopeHeader::new(7, Flags::ASK)
        .with_src(ActorId::cpu(0, 1))
        .with_dst(ActorId::gpu(0, 2))
        .with_stamp(0x1234_5670, ClockDomain::host(0))
        .with_trace_id(99)
}

/// Raw ring with 64-byte slots: push one record, pop it.
pub struct RawRing {
    tx: Producer,
    rx: Consumer,
}

impl Default for RawRing {
    fn default() -> Self {
        let (tx, rx) = Ring::new(RingLayout::new(CAPACITY, 64).expect("valid layout"));
        RawRing { tx, rx }
    }
}

impl RawRing {
    /// `n` push+pop pairs.
    #[inline(never)]
    pub fn run(&mut self, n: u64) {
        let mut rec = [0u8; 64];
        for i in 0..n {
            rec[0] = i as u8;
            let rec: &[u8; 64] = black_box(&rec);
            self.tx.try_push(rec).expect("room");
            let got = self
                .rx
                .try_pop_with(|s| <[u8; 64]>::try_from(&s[..64]).expect("64-byte slot"));
            black_box(got);
        }
    }
}

/// rtrb with `[u8; N]` elements: push one, pop it.
pub struct RtrbRing<const N: usize> {
    tx: rtrb::Producer<[u8; N]>,
    rx: rtrb::Consumer<[u8; N]>,
}

impl<const N: usize> Default for RtrbRing<N> {
    fn default() -> Self {
        let (tx, rx) = rtrb::RingBuffer::new(CAPACITY as usize);
        RtrbRing { tx, rx }
    }
}

impl<const N: usize> RtrbRing<N> {
    /// `n` push+pop pairs.
    #[inline(never)]
    pub fn run(&mut self, n: u64) {
        let mut rec = [0u8; N];
        for i in 0..n {
            rec[0] = i as u8;
            self.tx.push(black_box(rec)).expect("room");
            black_box(self.rx.pop().ok());
        }
    }
}

/// Envelope ring with 128-byte slots: send (encode + publish + doorbell
/// check), then receive (validate + decode the payload).
pub struct EnvelopeRing {
    tx: Producer,
    rx: Consumer,
    bell: Doorbell,
    header: EnvelopeHeader,
}

impl Default for EnvelopeRing {
    fn default() -> Self {
        let (tx, rx) = Ring::new(RingLayout::new(CAPACITY, 128).expect("valid layout"));
        EnvelopeRing {
            tx,
            rx,
            bell: Doorbell::new(),
            header: header(),
        }
    }
}

impl EnvelopeRing {
    /// `n` send+receive pairs.
    #[inline(never)]
    pub fn run(&mut self, n: u64) {
        let check = HeaderCheck::only(64, &[7]);
        for i in 0..n {
            let h = self.header.with_seq(i);
            self.tx
                .try_send(black_box(&h), Payload([i; 8]))
                .expect("room");
            self.bell
                .ring(|| unreachable!("nobody parks in this bench"));
            let got = self.rx.try_recv_with(&check, |e| e.payload_as::<Payload>());
            black_box(got.map(|r| r.map(|p| p.map(|p| p.0[0]))));
        }
    }
}

/// How the two-thread bench's producer uses the doorbell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bell {
    /// No doorbell: the bare ring, as rtrb.
    None,
    /// Publish and check the doorbell (SeqCst fence + load) per message.
    PerMessage,
    /// Publish up to this many as one batch, one doorbell check per batch.
    Batch(u64),
}

/// Two threads, producer and consumer, each pinned to its own core when the
/// machine has two: `n` envelopes of 128 bytes through our ring.
pub fn two_thread_ours(n: u64, bell_mode: Bell) {
    let (tx, rx) = Ring::new(RingLayout::new(CAPACITY, 128).expect("valid layout"));
    let bell = Doorbell::new();
    let h = header();
    let check = HeaderCheck::only(64, &[7]);
    std::thread::scope(|s| {
        let bell = &bell;
        // The producer half moves to its thread, so the two halves' local
        // counters never share a cache line (as in real use).
        s.spawn(move || {
            let mut tx = tx;
            pin(0);
            let mut i = 0;
            while i < n {
                match bell_mode {
                    Bell::Batch(k) => {
                        let mut batch = tx.batch();
                        let end = (i + k).min(n);
                        while i < end && batch.try_send(&h.with_seq(i), Payload([i; 8])).is_ok() {
                            i += 1;
                        }
                        let published = batch.publish();
                        if published > 0 {
                            bell.ring(|| ());
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    Bell::None | Bell::PerMessage => {
                        match tx.try_send(&h.with_seq(i), Payload([i; 8])) {
                            Ok(_) => {
                                if bell_mode == Bell::PerMessage {
                                    bell.ring(|| ());
                                }
                                i += 1;
                            }
                            Err(_) => std::hint::spin_loop(),
                        }
                    }
                }
            }
        });
        // The consumer on a thread of its own too: pinning the caller
        // would pin every thread it starts later (the benches after this).
        s.spawn(move || {
            let mut rx = rx;
            pin(1);
            let mut got = 0;
            while got < n {
                match rx.try_recv_with(&check, |e| e.payload_as::<Payload>().map(|p| p.0[0])) {
                    Some(v) => {
                        debug_assert_eq!(v, Ok(Ok(got)));
                        black_box(v).ok();
                        got += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
        });
    });
}

/// As [`two_thread_ours`] with rtrb carrying `[u8; 128]`.
pub fn two_thread_rtrb(n: u64) {
    let (tx, rx) = rtrb::RingBuffer::<[u8; 128]>::new(CAPACITY as usize);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut tx = tx;
            pin(0);
            let mut rec = [0u8; 128];
            let mut i = 0u64;
            while i < n {
                rec[..8].copy_from_slice(&i.to_le_bytes());
                match tx.push(rec) {
                    Ok(()) => i += 1,
                    Err(_) => std::hint::spin_loop(),
                }
            }
        });
        s.spawn(move || {
            let mut rx = rx;
            pin(1);
            let mut got = 0;
            while got < n {
                match rx.pop() {
                    Ok(v) => {
                        black_box(v);
                        got += 1;
                    }
                    Err(_) => std::hint::spin_loop(),
                }
            }
        });
    });
}

/// Pins the calling thread to `cpu` if the machine has it (best effort).
pub fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity only
    // read and write the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `n` ticks of our HLC over its default (TSC) clock.
#[inline(never)]
pub fn hlc_ours(hlc: &Hlc, n: u64) {
    for _ in 0..n {
        black_box(hlc.tick());
    }
}

/// `n` `uhlc::HLC::new_timestamp` calls with its default clock.
#[inline(never)]
pub fn hlc_uhlc(hlc: &uhlc::HLC, n: u64) {
    for _ in 0..n {
        black_box(hlc.new_timestamp());
    }
}

/// `n` envelope encodes into a 128-byte slot and validating decodes.
#[inline(never)]
pub fn codec_ours(n: u64) {
    let mut slot = [0u8; 128];
    let h = header();
    let check = HeaderCheck::only(64, &[7]);
    for i in 0..n {
        encode_pod(black_box(&mut slot), &h.with_seq(i), &Payload([i; 8])).expect("fits");
        let env = Envelope::decode(black_box(&slot), &check).expect("valid");
        black_box((
            env.header.seq,
            env.payload_as::<Payload>().expect("sized").0[0],
        ));
    }
}

/// The same bytes with plain bytemuck copies and no validation.
#[inline(never)]
pub fn codec_bytemuck(n: u64) {
    let mut slot = [0u8; 128];
    let h = header();
    for i in 0..n {
        let hh = h.with_seq(i);
        let p = Payload([i; 8]);
        let s = black_box(&mut slot);
        s[..HEADER_SIZE].copy_from_slice(bytemuck::bytes_of(&hh));
        s[HEADER_SIZE..].copy_from_slice(bytemuck::bytes_of(&p));
        let s = black_box(&slot);
        let back: EnvelopeHeader = bytemuck::pod_read_unaligned(&s[..HEADER_SIZE]);
        let pay: Payload = bytemuck::pod_read_unaligned(&s[HEADER_SIZE..]);
        black_box((back, pay));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every workload runs (what `cargo test --benches` smoke-tests too).
    #[test]
    fn workloads_run() {
        RawRing::default().run(3000);
        RtrbRing::<64>::default().run(3000);
        RtrbRing::<128>::default().run(3000);
        EnvelopeRing::default().run(3000);
        two_thread_ours(5000, Bell::None);
        two_thread_ours(5000, Bell::PerMessage);
        two_thread_ours(5000, Bell::Batch(32));
        two_thread_rtrb(5000);
        hlc_ours(&Hlc::new(ClockDomain::host(0)), 100);
        hlc_uhlc(&uhlc::HLC::default(), 100);
        codec_ours(100);
        codec_bytemuck(100);
        let mut core = actors::CorePair::new();
        core.slot_asks(100);
        core.echo_thread_round_trips(100);
        let actix = actors::ActixPair::new();
        actix.gpu_asks(100);
        actix.native_asks(100);
        actix.gpu_tells(1000);
        actix.native_tells(1000);
        let kameo = actors::KameoPair::new();
        kameo.gpu_asks(100);
        kameo.native_asks(100);
        kameo.gpu_tells(1000);
        kameo.native_tells(1000);
        let pair = actors::RactorPair::new();
        pair.gpu_asks(100);
        pair.native_calls(100);
        pair.gpu_tells(1000);
        pair.native_casts(1000);
    }
}
