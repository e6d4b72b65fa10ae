//! realtime-notifications: push notifications to connected users over WebSocket (SSE as the
//! fallback), by topic, batched per connection, with exact recovery of what a reconnecting
//! client missed, and presence of who is connected.
//!
//! ```text
//!  Publishers ──POST /v1/notifications/publish──▶ Notification API ──append (fsync)──▶ Notification log
//!                                                     │                              (topic `notifications`,
//!                                                     │                               key = topic)
//!                                                     └─fan-out per partition in offset order
//!                                                        via the topic → connections index
//!                                                               │
//!                                                               ▼
//!                                          one small queue per connection (≤ CONNECTION_PENDING_MAX)
//!                                                               │  frames of ≤ batch_max / FRAME_BYTES_MAX
//!                                                               ▼
//!  Users ◀── WebSocket /v1/notifications/ws  ·  SSE /v1/notifications/events ── gateway (limits, heartbeats)
//!                     │
//!                     └─▶ Presence (who is connected, per topic; across nodes in the shared cache)
//! ```
//!
//! **Publish.** Each notification is appended to the durable topic `notifications` (key = its
//! topic, so one topic's notifications stay in order in one partition; value = its JSON data)
//! and `201 {"positions":[{"partition","offset"}]}` is answered only once every record is durable
//! (the topic's class is `always`: fsync with group commit). Then each partition's batch is fanned
//! out strictly in offset order (appends that finish out of order wait for their predecessors)
//! through an in-memory index from topic to connections; the partition's watermark is raised
//! after each batch. A publish answered with an error may have been appended on some
//! partitions (each partition is one batch; there is no cross-partition transaction), so a retry
//! may deliver those twice; after a failed append every connection catches up from the log, so a
//! failure never leaves a gap.
//!
//! **Topics.** A connection names its topics (`?topics=a,b`, at most `TOPICS_PER_CONNECTION_MAX`)
//! and is always subscribed to its user's personal topic `user.<id>`, which no other user may
//! subscribe to: publishing to `user.alice` reaches every connection of alice.
//!
//! **Resume token.** A connection's position is one offset per partition: below it, every
//! notification of its topics was delivered; at or above it, none was. The `connected` message
//! and every frame carry the position as an opaque token (`e<epoch>-<o0>.<o1>…`; over SSE it is
//! the event `id`, so a browser's `EventSource` resumes with `Last-Event-ID` on its own).
//! Reconnecting with the token (`?token=` or `Last-Event-ID`) replays from the durable log exactly
//! the notifications of the connection's topics at or above the position, up to the watermark
//! taken when the connection registered in the index, then goes live from that watermark: no
//! gap, no duplicate, also across restarts (the log is the history; nothing is kept only in
//! memory). A token older than retention is refused with `410 resume_token_expired`, a token of
//! another log (the data folder was reset; the epoch differs) with `410 resume_token_unknown`;
//! neither is ever answered with a silent partial recovery.
//!
//! **Why a log and a small queue per connection.** A connection that falls behind (its queue
//! reaches `CONNECTION_PENDING_MAX`, e.g. a slow network) does not grow memory and loses nothing:
//! its queue is dropped and it catches up from the log from its position, exactly like a
//! reconnect, then rejoins live. So a connection costs its index entries and an empty queue while
//! idle, which is what lets one node hold many of them.
//!
//! **Batching.** A connection sends what is pending in frames of at most `batch_max`
//! notifications (default `FRAME_NOTIFICATIONS_DEFAULT`, up to `FRAME_NOTIFICATIONS_MAX`) and
//! `FRAME_BYTES_MAX` bytes. Batching is adaptive: what piled up while the previous frame was being
//! written goes in the next one, so a busy connection sends fewer, larger frames and an idle one
//! gets each notification at once. `linger_ms` (up to `LINGER_MS_MAX`) trades latency for fuller
//! frames.
//!
//! **On a shared log.** With the context's stream interface on NATS JetStream (`tributary up
//! --stream nats://…`), the log and the epoch live there and several nodes serve the same
//! notifications: a publish through any node reaches the connections of every node, and a
//! token issued by one node resumes on another. A publish only appends; each node's follower
//! ([`shared_log::follow`]) reads every partition in offset order from the node's watermark and
//! fans out to the node's own connections, and the publish is answered once its node's
//! follower has passed its offsets. Notifications published together may then reach a
//! connection in more than one frame (the follower offers what it has read so far).
//!
//! **Presence.** Each connection joins tributary-server's [`Presence`] registry for its (non
//! personal) topics: `GET /v1/notifications/presence/{topic}` lists who is connected with how many
//! connections, `GET /v1/notifications/users/{user}` says whether a user is online, and a
//! connection opened with `presence=true` receives join/leave events of its topics. With a
//! cache the nodes share (`tributary up --cache redis://…`), the counts are every node's (each
//! node writes its own to Redis, renewed while it lives), and so are the events: a user's first
//! connection on any node is their join, their last one gone from every node their leave.
//!
//! **Identity.** A connection names its user with `?user=` or the `Tributary-User` header. The
//! platform's API tokens (Bearer, or `?access_token=` for browsers) guard who may connect at all;
//! with tokens off (loopback) the user id is taken as given. Per-user signed tokens (Centrifugo's
//! JWT connection tokens) are not implemented: behind tokens, the caller vouches for the id.
//!
//! **Delivery guarantee.** Per connection and partition, in offset order, each notification at
//! most once; with a resume token, exactly the ones missed. Across partitions there is no order
//! (a topic lives in one partition, so per topic there is).
//!
//! **What it does not do.** No subscribe/unsubscribe on an open connection (reconnect with the
//! new topic list and the token); no wildcard topics; no client receipts; no compression.
//! Without a shared cache, presence is per node: a node lists only its own connections.

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tributary_core::Record;
use tributary_core::limits::BATCH_BYTES_MAX;
use tributary_core::StoredRecord;
use tributary_engine::stream::{Topic, TopicConfig};
use tributary_engine::{Engine, StreamError};
use tributary_runtime::SystemMetrics;
use tributary_server::shared_log::{self, Reader, SharedLog};
use tributary_server::{Gateway, Presence, SystemApi};

