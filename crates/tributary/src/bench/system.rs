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
//! Phases (`--phase`, default `normal`):
//! - `normal`: the seed's rate (or `--rate`) for `--seconds`.
//! - `peak`: ten times that. If the system does not sustain it, the rate is stepped up from 2×
//!   (2×, 3×, 5×, then once halfway between the last sustained step and the first that was not)
//!   and the highest sustained rate is reported as such. Sustained: achieved ≥ 99% of offered,
//!   no errors, nothing lost. Each step also says whether its latency stayed within the seed's
//!   target, and the highest sustained rate that did is reported apart (`within_latency_rate`).
//! - `failure`: the normal rate for `--failure-seconds` while things break: a worker dies holding
//!   its messages (at 25% of the window, for scenarios whose receivers can) and the in-process
//!   server is stopped and started again on the same data folder and port (at 60%; not with
//!   `--target`). The client retries sends meanwhile. Reported: how long each fault took to
//!   recover from, and proof that nothing acknowledged was lost (nor duplicated, unless the
//!   system is at-least-once).
//! - `all`: the three in turn, on one server.
//!
//! Each system's load is a scenario in [`super::scenarios`] (one file per system); this file is
//! the command: its options, the in-process server, the phases and their verdicts.
//! [`super::report`] prints and writes the results.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tributary_runtime::Catalogue;
use tributary_runtime::catalogue::System as SystemSpec;

use super::latency::LatencySummary;
use super::scenarios::{self, Bench, Fault, FaultKind, FaultReport, Measured, Phase, Restart, SecondSummary};
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
    /// Messages per publish request [default: 10; 5,000 ticks for stock-price-updates].
    #[arg(long)]
    pub publish_batch: Option<u64>,
    /// Which phases to run.
    #[arg(long, value_enum, default_value_t = PhaseChoice::Normal)]
    pub phase: PhaseChoice,
    /// Seconds of measured load per step of the peak phase.
    #[arg(long, default_value_t = 5)]
    pub peak_seconds: u64,
    /// Seconds of measured load in the failure phase (faults at 25% and 60% of it).
    #[arg(long, default_value_t = 20)]
    pub failure_seconds: u64,
    /// Write the results into this folder: `SYSTEM.json`, `SYSTEM.md` and a latency-over-time
    /// plot per phase (`SYSTEM-PHASE.svg`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print one JSON object per phase (one per line) instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseChoice {
    Normal,
    Peak,
    Failure,
    All,
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
    /// Sends repeated after a failure (failure phase only).
    pub retries: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub consumers: usize,
    /// Deliveries of messages the run never sent, or to receivers that did not subscribe to them.
    pub unexpected: u64,
    /// The scenario's settings.
    pub scenario: serde_json::Value,
    /// Seconds the scenario's preparation took (registering subscribers or subscriptions),
    /// before the schedule.
    pub prepare_seconds: f64,
    pub target: Target,
    pub targets: Targets,
    /// Peak phase: the steps tried and the highest rate sustained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak: Option<PeakReport>,
    /// Failure phase: what was broken, when, and how long recovery took.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultReport>,
    pub warmup_seconds: u64,
    pub seconds: u64,
    /// End-to-end latency per second of intended send time (warm-up included, negative).
    pub series: Vec<SecondSummary>,
    pub server: String,
    pub machine: Option<Machine>,
    /// The stages the system times, as the server reported them once the phase ended
    /// (`GET /v1/dashboard`: each stage's last `LATENCY_WINDOW_SAMPLES` passes, so earlier
    /// phases of the same server may be in it); absent for a system that times none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_stages_ms: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeakReport {
    /// Ten times the normal rate.
    pub target_rate: f64,
    /// The highest offered rate sustained (achieved ≥ 99% of it, no errors, nothing lost);
    /// `None` when no step was. Says nothing of latency: a step can carry its rate seconds late.
    pub sustained_rate: Option<f64>,
    /// The highest offered rate sustained with the seed's latency percentile within its
    /// target; `None` when no step was. What a node carries within the target.
    pub within_latency_rate: Option<f64>,
    /// The target rate was sustained within the seed's latency target.
    pub met: bool,
    pub steps: Vec<PeakStep>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeakStep {
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub lost: u64,
    pub sustained: bool,
    /// The step's latency at the seed's percentile was within the seed's target.
    pub within_latency: bool,
}

