//! simple-pubsub: topic-based publish/subscribe with wildcard subjects, named durable
//! subscriptions, subscriber groups, a backpressure policy per subscription, and resume from an
//! offset over WebSocket or SSE.
//!
//! ```text
//!  Publishers ──POST /v1/pubsub/publish──▶ Broker API ──append (fsync)──▶ Message log
//!                                            │   │                      (topic pubsub-messages,
//!                                            │   │                       1 partition: one global
//!                                            │   │                       offset sequence)
//!                                            │   └─fan-out in offset order──▶ subject trie ──▶ buffers
//!                                            │                                                  │
//!        PUT /v1/pubsub/subscriptions/{name} ▼                                                  ▼
//!                          Subscription registry (in memory)           Subscribers (WS / SSE)
//!                          persisted in topic pubsub-subscriptions     replay from the log, then live
//!                          (compacted, keyed by name)
//! ```
//!
//! **Publish.** A message is appended to the durable topic `pubsub-messages` (key = subject,
//! value = the JSON data, headers as record headers) and `201 {"offsets":[…]}` is answered only
//! once the append is durable (the topic's class is `always`: fsync, with group commit across
//! concurrent publishers). Then it is fanned out through the engine's [`Broker`] with its log
//! offset. The topic has one partition so that the offset is one global sequence over all
//! subjects: a subscriber resumes from a single number. Fan-out runs strictly in offset order
//! (appends finishing out of order wait for their predecessors) and raises a watermark after each
//! batch; connections read that watermark to know which offsets are complete
//! ([`process::Merge`]).
//!
//! **Subscriptions.** A named subscription (`PUT /v1/pubsub/subscriptions/{name}`) is written to
//! the compacted topic `pubsub-subscriptions` (key = name, JSON spec as value, a tombstone on
//! delete) before the request is answered, so it survives a SIGKILL; it is loaded back into the
//! in-memory registry (the "subscription cache") at start. The engine's cache was not used as the
//! store: it is only snapshotted on a clean close, so a SIGKILL would lose registrations. A
//! registered subscription is live in the broker's trie from registration on, one broker
//! subscription per pattern, whether or not a connection is attached: messages published while
//! no one is attached wait in its buffer (up to `buffer`, then its policy applies), like an MQTT
//! persistent session. A connection attaches to a name (a newer connection to the same name takes
//! over, and the older one is closed with reason `taken_over`), or subscribes ad hoc with
//! `?patterns=a.b,c.>` for as long as it lives.
//!
//! **On a shared log.** With the context's stream interface on NATS JetStream (`tributary up
//! --stream nats://…`), both topics live there and several nodes serve the same subscriptions.
//! Each node runs a tailer thread, its one reader of the log: it reads `pubsub-messages` in
//! offset order from the node's watermark ([`shared_log::follow`]) and fans out to
//! the node's own connections. A second follower reads `pubsub-subscriptions` on its live tail
//! (and a lookup that misses reads it to its end), so registrations and deletions through any
//! node reach all as they are appended. A
//! publish appends and is answered once its node's tailer has passed its offsets. The registry
//! topic is not compacted there (JetStream keeps every record), and what a named subscription
//! buffers while nothing is attached is per node: a client moving to another node resumes from
//! the log with `from_offset` or `Last-Event-ID`.
//!
//! **Delivery guarantee.** Per connection: messages arrive in offset order, each at most once,
//! and — with `?from_offset=N` or SSE's `Last-Event-ID` — every matching message from `N` on,
//! replayed from the log and then live with no gap and no duplicate. Live, what a slow subscriber
//! gets is its policy's choice: `drop_oldest` loses the oldest (counted), `block` holds the
//! publisher up to `BLOCK_TIMEOUT_MS`, `disconnect` closes the connection with reason
//! `slow_consumer`, `catch_up` loses nothing (it reads the log from where it fell behind, then
//! rejoins live).
//!
//! **What it does not do.** No per-message acknowledgements or redelivery (that is a queue);
//! no server-side cursor: a client resumes by naming its last offset. Groups share per pattern
//! (a message matching two patterns of a group may go to two members), and a replay from the
//! log (`from_offset`) gives a group member every matching message, not its share. Retained
//! messages, request/reply and ACLs per subject are not implemented. Every publish wakes every
//! connection to check its buffers (cheap, but linear in connections).

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};
use tributary_core::SubjectPattern;
use tributary_core::limits::{BATCH_BYTES_MAX, BATCH_RECORDS_MAX, SUBSCRIPTIONS_MAX};
use tributary_engine::pubsub::{Broker, DisconnectReason, PubSubError, RecvError, SubscriberOptions, SubscriberState, Subscription};
use tributary_core::{Record, StoredRecord};
use tributary_engine::stream::{Topic, TopicConfig};
use tributary_engine::{Engine, StreamError};
use tributary_runtime::SystemMetrics;
use tributary_server::shared_log::{self, Reader, SharedLog};
use tributary_server::{Gateway, SystemApi};

