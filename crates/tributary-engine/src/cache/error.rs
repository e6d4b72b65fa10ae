use std::path::PathBuf;

use super::KeyType;

/// Why a cache operation was refused. Each variant is something a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The key holds another type of value (Redis's WRONGTYPE).
    #[error("WRONGTYPE: key holds a {found}, not a {expected}")]
    WrongType { expected: KeyType, found: KeyType },
    #[error("key is {len} bytes, over CACHE_KEY_BYTES_MAX ({max})")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes, over CACHE_VALUE_BYTES_MAX ({max})")]
    ValueTooLarge { len: usize, max: usize },
    #[error("hash field or sorted-set member is {len} bytes, over CACHE_MEMBER_BYTES_MAX ({max})")]
    MemberTooLarge { len: usize, max: usize },
    #[error("collection already holds CACHE_COLLECTION_LEN_MAX ({max}) items")]
    CollectionFull { max: usize },
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    #[error("value is not a finite float")]
    NotAFloat,
    #[error("increment or decrement would overflow")]
    Overflow,
    #[error("score is NaN, or the increment would make it NaN")]
    NanScore,
    #[error("TTL must be 1 ms to CACHE_TTL_MS_MAX ({max_ms} ms), got {ms} ms")]
    InvalidTtl { ms: u128, max_ms: u64 },
    #[error("cache is full ({max_entries} entries) and its eviction policy is Refuse")]
    Full { max_entries: usize },
    /// The backend could not answer (connection lost, timeout, a reply of the wrong shape).
    /// Whether the operation took effect is unknown; retry only idempotent operations.
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
    #[error("snapshot {path}: {source}")]
    SnapshotIo { path: PathBuf, source: std::io::Error },
    #[error("snapshot {path} is corrupt: {reason}; nothing was loaded")]
    SnapshotCorrupt { path: PathBuf, reason: String },
}

pub type CacheResult<T> = Result<T, CacheError>;
