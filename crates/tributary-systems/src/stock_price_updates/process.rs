//! The domain logic of stock-price-updates, free of IO: what a valid tick is, the two ingest
//! codecs (NDJSON and the binary layout) and the tick block stored in the log, the incremental
//! indicators (OHLC bars per interval, SMA, EMA, RSI, VWAP), and one symbol's state with the
//! rule that turns a tick into events (gap, resumed, bar close).
//!
//! Every step here is O(1) per tick and allocates nothing per tick: decoders borrow the symbol
//! from the request body, the block is one growing buffer, indicators are running sums.
//!
//! Deliberately not here: the log, partitions, subscribers and the network (`mod.rs`, `api.rs`).

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest symbol, in bytes (`NAS.AAPL`, `BTC-USD`, `ES.Z26`).
pub const SYMBOL_BYTES_MAX: usize = 32;
/// Most ticks in one ingest request.
pub const TICKS_PER_REQUEST_MAX: usize = 100_000;
/// Furthest a tick's own timestamp may be ahead of the server's clock, in milliseconds.
pub const TICK_FUTURE_MS_MAX: i64 = 60_000;
/// Most ticks packed into one log record (a record of the largest ticks stays well under
/// `MESSAGE_BYTES_MAX`).
pub const TICKS_PER_RECORD_MAX: usize = 10_000;
/// Distinct symbols the system tracks; a tick of a new symbol beyond it is refused.
pub const SYMBOLS_MAX: usize = 100_000;
/// Longest indicator period (SMA, EMA, RSI), in bars.
pub const INDICATOR_PERIOD_MAX: usize = 1_000;
/// Most bar intervals computed per symbol.
pub const INTERVALS_MAX: usize = 8;
/// Most closed bars kept in memory per symbol and interval.
pub const BARS_KEPT_MAX: usize = 10_000;

/// The first four bytes of a binary ingest body and of every tick block in the log.
pub const BINARY_MAGIC: &[u8; 4] = b"TKB1";
/// Bytes of one binary tick besides its symbol: length byte, price, size, ts, seq.
pub const BINARY_TICK_FIXED_BYTES: usize = 1 + 8 + 8 + 8 + 8;

const _: () = assert!(SYMBOL_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(TICKS_PER_RECORD_MAX * (BINARY_TICK_FIXED_BYTES + SYMBOL_BYTES_MAX) < tributary_core::limits::MESSAGE_BYTES_MAX);

/// Why a symbol is refused, or `None` if it is fine. A symbol is one to eight tokens of
/// `[A-Za-z0-9_-]` joined by `.`, so that subscription patterns (`NAS.*`, `NAS.>`) apply to it.
pub fn check_symbol(symbol: &str) -> Option<&'static str> {
    if symbol.is_empty() {
        return Some("symbol is empty");
    }
    if symbol.len() > SYMBOL_BYTES_MAX {
        return Some("symbol is longer than SYMBOL_BYTES_MAX (32 bytes)");
    }
    let mut previous = b'.';
    let mut dots = 0;
    for &b in symbol.as_bytes() {
        match b {
            b'.' => {
                if previous == b'.' {
                    return Some("symbol has an empty token (a leading, trailing or doubled '.')");
                }
                dots += 1;
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' => {}
            _ => return Some("symbol may hold only A-Z a-z 0-9 _ - and '.' between tokens"),
        }
        previous = b;
    }
    if previous == b'.' {
        return Some("symbol has an empty token (a leading, trailing or doubled '.')");
    }
    if dots >= 8 {
        return Some("symbol has more than 8 tokens");
    }
    None
}

/// One accepted tick of a request: its symbol as a range of the request body, so that decoding
/// allocates nothing per tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoded {
    /// Position in the request (line or record number, from 0).
    pub index: u32,
    pub symbol_at: u32,
    pub symbol_len: u8,
    pub price: f64,
    pub size: f64,
    pub ts_ms: i64,
    /// Source sequence number of the symbol's feed; 0 when the source has none.
    pub seq: u64,
}

impl Decoded {
    pub fn symbol<'a>(&self, body: &'a [u8]) -> &'a str {
        let bytes = &body[self.symbol_at as usize..self.symbol_at as usize + self.symbol_len as usize];
        std::str::from_utf8(bytes).expect("checked when decoded")
    }
}