use crate::{Context, System};
use process::{Merge, Message, Prepared, Registry, SubscriptionSpec};

pub const ID: &str = "simple-pubsub";
/// The durable log every message is appended to (one partition: one offset sequence).
pub const MESSAGES_TOPIC: &str = "pubsub-messages";
/// The compacted topic holding the subscription registry, keyed by subscription name.
pub const REGISTRY_TOPIC: &str = "pubsub-subscriptions";
/// Records read from the log per step of a replay.
pub const REPLAY_CHUNK_RECORDS: usize = 1_000;

type Live = Subscription<Arc<Message>>;

/// A subscription as it lives in memory: its spec, one broker subscription per pattern, and
/// what its connection (if any) has been sent.
pub struct Named {
    pub name: String,
    pub spec: SubscriptionSpec,
    live: Mutex<Vec<Live>>,
    /// Bumped by each attach; a connection whose generation is stale has been taken over.
    generation: AtomicU64,
    attached: AtomicUsize,
    deleted: AtomicBool,
    /// The last offset handed to a connection (`u64::MAX`: none yet).
    last_sent: AtomicU64,
    changed: Notify,
}

/// What draining a subscription's buffers found besides messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct Drained {
    /// A `catch_up` buffer stopped at this offset: fill from the log.
    pub lagging_from: Option<u64>,
    /// A `disconnect` buffer was closed.
    pub closed: Option<DisconnectReason>,
}

impl Named {
    fn options(spec: &SubscriptionSpec) -> SubscriberOptions {
        SubscriberOptions { buffer_messages: spec.buffer_messages(), policy: spec.policy.broker(), group: spec.group.clone() }
    }

    fn subscribe(broker: &Broker<Arc<Message>>, name: String, spec: SubscriptionSpec, patterns: Vec<SubjectPattern>) -> Result<Named, PubSubError> {
        let options = Named::options(&spec);
        let live = patterns.into_iter().map(|p| broker.subscribe(p, options.clone())).collect::<Result<Vec<_>, _>>()?;
        Ok(Named {
            name,
            spec,
            live: Mutex::new(live),
            generation: AtomicU64::new(0),
            attached: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            last_sent: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        })
    }

    pub fn patterns(&self) -> Vec<SubjectPattern> {
        self.live.lock().iter().map(|s| s.pattern().clone()).collect()
    }

    pub fn stats(&self) -> Vec<tributary_engine::pubsub::SubscriberStats> {
        self.live.lock().iter().map(|s| s.stats()).collect()
    }

    pub fn last_sent(&self) -> Option<u64> {
        let v = self.last_sent.load(Ordering::Acquire);
        (v != u64::MAX).then_some(v)
    }

