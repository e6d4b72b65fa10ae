//! The cache interface's guarantees ([`CacheStore`]), one case each. Keys are namespaced per
//! run and per case, so the suite can run against a shared Redis and several runs at once.

use std::ops::Bound;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary_core::limits::{CACHE_KEY_BYTES_MAX, CACHE_MEMBER_BYTES_MAX, CACHE_VALUE_BYTES_MAX};

use super::{CaseFuture, Report, ok, refused};
use crate::cache::{CacheError, CacheResult, CacheStore, Delivery, KeyType, Limit, Order, Subscription, Ttl};

/// One guarantee of the CacheStore interface.
pub type Case = super::Case<dyn CacheStore, Keys>;

/// Every case, in the order they run.
pub const CASES: &[Case] = &[
    Case { name: "strings", guarantee: "set, get, overwrite, del and exists behave as Redis strings", run: strings },
    Case { name: "set_nx", guarantee: "set_nx sets only a missing key: the first writer wins", run: set_nx },
    Case { name: "ttl_expiry", guarantee: "a key with a TTL is gone for every operation once it expires; set without TTL clears one", run: ttl_expiry },
    Case { name: "expire_persist", guarantee: "expire and persist report whether they applied; a zero TTL deletes the key", run: expire_persist },
    Case { name: "invalid_ttl", guarantee: "a zero or over-limit TTL is refused with InvalidTtl and writes nothing", run: invalid_ttl },
    Case { name: "size_limits", guarantee: "keys, values and members over their named limits are refused and write nothing", run: size_limits },
    Case { name: "counters", guarantee: "counters are decimal strings; a non-integer is NotAnInteger, overflow is Overflow, and neither changes the value", run: counters },
    Case { name: "fixed_window", guarantee: "incr_by_with_ttl sets the TTL only when it creates the counter", run: fixed_window },
    Case { name: "throttle", guarantee: "a rate limit gives its burst at once, then one slot per interval to all callers together; a reservation within the horizon takes a later slot, a refusal takes none; several slots are taken all or none", run: throttle },
    Case { name: "wrong_type", guarantee: "using a key as another type is WrongType and changes nothing", run: wrong_type },
    Case { name: "hashes", guarantee: "hset/hget/hdel/hgetall/hlen/hincr_by; deleting the last field deletes the key", run: hashes },
    Case { name: "sorted_sets", guarantee: "ranks, ranges by rank and by score with bounds, ties ordered by member bytes", run: sorted_sets },
    Case { name: "sorted_set_updates", guarantee: "zincr_by, zrem, NaN refused; removing the last member deletes the key", run: sorted_set_updates },
    Case { name: "atomic_increments", guarantee: "concurrent increments of one counter and one hash field lose no update", run: atomic_increments },
    Case { name: "channels", guarantee: "a published message reaches every subscriber of its channel once, in order, and no one else; nothing is kept for later subscribers", run: channels },
];

/// Runs every case against `store`, with keys under `namespace` (make it unique per run).
pub async fn run(store: &(dyn CacheStore + 'static), namespace: &str) -> Report {
    super::run_cases(store, store.backend(), store.gaps(), CASES, |case| Keys { prefix: format!("{namespace}:{case}:") }, super::nothing_to_tidy).await
}

/// Keys of one case.
pub struct Keys {
    prefix: String,
}

impl Keys {
    fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }
}


fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn strings(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("s");
        check_eq!(ok(s.get(&key).await, "get missing")?, None);
        check!(!ok(s.exists(&key).await, "exists")?, "a missing key exists");
        ok(s.set(&key, b("one"), None).await, "set")?;
        check_eq!(ok(s.get(&key).await, "get")?, Some(b("one")));
        ok(s.set(&key, b("two"), None).await, "overwrite")?;
        check_eq!(ok(s.get(&key).await, "get")?, Some(b("two")));
        check_eq!(ok(s.key_type(&key).await, "key_type")?, Some(KeyType::String));
        ok(s.set(&key, Bytes::new(), None).await, "set empty")?;
        check_eq!(ok(s.get(&key).await, "get empty")?, Some(Bytes::new()));
        check!(ok(s.exists(&key).await, "exists")?, "an empty value is not a missing key");
        check!(ok(s.del(&key).await, "del")?, "del of an existing key returned false");
        check!(!ok(s.del(&key).await, "del again")?, "del of a missing key returned true");
        check_eq!(ok(s.get(&key).await, "get deleted")?, None);
        check_eq!(ok(s.key_type(&key).await, "key_type deleted")?, None);
        Ok(())
    })
}

