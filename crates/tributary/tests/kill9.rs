//! `tributary up` killed with SIGKILL while producers publish: every message the server
//! acknowledged (201) is there after a restart on the same data folder, exactly once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;

mod process;
use process::{free_port, start_up, wait_healthy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_is_lost_when_the_server_is_killed_under_load() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut server = start_up(data.path(), port, &[]);
    wait_healthy(&client, &base).await;

    let acknowledged: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut producers = Vec::new();
    for producer in 0..4u64 {
        let (client, base, acknowledged) = (client.clone(), base.clone(), acknowledged.clone());
        producers.push(tokio::spawn(async move {
            for i in 0..100_000u64 {
                let seq = producer * 1_000_000 + i;
                let batch: Vec<_> = (0..5).map(|k| json!({"body": {"seq": seq * 10 + k}})).collect();
                let sent = client.post(format!("{base}/v1/queues/orders/messages")).json(&json!({"messages": batch})).send().await;
                match sent {
                    Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                        let mut acked = acknowledged.lock();
                        for k in 0..5 {
                            acked.insert(seq * 10 + k);
                        }
                    }
                    _ => return, // the server is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SIGKILL: no chance to flush anything.
    server.kill().unwrap();
    server.wait().unwrap();
    for producer in producers {
        producer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().clone();
    assert!(acknowledged.len() > 100, "the producers got going before the kill ({} acknowledged)", acknowledged.len());

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start_up(data.path(), port, &[]);
    wait_healthy(&client, &base).await;
    let mut seen = BTreeSet::new();
    let mut duplicates = 0;
    loop {
        let got: serde_json::Value = client
            .post(format!("{base}/v1/queues/orders/receive"))
            .json(&json!({"group": "audit", "max": 1000, "wait_ms": 200, "lease_ms": 60_000}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let messages = got["messages"].as_array().cloned().unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        for message in &messages {
            if !seen.insert(message["body"]["seq"].as_u64().unwrap()) {
                duplicates += 1;
            }
        }
        let receipts: Vec<_> = messages.iter().map(|m| m["receipt"].clone()).collect();
        let acked = client.post(format!("{base}/v1/queues/orders/ack")).json(&json!({"group": "audit", "receipts": receipts})).send().await.unwrap();
        assert!(acked.status().is_success());
    }
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    server.wait().unwrap();
    let missing: Vec<&u64> = acknowledged.difference(&seen).collect();
    assert!(missing.is_empty(), "{} acknowledged messages are missing after the restart, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert_eq!(duplicates, 0, "the log holds each message once");
}
