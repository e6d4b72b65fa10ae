//! Feature tests of realtime-notifications through its real HTTP, WebSocket and SSE API, on a
//! server started in-process on 127.0.0.1:0, with the log on the engine in a temporary folder or
//! on the machine's NATS JetStream ([`on_both!`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tributary_engine::Engine;

use super::{Notifications, NotificationsConfig};
use crate::test_support::{Backend, Served, on_both, until_last_handle};
use crate::System;

const WAIT: Duration = Duration::from_secs(10);

struct App {
    base: String,
    ws_base: String,
    client: reqwest::Client,
    system: Arc<Notifications>,
    engine: Arc<Engine>,
    served: Served,
}

impl App {
    async fn start(dir: &Path, backend: &Backend) -> App {
        App::start_with(dir, backend, NotificationsConfig::default()).await
    }

    async fn start_with(dir: &Path, backend: &Backend, config: NotificationsConfig) -> App {
        let engine = Arc::new(Engine::open(dir).unwrap());
        let context = backend.context(engine.clone()).await;
        let system = Notifications::open(&context, config).unwrap();
        let served = Served::start(system.clone().api()).await;
        App { base: served.base(), ws_base: served.ws_base(), client: reqwest::Client::new(), system, engine, served }
    }

    /// Stop serving and drop everything holding the engine without a clean close (only what
    /// was acknowledged is relied on afterwards).
    async fn stop(mut self) {
        self.system.shutdown();
        self.system.gateway().close();
        self.served.stop().await;
        let (system, engine) = (self.system, self.engine);
        until_last_handle(&system).await;
        drop(system);
        drop(engine);
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

    /// Publish `(topic, data)` pairs; returns their `(partition, offset)`.
    async fn publish(&self, notifications: Vec<(&str, Value)>) -> Vec<(u64, u64)> {
        let notifications: Vec<Value> = notifications.into_iter().map(|(t, d)| json!({"topic": t, "data": d})).collect();
        let (status, body) = self.call(reqwest::Method::POST, "/v1/notifications/publish", Some(json!({"notifications": notifications}))).await;
        assert_eq!(status, 201, "{body}");
        body["positions"].as_array().unwrap().iter().map(|p| (p["partition"].as_u64().unwrap(), p["offset"].as_u64().unwrap())).collect()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Connect a WebSocket; returns it after its `connected` message.
    /// GET `path` until its body satisfies `done` (another node's change arrives within
    /// moments), at most WAIT.
    async fn eventually(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.get(path).await;
            assert_eq!(status, 200, "{body}");
            if done(&body) {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "{path} still says {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ws(&self, query: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(format!("{}/v1/notifications/ws?{query}", self.ws_base)).await.unwrap();
        let mut ws = Ws { stream, token: String::new() };
        let hello = ws.next().await;
        assert!(hello.get("connected").is_some(), "{hello}");
        ws.token = hello["connected"]["token"].as_str().unwrap().to_string();
        ws
    }

    /// A WebSocket handshake that must be refused: its status and error body.
    async fn ws_refused(&self, query: &str) -> (u16, Value) {
        match tokio_tungstenite::connect_async(format!("{}/v1/notifications/ws?{query}", self.ws_base)).await {
            Ok(_) => panic!("the handshake for {query} was accepted"),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response.body().as_deref().map(|b| serde_json::from_slice(b).unwrap()).unwrap_or(Value::Null);
                (response.status().as_u16(), body)
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    async fn sse(&self, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut request = self.client.get(format!("{}/v1/notifications/events?{query}", self.base));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let mut sse = Sse { body: Box::pin(response.bytes_stream()), buffer: String::new(), token: String::new() };
        let hello = sse.next().await;
        assert_eq!(hello.event, "connected", "{hello:?}");
        sse.token = hello.id.clone().expect("the connected event carries the token as its id");
        sse
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws {
    stream: WsStream,
    /// The token of the last frame read.
    token: String,
}

/// A notification as a client sees it: `(topic, data)`.
type Got = (String, Value);

impl Ws {
    async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(WAIT, self.stream.next()).await.expect("a frame in time").expect("open").unwrap();
            if let WsMessage::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    /// The next frame of notifications (skipping nothing: any other message fails the test).
    async fn frame(&mut self) -> Vec<Got> {
        let frame = self.next().await;
        let list = frame["notifications"].as_array().unwrap_or_else(|| panic!("expected notifications, got {frame}"));
        self.token = frame["token"].as_str().unwrap().to_string();
        list.iter().map(|n| (n["topic"].as_str().unwrap().to_string(), n["data"].clone())).collect()
    }

    /// The next `n` notifications, over as many frames as they come in.
    async fn notifications(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::new();
        while out.len() < n {
            out.extend(self.frame().await);
        }
        assert_eq!(out.len(), n, "more notifications than expected: {out:?}");
        out
    }

    /// Nothing arrives within a short while.
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
    token: String,
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

    async fn notifications(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::new();
        while out.len() < n {
            let event = self.next().await;
            assert_eq!(event.event, "notifications", "{event:?}");
            let data: Value = serde_json::from_str(&event.data).unwrap();
            assert_eq!(event.id.as_deref(), data["token"].as_str(), "the event id is the frame's token");
            self.token = event.id.unwrap();
            out.extend(data["notifications"].as_array().unwrap().iter().map(|n| (n["topic"].as_str().unwrap().to_string(), n["data"].clone())));
        }
        assert_eq!(out.len(), n, "more notifications than expected: {out:?}");
        out
    }
}

fn got(topic: &str, data: Value) -> Got {
    (topic.to_string(), data)
}

on_both!(a_notification_reaches_the_connections_of_its_topic_and_no_others);
async fn a_notification_reaches_the_connections_of_its_topic_and_no_others(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut alice = app.ws("user=alice&topics=news,sport").await;
    let mut bob = app.ws("user=bob&topics=weather").await;
    let mut bob_sse = app.sse("user=bob", None).await;

    app.publish(vec![("news", json!({"n": 1})), ("weather", json!("rain")), ("finance", json!("nobody listens"))]).await;
    app.publish(vec![("user.bob", json!("for bob only")), ("sport", json!({"n": 2}))]).await;

    let alice_got = alice.notifications(2).await;
    assert_eq!(alice_got, vec![got("news", json!({"n": 1})), got("sport", json!({"n": 2}))]);
    let mut bob_got = bob.notifications(2).await;
    bob_got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(bob_got, vec![got("user.bob", json!("for bob only")), got("weather", json!("rain"))]);
    assert_eq!(bob_sse.notifications(1).await, vec![got("user.bob", json!("for bob only"))], "every connection of bob gets his personal topic");
    alice.quiet().await;
    bob.quiet().await;
}

/// On a shared log a node's follower offers what it has read so far, so one publish may reach a
/// connection in more than one frame: embedded only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_that_arrive_together_share_a_frame_within_its_limits() {
    let backend = Backend::Embedded;
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut default = app.ws("user=a&topics=news").await;
    let mut small = app.ws("user=b&topics=news&batch_max=2").await;

    let five: Vec<(&str, Value)> = (0..5).map(|i| ("news", json!(i))).collect();
    app.publish(five).await;
    assert_eq!(default.frame().await.len(), 5, "one publish of five: one frame");
    let sizes = [small.frame().await.len(), small.frame().await.len(), small.frame().await.len()];
    assert_eq!(sizes, [2, 2, 1], "batch_max bounds a frame");
}

on_both!(notifications_published_within_the_linger_time_share_a_frame);
async fn notifications_published_within_the_linger_time_share_a_frame(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut lingering = app.ws("user=c&topics=alerts&linger_ms=1000").await;
    // Three separate publishes within the linger time go out as one frame.
    for i in 0..3 {
        app.publish(vec![("alerts", json!(i))]).await;
    }
    assert_eq!(lingering.frame().await, vec![got("alerts", json!(0)), got("alerts", json!(1)), got("alerts", json!(2))]);
}

/// Many topics, so that the connection's notifications spread over every partition.
fn topics(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i}")).collect()
}

on_both!(a_reconnect_with_the_token_gets_exactly_what_was_missed_then_live);
async fn a_reconnect_with_the_token_gets_exactly_what_was_missed_then_live(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start_with(dir.path(), &backend, NotificationsConfig { partitions: 4, ..NotificationsConfig::default() }).await;
    let mine = topics(8);
    let query = format!("user=alice&topics={}", mine.join(","));
    let mut ws = app.ws(&query).await;
    let before: Vec<(&str, Value)> = mine.iter().map(|t| (t.as_str(), json!(format!("before {t}")))).collect();
    let positions = app.publish(before).await;
    let partitions: std::collections::HashSet<u64> = positions.iter().map(|p| p.0).collect();
    assert!(partitions.len() > 1, "the topics spread over several partitions: {positions:?}");
    ws.notifications(8).await;
    let token = ws.token.clone();
    drop(ws);

    // While away: 40 for alice's topics (interleaved with others), then reconnect.
    let mut missed = Vec::new();
    for round in 0..5 {
        let mut batch = Vec::new();
        for t in &mine {
            batch.push((t.as_str(), json!(format!("missed {t} {round}"))));
            batch.push(("other", json!("not alice's")));
        }
        missed.extend(batch.iter().filter(|(t, _)| *t != "other").map(|(t, d)| got(t, d.clone())));
        app.publish(batch).await;
    }
    let mut ws = app.ws(&format!("{query}&token={token}")).await;
    let mut replayed = ws.notifications(missed.len()).await;
    // Per topic the order is the publish order.
    for t in &mine {
        let of_topic: Vec<&Got> = replayed.iter().filter(|(topic, _)| topic == t).collect();
        let expected: Vec<&Got> = missed.iter().filter(|(topic, _)| topic == t).collect();
        assert_eq!(of_topic, expected);
    }
    replayed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    missed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    assert_eq!(replayed, missed, "exactly the missed ones");

    app.publish(vec![("t3", json!("live"))]).await;
    assert_eq!(ws.notifications(1).await, vec![got("t3", json!("live"))], "then live, no duplicate before it");
    ws.quiet().await;

    // The last frame's token again: nothing is missing, so nothing is replayed.
    let mut again = app.ws(&format!("{query}&token={}", ws.token)).await;
    again.quiet().await;
}

on_both!(sse_resumes_with_last_event_id_exactly);
async fn sse_resumes_with_last_event_id_exactly(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut sse = app.sse("user=bob&topics=a,b", None).await;
    app.publish(vec![("a", json!(1)), ("b", json!(2))]).await;
    sse.notifications(2).await;
    let last = sse.token.clone();
    drop(sse);
    app.publish(vec![("a", json!(3)), ("c", json!("not bob's")), ("b", json!(4))]).await;
    let mut sse = app.sse("user=bob&topics=a,b", Some(&last)).await;
    let mut resumed = sse.notifications(2).await;
    resumed.sort_by_key(|(_, d)| d.as_i64());
    assert_eq!(resumed, vec![got("a", json!(3)), got("b", json!(4))]);
    app.publish(vec![("b", json!(5))]).await;
    assert_eq!(sse.notifications(1).await, vec![got("b", json!(5))]);
}

on_both!(the_token_recovers_exactly_across_a_restart_without_a_clean_close);
async fn the_token_recovers_exactly_across_a_restart_without_a_clean_close(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let ws = app.ws("user=alice&topics=news").await;
    let token = ws.token.clone();
    drop(ws);
    let published: Vec<(&str, Value)> = (0..20).map(|i| ("news", json!(i))).collect();
    app.publish(published.clone()).await;
    app.stop().await;

    let app = App::start(dir.path(), &backend).await;
    let mut ws = app.ws(&format!("user=alice&topics=news&token={token}")).await;
    let expected: Vec<Got> = published.into_iter().map(|(t, d)| got(t, d)).collect();
    assert_eq!(ws.notifications(20).await, expected);
    app.publish(vec![("news", json!("after restart"))]).await;
    assert_eq!(ws.notifications(1).await, vec![got("news", json!("after restart"))]);
}

on_both!(a_token_older_than_retention_or_of_another_log_is_refused_explicitly);
async fn a_token_older_than_retention_or_of_another_log_is_refused_explicitly(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let config = NotificationsConfig { partitions: 1, retention_ms: None, retention_bytes: Some(8 * 1024), segment_bytes: 4096 };
    let app = App::start_with(dir.path(), &backend, config).await;
    let ws = app.ws("user=alice&topics=news").await;
    let old = ws.token.clone();
    drop(ws);
    for _ in 0..10 {
        let batch: Vec<(&str, Value)> = (0..20).map(|i| ("news", json!("x".repeat(100 + i)))).collect();
        app.publish(batch).await;
    }
    if backend.is_embedded() {
        app.engine.topics.maintain().unwrap();
    }
    let (starts, _) = app.system.log_bounds().unwrap();
    assert!(starts[0] > 0, "retention removed the oldest segments");

    let (status, body) = app.ws_refused(&format!("user=alice&topics=news&token={old}")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("resume_token_expired")), "{body}");
    let response = app.client.get(format!("{}/v1/notifications/events?user=alice&topics=news", app.base)).header("Last-Event-ID", &old).send().await.unwrap();
    assert_eq!(response.status(), 410);

    let foreign = format!("e{:x}-0", app.system.epoch() + 1);
    let (status, body) = app.ws_refused(&format!("user=alice&token={foreign}")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (410, Some("resume_token_unknown")), "{body}");
    let (status, body) = app.ws_refused("user=alice&token=garbage").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let ahead = format!("e{:x}-999999", app.system.epoch());
    let (status, _) = app.ws_refused(&format!("user=alice&token={ahead}")).await;
    assert_eq!(status, 400, "a token ahead of the log");
}

on_both!(presence_shows_who_is_connected_and_streams_join_and_leave);
async fn presence_shows_who_is_connected_and_streams_join_and_leave(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut watcher = app.ws("user=carol&topics=room&presence=true").await;
    let alice_1 = app.ws("user=alice&topics=room,lobby").await;
    let alice_2 = app.sse("user=alice&topics=room", None).await;
    let bob = app.ws("user=bob&topics=room").await;

    let mut events = Vec::new();
    while events.len() < 2 {
        let message = watcher.next().await;
        let event = &message["presence"];
        events.push((event["user"].as_str().unwrap().to_string(), event["event"].as_str().unwrap().to_string(), event["topic"].as_str().unwrap().to_string()));
    }
    assert_eq!(events, vec![("alice".into(), "join".into(), "room".into()), ("bob".into(), "join".into(), "room".into())], "one join per user, not per connection");

    let (status, room) = app.get("/v1/notifications/presence/room").await;
    assert_eq!(status, 200);
    assert_eq!((room["users"].as_u64(), room["connections"].as_u64()), (Some(3), Some(4)), "{room}");
    assert_eq!(room["members"][0], json!({"user": "alice", "connections": 2}));
    let (_, lobby) = app.get("/v1/notifications/presence/lobby").await;
    assert_eq!(lobby["users"], 1);
    let (_, alice) = app.get("/v1/notifications/users/alice").await;
    assert_eq!(alice, json!({"user": "alice", "online": true, "connections": 2}));

    drop(bob);
    let left = watcher.next().await;
    assert_eq!(left["presence"], json!({"topic": "room", "user": "bob", "event": "leave"}));
    drop(alice_1);
    drop(alice_2);
    let left = watcher.next().await;
    assert_eq!(left["presence"], json!({"topic": "room", "user": "alice", "event": "leave"}), "alice leaves once her last connection is gone");
    let (_, alice) = app.get("/v1/notifications/users/alice").await;
    assert_eq!(alice["online"], false);
    let (_, room) = app.get("/v1/notifications/presence/room").await;
    assert_eq!(room["members"], json!([{"user": "carol", "connections": 1}]));
}

on_both!(a_connection_that_falls_behind_catches_up_from_the_log_without_loss);
async fn a_connection_that_falls_behind_catches_up_from_the_log_without_loss(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    // One notification per frame and large data: the socket and the gateway's queue fill up
    // long before the client reads, so the connection's queue overflows.
    let mut slow = app.ws("user=slow&topics=firehose&batch_max=1").await;
    let total = 3_000;
    let data = "y".repeat(8 * 1024);
    for chunk in 0..(total / 500) {
        let batch: Vec<(&str, Value)> = (0..500).map(|i| ("firehose", json!({"seq": chunk * 500 + i, "pad": data}))).collect();
        app.publish(batch).await;
    }
    let status = app.system.status();
    assert!(status["queue_overflows_total"].as_u64().unwrap() > 0, "the queue overflowed: {status}");
    let got = slow.notifications(total).await;
    let seqs: Vec<u64> = got.iter().map(|(_, d)| d["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..total as u64).collect::<Vec<_>>(), "every notification, once, in order");
    slow.quiet().await;
}

on_both!(bad_input_is_refused_with_the_reason);
async fn bad_input_is_refused_with_the_reason(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let post = |body: Value| {
        let app = &app;
        async move { app.call(reqwest::Method::POST, "/v1/notifications/publish", Some(body)).await }
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"notifications": []}), 400, "at least one"),
        (json!({"notifications": [{"topic": "has space", "data": 1}]}), 400, "topic name"),
        (json!({"notifications": [{"topic": "", "data": 1}]}), 400, "topic name"),
        (json!({"notifications": [{"topic": "ok", "data": 1, "extra": true}]}), 400, "unknown field"),
        (json!({"notifications": [{"topic": "ok", "data": "z".repeat(70_000)}]}), 413, "NOTIFICATION_BYTES_MAX"),
        (json!({"notifications": (0..10_001).map(|_| json!({"topic": "t", "data": 0})).collect::<Vec<_>>()}), 413, "PUBLISH_BATCH_MAX"),
    ];
    for (body, status, words) in cases {
        let (got_status, got_body) = post(body).await;
        let message = got_body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(got_status, status, "{got_body}");
        assert!(message.contains(words), "{message:?} should say {words:?}");
    }
    let many = topics(101).join(",");
    let refused: Vec<(String, u16, &str)> = vec![
        ("topics=news".into(), 400, "name the connecting user"),
        ("user=a%20b".into(), 400, "user name"),
        ("user=alice&topics=user.bob".into(), 403, "personal topic of another user"),
        ("user=alice&batch_max=0".into(), 400, "batch_max"),
        ("user=alice&batch_max=1001".into(), 400, "FRAME_NOTIFICATIONS_MAX"),
        ("user=alice&linger_ms=5000".into(), 400, "LINGER_MS_MAX"),
        ("user=alice&presence=maybe".into(), 400, "presence"),
        (format!("user=alice&topics={many}"), 413, "TOPICS_PER_CONNECTION_MAX"),
    ];
    for (query, status, words) in refused {
        let (got_status, body) = app.ws_refused(&query).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(got_status, status, "{query}: {body}");
        assert!(message.contains(words), "{query}: {message:?} should say {words:?}");
    }
    let (status, _) = app.get("/v1/notifications/presence/bad%20topic").await;
    assert_eq!(status, 400);

    // A client frame on a WebSocket gets an error and the stream goes on.
    let mut ws = app.ws("user=alice&topics=news").await;
    use futures_util::SinkExt;
    ws.stream.send(WsMessage::Text(r#"{"subscribe":"x"}"#.into())).await.unwrap();
    assert_eq!(ws.next().await["error"]["code"], "bad_request");
    app.publish(vec![("news", json!("still here"))]).await;
    assert_eq!(ws.notifications(1).await, vec![got("news", json!("still here"))]);
}

on_both!(the_user_can_be_named_by_header_and_the_status_counts_connections);
async fn the_user_can_be_named_by_header_and_the_status_counts_connections(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("{}/v1/notifications/ws?topics=news", app.ws_base)).unwrap();
    request.headers_mut().insert("Tributary-User", "dave".parse().unwrap());
    let (mut stream, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hello = tokio::time::timeout(WAIT, stream.next()).await.unwrap().unwrap().unwrap();
    let hello: Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
    assert_eq!(hello["connected"]["user"], "dave");
    assert_eq!(hello["connected"]["topics"], json!(["news", "user.dave"]));
    let status = app.system.status();
    assert_eq!(status["connections"], 1);
    assert_eq!(status["users_online"], 1);
    let counts: HashMap<String, Value> = serde_json::from_value(app.system.gateway().stats().by_system.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>().into()).unwrap();
    assert_eq!(counts.get(super::ID), Some(&json!(1)));
}

/// A failed append resynchronises a partition of the engine's own log; a shared log's follower
/// reads every offset: embedded only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_is_resynchronised_connections_catch_up_from_the_log_exactly() {
    let backend = Backend::Embedded;
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut ws = app.ws("user=alice&topics=news").await;
    app.publish(vec![("news", json!(1))]).await;
    assert_eq!(ws.notifications(1).await, vec![got("news", json!(1))]);
    // What a failed append does: every connection is sent to the log from its own position.
    let (partition, _) = app.publish(vec![("news", json!(2)), ("news", json!(3))]).await[0];
    app.system.skip_to_log(partition as u32);
    app.publish(vec![("news", json!(4))]).await;
    let mut got_all = Vec::new();
    while got_all.len() < 3 {
        got_all.extend(ws.frame().await);
    }
    assert_eq!(got_all, vec![got("news", json!(2)), got("news", json!(3)), got("news", json!(4))], "no gap, no duplicate");
    ws.quiet().await;
}

/// Two nodes on one shared log and cache: a publish through either reaches the connections of
/// both, presence counts both, and a token from one node resumes exactly on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_shared_log_serve_the_same_notifications() {
    let backend = Backend::nats();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = NotificationsConfig { partitions: 2, ..NotificationsConfig::default() };
    let a = App::start_with(dir_a.path(), &backend, config.clone()).await;
    let b = App::start_with(dir_b.path(), &backend, config).await;
    assert_eq!(a.system.epoch(), b.system.epoch(), "one log, one epoch");

    let mut on_a = a.ws("user=alice&topics=news").await;
    let mut on_b = b.ws("user=bob&topics=news").await;
    a.publish(vec![("news", json!(1)), ("user.bob", json!("for bob"))]).await;
    b.publish(vec![("news", json!(2))]).await;
    assert_eq!(on_a.notifications(2).await, vec![got("news", json!(1)), got("news", json!(2))]);
    let mut bob_got = on_b.notifications(3).await;
    bob_got.sort_by_key(|(topic, data)| (topic.clone(), data.to_string()));
    assert_eq!(bob_got, vec![got("news", json!(1)), got("news", json!(2)), got("user.bob", json!("for bob"))]);

    // Presence is counted across nodes through the shared cache: each node lists both users.
    for node in [&a, &b] {
        let news = node.eventually("/v1/notifications/presence/news", |news| news["users"] == 2).await;
        assert_eq!(news["members"], json!([{"user": "alice", "connections": 1}, {"user": "bob", "connections": 1}]));
    }
    drop(on_b);
    let bob = a.eventually("/v1/notifications/users/bob", |bob| bob["online"] == false).await;
    assert_eq!(bob["connections"], 0);

    // Alice leaves node A; what is published meanwhile is replayed on node B from A's token.
    let token = on_a.token.clone();
    drop(on_a);
    let missed: Vec<(&str, Value)> = (3..13).map(|i| ("news", json!(i))).collect();
    b.publish(missed.clone()).await;
    let mut moved = b.ws(&format!("user=alice&topics=news&token={token}")).await;
    assert_eq!(moved.notifications(10).await, missed.into_iter().map(|(t, d)| got(t, d)).collect::<Vec<_>>());
    a.publish(vec![("news", json!("live"))]).await;
    assert_eq!(moved.notifications(1).await, vec![got("news", json!("live"))]);
    moved.quiet().await;
    a.stop().await;
    b.stop().await;
    backend.forget().await;
}
