//! The message queue's logic between HTTP JSON and the engine: request shapes, their
//! validation (every refusal names the field and, where one applies, the limit), and the mapping
//! of engine values (deliveries, outcomes, stats, dead letters) back to JSON.
//!
//! Pure functions: no IO, no engine calls, no clock. The handlers in `api.rs` decide when to
//! call the engine; everything they need to check or convert is here.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tributary_core::Header;
use tributary_core::limits::{
    BATCH_RECORDS_MAX, HEADERS_COUNT_MAX, KEY_BYTES_MAX, MESSAGE_BYTES_MAX, QUEUE_DELAY_MS_MAX, QUEUE_LEASE_MS_MAX, QUEUE_PRIORITY_LEVELS, check_name,
};
use tributary_engine::queue::{
    DeadLetter, Delivery, GroupStats, MessageId, NewMessage, QUEUE_DEDUP_ID_BYTES_MAX, QUEUE_RECEIVE_MESSAGES_MAX, QUEUE_RECEIVE_WAIT_MS_MAX, QueueConfig,
    QueueStats, RESERVED_HEADER_PREFIX, Receipt, ReceiptOutcome, Redrive,
};
use tributary_server::ApiError;
use tributary_server::utoipa::{self, IntoParams, ToSchema};

/// Engine queues of this system are named `mq.<queue>`, so that queues of other systems in the
/// same engine are neither visible nor reachable through these routes.
pub const ENGINE_QUEUE_PREFIX: &str = "mq.";
/// Messages one receive returns when the request names no `max`.
pub const RECEIVE_MESSAGES_DEFAULT: usize = 10;
/// Dead letters one page lists when the request names no `max`.
pub const DEAD_LETTERS_PAGE_DEFAULT: usize = 100;
/// Most dead letters one page lists.
pub const DEAD_LETTERS_PAGE_MAX: usize = 1_000;
/// Consumer name of a receive that names none.
pub const CONSUMER_DEFAULT: &str = "anonymous";

// ---------------------------------------------------------------------------------------------
// Names

/// The engine's name for queue `queue`, after checking it.
pub fn engine_queue_name(queue: &str) -> Result<String, ApiError> {
    check_name("queue", queue).map_err(ApiError::bad_request)?;
    let name = format!("{ENGINE_QUEUE_PREFIX}{queue}");
    check_name("queue", &name).map_err(|_| ApiError::bad_request(format!("queue name {queue:?} is too long: at most {} bytes", tributary_core::limits::NAME_BYTES_MAX - ENGINE_QUEUE_PREFIX.len())))?;
    Ok(name)
}

/// The queue's name in the API, if `engine_name` is one of ours.
pub fn api_queue_name(engine_name: &str) -> Option<&str> {
    engine_name.strip_prefix(ENGINE_QUEUE_PREFIX)
}

pub fn queue_not_found(queue: &str) -> ApiError {
    ApiError::not_found(format!("queue {queue:?} not found (queues are created by their first publish)"))
}

fn check_group(group: &str) -> Result<(), ApiError> {
    check_name("group", group).map_err(ApiError::bad_request)
}

fn check_lease_ms(field: &str, lease_ms: u64) -> Result<(), ApiError> {
    if lease_ms == 0 || lease_ms > QUEUE_LEASE_MS_MAX {
        return Err(ApiError::bad_request(format!("{field} must be 1 to QUEUE_LEASE_MS_MAX ({QUEUE_LEASE_MS_MAX}), got {lease_ms}")));
    }
    Ok(())
}

