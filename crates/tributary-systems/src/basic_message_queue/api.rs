//! The routes of basic-message-queue: each handler checks its request with `process`, runs the
//! queue call where the backend wants it (`MessageQueue::run`: the blocking pool for the
//! embedded engine, awaited for NATS), counts it, and maps the answer back with `process`. The
//! WebSocket consumer loop is here too: it is IO (credit, socket, leases).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tributary_engine::queue::{Delivery, QueueError, QueueStore, Receipt, ReceiptOutcome};
use tributary_server::utoipa;
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Json, WsConnection, on_backend};

use super::process::{
    self, AckRequest, ClientFrame, DeadLettersQuery, DeadLettersResponse, ExtendRequest, NackRequest, PublishRequest, PublishResponse, QueueList, QueueView,
    ReceiveRequest, ReceiveResponse, RedriveRequest, RedriveResponse, SettleResponse, SettleStatus, WsQuery,
};
use super::{ID, MessageQueue, all_stats, queue_error};

/// A long poll receives in slices this long, checking between them whether its client left.
pub const LONG_POLL_SLICE: Duration = Duration::from_millis(250);
/// A WebSocket consumer leases at most this many messages per engine receive.
pub const WS_RECEIVE_BATCH_MAX: usize = 100;
/// How long one engine receive of a WebSocket consumer waits before it looks at its client again.
pub const WS_RECEIVE_WAIT: Duration = Duration::from_millis(500);
/// How often a WebSocket consumer without credit looks for new credit.
pub const WS_CREDIT_POLL: Duration = Duration::from_millis(10);

type Mq = State<Arc<MessageQueue>>;

pub fn router(mq: Arc<MessageQueue>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_queues))
        .routes(routes!(get_queue, delete_queue))
        .routes(routes!(publish))
        .routes(routes!(receive))
        .routes(routes!(ack))
        .routes(routes!(nack))
        .routes(routes!(extend))
        .routes(routes!(dead_letters))
        .routes(routes!(redrive))
        .routes(routes!(consume_ws))
        .with_state(mq)
}

/// Publish messages; answered once they are durable. Creates the queue on first publish.
#[utoipa::path(post, path = "/v1/queues/{queue}/messages", tag = ID,
    params(("queue" = String, Path, description = "queue name: [A-Za-z0-9._-]")),
    request_body = PublishRequest,
    responses((status = 201, body = PublishResponse), (status = 400, description = "bad input, naming the field"), (status = 413, description = "over a named limit")))]
async fn publish(State(mq): Mq, Path(queue): Path<String>, body: Result<Json<PublishRequest>, ApiError>) -> Result<(StatusCode, axum::Json<PublishResponse>), ApiError> {
    let result = async {
        let messages = process::new_messages(body?.0)?;
        let name = process::engine_queue_name(&queue)?;
        let ids = mq.publish(&queue, name, messages).await?;
        mq.metrics.messages_in(ids.len() as u64);
        Ok((StatusCode::CREATED, axum::Json(process::publish_response(&ids))))
    }
    .await;
    mq.counted(result)
}

/// Sets its flag when dropped: the request future was dropped because the client went away.
struct ClientGone(Arc<AtomicBool>);

impl Drop for ClientGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Lease messages, waiting up to `wait_ms` for the first one. Returns as soon as one is there.
#[utoipa::path(post, path = "/v1/queues/{queue}/receive", tag = ID,
    params(("queue" = String, Path)),
    request_body = ReceiveRequest,
    responses((status = 200, body = ReceiveResponse), (status = 400, description = "bad input"), (status = 404, description = "no such queue"),
        (status = 429, description = "the consumer holds its in-flight limit: ack first")))]
async fn receive(State(mq): Mq, Path(queue): Path<String>, body: Result<Json<ReceiveRequest>, ApiError>) -> Result<axum::Json<ReceiveResponse>, ApiError> {
    let result = async {
        let request = process::receive(body?.0)?;
        let name = process::engine_queue_name(&queue)?;
        let gone = Arc::new(AtomicBool::new(false));
        let _guard = ClientGone(gone.clone());
        // A task of its own: it gives back what it leased when the client has left meanwhile.
        let (queues, blocking) = (mq.queues.clone(), mq.queues.blocking());
        let poll = tokio::spawn(long_poll(queues, blocking, name, request, gone));
        let deliveries = match poll.await {
            Ok(result) => result.map_err(|error| queue_error(&queue, error))?,
            Err(join) => return Err(ApiError::internal(format!("receive task failed: {join}"))),
        };
        mq.delivered(&deliveries);
        Ok(axum::Json(ReceiveResponse { messages: deliveries.iter().map(process::message).collect() }))
    }
    .await;
    mq.counted(result)
}

