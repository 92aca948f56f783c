use super::*;
use crate::envelope::Flags;
use crate::id::ActorId;
use crate::region::{HeapRegion, SharedMemory};
use proptest::prelude::*;
use std::sync::Arc;

fn layout(capacity: u32, slot: u32) -> RingLayout {
    RingLayout::new(capacity, slot).unwrap()
}

#[test]
fn layouts_are_validated() {
    assert_eq!(
        RingLayout::new(12, 128),
        Err(LayoutError::CapacityNotPowerOfTwo { capacity: 12 })
    );
    assert_eq!(
        RingLayout::new(0, 128),
        Err(LayoutError::CapacityNotPowerOfTwo { capacity: 0 })
    );
    assert!(matches!(
        RingLayout::new(1, 128),
        Err(LayoutError::CapacityOutOfRange { capacity: 1, .. })
    ));
    assert!(matches!(
        RingLayout::new(1 << 25, 128),
        Err(LayoutError::CapacityOutOfRange { .. })
    ));
    assert!(matches!(
        RingLayout::new(8, 100),
        Err(LayoutError::BadSlotSize { slot_size: 100, .. })
    ));
    assert!(matches!(
        RingLayout::new(8, 0),
        Err(LayoutError::BadSlotSize { .. })
    ));
    assert!(matches!(
        RingLayout::new(8, 128 * 1024),
        Err(LayoutError::BadSlotSize { .. })
    ));
    let l = layout(8, 128);
    assert_eq!(
        (
            l.capacity(),
            l.slot_size(),
            l.max_payload(),
            l.region_bytes()
        ),
        (8, 128, 64, 384 + 1024)
    );
}

/// `half_full` counts what the consumer has not released, even when the
/// producer's cached head is stale.
#[test]
fn half_full_follows_the_consumer() {
    let (mut tx, mut rx) = Ring::new(layout(8, 64));
    for i in 0..3u8 {
        tx.try_push(&[i]).unwrap();
        assert!(!tx.half_full(), "{} of 8", i + 1);
    }
    tx.try_push(&[3]).unwrap();
    assert!(tx.half_full(), "4 of 8");
    assert!(rx.try_pop_with(|_| ()).is_some());
    assert!(!tx.half_full(), "3 of 8 after a release");
    tx.try_push(&[4]).unwrap();
    assert!(tx.half_full(), "4 of 8 again");
    while rx.try_pop_with(|_| ()).is_some() {}
    // The cached head is 1 (refreshed above); the consumer released all.
    for i in 0..3u8 {
        tx.try_push(&[i]).unwrap();
    }
    assert!(
        !tx.half_full(),
        "3 unreleased, although 8 were pushed since the cached head"
    );
}

#[test]
fn push_pop_fill_and_wrap() {
    let (mut tx, mut rx) = Ring::new(layout(4, 64));
    assert_eq!(rx.try_pop_with(|_| ()), None);
    for round in 0u8..5 {
        for i in 0..4 {
            tx.try_push(&[round, i]).unwrap();
        }
        assert_eq!(tx.try_push(&[9]), Err(PushError::Full));
        assert_eq!(tx.free_slots(), 0);
        assert_eq!(rx.len(), 4);
        for i in 0..4 {
            assert_eq!(rx.try_pop_with(|s| [s[0], s[1]]), Some([round, i]));
        }
        assert!(rx.is_empty());
    }
    assert_eq!(
        tx.try_push(&[0; 65]),
        Err(PushError::TooLarge { len: 65, max: 64 })
    );
    let obs = tx.observer();
    assert_eq!((obs.published(), obs.released(), obs.len()), (20, 20, 0));
}

