//! How a queue behaves, and how that choice is kept on disk (`<queue>/queue.config`, postcard,
//! written atomically: temp file, fsync, rename, fsync of the directory).

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tributary_core::limits::{QUEUE_DELIVERIES_MAX_DEFAULT, QUEUE_IN_FLIGHT_PER_CONSUMER_MAX, QUEUE_LEASE_MS_DEFAULT, QUEUE_LEASE_MS_MAX};
use tributary_log::{Durability, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};

use super::clock::{Clock, SystemClock};
use super::error::{QueueError, Result, io};

/// Most deliveries a queue may allow before dead-lettering.
pub const QUEUE_DELIVERIES_MAX_MAX: u32 = 1000;
/// Longest deduplication window, in milliseconds (1 day).
pub const QUEUE_DEDUP_WINDOW_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// Default deduplication window, in milliseconds (5 minutes, as SQS FIFO queues).
pub const QUEUE_DEDUP_WINDOW_MS_DEFAULT: u64 = 5 * 60 * 1000;
/// Default segment size of a queue's priority logs: 64 MiB.
pub const QUEUE_SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Exponential backoff for a nack without an explicit delay: `base_ms * 2^(delivery_count - 1)`,
/// capped at `max_ms`, with equal jitter (a delay `d` becomes `d/2 + random(0..=d/2)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base_ms: 1_000, max_ms: 5 * 60 * 1000 }
    }
}

impl Backoff {
    /// The delay before delivery `delivery_count + 1`; `seed` picks the jitter deterministically.
    pub fn delay_ms(&self, delivery_count: u32, seed: u64) -> u64 {
        let exponent = delivery_count.saturating_sub(1).min(40);
        let full = self.base_ms.saturating_mul(1u64 << exponent).min(self.max_ms);
        let half = full / 2;
        // splitmix64: cheap, and the same message gets the same jitter on replay.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        half + z % (full - half + 1)
    }
}

/// Configuration of one queue, fixed at creation and persisted in its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Durability of the priority logs, the dead-letter log and every group journal.
    pub durability: Durability,
    /// A message is dead-lettered instead of being delivered more than this many times.
    pub deliveries_max: u32,
    /// Lease of a receive that names none.
    pub lease_ms_default: u64,
    /// Delay of a nack that names none.
    pub backoff: Backoff,
    /// A `dedup_id` published again within this window returns the first message's id.
    pub dedup_window_ms: u64,
    /// Segment size of the priority logs and the dead-letter log.
    pub segment_bytes: u64,
    /// Messages one consumer may hold leased at once (at most `QUEUE_IN_FLIGHT_PER_CONSUMER_MAX`).
    pub in_flight_per_consumer_max: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            durability: Durability::Always,
            deliveries_max: QUEUE_DELIVERIES_MAX_DEFAULT,
            lease_ms_default: QUEUE_LEASE_MS_DEFAULT,
            backoff: Backoff::default(),
            dedup_window_ms: QUEUE_DEDUP_WINDOW_MS_DEFAULT,
            segment_bytes: QUEUE_SEGMENT_BYTES_DEFAULT,
            in_flight_per_consumer_max: QUEUE_IN_FLIGHT_PER_CONSUMER_MAX,
        }
    }
}

