//! The HTTP, WebSocket and SSE routes of simple-pubsub, and the pump that feeds one connection.
//!
//! ```text
//! POST   /v1/pubsub/publish                          {"messages":[{"subject","data","headers"?}]} → 201 {"offsets":[…]}
//! POST   /v1/pubsub/topics/{subject}                 body = the data (any JSON)                → 201 {"offsets":[n]}
//! GET    /v1/pubsub/subscriptions?after=&limit=      a page of the registry
//! POST   /v1/pubsub/subscriptions:batch              {"subscriptions":[{"name",…spec}]}       → 201 {"registered":n}
//! PUT    /v1/pubsub/subscriptions/{name}             spec → 201 (new) / 200 (same or replaced)
//! GET    /v1/pubsub/subscriptions/{name}             spec, connection, buffers, lag
//! DELETE /v1/pubsub/subscriptions/{name}             → 204
//! GET    /v1/pubsub/subscriptions/{name}/ws          WebSocket  ?from_offset=N&credit=N
//! GET    /v1/pubsub/subscriptions/{name}/events      SSE        ?from_offset=N, or Last-Event-ID
//! GET    /v1/pubsub/ws , /v1/pubsub/events           ad hoc: ?patterns=a.b,c.>&policy=&buffer=&group=
//! ```
//!
//! Every stream starts with a `subscribed` control message and sends each message as
//! `{"offset","subject","data","headers"?}` (SSE: `event: message`, `id: <offset>`). It ends with
//! a `closed` control message naming the reason (`slow_consumer`, `taken_over`, `deleted`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tributary_engine::pubsub::{DisconnectReason, PubSubError, SubscriberState};
use tributary_server::gateway::CREDIT_MAX;
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Json, SystemApi, WsConnection, blocking};

use super::process::{self, Invalid, Merge, Message, Policy, PublishMessage, SubscriptionSpec};
use super::{ID, Named, RegisterError, SimplePubsub};

/// Subscriptions in one page of the listing, at most.
pub const LIST_LIMIT_MAX: usize = 1_000;
/// A connection with nothing to do re-checks its subscription this often.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Events queued towards one SSE client before the pump waits.
pub const SSE_EVENTS_MAX: usize = 256;

type Shared = Arc<SimplePubsub>;

pub fn router(system: Shared) -> SystemApi {
    let router = OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(publish_one))
        .routes(routes!(list_subscriptions))
        .routes(routes!(register_batch))
        .routes(routes!(put_subscription, get_subscription, delete_subscription))
        .routes(routes!(subscription_ws))
        .routes(routes!(subscription_events))
        .routes(routes!(ad_hoc_ws))
        .routes(routes!(ad_hoc_events))
        .with_state(system);
    SystemApi { id: ID, prefixes: vec!["/v1/pubsub"], router }
}

impl From<Invalid> for ApiError {
    fn from(error: Invalid) -> ApiError {
        match error {
            Invalid::Bad(message) => ApiError::bad_request(message),
            Invalid::TooLarge(message) => ApiError::too_large(message),
        }
    }
}

impl From<RegisterError> for ApiError {
    fn from(error: RegisterError) -> ApiError {
        match error {
            RegisterError::Stream(e) => e.into(),
            RegisterError::Invalid(e) => e.into(),
            RegisterError::Broker(e @ PubSubError::TooManySubscriptions { .. }) => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "subscriptions_full", e.to_string()),
            RegisterError::Broker(e) => ApiError::bad_request(e.to_string()),
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub messages: Vec<PublishMessage>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PublishResponse {
    /// The log offset of each message, in request order.
    pub offsets: Vec<u64>,
}

/// Publish a batch; answered once every message is durable in the log.
#[utoipa::path(post, path = "/v1/pubsub/publish", request_body = PublishRequest,
    responses((status = 201, body = PublishResponse), (status = 400, description = "bad subject or body"), (status = 413, description = "over MESSAGE_BYTES_MAX or PUBLISH_BATCH_MAX")))]
