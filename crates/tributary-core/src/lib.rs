//! The vocabulary every Tributary crate shares: records, offsets, subjects, limits.
//!
//! What is here: plain data types ([`Record`], [`StoredRecord`], [`Subject`], [`SubjectPattern`]),
//! the named limits ([`limits`]), and the small helpers that several crates need
//! (the stable key hash used for partitioning, the wall clock in milliseconds, a unique id).
//!
//! What is deliberately not here: any IO, any async runtime, any serialization format. The
//! on-disk batch format lives in `tributary-log`; wire formats live at the edges.

pub mod limits;
mod record;
mod subject;

pub use record::{Header, Record, StoredRecord};
pub use subject::{Subject, SubjectError, SubjectPattern, Token};

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A value that differs between processes and between calls (std's randomly keyed hasher over
/// the time and the process id): for ids such as a node's or a log's epoch, not for secrets.
pub fn unique_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// The stable hash used to pick a partition for a key: 64-bit FNV-1a.
///
/// It is part of the contract: a key must land on the same partition across versions and
/// restarts, so this function never changes.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of `key` among `partitions` partitions.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (key_hash(key) % u64::from(partitions)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_stable_across_versions() {
        // Fixed vectors: changing the hash would move keys between partitions.
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(partition_for_key(b"user-42", 8), partition_for_key(b"user-42", 8));
    }
}