/// Achieved over offered at or above which a rate counts as sustained.
pub const SUSTAINED_FRACTION: f64 = 0.99;
/// The peak phase aims at this many times the normal rate.
pub const PEAK_FACTOR: u64 = 10;
/// The peak phase's steps when the full peak is not sustained, in multiples of the normal rate.
const PEAK_STEPS: [u64; 3] = [2, 3, 5];

pub async fn run(args: &SystemArgs) -> anyhow::Result<Vec<SystemReport>> {
    let spec = Catalogue::get().system(&args.system).with_context(|| format!("{} is not a system of the catalogue", args.system))?;
    let latency = spec.nonfunctional.latency.as_ref().context("the system has no latency target")?;
    let seed_rate = spec.nonfunctional.rate_per_s.context("the system has no rate target")?;
    let rate = args.rate.unwrap_or(seed_rate.round() as u64).max(1);
    let Some(entry) = scenarios::find(&args.system) else {
        let written: Vec<&str> = scenarios::registry().iter().map(|e| e.system).collect();
        bail!("no bench scenario for {} yet (written: {})", args.system, written.join(", "));
    };
    let scenario = (entry.new)(args, spec)?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let (base, server_label, machine, server, data) = match &args.target {
        Some(url) => (url.trim_end_matches('/').to_string(), "remote", None, None, None),
        None => {
            let data = tempfile::Builder::new().prefix("tributary-bench-").tempdir()?;
            let machine = Machine::probe(data.path());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let server = InProcess::start(listener, data.path()).await?;
            (format!("http://{}", server.address), "in-process", Some(machine), Some(Arc::new(tokio::sync::Mutex::new(server))), Some(data))
        }
    };
    wait_healthy(&client, &base).await?;
    let progress = (!args.json).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len} sent, {elapsed}").expect("a valid template").progress_chars("=> "));
        bar
    });
    let base_phase = Phase {
        name: "normal",
        label: "normal".into(),
        base: base.clone(),
        client: client.clone(),
        rate,
        warmup_seconds: args.warmup_seconds,
        seconds: args.seconds,
        retry: false,
        latency_target_ms: latency.ms,
        faults: Vec::new(),
        progress: progress.clone(),
    };
    let context = Shared { args, spec, seed_rate, server: server_label, machine };
    let phases: &[&str] = match args.phase {
        PhaseChoice::Normal => &["normal"],
        PhaseChoice::Peak => &["peak"],
        PhaseChoice::Failure => &["failure"],
        PhaseChoice::All => &["normal", "peak", "failure"],
    };
    let mut reports = Vec::new();
    for name in phases {
        let mut report = match *name {
            "normal" => {
                let measured = scenario.drive(base_phase.clone()).await?;
                context.report(&base_phase, measured, None)
            }
            "peak" => peak(&context, scenario.as_ref(), &base_phase).await?,
            _ => {
                let mut faults = Vec::new();
                let seconds = args.failure_seconds.max(4);
                if scenario.kills_workers() {
                    faults.push(Fault { after: Duration::from_secs(seconds) / 4, kind: FaultKind::KillWorker });
                }
                if let Some(server) = &server {
                    let (server, client, base) = (server.clone(), client.clone(), base.clone());
                    let restart: Restart = Arc::new(move || {
                        let (server, client, base) = (server.clone(), client.clone(), base.clone());
                        Box::pin(async move {
                            server.lock().await.restart().await?;
                            wait_healthy(&client, &base).await
                        })
                    });
                    faults.push(Fault { after: Duration::from_secs(seconds) * 3 / 5, kind: FaultKind::RestartServer(restart) });
                }
                if faults.is_empty() {
                    let reason = "no fault to inject: the scenario's receivers cannot die holding work and a --target server cannot be restarted from here";
                    if args.phase == PhaseChoice::Failure {
                        bail!("failure phase of {}: {reason}", args.system);
                    }
                    eprintln!("skipping the failure phase of {}: {reason}", args.system);
                    continue;
                }
                let phase = Phase { name: "failure", label: "failure".into(), seconds, retry: true, faults, ..base_phase.clone() };
                let measured = scenario.drive(phase.clone()).await?;
                let at_least_once = scenario.at_least_once();
                context.report(&phase, measured, Some(at_least_once))
            }
        };
        report.server_stages_ms = server_stages(&client, &base, &args.system).await;
        reports.push(report);
    }
    if let Some(progress) = &progress {
        progress.finish_and_clear();
    }
    if let Some(server) = server {
        server.lock().await.stop().await?;
    }
    drop(data);
    Ok(reports)
}

