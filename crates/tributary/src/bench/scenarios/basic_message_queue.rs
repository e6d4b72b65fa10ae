//! basic-message-queue under load: producers publish jobs, `--publish-batch` (10) per `POST
//! /v1/queues/{q}/messages` as a client batching like SQS's `SendMessageBatch` does, and
//! `--consumers` workers of one consumer group receive with long polls (`max` 100) and ack each
//! batch. Success: every acknowledged message consumed, once.
//!
//! Payloads look like a job queue's: a job type, a tenant (Zipf-skewed over 1,000 tenants, also
//! the message key), a creation time, an attempt number and a body whose size varies around
//! `--message-bytes` (half to one and a half times). Every publish carries `dedup_id`
//! `{run}-{seq}`, so a client retrying through a restart does not enqueue a message twice.
//!
//! Failure phase: a worker dies holding its leases (it received a batch and never acks it); the
//! queue must hand those messages to another worker once the leases run out (`FAILURE_LEASE_MS`
//! there, the engine's 30 s elsewhere). The
//! queue is at-least-once: an ack lost in a restart brings its message back, so duplicates are
//! reported there, not failed.

use std::ops::Range;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{PUBLISH_BATCH_DEFAULT, Run, Scenario, Zipf, expect_status, mix, padding, publish_batch};
use crate::bench::system::SystemArgs;

pub struct BasicMessageQueue {
    consumers: usize,
    batch: u64,
    padding: String,
}

/// Consumers when neither `--consumers` nor the seed's `consumer_count` says.
const CONSUMERS_DEFAULT: usize = 3;
/// Bytes of a message body besides its padding.
const BODY_OVERHEAD_BYTES: usize = 120;
/// The workers' lease (the engine's default): how long a message stays with a worker that
/// has not acked it.
pub const LEASE_MS: u64 = 30_000;
/// The lease in the failure phase, short so that a dead worker's messages come back within
/// the run.
pub const FAILURE_LEASE_MS: u64 = 5_000;
/// Messages a worker asks for per receive.
const RECEIVE_MAX: u64 = 100;
const TENANTS: usize = 1_000;
const JOB_TYPES: [&str; 5] = ["email.send", "invoice.render", "image.resize", "webhook.deliver", "report.export"];
static TENANT_SKEW: LazyLock<Zipf> = LazyLock::new(|| Zipf::new(TENANTS, 1.0));

impl Scenario for BasicMessageQueue {
    const SYSTEM: &'static str = "basic-message-queue";

    fn new(args: &SystemArgs, spec: &SystemSpec) -> anyhow::Result<Self> {
        let consumers = args.consumers.unwrap_or(spec.constants.get("consumer_count").and_then(|c| c.value).map_or(CONSUMERS_DEFAULT, |v| v as usize));
        anyhow::ensure!(consumers > 0, "--consumers must be at least 1");
        Ok(BasicMessageQueue { consumers, batch: publish_batch(args, PUBLISH_BATCH_DEFAULT), padding: padding(args.message_bytes * 3 / 2, BODY_OVERHEAD_BYTES) })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    fn describe(&self) -> serde_json::Value {
        json!({"consumers": self.consumers, "publish_batch": self.batch, "lease_ms": LEASE_MS, "failure_lease_ms": FAILURE_LEASE_MS, "receive_max": RECEIVE_MAX, "tenants": TENANTS, "tenant_skew": "zipf 1.0", "dedup_id": true})
    }

    fn at_least_once(&self) -> bool {
        true
    }

    fn kills_workers(&self) -> bool {
        true
    }

    /// The queue is created by its first publish; groups by their first receive.
    async fn prepare(&self, _run: &Arc<Run>) -> anyhow::Result<()> {
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        Ok((0..self.consumers).map(|c| tokio::spawn(consume(run.clone(), format!("worker-{c}")))).collect())
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let messages: Vec<_> = seqs.map(|seq| self.message(run, seq)).collect();
        let response = run.client.post(format!("{}/v1/queues/{}/messages", run.base, run.name)).json(&json!({"messages": messages})).send().await?;
        expect_status(response, reqwest::StatusCode::CREATED, "publish").await
    }

    async fn finish(&self, run: &Arc<Run>) {
        let _ = run.client.delete(format!("{}/v1/queues/{}", run.base, run.name)).send().await;
    }
}

impl BasicMessageQueue {
    fn message(&self, run: &Run, seq: u64) -> serde_json::Value {
        let random = mix(seq);
        let tenant = format!("tenant-{}", TENANT_SKEW.key(seq));
        // Between a third and all of the padding: bodies of 0.5× to 1.5× --message-bytes.
        let pad = &self.padding[..self.padding.len() / 3 + (random % (self.padding.len() as u64 * 2 / 3 + 1)) as usize];
        json!({
            "key": tenant,
            "dedup_id": format!("{}-{seq}", run.name),
            "body": {
                "seq": seq,
                "type": JOB_TYPES[(random >> 32) as usize % JOB_TYPES.len()],
                "tenant": tenant,
                "created_ms": run.schedule.intended_ns(seq) / 1_000_000,
                "attempt": 1,
                "data": pad,
            }
        })
    }
}

/// One worker: long-poll, record, ack, until aborted (or killed by the failure phase).
async fn consume(run: Arc<Run>, consumer: String) {
    let receive = format!("{}/v1/queues/{}/receive", run.base, run.name);
    let ack = format!("{}/v1/queues/{}/ack", run.base, run.name);
    let lease_ms = if run.phase == "failure" { FAILURE_LEASE_MS } else { LEASE_MS };
    loop {
        let body = json!({"group": "bench", "consumer": consumer, "max": RECEIVE_MAX, "wait_ms": 500, "lease_ms": lease_ms});
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
        let seqs: Vec<u64> = messages.iter().filter_map(|m| m["body"]["seq"].as_u64()).collect();
        if !seqs.is_empty() && run.kill_requested() {
            // Dies holding the leases: nothing processed, nothing acked.
            run.abandoned(&seqs);
            return;
        }
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
            Ok(r) if r.status().is_success() => {
                // Read to the end so that the connection goes back to the pool.
                let _ = r.bytes().await;
            }
            _ => run.error(),
        }
    }
}
