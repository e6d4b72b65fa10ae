//! notification-fanout: one notification, many recipients, four channels, as a user of Novu or
//! Airbnb's notification platform expects it. A trigger names a category, users and topics (groups
//! of users) and the content; it is durable before the answer (202). Expander workers turn it into
//! one delivery per recipient and channel (email, push, SMS, in-app), applying each subscriber's
//! preferences (per channel, per category, a `critical` override) and quiet hours, batching
//! deliveries of one category into digests, and put each on its channel's queue. Channel workers
//! send: push and SMS to HTTP providers (several per channel, in priority order, with failover,
//! per-channel and per-provider token buckets, retries with backoff and a circuit breaker), email
//! through the email-queue-system's HTTP API, in-app into a durable inbox per user with live push
//! over WebSocket or SSE. Every delivery's state is an event on a log and a row in the database:
//! queryable per notification and per recipient, with the history of its attempts.
//!
//! ```text
//!  Apps ──POST /v1/fanout/notifications──▶ Trigger API ──append──▶ fanout-notifications (4 partitions)
//!        (202 once durable; idempotency key)                              │ one expander per partition, on the
//!                                                                         │ node holding its lease; chunks of
//!                                                                         │ EXPANSION_CHUNK recipients
//!  db: subscribers, topic members ─────────────▶ preferences · quiet hours · digests (db: open digests)
//!                                                                         │
//!      fanout-events (every state) + db: fanout_deliveries ◀── queued / deferred / batched / skipped
//!                               ▲          ◀──── retrying / delivered / failed ──┐ │
//!                               │                                                │ ▼
//!   GET …/notifications/{id} ◀──┤        ┌─ queue fanout.push ──▶ push workers ─┬─▶ provider 1 ─(5xx/timeout)─▶ provider 2
//!   GET …/deliveries/{id}    ◀──┘        ├─ queue fanout.sms  ──▶ sms workers  ─┘   (token buckets per channel and provider,
//!                                        │                                           circuit breaker, backoff)
//!                                        ├─ queue fanout.email ─▶ email workers ──POST /v1/email/messages──▶ email-queue-system
//!                                        └─ queue fanout.in_app ▶ inbox workers ──▶ db: fanout_inbox ──▶ WebSocket / SSE
//!                                                                   (other nodes' connections: through fanout-live)
//! ```
//!
//! # Where the state is
//!
//! Everything goes through the platform's interfaces, so several nodes serve one deployment
//! behind a balancer (`distributed`): the notifications and the delivery events on the stream
//! interface, the channel queues on the queue interface, and the rest in the database (SQLite in
//! the data folder when embedded, the shared PostgreSQL with `--db`): subscribers, topic members,
//! each delivery's latest state (the row points at its event; a row only moves to a later
//! event), open digests, inboxes, the configuration, idempotency keys and the expanders' leases
//! and offsets. The channels' and providers' token buckets are in the shared cache when the node
//! has one (`--cache`, Redis: a rate holds for every node together), else the node's own. The
//! circuit breakers and counters are each node's own.
//!
//! # Routes
//!
//! | route | what |
//! |---|---|
//! | `PUT`/`GET`/`DELETE /v1/fanout/subscribers/{id}` | a subscriber: contacts, timezone, preferences, quiet hours |
//! | `POST /v1/fanout/subscribers` | up to `SUBSCRIBERS_PER_REQUEST_MAX` subscribers created or replaced in one transaction |
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
//! `EXPANDERS` partitions); the 202 follows the append. A notification with an idempotency key
//! gets an id made from the key ([`keyed_id`]): a key seen before answers that id with
//! `duplicate: true` and sends nothing again, and two triggers with one key racing on two nodes
//! both append the same id, whose deliveries are made once (below). Keys are held for
//! `RETENTION_MS`.
//!
//! **Expansion.** One expander per partition reads the log from its committed offset, on the
//! node that holds the partition's lease (`EXPANDER_LEASE_MS`, renewed while it works; a node
//! that stops hands its leases back, one that dies loses them when they run out). Recipients (the
//! users named, then each topic's members in id order from a cursor) are taken in chunks of
//! `EXPANSION_CHUNK`, so a topic of a million members never sits in memory as one batch. For each
//! recipient and channel, [`process::decide`] applies contacts, opt-outs and quiet hours; a
//! category with a digest window batches deliveries (below). The chunk's delivery states are
//! appended to `fanout-events` and written to their rows (with whatever other expanders and the
//! workers hand in meanwhile: one append and one transaction a round, through
//! [`tributary_server::rounds`]; the triggers' notes likewise), then the jobs are published to the
//! channel queues (with the delivery id as the queue's dedup id and, for quiet hours and
//! digests, a delay); the offset is committed once the notification is fully expanded. A crash in
//! between (or a lease taken over) expands it again: deliveries that have a row are not made
//! twice, and those still `queued` are published again under the same dedup id.
//!
//! **Digests.** With `categories.<name>.digest_window_ms`, the first delivery of that category to
//! a user on a channel opens a digest (a row: user, category, channel) and waits in its queue
//! until the window's end; the ones that follow within the window are `batched` into it (no queue
//! message of their own), up to `DIGEST_ITEMS_MAX`. At the window's end one delivery carries every
//! batched notification; each batched delivery then reads `delivered` (or `failed`) too. A
//! delivery batched into a digest that had already gone out (a join racing the send) is found by
//! the upkeep and queued on its own. Critical notifications are never batched.
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
//! (follow it at `/v1/email/messages/{id}`). In-app: the item is written to the user's inbox
//! (`INBOX_ITEMS_MAX` newest kept), then sent to the user's live connections: on this node
//! directly when embedded, through the `fanout-live` topic (which every node follows) on shared
//! backends.
//!
//! **Where the time goes.** The system times its stages (`STAGE_*`), in the dashboard's
//! `metrics.stages_ms` and as `tributary_system_stage_seconds` at `/metrics`: how long a read's
//! oldest notification waited on the log, one read's expansion, how long a batch's oldest
//! delivery waited in its queue, a worker's receive, preparation, sends and settling, and each
//! round of the two writers. A backlog shows as a growing wait before the stage that cannot keep
//! up.
//!
//! # Delivery guarantee
//!
//! At least once per recipient and channel: an acknowledged trigger is expanded and every
//! delivery is sent until taken, failed or out of attempts, also across crashes of any node
//! (every state is durable before the queue message is acked). A crash after a provider took a
//! delivery but before its state was written sends it again. Deliveries are deduplicated by id
//! (dedup id in the queues, and a worker drops a job whose delivery is already final), so a
//! redelivery after a crash is the only duplicate.
//!
//! # What it does not do
//!
//! - Joining a digest is one statement per delivery: a digest category sent to a large topic
//!   expands at the database's pace for single-row updates, not in batches.
//! - A topic's members are read chunk by chunk: a member added or removed during a long expansion
//!   may or may not get that notification.
//! - Quiet hours hold email, push and SMS, not in-app (the inbox is silent by nature).
//! - Providers speak one generic JSON shape over `http://` (no FCM/APNs/Twilio adapters, no TLS
//!   client in this build). No per-user rate limits, no delay or throttle steps of a workflow, no
//!   templates (the trigger carries title, body and data).
//! - The circuit breaker is per node and in memory (closed after a restart). Without a shared
//!   cache the token buckets are too (full after a restart): on N nodes a channel's rate is then
//!   N times its configured rate. With one, a node whose cache does not answer limits on its own
//!   buckets until it answers again (`rate_fallbacks` in the status).
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde_json::json;
use sha2::Digest;
use tokio::sync::broadcast;
use tributary_core::limits::{BATCH_RECORDS_MAX, QUEUE_DELAY_MS_MAX};
use tributary_core::{Record, StoredRecord};
use tributary_engine::StreamError;
use tributary_engine::queue::{Delivery, NewMessage, QUEUE_DEDUP_WINDOW_MS_MAX, QUEUE_DELIVERIES_MAX_MAX, QueueConfig, QueueError, QueueStats, QueueStore, Receipt};
use tributary_engine::stream::{StreamStore, TopicConfig};
use tributary_runtime::SystemMetrics;
use tributary_server::shared_log::{self, Reader, SharedLog};
use tributary_server::webhook::WebhookError;
use tributary_server::rounds::Rounds;
use tributary_server::{ApiError, Gateway, RateLimits, SystemApi, on_backend};
use tributary_sql::sqlx::{self, Row};
use tributary_sql::{Db, Migration, Schema, placeholders, rows_per_statement, value_rows};

use crate::{Context, System};
use process::{Attempt, Channel, Content, DeliveryState, FanoutConfig, InboxItem, Job, Notification, Status, Subscriber, Verdict};

pub const ID: &str = "notification-fanout";
/// Accepted notifications (key = id).
pub const NOTIFICATIONS_TOPIC: &str = "fanout-notifications";
/// Every state of every delivery (key = delivery id, value = the whole state).
pub const EVENTS_TOPIC: &str = "fanout-events";
/// What live inbox connections are sent (key = user, value = the message), on shared backends:
/// every node follows it and passes each message to its own connections of that user.
pub const LIVE_TOPIC: &str = "fanout-live";
/// The queue group of each channel's workers.
pub const SENDER_GROUP: &str = "senders";
/// Partitions of the notifications log, one expander each.
pub const EXPANDERS: u32 = 4;
/// How long a node holds an expander's lease; renewed when half is left.
pub const EXPANDER_LEASE_MS: u64 = 10_000;
/// How often a node without an expander's lease tries to take it.
pub const EXPANDER_LEASE_POLL: Duration = Duration::from_millis(500);
/// Workers per channel queue.
pub const WORKERS_PER_CHANNEL: usize = 4;
/// Deliveries one worker leases at once.
pub const WORKER_BATCH_MAX: usize = 100;
/// Lease of a worker's batch (the default lease of the queues this system creates). A worker
/// renews it every third while it works the batch (providers slower than the lease keep their
/// batch); short, so that a batch held by a node that died comes back soon.
pub const WORKER_LEASE_MS: u64 = 5_000;
/// How long one receive waits.
pub const WORKER_WAIT: Duration = Duration::from_millis(250);
/// Stages timed in the system's metrics (`GET /v1/dashboard`, and `/metrics` as
/// `tributary_system_stage_seconds`), once per read of the log or per worker's batch: how long
/// the oldest notification of a read waited on the log for its expander; one read expanded and
/// committed; how long the oldest delivery of a batch waited in its channel's queue; and a
/// worker's batch: its receive, its preparation (state and subscriber look-ups), its sends, and
/// the writing of its outcomes with the queue's acks.
pub const STAGE_LOG_WAIT: &str = "log_wait";
pub const STAGE_EXPANSION: &str = "expansion";
pub const STAGE_QUEUE_WAIT: &str = "queue_wait";
pub const STAGE_RECEIVE: &str = "worker_receive";
pub const STAGE_PREPARE: &str = "worker_prepare";
pub const STAGE_SEND: &str = "worker_send";
pub const STAGE_SETTLE: &str = "worker_settle";
/// One round of the notes writer (triggers' notes), and of the delivery states writer (appended
/// to the events log, then written to their rows).
pub const STAGE_NOTES_ROUND: &str = "notes_round";
pub const STAGE_STATES_ROUND: &str = "states_round";
/// Notifications an expander reads at once (committed together).
pub const EXPANDER_READ_MAX: usize = 500;
/// Deliveries written and queued together during an expansion.
pub const EXPANSION_CHUNK: usize = 1_000;
/// Furthest ahead a throttled delivery reserves a slot of its channel's bucket.
pub const THROTTLE_HORIZON_MS: u64 = 60_000;
/// How long notifications (and their idempotency keys) and delivery states are kept.
pub const RETENTION_MS: u64 = 3 * 24 * 60 * 60 * 1_000;
/// How long the live topic keeps its messages (a node only reads it live).
pub const LIVE_RETENTION_MS: u64 = 60 * 60 * 1_000;
/// Items one user's inbox keeps (the oldest leave).
pub const INBOX_ITEMS_MAX: usize = 500;
/// Items one inbox page (and a live connection's first message) lists at most.
pub const INBOX_PAGE_MAX: usize = 100;
/// Messages buffered towards one user's live connections; a connection that falls further behind
/// gets the inbox again.
pub const INBOX_LIVE_BUFFER: usize = 256;
/// How often a node reads the configuration again (another node may have changed it).
pub const CONFIG_REFRESH: Duration = Duration::from_secs(1);
/// How often the upkeep looks for deliveries batched into a digest that went out without them.
pub const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// A batched delivery whose digest's first delivery has no row yet is queued on its own once it
/// is this old (the first delivery's expansion failed after the digest was opened).
pub const ORPHAN_AGE_MS: u64 = 60_000;
/// How many times an expander tries to join or open a digest that other expanders keep
/// changing before it gives up (the expansion is retried).
const DIGEST_TURN_TRIES: usize = 8;
/// How often rows older than the retention are deleted.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

