//! The routes of notification-fanout: each handler checks its request with `process`, calls the
//! system (the database and the stream interface), counts errors, and answers JSON. Expansion
//! and sending happen in the workers of `mod.rs`, never in a request.
//!
//! A live inbox connection (`/v1/fanout/inbox/{user}/ws`, or SSE at `…/events`) first gets
//! `{"type":"inbox","items":[…newest first],"unread":n}`, then `{"type":"item","item":{…},"unread":n}`
//! for each new item and `{"type":"read","ids":[…],"unread":n}` when items are marked read. Over
//! WebSocket the client may send `{"read":["id",…]}` or `{"read_all":true}`. Over SSE the event
//! names are the types.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tributary_server::utoipa::{self, IntoParams};
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Json};

use super::process::{self, DeliveryState, FanoutConfig, MembersRequest, NotificationView, ReadRequest, Subscriber, SubscribersRequest, TriggerRequest, TriggerResponse};
use super::{Fanout, ID, INBOX_PAGE_MAX};

type Shared = State<Arc<Fanout>>;

/// Deliveries one page of a notification's status lists at most (and by default).
pub const DELIVERIES_PAGE_MAX: usize = 1_000;
/// Members one page of a topic lists at most (and by default).
pub const MEMBERS_PAGE_MAX: usize = 1_000;
/// Events queued towards one SSE client before the forwarder waits.
pub const SSE_EVENTS_MAX: usize = 16;

pub fn router(system: Arc<Fanout>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(overview))
        .routes(routes!(get_config, put_config))
        .routes(routes!(put_subscribers))
        .routes(routes!(get_subscriber, put_subscriber, delete_subscriber))
        .routes(routes!(get_topic))
        .routes(routes!(change_members))
        .routes(routes!(trigger))
        .routes(routes!(notification_status))
        .routes(routes!(delivery_status))
        .routes(routes!(inbox))
        .routes(routes!(mark_read))
        .routes(routes!(inbox_ws))
        .routes(routes!(inbox_events))
        .with_state(system)
}

/// Count what a handler answered: an error is an error of the system.
fn counted<T>(system: &Fanout, result: Result<T, ApiError>) -> Result<T, ApiError> {
    if result.is_err() {
        system.metrics.error();
    }
    result
}

/// Queue depths and counters.
#[utoipa::path(get, path = "/v1/fanout", tag = ID, responses((status = 200, description = "the system's figures")))]
async fn overview(State(system): Shared) -> axum::Json<Value> {
    axum::Json(system.overview().await)
}

/// The configuration (secrets shown as `***`).
#[utoipa::path(get, path = "/v1/fanout/config", tag = ID, responses((status = 200, body = FanoutConfig)))]
async fn get_config(State(system): Shared) -> axum::Json<FanoutConfig> {
    axum::Json(system.config().redacted())
}

/// Replace the configuration; durable before the answer, used from the workers' next batch.
#[utoipa::path(put, path = "/v1/fanout/config", tag = ID, request_body = FanoutConfig,
    responses((status = 200, body = FanoutConfig), (status = 400, description = "bad configuration, naming the field")))]
async fn put_config(State(system): Shared, body: Result<Json<FanoutConfig>, ApiError>) -> Result<axum::Json<FanoutConfig>, ApiError> {
    let result = async {
        let config = body?.0.validated()?;
        system.set_config(config).await?;
        Ok(axum::Json(system.config().redacted()))
    }
    .await;
    counted(&system, result)
}

/// One subscriber.
#[utoipa::path(get, path = "/v1/fanout/subscribers/{id}", tag = ID, params(("id" = String, Path)),
    responses((status = 200, body = Subscriber), (status = 404, description = "no such subscriber")))]
async fn get_subscriber(State(system): Shared, Path(id): Path<String>) -> Result<axum::Json<Subscriber>, ApiError> {
    let result = match system.subscriber(&id).await {
        Ok(Some(subscriber)) => Ok(axum::Json(subscriber)),
        Ok(None) => Err(ApiError::not_found(format!("no subscriber {id:?}"))),
        Err(error) => Err(error),
    };
    counted(&system, result)
}

/// Create or replace a subscriber: contacts, timezone, preferences, quiet hours.
#[utoipa::path(put, path = "/v1/fanout/subscribers/{id}", tag = ID, params(("id" = String, Path)), request_body = Subscriber,
    responses((status = 201, body = Subscriber), (status = 200, body = Subscriber), (status = 400, description = "bad field, named"), (status = 413, description = "over a named limit")))]
