//! email-queue-system: asynchronous email delivery, as a user of SendGrid, Postmark or KumoMTA
//! expects it. Applications POST emails; each is durably queued before the answer (202), then
//! sender workers hand it to the configured SMTP relay, at most at the rate its recipient domain
//! allows, retrying 4xx answers with backoff; 5xx answers are bounces (hard, soft or block), and
//! hard bounces and complaints put the address on the suppression list. Every change of an
//! email's state is an event on a log, POSTed to a webhook, signed; the status DB keeps each
//! email's latest state, the suppression list and the configuration.
//!
//! ```text
//!  Applications ──POST /v1/email/messages──▶ Email API ──┬─▶ queue email.transactional ──▶ 8 sender workers ─┐
//!                 (202 once durable)          │ suppressed? ─▶ queue email.bulk ─────────▶ 4 sender workers ─┤
//!                                             │                                                             │
//!                                             │      per-domain token buckets ◀──────────────────────────────┤
//!                                             │                                                             ▼
//!                                             │                                          SMTP relay (pooled connections)
//!                                             ▼                                                             │
//!               events log  email-events ◀── queued / suppressed / deferred / delivered / bounced / complained
//!               (1 partition, 7 days)  ──▶ webhook worker (one per deployment, a lease in the DB)
//!                                          ──signed POST (HMAC-SHA256), retried──▶ your endpoint
//!               status DB   email_status (id → latest event) ──▶ GET /v1/email/messages/{id}
//!                           email_suppressions ◀── hard bounces, complaints, manual entries
//!                           email_settings (the configuration), email_webhook (lease, replay),
//!                           email_domain_rates (each recipient domain's token bucket)
//! ```
//!
//! # Routes
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/email/messages` | queue 1..`EMAILS_PER_REQUEST_MAX` emails; 202 `{"messages":[{id,status}]}` once durable |
//! | `GET /v1/email/messages/{id}` | the email's status, SMTP reply, attempts, and its events newest first |
//! | `GET /v1/email/events` | page through the events log (`from_offset`, `limit`) |
//! | `GET /v1/email` | queue depths, in flight, counters, the webhook's position and last error |
//! | `GET`/`PUT /v1/email/config` | relay, webhook, per-domain rates, retry policy (persisted) |
//! | `GET /v1/email/suppressions`, `GET`/`PUT`/`DELETE …/{address}` | the suppression list |
//! | `POST /v1/email/complaints` | feedback-loop complaints: suppress, and a `complained` event |
//! | `POST /v1/email/webhook/replay` | POST the events again from an offset |
//!
//! **Where state lives.** Everything goes through the [`Context`]'s interfaces, so the system
//! runs on one machine and on several nodes alike: the two queues on the queue interface (the
//! engine's queues, or NATS JetStream), the events log on the stream interface, and the status
//! DB on the db component ([`tributary_sql`]: the embedded SQLite file, or PostgreSQL shared by
//! the nodes). Its tables are migrations in this file ([`SCHEMA`]). A data folder from before
//! the status DB (configuration and suppressions in compacted topics) is carried over at its
//! first start ([`EmailSystem::carry_over`]).
//!
//! **Accept.** Each email names one recipient and a class: `transactional` or `bulk`, two
//! queues with their own workers (8 and 4), so a campaign never delays a password reset.
//! The 202 is sent after the email is in its queue, its `queued` event is on the log and its
//! status row is written. A recipient on the suppression list is not queued: the answer and
//! the log say `suppressed` (SendGrid's "dropped").
//!
//! **Send.** A worker leases a batch, checks the suppression list again, then takes a token of
//! the recipient domain's bucket (rate and burst per domain, configurable; default 100/s; the
//! buckets are rows of the status DB, so every node draws from the same one). A
//! domain out of tokens gets its email parked in the queue until its reserved slot (a nack with
//! that delay: it does not count as an attempt). The email is sent over a pool of SMTP
//! connections to the relay. The reply decides ([`process::classify`]): 2xx `delivered` (handed
//! off); 4xx or no answer `deferred`, retried after `base × 2^(attempt−1)` (default 1 min,
//! doubling, capped at 1 h) up to `retry.attempts` (3) retries, then `bounced` soft; 5xx
//! `bounced` hard (5.1.x; the address is suppressed), soft (5.2.x mailbox full, 5.3.4) or block
//! (5.7.x policy). The event is durable before the queue message is acked.
//!
//! **Status and webhooks.** Events live on the topic `email-events` (key = email id, value = the
//! email's whole status as JSON, with the offset of its previous event), kept 7 days. The row of
//! an email in `email_status` holds its latest event and that event's offset; an update only
//! ever moves a row to a later offset, so concurrent writers (several workers or nodes) leave
//! the latest. A status query reads the row, then the earlier events by their offsets. The
//! webhook worker reads the log from its committed offset (consumer group `email-webhook`),
//! POSTs batches of up to 100 events as a JSON array, signed (`X-Tributary-Signature:
//! t=…,v1=HMAC-SHA256(secret, "t.body")`), retries with backoff until a 2xx, then commits.
//! Events carry their log offset: receivers deduplicate by it. With several nodes, the one
//! holding the webhook lease (`WEBHOOK_LEASE_MS`, renewed while it works, given back when it
//! stops) posts; another takes over when the lease runs out.
//!
//! # Delivery guarantee
//!
//! At-least-once hand-off: an accepted email is sent until the relay answers (or it bounces), also
//! across crashes; a crash after the relay took it but before its event was written sends it
//! again. Webhook events are delivered at least once, in log order. A worker renews the lease of
//! the batch it works every third of the queue's lease (`WORKER_LEASE_MS`, 30 s, for the queues
//! it creates; a queue made before keeps its own lease), so an email leased by a worker that died
//! comes back within one lease, and one on a slow relay is not leased twice.
//!
//! # What it does not do
//!
//! - One relay (a smarthost): no MX lookup, no direct-to-MX delivery, no IP pools, no DKIM
//!   signing (the relay's job in this design).
//! - No automatic throttling that adapts to replies; rates are configured.
//! - Transactional and bulk mail share each domain's bucket. A reservation (the slot a parked
//!   email waits for) is the reserving node's: an email redelivered to another node reserves a
//!   second slot, so a domain gets its rate or less, never more.
//! - No idempotency key on send: a retried request after a lost answer queues the emails again.
//! - A send answered 5xx may have been partly queued (queue, log and DB are three writes); a
//!   crash between an event's append and its status row leaves the row at the previous event
//!   until the email's next event.
//! - Webhook endpoints are `http://` (no TLS client in this build); no opens or clicks tracking.
//! - The status of an email older than the log's retention (7 days) is gone (404); rows older
//!   than that are deleted every `STATUS_PRUNE_INTERVAL`.
//! - The counters of `GET /v1/email` are the answering node's; queue depths, the suppression
//!   list and the webhook's position are the deployment's.
//! - A configuration written through one node reaches the others within `CONFIG_REFRESH`.
//! - Hand-off throughput is below the seed's 10,000/s on 2 cores (see docs/benchmarks.md):
//!   accepting keeps up, the queues absorb the difference.

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use tributary_core::{Record, StoredRecord};
use tributary_core::limits::{BATCH_RECORDS_MAX, QUEUE_DELAY_MS_MAX};
use tributary_engine::queue::{Delivery, NewMessage, QUEUE_DELIVERIES_MAX_MAX, QueueConfig, QueueError, QueueStats, QueueStore, Receipt};
use tributary_engine::StreamError;
use tributary_engine::stream::{StreamStore, TopicConfig};
use tributary_runtime::SystemMetrics;
use tributary_runtime::shaping::{Rate, TokenBucket};
use tributary_server::{ApiError, SystemApi, on_backend};
use tributary_sql::sqlx::{self, Row};
use tributary_sql::{Db, Migration, Read, Schema, rows_per_statement, value_rows};

use crate::{Context, System};
use process::{BounceKind, Class, Email, EmailConfig, Event, EventKind, EventView, RelaySpec, RelayTls, SmtpReply, Suppression, SuppressionReason, Verdict};