/// One refused tick and why, for the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Rejected {
    /// Line (NDJSON) or record (binary) number in the request, from 0.
    pub index: u32,
    pub error: String,
}

/// What a request held.
#[derive(Debug, Default)]
pub struct DecodedBatch {
    pub ticks: Vec<Decoded>,
    pub rejected: Vec<Rejected>,
}

/// A whole request refused before any tick was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    TooLarge(String),
}

/// Check the values of one tick; `ts_ms == 0` is stamped with `now_ms`.
fn check_values(price: f64, size: f64, ts_ms: i64, now_ms: i64) -> Result<i64, String> {
    if !(price.is_finite() && price > 0.0) {
        return Err(format!("price must be a finite number above 0, got {price}"));
    }
    if !(size.is_finite() && size >= 0.0) {
        return Err(format!("size must be a finite number of at least 0, got {size}"));
    }
    if ts_ms < 0 {
        return Err(format!("ts must be milliseconds since the epoch (0 or absent: now), got {ts_ms}"));
    }
    if ts_ms > now_ms + TICK_FUTURE_MS_MAX {
        return Err(format!("ts {ts_ms} is more than TICK_FUTURE_MS_MAX ({TICK_FUTURE_MS_MAX} ms) ahead of the server clock ({now_ms})"));
    }
    Ok(if ts_ms == 0 { now_ms } else { ts_ms })
}

fn too_many(n: usize) -> Invalid {
    Invalid::TooLarge(format!("more than TICKS_PER_REQUEST_MAX ({TICKS_PER_REQUEST_MAX}) ticks in one request (at least {n})"))
}

/// One NDJSON line as a client writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTick<'a> {
    #[serde(borrow)]
    symbol: std::borrow::Cow<'a, str>,
    price: f64,
    #[serde(default)]
    size: f64,
    #[serde(default)]
    ts: i64,
    #[serde(default)]
    seq: u64,
}

