//! The in-process cache: key → value with TTLs, counters, hashes and sorted sets, the embedded
//! counterpart of Redis (`--cache redis://…` is the distributed one).
//!
//! # What is here
//!
//! One [`Cache`], synchronous and thread-safe: share it in an `Arc` and call it from any thread.
//! Keys are hashed ([`tributary_core::key_hash`]) onto lock shards, so threads working on
//! different keys rarely meet on a lock. Every key holds one of three types ([`KeyType`]); using
//! a key as another type is [`CacheError::WrongType`], as Redis's WRONGTYPE.
//!
//! | need | use | cost |
//! |---|---|---|
//! | a value by key: sessions, last price, feature vector | [`Cache::get`] / [`Cache::set`], [`Cache::set_nx`] for "first writer wins" (locks, idempotency keys) | O(1) |
//! | counting: rate limits, quotas, sequence numbers | [`Cache::incr_by`]; [`Cache::incr_by_with_ttl`] for a fixed window that starts with its first hit | O(1) |
//! | a small record of named fields: a session, a user's feature set | [`Cache::hset`] / [`Cache::hget`] / [`Cache::hincr_by`] | O(1) per field |
//! | a ranking: leaderboards, top-N, time-ordered index by score | [`Cache::zadd`], [`Cache::zrank`], [`Cache::zrange`], [`Cache::zrange_by_score`] | O(log n); a range is O(log n + items) |
//! | telling whoever listens now: invalidations, presence changes | [`Cache::publish`] / [`Cache::subscribe`] (fire and forget, as Redis's PUBLISH / SUBSCRIBE) | O(subscribers) |
//!
//! Counters are strings, as in Redis: `get` on a counter returns its decimal text, and
//! `incr_by` on a string that holds a decimal integer works.
//!
//! # Time
//!
//! Every key may carry a TTL. An expired key is gone for every operation at once (lazy expiry
//! on access); [`Cache::expire_tick`] also removes a bounded number of expired keys, earliest
//! deadline first, so dead keys do not hold memory: call it periodically (e.g. every 100 ms with
//! a budget of a few thousand). The clock is a [`Clock`]; tests use [`ManualClock`].
//!
//! # Memory bound
//!
//! [`CacheConfig::max_entries`] bounds the number of keys (not bytes). When it is reached, a
//! write that would add a key first reclaims expired keys of its shard, then follows the
//! [`EvictionPolicy`]: `Refuse` fails the write with [`CacheError::Full`] (exact bound);
//! `LruApprox` evicts the least recently used of
//! [`CACHE_EVICTION_SAMPLES`](tributary_core::limits::CACHE_EVICTION_SAMPLES) sampled keys of the
//! same shard, as Redis's `allkeys-lru` (it may overshoot by at most one key per shard).
//! Every key, field, member and value has a named size limit ([`tributary_core::limits`]).
//!
//! # Snapshots
//!
//! [`Cache::snapshot_to`] writes every live key with its absolute deadline to a file (a temp file,
//! fsync, rename). Each shard is copied under its own lock, so a snapshot is consistent per shard,
//! not across shards. [`Cache::load_from`] checks every frame's CRC32C and the end marker before
//! it applies anything, drops keys that expired in the meantime, and otherwise reports
//! [`CacheError::SnapshotCorrupt`]: a damaged file is never half-loaded.
//!
//! # What is not here
//!
//! Lists, sets, streams, pattern subscriptions, transactions and Lua; a byte-based memory bound;
//! replication. Nothing here touches the network, and only a channel's subscription is async (a
//! stream): the Redis backend lives in `tributary-redis`.

mod bench;
mod channels;
mod clock;
mod error;
mod shard;
mod snapshot;
mod sorted_set;
mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tributary_core::key_hash;
use tributary_core::limits::{CACHE_COLLECTION_LEN_MAX, CACHE_SHARDS_DEFAULT, CACHE_SHARDS_MAX};