fn set_nx(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("lock");
        check!(ok(s.set_nx(&key, b("first"), Some(Duration::from_secs(60))).await, "set_nx")?, "set_nx on a missing key did not set");
        check!(!ok(s.set_nx(&key, b("second"), None).await, "set_nx again")?, "set_nx on an existing key set it");
        check_eq!(ok(s.get(&key).await, "get")?, Some(b("first")));
        check!(matches!(ok(s.ttl(&key).await, "ttl")?, Ttl::Remaining(_)), "set_nx did not keep its TTL");
        ok(s.del(&key).await, "del")?;
        Ok(())
    })
}

/// Polls until `key` is gone, for at most two seconds.
async fn gone(s: &dyn CacheStore, key: &[u8]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while ok(s.exists(key).await, "exists")? {
        check!(Instant::now() < deadline, "a key with a 50 ms TTL still exists after 2 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn ttl_expiry(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("t");
        ok(s.set(&key, b("v"), Some(Duration::from_millis(50))).await, "set with TTL")?;
        match ok(s.ttl(&key).await, "ttl")? {
            Ttl::Remaining(left) => check!(left <= Duration::from_millis(50), "TTL {left:?} is longer than was set"),
            Ttl::Missing => {} // already expired on a slow machine: still correct
            Ttl::Persistent => return Err("a key set with a TTL is persistent".into()),
        }
        gone(s, &key).await?;
        check_eq!(ok(s.get(&key).await, "get expired")?, None);
        check_eq!(ok(s.ttl(&key).await, "ttl expired")?, Ttl::Missing);
        ok(s.set(&key, b("v"), Some(Duration::from_secs(60))).await, "set with TTL")?;
        ok(s.set(&key, b("w"), None).await, "set without TTL")?;
        check_eq!(ok(s.ttl(&key).await, "ttl after plain set")?, Ttl::Persistent);
        ok(s.del(&key).await, "del")?;
        Ok(())
    })
}

fn expire_persist(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("e");
        check!(!ok(s.expire(&key, Duration::from_secs(5)).await, "expire missing")?, "expire of a missing key returned true");
        check!(!ok(s.persist(&key).await, "persist missing")?, "persist of a missing key returned true");
        ok(s.set(&key, b("v"), None).await, "set")?;
        check!(!ok(s.persist(&key).await, "persist")?, "persist of a key without TTL returned true");
        check!(ok(s.expire(&key, Duration::from_secs(5)).await, "expire")?, "expire of an existing key returned false");
        check!(matches!(ok(s.ttl(&key).await, "ttl")?, Ttl::Remaining(d) if d <= Duration::from_secs(5) && d > Duration::from_secs(3)), "TTL not about 5 s");
        check!(ok(s.persist(&key).await, "persist")?, "persist of a key with a TTL returned false");
        check_eq!(ok(s.ttl(&key).await, "ttl")?, Ttl::Persistent);
        check!(ok(s.expire(&key, Duration::ZERO).await, "expire 0")?, "expire 0 of an existing key returned false");
        check!(!ok(s.exists(&key).await, "exists")?, "expire 0 did not delete the key");
        Ok(())
    })
}

fn invalid_ttl(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("bad");
        let invalid = |e: &CacheError| matches!(e, CacheError::InvalidTtl { .. });
        refused(s.set(&key, b("v"), Some(Duration::ZERO)).await, "set with a zero TTL", invalid)?;
        refused(s.set(&key, b("v"), Some(Duration::from_secs(u64::MAX / 4))).await, "set with a huge TTL", invalid)?;
        refused(s.incr_by_with_ttl(&key, 1, Duration::ZERO).await, "incr with a zero TTL", invalid)?;
        check!(!ok(s.exists(&key).await, "exists")?, "a refused write left a key");
        Ok(())
    })
}

