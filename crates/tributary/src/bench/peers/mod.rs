//! `tributary bench engine --peer nats|redis|rabbitmq`: the engine bench's workload run against
//! a peer broker on the same machine, through its Rust client, so rows compare like with like.
//!
//! The workload is the engine bench's [`Plan`] (message size, batch, partitions, producers,
//! messages, `--rate`) and the report is an [`EngineReport`] with `peer`, `peer_version` and
//! `durability_label` filled in. What each mode does against a peer:
//! - **Throughput** (no `--rate`): `--producers` connections publish batches back to back, one
//!   batch in flight each, and wait for every message's acknowledgement (JetStream publish ack,
//!   Redis `XADD` reply, RabbitMQ publisher confirm) before the next batch. Then one consumer per
//!   partition reads everything back from the start.
//! - **Rate** (`--rate R`): open loop. Producer threads publish on the [`Schedule`] and hand the
//!   acknowledgement to an async waiter that records publish→ack; one consumer per partition,
//!   subscribed before the first send, records produce→consume. Both from the intended send time
//!   carried in each message, as in the engine bench.
//!
//! Every message carries its index (bytes 8..16 of the value); consumers mark each index seen,
//! and a run fails on a duplicate, a missing message or a wrong size. A partition is one JetStream
//! stream, one Redis stream key, or one RabbitMQ queue, each named uniquely for the run and
//! deleted afterwards (also when the run fails).
//!
//! Durability is reported as the peer really behaves ([`PeerDurability`]): the class it gives is
//! in `durability` (`always`: fsync before the ack; `interval:<ms>`; `never`: no fsync before the
//! ack; `memory`: not written to disk at all), the detail in `durability_label`. `--durability`
//! asks for a class: it picks the RabbitMQ queue type and configures a peer started with
//! `--spawn-peer`; a peer that cannot give the class asked for (the machine's Redis keeps nothing
//! on disk) still runs, and its report carries the class it gave, not the one asked for.
//!
//! Not here: the peers' own batching APIs beyond what a client does by default (JetStream has no
//! batch publish in 2.9; RabbitMQ's stream protocol plugin is not used, only AMQP 0.9.1).

mod nats;
mod rabbitmq;
mod redis;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tributary_log::Durability;

use super::engine::{EngineArgs, EngineReport, Plan};
use super::latency::{LatencyHistogram, Schedule};
use super::{Machine, Targets};

/// Bytes at the start of each value: intended send time (ns after start, LE), then the
/// message's index (LE).
const STAMP_BYTES: usize = 16;
/// A consumer that receives nothing for this long while messages are still missing fails the run.
const CONSUME_IDLE_MAX: Duration = Duration::from_secs(30);
/// How long one consumer poll waits before checking whether the run failed.
const CONSUME_POLL: Duration = Duration::from_millis(100);
/// Delay from planning a rate run to its first intended send, so every connection is up.
const RATE_START_DELAY: Duration = Duration::from_millis(200);
/// Acknowledgements a rate-mode producer may have outstanding before its sends block.
const IN_FLIGHT_ACKS_MAX: usize = 65_536;
/// How long a peer started by `--spawn-peer` may take to accept connections.
const SPAWN_READY_MAX: Duration = Duration::from_secs(20);

/// Which peer `--peer` runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKind {
    /// NATS JetStream, file storage, one stream per partition.
    Nats,
    /// Redis Streams, one stream key per partition (`XADD`, `XREAD`).
    Redis,
    /// RabbitMQ over AMQP 0.9.1 with publisher confirms: a quorum queue per partition under
    /// `--durability always`, a stream otherwise.
    Rabbitmq,
    /// RabbitMQ quorum queues whatever `--durability` says.
    RabbitmqQuorum,
    /// RabbitMQ streams (used as AMQP queues) whatever `--durability` says.
    RabbitmqStream,
}

/// Options of `tributary bench engine` that point it at a peer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PeerArgs {
    /// Run the workload against this peer instead of the embedded log.
    #[arg(long, value_enum)]
    pub peer: Option<PeerKind>,
    /// The peer's address [default: nats://127.0.0.1:4222, redis://127.0.0.1:6379,
    /// amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, requires = "peer")]
    pub peer_url: Option<String>,
    /// Start a private peer server (nats-server or redis-server) on a free loopback port with a
    /// temporary data directory, configured for --durability, and stop it afterwards.
    #[arg(long, requires = "peer", conflicts_with = "peer_url")]
    pub spawn_peer: bool,
}

