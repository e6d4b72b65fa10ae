//! Feature tests of simple-pubsub through its real HTTP, WebSocket and SSE API, on a server
//! started in-process on 127.0.0.1:0. Each runs twice (`test_support::on_both!`): with the log
//! and registry in the engine of a temporary folder, and on the machine's NATS JetStream, where
//! the node's tailer fans the shared log out.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tributary_engine::Engine;
use tributary_server::ServerConfig;

use super::SimplePubsub;
use crate::System;
use crate::test_support::{Backend, on_both};

const WAIT: Duration = Duration::from_secs(10);

struct App {
    base: String,
    ws_base: String,
    client: reqwest::Client,
    system: Arc<SimplePubsub>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl App {
    async fn start(dir: &Path, backend: &Backend) -> App {
        let engine = Arc::new(Engine::open(dir).unwrap());
        let context = backend.context(engine).await;
        let system = SimplePubsub::open(&context).unwrap();
        let app = tributary_server::router(&ServerConfig::default(), vec![system.clone().api()], Router::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        App {
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            client: reqwest::Client::new(),
            system,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stop serving and drop everything holding the engine, without a clean close (as after a
    /// SIGKILL, nothing but what was acknowledged is relied on).
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
        let system = self.system;
        system.shutdown();
        for _ in 0..100 {
            if Arc::strong_count(&system) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(system);
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn publish(&self, messages: Vec<(&str, Value)>) -> Vec<u64> {
        let messages: Vec<Value> = messages.into_iter().map(|(s, d)| json!({"subject": s, "data": d})).collect();
        let (status, body) = self.call(reqwest::Method::POST, "/v1/pubsub/publish", Some(json!({"messages": messages}))).await;
        assert_eq!(status, 201, "{body}");
        body["offsets"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect()
    }

    async fn put(&self, name: &str, spec: Value) {
        let (status, body) = self.call(reqwest::Method::PUT, &format!("/v1/pubsub/subscriptions/{name}"), Some(spec)).await;
        assert!(status == 201 || status == 200, "{status} {body}");
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn ws(&self, path: &str) -> Ws {
        let (mut stream, _) = tokio_tungstenite::connect_async(format!("{}{path}", self.ws_base)).await.unwrap();
        let hello = next_frame(&mut stream).await;
        assert!(hello.get("subscribed").is_some(), "{hello}");
        Ws { stream }
    }

    async fn sse(&self, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut sse = Sse { body: Box::pin(response.bytes_stream()), buffer: String::new() };
        let hello = sse.next().await;
        assert_eq!(hello.event, "subscribed", "{hello:?}");
        sse
    }
}

on_both!(subscribers_receive_exactly_what_their_topics_and_wildcards_match);
on_both!(the_registry_survives_a_restart_without_a_clean_close);
on_both!(members_of_a_group_share_the_stream_each_message_to_one);
on_both!(drop_oldest_keeps_the_newest_and_counts_what_it_dropped);
on_both!(disconnect_closes_a_slow_subscriber_with_its_reason);
on_both!(catch_up_recovers_every_message_from_the_log_then_rejoins_live);
on_both!(a_websocket_resumes_from_an_offset_with_no_gap_and_no_duplicate);
on_both!(sse_resumes_after_the_last_event_id_with_no_gap_and_no_duplicate);
on_both!(a_newer_connection_takes_over_a_named_subscription);
on_both!(bad_input_is_refused_with_the_reason);
on_both!(registers_many_subscriptions_in_batches_and_still_delivers);

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws {
    stream: WsStream,
}

async fn next_frame(stream: &mut WsStream) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, stream.next()).await.expect("a frame in time").expect("open").unwrap();
        if let WsMessage::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

impl Ws {
    async fn next(&mut self) -> Value {
        next_frame(&mut self.stream).await
    }

    /// The offsets of the next `n` messages.
    async fn offsets(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let frame = self.next().await;
            assert!(frame.get("offset").is_some(), "expected a message, got {frame}");
            out.push(frame["offset"].as_u64().unwrap());
        }
        out
    }

    async fn credit(&mut self, n: u64) {
        self.stream.send(WsMessage::Text(json!({"credit": n}).to_string().into())).await.unwrap();
    }

    /// Nothing more arrives within a short while.
    async fn quiet(&mut self) {
        if let Ok(Some(Ok(WsMessage::Text(text)))) = tokio::time::timeout(Duration::from_millis(300), self.stream.next()).await {
            panic!("expected nothing more, got {text}");
        }
    }
}

#[derive(Debug, Default)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: String,
}

struct Sse {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Sse {
    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent { event: "message".into(), ..SseEvent::default() };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.data.push_str(v.trim_start());
                        any = true;
                    }
                }
                if any {
                    return event;
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next()).await.expect("an event in time").expect("open").unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    async fn offsets(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let event = self.next().await;
            assert_eq!(event.event, "message", "{event:?}");
            let data: Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(event.id.as_deref(), Some(data["offset"].to_string().as_str()));
            out.push(data["offset"].as_u64().unwrap());
        }
        out
    }
}

async fn subscribers_receive_exactly_what_their_topics_and_wildcards_match(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("orders", json!({"patterns": ["orders.*.created", "billing.>"]})).await;
    let mut named = app.ws("/v1/pubsub/subscriptions/orders/ws").await;
    let mut mqtt = app.ws("/v1/pubsub/ws?patterns=sensors/%2B/temp,alarms/%23").await;
    let mut all_orders = app.sse("/v1/pubsub/events?patterns=orders.>", None).await;

    let published = app
        .publish(vec![
            ("orders.eu.created", json!({"id": 1})),
            ("orders.eu.updated", json!({"id": 1})),
            ("billing.invoice.paid", json!({"n": 2})),
            ("sensors/a/temp", json!(21.5)),
            ("sensors.a.humidity", json!(40)),
            ("alarms", json!("parent of alarms/#")),
            ("alarms.fire.floor1", json!("on")),
            ("orders.us.created", json!({"id": 3})),
            ("orders.us.eu.created", json!("too deep for *")),
        ])
        .await;
    assert_eq!(published, (0..9).collect::<Vec<u64>>());

    let first = named.next().await;
    assert_eq!(first, json!({"offset": 0, "subject": "orders.eu.created", "data": {"id": 1}}));
    assert_eq!(named.offsets(2).await, vec![2, 7]);
    named.quiet().await;
    assert_eq!(mqtt.offsets(3).await, vec![3, 5, 6]);
    mqtt.quiet().await;
    assert_eq!(all_orders.offsets(4).await, vec![0, 1, 7, 8]);

    let (status, one) = app.get("/v1/pubsub/subscriptions/orders").await;
    assert_eq!(status, 200);
    assert_eq!(one["connected"], true);
    assert_eq!(one["last_delivered_offset"], 7);
    assert_eq!(one["lag"], 1);
    let status = app.system.status();
    assert_eq!(status["published_total"], 9);
    assert_eq!(status["log_end_offset"], 9);
    assert_eq!(status["connected_subscribers"], 3);
}

async fn the_registry_survives_a_restart_without_a_clean_close(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("keep", json!({"patterns": ["a.>"], "policy": "catch_up", "buffer": 16})).await;
    app.put("gone", json!({"patterns": ["b.*"]})).await;
    let batch: Vec<Value> = (0..3).map(|i| json!({"name": format!("bulk-{i}"), "patterns": [format!("c.{i}"), "sensors/#"], "group": "g"})).collect();
    let (status, body) = app.call(reqwest::Method::POST, "/v1/pubsub/subscriptions:batch", Some(json!({"subscriptions": batch}))).await;
    assert_eq!((status, body["registered"].as_u64()), (201, Some(3)));
    let (status, _) = app.call(reqwest::Method::DELETE, "/v1/pubsub/subscriptions/gone", None).await;
    assert_eq!(status, 204);
    app.publish(vec![("a.before", json!(0))]).await;
    app.stop().await;

    let app = App::start(dir.path(), &backend).await;
    let (_, list) = app.get("/v1/pubsub/subscriptions").await;
    assert_eq!(list["total"], 4);
    let names: Vec<&str> = list["subscriptions"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["bulk-0", "bulk-1", "bulk-2", "keep"]);
    let (_, keep) = app.get("/v1/pubsub/subscriptions/keep").await;
    assert_eq!((keep["policy"].as_str(), keep["buffer"].as_u64(), keep["log_end_offset"].as_u64()), (Some("catch_up"), Some(16), Some(1)));
    assert_eq!(list["subscriptions"][0]["patterns"], json!(["c.0", "sensors/#"]));
    assert_eq!(app.get("/v1/pubsub/subscriptions/gone").await.0, 404);

    let mut ws = app.ws("/v1/pubsub/subscriptions/keep/ws?from_offset=0").await;
    app.publish(vec![("a.after", json!(1))]).await;
    assert_eq!(ws.offsets(2).await, vec![0, 1]);
}

async fn members_of_a_group_share_the_stream_each_message_to_one(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("worker-1", json!({"patterns": ["jobs.>"], "group": "workers"})).await;
    app.put("worker-2", json!({"patterns": ["jobs.>"], "group": "workers"})).await;
    let mut one = app.ws("/v1/pubsub/subscriptions/worker-1/ws").await;
    let mut two = app.ws("/v1/pubsub/subscriptions/worker-2/ws").await;
    let offsets = app.publish((0..20).map(|i| ("jobs.resize", json!(i))).collect()).await;
    assert_eq!(offsets.len(), 20);
    let mut got = one.offsets(10).await;
    got.extend(two.offsets(10).await);
    one.quiet().await;
    two.quiet().await;
    got.sort_unstable();
    assert_eq!(got, offsets, "each message went to exactly one member");
}

async fn drop_oldest_keeps_the_newest_and_counts_what_it_dropped(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("prices", json!({"patterns": ["prices.>"], "policy": "drop_oldest", "buffer": 5})).await;
    app.publish((0..20).map(|i| ("prices.acme", json!(i))).collect()).await;
    let (_, view) = app.get("/v1/pubsub/subscriptions/prices").await;
    assert_eq!(view["connected"], false);
    assert_eq!(view["subscribers"][0]["dropped"], 15);
    assert_eq!(view["subscribers"][0]["buffered"], 5);
    assert_eq!(view["lag"], 20);
    let mut ws = app.ws("/v1/pubsub/subscriptions/prices/ws").await;
    assert_eq!(ws.offsets(5).await, vec![15, 16, 17, 18, 19]);
    let (_, view) = app.get("/v1/pubsub/subscriptions/prices").await;
    assert_eq!((view["connected"].as_bool(), view["lag"].as_u64(), view["subscribers"][0]["state"].as_str()), (Some(true), Some(0), Some("active")));
}

async fn disconnect_closes_a_slow_subscriber_with_its_reason(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("strict", json!({"patterns": ["ticks"], "policy": "disconnect", "buffer": 3})).await;
    let mut ws = app.ws("/v1/pubsub/subscriptions/strict/ws?credit=0").await;
    app.publish(vec![("ticks", json!(0))]).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the pump now holds offset 0, waiting for credit
    app.publish((1..10).map(|i| ("ticks", json!(i))).collect()).await;
    let (_, view) = app.get("/v1/pubsub/subscriptions/strict").await;
    assert_eq!(view["subscribers"][0]["state"], "disconnected");
    assert_eq!(view["subscribers"][0]["reason"], "slow_consumer");
    ws.credit(100).await;
    assert_eq!(ws.offsets(4).await, vec![0, 1, 2, 3]);
    let closed = ws.next().await;
    assert_eq!(closed["closed"]["reason"], "slow_consumer", "{closed}");
    assert_eq!(closed["closed"]["last_offset"], 3);
    // Reconnecting from the last offset gets the rest from the log.
    let mut again = app.ws("/v1/pubsub/subscriptions/strict/ws?from_offset=4").await;
    assert_eq!(again.offsets(6).await, vec![4, 5, 6, 7, 8, 9]);
}

async fn catch_up_recovers_every_message_from_the_log_then_rejoins_live(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("ledger", json!({"patterns": ["ledger.*", "audit.>"], "policy": "catch_up", "buffer": 4})).await;
    let mut ws = app.ws("/v1/pubsub/subscriptions/ledger/ws?credit=1").await;
    let mut expected = Vec::new();
    for round in 0..5 {
        let batch: Vec<(&str, Value)> = (0..20).map(|i| (if i % 3 == 0 { "audit.x.y" } else if i % 3 == 1 { "ledger.entry" } else { "noise.z" }, json!([round, i]))).collect();
        let offsets = app.publish(batch).await;
        expected.extend(offsets.into_iter().enumerate().filter(|(i, _)| i % 3 != 2).map(|(_, o)| o));
    }
    let (_, view) = app.get("/v1/pubsub/subscriptions/ledger").await;
    assert!(view["subscribers"].as_array().unwrap().iter().any(|s| s["state"] == "lagging"), "{view}");
    ws.credit(10_000).await;
    assert_eq!(ws.offsets(expected.len()).await, expected);
    let live = app.publish(vec![("ledger.entry", json!("live"))]).await;
    assert_eq!(ws.offsets(1).await, live);
    ws.quiet().await;
    let (_, view) = app.get("/v1/pubsub/subscriptions/ledger").await;
    assert!(view["subscribers"].as_array().unwrap().iter().all(|s| s["state"] == "active"), "{view}");
}

async fn a_websocket_resumes_from_an_offset_with_no_gap_and_no_duplicate(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = Arc::new(App::start(dir.path(), &backend).await);
    app.put("feed", json!({"patterns": ["feed.>"]})).await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let offsets = app.publish(vec![(if i % 2 == 0 { "feed.item" } else { "other" }, json!(i))]).await;
        if i % 2 == 0 {
            expected.extend(offsets);
        }
    }
    let mut ws = app.ws("/v1/pubsub/subscriptions/feed/ws").await;
    let seen = ws.offsets(15).await;
    assert_eq!(seen, expected);
    drop(ws);
    // While disconnected, more is published; then resume after the 5th message while publishing
    // goes on concurrently.
    for i in 0..10 {
        expected.extend(app.publish(vec![("feed.item", json!(i))]).await);
    }
    let resume_at = expected[5];
    let publisher = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut more = Vec::new();
            for i in 0..40 {
                more.extend(app.publish(vec![("feed.item", json!(i)), ("other", json!(i))]).await.into_iter().step_by(2));
            }
            more
        })
    };
    let mut ws = app.ws(&format!("/v1/pubsub/subscriptions/feed/ws?from_offset={resume_at}")).await;
    let more = publisher.await.unwrap();
    expected.extend(more);
    let want: Vec<u64> = expected.iter().copied().filter(|o| *o >= resume_at).collect();
    assert_eq!(ws.offsets(want.len()).await, want);
    ws.quiet().await;
}

