//! Feature tests of email-queue-system through its HTTP API, each on both backends (the embedded
//! engine and SQLite file; NATS JetStream and PostgreSQL), delivering over real SMTP to a
//! relay started by each test ([`crate::test_support::SmtpRelay`]: Python's aiosmtpd, which answers 250, 4xx
//! or 5xx by recipient), with webhooks POSTed to a small axum receiver that checks signatures.
//! Needs `python3` with `aiosmtpd` (`pip install aiosmtpd`, done by `.ci/install-test-deps`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use parking_lot::Mutex;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tributary_engine::Engine;
use tributary_server::ServerConfig;

use super::EmailSystem;
use crate::System;
use crate::test_support::{Backend, SmtpRelay as Relay, on_both};

const SECRET: &str = "whsec-test";

/// The webhook receiver: an axum server that checks each POST's signature, answers 500 to the
/// first `fail_first` POSTs, and keeps the events of the ones it took.
struct Hook {
    url: String,
    events: Arc<Mutex<Vec<Value>>>,
    posts: Arc<AtomicUsize>,
}

impl Hook {
    async fn start(fail_first: usize) -> Hook {
        let events = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(AtomicUsize::new(0));
        let (taken, counted) = (events.clone(), posts.clone());
        let app = Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (taken, counted) = (taken.clone(), counted.clone());
                async move {
                    let signature = headers.get(tributary_server::webhook::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let now = tributary_core::now_ms() as u64;
                    assert!(tributary_server::webhook::verify_signature(SECRET.as_bytes(), &signature, &body, now, 60_000), "bad signature {signature:?}");
                    if counted.fetch_add(1, Ordering::SeqCst) < fail_first {
                        return AxumStatus::INTERNAL_SERVER_ERROR;
                    }
                    let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                    taken.lock().extend(batch);
                    AxumStatus::OK
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Hook { url, events, posts }
    }

    fn events_of(&self, id: &str) -> Vec<String> {
        self.events.lock().iter().filter(|e| e["id"] == id).map(|e| e["event"].as_str().unwrap().to_string()).collect()
    }
}

/// One running app over a data folder.
struct App {
    base: String,
    client: reqwest::Client,
    system: Arc<EmailSystem>,
    engine: Arc<Engine>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl App {
    async fn start(dir: &Path, backend: &Backend) -> App {
        App::start_with(dir, backend, None).await
    }

    /// With `transactional_lease_ms`, the transactional queue is made beforehand with that lease.
    async fn start_with(dir: &Path, backend: &Backend, transactional_lease_ms: Option<u64>) -> App {
        let data: PathBuf = dir.to_path_buf();
        let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::open(data)).await.unwrap().unwrap());
        let context = backend.context(engine.clone()).await;
        if let Some(lease_ms) = transactional_lease_ms {
            let queues = context.queues.clone();
            let config = tributary_engine::queue::QueueConfig { lease_ms_default: lease_ms, ..super::queue_config() };
            tributary_server::on_backend(queues.blocking(), async move { queues.create_queue(super::TRANSACTIONAL_QUEUE, config).await }).await.unwrap();
        }
        let system = EmailSystem::open(&context).unwrap();
        let app = tributary_server::router(&ServerConfig::default(), vec![system.clone().api()], Router::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        App { base, client: reqwest::Client::new(), system, engine, stop, server }
    }

    /// Stop the workers and the server and close the engine, so the folder can be opened again.
    async fn stop(self) {
        let App { client, system, engine, stop, server, .. } = self;
        drop(client);
        system.shutdown();
        system.stopped().await;
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
                Err(_) => panic!("the engine is still shared after the system stopped"),
            }
        };
        tokio::task::spawn_blocking(move || engine.close()).await.unwrap().unwrap();
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

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(self.client.delete(format!("{}{path}", self.base))).await
    }

