//! Feature tests of stock-price-updates through its real HTTP, WebSocket and SSE API, on a
//! server started in-process on 127.0.0.1:0, each on the embedded engine in a temporary folder
//! and on the machine's NATS JetStream ([`on_both!`]); and two nodes on one shared log.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tributary_engine::Engine;
use tributary_server::ServerConfig;

use super::process::{self, Interval, Periods};
use super::{StockConfig, StockPriceUpdates};
use crate::System;
use crate::test_support::{Backend, on_both};

const WAIT: Duration = Duration::from_secs(10);
/// A fixed moment for ticks with explicit times: 2026-11-28 10:00:00 UTC.
const T0: i64 = 1_795_860_000_000;

fn config() -> StockConfig {
    StockConfig {
        partitions: 4,
        intervals: vec![Interval { ms: 1_000 }, Interval { ms: 60_000 }],
        periods: Periods { sma: 2, ema: 2, rsi: 2 },
        bars_kept: 100,
        stale_after_ms: 60_000,
        stale_check_ms: 50,
        retention_ms: None,
    }
}

struct App {
    base: String,
    ws_base: String,
    client: reqwest::Client,
    system: Arc<StockPriceUpdates>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl App {
    async fn start(dir: &Path, backend: &Backend) -> App {
        App::start_with(dir, backend, config()).await
    }

    async fn start_with(dir: &Path, backend: &Backend, config: StockConfig) -> App {
        let engine = Arc::new(Engine::open(dir).unwrap());
        let context = backend.context(engine).await;
        let system = StockPriceUpdates::open(&context, config).unwrap();
        let app = tributary_server::router(&ServerConfig::default(), vec![system.clone().api()], Router::new());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        App { base: format!("http://{addr}"), ws_base: format!("ws://{addr}"), client: reqwest::Client::new(), system, stop: Some(stop), server: Some(server) }
    }

    /// Stop serving and drop everything holding the engine without a clean close: only what
    /// was acknowledged is relied on afterwards. The system's threads stop as at a node's
    /// shutdown, also while connections the test left open still hold it.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
        let system = self.system;
        for _ in 0..100 {
            if Arc::strong_count(&system) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::task::block_in_place(|| system.shutdown());
        drop(system);
    }

    async fn post(&self, body: Vec<u8>, content_type: &str) -> (u16, Value) {
        let response = self.client.post(format!("{}/v1/stocks/ticks", self.base)).header("content-type", content_type).body(body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null))
    }

    /// Post NDJSON ticks; every one must be accepted.
    async fn ticks(&self, ticks: &[Value]) {
        let (status, body) = self.post(ndjson(ticks), "application/x-ndjson").await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["accepted"], ticks.len(), "{body}");
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null))
    }

    async fn ws(&self, query: &str) -> Ws {
        let (mut stream, _) = tokio_tungstenite::connect_async(format!("{}/v1/stocks/ws?{query}", self.ws_base)).await.unwrap();
        let hello = next_frame(&mut stream).await;
        assert!(hello.get("subscribed").is_some(), "{hello}");
        Ws { stream }
    }
}

fn ndjson(ticks: &[Value]) -> Vec<u8> {
    ticks.iter().map(|t| format!("{t}\n")).collect::<String>().into_bytes()
}

fn tick(symbol: &str, price: f64) -> Value {
    json!({"symbol": symbol, "price": price, "size": 1})
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws {
    stream: WsStream,
}

async fn next_frame(stream: &mut WsStream) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, stream.next()).await.expect("a frame in time").expect("open").unwrap();
        if let WsMessage::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

impl Ws {
    /// The next `n` events (frames are arrays of events), skipping nothing.
    async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let frame = next_frame(&mut self.stream).await;
            match frame {
                Value::Array(events) => out.extend(events),
                control => out.push(control),
            }
        }
        assert_eq!(out.len(), n, "more events than expected: {out:?}");
        out
    }

    async fn frame(&mut self) -> Value {
        next_frame(&mut self.stream).await
    }

    async fn quiet(&mut self) {
        if let Ok(Some(Ok(WsMessage::Text(text)))) = tokio::time::timeout(Duration::from_millis(300), self.stream.next()).await {
            panic!("expected nothing, got {text}");
        }
    }

    async fn credit(&mut self, n: u64) {
        self.stream.send(WsMessage::Text(json!({"credit": n}).to_string().into())).await.unwrap();
    }
}