/// What a peer does with a message before acknowledging it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDurability {
    /// `always`, `interval:<ms>`, `never` or `memory` (see the module doc).
    pub class: String,
    /// The setting behind the class, in words.
    pub label: String,
}

impl PeerDurability {
    fn new(class: impl Into<String>, label: impl Into<String>) -> PeerDurability {
        PeerDurability { class: class.into(), label: label.into() }
    }
}

/// An acknowledgement on its way: resolves once the peer acknowledged every message of a send.
pub(crate) type Ack = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A connected peer with one stream or queue per partition.
pub(crate) trait Peer: Send + Sync + 'static {
    type Producer: Producer;
    type Consumer: Consumer;
    /// The server's version as it reports it.
    fn server_version(&self) -> String;
    fn durability(&self) -> PeerDurability;
    /// A new producer with its own connection (or channel).
    fn producer(&self) -> impl Future<Output = anyhow::Result<Self::Producer>> + Send;
    /// A consumer reading `partition` from its first message.
    fn consumer(&self, partition: u32) -> impl Future<Output = anyhow::Result<Self::Consumer>> + Send;
    /// Delete every stream or queue this run created.
    fn clean_up(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

pub(crate) trait Producer: Send + 'static {
    /// Publish `values` to `partition`: returns once they are handed to the connection, with the
    /// acknowledgement still to come.
    fn send(&mut self, partition: u32, values: Vec<Bytes>) -> impl Future<Output = anyhow::Result<Ack>> + Send;
}

pub(crate) trait Consumer: Send + 'static {
    /// The next values delivered, waiting at most `wait`; empty when none came.
    fn poll(&mut self, wait: Duration) -> impl Future<Output = anyhow::Result<Vec<Bytes>>> + Send;
}

/// Run the engine bench's workload against the peer `peer.peer`.
pub fn run(args: &EngineArgs, peer: &PeerArgs) -> anyhow::Result<EngineReport> {
    let kind = peer.peer.context("run needs --peer")?;
    let plan = Plan::from_args(args)?;
    ensure!(
        plan.message_bytes >= STAMP_BYTES,
        "--peer needs --message-bytes of at least {STAMP_BYTES}: each value carries its send time and index"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let spawned = if peer.spawn_peer { Some(SpawnedPeer::start(kind, args.durability)?) } else { None };
    let url = match (&spawned, &peer.peer_url) {
        (Some(spawned), _) => spawned.url.clone(),
        (None, Some(url)) => url.clone(),
        (None, None) => default_url(kind).to_string(),
    };
    let data_dir = spawned.as_ref().map(|s| s.dir.path().to_path_buf());
    let machine = Machine::probe(data_dir.as_deref().unwrap_or(&std::env::temp_dir()));
    let run_id = run_id();
    let setup = Setup { url: url.clone(), run_id, partitions: plan.partitions, spawned: spawned.as_ref().map(|s| s.config.clone()) };
    let (measured, version, durability) = runtime.block_on(async {
        match kind {
            PeerKind::Nats => measure(nats::Nats::connect(&setup).await?, &plan, runtime.handle()).await,
            PeerKind::Redis => measure(redis::Redis::connect(&setup).await?, &plan, runtime.handle()).await,
            PeerKind::Rabbitmq | PeerKind::RabbitmqQuorum | PeerKind::RabbitmqStream => {
                let quorum = match kind {
                    PeerKind::RabbitmqQuorum => true,
                    PeerKind::RabbitmqStream => false,
                    _ => args.durability == Durability::Always,
                };
                measure(rabbitmq::Rabbitmq::connect(&setup, quorum).await?, &plan, runtime.handle()).await
            }
        }
    })?;
    drop(runtime);
    if let Some(spawned) = spawned {
        spawned.stop()?;
    }
    let per_s = |seconds: f64| if seconds > 0.0 { plan.messages as f64 / seconds } else { 0.0 };
    let mb_per_s = |seconds: f64| per_s(seconds) * plan.message_bytes as f64 / 1e6;
    Ok(EngineReport {
        bench: "engine",
        mode: if plan.rate.is_some() { "rate" } else { "throughput" },
        durability: durability.class,
        message_bytes: plan.message_bytes,
        batch: plan.batch,
        messages: plan.messages,
        partitions: plan.partitions,
        producers: plan.producers,
        segment_bytes: 0,
        fetch_bytes: 0,
        produce_seconds: measured.produce.as_secs_f64(),
        produce_msgs_per_s: per_s(measured.produce.as_secs_f64()),
        produce_mb_per_s: mb_per_s(measured.produce.as_secs_f64()),
        consumed_messages: measured.consumed,
        consume_seconds: measured.consume.as_secs_f64(),
        consume_msgs_per_s: per_s(measured.consume.as_secs_f64()),
        consume_mb_per_s: mb_per_s(measured.consume.as_secs_f64()),
        rate: plan.rate,
        publish_ack_ms: measured.publish_ack.map(|h| h.summary()),
        end_to_end_ms: measured.end_to_end.map(|h| h.summary()),
        data_dir: data_dir.unwrap_or_default(),
        peer: Some(peer_name(kind, args.durability).to_string()),
        peer_version: Some(version),
        durability_label: Some(durability.label),
        machine,
        target: Targets::new("peers are judged against the engine's rows in docs/benchmarks.md", Vec::new()),
    })
}

/// The name a run reports: `rabbitmq` resolves to the queue type it used.
fn peer_name(kind: PeerKind, durability: Durability) -> &'static str {
    match kind {
        PeerKind::Nats => "nats",
        PeerKind::Redis => "redis",
        PeerKind::RabbitmqQuorum => "rabbitmq-quorum",
        PeerKind::RabbitmqStream => "rabbitmq-stream",
        PeerKind::Rabbitmq if durability == Durability::Always => "rabbitmq-quorum",
        PeerKind::Rabbitmq => "rabbitmq-stream",
    }
}

