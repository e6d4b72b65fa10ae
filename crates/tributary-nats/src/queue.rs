//! Tributary's queue interface ([`QueueStore`]) on NATS JetStream.
//!
//! Every node points at the same NATS, so messages, leases, acks and dead letters are held by
//! JetStream and any node may ack what another leased. The mapping:
//!
//! | Tributary | JetStream |
//! |---|---|
//! | a queue's configuration | key `queue.<queue>` of the KV bucket `trib_<namespace>` (JSON) |
//! | a queue's messages | the stream `TRIBQ_<namespace>_<queue>` (file storage), subject `tribq.<namespace>.<queue>.m.<priority>` |
//! | [`MessageId`] `p<priority>-<offset>` | the message's subject level and stream sequence `offset + 1` |
//! | a group | a durable pull consumer `g_<group>` on that stream: explicit acks, `ack_wait` = the queue's `lease_ms_default`, deliver all (a new group sees every message), no server-side delivery limit |
//! | a lease | the consumer's pending message until `ack_wait` |
//! | a [`Receipt`] | the delivery's ack subject (`$JS.ACK.<stream>.<consumer>.<delivered>.<seq>…`), so any node can ack it |
//! | ack / nack with a delay / extend | `+ACK` / `-NAK {"delay":…}` / `+WPI`, each confirmed by the server |
//! | `dedup_id` | the `Nats-Msg-Id` header; the stream's `duplicate_window` is the queue's `dedup_window_ms` |
//! | dead letters | the stream `TRIBQ_<namespace>_<queue>_DLQ`, subject `tribq.<namespace>.<queue>.dlq.<group>`; dead-letter offset `n` is sequence `n + 1` |
//! | a redriven dead letter | the message republished with the header `Tributary-Group: <group>` (other groups ack it unseen) and `Nats-Msg-Id` `tributary.redrive.<dlq offset>`; then the KV key `redriven.<queue>.<dlq offset>` |
//! | stats of a group | the consumer's `num_pending` (depth) and `num_ack_pending` (in flight); dead letters counted per DLQ subject; acked = published − depth − in flight − dead-lettered |
//!
//! **Dead letters.** JetStream's own `max_deliver` drops a message with only an advisory, which a
//! node that is not listening misses. So the consumer has no limit and Tributary moves the
//! message itself: a nack of the last allowed delivery, or a receive that finds a message
//! delivered more often than `deliveries_max` (its last lease expired), first publishes the dead
//! letter (with a `Nats-Msg-Id` naming the group, sequence and count, so a retry does not
//! duplicate it), then terminates the message with `+TERM`. A crash between the two leaves the
//! message to be dead-lettered again by the next receive, deduplicated by that id within the
//! window.
//!
//! Differences from the embedded engine, declared as [`Gap`]s so the conformance suite reports
//! them:
//! - **priority**: one consumer serves all levels in publish order; there is no weighting.
//! - **delay**: JetStream (2.9) has no scheduled delivery; a publish with `delay_ms > 0` is
//!   refused with `InvalidMessage` rather than delivered early.
//! - **lease_per_call**: the lease is the consumer's `ack_wait`, the queue's `lease_ms_default`;
//!   a receive or extend naming another lease is refused with `InvalidMessage`.
//! - **in_flight_limit**: JetStream bounds the leases of a whole group (`max_ack_pending`), not
//!   of one consumer; the per-consumer limit is not enforced.
//! - **stats**: a message nacked with a delay stays in JetStream's ack-pending set until it is
//!   due, so it counts as `in_flight`, not `delayed` (always 0); `oldest_available_age_ms` is not
//!   known (None). Counting reads every group's consumer info: one round trip per group.
//! - **stale_receipt**: nats-server (2.9, seen in the suite) acks by stream sequence, whatever
//!   delivery count the ack subject names, so the receipt of an earlier attempt acks (or nacks)
//!   the redelivery and the outcome is `Ok`, not `Stale`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tributary_core::limits::{BATCH_RECORDS_MAX, QUEUE_PRIORITY_LEVELS, check_name};
use tributary_core::{Header, now_ms};
use tributary_engine::Gap;
use tributary_engine::queue::{
    DeadLetter, Delivery, GroupStats, MessageId, NewMessage, QueueConfig, QueueError, QueueFuture, QueueStats, QueueStore, Receipt, ReceiptOutcome, Redrive, StoredQueueConfig,
    check_lease, check_publish, check_receipts, check_receive,
};

