//! Rate limits (token buckets) on what a system sends out, per key (a channel, a provider).
//!
//! [`RateLimits::local`] keeps this node's own buckets ([`TokenBuckets`]): on N nodes a rate
//! holds per node, so N times over. [`RateLimits::shared`] takes every slot from the cache every
//! node shares ([`CacheStore::throttle`], on Redis's clock), so a rate holds for the whole
//! deployment: one round trip to the cache per slot. When the cache does not answer, the node
//! falls back to buckets of its own for that call (each node then allows the whole rate) and
//! logs it, rather than stopping its sends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tributary_engine::cache::CacheStore;
use tributary_runtime::shaping::{Rate, TokenBuckets};

/// A system's rate limits, kept by this node or shared by every node.
pub struct RateLimits {
    /// The shared cache and the prefix of this system's keys in it.
    shared: Option<(Arc<dyn CacheStore>, String)>,
    /// This node's buckets: all of them when local, the fallback when shared.
    local: TokenBuckets<String>,
    /// Slots taken from the node's own buckets because the shared cache failed.
    fallbacks: AtomicU64,
}

impl RateLimits {
    /// Buckets of this node only.
    pub fn local() -> RateLimits {
        RateLimits { shared: None, local: TokenBuckets::new(), fallbacks: AtomicU64::new(0) }
    }

    /// Buckets every node shares through `cache`, under keys `rate/<system>/<key>`.
    pub fn shared(cache: Arc<dyn CacheStore>, system: &str) -> RateLimits {
        RateLimits { shared: Some((cache, format!("rate/{system}/"))), local: TokenBuckets::new(), fallbacks: AtomicU64::new(0) }
    }

    /// Whether every node shares these limits.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Slots taken from this node's own buckets because the shared cache failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Takes a slot of `key`'s bucket at `rate` if it is due within `horizon_ms`, and returns
    /// the milliseconds until it is (0: now). A wait over `horizon_ms` took nothing.
    /// `now_ms` is this node's clock (the shared buckets use the cache's).
    pub async fn take(&self, key: &str, rate: Rate, now_ms: u64, horizon_ms: u64) -> u64 {
        if let Some((cache, prefix)) = &self.shared {
            let interval = Duration::from_secs_f64(1.0 / rate.rate_per_s);
            match cache.throttle(format!("{prefix}{key}").as_bytes(), interval, rate.burst, Duration::from_millis(horizon_ms)).await {
                Ok(wait) => return wait.as_micros().div_ceil(1_000).min(u128::from(u64::MAX)) as u64,
                Err(error) => {
                    if self.fallbacks.fetch_add(1, Ordering::Relaxed) % 1_000 == 0 {
                        tracing::warn!(%error, key, "the shared rate limit did not answer; this node limits on its own");
                    }
                }
            }
        }
        self.local.reserve(&key.to_string(), rate, now_ms, horizon_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_engine::cache::{Cache, CacheConfig};

    #[tokio::test]
    async fn limits_on_one_cache_share_their_buckets_and_fall_back_to_their_own_when_it_fails() {
        let cache = Arc::new(Cache::new(CacheConfig::default()));
        let (a, b) = (RateLimits::shared(cache.clone(), "sys"), RateLimits::shared(cache.clone(), "sys"));
        let rate = Rate::new(0.01, 3);
        let now = tributary_core::now_ms() as u64;
        let free = [a.take("k", rate, now, 0).await, b.take("k", rate, now, 0).await, a.take("k", rate, now, 0).await, b.take("k", rate, now, 0).await];
        assert_eq!(free.iter().filter(|w| **w == 0).count(), 3, "two nodes share one burst of 3: {free:?}");
        assert!(free[3] > 99_000, "the fourth waits about 100 s: {}", free[3]);
        assert!(RateLimits::local().take("k", rate, now, 0).await == 0, "a node's own buckets are its own");

        // A cache that fails (here: the key holds text): this node's own bucket, counted.
        CacheStore::set(&*cache, b"rate/sys/broken", bytes::Bytes::from_static(b"text"), None).await.unwrap();
        let waits = [a.take("broken", rate, now, 0).await, a.take("broken", rate, now, 0).await, a.take("broken", rate, now, 0).await, a.take("broken", rate, now, 0).await];
        assert_eq!(waits.iter().filter(|w| **w == 0).count(), 3, "the fallback bucket gives its burst: {waits:?}");
        assert_eq!((a.fallbacks(), b.fallbacks()), (4, 0));
    }
}
