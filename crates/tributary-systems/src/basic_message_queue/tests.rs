//! Feature tests of basic-message-queue through its public HTTP and WebSocket API: the app runs
//! in-process on 127.0.0.1:0, and reqwest and tokio-tungstenite are its clients. Every test that
//! holds on both backends runs twice (`test_support::on_both!`): on the embedded engine in a
//! temporary folder, and on the machine's NATS JetStream under a namespace of its own. The others name the gap of the NATS
//! backend they depend on (`tributary_nats::queue` lists them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tributary_engine::Engine;
use tributary_server::ServerConfig;

use crate::System;
use crate::test_support::{Backend, on_both};

/// One running app over a data folder, on a backend.
struct App {
    base: String,
    client: reqwest::Client,
    system: Arc<dyn System>,
    engine: Arc<Engine>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl App {
    async fn start(dir: &Path, backend: &Backend) -> App {
        let data: PathBuf = dir.to_path_buf();
        let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::open(data)).await.unwrap().unwrap());
        let context = backend.context(engine.clone()).await;
        let system = super::start(&context).unwrap();
        let app = tributary_server::router(&ServerConfig::default(), vec![system.clone().api()], Router::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        App { base, client: reqwest::Client::new(), system, engine, stop, server }
    }

    /// Stop serving and close the engine, so the folder can be opened again.
    async fn stop(self) {
        let App { client, system, engine, stop, server, .. } = self;
        drop(client);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        drop(system);
        let mut engine = engine;
        let deadline = Instant::now() + Duration::from_secs(5);
        let engine = loop {
            match Arc::try_unwrap(engine) {
                Ok(engine) => break engine,
                Err(shared) if Instant::now() < deadline => {
                    engine = shared;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => panic!("the engine is still shared after the server stopped"),
            }
        };
        tokio::task::spawn_blocking(move || engine.close()).await.unwrap().unwrap();
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")) };
        (status, body)
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body)).await
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> (StatusCode, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body)).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.get(format!("{}{path}", self.base))).await
    }

    /// Publish `messages` (each a full message object); returns their ids.
    async fn publish(&self, queue: &str, messages: Value) -> Vec<String> {
        let (status, body) = self.post(&format!("/v1/queues/{queue}/messages"), json!({ "messages": messages })).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["ids"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_string()).collect()
    }

    /// Publish one message per body.
    async fn publish_bodies(&self, queue: &str, bodies: impl IntoIterator<Item = Value>) -> Vec<String> {
        let messages: Vec<Value> = bodies.into_iter().map(|body| json!({ "body": body })).collect();
        self.publish(queue, Value::Array(messages)).await
    }

    async fn receive(&self, queue: &str, request: Value) -> Vec<Value> {
        let (status, body) = self.post(&format!("/v1/queues/{queue}/receive"), request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["messages"].as_array().unwrap().clone()
    }

    async fn settle(&self, verb: &str, queue: &str, group: &str, messages: &[Value], extra: Value) -> (StatusCode, Value) {
        let receipts: Vec<&Value> = messages.iter().map(|m| &m["receipt"]).collect();
        let mut request = json!({ "group": group, "receipts": receipts });
        if let Value::Object(extra) = extra {
            request.as_object_mut().unwrap().extend(extra);
        }
        self.post(&format!("/v1/queues/{queue}/{verb}"), request).await
    }

    async fn ack(&self, queue: &str, group: &str, messages: &[Value]) {
        let (status, body) = self.settle("ack", queue, group, messages, Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body["outcomes"].as_array().unwrap().iter().all(|o| o["outcome"] == "ok"), "{body}");
    }

    async fn nack(&self, queue: &str, group: &str, messages: &[Value], delay_ms: Option<u64>) {
        let extra = delay_ms.map_or(Value::Null, |d| json!({ "delay_ms": d }));
        let (status, body) = self.settle("nack", queue, group, messages, extra).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    async fn queue(&self, queue: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/queues/{queue}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

on_both!(a_published_message_is_received_with_its_json_body_and_acked_once);
on_both!(every_consumer_group_gets_every_message);
on_both!(consumers_within_a_group_compete_and_never_hold_one_message_at_once);
on_both!(nack_with_delay_redelivers_later_with_the_delivery_count_raised);
on_both!(a_nack_without_delay_retries_with_exponential_backoff);
on_both!(a_message_failing_deliveries_max_times_is_dead_lettered_listed_and_redriven);
on_both!(after_a_restart_acked_messages_stay_acked_and_unacked_ones_come_back);
on_both!(a_repeated_dedup_id_returns_the_first_id_and_is_delivered_once);
on_both!(a_long_poll_returns_as_soon_as_a_message_arrives);
on_both!(a_websocket_consumer_gets_nothing_beyond_its_credit_and_acks_over_the_socket);
on_both!(bad_input_is_refused_with_a_status_and_a_message_naming_the_problem);
on_both!(a_deleted_queue_is_gone_and_a_publish_creates_it_afresh);

/// Embedded only: the NATS backend's gap `priority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_messages_are_delivered_first_embedded() {
    higher_priority_messages_are_delivered_first(Backend::Embedded).await;
}
/// Embedded only: the NATS backend's gap `delay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_not_delivered_before_its_delay_embedded() {
    a_delayed_message_is_not_delivered_before_its_delay(Backend::Embedded).await;
}
/// Embedded only: the NATS backend's gap `stale_receipt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_receipt_gets_409_with_the_outcomes_and_the_current_one_acks_embedded() {
    a_stale_receipt_gets_409_with_the_outcomes_and_the_current_one_acks(Backend::Embedded).await;
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages.iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

/// Receive until `want` messages came, or `wait` passed; the time of the first one counts.
async fn receive_within(app: &App, queue: &str, request: Value, wait: Duration) -> (Vec<Value>, Duration) {
    let started = Instant::now();
    let messages = app.receive(queue, request).await;
    assert!(started.elapsed() < wait + Duration::from_secs(1), "the long poll overran its wait");
    (messages, started.elapsed())
}

async fn a_published_message_is_received_with_its_json_body_and_acked_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let body = json!({"order": 42, "items": ["tea", {"n": 2}], "paid": true});
    let ids = app.publish("orders", json!([{"body": body, "key": "customer-7", "headers": {"trace": "abc"}, "priority": 1}])).await;
    assert_eq!(ids, vec!["p1-0"]);

    let messages = app.receive("orders", json!({"group": "billing", "max": 10})).await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message["id"], "p1-0");
    assert_eq!(message["body"], body);
    assert_eq!(message["key"], "customer-7");
    assert_eq!(message["headers"], json!({"trace": "abc"}));
    assert_eq!((message["priority"].as_u64(), message["delivery_count"].as_u64()), (Some(1), Some(1)));
    assert!(message["enqueued_at_ms"].as_u64().unwrap() > 0);

    let view = app.queue("orders").await;
    assert_eq!((view["in_flight"].as_u64(), view["depth"].as_u64()), (Some(1), Some(0)), "{view}");
    app.ack("orders", "billing", &messages).await;
    assert!(app.receive("orders", json!({"group": "billing"})).await.is_empty(), "an acked message is not delivered again");

    let view = app.queue("orders").await;
    assert_eq!((view["in_flight"].as_u64(), view["groups"][0]["acked_total"].as_u64(), view["groups"][0]["lag"].as_u64()), (Some(0), Some(1), Some(0)), "{view}");
    let (_, list) = app.get("/v1/queues").await;
    assert_eq!(list["queues"][0]["name"], "orders", "{list}");

    let metrics = app.system.metrics().snapshot();
    assert_eq!((metrics.messages_in, metrics.messages_out), (1, 1));
    assert_eq!(metrics.latency_ms.expect("the ack recorded an end-to-end latency").samples, 1);
    let status = app.system.status();
    assert_eq!(status["queues"][0]["name"], "orders", "{status}");
    let (_, openapi) = app.get("/openapi.json").await;
    for path in ["/v1/queues/{queue}/messages", "/v1/queues/{queue}/receive", "/v1/queues/{queue}/ack", "/v1/queues/{queue}/ws", "/v1/queues/{queue}/dead-letters/redrive"] {
        assert!(openapi["paths"].get(path).is_some(), "{path} is missing from /openapi.json");
    }
    app.stop().await;
}