fn prices(events: &[Value]) -> Vec<(String, f64)> {
    events.iter().map(|e| (e["symbol"].as_str().unwrap().to_string(), e["price"].as_f64().unwrap())).collect()
}

async fn ndjson_and_binary_ticks_are_acknowledged_and_become_the_last_price(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.ticks(&[json!({"symbol": "NAS.AAPL", "price": 189.5, "size": 100, "ts": T0, "seq": 1}), tick("NAS.MSFT", 401.25)]).await;
    let mut binary = process::BINARY_MAGIC.to_vec();
    process::encode_tick(&mut binary, "NAS.AAPL", 190.0, 50.0, T0 + 1, 2);
    process::encode_tick(&mut binary, "LSE.VOD", 0.72, 1000.0, 0, 0);
    let (status, body) = app.post(binary, "application/octet-stream").await;
    assert_eq!((status, body["accepted"].as_u64()), (201, Some(2)), "{body}");
    assert_eq!(body["rejected"], json!([]));

    let (_, last) = app.get("/v1/stocks/last").await;
    let symbols: Vec<&str> = last["prices"].as_array().unwrap().iter().map(|p| p["symbol"].as_str().unwrap()).collect();
    assert_eq!(symbols, vec!["LSE.VOD", "NAS.AAPL", "NAS.MSFT"]);
    let (_, nas) = app.get("/v1/stocks/last?symbols=NAS.*").await;
    let nas = nas["prices"].as_array().unwrap();
    assert_eq!(nas.len(), 2);
    assert_eq!((nas[0]["price"].as_f64(), nas[0]["seq"].as_u64(), nas[0]["ts"].as_i64()), (Some(190.0), Some(2), Some(T0 + 1)));
    let (status, aapl) = app.get("/v1/stocks/symbols/NAS.AAPL").await;
    assert_eq!(status, 200);
    assert_eq!((aapl["ticks"].as_u64(), aapl["seq"].as_u64(), aapl["gaps"].as_u64()), (Some(2), Some(2), Some(0)));
    // Day VWAP: (189.5 * 100 + 190 * 50) / 150.
    assert!((aapl["day_vwap"].as_f64().unwrap() - (189.5 * 100.0 + 190.0 * 50.0) / 150.0).abs() < 1e-9, "{aapl}");
    let (status, body) = app.get("/v1/stocks/symbols/NOPE").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    app.stop().await;
}
on_both!(ndjson_and_binary_ticks_are_acknowledged_and_become_the_last_price);

