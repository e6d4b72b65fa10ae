//! [`CacheStore`]: the cache interface that every backend gives, so a system written against it
//! runs on the embedded [`Cache`] on one machine and on Redis (`tributary-redis`) across several.
//!
//! The methods are async because a distributed backend answers over the network; the embedded
//! implementation answers at once, without blocking. Every backend checks the same named limits
//! before it does anything ([`check_key`], [`check_value`], [`check_member`], [`ttl_ms`]), and
//! reports the same [`CacheError`]s, so callers handle one set of errors. What a backend cannot
//! give is stated by its [`CacheStore::gaps`] and skipped, by name, in the conformance suite
//! (`tributary_engine::conformance`, feature `conformance`).

use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use tributary_core::limits::{CACHE_KEY_BYTES_MAX, CACHE_MEMBER_BYTES_MAX, CACHE_TTL_MS_MAX, CACHE_VALUE_BYTES_MAX};

use crate::{BoxFuture, Gap};

use super::{Cache, CacheError, CacheResult, KeyType, Limit, Order, Subscription, Ttl};

/// What the async methods of a `dyn CacheStore` return.
pub type StoreFuture<'a, T> = BoxFuture<'a, CacheResult<T>>;

/// The cache interface. The embedded [`Cache`] documents each operation's semantics; every
/// backend follows them (Redis semantics: WRONGTYPE, counters are decimal strings, sorted-set
/// ties ordered by member bytes, a zero TTL on `expire` deletes the key).
pub trait CacheStore: Send + Sync + std::fmt::Debug {
    /// `"embedded"`, `"redis"`, ...
    fn backend(&self) -> &'static str;
    /// The guarantees this backend does not give. Empty for the embedded cache.
    fn gaps(&self) -> &'static [Gap] {
        &[]
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Option<Bytes>>;
    /// Set `key` to `value`, whatever it held; `ttl` `None` clears a previous TTL.
    fn set<'a>(&'a self, key: &'a [u8], value: Bytes, ttl: Option<Duration>) -> StoreFuture<'a, ()>;
    /// Set only if `key` does not exist. Returns whether it was set.
    fn set_nx<'a>(&'a self, key: &'a [u8], value: Bytes, ttl: Option<Duration>) -> StoreFuture<'a, bool>;
    /// Returns whether the key existed.
    fn del<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool>;
    fn exists<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool>;
    fn key_type<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Option<KeyType>>;
    /// A zero `ttl` deletes the key. Returns whether the key existed.
    fn expire<'a>(&'a self, key: &'a [u8], ttl: Duration) -> StoreFuture<'a, bool>;
    /// Returns whether the key existed and had a TTL.
    fn persist<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool>;
    fn ttl<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Ttl>;
    fn incr_by<'a>(&'a self, key: &'a [u8], delta: i64) -> StoreFuture<'a, i64>;
    /// As `incr_by`; if this call creates the counter it expires after `ttl` (a fixed window).
    fn incr_by_with_ttl<'a>(&'a self, key: &'a [u8], delta: i64, ttl: Duration) -> StoreFuture<'a, i64>;
    /// Takes `count` slots of a rate limit shared by every user of the cache ([`Cache::throttle`]).
    fn throttle<'a>(&'a self, key: &'a [u8], interval: Duration, burst: u32, horizon: Duration, count: u32) -> StoreFuture<'a, Duration>;

