//! Durable work queues with share-group semantics (Kafka KIP-932 in spirit; the features of SQS
//! and RabbitMQ work queues): lease, ack, nack with backoff, dead letters, delay, priority.
//!
//! # What is here
//!
//! - [`Queues`]: the registry of the queues under one directory (`create`, `get`, `list`,
//!   `delete`); opening it reopens every queue found there.
//! - [`Queue`]: `publish` messages; `receive` them in a named *group* (created on first use),
//!   with a lease; then `ack`, `nack` (with a delay or exponential backoff) or `extend` them by
//!   [`Receipt`]; read and `redrive` [`DeadLetter`]s; `stats`; `tick` to expire leases.
//! - [`Clock`]: leases, delays and dedup windows read the time from an injectable clock
//!   ([`SystemClock`], or [`ManualClock`] in tests and simulations).
//! - [`bench_queue`]: the throughput measurement.
//! - [`QueueStore`]: the queue interface distributed backends also give (NATS JetStream in
//!   `tributary-nats`), with the `check_*` functions that define bad input for all of them.
//!
//! # When to use what
//!
//! - A **queue** when each message is *work* to be done once per group: consumers of a group
//!   compete, each message goes to one of them at a time, and failed work comes back (nack,
//!   lease expiry) until it succeeds or is dead-lettered. Groups are independent: each sees
//!   every message (a "fan-out to N worker pools").
//! - A **stream** (topic with consumer groups) when consumers need order and replay: a stream
//!   group commits one offset per partition; a queue group tracks each message on its own.
//! - **Pub/sub** when nobody needs the message once the subscriber is gone.
//!
//! # Guarantees
//!
//! - **At-least-once.** A message is delivered until a receipt of its current delivery acks it
//!   or it is dead-lettered. A consumer that crashes holding leases loses them at the deadline.
//! - **Nothing acknowledged on publish is lost**: `publish` returns once the messages are durable
//!   per the queue's [`Durability`](tributary_log::Durability) (`Always`: after fsync, with group
//!   commit). A publish that fails may have written part of the batch: retry with `dedup_id`s.
//! - **An acked message is never redelivered to its group**, also across restarts: the ack is
//!   journaled durably before `ack` returns. A receipt names its delivery attempt; the receipt of
//!   an earlier attempt is refused ([`ReceiptOutcome::Stale`]) and never acks a redelivery.
//! - **Leases survive a restart**: a message leased at a crash stays leased, to the same consumer
//!   and receipt, until its original deadline; then it is redelivered with its count kept. A
//!   lease whose deadline passed before the restart is released when the queue opens (lease
//!   expiry itself is not journaled; it follows from the journaled deadline).
//! - **Dead letters**: a message released (nack or lease expiry) after its `deliveries_max`-th
//!   delivery is appended to the queue's dead-letter log (`<queue>/dlq`, one per queue, each
//!   letter naming its group) durably before the group forgets it. A crash between the two may
//!   dead-letter it twice. `redrive` republishes letters as new messages for that group only and
//!   marks them, persistently, so a second redrive does not duplicate them.
//! - **Dedup**: a `dedup_id` published again within `dedup_window_ms` returns the first id and
//!   writes nothing; the map is rebuilt on open from the logs' tails within the window. It holds
//!   at most [`QUEUE_DEDUP_IDS_MAX`] ids (the oldest are forgotten first).
//! - **Priority without starvation**: levels 0 (highest) to 3 are served by smooth weighted
//!   round-robin with weights [`QUEUE_PRIORITY_WEIGHTS`] (8/4/2/1): when all levels have work,
//!   of every 15 deliveries 8, 4, 2 and 1 come from levels 0..3.
//! - **Bounded memory**: per group and level only a window of at most
//!   [`QUEUE_WINDOW_RECORDS_MAX`] records / [`QUEUE_WINDOW_BYTES_MAX`] bytes above the group's
//!   start offset is held; the rest of the backlog stays in the log and is read as the window
//!   advances. Stats cost O(window).
//! - **In-flight bound**: a consumer holding `in_flight_per_consumer_max` leases gets
//!   [`QueueError::LimitExceeded`] from `receive` (not an empty answer): it must ack first.
//!
//! # What is not here
//!
//! - **No order per key.** Ordering is best-effort per priority level: messages are offered in
//!   offset order, but redeliveries, competing consumers and priority interleave them. There is
//!   no key locking (a FIFO message group); use a stream partition for strict order per key.
//! - **Head-of-line limit of the window**: messages not yet due (long delays, long nack backoff)
//!   and long leases occupy window slots; a window full of them delays later messages of that
//!   level until they are due or acked.
//! - No retention of the priority logs (they grow until deleted), no exactly-once, no
//!   cross-queue transactions, no async API: everything is synchronous and thread-safe.
//!
//! # On disk
//!
//! ```text
//! <dir>/<queue>/queue.config          QueueConfig (postcard, written atomically)
//! <dir>/<queue>/p0 .. p3              one log per priority level; MessageId = (level, offset)
//! <dir>/<queue>/dlq                   dead letters of every group
//! <dir>/<queue>/dlq-redriven          dead-letter offsets already redriven
//! <dir>/<queue>/groups/<group>/state  the group's journal: changes + periodic snapshots
//! ```

