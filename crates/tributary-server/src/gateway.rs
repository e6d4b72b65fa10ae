//! The connection gateway: every WebSocket and SSE endpoint of every system goes through it.
//!
//! It owns what all long-lived connections share: the connection limit, per-system connection
//! counts, heartbeats (WebSocket pings, SSE keep-alive comments), closing idle peers, and
//! credit-based flow control for WebSockets: with credit on, the server sends a message only
//! while the client has granted credit (`{"credit": n}` frames), so a slow client slows its own
//! stream (and its subscription's slow-consumer policy decides what that means) instead of
//! filling the server's memory.
//!
//! What it does not do: decide what to send. A system's handler gets a [`WsConnection`] (or
//! hands in a stream of SSE events) and speaks its own JSON messages over it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, Stream, StreamExt};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::error::ApiError;

/// Interval of WebSocket pings and SSE keep-alive comments.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// A WebSocket peer silent for this long (no frame, no pong) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Long-lived connections one server holds before refusing new ones with 503.
pub const CONNECTIONS_MAX_DEFAULT: usize = 200_000;
/// Frames queued towards one WebSocket peer before `send` waits.
pub const OUTBOUND_FRAMES_MAX: usize = 256;
/// Frames from one WebSocket peer queued for its handler before reading pauses.
pub const INBOUND_FRAMES_MAX: usize = 64;
/// Most credit a client may hold at once.
pub const CREDIT_MAX: usize = 100_000;
/// Largest frame a client may send, in bytes.
pub const CLIENT_FRAME_BYTES_MAX: usize = 1024 * 1024;
/// Read buffer of one WebSocket, in bytes. tungstenite's default (128 KiB) is zero-filled on the
/// first read, so every idle connection would hold 128 KiB resident; clients send small control
/// frames here, and a larger frame still arrives whole (the buffer grows for it).
pub const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// How long a closing connection's handler gets to notice before it is stopped.
pub const HANDLER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection gets to flush its queued frames and the close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    connections: AtomicUsize,
    connections_max: usize,
    by_system: Mutex<BTreeMap<&'static str, usize>>,
    heartbeat: Duration,
    idle_timeout: Duration,
    /// True once [`Gateway::close`] ran.
    closing: watch::Sender<bool>,
}

/// Connections now, in all and per system.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GatewayStats {
    pub connections: usize,
    pub connections_max: usize,
    pub by_system: BTreeMap<&'static str, usize>,
}

/// Counts a connection while it lives.
struct Admission {
    inner: Arc<Inner>,
    system: &'static str,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.inner.connections.fetch_sub(1, Ordering::AcqRel);
        if let Some(n) = self.inner.by_system.lock().get_mut(self.system) {
            *n = n.saturating_sub(1);
        }
        metrics::gauge!("tributary_gateway_connections", "system" => self.system).decrement(1.0);
    }
}

/// The peer went away (or the connection was closed by the gateway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection is closed")]
pub struct Closed;

/// One WebSocket connection, as a system's handler sees it.
pub struct WsConnection {
    outgoing: mpsc::Sender<Message>,
    incoming: mpsc::Receiver<serde_json::Value>,
    credit: Option<Arc<Semaphore>>,
}

impl WsConnection {
    /// Send a control message (an error, a subscription confirmation): needs no credit.
    pub async fn send(&self, message: &impl Serialize) -> Result<(), Closed> {
        let text = serde_json::to_string(message).expect("messages serialize");
        self.outgoing.send(Message::Text(text.into())).await.map_err(|_| Closed)
    }

    /// Send text that is already JSON (a system that builds its frames itself, without a
    /// second serialization): needs no credit.
    pub async fn send_text(&self, text: String) -> Result<(), Closed> {
        self.outgoing.send(Message::Text(text.into())).await.map_err(|_| Closed)
    }

