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
//! What is not here: the command line, the in-process server and the report (`bench/system.rs`).

pub mod basic_message_queue;
pub mod realtime_notifications;
pub mod simple_pubsub;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
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

    /// Before the load: create what it needs on the server (queues, subscriptions).
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
}

impl<S: Scenario> Bench for Arc<S> {
    fn drive(&self, phase: Phase) -> BoxFuture<'_, anyhow::Result<Measured>> {
        Box::pin(drive(self.clone(), phase))
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
        entry::<realtime_notifications::RealtimeNotifications>(),
    ]
}

/// The scenario of `system`, if one is written.
pub fn find(system: &str) -> Option<Entry> {
    registry().into_iter().find(|e| e.system == system)
}

/// What one phase runs against, and at which load.
#[derive(Debug, Clone)]
pub struct Phase {
    /// `normal`, `peak`, `failure`.
    pub name: &'static str,
    pub base: String,
    pub client: reqwest::Client,
    pub rate: u64,
    pub warmup_seconds: u64,
    pub seconds: u64,
}

/// The shared state of one phase: what scenarios read and report into.
pub struct Run {
    /// The server's base URL, no trailing slash (`http://127.0.0.1:7400`).
    pub base: String,
    pub client: reqwest::Client,
    /// Unique per process and phase (`bench-1234-normal`): name queues and topics after it.
    pub name: String,
    pub schedule: Schedule,
    /// Messages the phase sends in all (warm-up included); `seq` runs over `0..total`.
    pub total: u64,
    /// Messages below this `seq` are warm-up: delivered and checked, not timed.
    pub warmup: u64,
    batch: u64,
    receivers: usize,
    /// Deliveries per (seq, receiver), saturating at 255.
    deliveries: Vec<AtomicU8>,
    acknowledged: Vec<AtomicBool>,
    first_deliveries: AtomicU64,
    /// Deliveries the acknowledged messages owe (receivers expecting them).
    owed: AtomicU64,
    unexpected: AtomicU64,
    errors: AtomicU64,
    end_to_end: Mutex<LatencyHistogram>,
    publish: Mutex<LatencyHistogram>,
}

impl Run {
    fn new(phase: &Phase, batch: u64, receivers: usize) -> Run {
        let total = phase.rate * (phase.warmup_seconds + phase.seconds);
        let slots = total as usize * receivers;
        Run {
            base: phase.base.trim_end_matches('/').to_string(),
            client: phase.client.clone(),
            name: format!("bench-{}-{}", std::process::id(), phase.name),
            // Placeholder start; `drive` sets the real one once receivers are attached.
            schedule: Schedule::new(Instant::now(), phase.rate.max(1)),
            total,
            warmup: phase.rate * phase.warmup_seconds,
            batch: batch.max(1),
            receivers,
            deliveries: (0..slots).map(|_| AtomicU8::new(0)).collect(),
            acknowledged: (0..total).map(|_| AtomicBool::new(false)).collect(),
            first_deliveries: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            end_to_end: Mutex::new(LatencyHistogram::new()),
            publish: Mutex::new(LatencyHistogram::new()),
        }
    }

    /// Nanoseconds after the schedule's start at which message `seq` was meant to be sent (its
    /// batch's send time).
    pub fn intended_ns(&self, seq: u64) -> u64 {
        self.schedule.intended_ns(seq - seq % self.batch)
    }

    /// `receiver` got message `seq`. Returns true the first time, false for a duplicate (or a
    /// `seq` this run never sent, counted as unexpected).
    pub fn delivered(&self, receiver: usize, seq: u64) -> bool {
        if seq >= self.total || receiver >= self.receivers {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let slot = &self.deliveries[seq as usize * self.receivers + receiver];
        let before = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_add(1))).unwrap_or(u8::MAX);
        if before != 0 {
            return false;
        }
        self.first_deliveries.fetch_add(1, Ordering::AcqRel);
        if seq >= self.warmup {
            let latency = self.schedule.elapsed_ns().saturating_sub(self.intended_ns(seq));
            self.end_to_end.lock().record_ns(latency);
        }
        true
    }

    /// Count a failed request (a receive, an ack, a connection) that the scenario handled.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
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
    pub errors: u64,
    /// Acknowledged messages a receiver that expected them never got.
    pub lost: u64,
    /// (message, receiver) pairs delivered more than once.
    pub duplicated: u64,
    /// Deliveries of messages this run never sent or to receivers that did not expect them.
    pub unexpected: u64,
    pub scenario: serde_json::Value,
}

/// How long receivers keep going after the last publish to collect stragglers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight from the publisher before it counts an error instead of piling up.
const PUBLISH_IN_FLIGHT_MAX: usize = 10_000;
/// Time between attaching the receivers and the first intended send.
const START_DELAY: Duration = Duration::from_millis(300);

/// Run one phase of `scenario`: prepare, attach receivers, send on the open-loop schedule, wait
/// for the stragglers, and count what was lost and duplicated.
pub async fn drive<S: Scenario>(scenario: Arc<S>, phase: Phase) -> anyhow::Result<Measured> {
    let mut run = Run::new(&phase, scenario.batch(), scenario.receivers());
    run.schedule = Schedule::new(Instant::now() + START_DELAY, phase.rate.max(1));
    let run = Arc::new(run);
    scenario.prepare(&run).await?;
    let receivers = scenario.start_receivers(&run).await?;

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
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            run.error();
            first = last;
            continue;
        };
        sent += last - first;
        let (scenario, run) = (scenario.clone(), run.clone());
        tokio::spawn(async move {
            let seqs = first..last;
            match scenario.send(&run, seqs.clone()).await {
                Ok(()) => {
                    let mut owed = 0;
                    for seq in seqs.clone() {
                        run.acknowledged[seq as usize].store(true, Ordering::Release);
                        owed += (0..run.receivers).filter(|r| scenario.expects(*r, seq)).count() as u64;
                    }
                    run.owed.fetch_add(owed, Ordering::AcqRel);
                    if seqs.start >= run.warmup {
                        run.publish.lock().record_ns_n(run.schedule.elapsed_ns().saturating_sub(intended), seqs.end - seqs.start);
                    }
                }
                Err(_) => run.error(),
            }
            drop(permit);
        });
        first = last;
    }
    let _ = in_flight.acquire_many(PUBLISH_IN_FLIGHT_MAX as u32).await;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while run.first_deliveries.load(Ordering::Acquire) < run.owed.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for receiver in receivers {
        receiver.abort();
    }

    let mut lost = 0;
    let mut duplicated = 0;
    for seq in 0..run.total {
        let acknowledged = run.acknowledged[seq as usize].load(Ordering::Acquire);
        for receiver in 0..run.receivers {
            let n = run.deliveries[seq as usize * run.receivers + receiver].load(Ordering::Acquire);
            if n > 1 {
                duplicated += 1;
            }
            if n == 0 && acknowledged && scenario.expects(receiver, seq) {
                lost += 1;
            }
        }
    }
    let end_to_end = run.end_to_end.lock().clone();
    let publish = run.publish.lock().clone();
    Ok(Measured {
        measured_messages: end_to_end.count(),
        end_to_end,
        publish,
        sent,
        errors: run.errors.load(Ordering::Relaxed),
        lost,
        duplicated,
        unexpected: run.unexpected.load(Ordering::Relaxed),
        scenario: scenario.describe(),
    })
}

/// `"x"` repeated to pad a JSON payload to about `bytes` (the rest of the payload is about
/// `overhead` bytes).
pub fn padding(bytes: usize, overhead: usize) -> String {
    "x".repeat(bytes.saturating_sub(overhead))
}
