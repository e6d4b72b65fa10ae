//! A single-threaded throughput probe of the cache's hot paths. A probe, not a benchmark
//! report: it has no latency percentiles and no load shape; `tributary bench` is for those.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;

use super::{Cache, CacheConfig};

/// Operations per second of one thread, each phase on `ops` distinct keys or members.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CacheBench {
    pub ops: usize,
    /// `set` of a new 64-byte value without TTL.
    pub set_per_sec: f64,
    /// `get` of an existing key.
    pub get_per_sec: f64,
    /// `zadd` of a new member into one sorted set that grows to `ops` members.
    pub zadd_per_sec: f64,
    /// `zrank` of a random member of that set.
    pub zrank_per_sec: f64,
}

/// Measure `ops` each of set, get, zadd and zrank on a fresh default cache, single-threaded.
pub fn bench_cache(ops: usize) -> CacheBench {
    let ops = ops.max(1);
    let cache = Cache::new(CacheConfig::default());
    let keys: Vec<Vec<u8>> = (0..ops).map(|i| format!("bench:key:{i}").into_bytes()).collect();
    let members: Vec<Vec<u8>> = (0..ops).map(|i| format!("player:{i}").into_bytes()).collect();
    let value = Bytes::from_static(&[7u8; 64]);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let scores: Vec<f64> = (0..ops).map(|_| (next() % 1_000_000) as f64).collect();
    let probe: Vec<usize> = (0..ops).map(|_| (next() % ops as u64) as usize).collect();

    let rate = |start: Instant| ops as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    for key in &keys {
        cache.set(key, value.clone(), None).expect("no limit is near");
    }
    let set_per_sec = rate(start);

    let start = Instant::now();
    for &i in &probe {
        black_box(cache.get(&keys[i]).expect("a string"));
    }
    let get_per_sec = rate(start);

    let start = Instant::now();
    for (member, score) in members.iter().zip(&scores) {
        cache.zadd(b"bench:board", member, *score).expect("no limit is near");
    }
    let zadd_per_sec = rate(start);

    let start = Instant::now();
    for &i in &probe {
        black_box(cache.zrank(b"bench:board", &members[i]).expect("a sorted set"));
    }
    let zrank_per_sec = rate(start);

    CacheBench { ops, set_per_sec, get_per_sec, zadd_per_sec, zrank_per_sec }
}
