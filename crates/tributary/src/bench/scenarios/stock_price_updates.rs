//! stock-price-updates under load: the seed's 10,000 symbols (`{run}.X0.00000` … `{run}.X9.09999`,
//! ten "exchanges"), each ticking in turn, sent as binary batches of `--publish-batch` ticks
//! (default 5,000 when the option is left at its default), and one live WebSocket subscriber on
//! a tenth of them (`{run}.X0.*`, 100,000 ticks/s at the seed's rate) that must get each of its
//! ticks once.
//!
//! Message `seq` is tick `seq`: symbol `seq % 10,000`, source sequence `seq / 10,000 + 1`, so
//! the subscriber maps `(symbol, seq)` back to the message. After a reconnect it replays from a
//! second before its last frame and drops what it already had by the source sequence, as a
//! market-data client does.

use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;
use tributary_systems::stock_price_updates::{process, scenario};

use super::{Run, Scenario, publish_batch};
use crate::bench::system::SystemArgs;

pub struct StockPriceUpdates {
    batch: u64,
    symbols: OnceLock<Vec<String>>,
}

/// Ticks per request when `--publish-batch` is left at its default.
const BATCH_DEFAULT: u64 = 5_000;
/// The subscriber's exchange: symbols `i` with `i % 10 == SUBSCRIBED`.
const SUBSCRIBED: usize = 0;
/// Replay overlap after a reconnect, in milliseconds.
const RESUME_OVERLAP_MS: i64 = 1_000;

fn symbol(run: &Run, i: usize) -> String {
    format!("{}.X{}.{i:05}", run.name, i % 10)
}

impl Scenario for StockPriceUpdates {
    const SYSTEM: &'static str = "stock-price-updates";

    fn new(args: &SystemArgs, _spec: &SystemSpec) -> anyhow::Result<Self> {
        let batch = publish_batch(args, BATCH_DEFAULT);
        anyhow::ensure!(batch as usize <= process::TICKS_PER_REQUEST_MAX, "--publish-batch is over TICKS_PER_REQUEST_MAX ({})", process::TICKS_PER_REQUEST_MAX);
        Ok(StockPriceUpdates { batch, symbols: OnceLock::new() })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    fn expects(&self, _receiver: usize, seq: u64) -> bool {
        (seq as usize % scenario::SYMBOLS) % 10 == SUBSCRIBED
    }

    fn describe(&self) -> serde_json::Value {
        json!({"symbols": scenario::SYMBOLS, "ticks_per_request": self.batch, "format": "binary", "subscribers": 1, "subscribed_symbols": scenario::SYMBOLS / 10})
    }

    async fn prepare(&self, run: &Arc<Run>) -> anyhow::Result<()> {
        let names: Vec<String> = (0..scenario::SYMBOLS).map(|i| symbol(run, i)).collect();
        anyhow::ensure!(names.iter().all(|n| process::check_symbol(n).is_none()), "the run name {:?} makes symbols the system refuses", run.name);
        let _ = self.symbols.set(names);
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let ws_base = run.base.replacen("http", "ws", 1);
        let pattern = format!("{}.X{SUBSCRIBED}.*", run.name);
        let url = format!("{ws_base}/v1/stocks/ws?symbols={pattern}&buffer=1000000");
        let (socket, _) = tokio_tungstenite::connect_async(&url).await?;
        let run = run.clone();
        Ok(vec![tokio::spawn(async move {
            let mut socket = Some(socket);
            let mut last_seq = vec![0u64; scenario::SYMBOLS];
            let mut last_frame_ms = tributary_core::now_ms();
            loop {
                let mut stream = match socket.take() {
                    Some(stream) => stream,
                    None => {
                        let from = last_frame_ms - RESUME_OVERLAP_MS;
                        match tokio_tungstenite::connect_async(format!("{url}&from_ms={from}")).await {
                            Ok((stream, _)) => stream,
                            Err(_) => {
                                run.error();
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        }
                    }
                };
                while let Some(Ok(frame)) = stream.next().await {
                    let tokio_tungstenite::tungstenite::Message::Text(text) = frame else { continue };
                    let Ok(serde_json::Value::Array(events)) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                    last_frame_ms = tributary_core::now_ms();
                    for event in &events {
                        let (Some(name), Some(tick_seq)) = (event["symbol"].as_str(), event["seq"].as_u64()) else { continue };
                        let Some(i) = name.rsplit_once('.').and_then(|(_, n)| n.parse::<usize>().ok()).filter(|i| *i < scenario::SYMBOLS) else { continue };
                        if tick_seq <= last_seq[i] {
                            continue;
                        }
                        last_seq[i] = tick_seq;
                        run.delivered(0, (tick_seq - 1) * scenario::SYMBOLS as u64 + i as u64);
                    }
                }
                run.error();
            }
        })])
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let names = self.symbols.get().expect("prepared");
        let mut body = Vec::with_capacity((seqs.end - seqs.start) as usize * 64 + 4);
        body.extend_from_slice(process::BINARY_MAGIC);
        for seq in seqs {
            let (i, round) = ((seq % scenario::SYMBOLS as u64) as usize, seq / scenario::SYMBOLS as u64);
            let price = 100.0 + (round % 1_000) as f64 * 0.01 + i as f64 * 0.0001;
            process::encode_tick(&mut body, &names[i], price, 100.0, 0, round + 1);
        }
        let response = run.client.post(format!("{}/v1/stocks/ticks", run.base)).header("content-type", "application/octet-stream").body(body).send().await?;
        let status = response.status();
        // Read to the end either way, so that the connection goes back to the pool.
        let text = response.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::CREATED {
            return Ok(());
        }
        // A retry of ticks that were already durable: the system refuses them as duplicates.
        anyhow::ensure!(status == reqwest::StatusCode::BAD_REQUEST && text.contains("duplicate or out of order"), "ingest answered {status}: {text}");
        Ok(())
    }
}
