use super::*;
use loom::sync::Arc;
use loom::thread;

/// A reply and a fault sweep race for one waiter: exactly one gets it, and
/// loom checks the value's cell is never accessed concurrently.
#[test]
fn reply_and_sweep_resolve_a_waiter_once() {
    loom::model(|| {
        let slab = Arc::new(WaiterSlab::new(2, 0).unwrap());
        let id = slab.insert(String::from("waiter")).unwrap();
        let replier = {
            let slab = slab.clone();
            thread::spawn(move || slab.take(id).ok())
        };
        let mut swept = Vec::new();
        slab.sweep(|_, w| swept.push(w));
        let replied = replier.join().unwrap();
        assert_eq!(replied.is_some() as usize + swept.len(), 1);
    });
}

/// An entry freed by a take on one thread is reused by an insert on
/// another: the new value's write must happen after the old value's read,
/// and the stale id must not resolve the new waiter.
#[test]
fn freed_entries_are_reused_safely_across_threads() {
    loom::model(|| {
        let slab = Arc::new(WaiterSlab::new(1, 0).unwrap());
        let first = slab.insert(1u64).unwrap();
        let taker = {
            let slab = slab.clone();
            thread::spawn(move || slab.take(first))
        };
        let second = loop {
            match slab.insert(2u64) {
                Ok(id) => break id,
                Err(_) => thread::yield_now(),
            }
        };
        assert_eq!(taker.join().unwrap(), Ok(1));
        assert_ne!(first, second);
        assert_eq!(slab.take(first), Err(TakeError::Late(first)));
        assert_eq!(slab.take(second), Ok(2));
    });
}

/// Two threads insert and take concurrently through the free stack.
#[test]
fn concurrent_inserts_get_distinct_entries() {
    loom::model(|| {
        let slab = Arc::new(WaiterSlab::new(2, 0).unwrap());
        let other = {
            let slab = slab.clone();
            thread::spawn(move || {
                let id = slab.insert(10u32).unwrap();
                slab.take(id)
            })
        };
        let id = slab.insert(20u32).unwrap();
        assert_eq!(slab.take(id), Ok(20));
        assert_eq!(other.join().unwrap(), Ok(10));
    });
}
