//! The WebSocket/SSE gateway over real connections: heartbeats, idle peers, credit flow
//! control, malformed frames, the connection limit and the per-system counts.

mod common;

use std::time::Duration;

use common::{INITIAL_CREDIT, TestServer, eventually};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tributary_server::{Gateway, ServerConfig};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const LONG: Duration = Duration::from_secs(60);

async fn server_with(gateway: Gateway) -> TestServer {
    TestServer::start(ServerConfig::default(), gateway).await
}

async fn connect(server: &TestServer, path: &str) -> Ws {
    connect_async(server.ws_url(path)).await.expect("the WebSocket opens").0
}

/// The next text frame as JSON, skipping pings and pongs; `None` if nothing comes within `wait`.
async fn next_json(ws: &mut Ws, wait: Duration) -> Option<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next()).await.ok()?;
        match frame.expect("the connection stays open").expect("a good frame") {
            Message::Text(text) => return Some(serde_json::from_str(&text).expect("JSON text frames")),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send_json(ws: &mut Ws, value: serde_json::Value) {
    ws.send(Message::Text(value.to_string().into())).await.unwrap();
}

fn test_connections(gateway: &Gateway) -> usize {
    gateway.stats().by_system.get("test").copied().unwrap_or(0)
}

#[tokio::test]
async fn websocket_peers_get_pinged_at_the_heartbeat_interval() {
    let server = server_with(Gateway::new(16, Duration::from_millis(100), LONG)).await;
    let mut ws = connect(&server, "/v1/test/ws/echo").await;
    let started = tokio::time::Instant::now();
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("a frame within 5 s").unwrap().unwrap();
    assert!(matches!(frame, Message::Ping(_)), "{frame:?}");
    assert!(started.elapsed() >= Duration::from_millis(50), "the first ping waits a heartbeat");
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("another frame").unwrap().unwrap();
    assert!(matches!(frame, Message::Ping(_)), "{frame:?}");
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_idle_timeout() {
    let server = server_with(Gateway::new(16, LONG, Duration::from_millis(300))).await;
    let mut ws = connect(&server, "/v1/test/ws/echo").await;
    eventually(|| test_connections(&server.gateway) == 1, "the connection to count").await;
    // Say nothing; the gateway closes the connection and stops counting it.
    eventually(|| test_connections(&server.gateway) == 0, "the idle connection to be dropped").await;
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the connection ends");
    match end {
        Some(Ok(Message::Close(_))) | None => {}
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_keeps_talking_is_not_idle() {
    let server = server_with(Gateway::new(16, LONG, Duration::from_millis(400))).await;
    let mut ws = connect(&server, "/v1/test/ws/echo").await;
    for n in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        send_json(&mut ws, serde_json::json!({"n": n})).await;
        assert_eq!(next_json(&mut ws, Duration::from_secs(5)).await, Some(serde_json::json!({"echo": {"n": n}})));
    }
}

#[tokio::test]
async fn with_credit_the_server_sends_only_as_many_data_messages_as_granted() {
    let server = server_with(Gateway::new(16, LONG, LONG)).await;
    let mut ws = connect(&server, "/v1/test/ws/data").await;
    let mut received = Vec::new();
    while let Some(message) = next_json(&mut ws, Duration::from_millis(300)).await {
        received.push(message["data"].as_u64().unwrap());
    }
    assert_eq!(received.len(), INITIAL_CREDIT, "the initial credit, no more: {received:?}");
    send_json(&mut ws, serde_json::json!({"credit": 3})).await;
    while let Some(message) = next_json(&mut ws, Duration::from_millis(300)).await {
        received.push(message["data"].as_u64().unwrap());
    }
    assert_eq!(received, vec![0, 1, 2, 3, 4], "three more after granting three, in order");
}

#[tokio::test]
async fn a_malformed_frame_gets_an_error_frame_and_the_connection_stays_open() {
    let server = server_with(Gateway::new(16, LONG, LONG)).await;
    let mut ws = connect(&server, "/v1/test/ws/echo").await;
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let reply = next_json(&mut ws, Duration::from_secs(5)).await.expect("an error frame");
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("malformed JSON"), "{reply}");
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    let reply = next_json(&mut ws, Duration::from_secs(5)).await.expect("an error frame");
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    send_json(&mut ws, serde_json::json!({"still": "here"})).await;
    assert_eq!(next_json(&mut ws, Duration::from_secs(5)).await, Some(serde_json::json!({"echo": {"still": "here"}})));
}

#[tokio::test]
async fn past_the_connection_limit_a_websocket_is_refused_with_503() {
    let server = server_with(Gateway::new(1, LONG, LONG)).await;
    let _first = connect(&server, "/v1/test/ws/echo").await;
    match connect_async(server.ws_url("/v1/test/ws/echo")).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 503);
            assert!(response.headers().contains_key("retry-after"));
            let body: serde_json::Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "overloaded", "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // An SSE stream counts against the same limit.
    let response = reqwest::get(server.url("/v1/test/sse")).await.unwrap();
    assert_eq!(response.status(), 503);
    let stats = server.gateway.stats();
    assert_eq!((stats.connections, stats.by_system.get("test").copied()), (1, Some(1)), "refusals are not counted: {stats:?}");
}

#[tokio::test]
async fn stats_count_connections_per_system_and_drop_them_when_peers_leave() {
    let server = server_with(Gateway::new(16, LONG, LONG)).await;
    assert_eq!(server.gateway.stats().connections, 0);
    let mut a = connect(&server, "/v1/test/ws/echo").await;
    let b = connect(&server, "/v1/test/ws/data").await;
    eventually(|| test_connections(&server.gateway) == 2, "two connections").await;
    let stats = server.gateway.stats();
    assert_eq!((stats.connections, stats.connections_max), (2, 16));
    a.close(None).await.unwrap();
    eventually(|| test_connections(&server.gateway) == 1, "the closed connection to be dropped").await;
    // A peer that vanishes without a close frame is dropped too, even with its handler
    // waiting for credit.
    drop(b);
    eventually(|| server.gateway.stats().connections == 0, "the vanished connection to be dropped").await;
    assert_eq!(test_connections(&server.gateway), 0);
}

#[tokio::test]
async fn sse_sends_keep_alive_comments_and_counts_the_connection_while_open() {
    let server = server_with(Gateway::new(16, Duration::from_millis(100), LONG)).await;
    let mut response = reqwest::get(server.url("/v1/test/sse")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    eventually(|| test_connections(&server.gateway) == 1, "the stream to count").await;
    let mut text = String::new();
    while text.matches("\n\n").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk()).await.expect("a chunk").unwrap().expect("the stream stays open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.starts_with("data: hello\n\n"), "{text:?}");
    assert!(text[13..].starts_with(':'), "keep-alive comments follow: {text:?}");
    drop(response);
    eventually(|| test_connections(&server.gateway) == 0, "the closed stream to be dropped").await;
}

#[tokio::test]
async fn a_connection_whose_handler_returns_is_closed() {
    let server = server_with(Gateway::new(16, LONG, LONG)).await;
    let mut ws = connect(&server, "/v1/test/ws/once").await;
    assert_eq!(next_json(&mut ws, Duration::from_secs(5)).await, Some(serde_json::json!({"once": true})));
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the connection ends");
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "expected a close frame, got {end:?}");
    eventually(|| test_connections(&server.gateway) == 0, "the finished connection to be dropped").await;
}

#[tokio::test]
async fn shutdown_closes_open_websockets_and_sse_streams_so_serve_returns_promptly() {
    let mut server = server_with(Gateway::new(16, LONG, LONG)).await;
    let mut ws = connect(&server, "/v1/test/ws/echo").await;
    let mut sse = reqwest::get(server.url("/v1/test/sse")).await.unwrap();
    assert_eq!(sse.status(), 200);
    eventually(|| test_connections(&server.gateway) == 2, "both connections to count").await;
    server.shut_down();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("the WebSocket ends");
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "expected a close frame, got {end:?}");
    let sse_end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = sse.chunk().await {}
    });
    sse_end.await.expect("the SSE stream ends");
    let served = server.served.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), served).await.expect("serve returns well before DRAIN_TIMEOUT").unwrap().unwrap();
    assert_eq!(server.gateway.stats().connections, 0);
}