use crate::{Context, System};
use process::{Pending, Token};

pub const ID: &str = "realtime-notifications";
/// The durable log of every notification.
pub const NOTIFICATIONS_TOPIC: &str = "notifications";
/// A compacted topic holding the log's epoch (the resume tokens' namespace).
pub const META_TOPIC: &str = "notifications-meta";
/// Partitions of the notification log, unless configured otherwise. One: on one disk under
/// `always`, every partition's append is an `fdatasync` of its own, while one partition shares
/// one sync among all concurrent publishes (group commit); at 20,000 notifications/s on a loaded
/// machine, 4 partitions gave an end-to-end p50 of 7.9 s, one partition 0.87 s (docs/benchmarks.md).
/// Tokens carry a position per partition,
/// so a log with more partitions (another backend, another durability class) needs no new format.
pub const PARTITIONS_DEFAULT: u32 = 1;
/// How long notifications stay replayable, unless configured otherwise (24 hours).
pub const RETENTION_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Notifications queued for one connection before it stops taking live ones and catches up from
/// the log instead.
pub const CONNECTION_PENDING_MAX: usize = 1024;
/// Records read from the log per step of a replay.
pub const REPLAY_CHUNK_RECORDS: usize = 1_000;

/// How the notification log is laid out and kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationsConfig {
    pub partitions: u32,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig { partitions: PARTITIONS_DEFAULT, retention_ms: Some(RETENTION_MS_DEFAULT), retention_bytes: None, segment_bytes: tributary_log::SEGMENT_BYTES_DEFAULT }
    }
}

/// One notification on its way to connections.
pub struct Notification {
    pub pending: Pending,
    pub topic: Arc<str>,
    pub accepted: Instant,
}

/// One connection as the fan-out sees it: a bounded queue and a wake-up.
pub struct Connection {
    pub id: u64,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Arc<Notification>>,
    /// The queue overflowed and was dropped: the connection must catch up from the log.
    overflowed: bool,
}

impl Connection {
    fn new(id: u64) -> Connection {
        Connection { id, queue: Mutex::new(Queue::default()), wake: Notify::new() }
    }