#[test]
fn batches_publish_and_release_with_one_store() {
    let (mut tx, mut rx) = Ring::new(layout(8, 64));
    let obs = rx.observer();
    {
        let mut batch = tx.batch();
        for i in 0..5u8 {
            batch.try_push(&[i]).unwrap();
        }
        assert_eq!(batch.len(), 5);
        // Nothing is visible until the batch publishes.
        assert_eq!(obs.published(), 0);
        assert_eq!(rx.try_pop_with(|_| ()), None);
        assert_eq!(batch.publish(), 5);
    }
    assert_eq!(obs.published(), 5);
    {
        let mut batch = tx.batch();
        for i in 5..8u8 {
            batch.try_push(&[i]).unwrap();
        }
        assert_eq!(batch.try_push(&[8]), Err(PushError::Full));
        // Dropped: publishes what it staged.
    }
    assert_eq!(obs.len(), 8);
    let mut read = rx.batch();
    let mut got = Vec::new();
    while let Some(v) = read.try_pop_with(|s| s[0]) {
        got.push(v);
    }
    assert_eq!(obs.released(), 0);
    assert_eq!(read.release(), 8);
    assert_eq!(obs.released(), 8);
    assert_eq!(got, (0..8).collect::<Vec<_>>());
}

#[test]
fn envelopes_round_trip_and_bad_ones_do_not_jam_the_ring() {
    let l = layout(4, 128);
    let (mut tx, mut rx) = Ring::new(l);
    let h = EnvelopeHeader::new(5, Flags::ASK)
        .with_dst(ActorId::gpu(0, 1))
        .with_seq(1);
    let written = tx.try_send(&h, [7u64; 8]).unwrap();
    assert_eq!(written.payload_len, 64);
    // A payload larger than the slot's inline room is handed back.
    match tx.try_send(&h, [0u8; 65]) {
        Err(SendError::TooLarge {
            value,
            len: 65,
            max: 64,
        }) => assert_eq!(value, [0u8; 65]),
        other => panic!("{other:?}"),
    }
    // A raw record that is no envelope.
    tx.try_push(&[0xAB; 64]).unwrap();
    tx.try_send(&h.with_seq(2), 3u32).unwrap();
    let check = HeaderCheck::only(l.max_payload(), &[5]);
    assert_eq!(
        rx.try_recv_with(&check, |e| e.payload_as::<[u64; 8]>()),
        Some(Ok(Ok([7; 8])))
    );
    assert!(matches!(
        rx.try_recv_with(&check, |_| ()),
        Some(Err(DecodeError::BadMagic { .. }))
    ));
    assert_eq!(
        rx.try_recv_with(&check, |e| (e.header.seq, e.payload_as::<u32>())),
        Some(Ok((2, Ok(3))))
    );
    assert!(rx.try_recv_with(&check, |_| ()).is_none());
    // Full hands the message back.
    for _ in 0..4 {
        tx.try_send(&h, 1u8).unwrap();
    }
    assert!(matches!(tx.try_send(&h, 9u8), Err(SendError::Full(9))));
    assert_eq!(SendError::Full(9u8).into_inner(), 9);
}

/// After a fault the producer re-reads what the consumer has not
/// released; a partial release leaves exactly the unreleased envelopes.
#[test]
fn producer_sees_the_unreleased_envelopes_and_partial_release_keeps_them() {
    let l = layout(4, 128);
    let (mut tx, mut rx) = Ring::new(l);
    let check = HeaderCheck::any_type(l.max_payload());
    for seq in 1..=4u64 {
        tx.try_send(&EnvelopeHeader::new(5, Flags::empty()).with_seq(seq), seq)
            .unwrap();
    }
    let seen = |tx: &mut Producer| {
        let mut v = Vec::new();
        tx.unconsumed_with(&check, |e| v.push(e.map(|e| e.header.seq)));
        v
    };
    assert_eq!(seen(&mut tx), [Ok(1), Ok(2), Ok(3), Ok(4)]);
    {
        // Three read, the first only released: 2..=4 stay published.
        let mut batch = rx.batch();
        for _ in 0..3 {
            batch.try_recv_with(&check, |_| ()).unwrap().unwrap();
        }
        assert_eq!(batch.release_first(1), 1);
    }
    assert_eq!(seen(&mut tx), [Ok(2), Ok(3), Ok(4)]);
    // They are read again, in order.
    assert_eq!(rx.try_recv_with(&check, |e| e.header.seq), Some(Ok(2)));
    assert_eq!(seen(&mut tx), [Ok(3), Ok(4)]);
    // Released slots are written again; the scan follows the counters.
    tx.try_send(&EnvelopeHeader::new(5, Flags::empty()).with_seq(5), 5u64)
        .unwrap();
    assert_eq!(seen(&mut tx), [Ok(3), Ok(4), Ok(5)]);
    {
        let batch = rx.batch();
        assert_eq!(batch.release_first(9), 0, "nothing taken, nothing released");
    }
    assert_eq!(seen(&mut tx), [Ok(3), Ok(4), Ok(5)]);
}