async fn every_consumer_group_gets_every_message(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let published = app.publish_bodies("events", (0..5).map(|i| json!(i))).await;
    for group in ["billing", "audit"] {
        let messages = app.receive("events", json!({"group": group, "max": 100})).await;
        let mut got = ids(&messages);
        got.sort();
        let mut want = published.clone();
        want.sort();
        assert_eq!(got, want, "group {group} sees every message");
        app.ack("events", group, &messages).await;
    }
    app.stop().await;
}

async fn consumers_within_a_group_compete_and_never_hold_one_message_at_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(App::start(dir.path(), &backend).await);
    let published = app.publish_bodies("jobs", (0..60).map(|i| json!({"job": i}))).await;
    let mut consumers = Vec::new();
    for consumer in ["a", "b", "c"] {
        let app = app.clone();
        consumers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let messages = app.receive("jobs", json!({"group": "workers", "consumer": consumer, "max": 4})).await;
                if messages.is_empty() {
                    return seen;
                }
                seen.extend(ids(&messages));
                tokio::time::sleep(Duration::from_millis(5)).await;
                app.ack("jobs", "workers", &messages).await;
            }
        }));
    }
    let mut all = Vec::new();
    for consumer in consumers {
        all.extend(consumer.await.unwrap());
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "no message went to two consumers");
    assert_eq!(unique, published.iter().collect::<HashSet<_>>(), "every message was processed");
    Arc::into_inner(app).unwrap().stop().await;
}

