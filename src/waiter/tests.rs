use super::*;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

#[test]
fn capacity_is_bounded() {
    assert!(matches!(
        WaiterSlab::<u8>::new(0, 0),
        Err(LayoutError::SlabCapacity { capacity: 0, .. })
    ));
    if !cfg!(miri) {
        // 65 536 entries: too slow to build under Miri.
        assert!(WaiterSlab::<u8>::new(1 << 16, 0).is_ok());
    }
    assert!(matches!(
        WaiterSlab::<u8>::new((1 << 16) + 1, 0),
        Err(LayoutError::SlabCapacity { .. })
    ));
}

#[test]
fn full_slab_hands_the_waiter_back() {
    let slab = WaiterSlab::new(2, 0).unwrap();
    let a = slab.insert(String::from("a")).unwrap();
    let _b = slab.insert(String::from("b")).unwrap();
    assert_eq!(slab.insert(String::from("c")).unwrap_err().0, "c");
    assert_eq!(slab.take(a).unwrap(), "a");
    assert!(slab.insert(String::from("d")).is_ok());
}

#[test]
fn reused_entries_get_a_new_generation_and_late_ids_are_counted() {
    let slab = WaiterSlab::new(1, 7).unwrap();
    let first = slab.insert(1u32).unwrap();
    assert_eq!(first.incarnation(), 7);
    assert_eq!(first.generation(), 1);
    assert_eq!(slab.take(first), Ok(1));
    let second = slab.insert(2u32).unwrap();
    assert_eq!((second.index(), second.generation()), (first.index(), 2));
    // The old id must not resolve the new waiter.
    assert_eq!(slab.take(first), Err(TakeError::Late(first)));
    assert_eq!(slab.take(second), Ok(2));
    assert_eq!(slab.take(second), Err(TakeError::Late(second)));
    let foreign = CorrelationId::new(8, second.generation(), 0);
    assert_eq!(slab.take(foreign), Err(TakeError::Foreign(foreign)));
    let invalid = CorrelationId::new(7, 1, 5);
    assert_eq!(slab.take(invalid), Err(TakeError::Invalid(invalid)));
    assert_eq!(
        slab.take(CorrelationId::NONE),
        Err(TakeError::Foreign(CorrelationId::NONE))
    );
    assert_eq!(
        slab.stats(),
        SlabStats {
            late: 2,
            foreign: 2,
            invalid: 1
        }
    );
}

#[test]
fn sweep_takes_every_live_waiter_once() {
    let slab = WaiterSlab::new(8, 0).unwrap();
    let ids: Vec<_> = (0..5).map(|i| slab.insert(i).unwrap()).collect();
    assert_eq!(slab.take(ids[2]), Ok(2));
    let mut swept = Vec::new();
    assert_eq!(slab.sweep(|id, w| swept.push((id, w))), 4);
    swept.sort_by_key(|&(_, w)| w);
    assert_eq!(
        swept.iter().map(|&(_, w)| w).collect::<Vec<_>>(),
        [0, 1, 3, 4]
    );
    for (id, _) in swept {
        assert_eq!(slab.take(id), Err(TakeError::Late(id)));
    }
    assert_eq!(slab.sweep(|_, _| unreachable!()), 0);
}

/// Values left in the slab are dropped with it, exactly once.
#[test]
fn drop_releases_live_waiters() {
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let slab = WaiterSlab::new(4, 0).unwrap();
    let a = slab.insert(Counted(drops.clone())).unwrap();
    let _b = slab.insert(Counted(drops.clone())).unwrap();
    drop(slab.take(a).unwrap());
    assert_eq!(drops.load(Ordering::Relaxed), 1);
    drop(slab);
    assert_eq!(drops.load(Ordering::Relaxed), 2);
}

/// A replier and a sweeper race for the same waiters on two threads while a
/// third thread inserts: every waiter is resolved exactly once.
#[test]
fn reply_racing_a_sweep_resolves_each_waiter_once() {
    let rounds = if cfg!(miri) { 20 } else { 2_000 };
    for _ in 0..rounds / 100 {
        let slab = Arc::new(WaiterSlab::new(64, 0).unwrap());
        let ids: Vec<_> = (0..64u32).map(|i| slab.insert(i).unwrap()).collect();
        let replier = {
            let (slab, ids) = (slab.clone(), ids.clone());
            std::thread::spawn(move || {
                ids.iter()
                    .filter_map(|&id| slab.take(id).ok())
                    .collect::<Vec<_>>()
            })
        };
        let mut swept = Vec::new();
        slab.sweep(|_, w| swept.push(w));
        let mut all = replier.join().unwrap();
        all.extend(swept);
        all.sort_unstable();
        assert_eq!(all, (0..64).collect::<Vec<_>>());
    }
}

/// Inserts and takes from several threads: ids stay unique among live
/// waiters and every value comes back to its own id.
#[test]
fn concurrent_insert_and_take_keep_ids_and_values_paired() {
    let per_thread = if cfg!(miri) { 30 } else { 20_000 };
    let slab = Arc::new(WaiterSlab::new(16, 3).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let slab = slab.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let v = t << 32 | i;
                    let id = loop {
                        match slab.insert(v) {
                            Ok(id) => break id,
                            Err(SlabFull(_)) => std::thread::yield_now(),
                        }
                    };
                    assert_eq!(slab.take(id), Ok(v));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(slab.stats(), SlabStats::default());
}
