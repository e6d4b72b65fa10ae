//! The load email-queue-system is built for, and the targets it is judged against, from the
//! seed: 10,000 emails/s accepted, P95 under 30 s from accept to hand-off for transactional mail,
//! 3 retries. Data only: the load generator (`tributary bench email-queue-system`) reads it.

use std::time::Duration;

/// The shape of the load and the bar it must clear.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Emails accepted per second, open loop (measured from the intended send time).
    pub accept_rate_per_s: u32,
    /// Emails per send request.
    pub send_batch: usize,
    /// Share of the emails that are transactional (the rest is bulk).
    pub transactional_share: f64,
    /// Plain-text body size of each email, in bytes.
    pub body_bytes: usize,
    /// Distinct recipient domains (each has its own token bucket).
    pub domains: usize,
    /// How long the measured run lasts.
    pub duration: Duration,
    pub targets: Targets,
}

/// What the run must show.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    /// Sustained accept rate (202 once durable).
    pub accept_rate_per_s: u32,
    /// 95th percentile of accept → hand-off (the relay's 250) for transactional mail.
    pub transactional_handoff_p95: Duration,
    /// The seed's retry_attempts.
    pub retry_attempts: u32,
}

pub fn scenario() -> Scenario {
    Scenario {
        accept_rate_per_s: 10_000,
        send_batch: 100,
        transactional_share: 0.2,
        body_bytes: 1_024,
        domains: 50,
        duration: Duration::from_secs(30),
        targets: Targets { accept_rate_per_s: 10_000, transactional_handoff_p95: Duration::from_secs(30), retry_attempts: 3 },
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn the_scenario_matches_the_seed() {
        let spec = tributary_runtime::Catalogue::get().system(super::super::ID).expect("in the catalogue");
        let s = scenario();
        assert_eq!(spec.nonfunctional.rate_per_s, Some(f64::from(s.accept_rate_per_s)));
        let latency = spec.nonfunctional.latency.as_ref().expect("the seed names a latency");
        assert_eq!((latency.percentile, latency.ms), (95, s.targets.transactional_handoff_p95.as_millis() as f64));
        assert_eq!(s.targets.retry_attempts, super::super::process::RETRY_ATTEMPTS_DEFAULT);
        assert!(s.send_batch <= super::super::process::EMAILS_PER_REQUEST_MAX);
    }
}
