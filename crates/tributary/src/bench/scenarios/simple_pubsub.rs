//! simple-pubsub under load: the seed's subscriptions registered first (wildcard patterns the
//! load does not match, so they sit in the trie as the seed's million subscribers would), then
//! publishes in batches of `--publish-batch` on subjects `{run}.0` … `{run}.99`, and one live SSE
//! subscriber on `{run}.>` (policy `catch_up`). Success: the subscriber got every acknowledged
//! message, once.

use std::ops::Range;
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{Run, Scenario, padding};
use crate::bench::system::SystemArgs;

pub struct SimplePubsub {
    subscriptions: usize,
    batch: u64,
    padding: String,
}

/// Subscriptions when neither `--subscriptions` nor the seed's `subscribers` says.
const SUBSCRIPTIONS_DEFAULT: usize = 1_000_000;
/// Subscriptions registered per request while preparing.
const REGISTER_BATCH: usize = 10_000;
/// Bytes of a message's data besides its padding.
const DATA_OVERHEAD_BYTES: usize = 40;

impl Scenario for SimplePubsub {
    const SYSTEM: &'static str = "simple-pubsub";

    fn new(args: &SystemArgs, spec: &SystemSpec) -> anyhow::Result<Self> {
        let subscriptions = args.subscriptions.unwrap_or(spec.constants.get("subscribers").and_then(|c| c.value).map_or(SUBSCRIPTIONS_DEFAULT, |v| v as usize));
        Ok(SimplePubsub { subscriptions, batch: args.publish_batch.max(1), padding: padding(args.message_bytes, DATA_OVERHEAD_BYTES) })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    fn describe(&self) -> serde_json::Value {
        json!({"subscriptions": self.subscriptions, "publish_batch": self.batch, "consumers": 1})
    }

    async fn prepare(&self, run: &Arc<Run>) -> anyhow::Result<()> {
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
        let live = format!("{}/v1/pubsub/subscriptions/{}-live", run.base, run.name);
        let put = run.client.put(live).json(&json!({"patterns": [format!("{}.>", run.name)], "policy": "catch_up", "buffer": 100_000})).send().await?;
        anyhow::ensure!(put.status().is_success(), "creating the live subscription: {}", put.text().await.unwrap_or_default());
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let events = run.client.get(format!("{}/v1/pubsub/subscriptions/{}-live/events", run.base, run.name)).send().await?;
        anyhow::ensure!(events.status().is_success(), "opening the SSE stream: {}", events.status());
        let run = run.clone();
        Ok(vec![tokio::spawn(async move {
            let mut stream = events.bytes_stream();
            let mut pending = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                pending.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
                    let Some(seq) = value["data"]["seq"].as_u64() else { continue };
                    run.delivered(0, seq);
                }
            }
        })])
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let messages: Vec<_> = seqs.map(|seq| json!({"subject": format!("{}.{}", run.name, seq % 100), "data": {"seq": seq, "pad": self.padding}})).collect();
        let response = run.client.post(format!("{}/v1/pubsub/publish", run.base)).json(&json!({"messages": messages})).send().await?;
        anyhow::ensure!(response.status() == reqwest::StatusCode::CREATED, "publish answered {}", response.status());
        Ok(())
    }
}
