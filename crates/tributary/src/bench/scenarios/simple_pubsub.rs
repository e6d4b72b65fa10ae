//! simple-pubsub under load: the seed's subscriptions registered first (wildcard patterns the
//! load does not match, so they sit in the trie as the seed's million subscribers would; once
//! per process), then device readings published in batches of `--publish-batch` on
//! `{run}.tenant.{t}.device.{d}.{metric}`, tenants Zipf-skewed over 1,000.
//!
//! Four live SSE subscribers (policy `catch_up`) check routing as well as delivery: one on
//! `{run}.>` must get every message, and one each on the hottest tenant, a warm one and a cold
//! one (`{run}.tenant.{t}.>`) must get exactly that tenant's messages; anything else they get
//! is counted as unexpected. Success: every subscriber got every acknowledged message it
//! subscribed to, once. A subscriber whose stream ends (the failure phase restarts the server)
//! reconnects with `Last-Event-ID`, which the system promises resumes with no gap and no
//! duplicate.

use std::ops::Range;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{PUBLISH_BATCH_DEFAULT, Run, Scenario, Zipf, expect_status, mix, padding, publish_batch};
use crate::bench::system::SystemArgs;

pub struct SimplePubsub {
    subscriptions: usize,
    batch: u64,
    padding: String,
    /// The idle subscriptions are registered by the first phase and kept for the others.
    registered: AtomicBool,
}

/// Subscriptions when neither `--subscriptions` nor the seed's `subscribers` says.
const SUBSCRIPTIONS_DEFAULT: usize = 1_000_000;
/// Subscriptions registered per request while preparing.
const REGISTER_BATCH: usize = 10_000;
/// Bytes of a message's data besides its padding.
const DATA_OVERHEAD_BYTES: usize = 90;
const TENANTS: usize = 1_000;
const DEVICES: u64 = 10_000;
const METRICS: [&str; 4] = ["temperature", "humidity", "battery", "status"];
/// The tenants with a subscriber of their own, after the firehose (receiver 0): the hottest,
/// a warm and a cold one.
const WATCHED_TENANTS: [usize; 3] = [0, 9, 499];
/// Messages a live subscription buffers for its connection.
const LIVE_BUFFER: u64 = 100_000;
static TENANT_SKEW: LazyLock<Zipf> = LazyLock::new(|| Zipf::new(TENANTS, 1.0));

impl Scenario for SimplePubsub {
    const SYSTEM: &'static str = "simple-pubsub";

