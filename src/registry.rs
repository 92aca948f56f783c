//! One address space for CPU and GPU actors: a [`Registry`] of mailboxes by
//! [`ActorId`], and topics with wildcards that publish through it.
//!
//! Each framework adapter wraps its actors' references in a type that
//! implements [`Mailbox`] — GPU actors' and ordinary CPU actors' alike — so
//! code that holds only an `ActorId` can reach either. A GPU actor is
//! reached through its mailbox, never its H2K ring directly: only its own
//! handler writes that ring (the single-producer rule).
//!
//! Delivery never blocks: a full mailbox hands the delivery back
//! ([`DeliveryError::Full`]), and a publish reports every delivery it could
//! not make, so nothing is dropped silently.
//!
//! # Topics
//!
//! A topic is `/`-separated levels (`sensors/kitchen/temp`). A pattern may
//! use `+` for exactly one level and `#`, last, for any number of remaining
//! levels (zero included): `sensors/+/temp`, `sensors/#`.
//!
//! # Examples
//!
//! ```
//! use ringkernel::registry::TopicPattern;
//!
//! let p = TopicPattern::parse("sensors/+/temp")?;
//! assert!(p.matches("sensors/kitchen/temp"));
//! assert!(!p.matches("sensors/kitchen/door/temp"));
//! assert!(TopicPattern::parse("sensors/#")?.matches("sensors"));
//! assert!(TopicPattern::parse("a/#/b").is_err());
//! # Ok::<(), ringkernel::registry::TopicError>(())
//! ```

use crate::hlc::{DynHlc, Timestamp};
use crate::id::ActorId;
use crate::kernel::Payload;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A message on its way to a mailbox: what, from whom, to whom, and its
/// HLC stamp — the sender's (a send or publish from the host), or the
/// poller's after its merge (a message a kernel sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub payload: Payload,
    /// The sender.
    pub src: ActorId,
    /// The destination, as addressed.
    pub dst: ActorId,
    /// Its stamp (see above): later than every event it depends on.
    pub stamp: Timestamp,
}

/// Why a delivery was not made; the delivery is handed back.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The mailbox is full (bounded mailboxes only).
    #[error("the mailbox of {dst:?} is full", dst = .0.dst)]
    Full(Delivery),
    /// The actor is gone.
    #[error("{dst:?} is gone", dst = .0.dst)]
    Closed(Delivery),
    /// No mailbox is registered under this id.
    #[error("no actor {dst:?} is registered", dst = .0.dst)]
    Unknown(Delivery),
    /// The actor does not take this message type.
    #[error("{dst:?} does not take message type {ty:#x}", dst = .0.dst, ty = .0.payload.type_id())]
    Refused(Delivery),
}

impl DeliveryError {
    /// The delivery that was not made.
    pub fn into_inner(self) -> Delivery {
        match self {
            DeliveryError::Full(d)
            | DeliveryError::Closed(d)
            | DeliveryError::Unknown(d)
            | DeliveryError::Refused(d) => d,
        }
    }
}

/// A framework actor's mailbox, as the registry reaches it. Implemented by
/// each adapter for its GPU actors and for ordinary actors.
pub trait Mailbox: Send + Sync + 'static {
    /// Delivers without blocking (never waits for mailbox room). Runs on
    /// the runtime's poller thread for messages kernels send: waiting here
    /// would stall every actor slot.
    ///
    /// # Errors
    /// [`DeliveryError`] with the delivery handed back.
    fn try_deliver(&self, delivery: Delivery) -> Result<(), DeliveryError>;
}

/// Why a topic or pattern is malformed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The empty string names no topic.
    #[error("a topic or pattern has at least one character")]
    Empty,
    /// `#` may only be the last level.
    #[error("`#` must be the last level of {0:?}")]
    HashNotLast(String),
    /// A wildcard must be a whole level (`a/+/b`, not `a/x+/b`).
    #[error("a wildcard must be a whole level in {0:?}")]
    PartialWildcard(String),
    /// A topic to publish on names one topic: no wildcards.
    #[error("a published topic has no wildcards: {0:?}")]
    WildcardInTopic(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    One,
    Rest,
}

