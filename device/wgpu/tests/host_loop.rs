//! The host-driven dispatch loop over the real protocol objects — a control
//! block, an H2K ring it reads, a K2H ring it writes — with this test as
//! the host: asks and tells in, replies out by correlation, lifecycle
//! requests acknowledged, faults reported naming their message, fences
//! obeyed. Runs on a real WebGPU adapter (lavapipe in CI, where
//! `RINGKERNEL_REQUIRE_WGPU=1`); skips with a reason elsewhere.

mod common;
use common::*;
use ringkernel::control::{ControlBlock, ControlRef, FaultCode, LifecycleState};
use ringkernel::envelope::{EnvelopeHeader, Flags, HeaderCheck};
use ringkernel::id::{ActorId, ClockDomain, CorrelationId};
use ringkernel::kernel::SYS_NO_REPLY;
use ringkernel::ring::{Consumer, Producer, Ring, RingLayout};
use ringkernel_wgpu::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TYPE: u32 = 1;

/// The host's ends of one slot.
struct Host {
    control: ControlRef,
    h2k: Producer,
    k2h: Consumer,
    seq: u64,
    wake: std::thread::Thread,
}

impl Host {
    fn send(&mut self, m: u32, ask: bool) -> u64 {
        self.send_type(TYPE, m, ask)
    }

    fn send_type(&mut self, type_id: u32, m: u32, ask: bool) -> u64 {
        self.seq += 1;
        let header = EnvelopeHeader::new(type_id, if ask { Flags::ASK } else { Flags::empty() })
            .with_src(ActorId::cpu(0, 1))
            .with_dst(ActorId::gpu(0, 2))
            .with_correlation(if ask {
                CorrelationId::from_bits(self.seq)
            } else {
                CorrelationId::NONE
            })
            .with_stamp(self.seq, ClockDomain::host(0))
            .with_seq(self.seq);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.h2k.try_send(&header, m).is_err() {
            assert!(Instant::now() < deadline, "H2K stayed full");
            std::thread::sleep(Duration::from_micros(100));
        }
        let t = &self.wake;
        self.control.doorbell().ring(|| t.unpark());
        self.seq
    }

    fn request(&self, state: LifecycleState) {
        self.control.request(state).unwrap();
        let t = &self.wake;
        self.control.doorbell().ring(|| t.unpark());
    }

    /// Waits for `n` envelopes from K2H: (header, payload words).
    fn replies(&mut self, n: usize) -> Vec<(EnvelopeHeader, [u32; 2])> {
        let check = HeaderCheck::any_type(64);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < n {
            assert!(Instant::now() < deadline, "{} of {n} replies", out.len());
            match self.k2h.try_recv_with(&check, |e| {
                let mut w = [0u32; 2];
                for (i, c) in e.payload.chunks(4).take(2).enumerate() {
                    w[i] = u32::from_le_bytes(c.try_into().unwrap());
                }
                (e.header, w)
            }) {
                Some(r) => out.push(r.unwrap()),
                None => std::thread::sleep(Duration::from_micros(100)),
            }
        }
        out
    }

