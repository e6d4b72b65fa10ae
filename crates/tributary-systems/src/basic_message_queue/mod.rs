//! basic-message-queue: durable work queues over HTTP and WebSocket, as a RabbitMQ or SQS user
//! expects them. Producers publish JSON messages to a named queue; consumer *groups* each get
//! every message, and the consumers within a group compete for them (each message is leased to
//! one consumer at a time). A consumer acks what it processed; a nack, or a lease that runs out,
//! brings the message back (after a delay or the queue's exponential backoff); after
//! `deliveries_max` deliveries (5) it goes to the queue's dead letters, where it can be listed
//! and redriven.
//!
//! ```text
//!  producers ──POST /v1/queues/{q}/messages──▶ front door ──▶ publish (201 once durable)
//!                                                                  │
//!                                                                  ▼
//!                      ┌── queue "mq.{q}": embedded logs (fsync) or JetStream ──────────────┐
//!                      │ group "billing": lease ─▶ ack / nack+backoff ─▶ (5th) dead letters │
//!                      │ group "audit":   lease ─▶ ack / nack+backoff ─▶ (5th) dead letters │
//!                      └──────────────┬──────────────────────────────┬─────────────────────┘
//!                                     │ POST …/receive (long poll)   │ GET …/ws (credit)
//!                                     ▼                              ▼
//!                          consumers A, B, C (compete within a group; each group sees all)
//!                                     ▲
//!                 POST …/dead-letters/redrive ── dead letters ◀──┘ (listed by GET …/dead-letters)
//! ```
//!
//! # Routes
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/queues/{queue}/messages` | publish 1..`BATCH_RECORDS_MAX` messages; 201 `{"ids"}` once durable |
//! | `POST /v1/queues/{queue}/receive` | lease up to `max` messages of a group, long-polling up to `wait_ms` |
//! | `POST /v1/queues/{queue}/ack`, `…/nack`, `…/extend` | settle receipts; 200 all ok, 409 some stale |
//! | `GET /v1/queues`, `GET /v1/queues/{queue}` | list queues; depth, in flight, dead letters, lag per group |
//! | `DELETE /v1/queues/{queue}` | delete a queue and everything in it |
//! | `GET /v1/queues/{queue}/dead-letters` | page through dead letters (`group`, `from`, `max`) |
//! | `POST /v1/queues/{queue}/dead-letters/redrive` | republish a group's dead letters (all or `ids`) |
//! | `GET /v1/queues/{queue}/ws` | WebSocket consumer with credit-based flow control |
//!
//! **Queues are created by their first publish**, with the engine's defaults: durability
//! `always` (a publish is acknowledged after fsync, with group commit), `deliveries_max` 5,
//! lease 30 s, nack backoff 1 s × 2^(delivery − 1) capped at 5 minutes (with jitter), dedup
//! window 5 minutes, 10,000 messages in flight per consumer name. `GET /v1/queues/{queue}`
//! shows them. Receiving from, or settling on, a queue that was never published to is a 404.
//! Groups are created by their first receive and start at the oldest message the queue holds.
//! In the engine the queue is named `mq.{queue}`, so queues of other systems stay out of reach.
//!
//! Bodies are any JSON value, stored as their JSON bytes and delivered as the same JSON.
//!
//! # Backends
//!
//! The system holds no queue state itself: every call goes through the queue interface
//! (`QueueStore`) of its [`Context`], the embedded engine's queues (in the node's data folder) or
//! NATS JetStream's with `tributary up --stream nats://…`. On NATS, several nodes serve the same
//! queues behind a load balancer: a receipt is the delivery's ack subject, so any node settles
//! what another leased. What NATS does not give (`tributary_nats::queue` lists the gaps):
//! priority weighting, `delay_ms` on publish (refused with 400), a per-receive `lease_ms` other
//! than the queue's (refused with 400), the per-consumer in-flight bound, stale-receipt
//! detection, and an ack naming a group that does not exist is `invalid` rather than 404.
//!
//! # Delivery guarantee: at-least-once
//!
//! A message is delivered to each group until a receipt of its current delivery acks it, or it
//! is dead-lettered. A consumer that dies holding leases loses them when they run out; a
//! WebSocket consumer's unacked messages are nacked (redeliverable at once) when it disconnects;
//! a long poll whose client went away gives back what it leased. Acks are durable before they
//! are answered, so an acked message never comes back, also across restarts. Consumers must
//! therefore be idempotent: a message may arrive twice (an ack lost in flight, a lease that ran
//! out while the work was still going).
//!
//! # What it does not do
//!
//! - No order per key, no single-active consumer: order is best-effort per priority level.
//! - No exactly-once, no transactions across queues, no per-queue configuration through the API
//!   (every queue gets the defaults above).
//! - No fan-out by routing key or exchange: that is pub/sub's job (simple-pubsub).
//! - A long poll holds a blocking thread for up to `QUEUE_RECEIVE_WAIT_MS_MAX` (20 s); the
//!   async workers stay free.
//! - End-to-end latency (enqueue to ack) is recorded for receipts this process handed out and
//!   remembers (at most [`LATENCY_RECEIPTS_MAX`] at once); acks of older receipts are not timed.

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use tributary_engine::queue::{Delivery, QueueConfig, QueueError, QueueStats, QueueStore, Receipt, ReceiptOutcome};
use tributary_runtime::SystemMetrics;
use tributary_server::{ApiError, Gateway, SystemApi, on_backend};

