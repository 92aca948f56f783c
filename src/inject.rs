//! Fault injection on the cpu backend (feature `fault-injection`, off by
//! default): the device loop asks a [`FaultInjector`] before serving each
//! message whether to fail there, and how.
//!
//! Every injection is a fault the runtime must turn into the framework's
//! failure without losing or duplicating an accepted message; the drills
//! (`ringkernel::drill`) check exactly that under load.

use std::sync::Mutex;
use std::time::Duration;

/// A fault the device loop injects at a message.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// The handler panics before doing anything (fault `HandlerPanic`).
    Panic,
    /// The device loop hangs this long before running the handler; if the
    /// host fenced it meanwhile (watchdog), it exits without running it.
    Hang(Duration),
    /// The device loop exits without being asked (fault `UnexpectedExit`).
    Exit,
    /// The handler runs, but the envelope published to K2H in place of its
    /// reply has a corrupt header (fault `BadEnvelope`, detected by the host).
    CorruptReply,
    /// The handler runs, its reply is published and the message committed,
    /// then the loop faults before releasing the message's H2K slot (fault
    /// `HandlerFault`, detail [`INJECTED_DETAIL`]).
    FaultAfterReply,
}

/// The fault detail of an injected `Panic` or `FaultAfterReply`.
pub const INJECTED_DETAIL: u64 = crate::cpu::INJECTED_DETAIL;

struct State {
    /// Messages seen, over every incarnation that shares the injector.
    seen: u64,
    schedule: Vec<(u64, Injection)>,
    rng: u64,
    one_in: u64,
    kinds: Vec<Injection>,
    injected: u64,
    stopped: bool,
}

/// Decides, per message, whether and how the device loop fails. Share one
/// (`Arc`) between the incarnations of an actor through its
/// [`LaunchOptions`](crate::runtime::LaunchOptions).
pub struct FaultInjector {
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultInjector")
            .field("injected", &self.injected())
            .finish_non_exhaustive()
    }
}

impl FaultInjector {
    /// Injects `what` at the `n`-th message served (counting from 0, over
    /// every incarnation sharing this injector), for each pair.
    pub fn at(schedule: impl IntoIterator<Item = (u64, Injection)>) -> Self {
        let mut schedule: Vec<_> = schedule.into_iter().collect();
        // Popped from the back: latest first.
        schedule.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
        Self::build(schedule, 0, 0, Vec::new())
    }

    /// Injects one of `kinds` (picked at random) at about one message in
    /// `one_in`, from a seeded generator (the same seed, the same points).
    pub fn random(seed: u64, one_in: u64, kinds: &[Injection]) -> Self {
        Self::build(Vec::new(), seed | 1, one_in.max(1), kinds.to_vec())
    }

    fn build(
        schedule: Vec<(u64, Injection)>,
        rng: u64,
        one_in: u64,
        kinds: Vec<Injection>,
    ) -> Self {
        FaultInjector {
            state: Mutex::new(State {
                seen: 0,
                schedule,
                rng,
                one_in,
                kinds,
                injected: 0,
                stopped: false,
            }),
        }
    }

    /// Injects nothing more (a drill's wind-down).
    pub fn stop(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.stopped = true;
        }
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.injected)
    }

    /// The device loop's question, once per message.
    pub(crate) fn next(&self) -> Option<Injection> {
        let mut s = self.state.lock().ok()?;
        if s.stopped {
            return None;
        }
        let n = s.seen;
        s.seen += 1;
        let mut pick = None;
        if s.schedule.last().is_some_and(|&(at, _)| at <= n) {
            pick = s.schedule.pop().map(|(_, w)| w);
        } else if !s.kinds.is_empty() {
            // xorshift64*: enough for spreading faults, seeded for replay.
            s.rng ^= s.rng >> 12;
            s.rng ^= s.rng << 25;
            s.rng ^= s.rng >> 27;
            let r = s.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
            if r % s.one_in == 0 {
                pick = Some(s.kinds[((r >> 32) % s.kinds.len() as u64) as usize]);
            }
        }
        if pick.is_some() {
            s.injected += 1;
        }
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_fires_at_its_messages_and_random_is_seeded() {
        let f = FaultInjector::at([(2, Injection::Exit), (0, Injection::Panic)]);
        let got: Vec<_> = (0..4).map(|_| f.next()).collect();
        assert_eq!(
            got,
            [Some(Injection::Panic), None, Some(Injection::Exit), None]
        );
        assert_eq!(f.injected(), 2);

        let kinds = [Injection::Panic, Injection::Exit];
        let a = FaultInjector::random(7, 10, &kinds);
        let b = FaultInjector::random(7, 10, &kinds);
        let xs: Vec<_> = (0..1000).map(|_| a.next()).collect();
        let ys: Vec<_> = (0..1000).map(|_| b.next()).collect();
        assert_eq!(xs, ys);
        let hits = xs.iter().filter(|x| x.is_some()).count();
        assert!((50..200).contains(&hits), "about one in ten: {hits}");
    }
}
