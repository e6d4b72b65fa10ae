//! stock-price-updates: a market-data feed. Ticks come in batched (NDJSON or a compact binary
//! layout), are appended durably to a log partitioned by symbol, update a last-price cache and
//! incremental indicators per symbol (OHLC bars per interval, SMA, EMA, RSI, VWAP), and fan out to
//! subscribers filtered by symbol and pattern over WebSocket or SSE, with conflation for slow
//! consumers. Gaps in a source's sequence and symbols gone silent are explicit events, streamed
//! and queryable. Any past moment can be replayed from the same log.
//!
//! ```text
//!  Exchanges / feed ──POST /v1/stocks/ticks──▶ Feed handler ──group by partition──▶ partition workers (one thread each)
//!  (NDJSON or binary)                          (decode, check)                        │ 1. refuse duplicate seq
//!                                                                                     │ 2. append one block (fsync)
//!                                                                                     ▼    to topic stock-ticks
//!                      GET /v1/stocks/last ◀── Last price cache ◀── 3. apply in log order: last price, seq,
//!                      GET …/bars, …/events      + indicators          gaps, bars, SMA/EMA/RSI, VWAP
//!                                                                      │ 4. fan out (symbol → matching
//!  GET /v1/stocks/ws | /v1/stocks/stream ◀── subscriber buffers ◀──────┘    subscribers, cached per symbol)
//!  ?symbols=AAPL,NAS.*&conflate=true&from_ms=T   (replay from the log, then live)
//! ```
//!
//! **Ingest and durability.** `POST /v1/stocks/ticks` takes NDJSON (one tick per line) or, with
//! `content-type: application/octet-stream`, the binary layout of [`process::decode_binary`].
//! Each tick is checked on its own: a bad one is listed in the answer's `rejected` with its line
//! and reason, the good ones go on. The answer (`201`) comes only once every accepted tick is in
//! the log and synced (topic `stock-ticks`, durability `always`). The partition of a tick is the
//! stable key hash of its symbol (as a keyed record would land), so one symbol's ticks stay in
//! order. One worker thread per partition takes every request queued for it, appends them as one
//! batch and waits for one fsync: concurrent requests share the sync (group commit) and the
//! worker applies blocks strictly in log order.
//!
//! **Packed records.** At a million ticks per second a record per tick would cost the log ~30
//! bytes of framing and the appender a record each; instead the ticks of one partition in one
//! round are packed into blocks of up to `TICKS_PER_RECORD_MAX` ticks (the binary layout again,
//! one log record each). Replay is still exact: a tick's position is (partition, offset, index in
//! the block), the log's timestamp of the block is the time it was accepted, and blocks are
//! never split or merged after the append.
//!
//! **Sequence, gaps and duplicates.** A tick may carry its source's sequence number `seq`. A
//! `seq` at or below the symbol's last accepted one is refused as a duplicate or reordering
//! (the feed's retry after a timeout is safe); a `seq` that jumps emits a `gap` event naming the
//! missing range. A symbol that sends nothing for `stale_after_ms` emits `stale`, and `resumed`
//! when it ticks again. All three are streamed to the symbol's subscribers and kept (the last
//! `MARKET_EVENTS_KEPT`) for `GET /v1/stocks/market-events`.
//!
//! **Indicators.** Per symbol and interval (default 1s and 1m): OHLC bars with volume and VWAP,
//! aligned on the epoch by the tick's own time; a bar closes when a tick of a later bar arrives,
//! and a `bar` event carries it with SMA, EMA and RSI over the closes (periods default 20, 20,
//! 14). Plus the day's VWAP per symbol. All are O(1) per tick (running sums and rings) and are a
//! pure function of the log: replaying it rebuilds them exactly.
//!
//! **Subscriptions.** A connection names symbols and patterns (`AAPL`, `NAS.*`, `NAS.>`),
//! matched with the engine's subject trie once per symbol and cached in the symbol's state until
//! a subscription changes. Without conflation a connection that falls `buffer` events behind is
//! closed with reason `slow_consumer` (it may reconnect with `from_ms`); with `conflate=true` it
//! keeps only the newest tick per symbol that it has not been sent yet (bars and market events
//! are never conflated), as market-data users expect. With `from_ms=T` a connection first
//! replays the log from T (each partition from the log's time index, merged by the time the
//! blocks were accepted), then continues live with no tick missed or repeated: the
//! subscription starts at a recorded offset of every partition, and the replay stops there.
//!
//! **Restart.** The state (last prices, sequences, bars and indicators) is rebuilt on start by
//! reading the retained log once. No snapshot is written yet, so start-up time grows with the
//! retained log (`retention_ms` bounds it).
//!
//! **Several nodes.** The tick log is the context's [`StreamStore`](tributary_engine::stream::StreamStore):
//! the engine's topic, or one on NATS JetStream that every node appends to. A partition worker
//! checks a round's ticks against its partition's state applied up to the log's offset `e`, and
//! appends the blocks only if the partition still ends at `e` (`produce_at`, a conditional
//! append). So the log holds only ticks that passed the check at their place in it, and every
//! node's state, replay and cursors read the same log. When another node appended first
//! (`EndMoved`, counted in the status as `appends_overtaken`), the worker waits for this node's
//! follower to apply what was appended, then checks the round's remaining ticks again: a seq the
//! other node took meanwhile is now refused as a duplicate. On a shared log, each partition has
//! a follower (a thread reading the live tail) that applies the records other nodes appended and
//! fans them out to this node's subscribers; the embedded engine has one writer and no follower.
//! Stale and resumed events depend on when a node applied a tick, so they are each node's own
//! (gap events come from the log and are the same everywhere), as are the `SYMBOLS_MAX` count of
//! symbols and the recorded market events.
//!
//! **What it does not do.** No order books, no quotes-vs-trades join (`ASOF JOIN`), no bars
//! filled for intervals without ticks (`SAMPLE BY … FILL`), no per-subscriber history beyond the
//! log (a reconnecting client names its `from_ms`). Bars are closed by event time only: the last
//! bar of a symbol that stops ticking stays open (its `stale` event says why) and is shown as
//! such. WebSocket ingest is not offered (HTTP keep-alive batches carry the rate).

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tributary_core::limits::BATCH_BYTES_MAX;
use tributary_core::{Record, StoredRecord, Subject, SubjectPattern, now_ms, partition_for_key};
use tributary_engine::pubsub::{SubjectTrie, SubscriptionId};
use tributary_engine::stream::TopicConfig;
use tributary_engine::{Engine, StreamError};
use tributary_runtime::SystemMetrics;
use tributary_server::shared_log::{self, FANOUT_WAIT_MAX, Reader, SharedLog};
use tributary_server::{ApiError, Gateway, SystemApi};

