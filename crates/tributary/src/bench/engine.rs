//! `tributary bench engine`: the embedded log (`tributary-log`) measured alone, in process.
//!
//! Two modes:
//! - **Throughput** (no `--rate`): `--producers` threads append batches of `--batch` records as
//!   fast as the log acknowledges them (closed loop; under `always` concurrent appends share
//!   fsyncs by group commit). Then one thread per partition reads everything back from offset 0
//!   and checks every offset and value length. Both passes report msgs/s and MB/s.
//! - **Rate** (`--rate R`, messages per second): open loop. Producer threads issue
//!   `append_pending` at the scheduled times and hand each pending append to the partition's
//!   waiter thread, which calls `wait` and records publish→ack. One consumer thread per
//!   partition tails the log (`wait_for_data` + `read`) and records produce→consume. Both are
//!   measured from each message's *intended* send time, carried in the first 8 bytes of its
//!   value, so a stall is charged to every message it delayed.
//!
//! Each partition is its own [`Log`] in its own subdirectory of the data directory. MB are
//! 10^6 bytes of message value (the batch framing is not counted).
//!
//! Not measured here: the network, HTTP, the engine's topics and consumer groups, a cold page
//! cache (the consume pass reads what was just written), and fsync counts (the log does not
//! expose them).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tributary_core::{Record, limits};
use tributary_log::{Durability, Log, LogConfig, PendingAppend, SEGMENT_BYTES_DEFAULT};

use super::latency::{LatencyHistogram, LatencySummary, Schedule};
use super::{Machine, TargetCheck, Targets};

/// Most producer threads a run may ask for.
pub const PRODUCERS_MAX: usize = 256;
/// Records per append in throughput mode unless `--batch` says otherwise.
pub const BATCH_DEFAULT_THROUGHPUT: usize = 100;
/// Producer threads in throughput mode unless `--producers` says otherwise.
pub const PRODUCERS_DEFAULT_THROUGHPUT: usize = 4;
/// Most records one consumer `read` returns.
const READ_RECORDS_MAX: usize = 10_000;
/// Bytes per consumer `read` in throughput mode unless `--fetch-bytes` says otherwise.
pub const FETCH_BYTES_DEFAULT_THROUGHPUT: usize = 1024 * 1024;
/// Bytes per consumer `read` in rate mode unless `--fetch-bytes` says otherwise. Small because
/// `Log::read` currently copies its whole read chunk (up to the fetch size) once per batch
/// returned, and every returned record keeps its copy alive: with one-record batches a 1 MiB
/// fetch of 10,000 records allocates about 10 GB. A caught-up tailing consumer reads little
/// per call anyway.
pub const FETCH_BYTES_DEFAULT_RATE: usize = 4096;
/// Appends written but not yet handed to a waiter, per partition; a full queue blocks the
/// producer, which then falls behind its schedule and is charged for it.
const IN_FLIGHT_APPENDS_MAX: usize = 65_536;
/// Bytes at the start of each value in rate mode: the intended send time, ns after start, LE.
const STAMP_BYTES: usize = 8;
/// How long a tailing consumer waits for data before checking whether the run failed.
const TAIL_POLL: Duration = Duration::from_millis(100);
/// Delay from planning a rate run to its first intended send, so every thread is up.
const RATE_START_DELAY: Duration = Duration::from_millis(20);

/// Options of `tributary bench engine`.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Bytes of each message value.
    #[arg(long, default_value_t = 100)]
    pub message_bytes: usize,
    /// Records per append [default: 100, or 1 with --rate].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Messages to produce in total.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Durability class: always | never | interval:<ms>.
    #[arg(long, default_value = "always")]
    pub durability: Durability,
    /// Partitions, each its own log in its own subdirectory.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// Producer threads [default: 4, or 1 with --rate]; with more producers than partitions they
    /// share logs (and, under `always`, fsyncs).
    #[arg(long)]
    pub producers: Option<usize>,
    /// Open loop at this many messages per second, measuring latency percentiles.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Data directory (must be empty or absent; kept afterwards) [default: a fresh temporary
    /// directory, removed afterwards].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Segment size in bytes before the log rolls.
    #[arg(long, default_value_t = SEGMENT_BYTES_DEFAULT)]
    pub segment_bytes: u64,
    /// About the most bytes a consumer asks for per `read`, as Kafka's `fetch.max.bytes`
    /// [default: 1 MiB, or 4 KiB with --rate].
    #[arg(long)]
    pub fetch_bytes: Option<usize>,
}

