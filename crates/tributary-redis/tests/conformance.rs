//! The cache conformance suite against the machine's Redis (127.0.0.1:6379, or
//! `TRIBUTARY_TEST_REDIS_URL`), started or checked by `.ci/run`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tributary_engine::cache::{CacheStore, Delivery, Subscription};
use tributary_engine::conformance;
use tributary_redis::RedisCache;

/// Held by the tests that subscribe: one of them kills every pub/sub connection of the Redis.
static SUBSCRIBERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn redis_url() -> String {
    std::env::var("TRIBUTARY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A namespace no other run uses.
fn namespace() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("tributary-test-{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conforms_to_the_cache_interface() {
    let _subscribers = SUBSCRIBERS.lock().await;
    let cache = RedisCache::connect(&redis_url(), &namespace()).await.expect("Redis answers (is it running on 127.0.0.1:6379?)");
    let report = conformance::cache::run(&cache, "suite").await;
    println!("{report}");
    report.assert_conforms();
    assert_eq!(report.passed.len() + report.skipped.len(), conformance::cache::CASES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_namespace_and_others_are_apart() {
    let shared = namespace();
    let a = RedisCache::connect(&redis_url(), &shared).await.unwrap();
    let b = RedisCache::connect(&redis_url(), &shared).await.unwrap();
    let other = RedisCache::connect(&redis_url(), &format!("{shared}-other")).await.unwrap();
    a.set(b"session", bytes::Bytes::from_static(b"alice"), None).await.unwrap();
    assert_eq!(b.get(b"session").await.unwrap().as_deref(), Some(&b"alice"[..]), "a second node reads what the first wrote");
    assert_eq!(other.get(b"session").await.unwrap(), None, "another namespace does not see it");
    assert_eq!(a.incr_by(b"hits", 1).await.unwrap() + 1, b.incr_by(b"hits", 1).await.unwrap());
    a.del(b"session").await.unwrap();
    a.del(b"hits").await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_is_a_backend_error() {
    let error = RedisCache::connect("redis://127.0.0.1:1", "x").await.expect_err("nothing listens on port 1");
    assert!(matches!(error, tributary_engine::cache::CacheError::Backend { backend: "redis", .. }), "{error:?}");
}

async fn next(subscription: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), subscription.next()).await.expect("a delivery within 10 s").expect("the subscription goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_connection_is_killed_subscribes_again_after_a_gap() {
    let _subscribers = SUBSCRIBERS.lock().await;
    let cache = RedisCache::connect(&redis_url(), &namespace()).await.unwrap();
    let mut subscription = cache.subscribe(b"news").await.unwrap();
    cache.publish(b"news", Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(next(&mut subscription).await, Delivery::Message(Bytes::from_static(b"before")));

    let client = redis::Client::open(redis_url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut admin).await.unwrap();
    assert!(killed >= 1, "the subscription's connection was killed");
    // What was published while it was gone is lost, and the gap says so; once it is back, it
    // hears what follows.
    assert_eq!(next(&mut subscription).await, Delivery::Gap);
    cache.publish(b"news", Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(next(&mut subscription).await, Delivery::Message(Bytes::from_static(b"after")));
}
