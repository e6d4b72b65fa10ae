//! Feature tests of realtime-chat-messages through its real HTTP, WebSocket and SSE API, on a
//! server started in-process on 127.0.0.1:0, with the log on the engine in a temporary folder or
//! on the machine's NATS JetStream ([`on_both!`]), and two nodes on one shared log.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tributary_engine::Engine;
use tributary_engine::search::SearchConfig;

use super::process::{CHANNEL_MEMBERS_MAX, HISTORY_PAGE_MAX, MESSAGE_TEXT_BYTES_MAX, SEND_BATCH_MAX};
use super::{Chat, ChatConfig};
use crate::System;
use crate::test_support::{Backend, Served, on_both, until_last_handle};

const WAIT: Duration = Duration::from_secs(10);

struct App {
    base: String,
    ws_base: String,
    client: reqwest::Client,
    system: Arc<Chat>,
    engine: Arc<Engine>,
    served: Served,
}

fn config() -> ChatConfig {
    ChatConfig { search: SearchConfig { commit_interval_ms: 50, commit_docs: 10_000 }, ..ChatConfig::default() }
}

impl App {
    async fn start(dir: &Path, backend: &Backend) -> App {
        let engine = Arc::new(Engine::open(dir).unwrap());
        let context = backend.context(engine.clone()).await;
        let system = Chat::open(&context, config()).unwrap();
        let served = Served::start(system.clone().api()).await;
        App { base: served.base(), ws_base: served.ws_base(), client: reqwest::Client::new(), system, engine, served }
    }