fn size_limits(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let mut big_key = k.key("");
        big_key.resize(CACHE_KEY_BYTES_MAX + 1, b'k');
        refused(s.set(&big_key, b("v"), None).await, "a key over CACHE_KEY_BYTES_MAX", |e| matches!(e, CacheError::KeyTooLarge { .. }))?;
        let key = k.key("v");
        let big_value = Bytes::from(vec![b'v'; CACHE_VALUE_BYTES_MAX + 1]);
        refused(s.set(&key, big_value.clone(), None).await, "a value over CACHE_VALUE_BYTES_MAX", |e| matches!(e, CacheError::ValueTooLarge { .. }))?;
        refused(s.hset(&key, b"f", big_value).await, "a hash value over CACHE_VALUE_BYTES_MAX", |e| matches!(e, CacheError::ValueTooLarge { .. }))?;
        let big_member = vec![b'm'; CACHE_MEMBER_BYTES_MAX + 1];
        let too_large = |e: &CacheError| matches!(e, CacheError::MemberTooLarge { .. });
        refused(s.zadd(&key, &big_member, 1.0).await, "a member over CACHE_MEMBER_BYTES_MAX", too_large)?;
        refused(s.hset(&key, &big_member, b("v")).await, "a field over CACHE_MEMBER_BYTES_MAX", too_large)?;
        check!(!ok(s.exists(&key).await, "exists")?, "a refused write left a key");
        let at_limit = Bytes::from(vec![b'v'; CACHE_VALUE_BYTES_MAX]);
        ok(s.set(&key, at_limit.clone(), None).await, "a value of exactly CACHE_VALUE_BYTES_MAX")?;
        check_eq!(ok(s.get(&key).await, "get")?.map(|v| v.len()), Some(at_limit.len()));
        ok(s.del(&key).await, "del")?;
        Ok(())
    })
}

fn counters(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("n");
        check_eq!(ok(s.incr_by(&key, 5).await, "incr missing")?, 5);
        check_eq!(ok(s.incr_by(&key, -7).await, "decr")?, -2);
        check_eq!(ok(s.get(&key).await, "get counter")?, Some(b("-2")));
        ok(s.set(&key, b("41"), None).await, "set decimal")?;
        check_eq!(ok(s.incr_by(&key, 1).await, "incr decimal string")?, 42);
        ok(s.set(&key, b("forty"), None).await, "set text")?;
        refused(s.incr_by(&key, 1).await, "incr of text", |e| matches!(e, CacheError::NotAnInteger))?;
        check_eq!(ok(s.get(&key).await, "get text")?, Some(b("forty")));
        ok(s.set(&key, Bytes::from(i64::MAX.to_string()), None).await, "set max")?;
        refused(s.incr_by(&key, 1).await, "incr past i64::MAX", |e| matches!(e, CacheError::Overflow))?;
        check_eq!(ok(s.get(&key).await, "get max")?, Some(Bytes::from(i64::MAX.to_string())));
        ok(s.del(&key).await, "del")?;
        Ok(())
    })
}

fn fixed_window(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("w");
        check_eq!(ok(s.incr_by_with_ttl(&key, 1, Duration::from_secs(10)).await, "first hit")?, 1);
        let Ttl::Remaining(first) = ok(s.ttl(&key).await, "ttl")? else { return Err("the first hit set no TTL".into()) };
        check_eq!(ok(s.incr_by_with_ttl(&key, 1, Duration::from_secs(60)).await, "second hit")?, 2);
        let Ttl::Remaining(second) = ok(s.ttl(&key).await, "ttl")? else { return Err("the second hit removed the TTL".into()) };
        check!(second <= first, "the second hit moved the window's end ({first:?} -> {second:?})");
        ok(s.del(&key).await, "del")?;
        let plain = k.key("p");
        ok(s.incr_by(&plain, 1).await, "plain incr")?;
        ok(s.incr_by_with_ttl(&plain, 1, Duration::from_secs(10)).await, "windowed incr of a plain counter")?;
        check_eq!(ok(s.ttl(&plain).await, "ttl")?, Ttl::Persistent);
        ok(s.del(&plain).await, "del")?;
        Ok(())
    })
}

