//! email-queue-system: asynchronous email delivery, as a user of SendGrid, Postmark or KumoMTA
//! expects it. Applications POST emails; each is durably queued before the answer (202), then
//! sender workers hand it to the configured SMTP relay, at most at the rate its recipient domain
//! allows, retrying 4xx answers with backoff; 5xx answers are bounces (hard, soft or block), and
//! hard bounces and complaints put the address on the suppression list. Every change of an
//! email's state is an event on a log: queryable per email and POSTed to a webhook, signed.
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
//!               (1 partition, 7 days)  ──▶ status index (id → latest event) ──▶ GET /v1/email/messages/{id}
//!                                      ──▶ webhook worker ──signed POST (HMAC-SHA256), retried──▶ your endpoint
//!               suppression list  email-suppressions (compacted) ◀── hard bounces, complaints, manual entries
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
//! **Accept.** Each email names one recipient and a class: `transactional` or `bulk`, two
//! engine queues with their own workers (8 and 4), so a campaign never delays a password reset.
//! The 202 is sent after the email is in its queue and its `queued` event is on the log (both
//! fsynced, with group commit). A recipient on the suppression list is not queued: the answer and
//! the log say `suppressed` (SendGrid's "dropped").
//!
//! **Send.** A worker leases a batch, checks the suppression list again, then takes a token of
//! the recipient domain's bucket (rate and burst per domain, configurable; default 100/s). A
//! domain out of tokens gets its email parked in the queue until its reserved slot (a nack with
//! that delay: it does not count as an attempt). The email is sent over a pool of SMTP
//! connections to the relay. The reply decides ([`process::classify`]): 2xx `delivered` (handed
//! off); 4xx or no answer `deferred`, retried after `base × 2^(attempt−1)` (default 1 min,
//! doubling, capped at 1 h) up to `retry.attempts` (3) retries, then `bounced` soft; 5xx
//! `bounced` hard (5.1.x; the address is suppressed), soft (5.2.x mailbox full, 5.3.4) or block
//! (5.7.x policy). The event is durable before the queue message is acked.
//!
//! **Status and webhooks.** Events live on the topic `email-events` (key = email id, value = the
//! email's whole status as JSON, with the offset of its previous event), kept 7 days. An index in
//! memory maps each email id to its latest event (rebuilt from the log at start; about 60 bytes
//! per email, at most `STATUS_INDEX_ENTRIES_MAX`). The webhook worker reads the log from its
//! committed offset (consumer group `email-webhook`), POSTs batches of up to 100 events as a JSON
//! array, signed (`X-Tributary-Signature: t=…,v1=HMAC-SHA256(secret, "t.body")`), retries with
//! backoff until a 2xx, then commits. Events carry their log offset: receivers deduplicate by it.
//!
//! # Delivery guarantee
//!
//! At-least-once hand-off: an accepted email is sent until the relay answers (or it bounces), also
//! across crashes; a crash after the relay took it but before its event was written sends it
//! again. Webhook events are delivered at least once, in log order. An email leased by a worker
//! that died comes back when its lease (2 minutes) runs out.
//!
//! # What it does not do
//!
//! - One relay (a smarthost): no MX lookup, no direct-to-MX delivery, no IP pools, no DKIM
//!   signing (the relay's job in this design).
//! - No automatic throttling that adapts to replies; rates are configured.
//! - Transactional and bulk mail share each domain's bucket.
//! - No idempotency key on send: a retried request after a lost answer queues the emails again.
//! - A send answered 5xx may have been partly queued (queue and log are two appends).
//! - Webhook endpoints are `http://` (no TLS client in this build); no opens or clicks tracking.
//! - The status of an email older than the log's retention (7 days) is gone (404).
//! - The status index lives in memory and is rebuilt by reading the whole events log at start.
//!   At the seed's 100M emails/day, 7 days of events (700M emails) is beyond
//!   `STATUS_INDEX_ENTRIES_MAX` (50M): sends are refused with 503 once it is full. A disk-backed
//!   index (or a shorter retention) is the missing piece for that volume.
//! - Hand-off throughput is below the seed's 10,000/s on 2 cores (about 880/s measured, see
//!   docs/benchmarks.md): accepting keeps up, the queues absorb the difference.

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
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
use tributary_core::Record;
use tributary_core::limits::{BATCH_BYTES_MAX, BATCH_RECORDS_MAX, MESSAGE_BYTES_MAX, QUEUE_DELAY_MS_MAX};
use tributary_engine::queue::{Delivery, NewMessage, QUEUE_DELIVERIES_MAX_MAX, Queue, QueueConfig, QueueError, Receipt};
use tributary_engine::stream::{Topic, TopicConfig};
use tributary_engine::{Engine, StreamError};
use tributary_runtime::SystemMetrics;
use tributary_runtime::shaping::TokenBuckets;
use tributary_server::{ApiError, SystemApi, blocking};

