//! realtime-chat-messages under load: `--subscriptions` channels (default 100) of
//! `--consumers` members each (default 2, from 2 to 10), every member connected over its own
//! WebSocket. Messages go open loop at the seed's 20,000/s, in batches of `--publish-batch`
//! through the many-message send, each from member 0 of channel `seq % channels`, with a client
//! id so a retried send appends nothing; every member (the sender's own connection included) must
//! get it. Receiver `m` is member `m` of every channel. Latency runs from a batch's intended send
//! time to the member's connection parsing the event, so it includes the durable append (fsync),
//! the fan-out and the frame.
//!
//! Lost and duplicated messages are the driver's accounting. Out of order: a connection that gets
//! an event whose channel seq is not above the last one it got from that channel counts an error
//! (the chat's own guarantee is per-channel seq order). A connection that drops reconnects with
//! `since` (its last seq per channel) and must get exactly what it missed.
//!
//! Not measured here: the seed's 100,000 concurrent users (`tributary bench connections` measures
//! how many WebSockets a node holds) and its 50,000 channels (each channel here is a handful of
//! connections on the load generator's machine).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;
use tokio::task::JoinHandle;
use tributary_runtime::catalogue::System as SystemSpec;

use super::{PUBLISH_BATCH_DEFAULT, Run, Scenario, expect_status, padding, publish_batch};
use crate::bench::system::SystemArgs;

pub struct RealtimeChatMessages {
    channels: usize,
    members: usize,
    batch: u64,
    padding: String,
}

/// Channels when `--subscriptions` does not say.
const CHANNELS_DEFAULT: usize = 100;
/// Members per channel when `--consumers` does not say.
const MEMBERS_DEFAULT: usize = 2;
/// Most members per channel the load connects.
const MEMBERS_MAX: usize = 10;
/// Bytes of a message's text besides its padding.
const TEXT_OVERHEAD_BYTES: usize = 24;

impl RealtimeChatMessages {
    fn channel(&self, run: &Run, c: usize) -> String {
        format!("{}-c{c}", run.name)
    }

    fn user(&self, run: &Run, c: usize, m: usize) -> String {
        format!("{}-c{c}-u{m}", run.name)
    }
}

impl Scenario for RealtimeChatMessages {
    const SYSTEM: &'static str = "realtime-chat-messages";

    fn new(args: &SystemArgs, _spec: &SystemSpec) -> anyhow::Result<Self> {
        let channels = args.subscriptions.unwrap_or(CHANNELS_DEFAULT).max(1);
        let members = args.consumers.unwrap_or(MEMBERS_DEFAULT).clamp(2, MEMBERS_MAX);
        Ok(RealtimeChatMessages { channels, members, batch: publish_batch(args, PUBLISH_BATCH_DEFAULT), padding: padding(args.message_bytes, TEXT_OVERHEAD_BYTES) })
    }

    fn batch(&self) -> u64 {
        self.batch
    }

    /// Member `m` of every channel is receiver `m`.
    fn receivers(&self) -> usize {
        self.members
    }

    fn describe(&self) -> serde_json::Value {
        json!({"channels": self.channels, "members_per_channel": self.members, "connections": self.channels * self.members, "publish_batch": self.batch, "transport": "websocket"})
    }

    async fn prepare(&self, run: &Arc<Run>) -> anyhow::Result<()> {
        for c in 0..self.channels {
            let members: Vec<String> = (1..self.members).map(|m| self.user(run, c, m)).collect();
            let url = format!("{}/v1/chat/channels?user={}", run.base, self.user(run, c, 0));
            let response = run.client.post(url).json(&json!({"id": self.channel(run, c), "visibility": "private", "members": members})).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            anyhow::ensure!(status.is_success() || status == reqwest::StatusCode::CONFLICT, "creating a channel answered {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    async fn start_receivers(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let ws_base = run.base.replacen("http", "ws", 1);
        let mut receivers = Vec::with_capacity(self.channels * self.members);
        for c in 0..self.channels {
            for m in 0..self.members {
                let url = format!("{ws_base}/v1/chat/ws?user={}", self.user(run, c, m));
                let (mut stream, _) = tokio_tungstenite::connect_async(url.clone()).await?;
                // Attached once the `connected` message is read; it says where each channel is,
                // which is where a reconnect resumes from until events arrive.
                let hello = stream.next().await.ok_or_else(|| anyhow::anyhow!("member {m} of channel {c} closed before its connected message"))??;
                let hello: serde_json::Value = serde_json::from_str(hello.to_text()?)?;
                let last: HashMap<String, u64> = hello["connected"]["channels"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|c| Some((c["id"].as_str()?.to_string(), c["last_seq"].as_u64()?)))
                    .collect();
                receivers.push(tokio::spawn(member(run.clone(), m, url, stream, last)));
            }
        }
        Ok(receivers)
    }

    async fn send(&self, run: &Arc<Run>, seqs: Range<u64>) -> anyhow::Result<()> {
        let messages: Vec<_> = seqs
            .map(|seq| {
                let c = seq as usize % self.channels;
                json!({"channel": self.channel(run, c), "user": self.user(run, c, 0), "text": format!("{seq} {}", self.padding), "client_id": format!("s{seq}")})
            })
            .collect();
        let response = run.client.post(format!("{}/v1/chat/messages", run.base)).json(&json!({"messages": messages})).send().await?;
        expect_status(response, reqwest::StatusCode::CREATED, "send").await
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Read one member's WebSocket until aborted; on a drop, reconnect with `since`.
async fn member(run: Arc<Run>, receiver: usize, url: String, first: WsStream, mut last: HashMap<String, u64>) {
    let mut stream = Some(first);
    loop {
        let mut current = match stream.take() {
            Some(s) => s,
            None => {
                let since = serde_json::to_string(&last).expect("positions serialize");
                let encoded: String = since.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
                match tokio_tungstenite::connect_async(format!("{url}&since={encoded}")).await {
                    Ok((s, _)) => s,
                    Err(_) => {
                        run.error();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        while let Some(Ok(frame)) = current.next().await {
            let tokio_tungstenite::tungstenite::Message::Text(text) = frame else { continue };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
                run.error();
                continue;
            };
            for event in value["events"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let (Some(channel), Some(channel_seq)) = (event["channel"].as_str(), event["seq"].as_u64()) else { continue };
                let previous = last.insert(channel.to_string(), channel_seq);
                if previous.is_some_and(|p| channel_seq <= p) {
                    // Out of order (or repeated) within the channel.
                    run.error();
                }
                if event["kind"] == "message"
                    && let Some(seq) = event["text"].as_str().and_then(|t| t.split(' ').next()).and_then(|s| s.parse::<u64>().ok())
                {
                    run.delivered(receiver, seq);
                }
            }
        }
    }
}