async fn nack_with_delay_redelivers_later_with_the_delivery_count_raised(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish_bodies("retry", [json!("work")]).await;
    let first = app.receive("retry", json!({"group": "g"})).await;
    app.nack("retry", "g", &first, Some(400)).await;
    assert!(app.receive("retry", json!({"group": "g"})).await.is_empty(), "not before its delay");
    let (again, waited) = receive_within(&app, "retry", json!({"group": "g", "wait_ms": 3_000}), Duration::from_secs(3)).await;
    assert_eq!(again.len(), 1);
    assert!(waited >= Duration::from_millis(300), "redelivered after {waited:?}");
    assert_eq!(again[0]["id"], first[0]["id"]);
    assert_eq!(again[0]["delivery_count"], 2);
    assert_ne!(again[0]["receipt"], first[0]["receipt"], "a new delivery gets a new receipt");
    app.stop().await;
}

async fn a_nack_without_delay_retries_with_exponential_backoff(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish_bodies("backoff", [json!("flaky")]).await;
    let request = json!({"group": "g", "wait_ms": 5_000});
    let mut message = app.receive("backoff", request.clone()).await;
    let mut waits = Vec::new();
    for _ in 0..2 {
        app.nack("backoff", "g", &message, None).await;
        let (again, waited) = receive_within(&app, "backoff", request.clone(), Duration::from_secs(5)).await;
        assert_eq!(again.len(), 1);
        waits.push(waited);
        message = again;
    }
    assert_eq!(message[0]["delivery_count"], 3);
    // Backoff 1 s × 2^(n-1) with equal jitter: the first in 0.5..1 s, the second in 1..2 s.
    assert!(waits[0] >= Duration::from_millis(450) && waits[0] <= Duration::from_millis(1_500), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(950) && waits[1] >= waits[0], "{waits:?}");
    app.stop().await;
}

async fn a_message_failing_deliveries_max_times_is_dead_lettered_listed_and_redriven(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let ids = app.publish_bodies("poison", [json!({"bad": true})]).await;
    let deliveries_max = app.queue("poison").await["config"]["deliveries_max"].as_u64().unwrap();
    for attempt in 1..=deliveries_max {
        let message = app.receive("poison", json!({"group": "g"})).await;
        assert_eq!(message[0]["delivery_count"], attempt);
        app.nack("poison", "g", &message, Some(0)).await;
    }
    assert!(app.receive("poison", json!({"group": "g"})).await.is_empty(), "dead-lettered, not redelivered");
    assert_eq!(app.queue("poison").await["dead_lettered"], 1);

    let (status, page) = app.get("/v1/queues/poison/dead-letters?group=g&from=0&max=10").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let letter = &page["dead_letters"][0];
    assert_eq!((letter["id"].as_str(), &letter["body"], letter["delivery_count"].as_u64()), (Some(ids[0].as_str()), &json!({"bad": true}), Some(deliveries_max)));
    assert_eq!(letter["redriven"], false);
    assert_eq!(page["next_from"], 1);

    let (status, answer) = app.post("/v1/queues/poison/dead-letters/redrive", json!({"group": "g"})).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"redriven": 1})));
    let again = app.receive("poison", json!({"group": "g", "wait_ms": 2_000})).await;
    assert_eq!((&again[0]["body"], again[0]["delivery_count"].as_u64()), (&json!({"bad": true}), Some(1)), "a redriven message starts over");
    app.ack("poison", "g", &again).await;
    let (_, answer) = app.post("/v1/queues/poison/dead-letters/redrive", json!({"group": "g", "ids": [ids[0]]})).await;
    assert_eq!(answer, json!({"redriven": 0}), "a letter is redriven once");
    let (_, page) = app.get("/v1/queues/poison/dead-letters").await;
    assert_eq!(page["dead_letters"][0]["redriven"], true);
    app.stop().await;
}