    /// Queue a notification; `true` if this push overflowed the queue. The caller wakes the
    /// connection once its whole fan-out is done.
    fn push(&self, notification: &Arc<Notification>) -> bool {
        let mut queue = self.queue.lock();
        if queue.overflowed {
            return false;
        }
        if queue.items.len() >= CONNECTION_PENDING_MAX {
            queue.overflowed = true;
            queue.items = VecDeque::new();
            return true;
        }
        queue.items.push_back(Arc::clone(notification));
        false
    }

    /// Take what is queued below `watermark` (batches whose fan-out is complete; the rest stays
    /// for the wake-up that follows their completion); `true` if the queue overflowed instead.
    fn take(&self, watermark: &[u64]) -> (Vec<Arc<Notification>>, bool) {
        let mut queue = self.queue.lock();
        if queue.overflowed {
            return (Vec::new(), true);
        }
        let complete = |n: &Arc<Notification>| n.pending.offset < watermark[n.pending.partition as usize];
        if queue.items.iter().all(complete) {
            return (std::mem::take(&mut queue.items).into(), false);
        }
        let mut taken = Vec::new();
        let mut kept = VecDeque::new();
        for notification in std::mem::take(&mut queue.items) {
            if complete(&notification) { taken.push(notification) } else { kept.push_back(notification) }
        }
        queue.items = kept;
        (taken, false)
    }

    /// Resolves when something was queued (or the queue overflowed).
    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

/// Fan-out state: per partition, the next offset to fan out and the appended batches waiting for
/// their predecessors; and the index from topic to connections.
struct State {
    next: Vec<u64>,
    waiting: Vec<BTreeMap<u64, Vec<Arc<Notification>>>>,
    index: HashMap<Arc<str>, HashMap<u64, Arc<Connection>>>,
}

impl State {
    /// Queue each notification for the connections of its topic; collects the connections to
    /// wake (once each, in `touched`) and counts overflows.
    fn offer(&self, batch: &[Arc<Notification>], touched: &mut HashSet<u64>, wake: &mut Vec<Arc<Connection>>, overflows: &AtomicU64) {
        for notification in batch {
            if let Some(connections) = self.index.get(&notification.topic) {
                for connection in connections.values() {
                    if connection.push(notification) {
                        overflows.fetch_add(1, Ordering::Relaxed);
                    }
                    if touched.insert(connection.id) {
                        wake.push(connection.clone());
                    }
                }
            }
        }
    }
}

/// Where the notification log lives.
enum Log {
    /// The engine's topic in this process: a publish appends (group commit) and fans out itself.
    Local(Arc<Topic>),
    /// A log every node appends to (NATS JetStream): a publish only appends; the node's follower
    /// reads every partition in offset order and fans out to the node's own connections.
    Shared(SharedLog),
}

impl Log {
    fn fetch(&self, partition: u32, offset: u64) -> Result<Vec<StoredRecord>, StreamError> {
        match self {
            Log::Local(topic) => topic.fetch(partition, offset, REPLAY_CHUNK_RECORDS, BATCH_BYTES_MAX),
            Log::Shared(log) => log.fetch(NOTIFICATIONS_TOPIC, partition, offset, REPLAY_CHUNK_RECORDS),
        }
    }

