//! Streams, queues, pub/sub and cache over the Tributary log.
//!
//! | module | pick it when |
//! |---|---|
//! | [`stream`] | readers need the ordered history and replay: topics, partitions, consumer groups |
//! | [`queue`] | each message is a job for one worker, acknowledged on its own, retried, dead-lettered |
//! | [`pubsub`] | live subscribers want messages by subject, with wildcards |
//! | [`cache`] | state that is read far more than written: KV with TTL, counters, leaderboards |
//! | [`search`] | readers look records up by words: full-text indexes fed from a log, scoped, paged, checkpointed |
//!
//! The engine knows nothing of HTTP, JSON wire formats or a tokio runtime: it is synchronous
//! (the cache's pub/sub channels are tokio broadcast channels, which need no runtime), and the
//! server crate puts a network in front of it. The interfaces that distributed backends also
//! implement ([`cache::CacheStore`], [`stream::StreamStore`], [`queue::QueueStore`]) return futures, which the embedded engine completes at once;
//! their guarantees are the [`conformance`] suite (feature `conformance`).

mod backend;
pub mod cache;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod engine;
mod error;
pub mod pubsub;
pub mod queue;
pub mod search;
pub mod stream;

pub use backend::{BoxFuture, Gap};
pub use engine::{Engine, EngineError};
pub use error::{Result, StreamError};