async fn put_subscriber(State(system): Shared, Path(id): Path<String>, body: Result<Json<Subscriber>, ApiError>) -> Result<(StatusCode, axum::Json<Subscriber>), ApiError> {
    let result = async {
        let subscriber = process::check_subscriber(&id, body?.0)?;
        let new = system.put_subscribers(std::slice::from_ref(&subscriber)).await? == 1;
        Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, axum::Json(subscriber)))
    }
    .await;
    counted(&system, result)
}

/// Create or replace up to `SUBSCRIBERS_PER_REQUEST_MAX` subscribers, each with its id, in one
/// transaction: all are written or none (a bad one is named by its index).
#[utoipa::path(post, path = "/v1/fanout/subscribers", tag = ID, request_body = SubscribersRequest,
    responses((status = 200, description = "`{\"created\": n, \"replaced\": n}`"), (status = 400, description = "bad field, named with its index"), (status = 413, description = "over a named limit")))]
async fn put_subscribers(State(system): Shared, body: Result<Json<SubscribersRequest>, ApiError>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        let subscribers = process::check_subscribers(body?.0)?;
        let created = system.put_subscribers(&subscribers).await?;
        Ok(axum::Json(json!({"created": created, "replaced": subscribers.len() - created})))
    }
    .await;
    counted(&system, result)
}

/// Delete a subscriber (deliveries not yet made to it are skipped).
#[utoipa::path(delete, path = "/v1/fanout/subscribers/{id}", tag = ID, params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, description = "no such subscriber")))]
async fn delete_subscriber(State(system): Shared, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let result = async { if system.delete_subscriber(&id).await? { Ok(StatusCode::NO_CONTENT) } else { Err(ApiError::not_found(format!("no subscriber {id:?}"))) } }.await;
    counted(&system, result)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    /// List after this id.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many (default and maximum: the route's page limit).
    #[serde(default)]
    pub limit: Option<usize>,
}

fn page_limit(limit: Option<usize>, max: usize, name: &str) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(max);
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(format!("limit must be 1 to {name} ({max}), got {limit}")));
    }
    Ok(limit)
}

/// A topic's size and a page of its members, by id.
#[utoipa::path(get, path = "/v1/fanout/topics/{topic}", tag = ID, params(("topic" = String, Path), PageQuery),
    responses((status = 200, description = "`{\"topic\",\"size\",\"members\":[…]}`"), (status = 400, description = "bad query")))]
async fn get_topic(State(system): Shared, Path(topic): Path<String>, query: Result<Query<PageQuery>, QueryRejection>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        process::check_name("topic", &topic)?;
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = page_limit(query.limit, MEMBERS_PAGE_MAX, "MEMBERS_PAGE_MAX")?;
        let size = system.topic_size(&topic).await?;
        let members = system.members_after(&topic, query.after.as_deref(), limit).await?;
        Ok(axum::Json(json!({"topic": topic, "size": size, "members": members})))
    }
    .await;
    counted(&system, result)
}

/// Add and remove members of a topic (a topic exists while it has members).
#[utoipa::path(put, path = "/v1/fanout/topics/{topic}/members", tag = ID, params(("topic" = String, Path)), request_body = MembersRequest,
    responses((status = 200, description = "`{\"topic\",\"size\"}`"), (status = 400, description = "bad id, named"), (status = 413, description = "over a named limit")))]
async fn change_members(State(system): Shared, Path(topic): Path<String>, body: Result<Json<MembersRequest>, ApiError>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        process::check_name("topic", &topic)?;
        let request = body?.0;
        let changes = request.add.len() + request.remove.len();
        if changes > process::MEMBERS_PER_REQUEST_MAX {
            return Err(ApiError::too_large(format!("the request changes {changes} members; MEMBERS_PER_REQUEST_MAX is {}", process::MEMBERS_PER_REQUEST_MAX)));
        }
        for user in request.add.iter().chain(&request.remove) {
            process::check_name("member", user)?;
        }
        let size = system.change_members(&topic, request.add, request.remove).await?;
        Ok(axum::Json(json!({"topic": topic, "size": size})))
    }
    .await;
    counted(&system, result)
}