fn check_delay_ms(field: &str, delay_ms: u64) -> Result<(), ApiError> {
    if delay_ms > QUEUE_DELAY_MS_MAX {
        return Err(ApiError::bad_request(format!("{field} must be at most QUEUE_DELAY_MS_MAX ({QUEUE_DELAY_MS_MAX}), got {delay_ms}")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Publish

/// `POST /v1/queues/{queue}/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// 1 to `BATCH_RECORDS_MAX` messages, written as one batch.
    pub messages: Vec<PublishMessage>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishMessage {
    /// Any JSON value; stored as its JSON bytes and delivered as the same JSON.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    /// Carried with the message (the queue does not order or route by it).
    #[serde(default)]
    pub key: Option<String>,
    /// Header names starting with `tributary.` are reserved.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// 0 (highest) to 3; default 0. Levels are served 8:4:2:1, so none starves.
    #[serde(default)]
    pub priority: Option<u8>,
    /// Receivable only this many milliseconds after publish.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Publishing the same id again within the dedup window (5 minutes) returns the first id.
    #[serde(default)]
    pub dedup_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PublishResponse {
    /// One id per message, in order (`p<priority>-<offset>`); a deduplicated message gets the
    /// first one's id.
    pub ids: Vec<String>,
}

/// The engine messages of a publish request, or the first reason to refuse all of it.
pub fn new_messages(request: PublishRequest) -> Result<Vec<NewMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages must hold at least one message"));
    }
    if request.messages.len() > BATCH_RECORDS_MAX {
        return Err(ApiError::too_large(format!("messages holds {} messages; BATCH_RECORDS_MAX is {BATCH_RECORDS_MAX}", request.messages.len())));
    }
    request.messages.into_iter().enumerate().map(|(i, message)| new_message(i, message)).collect()
}

fn new_message(i: usize, message: PublishMessage) -> Result<NewMessage, ApiError> {
    let field = |name: &str| format!("messages[{i}].{name}");
    let priority = message.priority.unwrap_or(0);
    if priority >= QUEUE_PRIORITY_LEVELS {
        return Err(ApiError::bad_request(format!("{} must be 0 to {}, got {priority}", field("priority"), QUEUE_PRIORITY_LEVELS - 1)));
    }
    let delay_ms = message.delay_ms.unwrap_or(0);
    check_delay_ms(&field("delay_ms"), delay_ms)?;
    if let Some(dedup_id) = &message.dedup_id
        && (dedup_id.is_empty() || dedup_id.len() > QUEUE_DEDUP_ID_BYTES_MAX)
    {
        return Err(ApiError::bad_request(format!("{} must be 1 to QUEUE_DEDUP_ID_BYTES_MAX ({QUEUE_DEDUP_ID_BYTES_MAX}) bytes, got {}", field("dedup_id"), dedup_id.len())));
    }
    let key = message.key.map(Bytes::from);
    if let Some(key) = &key
        && key.len() > KEY_BYTES_MAX
    {
        return Err(ApiError::too_large(format!("{} is {} bytes; KEY_BYTES_MAX is {KEY_BYTES_MAX}", field("key"), key.len())));
    }
    // The queue adds up to 4 headers of its own (delay, dedup, redrive) to the record.
    let headers_max = HEADERS_COUNT_MAX - 4;
    let headers = message.headers.unwrap_or_default();
    if headers.len() > headers_max {
        return Err(ApiError::too_large(format!("{} holds {} headers; at most {headers_max} (HEADERS_COUNT_MAX less the queue's own)", field("headers"), headers.len())));
    }
    if let Some(name) = headers.keys().find(|name| name.starts_with(RESERVED_HEADER_PREFIX) || name.is_empty()) {
        return Err(ApiError::bad_request(format!("{}: header name {name:?} is empty or uses the reserved prefix {RESERVED_HEADER_PREFIX:?}", field("headers"))));
    }
    let body = Bytes::from(serde_json::to_vec(&message.body).expect("a JSON value serializes"));
    let headers: Vec<Header> = headers.into_iter().map(|(name, value)| Header { name, value: Bytes::from(value) }).collect();
    let bytes = body.len() + key.as_ref().map_or(0, Bytes::len) + headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>();
    if bytes > MESSAGE_BYTES_MAX {
        return Err(ApiError::too_large(format!("{} is {bytes} bytes with its key and headers; MESSAGE_BYTES_MAX is {MESSAGE_BYTES_MAX}", field("body"))));
    }
    Ok(NewMessage { body, key, headers, priority, delay_ms, dedup_id: message.dedup_id })
}

pub fn publish_response(ids: &[MessageId]) -> PublishResponse {
    PublishResponse { ids: ids.iter().map(MessageId::to_string).collect() }
}

// ---------------------------------------------------------------------------------------------
// Receive

/// `POST /v1/queues/{queue}/receive`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// The consumer group: every group gets every message; consumers of a group compete.
    pub group: String,
    /// Most messages to lease, 1 to `QUEUE_RECEIVE_MESSAGES_MAX` (1000); default 10.
    #[serde(default)]
    pub max: Option<usize>,
    /// Long poll: wait up to this long for a first message, at most `QUEUE_RECEIVE_WAIT_MS_MAX`
    /// (20000); default 0 (answer at once).
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// Lease: unacked messages come back after this long; default the queue's (30 s).
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// Names the consumer (its in-flight bound is counted per name); default `anonymous`.
    #[serde(default)]
    pub consumer: Option<String>,
}

/// A receive, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receive {
    pub group: String,
    pub consumer: String,
    pub max: usize,
    pub wait_ms: u64,
    pub lease_ms: Option<u64>,
}

pub fn receive(request: ReceiveRequest) -> Result<Receive, ApiError> {
    check_group(&request.group)?;
    let consumer = request.consumer.unwrap_or_else(|| CONSUMER_DEFAULT.to_string());
    check_name("consumer", &consumer).map_err(ApiError::bad_request)?;
    let max = request.max.unwrap_or(RECEIVE_MESSAGES_DEFAULT);
    if max == 0 || max > QUEUE_RECEIVE_MESSAGES_MAX {
        return Err(ApiError::bad_request(format!("max must be 1 to QUEUE_RECEIVE_MESSAGES_MAX ({QUEUE_RECEIVE_MESSAGES_MAX}), got {max}")));
    }
    let wait_ms = request.wait_ms.unwrap_or(0);
    if wait_ms > QUEUE_RECEIVE_WAIT_MS_MAX {
        return Err(ApiError::bad_request(format!("wait_ms must be at most QUEUE_RECEIVE_WAIT_MS_MAX ({QUEUE_RECEIVE_WAIT_MS_MAX}), got {wait_ms}")));
    }
    if let Some(lease_ms) = request.lease_ms {
        check_lease_ms("lease_ms", lease_ms)?;
    }
    Ok(Receive { group: request.group, consumer, max, wait_ms, lease_ms: request.lease_ms })
}

/// One delivered message, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// Stable id of the message (`p<priority>-<offset>`).
    pub id: String,
    /// Proof of this delivery: hand it to ack, nack or extend.
    pub receipt: String,
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub priority: u8,
    /// 1 on the first delivery.
    pub delivery_count: u32,
    pub enqueued_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReceiveResponse {
    pub messages: Vec<Message>,
}

/// A stored body as JSON: bodies are published as JSON bytes; anything else (written to the
/// engine queue by other means) comes back as a string.
fn body_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn headers_json(headers: &[Header]) -> BTreeMap<String, String> {
    headers.iter().map(|h| (h.name.clone(), String::from_utf8_lossy(&h.value).into_owned())).collect()
}

pub fn message(delivery: &Delivery) -> Message {
    Message {
        id: delivery.id.to_string(),
        receipt: delivery.receipt.to_string(),
        body: body_json(&delivery.body),
        key: delivery.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        headers: headers_json(&delivery.headers),
        priority: delivery.priority,
        delivery_count: delivery.delivery_count,
        enqueued_at_ms: delivery.enqueued_at_ms,
    }
}

// ---------------------------------------------------------------------------------------------
// Ack, nack, extend

/// `POST /v1/queues/{queue}/ack`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub group: String,
    /// Receipts of deliveries, 1 to `BATCH_RECORDS_MAX`.
    pub receipts: Vec<String>,
}

