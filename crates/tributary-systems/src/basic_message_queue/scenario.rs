//! The load basic-message-queue is built for, and the targets it is judged against, from the
//! seed: 5,000 messages/s published, consumed by 3 consumers, P95 end-to-end (enqueue to ack)
//! under 100 ms, with 1,000,000 messages of backlog in the queue. Data only: the load generator
//! (`tributary bench`) reads it.

use std::time::Duration;

/// The shape of the load and the bar it must clear.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Messages published per second, open loop (measured from the intended send time).
    pub publish_rate_per_s: u32,
    /// Messages per publish request.
    pub publish_batch: usize,
    /// JSON body size of each message, in bytes.
    pub body_bytes: usize,
    /// Competing consumers of the one group.
    pub consumers: usize,
    /// Most messages one consumer receive asks for.
    pub receive_max: usize,
    /// Long-poll wait of each receive.
    pub receive_wait: Duration,
    /// Messages in the queue before the measured run starts (the seed's dataset size).
    pub backlog_messages: u64,
    /// How long the measured run lasts.
    pub duration: Duration,
    pub targets: Targets,
}

/// What the run must show.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    /// 95th percentile of enqueue → ack.
    pub end_to_end_p95: Duration,
    /// Sustained publish rate without the backlog growing beyond `backlog_messages`.
    pub rate_per_s: u32,
    /// The seed's availability target.
    pub availability: f64,
}

pub const QUEUE: &str = "bench-orders";
pub const GROUP: &str = "workers";

pub fn scenario() -> Scenario {
    Scenario {
        publish_rate_per_s: 5_000,
        publish_batch: 50,
        body_bytes: 256,
        consumers: 3,
        receive_max: 100,
        receive_wait: Duration::from_millis(1_000),
        backlog_messages: 1_000_000,
        duration: Duration::from_secs(60),
        targets: Targets { end_to_end_p95: Duration::from_millis(100), rate_per_s: 5_000, availability: 0.999 },
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn the_scenario_matches_the_seed() {
        let spec = tributary_runtime::Catalogue::get().system(super::super::ID).expect("in the catalogue");
        let s = scenario();
        assert_eq!(spec.nonfunctional.rate_per_s, Some(f64::from(s.publish_rate_per_s)));
        assert_eq!((s.consumers, s.backlog_messages), (3, 1_000_000));
        let latency = spec.nonfunctional.latency.as_ref().expect("the seed names a latency");
        assert_eq!((latency.percentile, latency.ms), (95, s.targets.end_to_end_p95.as_millis() as f64));
        assert!(s.receive_max <= tributary_engine::queue::QUEUE_RECEIVE_MESSAGES_MAX);
    }
}
