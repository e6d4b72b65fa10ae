//! `tributary bench`: benchmarks as commands, not timed tests (DESIGN.md §6).
//!
//! Every bench prints one JSON object (`--json`) or a short summary, labels its figures with the
//! durability class, says on which machine it ran, and quotes the targets it is judged against
//! with a `met` verdict for each one that applies to the run.
//!
//! - [`engine`]: the embedded log alone (`tributary-log`), no network: closed-loop throughput
//!   and open-loop publish/ack and end-to-end latency.
//! - [`peers`]: the engine bench's workload against NATS JetStream, Redis Streams and RabbitMQ
//!   on the same machine (`tributary bench engine --peer ...`), labelled with each peer's real
//!   durability.
//! - [`backends`]: one stream, queue and cache workload through the engine's interfaces, on the
//!   embedded engine and on NATS JetStream and Redis (`tributary bench backends --nats URL
//!   --redis URL`).
//! - [`components`]: the engine's other parts one at a time: the work queue, the subscription
//!   trie, the cache, and reopening a large log.
//! - [`system`]: a system over its HTTP API against its seed targets (`tributary bench SYSTEM`),
//!   each system's load a small file in [`scenarios`], in phases (normal, peak, failure);
//!   [`report`] prints the table and writes JSON, Markdown and SVG latency plots.
//! - [`plan`]: `tributary plan SYSTEM`, from a bench report to nodes, partitions and cost.
//! - [`connections`]: WebSocket connections one node holds, their memory each, and a
//!   notification to all of them (`tributary bench connections`).
//! - [`latency`]: the open-loop schedule and HdrHistogram summaries every bench shares.

pub mod backends;
pub mod components;
pub mod connections;
pub mod engine;
pub mod latency;
pub mod peers;
pub mod plan;
pub mod report;
pub mod scenarios;
pub mod system;

use std::path::Path;

use serde::Serialize;

/// One target from an issue or the seed, and whether this run meets it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// The figure judged, as named in the report (`produce_msgs_per_s`, `publish_ack_ms.p99`).
    pub metric: &'static str,
    /// The target as the issue states it.
    pub target: &'static str,
    /// The runs the target is about.
    pub applies_to: &'static str,
    /// Whether this run is one of them.
    pub applies: bool,
    pub measured: Option<f64>,
    /// `None` when the target does not apply to this run.
    pub met: Option<bool>,
}

impl TargetCheck {
    /// A check against an upper bound (`measured ≤ bound`) or a lower bound (`measured ≥ bound`).
    pub fn judge(mut self, measured: Option<f64>, bound: f64, at_least: bool) -> TargetCheck {
        self.measured = measured;
        self.met = match (self.applies, measured) {
            (true, Some(value)) => Some(if at_least { value >= bound } else { value <= bound }),
            _ => None,
        };
        self
    }
}

/// The targets a bench is judged against, each with its verdict for this run.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    pub source: &'static str,
    pub checks: Vec<TargetCheck>,
    /// True when every applicable target is met; `None` when none applies.
    pub all_met: Option<bool>,
}

impl Targets {
    pub fn new(source: &'static str, checks: Vec<TargetCheck>) -> Targets {
        let verdicts: Vec<bool> = checks.iter().filter_map(|c| c.met).collect();
        let all_met = (!verdicts.is_empty()).then(|| verdicts.iter().all(|m| *m));
        Targets { source, checks, all_met }
    }
}

/// The machine a bench ran on: figures from a loaded 2-core VM and from a quiet server differ.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: Option<String>,
    /// 1-minute load average when the bench started (other work on the machine skews results).
    pub loadavg_1m: Option<f64>,
    /// File system type under the data directory (tmpfs makes fsync free).
    pub data_fs: Option<String>,
    /// What one 4 KiB write plus `fdatasync` costs in the data directory, measured before the
    /// run: no acknowledgement under `always` can be faster than this.
    pub disk_fdatasync_ms: Option<latency::LatencySummary>,
}

impl Machine {
    pub fn probe(data_dir: &Path) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").map_or_else(|| std::env::consts::OS.to_string(), |k| k.trim().to_string()),
            cpu_model: read("/proc/cpuinfo").and_then(|text| {
                text.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, m)| m.trim().to_string())
            }),
            loadavg_1m: read("/proc/loadavg").and_then(|l| l.split_whitespace().next()?.parse().ok()),
            data_fs: read("/proc/mounts").and_then(|mounts| file_system_of(&mounts, data_dir)),
            disk_fdatasync_ms: probe_fdatasync(data_dir, FSYNC_PROBES).ok(),
        }
    }
}

/// Writes and syncs timed by [`probe_fdatasync`].
const FSYNC_PROBES: u64 = 300;

/// Time `count` appends of 4 KiB each followed by `fdatasync`, in a scratch file in `dir`.
fn probe_fdatasync(dir: &Path, count: u64) -> std::io::Result<latency::LatencySummary> {
    use std::io::Write;
    let path = dir.join(".fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut histogram = latency::LatencyHistogram::new();
    for _ in 0..count {
        let started = std::time::Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        histogram.record_ns(started.elapsed().as_nanos() as u64);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(histogram.summary())
}

/// The type of the mount holding `path`: the longest mount point that is a prefix of it.
fn file_system_of(mounts: &str, path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_device, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount_point).then(|| (mount_point.len(), fs_type.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs_type)| fs_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mount_point_names_the_file_system() {
        let mounts = "/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(file_system_of(mounts, Path::new("/tmp")).as_deref(), Some("tmpfs"));
        assert_eq!(file_system_of(mounts, Path::new("/")).as_deref(), Some("ext4"));
    }
}
