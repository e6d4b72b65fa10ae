//! The HTTP, WebSocket and SSE routes of realtime-notifications, and the pump that feeds one
//! connection.
//!
//! ```text
//! POST /v1/notifications/publish            {"notifications":[{"topic","data"}]} → 201 {"positions":[{"partition","offset"}]}
//! GET  /v1/notifications/ws                 WebSocket  ?user=&topics=a,b&token=&batch_max=&linger_ms=&presence=
//! GET  /v1/notifications/events             SSE        the same; Last-Event-ID is the token
//! GET  /v1/notifications/presence/{topic}   who is connected to a topic ?limit=
//! GET  /v1/notifications/users/{user}       whether a user is connected, and how many times
//! ```
//!
//! A stream starts with `{"connected":{"connection","user","topics","partitions","token","replaying"}}`
//! and then sends frames `{"notifications":[{"topic","partition","offset","timestamp_ms","data"}…],
//! "token":"…"}`; over SSE each is an event `connected` / `notifications` whose `id` is the token.
//! With `presence=true` it also gets `{"presence":{"topic","user","event":"join"|"leave"}}`. An
//! error ends the stream with `{"error":{"code","message"}}` (SSE: event `error`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tributary_server::presence::{PresenceEvent, ScopePresence};
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Json, SystemApi, WsConnection, blocking};

use super::process::{self, ConnectOptions, FrameLimits, Invalid, PERSONAL_PREFIX, Pending, PublishNotification, Token};
use super::{Connection, ID, Notifications};

/// Events queued towards one SSE client before the pump waits.
pub const SSE_EVENTS_MAX: usize = 16;
/// Members listed by the presence route unless `limit` says otherwise.
pub const PRESENCE_LIMIT_DEFAULT: usize = 100;

type Shared = Arc<Notifications>;

pub fn router(system: Shared) -> SystemApi {
    let router = OpenApiRouter::new()
        .routes(routes!(publish))
        .routes(routes!(websocket))
        .routes(routes!(events))
        .routes(routes!(topic_presence))
        .routes(routes!(user_presence))
        .with_state(system);
    SystemApi { id: ID, prefixes: vec!["/v1/notifications"], router }
}

impl From<Invalid> for ApiError {
    fn from(error: Invalid) -> ApiError {
        let message = error.to_string();
        match error {
            Invalid::Bad(_) => ApiError::bad_request(message),
            Invalid::TooLarge(_) => ApiError::too_large(message),
            Invalid::Forbidden(_) => ApiError::forbidden(message),
            Invalid::Expired(_) => ApiError::new(StatusCode::GONE, "resume_token_expired", message),
            Invalid::UnknownEpoch(_) => ApiError::new(StatusCode::GONE, "resume_token_unknown", message),
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub notifications: Vec<PublishNotification>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PublishResponse {
    /// Where each notification landed in the log, in request order.
    pub positions: Vec<Position>,
}

/// Publish notifications; answered once every one is durable in the log.
#[utoipa::path(post, path = "/v1/notifications/publish", request_body = PublishRequest,
    responses((status = 201, body = PublishResponse), (status = 400, description = "bad topic or body"), (status = 413, description = "over NOTIFICATION_BYTES_MAX or PUBLISH_BATCH_MAX")))]
async fn publish(State(system): State<Shared>, Json(request): Json<PublishRequest>) -> Result<(StatusCode, axum::Json<PublishResponse>), ApiError> {
    let records = process::prepare_publish(&request.notifications)?;
    let positions = blocking(move || system.publish(records)).await?;
    Ok((StatusCode::CREATED, axum::Json(PublishResponse { positions: positions.into_iter().map(|(partition, offset)| Position { partition, offset }).collect() })))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConnectQuery {
    /// The connecting user (or the `Tributary-User` header).
    pub user: Option<String>,
    /// Comma-separated topics; the user's personal topic `user.<id>` is always added.
    pub topics: Option<String>,
    /// A resume token from an earlier connection: replay what it missed, then live.
    pub token: Option<String>,
    /// Most notifications per frame (1 to FRAME_NOTIFICATIONS_MAX, default 100).
    pub batch_max: Option<String>,
    /// Wait this long after a wake-up for more notifications before framing (0 to LINGER_MS_MAX).
    pub linger_ms: Option<String>,
    /// `true`: also send join/leave events of the connection's topics.
    pub presence: Option<String>,
}

/// What a connection asked for, checked before it is accepted.
struct Session {
    user: String,
    topics: Vec<String>,
    token: Option<Token>,
    options: ConnectOptions,
}

fn session(system: &Notifications, query: &ConnectQuery, headers: &HeaderMap, token: Option<&str>) -> Result<Session, ApiError> {
    let user = tributary_server::named_user(query.user.as_deref(), headers, "connecting")?;
    process::check_user(&user)?;
    let topics = process::connection_topics(&user, query.topics.as_deref())?;
    let mut options = BTreeMap::new();
    for (field, value) in [("batch_max", &query.batch_max), ("linger_ms", &query.linger_ms), ("presence", &query.presence)] {
        if let Some(value) = value {
            options.insert(field.to_string(), value.clone());
        }
    }
    let options = process::connect_options(&options)?;
    let token = match token.filter(|t| !t.is_empty()) {
        None => None,
        Some(text) => {
            let token = Token::decode(text)?;
            let (starts, ends) = system.log_bounds()?;
            token.check(system.epoch(), &starts, &ends)?;
            Some(token)
        }
    };
    Ok(Session { user, topics, token, options })
}

/// Receive notifications over a WebSocket.
#[utoipa::path(get, path = "/v1/notifications/ws", params(ConnectQuery),
    responses((status = 101, description = "WebSocket"), (status = 400, description = "no user, bad topic, bad option or malformed token"),
        (status = 403, description = "another user's personal topic"), (status = 410, description = "resume token older than retention, or of a reset log")))]