/// Trigger notifications; answered 202 once each is durable. Expansion into deliveries follows.
#[utoipa::path(post, path = "/v1/fanout/notifications", tag = ID, request_body = TriggerRequest,
    responses((status = 202, body = TriggerResponse), (status = 400, description = "bad input, naming the field"), (status = 413, description = "over a named limit"),
        (status = 503, description = "the log or the database is unavailable")))]
async fn trigger(State(system): Shared, body: Result<Json<TriggerRequest>, ApiError>) -> Result<(StatusCode, axum::Json<TriggerResponse>), ApiError> {
    let result = async { Ok((StatusCode::ACCEPTED, axum::Json(system.trigger(body?.0).await?))) }.await;
    counted(&system, result)
}

fn check_id(kind: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 200 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err(ApiError::bad_request(format!("{id:?} is not a {kind} id")));
    }
    Ok(())
}

/// A notification: whether it is fully expanded, its deliveries' counts by status, and a page
/// of its deliveries (by id: `<notification>.<channel>.<user>`).
#[utoipa::path(get, path = "/v1/fanout/notifications/{id}", tag = ID, params(("id" = String, Path), PageQuery),
    responses((status = 200, body = NotificationView), (status = 404, description = "unknown, or older than retention")))]
async fn notification_status(State(system): Shared, Path(id): Path<String>, query: Result<Query<PageQuery>, QueryRejection>) -> Result<axum::Json<NotificationView>, ApiError> {
    let result = async {
        check_id("notification", &id)?;
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = page_limit(query.limit, DELIVERIES_PAGE_MAX, "DELIVERIES_PAGE_MAX")?;
        match system.notification_view(&id, query.after.as_deref(), limit).await? {
            Some(view) => Ok(axum::Json(view)),
            None => Err(ApiError::not_found(format!("notification {id:?} not found (unknown, or older than retention)"))),
        }
    }
    .await;
    counted(&system, result)
}

/// One delivery: its status, provider, email id, digest, and the history of its attempts.
#[utoipa::path(get, path = "/v1/fanout/deliveries/{id}", tag = ID, params(("id" = String, Path)),
    responses((status = 200, body = DeliveryState), (status = 404, description = "unknown, or older than retention")))]
async fn delivery_status(State(system): Shared, Path(id): Path<String>) -> Result<axum::Json<DeliveryState>, ApiError> {
    let result = async {
        check_id("delivery", &id)?;
        match system.delivery(&id).await? {
            Some(state) => Ok(axum::Json(state)),
            None => Err(ApiError::not_found(format!("delivery {id:?} not found"))),
        }
    }
    .await;
    counted(&system, result)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct InboxQuery {
    /// Newest items listed (default and maximum `INBOX_PAGE_MAX`).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A user's in-app inbox, newest first, with the unread count.
#[utoipa::path(get, path = "/v1/fanout/inbox/{user}", tag = ID, params(("user" = String, Path), InboxQuery),
    responses((status = 200, description = "`{\"items\":[…],\"unread\":n}`"), (status = 400, description = "bad user or query")))]
async fn inbox(State(system): Shared, Path(user): Path<String>, query: Result<Query<InboxQuery>, QueryRejection>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        process::check_name("user", &user)?;
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = page_limit(query.limit, INBOX_PAGE_MAX, "INBOX_PAGE_MAX")?;
        let (items, unread) = system.inbox_page(&user, limit).await?;
        Ok(axum::Json(json!({"items": items, "unread": unread})))
    }
    .await;
    counted(&system, result)
}

/// Mark inbox items read: `{"ids":[…]}` or `{"all":true}`.
#[utoipa::path(post, path = "/v1/fanout/inbox/{user}/read", tag = ID, params(("user" = String, Path)), request_body = ReadRequest,
    responses((status = 200, description = "`{\"marked\":[…],\"unread\":n}`"), (status = 400, description = "bad input")))]
async fn mark_read(State(system): Shared, Path(user): Path<String>, body: Result<Json<ReadRequest>, ApiError>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        process::check_name("user", &user)?;
        let request = body?.0;
        if request.ids.len() > super::INBOX_ITEMS_MAX {
            return Err(ApiError::too_large(format!("ids holds {}; INBOX_ITEMS_MAX is {}", request.ids.len(), super::INBOX_ITEMS_MAX)));
        }
        if request.ids.is_empty() && !request.all {
            return Err(ApiError::bad_request("name ids to mark read, or all: true"));
        }
        let (marked, unread) = system.mark_read(&user, &request.ids, request.all).await?;
        Ok(axum::Json(json!({"marked": marked, "unread": unread})))
    }
    .await;
    counted(&system, result)
}

