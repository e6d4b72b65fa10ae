//! Benches of the engine's parts one at a time, each judged against the target:
//!
//! - `queue`: per-message acks with several consumers (`tributary_engine::queue::bench_queue`);
//! - `subscriptions`: the subject trie with many wildcard subscriptions, its memory and
//!   match latency (`tributary_engine::pubsub::bench_subscriptions`);
//! - `cache`: single-thread operations per second (no target in the issue: a baseline);
//! - `reopen`: how long a log of a given size takes to open and accept a write.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tributary_core::Record;
use tributary_engine::cache::{CacheBench, bench_cache};
use tributary_engine::pubsub::{SubscriptionBenchReport, bench_subscriptions};
use tributary_engine::queue::{QueueBenchReport, bench_queue};
use tributary_log::{Durability, Log, LogConfig};

use super::engine::DataDir;
use super::{Machine, TargetCheck, Targets};

fn check(metric: &'static str, target: &'static str, applies_to: &'static str, applies: bool) -> TargetCheck {
    TargetCheck { metric, target, applies_to, applies, measured: None, met: None }
}

#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    #[arg(long, default_value_t = 1024)]
    pub message_bytes: usize,
    #[arg(long, default_value_t = 500_000)]
    pub messages: u64,
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    #[arg(long, default_value = "always")]
    pub durability: Durability,
    /// An empty folder to keep the data in (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct QueueReport {
    pub bench: &'static str,
    #[serde(flatten)]
    pub measured: QueueBenchReport,
    pub machine: Machine,
    pub target: Targets,
}

pub fn run_queue(args: &QueueArgs) -> anyhow::Result<QueueReport> {
    let data = DataDir::prepare(args.data.as_deref())?;
    let machine = Machine::probe(data.path());
    let measured = bench_queue(data.path(), args.message_bytes, args.messages, args.consumers, args.durability).context("running the queue bench")?;
    data.finish()?;
    let applies = args.message_bytes == 1024 && args.consumers == 4 && args.durability == Durability::Always;
    let checks = vec![
        check("acked_msgs_per_s", ">= 100,000 acked msgs/s", "1 KiB messages, 4 consumers, per-message acks, durability always", applies)
            .judge(Some(measured.acked_msgs_per_s), 100_000.0, true),
    ];
    Ok(QueueReport { bench: "queue", measured, machine, target: Targets::new("issue: embedded engine targets", checks) })
}

#[derive(Debug, Clone, Args)]
pub struct SubscriptionsArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub subscriptions: usize,
    #[arg(long, default_value_t = 100_000)]
    pub publishes: usize,
}

#[derive(Debug, Serialize)]
pub struct SubscriptionsReport {
    pub bench: &'static str,
    #[serde(flatten)]
    pub measured: SubscriptionBenchReport,
    pub target: Targets,
}

pub fn run_subscriptions(args: &SubscriptionsArgs) -> SubscriptionsReport {
    let measured = bench_subscriptions(args.subscriptions, args.publishes);
    let applies = args.subscriptions >= 1_000_000;
    let memory = measured.resident_bytes_delta.unwrap_or(measured.heap_bytes_estimate as u64) as f64 / 1e6;
    let checks = vec![
        check("resident_mb", "<= 300 MB", "1,000,000 wildcard subscriptions", applies).judge(Some(memory), 300.0, false),
        check("match_p99_us", "<= 1,000 us", "1,000,000 wildcard subscriptions, matching one published subject", applies)
            .judge(Some(measured.match_p99_us), 1000.0, false),
    ];
    SubscriptionsReport { bench: "subscriptions", measured, target: Targets::new("issue: embedded engine targets", checks) }
}

#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub ops: usize,
}

#[derive(Debug, Serialize)]
pub struct CacheReport {
    pub bench: &'static str,
    #[serde(flatten)]
    pub measured: CacheBench,
}

pub fn run_cache(args: &CacheArgs) -> CacheReport {
    CacheReport { bench: "cache", measured: bench_cache(args.ops) }
}

