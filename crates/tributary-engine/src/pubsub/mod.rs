//! Pub/sub: subjects, wildcard subscriptions, and what happens when a subscriber falls behind.
//!
//! What is here:
//!
//! - [`SubjectTrie`]: maps subscription patterns (`orders.*.created`, `orders.>`, MQTT
//!   `sensors/+/temp` and `sensors/#`) to values and answers "who matches this subject?" with the
//!   same answer as [`SubjectPattern::matches`](tributary_core::SubjectPattern::matches), each
//!   subscription once. Built for a million subscriptions: compact nodes, one shared edge table,
//!   no `String` per node.
//! - [`Broker`]: a synchronous, thread-safe registry over the trie. [`Broker::subscribe`] gives a
//!   [`Subscription`] with a bounded buffer that its owner drains ([`Subscription::try_recv`],
//!   [`Subscription::recv_timeout`]); [`Broker::publish`] offers a message to every match and
//!   returns a [`PublishReport`]. Subscriptions with the same group name and pattern share the
//!   stream round robin. Dropping a [`Subscription`] unsubscribes it.
//! - [`PubSubStore`]: the pub/sub interface distributed backends also give (core NATS in
//!   `tributary-nats`), over bytes; the broker is its embedded backend.
//! - [`bench_subscriptions`]: builds many wildcard subscriptions and times matching, for the
//!   `tributary` binary and the big test.
//!
//! What is deliberately not here: no async runtime (an async edge can wrap `recv_timeout` or poll
//! `try_recv`), no network protocol, no per-connection accounting (the server enforces
//! `SUBSCRIPTIONS_PER_CONNECTION_MAX`), and no log: the broker never stores messages. The `u64`
//! offset a publisher passes is the message's offset in the log it was appended to first (one
//! log for all subjects of a broker), so that a subscriber that fell behind can read it there.
//!
//! # Which slow-consumer policy?
//!
//! Each subscriber picks what a publish does when its buffer
//! ([`SubscriberOptions::buffer_messages`]) is full:
//!
//! | policy | publisher | subscriber | pick it when |
//! | --- | --- | --- | --- |
//! | [`Block`](SlowConsumerPolicy::Block) | waits up to the timeout, then skips it ([`PublishReport::blocked`]) | gets every message unless it stalls past the timeout | the subscriber is trusted, in-process, and loss is worse than a slow publisher |
//! | [`DropOldest`](SlowConsumerPolicy::DropOldest) (default) | never waits | sees the newest messages; [`SubscriberStats::dropped`] counts the rest | only the latest state matters: prices, sensor readings, presence |
//! | [`Disconnect`](SlowConsumerPolicy::Disconnect) | never waits | is closed with [`DisconnectReason::SlowConsumer`] after draining its buffer | a client that cannot keep up should reconnect rather than see gaps (NATS's choice) |
//! | [`CatchUp`](SlowConsumerPolicy::CatchUp) | never waits | drains its buffer, then gets [`RecvError::Lagging`] with the offset to read the log from, and calls [`Subscription::resume`] | every message matters and the subjects are also appended to a log |
//!
//! `Block` is the only policy under which one subscriber slows others down: a publish delivers to
//! its matches in turn. It never holds the registry lock while it waits.
//!
//! Lag is visible from both sides: [`Subscription::stats`] and [`Broker::subscriber_stats`] give
//! buffered and dropped counts, the state (active, lagging from an offset, disconnected) and the
//! last delivered and received offsets.

mod bench;
mod broker;
mod store;
mod trie;

pub use bench::{SubscriptionBenchReport, bench_pattern, bench_subject, bench_subscriptions};
pub use broker::{
    Broker, BrokerLimits, Delivery, DisconnectReason, PubSubError, PublishReport, RecvError,
    SlowConsumerPolicy, SubscriberOptions, SubscriberState, SubscriberStats, Subscription,
};
pub use store::{PubSubFuture, PubSubStore, Subscribed};
pub use trie::{SubjectTrie, SubscriptionId};