use crate::{Context, System};
use process::{BounceKind, Class, Email, EmailConfig, Event, EventKind, EventView, RelaySpec, RelayTls, SmtpReply, Suppression, SuppressionReason, Verdict};

pub const ID: &str = "email-queue-system";
/// The engine queue of transactional mail.
pub const TRANSACTIONAL_QUEUE: &str = "email.transactional";
/// The engine queue of bulk mail.
pub const BULK_QUEUE: &str = "email.bulk";
/// The events log: every state change of every email.
pub const EVENTS_TOPIC: &str = "email-events";
/// The suppression list (compacted, keyed by lower-case address).
pub const SUPPRESSIONS_TOPIC: &str = "email-suppressions";
/// The configuration (compacted, one key).
pub const CONFIG_TOPIC: &str = "email-config";
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
/// Lease of a worker's batch: longer than a slow relay's answers to a whole batch.
pub const WORKER_LEASE_MS: u64 = 120_000;
/// How long one receive of a worker waits before it looks at the configuration again.
pub const WORKER_WAIT: Duration = Duration::from_millis(250);
/// Furthest ahead a throttled email reserves a slot of its domain's bucket.
pub const THROTTLE_HORIZON_MS: u64 = 60_000;
/// Events per webhook POST.
pub const WEBHOOK_BATCH_EVENTS: usize = 100;
/// How long events are kept.
pub const EVENTS_RETENTION_MS: u64 = 7 * 24 * 60 * 60 * 1_000;
/// Emails the status index holds at most; past it, sends are refused (503) until retention
/// removes old events.
pub const STATUS_INDEX_ENTRIES_MAX: usize = 50_000_000;
/// Addresses the suppression list holds at most.
pub const SUPPRESSIONS_MAX: usize = 10_000_000;

const CONFIG_KEY: &str = "config";

type Relay = AsyncSmtpTransport<Tokio1Executor>;

/// A relay's transport and the permits of its connections.
pub struct RelayHandle {
    transport: Relay,
    permits: tokio::sync::Semaphore,
}

/// Counters shown by `GET /v1/email` and the dashboard.
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
    engine: Arc<Engine>,
    metrics: SystemMetrics,
    transactional: Arc<Queue>,
    bulk: Arc<Queue>,
    events: Arc<Topic>,
    suppressions_topic: Arc<Topic>,
    config_topic: Arc<Topic>,
    /// Email id → offset of its latest event.
    index: Mutex<HashMap<String, u64>>,
    suppressed: RwLock<BTreeMap<String, Suppression>>,
    config: RwLock<Arc<EmailConfig>>,
    /// Serializes writes of the configuration and of the suppression list, so the log's order is
    /// the memory's order.
    write_lock: Mutex<()>,
    /// The relay's pooled transport and the permits that bound concurrent SMTP transactions to
    /// its `pool_max` (lettre's pool bounds idle connections, not open ones).
    relay: Mutex<Option<(RelaySpec, Arc<RelayHandle>)>>,
    buckets: TokenBuckets<String>,
    /// Email id → the instant its reserved token becomes usable.
    reserved: Mutex<HashMap<String, u64>>,
    id_prefix: String,
    next_id: AtomicU64,
    counts: Counts,
    /// A replay asked for by the API, taken by the webhook worker.
    replay_from: Mutex<Option<u64>>,
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

/// The queue, created if missing, with the senders' group (so that its depth counts from the
/// first email, before any worker received).
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