    fn sent(&self, offset: u64) {
        self.last_sent.store(offset, Ordering::Release);
    }

    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire) > 0
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    fn delete(&self) {
        self.deleted.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Move every buffered message into `merge`.
    pub fn drain(&self, merge: &mut Merge) -> Drained {
        let mut drained = Drained::default();
        for sub in self.live.lock().iter() {
            loop {
                match sub.try_recv() {
                    Ok(delivery) => merge.offer(delivery.message),
                    Err(RecvError::Empty | RecvError::Timeout) => break,
                    Err(RecvError::Lagging { resume_from }) => {
                        drained.lagging_from = Some(drained.lagging_from.map_or(resume_from, |o: u64| o.min(resume_from)));
                        break;
                    }
                    Err(RecvError::Disconnected { reason }) => {
                        drained.closed = Some(reason);
                        break;
                    }
                }
            }
        }
        drained
    }

    /// Replace broker subscriptions closed as slow consumers (while no one, or an earlier
    /// connection, was attached) with fresh ones.
    fn revive(&self, broker: &Broker<Arc<Message>>) {
        let mut live = self.live.lock();
        for sub in live.iter_mut() {
            if matches!(sub.stats().state, SubscriberState::Disconnected { .. })
                && let Ok(fresh) = broker.subscribe(sub.pattern().clone(), Named::options(&self.spec))
            {
                *sub = fresh;
            }
        }
    }

    fn resume(&self) {
        for sub in self.live.lock().iter() {
            sub.resume();
        }
    }
}

/// Offsets fanned out so far, and appended batches waiting for their predecessors.
struct Fanout {
    next: u64,
    pending: BTreeMap<u64, Vec<Arc<Message>>>,
}

/// Where the message log and the registry topic live.
enum Log {
    /// The engine's topics, in this process: a publish fans out itself, in offset order.
    Local { messages: Arc<Topic>, registry: Arc<Topic> },
    /// A log every node appends to (NATS JetStream): a publish only appends; each node's tailer
    /// reads the log in order and fans out to its own connections, and follows the registry.
    Shared(SharedLog),
}

impl Log {
    fn produce(&self, topic: &str, records: &[Record]) -> Result<Vec<u64>, StreamError> {
        match self {
            Log::Local { messages, registry } => {
                let topic = if topic == MESSAGES_TOPIC { messages } else { registry };
                let appended = topic.produce_to(0, records)?;
                Ok((appended.base_offset..=appended.last_offset).collect())
            }
            Log::Shared(log) => Ok(log.produce(topic, records.to_vec())?.into_iter().map(|p| p.offset).collect()),
        }
    }

    fn fetch(&self, topic: &str, offset: u64, max: usize) -> Result<Vec<StoredRecord>, StreamError> {
        match self {
            Log::Local { messages, registry } => {
                let topic = if topic == MESSAGES_TOPIC { messages } else { registry };
                topic.fetch(0, offset, max, BATCH_BYTES_MAX)
            }
            Log::Shared(log) => log.fetch(topic, 0, offset, max),
        }
    }

    fn offsets(&self, topic: &str) -> Result<(u64, u64), StreamError> {
        match self {
            Log::Local { messages, registry } => (if topic == MESSAGES_TOPIC { messages } else { registry }).offsets(0),
            Log::Shared(log) => log.offsets(topic, 0),
        }
    }
}