    /// Returns whether the field is new.
    fn hset<'a>(&'a self, key: &'a [u8], field: &'a [u8], value: Bytes) -> StoreFuture<'a, bool>;
    fn hget<'a>(&'a self, key: &'a [u8], field: &'a [u8]) -> StoreFuture<'a, Option<Bytes>>;
    fn hdel<'a>(&'a self, key: &'a [u8], field: &'a [u8]) -> StoreFuture<'a, bool>;
    /// Every field, in no particular order.
    fn hgetall<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Vec<(Bytes, Bytes)>>;
    fn hlen<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, usize>;
    fn hincr_by<'a>(&'a self, key: &'a [u8], field: &'a [u8], delta: i64) -> StoreFuture<'a, i64>;

    /// Returns whether the member is new.
    fn zadd<'a>(&'a self, key: &'a [u8], member: &'a [u8], score: f64) -> StoreFuture<'a, bool>;
    fn zincr_by<'a>(&'a self, key: &'a [u8], member: &'a [u8], delta: f64) -> StoreFuture<'a, f64>;
    fn zrem<'a>(&'a self, key: &'a [u8], member: &'a [u8]) -> StoreFuture<'a, bool>;
    fn zscore<'a>(&'a self, key: &'a [u8], member: &'a [u8]) -> StoreFuture<'a, Option<f64>>;
    fn zcard<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, usize>;
    /// The member's rank counted in `order` (0 = lowest score for `Asc`, highest for `Desc`).
    fn zrank<'a>(&'a self, key: &'a [u8], member: &'a [u8], order: Order) -> StoreFuture<'a, Option<usize>>;
    fn zcount<'a>(&'a self, key: &'a [u8], min: Bound<f64>, max: Bound<f64>) -> StoreFuture<'a, usize>;
    /// Members at ranks `start..end` (end exclusive) counted in `order`.
    fn zrange<'a>(&'a self, key: &'a [u8], start: usize, end: usize, order: Order) -> StoreFuture<'a, Vec<(Bytes, f64)>>;
    fn zrange_by_score<'a>(
        &'a self,
        key: &'a [u8],
        min: Bound<f64>,
        max: Bound<f64>,
        order: Order,
        limit: Limit,
    ) -> StoreFuture<'a, Vec<(Bytes, f64)>>;

    /// Send `message` to every subscriber of `channel` (on every node that shares the cache),
    /// at most once each; nothing is kept for later subscribers. Channels are not keys.
    fn publish<'a>(&'a self, channel: &'a [u8], message: Bytes) -> StoreFuture<'a, ()>;
    /// The messages published to `channel` once this has returned, in the order the cache took
    /// them, with a [`Delivery::Gap`](super::Delivery::Gap) wherever some may have been missed.
    fn subscribe<'a>(&'a self, channel: &'a [u8]) -> StoreFuture<'a, Subscription>;
}

/// [`CACHE_KEY_BYTES_MAX`], as every backend checks it.
pub fn check_key(key: &[u8]) -> CacheResult<()> {
    if key.len() > CACHE_KEY_BYTES_MAX {
        return Err(CacheError::KeyTooLarge { len: key.len(), max: CACHE_KEY_BYTES_MAX });
    }
    Ok(())
}

/// [`CACHE_MEMBER_BYTES_MAX`] for hash fields and sorted-set members.
pub fn check_member(member: &[u8]) -> CacheResult<()> {
    if member.len() > CACHE_MEMBER_BYTES_MAX {
        return Err(CacheError::MemberTooLarge { len: member.len(), max: CACHE_MEMBER_BYTES_MAX });
    }
    Ok(())
}

/// [`CACHE_VALUE_BYTES_MAX`].
pub fn check_value(value: &[u8]) -> CacheResult<()> {
    if value.len() > CACHE_VALUE_BYTES_MAX {
        return Err(CacheError::ValueTooLarge { len: value.len(), max: CACHE_VALUE_BYTES_MAX });
    }
    Ok(())
}

/// A TTL in whole milliseconds (rounded up), refused unless 1 ms to [`CACHE_TTL_MS_MAX`].
pub fn ttl_ms(ttl: Duration) -> CacheResult<u64> {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    if ms == 0 || ms > u128::from(CACHE_TTL_MS_MAX) {
        return Err(CacheError::InvalidTtl { ms, max_ms: CACHE_TTL_MS_MAX });
    }
    Ok(ms as u64)
}

/// A finite score or increment, as every backend requires.
pub fn check_score(score: f64) -> CacheResult<()> {
    if score.is_nan() {
        return Err(CacheError::NanScore);
    }
    Ok(())
}

/// Score bounds without NaN.
pub fn check_bounds(min: Bound<f64>, max: Bound<f64>) -> CacheResult<()> {
    let nan = |b: Bound<f64>| matches!(b, Bound::Included(x) | Bound::Excluded(x) if x.is_nan());
    if nan(min) || nan(max) {
        return Err(CacheError::NanScore);
    }
    Ok(())
}