    /// Point the system at `relay` (and `hook`), with fast retries.
    async fn configure(&self, relay: Option<&Relay>, hook: Option<&Hook>, extra: Value) {
        let mut config = json!({"retry": {"attempts": 3, "base_ms": 100, "max_ms": 400}});
        if let Some(relay) = relay {
            config["relay"] = json!({"host": "127.0.0.1", "port": relay.port, "pool_max": 4, "timeout_ms": 5_000});
        }
        if let Some(hook) = hook {
            config["webhook"] = json!({"url": hook.url, "secret": SECRET});
        }
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        let (status, body) = self.put("/v1/email/config", config).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Send one email; its id.
    async fn send(&self, class: &str, to: &str) -> String {
        let (status, body) = self
            .post("/v1/email/messages", json!({"messages": [{"class": class, "from": "Shop <shop@example.com>", "to": to, "subject": format!("Hello {to}"), "text": "Hi!", "metadata": {"order": "42"}}]}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["messages"][0]["id"].as_str().unwrap().to_string()
    }

    /// Wait until email `id`'s status is `wanted`; its status.
    async fn wait_for(&self, id: &str, wanted: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.get(&format!("/v1/email/messages/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["status"] == wanted {
                return body;
            }
            assert!(Instant::now() < deadline, "email {id} never became {wanted}: {body:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The events of a status, oldest first.
fn history(status: &Value) -> Vec<String> {
    let mut events: Vec<String> = status["events"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    events.reverse();
    events
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both!(a_batch_on_a_relay_slower_than_its_lease_keeps_the_lease_and_is_handed_off_once);
async fn a_batch_on_a_relay_slower_than_its_lease_keeps_the_lease_and_is_handed_off_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    // A 1.5 s lease and a relay that answers RCPT after 4 s: without the worker's renewals the
    // email would be leased again, by another worker, and handed off twice.
    let app = App::start_with(dir.path(), &backend, Some(1_500)).await;
    app.configure(Some(&relay), None, json!({"relay": {"host": "127.0.0.1", "port": relay.port, "pool_max": 4, "timeout_ms": 10_000}})).await;
    let to = "slow-4000-a@example.org";
    let id = app.send("transactional", to).await;
    let status = app.wait_for(&id, "delivered").await;
    // Two leases more: a second lease of the email would have been handed off by now.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(relay.accepted_for(to).len(), 1, "handed off once");
    assert_eq!(history(&status).iter().filter(|e| *e == "delivered").count(), 1, "{status:#}");
    app.stop().await;
}

on_both!(an_email_is_handed_to_the_relay_and_its_status_and_signed_webhook_say_delivered);
async fn an_email_is_handed_to_the_relay_and_its_status_and_signed_webhook_say_delivered(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let hook = Hook::start(0).await;
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), Some(&hook), json!({})).await;

    let id = app.send("transactional", "ann@example.org").await;
    let status = app.wait_for(&id, "delivered").await;
    assert_eq!(history(&status), ["queued", "delivered"]);
    assert_eq!((status["attempts"].as_u64(), status["smtp"]["code"].as_u64()), (Some(1), Some(250)));
    assert_eq!(status["smtp"]["enhanced"], "2.0.0");
    assert_eq!((status["class"].as_str(), status["metadata"]["order"].as_str()), (Some("transactional"), Some("42")));

    let got = relay.accepted_for("ann@example.org");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0]["id"].as_str(), got[0]["subject"].as_str(), got[0]["mail_from"].as_str()), (Some(id.as_str()), Some("Hello ann@example.org"), Some("shop@example.com")));
    assert_eq!(got[0]["message_id"], format!("<{id}@example.com>"));

    wait_until("the webhook's delivered event", || hook.events_of(&id).contains(&"delivered".to_string())).await;
    assert_eq!(hook.events_of(&id), ["queued", "delivered"]);
    let delivered = hook.events.lock().iter().find(|e| e["id"] == id && e["event"] == "delivered").cloned().unwrap();
    assert_eq!((delivered["to"].as_str(), delivered["metadata"]["order"].as_str()), (Some("ann@example.org"), Some("42")));
    assert!(delivered["offset"].as_u64().is_some());

    let (_, overview) = app.get("/v1/email").await;
    assert_eq!(overview["counts"]["delivered"], 1);
    let expected = if backend.is_embedded() { json!({"queues": "embedded", "streams": "embedded", "db": "sqlite"}) } else { json!({"queues": "nats", "streams": "nats", "db": "postgres"}) };
    assert_eq!(overview["backends"], expected);
    app.stop().await;
}

on_both!(a_4xx_is_retried_with_backoff_until_the_relay_takes_it);
async fn a_4xx_is_retried_with_backoff_until_the_relay_takes_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), None, json!({})).await;

