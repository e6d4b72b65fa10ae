//! Feature tests of notification-fanout through its HTTP API, with real HTTP providers started by
//! each test (an axum server on a loopback port whose providers answer 200, 500, 4xx or slowly,
//! and check signatures), the inbox over a real WebSocket and SSE, and the email leg through the
//! email-queue-system's HTTP API to an aiosmtpd relay ([`crate::test_support::SmtpRelay`]). Each
//! runs on the embedded engine and on the machine's NATS JetStream with PostgreSQL ([`on_both!`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Path as AxumPath;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tributary_engine::Engine;
use tributary_server::ServerConfig;

use super::Fanout;
use crate::test_support::{Backend, SmtpRelay, on_both};
use crate::System;

const SECRET: &str = "provider-secret";

/// How a test provider answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ok,
    /// 500 to everything.
    Fail,
    /// Answers 200 after 2 s (beyond the configured timeout).
    Slow,
    /// 400 for users whose id starts with `bad`, 200 otherwise.
    RejectBad,
}

/// A POST a provider got.
#[derive(Clone, Debug)]
struct Got {
    provider: String,
    body: Value,
    at: Instant,
    /// What the provider answered.
    status: u16,
}

/// The providers: one axum server, a provider per path `/p/{name}`.
struct Providers {
    base: String,
    modes: Arc<Mutex<HashMap<String, Mode>>>,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Providers {
    async fn start(modes: &[(&str, Mode)]) -> Providers {
        let modes = Arc::new(Mutex::new(modes.iter().map(|(n, m)| (n.to_string(), *m)).collect::<HashMap<_, _>>()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (answers, taken) = (modes.clone(), got.clone());
        let app = Router::new().route(
            "/p/{name}",
            axum::routing::post(move |AxumPath(name): AxumPath<String>, headers: HeaderMap, body: Bytes| {
                let (answers, taken) = (answers.clone(), taken.clone());
                async move {
                    let signature = headers.get(tributary_server::webhook::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let now = tributary_core::now_ms() as u64;
                    assert!(tributary_server::webhook::verify_signature(SECRET.as_bytes(), &signature, &body, now, 60_000), "bad signature {signature:?}");
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let mode = answers.lock().get(&name).copied().unwrap_or(Mode::Ok);
                    let status = match mode {
                        Mode::Ok | Mode::Slow => AxumStatus::OK,
                        Mode::Fail => AxumStatus::INTERNAL_SERVER_ERROR,
                        Mode::RejectBad if body["user"].as_str().unwrap_or_default().starts_with("bad") => AxumStatus::BAD_REQUEST,
                        Mode::RejectBad => AxumStatus::OK,
                    };
                    taken.lock().push(Got { provider: name, body, at: Instant::now(), status: status.as_u16() });
                    if mode == Mode::Slow {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    status
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Providers { base, modes, got }
    }

    fn spec(&self, name: &str, rate: Option<Value>) -> Value {
        let mut spec = json!({"name": name, "url": format!("{}/p/{name}", self.base), "secret": SECRET});
        if let Some(rate) = rate {
            spec["rate"] = rate;
        }
        spec
    }

    fn got_by(&self, provider: &str) -> Vec<Got> {
        self.got.lock().iter().filter(|g| g.provider == provider).cloned().collect()
    }

    fn delivered_to(&self, user: &str) -> Vec<Got> {
        self.got.lock().iter().filter(|g| g.body["user"] == user).cloned().collect()
    }
}

/// One running app over a data folder: notification-fanout, and email-queue-system when asked.
struct App {
    base: String,
    client: reqwest::Client,
    system: Arc<Fanout>,
    email: Option<Arc<dyn System>>,
    engine: Arc<Engine>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl App {
    async fn start(dir: &Path, with_email: bool, backend: &Backend) -> App {
        // After a simulated crash, a worker's blocking call (a long poll) may still hold a queue
        // of the dropped engine until its wait ends; a crashed process would have no such thread.
        // So a folder still locked is tried again for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let engine = loop {
            let data = dir.to_path_buf();
            match tokio::task::spawn_blocking(move || Engine::open(data)).await.unwrap() {
                Ok(engine) => break Arc::new(engine),
                Err(error) if format!("{error:?}").contains("Locked(") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("opening the engine: {error}"),
            }
        };
        let context = backend.context(engine.clone()).await;
        let system = Fanout::open(&context).unwrap();
        let email = with_email.then(|| {
            let entry = crate::entries().into_iter().find(|e| e.id == "email-queue-system").expect("email-queue-system is registered");
            (entry.start)(&context).unwrap()
        });
        let mut apis = vec![system.clone().api()];
        if let Some(email) = &email {
            apis.push(email.clone().api());
        }
        let app = tributary_server::router(&ServerConfig::default(), apis, Router::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        App { base, client: reqwest::Client::new(), system, email, engine, stop, server }
    }

    /// Stop the workers and the server; with `clean`, close the engine too. Without, the
    /// workers are aborted wherever they are and the engine is dropped unclosed (a crash).
    async fn stop(self, clean: bool) {
        let App { client, system, email, engine, stop, server, .. } = self;
        drop(client);
        if clean {
            system.shutdown();
            system.stopped().await;
        } else {
            // The expanders' threads end after the step they are in; the leases they held are
            // not handed back (a new node waits for them to run out).
            system.stopping.store(true, std::sync::atomic::Ordering::Release);
            for task in std::mem::take(&mut *system.tasks.lock()) {
                task.abort();
            }
        }
        if let Some(email) = &email {
            email.shutdown();
            email.stopped().await;
        }
        system.gateway().close();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        drop(system);
        drop(email);
        let mut engine = engine;
        let deadline = Instant::now() + Duration::from_secs(10);
        let engine = loop {
            match Arc::try_unwrap(engine) {
                Ok(engine) => break engine,
                Err(shared) if Instant::now() < deadline => {
                    engine = shared;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => panic!("the engine is still shared after the system stopped"),
            }
        };
        if clean {
            tokio::task::spawn_blocking(move || engine.close()).await.unwrap().unwrap();
        } else {
            drop(engine);
        }
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")) };
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(self.client.get(format!("{}{path}", self.base))).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(self.client.post(format!("{}{path}", self.base)).json(&body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(self.client.put(format!("{}{path}", self.base)).json(&body)).await
    }

    /// Configure with fast retries, plus `extra`.
    async fn configure(&self, extra: Value) {
        let mut config = json!({"retry": {"attempts": 3, "base_ms": 50, "max_ms": 200}, "provider_timeout_ms": 500});
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        let (status, body) = self.put("/v1/fanout/config", config).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    async fn subscriber(&self, id: &str, body: Value) {
        let (status, answer) = self.put(&format!("/v1/fanout/subscribers/{id}"), body).await;
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status} {answer}");
    }

    /// A subscriber with every contact.
    async fn reachable(&self, id: &str) {
        self.subscriber(id, json!({"email": format!("{id}@example.org"), "phone": "+4915112345678", "push_tokens": [format!("device-{id}")]})).await;
    }

    /// Trigger one notification; its id.
    async fn trigger(&self, notification: Value) -> String {
        let (status, body) = self.post("/v1/fanout/notifications", json!({"notifications": [notification]})).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["notifications"][0]["id"].as_str().unwrap().to_string()
    }

    /// Wait until delivery `id` reads `wanted`; its state.
    async fn wait_for(&self, id: &str, wanted: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.get(&format!("/v1/fanout/deliveries/{id}")).await;
            if status == StatusCode::OK && body["status"] == wanted {
                return body;
            }
            assert!(Instant::now() < deadline, "delivery {id} never became {wanted}: {status} {body:#}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait until notification `id` is expanded and every delivery is in a final state.
    async fn settled(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.get(&format!("/v1/fanout/notifications/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let counts = body["counts"].as_object().unwrap();
            let open = ["queued", "deferred", "batched", "retrying"].iter().any(|s| counts.get(*s).is_some_and(|n| n.as_u64() > Some(0)));
            if body["expanded"] == true && !open {
                return body;
            }
            assert!(Instant::now() < deadline, "notification {id} never settled: {body:#}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn delivery(notification: &str, channel: &str, user: &str) -> String {
    format!("{notification}.{channel}.{user}")
}

fn history(state: &Value) -> Vec<(String, String)> {
    state["history"].as_array().map_or_else(Vec::new, |h| h.iter().map(|a| (a["provider"].as_str().unwrap().to_string(), a["result"].as_str().unwrap().to_string())).collect())
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

on_both!(a_notification_expands_to_every_user_and_topic_member_per_channel_with_status);
async fn a_notification_expands_to_every_user_and_topic_member_per_channel_with_status(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("pushy", Mode::Ok), ("texty", Mode::Ok)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({"providers": {"push": [providers.spec("pushy", None)], "sms": [providers.spec("texty", None)]}})).await;
    for user in ["ann", "bob", "cy"] {
        app.reachable(user).await;
    }
    // dee has no phone and no device: her push and SMS are skipped, her in-app is delivered.
    app.subscriber("dee", json!({"email": "dee@example.org"})).await;
    let (status, body) = app.put("/v1/fanout/topics/team/members", json!({"add": ["bob", "cy", "dee", "ghost"]})).await;
    assert_eq!((status, body["size"].as_u64()), (StatusCode::OK, Some(4)));

    let id = app.trigger(json!({"category": "orders", "users": ["ann", "bob"], "topics": ["team"], "title": "Shipped", "body": "Your order shipped", "data": {"order": 42}, "channels": ["push", "sms", "in_app"]})).await;
    let view = app.settled(&id).await;
    // 5 recipients (bob once, though named twice) × 3 channels.
    let counts = &view["counts"];
    // ann, bob and cy get all three; dee only in-app; ghost is no subscriber.
    assert_eq!((counts["delivered"].as_u64(), counts["skipped"].as_u64()), (Some(3 * 3 + 1), Some(2 + 3)), "{view:#}");
    assert_eq!(view["deliveries"].as_array().unwrap().len(), 15);
    for user in ["ann", "bob", "cy"] {
        let got = providers.delivered_to(user);
        assert_eq!(got.len(), 2, "one push and one SMS for {user}: {got:?}");
    }
    let push = providers.got_by("pushy").into_iter().find(|g| g.body["user"] == "ann").unwrap();
    assert_eq!((push.body["title"].as_str(), push.body["data"]["order"].as_u64()), (Some("Shipped"), Some(42)));
    assert_eq!(push.body["to"]["push_tokens"], json!(["device-ann"]));
    assert_eq!(providers.got_by("texty")[0].body["to"]["phone"], "+4915112345678");

    let state = app.wait_for(&delivery(&id, "push", "ann"), "delivered").await;
    assert_eq!((state["provider"].as_str(), state["attempts"].as_u64()), (Some("pushy"), Some(1)));
    assert_eq!(history(&state), [("pushy".to_string(), "delivered".to_string())]);
    let skipped = app.wait_for(&delivery(&id, "sms", "dee"), "skipped").await;
    assert!(skipped["reason"].as_str().unwrap().contains("phone"), "{skipped}");
    let ghost = app.wait_for(&delivery(&id, "in_app", "ghost"), "skipped").await;
    assert!(ghost["reason"].as_str().unwrap().contains("no subscriber"), "{ghost}");

    // The same idempotency key answers the same id and sends nothing again.
    let keyed = json!({"category": "orders", "users": ["ann"], "channels": ["push"], "idempotency_key": "order-42-shipped"});
    let first = app.trigger(keyed.clone()).await;
    let (status, again) = app.post("/v1/fanout/notifications", json!({"notifications": [keyed]})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!((again["notifications"][0]["id"].as_str(), again["notifications"][0]["duplicate"].as_bool()), (Some(first.as_str()), Some(true)));
    app.settled(&first).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(providers.delivered_to("ann").len(), 3);

    let (_, overview) = app.get("/v1/fanout").await;
    assert_eq!(overview["counts"]["triggered"].as_u64(), Some(2), "{overview:#}");
    assert_eq!(overview["counts"]["duplicates"].as_u64(), Some(1));
    app.stop(true).await;
}

on_both!(bad_input_is_refused_with_the_field_and_the_limit_named);
async fn bad_input_is_refused_with_the_field_and_the_limit_named(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), false, &backend).await;
    let cases = [
        (json!({"notifications": []}), "at least one"),
        (json!({"notifications": [{"category": "x"}]}), "recipient"),
        (json!({"notifications": [{"category": "bad category", "users": ["a"]}]}), "category"),
        (json!({"notifications": [{"category": "x", "users": (0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>()}]}), "RECIPIENT_USERS_MAX"),
        (json!({"notifications": [{"category": "x", "users": ["a"], "data": "x".repeat(17 * 1024)}]}), "PAYLOAD_BYTES_MAX"),
        (json!({"notifications": [{"category": "x", "users": ["a"], "channels": ["fax"]}]}), "fax"),
        (json!({"notifications": [{"category": "x", "users": ["a"], "surprise": 1}]}), "surprise"),
    ];
    for (body, named) in cases {
        let (status, answer) = app.post("/v1/fanout/notifications", body).await;
        assert!(status.is_client_error(), "{status} {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{message:?} does not name {named:?}");
    }
    let (status, answer) = app.put("/v1/fanout/subscribers/ann", json!({"phone": "12345"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = app.put("/v1/fanout/subscribers/ann", json!({"quiet_hours": {"start": "25:00", "end": "07:00"}})).await;
    assert!(status == StatusCode::BAD_REQUEST && answer["error"]["message"].as_str().unwrap().contains("quiet_hours.start"), "{answer}");
    let (status, answer) = app.put("/v1/fanout/config", json!({"providers": {"push": [{"name": "p", "url": "https://x.example/"}]}})).await;
    assert!(status == StatusCode::BAD_REQUEST && answer["error"]["message"].as_str().unwrap().contains("http://"), "{answer}");
    let (status, _) = app.get("/v1/fanout/notifications/nope-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, answer) = app.get("/v1/fanout/inbox/ann/ws").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    app.stop(true).await;
}

on_both!(subscribers_are_created_and_replaced_in_bulk_all_or_none);
async fn subscribers_are_created_and_replaced_in_bulk_all_or_none(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), false, &backend).await;
    app.subscriber("ann", json!({"email": "ann@example.org"})).await;
    let mut batch: Vec<Value> = (1..1_000).map(|i| json!({"id": format!("b{i:04}"), "push_tokens": [format!("device-{i}")]})).collect();
    batch.insert(500, json!({"id": "ann", "email": "ann@example.com", "timezone_offset_minutes": 60}));
    let (status, answer) = app.post("/v1/fanout/subscribers", json!({"subscribers": batch})).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"created": 999, "replaced": 1})));
    let (_, ann) = app.get("/v1/fanout/subscribers/ann").await;
    assert_eq!((ann["email"].as_str(), ann["timezone_offset_minutes"].as_i64()), (Some("ann@example.com"), Some(60)), "{ann}");
    assert_eq!(app.get("/v1/fanout/subscribers/b0999").await.1["push_tokens"], json!(["device-999"]));
    assert_eq!(app.get("/v1/fanout").await.1["subscribers"], 1_000);
    // Refused whole, naming the subscriber by index; nothing of the request is written.
    let refusals = [
        (json!({"subscribers": [{"id": "c1"}, {"id": "c2"}, {"id": "c3", "phone": "12345"}]}), StatusCode::BAD_REQUEST, "subscribers[2]: phone"),
        (json!({"subscribers": [{"id": "c1"}, {"email": "x@example.org"}]}), StatusCode::BAD_REQUEST, "subscribers[1]: subscriber id"),
        (json!({"subscribers": [{"id": "c1"}, {"id": "c2"}, {"id": "c1"}]}), StatusCode::BAD_REQUEST, "subscribers[2]: id \"c1\" is given twice"),
        (json!({"subscribers": (0..1_001).map(|i| json!({"id": format!("c{i}")})).collect::<Vec<_>>()}), StatusCode::PAYLOAD_TOO_LARGE, "SUBSCRIBERS_PER_REQUEST_MAX"),
        (json!({"subscribers": []}), StatusCode::BAD_REQUEST, "empty"),
    ];
    for (body, status, named) in refusals {
        let answer = app.post("/v1/fanout/subscribers", body).await;
        assert_eq!(answer.0, status, "{}", answer.1);
        let message = answer.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{message:?} does not name {named:?}");
    }
    assert_eq!(app.get("/v1/fanout/subscribers/c1").await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/v1/fanout").await.1["subscribers"], 1_000);
    app.stop(true).await;
}

on_both!(push_fails_over_on_5xx_and_timeout_and_a_4xx_fails_only_that_recipient);
async fn push_fails_over_on_5xx_and_timeout_and_a_4xx_fails_only_that_recipient(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("down", Mode::Fail), ("slow", Mode::Slow), ("picky", Mode::RejectBad)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({
        "providers": {"push": [providers.spec("down", None), providers.spec("slow", None), providers.spec("picky", None)]},
        "circuit": {"failures": 2, "cooldown_ms": 60_000},
    }))
    .await;
    app.reachable("ann").await;
    app.reachable("bad-bob").await;

    let id = app.trigger(json!({"category": "alerts", "users": ["ann"], "channels": ["push"], "title": "hi"})).await;
    let state = app.wait_for(&delivery(&id, "push", "ann"), "delivered").await;
    assert_eq!(state["provider"], "picky");
    assert_eq!(history(&state), [("down".into(), "failed".into()), ("slow".into(), "failed".into()), ("picky".into(), "delivered".into())]);
    let attempts = state["history"].as_array().unwrap();
    assert_eq!(attempts[0]["status_code"].as_u64(), Some(500));
    assert!(attempts[1]["detail"].as_str().unwrap().contains("no answer within 500 ms"), "{state:#}");
    assert_eq!(state["attempts"].as_u64(), Some(1), "failover is within one attempt");

    // picky refuses bad-bob (400): final, and no other provider is asked.
    let id = app.trigger(json!({"category": "alerts", "users": ["bad-bob"], "channels": ["push"]})).await;
    let state = app.wait_for(&delivery(&id, "push", "bad-bob"), "failed").await;
    let tried = history(&state);
    assert_eq!(tried.last().unwrap(), &("picky".to_string(), "rejected".to_string()), "{state:#}");
    assert_eq!(state["history"].as_array().unwrap().last().unwrap()["status_code"].as_u64(), Some(400));

    // down and slow failed twice in a row: their circuits are open and they are skipped.
    let (_, overview) = app.get("/v1/fanout").await;
    let open: Vec<&str> = overview["open_circuits"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(open.contains(&"push/down") && open.contains(&"push/slow"), "{overview:#}");
    let before = providers.got_by("down").len();
    let id = app.trigger(json!({"category": "alerts", "users": ["ann"], "channels": ["push"]})).await;
    let state = app.wait_for(&delivery(&id, "push", "ann"), "delivered").await;
    assert_eq!(history(&state), [("picky".into(), "delivered".into())]);
    assert_eq!(providers.got_by("down").len(), before, "an open circuit skips its provider");
    app.stop(true).await;
}

on_both!(failed_sends_are_retried_with_backoff_then_fail_after_the_last_attempt);
async fn failed_sends_are_retried_with_backoff_then_fail_after_the_last_attempt(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("flaky", Mode::Fail)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({"providers": {"sms": [providers.spec("flaky", None)]}, "retry": {"attempts": 3, "base_ms": 200, "max_ms": 1_000}, "circuit": {"failures": 100, "cooldown_ms": 1_000}})).await;
    app.reachable("ann").await;
    app.reachable("bob").await;
    let id = app.trigger(json!({"category": "alerts", "users": ["ann"], "channels": ["sms"]})).await;
    let retrying = app.wait_for(&delivery(&id, "sms", "ann"), "retrying").await;
    assert!(retrying["next_attempt_at_ms"].as_u64().is_some(), "{retrying:#}");
    let state = app.wait_for(&delivery(&id, "sms", "ann"), "failed").await;
    assert_eq!(state["attempts"].as_u64(), Some(3), "{state:#}");
    assert!(state["reason"].as_str().unwrap().contains("after 3 attempts"), "{state:#}");
    let at: Vec<Instant> = providers.got_by("flaky").iter().map(|g| g.at).collect();
    assert_eq!(at.len(), 3);
    // Backoff doubles: 200 ms, then 400 ms.
    assert!(at[1] - at[0] >= Duration::from_millis(180), "{:?}", at[1] - at[0]);
    assert!(at[2] - at[1] >= Duration::from_millis(380), "{:?}", at[2] - at[1]);

    // The provider recovers: a retried delivery goes through.
    providers.modes.lock().insert("flaky".into(), Mode::Ok);
    let id = app.trigger(json!({"category": "alerts", "users": ["bob"], "channels": ["sms"]})).await;
    let state = app.wait_for(&delivery(&id, "sms", "bob"), "delivered").await;
    assert_eq!(state["attempts"].as_u64(), Some(1));
    app.stop(true).await;
}

on_both!(token_buckets_limit_each_provider_and_each_channel);
async fn token_buckets_limit_each_provider_and_each_channel(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("cheap", Mode::Ok), ("spare", Mode::Ok), ("sms", Mode::Ok)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({
        "providers": {
            "push": [providers.spec("cheap", Some(json!({"rate_per_s": 0.01, "burst": 2}))), providers.spec("spare", None)],
            "sms": [providers.spec("sms", None)],
        },
        "channel_rates": {"sms": {"rate_per_s": 5.0, "burst": 1}},
    }))
    .await;
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for user in &users {
        app.reachable(user).await;
    }
    // Push: the first provider's bucket holds 2 tokens; the rest go to the next provider.
    let id = app.trigger(json!({"category": "promo", "users": users, "channels": ["push"]})).await;
    app.settled(&id).await;
    assert_eq!(providers.got_by("cheap").len(), 2);
    assert_eq!(providers.got_by("spare").len(), 4);

    // SMS: 5 per second with a burst of 1: 6 messages take at least a second.
    let id = app.trigger(json!({"category": "promo", "users": users, "channels": ["sms"]})).await;
    let view = app.settled(&id).await;
    assert_eq!(view["counts"]["delivered"].as_u64(), Some(6));
    let mut at: Vec<Instant> = providers.got_by("sms").iter().map(|g| g.at).collect();
    at.sort();
    assert!(at[5] - at[0] >= Duration::from_millis(900), "6 SMS at 5/s took {:?}", at[5] - at[0]);
    let (_, overview) = app.get("/v1/fanout").await;
    assert!(overview["counts"]["throttled"].as_u64().unwrap() >= 4, "{overview:#}");
    app.stop(true).await;
}

on_both!(preferences_and_quiet_hours_decide_and_critical_overrides_them);
async fn preferences_and_quiet_hours_decide_and_critical_overrides_them(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("pushy", Mode::Ok), ("texty", Mode::Ok)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({"providers": {"push": [providers.spec("pushy", None)], "sms": [providers.spec("texty", None)]}, "categories": {"promo": {"channels": ["push", "sms"]}}})).await;
    // ann: no SMS at all, no promo push.
    app.subscriber("ann", json!({"phone": "+4915112345678", "push_tokens": ["t"], "preferences": {"channels": {"sms": false}, "categories": {"promo": {"channels": {"push": false}}}}})).await;
    // bob: quiet hours around the clock right now, in his timezone.
    let now_minute = (tributary_core::now_ms() as u64 / 60_000) % 1_440;
    let hhmm = |m: u64| format!("{:02}:{:02}", (m % 1_440) / 60, m % 60);
    app.subscriber("bob", json!({"phone": "+4915112345679", "push_tokens": ["t"], "timezone_offset_minutes": 0, "quiet_hours": {"start": hhmm(now_minute + 1_440 - 5), "end": hhmm(now_minute + 120)}})).await;

    let id = app.trigger(json!({"category": "promo", "users": ["ann", "bob"]})).await;
    let skipped = app.wait_for(&delivery(&id, "sms", "ann"), "skipped").await;
    assert!(skipped["reason"].as_str().unwrap().contains("opted out of sms"), "{skipped}");
    let skipped = app.wait_for(&delivery(&id, "push", "ann"), "skipped").await;
    assert!(skipped["reason"].as_str().unwrap().contains("category promo"), "{skipped}");
    let deferred = app.wait_for(&delivery(&id, "push", "bob"), "deferred").await;
    let not_before = deferred["not_before_ms"].as_u64().unwrap();
    let until = not_before.saturating_sub(tributary_core::now_ms() as u64);
    assert!(until > 100 * 60_000 && until <= 120 * 60_000, "held until the window's end, {until} ms away");
    app.wait_for(&delivery(&id, "sms", "bob"), "deferred").await;

    // Critical: opt-outs and quiet hours give way.
    let id = app.trigger(json!({"category": "promo", "users": ["ann", "bob"], "critical": true})).await;
    let view = app.settled(&id).await;
    assert_eq!(view["counts"]["delivered"].as_u64(), Some(4), "{view:#}");
    assert_eq!(providers.delivered_to("ann").len(), 2);
    assert_eq!(providers.delivered_to("bob").len(), 2);
    app.stop(true).await;
}

on_both!(a_digest_batches_one_category_for_one_user_within_its_window);
async fn a_digest_batches_one_category_for_one_user_within_its_window(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("pushy", Mode::Ok)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({"providers": {"push": [providers.spec("pushy", None)]}, "categories": {"likes": {"channels": ["push"], "digest_window_ms": 5_000}}})).await;
    app.reachable("ann").await;
    app.reachable("bob").await;
    let (status, body) = app.post("/v1/fanout/notifications", json!({"notifications": (0..3).map(|n| json!({"category": "likes", "users": ["ann"], "title": format!("like {n}")})).collect::<Vec<_>>()})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let ids: Vec<String> = body["notifications"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect();
    let deliveries: Vec<String> = ids.iter().map(|id| delivery(id, "push", "ann")).collect();
    // Another user and a critical notification are not batched with ann's.
    let bob = app.trigger(json!({"category": "likes", "users": ["bob"], "title": "bob's"})).await;
    let critical = app.trigger(json!({"category": "likes", "users": ["ann"], "title": "urgent", "critical": true})).await;
    app.wait_for(&delivery(&critical, "push", "ann"), "delivered").await;
    // Within the window: the first expanded opened the digest, the others joined it.
    let deadline = Instant::now() + Duration::from_secs(2);
    let statuses = loop {
        let mut statuses = Vec::new();
        for id in &deliveries {
            let (_, state) = app.get(&format!("/v1/fanout/deliveries/{id}")).await;
            statuses.push(state["status"].as_str().unwrap_or("unknown").to_string());
        }
        statuses.sort();
        if !statuses.iter().any(|s| s == "unknown") || Instant::now() > deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(statuses, ["batched", "batched", "queued"]);
    let mut states = Vec::new();
    for id in &deliveries {
        states.push(app.wait_for(id, "delivered").await);
    }
    let head = states.iter().find(|s| s["digest_items"].as_u64() == Some(3)).expect("the digest's first delivery carried all three");
    let head_id = head["id"].as_str().unwrap();
    assert_eq!(states.iter().filter(|s| s["digest"].as_str() == Some(head_id)).count(), 2);
    app.wait_for(&delivery(&bob, "push", "bob"), "delivered").await;
    let to_ann = providers.delivered_to("ann");
    assert_eq!(to_ann.len(), 2, "one digest and the critical one: {to_ann:?}");
    let digest = to_ann.iter().find(|g| g.body["digest"].is_array()).expect("a digest");
    let mut titles: Vec<&str> = digest.body["digest"].as_array().unwrap().iter().map(|c| c["title"].as_str().unwrap()).collect();
    titles.sort();
    assert_eq!(titles, ["like 0", "like 1", "like 2"]);

    // A delivery that joined the digest after it went out (a join racing the send, here written
    // straight into the state store) is found by the upkeep and sent on its own.
    let late = delivery(&ids[0], "push", "bob");
    let mut state: super::process::DeliveryState = serde_json::from_value(states[0].clone()).unwrap();
    state.id = late.clone();
    state.user = "bob".into();
    state.status = super::process::Status::Batched;
    state.digest = Some(head_id.to_string());
    state.digest_items = None;
    state.history.clear();
    app.system.record(vec![state]).await.unwrap();
    let sent = app.wait_for(&late, "delivered").await;
    assert!(sent["reason"].is_null() && sent["provider"] == "pushy", "{sent:#}");
    assert!(providers.delivered_to("bob").iter().any(|g| g.body["delivery_id"] == late.as_str()), "the late member reached the provider");
    let (_, overview) = app.get("/v1/fanout").await;
    assert_eq!(overview["counts"]["orphans_queued"].as_u64(), Some(1), "{overview:#}");
    app.stop(true).await;
}

/// Read SSE events (`event:` and `data:` lines) from a streaming response.
async fn sse_events(response: &mut reqwest::Response, buffer: &mut String, wanted: usize) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.len() < wanted {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut kind = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    kind = value.trim().to_string();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if !data.is_empty() {
                events.push((kind, serde_json::from_str(&data).unwrap()));
            }
        }
        if events.len() >= wanted {
            break;
        }
        let chunk = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), response.chunk()).await.expect("SSE events in time").unwrap().expect("the stream is open");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    events
}

on_both!(the_inbox_is_durable_live_over_websocket_and_sse_and_marks_read);
async fn the_inbox_is_durable_live_over_websocket_and_sse_and_marks_read(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({})).await;
    app.subscriber("ann", json!({})).await;
    let ws_url = format!("{}/v1/fanout/inbox/ann/ws", app.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let mut next = async || -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time").unwrap().unwrap();
            if let WsMessage::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    let first = next().await;
    assert_eq!((first["type"].as_str(), first["unread"].as_u64()), (Some("inbox"), Some(0)));
    let mut sse = app.client.get(format!("{}/v1/fanout/inbox/ann/events", app.base)).send().await.unwrap();
    let mut buffer = String::new();
    assert_eq!(sse_events(&mut sse, &mut buffer, 1).await[0].0, "inbox");

    let id = app.trigger(json!({"category": "social", "users": ["ann"], "channels": ["in_app"], "title": "New follower", "data": {"who": "bob"}})).await;
    let live = next().await;
    assert_eq!((live["type"].as_str(), live["unread"].as_u64()), (Some("item"), Some(1)), "{live}");
    assert_eq!((live["item"]["title"].as_str(), live["item"]["data"]["who"].as_str()), (Some("New follower"), Some("bob")));
    let item_id = live["item"]["id"].as_str().unwrap().to_string();
    assert_eq!(item_id, delivery(&id, "in_app", "ann"));
    let (kind, event) = sse_events(&mut sse, &mut buffer, 1).await.remove(0);
    assert_eq!((kind.as_str(), event["item"]["id"].as_str()), ("item", Some(item_id.as_str())));
    app.wait_for(&item_id, "delivered").await;

    ws.send(WsMessage::Text(json!({"read": [item_id]}).to_string().into())).await.unwrap();
    let mut next = async || -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time").unwrap().unwrap();
            if let WsMessage::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    let read = next().await;
    assert_eq!((read["type"].as_str(), read["unread"].as_u64()), (Some("read"), Some(0)), "{read}");
    let (_, inbox) = app.get("/v1/fanout/inbox/ann").await;
    assert_eq!((inbox["unread"].as_u64(), inbox["items"][0]["read"].as_bool()), (Some(0), Some(true)));

    // A second item, marked read over HTTP.
    app.trigger(json!({"category": "social", "users": ["ann"], "channels": ["in_app"], "title": "Another"})).await;
    assert_eq!(next().await["unread"].as_u64(), Some(1));
    let (status, marked) = app.post("/v1/fanout/inbox/ann/read", json!({"all": true})).await;
    assert_eq!((status, marked["unread"].as_u64()), (StatusCode::OK, Some(0)));
    drop(ws);
    drop(sse);
    app.stop(true).await;

    // The inbox is durable.
    let app = App::start(dir.path(), false, &backend).await;
    let (_, inbox) = app.get("/v1/fanout/inbox/ann").await;
    let titles: Vec<&str> = inbox["items"].as_array().unwrap().iter().map(|i| i["title"].as_str().unwrap()).collect();
    assert_eq!((titles, inbox["unread"].as_u64()), (vec!["Another", "New follower"], Some(0)));
    app.stop(true).await;
}

on_both!(the_email_leg_goes_through_the_email_system_to_smtp);
async fn the_email_leg_goes_through_the_email_system_to_smtp(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = SmtpRelay::start();
    let app = App::start(dir.path(), true, &backend).await;
    let (status, body) = app.put("/v1/email/config", json!({"relay": {"host": "127.0.0.1", "port": relay.port, "pool_max": 2, "timeout_ms": 5_000}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.configure(json!({"email": {"base_url": app.base, "from": "Alerts <alerts@example.com>"}})).await;
    app.reachable("ann").await;
    let id = app.trigger(json!({"category": "receipts", "users": ["ann"], "channels": ["email"], "title": "Your receipt", "body": "Thanks for your order"})).await;
    let state = app.wait_for(&delivery(&id, "email", "ann"), "delivered").await;
    let email_id = state["email_id"].as_str().expect("the email system's id is kept").to_string();
    assert_eq!(state["provider"], "email");
    wait_until("the relay got the email", || relay.accepted_for("ann@example.org").len() == 1).await;
    let got = relay.accepted_for("ann@example.org");
    assert_eq!((got[0]["subject"].as_str(), got[0]["id"].as_str()), (Some("Your receipt"), Some(email_id.as_str())));
    let (status, email) = app.get(&format!("/v1/email/messages/{email_id}")).await;
    assert_eq!(status, StatusCode::OK, "{email}");
    assert_eq!(email["metadata"]["fanout_delivery"].as_str(), Some(delivery(&id, "email", "ann").as_str()));
    app.stop(true).await;

    // Without the email system at the configured address, the delivery is retried, then fails.
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({"email": {"base_url": "http://127.0.0.1:9"}, "retry": {"attempts": 2, "base_ms": 50, "max_ms": 100}})).await;
    let id = app.trigger(json!({"category": "receipts", "users": ["ann"], "channels": ["email"], "title": "Again"})).await;
    let state = app.wait_for(&delivery(&id, "email", "ann"), "failed").await;
    assert_eq!(state["attempts"].as_u64(), Some(2), "{state:#}");
    app.stop(true).await;
}

on_both!(acknowledged_triggers_and_deliveries_survive_a_crash);
async fn acknowledged_triggers_and_deliveries_survive_a_crash(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let providers = Providers::start(&[("pushy", Mode::Fail)]).await;
    let app = App::start(dir.path(), false, &backend).await;
    app.configure(json!({"providers": {"push": [providers.spec("pushy", None)]}, "retry": {"attempts": 50, "base_ms": 100, "max_ms": 200}, "circuit": {"failures": 1000, "cooldown_ms": 1_000}})).await;
    let users: Vec<String> = (0..300).map(|i| format!("user{i}")).collect();
    for user in &users {
        app.reachable(user).await;
    }
    app.put("/v1/fanout/topics/everyone/members", json!({"add": users})).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(app.trigger(json!({"category": "news", "topics": ["everyone"], "channels": ["push", "in_app"], "title": format!("n{n}"), "idempotency_key": format!("k{n}")})).await);
    }
    wait_until("some deliveries retrying", || providers.got_by("pushy").len() > 10).await;
    app.stop(false).await;

    // Reopened: every acknowledged notification is expanded and every delivery goes out once
    // the provider answers.
    providers.modes.lock().insert("pushy".into(), Mode::Ok);
    let app = App::start(dir.path(), false, &backend).await;
    let (status, again) = app.post("/v1/fanout/notifications", json!({"notifications": [{"category": "news", "topics": ["everyone"], "idempotency_key": "k0"}]})).await;
    assert_eq!((status, again["notifications"][0]["id"].as_str()), (StatusCode::ACCEPTED, Some(ids[0].as_str())), "idempotency keys survive");
    for id in &ids {
        let view = app.settled(id).await;
        assert_eq!(view["counts"]["delivered"].as_u64(), Some(600), "{id}: {view:#}");
    }
    let (_, inbox) = app.get("/v1/fanout/inbox/user7").await;
    assert_eq!(inbox["items"].as_array().unwrap().len(), 5);
    // Every push delivery was taken by the provider (once, unless a crash came in between).
    let taken: std::collections::HashSet<String> = providers.got.lock().iter().filter(|g| g.status == 200).map(|g| g.body["delivery_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(taken.len(), 1_500);
    app.stop(true).await;
}

/// Two nodes on one namespace (NATS JetStream and PostgreSQL): what one writes the other
/// reads, either node's trigger is expanded by the node holding the expanders' leases, the
/// deliveries are shared by both nodes' workers and sent once each, an inbox item reaches a
/// connection on either node, an idempotency key holds across nodes, and when the leaseholder
/// stops the other node expands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_subscribers_topics_expansion_deliveries_and_the_live_inbox() {
    let backend = Backend::nats();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let providers = Providers::start(&[("pushy", Mode::Ok)]).await;
    let a = App::start(dir_a.path(), false, &backend).await;
    let b = App::start(dir_b.path(), false, &backend).await;
    a.configure(json!({"providers": {"push": [providers.spec("pushy", None)]}})).await;
    let users: Vec<String> = (0..100).map(|i| format!("u{i:03}")).collect();
    for user in &users {
        a.reachable(user).await;
    }
    let (status, _) = b.put("/v1/fanout/topics/all/members", json!({"add": users})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, topic) = a.get("/v1/fanout/topics/all?limit=1").await;
    assert_eq!((topic["size"].as_u64(), topic["members"][0].as_str()), (Some(100), Some("u000")), "{topic}");
    let (status, subscriber) = b.get("/v1/fanout/subscribers/u007").await;
    assert_eq!((status, subscriber["email"].as_str()), (StatusCode::OK, Some("u007@example.org")));
    // Node B reads the configuration node A wrote within CONFIG_REFRESH.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, config) = b.get("/v1/fanout/config").await;
        if config["providers"]["push"][0]["name"] == "pushy" {
            break;
        }
        assert!(Instant::now() < deadline, "node B never read the configuration: {config}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // u007 watches the inbox on node B.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/v1/fanout/inbox/u007/ws", b.base.replace("http://", "ws://"))).await.unwrap();
    let mut next = async || -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time").unwrap().unwrap();
            if let WsMessage::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    assert_eq!(next().await["type"], "inbox");

    // Ten notifications to the topic, triggered through both nodes.
    let mut ids = Vec::new();
    for n in 0..10 {
        let node = if n % 2 == 0 { &a } else { &b };
        ids.push(node.trigger(json!({"category": "news", "topics": ["all"], "channels": ["push", "in_app"], "title": format!("n{n}")})).await);
    }
    for (n, id) in ids.iter().enumerate() {
        let node = if n % 2 == 0 { &b } else { &a };
        let view = node.settled(id).await;
        assert_eq!(view["counts"]["delivered"].as_u64(), Some(200), "{id}: {view:#}");
    }
    let pushed: Vec<String> = providers.got_by("pushy").iter().map(|g| g.body["delivery_id"].as_str().unwrap().to_string()).collect();
    let once: std::collections::HashSet<&String> = pushed.iter().collect();
    assert_eq!((pushed.len(), once.len()), (1_000, 1_000), "every push delivery sent once");
    let mut titles = Vec::new();
    while titles.len() < 10 {
        let message = next().await;
        assert_eq!(message["type"], "item", "{message}");
        titles.push(message["item"]["title"].as_str().unwrap().to_string());
    }
    titles.sort();
    assert_eq!(titles, (0..10).map(|n| format!("n{n}")).collect::<Vec<_>>(), "node B's connection got every item, whichever node wrote it");
    let worked = |app: &App| app.system.counts.delivered.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    let (by_a, by_b) = (worked(&a), worked(&b));
    println!("deliveries sent by node A: {by_a}, by node B: {by_b}");
    assert_eq!(by_a + by_b, 2_000);

    // An idempotency key used through A, then through B.
    let (_, first) = a.post("/v1/fanout/notifications", json!({"notifications": [{"category": "news", "users": ["u001"], "channels": ["push"], "idempotency_key": "once"}]})).await;
    let (_, again) = b.post("/v1/fanout/notifications", json!({"notifications": [{"category": "news", "users": ["u001"], "channels": ["push"], "idempotency_key": "once"}]})).await;
    assert_eq!(again["notifications"][0]["id"], first["notifications"][0]["id"], "{again}");
    assert_eq!(again["notifications"][0]["duplicate"], true, "{again}");

    // Node A stops, handing its expanders' leases back: node B expands from then on.
    drop(ws);
    a.stop(true).await;
    let id = b.trigger(json!({"category": "news", "users": ["u002"], "channels": ["push"], "title": "after"})).await;
    let view = b.settled(&id).await;
    assert_eq!(view["counts"]["delivered"].as_u64(), Some(1), "{view:#}");
    let (_, overview) = b.get("/v1/fanout").await;
    assert!(overview["expanders"].as_array().unwrap().iter().all(|e| e["this_node"] == true), "{overview:#}");
    b.stop(true).await;
    backend.forget().await;
}

/// With a shared cache, a provider's bucket is one for every node: what one node took, the
/// next node does not get again (nor after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_with_a_shared_cache_share_each_providers_rate() {
    let backend = Backend::nats();
    let providers = Providers::start(&[("capped", Mode::Ok), ("spare", Mode::Ok)]).await;
    let dir_a = tempfile::tempdir().unwrap();
    let a = App::start(dir_a.path(), false, &backend).await;
    a.configure(json!({"providers": {"push": [providers.spec("capped", Some(json!({"rate_per_s": 0.01, "burst": 5}))), providers.spec("spare", None)]}})).await;
    let users: Vec<Value> = (0..10).map(|i| json!({"id": format!("u{i}"), "push_tokens": [format!("device-{i}")]})).collect();
    let (status, answer) = a.post("/v1/fanout/subscribers", json!({"subscribers": users})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let ids: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let id = a.trigger(json!({"category": "promo", "users": ids, "channels": ["push"]})).await;
    a.settled(&id).await;
    assert_eq!((providers.got_by("capped").len(), providers.got_by("spare").len()), (5, 5), "node A: the burst of 5, then the spare");
    a.stop(true).await;

    // Another node, started after A stopped, finds the bucket as A left it.
    let dir_b = tempfile::tempdir().unwrap();
    let b = App::start(dir_b.path(), false, &backend).await;
    let id = b.trigger(json!({"category": "promo", "users": ids, "channels": ["push"]})).await;
    b.settled(&id).await;
    assert_eq!((providers.got_by("capped").len(), providers.got_by("spare").len()), (5, 15), "node B took nothing more from the capped provider");
    let (_, overview) = b.get("/v1/fanout").await;
    assert_eq!((overview["rate_limits"].as_str(), overview["rate_fallbacks"].as_u64()), (Some("shared"), Some(0)), "{overview:#}");
    b.stop(true).await;
    backend.forget().await;
}

/// A data folder from before the database: the configuration, subscribers, memberships and
/// inboxes in compacted topics, the expanders' offsets in a consumer group, delivery states and
/// idempotency keys only in the logs. The first start carries them over, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_from_before_the_database_keeps_its_subscribers_topics_inboxes_and_deliveries() {
    use super::process::{Channel, DeliveryState, InboxItem, Notification, Status};
    use tributary_core::Record;
    use tributary_engine::stream::TopicConfig;
    let dir = tempfile::tempdir().unwrap();
    let notification = Notification {
        id: "old-1".into(),
        category: "news".into(),
        users: vec!["ann".into()],
        topics: Vec::new(),
        title: Some("Old".into()),
        body: None,
        data: None,
        channels: Some(vec![Channel::Push]),
        critical: false,
        idempotency_key: Some("k-old".into()),
        accepted_at_ms: 1,
    };
    {
        let engine = Engine::open(dir.path()).unwrap();
        let compacted = TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() };
        let topic = |name: &str| engine.topics.create(name, compacted.clone()).unwrap();
        let config = json!({"provider_timeout_ms": 1_234});
        topic("fanout-config").produce_to(0, &[Record::keyed("config", serde_json::to_vec(&config).unwrap())]).unwrap();
        let subscribers = topic("fanout-subscribers");
        for id in ["ann", "bob", "gone"] {
            subscribers.produce_to(0, &[Record::keyed(id, serde_json::to_vec(&json!({"id": id, "email": format!("{id}@example.org")})).unwrap())]).unwrap();
        }
        subscribers.produce_to(0, &[Record::tombstone("gone")]).unwrap();
        let members = topic("fanout-topic-members");
        for user in ["ann", "bob", "gone"] {
            members.produce_to(0, &[Record::keyed(format!("team/{user}"), &b"1"[..])]).unwrap();
        }
        members.produce_to(0, &[Record::tombstone("team/gone")]).unwrap();
        let item = InboxItem { id: "old-1.in_app.ann".into(), category: "news".into(), notification: "old-1".into(), title: Some("Old".into()), body: None, data: None, items: Vec::new(), created_at_ms: 1, read: false };
        topic("fanout-inbox").produce_to(0, &[Record::keyed("ann/old-1.in_app.ann", serde_json::to_vec(&item).unwrap())]).unwrap();
        let retained = |partitions| TopicConfig { partitions, retention_ms: Some(super::RETENTION_MS), ..TopicConfig::default() };
        let notifications = engine.topics.create(super::NOTIFICATIONS_TOPIC, retained(super::EXPANDERS)).unwrap();
        let at = notifications.produce(&[Record::keyed("old-1", serde_json::to_vec(&notification).unwrap())]).unwrap().remove(0);
        engine.topics.commit(super::NOTIFICATIONS_TOPIC, "fanout-expanders", None, &[(at.partition, at.offset + 1)]).unwrap();
        let mut state = DeliveryState::queued(&notification, Channel::Push, "ann", 2);
        (state.status, state.attempts, state.provider) = (Status::Delivered, 1, Some("pushy".into()));
        engine.topics.create(super::EVENTS_TOPIC, retained(1)).unwrap().produce_to(0, &[Record::keyed("old-1.push.ann", serde_json::to_vec(&state).unwrap())]).unwrap();
        engine.close().unwrap();
    }
    let app = App::start(dir.path(), false, &Backend::Embedded).await;
    assert_eq!(app.get("/v1/fanout/config").await.1["provider_timeout_ms"], 1_234);
    assert_eq!(app.get("/v1/fanout/subscribers/bob").await.1["email"], "bob@example.org");
    assert_eq!(app.get("/v1/fanout/subscribers/gone").await.0, StatusCode::NOT_FOUND, "a tombstone is carried over as a removal");
    let (_, team) = app.get("/v1/fanout/topics/team").await;
    assert_eq!(team, json!({"topic": "team", "size": 2, "members": ["ann", "bob"]}));
    let (_, inbox) = app.get("/v1/fanout/inbox/ann").await;
    assert_eq!((inbox["items"][0]["title"].as_str(), inbox["unread"].as_u64()), (Some("Old"), Some(1)), "{inbox}");
    let (_, delivery) = app.get("/v1/fanout/deliveries/old-1.push.ann").await;
    assert_eq!((delivery["status"].as_str(), delivery["provider"].as_str()), (Some("delivered"), Some("pushy")), "{delivery}");
    let (_, view) = app.get("/v1/fanout/notifications/old-1").await;
    assert_eq!((view["expanded"].as_bool(), view["counts"]["delivered"].as_u64()), (Some(true), Some(1)), "{view}");
    let (status, again) = app.post("/v1/fanout/notifications", json!({"notifications": [{"category": "news", "users": ["ann"], "idempotency_key": "k-old"}]})).await;
    assert_eq!((status, &again["notifications"][0]), (StatusCode::ACCEPTED, &json!({"id": "old-1", "duplicate": true})), "an old key still names its notification");
    app.stop(true).await;
    // Carried over once: a subscriber deleted now does not come back at the next start.
    let app = App::start(dir.path(), false, &Backend::Embedded).await;
    assert_eq!(app.call(app.client.delete(format!("{}/v1/fanout/subscribers/bob", app.base))).await.0, StatusCode::NO_CONTENT);
    app.stop(true).await;
    let app = App::start(dir.path(), false, &Backend::Embedded).await;
    assert_eq!(app.get("/v1/fanout/subscribers/bob").await.0, StatusCode::NOT_FOUND);
    app.stop(true).await;
}
