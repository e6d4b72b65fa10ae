//! Rate limits (token buckets) on what a system sends out, per key (a channel, a provider).
//!
//! [`RateLimits::local`] keeps this node's own buckets ([`TokenBuckets`]): on N nodes a rate
//! holds per node, so N times over. [`RateLimits::shared`] takes the slots from the cache every
//! node shares ([`CacheStore::throttle`], on Redis's clock), so a rate holds for the whole
//! deployment. A round trip per slot would cost more than the send at high rates, so a node
//! takes slots a lease at a time and spends them on its next calls for that key; what it has
//! not spent within [`RATE_LEASE`] is dropped: unused, never sent. A lease is sized by use:
//! the first is one slot, the next twice what the node spent of the last one (doubling while
//! it spends them all in time), never more than the rate gives in [`RATE_LEASE`] nor a
//! [`RATE_LEASE_BURST_DIVISOR`]th of the burst. The deployment never passes the rate; it may
//! fall short of it by the unspent slots in hand. A tight limit (a burst under 20, or a rate
//! under 100/s) leases one slot at a time. Slots are timed in microseconds: a shared limit
//! over 1,000,000/s holds as 1,000,000/s.
//!
//! When the cache does not answer, the node falls back to buckets of its own for that call (each
//! node then allows the whole rate) and counts and logs it, rather than stopping its sends.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tributary_engine::cache::CacheStore;
use tributary_runtime::shaping::{Rate, TokenBuckets};

/// How long a lease of slots taken from a shared limit may be spent by its node.
pub const RATE_LEASE: Duration = Duration::from_millis(20);
/// A lease holds at most this fraction of the limit's burst.
pub const RATE_LEASE_BURST_DIVISOR: u32 = 10;

/// Slots of one key a node has taken from the shared limit and not yet spent.
#[derive(Clone, Copy)]
struct Lease {
    size: u32,
    left: u32,
    until_ms: u64,
}

impl Lease {
    /// The size of the next lease after this one, at most `max`.
    fn next_size(&self, now_ms: u64, max: u32) -> u32 {
        let spent = self.size - self.left;
        let next = if self.left == 0 && now_ms < self.until_ms { self.size.saturating_mul(2) } else { spent.saturating_mul(2) };
        next.clamp(1, max.max(1))
    }
}

/// A system's rate limits, kept by this node or shared by every node.
pub struct RateLimits {
    /// The shared cache and the prefix of this system's keys in it.
    shared: Option<(Arc<dyn CacheStore>, String)>,
    /// Leases in hand, by key (shared limits only).
    leases: Mutex<HashMap<String, Lease>>,
    /// This node's buckets: all of them when local, the fallback when shared.
    local: TokenBuckets<String>,
    /// Slots taken from the node's own buckets because the shared cache failed.
    fallbacks: AtomicU64,
}

impl RateLimits {
    /// Buckets of this node only.
    pub fn local() -> RateLimits {
        RateLimits { shared: None, leases: Mutex::new(HashMap::new()), local: TokenBuckets::new(), fallbacks: AtomicU64::new(0) }
    }

    /// Buckets every node shares through `cache`, under keys `rate/<system>/<key>`.
    pub fn shared(cache: Arc<dyn CacheStore>, system: &str) -> RateLimits {
        RateLimits { shared: Some((cache, format!("rate/{system}/"))), ..RateLimits::local() }
    }

    /// Whether every node shares these limits.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Slots taken from this node's own buckets because the shared cache failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Slots a lease of `rate` holds at most.
    fn lease_size_max(rate: Rate) -> u32 {
        let by_rate = (rate.rate_per_s * RATE_LEASE.as_secs_f64()).floor();
        let by_burst = f64::from(rate.burst / RATE_LEASE_BURST_DIVISOR);
        by_rate.min(by_burst).clamp(1.0, f64::from(u32::MAX)) as u32
    }

    /// Records `size` slots just taken for `key`, one of them spent. Calls that renewed a lease
    /// at the same time add to the one in hand rather than drop it.
    fn add_lease(&self, key: &str, size: u32, now_ms: u64) {
        let mut leases = self.leases.lock();
        match leases.get_mut(key) {
            Some(lease) if now_ms < lease.until_ms => {
                lease.size = lease.size.saturating_add(size);
                lease.left = lease.left.saturating_add(size - 1);
            }
            _ => {
                leases.insert(key.to_string(), Lease { size, left: size - 1, until_ms: now_ms + RATE_LEASE.as_millis() as u64 });
            }
        }
    }

