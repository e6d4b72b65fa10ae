//! The HTTP, WebSocket and SSE routes of realtime-chat-messages, the pump that feeds one
//! connection, and the chat page.
//!
//! ```text
//! POST   /v1/chat/channels                          {"id","visibility":"public"|"private","name","members":[…],"exists_ok"} → 201 channel
//! GET    /v1/chat/channels                          the caller's channels: last_seq, read_seq, unread
//! GET    /v1/chat/channels/{channel}                one channel and its members
//! POST   /v1/chat/channels/{channel}/members        {"add":[…],"remove":[…]} (join: add yourself to a public channel)
//! POST   /v1/chat/dms                               {"with":"bob"} → the direct-message channel dm:<a>:<b>
//! POST   /v1/chat/channels/{channel}/messages       {"text","client_id"} → 201 {"channel","seq","ts","duplicate"}
//! POST   /v1/chat/messages                          {"messages":[{"channel","user","text","client_id"}]} (many at once)
//! GET    /v1/chat/channels/{channel}/messages       history ?before=&after=&limit=
//! PATCH  /v1/chat/channels/{channel}/messages/{seq} {"text"}: edit (author only)
//! DELETE /v1/chat/channels/{channel}/messages/{seq} delete (author only)
//! PUT    /v1/chat/channels/{channel}/read           {"seq"} → {"read_seq","unread"}
//! POST   /v1/chat/channels/{channel}/typing         a typing indicator (rate limited)
//! GET    /v1/chat/channels/{channel}/presence       who of the channel is online
//! GET    /v1/chat/search                            ?q=&channel=&offset=&limit=
//! GET    /v1/chat/ws                                WebSocket ?user=&since={"channel":seq,…}
//! GET    /v1/chat/events                            SSE, the same
//! GET    /chat                                      the chat page
//! ```
//!
//! The caller names its user with `?user=` or the `Tributary-User` header (except in the
//! many-message send, where each message names its user). A stream starts with
//! `{"connected":{"connection","user","channels":[…],"ignored":[…]}}`, then sends
//! `{"events":[{"channel","seq","user","ts","kind",…}…]}` frames, `{"typing":{"channel","user"}}`,
//! `{"read":{"channel","seq","unread"}}` and `{"presence":{"channel","user","event"}}`. A WebSocket
//! client may send `{"typing":{"channel"}}`, `{"send":{"channel","text","client_id"}}` (answered
//! `{"ack":{…}}`) and `{"read":{"channel","seq"}}`. Over SSE every message is a `message` event
//! with the same JSON.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tributary_server::presence::{PresenceEvent, ScopePresence};
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Json, SystemApi, WsConnection, blocking};

use super::process::{self, HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, Invalid, MessageView, SEARCH_PAGE_DEFAULT, SEARCH_PAGE_MAX, Visibility};
use super::{Chat, ChatError, ChannelSummary, Connection, ID, Item, Op, Outcome};

/// Messages queued towards one SSE client before the pump waits.
pub const SSE_EVENTS_MAX: usize = 16;
/// Most events in one frame.
pub const FRAME_EVENTS_MAX: usize = 500;
/// Members listed by the presence route.
pub const PRESENCE_LIMIT: usize = 1_000;

const CHAT_PAGE: &str = include_str!("chat.html");

type Shared = Arc<Chat>;

pub fn router(system: Shared) -> SystemApi {
    let router = OpenApiRouter::new()
        .routes(routes!(create_channel, list_channels))
        .routes(routes!(get_channel))
        .routes(routes!(change_members))
        .routes(routes!(open_dm))
        .routes(routes!(send_one, history))
        .routes(routes!(send_many))
        .routes(routes!(edit_message, delete_message))
        .routes(routes!(mark_read))
        .routes(routes!(typing))
        .routes(routes!(channel_presence))
        .routes(routes!(search))
        .routes(routes!(websocket))
        .routes(routes!(events))
        .route("/chat", get(|| async { Html(CHAT_PAGE) }))
        .with_state(system);
    SystemApi { id: ID, prefixes: vec!["/v1/chat", "/chat"], router }
}

