//! [`PubSubStore`]: the pub/sub interface every backend gives (publish to a subject, subscribe by
//! pattern with wildcards, groups that share a subscription), so that a system written against
//! it fans out on the embedded [`Broker`] and across nodes on core NATS (`tributary-nats`).
//!
//! The contract, which the conformance suite (`conformance::pubsub`) checks on every backend:
//! - A message published after `subscribe` returned reaches every subscription whose pattern
//!   matches (`*` one token, `>` the rest; an MQTT `a/#` filter also matches `a`), with its
//!   subject, offset and payload; nothing published before is delivered (no history).
//! - One publisher's messages reach a subscription in publish order.
//! - Members of one group with one pattern share the messages: each goes to exactly one member.
//! - Under [`SlowConsumerPolicy::DropOldest`] a subscriber that does not keep up keeps the newest
//!   messages in its buffer.
//!
//! Messages are bytes: what a payload means is the system's business.

use std::time::Duration;

use bytes::Bytes;
use tributary_core::{Subject, SubjectPattern};

use super::{Broker, Delivery, PubSubError, RecvError, SubscriberOptions, Subscription};
use crate::BoxFuture;
use crate::Gap;

/// What the async methods of a `dyn PubSubStore` return.
pub type PubSubFuture<'a, T> = BoxFuture<'a, Result<T, PubSubError>>;

/// One subscription of any backend. Dropping it unsubscribes.
pub trait Subscribed: Send {
    /// The oldest buffered message, waiting up to `timeout`; [`RecvError::Timeout`] if none came.
    fn recv(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Delivery<Bytes>, RecvError>>;
}

/// The pub/sub interface. See the module docs for its contract.
pub trait PubSubStore: Send + Sync + std::fmt::Debug {
    /// `"embedded"`, `"nats"`, ...
    fn backend(&self) -> &'static str;
    /// The guarantees this backend does not give. Empty for the embedded engine.
    fn gaps(&self) -> &'static [Gap] {
        &[]
    }
    /// Offers `payload` (at log `offset`, or 0 when it was not logged) to every matching
    /// subscription, on every node.
    fn publish<'a>(&'a self, subject: &'a Subject, offset: u64, payload: Bytes) -> PubSubFuture<'a, ()>;
    /// Subscribes; whatever is published after this returns is offered to the subscription.
    fn subscribe<'a>(&'a self, pattern: &'a SubjectPattern, options: SubscriberOptions) -> PubSubFuture<'a, Box<dyn Subscribed>>;
}

/// An embedded subscription. `recv` waits on the polling thread (a condition variable): on an
/// async runtime, poll it where blocking is allowed.
impl Subscribed for Subscription<Bytes> {
    fn recv(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Delivery<Bytes>, RecvError>> {
        Box::pin(async move { self.recv_timeout(timeout) })
    }
}

/// The embedded broker: one process's subscriptions.
impl PubSubStore for Broker<Bytes> {
    fn backend(&self) -> &'static str {
        "embedded"
    }
    fn publish<'a>(&'a self, subject: &'a Subject, offset: u64, payload: Bytes) -> PubSubFuture<'a, ()> {
        Box::pin(async move {
            Broker::publish(self, subject, offset, payload);
            Ok(())
        })
    }
    fn subscribe<'a>(&'a self, pattern: &'a SubjectPattern, options: SubscriberOptions) -> PubSubFuture<'a, Box<dyn Subscribed>> {
        Box::pin(async move { Ok(Box::new(Broker::subscribe(self, pattern.clone(), options)?) as Box<dyn Subscribed>) })
    }
}

impl<T> std::fmt::Debug for Broker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("subscriptions", &self.subscriptions()).finish()
    }
}
