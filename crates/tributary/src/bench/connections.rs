//! `tributary bench connections`: how many WebSocket connections one Tributary node holds, what
//! each costs in memory, and how fast a notification reaches all of them.
//!
//! The server is a separate `tributary up` process (so its resident memory is its own, and the
//! client's sockets do not count against its file limit); the bench raises its own
//! `RLIMIT_NOFILE` soft limit to the hard limit before starting it, and the child inherits it.
//! Clients connect to `/v1/notifications/ws` (realtime-notifications) from several loopback
//! source addresses (127.0.0.2 …), since one address has only ~28,000 ephemeral ports; each
//! subscribes to one of `--topics` topics. Once all are up and idle, the server's RSS growth
//! divided by the connections held is the memory per connection. Then one notification per topic
//! is published in one request, and the time until each connection reads its own is recorded.
//!
//! What limits it: the process's hard `RLIMIT_NOFILE` (each connection is a file descriptor in
//! the server); raising a hard limit needs CAP_SYS_RESOURCE, which the bench does not assume.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;

use super::latency::{LatencyHistogram, LatencySummary};
use super::{TargetCheck, Targets};

/// Connections one node should hold (the brief's aim; the seed's million over 20 nodes).
pub const CONNECTIONS_TARGET: usize = 100_000;
/// Source addresses beyond this are not tried (127.0.0.2 to 127.0.0.65).
const SOURCE_ADDRESSES_MAX: u8 = 64;
/// Read buffer of each client connection, in bytes.
const CLIENT_READ_BUFFER_BYTES: usize = 4 * 1024;
/// How long the bench waits for every connection to get the broadcast.
const BROADCAST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    /// WebSocket connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Loopback source addresses for the client side (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 4)]
    pub source_addresses: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Topics the connections spread over (one each, round robin).
    #[arg(long, default_value_t = 1_000)]
    pub topics: usize,
    /// Seconds to hold the connections idle before measuring memory.
    #[arg(long, default_value_t = 3)]
    pub settle_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct ConnectionsReport {
    pub bench: &'static str,
    pub connections_requested: usize,
    pub connections_held: usize,
    /// As the server counts them (`/v1/dashboard`, gateway connections).
    pub server_connections: Option<u64>,
    pub connect_failures: usize,
    pub first_failure: Option<String>,
    pub connect_seconds: f64,
    pub server_rss_before_bytes: u64,
    pub server_rss_after_bytes: u64,
    pub rss_per_connection_bytes: Option<u64>,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
    /// One notification per topic, published in one request: delivered to how many connections.
    pub broadcast_delivered: u64,
    /// From the publish request's send time to each connection reading its notification.
    pub broadcast_latency_ms: LatencySummary,
    pub targets: Targets,
}

