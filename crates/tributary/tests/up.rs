//! `tributary` as a real process: `up` serves until SIGTERM and then stops cleanly, refuses to
//! listen beyond loopback without tokens; `check` and `systems` answer.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tributary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tributary"));
    for var in ["TRIBUTARY_LISTEN", "TRIBUTARY_DATA", "TRIBUTARY_TOKENS"] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "warn");
    command
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The status line of `GET /healthz`, or `None` while nothing answers.
fn healthz(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().next().map(String::from)
}

fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let output = child.wait_with_output().unwrap();
            panic!("tributary did not exit within {timeout:?}; stderr: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn up_serves_until_sigterm_then_stops_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = tributary()
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = healthz(port) {
            assert!(status.contains("200"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: `pid` is our own child, still running (it has not been waited for).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = wait_with_timeout(child, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "exit {:?}; stdout {stdout}; stderr {stderr}", output.status);
    assert!(stdout.contains("Tributary is up"), "{stdout}");
    assert!(stdout.contains("stopped cleanly"), "stdout {stdout}; stderr {stderr}");
    assert!(healthz(port).is_none(), "the port is closed");
}

#[test]
fn up_on_every_interface_without_tokens_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let child = tributary().args(["up", "--listen", "0.0.0.0:0", "--data"]).arg(data.path()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let output = wait_with_timeout(child, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it must not start; stderr {stderr}");
    assert!(stderr.contains("refusing to listen on 0.0.0.0"), "{stderr}");
    assert!(stderr.contains("--token"), "the message says what to do: {stderr}");
}

#[test]
fn a_database_pool_of_no_connections_or_without_a_database_is_refused_by_name() {
    let data = tempfile::tempdir().unwrap();
    for (args, expected) in [(vec!["--db", "postgres://postgres@127.0.0.1:5432/test", "--db-connections", "0"], "--db-connections"), (vec!["--db-connections", "16"], "--db")] {
        let output = tributary().args(["up", "--listen", "127.0.0.1:0", "--data"]).arg(data.path()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must not start; stderr {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn check_holds_for_every_implemented_system() {
    let output = tributary().arg("check").output().unwrap();
    assert!(output.status.success(), "stdout {}; stderr {}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
}

#[test]
fn systems_lists_the_35_of_the_catalogue() {
    let output = tributary().arg("systems").output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = stdout.lines().filter(|l| !l.ends_with("of 35 implemented")).filter(|l| l.split_whitespace().next().is_some_and(|n| n.parse::<u32>().is_ok())).collect();
    assert_eq!(rows.len(), 35, "{stdout}");
    assert!(stdout.contains("of 35 implemented"), "{stdout}");
    let output = tributary().args(["systems", "--json"]).output().unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rows.len(), 35);
    let numbers: Vec<u64> = rows.iter().map(|r| r["number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=35).collect::<Vec<_>>());
}
