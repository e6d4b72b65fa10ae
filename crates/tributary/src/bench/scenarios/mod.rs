//! Per-system load scenarios for `tributary bench SYSTEM`, and the driver they share.
//!
//! A scenario knows one system's API: how to set up (create a queue, register subscriptions),
//! how to send a batch of messages, and how its receivers (consumers, subscribers) get them. The
//! driver ([`drive`]) does everything else, the same way for every system: the open-loop
//! schedule, the warm-up, publish and end-to-end histograms, and the loss and duplicate
//! accounting that is the success check.
//!
//! # Adding a system: one file
//!
//! 1. Create `scenarios/<system_snake>.rs` with a unit or small struct and `impl Scenario for
//!    It`: set [`Scenario::SYSTEM`] to the catalogue id, read your options and the seed's
//!    constants in [`Scenario::new`], create what the load needs in [`Scenario::prepare`], spawn
//!    your receivers in [`Scenario::start_receivers`] and publish in [`Scenario::send`].
//! 2. Add `pub mod <system_snake>;` below and one `entry::<…>()` line to [`registry`].
//!
//! The contract, in four rules:
//! - Message `seq` (0, 1, 2, …) is the identity the driver follows. Put it in every payload you
//!   send (beside your realistic fields), read it back where a receiver gets the message, and
//!   call [`Run::delivered`]`(receiver, seq)`. The driver times the delivery from the message's
//!   *intended* send time, so your code never handles clocks.
//! - [`Scenario::send`] returns `Ok` only when the server acknowledged the messages (a 2xx that
//!   means durable). Those are the messages that must arrive: one acknowledged and never
//!   delivered is *lost*. `send` may be called again with the same `seqs` after an error (the
//!   client retries while a server restarts): use the system's deduplication (an idempotency
//!   key, a `dedup_id`) where it has one.
//! - Receivers are tasks you spawn; they run until the driver aborts them, and must survive
//!   errors (retry after a short sleep, reconnect a stream, resume from the last offset) because
//!   the failure phase restarts the server under them.
//! - Who must get what: [`Scenario::receivers`] counts the receivers the check follows (a queue's
//!   consumer group is one receiver however many workers it has; each pub/sub subscriber is
//!   one) and [`Scenario::expects`] says which of them must get message `seq`. A receiver that
//!   gets a message twice counts one duplicate.
//!
//! Names: use [`Run::name`] (unique per run and phase) for queues, topics and subscriptions so
//! that phases and repeated runs against one server never see each other's messages.
//!
//! Optional, with defaults: [`Scenario::batch`] (messages per send), [`Scenario::describe`]
//! (settings shown in the report), [`Scenario::finish`] (clean up after a phase),
//! [`Scenario::at_least_once`] (the system may redeliver after a failure, so duplicates in the
//! failure phase are reported but do not fail it), and [`Scenario::kills_workers`]: say yes and,
//! in the failure phase, have one receiver that finds [`Run::kill_requested`] true right after
//! it got messages drop them unprocessed, report them with [`Run::abandoned`] and end (a
//! worker that dies holding leases). The driver then times how long the system takes to hand
//! those messages to someone else.
//!
//! Realistic load: [`Zipf`] and [`mix`] give skewed keys (tenants, devices, symbols) that are a
//! pure function of `seq`, so a scenario's [`Scenario::expects`] can recompute who must get it.
//!
//! What is not here: the command line, the in-process server, the phases' choice of rates and
//! faults, and the report (`bench/system.rs`, `bench/report.rs`).

pub mod basic_message_queue;
pub mod email_queue_system;
pub mod notification_fanout;
pub mod realtime_chat_messages;
pub mod realtime_notifications;
pub mod simple_pubsub;
pub mod stock_price_updates;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::latency::{LatencyHistogram, Schedule};
use super::system::SystemArgs;