impl EngineArgs {
    /// The defaults of the command line, for tests and callers that build a run in code.
    pub fn new(messages: u64) -> EngineArgs {
        EngineArgs {
            message_bytes: 100,
            batch: None,
            messages,
            durability: Durability::Always,
            partitions: 1,
            producers: None,
            rate: None,
            data: None,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            fetch_bytes: None,
        }
    }
}

/// What one run measured. Serialized as the `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub bench: &'static str,
    /// `throughput` (closed loop) or `rate` (open loop).
    pub mode: &'static str,
    pub durability: String,
    pub message_bytes: usize,
    pub batch: usize,
    pub messages: u64,
    pub partitions: u32,
    pub producers: usize,
    pub segment_bytes: u64,
    pub fetch_bytes: usize,
    /// Seconds from the first append to the last acknowledgement.
    pub produce_seconds: f64,
    pub produce_msgs_per_s: f64,
    pub produce_mb_per_s: f64,
    /// Messages read back (always equal to `messages`, or the run fails).
    pub consumed_messages: u64,
    /// Throughput mode: the read-back pass alone. Rate mode: from start to the last message
    /// consumed while tailing.
    pub consume_seconds: f64,
    pub consume_msgs_per_s: f64,
    pub consume_mb_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Intended send time to `PendingAppend::wait` returning, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_ack_ms: Option<LatencySummary>,
    /// Intended send time to a tailing consumer reading the message, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_to_end_ms: Option<LatencySummary>,
    pub data_dir: PathBuf,
    /// `--peer` runs: which peer ran the workload (`nats`, `redis`, `rabbitmq-quorum`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// `--peer` runs: the server's version as the server reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_version: Option<String>,
    /// `--peer` runs: what the peer really did before acknowledging, in words (`durability`
    /// holds its class: `always` = fsync before ack, `never` = no fsync, `memory` = not written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability_label: Option<String>,
    pub machine: Machine,
    pub target: Targets,
}

/// Run the bench described by `args`.
pub fn run(args: &EngineArgs) -> anyhow::Result<EngineReport> {
    let plan = Plan::from_args(args)?;
    let data = DataDir::prepare(args.data.as_deref())?;
    let machine = Machine::probe(data.path());
    let config = LogConfig { durability: args.durability, segment_bytes_max: args.segment_bytes, ..LogConfig::default() };
    let logs = (0..plan.partitions)
        .map(|p| {
            let dir = data.path().join(format!("partition-{p}"));
            Log::open(&dir, config.clone()).map(|(log, _)| log).with_context(|| format!("opening the log in {}", dir.display()))
        })
        .collect::<anyhow::Result<Vec<Log>>>()?;
    let measured = match plan.rate {
        None => run_throughput(&plan, &logs)?,
        Some(rate) => run_rate(&plan, &logs, rate)?,
    };
    ensure!(
        measured.consumed == plan.messages,
        "consumed {} messages but produced {}: messages were lost or duplicated",
        measured.consumed,
        plan.messages
    );
    for log in &logs {
        log.close().with_context(|| format!("closing {}", log.dir().display()))?;
    }
    drop(logs);
    let per_s = |seconds: f64| if seconds > 0.0 { plan.messages as f64 / seconds } else { 0.0 };
    let mb_per_s = |seconds: f64| per_s(seconds) * plan.message_bytes as f64 / 1e6;
    let mut report = EngineReport {
        bench: "engine",
        mode: if plan.rate.is_some() { "rate" } else { "throughput" },
        durability: args.durability.to_string(),
        message_bytes: plan.message_bytes,
        batch: plan.batch,
        messages: plan.messages,
        partitions: plan.partitions,
        producers: plan.producers,
        segment_bytes: args.segment_bytes,
        fetch_bytes: plan.fetch_bytes,
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
        data_dir: data.path().to_path_buf(),
        peer: None,
        peer_version: None,
        durability_label: None,
        machine,
        target: Targets::new("", Vec::new()),
    };
    report.target = judge(&report, args.durability);
    data.finish()?;
    Ok(report)
}

/// The effective shape of a run, after defaults and limits.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) message_bytes: usize,
    pub(crate) batch: usize,
    pub(crate) messages: u64,
    pub(crate) partitions: u32,
    pub(crate) producers: usize,
    pub(crate) rate: Option<u64>,
    pub(crate) fetch_bytes: usize,
}

