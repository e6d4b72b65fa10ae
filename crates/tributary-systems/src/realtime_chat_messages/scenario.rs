//! realtime-chat-messages' load shape and its targets from the seed, as data for
//! `tributary bench` and `tributary check`.
//!
//! The seed asks for 20,000 messages/s with P95 delivery under 100 ms (a send's intended time to
//! the message read by a member's connection), 100,000 concurrent users and 50,000 channels.
//! The bench sends in batches to channels of a few members each, every member connected over a
//! WebSocket, so each message is delivered to every member of its channel.

/// Messages sent per second, open loop.
pub const MESSAGE_RATE_PER_S: u64 = 20_000;
/// Concurrent users the seed plans for.
pub const CONCURRENT_USERS: usize = 100_000;
/// Channels the seed plans for.
pub const CHANNELS: usize = 50_000;
/// Delivery latency the seed asks for, at the 95th percentile, in milliseconds.
pub const DELIVERY_P95_MS_MAX: f64 = 100.0;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub system: &'static str,
    pub message_rate_per_s: u64,
    pub concurrent_users: usize,
    pub channels: usize,
    pub delivery_p95_ms_max: f64,
}

pub fn scenario() -> Scenario {
    Scenario { system: super::ID, message_rate_per_s: MESSAGE_RATE_PER_S, concurrent_users: CONCURRENT_USERS, channels: CHANNELS, delivery_p95_ms_max: DELIVERY_P95_MS_MAX }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn the_scenario_matches_the_seed() {
        let spec = tributary_runtime::Catalogue::get().system(super::super::ID).expect("in the catalogue");
        let s = scenario();
        assert_eq!(spec.nonfunctional.rate_per_s, Some(s.message_rate_per_s as f64));
        let latency = spec.nonfunctional.latency.as_ref().expect("the seed names a latency");
        assert_eq!((latency.percentile, latency.ms), (95, s.delivery_p95_ms_max));
        assert_eq!(spec.constants.get("channels").and_then(|c| c.value), Some(s.channels as f64));
        assert_eq!(spec.constants.get("concurrent_users").and_then(|c| c.value), Some(s.concurrent_users as f64));
    }
}