pub use bench::{CacheBench, bench_cache};
pub use channels::{Delivery, Subscription};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{CacheError, CacheResult};
pub use snapshot::{LoadReport, SnapshotReport};
pub use sorted_set::Order;
pub use store::{CacheStore, StoreFuture, check_bounds, check_key, check_member, check_score, check_value, ttl_ms};

use shard::{Capacity, Shard, Value};
use sorted_set::SortedSet;

/// The type of value a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// Bytes, or a counter (a string holding a decimal integer).
    String,
    Hash,
    SortedSet,
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::String => "string",
            KeyType::Hash => "hash",
            KeyType::SortedSet => "sorted set",
        })
    }
}

/// What a full cache does with a write that would add a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Fail the write with [`CacheError::Full`] (Redis `noeviction`).
    #[default]
    Refuse,
    /// Evict an approximately least-recently-used key of the same shard (Redis `allkeys-lru`).
    LruApprox,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Lock shards: a power of two from 1 to [`CACHE_SHARDS_MAX`].
    pub shards: usize,
    /// Bound on the number of keys; `None` for no bound.
    pub max_entries: Option<usize>,
    pub eviction: EvictionPolicy,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { shards: CACHE_SHARDS_DEFAULT, max_entries: None, eviction: EvictionPolicy::Refuse }
    }
}

/// How long a key has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// No such key (or it has expired).
    Missing,
    /// The key never expires.
    Persistent,
    /// The key expires after this long.
    Remaining(Duration),
}

/// Paging of a score range: skip `offset` items, return at most `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub offset: usize,
    pub count: usize,
}

impl Limit {
    /// Every item.
    pub const ALL: Limit = Limit { offset: 0, count: usize::MAX };

    /// The first `count` items.
    pub fn first(count: usize) -> Limit {
        Limit { offset: 0, count }
    }
}

/// What [`Cache::expire_tick`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpireReport {
    /// Expired keys removed.
    pub removed: usize,
    /// Whether the budget ran out while expired keys may remain (call again soon).
    pub budget_exhausted: bool,
}

/// An in-process, sharded, thread-safe cache. See the module docs.
pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    capacity: Capacity,
    clock: Arc<dyn Clock>,
    expire_cursor: AtomicUsize,
    channels: channels::Channels,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .field("max_entries", &self.capacity.max_entries)
            .field("eviction", &self.capacity.policy)
            .finish()
    }
}

impl Default for Cache {
    fn default() -> Self {
        Cache::new(CacheConfig::default())
    }
}

impl Cache {
    /// A cache on the system clock.
    ///
    /// Panics if `config.shards` is not a power of two in 1..=[`CACHE_SHARDS_MAX`].
    pub fn new(config: CacheConfig) -> Cache {
        Cache::with_clock(config, Arc::new(SystemClock))
    }

    /// A cache that reads the time from `clock`.
    pub fn with_clock(config: CacheConfig, clock: Arc<dyn Clock>) -> Cache {
        assert!(
            config.shards.is_power_of_two() && config.shards <= CACHE_SHARDS_MAX,
            "cache shards must be a power of two from 1 to {CACHE_SHARDS_MAX}, got {}",
            config.shards
        );
        let shards = (0..config.shards as u64).map(|i| Mutex::new(Shard::new(key_hash(&i.to_le_bytes())))).collect();
        Cache {
            shards,
            capacity: Capacity {
                len: AtomicUsize::new(0),
                max_entries: config.max_entries,
                policy: config.eviction,
            },
            clock,
            expire_cursor: AtomicUsize::new(0),
            channels: channels::Channels::default(),
        }
    }