const CONFIG_KEY: &str = "config";
/// Where deployments from before the database kept the subscribers, memberships, inboxes and
/// configuration (compacted topics of the embedded engine), and the expanders' offsets (a
/// consumer group); [`Fanout::carry_over`] moves them.
const LEGACY_SUBSCRIBERS_TOPIC: &str = "fanout-subscribers";
const LEGACY_MEMBERS_TOPIC: &str = "fanout-topic-members";
const LEGACY_INBOX_TOPIC: &str = "fanout-inbox";
const LEGACY_CONFIG_TOPIC: &str = "fanout-config";
const LEGACY_EXPANDER_GROUP: &str = "fanout-expanders";

/// The tables: the same SQL on SQLite and PostgreSQL.
const TABLES_V1: &str = "
CREATE TABLE fanout_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL, version BIGINT NOT NULL);
CREATE TABLE fanout_counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO fanout_counters (name, value) VALUES ('subscribers', 0);
INSERT INTO fanout_counters (name, value) VALUES ('topics', 0);
CREATE TABLE fanout_subscribers (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE fanout_topics (topic TEXT PRIMARY KEY, members BIGINT NOT NULL);
CREATE TABLE fanout_members (topic TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (topic, user_id));
CREATE TABLE fanout_notifications (id TEXT PRIMARY KEY, idempotency_key TEXT, log_partition BIGINT NOT NULL, log_offset BIGINT NOT NULL, accepted_ms BIGINT NOT NULL);
CREATE INDEX fanout_notifications_by_time ON fanout_notifications (accepted_ms);
CREATE INDEX fanout_notifications_by_key ON fanout_notifications (idempotency_key);
CREATE TABLE fanout_expanders (log_partition BIGINT PRIMARY KEY, holder TEXT, lease_until_ms BIGINT NOT NULL, next_offset BIGINT NOT NULL);
CREATE TABLE fanout_deliveries (id TEXT PRIMARY KEY, notification TEXT NOT NULL, status TEXT NOT NULL, digest TEXT, event_offset BIGINT NOT NULL, updated_ms BIGINT NOT NULL, state TEXT NOT NULL);
CREATE INDEX fanout_deliveries_by_notification ON fanout_deliveries (notification, id);
CREATE INDEX fanout_deliveries_by_digest ON fanout_deliveries (digest);
CREATE INDEX fanout_deliveries_by_offset ON fanout_deliveries (event_offset);
CREATE TABLE fanout_digests (user_id TEXT NOT NULL, category TEXT NOT NULL, channel TEXT NOT NULL, head TEXT NOT NULL, until_ms BIGINT NOT NULL, members BIGINT NOT NULL, PRIMARY KEY (user_id, category, channel));
CREATE INDEX fanout_digests_by_head ON fanout_digests (head);
CREATE TABLE fanout_inbox (user_id TEXT NOT NULL, id TEXT NOT NULL, created_ms BIGINT NOT NULL, is_read BIGINT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (user_id, id));
CREATE INDEX fanout_inbox_by_time ON fanout_inbox (user_id, created_ms, id);
";

/// The database's migrations.
pub const SCHEMA: Schema = Schema { owner: "fanout", migrations: &[Migration { version: 1, description: "subscribers, topics, deliveries, digests, inboxes, settings and the expanders' leases", sqlite: TABLES_V1, postgres: TABLES_V1 }] };

/// Counters shown by `GET /v1/fanout` and the dashboard (this node's).
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
    orphans_queued: AtomicU64,
}

/// A provider's circuit breaker.
#[derive(Debug, Default, Clone, Copy)]
struct Circuit {
    failures: u32,
    open_until_ms: u64,
}

/// The running system.
pub struct Fanout {
    gateway: Gateway,
    metrics: Arc<SystemMetrics>,
    queues: Arc<dyn QueueStore>,
    streams: Arc<dyn StreamStore>,
    /// The stream interface as the expanders' and the live follower's threads call it.
    log: SharedLog,
    db: Db,
    /// The configuration and its version in the database.
    config: RwLock<(i64, Arc<FanoutConfig>)>,
    /// Serializes this node's configuration writes, so its version only grows.
    config_write: tokio::sync::Mutex<()>,
    /// This node's live inbox connections, by user.
    live: Mutex<HashMap<String, broadcast::Sender<String>>>,
    /// The channels' (`channel/<channel>`) and providers' (`provider/<channel>/<name>`) token
    /// buckets: shared by every node through the shared cache when there is one.
    rates: RateLimits,
    /// Delivery id → the instant its reserved channel token becomes usable.
    reserved: Mutex<HashMap<String, u64>>,
    circuits: Mutex<HashMap<String, Circuit>>,
    /// This node: the prefix of the ids it gives and its name as an expander lease's holder.
    node: String,
    /// Each channel's queue lease, in milliseconds (as the queue was created).
    leases: [u64; 4],
    /// The queue interface delays a publish (`delay_ms`); else (NATS JetStream) a job held for
    /// quiet hours or a digest window is published at once and parked by its worker.
    delays: bool,
    next_id: AtomicU64,
    counts: Counts,
    stopping: Arc<AtomicBool>,
    /// Where notifications are on the log, from triggers and expanders: written a round at a
    /// time, one transaction each.
    notes: Rounds<Note>,
    /// Delivery states from expanders and workers: appended to the events log and written to
    /// their rows a round at a time (one append and one transaction for whatever waits).
    states: Rounds<DeliveryState>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    http: reqwest::Client,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(Fanout::open(context)?)
}

fn queue_config() -> QueueConfig {
    // Throttled deliveries are parked with a nack, which counts as a delivery of the queue
    // message: the workers count attempts themselves, in the delivery states.
    QueueConfig { deliveries_max: QUEUE_DELIVERIES_MAX_MAX, lease_ms_default: WORKER_LEASE_MS, dedup_window_ms: QUEUE_DEDUP_WINDOW_MS_MAX, ..QueueConfig::default() }
}

fn now_ms() -> u64 {
    tributary_core::now_ms().max(0) as u64
}

/// The id of a notification triggered with idempotency key `key`: the same on every node, so a
/// retried trigger names the deliveries it made before.
pub fn keyed_id(key: &str) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("k{hex}")
}

/// A text column holding JSON, read back.
fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, ApiError> {
    serde_json::from_str(text).map_err(|e| ApiError::internal(format!("the database holds an unreadable {what}: {e}")))
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("a value of the system serializes")
}

/// The messages a live inbox connection gets.
fn inbox_message(kind: &str, items: &[InboxItem], ids: &[String], unread: u64) -> String {
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
    subscriber: Option<Arc<Subscriber>>,
}

/// What one send came to.
enum Outcome {
    Delivered { provider: String, attempts: Vec<Attempt>, email_id: Option<String> },
    Rejected { attempts: Vec<Attempt>, reason: String },
    Failed { attempts: Vec<Attempt>, reason: String },
    Throttled { wait_ms: u64 },
}

/// What an expansion read in advance for one read of the log: the subscribers and delivery
/// states of the users the notifications name (one query each for the read, instead of two per
/// notification). Topic members are looked up chunk by chunk instead.
struct Prefetched {
    subscribers: HashMap<String, Arc<Subscriber>>,
    known: HashMap<String, DeliveryState>,
}

/// Deliveries of one read looked up in advance at most (beyond, each notification looks up its
/// own).
const PREFETCH_DELIVERIES_MAX: usize = 10 * EXPANSION_CHUNK;

/// A batch of expanded deliveries, written and queued together.
#[derive(Default)]
struct Expansion {
    /// Deliveries in this batch.
    ids: HashSet<String>,
    /// Deliveries this expansion wrote and queued already (flushed).
    made: HashSet<String>,
    prefetched: Option<Prefetched>,
    states: Vec<DeliveryState>,
    jobs: [Vec<NewMessage>; 4],
    /// An expander's batch: its partition and when it last renewed the partition's lease (a long
    /// expansion renews it as it goes, and stops if another node took it).
    lease: Option<(u32, u64)>,
}

impl Expansion {
    fn len(&self) -> usize {
        self.states.len() + self.jobs.iter().map(Vec::len).sum::<usize>()
    }
}

/// A delivery's queue message: held by the queue until `not_before_ms` when the queue delays
/// publishes (`delays`), else published at once and parked by the worker that leases it.
fn job_message(state: &DeliveryState, content: &Content, now: u64, delays: bool) -> NewMessage {
    let delay = if delays { state.not_before_ms.map_or(0, |at| at.saturating_sub(now)).min(QUEUE_DELAY_MS_MAX) } else { 0 };
    let job = Job { state: state.clone(), content: content.clone() };
    NewMessage::new(serde_json::to_vec(&job).expect("a job serializes")).dedup_id(state.id.clone()).delay_ms(delay)
}

/// Where a notification is on the log, as `fanout_notifications` keeps it (with its key).
struct Note {
    id: String,
    key: Option<String>,
    partition: u32,
    offset: u64,
    accepted_ms: u64,
}

impl Note {
    fn of(partition: u32, offset: u64, notification: &Notification) -> Note {
        Note { id: notification.id.clone(), key: notification.idempotency_key.clone(), partition, offset, accepted_ms: notification.accepted_at_ms }
    }
}

/// Notes written in one round at most.
const NOTES_PER_ROUND_MAX: usize = 1_000;
/// Delivery states recorded in one round at most (more when one caller hands in more).
const STATES_PER_ROUND_MAX: usize = 2_000;

/// One expander's place: the partition, its reader, until when this node holds the partition's
/// lease (0: not held) and the next offset to expand.
struct ExpanderState {
    partition: u32,
    reader: Reader,
    held_until_ms: u64,
    next: u64,
}

