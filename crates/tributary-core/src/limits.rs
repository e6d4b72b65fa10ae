//! Named limits. Every bound in Tributary is one of these constants; a request over a limit is
//! refused with an error that names it, never truncated.

/// Largest value plus key plus headers of one record, in bytes (1 MiB, as Kafka and NATS default).
pub const MESSAGE_BYTES_MAX: usize = 1024 * 1024;
/// Largest key of one record, in bytes.
pub const KEY_BYTES_MAX: usize = 16 * 1024;
/// Most headers on one record.
pub const HEADERS_COUNT_MAX: usize = 64;
/// Most records in one appended batch.
pub const BATCH_RECORDS_MAX: usize = 10_000;
/// Largest encoded batch, in bytes.
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most partitions in one topic.
pub const PARTITIONS_MAX: u32 = 1024;
/// Longest topic, queue or group name, in bytes.
pub const NAME_BYTES_MAX: usize = 200;
/// Longest subject, in bytes.
pub const SUBJECT_BYTES_MAX: usize = 1024;
/// Most tokens in one subject.
pub const SUBJECT_TOKENS_MAX: usize = 32;
/// Most messages a queue consumer may hold leased at once (its in-flight bound).
pub const QUEUE_IN_FLIGHT_PER_CONSUMER_MAX: usize = 10_000;
/// Longest lease a queue receive may ask for, in milliseconds (12 hours, as SQS).
pub const QUEUE_LEASE_MS_MAX: u64 = 12 * 60 * 60 * 1000;
/// Lease used when a receive does not name one, in milliseconds.
pub const QUEUE_LEASE_MS_DEFAULT: u64 = 30_000;
/// Longest delivery delay, in milliseconds (15 days).
pub const QUEUE_DELAY_MS_MAX: u64 = 15 * 24 * 60 * 60 * 1000;
/// Priority levels of a queue: 0 (highest) to `QUEUE_PRIORITY_LEVELS - 1`.
pub const QUEUE_PRIORITY_LEVELS: u8 = 4;
/// Deliveries before a queue message is dead-lettered, unless the queue says otherwise.
pub const QUEUE_DELIVERIES_MAX_DEFAULT: u32 = 5;
/// Subscriptions one connection may hold.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 10_000;
/// Messages buffered for one pub/sub subscriber before its slow-consumer policy applies.
pub const SUBSCRIBER_BUFFER_MESSAGES_DEFAULT: usize = 10_000;
/// Largest buffer one pub/sub subscriber may ask for, in messages.
pub const SUBSCRIBER_BUFFER_MESSAGES_MAX: usize = 1_000_000;
/// Longest a publish may wait for room in a `Block` subscriber's buffer, in milliseconds.
pub const SUBSCRIBER_BLOCK_MS_MAX: u64 = 30_000;
/// Subscriptions one pub/sub broker may hold in total (a group counts each member).
pub const SUBSCRIPTIONS_MAX: usize = 4_000_000;
/// Largest cache value, in bytes.
pub const CACHE_VALUE_BYTES_MAX: usize = 1024 * 1024;

/// Validate a topic, queue or group name: 1 to [`NAME_BYTES_MAX`] bytes of `[A-Za-z0-9._-]`.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!("{kind} name must be 1 to {NAME_BYTES_MAX} bytes, got {}", name.len()));
    }
    if name == "." || name == ".." {
        return Err(format!("{kind} name {name:?} is reserved"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{kind} name {name:?} has {bad:?}; allowed are A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// Largest cache key, in bytes.
pub const CACHE_KEY_BYTES_MAX: usize = 16 * 1024;
/// Largest hash field or sorted-set member, in bytes.
pub const CACHE_MEMBER_BYTES_MAX: usize = 16 * 1024;
/// Most fields in one cache hash, or members in one sorted set.
pub const CACHE_COLLECTION_LEN_MAX: usize = 10_000_000;
/// Longest cache TTL, in milliseconds (10 years): a bound, so expiry arithmetic never overflows.
pub const CACHE_TTL_MS_MAX: u64 = 10 * 365 * 24 * 60 * 60 * 1000;
/// Messages a cache channel's subscriber may fall behind by before it skips ahead (and is told
/// it missed some).
pub const CACHE_SUBSCRIBER_BUFFER: usize = 4096;
/// Lock shards of a cache when its configuration does not name a count.
pub const CACHE_SHARDS_DEFAULT: usize = 32;
/// Most lock shards of one cache.
pub const CACHE_SHARDS_MAX: usize = 1024;
/// Entries sampled per eviction by the approximate-LRU policy (Redis samples 5 too).
pub const CACHE_EVICTION_SAMPLES: usize = 5;
/// Expired entries a full shard reclaims before it refuses or evicts a write.
pub const CACHE_ADMIT_EXPIRE_BUDGET: usize = 16;
