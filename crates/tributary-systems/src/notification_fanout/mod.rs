//! notification-fanout: one notification, many recipients, four channels, as a user of Novu or
//! Airbnb's notification platform expects it. A trigger names a category, users and topics (groups
//! of users) and the content; it is durable before the answer (202). Expander workers turn it into
//! one delivery per recipient and channel (email, push, SMS, in-app), applying each subscriber's
//! preferences (per channel, per category, a `critical` override) and quiet hours, batching
//! deliveries of one category into digests, and put each on its channel's own engine queue.
//! Channel workers send: push and SMS to HTTP providers (several per channel, in priority order,
//! with failover, per-channel and per-provider token buckets, retries with backoff and a circuit
//! breaker), email through the email-queue-system's HTTP API, in-app into a durable inbox per
//! user with live push over WebSocket or SSE. Every delivery's state is an event on a log:
//! queryable per notification and per recipient, with the history of its attempts.
//!
//! ```text
//!  Apps ──POST /v1/fanout/notifications──▶ Trigger API ──append (fsync)──▶ fanout-notifications (4 partitions)
//!        (202 once durable; idempotency key)                                        │ one expander per partition,
//!                                                                                   │ chunks of EXPANSION_CHUNK recipients
//!  subscribers, topics (compacted logs, in memory) ──▶ preferences · quiet hours · digests
//!                                                                                   │
//!                         fanout-events ◀── queued / deferred / batched / skipped ──┤
//!                         (delivery states) ◀──── retrying / delivered / failed ──┐ │
//!                               │                                                  │ ▼
//!   GET …/notifications/{id} ◀──┤        ┌─ queue fanout.push ──▶ push workers ─┬─▶ provider 1 ─(5xx/timeout)─▶ provider 2
//!   GET …/deliveries/{id}    ◀──┘        ├─ queue fanout.sms  ──▶ sms workers  ─┘   (token buckets per channel and provider,
//!                                        │                                           circuit breaker, backoff)
//!                                        ├─ queue fanout.email ─▶ email workers ──POST /v1/email/messages──▶ email-queue-system
//!                                        └─ queue fanout.in_app ▶ inbox workers ──▶ fanout-inbox (compacted) ──▶ WebSocket / SSE
//! ```
//!
//! # Routes
//!
//! | route | what |
//! |---|---|
//! | `PUT`/`GET`/`DELETE /v1/fanout/subscribers/{id}` | a subscriber: contacts, timezone, preferences, quiet hours |
//! | `PUT /v1/fanout/topics/{topic}/members`, `GET /v1/fanout/topics/{topic}` | topic membership (`{"add":[…],"remove":[…]}`) |
//! | `POST /v1/fanout/notifications` | trigger 1..`NOTIFICATIONS_PER_REQUEST_MAX` notifications; 202 once durable |
//! | `GET /v1/fanout/notifications/{id}` | the notification, its deliveries' counts by status, a page of deliveries |
//! | `GET /v1/fanout/deliveries/{id}` | one delivery's state and the history of its attempts |
//! | `GET /v1/fanout/inbox/{user}`, `POST …/read` | the in-app inbox, unread count, mark read |
//! | `GET /v1/fanout/inbox/{user}/ws`, `…/events` | the inbox live (WebSocket; SSE as the fallback) |
//! | `GET`/`PUT /v1/fanout/config` | providers, rates, retries, circuit breaker, email leg, categories (persisted) |
//! | `GET /v1/fanout` | queue depths and counters |
//!
//! **Trigger.** Each notification is appended to `fanout-notifications` (key = its id, spread over
//! `EXPANDERS` partitions); the 202 follows the fsync. An idempotency key seen before answers the
//! first notification's id with `duplicate: true` and sends nothing again (keys are held for the
//! log's retention).
//!
//! **Expansion.** One expander per partition reads the log from its committed offset. Recipients
//! (the users named, then each topic's members in id order from a cursor) are taken in chunks of
//! `EXPANSION_CHUNK`, so a topic of a million members never sits in memory as one batch. For each
//! recipient and channel, [`process::decide`] applies contacts, opt-outs and quiet hours; a
//! category with a digest window batches deliveries (below). The chunk's delivery states are
//! appended to `fanout-events` (fsync), then the jobs are published to the channel queues (with
//! the delivery id as the queue's dedup id and, for quiet hours and digests, a delay); the offset
//! is committed once the notification is fully expanded. A crash in between expands it again:
//! deliveries already on the events log are not made twice, and those still `queued` are
//! published again under the same dedup id.
//!
//! **Digests.** With `categories.<name>.digest_window_ms`, the first delivery of that category to
//! a user on a channel opens a digest and waits in its queue until the window's end; the ones that
//! follow within the window are `batched` into it (no queue message of their own), up to
//! `DIGEST_ITEMS_MAX`. At the window's end one delivery carries every batched notification; each
//! batched delivery then reads `delivered` (or `failed`) too. Critical notifications are never
//! batched.
//!
//! **Sending.** Each channel's workers lease batches from its queue. A channel token bucket
//! (`channel_rates`) parks what exceeds its rate in the queue until its reserved slot (not an
//! attempt). Push and SMS go to the channel's providers in priority order: a JSON POST signed like
//! a webhook (`X-Tributary-Signature`), within `provider_timeout_ms`. 2xx: delivered. 4xx (but 408
//! and 429): the provider refuses this recipient, the delivery fails. 5xx, 408, 429, a timeout or
//! a connection error: the next provider is tried at once (failover). A provider out of tokens of
//! its own bucket is passed over; if every provider is, the delivery is parked. A provider that
//! failed `circuit.failures` times in a row is skipped for `circuit.cooldown_ms` (then tried again;
//! one more failure skips it again). When every provider failed, the delivery is retried after
//! `base_ms × 2^(attempt−1)` (capped at `max_ms`), `retry.attempts` times in all, then `failed`.
//! Email: one POST per batch to `{email.base_url}/v1/email/messages` (the email system's public
//! API; by default this node's, `EMAIL_BASE_URL_DEFAULT`); the email's id is kept in the delivery
//! (follow it at `/v1/email/messages/{id}`). In-app: the item is appended to the user's inbox
//! (compacted log `fanout-inbox`, key `user/delivery`), then sent to the user's live connections.
//!
//! # Delivery guarantee
//!
//! At least once per recipient and channel: an acknowledged trigger is expanded and every
//! delivery is sent until taken, failed or out of attempts, also across crashes (every state is
//! durable before the queue message is acked). A crash after a provider took a delivery but
//! before its state was written sends it again. Deliveries are deduplicated by id (dedup id in
//! the queues, and a worker drops a job whose delivery is already final), so a redelivery after a
//! crash is the only duplicate.
//!
//! # What it does not do
//!
//! - Subscribers, topic memberships and inboxes are held in memory (rebuilt from their compacted
//!   logs at start): at most `SUBSCRIBERS_MAX` subscribers, not the seed's 500M users on one node.
//!   The delivery status index is in memory as well (`DELIVERY_INDEX_ENTRIES_MAX`, then 503).
//! - A topic's members are read chunk by chunk: a member added or removed during a long expansion
//!   may or may not get that notification.
//! - Quiet hours hold email, push and SMS, not in-app (the inbox is silent by nature).
//! - Providers speak one generic JSON shape over `http://` (no FCM/APNs/Twilio adapters, no TLS
//!   client in this build). No per-user rate limits, no delay or throttle steps of a workflow, no
//!   templates (the trigger carries title, body and data).
//! - The circuit breaker and token buckets are per node and in memory (full after a restart).
//! - The email leg counts as delivered when the email system accepted the email; its own status
//!   (delivered, bounced) is at its API under the stored email id.
//! - Per-user signed tokens for the inbox connections are not implemented: behind API tokens, the
//!   caller vouches for the user id (as in realtime-notifications).

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde_json::json;
use tokio::sync::broadcast;
use tributary_core::Record;
use tributary_core::limits::{BATCH_BYTES_MAX, BATCH_RECORDS_MAX, MESSAGE_BYTES_MAX, QUEUE_DELAY_MS_MAX};
use tributary_engine::queue::{Delivery, NewMessage, QUEUE_DEDUP_WINDOW_MS_MAX, QUEUE_DELIVERIES_MAX_MAX, Queue, QueueConfig, QueueError, Receipt};
use tributary_engine::stream::{Topic, TopicConfig};
use tributary_engine::{Engine, StreamError};
use tributary_runtime::SystemMetrics;
use tributary_runtime::shaping::TokenBuckets;
use tributary_server::webhook::WebhookError;
use tributary_server::{ApiError, Gateway, SystemApi, blocking};

use crate::{Context, System};
use process::{Attempt, Channel, Content, DeliveryState, FanoutConfig, InboxItem, Job, Notification, Status, Subscriber, Verdict};

