//! A topic: N partitions, each its own [`Log`], with keyed partitioning.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_core::{Record, StoredRecord, limits, partition_for_key};
use tributary_log::{Appended, Durability, Log, LogConfig, LogError, PendingAppend};

use crate::error::{Result, StreamError};

/// How a topic is laid out and kept. Stored as `topic.json` in the topic's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub partitions: u32,
    /// `always`, `never` or `interval:<ms>`.
    #[serde(default = "default_durability")]
    pub durability: String,
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    #[serde(default)]
    pub retention_bytes: Option<u64>,
    #[serde(default)]
    pub retention_ms: Option<u64>,
    #[serde(default)]
    pub compact: bool,
}

fn default_durability() -> String {
    "always".into()
}

fn default_segment_bytes() -> u64 {
    tributary_log::SEGMENT_BYTES_DEFAULT
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            durability: default_durability(),
            segment_bytes: default_segment_bytes(),
            retention_bytes: None,
            retention_ms: None,
            compact: false,
        }
    }
}

impl TopicConfig {
    pub fn log_config(&self) -> Result<LogConfig> {
        let durability: Durability = self.durability.parse().map_err(StreamError::Invalid)?;
        let config = LogConfig {
            durability,
            segment_bytes_max: self.segment_bytes,
            retention_bytes: self.retention_bytes.map(|total| total / u64::from(self.partitions.max(1))),
            retention_ms: self.retention_ms,
            compact: self.compact,
            ..LogConfig::default()
        };
        config.validate().map_err(StreamError::Invalid)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.partitions == 0 || self.partitions > limits::PARTITIONS_MAX {
            return Err(StreamError::Invalid(format!("partitions must be 1 to PARTITIONS_MAX ({}), got {}", limits::PARTITIONS_MAX, self.partitions)));
        }
        self.log_config().map(|_| ())
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Produced {
    pub partition: u32,
    pub offset: u64,
}

/// A partition is either open or fenced (its log refused to open or met corruption).
enum Partition {
    Open(Log),
    Fenced(String),
}

pub struct Topic {
    name: String,
    config: TopicConfig,
    dir: PathBuf,
    partitions: Vec<Partition>,
    /// Unkeyed batches go to partitions in turn.
    next_unkeyed: AtomicU32,
}

impl Topic {
    pub(crate) fn open(dir: &Path, name: &str, config: TopicConfig) -> Result<Topic> {
        let log_config = config.log_config()?;
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for p in 0..config.partitions {
            let partition = match Log::open(dir.join(p.to_string()), log_config.clone()) {
                Ok((log, _report)) => Partition::Open(log),
                Err(error @ LogError::Corrupt { .. }) => Partition::Fenced(error.to_string()),
                Err(error) => return Err(StreamError::Partition { topic: name.to_string(), partition: p, source: error }),
            };
            partitions.push(partition);
        }
        Ok(Topic { name: name.to_string(), config, dir: dir.to_path_buf(), partitions, next_unkeyed: AtomicU32::new(0) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &TopicConfig {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// The log of `partition`, or why it cannot be used.
    pub fn log(&self, partition: u32) -> Result<&Log> {
        match self.partitions.get(partition as usize) {
            Some(Partition::Open(log)) => Ok(log),
            Some(Partition::Fenced(reason)) => Err(self.partition_error(partition, LogError::Fenced(reason.clone()))),
            None => Err(StreamError::PartitionNotFound { topic: self.name.clone(), partition, partitions: self.partition_count() }),
        }
    }

    /// Why each fenced partition is fenced.
    pub fn fenced_partitions(&self) -> Vec<(u32, String)> {
        (0..self.partition_count())
            .filter_map(|p| match &self.partitions[p as usize] {
                Partition::Fenced(reason) => Some((p, reason.clone())),
                Partition::Open(log) => log.fenced().map(|reason| (p, reason)),
            })
            .collect()
    }

    fn partition_error(&self, partition: u32, source: LogError) -> StreamError {
        StreamError::Partition { topic: self.name.clone(), partition, source }
    }

    /// The partition a record goes to: by key hash when keyed, otherwise `unkeyed`.
    pub fn partition_for(&self, key: Option<&[u8]>, unkeyed: u32) -> u32 {
        match key {
            Some(key) => partition_for_key(key, self.partition_count()),
            None => unkeyed % self.partition_count(),
        }
    }

    /// Append records, keyed ones to their key's partition, unkeyed ones to one partition
    /// chosen in turn per call. Returns where each record landed, in input order, once all are
    /// durable. Partitions are written in parallel (one sync wait each).
    pub fn produce(&self, records: &[Record]) -> Result<Vec<Produced>> {
        let unkeyed = self.next_unkeyed.fetch_add(1, Ordering::Relaxed);
        let count = self.partition_count() as usize;
        let mut by_partition: Vec<Vec<usize>> = vec![Vec::new(); count];
        for (i, record) in records.iter().enumerate() {
            by_partition[self.partition_for(record.key.as_deref(), unkeyed) as usize].push(i);
        }
        super::check_produce(&self.name, records, (0u32..).zip(by_partition.iter().map(Vec::len)).filter(|&(_, count)| count > 0))?;
        let mut pending: Vec<(u32, &Vec<usize>, PendingAppend)> = Vec::new();
        for (p, indexes) in by_partition.iter().enumerate().filter(|(_, ix)| !ix.is_empty()) {
            let p = p as u32;
            let log = self.log(p)?;
            // All on one partition (the common case): append the caller's slice as it is.
            let batch: std::borrow::Cow<[Record]> =
                if indexes.len() == records.len() { records.into() } else { indexes.iter().map(|&i| records[i].clone()).collect::<Vec<_>>().into() };
            pending.push((p, indexes, log.append_pending(&batch, 0, 0).map_err(|e| self.partition_error(p, e))?));
        }
        let mut out = vec![Produced { partition: 0, offset: 0 }; records.len()];
        for (p, indexes, append) in pending {
            let appended = append.wait().map_err(|e| self.partition_error(p, e))?;
            for (n, &i) in indexes.iter().enumerate() {
                out[i] = Produced { partition: p, offset: appended.base_offset + n as u64 };
            }
        }
        Ok(out)
    }

    /// Append records to one partition as one batch.
    pub fn produce_to(&self, partition: u32, records: &[Record]) -> Result<Appended> {
        self.log(partition)?.append(records).map_err(|e| self.partition_error(partition, e))
    }

    /// Append records to one partition as one batch only if it ends at `expected_end`, else
    /// [`StreamError::EndMoved`] and nothing is written.
    pub fn produce_at(&self, partition: u32, expected_end: u64, records: &[Record]) -> Result<Appended> {
        let log = self.log(partition)?;
        super::check_produce(&self.name, records, [(partition, records.len())])?;
        log.append_at(expected_end, records).map_err(|e| match e {
            LogError::EndMoved { expected, end } => StreamError::EndMoved { topic: self.name.clone(), partition, expected, end, appended: 0 },
            e => self.partition_error(partition, e),
        })
    }

    /// Append as an idempotent producer: a retried batch (same producer id and sequence)
    /// returns its original offsets, also after a restart.
    pub fn produce_idempotent(&self, partition: u32, producer_id: u64, base_sequence: u32, records: &[Record]) -> Result<Appended> {
        if producer_id == 0 {
            return Err(StreamError::Invalid("producer id 0 is reserved for non-idempotent producers".into()));
        }
        self.log(partition)?.append_idempotent(producer_id, base_sequence, records).map_err(|e| self.partition_error(partition, e))
    }

    /// Records of `partition` from `offset`.
    pub fn fetch(&self, partition: u32, offset: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        self.log(partition)?.read(offset, max_records, max_bytes).map_err(|e| self.partition_error(partition, e))
    }

    /// Like [`Topic::fetch`], but waits up to `wait` for a record at `offset` to arrive.
    pub fn fetch_wait(&self, partition: u32, offset: u64, max_records: usize, max_bytes: usize, wait: Duration) -> Result<Vec<StoredRecord>> {
        self.log(partition)?.wait_for_data(offset, wait);
        self.fetch(partition, offset, max_records, max_bytes)
    }

    /// `(start, end)`: the first offset held and the offset the next record will get.
    pub fn offsets(&self, partition: u32) -> Result<(u64, u64)> {
        let log = self.log(partition)?;
        Ok((log.start_offset(), log.high_watermark()))
    }

    /// The first offset of `partition` with a timestamp ≥ `timestamp_ms` (the end offset if none).
    pub fn seek_timestamp(&self, partition: u32, timestamp_ms: i64) -> Result<u64> {
        let log = self.log(partition)?;
        let found = log.offset_for_timestamp(timestamp_ms).map_err(|e| self.partition_error(partition, e))?;
        Ok(found.unwrap_or_else(|| log.high_watermark()))
    }

    /// Apply retention and, for compacted topics, compaction to every open partition.
    pub fn maintain(&self, now_ms: i64) -> Result<()> {
        for p in 0..self.partition_count() {
            let Ok(log) = self.log(p) else { continue };
            log.enforce_retention(now_ms).map_err(|e| self.partition_error(p, e))?;
            if self.config.compact {
                log.compact(now_ms).map_err(|e| self.partition_error(p, e))?;
            }
        }
        Ok(())
    }

    pub(crate) fn close(&self) {
        for partition in &self.partitions {
            if let Partition::Open(log) = partition {
                let _ = log.close();
            }
        }
    }
}