    fn offsets(&self, partition: u32) -> Result<(u64, u64), StreamError> {
        match self {
            Log::Local(topic) => topic.offsets(partition),
            Log::Shared(log) => log.offsets(NOTIFICATIONS_TOPIC, partition),
        }
    }
}

pub struct Notifications {
    engine: Arc<Engine>,
    gateway: Gateway,
    presence: Presence,
    log: Log,
    partitions: u32,
    epoch: u64,
    state: Mutex<State>,
    /// Per partition: every offset below it has been offered to every matching connection.
    watermark: Vec<AtomicU64>,
    /// Bumped after the follower of a shared log raised a watermark (publishers wait on it).
    followed: tokio::sync::watch::Sender<u64>,
    stopping: Arc<AtomicBool>,
    metrics: SystemMetrics,
    next_connection: AtomicU64,
    connections: AtomicUsize,
    published: AtomicU64,
    delivered: AtomicU64,
    replayed: AtomicU64,
    overflows: AtomicU64,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(Notifications::open(context, NotificationsConfig::default())?)
}

impl Notifications {
    pub fn open(context: &Context, config: NotificationsConfig) -> anyhow::Result<Arc<Notifications>> {
        let engine = context.engine.clone();
        let topic_config =
            TopicConfig { partitions: config.partitions, retention_ms: config.retention_ms, retention_bytes: config.retention_bytes, segment_bytes: config.segment_bytes, ..TopicConfig::default() };
        let (log, partitions, epoch) = if context.streams.blocking() {
            let log = engine.topics.create(NOTIFICATIONS_TOPIC, topic_config)?;
            let meta = engine.topics.create(META_TOPIC, TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() })?;
            let epoch = load_or_make_epoch(meta.offsets(0)?.0, |offset| meta.fetch(0, offset, 1_000, BATCH_BYTES_MAX), |record| meta.produce_to(0, &[record]).map(drop))?;
            let partitions = log.partition_count();
            (Log::Local(log), partitions, epoch)
        } else {
            let log = SharedLog::current(context.streams.clone());
            log.create_topic(NOTIFICATIONS_TOPIC, topic_config)?;
            // JetStream does not compact by key: every node reads the first epoch record.
            log.create_topic(META_TOPIC, TopicConfig { partitions: 1, ..TopicConfig::default() })?;
            let epoch = load_or_make_epoch(log.offsets(META_TOPIC, 0)?.0, |offset| log.fetch(META_TOPIC, 0, offset, 1_000), |record| log.produce(META_TOPIC, vec![record]).map(drop))?;
            let partitions = log.partitions(NOTIFICATIONS_TOPIC)?;
            (Log::Shared(log), partitions, epoch)
        };
        let mut next = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            next.push(log.offsets(p)?.1);
        }
        let system = Notifications {
            engine,
            gateway: context.gateway.clone(),
            presence: context.presence(ID),
            log,
            partitions,
            epoch,
            watermark: next.iter().map(|&n| AtomicU64::new(n)).collect(),
            followed: tokio::sync::watch::Sender::new(0),
            stopping: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(State { next, waiting: vec![BTreeMap::new(); partitions as usize], index: HashMap::new() }),
            metrics: SystemMetrics::new(ID),
            next_connection: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        };
        let system = Arc::new(system);
        if let Log::Shared(log) = &system.log {
            let mut readers: Vec<Reader> = (0..partitions).map(|p| Reader::new(log, NOTIFICATIONS_TOPIC, p)).collect();
            shared_log::follow("notifications-follow", Arc::downgrade(&system), system.stopping.clone(), move |system: &Notifications| system.follow_once(&mut readers))?;
        }
        Ok(system)
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Per partition, the first offset the log holds and its end.
    pub fn log_bounds(&self) -> Result<(Vec<u64>, Vec<u64>), StreamError> {
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        for p in 0..self.partitions() {
            let (start, end) = self.log.offsets(p)?;
            starts.push(start);
            ends.push(end);
        }
        Ok((starts, ends))
    }