async fn bad_ticks_are_refused_one_by_one_and_the_good_ones_of_the_batch_are_kept(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let body = b"{\"symbol\":\"AAPL\",\"price\":1.5}\nnot json\n{\"symbol\":\"AA PL\",\"price\":1}\n{\"symbol\":\"MSFT\",\"price\":0}\n{\"symbol\":\"MSFT\",\"price\":2,\"ts\":99999999999999}\n{\"symbol\":\"IBM\",\"price\":3,\"colour\":1}\n{\"symbol\":\"IBM\",\"price\":3}\n";
    let (status, response) = app.post(body.to_vec(), "application/x-ndjson").await;
    assert_eq!(status, 201, "{response}");
    assert_eq!(response["accepted"], 2);
    let rejected = response["rejected"].as_array().unwrap();
    assert_eq!(rejected.iter().map(|r| r["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let errors: Vec<&str> = rejected.iter().map(|r| r["error"].as_str().unwrap()).collect();
    assert!(errors[0].contains("not a tick"), "{errors:?}");
    assert!(errors[1].contains("symbol"), "{errors:?}");
    assert!(errors[2].contains("price"), "{errors:?}");
    assert!(errors[3].contains("TICK_FUTURE_MS_MAX"), "{errors:?}");
    assert!(errors[4].contains("colour"), "{errors:?}");
    let (_, last) = app.get("/v1/stocks/last").await;
    assert_eq!(prices(last["prices"].as_array().unwrap()), vec![("AAPL".to_string(), 1.5), ("IBM".to_string(), 3.0)]);

    // Nothing acceptable: 400 in the error format, naming the reasons.
    let (status, response) = app.post(b"{\"symbol\":\"X\",\"price\":-1}\n".to_vec(), "application/x-ndjson").await;
    assert_eq!((status, response["error"]["code"].as_str()), (400, Some("bad_request")));
    assert!(response["error"]["message"].as_str().unwrap().contains("price"), "{response}");
    let (status, _) = app.post(b"hello".to_vec(), "application/octet-stream").await;
    assert_eq!(status, 400);
    let (status, response) = app.post(b"<xml/>".to_vec(), "application/xml").await;
    assert_eq!((status, response["error"]["code"].as_str()), (415, Some("unsupported_media_type")));
    let (status, _) = app.post(Vec::new(), "application/x-ndjson").await;
    assert_eq!(status, 400);
    app.stop().await;
}
on_both!(bad_ticks_are_refused_one_by_one_and_the_good_ones_of_the_batch_are_kept);

async fn a_repeated_sequence_is_refused_and_a_jump_is_a_gap_event(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut ws = app.ws("symbols=AAPL").await;
    app.ticks(&[json!({"symbol": "AAPL", "price": 1, "seq": 10}), json!({"symbol": "AAPL", "price": 2, "seq": 11})]).await;
    // A feed retrying the same ticks after a timeout: both refused, nothing applied twice.
    let (status, response) = app.post(ndjson(&[json!({"symbol": "AAPL", "price": 2, "seq": 11}), json!({"symbol": "AAPL", "price": 3, "seq": 15})]), "application/x-ndjson").await;
    assert_eq!((status, response["accepted"].as_u64()), (201, Some(1)), "{response}");
    assert!(response["rejected"][0]["error"].as_str().unwrap().contains("duplicate"), "{response}");
    let events = ws.events(4).await;
    assert_eq!(events.iter().map(|e| e["type"].as_str().unwrap()).collect::<Vec<_>>(), vec!["tick", "tick", "gap", "tick"]);
    assert_eq!((events[2]["expected"].as_u64(), events[2]["got"].as_u64(), events[2]["missing"].as_u64()), (Some(12), Some(15), Some(3)));
    let (_, gaps) = app.get("/v1/stocks/market-events?type=gap").await;
    let gaps = gaps["events"].as_array().unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!((gaps[0]["symbol"].as_str(), gaps[0]["expected"].as_u64()), (Some("AAPL"), Some(12)));
    let (_, aapl) = app.get("/v1/stocks/symbols/AAPL").await;
    assert_eq!((aapl["ticks"].as_u64(), aapl["gaps"].as_u64(), aapl["missing"].as_u64(), aapl["seq"].as_u64()), (Some(3), Some(1), Some(3), Some(15)));
    app.stop().await;
}
on_both!(a_repeated_sequence_is_refused_and_a_jump_is_a_gap_event);

async fn a_silent_symbol_is_reported_stale_and_then_resumed(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start_with(dir.path(), &backend, StockConfig { stale_after_ms: 400, ..config() }).await;
    let mut ws = app.ws("symbols=IBM,MSFT").await;
    app.ticks(&[tick("IBM", 100.0)]).await;
    assert_eq!(ws.events(1).await[0]["type"], "tick");
    let stale = ws.events(1).await;
    assert_eq!((stale[0]["type"].as_str(), stale[0]["symbol"].as_str()), (Some("stale"), Some("IBM")), "{stale:?}");
    assert!(stale[0]["silent_ms"].as_i64().unwrap() >= 400);
    let (_, ibm) = app.get("/v1/stocks/symbols/IBM").await;
    assert_eq!(ibm["stale"], true);
    let (_, last) = app.get("/v1/stocks/last?symbols=IBM").await;
    assert_eq!(last["prices"][0]["stale"], true);
    app.ticks(&[tick("IBM", 101.0)]).await;
    let events = ws.events(2).await;
    assert_eq!(events.iter().map(|e| e["type"].as_str().unwrap()).collect::<Vec<_>>(), vec!["resumed", "tick"]);
    let (_, recorded) = app.get("/v1/stocks/market-events?symbol=IBM").await;
    let kinds: Vec<&str> = recorded["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["stale", "resumed"]);
    app.stop().await;
}
on_both!(a_silent_symbol_is_reported_stale_and_then_resumed);

async fn subscribers_get_only_their_symbols_and_patterns_over_websocket_and_sse(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut nas = app.ws("symbols=NAS.*").await;
    let mut both = app.ws("symbols=LSE.VOD,NAS.AAPL").await;
    let response = app.client.get(format!("{}/v1/stocks/stream?symbols=LSE.>", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = Box::pin(response.bytes_stream());

    app.ticks(&[tick("NAS.AAPL", 1.0), tick("NAS.MSFT", 2.0), tick("LSE.VOD", 3.0), tick("LSE.BP.A", 4.0), tick("NYSE.IBM", 5.0)]).await;
    let mut got = prices(&nas.events(2).await);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![("NAS.AAPL".into(), 1.0), ("NAS.MSFT".into(), 2.0)]);
    let mut got = prices(&both.events(2).await);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![("LSE.VOD".into(), 3.0), ("NAS.AAPL".into(), 1.0)]);
    nas.quiet().await;
    both.quiet().await;

    let mut text = String::new();
    let mut sse_ticks = Vec::new();
    while sse_ticks.len() < 2 {
        let chunk = tokio::time::timeout(WAIT, sse.next()).await.expect("SSE in time").unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let event = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default().to_string();
            let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_default().to_string();
            if event == "tick" {
                sse_ticks.push(serde_json::from_str::<Value>(&data).unwrap());
            }
        }
    }
    let mut got = prices(&sse_ticks);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![("LSE.BP.A".into(), 4.0), ("LSE.VOD".into(), 3.0)]);

    let (status, body) = app.get("/v1/stocks/stream?symbols=NAS..X").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let (status, _) = app.get("/v1/stocks/stream").await;
    assert_eq!(status, 400, "symbols are required");
    app.stop().await;
}
on_both!(subscribers_get_only_their_symbols_and_patterns_over_websocket_and_sse);

async fn bars_close_with_ohlc_vwap_and_indicators_streamed_and_queryable(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let mut ws = app.ws("symbols=AAPL&ticks=false&bars=1s").await;
    // Three 1-second bars; periods are 2 (SMA, EMA) and 2 (RSI).
    let ticks = [
        (T0, 10.0, 1.0),
        (T0 + 300, 12.0, 3.0),
        (T0 + 900, 11.0, 0.0),
        (T0 + 1_000, 13.0, 2.0),
        (T0 + 1_500, 9.0, 2.0),
        (T0 + 2_200, 14.0, 1.0),
        (T0 + 3_000, 15.0, 1.0),
    ];
    let lines: Vec<Value> = ticks.iter().map(|(ts, p, s)| json!({"symbol": "AAPL", "price": p, "size": s, "ts": ts})).collect();
    app.ticks(&lines).await;
    let bars = ws.events(3).await;
    assert!(bars.iter().all(|b| b["type"] == "bar" && b["interval"] == "1s"), "{bars:?}");
    let first = &bars[0];
    assert_eq!((first["start"].as_i64(), first["open"].as_f64(), first["high"].as_f64(), first["low"].as_f64(), first["close"].as_f64()), (Some(T0), Some(10.0), Some(12.0), Some(10.0), Some(11.0)));
    assert_eq!((first["volume"].as_f64(), first["ticks"].as_u64()), (Some(4.0), Some(3)));
    assert!((first["vwap"].as_f64().unwrap() - (10.0 + 36.0) / 4.0).abs() < 1e-9);
    assert_eq!((first["sma"].clone(), first["rsi"].clone()), (Value::Null, Value::Null));
    // Closes 11, 9, 14: SMA(2) = 11.5; EMA(2) seeded with 10 then 2/3*14 + 1/3*10; RSI(2): the
    // first two changes average gain 2.5 (0 + 5) / 2, loss 1 (2 + 0) / 2.
    let third = &bars[2];
    assert_eq!(bars[1]["sma"].as_f64(), Some(10.0));
    assert!((third["sma"].as_f64().unwrap() - 11.5).abs() < 1e-9, "{third}");
    assert!((third["ema"].as_f64().unwrap() - (2.0 / 3.0 * 14.0 + 1.0 / 3.0 * 10.0)).abs() < 1e-9, "{third}");
    assert!((third["rsi"].as_f64().unwrap() - (100.0 - 100.0 / (1.0 + 2.5 / 1.0))).abs() < 1e-9, "{third}");

    let (status, view) = app.get("/v1/stocks/symbols/AAPL/bars?interval=1s&limit=2").await;
    assert_eq!(status, 200, "{view}");
    let closed = view["bars"].as_array().unwrap();
    assert_eq!(closed.iter().map(|b| b["start"].as_i64().unwrap()).collect::<Vec<_>>(), vec![T0 + 1_000, T0 + 2_000]);
    assert_eq!((view["open"]["start"].as_i64(), view["open"]["close"].as_f64()), (Some(T0 + 3_000), Some(15.0)));
    let (_, minute) = app.get("/v1/stocks/symbols/AAPL/bars?interval=1m").await;
    assert_eq!(minute["bars"], json!([]), "all seven ticks are in one open minute bar");
    assert_eq!((minute["open"]["ticks"].as_u64(), minute["open"]["high"].as_f64(), minute["open"]["low"].as_f64()), (Some(7), Some(15.0), Some(9.0)));
    let (status, body) = app.get("/v1/stocks/symbols/AAPL/bars?interval=5m").await;
    assert_eq!(status, 400, "{body}");
    app.stop().await;
}
on_both!(bars_close_with_ohlc_vwap_and_indicators_streamed_and_queryable);

async fn replay_returns_the_ticks_accepted_since_a_time_page_by_page(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.ticks(&[tick("OLD", 1.0)]).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let from = tributary_core::now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut expected = Vec::new();
    for round in 0..5 {
        let batch: Vec<Value> = (0..20).map(|i| json!({"symbol": format!("S{i}"), "price": round * 100 + i + 1, "seq": round + 1})).collect();
        app.ticks(&batch).await;
        expected.extend(batch.iter().map(|t| (t["symbol"].as_str().unwrap().to_string(), t["price"].as_f64().unwrap())));
    }
    let mut got = Vec::new();
    let mut path = format!("/v1/stocks/replay?from_ms={from}&limit=7");
    loop {
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200, "{page}");
        got.extend(prices(page["ticks"].as_array().unwrap()));
        match page["next"].as_str() {
            Some(cursor) => path = format!("/v1/stocks/replay?cursor={cursor}&limit=7"),
            None => break,
        }
    }
    assert_eq!(got.len(), expected.len(), "every tick since `from`, once, and not the older one");
    // Across partitions the order is the log's time; within a symbol it is exact.
    for symbol in ["S0", "S7", "S19"] {
        let mine = |v: &Vec<(String, f64)>| v.iter().filter(|(s, _)| s == symbol).map(|(_, p)| *p).collect::<Vec<_>>();
        assert_eq!(mine(&got), mine(&expected));
    }
    let (_, only) = app.get(&format!("/v1/stocks/replay?from_ms={from}&symbols=S3")).await;
    assert_eq!(prices(only["ticks"].as_array().unwrap()).iter().map(|(_, p)| *p).collect::<Vec<_>>(), vec![4.0, 104.0, 204.0, 304.0, 404.0]);
    let (_, all) = app.get("/v1/stocks/replay?from_ms=0&symbols=OLD").await;
    assert_eq!(all["ticks"].as_array().unwrap().len(), 1);
    let (status, _) = app.get("/v1/stocks/replay?cursor=garbage").await;
    assert_eq!(status, 400);
    let (status, _) = app.get("/v1/stocks/replay").await;
    assert_eq!(status, 400);
    app.stop().await;
}
on_both!(replay_returns_the_ticks_accepted_since_a_time_page_by_page);

async fn a_stream_from_a_time_replays_the_log_then_continues_live_without_gap_or_repeat(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let from = tributary_core::now_ms() - 1;
    let batch: Vec<Value> = (0..50).map(|i| json!({"symbol": format!("EX{}.S{i}", i % 2), "price": i + 1})).collect();
    app.ticks(&batch).await;
    let (mut stream, _) = tokio_tungstenite::connect_async(format!("{}/v1/stocks/ws?symbols=EX0.*&from_ms={from}", app.ws_base)).await.unwrap();
    assert!(next_frame(&mut stream).await.get("subscribed").is_some());
    // Ticks published while the replay may still be running, and after.
    let writer = {
        let client = app.client.clone();
        let url = format!("{}/v1/stocks/ticks", app.base);
        tokio::spawn(async move {
            for i in 50..100 {
                let body = format!("{}\n", json!({"symbol": format!("EX{}.S{i}", i % 2), "price": i + 1}));
                let response = client.post(&url).header("content-type", "application/x-ndjson").body(body).send().await.unwrap();
                assert_eq!(response.status(), 201);
            }
        })
    };
    let mut seen = Vec::new();
    let mut live = false;
    while seen.len() < 50 {
        match next_frame(&mut stream).await {
            Value::Array(events) => seen.extend(events.iter().map(|e| e["price"].as_f64().unwrap() as i64)),
            control => {
                assert!(control.get("live").is_some(), "{control}");
                assert_eq!(control["live"]["replayed"], 25);
                live = true;
            }
        }
    }
    writer.await.unwrap();
    assert!(live);
    let want: Vec<i64> = (0..100).filter(|i| i % 2 == 0).map(|i| i + 1).collect();
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "each EX0 tick once, replayed or live");
    app.stop().await;
}
on_both!(a_stream_from_a_time_replays_the_log_then_continues_live_without_gap_or_repeat);