/// What every phase's report shares.
struct Shared<'a> {
    args: &'a SystemArgs,
    spec: &'a SystemSpec,
    seed_rate: f64,
    server: &'static str,
    machine: Option<Machine>,
}

impl Shared<'_> {
    /// The report of one phase. `failure` is `Some(at_least_once)` for the failure phase.
    fn report(&self, phase: &Phase, measured: Measured, failure: Option<bool>) -> SystemReport {
        let latency = self.spec.nonfunctional.latency.as_ref().expect("checked by run");
        let summary = measured.end_to_end.summary();
        let observed = at_percentile(&summary, latency.percentile);
        let rate = phase.rate as f64;
        let achieved_rate = measured.achieved_rate;
        let met = match failure {
            // Through faults, latency and rate are expected to suffer: the verdict is that
            // nothing acknowledged was lost or misrouted, nothing duplicated unless the system
            // is at-least-once, and every fault recovered.
            Some(at_least_once) => measured.lost == 0 && measured.unexpected == 0 && (at_least_once || measured.duplicated == 0) && measured.faults.iter().all(|f| f.recovered_ms.is_some()),
            // The seed's latency at the seed's rate (a run at a lower --rate cannot meet it).
            None => observed <= latency.ms && achieved_rate >= rate.max(self.seed_rate) * SUSTAINED_FRACTION && measured.lost == 0 && measured.duplicated == 0 && measured.unexpected == 0,
        };
        let applies_to = if failure.is_some() { "the failure phase: nothing lost" } else { "the seed's rate and latency" };
        let check = |metric, target, applies| TargetCheck { metric, target, applies_to, applies, measured: None, met: None };
        let normal = failure.is_none();
        let targets = Targets::new(
            "seed",
            vec![
                check("achieved_rate", "seed rate", normal).judge(Some(achieved_rate), self.seed_rate * SUSTAINED_FRACTION, true),
                check("latency_ms", "seed latency at its percentile", normal).judge(Some(observed), latency.ms, false),
                check("lost", "0", true).judge(Some(measured.lost as f64), 0.0, false),
                check("duplicated", "0 (at-least-once systems: only outside failures)", failure != Some(true)).judge(Some(measured.duplicated as f64), 0.0, false),
            ],
        );
        SystemReport {
            system: self.args.system.clone(),
            phase: phase.name,
            offered_rate: rate,
            achieved_rate,
            latency_ms: summary,
            publish_ms: measured.publish.summary(),
            messages: measured.sent,
            errors: measured.errors,
            retries: measured.retries,
            lost: measured.lost,
            duplicated: measured.duplicated,
            consumers: measured.scenario["consumers"].as_u64().map_or(1, |c| c as usize),
            unexpected: measured.unexpected,
            scenario: measured.scenario,
            prepare_seconds: measured.prepare_seconds,
            target: Target { rate: if phase.name == "peak" { rate } else { self.seed_rate }, percentile: latency.percentile, latency_ms: latency.ms, met },
            targets,
            peak: None,
            faults: measured.faults,
            warmup_seconds: phase.warmup_seconds,
            seconds: phase.seconds,
            series: measured.series,
            server: self.server.to_string(),
            machine: self.machine.clone(),
            server_stages_ms: None,
        }
    }
}

/// The latency at the seed's percentile.
pub fn at_percentile(summary: &LatencySummary, percentile: u8) -> f64 {
    match percentile {
        50 => summary.p50,
        95 => summary.p95,
        99 => summary.p99,
        _ => summary.p999,
    }
}

/// Whether a step carried its offered rate.
pub fn sustained(offered: f64, achieved: f64, errors: u64, lost: u64) -> bool {
    achieved >= offered * SUSTAINED_FRACTION && errors == 0 && lost == 0
}