fn default_url(kind: PeerKind) -> &'static str {
    match kind {
        PeerKind::Nats => "nats://127.0.0.1:4222",
        PeerKind::Redis => "redis://127.0.0.1:6379",
        PeerKind::Rabbitmq | PeerKind::RabbitmqQuorum | PeerKind::RabbitmqStream => "amqp://guest:guest@127.0.0.1:5672/%2f",
    }
}

/// A name part no other run shares: the process id and the time.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// What a peer driver needs to connect and create its partitions.
pub(crate) struct Setup {
    pub(crate) url: String,
    /// Unique per run: part of every stream, key and queue name.
    pub(crate) run_id: String,
    pub(crate) partitions: u32,
    /// How the peer was configured when this bench started it (`--spawn-peer`).
    pub(crate) spawned: Option<SpawnedConfig>,
}

impl Setup {
    /// The name of partition `p`'s stream, key or queue.
    pub(crate) fn partition_name(&self, p: u32) -> String {
        format!("tributary-bench-{}-p{p}", self.run_id)
    }
}

struct Measured {
    produce: Duration,
    consume: Duration,
    consumed: u64,
    publish_ack: Option<LatencyHistogram>,
    end_to_end: Option<LatencyHistogram>,
}

/// Run the plan against `peer`, then delete what it created whatever happened.
async fn measure<P: Peer>(peer: P, plan: &Plan, handle: &tokio::runtime::Handle) -> anyhow::Result<(Measured, String, PeerDurability)> {
    let peer = Arc::new(peer);
    let result = match plan.rate {
        None => run_throughput(&peer, plan).await,
        Some(rate) => run_rate(&peer, plan, rate, handle).await,
    };
    let cleaned = peer.clean_up().await;
    let measured = result?;
    cleaned.context("deleting the bench's streams or queues")?;
    ensure!(
        measured.consumed == plan.messages,
        "consumed {} messages but produced {}: messages were lost or duplicated",
        measured.consumed,
        plan.messages
    );
    Ok((measured, peer.server_version(), peer.durability()))
}

/// A value of `message_bytes` stamped with its intended send time and index.
fn stamped(message_bytes: usize, intended_ns: u64, index: u64) -> Bytes {
    let mut value = BytesMut::zeroed(message_bytes);
    value[..8].copy_from_slice(&intended_ns.to_le_bytes());
    value[8..16].copy_from_slice(&index.to_le_bytes());
    value.freeze()
}

/// Which message indices came back: a duplicate or an unknown index fails the run.
struct Seen {
    words: Vec<AtomicU64>,
    messages: u64,
}

impl Seen {
    fn new(messages: u64) -> Seen {
        Seen { words: (0..messages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), messages }
    }

    /// Check one delivered value and return its intended send time.
    fn mark(&self, value: &[u8], message_bytes: usize) -> anyhow::Result<u64> {
        ensure!(value.len() == message_bytes, "a {}-byte message came back, expected {message_bytes}", value.len());
        let intended = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
        let index = u64::from_le_bytes(value[8..16].try_into().expect("8 bytes"));
        ensure!(index < self.messages, "message index {index} was never produced");
        let bit = 1u64 << (index % 64);
        let before = self.words[(index / 64) as usize].fetch_or(bit, Ordering::Relaxed);
        ensure!(before & bit == 0, "message {index} was delivered twice");
        Ok(intended)
    }
}

