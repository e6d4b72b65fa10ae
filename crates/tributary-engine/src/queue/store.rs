//! [`QueueStore`]: the queue interface every backend gives (publish, receive with a lease, ack,
//! nack with a delay or backoff, extend, dead letters, dedup of retried publishes), so a system
//! written against it runs on the embedded [`Queues`] and on NATS JetStream (`tributary-nats`).
//!
//! The contract, which the conformance suite (`conformance::queue`) checks on every backend:
//! - A publish returns one [`MessageId`] per message, in order, once the messages are durable;
//!   a receive hands each message out with that id, its body, key and headers as published.
//! - Each group sees every message; within a group, a message is leased to one consumer at a
//!   time. An acked message never comes back to its group; an unacked one comes back after its
//!   lease with its delivery count raised; a nacked one after the delay given (or the queue's
//!   backoff).
//! - A message released after its `deliveries_max`-th delivery is dead-lettered (durably, with
//!   its group, count and reason) instead of coming back.
//! - A `dedup_id` published again within the queue's dedup window returns the first id and is
//!   delivered once.
//! - The receipt of an earlier delivery attempt is [`ReceiptOutcome::Stale`] and never acks or
//!   nacks a later one.
//! - Bad input is refused by name before anything is written (the `check_*` functions here are
//!   the one definition of what is bad, shared by every backend).
//!
//! - `stats` counts, per group, what waits (`depth`), what is leased (`in_flight`), what was
//!   acked and what was dead-lettered; `redrive` republishes a group's dead letters for that
//!   group only, each once (a second redrive skips letters already redriven).
//!
//! Group administration (create or delete a group by hand) stays on [`Queues`].

use std::time::Duration;

use super::{DeadLetter, Delivery, MessageId, NewMessage, QueueConfig, QueueError, QueueStats, Queues, Receipt, ReceiptOutcome, Redrive, Result};
use crate::{BoxFuture, Gap};

/// What the async methods of a `dyn QueueStore` return.
pub type QueueFuture<'a, T> = BoxFuture<'a, Result<T>>;

/// The queue interface. See the module docs for its contract.
pub trait QueueStore: Send + Sync + std::fmt::Debug {
    /// `"embedded"`, `"nats"`, ...
    fn backend(&self) -> &'static str;
    /// The guarantees this backend does not give. Empty for the embedded engine.
    fn gaps(&self) -> &'static [Gap] {
        &[]
    }
    /// True when calls complete on the polling thread (the embedded engine waits for its fsync
    /// and long polls there): on an async runtime, poll them where blocking is allowed
    /// (`tributary_server::on_backend`). False when calls are truly async (network backends).
    fn blocking(&self) -> bool {
        false
    }
    /// The names of every queue, sorted.
    fn list_queues(&self) -> QueueFuture<'_, Vec<String>>;
    /// A queue's configuration; [`QueueError::NotFound`] when there is no such queue.
    fn queue_config<'a>(&'a self, name: &'a str) -> QueueFuture<'a, QueueConfig>;
    /// Creates a queue; creating one that exists with the same configuration is a no-op, with
    /// another is [`QueueError::AlreadyExists`].
    fn create_queue<'a>(&'a self, name: &'a str, config: QueueConfig) -> QueueFuture<'a, ()>;
    /// Deletes a queue with its messages, groups and dead letters.
    fn delete_queue<'a>(&'a self, name: &'a str) -> QueueFuture<'a, ()>;
    /// Publishes a batch durably; one id per message, in order.
    fn publish<'a>(&'a self, queue: &'a str, messages: Vec<NewMessage>) -> QueueFuture<'a, Vec<MessageId>>;
    /// Leases up to `max` messages of `group` (created on first use) to `consumer` for
    /// `lease_ms` (None: the queue's default); waits up to `wait` for the first one.
    fn receive<'a>(&'a self, queue: &'a str, group: &'a str, consumer: &'a str, max: usize, lease_ms: Option<u64>, wait: Duration) -> QueueFuture<'a, Vec<Delivery>>;
    fn ack<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>) -> QueueFuture<'a, Vec<ReceiptOutcome>>;
    /// Gives deliveries back, available again after `delay_ms` (None: the queue's backoff by
    /// delivery count); the last allowed delivery is dead-lettered instead.
    fn nack<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>, delay_ms: Option<u64>) -> QueueFuture<'a, Vec<ReceiptOutcome>>;
    /// Moves the lease deadline of deliveries to now + `lease_ms`.
    fn extend<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>, lease_ms: u64) -> QueueFuture<'a, Vec<ReceiptOutcome>>;
    /// Dead letters from dead-letter offset `from` on, at most `max`, of one group or all.
    fn dead_letters<'a>(&'a self, queue: &'a str, group: Option<&'a str>, from: u64, max: usize) -> QueueFuture<'a, Vec<DeadLetter>>;
    /// Republishes `group`'s dead letters (all not yet redriven, or those named) as new messages
    /// only `group` receives, and marks them redriven; returns how many were republished.
    fn redrive<'a>(&'a self, queue: &'a str, group: &'a str, which: Redrive) -> QueueFuture<'a, usize>;
    /// The queue's numbers, summed over its groups and per group, with leases that ran out
    /// counted as available again.
    fn stats<'a>(&'a self, queue: &'a str) -> QueueFuture<'a, QueueStats>;
}

