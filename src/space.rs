//! Waking a sender that waits for room in an H2K ring (or for a free
//! waiter): the sender registers its waker and re-checks; the side that
//! frees room (the device loop after releasing H2K slots, the poller after
//! completing waiters) calls [`SpaceWaker::wake_if_wanted`].
//!
//! Like the doorbell this is a store→load handshake, so both sides issue a
//! SeqCst fence between their store and their load; the loom test below
//! checks that a wake-up is never lost.

use crate::sync::{AtomicBool, Mutex, Ordering, fence};
use std::task::Waker;

/// The waker of the one sender of a slot, and whether it wants waking.
#[derive(Default)]
pub(crate) struct SpaceWaker {
    wanted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl SpaceWaker {
    /// Sender: registers `waker`. The caller must re-check for space after
    /// this returns and before it reports `Pending`.
    pub(crate) fn register(&self, waker: &Waker) {
        if let Ok(mut w) = self.waker.lock() {
            match &mut *w {
                Some(old) if old.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }
        self.wanted.store(true, Ordering::Relaxed);
        // Orders the store of `wanted` before the sender's re-check of the
        // ring; pairs with the fence in `wake_if_wanted`, which orders the
        // release of H2K slots (or of a waiter) before the load of
        // `wanted`. Either the waker sees `wanted`, or the re-check sees the
        // room.
        fence(Ordering::SeqCst);
    }

    /// Freeing side, after it made room: wakes the sender if it waits.
    pub(crate) fn wake_if_wanted(&self) {
        fence(Ordering::SeqCst);
        if self.wanted.load(Ordering::Relaxed) && self.wanted.swap(false, Ordering::AcqRel) {
            let waker = self.waker.lock().ok().and_then(|mut w| w.take());
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

#[cfg(all(test, ringkernel_loom))]
mod loom_tests {
    use super::*;
    use crate::sync::AtomicU64;
    use loom::sync::Arc;
    use loom::thread;
    use std::task::Wake;

    struct Flag(loom::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, Ordering::Release);
        }
    }

    /// A full ring (room = 0): the sender registers and re-checks while the
    /// consumer frees a slot and wakes. Either the sender's re-check sees
    /// the room or its waker is woken — never neither.
    #[test]
    fn a_waiting_sender_is_never_forgotten() {
        loom::model(|| {
            let space = Arc::new(SpaceWaker::default());
            let room = Arc::new(AtomicU64::new(0));
            let flag = std::sync::Arc::new(Flag(loom::sync::atomic::AtomicBool::new(false)));
            let waker = Waker::from(flag.clone());
            let consumer = {
                let (space, room) = (space.clone(), room.clone());
                thread::spawn(move || {
                    room.store(1, Ordering::Release);
                    space.wake_if_wanted();
                })
            };
            let ready_now = room.load(Ordering::Acquire) > 0;
            let ready_after_register = ready_now || {
                space.register(&waker);
                room.load(Ordering::Acquire) > 0
            };
            consumer.join().unwrap();
            assert!(
                ready_after_register || flag.0.load(Ordering::Acquire),
                "the sender's wake-up was lost"
            );
        });
    }
}