async fn publish(State(system): State<Shared>, Json(request): Json<PublishRequest>) -> Result<(StatusCode, axum::Json<PublishResponse>), ApiError> {
    publish_messages(system, request.messages).await
}

/// Publish one message to `subject`; the body is its data.
#[utoipa::path(post, path = "/v1/pubsub/topics/{subject}", params(("subject" = String, Path, description = "e.g. orders.eu.created")),
    request_body = Object, responses((status = 201, body = PublishResponse), (status = 400, description = "bad subject")))]
async fn publish_one(State(system): State<Shared>, Path(subject): Path<String>, Json(data): Json<serde_json::Value>) -> Result<(StatusCode, axum::Json<PublishResponse>), ApiError> {
    publish_messages(system, vec![PublishMessage { subject, data, headers: Default::default() }]).await
}

async fn publish_messages(system: Shared, messages: Vec<PublishMessage>) -> Result<(StatusCode, axum::Json<PublishResponse>), ApiError> {
    let prepared = process::prepare_publish(messages, Instant::now())?;
    let offsets = blocking(move || system.publish(prepared)).await?;
    Ok((StatusCode::CREATED, axum::Json(PublishResponse { offsets })))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Names after this one.
    pub after: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SubscriptionList {
    pub total: usize,
    pub subscriptions: Vec<SubscriptionView>,
}

/// A page of registered subscriptions, in name order.
#[utoipa::path(get, path = "/v1/pubsub/subscriptions", params(ListQuery), responses((status = 200, body = SubscriptionList)))]
async fn list_subscriptions(State(system): State<Shared>, Query(query): Query<ListQuery>) -> axum::Json<SubscriptionList> {
    let limit = query.limit.unwrap_or(100).clamp(1, LIST_LIMIT_MAX);
    let page = system.subscriptions_page(query.after.as_deref(), limit);
    let end = system.log_end();
    axum::Json(SubscriptionList { total: system.subscriptions_count(), subscriptions: page.iter().map(|n| view(n, end)).collect() })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchEntry {
    pub name: String,
    pub patterns: Vec<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub buffer: Option<usize>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub subscriptions: Vec<BatchEntry>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    pub registered: usize,
    pub created: usize,
}

/// Register many subscriptions at once (at most REGISTER_BATCH_MAX), persisted as one batch.
#[utoipa::path(post, path = "/v1/pubsub/subscriptions:batch", request_body = BatchRequest,
    responses((status = 201, body = BatchResponse), (status = 400, description = "a bad name or pattern; nothing registered"), (status = 413, description = "over REGISTER_BATCH_MAX")))]
async fn register_batch(State(system): State<Shared>, Json(request): Json<BatchRequest>) -> Result<(StatusCode, axum::Json<BatchResponse>), ApiError> {
    if request.subscriptions.len() > process::REGISTER_BATCH_MAX {
        return Err(ApiError::too_large(format!("{} subscriptions in one batch: at most REGISTER_BATCH_MAX ({})", request.subscriptions.len(), process::REGISTER_BATCH_MAX)));
    }
    let entries: Vec<(String, SubscriptionSpec)> =
        request.subscriptions.into_iter().map(|e| (e.name, SubscriptionSpec { patterns: e.patterns, group: e.group, policy: e.policy, buffer: e.buffer })).collect();
    let created = blocking(move || system.register(entries)).await?;
    Ok((StatusCode::CREATED, axum::Json(BatchResponse { registered: created.len(), created: created.iter().filter(|c| **c).count() })))
}

/// Register (or replace) a named subscription. Durable once answered.
#[utoipa::path(put, path = "/v1/pubsub/subscriptions/{name}", params(("name" = String, Path)), request_body = SubscriptionSpec,
    responses((status = 201, body = SubscriptionView, description = "registered"), (status = 200, body = SubscriptionView, description = "already registered, or replaced"), (status = 400, description = "bad name or pattern")))]
