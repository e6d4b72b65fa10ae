//! A partition log: the segments of one directory, one writer, many readers.
//!
//! Concurrency: appends encode and checksum their batch before taking the writer lock, then
//! write it under the lock (offsets are assigned there), then leave the lock and, with
//! `Durability::Always`, wait for a sync that covers them. Whoever finds no sync covering its
//! write becomes the syncer for everyone who wrote before it started (group commit). Readers
//! take no writer lock: they read the published sizes and high-water mark and `pread` the
//! files.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tributary_core::{Record, StoredRecord, now_ms};

use crate::batch::{self, BatchHeader, DecodeError};
use crate::config::{Durability, LogConfig, NEVER_BACKGROUND_SYNC};
use crate::error::{IoContext, LogError, Result};
use crate::producers::{CachedBatch, ProducerTable, SequenceCheck};
use crate::segment::{self, Segment, SegmentIndex};

/// Bytes read per `pread` while scanning.
const READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Offsets assigned to an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
    /// True when an idempotent producer retried a batch that was already written.
    pub duplicate: bool,
}

/// What reopening found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    /// Sealed segments whose index had to be rebuilt (missing or failed its check).
    pub rebuilt_indexes: usize,
    pub next_offset: u64,
}

/// What a retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    pub start_offset: u64,
}

/// What a compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    pub segments_rewritten: usize,
    pub records_removed: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

struct Writer {
    active: Arc<Segment>,
    position: u64,
    next_offset: u64,
    producers: ProducerTable,
}

struct Shared {
    dir: PathBuf,
    config: LogConfig,
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Writer>,
    sync_lock: Mutex<()>,
    maintenance: Mutex<()>,
    /// Records below this offset are readable (durable under `Always`).
    high_watermark: AtomicU64,
    start_offset: AtomicU64,
    fenced: RwLock<Option<String>>,
    unsynced: AtomicBool,
    waiters: AtomicUsize,
    data_lock: Mutex<()>,
    data_ready: Condvar,
    closed: AtomicBool,
    _lock_file: File,
}

/// A durable, segmented, checksummed log. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
}

/// An append that has been written but whose durability is still to be awaited.
#[must_use = "an append is acknowledged only once `wait` returns"]
pub struct PendingAppend {
    log: Log,
    appended: Appended,
}

impl PendingAppend {
    pub fn offsets(&self) -> Appended {
        self.appended
    }

    /// Block until the batch is as durable as the log's class promises.
    pub fn wait(self) -> Result<Appended> {
        self.log.wait_durable(self.appended.last_offset + 1)?;
        Ok(self.appended)
    }
}

impl Log {
    /// Open (or create) the log in `dir`, recovering from a crash if needed.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<(Log, RecoveryReport)> {
        config.validate().map_err(LogError::Config)?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let lock_path = dir.join(".lock");
        let lock_file = File::options().create(true).truncate(false).write(true).open(&lock_path).context(|| format!("opening {}", lock_path.display()))?;
        if lock_file.try_lock().is_err() {
            return Err(LogError::Locked(dir));
        }
        let (segments, producers, report) = recover(&dir, &config)?;
        let active = segments.last().expect("recovery leaves at least one segment").clone();
        let next_offset = active.next_offset();
        let start_offset = segments[0].base_offset;
        let writer = Writer { position: active.size(), active, next_offset, producers };
        let shared = Arc::new(Shared {
            dir,
            config,
            segments: RwLock::new(segments),
            writer: Mutex::new(writer),
            sync_lock: Mutex::new(()),
            maintenance: Mutex::new(()),
            high_watermark: AtomicU64::new(next_offset),
            start_offset: AtomicU64::new(start_offset),
            fenced: RwLock::new(None),
            unsynced: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            data_lock: Mutex::new(()),
            data_ready: Condvar::new(),
            closed: AtomicBool::new(false),
            _lock_file: lock_file,
        });
        match shared.config.durability {
            Durability::Always => {}
            Durability::Interval(every) => spawn_flusher(Arc::downgrade(&shared), every),
            Durability::Never => spawn_flusher(Arc::downgrade(&shared), NEVER_BACKGROUND_SYNC),
        }
        Ok((Log { shared }, report))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Append `records` as one batch and wait until it is acknowledged by the durability class.
    pub fn append(&self, records: &[Record]) -> Result<Appended> {
        self.append_pending(records, 0, 0)?.wait()
    }