/// `POST /v1/queues/{queue}/nack`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NackRequest {
    pub group: String,
    pub receipts: Vec<String>,
    /// Available again after this long; default: the queue's exponential backoff
    /// (1 s × 2^(delivery_count − 1), capped at 5 minutes, with jitter).
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

/// `POST /v1/queues/{queue}/extend`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub group: String,
    pub receipts: Vec<String>,
    /// The new lease, counted from now.
    pub lease_ms: u64,
}

/// What to do with a list of receipts, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    pub group: String,
    pub receipts: Vec<Receipt>,
}

/// Check the group and receipts of an ack, nack or extend.
pub fn settle(group: String, receipts: Vec<String>) -> Result<Settle, ApiError> {
    check_group(&group)?;
    if receipts.is_empty() {
        return Err(ApiError::bad_request("receipts must hold at least one receipt"));
    }
    if receipts.len() > BATCH_RECORDS_MAX {
        return Err(ApiError::too_large(format!("receipts holds {} receipts; BATCH_RECORDS_MAX is {BATCH_RECORDS_MAX}", receipts.len())));
    }
    Ok(Settle { group, receipts: receipts.into_iter().map(Receipt::from).collect() })
}

pub fn nack_delay(delay_ms: Option<u64>) -> Result<Option<u64>, ApiError> {
    if let Some(delay_ms) = delay_ms {
        check_delay_ms("delay_ms", delay_ms)?;
    }
    Ok(delay_ms)
}