impl From<Invalid> for ApiError {
    fn from(error: Invalid) -> ApiError {
        let message = error.to_string();
        match error {
            Invalid::Bad(_) => ApiError::bad_request(message),
            Invalid::TooLarge(_) => ApiError::too_large(message),
            Invalid::Forbidden(_) => ApiError::forbidden(message),
            Invalid::NotFound(_) => ApiError::not_found(message),
            Invalid::Conflict(_) => ApiError::conflict(message),
            Invalid::RateLimited(_) => ApiError::rate_limited(message, 1),
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> ApiError {
        match error {
            ChatError::Invalid(invalid) => invalid.into(),
            ChatError::Stream(stream) => stream.into(),
            ChatError::Search(tributary_engine::search::SearchError::Invalid(message)) => ApiError::bad_request(message),
            ChatError::Search(other) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "search_unavailable", other.to_string()),
            ChatError::Unavailable(message) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", message),
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct Caller {
    /// The calling user (or the `Tributary-User` header).
    pub user: Option<String>,
}

fn caller(user: Option<&String>, headers: &HeaderMap) -> Result<String, ApiError> {
    let user = tributary_server::named_user(user.map(String::as_str), headers, "calling")?;
    process::check_user(&user)?;
    Ok(user)
}

fn check_channel(channel: &str) -> Result<(), ApiError> {
    process::check_channel(channel).map_err(Into::into)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub channel: String,
    pub seq: u64,
    pub ts: i64,
    /// True for a repeated send (same `client_id`) or a change that changed nothing.
    pub duplicate: bool,
}

impl From<Outcome> for Accepted {
    fn from(o: Outcome) -> Accepted {
        Accepted { channel: o.channel, seq: o.seq, ts: o.ts, duplicate: o.duplicate }
    }
}

async fn submit_one(system: Shared, op: Op) -> Result<Accepted, ApiError> {
    let mut outcomes = blocking(move || system.submit(vec![op])).await?;
    Ok(outcomes.remove(0).into())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    pub id: String,
    pub visibility: Visibility,
    #[serde(default)]
    pub name: Option<String>,
    /// Members besides the creator, who is always one.
    #[serde(default)]
    pub members: Vec<String>,
    /// `true`: a channel of that id that the caller can see is answered `200` as it is
    /// (create-if-absent), rather than `409`.
    #[serde(default)]
    pub exists_ok: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChannelDetail {
    #[serde(flatten)]
    pub summary: ChannelSummary,
    pub member_ids: Vec<String>,
}

/// Create a public or private channel; the caller is its first member.
#[utoipa::path(post, path = "/v1/chat/channels", params(Caller), request_body = CreateChannel,
    responses((status = 201, body = ChannelDetail), (status = 200, description = "exists_ok and it exists", body = ChannelDetail), (status = 400, description = "bad id or member"), (status = 409, description = "the channel exists"), (status = 413, description = "over CHANNEL_MEMBERS_MAX")))]
async fn create_channel(State(system): State<Shared>, Query(q): Query<Caller>, headers: HeaderMap, Json(body): Json<CreateChannel>) -> Result<(StatusCode, axum::Json<ChannelDetail>), ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    process::check_channel_name(&body.id)?;
    if body.visibility == Visibility::Direct {
        return Err(ApiError::bad_request("direct-message channels are opened with POST /v1/chat/dms"));
    }
    if body.exists_ok
        && let Ok((summary, member_ids)) = system.channel(&body.id, &user)
    {
        return Ok((StatusCode::OK, axum::Json(ChannelDetail { summary, member_ids })));
    }
    let mut members = body.members;
    members.push(user.clone());
    let op = Op::Create { channel: body.id.clone(), user: user.clone(), visibility: body.visibility, name: body.name.unwrap_or_else(|| body.id.clone()), members };
    let status = match submit_one(system.clone(), op).await {
        Ok(_) => StatusCode::CREATED,
        Err(error) if error.code == "conflict" && body.exists_ok && system.channel(&body.id, &user).is_ok() => StatusCode::OK,
        Err(error) => return Err(error),
    };
    let (summary, member_ids) = system.channel(&body.id, &user)?;
    Ok((status, axum::Json(ChannelDetail { summary, member_ids })))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChannelList {
    pub channels: Vec<ChannelSummary>,
}

/// The caller's channels with their last seq, read marker and unread count.
#[utoipa::path(get, path = "/v1/chat/channels", params(Caller), responses((status = 200, body = ChannelList)))]
async fn list_channels(State(system): State<Shared>, Query(q): Query<Caller>, headers: HeaderMap) -> Result<axum::Json<ChannelList>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    Ok(axum::Json(ChannelList { channels: system.channels_of(&user) }))
}

/// One channel and its members (public channels are visible to anyone).
#[utoipa::path(get, path = "/v1/chat/channels/{channel}", params(("channel" = String, Path), Caller),
    responses((status = 200, body = ChannelDetail), (status = 404, description = "no such channel, or a private one the caller is not in")))]