    /// Append as idempotent producer `producer_id` (non-zero) whose first record has sequence
    /// `base_sequence`. A retry of a batch already written returns its original offsets.
    pub fn append_idempotent(&self, producer_id: u64, base_sequence: u32, records: &[Record]) -> Result<Appended> {
        assert_ne!(producer_id, 0, "producer id 0 means 'not idempotent'");
        self.append_pending(records, producer_id, base_sequence)?.wait()
    }

    /// Append `records` as one batch only if the log ends at `expected_end` (its next offset),
    /// and wait for durability; else [`LogError::EndMoved`] and nothing is written. A writer
    /// that checked its input against a state built from the log up to `expected_end` appends
    /// only on top of that state.
    pub fn append_at(&self, expected_end: u64, records: &[Record]) -> Result<Appended> {
        self.append_batch(records, 0, 0, Some(expected_end))?.wait()
    }

    /// Write `records` as one batch and return without waiting for durability: the caller may
    /// pipeline several appends and `wait` on each (in any order).
    pub fn append_pending(&self, records: &[Record], producer_id: u64, base_sequence: u32) -> Result<PendingAppend> {
        self.append_batch(records, producer_id, base_sequence, None)
    }

    fn append_batch(&self, records: &[Record], producer_id: u64, base_sequence: u32, expected_end: Option<u64>) -> Result<PendingAppend> {
        self.check_fenced()?;
        let now = now_ms();
        let mut encoded = Vec::with_capacity(batch::HEADER_BYTES + records.iter().map(|r| r.payload_bytes() + 16).sum::<usize>());
        batch::encode(records, now, producer_id, base_sequence, &mut encoded)?;
        let header = BatchHeader::parse(&encoded).expect("a batch we just encoded parses");
        let shared = &self.shared;
        let mut writer = shared.writer.lock();
        if let Some(expected) = expected_end.filter(|&expected| expected != writer.next_offset) {
            return Err(LogError::EndMoved { expected, end: writer.next_offset });
        }
        if producer_id != 0 {
            match writer.producers.check(producer_id, base_sequence, header.record_count) {
                SequenceCheck::Append => {}
                SequenceCheck::Duplicate(cached) => {
                    let appended = Appended { base_offset: cached.base_offset, last_offset: cached.last_offset, duplicate: true };
                    return Ok(PendingAppend { log: self.clone(), appended });
                }
                SequenceCheck::OutOfOrder { expected } => {
                    return Err(LogError::OutOfOrderSequence { producer_id, got: base_sequence, expected });
                }
            }
        }
        if writer.position > 0 && self.should_roll(&writer, encoded.len() as u64, now) {
            self.roll(&mut writer, now)?;
        }
        let base_offset = writer.next_offset;
        batch::set_base_offset(&mut encoded, base_offset);
        let header = BatchHeader { base_offset, ..header };
        let position = writer.position;
        let active = writer.active.clone();
        if let Err(error) = std::os::unix::fs::FileExt::write_all_at(&active.file, &encoded, position) {
            // Cut whatever part was written so the next append does not land behind garbage.
            if let Err(cut) = active.file.set_len(position) {
                self.fence(format!("could not cut a failed write at byte {position} of {}: {cut}", active.path.display()));
            }
            return Err(LogError::Io { context: format!("appending to {}", active.path.display()), source: error });
        }
        let bytes = encoded.len() as u64;
        active.index.lock().note_batch(active.base_offset, position, bytes, &header, shared.config.index_interval_bytes);
        writer.position += bytes;
        writer.next_offset = header.last_offset() + 1;
        active.set_size(writer.position);
        let last_offset = header.last_offset();
        if producer_id != 0 {
            let last_sequence = base_sequence.wrapping_add(header.record_count - 1);
            let cached = CachedBatch { base_sequence, last_sequence, base_offset, last_offset };
            writer.producers.record(producer_id, cached, now);
        }
        match shared.config.durability {
            Durability::Always => {}
            Durability::Interval(_) | Durability::Never => {
                shared.unsynced.store(true, Ordering::Release);
                self.publish_high_watermark(writer.next_offset);
            }
        }
        drop(writer);
        Ok(PendingAppend { log: self.clone(), appended: Appended { base_offset, last_offset, duplicate: false } })
    }