fn ready<'a, T: Send + 'a>(result: CacheResult<T>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

impl CacheStore for Cache {
    fn backend(&self) -> &'static str {
        "embedded"
    }
    fn get<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Option<Bytes>> {
        ready(Cache::get(self, key))
    }
    fn set<'a>(&'a self, key: &'a [u8], value: Bytes, ttl: Option<Duration>) -> StoreFuture<'a, ()> {
        ready(Cache::set(self, key, value, ttl))
    }
    fn set_nx<'a>(&'a self, key: &'a [u8], value: Bytes, ttl: Option<Duration>) -> StoreFuture<'a, bool> {
        ready(Cache::set_nx(self, key, value, ttl))
    }
    fn del<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool> {
        ready(Ok(Cache::del(self, key)))
    }
    fn exists<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool> {
        ready(Ok(Cache::exists(self, key)))
    }
    fn key_type<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Option<KeyType>> {
        ready(Ok(Cache::key_type(self, key)))
    }
    fn expire<'a>(&'a self, key: &'a [u8], ttl: Duration) -> StoreFuture<'a, bool> {
        ready(Cache::expire(self, key, ttl))
    }
    fn persist<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool> {
        ready(Ok(Cache::persist(self, key)))
    }
    fn ttl<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Ttl> {
        ready(Ok(Cache::ttl(self, key)))
    }
    fn incr_by<'a>(&'a self, key: &'a [u8], delta: i64) -> StoreFuture<'a, i64> {
        ready(Cache::incr_by(self, key, delta))
    }
    fn incr_by_with_ttl<'a>(&'a self, key: &'a [u8], delta: i64, ttl: Duration) -> StoreFuture<'a, i64> {
        ready(Cache::incr_by_with_ttl(self, key, delta, ttl))
    }
    fn throttle<'a>(&'a self, key: &'a [u8], interval: Duration, burst: u32, horizon: Duration, count: u32) -> StoreFuture<'a, Duration> {
        ready(Cache::throttle(self, key, interval, burst, horizon, count))
    }
    fn hset<'a>(&'a self, key: &'a [u8], field: &'a [u8], value: Bytes) -> StoreFuture<'a, bool> {
        ready(Cache::hset(self, key, field, value))
    }
    fn hget<'a>(&'a self, key: &'a [u8], field: &'a [u8]) -> StoreFuture<'a, Option<Bytes>> {
        ready(Cache::hget(self, key, field))
    }
    fn hdel<'a>(&'a self, key: &'a [u8], field: &'a [u8]) -> StoreFuture<'a, bool> {
        ready(Cache::hdel(self, key, field))
    }
    fn hgetall<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Vec<(Bytes, Bytes)>> {
        ready(Cache::hgetall(self, key))
    }
    fn hlen<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, usize> {
        ready(Cache::hlen(self, key))
    }
    fn hincr_by<'a>(&'a self, key: &'a [u8], field: &'a [u8], delta: i64) -> StoreFuture<'a, i64> {
        ready(Cache::hincr_by(self, key, field, delta))
    }
    fn zadd<'a>(&'a self, key: &'a [u8], member: &'a [u8], score: f64) -> StoreFuture<'a, bool> {
        ready(Cache::zadd(self, key, member, score))
    }
    fn zincr_by<'a>(&'a self, key: &'a [u8], member: &'a [u8], delta: f64) -> StoreFuture<'a, f64> {
        ready(Cache::zincr_by(self, key, member, delta))
    }
    fn zrem<'a>(&'a self, key: &'a [u8], member: &'a [u8]) -> StoreFuture<'a, bool> {
        ready(Cache::zrem(self, key, member))
    }
    fn zscore<'a>(&'a self, key: &'a [u8], member: &'a [u8]) -> StoreFuture<'a, Option<f64>> {
        ready(Cache::zscore(self, key, member))
    }
    fn zcard<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, usize> {
        ready(Cache::zcard(self, key))
    }
    fn zrank<'a>(&'a self, key: &'a [u8], member: &'a [u8], order: Order) -> StoreFuture<'a, Option<usize>> {
        ready(match order {
            Order::Asc => Cache::zrank(self, key, member),
            Order::Desc => Cache::zrevrank(self, key, member),
        })
    }
    fn zcount<'a>(&'a self, key: &'a [u8], min: Bound<f64>, max: Bound<f64>) -> StoreFuture<'a, usize> {
        ready(Cache::zcount(self, key, min, max))
    }
    fn zrange<'a>(&'a self, key: &'a [u8], start: usize, end: usize, order: Order) -> StoreFuture<'a, Vec<(Bytes, f64)>> {
        ready(Cache::zrange(self, key, start..end, order))
    }
    fn zrange_by_score<'a>(
        &'a self,
        key: &'a [u8],
        min: Bound<f64>,
        max: Bound<f64>,
        order: Order,
        limit: Limit,
    ) -> StoreFuture<'a, Vec<(Bytes, f64)>> {
        ready(Cache::zrange_by_score(self, key, min, max, order, limit))
    }

    fn publish<'a>(&'a self, channel: &'a [u8], message: Bytes) -> StoreFuture<'a, ()> {
        ready(Cache::publish(self, channel, message).map(|_| ()))
    }

    fn subscribe<'a>(&'a self, channel: &'a [u8]) -> StoreFuture<'a, Subscription> {
        ready(Cache::subscribe(self, channel))
    }
}
