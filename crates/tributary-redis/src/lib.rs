//! Tributary's cache interface ([`CacheStore`]) on Redis, chosen with `--cache redis://…`.
//!
//! Every Tributary node points at the same Redis, so the cache holds no state of the node's own.
//! Keys live under a namespace (`<namespace>:<key>`), so several deployments can share one Redis.
//! The semantics are the embedded cache's, which follows Redis: the conformance suite
//! (`tributary_engine::conformance::cache`) runs against both, in this crate's tests against the
//! machine's Redis.
//!
//! | operation | Redis command |
//! |---|---|
//! | get, set (with TTL), set_nx | GET, SET … PX, SET … NX PX |
//! | del, exists, key_type, expire, persist, ttl | DEL, EXISTS, TYPE, PEXPIRE, PERSIST, PTTL |
//! | incr_by; incr_by_with_ttl | INCRBY; a script that sets the TTL only if the call created the key |
//! | hashes | HSET, HGET, HDEL, HGETALL, HLEN, HINCRBY |
//! | sorted sets | ZADD, ZINCRBY, ZREM, ZSCORE, ZCARD, ZRANK/ZREVRANK, ZCOUNT, ZRANGE (BYSCORE, REV, LIMIT) |
//! | publish; subscribe | PUBLISH; SUBSCRIBE on a connection of its own per subscription |
//!
//! The named limits (key, value and member sizes, TTL range) are checked here before anything is
//! sent, so a refused write never reaches Redis. Differences from the embedded cache:
//! - `CACHE_COLLECTION_LEN_MAX` is not enforced (it would cost a round trip per write); Redis
//!   bounds a collection at 2^32 - 1 items.
//! - The memory bound and eviction are Redis's own (`maxmemory`, `maxmemory-policy`), not
//!   `CacheConfig::max_entries`.
//! - Durability is Redis's (`appendonly`, `appendfsync`): the embedded cache snapshots on close.
//! - A lost connection is [`CacheError::Backend`]; the connection manager reconnects on the
//!   next call, and whether the failed write took effect is unknown.
//! - A subscription whose connection is lost connects and subscribes again (every
//!   [`SUBSCRIBE_RETRY`]) and then yields [`Delivery::Gap`]: what was published in between is
//!   lost, as Redis keeps nothing for a subscriber. So does a subscriber that falls
//!   `CACHE_SUBSCRIBER_BUFFER` messages behind (the messages it had no room for are dropped), and
//!   one that Redis disconnects for its output buffer (`client-output-buffer-limit pubsub`).

use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, PubSub};
use redis::{Cmd, FromRedisValue, RedisError, Script, cmd};
use tokio::sync::mpsc;
use tributary_core::limits::CACHE_SUBSCRIBER_BUFFER;
use tributary_engine::cache::{
    CacheError, CacheResult, CacheStore, Delivery, KeyType, Limit, Order, StoreFuture, Subscription, Ttl, check_bounds, check_key, check_member,
    check_score, check_value, ttl_ms,
};

const BACKEND: &str = "redis";

/// How long a subscription whose connection was lost waits between tries to subscribe again.
pub const SUBSCRIBE_RETRY: Duration = Duration::from_millis(250);

/// Creates the counter with a TTL, or increments it and leaves its deadline alone.
const INCR_WITH_TTL: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
";

/// `Cache::throttle` on Redis's own clock (`TIME`), so every node shares one clock as well as
/// the limit. KEYS[1]: the limit; ARGV: interval and horizon in microseconds, burst, count. The key
/// holds the theoretical arrival time in microseconds and expires once the limit is full again.
const THROTTLE: &str = r"
redis.replicate_commands()
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then
  tat = tonumber(stored)
  if not tat then
    return redis.error_reply('ERR value is not an integer or out of range')
  end
end
if tat < now then tat = now end
local due = tat + interval * count
local wait = due - interval * burst - now
if wait < 0 then wait = 0 end
if wait <= horizon then
  redis.call('SET', KEYS[1], string.format('%d', due), 'PX', math.floor((due - now) / 1000) + 2)
end
return wait
";

