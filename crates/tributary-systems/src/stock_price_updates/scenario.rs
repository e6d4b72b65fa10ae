//! stock-price-updates' load shape and its targets from the seed, as data for `tributary bench`
//! and `tributary check`.
//!
//! The seed asks for 1,000,000 ticks/s over 10,000 symbols with P99 < 10 ms for price updates
//! (here: from the ingest request's intended send time to the tick in a subscriber's hands).
//! The load sends binary batches in which every symbol ticks once with the next sequence
//! number, so a subscriber can tell from `(symbol, seq)` which batch a tick came from, and a
//! live WebSocket subscriber on a slice of the symbols checks every tick arrives once.

/// Ticks per second, open loop.
pub const TICK_RATE_PER_S: u64 = 1_000_000;
/// Distinct symbols in the load.
pub const SYMBOLS: usize = 10_000;
/// Subscribers the seed plans for (the bench attaches a few live ones; the rest are the
/// gateway's connection limit's business).
pub const SUBSCRIBERS: usize = 100_000;
/// Latency the seed asks for, at the 99th percentile, in milliseconds.
pub const DELIVERY_P99_MS_MAX: f64 = 10.0;

/// The symbol of the `i`-th instrument of the load: `EXn.SYMm`, ten exchanges, so that
/// patterns like `EX3.*` select a tenth.
pub fn symbol(i: usize) -> String {
    format!("EX{}.S{i:05}", i % 10)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub system: &'static str,
    pub tick_rate_per_s: u64,
    pub symbols: usize,
    pub subscribers: usize,
    pub delivery_p99_ms_max: f64,
}

pub fn scenario() -> Scenario {
    Scenario { system: super::ID, tick_rate_per_s: TICK_RATE_PER_S, symbols: SYMBOLS, subscribers: SUBSCRIBERS, delivery_p99_ms_max: DELIVERY_P99_MS_MAX }
}
