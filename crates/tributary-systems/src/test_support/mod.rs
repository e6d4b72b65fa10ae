//! What several systems' feature tests share:
//! - [`Backend`] and [`on_both!`]: a feature test run on the embedded engine and on the
//!   machine's NATS JetStream (127.0.0.1:4222, or `TRIBUTARY_TEST_NATS_URL`) with its Redis as
//!   the shared cache (127.0.0.1:6379, or `TRIBUTARY_TEST_REDIS_URL`) and its PostgreSQL as the
//!   database (database `test` on 127.0.0.1:5432, or `TRIBUTARY_TEST_POSTGRES_URL`), each such
//!   run under a namespace of its own (a PostgreSQL schema of that name), removed at its end
//!   (what presence writes to Redis expires);
//! - [`Served`]: a system's routes behind the real front door on 127.0.0.1:0, stopped on demand;
//! - [`SmtpRelay`]: an SMTP relay to deliver to (Python's aiosmtpd in a child process, running
//!   `smtp_sink.py`, which answers 250, 4xx or 5xx by recipient and prints each accepted message
//!   as a JSON line). Needs `python3` with `aiosmtpd` (`pip install aiosmtpd`, done by
//!   `.ci/install-test-deps`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;

const SMTP_SINK: &str = include_str!("smtp_sink.py");

/// Where the state of a system under test lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The engine in the test's folder.
    Embedded,
    /// NATS JetStream (queues and streams) and Redis (the shared cache), under this namespace.
    Nats(String),
}

impl Backend {
    /// NATS under a namespace no other test or run uses.
    pub fn nats() -> Backend {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
        Backend::Nats(format!("t-{}-{nanos}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)))
    }

    pub fn is_embedded(&self) -> bool {
        *self == Backend::Embedded
    }

    /// The systems' context over `engine`, with the queue and stream interfaces on this backend.
    pub async fn context(&self, engine: Arc<tributary_engine::Engine>) -> crate::Context {
        let mut context = crate::Context::embedded(engine, tributary_server::Gateway::default());
        if let Backend::Nats(namespace) = self {
            const NEEDS: &str = "NATS with JetStream on 127.0.0.1:4222 (.ci/services starts it)";
            context.queues = Arc::new(tributary_nats::NatsQueues::connect(&nats_url(), namespace).await.expect(NEEDS));
            context.streams = Arc::new(tributary_nats::NatsStreams::connect(&nats_url(), namespace).await.expect(NEEDS));
            let redis = std::env::var("TRIBUTARY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let cache = tributary_redis::RedisCache::connect(&redis, namespace).await.expect("Redis on 127.0.0.1:6379 (.ci/services starts it)");
            context.shared_cache = Some(Arc::new(cache));
            context.db = Some(self.db().await);
        }
        context
    }

    /// The run's PostgreSQL schema, made when missing.
    async fn db(&self) -> tributary_sql::Db {
        let Backend::Nats(namespace) = self else { panic!("the embedded backend's database is the engine folder's SQLite file") };
        let config = tributary_sql::DbConfig::new(postgres_url()).in_schema(namespace.as_str());
        tributary_sql::Db::connect(&config).await.expect("PostgreSQL on 127.0.0.1:5432 with a database `test` (.ci/services starts it)")
    }

    /// Removes what a NATS run made (its streams and KV bucket).
    pub async fn forget(&self) {
        if let Backend::Nats(namespace) = self {
            tributary_nats::NatsQueues::connect(&nats_url(), namespace).await.unwrap().delete_namespace().await.unwrap();
            tributary_nats::NatsStreams::connect(&nats_url(), namespace).await.unwrap().delete_namespace().await.unwrap();
            self.db().await.drop_schema().await.unwrap();
        }
    }
}

pub fn postgres_url() -> String {
    std::env::var("TRIBUTARY_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn nats_url() -> String {
    std::env::var("TRIBUTARY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A feature test `async fn name(backend: Backend)` run on both backends: `mod name { embedded, nats }`.
macro_rules! on_both {
    ($test:ident) => {
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$test($crate::test_support::Backend::Embedded).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                let backend = $crate::test_support::Backend::nats();
                super::$test(backend.clone()).await;
                backend.forget().await;
            }
        }
    };
}
pub(crate) use on_both;

/// A system's API served by the front door (`tributary_server::router`) on a loopback port.
pub struct Served {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Served {
    pub async fn start(api: tributary_server::SystemApi) -> Served {
        let app = tributary_server::router(&tributary_server::ServerConfig::default(), vec![api], axum::Router::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tributary_server::serve(listener, app, async move {
            let _ = stopped.await;
        }));
        Served { addr, stop: Some(stop), server: Some(server) }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Stop serving and wait for the server to finish.
    pub async fn stop(&mut self) {
        let _ = self.stop.take().expect("stopped once").send(());
        self.server.take().expect("stopped once").await.unwrap().unwrap();
    }
}

/// Wait (up to 4 s) until `handle` is the last one: background tasks let go of the system.
pub async fn until_last_handle<T: ?Sized>(handle: &Arc<T>) {
    for _ in 0..200 {
        if Arc::strong_count(handle) == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The test relay: aiosmtpd in a child process; what it accepted, as JSON lines.
pub struct SmtpRelay {
    pub port: u16,
    child: Child,
    accepted: Arc<Mutex<Vec<Value>>>,
}

impl SmtpRelay {
    pub fn start() -> SmtpRelay {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SMTP_SINK)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs (the email tests need python3 with aiosmtpd: pip install aiosmtpd)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(first, "READY", "the SMTP sink did not start (is aiosmtpd installed? pip install aiosmtpd)");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let sink = accepted.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().push(serde_json::from_str::<Value>(&line).unwrap());
            }
        });
        SmtpRelay { port, child, accepted }
    }

    /// The messages accepted for recipient `to`.
    pub fn accepted_for(&self, to: &str) -> Vec<Value> {
        self.accepted.lock().iter().filter(|m| m["rcpt_tos"].as_array().unwrap().iter().any(|r| r == to)).cloned().collect()
    }
}

impl Drop for SmtpRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