    /// Send a data message: with flow control on, waits until the client has granted credit.
    pub async fn send_data(&self, message: &impl Serialize) -> Result<(), Closed> {
        if let Some(credit) = &self.credit {
            let permit = credit.acquire().await.map_err(|_| Closed)?;
            permit.forget();
        }
        self.send(message).await
    }

    /// Send a data message already serialized as JSON text (a system that serializes each event
    /// once for many connections joins them itself); with flow control on, waits for credit.
    pub async fn send_data_text(&self, json: String) -> Result<(), Closed> {
        if let Some(credit) = &self.credit {
            let permit = credit.acquire().await.map_err(|_| Closed)?;
            permit.forget();
        }
        self.outgoing.send(Message::Text(json.into())).await.map_err(|_| Closed)
    }

    /// Credit the client has granted and not used.
    pub fn credit(&self) -> Option<usize> {
        self.credit.as_ref().map(|c| c.available_permits())
    }

    /// The next JSON frame from the client (credit frames are handled by the gateway), or `None`
    /// once the client is gone.
    pub async fn recv(&mut self) -> Option<serde_json::Value> {
        self.incoming.recv().await
    }

    /// True once the peer is gone: a handler blocked elsewhere can stop early.
    pub fn is_closed(&self) -> bool {
        self.outgoing.is_closed()
    }
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway::new(CONNECTIONS_MAX_DEFAULT, HEARTBEAT_INTERVAL, IDLE_TIMEOUT)
    }
}

impl Gateway {
    pub fn new(connections_max: usize, heartbeat: Duration, idle_timeout: Duration) -> Gateway {
        Gateway {
            inner: Arc::new(Inner {
                connections: AtomicUsize::new(0),
                connections_max,
                by_system: Mutex::new(BTreeMap::new()),
                heartbeat,
                idle_timeout,
                closing: watch::Sender::new(false),
            }),
        }
    }

    /// Close every WebSocket (with a close frame), end every SSE stream and refuse new ones.
    /// For shutdown: a graceful drain waits for responses to finish, and an SSE stream never
    /// does, so without this one open stream holds the drain until its timeout.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves once [`Gateway::close`] has run.
    fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.inner.closing.subscribe();
        async move {
            if closing.wait_for(|closing| *closing).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn stats(&self) -> GatewayStats {
        GatewayStats {
            connections: self.inner.connections.load(Ordering::Acquire),
            connections_max: self.inner.connections_max,
            by_system: self.inner.by_system.lock().clone(),
        }
    }

    fn admit(&self, system: &'static str) -> Result<Admission, ApiError> {
        if *self.inner.closing.borrow() {
            return Err(ApiError::overloaded("the server is shutting down", 5));
        }
        let now = self.inner.connections.fetch_add(1, Ordering::AcqRel);
        let admission = Admission { inner: self.inner.clone(), system };
        *self.inner.by_system.lock().entry(system).or_default() += 1;
        metrics::gauge!("tributary_gateway_connections", "system" => system).increment(1.0);
        if now >= self.inner.connections_max {
            return Err(ApiError::overloaded(format!("the server holds its limit of {} connections (CONNECTIONS_MAX)", self.inner.connections_max), 5));
        }
        Ok(admission)
    }

    /// Accept a WebSocket and run `handler` on it. `initial_credit: Some(n)` turns on flow
    /// control with `n` messages granted up front.
    pub fn websocket<F, Fut>(&self, system: &'static str, upgrade: WebSocketUpgrade, initial_credit: Option<usize>, handler: F) -> Response
    where
        F: FnOnce(WsConnection) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let admission = match self.admit(system) {
            Ok(admission) => admission,
            Err(error) => return error.into_response(),
        };
        let (heartbeat, idle_timeout, closed) = (self.inner.heartbeat, self.inner.idle_timeout, self.closed());
        upgrade
            .max_message_size(CLIENT_FRAME_BYTES_MAX)
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            .on_upgrade(move |socket| run_websocket(socket, admission, heartbeat, idle_timeout, closed, initial_credit, handler))
    }

    /// Serve `events` as Server-Sent Events with keep-alive comments.
    pub fn sse<S>(&self, system: &'static str, events: S) -> Response
    where
        S: Stream<Item = Event> + Send + 'static,
    {
        let admission = match self.admit(system) {
            Ok(admission) => admission,
            Err(error) => return error.into_response(),
        };
        let stream = events.take_until(self.closed()).map(move |event| {
            let _alive = &admission;
            Ok::<Event, Infallible>(event)
        });
        Sse::new(stream).keep_alive(KeepAlive::new().interval(self.inner.heartbeat)).into_response()
    }
}

async fn run_websocket<F, Fut>(
    socket: WebSocket,
    admission: Admission,
    heartbeat: Duration,
    idle_timeout: Duration,
    closed: impl Future<Output = ()>,
    initial_credit: Option<usize>,
    handler: F,
) where
    F: FnOnce(WsConnection) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (mut sink, mut stream) = socket.split();
    let (outgoing_tx, mut outgoing_rx) = mpsc::channel::<Message>(OUTBOUND_FRAMES_MAX);
    let (incoming_tx, incoming_rx) = mpsc::channel::<serde_json::Value>(INBOUND_FRAMES_MAX);
    let credit = initial_credit.map(|n| Arc::new(Semaphore::new(n.min(CREDIT_MAX))));
    let connection = WsConnection { outgoing: outgoing_tx.clone(), incoming: incoming_rx, credit: credit.clone() };
    let mut handler_task = tokio::spawn(handler(connection));
    let mut handler_done = false;
    tokio::pin!(closed);

    let writer = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.tick().await;
        loop {
            tokio::select! {
                frame = outgoing_rx.recv() => match frame {
                    Some(frame) => if sink.send(frame).await.is_err() { break },
                    None => break,
                },
                _ = ticker.tick() => if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break },
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });

    loop {
        // A handler that returns has nothing more to say: close rather than keep a silent socket.
        let next = tokio::select! {
            _ = &mut handler_task, if !handler_done => {
                handler_done = true;
                break;
            }
            _ = &mut closed => break,
            next = tokio::time::timeout(idle_timeout, stream.next()) => next,
        };
        let frame = match next {
            Err(_) | Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(frame))) => frame,
        };
        match frame {
            Message::Text(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(value) => {
                    if let (Some(credit), Some(n)) = (&credit, grant(&value)) {
                        let room = CREDIT_MAX.saturating_sub(credit.available_permits());
                        credit.add_permits(n.min(room));
                        continue;
                    }
                    if incoming_tx.send(value).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    let reply = serde_json::json!({"error": {"code": "bad_request", "message": format!("malformed JSON frame: {error}")}});
                    let _ = outgoing_tx.send(Message::Text(reply.to_string().into())).await;
                }
            },
            Message::Binary(_) => {
                let reply = serde_json::json!({"error": {"code": "bad_request", "message": "send JSON text frames"}});
                let _ = outgoing_tx.send(Message::Text(reply.to_string().into())).await;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
    drop(incoming_tx);
    if let Some(credit) = &credit {
        credit.close();
    }
    // The handler sees `recv() == None` and its sends fail; give it a moment, then stop it.
    if !handler_done {
        let abort = handler_task.abort_handle();
        if tokio::time::timeout(HANDLER_STOP_TIMEOUT, handler_task).await.is_err() {
            abort.abort();
        }
    }
    // With every sender gone the writer flushes what is queued and sends a close frame; a peer
    // that does not read gets the TCP connection closed under it instead.
    drop(outgoing_tx);
    let abort = writer.abort_handle();
    if tokio::time::timeout(CLOSE_TIMEOUT, writer).await.is_err() {
        abort.abort();
    }
    drop(admission);
}

/// `{"credit": n}` grants `n` more messages.
fn grant(value: &serde_json::Value) -> Option<usize> {
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object.get("credit")?.as_u64().map(|n| n as usize)
}
