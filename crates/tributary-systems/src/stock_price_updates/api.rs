//! The HTTP, WebSocket and SSE routes of stock-price-updates, and the pump that feeds one
//! connection.
//!
//! ```text
//! POST /v1/stocks/ticks                       NDJSON lines {"symbol","price","size"?,"ts"?,"seq"?}, or
//!                                             content-type application/octet-stream: the binary layout
//!                                             → 201 {"accepted":n,"rejected":[{"index","error"}]} once durable
//! GET  /v1/stocks/last?symbols=AAPL,NAS.*     last price of every matching symbol ("LATEST ON")
//! GET  /v1/stocks/symbols/{symbol}            last tick, sequence, gaps, stale, day VWAP, open bars, indicators
//! GET  /v1/stocks/symbols/{symbol}/bars?interval=1m&limit=N   closed bars with SMA/EMA/RSI, and the open one
//! GET  /v1/stocks/market-events?type=gap|stale|resumed&symbol=&after=&limit=
//! GET  /v1/stocks/replay?from_ms=T&to_ms=&symbols=&limit=&cursor=   ticks from the log, in the log's time order
//! GET  /v1/stocks/ws       WebSocket  ?symbols=AAPL,NAS.*&ticks=true&bars=1m&conflate=false&buffer=N&from_ms=T&credit=N
//! GET  /v1/stocks/stream   SSE, the same query
//! ```
//!
//! Binary layout (little-endian): the 4 bytes `TKB1`, then per tick `u8` symbol length, the
//! symbol (ASCII), `f64` price, `f64` size, `i64` ts (ms since the epoch, 0 = now), `u64` seq
//! (0 = none). 33 bytes plus the symbol.
//!
//! Streams start with a `subscribed` control message, then (with `from_ms`) the replayed ticks
//! and a `live` control message, then live events. Events are `{"type":"tick"|"bar"|"gap"|
//! "stale"|"resumed","symbol",…}`. A WebSocket frame carries a JSON array of events (up to
//! `FRAME_EVENTS_MAX`; with `credit`, one credit per frame); SSE sends one event each, named by
//! its type. A stream the system ends gets a `closed` control message with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tributary_core::SubjectPattern;
use tributary_server::gateway::CREDIT_MAX;
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, SystemApi, WsConnection, blocking};

use super::process::{self, ClosedBar, Interval, Invalid, LastTick, Rejected, TickOut};
use super::{CloseReason, ID, MarketEvent, RecordedEvent, ReplayedTick, StockPriceUpdates, Subscriber, SubscriptionSpec};

/// Events in one WebSocket frame at most.
pub const FRAME_EVENTS_MAX: usize = 1_000;
/// Ticks in one replay page at most.
pub const REPLAY_LIMIT_MAX: usize = 100_000;
/// Rows in one listing at most.
pub const LIST_LIMIT_MAX: usize = 10_000;
/// Events queued towards one SSE client before the pump waits.
pub const SSE_EVENTS_MAX: usize = 4_096;
/// A connection with nothing to send re-checks its peer this often.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

type Shared = Arc<StockPriceUpdates>;

pub fn router(system: Shared) -> SystemApi {
    let router = OpenApiRouter::new()
        .routes(routes!(ingest))
        .routes(routes!(last_prices))
        .routes(routes!(symbol_view))
        .routes(routes!(bars))
        .routes(routes!(market_events))
        .routes(routes!(replay))
        .routes(routes!(ws))
        .routes(routes!(stream))
        .with_state(system);
    SystemApi { id: ID, prefixes: vec!["/v1/stocks"], router }
}

