//! What the tests that run `tributary up` as a child process share: a free port, starting the
//! binary (its output to a file), and waiting until it answers `/healthz`.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where the output of the node on `port` goes ([`wait_healthy`] shows it when the node does
/// not come up).
fn log_path(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tributary-test-node-{port}.log"))
}

/// `tributary up` on 127.0.0.1:`port` with its data in `data`, plus `extra` arguments; its
/// output goes to a file in the temporary folder, named after the port.
pub fn start_up(data: &Path, port: u16, extra: &[&str]) -> Child {
    let log = std::fs::File::create(log_path(port)).expect("the node's log file");
    Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .arg("--data")
        .arg(data)
        .stdout(log.try_clone().expect("the node's log file"))
        .stderr(log)
        .spawn()
        .expect("the tributary binary starts")
}

pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let port = base.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    let output = port.and_then(|port| std::fs::read_to_string(log_path(port)).ok()).unwrap_or_default();
    let tail: Vec<&str> = output.lines().rev().take(40).collect();
    panic!("{base} did not become healthy within 30 s; the last lines of its output:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
}