use crate::{Connect, connect_namespace, delete_stream_if_any, delete_streams, escape, over_max_payload, publish_in_order, unescape};

const BACKEND: &str = "nats";

/// Dead letters read in flight during one `dead_letters` call.
const DLQ_READS_IN_FLIGHT_MAX: usize = 64;

/// How long a confirmed ack, nack or extend waits for the server.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest long poll worth a pull request; a shorter wait is a single look.
const PULL_WAIT_MIN: Duration = Duration::from_millis(10);

/// The header of a redriven message naming the only group that receives it.
const GROUP_HEADER: &str = "Tributary-Group";

const GAPS: &[Gap] = &[
    Gap { case: "priority", reason: "one JetStream consumer serves every level in publish order: no weighting by priority" },
    Gap { case: "delay", reason: "JetStream 2.9 has no scheduled delivery: a publish with delay_ms is refused" },
    Gap { case: "lease_per_call", reason: "the lease is the consumer's ack_wait (the queue's lease_ms_default): another lease is refused" },
    Gap { case: "in_flight_limit", reason: "JetStream bounds the leases of a group (max_ack_pending), not of one consumer" },
    Gap { case: "stale_receipt", reason: "nats-server acks by stream sequence, whatever delivery count the ack subject names: an earlier receipt acks the redelivery" },
];

/// How a message travels in a payload.
#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Bytes,
    key: Option<Bytes>,
    headers: Vec<(String, Bytes)>,
    enqueued_at_ms: u64,
}

/// How a dead letter travels in a payload.
#[derive(Serialize, Deserialize)]
struct Letter {
    priority: u8,
    offset: u64,
    group: String,
    delivery_count: u32,
    reason: String,
    message: Envelope,
    dead_lettered_at_ms: u64,
}

impl Letter {
    fn new(id: MessageId, group: &str, delivery_count: u32, reason: &str, message: Envelope) -> Letter {
        Letter { priority: id.priority, offset: id.offset, group: group.to_string(), delivery_count, reason: reason.to_string(), message, dead_lettered_at_ms: now_ms() as u64 }
    }
}