/// Decode an NDJSON body: one JSON object per line (`{"symbol","price","size"?,"ts"?,"seq"?}`),
/// blank lines skipped. A bad line is rejected on its own; the rest go on.
pub fn decode_ndjson(body: &[u8], now_ms: i64) -> Result<DecodedBatch, Invalid> {
    let mut batch = DecodedBatch::default();
    let base = body.as_ptr() as usize;
    for (index, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if batch.ticks.len() + batch.rejected.len() >= TICKS_PER_REQUEST_MAX {
            return Err(too_many(TICKS_PER_REQUEST_MAX + 1));
        }
        let index = index as u32;
        let tick: JsonTick = match serde_json::from_slice(line) {
            Ok(tick) => tick,
            Err(error) => {
                batch.rejected.push(Rejected { index, error: format!("not a tick: {error}") });
                continue;
            }
        };
        let symbol = match &tick.symbol {
            std::borrow::Cow::Borrowed(s) => *s,
            std::borrow::Cow::Owned(s) => {
                batch.rejected.push(Rejected { index, error: format!("symbol {s:?} is written with escapes; write it plainly") });
                continue;
            }
        };
        if let Some(reason) = check_symbol(symbol) {
            batch.rejected.push(Rejected { index, error: format!("{reason}: {symbol:?}") });
            continue;
        }
        match check_values(tick.price, tick.size, tick.ts, now_ms) {
            Ok(ts_ms) => batch.ticks.push(Decoded {
                index,
                symbol_at: (symbol.as_ptr() as usize - base) as u32,
                symbol_len: symbol.len() as u8,
                price: tick.price,
                size: tick.size,
                ts_ms,
                seq: tick.seq,
            }),
            Err(error) => batch.rejected.push(Rejected { index, error: format!("{symbol}: {error}") }),
        }
    }
    Ok(batch)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Decode a binary body: [`BINARY_MAGIC`], then ticks of
/// `u8 symbol length, symbol (ASCII), f64 price, f64 size, i64 ts_ms, u64 seq`, little-endian.
/// A tick with bad values is rejected on its own; a body cut inside a tick rejects that last
/// tick as truncated.
pub fn decode_binary(body: &[u8], now_ms: i64) -> Result<DecodedBatch, Invalid> {
    if !body.starts_with(BINARY_MAGIC) {
        return Err(Invalid::Bad(format!("a binary tick body starts with the 4 bytes {:?}", std::str::from_utf8(BINARY_MAGIC).unwrap())));
    }
    let mut batch = DecodedBatch::default();
    let mut at = BINARY_MAGIC.len();
    let mut index = 0u32;
    while at < body.len() {
        if index as usize >= TICKS_PER_REQUEST_MAX {
            return Err(too_many(TICKS_PER_REQUEST_MAX + 1));
        }
        let len = body[at] as usize;
        let end = at + BINARY_TICK_FIXED_BYTES + len;
        if end > body.len() {
            batch.rejected.push(Rejected { index, error: format!("truncated: the tick at byte {at} needs {} bytes, {} are left", end - at, body.len() - at) });
            break;
        }
        let symbol_bytes = &body[at + 1..at + 1 + len];
        let fixed = at + 1 + len;
        let price = f64::from_bits(read_u64(body, fixed));
        let size = f64::from_bits(read_u64(body, fixed + 8));
        let ts = read_u64(body, fixed + 16) as i64;
        let seq = read_u64(body, fixed + 24);
        let checked = match std::str::from_utf8(symbol_bytes) {
            Err(_) => Err("symbol is not UTF-8".to_string()),
            Ok(symbol) => match check_symbol(symbol) {
                Some(reason) => Err(format!("{reason}: {symbol:?}")),
                None => check_values(price, size, ts, now_ms).map_err(|e| format!("{symbol}: {e}")),
            },
        };
        match checked {
            Ok(ts_ms) => batch.ticks.push(Decoded { index, symbol_at: (at + 1) as u32, symbol_len: len as u8, price, size, ts_ms, seq }),
            Err(error) => batch.rejected.push(Rejected { index, error }),
        }
        at = end;
        index += 1;
    }
    Ok(batch)
}

/// Append one tick in the binary layout (the ingest format and the log's block format).
pub fn encode_tick(out: &mut Vec<u8>, symbol: &str, price: f64, size: f64, ts_ms: i64, seq: u64) {
    debug_assert!(check_symbol(symbol).is_none());
    out.push(symbol.len() as u8);
    out.extend_from_slice(symbol.as_bytes());
    out.extend_from_slice(&price.to_bits().to_le_bytes());
    out.extend_from_slice(&size.to_bits().to_le_bytes());
    out.extend_from_slice(&ts_ms.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
}

/// A tick as read back from a block of the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TickView<'a> {
    pub symbol: &'a str,
    pub price: f64,
    pub size: f64,
    pub ts_ms: i64,
    pub seq: u64,
}

/// The ticks of one log record (a block). `None` from [`read_block`] means the record is not a
/// block of ours (a block is written only from checked ticks, and the log verifies checksums).
pub fn read_block(value: &[u8]) -> Option<Vec<TickView<'_>>> {
    let mut rest = value.strip_prefix(BINARY_MAGIC)?;
    let mut out = Vec::with_capacity(rest.len() / (BINARY_TICK_FIXED_BYTES + 4));
    while !rest.is_empty() {
        let len = rest[0] as usize;
        if rest.len() < BINARY_TICK_FIXED_BYTES + len {
            return None;
        }
        let symbol = std::str::from_utf8(&rest[1..1 + len]).ok()?;
        let fixed = 1 + len;
        out.push(TickView {
            symbol,
            price: f64::from_bits(read_u64(rest, fixed)),
            size: f64::from_bits(read_u64(rest, fixed + 8)),
            ts_ms: read_u64(rest, fixed + 16) as i64,
            seq: read_u64(rest, fixed + 24),
        });
        rest = &rest[BINARY_TICK_FIXED_BYTES + len..];
    }
    Some(out)
}

/// A bar interval, as clients name it (`1s`, `5s`, `1m`, `15m`, `1h`, `1d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interval {
    pub ms: i64,
}

impl Interval {
    pub fn parse(text: &str) -> Result<Interval, String> {
        let bad = || format!("interval must be a number and a unit of s, m, h or d (1s, 5m, 1h), got {text:?}");
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = text.split_at(split);
        let n: i64 = n.parse().map_err(|_| bad())?;
        let unit_ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        if n == 0 || n > 1_000 {
            return Err(format!("interval {text:?} must be 1 to 1000 of its unit"));
        }
        Ok(Interval { ms: n * unit_ms })
    }