fn wrong_type(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let (string, hash, zset) = (k.key("str"), k.key("hash"), k.key("zset"));
        ok(s.set(&string, b("v"), None).await, "set")?;
        ok(s.hset(&hash, b"f", b("v")).await, "hset")?;
        ok(s.zadd(&zset, b"m", 1.0).await, "zadd")?;
        let wrong = |e: &CacheError| matches!(e, CacheError::WrongType { .. });
        refused(s.hset(&string, b"f", b("v")).await, "hset on a string", wrong)?;
        refused(s.zadd(&string, b"m", 1.0).await, "zadd on a string", wrong)?;
        refused(s.get(&hash).await, "get on a hash", wrong)?;
        refused(s.incr_by(&hash, 1).await, "incr on a hash", wrong)?;
        refused(s.zscore(&hash, b"f").await, "zscore on a hash", wrong)?;
        refused(s.hget(&zset, b"m").await, "hget on a sorted set", wrong)?;
        match s.hget(&string, b"f").await {
            Err(CacheError::WrongType { expected, found }) => {
                check_eq!((expected, found), (KeyType::Hash, KeyType::String));
            }
            other => return Err(format!("hget on a string: expected WrongType, got {other:?}")),
        }
        check_eq!(ok(s.key_type(&string).await, "type")?, Some(KeyType::String));
        check_eq!(ok(s.key_type(&hash).await, "type")?, Some(KeyType::Hash));
        check_eq!(ok(s.key_type(&zset).await, "type")?, Some(KeyType::SortedSet));
        check_eq!(ok(s.get(&string).await, "get")?, Some(b("v")));
        ok(s.set(&hash, b("now a string"), None).await, "set replaces any type")?;
        check_eq!(ok(s.key_type(&hash).await, "type")?, Some(KeyType::String));
        for key in [&string, &hash, &zset] {
            ok(s.del(key).await, "del")?;
        }
        Ok(())
    })
}

fn hashes(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("h");
        check!(ok(s.hset(&key, b"a", b("1")).await, "hset")?, "a new field was not reported new");
        check!(!ok(s.hset(&key, b"a", b("2")).await, "hset again")?, "an existing field was reported new");
        ok(s.hset(&key, b"b", b("x")).await, "hset b")?;
        check_eq!(ok(s.hget(&key, b"a").await, "hget")?, Some(b("2")));
        check_eq!(ok(s.hget(&key, b"zz").await, "hget missing field")?, None);
        check_eq!(ok(s.hget(&k.key("none"), b"a").await, "hget missing key")?, None);
        check_eq!(ok(s.hlen(&key).await, "hlen")?, 2);
        let mut all = ok(s.hgetall(&key).await, "hgetall")?;
        all.sort();
        check_eq!(all, vec![(b("a"), b("2")), (b("b"), b("x"))]);
        check_eq!(ok(s.hincr_by(&key, b"a", 40).await, "hincr_by")?, 42);
        check_eq!(ok(s.hincr_by(&key, b"new", 3).await, "hincr_by new field")?, 3);
        refused(s.hincr_by(&key, b"b", 1).await, "hincr_by of text", |e| matches!(e, CacheError::NotAnInteger))?;
        check!(ok(s.hdel(&key, b"a").await, "hdel")?, "hdel of an existing field returned false");
        check!(!ok(s.hdel(&key, b"a").await, "hdel again")?, "hdel of a missing field returned true");
        ok(s.hdel(&key, b"b").await, "hdel b")?;
        ok(s.hdel(&key, b"new").await, "hdel new")?;
        check!(!ok(s.exists(&key).await, "exists")?, "a hash with no field left still exists");
        check_eq!(ok(s.hlen(&key).await, "hlen")?, 0);
        check!(ok(s.hgetall(&key).await, "hgetall")?.is_empty(), "hgetall of a missing key is not empty");
        Ok(())
    })
}

