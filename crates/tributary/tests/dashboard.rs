//! The dashboard in a real browser: `tributary up` runs in process on 127.0.0.1:0 with a fresh
//! data folder, and `tests/browser/dashboard.test.mjs` (playwright-core driving Debian's
//! headless Chromium) loads `/` and `/systems/basic-message-queue` and checks what they show.
//! A second server runs in tokens mode to check that `?access_token=` reaches every fetch.
//!
//! Needs `/usr/bin/chromium` (or `$CHROMIUM`), `node`, and `npm ci` done in
//! `crates/tributary/tests/browser`; `.ci/install-browser` does both (see `support`).
//! Screenshots go to `$DASHBOARD_SCREENSHOTS` (default `<tmp>/tributary-dashboard-screenshots`)
//! and are kept for a look.

mod support;

use std::time::Duration;

use tributary_server::ApiToken;

/// The whole browser script, both servers included.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN: &str = "dashboard-test-token-0123456789";

#[test]
fn dashboard_in_headless_chromium() {
    let chromium = support::prerequisites("the dashboard's browser test");
    let screenshots = support::screenshots("DASHBOARD_SCREENSHOTS", "tributary-dashboard-screenshots");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let open = runtime.block_on(support::start(Vec::new()));
    let tokens = runtime.block_on(support::start(vec![ApiToken::parse(TOKEN).unwrap()]));
    let env = [
        ("BASE_URL", format!("http://{}", open.addr)),
        ("TOKEN_BASE_URL", format!("http://{}", tokens.addr)),
        ("ACCESS_TOKEN", TOKEN.to_string()),
        ("CHROMIUM", chromium.display().to_string()),
        ("SCREENSHOT_DIR", screenshots.display().to_string()),
    ];
    let status = support::run_script("dashboard.test.mjs", &env, BROWSER_TIMEOUT);
    runtime.block_on(async {
        open.stop().await;
        tokens.stop().await;
    });
    let status = status.unwrap_or_else(|| panic!("the browser test took longer than {BROWSER_TIMEOUT:?}"));
    assert!(status.success(), "the browser test failed ({status}); see its output above");
    println!("screenshots in {}", screenshots.display());
}
