//! The chat page of realtime-chat-messages in a real browser: `tributary up` runs in process on
//! 127.0.0.1:0 with a fresh data folder, and `tests/browser/chat.test.mjs` (playwright-core
//! driving Debian's headless Chromium) opens `/chat` in two pages as two users: both join a
//! channel, one types and sends, the other sees the typing indicator and the message live, and a
//! reload shows the history.
//!
//! Needs what the dashboard's browser test needs (`/usr/bin/chromium` or `$CHROMIUM`, `node`,
//! `npm ci` in `crates/tributary/tests/browser`; `.ci/install-browser` does both). When one is
//! missing the test fails and says how to install it. Screenshots go to `$CHAT_SCREENSHOTS`
//! (default `<tmp>/tributary-chat-screenshots`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tributary::platform::{UpConfig, run};

const INSTALL: &str = "run .ci/install-browser as root (it does `apt-get update && apt-get install -y chromium` \
                       and `npm ci` in crates/tributary/tests/browser)";
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser")
}

/// Fails (never skips) with how to install what is missing.
fn prerequisites() -> PathBuf {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(chromium.exists(), "{} is missing: the chat page's browser test needs Debian's Chromium; {INSTALL}", chromium.display());
    let node = Command::new("node").arg("--version").output();
    assert!(matches!(&node, Ok(out) if out.status.success()), "`node` is not on PATH: install Node.js (Debian: apt-get install -y nodejs npm), then {INSTALL}");
    let playwright = browser_dir().join("node_modules").join("playwright-core");
    assert!(playwright.exists(), "{} is missing: {INSTALL}", playwright.display());
    chromium
}

#[test]
fn two_users_chat_in_headless_chromium() {
    let chromium = prerequisites();
    let screenshots = std::env::var_os("CHAT_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("tributary-chat-screenshots"));
    std::fs::create_dir_all(&screenshots).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (addr, stop, task) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = UpConfig { listen: addr, data: data.path().join("data"), tokens: Vec::new(), announce: false };
        let task = tokio::spawn(run(config, listener, async move {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    });

    let mut child = Command::new("node")
        .arg(browser_dir().join("chat.test.mjs"))
        .current_dir(browser_dir())
        .env("BASE_URL", format!("http://{addr}"))
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
        let _ = stop.send(());
        task.await.unwrap().expect("the server stops cleanly");
    });
    let status = status.unwrap_or_else(|| panic!("the browser test took longer than {BROWSER_TIMEOUT:?}"));
    assert!(status.success(), "the chat browser test failed ({status}); see its output above");
    println!("screenshots in {}", screenshots.display());
}