    pub fn name(&self) -> String {
        let (n, unit) = match self.ms {
            ms if ms % 86_400_000 == 0 => (ms / 86_400_000, "d"),
            ms if ms % 3_600_000 == 0 => (ms / 3_600_000, "h"),
            ms if ms % 60_000 == 0 => (ms / 60_000, "m"),
            ms => (ms / 1_000, "s"),
        };
        format!("{n}{unit}")
    }

    /// The start of the bar holding `ts_ms` (bars are aligned on the epoch).
    pub fn bucket(&self, ts_ms: i64) -> i64 {
        ts_ms - ts_ms.rem_euclid(self.ms)
    }
}

/// Simple moving average over the last `n` values: a ring and a running sum.
#[derive(Debug, Clone)]
pub struct Sma {
    n: usize,
    window: VecDeque<f64>,
    sum: f64,
}

impl Sma {
    pub fn new(n: usize) -> Sma {
        assert!(n >= 1);
        Sma { n, window: VecDeque::with_capacity(n), sum: 0.0 }
    }

    pub fn push(&mut self, value: f64) {
        if self.window.len() == self.n {
            self.sum -= self.window.pop_front().expect("full");
        }
        self.window.push_back(value);
        self.sum += value;
    }

    /// `None` until `n` values have been seen.
    pub fn value(&self) -> Option<f64> {
        (self.window.len() == self.n).then(|| self.sum / self.n as f64)
    }
}

/// Exponential moving average with `alpha = 2 / (n + 1)`, seeded with the simple average of the
/// first `n` values (the usual charting convention).
#[derive(Debug, Clone)]
pub struct Ema {
    n: usize,
    seen: usize,
    seed_sum: f64,
    value: Option<f64>,
}

impl Ema {
    pub fn new(n: usize) -> Ema {
        assert!(n >= 1);
        Ema { n, seen: 0, seed_sum: 0.0, value: None }
    }

    pub fn push(&mut self, x: f64) {
        self.seen += 1;
        match self.value {
            Some(previous) => {
                let alpha = 2.0 / (self.n as f64 + 1.0);
                self.value = Some(alpha * x + (1.0 - alpha) * previous);
            }
            None => {
                self.seed_sum += x;
                if self.seen == self.n {
                    self.value = Some(self.seed_sum / self.n as f64);
                }
            }
        }
    }

    pub fn value(&self) -> Option<f64> {
        self.value
    }
}

/// Relative strength index over `n` changes with Wilder's smoothing: the first averages are plain
/// means of the first `n` gains and losses, later ones `(avg * (n - 1) + x) / n`.
#[derive(Debug, Clone)]
pub struct Rsi {
    n: usize,
    previous: Option<f64>,
    changes: usize,
    gain: f64,
    loss: f64,
}

impl Rsi {
    pub fn new(n: usize) -> Rsi {
        assert!(n >= 1);
        Rsi { n, previous: None, changes: 0, gain: 0.0, loss: 0.0 }
    }

    pub fn push(&mut self, x: f64) {
        let Some(previous) = self.previous.replace(x) else { return };
        let change = x - previous;
        let (up, down) = (change.max(0.0), (-change).max(0.0));
        self.changes += 1;
        let n = self.n as f64;
        if self.changes <= self.n {
            self.gain += up;
            self.loss += down;
            if self.changes == self.n {
                self.gain /= n;
                self.loss /= n;
            }
        } else {
            self.gain = (self.gain * (n - 1.0) + up) / n;
            self.loss = (self.loss * (n - 1.0) + down) / n;
        }
    }

    /// `None` until `n` changes (`n + 1` values) have been seen. 100 when nothing fell, 50 when
    /// nothing moved.
    pub fn value(&self) -> Option<f64> {
        if self.changes < self.n {
            return None;
        }
        Some(match (self.gain, self.loss) {
            (g, l) if l == 0.0 && g == 0.0 => 50.0,
            (_, 0.0) => 100.0,
            (g, l) => 100.0 - 100.0 / (1.0 + g / l),
        })
    }
}

