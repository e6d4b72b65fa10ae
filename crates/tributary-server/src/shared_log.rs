//! A log every node appends to (the stream interface on NATS JetStream), as systems with
//! synchronous fan-out code use it: [`SharedLog`] calls a [`StreamStore`] and waits for the
//! answer, [`Reader`] reads a partition as it grows (the backend's live tail when it has one),
//! and [`follow`] runs a node's one reader of the log on a thread of its own.
//!
//! The pattern: a publish only appends; each node's follower reads the log in offset order and
//! fans out to the node's own connections, raising a watermark; the publish is answered once its
//! node's watermark has passed its offsets. One reader per node, however many publishers: they
//! wait for the follower rather than read the log themselves. A writer whose input is checked
//! against the state the log built (stock prices' sequence numbers) appends with
//! [`SharedLog::produce_at`] at the end that state reached, and lets its follower catch up when
//! another node got there first. [`SharedLog`] serves the embedded engine too, where this node
//! is the only writer ([`SharedLog::shared`] is false) and there is nothing to follow.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tributary_core::{Record, StoredRecord};
use futures_util::FutureExt;
use tributary_engine::StreamError;
use tributary_engine::stream::{Produced, StreamStore, Tail, TopicConfig};
use tributary_log::LogError;

/// How long a read of a followed partition waits for a record when there is none.
pub const FOLLOW_IDLE_POLL: Duration = Duration::from_millis(5);
/// Longest a publish waits for its node's follower to pass what it appended.
pub const FANOUT_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a follower waits before it tries again after a failed read.
pub const FOLLOW_RETRY: Duration = Duration::from_millis(250);

/// A stream interface called from synchronous code: a blocking-pool thread, a follower's thread,
/// or an async worker of the multi-thread runtime (handed over meanwhile, so a current-thread
/// runtime would panic).
#[derive(Clone)]
pub struct SharedLog {
    streams: Arc<dyn StreamStore>,
    runtime: tokio::runtime::Handle,
}

impl SharedLog {
    /// On the runtime this is called from.
    pub fn current(streams: Arc<dyn StreamStore>) -> SharedLog {
        SharedLog { streams, runtime: tokio::runtime::Handle::current() }
    }

    /// Wait for `call` on the log's runtime.
    pub fn wait<T>(&self, call: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(call))
    }

    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<(), StreamError> {
        self.wait(self.streams.create_topic(name, config))
    }

    pub fn partitions(&self, topic: &str) -> Result<u32, StreamError> {
        self.wait(self.streams.partitions(topic))
    }

    pub fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Produced>, StreamError> {
        self.wait(self.streams.produce(topic, records))
    }

    /// Append to `partition` only if it ends at `expected_end` ([`StreamStore::produce_at`]).
    pub fn produce_at(&self, topic: &str, partition: u32, expected_end: u64, records: Vec<Record>) -> Result<u64, StreamError> {
        self.wait(self.streams.produce_at(topic, partition, expected_end, records))
    }

    pub fn fetch(&self, topic: &str, partition: u32, offset: u64, max_records: usize) -> Result<Vec<StoredRecord>, StreamError> {
        self.wait(self.streams.fetch(topic, partition, offset, max_records))
    }

    pub fn seek_timestamp(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64, StreamError> {
        self.wait(self.streams.seek_timestamp(topic, partition, timestamp_ms))
    }

    /// True when another node may append to the log too (a network backend); false on the
    /// embedded engine, where this node is the only writer and nothing needs following.
    pub fn shared(&self) -> bool {
        !self.streams.blocking()
    }

    /// Wait until `passed` holds for a follower's progress (`watermark`), at most
    /// [`FANOUT_WAIT_MAX`]: what was appended is then fanned out on this node.
    pub fn wait_passed<T>(&self, mut watermark: tokio::sync::watch::Receiver<T>, passed: impl FnMut(&T) -> bool) -> Result<(), StreamError> {
        let waited = self.wait(async { tokio::time::timeout(FANOUT_WAIT_MAX, watermark.wait_for(passed)).await.map(|seen| seen.map(drop)) });
        let message = match waited {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => "appended, but this node's follower stopped".to_string(),
            Err(_) => format!("appended, but this node's follower has not passed it within FANOUT_WAIT_MAX ({FANOUT_WAIT_MAX:?}); other nodes deliver it"),
        };
        Err(StreamError::Backend { backend: "shared log", message })
    }

    /// The first offset the partition holds and its end.
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64), StreamError> {
        self.wait(self.streams.offsets(topic, partition))
    }
}

/// When `record` was appended, on this node's clock (`now` and `now_ms` are one moment of it):
/// the start of a delivery latency measured on a node that did not append the record.
pub fn accepted_at(record: &StoredRecord, now: std::time::Instant, now_ms: i64) -> std::time::Instant {
    let age = Duration::from_millis(now_ms.saturating_sub(record.timestamp_ms).max(0) as u64);
    now.checked_sub(age).unwrap_or(now)
}

