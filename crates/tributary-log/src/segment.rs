//! One segment: a data file of batches (`<base offset>.log`) and, once sealed, its index file
//! (`<base offset>.index`) holding the sparse offset index, the time index, the segment's
//! length and next offset, and the idempotent-producer table as of its end.
//!
//! The active (tail) segment keeps its indexes in memory only; they are rebuilt by the recovery
//! scan, which is why recovery reads the tail and nothing else.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::producers::{ProducerTable, take_u32, take_u64};

const INDEX_MAGIC: &[u8; 8] = b"TRBIDX01";

/// One entry of the sparse offset index: the batch starting at `position` has base offset
/// `base_offset + relative_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

/// One entry of the time index: every record before `relative_offset` has a timestamp ≤
/// `max_timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeEntry {
    pub max_timestamp: i64,
    pub relative_offset: u32,
}

#[derive(Debug, Default, Clone)]
pub struct SegmentIndex {
    pub offsets: Vec<OffsetEntry>,
    pub times: Vec<TimeEntry>,
    /// Offset after the last record of the segment.
    pub next_offset: u64,
    pub first_timestamp: Option<i64>,
    pub max_timestamp: i64,
    bytes_since_entry: u64,
}

pub struct Segment {
    pub base_offset: u64,
    pub path: PathBuf,
    pub file: File,
    /// Bytes of complete batches in the file; readers never read past it.
    size: AtomicU64,
    pub index: Mutex<SegmentIndex>,
    /// Wall clock when the segment was created, for roll by age.
    pub created_ms: i64,
}

pub fn data_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.log"))
}

pub fn index_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.index"))
}

impl Segment {
    pub fn create(dir: &Path, base_offset: u64, now_ms: i64) -> std::io::Result<Segment> {
        let path = data_path(dir, base_offset);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        let index = SegmentIndex { next_offset: base_offset, max_timestamp: i64::MIN, ..SegmentIndex::default() };
        Ok(Segment { base_offset, path, file, size: AtomicU64::new(0), index: Mutex::new(index), created_ms: now_ms })
    }

    pub fn open(path: PathBuf, base_offset: u64, size: u64, index: SegmentIndex, now_ms: i64) -> std::io::Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let created_ms = index.first_timestamp.unwrap_or(now_ms);
        Ok(Segment { base_offset, path, file, size: AtomicU64::new(size), index: Mutex::new(index), created_ms })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub fn next_offset(&self) -> u64 {
        self.index.lock().next_offset
    }

    pub fn max_timestamp(&self) -> i64 {
        self.index.lock().max_timestamp
    }

    /// The file position to start reading at to find `offset`.
    pub fn position_for(&self, offset: u64) -> u64 {
        let index = self.index.lock();
        let relative = offset.saturating_sub(self.base_offset).min(u64::from(u32::MAX)) as u32;
        let i = index.offsets.partition_point(|e| e.relative_offset <= relative);
        if i == 0 { 0 } else { u64::from(index.offsets[i - 1].position) }
    }

    /// The offset to start scanning from to find the first record with timestamp ≥ `target`.
    pub fn scan_start_for_time(&self, target: i64) -> u64 {
        let index = self.index.lock();
        let i = index.times.partition_point(|e| e.max_timestamp < target);
        if i == 0 { self.base_offset } else { self.base_offset + u64::from(index.times[i - 1].relative_offset) }
    }
}

impl SegmentIndex {
    pub fn empty(base_offset: u64) -> SegmentIndex {
        SegmentIndex { next_offset: base_offset, max_timestamp: i64::MIN, ..SegmentIndex::default() }
    }