    fn should_roll(&self, writer: &Writer, incoming: u64, now: i64) -> bool {
        let config = &self.shared.config;
        writer.position + incoming > config.segment_bytes_max
            || config.segment_ms_max.is_some_and(|ms| now - writer.active.created_ms >= ms as i64)
    }

    /// Seal the active segment (sync it, write its index) and start a new one.
    fn roll(&self, writer: &mut Writer, now: i64) -> Result<()> {
        let shared = &self.shared;
        let old = writer.active.clone();
        // Sealed segments are always synced, whatever the class: recovery trusts their index
        // and scans only the tail.
        if let Err(error) = old.file.sync_data() {
            let reason = format!("fsync of {} failed while sealing it: {error}", old.path.display());
            self.fence(reason.clone());
            return Err(LogError::Io { context: reason, source: error });
        }
        let index_bytes = old.index.lock().encode(writer.position, &writer.producers);
        segment::write_atomically(&shared.dir, &segment::index_path(&shared.dir, old.base_offset), &index_bytes)
            .context(|| format!("sealing {}", old.path.display()))?;
        let new = Arc::new(Segment::create(&shared.dir, writer.next_offset, now).context(|| format!("creating a segment in {}", shared.dir.display()))?);
        segment::sync_dir(&shared.dir).context(|| format!("syncing {}", shared.dir.display()))?;
        shared.segments.write().push(new.clone());
        writer.active = new;
        writer.position = 0;
        self.publish_high_watermark(writer.next_offset);
        Ok(())
    }