/// Receive in slices, so that a client that left stops the wait; what was leased for a client
/// that left is given back at once.
async fn long_poll(queues: Arc<dyn QueueStore>, blocking: bool, queue: String, request: process::Receive, gone: Arc<AtomicBool>) -> Result<Vec<Delivery>, QueueError> {
    let deadline = Instant::now() + Duration::from_millis(request.wait_ms);
    loop {
        let slice = deadline.saturating_duration_since(Instant::now()).min(LONG_POLL_SLICE);
        let (store, name, asked) = (queues.clone(), queue.clone(), request.clone());
        let deliveries = on_backend(blocking, async move { store.receive(&name, &asked.group, &asked.consumer, asked.max, asked.lease_ms, slice).await }).await?;
        if gone.load(Ordering::Acquire) {
            if !deliveries.is_empty() {
                let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
                let (store, name, group) = (queues.clone(), queue.clone(), request.group.clone());
                on_backend(blocking, async move { store.nack(&name, &group, receipts, Some(0)).await }).await?;
            }
            return Ok(Vec::new());
        }
        if !deliveries.is_empty() || Instant::now() >= deadline {
            return Ok(deliveries);
        }
    }
}

/// 200 when every receipt was ok; 409 (some stale) or 400 (some invalid) with the outcomes.
fn settle_answer(verb: &str, receipts: &[Receipt], outcomes: &[ReceiptOutcome]) -> Response {
    let (status, body) = process::settle_response(verb, receipts, outcomes);
    let status = match status {
        SettleStatus::AllOk => StatusCode::OK,
        SettleStatus::SomeStale => StatusCode::CONFLICT,
        SettleStatus::SomeInvalid => StatusCode::BAD_REQUEST,
    };
    (status, axum::Json(body)).into_response()
}

/// Acknowledge deliveries: durable before the answer; never delivered again to the group.
#[utoipa::path(post, path = "/v1/queues/{queue}/ack", tag = ID,
    params(("queue" = String, Path)),
    request_body = AckRequest,
    responses((status = 200, body = SettleResponse), (status = 409, body = SettleResponse, description = "some receipt is stale"),
        (status = 400, description = "bad input or an invalid receipt"), (status = 404, description = "no such queue or group")))]
async fn ack(State(mq): Mq, Path(queue): Path<String>, body: Result<Json<AckRequest>, ApiError>) -> Result<Response, ApiError> {
    let result = async {
        let request = body?.0;
        settle_with(&mq, &queue, request.group, request.receipts, SettleVerb::Ack).await
    }
    .await;
    mq.counted(result)
}

/// Give deliveries back: redelivered after `delay_ms`, or the queue's exponential backoff;
/// dead-lettered after the last allowed delivery.
#[utoipa::path(post, path = "/v1/queues/{queue}/nack", tag = ID,
    params(("queue" = String, Path)),
    request_body = NackRequest,
    responses((status = 200, body = SettleResponse), (status = 409, body = SettleResponse, description = "some receipt is stale"),
        (status = 400, description = "bad input or an invalid receipt"), (status = 404, description = "no such queue or group")))]
async fn nack(State(mq): Mq, Path(queue): Path<String>, body: Result<Json<NackRequest>, ApiError>) -> Result<Response, ApiError> {
    let result = async {
        let request = body?.0;
        let delay_ms = process::nack_delay(request.delay_ms)?;
        settle_with(&mq, &queue, request.group, request.receipts, SettleVerb::Nack(delay_ms)).await
    }
    .await;
    mq.counted(result)
}

/// Extend leases to now + `lease_ms`.
#[utoipa::path(post, path = "/v1/queues/{queue}/extend", tag = ID,
    params(("queue" = String, Path)),
    request_body = ExtendRequest,
    responses((status = 200, body = SettleResponse), (status = 409, body = SettleResponse, description = "some receipt is stale"),
        (status = 400, description = "bad input or an invalid receipt"), (status = 404, description = "no such queue or group")))]