/// One system's load: set-up, sending, receiving. See the module docs for the contract.
pub trait Scenario: Sized + Send + Sync + 'static {
    /// The system's id in the catalogue (`tributary systems`).
    const SYSTEM: &'static str;

    /// Read the command-line options and the seed's constants (`spec.constants`).
    fn new(args: &SystemArgs, spec: &SystemSpec) -> anyhow::Result<Self>;

    /// Messages per [`Scenario::send`] (1: one request per message).
    fn batch(&self) -> u64 {
        1
    }

    /// Receivers the success check follows.
    fn receivers(&self) -> usize {
        1
    }

    /// Whether `receiver` must get message `seq` (every receiver gets every message by default).
    fn expects(&self, receiver: usize, seq: u64) -> bool {
        let _ = (receiver, seq);
        true
    }

    /// Settings worth printing beside the results (consumers, subscriptions, payload shape).
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// True when the system may deliver a message twice after a failure (a consumer died, an
    /// ack was lost): duplicates in the failure phase are then reported, not failed.
    fn at_least_once(&self) -> bool {
        false
    }

    /// True when one of the receivers can die holding work on [`Run::kill_requested`].
    fn kills_workers(&self) -> bool {
        false
    }

    /// After the phase (receivers stopped): delete what [`Scenario::prepare`] made for it.
    fn finish(&self, run: &Arc<Run>) -> impl Future<Output = ()> + Send {
        let _ = run;
        async {}
    }

    /// Before the load: create what it needs on the server (queues, subscriptions). The run
    /// handed here has the phase's name, client and base but no messages (`total` 0).
    fn prepare(&self, run: &Arc<Run>) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Spawn the receivers. Each calls [`Run::delivered`] for every message it gets and runs
    /// until aborted. Return once they are attached (a subscriber whose stream is open).
    fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> impl Future<Output = anyhow::Result<Vec<JoinHandle<()>>>> + Send;

    /// Send messages `seqs` in one request; `Ok` once the server acknowledged them as durable.
    fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A boxed future, as [`Bench::drive`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A scenario ready to run phases, whatever its type.
pub trait Bench: Send + Sync {
    /// Run one phase of the load (see [`drive`]).
    fn drive(&self, phase: Phase) -> BoxFuture<'_, anyhow::Result<Measured>>;
    /// [`Scenario::kills_workers`].
    fn kills_workers(&self) -> bool;
    /// [`Scenario::at_least_once`].
    fn at_least_once(&self) -> bool;
}

impl<S: Scenario> Bench for Arc<S> {
    fn drive(&self, phase: Phase) -> BoxFuture<'_, anyhow::Result<Measured>> {
        Box::pin(drive(self.clone(), phase))
    }

    fn kills_workers(&self) -> bool {
        S::kills_workers(self)
    }

    fn at_least_once(&self) -> bool {
        S::at_least_once(self)
    }
}

/// One registered scenario: its system id and how to build it.
pub struct Entry {
    pub system: &'static str,
    pub new: fn(&SystemArgs, &SystemSpec) -> anyhow::Result<Box<dyn Bench>>,
}

/// The entry of scenario `S`.
pub fn entry<S: Scenario>() -> Entry {
    Entry { system: S::SYSTEM, new: |args, spec| Ok(Box::new(Arc::new(S::new(args, spec)?))) }
}

/// Every system with a bench scenario. One line per system.
pub fn registry() -> Vec<Entry> {
    vec![
        entry::<basic_message_queue::BasicMessageQueue>(),
        entry::<simple_pubsub::SimplePubsub>(),
        entry::<realtime_chat_messages::RealtimeChatMessages>(),
        entry::<email_queue_system::EmailQueueSystem>(),
        entry::<stock_price_updates::StockPriceUpdates>(),
        entry::<realtime_notifications::RealtimeNotifications>(),
        entry::<notification_fanout::NotificationFanout>(),
    ]
}

/// The scenario of `system`, if one is written.
pub fn find(system: &str) -> Option<Entry> {
    registry().into_iter().find(|e| e.system == system)
}

/// What one phase runs against, at which load, and what goes wrong during it.
#[derive(Clone)]
pub struct Phase {
    /// `normal`, `peak`, `failure`.
    pub name: &'static str,
    /// Unique among the phases of one process (`normal`, `peak-50000`): names the run.
    pub label: String,
    pub base: String,
    pub client: reqwest::Client,
    pub rate: u64,
    pub warmup_seconds: u64,
    pub seconds: u64,
    /// Retry a failed send until it is acknowledged (for [`RETRY_WINDOW`]), as a client
    /// riding out a restart would; off, a failed send is an error at once.
    pub retry: bool,
    /// The seed's latency target: deliveries slower than this after a fault count as not yet
    /// recovered.
    pub latency_target_ms: f64,
    pub faults: Vec<Fault>,
    /// Advanced once per send (hidden when not on a terminal).
    pub progress: Option<indicatif::ProgressBar>,
}