async fn after_a_restart_acked_messages_stay_acked_and_unacked_ones_come_back(backend: Backend) {
    // One acked, one nacked, one still leased (the default lease, 30 s) when the node stops.
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish_bodies("durable", (0..3).map(|i| json!(i))).await;
    let messages = app.receive("durable", json!({"group": "g", "max": 3})).await;
    assert_eq!(messages.len(), 3);
    app.ack("durable", "g", &messages[..1]).await;
    app.nack("durable", "g", &messages[1..2], Some(0)).await;
    app.stop().await;

    let app = App::start(dir.path(), &backend).await;
    let again = app.receive("durable", json!({"group": "g", "max": 10, "wait_ms": 3_000})).await;
    assert_eq!(ids(&again), ids(&messages[1..2]), "only the nacked message comes back: the acked one is done and the leased one keeps its lease");
    assert_eq!(again[0]["delivery_count"], 2);
    let view = app.queue("durable").await;
    assert_eq!((view["in_flight"].as_u64(), view["groups"][0]["acked_total"].as_u64()), (Some(2), Some(1)), "{view}");
    app.stop().await;
}

async fn a_repeated_dedup_id_returns_the_first_id_and_is_delivered_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let first = app.publish("dedup", json!([{"body": "a", "dedup_id": "order-1"}])).await;
    let second = app.publish("dedup", json!([{"body": "a again", "dedup_id": "order-1"}, {"body": "b", "dedup_id": "order-2"}])).await;
    assert_eq!(second[0], first[0]);
    assert_ne!(second[1], first[0]);
    let messages = app.receive("dedup", json!({"group": "g", "max": 10})).await;
    assert_eq!(messages.iter().map(|m| m["body"].clone()).collect::<Vec<_>>(), vec![json!("a"), json!("b")]);
    app.stop().await;
}

async fn higher_priority_messages_are_delivered_first(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish("prio", json!([{"body": "low 1", "priority": 3}, {"body": "low 2", "priority": 3}])).await;
    app.publish("prio", json!([{"body": "urgent 1", "priority": 0}, {"body": "urgent 2", "priority": 0}])).await;
    let first = app.receive("prio", json!({"group": "g", "max": 2})).await;
    assert_eq!(first.iter().map(|m| m["body"].clone()).collect::<Vec<_>>(), vec![json!("urgent 1"), json!("urgent 2")]);
    let rest = app.receive("prio", json!({"group": "g", "max": 10})).await;
    assert_eq!(rest.len(), 2, "lower levels are served too");
    app.stop().await;
}

async fn a_delayed_message_is_not_delivered_before_its_delay(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish("later", json!([{"body": "in 400 ms", "delay_ms": 400}])).await;
    assert!(app.receive("later", json!({"group": "g"})).await.is_empty());
    assert_eq!(app.queue("later").await["groups"][0]["delayed"], 1);
    let (messages, waited) = receive_within(&app, "later", json!({"group": "g", "wait_ms": 3_000}), Duration::from_secs(3)).await;
    assert_eq!(messages.len(), 1);
    assert!(waited >= Duration::from_millis(300), "delivered after {waited:?}");
    app.stop().await;
}