    /// The fan-out watermark of every partition.
    pub fn watermark(&self) -> Vec<u64> {
        self.watermark.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    pub fn token(&self, positions: Vec<u64>) -> Token {
        Token { epoch: self.epoch, positions }
    }

    /// Append validated records durably, fan them out, and return where each landed.
    ///
    /// Records go to their topic's partition, one batch per partition, all partitions written
    /// in parallel (each waits for its own sync). If a partition fails, the others' batches are
    /// still fanned out, the failed partition is resynchronised ([`Notifications::skip_to_log`])
    /// and the error is returned: the publish may have been partly appended, and a retry may
    /// deliver the appended part twice. On a shared log the records are appended and the call
    /// returns once this node's follower has fanned them out.
    pub fn publish(&self, mut records: Vec<Record>) -> Result<Vec<(u32, u64)>, StreamError> {
        let Log::Local(log) = &self.log else { return self.publish_shared(records) };
        let now_ms = tributary_core::now_ms();
        let accepted = Instant::now();
        for record in &mut records {
            record.timestamp_ms = now_ms;
        }
        let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, record) in records.iter().enumerate() {
            by_partition.entry(log.partition_for(record.key.as_deref(), 0)).or_default().push(i);
        }
        let mut appends = Vec::with_capacity(by_partition.len());
        for (&partition, indexes) in &by_partition {
            let batch: Vec<Record> = if indexes.len() == records.len() { std::mem::take(&mut records) } else { indexes.iter().map(|&i| records[i].clone()).collect() };
            let pending = log.log(partition).and_then(|log| log.append_pending(&batch, 0, 0).map_err(StreamError::Log));
            appends.push((partition, batch, pending));
        }
        let mut positions = vec![(0u32, 0u64); by_partition.values().map(Vec::len).sum()];
        let mut batches: BTreeMap<u32, Vec<Arc<Notification>>> = BTreeMap::new();
        let mut failure = None;
        for ((partition, batch, pending), indexes) in appends.into_iter().zip(by_partition.values()) {
            let appended = match pending.and_then(|p| p.wait().map_err(StreamError::Log)) {
                Ok(appended) => appended,
                Err(error) => {
                    failure.get_or_insert(error);
                    self.skip_to_log(partition);
                    continue;
                }
            };
            let mut notifications = Vec::with_capacity(batch.len());
            for (n, (record, &i)) in batch.iter().zip(indexes).enumerate() {
                let offset = appended.base_offset + n as u64;
                positions[i] = (partition, offset);
                let topic = std::str::from_utf8(record.key.as_deref().unwrap_or_default()).expect("topics are ASCII");
                let data = record.value.as_deref().unwrap_or(b"null");
                let json = process::notification_json(topic, partition, offset, now_ms, data);
                let pending = Pending { partition, offset, json: Arc::from(json) };
                notifications.push(Arc::new(Notification { pending, topic: Arc::from(topic), accepted }));
            }
            batches.insert(partition, notifications);
        }
        let count = batches.values().map(Vec::len).sum::<usize>() as u64;
        self.fan_out(batches);
        self.metrics.messages_in(count);
        self.published.fetch_add(count, Ordering::Relaxed);
        match failure {
            Some(error) => {
                self.metrics.error();
                Err(error)
            }
            None => Ok(positions),
        }
    }

    /// Append to the shared log, then wait until this node's follower has fanned every record
    /// out (so what the publisher sees next on this node includes what it published).
    fn publish_shared(&self, records: Vec<Record>) -> Result<Vec<(u32, u64)>, StreamError> {
        let Log::Shared(log) = &self.log else { unreachable!("called on a shared log") };
        let count = records.len() as u64;
        let produced = log.produce(NOTIFICATIONS_TOPIC, records).inspect_err(|_| self.metrics.error())?;
        let positions: Vec<(u32, u64)> = produced.into_iter().map(|p| (p.partition, p.offset)).collect();
        let passed = |_: &u64| positions.iter().all(|&(p, offset)| self.watermark[p as usize].load(Ordering::Acquire) > offset);
        log.wait_passed(self.followed.subscribe(), passed).inspect_err(|_| self.metrics.error())?;
        self.metrics.messages_in(count);
        self.published.fetch_add(count, Ordering::Relaxed);
        Ok(positions)
    }

    /// One step of a shared log's follower: read each partition from its fan-out position and
    /// offer what is there to the index. The read happens without the state lock (connections
    /// take it to register); under the lock, what was fanned out meanwhile is skipped, so no
    /// offset is offered twice.
    fn follow_once(&self, readers: &mut [Reader]) -> Result<(), StreamError> {
        let mut found = false;
        for (partition, reader) in (0..self.partitions).zip(readers) {
            let p = partition as usize;
            let from = self.state.lock().next[p];
            let records = reader.read(from, REPLAY_CHUNK_RECORDS)?;
            let Some(last) = records.last().map(|r| r.offset) else { continue };
            found = true;
            if let Some(first) = records.first().filter(|first| first.offset > from) {
                // Retention removed what this node had not fanned out: its connections go to the
                // log, where each catches up or is told its position was removed.
                self.skip_to(partition, first.offset);
            }
            let (now, now_ms) = (Instant::now(), tributary_core::now_ms());
            let batch: Vec<Arc<Notification>> = records.iter().filter_map(|record| notification_of(partition, record, now, now_ms)).collect();
            let (mut touched, mut wake) = (HashSet::new(), Vec::new());
            let mut state = self.state.lock();
            let next = state.next[p];
            let fresh = batch.iter().position(|n| n.pending.offset >= next).unwrap_or(batch.len());
            state.offer(&batch[fresh..], &mut touched, &mut wake, &self.overflows);
            state.next[p] = next.max(last + 1);
            self.watermark[p].store(state.next[p], Ordering::Release);
            drop(state);
            for connection in wake {
                connection.wake.notify_one();
            }
        }
        if found {
            self.followed.send_modify(|rounds| *rounds += 1);
        }
        Ok(())
    }

