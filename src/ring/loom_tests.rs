use super::*;
use loom::thread;

fn push_spin(tx: &mut Producer, v: u8) {
    while tx.try_push(&[v]).is_err() {
        thread::yield_now();
    }
}

/// Three messages through a two-slot ring: the third reuses slot 0, so loom
/// checks that the producer's write of it happens after the consumer's read
/// (head release/acquire) and that each read sees its write (tail
/// release/acquire).
#[test]
fn spsc_in_order_across_wraparound() {
    loom::model(|| {
        let (mut tx, mut rx) = Ring::new(RingLayout::new(2, 64).unwrap());
        let producer = thread::spawn(move || {
            for v in 0..3u8 {
                push_spin(&mut tx, v);
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            match rx.try_pop_with(|s| s[0]) {
                Some(v) => got.push(v),
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, [0, 1, 2]);
    });
}

/// A batch of two published with one store, read as a batch released with
/// one store, then a third push that needs the released slots.
#[test]
fn batches_publish_and_release_atomically() {
    loom::model(|| {
        let (mut tx, mut rx) = Ring::new(RingLayout::new(2, 64).unwrap());
        let producer = thread::spawn(move || {
            {
                let mut batch = tx.batch();
                batch.try_push(&[10]).unwrap();
                batch.try_push(&[11]).unwrap();
            }
            push_spin(&mut tx, 12);
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            let mut batch = rx.batch();
            while let Some(v) = batch.try_pop_with(|s| s[0]) {
                got.push(v);
            }
            let empty = batch.is_empty();
            drop(batch);
            if empty {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert_eq!(got, [10, 11, 12]);
    });
}

/// The producer re-reads what it published (after a fault, to hand back
/// what was not processed) while the consumer reads and releases: the scan
/// sees a suffix of what was published, intact, and the producer may then
/// reuse the released slot.
#[test]
fn producer_scan_alongside_consumer_release() {
    use crate::envelope::{EnvelopeHeader, Flags, HeaderCheck};
    loom::model(|| {
        let layout = RingLayout::new(2, 128).unwrap();
        let (mut tx, mut rx) = Ring::new(layout);
        for seq in 1..=2u64 {
            tx.try_send(&EnvelopeHeader::new(1, Flags::empty()).with_seq(seq), seq)
                .unwrap();
        }
        let consumer = thread::spawn(move || {
            let check = HeaderCheck::any_type(64);
            let got = rx.try_recv_with(&check, |e| e.header.seq);
            assert_eq!(got, Some(Ok(1)));
            rx
        });
        let check = HeaderCheck::any_type(64);
        let mut seen = Vec::new();
        tx.unconsumed_with(&check, |e| seen.push(e.expect("intact").header.seq));
        assert!(seen == [1, 2] || seen == [2], "{seen:?}");
        let mut rx = consumer.join().unwrap();
        tx.try_send(&EnvelopeHeader::new(1, Flags::empty()).with_seq(3), 3u64)
            .unwrap();
        let check = HeaderCheck::any_type(64);
        assert_eq!(rx.try_recv_with(&check, |e| e.header.seq), Some(Ok(2)));
        assert_eq!(rx.try_recv_with(&check, |e| e.header.seq), Some(Ok(3)));
    });
}
