//! realtime-notifications under load: `--consumers` WebSocket connections (default 1,000, from
//! 10 to 1,000) share the seed's 1,000 topics (`{run}-t<i>`), each topic held by exactly one
//! connection; the publisher posts batches of `--publish-batch` notifications to the topics in
//! turn, so each notification is delivered once, to one connection: at the seed's 100,000/s that
//! is 100,000 deliveries/s in frames batched per connection. Latency runs from a batch's intended
//! send time to the connection parsing the notification, so it includes the durable append
//! (fsync), the fan-out, the frame and the client. Success: every acknowledged notification
//! arrived, once.
//!
//! Not measured here: the seed's 1,000 connections per topic (10^8 deliveries/s would measure the
//! load generator), and how many connections a node holds (`tributary bench connections`).

use std::ops::Range;
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{PUBLISH_BATCH_DEFAULT, Run, Scenario, expect_status, padding, publish_batch};
use crate::bench::system::SystemArgs;

pub struct RealtimeNotifications {
    connections: usize,
    topics: usize,
    batch: u64,
    padding: String,
}

/// Connections when `--consumers` does not say.
const CONNECTIONS_DEFAULT: usize = 1_000;
/// Fewest connections: each holds at most TOPICS_PER_CONNECTION_MAX (100) topics.
const CONNECTIONS_MIN: usize = 10;
/// Topics when the seed's `topics_count` is missing.
const TOPICS_DEFAULT: usize = 1_000;
/// Bytes of a notification's data besides its padding.
const DATA_OVERHEAD_BYTES: usize = 40;

impl RealtimeNotifications {
    fn topic(&self, run: &Run, i: usize) -> String {
        format!("{}-t{}", run.name, i % self.topics)
    }
}

impl Scenario for RealtimeNotifications {
    const SYSTEM: &'static str = "realtime-notifications";

    fn new(args: &SystemArgs, spec: &SystemSpec) -> anyhow::Result<Self> {
        let topics = spec.constants.get("topics_count").and_then(|c| c.value).map_or(TOPICS_DEFAULT, |v| v as usize);
        let connections = args.consumers.unwrap_or(CONNECTIONS_DEFAULT).clamp(CONNECTIONS_MIN, topics);
        Ok(RealtimeNotifications { connections, topics, batch: publish_batch(args, PUBLISH_BATCH_DEFAULT), padding: padding(args.message_bytes, DATA_OVERHEAD_BYTES) })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    /// The connections together are one receiver: each notification is owed to exactly one of
    /// them (its topic's), once.
    fn receivers(&self) -> usize {
        1
    }

    fn describe(&self) -> serde_json::Value {
        json!({"connections": self.connections, "topics": self.topics, "publish_batch": self.batch, "transport": "websocket"})
    }

    async fn prepare(&self, _run: &Arc<Run>) -> anyhow::Result<()> {
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let ws_base = run.base.replacen("http", "ws", 1);
        let mut receivers = Vec::with_capacity(self.connections);
        for c in 0..self.connections {
            let topics: Vec<String> = (0..self.topics).filter(|t| t % self.connections == c).map(|t| self.topic(run, t)).collect();
            let url = format!("{ws_base}/v1/notifications/ws?user={}-u{c}&topics={}", run.name, topics.join(","));
            let (mut stream, _) = tokio_tungstenite::connect_async(url).await?;
            // Attached once the `connected` message is read.
            stream.next().await.ok_or_else(|| anyhow::anyhow!("connection {c} closed before its connected message"))??;
            let run = run.clone();
            receivers.push(tokio::spawn(async move {
                while let Some(Ok(frame)) = stream.next().await {
                    let tokio_tungstenite::tungstenite::Message::Text(text) = frame else { continue };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
                        run.error();
                        continue;
                    };
                    for notification in value["notifications"].as_array().map(Vec::as_slice).unwrap_or_default() {
                        if let Some(seq) = notification["data"]["seq"].as_u64() {
                            run.delivered(0, seq);
                        }
                    }
                }
            }));
        }
        Ok(receivers)
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let notifications: Vec<_> = seqs.map(|seq| json!({"topic": self.topic(run, seq as usize), "data": {"seq": seq, "pad": self.padding}})).collect();
        let response = run.client.post(format!("{}/v1/notifications/publish", run.base)).json(&json!({"notifications": notifications})).send().await?;
        expect_status(response, reqwest::StatusCode::CREATED, "publish").await
    }
}