    fn publish_high_watermark(&self, offset: u64) {
        let shared = &self.shared;
        // SeqCst pairs with the waiter count: a waiter either sees the new mark before it
        // sleeps, or is counted here and woken.
        shared.high_watermark.fetch_max(offset, Ordering::SeqCst);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        let shared = &self.shared;
        if shared.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = shared.data_lock.lock();
            shared.data_ready.notify_all();
        }
    }

    /// Block until every offset below `end` is durable (group commit under `Always`).
    ///
    /// Leader and followers: whoever finds no sync in progress becomes the leader, reads how
    /// far the writer has got, syncs, publishes the new durable mark and wakes everyone.
    /// Appenders that arrive while a sync runs wait on the condition variable without holding
    /// anything, keep writing in the meantime (their appends are already in the file), and the
    /// first of them to find its offsets still not durable leads the next sync, which covers
    /// every write made during the previous one.
    fn wait_durable(&self, end: u64) -> Result<()> {
        let shared = &self.shared;
        if shared.config.durability != Durability::Always {
            return Ok(());
        }
        loop {
            if shared.high_watermark.load(Ordering::SeqCst) >= end {
                return Ok(());
            }
            self.check_fenced()?;
            if let Some(sync) = shared.sync_lock.try_lock() {
                if shared.high_watermark.load(Ordering::SeqCst) >= end {
                    return Ok(());
                }
                let (active, target) = {
                    let writer = shared.writer.lock();
                    (writer.active.clone(), writer.next_offset)
                };
                let synced = active.file.sync_data();
                if let Err(error) = synced {
                    // After a failed fsync the page cache may have dropped the dirty pages:
                    // nothing written since the last good sync can be trusted, so stop here.
                    let reason = format!("fsync of {} failed: {error}", active.path.display());
                    self.fence(reason.clone());
                    drop(sync);
                    self.wake_waiters();
                    return Err(LogError::Io { context: reason, source: error });
                }
                shared.high_watermark.fetch_max(target, Ordering::SeqCst);
                drop(sync);
                self.wake_waiters();
                continue;
            }
            // A sync is running: wait for it to publish, then look again.
            shared.waiters.fetch_add(1, Ordering::SeqCst);
            let mut guard = shared.data_lock.lock();
            while shared.high_watermark.load(Ordering::SeqCst) < end && shared.sync_lock.is_locked() {
                // The timeout only bounds a wake-up lost to a leader that errored out early.
                shared.data_ready.wait_for(&mut guard, Duration::from_millis(5));
            }
            drop(guard);
            shared.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Sync everything written so far, whatever the durability class.
    pub fn flush(&self) -> Result<()> {
        self.check_fenced()?;
        let shared = &self.shared;
        let _sync = shared.sync_lock.lock();
        let (active, target) = {
            let writer = shared.writer.lock();
            (writer.active.clone(), writer.next_offset)
        };
        shared.unsynced.store(false, Ordering::Release);
        if let Err(error) = active.file.sync_data() {
            // As in `wait_durable`: a later fsync may succeed without the lost pages.
            let reason = format!("fsync of {} failed: {error}", active.path.display());
            self.fence(reason.clone());
            return Err(LogError::Io { context: reason, source: error });
        }
        self.publish_high_watermark(target);
        Ok(())
    }

    /// Offset of the first record still held.
    pub fn start_offset(&self) -> u64 {
        self.shared.start_offset.load(Ordering::Acquire)
    }

    /// Records below this offset are readable.
    pub fn high_watermark(&self) -> u64 {
        self.shared.high_watermark.load(Ordering::SeqCst)
    }

    /// Total bytes of the data files.
    pub fn size_bytes(&self) -> u64 {
        self.shared.segments.read().iter().map(|s| s.size()).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.shared.segments.read().len()
    }

    /// Block until a record at `offset` is readable or `timeout` passes; true if readable.
    pub fn wait_for_data(&self, offset: u64, timeout: Duration) -> bool {
        let shared = &self.shared;
        if self.high_watermark() > offset {
            return true;
        }
        let deadline = Instant::now() + timeout;
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = shared.data_lock.lock();
        let ready = loop {
            if self.high_watermark() > offset || shared.closed.load(Ordering::Acquire) {
                break self.high_watermark() > offset;
            }
            if shared.data_ready.wait_until(&mut guard, deadline).timed_out() {
                break self.high_watermark() > offset;
            }
        };
        drop(guard);
        shared.waiters.fetch_sub(1, Ordering::SeqCst);
        ready
    }

    /// Read records from `from`, at most `max_records` and about `max_bytes` (at least one batch
    /// is returned when one is there, however large). Never returns a record that failed its
    /// checksum: corruption fences the partition and is reported.
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        self.check_fenced()?;
        let high_watermark = self.high_watermark();
        let start = self.start_offset();
        if from < start || from > high_watermark {
            return Err(LogError::OffsetOutOfRange { requested: from, start, end: high_watermark });
        }
        let mut out = Vec::new();
        if from == high_watermark || max_records == 0 {
            return Ok(out);
        }
        let segments = self.segments_from(from);
        let mut budget = max_bytes.max(1);
        for segment in segments {
            if segment.base_offset >= high_watermark || out.len() >= max_records || budget == 0 {
                break;
            }
            let result = self.read_segment(&segment, from, high_watermark, max_records, &mut budget, &mut out);
            if let Err(error) = result {
                return Err(self.fence_on_corruption(error));
            }
        }
        Ok(out)
    }

    fn segments_from(&self, from: u64) -> Vec<Arc<Segment>> {
        let segments = self.shared.segments.read();
        let i = segments.partition_point(|s| s.base_offset <= from).saturating_sub(1);
        segments[i..].to_vec()
    }

    fn read_segment(&self, segment: &Segment, from: u64, below: u64, max_records: usize, budget: &mut usize, out: &mut Vec<StoredRecord>) -> Result<()> {
        let size = segment.size();
        let mut position = segment.position_for(from);
        let mut previous_last: Option<u64> = None;
        while position < size && out.len() < max_records && *budget > 0 {
            let want = (*budget).clamp(batch::HEADER_BYTES, READ_CHUNK_BYTES).min((size - position) as usize);
            // Frozen once: every record returned is a slice of it, with no copy.
            let mut chunk = segment::read_at(&segment.file, position, want).context(|| format!("reading {}", segment.path.display()))?.freeze();
            let mut used = 0usize;
            loop {
                let rest = &chunk[used..];
                if rest.len() < batch::HEADER_BYTES {
                    break;
                }
                let header = BatchHeader::parse(rest).map_err(|e| corrupt(segment, position + used as u64, e))?;
                let total = header.total_bytes();
                if rest.len() < total {
                    if used == 0 {
                        // One batch larger than the chunk: read it whole.
                        if position + total as u64 > size {
                            return Err(corrupt(segment, position, DecodeError::Truncated { needed: total, available: (size - position) as usize }));
                        }
                        chunk = segment::read_at(&segment.file, position, total).context(|| format!("reading {}", segment.path.display()))?.freeze();
                        continue;
                    }
                    break;
                }
                // Every batch walked over is verified, skipped ones too: its offsets decide
                // what is skipped, and a damaged one must not silently hide records.
                batch::verify(&header, rest).map_err(|e| corrupt(segment, position + used as u64, e))?;
                if header.base_offset >= below {
                    return Ok(());
                }
                if previous_last.is_some_and(|p| header.base_offset <= p) || header.base_offset < segment.base_offset {
                    return Err(corrupt(segment, position + used as u64, DecodeError::Malformed("batch offsets go backwards")));
                }
                previous_last = Some(header.last_offset());
                if header.last_offset() >= from {
                    let batch_bytes = chunk.slice(used..used + total);
                    let before = out.len();
                    batch::decode_records(&header, &batch_bytes, from, below, out).map_err(|e| corrupt(segment, position + used as u64, e))?;
                    if out.len() > max_records {
                        out.truncate(max_records);
                    }
                    if out.len() > before {
                        *budget = budget.saturating_sub(total);
                    }
                }
                used += total;
                if out.len() >= max_records || *budget == 0 {
                    return Ok(());
                }
            }
            if used == 0 {
                return Err(corrupt(segment, position, DecodeError::Malformed("no progress while reading")));
            }
            position += used as u64;
        }
        Ok(())
    }

    /// The first offset whose record has a timestamp ≥ `timestamp_ms`, or `None` if none has.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        self.check_fenced()?;
        let segments: Vec<Arc<Segment>> = self.shared.segments.read().clone();
        let start = self.start_offset();
        for segment in segments.iter().filter(|s| s.max_timestamp() >= timestamp_ms) {
            let mut from = segment.scan_start_for_time(timestamp_ms).max(start);
            let end = segment.next_offset().min(self.high_watermark());
            while from < end {
                let records = self.read(from, 1000, READ_CHUNK_BYTES)?;
                let Some(last) = records.last() else { break };
                if let Some(hit) = records.iter().find(|r| r.timestamp_ms >= timestamp_ms) {
                    return Ok(Some(hit.offset));
                }
                from = last.offset + 1;
            }
        }
        Ok(None)
    }

    /// Delete sealed segments beyond the retention limits. The active segment is never deleted.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport> {
        self.check_fenced()?;
        let shared = &self.shared;
        let _maintenance = shared.maintenance.lock();
        let mut report = RetentionReport::default();
        loop {
            let victim = {
                let segments = shared.segments.read();
                if segments.len() < 2 {
                    None
                } else {
                    let oldest = &segments[0];
                    let total: u64 = segments.iter().map(|s| s.size()).sum();
                    let too_old = shared.config.retention_ms.is_some_and(|ms| oldest.max_timestamp() < now_ms - ms as i64);
                    let too_big = shared.config.retention_bytes.is_some_and(|max| total > max);
                    (too_old || too_big).then(|| oldest.clone())
                }
            };
            let Some(victim) = victim else { break };
            let next_start = {
                let mut segments = shared.segments.write();
                segments.remove(0);
                segments[0].base_offset
            };
            shared.start_offset.store(next_start, Ordering::Release);
            report.segments_deleted += 1;
            report.bytes_deleted += victim.size();
            remove_segment_files(&shared.dir, victim.base_offset)?;
        }
        if report.segments_deleted > 0 {
            segment::sync_dir(&shared.dir).context(|| format!("syncing {}", shared.dir.display()))?;
        }
        report.start_offset = self.start_offset();
        Ok(report)
    }

    /// Drop every sealed segment that lies wholly below `offset` (for internal state logs
    /// that have checkpointed). The active segment is kept.
    pub fn truncate_before(&self, offset: u64) -> Result<usize> {
        self.check_fenced()?;
        let shared = &self.shared;
        let _maintenance = shared.maintenance.lock();
        let mut removed = Vec::new();
        {
            let mut segments = shared.segments.write();
            while segments.len() > 1 && segments[1].base_offset <= offset {
                removed.push(segments.remove(0));
            }
            if !removed.is_empty() {
                shared.start_offset.store(segments[0].base_offset, Ordering::Release);
            }
        }
        for segment in &removed {
            remove_segment_files(&shared.dir, segment.base_offset)?;
        }
        Ok(removed.len())
    }

    /// Keep only the newest record of each key in sealed segments, preserving offsets.
    /// Unkeyed records are kept. Tombstones are kept for `tombstone_retention_ms`.
    pub fn compact(&self, now_ms: i64) -> Result<CompactionReport> {
        self.check_fenced()?;
        let shared = &self.shared;
        let _maintenance = shared.maintenance.lock();
        let segments: Vec<Arc<Segment>> = shared.segments.read().clone();
        let mut report = CompactionReport::default();
        if segments.len() < 2 {
            return Ok(report);
        }
        // Newest offset of every key, over the whole readable log.
        let mut latest: HashMap<Bytes, u64> = HashMap::new();
        let mut from = self.start_offset();
        let high_watermark = self.high_watermark();
        while from < high_watermark {
            let records = self.read(from, 10_000, 8 * READ_CHUNK_BYTES)?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for record in records {
                if let Some(key) = record.key {
                    latest.insert(key, record.offset);
                }
            }
        }
        let sealed = &segments[..segments.len() - 1];
        for segment in sealed {
            let end = segment.next_offset();
            let mut records = Vec::new();
            let mut at = segment.base_offset.max(self.start_offset());
            while at < end {
                let mut budget = 8 * READ_CHUNK_BYTES;
                let before = records.len();
                self.read_segment(segment, at, end, usize::MAX, &mut budget, &mut records).map_err(|e| self.fence_on_corruption(e))?;
                let Some(last) = records.last().filter(|_| records.len() > before) else { break };
                at = last.offset + 1;
            }
            let tombstones_expire = segment.max_timestamp() < now_ms - shared.config.tombstone_retention_ms as i64;
            let keep: Vec<&StoredRecord> = records
                .iter()
                .filter(|r| match &r.key {
                    None => true,
                    Some(key) => latest.get(key) == Some(&r.offset) && !(r.value.is_none() && tombstones_expire),
                })
                .collect();
            if keep.len() == records.len() {
                continue;
            }
            report.bytes_before += segment.size();
            report.records_removed += (records.len() - keep.len()) as u64;
            let replacement = rewrite_segment(&shared.dir, segment, &keep, shared.config.index_interval_bytes, end)?;
            report.bytes_after += replacement.size();
            report.segments_rewritten += 1;
            let mut list = shared.segments.write();
            if let Some(slot) = list.iter_mut().find(|s| s.base_offset == segment.base_offset) {
                *slot = Arc::new(replacement);
            }
        }
        Ok(report)
    }

    fn check_fenced(&self) -> Result<()> {
        match &*self.shared.fenced.read() {
            Some(reason) => Err(LogError::Fenced(reason.clone())),
            None => Ok(()),
        }
    }

    /// The reason this partition is fenced, if it is.
    pub fn fenced(&self) -> Option<String> {
        self.shared.fenced.read().clone()
    }

    fn fence(&self, reason: String) {
        let mut fenced = self.shared.fenced.write();
        if fenced.is_none() {
            *fenced = Some(reason);
        }
    }

    fn fence_on_corruption(&self, error: LogError) -> LogError {
        if let LogError::Corrupt { .. } = &error {
            self.fence(error.to_string());
        }
        error
    }

    /// Sync and stop the background flusher. Also done on drop of the last clone.
    pub fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let _guard = self.shared.data_lock.lock();
        self.shared.data_ready.notify_all();
        drop(_guard);
        if self.fenced().is_none() { self.flush() } else { Ok(()) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.fenced.read().is_none() {
            let _ = self.writer.lock().active.file.sync_data();
        }
    }
}

