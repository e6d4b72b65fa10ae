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
//! Each system's load is a scenario in [`super::scenarios`] (one file per system); this file is
//! the command: its options, the in-process server, and the report with its verdict.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use tributary_runtime::Catalogue;

use super::latency::LatencySummary;
use super::scenarios::{self, Phase};
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
    /// Deliveries of messages the run never sent, or to receivers that did not subscribe to them.
    pub unexpected: u64,
    /// The scenario's settings.
    pub scenario: serde_json::Value,
    pub target: Target,
    pub targets: Targets,
    pub server: String,
    pub machine: Option<Machine>,
}

pub async fn run(args: &SystemArgs) -> anyhow::Result<SystemReport> {
    let spec = Catalogue::get().system(&args.system).with_context(|| format!("{} is not a system of the catalogue", args.system))?;
    let latency = spec.nonfunctional.latency.as_ref().context("the system has no latency target")?;
    let seed_rate = spec.nonfunctional.rate_per_s.context("the system has no rate target")?;
    let rate = args.rate.unwrap_or(seed_rate.round() as u64).max(1);
    let Some(entry) = scenarios::find(&args.system) else {
        let written: Vec<&str> = scenarios::registry().iter().map(|e| e.system).collect();
        bail!("no bench scenario for {} yet (written: {})", args.system, written.join(", "));
    };
    let scenario = (entry.new)(args, spec)?;
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
    let phase = Phase { name: "normal", base: base.clone(), client, rate, warmup_seconds: args.warmup_seconds, seconds: args.seconds };
    let measured = scenario.drive(phase).await?;
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
        consumers: measured.scenario["consumers"].as_u64().map_or(1, |c| c as usize),
        unexpected: measured.unexpected,
        scenario: measured.scenario,
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