async fn get_channel(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<Caller>, headers: HeaderMap) -> Result<axum::Json<ChannelDetail>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    let (summary, member_ids) = system.channel(&channel, &user)?;
    Ok(axum::Json(ChannelDetail { summary, member_ids }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeMembers {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MembersChanged {
    pub channel: String,
    /// The channel's seq after the change.
    pub seq: u64,
    pub member_ids: Vec<String>,
}

/// Add or remove members; adding yourself to a public channel joins it, removing yourself leaves.
#[utoipa::path(post, path = "/v1/chat/channels/{channel}/members", params(("channel" = String, Path), Caller), request_body = ChangeMembers,
    responses((status = 200, body = MembersChanged), (status = 403, description = "not allowed"), (status = 404, description = "no such channel"), (status = 413, description = "over CHANNEL_MEMBERS_MAX")))]
async fn change_members(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<Caller>, headers: HeaderMap, Json(body): Json<ChangeMembers>) -> Result<axum::Json<MembersChanged>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    if body.add.is_empty() && body.remove.is_empty() {
        return Err(ApiError::bad_request("name members to add or remove"));
    }
    if body.add.len() + body.remove.len() > process::CHANNEL_MEMBERS_MAX {
        return Err(ApiError::too_large(format!("at most CHANNEL_MEMBERS_MAX ({}) members per change", process::CHANNEL_MEMBERS_MAX)));
    }
    let mut seq = 0;
    if !body.add.is_empty() {
        seq = submit_one(system.clone(), Op::Join { channel: channel.clone(), user: user.clone(), members: body.add }).await?.seq;
    }
    if !body.remove.is_empty() {
        seq = submit_one(system.clone(), Op::Leave { channel: channel.clone(), user: user.clone(), members: body.remove }).await?.seq;
    }
    let member_ids = system.channel(&channel, &user).map(|(_, m)| m).unwrap_or_default();
    Ok(axum::Json(MembersChanged { channel, seq, member_ids }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenDm {
    pub with: String,
}

/// Open (or find) the direct-message channel of the caller and another user.
#[utoipa::path(post, path = "/v1/chat/dms", params(Caller), request_body = OpenDm, responses((status = 200, body = ChannelDetail), (status = 400, description = "bad user")))]
async fn open_dm(State(system): State<Shared>, Query(q): Query<Caller>, headers: HeaderMap, Json(body): Json<OpenDm>) -> Result<axum::Json<ChannelDetail>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    let channel = process::dm_channel(&user, &body.with)?;
    if system.channel(&channel, &user).is_err() {
        let op = Op::Create { channel: channel.clone(), user: user.clone(), visibility: Visibility::Direct, name: channel.clone(), members: vec![user.clone(), body.with.clone()] };
        match submit_one(system.clone(), op).await {
            Ok(_) => {}
            Err(error) if error.code == "conflict" => {}
            Err(error) => return Err(error),
        }
    }
    let (summary, member_ids) = system.channel(&channel, &user)?;
    Ok(axum::Json(ChannelDetail { summary, member_ids }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub text: String,
    /// The client's id of this message: a repeated send with it appends nothing.
    #[serde(default)]
    pub client_id: Option<String>,
}

/// Send a message; answered once it is durable, with its seq in the channel.
#[utoipa::path(post, path = "/v1/chat/channels/{channel}/messages", params(("channel" = String, Path), Caller), request_body = SendMessage,
    responses((status = 201, body = Accepted), (status = 400, description = "bad text or client_id"), (status = 403, description = "not a member"), (status = 404, description = "no such channel"), (status = 413, description = "over MESSAGE_TEXT_BYTES_MAX")))]
async fn send_one(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<Caller>, headers: HeaderMap, Json(body): Json<SendMessage>) -> Result<(StatusCode, axum::Json<Accepted>), ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    let accepted = submit_one(system, Op::Send { channel, user, text: body.text, client_id: body.client_id }).await?;
    Ok((StatusCode::CREATED, axum::Json(accepted)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ManyMessage {
    pub channel: String,
    pub user: String,
    pub text: String,
    #[serde(default)]
    pub client_id: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMany {
    pub messages: Vec<ManyMessage>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SentMany {
    /// In request order.
    pub messages: Vec<Accepted>,
}

/// Send many messages at once (a bridge or a bot posting for several users): all are checked
/// first, and either all are accepted or none.
#[utoipa::path(post, path = "/v1/chat/messages", request_body = SendMany,
    responses((status = 201, body = SentMany), (status = 400, description = "a bad message"), (status = 403, description = "a sender is not a member"), (status = 413, description = "over SEND_BATCH_MAX or MESSAGE_TEXT_BYTES_MAX")))]
async fn send_many(State(system): State<Shared>, Json(body): Json<SendMany>) -> Result<(StatusCode, axum::Json<SentMany>), ApiError> {
    if body.messages.is_empty() {
        return Err(ApiError::bad_request("messages must hold at least one message"));
    }
    if body.messages.len() > process::SEND_BATCH_MAX {
        return Err(ApiError::too_large(format!("{} messages in one send: at most SEND_BATCH_MAX ({})", body.messages.len(), process::SEND_BATCH_MAX)));
    }
    let mut ops = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        let at = |e: Invalid| -> ApiError {
            let mut error = ApiError::from(e);
            error.message = format!("messages[{i}]: {}", error.message);
            error
        };
        process::check_user(&m.user).map_err(at)?;
        process::check_channel(&m.channel).map_err(at)?;
        ops.push(Op::Send { channel: m.channel, user: m.user, text: m.text, client_id: m.client_id });
    }
    let outcomes = blocking(move || system.submit(ops)).await?;
    Ok((StatusCode::CREATED, axum::Json(SentMany { messages: outcomes.into_iter().map(Accepted::from).collect() })))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct HistoryQuery {
    pub user: Option<String>,
    /// Messages before this seq (older page).
    pub before: Option<u64>,
    /// Messages after this seq (newer page); wins over `before`.
    pub after: Option<u64>,
    /// Page size (default 50, at most HISTORY_PAGE_MAX = 200).
    pub limit: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HistoryPage {
    pub channel: String,
    /// Oldest first.
    pub messages: Vec<MessageView>,
    /// More messages lie beyond this page in the direction paged.
    pub more: bool,
    /// The channel's last seq now.
    pub last_seq: u64,
}

/// A page of history, oldest first: the latest messages, or before/after a seq.
#[utoipa::path(get, path = "/v1/chat/channels/{channel}/messages", params(("channel" = String, Path), HistoryQuery),
    responses((status = 200, body = HistoryPage), (status = 403, description = "not a member"), (status = 404, description = "no such channel"), (status = 413, description = "over HISTORY_PAGE_MAX")))]
async fn history(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<HistoryQuery>, headers: HeaderMap) -> Result<axum::Json<HistoryPage>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    let limit = process::page_limit(q.limit, HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, "HISTORY_PAGE_MAX")?;
    let (messages, more, last_seq) = system.history(&channel, &user, q.before, q.after, limit)?;
    Ok(axum::Json(HistoryPage { channel, messages, more, last_seq }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    pub text: String,
}

/// Edit a message (its author only): an `edited` event in the channel's sequence.
#[utoipa::path(patch, path = "/v1/chat/channels/{channel}/messages/{seq}", params(("channel" = String, Path), ("seq" = u64, Path), Caller), request_body = EditMessage,
    responses((status = 200, body = Accepted), (status = 403, description = "not the author"), (status = 404, description = "no such message, or deleted")))]
async fn edit_message(State(system): State<Shared>, Path((channel, seq)): Path<(String, u64)>, Query(q): Query<Caller>, headers: HeaderMap, Json(body): Json<EditMessage>) -> Result<axum::Json<Accepted>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    Ok(axum::Json(submit_one(system, Op::Edit { channel, user, target: seq, text: body.text }).await?))
}

/// Delete a message (its author only): a `deleted` event in the channel's sequence.
#[utoipa::path(delete, path = "/v1/chat/channels/{channel}/messages/{seq}", params(("channel" = String, Path), ("seq" = u64, Path), Caller),
    responses((status = 200, body = Accepted), (status = 403, description = "not the author"), (status = 404, description = "no such message, or deleted")))]