    let id = app.send("bulk", "later-2-bob@example.org").await;
    let status = app.wait_for(&id, "delivered").await;
    assert_eq!(history(&status), ["queued", "deferred", "deferred", "delivered"]);
    assert_eq!(status["attempts"], 3);
    let events = status["events"].as_array().unwrap();
    let deferred = &events[1];
    assert_eq!((deferred["smtp"]["code"].as_u64(), deferred["smtp"]["enhanced"].as_str()), (Some(451), Some("4.3.0")));
    // Backoff doubles: 100 ms before the second attempt, 200 ms before the third (the test's
    // policy), each attempt no earlier than its deferral announced.
    let at = |i: usize| events[i]["at_ms"].as_u64().unwrap();
    let (first_deferral, second_deferral, delivered) = (at(2), at(1), at(0));
    assert!(second_deferral - first_deferral >= 95, "second attempt {} ms after the first deferral", second_deferral - first_deferral);
    assert!(delivered - second_deferral >= 195, "third attempt {} ms after the second deferral", delivered - second_deferral);
    assert!(events[1]["next_attempt_at_ms"].as_u64().unwrap() <= delivered);
    assert_eq!(relay.accepted_for("later-2-bob@example.org").len(), 1);
    app.stop().await;
}

on_both!(a_relay_that_keeps_answering_4xx_ends_in_a_soft_bounce_after_the_retries_without_suppressing);
async fn a_relay_that_keeps_answering_4xx_ends_in_a_soft_bounce_after_the_retries_without_suppressing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), None, json!({"retry": {"attempts": 2, "base_ms": 50, "max_ms": 100}})).await;

    let id = app.send("transactional", "never@example.org").await;
    let status = app.wait_for(&id, "bounced").await;
    assert_eq!(history(&status), ["queued", "deferred", "deferred", "bounced"]);
    assert_eq!((status["bounce"].as_str(), status["attempts"].as_u64()), (Some("soft"), Some(3)));
    assert!(status["reason"].as_str().unwrap().contains("after 3 attempts"), "{status}");
    let (code, _) = app.get("/v1/email/suppressions/never@example.org").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    app.stop().await;
}

