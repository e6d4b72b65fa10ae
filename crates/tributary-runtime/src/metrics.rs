//! Live figures of a running system, for the dashboard and for Prometheus.
//!
//! Each system owns one [`SystemMetrics`] and counts what passes through it: messages in,
//! messages out, errors, and the latency of what it promises to be fast at (end to end,
//! delivery). Counters are cumulative (the dashboard turns them into rates by differencing);
//! latency percentiles cover the last [`LATENCY_WINDOW_SAMPLES`] samples. Every count also goes
//! to the process's `metrics` recorder, labelled with the system id.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

/// Latency samples kept for the dashboard's percentiles.
pub const LATENCY_WINDOW_SAMPLES: usize = 8192;

pub struct SystemMetrics {
    id: &'static str,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<VecDeque<u64>>,
}

/// What the dashboard shows of a system.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricsSnapshot {
    pub messages_in: u64,
    pub messages_out: u64,
    pub errors: u64,
    pub latency_ms: Option<Percentiles>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub samples: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl SystemMetrics {
    pub fn new(id: &'static str) -> SystemMetrics {
        SystemMetrics {
            id,
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_us: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW_SAMPLES)),
        }
    }

    pub fn id(&self) -> &'static str {
        self.id
    }

    pub fn messages_in(&self, n: u64) {
        self.messages_in.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("tributary_system_messages_in_total", "system" => self.id).increment(n);
    }

    pub fn messages_out(&self, n: u64) {
        self.messages_out.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("tributary_system_messages_out_total", "system" => self.id).increment(n);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tributary_system_errors_total", "system" => self.id).increment(1);
    }

    /// Record one latency sample (the system says of what: end to end, delivery, ...).
    pub fn latency(&self, latency: std::time::Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut window = self.latency_us.lock();
        if window.len() == LATENCY_WINDOW_SAMPLES {
            window.pop_front();
        }
        window.push_back(us);
        drop(window);
        metrics::histogram!("tributary_system_latency_seconds", "system" => self.id).record(latency.as_secs_f64());
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut samples: Vec<u64> = self.latency_us.lock().iter().copied().collect();
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1] as f64 / 1e3;
        let latency_ms = (!samples.is_empty()).then(|| Percentiles { samples: samples.len(), p50: at(0.50), p95: at(0.95), p99: at(0.99), max: at(1.0) });
        MetricsSnapshot {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn percentiles_come_from_the_recent_window() {
        let m = SystemMetrics::new("test");
        assert_eq!(m.snapshot().latency_ms, None);
        for ms in 1..=100 {
            m.latency(Duration::from_millis(ms));
        }
        m.messages_in(3);
        m.error();
        let s = m.snapshot();
        let l = s.latency_ms.unwrap();
        assert_eq!((l.samples, l.p50, l.p99, l.max), (100, 50.0, 99.0, 100.0));
        assert_eq!((s.messages_in, s.errors), (3, 1));
        for _ in 0..LATENCY_WINDOW_SAMPLES {
            m.latency(Duration::from_millis(1));
        }
        assert_eq!(m.snapshot().latency_ms.unwrap().max, 1.0, "old samples leave the window");
    }
}