async fn a_slow_consumer_is_conflated_to_the_newest_price_or_else_disconnected(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    // No credit: the connection cannot be sent anything while the ticks arrive.
    let mut conflated = app.ws("symbols=AAPL,MSFT&conflate=true&buffer=4&credit=0").await;
    let mut strict = app.ws("symbols=AAPL&buffer=4&credit=0").await;
    for price in 1..=10 {
        app.ticks(&[tick("AAPL", f64::from(price)), tick("MSFT", f64::from(price) * 10.0)]).await;
    }
    conflated.credit(100).await;
    let mut got: Vec<(String, f64)> = Vec::new();
    while !got.contains(&("AAPL".to_string(), 10.0)) || !got.contains(&("MSFT".to_string(), 100.0)) {
        match conflated.frame().await {
            Value::Array(events) => got.extend(prices(&events)),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(got.len() < 20, "newer ticks replaced older unsent ones: {got:?}");
    for symbol in ["AAPL", "MSFT"] {
        let mine: Vec<f64> = got.iter().filter(|(s, _)| s == symbol).map(|(_, p)| *p).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "in order: {mine:?}");
    }
    strict.credit(100).await;
    loop {
        match strict.frame().await {
            Value::Array(_) => {}
            control => {
                assert_eq!(control["closed"]["reason"], "slow_consumer", "{control}");
                break;
            }
        }
    }
    app.stop().await;
}
on_both!(a_slow_consumer_is_conflated_to_the_newest_price_or_else_disconnected);

async fn a_restart_rebuilds_last_prices_sequences_and_bars_from_the_log(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let lines: Vec<Value> = (0..6).map(|i| json!({"symbol": "AAPL", "price": 10 + i, "size": 1, "ts": T0 + i * 1_000, "seq": i + 1})).collect();
    app.ticks(&lines).await;
    app.ticks(&[tick("MSFT", 5.0)]).await;
    let (_, before) = app.get("/v1/stocks/symbols/AAPL/bars?interval=1s").await;
    app.stop().await;

    let app = App::start(dir.path(), &backend).await;
    let (_, after) = app.get("/v1/stocks/symbols/AAPL/bars?interval=1s").await;
    assert_eq!(before, after, "bars and indicators are a function of the log");
    assert_eq!(after["bars"].as_array().unwrap().len(), 5);
    let (_, aapl) = app.get("/v1/stocks/symbols/AAPL").await;
    assert_eq!((aapl["last"]["price"].as_f64(), aapl["seq"].as_u64()), (Some(15.0), Some(6)));
    let (status, response) = app.post(ndjson(&[json!({"symbol": "AAPL", "price": 1, "seq": 6})]), "application/x-ndjson").await;
    assert_eq!(status, 400, "a sequence accepted before the restart is still a duplicate: {response}");
    let (_, last) = app.get("/v1/stocks/last?symbols=MSFT").await;
    assert_eq!(last["prices"][0]["price"].as_f64(), Some(5.0));
    app.stop().await;
}
on_both!(a_restart_rebuilds_last_prices_sequences_and_bars_from_the_log);

async fn status_counts_symbols_and_subscribers(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let _ws = app.ws("symbols=%3E").await;
    app.ticks(&[tick("A", 1.0), tick("B", 2.0)]).await;
    let status = app.system.status();
    assert_eq!((status["symbols"].as_u64(), status["subscribers"].as_u64(), status["ticks_total"].as_u64()), (Some(2), Some(1), Some(2)));
    app.stop().await;
}
on_both!(status_counts_symbols_and_subscribers);

/// Posts one tick per request, `seqs` in order, and returns the seqs the node accepted.
async fn post_each(app: &App, symbol: &'static str, seqs: std::ops::RangeInclusive<u64>, price_offset: f64) -> Vec<u64> {
    let mut accepted = Vec::new();
    for seq in seqs {
        let (status, body) = app.post(ndjson(&[json!({"symbol": symbol, "price": seq as f64 + price_offset, "seq": seq})]), "application/x-ndjson").await;
        match status {
            201 => accepted.push(seq),
            400 => assert!(body["error"]["message"].as_str().unwrap().contains("duplicate or out of order"), "{body}"),
            _ => panic!("{status}: {body}"),
        }
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_shared_log_accept_each_seq_once_and_serve_the_same_ticks() {
    let backend = Backend::nats();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = App::start(dir_a.path(), &backend).await;
    let b = App::start(dir_b.path(), &backend).await;
    let mut watch_a = a.ws("symbols=AAPL,MSFT").await;
    let mut watch_b = b.ws("symbols=AAPL,MSFT").await;

    // The same feed posted through both nodes at once (a feed handler retrying on the other
    // node): node A's copy of a tick has a whole price, node B's a price ending in .5.
    let (from_a, from_b) = tokio::join!(post_each(&a, "AAPL", 1..=60, 0.0), post_each(&b, "AAPL", 1..=60, 0.5));
    let overtaken = |app: &App| app.system.status()["appends_overtaken"].as_u64().unwrap();
    println!("of seqs 1 to 60 posted through both nodes at once, A accepted {} (appends overtaken {}), B {} ({})", from_a.len(), overtaken(&a), from_b.len(), overtaken(&b));
    let mut accepted: Vec<u64> = from_a.iter().chain(&from_b).copied().collect();
    accepted.sort_unstable();
    let count = accepted.len();
    accepted.dedup();
    assert_eq!(accepted.len(), count, "a seq accepted by both nodes: A {from_a:?}, B {from_b:?}");
    assert!(accepted.contains(&60), "the last seq is accepted by one of them");
    // Another symbol through node B only: every tick goes in.
    assert_eq!(post_each(&b, "MSFT", 1..=20, 0.0).await.len(), 20);

    // Both nodes' subscribers get exactly the accepted ticks, in the log's order (seq order).
    let source = |e: &Value| (e["seq"].as_u64().unwrap(), e["price"].as_f64().unwrap().fract() == 0.5);
    let events_a = watch_a.events(count + 20).await;
    let events_b = watch_b.events(count + 20).await;
    assert_eq!(events_a, events_b, "the two nodes deliver the same events");
    let aapl: Vec<(u64, bool)> = events_a.iter().filter(|e| e["symbol"] == "AAPL").map(source).collect();
    let want: Vec<(u64, bool)> = {
        let mut all: Vec<(u64, bool)> = from_a.iter().map(|&s| (s, false)).chain(from_b.iter().map(|&s| (s, true))).collect();
        all.sort_unstable();
        all
    };
    assert_eq!(aapl, want, "each accepted tick once, in seq order, from the node that accepted it");
    watch_a.quiet().await;
    watch_b.quiet().await;
    drop((watch_a, watch_b));

    // The same state on both nodes, and the same replay.
    for app in [&a, &b] {
        let (_, view) = app.get("/v1/stocks/symbols/AAPL").await;
        assert_eq!((view["ticks"].as_u64(), view["seq"].as_u64()), (Some(count as u64), Some(60)), "{view}");
        let (_, replayed) = app.get("/v1/stocks/replay?from_ms=0&symbols=AAPL&limit=1000").await;
        let replayed: Vec<(u64, bool)> = replayed["ticks"].as_array().unwrap().iter().map(source).collect();
        assert_eq!(replayed, want);
        let (status, body) = app.post(ndjson(&[json!({"symbol": "AAPL", "price": 1, "seq": 60})]), "application/x-ndjson").await;
        assert_eq!(status, 400, "seq 60 is a duplicate on either node: {body}");
    }

    // A node started later rebuilds the same state from the shared log.
    let dir_c = tempfile::tempdir().unwrap();
    let c = App::start(dir_c.path(), &backend).await;
    let (_, view) = c.get("/v1/stocks/symbols/AAPL").await;
    assert_eq!((view["ticks"].as_u64(), view["seq"].as_u64()), (Some(count as u64), Some(60)), "{view}");
    let (_, msft) = c.get("/v1/stocks/symbols/MSFT").await;
    assert_eq!(msft["ticks"].as_u64(), Some(20));
    for app in [a, b, c] {
        app.stop().await;
    }
    backend.forget().await;
}
