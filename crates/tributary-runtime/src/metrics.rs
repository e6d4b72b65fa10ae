//! Live figures of a running system, for the dashboard and for Prometheus.
//!
//! Each system owns one [`SystemMetrics`] and counts what passes through it: messages in,
//! messages out, errors, and the latency of what it promises to be fast at (end to end,
//! delivery). Counters are cumulative (the dashboard turns them into rates by differencing);
//! latency percentiles cover the last [`LATENCY_WINDOW_SAMPLES`] samples. Every count also goes
//! to the process's `metrics` recorder, labelled with the system id.
//!
//! A system with a pipeline also times its stages ([`SystemMetrics::stage`]: how long a record
//! waited in a queue, how long a batch took to send), so that where the end-to-end time goes
//! can be read off a running node: the same window of percentiles per stage, and the Prometheus
//! histogram `tributary_system_stage_seconds{system, stage}`.

use std::collections::{BTreeMap, VecDeque};
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
    stages_us: Mutex<BTreeMap<&'static str, VecDeque<u64>>>,
}

/// What the dashboard shows of a system.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricsSnapshot {
    pub messages_in: u64,
    pub messages_out: u64,
    pub errors: u64,
    pub latency_ms: Option<Percentiles>,
    /// Per stage of the system's pipeline, in milliseconds (none for a system that times none).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub stages_ms: BTreeMap<&'static str, Percentiles>,
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
            stages_us: Mutex::new(BTreeMap::new()),
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
        push_sample(&mut self.latency_us.lock(), latency);
        metrics::histogram!("tributary_system_latency_seconds", "system" => self.id).record(latency.as_secs_f64());
    }

    /// Record how long one pass through `stage` of the system's pipeline took.
    pub fn stage(&self, stage: &'static str, took: std::time::Duration) {
        push_sample(self.stages_us.lock().entry(stage).or_insert_with(|| VecDeque::with_capacity(LATENCY_WINDOW_SAMPLES)), took);
        metrics::histogram!("tributary_system_stage_seconds", "system" => self.id, "stage" => stage).record(took.as_secs_f64());
    }

    /// Run `work`, recording how long it took as one pass through `stage`.
    pub async fn timed<T>(&self, stage: &'static str, work: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let done = work.await;
        self.stage(stage, started.elapsed());
        done
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let latency_ms = percentiles(self.latency_us.lock().iter().copied().collect());
        let stages_ms = self.stages_us.lock().iter().filter_map(|(stage, window)| Some((*stage, percentiles(window.iter().copied().collect())?))).collect();
        MetricsSnapshot {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_ms,
            stages_ms,
        }
    }
}

/// Add a sample (microseconds) to a window, dropping the oldest once it holds
/// [`LATENCY_WINDOW_SAMPLES`].
fn push_sample(window: &mut VecDeque<u64>, sample: std::time::Duration) {
    if window.len() == LATENCY_WINDOW_SAMPLES {
        window.pop_front();
    }
    window.push_back(sample.as_micros().min(u128::from(u64::MAX)) as u64);
}

/// The percentiles of samples in microseconds, in milliseconds; none without samples.
fn percentiles(mut samples: Vec<u64>) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1] as f64 / 1e3;
    Some(Percentiles { samples: samples.len(), p50: at(0.50), p95: at(0.95), p99: at(0.99), max: at(1.0) })
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

    #[test]
    fn each_stage_has_its_own_window() {
        let m = SystemMetrics::new("test");
        assert!(m.snapshot().stages_ms.is_empty());
        for ms in 1..=10 {
            m.stage("send", Duration::from_millis(ms));
        }
        m.stage("queue_wait", Duration::from_millis(500));
        let stages = m.snapshot().stages_ms;
        assert_eq!(stages.keys().copied().collect::<Vec<_>>(), ["queue_wait", "send"]);
        assert_eq!((stages["send"].samples, stages["send"].p50, stages["send"].max), (10, 5.0, 10.0));
        assert_eq!((stages["queue_wait"].samples, stages["queue_wait"].p99), (1, 500.0));
        assert_eq!(m.snapshot().latency_ms, None, "stages are not the end-to-end latency");
    }
}