/// The embedded engine. Each call runs when the future is polled, on the polling thread: a
/// publish waits for its fsync and a receive may wait up to `wait` there. On an async runtime,
/// call it where blocking is allowed (the server's `blocking()`).
impl QueueStore for Queues {
    fn backend(&self) -> &'static str {
        "embedded"
    }
    fn blocking(&self) -> bool {
        true
    }
    fn list_queues(&self) -> QueueFuture<'_, Vec<String>> {
        Box::pin(async move { Ok(self.list()) })
    }
    fn queue_config<'a>(&'a self, name: &'a str) -> QueueFuture<'a, QueueConfig> {
        Box::pin(async move { Ok(self.get(name)?.config().clone()) })
    }
    fn create_queue<'a>(&'a self, name: &'a str, config: QueueConfig) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            match self.create(name, config.clone()) {
                Err(QueueError::AlreadyExists { .. }) if *self.get(name)?.config() == config => Ok(()),
                other => other.map(|_| ()),
            }
        })
    }
    fn delete_queue<'a>(&'a self, name: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move { self.delete(name) })
    }
    fn publish<'a>(&'a self, queue: &'a str, messages: Vec<NewMessage>) -> QueueFuture<'a, Vec<MessageId>> {
        Box::pin(async move { self.get(queue)?.publish(&messages) })
    }
    fn receive<'a>(&'a self, queue: &'a str, group: &'a str, consumer: &'a str, max: usize, lease_ms: Option<u64>, wait: Duration) -> QueueFuture<'a, Vec<Delivery>> {
        Box::pin(async move { self.get(queue)?.receive(group, consumer, max, lease_ms, wait) })
    }
    fn ack<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>) -> QueueFuture<'a, Vec<ReceiptOutcome>> {
        Box::pin(async move { self.get(queue)?.ack(group, &receipts) })
    }
    fn nack<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>, delay_ms: Option<u64>) -> QueueFuture<'a, Vec<ReceiptOutcome>> {
        Box::pin(async move { self.get(queue)?.nack(group, &receipts, delay_ms) })
    }
    fn extend<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>, lease_ms: u64) -> QueueFuture<'a, Vec<ReceiptOutcome>> {
        Box::pin(async move { self.get(queue)?.extend(group, &receipts, lease_ms) })
    }
    fn dead_letters<'a>(&'a self, queue: &'a str, group: Option<&'a str>, from: u64, max: usize) -> QueueFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move { self.get(queue)?.dead_letters(group, from, max) })
    }
    fn redrive<'a>(&'a self, queue: &'a str, group: &'a str, which: Redrive) -> QueueFuture<'a, usize> {
        Box::pin(async move { self.get(queue)?.redrive(group, which) })
    }
    fn stats<'a>(&'a self, queue: &'a str) -> QueueFuture<'a, QueueStats> {
        Box::pin(async move {
            let queue = self.get(queue)?;
            queue.tick()?;
            queue.stats(None)
        })
    }
}
