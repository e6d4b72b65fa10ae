//! The bench harness measured against servers whose faults are known: a stall must show in the
//! percentiles, a message acknowledged and never delivered must be counted lost, one delivered
//! twice counted duplicated; and the failure phase against the real server must restart it,
//! kill a worker, and still account for every message.
//!
//! The fake server speaks the part of basic-message-queue's API the scenario uses (publish,
//! long-poll receive, ack, delete), in memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{Value, json};
use tributary::bench::latency::LatencyHistogram;
use tributary::bench::system::{SystemArgs, SystemReport, run};

/// What the fake queue does wrong.
#[derive(Default, Clone, Copy)]
struct Faults {
    /// Publishing this seq holds the whole server for `STALL`, once.
    stall_at: Option<u64>,
    /// Acknowledge this seq, then forget it.
    drop: Option<u64>,
    /// Deliver this seq twice.
    duplicate: Option<u64>,
}

const STALL: Duration = Duration::from_millis(500);

struct Fake {
    faults: Faults,
    stalled: AtomicBool,
    /// Every handler passes through it: a stall holds it, as a blocked disk or a GC pause
    /// would hold a real server.
    gate: tokio::sync::Mutex<()>,
    queue: parking_lot::Mutex<VecDeque<Value>>,
}

async fn publish(State(fake): State<Arc<Fake>>, Path(_queue): Path<String>, Json(request): Json<Value>) -> (StatusCode, Json<Value>) {
    let _gate = fake.gate.lock().await;
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    for message in &messages {
        let seq = message["body"]["seq"].as_u64().expect("the scenario sends seq");
        if fake.faults.stall_at == Some(seq) && !fake.stalled.swap(true, Ordering::AcqRel) {
            tokio::time::sleep(STALL).await;
        }
        if fake.faults.drop == Some(seq) {
            continue;
        }
        let copies = if fake.faults.duplicate == Some(seq) { 2 } else { 1 };
        for _ in 0..copies {
            fake.queue.lock().push_back(message["body"].clone());
        }
    }
    let ids: Vec<String> = (0..messages.len()).map(|i| format!("p0-{i}")).collect();
    (StatusCode::CREATED, Json(json!({"ids": ids})))
}