async fn extend(State(mq): Mq, Path(queue): Path<String>, body: Result<Json<ExtendRequest>, ApiError>) -> Result<Response, ApiError> {
    let result = async {
        let request = body?.0;
        let lease_ms = process::extend_lease(request.lease_ms)?;
        settle_with(&mq, &queue, request.group, request.receipts, SettleVerb::Extend(lease_ms)).await
    }
    .await;
    mq.counted(result)
}

/// What a settle request does to its receipts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SettleVerb {
    Ack,
    /// With the delay asked for (None: the queue's backoff).
    Nack(Option<u64>),
    /// With the new lease.
    Extend(u64),
}

impl SettleVerb {
    /// The word of the answer (`acked`, ...), as HTTP and WebSocket answers say it.
    fn word(self) -> &'static str {
        match self {
            SettleVerb::Ack => "acked",
            SettleVerb::Nack(_) => "nacked",
            SettleVerb::Extend(_) => "extended",
        }
    }

    /// Runs the verb on the queue interface.
    async fn apply(self, mq: &MessageQueue, queue: &str, group: String, receipts: Vec<Receipt>) -> Result<Vec<ReceiptOutcome>, ApiError> {
        let name = process::engine_queue_name(queue)?;
        mq.run(queue, move |queues| async move {
            match self {
                SettleVerb::Ack => queues.ack(&name, &group, receipts).await,
                SettleVerb::Nack(delay_ms) => queues.nack(&name, &group, receipts, delay_ms).await,
                SettleVerb::Extend(lease_ms) => queues.extend(&name, &group, receipts, lease_ms).await,
            }
        })
        .await
    }

    /// Forget (and time) settled receipts: an extend keeps them held.
    fn account(self, mq: &MessageQueue, receipts: &[Receipt], outcomes: &[ReceiptOutcome]) {
        if !matches!(self, SettleVerb::Extend(_)) {
            mq.settled(receipts, outcomes, self == SettleVerb::Ack);
        }
    }
}

/// The shared path of ack, nack and extend: validate, run the verb, account, answer with
/// per-receipt outcomes.
async fn settle_with(mq: &Arc<MessageQueue>, queue: &str, group: String, receipts: Vec<String>, verb: SettleVerb) -> Result<Response, ApiError> {
    let settle = process::settle(group, receipts)?;
    let outcomes = verb.apply(mq, queue, settle.group.clone(), settle.receipts.clone()).await?;
    verb.account(mq, &settle.receipts, &outcomes);
    Ok(settle_answer(verb.word(), &settle.receipts, &outcomes))
}

/// Every queue with its depth, in-flight and dead-lettered counts.
#[utoipa::path(get, path = "/v1/queues", tag = ID, responses((status = 200, body = QueueList)))]
async fn list_queues(State(mq): Mq) -> Result<axum::Json<QueueList>, ApiError> {
    let result = mq.run("", all_stats).await.map(|all| axum::Json(QueueList { queues: all.iter().map(|(name, stats)| process::queue_summary(name, stats)).collect() }));
    mq.counted(result)
}

/// A queue's numbers: depth, in flight, dead-lettered, delayed, oldest age, and lag per group.
#[utoipa::path(get, path = "/v1/queues/{queue}", tag = ID,
    params(("queue" = String, Path)),
    responses((status = 200, body = QueueView), (status = 404, description = "no such queue")))]
async fn get_queue(State(mq): Mq, Path(queue): Path<String>) -> Result<axum::Json<QueueView>, ApiError> {
    let result = async {
        let name = process::engine_queue_name(&queue)?;
        let (stats, config) = mq.run(&queue, move |queues| async move { Ok((queues.stats(&name).await?, queues.queue_config(&name).await?)) }).await?;
        Ok(axum::Json(process::queue_view(&queue, &stats, &config)))
    }
    .await;
    mq.counted(result)
}

/// Delete a queue and everything in it (messages, groups, dead letters).
#[utoipa::path(delete, path = "/v1/queues/{queue}", tag = ID,
    params(("queue" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, description = "no such queue")))]