fn spawn_flusher(shared: Weak<Shared>, every: Duration) {
    std::thread::Builder::new()
        .name("tributary-log-flush".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(shared) = shared.upgrade() else { return };
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                if shared.unsynced.swap(false, Ordering::AcqRel) {
                    let _ = Log { shared }.flush();
                }
            }
        })
        .expect("spawning the log flusher");
}

fn corrupt(segment: &Segment, position: u64, error: DecodeError) -> LogError {
    LogError::Corrupt { path: segment.path.clone(), position, reason: error.to_string() }
}

fn remove_segment_files(dir: &Path, base_offset: u64) -> Result<()> {
    for path in [segment::data_path(dir, base_offset), segment::index_path(dir, base_offset)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::Io { context: format!("removing {}", path.display()), source: e }),
        }
    }
    Ok(())
}

/// Write `keep` (records of `old`, offsets preserved) as a new file and swap it in atomically.
fn rewrite_segment(dir: &Path, old: &Segment, keep: &[&StoredRecord], interval_bytes: u64, next_offset: u64) -> Result<Segment> {
    const RECORDS_PER_BATCH: usize = 1000;
    let mut data = Vec::new();
    let mut index = SegmentIndex::empty(old.base_offset);
    for chunk in keep.chunks(RECORDS_PER_BATCH) {
        let position = data.len();
        batch::encode_stored(chunk, 0, 0, &mut data)?;
        let header = BatchHeader::parse(&data[position..]).expect("a batch we just encoded parses");
        index.note_batch(old.base_offset, position as u64, (data.len() - position) as u64, &header, interval_bytes);
    }
    index.next_offset = next_offset;
    // The producer table lives with the newest sealed segment that has one; a compacted
    // segment keeps what its old index said.
    let producers = std::fs::read(segment::index_path(dir, old.base_offset))
        .ok()
        .and_then(|bytes| SegmentIndex::decode(&bytes).ok())
        .map(|(_, _, producers)| producers)
        .unwrap_or_default();
    let tmp = old.path.with_extension("compacting");
    segment::write_atomically(dir, &tmp, &data).context(|| format!("writing {}", tmp.display()))?;
    segment::write_atomically(dir, &segment::index_path(dir, old.base_offset), &index.encode(data.len() as u64, &producers))
        .context(|| format!("writing the index of {}", old.path.display()))?;
    std::fs::rename(&tmp, &old.path).context(|| format!("replacing {}", old.path.display()))?;
    segment::sync_dir(dir).context(|| format!("syncing {}", dir.display()))?;
    Segment::open(old.path.clone(), old.base_offset, data.len() as u64, index, now_ms()).context(|| format!("reopening {}", old.path.display()))
}