async fn sse_resumes_after_the_last_event_id_with_no_gap_and_no_duplicate(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("news", json!({"patterns": ["news.*"]})).await;
    let mut sse = app.sse("/v1/pubsub/subscriptions/news/events", None).await;
    let first = app.publish((0..6).map(|i| (if i == 2 { "sport.x" } else { "news.world" }, json!(i))).collect()).await;
    assert_eq!(sse.offsets(3).await, vec![first[0], first[1], first[3]]);
    drop(sse);
    let second = app.publish((0..4).map(|i| ("news.local", json!(i))).collect()).await;
    let last_id = first[3].to_string();
    let mut sse = app.sse("/v1/pubsub/subscriptions/news/events", Some(&last_id)).await;
    let mut want = vec![first[4], first[5]];
    want.extend(second);
    assert_eq!(sse.offsets(want.len()).await, want);
    let live = app.publish(vec![("news.late", json!("live"))]).await;
    assert_eq!(sse.offsets(1).await, live);
}

async fn a_newer_connection_takes_over_a_named_subscription(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.put("session", json!({"patterns": ["s.>"]})).await;
    let mut old = app.ws("/v1/pubsub/subscriptions/session/ws").await;
    let mut new = app.ws("/v1/pubsub/subscriptions/session/ws").await;
    let closed = old.next().await;
    assert_eq!(closed["closed"]["reason"], "taken_over", "{closed}");
    let offsets = app.publish(vec![("s.a", json!(1))]).await;
    assert_eq!(new.offsets(1).await, offsets);
}