#[test]
fn raw_byte_payloads_round_trip_and_are_bounded() {
    let l = layout(2, 128);
    let (mut tx, mut rx) = Ring::new(l);
    let h = EnvelopeHeader::new(9, Flags::empty());
    let written = tx.try_send_bytes(&h, &[1, 2, 3]).unwrap();
    assert_eq!(written.payload_len, 3);
    assert_eq!(
        tx.try_send_bytes(&h, &[0; 65]),
        Err(PushError::TooLarge { len: 65, max: 64 })
    );
    tx.try_send_bytes(&h, &[]).unwrap();
    assert_eq!(tx.try_send_bytes(&h, &[7]), Err(PushError::Full));
    let check = HeaderCheck::any_type(64);
    assert_eq!(
        rx.try_recv_with(&check, |e| e.payload.to_vec()),
        Some(Ok(vec![1, 2, 3]))
    );
    assert_eq!(rx.try_recv_with(&check, |e| e.payload.len()), Some(Ok(0)));
}

#[test]
fn init_in_checks_bounds_and_alignment() {
    let l = layout(4, 128);
    let mem: Arc<dyn SharedMemory> = Arc::new(HeapRegion::zeroed(l.region_bytes() + 128));
    // SAFETY: the region is this test's; halves of one span never coexist.
    let err = unsafe { Ring::init_in(mem.clone(), 256, l) }.unwrap_err();
    assert_eq!(
        err,
        LayoutError::RegionTooSmall {
            len: l.region_bytes() - 128,
            needed: l.region_bytes()
        }
    );
    // SAFETY: the region is this test's; halves of one span never coexist.
    let err = unsafe { Ring::init_in(mem.clone(), 64, l) }.unwrap_err();
    assert!(matches!(err, LayoutError::Misaligned { align: 128, .. }));
    // SAFETY: the region is this test's; halves of one span never coexist.
    let err = unsafe { Ring::init_in(mem.clone(), usize::MAX, l) }.unwrap_err();
    assert!(matches!(err, LayoutError::RegionTooSmall { len: 0, .. }));
    // SAFETY: the region is this test's; halves of one span never coexist.
    let (tx, rx) = unsafe { Ring::init_in(mem.clone(), 128, l) }.unwrap();
    drop((tx, rx));
}

#[test]
fn attach_validates_the_header_and_resumes_the_counters() {
    let l = layout(8, 64);
    let mem: Arc<dyn SharedMemory> = Arc::new(HeapRegion::zeroed(l.region_bytes()));
    // SAFETY: the region is owned by this test; halves are dropped before a
    // half of the same role is attached again.
    unsafe {
        assert_eq!(
            Ring::attach_consumer(mem.clone(), 0).unwrap_err(),
            LayoutError::BadRingMagic {
                found: 0,
                expected: RING_MAGIC
            }
        );
        let (mut tx, rx) = Ring::init_in(mem.clone(), 0, l).unwrap();
        drop(rx);
        for i in 0..3u8 {
            tx.try_push(&[i]).unwrap();
        }
        drop(tx);
        // Another party (a device, in real use) attaches to the same bytes.
        let mut rx = Ring::attach_consumer(mem.clone(), 0).unwrap();
        assert_eq!(rx.len(), 3);
        assert_eq!(rx.try_pop_with(|s| s[0]), Some(0));
        let mut tx = Ring::attach_producer(mem.clone(), 0).unwrap();
        assert_eq!(tx.free_slots(), 6);
        tx.try_push(&[3]).unwrap();
        let got: Vec<u8> = std::iter::from_fn(|| rx.try_pop_with(|s| s[0])).collect();
        assert_eq!(got, [1, 2, 3]);
        // Corrupt the version word: attaching is a typed error.
        mem.base().add(260).cast::<u32>().write(99);
        assert_eq!(
            Ring::attach_producer(mem.clone(), 0).unwrap_err(),
            LayoutError::BadRingVersion {
                found: 99,
                expected: RING_VERSION
            }
        );
        mem.base().add(260).cast::<u32>().write(RING_VERSION);
        // A capacity that is not a power of two is refused.
        mem.base().add(264).cast::<u32>().write(6);
        assert_eq!(
            Ring::attach_producer(mem.clone(), 0).unwrap_err(),
            LayoutError::CapacityNotPowerOfTwo { capacity: 6 }
        );
        // A header claiming more slots than the region holds is refused.
        mem.base().add(264).cast::<u32>().write(1 << 20);
        assert!(matches!(
            Ring::attach_producer(mem.clone(), 0),
            Err(LayoutError::RegionTooSmall { .. })
        ));
    }
}