fn sorted_sets(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("z");
        for (member, score) in [("carol", 30.0), ("alice", 10.0), ("bob", 20.0), ("dave", 20.0), ("erin", -5.5)] {
            check!(ok(s.zadd(&key, member.as_bytes(), score).await, "zadd")?, "{member} was not reported new");
        }
        check!(!ok(s.zadd(&key, b"alice", 10.0).await, "zadd again")?, "an existing member was reported new");
        check_eq!(ok(s.zcard(&key).await, "zcard")?, 5);
        check_eq!(ok(s.zscore(&key, b"erin").await, "zscore")?, Some(-5.5));
        check_eq!(ok(s.zscore(&key, b"nobody").await, "zscore missing")?, None);
        // erin -5.5, alice 10, bob 20, dave 20 (tie: member bytes), carol 30
        check_eq!(ok(s.zrank(&key, b"erin", Order::Asc).await, "zrank")?, Some(0));
        check_eq!(ok(s.zrank(&key, b"dave", Order::Asc).await, "zrank tie")?, Some(3));
        check_eq!(ok(s.zrank(&key, b"carol", Order::Desc).await, "zrevrank")?, Some(0));
        check_eq!(ok(s.zrank(&key, b"bob", Order::Desc).await, "zrevrank tie")?, Some(2));
        check_eq!(ok(s.zrank(&key, b"nobody", Order::Asc).await, "zrank missing")?, None);
        let names = |v: Vec<(Bytes, f64)>| v.into_iter().map(|(m, _)| String::from_utf8_lossy(&m).into_owned()).collect::<Vec<_>>();
        check_eq!(names(ok(s.zrange(&key, 0, 3, Order::Asc).await, "zrange")?), vec!["erin", "alice", "bob"]);
        check_eq!(names(ok(s.zrange(&key, 0, 2, Order::Desc).await, "zrange desc")?), vec!["carol", "dave"]);
        check_eq!(names(ok(s.zrange(&key, 3, 100, Order::Asc).await, "zrange past the end")?), vec!["dave", "carol"]);
        check!(ok(s.zrange(&key, 7, 9, Order::Asc).await, "zrange beyond")?.is_empty(), "a range beyond the end is not empty");
        let top = ok(s.zrange(&key, 0, 1, Order::Desc).await, "top")?;
        check_eq!(top, vec![(b("carol"), 30.0)]);
        let by_score = ok(s.zrange_by_score(&key, Bound::Included(10.0), Bound::Included(20.0), Order::Asc, Limit::ALL).await, "by score")?;
        check_eq!(names(by_score), vec!["alice", "bob", "dave"]);
        let excluded = ok(s.zrange_by_score(&key, Bound::Excluded(10.0), Bound::Unbounded, Order::Desc, Limit::ALL).await, "by score desc")?;
        check_eq!(names(excluded), vec!["carol", "dave", "bob"]);
        let paged = ok(s.zrange_by_score(&key, Bound::Unbounded, Bound::Unbounded, Order::Asc, Limit { offset: 1, count: 2 }).await, "paged")?;
        check_eq!(names(paged), vec!["alice", "bob"]);
        check_eq!(ok(s.zcount(&key, Bound::Included(20.0), Bound::Unbounded).await, "zcount")?, 3);
        check_eq!(ok(s.zcount(&key, Bound::Excluded(20.0), Bound::Excluded(30.0)).await, "zcount open")?, 0);
        check_eq!(ok(s.zcard(&k.key("none")).await, "zcard missing")?, 0);
        check!(ok(s.zrange(&k.key("none"), 0, 10, Order::Asc).await, "zrange missing")?.is_empty(), "a missing set has members");
        refused(s.zcount(&key, Bound::Included(f64::NAN), Bound::Unbounded).await, "a NaN bound", |e| matches!(e, CacheError::NanScore))?;
        ok(s.del(&key).await, "del")?;
        Ok(())
    })
}