use crate::{Context, System};
use process::{ClosedBar, Decoded, Derived, Interval, LastTick, Periods, Rejected, SymbolState, TickOut, TickView};

pub const ID: &str = "stock-price-updates";
/// The durable tick log: blocks of ticks, partitioned by symbol.
pub const TICKS_TOPIC: &str = "stock-ticks";
/// Partitions of the tick log by default: one worker thread each.
pub const PARTITIONS_DEFAULT: u32 = 8;
/// Ticks one partition worker takes into one round (one appended batch) at most; a single
/// request larger than this still goes whole.
pub const ROUND_TICKS_MAX: usize = 50_000;
/// Gap, stale and resumed events kept for `GET /v1/stocks/market-events`.
pub const MARKET_EVENTS_KEPT: usize = 10_000;
/// Events buffered for one connection by default before it is closed as a slow consumer.
pub const SUBSCRIBER_BUFFER_DEFAULT: usize = 100_000;
/// Largest buffer a connection may ask for, in events.
pub const SUBSCRIBER_BUFFER_MAX: usize = 1_000_000;
/// Symbols and patterns one connection may name.
pub const SUBSCRIPTION_PATTERNS_MAX: usize = 1_000;
/// Log records read per step of a replay, per partition.
pub const REPLAY_CHUNK_RECORDS: usize = 64;
/// Log records read per step of the rebuild at start and of a follower.
pub const RECOVER_CHUNK_RECORDS: usize = 1_000;
/// A silent symbol is marked stale after this long by default, in milliseconds.
pub const STALE_AFTER_MS_DEFAULT: i64 = 5_000;

const _: () = assert!(ROUND_TICKS_MAX * (process::BINARY_TICK_FIXED_BYTES + process::SYMBOL_BYTES_MAX) * 2 < BATCH_BYTES_MAX);
const _: () = assert!(process::TICKS_PER_REQUEST_MAX * (process::BINARY_TICK_FIXED_BYTES + process::SYMBOL_BYTES_MAX) < BATCH_BYTES_MAX);

/// How the system runs. The defaults are the seed's deployment; tests shorten the clocks.
#[derive(Debug, Clone)]
pub struct StockConfig {
    pub partitions: u32,
    pub intervals: Vec<Interval>,
    pub periods: Periods,
    /// Closed bars kept in memory per symbol and interval.
    pub bars_kept: usize,
    pub stale_after_ms: i64,
    /// How often silence is checked, in milliseconds.
    pub stale_check_ms: u64,
    /// Retention of the tick log (`None`: keep everything).
    pub retention_ms: Option<u64>,
}

impl Default for StockConfig {
    fn default() -> Self {
        StockConfig {
            partitions: PARTITIONS_DEFAULT,
            intervals: vec![Interval { ms: 1_000 }, Interval { ms: 60_000 }],
            periods: Periods { sma: 20, ema: 20, rsi: 14 },
            bars_kept: 120,
            stale_after_ms: STALE_AFTER_MS_DEFAULT,
            stale_check_ms: 250,
            retention_ms: None,
        }
    }
}

impl StockConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.intervals.len() <= process::INTERVALS_MAX, "at most INTERVALS_MAX ({}) intervals", process::INTERVALS_MAX);
        let p = self.periods;
        for n in [p.sma, p.ema, p.rsi] {
            anyhow::ensure!((1..=process::INDICATOR_PERIOD_MAX).contains(&n), "indicator periods must be 1 to INDICATOR_PERIOD_MAX ({})", process::INDICATOR_PERIOD_MAX);
        }
        anyhow::ensure!(self.bars_kept <= process::BARS_KEPT_MAX, "bars_kept is over BARS_KEPT_MAX ({})", process::BARS_KEPT_MAX);
        anyhow::ensure!(self.stale_after_ms > 0 && self.stale_check_ms > 0, "stale clocks must be positive");
        Ok(())
    }
}

/// What a market event is, for subscriber filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Tick,
    /// A bar of the configured interval at this index closed.
    Bar(usize),
    /// Gap, stale, resumed: every subscriber of the symbol gets them.
    Status,
}

/// One event as every matching connection receives it: serialized once.
#[derive(Debug)]
pub struct MarketEvent {
    pub kind: EventKind,
    /// `tick`, `bar`, `gap`, `stale` or `resumed`: the SSE event name.
    pub name: &'static str,
    pub symbol: Arc<str>,
    pub json: String,
    /// When the request carrying the tick arrived (ticks only).
    pub accepted: Option<Instant>,
}

/// Why a connection was closed by the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    SlowConsumer,
    ShuttingDown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ShuttingDown => "shutting_down",
        }
    }
}

/// What a connection asked for.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub patterns: Vec<SubjectPattern>,
    pub ticks: bool,
    /// Bit `i` set: bar events of interval `i`.
    pub bars: u32,
    pub conflate: bool,
    pub buffer: usize,
}

#[derive(Default)]
struct Buffer {
    queue: VecDeque<Arc<MarketEvent>>,
    /// Conflation: symbol → absolute position of its pending tick (`head` counts drained ones).
    pending_tick: hashbrown::HashMap<Arc<str>, u64>,
    head: u64,
    closed: Option<CloseReason>,
    conflated: u64,
    delivered: u64,
}

/// One live subscription (one connection).
pub struct Subscriber {
    pub id: u64,
    pub spec: SubscriptionSpec,
    ids: Vec<SubscriptionId>,
    buffer: Mutex<Buffer>,
    pub ready: Notify,
}