impl Plan {
    pub(crate) fn from_args(args: &EngineArgs) -> anyhow::Result<Plan> {
        let rate_mode = args.rate.is_some();
        let batch = args.batch.unwrap_or(if rate_mode { 1 } else { BATCH_DEFAULT_THROUGHPUT });
        let producers = args.producers.unwrap_or(if rate_mode { 1 } else { PRODUCERS_DEFAULT_THROUGHPUT });
        ensure!(args.messages > 0, "--messages must be positive");
        ensure!(
            (1..=limits::MESSAGE_BYTES_MAX).contains(&args.message_bytes),
            "--message-bytes must be 1 to MESSAGE_BYTES_MAX ({}), got {}",
            limits::MESSAGE_BYTES_MAX,
            args.message_bytes
        );
        ensure!(
            (1..=limits::BATCH_RECORDS_MAX).contains(&batch),
            "--batch must be 1 to BATCH_RECORDS_MAX ({}), got {batch}",
            limits::BATCH_RECORDS_MAX
        );
        ensure!(
            batch.saturating_mul(args.message_bytes + 16) <= limits::BATCH_BYTES_MAX,
            "--batch {batch} of {}-byte messages is over BATCH_BYTES_MAX ({} bytes)",
            args.message_bytes,
            limits::BATCH_BYTES_MAX
        );
        ensure!(
            (1..=limits::PARTITIONS_MAX).contains(&args.partitions),
            "--partitions must be 1 to PARTITIONS_MAX ({}), got {}",
            limits::PARTITIONS_MAX,
            args.partitions
        );
        ensure!((1..=PRODUCERS_MAX).contains(&producers), "--producers must be 1 to {PRODUCERS_MAX}, got {producers}");
        let fetch_bytes = args.fetch_bytes.unwrap_or(if rate_mode { FETCH_BYTES_DEFAULT_RATE } else { FETCH_BYTES_DEFAULT_THROUGHPUT });
        ensure!(fetch_bytes > 0, "--fetch-bytes must be positive");
        if let Some(rate) = args.rate {
            ensure!(rate > 0, "--rate must be positive");
            ensure!(
                args.message_bytes >= STAMP_BYTES,
                "--rate needs --message-bytes of at least {STAMP_BYTES}: each value carries its intended send time"
            );
        }
        Ok(Plan { message_bytes: args.message_bytes, batch, messages: args.messages, partitions: args.partitions, producers, rate: args.rate, fetch_bytes })
    }

    pub(crate) fn batches(&self) -> u64 {
        self.messages.div_ceil(self.batch as u64)
    }

    /// Records in batch `j` (the last one may be short).
    pub(crate) fn batch_len(&self, j: u64) -> usize {
        (self.messages - j * self.batch as u64).min(self.batch as u64) as usize
    }

    /// Partition of batch `j` of producer `producer` (its `k`-th batch): producers spread over
    /// partitions round robin, so every partition gets work whichever side is larger.
    pub(crate) fn partition_of(&self, producer: usize, k: u64) -> usize {
        ((producer as u64 + k * self.producers as u64) % u64::from(self.partitions)) as usize
    }
}

struct Measured {
    produce: Duration,
    consume: Duration,
    consumed: u64,
    publish_ack: Option<LatencyHistogram>,
    end_to_end: Option<LatencyHistogram>,
}