async fn receive(State(fake): State<Arc<Fake>>, Path(_queue): Path<String>, Json(request): Json<Value>) -> Json<Value> {
    let max = request["max"].as_u64().unwrap_or(1) as usize;
    let deadline = Instant::now() + Duration::from_millis(request["wait_ms"].as_u64().unwrap_or(0));
    loop {
        // Through the gate only when there is something to take: idle polls would crowd it.
        let waiting = !fake.queue.lock().is_empty();
        let batch: Vec<Value> = if !waiting {
            Vec::new()
        } else {
            let _gate = fake.gate.lock().await;
            let mut queue = fake.queue.lock();
            let n = max.min(queue.len());
            queue.drain(..n).enumerate().map(|(i, body)| json!({"body": body, "receipt": format!("r{i}")})).collect()
        };
        if !batch.is_empty() || Instant::now() >= deadline {
            return Json(json!({"messages": batch}));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn fake_queue(faults: Faults) -> String {
    let fake = Arc::new(Fake { faults, stalled: AtomicBool::new(false), gate: tokio::sync::Mutex::new(()), queue: parking_lot::Mutex::new(VecDeque::new()) });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/queues/{queue}/messages", post(publish))
        .route("/v1/queues/{queue}/receive", post(receive))
        .route("/v1/queues/{queue}/ack", post(|| async { Json(json!({})) }))
        .route("/v1/queues/{queue}", delete(|| async { StatusCode::NO_CONTENT }))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[derive(Parser)]
struct Command {
    #[command(flatten)]
    args: SystemArgs,
}

async fn bench(words: &[&str]) -> Vec<SystemReport> {
    let args = Command::parse_from(std::iter::once("bench").chain(words.iter().copied())).args;
    run(&args).await.expect("the bench runs")
}

/// The benches of this file run one at a time: each is a load test, and the machine's cores
/// are what it measures.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 500 msgs/s for 1 s of warm-up and 3 measured; two workers.
async fn bench_fake(faults: Faults) -> SystemReport {
    let url = fake_queue(faults).await;
    let mut reports = bench(&["basic-message-queue", "--target", &url, "--rate", "500", "--warmup-seconds", "1", "--seconds", "3", "--consumers", "2", "--json"]).await;
    assert_eq!(reports.len(), 1);
    reports.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_second_stall_shows_in_p99_and_max_though_a_closed_loop_client_would_hide_it() {
    let _serial = serial();
    // Message 1,000 is published 1 s into the measured window and holds the server for 500 ms.
    let report = bench_fake(Faults { stall_at: Some(1_000), ..Faults::default() }).await;
    let l = report.latency_ms;
    assert_eq!(l.count, 1_500, "every measured message was timed: {report:?}");
    assert!(l.max >= 450.0, "the stalled message itself: {l:?}");
    assert!(l.p99 >= 300.0, "the ~250 messages intended during the stall all waited for it: {l:?}");
    assert!(l.p50 < l.p99 / 2.0, "most messages were not delayed: {l:?}");
    assert_eq!((report.lost, report.duplicated, report.errors), (0, 0, 0));
    let per_second_max = report.series.iter().map(|s| s.max_ms).fold(0.0, f64::max);
    assert!(per_second_max >= 450.0, "the per-second series shows the stall too: {:?}", report.series);

    // The same stall timed by a closed-loop client (each request from its own send): one slow
    // request in 2,000, below p99.
    let url = fake_queue(Faults { stall_at: Some(1_000), ..Faults::default() }).await;
    let client = reqwest::Client::new();
    let mut closed_loop = LatencyHistogram::new();
    for seq in 0..2_000u64 {
        let began = Instant::now();
        let response = client.post(format!("{url}/v1/queues/q/messages")).json(&json!({"messages": [{"body": {"seq": seq}}]})).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        closed_loop.record_ns(began.elapsed().as_nanos() as u64);
    }
    let closed_loop = closed_loop.summary();
    assert!(closed_loop.max >= 450.0, "{closed_loop:?}");
    assert!(closed_loop.p99 < 100.0, "a closed loop hides the stall: {closed_loop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_and_never_delivered_is_lost_and_one_delivered_twice_is_duplicated() {
    let _serial = serial();
    let report = bench_fake(Faults { drop: Some(1_000), duplicate: Some(1_200), ..Faults::default() }).await;
    assert_eq!(report.lost, 1, "{report:?}");
    assert_eq!(report.duplicated, 1, "{report:?}");
    assert_eq!(report.errors, 0);
    assert!(!report.target.met, "a lost message fails the run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faithful_server_loses_and_duplicates_nothing_and_carries_the_rate() {
    let _serial = serial();
    let report = bench_fake(Faults::default()).await;
    assert_eq!((report.lost, report.duplicated, report.unexpected, report.errors), (0, 0, 0, 0), "{report:?}");
    assert!(report.achieved_rate >= 495.0, "{report:?}");
    assert_eq!(report.messages, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_failure_phase_restarts_the_server_and_kills_a_worker_and_loses_nothing() {
    let _serial = serial();
    let reports = bench(&["basic-message-queue", "--phase", "failure", "--rate", "200", "--warmup-seconds", "1", "--failure-seconds", "8", "--json"]).await;
    let report = &reports[0];
    assert_eq!(report.phase, "failure");
    assert_eq!(report.server, "in-process");
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.unexpected, 0, "{report:?}");
    let kinds: Vec<&str> = report.faults.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, ["worker_killed", "server_restarted"], "{report:?}");
    let killed = &report.faults[0];
    assert!(killed.held.unwrap() >= 1, "the worker died holding messages: {killed:?}");
    let recovered = killed.recovered_ms.expect("another worker got the held messages");
    assert!(recovered >= 4_000.0, "they came back when the 5 s leases ran out: {killed:?}");
    let restarted = &report.faults[1];
    assert!(restarted.down_ms.is_some() && restarted.recovered_ms.is_some(), "{restarted:?}");
    assert!(report.target.met, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_subscribers_resume_across_a_restart_with_no_gap_and_no_duplicate() {
    let _serial = serial();
    let reports = bench(&["simple-pubsub", "--phase", "failure", "--rate", "200", "--subscriptions", "100", "--warmup-seconds", "1", "--failure-seconds", "6", "--json"]).await;
    let report = &reports[0];
    let kinds: Vec<&str> = report.faults.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, ["server_restarted"], "{report:?}");
    assert_eq!((report.lost, report.duplicated, report.unexpected), (0, 0, 0), "{report:?}");
    assert!(report.target.met, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // `serial()` holds the lock across the run on purpose: one load test at a time.
async fn chat_members_resync_across_a_restart_with_no_gap_no_duplicate_and_in_order() {
    let _serial = serial();
    let reports = bench(&["realtime-chat-messages", "--phase", "failure", "--rate", "200", "--subscriptions", "10", "--warmup-seconds", "1", "--failure-seconds", "6", "--json"]).await;
    let report = &reports[0];
    let kinds: Vec<&str> = report.faults.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, ["server_restarted"], "{report:?}");
    assert_eq!((report.lost, report.duplicated, report.unexpected), (0, 0, 0), "{report:?}");
    assert!(report.target.met, "{report:?}");
}
