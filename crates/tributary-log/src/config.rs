//! How a log behaves: durability class, segment roll, retention, compaction.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How often a [`Durability::Never`] log syncs in the background (acknowledgements never wait
/// for it).
pub const NEVER_BACKGROUND_SYNC: Duration = Duration::from_millis(100);

/// When an append is acknowledged relative to fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after `fdatasync`; concurrent appends share one sync (group commit).
    /// Readers see a record only once it is durable.
    #[default]
    Always,
    /// Acknowledge after the write; a background flusher syncs every interval. A crash loses at
    /// most the last interval.
    Interval(Duration),
    /// Acknowledge after the write, never waiting for a sync. A crash of the process loses
    /// nothing (the page cache survives), a crash of the machine may lose what was not synced.
    /// The log still syncs in the background every [`NEVER_BACKGROUND_SYNC`], when a segment is
    /// sealed and on close: without the background syncs, sealing a segment flushes all of it
    /// (128 MiB by default) under the writer, stalling every append behind it (measured: p99
    /// 412 ms at 185,000 msgs/s, against 0.9 ms with them).
    Never,
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Always => f.write_str("always"),
            Durability::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            Durability::Never => f.write_str("never"),
        }
    }
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "always" => Ok(Durability::Always),
            "never" => Ok(Durability::Never),
            other => match other.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Durability::Interval(Duration::from_millis(ms))),
                _ => Err(format!("durability must be always, never or interval:<ms> with ms > 0, got {other:?}")),
            },
        }
    }
}

/// Configuration of one log (one topic partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub durability: Durability,
    /// Roll to a new segment past this many bytes.
    pub segment_bytes_max: u64,
    /// Roll to a new segment when the active one is older than this (ms), if set.
    pub segment_ms_max: Option<u64>,
    /// Bytes between two entries of the sparse offset and time indexes.
    pub index_interval_bytes: u64,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this (ms).
    pub retention_ms: Option<u64>,
    /// Keep only the newest record per key in sealed segments.
    pub compact: bool,
    /// How long a tombstone survives compaction (ms), so that readers see the delete.
    pub tombstone_retention_ms: u64,
}

/// Smallest segment size accepted, so a roll per batch cannot be configured by mistake.
pub const SEGMENT_BYTES_MIN: u64 = 4096;
/// Default segment size: 128 MiB.
pub const SEGMENT_BYTES_DEFAULT: u64 = 128 * 1024 * 1024;
/// Largest segment size: positions in the index are 32-bit.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            durability: Durability::Always,
            segment_bytes_max: SEGMENT_BYTES_DEFAULT,
            segment_ms_max: None,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: None,
            compact: false,
            tombstone_retention_ms: 24 * 60 * 60 * 1000,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes_max) {
            return Err(format!(
                "segment_bytes_max must be between SEGMENT_BYTES_MIN ({SEGMENT_BYTES_MIN}) and SEGMENT_BYTES_MAX ({SEGMENT_BYTES_MAX}), got {}",
                self.segment_bytes_max
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err("index_interval_bytes must be positive".into());
        }
        Ok(())
    }
}
