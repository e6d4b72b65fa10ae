//! Where queues get the time from: the system clock, or a hand-driven one for tests.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of milliseconds since the epoch. Leases, delays, backoff and the dedup window are
/// all measured with it, so a test can drive time by hand.
pub trait Clock: Send + Sync + Debug {
    fn now_ms(&self) -> u64;
}

/// The system wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        tributary_core::now_ms().max(1) as u64
    }
}

/// A clock that moves only when told to (tests, simulations).
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `start_ms` (at least 1: a zero timestamp means "now" to the log).
    pub fn new(start_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(start_ms.max(1))))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::AcqRel);
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms.max(1), Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}