/// What a WebSocket client may send.
fn read_frame(frame: &Value) -> Option<(Vec<String>, bool)> {
    if frame.get("read_all").and_then(Value::as_bool) == Some(true) {
        return Some((Vec::new(), true));
    }
    let ids = frame.get("read")?.as_array()?;
    let ids: Vec<String> = ids.iter().filter_map(|id| id.as_str().map(str::to_string)).take(super::INBOX_ITEMS_MAX).collect();
    Some((ids, false))
}

/// The inbox live over a WebSocket.
#[utoipa::path(get, path = "/v1/fanout/inbox/{user}/ws", tag = ID, params(("user" = String, Path)),
    responses((status = 101, description = "WebSocket"), (status = 400, description = "bad user, or not an upgrade")))]
async fn inbox_ws(State(system): Shared, Path(user): Path<String>, upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>) -> Result<Response, ApiError> {
    process::check_name("user", &user)?;
    let upgrade = upgrade.map_err(|e| ApiError::bad_request(format!("not a WebSocket upgrade: {}", e.body_text())))?;
    let gateway = system.gateway().clone();
    Ok(gateway.websocket(ID, upgrade, None, move |mut connection| async move {
        let (mut receiver, snapshot) = match system.watch_inbox(&user).await {
            Ok(watched) => watched,
            Err(error) => {
                let _ = connection.send(&json!({"error": {"code": error.code, "message": error.message}})).await;
                return;
            }
        };
        if connection.send_text(snapshot).await.is_ok() {
            loop {
                tokio::select! {
                    message = receiver.recv() => {
                        let text = match message {
                            Ok(text) => text,
                            Err(broadcast::error::RecvError::Lagged(_)) => match system.inbox_snapshot(&user).await {
                                Ok(snapshot) => snapshot,
                                Err(_) => break,
                            },
                            Err(broadcast::error::RecvError::Closed) => break,
                        };
                        if connection.send_text(text).await.is_err() {
                            break;
                        }
                    }
                    frame = connection.recv() => {
                        let Some(frame) = frame else { break };
                        match read_frame(&frame) {
                            Some((ids, all)) => {
                                if let Err(error) = system.mark_read(&user, &ids, all).await {
                                    let _ = connection.send(&json!({"error": {"code": error.code, "message": error.message}})).await;
                                }
                            }
                            None => {
                                let _ = connection.send(&json!({"error": {"code": "bad_request", "message": "send {\"read\":[ids]} or {\"read_all\":true}"}})).await;
                            }
                        }
                    }
                }
            }
        }
        drop(receiver);
        system.unwatch_inbox(&user);
    }))
}

/// The inbox live as Server-Sent Events.
#[utoipa::path(get, path = "/v1/fanout/inbox/{user}/events", tag = ID, params(("user" = String, Path)),
    responses((status = 200, description = "text/event-stream"), (status = 400, description = "bad user")))]
async fn inbox_events(State(system): Shared, Path(user): Path<String>) -> Result<Response, ApiError> {
    process::check_name("user", &user)?;
    let (tx, rx) = mpsc::channel::<Event>(SSE_EVENTS_MAX);
    let gateway = system.gateway().clone();
    let (mut receiver, snapshot) = system.watch_inbox(&user).await?;
    tokio::spawn(async move {
        let event = |text: String| {
            let kind = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["type"].as_str().map(str::to_string)).unwrap_or_else(|| "inbox".into());
            Event::default().event(kind).data(text)
        };
        if tx.send(event(snapshot)).await.is_ok() {
            loop {
                let text = tokio::select! {
                    message = receiver.recv() => match message {
                        Ok(text) => text,
                        Err(broadcast::error::RecvError::Lagged(_)) => match system.inbox_snapshot(&user).await {
                            Ok(snapshot) => snapshot,
                            Err(_) => break,
                        },
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tx.closed() => break,
                };
                if tx.send(event(text)).await.is_err() {
                    break;
                }
            }
        }
        drop(receiver);
        system.unwatch_inbox(&user);
    });
    Ok(gateway.sse(ID, tokio_stream::wrappers::ReceiverStream::new(rx)).into_response())
}
