//! The protocol core end to end, on two threads.
//!
//! The main thread plays the host: it asks a "device loop" thread to echo
//! sequence numbers. Each ask takes a waiter in the slab, is stamped by the
//! host HLC and written into the H2K ring; the device loop merges the stamp,
//! answers into the K2H ring and parks on its doorbell when idle; the host
//! drains K2H, merges the reply's stamp and resolves the waiter by
//! correlation id. No locks, no allocation per message.
//!
//! `cargo run --release --example ring_pump [messages]`

use ringkernel::control::{ControlBlock, LifecycleState};
use ringkernel::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use ringkernel::hlc::Hlc;
use ringkernel::id::{ActorId, ClockDomain};
use ringkernel::ring::{Ring, RingLayout};
use ringkernel::waiter::WaiterSlab;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

const ECHO: u32 = 1;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let layout = RingLayout::with_capacity(256)?;
    let (mut h2k, mut h2k_rx) = Ring::new(layout);
    let (mut k2h_tx, mut k2h) = Ring::new(layout);
    let control = Arc::new(ControlBlock::new());
    let gpu = ActorId::gpu(0, 1);
    let host_clock = Hlc::new(ClockDomain::host(0));
    let waiters = WaiterSlab::<Instant>::new(256, 0)?;

    control.request(LifecycleState::Launched)?;
    control.request(LifecycleState::Active)?;

    // The device loop: what the cpu backend runs per actor slot.
    let device = {
        let control = control.clone();
        thread::spawn(move || {
            let clock = Hlc::new(ClockDomain::unit(0, 1));
            let check = HeaderCheck::only(layout.max_payload(), &[ECHO]);
            let (mut processed, mut parks) = (0u64, 0u64);
            control.ack(LifecycleState::Active, 0);
            loop {
                let mut batch = h2k_rx.batch();
                // Dequeue only with a K2H slot reserved: the reply always has room.
                while k2h_tx.free_slots() > 0 {
                    let Some(env) =
                        batch.try_recv_with(&check, |e| (e.header, e.payload_as::<u64>()))
                    else {
                        break;
                    };
                    let (header, value) = env.expect("host sends valid envelopes");
                    let stamp = clock.receive(header.hlc);
                    let reply = EnvelopeHeader::new(ECHO, Flags::REPLY)
                        .with_src(header.dst)
                        .with_dst(header.src)
                        .with_correlation(header.correlation)
                        .with_stamp(stamp.hlc, stamp.domain);
                    k2h_tx
                        .try_send(&reply, value.expect("u64 payload"))
                        .expect("reserved");
                    processed += 1;
                }
                let drained = batch.release();
                control.record_progress(processed, processed);
                if drained > 0 {
                    continue;
                }
                if control.requested_state() == Ok(LifecycleState::Terminated) {
                    control.ack(LifecycleState::Terminated, 0);
                    return (processed, parks);
                }
                let has_work = || {
                    !h2k_rx.is_empty() || control.requested_state() != Ok(LifecycleState::Active)
                };
                if control.doorbell().park(has_work, thread::park) {
                    parks += 1;
                }
            }
        })
    };
    let device_thread = device.thread().clone();
    let wake = || device_thread.unpark();

    let check = HeaderCheck::only(layout.max_payload(), &[ECHO]);
    let started = Instant::now();
    let (mut sent, mut replied, mut rtt_ns, mut last_stamp) = (0u64, 0u64, 0u128, 0u64);
    while replied < total {
        // Ask as many as the window allows, published as one batch.
        let mut batch = h2k.batch();
        while sent < total {
            let Ok(id) = waiters.insert(Instant::now()) else {
                break;
            };
            let stamp = host_clock.tick();
            let ask = EnvelopeHeader::new(ECHO, Flags::ASK)
                .with_dst(gpu)
                .with_correlation(id)
                .with_seq(sent)
                .with_stamp(stamp.hlc, stamp.domain);
            if batch.try_send(&ask, sent).is_err() {
                // Ring full: give the waiter back and try again later.
                let _ = waiters.take(id);
                break;
            }
            sent += 1;
        }
        drop(batch);
        control.doorbell().ring(wake);
        // Drain replies and resolve their waiters.
        while let Some(reply) = k2h.try_recv_with(&check, |e| e.header) {
            let header = reply?;
            last_stamp = host_clock.receive(header.hlc).hlc;
            let asked_at = waiters.take(header.correlation)?;
            rtt_ns += asked_at.elapsed().as_nanos();
            replied += 1;
        }
    }
    let elapsed = started.elapsed();
    control.request(LifecycleState::Terminated)?;
    control.doorbell().ring(wake);
    let (processed, parks) = device.join().expect("device loop");

    println!(
        "asked {total} echoes through H2K/K2H rings ({}-byte slots, capacity {})",
        layout.slot_size(),
        layout.capacity()
    );
    println!(
        "device loop processed {processed}, parked {parks} times; final state {:?}",
        control.status()?.state
    );
    println!(
        "throughput {:.2} M msgs/s, mean ask round trip {:.2} us (windowed, {} in flight)",
        total as f64 / elapsed.as_secs_f64() / 1e6,
        rtt_ns as f64 / total as f64 / 1e3,
        waiters.capacity()
    );
    println!(
        "late/foreign replies: {:?}; last host HLC stamp {last_stamp:#x}",
        waiters.stats()
    );
    Ok(())
}