    /// Offer each partition's batches to the index strictly in offset order, then raise its
    /// watermark.
    fn fan_out(&self, batches: BTreeMap<u32, Vec<Arc<Notification>>>) {
        let mut touched = HashSet::new();
        let mut wake = Vec::new();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        for (partition, batch) in batches {
            let p = partition as usize;
            let base = batch[0].pending.offset;
            if base < state.next[p] {
                // Skipped over after a failed append: connections read it from the log.
                continue;
            }
            state.waiting[p].insert(base, batch);
            while let Some(batch) = state.waiting[p].remove(&state.next[p]) {
                state.offer(&batch, &mut touched, &mut wake, &self.overflows);
                state.next[p] = batch.last().expect("batches are not empty").pending.offset + 1;
            }
            self.watermark[p].store(state.next[p], Ordering::Release);
        }
        drop(guard);
        // After the watermarks: a woken connection takes whole batches (notifications published
        // together go out in one frame).
        for connection in wake {
            connection.wake.notify_one();
        }
    }

    /// After a failed append to `partition`, what the log holds there may never be fanned out
    /// live. Move the partition's fan-out to the log's end and send every connection to the
    /// log (as after an overflow): each catches up exactly from its own position.
    fn skip_to_log(&self, partition: u32) {
        let Ok((_, end)) = self.log.offsets(partition) else { return };
        self.skip_to(partition, end);
    }

    /// Move the partition's fan-out on to `end` (what lies below it is not offered live) and send
    /// every connection to the log from its own position: it catches up exactly, or is told
    /// that its position was removed by retention.
    fn skip_to(&self, partition: u32, end: u64) {
        let p = partition as usize;
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if end > state.next[p] {
            state.next[p] = end;
            let next = state.next[p];
            state.waiting[p].retain(|&base, _| base >= next);
            while let Some(batch) = state.waiting[p].remove(&state.next[p]) {
                state.next[p] = batch.last().expect("batches are not empty").pending.offset + 1;
            }
            self.watermark[p].store(state.next[p], Ordering::Release);
        }
        let mut seen = HashSet::new();
        for connection in state.index.values().flat_map(|c| c.values()) {
            if seen.insert(connection.id) {
                let mut queue = connection.queue.lock();
                queue.overflowed = true;
                queue.items = VecDeque::new();
                drop(queue);
                connection.wake.notify_one();
            }
        }
    }