#[derive(Debug, Clone, Args)]
pub struct ReopenArgs {
    /// Bytes of log to write before reopening (GiB).
    #[arg(long, default_value_t = 10.0)]
    pub gib: f64,
    /// An empty folder to keep the data in (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Drop the page cache before reopening (needs root: writes /proc/sys/vm/drop_caches), so
    /// the tail scan reads from the disk as after a machine restart.
    #[arg(long)]
    pub cold: bool,
}

#[derive(Debug, Serialize)]
pub struct ReopenReport {
    pub bench: &'static str,
    pub log_bytes: u64,
    pub segments: usize,
    pub records: u64,
    pub fill_seconds: f64,
    /// `Log::open` on the closed log: sealed segments trusted by their index, the tail scanned.
    pub open_ms: f64,
    /// The first `always` append after opening, fsync included.
    pub first_append_ms: f64,
    pub open_and_append_ms: f64,
    /// True when the page cache was dropped before reopening.
    pub cold: bool,
    pub machine: Machine,
    pub target: Targets,
}

/// Records per batch and bytes per record while filling.
const FILL_BATCH: usize = 1000;
const FILL_RECORD_BYTES: usize = 1024;

pub fn run_reopen(args: &ReopenArgs) -> anyhow::Result<ReopenReport> {
    let data = DataDir::prepare(args.data.as_deref())?;
    let machine = Machine::probe(data.path());
    let dir = data.path().join("log");
    let target_bytes = (args.gib * (1u64 << 30) as f64) as u64;
    let fill = Instant::now();
    let (log, _) = Log::open(&dir, LogConfig { durability: Durability::Never, ..LogConfig::default() })?;
    let batch: Vec<Record> = (0..FILL_BATCH).map(|i| Record::keyed(format!("key-{i}"), vec![0x42u8; FILL_RECORD_BYTES])).collect();
    let mut records = 0u64;
    while log.size_bytes() < target_bytes {
        log.append(&batch)?;
        records += FILL_BATCH as u64;
    }
    log.close()?;
    let log_bytes = log.size_bytes();
    drop(log);
    let fill_seconds = fill.elapsed().as_secs_f64();
    if args.cold {
        std::process::Command::new("sync").status().context("running sync")?;
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache (--cold needs root)")?;
    }

    let started = Instant::now();
    let (log, report) = Log::open(&dir, LogConfig::default()).context("reopening the log")?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let append_started = Instant::now();
    log.append(&[Record::from_value("after reopen")])?;
    let first_append_ms = append_started.elapsed().as_secs_f64() * 1e3;
    let open_and_append_ms = started.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(report.next_offset == records, "reopened at offset {} but {} records were written", report.next_offset, records);
    drop(log);
    data.finish()?;
    let applies = log_bytes >= 10 * (1u64 << 30);
    let checks = vec![check("open_and_append_ms", "<= 1,000 ms", "a 10 GiB log", applies).judge(Some(open_and_append_ms), 1000.0, false)];
    Ok(ReopenReport {
        bench: "reopen",
        log_bytes,
        segments: report.segments,
        records,
        fill_seconds,
        open_ms,
        first_append_ms,
        open_and_append_ms,
        cold: args.cold,
        machine,
        target: Targets::new("issue: embedded engine targets", checks),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_reopen_bench_counts_every_record_it_wrote() {
        let report = run_reopen(&ReopenArgs { gib: 0.005, data: None, cold: false }).unwrap();
        assert!(report.log_bytes >= (0.005 * (1u64 << 30) as f64) as u64);
        assert!(report.records > 0);
        assert_eq!(report.target.all_met, None, "a small log is not the 10 GiB target");
    }

    #[test]
    fn a_small_queue_bench_acks_every_message() {
        let report = run_queue(&QueueArgs { message_bytes: 100, messages: 2000, consumers: 2, durability: Durability::Never, data: None }).unwrap();
        assert_eq!(report.measured.messages, 2000);
        assert!(report.measured.acked_msgs_per_s > 0.0);
    }
}