/// One OHLC bar with its volume and VWAP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Bar {
    /// Start of the bar, ms since the epoch (aligned on the interval).
    pub start: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    /// Sum of the ticks' sizes.
    pub volume: f64,
    /// Volume-weighted average price (`None` for a bar of size-0 ticks only).
    pub vwap: Option<f64>,
    pub ticks: u64,
    #[serde(skip)]
    pv: f64,
}

impl Bar {
    fn open_with(start: i64, price: f64, size: f64) -> Bar {
        let mut bar = Bar { start, open: price, high: price, low: price, close: price, volume: 0.0, vwap: None, ticks: 0, pv: 0.0 };
        bar.add(price, size);
        bar
    }

    fn add(&mut self, price: f64, size: f64) {
        self.high = self.high.max(price);
        self.low = self.low.min(price);
        self.close = price;
        self.volume += size;
        self.pv += price * size;
        self.vwap = (self.volume > 0.0).then(|| self.pv / self.volume);
        self.ticks += 1;
    }
}

/// Indicator periods, shared by every symbol and interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Periods {
    pub sma: usize,
    pub ema: usize,
    pub rsi: usize,
}

/// A closed bar and the indicators of the closes up to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ClosedBar {
    #[serde(flatten)]
    pub bar: Bar,
    pub sma: Option<f64>,
    pub ema: Option<f64>,
    pub rsi: Option<f64>,
}

/// Bars of one symbol at one interval: the open bar, the last closed ones, and the indicators
/// over closes.
#[derive(Debug, Clone)]
pub struct Series {
    pub interval: Interval,
    pub open: Option<Bar>,
    pub closed: VecDeque<ClosedBar>,
    kept: usize,
    sma: Sma,
    ema: Ema,
    rsi: Rsi,
    /// Ticks older than the open bar (arrived after their bar closed): in the last price, not in a bar.
    pub late: u64,
}

impl Series {
    pub fn new(interval: Interval, periods: Periods, kept: usize) -> Series {
        Series { interval, open: None, closed: VecDeque::new(), kept, sma: Sma::new(periods.sma), ema: Ema::new(periods.ema), rsi: Rsi::new(periods.rsi), late: 0 }
    }

    /// Add a tick; returns the bar it closed, if any. A bar closes when a tick of a later bar
    /// arrives (event time: the bars are a function of the log, the same after a replay).
    pub fn add(&mut self, price: f64, size: f64, ts_ms: i64) -> Option<ClosedBar> {
        let start = self.interval.bucket(ts_ms);
        match &mut self.open {
            Some(bar) if bar.start == start => {
                bar.add(price, size);
                None
            }
            Some(bar) if start < bar.start => {
                self.late += 1;
                None
            }
            open => {
                let previous = open.replace(Bar::open_with(start, price, size));
                previous.map(|bar| self.close(bar))
            }
        }
    }

    fn close(&mut self, bar: Bar) -> ClosedBar {
        self.sma.push(bar.close);
        self.ema.push(bar.close);
        self.rsi.push(bar.close);
        let closed = ClosedBar { bar, sma: self.sma.value(), ema: self.ema.value(), rsi: self.rsi.value() };
        if self.kept > 0 {
            if self.closed.len() == self.kept {
                self.closed.pop_front();
            }
            self.closed.push_back(closed);
        }
        closed
    }

    /// The indicators as they would be if the open bar closed now.
    pub fn provisional(&self) -> Option<ClosedBar> {
        let bar = self.open?;
        let (mut sma, mut ema, mut rsi) = (self.sma.clone(), self.ema.clone(), self.rsi.clone());
        sma.push(bar.close);
        ema.push(bar.close);
        rsi.push(bar.close);
        Some(ClosedBar { bar, sma: sma.value(), ema: ema.value(), rsi: rsi.value() })
    }
}

/// The last tick of a symbol.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LastTick {
    pub price: f64,
    pub size: f64,
    pub ts: i64,
    /// 0 when the source sends none.
    pub seq: u64,
}

/// What applying one tick produced besides the tick itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Derived {
    /// The source sequence jumped: `expected` was due, `got` came.
    Gap { expected: u64, got: u64 },
    /// A stale symbol ticked again after `silent_ms`.
    Resumed { silent_ms: u64 },
    /// A bar of the series at this index closed.
    BarClosed { series: usize, bar: ClosedBar },
}