impl Fanout {
    /// Create the queues and topics when missing, migrate the database, carry over what an
    /// older deployment kept elsewhere, load the configuration, and start the expanders, the
    /// channel workers, the live follower (shared backends) and the upkeep (on the current tokio
    /// runtime, a worker of a multi-thread one).
    pub fn open(context: &Context) -> anyhow::Result<Arc<Fanout>> {
        let (queues, streams, db) = (context.queues.clone(), context.streams.clone(), context.db()?);
        let setup = async {
            let mut leases = [0; 4];
            for (lease, channel) in leases.iter_mut().zip(Channel::ALL) {
                // A queue made before (another lease, say) is kept as it is.
                match queues.create_queue(channel.queue(), queue_config()).await {
                    Ok(()) | Err(QueueError::AlreadyExists { .. }) => {}
                    Err(error) => return Err(anyhow::Error::from(error)),
                }
                *lease = queues.queue_config(channel.queue()).await?.lease_ms_default;
            }
            let retained = |partitions, retention_ms| TopicConfig { partitions, retention_ms: Some(retention_ms), ..TopicConfig::default() };
            streams.create_topic(NOTIFICATIONS_TOPIC, retained(EXPANDERS, RETENTION_MS)).await?;
            streams.create_topic(EVENTS_TOPIC, retained(1, RETENTION_MS)).await?;
            streams.create_topic(LIVE_TOPIC, retained(1, LIVE_RETENTION_MS)).await?;
            db.migrate(&SCHEMA).await?;
            for partition in 0..EXPANDERS {
                sqlx::query("INSERT INTO fanout_expanders (log_partition, holder, lease_until_ms, next_offset) VALUES ($1, NULL, 0, 0) ON CONFLICT (log_partition) DO NOTHING").bind(i64::from(partition)).execute(db.writer()).await?;
            }
            anyhow::Ok((leases, streams.offsets(LIVE_TOPIC, 0).await?.1))
        };
        let (leases, live_end) = tributary_server::wait_in_place(false, setup).ok_or_else(|| anyhow::anyhow!("{ID} starts on a worker of a multi-thread tokio runtime"))??;
        let stopping = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(SystemMetrics::new(ID));
        let (notes, noter) = Rounds::start("fan-out's notes writer", NOTES_PER_ROUND_MAX, stopping.clone(), {
            let (db, metrics) = (db.clone(), metrics.clone());
            move |notes: Vec<Note>| {
                let (db, metrics) = (db.clone(), metrics.clone());
                async move { metrics.timed(STAGE_NOTES_ROUND, note_notifications(&db, &notes)).await }
            }
        });
        let (states, recorder) = Rounds::start("fan-out's delivery states writer", STATES_PER_ROUND_MAX, stopping.clone(), {
            let (streams, db, metrics) = (streams.clone(), db.clone(), metrics.clone());
            move |states: Vec<DeliveryState>| {
                let (streams, db, metrics) = (streams.clone(), db.clone(), metrics.clone());
                async move { metrics.timed(STAGE_STATES_ROUND, record_states(&streams, &db, &states)).await }
            }
        });
        let system = Arc::new(Fanout {
            gateway: context.gateway.clone(),
            metrics,
            log: SharedLog::current(streams.clone()),
            queues,
            streams,
            db,
            config: RwLock::new((0, Arc::new(FanoutConfig::default()))),
            config_write: tokio::sync::Mutex::new(()),
            live: Mutex::new(HashMap::new()),
            rates: context.rate_limits(ID),
            reserved: Mutex::new(HashMap::new()),
            circuits: Mutex::new(HashMap::new()),
            node: format!("{:x}", tributary_core::unique_u64()),
            leases,
            delays: !context.queues.gaps().iter().any(|gap| gap.case == "delay"),
            next_id: AtomicU64::new(0),
            counts: Counts::default(),
            stopping,
            notes,
            states,
            tasks: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        let loaded = async {
            system.carry_over().await?;
            system.refresh_config().await
        };
        tributary_server::wait_in_place(false, loaded).expect("on the runtime the setup ran on").map_err(|e| anyhow::anyhow!("loading {ID}'s database: {}", e.message))?;
        let mut threads = Vec::new();
        for partition in 0..EXPANDERS {
            let mut state = ExpanderState { partition, reader: Reader::new(&system.log, NOTIFICATIONS_TOPIC, partition), held_until_ms: 0, next: 0 };
            threads.push(shared_log::follow(&format!("fanout-expander-{partition}"), Arc::downgrade(&system), system.stopping.clone(), move |system: &Fanout| system.expander_step(&mut state))?);
        }
        if system.log.shared() {
            let mut reader = Reader::new(&system.log, LIVE_TOPIC, 0);
            let mut next = live_end;
            threads.push(shared_log::follow("fanout-live", Arc::downgrade(&system), system.stopping.clone(), move |system: &Fanout| {
                let records = reader.read(next, BATCH_RECORDS_MAX)?;
                for record in &records {
                    next = record.offset + 1;
                    if let (Some(user), Some(text)) = (&record.key, &record.value) {
                        system.send_live(&String::from_utf8_lossy(user), String::from_utf8_lossy(text).into_owned());
                    }
                }
                Ok::<(), StreamError>(())
            })?);
        }
        *system.threads.lock() = threads;
        let mut tasks = Vec::new();
        for channel in Channel::ALL {
            for n in 0..WORKERS_PER_CHANNEL {
                tasks.push(tokio::spawn(run_sender(system.clone(), channel, n)));
            }
        }
        tasks.push(tokio::spawn(run_upkeep(system.clone())));
        tasks.extend([noter, recorder]);
        *system.tasks.lock() = tasks;
        Ok(system)
    }

    pub fn config(&self) -> Arc<FanoutConfig> {
        self.config.read().1.clone()
    }

    /// Take the configuration from the database when it is newer than this node's.
    async fn refresh_config(&self) -> Result<(), ApiError> {
        let row = sqlx::query("SELECT value, version FROM fanout_settings WHERE name = $1").bind(CONFIG_KEY).fetch_optional(self.db.primary()).await?;
        let Some(row) = row else { return Ok(()) };
        let version: i64 = row.try_get("version")?;
        if version > self.config.read().0 {
            let config: FanoutConfig = from_json("configuration", &row.try_get::<String, _>("value")?)?;
            let mut current = self.config.write();
            if version > current.0 {
                *current = (version, Arc::new(config));
            }
        }
        Ok(())
    }

    fn new_id(&self) -> String {
        format!("{}-{:x}", self.node, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Sleep up to `duration`, less when the system stops.
    async fn pause(&self, duration: Duration) {
        let until = tokio::time::Instant::now() + duration;
        while tokio::time::Instant::now() < until && !self.stopping() {
            tokio::time::sleep(Duration::from_millis(50).min(duration)).await;
        }
    }

    // -----------------------------------------------------------------------------------------
    // The interfaces, called from async code (the embedded engine off the async workers)

    /// Record delivery states: appended to the events log, then written to their rows, with
    /// whatever else waits for the next round (none: no wait for a round).
    async fn record(&self, states: Vec<DeliveryState>) -> Result<(), ApiError> {
        if states.is_empty() {
            return Ok(());
        }
        self.states.submit(states).await
    }

    /// Note notifications read from the log that their triggers did not (a trigger's note
    /// failed): the rest are looked up on a reader, so the writer is not asked for them.
    async fn note_missing(&self, notes: &[(u32, u64, Notification)]) -> Result<(), ApiError> {
        let ids: Vec<String> = notes.iter().map(|(_, _, notification)| notification.id.clone()).collect();
        let mut noted = HashSet::with_capacity(ids.len());
        for row in tributary_sql::rows_in(self.db.primary(), "SELECT id FROM fanout_notifications WHERE id", &ids).await? {
            noted.insert(row.try_get::<String, _>(0)?);
        }
        let missing: Vec<Note> = notes.iter().filter(|(_, _, notification)| !noted.contains(&notification.id)).map(|(partition, offset, notification)| Note::of(*partition, *offset, notification)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.notes.submit(missing).await
    }

    async fn produce(&self, topic: &'static str, records: Vec<Record>) -> Result<Vec<tributary_engine::stream::Produced>, StreamError> {
        let streams = self.streams.clone();
        on_backend(streams.blocking(), async move { streams.produce(topic, records).await }).await
    }

    async fn fetch(&self, topic: &'static str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, StreamError> {
        let streams = self.streams.clone();
        on_backend(streams.blocking(), async move { streams.fetch(topic, partition, from, max).await }).await
    }

    async fn offsets(&self, topic: &'static str, partition: u32) -> Result<(u64, u64), StreamError> {
        let streams = self.streams.clone();
        on_backend(streams.blocking(), async move { streams.offsets(topic, partition).await }).await
    }

    async fn publish(&self, channel: Channel, messages: Vec<NewMessage>) -> Result<(), ApiError> {
        let queues = self.queues.clone();
        on_backend(queues.blocking(), async move { queues.publish(channel.queue(), messages).await }).await?;
        Ok(())
    }

    async fn settle_receipts(&self, channel: Channel, receipts: Vec<Receipt>, nack_delay_ms: Option<u64>) -> Result<(), ApiError> {
        let queues = self.queues.clone();
        on_backend(queues.blocking(), async move {
            match nack_delay_ms {
                None => queues.ack(channel.queue(), SENDER_GROUP, receipts).await,
                Some(delay) => queues.nack(channel.queue(), SENDER_GROUP, receipts, Some(delay)).await,
            }
        })
        .await?;
        Ok(())
    }

    async fn queue_stats(&self, channel: Channel) -> Result<QueueStats, ApiError> {
        let queues = self.queues.clone();
        Ok(on_backend(queues.blocking(), async move { queues.stats(channel.queue()).await }).await?)
    }

    /// Every record of `topic` (every partition) in offset order; none when there is no such
    /// topic.
    async fn read_all(&self, topic: &'static str, mut each: impl FnMut(u32, StoredRecord) -> Result<(), ApiError>) -> Result<(), ApiError> {
        let streams = self.streams.clone();
        let partitions = match on_backend(streams.blocking(), async move { streams.partitions(topic).await }).await {
            Ok(partitions) => partitions,
            Err(StreamError::TopicNotFound(_)) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        for partition in 0..partitions {
            let (mut offset, end) = self.offsets(topic, partition).await?;
            while offset < end {
                let records = self.fetch(topic, partition, offset, BATCH_RECORDS_MAX).await?;
                let Some(last) = records.last() else { break };
                offset = last.offset + 1;
                for record in records {
                    each(partition, record)?;
                }
            }
        }
        Ok(())
    }

    /// Deployments from before the database kept the configuration, subscribers, memberships
    /// and inboxes in compacted topics of the embedded engine (rebuilt in memory at each start),
    /// the expanders' offsets in a consumer group, and rebuilt the delivery index, the open
    /// digests and the idempotency keys from the logs. The first start with the database carries
    /// all of it over (the old topics are left as they are), then notes that it did.
    async fn carry_over(&self) -> Result<(), ApiError> {
        let done = sqlx::query("SELECT value FROM fanout_counters WHERE name = 'carried_over'").fetch_optional(self.db.primary()).await?;
        if done.is_some() {
            return Ok(());
        }
        // Those deployments ran on the embedded engine only.
        if self.streams.blocking() {
            self.carry_over_embedded().await?;
        }
        sqlx::query("INSERT INTO fanout_counters (name, value) VALUES ('carried_over', 1) ON CONFLICT (name) DO NOTHING").execute(self.db.writer()).await?;
        Ok(())
    }

    async fn carry_over_embedded(&self) -> Result<(), ApiError> {
        let mut config = None;
        self.read_all(LEGACY_CONFIG_TOPIC, |_, record| {
            if record.key.as_deref() == Some(CONFIG_KEY.as_bytes()) {
                config = record.value.map(|value| String::from_utf8_lossy(&value).into_owned());
            }
            Ok(())
        })
        .await?;
        if let Some(value) = config {
            from_json::<FanoutConfig>("configuration of fanout-config", &value)?;
            sqlx::query("INSERT INTO fanout_settings (name, value, version) VALUES ($1, $2, 1) ON CONFLICT (name) DO NOTHING").bind(CONFIG_KEY).bind(value).execute(self.db.writer()).await?;
        }
        let mut subscribers: BTreeMap<String, Option<Subscriber>> = BTreeMap::new();
        self.read_all(LEGACY_SUBSCRIBERS_TOPIC, |_, record| {
            let Some(key) = record.key.as_deref() else { return Ok(()) };
            let value = record.value.as_deref().map(|value| from_json("subscriber of fanout-subscribers", &String::from_utf8_lossy(value))).transpose()?;
            subscribers.insert(String::from_utf8_lossy(key).into_owned(), value);
            Ok(())
        })
        .await?;
        let subscribers: Vec<Subscriber> = subscribers.into_values().flatten().collect();
        for chunk in subscribers.chunks(process::SUBSCRIBERS_PER_REQUEST_MAX) {
            self.put_subscribers(chunk).await?;
        }
        let mut members: BTreeMap<(String, String), bool> = BTreeMap::new();
        self.read_all(LEGACY_MEMBERS_TOPIC, |_, record| {
            let Some(key) = record.key.as_deref() else { return Ok(()) };
            if let Some((topic, user)) = String::from_utf8_lossy(key).split_once('/') {
                members.insert((topic.to_string(), user.to_string()), record.value.is_some());
            }
            Ok(())
        })
        .await?;
        let mut by_topic: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ((topic, user), present) in members {
            if present {
                by_topic.entry(topic).or_default().push(user);
            }
        }
        for (topic, users) in by_topic {
            for chunk in users.chunks(process::MEMBERS_PER_REQUEST_MAX) {
                self.change_members(&topic, chunk.to_vec(), Vec::new()).await?;
            }
        }
        let mut inbox: BTreeMap<(String, String), Option<InboxItem>> = BTreeMap::new();
        self.read_all(LEGACY_INBOX_TOPIC, |_, record| {
            let Some(key) = record.key.as_deref() else { return Ok(()) };
            if let Some((user, id)) = String::from_utf8_lossy(key).split_once('/') {
                let item = record.value.as_deref().map(|value| from_json("item of fanout-inbox", &String::from_utf8_lossy(value))).transpose()?;
                inbox.insert((user.to_string(), id.to_string()), item);
            }
            Ok(())
        })
        .await?;
        let items: Vec<(String, InboxItem)> = inbox.into_iter().filter_map(|((user, _), item)| item.map(|item| (user, item))).collect();
        for chunk in items.chunks(rows_per_statement(5)) {
            self.insert_inbox(self.db.writer(), chunk).await?;
        }
        let mut notices = Vec::new();
        self.read_all(NOTIFICATIONS_TOPIC, |partition, record| {
            if let Some(Ok(notification)) = record.value.as_deref().map(serde_json::from_slice::<Notification>) {
                notices.push(Note::of(partition, record.offset, &notification));
            }
            Ok(())
        })
        .await?;
        for chunk in notices.chunks(NOTES_PER_ROUND_MAX) {
            note_notifications(&self.db, chunk).await?;
        }
        let mut latest: HashMap<String, (u64, DeliveryState)> = HashMap::new();
        self.read_all(EVENTS_TOPIC, |_, record| {
            if let Some(Ok(state)) = record.value.as_deref().map(serde_json::from_slice::<DeliveryState>) {
                latest.insert(state.id.clone(), (record.offset, state));
            }
            Ok(())
        })
        .await?;
        let (offsets, states): (Vec<u64>, Vec<DeliveryState>) = latest.into_values().unzip();
        for (offsets, states) in offsets.chunks(BATCH_RECORDS_MAX).zip(states.chunks(BATCH_RECORDS_MAX)) {
            write_rows(&self.db, states, offsets).await?;
        }
        let mut members: HashMap<&str, i64> = HashMap::new();
        for state in states.iter().filter(|s| s.status == Status::Batched) {
            if let Some(head) = &state.digest {
                *members.entry(head.as_str()).or_default() += 1;
            }
        }
        for state in &states {
            if let (Status::Queued | Status::Deferred | Status::Retrying, Some(until)) = (state.status, state.digest_until_ms) {
                self.open_digest(state, until, members.get(state.id.as_str()).copied().unwrap_or(0)).await?;
            }
        }
        for partition in 0..EXPANDERS {
            let streams = self.streams.clone();
            let committed = on_backend(streams.blocking(), async move { streams.committed(NOTIFICATIONS_TOPIC, LEGACY_EXPANDER_GROUP, partition).await }).await?;
            if let Some(committed) = committed {
                sqlx::query("UPDATE fanout_expanders SET next_offset = $1 WHERE log_partition = $2 AND next_offset < $1").bind(committed as i64).bind(i64::from(partition)).execute(self.db.writer()).await?;
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Configuration, subscribers, topics

    /// Replace the configuration (durably, for every node).
    pub async fn set_config(&self, config: FanoutConfig) -> Result<(), ApiError> {
        let _write = self.config_write.lock().await;
        let value = to_json(&config);
        let mut transaction = self.db.writer().begin().await?;
        sqlx::query("INSERT INTO fanout_settings (name, value, version) VALUES ($1, $2, 1) ON CONFLICT (name) DO UPDATE SET value = excluded.value, version = fanout_settings.version + 1")
            .bind(CONFIG_KEY)
            .bind(value)
            .execute(&mut *transaction)
            .await?;
        let version: i64 = sqlx::query("SELECT version FROM fanout_settings WHERE name = $1").bind(CONFIG_KEY).fetch_one(&mut *transaction).await?.try_get(0)?;
        transaction.commit().await?;
        let mut current = self.config.write();
        if version > current.0 {
            *current = (version, Arc::new(config));
        }
        Ok(())
    }

    /// Add `delta` to counter `name` in `transaction`; its value after.
    async fn count(transaction: &mut sqlx::Transaction<'_, sqlx::Any>, name: &str, delta: i64) -> Result<u64, ApiError> {
        let value: i64 = sqlx::query("UPDATE fanout_counters SET value = value + $1 WHERE name = $2 RETURNING value").bind(delta).bind(name).fetch_one(&mut **transaction).await?.try_get(0)?;
        Ok(value.max(0) as u64)
    }

    /// Create or replace `subscribers` (distinct ids) durably, in one transaction: all or none.
    /// How many were new. Refused whole when the new ones would pass `SUBSCRIBERS_MAX`.
    pub async fn put_subscribers(&self, subscribers: &[Subscriber]) -> Result<usize, ApiError> {
        let mut rows: Vec<(String, String)> = subscribers.iter().map(|subscriber| (subscriber.id.clone(), to_json(subscriber))).collect();
        // In id order, so that requests naming some of the same subscribers lock them in one
        // order and cannot deadlock.
        rows.sort_unstable();
        let bind_rows = |sql: String, rows: &[&(String, String)]| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (id, body) in rows {
                query = query.bind(id.clone()).bind(body.clone());
            }
            query
        };
        let mut transaction = self.db.writer().begin().await?;
        let mut created = 0;
        for chunk in rows.chunks(rows_per_statement(2)) {
            let chunk: Vec<&(String, String)> = chunk.iter().collect();
            let sql = format!("INSERT INTO fanout_subscribers (id, body) VALUES {} ON CONFLICT (id) DO NOTHING RETURNING id", value_rows(chunk.len(), 2));
            let inserted = bind_rows(sql, &chunk).fetch_all(&mut *transaction).await?.iter().map(|row| row.try_get::<String, _>(0)).collect::<Result<HashSet<String>, _>>()?;
            created += inserted.len();
            let existing: Vec<&(String, String)> = chunk.into_iter().filter(|(id, _)| !inserted.contains(id)).collect();
            if !existing.is_empty() {
                let sql = format!("INSERT INTO fanout_subscribers (id, body) VALUES {} ON CONFLICT (id) DO UPDATE SET body = excluded.body", value_rows(existing.len(), 2));
                bind_rows(sql, &existing).execute(&mut *transaction).await?;
            }
        }
        if created > 0 && Self::count(&mut transaction, "subscribers", created as i64).await? > process::SUBSCRIBERS_MAX as u64 {
            return Err(ApiError::too_large(format!("there are SUBSCRIBERS_MAX ({}) subscribers", process::SUBSCRIBERS_MAX)));
        }
        transaction.commit().await?;
        Ok(created)
    }

    pub async fn subscriber(&self, id: &str) -> Result<Option<Subscriber>, ApiError> {
        let row = sqlx::query("SELECT body FROM fanout_subscribers WHERE id = $1").bind(id.to_string()).fetch_optional(self.db.primary()).await?;
        row.map(|row| from_json("subscriber", &row.try_get::<String, _>("body")?)).transpose()
    }

    /// The subscribers among `ids`.
    async fn subscribers_of(&self, ids: &[String]) -> Result<HashMap<String, Arc<Subscriber>>, ApiError> {
        let mut unique: Vec<String> = ids.to_vec();
        unique.sort();
        unique.dedup();
        let rows = tributary_sql::rows_in(self.db.primary(), "SELECT id, body FROM fanout_subscribers WHERE id", &unique).await?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            found.insert(row.try_get("id")?, Arc::new(from_json("subscriber", &row.try_get::<String, _>("body")?)?));
        }
        Ok(found)
    }

    /// Delete a subscriber; `false` if there was none.
    pub async fn delete_subscriber(&self, id: &str) -> Result<bool, ApiError> {
        let mut transaction = self.db.writer().begin().await?;
        let deleted = sqlx::query("DELETE FROM fanout_subscribers WHERE id = $1").bind(id.to_string()).execute(&mut *transaction).await?.rows_affected() == 1;
        if deleted {
            Self::count(&mut transaction, "subscribers", -1).await?;
        }
        transaction.commit().await?;
        Ok(deleted)
    }

    /// Add and remove members of a topic (durably, in one transaction); its size after.
    pub async fn change_members(&self, topic: &str, add: Vec<String>, remove: Vec<String>) -> Result<usize, ApiError> {
        let mut transaction = self.db.writer().begin().await?;
        let mut added = 0;
        let mut added_users: Vec<&String> = add.iter().collect();
        added_users.sort();
        added_users.dedup();
        for chunk in added_users.chunks(rows_per_statement(2)) {
            let sql = format!("INSERT INTO fanout_members (topic, user_id) VALUES {} ON CONFLICT (topic, user_id) DO NOTHING", value_rows(chunk.len(), 2));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for user in chunk {
                query = query.bind(topic.to_string()).bind((*user).clone());
            }
            added += query.execute(&mut *transaction).await?.rows_affected() as i64;
        }
        let mut removed = 0;
        for chunk in remove.chunks(rows_per_statement(1)) {
            let sql = format!("DELETE FROM fanout_members WHERE topic = $1 AND user_id IN ({})", placeholders(2, chunk.len()));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(topic.to_string());
            for user in chunk {
                query = query.bind(user.clone());
            }
            removed += query.execute(&mut *transaction).await?.rows_affected() as i64;
        }
        if added > 0 {
            let created = sqlx::query("INSERT INTO fanout_topics (topic, members) VALUES ($1, 0) ON CONFLICT (topic) DO NOTHING").bind(topic.to_string()).execute(&mut *transaction).await?.rows_affected() == 1;
            if created && Self::count(&mut transaction, "topics", 1).await? > process::TOPICS_MAX as u64 {
                return Err(ApiError::too_large(format!("there are TOPICS_MAX ({}) topics", process::TOPICS_MAX)));
            }
        }
        let size = match sqlx::query("UPDATE fanout_topics SET members = members + $1 WHERE topic = $2 RETURNING members").bind(added - removed).bind(topic.to_string()).fetch_optional(&mut *transaction).await? {
            Some(row) => row.try_get::<i64, _>(0)?.max(0) as usize,
            None => 0,
        };
        if size > process::TOPIC_MEMBERS_MAX {
            return Err(ApiError::too_large(format!("topic {topic:?} would hold {size} members; TOPIC_MEMBERS_MAX is {}", process::TOPIC_MEMBERS_MAX)));
        }
        if size == 0 && sqlx::query("DELETE FROM fanout_topics WHERE topic = $1").bind(topic.to_string()).execute(&mut *transaction).await?.rows_affected() == 1 {
            Self::count(&mut transaction, "topics", -1).await?;
        }
        transaction.commit().await?;
        Ok(size)
    }

    /// A topic's size.
    pub async fn topic_size(&self, topic: &str) -> Result<usize, ApiError> {
        let row = sqlx::query("SELECT members FROM fanout_topics WHERE topic = $1").bind(topic.to_string()).fetch_optional(self.db.primary()).await?;
        Ok(row.map(|row| row.try_get::<i64, _>(0)).transpose()?.unwrap_or(0).max(0) as usize)
    }

    /// A page of a topic's members after `after`, by id.
    pub async fn members_after(&self, topic: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>, ApiError> {
        let rows = sqlx::query("SELECT user_id FROM fanout_members WHERE topic = $1 AND user_id > $2 ORDER BY user_id LIMIT $3")
            .bind(topic.to_string())
            .bind(after.unwrap_or("").to_string())
            .bind(limit as i64)
            .fetch_all(self.db.primary())
            .await?;
        Ok(rows.iter().map(|row| row.try_get::<String, _>(0)).collect::<Result<_, _>>()?)
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
        let now = now_ms();
        let accepted = request
            .notifications
            .into_iter()
            .enumerate()
            .map(|(i, new)| {
                let id = new.idempotency_key.as_deref().map_or_else(|| self.new_id(), keyed_id);
                process::accept(i, new, id, now)
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A key seen before (in the database, or earlier in this request) answers its
        // notification's id.
        let keys: Vec<String> = accepted.iter().filter_map(|n| n.idempotency_key.clone()).collect();
        let mut seen: HashMap<String, String> = HashMap::new();
        for row in tributary_sql::rows_in(self.db.primary(), "SELECT id, idempotency_key FROM fanout_notifications WHERE idempotency_key", &keys).await? {
            seen.insert(row.try_get("idempotency_key")?, row.try_get("id")?);
        }
        let mut answers = Vec::with_capacity(accepted.len());
        let mut fresh = Vec::new();
        for notification in accepted {
            if let Some(key) = &notification.idempotency_key {
                if let Some(id) = seen.get(key) {
                    answers.push(process::Triggered { id: id.clone(), duplicate: true });
                    continue;
                }
                seen.insert(key.clone(), notification.id.clone());
            }
            answers.push(process::Triggered { id: notification.id.clone(), duplicate: false });
            fresh.push(notification);
        }
        let duplicates = answers.iter().filter(|a| a.duplicate).count() as u64;
        if !fresh.is_empty() {
            let count = fresh.len() as u64;
            let records: Vec<Record> = fresh.iter().map(|n| Record::keyed(n.id.clone(), serde_json::to_vec(n).expect("a notification serializes"))).collect();
            let produced = self.produce(NOTIFICATIONS_TOPIC, records).await?;
            // Durable from here: its expander notes it too, so a failure to note it now only
            // delays what `GET` and a retried key see.
            let notes: Vec<Note> = fresh.iter().zip(produced).map(|(n, at)| Note::of(at.partition, at.offset, n)).collect();
            if let Err(error) = self.notes.submit(notes).await {
                tracing::warn!("{ID}: noting triggered notifications: {}", error.message);
            }
            self.counts.triggered.fetch_add(count, Ordering::Relaxed);
            self.metrics.messages_in(count);
        }
        self.counts.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        Ok(process::TriggerResponse { notifications: answers })
    }

    /// Notification `id`, read from the log where it was noted.
    async fn notification(&self, id: &str) -> Result<Option<(Notification, u32, u64)>, ApiError> {
        let row = sqlx::query("SELECT log_partition, log_offset FROM fanout_notifications WHERE id = $1").bind(id.to_string()).fetch_optional(self.db.primary()).await?;
        let Some(row) = row else { return Ok(None) };
        let (partition, offset) = (row.try_get::<i64, _>("log_partition")? as u32, row.try_get::<i64, _>("log_offset")? as u64);
        let records = match self.fetch(NOTIFICATIONS_TOPIC, partition, offset, 1).await {
            Ok(records) => records,
            // Retention removed it.
            Err(StreamError::Partition { .. } | StreamError::Log(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let notification = records.into_iter().find(|r| r.offset == offset).and_then(|r| r.value).and_then(|value| serde_json::from_slice(&value).ok());
        Ok(notification.map(|n| (n, partition, offset)))
    }

    // -----------------------------------------------------------------------------------------
    // Expansion

    /// One step of an expander (on its thread): hold the partition's lease, read what follows
    /// its offset, expand it whole, commit. Without the lease it waits and tries again.
    fn expander_step(&self, state: &mut ExpanderState) -> Result<(), ApiError> {
        let now = now_ms();
        if state.held_until_ms < now + EXPANDER_LEASE_MS / 2 {
            match self.log.wait(self.take_lease(state.partition, now))? {
                Some(next) => {
                    if state.held_until_ms < now {
                        state.next = next;
                    }
                    state.held_until_ms = now + EXPANDER_LEASE_MS;
                }
                None => {
                    state.held_until_ms = 0;
                    let until = std::time::Instant::now() + EXPANDER_LEASE_POLL;
                    while std::time::Instant::now() < until && !self.stopping() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    return Ok(());
                }
            }
        }
        let records = state.reader.read(state.next, EXPANDER_READ_MAX)?;
        let Some(last) = records.last().map(|r| r.offset) else { return Ok(()) };
        let started = std::time::Instant::now();
        if let Err(error) = self.log.wait(self.expand_records(state.partition, records)) {
            // Take the lease again (if still this node's) and expand from the committed offset.
            state.held_until_ms = 0;
            return Err(error);
        }
        if self.log.wait(self.commit_expanded(state.partition, last + 1))? {
            self.metrics.stage(STAGE_EXPANSION, started.elapsed());
            state.next = last + 1;
        } else {
            // Another node took the lease: it expands from the committed offset.
            state.held_until_ms = 0;
        }
        Ok(())
    }

    /// Take or renew the lease of `partition`'s expander; the offset to expand from if held.
    async fn take_lease(&self, partition: u32, now: u64) -> Result<Option<u64>, ApiError> {
        let row = sqlx::query("UPDATE fanout_expanders SET holder = $1, lease_until_ms = $2 WHERE log_partition = $3 AND (holder = $1 OR holder IS NULL OR lease_until_ms < $4) RETURNING next_offset")
            .bind(self.node.clone())
            .bind((now + EXPANDER_LEASE_MS) as i64)
            .bind(i64::from(partition))
            .bind(now as i64)
            .fetch_optional(self.db.writer())
            .await?;
        Ok(row.map(|row| row.try_get::<i64, _>(0)).transpose()?.map(|next| next.max(0) as u64))
    }

    /// Commit `partition`'s offset while this node holds its lease; false if it no longer does.
    async fn commit_expanded(&self, partition: u32, next: u64) -> Result<bool, ApiError> {
        let updated = sqlx::query("UPDATE fanout_expanders SET next_offset = $1 WHERE log_partition = $2 AND holder = $3").bind(next as i64).bind(i64::from(partition)).bind(self.node.clone()).execute(self.db.writer()).await?;
        Ok(updated.rows_affected() == 1)
    }

    /// Expand notifications read from `partition`.
    async fn expand_records(&self, partition: u32, records: Vec<StoredRecord>) -> Result<(), ApiError> {
        let mut notes = Vec::with_capacity(records.len());
        for record in records {
            match record.value.as_deref().map(serde_json::from_slice::<Notification>) {
                Some(Ok(notification)) => notes.push((partition, record.offset, notification)),
                _ => tracing::error!(partition, offset = record.offset, "a notification is not readable; skipping it"),
            }
        }
        if let Some(oldest) = notes.iter().map(|(_, _, n)| n.accepted_at_ms).min() {
            self.metrics.stage(STAGE_LOG_WAIT, Duration::from_millis(now_ms().saturating_sub(oldest)));
        }
        self.note_missing(&notes).await?;
        let config = self.config();
        let mut batch = Expansion { lease: Some((partition, now_ms())), ..Expansion::default() };
        let mut users = Vec::new();
        let mut ids = Vec::new();
        for (_, _, notification) in &notes {
            let channels = notification.channels(&config);
            for user in &notification.users {
                users.push(user.clone());
                ids.extend(channels.iter().map(|&channel| process::delivery_id(&notification.id, channel, user)));
            }
        }
        if !ids.is_empty() && ids.len() <= PREFETCH_DELIVERIES_MAX {
            batch.prefetched = Some(Prefetched { subscribers: self.subscribers_of(&users).await?, known: self.states_of(&ids).await? });
        }
        for (_, _, notification) in &notes {
            self.expand(notification, &config, &mut batch).await?;
        }
        self.flush(&mut batch).await
    }

    /// Expand one notification into `batch`, flushing it every `EXPANSION_CHUNK` deliveries.
    async fn expand(&self, notification: &Notification, config: &FanoutConfig, batch: &mut Expansion) -> Result<(), ApiError> {
        // The users a notification names were looked up with the read's (when it was small
        // enough); a topic's members are looked up chunk by chunk.
        let prefetched = batch.prefetched.is_some();
        for users in notification.users.chunks(EXPANSION_CHUNK) {
            self.expand_users(notification, users, config, prefetched, batch).await?;
            if batch.len() >= EXPANSION_CHUNK {
                self.flush(batch).await?;
            }
        }
        for topic in &notification.topics {
            let mut cursor: Option<String> = None;
            loop {
                let chunk = self.members_after(topic, cursor.as_deref(), EXPANSION_CHUNK).await?;
                let Some(last) = chunk.last().cloned() else { break };
                self.expand_users(notification, &chunk, config, false, batch).await?;
                if batch.len() >= EXPANSION_CHUNK {
                    self.flush(batch).await?;
                }
                cursor = Some(last);
            }
        }
        Ok(())
    }

    /// The deliveries of some recipients.
    async fn expand_users(&self, notification: &Notification, users: &[String], config: &FanoutConfig, prefetched: bool, batch: &mut Expansion) -> Result<(), ApiError> {
        let now = now_ms();
        let (channels, content) = (notification.channels(config), notification.content());
        let (channels, content) = (channels.as_slice(), &content);
        let ids: Vec<String> = users.iter().flat_map(|user| channels.iter().map(move |&channel| process::delivery_id(&notification.id, channel, user))).filter(|id| !batch.ids.contains(id) && !batch.made.contains(id)).collect();
        let (subscribers, known) = if let Some(prefetched) = batch.prefetched.as_ref().filter(|_| prefetched) {
            (
                users.iter().filter_map(|user| prefetched.subscribers.get(user).map(|s| (user.clone(), s.clone()))).collect::<HashMap<_, _>>(),
                ids.iter().filter_map(|id| prefetched.known.get(id).map(|s| (id.clone(), s.clone()))).collect::<HashMap<_, _>>(),
            )
        } else {
            (self.subscribers_of(users).await?, self.states_of(&ids).await?)
        };
        for user in users {
            for &channel in channels {
                let id = process::delivery_id(&notification.id, channel, user);
                if batch.ids.contains(&id) || batch.made.contains(&id) {
                    continue;
                }
                if let Some(state) = known.get(&id) {
                    // Expanded before a crash (or by another node): queue again what may not have
                    // reached its queue (the queue's dedup id drops it if it did).
                    if matches!(state.status, Status::Queued | Status::Deferred) {
                        batch.ids.insert(id);
                        batch.jobs[channel.index()].push(job_message(state, content, now, self.delays));
                    }
                    continue;
                }
                let mut state = DeliveryState::queued(notification, channel, user, now);
                let decision = match subscribers.get(user) {
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
                    }
                    process::Decision::Send { not_before_ms } => {
                        if let Some(at) = not_before_ms {
                            state.status = Status::Deferred;
                            state.not_before_ms = Some(at);
                            state.reason = Some("quiet hours".into());
                            self.counts.deferred.fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(window) = config.digest_window_ms(&notification.category).filter(|_| !notification.critical) {
                            let until = not_before_ms.unwrap_or(now) + window;
                            if let Some(head) = self.join_or_open_digest(&state, until, now).await? {
                                state.status = Status::Batched;
                                state.digest = Some(head);
                                state.not_before_ms = None;
                                state.reason = None;
                                self.counts.batched.fetch_add(1, Ordering::Relaxed);
                                batch.states.push(state);
                                continue;
                            }
                            state.digest_until_ms = Some(until);
                            state.not_before_ms = Some(until);
                        }
                        batch.jobs[channel.index()].push(job_message(&state, content, now, self.delays));
                        batch.states.push(state);
                    }
                }
            }
        }
        Ok(())
    }

    /// Join the open digest of `state`'s user, category and channel if its window is still open
    /// and it has room: the digest's first delivery. Otherwise `state` opens the next digest,
    /// until `until`: None. One statement decides, so expanders on several nodes agree.
    async fn join_or_open_digest(&self, state: &DeliveryState, until: u64, now: u64) -> Result<Option<String>, ApiError> {
        // Both statements: $1..$3 the digest's key, $4 and $5 this delivery as its first and
        // the window's end, $6 now, $7 the digest's room.
        let statement = |sql: &'static str| {
            sqlx::query(sql)
                .bind(state.user.clone())
                .bind(state.category.clone())
                .bind(state.channel.as_str())
                .bind(state.id.clone())
                .bind(until as i64)
                .bind(now as i64)
                .bind(process::DIGEST_ITEMS_MAX as i64)
        };
        for _ in 0..DIGEST_TURN_TRIES {
            let joined = statement(
                "INSERT INTO fanout_digests (user_id, category, channel, head, until_ms, members) VALUES ($1, $2, $3, $4, $5, 0) \
                 ON CONFLICT (user_id, category, channel) DO UPDATE SET members = fanout_digests.members + 1 \
                 WHERE fanout_digests.until_ms > $6 AND fanout_digests.members + 1 < $7 RETURNING head",
            )
            .fetch_optional(self.db.writer())
            .await?;
            if let Some(row) = joined {
                let head: String = row.try_get(0)?;
                return Ok((head != state.id).then_some(head));
            }
            // The open digest's window has passed, or it is full: this delivery opens the next,
            // unless another expander did in the meantime (then try to join that one).
            let opened = statement("UPDATE fanout_digests SET head = $4, until_ms = $5, members = 0 WHERE user_id = $1 AND category = $2 AND channel = $3 AND NOT (until_ms > $6 AND members + 1 < $7)").execute(self.db.writer()).await?;
            if opened.rows_affected() == 1 {
                return Ok(None);
            }
        }
        Err(ApiError::internal(format!("the digest of {:?} for {:?} on {} changed under {DIGEST_TURN_TRIES} tries in a row", state.user, state.category, state.channel.as_str())))
    }

    /// Open a digest whose first delivery is `head`, until `until`, holding `members` (replacing
    /// a digest of the same user, category and channel, which keeps its members): a carried-over
    /// deployment's open digests.
    async fn open_digest(&self, head: &DeliveryState, until: u64, members: i64) -> Result<(), ApiError> {
        sqlx::query(
            "INSERT INTO fanout_digests (user_id, category, channel, head, until_ms, members) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (user_id, category, channel) DO UPDATE SET head = excluded.head, until_ms = excluded.until_ms, members = excluded.members",
        )
        .bind(head.user.clone())
        .bind(head.category.clone())
        .bind(head.channel.as_str())
        .bind(head.id.clone())
        .bind(until as i64)
        .bind(members)
        .execute(self.db.writer())
        .await?;
        Ok(())
    }

    /// Write the batch's states (durably), then queue its jobs.
    async fn flush(&self, batch: &mut Expansion) -> Result<(), ApiError> {
        if let Some((partition, renewed_at)) = batch.lease
            && now_ms() >= renewed_at + EXPANDER_LEASE_MS / 3
        {
            let now = now_ms();
            if self.take_lease(partition, now).await?.is_none() {
                return Err(ApiError::internal(format!("another node took the lease of expander {partition} during a long expansion; it expands from the committed offset")));
            }
            batch.lease = Some((partition, now));
        }
        let states = std::mem::take(&mut batch.states);
        let expanded = states.len() as u64;
        self.record(states).await?;
        for (channel, jobs) in Channel::ALL.into_iter().zip(batch.jobs.iter_mut()) {
            let jobs = std::mem::take(jobs);
            if !jobs.is_empty() {
                self.publish(channel, jobs).await?;
            }
        }
        // A later notification of the same read naming these deliveries (the same id appended
        // twice) finds them made. Topic expansions remember nothing: their chunks are large.
        if batch.prefetched.is_none() {
            batch.ids.clear();
        } else {
            batch.made.extend(batch.ids.drain());
        }
        self.counts.expanded.fetch_add(expanded, Ordering::Relaxed);
        Ok(())
    }

    /// The latest states of the deliveries among `ids` that have one.
    async fn states_of(&self, ids: &[String]) -> Result<HashMap<String, DeliveryState>, ApiError> {
        let rows = tributary_sql::rows_in(self.db.primary(), "SELECT state FROM fanout_deliveries WHERE id", ids).await?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let state: DeliveryState = from_json("delivery state", &row.try_get::<String, _>("state")?)?;
            found.insert(state.id.clone(), state);
        }
        Ok(found)
    }

    /// The latest state of delivery `id`.
    pub async fn delivery(&self, id: &str) -> Result<Option<DeliveryState>, ApiError> {
        Ok(self.states_of(&[id.to_string()]).await?.remove(id))
    }

    /// A notification, its deliveries' counts and a page of them.
    pub async fn notification_view(&self, id: &str, after: Option<&str>, limit: usize) -> Result<Option<process::NotificationView>, ApiError> {
        let Some((notification, partition, offset)) = self.notification(id).await? else { return Ok(None) };
        let next: i64 = sqlx::query("SELECT next_offset FROM fanout_expanders WHERE log_partition = $1").bind(i64::from(partition)).fetch_one(self.db.primary()).await?.try_get(0)?;
        let expanded = next.max(0) as u64 > offset;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM fanout_deliveries WHERE notification = $1 GROUP BY status").bind(id.to_string()).fetch_all(self.db.primary()).await?;
        for row in rows {
            counts.insert(row.try_get("status")?, row.try_get::<i64, _>("n")?.max(0) as u64);
        }
        let rows = sqlx::query("SELECT id, state FROM fanout_deliveries WHERE notification = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(id.to_string())
            .bind(after.unwrap_or("").to_string())
            .bind(limit as i64 + 1)
            .fetch_all(self.db.primary())
            .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows.iter().take(limit) {
            let state: DeliveryState = from_json("delivery state", &row.try_get::<String, _>("state")?)?;
            deliveries.push(process::DeliverySummary { id: state.id, status: state.status });
        }
        let next_after = if rows.len() > limit { deliveries.last().map(|d| d.id.clone()) } else { None };
        Ok(Some(process::NotificationView { notification, expanded, counts, deliveries, next_after }))
    }

    // -----------------------------------------------------------------------------------------
    // Sending

    /// Sort a leased batch: duplicates of finished deliveries are acked, throttled ones parked,
    /// the rest made ready with their current state, subscriber and digest members.
    async fn prepare(&self, channel: Channel, deliveries: Vec<Delivery>, config: &FanoutConfig) -> Result<(Vec<Ready>, Vec<Parked>), ApiError> {
        let now = now_ms();
        let mut parked = Vec::new();
        let mut finished = Vec::new();
        let mut jobs = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match serde_json::from_slice::<Job>(&delivery.body) {
                Ok(job) => jobs.push((delivery, job)),
                Err(_) => {
                    tracing::error!(id = %delivery.id, "a job in queue {} is not readable; dropping it", channel.queue());
                    finished.push(delivery.receipt);
                }
            }
        }
        let ids: Vec<String> = jobs.iter().map(|(_, job)| job.state.id.clone()).collect();
        let latest = self.states_of(&ids).await?;
        let mut sendable = Vec::with_capacity(jobs.len());
        let channel_key = format!("channel/{}", channel.as_str());
        for (delivery, job) in jobs {
            let current = latest.get(&job.state.id);
            if current.is_some_and(|s| s.status.is_final()) {
                finished.push(delivery.receipt);
                continue;
            }
            // Held (quiet hours, a digest window) by a queue that does not delay publishes.
            if let Some(at) = job.state.not_before_ms.filter(|at| *at > now + 5) {
                parked.push((delivery.receipt, (at - now).min(QUEUE_DELAY_MS_MAX)));
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
                    let wait = self.rates.take(&channel_key, config.channel_rate(channel), now, THROTTLE_HORIZON_MS).await;
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
            // The job holds the state as queued; after an attempt the row holds the newer one.
            let state = match current {
                Some(current) if delivery.delivery_count > 1 => current.clone(),
                _ => job.state,
            };
            sendable.push((delivery.receipt, state, job.content));
        }
        let users: Vec<String> = if channel == Channel::InApp { Vec::new() } else { sendable.iter().map(|(_, state, _)| state.user.clone()).collect() };
        let subscribers = self.subscribers_of(&users).await?;
        let mut ready = Vec::with_capacity(sendable.len());
        for (receipt, state, content) in sendable {
            let members = if state.digest_until_ms.is_some() { self.take_members(&state.id).await? } else { Vec::new() };
            let subscriber = subscribers.get(&state.user).cloned();
            ready.push(Ready { receipt, state, content, members, subscriber });
        }
        if !finished.is_empty() {
            self.settle_receipts(channel, finished, None).await?;
        }
        Ok((ready, parked))
    }

    /// Close digest `head` to new members, and its members (batched deliveries) with their
    /// content. They stay batched until the digest's send is final, so a retry finds them again.
    async fn take_members(&self, head: &str) -> Result<Vec<(DeliveryState, Content)>, ApiError> {
        sqlx::query("DELETE FROM fanout_digests WHERE head = $1").bind(head.to_string()).execute(self.db.writer()).await?;
        let rows = sqlx::query("SELECT state FROM fanout_deliveries WHERE digest = $1 AND status = 'batched' ORDER BY id").bind(head.to_string()).fetch_all(self.db.primary()).await?;
        let mut contents: HashMap<String, Content> = HashMap::new();
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            let state: DeliveryState = from_json("delivery state", &row.try_get::<String, _>("state")?)?;
            let content = match contents.get(&state.notification) {
                Some(content) => content.clone(),
                None => {
                    let content = match self.notification(&state.notification).await? {
                        Some((notification, _, _)) => notification.content(),
                        None => Content { notification: state.notification.clone(), title: None, body: None, data: None },
                    };
                    contents.insert(state.notification.clone(), content.clone());
                    content
                }
            };
            members.push((state, content));
        }
        Ok(members)
    }

    /// Work one leased batch of `channel`: prepare, send, settle.
    async fn work(self: &Arc<Self>, channel: Channel, deliveries: Vec<Delivery>) -> Result<(), ApiError> {
        let config = self.config();
        if let Some(oldest) = deliveries.iter().map(|d| d.enqueued_at_ms).min() {
            self.metrics.stage(STAGE_QUEUE_WAIT, Duration::from_millis(now_ms().saturating_sub(oldest)));
        }
        let (ready, parked) = self.metrics.timed(STAGE_PREPARE, self.prepare(channel, deliveries, &config)).await?;
        let send = async {
            Ok::<_, ApiError>(match channel {
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
                Channel::InApp => self.write_inbox(ready).await?,
            })
        };
        let outcomes: Vec<(Ready, Outcome)> = self.metrics.timed(STAGE_SEND, send).await?;
        self.metrics.timed(STAGE_SETTLE, self.settle(channel, outcomes, parked, &config)).await
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
        if item.subscriber.is_none() {
            return Outcome::Rejected { attempts: Vec::new(), reason: format!("no subscriber {:?}", item.state.user) };
        }
        let body = Self::provider_body(item, item.subscriber.as_deref());
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
            let wait = self.rates.take(&format!("provider/{key}"), provider.rate(), now, 0).await;
            if wait > 0 {
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
        let address = item.subscriber.as_ref().and_then(|s| s.email.clone()).unwrap_or_default();
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

    /// In-app: write the items to their users' inboxes (durably, the oldest past
    /// `INBOX_ITEMS_MAX` leaving), then send them live.
    async fn write_inbox(&self, ready: Vec<Ready>) -> Result<Vec<(Ready, Outcome)>, ApiError> {
        let now = now_ms();
        let items: Vec<(String, InboxItem)> = ready
            .iter()
            .map(|item| {
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
                (item.state.user.clone(), inbox_item)
            })
            .collect();
        let mut users: Vec<String> = items.iter().map(|(user, _)| user.clone()).collect();
        users.sort();
        users.dedup();
        let mut transaction = self.db.writer().begin().await?;
        for chunk in items.chunks(rows_per_statement(5)) {
            self.insert_inbox(&mut *transaction, chunk).await?;
        }
        for user in &users {
            sqlx::query("DELETE FROM fanout_inbox WHERE user_id = $1 AND id IN (SELECT id FROM fanout_inbox WHERE user_id = $1 ORDER BY created_ms DESC, id DESC LIMIT $2 OFFSET $3)")
                .bind(user.clone())
                .bind(i64::MAX)
                .bind(INBOX_ITEMS_MAX as i64)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        let unread = self.unread_of(&users).await?;
        for (user, item) in &items {
            let message = inbox_message("item", std::slice::from_ref(item), &[], unread.get(user).copied().unwrap_or(0));
            self.announce(user, message).await;
        }
        Ok(ready
            .into_iter()
            .map(|item| (item, Outcome::Delivered { provider: "inbox".into(), attempts: vec![Attempt { at_ms: now, provider: "inbox".into(), result: "delivered".into(), status_code: None, detail: None }], email_id: None }))
            .collect())
    }

    /// Insert inbox items (an item already there, written before a crash, is kept as it is).
    async fn insert_inbox<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(&self, executor: E, items: &[(String, InboxItem)]) -> Result<(), ApiError> {
        let sql = format!("INSERT INTO fanout_inbox (user_id, id, created_ms, is_read, item) VALUES {} ON CONFLICT (user_id, id) DO NOTHING", value_rows(items.len(), 5));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (user, item) in items {
            query = query.bind(user.clone()).bind(item.id.clone()).bind(item.created_at_ms as i64).bind(i64::from(item.read)).bind(to_json(item));
        }
        query.execute(executor).await?;
        Ok(())
    }

    /// The unread counts of `users` (those with none are missing).
    async fn unread_of(&self, users: &[String]) -> Result<HashMap<String, u64>, ApiError> {
        let mut unread = HashMap::with_capacity(users.len());
        for chunk in users.chunks(rows_per_statement(1)) {
            let sql = format!("SELECT user_id, COUNT(*) AS n FROM fanout_inbox WHERE is_read = 0 AND user_id IN ({}) GROUP BY user_id", placeholders(1, chunk.len()));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for user in chunk {
                query = query.bind(user.clone());
            }
            for row in query.fetch_all(self.db.primary()).await? {
                unread.insert(row.try_get("user_id")?, row.try_get::<i64, _>("n")?.max(0) as u64);
            }
        }
        Ok(unread)
    }

    /// Send `message` to `user`'s live connections on every node: through the live topic on
    /// shared backends (every node's follower passes it on), directly when embedded. A message
    /// that cannot be sent is lost to live connections only (logged): the inbox holds the item,
    /// and a connection gets the whole inbox when it (re)connects.
    async fn announce(&self, user: &str, message: String) {
        if !self.log.shared() {
            self.send_live(user, message);
            return;
        }
        if let Err(error) = self.produce(LIVE_TOPIC, vec![Record::keyed(user.to_string(), message)]).await {
            tracing::warn!(user, "{ID}: a live inbox message was not sent: {error}");
        }
    }

    /// Pass `message` to this node's live connections of `user`.
    fn send_live(&self, user: &str, message: String) {
        if let Some(sender) = self.live.lock().get(user) {
            let _ = sender.send(message);
        }
    }

    /// Write the states of a worked batch, then ack what is done and nack what waits.
    async fn settle(&self, channel: Channel, outcomes: Vec<(Ready, Outcome)>, parked: Vec<Parked>, config: &FanoutConfig) -> Result<(), ApiError> {
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
                        waits.push((receipt, delay));
                        states.push(state);
                        continue;
                    }
                }
            };
            // A digest's first delivery keeps its window while it is retried (so that the next
            // attempt takes its members again); once final, it is closed.
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
        self.record(states).await?;
        if !acks.is_empty() {
            self.settle_receipts(channel, acks, None).await?;
        }
        let mut by_delay: BTreeMap<u64, Vec<Receipt>> = BTreeMap::new();
        for (receipt, delay) in waits {
            by_delay.entry(delay).or_default().push(receipt);
        }
        for (delay, receipts) in by_delay {
            self.settle_receipts(channel, receipts, Some(delay)).await?;
        }
        let delivered = latencies.len() as u64;
        self.metrics.messages_out(delivered);
        for latency in latencies {
            self.metrics.latency(latency);
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Upkeep

    /// Queue on its own each delivery batched into a digest that will not carry it: the
    /// digest's first delivery is final (the join raced its send), or has had no row for
    /// `ORPHAN_AGE_MS` (its expansion failed after the digest was opened). Several nodes may do
    /// it at once: the queue's dedup id keeps one job.
    async fn queue_orphans(&self) -> Result<usize, ApiError> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT m.state AS state FROM fanout_deliveries m LEFT JOIN fanout_deliveries h ON h.id = m.digest \
             WHERE m.digest IS NOT NULL AND m.status = 'batched' \
             AND (h.status IN ('delivered', 'failed', 'skipped') OR (h.id IS NULL AND m.updated_ms < $1)) LIMIT $2",
        )
        .bind(now.saturating_sub(ORPHAN_AGE_MS) as i64)
        .bind(EXPANSION_CHUNK as i64)
        .fetch_all(self.db.primary())
        .await?;
        let mut batch = Expansion::default();
        for row in &rows {
            let mut state: DeliveryState = from_json("delivery state", &row.try_get::<String, _>("state")?)?;
            let content = match self.notification(&state.notification).await? {
                Some((notification, _, _)) => notification.content(),
                None => Content { notification: state.notification.clone(), title: None, body: None, data: None },
            };
            state.status = Status::Queued;
            state.digest = None;
            state.updated_at_ms = now;
            state.reason = Some("its digest went out without it; sent on its own".into());
            batch.jobs[state.channel.index()].push(job_message(&state, &content, now, self.delays));
            batch.states.push(state);
        }
        let queued = batch.states.len();
        self.flush(&mut batch).await?;
        self.counts.orphans_queued.fetch_add(queued as u64, Ordering::Relaxed);
        Ok(queued)
    }

    /// Delete the rows retention has left behind: deliveries whose event the log no longer
    /// holds, notifications (and their keys) older than `RETENTION_MS`, expired digests that
    /// nothing can join. The number of rows deleted.
    async fn prune(&self) -> Result<u64, ApiError> {
        let (start, _) = self.offsets(EVENTS_TOPIC, 0).await?;
        let cutoff = now_ms().saturating_sub(RETENTION_MS) as i64;
        let mut removed = sqlx::query("DELETE FROM fanout_deliveries WHERE event_offset < $1").bind(start as i64).execute(self.db.writer()).await?.rows_affected();
        removed += sqlx::query("DELETE FROM fanout_notifications WHERE accepted_ms < $1").bind(cutoff).execute(self.db.writer()).await?.rows_affected();
        removed += sqlx::query("DELETE FROM fanout_digests WHERE until_ms < $1").bind(cutoff).execute(self.db.writer()).await?.rows_affected();
        Ok(removed)
    }

    // -----------------------------------------------------------------------------------------
    // Inbox

    /// The newest `limit` items of `user`'s inbox (newest first) and the unread count.
    pub async fn inbox_page(&self, user: &str, limit: usize) -> Result<(Vec<InboxItem>, u64), ApiError> {
        let rows = sqlx::query("SELECT item, is_read FROM fanout_inbox WHERE user_id = $1 ORDER BY created_ms DESC, id DESC LIMIT $2").bind(user.to_string()).bind(limit as i64).fetch_all(self.db.primary()).await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            let mut item: InboxItem = from_json("inbox item", &row.try_get::<String, _>("item")?)?;
            item.read = row.try_get::<i64, _>("is_read")? != 0;
            items.push(item);
        }
        let unread = self.unread_of(&[user.to_string()]).await?.remove(user).unwrap_or(0);
        Ok((items, unread))
    }

    /// Mark items read (all with `all`), durably; the ids marked now and the unread count.
    pub async fn mark_read(&self, user: &str, ids: &[String], all: bool) -> Result<(Vec<String>, u64), ApiError> {
        let mut marked = Vec::new();
        if all {
            for row in sqlx::query("UPDATE fanout_inbox SET is_read = 1 WHERE user_id = $1 AND is_read = 0 RETURNING id").bind(user.to_string()).fetch_all(self.db.writer()).await? {
                marked.push(row.try_get::<String, _>(0)?);
            }
        } else {
            for chunk in ids.chunks(rows_per_statement(1)) {
                let sql = format!("UPDATE fanout_inbox SET is_read = 1 WHERE user_id = $1 AND is_read = 0 AND id IN ({}) RETURNING id", placeholders(2, chunk.len()));
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(user.to_string());
                for id in chunk {
                    query = query.bind(id.clone());
                }
                for row in query.fetch_all(self.db.writer()).await? {
                    marked.push(row.try_get::<String, _>(0)?);
                }
            }
        }
        let unread = self.unread_of(&[user.to_string()]).await?.remove(user).unwrap_or(0);
        if !marked.is_empty() {
            self.announce(user, inbox_message("read", &[], &marked, unread)).await;
        }
        Ok((marked, unread))
    }

    /// Listen to `user`'s inbox: the receiver, then the current inbox as the first message.
    pub async fn watch_inbox(&self, user: &str) -> Result<(broadcast::Receiver<String>, String), ApiError> {
        let receiver = self.live.lock().entry(user.to_string()).or_insert_with(|| broadcast::channel(INBOX_LIVE_BUFFER).0).subscribe();
        match self.inbox_snapshot(user).await {
            Ok(snapshot) => Ok((receiver, snapshot)),
            Err(error) => {
                drop(receiver);
                self.unwatch_inbox(user);
                Err(error)
            }
        }
    }

    pub async fn inbox_snapshot(&self, user: &str) -> Result<String, ApiError> {
        let (items, unread) = self.inbox_page(user, INBOX_PAGE_MAX).await?;
        Ok(inbox_message("inbox", &items, &[], unread))
    }

    /// Forget `user`'s live channel once nobody listens.
    pub fn unwatch_inbox(&self, user: &str) {
        let mut live = self.live.lock();
        if live.get(user).is_some_and(|s| s.receiver_count() == 0) {
            live.remove(user);
        }
    }

    /// Queue depths, expansion lag and counters.
    pub async fn overview(&self) -> serde_json::Value {
        let c = &self.counts;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut queues = serde_json::Map::new();
        let mut delivered = serde_json::Map::new();
        let mut failed = serde_json::Map::new();
        for channel in Channel::ALL {
            let shown = match self.queue_stats(channel).await {
                // Before any worker received, the senders' group does not exist yet: everything waits.
                Ok(stats) => match stats.groups.iter().find(|g| g.name == SENDER_GROUP) {
                    Some(g) => json!({"depth": g.depth, "delayed": g.delayed, "in_flight": g.in_flight}),
                    None => json!({"depth": stats.published_total, "delayed": 0, "in_flight": 0}),
                },
                Err(error) => json!({"error": error.message}),
            };
            queues.insert(channel.as_str().into(), shown);
            delivered.insert(channel.as_str().into(), json!(load(&c.delivered[channel.index()])));
            failed.insert(channel.as_str().into(), json!(load(&c.failed[channel.index()])));
        }
        let mut lag = 0;
        let mut leases = Vec::new();
        if let Ok(rows) = sqlx::query("SELECT log_partition, holder, next_offset FROM fanout_expanders ORDER BY log_partition").fetch_all(self.db.primary()).await {
            for row in rows {
                let partition = row.try_get::<i64, _>("log_partition").unwrap_or(0) as u32;
                let next = row.try_get::<i64, _>("next_offset").unwrap_or(0).max(0) as u64;
                let holder: Option<String> = row.try_get("holder").unwrap_or(None);
                let (_, end) = self.offsets(NOTIFICATIONS_TOPIC, partition).await.unwrap_or((0, 0));
                lag += end.saturating_sub(next);
                leases.push(json!({"partition": partition, "holder": holder, "this_node": holder.as_deref() == Some(self.node.as_str())}));
            }
        }
        let counter = |name: &'static str| async move { sqlx::query("SELECT value FROM fanout_counters WHERE name = $1").bind(name).fetch_one(self.db.primary()).await.and_then(|row| row.try_get::<i64, _>(0)).ok() };
        let open_circuits: Vec<String> = {
            let now = now_ms();
            self.circuits.lock().iter().filter(|(_, c)| c.open_until_ms > now).map(|(k, _)| k.clone()).collect()
        };
        json!({
            "queues": queues,
            "expansion_lag": lag,
            "expanders": leases,
            "counts": {
                "triggered": load(&c.triggered), "duplicates": load(&c.duplicates), "deliveries": load(&c.expanded),
                "skipped": load(&c.skipped), "deferred": load(&c.deferred), "batched": load(&c.batched),
                "delivered": delivered, "failed": failed, "retried": load(&c.retried), "throttled": load(&c.throttled),
                "failovers": load(&c.failovers), "circuit_opened": load(&c.circuit_opened), "orphans_queued": load(&c.orphans_queued),
            },
            "open_circuits": open_circuits,
            "rate_limits": if self.rates.is_shared() { "shared" } else { "node" },
            "rate_fallbacks": self.rates.fallbacks(),
            "subscribers": counter("subscribers").await,
            "topics": counter("topics").await,
            "backends": {"queues": self.queues.backend(), "streams": self.streams.backend(), "db": format!("{:?}", self.db.dialect()).to_lowercase()},
        })
    }
}

/// One channel worker: lease, send, settle, repeat, until the system stops.
async fn run_sender(system: Arc<Fanout>, channel: Channel, n: usize) {
    let consumer = format!("{}-{}-{n}", system.node, channel.as_str());
    while !system.stopping() {
        let queues = system.queues.clone();
        let name = consumer.clone();
        let started = std::time::Instant::now();
        let received = on_backend(queues.blocking(), async move { queues.receive(channel.queue(), SENDER_GROUP, &name, WORKER_BATCH_MAX, None, WORKER_WAIT).await }).await;
        let deliveries = match received {
            Ok(deliveries) if deliveries.is_empty() => continue,
            Ok(deliveries) => {
                system.metrics.stage(STAGE_RECEIVE, started.elapsed());
                deliveries
            }
            Err(error) => {
                if !system.stopping() {
                    tracing::warn!("fan-out worker {consumer}: receive: {error}");
                }
                system.pause(Duration::from_secs(1)).await;
                continue;
            }
        };
        let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
        let worked = tokio::select! {
            worked = system.work(channel, deliveries) => worked,
            never = tributary_server::renew_leases(&system.queues, channel.queue(), SENDER_GROUP, receipts, system.leases[channel.index()]) => match never {},
        };
        if let Err(error) = worked {
            system.metrics.error();
            tracing::warn!("fan-out worker {consumer}: {}", error.message);
            system.pause(Duration::from_millis(200)).await;
        }
    }
}

/// Note where notifications are on the log (once per id), in one transaction: a round of the
/// notes writer, or the carry-over.
async fn note_notifications(db: &Db, notes: &[Note]) -> Result<(), ApiError> {
    let mut transaction = db.writer().begin().await?;
    for chunk in notes.chunks(rows_per_statement(5)) {
        let sql = format!("INSERT INTO fanout_notifications (id, idempotency_key, log_partition, log_offset, accepted_ms) VALUES {} ON CONFLICT (id) DO NOTHING", value_rows(chunk.len(), 5));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for note in chunk {
            query = query.bind(note.id.clone()).bind(note.key.clone()).bind(i64::from(note.partition)).bind(note.offset as i64).bind(note.accepted_ms as i64);
        }
        query.execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Append delivery states to the events log (durably), then point their rows at them: a round
/// of the delivery states writer.
async fn record_states(streams: &Arc<dyn StreamStore>, db: &Db, states: &[DeliveryState]) -> Result<(), ApiError> {
    if states.is_empty() {
        return Ok(());
    }
    let mut offsets = Vec::with_capacity(states.len());
    for chunk in states.chunks(BATCH_RECORDS_MAX) {
        let records: Vec<Record> = chunk.iter().map(|s| Record::keyed(s.id.clone(), serde_json::to_vec(s).expect("a state serializes"))).collect();
        let streams = streams.clone();
        let produced = on_backend(streams.blocking(), async move { streams.produce(EVENTS_TOPIC, records).await }).await?;
        offsets.extend(produced.iter().map(|p| p.offset));
    }
    write_rows(db, states, &offsets).await
}

/// Upsert the rows of `states` (stored at `offsets`): a row only moves to a later offset,
/// whoever writes last.
async fn write_rows(db: &Db, states: &[DeliveryState], offsets: &[u64]) -> Result<(), ApiError> {
    // One row per delivery per statement (PostgreSQL refuses to update a row twice in one).
    let mut latest: HashMap<&str, (u64, &DeliveryState)> = HashMap::new();
    for (state, &offset) in states.iter().zip(offsets) {
        let entry = latest.entry(state.id.as_str()).or_insert((offset, state));
        if offset > entry.0 {
            *entry = (offset, state);
        }
    }
    let rows: Vec<(u64, &DeliveryState)> = latest.into_values().collect();
    let mut transaction = db.writer().begin().await?;
    for chunk in rows.chunks(rows_per_statement(7)) {
        let sql = format!(
            "INSERT INTO fanout_deliveries (id, notification, status, digest, event_offset, updated_ms, state) VALUES {} \
             ON CONFLICT (id) DO UPDATE SET notification = excluded.notification, status = excluded.status, digest = excluded.digest, \
             event_offset = excluded.event_offset, updated_ms = excluded.updated_ms, state = excluded.state \
             WHERE fanout_deliveries.event_offset < excluded.event_offset",
            value_rows(chunk.len(), 7)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (offset, state) in chunk {
            let digest = state.digest.clone().filter(|_| state.status == Status::Batched);
            query = query.bind(state.id.clone()).bind(state.notification.clone()).bind(state.status.as_str()).bind(digest).bind(*offset as i64).bind(state.updated_at_ms as i64).bind(to_json(*state));
        }
        query.execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// The node's upkeep: the configuration other nodes wrote, orphaned digest members, retention.
async fn run_upkeep(system: Arc<Fanout>) {
    let mut swept_at = tokio::time::Instant::now();
    let mut pruned_at = tokio::time::Instant::now();
    while !system.stopping() {
        system.pause(CONFIG_REFRESH).await;
        if system.stopping() {
            break;
        }
        if let Err(error) = system.refresh_config().await {
            tracing::warn!("{ID}: reading the configuration: {}", error.message);
        }
        if swept_at.elapsed() >= ORPHAN_SWEEP_INTERVAL {
            swept_at = tokio::time::Instant::now();
            match system.queue_orphans().await {
                Ok(0) => {}
                Ok(queued) => tracing::info!("{ID}: queued {queued} deliveries on their own whose digest went out without them"),
                Err(error) => tracing::warn!("{ID}: looking for orphaned digest members: {}", error.message),
            }
        }
        if pruned_at.elapsed() >= PRUNE_INTERVAL {
            pruned_at = tokio::time::Instant::now();
            match system.prune().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!("{ID}: deleted {removed} rows older than the retention"),
                Err(error) => tracing::warn!("{ID}: pruning rows: {}", error.message),
            }
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
        tributary_server::wait_in_place(false, self.overview()).unwrap_or_else(|| json!({"error": "the backends cannot be asked from here"}))
    }

    /// Stop the expanders and workers: each finishes the step or batch it holds, then leaves.
    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Every worker and expander has left; the expanders' leases are handed back, so another
    /// node takes them at once.
    fn stopped(&self) -> tributary_engine::BoxFuture<'_, ()> {
        Box::pin(async move {
            let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
            for task in tasks {
                let _ = task.await;
            }
            let threads: Vec<_> = std::mem::take(&mut *self.threads.lock());
            let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|thread| drop(thread.join()))).await;
            if let Err(error) = sqlx::query("UPDATE fanout_expanders SET holder = NULL, lease_until_ms = 0 WHERE holder = $1").bind(self.node.clone()).execute(self.db.writer()).await {
                tracing::warn!("{ID}: handing back the expanders' leases: {error}");
            }
        })
    }
}