async fn bad_input_is_refused_with_the_reason(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let post = reqwest::Method::POST;
    let put = reqwest::Method::PUT;
    let cases: Vec<(reqwest::Method, String, Option<Value>, u16, &str)> = vec![
        (post.clone(), "/v1/pubsub/publish".into(), Some(json!({"messages": [{"subject": "orders.*", "data": 1}]})), 400, "wildcards are for subscriptions"),
        (post.clone(), "/v1/pubsub/publish".into(), Some(json!({"messages": [{"subject": "a..b", "data": 1}]})), 400, "empty token"),
        (post.clone(), "/v1/pubsub/publish".into(), Some(json!({"messages": []})), 400, "at least one"),
        (post.clone(), "/v1/pubsub/publish".into(), Some(json!({"messages": [{"subject": "big", "data": "x".repeat(1024 * 1024 + 1)}]})), 413, "MESSAGE_BYTES_MAX"),
        (post.clone(), "/v1/pubsub/topics/a.*".into(), Some(json!(1)), 400, "wildcards"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": ["orders.>.x"]})), 400, "> may only be the last token"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": ["a/#/b"]})), 400, "# must be the whole last level"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": []})), 400, "at least one pattern"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": ["a"], "policy": "sometimes"})), 400, "policy"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": ["a"], "buffer": 0})), 400, "SUBSCRIBER_BUFFER_MESSAGES_MAX"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": ["a"], "group": "no spaces"})), 400, "group"),
        (put.clone(), "/v1/pubsub/subscriptions/bad%20name".into(), Some(json!({"patterns": ["a"]})), 400, "subscription name"),
        (put.clone(), "/v1/pubsub/subscriptions/s".into(), Some(json!({"patterns": vec!["a"; 10_001]})), 400, "SUBSCRIPTIONS_PER_CONNECTION_MAX"),
        (reqwest::Method::GET, "/v1/pubsub/subscriptions/nobody".into(), None, 404, "nobody"),
        (reqwest::Method::DELETE, "/v1/pubsub/subscriptions/nobody".into(), None, 404, "nobody"),
        (reqwest::Method::GET, "/v1/pubsub/subscriptions/nobody/events".into(), None, 404, "nobody"),
        (reqwest::Method::GET, "/v1/pubsub/events".into(), None, 400, "at least one pattern"),
        (reqwest::Method::GET, "/v1/pubsub/events?patterns=a.>.b".into(), None, 400, "> may only be the last token"),
        (reqwest::Method::GET, "/v1/pubsub/events?patterns=a&from_offset=soon".into(), None, 400, "from_offset"),
        (reqwest::Method::GET, "/v1/pubsub/events?patterns=a&policy=never".into(), None, 400, "policy"),
    ];
    for (method, path, body, status, reason) in cases {
        let (got, answer) = app.call(method.clone(), &path, body).await;
        assert_eq!(got, status, "{method} {path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{method} {path}: {message:?} should mention {reason:?}");
    }
    // Nothing was registered or published by the refused requests.
    assert_eq!(app.get("/v1/pubsub/subscriptions").await.1["total"], 0);
    assert_eq!(app.system.log_end(), 0);
}