async fn delete_queue(State(mq): Mq, Path(queue): Path<String>) -> Result<StatusCode, ApiError> {
    let result = async {
        let name = process::engine_queue_name(&queue)?;
        mq.run(&queue, move |queues| async move { queues.delete_queue(&name).await }).await?;
        Ok(StatusCode::NO_CONTENT)
    }
    .await;
    mq.counted(result)
}

/// Page through dead letters, of one group or all.
#[utoipa::path(get, path = "/v1/queues/{queue}/dead-letters", tag = ID,
    params(("queue" = String, Path), DeadLettersQuery),
    responses((status = 200, body = DeadLettersResponse), (status = 400, description = "bad input"), (status = 404, description = "no such queue")))]
async fn dead_letters(State(mq): Mq, Path(queue): Path<String>, query: Result<Query<DeadLettersQuery>, QueryRejection>) -> Result<axum::Json<DeadLettersResponse>, ApiError> {
    let result = async {
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let page = process::dead_letters_page(query)?;
        let name = process::engine_queue_name(&queue)?;
        let asked = page.clone();
        let letters = mq.run(&queue, move |queues| async move { queues.dead_letters(&name, asked.group.as_deref(), asked.from, asked.max).await }).await?;
        Ok(axum::Json(process::dead_letters_response(&page, &letters)))
    }
    .await;
    mq.counted(result)
}

/// Republish a group's dead letters (all not yet redriven, or those named) for that group only.
#[utoipa::path(post, path = "/v1/queues/{queue}/dead-letters/redrive", tag = ID,
    params(("queue" = String, Path)),
    request_body = RedriveRequest,
    responses((status = 200, body = RedriveResponse), (status = 400, description = "bad input"), (status = 404, description = "no such queue")))]
async fn redrive(State(mq): Mq, Path(queue): Path<String>, body: Result<Json<RedriveRequest>, ApiError>) -> Result<axum::Json<RedriveResponse>, ApiError> {
    let result = async {
        let (group, which) = process::redrive(body?.0)?;
        let name = process::engine_queue_name(&queue)?;
        let redriven = mq.run(&queue, move |queues| async move { queues.redrive(&name, &group, which).await }).await?;
        Ok(axum::Json(RedriveResponse { redriven }))
    }
    .await;
    mq.counted(result)
}

/// WebSocket consumer. The client grants credit with `{"credit": n}`; the server pushes
/// `{"type":"message", …}` only within credit (each message is leased when it is pushed). The
/// client settles with `{"ack": [receipts]}`, `{"nack": [receipts], "delay_ms"?}` or
/// `{"extend": [receipts], "lease_ms"}`, answered by `{"type":"acked"|"nacked"|"extended",
/// "outcomes"}`; errors come as `{"type":"error","error":{code,message}}`. Messages unacked when
/// the socket closes are nacked, redeliverable at once.
#[utoipa::path(get, path = "/v1/queues/{queue}/ws", tag = ID,
    params(("queue" = String, Path), WsQuery),
    responses((status = 101, description = "switching to the WebSocket protocol"), (status = 400, description = "bad input"), (status = 404, description = "no such queue")))]
async fn consume_ws(State(mq): Mq, Path(queue): Path<String>, query: Result<Query<WsQuery>, QueryRejection>, upgrade: WebSocketUpgrade) -> Response {
    let checked = async {
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let request = process::receive(ReceiveRequest { group: query.group, max: None, wait_ms: None, lease_ms: query.lease_ms, consumer: query.consumer })?;
        let name = process::engine_queue_name(&queue)?;
        let looked_up = name.clone();
        mq.run(&queue, move |queues| async move { queues.queue_config(&looked_up).await }).await?;
        Ok::<_, ApiError>((request, name, query.credit.unwrap_or(0)))
    }
    .await;
    let (request, name, credit) = match mq.counted(checked) {
        Ok(ok) => ok,
        Err(error) => return error.into_response(),
    };
    let gateway = mq.gateway.clone();
    gateway.websocket(ID, upgrade, Some(credit), move |connection| consume(mq, queue, name, request, connection))
}

