//! Streams, queues, pub/sub and cache over the Tributary log.

pub mod cache;
pub mod pubsub;
pub mod queue;