on_both!(a_hard_bounce_suppresses_the_address_and_later_sends_to_it_are_refused);
async fn a_hard_bounce_suppresses_the_address_and_later_sends_to_it_are_refused(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let hook = Hook::start(0).await;
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), Some(&hook), json!({})).await;

    let id = app.send("transactional", "hard@example.org").await;
    let status = app.wait_for(&id, "bounced").await;
    assert_eq!((status["bounce"].as_str(), status["smtp"]["code"].as_u64(), status["smtp"]["enhanced"].as_str()), (Some("hard"), Some(550), Some("5.1.1")));
    assert!(status["smtp"]["message"].as_str().unwrap().contains("User unknown"), "{status}");

    let (code, entry) = app.get("/v1/email/suppressions/Hard@Example.org").await;
    assert_eq!(code, StatusCode::OK, "{entry}");
    assert_eq!((entry["reason"].as_str(), entry["message_id"].as_str()), (Some("hard_bounce"), Some(id.as_str())));

    let (code, body) = app
        .post("/v1/email/messages", json!({"messages": [
            {"class": "bulk", "from": "shop@example.com", "to": "hard@example.org", "subject": "again", "text": "x"},
            {"class": "bulk", "from": "shop@example.com", "to": "ok@example.org", "subject": "fine", "text": "x"},
        ]}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!((body["messages"][0]["status"].as_str(), body["messages"][1]["status"].as_str()), (Some("suppressed"), Some("queued")));
    let refused = body["messages"][0]["id"].as_str().unwrap().to_string();
    app.wait_for(body["messages"][1]["id"].as_str().unwrap(), "delivered").await;
    let status = app.wait_for(&refused, "suppressed").await;
    assert_eq!(history(&status), ["suppressed"]);
    wait_until("the suppressed event on the webhook", || hook.events_of(&refused) == ["suppressed"]).await;
    assert_eq!(relay.accepted_for("hard@example.org").len(), 0);

    // Off the list, the address is tried again.
    assert_eq!(app.delete("/v1/email/suppressions/hard@example.org").await.0, StatusCode::NO_CONTENT);
    assert_eq!(app.delete("/v1/email/suppressions/hard@example.org").await.0, StatusCode::NOT_FOUND);
    let again = app.send("bulk", "hard@example.org").await;
    app.wait_for(&again, "bounced").await;
    app.stop().await;
}

on_both!(soft_bounces_and_policy_blocks_are_told_apart_and_do_not_suppress);
async fn soft_bounces_and_policy_blocks_are_told_apart_and_do_not_suppress(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), None, json!({})).await;

    let full = app.send("bulk", "full@example.org").await;
    let spam = app.send("bulk", "spam@example.org").await;
    let full = app.wait_for(&full, "bounced").await;
    let spam = app.wait_for(&spam, "bounced").await;
    assert_eq!((full["bounce"].as_str(), full["smtp"]["code"].as_u64(), full["smtp"]["enhanced"].as_str()), (Some("soft"), Some(552), Some("5.2.2")));
    assert_eq!((spam["bounce"].as_str(), spam["smtp"]["code"].as_u64(), spam["smtp"]["enhanced"].as_str()), (Some("block"), Some(550), Some("5.7.1")));
    assert_eq!((full["attempts"].as_u64(), spam["attempts"].as_u64()), (Some(1), Some(1)));
    let (_, list) = app.get("/v1/email/suppressions").await;
    assert_eq!(list["total"], 0, "{list}");
    app.stop().await;
}

on_both!(a_complaint_suppresses_the_address_and_marks_the_email_complained);
async fn a_complaint_suppresses_the_address_and_marks_the_email_complained(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let hook = Hook::start(0).await;
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), Some(&hook), json!({})).await;

    let id = app.send("bulk", "cat@example.org").await;
    app.wait_for(&id, "delivered").await;
    let (code, body) = app.post("/v1/email/complaints", json!({"complaints": [{"address": "Cat@example.org", "message_id": id, "feedback_type": "abuse"}]})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"suppressed": 1, "events": 1}));
    let status = app.wait_for(&id, "complained").await;
    assert_eq!(history(&status), ["queued", "delivered", "complained"]);
    let (_, entry) = app.get("/v1/email/suppressions/cat@example.org").await;
    assert_eq!((entry["reason"].as_str(), entry["detail"].as_str()), (Some("complaint"), Some("abuse")));
    wait_until("the complained event on the webhook", || hook.events_of(&id).contains(&"complained".to_string())).await;
    let (code, refused) = app.post("/v1/email/messages", json!({"messages": [{"class": "bulk", "from": "shop@example.com", "to": "cat@example.org", "subject": "s", "text": "x"}]})).await;
    assert_eq!((code, refused["messages"][0]["status"].as_str()), (StatusCode::ACCEPTED, Some("suppressed")));
    app.stop().await;
}

