//! The cache conformance suite against the machine's Redis (127.0.0.1:6379, or
//! `TRIBUTARY_TEST_REDIS_URL`), started or checked by `.ci/run`.

use tributary_engine::cache::CacheStore;
use tributary_engine::conformance;
use tributary_redis::RedisCache;

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