/// `PUBSUB_SUBSCRIPTIONS=1000000 cargo test -p tributary-systems registers_many -- --nocapture`
/// measures the million; by default a small number proves the path.
async fn registers_many_subscriptions_in_batches_and_still_delivers(backend: Backend) {
    use super::scenario;
    let count: usize = std::env::var("PUBSUB_SUBSCRIPTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000);
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut i = 0;
    while i < count {
        let n = scenario::REGISTER_BATCH.min(count - i);
        let batch: Vec<Value> = (i..i + n).map(|k| json!({"name": format!("sub-{k:07}"), "patterns": [scenario::pattern(k)]})).collect();
        let (status, body) = app.call(reqwest::Method::POST, "/v1/pubsub/subscriptions:batch", Some(json!({"subscriptions": batch}))).await;
        assert_eq!(status, 201, "{body}");
        i += n;
    }
    let registered_in = started.elapsed();
    let rss_after = rss_bytes();
    assert_eq!(app.system.subscriptions_count(), count);
    assert_eq!(app.system.broker().subscriptions(), count);

    // A publish to one topic reaches its literal and wildcard subscribers through the trie.
    let mut ws = app.ws("/v1/pubsub/subscriptions/sub-0000001/ws").await;
    let started = Instant::now();
    let offsets = app.publish(vec![(&scenario::subject(1), json!("hello"))]).await;
    let published_in = started.elapsed();
    assert_eq!(ws.offsets(1).await, offsets);
    let per_sub = rss_after.saturating_sub(rss_before) as f64 / count as f64;
    eprintln!(
        "{count} subscriptions registered in {registered_in:?} ({:.0}/s); RSS {:.1} MiB -> {:.1} MiB ({per_sub:.0} B per subscription); a publish matched and fanned out in {published_in:?}",
        count as f64 / registered_in.as_secs_f64(),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
    );
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
}

/// Two nodes on one NATS namespace: a subscription registered through one is served by the
/// other, and what is published through either reaches the subscribers of both, in one offset
/// order; a deletion through one closes the other's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_shared_log_serve_the_same_subscriptions() {
    let backend = Backend::nats();
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = App::start(one.path(), &backend).await;
    let b = App::start(two.path(), &backend).await;
    a.put("orders", json!({"patterns": ["orders.>"]})).await;
    let mut on_b = b.ws("/v1/pubsub/subscriptions/orders/ws").await;
    let mut on_a = a.ws("/v1/pubsub/ws?patterns=orders.%3E").await;
    let mut sse_b = b.sse("/v1/pubsub/events?patterns=orders.us", None).await;
    let mut offsets = a.publish(vec![("orders.eu", json!(1)), ("noise", json!(0))]).await;
    offsets.extend(b.publish(vec![("orders.us", json!(2))]).await);
    let wanted = vec![offsets[0], offsets[2]];
    assert_eq!(on_b.offsets(2).await, wanted);
    assert_eq!(on_a.offsets(2).await, wanted);
    assert_eq!(sse_b.offsets(1).await, vec![offsets[2]]);

    let (status, _) = a.call(reqwest::Method::DELETE, "/v1/pubsub/subscriptions/orders", None).await;
    assert_eq!(status, 204);
    let closed = on_b.next().await;
    assert_eq!(closed["closed"]["reason"], "deleted", "{closed}");
    drop((on_a, on_b, sse_b));
    a.stop().await;
    b.stop().await;
    backend.forget().await;
}
