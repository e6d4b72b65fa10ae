//! [`StreamStore`]: the stream interface every backend gives (topics of partitions, produce,
//! fetch by offset, seek by time, committed offsets per group), so a system written against it
//! runs on the embedded [`Topics`] and on NATS JetStream (`tributary-nats`).
//!
//! The contract, which the conformance suite (`conformance::stream`) checks on every backend:
//! - Offsets of a partition start at 0 and are contiguous; a produce returns the offset of each
//!   record, and records of one produce that share a partition keep their order.
//! - A keyed record goes to partition [`partition_for_key`](tributary_core::partition_for_key) (the stable
//!   [`tributary_core::key_hash`]), the same on every backend, so nodes agree; the unkeyed
//!   records of one produce go together to one partition, chosen in turn per call.
//! - A record comes back as it went in: key, value (a tombstone `None` stays `None`, an empty
//!   value stays empty), headers in order, and its timestamp (0 on produce means "stamp it").
//! - `produce_at` appends to one partition only at the end the caller expects; when another
//!   writer got there first it is refused with [`StreamError::EndMoved`](crate::StreamError::EndMoved),
//!   which names the end. Of writers racing at one end, exactly one gets in.
//! - A produce with a record over a named limit (key, headers, size) or more than
//!   `BATCH_RECORDS_MAX` records for one partition is refused by name ([`check_produce`]) and
//!   writes nothing; an empty produce writes nothing and returns no offsets.
//! - `seek_timestamp` gives the first offset whose timestamp is at or after the time.
//! - A committed offset is durable and per (topic, group, partition); groups are independent.
//! - Members of a group share its partitions ([`GroupState`](super::GroupState), the same rules
//!   on every backend): each partition has exactly one owner per generation; a join, a leave or
//!   a session running out starts a new generation; a member learns its partitions from its
//!   join and heartbeats. A member's commit is refused unless it is live, at the current
//!   generation, and owns the partition; on a backend whose nodes share the group, that holds
//!   whichever node the members call.

use tributary_core::{Record, StoredRecord};
use tributary_log::{LogError, batch};

use super::{Membership, Produced, Topics, TopicConfig};
use crate::{BoxFuture, Gap, Result, StreamError};

/// Bytes one fetch returns at most (besides the record count).
pub const STREAM_FETCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What every backend checks before a produce writes anything, so that a refused produce
/// writes nothing: each record within the named limits (`StreamError::Log` of
/// `LogError::Limit`), then 1 to `BATCH_RECORDS_MAX` records for each partition in
/// `per_partition` (partition, records), the partitions the produce writes to
/// (`StreamError::Partition`).
pub fn check_produce(topic: &str, records: &[Record], per_partition: impl IntoIterator<Item = (u32, usize)>) -> Result<()> {
    for (index, record) in records.iter().enumerate() {
        batch::check_record(index, record).map_err(|e| StreamError::Log(LogError::Limit(e)))?;
    }
    for (partition, count) in per_partition {
        batch::check_count(count).map_err(|e| StreamError::Partition { topic: topic.to_string(), partition, source: LogError::Limit(e) })?;
    }
    Ok(())
}

/// What the async methods of a `dyn StreamStore` return.
pub type StreamFuture<'a, T> = BoxFuture<'a, Result<T>>;

/// A live tail of one partition ([`StreamStore::tail`]).
pub trait Tail: Send {
    /// The next record in offset order, waiting until one is appended. Records removed by
    /// retention before they were read are skipped (the offset says so). After an error the
    /// tail is done: open another from the next offset. Dropping the future before it resolves
    /// loses nothing.
    fn next(&mut self) -> BoxFuture<'_, Result<StoredRecord>>;
}