impl From<Invalid> for ApiError {
    fn from(error: Invalid) -> ApiError {
        match error {
            Invalid::Bad(message) => ApiError::bad_request(message),
            Invalid::TooLarge(message) => ApiError::too_large(message),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct IngestResponse {
    /// Ticks now durable in the log.
    pub accepted: usize,
    /// Ticks refused, each with its line (or record) number and why; the others were accepted.
    pub rejected: Vec<Rejected>,
}

/// Ingest a batch of ticks: NDJSON (default) or binary (`application/octet-stream`). Answered
/// once every accepted tick is durable; bad ticks are listed and do not hold up the others.
#[utoipa::path(post, path = "/v1/stocks/ticks", request_body(content = String, description = "NDJSON ticks, or the binary layout"),
    responses((status = 201, body = IngestResponse), (status = 400, description = "no tick was acceptable"), (status = 413, description = "over TICKS_PER_REQUEST_MAX"), (status = 415, description = "neither NDJSON nor binary")))]
async fn ingest(State(system): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<(StatusCode, axum::Json<IngestResponse>), ApiError> {
    let accepted_at = Instant::now();
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/x-ndjson");
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let binary = match essence.as_str() {
        "application/octet-stream" => true,
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/json" | "text/plain" | "" => false,
        other => {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", format!("content-type {other:?}: send application/x-ndjson or application/octet-stream")));
        }
    };
    let decode_body = body.clone();
    let decoded = blocking(move || {
        let now = tributary_core::now_ms();
        if binary { process::decode_binary(&decode_body, now) } else { process::decode_ndjson(&decode_body, now) }
    })
    .await?;
    let mut rejected = decoded.rejected;
    if decoded.ticks.is_empty() {
        if rejected.is_empty() {
            return Err(ApiError::bad_request("the body holds no ticks"));
        }
        return Err(ApiError::bad_request(refused_message(&rejected)));
    }
    let offered = decoded.ticks.len();
    let mut refused = system.ingest(body, decoded.ticks, accepted_at).await?;
    let accepted = offered - refused.len();
    rejected.append(&mut refused);
    rejected.sort_by_key(|r| r.index);
    if accepted == 0 {
        return Err(ApiError::bad_request(refused_message(&rejected)));
    }
    Ok((StatusCode::CREATED, axum::Json(IngestResponse { accepted, rejected })))
}

fn refused_message(rejected: &[Rejected]) -> String {
    let shown: Vec<String> = rejected.iter().take(5).map(|r| format!("tick {}: {}", r.index, r.error)).collect();
    let more = if rejected.len() > 5 { format!(" (and {} more)", rejected.len() - 5) } else { String::new() };
    format!("no tick was accepted: {}{more}", shown.join("; "))
}

/// Parse `AAPL,NAS.*,NAS.>` into patterns.
pub fn parse_symbols(text: Option<&str>) -> Result<Vec<SubjectPattern>, ApiError> {
    let texts: Vec<&str> = text.unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
    if texts.len() > super::SUBSCRIPTION_PATTERNS_MAX {
        return Err(ApiError::bad_request(format!("{} symbols and patterns: at most SUBSCRIPTION_PATTERNS_MAX ({})", texts.len(), super::SUBSCRIPTION_PATTERNS_MAX)));
    }
    texts.into_iter().map(|t| SubjectPattern::parse(t).map_err(|e| ApiError::bad_request(e.to_string()))).collect()
}

fn number<T: std::str::FromStr>(field: &str, text: Option<&str>) -> Result<Option<T>, ApiError> {
    text.map(|t| t.parse::<T>().map_err(|_| ApiError::bad_request(format!("{field} must be a number, got {t:?}")))).transpose()
}

fn flag(field: &str, text: Option<&str>, default: bool) -> Result<bool, ApiError> {
    match text {
        None => Ok(default),
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!("{field} must be true or false, got {other:?}"))),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LastQuery {
    /// Comma-separated symbols and patterns (`AAPL,NAS.*`); all symbols when absent.
    pub symbols: Option<String>,
    pub limit: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LastPrice {
    pub symbol: String,
    #[serde(flatten)]
    pub last: LastTick,
    pub stale: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LastPrices {
    pub prices: Vec<LastPrice>,
}

/// The last price of every symbol matching `symbols`, in symbol order.
#[utoipa::path(get, path = "/v1/stocks/last", params(LastQuery), responses((status = 200, body = LastPrices), (status = 400, description = "bad pattern")))]
async fn last_prices(State(system): State<Shared>, Query(query): Query<LastQuery>) -> Result<axum::Json<LastPrices>, ApiError> {
    let patterns = parse_symbols(query.symbols.as_deref())?;
    let limit = number::<usize>("limit", query.limit.as_deref())?.unwrap_or(1_000).clamp(1, LIST_LIMIT_MAX);
    let prices = system.last_prices(&patterns, limit).into_iter().map(|(symbol, last, stale)| LastPrice { symbol: symbol.to_string(), last, stale }).collect();
    Ok(axum::Json(LastPrices { prices }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SeriesView {
    pub interval: String,
    /// The bar in progress, with the indicators as they would be if it closed now.
    pub open: Option<ClosedBar>,
    /// The last closed bar.
    pub last_closed: Option<ClosedBar>,
    /// Ticks that arrived after their bar had closed.
    pub late_ticks: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SymbolView {
    pub symbol: String,
    pub last: Option<LastTick>,
    /// The highest source sequence applied (0: the source sends none).
    pub seq: u64,
    pub ticks: u64,
    pub gaps: u64,
    /// Sequence numbers skipped over all gaps.
    pub missing: u64,
    pub stale: bool,
    /// VWAP of the current UTC day, by the ticks' own time.
    pub day_vwap: Option<f64>,
    pub series: Vec<SeriesView>,
}

fn not_found(symbol: &str) -> ApiError {
    ApiError::not_found(format!("no tick of symbol {symbol:?} has been accepted"))
}

/// One symbol: last tick, sequence, gaps, whether it is stale, its day VWAP and its bars.
#[utoipa::path(get, path = "/v1/stocks/symbols/{symbol}", params(("symbol" = String, Path)), responses((status = 200, body = SymbolView), (status = 404, description = "never ticked")))]
async fn symbol_view(State(system): State<Shared>, Path(symbol): Path<String>) -> Result<axum::Json<SymbolView>, ApiError> {
    let view = system.symbol(&symbol, |s| SymbolView {
        symbol: s.symbol.to_string(),
        last: s.last,
        seq: s.seq,
        ticks: s.ticks,
        gaps: s.gaps,
        missing: s.missing,
        stale: s.stale,
        day_vwap: s.day_vwap(),
        series: s.series.iter().map(|series| SeriesView { interval: series.interval.name(), open: series.provisional(), last_closed: series.closed.back().copied(), late_ticks: series.late }).collect(),
    });
    view.map(axum::Json).ok_or_else(|| not_found(&symbol))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct BarsQuery {
    /// One of the configured intervals (default: the first).
    pub interval: Option<String>,
    /// The last N closed bars (default 60).
    pub limit: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BarsView {
    pub symbol: String,
    pub interval: String,
    /// Closed bars, oldest first, each with SMA, EMA and RSI over the closes up to it.
    pub bars: Vec<ClosedBar>,
    pub open: Option<ClosedBar>,
}

/// Closed OHLC bars of a symbol at one interval, with their indicators, and the open bar.
#[utoipa::path(get, path = "/v1/stocks/symbols/{symbol}/bars", params(("symbol" = String, Path), BarsQuery),
    responses((status = 200, body = BarsView), (status = 400, description = "interval not computed"), (status = 404, description = "never ticked")))]
async fn bars(State(system): State<Shared>, Path(symbol): Path<String>, Query(query): Query<BarsQuery>) -> Result<axum::Json<BarsView>, ApiError> {
    let intervals = &system.config().intervals;
    let index = match query.interval.as_deref() {
        None => 0,
        Some(text) => {
            let interval = Interval::parse(text).map_err(ApiError::bad_request)?;
            let names: Vec<String> = intervals.iter().map(Interval::name).collect();
            intervals.iter().position(|i| *i == interval).ok_or_else(|| ApiError::bad_request(format!("interval {text:?} is not computed; these are: {}", names.join(", "))))?
        }
    };
    if intervals.is_empty() {
        return Err(ApiError::bad_request("no bar interval is configured"));
    }
    let limit = number::<usize>("limit", query.limit.as_deref())?.unwrap_or(60).clamp(1, LIST_LIMIT_MAX);
    let view = system.symbol(&symbol, |s| {
        let series = &s.series[index];
        let skip = series.closed.len().saturating_sub(limit);
        BarsView { symbol: s.symbol.to_string(), interval: series.interval.name(), bars: series.closed.iter().skip(skip).copied().collect(), open: series.provisional() }
    });
    view.map(axum::Json).ok_or_else(|| not_found(&symbol))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// `gap`, `stale` or `resumed`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub symbol: Option<String>,
    /// Only events with a larger id (to poll for new ones).
    pub after: Option<String>,
    pub limit: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EventsView {
    pub events: Vec<RecordedEvent>,
}

/// Recent gap, stale and resumed events (the last MARKET_EVENTS_KEPT), oldest first.
#[utoipa::path(get, path = "/v1/stocks/market-events", params(EventsQuery), responses((status = 200, body = EventsView), (status = 400, description = "bad type")))]
async fn market_events(State(system): State<Shared>, Query(query): Query<EventsQuery>) -> Result<axum::Json<EventsView>, ApiError> {
    if let Some(kind) = query.kind.as_deref()
        && !matches!(kind, "gap" | "stale" | "resumed")
    {
        return Err(ApiError::bad_request(format!("type must be gap, stale or resumed, got {kind:?}")));
    }
    let after = number::<u64>("after", query.after.as_deref())?.unwrap_or(0);
    let limit = number::<usize>("limit", query.limit.as_deref())?.unwrap_or(1_000).clamp(1, LIST_LIMIT_MAX);
    Ok(axum::Json(EventsView { events: system.market_events(after, query.kind.as_deref(), query.symbol.as_deref(), limit) }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ReplayQuery {
    /// Ticks accepted at or after this time (ms since the epoch).
    pub from_ms: Option<String>,
    /// … and at or before this one.
    pub to_ms: Option<String>,
    pub symbols: Option<String>,
    /// Ticks in this page (default 10,000).
    pub limit: Option<String>,
    /// The `next` of the previous page: continue exactly after it.
    pub cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReplayPage {
    pub ticks: Vec<ReplayedTick>,
    /// Pass as `cursor` for the next page; absent when the log (or `to_ms`) is reached.
    pub next: Option<String>,
}

/// Ticks from the log in the order they were accepted (partitions merged by the log's time).
#[utoipa::path(get, path = "/v1/stocks/replay", params(ReplayQuery), responses((status = 200, body = ReplayPage), (status = 400, description = "bad time, pattern or cursor")))]
async fn replay(State(system): State<Shared>, Query(query): Query<ReplayQuery>) -> Result<axum::Json<ReplayPage>, ApiError> {
    let patterns = parse_symbols(query.symbols.as_deref())?;
    let from_ms = number::<i64>("from_ms", query.from_ms.as_deref())?;
    let to_ms = number::<i64>("to_ms", query.to_ms.as_deref())?;
    let limit = number::<usize>("limit", query.limit.as_deref())?.unwrap_or(10_000).clamp(1, REPLAY_LIMIT_MAX);
    let cursor = query.cursor;
    if from_ms.is_none() && cursor.is_none() {
        return Err(ApiError::bad_request("name from_ms (ms since the epoch) or a cursor"));
    }
    let page = blocking(move || -> Result<ReplayPage, ApiError> {
        let mut replay = match cursor {
            Some(cursor) => system.replay_from_cursor(&cursor, to_ms, patterns).map_err(ApiError::bad_request)?,
            None => system.replay(from_ms.unwrap_or(0), to_ms, patterns, None)?,
        };
        let ticks = replay.next(limit)?;
        let next = (!replay.done()).then(|| replay.cursor());
        Ok(ReplayPage { ticks, next })
    })
    .await?;
    Ok(axum::Json(page))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct StreamQuery {
    /// Comma-separated symbols and patterns (`AAPL,NAS.*,LSE.>`); required.
    pub symbols: Option<String>,
    /// Send ticks (default true).
    pub ticks: Option<String>,
    /// Comma-separated bar intervals to send bar-close events of (`1s,1m`).
    pub bars: Option<String>,
    /// Keep only the newest unsent tick per symbol when behind (default false: a connection
    /// `buffer` events behind is closed as a slow consumer).
    pub conflate: Option<String>,
    pub buffer: Option<String>,
    /// Replay ticks accepted since this time first, then go live.
    pub from_ms: Option<String>,
    /// WebSocket only: credit flow control, this many frames granted up front.
    pub credit: Option<String>,
}

fn spec(system: &StockPriceUpdates, query: &StreamQuery) -> Result<SubscriptionSpec, ApiError> {
    let patterns = parse_symbols(query.symbols.as_deref())?;
    if patterns.is_empty() {
        return Err(ApiError::bad_request("name the symbols or patterns to receive: ?symbols=AAPL,NAS.*"));
    }
    let mut bars = 0u32;
    for text in query.bars.as_deref().unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let interval = Interval::parse(text).map_err(ApiError::bad_request)?;
        let index = system.config().intervals.iter().position(|i| *i == interval).ok_or_else(|| ApiError::bad_request(format!("bars of {text:?} are not computed")))?;
        bars |= 1 << index;
    }
    let buffer = number::<usize>("buffer", query.buffer.as_deref())?.unwrap_or(super::SUBSCRIBER_BUFFER_DEFAULT);
    if buffer == 0 || buffer > super::SUBSCRIBER_BUFFER_MAX {
        return Err(ApiError::bad_request(format!("buffer must be 1 to SUBSCRIBER_BUFFER_MAX ({})", super::SUBSCRIBER_BUFFER_MAX)));
    }
    Ok(SubscriptionSpec { patterns, ticks: flag("ticks", query.ticks.as_deref(), true)?, bars, conflate: flag("conflate", query.conflate.as_deref(), false)?, buffer })
}

/// Live market data over a WebSocket: frames are JSON arrays of events.
#[utoipa::path(get, path = "/v1/stocks/ws", params(StreamQuery), responses((status = 101, description = "WebSocket"), (status = 400, description = "bad symbols, interval or buffer")))]
async fn ws(State(system): State<Shared>, Query(query): Query<StreamQuery>, upgrade: WebSocketUpgrade) -> Result<Response, ApiError> {
    let spec = spec(&system, &query)?;
    let from_ms = number::<i64>("from_ms", query.from_ms.as_deref())?;
    let credit = match number::<usize>("credit", query.credit.as_deref())? {
        Some(n) if n > CREDIT_MAX => return Err(ApiError::bad_request(format!("credit {n} is over CREDIT_MAX ({CREDIT_MAX})"))),
        other => other,
    };
    let gateway = system.gateway().clone();
    Ok(gateway.websocket(ID, upgrade, credit, move |mut connection| async move {
        pump(system, spec, from_ms, Sink::Ws(&mut connection)).await;
    }))
}

/// Live market data as Server-Sent Events, one event per market event, named by its type.
#[utoipa::path(get, path = "/v1/stocks/stream", params(StreamQuery), responses((status = 200, description = "text/event-stream"), (status = 400, description = "bad symbols, interval or buffer")))]
async fn stream(State(system): State<Shared>, Query(query): Query<StreamQuery>) -> Result<Response, ApiError> {
    let spec = spec(&system, &query)?;
    let from_ms = number::<i64>("from_ms", query.from_ms.as_deref())?;
    let (tx, rx) = mpsc::channel(SSE_EVENTS_MAX);
    let gateway = system.gateway().clone();
    tokio::spawn(pump(system, spec, from_ms, Sink::Sse(tx)));
    Ok(gateway.sse(ID, tokio_stream::wrappers::ReceiverStream::new(rx)).into_response())
}

enum Sink<'a> {
    Ws(&'a mut WsConnection),
    Sse(mpsc::Sender<Event>),
}

struct Gone;

impl Sink<'_> {
    async fn control(&self, kind: &str, value: serde_json::Value) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => connection.send(&serde_json::json!({ kind: value })).await.map_err(|_| Gone),
            Sink::Sse(tx) => tx.send(Event::default().event(kind).data(value.to_string())).await.map_err(|_| Gone),
        }
    }

    /// Send events: one array frame per `FRAME_EVENTS_MAX` on a WebSocket, one event each on SSE.
    async fn events<'e>(&self, events: impl ExactSizeIterator<Item = (&'static str, &'e str)>) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => {
                let mut frame = String::with_capacity(events.len() * 96 + 2);
                let mut n = 0;
                frame.push('[');
                for (_, json) in events {
                    if n > 0 {
                        frame.push(',');
                    }
                    frame.push_str(json);
                    n += 1;
                    if n == FRAME_EVENTS_MAX {
                        frame.push(']');
                        connection.send_data_text(std::mem::replace(&mut frame, String::from("["))).await.map_err(|_| Gone)?;
                        n = 0;
                    }
                }
                if n > 0 {
                    frame.push(']');
                    connection.send_data_text(frame).await.map_err(|_| Gone)?;
                }
                Ok(())
            }
            Sink::Sse(tx) => {
                for (name, json) in events {
                    tx.send(Event::default().event(name).data(json)).await.map_err(|_| Gone)?;
                }
                Ok(())
            }
        }
    }

    /// Wait until the subscriber has something, the idle check is due, or the peer left.
    async fn wait(&mut self, subscriber: &Subscriber) -> Result<(), Gone> {
        match self {
            Sink::Ws(connection) => tokio::select! {
                _ = subscriber.ready.notified() => Ok(()),
                _ = tokio::time::sleep(IDLE_CHECK) => Ok(()),
                frame = connection.recv() => match frame {
                    None => Err(Gone),
                    Some(_) => {
                        let reply = serde_json::json!({"code": "bad_request", "message": "this stream takes only {\"credit\": n} frames"});
                        connection.send(&serde_json::json!({"error": reply})).await.map_err(|_| Gone)
                    }
                },
            },
            Sink::Sse(tx) => tokio::select! {
                _ = subscriber.ready.notified() => Ok(()),
                _ = tokio::time::sleep(IDLE_CHECK) => Ok(()),
                _ = tx.closed() => Err(Gone),
            },
        }
    }
}

/// Unsubscribes however the pump ends.
struct Subscribed {
    system: Shared,
    subscriber: Arc<Subscriber>,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.system.unsubscribe(&self.subscriber);
    }
}

/// Feed one connection: subscribe, replay from the log when asked, then live.
async fn pump(system: Shared, spec: SubscriptionSpec, from_ms: Option<i64>, mut sink: Sink<'_>) {
    let symbols: Vec<String> = spec.patterns.iter().map(|p| p.as_str().to_string()).collect();
    let hello = serde_json::json!({"symbols": symbols, "ticks": spec.ticks, "conflate": spec.conflate, "buffer": spec.buffer, "from_ms": from_ms});
    let (subscriber, starts) = system.subscribe(spec);
    let _subscribed = Subscribed { system: system.clone(), subscriber: subscriber.clone() };
    if sink.control("subscribed", hello).await.is_err() {
        return;
    }
    if let Some(from_ms) = from_ms {
        match replay_into(&system, &subscriber, from_ms, starts, &sink).await {
            Ok(replayed) => {
                if sink.control("live", serde_json::json!({"replayed": replayed})).await.is_err() {
                    return;
                }
            }
            Err(Some(message)) => {
                let _ = sink.control("closed", serde_json::json!({"reason": "log_unreadable", "message": message})).await;
                return;
            }
            Err(None) => return,
        }
    }
    let mut events: Vec<Arc<MarketEvent>> = Vec::new();
    loop {
        events.clear();
        if let Err(reason) = subscriber.drain(&mut events) {
            if reason != CloseReason::ShuttingDown || !events.is_empty() {
                let _ = sink.control("closed", serde_json::json!({"reason": reason.as_str()})).await;
            }
            return;
        }
        if events.is_empty() {
            if sink.wait(&subscriber).await.is_err() {
                return;
            }
            continue;
        }
        let oldest = events.iter().filter_map(|e| e.accepted).min();
        if sink.events(events.iter().map(|e| (e.name, e.json.as_str()))).await.is_err() {
            return;
        }
        system.metrics().messages_out(events.len() as u64);
        if let Some(accepted) = oldest {
            system.metrics().latency(accepted.elapsed());
        }
    }
}

/// Send the matching ticks accepted since `from_ms` up to where the live subscription starts.
/// `Err(None)`: the peer left; `Err(Some)`: the log could not be read.
async fn replay_into(system: &Shared, subscriber: &Arc<Subscriber>, from_ms: i64, starts: Vec<u64>, sink: &Sink<'_>) -> Result<u64, Option<String>> {
    if !subscriber.spec.ticks {
        return Ok(0);
    }
    let reader = system.clone();
    let patterns = subscriber.spec.patterns.clone();
    let mut replay = blocking(move || reader.replay(from_ms, None, patterns, Some(starts))).await.map_err(|e| Some(e.message))?;
    let mut sent = 0;
    loop {
        let (back, ticks) = blocking(move || replay.next(FRAME_EVENTS_MAX).map(|ticks| (replay, ticks))).await.map_err(|e| Some(e.message))?;
        replay = back;
        if ticks.is_empty() {
            return Ok(sent);
        }
        let json: Vec<String> = ticks
            .iter()
            .map(|t| serde_json::to_string(&TickOut { kind: "tick", symbol: &t.symbol, price: t.price, size: t.size, ts: t.ts, seq: t.seq }).expect("ticks serialize"))
            .collect();
        sink.events(json.iter().map(|j| ("tick", j.as_str()))).await.map_err(|_| None)?;
        sent += ticks.len() as u64;
        system.metrics().messages_out(ticks.len() as u64);
    }
}