    /// Stop serving and drop everything holding the engine without a clean close (only what
    /// was acknowledged is relied on afterwards).
    async fn stop(mut self) {
        self.system.shutdown();
        self.system.gateway().close();
        self.served.stop().await;
        let (system, engine) = (self.system, self.engine);
        until_last_handle(&system).await;
        drop(system);
        // Dropping the engine's last handle stops the search index's writer thread.
        tokio::task::spawn_blocking(move || drop(engine)).await.unwrap();
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, body).await;
        assert!((200..300).contains(&status), "{path}: {status} {value}");
        value
    }

    async fn channel(&self, user: &str, id: &str, visibility: &str, members: &[&str]) {
        let (status, body) = self.post(&format!("/v1/chat/channels?user={user}"), json!({"id": id, "visibility": visibility, "members": members})).await;
        assert_eq!(status, 201, "{body}");
    }

    /// Send a message; returns its seq.
    async fn send(&self, user: &str, channel: &str, text: &str) -> u64 {
        let (status, body) = self.post(&format!("/v1/chat/channels/{channel}/messages?user={user}"), json!({"text": text})).await;
        assert_eq!(status, 201, "{body}");
        body["seq"].as_u64().unwrap()
    }

    async fn history(&self, user: &str, channel: &str, query: &str) -> Value {
        self.ok(reqwest::Method::GET, &format!("/v1/chat/channels/{channel}/messages?user={user}&{query}"), None).await
    }

    async fn search(&self, user: &str, query: &str) -> Vec<(String, u64)> {
        let body = self.ok(reqwest::Method::GET, &format!("/v1/chat/search?user={user}&{query}"), None).await;
        body["messages"].as_array().unwrap().iter().map(|m| (m["channel"].as_str().unwrap().to_string(), m["seq"].as_u64().unwrap())).collect()
    }

    /// Poll a search until it answers `expected` (the index commits every 50 ms here).
    async fn search_until(&self, user: &str, query: &str, mut expected: Vec<(String, u64)>) {
        expected.sort();
        let began = Instant::now();
        loop {
            let mut got = self.search(user, query).await;
            got.sort();
            if got == expected {
                return;
            }
            assert!(began.elapsed() < WAIT, "search {query} for {user}: got {got:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll the user's channel list until it names `expected` (a node follows a shared log).
    async fn channels_until(&self, user: &str, expected: &[&str]) {
        let began = Instant::now();
        loop {
            let body = self.ok(reqwest::Method::GET, &format!("/v1/chat/channels?user={user}"), None).await;
            let got: Vec<&str> = body["channels"].as_array().unwrap().iter().filter_map(|c| c["id"].as_str()).collect();
            if got == expected {
                return;
            }
            assert!(began.elapsed() < WAIT, "channels of {user}: got {got:?}, expected {expected:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ws(&self, user: &str, since: Option<Value>) -> Ws {
        let mut url = format!("{}/v1/chat/ws?user={user}", self.ws_base);
        if let Some(since) = since {
            url.push_str(&format!("&since={}", urlencode(&since.to_string())));
        }
        let (stream, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut ws = Ws { stream, pending: Vec::new() };
        let hello = ws.next().await;
        assert!(hello.get("connected").is_some(), "{hello}");
        ws
    }
}

fn urlencode(text: &str) -> String {
    text.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws {
    stream: WsStream,
    /// Non-event messages read while waiting for events.
    pending: Vec<Value>,
}

impl Ws {
    async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(WAIT, self.stream.next()).await.expect("a frame in time").expect("open").unwrap();
            if let WsMessage::Text(text) = frame {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    async fn send(&mut self, value: Value) {
        self.stream.send(WsMessage::Text(value.to_string().into())).await.unwrap();
    }

    /// The next `n` events (other messages are kept in `pending`), as `(channel, seq, kind)`.
    async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let message = self.next().await;
            match message["events"].as_array() {
                Some(events) => out.extend(events.iter().cloned()),
                None => self.pending.push(message),
            }
        }
        assert_eq!(out.len(), n, "more events than expected: {out:?}");
        out
    }

    /// The next message that has `key` (events and others before it are dropped).
    async fn message_with(&mut self, key: &str) -> Value {
        if let Some(i) = self.pending.iter().position(|m| m.get(key).is_some()) {
            return self.pending.remove(i);
        }
        loop {
            let message = self.next().await;
            if message.get(key).is_some() {
                return message;
            }
        }
    }

    /// Nothing arrives within a short while.
    async fn quiet(&mut self) {
        if let Ok(Some(Ok(WsMessage::Text(text)))) = tokio::time::timeout(Duration::from_millis(300), self.stream.next()).await {
            panic!("expected nothing more, got {text}");
        }
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

fn texts(page: &Value) -> Vec<String> {
    page["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap_or("<deleted>").to_string()).collect()
}

on_both!(messages_arrive_live_in_seq_order_and_history_pages_by_cursor);
async fn messages_arrive_live_in_seq_order_and_history_pages_by_cursor(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    let mut bob = app.ws("bob", None).await;
    // Concurrent senders: seqs are gapless and the live order is the seq order.
    let mut sends = Vec::new();
    for i in 0..40 {
        let (client, base) = (app.client.clone(), app.base.clone());
        let user = if i % 2 == 0 { "ann" } else { "bob" };
        sends.push(tokio::spawn(async move {
            let response = client.post(format!("{base}/v1/chat/channels/general/messages?user={user}")).json(&json!({"text": format!("m{i}")})).send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.json::<Value>().await.unwrap()["seq"].as_u64().unwrap()
        }));
    }
    let mut acked: Vec<u64> = Vec::new();
    for send in sends {
        acked.push(send.await.unwrap());
    }
    acked.sort();
    assert_eq!(acked, (2..=41).collect::<Vec<u64>>(), "seq 1 is the channel's creation; then one seq per message, no gap");
    let live = bob.events(40).await;
    assert_eq!(seqs(&live), (2..=41).collect::<Vec<u64>>(), "delivered in seq order");
    assert!(live.iter().all(|e| e["kind"] == "message" && e["channel"] == "general"));

    // History: the latest page, then older ones by `before`, then newer by `after`.
    let latest = app.history("bob", "general", "limit=15").await;
    let page: Vec<u64> = latest["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(page, (27..=41).collect::<Vec<u64>>());
    assert_eq!((latest["more"].as_bool(), latest["last_seq"].as_u64()), (Some(true), Some(41)));
    let mut all = page.clone();
    let mut before = page[0];
    loop {
        let older = app.history("bob", "general", &format!("before={before}&limit=15")).await;
        let page: Vec<u64> = older["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        all.splice(0..0, page.iter().copied());
        if !older["more"].as_bool().unwrap() {
            break;
        }
        before = page[0];
    }
    assert_eq!(all, (2..=41).collect::<Vec<u64>>(), "paging back covers every message once");
    let newer = app.history("bob", "general", "after=38").await;
    assert_eq!(texts(&newer).len(), 3);
    assert_eq!(newer["more"], false);
    app.stop().await;
}

on_both!(a_reconnect_with_since_gets_exactly_the_missed_events_then_live);
async fn a_reconnect_with_since_gets_exactly_the_missed_events_then_live(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    app.channel("ann", "random", "private", &["bob"]).await;
    let mut bob = app.ws("bob", Some(json!({"general": 0, "random": 0}))).await;
    let created = bob.events(2).await;
    assert!(created.iter().all(|e| e["kind"] == "created" && e["seq"] == 1), "since 0 replays from the start: {created:?}");
    let s2 = app.send("ann", "general", "before the drop").await;
    let got = bob.events(1).await;
    assert_eq!(got[0]["seq"], s2);
    drop(bob);

    // While bob is away: messages in both channels, an edit and a delete.
    let s3 = app.send("ann", "general", "missed one").await;
    let s4 = app.send("ann", "general", "missed two").await;
    app.ok(reqwest::Method::PATCH, &format!("/v1/chat/channels/general/messages/{s3}?user=ann"), Some(json!({"text": "missed one (edited)"}))).await;
    app.ok(reqwest::Method::DELETE, &format!("/v1/chat/channels/general/messages/{s4}?user=ann"), None).await;
    app.send("bob", "random", "r2").await;

    let mut bob = app.ws("bob", Some(json!({"general": s2, "random": 1}))).await;
    let missed = bob.events(5).await;
    let general: Vec<(u64, String)> = missed.iter().filter(|e| e["channel"] == "general").map(|e| (e["seq"].as_u64().unwrap(), e["kind"].as_str().unwrap().to_string())).collect();
    assert_eq!(general, vec![(3, "message".into()), (4, "message".into()), (5, "edited".into()), (6, "deleted".into())]);
    let random: Vec<u64> = missed.iter().filter(|e| e["channel"] == "random").map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(random, vec![2]);
    assert_eq!(missed.iter().find(|e| e["seq"] == 5 && e["channel"] == "general").unwrap()["target"], s3);
    bob.quiet().await;
    // Then live, with no gap and no duplicate.
    let s7 = app.send("ann", "general", "live again").await;
    assert_eq!(seqs(&bob.events(1).await), vec![s7]);
    bob.quiet().await;

    // A connection that names nothing starts live; one naming a channel it is not in is told.
    let (status, _) = app.post("/v1/chat/channels?user=cy", json!({"id": "other", "visibility": "private"})).await;
    assert_eq!(status, 201);
    let (stream, _) = tokio_tungstenite::connect_async(format!("{}/v1/chat/ws?user=bob&since={}", app.ws_base, urlencode(r#"{"other":0}"#))).await.unwrap();
    let mut again = Ws { stream, pending: Vec::new() };
    let hello = again.next().await;
    assert_eq!(hello["connected"]["ignored"], json!(["other"]));
    assert_eq!(hello["connected"]["channels"].as_array().unwrap().len(), 2);
    app.stop().await;
}

on_both!(a_restart_keeps_every_acknowledged_event_and_sync_continues_across_it);
async fn a_restart_keeps_every_acknowledged_event_and_sync_continues_across_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    let dm = app.ok(reqwest::Method::POST, "/v1/chat/dms?user=ann", Some(json!({"with": "bob"}))).await;
    let dm = dm["id"].as_str().unwrap().to_string();
    let mut last = 0;
    for i in 0..30 {
        last = app.send("ann", "general", &format!("before restart {i}")).await;
    }
    app.send("bob", &dm, "secret plans").await;
    app.ok(reqwest::Method::PUT, "/v1/chat/channels/general/read?user=bob", Some(json!({"seq": 11}))).await;
    app.stop().await;

    let app = App::start(dir.path(), &backend).await;
    let history = app.history("bob", "general", "limit=200").await;
    assert_eq!(texts(&history).len(), 30, "every acknowledged message is back");
    assert_eq!(history["last_seq"], last);
    let channels = app.ok(reqwest::Method::GET, "/v1/chat/channels?user=bob", None).await;
    let general = channels["channels"].as_array().unwrap().iter().find(|c| c["id"] == "general").unwrap().clone();
    assert_eq!((general["read_seq"].as_u64(), general["unread"].as_u64()), (Some(11), Some(last - 11)), "read markers survive: {general}");
    // Sync across the restart: bob had seen up to seq 20 of general.
    let mut bob = app.ws("bob", Some(json!({"general": 20}))).await;
    assert_eq!(seqs(&bob.events((last - 20) as usize).await), (21..=last).collect::<Vec<u64>>());
    let next = app.send("ann", "general", "after restart").await;
    assert_eq!(next, last + 1, "the sequence continues without a gap");
    assert_eq!(seqs(&bob.events(1).await), vec![next]);
    // Search was rebuilt from its checkpoint and the log.
    app.search_until("bob", "q=secret", vec![(dm.clone(), 2)]).await;
    app.search_until("bob", "q=restart&limit=100", (2..=last).map(|s| ("general".to_string(), s)).chain([("general".to_string(), next)]).collect()).await;
    drop(bob);
    app.stop().await;
}

on_both!(edits_and_deletes_show_in_history_sync_and_search);
async fn edits_and_deletes_show_in_history_sync_and_search(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    let typo = app.send("ann", "general", "the deploy is tomorow").await;
    let gone = app.send("ann", "general", "the password is hunter2").await;
    app.search_until("bob", "q=deploy", vec![("general".into(), typo)]).await;
    app.search_until("bob", "q=hunter2", vec![("general".into(), gone)]).await;

    let mut bob = app.ws("bob", None).await;
    let (status, body) = app.call(reqwest::Method::PATCH, &format!("/v1/chat/channels/general/messages/{typo}?user=bob"), Some(json!({"text": "hijacked"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "only the author edits");
    app.ok(reqwest::Method::PATCH, &format!("/v1/chat/channels/general/messages/{typo}?user=ann"), Some(json!({"text": "the rollout is tomorrow"}))).await;
    app.ok(reqwest::Method::DELETE, &format!("/v1/chat/channels/general/messages/{gone}?user=ann"), None).await;
    let events = bob.events(2).await;
    assert_eq!((events[0]["kind"].as_str(), events[0]["target"].as_u64(), events[0]["text"].as_str()), (Some("edited"), Some(typo), Some("the rollout is tomorrow")));
    assert_eq!((events[1]["kind"].as_str(), events[1]["target"].as_u64()), (Some("deleted"), Some(gone)));

    let history = app.history("bob", "general", "").await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages[0]["text"], "the rollout is tomorrow");
    assert!(messages[0]["edited_ts"].is_i64());
    assert_eq!((messages[1]["deleted"].as_bool(), messages[1]["text"].is_null()), (Some(true), true));
    // Search sees the new words, not the old ones, and not the deleted message.
    app.search_until("bob", "q=rollout", vec![("general".into(), typo)]).await;
    app.search_until("bob", "q=deploy", vec![]).await;
    app.search_until("bob", "q=hunter2", vec![]).await;
    // A deleted message can be neither edited nor deleted again.
    for (method, body) in [(reqwest::Method::PATCH, Some(json!({"text": "back"}))), (reqwest::Method::DELETE, None)] {
        let (status, _) = app.call(method, &format!("/v1/chat/channels/general/messages/{gone}?user=ann"), body).await;
        assert_eq!(status, 404);
    }
    let (status, _) = app.call(reqwest::Method::DELETE, "/v1/chat/channels/general/messages/999?user=ann", None).await;
    assert_eq!(status, 404);
    app.stop().await;
}

on_both!(search_finds_words_only_in_the_channels_of_the_user);
async fn search_finds_words_only_in_the_channels_of_the_user(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob", "cy"]).await;
    app.channel("ann", "board", "private", &[]).await;
    let public = app.send("ann", "general", "Quarterly numbers look great").await;
    let private = app.send("ann", "board", "quarterly numbers are secret").await;
    let dm = app.ok(reqwest::Method::POST, "/v1/chat/dms?user=bob", Some(json!({"with": "cy"}))).await["id"].as_str().unwrap().to_string();
    let in_dm = app.send("bob", &dm, "quarterly bonus?").await;

    app.search_until("ann", "q=quarterly", vec![("general".into(), public), ("board".into(), private)]).await;
    app.search_until("bob", "q=quarterly", vec![("general".into(), public), (dm.clone(), in_dm)]).await;
    app.search_until("cy", "q=QUARTERLY+numbers", vec![("general".into(), public)]).await;
    app.search_until("ann", "q=quarterly&channel=board", vec![("board".into(), private)]).await;
    app.search_until("dan", "q=quarterly", vec![]).await;
    let (status, _) = app.get("/v1/chat/search?user=bob&q=quarterly&channel=board").await;
    assert_eq!(status, 403, "a channel the user is not in cannot be searched");
    // Pages.
    for i in 0..12 {
        app.send("cy", "general", &format!("standup note {i}")).await;
    }
    app.search_until("cy", "q=standup&limit=100", (0..12).map(|i| ("general".to_string(), public + 1 + i)).collect()).await;
    let first = app.ok(reqwest::Method::GET, "/v1/chat/search?user=cy&q=standup&limit=5", None).await;
    let third = app.ok(reqwest::Method::GET, "/v1/chat/search?user=cy&q=standup&limit=5&offset=10", None).await;
    assert_eq!((first["total"].as_u64(), first["messages"].as_array().unwrap().len(), third["messages"].as_array().unwrap().len()), (Some(12), 5, 2));
    for bad in ["/v1/chat/search?user=cy", "/v1/chat/search?user=cy&q=x&limit=0", "/v1/chat/search?user=cy&q=x&limit=101", "/v1/chat/search?q=x"] {
        let (status, body) = app.get(bad).await;
        assert!(status == 400 || status == 413, "{bad}: {status} {body}");
        assert!(body["error"]["message"].is_string());
    }
    app.stop().await;
}

on_both!(read_markers_move_forward_and_give_unread_counts);
async fn read_markers_move_forward_and_give_unread_counts(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    let mut last = 0;
    for i in 0..5 {
        last = app.send("ann", "general", &format!("m{i}")).await;
    }
    app.send("bob", "general", "my own message is never unread").await;
    let unread = |body: &Value| body["channels"].as_array().unwrap().iter().find(|c| c["id"] == "general").unwrap()["unread"].as_u64().unwrap();
    assert_eq!(unread(&app.ok(reqwest::Method::GET, "/v1/chat/channels?user=bob", None).await), 5);
    let mut other_tab = app.ws("bob", None).await;
    let read = app.ok(reqwest::Method::PUT, "/v1/chat/channels/general/read?user=bob", Some(json!({"seq": last - 2}))).await;
    assert_eq!((read["read_seq"].as_u64(), read["unread"].as_u64()), (Some(last - 2), Some(2)));
    let told = other_tab.message_with("read").await;
    assert_eq!(told["read"]["unread"], 2, "the user's other connections learn the new marker");
    // Markers never move back; one past the end is refused.
    let back = app.ok(reqwest::Method::PUT, "/v1/chat/channels/general/read?user=bob", Some(json!({"seq": 1}))).await;
    assert_eq!(back["read_seq"].as_u64(), Some(last - 2));
    let (status, _) = app.call(reqwest::Method::PUT, "/v1/chat/channels/general/read?user=bob", Some(json!({"seq": 999}))).await;
    assert_eq!(status, 400);
    let (status, _) = app.call(reqwest::Method::PUT, "/v1/chat/channels/general/read?user=zed", Some(json!({"seq": 1}))).await;
    assert_eq!(status, 403);
    // Over the WebSocket too; a deleted message stops being unread.
    other_tab.send(json!({"read": {"channel": "general", "seq": last - 1}})).await;
    assert_eq!(other_tab.message_with("read").await["read"]["unread"], 1);
    app.ok(reqwest::Method::DELETE, &format!("/v1/chat/channels/general/messages/{last}?user=ann"), None).await;
    assert_eq!(unread(&app.ok(reqwest::Method::GET, "/v1/chat/channels?user=bob", None).await), 0);
    app.stop().await;
}

on_both!(presence_and_typing_reach_the_other_members_and_typing_is_rate_limited);
async fn presence_and_typing_reach_the_other_members_and_typing_is_rate_limited(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    app.channel("cy", "elsewhere", "public", &[]).await;
    let mut ann = app.ws("ann", None).await;
    let mut cy = app.ws("cy", None).await;
    let bob = app.ws("bob", None).await;
    let joined = ann.message_with("presence").await;
    assert_eq!(joined["presence"], json!({"channel": "general", "user": "bob", "event": "join"}));
    let presence = app.ok(reqwest::Method::GET, "/v1/chat/channels/general/presence?user=ann", None).await;
    let online: Vec<&str> = presence["members"].as_array().unwrap().iter().map(|m| m["user"].as_str().unwrap()).collect();
    assert_eq!(online, vec!["ann", "bob"]);
    drop(bob);
    let left = ann.message_with("presence").await;
    assert_eq!(left["presence"], json!({"channel": "general", "user": "bob", "event": "leave"}));

    let mut bob = app.ws("bob", None).await;
    ann.message_with("presence").await;
    ann.send(json!({"typing": {"channel": "general"}})).await;
    assert_eq!(bob.message_with("typing").await["typing"], json!({"channel": "general", "user": "ann"}));
    // A second indicator within TYPING_INTERVAL_MS_MIN is refused, over HTTP with 429.
    let (status, body) = app.post("/v1/chat/channels/general/typing?user=ann", json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")));
    let (status, _) = app.post("/v1/chat/channels/general/typing?user=bob", json!({})).await;
    assert_eq!(status, 204);
    assert_eq!(ann.message_with("typing").await["typing"]["user"], "bob");
    // Not to non-members, and never stored: a later sync has no typing in it.
    cy.quiet().await;
    let (status, _) = app.post("/v1/chat/channels/general/typing?user=cy", json!({})).await;
    assert_eq!(status, 403);
    let history = app.history("ann", "general", "").await;
    assert_eq!(history["last_seq"], 1, "only the creation is in the sequence");
    app.stop().await;
}

on_both!(direct_messages_have_one_id_for_both_users_and_stay_private);
async fn direct_messages_have_one_id_for_both_users_and_stay_private(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    let a = app.ok(reqwest::Method::POST, "/v1/chat/dms?user=bob", Some(json!({"with": "ann"}))).await;
    let b = app.ok(reqwest::Method::POST, "/v1/chat/dms?user=ann", Some(json!({"with": "bob"}))).await;
    assert_eq!(a["id"], "dm:ann:bob");
    assert_eq!(b["id"], "dm:ann:bob");
    assert_eq!(b["last_seq"], 1, "opening it again appends nothing");
    let mut ann = app.ws("ann", None).await;
    let seq = app.send("bob", "dm:ann:bob", "hi ann").await;
    assert_eq!(ann.events(1).await[0]["text"], "hi ann");
    assert_eq!(seq, 2);
    let (status, _) = app.post("/v1/chat/channels/dm:ann:bob/messages?user=cy", json!({"text": "let me in"})).await;
    assert_eq!(status, 403);
    let (status, _) = app.get("/v1/chat/channels/dm:ann:bob/messages?user=cy").await;
    assert_eq!(status, 403);
    let (status, _) = app.get("/v1/chat/channels/dm:ann:bob?user=cy").await;
    assert_eq!(status, 404, "a private channel is not shown to others");
    let (status, _) = app.post("/v1/chat/channels/dm:ann:bob/members?user=ann", json!({"add": ["cy"]})).await;
    assert_eq!(status, 403);
    let (status, _) = app.post("/v1/chat/dms?user=ann", json!({"with": "ann"})).await;
    assert_eq!(status, 400);
    // A private channel: only members add members; a public one anyone may join.
    app.channel("ann", "team", "private", &[]).await;
    let (status, _) = app.post("/v1/chat/channels/team/members?user=cy", json!({"add": ["cy"]})).await;
    assert_eq!(status, 403);
    app.ok(reqwest::Method::POST, "/v1/chat/channels/team/members?user=ann", Some(json!({"add": ["cy"]}))).await;
    app.channel("ann", "lobby", "public", &[]).await;
    let joined = app.ok(reqwest::Method::POST, "/v1/chat/channels/lobby/members?user=dan", Some(json!({"add": ["dan"]}))).await;
    assert_eq!(joined["member_ids"], json!(["ann", "dan"]));
    let left = app.ok(reqwest::Method::POST, "/v1/chat/channels/lobby/members?user=dan", Some(json!({"remove": ["dan"]}))).await;
    assert_eq!(left["member_ids"], json!(["ann"]));
    let (status, _) = app.post("/v1/chat/channels/lobby/messages?user=dan", json!({"text": "still here?"})).await;
    assert_eq!(status, 403, "a user who left no longer sends");
    app.stop().await;
}

on_both!(a_repeated_client_id_appends_once_and_sends_over_the_websocket_are_acknowledged);
async fn a_repeated_client_id_appends_once_and_sends_over_the_websocket_are_acknowledged(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    let first = app.post("/v1/chat/channels/general/messages?user=ann", json!({"text": "once", "client_id": "c-1"})).await;
    let again = app.post("/v1/chat/channels/general/messages?user=ann", json!({"text": "once", "client_id": "c-1"})).await;
    assert_eq!((first.0, again.0), (201, 201));
    assert_eq!(first.1["seq"], again.1["seq"]);
    assert_eq!((first.1["duplicate"].as_bool(), again.1["duplicate"].as_bool()), (Some(false), Some(true)));
    // The same client id from another user is another message.
    let other = app.post("/v1/chat/channels/general/messages?user=bob", json!({"text": "mine", "client_id": "c-1"})).await;
    assert_eq!(other.1["duplicate"], false);
    let mut ann = app.ws("ann", None).await;
    ann.send(json!({"send": {"channel": "general", "text": "over the socket", "client_id": "c-2"}})).await;
    let ack = ann.message_with("ack").await;
    assert_eq!((ack["ack"]["seq"].as_u64(), ack["ack"]["client_id"].as_str()), (Some(4), Some("c-2")));
    ann.send(json!({"send": {"channel": "nowhere", "text": "x", "client_id": "c-3"}})).await;
    let error = ann.message_with("error").await;
    assert_eq!((error["error"]["code"].as_str(), error["error"]["client_id"].as_str()), (Some("not_found"), Some("c-3")));
    ann.send(json!({"hello": 1})).await;
    assert_eq!(ann.message_with("error").await["error"]["code"], "bad_request");
    assert_eq!(texts(&app.history("ann", "general", "").await), vec!["once", "mine", "over the socket"]);
    // Many at once: all or nothing.
    let batch: Vec<Value> = (0..3).map(|i| json!({"channel": "general", "user": "bob", "text": format!("b{i}")})).collect();
    let sent = app.ok(reqwest::Method::POST, "/v1/chat/messages", Some(json!({"messages": batch}))).await;
    assert_eq!(sent["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![5, 6, 7]);
    let mixed = json!({"messages": [{"channel": "general", "user": "bob", "text": "fine"}, {"channel": "general", "user": "zed", "text": "not a member"}]});
    let (status, body) = app.post("/v1/chat/messages", mixed).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(app.history("ann", "general", "").await["last_seq"], 7, "nothing of a refused batch was appended");
    app.stop().await;
}

on_both!(limits_and_bad_input_get_clear_errors_and_lose_nothing);
async fn limits_and_bad_input_get_clear_errors_and_lose_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &[]).await;
    let kept = app.send("ann", "general", "accepted before the bad requests").await;
    let too_many: Vec<String> = (0..CHANNEL_MEMBERS_MAX).map(|i| format!("u{i}")).collect();
    let too_long = "x".repeat(MESSAGE_TEXT_BYTES_MAX + 1);
    let batch: Vec<Value> = (0..=SEND_BATCH_MAX).map(|_| json!({"channel": "general", "user": "ann", "text": "x"})).collect();
    let cases: Vec<(reqwest::Method, String, Option<Value>, u16)> = vec![
        (reqwest::Method::POST, "/v1/chat/channels/general/messages?user=ann".into(), Some(json!({"text": too_long})), 413),
        (reqwest::Method::POST, "/v1/chat/channels/general/messages?user=ann".into(), Some(json!({"text": "   "})), 400),
        (reqwest::Method::POST, "/v1/chat/channels/general/messages?user=ann".into(), Some(json!({"text": "x", "client_id": "c".repeat(65)})), 400),
        (reqwest::Method::POST, "/v1/chat/channels/general/messages?user=ann".into(), Some(json!({"txt": "typo"})), 400),
        (reqwest::Method::POST, "/v1/chat/channels/general/messages".into(), Some(json!({"text": "who am i"})), 400),
        (reqwest::Method::POST, "/v1/chat/channels/general/messages?user=bad%20user".into(), Some(json!({"text": "x"})), 400),
        (reqwest::Method::POST, "/v1/chat/channels/no%20such/messages?user=ann".into(), Some(json!({"text": "x"})), 400),
        (reqwest::Method::POST, "/v1/chat/channels/missing/messages?user=ann".into(), Some(json!({"text": "x"})), 404),
        (reqwest::Method::POST, "/v1/chat/channels?user=ann".into(), Some(json!({"id": "general", "visibility": "public"})), 409),
        (reqwest::Method::POST, "/v1/chat/channels?user=ann".into(), Some(json!({"id": "big", "visibility": "public", "members": too_many})), 413),
        (reqwest::Method::POST, "/v1/chat/channels?user=ann".into(), Some(json!({"id": "x", "visibility": "direct"})), 400),
        (reqwest::Method::POST, "/v1/chat/channels?user=ann".into(), Some(json!({"id": "dm:a:b", "visibility": "public"})), 400),
        (reqwest::Method::POST, "/v1/chat/messages".into(), Some(json!({"messages": batch})), 413),
        (reqwest::Method::POST, "/v1/chat/messages".into(), Some(json!({"messages": []})), 400),
        (reqwest::Method::GET, format!("/v1/chat/channels/general/messages?user=ann&limit={}", HISTORY_PAGE_MAX + 1), None, 413),
        (reqwest::Method::GET, "/v1/chat/channels/general/messages?user=ann&limit=0".into(), None, 400),
        (reqwest::Method::PATCH, "/v1/chat/channels/general/messages/1?user=ann".into(), Some(json!({"text": "edit the creation"})), 404),
    ];
    for (method, path, body, expected) in cases {
        let (status, reply) = app.call(method.clone(), &path, body).await;
        assert_eq!(status, expected, "{method} {path}: {reply}");
        assert!(reply["error"]["code"].is_string() && reply["error"]["message"].is_string(), "{method} {path}: a JSON error, got {reply}");
    }
    match tokio_tungstenite::connect_async(format!("{}/v1/chat/ws?user=ann&since=general:4", app.ws_base)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 400);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert!(body["error"]["message"].as_str().unwrap().contains("since"), "{body}");
        }
        other => panic!("a bad since must be refused at the handshake, got {:?}", other.map(|_| ())),
    }
    let history = app.history("ann", "general", "").await;
    assert_eq!(texts(&history), vec!["accepted before the bad requests"]);
    assert_eq!(history["last_seq"], kept, "no refused request appended anything");
    app.stop().await;
}

on_both!(the_sse_fallback_syncs_from_since_and_then_goes_live);
async fn the_sse_fallback_syncs_from_since_and_then_goes_live(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &backend).await;
    app.channel("ann", "general", "public", &["bob"]).await;
    let s2 = app.send("ann", "general", "one").await;
    app.send("ann", "general", "two").await;
    let since = urlencode(&json!({"general": s2}).to_string());
    let response = app.client.get(format!("{}/v1/chat/events?user=bob&since={since}", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events: Vec<Value> = Vec::new();
    let mut sent_live = false;
    let mut sent_three = false;
    while events.len() < 2 {
        let chunk = tokio::time::timeout(WAIT, body.next()).await.expect("an SSE chunk in time").unwrap().unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    let value: Value = serde_json::from_str(data.trim()).unwrap();
                    if value.get("connected").is_some() && !sent_live {
                        sent_live = true;
                    }
                    if let Some(list) = value["events"].as_array() {
                        events.extend(list.iter().cloned());
                    }
                }
            }
        }
        if sent_live && events.len() == 1 && !sent_three {
            sent_three = true;
            app.send("ann", "general", "three").await;
        }
    }
    assert_eq!(events.iter().map(|e| e["text"].as_str().unwrap()).collect::<Vec<_>>(), vec!["two", "three"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_is_served_and_loads_nothing_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(dir.path(), &Backend::Embedded).await;
    let response = app.client.get(format!("{}/chat", app.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let page = response.text().await.unwrap();
    assert!(page.contains("/v1/chat/ws"));
    for external in ["https://", "src=\"http", "href=\"http", "@import"] {
        assert!(!page.contains(external), "the page must work offline: found {external}");
    }
    let status = app.system.status();
    assert_eq!(status["channels"], 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_shared_log_sequence_and_serve_every_channel_alike() {
    let backend = Backend::nats();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = App::start(dir_a.path(), &backend).await;
    let b = App::start(dir_b.path(), &backend).await;
    a.channel("ann", "general", "public", &["bob"]).await;
    // Bob connects to b once b has read the channel's creation; before that, the creation (seq 1)
    // is a live event of his connection like any other.
    b.channels_until("bob", &["general"]).await;
    let mut ann_on_a = a.ws("ann", None).await;
    let mut bob_on_b = b.ws("bob", None).await;

    // Concurrent sends through both nodes: one gapless sequence, delivered in it on both.
    let mut sends = Vec::new();
    for i in 0..40 {
        let (client, base) = if i % 2 == 0 { (a.client.clone(), a.base.clone()) } else { (b.client.clone(), b.base.clone()) };
        let user = if i % 3 == 0 { "ann" } else { "bob" };
        sends.push(tokio::spawn(async move {
            let response = client.post(format!("{base}/v1/chat/channels/general/messages?user={user}")).json(&json!({"text": format!("m{i}")})).send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.json::<Value>().await.unwrap()["seq"].as_u64().unwrap()
        }));
    }
    let mut acked = Vec::new();
    for send in sends {
        acked.push(send.await.unwrap());
    }
    acked.sort();
    assert_eq!(acked, (2..=41).collect::<Vec<u64>>(), "one sequence across nodes, no gap, no seq twice");
    let on_a = ann_on_a.events(40).await;
    let on_b = bob_on_b.events(40).await;
    assert_eq!(seqs(&on_a), (2..=41).collect::<Vec<u64>>());
    assert_eq!(on_a, on_b, "both nodes deliver the same events, byte for byte");
    assert_eq!(a.history("ann", "general", "limit=200").await["messages"], b.history("ann", "general", "limit=200").await["messages"]);

    // A client id repeated through the other node is the same message.
    let first = a.post("/v1/chat/channels/general/messages?user=ann", json!({"text": "once", "client_id": "c-1"})).await;
    let again = b.post("/v1/chat/channels/general/messages?user=ann", json!({"text": "once", "client_id": "c-1"})).await;
    assert_eq!((first.0, again.0), (201, 201));
    assert_eq!((first.1["seq"].as_u64(), again.1["duplicate"].as_bool()), (again.1["seq"].as_u64(), Some(true)));
    assert_eq!(seqs(&bob_on_b.events(1).await), vec![42]);

    // A proposal that is invalid where it lands in the log is refused by every node alike: a
    // non-member's send appended straight to the log changes nothing, and the sequence goes on.
    let Backend::Nats(namespace) = &backend else { unreachable!() };
    let streams = tributary_nats::NatsStreams::connect(&crate::test_support::nats_url(), namespace).await.unwrap();
    let proposal = json!([{"channel": "general", "seq": 0, "user": "mallory", "ts": 1, "kind": "message", "text": "not a member"}]);
    let record = tributary_core::Record::keyed(bytes::Bytes::from_static(b"general"), proposal.to_string());
    tributary_engine::stream::StreamStore::produce(&streams, super::EVENTS_TOPIC, vec![record]).await.unwrap();
    let after = b.send("bob", "general", "after the refused one").await;
    assert_eq!(after, 43);
    assert_eq!(seqs(&ann_on_a.events(2).await), vec![42, 43]);
    assert_eq!(seqs(&bob_on_b.events(1).await), vec![43]);
    for node in [&a, &b] {
        let history = node.history("ann", "general", "after=41").await;
        assert_eq!(texts(&history), vec!["once", "after the refused one"]);
    }

    // Membership changed through one node holds on the other.
    a.channel("ann", "lobby", "public", &["dan"]).await;
    a.ok(reqwest::Method::POST, "/v1/chat/channels/lobby/members?user=dan", Some(json!({"remove": ["dan"]}))).await;
    let (status, body) = b.post("/v1/chat/channels/lobby/messages?user=dan", json!({"text": "still here?"})).await;
    assert_eq!(status, 403, "{body}");

    // Typing and read markers reach the user's connections on the other node, and the typing
    // rate limit holds across nodes; search on one node finds what was sent through the other.
    ann_on_a.send(json!({"typing": {"channel": "general"}})).await;
    assert_eq!(bob_on_b.message_with("typing").await["typing"], json!({"channel": "general", "user": "ann"}));
    // Node b has read ann's indicator: a second one through b within TYPING_INTERVAL_MS_MIN is
    // refused there too.
    let (status, body) = b.post("/v1/chat/channels/general/typing?user=ann", json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")), "{body}");
    let read = a.ok(reqwest::Method::PUT, "/v1/chat/channels/general/read?user=bob", Some(json!({"seq": 40}))).await;
    assert_eq!(read["read_seq"], 40);
    assert_eq!(bob_on_b.message_with("read").await["read"]["seq"], 40);
    let channels = b.ok(reqwest::Method::GET, "/v1/chat/channels?user=bob", None).await;
    assert_eq!(channels["channels"][0]["read_seq"], 40);
    b.search_until("bob", "q=refused", vec![("general".into(), 43)]).await;
    a.search_until("bob", "q=refused", vec![("general".into(), 43)]).await;

    drop((ann_on_a, bob_on_b));
    a.stop().await;
    b.stop().await;
    backend.forget().await;
}