async fn put_subscription(State(system): State<Shared>, Path(name): Path<String>, Json(spec): Json<SubscriptionSpec>) -> Result<(StatusCode, axum::Json<SubscriptionView>), ApiError> {
    let worker = system.clone();
    let key = name.clone();
    let created = blocking(move || worker.register(vec![(key, spec)])).await?;
    let named = system.subscription(&name).ok_or_else(|| ApiError::internal("registered, then gone"))?;
    let status = if created[0] { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(view(&named, system.log_end()))))
}

/// One subscription: its spec, whether a connection is attached, its buffers and its lag.
#[utoipa::path(get, path = "/v1/pubsub/subscriptions/{name}", params(("name" = String, Path)),
    responses((status = 200, body = SubscriptionView), (status = 404, description = "no such subscription")))]
async fn get_subscription(State(system): State<Shared>, Path(name): Path<String>) -> Result<axum::Json<SubscriptionView>, ApiError> {
    let named = find(&system, &name)?;
    Ok(axum::Json(view(&named, system.log_end())))
}

/// Delete a subscription; an attached connection is closed with reason `deleted`.
#[utoipa::path(delete, path = "/v1/pubsub/subscriptions/{name}", params(("name" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, description = "no such subscription")))]
async fn delete_subscription(State(system): State<Shared>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let key = name.clone();
    if blocking(move || system.unregister(&key)).await? { Ok(StatusCode::NO_CONTENT) } else { Err(unknown(&name)) }
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found(format!("no subscription named {name:?}"))
}

