//! Cache snapshots on disk.
//!
//! ```text
//! file  := magic "TRBCACHE" | version u32 LE | frame* | end frame
//! frame := payload_len u64 LE | crc32c(payload) u32 LE | payload (postcard `Frame`)
//! ```
//!
//! A snapshot is written to `<path>.tmp`, fsynced, renamed over `<path>`, and the directory is
//! fsynced, so `<path>` is always a whole snapshot or the previous one. Loading reads the whole
//! file and verifies every frame, the end frame and its entry count before applying anything.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tributary_core::limits::{CACHE_COLLECTION_LEN_MAX, CACHE_KEY_BYTES_MAX, CACHE_MEMBER_BYTES_MAX, CACHE_VALUE_BYTES_MAX};

use super::shard::{Entry, Value, is_expired};
use super::sorted_set::SortedSet;
use super::{Cache, CacheError, CacheResult, EvictionPolicy};

const MAGIC: &[u8; 8] = b"TRBCACHE";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 12;
const FRAME_HEADER_BYTES: usize = 12;
/// Entries per frame: bounds the memory of one encoded frame on write.
const FRAME_ENTRIES_MAX: usize = 1024;

/// What [`Cache::snapshot_to`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotReport {
    pub entries: u64,
    pub bytes: u64,
}

/// What [`Cache::load_from`] restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: u64,
    /// Entries in the file whose deadline had passed by the time of loading.
    pub expired: u64,
}

#[derive(Serialize, Deserialize)]
struct SnapshotEntry {
    key: Bytes,
    expires_at_ms: Option<i64>,
    value: SnapshotValue,
}

#[derive(Serialize, Deserialize)]
enum SnapshotValue {
    Str(Bytes),
    Int(i64),
    Hash(Vec<(Bytes, Bytes)>),
    ZSet(Vec<(Bytes, f64)>),
}

#[derive(Serialize, Deserialize)]
enum Frame {
    Entries(Vec<SnapshotEntry>),
    End { entries: u64 },
}

impl SnapshotEntry {
    fn of(key: &Bytes, entry: &Entry) -> SnapshotEntry {
        let value = match &entry.value {
            Value::Str(b) => SnapshotValue::Str(b.clone()),
            Value::Int(n) => SnapshotValue::Int(*n),
            Value::Hash(h) => SnapshotValue::Hash(h.iter().map(|(f, v)| (f.clone(), v.clone())).collect()),
            Value::ZSet(z) => SnapshotValue::ZSet(z.iter().map(|(m, s)| (m.clone(), s)).collect()),
        };
        SnapshotEntry { key: key.clone(), expires_at_ms: entry.expires_at_ms, value }
    }

    /// The value, or why it breaks a limit or an invariant.
    fn into_value(self) -> Result<(Bytes, Option<i64>, Value), String> {
        let key = self.key;
        if key.len() > CACHE_KEY_BYTES_MAX {
            return Err(format!("a key of {} bytes is over CACHE_KEY_BYTES_MAX", key.len()));
        }
        let member_ok = |m: &Bytes| m.len() <= CACHE_MEMBER_BYTES_MAX;
        let value = match self.value {
            SnapshotValue::Str(b) if b.len() <= CACHE_VALUE_BYTES_MAX => Value::Str(b),
            SnapshotValue::Int(n) => Value::Int(n),
            SnapshotValue::Hash(fields)
                if !fields.is_empty()
                    && fields.len() <= CACHE_COLLECTION_LEN_MAX
                    && fields.iter().all(|(f, v)| member_ok(f) && v.len() <= CACHE_VALUE_BYTES_MAX) =>
            {
                Value::Hash(Box::new(fields.into_iter().collect()))
            }
            SnapshotValue::ZSet(members)
                if !members.is_empty()
                    && members.len() <= CACHE_COLLECTION_LEN_MAX
                    && members.iter().all(|(m, s)| member_ok(m) && !s.is_nan()) =>
            {
                let mut z = SortedSet::new();
                for (m, s) in &members {
                    z.insert(m, *s);
                }
                Value::ZSet(Box::new(z))
            }
            _ => return Err(format!("the value of key {key:?} breaks a cache limit or is empty")),
        };
        Ok((key, self.expires_at_ms, value))
    }
}

