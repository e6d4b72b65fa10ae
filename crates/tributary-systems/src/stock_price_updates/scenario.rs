//! stock-price-updates' load shape and its targets from the seed, as data for `tributary bench`
//! and `tributary check`.
//!
//! The seed asks for 1,000,000 ticks/s over 10,000 symbols with P99 < 10 ms for price updates
//! (here: from the ingest request's intended send time to the tick in a subscriber's hands).
//! The load (`crates/tributary/src/bench/scenarios/stock_price_updates.rs`) sends binary
//! batches in which the symbols tick in turn, each with the next sequence number of its feed,
//! so a subscriber can tell from `(symbol, seq)` which request a tick came from; a live
//! WebSocket subscriber on a tenth of the symbols checks every tick arrives once.

/// Ticks per second, open loop.
pub const TICK_RATE_PER_S: u64 = 1_000_000;
/// Distinct symbols in the load.
pub const SYMBOLS: usize = 10_000;
/// Subscribers the seed plans for (the bench attaches a few live ones; the rest are the
/// gateway's connection limit's business).
pub const SUBSCRIBERS: usize = 100_000;
/// Latency the seed asks for, at the 99th percentile, in milliseconds.
pub const DELIVERY_P99_MS_MAX: f64 = 10.0;

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
