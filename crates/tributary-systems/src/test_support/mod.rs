//! What several systems' feature tests share:
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