/// Everything known about one symbol.
#[derive(Debug, Clone)]
pub struct SymbolState {
    pub symbol: Arc<str>,
    pub last: Option<LastTick>,
    /// The highest source sequence applied (0: none yet).
    pub seq: u64,
    /// The highest sequence accepted for appending (ahead of `seq` while a block is being made
    /// durable); duplicates are refused against it.
    pub reserved_seq: u64,
    pub ticks: u64,
    pub gaps: u64,
    pub missing: u64,
    pub stale: bool,
    /// Wall clock (ms) of the last tick applied, or of the system's start for a recovered symbol.
    pub last_seen_ms: i64,
    pub day: i64,
    day_pv: f64,
    day_volume: f64,
    pub series: Vec<Series>,
}

const DAY_MS: i64 = 86_400_000;

impl SymbolState {
    pub fn new(symbol: Arc<str>, intervals: &[Interval], periods: Periods, kept: usize, now_ms: i64) -> SymbolState {
        SymbolState {
            symbol,
            last: None,
            seq: 0,
            reserved_seq: 0,
            ticks: 0,
            gaps: 0,
            missing: 0,
            stale: false,
            last_seen_ms: now_ms,
            day: 0,
            day_pv: 0.0,
            day_volume: 0.0,
            series: intervals.iter().map(|&i| Series::new(i, periods, kept)).collect(),
        }
    }

    /// Refuse a tick whose sequence is not after every sequence accepted before it (a
    /// duplicate or a reordering of the source). Ticks without a sequence are never refused.
    pub fn reserve(&mut self, seq: u64) -> Result<(), String> {
        if seq == 0 {
            return Ok(());
        }
        if seq <= self.reserved_seq {
            return Err(format!("{}: seq {seq} is a duplicate or out of order (seq {} was accepted already)", self.symbol, self.reserved_seq));
        }
        self.reserved_seq = seq;
        Ok(())
    }

    /// Apply an accepted tick, in log order; what it caused goes to `out`.
    pub fn apply(&mut self, tick: &TickView<'_>, now_ms: i64, out: &mut Vec<Derived>) {
        if self.stale {
            self.stale = false;
            out.push(Derived::Resumed { silent_ms: (now_ms - self.last_seen_ms).max(0) as u64 });
        }
        self.last_seen_ms = now_ms;
        if tick.seq != 0 {
            if self.seq != 0 && tick.seq > self.seq + 1 {
                self.gaps += 1;
                self.missing += tick.seq - self.seq - 1;
                out.push(Derived::Gap { expected: self.seq + 1, got: tick.seq });
            }
            self.seq = self.seq.max(tick.seq);
            self.reserved_seq = self.reserved_seq.max(self.seq);
        }
        self.ticks += 1;
        self.last = Some(LastTick { price: tick.price, size: tick.size, ts: tick.ts_ms, seq: tick.seq });
        let day = tick.ts_ms.div_euclid(DAY_MS);
        if day > self.day {
            self.day = day;
            self.day_pv = 0.0;
            self.day_volume = 0.0;
        }
        if day == self.day {
            self.day_pv += tick.price * tick.size;
            self.day_volume += tick.size;
        }
        for (i, series) in self.series.iter_mut().enumerate() {
            if let Some(bar) = series.add(tick.price, tick.size, tick.ts_ms) {
                out.push(Derived::BarClosed { series: i, bar });
            }
        }
    }

    /// The volume-weighted average price of the current UTC day (of the ticks' own time).
    pub fn day_vwap(&self) -> Option<f64> {
        (self.day_volume > 0.0).then(|| self.day_pv / self.day_volume)
    }

    /// Mark the symbol stale if nothing came for `stale_after_ms`; true if it just became so.
    pub fn check_stale(&mut self, now_ms: i64, stale_after_ms: i64) -> bool {
        if !self.stale && self.ticks > 0 && now_ms - self.last_seen_ms >= stale_after_ms {
            self.stale = true;
            return true;
        }
        false
    }
}

