//! The hybrid logical clock: one `u64` word per clock domain.
//!
//! The word is nanoseconds since the Unix epoch whose **low 4 bits are a
//! logical counter**: `word = (physical_ns & !0xF) | counter`. Resolution is
//! therefore 16 ns, and the horizon is 2⁶⁴ ns after 1970 — the year 2554.
//!
//! * **tick** (a send): `w = max(w + 1, pt & !0xF)`
//! * **receive** (a merge at a domain boundary): `w = max(w + 1, m + 1, pt & !0xF)`
//!
//! Each is one compare-and-swap on the word (a CAS loop that succeeds first
//! time unless another thread ticked in between). More than 16 events within
//! one 16 ns granule carry the counter into the physical bits: the word runs
//! slightly ahead of physical time and physical time catches up — stamps
//! stay unique and monotonic.
//!
//! Total order is `(word, clock domain)` ([`Timestamp`]'s `Ord`). Drift
//! rejection — refusing a stamp further ahead of local physical time than a
//! bound — applies only at network boundaries ([`Hlc::receive_network`]);
//! device clocks are calibrated, never rejected ([`Hlc::receive`]).
//!
//! The physical clock is injected ([`PhysicalClock`]); the default,
//! [`TscClock`], reads the CPU's invariant TSC (through `quanta`) and is
//! re-anchored to wall time periodically.

use crate::error::HlcError;
use crate::id::ClockDomain;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 4;
/// Mask of the logical counter.
pub const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;
/// The default bound on how far a network stamp may lead local physical time.
pub const DEFAULT_MAX_DRIFT: Duration = Duration::from_millis(500);

/// A source of physical time: nanoseconds since the Unix epoch.
///
/// Need not be monotonic (the HLC takes the maximum); should be close to
/// wall time, since stamps of different nodes are compared.
pub trait PhysicalClock: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;
}

impl<F: Fn() -> u64 + Send + Sync> PhysicalClock for F {
    fn now_ns(&self) -> u64 {
        self()
    }
}

impl<C: PhysicalClock + ?Sized> PhysicalClock for std::sync::Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}

/// Wall time from [`SystemTime`] (a vDSO `clock_gettime` on Linux).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl PhysicalClock for SystemClock {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// A clock that moves only when told to: for tests that drive time.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `ns`.
    pub const fn new(ns: u64) -> Self {
        ManualClock {
            now: AtomicU64::new(ns),
        }
    }

    /// Sets the reading.
    pub fn set(&self, ns: u64) {
        self.now.store(ns, Ordering::Relaxed);
    }

    /// Moves the reading forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl PhysicalClock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

/// Wall time from the CPU's time-stamp counter, re-anchored to
/// [`SystemClock`] every period (one second by default).
///
/// Reading it costs one `rdtsc` and a multiply, instead of a
/// `clock_gettime`. `quanta` detects an invariant TSC and calibrates it once
/// per process (up to 200 ms, at the first clock made); without one it falls
/// back to the OS monotonic clock. Under Miri, which cannot execute `rdtsc`,
/// it reads [`SystemClock`].
pub struct TscClock {
    #[cfg(not(miri))]
    clock: quanta::Clock,
    /// Wall time minus monotonic time, in ns (wrapping).
    offset: AtomicU64,
    /// Monotonic time at which the next re-anchoring is due.
    next_anchor: AtomicU64,
    period_ns: u64,
}

impl fmt::Debug for TscClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TscClock")
            .field("period_ns", &self.period_ns)
            .finish_non_exhaustive()
    }
}

impl Default for TscClock {
    fn default() -> Self {
        Self::new()
    }
}

impl TscClock {
    /// A clock re-anchored to wall time every second.
    pub fn new() -> Self {
        Self::with_reanchor_period(Duration::from_secs(1))
    }

    /// A clock re-anchored to wall time every `period`.
    pub fn with_reanchor_period(period: Duration) -> Self {
        let clock = TscClock {
            #[cfg(not(miri))]
            clock: quanta::Clock::new(),
            offset: AtomicU64::new(0),
            next_anchor: AtomicU64::new(0),
            period_ns: period.as_nanos().min(u64::MAX as u128) as u64,
        };
        clock.reanchor();
        clock
    }

    #[inline(always)]
    fn monotonic_ns(&self) -> u64 {
        #[cfg(not(miri))]
        {
            self.clock.delta_as_nanos(0, self.clock.raw())
        }
        #[cfg(miri)]
        {
            SystemClock.now_ns()
        }
    }

    #[cold]
    fn reanchor(&self) {
        let before = self.monotonic_ns();
        let wall = SystemClock.now_ns();
        let after = self.monotonic_ns();
        let mono = before + (after - before) / 2;
        // Relaxed: the offset is one self-contained word; readers need no
        // other data ordered with it.
        self.offset
            .store(wall.wrapping_sub(mono), Ordering::Relaxed);
        self.next_anchor
            .store(after.saturating_add(self.period_ns), Ordering::Relaxed);
    }
}

impl PhysicalClock for TscClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        let mono = self.monotonic_ns();
        let due = self.next_anchor.load(Ordering::Relaxed);
        if mono >= due
            && self
                .next_anchor
                .compare_exchange(due, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // This thread won the re-anchoring; others keep the old offset.
            self.reanchor();
        }
        mono.wrapping_add(self.offset.load(Ordering::Relaxed))
    }
}

/// An HLC word with the domain that stamped it; ordered by word, then domain.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Timestamp {
    /// The HLC word.
    pub hlc: u64,
    /// Who stamped it.
    pub domain: ClockDomain,
}

