//! `tributary bench SYSTEM`: a system driven over its public HTTP API, open loop, judged against
//! its seed targets.
//!
//! The load generator runs a fixed-rate schedule (the seed's rate unless `--rate` says
//! otherwise); every request carries its intended send time, and latency is measured from that
//! time, so a stall in the server shows in every request it delayed. The first
//! `--warmup-seconds` are sent but not measured. Against `--target URL` it drives a running
//! Tributary; without, it starts one in this process on a temporary data folder (the generator
//! then shares the machine's cores with the server, as a single-node deployment would).
//!
//! Scenarios: `basic-message-queue` (a publisher at the rate, `--consumers` workers receiving
//! with long polls and acking each message; success = every message consumed exactly once) and
//! `simple-pubsub` (the seed's subscriptions registered, publishes in batches, one live SSE
//! subscriber that must get every message once). Others are not written yet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;
use tributary_runtime::Catalogue;

use super::latency::{LatencyHistogram, LatencySummary, Schedule};
use super::{Machine, TargetCheck, Targets};

#[derive(Debug, Clone, Args)]
pub struct SystemArgs {
    /// The system's id, as `tributary systems` lists it.
    pub system: String,
    /// A running Tributary's base URL; without it one starts in this process.
    #[arg(long)]
    pub target: Option<String>,
    /// Messages per second offered (default: the seed's rate for the system).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Seconds of measured load after the warm-up.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 2)]
    pub warmup_seconds: u64,
    /// Consumers (workers) for queue scenarios (default: the seed's consumer count, else 3).
    #[arg(long)]
    pub consumers: Option<usize>,
    /// Bytes of payload per message.
    #[arg(long, default_value_t = 200)]
    pub message_bytes: usize,
    /// Pub/sub scenarios: subscriptions registered before the load (default: the seed's count).
    #[arg(long)]
    pub subscriptions: Option<usize>,
    /// Messages per publish request (pub/sub scenarios publish in batches).
    #[arg(long, default_value_t = 10)]
    pub publish_batch: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Target {
    pub rate: f64,
    pub percentile: u8,
    pub latency_ms: f64,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct SystemReport {
    pub system: String,
    pub phase: &'static str,
    pub offered_rate: f64,
    pub achieved_rate: f64,
    /// End to end: intended publish time to the consumer holding the message.
    pub latency_ms: LatencySummary,
    /// Intended publish time to the publish's 201 (durable).
    pub publish_ms: LatencySummary,
    pub messages: u64,
    pub errors: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub consumers: usize,
    pub target: Target,
    pub targets: Targets,
    pub server: String,
    pub machine: Option<Machine>,
}

/// How long consumers keep going after the last publish to collect stragglers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight from the publisher before it counts an error instead of piling up.
const PUBLISH_IN_FLIGHT_MAX: usize = 10_000;

pub async fn run(args: &SystemArgs) -> anyhow::Result<SystemReport> {
    let spec = Catalogue::get().system(&args.system).with_context(|| format!("{} is not a system of the catalogue", args.system))?;
    let latency = spec.nonfunctional.latency.as_ref().context("the system has no latency target")?;
    let seed_rate = spec.nonfunctional.rate_per_s.context("the system has no rate target")?;
    let rate = args.rate.unwrap_or(seed_rate.round() as u64).max(1);
    let (base, server, machine, _server_guard) = match &args.target {
        Some(url) => (url.trim_end_matches('/').to_string(), "remote".to_string(), None, None),
        None => {
            let data = tempfile::Builder::new().prefix("tributary-bench-").tempdir()?;
            let machine = Machine::probe(data.path());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?;
            let config = crate::platform::UpConfig { listen: address, data: data.path().to_path_buf(), tokens: Vec::new(), announce: false };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let handle = tokio::spawn(crate::platform::run(config, listener, async move {
                let _ = stopped.await;
            }));
            (format!("http://{address}"), "in-process".to_string(), Some(machine), Some((stop, handle, data)))
        }
    };
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    wait_healthy(&client, &base).await?;
    let measured = match args.system.as_str() {
        "basic-message-queue" => {
            let consumers = args.consumers.unwrap_or(spec.constants.get("consumer_count").and_then(|c| c.value).map_or(3, |v| v as usize));
            queue_scenario(&client, &base, args, rate, consumers).await?
        }
        "simple-pubsub" => {
            let subscriptions = args.subscriptions.unwrap_or(spec.constants.get("subscribers").and_then(|c| c.value).map_or(1_000_000, |v| v as usize));
            pubsub_scenario(&client, &base, args, rate, subscriptions).await?
        }
        other => bail!("no bench scenario for {other} yet (written: basic-message-queue, simple-pubsub)"),
    };
    if let Some((stop, handle, data)) = _server_guard {
        let _ = stop.send(());
        handle.await??;
        drop(data);
    }
    let summary = measured.end_to_end.summary();
    let observed = match latency.percentile {
        50 => summary.p50,
        95 => summary.p95,
        99 => summary.p99,
        _ => summary.p999,
    };
    let achieved_rate = measured.measured_messages as f64 / args.seconds.max(1) as f64;
    let met = observed <= latency.ms && achieved_rate >= rate as f64 * 0.99 && measured.lost == 0 && measured.duplicated == 0;
    let check = |metric, target, applies| TargetCheck { metric, target, applies_to: "the seed's rate and latency", applies, measured: None, met: None };
    let targets = Targets::new(
        "seed",
        vec![
            check("achieved_rate", "seed rate", true).judge(Some(achieved_rate), seed_rate * 0.99, true),
            check("latency_ms", "seed latency at its percentile", true).judge(Some(observed), latency.ms, false),
            check("lost", "0", true).judge(Some(measured.lost as f64), 0.0, false),
        ],
    );
    Ok(SystemReport {
        system: args.system.clone(),
        phase: "normal",
        offered_rate: rate as f64,
        achieved_rate,
        latency_ms: summary,
        publish_ms: measured.publish.summary(),
        messages: measured.sent,
        errors: measured.errors,
        lost: measured.lost,
        duplicated: measured.duplicated,
        consumers: measured.consumers,
        target: Target { rate: seed_rate, percentile: latency.percentile, latency_ms: latency.ms, met },
        targets,
        server,
        machine,
    })
}

async fn wait_healthy(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{base}/healthz did not answer")
}

struct Measured {
    end_to_end: LatencyHistogram,
    publish: LatencyHistogram,
    sent: u64,
    measured_messages: u64,
    errors: u64,
    lost: u64,
    duplicated: u64,
    consumers: usize,
}

/// Subscriptions registered per request while preparing a pub/sub run.
const REGISTER_BATCH: usize = 10_000;

/// simple-pubsub: register `subscriptions` wildcard subscriptions that the load does not match
/// (they sit in the trie, as the seed's million subscribers would), then publish at `rate` in
/// batches while one live SSE subscriber on `bench.>` receives everything; latency runs from a
/// batch's intended send time to the subscriber reading each message.
async fn pubsub_scenario(client: &reqwest::Client, base: &str, args: &SystemArgs, rate: u64, subscriptions: usize) -> anyhow::Result<Measured> {
    use futures_util::StreamExt;
    let mut registered = 0;
    while registered < subscriptions {
        let n = REGISTER_BATCH.min(subscriptions - registered);
        let batch: Vec<_> = (registered..registered + n)
            .map(|i| json!({"name": format!("idle-{i}"), "patterns": [format!("tenant.{}.device.{i}.*", i % 1000)], "policy": "drop_oldest"}))
            .collect();
        let response = client.post(format!("{base}/v1/pubsub/subscriptions:batch")).json(&json!({"subscriptions": batch})).send().await?;
        anyhow::ensure!(response.status().is_success(), "registering subscriptions: {}", response.text().await.unwrap_or_default());
        registered += n;
    }
    let put = client.put(format!("{base}/v1/pubsub/subscriptions/bench-live")).json(&json!({"patterns": ["bench.>"], "policy": "catch_up", "buffer": 100_000})).send().await?;
    anyhow::ensure!(put.status().is_success(), "creating the live subscription: {}", put.text().await.unwrap_or_default());

    let batch = args.publish_batch.max(1);
    let total = rate * (args.warmup_seconds + args.seconds);
    let warmup = rate * args.warmup_seconds;
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(300), rate);
    let errors = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::new(Mutex::new(HashMap::with_capacity(total as usize)));
    let end_to_end = Arc::new(Mutex::new(LatencyHistogram::new()));
    let consumed = Arc::new(AtomicU64::new(0));
    let events = client.get(format!("{base}/v1/pubsub/subscriptions/bench-live/events")).send().await?;
    anyhow::ensure!(events.status().is_success(), "opening the SSE stream: {}", events.status());
    let reader = {
        let (seen, end_to_end, consumed) = (seen.clone(), end_to_end.clone(), consumed.clone());
        tokio::spawn(async move {
            let mut stream = events.bytes_stream();
            let mut pending = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
                    let (Some(seq), Some(intended)) = (value["data"]["seq"].as_u64(), value["data"]["t"].as_u64()) else { continue };
                    let now_ns = schedule.elapsed_ns();
                    let first = {
                        let mut seen = seen.lock();
                        let n = seen.entry(seq).or_insert(0);
                        *n += 1;
                        *n == 1
                    };
                    if first && seq >= warmup {
                        end_to_end.lock().record_ns(now_ns.saturating_sub(intended));
                    }
                    consumed.fetch_add(1, Ordering::AcqRel);
                }
            }
        })
    };

    let publish = Arc::new(Mutex::new(LatencyHistogram::new()));
    let acknowledged: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISH_IN_FLIGHT_MAX));
    let padding = "x".repeat(args.message_bytes.saturating_sub(40));
    let mut sent = 0u64;
    let mut first = 0u64;
    while first < total {
        let intended = schedule.intended_ns(first);
        let now = schedule.elapsed_ns();
        if intended > now {
            tokio::time::sleep(Duration::from_nanos(intended - now)).await;
        }
        let last = (first + batch).min(total);
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            errors.fetch_add(1, Ordering::Relaxed);
            first = last;
            continue;
        };
        let messages: Vec<_> = (first..last).map(|seq| json!({"subject": format!("bench.{}", seq % 100), "data": {"seq": seq, "t": intended, "pad": padding}})).collect();
        sent += last - first;
        let (client, base, publish, errors, acknowledged) = (client.clone(), base.to_string(), publish.clone(), errors.clone(), acknowledged.clone());
        let seqs = first..last;
        tokio::spawn(async move {
            match client.post(format!("{base}/v1/pubsub/publish")).json(&json!({"messages": messages})).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                    acknowledged.lock().extend(seqs.clone());
                    if seqs.start >= warmup {
                        publish.lock().record_ns_n(schedule.elapsed_ns().saturating_sub(intended), seqs.end - seqs.start);
                    }
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        first = last;
    }
    let _ = in_flight.acquire_many(PUBLISH_IN_FLIGHT_MAX as u32).await;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while consumed.load(Ordering::Acquire) < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    reader.abort();
    let seen = seen.lock();
    let lost = acknowledged.lock().iter().filter(|seq| !seen.contains_key(seq)).count() as u64;
    let duplicated = seen.values().filter(|n| **n > 1).count() as u64;
    let end_to_end = end_to_end.lock().clone();
    let publish = publish.lock().clone();
    Ok(Measured { measured_messages: end_to_end.count(), end_to_end, publish, sent, errors: errors.load(Ordering::Relaxed), lost, duplicated, consumers: 1 })
}

