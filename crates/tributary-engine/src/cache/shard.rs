//! One lock shard: its entries, its expiry index, and the admission rule for new keys.
//!
//! Entries live in an `IndexMap` so that approximate LRU can sample random entries in O(1).
//! Entries with a TTL are also in `expiries`, ordered by deadline, so that active expiry removes
//! exactly the expired keys, oldest deadline first, in O(log n) each.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use indexmap::IndexMap;
use tributary_core::limits::{CACHE_ADMIT_EXPIRE_BUDGET, CACHE_EVICTION_SAMPLES};

use super::sorted_set::SortedSet;
use super::{CacheError, CacheResult, EvictionPolicy, KeyType};

pub(crate) enum Value {
    Str(Bytes),
    /// A string that holds a counter: kept as a number so `incr_by` does not parse and format.
    Int(i64),
    // Boxed so that a `Value` stays the size of `Bytes`: most entries are strings.
    #[allow(clippy::box_collection)]
    Hash(Box<HashMap<Bytes, Bytes>>),
    ZSet(Box<SortedSet>),
}

impl Value {
    pub(crate) fn key_type(&self) -> KeyType {
        match self {
            Value::Str(_) | Value::Int(_) => KeyType::String,
            Value::Hash(_) => KeyType::Hash,
            Value::ZSet(_) => KeyType::SortedSet,
        }
    }
}

pub(crate) struct Entry {
    pub(crate) value: Value,
    pub(crate) expires_at_ms: Option<i64>,
    /// The shard's access tick when the entry was last read or written (for LRU).
    last_access: u64,
}

/// What every shard shares: the entry count across shards and the bound on it.
pub(crate) struct Capacity {
    pub(crate) len: AtomicUsize,
    pub(crate) max_entries: Option<usize>,
    pub(crate) policy: EvictionPolicy,
}

pub(crate) struct Shard {
    map: IndexMap<Bytes, Entry>,
    expiries: BTreeSet<(i64, Bytes)>,
    tick: u64,
    rng: u64,
}

pub(crate) fn is_expired(expires_at_ms: Option<i64>, now_ms: i64) -> bool {
    expires_at_ms.is_some_and(|at| at <= now_ms)
}

impl Shard {
    pub(crate) fn new(seed: u64) -> Shard {
        Shard { map: IndexMap::new(), expiries: BTreeSet::new(), tick: 0, rng: seed | 1 }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The index of the live entry for `key`, removing it first if it has expired.
    pub(crate) fn find(&mut self, key: &[u8], now_ms: i64, cap: &Capacity) -> Option<usize> {
        let idx = self.map.get_index_of(key)?;
        let entry = &mut self.map[idx];
        if is_expired(entry.expires_at_ms, now_ms) {
            self.remove_at(idx, cap);
            return None;
        }
        self.tick += 1;
        entry.last_access = self.tick;
        Some(idx)
    }

    pub(crate) fn entry(&mut self, idx: usize) -> &mut Entry {
        &mut self.map[idx]
    }

    /// Insert a new entry for `key`, which must be absent, after making room for it.
    pub(crate) fn insert(
        &mut self,
        key: &[u8],
        value: Value,
        expires_at_ms: Option<i64>,
        now_ms: i64,
        cap: &Capacity,
    ) -> CacheResult<usize> {
        debug_assert!(!self.map.contains_key(key));
        self.admit(now_ms, cap)?;
        let key = Bytes::copy_from_slice(key);
        if let Some(at) = expires_at_ms {
            self.expiries.insert((at, key.clone()));
        }
        self.tick += 1;
        let (idx, _) = self.map.insert_full(key, Entry { value, expires_at_ms, last_access: self.tick });
        Ok(idx)
    }

    /// Replace the deadline of the entry at `idx`.
    pub(crate) fn set_expiry(&mut self, idx: usize, expires_at_ms: Option<i64>) {
        let (key, entry) = self.map.get_index_mut(idx).expect("index from find");
        if entry.expires_at_ms == expires_at_ms {
            return;
        }
        if let Some(old) = entry.expires_at_ms {
            let removed = self.expiries.remove(&(old, key.clone()));
            debug_assert!(removed, "every deadline is indexed");
        }
        if let Some(at) = expires_at_ms {
            self.expiries.insert((at, key.clone()));
        }
        entry.expires_at_ms = expires_at_ms;
    }

    pub(crate) fn remove_at(&mut self, idx: usize, cap: &Capacity) -> Entry {
        let (key, entry) = self.map.swap_remove_index(idx).expect("index from find");
        if let Some(at) = entry.expires_at_ms {
            let removed = self.expiries.remove(&(at, key));
            debug_assert!(removed, "every deadline is indexed");
        }
        cap.len.fetch_sub(1, Ordering::Relaxed);
        entry
    }

    /// Remove up to `budget` expired entries, earliest deadline first. Returns how many.
    pub(crate) fn expire(&mut self, now_ms: i64, budget: usize, cap: &Capacity) -> usize {
        let mut removed = 0;
        while removed < budget {
            let Some((at, key)) = self.expiries.first() else { break };
            if *at > now_ms {
                break;
            }
            let idx = self.map.get_index_of(key).expect("every indexed deadline has an entry");
            self.remove_at(idx, cap);
            removed += 1;
        }
        removed
    }

    /// Every live entry, for a snapshot.
    pub(crate) fn live(&self, now_ms: i64) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.map.iter().filter(move |(_, e)| !is_expired(e.expires_at_ms, now_ms))
    }

