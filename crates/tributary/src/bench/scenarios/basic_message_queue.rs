//! basic-message-queue under load: one publisher at the rate, one message per `POST
//! /v1/queues/{q}/messages`, and `--consumers` workers of one consumer group receiving with long
//! polls (`max` 100) and acking each batch. Success: every acknowledged message consumed, once.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{Run, Scenario, padding};
use crate::bench::system::SystemArgs;

pub struct BasicMessageQueue {
    consumers: usize,
    padding: String,
}

/// Consumers when neither `--consumers` nor the seed's `consumer_count` says.
const CONSUMERS_DEFAULT: usize = 3;
/// Bytes of a message body besides its padding.
const BODY_OVERHEAD_BYTES: usize = 40;

impl Scenario for BasicMessageQueue {
    const SYSTEM: &'static str = "basic-message-queue";

    fn new(args: &SystemArgs, spec: &SystemSpec) -> anyhow::Result<Self> {
        let consumers = args.consumers.unwrap_or(spec.constants.get("consumer_count").and_then(|c| c.value).map_or(CONSUMERS_DEFAULT, |v| v as usize));
        anyhow::ensure!(consumers > 0, "--consumers must be at least 1");
        Ok(BasicMessageQueue { consumers, padding: padding(args.message_bytes, BODY_OVERHEAD_BYTES) })
    }

    fn describe(&self) -> serde_json::Value {
        json!({"consumers": self.consumers})
    }

    /// The queue is created by its first publish; groups by their first receive.
    async fn prepare(&self, _run: &Arc<Run>) -> anyhow::Result<()> {
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        Ok((0..self.consumers).map(|c| tokio::spawn(consume(run.clone(), format!("worker-{c}")))).collect())
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let messages: Vec<_> = seqs.map(|seq| json!({"body": {"seq": seq, "pad": self.padding}})).collect();
        let response = run.client.post(format!("{}/v1/queues/{}/messages", run.base, run.name)).json(&json!({"messages": messages})).send().await?;
        anyhow::ensure!(response.status() == reqwest::StatusCode::CREATED, "publish answered {}", response.status());
        Ok(())
    }
}

/// One worker: long-poll, record, ack, forever.
async fn consume(run: Arc<Run>, consumer: String) {
    let receive = format!("{}/v1/queues/{}/receive", run.base, run.name);
    let ack = format!("{}/v1/queues/{}/ack", run.base, run.name);
    loop {
        let body = json!({"group": "bench", "consumer": consumer, "max": 100, "wait_ms": 500, "lease_ms": 30_000});
        let response = match run.client.post(&receive).json(&body).send().await {
            Ok(r) if r.status().is_success() => r,
            // Not published to yet.
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            _ => {
                run.error();
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(value) = response.json::<serde_json::Value>().await else {
            run.error();
            continue;
        };
        let messages = value["messages"].as_array().cloned().unwrap_or_default();
        let mut receipts = Vec::with_capacity(messages.len());
        for message in &messages {
            let Some(seq) = message["body"]["seq"].as_u64() else { continue };
            receipts.push(message["receipt"].clone());
            run.delivered(0, seq);
        }
        if receipts.is_empty() {
            continue;
        }
        match run.client.post(&ack).json(&json!({"group": "bench", "receipts": receipts})).send().await {
            Ok(r) if r.status().is_success() => {}
            _ => run.error(),
        }
    }
}