/// A cache on Redis. Cheap to clone: clones share one multiplexed connection.
#[derive(Clone)]
pub struct RedisCache {
    client: redis::Client,
    connection: ConnectionManager,
    namespace: Vec<u8>,
    incr_with_ttl: Script,
    throttle: Script,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache").field("namespace", &String::from_utf8_lossy(&self.namespace)).finish()
    }
}

impl RedisCache {
    /// Connects to `url` (`redis://host:port/db`) and keeps keys under `namespace`.
    pub async fn connect(url: &str, namespace: &str) -> CacheResult<RedisCache> {
        let client = redis::Client::open(url).map_err(backend)?;
        let connection = client.get_connection_manager().await.map_err(backend)?;
        let mut prefix = namespace.as_bytes().to_vec();
        prefix.push(b':');
        Ok(RedisCache { client, connection, namespace: prefix, incr_with_ttl: Script::new(INCR_WITH_TTL), throttle: Script::new(THROTTLE) })
    }

    /// A connection of its own subscribed to `channel` (namespaced), once Redis confirmed it.
    async fn subscribed(client: &redis::Client, channel: &[u8]) -> CacheResult<PubSub> {
        let mut pubsub = client.get_async_pubsub().await.map_err(backend)?;
        pubsub.subscribe(channel).await.map_err(backend)?;
        Ok(pubsub)
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.namespace.len() + key.len());
        full.extend_from_slice(&self.namespace);
        full.extend_from_slice(key);
        full
    }

    /// Runs `command` on `key` (already checked), mapping Redis's errors to the interface's.
    async fn run<T: FromRedisValue>(&self, key: &[u8], expected: KeyType, command: &Cmd) -> CacheResult<T> {
        let mut connection = self.connection.clone();
        match command.query_async(&mut connection).await {
            Ok(value) => Ok(value),
            Err(e) => Err(self.error(key, expected, e).await),
        }
    }

    async fn error(&self, key: &[u8], expected: KeyType, e: RedisError) -> CacheError {
        let detail = e.detail().unwrap_or_default().to_ascii_lowercase();
        if e.code() == Some("WRONGTYPE") || detail.contains("wrongtype") {
            return match self.stored_type(key).await {
                Ok(Some(found)) => CacheError::WrongType { expected, found },
                Ok(None) => backend_message(format!("WRONGTYPE for a key that no longer exists: {e}")),
                Err(e) => e,
            };
        }
        if detail.contains("would overflow") {
            CacheError::Overflow
        } else if detail.contains("not an integer") {
            CacheError::NotAnInteger
        } else if detail.contains("not a number") || detail.contains("nan") {
            CacheError::NanScore
        } else {
            backend(e)
        }
    }

    async fn stored_type(&self, key: &[u8]) -> CacheResult<Option<KeyType>> {
        let mut connection = self.connection.clone();
        let name: String = cmd("TYPE").arg(self.key(key)).query_async(&mut connection).await.map_err(backend)?;
        match name.as_str() {
            "none" => Ok(None),
            "string" => Ok(Some(KeyType::String)),
            "hash" => Ok(Some(KeyType::Hash)),
            "zset" => Ok(Some(KeyType::SortedSet)),
            other => Err(backend_message(format!("the key holds a Redis {other}, which the cache interface does not use"))),
        }
    }
}

/// Hands one subscription's messages to its receiver until the receiver is dropped: subscribes
/// again whenever the connection is lost, and marks every place where messages may be missing
/// with a [`Delivery::Gap`].
async fn forward(client: redis::Client, channel: Vec<u8>, mut pubsub: PubSub, deliveries: mpsc::Sender<Delivery>) {
    loop {
        let mut messages = pubsub.into_on_message();
        // Messages were dropped for want of room: a gap goes before the next one.
        let mut dropped = false;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                () = deliveries.closed() => return,
            };
            let Some(message) = message else { break };
            if dropped && deliveries.try_send(Delivery::Gap).is_ok() {
                dropped = false;
            }
            match deliveries.try_send(Delivery::Message(Bytes::copy_from_slice(message.get_payload_bytes()))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => dropped = true,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        pubsub = loop {
            if deliveries.is_closed() {
                return;
            }
            match RedisCache::subscribed(&client, &channel).await {
                Ok(pubsub) => break pubsub,
                Err(_) => tokio::time::sleep(SUBSCRIBE_RETRY).await,
            }
        };
        if deliveries.send(Delivery::Gap).await.is_err() {
            return;
        }
    }
}