on_both!(the_recipient_domains_rate_limit_spaces_its_deliveries_and_leaves_other_domains_alone);
async fn the_recipient_domains_rate_limit_spaces_its_deliveries_and_leaves_other_domains_alone(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), None, json!({"domains": {"slow.example": {"rate_per_s": 5.0, "burst": 1}}})).await;

    let messages: Vec<Value> = (0..6)
        .map(|i| json!({"class": "transactional", "from": "shop@example.com", "to": format!("u{i}@slow.example"), "subject": "s", "text": "x"}))
        .chain((0..6).map(|i| json!({"class": "transactional", "from": "shop@example.com", "to": format!("u{i}@fast.example"), "subject": "s", "text": "x"})))
        .collect();
    let (code, body) = app.post("/v1/email/messages", json!({"messages": messages})).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let ids: Vec<String> = body["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    let mut slow = Vec::new();
    let mut fast = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let status = app.wait_for(id, "delivered").await;
        assert_eq!(status["attempts"], 1, "throttling is not an attempt: {status}");
        let at = status["updated_at_ms"].as_u64().unwrap() - status["accepted_at_ms"].as_u64().unwrap();
        if i < 6 { slow.push(at) } else { fast.push(at) }
    }
    slow.sort();
    // 6 emails at 5/s with a burst of 1: the last goes out at least 5 × 200 ms after the first.
    assert!(slow[5] - slow[0] >= 900, "slow.example deliveries were not spaced: {slow:?}");
    assert!(fast.iter().max().unwrap() < &slow[5], "fast.example waited for slow.example: fast {fast:?}, slow {slow:?}");
    let (_, overview) = app.get("/v1/email").await;
    assert!(overview["counts"]["throttled"].as_u64().unwrap() >= 5, "{overview}");
    app.stop().await;
}

on_both!(accepted_mail_waits_for_a_relay_and_the_queue_suppressions_and_config_survive_a_restart);
async fn accepted_mail_waits_for_a_relay_and_the_queue_suppressions_and_config_survive_a_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let app = App::start(dir.path(), &backend).await;
    let id = app.send("transactional", "dora@example.org").await;
    assert_eq!(app.put("/v1/email/suppressions/eve@example.org", json!({"detail": "asked to be removed"})).await.0, StatusCode::OK);
    app.configure(None, None, json!({"domain_rate": {"rate_per_s": 7.0, "burst": 3}})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.wait_for(&id, "queued").await["attempts"], 0);
    let (_, overview) = app.get("/v1/email").await;
    assert_eq!(overview["queues"]["transactional"]["depth"], 1, "{overview}");
    app.stop().await;

    let app = App::start(dir.path(), &backend).await;
    let (_, config) = app.get("/v1/email/config").await;
    assert_eq!(config["domain_rate"], json!({"rate_per_s": 7.0, "burst": 3}));
    let (code, entry) = app.get("/v1/email/suppressions/eve@example.org").await;
    assert_eq!((code, entry["reason"].as_str()), (StatusCode::OK, Some("manual")));
    assert_eq!(app.wait_for(&id, "queued").await["status"], "queued");
    app.configure(Some(&relay), None, json!({})).await;
    let status = app.wait_for(&id, "delivered").await;
    assert_eq!(history(&status), ["queued", "delivered"]);
    assert_eq!(relay.accepted_for("dora@example.org").len(), 1);
    app.stop().await;
}