/// Closed loop: every producer appends its batches back to back, then the read-back pass.
fn run_throughput(plan: &Plan, logs: &[Log]) -> anyhow::Result<Measured> {
    let payload = Bytes::from(vec![b'x'; plan.message_bytes]);
    let records: Vec<Record> = (0..plan.batch).map(|_| Record::from_value(payload.clone())).collect();
    let batches = plan.batches();
    let start_line = Barrier::new(plan.producers + 1);
    let produce = std::thread::scope(|scope| -> anyhow::Result<Duration> {
        let threads: Vec<_> = (0..plan.producers)
            .map(|p| {
                let (records, start_line) = (&records, &start_line);
                scope.spawn(move || -> anyhow::Result<()> {
                    start_line.wait();
                    // Producer p takes batches p, p + P, p + 2P, …
                    for (k, j) in (p as u64..batches).step_by(plan.producers).enumerate() {
                        let log = &logs[plan.partition_of(p, k as u64)];
                        log.append(&records[..plan.batch_len(j)]).with_context(|| format!("appending to {}", log.dir().display()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        start_line.wait();
        let began = Instant::now();
        for thread in threads {
            thread.join().expect("a producer thread panicked")?;
        }
        Ok(began.elapsed())
    })?;
    let began = Instant::now();
    let consumed = std::thread::scope(|scope| -> anyhow::Result<u64> {
        let threads: Vec<_> = logs.iter().map(|log| scope.spawn(move || read_back(log, plan))).collect();
        threads.into_iter().map(|t| t.join().expect("a consumer thread panicked")).sum()
    })?;
    Ok(Measured { produce, consume: began.elapsed(), consumed, publish_ack: None, end_to_end: None })
}

/// Read `log` from offset 0 to its high-water mark, checking offsets and value sizes.
fn read_back(log: &Log, plan: &Plan) -> anyhow::Result<u64> {
    let message_bytes = plan.message_bytes;
    let end = log.high_watermark();
    let mut next = log.start_offset();
    ensure!(next == 0, "{} does not start at offset 0", log.dir().display());
    while next < end {
        let records = log.read(next, READ_RECORDS_MAX, plan.fetch_bytes).with_context(|| format!("reading {} at {next}", log.dir().display()))?;
        ensure!(!records.is_empty(), "{}: read at {next} returned nothing below the high-water mark {end}", log.dir().display());
        for record in &records {
            ensure!(record.offset == next, "{}: expected offset {next}, read {}", log.dir().display(), record.offset);
            let len = record.value.as_ref().map_or(0, |v| v.len());
            ensure!(len == message_bytes, "{}: offset {next} has a {len}-byte value, expected {message_bytes}", log.dir().display());
            next += 1;
        }
    }
    Ok(end)
}

/// A written batch on its way to a waiter: the append, its intended send time, its size.
type InFlight = (PendingAppend, u64, u64);

/// Open loop at `rate` messages per second with pipelined appends and tailing consumers.
fn run_rate(plan: &Plan, logs: &[Log], rate: u64) -> anyhow::Result<Measured> {
    let schedule = Schedule::new(Instant::now() + RATE_START_DELAY, rate);
    let batches = plan.batches();
    let partitions = plan.partitions as usize;
    let mut expected = vec![0u64; partitions];
    for p in 0..plan.producers {
        for (k, j) in (p as u64..batches).step_by(plan.producers).enumerate() {
            expected[plan.partition_of(p, k as u64)] += plan.batch_len(j) as u64;
        }
    }
    let failed = AtomicBool::new(false);
    let (senders, receivers): (Vec<SyncSender<InFlight>>, Vec<Receiver<InFlight>>) =
        (0..partitions).map(|_| sync_channel(IN_FLIGHT_APPENDS_MAX)).unzip();
    std::thread::scope(|scope| -> anyhow::Result<Measured> {
        let (schedule, failed) = (&schedule, &failed);
        let consumers: Vec<_> =
            logs.iter().zip(&expected).map(|(log, &expected)| scope.spawn(move || tail(log, expected, plan.fetch_bytes, schedule, failed))).collect();
        let waiters: Vec<_> = receivers.into_iter().map(|receiver| scope.spawn(move || acknowledge(receiver, schedule, failed))).collect();
        let producers: Vec<_> = (0..plan.producers)
            .map(|p| {
                let senders = senders.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    let result = produce_on_schedule(plan, logs, &senders, p, schedule);
                    if result.is_err() {
                        failed.store(true, Ordering::Release);
                    }
                    result
                })
            })
            .collect();
        // Waiters stop when the last sender is gone: only the producers hold them now.
        drop(senders);
        let mut first_error = None;
        for thread in producers {
            if let Err(error) = thread.join().expect("a producer thread panicked") {
                first_error.get_or_insert(error);
            }
        }
        let mut publish_ack = LatencyHistogram::new();
        let mut last_ack_ns = 0;
        for thread in waiters {
            match thread.join().expect("a waiter thread panicked") {
                Ok((histogram, last_ns)) => {
                    publish_ack.merge(&histogram);
                    last_ack_ns = last_ack_ns.max(last_ns);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let mut end_to_end = LatencyHistogram::new();
        let mut last_consumed_ns = 0;
        let mut consumed = 0;
        for thread in consumers {
            match thread.join().expect("a consumer thread panicked") {
                Ok((histogram, last_ns)) => {
                    end_to_end.merge(&histogram);
                    last_consumed_ns = last_consumed_ns.max(last_ns);
                    consumed += histogram.count();
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        Ok(Measured {
            produce: Duration::from_nanos(last_ack_ns),
            consume: Duration::from_nanos(last_consumed_ns),
            consumed,
            publish_ack: Some(publish_ack),
            end_to_end: Some(end_to_end),
        })
    })
}

/// Producer `p`: append its batches at their intended times (or at once when behind) and pass
/// each pending append to its partition's waiter.
fn produce_on_schedule(plan: &Plan, logs: &[Log], senders: &[SyncSender<InFlight>], p: usize, schedule: &Schedule) -> anyhow::Result<()> {
    let mut records = Vec::with_capacity(plan.batch);
    for (k, j) in (p as u64..plan.batches()).step_by(plan.producers).enumerate() {
        let intended = schedule.wait_for(j * plan.batch as u64);
        records.clear();
        for _ in 0..plan.batch_len(j) {
            let mut value = BytesMut::zeroed(plan.message_bytes);
            value[..STAMP_BYTES].copy_from_slice(&intended.to_le_bytes());
            records.push(Record::from_value(value.freeze()));
        }
        let partition = plan.partition_of(p, k as u64);
        let log = &logs[partition];
        let pending = log.append_pending(&records, 0, 0).with_context(|| format!("appending to {}", log.dir().display()))?;
        if senders[partition].send((pending, intended, records.len() as u64)).is_err() {
            bail!("the waiter of partition {partition} stopped");
        }
    }
    Ok(())
}

/// Waiter: wait for each append's durability and record intended time → acknowledgement.
/// Returns the histogram and the time of the last acknowledgement (ns after start).
fn acknowledge(receiver: Receiver<InFlight>, schedule: &Schedule, failed: &AtomicBool) -> anyhow::Result<(LatencyHistogram, u64)> {
    let mut histogram = LatencyHistogram::new();
    let mut last_ns = 0;
    for (pending, intended, count) in receiver {
        if let Err(error) = pending.wait() {
            failed.store(true, Ordering::Release);
            return Err(error).context("waiting for an append to become durable");
        }
        last_ns = schedule.elapsed_ns();
        histogram.record_ns_n(last_ns.saturating_sub(intended), count);
    }
    Ok((histogram, last_ns))
}

/// Consumer: tail `log` until `expected` messages are read, recording intended time → read.
fn tail(log: &Log, expected: u64, fetch_bytes: usize, schedule: &Schedule, failed: &AtomicBool) -> anyhow::Result<(LatencyHistogram, u64)> {
    let mut histogram = LatencyHistogram::new();
    let mut next = 0u64;
    let mut last_ns = 0;
    while next < expected {
        if !log.wait_for_data(next, TAIL_POLL) {
            if failed.load(Ordering::Acquire) {
                bail!("stopped tailing {} at offset {next}: the run failed", log.dir().display());
            }
            continue;
        }
        let records = log.read(next, READ_RECORDS_MAX, fetch_bytes).with_context(|| format!("reading {} at {next}", log.dir().display()))?;
        last_ns = schedule.elapsed_ns();
        for record in &records {
            ensure!(record.offset == next, "{}: expected offset {next}, read {}", log.dir().display(), record.offset);
            let value = record.value.as_deref().unwrap_or_default();
            ensure!(value.len() >= STAMP_BYTES, "{}: offset {next} has no send-time stamp", log.dir().display());
            let intended = u64::from_le_bytes(value[..STAMP_BYTES].try_into().expect("8 bytes"));
            histogram.record_ns(last_ns.saturating_sub(intended));
            next += 1;
        }
    }
    Ok((histogram, last_ns))
}

/// The targets (all with 100-byte messages in batches of 100 unless said otherwise).
fn judge(report: &EngineReport, durability: Durability) -> Targets {
    let always = durability == Durability::Always;
    let throughput = report.rate.is_none();
    let reference_shape = report.message_bytes == 100 && report.batch == 100;
    let check = |metric, target, applies_to, applies| TargetCheck { metric, target, applies_to, applies, measured: None, met: None };
    let p99 = |summary: Option<LatencySummary>| summary.map(|s| s.p99);
    let checks = vec![
        check("produce_msgs_per_s", ">= 1,000,000 msgs/s", "throughput, 100-byte messages, batch 100, durability always", throughput && reference_shape && always)
            .judge(Some(report.produce_msgs_per_s), 1_000_000.0, true),
        check("produce_mb_per_s", ">= 150 MB/s", "throughput, 1 KiB messages, durability always", throughput && report.message_bytes == 1024 && always)
            .judge(Some(report.produce_mb_per_s), 150.0, true),
        check("consume_msgs_per_s", ">= 2,000,000 msgs/s", "throughput, 100-byte messages", throughput && report.message_bytes == 100)
            .judge(Some(report.consume_msgs_per_s), 2_000_000.0, true),
        check("publish_ack_ms.p99", "<= 2 ms", "rate 100,000 msgs/s, durability always", report.rate == Some(100_000) && always)
            .judge(p99(report.publish_ack_ms), 2.0, false),
        check("end_to_end_ms.p99", "<= 3 ms", "rate 100,000 msgs/s, durability always", report.rate == Some(100_000) && always)
            .judge(p99(report.end_to_end_ms), 3.0, false),
    ];
    Targets::new("issue: embedded engine targets", checks)
}

/// Where the logs live: a temporary directory removed afterwards, or one the user named.
pub(crate) enum DataDir {
    Temporary(tempfile::TempDir),
    Given(PathBuf),
}

impl DataDir {
    pub(crate) fn prepare(given: Option<&Path>) -> anyhow::Result<DataDir> {
        match given {
            None => Ok(DataDir::Temporary(
                tempfile::Builder::new().prefix("tributary-bench-").tempdir().context("creating a temporary data directory")?,
            )),
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                let mut entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
                ensure!(entries.next().is_none(), "--data {} is not empty: a bench starts from an empty log", dir.display());
                Ok(DataDir::Given(dir.to_path_buf()))
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            DataDir::Temporary(dir) => dir.path(),
            DataDir::Given(dir) => dir,
        }
    }

    pub(crate) fn finish(self) -> anyhow::Result<()> {
        match self {
            DataDir::Temporary(dir) => {
                let path = dir.path().to_path_buf();
                dir.close().with_context(|| format!("removing {}", path.display()))
            }
            DataDir::Given(_) => Ok(()),
        }
    }
}

impl EngineReport {
    /// A few lines for a person at a terminal.
    pub fn human(&self) -> String {
        let subject = match (&self.peer, &self.peer_version) {
            (Some(peer), Some(version)) => format!("peer {peer} ({version})"),
            _ => "engine".to_string(),
        };
        let mut out = format!(
            "{subject} bench ({} mode): durability {}, {} messages of {} bytes, batch {}, {} partition(s), {} producer(s)\n",
            self.mode, self.durability, self.messages, self.message_bytes, self.batch, self.partitions, self.producers
        );
        if let Some(label) = &self.durability_label {
            out += &format!("  durability: {label}\n");
        }
        out += &format!("  produce  {:>12.0} msgs/s  {:>8.1} MB/s  ({:.2} s)\n", self.produce_msgs_per_s, self.produce_mb_per_s, self.produce_seconds);
        out += &format!("  consume  {:>12.0} msgs/s  {:>8.1} MB/s  ({:.2} s)\n", self.consume_msgs_per_s, self.consume_mb_per_s, self.consume_seconds);
        for (name, summary) in [("publish->ack", self.publish_ack_ms), ("end-to-end  ", self.end_to_end_ms)] {
            if let Some(s) = summary {
                out += &format!("  {name} ms  p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n", s.p50, s.p99, s.p999, s.max);
            }
        }
        for check in self.target.checks.iter().filter(|c| c.applies) {
            let verdict = match check.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            out += &format!("  target {} {}: {} (measured {:.3})\n", check.metric, check.target, verdict, check.measured.unwrap_or(f64::NAN));
        }
        out += &format!(
            "  machine: {} cpus, kernel {}, load {:.2}, data on {}\n",
            self.machine.nproc,
            self.machine.kernel,
            self.machine.loadavg_1m.unwrap_or(f64::NAN),
            self.machine.data_fs.as_deref().unwrap_or("?")
        );
        if let Some(sync) = &self.machine.disk_fdatasync_ms {
            out += &format!("  disk: 4 KiB write + fdatasync p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms\n", sync.p50, sync.p99, sync.max);
        }
        out
    }
}
