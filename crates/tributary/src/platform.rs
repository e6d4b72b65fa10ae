//! `tributary up`: the engine, every implemented system, the front door and the dashboard in
//! one process.
//!
//! Start-up opens the engine under the data folder (recovering from a crash if there was one),
//! starts each system of `tributary_systems::entries()`, mounts their routes behind the front
//! door and serves. SIGTERM (or Ctrl-C) stops accepting, drains in-flight requests, stops the
//! systems and closes the engine (every log synced, the cache snapshotted). A SIGKILL loses
//! nothing acknowledged: acknowledgements wait for the log's durability class.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use serde::Serialize;
use tributary_engine::Engine;
use tributary_runtime::{Catalogue, CheckReport, MetricsSnapshot, Topology, check};
use tributary_server::gateway::GatewayStats;
use tributary_server::{ApiToken, Gateway, ServerConfig};
use tributary_sql::{Db, DbConfig, Dialect, redacted_url};
use tributary_systems::{Context, System, entries};

/// How often the engine's upkeep runs (retention, compaction, lease expiry, cache expiry).
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct UpConfig {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub tokens: Vec<ApiToken>,
    /// Say on stdout where the dashboard is and when the server stopped (off when embedded in
    /// a command whose stdout is JSON).
    pub announce: bool,
    /// Where streams, queues and pub/sub live: None for the embedded engine, or a NATS URL
    /// (several servers comma-separated).
    pub stream: Option<String>,
    /// A Redis URL for the cache every node shares (presence of connected users), or None.
    pub cache: Option<String>,
    /// The database every node shares (`postgres://…`, or `sqlite://…`), or None for the SQLite
    /// file in the data folder.
    pub db: Option<String>,
    /// A read replica of `db`, for reads that tolerate lag.
    pub db_replica: Option<String>,
    /// Connections of the pool on `db` (and on its replica).
    pub db_connections: u32,
    /// What this deployment's names live under on a shared backend (`A-Z a-z 0-9 -`).
    pub namespace: String,
}

/// The namespace of a deployment that names none.
pub const NAMESPACE_DEFAULT: &str = "tributary";

impl UpConfig {
    /// Serve on `listen` with the data in `data`, embedded, without tokens or announcements.
    pub fn embedded(listen: SocketAddr, data: PathBuf) -> UpConfig {
        UpConfig { listen, data, tokens: Vec::new(), announce: false, stream: None, cache: None, db: None, db_replica: None, db_connections: tributary_sql::DB_CONNECTIONS_DEFAULT, namespace: NAMESPACE_DEFAULT.to_string() }
    }
}

/// The context of the systems: every interface embedded, or the queue and stream interfaces on
/// NATS JetStream, a cache shared by the nodes on Redis, and the database on PostgreSQL.
async fn context(config: &UpConfig, engine: Arc<Engine>, gateway: Gateway) -> anyhow::Result<Context> {
    let mut context = Context::embedded(engine, gateway);
    if let Some(url) = &config.stream {
        anyhow::ensure!(url.starts_with("nats://") || url.starts_with("tls://"), "--stream takes a NATS URL (nats://host:port, several comma-separated), got {url:?}");
        let queues = tributary_nats::NatsQueues::connect(url, &config.namespace).await.with_context(|| format!("connecting the queue interface to {url}"))?;
        context.queues = Arc::new(queues);
        let streams = tributary_nats::NatsStreams::connect(url, &config.namespace).await.with_context(|| format!("connecting the stream interface to {url}"))?;
        context.streams = Arc::new(streams);
    }
    if let Some(url) = &config.cache {
        anyhow::ensure!(url.starts_with("redis://") || url.starts_with("rediss://"), "--cache takes a Redis URL (redis://host:port/db), got {url:?}");
        let cache = tributary_redis::RedisCache::connect(url, &config.namespace).await.with_context(|| format!("connecting the shared cache to {url}"))?;
        context.shared_cache = Some(Arc::new(cache));
    }
    let db = match &config.db {
        Some(url) => {
            let db_config = DbConfig { replica: config.db_replica.clone(), max_connections: config.db_connections, ..DbConfig::new(url.clone()).in_schema(config.namespace.clone()) };
            Db::connect(&db_config).await.with_context(|| format!("connecting the database (--db {})", redacted_url(url)))?
        }
        None => Db::embedded(&config.data).await.with_context(|| format!("opening the database in {}", config.data.display()))?,
    };
    context.db = Some(db);
    Ok(context)
}

