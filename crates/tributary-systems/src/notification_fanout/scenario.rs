//! The load notification-fanout is built for, and the targets it is judged against, from the
//! seed: 50,000 notifications/s (recipient deliveries), P95 under 5 s from trigger to the
//! provider taking the delivery, 4 channels. Data only: the load generator (`tributary bench
//! notification-fanout`) reads it.

use std::time::Duration;

/// The shape of the load and the bar it must clear.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Recipient deliveries per second, open loop (measured from the intended trigger time).
    pub deliveries_per_s: u32,
    /// Notifications per trigger request.
    pub trigger_batch: usize,
    /// Providers of the push channel in the run (the first answers; failover is not exercised).
    pub push_providers: usize,
    /// Channels the system has (each its own queue).
    pub channels: usize,
    pub targets: Targets,
}

/// What the run must show.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub deliveries_per_s: u32,
    /// 95th percentile of trigger → delivered at the provider.
    pub fanout_p95: Duration,
}

pub fn scenario() -> Scenario {
    Scenario {
        deliveries_per_s: 50_000,
        trigger_batch: 500,
        push_providers: 2,
        channels: super::process::Channel::ALL.len(),
        targets: Targets { deliveries_per_s: 50_000, fanout_p95: Duration::from_secs(5) },
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn the_scenario_matches_the_seed() {
        let spec = tributary_runtime::Catalogue::get().system(super::super::ID).expect("in the catalogue");
        let s = scenario();
        assert_eq!(spec.nonfunctional.rate_per_s, Some(f64::from(s.deliveries_per_s)));
        let latency = spec.nonfunctional.latency.as_ref().expect("the seed names a latency");
        assert_eq!((latency.percentile, latency.ms), (95, s.targets.fanout_p95.as_millis() as f64));
        assert_eq!(spec.constants.get("channels").and_then(|c| c.value), Some(s.channels as f64));
        assert!(s.trigger_batch <= super::super::process::NOTIFICATIONS_PER_REQUEST_MAX);
    }
}