/// What a receipt (an ack subject) says.
struct Parsed {
    stream: String,
    consumer: String,
    delivered: u32,
    sequence: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>` (v1) or the v2
/// form with a domain and an account hash before the stream.
fn parse(receipt: &Receipt) -> Option<Parsed> {
    let tokens: Vec<&str> = receipt.as_str().split('.').collect();
    if tokens.len() < 9 || tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let at = if tokens.len() == 9 { 2 } else { 4 };
    let get = |i: usize| tokens.get(at + i).copied();
    Some(Parsed {
        stream: get(0)?.to_string(),
        consumer: get(1)?.to_string(),
        delivered: get(2)?.parse().ok()?,
        sequence: get(3)?.parse().ok()?,
    })
}

/// The priority level a message subject (`tribq.<namespace>.<queue>.m.<priority>`) names.
fn priority_of(subject: &str) -> u8 {
    subject.rsplit('.').next().and_then(|p| p.parse().ok()).filter(|p| *p < QUEUE_PRIORITY_LEVELS).unwrap_or(0)
}

fn backend(message: impl std::fmt::Display) -> QueueError {
    QueueError::Backend { backend: BACKEND, message: message.to_string() }
}

fn not_found(queue: &str) -> QueueError {
    QueueError::NotFound { kind: "queue", name: queue.to_string() }
}

/// Queues on NATS JetStream. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct NatsQueues {
    jetstream: jetstream::Context,
    meta: kv::Store,
    namespace: String,
    replicas: usize,
    /// Consumer handles by (queue, group): a handle only, the state is the server's.
    consumers: Arc<Mutex<HashMap<(String, String), PullConsumer>>>,
}

impl std::fmt::Debug for NatsQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsQueues").field("namespace", &self.namespace).field("replicas", &self.replicas).finish()
    }
}

impl NatsQueues {
    /// Connects to `url` and keeps everything under `namespace` (`A-Z a-z 0-9 -`), with one
    /// replica per stream.
    pub async fn connect(url: &str, namespace: &str) -> Result<NatsQueues, QueueError> {
        NatsQueues::connect_with_replicas(url, namespace, 1).await
    }

    /// As [`NatsQueues::connect`], with `replicas` copies of every stream (a NATS cluster of at
    /// least that many servers).
    pub async fn connect_with_replicas(url: &str, namespace: &str, replicas: usize) -> Result<NatsQueues, QueueError> {
        let (jetstream, meta) = connect_namespace(url, namespace, replicas).await.map_err(|e| match e {
            Connect::Invalid(message) => QueueError::InvalidConfig(message),
            Connect::Backend(message) => backend(message),
        })?;
        Ok(NatsQueues { jetstream, meta, namespace: namespace.to_string(), replicas, consumers: Default::default() })
    }

    /// Deletes every queue stream of the namespace and its KV bucket (tests and tear-down).
    pub async fn delete_namespace(&self) -> Result<(), QueueError> {
        delete_streams(&self.jetstream, &self.namespace, &format!("TRIBQ_{}_", self.namespace)).await.map_err(backend)
    }

    fn stream_name(&self, queue: &str) -> String {
        format!("TRIBQ_{}_{}", self.namespace, escape(queue))
    }

    fn dlq_name(&self, queue: &str) -> String {
        format!("TRIBQ_{}_{}_DLQ", self.namespace, escape(queue))
    }

    fn subject(&self, queue: &str, priority: u8) -> String {
        format!("tribq.{}.{}.m.{priority}", self.namespace, escape(queue))
    }

    /// Every priority level's subject of a queue.
    fn messages_filter(&self, queue: &str) -> String {
        format!("tribq.{}.{}.m.*", self.namespace, escape(queue))
    }

    /// The dead letters of one group.
    fn dlq_subject(&self, queue: &str, group: &str) -> String {
        format!("tribq.{}.{}.dlq.{}", self.namespace, escape(queue), escape(group))
    }

    /// The dead letters of every group.
    fn dlq_filter(&self, queue: &str) -> String {
        format!("tribq.{}.{}.dlq.*", self.namespace, escape(queue))
    }

    fn redriven_prefix(queue: &str) -> String {
        format!("redriven.{}.", escape(queue))
    }

    fn redriven_key(queue: &str, dlq_offset: u64) -> String {
        format!("{}{dlq_offset}", NatsQueues::redriven_prefix(queue))
    }

    /// Whether dead letter `dlq_offset` of `queue` was redriven.
    async fn is_redriven(&self, queue: &str, dlq_offset: u64) -> Result<bool, QueueError> {
        Ok(self.meta.get(NatsQueues::redriven_key(queue, dlq_offset)).await.map_err(backend)?.is_some())
    }

    fn consumer_name(group: &str) -> String {
        format!("g_{}", escape(group))
    }

    fn queue_key(queue: &str) -> String {
        format!("queue.{}", escape(queue))
    }

    async fn config(&self, queue: &str) -> Result<QueueConfig, QueueError> {
        match self.meta.get(NatsQueues::queue_key(queue)).await.map_err(backend)? {
            Some(bytes) if !bytes.is_empty() => {
                let stored: StoredQueueConfig = serde_json::from_slice(&bytes).map_err(|e| backend(format!("queue {queue:?} has a configuration that does not parse: {e}")))?;
                QueueConfig::try_from(stored).map_err(|e| backend(format!("queue {queue:?} has a configuration that does not parse: {e}")))
            }
            _ => Err(not_found(queue)),
        }
    }

    /// The group's consumer, created on first use.
    async fn consumer(&self, queue: &str, group: &str, config: &QueueConfig) -> Result<PullConsumer, QueueError> {
        let key = (queue.to_string(), group.to_string());
        if let Some(consumer) = self.consumers.lock().get(&key) {
            return Ok(consumer.clone());
        }
        let stream = self.jetstream.get_stream(self.stream_name(queue)).await.map_err(|e| backend(format!("the stream of queue {queue:?}: {e}")))?;
        let name = NatsQueues::consumer_name(group);
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    // The group's own name, for stats (the consumer's name is escaped).
                    description: Some(group.to_string()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_millis(config.lease_ms_default),
                    deliver_policy: DeliverPolicy::All,
                    max_deliver: -1,
                    max_ack_pending: -1,
                    filter_subject: self.messages_filter(queue),
                    num_replicas: self.replicas,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| backend(format!("group {group:?} of queue {queue:?}: {e}")))?;
        self.consumers.lock().insert(key, consumer.clone());
        Ok(consumer)
    }

    fn forget_consumers(&self, queue: &str) {
        self.consumers.lock().retain(|(q, _), _| q != queue);
    }

    /// Up to `max` messages available now, or after waiting up to `wait` for the first.
    async fn pull(consumer: &PullConsumer, max: usize, wait: Duration) -> Result<Vec<jetstream::Message>, QueueError> {
        let mut got: Vec<jetstream::Message> = consumer.fetch().max_messages(max).messages().await.map_err(backend)?.try_collect().await.map_err(backend)?;
        if got.is_empty() && wait >= PULL_WAIT_MIN {
            // One long poll for the first message, then what else is there at once.
            got = consumer.batch().max_messages(1).expires(wait).messages().await.map_err(backend)?.try_collect().await.map_err(backend)?;
            if !got.is_empty() && max > 1 {
                let more: Vec<jetstream::Message> = consumer.fetch().max_messages(max - 1).messages().await.map_err(backend)?.try_collect().await.map_err(backend)?;
                got.extend(more);
            }
        }
        Ok(got)
    }

    /// Sends `payload` to an ack subject and waits for the server's confirmation.
    async fn confirm(&self, reply: &str, payload: Bytes) -> Result<(), QueueError> {
        let client = self.jetstream.client();
        let request = client.request(reply.to_string(), payload);
        match tokio::time::timeout(ACK_TIMEOUT, request).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(backend(format!("acknowledging {reply}: {e}"))),
            Err(_) => Err(backend(format!("acknowledging {reply}: no answer within {ACK_TIMEOUT:?}"))),
        }
    }

    /// Publishes a dead letter (deduplicated by group, sequence and count), then terminates the
    /// message so the group never sees it again.
    async fn dead_letter(&self, queue: &str, reply: &str, letter: Letter) -> Result<(), QueueError> {
        let payload = postcard::to_allocvec(&letter).map_err(backend)?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{}.{}.{}", escape(&letter.group), letter.offset, letter.delivery_count).as_str());
        let id = MessageId { priority: letter.priority, offset: letter.offset };
        let subject = self.dlq_subject(queue, &letter.group);
        let ack = self.jetstream.publish_with_headers(subject, headers, payload.into()).await.map_err(backend)?;
        ack.await.map_err(|e| backend(format!("dead-lettering {id} of queue {queue:?}: {e}")))?;
        self.confirm(reply, Bytes::from_static(b"+TERM")).await
    }

    /// The receipts that belong to this queue and group, checked; the others are `Invalid`.
    fn sort_receipts(&self, queue: &str, group: &str, receipts: &[Receipt]) -> Vec<Option<Parsed>> {
        let stream = self.stream_name(queue);
        let consumer = NatsQueues::consumer_name(group);
        receipts.iter().map(|r| parse(r).filter(|p| p.stream == stream && p.consumer == consumer)).collect()
    }

    /// Sends `kind` for every valid receipt, pipelined; `Invalid` for the others.
    async fn settle(&self, queue: &str, group: &str, receipts: &[Receipt], kind: impl Fn(&Parsed) -> Bytes) -> Result<Vec<ReceiptOutcome>, QueueError> {
        let parsed = self.sort_receipts(queue, group, receipts);
        let sends = receipts.iter().zip(&parsed).map(|(receipt, parsed)| {
            let payload = parsed.as_ref().map(&kind);
            async move {
                match payload {
                    Some(payload) => self.confirm(receipt.as_str(), payload).await.map(|_| ReceiptOutcome::Ok),
                    None => Ok(ReceiptOutcome::Invalid),
                }
            }
        });
        futures_util::future::try_join_all(sends).await
    }
}

impl NatsQueues {
    /// Publishes `messages` (checked), pipelined, for every group or, with `only`, for that
    /// group alone; one id per message, in order, once JetStream stored them.
    async fn publish_for(&self, queue: &str, config: &QueueConfig, messages: Vec<NewMessage>, only: Option<&str>) -> Result<Vec<MessageId>, QueueError> {
        let stamp = now_ms() as u64;
        let mut sends = Vec::with_capacity(messages.len());
        let mut priorities = Vec::with_capacity(messages.len());
        for message in messages {
            let mut headers = HeaderMap::new();
            if let Some(dedup_id) = &message.dedup_id
                && config.dedup_window_ms > 0
            {
                headers.insert("Nats-Msg-Id", dedup_id.as_str());
            }
            if let Some(group) = only {
                headers.insert(GROUP_HEADER, group);
            }
            let envelope = Envelope { body: message.body, key: message.key, headers: message.headers.into_iter().map(|h| (h.name, h.value)).collect(), enqueued_at_ms: stamp };
            let payload = postcard::to_allocvec(&envelope).map_err(backend)?;
            sends.push((self.subject(queue, message.priority), headers, Bytes::from(payload)));
            priorities.push(message.priority);
        }
        if let Some((_, size, max)) = over_max_payload(&self.jetstream, &sends) {
            return Err(QueueError::LimitExceeded { limit: "max_payload (of the NATS server, for a message in its envelope)", max: max as u64, got: size as u64 });
        }
        let acks = publish_in_order(&self.jetstream, sends).await.map_err(|e| backend(format!("publishing to queue {queue:?}: {e}")))?;
        Ok(priorities.into_iter().zip(acks).map(|(priority, ack)| MessageId { priority, offset: ack.sequence - 1 }).collect())
    }

    /// Removes the redriven marks of a queue (its dead letters are gone with it).
    async fn forget_redriven(&self, queue: &str) -> Result<(), QueueError> {
        let subject = format!("{}{}>", self.meta.prefix, NatsQueues::redriven_prefix(queue));
        self.meta.stream.purge().filter(subject).await.map_err(|e| backend(format!("forgetting the redriven marks of queue {queue:?}: {e}")))?;
        Ok(())
    }

    /// Dead letters of `queue` from dead-letter offset `from` on, at most `max`, of one group or
    /// all, with whether each was redriven.
    async fn read_dead_letters(&self, queue: &str, group: Option<&str>, from: u64, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut stream = self.jetstream.get_stream(self.dlq_name(queue)).await.map_err(|e| backend(format!("the dead letters of queue {queue:?}: {e}")))?;
        let state = stream.info().await.map_err(backend)?.state.clone();
        let end = state.last_sequence;
        let mut offset = from.max(state.first_sequence.saturating_sub(1));
        let mut letters = Vec::new();
        let stream = &stream;
        let wanted = group.map(|g| self.dlq_subject(queue, g));
        while letters.len() < max && offset < end {
            let chunk = (end - offset).min(DLQ_READS_IN_FLIGHT_MAX as u64);
            let read: Vec<Option<DeadLetter>> = futures_util::stream::iter(offset..offset + chunk)
                .map(|o| {
                    let wanted = wanted.as_deref();
                    async move {
                        let message = stream.direct_get(o + 1).await.map_err(|e| backend(format!("reading dead letter {o} of queue {queue:?}: {e}")))?;
                        if wanted.is_some_and(|w| w != message.subject.as_str()) {
                            return Ok(None);
                        }
                        let letter: Letter = postcard::from_bytes(&message.payload).map_err(|e| backend(format!("dead letter {o} of queue {queue:?} does not parse: {e}")))?;
                        let redriven = self.is_redriven(queue, o).await?;
                        Ok::<_, QueueError>(Some(DeadLetter {
                            dlq_offset: o,
                            id: MessageId { priority: letter.priority, offset: letter.offset },
                            group: letter.group,
                            delivery_count: letter.delivery_count,
                            reason: letter.reason,
                            body: letter.message.body,
                            key: letter.message.key,
                            headers: letter.message.headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
                            enqueued_at_ms: letter.message.enqueued_at_ms,
                            dead_lettered_at_ms: letter.dead_lettered_at_ms,
                            redriven,
                        }))
                    }
                })
                .buffered(DLQ_READS_IN_FLIGHT_MAX)
                .try_collect()
                .await?;
            offset += chunk;
            letters.extend(read.into_iter().flatten().take(max - letters.len()));
        }
        Ok(letters)
    }
}

fn decode_message(payload: &[u8], what: &str) -> Result<Envelope, QueueError> {
    postcard::from_bytes(payload).map_err(|e| backend(format!("{what} is not a Tributary message: {e}")))
}

impl QueueStore for NatsQueues {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn gaps(&self) -> &'static [Gap] {
        GAPS
    }

    fn create_queue<'a>(&'a self, name: &'a str, config: QueueConfig) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            check_name("queue", name).map_err(QueueError::InvalidName)?;
            config.validate()?;
            let text = serde_json::to_vec(&StoredQueueConfig::from(&config)).expect("a queue config serializes");
            if let Err(e) = self.meta.create(NatsQueues::queue_key(name), Bytes::from(text)).await {
                if e.kind() != kv::CreateErrorKind::AlreadyExists {
                    return Err(backend(e));
                }
                if self.config(name).await? != config {
                    return Err(QueueError::AlreadyExists { kind: "queue", name: name.to_string() });
                }
            }
            let window = Duration::from_millis(config.dedup_window_ms.max(1));
            for (stream, subject, what) in [(self.stream_name(name), self.messages_filter(name), "stream"), (self.dlq_name(name), self.dlq_filter(name), "dead letters")] {
                let config = stream::Config {
                    name: stream,
                    subjects: vec![subject],
                    storage: stream::StorageType::File,
                    num_replicas: self.replicas,
                    allow_direct: true,
                    duplicate_window: window,
                    ..Default::default()
                };
                crate::ensure_stream(&self.jetstream, config).await.map_err(|e| backend(format!("creating the {what} of queue {name:?}: {e}")))?;
            }
            Ok(())
        })
    }

    fn delete_queue<'a>(&'a self, name: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            self.config(name).await?;
            self.forget_consumers(name);
            for stream in [self.stream_name(name), self.dlq_name(name)] {
                delete_stream_if_any(&self.jetstream, &stream).await.map_err(backend)?;
            }
            self.forget_redriven(name).await?;
            self.meta.delete(NatsQueues::queue_key(name)).await.map_err(backend)
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, messages: Vec<NewMessage>) -> QueueFuture<'a, Vec<MessageId>> {
        Box::pin(async move {
            check_publish(&messages)?;
            if let Some(delayed) = messages.iter().find(|m| m.delay_ms > 0) {
                return Err(QueueError::InvalidMessage(format!("the nats backend has no delayed delivery (delay_ms {})", delayed.delay_ms)));
            }
            let config = self.config(queue).await?;
            self.publish_for(queue, &config, messages, None).await
        })
    }

    fn receive<'a>(&'a self, queue: &'a str, group: &'a str, consumer: &'a str, max: usize, lease_ms: Option<u64>, wait: Duration) -> QueueFuture<'a, Vec<Delivery>> {
        Box::pin(async move {
            let config = self.config(queue).await?;
            let lease = lease_ms.unwrap_or(config.lease_ms_default);
            check_receive(consumer, max, lease, wait)?;
            check_name("group", group).map_err(QueueError::InvalidName)?;
            if lease != config.lease_ms_default {
                return Err(QueueError::InvalidMessage(format!("the nats backend leases for the queue's lease_ms_default ({} ms), not {lease} ms", config.lease_ms_default)));
            }
            if max == 0 {
                return Ok(Vec::new());
            }
            let handle = self.consumer(queue, group, &config).await?;
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let pulled = match NatsQueues::pull(&handle, max, left).await {
                    Ok(pulled) => pulled,
                    Err(e) => {
                        // The consumer may be gone with its queue (deleted by another node).
                        self.forget_consumers(queue);
                        self.config(queue).await?;
                        return Err(e);
                    }
                };
                let mut deliveries = Vec::with_capacity(pulled.len());
                for message in pulled {
                    let info = message.info().map_err(backend)?;
                    let id = MessageId {
                        priority: priority_of(message.subject.as_str()),
                        offset: info.stream_sequence - 1,
                    };
                    let delivered = u32::try_from(info.delivered).unwrap_or(u32::MAX);
                    let reply = message.reply.as_ref().map(|r| r.to_string()).ok_or_else(|| backend("a pulled message has no ack subject"))?;
                    if let Some(only) = message.headers.as_ref().and_then(|h| h.get(GROUP_HEADER))
                        && only.as_str() != group
                    {
                        // Redriven for another group: settled here unseen.
                        self.confirm(&reply, Bytes::from_static(b"+ACK")).await?;
                        continue;
                    }
                    let envelope = decode_message(&message.payload, &format!("message {id} of queue {queue:?}"))?;
                    if delivered > config.deliveries_max {
                        // Its last allowed lease expired.
                        let letter = Letter::new(id, group, delivered - 1, "lease expired on the last allowed delivery", envelope);
                        self.dead_letter(queue, &reply, letter).await?;
                        continue;
                    }
                    deliveries.push(Delivery {
                        id,
                        receipt: Receipt::from(reply),
                        body: envelope.body,
                        key: envelope.key,
                        headers: envelope.headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
                        priority: id.priority,
                        delivery_count: delivered,
                        enqueued_at_ms: envelope.enqueued_at_ms,
                    });
                }
                if !deliveries.is_empty() || tokio::time::Instant::now() >= deadline {
                    return Ok(deliveries);
                }
            }
        })
    }

    fn ack<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>) -> QueueFuture<'a, Vec<ReceiptOutcome>> {
        Box::pin(async move {
            check_receipts(&receipts)?;
            self.config(queue).await?;
            self.settle(queue, group, &receipts, |_| Bytes::from_static(b"+ACK")).await
        })
    }

    fn nack<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>, delay_ms: Option<u64>) -> QueueFuture<'a, Vec<ReceiptOutcome>> {
        Box::pin(async move {
            check_receipts(&receipts)?;
            if let Some(delay) = delay_ms
                && delay > tributary_core::limits::QUEUE_DELAY_MS_MAX
            {
                return Err(QueueError::LimitExceeded { limit: "QUEUE_DELAY_MS_MAX", max: tributary_core::limits::QUEUE_DELAY_MS_MAX, got: delay });
            }
            let config = self.config(queue).await?;
            let parsed = self.sort_receipts(queue, group, &receipts);
            let config = &config;
            // Pipelined: every receipt's answer is awaited, in parallel.
            let sends = receipts.iter().zip(parsed).map(|(receipt, parsed)| async move {
                let Some(parsed) = parsed else { return Ok(ReceiptOutcome::Invalid) };
                if parsed.delivered >= config.deliveries_max {
                    // The last allowed delivery: dead-letter it instead of giving it back.
                    let stream = self.jetstream.get_stream(self.stream_name(queue)).await.map_err(backend)?;
                    let stored = stream.direct_get(parsed.sequence).await.map_err(|e| backend(format!("reading message {} of queue {queue:?}: {e}", parsed.sequence - 1)))?;
                    let priority = priority_of(stored.subject.as_str());
                    let envelope = decode_message(&stored.payload, &format!("message {} of queue {queue:?}", parsed.sequence - 1))?;
                    let id = MessageId { priority, offset: parsed.sequence - 1 };
                    let letter = Letter::new(id, group, parsed.delivered, "nacked on the last allowed delivery", envelope);
                    self.dead_letter(queue, receipt.as_str(), letter).await?;
                    return Ok(ReceiptOutcome::Ok);
                }
                let delay = delay_ms.unwrap_or_else(|| config.backoff.delay_ms(parsed.delivered, parsed.sequence));
                let payload = if delay == 0 { Bytes::from_static(b"-NAK") } else { Bytes::from(format!("-NAK {{\"delay\":{}}}", u128::from(delay) * 1_000_000)) };
                self.confirm(receipt.as_str(), payload).await.map(|_| ReceiptOutcome::Ok)
            });
            futures_util::future::try_join_all(sends).await
        })
    }

    fn extend<'a>(&'a self, queue: &'a str, group: &'a str, receipts: Vec<Receipt>, lease_ms: u64) -> QueueFuture<'a, Vec<ReceiptOutcome>> {
        Box::pin(async move {
            check_receipts(&receipts)?;
            check_lease(lease_ms)?;
            let config = self.config(queue).await?;
            if lease_ms != config.lease_ms_default {
                return Err(QueueError::InvalidMessage(format!("the nats backend extends by the queue's lease_ms_default ({} ms), not {lease_ms} ms", config.lease_ms_default)));
            }
            self.settle(queue, group, &receipts, |_| Bytes::from_static(b"+WPI")).await
        })
    }

    fn dead_letters<'a>(&'a self, queue: &'a str, group: Option<&'a str>, from: u64, max: usize) -> QueueFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            self.config(queue).await?;
            self.read_dead_letters(queue, group, from, max).await
        })
    }

    fn list_queues(&self) -> QueueFuture<'_, Vec<String>> {
        Box::pin(async move {
            let keys: Vec<String> = self.meta.keys().await.map_err(backend)?.try_collect().await.map_err(backend)?;
            let mut names: Vec<String> = keys.iter().filter_map(|k| k.strip_prefix("queue.")).map(unescape).collect();
            names.sort();
            Ok(names)
        })
    }

    fn queue_config<'a>(&'a self, name: &'a str) -> QueueFuture<'a, QueueConfig> {
        Box::pin(async move { self.config(name).await })
    }

    fn redrive<'a>(&'a self, queue: &'a str, group: &'a str, which: Redrive) -> QueueFuture<'a, usize> {
        Box::pin(async move {
            let config = self.config(queue).await?;
            check_name("group", group).map_err(QueueError::InvalidName)?;
            let wanted: Option<Vec<MessageId>> = match which {
                Redrive::All => None,
                Redrive::Ids(ids) => Some(ids),
            };
            let letters: Vec<DeadLetter> = self
                .read_dead_letters(queue, Some(group), 0, usize::MAX)
                .await?
                .into_iter()
                .filter(|l| !l.redriven && wanted.as_ref().is_none_or(|w| w.contains(&l.id)))
                .collect();
            for chunk in letters.chunks(BATCH_RECORDS_MAX) {
                // Republished first, marked after (see `DeadLetter::redriven`).
                let messages: Vec<NewMessage> = chunk.iter().map(DeadLetter::redriven).collect();
                check_publish(&messages)?;
                self.publish_for(queue, &config, messages, Some(group)).await?;
                for letter in chunk {
                    self.meta.put(NatsQueues::redriven_key(queue, letter.dlq_offset), Bytes::from_static(b"1")).await.map_err(backend)?;
                }
            }
            Ok(letters.len())
        })
    }

    fn stats<'a>(&'a self, queue: &'a str) -> QueueFuture<'a, QueueStats> {
        Box::pin(async move {
            self.config(queue).await?;
            let mut stream = self.jetstream.get_stream(self.stream_name(queue)).await.map_err(|e| backend(format!("the stream of queue {queue:?}: {e}")))?;
            let published_total = stream.info().await.map_err(backend)?.state.last_sequence;
            let dlq = self.jetstream.get_stream(self.dlq_name(queue)).await.map_err(|e| backend(format!("the dead letters of queue {queue:?}: {e}")))?;
            let mut per_subject = dlq.info_with_subjects(self.dlq_filter(queue)).await.map_err(backend)?;
            let mut dead: HashMap<String, u64> = HashMap::new();
            while let Some((subject, count)) = per_subject.try_next().await.map_err(backend)? {
                dead.insert(subject, count as u64);
            }
            let consumers: Vec<jetstream::consumer::Info> = stream.consumers().try_collect().await.map_err(backend)?;
            let mut groups = Vec::with_capacity(consumers.len());
            for info in consumers {
                let Some(name) = info.config.description.clone().or_else(|| info.name.strip_prefix("g_").map(unescape)) else { continue };
                let dead_lettered = dead.get(&self.dlq_subject(queue, &name)).copied().unwrap_or(0);
                let (depth, in_flight) = (info.num_pending, info.num_ack_pending as u64);
                groups.push(GroupStats {
                    name,
                    depth,
                    delayed: 0,
                    in_flight,
                    lag: depth + in_flight,
                    acked_total: published_total.saturating_sub(depth + in_flight + dead_lettered),
                    dead_lettered,
                    oldest_available_age_ms: None,
                });
            }
            groups.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(QueueStats::summed(published_total, groups))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use tributary_engine::queue::Receipt;

    #[test]
    fn ack_subjects_of_both_forms_parse() {
        let v1 = parse(&Receipt::from("$JS.ACK.TRIBQ_ns_q.g_w.3.42.40.1700000000000000000.0".to_string())).unwrap();
        assert_eq!((v1.stream.as_str(), v1.consumer.as_str(), v1.delivered, v1.sequence), ("TRIBQ_ns_q", "g_w", 3, 42));
        let v2 = parse(&Receipt::from("$JS.ACK.hub.ACCHASH.TRIBQ_ns_q.g_w.1.7.7.1700000000000000000.0.tok".to_string())).unwrap();
        assert_eq!((v2.stream.as_str(), v2.delivered, v2.sequence), ("TRIBQ_ns_q", 1, 7));
        assert!(parse(&Receipt::from("p0-1".to_string())).is_none());
    }
}