pub const ID: &str = "email-queue-system";
/// The queue of transactional mail.
pub const TRANSACTIONAL_QUEUE: &str = "email.transactional";
/// The queue of bulk mail.
pub const BULK_QUEUE: &str = "email.bulk";
/// The events log: every state change of every email.
pub const EVENTS_TOPIC: &str = "email-events";
/// The queue group of the sender workers.
pub const SENDER_GROUP: &str = "senders";
/// The stream consumer group of the webhook worker on the events log.
pub const WEBHOOK_GROUP: &str = "email-webhook";
/// Sender workers of the transactional queue.
pub const TRANSACTIONAL_WORKERS: usize = 8;
/// Sender workers of the bulk queue.
pub const BULK_WORKERS: usize = 4;
/// Emails one worker leases at once.
pub const WORKER_BATCH_MAX: usize = 64;
/// Lease of a worker's batch (the default lease of the queues this system creates). A worker
/// renews it every third of the queue's lease while it works the batch, so a slow relay keeps
/// its batch, and the batch of a node that died is leased again within this.
pub const WORKER_LEASE_MS: u64 = 30_000;
/// How long one receive of a worker waits before it looks at the configuration again.
pub const WORKER_WAIT: Duration = Duration::from_millis(250);
/// Furthest ahead a throttled email reserves a slot of its domain's bucket.
pub const THROTTLE_HORIZON_MS: u64 = 60_000;
/// Events per webhook POST.
pub const WEBHOOK_BATCH_EVENTS: usize = 100;
/// How long the webhook worker waits before it reads the log again when it had nothing new.
pub const WEBHOOK_IDLE_POLL: Duration = Duration::from_millis(100);
/// How long the node posting webhooks holds the deployment's lease; renewed when half is left.
pub const WEBHOOK_LEASE_MS: u64 = 10_000;
/// How long the events are kept.
pub const EVENTS_RETENTION_MS: u64 = 7 * 24 * 60 * 60 * 1_000;
/// Addresses the suppression list holds at most.
pub const SUPPRESSIONS_MAX: usize = 10_000_000;
/// How often a node reads the configuration again (another node may have changed it).
pub const CONFIG_REFRESH: Duration = Duration::from_secs(1);
/// How often the status rows of emails whose events retention removed are deleted.
pub const STATUS_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

const CONFIG_KEY: &str = "config";
/// Where deployments from before the status DB kept the configuration ([`EmailSystem::carry_over`]).
const LEGACY_CONFIG_TOPIC: &str = "email-config";
/// Where deployments from before the status DB kept the suppression list.
const LEGACY_SUPPRESSIONS_TOPIC: &str = "email-suppressions";

/// The tables of the status DB: the same SQL on SQLite and PostgreSQL.
const TABLES_V1: &str = "
CREATE TABLE email_status (id TEXT PRIMARY KEY, event_offset BIGINT NOT NULL, event TEXT NOT NULL, updated_ms BIGINT NOT NULL);
CREATE INDEX email_status_by_offset ON email_status (event_offset);
CREATE TABLE email_suppressions (address TEXT PRIMARY KEY, reason TEXT NOT NULL, at_ms BIGINT NOT NULL, message_id TEXT, detail TEXT);
CREATE TABLE email_counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO email_counters (name, value) VALUES ('suppressions', 0);
CREATE TABLE email_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL, version BIGINT NOT NULL);
CREATE TABLE email_webhook (name TEXT PRIMARY KEY, holder TEXT, lease_until_ms BIGINT NOT NULL, replay_from BIGINT);
INSERT INTO email_webhook (name, holder, lease_until_ms, replay_from) VALUES ('webhook', NULL, 0, NULL);
";

/// The token bucket of each recipient domain, shared by every node (GCRA: the bucket's
/// theoretical arrival time, in milliseconds).
const TABLES_V2: &str = "CREATE TABLE email_domain_rates (domain TEXT PRIMARY KEY, tat_ms DOUBLE PRECISION NOT NULL);";

/// The status DB's migrations.
pub const SCHEMA: Schema = Schema {
    owner: "email",
    migrations: &[
        Migration { version: 1, description: "status, suppressions, settings and the webhook lease", sqlite: TABLES_V1, postgres: TABLES_V1 },
        Migration { version: 2, description: "per-domain token buckets", sqlite: TABLES_V2, postgres: TABLES_V2 },
    ],
};

type Relay = AsyncSmtpTransport<Tokio1Executor>;

/// A relay's transport and the permits of its connections.
pub struct RelayHandle {
    transport: Relay,
    permits: tokio::sync::Semaphore,
}

/// Counters shown by `GET /v1/email` and the dashboard (this node's).
#[derive(Default)]
struct Counts {
    queued: AtomicU64,
    suppressed: AtomicU64,
    delivered: AtomicU64,
    deferred: AtomicU64,
    bounced: AtomicU64,
    complained: AtomicU64,
    throttled: AtomicU64,
    webhook_posts: AtomicU64,
    webhook_events: AtomicU64,
    webhook_failures: AtomicU64,
}

/// The running system.
pub struct EmailSystem {
    metrics: SystemMetrics,
    queues: Arc<dyn QueueStore>,
    streams: Arc<dyn StreamStore>,
    db: Db,
    /// The configuration and its version in the DB.
    config: RwLock<(i64, Arc<EmailConfig>)>,
    /// Serializes this node's configuration writes, so its version only grows.
    config_write: tokio::sync::Mutex<()>,
    /// The relay's pooled transport and the permits that bound concurrent SMTP transactions to
    /// its `pool_max` (lettre's pool bounds idle connections, not open ones).
    relay: Mutex<Option<(RelaySpec, Arc<RelayHandle>)>>,
    /// Email id → the instant its reserved token becomes usable.
    reserved: Mutex<HashMap<String, u64>>,
    /// This node: the prefix of the ids it gives and its name as the webhook lease's holder.
    node: String,
    /// Each class's queue lease, in milliseconds (as the queue was created).
    leases: [u64; 2],
    next_id: AtomicU64,
    counts: Counts,
    webhook_error: Mutex<Option<String>>,
    stopping: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    http: reqwest::Client,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(EmailSystem::open(context)?)
}

fn queue_config() -> QueueConfig {
    // Throttled emails are parked with a nack, which counts as a delivery of the queue message:
    // the worker counts SMTP attempts itself (in the events) and the queue's bound only catches
    // a message that crashes workers again and again.
    QueueConfig { deliveries_max: QUEUE_DELIVERIES_MAX_MAX, lease_ms_default: WORKER_LEASE_MS, ..QueueConfig::default() }
}

fn now_ms() -> u64 {
    tributary_core::now_ms().max(0) as u64
}

/// A text column holding JSON, read back.
fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, ApiError> {
    serde_json::from_str(text).map_err(|e| ApiError::internal(format!("the status DB holds an unreadable {what}: {e}")))
}

fn suppression_of(row: &sqlx::any::AnyRow) -> Result<Suppression, ApiError> {
    let reason: String = row.try_get("reason")?;
    Ok(Suppression {
        address: row.try_get("address")?,
        reason: SuppressionReason::parse(&reason).ok_or_else(|| ApiError::internal(format!("the status DB holds an unknown suppression reason {reason:?}")))?,
        at_ms: row.try_get::<i64, _>("at_ms")? as u64,
        message_id: row.try_get("message_id")?,
        detail: row.try_get("detail")?,
    })
}

