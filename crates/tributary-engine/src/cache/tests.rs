//! Feature tests of the cache through its public API, on a manual clock.

use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tributary_core::limits::{CACHE_KEY_BYTES_MAX, CACHE_MEMBER_BYTES_MAX, CACHE_VALUE_BYTES_MAX};

use super::*;

const T0: i64 = 1_700_000_000_000;

fn cache_with(config: CacheConfig) -> (Cache, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (Cache::with_clock(config, clock.clone()), clock)
}

fn cache() -> (Cache, Arc<ManualClock>) {
    cache_with(CacheConfig::default())
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn names(items: &[(Bytes, f64)]) -> Vec<&str> {
    items.iter().map(|(m, _)| std::str::from_utf8(m).unwrap()).collect()
}

/// A leaderboard: alice 10, bob 20, carol 20, dave 5, erin 30.
fn leaderboard(cache: &Cache) {
    for (m, s) in [("alice", 10.0), ("bob", 20.0), ("carol", 20.0), ("dave", 5.0), ("erin", 30.0)] {
        cache.zadd(b"board", m.as_bytes(), s).unwrap();
    }
}

// ---- strings and keys ----

#[test]
fn set_then_get_returns_the_value() {
    let (c, _) = cache();
    c.set(b"k", "v", None).unwrap();
    assert_eq!(c.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(c.get(b"missing").unwrap(), None);
    assert!(c.exists(b"k"));
    assert_eq!(c.key_type(b"k"), Some(KeyType::String));
}

#[test]
fn set_nx_sets_only_an_absent_key() {
    let (c, clock) = cache();
    assert!(c.set_nx(b"lock", "a", Some(secs(10))).unwrap());
    assert!(!c.set_nx(b"lock", "b", None).unwrap());
    assert_eq!(c.get(b"lock").unwrap().as_deref(), Some(&b"a"[..]));
    clock.advance(secs(10));
    assert!(c.set_nx(b"lock", "b", None).unwrap(), "an expired key is absent");
}

#[test]
fn del_removes_a_key_and_says_whether_it_existed() {
    let (c, _) = cache();
    c.set(b"k", "v", None).unwrap();
    assert!(c.del(b"k"));
    assert!(!c.del(b"k"));
    assert!(!c.exists(b"k"));
    assert!(c.is_empty());
}

#[test]
fn a_key_expires_when_its_ttl_has_passed() {
    let (c, clock) = cache();
    c.set(b"session", "s", Some(Duration::from_millis(1500))).unwrap();
    clock.advance(Duration::from_millis(1499));
    assert_eq!(c.ttl(b"session"), Ttl::Remaining(Duration::from_millis(1)));
    assert!(c.exists(b"session"));
    clock.advance(Duration::from_millis(1));
    assert_eq!(c.get(b"session").unwrap(), None);
    assert_eq!(c.ttl(b"session"), Ttl::Missing);
    assert!(c.is_empty(), "lazy expiry removed it on access");
}

#[test]
fn set_without_ttl_clears_a_previous_ttl() {
    let (c, clock) = cache();
    c.set(b"k", "v1", Some(secs(1))).unwrap();
    c.set(b"k", "v2", None).unwrap();
    clock.advance(secs(5));
    assert_eq!(c.ttl(b"k"), Ttl::Persistent);
    c.check_invariants();
}

#[test]
fn expire_and_persist_change_the_deadline() {
    let (c, clock) = cache();
    c.set(b"k", "v", None).unwrap();
    assert!(c.expire(b"k", secs(2)).unwrap());
    assert_eq!(c.ttl(b"k"), Ttl::Remaining(secs(2)));
    assert!(c.persist(b"k"));
    assert!(!c.persist(b"k"), "no TTL left to remove");
    clock.advance(secs(3));
    assert!(c.exists(b"k"));
    assert!(!c.expire(b"missing", secs(1)).unwrap());
    c.check_invariants();
}

#[test]
fn expire_with_a_zero_ttl_deletes_the_key() {
    let (c, _) = cache();
    c.set(b"k", "v", None).unwrap();
    assert!(c.expire(b"k", Duration::ZERO).unwrap());
    assert!(!c.exists(b"k"));
}

#[test]
fn a_zero_or_huge_ttl_on_set_is_refused() {
    let (c, _) = cache();
    assert!(matches!(c.set(b"k", "v", Some(Duration::ZERO)), Err(CacheError::InvalidTtl { .. })));
    assert!(matches!(c.set(b"k", "v", Some(secs(u64::MAX / 4))), Err(CacheError::InvalidTtl { .. })));
    assert!(!c.exists(b"k"));
}

#[test]
fn keys_and_values_over_their_limits_are_refused() {
    let (c, _) = cache();
    let big_key = vec![b'k'; CACHE_KEY_BYTES_MAX + 1];
    assert!(matches!(c.set(&big_key, "v", None), Err(CacheError::KeyTooLarge { .. })));
    let big_value = vec![0u8; CACHE_VALUE_BYTES_MAX + 1];
    assert!(matches!(c.set(b"k", big_value, None), Err(CacheError::ValueTooLarge { .. })));
    c.set(b"k", vec![0u8; CACHE_VALUE_BYTES_MAX], None).unwrap();
    let big_member = vec![b'm'; CACHE_MEMBER_BYTES_MAX + 1];
    assert!(matches!(c.zadd(b"z", &big_member, 1.0), Err(CacheError::MemberTooLarge { .. })));
    assert!(matches!(c.hset(b"h", &big_member, "v"), Err(CacheError::MemberTooLarge { .. })));
}

#[test]
fn using_a_key_as_another_type_is_a_wrongtype_error() {
    let (c, _) = cache();
    c.set(b"s", "v", None).unwrap();
    c.hset(b"h", b"f", "v").unwrap();
    c.zadd(b"z", b"m", 1.0).unwrap();
    let err = c.zadd(b"s", b"m", 1.0).unwrap_err();
    assert!(matches!(err, CacheError::WrongType { expected: KeyType::SortedSet, found: KeyType::String }));
    assert!(err.to_string().starts_with("WRONGTYPE"), "{err}");
    assert!(matches!(c.get(b"h"), Err(CacheError::WrongType { found: KeyType::Hash, .. })));
    assert!(matches!(c.incr_by(b"z", 1), Err(CacheError::WrongType { .. })));
    assert!(matches!(c.hget(b"z", b"f"), Err(CacheError::WrongType { .. })));
    assert!(matches!(c.zrank(b"h", b"m"), Err(CacheError::WrongType { .. })));
    c.set(b"h", "now a string", None).unwrap();
    assert_eq!(c.key_type(b"h"), Some(KeyType::String), "set replaces any type, as Redis");
}

// ---- counters ----

#[test]
fn incr_by_counts_from_zero_and_reads_back_as_text() {
    let (c, _) = cache();
    assert_eq!(c.incr_by(b"n", 5).unwrap(), 5);
    assert_eq!(c.incr_by(b"n", -7).unwrap(), -2);
    assert_eq!(c.get(b"n").unwrap().as_deref(), Some(&b"-2"[..]));
    c.set(b"m", "41", None).unwrap();
    assert_eq!(c.incr_by(b"m", 1).unwrap(), 42);
}

#[test]
fn incr_by_past_i64_max_is_an_overflow_error_and_keeps_the_value() {
    let (c, _) = cache();
    c.incr_by(b"n", i64::MAX - 1).unwrap();
    assert!(matches!(c.incr_by(b"n", 2), Err(CacheError::Overflow)));
    assert_eq!(c.incr_by(b"n", 0).unwrap(), i64::MAX - 1);
}

#[test]
fn incr_by_on_text_that_is_not_an_integer_is_refused() {
    let (c, _) = cache();
    c.set(b"s", "twelve", None).unwrap();
    assert!(matches!(c.incr_by(b"s", 1), Err(CacheError::NotAnInteger)));
    c.set(b"f", "1.5", None).unwrap();
    assert!(matches!(c.incr_by(b"f", 1), Err(CacheError::NotAnInteger)));
}

#[test]
fn incr_by_with_ttl_starts_a_window_only_when_it_creates_the_counter() {
    let (c, clock) = cache();
    assert_eq!(c.incr_by_with_ttl(b"rate:ip", 1, secs(60)).unwrap(), 1);
    clock.advance(secs(30));
    assert_eq!(c.incr_by_with_ttl(b"rate:ip", 1, secs(60)).unwrap(), 2);
    assert_eq!(c.ttl(b"rate:ip"), Ttl::Remaining(secs(30)), "the window did not slide");
    clock.advance(secs(30));
    assert_eq!(c.incr_by_with_ttl(b"rate:ip", 1, secs(60)).unwrap(), 1, "a new window");
}

#[test]
fn incr_by_float_adds_and_keeps_the_result_finite() {
    let (c, _) = cache();
    assert_eq!(c.incr_by_float(b"price", 10.5).unwrap(), 10.5);
    assert_eq!(c.incr_by_float(b"price", -0.25).unwrap(), 10.25);
    assert_eq!(c.get(b"price").unwrap().as_deref(), Some(&b"10.25"[..]));
    c.incr_by(b"n", 3).unwrap();
    assert_eq!(c.incr_by_float(b"n", 0.5).unwrap(), 3.5);
    assert!(matches!(c.incr_by_float(b"price", f64::INFINITY), Err(CacheError::NotAFloat)));
    c.set(b"big", "1e308", None).unwrap();
    assert!(matches!(c.incr_by_float(b"big", 1e308), Err(CacheError::NotAFloat)));
}

// ---- hashes ----

#[test]
fn hset_and_hget_store_fields_of_one_key() {
    let (c, _) = cache();
    assert!(c.hset(b"user:1", b"name", "Ada").unwrap());
    assert!(c.hset(b"user:1", b"lang", "en").unwrap());
    assert!(!c.hset(b"user:1", b"lang", "fr").unwrap(), "an update, not a new field");
    assert_eq!(c.hget(b"user:1", b"lang").unwrap().as_deref(), Some(&b"fr"[..]));
    assert_eq!(c.hget(b"user:1", b"zip").unwrap(), None);
    assert_eq!(c.hget(b"user:2", b"name").unwrap(), None);
    let mut all = c.hgetall(b"user:1").unwrap();
    all.sort();
    assert_eq!(all, [(Bytes::from("lang"), Bytes::from("fr")), (Bytes::from("name"), Bytes::from("Ada"))]);
    assert_eq!(c.hlen(b"user:1").unwrap(), 2);
}

#[test]
fn hdel_of_the_last_field_removes_the_key() {
    let (c, _) = cache();
    c.hset(b"h", b"a", "1").unwrap();
    c.hset(b"h", b"b", "2").unwrap();
    assert!(c.hdel(b"h", b"a").unwrap());
    assert!(!c.hdel(b"h", b"a").unwrap());
    assert!(c.exists(b"h"));
    assert!(c.hdel(b"h", b"b").unwrap());
    assert!(!c.exists(b"h"));
    assert!(c.hgetall(b"h").unwrap().is_empty());
}

#[test]
fn hincr_by_counts_in_a_field_and_refuses_text() {
    let (c, _) = cache();
    assert_eq!(c.hincr_by(b"stats", b"views", 3).unwrap(), 3);
    assert_eq!(c.hincr_by(b"stats", b"views", 4).unwrap(), 7);
    assert_eq!(c.hget(b"stats", b"views").unwrap().as_deref(), Some(&b"7"[..]));
    c.hset(b"stats", b"title", "hello").unwrap();
    assert!(matches!(c.hincr_by(b"stats", b"title", 1), Err(CacheError::NotAnInteger)));
    c.hset(b"stats", b"max", i64::MAX.to_string()).unwrap();
    assert!(matches!(c.hincr_by(b"stats", b"max", 1), Err(CacheError::Overflow)));
}

// ---- sorted sets ----

#[test]
fn zrank_is_zero_for_the_lowest_score() {
    let (c, _) = cache();
    leaderboard(&c);
    assert_eq!(c.zrank(b"board", b"dave").unwrap(), Some(0));
    assert_eq!(c.zrank(b"board", b"erin").unwrap(), Some(4));
    assert_eq!(c.zrank(b"board", b"nobody").unwrap(), None);
    assert_eq!(c.zrank(b"no-board", b"dave").unwrap(), None);
}

#[test]
fn zrevrank_is_zero_for_the_highest_score() {
    let (c, _) = cache();
    leaderboard(&c);
    assert_eq!(c.zrevrank(b"board", b"erin").unwrap(), Some(0));
    assert_eq!(c.zrevrank(b"board", b"dave").unwrap(), Some(4));
}

#[test]
fn equal_scores_are_ordered_by_member_bytes() {
    let (c, _) = cache();
    leaderboard(&c);
    assert_eq!(c.zrank(b"board", b"bob").unwrap(), Some(2));
    assert_eq!(c.zrank(b"board", b"carol").unwrap(), Some(3));
    assert_eq!(names(&c.zrange(b"board", 0..5, Order::Desc).unwrap()), ["erin", "carol", "bob", "alice", "dave"]);
}

#[test]
fn zadd_of_an_existing_member_updates_its_score() {
    let (c, _) = cache();
    leaderboard(&c);
    assert!(!c.zadd(b"board", b"dave", 100.0).unwrap());
    assert_eq!(c.zscore(b"board", b"dave").unwrap(), Some(100.0));
    assert_eq!(c.zrevrank(b"board", b"dave").unwrap(), Some(0));
    assert_eq!(c.zcard(b"board").unwrap(), 5);
}

#[test]
fn zincr_by_adds_to_a_score_and_creates_a_member_at_zero() {
    let (c, _) = cache();
    leaderboard(&c);
    assert_eq!(c.zincr_by(b"board", b"alice", 15.0).unwrap(), 25.0);
    assert_eq!(c.zrevrank(b"board", b"alice").unwrap(), Some(1));
    assert_eq!(c.zincr_by(b"board", b"frank", -1.0).unwrap(), -1.0);
    assert_eq!(c.zrank(b"board", b"frank").unwrap(), Some(0));
}

#[test]
fn a_nan_score_is_refused() {
    let (c, _) = cache();
    assert!(matches!(c.zadd(b"z", b"m", f64::NAN), Err(CacheError::NanScore)));
    assert!(!c.exists(b"z"), "no empty set left behind");
    c.zadd(b"z", b"m", f64::INFINITY).unwrap();
    assert!(matches!(c.zincr_by(b"z", b"m", f64::NEG_INFINITY), Err(CacheError::NanScore)));
    assert_eq!(c.zscore(b"z", b"m").unwrap(), Some(f64::INFINITY));
    assert!(matches!(c.zcount(b"z", Included(f64::NAN), Unbounded), Err(CacheError::NanScore)));
}

#[test]
fn zrem_of_the_last_member_removes_the_key() {
    let (c, _) = cache();
    c.zadd(b"z", b"a", 1.0).unwrap();
    c.zadd(b"z", b"b", 2.0).unwrap();
    assert!(c.zrem(b"z", b"a").unwrap());
    assert!(!c.zrem(b"z", b"a").unwrap());
    assert_eq!(c.zrank(b"z", b"b").unwrap(), Some(0));
    assert!(c.zrem(b"z", b"b").unwrap());
    assert!(!c.exists(b"z"));
    assert_eq!(c.zcard(b"z").unwrap(), 0);
}

#[test]
fn zrange_returns_a_rank_window_in_either_order() {
    let (c, _) = cache();
    leaderboard(&c);
    let top3 = c.zrange(b"board", ..3, Order::Desc).unwrap();
    assert_eq!(names(&top3), ["erin", "carol", "bob"]);
    assert_eq!(top3[0].1, 30.0);
    assert_eq!(names(&c.zrange(b"board", 1..=2, Order::Asc).unwrap()), ["alice", "bob"]);
    assert_eq!(names(&c.zrange(b"board", 3.., Order::Asc).unwrap()), ["carol", "erin"]);
    assert!(c.zrange(b"board", 10..20, Order::Asc).unwrap().is_empty());
    assert!(c.zrange(b"nothing", .., Order::Asc).unwrap().is_empty());
}

#[test]
fn zrange_by_score_honours_bounds_order_and_limit() {
    let (c, _) = cache();
    leaderboard(&c);
    let r = |min, max, order, limit| names(&c.zrange_by_score(b"board", min, max, order, limit).unwrap()).join(",");
    assert_eq!(r(Included(10.0), Included(20.0), Order::Asc, Limit::ALL), "alice,bob,carol");
    assert_eq!(r(Excluded(10.0), Included(20.0), Order::Asc, Limit::ALL), "bob,carol");
    assert_eq!(r(Included(10.0), Excluded(20.0), Order::Asc, Limit::ALL), "alice");
    assert_eq!(r(Unbounded, Unbounded, Order::Desc, Limit::first(2)), "erin,carol");
    assert_eq!(r(Unbounded, Included(20.0), Order::Desc, Limit { offset: 1, count: 2 }), "bob,alice");
    assert_eq!(r(Included(21.0), Included(29.0), Order::Asc, Limit::ALL), "");
    assert_eq!(r(Included(30.0), Included(10.0), Order::Asc, Limit::ALL), "", "min above max");
}

#[test]
fn zcount_counts_members_within_the_bounds() {
    let (c, _) = cache();
    leaderboard(&c);
    assert_eq!(c.zcount(b"board", Unbounded, Unbounded).unwrap(), 5);
    assert_eq!(c.zcount(b"board", Included(10.0), Included(20.0)).unwrap(), 3);
    assert_eq!(c.zcount(b"board", Excluded(10.0), Excluded(30.0)).unwrap(), 2);
    assert_eq!(c.zcount(b"board", Included(100.0), Unbounded).unwrap(), 0);
}

#[test]
fn a_leaderboard_of_many_players_ranks_each_in_order() {
    let (c, _) = cache();
    for i in 0..5000u32 {
        c.zadd(b"lb", format!("p{i:05}").as_bytes(), f64::from((i * 7919) % 5000)).unwrap();
    }
    for i in (0..5000u32).step_by(123) {
        let score = f64::from((i * 7919) % 5000);
        assert_eq!(c.zrank(b"lb", format!("p{i:05}").as_bytes()).unwrap(), Some(score as usize));
    }
    let top = c.zrange(b"lb", ..10, Order::Desc).unwrap();
    assert_eq!(top.iter().map(|(_, s)| *s).collect::<Vec<_>>(), (4990..5000).rev().map(f64::from).collect::<Vec<_>>());
}

// ---- active expiry ----

#[test]
fn expire_tick_removes_expired_keys_within_its_budget() {
    let (c, clock) = cache();
    for i in 0..100 {
        c.set(format!("short:{i}").as_bytes(), "v", Some(secs(1))).unwrap();
    }
    for i in 0..10 {
        c.set(format!("long:{i}").as_bytes(), "v", Some(secs(100))).unwrap();
        c.set(format!("forever:{i}").as_bytes(), "v", None).unwrap();
    }
    clock.advance(secs(2));
    let report = c.expire_tick(c.now_ms(), 30);
    assert_eq!(report, ExpireReport { removed: 30, budget_exhausted: true });
    assert_eq!(c.len(), 90);
    let report = c.expire_tick(c.now_ms(), 1000);
    assert_eq!(report, ExpireReport { removed: 70, budget_exhausted: false });
    assert_eq!(c.len(), 20);
    assert_eq!(c.expire_tick(c.now_ms(), 1000).removed, 0);
    c.check_invariants();
}

#[test]
fn expire_tick_keeps_memory_flat_under_a_stream_of_short_lived_keys() {
    let (c, clock) = cache();
    for round in 0..50 {
        for i in 0..200 {
            c.set(format!("k:{round}:{i}").as_bytes(), "v", Some(Duration::from_millis(10))).unwrap();
        }
        clock.advance(Duration::from_millis(20));
        c.expire_tick(c.now_ms(), 1000);
        assert_eq!(c.len(), 0, "round {round}");
    }
}

// ---- memory bound ----

#[test]
fn a_full_cache_with_the_refuse_policy_refuses_new_keys() {
    let (c, _) = cache_with(CacheConfig { max_entries: Some(10), ..CacheConfig::default() });
    for i in 0..10 {
        c.set(format!("k{i}").as_bytes(), "v", None).unwrap();
    }
    assert!(matches!(c.set(b"one-more", "v", None), Err(CacheError::Full { max_entries: 10 })));
    assert!(matches!(c.zadd(b"z", b"m", 1.0), Err(CacheError::Full { .. })));
    c.set(b"k3", "overwrite is fine", None).unwrap();
    c.del(b"k0");
    c.set(b"one-more", "v", None).unwrap();
    assert_eq!(c.len(), 10);
}

#[test]
fn a_full_cache_reclaims_expired_keys_before_refusing() {
    let (c, clock) = cache_with(CacheConfig { shards: 1, max_entries: Some(4), ..CacheConfig::default() });
    for i in 0..4 {
        c.set(format!("k{i}").as_bytes(), "v", Some(secs(1))).unwrap();
    }
    clock.advance(secs(1));
    c.set(b"fresh", "v", None).unwrap();
    assert_eq!(c.len(), 1);
}

#[test]
fn lru_eviction_keeps_the_bound_and_prefers_recently_used_keys() {
    let (c, _) =
        cache_with(CacheConfig { shards: 1, max_entries: Some(100), eviction: EvictionPolicy::LruApprox });
    for i in 0..100 {
        c.set(format!("k{i}").as_bytes(), "v", None).unwrap();
    }
    for _ in 0..3 {
        for i in 0..10 {
            c.get(format!("k{i}").as_bytes()).unwrap(); // the hot set
        }
    }
    for i in 100..150 {
        c.set(format!("k{i}").as_bytes(), "v", None).unwrap();
        for j in 0..10 {
            c.get(format!("k{j}").as_bytes()).unwrap();
        }
    }
    assert_eq!(c.len(), 100);
    let hot_kept = (0..10).filter(|i| c.exists(format!("k{i}").as_bytes())).count();
    assert!(hot_kept >= 9, "only {hot_kept} of 10 hot keys survived");
    c.check_invariants();
}

// ---- threads ----

#[test]
fn concurrent_counters_from_many_threads_lose_no_increment() {
    let (c, _) = cache();
    let c = Arc::new(c);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    c.incr_by(format!("n{}", i % 8).as_bytes(), 1).unwrap();
                    c.zincr_by(b"board", format!("t{t}").as_bytes(), 1.0).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let total: i64 = (0..8).map(|i| c.incr_by(format!("n{i}").as_bytes(), 0).unwrap()).sum();
    assert_eq!(total, 8000);
    assert_eq!(c.zcount(b"board", Included(2000.0), Included(2000.0)).unwrap(), 4);
    c.check_invariants();
}

// ---- snapshots ----

fn sample(c: &Cache) {
    c.set(b"s", "hello", None).unwrap();
    c.set(b"session", "x", Some(secs(60))).unwrap();
    c.set(b"short", "y", Some(secs(1))).unwrap();
    c.incr_by(b"n", 42).unwrap();
    c.hset(b"h", b"f", "v").unwrap();
    leaderboard(c);
}

#[test]
fn a_snapshot_restores_every_type_with_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.snap");
    let (a, clock) = cache();
    sample(&a);
    let written = a.snapshot_to(&path).unwrap();
    assert_eq!(written.entries, 6);
    assert!(!dir.path().join("cache.snap.tmp").exists());

    clock.advance(secs(2)); // "short" expires while the cache is down
    let b = Cache::with_clock(CacheConfig::default(), clock.clone());
    assert_eq!(b.load_from(&path).unwrap(), LoadReport { loaded: 5, expired: 1 });
    assert_eq!(b.get(b"s").unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(b.ttl(b"session"), Ttl::Remaining(secs(58)));
    assert!(!b.exists(b"short"));
    assert_eq!(b.incr_by(b"n", 1).unwrap(), 43);
    assert_eq!(b.hget(b"h", b"f").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(b.zrange(b"board", .., Order::Asc).unwrap(), a.zrange(b"board", .., Order::Asc).unwrap());
    b.check_invariants();
}

#[test]
fn a_snapshot_with_any_flipped_byte_is_reported_corrupt_and_nothing_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.snap");
    let (a, clock) = cache();
    sample(&a);
    a.snapshot_to(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let b = Cache::with_clock(CacheConfig::default(), clock.clone());
        let err = b.load_from(&path).unwrap_err();
        assert!(matches!(err, CacheError::SnapshotCorrupt { .. }), "byte {at}: {err}");
        assert!(b.is_empty(), "byte {at}: half-loaded");
    }
}

#[test]
fn a_truncated_snapshot_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.snap");
    let (a, clock) = cache();
    sample(&a);
    a.snapshot_to(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    for len in [0, 5, 12, 20, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..len]).unwrap();
        let b = Cache::with_clock(CacheConfig::default(), clock.clone());
        assert!(matches!(b.load_from(&path), Err(CacheError::SnapshotCorrupt { .. })), "length {len}");
        assert!(b.is_empty());
    }
}

#[test]
fn loading_a_missing_snapshot_is_an_io_error() {
    let (c, _) = cache();
    assert!(matches!(c.load_from("/nonexistent/cache.snap"), Err(CacheError::SnapshotIo { .. })));
}

#[test]
fn an_empty_cache_snapshots_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.snap");
    let (a, _) = cache();
    assert_eq!(a.snapshot_to(&path).unwrap().entries, 0);
    assert_eq!(a.load_from(&path).unwrap(), LoadReport { loaded: 0, expired: 0 });
}

// ---- bench ----

#[test]
fn bench_cache_reports_a_rate_for_every_operation() {
    // TRIBUTARY_CACHE_BENCH_OPS=1000000 cargo test -p tributary-engine --release bench_cache -- --nocapture
    let ops = std::env::var("TRIBUTARY_CACHE_BENCH_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let b = bench_cache(ops);
    println!("{b:#?}");
    assert!(b.set_per_sec > 0.0 && b.get_per_sec > 0.0 && b.zadd_per_sec > 0.0 && b.zrank_per_sec > 0.0);
}