    fn wait(&self, what: &str, done: impl Fn(&ControlBlock) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(&self.control) {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn start(dev: &Arc<WgpuDevice>, kernel: &WgslKernel) -> (DispatchLoop, Host) {
    let program = Arc::new(dev.compile(kernel).unwrap());
    let lp = DispatchLoop::start(dev.clone()).unwrap();
    let layout = RingLayout::new(1024, 128).unwrap();
    let (h2k, h2k_rx) = Ring::new(layout);
    let (k2h_tx, k2h) = Ring::new(layout);
    let control = ControlRef::new();
    control.request(LifecycleState::Launched).unwrap();
    control.request(LifecycleState::Active).unwrap();
    lp.add(LoopSlot {
        id: ActorId::gpu(0, 2),
        control: control.clone(),
        h2k: h2k_rx,
        k2h: k2h_tx,
        served: vec![TYPE],
        cell: SlotCell {
            hlc: 0,
            domain: ClockDomain::unit(0, 3).to_bits(),
            fault: 0,
            state: vec![0; kernel.state_words as usize],
        },
        program,
        wake_host: Box::new(|| {}),
        wake_senders: Box::new(|| {}),
        links: None,
    });
    let wake = lp.thread().clone();
    (
        lp,
        Host {
            control,
            h2k,
            k2h,
            seq: 0,
            wake,
        },
    )
}

fn fold(ms: impl IntoIterator<Item = u32>) -> u32 {
    ms.into_iter()
        .fold(0u32, |s, m| s.wrapping_mul(31).wrapping_add(m))
}

#[test]
fn asks_and_tells_are_served_in_order_and_each_reply_finds_its_caller() {
    let Some(dev) = device().map(Arc::new) else {
        return;
    };
    let (_lp, mut host) = start(&dev, &FOLD);
    let n = 5_000u32;
    let mut asks = Vec::new();
    for m in 0..n {
        let ask = m % 10 == 9;
        let seq = host.send(m, ask);
        if ask {
            asks.push((seq, m));
        }
    }
    let replies = host.replies(asks.len());
    for ((h, [s, count]), (seq, m)) in replies.iter().zip(&asks) {
        assert!(h.flags.contains(Flags::REPLY));
        assert_eq!(
            h.correlation.to_bits(),
            *seq,
            "each reply to its own caller"
        );
        assert_eq!(h.dst, ActorId::cpu(0, 1));
        assert!(h.hlc > *seq, "the reply's stamp follows the ask's");
        assert_eq!((*s, *count), (fold(0..=*m), m + 1));
    }
    host.wait("every message committed", |c| {
        c.status().unwrap().processed == u64::from(n)
    });
    assert_eq!(host.control.committed(), u64::from(n));
    assert_eq!(host.h2k.observer().len(), 0, "every H2K slot released");
}

#[test]
fn a_deactivated_slot_holds_its_messages_until_activated() {
    let Some(dev) = device().map(Arc::new) else {
        return;
    };
    let (_lp, mut host) = start(&dev, &FOLD);
    host.request(LifecycleState::Deactivated);
    host.wait("deactivated", |c| {
        c.acked_state() == Ok(LifecycleState::Deactivated)
    });
    for m in 0..100 {
        host.send(m, false);
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(host.h2k.observer().len(), 100);
    assert_eq!(host.control.status().unwrap().processed, 0);
    host.request(LifecycleState::Active);
    host.wait("all served", |c| c.status().unwrap().processed == 100);
    host.send(0, true);
    let r = host.replies(1);
    assert_eq!(r[0].1, [fold((0..100).chain([0])), 101]);
}

#[test]
fn a_handler_fault_is_reported_naming_its_message() {
    let Some(dev) = device().map(Arc::new) else {
        return;
    };
    let (_lp, mut host) = start(&dev, &FOLD);
    host.send(1, true);
    host.send(2, true);
    let poison = host.send(0xDEAD, true);
    host.send(4, true);
    let replies = host.replies(2);
    assert_eq!(replies[1].1, [fold([1, 2]), 2]);
    host.wait("faulted", |c| {
        c.acked_state() == Ok(LifecycleState::Faulted)
    });
    let st = host.control.status().unwrap();
    assert_eq!((st.fault, st.fault_detail), (FaultCode::HandlerFault, 7));
    assert_eq!(host.control.committed(), poison - 1);
    assert_eq!(host.control.serving(), poison);
    assert_eq!(host.control.serving_correlation(), poison);
    // The poison and what followed it are still in H2K for the host.
    assert_eq!(host.h2k.observer().len(), 2);
}

#[test]
fn an_ask_its_handler_does_not_answer_gets_no_reply() {
    let Some(dev) = device().map(Arc::new) else {
        return;
    };
    let (_lp, mut host) = start(&dev, &FOLD);
    let seq = host.send(0xD0D0_0000, true);
    let r = host.replies(1);
    assert_eq!(r[0].0.type_id, SYS_NO_REPLY);
    assert!(r[0].0.flags.contains(Flags::REPLY | Flags::ERROR));
    assert_eq!(r[0].0.correlation.to_bits(), seq);
}

#[test]
fn terminate_and_fence_end_the_slot_and_an_unknown_type_faults() {
    let Some(dev) = device().map(Arc::new) else {
        return;
    };
    let (_lp, host) = start(&dev, &FOLD);
    host.request(LifecycleState::Terminated);
    host.wait("terminated", |c| {
        c.acked_state() == Ok(LifecycleState::Terminated)
    });

    let (_lp, mut host) = start(&dev, &FOLD);
    host.send(1, true);
    host.replies(1);
    host.control.fence();
    let t = host.wake.clone();
    host.control.doorbell().ring(|| t.unpark());
    host.wait("left fenced", |c| {
        c.acked_state() == Ok(LifecycleState::Terminated)
    });
    host.send(2, true);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(host.control.committed(), 1, "a fenced slot commits nothing");

    let (_lp, mut host) = start(&dev, &FOLD);
    host.send_type(99, 1, true);
    host.wait("faulted", |c| {
        c.acked_state() == Ok(LifecycleState::Faulted)
    });
    let st = host.control.status().unwrap();
    assert_eq!(
        (st.fault, st.fault_detail),
        (FaultCode::UnknownMessageType, 99)
    );
}

#[test]
fn a_reply_longer_than_a_slot_faults_rather_than_truncates() {
    let Some(dev) = device().map(Arc::new) else {
        return;
    };
    const LONG: WgslKernel = WgslKernel {
        name: "long-reply",
        state_words: 1,
        handler: "fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 { (*reply).len = 68u; return RK_REPLIED; }",
        max_later: 0,
        width: 1,
    };
    let (_lp, mut host) = start(&dev, &LONG);
    host.send(1, true);
    host.wait("faulted", |c| {
        c.acked_state() == Ok(LifecycleState::Faulted)
    });
    let st = host.control.status().unwrap();
    assert_eq!(
        (st.fault, st.fault_detail),
        (FaultCode::HandlerFault, REPLY_TOO_LARGE)
    );
    assert_eq!(host.control.committed(), 0, "nothing of it was published");
}