/// Open every segment of `dir`: trust sealed segments whose index checks out (rebuilding those
/// whose index does not), scan the tail, cut a torn tail, refuse mid-file corruption.
fn recover(dir: &Path, config: &LogConfig) -> Result<(Vec<Arc<Segment>>, ProducerTable, RecoveryReport)> {
    let mut bases: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir).context(|| format!("listing {}", dir.display()))? {
        let entry = entry.context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(base) = stem.parse::<u64>() {
                bases.push(base);
            }
        } else if name.ends_with(".tmp") || name.ends_with(".compacting") {
            // Left by a crash before its rename: never part of the log.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    bases.sort_unstable();
    let now = now_ms();
    let mut report = RecoveryReport::default();
    if bases.is_empty() {
        let segment = Segment::create(dir, 0, now).context(|| format!("creating a segment in {}", dir.display()))?;
        segment::sync_dir(dir).context(|| format!("syncing {}", dir.display()))?;
        report.segments = 1;
        return Ok((vec![Arc::new(segment)], ProducerTable::default(), report));
    }
    let mut segments = Vec::with_capacity(bases.len());
    let mut producers = ProducerTable::default();
    let mut expected_base: Option<u64> = None;
    let tail = *bases.last().expect("not empty");
    for &base in &bases {
        let path = segment::data_path(dir, base);
        if let Some(expected) = expected_base.filter(|e| *e != base) {
            // Each segment starts where the previous one ended (compaction keeps that).
            let reason = format!("segment starts at offset {base} but the previous one ends at {expected}: a segment is missing or overlaps");
            return Err(LogError::Corrupt { path, position: 0, reason });
        }
        let file_len = std::fs::metadata(&path).context(|| format!("reading {}", path.display()))?.len();
        let sealed = base != tail;
        let trusted = if sealed {
            std::fs::read(segment::index_path(dir, base)).ok().and_then(|bytes| SegmentIndex::decode(&bytes).ok()).filter(|(bytes, index, _)| {
                *bytes == file_len && index.next_offset >= base && index.offsets.last().is_none_or(|e| u64::from(e.position) < file_len.max(1))
            })
        } else {
            None
        };
        let segment = match trusted {
            Some((size, index, table)) => {
                producers = table;
                Segment::open(path.clone(), base, size, index, now).context(|| format!("opening {}", path.display()))?
            }
            None => {
                let file = File::options().read(true).write(true).open(&path).context(|| format!("opening {}", path.display()))?;
                let scan = scan_segment(&file, &path, base, file_len, config.index_interval_bytes, &mut producers)?;
                if scan.valid_bytes < file_len {
                    if sealed {
                        return Err(LogError::Corrupt { path, position: scan.valid_bytes, reason: format!("sealed segment is damaged: {}", scan.stop_reason) });
                    }
                    if let Some(later) = find_valid_batch_after(&file, scan.valid_bytes, file_len, scan.index.next_offset) {
                        return Err(LogError::Corrupt {
                            path,
                            position: scan.valid_bytes,
                            reason: format!("{}, but a valid batch follows at byte {later}: this is not a torn write", scan.stop_reason),
                        });
                    }
                    file.set_len(scan.valid_bytes).context(|| format!("cutting the torn tail of {}", path.display()))?;
                    file.sync_all().context(|| format!("syncing {}", path.display()))?;
                    report.truncated_bytes += file_len - scan.valid_bytes;
                }
                if sealed {
                    report.rebuilt_indexes += 1;
                    let bytes = scan.index.encode(scan.valid_bytes, &producers);
                    segment::write_atomically(dir, &segment::index_path(dir, base), &bytes).context(|| format!("rewriting the index of {}", path.display()))?;
                }
                drop(file);
                Segment::open(path.clone(), base, scan.valid_bytes, scan.index, now).context(|| format!("opening {}", path.display()))?
            }
        };
        expected_base = Some(segment.next_offset());
        segments.push(Arc::new(segment));
    }
    report.segments = segments.len();
    report.next_offset = segments.last().map_or(0, |s| s.next_offset());
    Ok((segments, producers, report))
}