async fn websocket(State(system): State<Shared>, Query(query): Query<ConnectQuery>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Result<Response, ApiError> {
    let session = session(&system, &query, &headers, query.token.as_deref())?;
    let gateway = system.gateway().clone();
    Ok(gateway.websocket(ID, upgrade, None, move |mut connection| async move {
        pump(system, session, Sink::Ws(&mut connection)).await;
    }))
}

/// Receive notifications as Server-Sent Events; `Last-Event-ID` (or `?token=`) resumes.
#[utoipa::path(get, path = "/v1/notifications/events", params(ConnectQuery),
    responses((status = 200, description = "text/event-stream"), (status = 400, description = "no user, bad topic, bad option or malformed token"),
        (status = 403, description = "another user's personal topic"), (status = 410, description = "resume token older than retention, or of a reset log")))]
async fn events(State(system): State<Shared>, Query(query): Query<ConnectQuery>, headers: HeaderMap) -> Result<Response, ApiError> {
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().map_err(|_| ApiError::bad_request("Last-Event-ID is not text"))).transpose()?;
    let session = session(&system, &query, &headers, last_event_id.or(query.token.as_deref()))?;
    let (tx, rx) = mpsc::channel(SSE_EVENTS_MAX);
    let gateway = system.gateway().clone();
    tokio::spawn(pump(system, session, Sink::Sse(tx)));
    Ok(gateway.sse(ID, tokio_stream::wrappers::ReceiverStream::new(rx)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PresenceQuery {
    /// Members listed, at most (default 100, at most PRESENCE_MEMBERS_PAGE_MAX).
    pub limit: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TopicPresence {
    pub topic: String,
    /// Distinct users connected to the topic.
    pub users: usize,
    pub connections: u64,
    /// `[{"user","connections"}]`, sorted by user.
    #[schema(value_type = Vec<Object>)]
    pub members: Vec<tributary_server::presence::Member>,
}

/// Who is connected to a topic.
#[utoipa::path(get, path = "/v1/notifications/presence/{topic}", params(("topic" = String, Path), PresenceQuery),
    responses((status = 200, body = TopicPresence), (status = 400, description = "bad topic")))]
async fn topic_presence(State(system): State<Shared>, Path(topic): Path<String>, Query(query): Query<PresenceQuery>) -> Result<axum::Json<TopicPresence>, ApiError> {
    process::check_topic(&topic)?;
    let ScopePresence { users, connections, members } = system.presence().members(&topic, query.limit.unwrap_or(PRESENCE_LIMIT_DEFAULT)).await?;
    Ok(axum::Json(TopicPresence { topic, users, connections, members }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UserPresence {
    pub user: String,
    pub online: bool,
    pub connections: u32,
}

/// Whether a user is connected, and with how many connections.
#[utoipa::path(get, path = "/v1/notifications/users/{user}", params(("user" = String, Path)),
    responses((status = 200, body = UserPresence), (status = 400, description = "bad user id")))]
async fn user_presence(State(system): State<Shared>, Path(user): Path<String>) -> Result<axum::Json<UserPresence>, ApiError> {
    process::check_user(&user)?;
    let connections = system.presence().user_connections(&user).await?;
    Ok(axum::Json(UserPresence { user, online: connections > 0, connections }))
}

/// Where a pump writes.
enum Sink<'a> {
    Ws(&'a mut WsConnection),
    Sse(mpsc::Sender<Event>),
}

struct Gone;

enum Wake {
    Queued,
    Presence(Result<PresenceEvent, broadcast::error::RecvError>),
}

impl Sink<'_> {
    /// A frame of notifications (already JSON); over SSE its id is the token.
    async fn frame(&self, json: String, token: &str) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => connection.send_text(json).await.map_err(|_| Gone),
            Sink::Sse(tx) => tx.send(Event::default().event("notifications").id(token).data(json)).await.map_err(|_| Gone),
        }
    }

    async fn control(&self, kind: &str, value: serde_json::Value, id: Option<&str>) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => connection.send(&serde_json::json!({ kind: value })).await.map_err(|_| Gone),
            Sink::Sse(tx) => {
                let mut event = Event::default().event(kind).data(value.to_string());
                if let Some(id) = id {
                    event = event.id(id);
                }
                tx.send(event).await.map_err(|_| Gone)
            }
        }
    }

    async fn error(&self, code: &str, message: String) {
        let _ = self.control("error", serde_json::json!({"code": code, "message": message}), None).await;
    }

    /// Wait for queued notifications, a presence event, or the peer leaving.
    async fn wait(&mut self, connection: &Connection, presence: &mut Option<broadcast::Receiver<PresenceEvent>>) -> Result<Wake, Gone> {
        let presence_event = async {
            match presence {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        match self {
            Sink::Ws(ws) => tokio::select! {
                _ = connection.woken() => Ok(Wake::Queued),
                event = presence_event => Ok(Wake::Presence(event)),
                frame = ws.recv() => match frame {
                    None => Err(Gone),
                    Some(_) => {
                        let reply = serde_json::json!({"error": {"code": "bad_request", "message": "this stream takes no frames from the client; to change topics, reconnect with them and the last token"}});
                        ws.send(&reply).await.map_err(|_| Gone)?;
                        Ok(Wake::Queued)
                    }
                },
            },
            Sink::Sse(tx) => tokio::select! {
                _ = connection.woken() => Ok(Wake::Queued),
                event = presence_event => Ok(Wake::Presence(event)),
                _ = tx.closed() => Err(Gone),
            },
        }
    }
}

/// Takes the connection out of the index however the pump ends.
struct Registered {
    system: Shared,
    connection: Arc<Connection>,
    topics: Vec<String>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.system.unregister(&self.connection, &self.topics);
    }
}

