//! simple-pubsub's load shape and its targets from the seed, as data for `tributary bench` and
//! `tributary check`.
//!
//! The seed asks for 10,000 messages/s, P95 delivery under 50 ms (publish request arrival to the
//! message handed to the subscriber's connection) and 1,000,000 active subscriptions over 1,000
//! topics. The load below publishes to `orders.<region>.<event>`-shaped subjects spread over
//! `TOPICS` and registers subscriptions with a mix of literal and wildcard patterns.
//!
//! Measured (debug test build, 2-core CI box, durability `always`):
//! `PUBSUB_SUBSCRIPTIONS=1000000 cargo test -p tributary-systems registers_many -- --nocapture`
//! registered 1,000,000 subscriptions over HTTP in 100 batches in 23 s (43,000/s); process RSS
//! grew by 1.25 GiB (about 1,300 B per subscription: registry entry, spec, broker subscriber
//! with its buffer and the trie, plus allocator slack); a publish then matched and fanned out in
//! 5 ms.

/// Messages published per second, open loop.
pub const MESSAGE_RATE_PER_S: u64 = 10_000;
/// Distinct subjects published to.
pub const TOPICS: usize = 1_000;
/// Registered subscriptions the registry and the subject trie must hold.
pub const SUBSCRIPTIONS: usize = 1_000_000;
/// Delivery latency the seed asks for, at the 95th percentile, in milliseconds.
pub const DELIVERY_P95_MS_MAX: f64 = 50.0;
/// Messages per publish request in the load (batched, as a real high-rate publisher would).
pub const PUBLISH_BATCH: usize = 100;
/// Subscriptions per `subscriptions:batch` request when registering the million.
pub const REGISTER_BATCH: usize = 10_000;

/// The subject of the `i`-th topic of the load.
pub fn subject(i: usize) -> String {
    let topic = i % TOPICS;
    format!("orders.r{}.e{}", topic / 10, topic % 10)
}

/// The patterns of the `i`-th registered subscription: mostly literal subjects, every tenth a
/// `*` wildcard, every hundredth a `>` tail (as the seed's "topic filtering" plus "wildcard
/// subscriptions").
pub fn pattern(i: usize) -> String {
    let topic = i % TOPICS;
    match i % 100 {
        0 => format!("orders.r{}.>", topic / 10),
        n if n % 10 == 0 => format!("orders.*.e{}", topic % 10),
        _ => subject(i),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub system: &'static str,
    pub message_rate_per_s: u64,
    pub topics: usize,
    pub subscriptions: usize,
    pub delivery_p95_ms_max: f64,
}

pub fn scenario() -> Scenario {
    Scenario {
        system: super::ID,
        message_rate_per_s: MESSAGE_RATE_PER_S,
        topics: TOPICS,
        subscriptions: SUBSCRIPTIONS,
        delivery_p95_ms_max: DELIVERY_P95_MS_MAX,
    }
}
