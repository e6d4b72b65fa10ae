//! The queue throughput measurement: one producer publishing batches, `consumers` threads
//! receiving batches and acking every message by its receipt (one ack call per batch).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary_log::Durability;

use super::{NewMessage, QueueConfig, QueueDefaults, Queues, Result};

/// Messages per receive in the benchmark.
pub const BENCH_BATCH_MESSAGES: usize = 500;
/// Messages per publish in the benchmark: larger than a receive, so one fsync carries more.
pub const BENCH_PUBLISH_BATCH_MESSAGES: usize = 1_000;

/// What [`bench_queue`] measured. Every figure is labelled with its durability class.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueBenchReport {
    pub durability: String,
    pub message_bytes: usize,
    pub messages: u64,
    pub consumers: usize,
    /// Messages published per second by the producer alone (from its first to its last publish).
    pub publish_msgs_per_s: f64,
    /// Messages acked per second, from the first publish to the last ack.
    pub acked_msgs_per_s: f64,
    pub elapsed_ms: u64,
    pub receive_calls: u64,
    pub ack_calls: u64,
}

/// Publish `messages` messages of `message_bytes` bytes into a fresh queue under `dir` while
/// `consumers` threads receive and ack them, and report the rates.
pub fn bench_queue(dir: &Path, message_bytes: usize, messages: u64, consumers: usize, durability: Durability) -> Result<QueueBenchReport> {
    let queues = Queues::open(dir, QueueDefaults::default())?;
    let config = QueueConfig { durability, ..QueueConfig::default() };
    let queue = queues.create(&format!("bench-{}", std::process::id()), config)?;
    queue.create_group("workers")?;
    let acked = Arc::new(AtomicU64::new(0));
    let receive_calls = Arc::new(AtomicU64::new(0));
    let ack_calls = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..consumers)
        .map(|c| {
            let (queue, acked, receive_calls, ack_calls) = (queue.clone(), acked.clone(), receive_calls.clone(), ack_calls.clone());
            std::thread::spawn(move || -> Result<()> {
                let consumer = format!("consumer-{c}");
                while acked.load(Ordering::Acquire) < messages {
                    let deliveries = queue.receive("workers", &consumer, BENCH_BATCH_MESSAGES, None, Duration::from_millis(50))?;
                    receive_calls.fetch_add(1, Ordering::Relaxed);
                    if deliveries.is_empty() {
                        continue;
                    }
                    let receipts: Vec<_> = deliveries.into_iter().map(|d| d.receipt).collect();
                    let outcomes = queue.ack("workers", &receipts)?;
                    ack_calls.fetch_add(1, Ordering::Relaxed);
                    let done = outcomes.iter().filter(|o| **o == super::ReceiptOutcome::Ok).count();
                    acked.fetch_add(done as u64, Ordering::AcqRel);
                }
                Ok(())
            })
        })
        .collect();
    let body = Bytes::from(vec![b'x'; message_bytes]);
    let mut published = 0u64;
    while published < messages {
        let n = (messages - published).min(BENCH_PUBLISH_BATCH_MESSAGES as u64) as usize;
        let batch: Vec<NewMessage> = (0..n).map(|_| NewMessage::new(body.clone())).collect();
        queue.publish(&batch)?;
        published += n as u64;
    }
    let publish_elapsed = start.elapsed();
    for handle in handles {
        handle.join().expect("a bench consumer panicked")?;
    }
    let elapsed = start.elapsed();
    let report = QueueBenchReport {
        durability: durability.to_string(),
        message_bytes,
        messages,
        consumers,
        publish_msgs_per_s: messages as f64 / publish_elapsed.as_secs_f64(),
        acked_msgs_per_s: messages as f64 / elapsed.as_secs_f64(),
        elapsed_ms: elapsed.as_millis() as u64,
        receive_calls: receive_calls.load(Ordering::Relaxed),
        ack_calls: ack_calls.load(Ordering::Relaxed),
    };
    queues.close()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TRIBUTARY_BENCH=1 cargo test --release -p tributary-engine queue::bench -- --nocapture`
    /// (optional: `TRIBUTARY_BENCH_MESSAGES`, `TRIBUTARY_BENCH_DURABILITY`). Without the
    /// variable it runs a tiny smoke version so the function stays exercised.
    #[test]
    fn bench_queue_measures_acked_throughput() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::env::var("TRIBUTARY_BENCH").is_ok_and(|v| v == "1");
        let messages = if full { std::env::var("TRIBUTARY_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000) } else { 2_000 };
        let durability = std::env::var("TRIBUTARY_BENCH_DURABILITY").ok().and_then(|v| v.parse().ok()).unwrap_or(Durability::Always);
        let report = bench_queue(dir.path(), 1024, messages, 4, durability).unwrap();
        println!("{report:#?}");
        assert_eq!(report.messages, messages);
        assert!(report.acked_msgs_per_s > 0.0);
    }
}