pub struct SimplePubsub {
    engine: Arc<Engine>,
    gateway: Gateway,
    log: Log,
    /// The registry topic's records applied so far.
    registry_next: Mutex<u64>,
    stopping: Arc<AtomicBool>,
    broker: Broker<Arc<Message>>,
    fanout: Mutex<Fanout>,
    /// The fan-out watermark: every offset below it has been offered to every match.
    end: watch::Sender<u64>,
    registry: RwLock<Registry<Arc<Named>>>,
    /// Serializes registry writes so that the topic's order is the memory's order.
    registry_write: Mutex<()>,
    metrics: SystemMetrics,
    published: AtomicU64,
    connections: AtomicUsize,
    next_ad_hoc: AtomicU64,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Broker(#[from] PubSubError),
    #[error("{0}")]
    Invalid(#[from] process::Invalid),
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(SimplePubsub::open(context)?)
}

impl SimplePubsub {
    pub fn open(context: &Context) -> anyhow::Result<Arc<SimplePubsub>> {
        let engine = context.engine.clone();
        let log = if context.streams.blocking() {
            let messages = engine.topics.create(MESSAGES_TOPIC, TopicConfig { partitions: 1, ..TopicConfig::default() })?;
            let registry = engine.topics.create(REGISTRY_TOPIC, TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() })?;
            Log::Local { messages, registry }
        } else {
            let log = SharedLog::current(context.streams.clone());
            // A shared backend keeps every registry record (JetStream does not compact by key).
            for topic in [MESSAGES_TOPIC, REGISTRY_TOPIC] {
                log.create_topic(topic, TopicConfig { partitions: 1, ..TopicConfig::default() })?;
            }
            Log::Shared(log)
        };
        let (_, end) = log.offsets(MESSAGES_TOPIC)?;
        let system = Arc::new(SimplePubsub {
            engine,
            gateway: context.gateway.clone(),
            log,
            registry_next: Mutex::new(0),
            stopping: Arc::new(AtomicBool::new(false)),
            broker: Broker::new(),
            fanout: Mutex::new(Fanout { next: end, pending: BTreeMap::new() }),
            end: watch::Sender::new(end),
            registry: RwLock::new(Registry::new()),
            registry_write: Mutex::new(()),
            metrics: SystemMetrics::new(ID),
            published: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            next_ad_hoc: AtomicU64::new(1),
        });
        system.refresh_registry()?;
        if let Log::Shared(log) = &system.log {
            let mut reader = Reader::new(log, MESSAGES_TOPIC, 0);
            shared_log::follow("pubsub-tail", Arc::downgrade(&system), system.stopping.clone(), move |system: &SimplePubsub| system.tail_once(&mut reader))?;
            let mut reader = Reader::new(log, REGISTRY_TOPIC, 0);
            shared_log::follow("pubsub-registry", Arc::downgrade(&system), system.stopping.clone(), move |system: &SimplePubsub| system.follow_registry(&mut reader))?;
        }
        Ok(system)
    }

    /// Apply the registry topic's records not applied yet, read to its end.
    fn refresh_registry(&self) -> Result<(), RegisterError> {
        let mut next = self.registry_next.lock();
        let (start, end) = self.log.offsets(REGISTRY_TOPIC)?;
        let mut offset = (*next).max(start);
        let mut records = Vec::new();
        while offset < end {
            let read = self.log.fetch(REGISTRY_TOPIC, offset, BATCH_RECORDS_MAX)?;
            let Some(last) = read.last() else { break };
            offset = last.offset + 1;
            records.extend(read);
        }
        self.apply_registry(&mut next, &records)
    }

    /// One step of a shared log's registry follower: what its live tail gave since the last,
    /// applied (registrations and deletions made through other nodes).
    fn follow_registry(&self, reader: &mut Reader) -> Result<(), RegisterError> {
        let from = *self.registry_next.lock();
        let records = reader.read(from, BATCH_RECORDS_MAX)?;
        if records.is_empty() {
            return Ok(());
        }
        self.apply_registry(&mut self.registry_next.lock(), &records)
    }

    /// Apply the registry records at or past `next` in log order, and move `next` past them:
    /// registrations (also other nodes') are subscribed, deletions close what was attached.
    fn apply_registry(&self, next: &mut u64, records: &[StoredRecord]) -> Result<(), RegisterError> {
        let mut changes: Vec<(String, Option<SubscriptionSpec>)> = Vec::new();
        for record in records.iter().filter(|r| r.offset >= *next) {
            match process::decode_registry_record(record) {
                Some(change) => changes.push(change),
                None => tracing::warn!(offset = record.offset, "skipping a registry record that does not decode"),
            }
        }
        if let Some(last) = records.last() {
            *next = (*next).max(last.offset + 1);
        }
        // The last change of each name wins.
        let mut last: std::collections::HashMap<String, Option<SubscriptionSpec>> = std::collections::HashMap::new();
        for (name, spec) in changes {
            last.insert(name, spec);
        }
        for (name, spec) in last {
            match spec {
                None => {
                    if let Some(old) = self.registry.write().remove(&name) {
                        old.delete();
                    }
                }
                Some(spec) => {
                    if self.registry.read().get(&name).is_some_and(|existing| existing.spec == spec) {
                        continue;
                    }
                    let patterns = match spec.validate() {
                        Ok(patterns) => patterns,
                        Err(error) => {
                            tracing::warn!(%name, %error, "skipping a registered subscription that no longer validates");
                            continue;
                        }
                    };
                    let named = Arc::new(Named::subscribe(&self.broker, name.clone(), spec, patterns)?);
                    if let Some(old) = self.registry.write().put(name, named) {
                        old.delete();
                    }
                }
            }
        }
        Ok(())
    }

    /// A registered subscription; on a shared log, one registered through another node since the
    /// last look is found too.
    pub fn lookup(&self, name: &str) -> Result<Option<Arc<Named>>, StreamError> {
        if let Some(named) = self.subscription(name) {
            return Ok(Some(named));
        }
        if matches!(self.log, Log::Shared(..)) {
            // Handed over as a whole: the registry's lock is held across reads of the log.
            tokio::task::block_in_place(|| self.refresh_registry()).map_err(|e| StreamError::Backend { backend: "registry", message: e.to_string() })?;
        }
        Ok(self.subscription(name))
    }

    pub fn broker(&self) -> &Broker<Arc<Message>> {
        &self.broker
    }

    /// The fan-out watermark: the offset the next message will get once fanned out.
    pub fn log_end(&self) -> u64 {
        *self.end.borrow()
    }

    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// Append a validated batch durably and return its offsets, once it is fanned out on this
    /// node. On the engine's own log the publisher fans it out itself; on a shared log it waits
    /// for this node's tailer to pass its offsets, and other nodes' tailers fan it out within
    /// their poll.
    pub fn publish(&self, prepared: Prepared) -> Result<Vec<u64>, StreamError> {
        let count = prepared.records.len();
        let offsets = match self.log.produce(MESSAGES_TOPIC, &prepared.records) {
            Ok(offsets) => offsets,
            Err(error) => {
                self.metrics.error();
                return Err(error);
            }
        };
        assert_eq!(offsets.len(), count, "one offset per record");
        if matches!(self.log, Log::Local { .. }) {
            let base = offsets[0];
            let batch: Vec<Arc<Message>> = prepared
                .messages
                .into_iter()
                .zip(&offsets)
                .map(|(mut m, offset)| {
                    m.offset = *offset;
                    Arc::new(m)
                })
                .collect();
            self.fan_out(base, batch);
        } else {
            // Answered once this node's tailer fanned it out, as on the engine's own log: what
            // the publisher sees next on this node includes what it published. One reader per
            // node: publishers wait for it rather than read the log themselves.
            let last = offsets[count - 1];
            if let Log::Shared(log) = &self.log {
                log.wait_passed(self.end.subscribe(), |end| *end > last).inspect_err(|_| self.metrics.error())?;
            }
        }
        self.metrics.messages_in(count as u64);
        self.published.fetch_add(count as u64, Ordering::Relaxed);
        Ok(offsets)
    }

    /// Offer batches to the broker strictly in offset order, then raise the watermark.
    fn fan_out(&self, base: u64, batch: Vec<Arc<Message>>) {
        let mut fanout = self.fanout.lock();
        fanout.pending.insert(base, batch);
        loop {
            let next = fanout.next;
            let Some(batch) = fanout.pending.remove(&next) else { break };
            for message in &batch {
                self.broker.publish(&message.subject, message.offset, Arc::clone(message));
            }
            fanout.next += batch.len() as u64;
        }
        self.end.send_replace(fanout.next);
    }

    /// Run `f` between two fan-outs and return the watermark at that point: what `f` changed
    /// (a subscribe, a resume) sees every message from the watermark on.
    fn between_fanouts(&self, f: impl FnOnce()) -> u64 {
        let fanout = self.fanout.lock();
        f();
        fanout.next
    }

    /// Persist and subscribe registrations (new or replacing). All are validated first; nothing is
    /// persisted if one is bad. Returns for each whether it was new.
    pub fn register(&self, entries: Vec<(String, SubscriptionSpec)>) -> Result<Vec<bool>, RegisterError> {
        let mut parsed = Vec::with_capacity(entries.len());
        let mut patterns_total = 0;
        for (name, spec) in entries {
            process::check_subscription_name(&name)?;
            let patterns = spec.validate().map_err(|e| process::Invalid::Bad(format!("subscription {name:?}: {e}")))?;
            patterns_total += patterns.len();
            parsed.push((name, spec, patterns));
        }
        if self.broker.subscriptions() + patterns_total > SUBSCRIPTIONS_MAX {
            return Err(PubSubError::TooManySubscriptions { max: SUBSCRIPTIONS_MAX }.into());
        }
        let _write = self.registry_write.lock();
        let records: Vec<_> = parsed.iter().map(|(name, spec, _)| process::registry_record(name, Some(spec))).collect();
        if matches!(self.log, Log::Shared(..)) {
            // The log's order decides between nodes: apply it, this write included.
            self.refresh_registry()?;
            let created: Vec<bool> = parsed.iter().map(|(name, _, _)| self.registry.read().get(name).is_none()).collect();
            for chunk in records.chunks(BATCH_RECORDS_MAX) {
                self.log.produce(REGISTRY_TOPIC, chunk)?;
            }
            self.refresh_registry()?;
            return Ok(created);
        }
        for chunk in records.chunks(BATCH_RECORDS_MAX) {
            self.log.produce(REGISTRY_TOPIC, chunk)?;
        }
        let mut created = Vec::with_capacity(parsed.len());
        for (name, spec, patterns) in parsed {
            if let Some(existing) = self.registry.read().get(&name)
                && existing.spec == spec
            {
                created.push(false);
                continue;
            }
            let named = Arc::new(Named::subscribe(&self.broker, name.clone(), spec, patterns)?);
            let replaced = self.registry.write().put(name, named);
            if let Some(old) = &replaced {
                old.delete();
            }
            created.push(replaced.is_none());
        }
        Ok(created)
    }

    /// Delete a registration durably. `false` if there was none.
    pub fn unregister(&self, name: &str) -> Result<bool, StreamError> {
        let _write = self.registry_write.lock();
        if self.lookup(name)?.is_none() {
            return Ok(false);
        }
        self.log.produce(REGISTRY_TOPIC, &[process::registry_record(name, None)])?;
        if let Some(old) = self.registry.write().remove(name) {
            old.delete();
        }
        Ok(true)
    }

    pub fn subscription(&self, name: &str) -> Option<Arc<Named>> {
        self.registry.read().get(name).cloned()
    }

    pub fn subscriptions_page(&self, after: Option<&str>, limit: usize) -> Vec<Arc<Named>> {
        self.registry.read().page(after, limit).into_iter().map(|(_, n)| Arc::clone(n)).collect()
    }

    pub fn subscriptions_count(&self) -> usize {
        self.registry.read().len()
    }

    /// A subscription that lives as long as one connection (`?patterns=` on the stream routes).
    pub fn ad_hoc(&self, spec: SubscriptionSpec) -> Result<Arc<Named>, RegisterError> {
        let patterns = spec.validate()?;
        let name = format!("ad-hoc-{}", self.next_ad_hoc.fetch_add(1, Ordering::Relaxed));
        let mut named = None;
        let mut result = Ok(());
        // Subscribed between fan-outs so that the connection's start watermark is exact.
        self.between_fanouts(|| match Named::subscribe(&self.broker, name, spec, patterns) {
            Ok(n) => named = Some(n),
            Err(e) => result = Err(e),
        });
        result?;
        Ok(Arc::new(named.expect("subscribed")))
    }

    /// Attach a connection: revive closed buffers and return its generation and the watermark.
    pub fn attach(&self, named: &Named) -> (u64, u64) {
        let generation = named.generation.fetch_add(1, Ordering::AcqRel) + 1;
        named.changed.notify_waiters();
        named.attached.fetch_add(1, Ordering::AcqRel);
        self.connections.fetch_add(1, Ordering::AcqRel);
        let end = self.between_fanouts(|| named.revive(&self.broker));
        (generation, end)
    }

    pub fn detach(&self, named: &Named) {
        named.attached.fetch_sub(1, Ordering::AcqRel);
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    /// Let lagging buffers take live messages again; returns the watermark to replay the log to.
    pub fn resume(&self, named: &Named) -> u64 {
        self.between_fanouts(|| named.resume())
    }

    /// Matching messages of the log in `[from, to)`, at most `REPLAY_CHUNK_RECORDS` records
    /// read; returns them and where to continue.
    pub fn read_log(&self, from: u64, to: u64, patterns: &[SubjectPattern]) -> Result<(Vec<Arc<Message>>, u64), StreamError> {
        let (start, _) = self.log.offsets(MESSAGES_TOPIC)?;
        let from = from.max(start);
        if from >= to {
            return Ok((Vec::new(), to));
        }
        let records = self.log.fetch(MESSAGES_TOPIC, from, REPLAY_CHUNK_RECORDS)?;
        let mut out = Vec::new();
        for record in records.iter().filter(|r| r.offset >= from && r.offset < to) {
            if let Some(message) = process::decode_message(record)
                && process::matches_any(patterns, &message.subject)
            {
                out.push(Arc::new(message));
            }
        }
        // No progress can only mean the log holds nothing more below `to`.
        let next = records.last().map_or(to, |r| r.offset + 1);
        let next = if next <= from { to } else { next.min(to) };
        Ok((out, next))
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl SimplePubsub {
    /// Fan out the shared log's records from the watermark on (one read).
    /// The read happens without the fan-out lock (async workers take it in `between_fanouts`,
    /// and the read needs them to drive the connection); under the lock, anything fanned out
    /// meanwhile is skipped, so no offset is offered twice.
    fn tail_once(&self, reader: &mut Reader) -> Result<(), StreamError> {
        let from = self.fanout.lock().next;
        // After a retention gap the records start above `from`: fan-out goes on from them.
        let records = reader.read(from, REPLAY_CHUNK_RECORDS)?;
        let Some(last) = records.last() else { return Ok(()) };
        let mut fanout = self.fanout.lock();
        for record in records.iter().filter(|r| r.offset >= fanout.next) {
            match process::decode_message(record) {
                Some(message) => {
                    let message = Arc::new(message);
                    self.broker.publish(&message.subject, message.offset, Arc::clone(&message));
                }
                None => tracing::warn!(offset = record.offset, "skipping a pub/sub record that does not decode"),
            }
        }
        fanout.next = fanout.next.max(last.offset + 1);
        self.end.send_replace(fanout.next);
        Ok(())
    }
}

impl System for SimplePubsub {
    /// Stops the tailer of a shared log.
    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        api::router(self)
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.metrics
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "subscriptions": self.subscriptions_count(),
            "broker_subscriptions": self.broker.subscriptions(),
            "connected_subscribers": self.connections.load(Ordering::Relaxed),
            "published_total": self.published.load(Ordering::Relaxed),
            "log_end_offset": self.log_end(),
        })
    }
}