async fn delete_message(State(system): State<Shared>, Path((channel, seq)): Path<(String, u64)>, Query(q): Query<Caller>, headers: HeaderMap) -> Result<axum::Json<Accepted>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    Ok(axum::Json(submit_one(system, Op::Delete { channel, user, target: seq }).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkRead {
    pub seq: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReadState {
    pub channel: String,
    pub read_seq: u64,
    pub unread: u64,
}

/// Store how far the caller has read a channel (markers only move forward).
#[utoipa::path(put, path = "/v1/chat/channels/{channel}/read", params(("channel" = String, Path), Caller), request_body = MarkRead,
    responses((status = 200, body = ReadState), (status = 400, description = "seq beyond the channel's last"), (status = 403, description = "not a member")))]
async fn mark_read(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<Caller>, headers: HeaderMap, Json(body): Json<MarkRead>) -> Result<axum::Json<ReadState>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    let id = channel.clone();
    let (read_seq, unread) = blocking(move || system.mark_read(&id, &user, body.seq)).await?;
    Ok(axum::Json(ReadState { channel, read_seq, unread }))
}

/// Tell the channel's other members' connections that the caller is typing (not stored).
#[utoipa::path(post, path = "/v1/chat/channels/{channel}/typing", params(("channel" = String, Path), Caller),
    responses((status = 204, description = "sent"), (status = 403, description = "not a member"), (status = 429, description = "sooner than TYPING_INTERVAL_MS_MIN after the last one")))]
