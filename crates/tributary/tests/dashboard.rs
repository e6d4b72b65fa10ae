//! The dashboard in a real browser: `tributary up` runs in process on 127.0.0.1:0 with a fresh
//! data folder, and `tests/browser/dashboard.test.mjs` (playwright-core driving Debian's
//! headless Chromium) loads `/` and `/systems/basic-message-queue` and checks what they show.
//! A second server runs in tokens mode to check that `?access_token=` reaches every fetch.
//!
//! Needs `/usr/bin/chromium` (or `$CHROMIUM`), `node`, and `npm ci` done in
//! `crates/tributary/tests/browser`; `.ci/install-browser` does both. When one is missing the
//! test fails and says how to install it: it never passes without having run the browser.
//! Screenshots go to `$DASHBOARD_SCREENSHOTS` (default `<tmp>/tributary-dashboard-screenshots`)
//! and are kept for a look.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary::platform::{UpConfig, run};
use tributary_server::ApiToken;

const INSTALL: &str = "run .ci/install-browser as root (it does `apt-get update && apt-get install -y chromium` \
                       and `npm ci` in crates/tributary/tests/browser)";
/// The whole browser script, both servers included.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN: &str = "dashboard-test-token-0123456789";

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

async fn start(tokens: Vec<ApiToken>) -> Server {
    let data = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = UpConfig { listen: addr, data: data.path().join("data"), tokens, announce: true };
    let task = tokio::spawn(run(config, listener, async move {
        let _ = stopped.await;
    }));
    Server { addr, stop: Some(stop), task, _data: data }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().expect("the server stops cleanly");
    }
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser")
}

/// Fails (never skips) with how to install what is missing.
fn prerequisites() -> PathBuf {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(chromium.exists(), "{} is missing: the dashboard's browser test needs Debian's Chromium; {INSTALL}", chromium.display());
    let node = Command::new("node").arg("--version").output();
    assert!(
        matches!(&node, Ok(out) if out.status.success()),
        "`node` is not on PATH: install Node.js (Debian: apt-get install -y nodejs npm), then {INSTALL}"
    );
    let playwright = browser_dir().join("node_modules").join("playwright-core");
    assert!(playwright.exists(), "{} is missing: {INSTALL}", playwright.display());
    chromium
}

#[test]
fn dashboard_in_headless_chromium() {
    let chromium = prerequisites();
    let screenshots = std::env::var_os("DASHBOARD_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tributary-dashboard-screenshots"));
    std::fs::create_dir_all(&screenshots).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let open = runtime.block_on(start(Vec::new()));
    let tokens = runtime.block_on(start(vec![ApiToken::parse(TOKEN).unwrap()]));

    let mut child = Command::new("node")
        .arg(browser_dir().join("dashboard.test.mjs"))
        .current_dir(browser_dir())
        .env("BASE_URL", format!("http://{}", open.addr))
        .env("TOKEN_BASE_URL", format!("http://{}", tokens.addr))
        .env("ACCESS_TOKEN", TOKEN)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOT_DIR", &screenshots)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting node");
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    runtime.block_on(async {
        open.stop().await;
        tokens.stop().await;
    });
    let status = status.unwrap_or_else(|| panic!("the browser test took longer than {BROWSER_TIMEOUT:?}"));
    assert!(status.success(), "the browser test failed ({status}); see its output above");
    println!("screenshots in {}", screenshots.display());
}