/// A registered subscription (on a shared log, also one registered through another node).
fn find(system: &SimplePubsub, name: &str) -> Result<Arc<Named>, ApiError> {
    system.lookup(name)?.ok_or_else(|| unknown(name))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SubscriptionView {
    pub name: String,
    pub patterns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub policy: Policy,
    pub buffer: usize,
    pub connected: bool,
    /// The last offset handed to a connection.
    pub last_delivered_offset: Option<u64>,
    /// The log's end offset now.
    pub log_end_offset: u64,
    /// Offsets between the last delivered and the log's end (an upper bound on matching
    /// messages not yet delivered: the log holds every subject).
    pub lag: u64,
    /// One per pattern: the broker buffer behind it.
    pub subscribers: Vec<SubscriberView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SubscriberView {
    pub pattern: String,
    /// `active`, `lagging` (a catch_up buffer that stopped), or `disconnected`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub buffered: usize,
    pub buffer: usize,
    pub delivered: u64,
    pub dropped: u64,
    pub blocked: u64,
    /// The last offset put into the buffer.
    pub last_buffered_offset: Option<u64>,
}

fn reason_text(reason: DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::SlowConsumer => "slow_consumer",
        DisconnectReason::Unsubscribed => "unsubscribed",
        DisconnectReason::Backend => "backend_closed",
    }
}

fn view(named: &Named, end: u64) -> SubscriptionView {
    let last = named.last_sent();
    let subscribers = named
        .stats()
        .into_iter()
        .map(|s| {
            let (state, resume_from, reason) = match s.state {
                SubscriberState::Active => ("active", None, None),
                SubscriberState::Lagging { resume_from } => ("lagging", Some(resume_from), None),
                SubscriberState::Disconnected { reason } => ("disconnected", None, Some(reason_text(reason))),
            };
            SubscriberView {
                pattern: s.pattern,
                state,
                resume_from,
                reason,
                buffered: s.buffered,
                buffer: s.buffer_messages,
                delivered: s.delivered,
                dropped: s.dropped,
                blocked: s.blocked,
                last_buffered_offset: s.last_delivered_offset,
            }
        })
        .collect();
    SubscriptionView {
        name: named.name.clone(),
        patterns: named.spec.patterns.clone(),
        group: named.spec.group.clone(),
        policy: named.spec.policy,
        buffer: named.spec.buffer_messages(),
        connected: named.is_attached(),
        last_delivered_offset: last,
        log_end_offset: end,
        lag: end.saturating_sub(last.map_or(0, |o| o + 1)),
        subscribers,
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct StreamQuery {
    /// The first offset wanted: replay from the log, then live.
    pub from_offset: Option<String>,
    /// WebSocket only: turn on credit flow control with this much credit up front.
    pub credit: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AdHocQuery {
    /// Comma-separated patterns (`orders.*.created,sensors/+/temp`).
    pub patterns: Option<String>,
    pub policy: Option<String>,
    pub buffer: Option<String>,
    pub group: Option<String>,
    pub from_offset: Option<String>,
    pub credit: Option<String>,
}

fn number(field: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    text.map(|t| t.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{field} must be a non-negative integer, got {t:?}")))).transpose()
}

fn credit(text: Option<&str>) -> Result<Option<usize>, ApiError> {
    match number("credit", text)? {
        Some(n) if n as usize > CREDIT_MAX => Err(ApiError::bad_request(format!("credit {n} is over CREDIT_MAX ({CREDIT_MAX})"))),
        other => Ok(other.map(|n| n as usize)),
    }
}

/// `Last-Event-ID: n` (SSE reconnect) means "after n"; it wins over `from_offset`.
fn start_offset(headers: &HeaderMap, from_offset: Option<&str>) -> Result<Option<u64>, ApiError> {
    if let Some(value) = headers.get("last-event-id") {
        let text = value.to_str().unwrap_or_default();
        let last = text.parse::<u64>().map_err(|_| ApiError::bad_request(format!("Last-Event-ID must be an offset, got {text:?}")))?;
        return Ok(Some(last + 1));
    }
    number("from_offset", from_offset)
}

fn ad_hoc_spec(query: &AdHocQuery) -> Result<SubscriptionSpec, ApiError> {
    let patterns: Vec<String> = query.patterns.as_deref().unwrap_or_default().split(',').filter(|p| !p.is_empty()).map(str::to_string).collect();
    let policy = match query.policy.as_deref() {
        None => Policy::default(),
        Some(text) => serde_json::from_value(serde_json::Value::String(text.to_string()))
            .map_err(|_| ApiError::bad_request(format!("policy must be drop_oldest, block, disconnect or catch_up, got {text:?}")))?,
    };
    let buffer = number("buffer", query.buffer.as_deref())?.map(|n| n as usize);
    let spec = SubscriptionSpec { patterns, group: query.group.clone(), policy, buffer };
    spec.validate()?;
    Ok(spec)
}

/// Stream a named subscription over a WebSocket.
#[utoipa::path(get, path = "/v1/pubsub/subscriptions/{name}/ws", params(("name" = String, Path), StreamQuery),
    responses((status = 101, description = "WebSocket"), (status = 404, description = "no such subscription")))]
async fn subscription_ws(State(system): State<Shared>, Path(name): Path<String>, Query(query): Query<StreamQuery>, upgrade: WebSocketUpgrade) -> Result<Response, ApiError> {
    let named = find(&system, &name)?;
    let from = number("from_offset", query.from_offset.as_deref())?;
    let credit = credit(query.credit.as_deref())?;
    Ok(websocket(system, named, from, credit, upgrade))
}

/// Stream a named subscription as Server-Sent Events; `id:` is the offset.
#[utoipa::path(get, path = "/v1/pubsub/subscriptions/{name}/events", params(("name" = String, Path), StreamQuery),
    responses((status = 200, description = "text/event-stream"), (status = 404, description = "no such subscription")))]
async fn subscription_events(State(system): State<Shared>, Path(name): Path<String>, Query(query): Query<StreamQuery>, headers: HeaderMap) -> Result<Response, ApiError> {
    let named = find(&system, &name)?;
    let from = start_offset(&headers, query.from_offset.as_deref())?;
    Ok(events(system, named, from))
}

/// Subscribe ad hoc over a WebSocket for as long as it lives.
#[utoipa::path(get, path = "/v1/pubsub/ws", params(AdHocQuery), responses((status = 101, description = "WebSocket"), (status = 400, description = "bad pattern")))]
async fn ad_hoc_ws(State(system): State<Shared>, Query(query): Query<AdHocQuery>, upgrade: WebSocketUpgrade) -> Result<Response, ApiError> {
    let spec = ad_hoc_spec(&query)?;
    let from = number("from_offset", query.from_offset.as_deref())?;
    let credit = credit(query.credit.as_deref())?;
    let named = system.ad_hoc(spec)?;
    Ok(websocket(system, named, from, credit, upgrade))
}

/// Subscribe ad hoc as Server-Sent Events.
#[utoipa::path(get, path = "/v1/pubsub/events", params(AdHocQuery), responses((status = 200, description = "text/event-stream"), (status = 400, description = "bad pattern")))]
async fn ad_hoc_events(State(system): State<Shared>, Query(query): Query<AdHocQuery>, headers: HeaderMap) -> Result<Response, ApiError> {
    let spec = ad_hoc_spec(&query)?;
    let from = start_offset(&headers, query.from_offset.as_deref())?;
    let named = system.ad_hoc(spec)?;
    Ok(events(system, named, from))
}

fn websocket(system: Shared, named: Arc<Named>, from: Option<u64>, credit: Option<usize>, upgrade: WebSocketUpgrade) -> Response {
    let gateway = system.gateway().clone();
    gateway.websocket(ID, upgrade, credit, move |mut connection| async move {
        pump(system, named, from, Sink::Ws(&mut connection)).await;
    })
}

fn events(system: Shared, named: Arc<Named>, from: Option<u64>) -> Response {
    let (tx, rx) = mpsc::channel(SSE_EVENTS_MAX);
    let gateway = system.gateway().clone();
    tokio::spawn(pump(system, named, from, Sink::Sse(tx)));
    gateway.sse(ID, tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}

/// Where a pump writes.
enum Sink<'a> {
    Ws(&'a mut WsConnection),
    Sse(mpsc::Sender<Event>),
}

struct Gone;

enum Wake {
    Published,
    Checked,
}

impl Sink<'_> {
    async fn data(&self, message: &Message) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => connection.send_data(message).await.map_err(|_| Gone),
            Sink::Sse(tx) => {
                let data = serde_json::to_string(message).expect("messages serialize");
                tx.send(Event::default().event("message").id(message.offset.to_string()).data(data)).await.map_err(|_| Gone)
            }
        }
    }

    async fn control(&self, kind: &str, value: serde_json::Value) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => connection.send(&HashMap::from([(kind, value)])).await.map_err(|_| Gone),
            Sink::Sse(tx) => tx.send(Event::default().event(kind).data(value.to_string())).await.map_err(|_| Gone),
        }
    }

    /// Wait for a publish, a change of the subscription, the idle check, or the peer leaving.
    async fn wait(&mut self, end: &mut tokio::sync::watch::Receiver<u64>, named: &Named) -> Result<Wake, Gone> {
        let changed = named.changed.notified();
        match self {
            Sink::Ws(connection) => {
                tokio::select! {
                    r = end.changed() => r.map(|_| Wake::Published).map_err(|_| Gone),
                    _ = changed => Ok(Wake::Checked),
                    _ = tokio::time::sleep(IDLE_CHECK) => Ok(Wake::Checked),
                    frame = connection.recv() => match frame {
                        None => Err(Gone),
                        Some(_) => {
                            let reply = serde_json::json!({"code": "bad_request", "message": "this stream takes only {\"credit\": n} frames"});
                            connection.send(&HashMap::from([("error", reply)])).await.map_err(|_| Gone)?;
                            Ok(Wake::Checked)
                        }
                    },
                }
            },
            Sink::Sse(tx) => tokio::select! {
                r = end.changed() => r.map(|_| Wake::Published).map_err(|_| Gone),
                _ = changed => Ok(Wake::Checked),
                _ = tokio::time::sleep(IDLE_CHECK) => Ok(Wake::Checked),
                _ = tx.closed() => Err(Gone),
            },
        }
    }
}

