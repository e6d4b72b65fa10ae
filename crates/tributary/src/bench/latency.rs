//! Open-loop load and latency percentiles, shared by every Tributary benchmark.
//!
//! What is here:
//! - [`Schedule`]: a fixed-rate timetable. Event `i` is *intended* at `start + i / rate`. A
//!   sender that falls behind sends at once but still measures from the intended time, so a
//!   stall in the system under test shows up in the latency of every event it delayed (no
//!   coordinated omission).
//! - [`LatencyHistogram`]: an HdrHistogram of nanoseconds, mergeable across threads, with a
//!   [`LatencySummary`] of `p50`, `p99`, `p999` and `max` in milliseconds.
//! - [`run_open_loop`]: the simplest driver, for synchronous operations: wait for each
//!   intended time, run the operation, record completion minus intended time.
//!
//! What is not here: the operations themselves (log appends, HTTP calls), threads, and pipelining:
//! a bench that acknowledges asynchronously (the engine bench) carries the intended time along
//! with each request and records into a histogram where the acknowledgement arrives.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histogram holds, in nanoseconds (10 minutes); larger values saturate.
pub const LATENCY_NS_MAX: u64 = 10 * 60 * 1_000_000_000;
/// Significant decimal digits kept by the histogram (0.1% resolution).
const SIGNIFICANT_DIGITS: u8 = 3;
/// Closer than this to an intended time, a sender spins (yielding) instead of sleeping: a
/// sleep overshoots by about the kernel's timer slack (50 µs by default).
const SPIN_NS: u64 = 200_000;

/// A fixed-rate timetable: event `i` is intended at `start + i / rate_per_s`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate_per_s: u64,
}

impl Schedule {
    pub fn new(start: Instant, rate_per_s: u64) -> Schedule {
        assert!(rate_per_s > 0, "a schedule needs a positive rate");
        Schedule { start, rate_per_s }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn rate_per_s(&self) -> u64 {
        self.rate_per_s
    }

    /// Intended time of event `i`, in nanoseconds after `start`.
    pub fn intended_ns(&self, i: u64) -> u64 {
        (u128::from(i) * 1_000_000_000 / u128::from(self.rate_per_s)) as u64
    }

    /// Nanoseconds from `start` to now (0 before `start`).
    pub fn elapsed_ns(&self) -> u64 {
        Instant::now().saturating_duration_since(self.start).as_nanos() as u64
    }

    /// Block until event `i` is due and return its intended time (ns after `start`). Returns at
    /// once when the sender is behind: it must catch up, not skip.
    pub fn wait_for(&self, i: u64) -> u64 {
        let intended = self.intended_ns(i);
        loop {
            let now = self.elapsed_ns();
            if now >= intended {
                return intended;
            }
            let left = intended - now;
            if left > SPIN_NS {
                std::thread::sleep(Duration::from_nanos(left - SPIN_NS / 2));
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// A histogram of latencies in nanoseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    histogram: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> LatencyHistogram {
        let histogram = Histogram::new_with_bounds(1, LATENCY_NS_MAX, SIGNIFICANT_DIGITS).expect("valid histogram bounds");
        LatencyHistogram { histogram }
    }

    /// Record one latency; values beyond [`LATENCY_NS_MAX`] saturate.
    pub fn record_ns(&mut self, ns: u64) {
        self.record_ns_n(ns, 1);
    }

    /// Record `count` events of the same latency (a batch acknowledged together).
    pub fn record_ns_n(&mut self, ns: u64, count: u64) {
        self.histogram.saturating_record_n(ns.max(1), count);
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.histogram.add(&other.histogram).expect("histograms with the same bounds merge");
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        let h = &self.histogram;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Run `operation(i)` for `count` events on `schedule`, one after another on this thread, and
/// return the latency of each from its intended time to the operation's return.
pub fn run_open_loop(schedule: &Schedule, count: u64, mut operation: impl FnMut(u64)) -> LatencyHistogram {
    let mut histogram = LatencyHistogram::new();
    for i in 0..count {
        let intended = schedule.wait_for(i);
        operation(i);
        histogram.record_ns(schedule.elapsed_ns().saturating_sub(intended));
    }
    histogram
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_delays_every_event_behind_it_not_just_one() {
        // 10,000 events/s for 0.2 s; event 1000 stalls 100 ms. Open loop, the ~1000 events
        // intended during the stall all wait for it: p99 and max show it. A closed-loop
        // measurement (time spent in the operation) sees one slow event in 2000, below p99.
        let schedule = Schedule::new(Instant::now(), 10_000);
        let mut service = LatencyHistogram::new();
        let open_loop = run_open_loop(&schedule, 2000, |i| {
            let began = Instant::now();
            if i == 1000 {
                std::thread::sleep(Duration::from_millis(100));
            }
            service.record_ns(began.elapsed().as_nanos() as u64);
        });
        let open_loop = open_loop.summary();
        let service = service.summary();
        assert_eq!(open_loop.count, 2000);
        assert!(open_loop.max >= 99.0, "the stalled event itself waited 100 ms: {open_loop:?}");
        assert!(open_loop.p99 >= 50.0, "events queued behind the stall count: {open_loop:?}");
        assert!(open_loop.p50 < open_loop.p99);
        assert!(service.p99 < 10.0, "service time hides the stall: {service:?}");
    }

    #[test]
    fn the_schedule_spaces_events_by_the_rate() {
        let schedule = Schedule::new(Instant::now(), 1000);
        assert_eq!(schedule.intended_ns(0), 0);
        assert_eq!(schedule.intended_ns(1), 1_000_000);
        assert_eq!(schedule.intended_ns(2500), 2_500_000_000);
        let began = Instant::now();
        assert_eq!(schedule.wait_for(20), 20_000_000);
        assert!(began.elapsed() >= Duration::from_millis(19));
    }

    #[test]
    fn merged_histograms_count_every_event() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record_ns_n(1_000_000, 99);
        b.record_ns(50_000_000);
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50 - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.max - 50.0).abs() < 0.1, "{s:?}");
    }
}