/// The stream interface. See the module docs for its contract.
pub trait StreamStore: Send + Sync + std::fmt::Debug {
    /// `"embedded"`, `"nats"`, ...
    fn backend(&self) -> &'static str;
    /// The guarantees this backend does not give. Empty for the embedded engine.
    fn gaps(&self) -> &'static [Gap] {
        &[]
    }
    /// True when calls complete on the polling thread (the embedded engine, in this process):
    /// on an async runtime, poll them where blocking is allowed. False for network backends,
    /// whose log other nodes append to as well.
    fn blocking(&self) -> bool {
        false
    }
    /// Creates a topic; creating one that exists with the same configuration is a no-op, with
    /// another is [`StreamError::TopicExists`](crate::StreamError::TopicExists).
    fn create_topic<'a>(&'a self, name: &'a str, config: TopicConfig) -> StreamFuture<'a, ()>;
    fn delete_topic<'a>(&'a self, name: &'a str) -> StreamFuture<'a, ()>;
    fn partitions<'a>(&'a self, topic: &'a str) -> StreamFuture<'a, u32>;
    /// Appends `records` durably and returns where each went, in the order given.
    fn produce<'a>(&'a self, topic: &'a str, records: Vec<Record>) -> StreamFuture<'a, Vec<Produced>>;
    /// Appends `records` to `partition`, in order, only if it ends at `expected_end` (its next
    /// offset): a writer that checked them against a state built from the log up to there
    /// appends on top of that state, whichever node it runs on. Returns the first record's
    /// offset. Refused with [`StreamError::EndMoved`](crate::StreamError::EndMoved) when the
    /// partition ends elsewhere; a backend that appends record by record says how many of the
    /// leading records went in before it was overtaken (the embedded engine writes all or none).
    fn produce_at<'a>(&'a self, topic: &'a str, partition: u32, expected_end: u64, records: Vec<Record>) -> StreamFuture<'a, u64>;
    /// At most `max_records` records from `offset` on: none at the end, and
    /// [`LogError::OffsetOutOfRange`](tributary_log::LogError::OffsetOutOfRange) (in
    /// [`StreamError::Partition`](crate::StreamError::Partition)) before the start or past the end.
    fn fetch<'a>(&'a self, topic: &'a str, partition: u32, offset: u64, max_records: usize) -> StreamFuture<'a, Vec<StoredRecord>>;
    /// (first offset held, next offset to be written).
    fn offsets<'a>(&'a self, topic: &'a str, partition: u32) -> StreamFuture<'a, (u64, u64)>;
    /// The first offset whose timestamp is at or after `timestamp_ms` (the end if none).
    fn seek_timestamp<'a>(&'a self, topic: &'a str, partition: u32, timestamp_ms: i64) -> StreamFuture<'a, u64>;
    /// Durably records `offset` (the next offset to read) for `group`.
    fn commit<'a>(&'a self, topic: &'a str, group: &'a str, partition: u32, offset: u64) -> StreamFuture<'a, ()>;
    fn committed<'a>(&'a self, topic: &'a str, group: &'a str, partition: u32) -> StreamFuture<'a, Option<u64>>;
    /// Joins (or rejoins) `group` on `topic` as `member_id`, or as an id made up and returned
    /// (unique across nodes). The session lasts `session_timeout_ms` (default
    /// [`SESSION_TIMEOUT_MS_DEFAULT`](super::SESSION_TIMEOUT_MS_DEFAULT)) past each heartbeat.
    fn join_group<'a>(&'a self, topic: &'a str, group: &'a str, member_id: Option<&'a str>, session_timeout_ms: Option<u64>) -> StreamFuture<'a, Membership>;
    /// Keeps a member alive and returns its (possibly new) assignment;
    /// [`StreamError::UnknownMember`](crate::StreamError::UnknownMember) once its session ran out.
    fn heartbeat<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str) -> StreamFuture<'a, Membership>;
    /// Leaves the group at once (its partitions go to the others now, not at its timeout).
    fn leave_group<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str) -> StreamFuture<'a, ()>;
    /// The live members of a group with their partitions, sorted by member id.
    fn describe_group<'a>(&'a self, topic: &'a str, group: &'a str) -> StreamFuture<'a, Vec<Membership>>;
    /// Commits `offsets` (partition, next offset to read) as `member_id` at `generation`:
    /// refused unless it owns each partition in the current generation.
    fn commit_member<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str, generation: u64, offsets: Vec<(u32, u64)>) -> StreamFuture<'a, ()>;
    /// A live tail of `partition` from `offset` on, when the backend pushes records as they are
    /// appended (NATS JetStream: an ordered consumer); `None` when readers should poll `fetch`
    /// (the embedded engine, where a fetch is a read of a local file).
    fn tail<'a>(&'a self, topic: &'a str, partition: u32, offset: u64) -> StreamFuture<'a, Option<Box<dyn Tail>>> {
        let _ = (topic, partition, offset);
        Box::pin(async { Ok(None) })
    }
}