/// A tick as subscribers and replay readers receive it.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct TickOut<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub symbol: &'a str,
    pub price: f64,
    pub size: f64,
    pub ts: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl<'a> TickOut<'a> {
    pub fn of(tick: &TickView<'a>) -> TickOut<'a> {
        TickOut { kind: "tick", symbol: tick.symbol, price: tick.price, size: tick.size, ts: tick.ts_ms, seq: tick.seq }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    /// Straightforward references, computed from the whole list each time.
    fn sma_reference(values: &[f64], n: usize) -> Option<f64> {
        (values.len() >= n).then(|| values[values.len() - n..].iter().sum::<f64>() / n as f64)
    }

    fn ema_reference(values: &[f64], n: usize) -> Option<f64> {
        if values.len() < n {
            return None;
        }
        let alpha = 2.0 / (n as f64 + 1.0);
        let mut ema = values[..n].iter().sum::<f64>() / n as f64;
        for &v in &values[n..] {
            ema = alpha * v + (1.0 - alpha) * ema;
        }
        Some(ema)
    }

    fn rsi_reference(values: &[f64], n: usize) -> Option<f64> {
        if values.len() < n + 1 {
            return None;
        }
        let changes: Vec<f64> = values.windows(2).map(|w| w[1] - w[0]).collect();
        let mut gain = changes[..n].iter().map(|c| c.max(0.0)).sum::<f64>() / n as f64;
        let mut loss = changes[..n].iter().map(|c| (-c).max(0.0)).sum::<f64>() / n as f64;
        for c in &changes[n..] {
            gain = (gain * (n as f64 - 1.0) + c.max(0.0)) / n as f64;
            loss = (loss * (n as f64 - 1.0) + (-c).max(0.0)) / n as f64;
        }
        Some(if loss == 0.0 { if gain == 0.0 { 50.0 } else { 100.0 } } else { 100.0 - 100.0 / (1.0 + gain / loss) })
    }

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => (a - b).abs() < 1e-9 * a.abs().max(1.0),
            _ => false,
        }
    }

    #[test]
    fn incremental_indicators_match_their_references_at_every_step() {
        // A deterministic walk with rises, falls and flat stretches.
        let mut x = 100.0f64;
        let mut values = Vec::new();
        let (mut sma, mut ema, mut rsi) = (Sma::new(5), Ema::new(5), Rsi::new(14));
        for i in 0..300u64 {
            let step = ((i * 7919) % 13) as f64 - 6.0;
            x = (x + step * 0.25).max(1.0);
            if i % 17 == 0 {
                x = values.last().copied().unwrap_or(x);
            }
            values.push(x);
            sma.push(x);
            ema.push(x);
            rsi.push(x);
            assert!(close(sma.value(), sma_reference(&values, 5)), "sma at {i}");
            assert!(close(ema.value(), ema_reference(&values, 5)), "ema at {i}");
            assert!(close(rsi.value(), rsi_reference(&values, 14)), "rsi at {i}: {:?} vs {:?}", rsi.value(), rsi_reference(&values, 14));
        }
    }

    #[test]
    fn rsi_of_a_textbook_series() {
        // The 14-period example closes printed by many references: gains sum to 3.34 and losses
        // to 1.40 over the first 14 changes, so RSI = 100 - 100 / (1 + 3.34 / 1.40) = 70.46.
        // (References that round the averages to 0.24 and 0.10 first print 70.53.)
        let closes = [44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08, 45.89, 46.03, 45.61, 46.28, 46.28];
        let mut rsi = Rsi::new(14);
        for c in closes {
            rsi.push(c);
        }
        let value = rsi.value().unwrap();
        assert!((value - (100.0 - 100.0 / (1.0 + 3.34 / 1.40))).abs() < 1e-9, "{value}");
    }

    #[test]
    fn bars_close_on_the_first_tick_of_a_later_bar_and_keep_late_ticks_out() {
        let periods = Periods { sma: 2, ema: 2, rsi: 2 };
        let mut series = Series::new(Interval::parse("1m").unwrap(), periods, 10);
        assert_eq!(series.add(10.0, 1.0, 60_000), None);
        assert_eq!(series.add(12.0, 3.0, 61_000), None);
        assert_eq!(series.add(9.0, 0.0, 119_999), None);
        let closed = series.add(11.0, 2.0, 180_500).expect("a later bar closes the open one");
        assert_eq!((closed.bar.start, closed.bar.open, closed.bar.high, closed.bar.low, closed.bar.close), (60_000, 10.0, 12.0, 9.0, 9.0));
        assert_eq!((closed.bar.volume, closed.bar.ticks), (4.0, 3));
        assert!(close(closed.bar.vwap, Some((10.0 + 36.0) / 4.0)));
        assert_eq!(closed.sma, None, "one close is not yet a 2-period average");
        assert_eq!(series.add(50.0, 1.0, 100_000), None, "a tick of a closed bar is late");
        assert_eq!(series.late, 1);
        let second = series.add(13.0, 1.0, 240_000).unwrap();
        assert_eq!(second.bar.start, 180_000);
        assert!(close(second.sma, Some((9.0 + 11.0) / 2.0)));
        assert!(close(second.ema, Some((9.0 + 11.0) / 2.0)));
    }

    #[test]
    fn both_codecs_read_the_same_ticks_and_reject_bad_ones_alone() {
        let now = 1_700_000_000_000;
        let ndjson = b"{\"symbol\":\"NAS.AAPL\",\"price\":189.5,\"size\":100,\"ts\":1700000000000,\"seq\":7}\n\n{\"symbol\":\"bad symbol\",\"price\":1}\n{\"symbol\":\"X\",\"price\":-1}\n{\"symbol\":\"MSFT\",\"price\":400}\n";
        let batch = decode_ndjson(ndjson, now).unwrap();
        assert_eq!(batch.ticks.len(), 2);
        assert_eq!(batch.rejected.iter().map(|r| r.index).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(batch.ticks[0].symbol(ndjson), "NAS.AAPL");
        assert_eq!(batch.ticks[1].ts_ms, now, "no ts: stamped on ingest");
        let mut binary = BINARY_MAGIC.to_vec();
        encode_tick(&mut binary, "NAS.AAPL", 189.5, 100.0, 1_700_000_000_000, 7);
        binary.push(1);
        binary.extend_from_slice(b"X");
        binary.extend_from_slice(&f64::NAN.to_bits().to_le_bytes());
        binary.extend_from_slice(&[0; 24]);
        encode_tick(&mut binary, "MSFT", 400.0, 0.0, 0, 0);
        binary.extend_from_slice(&[3, b'A']);
        let batch = decode_binary(&binary, now).unwrap();
        assert_eq!(batch.ticks.len(), 2);
        assert_eq!(batch.ticks[0].symbol(&binary), "NAS.AAPL");
        assert_eq!((batch.ticks[0].price, batch.ticks[0].size, batch.ticks[0].seq), (189.5, 100.0, 7));
        assert_eq!(batch.rejected.len(), 2);
        assert!(batch.rejected[0].error.contains("price"), "{:?}", batch.rejected);
        assert!(batch.rejected[1].error.contains("truncated"), "{:?}", batch.rejected);
        assert!(decode_binary(b"nope", now).is_err());
    }

    #[test]
    fn symbols_are_subject_shaped() {
        for good in ["AAPL", "NAS.AAPL", "BTC-USD", "es_z26", "A.B.C"] {
            assert_eq!(check_symbol(good), None, "{good}");
        }
        for bad in ["", ".A", "A.", "A..B", "A B", "A*", "A>", "ÄPFEL", &"X".repeat(33)] {
            assert!(check_symbol(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn gaps_and_duplicates_follow_the_source_sequence() {
        let periods = Periods { sma: 2, ema: 2, rsi: 2 };
        let mut state = SymbolState::new("A".into(), &[], periods, 0, 0);
        let tick = |seq| TickView { symbol: "A", price: 1.0, size: 1.0, ts_ms: 1, seq };
        let mut out = Vec::new();
        state.reserve(1).unwrap();
        state.apply(&tick(1), 0, &mut out);
        assert!(state.reserve(1).is_err());
        state.reserve(5).unwrap();
        state.apply(&tick(5), 0, &mut out);
        assert_eq!(out, vec![Derived::Gap { expected: 2, got: 5 }]);
        assert_eq!((state.gaps, state.missing), (1, 3));
        assert!(state.reserve(4).is_err(), "behind the last accepted");
    }
}