/// The dashboard's view of one system of the catalogue.
#[derive(Debug, Serialize)]
pub struct SystemView {
    pub number: u32,
    pub id: String,
    pub title: String,
    pub category: String,
    pub implemented: bool,
    /// The declared topology when implemented, the seed's reference otherwise.
    pub topology: Topology,
    pub checks: Option<CheckReport>,
    pub latency_target: Option<serde_json::Value>,
    pub rate_target_per_s: Option<f64>,
    pub metrics: Option<MetricsSnapshot>,
    pub status: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct DashboardView {
    pub systems: Vec<SystemView>,
    pub gateway: GatewayStats,
}

/// Every system of the catalogue, implemented or not, with live figures where running.
pub fn dashboard_view(running: &[Arc<dyn System>], gateway: &Gateway) -> DashboardView {
    let topologies: Vec<(&'static str, Topology)> = entries().into_iter().map(|e| (e.id, (e.topology)())).collect();
    let systems = Catalogue::get()
        .iter()
        .map(|spec| {
            let declared = topologies.iter().find(|(id, _)| *id == spec.id).map(|(_, t)| t.clone());
            let live = running.iter().find(|s| s.id() == spec.id);
            SystemView {
                number: spec.number,
                id: spec.id.clone(),
                title: spec.title.clone(),
                category: spec.category.clone(),
                implemented: declared.is_some(),
                checks: declared.as_ref().map(|t| check(t, spec)),
                topology: declared.unwrap_or_else(|| spec.reference.topology.clone()),
                latency_target: spec.nonfunctional.latency.as_ref().and_then(|l| serde_json::to_value(l).ok()),
                rate_target_per_s: spec.nonfunctional.rate_per_s,
                metrics: live.map(|s| s.metrics().snapshot()),
                status: live.map(|s| s.status()).unwrap_or(serde_json::Value::Null),
            }
        })
        .collect();
    DashboardView { systems, gateway: gateway.stats() }
}

/// Run until SIGTERM or Ctrl-C.
pub async fn up(config: UpConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("listening on {}", config.listen))?;
    run(config, listener, tributary_server::termination()).await
}

/// How long a stopping system's background work may take to finish before the engine closes.
pub const SYSTEM_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serve on `listener` until `shutdown` resolves.
pub async fn run(config: UpConfig, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    tributary_server::auth::check_exposure(local, &config.tokens).map_err(anyhow::Error::msg)?;
    let data = config.data.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::open(&data)).await?.with_context(|| format!("opening the engine in {}", config.data.display()))?;
    let engine = Arc::new(engine);
    let gateway = Gateway::default();
    let context = context(&config, engine.clone(), gateway.clone()).await?;
    let distributed = config.stream.is_some();
    // A database the nodes share: PostgreSQL (a SQLite file is the node's own).
    let shared_db = context.db.as_ref().is_some_and(|db| db.dialect() == Dialect::Postgres);
    let mut running: Vec<Arc<dyn System>> = Vec::new();
    let mut left_out = Vec::new();
    for entry in entries() {
        if distributed && !entry.distributed {
            left_out.push(format!("{} (keeps state in the node)", entry.id));
            continue;
        }
        if distributed && entry.needs_db && !shared_db {
            left_out.push(format!("{} (keeps state in the db: give --db postgres://…)", entry.id));
            continue;
        }
        running.push((entry.start)(&context).with_context(|| format!("starting {}", entry.id))?);
    }
    let apis = running.iter().map(|s| s.clone().api()).collect();
    let server_config = ServerConfig { listen: local, tokens: config.tokens.clone(), ..ServerConfig::default() };
    let view_systems = running.clone();
    let view_gateway = gateway.clone();
    let extra = Router::new().route(
        "/v1/dashboard",
        get(move || {
            let view = dashboard_view(&view_systems, &view_gateway);
            async move { axum::Json(view) }
        }),
    );
    let app = tributary_server::router(&server_config, apis, extra.merge(tributary_server::dashboard::routes()));

    let upkeep_engine = engine.clone();
    let upkeep = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(MAINTENANCE_INTERVAL);
        loop {
            ticker.tick().await;
            let engine = upkeep_engine.clone();
            if let Ok(Err(error)) = tokio::task::spawn_blocking(move || engine.maintain()).await {
                tracing::warn!(%error, "engine upkeep failed");
            }
        }
    });

    if config.announce {
        match &config.stream {
            None => println!("Tributary is up: dashboard at http://{local}/ (data in {})", config.data.display()),
            Some(url) => {
                let cache = config.cache.as_deref().map_or_else(|| "presence per node".to_string(), |cache| format!("shared cache on {cache}"));
                let db = config.db.as_deref().map_or_else(|| "db in the data folder".to_string(), |db| format!("db on {}", redacted_url(db)));
                println!("Tributary is up: dashboard at http://{local}/ (queues and streams on {url}, {cache}, {db}, namespace {})", config.namespace);
                if !left_out.is_empty() {
                    println!("Not started in distributed mode: {}", left_out.join(", "));
                }
            }
        }
    }
    // WebSockets and SSE streams never finish on their own: close them, or they hold the drain.
    let closing = gateway.clone();
    let shutdown = async move {
        shutdown.await;
        closing.close();
    };
    tributary_server::serve(listener, app, shutdown).await?;
    upkeep.abort();
    for system in &running {
        system.shutdown();
    }
    for system in &running {
        if tokio::time::timeout(SYSTEM_STOP_TIMEOUT, system.stopped()).await.is_err() {
            tracing::warn!(system = system.id(), "background work did not stop within {SYSTEM_STOP_TIMEOUT:?}; closing the engine anyway");
        }
    }
    drop(running);
    if let Some(db) = &context.db {
        db.close().await;
    }
    drop(context);
    tokio::task::spawn_blocking(move || engine.close()).await?.context("closing the engine")?;
    if config.announce {
        println!("Tributary stopped cleanly");
    }
    Ok(())
}