struct Scan {
    valid_bytes: u64,
    index: SegmentIndex,
    stop_reason: String,
}

/// Walk the batches of a segment file, verifying each, until the end or the first bad one.
fn scan_segment(file: &File, path: &Path, base: u64, file_len: u64, interval_bytes: u64, producers: &mut ProducerTable) -> Result<Scan> {
    let mut index = SegmentIndex::empty(base);
    let mut position = 0u64;
    let mut stop_reason = String::new();
    let mut expected = base;
    'scan: while position < file_len {
        let want = (file_len - position).min(READ_CHUNK_BYTES as u64 * 4) as usize;
        let mut chunk = segment::read_at(file, position, want).context(|| format!("reading {}", path.display()))?;
        let mut used = 0usize;
        loop {
            let rest = &chunk[used..];
            if rest.is_empty() {
                break;
            }
            let header = match BatchHeader::parse(rest) {
                Ok(h) => h,
                Err(DecodeError::Truncated { .. }) if used > 0 => break,
                Err(e) => {
                    stop_reason = e.to_string();
                    position += used as u64;
                    break 'scan;
                }
            };
            let total = header.total_bytes();
            if rest.len() < total {
                if used > 0 {
                    break;
                }
                if position + total as u64 <= file_len {
                    // One batch larger than the chunk (batches reach BATCH_BYTES_MAX): read it whole.
                    chunk = segment::read_at(file, position, total).context(|| format!("reading {}", path.display()))?;
                    continue;
                }
                stop_reason = format!("batch of {total} bytes runs past the end of the file");
                break 'scan;
            }
            if let Err(e) = batch::verify(&header, rest) {
                stop_reason = e.to_string();
                position += used as u64;
                break 'scan;
            }
            // Compacted segments keep original offsets, so gaps are fine; going back is not.
            if header.base_offset < expected {
                stop_reason = format!("batch offset {} goes back from {expected}", header.base_offset);
                position += used as u64;
                break 'scan;
            }
            index.note_batch(base, position + used as u64, total as u64, &header, interval_bytes);
            if header.producer_id != 0 {
                let last_sequence = header.base_sequence.wrapping_add(header.record_count - 1);
                let cached = CachedBatch { base_sequence: header.base_sequence, last_sequence, base_offset: header.base_offset, last_offset: header.last_offset() };
                producers.record(header.producer_id, cached, header.max_timestamp);
            }
            expected = header.last_offset() + 1;
            used += total;
        }
        position += used as u64;
    }
    Ok(Scan { valid_bytes: position.min(file_len), index, stop_reason })
}

/// After a bad batch at `from`, look for any later batch that checks out and continues the
/// offsets: if there is one, the damage is not a torn tail.
fn find_valid_batch_after(file: &File, from: u64, file_len: u64, expected_offset: u64) -> Option<u64> {
    let bytes = segment::read_at(file, from, (file_len - from) as usize).ok()?;
    (1..bytes.len().saturating_sub(batch::HEADER_BYTES - 1)).find_map(|i| {
        let header = BatchHeader::parse(&bytes[i..]).ok()?;
        (header.base_offset >= expected_offset && batch::verify(&header, &bytes[i..]).is_ok()).then_some(from + i as u64)
    })
}