fn backend(e: RedisError) -> CacheError {
    backend_message(e.to_string())
}

fn backend_message(message: String) -> CacheError {
    CacheError::Backend { backend: BACKEND, message }
}

/// A score as Redis reads it.
fn score_arg(score: f64) -> String {
    if score == f64::INFINITY {
        "+inf".into()
    } else if score == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        score.to_string()
    }
}

fn parse_score(text: &str) -> CacheResult<f64> {
    text.parse::<f64>().map_err(|_| backend_message(format!("a score Redis sent is not a number: {text:?}")))
}

fn bound_arg(bound: Bound<f64>, unbounded: &str) -> String {
    match bound {
        Bound::Included(x) => score_arg(x),
        Bound::Excluded(x) => format!("({}", score_arg(x)),
        Bound::Unbounded => unbounded.into(),
    }
}

fn scored(pairs: Vec<(Vec<u8>, String)>) -> CacheResult<Vec<(Bytes, f64)>> {
    pairs.into_iter().map(|(member, score)| Ok((Bytes::from(member), parse_score(&score)?))).collect()
}

fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl CacheStore for RedisCache {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            check_key(key)?;
            let value: Option<Vec<u8>> = self.run(key, KeyType::String, cmd("GET").arg(self.key(key))).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn set<'a>(&'a self, key: &'a [u8], value: Bytes, ttl: Option<Duration>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            check_key(key)?;
            check_value(&value)?;
            let mut command = cmd("SET");
            command.arg(self.key(key)).arg(value.as_ref());
            if let Some(ttl) = ttl {
                command.arg("PX").arg(ttl_ms(ttl)?);
            }
            self.run::<()>(key, KeyType::String, &command).await
        })
    }

    fn set_nx<'a>(&'a self, key: &'a [u8], value: Bytes, ttl: Option<Duration>) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            check_value(&value)?;
            let mut command = cmd("SET");
            command.arg(self.key(key)).arg(value.as_ref()).arg("NX");
            if let Some(ttl) = ttl {
                command.arg("PX").arg(ttl_ms(ttl)?);
            }
            let reply: Option<String> = self.run(key, KeyType::String, &command).await?;
            Ok(reply.is_some())
        })
    }

    fn del<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let n: i64 = self.run(key, KeyType::String, cmd("DEL").arg(self.key(key))).await?;
            Ok(n > 0)
        })
    }

    fn exists<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let n: i64 = self.run(key, KeyType::String, cmd("EXISTS").arg(self.key(key))).await?;
            Ok(n > 0)
        })
    }

    fn key_type<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Option<KeyType>> {
        Box::pin(async move {
            check_key(key)?;
            self.stored_type(key).await
        })
    }

    fn expire<'a>(&'a self, key: &'a [u8], ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let ms = if ttl.is_zero() { 0 } else { ttl_ms(ttl)? };
            let n: i64 = self.run(key, KeyType::String, cmd("PEXPIRE").arg(self.key(key)).arg(ms)).await?;
            Ok(n > 0)
        })
    }

    fn persist<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            let n: i64 = self.run(key, KeyType::String, cmd("PERSIST").arg(self.key(key))).await?;
            Ok(n > 0)
        })
    }

    fn ttl<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Ttl> {
        Box::pin(async move {
            check_key(key)?;
            let ms: i64 = self.run(key, KeyType::String, cmd("PTTL").arg(self.key(key))).await?;
            Ok(match ms {
                -2 => Ttl::Missing,
                -1 => Ttl::Persistent,
                ms if ms >= 0 => Ttl::Remaining(Duration::from_millis(ms as u64)),
                other => return Err(backend_message(format!("PTTL answered {other}"))),
            })
        })
    }

    fn incr_by<'a>(&'a self, key: &'a [u8], delta: i64) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            check_key(key)?;
            self.run(key, KeyType::String, cmd("INCRBY").arg(self.key(key)).arg(delta)).await
        })
    }

    fn throttle<'a>(&'a self, key: &'a [u8], interval: Duration, burst: u32, horizon: Duration, count: u32) -> StoreFuture<'a, Duration> {
        Box::pin(async move {
            check_key(key)?;
            let interval = interval.as_micros().clamp(1, u128::from(u32::MAX)) as u64;
            let horizon = horizon.as_micros().min(u128::from(u64::MAX >> 12)) as u64;
            let mut connection = self.connection.clone();
            let result: Result<i64, RedisError> = self.throttle.key(self.key(key)).arg(interval).arg(horizon).arg(burst.max(1)).arg(count.max(1)).invoke_async(&mut connection).await;
            match result {
                Ok(wait) => Ok(Duration::from_micros(wait.max(0) as u64)),
                Err(e) => Err(self.error(key, KeyType::String, e).await),
            }
        })
    }

    fn incr_by_with_ttl<'a>(&'a self, key: &'a [u8], delta: i64, ttl: Duration) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            check_key(key)?;
            let ms = ttl_ms(ttl)?;
            let mut connection = self.connection.clone();
            let result = self.incr_with_ttl.key(self.key(key)).arg(delta).arg(ms).invoke_async(&mut connection).await;
            match result {
                Ok(value) => Ok(value),
                Err(e) => Err(self.error(key, KeyType::String, e).await),
            }
        })
    }

    fn hset<'a>(&'a self, key: &'a [u8], field: &'a [u8], value: Bytes) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            check_member(field)?;
            check_value(&value)?;
            let added: i64 = self.run(key, KeyType::Hash, cmd("HSET").arg(self.key(key)).arg(field).arg(value.as_ref())).await?;
            Ok(added > 0)
        })
    }

    fn hget<'a>(&'a self, key: &'a [u8], field: &'a [u8]) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            check_key(key)?;
            check_member(field)?;
            let value: Option<Vec<u8>> = self.run(key, KeyType::Hash, cmd("HGET").arg(self.key(key)).arg(field)).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn hdel<'a>(&'a self, key: &'a [u8], field: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            check_member(field)?;
            let n: i64 = self.run(key, KeyType::Hash, cmd("HDEL").arg(self.key(key)).arg(field)).await?;
            Ok(n > 0)
        })
    }

    fn hgetall<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, Vec<(Bytes, Bytes)>> {
        Box::pin(async move {
            check_key(key)?;
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = self.run(key, KeyType::Hash, cmd("HGETALL").arg(self.key(key))).await?;
            Ok(pairs.into_iter().map(|(f, v)| (Bytes::from(f), Bytes::from(v))).collect())
        })
    }

    fn hlen<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            check_key(key)?;
            self.run(key, KeyType::Hash, cmd("HLEN").arg(self.key(key))).await
        })
    }

    fn hincr_by<'a>(&'a self, key: &'a [u8], field: &'a [u8], delta: i64) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            check_key(key)?;
            check_member(field)?;
            self.run(key, KeyType::Hash, cmd("HINCRBY").arg(self.key(key)).arg(field).arg(delta)).await
        })
    }

    fn zadd<'a>(&'a self, key: &'a [u8], member: &'a [u8], score: f64) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            check_member(member)?;
            check_score(score)?;
            let added: i64 = self.run(key, KeyType::SortedSet, cmd("ZADD").arg(self.key(key)).arg(score_arg(score)).arg(member)).await?;
            Ok(added > 0)
        })
    }

    fn zincr_by<'a>(&'a self, key: &'a [u8], member: &'a [u8], delta: f64) -> StoreFuture<'a, f64> {
        Box::pin(async move {
            check_key(key)?;
            check_member(member)?;
            check_score(delta)?;
            let score: String = self.run(key, KeyType::SortedSet, cmd("ZINCRBY").arg(self.key(key)).arg(score_arg(delta)).arg(member)).await?;
            parse_score(&score)
        })
    }

    fn zrem<'a>(&'a self, key: &'a [u8], member: &'a [u8]) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            check_key(key)?;
            check_member(member)?;
            let n: i64 = self.run(key, KeyType::SortedSet, cmd("ZREM").arg(self.key(key)).arg(member)).await?;
            Ok(n > 0)
        })
    }

    fn zscore<'a>(&'a self, key: &'a [u8], member: &'a [u8]) -> StoreFuture<'a, Option<f64>> {
        Box::pin(async move {
            check_key(key)?;
            check_member(member)?;
            let score: Option<String> = self.run(key, KeyType::SortedSet, cmd("ZSCORE").arg(self.key(key)).arg(member)).await?;
            score.map(|s| parse_score(&s)).transpose()
        })
    }

    fn zcard<'a>(&'a self, key: &'a [u8]) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            check_key(key)?;
            self.run(key, KeyType::SortedSet, cmd("ZCARD").arg(self.key(key))).await
        })
    }

    fn zrank<'a>(&'a self, key: &'a [u8], member: &'a [u8], order: Order) -> StoreFuture<'a, Option<usize>> {
        Box::pin(async move {
            check_key(key)?;
            check_member(member)?;
            let name = match order {
                Order::Asc => "ZRANK",
                Order::Desc => "ZREVRANK",
            };
            self.run(key, KeyType::SortedSet, cmd(name).arg(self.key(key)).arg(member)).await
        })
    }

    fn zcount<'a>(&'a self, key: &'a [u8], min: Bound<f64>, max: Bound<f64>) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            check_key(key)?;
            check_bounds(min, max)?;
            let command = cmd("ZCOUNT").arg(self.key(key)).arg(bound_arg(min, "-inf")).arg(bound_arg(max, "+inf")).to_owned();
            self.run(key, KeyType::SortedSet, &command).await
        })
    }

    fn zrange<'a>(&'a self, key: &'a [u8], start: usize, end: usize, order: Order) -> StoreFuture<'a, Vec<(Bytes, f64)>> {
        Box::pin(async move {
            check_key(key)?;
            if start >= end {
                return Ok(Vec::new());
            }
            let mut command = cmd("ZRANGE");
            command.arg(self.key(key)).arg(clamp(start)).arg(clamp(end - 1));
            if order == Order::Desc {
                command.arg("REV");
            }
            command.arg("WITHSCORES");
            scored(self.run(key, KeyType::SortedSet, &command).await?)
        })
    }

    fn zrange_by_score<'a>(
        &'a self,
        key: &'a [u8],
        min: Bound<f64>,
        max: Bound<f64>,
        order: Order,
        limit: Limit,
    ) -> StoreFuture<'a, Vec<(Bytes, f64)>> {
        Box::pin(async move {
            check_key(key)?;
            check_bounds(min, max)?;
            if limit.count == 0 {
                return Ok(Vec::new());
            }
            let (low, high) = (bound_arg(min, "-inf"), bound_arg(max, "+inf"));
            let mut command = cmd("ZRANGE");
            command.arg(self.key(key));
            match order {
                Order::Asc => command.arg(low).arg(high).arg("BYSCORE"),
                Order::Desc => command.arg(high).arg(low).arg("BYSCORE").arg("REV"),
            };
            let count = if limit.count == usize::MAX { -1 } else { clamp(limit.count) };
            command.arg("LIMIT").arg(clamp(limit.offset)).arg(count).arg("WITHSCORES");
            scored(self.run(key, KeyType::SortedSet, &command).await?)
        })
    }

    fn publish<'a>(&'a self, channel: &'a [u8], message: Bytes) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            check_key(channel)?;
            check_value(&message)?;
            let mut connection = self.connection.clone();
            cmd("PUBLISH").arg(self.key(channel)).arg(message.as_ref()).query_async::<i64>(&mut connection).await.map_err(backend)?;
            Ok(())
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a [u8]) -> StoreFuture<'a, Subscription> {
        Box::pin(async move {
            check_key(channel)?;
            let channel = self.key(channel);
            let pubsub = RedisCache::subscribed(&self.client, &channel).await?;
            let (deliveries, receiver) = mpsc::channel(CACHE_SUBSCRIBER_BUFFER);
            tokio::spawn(forward(self.client.clone(), channel, pubsub, deliveries));
            let stream = futures_util::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|delivery| (delivery, receiver)) });
            Ok(stream.boxed())
        })
    }
}