/// The peak phase: ten times the normal rate, else the highest step sustained.
async fn peak(context: &Shared<'_>, scenario: &dyn Bench, normal: &Phase) -> anyhow::Result<SystemReport> {
    let goal = normal.rate * PEAK_FACTOR;
    let latency = context.spec.nonfunctional.latency.as_ref().expect("checked by run");
    let mut steps: Vec<PeakStep> = Vec::new();
    let mut best: Option<SystemReport> = None;
    let mut first: Option<SystemReport> = None;
    let (ok, report) = peak_step(context, scenario, normal, goal, &mut steps).await?;
    if ok {
        best = Some(report);
    } else {
        let mut failed_at = goal;
        for factor in PEAK_STEPS {
            let (ok, report) = peak_step(context, scenario, normal, normal.rate * factor, &mut steps).await?;
            if !ok {
                failed_at = normal.rate * factor;
                first.get_or_insert(report);
                break;
            }
            best = Some(report);
        }
        let good = best.as_ref().map_or(normal.rate, |r| r.offered_rate as u64);
        let middle = (good + failed_at) / 2;
        if best.is_some() && middle > good && middle < failed_at {
            let (ok, report) = peak_step(context, scenario, normal, middle, &mut steps).await?;
            if ok {
                best = Some(report);
            }
        }
    }
    let highest = |keep: fn(&PeakStep) -> bool| steps.iter().filter(|s| keep(s)).map(|s| s.offered_rate).fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let sustained_rate = highest(|s| s.sustained);
    let within_latency_rate = highest(|s| s.sustained && s.within_latency);
    let mut report = best.or(first).context("the peak phase ran no step")?;
    let met = sustained_rate.is_some_and(|r| r >= goal as f64) && at_percentile(&report.latency_ms, latency.percentile) <= latency.ms;
    report.target = Target { rate: goal as f64, percentile: latency.percentile, latency_ms: latency.ms, met };
    report.peak = Some(PeakReport { target_rate: goal as f64, sustained_rate, within_latency_rate, met, steps });
    Ok(report)
}

/// One step of the peak phase: `rate` for `--peak-seconds`; true when sustained.
async fn peak_step(context: &Shared<'_>, scenario: &dyn Bench, normal: &Phase, rate: u64, steps: &mut Vec<PeakStep>) -> anyhow::Result<(bool, SystemReport)> {
    let phase = Phase { name: "peak", label: format!("peak-{rate}"), rate, seconds: context.args.peak_seconds, ..normal.clone() };
    let report = context.report(&phase, scenario.drive(phase.clone()).await?, None);
    let ok = sustained(report.offered_rate, report.achieved_rate, report.errors, report.lost);
    let latency = context.spec.nonfunctional.latency.as_ref().expect("checked by run");
    let within_latency = at_percentile(&report.latency_ms, latency.percentile) <= latency.ms;
    steps.push(PeakStep {
        offered_rate: report.offered_rate,
        achieved_rate: report.achieved_rate,
        p50_ms: report.latency_ms.p50,
        p99_ms: report.latency_ms.p99,
        errors: report.errors,
        lost: report.lost,
        sustained: ok,
        within_latency,
    });
    Ok((ok, report))
}

/// Tributary in this process, on a data folder that outlives restarts.
struct InProcess {
    address: SocketAddr,
    data: PathBuf,
    running: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>)>,
}

/// How long a restart keeps trying to bind the address it had.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

impl InProcess {
    async fn start(listener: tokio::net::TcpListener, data: &Path) -> anyhow::Result<InProcess> {
        let address = listener.local_addr()?;
        let mut server = InProcess { address, data: data.to_path_buf(), running: None };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let config = crate::platform::UpConfig::embedded(self.address, self.data.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(crate::platform::run(config, listener, async move {
            let _ = stopped.await;
        }));
        self.running = Some((stop, handle));
    }

    /// Stop: drain requests, stop the systems, close the engine.
    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((stop, handle)) = self.running.take() {
            let _ = stop.send(());
            handle.await??;
        }
        Ok(())
    }

    /// Stop, then start again on the same data folder and address.
    async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let deadline = tokio::time::Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.set_reuseaddr(true)?;
            match socket.bind(self.address).and_then(|()| socket.listen(1024)) {
                Ok(listener) => break listener,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%error, "rebinding {}", self.address);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error).with_context(|| format!("binding {} again", self.address)),
            }
        };
        self.serve(listener);
        Ok(())
    }
}

/// The stages `system` times, from the server's dashboard (none when it times none, or the
/// dashboard did not answer).
async fn server_stages(client: &reqwest::Client, base: &str, system: &str) -> Option<serde_json::Value> {
    let view: serde_json::Value = client.get(format!("{base}/v1/dashboard")).send().await.ok()?.json().await.ok()?;
    let stages = view["systems"].as_array()?.iter().find(|s| s["id"] == system)?["metrics"]["stages_ms"].clone();
    stages.is_object().then_some(stages)
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