/// Messages each partition receives under the plan.
fn expected_per_partition(plan: &Plan) -> Vec<u64> {
    let mut expected = vec![0u64; plan.partitions as usize];
    for p in 0..plan.producers {
        for (k, j) in (p as u64..plan.batches()).step_by(plan.producers).enumerate() {
            expected[plan.partition_of(p, k as u64)] += plan.batch_len(j) as u64;
        }
    }
    expected
}

/// Closed loop: each producer publishes its batches one at a time and waits for their acks;
/// then one consumer per partition reads everything back.
async fn run_throughput<P: Peer>(peer: &Arc<P>, plan: &Plan) -> anyhow::Result<Measured> {
    let mut producers = Vec::with_capacity(plan.producers);
    for _ in 0..plan.producers {
        producers.push(peer.producer().await?);
    }
    let began = Instant::now();
    let tasks: Vec<_> = producers
        .into_iter()
        .enumerate()
        .map(|(p, mut producer)| {
            let plan = plan.clone();
            tokio::spawn(async move {
                for (k, j) in (p as u64..plan.batches()).step_by(plan.producers).enumerate() {
                    let first = j * plan.batch as u64;
                    let values = (0..plan.batch_len(j) as u64).map(|i| stamped(plan.message_bytes, 0, first + i)).collect();
                    let partition = plan.partition_of(p, k as u64) as u32;
                    producer.send(partition, values).await?.await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await.context("a producer task panicked")??;
    }
    let produce = began.elapsed();
    let seen = Arc::new(Seen::new(plan.messages));
    let failed = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::with_capacity(plan.partitions as usize);
    for partition in 0..plan.partitions {
        consumers.push(peer.consumer(partition).await?);
    }
    let began = Instant::now();
    let schedule = Schedule::new(began, 1);
    let consumed = consume_all(consumers, plan, &seen, &failed, schedule, false).await?;
    Ok(Measured { produce, consume: began.elapsed(), consumed: consumed.count, publish_ack: None, end_to_end: None })
}

struct Consumed {
    count: u64,
    end_to_end: LatencyHistogram,
    last_ns: u64,
}

/// One task per partition reads until that partition's expected count arrived.
async fn consume_all<C: Consumer>(
    consumers: Vec<C>,
    plan: &Plan,
    seen: &Arc<Seen>,
    failed: &Arc<AtomicBool>,
    schedule: Schedule,
    record_latency: bool,
) -> anyhow::Result<Consumed> {
    let expected = expected_per_partition(plan);
    let tasks: Vec<_> = consumers
        .into_iter()
        .zip(expected)
        .enumerate()
        .map(|(partition, (mut consumer, expected))| {
            let (seen, failed, message_bytes) = (seen.clone(), failed.clone(), plan.message_bytes);
            tokio::spawn(async move {
                let mut histogram = LatencyHistogram::new();
                let (mut count, mut last_ns, mut last_progress) = (0u64, 0u64, Instant::now());
                while count < expected {
                    let values = consumer.poll(CONSUME_POLL).await.with_context(|| format!("consuming partition {partition}"))?;
                    if values.is_empty() {
                        if failed.load(Ordering::Acquire) {
                            bail!("stopped consuming partition {partition} after {count} of {expected} messages: the run failed");
                        }
                        ensure!(
                            last_progress.elapsed() < CONSUME_IDLE_MAX,
                            "partition {partition}: {count} of {expected} messages arrived, then nothing for {CONSUME_IDLE_MAX:?}"
                        );
                        continue;
                    }
                    last_progress = Instant::now();
                    last_ns = schedule.elapsed_ns();
                    for value in &values {
                        let intended = seen.mark(value, message_bytes).with_context(|| format!("partition {partition}"))?;
                        if record_latency {
                            histogram.record_ns(last_ns.saturating_sub(intended));
                        }
                    }
                    count += values.len() as u64;
                    ensure!(count <= expected, "partition {partition} delivered {count} messages, {expected} were sent to it");
                }
                anyhow::Ok((count, histogram, last_ns))
            })
        })
        .collect();
    let mut consumed = Consumed { count: 0, end_to_end: LatencyHistogram::new(), last_ns: 0 };
    let mut first_error = None;
    for task in tasks {
        match task.await.context("a consumer task panicked")? {
            Ok((count, histogram, last_ns)) => {
                consumed.count += count;
                consumed.end_to_end.merge(&histogram);
                consumed.last_ns = consumed.last_ns.max(last_ns);
            }
            Err(error) => {
                failed.store(true, Ordering::Release);
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(consumed),
    }
}

/// Open loop at `rate` messages per second: producer threads keep the schedule, async waiters
/// collect acknowledgements, consumers tail every partition.
async fn run_rate<P: Peer>(peer: &Arc<P>, plan: &Plan, rate: u64, handle: &tokio::runtime::Handle) -> anyhow::Result<Measured> {
    let mut producers = Vec::with_capacity(plan.producers);
    for _ in 0..plan.producers {
        producers.push(peer.producer().await?);
    }
    let mut consumers = Vec::with_capacity(plan.partitions as usize);
    for partition in 0..plan.partitions {
        consumers.push(peer.consumer(partition).await?);
    }
    let schedule = Schedule::new(Instant::now() + RATE_START_DELAY, rate);
    let seen = Arc::new(Seen::new(plan.messages));
    let failed = Arc::new(AtomicBool::new(false));
    let consuming = {
        let (plan, seen, failed) = (plan.clone(), seen.clone(), failed.clone());
        tokio::spawn(async move { consume_all(consumers, &plan, &seen, &failed, schedule, true).await })
    };
    let mut waiters = Vec::with_capacity(plan.producers);
    let mut threads = Vec::with_capacity(plan.producers);
    for (p, producer) in producers.into_iter().enumerate() {
        let (acks, pending) = mpsc::channel::<(Ack, u64, u64)>(IN_FLIGHT_ACKS_MAX);
        waiters.push(tokio::spawn(collect_acks(pending, schedule, failed.clone())));
        let (plan, handle, failed) = (plan.clone(), handle.clone(), failed.clone());
        threads.push(std::thread::spawn(move || {
            let mut producer = producer;
            let result = produce_on_schedule(&mut producer, &plan, p, schedule, &handle, acks);
            if result.is_err() {
                failed.store(true, Ordering::Release);
            }
            // The producer (its connection) must outlive its pending acknowledgements.
            (producer, result)
        }));
    }
    let mut first_error = None;
    let mut producers = Vec::with_capacity(threads.len());
    let producer_results = tokio::task::spawn_blocking(move || threads.into_iter().map(|t| t.join()).collect::<Vec<_>>()).await?;
    for joined in producer_results {
        match joined {
            Ok((producer, result)) => {
                producers.push(producer);
                if let Err(error) = result {
                    first_error.get_or_insert(error);
                }
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("a producer thread panicked"));
            }
        }
    }
    let mut publish_ack = LatencyHistogram::new();
    let mut last_ack_ns = 0;
    for waiter in waiters {
        match waiter.await.context("an acknowledgement waiter panicked")? {
            Ok((histogram, last_ns)) => {
                publish_ack.merge(&histogram);
                last_ack_ns = last_ack_ns.max(last_ns);
            }
            Err(error) => {
                failed.store(true, Ordering::Release);
                first_error.get_or_insert(error);
            }
        }
    }
    drop(producers);
    let consumed = consuming.await.context("the consumers panicked")?;
    if let Some(error) = first_error {
        return Err(error);
    }
    let consumed = consumed?;
    Ok(Measured {
        produce: Duration::from_nanos(last_ack_ns),
        consume: Duration::from_nanos(consumed.last_ns),
        consumed: consumed.count,
        publish_ack: Some(publish_ack),
        end_to_end: Some(consumed.end_to_end),
    })
}

/// Producer `p` on its own thread: publish each batch at its intended time (at once when behind)
/// and pass the acknowledgement to the waiter.
fn produce_on_schedule<Pr: Producer>(
    producer: &mut Pr,
    plan: &Plan,
    p: usize,
    schedule: Schedule,
    handle: &tokio::runtime::Handle,
    acks: mpsc::Sender<(Ack, u64, u64)>,
) -> anyhow::Result<()> {
    for (k, j) in (p as u64..plan.batches()).step_by(plan.producers).enumerate() {
        let first = j * plan.batch as u64;
        let intended = schedule.wait_for(first);
        let values: Vec<Bytes> = (0..plan.batch_len(j) as u64).map(|i| stamped(plan.message_bytes, intended, first + i)).collect();
        let count = values.len() as u64;
        let partition = plan.partition_of(p, k as u64) as u32;
        let ack = handle.block_on(producer.send(partition, values))?;
        if acks.blocking_send((ack, intended, count)).is_err() {
            bail!("the acknowledgement waiter of producer {p} stopped");
        }
    }
    Ok(())
}

/// Await acknowledgements as they complete; record intended time → ack for each message.
async fn collect_acks(
    mut pending: mpsc::Receiver<(Ack, u64, u64)>,
    schedule: Schedule,
    failed: Arc<AtomicBool>,
) -> anyhow::Result<(LatencyHistogram, u64)> {
    let mut histogram = LatencyHistogram::new();
    let mut last_ns = 0;
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            next = pending.recv(), if open => match next {
                Some((ack, intended, count)) => in_flight.push(async move { ack.await.map(|()| (intended, count)) }),
                None => open = false,
            },
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (intended, count) = done.inspect_err(|_| failed.store(true, Ordering::Release)).context("waiting for an acknowledgement")?;
                last_ns = schedule.elapsed_ns();
                histogram.record_ns_n(last_ns.saturating_sub(intended), count);
            }
        }
    }
    Ok((histogram, last_ns))
}

/// How a peer started by `--spawn-peer` was configured.
#[derive(Debug, Clone)]
pub(crate) struct SpawnedConfig {
    pub(crate) durability: PeerDurability,
}

/// A nats-server or redis-server this bench started, stopped (and its data removed) on drop.
struct SpawnedPeer {
    child: KillOnDrop,
    dir: tempfile::TempDir,
    url: String,
    config: SpawnedConfig,
}

impl SpawnedPeer {
    fn start(kind: PeerKind, durability: Durability) -> anyhow::Result<SpawnedPeer> {
        let dir = tempfile::Builder::new().prefix("tributary-bench-peer-").tempdir().context("creating the peer's data directory")?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log")).context("creating the peer's log file")?;
        let (mut command, url, config) = match kind {
            PeerKind::Nats => nats::spawn_command(dir.path(), port, durability)?,
            PeerKind::Redis => redis::spawn_command(dir.path(), port, durability),
            _ => bail!("--spawn-peer starts nats-server or redis-server; RabbitMQ's durability is chosen by its queue type on the running server"),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        let mut spawned = SpawnedPeer { child: KillOnDrop(child), dir, url, config };
        let deadline = Instant::now() + SPAWN_READY_MAX;
        loop {
            if let Some(status) = spawned.child.0.try_wait()? {
                let log = std::fs::read_to_string(spawned.dir.path().join("server.log")).unwrap_or_default();
                bail!("{:?} exited at start ({status}): {}", command.get_program(), log.trim());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(spawned);
            }
            ensure!(Instant::now() < deadline, "{:?} did not accept connections on port {port} within {SPAWN_READY_MAX:?}", command.get_program());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.child.0.kill().ok();
        self.child.0.wait().context("waiting for the spawned peer to exit")?;
        let path: PathBuf = self.dir.path().to_path_buf();
        self.dir.close().with_context(|| format!("removing {}", path.display()))
    }
}

/// A child process killed (and reaped) when dropped, so a failed run leaves no server behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_is_accepted_once() {
        let seen = Seen::new(130);
        let value = stamped(100, 7, 129);
        assert_eq!(seen.mark(&value, 100).unwrap(), 7);
        assert!(seen.mark(&value, 100).unwrap_err().to_string().contains("twice"));
        assert!(seen.mark(&stamped(100, 0, 130), 100).is_err(), "an index past the end was never produced");
        assert!(seen.mark(&stamped(99, 0, 1), 100).is_err(), "a short message is caught");
    }

    #[test]
    fn partitions_receive_every_batch() {
        let mut args = EngineArgs::new(1050);
        args.partitions = 3;
        args.producers = Some(2);
        let plan = Plan::from_args(&args).unwrap();
        let expected = expected_per_partition(&plan);
        assert_eq!(expected.iter().sum::<u64>(), 1050);
        assert!(expected.iter().all(|&n| n > 0), "{expected:?}");
    }

    #[test]
    fn rabbitmq_follows_the_durability_class() {
        assert_eq!(peer_name(PeerKind::Rabbitmq, Durability::Always), "rabbitmq-quorum");
        assert_eq!(peer_name(PeerKind::Rabbitmq, Durability::Never), "rabbitmq-stream");
        assert_eq!(peer_name(PeerKind::RabbitmqStream, Durability::Always), "rabbitmq-stream");
    }
}
