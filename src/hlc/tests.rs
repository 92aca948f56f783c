use super::*;
use proptest::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;

const DOMAIN: ClockDomain = ClockDomain::host(1);

#[test]
fn tick_follows_physical_time() {
    let clock = Arc::new(ManualClock::new(1 << 20));
    let hlc = Hlc::with_clock(DOMAIN, clock.clone());
    let a = hlc.tick();
    assert_eq!(a.hlc, 1 << 20);
    assert_eq!(a.domain, DOMAIN);
    clock.advance(Duration::from_nanos(1024));
    assert_eq!(hlc.tick().hlc, (1 << 20) + 1024);
    // Physical bits below 16 ns are dropped: the counter owns them.
    clock.set((1 << 20) + 2048 + 7);
    let b = hlc.tick();
    assert_eq!((b.physical_ns(), b.logical()), ((1 << 20) + 2048, 0));
}

#[test]
fn counter_carries_into_the_physical_bits_when_the_clock_is_frozen() {
    let hlc = Hlc::with_clock(DOMAIN, ManualClock::new(1600));
    let stamps: Vec<u64> = (0..40).map(|_| hlc.tick().hlc).collect();
    for (i, s) in stamps.iter().enumerate() {
        assert_eq!(*s, 1600 + i as u64);
    }
    // After 16 ticks the counter has carried: physical part 1616.
    assert_eq!(
        Timestamp {
            hlc: stamps[16],
            domain: DOMAIN
        }
        .physical_ns(),
        1616
    );
    assert_eq!(
        Timestamp {
            hlc: stamps[17],
            domain: DOMAIN
        }
        .logical(),
        1
    );
}

#[test]
fn clock_pushed_ahead_jumps_forward_and_backwards_never_goes_back() {
    let clock = Arc::new(ManualClock::new(10_000));
    let hlc = Hlc::with_clock(DOMAIN, clock.clone());
    let a = hlc.tick();
    clock.set(50_000);
    let b = hlc.tick();
    assert_eq!(b.hlc, 50_000);
    clock.set(20_000); // NTP stepped back
    let c = hlc.tick();
    assert!(c > b && a < b);
}

#[test]
fn horizon_saturates_instead_of_wrapping() {
    let hlc = Hlc::with_clock(DOMAIN, ManualClock::new(0));
    let m = hlc.receive(u64::MAX);
    assert_eq!(m.hlc, u64::MAX);
    assert_eq!(hlc.tick().hlc, u64::MAX);
}

#[test]
fn network_drift_is_rejected_and_leaves_the_clock_alone() {
    let hlc = Hlc::with_clock(DOMAIN, ManualClock::new(1_000_000_000))
        .with_max_drift(Duration::from_millis(1));
    let before = hlc.tick();
    let far = Timestamp {
        hlc: 1_000_000_000 + 2_000_000,
        domain: ClockDomain::host(2),
    };
    assert_eq!(
        hlc.receive_network(far),
        Err(HlcError::DriftExceeded {
            stamp: far.hlc,
            ahead_ns: 2_000_000,
            max_drift_ns: 1_000_000
        })
    );
    assert_eq!(hlc.peek(), before.hlc);
    let near = Timestamp {
        hlc: 1_000_000_000 + 500_000,
        domain: ClockDomain::host(2),
    };
    assert!(hlc.receive_network(near).unwrap().hlc > near.hlc);
    // A trusted (device) stamp is never rejected, however far ahead.
    assert!(hlc.receive(far.hlc).hlc > far.hlc);
}

#[test]
fn timestamps_order_by_word_then_domain() {
    let a = Timestamp {
        hlc: 5,
        domain: ClockDomain::host(9),
    };
    let b = Timestamp {
        hlc: 6,
        domain: ClockDomain::host(1),
    };
    let c = Timestamp {
        hlc: 6,
        domain: ClockDomain::unit(1, 1),
    };
    assert!(a < b && b < c);
}

fn unique_across_threads<C: PhysicalClock + 'static>(clock: C) {
    let per_thread = if cfg!(miri) { 50 } else { 20_000 };
    let hlc = Arc::new(Hlc::with_clock(DOMAIN, clock));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let hlc = hlc.clone();
            std::thread::spawn(move || {
                let mut prev = 0;
                let mut out = Vec::with_capacity(per_thread);
                for _ in 0..per_thread {
                    let s = hlc.tick().hlc;
                    assert!(s > prev, "per-thread monotonic");
                    prev = s;
                    out.push(s);
                }
                out
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for s in h.join().unwrap() {
            assert!(all.insert(s), "duplicate stamp {s:#x}");
        }
    }
    assert_eq!(all.len(), 4 * per_thread);
}

#[test]
fn stamps_are_unique_across_threads_with_the_clock_frozen() {
    unique_across_threads(ManualClock::new(1 << 40));
}

#[test]
fn stamps_are_unique_across_threads_with_the_default_clock() {
    unique_across_threads(TscClock::new());
}

#[test]
fn tsc_clock_reads_wall_time() {
    let tsc = TscClock::with_reanchor_period(Duration::from_millis(1));
    for _ in 0..3 {
        let sys = SystemClock.now_ns() as i128;
        let ours = tsc.now_ns() as i128;
        // Within 50 ms of the system's wall clock: it is wall time, not uptime.
        assert!(
            (ours - sys).abs() < 50_000_000,
            "tsc {ours} vs system {sys}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Property tests against models (not under Miri: too slow there).
#[cfg(not(miri))]
mod model {
    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Tick,
        Receive(u64),
        SetClock(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Tick),
            (0u64..1 << 50).prop_map(Op::Receive),
            (0u64..1 << 50).prop_map(Op::SetClock),
        ]
    }

    proptest! {
        /// Whatever the physical clock does and whatever arrives, the word is
        /// strictly monotonic; a receive lands strictly after the message; a
        /// tick is never behind physical time.
        #[test]
        fn monotonic_and_receive_after_message(ops in proptest::collection::vec(op(), 1..200)) {
            let clock = Arc::new(ManualClock::new(0));
            let hlc = Hlc::with_clock(DOMAIN, clock.clone());
            let mut last = 0u64;
            for op in ops {
                match op {
                    Op::SetClock(t) => clock.set(t),
                    Op::Tick => {
                        let s = hlc.tick().hlc;
                        prop_assert!(s > last);
                        prop_assert!(s >= clock.now_ns() & !LOGICAL_MASK);
                        last = s;
                    }
                    Op::Receive(m) => {
                        let s = hlc.receive(m).hlc;
                        prop_assert!(s > m);
                        prop_assert!(s > last);
                        last = s;
                    }
                }
            }
        }

        /// Stamps stay unique with the clock frozen at any value, with the
        /// counter carrying as often as it must.
        #[test]
        fn unique_with_frozen_clock(pt in 0u64..1 << 60, n in 1usize..100) {
            let hlc = Hlc::with_clock(DOMAIN, ManualClock::new(pt));
            let mut seen = HashSet::new();
            for _ in 0..n {
                prop_assert!(seen.insert(hlc.tick().hlc));
            }
        }
    }
}