impl Timestamp {
    /// The physical part: ns since the epoch, 16 ns resolution.
    pub const fn physical_ns(self) -> u64 {
        self.hlc & !LOGICAL_MASK
    }

    /// The logical counter.
    pub const fn logical(self) -> u64 {
        self.hlc & LOGICAL_MASK
    }

    /// The physical part as a [`SystemTime`].
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.physical_ns())
    }
}

/// One clock domain's hybrid logical clock.
///
/// `Sync`: every method is a single CAS loop on one word, so one `Hlc` can be
/// shared by all threads of a domain.
///
/// # Examples
///
/// ```
/// use ringkernel::hlc::{Hlc, ManualClock};
/// use ringkernel::id::ClockDomain;
///
/// let host = Hlc::with_clock(ClockDomain::host(0), ManualClock::new(1_000));
/// let a = host.tick();
/// let b = host.tick();
/// assert!(b > a);
/// // A stamp from a kernel ahead of us: the merge lands after it.
/// let merged = host.receive(a.hlc + 1_000);
/// assert!(merged.hlc > a.hlc + 1_000);
/// ```
pub struct Hlc<C: PhysicalClock = TscClock> {
    word: Line,
    domain: ClockDomain,
    max_drift_ns: u64,
    clock: C,
}

/// The word on its own 128-byte line: it is hammered by every thread of the
/// domain and must not share a line with anything else.
#[repr(align(128))]
struct Line(AtomicU64);

impl<C: PhysicalClock> fmt::Debug for Hlc<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hlc")
            .field("word", &format_args!("{:#x}", self.peek()))
            .field("domain", &self.domain)
            .field("max_drift_ns", &self.max_drift_ns)
            .finish()
    }
}

/// An HLC over an injected clock, as a runtime keeps for its host domain.
pub type DynHlc = Hlc<std::sync::Arc<dyn PhysicalClock>>;

impl Hlc<TscClock> {
    /// A clock for `domain` over the default [`TscClock`].
    pub fn new(domain: ClockDomain) -> Self {
        Self::with_clock(domain, TscClock::new())
    }
}

impl<C: PhysicalClock> Hlc<C> {
    /// A clock for `domain` over `clock`, with the default network drift
    /// bound ([`DEFAULT_MAX_DRIFT`]).
    pub fn with_clock(domain: ClockDomain, clock: C) -> Self {
        Hlc {
            word: Line(AtomicU64::new(0)),
            domain,
            max_drift_ns: DEFAULT_MAX_DRIFT.as_nanos() as u64,
            clock,
        }
    }

    /// Sets the bound [`Hlc::receive_network`] enforces.
    pub fn with_max_drift(mut self, max_drift: Duration) -> Self {
        self.max_drift_ns = max_drift.as_nanos().min(u64::MAX as u128) as u64;
        self
    }

    /// The domain this clock stamps for.
    pub fn domain(&self) -> ClockDomain {
        self.domain
    }

    /// The physical clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// The current word, without ticking.
    pub fn peek(&self) -> u64 {
        self.word.0.load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn advance(&self, floor: u64) -> Timestamp {
        // Relaxed suffices for the clock's own guarantees: all updates are
        // read-modify-writes of one word, so coherence orders them and each
        // one reads the latest; the word protects no other data.
        let mut current = self.word.0.load(Ordering::Relaxed);
        loop {
            // Saturating: at the horizon (2554) the word sticks rather than wrapping back.
            let next = current.saturating_add(1).max(floor);
            match self.word.0.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Timestamp {
                        hlc: next,
                        domain: self.domain,
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// A stamp for a local event or send: `w = max(w + 1, pt & !0xF)`.
    #[inline]
    pub fn tick(&self) -> Timestamp {
        self.advance(self.clock.now_ns() & !LOGICAL_MASK)
    }

    /// Merges a stamp from a trusted domain (a kernel or the host of this
    /// node): `w = max(w + 1, m + 1, pt & !0xF)`. The result is strictly
    /// greater than both the clock's previous word and `stamp`.
    #[inline]
    pub fn receive(&self, stamp: u64) -> Timestamp {
        let pt = self.clock.now_ns() & !LOGICAL_MASK;
        self.advance(pt.max(stamp.saturating_add(1)))
    }

    /// As [`Hlc::tick`], with physical time `pt_ns` read earlier (once for
    /// a batch of events: the logical counter keeps their stamps apart and
    /// increasing; a stale `pt_ns` only lowers the floor).
    #[inline]
    pub fn tick_at(&self, pt_ns: u64) -> Timestamp {
        self.advance(pt_ns & !LOGICAL_MASK)
    }

    /// As [`Hlc::receive`], with physical time `pt_ns` read earlier (see
    /// [`Hlc::tick_at`]).
    #[inline]
    pub fn receive_at(&self, stamp: u64, pt_ns: u64) -> Timestamp {
        self.advance((pt_ns & !LOGICAL_MASK).max(stamp.saturating_add(1)))
    }

    /// Merges a stamp that arrived over the network, rejecting one further
    /// ahead of local physical time than the configured bound.
    ///
    /// # Errors
    /// [`HlcError::DriftExceeded`]; the clock is left unchanged.
    pub fn receive_network(&self, stamp: Timestamp) -> Result<Timestamp, HlcError> {
        let now = self.clock.now_ns();
        let ahead = stamp.physical_ns().saturating_sub(now);
        if ahead > self.max_drift_ns {
            return Err(HlcError::DriftExceeded {
                stamp: stamp.hlc,
                ahead_ns: ahead,
                max_drift_ns: self.max_drift_ns,
            });
        }
        Ok(self.advance((now & !LOGICAL_MASK).max(stamp.hlc.saturating_add(1))))
    }
}

#[cfg(test)]
mod tests;
