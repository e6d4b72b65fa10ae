//! A small test system served by the real front door on 127.0.0.1:0: two `/v1/test/...` JSON
//! handlers, a slow one, WebSocket and SSE routes through a [`Gateway`], and two more systems
//! (`other`, `testing`) so token scopes have something to tell apart.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, WebSocketUpgrade};
use axum::response::sse::Event;
use axum::routing::get;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tributary_engine::StreamError;
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Gateway, Json, ServerConfig, SystemApi, blocking};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Echo {
    pub name: String,
    pub count: u32,
}

/// `POST /v1/test/echo`: the body back, after a trip through `blocking`.
#[utoipa::path(post, path = "/v1/test/echo", request_body = Echo, responses((status = 200, body = Echo)))]
async fn echo(Json(body): Json<Echo>) -> Result<axum::Json<Echo>, ApiError> {
    let body = blocking(move || Ok::<_, ApiError>(body)).await?;
    Ok(axum::Json(body))
}

/// `GET /v1/test/missing`: an engine error, mapped to its status.
#[utoipa::path(get, path = "/v1/test/missing", responses((status = 404)))]
async fn missing() -> Result<&'static str, ApiError> {
    blocking(|| Err::<&'static str, _>(StreamError::TopicNotFound("absent".into()))).await
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
    tag: Option<String>,
}

/// Tags of slow requests that have reached their handler.
static SLOW_STARTED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// `GET /v1/test/slow?ms=…&tag=…`: answers after `ms` milliseconds.
#[utoipa::path(get, path = "/v1/test/slow", responses((status = 200)))]
async fn slow(Query(query): Query<SlowQuery>) -> &'static str {
    if let Some(tag) = query.tag {
        SLOW_STARTED.lock().insert(tag);
    }
    tokio::time::sleep(Duration::from_millis(query.ms)).await;
    "slow done\n"
}

/// Wait until the slow request tagged `tag` is being handled.
pub async fn slow_started(tag: &str) {
    eventually(|| SLOW_STARTED.lock().contains(tag), "the slow request to start").await;
}

#[utoipa::path(get, path = "/v1/other/ping", responses((status = 200)))]
async fn other_ping() -> &'static str {
    "other\n"
}

#[utoipa::path(get, path = "/v1/testing/ping", responses((status = 200)))]
async fn testing_ping() -> &'static str {
    "testing\n"
}

/// Initial credit of `/v1/test/ws/data`.
pub const INITIAL_CREDIT: usize = 2;

/// The test systems: `test` (JSON, WebSocket and SSE routes), `other` and `testing`.
pub fn systems(gateway: &Gateway) -> Vec<SystemApi> {
    let data_gateway = gateway.clone();
    let echo_gateway = gateway.clone();
    let sse_gateway = gateway.clone();
    let once_gateway = gateway.clone();
    let test = OpenApiRouter::new()
        .routes(routes!(echo))
        .routes(routes!(missing))
        .routes(routes!(slow))
        // Numbered data messages, as fast as credit allows.
        .route(
            "/v1/test/ws/data",
            get(move |upgrade: WebSocketUpgrade| async move {
                data_gateway.websocket("test", upgrade, Some(INITIAL_CREDIT), |connection| async move {
                    for n in 0u64.. {
                        if connection.send_data(&serde_json::json!({"data": n})).await.is_err() {
                            return;
                        }
                    }
                })
            }),
        )
        // Every JSON frame back as `{"echo": frame}`.
        .route(
            "/v1/test/ws/echo",
            get(move |upgrade: WebSocketUpgrade| async move {
                echo_gateway.websocket("test", upgrade, None, |mut connection| async move {
                    while let Some(frame) = connection.recv().await {
                        if connection.send(&serde_json::json!({"echo": frame})).await.is_err() {
                            return;
                        }
                    }
                })
            }),
        )
        // One message, then the handler returns.
        .route(
            "/v1/test/ws/once",
            get(move |upgrade: WebSocketUpgrade| async move {
                once_gateway.websocket("test", upgrade, None, |connection| async move {
                    let _ = connection.send(&serde_json::json!({"once": true})).await;
                })
            }),
        )
        // One event, then only keep-alives.
        .route(
            "/v1/test/sse",
            get(move || async move {
                let events = futures_util::stream::once(async { Event::default().data("hello") }).chain(futures_util::stream::pending());
                sse_gateway.sse("test", events)
            }),
        );
    vec![
        SystemApi { id: "test", prefixes: vec!["/v1/test"], router: test },
        SystemApi { id: "other", prefixes: vec!["/v1/other"], router: OpenApiRouter::new().routes(routes!(other_ping)) },
        SystemApi { id: "testing", prefixes: vec!["/v1/testing"], router: OpenApiRouter::new().routes(routes!(testing_ping)) },
    ]
}

/// A front door serving the test systems.
pub struct TestServer {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    shutdown: Option<oneshot::Sender<()>>,
    pub served: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: ServerConfig, gateway: Gateway) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = tributary_server::router(&ServerConfig { listen: addr, ..config }, systems(&gateway), Router::new());
        let (shutdown, stop) = oneshot::channel::<()>();
        // As `tributary up` does: on shutdown, close the long-lived connections too.
        let closing = gateway.clone();
        let served = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stop.await;
            closing.close();
        }));
        TestServer { addr, gateway, shutdown: Some(shutdown), served: Some(served) }
    }

    pub async fn default() -> TestServer {
        TestServer::start(ServerConfig::default(), Gateway::default()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Resolve the shutdown future `serve` was given.
    pub fn shut_down(&mut self) {
        let _ = self.shutdown.take().expect("shut down once").send(());
    }
}

/// Wait (at most 5 s) until `condition` holds.
pub async fn eventually(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A response's status, `error.code`, `error.message`, checking the body is exactly our error shape.
pub async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = response.text().await.unwrap();
    assert!(content_type.starts_with("application/json"), "status {status}: content type {content_type:?}, body {text:?}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("status {status}: body {text:?} is not JSON: {e}"));
    let object = body.as_object().expect("an object");
    assert_eq!(object.len(), 1, "only `error` at the top: {body}");
    let error = body["error"].as_object().unwrap_or_else(|| panic!("no `error` object: {body}"));
    let code = error["code"].as_str().expect("error.code is a string").to_string();
    let message = error["message"].as_str().expect("error.message is a string").to_string();
    assert!(!message.is_empty());
    (status, code, message)
}
