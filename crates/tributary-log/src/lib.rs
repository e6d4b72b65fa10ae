//! The durable log under every Tributary topic partition.
//!
//! A [`Log`] is one directory of segments. Each segment is a data file of record batches
//! (length-framed, CRC-32C checksummed, see [`batch`]) named by its base offset, plus, once
//! sealed, an index file with a sparse offset index, a time index and the idempotent-producer
//! table. One writer appends; readers `pread` without blocking it.
//!
//! Guarantees:
//! - With [`Durability::Always`] an append returns only after `fdatasync`, and concurrent
//!   appends share one sync (group commit). Readers never see a record that is not durable.
//! - Reopening scans only the tail segment. A torn tail is cut at the last valid batch; damage
//!   anywhere else (a bad checksum followed by good data, a damaged sealed segment, a missing
//!   segment) refuses to open with [`LogError::Corrupt`]. A bad checksum met while reading
//!   fences the partition. Bad bytes are never returned.
//! - A failed write is cut back so the log stays appendable; data acknowledged earlier stays
//!   readable.
//!
//! Not here: topics, partitions, consumer groups, queues (see `tributary-engine`), and any async
//! runtime: this crate is synchronous and does its own IO.

pub mod batch;
mod config;
mod error;
mod log;
mod producers;
mod segment;

pub use config::{Durability, LogConfig, NEVER_BACKGROUND_SYNC, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};
pub use error::{LogError, Result};
pub use log::{Appended, CompactionReport, Log, PendingAppend, RecoveryReport, RetentionReport};
pub use producers::{PRODUCER_BATCHES_CACHED, PRODUCERS_MAX};
/// Durable small-file writes (temporary file, fsync, rename, fsync of the folder), shared with
/// the engine's metadata files.
pub use segment::{sync_dir, write_atomically};