/// Feed one connection: register it, replay from its token when it has one, then live.
async fn pump(system: Shared, session: Session, mut sink: Sink<'_>) {
    let Session { user, topics, token, options } = session;
    let (connection, registered_at) = system.register(&topics);
    let _registered = Registered { system: system.clone(), connection: connection.clone(), topics: topics.clone() };
    let public: Vec<String> = topics.iter().filter(|t| !t.starts_with(PERSONAL_PREFIX)).cloned().collect();
    let _present = system.presence().join(&user, &public);
    let mut presence = options.presence_events.then(|| system.presence().subscribe());
    let replaying = token.is_some();
    let mut positions = token.map_or_else(|| registered_at.clone(), |t| t.positions);
    let start = system.token(positions.clone()).encode();
    let hello = serde_json::json!({"connection": connection.id, "user": user, "topics": topics, "partitions": system.partitions(), "token": start, "replaying": replaying});
    if sink.control("connected", hello, Some(&start)).await.is_err() {
        return;
    }
    let wanted: Arc<HashSet<String>> = Arc::new(topics.iter().cloned().collect());
    if replaying && replay(&system, &wanted, &mut positions, &registered_at, &sink, options.limits).await.is_err() {
        return;
    }
    loop {
        match sink.wait(&connection, &mut presence).await {
            Err(Gone) => return,
            Ok(Wake::Presence(event)) => {
                let sent = match event {
                    Ok(event) if wanted.contains(&*event.scope) => {
                        sink.control("presence", serde_json::json!({"topic": &*event.scope, "user": &*event.user, "event": event.event}), None).await
                    }
                    Ok(_) => Ok(()),
                    Err(broadcast::error::RecvError::Lagged(missed)) => sink.control("presence_lagged", serde_json::json!({"missed": missed}), None).await,
                    Err(broadcast::error::RecvError::Closed) => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
                continue;
            }
            Ok(Wake::Queued) => {}
        }
        if options.linger_ms > 0 {
            tokio::time::sleep(Duration::from_millis(options.linger_ms)).await;
        }
        // Read before taking: every matching notification below it is in what is taken.
        let watermark = system.watermark();
        let (queued, overflowed) = connection.take(&watermark);
        if overflowed {
            let to = system.resync(&connection);
            if replay(&system, &wanted, &mut positions, &to, &sink, options.limits).await.is_err() {
                return;
            }
            continue;
        }
        if queued.is_empty() {
            continue;
        }
        let oldest = queued.iter().map(|n| n.accepted).min();
        let items: Vec<Pending> = queued.iter().filter(|n| n.pending.offset >= positions[n.pending.partition as usize]).map(|n| n.pending.clone()).collect();
        drop(queued);
        if send_frames(&system, &sink, &items, &mut positions, Some(&watermark), options.limits, false).await.is_err() {
            return;
        }
        if let Some(oldest) = oldest {
            system.metrics.latency(oldest.elapsed());
        }
    }
}

/// Send `items` in frames, advancing `positions` past each; after the last frame, also up to
/// `settled` (a watermark below which nothing more is coming for this connection).
async fn send_frames(system: &Notifications, sink: &Sink<'_>, items: &[Pending], positions: &mut [u64], settled: Option<&[u64]>, limits: FrameLimits, replayed: bool) -> Result<(), Gone> {
    let frames = process::cut_frames(items, limits);
    let last = frames.len().saturating_sub(1);
    for (i, frame) in frames.into_iter().enumerate() {
        process::advance(positions, frame);
        if i == last
            && let Some(settled) = settled
        {
            for (position, &w) in positions.iter_mut().zip(settled) {
                *position = (*position).max(w);
            }
        }
        let token = system.token(positions.to_vec()).encode();
        sink.frame(process::frame_json(frame, &token), &token).await?;
        system.count_delivered(frame.len() as u64, replayed);
    }
    Ok(())
}

/// Send from the log what the connection's topics hold between `positions` and `to`, partition
/// by partition; afterwards `positions` is `to`.
async fn replay(system: &Shared, wanted: &Arc<HashSet<String>>, positions: &mut [u64], to: &[u64], sink: &Sink<'_>, limits: FrameLimits) -> Result<(), Gone> {
    for partition in 0..positions.len() {
        while positions[partition] < to[partition] {
            let (reader, topics, from, end) = (system.clone(), wanted.clone(), positions[partition], to[partition]);
            let (items, next) = match blocking(move || reader.read_log(partition as u32, from, end, &topics)).await {
                Ok(read) => read,
                Err(error) if error.code == "offset_out_of_range" => {
                    let message = format!("resume token is older than retention: partition {partition} at offset {from} was removed while replaying ({})", error.message);
                    sink.error("resume_token_expired", message).await;
                    return Err(Gone);
                }
                Err(error) => {
                    system.metrics.error();
                    sink.error("log_unreadable", error.message).await;
                    return Err(Gone);
                }
            };
            send_frames(system, sink, &items, positions, None, limits, true).await?;
            positions[partition] = next;
        }
    }
    Ok(())
}