impl Subscriber {
    fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Tick => self.spec.ticks,
            EventKind::Bar(i) => self.spec.bars & (1 << i) != 0,
            EventKind::Status => true,
        }
    }

    fn push(&self, events: impl Iterator<Item = Arc<MarketEvent>>) {
        let mut buffer = self.buffer.lock();
        if buffer.closed.is_some() {
            return;
        }
        for event in events {
            if self.spec.conflate && event.kind == EventKind::Tick {
                let end = buffer.head + buffer.queue.len() as u64;
                match buffer.pending_tick.get(&event.symbol).copied() {
                    Some(at) if at >= buffer.head => {
                        let index = (at - buffer.head) as usize;
                        buffer.queue[index] = event;
                        buffer.conflated += 1;
                        continue;
                    }
                    _ => {
                        buffer.pending_tick.insert(event.symbol.clone(), end);
                    }
                }
            }
            if buffer.queue.len() >= self.spec.buffer {
                buffer.closed = Some(CloseReason::SlowConsumer);
                buffer.queue.clear();
                buffer.pending_tick.clear();
                break;
            }
            buffer.queue.push_back(event);
        }
        drop(buffer);
        self.ready.notify_one();
    }

    /// Take everything buffered; `Err` once the subscription was closed (after what it held).
    pub fn drain(&self, out: &mut Vec<Arc<MarketEvent>>) -> Result<(), CloseReason> {
        let mut buffer = self.buffer.lock();
        if let Some(reason) = buffer.closed {
            return Err(reason);
        }
        buffer.head += buffer.queue.len() as u64;
        buffer.delivered += buffer.queue.len() as u64;
        out.extend(buffer.queue.drain(..));
        if buffer.pending_tick.len() > 4 * self.spec.buffer.min(1 << 16) {
            buffer.pending_tick.clear();
        }
        Ok(())
    }

    fn close(&self, reason: CloseReason) {
        let mut buffer = self.buffer.lock();
        buffer.closed.get_or_insert(reason);
        drop(buffer);
        self.ready.notify_one();
    }

    /// (buffered now, ticks replaced by newer ones, events handed out)
    pub fn counts(&self) -> (usize, u64, u64) {
        let buffer = self.buffer.lock();
        (buffer.queue.len(), buffer.conflated, buffer.delivered)
    }
}

/// One symbol of a partition, with its matching subscribers cached.
struct Entry {
    state: SymbolState,
    subject: Subject,
    subscribers_generation: u64,
    subscribers: Arc<[Arc<Subscriber>]>,
}

#[derive(Default)]
struct PartitionState {
    slots: hashbrown::HashMap<Arc<str>, u32>,
    entries: Vec<Entry>,
    /// The log offset after the last block applied.
    applied_end: u64,
}

/// A request's ticks for one partition.
struct Job {
    body: Bytes,
    ticks: Vec<Decoded>,
    accepted: Instant,
    reply: oneshot::Sender<Result<Vec<Rejected>, ApiError>>,
}

struct Partition {
    index: u32,
    jobs: Mutex<VecDeque<Job>>,
    wake: Condvar,
    state: Mutex<PartitionState>,
    /// Signalled when the follower applied what another node appended (a shared log).
    applied: Condvar,
}

/// A gap, stale or resumed event as kept for queries.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RecordedEvent {
    pub id: u64,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

/// What the worker threads, the stale sweeper and the API share.
struct Shared {
    config: StockConfig,
    /// The tick log: the engine's topic, or one every node appends to.
    log: SharedLog,
    partitions: Vec<Partition>,
    trie: RwLock<SubjectTrie<Arc<Subscriber>>>,
    /// Bumped by every subscribe and unsubscribe: cached matches older than it are redone.
    generation: AtomicU64,
    next_subscriber: AtomicU64,
    subscribers: AtomicUsize,
    symbols: AtomicUsize,
    market_events: Mutex<VecDeque<RecordedEvent>>,
    next_event: AtomicU64,
    metrics: SystemMetrics,
    ticks_total: AtomicU64,
    /// Appends refused because another node appended to the partition first.
    overtaken: AtomicU64,
    stop: AtomicBool,
    stop_signal: (Mutex<bool>, Condvar),
    /// Set to stop the followers of a shared log.
    following: Arc<AtomicBool>,
}

pub struct StockPriceUpdates {
    engine: Arc<Engine>,
    gateway: Gateway,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The blocks of one round, made from the ticks that passed the check against a partition's
/// state applied up to `expected` (its end then).
struct Blocks {
    expected: u64,
    records: Vec<Record>,
    /// Ticks per record.
    counts: Vec<usize>,
    /// Per tick, in block order: (job, index in the job), its symbol's slot, when it arrived.
    origin: Vec<(usize, usize)>,
    slots: Vec<u32>,
    accepted_at: Vec<Instant>,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(StockPriceUpdates::open(context, StockConfig::default())?)
}

/// Serialize a market event of `symbol` at most once, and only if someone wants it.
fn event(kind: EventKind, name: &'static str, symbol: &Arc<str>, accepted: Option<Instant>, json: impl FnOnce() -> String) -> Arc<MarketEvent> {
    Arc::new(MarketEvent { kind, name, symbol: symbol.clone(), json: json(), accepted })
}

fn derived_name(derived: &Derived) -> &'static str {
    match derived {
        Derived::Gap { .. } => "gap",
        Derived::Resumed { .. } => "resumed",
        Derived::BarClosed { .. } => "bar",
    }
}

fn status_json(state: &SymbolState, derived: &Derived, intervals: &[Interval]) -> String {
    let value = match derived {
        Derived::Gap { expected, got } => {
            serde_json::json!({"type": "gap", "symbol": &*state.symbol, "expected": expected, "got": got, "missing": got - expected, "ts": state.last.map(|l| l.ts)})
        }
        Derived::Resumed { silent_ms } => serde_json::json!({"type": "resumed", "symbol": &*state.symbol, "silent_ms": silent_ms}),
        Derived::BarClosed { series, bar } => {
            return serde_json::to_string(&BarEvent { kind: "bar", symbol: &state.symbol, interval: intervals[*series].name(), bar: *bar }).expect("bars serialize");
        }
    };
    value.to_string()
}

#[derive(Serialize)]
struct BarEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    symbol: &'a str,
    interval: String,
    #[serde(flatten)]
    bar: ClosedBar,
}

impl Shared {
    fn record_event(&self, value: serde_json::Value) {
        let id = self.next_event.fetch_add(1, Ordering::Relaxed);
        let mut events = self.market_events.lock();
        if events.len() == MARKET_EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(RecordedEvent { id, event: value });
    }