pub fn extend_lease(lease_ms: u64) -> Result<u64, ApiError> {
    check_lease_ms("lease_ms", lease_ms)?;
    Ok(lease_ms)
}

/// What happened to one receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Outcome {
    pub receipt: String,
    /// `ok`; `stale` (the delivery no longer holds the message: its lease expired and it was
    /// redelivered, or it was acked or dead-lettered); `invalid` (not a receipt of this group).
    pub outcome: String,
}

/// The answer to an ack, nack or extend. Receipts that were `ok` took effect even when others
/// did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SettleResponse {
    pub outcomes: Vec<Outcome>,
    /// Set (with a 409 or 400 status) when some receipt was not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
}

fn outcome_name(outcome: ReceiptOutcome) -> &'static str {
    match outcome {
        ReceiptOutcome::Ok => "ok",
        ReceiptOutcome::Stale => "stale",
        ReceiptOutcome::Invalid => "invalid",
    }
}

/// How an ack, nack or extend is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleStatus {
    /// 200: every receipt was ok.
    AllOk,
    /// 409: some receipt was stale (and none invalid, or some invalid too).
    SomeStale,
    /// 400: some receipt was not a receipt of this group, none stale.
    SomeInvalid,
}

pub fn settle_status(outcomes: &[ReceiptOutcome]) -> SettleStatus {
    if outcomes.contains(&ReceiptOutcome::Stale) {
        SettleStatus::SomeStale
    } else if outcomes.contains(&ReceiptOutcome::Invalid) {
        SettleStatus::SomeInvalid
    } else {
        SettleStatus::AllOk
    }
}

pub fn settle_response(verb: &str, receipts: &[Receipt], outcomes: &[ReceiptOutcome]) -> (SettleStatus, SettleResponse) {
    let status = settle_status(outcomes);
    let outcomes_json: Vec<Outcome> = receipts.iter().zip(outcomes).map(|(r, o)| Outcome { receipt: r.to_string(), outcome: outcome_name(*o).to_string() }).collect();
    let count = |wanted: ReceiptOutcome| outcomes.iter().filter(|o| **o == wanted).count();
    let error = match status {
        SettleStatus::AllOk => None,
        SettleStatus::SomeStale => Some(serde_json::json!({
            "code": "stale_receipt",
            "message": format!("{} of {} receipts are stale (the delivery no longer holds the message) and were not {verb}; the others were", count(ReceiptOutcome::Stale), outcomes.len()),
        })),
        SettleStatus::SomeInvalid => Some(serde_json::json!({
            "code": "invalid_receipt",
            "message": format!("{} of {} receipts are not receipts of this group and were not {verb}; the others were", count(ReceiptOutcome::Invalid), outcomes.len()),
        })),
    };
    (status, SettleResponse { outcomes: outcomes_json, error })
}

// ---------------------------------------------------------------------------------------------
// Stats