    /// Takes a slot of `key`'s bucket at `rate` if it is due within `horizon_ms`, and returns
    /// the milliseconds until it is (0: now). A wait over `horizon_ms` took nothing.
    /// `now_ms` is this node's clock (the shared buckets use the cache's).
    pub async fn take(&self, key: &str, rate: Rate, now_ms: u64, horizon_ms: u64) -> u64 {
        let Some((cache, prefix)) = &self.shared else { return self.local.reserve(&key.to_string(), rate, now_ms, horizon_ms) };
        // Leases are timed by the clock as it is now: a caller's `now_ms` may be from before
        // its own awaits.
        let now_ms = tributary_core::now_ms() as u64;
        let size = {
            let mut leases = self.leases.lock();
            match leases.get_mut(key) {
                Some(lease) if lease.left > 0 && now_ms < lease.until_ms => {
                    lease.left -= 1;
                    return 0;
                }
                Some(lease) => lease.next_size(now_ms, Self::lease_size_max(rate)),
                None => 1,
            }
        };
        let full_key = format!("{prefix}{key}");
        let interval = Duration::from_secs_f64(1.0 / rate.rate_per_s);
        if size > 1 {
            match cache.throttle(full_key.as_bytes(), interval, rate.burst, Duration::ZERO, size).await {
                Ok(wait) if wait.is_zero() => {
                    self.add_lease(key, size, now_ms);
                    return 0;
                }
                // Not free now: one slot, below.
                Ok(_) => {}
                Err(error) => return self.fall_back(error, key, rate, now_ms, horizon_ms),
            }
        }
        match cache.throttle(full_key.as_bytes(), interval, rate.burst, Duration::from_millis(horizon_ms), 1).await {
            Ok(wait) => {
                if wait.is_zero() {
                    self.add_lease(key, 1, now_ms);
                }
                wait.as_micros().div_ceil(1_000).min(u128::from(u64::MAX)) as u64
            }
            Err(error) => self.fall_back(error, key, rate, now_ms, horizon_ms),
        }
    }

    /// A slot from this node's own bucket, when the shared cache failed: counted, and logged
    /// once per 1,000.
    fn fall_back(&self, error: tributary_engine::cache::CacheError, key: &str, rate: Rate, now_ms: u64, horizon_ms: u64) -> u64 {
        if self.fallbacks.fetch_add(1, Ordering::Relaxed).is_multiple_of(1_000) {
            tracing::warn!(%error, key, "the shared rate limit did not answer; this node limits on its own");
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_taking_leases_together_never_pass_the_rate() {
        let cache = Arc::new(Cache::new(CacheConfig::default()));
        // 1,000/s with a burst of 100: leases of 10 slots.
        let rate = Rate::new(1_000.0, 100);
        assert_eq!(RateLimits::lease_size_max(rate), 10);
        let started = std::time::Instant::now();
        let node = |limits: RateLimits| {
            tokio::spawn(async move {
                let mut taken = 0u64;
                while started.elapsed() < Duration::from_millis(100) {
                    if limits.take("k", rate, tributary_core::now_ms() as u64, 0).await == 0 {
                        taken += 1;
                    }
                    tokio::task::yield_now().await;
                }
                (taken, limits.fallbacks())
            })
        };
        let (a, b) = (node(RateLimits::shared(cache.clone(), "sys")), node(RateLimits::shared(cache.clone(), "sys")));
        let ((taken_a, fallbacks_a), (taken_b, fallbacks_b)) = (a.await.unwrap(), b.await.unwrap());
        let allowed = 100.0 + 1_000.0 * started.elapsed().as_secs_f64();
        let taken = taken_a + taken_b;
        assert!((taken as f64) <= allowed.ceil(), "two nodes took {taken} slots, over the {allowed:.0} the rate allows");
        assert!(taken >= 80 && taken_a > 0 && taken_b > 0, "the nodes took {taken_a} and {taken_b} slots");
        assert_eq!((fallbacks_a, fallbacks_b), (0, 0));
    }
}
