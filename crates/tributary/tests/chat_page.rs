//! The chat page of realtime-chat-messages in a real browser: `tributary up` runs in process on
//! 127.0.0.1:0 with a fresh data folder, and `tests/browser/chat.test.mjs` (playwright-core
//! driving Debian's headless Chromium) opens `/chat` in two pages as two users: both join a
//! channel, one types and sends, the other sees the typing indicator and the message live, and a
//! reload shows the history.
//!
//! Needs what the dashboard's browser test needs (see `support`). Screenshots go to
//! `$CHAT_SCREENSHOTS` (default `<tmp>/tributary-chat-screenshots`).

mod support;

use std::time::Duration;

const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn two_users_chat_in_headless_chromium() {
    let chromium = support::prerequisites("the chat page's browser test");
    let screenshots = support::screenshots("CHAT_SCREENSHOTS", "tributary-chat-screenshots");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(support::start(Vec::new()));
    let env = [
        ("BASE_URL", format!("http://{}", server.addr)),
        ("CHROMIUM", chromium.display().to_string()),
        ("SCREENSHOT_DIR", screenshots.display().to_string()),
    ];
    let status = support::run_script("chat.test.mjs", &env, BROWSER_TIMEOUT);
    runtime.block_on(server.stop());
    let status = status.unwrap_or_else(|| panic!("the browser test took longer than {BROWSER_TIMEOUT:?}"));
    assert!(status.success(), "the chat browser test failed ({status}); see its output above");
    println!("screenshots in {}", screenshots.display());
}
