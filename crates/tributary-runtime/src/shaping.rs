//! Traffic shaping shared by the systems that send to the outside world (email per recipient
//! domain, notification channels and providers): token buckets, one per key, with a rate and a
//! burst per key; and the doubling retry delay ([`backoff_ms`]) the same systems wait between
//! attempts.
//!
//! A [`TokenBucket`] holds up to `burst` tokens and gains `rate_per_s` per second. Two ways to
//! take one:
//!
//! - [`TokenBucket::try_take`]: a token now, or how long until there is one (nothing taken).
//! - [`TokenBucket::reserve`]: always takes a token, possibly one that becomes available only
//!   later, and says how long to wait for it (the bucket goes into debt, as GCRA does). Callers
//!   that park work until a given time (a queue's delayed redelivery) reserve, so that many
//!   throttled items get increasing slots instead of all waking at the same instant. A reserve
//!   further ahead than `horizon_ms` takes nothing and only reports the wait.
//!
//! Pure: the time is passed in (milliseconds on any monotonic-enough clock), nothing here reads a
//! clock, sleeps or does IO. [`TokenBuckets`] keys buckets by any hashable key and holds at most
//! [`SHAPING_KEYS_MAX`] of them (idle full buckets are forgotten first: a full bucket carries no
//! state).
//!
//! Not here: shaping that adapts to the remote side's answers (KumoMTA's automation) and
//! concurrency limits (connections per destination): those are the caller's.

use std::collections::HashMap;
use std::hash::Hash;

use parking_lot::Mutex;

/// Most buckets one [`TokenBuckets`] holds; beyond it, full (idle) buckets are dropped.
pub const SHAPING_KEYS_MAX: usize = 1_000_000;

/// A rate: `rate_per_s` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub rate_per_s: f64,
    pub burst: u32,
}

impl Rate {
    pub fn new(rate_per_s: f64, burst: u32) -> Rate {
        assert!(rate_per_s > 0.0 && rate_per_s.is_finite(), "a rate is positive and finite");
        Rate { rate_per_s, burst: burst.max(1) }
    }

    /// Milliseconds one token takes to come back.
    fn interval_ms(&self) -> f64 {
        1_000.0 / self.rate_per_s
    }
}

/// One bucket. Kept as a "theoretical arrival time" (GCRA): the instant at which the bucket
/// would be full again; tokens = burst − (tat − now) / interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Milliseconds; may lie in the future (tokens spent) or the past (bucket full).
    tat_ms: f64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new() -> TokenBucket {
        TokenBucket { tat_ms: f64::MIN }
    }

    /// A bucket kept elsewhere (a database row shared by several processes), by the theoretical
    /// arrival time [`TokenBucket::tat_ms`] gave.
    pub fn from_tat_ms(tat_ms: f64) -> TokenBucket {
        TokenBucket { tat_ms }
    }

    /// The theoretical arrival time, to keep the bucket elsewhere.
    pub fn tat_ms(&self) -> f64 {
        self.tat_ms
    }

    /// Take a token now: `Ok(())`, or `Err(wait_ms)` until one is there (nothing taken).
    pub fn try_take(&mut self, rate: Rate, now_ms: u64) -> Result<(), u64> {
        let now = now_ms as f64;
        let interval = rate.interval_ms();
        let tat = self.tat_ms.max(now);
        let next = tat + interval;
        // Allowed while the debt after taking stays within the burst.
        let allowed_at = next - interval * f64::from(rate.burst);
        if allowed_at <= now {
            self.tat_ms = next;
            Ok(())
        } else {
            Err((allowed_at - now).ceil() as u64)
        }
    }

    /// Take a token, possibly from the future: returns how long to wait before using it (0: now).
    /// A wait beyond `horizon_ms` takes nothing and returns that wait.
    pub fn reserve(&mut self, rate: Rate, now_ms: u64, horizon_ms: u64) -> u64 {
        let now = now_ms as f64;
        let interval = rate.interval_ms();
        let tat = self.tat_ms.max(now);
        let next = tat + interval;
        let allowed_at = next - interval * f64::from(rate.burst);
        let wait = (allowed_at - now).max(0.0).ceil() as u64;
        if wait <= horizon_ms {
            self.tat_ms = next;
        }
        wait
    }

    /// Tokens there now (fractional).
    pub fn tokens(&self, rate: Rate, now_ms: u64) -> f64 {
        let debt = (self.tat_ms.max(now_ms as f64) - now_ms as f64) / rate.interval_ms();
        (f64::from(rate.burst) - debt).max(0.0)
    }

    fn is_full(&self, now_ms: u64) -> bool {
        self.tat_ms <= now_ms as f64
    }
}

impl Default for TokenBucket {
    fn default() -> Self {
        TokenBucket::new()
    }
}