async fn queue_scenario(client: &reqwest::Client, base: &str, args: &SystemArgs, rate: u64, consumers: usize) -> anyhow::Result<Measured> {
    let queue = format!("bench-{}", std::process::id());
    let total = rate * (args.warmup_seconds + args.seconds);
    let warmup = rate * args.warmup_seconds;
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(100), rate);
    let padding = "x".repeat(args.message_bytes.saturating_sub(40));
    let errors = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::new(Mutex::new(HashMap::with_capacity(total as usize)));
    let end_to_end = Arc::new(Mutex::new(LatencyHistogram::new()));
    let publish = Arc::new(Mutex::new(LatencyHistogram::new()));
    let acknowledged: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let done = Arc::new(tokio::sync::Notify::new());
    let consumed = Arc::new(AtomicU64::new(0));

    let mut workers = Vec::new();
    for c in 0..consumers {
        let (client, base, queue) = (client.clone(), base.to_string(), queue.clone());
        let (seen, end_to_end, errors, consumed, done) = (seen.clone(), end_to_end.clone(), errors.clone(), consumed.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            loop {
                if consumed.load(Ordering::Acquire) >= total {
                    done.notify_waiters();
                    return;
                }
                let body = json!({"group": "bench", "consumer": format!("worker-{c}"), "max": 100, "wait_ms": 500, "lease_ms": 30_000});
                let response = match client.post(format!("{base}/v1/queues/{queue}/receive")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => r,
                    Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(value) = response.json::<serde_json::Value>().await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let now_ns = schedule.elapsed_ns();
                let messages = value["messages"].as_array().cloned().unwrap_or_default();
                let mut receipts = Vec::with_capacity(messages.len());
                for message in &messages {
                    let (Some(seq), Some(intended)) = (message["body"]["seq"].as_u64(), message["body"]["t"].as_u64()) else { continue };
                    receipts.push(message["receipt"].clone());
                    let first = {
                        let mut seen = seen.lock();
                        let n = seen.entry(seq).or_insert(0);
                        *n += 1;
                        *n == 1
                    };
                    if first && seq >= warmup {
                        end_to_end.lock().record_ns(now_ns.saturating_sub(intended));
                    }
                }
                if receipts.is_empty() {
                    continue;
                }
                let ack = json!({"group": "bench", "receipts": receipts});
                match client.post(format!("{base}/v1/queues/{queue}/ack")).json(&ack).send().await {
                    Ok(r) if r.status().is_success() => {
                        consumed.fetch_add(receipts.len() as u64, Ordering::AcqRel);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISH_IN_FLIGHT_MAX));
    let mut sent = 0u64;
    for i in 0..total {
        let intended = schedule.intended_ns(i);
        let now = schedule.elapsed_ns();
        if intended > now {
            tokio::time::sleep(Duration::from_nanos(intended - now)).await;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        sent += 1;
        let (client, base, queue, publish, errors, acknowledged) = (client.clone(), base.to_string(), queue.clone(), publish.clone(), errors.clone(), acknowledged.clone());
        let body = json!({"messages": [{"body": {"seq": i, "t": intended, "pad": padding}}]});
        tokio::spawn(async move {
            let result = client.post(format!("{base}/v1/queues/{queue}/messages")).json(&body).send().await;
            match result {
                Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                    acknowledged.lock().push(i);
                    if i >= warmup {
                        publish.lock().record_ns(schedule.elapsed_ns().saturating_sub(intended));
                    }
                }
                _ => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    let _ = in_flight.acquire_many(PUBLISH_IN_FLIGHT_MAX as u32).await;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while consumed.load(Ordering::Acquire) < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for worker in workers {
        worker.abort();
    }
    let seen = seen.lock();
    // Lost: acknowledged by the server (201) and never consumed.
    let lost = acknowledged.lock().iter().filter(|seq| !seen.contains_key(seq)).count() as u64;
    let duplicated = seen.values().filter(|n| **n > 1).count() as u64;
    let end_to_end = end_to_end.lock().clone();
    let publish = publish.lock().clone();
    Ok(Measured {
        measured_messages: end_to_end.count(),
        end_to_end,
        publish,
        sent,
        errors: errors.load(Ordering::Relaxed),
        lost,
        duplicated,
        consumers,
    })
}
