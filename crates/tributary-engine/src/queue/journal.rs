//! The records of a group's state journal (`<queue>/groups/<group>/state`), postcard-encoded,
//! one log record each.
//!
//! A journal is a sequence of changes since the last snapshot. A snapshot is written as one
//! log batch (a `Snapshot` record followed by its `SnapshotPart`s); a batch is checksummed as a
//! unit and a torn one is cut whole, so a snapshot is either all there or not at all.

use serde::{Deserialize, Serialize};

/// `(level, offset)` pairs name a message in a group's state.
pub(crate) type At = (u8, u64);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum JournalRecord {
    /// Messages leased to `consumer` until `deadline_ms`; `count` is the delivery count after
    /// this delivery.
    Acquire { consumer: String, deadline_ms: u64, items: Vec<(u8, u64, u32)> },
    Ack { items: Vec<At> },
    /// Released by a nack: available again at `available_at_ms`, with its delivery count.
    Release { items: Vec<(u8, u64, u32, u64)> },
    Extend { deadline_ms: u64, items: Vec<At> },
    /// Dead-lettered (the dead-letter record is durable before this is written).
    Archive { items: Vec<At> },
    /// Start of a snapshot: everything below `starts[level]` is acked or archived.
    Snapshot { starts: Vec<u64>, acked_total: u64, archived_total: u64 },
    /// Window states of one level that differ from "available, never delivered".
    SnapshotPart { level: u8, entries: Vec<(u64, SnapshotEntry)> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SnapshotEntry {
    Available { count: u32, at_ms: u64 },
    Acquired { count: u32, consumer: String, deadline_ms: u64 },
    Acked,
    Archived,
}

/// Entries per `SnapshotPart`: with consumer names of at most `NAME_BYTES_MAX` bytes a part
/// stays below `MESSAGE_BYTES_MAX`.
pub(crate) const SNAPSHOT_PART_ENTRIES_MAX: usize = 4096;
const _: () = assert!(
    SNAPSHOT_PART_ENTRIES_MAX * (tributary_core::limits::NAME_BYTES_MAX + 32) < tributary_core::limits::MESSAGE_BYTES_MAX
);

impl JournalRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("journal records always encode")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<JournalRecord, String> {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }
}
