//! What the browser tests share: their prerequisites (Debian's Chromium, `node`, playwright-core
//! from `npm ci` in `tests/browser`), an in-process `tributary up` on 127.0.0.1:0 with a fresh
//! data folder, and running one `tests/browser/*.test.mjs` script against it with a deadline.
//! A missing prerequisite fails the test with how to install it: a browser test never passes
//! without having run the browser.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tributary::platform::{UpConfig, run};
use tributary_server::ApiToken;

const INSTALL: &str = "run .ci/install-browser as root (it does `apt-get update && apt-get install -y chromium` \
                       and `npm ci` in crates/tributary/tests/browser)";

pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

/// `tributary up` in this process, with `tokens` (none: open on loopback).
pub async fn start(tokens: Vec<ApiToken>) -> Server {
    let data = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = UpConfig { tokens, ..UpConfig::embedded(addr, data.path().join("data")) };
    let task = tokio::spawn(run(config, listener, async move {
        let _ = stopped.await;
    }));
    Server { addr, stop: Some(stop), task, _data: data }
}

impl Server {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().expect("the server stops cleanly");
    }
}

pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser")
}

/// Chromium's path; fails (never skips) with how to install what is missing.
pub fn prerequisites(test: &str) -> PathBuf {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(chromium.exists(), "{} is missing: {test} needs Debian's Chromium; {INSTALL}", chromium.display());
    let node = Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(out) if out.status.success()),
        "`node` is not on PATH: install Node.js (Debian: apt-get install -y nodejs npm), then {INSTALL}"
    );
    let playwright = browser_dir().join("node_modules").join("playwright-core");
    assert!(playwright.exists(), "{} is missing: {INSTALL}", playwright.display());
    chromium
}

/// The screenshot folder: `$<variable>`, or `<tmp>/<default_name>`; created.
pub fn screenshots(variable: &str, default_name: &str) -> PathBuf {
    let dir = std::env::var_os(variable).map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join(default_name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `tests/browser/<script>` with `env`, killing it after `timeout`; `None` when it timed out.
pub fn run_script(script: &str, env: &[(&str, String)], timeout: Duration) -> Option<ExitStatus> {
    let mut command = Command::new("node");
    command.arg(browser_dir().join(script)).current_dir(browser_dir()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("starting node");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