use crate::{Context, System};

pub const ID: &str = "basic-message-queue";

/// Receipts whose enqueue time is remembered for the end-to-end latency of their ack. When full,
/// the memory is cleared (those acks go untimed): bounded memory over complete samples.
pub const LATENCY_RECEIPTS_MAX: usize = 100_000;

/// The running system: the queue interface (the embedded engine's queues, or NATS JetStream's)
/// behind the routes of [`api`].
pub struct MessageQueue {
    queues: Arc<dyn QueueStore>,
    gateway: Gateway,
    metrics: SystemMetrics,
    /// Receipt → enqueued_at_ms of deliveries handed out and not yet settled.
    enqueued_at: Mutex<HashMap<String, u64>>,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(Arc::new(MessageQueue::new(context)))
}

/// Queues of this system are created by their first publish, with the interface's defaults.
fn default_config() -> QueueConfig {
    QueueConfig::default()
}

impl MessageQueue {
    pub fn new(context: &Context) -> MessageQueue {
        MessageQueue {
            queues: context.queues.clone(),
            gateway: context.gateway.clone(),
            metrics: SystemMetrics::new(ID),
            enqueued_at: Mutex::new(HashMap::new()),
        }
    }

    /// Runs a call of the queue interface where its backend wants it (`on_backend`); a missing
    /// queue is answered as queue `queue` (its API name) not found.
    async fn run<T, F>(&self, queue: &str, call: impl FnOnce(Arc<dyn QueueStore>) -> F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, QueueError>> + Send + 'static,
    {
        on_backend(self.queues.blocking(), call(self.queues.clone())).await.map_err(|error| queue_error(queue, error))
    }

    /// Publishes to queue `queue` (the engine's name), creating it with the defaults on its
    /// first publish.
    async fn publish(&self, queue: &str, name: String, messages: Vec<tributary_engine::queue::NewMessage>) -> Result<Vec<tributary_engine::queue::MessageId>, ApiError> {
        self.run(queue, move |queues| async move {
            match queues.publish(&name, messages.clone()).await {
                Err(QueueError::NotFound { kind: "queue", .. }) => {
                    match queues.create_queue(&name, default_config()).await {
                        // Two first publishes raced, or a queue made by other means: publish to it.
                        Ok(()) | Err(QueueError::AlreadyExists { .. }) => {}
                        Err(error) => return Err(error),
                    }
                    queues.publish(&name, messages).await
                }
                other => other,
            }
        })
        .await
    }

    /// Count what a handler answered: an error is an error of the system.
    fn counted<T>(&self, result: Result<T, ApiError>) -> Result<T, ApiError> {
        if result.is_err() {
            self.metrics.error();
        }
        result
    }

    /// Remember when the deliveries were enqueued, and count them out.
    fn delivered(&self, deliveries: &[Delivery]) {
        self.metrics.messages_out(deliveries.len() as u64);
        let mut enqueued_at = self.enqueued_at.lock();
        for delivery in deliveries {
            if enqueued_at.len() >= LATENCY_RECEIPTS_MAX {
                enqueued_at.clear();
            }
            enqueued_at.insert(delivery.receipt.to_string(), delivery.enqueued_at_ms);
        }
    }

    /// Forget settled receipts; for acks that took effect, record the end-to-end latency.
    fn settled(&self, receipts: &[Receipt], outcomes: &[ReceiptOutcome], acked: bool) {
        let now_ms = tributary_core::now_ms().max(0) as u64;
        let mut enqueued_at = self.enqueued_at.lock();
        for (receipt, outcome) in receipts.iter().zip(outcomes) {
            let Some(at) = enqueued_at.remove(receipt.as_str()) else { continue };
            if acked && *outcome == ReceiptOutcome::Ok {
                self.metrics.latency(Duration::from_millis(now_ms.saturating_sub(at)));
            }
        }
    }
}

/// A queue call's error as the API answers it: a missing queue is queue `queue` (its API name)
/// not found.
fn queue_error(queue: &str, error: QueueError) -> ApiError {
    match error {
        QueueError::NotFound { kind: "queue", .. } | QueueError::Deleted(_) => process::queue_not_found(queue),
        other => ApiError::from(other),
    }
}

/// Every queue of this system with its stats (API name, stats); queues deleted meanwhile are
/// left out.
async fn all_stats(queues: Arc<dyn QueueStore>) -> Result<Vec<(String, QueueStats)>, QueueError> {
    let mut out = Vec::new();
    for engine_name in queues.list_queues().await? {
        let Some(name) = process::api_queue_name(&engine_name) else { continue };
        match queues.stats(&engine_name).await {
            Ok(stats) => out.push((name.to_string(), stats)),
            Err(QueueError::NotFound { .. } | QueueError::Deleted(_)) => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(out)
}

fn status_json(all: &[(String, QueueStats)]) -> serde_json::Value {
    let queues: Vec<serde_json::Value> = all
        .iter()
        .map(|(name, stats)| {
            let groups: Vec<serde_json::Value> = stats.groups.iter().map(|g| json!({"name": g.name, "lag": g.lag, "in_flight": g.in_flight, "depth": g.depth})).collect();
            json!({
                "name": name,
                "depth": stats.depth,
                "in_flight": stats.in_flight,
                "dead_lettered": stats.dead_lettered,
                "delayed": stats.delayed,
                "lag": stats.lag,
                "groups": groups,
            })
        })
        .collect();
    json!({ "queues": queues })
}

impl System for MessageQueue {
    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        SystemApi { id: ID, prefixes: vec!["/v1/queues"], router: api::router(self) }
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.metrics
    }

    /// Per queue: depth, in flight, dead-lettered, delayed, and lag per group, with the backend.
    /// The embedded engine answers at once; a network backend is asked in place (this worker
    /// blocks for the round trips, as the dashboard's figures are read rarely).
    fn status(&self) -> serde_json::Value {
        let mut value = match tributary_server::wait_in_place(self.queues.blocking(), all_stats(self.queues.clone())) {
            Some(Ok(all)) => status_json(&all),
            Some(Err(error)) => json!({ "queues": [], "error": error.to_string() }),
            None => json!({ "queues": [], "error": "the backend cannot be asked from here" }),
        };
        value["backend"] = self.queues.backend().into();
        value
    }
}