on_both!(a_failing_webhook_is_retried_and_gets_every_event_once_in_order_and_can_replay);
async fn a_failing_webhook_is_retried_and_gets_every_event_once_in_order_and_can_replay(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start();
    let hook = Hook::start(2).await;
    let app = App::start(dir.path(), &backend).await;
    app.configure(Some(&relay), Some(&hook), json!({})).await;
    let ids: Vec<String> = futures_util::future::join_all((0..5).map(|i| {
        let app = &app;
        async move { app.send("bulk", &format!("f{i}@example.org")).await }
    }))
    .await;
    for id in &ids {
        app.wait_for(id, "delivered").await;
    }
    wait_until("10 webhook events", || hook.events.lock().len() >= 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let offsets: Vec<u64> = hook.events.lock().iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets.len(), 10, "{offsets:?}");
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "events out of order or repeated: {offsets:?}");
    assert!(hook.posts.load(Ordering::SeqCst) >= 3, "the two failed POSTs were not retried");
    let (_, overview) = app.get("/v1/email").await;
    assert!(overview["webhook"]["failures"].as_u64().unwrap() >= 2, "{overview}");

    let (code, body) = app.post("/v1/email/webhook/replay", json!({"from_offset": 0})).await;
    assert_eq!((code, body["from_offset"].as_u64()), (StatusCode::OK, Some(offsets[0])));
    wait_until("the replayed events", || hook.events.lock().len() >= 20).await;
    let replayed: Vec<u64> = hook.events.lock()[10..].iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(replayed, offsets);
    app.stop().await;
}

on_both!(bad_requests_get_errors_that_name_the_field_or_the_limit);
async fn bad_requests_get_errors_that_name_the_field_or_the_limit(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let check = |body: &Value, status: StatusCode, code: StatusCode, needle: &str| {
        assert_eq!(status, code, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(needle), "{body}");
    };
    let email = |to: &str| json!({"class": "bulk", "from": "shop@example.com", "to": to, "subject": "s", "text": "x"});

    let (status, body) = app.post("/v1/email/messages", json!({"messages": [email("ok@example.org"), email("not-an-address")]})).await;
    check(&body, status, StatusCode::BAD_REQUEST, "messages[1].to");
    let (status, body) = app.post("/v1/email/messages", json!({"messages": (0..1_001).map(|_| email("a@example.org")).collect::<Vec<_>>()})).await;
    check(&body, status, StatusCode::PAYLOAD_TOO_LARGE, "EMAILS_PER_REQUEST_MAX");
    let (status, body) = app.post("/v1/email/messages", json!({"messages": [{"class": "urgent", "from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "x"}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = app.post("/v1/email/messages", json!({"messages": [{"class": "bulk", "from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "x", "headers": {"Bcc": "c@example.org"}}]})).await;
    check(&body, status, StatusCode::BAD_REQUEST, "set by the system");
    let (status, body) = app.get("/v1/email/messages/nope-1").await;
    check(&body, status, StatusCode::NOT_FOUND, "not found");
    let (status, body) = app.put("/v1/email/config", json!({"webhook": {"url": "https://example.com/hook"}})).await;
    check(&body, status, StatusCode::BAD_REQUEST, "http://");
    let (status, body) = app.put("/v1/email/config", json!({"relay": {"host": "127.0.0.1", "port": 25, "pool_max": 0}})).await;
    check(&body, status, StatusCode::BAD_REQUEST, "RELAY_POOL_MAX_MAX");
    let (status, body) = app.put("/v1/email/suppressions/not-an-address", json!({})).await;
    check(&body, status, StatusCode::BAD_REQUEST, "not an email address");
    let (status, body) = app.post("/v1/email/webhook/replay", json!({"from_offset": 0})).await;
    check(&body, status, StatusCode::CONFLICT, "no webhook");
    let (status, body) = app.get("/v1/email/events?limit=5000").await;
    check(&body, status, StatusCode::BAD_REQUEST, "EVENTS_PAGE_MAX");
    // Nothing of the refused requests was queued.
    let (_, overview) = app.get("/v1/email").await;
    assert_eq!(overview["events"]["end_offset"], 0, "{overview}");
    app.stop().await;
}