pub const ID: &str = "notification-fanout";
/// Accepted notifications (key = id).
pub const NOTIFICATIONS_TOPIC: &str = "fanout-notifications";
/// Every state of every delivery (key = delivery id, value = the whole state).
pub const EVENTS_TOPIC: &str = "fanout-events";
/// Subscribers (compacted, key = user id).
pub const SUBSCRIBERS_TOPIC: &str = "fanout-subscribers";
/// Topic memberships (compacted, key = `topic/user`).
pub const MEMBERS_TOPIC: &str = "fanout-topic-members";
/// In-app inboxes (compacted, key = `user/delivery id`).
pub const INBOX_TOPIC: &str = "fanout-inbox";
/// The configuration (compacted, one key).
pub const CONFIG_TOPIC: &str = "fanout-config";
/// The stream consumer group of the expanders.
pub const EXPANDER_GROUP: &str = "fanout-expanders";
/// The queue group of each channel's workers.
pub const SENDER_GROUP: &str = "senders";
/// Partitions of the notifications log, one expander each.
pub const EXPANDERS: u32 = 4;
/// Workers per channel queue.
pub const WORKERS_PER_CHANNEL: usize = 4;
/// Deliveries one worker leases at once.
pub const WORKER_BATCH_MAX: usize = 100;
/// A worker's batch is leased for this long plus the provider timeout for each provider of its
/// channel and one more (the batch's calls run at once, the providers of one delivery one after
/// the other): short, so that a batch held by a crashed node comes back soon.
pub const WORKER_LEASE_MARGIN_MS: u64 = 5_000;
/// How long one receive (or one read of the notifications log) waits.
pub const WORKER_WAIT: Duration = Duration::from_millis(250);
/// Notifications an expander reads at once (committed together).
pub const EXPANDER_READ_MAX: usize = 500;
/// Deliveries written and queued together during an expansion.
pub const EXPANSION_CHUNK: usize = 1_000;
/// Furthest ahead a throttled delivery reserves a slot of its channel's bucket.
pub const THROTTLE_HORIZON_MS: u64 = 60_000;
/// How long notifications (and their idempotency keys) and delivery states are kept.
pub const RETENTION_MS: u64 = 3 * 24 * 60 * 60 * 1_000;
/// Deliveries the status index holds at most; past it, triggers are refused (503).
pub const DELIVERY_INDEX_ENTRIES_MAX: usize = 20_000_000;
/// Items one user's inbox keeps (the oldest leave).
pub const INBOX_ITEMS_MAX: usize = 500;
/// Items one inbox page (and a live connection's first message) lists at most.
pub const INBOX_PAGE_MAX: usize = 100;
/// Messages buffered towards one user's live connections; a connection that falls further behind
/// gets the inbox again.
pub const INBOX_LIVE_BUFFER: usize = 256;

const CONFIG_KEY: &str = "config";

/// Counters shown by `GET /v1/fanout` and the dashboard.
#[derive(Default)]
struct Counts {
    triggered: AtomicU64,
    duplicates: AtomicU64,
    expanded: AtomicU64,
    skipped: AtomicU64,
    deferred: AtomicU64,
    batched: AtomicU64,
    delivered: [AtomicU64; 4],
    failed: [AtomicU64; 4],
    retried: AtomicU64,
    throttled: AtomicU64,
    failovers: AtomicU64,
    circuit_opened: AtomicU64,
}

/// Where a delivery's latest state is, and what it says.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    offset: u64,
    status: Status,
}

/// A provider's circuit breaker.
#[derive(Debug, Default, Clone, Copy)]
struct Circuit {
    failures: u32,
    open_until_ms: u64,
}

/// Open digests: (user, category, channel) → (first delivery's id, window end), and the
/// deliveries batched into each digest.
#[derive(Default)]
struct Digests {
    open: HashMap<(String, String, Channel), (String, u64)>,
    members: HashMap<String, Vec<String>>,
}

/// The running system.
pub struct Fanout {
    engine: Arc<Engine>,
    gateway: Gateway,
    metrics: SystemMetrics,
    notifications: Arc<Topic>,
    events: Arc<Topic>,
    subscribers_topic: Arc<Topic>,
    members_topic: Arc<Topic>,
    inbox_topic: Arc<Topic>,
    config_topic: Arc<Topic>,
    queues: Vec<Arc<Queue>>,
    subscribers: RwLock<HashMap<String, Arc<Subscriber>>>,
    groups: RwLock<HashMap<String, BTreeSet<String>>>,
    /// Notification id → (partition, offset).
    notices: Mutex<HashMap<String, (u32, u64)>>,
    idempotency: Mutex<HashMap<String, String>>,
    /// Delivery id → its latest state's offset and status. Ordered, so a notification's
    /// deliveries are one range.
    index: Mutex<BTreeMap<String, IndexEntry>>,
    digests: Mutex<Digests>,
    inbox: Mutex<HashMap<String, VecDeque<InboxItem>>>,
    live: Mutex<HashMap<String, broadcast::Sender<String>>>,
    config: RwLock<Arc<FanoutConfig>>,
    /// Serializes writes of the configuration, subscribers, memberships and inboxes, so the
    /// log's order is the memory's order.
    write_lock: Mutex<()>,
    channel_buckets: TokenBuckets<Channel>,
    provider_buckets: TokenBuckets<String>,
    /// Delivery id → the instant its reserved channel token becomes usable.
    reserved: Mutex<HashMap<String, u64>>,
    circuits: Mutex<HashMap<String, Circuit>>,
    id_prefix: String,
    next_id: AtomicU64,
    counts: Counts,
    stopping: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    http: reqwest::Client,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(Fanout::open(context)?)
}

fn queue_config() -> QueueConfig {
    // Throttled deliveries are parked with a nack, which counts as a delivery of the queue
    // message: the workers count attempts themselves, in the delivery states.
    QueueConfig { deliveries_max: QUEUE_DELIVERIES_MAX_MAX, lease_ms_default: WORKER_LEASE_MARGIN_MS, dedup_window_ms: QUEUE_DEDUP_WINDOW_MS_MAX, ..QueueConfig::default() }
}

fn open_queue(engine: &Engine, name: &str) -> anyhow::Result<Arc<Queue>> {
    let queue = match engine.queues.get(name) {
        Ok(queue) => queue,
        Err(_) => match engine.queues.create(name, queue_config()) {
            Ok(queue) => queue,
            Err(QueueError::AlreadyExists { .. }) => engine.queues.get(name)?,
            Err(error) => return Err(error.into()),
        },
    };
    match queue.create_group(SENDER_GROUP) {
        Ok(()) | Err(QueueError::AlreadyExists { .. }) => Ok(queue),
        Err(error) => Err(error.into()),
    }
}

fn now_ms() -> u64 {
    tributary_core::now_ms().max(0) as u64
}

/// Read a whole topic from its start, every partition.
fn for_each_record(topic: &Topic, mut f: impl FnMut(u32, &tributary_core::StoredRecord) -> anyhow::Result<()>) -> anyhow::Result<()> {
    for partition in 0..topic.partition_count() {
        let (mut offset, end) = topic.offsets(partition)?;
        while offset < end {
            let records = topic.fetch(partition, offset, BATCH_RECORDS_MAX, BATCH_BYTES_MAX)?;
            let Some(last) = records.last() else { break };
            offset = last.offset + 1;
            for record in &records {
                f(partition, record)?;
            }
        }
    }
    Ok(())
}

fn member_key(topic: &str, user: &str) -> String {
    format!("{topic}/{user}")
}

fn inbox_key(user: &str, id: &str) -> String {
    format!("{user}/{id}")
}

/// The messages a live inbox connection gets.
fn inbox_message(kind: &str, items: &[InboxItem], ids: &[String], unread: usize) -> String {
    match kind {
        "read" => json!({"type": "read", "ids": ids, "unread": unread}).to_string(),
        "item" => json!({"type": "item", "item": items.first(), "unread": unread}).to_string(),
        _ => json!({"type": "inbox", "items": items, "unread": unread}).to_string(),
    }
}

/// A leased delivery put back in its queue until it may be sent: its receipt and the wait (ms).
type Parked = (Receipt, u64);

/// A leased delivery ready to send.
struct Ready {
    receipt: Receipt,
    state: DeliveryState,
    content: Content,
    /// A digest: the batched deliveries and their content.
    members: Vec<(DeliveryState, Content)>,
}

/// What one send came to.
enum Outcome {
    Delivered { provider: String, attempts: Vec<Attempt>, email_id: Option<String> },
    Rejected { attempts: Vec<Attempt>, reason: String },
    Failed { attempts: Vec<Attempt>, reason: String },
    Throttled { wait_ms: u64 },
}

/// A batch of expanded deliveries, written and queued together.
#[derive(Default)]
struct Expansion {
    ids: HashSet<String>,
    states: Vec<DeliveryState>,
    jobs: [Vec<NewMessage>; 4],
}