/// The WebSocket consumer loop: lease only within credit, push, settle what the client sends.
async fn consume(mq: Arc<MessageQueue>, queue: String, name: String, request: process::Receive, mut connection: WsConnection) {
    // What this connection holds unsettled (by receipt), nacked when it closes.
    let mut held: HashMap<String, Receipt> = HashMap::new();
    let mut pending: Option<tokio::task::JoinHandle<Result<Vec<Delivery>, QueueError>>> = None;
    // Set when the consumer holds its in-flight limit: lease nothing until the client settles.
    let mut stalled = false;
    'connection: loop {
        let credit = connection.credit().unwrap_or(0);
        if pending.is_none() && credit > 0 && !stalled {
            let (queues, name, request) = (mq.queues.clone(), name.clone(), request.clone());
            let max = credit.min(WS_RECEIVE_BATCH_MAX);
            let blocking = queues.blocking();
            pending = Some(tokio::spawn(on_backend(blocking, async move { queues.receive(&name, &request.group, &request.consumer, max, request.lease_ms, WS_RECEIVE_WAIT).await })));
        }
        tokio::select! {
            frame = connection.recv() => {
                let Some(frame) = frame else { break 'connection };
                stalled = false;
                let reply = match process::client_frame(frame) {
                    Ok(frame) => settle_frame(&mq, &queue, &request.group, frame, &mut held).await,
                    Err(error) => {
                        mq.metrics.error();
                        process::ws_error(&error)
                    }
                };
                if connection.send(&reply).await.is_err() {
                    break 'connection;
                }
            }
            received = async { pending.as_mut().expect("enabled only while pending").await }, if pending.is_some() => {
                pending = None;
                let deliveries = match received {
                    Ok(Ok(deliveries)) => deliveries,
                    Ok(Err(error)) => {
                        let fatal = matches!(error, QueueError::NotFound { .. } | QueueError::Deleted(_));
                        stalled = matches!(error, QueueError::LimitExceeded { .. });
                        let error = ApiError::from(error);
                        mq.metrics.error();
                        if connection.send(&process::ws_error(&error)).await.is_err() || fatal {
                            break 'connection;
                        }
                        if !stalled {
                            tokio::time::sleep(WS_RECEIVE_WAIT).await;
                        }
                        continue;
                    }
                    Err(_) => break 'connection,
                };
                mq.delivered(&deliveries);
                for delivery in &deliveries {
                    held.insert(delivery.receipt.to_string(), delivery.receipt.clone());
                }
                for delivery in &deliveries {
                    // Credit was there when the receive started, and only this loop spends it.
                    if connection.send_data(&process::ws_message(delivery)).await.is_err() {
                        break 'connection;
                    }
                }
            }
            _ = tokio::time::sleep(WS_CREDIT_POLL), if pending.is_none() => {}
        }
    }
    // Give back what the client held unsettled (and what a last receive leased for it).
    if let Some(pending) = pending
        && let Ok(Ok(deliveries)) = pending.await
    {
        held.extend(deliveries.into_iter().map(|d| (d.receipt.to_string(), d.receipt)));
    }
    if !held.is_empty() {
        let receipts: Vec<Receipt> = held.into_values().collect();
        let verb = SettleVerb::Nack(Some(0));
        if let Ok(outcomes) = verb.apply(&mq, &queue, request.group.clone(), receipts.clone()).await {
            verb.account(&mq, &receipts, &outcomes);
        }
    }
}

async fn settle_frame(mq: &MessageQueue, queue: &str, group: &str, frame: ClientFrame, held: &mut HashMap<String, Receipt>) -> serde_json::Value {
    let (verb, receipts) = match frame {
        ClientFrame::Ack(receipts) => (SettleVerb::Ack, receipts),
        ClientFrame::Nack(receipts, delay_ms) => (SettleVerb::Nack(delay_ms), receipts),
        ClientFrame::Extend(receipts, lease_ms) => (SettleVerb::Extend(lease_ms), receipts),
    };
    match verb.apply(mq, queue, group.to_string(), receipts.clone()).await {
        Ok(outcomes) => {
            if !matches!(verb, SettleVerb::Extend(_)) {
                for receipt in &receipts {
                    held.remove(receipt.as_str());
                }
            }
            verb.account(mq, &receipts, &outcomes);
            process::ws_settled(verb.word(), &receipts, &outcomes)
        }
        Err(error) => {
            mq.metrics.error();
            process::ws_error(&error)
        }
    }
}