/// Two nodes on one NATS namespace and one PostgreSQL schema: a configuration, a suppression or
/// an email accepted through either is the deployment's, and so is a domain's rate; the webhook
/// gets every event once, in order, from whichever node holds the lease, and the other takes
/// over when that one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_the_queues_the_status_db_and_one_webhook_poster() {
    let backend = Backend::nats();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let relay = Relay::start();
    let hook = Hook::start(0).await;
    let a = App::start(dir_a.path(), &backend).await;
    let b = App::start(dir_b.path(), &backend).await;
    a.configure(Some(&relay), Some(&hook), json!({})).await;
    // B reads the configuration written through A within CONFIG_REFRESH.
    let deadline = Instant::now() + super::CONFIG_REFRESH * 5;
    while b.get("/v1/email/config").await.1["relay"]["port"] != relay.port {
        assert!(Instant::now() < deadline, "node B never saw the configuration written through A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.put("/v1/email/suppressions/blocked@example.org", json!({})).await.0, StatusCode::OK);

    let mut ids = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { &a } else { &b };
        ids.push(node.send(if i % 3 == 0 { "transactional" } else { "bulk" }, &format!("n{i}@example.org")).await);
    }
    let (code, refused) = b.post("/v1/email/messages", json!({"messages": [{"class": "bulk", "from": "shop@example.com", "to": "Blocked@example.org", "subject": "s", "text": "x"}]})).await;
    assert_eq!((code, refused["messages"][0]["status"].as_str()), (StatusCode::ACCEPTED, Some("suppressed")), "a suppression written through A holds on B");
    for (i, id) in ids.iter().enumerate() {
        // Either node answers for any email.
        let status = if i % 2 == 0 { b.wait_for(id, "delivered").await } else { a.wait_for(id, "delivered").await };
        assert_eq!(history(&status), ["queued", "delivered"]);
    }
    for i in 0..20 {
        assert_eq!(relay.accepted_for(&format!("n{i}@example.org")).len(), 1, "n{i} was handed off once");
    }
    wait_until("41 webhook events", || hook.events.lock().len() >= 41).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let offsets = |hook: &Hook| hook.events.lock().iter().map(|e| e["offset"].as_u64().unwrap()).collect::<Vec<_>>();
    let posted = offsets(&hook);
    assert_eq!(posted.len(), 41, "one poster, every event once (20 queued, 20 delivered, 1 suppressed)");
    assert!(posted.windows(2).all(|w| w[1] == w[0] + 1), "events out of order or repeated: {posted:?}");

    // A domain's rate holds for the deployment, not per node: 6 emails at 5/s with a burst of 1,
    // sent through both nodes and sent by the workers of both, go out at least 5 × 200 ms apart.
    b.configure(Some(&relay), Some(&hook), json!({"domains": {"slow.example": {"rate_per_s": 5.0, "burst": 1}}})).await;
    let deadline = Instant::now() + super::CONFIG_REFRESH * 5;
    while a.get("/v1/email/config").await.1["domains"]["slow.example"].is_null() {
        assert!(Instant::now() < deadline, "node A never saw the configuration written through B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Workers take a new configuration from their next receive (each waits up to WORKER_WAIT).
    tokio::time::sleep(super::WORKER_WAIT * 3).await;
    let mut slow = Vec::new();
    for i in 0..6 {
        slow.push((if i % 2 == 0 { &a } else { &b }).send("transactional", &format!("s{i}@slow.example")).await);
    }
    let mut handed_off = Vec::new();
    for id in &slow {
        handed_off.push(a.wait_for(id, "delivered").await["updated_at_ms"].as_u64().unwrap());
    }
    handed_off.sort();
    assert!(handed_off[5] - handed_off[0] >= 900, "slow.example got more than its rate from two nodes: {handed_off:?}");
    wait_until("the slow emails' events", || slow.iter().all(|id| hook.events_of(id) == ["queued", "delivered"])).await;

    // The poster stops (giving its lease back); the other node posts what follows.
    let (poster, other) = if a.get("/v1/email").await.1["webhook"]["posts"].as_u64().unwrap() > 0 { (a, b) } else { (b, a) };
    poster.stop().await;
    let late = other.send("bulk", "late@example.org").await;
    other.wait_for(&late, "delivered").await;
    wait_until("the late email's events", || hook.events_of(&late) == ["queued", "delivered"]).await;
    let posted = offsets(&hook);
    assert!(posted.windows(2).all(|w| w[1] == w[0] + 1), "the handover repeated or skipped events: {posted:?}");
    other.stop().await;
    backend.forget().await;
}

/// A data folder from before the status DB: the configuration and the suppression list in
/// compacted topics, statuses only in the events log. The first start carries them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_from_before_the_status_db_keeps_its_configuration_suppressions_and_statuses() {
    use super::process::{Class, Email, Event, EventKind, Suppression, SuppressionReason};
    use tributary_core::Record;
    use tributary_engine::stream::TopicConfig;
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        let compacted = TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() };
        let config = json!({"domain_rate": {"rate_per_s": 7.0, "burst": 3}});
        engine.topics.create("email-config", compacted.clone()).unwrap().produce_to(0, &[Record::keyed("config", serde_json::to_vec(&config).unwrap())]).unwrap();
        let entry = |address: &str| Suppression { address: address.into(), reason: SuppressionReason::Manual, at_ms: 1, message_id: None, detail: Some("asked".into()) };
        let suppressions = engine.topics.create("email-suppressions", compacted).unwrap();
        for address in ["eve@example.org", "gone@example.org"] {
            suppressions.produce_to(0, &[Record::keyed(address, serde_json::to_vec(&entry(address)).unwrap())]).unwrap();
        }
        suppressions.produce_to(0, &[Record::tombstone("gone@example.org")]).unwrap();
        let events = engine.topics.create(super::EVENTS_TOPIC, TopicConfig { partitions: 1, retention_ms: Some(super::EVENTS_RETENTION_MS), ..TopicConfig::default() }).unwrap();
        let email = Email {
            id: "old-1".into(),
            class: Class::Bulk,
            from: "shop@example.com".into(),
            to: "ann@example.org".into(),
            subject: "s".into(),
            text: Some("x".into()),
            html: None,
            reply_to: None,
            headers: Default::default(),
            metadata: Default::default(),
            accepted_at_ms: 1,
        };
        let queued = Event::first(&email, EventKind::Queued, 1);
        let offset = events.produce_to(0, &[Record::keyed("old-1", serde_json::to_vec(&queued).unwrap())]).unwrap().base_offset;
        events.produce_to(0, &[Record::keyed("old-1", serde_json::to_vec(&queued.next(offset, EventKind::Delivered, 2)).unwrap())]).unwrap();
        engine.close().unwrap();
    }
    let app = App::start(dir.path(), &Backend::Embedded).await;
    assert_eq!(app.get("/v1/email/config").await.1["domain_rate"], json!({"rate_per_s": 7.0, "burst": 3}));
    let (code, entry) = app.get("/v1/email/suppressions/eve@example.org").await;
    assert_eq!((code, entry["detail"].as_str()), (StatusCode::OK, Some("asked")));
    assert_eq!(app.get("/v1/email/suppressions/gone@example.org").await.0, StatusCode::NOT_FOUND, "a tombstone is carried over as a removal");
    assert_eq!(app.get("/v1/email/suppressions").await.1["total"], 1);
    assert_eq!(history(&app.wait_for("old-1", "delivered").await), ["queued", "delivered"]);
    app.stop().await;
    // Carried over once: a later start does not bring a removed entry back.
    let app = App::start(dir.path(), &Backend::Embedded).await;
    assert_eq!(app.delete("/v1/email/suppressions/eve@example.org").await.0, StatusCode::NO_CONTENT);
    app.stop().await;
    let app = App::start(dir.path(), &Backend::Embedded).await;
    assert_eq!(app.get("/v1/email/suppressions/eve@example.org").await.0, StatusCode::NOT_FOUND);
    app.stop().await;
}