/// A node's reader of one partition of a shared log: the backend's live tail when it has one
/// (kept open while reads go on from where it is, reopened after an error or a jump), else
/// fetches.
pub struct Reader {
    log: SharedLog,
    topic: String,
    partition: u32,
    /// The open tail and the offset of the next record it gives.
    tail: Option<(u64, Box<dyn Tail>)>,
    /// The backend has no live tail: fetch.
    fetches: bool,
}

impl Reader {
    pub fn new(log: &SharedLog, topic: &str, partition: u32) -> Reader {
        Reader { log: log.clone(), topic: topic.to_string(), partition, tail: None, fetches: false }
    }

    /// At most `max` records from `from` on, waiting up to [`FOLLOW_IDLE_POLL`] for the first
    /// (empty if none came). The first offset is above `from` when retention removed what lay
    /// between, on a tail and on fetches alike.
    pub fn read(&mut self, from: u64, max: usize) -> Result<Vec<StoredRecord>, StreamError> {
        let records = self.read_on(from, max)?;
        if let Some(first) = records.first().filter(|first| first.offset > from) {
            tracing::warn!(topic = self.topic, partition = self.partition, from, start = first.offset, "retention removed records this node had not read; reading on from what the log holds");
        }
        Ok(records)
    }

    fn read_on(&mut self, from: u64, max: usize) -> Result<Vec<StoredRecord>, StreamError> {
        if !self.fetches && self.tail.as_ref().is_none_or(|(next, _)| *next != from) {
            self.tail = None;
            match self.log.wait(self.log.streams.tail(&self.topic, self.partition, from))? {
                Some(tail) => self.tail = Some((from, tail)),
                None => self.fetches = true,
            }
        }
        let Reader { log, tail, .. } = self;
        if let Some((next, open)) = tail {
            let read = log.wait(async {
                let mut records = Vec::new();
                match tokio::time::timeout(FOLLOW_IDLE_POLL, open.next()).await {
                    Err(_) => return Ok(records),
                    Ok(first) => records.push(first?),
                }
                while records.len() < max {
                    match open.next().now_or_never() {
                        Some(record) => records.push(record?),
                        None => break,
                    }
                }
                Ok(records)
            });
            return match read {
                Ok(records) => {
                    if let Some(last) = records.last() {
                        *next = last.offset + 1;
                    }
                    Ok(records)
                }
                Err(error) => {
                    *tail = None;
                    Err(error)
                }
            };
        }
        let records = match self.log.fetch(&self.topic, self.partition, from, max) {
            Ok(records) => records,
            Err(error) => {
                let Some(start) = removed_below(&error, from) else { return Err(error) };
                self.log.fetch(&self.topic, self.partition, start, max)?
            }
        };
        if records.is_empty() {
            std::thread::sleep(FOLLOW_IDLE_POLL);
        }
        Ok(records)
    }
}

/// When a read from `from` failed because retention removed the records there: the first
/// offset the partition still holds (a follower that fell that far behind reads on from it).
fn removed_below(error: &StreamError, from: u64) -> Option<u64> {
    match error {
        StreamError::Partition { source: LogError::OffsetOutOfRange { start, .. }, .. } | StreamError::Log(LogError::OffsetOutOfRange { start, .. }) if *start > from => Some(*start),
        _ => None,
    }
}

/// Run a node's reader of a shared log on a thread named `name`: `step` reads what is new (with
/// [`Reader`]s, which wait a moment when there is nothing) and fans it out. It runs again at
/// once, or after [`FOLLOW_RETRY`] when it failed (logged).
/// It stops when `stopping` is set (quietly, also when that cut its last step short) or its
/// owner is gone; the owner is held only during a step. Joining the handle waits for that.
pub fn follow<T, F, E>(name: &str, owner: Weak<T>, stopping: Arc<AtomicBool>, mut step: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    T: Send + Sync + 'static,
    F: FnMut(&T) -> Result<(), E> + Send + 'static,
    E: std::fmt::Display,
{
    let thread = name.to_string();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        while !stopping.load(Ordering::Acquire) {
            let Some(owner) = owner.upgrade() else { return };
            let pause = match step(&owner) {
                Ok(()) => None,
                // Stopping: a read cut short by the closing connection is no failure.
                Err(_) if stopping.load(Ordering::Acquire) => return,
                Err(error) => {
                    tracing::warn!(%error, thread, "a step of a shared log's reader failed; retrying");
                    Some(FOLLOW_RETRY)
                }
            };
            drop(owner);
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_below_what_retention_kept_names_where_the_partition_starts() {
        let removed = |requested, start| StreamError::Partition { topic: "t".into(), partition: 0, source: LogError::OffsetOutOfRange { requested, start, end: 100 } };
        assert_eq!(removed_below(&removed(5, 40), 5), Some(40));
        assert_eq!(removed_below(&StreamError::Log(LogError::OffsetOutOfRange { requested: 5, start: 40, end: 100 }), 5), Some(40));
        assert_eq!(removed_below(&removed(150, 40), 150), None, "past the end is not a removal");
        assert_eq!(removed_below(&StreamError::Invalid("x".into()), 5), None);
    }
}