/// `GET /v1/queues/{queue}`: the queue's numbers, in all and per group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueView {
    pub name: String,
    pub published_total: u64,
    /// Messages no group member holds yet, summed over groups (available plus delayed).
    pub depth: u64,
    pub in_flight: u64,
    pub dead_lettered: u64,
    pub delayed: u64,
    pub acked_total: u64,
    /// Age of the oldest message available now, over all groups.
    pub oldest_age_ms: Option<u64>,
    pub groups: Vec<GroupView>,
    pub config: ConfigView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupView {
    pub name: String,
    pub depth: u64,
    pub in_flight: u64,
    pub dead_lettered: u64,
    pub delayed: u64,
    /// Messages the group has not acked or dead-lettered yet.
    pub lag: u64,
    pub acked_total: u64,
    pub oldest_age_ms: Option<u64>,
}

/// How the queue behaves (the defaults, for queues created by a publish).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    pub durability: String,
    pub deliveries_max: u32,
    pub lease_ms_default: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub dedup_window_ms: u64,
    pub in_flight_per_consumer_max: usize,
}

fn group_view(group: &GroupStats) -> GroupView {
    GroupView {
        name: group.name.clone(),
        depth: group.depth,
        in_flight: group.in_flight,
        dead_lettered: group.dead_lettered,
        delayed: group.delayed,
        lag: group.lag,
        acked_total: group.acked_total,
        oldest_age_ms: group.oldest_available_age_ms,
    }
}

pub fn queue_view(name: &str, stats: &QueueStats, config: &QueueConfig) -> QueueView {
    QueueView {
        name: name.to_string(),
        published_total: stats.published_total,
        depth: stats.depth,
        in_flight: stats.in_flight,
        dead_lettered: stats.dead_lettered,
        delayed: stats.delayed,
        acked_total: stats.acked_total,
        oldest_age_ms: stats.oldest_available_age_ms,
        groups: stats.groups.iter().map(group_view).collect(),
        config: ConfigView {
            durability: config.durability.to_string(),
            deliveries_max: config.deliveries_max,
            lease_ms_default: config.lease_ms_default,
            backoff_base_ms: config.backoff.base_ms,
            backoff_max_ms: config.backoff.max_ms,
            dedup_window_ms: config.dedup_window_ms,
            in_flight_per_consumer_max: config.in_flight_per_consumer_max,
        },
    }
}

/// `GET /v1/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<QueueSummary>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueSummary {
    pub name: String,
    pub depth: u64,
    pub in_flight: u64,
    pub dead_lettered: u64,
    pub groups: usize,
}

pub fn queue_summary(name: &str, stats: &QueueStats) -> QueueSummary {
    QueueSummary { name: name.to_string(), depth: stats.depth, in_flight: stats.in_flight, dead_lettered: stats.dead_lettered, groups: stats.groups.len() }
}

// ---------------------------------------------------------------------------------------------
// Dead letters

/// `GET /v1/queues/{queue}/dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLettersQuery {
    /// Only this group's dead letters (default: every group's).
    pub group: Option<String>,
    /// First dead-letter offset to list (default 0); page on with `next_from`.
    pub from: Option<u64>,
    /// Most letters to list, 1 to `DEAD_LETTERS_PAGE_MAX` (1000); default 100.
    pub max: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettersPage {
    pub group: Option<String>,
    pub from: u64,
    pub max: usize,
}