mod bench;
mod clock;
mod config;
mod error;
mod group;
mod journal;
mod message;
#[allow(clippy::module_inception)]
mod queue;
mod store;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use tributary_core::limits::{QUEUE_PRIORITY_LEVELS, check_name};

pub use bench::{QueueBenchReport, bench_queue};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Backoff, QUEUE_DEDUP_WINDOW_MS_DEFAULT, QUEUE_DEDUP_WINDOW_MS_MAX, QUEUE_DELIVERIES_MAX_MAX, QUEUE_SEGMENT_BYTES_DEFAULT, QueueConfig, QueueDefaults, StoredQueueConfig};
pub use error::{QueueError, Result};
pub use message::{DeadLetter, Delivery, MessageId, NewMessage, RESERVED_HEADER_PREFIX, Receipt, ReceiptOutcome, Redrive};
pub use queue::{GroupStats, Queue, QueueStats, check_lease, check_publish, check_receipts, check_receive};
pub use store::{QueueFuture, QueueStore};

/// Records of one priority level a group holds in memory above its start offset.
pub const QUEUE_WINDOW_RECORDS_MAX: usize = 10_000;
/// Bytes of message data a group holds in memory per priority level.
pub const QUEUE_WINDOW_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Most messages one receive may return.
pub const QUEUE_RECEIVE_MESSAGES_MAX: usize = 1_000;
/// Longest long-poll wait of one receive, in milliseconds (20 s, as SQS).
pub const QUEUE_RECEIVE_WAIT_MS_MAX: u64 = 20_000;
/// Longest dedup id, in bytes (as SQS).
pub const QUEUE_DEDUP_ID_BYTES_MAX: usize = 128;
/// Most dedup ids a queue remembers at once.
pub const QUEUE_DEDUP_IDS_MAX: usize = 1_000_000;
/// A group journal writes a snapshot after this many records.
pub const QUEUE_SNAPSHOT_EVERY_RECORDS: u64 = 1_000;
/// Segment size of group journals and the redrive log: small, so truncation frees space soon.
pub const QUEUE_JOURNAL_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Weighted round-robin weights of the priority levels, level 0 first.
pub const QUEUE_PRIORITY_WEIGHTS: [u32; QUEUE_PRIORITY_LEVELS as usize] = [8, 4, 2, 1];

const _: () = assert!(QUEUE_WINDOW_RECORDS_MAX >= QUEUE_RECEIVE_MESSAGES_MAX);

/// The queues under one directory.
pub struct Queues {
    dir: PathBuf,
    defaults: QueueDefaults,
    queues: RwLock<BTreeMap<String, Arc<Queue>>>,
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues").field("dir", &self.dir).finish()
    }
}

impl Queues {
    /// Open the registry in `dir` (created if missing), reopening every queue found there.
    pub fn open(dir: impl AsRef<Path>, defaults: QueueDefaults) -> Result<Queues> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(error::io(|| format!("creating {}", dir.display())))?;
        let mut queues = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(error::io(|| format!("listing {}", dir.display())))? {
            let entry = entry.map_err(error::io(|| format!("listing {}", dir.display())))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            // A directory without a config is a create that crashed half-way: not a queue.
            if check_name("queue", &name).is_err() || !entry.path().join(config::CONFIG_FILE).exists() {
                continue;
            }
            let queue = Queue::open(&entry.path(), &name, defaults.clock.clone())?;
            queues.insert(name, Arc::new(queue));
        }
        Ok(Queues { dir, defaults, queues: RwLock::new(queues) })
    }

    /// Create a queue; `AlreadyExists` if there is one by that name.
    pub fn create(&self, name: &str, config: QueueConfig) -> Result<Arc<Queue>> {
        check_name("queue", name).map_err(QueueError::InvalidName)?;
        let mut queues = self.queues.write();
        if queues.contains_key(name) {
            return Err(QueueError::AlreadyExists { kind: "queue", name: name.to_string() });
        }
        let queue = Arc::new(Queue::create(&self.dir.join(name), name, config, self.defaults.clock.clone())?);
        queues.insert(name.to_string(), queue.clone());
        Ok(queue)
    }

    /// Create a queue with the registry's default config.
    pub fn create_default(&self, name: &str) -> Result<Arc<Queue>> {
        self.create(name, self.defaults.config.clone())
    }

    pub fn get(&self, name: &str) -> Result<Arc<Queue>> {
        self.queues.read().get(name).cloned().ok_or_else(|| QueueError::NotFound { kind: "queue", name: name.to_string() })
    }

    pub fn list(&self) -> Vec<String> {
        self.queues.read().keys().cloned().collect()
    }

    /// Delete a queue and everything in it. Handles still held fail with `Deleted`.
    pub fn delete(&self, name: &str) -> Result<()> {
        let queue = self.queues.write().remove(name).ok_or_else(|| QueueError::NotFound { kind: "queue", name: name.to_string() })?;
        queue.mark_deleted();
        queue.close()?;
        let dir = self.dir.join(name);
        std::fs::remove_dir_all(&dir).map_err(error::io(|| format!("removing {}", dir.display())))?;
        config::sync_dir(&self.dir)
    }

    /// Sync and close every queue.
    pub fn close(&self) -> Result<()> {
        for queue in self.queues.read().values() {
            queue.close()?;
        }
        Ok(())
    }
}