impl EmailSystem {
    /// Open the queues and topics, load the configuration, the suppression list and the status
    /// index from their logs, and start the workers (on the current tokio runtime).
    pub fn open(context: &Context) -> anyhow::Result<Arc<EmailSystem>> {
        let engine = context.engine.clone();
        let transactional = open_queue(&engine, TRANSACTIONAL_QUEUE)?;
        let bulk = open_queue(&engine, BULK_QUEUE)?;
        let events = engine.topics.create(EVENTS_TOPIC, TopicConfig { partitions: 1, retention_ms: Some(EVENTS_RETENTION_MS), ..TopicConfig::default() })?;
        let suppressions_topic = engine.topics.create(SUPPRESSIONS_TOPIC, TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() })?;
        let config_topic = engine.topics.create(CONFIG_TOPIC, TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() })?;
        let started = now_ms();
        let system = Arc::new(EmailSystem {
            engine,
            metrics: SystemMetrics::new(ID),
            transactional,
            bulk,
            events,
            suppressions_topic,
            config_topic,
            index: Mutex::new(HashMap::new()),
            suppressed: RwLock::new(BTreeMap::new()),
            config: RwLock::new(Arc::new(EmailConfig::default())),
            write_lock: Mutex::new(()),
            relay: Mutex::new(None),
            buckets: TokenBuckets::new(),
            reserved: Mutex::new(HashMap::new()),
            id_prefix: format!("{started:x}"),
            next_id: AtomicU64::new(0),
            counts: Counts::default(),
            replay_from: Mutex::new(None),
            webhook_error: Mutex::new(None),
            stopping: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        system.load()?;
        let mut tasks = Vec::new();
        for (class, workers) in [(Class::Transactional, TRANSACTIONAL_WORKERS), (Class::Bulk, BULK_WORKERS)] {
            for n in 0..workers {
                tasks.push(tokio::spawn(run_sender(system.clone(), class, n)));
            }
        }
        tasks.push(tokio::spawn(run_webhook(system.clone())));
        *system.tasks.lock() = tasks;
        Ok(system)
    }

    /// Read the configuration, the suppression list and the events into memory.
    fn load(&self) -> anyhow::Result<()> {
        for_each_record(&self.config_topic, |record| {
            if record.key.as_deref() == Some(CONFIG_KEY.as_bytes())
                && let Some(value) = &record.value
            {
                *self.config.write() = Arc::new(serde_json::from_slice(value)?);
            }
            Ok(())
        })?;
        let mut suppressed = self.suppressed.write();
        for_each_record(&self.suppressions_topic, |record| {
            let Some(key) = record.key.as_deref() else { return Ok(()) };
            let address = String::from_utf8_lossy(key).into_owned();
            match &record.value {
                Some(value) => suppressed.insert(address, serde_json::from_slice(value)?),
                None => suppressed.remove(&address),
            };
            Ok(())
        })?;
        drop(suppressed);
        let mut index = self.index.lock();
        for_each_record(&self.events, |record| {
            if let Some(key) = record.key.as_deref() {
                index.insert(String::from_utf8_lossy(key).into_owned(), record.offset);
            }
            Ok(())
        })?;
        Ok(())
    }

    pub fn config(&self) -> Arc<EmailConfig> {
        self.config.read().clone()
    }

    fn queue(&self, class: Class) -> &Arc<Queue> {
        match class {
            Class::Transactional => &self.transactional,
            Class::Bulk => &self.bulk,
        }
    }

    fn new_id(&self) -> String {
        format!("{}-{:x}", self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub fn is_suppressed(&self, address: &str) -> bool {
        self.suppressed.read().contains_key(&process::suppression_key(address))
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
        if self.index.lock().len() + emails.len() > STATUS_INDEX_ENTRIES_MAX {
            self.prune_index();
            if self.index.lock().len() + emails.len() > STATUS_INDEX_ENTRIES_MAX {
                return Err(ApiError::overloaded(format!("the status index holds STATUS_INDEX_ENTRIES_MAX ({STATUS_INDEX_ENTRIES_MAX}) emails; older ones leave with the events' retention"), 60));
            }
        }
        let mut statuses = Vec::with_capacity(emails.len());
        let mut by_class: [Vec<NewMessage>; 2] = [Vec::new(), Vec::new()];
        let mut events = Vec::with_capacity(emails.len());
        for email in &emails {
            let kind = if self.is_suppressed(&email.to) { EventKind::Suppressed } else { EventKind::Queued };
            if kind == EventKind::Queued {
                let body = serde_json::to_vec(email).expect("an email serializes");
                by_class[email.class as usize].push(NewMessage::new(body));
            }
            events.push(Event::first(email, kind, now));
            statuses.push(process::Accepted { id: email.id.clone(), status: kind });
        }
        let queued = async {
            for (class, messages) in Class::ALL.into_iter().zip(by_class) {
                if messages.is_empty() {
                    continue;
                }
                let queue = self.queue(class).clone();
                blocking(move || -> Result<(), ApiError> {
                    queue.publish(&messages)?;
                    Ok(())
                })
                .await?;
            }
            Ok::<(), ApiError>(())
        };
        let system = self.clone();
        let logged = blocking(move || system.append_events(&events));
        let (queued, logged) = tokio::join!(queued, logged);
        queued?;
        logged?;
        let suppressed = statuses.iter().filter(|s| s.status == EventKind::Suppressed).count() as u64;
        self.counts.queued.fetch_add(statuses.len() as u64 - suppressed, Ordering::Relaxed);
        self.counts.suppressed.fetch_add(suppressed, Ordering::Relaxed);
        self.metrics.messages_in(statuses.len() as u64);
        Ok(process::SendResponse { messages: statuses })
    }

    /// Append events (durably) and point the index at them.
    fn append_events(&self, events: &[Event]) -> Result<Vec<u64>, ApiError> {
        let mut offsets = Vec::with_capacity(events.len());
        for chunk in events.chunks(BATCH_RECORDS_MAX) {
            let records: Vec<Record> = chunk.iter().map(|e| Record::keyed(e.id.clone(), serde_json::to_vec(e).expect("an event serializes"))).collect();
            let appended = self.events.produce_to(0, &records)?;
            let mut index = self.index.lock();
            for (n, event) in chunk.iter().enumerate() {
                let offset = appended.base_offset + n as u64;
                offsets.push(offset);
                let entry = index.entry(event.id.clone()).or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
        Ok(offsets)
    }

    /// Forget index entries whose events retention has removed.
    fn prune_index(&self) {
        let Ok((start, _)) = self.events.offsets(0) else { return };
        self.index.lock().retain(|_, offset| *offset >= start);
    }

    // -----------------------------------------------------------------------------------------
    // Status

    fn read_event(&self, offset: u64) -> Result<Option<Event>, StreamError> {
        let records = self.events.fetch(0, offset, 1, MESSAGE_BYTES_MAX)?;
        Ok(records.into_iter().find(|r| r.offset == offset).and_then(|r| r.value).and_then(|value| serde_json::from_slice(&value).ok()))
    }

    /// The latest event of email `id` and its offset.
    fn latest(&self, id: &str) -> Result<Option<(u64, Event)>, StreamError> {
        let Some(offset) = self.index.lock().get(id).copied() else { return Ok(None) };
        let (start, _) = self.events.offsets(0)?;
        if offset < start {
            return Ok(None);
        }
        Ok(self.read_event(offset)?.map(|event| (offset, event)))
    }

    /// The status of email `id` with its events, newest first (blocking).
    pub fn email_status(&self, id: &str) -> Result<Option<process::StatusView>, ApiError> {
        let Some((offset, latest)) = self.latest(id)? else { return Ok(None) };
        let (start, _) = self.events.offsets(0)?;
        let mut events = vec![EventView { offset, event: latest.clone() }];
        let mut previous = latest.previous;
        while let Some(at) = previous
            && events.len() < process::EVENTS_LISTED_MAX
            && at >= start
        {
            let Some(event) = self.read_event(at)? else { break };
            previous = event.previous;
            events.push(EventView { offset: at, event });
        }
        Ok(Some(process::status_view(&latest, events)))
    }

    /// Events from `from`, at most `limit` (blocking).
    pub fn events_page(&self, from: u64, limit: usize) -> Result<(Vec<EventView>, u64), ApiError> {
        let (start, end) = self.events.offsets(0)?;
        let from = from.max(start);
        if from >= end {
            return Ok((Vec::new(), end));
        }
        let records = self.events.fetch(0, from, limit, BATCH_BYTES_MAX)?;
        let views: Vec<EventView> = records.into_iter().filter_map(|r| Some(EventView { offset: r.offset, event: serde_json::from_slice(r.value.as_deref()?).ok()? })).collect();
        let next = views.last().map_or(from, |v| v.offset + 1);
        Ok((views, next))
    }

    // -----------------------------------------------------------------------------------------
    // Suppressions and complaints

    /// Add addresses to the suppression list (durably). Addresses already on it keep their
    /// first entry unless `replace`. Returns how many were added.
    pub fn suppress(&self, entries: Vec<Suppression>, replace: bool) -> Result<usize, ApiError> {
        let _write = self.write_lock.lock();
        let fresh: Vec<Suppression> = {
            let suppressed = self.suppressed.read();
            let mut seen = std::collections::HashSet::new();
            entries.into_iter().filter(|e| (replace || !suppressed.contains_key(&e.address)) && seen.insert(e.address.clone())).collect()
        };
        if fresh.is_empty() {
            return Ok(0);
        }
        let room = SUPPRESSIONS_MAX.saturating_sub(self.suppressed.read().len());
        if fresh.len() > room {
            return Err(ApiError::too_large(format!("the suppression list holds SUPPRESSIONS_MAX ({SUPPRESSIONS_MAX}) addresses")));
        }
        let records: Vec<Record> = fresh.iter().map(|e| Record::keyed(e.address.clone(), serde_json::to_vec(e).expect("a suppression serializes"))).collect();
        for chunk in records.chunks(BATCH_RECORDS_MAX) {
            self.suppressions_topic.produce_to(0, chunk)?;
        }
        let mut suppressed = self.suppressed.write();
        for entry in &fresh {
            suppressed.insert(entry.address.clone(), entry.clone());
        }
        Ok(fresh.len())
    }

    /// Take an address off the list; `false` if it was not on it.
    pub fn unsuppress(&self, address: &str) -> Result<bool, ApiError> {
        let key = process::suppression_key(address);
        let _write = self.write_lock.lock();
        if !self.suppressed.read().contains_key(&key) {
            return Ok(false);
        }
        self.suppressions_topic.produce_to(0, &[Record::tombstone(key.clone())])?;
        self.suppressed.write().remove(&key);
        Ok(true)
    }

    pub fn suppression(&self, address: &str) -> Option<Suppression> {
        self.suppressed.read().get(&process::suppression_key(address)).cloned()
    }

    pub fn suppressions_page(&self, after: Option<&str>, limit: usize) -> process::SuppressionPage {
        let suppressed = self.suppressed.read();
        let page = match after {
            Some(after) => suppressed.range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)).take(limit).map(|(_, s)| s.clone()).collect(),
            None => suppressed.values().take(limit).cloned().collect(),
        };
        process::SuppressionPage { suppressions: page, total: suppressed.len() }
    }

    /// Record complaints: suppress each address; an email named and known gets a `complained`
    /// event. Returns (addresses newly suppressed, events written).
    pub fn complain(&self, complaints: Vec<process::Complaint>) -> Result<(usize, usize), ApiError> {
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
        let added = self.suppress(entries, true)?;
        let mut events = Vec::new();
        for complaint in &complaints {
            let Some(id) = &complaint.message_id else { continue };
            if let Some((offset, latest)) = self.latest(id)? {
                let mut event = latest.next(offset, EventKind::Complained, now);
                event.reason = Some(format!("feedback loop: {}", complaint.feedback_type.as_deref().unwrap_or("abuse")));
                events.push(event);
            }
        }
        self.append_events(&events)?;
        self.counts.complained.fetch_add(complaints.len() as u64, Ordering::Relaxed);
        Ok((added, events.len()))
    }

    // -----------------------------------------------------------------------------------------
    // Configuration

    /// Replace the configuration (durably). A new webhook URL starts at the log's end.
    pub fn set_config(&self, config: EmailConfig) -> Result<(), ApiError> {
        let _write = self.write_lock.lock();
        let old = self.config();
        let new_webhook = config.webhook.as_ref().map(|w| &w.url) != old.webhook.as_ref().map(|w| &w.url);
        if new_webhook && config.webhook.is_some() {
            let (_, end) = self.events.offsets(0)?;
            self.engine.topics.commit(EVENTS_TOPIC, WEBHOOK_GROUP, None, &[(0, end)])?;
            *self.replay_from.lock() = None;
        }
        let value = serde_json::to_vec(&config).expect("a configuration serializes");
        self.config_topic.produce_to(0, &[Record::keyed(CONFIG_KEY, value)])?;
        *self.config.write() = Arc::new(config);
        *self.webhook_error.lock() = None;
        Ok(())
    }

    /// Send the events again from `from` (clamped to what the log holds). Returns the offset.
    pub fn replay(&self, from: u64) -> Result<u64, ApiError> {
        if self.config().webhook.is_none() {
            return Err(ApiError::conflict("no webhook is configured: PUT /v1/email/config with a webhook first"));
        }
        let (start, end) = self.events.offsets(0)?;
        let from = from.clamp(start, end);
        *self.replay_from.lock() = Some(from);
        Ok(from)
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
        for delivery in deliveries {
            let Ok(email) = serde_json::from_slice::<Email>(&delivery.body) else {
                tracing::error!(id = %delivery.id, "an email in queue {} is not readable; dropping it", class.queue());
                broken.push(delivery.receipt);
                continue;
            };
            if self.is_suppressed(&email.to) {
                outcomes.push((email, delivery.receipt, Outcome::Suppressed));
                continue;
            }
            let reserved = self.reserved.lock().remove(&email.id);
            let wait = match reserved {
                // This email waited for a token it had reserved: it is its turn.
                Some(due) if due <= now + 5 => 0,
                Some(due) => {
                    self.reserved.lock().insert(email.id.clone(), due);
                    due - now
                }
                None => {
                    let domain = email.domain();
                    let wait = self.buckets.reserve(&domain, config.rate_of(&domain), now, THROTTLE_HORIZON_MS);
                    if wait > 0 && wait <= THROTTLE_HORIZON_MS {
                        self.reserved.lock().insert(email.id.clone(), now + wait);
                    }
                    wait.min(THROTTLE_HORIZON_MS)
                }
            };
            if wait > 0 {
                parked.push((delivery.receipt, wait));
                continue;
            }
            to_send.push((email, delivery.receipt));
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

        let system = self.clone();
        let queue = self.queue(class).clone();
        let retry = config.retry;
        let settled = blocking(move || system.settle(&queue, outcomes, parked, broken, &retry)).await?;
        let handed_off = settled.len();
        self.metrics.messages_out(handed_off as u64);
        for latency in settled {
            self.metrics.latency(latency);
        }
        Ok(())
    }

    /// Write the events of a worked batch, suppress hard-bounced addresses, then ack what is
    /// done and nack what waits (blocking). Returns the hand-off latency of each delivered email.
    fn settle(&self, queue: &Queue, outcomes: Vec<(Email, Receipt, Outcome)>, parked: Vec<(Receipt, u64)>, broken: Vec<Receipt>, retry: &process::RetrySpec) -> Result<Vec<Duration>, ApiError> {
        let now = now_ms();
        let mut events = Vec::with_capacity(outcomes.len());
        let mut acks = broken;
        let mut retries: Vec<(Receipt, u64)> = Vec::new();
        let mut suppressions = Vec::new();
        let mut latencies = Vec::new();
        for (email, receipt, outcome) in outcomes {
            let (previous, attempts) = match self.latest(&email.id)? {
                Some((offset, event)) => (Some((offset, event.clone())), event.attempts),
                None => (None, 0),
            };
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
        self.append_events(&events)?;
        if !suppressions.is_empty()
            && let Err(error) = self.suppress(suppressions, false)
        {
            tracing::warn!("could not add hard-bounced addresses to the suppression list: {error}");
        }
        if !acks.is_empty() {
            queue.ack(SENDER_GROUP, &acks)?;
        }
        // One nack per distinct delay.
        let mut by_delay: BTreeMap<u64, Vec<Receipt>> = BTreeMap::new();
        for (receipt, delay) in retries.into_iter().chain(parked) {
            by_delay.entry(delay).or_default().push(receipt);
        }
        for (delay, receipts) in by_delay {
            queue.nack(SENDER_GROUP, &receipts, Some(delay))?;
        }
        Ok(latencies)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// What one email's turn came to.
enum Outcome {
    Suppressed,
    Reply { verdict: Verdict, smtp: Option<SmtpReply>, reason: Option<String> },
}

/// Read a whole (small) topic from its start.
fn for_each_record(topic: &Topic, mut f: impl FnMut(&tributary_core::StoredRecord) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let (mut offset, end) = topic.offsets(0)?;
    while offset < end {
        let records = topic.fetch(0, offset, BATCH_RECORDS_MAX, BATCH_BYTES_MAX)?;
        let Some(last) = records.last() else { break };
        offset = last.offset + 1;
        for record in &records {
            f(record)?;
        }
    }
    Ok(())
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
    let consumer = format!("{}-{n}", class.as_str());
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
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let queue = system.queue(class).clone();
        let name = consumer.clone();
        let received = blocking(move || -> Result<Vec<Delivery>, ApiError> { Ok(queue.receive(SENDER_GROUP, &name, WORKER_BATCH_MAX, Some(WORKER_LEASE_MS), WORKER_WAIT)?) }).await;
        let deliveries = match received {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!("email worker {consumer}: receive: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        if let Err(error) = system.work(class, deliveries, &config, &relay).await {
            system.metrics.error();
            tracing::warn!("email worker {consumer}: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The webhook worker: POST the events log, in order, from the committed offset.
async fn run_webhook(system: Arc<EmailSystem>) {
    let mut failures = 0u32;
    while !system.stopping() {
        let config = system.config();
        let Some(webhook) = config.webhook.clone() else {
            tokio::time::sleep(WORKER_WAIT).await;
            continue;
        };
        if let Some(from) = system.replay_from.lock().take()
            && let Err(error) = system.engine.topics.commit(EVENTS_TOPIC, WEBHOOK_GROUP, None, &[(0, from)])
        {
            tracing::warn!("email webhook: replay from {from}: {error}");
        }
        let reader = system.clone();
        let read = blocking(move || -> Result<(Vec<EventView>, u64), ApiError> {
            let from = reader.engine.topics.committed(EVENTS_TOPIC, WEBHOOK_GROUP, 0).unwrap_or(0);
            reader.events.log(0)?.wait_for_data(from, WORKER_WAIT);
            reader.events_page(from, WEBHOOK_BATCH_EVENTS)
        })
        .await;
        let (events, next) = match read {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!("email webhook: reading the events: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if events.is_empty() {
            continue;
        }
        let body = serde_json::to_vec(&events).expect("events serialize");
        match tributary_server::webhook::post_json(&system.http, &webhook.url, webhook.secret.as_deref().map(str::as_bytes), body).await {
            Ok(_) => {
                failures = 0;
                // A replay asked for meanwhile wins over this batch's commit.
                if system.replay_from.lock().is_none()
                    && system.config().webhook.as_ref().map(|w| &w.url) == Some(&webhook.url)
                    && let Err(error) = system.engine.topics.commit(EVENTS_TOPIC, WEBHOOK_GROUP, None, &[(0, next)])
                {
                    tracing::warn!("email webhook: commit: {error}");
                }
                system.counts.webhook_posts.fetch_add(1, Ordering::Relaxed);
                system.counts.webhook_events.fetch_add(events.len() as u64, Ordering::Relaxed);
                *system.webhook_error.lock() = None;
            }
            Err(error) => {
                failures += 1;
                system.counts.webhook_failures.fetch_add(1, Ordering::Relaxed);
                *system.webhook_error.lock() = Some(error.to_string());
                let delay = tributary_server::webhook::retry_delay(failures);
                let until = tokio::time::Instant::now() + delay;
                while tokio::time::Instant::now() < until && !system.stopping() {
                    tokio::time::sleep(Duration::from_millis(50).min(delay)).await;
                }
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
        let queue = |queue: &Queue| match queue.stats(Some(SENDER_GROUP)) {
            Ok(stats) => json!({"depth": stats.depth, "delayed": stats.delayed, "in_flight": stats.in_flight, "dead_lettered": stats.dead_lettered}),
            Err(error) => json!({"error": error.to_string()}),
        };
        let c = &self.counts;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (start, end) = self.events.offsets(0).unwrap_or((0, 0));
        json!({
            "queues": {"transactional": queue(&self.transactional), "bulk": queue(&self.bulk)},
            "counts": {
                "queued": load(&c.queued), "suppressed": load(&c.suppressed), "delivered": load(&c.delivered), "deferred": load(&c.deferred),
                "bounced": load(&c.bounced), "complained": load(&c.complained), "throttled": load(&c.throttled),
            },
            "events": {"start_offset": start, "end_offset": end, "emails_indexed": self.index.lock().len()},
            "suppressions": self.suppressed.read().len(),
            "relay_configured": self.config().relay.is_some(),
            "webhook": {
                "configured": self.config().webhook.is_some(),
                "committed_offset": self.engine.topics.committed(EVENTS_TOPIC, WEBHOOK_GROUP, 0),
                "posts": load(&c.webhook_posts), "events": load(&c.webhook_events), "failures": load(&c.webhook_failures),
                "last_error": self.webhook_error.lock().clone(),
            },
        })
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