pub async fn run(args: &ConnectionsArgs) -> anyhow::Result<ConnectionsReport> {
    let (nofile_soft, nofile_hard) = raise_nofile();
    let data = tempfile::Builder::new().prefix("tributary-bench-connections-").tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server_address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut server = Server(
        std::process::Command::new(std::env::current_exe()?)
            .args(["up", "--listen", &server_address.to_string(), "--data"])
            .arg(data.path())
            .env("TRIBUTARY_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting tributary up")?,
    );
    let base = format!("http://{server_address}");
    let client = reqwest::Client::new();
    let mut healthy = false;
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(healthy, "the server did not become healthy");
    let pid = server.0.id();
    let rss_before = rss_bytes(pid)?;

    let held = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let delivered = Arc::new(AtomicU64::new(0));
    let broadcast_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let latency = Arc::new(Mutex::new(LatencyHistogram::new()));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let sources = args.source_addresses.clamp(1, SOURCE_ADDRESSES_MAX);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % sources as usize) as u8);
        let url = format!("ws://{server_address}/v1/notifications/ws?user=u{i}&topics=room-{}", i % args.topics.max(1));
        let (held, failed, first_failure, delivered, broadcast_at, latency, handshakes) =
            (held.clone(), failed.clone(), first_failure.clone(), delivered.clone(), broadcast_at.clone(), latency.clone(), handshakes.clone());
        tasks.push(tokio::spawn(async move {
            let permit = handshakes.acquire_owned().await.expect("the semaphore stays open");
            let mut stream = match connect(source, server_address, &url).await {
                Ok(stream) => stream,
                Err(error) => {
                    failed.fetch_add(1, Ordering::AcqRel);
                    first_failure.lock().get_or_insert_with(|| format!("from {source}: {error:#}"));
                    return;
                }
            };
            drop(permit);
            held.fetch_add(1, Ordering::AcqRel);
            while let Some(Ok(frame)) = stream.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = frame
                    && text.starts_with("{\"notifications\"")
                {
                    if let Some(at) = *broadcast_at.lock() {
                        latency.lock().record_ns(at.elapsed().as_nanos() as u64);
                    }
                    delivered.fetch_add(1, Ordering::AcqRel);
                }
            }
        }));
    }
    while held.load(Ordering::Acquire) + failed.load(Ordering::Acquire) < args.connections {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    let rss_after = rss_bytes(pid)?;
    let held_now = held.load(Ordering::Acquire);
    let server_connections = match client.get(format!("{base}/v1/dashboard")).send().await {
        Ok(response) => response.json::<serde_json::Value>().await.ok().and_then(|v| v["gateway"]["connections"].as_u64()),
        Err(_) => None,
    };

    let notifications: Vec<serde_json::Value> = (0..args.topics.max(1)).map(|t| serde_json::json!({"topic": format!("room-{t}"), "data": {"broadcast": t}})).collect();
    *broadcast_at.lock() = Some(Instant::now());
    let response = client.post(format!("{base}/v1/notifications/publish")).json(&serde_json::json!({"notifications": notifications})).send().await?;
    anyhow::ensure!(response.status().is_success(), "publishing the broadcast: {}", response.text().await.unwrap_or_default());
    let deadline = Instant::now() + BROADCAST_TIMEOUT;
    while (delivered.load(Ordering::Acquire) as usize) < held_now && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in &tasks {
        task.abort();
    }
    server.stop();
    let per_connection = (held_now > 0).then(|| rss_after.saturating_sub(rss_before) / held_now as u64);
    let check = |metric, target, applies| TargetCheck { metric, target, applies_to: "one node", applies, measured: None, met: None };
    let targets = Targets::new(
        "issue 6",
        vec![
            check("connections_held", "100,000+ WebSocket connections on one 2-core node", true).judge(Some(held_now as f64), CONNECTIONS_TARGET as f64, true),
            check("broadcast_delivered", "every held connection gets its notification", true).judge(Some(delivered.load(Ordering::Acquire) as f64), held_now as f64, true),
        ],
    );
    let latency = latency.lock().clone();
    Ok(ConnectionsReport {
        bench: "connections",
        connections_requested: args.connections,
        connections_held: held_now,
        server_connections,
        connect_failures: failed.load(Ordering::Acquire),
        first_failure: first_failure.lock().clone(),
        connect_seconds,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        rss_per_connection_bytes: per_connection,
        nofile_soft,
        nofile_hard,
        broadcast_delivered: delivered.load(Ordering::Acquire),
        broadcast_latency_ms: latency.summary(),
        targets,
    })
}

type Client = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(source: Ipv4Addr, server: SocketAddr, url: &str) -> anyhow::Result<Client> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0))).with_context(|| format!("binding {source}"))?;
    let tcp = socket.connect(server).await.context("connecting")?;
    // A small read buffer: the bench's own memory is not what is measured, but 128 KiB per
    // client (tungstenite's default) would cost gigabytes on the machine.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER_BYTES);
    let (mut stream, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await.context("WebSocket handshake")?;
    match stream.next().await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) if text.starts_with("{\"connected\"") => Ok(stream),
        other => anyhow::bail!("expected the connected message, got {other:?}"),
    }
}

/// The server child process, stopped (SIGTERM, then killed) when dropped.
struct Server(std::process::Child);

impl Server {
    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// Raise the soft `RLIMIT_NOFILE` to the hard one; returns `(soft, hard)` after.
fn raise_nofile() -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return (0, 0);
        }
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            limit = raised;
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// Resident memory of process `pid`, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS without a number")?.parse()?;
    Ok(kib * 1024)
}