impl Expansion {
    fn len(&self) -> usize {
        self.states.len() + self.jobs.iter().map(Vec::len).sum::<usize>()
    }
}

fn job_message(state: &DeliveryState, content: &Content, now: u64) -> NewMessage {
    let delay = state.not_before_ms.map_or(0, |at| at.saturating_sub(now)).min(QUEUE_DELAY_MS_MAX);
    let job = Job { state: state.clone(), content: content.clone() };
    NewMessage::new(serde_json::to_vec(&job).expect("a job serializes")).dedup_id(state.id.clone()).delay_ms(delay)
}

impl Fanout {
    /// Open the queues and topics, load subscribers, topics, inboxes, the configuration and the
    /// status index from their logs, and start the workers (on the current tokio runtime).
    pub fn open(context: &Context) -> anyhow::Result<Arc<Fanout>> {
        let engine = context.engine.clone();
        let queues = Channel::ALL.iter().map(|c| open_queue(&engine, c.queue())).collect::<anyhow::Result<Vec<_>>>()?;
        let retained = |partitions| TopicConfig { partitions, retention_ms: Some(RETENTION_MS), ..TopicConfig::default() };
        let compacted = TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() };
        let notifications = engine.topics.create(NOTIFICATIONS_TOPIC, retained(EXPANDERS))?;
        let events = engine.topics.create(EVENTS_TOPIC, retained(1))?;
        let subscribers_topic = engine.topics.create(SUBSCRIBERS_TOPIC, compacted.clone())?;
        let members_topic = engine.topics.create(MEMBERS_TOPIC, compacted.clone())?;
        let inbox_topic = engine.topics.create(INBOX_TOPIC, compacted.clone())?;
        let config_topic = engine.topics.create(CONFIG_TOPIC, compacted)?;
        let system = Arc::new(Fanout {
            engine,
            gateway: context.gateway.clone(),
            metrics: SystemMetrics::new(ID),
            notifications,
            events,
            subscribers_topic,
            members_topic,
            inbox_topic,
            config_topic,
            queues,
            subscribers: RwLock::new(HashMap::new()),
            groups: RwLock::new(HashMap::new()),
            notices: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(HashMap::new()),
            index: Mutex::new(BTreeMap::new()),
            digests: Mutex::new(Digests::default()),
            inbox: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            config: RwLock::new(Arc::new(FanoutConfig::default())),
            write_lock: Mutex::new(()),
            channel_buckets: TokenBuckets::new(),
            provider_buckets: TokenBuckets::new(),
            reserved: Mutex::new(HashMap::new()),
            circuits: Mutex::new(HashMap::new()),
            id_prefix: format!("{:x}", now_ms()),
            next_id: AtomicU64::new(0),
            counts: Counts::default(),
            stopping: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        system.load()?;
        let mut tasks = Vec::new();
        for partition in 0..EXPANDERS {
            tasks.push(tokio::spawn(run_expander(system.clone(), partition)));
        }
        for channel in Channel::ALL {
            for n in 0..WORKERS_PER_CHANNEL {
                tasks.push(tokio::spawn(run_sender(system.clone(), channel, n)));
            }
        }
        *system.tasks.lock() = tasks;
        Ok(system)
    }

    /// Read the configuration, subscribers, memberships, inboxes, notifications and delivery
    /// states into memory.
    fn load(&self) -> anyhow::Result<()> {
        for_each_record(&self.config_topic, |_, record| {
            if record.key.as_deref() == Some(CONFIG_KEY.as_bytes())
                && let Some(value) = &record.value
            {
                *self.config.write() = Arc::new(serde_json::from_slice(value)?);
            }
            Ok(())
        })?;
        {
            let mut subscribers = self.subscribers.write();
            for_each_record(&self.subscribers_topic, |_, record| {
                let Some(key) = record.key.as_deref() else { return Ok(()) };
                let id = String::from_utf8_lossy(key).into_owned();
                match &record.value {
                    Some(value) => subscribers.insert(id, Arc::new(serde_json::from_slice(value)?)),
                    None => subscribers.remove(&id),
                };
                Ok(())
            })?;
        }
        {
            let mut groups = self.groups.write();
            for_each_record(&self.members_topic, |_, record| {
                let Some(key) = record.key.as_deref() else { return Ok(()) };
                let key = String::from_utf8_lossy(key);
                let Some((topic, user)) = key.split_once('/') else { return Ok(()) };
                if record.value.is_some() {
                    groups.entry(topic.to_string()).or_default().insert(user.to_string());
                } else if let Some(members) = groups.get_mut(topic) {
                    members.remove(user);
                    if members.is_empty() {
                        groups.remove(topic);
                    }
                }
                Ok(())
            })?;
        }
        {
            let mut items: HashMap<String, BTreeMap<String, InboxItem>> = HashMap::new();
            for_each_record(&self.inbox_topic, |_, record| {
                let Some(key) = record.key.as_deref() else { return Ok(()) };
                let key = String::from_utf8_lossy(key);
                let Some((user, id)) = key.split_once('/') else { return Ok(()) };
                match &record.value {
                    Some(value) => {
                        items.entry(user.to_string()).or_default().insert(id.to_string(), serde_json::from_slice(value)?);
                    }
                    None => {
                        if let Some(user_items) = items.get_mut(user) {
                            user_items.remove(id);
                        }
                    }
                }
                Ok(())
            })?;
            let mut inbox = self.inbox.lock();
            for (user, user_items) in items {
                let mut list: Vec<InboxItem> = user_items.into_values().collect();
                list.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
                inbox.insert(user, list.into());
            }
        }
        {
            let mut notices = self.notices.lock();
            let mut idempotency = self.idempotency.lock();
            for_each_record(&self.notifications, |partition, record| {
                let Some(value) = &record.value else { return Ok(()) };
                let notification: Notification = serde_json::from_slice(value)?;
                if let Some(key) = &notification.idempotency_key {
                    idempotency.entry(key.clone()).or_insert_with(|| notification.id.clone());
                }
                notices.insert(notification.id, (partition, record.offset));
                Ok(())
            })?;
        }
        let mut index = self.index.lock();
        let mut batched: HashMap<String, String> = HashMap::new();
        let mut heads: HashMap<String, ((String, String, Channel), u64)> = HashMap::new();
        for_each_record(&self.events, |_, record| {
            let Some(value) = &record.value else { return Ok(()) };
            let state: DeliveryState = serde_json::from_slice(value)?;
            match (state.status, &state.digest, state.digest_until_ms) {
                (Status::Batched, Some(head), _) => {
                    batched.insert(state.id.clone(), head.clone());
                }
                (Status::Queued | Status::Deferred | Status::Retrying, None, Some(until)) => {
                    heads.insert(state.id.clone(), ((state.user.clone(), state.category.clone(), state.channel), until));
                    batched.remove(&state.id);
                }
                _ => {
                    batched.remove(&state.id);
                    heads.remove(&state.id);
                }
            }
            index.insert(state.id, IndexEntry { offset: record.offset, status: state.status });
            Ok(())
        })?;
        let mut digests = self.digests.lock();
        for (id, (key, until)) in heads {
            digests.members.entry(id.clone()).or_default();
            let open = digests.open.entry(key).or_insert_with(|| (id.clone(), until));
            if open.1 < until {
                *open = (id, until);
            }
        }
        let mut members: Vec<(String, String)> = batched.into_iter().map(|(id, head)| (head, id)).collect();
        members.sort();
        for (head, id) in members {
            digests.members.entry(head).or_default().push(id);
        }
        Ok(())
    }

    pub fn config(&self) -> Arc<FanoutConfig> {
        self.config.read().clone()
    }

    fn new_id(&self) -> String {
        format!("{}-{:x}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    // -----------------------------------------------------------------------------------------
    // Configuration, subscribers, topics

    /// Replace the configuration (durably).
    pub fn set_config(&self, config: FanoutConfig) -> Result<(), ApiError> {
        let _write = self.write_lock.lock();
        let value = serde_json::to_vec(&config).expect("a configuration serializes");
        self.config_topic.produce_to(0, &[Record::keyed(CONFIG_KEY, value)])?;
        *self.config.write() = Arc::new(config);
        Ok(())
    }

    /// Create or replace a subscriber (durably). `true` if it was new.
    pub fn put_subscriber(&self, subscriber: Subscriber) -> Result<bool, ApiError> {
        let _write = self.write_lock.lock();
        let new = !self.subscribers.read().contains_key(&subscriber.id);
        if new && self.subscribers.read().len() >= process::SUBSCRIBERS_MAX {
            return Err(ApiError::too_large(format!("there are SUBSCRIBERS_MAX ({}) subscribers", process::SUBSCRIBERS_MAX)));
        }
        let value = serde_json::to_vec(&subscriber).expect("a subscriber serializes");
        self.subscribers_topic.produce_to(0, &[Record::keyed(subscriber.id.clone(), value)])?;
        self.subscribers.write().insert(subscriber.id.clone(), Arc::new(subscriber));
        Ok(new)
    }

    pub fn subscriber(&self, id: &str) -> Option<Arc<Subscriber>> {
        self.subscribers.read().get(id).cloned()
    }

    /// Delete a subscriber; `false` if there was none.
    pub fn delete_subscriber(&self, id: &str) -> Result<bool, ApiError> {
        let _write = self.write_lock.lock();
        if !self.subscribers.read().contains_key(id) {
            return Ok(false);
        }
        self.subscribers_topic.produce_to(0, &[Record::tombstone(id.to_string())])?;
        self.subscribers.write().remove(id);
        Ok(true)
    }

    /// Add and remove members of a topic (durably); its size after.
    pub fn change_members(&self, topic: &str, add: Vec<String>, remove: Vec<String>) -> Result<usize, ApiError> {
        let _write = self.write_lock.lock();
        let (size, exists, topics) = {
            let groups = self.groups.read();
            let members = groups.get(topic);
            let added = add.iter().filter(|u| !members.is_some_and(|m| m.contains(*u))).collect::<HashSet<_>>().len();
            (members.map_or(0, BTreeSet::len) + added, members.is_some(), groups.len())
        };
        if size > process::TOPIC_MEMBERS_MAX {
            return Err(ApiError::too_large(format!("topic {topic:?} would hold {size} members; TOPIC_MEMBERS_MAX is {}", process::TOPIC_MEMBERS_MAX)));
        }
        if !exists && !add.is_empty() && topics >= process::TOPICS_MAX {
            return Err(ApiError::too_large(format!("there are TOPICS_MAX ({}) topics", process::TOPICS_MAX)));
        }
        let mut records: Vec<Record> = add.iter().map(|user| Record::keyed(member_key(topic, user), &b"1"[..])).collect();
        records.extend(remove.iter().map(|user| Record::tombstone(member_key(topic, user))));
        for chunk in records.chunks(BATCH_RECORDS_MAX) {
            self.members_topic.produce_to(0, chunk)?;
        }
        let mut groups = self.groups.write();
        let members = groups.entry(topic.to_string()).or_default();
        members.extend(add);
        for user in &remove {
            members.remove(user);
        }
        let size = members.len();
        if size == 0 {
            groups.remove(topic);
        }
        Ok(size)
    }

    /// A topic's size and a page of its members after `after`.
    pub fn members_page(&self, topic: &str, after: Option<&str>, limit: usize) -> (usize, Vec<String>) {
        let groups = self.groups.read();
        let Some(members) = groups.get(topic) else { return (0, Vec::new()) };
        let page = match after {
            Some(after) => members.range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)).take(limit).cloned().collect(),
            None => members.iter().take(limit).cloned().collect(),
        };
        (members.len(), page)
    }

    // -----------------------------------------------------------------------------------------
    // Trigger

    /// Check and log notifications; answered once durable.
    pub async fn trigger(self: &Arc<Self>, request: process::TriggerRequest) -> Result<process::TriggerResponse, ApiError> {
        if request.notifications.is_empty() {
            return Err(ApiError::bad_request("notifications must hold at least one notification"));
        }
        if request.notifications.len() > process::NOTIFICATIONS_PER_REQUEST_MAX {
            return Err(ApiError::too_large(format!(
                "notifications holds {}; NOTIFICATIONS_PER_REQUEST_MAX is {}",
                request.notifications.len(),
                process::NOTIFICATIONS_PER_REQUEST_MAX
            )));
        }
        if self.index.lock().len() >= DELIVERY_INDEX_ENTRIES_MAX {
            self.prune_index();
            if self.index.lock().len() >= DELIVERY_INDEX_ENTRIES_MAX {
                return Err(ApiError::overloaded(format!("the delivery index holds DELIVERY_INDEX_ENTRIES_MAX ({DELIVERY_INDEX_ENTRIES_MAX}) deliveries; older ones leave with retention"), 60));
            }
        }
        let now = now_ms();
        let accepted = request.notifications.into_iter().enumerate().map(|(i, n)| process::accept(i, n, self.new_id(), now)).collect::<Result<Vec<_>, _>>()?;
        // Idempotency keys: a key seen before answers its notification; new keys are reserved
        // now (so a concurrent trigger with the same key gets the same id) and released if the
        // append fails.
        let mut answers = Vec::with_capacity(accepted.len());
        let mut fresh = Vec::new();
        let mut reserved = Vec::new();
        {
            let mut keys = self.idempotency.lock();
            for notification in accepted {
                match notification.idempotency_key.as_ref().and_then(|k| keys.get(k)) {
                    Some(id) => answers.push(process::Triggered { id: id.clone(), duplicate: true }),
                    None => {
                        if let Some(key) = &notification.idempotency_key {
                            keys.insert(key.clone(), notification.id.clone());
                            reserved.push(key.clone());
                        }
                        answers.push(process::Triggered { id: notification.id.clone(), duplicate: false });
                        fresh.push(notification);
                    }
                }
            }
        }
        let duplicates = answers.iter().filter(|a| a.duplicate).count() as u64;
        if !fresh.is_empty() {
            let system = self.clone();
            let count = fresh.len() as u64;
            let appended = blocking(move || -> Result<(), ApiError> {
                let records: Vec<Record> = fresh.iter().map(|n| Record::keyed(n.id.clone(), serde_json::to_vec(n).expect("a notification serializes"))).collect();
                let produced = system.notifications.produce(&records)?;
                let mut notices = system.notices.lock();
                for (notification, at) in fresh.iter().zip(produced) {
                    notices.insert(notification.id.clone(), (at.partition, at.offset));
                }
                Ok(())
            })
            .await;
            if let Err(error) = appended {
                let mut keys = self.idempotency.lock();
                for key in reserved {
                    keys.remove(&key);
                }
                return Err(error);
            }
            self.counts.triggered.fetch_add(count, Ordering::Relaxed);
            self.metrics.messages_in(count);
        }
        self.counts.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        Ok(process::TriggerResponse { notifications: answers })
    }

    /// Forget index entries whose states retention has removed.
    fn prune_index(&self) {
        let Ok((start, _)) = self.events.offsets(0) else { return };
        self.index.lock().retain(|_, entry| entry.offset >= start);
    }

    // -----------------------------------------------------------------------------------------
    // Expansion

    /// Expand what the notifications log holds from the committed offset of `partition`
    /// (blocking): every notification read is expanded whole, then the offset is committed.
    fn expand_next(&self, partition: u32) -> Result<(), ApiError> {
        let (start, _) = self.notifications.offsets(partition)?;
        let from = self.engine.topics.committed(NOTIFICATIONS_TOPIC, EXPANDER_GROUP, partition).unwrap_or(0).max(start);
        self.notifications.log(partition)?.wait_for_data(from, WORKER_WAIT);
        let records = self.notifications.fetch(partition, from, EXPANDER_READ_MAX, BATCH_BYTES_MAX)?;
        let Some(last) = records.last().map(|r| r.offset) else { return Ok(()) };
        let config = self.config();
        let mut batch = Expansion::default();
        for record in &records {
            let Some(notification) = record.value.as_deref().and_then(|v| serde_json::from_slice::<Notification>(v).ok()) else {
                tracing::error!(partition, offset = record.offset, "a notification is not readable; skipping it");
                continue;
            };
            self.expand(&notification, &config, &mut batch)?;
        }
        self.flush(&mut batch)?;
        self.engine.topics.commit(NOTIFICATIONS_TOPIC, EXPANDER_GROUP, None, &[(partition, last + 1)])?;
        Ok(())
    }

    /// Expand one notification into `batch`, flushing it every `EXPANSION_CHUNK` deliveries.
    fn expand(&self, notification: &Notification, config: &FanoutConfig, batch: &mut Expansion) -> Result<(), ApiError> {
        let channels = notification.channels(config);
        let content = notification.content();
        for users in notification.users.chunks(EXPANSION_CHUNK) {
            for user in users {
                self.expand_user(notification, &content, &channels, user, config, batch)?;
            }
            if batch.len() >= EXPANSION_CHUNK {
                self.flush(batch)?;
            }
        }
        for topic in &notification.topics {
            let mut cursor: Option<String> = None;
            loop {
                let (_, chunk) = self.members_page(topic, cursor.as_deref(), EXPANSION_CHUNK);
                let Some(last) = chunk.last().cloned() else { break };
                for user in &chunk {
                    self.expand_user(notification, &content, &channels, user, config, batch)?;
                }
                if batch.len() >= EXPANSION_CHUNK {
                    self.flush(batch)?;
                }
                cursor = Some(last);
            }
        }
        Ok(())
    }

    /// The deliveries of one recipient.
    fn expand_user(&self, notification: &Notification, content: &Content, channels: &[Channel], user: &str, config: &FanoutConfig, batch: &mut Expansion) -> Result<(), ApiError> {
        let now = now_ms();
        let subscriber = self.subscriber(user);
        for &channel in channels {
            let id = process::delivery_id(&notification.id, channel, user);
            if batch.ids.contains(&id) {
                continue;
            }
            let known = self.index.lock().get(&id).copied();
            if let Some(entry) = known {
                // Expanded before a crash: queue again what may not have reached its queue (the
                // queue's dedup id drops it if it did).
                if matches!(entry.status, Status::Queued | Status::Deferred)
                    && let Some(state) = self.read_state(entry.offset)?
                {
                    batch.ids.insert(id);
                    batch.jobs[channel.index()].push(job_message(&state, content, now));
                }
                continue;
            }
            let mut state = DeliveryState {
                id: id.clone(),
                notification: notification.id.clone(),
                user: user.to_string(),
                channel,
                category: notification.category.clone(),
                critical: notification.critical,
                status: Status::Queued,
                accepted_at_ms: notification.accepted_at_ms,
                updated_at_ms: now,
                attempts: 0,
                not_before_ms: None,
                next_attempt_at_ms: None,
                provider: None,
                email_id: None,
                digest: None,
                digest_until_ms: None,
                digest_items: None,
                reason: None,
                history: Vec::new(),
            };
            let decision = match &subscriber {
                None => process::Decision::Skip(format!("no subscriber {user:?}")),
                Some(subscriber) => process::decide(subscriber, channel, &notification.category, notification.critical, now),
            };
            batch.ids.insert(id.clone());
            match decision {
                process::Decision::Skip(reason) => {
                    state.status = Status::Skipped;
                    state.reason = Some(reason);
                    self.counts.skipped.fetch_add(1, Ordering::Relaxed);
                    batch.states.push(state);
                    continue;
                }
                process::Decision::Send { not_before_ms } => {
                    if let Some(at) = not_before_ms {
                        state.status = Status::Deferred;
                        state.not_before_ms = Some(at);
                        state.reason = Some("quiet hours".into());
                        self.counts.deferred.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(window) = config.digest_window_ms(&notification.category).filter(|_| !notification.critical) {
                        let key = (user.to_string(), notification.category.clone(), channel);
                        let mut digests = self.digests.lock();
                        let joinable = digests.open.get(&key).filter(|(_, until)| *until > now).map(|(head, _)| head.clone());
                        if let Some(head) = joinable
                            && digests.members.get(&head).map_or(0, Vec::len) + 1 < process::DIGEST_ITEMS_MAX
                        {
                            digests.members.entry(head.clone()).or_default().push(id.clone());
                            state.status = Status::Batched;
                            state.digest = Some(head);
                            state.not_before_ms = None;
                            state.reason = None;
                            self.counts.batched.fetch_add(1, Ordering::Relaxed);
                            batch.states.push(state);
                            continue;
                        }
                        let until = not_before_ms.unwrap_or(now) + window;
                        digests.open.insert(key, (id.clone(), until));
                        digests.members.insert(id.clone(), Vec::new());
                        state.digest_until_ms = Some(until);
                        state.not_before_ms = Some(until);
                    }
                    batch.jobs[channel.index()].push(job_message(&state, content, now));
                    batch.states.push(state);
                }
            }
        }
        Ok(())
    }

    /// Write the batch's states (durably), then queue its jobs.
    fn flush(&self, batch: &mut Expansion) -> Result<(), ApiError> {
        let states = std::mem::take(&mut batch.states);
        let expanded = states.len() as u64;
        self.append_states(&states)?;
        for (channel, jobs) in Channel::ALL.into_iter().zip(batch.jobs.iter_mut()) {
            let jobs = std::mem::take(jobs);
            if !jobs.is_empty() {
                self.queues[channel.index()].publish(&jobs)?;
            }
        }
        batch.ids.clear();
        self.counts.expanded.fetch_add(expanded, Ordering::Relaxed);
        Ok(())
    }

    /// Append delivery states (durably) and point the index at them.
    fn append_states(&self, states: &[DeliveryState]) -> Result<(), ApiError> {
        for chunk in states.chunks(BATCH_RECORDS_MAX) {
            let records: Vec<Record> = chunk.iter().map(|s| Record::keyed(s.id.clone(), serde_json::to_vec(s).expect("a state serializes"))).collect();
            let appended = self.events.produce_to(0, &records)?;
            let mut index = self.index.lock();
            for (n, state) in chunk.iter().enumerate() {
                let offset = appended.base_offset + n as u64;
                let entry = index.entry(state.id.clone()).or_insert(IndexEntry { offset, status: state.status });
                if entry.offset <= offset {
                    *entry = IndexEntry { offset, status: state.status };
                }
            }
        }
        Ok(())
    }

    fn read_state(&self, offset: u64) -> Result<Option<DeliveryState>, StreamError> {
        let records = self.events.fetch(0, offset, 1, MESSAGE_BYTES_MAX)?;
        Ok(records.into_iter().find(|r| r.offset == offset).and_then(|r| r.value).and_then(|value| serde_json::from_slice(&value).ok()))
    }

    /// The latest state of delivery `id` (blocking).
    pub fn delivery(&self, id: &str) -> Result<Option<DeliveryState>, ApiError> {
        let Some(entry) = self.index.lock().get(id).copied() else { return Ok(None) };
        Ok(self.read_state(entry.offset)?)
    }

    fn notification(&self, id: &str) -> Result<Option<Notification>, StreamError> {
        let Some((partition, offset)) = self.notices.lock().get(id).copied() else { return Ok(None) };
        let records = self.notifications.fetch(partition, offset, 1, MESSAGE_BYTES_MAX)?;
        Ok(records.into_iter().find(|r| r.offset == offset).and_then(|r| r.value).and_then(|value| serde_json::from_slice(&value).ok()))
    }

    /// A notification, its deliveries' counts and a page of them (blocking).
    pub fn notification_view(&self, id: &str, after: Option<&str>, limit: usize) -> Result<Option<process::NotificationView>, ApiError> {
        let Some(notification) = self.notification(id)? else { return Ok(None) };
        let (partition, offset) = self.notices.lock().get(id).copied().expect("read just now");
        let expanded = self.engine.topics.committed(NOTIFICATIONS_TOPIC, EXPANDER_GROUP, partition).is_some_and(|c| c > offset);
        let prefix = format!("{id}.");
        let end = format!("{id}/");
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut deliveries = Vec::new();
        let mut next_after = None;
        let index = self.index.lock();
        for (delivery, entry) in index.range::<str, _>((std::ops::Bound::Included(prefix.as_str()), std::ops::Bound::Excluded(end.as_str()))) {
            *counts.entry(entry.status.as_str().to_string()).or_default() += 1;
            if after.is_none_or(|a| delivery.as_str() > a) {
                if deliveries.len() < limit {
                    deliveries.push(process::DeliverySummary { id: delivery.clone(), status: entry.status });
                } else if next_after.is_none() {
                    next_after = deliveries.last().map(|d: &process::DeliverySummary| d.id.clone());
                }
            }
        }
        Ok(Some(process::NotificationView { notification, expanded, counts, deliveries, next_after }))
    }

    // -----------------------------------------------------------------------------------------
    // Sending

    /// Sort a leased batch (blocking): duplicates of finished deliveries are acked, throttled
    /// ones parked, the rest made ready with their current state and digest members.
    fn prepare(&self, channel: Channel, deliveries: Vec<Delivery>, config: &FanoutConfig) -> Result<(Vec<Ready>, Vec<Parked>), ApiError> {
        let now = now_ms();
        let mut ready = Vec::new();
        let mut parked = Vec::new();
        let mut finished = Vec::new();
        for delivery in deliveries {
            let Ok(job) = serde_json::from_slice::<Job>(&delivery.body) else {
                tracing::error!(id = %delivery.id, "a job in queue {} is not readable; dropping it", channel.queue());
                finished.push(delivery.receipt);
                continue;
            };
            let entry = self.index.lock().get(&job.state.id).copied();
            if entry.is_some_and(|e| e.status.is_final()) {
                finished.push(delivery.receipt);
                continue;
            }
            let reserved = self.reserved.lock().remove(&job.state.id);
            let wait = match reserved {
                Some(due) if due <= now + 5 => 0,
                Some(due) => {
                    self.reserved.lock().insert(job.state.id.clone(), due);
                    due - now
                }
                None => {
                    let wait = self.channel_buckets.reserve(&channel, config.channel_rate(channel), now, THROTTLE_HORIZON_MS);
                    if wait > 0 && wait <= THROTTLE_HORIZON_MS {
                        self.reserved.lock().insert(job.state.id.clone(), now + wait);
                    }
                    wait.min(THROTTLE_HORIZON_MS)
                }
            };
            if wait > 0 {
                self.counts.throttled.fetch_add(1, Ordering::Relaxed);
                parked.push((delivery.receipt, wait));
                continue;
            }
            // The job holds the state as queued; after an attempt the log holds the newer one.
            let state = match entry {
                Some(entry) if delivery.delivery_count > 1 => self.read_state(entry.offset)?.unwrap_or(job.state),
                _ => job.state,
            };
            let members = if state.digest_until_ms.is_some() { self.take_members(&state.id)? } else { Vec::new() };
            ready.push(Ready { receipt: delivery.receipt, state, content: job.content, members });
        }
        if !finished.is_empty() {
            self.queues[channel.index()].ack(SENDER_GROUP, &finished)?;
        }
        Ok((ready, parked))
    }

    /// The deliveries batched into digest `head`, with their content; the digest is closed.
    fn take_members(&self, head: &str) -> Result<Vec<(DeliveryState, Content)>, ApiError> {
        let ids = {
            let mut digests = self.digests.lock();
            digests.open.retain(|_, (open, _)| open != head);
            digests.members.remove(head).unwrap_or_default()
        };
        let mut members = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(state) = self.delivery(&id)? else { continue };
            if state.status != Status::Batched {
                continue;
            }
            let content = match self.notification(&state.notification)? {
                Some(notification) => notification.content(),
                None => Content { notification: state.notification.clone(), title: None, body: None, data: None },
            };
            members.push((state, content));
        }
        Ok(members)
    }

    /// Put a digest's members back (its send is retried or parked).
    fn restore_members(&self, head: &str, members: &[(DeliveryState, Content)]) {
        if members.is_empty() {
            return;
        }
        let mut digests = self.digests.lock();
        let list = digests.members.entry(head.to_string()).or_default();
        for (state, _) in members {
            if !list.contains(&state.id) {
                list.push(state.id.clone());
            }
        }
    }

    /// Work one leased batch of `channel`: prepare, send, settle.
    async fn work(self: &Arc<Self>, channel: Channel, deliveries: Vec<Delivery>) -> Result<(), ApiError> {
        let config = self.config();
        let system = self.clone();
        let prepared_config = config.clone();
        let (ready, parked) = blocking(move || system.prepare(channel, deliveries, &prepared_config)).await?;
        let outcomes: Vec<(Ready, Outcome)> = match channel {
            Channel::Push | Channel::Sms => {
                futures_util::future::join_all(ready.into_iter().map(|item| {
                    let config = config.clone();
                    async move {
                        let outcome = self.send_to_providers(channel, &item, &config).await;
                        (item, outcome)
                    }
                }))
                .await
            }
            Channel::Email => self.send_emails(ready, &config).await,
            Channel::InApp => {
                let system = self.clone();
                blocking(move || system.write_inbox(ready)).await?
            }
        };
        let system = self.clone();
        blocking(move || system.settle(channel, outcomes, parked, &config)).await
    }

    /// Whether `key`'s circuit is open at `now`.
    fn circuit_open(&self, key: &str, now: u64) -> Option<u64> {
        self.circuits.lock().get(key).filter(|c| c.open_until_ms > now).map(|c| c.open_until_ms)
    }

    fn circuit_result(&self, key: &str, ok: bool, now: u64, spec: &process::CircuitSpec) {
        let mut circuits = self.circuits.lock();
        if ok {
            circuits.remove(key);
            return;
        }
        let circuit = circuits.entry(key.to_string()).or_default();
        circuit.failures += 1;
        if circuit.failures >= spec.failures {
            circuit.open_until_ms = now + spec.cooldown_ms;
            self.counts.circuit_opened.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The body a provider gets for one delivery (or digest).
    fn provider_body(item: &Ready, subscriber: Option<&Subscriber>) -> Vec<u8> {
        let to = match item.state.channel {
            Channel::Push => json!({"push_tokens": subscriber.map(|s| s.push_tokens.clone()).unwrap_or_default()}),
            Channel::Sms => json!({"phone": subscriber.and_then(|s| s.phone.clone())}),
            _ => json!({}),
        };
        let mut body = json!({
            "delivery_id": item.state.id,
            "notification_id": item.state.notification,
            "channel": item.state.channel,
            "category": item.state.category,
            "user": item.state.user,
            "to": to,
            "title": item.content.title,
            "body": item.content.body,
            "data": item.content.data,
            "attempt": item.state.attempts + 1,
        });
        if !item.members.is_empty() {
            let mut items = vec![item.content.clone()];
            items.extend(item.members.iter().map(|(_, c)| c.clone()));
            body["digest"] = json!(items);
        }
        serde_json::to_vec(&body).expect("JSON serializes")
    }

    /// Push or SMS: the channel's providers in priority order, with failover.
    async fn send_to_providers(&self, channel: Channel, item: &Ready, config: &FanoutConfig) -> Outcome {
        let providers = config.providers.of(channel);
        let subscriber = self.subscriber(&item.state.user);
        if subscriber.is_none() {
            return Outcome::Rejected { attempts: Vec::new(), reason: format!("no subscriber {:?}", item.state.user) };
        }
        let body = Self::provider_body(item, subscriber.as_deref());
        let timeout = Duration::from_millis(config.provider_timeout_ms);
        let mut attempts = Vec::new();
        let mut wait_ms: Option<u64> = None;
        let mut last_error = format!("no {} provider is configured", channel.as_str());
        for provider in providers {
            let now = now_ms();
            let key = format!("{}/{}", channel.as_str(), provider.name);
            if let Some(until) = self.circuit_open(&key, now) {
                wait_ms = Some(wait_ms.map_or(until - now, |w| w.min(until - now)));
                continue;
            }
            if let Err(wait) = self.provider_buckets.try_take(&key, provider.rate(), now) {
                wait_ms = Some(wait_ms.map_or(wait, |w| w.min(wait)));
                continue;
            }
            let result = tributary_server::webhook::post_json_within(&self.http, &provider.url, provider.secret.as_deref().map(str::as_bytes), body.clone(), timeout).await;
            let now = now_ms();
            let mut attempt = Attempt { at_ms: now, provider: provider.name.clone(), result: String::new(), status_code: None, detail: None };
            match result {
                Ok(status) => {
                    self.circuit_result(&key, true, now, &config.circuit);
                    attempt.result = "delivered".into();
                    attempt.status_code = Some(status);
                    attempts.push(attempt);
                    return Outcome::Delivered { provider: provider.name.clone(), attempts, email_id: None };
                }
                Err(WebhookError::Status { status, .. }) if process::classify(status) == Verdict::Rejected => {
                    // The provider is up: it refuses this recipient.
                    self.circuit_result(&key, true, now, &config.circuit);
                    attempt.result = "rejected".into();
                    attempt.status_code = Some(status);
                    attempts.push(attempt);
                    return Outcome::Rejected { attempts, reason: format!("{} answered {status}", provider.name) };
                }
                Err(error) => {
                    self.circuit_result(&key, false, now, &config.circuit);
                    attempt.result = "failed".into();
                    match &error {
                        WebhookError::Status { status, .. } => attempt.status_code = Some(*status),
                        WebhookError::Transport { source, .. } if source.is_timeout() => attempt.detail = Some(format!("no answer within {} ms", config.provider_timeout_ms)),
                        WebhookError::Transport { source, .. } => attempt.detail = Some(source.to_string()),
                    }
                    last_error = format!("{}: {}", provider.name, attempt.detail.clone().unwrap_or_else(|| error.to_string()));
                    attempts.push(attempt);
                    self.counts.failovers.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        match (attempts.is_empty(), wait_ms) {
            (true, Some(wait_ms)) => Outcome::Throttled { wait_ms: wait_ms.clamp(1, THROTTLE_HORIZON_MS) },
            _ => Outcome::Failed { attempts, reason: last_error },
        }
    }

    /// Email: the batch in one POST to the email system's API (one by one if it refuses the
    /// batch, so one bad email does not fail the others).
    async fn send_emails(&self, ready: Vec<Ready>, config: &FanoutConfig) -> Vec<(Ready, Outcome)> {
        if ready.is_empty() {
            return Vec::new();
        }
        let messages: Vec<serde_json::Value> = ready.iter().map(|item| self.email_message(item, config)).collect();
        match self.post_emails(&messages, config).await {
            Ok(Ok(outcomes)) => ready.into_iter().zip(outcomes).collect(),
            Ok(Err(_)) if ready.len() > 1 => {
                futures_util::future::join_all(ready.into_iter().zip(messages).map(|(item, message)| async move {
                    let outcome = match self.post_emails(std::slice::from_ref(&message), config).await {
                        Ok(Ok(mut ids)) => ids.pop().expect("one answer per email"),
                        Ok(Err(outcome)) | Err(outcome) => outcome,
                    };
                    (item, outcome)
                }))
                .await
            }
            Ok(Err(outcome)) | Err(outcome) => {
                let (kind, attempts, reason) = match outcome {
                    Outcome::Rejected { attempts, reason } => (true, attempts, reason),
                    Outcome::Failed { attempts, reason } => (false, attempts, reason),
                    _ => unreachable!("post_emails answers rejected or failed"),
                };
                ready
                    .into_iter()
                    .map(|item| {
                        let outcome = if kind { Outcome::Rejected { attempts: attempts.clone(), reason: reason.clone() } } else { Outcome::Failed { attempts: attempts.clone(), reason: reason.clone() } };
                        (item, outcome)
                    })
                    .collect()
            }
        }
    }

    fn email_message(&self, item: &Ready, config: &FanoutConfig) -> serde_json::Value {
        let address = self.subscriber(&item.state.user).and_then(|s| s.email.clone()).unwrap_or_default();
        let subject = item.content.title.clone().unwrap_or_else(|| item.state.category.clone());
        let mut text = item.content.body.clone().or_else(|| item.content.data.as_ref().map(|d| d.to_string())).unwrap_or_else(|| subject.clone());
        if !item.members.is_empty() {
            let subject_of = |c: &Content| c.title.clone().or_else(|| c.body.clone()).unwrap_or_else(|| c.notification.clone());
            text = std::iter::once(&item.content).chain(item.members.iter().map(|(_, c)| c)).map(|c| format!("- {}", subject_of(c))).collect::<Vec<_>>().join("\n");
        }
        let subject = if item.members.is_empty() { subject } else { format!("{} notifications: {}", item.members.len() + 1, item.state.category) };
        json!({
            "class": config.email.class,
            "from": config.email.from,
            "to": address,
            "subject": subject,
            "text": text,
            "metadata": {"fanout_delivery": item.state.id, "fanout_notification": item.state.notification},
        })
    }

    /// POST emails; `Ok(Ok(outcomes))` per email when the API took the request, `Ok(Err(…))`
    /// when it refused it (4xx), `Err(…)` on 5xx or no answer.
    async fn post_emails(&self, messages: &[serde_json::Value], config: &FanoutConfig) -> Result<Result<Vec<Outcome>, Outcome>, Outcome> {
        let url = format!("{}/v1/email/messages", config.email.base_url.trim_end_matches('/'));
        let now = now_ms();
        let attempt = |result: &str, status: Option<u16>, detail: Option<String>| Attempt { at_ms: now, provider: "email".into(), result: result.into(), status_code: status, detail };
        let sent = self.http.post(&url).timeout(Duration::from_millis(config.provider_timeout_ms)).json(&json!({"messages": messages})).send().await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                let detail = if error.is_timeout() { format!("no answer within {} ms", config.provider_timeout_ms) } else { error.to_string() };
                return Err(Outcome::Failed { attempts: vec![attempt("failed", None, Some(detail.clone()))], reason: format!("email system: {detail}") });
            }
        };
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        match process::classify(status) {
            Verdict::Delivered => {
                let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let answers = body["messages"].as_array().cloned().unwrap_or_default();
                if answers.len() != messages.len() {
                    return Err(Outcome::Failed { attempts: vec![attempt("failed", Some(status), Some(format!("unexpected answer: {text}")))], reason: "the email system's answer does not fit".into() });
                }
                Ok(Ok(answers
                    .into_iter()
                    .map(|answer| {
                        let id = answer["id"].as_str().map(str::to_string);
                        match answer["status"].as_str() {
                            Some("suppressed") => Outcome::Rejected { attempts: vec![attempt("rejected", Some(status), Some("suppressed by the email system".into()))], reason: "the address is on the email system's suppression list".into() },
                            _ => Outcome::Delivered { provider: "email".into(), attempts: vec![attempt("delivered", Some(status), None)], email_id: id },
                        }
                    })
                    .collect()))
            }
            Verdict::Rejected => Ok(Err(Outcome::Rejected { attempts: vec![attempt("rejected", Some(status), Some(text.clone()))], reason: format!("the email system answered {status}: {text}") })),
            Verdict::Failed => Err(Outcome::Failed { attempts: vec![attempt("failed", Some(status), Some(text.clone()))], reason: format!("the email system answered {status}") }),
        }
    }

    /// In-app: append the items to their users' inboxes (durably), then send them live
    /// (blocking).
    fn write_inbox(&self, ready: Vec<Ready>) -> Result<Vec<(Ready, Outcome)>, ApiError> {
        let now = now_ms();
        let _write = self.write_lock.lock();
        let mut records = Vec::with_capacity(ready.len());
        let mut items = Vec::with_capacity(ready.len());
        {
            let inbox = self.inbox.lock();
            // Per user: items added by this batch, and old items evicted for them.
            let mut counted: HashMap<&str, (usize, usize)> = HashMap::new();
            for item in &ready {
                let inbox_item = InboxItem {
                    id: item.state.id.clone(),
                    category: item.state.category.clone(),
                    notification: item.state.notification.clone(),
                    title: item.content.title.clone(),
                    body: item.content.body.clone(),
                    data: item.content.data.clone(),
                    items: if item.members.is_empty() { Vec::new() } else { std::iter::once(item.content.clone()).chain(item.members.iter().map(|(_, c)| c.clone())).collect() },
                    created_at_ms: now,
                    read: false,
                };
                records.push(Record::keyed(inbox_key(&item.state.user, &item.state.id), serde_json::to_vec(&inbox_item).expect("an item serializes")));
                let user = item.state.user.as_str();
                let held = inbox.get(user).map_or(0, VecDeque::len);
                let (added, evicted) = counted.entry(user).or_default();
                *added += 1;
                if held + *added > INBOX_ITEMS_MAX + *evicted
                    && let Some(oldest) = inbox.get(user).and_then(|list| list.get(*evicted))
                {
                    records.push(Record::tombstone(inbox_key(user, &oldest.id)));
                    *evicted += 1;
                }
                items.push(inbox_item);
            }
        }
        for chunk in records.chunks(BATCH_RECORDS_MAX) {
            self.inbox_topic.produce_to(0, chunk)?;
        }
        let mut inbox = self.inbox.lock();
        let live = self.live.lock();
        for (item, inbox_item) in ready.iter().zip(&items) {
            let list = inbox.entry(item.state.user.clone()).or_default();
            list.retain(|i| i.id != inbox_item.id);
            list.push_back(inbox_item.clone());
            while list.len() > INBOX_ITEMS_MAX {
                list.pop_front();
            }
            if let Some(sender) = live.get(&item.state.user) {
                let unread = list.iter().filter(|i| !i.read).count();
                let _ = sender.send(inbox_message("item", std::slice::from_ref(inbox_item), &[], unread));
            }
        }
        drop(live);
        drop(inbox);
        Ok(ready
            .into_iter()
            .map(|item| (item, Outcome::Delivered { provider: "inbox".into(), attempts: vec![Attempt { at_ms: now, provider: "inbox".into(), result: "delivered".into(), status_code: None, detail: None }], email_id: None }))
            .collect())
    }

    /// Write the states of a worked batch, then ack what is done and nack what waits
    /// (blocking).
    fn settle(&self, channel: Channel, outcomes: Vec<(Ready, Outcome)>, parked: Vec<Parked>, config: &FanoutConfig) -> Result<(), ApiError> {
        let now = now_ms();
        let mut states = Vec::with_capacity(outcomes.len());
        let mut acks = Vec::new();
        let mut waits: Vec<Parked> = parked;
        let mut latencies = Vec::new();
        for (item, outcome) in outcomes {
            let Ready { receipt, mut state, members, .. } = item;
            state.updated_at_ms = now;
            state.next_attempt_at_ms = None;
            let final_status = match outcome {
                Outcome::Throttled { wait_ms } => {
                    self.counts.throttled.fetch_add(1, Ordering::Relaxed);
                    self.restore_members(&state.id, &members);
                    waits.push((receipt, wait_ms));
                    continue;
                }
                Outcome::Delivered { provider, attempts, email_id } => {
                    state.attempts += 1;
                    attempts.into_iter().for_each(|a| state.push_attempt(a));
                    state.status = Status::Delivered;
                    state.provider = Some(provider);
                    state.email_id = email_id;
                    state.reason = None;
                    self.counts.delivered[channel.index()].fetch_add(1 + members.len() as u64, Ordering::Relaxed);
                    latencies.push(Duration::from_millis(now.saturating_sub(state.accepted_at_ms)));
                    acks.push(receipt);
                    Status::Delivered
                }
                Outcome::Rejected { attempts, reason } => {
                    state.attempts += 1;
                    attempts.into_iter().for_each(|a| state.push_attempt(a));
                    state.status = Status::Failed;
                    state.reason = Some(reason);
                    self.counts.failed[channel.index()].fetch_add(1 + members.len() as u64, Ordering::Relaxed);
                    acks.push(receipt);
                    Status::Failed
                }
                Outcome::Failed { attempts, reason } => {
                    state.attempts += 1;
                    attempts.into_iter().for_each(|a| state.push_attempt(a));
                    if state.attempts >= config.retry.attempts {
                        state.status = Status::Failed;
                        state.reason = Some(format!("no delivery after {} attempts; last: {reason}", state.attempts));
                        self.counts.failed[channel.index()].fetch_add(1 + members.len() as u64, Ordering::Relaxed);
                        acks.push(receipt);
                        Status::Failed
                    } else {
                        let delay = process::retry_delay_ms(&config.retry, state.attempts).min(QUEUE_DELAY_MS_MAX);
                        state.status = Status::Retrying;
                        state.reason = Some(reason);
                        state.next_attempt_at_ms = Some(now + delay);
                        self.counts.retried.fetch_add(1, Ordering::Relaxed);
                        self.restore_members(&state.id, &members);
                        waits.push((receipt, delay));
                        states.push(state);
                        continue;
                    }
                }
            };
            // A digest's first delivery keeps its window while it is retried (so that a restart
            // finds its members again); once final, it is closed.
            state.digest_until_ms = None;
            if !members.is_empty() {
                state.digest_items = Some(members.len() as u32 + 1);
            }
            for (mut member, _) in members {
                member.status = final_status;
                member.updated_at_ms = now;
                member.provider = state.provider.clone();
                member.email_id = state.email_id.clone();
                member.reason = state.reason.clone();
                latencies.push(Duration::from_millis(now.saturating_sub(member.accepted_at_ms)));
                states.push(member);
            }
            states.push(state);
        }
        self.append_states(&states)?;
        let queue = &self.queues[channel.index()];
        if !acks.is_empty() {
            queue.ack(SENDER_GROUP, &acks)?;
        }
        let mut by_delay: BTreeMap<u64, Vec<Receipt>> = BTreeMap::new();
        for (receipt, delay) in waits {
            by_delay.entry(delay).or_default().push(receipt);
        }
        for (delay, receipts) in by_delay {
            queue.nack(SENDER_GROUP, &receipts, Some(delay))?;
        }
        let delivered = latencies.len() as u64;
        self.metrics.messages_out(delivered);
        for latency in latencies {
            self.metrics.latency(latency);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Inbox

    /// The newest `limit` items of `user`'s inbox (newest first) and the unread count.
    pub fn inbox_page(&self, user: &str, limit: usize) -> (Vec<InboxItem>, usize) {
        let inbox = self.inbox.lock();
        let Some(list) = inbox.get(user) else { return (Vec::new(), 0) };
        (list.iter().rev().take(limit).cloned().collect(), list.iter().filter(|i| !i.read).count())
    }

    /// Mark items read (all with `all`), durably; the ids marked now and the unread count.
    pub fn mark_read(&self, user: &str, ids: &[String], all: bool) -> Result<(Vec<String>, usize), ApiError> {
        let _write = self.write_lock.lock();
        let changed: Vec<InboxItem> = {
            let inbox = self.inbox.lock();
            let Some(list) = inbox.get(user) else { return Ok((Vec::new(), 0)) };
            list.iter().filter(|i| !i.read && (all || ids.contains(&i.id))).map(|i| InboxItem { read: true, ..i.clone() }).collect()
        };
        let records: Vec<Record> = changed.iter().map(|i| Record::keyed(inbox_key(user, &i.id), serde_json::to_vec(i).expect("an item serializes"))).collect();
        for chunk in records.chunks(BATCH_RECORDS_MAX) {
            self.inbox_topic.produce_to(0, chunk)?;
        }
        let marked: Vec<String> = changed.into_iter().map(|i| i.id).collect();
        let mut inbox = self.inbox.lock();
        let list = inbox.entry(user.to_string()).or_default();
        for item in list.iter_mut() {
            if marked.contains(&item.id) {
                item.read = true;
            }
        }
        let unread = list.iter().filter(|i| !i.read).count();
        if !marked.is_empty()
            && let Some(sender) = self.live.lock().get(user)
        {
            let _ = sender.send(inbox_message("read", &[], &marked, unread));
        }
        Ok((marked, unread))
    }

    /// Listen to `user`'s inbox: the receiver, then the current inbox as the first message.
    pub fn watch_inbox(&self, user: &str) -> (broadcast::Receiver<String>, String) {
        let receiver = self.live.lock().entry(user.to_string()).or_insert_with(|| broadcast::channel(INBOX_LIVE_BUFFER).0).subscribe();
        (receiver, self.inbox_snapshot(user))
    }

    pub fn inbox_snapshot(&self, user: &str) -> String {
        let (items, unread) = self.inbox_page(user, INBOX_PAGE_MAX);
        inbox_message("inbox", &items, &[], unread)
    }

    /// Forget `user`'s live channel once nobody listens.
    pub fn unwatch_inbox(&self, user: &str) {
        let mut live = self.live.lock();
        if live.get(user).is_some_and(|s| s.receiver_count() == 0) {
            live.remove(user);
        }
    }
}

/// One expander: expand the partition's notifications, in order, until the system stops.
async fn run_expander(system: Arc<Fanout>, partition: u32) {
    while !system.stopping() {
        let worker = system.clone();
        if let Err(error) = blocking(move || worker.expand_next(partition)).await {
            system.metrics.error();
            tracing::warn!("fan-out expander {partition}: {error}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// How long a worker leases a batch of `channel` (see [`WORKER_LEASE_MARGIN_MS`]).
fn lease_ms(config: &FanoutConfig, channel: Channel) -> u64 {
    let calls = match channel {
        Channel::Push | Channel::Sms => config.providers.of(channel).len() as u64 + 1,
        // One POST of the batch, then (if refused) one per email, at once.
        Channel::Email => 2,
        Channel::InApp => 0,
    };
    WORKER_LEASE_MARGIN_MS + calls * config.provider_timeout_ms
}

/// One channel worker: lease, send, settle, repeat, until the system stops.
async fn run_sender(system: Arc<Fanout>, channel: Channel, n: usize) {
    let consumer = format!("{}-{n}", channel.as_str());
    while !system.stopping() {
        let queue = system.queues[channel.index()].clone();
        let name = consumer.clone();
        let lease_ms = lease_ms(&system.config(), channel);
        let received = blocking(move || -> Result<Vec<Delivery>, ApiError> { Ok(queue.receive(SENDER_GROUP, &name, WORKER_BATCH_MAX, Some(lease_ms), WORKER_WAIT)?) }).await;
        let deliveries = match received {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!("fan-out worker {consumer}: receive: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        if let Err(error) = system.work(channel, deliveries).await {
            system.metrics.error();
            tracing::warn!("fan-out worker {consumer}: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl System for Fanout {
    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        SystemApi { id: ID, prefixes: vec!["/v1/fanout"], router: api::router(self) }
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.metrics
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.counts;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut queues = serde_json::Map::new();
        let mut delivered = serde_json::Map::new();
        let mut failed = serde_json::Map::new();
        for channel in Channel::ALL {
            let queue = &self.queues[channel.index()];
            let shown = match queue.stats(Some(SENDER_GROUP)) {
                Ok(stats) => json!({"depth": stats.depth, "delayed": stats.delayed, "in_flight": stats.in_flight}),
                Err(error) => json!({"error": error.to_string()}),
            };
            queues.insert(channel.as_str().into(), shown);
            delivered.insert(channel.as_str().into(), json!(load(&c.delivered[channel.index()])));
            failed.insert(channel.as_str().into(), json!(load(&c.failed[channel.index()])));
        }
        let lag: u64 = (0..EXPANDERS)
            .map(|p| {
                let (_, end) = self.notifications.offsets(p).unwrap_or((0, 0));
                end.saturating_sub(self.engine.topics.committed(NOTIFICATIONS_TOPIC, EXPANDER_GROUP, p).unwrap_or(0))
            })
            .sum();
        let open_circuits: Vec<String> = {
            let now = now_ms();
            self.circuits.lock().iter().filter(|(_, c)| c.open_until_ms > now).map(|(k, _)| k.clone()).collect()
        };
        json!({
            "queues": queues,
            "expansion_lag": lag,
            "counts": {
                "triggered": load(&c.triggered), "duplicates": load(&c.duplicates), "deliveries": load(&c.expanded),
                "skipped": load(&c.skipped), "deferred": load(&c.deferred), "batched": load(&c.batched),
                "delivered": delivered, "failed": failed, "retried": load(&c.retried), "throttled": load(&c.throttled),
                "failovers": load(&c.failovers), "circuit_opened": load(&c.circuit_opened),
            },
            "open_circuits": open_circuits,
            "subscribers": self.subscribers.read().len(),
            "topics": self.groups.read().len(),
            "deliveries_indexed": self.index.lock().len(),
        })
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn stopped(&self) -> tributary_engine::BoxFuture<'_, ()> {
        Box::pin(async move {
            let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}