pub fn dead_letters_page(query: DeadLettersQuery) -> Result<DeadLettersPage, ApiError> {
    if let Some(group) = &query.group {
        check_group(group)?;
    }
    let max = query.max.unwrap_or(DEAD_LETTERS_PAGE_DEFAULT);
    if max == 0 || max > DEAD_LETTERS_PAGE_MAX {
        return Err(ApiError::bad_request(format!("max must be 1 to DEAD_LETTERS_PAGE_MAX ({DEAD_LETTERS_PAGE_MAX}), got {max}")));
    }
    Ok(DeadLettersPage { group: query.group, from: query.from.unwrap_or(0), max })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetterView {
    /// Position in the dead-letter log.
    pub dlq_offset: u64,
    /// The id the message had in the queue (name it in a redrive).
    pub id: String,
    pub group: String,
    pub delivery_count: u32,
    pub reason: String,
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub enqueued_at_ms: u64,
    pub dead_lettered_at_ms: u64,
    /// Already republished by a redrive.
    pub redriven: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLettersResponse {
    pub dead_letters: Vec<DeadLetterView>,
    /// `from` of the next page.
    pub next_from: u64,
}

pub fn dead_letters_response(page: &DeadLettersPage, letters: &[DeadLetter]) -> DeadLettersResponse {
    let next_from = letters.last().map_or(page.from, |l| l.dlq_offset + 1);
    let dead_letters = letters
        .iter()
        .map(|l| DeadLetterView {
            dlq_offset: l.dlq_offset,
            id: l.id.to_string(),
            group: l.group.clone(),
            delivery_count: l.delivery_count,
            reason: l.reason.clone(),
            body: body_json(&l.body),
            key: l.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: headers_json(&l.headers),
            enqueued_at_ms: l.enqueued_at_ms,
            dead_lettered_at_ms: l.dead_lettered_at_ms,
            redriven: l.redriven,
        })
        .collect();
    DeadLettersResponse { dead_letters, next_from }
}

/// `POST /v1/queues/{queue}/dead-letters/redrive`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    /// Whose dead letters to republish (for that group only).
    pub group: String,
    /// Message ids (as listed); all of the group's letters not yet redriven when omitted.
    #[serde(default)]
    pub ids: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RedriveResponse {
    pub redriven: usize,
}

pub fn redrive(request: RedriveRequest) -> Result<(String, Redrive), ApiError> {
    check_group(&request.group)?;
    let which = match request.ids {
        None => Redrive::All,
        Some(ids) => {
            if ids.len() > BATCH_RECORDS_MAX {
                return Err(ApiError::too_large(format!("ids holds {} ids; BATCH_RECORDS_MAX is {BATCH_RECORDS_MAX}", ids.len())));
            }
            let parsed = ids
                .iter()
                .enumerate()
                .map(|(i, id)| id.parse::<MessageId>().map_err(|_| ApiError::bad_request(format!("ids[{i}]: {id:?} is not a message id (p<priority>-<offset>)"))))
                .collect::<Result<Vec<_>, _>>()?;
            Redrive::Ids(parsed)
        }
    };
    Ok((request.group, which))
}

// ---------------------------------------------------------------------------------------------
// WebSocket consumer

/// `GET /v1/queues/{queue}/ws`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    pub group: String,
    /// Default `anonymous`.
    pub consumer: Option<String>,
    /// Lease of each pushed message; default the queue's.
    pub lease_ms: Option<u64>,
    /// Credit granted up front (default 0: nothing is pushed until the client sends
    /// `{"credit": n}`).
    pub credit: Option<usize>,
}

/// What a WebSocket client may send (besides `{"credit": n}`, which the gateway takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Ack(Vec<Receipt>),
    Nack(Vec<Receipt>, Option<u64>),
    Extend(Vec<Receipt>, u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrame {
    ack: Option<Vec<String>>,
    nack: Option<Vec<String>>,
    extend: Option<Vec<String>>,
    delay_ms: Option<u64>,
    lease_ms: Option<u64>,
}

/// Read one client frame: exactly one of `ack`, `nack` (with `delay_ms`), `extend` (with
/// `lease_ms`).
pub fn client_frame(value: serde_json::Value) -> Result<ClientFrame, ApiError> {
    let raw: RawFrame = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("frames are {{\"credit\": n}}, {{\"ack\": [receipts]}}, {{\"nack\": [receipts], \"delay_ms\"?}} or {{\"extend\": [receipts], \"lease_ms\"}}: {e}")))?;
    let receipts = |field: &str, list: Vec<String>| {
        if list.is_empty() || list.len() > BATCH_RECORDS_MAX {
            return Err(ApiError::bad_request(format!("{field} must hold 1 to BATCH_RECORDS_MAX ({BATCH_RECORDS_MAX}) receipts, got {}", list.len())));
        }
        Ok(list.into_iter().map(Receipt::from).collect::<Vec<_>>())
    };
    match (raw.ack, raw.nack, raw.extend) {
        (Some(ack), None, None) => Ok(ClientFrame::Ack(receipts("ack", ack)?)),
        (None, Some(nack), None) => Ok(ClientFrame::Nack(receipts("nack", nack)?, nack_delay(raw.delay_ms)?)),
        (None, None, Some(extend)) => {
            let lease_ms = raw.lease_ms.ok_or_else(|| ApiError::bad_request("extend needs lease_ms"))?;
            Ok(ClientFrame::Extend(receipts("extend", extend)?, extend_lease(lease_ms)?))
        }
        _ => Err(ApiError::bad_request("a frame holds exactly one of ack, nack, extend (or is {\"credit\": n})")),
    }
}