    /// Put a new connection into the index for `topics`; returns the watermark at that instant:
    /// everything from it on will be queued for the connection, nothing below it will.
    pub fn register(&self, topics: &[String]) -> (Arc<Connection>, Vec<u64>) {
        let connection = Arc::new(Connection::new(self.next_connection.fetch_add(1, Ordering::Relaxed)));
        let mut state = self.state.lock();
        for topic in topics {
            let key: Arc<str> = match state.index.get_key_value(topic.as_str()) {
                Some((key, _)) => key.clone(),
                None => Arc::from(topic.as_str()),
            };
            state.index.entry(key).or_default().insert(connection.id, connection.clone());
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        (connection, state.next.clone())
    }

    pub fn unregister(&self, connection: &Connection, topics: &[String]) {
        let mut state = self.state.lock();
        for topic in topics {
            if let Some(connections) = state.index.get_mut(topic.as_str()) {
                connections.remove(&connection.id);
                if connections.is_empty() {
                    state.index.remove(topic.as_str());
                }
            }
        }
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// After an overflow: let the connection take live notifications again; returns the
    /// watermark to catch up to from the log.
    pub fn resync(&self, connection: &Connection) -> Vec<u64> {
        let state = self.state.lock();
        let mut queue = connection.queue.lock();
        queue.items = VecDeque::new();
        queue.overflowed = false;
        state.next.clone()
    }

    /// The notifications of `topics` in `[from, to)` of `partition`, reading at most
    /// `REPLAY_CHUNK_RECORDS` records; returns them and where to continue.
    pub fn read_log(&self, partition: u32, from: u64, to: u64, topics: &HashSet<String>) -> Result<(Vec<Pending>, u64), StreamError> {
        if from >= to {
            return Ok((Vec::new(), to));
        }
        let records = self.log.fetch(partition, from)?;
        let mut out = Vec::new();
        for record in records.iter().filter(|r| r.offset >= from && r.offset < to) {
            if let Some(topic) = topic_of(record)
                && topics.contains(topic)
            {
                out.push(pending_of(partition, topic, record));
            }
        }
        let next = records.last().map_or(to, |r| r.offset + 1);
        let next = if next <= from { to } else { next.min(to) };
        Ok((out, next))
    }

    fn count_delivered(&self, n: u64, replayed: bool) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        if replayed {
            self.replayed.fetch_add(n, Ordering::Relaxed);
        }
        self.metrics.messages_out(n);
    }

    /// Live connections of this system.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// The notification of a record read from the log, stamped as accepted when the record was.
fn notification_of(partition: u32, record: &StoredRecord, now: Instant, now_ms: i64) -> Option<Arc<Notification>> {
    let Some(topic) = topic_of(record) else {
        tracing::warn!(partition, offset = record.offset, "skipping a notification record without a topic");
        return None;
    };
    Some(Arc::new(Notification { pending: pending_of(partition, topic, record), topic: Arc::from(topic), accepted: shared_log::accepted_at(record, now, now_ms) }))
}

/// A record's topic: its key.
fn topic_of(record: &StoredRecord) -> Option<&str> {
    record.key.as_deref().and_then(|k| std::str::from_utf8(k).ok())
}

/// A record of the log as it goes on the wire, the same live and replayed.
fn pending_of(partition: u32, topic: &str, record: &StoredRecord) -> Pending {
    let data = record.value.as_deref().unwrap_or(b"null");
    let json = process::notification_json(topic, partition, record.offset, record.timestamp_ms, data);
    Pending { partition, offset: record.offset, json: Arc::from(json) }
}

/// The log's epoch: the first `epoch` record of the meta topic (read in pages by `fetch` from
/// `start`), or made up and stored durably on first start. Nodes sharing a log that start
/// together may both store one; the first stored is everyone's.
fn load_or_make_epoch(start: u64, fetch: impl Fn(u64) -> Result<Vec<StoredRecord>, StreamError>, store: impl FnOnce(Record) -> Result<(), StreamError>) -> anyhow::Result<u64> {
    let first = || -> Result<Option<u64>, StreamError> {
        let mut offset = start;
        loop {
            let records = fetch(offset)?;
            let Some(last) = records.last() else { return Ok(None) };
            offset = last.offset + 1;
            for record in records.iter().filter(|r| r.key.as_deref() == Some(b"epoch")) {
                if let Some(value) = record.value.as_deref().and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| u64::from_str_radix(v, 16).ok()) {
                    return Ok(Some(value));
                }
            }
        }
    };
    if let Some(epoch) = first()? {
        return Ok(epoch);
    }
    // 48 bits keep the token short; the epoch only has to differ between resets of one log.
    let epoch = (tributary_core::unique_u64() >> 16).max(1);
    store(Record::keyed(Bytes::from_static(b"epoch"), format!("{epoch:x}")))?;
    Ok(first()?.unwrap_or(epoch))
}

impl System for Notifications {
    /// Stops the follower of a shared log.
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
        let presence = self.presence.stats();
        serde_json::json!({
            "connections": self.connections(),
            "users_online": presence.users,
            "topics_with_connections": presence.scopes,
            "published_total": self.published.load(Ordering::Relaxed),
            "delivered_total": self.delivered.load(Ordering::Relaxed),
            "replayed_total": self.replayed.load(Ordering::Relaxed),
            "queue_overflows_total": self.overflows.load(Ordering::Relaxed),
            "watermark": self.watermark(),
        })
    }
}