/// The embedded engine. Each call runs when the future is polled, on the polling thread, and
/// a produce waits for its fsync there (about a millisecond): on an async runtime, call it where
/// blocking is allowed (the server's `blocking()`).
impl StreamStore for Topics {
    fn backend(&self) -> &'static str {
        "embedded"
    }
    fn blocking(&self) -> bool {
        true
    }
    fn create_topic<'a>(&'a self, name: &'a str, config: TopicConfig) -> StreamFuture<'a, ()> {
        Box::pin(async move { self.create(name, config).map(|_| ()) })
    }
    fn delete_topic<'a>(&'a self, name: &'a str) -> StreamFuture<'a, ()> {
        Box::pin(async move { self.delete(name) })
    }
    fn partitions<'a>(&'a self, topic: &'a str) -> StreamFuture<'a, u32> {
        Box::pin(async move { Ok(self.get(topic)?.partition_count()) })
    }
    fn produce<'a>(&'a self, topic: &'a str, records: Vec<Record>) -> StreamFuture<'a, Vec<Produced>> {
        Box::pin(async move { self.get(topic)?.produce(&records) })
    }
    fn produce_at<'a>(&'a self, topic: &'a str, partition: u32, expected_end: u64, records: Vec<Record>) -> StreamFuture<'a, u64> {
        Box::pin(async move { Ok(self.get(topic)?.produce_at(partition, expected_end, &records)?.base_offset) })
    }
    fn fetch<'a>(&'a self, topic: &'a str, partition: u32, offset: u64, max_records: usize) -> StreamFuture<'a, Vec<StoredRecord>> {
        Box::pin(async move { self.get(topic)?.fetch(partition, offset, max_records, STREAM_FETCH_BYTES_MAX) })
    }
    fn offsets<'a>(&'a self, topic: &'a str, partition: u32) -> StreamFuture<'a, (u64, u64)> {
        Box::pin(async move { self.get(topic)?.offsets(partition) })
    }
    fn seek_timestamp<'a>(&'a self, topic: &'a str, partition: u32, timestamp_ms: i64) -> StreamFuture<'a, u64> {
        Box::pin(async move { self.get(topic)?.seek_timestamp(partition, timestamp_ms) })
    }
    fn commit<'a>(&'a self, topic: &'a str, group: &'a str, partition: u32, offset: u64) -> StreamFuture<'a, ()> {
        Box::pin(async move { Topics::commit(self, topic, group, None, &[(partition, offset)]) })
    }
    fn committed<'a>(&'a self, topic: &'a str, group: &'a str, partition: u32) -> StreamFuture<'a, Option<u64>> {
        Box::pin(async move {
            self.get(topic)?;
            Ok(Topics::committed(self, topic, group, partition))
        })
    }
    fn join_group<'a>(&'a self, topic: &'a str, group: &'a str, member_id: Option<&'a str>, session_timeout_ms: Option<u64>) -> StreamFuture<'a, Membership> {
        Box::pin(async move { Topics::join_group(self, topic, group, member_id, session_timeout_ms) })
    }
    fn heartbeat<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str) -> StreamFuture<'a, Membership> {
        Box::pin(async move { Topics::heartbeat(self, topic, group, member_id) })
    }
    fn leave_group<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str) -> StreamFuture<'a, ()> {
        Box::pin(async move { Topics::leave_group(self, topic, group, member_id) })
    }
    fn describe_group<'a>(&'a self, topic: &'a str, group: &'a str) -> StreamFuture<'a, Vec<Membership>> {
        Box::pin(async move { Topics::describe_group(self, topic, group) })
    }
    fn commit_member<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str, generation: u64, offsets: Vec<(u32, u64)>) -> StreamFuture<'a, ()> {
        Box::pin(async move { Topics::commit(self, topic, group, Some((member_id, generation)), &offsets) })
    }
}
