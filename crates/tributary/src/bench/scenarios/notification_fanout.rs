//! notification-fanout under load: notifications triggered in batches of `--publish-batch`, each
//! to one of `--subscriptions` subscribers (default 10,000, registered before the load with a
//! push device) on the push channel, so each notification is one recipient delivery: at the
//! seed's 50,000/s that is 50,000 deliveries/s through the whole path (durable trigger, expansion,
//! delivery state on the events log, the push queue, the workers, a signed HTTP POST). The
//! providers are two in-process HTTP sinks on 127.0.0.1 (the second is the failover provider;
//! the first answers 200, so it stays unused); the delivery the driver times is the provider
//! reading the POST, from the batch's intended trigger time. Success: every acknowledged
//! notification reached a provider, once (at least once across a restart: a delivery sent but
//! not yet recorded is sent again).
//!
//! Channel and provider token buckets are set wide open so that the run measures the pipeline,
//! not a configured rate.

use std::ops::Range;
use std::sync::Arc;

use axum::body::Bytes;
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;
use tributary_systems::notification_fanout::process::SUBSCRIBERS_PER_REQUEST_MAX;

use super::{PUBLISH_BATCH_DEFAULT, Run, Scenario, expect_status, padding, publish_batch};
use crate::bench::system::SystemArgs;

pub struct NotificationFanout {
    batch: u64,
    users: usize,
    padding: String,
    /// The providers' listener, from `prepare` to `start_receivers`.
    sink: Mutex<Option<TcpListener>>,
}

/// Subscribers when `--subscriptions` does not say.
const USERS_DEFAULT: usize = 10_000;
/// Bulk registrations of the set-up in flight at once (each of up to
/// `SUBSCRIBERS_PER_REQUEST_MAX` subscribers).
const SETUP_CONCURRENCY: usize = 4;
/// Bytes of a notification's data besides its padding.
const DATA_OVERHEAD_BYTES: usize = 20;
/// Tokens per second (and burst) of the channel and of each provider: far above the load.
const OPEN_RATE: f64 = 10_000_000.0;

impl NotificationFanout {
    fn user(&self, run: &Run, seq: u64) -> String {
        format!("{}-u{}", run.name, seq % self.users as u64)
    }
}

impl Scenario for NotificationFanout {
    const SYSTEM: &'static str = "notification-fanout";

    fn new(args: &SystemArgs, _spec: &SystemSpec) -> anyhow::Result<Self> {
        Ok(NotificationFanout {
            batch: publish_batch(args, PUBLISH_BATCH_DEFAULT),
            users: args.subscriptions.unwrap_or(USERS_DEFAULT).max(1),
            padding: padding(args.message_bytes, DATA_OVERHEAD_BYTES),
            sink: Mutex::new(None),
        })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    fn describe(&self) -> serde_json::Value {
        json!({"subscribers": self.users, "trigger_batch": self.batch, "channel": "push", "providers": 2})
    }

    fn at_least_once(&self) -> bool {
        true
    }

    /// Start listening as the providers, register the subscribers and point the system at the
    /// providers.
    async fn prepare(&self, run: &Arc<Run>) -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        *self.sink.lock() = Some(listener);
        let rate = json!({"rate_per_s": OPEN_RATE, "burst": OPEN_RATE as u32});
        let config = json!({
            "providers": {"push": [
                {"name": "primary", "url": format!("{base}/push/primary"), "secret": "bench", "rate": rate},
                {"name": "secondary", "url": format!("{base}/push/secondary"), "secret": "bench", "rate": rate},
            ]},
            "channel_rates": {"push": rate},
            "retry": {"attempts": 10, "base_ms": 500, "max_ms": 5_000},
            "provider_timeout_ms": 5_000,
        });
        let response = run.client.put(format!("{}/v1/fanout/config", run.base)).json(&config).send().await?;
        anyhow::ensure!(response.status().is_success(), "configuring the providers: {}", response.text().await.unwrap_or_default());
        let users: Vec<u64> = (0..self.users as u64).collect();
        let batches: Vec<&[u64]> = users.chunks(SUBSCRIBERS_PER_REQUEST_MAX).collect();
        for together in batches.chunks(SETUP_CONCURRENCY) {
            let posts = together.iter().map(|batch| {
                let subscribers: Vec<serde_json::Value> = batch.iter().map(|&i| json!({"id": self.user(run, i), "push_tokens": [format!("device-{i}")]})).collect();
                let request = run.client.post(format!("{}/v1/fanout/subscribers", run.base)).json(&json!({"subscribers": subscribers}));
                async move {
                    let response = request.send().await?;
                    let status = response.status();
                    // Read to the end so that the connection goes back to the pool.
                    let body = response.bytes().await?;
                    anyhow::ensure!(status.is_success(), "registering {} subscribers: {status} {}", batch.len(), String::from_utf8_lossy(&body));
                    Ok(())
                }
            });
            for result in futures_util::future::join_all(posts).await {
                result?;
            }
        }
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let listener = self.sink.lock().take().ok_or_else(|| anyhow::anyhow!("prepare starts the providers"))?;
        let taken = run.clone();
        let app = axum::Router::new().route(
            "/push/{name}",
            axum::routing::post(move |body: Bytes| {
                let run = taken.clone();
                async move {
                    match serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["data"]["seq"].as_u64()) {
                        Some(seq) => {
                            run.delivered(0, seq);
                        }
                        None => run.error(),
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        Ok(vec![tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })])
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let notifications: Vec<_> = seqs
            .map(|seq| {
                json!({
                    "category": "bench",
                    "users": [self.user(run, seq)],
                    "channels": ["push"],
                    "title": "Bench",
                    "data": {"seq": seq, "pad": self.padding},
                    "idempotency_key": format!("{}-{seq}", run.name),
                })
            })
            .collect();
        let response = run.client.post(format!("{}/v1/fanout/notifications", run.base)).json(&json!({"notifications": notifications})).send().await?;
        expect_status(response, reqwest::StatusCode::ACCEPTED, "trigger").await
    }
}