/// Stop the server and start it again on the same data and address; resolves once it answers.
pub type Restart = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A fault injected `after` the measured window's start.
#[derive(Clone)]
pub struct Fault {
    pub after: Duration,
    pub kind: FaultKind,
}

#[derive(Clone)]
pub enum FaultKind {
    /// One receiver dies holding the messages it just got (see [`Scenario::kills_workers`]).
    KillWorker,
    /// The server stops (drains, closes the engine) and starts again on the same data.
    RestartServer(Restart),
}

impl FaultKind {
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::KillWorker => "worker_killed",
            FaultKind::RestartServer(_) => "server_restarted",
        }
    }
}

/// What a fault did and how long the system took to recover.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: &'static str,
    /// When it was injected, in seconds after the measured window's start.
    pub at_s: f64,
    /// Restart: from the stop to the server answering again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_ms: Option<f64>,
    /// Worker killed: messages it held unprocessed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
    /// Worker killed: until the last held message reached another worker. Restart: until the
    /// last delivery slower than the latency target (deliveries after it were all on target);
    /// at least `down_ms`. `None`: not recovered (a held message never arrived).
    pub recovered_ms: Option<f64>,
}

/// Latency of the messages intended in one second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SecondSummary {
    /// Seconds after the measured window's start (negative: warm-up).
    pub second: i64,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The shared state of one phase: what scenarios read and report into.
pub struct Run {
    /// The server's base URL, no trailing slash (`http://127.0.0.1:7400`).
    pub base: String,
    pub client: reqwest::Client,
    /// Unique per process and phase (`bench-1234-normal`): name queues and topics after it.
    pub name: String,
    /// `normal`, `peak` or `failure`.
    pub phase: &'static str,
    pub schedule: Schedule,
    /// Messages the phase sends in all (warm-up included); `seq` runs over `0..total`.
    pub total: u64,
    /// Messages below this `seq` are warm-up: delivered and checked, not timed.
    pub warmup: u64,
    batch: u64,
    receivers: usize,
    /// Per (seq, receiver): whether the receiver must get the message.
    expected: Vec<bool>,
    /// Per (seq, receiver): deliveries, saturating at 255.
    counts: Vec<AtomicU8>,
    /// Per (seq, receiver): ns after the schedule's start of the first delivery; 0 = none.
    delivered_at: Vec<AtomicU64>,
    /// Per seq: ns after the schedule's start of the acknowledgement; 0 = not acknowledged.
    acked_at: Vec<AtomicU64>,
    first_deliveries: AtomicU64,
    /// Deliveries the acknowledged messages owe (receivers expecting them).
    owed: AtomicU64,
    unexpected: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    kill: AtomicBool,
    abandoned: Mutex<Vec<u64>>,
}