    pub(crate) fn clear(&mut self, cap: &Capacity) {
        cap.len.fetch_sub(self.map.len(), Ordering::Relaxed);
        self.map.clear();
        self.expiries.clear();
    }

    /// Count one more entry against the bound, reclaiming expired entries, then refusing or
    /// evicting as the policy says.
    fn admit(&mut self, now_ms: i64, cap: &Capacity) -> CacheResult<()> {
        let Some(max) = cap.max_entries else {
            cap.len.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        if cap.len.load(Ordering::Relaxed) >= max {
            self.expire(now_ms, CACHE_ADMIT_EXPIRE_BUDGET, cap);
        }
        match cap.policy {
            EvictionPolicy::Refuse => {
                // Add first, then check: two racing writers cannot both take the last slot.
                if cap.len.fetch_add(1, Ordering::AcqRel) >= max {
                    cap.len.fetch_sub(1, Ordering::AcqRel);
                    return Err(CacheError::Full { max_entries: max });
                }
            }
            EvictionPolicy::LruApprox => {
                // Only this shard is locked, so only its entries can go; a shard with none
                // admits anyway (the overshoot is at most one entry per shard).
                while cap.len.load(Ordering::Relaxed) >= max && !self.map.is_empty() {
                    self.evict_one(now_ms, cap);
                }
                cap.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Remove the least recently used of a few sampled entries (an expired one first).
    fn evict_one(&mut self, now_ms: i64, cap: &Capacity) {
        let len = self.map.len() as u64;
        let mut victim: Option<(usize, u64)> = None;
        for _ in 0..CACHE_EVICTION_SAMPLES {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let idx = (self.rng % len) as usize;
            let entry = &self.map[idx];
            let age_key = if is_expired(entry.expires_at_ms, now_ms) { 0 } else { entry.last_access };
            if victim.is_none_or(|(_, best)| age_key < best) {
                victim = Some((idx, age_key));
            }
        }
        let (idx, _) = victim.expect("the shard is not empty");
        self.remove_at(idx, cap);
    }

    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let deadlines = self.map.values().filter(|e| e.expires_at_ms.is_some()).count();
        assert_eq!(deadlines, self.expiries.len());
        for (at, key) in &self.expiries {
            assert_eq!(self.map[key].expires_at_ms, Some(*at));
        }
    }
}