    /// The cache's clock, in milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Keys held, counting expired keys not yet removed.
    pub fn len(&self) -> usize {
        self.capacity.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove every key.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().clear(&self.capacity);
        }
    }

    /// Run `op` on the shard of `key` with the current time.
    #[inline]
    fn with_shard<R>(&self, key: &[u8], op: impl FnOnce(&mut Shard, i64, &Capacity) -> R) -> R {
        let hash = key_hash(key);
        let shard = &self.shards[((hash ^ (hash >> 32)) as usize) & (self.shards.len() - 1)];
        let now = self.clock.now_ms();
        op(&mut shard.lock(), now, &self.capacity)
    }

    // ---- keys ----

    pub fn exists(&self, key: &[u8]) -> bool {
        self.with_shard(key, |s, now, cap| s.find(key, now, cap).is_some())
    }

    /// Delete `key`. Returns whether it existed.
    pub fn del(&self, key: &[u8]) -> bool {
        self.with_shard(key, |s, now, cap| s.find(key, now, cap).map(|i| s.remove_at(i, cap)).is_some())
    }

    pub fn key_type(&self, key: &[u8]) -> Option<KeyType> {
        self.with_shard(key, |s, now, cap| s.find(key, now, cap).map(|i| s.entry(i).value.key_type()))
    }

    /// Give `key` a TTL of `ttl` from now. A zero TTL deletes the key, as Redis. Returns whether
    /// the key existed.
    pub fn expire(&self, key: &[u8], ttl: Duration) -> CacheResult<bool> {
        let deadline = if ttl.is_zero() { None } else { Some(self.deadline(ttl)?) };
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return Ok(false) };
            match deadline {
                None => {
                    s.remove_at(i, cap);
                }
                Some(deadline) => s.set_expiry(i, Some(deadline)),
            }
            Ok(true)
        })
    }

    /// Remove the TTL of `key`. Returns whether the key existed and had a TTL.
    pub fn persist(&self, key: &[u8]) -> bool {
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return false };
            let had = s.entry(i).expires_at_ms.is_some();
            s.set_expiry(i, None);
            had
        })
    }

    pub fn ttl(&self, key: &[u8]) -> Ttl {
        self.with_shard(key, |s, now, cap| match s.find(key, now, cap) {
            None => Ttl::Missing,
            Some(i) => match s.entry(i).expires_at_ms {
                None => Ttl::Persistent,
                Some(at) => Ttl::Remaining(Duration::from_millis((at - now) as u64)),
            },
        })
    }

    /// Remove at most `budget` keys whose deadline is at or before `now_ms`, earliest deadline
    /// first within a shard, visiting shards round-robin from where the last call stopped.
    pub fn expire_tick(&self, now_ms: i64, budget: usize) -> ExpireReport {
        let shards = self.shards.len();
        let start = self.expire_cursor.fetch_add(1, Ordering::Relaxed);
        let mut removed = 0;
        for step in 0..shards {
            if removed == budget {
                return ExpireReport { removed, budget_exhausted: true };
            }
            let shard = &self.shards[(start + step) % shards];
            removed += shard.lock().expire(now_ms, budget - removed, &self.capacity);
        }
        ExpireReport { removed, budget_exhausted: removed == budget && budget > 0 }
    }

    // ---- strings ----

    pub fn get(&self, key: &[u8]) -> CacheResult<Option<Bytes>> {
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return Ok(None) };
            match &s.entry(i).value {
                Value::Str(b) => Ok(Some(b.clone())),
                Value::Int(n) => Ok(Some(Bytes::from(n.to_string()))),
                other => Err(wrong_type(KeyType::String, other)),
            }
        })
    }

    /// Set `key` to `value`, whatever it held, with `ttl` (or none: a previous TTL is cleared).
    pub fn set(&self, key: &[u8], value: impl Into<Bytes>, ttl: Option<Duration>) -> CacheResult<()> {
        let value = value.into();
        check_key(key)?;
        check_value(&value)?;
        let deadline = ttl.map(|t| self.deadline(t)).transpose()?;
        self.with_shard(key, |s, now, cap| {
            match s.find(key, now, cap) {
                Some(i) => {
                    s.entry(i).value = Value::Str(value);
                    s.set_expiry(i, deadline);
                }
                None => {
                    s.insert(key, Value::Str(value), deadline, now, cap)?;
                }
            }
            Ok(())
        })
    }

    /// Set `key` only if it does not exist (Redis `SET NX`). Returns whether it was set.
    pub fn set_nx(&self, key: &[u8], value: impl Into<Bytes>, ttl: Option<Duration>) -> CacheResult<bool> {
        let value = value.into();
        check_key(key)?;
        check_value(&value)?;
        let deadline = ttl.map(|t| self.deadline(t)).transpose()?;
        self.with_shard(key, |s, now, cap| {
            if s.find(key, now, cap).is_some() {
                return Ok(false);
            }
            s.insert(key, Value::Str(value), deadline, now, cap)?;
            Ok(true)
        })
    }

    // ---- counters ----

    /// Add `delta` to the counter at `key` (created at 0) and return the new value.
    pub fn incr_by(&self, key: &[u8], delta: i64) -> CacheResult<i64> {
        self.incr(key, delta, None)
    }

    /// As [`Cache::incr_by`], and if this call creates the counter it expires after `ttl`; an
    /// existing counter keeps its deadline. This is a fixed-window rate limit in one call.
    pub fn incr_by_with_ttl(&self, key: &[u8], delta: i64, ttl: Duration) -> CacheResult<i64> {
        let deadline = self.deadline(ttl)?;
        self.incr(key, delta, Some(deadline))
    }

    /// Takes `count` slots of the rate limit at `key`: one slot per `interval`, at most `burst`
    /// taken at once (GCRA: the key holds the limit's theoretical arrival time, in microseconds
    /// of the cache's clock, as a counter that expires once the limit is full again). The next
    /// `count` slots are taken if the last of them is due within `horizon`; the answer is how
    /// long until it is due (zero: now). An answer over `horizon` took nothing. Every node
    /// sharing the cache shares the limit.
    pub fn throttle(&self, key: &[u8], interval: Duration, burst: u32, horizon: Duration, count: u32) -> CacheResult<Duration> {
        check_key(key)?;
        let interval = interval.as_micros().clamp(1, u128::from(u32::MAX)) as i64;
        let allowance = interval.saturating_mul(i64::from(burst.max(1)));
        let step = interval.saturating_mul(i64::from(count.max(1)));
        let horizon = horizon.as_micros().min(i64::MAX as u128) as i64;
        self.with_shard(key, |s, now_ms, cap| {
            let now = now_ms.saturating_mul(1_000);
            let found = s.find(key, now_ms, cap);
            let tat = match found.map(|i| &s.entry(i).value) {
                None => now,
                Some(Value::Int(n)) => *n,
                Some(Value::Str(b)) => parse_i64(b)?,
                Some(other) => return Err(wrong_type(KeyType::String, other)),
            };
            let next = tat.max(now).saturating_add(step);
            let wait = next.saturating_sub(allowance).saturating_sub(now).max(0);
            if wait <= horizon {
                let full_again_ms = Some((next + 999) / 1_000 + 1);
                match found {
                    Some(i) => {
                        s.entry(i).value = Value::Int(next);
                        s.set_expiry(i, full_again_ms);
                    }
                    None => {
                        s.insert(key, Value::Int(next), full_again_ms, now_ms, cap)?;
                    }
                }
            }
            Ok(Duration::from_micros(wait as u64))
        })
    }

    fn incr(&self, key: &[u8], delta: i64, deadline_if_new: Option<i64>) -> CacheResult<i64> {
        check_key(key)?;
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else {
                s.insert(key, Value::Int(delta), deadline_if_new, now, cap)?;
                return Ok(delta);
            };
            let value = &mut s.entry(i).value;
            let current = match value {
                Value::Int(n) => *n,
                Value::Str(b) => parse_i64(b)?,
                other => return Err(wrong_type(KeyType::String, other)),
            };
            let next = current.checked_add(delta).ok_or(CacheError::Overflow)?;
            *value = Value::Int(next);
            Ok(next)
        })
    }

    /// Add `delta` to the float at `key` (created at 0) and return the new value. The result
    /// must be finite.
    pub fn incr_by_float(&self, key: &[u8], delta: f64) -> CacheResult<f64> {
        check_key(key)?;
        if !delta.is_finite() {
            return Err(CacheError::NotAFloat);
        }
        self.with_shard(key, |s, now, cap| {
            let (idx, current) = match s.find(key, now, cap) {
                None => (None, 0.0),
                Some(i) => match &s.entry(i).value {
                    Value::Int(n) => (Some(i), *n as f64),
                    Value::Str(b) => (Some(i), parse_f64(b)?),
                    other => return Err(wrong_type(KeyType::String, other)),
                },
            };
            let next = current + delta;
            if !next.is_finite() {
                return Err(CacheError::NotAFloat);
            }
            let value = Value::Str(Bytes::from(next.to_string()));
            match idx {
                Some(i) => s.entry(i).value = value,
                None => {
                    s.insert(key, value, None, now, cap)?;
                }
            }
            Ok(next)
        })
    }

    // ---- hashes ----

    /// Set `field` of the hash at `key`. Returns whether the field is new.
    pub fn hset(&self, key: &[u8], field: &[u8], value: impl Into<Bytes>) -> CacheResult<bool> {
        let value = value.into();
        check_key(key)?;
        check_member(field)?;
        check_value(&value)?;
        self.with_hash(key, |h| {
            if let Some(slot) = h.get_mut(field) {
                *slot = value;
                return Ok(false);
            }
            check_collection(h.len())?;
            h.insert(Bytes::copy_from_slice(field), value);
            Ok(true)
        })
    }

    pub fn hget(&self, key: &[u8], field: &[u8]) -> CacheResult<Option<Bytes>> {
        self.read_hash(key, |h| h.and_then(|h| h.get(field).cloned()))
    }

    /// Delete `field` of the hash at `key`; the last field takes the key with it. Returns
    /// whether the field existed.
    pub fn hdel(&self, key: &[u8], field: &[u8]) -> CacheResult<bool> {
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return Ok(false) };
            let Value::Hash(h) = &mut s.entry(i).value else {
                return Err(wrong_type(KeyType::Hash, &s.entry(i).value));
            };
            let removed = h.remove(field).is_some();
            if h.is_empty() {
                s.remove_at(i, cap);
            }
            Ok(removed)
        })
    }

    /// Every (field, value) of the hash at `key`, in no particular order.
    pub fn hgetall(&self, key: &[u8]) -> CacheResult<Vec<(Bytes, Bytes)>> {
        self.read_hash(key, |h| h.map(|h| h.iter().map(|(f, v)| (f.clone(), v.clone())).collect()).unwrap_or_default())
    }

    pub fn hlen(&self, key: &[u8]) -> CacheResult<usize> {
        self.read_hash(key, |h| h.map_or(0, |h| h.len()))
    }

    /// Add `delta` to the integer in `field` (created at 0) and return the new value.
    pub fn hincr_by(&self, key: &[u8], field: &[u8], delta: i64) -> CacheResult<i64> {
        check_key(key)?;
        check_member(field)?;
        self.with_hash(key, |h| {
            let current = match h.get(field) {
                Some(b) => parse_i64(b)?,
                None => {
                    check_collection(h.len())?;
                    0
                }
            };
            let next = current.checked_add(delta).ok_or(CacheError::Overflow)?;
            h.insert(Bytes::copy_from_slice(field), Bytes::from(next.to_string()));
            Ok(next)
        })
    }

    /// Run `op` on the hash at `key`, creating it if absent; an empty hash left behind (because
    /// `op` failed) is removed.
    fn with_hash<R>(
        &self,
        key: &[u8],
        op: impl FnOnce(&mut HashMap<Bytes, Bytes>) -> CacheResult<R>,
    ) -> CacheResult<R> {
        self.with_shard(key, |s, now, cap| {
            let i = match s.find(key, now, cap) {
                Some(i) => i,
                None => s.insert(key, Value::Hash(Box::default()), None, now, cap)?,
            };
            let Value::Hash(h) = &mut s.entry(i).value else {
                return Err(wrong_type(KeyType::Hash, &s.entry(i).value));
            };
            let result = op(h);
            if h.is_empty() {
                s.remove_at(i, cap);
            }
            result
        })
    }

    fn read_hash<R>(&self, key: &[u8], op: impl FnOnce(Option<&HashMap<Bytes, Bytes>>) -> R) -> CacheResult<R> {
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return Ok(op(None)) };
            match &s.entry(i).value {
                Value::Hash(h) => Ok(op(Some(h))),
                other => Err(wrong_type(KeyType::Hash, other)),
            }
        })
    }

    // ---- sorted sets ----

    /// Add `member` with `score`, or move it to `score`. Returns whether it is new.
    pub fn zadd(&self, key: &[u8], member: &[u8], score: f64) -> CacheResult<bool> {
        check_key(key)?;
        check_member(member)?;
        check_score(score)?;
        self.with_zset(key, |z| {
            if z.score(member).is_none() {
                check_collection(z.len())?;
            }
            Ok(z.insert(member, score))
        })
    }

    /// Add `delta` to the score of `member` (added at 0) and return the new score.
    pub fn zincr_by(&self, key: &[u8], member: &[u8], delta: f64) -> CacheResult<f64> {
        check_key(key)?;
        check_member(member)?;
        check_score(delta)?;
        self.with_zset(key, |z| {
            let current = match z.score(member) {
                Some(s) => s,
                None => {
                    check_collection(z.len())?;
                    0.0
                }
            };
            let next = current + delta;
            if next.is_nan() {
                return Err(CacheError::NanScore);
            }
            z.insert(member, next);
            Ok(next + 0.0)
        })
    }

    /// Remove `member`; the last member takes the key with it. Returns whether it existed.
    pub fn zrem(&self, key: &[u8], member: &[u8]) -> CacheResult<bool> {
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return Ok(false) };
            let Value::ZSet(z) = &mut s.entry(i).value else {
                return Err(wrong_type(KeyType::SortedSet, &s.entry(i).value));
            };
            let removed = z.remove(member);
            if z.len() == 0 {
                s.remove_at(i, cap);
            }
            Ok(removed)
        })
    }

    pub fn zscore(&self, key: &[u8], member: &[u8]) -> CacheResult<Option<f64>> {
        self.read_zset(key, |z| z.and_then(|z| z.score(member)))
    }

    /// Members in the sorted set at `key` (0 if there is none).
    pub fn zcard(&self, key: &[u8]) -> CacheResult<usize> {
        self.read_zset(key, |z| z.map_or(0, |z| z.len()))
    }

    /// 0-based rank of `member`, lowest score first. O(log n).
    pub fn zrank(&self, key: &[u8], member: &[u8]) -> CacheResult<Option<usize>> {
        self.read_zset(key, |z| z.and_then(|z| z.rank(member)))
    }

    /// 0-based rank of `member`, highest score first (a leaderboard position). O(log n).
    pub fn zrevrank(&self, key: &[u8], member: &[u8]) -> CacheResult<Option<usize>> {
        self.read_zset(key, |z| z.and_then(|z| z.rank(member).map(|r| z.len() - 1 - r)))
    }

    /// Members whose score is within (`min`, `max`). O(log n).
    pub fn zcount(&self, key: &[u8], min: Bound<f64>, max: Bound<f64>) -> CacheResult<usize> {
        check_bounds(min, max)?;
        self.read_zset(key, |z| z.map_or(0, |z| z.count_in(min, max)))
    }

    /// Members at `ranks`, counted in `order`: `zrange(k, 0..10, Order::Desc)` is a top ten.
    /// Ranks past the end are ignored.
    pub fn zrange(&self, key: &[u8], ranks: impl RangeBounds<usize>, order: Order) -> CacheResult<Vec<(Bytes, f64)>> {
        let start = match ranks.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match ranks.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => usize::MAX,
        };
        self.read_zset(key, |z| z.map(|z| z.range_by_rank(start, end, order)).unwrap_or_default())
    }

    /// Members whose score is within (`min`, `max`), in `order`, paged by `limit`.
    pub fn zrange_by_score(
        &self,
        key: &[u8],
        min: Bound<f64>,
        max: Bound<f64>,
        order: Order,
        limit: Limit,
    ) -> CacheResult<Vec<(Bytes, f64)>> {
        check_bounds(min, max)?;
        self.read_zset(key, |z| {
            z.map(|z| z.range_by_score(min, max, order, limit.offset, limit.count)).unwrap_or_default()
        })
    }

    fn with_zset<R>(&self, key: &[u8], op: impl FnOnce(&mut SortedSet) -> CacheResult<R>) -> CacheResult<R> {
        self.with_shard(key, |s, now, cap| {
            let i = match s.find(key, now, cap) {
                Some(i) => i,
                None => s.insert(key, Value::ZSet(Box::default()), None, now, cap)?,
            };
            let Value::ZSet(z) = &mut s.entry(i).value else {
                return Err(wrong_type(KeyType::SortedSet, &s.entry(i).value));
            };
            let result = op(z);
            if z.len() == 0 {
                s.remove_at(i, cap);
            }
            result
        })
    }

    fn read_zset<R>(&self, key: &[u8], op: impl FnOnce(Option<&SortedSet>) -> R) -> CacheResult<R> {
        self.with_shard(key, |s, now, cap| {
            let Some(i) = s.find(key, now, cap) else { return Ok(op(None)) };
            match &s.entry(i).value {
                Value::ZSet(z) => Ok(op(Some(z))),
                other => Err(wrong_type(KeyType::SortedSet, other)),
            }
        })
    }

    /// Send `message` to every current subscriber of `channel`, at most once each; nothing is
    /// kept for later subscribers. Returns how many subscribers there were.
    pub fn publish(&self, channel: &[u8], message: impl Into<Bytes>) -> CacheResult<usize> {
        let message = message.into();
        check_key(channel)?;
        check_value(&message)?;
        Ok(self.channels.publish(channel, message))
    }

    /// The messages published to `channel` from now on ([`Delivery::Gap`] where a subscriber
    /// that fell [`CACHE_SUBSCRIBER_BUFFER`](tributary_core::limits::CACHE_SUBSCRIBER_BUFFER)
    /// behind skipped some). Channels are not keys: they hold nothing and never expire.
    pub fn subscribe(&self, channel: &[u8]) -> CacheResult<Subscription> {
        check_key(channel)?;
        Ok(self.channels.subscribe(channel))
    }

    /// The absolute deadline `ttl` from now.
    fn deadline(&self, ttl: Duration) -> CacheResult<i64> {
        let ms = store::ttl_ms(ttl)?;
        Ok(self.clock.now_ms().saturating_add(ms as i64))
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut total = 0;
        for shard in self.shards.iter() {
            let shard = shard.lock();
            shard.check_invariants();
            total += shard.len();
        }
        assert_eq!(total, self.len());
    }
}

fn wrong_type(expected: KeyType, found: &Value) -> CacheError {
    CacheError::WrongType { expected, found: found.key_type() }
}




fn check_collection(len: usize) -> CacheResult<()> {
    if len >= CACHE_COLLECTION_LEN_MAX {
        return Err(CacheError::CollectionFull { max: CACHE_COLLECTION_LEN_MAX });
    }
    Ok(())
}


fn parse_i64(bytes: &[u8]) -> CacheResult<i64> {
    std::str::from_utf8(bytes).ok().and_then(|s| s.parse().ok()).ok_or(CacheError::NotAnInteger)
}

fn parse_f64(bytes: &[u8]) -> CacheResult<f64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| f.is_finite())
        .ok_or(CacheError::NotAFloat)
}