impl Run {
    /// A run of `phase`, with room for its messages when `sized` (the run handed to
    /// [`Scenario::prepare`] is not).
    fn new(phase: &Phase, batch: u64, receivers: usize, expects: impl Fn(usize, u64) -> bool, sized: bool) -> Run {
        let total = if sized { phase.rate * (phase.warmup_seconds + phase.seconds) } else { 0 };
        let slots = total as usize * receivers;
        Run {
            base: phase.base.trim_end_matches('/').to_string(),
            client: phase.client.clone(),
            name: format!("bench-{}-{}", std::process::id(), phase.label),
            phase: phase.name,
            schedule: Schedule::new(Instant::now() + START_DELAY, phase.rate.max(1)),
            total,
            warmup: phase.rate * phase.warmup_seconds,
            batch: batch.max(1),
            receivers,
            expected: (0..slots).map(|slot| expects(slot % receivers, (slot / receivers) as u64)).collect(),
            counts: (0..slots).map(|_| AtomicU8::new(0)).collect(),
            delivered_at: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            acked_at: (0..total).map(|_| AtomicU64::new(0)).collect(),
            first_deliveries: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            kill: AtomicBool::new(false),
            abandoned: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds after the schedule's start at which message `seq` was meant to be sent (its
    /// batch's send time).
    pub fn intended_ns(&self, seq: u64) -> u64 {
        self.schedule.intended_ns(seq - seq % self.batch)
    }

    /// `receiver` got message `seq`. Returns true the first time, false for a duplicate, or for
    /// a message this run never sent or the receiver did not subscribe to (counted as
    /// unexpected).
    pub fn delivered(&self, receiver: usize, seq: u64) -> bool {
        if seq >= self.total || receiver >= self.receivers {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let slot = seq as usize * self.receivers + receiver;
        if !self.expected[slot] {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let before = self.counts[slot].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_add(1))).unwrap_or(u8::MAX);
        if before != 0 {
            return false;
        }
        self.delivered_at[slot].store(self.schedule.elapsed_ns().max(1), Ordering::Release);
        self.first_deliveries.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Count a failed request (a receive, an ack, a connection) that the scenario handled.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// True once per [`FaultKind::KillWorker`]: the receiver that sees it dies (see
    /// [`Scenario::kills_workers`]).
    pub fn kill_requested(&self) -> bool {
        self.kill.swap(false, Ordering::AcqRel)
    }

    /// A dying receiver held these messages and did not process them.
    pub fn abandoned(&self, seqs: &[u64]) {
        self.abandoned.lock().extend_from_slice(seqs);
    }
}

/// What one phase measured.
pub struct Measured {
    pub end_to_end: LatencyHistogram,
    pub publish: LatencyHistogram,
    /// Messages sent (attempted) in the phase, warm-up included.
    pub sent: u64,
    /// Timed first deliveries (after the warm-up).
    pub measured_messages: u64,
    /// Messages after the warm-up delivered to every receiver that expected them, per second
    /// of the time it took to deliver them (see [`achieved_rate`]).
    pub achieved_rate: f64,
    pub errors: u64,
    /// Sends repeated after a failure (the failure phase's client retries).
    pub retries: u64,
    /// Acknowledged messages a receiver that expected them never got.
    pub lost: u64,
    /// (message, receiver) pairs delivered more than once.
    pub duplicated: u64,
    /// Deliveries of messages this run never sent or to receivers that did not expect them.
    pub unexpected: u64,
    pub series: Vec<SecondSummary>,
    pub faults: Vec<FaultReport>,
    pub scenario: serde_json::Value,
    /// Seconds the scenario's preparation took (registering subscribers or subscriptions),
    /// before the schedule.
    pub prepare_seconds: f64,
}

/// How long receivers keep going after the last publish to collect stragglers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Sends in flight (retrying ones included) before the publisher counts an error instead of
/// piling up. Each in-process request holds two file descriptors (client and server side), and
/// the machine allows 20,000 per process: more in flight turns an overload into `EMFILE`.
const PUBLISH_IN_FLIGHT_MAX: usize = 4_000;
/// Time between attaching the receivers and the first intended send.
const START_DELAY: Duration = Duration::from_millis(300);
/// With [`Phase::retry`], how long after its intended time a send is still retried.
pub const RETRY_WINDOW: Duration = Duration::from_secs(30);
/// Pause between two attempts of a failed send.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Run one phase of `scenario`: prepare, attach receivers, send on the open-loop schedule while
/// injecting the phase's faults, wait for the stragglers, and count what was lost and
/// duplicated.
pub async fn drive<S: Scenario>(scenario: Arc<S>, phase: Phase) -> anyhow::Result<Measured> {
    let (batch, receivers) = (scenario.batch(), scenario.receivers().max(1));
    // Preparing may take long (a million subscriptions): the schedule starts after it.
    let preparing = Instant::now();
    scenario.prepare(&Arc::new(Run::new(&phase, batch, receivers, |_, _| true, false))).await?;
    let prepare_seconds = preparing.elapsed().as_secs_f64();
    let run = Arc::new(Run::new(&phase, batch, receivers, |r, seq| scenario.expects(r, seq), true));
    let receivers = scenario.start_receivers(&run).await?;
    if let Some(progress) = &phase.progress {
        progress.set_length(run.total);
        progress.set_position(0);
        progress.set_message(format!("{} at {}/s", phase.label, phase.rate));
    }

    let window_start_ns = run.schedule.intended_ns(run.warmup);
    let faults = {
        let (run, phase) = (run.clone(), phase.clone());
        tokio::spawn(async move { inject(&run, &phase, window_start_ns).await })
    };

    let in_flight = Arc::new(tokio::sync::Semaphore::new(PUBLISH_IN_FLIGHT_MAX));
    let mut sent = 0u64;
    let mut first = 0u64;
    while first < run.total {
        let intended = run.schedule.intended_ns(first);
        let now = run.schedule.elapsed_ns();
        if intended > now {
            tokio::time::sleep(Duration::from_nanos(intended - now)).await;
        }
        let last = (first + run.batch).min(run.total);
        if let Some(progress) = &phase.progress {
            progress.set_position(last);
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            run.error();
            first = last;
            continue;
        };
        sent += last - first;
        let (scenario, run, retry) = (scenario.clone(), run.clone(), phase.retry);
        tokio::spawn(async move {
            let seqs = first..last;
            loop {
                match scenario.send(&run, seqs.clone()).await {
                    Ok(()) => {
                        let at = run.schedule.elapsed_ns().max(1);
                        let mut owed = 0;
                        for seq in seqs.clone() {
                            run.acked_at[seq as usize].store(at, Ordering::Release);
                            owed += (0..run.receivers).filter(|r| run.expected[seq as usize * run.receivers + r]).count() as u64;
                        }
                        run.owed.fetch_add(owed, Ordering::AcqRel);
                        break;
                    }
                    Err(_) if retry && run.schedule.elapsed_ns().saturating_sub(intended) < RETRY_WINDOW.as_nanos() as u64 => {
                        run.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Err(_) => {
                        run.error();
                        break;
                    }
                }
            }
            drop(permit);
        });
        first = last;
    }
    let _ = in_flight.acquire_many(PUBLISH_IN_FLIGHT_MAX as u32).await;
    let fault_times = faults.await.unwrap_or_default();
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while run.first_deliveries.load(Ordering::Acquire) < run.owed.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A killed worker's messages come back only when its leases run out.
        while fault_times.iter().any(|(f, _)| f.kind == "worker_killed") && !abandoned_delivered(&run) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for receiver in receivers {
        receiver.abort();
    }
    scenario.finish(&run).await;
    if let Some(progress) = &phase.progress {
        progress.set_position(run.total);
    }
    Ok(account(&run, &phase, sent, fault_times, scenario.describe(), prepare_seconds))
}

/// Inject the phase's faults on time; returns them with what was measured while injecting.
async fn inject(run: &Run, phase: &Phase, window_start_ns: u64) -> Vec<(FaultReport, u64)> {
    let mut faults = phase.faults.clone();
    faults.sort_by_key(|f| f.after);
    let mut reports = Vec::new();
    for fault in faults {
        let due = window_start_ns + fault.after.as_nanos() as u64;
        let now = run.schedule.elapsed_ns();
        if due > now {
            tokio::time::sleep(Duration::from_nanos(due - now)).await;
        }
        let at = run.schedule.elapsed_ns();
        let at_s = (at as f64 - window_start_ns as f64) / 1e9;
        let mut report = FaultReport { kind: fault.kind.name(), at_s, down_ms: None, held: None, recovered_ms: None };
        match &fault.kind {
            FaultKind::KillWorker => run.kill.store(true, Ordering::Release),
            FaultKind::RestartServer(restart) => {
                if let Err(error) = restart().await {
                    tracing::warn!(%error, "restarting the server failed");
                    run.error();
                } else {
                    report.down_ms = Some((run.schedule.elapsed_ns() - at) as f64 / 1e6);
                }
            }
        }
        reports.push((report, at));
    }
    reports
}

fn abandoned_delivered(run: &Run) -> bool {
    let abandoned = run.abandoned.lock();
    abandoned.iter().all(|seq| {
        let base = *seq as usize * run.receivers;
        (0..run.receivers).all(|r| !run.expected[base + r] || run.delivered_at[base + r].load(Ordering::Acquire) != 0)
    })
}

/// Loss, duplicates, latency and recovery, from what the run recorded.
fn account(run: &Run, phase: &Phase, sent: u64, faults: Vec<(FaultReport, u64)>, scenario: serde_json::Value, prepare_seconds: f64) -> Measured {
    let ms = |ns: u64| ns as f64 / 1e6;
    let window_start_ns = run.schedule.intended_ns(run.warmup);
    let seconds = run.total.div_ceil(phase.rate.max(1)) as usize;
    let mut per_second: Vec<LatencyHistogram> = (0..seconds).map(|_| LatencyHistogram::new()).collect();
    let mut end_to_end = LatencyHistogram::new();
    let mut publish = LatencyHistogram::new();
    let (mut lost, mut duplicated, mut complete, mut last_delivery_ns) = (0, 0, 0u64, 0u64);
    let target_ns = (phase.latency_target_ms * 1e6) as u64;
    let mut slow_after: Vec<u64> = vec![0; faults.len()];
    let fault_at: Vec<u64> = faults.iter().map(|(_, at)| *at).collect();
    for seq in 0..run.total {
        let intended = run.intended_ns(seq);
        let acked = run.acked_at[seq as usize].load(Ordering::Acquire);
        if acked != 0 && seq >= run.warmup {
            publish.record_ns(acked.saturating_sub(intended));
        }
        let mut all_there = acked != 0;
        for receiver in 0..run.receivers {
            let slot = seq as usize * run.receivers + receiver;
            if !run.expected[slot] {
                continue;
            }
            let n = run.counts[slot].load(Ordering::Acquire);
            if n > 1 {
                duplicated += 1;
            }
            let at = run.delivered_at[slot].load(Ordering::Acquire);
            if at == 0 {
                all_there = false;
                if acked != 0 {
                    lost += 1;
                }
                continue;
            }
            let latency = at.saturating_sub(intended);
            per_second[((intended / 1_000_000_000) as usize).min(seconds - 1)].record_ns(latency);
            if seq >= run.warmup {
                end_to_end.record_ns(latency);
                last_delivery_ns = last_delivery_ns.max(at);
            }
            for (i, fault_ns) in fault_at.iter().enumerate() {
                if at >= *fault_ns && latency > target_ns {
                    slow_after[i] = slow_after[i].max(at - fault_ns);
                }
            }
        }
        if all_there && seq >= run.warmup {
            complete += 1;
        }
    }
    let abandoned = run.abandoned.lock().clone();
    let faults = faults
        .into_iter()
        .enumerate()
        .map(|(i, (mut fault, at))| {
            fault.recovered_ms = match fault.kind {
                "worker_killed" => {
                    fault.held = Some(abandoned.len() as u64);
                    let mut last = Some(at);
                    for seq in &abandoned {
                        for receiver in 0..run.receivers {
                            let slot = *seq as usize * run.receivers + receiver;
                            let delivered = run.delivered_at[slot].load(Ordering::Acquire);
                            if run.expected[slot] {
                                last = if delivered == 0 { None } else { last.map(|l| l.max(delivered)) };
                            }
                        }
                    }
                    last.map(|l| ms(l.saturating_sub(at)))
                }
                _ => Some(ms(slow_after[i]).max(fault.down_ms.unwrap_or(0.0))),
            };
            fault
        })
        .collect();
    let summary = end_to_end.summary();
    let series = per_second
        .iter()
        .enumerate()
        .filter(|(_, h)| h.count() > 0)
        .map(|(s, h)| {
            let summary = h.summary();
            SecondSummary { second: s as i64 - phase.warmup_seconds as i64, count: summary.count, p50_ms: summary.p50, p99_ms: summary.p99, max_ms: summary.max }
        })
        .collect();
    Measured {
        measured_messages: end_to_end.count(),
        achieved_rate: achieved_rate(complete, phase.seconds, last_delivery_ns.saturating_sub(window_start_ns), summary.p50),
        end_to_end,
        publish,
        sent,
        errors: run.errors.load(Ordering::Relaxed),
        retries: run.retries.load(Ordering::Relaxed),
        lost,
        duplicated,
        unexpected: run.unexpected.load(Ordering::Relaxed),
        series,
        faults,
        scenario,
        prepare_seconds,
    }
}

/// Messages per second actually carried: `delivered` messages over the time from the measured
/// window's start to the last delivery, less one median latency (a pipeline that keeps up
/// delivers its last message one latency after the window ends), and never less than the
/// window itself. A system that falls behind stretches the span and the rate drops below the
/// offered one.
pub fn achieved_rate(delivered: u64, window_seconds: u64, span_ns: u64, p50_ms: f64) -> f64 {
    let span_s = (span_ns as f64 / 1e9 - p50_ms / 1e3).max(window_seconds.max(1) as f64);
    delivered as f64 / span_s
}

/// `"x"` repeated to pad a JSON payload to about `bytes` (the rest of the payload is about
/// `overhead` bytes).
/// Check that `response` has `status`, reading its body either way: a response dropped with
/// its body unread cannot give its connection back to the client's pool, so every request
/// would open a new connection (and the machine fills with TIME-WAIT sockets).
pub async fn expect_status(response: reqwest::Response, status: reqwest::StatusCode, what: &str) -> anyhow::Result<()> {
    let got = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(got == status, "{what} answered {got}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    Ok(())
}

/// Messages per publish request of the scenarios that batch, unless `--publish-batch` says.
pub const PUBLISH_BATCH_DEFAULT: u64 = 10;

/// `--publish-batch`, else `default`; at least 1.
pub fn publish_batch(args: &SystemArgs, default: u64) -> u64 {
    args.publish_batch.unwrap_or(default).max(1)
}

pub fn padding(bytes: usize, overhead: usize) -> String {
    "x".repeat(bytes.saturating_sub(overhead))
}

/// A 64-bit mix of `seq` (SplitMix64): a reproducible "random" number per message.
pub fn mix(seq: u64) -> u64 {
    let mut z = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A Zipf distribution over `0..n` (rank 0 the most frequent), sampled from a hash: real keys
/// (tenants, symbols, users) are skewed, and a hot key is where partitioned systems hurt.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// Weights `1 / (rank + 1)^exponent`.
    pub fn new(n: usize, exponent: f64) -> Zipf {
        assert!(n > 0, "a Zipf distribution needs at least one key");
        let mut total = 0.0;
        let mut cumulative: Vec<f64> = (0..n)
            .map(|rank| {
                total += 1.0 / ((rank + 1) as f64).powf(exponent);
                total
            })
            .collect();
        for c in &mut cumulative {
            *c /= total;
        }
        Zipf { cumulative }
    }

    /// The key of message `seq`.
    pub fn key(&self, seq: u64) -> usize {
        let u = (mix(seq) >> 11) as f64 / (1u64 << 53) as f64;
        self.cumulative.partition_point(|c| *c <= u).min(self.cumulative.len() - 1)
    }

    /// The share of messages that get `key`.
    pub fn share(&self, key: usize) -> f64 {
        self.cumulative[key] - if key == 0 { 0.0 } else { self.cumulative[key - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_keys_are_skewed_and_reproducible() {
        let zipf = Zipf::new(1000, 1.0);
        let mut counts = vec![0u32; 1000];
        for seq in 0..100_000 {
            counts[zipf.key(seq)] += 1;
        }
        assert_eq!(zipf.key(42), zipf.key(42));
        let hottest = counts[0] as f64 / 100_000.0;
        assert!((hottest - zipf.share(0)).abs() < 0.01, "key 0 gets its share: {hottest} vs {}", zipf.share(0));
        assert!(counts[0] > 50 * counts[500].max(1), "the head is much hotter than the tail: {} vs {}", counts[0], counts[500]);
    }

    #[test]
    fn a_pipeline_that_keeps_up_achieves_the_offered_rate_and_one_that_falls_behind_does_not() {
        // 10 s at 1,000/s, last delivery 30 ms after the window with p50 30 ms: kept up.
        assert_eq!(achieved_rate(10_000, 10, 10_030_000_000, 30.0), 1000.0);
        // Same messages, but the last one arrived 5 s late: 10,000 over 15 s.
        let behind = achieved_rate(10_000, 10, 15_030_000_000, 30.0);
        assert!((behind - 666.7).abs() < 1.0, "{behind}");
    }
}