impl QueueConfig {
    pub fn validate(&self) -> Result<()> {
        let fail = |message: String| Err(QueueError::InvalidConfig(message));
        if !(1..=QUEUE_DELIVERIES_MAX_MAX).contains(&self.deliveries_max) {
            return fail(format!("deliveries_max must be 1 to QUEUE_DELIVERIES_MAX_MAX ({QUEUE_DELIVERIES_MAX_MAX}), got {}", self.deliveries_max));
        }
        if !(1..=QUEUE_LEASE_MS_MAX).contains(&self.lease_ms_default) {
            return fail(format!("lease_ms_default must be 1 to QUEUE_LEASE_MS_MAX ({QUEUE_LEASE_MS_MAX}), got {}", self.lease_ms_default));
        }
        if self.backoff.base_ms > self.backoff.max_ms {
            return fail(format!("backoff.base_ms ({}) must not exceed backoff.max_ms ({})", self.backoff.base_ms, self.backoff.max_ms));
        }
        if self.backoff.max_ms > tributary_core::limits::QUEUE_DELAY_MS_MAX {
            return fail(format!("backoff.max_ms must be at most QUEUE_DELAY_MS_MAX, got {}", self.backoff.max_ms));
        }
        if self.dedup_window_ms > QUEUE_DEDUP_WINDOW_MS_MAX {
            return fail(format!("dedup_window_ms must be at most QUEUE_DEDUP_WINDOW_MS_MAX ({QUEUE_DEDUP_WINDOW_MS_MAX}), got {}", self.dedup_window_ms));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return fail(format!("segment_bytes must be {SEGMENT_BYTES_MIN} to {SEGMENT_BYTES_MAX}, got {}", self.segment_bytes));
        }
        if !(1..=QUEUE_IN_FLIGHT_PER_CONSUMER_MAX).contains(&self.in_flight_per_consumer_max) {
            return fail(format!(
                "in_flight_per_consumer_max must be 1 to QUEUE_IN_FLIGHT_PER_CONSUMER_MAX ({QUEUE_IN_FLIGHT_PER_CONSUMER_MAX}), got {}",
                self.in_flight_per_consumer_max
            ));
        }
        Ok(())
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let bytes = postcard::to_stdvec(&StoredQueueConfig::from(self)).expect("a config always encodes");
        let path = dir.join(CONFIG_FILE);
        tributary_log::write_atomically(dir, &path, &bytes).map_err(io(|| format!("writing {}", path.display())))
    }

    pub(crate) fn load(dir: &Path) -> Result<QueueConfig> {
        let path = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&path).map_err(io(|| format!("reading {}", path.display())))?;
        let corrupt = |reason: String| QueueError::Corrupt { path: path.display().to_string(), reason };
        let stored: StoredQueueConfig = postcard::from_bytes(&bytes).map_err(|e| corrupt(e.to_string()))?;
        QueueConfig::try_from(stored).map_err(corrupt)
    }
}

pub(crate) const CONFIG_FILE: &str = "queue.config";

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    tributary_log::sync_dir(dir).map_err(io(|| format!("syncing {}", dir.display())))
}

/// A queue configuration as it is kept: in the queue's config file (postcard) and in a
/// distributed backend's metadata (JSON). Plain fields, the durability as text, a format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredQueueConfig {
    version: u32,
    durability: String,
    deliveries_max: u32,
    lease_ms_default: u64,
    backoff: Backoff,
    dedup_window_ms: u64,
    segment_bytes: u64,
    in_flight_per_consumer_max: u64,
}

impl From<&QueueConfig> for StoredQueueConfig {
    fn from(config: &QueueConfig) -> Self {
        StoredQueueConfig {
            version: 1,
            durability: config.durability.to_string(),
            deliveries_max: config.deliveries_max,
            lease_ms_default: config.lease_ms_default,
            backoff: config.backoff,
            dedup_window_ms: config.dedup_window_ms,
            segment_bytes: config.segment_bytes,
            in_flight_per_consumer_max: config.in_flight_per_consumer_max as u64,
        }
    }
}

/// The configuration, or why the stored form is not a valid one.
impl TryFrom<StoredQueueConfig> for QueueConfig {
    type Error = String;
    fn try_from(stored: StoredQueueConfig) -> Result<QueueConfig, String> {
        if stored.version != 1 {
            return Err(format!("unknown config version {}", stored.version));
        }
        let config = QueueConfig {
            durability: stored.durability.parse()?,
            deliveries_max: stored.deliveries_max,
            lease_ms_default: stored.lease_ms_default,
            backoff: stored.backoff,
            dedup_window_ms: stored.dedup_window_ms,
            segment_bytes: stored.segment_bytes,
            in_flight_per_consumer_max: stored.in_flight_per_consumer_max as usize,
        };
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// What a [`super::Queues`] registry hands every queue: the config of `create_default`, and the
/// clock (inject a [`super::ManualClock`] in tests).
#[derive(Clone, Debug)]
pub struct QueueDefaults {
    pub config: QueueConfig,
    pub clock: Arc<dyn Clock>,
}

impl Default for QueueDefaults {
    fn default() -> Self {
        QueueDefaults { config: QueueConfig::default(), clock: Arc::new(SystemClock) }
    }
}