async fn typing(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<Caller>, headers: HeaderMap) -> Result<StatusCode, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    system.typing(&channel, &user)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChannelPresence {
    pub channel: String,
    /// Members online now.
    pub online: usize,
    pub connections: u64,
    #[schema(value_type = Vec<Object>)]
    pub members: Vec<tributary_server::presence::Member>,
}

/// Who of a channel is connected.
#[utoipa::path(get, path = "/v1/chat/channels/{channel}/presence", params(("channel" = String, Path), Caller),
    responses((status = 200, body = ChannelPresence), (status = 403, description = "not a member")))]
async fn channel_presence(State(system): State<Shared>, Path(channel): Path<String>, Query(q): Query<Caller>, headers: HeaderMap) -> Result<axum::Json<ChannelPresence>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    check_channel(&channel)?;
    system.history(&channel, &user, None, None, 1)?;
    let ScopePresence { users, connections, members } = system.presence().members(&channel, PRESENCE_LIMIT).await?;
    Ok(axum::Json(ChannelPresence { channel, online: users, connections, members }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct SearchParams {
    pub user: Option<String>,
    /// The words to find (all must match; "phrases" and -excluded work).
    pub q: Option<String>,
    /// Search one channel only (else every channel of the caller).
    pub channel: Option<String>,
    pub offset: Option<usize>,
    /// Hits per page (default 20, at most SEARCH_PAGE_MAX = 100).
    pub limit: Option<usize>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SearchResults {
    /// Matches in all (over every page).
    pub total: usize,
    /// Best first, each as it is now.
    pub messages: Vec<MessageView>,
}

/// Full-text search of the messages of the caller's channels.
#[utoipa::path(get, path = "/v1/chat/search", params(SearchParams),
    responses((status = 200, body = SearchResults), (status = 400, description = "no query, or a bad page"), (status = 403, description = "not a member of the channel named")))]
async fn search(State(system): State<Shared>, Query(q): Query<SearchParams>, headers: HeaderMap) -> Result<axum::Json<SearchResults>, ApiError> {
    let user = caller(q.user.as_ref(), &headers)?;
    let text = q.q.filter(|t| !t.trim().is_empty()).ok_or_else(|| ApiError::bad_request("q: say what to search for"))?;
    if let Some(channel) = &q.channel {
        check_channel(channel)?;
    }
    let limit = process::page_limit(q.limit, SEARCH_PAGE_DEFAULT, SEARCH_PAGE_MAX, "SEARCH_PAGE_MAX")?;
    let offset = q.offset.unwrap_or(0);
    let (total, messages) = blocking(move || system.search(&user, &text, q.channel.as_deref(), offset, limit)).await?;
    Ok(axum::Json(SearchResults { total, messages }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConnectQuery {
    pub user: Option<String>,
    /// JSON `{"<channel>": <last seq seen>, …}`: get exactly the events after each, then live.
    pub since: Option<String>,
}

fn connect(query: &ConnectQuery, headers: &HeaderMap) -> Result<(String, BTreeMap<String, u64>), ApiError> {
    let user = caller(query.user.as_ref(), headers)?;
    let since = match &query.since {
        None => BTreeMap::new(),
        Some(text) => process::parse_since(text)?,
    };
    Ok((user, since))
}

/// A WebSocket of the caller's channels: missed events after `since`, then live.
#[utoipa::path(get, path = "/v1/chat/ws", params(ConnectQuery), responses((status = 101, description = "WebSocket"), (status = 400, description = "no user, or bad since")))]
async fn websocket(State(system): State<Shared>, Query(query): Query<ConnectQuery>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Result<Response, ApiError> {
    let (user, since) = connect(&query, &headers)?;
    let gateway = system.gateway().clone();
    Ok(gateway.websocket(ID, upgrade, None, move |mut connection| async move {
        pump(system, user, since, Sink::Ws(&mut connection)).await;
    }))
}

/// The same stream as Server-Sent Events (each a `message` event with the WebSocket's JSON).
#[utoipa::path(get, path = "/v1/chat/events", params(ConnectQuery), responses((status = 200, description = "text/event-stream"), (status = 400, description = "no user, or bad since")))]
async fn events(State(system): State<Shared>, Query(query): Query<ConnectQuery>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (user, since) = connect(&query, &headers)?;
    let (tx, rx) = mpsc::channel(SSE_EVENTS_MAX);
    let gateway = system.gateway().clone();
    tokio::spawn(pump(system, user, since, Sink::Sse(tx)));
    Ok(gateway.sse(ID, tokio_stream::wrappers::ReceiverStream::new(rx)).into_response())
}

enum Sink<'a> {
    Ws(&'a mut WsConnection),
    Sse(mpsc::Sender<SseEvent>),
}

struct Gone;

enum Wake {
    Queued,
    Presence(Result<PresenceEvent, broadcast::error::RecvError>),
    Client(serde_json::Value),
}

impl Sink<'_> {
    async fn text(&self, json: String) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => connection.send_text(json).await.map_err(|_| Gone),
            Sink::Sse(tx) => tx.send(SseEvent::default().data(json)).await.map_err(|_| Gone),
        }
    }

    async fn wait(&mut self, connection: &Connection, presence: &mut broadcast::Receiver<PresenceEvent>) -> Result<Wake, Gone> {
        match self {
            Sink::Ws(ws) => tokio::select! {
                _ = connection.woken() => Ok(Wake::Queued),
                event = presence.recv() => Ok(Wake::Presence(event)),
                frame = ws.recv() => frame.map(Wake::Client).ok_or(Gone),
            },
            Sink::Sse(tx) => tokio::select! {
                _ = connection.woken() => Ok(Wake::Queued),
                event = presence.recv() => Ok(Wake::Presence(event)),
                _ = tx.closed() => Err(Gone),
            },
        }
    }
}

struct Registered {
    system: Shared,
    connection: Arc<Connection>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.system.unregister(&self.connection);
    }
}

/// What one connection has been sent: per channel, the last seq.
struct Positions {
    seen: HashMap<String, u64>,
}

impl Positions {
    /// Add the event `seq` of `channel` to `out` unless it was sent, after any events between
    /// what was sent and it (read from the channel): no duplicate, no gap.
    fn deliver(&mut self, system: &Chat, channel: &str, seq: u64, json: Arc<str>, out: &mut Vec<Arc<str>>) {
        match self.seen.get(channel).copied() {
            Some(last) if seq <= last => return,
            Some(last) if seq > last + 1 => out.extend(system.events_after(channel, last, Some(seq - 1)).into_iter().map(|(_, j)| j)),
            _ => {}
        }
        out.push(json);
        self.seen.insert(channel.to_string(), seq);
    }

    /// Everything after what was sent, in every channel this connection follows.
    fn catch_up(&mut self, system: &Chat, out: &mut Vec<Arc<str>>) {
        for (channel, last) in self.seen.iter_mut() {
            for (seq, json) in system.events_after(channel, *last, None) {
                out.push(json);
                *last = seq;
            }
        }
    }
}

async fn send_events(system: &Chat, sink: &Sink<'_>, events: &[Arc<str>]) -> Result<(), Gone> {
    for frame in events.chunks(FRAME_EVENTS_MAX) {
        let mut json = String::with_capacity(frame.iter().map(|e| e.len() + 1).sum::<usize>() + 16);
        json.push_str(r#"{"events":["#);
        for (i, event) in frame.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(event);
        }
        json.push_str("]}");
        sink.text(json).await?;
        system.count_delivered(frame.len() as u64);
    }
    Ok(())
}

/// Feed one connection: the missed events after `since`, then live, with presence and typing.
async fn pump(system: Shared, user: String, since: BTreeMap<String, u64>, mut sink: Sink<'_>) {
    // Read the channels before registering: an event applied in between is caught up below.
    let channels = system.channels_of(&user);
    let member_of: HashSet<String> = channels.iter().map(|c| c.id.clone()).collect();
    let connection = system.register(&user);
    let _registered = Registered { system: system.clone(), connection: connection.clone() };
    let scopes: Vec<String> = member_of.iter().cloned().collect();
    let _present = system.presence().join(&user, &scopes);
    let mut presence = system.presence().subscribe();
    let ignored: Vec<&String> = since.keys().filter(|c| !member_of.contains(*c)).collect();
    let mut positions = Positions { seen: channels.iter().map(|c| (c.id.clone(), since.get(&c.id).copied().unwrap_or(c.last_seq).min(c.last_seq))).collect() };
    let hello = serde_json::json!({"connected": {"connection": connection.id, "user": user, "channels": channels, "ignored": ignored}});
    if sink.text(hello.to_string()).await.is_err() {
        return;
    }
    let mut out = Vec::new();
    positions.catch_up(&system, &mut out);
    if send_events(&system, &sink, &out).await.is_err() {
        return;
    }
    loop {
        let wake = match sink.wait(&connection, &mut presence).await {
            Err(Gone) => return,
            Ok(wake) => wake,
        };
        let sent = match wake {
            Wake::Presence(Ok(event)) if member_of.contains(&*event.scope) && *event.user != *user => {
                sink.text(serde_json::json!({"presence": {"channel": &*event.scope, "user": &*event.user, "event": event.event}}).to_string()).await
            }
            Wake::Presence(_) => Ok(()),
            Wake::Client(frame) => client_frame(&system, &user, &sink, frame).await,
            Wake::Queued => {
                let (items, overflowed) = connection.take();
                let mut out = Vec::new();
                let mut oldest = None;
                let mut signals = Vec::new();
                for item in items {
                    match item {
                        Item::Event { channel, seq, json, accepted } => {
                            if let Some(at) = accepted {
                                oldest = Some(oldest.map_or(at, |o: std::time::Instant| o.min(at)));
                            }
                            positions.deliver(&system, &channel, seq, json, &mut out);
                        }
                        Item::Ephemeral(json) => signals.push(json),
                    }
                }
                if overflowed {
                    positions.catch_up(&system, &mut out);
                }
                let mut result = send_events(&system, &sink, &out).await;
                for signal in signals {
                    if result.is_ok() {
                        result = sink.text(signal.to_string()).await;
                    }
                }
                if let Some(oldest) = oldest {
                    system.metrics.latency(oldest.elapsed());
                }
                result
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A frame a WebSocket client sent: typing, send or read.
async fn client_frame(system: &Shared, user: &str, sink: &Sink<'_>, frame: serde_json::Value) -> Result<(), Gone> {
    let error = |code: &str, message: String, client_id: Option<&serde_json::Value>| {
        let mut detail = serde_json::json!({"code": code, "message": message});
        if let Some(id) = client_id {
            detail["client_id"] = id.clone();
        }
        serde_json::json!({"error": detail}).to_string()
    };
    let channel_of = |v: &serde_json::Value| v["channel"].as_str().map(str::to_string);
    if let Some(typing) = frame.get("typing") {
        let Some(channel) = channel_of(typing) else {
            return sink.text(error("bad_request", "typing needs {\"channel\"}".into(), None)).await;
        };
        if let Err(e) = process::check_channel(&channel).map_err(ChatError::from).and_then(|_| system.typing(&channel, user)) {
            let e = ApiError::from(e);
            return sink.text(error(e.code, e.message, None)).await;
        }
        return Ok(());
    }
    if let Some(send) = frame.get("send") {
        let client_id = send.get("client_id");
        let (Some(channel), Some(text)) = (channel_of(send), send["text"].as_str().map(str::to_string)) else {
            return sink.text(error("bad_request", "send needs {\"channel\",\"text\"} and may have \"client_id\"".into(), client_id)).await;
        };
        if let Err(e) = process::check_channel(&channel) {
            let e = ApiError::from(e);
            return sink.text(error(e.code, e.message, client_id)).await;
        }
        let op = Op::Send { channel, user: user.to_string(), text, client_id: client_id.and_then(|c| c.as_str()).map(str::to_string) };
        let worker = system.clone();
        return match blocking(move || worker.submit(vec![op])).await {
            Ok(mut outcomes) => {
                let o = outcomes.remove(0);
                sink.text(serde_json::json!({"ack": {"channel": o.channel, "seq": o.seq, "ts": o.ts, "duplicate": o.duplicate, "client_id": client_id}}).to_string()).await
            }
            Err(e) => sink.text(error(e.code, e.message, client_id)).await,
        };
    }
    if let Some(read) = frame.get("read") {
        let (Some(channel), Some(seq)) = (channel_of(read), read["seq"].as_u64()) else {
            return sink.text(error("bad_request", "read needs {\"channel\",\"seq\"}".into(), None)).await;
        };
        if let Err(e) = process::check_channel(&channel) {
            let e = ApiError::from(e);
            return sink.text(error(e.code, e.message, None)).await;
        }
        let (worker, user) = (system.clone(), user.to_string());
        if let Err(e) = blocking(move || worker.mark_read(&channel, &user, seq)).await {
            return sink.text(error(e.code, e.message, None)).await;
        }
        return Ok(());
    }
    sink.text(error("bad_request", "expected {\"typing\":…}, {\"send\":…} or {\"read\":…}".into(), None)).await
}