async fn a_long_poll_returns_as_soon_as_a_message_arrives(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(App::start(dir.path(), &backend).await);
    app.publish_bodies("poll", [json!("warm-up")]).await;
    app.ack("poll", "g", &app.receive("poll", json!({"group": "g"})).await).await;
    let poller = {
        let app = app.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let messages = app.receive("poll", json!({"group": "g", "wait_ms": 10_000})).await;
            (messages, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.publish_bodies("poll", [json!("now")]).await;
    let (messages, waited) = poller.await.unwrap();
    assert_eq!(messages[0]["body"], "now");
    assert!(waited < Duration::from_secs(2), "the long poll waited {waited:?} for a message published after 300 ms");
    Arc::into_inner(app).unwrap().stop().await;
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_send(socket: &mut Socket, value: Value) {
    socket.send(WsMessage::Text(value.to_string().into())).await.unwrap();
}

/// The next JSON frame within `wait`, or None.
async fn ws_next(socket: &mut Socket, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(WsMessage::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("the socket ended: {other:?}"),
        }
    }
}

async fn a_websocket_consumer_gets_nothing_beyond_its_credit_and_acks_over_the_socket(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish_bodies("push", (0..5).map(|i| json!(i))).await;
    let url = format!("{}/v1/queues/push/ws?group=g&consumer=socket-1", app.base.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(ws_next(&mut socket, Duration::from_millis(300)).await, None, "no credit, no message");

    ws_send(&mut socket, json!({"credit": 2})).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let frame = ws_next(&mut socket, Duration::from_secs(2)).await.expect("a message within credit");
        assert_eq!(frame["type"], "message", "{frame}");
        held.push(frame);
    }
    assert_eq!(ws_next(&mut socket, Duration::from_millis(400)).await, None, "nothing beyond the credit of 2");
    assert_eq!(app.queue("push").await["in_flight"], 2, "only what was pushed is leased");

    let receipts: Vec<&Value> = held.iter().map(|m| &m["receipt"]).collect();
    ws_send(&mut socket, json!({"ack": receipts})).await;
    let acked = ws_next(&mut socket, Duration::from_secs(2)).await.unwrap();
    assert_eq!(acked["type"], "acked", "{acked}");
    assert!(acked["outcomes"].as_array().unwrap().iter().all(|o| o["outcome"] == "ok"), "{acked}");

    ws_send(&mut socket, json!({"credit": 10})).await;
    let mut rest = Vec::new();
    while rest.len() < 3 {
        let frame = ws_next(&mut socket, Duration::from_secs(2)).await.expect("the remaining messages");
        assert_eq!(frame["type"], "message", "{frame}");
        rest.push(frame);
    }
    ws_send(&mut socket, json!({"nack": "not a list"})).await;
    let error = ws_next(&mut socket, Duration::from_secs(2)).await.unwrap();
    assert_eq!((error["type"].as_str(), error["error"]["code"].as_str()), (Some("error"), Some("bad_request")), "{error}");

    // Closing with 3 unacked gives them back at once.
    socket.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut again = Vec::new();
    while again.len() < 3 && Instant::now() < deadline {
        again.extend(app.receive("push", json!({"group": "g", "max": 10, "wait_ms": 1_000})).await);
    }
    assert_eq!(again.len(), 3, "unacked messages of a closed socket come back");
    let view = app.queue("push").await;
    assert_eq!(view["groups"][0]["acked_total"], 2, "{view}");
    app.stop().await;
}

async fn a_stale_receipt_gets_409_with_the_outcomes_and_the_current_one_acks(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish_bodies("stale", [json!("x")]).await;
    let first = app.receive("stale", json!({"group": "g", "lease_ms": 100})).await;
    let second = app.receive("stale", json!({"group": "g", "wait_ms": 3_000})).await;
    assert_eq!(second[0]["delivery_count"], 2, "redelivered once the lease ran out");

    let (status, body) = app.settle("ack", "stale", "g", &first, Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["outcomes"][0]["outcome"], "stale");
    assert_eq!(body["error"]["code"], "stale_receipt");
    let (status, body) = app.post("/v1/queues/stale/ack", json!({"group": "g", "receipts": ["nonsense"]})).await;
    assert_eq!((status, &body["outcomes"][0]["outcome"]), (StatusCode::BAD_REQUEST, &json!("invalid")), "{body}");
    app.ack("stale", "g", &second).await;
    app.stop().await;
}

async fn bad_input_is_refused_with_a_status_and_a_message_naming_the_problem(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let check = |(status, body): (StatusCode, Value), want: StatusCode, mentions: &str| {
        assert_eq!(status, want, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {body}"));
        assert!(message.contains(mentions), "{message:?} does not mention {mentions:?}");
    };
    check(app.post_raw("/v1/queues/q/messages", r#"{"messages": [{"body": 1"#).await, StatusCode::BAD_REQUEST, "malformed JSON");
    check(app.post("/v1/queues/q/messages", json!({"messages": [{"body": 1, "priority": "high"}]})).await, StatusCode::BAD_REQUEST, "priority");
    check(app.post("/v1/queues/q/messages", json!({"messages": [{"key": "k"}]})).await, StatusCode::BAD_REQUEST, "body");
    check(app.post("/v1/queues/q/messages", json!({"messages": []})).await, StatusCode::BAD_REQUEST, "messages");
    check(app.post("/v1/queues/q/messages", json!({"messages": [{"body": 1}, {"body": 2, "priority": 7}]})).await, StatusCode::BAD_REQUEST, "messages[1].priority");
    check(app.post("/v1/queues/q/messages", json!({"messages": [{"body": 1, "dedup_id": "x".repeat(200)}]})).await, StatusCode::BAD_REQUEST, "QUEUE_DEDUP_ID_BYTES_MAX");
    let too_many: Vec<Value> = (0..10_001).map(|i| json!({"body": i})).collect();
    check(app.post("/v1/queues/q/messages", json!({"messages": too_many})).await, StatusCode::PAYLOAD_TOO_LARGE, "BATCH_RECORDS_MAX");
    let huge = "x".repeat(tributary_core::limits::MESSAGE_BYTES_MAX + 1);
    check(app.post("/v1/queues/q/messages", json!({"messages": [{"body": huge}]})).await, StatusCode::PAYLOAD_TOO_LARGE, "MESSAGE_BYTES_MAX");
    check(app.post("/v1/queues/bad%20name/messages", json!({"messages": [{"body": 1}]})).await, StatusCode::BAD_REQUEST, "queue");

    check(app.post("/v1/queues/nowhere/receive", json!({"group": "g"})).await, StatusCode::NOT_FOUND, "nowhere");
    check(app.post("/v1/queues/nowhere/ack", json!({"group": "g", "receipts": ["r"]})).await, StatusCode::NOT_FOUND, "nowhere");
    check(app.get("/v1/queues/nowhere").await, StatusCode::NOT_FOUND, "nowhere");
    app.publish_bodies("q", [json!(1)]).await;
    check(app.post("/v1/queues/q/receive", json!({"group": "g", "max": 5_000})).await, StatusCode::BAD_REQUEST, "QUEUE_RECEIVE_MESSAGES_MAX");
    check(app.post("/v1/queues/q/receive", json!({"group": "g", "wait_ms": 60_000})).await, StatusCode::BAD_REQUEST, "QUEUE_RECEIVE_WAIT_MS_MAX");
    check(app.post("/v1/queues/q/receive", json!({"max": 1})).await, StatusCode::BAD_REQUEST, "group");
    check(app.post("/v1/queues/q/receive", json!({"group": "g", "lease_ms": 0})).await, StatusCode::BAD_REQUEST, "lease_ms");
    check(app.post("/v1/queues/q/ack", json!({"group": "g", "receipts": []})).await, StatusCode::BAD_REQUEST, "receipts");
    if backend.is_embedded() {
        // NATS does not look the group up on an ack (a round trip): the receipt is `invalid`.
        check(app.post("/v1/queues/q/ack", json!({"group": "unknown-group", "receipts": ["r"]})).await, StatusCode::NOT_FOUND, "unknown-group");
    }
    check(app.post("/v1/queues/q/dead-letters/redrive", json!({"group": "g", "ids": ["p9-x"]})).await, StatusCode::BAD_REQUEST, "ids[0]");
    check(app.get("/v1/queues/q/dead-letters?max=abc").await, StatusCode::BAD_REQUEST, "max");

    let errors = app.system.metrics().snapshot().errors;
    assert!(errors >= 15, "refusals are counted as errors: {errors}");
    app.stop().await;
}

async fn a_deleted_queue_is_gone_and_a_publish_creates_it_afresh(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.publish_bodies("tmp", [json!(1), json!(2)]).await;
    let (status, _) = app.send(app.client.delete(format!("{}/v1/queues/tmp", app.base))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get("/v1/queues/tmp").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(app.publish_bodies("tmp", [json!(3)]).await, vec!["p0-0"]);
    let messages = app.receive("tmp", json!({"group": "g", "max": 10})).await;
    assert_eq!(messages.iter().map(|m| m["body"].clone()).collect::<Vec<_>>(), vec![json!(3)]);
    app.stop().await;
}