/// Two threads, every message in order, across many wrap-arounds.
#[test]
fn two_threads_in_order() {
    let n: u64 = if cfg!(miri) { 500 } else { 200_000 };
    let (mut tx, mut rx) = Ring::new(layout(16, 64));
    let producer = std::thread::spawn(move || {
        let mut i = 0u64;
        while i < n {
            let mut batch = tx.batch();
            while i < n && batch.try_push(&i.to_le_bytes()).is_ok() {
                i += 1;
            }
            drop(batch);
            std::hint::spin_loop();
            if cfg!(miri) {
                std::thread::yield_now();
            }
        }
    });
    let mut expected = 0u64;
    while expected < n {
        match rx.try_pop_with(|s| u64::from_le_bytes(s[..8].try_into().unwrap())) {
            Some(v) => {
                assert_eq!(v, expected);
                expected += 1;
            }
            None => {
                std::hint::spin_loop();
                if cfg!(miri) {
                    std::thread::yield_now();
                }
            }
        }
    }
    producer.join().unwrap();
}

/// Property tests against models (not under Miri: too slow there).
#[cfg(not(miri))]
mod model {
    use super::*;
    use std::collections::VecDeque;

    #[derive(Clone, Debug)]
    enum Op {
        Push(u8),
        Pop,
        PushBatch(Vec<u8>),
        PopBatch(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<u8>().prop_map(Op::Push),
            Just(Op::Pop),
            proptest::collection::vec(any::<u8>(), 0..10).prop_map(Op::PushBatch),
            (0usize..10).prop_map(Op::PopBatch),
        ]
    }

    proptest! {
        /// The ring behaves as a bounded `VecDeque`, through wrap-around, full
        /// and empty, single and batched operations.
        #[test]
        fn ring_matches_a_vecdeque_model(cap_log in 1u32..4, ops in proptest::collection::vec(op(), 1..300)) {
            let cap = 1usize << cap_log;
            let (mut tx, mut rx) = Ring::new(layout(cap as u32, 64));
            let mut model: VecDeque<u8> = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push(v) => {
                        let r = tx.try_push(&[v]);
                        if model.len() < cap {
                            prop_assert_eq!(r, Ok(()));
                            model.push_back(v);
                        } else {
                            prop_assert_eq!(r, Err(PushError::Full));
                        }
                    }
                    Op::Pop => prop_assert_eq!(rx.try_pop_with(|s| s[0]), model.pop_front()),
                    Op::PushBatch(vs) => {
                        let mut batch = tx.batch();
                        for v in vs {
                            if batch.try_push(&[v]).is_ok() {
                                model.push_back(v);
                            } else {
                                prop_assert_eq!(model.len(), cap);
                            }
                        }
                    }
                    Op::PopBatch(k) => {
                        let mut batch = rx.batch();
                        for _ in 0..k {
                            prop_assert_eq!(batch.try_pop_with(|s| s[0]), model.pop_front());
                        }
                    }
                }
                prop_assert_eq!(rx.len(), model.len());
                prop_assert_eq!(tx.free_slots(), cap - model.len());
            }
        }
    }
}
