//! email-queue-system under load: emails sent in batches of `--publish-batch` (one in five
//! transactional, the rest bulk) to 50 recipient domains, handed off by the system's workers over
//! real SMTP to a relay run here: a minimal ESMTP sink on 127.0.0.1 that answers 250 to
//! everything and reads each email's `X-Bench-Seq` header. The delivery the driver times is the
//! hand-off (the sink's 250). Success: every accepted email reached the sink, once.
//!
//! Shaping is set wide open (10,000/s per domain) so that the run measures the pipeline, not the
//! configured rate; `describe` reports the transactional emails' hand-off percentiles apart.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{PUBLISH_BATCH_DEFAULT, Run, Scenario, expect_status, padding, publish_batch};
use crate::bench::latency::LatencyHistogram;
use crate::bench::system::SystemArgs;

pub struct EmailQueueSystem {
    batch: u64,
    padding: String,
    /// Accept → hand-off of the transactional emails only.
    transactional: Mutex<LatencyHistogram>,
    /// The sink's listener, from `prepare` to `start_receivers`.
    relay: Mutex<Option<TcpListener>>,
}

/// Recipient domains the load spreads over.
const DOMAINS: u64 = 50;
/// One email in this many is transactional.
const TRANSACTIONAL_EVERY: u64 = 5;
/// Bytes of an email's text besides its padding.
const TEXT_OVERHEAD_BYTES: usize = 0;
/// SMTP connections the system keeps to the sink.
const RELAY_POOL: u32 = 64;

fn is_transactional(seq: u64) -> bool {
    seq.is_multiple_of(TRANSACTIONAL_EVERY)
}

impl Scenario for EmailQueueSystem {
    const SYSTEM: &'static str = "email-queue-system";

    fn new(args: &SystemArgs, _spec: &SystemSpec) -> anyhow::Result<Self> {
        Ok(EmailQueueSystem {
            batch: publish_batch(args, PUBLISH_BATCH_DEFAULT),
            padding: padding(args.message_bytes, TEXT_OVERHEAD_BYTES),
            transactional: Mutex::new(LatencyHistogram::new()),
            relay: Mutex::new(None),
        })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    fn describe(&self) -> serde_json::Value {
        let transactional = self.transactional.lock();
        json!({
            "send_batch": self.batch,
            "transactional_share": 1.0 / TRANSACTIONAL_EVERY as f64,
            "domains": DOMAINS,
            "relay_pool": RELAY_POOL,
            "transactional_handoff_ms": (transactional.count() > 0).then(|| transactional.summary()),
        })
    }

    /// Start listening as the relay (one per phase) and point the system at it.
    async fn prepare(&self, run: &Arc<Run>) -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        *self.relay.lock() = Some(listener);
        let config = json!({
            "relay": {"host": "127.0.0.1", "port": port, "pool_max": RELAY_POOL, "timeout_ms": 30_000},
            "domain_rate": {"rate_per_s": 10_000.0, "burst": 10_000},
            "retry": {"attempts": 3, "base_ms": 1_000, "max_ms": 60_000},
        });
        let response = run.client.put(format!("{}/v1/email/config", run.base)).json(&config).send().await?;
        anyhow::ensure!(response.status().is_success(), "configuring the relay: {}", response.text().await.unwrap_or_default());
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let listener = self.relay.lock().take().ok_or_else(|| anyhow::anyhow!("prepare starts the relay"))?;
        let (scenario, run) = (self.clone(), run.clone());
        Ok(vec![tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                tokio::spawn(smtp_session(socket, scenario.clone(), run.clone()));
            }
        })])
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let messages: Vec<_> = seqs
            .map(|seq| {
                json!({
                    "class": if is_transactional(seq) { "transactional" } else { "bulk" },
                    "from": "Bench <bench@tributary.example>",
                    "to": format!("user{seq}@d{}.example", seq % DOMAINS),
                    "subject": format!("Order {seq}"),
                    "text": self.padding,
                    "headers": {"X-Bench-Seq": seq.to_string()},
                })
            })
            .collect();
        let response = run.client.post(format!("{}/v1/email/messages", run.base)).json(&json!({"messages": messages})).send().await?;
        expect_status(response, reqwest::StatusCode::ACCEPTED, "send").await
    }
}

/// One SMTP connection of the sink: EHLO, then MAIL / RCPT / DATA transactions, 250 to all.
async fn smtp_session(socket: tokio::net::TcpStream, scenario: Arc<EmailQueueSystem>, run: Arc<Run>) {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read);
    if write.write_all(b"220 bench ESMTP\r\n").await.is_err() {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let answer: &[u8] = match verb.as_str() {
            "EHLO" => b"250-bench\r\n250 8BITMIME\r\n",
            "QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            }
            "DATA" => {
                if write.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                let mut seq = None;
                loop {
                    line.clear();
                    match lines.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let text = line.trim_end_matches(['\r', '\n']);
                    if text == "." {
                        break;
                    }
                    if seq.is_none()
                        && let Some(value) = text.strip_prefix("X-Bench-Seq: ")
                    {
                        seq = value.trim().parse::<u64>().ok();
                    }
                }
                if let Some(seq) = seq {
                    if is_transactional(seq) && seq >= run.warmup {
                        let latency = run.schedule.elapsed_ns().saturating_sub(run.intended_ns(seq));
                        scenario.transactional.lock().record_ns(latency);
                    }
                    run.delivered(0, seq);
                } else {
                    run.error();
                }
                b"250 2.0.0 OK\r\n"
            }
            _ => b"250 OK\r\n",
        };
        if write.write_all(answer).await.is_err() {
            return;
        }
    }
}