    fn new(args: &SystemArgs, spec: &SystemSpec) -> anyhow::Result<Self> {
        let subscriptions = args.subscriptions.unwrap_or(spec.constants.get("subscribers").and_then(|c| c.value).map_or(SUBSCRIPTIONS_DEFAULT, |v| v as usize));
        Ok(SimplePubsub { subscriptions, batch: publish_batch(args, PUBLISH_BATCH_DEFAULT), padding: padding(args.message_bytes, DATA_OVERHEAD_BYTES), registered: AtomicBool::new(false) })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    fn receivers(&self) -> usize {
        1 + WATCHED_TENANTS.len()
    }

    fn expects(&self, receiver: usize, seq: u64) -> bool {
        receiver == 0 || TENANT_SKEW.key(seq) == WATCHED_TENANTS[receiver - 1]
    }

    fn describe(&self) -> serde_json::Value {
        json!({"subscriptions": self.subscriptions, "publish_batch": self.batch, "live_subscribers": 1 + WATCHED_TENANTS.len(), "watched_tenants": WATCHED_TENANTS, "tenants": TENANTS, "tenant_skew": "zipf 1.0"})
    }

    async fn prepare(&self, run: &Arc<Run>) -> anyhow::Result<()> {
        if !self.registered.load(Ordering::Acquire) {
            let mut registered = 0;
            while registered < self.subscriptions {
                let n = REGISTER_BATCH.min(self.subscriptions - registered);
                let batch: Vec<_> = (registered..registered + n)
                    .map(|i| json!({"name": format!("idle-{i}"), "patterns": [format!("tenant.{}.device.{i}.*", i % 1000)], "policy": "drop_oldest"}))
                    .collect();
                let response = run.client.post(format!("{}/v1/pubsub/subscriptions:batch", run.base)).json(&json!({"subscriptions": batch})).send().await?;
                anyhow::ensure!(response.status().is_success(), "registering subscriptions: {}", response.text().await.unwrap_or_default());
                registered += n;
            }
            self.registered.store(true, Ordering::Release);
        }
        for receiver in 0..self.receivers() {
            let pattern = match receiver {
                0 => format!("{}.>", run.name),
                r => format!("{}.tenant.{}.>", run.name, WATCHED_TENANTS[r - 1]),
            };
            let put = run.client.put(subscription(run, receiver)).json(&json!({"patterns": [pattern], "policy": "catch_up", "buffer": LIVE_BUFFER})).send().await?;
            anyhow::ensure!(put.status().is_success(), "creating the live subscription: {}", put.text().await.unwrap_or_default());
        }
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let mut receivers = Vec::new();
        for receiver in 0..self.receivers() {
            let events = format!("{}/events", subscription(run, receiver));
            let first = run.client.get(&events).send().await?;
            anyhow::ensure!(first.status().is_success(), "opening the SSE stream: {}", first.status());
            receivers.push(tokio::spawn(subscribe(run.clone(), receiver, events, first)));
        }
        Ok(receivers)
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let messages: Vec<_> = seqs
            .map(|seq| {
                let random = mix(seq);
                let (device, metric) = (random % DEVICES, METRICS[(random >> 40) as usize % METRICS.len()]);
                json!({
                    "subject": format!("{}.tenant.{}.device.{device}.{metric}", run.name, TENANT_SKEW.key(seq)),
                    "data": {"seq": seq, "device": device, "metric": metric, "value": (random >> 20) % 10_000, "ts_ms": run.schedule.intended_ns(seq) / 1_000_000, "pad": self.padding},
                })
            })
            .collect();
        let response = run.client.post(format!("{}/v1/pubsub/publish", run.base)).json(&json!({"messages": messages})).send().await?;
        expect_status(response, reqwest::StatusCode::CREATED, "publish").await
    }

    async fn finish(&self, run: &Arc<Run>) {
        for receiver in 0..self.receivers() {
            let _ = run.client.delete(subscription(run, receiver)).send().await;
        }
    }
}

fn subscription(run: &Run, receiver: usize) -> String {
    format!("{}/v1/pubsub/subscriptions/{}-live-{receiver}", run.base, run.name)
}

/// Read one SSE stream until aborted, reconnecting with `Last-Event-ID` when it ends.
async fn subscribe(run: Arc<Run>, receiver: usize, events: String, first: reqwest::Response) {
    let mut last_id: Option<String> = None;
    let mut response = Some(first);
    loop {
        let current = match response.take() {
            Some(r) => r,
            None => {
                let mut request = run.client.get(&events);
                if let Some(id) = &last_id {
                    request = request.header("Last-Event-ID", id);
                }
                match request.send().await {
                    Ok(r) if r.status().is_success() => r,
                    _ => {
                        run.error();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        let mut stream = current.bytes_stream();
        let (mut pending, mut data, mut id) = (String::new(), String::new(), None::<String>);
        while let Some(Ok(chunk)) = stream.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    // End of an event: dispatch it.
                    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&data)
                        && let Some(seq) = value["data"]["seq"].as_u64()
                    {
                        run.delivered(receiver, seq);
                    }
                    if id.is_some() {
                        last_id = id.take();
                    }
                    data.clear();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                } else if let Some(value) = line.strip_prefix("id:") {
                    id = Some(value.trim().to_string());
                }
            }
        }
    }
}