    /// Note a batch written at `position` with `bytes` bytes.
    pub fn note_batch(&mut self, segment_base: u64, position: u64, bytes: u64, header: &crate::batch::BatchHeader, interval_bytes: u64) {
        let relative = (header.base_offset - segment_base) as u32;
        if self.offsets.is_empty() || self.bytes_since_entry >= interval_bytes {
            self.offsets.push(OffsetEntry { relative_offset: relative, position: position as u32 });
            if self.max_timestamp != i64::MIN && self.times.last().is_none_or(|t| t.max_timestamp < self.max_timestamp) {
                self.times.push(TimeEntry { max_timestamp: self.max_timestamp, relative_offset: relative });
            }
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += bytes;
        self.first_timestamp.get_or_insert(header.first_timestamp);
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        self.next_offset = header.last_offset() + 1;
    }

    /// The index file: magic, length and next offset of the segment, timestamps, entries,
    /// producer table, then a CRC-32C of everything before it.
    pub fn encode(&self, segment_bytes: u64, producers: &ProducerTable) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.offsets.len() * 8 + self.times.len() * 12);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&segment_bytes.to_le_bytes());
        out.extend_from_slice(&self.next_offset.to_le_bytes());
        out.extend_from_slice(&self.first_timestamp.unwrap_or(i64::MIN).to_le_bytes());
        out.extend_from_slice(&self.max_timestamp.to_le_bytes());
        out.extend_from_slice(&(self.offsets.len() as u32).to_le_bytes());
        for e in &self.offsets {
            out.extend_from_slice(&e.relative_offset.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
        }
        out.extend_from_slice(&(self.times.len() as u32).to_le_bytes());
        for e in &self.times {
            out.extend_from_slice(&e.max_timestamp.to_le_bytes());
            out.extend_from_slice(&e.relative_offset.to_le_bytes());
        }
        producers.encode(&mut out);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse an index file; `Err` says why it cannot be trusted.
    pub fn decode(bytes: &[u8]) -> Result<(u64, SegmentIndex, ProducerTable), &'static str> {
        let (body, crc) = bytes.split_at_checked(bytes.len().saturating_sub(4)).ok_or("too short")?;
        if bytes.len() < 4 || crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().map_err(|_| "too short")?) {
            return Err("checksum mismatch");
        }
        let mut rest = body;
        let magic = rest.split_at_checked(8).ok_or("too short")?;
        if magic.0 != INDEX_MAGIC {
            return Err("bad magic");
        }
        rest = magic.1;
        let bad = "truncated";
        let segment_bytes = take_u64(&mut rest).ok_or(bad)?;
        let next_offset = take_u64(&mut rest).ok_or(bad)?;
        let first = take_u64(&mut rest).ok_or(bad)? as i64;
        let max_timestamp = take_u64(&mut rest).ok_or(bad)? as i64;
        let n = take_u32(&mut rest).ok_or(bad)? as usize;
        if n > rest.len() / 8 {
            return Err(bad);
        }
        let mut offsets = Vec::with_capacity(n);
        for _ in 0..n {
            offsets.push(OffsetEntry { relative_offset: take_u32(&mut rest).ok_or(bad)?, position: take_u32(&mut rest).ok_or(bad)? });
        }
        let n = take_u32(&mut rest).ok_or(bad)? as usize;
        if n > rest.len() / 12 {
            return Err(bad);
        }
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            times.push(TimeEntry { max_timestamp: take_u64(&mut rest).ok_or(bad)? as i64, relative_offset: take_u32(&mut rest).ok_or(bad)? });
        }
        let producers = ProducerTable::decode(&mut rest).ok_or(bad)?;
        if !rest.is_empty() {
            return Err("trailing bytes");
        }
        let first_timestamp = (first != i64::MIN).then_some(first);
        let index = SegmentIndex { offsets, times, next_offset, first_timestamp, max_timestamp, bytes_since_entry: 0 };
        Ok((segment_bytes, index, producers))
    }
}

/// Write `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the folder.
pub fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Read exactly `len` bytes at `position`.
pub fn read_at(file: &File, position: u64, len: usize) -> std::io::Result<bytes::BytesMut> {
    let mut buf = bytes::BytesMut::zeroed(len);
    file.read_exact_at(&mut buf, position)?;
    Ok(buf)
}