fn sorted_set_updates(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let key = k.key("z");
        check_eq!(ok(s.zincr_by(&key, b"m", 2.5).await, "zincr_by new")?, 2.5);
        check_eq!(ok(s.zincr_by(&key, b"m", -1.0).await, "zincr_by")?, 1.5);
        ok(s.zadd(&key, b"n", 1.0).await, "zadd")?;
        check_eq!(ok(s.zrank(&key, b"m", Order::Asc).await, "rank after update")?, Some(1));
        ok(s.zadd(&key, b"n", 9.0).await, "zadd update")?;
        check_eq!(ok(s.zrank(&key, b"m", Order::Asc).await, "rank after move")?, Some(0));
        let nan = |e: &CacheError| matches!(e, CacheError::NanScore);
        refused(s.zadd(&key, b"m", f64::NAN).await, "zadd NaN", nan)?;
        refused(s.zincr_by(&key, b"m", f64::NAN).await, "zincr_by NaN", nan)?;
        check_eq!(ok(s.zscore(&key, b"m").await, "score after refusals")?, Some(1.5));
        ok(s.zadd(&key, b"inf", f64::INFINITY).await, "zadd +inf")?;
        check_eq!(ok(s.zrank(&key, b"inf", Order::Desc).await, "rank of +inf")?, Some(0));
        check!(ok(s.zrem(&key, b"inf").await, "zrem")?, "zrem of a member returned false");
        check!(!ok(s.zrem(&key, b"inf").await, "zrem again")?, "zrem of a missing member returned true");
        ok(s.zrem(&key, b"m").await, "zrem m")?;
        ok(s.zrem(&key, b"n").await, "zrem n")?;
        check!(!ok(s.exists(&key).await, "exists")?, "a sorted set with no member left still exists");
        Ok(())
    })
}

fn throttle(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        // A slot per 10 s: none comes free while the case runs.
        let interval = Duration::from_secs(10);
        let about_one_interval = |wait: Duration| wait > Duration::from_secs(9) && wait <= interval;
        let key = k.key("limit");
        for taken in 0..3 {
            check!(ok(s.throttle(&key, interval, 3, Duration::ZERO, 1).await, "within the burst")?.is_zero(), "slot {taken} of a burst of 3 was not free");
        }
        let refused_wait = ok(s.throttle(&key, interval, 3, Duration::ZERO, 1).await, "past the burst")?;
        check!(about_one_interval(refused_wait), "past the burst the wait was {refused_wait:?}, not about one interval");
        // The refusal took nothing: the next slot is still one interval away, and reserving
        // it makes the one after two intervals away.
        let reserved = ok(s.throttle(&key, interval, 3, Duration::from_secs(60), 1).await, "reserve")?;
        check!(about_one_interval(reserved), "the reserved slot is {reserved:?} away, not about one interval");
        let after = ok(s.throttle(&key, interval, 3, Duration::from_secs(60), 1).await, "reserve again")?;
        check!(after > reserved + Duration::from_secs(9), "the slot after a reserved one is {after:?} away (the reserved one: {reserved:?})");
        let Ttl::Remaining(left) = ok(s.ttl(&key).await, "ttl")? else { return Err("a rate limit's key has no TTL".into()) };
        // Five slots taken of one per 10 s: full again in 50 s, when the key may go.
        check!(left > Duration::from_secs(45) && left <= Duration::from_secs(51), "the key expires in {left:?}, not when the limit is full again (50 s)");
        // Callers at once share the burst.
        let shared = k.key("shared");
        let calls = (0..10).map(|_| s.throttle(&shared, interval, 4, Duration::ZERO, 1));
        let mut free = 0;
        for wait in futures_util::future::join_all(calls).await {
            free += usize::from(ok(wait, "a concurrent take")?.is_zero());
        }
        check_eq!(free, 4);
        // Several slots at once: all of them or none.
        let several = k.key("several");
        check!(ok(s.throttle(&several, interval, 5, Duration::ZERO, 3).await, "3 of a burst of 5")?.is_zero(), "3 slots of a burst of 5 were not free");
        check!(!ok(s.throttle(&several, interval, 5, Duration::ZERO, 3).await, "3 more")?.is_zero(), "3 more slots than the burst holds were taken");
        check!(ok(s.throttle(&several, interval, 5, Duration::ZERO, 2).await, "the 2 left")?.is_zero(), "the refused 3 took some of the 2 left");
        let text = k.key("text");
        ok(s.set(&text, Bytes::from_static(b"x"), None).await, "set text")?;
        refused(s.throttle(&text, interval, 1, Duration::ZERO, 1).await, "a limit on text", |e| matches!(e, CacheError::NotAnInteger))?;
        for key in [key, shared, several, text] {
            ok(s.del(&key).await, "del")?;
        }
        Ok(())
    })
}