impl Cache {
    /// Write every live key, with its absolute deadline, to `path` (atomically replaced).
    pub fn snapshot_to(&self, path: impl AsRef<Path>) -> CacheResult<SnapshotReport> {
        let path = path.as_ref();
        let io = |source| CacheError::SnapshotIo { path: path.to_path_buf(), source };
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(io)?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC).map_err(io)?;
        out.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        let mut bytes = HEADER_BYTES as u64;
        let mut entries = 0u64;
        for shard in self.shards.iter() {
            // Copy under the lock (cheap: `Bytes` clones share their buffers); encode outside it.
            let copied: Vec<SnapshotEntry> = {
                let shard = shard.lock();
                let now = self.clock.now_ms();
                shard.live(now).map(|(k, e)| SnapshotEntry::of(k, e)).collect()
            };
            entries += copied.len() as u64;
            let mut copied = copied.into_iter().peekable();
            while copied.peek().is_some() {
                let chunk: Vec<_> = copied.by_ref().take(FRAME_ENTRIES_MAX).collect();
                bytes += write_frame(&mut out, &Frame::Entries(chunk)).map_err(io)?;
            }
        }
        bytes += write_frame(&mut out, &Frame::End { entries }).map_err(io)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, path).map_err(io)?;
        sync_parent(path).map_err(io)?;
        Ok(SnapshotReport { entries, bytes })
    }

    /// Restore the keys of the snapshot at `path`, replacing keys of the same name and dropping
    /// keys whose deadline has passed. The whole file is verified first: on any error nothing
    /// is applied.
    pub fn load_from(&self, path: impl AsRef<Path>) -> CacheResult<LoadReport> {
        let path = path.as_ref();
        let data = fs::read(path).map_err(|source| CacheError::SnapshotIo { path: path.to_path_buf(), source })?;
        let corrupt = |reason: String| CacheError::SnapshotCorrupt { path: path.to_path_buf(), reason };
        let decoded = decode(&data).map_err(corrupt)?;
        let now = self.clock.now_ms();
        let mut live = Vec::with_capacity(decoded.len());
        let mut expired = 0u64;
        for entry in decoded {
            let (key, deadline, value) = entry.into_value().map_err(corrupt)?;
            if is_expired(deadline, now) {
                expired += 1;
            } else {
                live.push((key, deadline, value));
            }
        }
        if let (Some(max), EvictionPolicy::Refuse) = (self.capacity.max_entries, self.capacity.policy) {
            // Conservative (a replaced key is counted twice), so a load never stops half-way.
            if self.len() + live.len() > max {
                return Err(CacheError::Full { max_entries: max });
            }
        }
        let loaded = live.len() as u64;
        for (key, deadline, value) in live {
            self.with_shard(&key, |s, now, cap| {
                if let Some(i) = s.find(&key, now, cap) {
                    s.remove_at(i, cap);
                }
                s.insert(&key, value, deadline, now, cap).map(drop)
            })?;
        }
        Ok(LoadReport { loaded, expired })
    }
}

fn write_frame(out: &mut impl Write, frame: &Frame) -> std::io::Result<u64> {
    let payload = postcard::to_stdvec(frame).map_err(std::io::Error::other)?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(&crc32c::crc32c(&payload).to_le_bytes())?;
    out.write_all(&payload)?;
    Ok((FRAME_HEADER_BYTES + payload.len()) as u64)
}

/// Every entry of a snapshot, or the first reason it cannot be trusted.
fn decode(data: &[u8]) -> Result<Vec<SnapshotEntry>, String> {
    if data.len() < HEADER_BYTES || &data[..8] != MAGIC {
        return Err("not a Tributary cache snapshot (bad magic)".into());
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("snapshot version {version}, this build reads {VERSION}"));
    }
    let mut at = HEADER_BYTES;
    let mut entries = Vec::new();
    loop {
        let rest = &data[at..];
        if rest.len() < FRAME_HEADER_BYTES {
            return Err(format!("truncated at byte {at}: no end frame"));
        }
        let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        let body = &rest[FRAME_HEADER_BYTES..];
        if len > body.len() as u64 {
            return Err(format!("frame at byte {at} claims {len} bytes, {} remain", body.len()));
        }
        let payload = &body[..len as usize];
        if crc32c::crc32c(payload) != crc {
            return Err(format!("CRC mismatch in the frame at byte {at}"));
        }
        let frame: Frame = postcard::from_bytes(payload).map_err(|e| format!("frame at byte {at}: {e}"))?;
        at += FRAME_HEADER_BYTES + payload.len();
        match frame {
            Frame::Entries(chunk) => entries.extend(chunk),
            Frame::End { entries: count } => {
                if count != entries.len() as u64 {
                    return Err(format!("end frame counts {count} entries, the frames hold {}", entries.len()));
                }
                if at != data.len() {
                    return Err(format!("{} bytes after the end frame", data.len() - at));
                }
                return Ok(entries);
            }
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Make a rename in the directory of `path` durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