/// A subscription pattern (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    levels: Vec<Level>,
}

impl TopicPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// [`TopicError`] for an empty pattern, a `#` before the last level, or
    /// a wildcard that is only part of a level.
    pub fn parse(pattern: &str) -> Result<Self, TopicError> {
        if pattern.is_empty() {
            return Err(TopicError::Empty);
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "+" => Level::One,
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(TopicError::HashNotLast(pattern.into())),
                p if p.contains(['+', '#']) => {
                    return Err(TopicError::PartialWildcard(pattern.into()));
                }
                p => Level::Exact(p.into()),
            });
        }
        Ok(TopicPattern {
            text: pattern.into(),
            levels,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` (no wildcards) matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return true,
                Level::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Level::Exact(want) => {
                    if parts.next() != Some(want.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Checks a topic to publish on.
///
/// # Errors
/// [`TopicError::Empty`] or [`TopicError::WildcardInTopic`].
pub fn check_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        Err(TopicError::Empty)
    } else if topic.contains(['+', '#']) {
        Err(TopicError::WildcardInTopic(topic.into()))
    } else {
        Ok(())
    }
}

/// A subscription's handle, to unsubscribe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// What a publish did: how many deliveries it made and every one it could
/// not make, handed back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Deliveries made.
    pub delivered: usize,
    /// Deliveries refused, with the reason and the delivery.
    pub refused: Vec<DeliveryError>,
}

struct Subscription {
    id: SubscriptionId,
    pattern: TopicPattern,
    actor: ActorId,
}

/// Mailboxes by actor id, and topic subscriptions (see the
/// [module docs](self)). A GPU actor is registered under its id without
/// the incarnation, so after a restart registering the new incarnation's
/// mailbox replaces the old one in place (subscriptions stay). Until it
/// does, deliveries to the old mailbox come back `Closed`.
pub struct Registry {
    mailboxes: RwLock<HashMap<ActorId, Arc<dyn Mailbox>>>,
    subscriptions: RwLock<Vec<Subscription>>,
    next_subscription: AtomicU64,
    hlc: Arc<DynHlc>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("mailboxes", &self.mailboxes.read().map_or(0, |m| m.len()))
            .field(
                "subscriptions",
                &self.subscriptions.read().map_or(0, |s| s.len()),
            )
            .finish()
    }
}

/// Registry keys ignore the incarnation.
fn key(id: ActorId) -> ActorId {
    id.with_incarnation(0)
}

impl Registry {
    /// An empty registry stamping with `hlc`.
    pub fn new(hlc: Arc<DynHlc>) -> Self {
        Registry {
            mailboxes: RwLock::new(HashMap::new()),
            subscriptions: RwLock::new(Vec::new()),
            next_subscription: AtomicU64::new(1),
            hlc,
        }
    }

    /// Registers (or replaces) the mailbox of `id`.
    pub fn register(&self, id: ActorId, mailbox: Arc<dyn Mailbox>) {
        if let Ok(mut m) = self.mailboxes.write() {
            m.insert(key(id), mailbox);
        }
    }

    /// Removes the mailbox of `id` (its subscriptions stay, and deliveries
    /// to it come back `Unknown` until it registers again).
    pub fn unregister(&self, id: ActorId) -> bool {
        self.mailboxes
            .write()
            .is_ok_and(|mut m| m.remove(&key(id)).is_some())
    }

    fn mailbox(&self, id: ActorId) -> Option<Arc<dyn Mailbox>> {
        self.mailboxes.read().ok()?.get(&key(id)).cloned()
    }

    /// Sends `payload` from `src` to `dst`, stamped now.
    ///
    /// # Errors
    /// [`DeliveryError`] with the delivery handed back.
    pub fn send(&self, src: ActorId, dst: ActorId, payload: Payload) -> Result<(), DeliveryError> {
        self.deliver(Delivery {
            payload,
            src,
            dst,
            stamp: self.hlc.tick(),
        })
    }

    /// Delivers an already stamped delivery to its destination.
    ///
    /// # Errors
    /// [`DeliveryError`] with the delivery handed back.
    pub fn deliver(&self, delivery: Delivery) -> Result<(), DeliveryError> {
        match self.mailbox(delivery.dst) {
            Some(m) => m.try_deliver(delivery),
            None => Err(DeliveryError::Unknown(delivery)),
        }
    }

    /// Subscribes `actor` to the topics matching `pattern`.
    ///
    /// # Errors
    /// [`TopicError`] for a malformed pattern.
    pub fn subscribe(&self, pattern: &str, actor: ActorId) -> Result<SubscriptionId, TopicError> {
        let pattern = TopicPattern::parse(pattern)?;
        let id = SubscriptionId(self.next_subscription.fetch_add(1, Ordering::Relaxed));
        if let Ok(mut s) = self.subscriptions.write() {
            s.push(Subscription {
                id,
                pattern,
                actor: key(actor),
            });
        }
        Ok(id)
    }

    /// Ends a subscription; whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.subscriptions.write().is_ok_and(|mut s| {
            let before = s.len();
            s.retain(|x| x.id != id);
            s.len() != before
        })
    }

    /// Publishes `payload` from `src` on `topic`: one delivery, stamped
    /// once, to every actor with a matching subscription (once per actor,
    /// however many of its patterns match), in subscription order.
    ///
    /// # Errors
    /// [`TopicError`] for a malformed topic; deliveries that could not be
    /// made are in the report, handed back.
    pub fn publish(
        &self,
        src: ActorId,
        topic: &str,
        payload: Payload,
    ) -> Result<PublishReport, TopicError> {
        check_topic(topic)?;
        let targets: Vec<ActorId> = {
            let Ok(subs) = self.subscriptions.read() else {
                return Ok(PublishReport::default());
            };
            let mut t: Vec<ActorId> = Vec::new();
            for s in subs.iter().filter(|s| s.pattern.matches(topic)) {
                if !t.contains(&s.actor) {
                    t.push(s.actor);
                }
            }
            t
        };
        let stamp = self.hlc.tick();
        let mut report = PublishReport::default();
        for dst in targets {
            match self.deliver(Delivery {
                payload,
                src,
                dst,
                stamp,
            }) {
                Ok(()) => report.delivered += 1,
                Err(e) => report.refused.push(e),
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ClockDomain;
    use proptest::prelude::*;
    use std::sync::Mutex;

    #[test]
    fn wildcards_match_levels() {
        let m = |p: &str, t: &str| TopicPattern::parse(p).unwrap().matches(t);
        assert!(m("a/b/c", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(!m("a/b", "a/b/c"));
        assert!(m("a/+/c", "a/x/c"));
        assert!(m("a/+/c", "a//c"), "an empty level is a level");
        assert!(!m("a/+/c", "a/c"));
        assert!(!m("a/+", "a/x/y"));
        assert!(m("+", "a"));
        assert!(!m("+", "a/b"));
        assert!(m("a/#", "a"), "# matches zero levels");
        assert!(m("a/#", "a/b/c/d"));
        assert!(!m("a/#", "b/a"));
        assert!(m("#", "anything/at/all"));
        assert!(m("+/+/#", "x/y"));
        assert!(!m("+/+/#", "x"));
    }

    #[test]
    fn malformed_patterns_and_topics_are_typed_errors() {
        assert_eq!(TopicPattern::parse(""), Err(TopicError::Empty));
        assert!(matches!(
            TopicPattern::parse("a/#/b"),
            Err(TopicError::HashNotLast(_))
        ));
        assert!(matches!(
            TopicPattern::parse("a/b+/c"),
            Err(TopicError::PartialWildcard(_))
        ));
        assert!(matches!(
            TopicPattern::parse("a/#x"),
            Err(TopicError::PartialWildcard(_))
        ));
        assert_eq!(check_topic(""), Err(TopicError::Empty));
        assert!(matches!(
            check_topic("a/+"),
            Err(TopicError::WildcardInTopic(_))
        ));
        assert_eq!(check_topic("a/b"), Ok(()));
    }

    /// Pattern matching against a model: a recursive matcher over levels.
    fn model(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (Some(&"#"), _) => true,
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(&"+"), Some(_)) => model(&p[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && model(&p[1..], &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn matching_agrees_with_the_model(
            pattern in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("+")], 0..5),
            hash in any::<bool>(),
            topic in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("")], 1..6),
        ) {
            let mut p = pattern.clone();
            if hash || p.is_empty() {
                p.push("#");
            }
            let text = p.join("/");
            let topic_text = topic.join("/");
            prop_assert_eq!(
                TopicPattern::parse(&text).unwrap().matches(&topic_text),
                model(&p, &topic),
                "{} vs {}", text, topic_text
            );
        }
    }

    struct Sink(Mutex<Vec<Delivery>>, bool);

    impl Mailbox for Sink {
        fn try_deliver(&self, d: Delivery) -> Result<(), DeliveryError> {
            if self.1 {
                return Err(DeliveryError::Full(d));
            }
            self.0.lock().unwrap().push(d);
            Ok(())
        }
    }

    #[test]
    fn publish_fans_out_once_per_actor_and_reports_refusals() {
        let clock: Arc<dyn crate::hlc::PhysicalClock> = Arc::new(crate::hlc::SystemClock);
        let reg = Registry::new(Arc::new(DynHlc::with_clock(ClockDomain::host(0), clock)));
        let (a, b, full, gone) = (
            ActorId::cpu(0, 1),
            ActorId::gpu(0, 2).with_incarnation(3),
            ActorId::cpu(0, 3),
            ActorId::cpu(0, 4),
        );
        let sa = Arc::new(Sink(Mutex::new(Vec::new()), false));
        let sb = Arc::new(Sink(Mutex::new(Vec::new()), false));
        reg.register(a, sa.clone());
        reg.register(b, sb.clone());
        reg.register(full, Arc::new(Sink(Mutex::new(Vec::new()), true)));
        reg.subscribe("s/+/temp", a).unwrap();
        reg.subscribe("s/#", a).unwrap();
        // Subscribed as incarnation 0, registered as 3: the same actor.
        let sub_b = reg.subscribe("s/kitchen/#", ActorId::gpu(0, 2)).unwrap();
        reg.subscribe("s/#", full).unwrap();
        reg.subscribe("#", gone).unwrap();
        let payload = Payload::from_parts(7, &[1, 2, 3]);
        let r = reg
            .publish(ActorId::NONE, "s/kitchen/temp", payload)
            .unwrap();
        assert_eq!(r.delivered, 2);
        assert_eq!(r.refused.len(), 2);
        assert!(matches!(r.refused[0], DeliveryError::Full(d) if d.dst == full));
        assert!(matches!(r.refused[1], DeliveryError::Unknown(d) if d.dst == gone));
        assert_eq!(sa.0.lock().unwrap().len(), 1, "once per actor");
        let got = sb.0.lock().unwrap()[0];
        assert_eq!(
            (got.payload, got.stamp),
            (payload, sa.0.lock().unwrap()[0].stamp)
        );
        assert!(reg.unsubscribe(sub_b));
        let r = reg
            .publish(ActorId::NONE, "s/kitchen/door", payload)
            .unwrap();
        assert_eq!(r.delivered, 1);
        assert!(matches!(
            reg.publish(ActorId::NONE, "s/#", payload),
            Err(TopicError::WildcardInTopic(_))
        ));
        assert!(matches!(
            reg.send(ActorId::NONE, ActorId::cpu(0, 99), payload),
            Err(DeliveryError::Unknown(_))
        ));
    }
}