impl EmailSystem {
    /// Create the queues and the events topic when missing, migrate the status DB, load the
    /// configuration, and start the workers (on the current tokio runtime).
    pub fn open(context: &Context) -> anyhow::Result<Arc<EmailSystem>> {
        let (queues, streams, db) = (context.queues.clone(), context.streams.clone(), context.db()?);
        let setup = async {
            let mut leases = [0; 2];
            for (lease, class) in leases.iter_mut().zip(Class::ALL) {
                // A queue made before (another lease, say) is kept as it is.
                match queues.create_queue(class.queue(), queue_config()).await {
                    Ok(()) | Err(QueueError::AlreadyExists { .. }) => {}
                    Err(error) => return Err(error.into()),
                }
                *lease = queues.queue_config(class.queue()).await?.lease_ms_default;
            }
            streams.create_topic(EVENTS_TOPIC, TopicConfig { partitions: 1, retention_ms: Some(EVENTS_RETENTION_MS), ..TopicConfig::default() }).await?;
            db.migrate(&SCHEMA).await?;
            anyhow::Ok(leases)
        };
        let leases = tributary_server::wait_in_place(false, setup).ok_or_else(|| anyhow::anyhow!("{ID} starts on a worker of a multi-thread tokio runtime"))??;
        let system = Arc::new(EmailSystem {
            metrics: SystemMetrics::new(ID),
            queues,
            streams,
            db,
            config: RwLock::new((0, Arc::new(EmailConfig::default()))),
            config_write: tokio::sync::Mutex::new(()),
            relay: Mutex::new(None),
            reserved: Mutex::new(HashMap::new()),
            node: format!("{:x}", tributary_core::unique_u64()),
            leases,
            next_id: AtomicU64::new(0),
            counts: Counts::default(),
            webhook_error: Mutex::new(None),
            stopping: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        let loaded = async {
            system.carry_over().await?;
            system.refresh_config().await
        };
        tributary_server::wait_in_place(false, loaded).expect("on the runtime the setup ran on").map_err(|e| anyhow::anyhow!("loading the status DB: {}", e.message))?;
        let mut tasks = Vec::new();
        for (class, workers) in [(Class::Transactional, TRANSACTIONAL_WORKERS), (Class::Bulk, BULK_WORKERS)] {
            for n in 0..workers {
                tasks.push(tokio::spawn(run_sender(system.clone(), class, n)));
            }
        }
        tasks.push(tokio::spawn(run_webhook(system.clone())));
        tasks.push(tokio::spawn(run_upkeep(system.clone())));
        *system.tasks.lock() = tasks;
        Ok(system)
    }

    pub fn config(&self) -> Arc<EmailConfig> {
        self.config.read().1.clone()
    }

    /// Take the configuration from the DB when it is newer than this node's.
    async fn refresh_config(&self) -> Result<(), ApiError> {
        let row = sqlx::query("SELECT value, version FROM email_settings WHERE name = $1").bind(CONFIG_KEY).fetch_optional(self.db.primary()).await?;
        let Some(row) = row else { return Ok(()) };
        let version: i64 = row.try_get("version")?;
        if version > self.config.read().0 {
            let config: EmailConfig = from_json("configuration", &row.try_get::<String, _>("value")?)?;
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

    // -----------------------------------------------------------------------------------------
    // The interfaces, called from async code (the embedded engine off the async workers)

    async fn publish(&self, class: Class, messages: Vec<NewMessage>) -> Result<(), ApiError> {
        let queues = self.queues.clone();
        on_backend(queues.blocking(), async move { queues.publish(class.queue(), messages).await }).await?;
        Ok(())
    }

    async fn settle_receipts(&self, class: Class, receipts: Vec<Receipt>, nack_delay_ms: Option<u64>) -> Result<(), ApiError> {
        let queues = self.queues.clone();
        on_backend(queues.blocking(), async move {
            match nack_delay_ms {
                None => queues.ack(class.queue(), SENDER_GROUP, receipts).await,
                Some(delay) => queues.nack(class.queue(), SENDER_GROUP, receipts, Some(delay)).await,
            }
        })
        .await?;
        Ok(())
    }

    async fn queue_stats(&self, class: Class) -> Result<QueueStats, ApiError> {
        let queues = self.queues.clone();
        Ok(on_backend(queues.blocking(), async move { queues.stats(class.queue()).await }).await?)
    }

    /// The events log's first offset and its end.
    async fn event_offsets(&self) -> Result<(u64, u64), ApiError> {
        Ok(self.offsets_of(EVENTS_TOPIC).await?)
    }

    /// A topic's (one partition) first offset and its end.
    async fn offsets_of(&self, topic: &'static str) -> Result<(u64, u64), StreamError> {
        let streams = self.streams.clone();
        on_backend(streams.blocking(), async move { streams.offsets(topic, 0).await }).await
    }

    async fn fetch_events(&self, from: u64, max: usize) -> Result<Vec<StoredRecord>, ApiError> {
        self.fetch_from(EVENTS_TOPIC, from, max).await
    }

    async fn fetch_from(&self, topic: &'static str, from: u64, max: usize) -> Result<Vec<StoredRecord>, ApiError> {
        let streams = self.streams.clone();
        Ok(on_backend(streams.blocking(), async move { streams.fetch(topic, 0, from, max).await }).await?)
    }

    /// Every record of `topic` (one partition) in offset order; none when there is no such topic.
    async fn read_all(&self, topic: &'static str, mut each: impl FnMut(StoredRecord) -> Result<(), ApiError>) -> Result<(), ApiError> {
        let (mut offset, end) = match self.offsets_of(topic).await {
            Ok(offsets) => offsets,
            Err(StreamError::TopicNotFound(_)) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        while offset < end {
            let records = self.fetch_from(topic, offset, BATCH_RECORDS_MAX).await?;
            let Some(last) = records.last() else { break };
            offset = last.offset + 1;
            for record in records {
                each(record)?;
            }
        }
        Ok(())
    }

    /// Deployments from before the status DB kept the configuration and the suppression list in
    /// compacted topics (`email-config`, `email-suppressions`) and rebuilt each email's status
    /// from the events log at every start. The first start with the status DB carries all three
    /// over (the old topics are left as they are), then notes that it did.
    async fn carry_over(&self) -> Result<(), ApiError> {
        let done = sqlx::query("SELECT value FROM email_counters WHERE name = 'carried_over'").fetch_optional(self.db.primary()).await?;
        if done.is_some() {
            return Ok(());
        }
        let mut config = None;
        self.read_all(LEGACY_CONFIG_TOPIC, |record| {
            if record.key.as_deref() == Some(CONFIG_KEY.as_bytes()) {
                config = record.value.map(|value| String::from_utf8_lossy(&value).into_owned());
            }
            Ok(())
        })
        .await?;
        if let Some(value) = config {
            from_json::<EmailConfig>("configuration of email-config", &value)?;
            sqlx::query("INSERT INTO email_settings (name, value, version) VALUES ($1, $2, 1) ON CONFLICT (name) DO NOTHING").bind(CONFIG_KEY).bind(value).execute(self.db.writer()).await?;
        }
        let mut suppressed: BTreeMap<String, Option<Suppression>> = BTreeMap::new();
        self.read_all(LEGACY_SUPPRESSIONS_TOPIC, |record| {
            let Some(key) = record.key.as_deref() else { return Ok(()) };
            let entry = record.value.as_deref().map(|value| from_json("entry of email-suppressions", &String::from_utf8_lossy(value))).transpose()?;
            suppressed.insert(String::from_utf8_lossy(key).into_owned(), entry);
            Ok(())
        })
        .await?;
        let carried = suppressed.into_values().flatten().collect::<Vec<_>>();
        if !carried.is_empty() {
            self.suppress(carried, false).await?;
        }
        let mut latest: HashMap<String, (u64, Event)> = HashMap::new();
        self.read_all(EVENTS_TOPIC, |record| {
            if let Some(Ok(event)) = record.value.as_deref().map(serde_json::from_slice::<Event>) {
                latest.insert(event.id.clone(), (record.offset, event));
            }
            Ok(())
        })
        .await?;
        let (offsets, events): (Vec<u64>, Vec<Event>) = latest.into_values().unzip();
        for (offsets, events) in offsets.chunks(BATCH_RECORDS_MAX).zip(events.chunks(BATCH_RECORDS_MAX)) {
            self.write_status(events, offsets).await?;
        }
        sqlx::query("INSERT INTO email_counters (name, value) VALUES ('carried_over', 1) ON CONFLICT (name) DO NOTHING").execute(self.db.writer()).await?;
        Ok(())
    }

    async fn webhook_committed(&self) -> Result<Option<u64>, ApiError> {
        let streams = self.streams.clone();
        Ok(on_backend(streams.blocking(), async move { streams.committed(EVENTS_TOPIC, WEBHOOK_GROUP, 0).await }).await?)
    }

    async fn commit_webhook(&self, offset: u64) -> Result<(), ApiError> {
        let streams = self.streams.clone();
        Ok(on_backend(streams.blocking(), async move { streams.commit(EVENTS_TOPIC, WEBHOOK_GROUP, 0, offset).await }).await?)
    }

    // -----------------------------------------------------------------------------------------
    // Accept

    /// Check, queue and log a send request; answered once everything is durable.
    pub async fn send(self: &Arc<Self>, request: process::SendRequest) -> Result<process::SendResponse, ApiError> {
        if request.messages.is_empty() {
            return Err(ApiError::bad_request("messages must hold at least one email"));
        }
        if request.messages.len() > process::EMAILS_PER_REQUEST_MAX {
            return Err(ApiError::too_large(format!("messages holds {} emails; EMAILS_PER_REQUEST_MAX is {}", request.messages.len(), process::EMAILS_PER_REQUEST_MAX)));
        }
        let now = now_ms();
        let emails = request.messages.into_iter().enumerate().map(|(i, email)| process::accept(i, email, self.new_id(), now)).collect::<Result<Vec<_>, _>>()?;
        let suppressed = self.suppressed_among(emails.iter().map(|e| e.to.as_str())).await?;
        let mut statuses = Vec::with_capacity(emails.len());
        let mut by_class: [Vec<NewMessage>; 2] = [Vec::new(), Vec::new()];
        let mut events = Vec::with_capacity(emails.len());
        for email in &emails {
            let kind = if suppressed.contains(&process::suppression_key(&email.to)) { EventKind::Suppressed } else { EventKind::Queued };
            if kind == EventKind::Queued {
                let body = serde_json::to_vec(email).expect("an email serializes");
                by_class[email.class as usize].push(NewMessage::new(body));
            }
            events.push(Event::first(email, kind, now));
            statuses.push(process::Accepted { id: email.id.clone(), status: kind });
        }
        let queued = async {
            for (class, messages) in Class::ALL.into_iter().zip(by_class) {
                if !messages.is_empty() {
                    self.publish(class, messages).await?;
                }
            }
            Ok::<(), ApiError>(())
        };
        let (queued, logged) = tokio::join!(queued, self.append_events(events));
        queued?;
        logged?;
        let suppressed = statuses.iter().filter(|s| s.status == EventKind::Suppressed).count() as u64;
        self.counts.queued.fetch_add(statuses.len() as u64 - suppressed, Ordering::Relaxed);
        self.counts.suppressed.fetch_add(suppressed, Ordering::Relaxed);
        self.metrics.messages_in(statuses.len() as u64);
        Ok(process::SendResponse { messages: statuses })
    }

    /// Append events (durably), then point each email's status row at its latest.
    async fn append_events(&self, events: Vec<Event>) -> Result<(), ApiError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut offsets = Vec::with_capacity(events.len());
        for chunk in events.chunks(BATCH_RECORDS_MAX) {
            let records: Vec<Record> = chunk.iter().map(|e| Record::keyed(e.id.clone(), serde_json::to_vec(e).expect("an event serializes"))).collect();
            let streams = self.streams.clone();
            let produced = on_backend(streams.blocking(), async move { streams.produce(EVENTS_TOPIC, records).await }).await?;
            offsets.extend(produced.iter().map(|p| p.offset));
        }
        self.write_status(&events, &offsets).await
    }

    /// Upsert the status rows of `events` (stored at `offsets`): a row only moves to a later
    /// offset, whoever writes last.
    async fn write_status(&self, events: &[Event], offsets: &[u64]) -> Result<(), ApiError> {
        // One row per email per statement (PostgreSQL refuses to update a row twice in one).
        let mut latest: HashMap<&str, (u64, &Event)> = HashMap::new();
        for (event, &offset) in events.iter().zip(offsets) {
            let entry = latest.entry(event.id.as_str()).or_insert((offset, event));
            if offset > entry.0 {
                *entry = (offset, event);
            }
        }
        let rows: Vec<(&str, u64, &Event)> = latest.into_iter().map(|(id, (offset, event))| (id, offset, event)).collect();
        let mut transaction = self.db.writer().begin().await?;
        for chunk in rows.chunks(rows_per_statement(4)) {
            let sql = format!(
                "INSERT INTO email_status (id, event_offset, event, updated_ms) VALUES {} \
                 ON CONFLICT (id) DO UPDATE SET event_offset = excluded.event_offset, event = excluded.event, updated_ms = excluded.updated_ms \
                 WHERE email_status.event_offset < excluded.event_offset",
                value_rows(chunk.len(), 4)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (id, offset, event) in chunk {
                query = query.bind(id.to_string()).bind(*offset as i64).bind(serde_json::to_string(event).expect("an event serializes")).bind(event.at_ms as i64);
            }
            query.execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Status

    /// The rows of `select … WHERE column` whose column is one of `keys`.
    async fn rows_in(&self, select: &str, keys: &[String]) -> Result<Vec<sqlx::any::AnyRow>, ApiError> {
        Ok(tributary_sql::rows_in(self.db.primary(), select, keys).await?)
    }

    /// The latest event of each email of `ids` that has a status row, with its offset.
    async fn latest_of(&self, ids: &[&str]) -> Result<HashMap<String, (u64, Event)>, ApiError> {
        let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let mut found = HashMap::with_capacity(ids.len());
        for row in self.rows_in("SELECT id, event_offset, event FROM email_status WHERE id", &ids).await? {
            let offset = row.try_get::<i64, _>("event_offset")? as u64;
            let event: Event = from_json("event", &row.try_get::<String, _>("event")?)?;
            found.insert(row.try_get("id")?, (offset, event));
        }
        Ok(found)
    }

    async fn read_event(&self, offset: u64) -> Result<Option<Event>, ApiError> {
        let records = self.fetch_events(offset, 1).await?;
        Ok(records.into_iter().find(|r| r.offset == offset).and_then(|r| r.value).and_then(|value| serde_json::from_slice(&value).ok()))
    }

    /// The status of email `id` with its events, newest first.
    pub async fn email_status(&self, id: &str) -> Result<Option<process::StatusView>, ApiError> {
        let Some((offset, latest)) = self.latest_of(&[id]).await?.remove(id) else { return Ok(None) };
        let (start, _) = self.event_offsets().await?;
        if offset < start {
            return Ok(None);
        }
        let mut events = vec![EventView { offset, event: latest.clone() }];
        let mut previous = latest.previous;
        while let Some(at) = previous
            && events.len() < process::EVENTS_LISTED_MAX
            && at >= start
        {
            let Some(event) = self.read_event(at).await? else { break };
            previous = event.previous;
            events.push(EventView { offset: at, event });
        }
        Ok(Some(process::status_view(&latest, events)))
    }

    /// Events from `from`, at most `limit`, and the offset after them.
    pub async fn events_page(&self, from: u64, limit: usize) -> Result<(Vec<EventView>, u64), ApiError> {
        let (start, end) = self.event_offsets().await?;
        let from = from.max(start);
        if from >= end {
            return Ok((Vec::new(), end));
        }
        let records = self.fetch_events(from, limit).await?;
        let views: Vec<EventView> = records.into_iter().filter_map(|r| Some(EventView { offset: r.offset, event: serde_json::from_slice(r.value.as_deref()?).ok()? })).collect();
        let next = views.last().map_or(from, |v| v.offset + 1);
        Ok((views, next))
    }

    // -----------------------------------------------------------------------------------------
    // Suppressions and complaints

    /// Which of `addresses` are on the suppression list (as their keys).
    async fn suppressed_among<'a>(&self, addresses: impl Iterator<Item = &'a str>) -> Result<HashSet<String>, ApiError> {
        let keys: Vec<String> = addresses.map(process::suppression_key).collect::<HashSet<_>>().into_iter().collect();
        let rows = self.rows_in("SELECT address FROM email_suppressions WHERE address", &keys).await?;
        rows.iter().map(|row| Ok(row.try_get::<String, _>("address")?)).collect()
    }

    /// Add addresses to the suppression list (durably). Addresses already on it keep their
    /// first entry unless `replace`. Returns how many were added (with `replace`, written).
    pub async fn suppress(&self, entries: Vec<Suppression>, replace: bool) -> Result<usize, ApiError> {
        let mut seen = HashSet::new();
        let entries: Vec<Suppression> = entries.into_iter().filter(|e| seen.insert(e.address.clone())).collect();
        if entries.is_empty() {
            return Ok(0);
        }
        let mut transaction = self.db.writer().begin().await?;
        let mut added = 0u64;
        for chunk in entries.chunks(rows_per_statement(5)) {
            let insert = |conflict: &str| {
                let sql = format!("INSERT INTO email_suppressions (address, reason, at_ms, message_id, detail) VALUES {} ON CONFLICT (address) {conflict}", value_rows(chunk.len(), 5));
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for entry in chunk {
                    query = query.bind(entry.address.clone()).bind(entry.reason.as_str()).bind(entry.at_ms as i64).bind(entry.message_id.clone()).bind(entry.detail.clone());
                }
                query
            };
            // New addresses first, counted; then, when replacing, every entry written over.
            added += insert("DO NOTHING").execute(&mut *transaction).await?.rows_affected();
            if replace {
                insert("DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms, message_id = excluded.message_id, detail = excluded.detail").execute(&mut *transaction).await?;
            }
        }
        sqlx::query("UPDATE email_counters SET value = value + $1 WHERE name = 'suppressions'").bind(added as i64).execute(&mut *transaction).await?;
        let total: i64 = sqlx::query("SELECT value FROM email_counters WHERE name = 'suppressions'").fetch_one(&mut *transaction).await?.try_get(0)?;
        if total as usize > SUPPRESSIONS_MAX {
            transaction.rollback().await?;
            return Err(ApiError::too_large(format!("the suppression list holds SUPPRESSIONS_MAX ({SUPPRESSIONS_MAX}) addresses")));
        }
        transaction.commit().await?;
        Ok(if replace { entries.len() } else { added as usize })
    }

    /// Take an address off the list; `false` if it was not on it.
    pub async fn unsuppress(&self, address: &str) -> Result<bool, ApiError> {
        let mut transaction = self.db.writer().begin().await?;
        let removed = sqlx::query("DELETE FROM email_suppressions WHERE address = $1").bind(process::suppression_key(address)).execute(&mut *transaction).await?.rows_affected();
        if removed > 0 {
            sqlx::query("UPDATE email_counters SET value = value - $1 WHERE name = 'suppressions'").bind(removed as i64).execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(removed > 0)
    }

    pub async fn suppression(&self, address: &str) -> Result<Option<Suppression>, ApiError> {
        let row = sqlx::query("SELECT address, reason, at_ms, message_id, detail FROM email_suppressions WHERE address = $1")
            .bind(process::suppression_key(address))
            .fetch_optional(self.db.reader(Read::MayLag))
            .await?;
        row.as_ref().map(suppression_of).transpose()
    }

    async fn suppressions_total(&self) -> Result<usize, ApiError> {
        let total: i64 = sqlx::query("SELECT value FROM email_counters WHERE name = 'suppressions'").fetch_one(self.db.reader(Read::MayLag)).await?.try_get(0)?;
        Ok(total.max(0) as usize)
    }

    /// A page of the list in address order, after `after`.
    pub async fn suppressions_page(&self, after: Option<&str>, limit: usize) -> Result<process::SuppressionPage, ApiError> {
        let rows = sqlx::query("SELECT address, reason, at_ms, message_id, detail FROM email_suppressions WHERE address > $1 ORDER BY address LIMIT $2")
            .bind(after.unwrap_or("").to_string())
            .bind(limit as i64)
            .fetch_all(self.db.reader(Read::MayLag))
            .await?;
        let suppressions = rows.iter().map(suppression_of).collect::<Result<Vec<_>, _>>()?;
        Ok(process::SuppressionPage { suppressions, total: self.suppressions_total().await? })
    }

    /// Record complaints: suppress each address; an email named and known gets a `complained`
    /// event. Returns (addresses suppressed, events written).
    pub async fn complain(&self, complaints: Vec<process::Complaint>) -> Result<(usize, usize), ApiError> {
        let now = now_ms();
        let entries = complaints
            .iter()
            .map(|c| Suppression {
                address: process::suppression_key(&c.address),
                reason: SuppressionReason::Complaint,
                at_ms: now,
                message_id: c.message_id.clone(),
                detail: c.feedback_type.clone(),
            })
            .collect();
        let added = self.suppress(entries, true).await?;
        let named: Vec<&str> = complaints.iter().filter_map(|c| c.message_id.as_deref()).collect();
        let latest = self.latest_of(&named).await?;
        let mut events = Vec::new();
        for complaint in &complaints {
            let Some((offset, latest)) = complaint.message_id.as_ref().and_then(|id| latest.get(id)) else { continue };
            let mut event = latest.next(*offset, EventKind::Complained, now);
            event.reason = Some(format!("feedback loop: {}", complaint.feedback_type.as_deref().unwrap_or("abuse")));
            events.push(event);
        }
        let written = events.len();
        self.append_events(events).await?;
        self.counts.complained.fetch_add(complaints.len() as u64, Ordering::Relaxed);
        Ok((added, written))
    }

    // -----------------------------------------------------------------------------------------
    // Configuration and the webhook's position

    /// Replace the configuration (durably). A new webhook URL starts at the log's end.
    pub async fn set_config(&self, config: EmailConfig) -> Result<(), ApiError> {
        let _write = self.config_write.lock().await;
        let old = self.config();
        let new_webhook = config.webhook.as_ref().map(|w| &w.url) != old.webhook.as_ref().map(|w| &w.url);
        if new_webhook && config.webhook.is_some() {
            let (_, end) = self.event_offsets().await?;
            self.commit_webhook(end).await?;
            sqlx::query("UPDATE email_webhook SET replay_from = NULL WHERE name = 'webhook'").execute(self.db.writer()).await?;
        }
        let value = serde_json::to_string(&config).expect("a configuration serializes");
        let mut transaction = self.db.writer().begin().await?;
        sqlx::query("INSERT INTO email_settings (name, value, version) VALUES ($1, $2, 1) ON CONFLICT (name) DO UPDATE SET value = excluded.value, version = email_settings.version + 1")
            .bind(CONFIG_KEY)
            .bind(value)
            .execute(&mut *transaction)
            .await?;
        let version: i64 = sqlx::query("SELECT version FROM email_settings WHERE name = $1").bind(CONFIG_KEY).fetch_one(&mut *transaction).await?.try_get(0)?;
        transaction.commit().await?;
        *self.config.write() = (version, Arc::new(config));
        *self.webhook_error.lock() = None;
        Ok(())
    }

    /// Send the events again from `from` (clamped to what the log holds). Returns the offset.
    /// The node holding the webhook lease takes it up at its next batch.
    pub async fn replay(&self, from: u64) -> Result<u64, ApiError> {
        if self.config().webhook.is_none() {
            return Err(ApiError::conflict("no webhook is configured: PUT /v1/email/config with a webhook first"));
        }
        let (start, end) = self.event_offsets().await?;
        let from = from.clamp(start, end);
        sqlx::query("UPDATE email_webhook SET replay_from = $1 WHERE name = 'webhook'").bind(from as i64).execute(self.db.writer()).await?;
        Ok(from)
    }

    /// Whether this node holds the webhook lease (taking or renewing it when due), and the
    /// replay asked for, if any. `held_until` is this node's view of its lease.
    async fn webhook_turn(&self, held_until: &mut u64) -> Result<(bool, Option<u64>), ApiError> {
        let row = sqlx::query("SELECT holder, lease_until_ms, replay_from FROM email_webhook WHERE name = 'webhook'").fetch_one(self.db.primary()).await?;
        let holder: Option<String> = row.try_get("holder")?;
        let until = row.try_get::<i64, _>("lease_until_ms")? as u64;
        let replay = row.try_get::<Option<i64>, _>("replay_from")?.map(|from| from as u64);
        let now = now_ms();
        let mine = holder.as_deref() == Some(self.node.as_str());
        if mine && until > now + WEBHOOK_LEASE_MS / 2 {
            *held_until = until;
            return Ok((true, replay));
        }
        if !mine && until > now {
            *held_until = 0;
            return Ok((false, None));
        }
        let taken = sqlx::query("UPDATE email_webhook SET holder = $1, lease_until_ms = $2 WHERE name = 'webhook' AND (holder = $1 OR holder IS NULL OR lease_until_ms < $3)")
            .bind(self.node.clone())
            .bind((now + WEBHOOK_LEASE_MS) as i64)
            .bind(now as i64)
            .execute(self.db.writer())
            .await?
            .rows_affected()
            == 1;
        *held_until = if taken { now + WEBHOOK_LEASE_MS } else { 0 };
        Ok((taken, replay.filter(|_| taken)))
    }

    /// Commit a replay's offset as the webhook's position, then clear the request.
    async fn take_replay(&self, from: u64) -> Result<(), ApiError> {
        self.commit_webhook(from).await?;
        sqlx::query("UPDATE email_webhook SET replay_from = NULL WHERE name = 'webhook' AND replay_from = $1").bind(from as i64).execute(self.db.writer()).await?;
        Ok(())
    }

    async fn replay_pending(&self) -> Result<bool, ApiError> {
        let row = sqlx::query("SELECT replay_from FROM email_webhook WHERE name = 'webhook'").fetch_one(self.db.primary()).await?;
        Ok(row.try_get::<Option<i64>, _>("replay_from")?.is_some())
    }

    /// Give the webhook lease back (this node stops): another node takes over at once.
    async fn release_webhook(&self) -> Result<(), ApiError> {
        sqlx::query("UPDATE email_webhook SET lease_until_ms = 0 WHERE name = 'webhook' AND holder = $1").bind(self.node.clone()).execute(self.db.writer()).await?;
        Ok(())
    }

    /// Delete the status rows of emails whose events retention removed.
    async fn prune_status(&self) -> Result<u64, ApiError> {
        let (start, _) = self.event_offsets().await?;
        let removed = sqlx::query("DELETE FROM email_status WHERE event_offset < $1").bind(start as i64).execute(self.db.writer()).await?;
        Ok(removed.rows_affected())
    }

    /// The pooled SMTP transport of the current relay, built on first use and on change.
    fn relay_transport(&self, spec: &RelaySpec) -> Result<Arc<RelayHandle>, String> {
        let mut relay = self.relay.lock();
        if let Some((current, handle)) = relay.as_ref()
            && current == spec
        {
            return Ok(handle.clone());
        }
        let handle = Arc::new(RelayHandle { transport: build_relay(spec)?, permits: tokio::sync::Semaphore::new(spec.pool_max as usize) });
        *relay = Some((spec.clone(), handle.clone()));
        Ok(handle)
    }

    // -----------------------------------------------------------------------------------------
    // Sending

    /// Work one leased batch: suppression, shaping, SMTP, then events, acks and nacks.
    async fn work(self: &Arc<Self>, class: Class, deliveries: Vec<Delivery>, config: &EmailConfig, relay: &Arc<RelayHandle>) -> Result<(), ApiError> {
        let now = now_ms();
        let mut outcomes: Vec<(Email, Receipt, Outcome)> = Vec::new();
        let mut parked: Vec<(Receipt, u64)> = Vec::new();
        let mut broken: Vec<Receipt> = Vec::new();
        let mut to_send: Vec<(Email, Receipt)> = Vec::new();
        let mut emails = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match serde_json::from_slice::<Email>(&delivery.body) {
                Ok(email) => emails.push((email, delivery.receipt)),
                Err(_) => {
                    tracing::error!(id = %delivery.id, "an email in queue {} is not readable; dropping it", class.queue());
                    broken.push(delivery.receipt);
                }
            }
        }
        let suppressed = self.suppressed_among(emails.iter().map(|(e, _)| e.to.as_str())).await?;
        let mut unreserved: Vec<(Email, Receipt)> = Vec::new();
        for (email, receipt) in emails {
            if suppressed.contains(&process::suppression_key(&email.to)) {
                outcomes.push((email, receipt, Outcome::Suppressed));
                continue;
            }
            let reserved = self.reserved.lock().remove(&email.id);
            match reserved {
                // This email waited for a token it had reserved: it is its turn.
                Some(due) if due <= now + 5 => to_send.push((email, receipt)),
                Some(due) => {
                    self.reserved.lock().insert(email.id.clone(), due);
                    parked.push((receipt, due - now));
                }
                None => unreserved.push((email, receipt)),
            }
        }
        let domains: Vec<(String, Rate)> = unreserved
            .iter()
            .map(|(email, _)| {
                let domain = email.domain();
                let rate = config.rate_of(&domain);
                (domain, rate)
            })
            .collect();
        let waits = self.reserve_tokens(&domains, now).await?;
        for ((email, receipt), wait) in unreserved.into_iter().zip(waits) {
            if wait > 0 && wait <= THROTTLE_HORIZON_MS {
                self.reserved.lock().insert(email.id.clone(), now + wait);
            }
            match wait.min(THROTTLE_HORIZON_MS) {
                0 => to_send.push((email, receipt)),
                wait => parked.push((receipt, wait)),
            }
        }
        self.counts.throttled.fetch_add(parked.len() as u64, Ordering::Relaxed);
        let sent = futures_util::future::join_all(to_send.into_iter().map(|(email, receipt)| {
            let relay = relay.clone();
            async move {
                let _permit = relay.permits.acquire().await.expect("the permits are never closed");
                let outcome = send_one(&relay.transport, &email).await;
                (email, receipt, outcome)
            }
        }))
        .await;
        outcomes.extend(sent);

        let settled = self.settle(class, outcomes, parked, broken, &config.retry).await?;
        self.metrics.messages_out(settled.len() as u64);
        for latency in settled {
            self.metrics.latency(latency);
        }
        Ok(())
    }

    /// Take a token of each recipient domain's bucket, one per entry of `domains` in order, from
    /// the buckets in the status DB (every node shares them). Returns each entry's wait: 0 to
    /// send now, else when its token comes (a reservation); a wait beyond
    /// `THROTTLE_HORIZON_MS` took nothing. Domains are locked in name order, so nodes working
    /// batches of the same domains never wait on each other in a circle.
    async fn reserve_tokens(&self, domains: &[(String, Rate)], now: u64) -> Result<Vec<u64>, ApiError> {
        let mut waits = vec![0; domains.len()];
        if domains.is_empty() {
            return Ok(waits);
        }
        let mut by_domain: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (domain, _)) in domains.iter().enumerate() {
            by_domain.entry(domain.as_str()).or_default().push(i);
        }
        let mut transaction = self.db.writer().begin().await?;
        for (domain, entries) in by_domain {
            // An upsert that changes nothing: it makes the row when missing, holds its lock to the
            // end of the transaction (SQLite's write lock, PostgreSQL's row lock) and returns it.
            let row = sqlx::query(
                "INSERT INTO email_domain_rates (domain, tat_ms) VALUES ($1, $2) \
                 ON CONFLICT (domain) DO UPDATE SET tat_ms = email_domain_rates.tat_ms RETURNING tat_ms",
            )
            .bind(domain.to_string())
            .bind(0.0_f64)
            .fetch_one(&mut *transaction)
            .await?;
            let mut bucket = TokenBucket::from_tat_ms(row.try_get("tat_ms")?);
            for i in entries {
                waits[i] = bucket.reserve(domains[i].1, now, THROTTLE_HORIZON_MS);
            }
            sqlx::query("UPDATE email_domain_rates SET tat_ms = $1 WHERE domain = $2")
                .bind(bucket.tat_ms())
                .bind(domain.to_string())
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(waits)
    }

    /// Write the events of a worked batch, suppress hard-bounced addresses, then ack what is
    /// done and nack what waits. Returns the hand-off latency of each delivered email.
    async fn settle(&self, class: Class, outcomes: Vec<(Email, Receipt, Outcome)>, parked: Vec<(Receipt, u64)>, broken: Vec<Receipt>, retry: &process::RetrySpec) -> Result<Vec<Duration>, ApiError> {
        let now = now_ms();
        let ids: Vec<&str> = outcomes.iter().map(|(email, _, _)| email.id.as_str()).collect();
        let mut latest = self.latest_of(&ids).await?;
        let mut events = Vec::with_capacity(outcomes.len());
        let mut acks = broken;
        let mut retries: Vec<(Receipt, u64)> = Vec::new();
        let mut suppressions = Vec::new();
        let mut latencies = Vec::new();
        for (email, receipt, outcome) in outcomes {
            let previous = latest.remove(&email.id);
            let attempts = previous.as_ref().map_or(0, |(_, event)| event.attempts);
            let next = |kind: EventKind| match &previous {
                Some((offset, event)) => event.next(*offset, kind, now),
                None => Event { attempts, ..Event::first(&email, kind, now) },
            };
            let event = match outcome {
                Outcome::Suppressed => {
                    self.counts.suppressed.fetch_add(1, Ordering::Relaxed);
                    acks.push(receipt);
                    next(EventKind::Suppressed)
                }
                Outcome::Reply { verdict, smtp, reason } => {
                    let attempts = attempts + 1;
                    let mut event = match verdict {
                        Verdict::Delivered => {
                            self.counts.delivered.fetch_add(1, Ordering::Relaxed);
                            latencies.push(Duration::from_millis(now.saturating_sub(email.accepted_at_ms)));
                            acks.push(receipt);
                            next(EventKind::Delivered)
                        }
                        Verdict::Defer if attempts <= retry.attempts => {
                            self.counts.deferred.fetch_add(1, Ordering::Relaxed);
                            let delay = process::retry_delay_ms(retry, attempts).min(QUEUE_DELAY_MS_MAX);
                            retries.push((receipt, delay));
                            let mut event = next(EventKind::Deferred);
                            event.next_attempt_at_ms = Some(now + delay);
                            event
                        }
                        Verdict::Defer => {
                            self.counts.bounced.fetch_add(1, Ordering::Relaxed);
                            acks.push(receipt);
                            let mut event = next(EventKind::Bounced);
                            event.bounce = Some(BounceKind::Soft);
                            event.reason = Some(format!("no delivery after {attempts} attempts; last: {}", reason.as_deref().unwrap_or("a temporary failure")));
                            event
                        }
                        Verdict::Bounce(kind) => {
                            self.counts.bounced.fetch_add(1, Ordering::Relaxed);
                            acks.push(receipt);
                            if kind == BounceKind::Hard {
                                suppressions.push(Suppression {
                                    address: process::suppression_key(&email.to),
                                    reason: SuppressionReason::HardBounce,
                                    at_ms: now,
                                    message_id: Some(email.id.clone()),
                                    detail: smtp.as_ref().map(|s| format!("{} {}", s.code, s.message)),
                                });
                            }
                            let mut event = next(EventKind::Bounced);
                            event.bounce = Some(kind);
                            event
                        }
                    };
                    event.attempts = attempts;
                    if event.reason.is_none() {
                        event.reason = reason;
                    }
                    event.smtp = smtp;
                    event
                }
            };
            events.push(event);
        }
        self.append_events(events).await?;
        if !suppressions.is_empty()
            && let Err(error) = self.suppress(suppressions, false).await
        {
            tracing::warn!("could not add hard-bounced addresses to the suppression list: {error}");
        }
        if !acks.is_empty() {
            self.settle_receipts(class, acks, None).await?;
        }
        // One nack per distinct delay.
        let mut by_delay: BTreeMap<u64, Vec<Receipt>> = BTreeMap::new();
        for (receipt, delay) in retries.into_iter().chain(parked) {
            by_delay.entry(delay).or_default().push(receipt);
        }
        for (delay, receipts) in by_delay {
            self.settle_receipts(class, receipts, Some(delay)).await?;
        }
        Ok(latencies)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Sleep up to `duration`, waking early when the system stops.
    async fn pause(&self, duration: Duration) {
        let until = tokio::time::Instant::now() + duration;
        while tokio::time::Instant::now() < until && !self.stopping() {
            tokio::time::sleep(Duration::from_millis(50).min(duration)).await;
        }
    }

    /// The figures of `GET /v1/email` and the dashboard.
    pub async fn overview(&self) -> serde_json::Value {
        let queue = |stats: Result<QueueStats, ApiError>| match stats {
            // Before any worker received, the senders' group does not exist yet: everything waits.
            Ok(stats) => match stats.groups.iter().find(|g| g.name == SENDER_GROUP) {
                Some(g) => json!({"depth": g.depth, "delayed": g.delayed, "in_flight": g.in_flight, "dead_lettered": g.dead_lettered}),
                None => json!({"depth": stats.published_total, "delayed": 0, "in_flight": 0, "dead_lettered": 0}),
            },
            Err(error) => json!({"error": error.message}),
        };
        let c = &self.counts;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (start, end) = self.event_offsets().await.unwrap_or((0, 0));
        let config = self.config();
        json!({
            "queues": {"transactional": queue(self.queue_stats(Class::Transactional).await), "bulk": queue(self.queue_stats(Class::Bulk).await)},
            "counts": {
                "queued": load(&c.queued), "suppressed": load(&c.suppressed), "delivered": load(&c.delivered), "deferred": load(&c.deferred),
                "bounced": load(&c.bounced), "complained": load(&c.complained), "throttled": load(&c.throttled),
            },
            "events": {"start_offset": start, "end_offset": end},
            "suppressions": self.suppressions_total().await.ok(),
            "relay_configured": config.relay.is_some(),
            "backends": {"queues": self.queues.backend(), "streams": self.streams.backend(), "db": format!("{:?}", self.db.dialect()).to_lowercase()},
            "webhook": {
                "configured": config.webhook.is_some(),
                "committed_offset": self.webhook_committed().await.ok().flatten(),
                "posts": load(&c.webhook_posts), "events": load(&c.webhook_events), "failures": load(&c.webhook_failures),
                "last_error": self.webhook_error.lock().clone(),
            },
        })
    }
}

/// What one email's turn came to.
enum Outcome {
    Suppressed,
    Reply { verdict: Verdict, smtp: Option<SmtpReply>, reason: Option<String> },
}

fn build_relay(spec: &RelaySpec) -> Result<Relay, String> {
    let builder = match spec.tls {
        RelayTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&spec.host),
        RelayTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&spec.host).map_err(|e| e.to_string())?,
        RelayTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&spec.host).map_err(|e| e.to_string())?,
    };
    let mut builder = builder
        .port(spec.port)
        .timeout(Some(Duration::from_millis(spec.timeout_ms)))
        .pool_config(PoolConfig::new().max_size(spec.pool_max))
        .hello_name(ClientId::Domain(spec.hello_name.clone().unwrap_or_else(|| "localhost".into())));
    if let (Some(username), Some(password)) = (&spec.username, &spec.password) {
        builder = builder.credentials(Credentials::new(username.clone(), password.clone()));
    }
    Ok(builder.build())
}

/// The MIME message of an email.
fn build_message(email: &Email) -> Result<Message, String> {
    let from = Mailbox::from_str(&email.from).map_err(|e| format!("from: {e}"))?;
    let to = Mailbox::from_str(&email.to).map_err(|e| format!("to: {e}"))?;
    let mut builder = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(format!("<{}@{}>", email.id, from.email.domain())))
        .raw_header(HeaderValue::new(HeaderName::new_from_ascii_str("X-Tributary-Email-Id"), email.id.clone()));
    if let Some(reply_to) = &email.reply_to {
        builder = builder.reply_to(Mailbox::from_str(reply_to).map_err(|e| format!("reply_to: {e}"))?);
    }
    for (name, value) in &email.headers {
        let name = HeaderName::new_from_ascii(name.clone()).map_err(|e| format!("header {name:?}: {e}"))?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }
    let message = match (&email.text, &email.html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(text.clone(), html.clone())),
        (Some(text), None) => builder.header(ContentType::TEXT_PLAIN).body(text.clone()),
        (None, Some(html)) => builder.header(ContentType::TEXT_HTML).body(html.clone()),
        (None, None) => return Err("no body".into()),
    };
    message.map_err(|e| e.to_string())
}

/// One SMTP transaction, classified.
async fn send_one(relay: &Relay, email: &Email) -> Outcome {
    let message = match build_message(email) {
        Ok(message) => message,
        Err(error) => return Outcome::Reply { verdict: Verdict::Bounce(BounceKind::Soft), smtp: None, reason: Some(format!("could not build the message: {error}")) },
    };
    match relay.send(message).await {
        Ok(response) => {
            let code = u16::from(response.code());
            let text = response.message().collect::<Vec<_>>().join(" ");
            Outcome::Reply { verdict: process::classify(code, &text), smtp: Some(SmtpReply { code, enhanced: process::enhanced_code(&text), message: text }), reason: None }
        }
        Err(error) => match error.status() {
            Some(code) => {
                let code = u16::from(code);
                let text = smtp_error_text(&error);
                Outcome::Reply { verdict: process::classify(code, &text), smtp: Some(SmtpReply { code, enhanced: process::enhanced_code(&text), message: text }), reason: None }
            }
            None => Outcome::Reply { verdict: Verdict::Defer, smtp: None, reason: Some(format!("relay: {error}")) },
        },
    }
}

/// The text of an SMTP error reply (lettre prints "permanent error (550): 5.1.1 …").
fn smtp_error_text(error: &lettre::transport::smtp::Error) -> String {
    let shown = error.to_string();
    match shown.split_once("): ") {
        Some((_, text)) => text.trim().to_string(),
        None => shown,
    }
}

/// One sender worker: lease, work, repeat, until the system stops.
async fn run_sender(system: Arc<EmailSystem>, class: Class, n: usize) {
    let consumer = format!("{}-{}-{n}", system.node, class.as_str());
    while !system.stopping() {
        let config = system.config();
        let Some(spec) = config.relay.clone() else {
            tokio::time::sleep(WORKER_WAIT).await;
            continue;
        };
        let relay = match system.relay_transport(&spec) {
            Ok(relay) => relay,
            Err(error) => {
                tracing::warn!("email relay {}:{}: {error}", spec.host, spec.port);
                system.pause(Duration::from_secs(1)).await;
                continue;
            }
        };
        let queues = system.queues.clone();
        let name = consumer.clone();
        // The lease is the queue's default, which every backend honours; the batch keeps it
        // while it is worked (`renew_leases`).
        let received = on_backend(queues.blocking(), async move { queues.receive(class.queue(), SENDER_GROUP, &name, WORKER_BATCH_MAX, None, WORKER_WAIT).await }).await;
        let deliveries = match received {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!("email worker {consumer}: receive: {error}");
                system.pause(Duration::from_secs(1)).await;
                continue;
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
        let worked = tokio::select! {
            worked = system.work(class, deliveries, &config, &relay) => worked,
            never = tributary_server::renew_leases(&system.queues, class.queue(), SENDER_GROUP, receipts, system.leases[class as usize]) => match never {},
        };
        if let Err(error) = worked {
            system.metrics.error();
            tracing::warn!("email worker {consumer}: {}", error.message);
            system.pause(Duration::from_millis(200)).await;
        }
    }
}

/// The webhook worker: on the node holding the lease, POST the events log, in order, from the
/// committed offset.
async fn run_webhook(system: Arc<EmailSystem>) {
    let mut failures = 0u32;
    let mut held_until = 0u64;
    while !system.stopping() {
        let config = system.config();
        let Some(webhook) = config.webhook.clone() else {
            system.pause(WORKER_WAIT).await;
            continue;
        };
        let batch = async {
            let (held, replay) = system.webhook_turn(&mut held_until).await?;
            if !held {
                return Ok(None);
            }
            if let Some(from) = replay {
                system.take_replay(from).await?;
            }
            let from = system.webhook_committed().await?.unwrap_or(0);
            let page = system.events_page(from, WEBHOOK_BATCH_EVENTS).await?;
            Ok::<_, ApiError>(Some(page))
        };
        let (events, next) = match batch.await {
            Ok(Some(page)) => page,
            Ok(None) => {
                // Another node posts; look again before its lease would run out.
                system.pause(Duration::from_millis(WEBHOOK_LEASE_MS / 4)).await;
                continue;
            }
            Err(error) => {
                tracing::warn!("email webhook: reading the events: {}", error.message);
                system.pause(Duration::from_secs(1)).await;
                continue;
            }
        };
        if events.is_empty() {
            system.pause(WEBHOOK_IDLE_POLL).await;
            continue;
        }
        let body = serde_json::to_vec(&events).expect("events serialize");
        match tributary_server::webhook::post_json(&system.http, &webhook.url, webhook.secret.as_deref().map(str::as_bytes), body).await {
            Ok(_) => {
                failures = 0;
                // A replay asked for meanwhile, or a new webhook, wins over this batch's commit.
                let committed = async {
                    if !system.replay_pending().await? && system.config().webhook.as_ref().map(|w| &w.url) == Some(&webhook.url) {
                        system.commit_webhook(next).await?;
                    }
                    Ok::<_, ApiError>(())
                };
                if let Err(error) = committed.await {
                    tracing::warn!("email webhook: commit: {}", error.message);
                }
                system.counts.webhook_posts.fetch_add(1, Ordering::Relaxed);
                system.counts.webhook_events.fetch_add(events.len() as u64, Ordering::Relaxed);
                *system.webhook_error.lock() = None;
            }
            Err(error) => {
                failures += 1;
                system.counts.webhook_failures.fetch_add(1, Ordering::Relaxed);
                *system.webhook_error.lock() = Some(error.to_string());
                system.pause(tributary_server::webhook::retry_delay(failures)).await;
            }
        }
    }
    if held_until > 0
        && let Err(error) = system.release_webhook().await
    {
        tracing::warn!("email webhook: giving the lease back: {}", error.message);
    }
}

/// Reads the configuration again every `CONFIG_REFRESH` (another node may have written it) and
/// deletes expired status rows every `STATUS_PRUNE_INTERVAL`.
async fn run_upkeep(system: Arc<EmailSystem>) {
    let mut pruned_at = tokio::time::Instant::now();
    while !system.stopping() {
        system.pause(CONFIG_REFRESH).await;
        if let Err(error) = system.refresh_config().await {
            tracing::warn!("email: reading the configuration: {}", error.message);
        }
        if pruned_at.elapsed() >= STATUS_PRUNE_INTERVAL {
            pruned_at = tokio::time::Instant::now();
            match system.prune_status().await {
                Ok(0) => {}
                Ok(removed) => tracing::info!("email: deleted {removed} status rows older than the events' retention"),
                Err(error) => tracing::warn!("email: pruning status rows: {}", error.message),
            }
        }
    }
}

impl System for EmailSystem {
    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        SystemApi { id: ID, prefixes: vec!["/v1/email"], router: api::router(self) }
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.metrics
    }

    fn status(&self) -> serde_json::Value {
        tributary_server::wait_in_place(false, self.overview()).unwrap_or_else(|| json!({"error": "the backends cannot be asked from here"}))
    }

    /// Stop the workers: each finishes the batch it holds, then leaves.
    fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Every worker has left.
    fn stopped(&self) -> tributary_engine::BoxFuture<'_, ()> {
        Box::pin(async move {
            let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock());
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}