/// A pushed message: `{"type":"message", ...}`.
pub fn ws_message(delivery: &Delivery) -> serde_json::Value {
    let mut value = serde_json::to_value(message(delivery)).expect("a message serializes");
    value.as_object_mut().expect("a message is an object").insert("type".to_string(), "message".into());
    value
}

/// The answer to an ack, nack or extend frame: `{"type":"acked"|"nacked"|"extended", "outcomes"}`.
pub fn ws_settled(kind: &str, receipts: &[Receipt], outcomes: &[ReceiptOutcome]) -> serde_json::Value {
    let (_, response) = settle_response(kind, receipts, outcomes);
    serde_json::json!({"type": kind, "outcomes": response.outcomes})
}

pub fn ws_error(error: &ApiError) -> serde_json::Value {
    serde_json::json!({"type": "error", "error": {"code": error.code, "message": error.message}})
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn publish(messages: serde_json::Value) -> Result<Vec<NewMessage>, ApiError> {
        new_messages(serde_json::from_value(serde_json::json!({ "messages": messages })).unwrap())
    }

    #[test]
    fn a_body_is_stored_as_its_json_bytes() {
        let messages = publish(serde_json::json!([{"body": {"a": [1, 2]}, "priority": 2, "headers": {"h": "v"}}])).unwrap();
        assert_eq!(messages[0].body.as_ref(), br#"{"a":[1,2]}"#);
        assert_eq!(messages[0].priority, 2);
        assert_eq!(messages[0].headers[0].name, "h");
    }

    #[test]
    fn refusals_name_the_field() {
        let error = publish(serde_json::json!([{"body": 1}, {"body": 2, "priority": 4}])).unwrap_err();
        assert!(error.message.contains("messages[1].priority"), "{error}");
        let error = publish(serde_json::json!([{"body": 1, "headers": {"tributary.x": "y"}}])).unwrap_err();
        assert!(error.message.contains("reserved"), "{error}");
    }

    #[test]
    fn a_stale_receipt_outweighs_an_invalid_one() {
        use ReceiptOutcome::*;
        assert_eq!(settle_status(&[Ok, Ok]), SettleStatus::AllOk);
        assert_eq!(settle_status(&[Ok, Invalid]), SettleStatus::SomeInvalid);
        assert_eq!(settle_status(&[Invalid, Stale]), SettleStatus::SomeStale);
    }

    #[test]
    fn client_frames_hold_one_verb() {
        assert!(matches!(client_frame(serde_json::json!({"ack": ["r"]})), Ok(ClientFrame::Ack(_))));
        assert!(matches!(client_frame(serde_json::json!({"nack": ["r"], "delay_ms": 5})), Ok(ClientFrame::Nack(_, Some(5)))));
        assert!(client_frame(serde_json::json!({"ack": ["r"], "nack": ["r"]})).is_err());
        assert!(client_frame(serde_json::json!({"extend": ["r"]})).is_err());
    }

    #[test]
    fn queue_names_are_namespaced_in_the_engine() {
        assert_eq!(engine_queue_name("orders").unwrap(), "mq.orders");
        assert_eq!(api_queue_name("mq.orders"), Some("orders"));
        assert_eq!(api_queue_name("email.outbox"), None);
        assert!(engine_queue_name("no spaces").is_err());
    }
}