fn atomic_increments(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        const TASKS: usize = 8;
        const EACH: usize = 100;
        let (counter, hash) = (k.key("c"), k.key("h"));
        let work = (0..TASKS).map(|_| async {
            for _ in 0..EACH {
                s.incr_by(&counter, 1).await?;
                s.hincr_by(&hash, b"f", 2).await?;
            }
            CacheResult::Ok(())
        });
        for result in futures_util::future::join_all(work).await {
            ok(result, "increment")?;
        }
        check_eq!(ok(s.get(&counter).await, "get")?, Some(Bytes::from((TASKS * EACH).to_string())));
        check_eq!(ok(s.hget(&hash, b"f").await, "hget")?, Some(Bytes::from((2 * TASKS * EACH).to_string())));
        ok(s.del(&counter).await, "del")?;
        ok(s.del(&hash).await, "del")?;
        Ok(())
    })
}

/// How long a subscriber waits for a message the case published.
const DELIVERY_WAIT: Duration = Duration::from_secs(5);

/// The next delivery of `subscription`, or an error naming `what` after DELIVERY_WAIT.
async fn next(subscription: &mut Subscription, what: &str) -> Result<Delivery, String> {
    use futures_util::StreamExt;
    match tokio::time::timeout(DELIVERY_WAIT, subscription.next()).await {
        Ok(Some(delivery)) => Ok(delivery),
        Ok(None) => Err(format!("{what}: the subscription ended")),
        Err(_) => Err(format!("{what}: nothing within {DELIVERY_WAIT:?}")),
    }
}

fn channels(s: &dyn CacheStore, k: Keys) -> CaseFuture<'_> {
    Box::pin(async move {
        let (news, other) = (k.key("news"), k.key("other"));
        ok(s.publish(&news, b("before anyone listened")).await, "publish with no subscriber")?;
        let mut first = ok(s.subscribe(&news).await, "subscribe")?;
        let mut second = ok(s.subscribe(&news).await, "subscribe again")?;
        let mut elsewhere = ok(s.subscribe(&other).await, "subscribe to another channel")?;
        let messages: Vec<Bytes> = (0..20).map(|i| b(&format!("m{i}"))).collect();
        for message in &messages {
            ok(s.publish(&news, message.clone()).await, "publish")?;
        }
        ok(s.publish(&other, b("elsewhere")).await, "publish to the other channel")?;
        for subscription in [&mut first, &mut second] {
            for message in &messages {
                check_eq!(next(subscription, "a subscriber of the channel").await?, Delivery::Message(message.clone()));
            }
        }
        // The other channel's subscriber gets its one message and nothing of the first channel.
        check_eq!(next(&mut elsewhere, "the other channel's subscriber").await?, Delivery::Message(b("elsewhere")));
        let big = Bytes::from(vec![b'v'; CACHE_VALUE_BYTES_MAX + 1]);
        refused(s.publish(&news, big).await, "a message over CACHE_VALUE_BYTES_MAX", |e| matches!(e, CacheError::ValueTooLarge { .. }))?;
        // One subscriber gone: the other still gets what follows, and the refused message never
        // came.
        drop(first);
        ok(s.publish(&news, b("after one left")).await, "publish after one subscriber left")?;
        check_eq!(next(&mut second, "the remaining subscriber").await?, Delivery::Message(b("after one left")));
        check!(!ok(s.exists(&news).await, "exists")?, "a channel is not a key");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_embedded_cache_conforms() {
        let cache = crate::cache::Cache::default();
        let report = super::run(&cache, "conformance").await;
        println!("{report}");
        report.assert_conforms();
        assert_eq!(report.passed.len(), super::CASES.len(), "the embedded cache declares no gap");
    }
}