    /// The entry of `symbol` in a partition, created if new (`None` past `SYMBOLS_MAX`).
    fn slot(&self, state: &mut PartitionState, symbol: &str, now: i64) -> Option<u32> {
        if let Some(&slot) = state.slots.get(symbol) {
            return Some(slot);
        }
        if self.symbols.fetch_add(1, Ordering::AcqRel) >= process::SYMBOLS_MAX {
            self.symbols.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let name: Arc<str> = Arc::from(symbol);
        let subject = Subject::parse(symbol).expect("a checked symbol is a subject");
        let slot = state.entries.len() as u32;
        state.entries.push(Entry {
            state: SymbolState::new(name.clone(), &self.config.intervals, self.config.periods, self.config.bars_kept, now),
            subject,
            subscribers_generation: u64::MAX,
            subscribers: Arc::from(Vec::new()),
        });
        state.slots.insert(name, slot);
        Some(slot)
    }

    fn matching(&self, entry: &mut Entry, generation: u64) -> Arc<[Arc<Subscriber>]> {
        if entry.subscribers_generation != generation {
            let mut found: Vec<Arc<Subscriber>> = Vec::new();
            self.trie.read().for_each_match(&entry.subject, |_, s| {
                if !found.iter().any(|f| f.id == s.id) {
                    found.push(s.clone());
                }
            });
            entry.subscribers = found.into();
            entry.subscribers_generation = generation;
        }
        entry.subscribers.clone()
    }

    /// Apply one block of the log to a partition's state; events for subscribers go to `out`.
    fn apply_block(&self, state: &mut PartitionState, ticks: &[TickView<'_>], slots: Option<&[u32]>, accepted: Option<&[Instant]>, out: &mut Vec<(Arc<Subscriber>, Arc<MarketEvent>)>, live: bool) {
        let now = now_ms();
        let generation = self.generation.load(Ordering::Acquire);
        let mut derived = Vec::new();
        for (i, tick) in ticks.iter().enumerate() {
            let slot = match slots {
                Some(slots) => slots[i],
                None => match self.slot(state, tick.symbol, now) {
                    Some(slot) => slot,
                    None => continue,
                },
            };
            let entry = &mut state.entries[slot as usize];
            derived.clear();
            entry.state.apply(tick, now, &mut derived);
            for d in &derived {
                if !matches!(d, Derived::BarClosed { .. }) {
                    let json = status_json(&entry.state, d, &self.config.intervals);
                    self.record_event(serde_json::from_str(&json).expect("our own JSON"));
                }
            }
            if !live {
                continue;
            }
            let subscribers = self.matching(entry, generation);
            if subscribers.is_empty() {
                continue;
            }
            // What the tick revealed (a gap, a resumption, closed bars) goes before the tick.
            for d in &derived {
                let kind = match d {
                    Derived::BarClosed { series, .. } => EventKind::Bar(*series),
                    _ => EventKind::Status,
                };
                if subscribers.iter().any(|s| s.wants(kind)) {
                    let e = event(kind, derived_name(d), &entry.state.symbol, None, || status_json(&entry.state, d, &self.config.intervals));
                    out.extend(subscribers.iter().filter(|s| s.wants(kind)).map(|s| (s.clone(), e.clone())));
                }
            }
            if subscribers.iter().any(|s| s.spec.ticks) {
                let at = accepted.map(|a| a[i]);
                let e = event(EventKind::Tick, "tick", &entry.state.symbol, at, || serde_json::to_string(&TickOut::of(tick)).expect("ticks serialize"));
                out.extend(subscribers.iter().filter(|s| s.spec.ticks).map(|s| (s.clone(), e.clone())));
            }
        }
    }

    fn deliver(&self, mut out: Vec<(Arc<Subscriber>, Arc<MarketEvent>)>) {
        if out.is_empty() {
            return;
        }
        // Group by subscriber, keeping each one's events in order: one lock and one wake each.
        out.sort_by_key(|(s, _)| s.id);
        let mut start = 0;
        while start < out.len() {
            let id = out[start].0.id;
            let end = start + out[start..].iter().take_while(|(s, _)| s.id == id).count();
            let subscriber = out[start].0.clone();
            subscriber.push(out[start..end].iter().map(|(_, e)| e.clone()));
            start = end;
        }
    }

    /// One partition's worker: take queued requests, refuse duplicates, append one batch,
    /// apply it in log order, fan out, answer.
    fn run_partition(&self, p: usize) {
        let partition = &self.partitions[p];
        loop {
            let mut jobs = Vec::new();
            {
                let mut queue = partition.jobs.lock();
                while queue.is_empty() {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    partition.wake.wait_for(&mut queue, Duration::from_millis(200));
                }
                let mut ticks = 0;
                while let Some(job) = queue.front() {
                    if ticks > 0 && ticks + job.ticks.len() > ROUND_TICKS_MAX {
                        break;
                    }
                    ticks += job.ticks.len();
                    jobs.push(queue.pop_front().expect("front exists"));
                }
            }
            self.round(partition, jobs);
        }
    }

    /// One round of a partition's worker: check the jobs' ticks against the applied state,
    /// append them as blocks at the end that state was built from, apply them in log order,
    /// fan out, answer. On a shared log another node may have appended first: then this node's
    /// follower applies what it appended, and the ticks not yet in the log are checked again
    /// (a seq another node took meanwhile is now refused as a duplicate).
    fn round(&self, partition: &Partition, jobs: Vec<Job>) {
        let mut rejected: Vec<Vec<Rejected>> = jobs.iter().map(|_| Vec::new()).collect();
        let mut pending: Vec<(usize, usize)> = jobs.iter().enumerate().flat_map(|(j, job)| (0..job.ticks.len()).map(move |t| (j, t))).collect();
        let mut out = Vec::new();
        let mut accepted = 0;
        let result = loop {
            let blocks = self.check(partition, &jobs, &pending, &mut rejected);
            if blocks.records.is_empty() {
                break Ok(());
            }
            let appended = self.log.produce_at(TICKS_TOPIC, partition.index, blocks.expected, blocks.records.clone());
            let went_in = match &appended {
                Ok(_) => blocks.records.len(),
                Err(StreamError::EndMoved { appended, .. }) => *appended,
                Err(_) => 0,
            };
            accepted += self.apply_appended(partition, &blocks, went_in, &mut out);
            let error = match appended {
                Ok(_) => break Ok(()),
                Err(error) => error,
            };
            // Ticks not in the log: let their sequences be offered again.
            let in_log: usize = blocks.counts[..went_in].iter().sum();
            {
                let mut state = partition.state.lock();
                for &slot in &blocks.slots[in_log..] {
                    let entry = &mut state.entries[slot as usize].state;
                    entry.reserved_seq = entry.seq;
                }
            }
            pending = blocks.origin[in_log..].to_vec();
            let StreamError::EndMoved { end, .. } = error else { break Err(ApiError::from(error)) };
            self.overtaken.fetch_add(1, Ordering::Relaxed);
            if self.log.shared() && self.wait_applied(partition, end) {
                continue;
            }
            let message = format!("another node appended to partition {} of {TICKS_TOPIC} first, and this node has not applied up to offset {end} within FANOUT_WAIT_MAX ({FANOUT_WAIT_MAX:?}); the ticks listed as accepted are in the log, the others are not", partition.index);
            break Err(ApiError::from(StreamError::Backend { backend: "shared log", message }));
        };
        if result.is_err() {
            self.metrics.error();
        }
        self.ticks_total.fetch_add(accepted as u64, Ordering::Relaxed);
        self.metrics.messages_in(accepted as u64);
        self.deliver(out);
        for (job, rejected) in jobs.into_iter().zip(rejected) {
            let _ = job.reply.send(result.clone().map(|_| rejected));
        }
    }

    /// Check the `pending` ticks against the partition's applied state, reserving their
    /// sequences, and pack those that pass into blocks; the others go to `rejected`.
    fn check(&self, partition: &Partition, jobs: &[Job], pending: &[(usize, usize)], rejected: &mut [Vec<Rejected>]) -> Blocks {
        let now = now_ms();
        let mut blocks = Blocks { expected: 0, records: Vec::new(), counts: Vec::new(), origin: Vec::new(), slots: Vec::new(), accepted_at: Vec::new() };
        let mut block: Vec<u8> = Vec::new();
        let mut state = partition.state.lock();
        blocks.expected = state.applied_end;
        for &(j, t) in pending {
            let job = &jobs[j];
            let tick = &job.ticks[t];
            let symbol = tick.symbol(&job.body);
            let Some(slot) = self.slot(&mut state, symbol, now) else {
                rejected[j].push(Rejected { index: tick.index, error: format!("{symbol}: the system tracks SYMBOLS_MAX ({}) symbols already", process::SYMBOLS_MAX) });
                continue;
            };
            if let Err(error) = state.entries[slot as usize].state.reserve(tick.seq) {
                rejected[j].push(Rejected { index: tick.index, error });
                continue;
            }
            if block.is_empty() {
                block.reserve(process::TICKS_PER_RECORD_MAX.min(64) * 48);
                block.extend_from_slice(process::BINARY_MAGIC);
                blocks.counts.push(0);
            }
            process::encode_tick(&mut block, symbol, tick.price, tick.size, tick.ts_ms, tick.seq);
            blocks.origin.push((j, t));
            blocks.slots.push(slot);
            blocks.accepted_at.push(job.accepted);
            let in_block = blocks.counts.last_mut().expect("a block is open");
            *in_block += 1;
            if *in_block == process::TICKS_PER_RECORD_MAX {
                blocks.records.push(Record::from_value(std::mem::take(&mut block)));
            }
        }
        if !block.is_empty() {
            blocks.records.push(Record::from_value(block));
        }
        blocks
    }

    /// Apply the first `went_in` records of `blocks`, appended from `blocks.expected` on,
    /// unless this node's follower applied them first. Returns their ticks.
    fn apply_appended(&self, partition: &Partition, blocks: &Blocks, went_in: usize, out: &mut Vec<(Arc<Subscriber>, Arc<MarketEvent>)>) -> usize {
        let mut state = partition.state.lock();
        let mut at = 0;
        for (offset, (record, &n)) in (blocks.expected..).zip(blocks.records.iter().zip(&blocks.counts)).take(went_in) {
            if offset >= state.applied_end {
                debug_assert_eq!(offset, state.applied_end, "appended at the applied end");
                let ticks = process::read_block(record.value.as_deref().expect("blocks have values")).expect("a block we just wrote reads back");
                self.apply_block(&mut state, &ticks, Some(&blocks.slots[at..at + n]), Some(&blocks.accepted_at[at..at + n]), out, true);
                state.applied_end = offset + 1;
            }
            at += n;
        }
        at
    }

    /// Wait until this node's follower applied the partition up to `end`: false after
    /// [`FANOUT_WAIT_MAX`] or at shutdown.
    fn wait_applied(&self, partition: &Partition, end: u64) -> bool {
        let deadline = Instant::now() + FANOUT_WAIT_MAX;
        let mut state = partition.state.lock();
        while state.applied_end < end {
            if self.stop.load(Ordering::Acquire) || Instant::now() >= deadline {
                return false;
            }
            partition.applied.wait_for(&mut state, Duration::from_millis(200));
        }
        true
    }

    /// Apply what the follower read of a shared log: the records other nodes appended, and
    /// this node's own when the follower got to them first (records below the applied end were
    /// applied already).
    fn follow(&self, p: usize, records: &[StoredRecord]) {
        let partition = &self.partitions[p];
        let (now, now_ms) = (Instant::now(), now_ms());
        let mut out = Vec::new();
        let mut state = partition.state.lock();
        for record in records {
            if record.offset < state.applied_end {
                continue;
            }
            state.applied_end = record.offset + 1;
            self.apply_record(partition, &mut state, record, Some(shared_log::accepted_at(record, now, now_ms)), &mut out);
        }
        drop(state);
        partition.applied.notify_all();
        self.deliver(out);
    }

    /// Apply a record read back from the log: live (fanned out, its ticks accepted at
    /// `accepted`) when a follower read it, not when the rebuild at start did. Returns its
    /// ticks; a record that is not a tick block is skipped with a warning.
    fn apply_record(&self, partition: &Partition, state: &mut PartitionState, record: &StoredRecord, accepted: Option<Instant>, out: &mut Vec<(Arc<Subscriber>, Arc<MarketEvent>)>) -> usize {
        let Some(ticks) = record.value.as_deref().and_then(process::read_block) else {
            tracing::warn!(partition = partition.index, offset = record.offset, "skipping a record of stock-ticks that is not a tick block");
            return 0;
        };
        let accepted = accepted.map(|at| vec![at; ticks.len()]);
        self.apply_block(state, &ticks, None, accepted.as_deref(), out, accepted.is_some());
        ticks.len()
    }

    /// Mark silent symbols stale and tell their subscribers.
    fn sweep_stale(&self) {
        let now = now_ms();
        let generation = self.generation.load(Ordering::Acquire);
        let mut out = Vec::new();
        for partition in &self.partitions {
            let mut state = partition.state.lock();
            for entry in state.entries.iter_mut() {
                if !entry.state.check_stale(now, self.config.stale_after_ms) {
                    continue;
                }
                let value = serde_json::json!({
                    "type": "stale",
                    "symbol": &*entry.state.symbol,
                    "silent_ms": now - entry.state.last_seen_ms,
                    "last_ts": entry.state.last.map(|l| l.ts),
                });
                let subscribers = self.matching(entry, generation);
                if !subscribers.is_empty() {
                    let e = event(EventKind::Status, "stale", &entry.state.symbol, None, || value.to_string());
                    out.extend(subscribers.iter().map(|s| (s.clone(), e.clone())));
                }
                self.record_event(value);
            }
        }
        self.deliver(out);
    }

    fn run_sweeper(&self) {
        let (lock, signal) = &self.stop_signal;
        loop {
            let mut stopped = lock.lock();
            if *stopped {
                return;
            }
            signal.wait_for(&mut stopped, Duration::from_millis(self.config.stale_check_ms));
            if *stopped {
                return;
            }
            drop(stopped);
            self.sweep_stale();
        }
    }

    /// Read the whole retained log once, in order per partition, to rebuild the state.
    fn recover(&self) -> Result<u64, StreamError> {
        let mut ticks = 0;
        for partition in &self.partitions {
            let (start, end) = self.log.offsets(TICKS_TOPIC, partition.index)?;
            let mut state = partition.state.lock();
            let mut offset = start;
            let mut ignored = Vec::new();
            while offset < end {
                let records = self.log.fetch(TICKS_TOPIC, partition.index, offset, RECOVER_CHUNK_RECORDS)?;
                let Some(last) = records.last() else { break };
                offset = last.offset + 1;
                for record in &records {
                    ticks += self.apply_record(partition, &mut state, record, None, &mut ignored) as u64;
                }
            }
            state.applied_end = end;
        }
        Ok(ticks)
    }
}

impl StockPriceUpdates {
    pub fn open(context: &Context, config: StockConfig) -> anyhow::Result<Arc<StockPriceUpdates>> {
        config.validate()?;
        let engine = context.engine.clone();
        let log = SharedLog::current(context.streams.clone());
        log.create_topic(TICKS_TOPIC, TopicConfig { partitions: config.partitions, retention_ms: config.retention_ms, ..TopicConfig::default() })?;
        let partitions = (0..config.partitions)
            .map(|index| Partition { index, jobs: Mutex::new(VecDeque::new()), wake: Condvar::new(), state: Mutex::new(PartitionState::default()), applied: Condvar::new() })
            .collect();
        let shared = Arc::new(Shared {
            config,
            log,
            partitions,
            trie: RwLock::new(SubjectTrie::new()),
            generation: AtomicU64::new(0),
            next_subscriber: AtomicU64::new(1),
            subscribers: AtomicUsize::new(0),
            symbols: AtomicUsize::new(0),
            market_events: Mutex::new(VecDeque::new()),
            next_event: AtomicU64::new(1),
            metrics: SystemMetrics::new(ID),
            ticks_total: AtomicU64::new(0),
            overtaken: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stop_signal: (Mutex::new(false), Condvar::new()),
            following: Arc::new(AtomicBool::new(false)),
        });
        let started = Instant::now();
        let recovered = shared.recover()?;
        if recovered > 0 {
            tracing::info!(ticks = recovered, elapsed_ms = started.elapsed().as_millis() as u64, "stock-price-updates rebuilt its state from the tick log");
        }
        if shared.log.shared() {
            // One follower per partition, from where the rebuild ended.
            for p in 0..shared.partitions.len() {
                let mut reader = Reader::new(&shared.log, TICKS_TOPIC, p as u32);
                let mut next = shared.partitions[p].state.lock().applied_end;
                let step = move |shared: &Shared| {
                    let records = reader.read(next, RECOVER_CHUNK_RECORDS)?;
                    if let Some(last) = records.last() {
                        next = last.offset + 1;
                        shared.follow(p, &records);
                    }
                    Ok::<(), StreamError>(())
                };
                shared_log::follow(&format!("stock-follow-p{p}"), Arc::downgrade(&shared), shared.following.clone(), step)?;
            }
        }
        let mut threads = Vec::new();
        for p in 0..shared.partitions.len() {
            let worker = shared.clone();
            threads.push(std::thread::Builder::new().name(format!("stock-p{p}")).spawn(move || worker.run_partition(p))?);
        }
        let sweeper = shared.clone();
        threads.push(std::thread::Builder::new().name("stock-stale".into()).spawn(move || sweeper.run_sweeper())?);
        Ok(Arc::new(StockPriceUpdates { engine, gateway: context.gateway.clone(), shared, threads: Mutex::new(threads) }))
    }

    pub fn config(&self) -> &StockConfig {
        &self.shared.config
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn metrics(&self) -> &SystemMetrics {
        &self.shared.metrics
    }

    /// Hand checked ticks to their partitions' workers and wait until every accepted one is
    /// durable and applied. Returns the ticks refused by a worker (duplicates, symbol table full).
    pub async fn ingest(&self, body: Bytes, ticks: Vec<Decoded>, accepted: Instant) -> Result<Vec<Rejected>, ApiError> {
        let count = self.shared.partitions.len() as u32;
        let mut by_partition: Vec<Vec<Decoded>> = (0..count).map(|_| Vec::new()).collect();
        for tick in ticks {
            by_partition[partition_for_key(tick.symbol(&body).as_bytes(), count) as usize].push(tick);
        }
        let mut replies = Vec::new();
        for (p, ticks) in by_partition.into_iter().enumerate() {
            if ticks.is_empty() {
                continue;
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return Err(ApiError::overloaded("stock-price-updates is shutting down", 5));
            }
            let (reply, answer) = oneshot::channel();
            let partition = &self.shared.partitions[p];
            partition.jobs.lock().push_back(Job { body: body.clone(), ticks, accepted, reply });
            partition.wake.notify_one();
            replies.push(answer);
        }
        let mut rejected = Vec::new();
        let mut failure = None;
        for answer in replies {
            match answer.await {
                Ok(Ok(mut r)) => rejected.append(&mut r),
                Ok(Err(error)) => failure = Some(error),
                Err(_) => failure = Some(ApiError::overloaded("stock-price-updates stopped before the ticks were appended", 5)),
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(rejected),
        }
    }

    /// Subscribe a connection. Returns the subscriber and, per partition, the offset from which
    /// its live events start (a replay reads up to there).
    pub fn subscribe(&self, spec: SubscriptionSpec) -> (Arc<Subscriber>, Vec<u64>) {
        let shared = &self.shared;
        let id = shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<SubscriptionId> = (0..spec.patterns.len()).map(|i| SubscriptionId((id << 16) | i as u64)).collect();
        let subscriber = Arc::new(Subscriber { id, spec, ids, buffer: Mutex::new(Buffer::default()), ready: Notify::new() });
        // Every partition is held still while the subscription goes in: each one's applied end
        // is then exactly where its live events begin.
        let states: Vec<MutexGuard<PartitionState>> = shared.partitions.iter().map(|p| p.state.lock()).collect();
        {
            let mut trie = shared.trie.write();
            for (pattern, &sid) in subscriber.spec.patterns.iter().zip(&subscriber.ids) {
                trie.insert(pattern, sid, subscriber.clone());
            }
        }
        shared.generation.fetch_add(1, Ordering::AcqRel);
        let starts = states.iter().map(|s| s.applied_end).collect();
        drop(states);
        shared.subscribers.fetch_add(1, Ordering::Relaxed);
        (subscriber, starts)
    }

    pub fn unsubscribe(&self, subscriber: &Subscriber) {
        let shared = &self.shared;
        {
            let mut trie = shared.trie.write();
            for (pattern, &sid) in subscriber.spec.patterns.iter().zip(&subscriber.ids) {
                trie.remove(pattern, sid);
            }
        }
        shared.generation.fetch_add(1, Ordering::AcqRel);
        subscriber.close(CloseReason::ShuttingDown);
        shared.subscribers.fetch_sub(1, Ordering::Relaxed);
    }

    /// The state of one symbol, if it ever ticked.
    pub fn symbol<R>(&self, symbol: &str, f: impl FnOnce(&SymbolState) -> R) -> Option<R> {
        let count = self.shared.partitions.len() as u32;
        let partition = &self.shared.partitions[partition_for_key(symbol.as_bytes(), count) as usize];
        let state = partition.state.lock();
        let slot = *state.slots.get(symbol)?;
        Some(f(&state.entries[slot as usize].state))
    }

    /// Last ticks of every symbol matching one of `patterns` (all when empty), in symbol order,
    /// at most `limit`.
    pub fn last_prices(&self, patterns: &[SubjectPattern], limit: usize) -> Vec<(Arc<str>, LastTick, bool)> {
        let mut out = Vec::new();
        for partition in &self.shared.partitions {
            let state = partition.state.lock();
            for entry in &state.entries {
                if !patterns.is_empty() && !patterns.iter().any(|p| p.matches(&entry.subject)) {
                    continue;
                }
                if let Some(last) = entry.state.last {
                    out.push((entry.state.symbol.clone(), last, entry.state.stale));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.truncate(limit);
        out
    }

    /// Recorded gap, stale and resumed events after `after`, oldest first.
    pub fn market_events(&self, after: u64, kind: Option<&str>, symbol: Option<&str>, limit: usize) -> Vec<RecordedEvent> {
        self.shared
            .market_events
            .lock()
            .iter()
            .filter(|e| e.id > after)
            .filter(|e| kind.is_none_or(|k| e.event["type"] == k))
            .filter(|e| symbol.is_none_or(|s| e.event["symbol"] == s))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Start a replay of the log: ticks accepted at or after `from_ms` (and at or before
    /// `to_ms`), up to `ends` per partition (or the durable end), matching `patterns`.
    pub fn replay(&self, from_ms: i64, to_ms: Option<i64>, patterns: Vec<SubjectPattern>, ends: Option<Vec<u64>>) -> Result<Replay, StreamError> {
        let log = self.shared.log.clone();
        let count = self.shared.partitions.len() as u32;
        let mut positions = Vec::with_capacity(count as usize);
        let mut limits = Vec::with_capacity(count as usize);
        for p in 0..count {
            positions.push((log.seek_timestamp(TICKS_TOPIC, p, from_ms)?, 0));
            limits.push(match &ends {
                Some(ends) => ends[p as usize],
                None => log.offsets(TICKS_TOPIC, p)?.1,
            });
        }
        Ok(Replay { log, to_ms, matcher: Matcher::new(patterns), positions, ends: limits, held: (0..count).map(|_| VecDeque::new()).collect() })
    }

    /// Continue a replay from a cursor of [`Replay::cursor`].
    pub fn replay_from_cursor(&self, cursor: &str, to_ms: Option<i64>, patterns: Vec<SubjectPattern>) -> Result<Replay, String> {
        let log = self.shared.log.clone();
        let count = self.shared.partitions.len();
        let parts: Vec<&str> = cursor.split('-').collect();
        if parts.len() != count {
            return Err(format!("cursor {cursor:?} is not one of this log's ({count} partitions)"));
        }
        let mut positions = Vec::with_capacity(count);
        for part in parts {
            let (offset, skip) = part.split_once('.').ok_or_else(|| format!("cursor {cursor:?} is malformed"))?;
            let offset = offset.parse::<u64>().map_err(|_| format!("cursor {cursor:?} is malformed"))?;
            let skip = skip.parse::<u32>().map_err(|_| format!("cursor {cursor:?} is malformed"))?;
            positions.push((offset, skip));
        }
        let mut ends = Vec::with_capacity(count);
        for p in 0..count as u32 {
            ends.push(log.offsets(TICKS_TOPIC, p).map_err(|e| e.to_string())?.1);
        }
        Ok(Replay { log, to_ms, matcher: Matcher::new(patterns), positions, ends, held: (0..count).map(|_| VecDeque::new()).collect() })
    }

    pub fn subscribers(&self) -> usize {
        self.shared.subscribers.load(Ordering::Relaxed)
    }

    pub fn symbols_count(&self) -> usize {
        self.shared.symbols.load(Ordering::Relaxed)
    }

    fn stop(&self) {
        let shared = &self.shared;
        if shared.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        for p in &shared.partitions {
            let _queue = p.jobs.lock();
            p.wake.notify_all();
        }
        *shared.stop_signal.0.lock() = true;
        shared.stop_signal.1.notify_all();
        shared.following.store(true, Ordering::Release);
        for handle in self.threads.lock().drain(..) {
            let _ = handle.join();
        }
        // Requests still queued get an error rather than hanging.
        for p in &shared.partitions {
            for job in p.jobs.lock().drain(..) {
                let _ = job.reply.send(Err(ApiError::overloaded("stock-price-updates stopped before the ticks were appended", 5)));
            }
        }
    }
}

impl Drop for StockPriceUpdates {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Which symbols a replay or a listing wants, with the answer cached per symbol.
pub struct Matcher {
    patterns: Vec<SubjectPattern>,
    known: hashbrown::HashMap<Box<str>, bool>,
}

impl Matcher {
    pub fn new(patterns: Vec<SubjectPattern>) -> Matcher {
        Matcher { patterns, known: hashbrown::HashMap::new() }
    }

    pub fn matches(&mut self, symbol: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        if let Some(&known) = self.known.get(symbol) {
            return known;
        }
        let matched = Subject::parse(symbol).is_ok_and(|s| self.patterns.iter().any(|p| p.matches(&s)));
        if self.known.len() < process::SYMBOLS_MAX {
            self.known.insert(symbol.into(), matched);
        }
        matched
    }
}

/// A tick read back from the log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReplayedTick {
    pub symbol: String,
    pub price: f64,
    pub size: f64,
    pub ts: i64,
    #[serde(skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// When the block holding it was accepted (the log's time).
    pub accepted_ms: i64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A replay in progress: a position per partition (next record, ticks of it already emitted),
/// records held per partition, merged by the log's time (ties: lower partition first).
pub struct Replay {
    log: SharedLog,
    to_ms: Option<i64>,
    matcher: Matcher,
    positions: Vec<(u64, u32)>,
    ends: Vec<u64>,
    held: Vec<VecDeque<StoredRecord>>,
}

impl Replay {
    /// Where the replay stands, to continue it later (`offset.skip` per partition).
    pub fn cursor(&self) -> String {
        self.positions.iter().map(|(o, s)| format!("{o}.{s}")).collect::<Vec<_>>().join("-")
    }

    /// True once every partition is read to its end (or past `to_ms`).
    pub fn done(&self) -> bool {
        self.positions.iter().zip(&self.ends).enumerate().all(|(p, ((offset, _), end))| *offset >= *end && self.held[p].is_empty())
    }

    /// The next ticks, at most `max` (fewer only at the end).
    pub fn next(&mut self, max: usize) -> Result<Vec<ReplayedTick>, StreamError> {
        let mut out = Vec::new();
        while out.len() < max {
            // Fill empty holdings.
            for p in 0..self.held.len() {
                let (offset, _) = self.positions[p];
                if self.held[p].is_empty() && offset < self.ends[p] {
                    let (start, _) = self.log.offsets(TICKS_TOPIC, p as u32)?;
                    let from = offset.max(start);
                    let records = self.log.fetch(TICKS_TOPIC, p as u32, from, REPLAY_CHUNK_RECORDS)?;
                    let end = self.ends[p];
                    let before = self.held[p].len();
                    self.held[p].extend(records.into_iter().filter(|r| r.offset >= from && r.offset < end));
                    if self.held[p].len() == before {
                        // Nothing more below the end (retention removed it, or it never came).
                        self.positions[p] = (end, 0);
                    } else if from > offset {
                        self.positions[p] = (from, 0);
                    }
                }
            }
            // The partition whose next record is oldest.
            let Some(p) = (0..self.held.len()).filter(|&p| !self.held[p].is_empty()).min_by_key(|&p| (self.held[p][0].timestamp_ms, p)) else {
                break;
            };
            let record = &self.held[p][0];
            if self.to_ms.is_some_and(|to| record.timestamp_ms > to) {
                // Time only grows along a partition: nothing after this is wanted.
                self.held[p].clear();
                self.positions[p] = (self.ends[p], 0);
                continue;
            }
            let accepted_ms = record.timestamp_ms;
            let offset = record.offset;
            let skip = if self.positions[p].0 == offset { self.positions[p].1 as usize } else { 0 };
            let ticks = record.value.as_deref().and_then(process::read_block).unwrap_or_default();
            let mut taken = skip;
            for tick in &ticks[skip.min(ticks.len())..] {
                if out.len() >= max {
                    break;
                }
                taken += 1;
                if self.matcher.matches(tick.symbol) {
                    out.push(ReplayedTick { symbol: tick.symbol.to_string(), price: tick.price, size: tick.size, ts: tick.ts_ms, seq: tick.seq, accepted_ms });
                }
            }
            if taken >= ticks.len() {
                self.held[p].pop_front();
                self.positions[p] = (offset + 1, 0);
            } else {
                self.positions[p] = (offset, taken as u32);
            }
        }
        Ok(out)
    }
}

impl System for StockPriceUpdates {
    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        api::router(self)
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.shared.metrics
    }

    fn status(&self) -> serde_json::Value {
        let stale: usize = self.shared.partitions.iter().map(|p| p.state.lock().entries.iter().filter(|e| e.state.stale).count()).sum();
        serde_json::json!({
            "symbols": self.symbols_count(),
            "stale_symbols": stale,
            "subscribers": self.subscribers(),
            "ticks_total": self.shared.ticks_total.load(Ordering::Relaxed),
            "partitions": self.shared.partitions.len(),
            "appends_overtaken": self.shared.overtaken.load(Ordering::Relaxed),
        })
    }

    fn shutdown(&self) {
        self.stop();
    }
}