/// Detaches the connection however the pump ends.
struct Attached {
    system: Shared,
    named: Arc<Named>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.system.detach(&self.named);
    }
}

/// Feed one connection: replay from the log when asked, then live, merging the buffers of the
/// subscription's patterns in offset order; catch up from the log when a buffer fell behind.
async fn pump(system: Shared, named: Arc<Named>, from: Option<u64>, mut sink: Sink<'_>) {
    let mut end_rx = system.watch_end();
    let (generation, end) = system.attach(&named);
    let _attached = Attached { system: system.clone(), named: named.clone() };
    let patterns: Vec<String> = named.patterns().iter().map(|p| p.as_str().to_string()).collect();
    let hello = serde_json::json!({"subscription": named.name, "patterns": patterns, "from_offset": from, "log_end_offset": end});
    if sink.control("subscribed", hello).await.is_err() {
        return;
    }
    let mut merge = Merge::starting_after(from.and_then(|f| f.checked_sub(1)));
    if let Some(from) = from
        && replay(&system, &named, &mut merge, &sink, from, end).await.is_err()
    {
        return;
    }
    loop {
        let reason = if named.is_deleted() {
            Some("deleted")
        } else if named.generation.load(std::sync::atomic::Ordering::Acquire) != generation {
            Some("taken_over")
        } else {
            None
        };
        if let Some(reason) = reason {
            let _ = sink.control("closed", serde_json::json!({"reason": reason, "last_offset": merge.last_sent()})).await;
            return;
        }
        let end = *end_rx.borrow_and_update();
        let drained = named.drain(&mut merge);
        for message in merge.ready(end, drained.lagging_from) {
            if sink.data(&message).await.is_err() {
                return;
            }
            named.sent(message.offset);
            system.metrics.messages_out(1);
            if let Some(accepted) = message.accepted {
                system.metrics.latency(accepted.elapsed());
            }
        }
        if let Some(reason) = drained.closed {
            let reason = serde_json::json!({"reason": reason_text(reason), "last_offset": merge.last_sent()});
            let _ = sink.control("closed", reason).await;
            return;
        }
        if let Some(lagging_from) = drained.lagging_from {
            let start = merge.replay_start(lagging_from);
            let end = system.resume(&named);
            if replay(&system, &named, &mut merge, &sink, start, end).await.is_err() {
                return;
            }
            continue;
        }
        match sink.wait(&mut end_rx, &named).await {
            Ok(Wake::Published | Wake::Checked) => {}
            Err(Gone) => return,
        }
    }
}

/// Send the matching messages of the log in `[from, to)` that were not sent yet; afterwards
/// everything below `to` counts as sent.
async fn replay(system: &Shared, named: &Arc<Named>, merge: &mut Merge, sink: &Sink<'_>, from: u64, to: u64) -> Result<(), Gone> {
    let patterns = named.patterns();
    let patterns = Arc::new(patterns);
    let mut offset = from;
    while offset < to {
        let (reader, wanted) = (system.clone(), patterns.clone());
        let (messages, next) = match blocking(move || reader.read_log(offset, to, &wanted)).await {
            Ok(read) => read,
            Err(error) => {
                system.metrics.error();
                let _ = sink.control("closed", serde_json::json!({"reason": "log_unreadable", "message": error.message})).await;
                return Err(Gone);
            }
        };
        for message in messages {
            if !merge.accept_replayed(message.offset) {
                continue;
            }
            sink.data(&message).await?;
            merge.mark_sent(message.offset);
            named.sent(message.offset);
            system.metrics.messages_out(1);
        }
        offset = next;
    }
    if to > from {
        merge.mark_sent(to - 1);
    }
    Ok(())
}