/// Token buckets by key, thread-safe. The rate of each key is given at each call (so a change
/// of configuration applies at once).
pub struct TokenBuckets<K> {
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> TokenBuckets<K> {
    pub fn new() -> TokenBuckets<K> {
        TokenBuckets { buckets: Mutex::new(HashMap::new()) }
    }

    /// [`TokenBucket::try_take`] on `key`'s bucket.
    pub fn try_take(&self, key: &K, rate: Rate, now_ms: u64) -> Result<(), u64> {
        let mut buckets = self.buckets.lock();
        Self::make_room(&mut buckets, now_ms);
        buckets.entry(key.clone()).or_default().try_take(rate, now_ms)
    }

    /// [`TokenBucket::reserve`] on `key`'s bucket.
    pub fn reserve(&self, key: &K, rate: Rate, now_ms: u64, horizon_ms: u64) -> u64 {
        let mut buckets = self.buckets.lock();
        Self::make_room(&mut buckets, now_ms);
        buckets.entry(key.clone()).or_default().reserve(rate, now_ms, horizon_ms)
    }

    /// Tokens `key` has now.
    pub fn tokens(&self, key: &K, rate: Rate, now_ms: u64) -> f64 {
        self.buckets.lock().get(key).map_or(f64::from(rate.burst), |b| b.tokens(rate, now_ms))
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(buckets: &mut HashMap<K, TokenBucket>, now_ms: u64) {
        if buckets.len() >= SHAPING_KEYS_MAX {
            buckets.retain(|_, bucket| !bucket.is_full(now_ms));
        }
    }
}

impl<K: Hash + Eq + Clone> Default for TokenBuckets<K> {
    fn default() -> Self {
        TokenBuckets::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_gives_its_burst_then_one_token_per_interval() {
        let rate = Rate::new(10.0, 3);
        let mut bucket = TokenBucket::new();
        for _ in 0..3 {
            assert_eq!(bucket.try_take(rate, 1_000), Ok(()));
        }
        assert_eq!(bucket.try_take(rate, 1_000), Err(100));
        assert_eq!(bucket.try_take(rate, 1_099), Err(1));
        assert_eq!(bucket.try_take(rate, 1_100), Ok(()));
        assert_eq!(bucket.try_take(rate, 1_100), Err(100));
    }

    #[test]
    fn reservations_hand_out_increasing_slots_and_stop_at_the_horizon() {
        let rate = Rate::new(10.0, 1);
        let mut bucket = TokenBucket::new();
        let waits: Vec<u64> = (0..4).map(|_| bucket.reserve(rate, 0, 250)).collect();
        assert_eq!(waits, vec![0, 100, 200, 300]);
        // The 300 ms slot was beyond the horizon, so it was not taken: the next asks the same.
        assert_eq!(bucket.reserve(rate, 0, 1_000), 300);
        assert_eq!(bucket.try_take(rate, 350), Err(50));
    }

    #[test]
    fn a_long_idle_bucket_refills_only_up_to_its_burst() {
        let rate = Rate::new(1.0, 2);
        let mut bucket = TokenBucket::new();
        assert_eq!(bucket.try_take(rate, 0), Ok(()));
        assert!((bucket.tokens(rate, 0) - 1.0).abs() < 1e-9);
        assert_eq!(bucket.tokens(rate, 1_000_000), 2.0);
        assert_eq!(bucket.try_take(rate, 1_000_000), Ok(()));
        assert_eq!(bucket.try_take(rate, 1_000_000), Ok(()));
        assert_eq!(bucket.try_take(rate, 1_000_000), Err(1_000));
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let buckets = TokenBuckets::new();
        let rate = Rate::new(1.0, 1);
        assert_eq!(buckets.try_take(&"a.example", rate, 0), Ok(()));
        assert_eq!(buckets.try_take(&"b.example", rate, 0), Ok(()));
        assert_eq!(buckets.try_take(&"a.example", rate, 0), Err(1_000));
        assert_eq!(buckets.len(), 2);
    }
}

/// Delay before the next attempt after `failed` failed ones: `base_ms * 2^(failed - 1)`, capped
/// at `max_ms` (and never overflowing).
pub fn backoff_ms(base_ms: u64, max_ms: u64, failed: u32) -> u64 {
    let factor = 1u64 << failed.saturating_sub(1).min(40);
    base_ms.saturating_mul(factor).min(max_ms)
}

#[cfg(test)]
mod backoff_tests {
    #[test]
    fn the_delay_doubles_from_the_base_up_to_the_cap() {
        assert_eq!([0, 1, 2, 3, 4, 60].map(|f| super::backoff_ms(100, 350, f)), [100, 100, 200, 350, 350, 350]);
        assert_eq!(super::backoff_ms(u64::MAX / 2, u64::MAX, 50), u64::MAX);
    }
}
