//! Two `tributary up --stream nats://…` nodes on the machine's NATS, one killed with SIGKILL:
//! - basic-message-queue, behind a balancer of the test's own (TCP, a backend per connection in
//!   turn, skipping one that refuses), under load. Clients retry what failed (publishes with
//!   their dedup ids, so a retry stores nothing twice), and every message a node acknowledged
//!   (201) is received afterwards: nothing acknowledged is lost, and the surviving node serves on.
//! - realtime-notifications, with `--cache` on Redis: presence counts the connections of both
//!   nodes, a watcher on one node hears a user join through the other, and a client of the
//!   killed node reconnects to the other with its last token and gets exactly what it missed.
//!
//! - email-queue-system, with `--db` on PostgreSQL, behind the balancer under send load: every
//!   email a node accepted (202) before or after the kill is handed to the SMTP relay once one is
//!   configured through the survivor.
//! - realtime-chat-messages, behind the balancer under send load with client ids: every message
//!   a node acknowledged (201) is in the survivor's history once, at the seq its sender was
//!   told, in one gapless sequence.
//!
//! - stock-price-updates, behind the balancer under tick load with sequence numbers: the
//!   survivor's log holds every tick a node acknowledged, each seq once.
//! - notification-fanout, with `--db` on PostgreSQL, behind the balancer under trigger load:
//!   every recipient of every notification a node accepted (202) is sent its push, and the
//!   survivor expands every partition.
//!
//! Needs NATS with JetStream on 127.0.0.1:4222 (or `TRIBUTARY_TEST_NATS_URL`), Redis on
//! 127.0.0.1:6379 (or `TRIBUTARY_TEST_REDIS_URL`) and PostgreSQL with a database `test` on
//! 127.0.0.1:5432 (or `TRIBUTARY_TEST_POSTGRES_URL`), which `.ci/run` starts or checks, and
//! python3 with aiosmtpd (`.ci/install-test-deps`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tributary_engine::queue::{QueueConfig, QueueStore};
use futures_util::StreamExt;
use tributary_nats::{NatsQueues, NatsStreams};

mod process;
use process::{free_port, start_up, wait_healthy};

/// The queue's lease: short, so that what the killed node had leased comes back soon.
const LEASE_MS: u64 = 2_000;
const PRODUCERS: u64 = 3;
const BATCHES_PER_PRODUCER: u64 = 150;
const BATCH: u64 = 10;

/// Requests that failed (a broken connection or an error status) and were retried.
static RETRIED: AtomicUsize = AtomicUsize::new(0);

/// A namespace of its own for one run of one test.
fn namespace(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 1_000_000_000;
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn nats_url() -> String {
    std::env::var("TRIBUTARY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Two `tributary up --stream nats://… --namespace NAMESPACE` nodes with `extra` arguments, each
/// in a folder of its own, once both answer `/healthz`.
async fn two_nodes(namespace: &str, extra: &[&str]) -> ([tempfile::TempDir; 2], [u16; 2], [Child; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let ports = [free_port(), free_port()];
    let nats = nats_url();
    let mut args = vec!["--stream", nats.as_str(), "--namespace", namespace];
    args.extend_from_slice(extra);
    let nodes = [start_up(dirs[0].path(), ports[0], &args), start_up(dirs[1].path(), ports[1], &args)];
    let client = reqwest::Client::new();
    for port in ports {
        wait_healthy(&client, &format!("http://127.0.0.1:{port}")).await;
    }
    (dirs, ports, nodes)
}

/// The balancer: each accepted connection goes to the next backend in turn; a backend that
/// refuses the connection is skipped (it is down) and the next one tried.
async fn balance(listener: TcpListener, backends: Vec<SocketAddr>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { return };
        let (backends, next) = (backends.clone(), next.clone());
        tokio::spawn(async move {
            let first = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..backends.len() {
                if let Ok(mut outbound) = TcpStream::connect(backends[(first + i) % backends.len()]).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

/// A balancer over the nodes on `ports`: its base URL, its task, and a client that opens a
/// connection per request (each goes through the balancer anew) and gives up after 10 s.
async fn behind_a_balancer(ports: [u16; 2]) -> (String, tokio::task::JoinHandle<()>, reqwest::Client) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let balancer = tokio::spawn(balance(listener, ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect()));
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build().unwrap();
    (base, balancer, client)
}

/// Stop the balancer and the node that was not killed (SIGTERM).
fn stop_the_survivor(balancer: tokio::task::JoinHandle<()>, survivor: &mut Child) {
    balancer.abort();
    unsafe { libc::kill(survivor.id() as i32, libc::SIGTERM) };
    survivor.wait().unwrap();
}

/// Once a third of `total` is in `done`, SIGKILL `node`, then wait for the `senders` to finish.
/// Returns how many were in at the kill, and all of them in the end.
async fn kill_at_a_third<T: Clone>(done: &Mutex<BTreeMap<String, T>>, total: usize, node: &mut Child, senders: Vec<tokio::task::JoinHandle<()>>) -> (usize, BTreeMap<String, T>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.lock().len() < total / 3 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    unsafe { libc::kill(node.id() as i32, libc::SIGKILL) };
    node.wait().unwrap();
    let killed_at = done.lock().len();
    for sender in senders {
        sender.await.unwrap();
    }
    (killed_at, done.lock().clone())
}

/// Posts `body` until a node answers with `want`; other answers and broken connections (the
/// killed node) are retried through the balancer. Gives up after `within`.
async fn post_until(client: &reqwest::Client, url: &str, body: &Value, want: reqwest::StatusCode, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(response) = client.post(url).json(body).send().await {
            let status = response.status();
            if let Ok(answer) = response.json::<Value>().await
                && status == want
            {
                return answer;
            }
        }
        assert!(Instant::now() < deadline, "POST {url} was not answered {want} within {within:?}");
        RETRIED.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_a_balancer_lose_nothing_acknowledged_when_one_is_killed() {
    let namespace = namespace("multinode");
    // The queue, made beforehand with a short lease; the nodes find it on their first publish.
    let admin = NatsQueues::connect(&nats_url(), &namespace).await.expect("NATS with JetStream on 127.0.0.1:4222 (.ci/services starts it)");
    admin.create_queue("mq.orders", QueueConfig { lease_ms_default: LEASE_MS, ..QueueConfig::default() }).await.unwrap();

    let (_dirs, ports, mut nodes) = two_nodes(&namespace, &[]).await;
    let direct = reqwest::Client::new();
    for port in ports {
        // Without a shared database (--db), a node leaves out the systems that keep state there.
        let email = direct.get(format!("http://127.0.0.1:{port}/v1/email")).send().await.unwrap();
        assert_eq!(email.status(), 404, "email-queue-system started on a node whose database is its own SQLite file");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let backends: Vec<SocketAddr> = ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect();
    let balancer = tokio::spawn(balance(listener, backends));
    // A new connection per request, so that requests alternate between the nodes.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(10)).build().unwrap();

    // Producers: batches with dedup ids; what was answered 201 is acknowledged.
    let acknowledged: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut producers = Vec::new();
    for producer in 0..PRODUCERS {
        let (client, base, acknowledged) = (client.clone(), base.clone(), acknowledged.clone());
        producers.push(tokio::spawn(async move {
            for batch in 0..BATCHES_PER_PRODUCER {
                let seqs: Vec<u64> = (0..BATCH).map(|k| (producer * BATCHES_PER_PRODUCER + batch) * BATCH + k).collect();
                let messages: Vec<Value> = seqs.iter().map(|seq| json!({"body": {"seq": seq}, "dedup_id": format!("seq-{seq}")})).collect();
                post_until(&client, &format!("{base}/v1/queues/orders/messages"), &json!({"messages": messages}), reqwest::StatusCode::CREATED, Duration::from_secs(60)).await;
                acknowledged.lock().extend(seqs);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Consumers: receive and ack through the balancer; count every sequence received.
    let received: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for consumer in 0..2 {
        let (client, base, received, stop) = (client.clone(), base.clone(), received.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let request = json!({"group": "workers", "consumer": format!("c{consumer}"), "max": 50, "wait_ms": 500});
                let Ok(response) = client.post(format!("{base}/v1/queues/orders/receive")).json(&request).send().await else { continue };
                let Ok(answer) = response.json::<Value>().await else { continue };
                let Some(messages) = answer["messages"].as_array().filter(|m| !m.is_empty()) else { continue };
                {
                    let mut received = received.lock();
                    for message in messages {
                        *received.entry(message["body"]["seq"].as_u64().unwrap()).or_default() += 1;
                    }
                }
                // An ack may fail with the node: the message then comes back after its lease.
                let receipts: Vec<&Value> = messages.iter().map(|m| &m["receipt"]).collect();
                let _ = client.post(format!("{base}/v1/queues/orders/ack")).json(&json!({"group": "workers", "receipts": receipts})).send().await;
            }
        }));
    }

    // Kill one node with SIGKILL once a third of the load is acknowledged.
    let total = PRODUCERS * BATCHES_PER_PRODUCER * BATCH;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (acknowledged.lock().len() as u64) < total / 3 {
        assert!(Instant::now() < deadline, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes[0].kill().unwrap();
    nodes[0].wait().unwrap();
    let killed_at = acknowledged.lock().len();

    for producer in producers {
        producer.await.unwrap();
    }
    let acknowledged = acknowledged.lock().clone();
    assert_eq!(acknowledged.len() as u64, total, "every publish was acknowledged in the end, by the surviving node");

    // Everything acknowledged is received (what the killed node had leased, after its lease).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = acknowledged.iter().filter(|seq| !received.lock().contains_key(seq)).count();
        if missing == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} of {} acknowledged messages were never received", acknowledged.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The surviving node's view, once what came back after a lost ack was received again:
    // nothing left for the group.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view: Value = direct.get(format!("http://127.0.0.1:{}/v1/queues/orders", ports[1])).send().await.unwrap().json().await.unwrap();
        if (view["depth"].as_u64(), view["in_flight"].as_u64()) == (Some(0), Some(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "the group still has work: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Release);
    for consumer in consumers {
        consumer.await.unwrap();
    }
    let received = received.lock().clone();
    let twice = received.values().filter(|n| **n > 1).count();
    let strangers = received.keys().filter(|seq| !acknowledged.contains(seq)).count();
    assert_eq!(strangers, 0, "received messages that were never published");
    println!(
        "{} acknowledged ({killed_at} before the kill), all received; {twice} received more than once (at-least-once across the kill); {} publishes retried",
        acknowledged.len(),
        RETRIED.load(Ordering::Relaxed)
    );

    balancer.abort();
    for node in &mut nodes[1..] {
        unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
        node.wait().unwrap();
    }
    admin.delete_namespace().await.unwrap();
    // The systems' topics too (stock prices', chat's and the others' streams).
    NatsStreams::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
}

fn redis_url() -> String {
    std::env::var("TRIBUTARY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A notifications WebSocket client: the data of what it received, and the last token.
struct Listener {
    stream: WsStream,
    token: String,
}

impl Listener {
    async fn connect(port: u16, query: &str) -> Listener {
        let url = format!("ws://127.0.0.1:{port}/v1/notifications/ws?{query}");
        let (mut stream, _) = tokio_tungstenite::connect_async(url).await.expect("the node takes WebSockets");
        let hello = Listener::next(&mut stream).await;
        let token = hello["connected"]["token"].as_str().expect("a connected message with a token").to_string();
        Listener { stream, token }
    }

    async fn next(stream: &mut WsStream) -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a message within 10 s").expect("the socket is open").unwrap();
            if let Ok(text) = frame.to_text()
                && !text.is_empty()
            {
                return serde_json::from_str(text).unwrap();
            }
        }
    }

    /// The `data` of the next `n` notifications.
    async fn notifications(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        while got.len() < n {
            let frame = Listener::next(&mut self.stream).await;
            if let Some(notifications) = frame["notifications"].as_array() {
                got.extend(notifications.iter().map(|n| n["data"].clone()));
                self.token = frame["token"].as_str().unwrap().to_string();
            }
        }
        assert_eq!(got.len(), n, "no more than asked for in the frames read");
        got
    }
}

async fn publish(client: &reqwest::Client, port: u16, data: impl Iterator<Item = u64>) {
    let notifications: Vec<Value> = data.map(|i| json!({"topic": "news", "data": i})).collect();
    let response = client.post(format!("http://127.0.0.1:{port}/v1/notifications/publish")).json(&json!({"notifications": notifications})).send().await.unwrap();
    assert_eq!(response.status(), 201);
}

/// GET `path` of the node on `port` until `done` holds (the other node's presence writer runs
/// on its own), at most 10 s.
async fn presence_until(client: &reqwest::Client, port: u16, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body: Value = client.get(format!("http://127.0.0.1:{port}{path}")).send().await.unwrap().json().await.unwrap();
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} still says {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifications_client_of_a_killed_node_resumes_on_the_other_exactly() {
    let namespace = namespace("multinode-n");
    let (_dirs, ports, mut nodes) = two_nodes(&namespace, &["--cache", &redis_url()]).await;
    let client = reqwest::Client::new();

    // Carol watches presence through node 1: she hears alice join through node 0 as well.
    let mut carol = Listener::connect(ports[1], "user=carol&topics=news&presence=true").await;
    let mut alice = Listener::connect(ports[0], "user=alice&topics=news").await;
    let mut bob = Listener::connect(ports[1], "user=bob&topics=news").await;
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let frame = Listener::next(&mut carol.stream).await;
        if !frame["presence"].is_null() {
            heard.push(frame["presence"].clone());
        }
    }
    heard.sort_by_key(|event| event["user"].as_str().unwrap().to_string());
    assert_eq!(heard, vec![json!({"topic": "news", "user": "alice", "event": "join"}), json!({"topic": "news", "user": "bob", "event": "join"})], "joins through either node");
    drop(carol);
    for port in ports {
        let news = presence_until(&client, port, "/v1/notifications/presence/news", |news| news["users"] == 2).await;
        assert_eq!(news["members"], json!([{"user": "alice", "connections": 1}, {"user": "bob", "connections": 1}]));
    }
    publish(&client, ports[1], 0..50).await;
    publish(&client, ports[0], 50..100).await;
    let first: Vec<Value> = (0..100).map(|i| json!(i)).collect();
    assert_eq!(alice.notifications(100).await, first);
    assert_eq!(bob.notifications(100).await, first);

    // Alice's node dies; what is published meanwhile waits in the shared log for her token.
    let token = alice.token.clone();
    unsafe { libc::kill(nodes[0].id() as i32, libc::SIGKILL) };
    nodes[0].wait().unwrap();
    publish(&client, ports[1], 100..300).await;
    let mut moved = Listener::connect(ports[1], &format!("user=alice&topics=news&token={token}")).await;
    assert_eq!(moved.notifications(200).await, (100..300).map(|i| json!(i)).collect::<Vec<_>>(), "exactly what she missed, in order");
    assert_eq!(bob.notifications(200).await.len(), 200);
    publish(&client, ports[1], 300..301).await;
    assert_eq!(moved.notifications(1).await, vec![json!(300)], "then live");
    let alice_online = presence_until(&client, ports[1], "/v1/notifications/users/alice", |alice| alice["online"] == true).await;
    assert!(alice_online["connections"].as_u64().unwrap() >= 1);

    unsafe { libc::kill(nodes[1].id() as i32, libc::SIGTERM) };
    nodes[1].wait().unwrap();
    NatsStreams::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
}

fn postgres_url() -> String {
    std::env::var("TRIBUTARY_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The SMTP relay of email-queue-system's feature tests (aiosmtpd in a child process): the
/// recipients of what it accepted.
struct SmtpSink {
    port: u16,
    child: Child,
    recipients: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    fn start() -> SmtpSink {
        use std::io::BufRead;
        let port = free_port();
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(include_str!("../../tributary-systems/src/test_support/smtp_sink.py"))
            .arg(port.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with aiosmtpd (.ci/install-test-deps)");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("READY"), "the SMTP sink did not start (pip install aiosmtpd)");
        let recipients: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = recipients.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let message: Value = serde_json::from_str(&line).unwrap();
                sink.lock().extend(message["rcpt_tos"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()));
            }
        });
        SmtpSink { port, child, recipients }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_accepted_by_a_killed_node_are_delivered_by_the_other() {
    const SENDERS: u64 = 3;
    const REQUESTS_PER_SENDER: u64 = 40;
    const PER_REQUEST: u64 = 5;
    let namespace = namespace("multinode-e");
    let (_dirs, ports, mut nodes) = two_nodes(&namespace, &["--db", &postgres_url()]).await;
    let direct = reqwest::Client::new();
    for port in ports {
        let overview: Value = direct.get(format!("http://127.0.0.1:{port}/v1/email")).send().await.unwrap().json().await.unwrap();
        assert_eq!(overview["backends"], json!({"queues": "nats", "streams": "nats", "db": "postgres"}), "{overview}");
    }
    let (base, balancer, client) = behind_a_balancer(ports).await;

    // Senders: what was answered 202 is accepted. No relay yet: everything waits in the queues.
    let accepted: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (client, base, accepted) = (client.clone(), base.clone(), accepted.clone());
        senders.push(tokio::spawn(async move {
            for request in 0..REQUESTS_PER_SENDER {
                let recipients: Vec<String> = (0..PER_REQUEST).map(|k| format!("r{}@example.org", (sender * REQUESTS_PER_SENDER + request) * PER_REQUEST + k)).collect();
                let messages: Vec<Value> = recipients.iter().map(|to| json!({"class": "bulk", "from": "shop@example.com", "to": to, "subject": "s", "text": "x"})).collect();
                let answer = post_until(&client, &format!("{base}/v1/email/messages"), &json!({"messages": messages}), reqwest::StatusCode::ACCEPTED, Duration::from_secs(60)).await;
                let mut accepted = accepted.lock();
                for (to, message) in recipients.into_iter().zip(answer["messages"].as_array().unwrap()) {
                    assert_eq!(message["status"], "queued");
                    accepted.insert(to, message["id"].as_str().unwrap().to_string());
                }
            }
        }));
    }
    let total = (SENDERS * REQUESTS_PER_SENDER * PER_REQUEST) as usize;
    let (killed_at, accepted) = kill_at_a_third(&accepted, total, &mut nodes[0], senders).await;
    assert_eq!(accepted.len(), total, "every send was accepted in the end, by the surviving node");

    // A relay, configured through the survivor: every accepted email is handed off.
    let relay = SmtpSink::start();
    let config = json!({"relay": {"host": "127.0.0.1", "port": relay.port, "pool_max": 8, "timeout_ms": 5_000}});
    let response = direct.put(format!("http://127.0.0.1:{}/v1/email/config", ports[1])).json(&config).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered: BTreeSet<String> = relay.recipients.lock().iter().cloned().collect();
        let missing = accepted.keys().filter(|to| !delivered.contains(*to)).count();
        if missing == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} of {total} accepted emails never reached the relay");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The survivor answers for emails the killed node accepted.
    for (to, id) in accepted.iter().take(10) {
        let status: Value = direct.get(format!("http://127.0.0.1:{}/v1/email/messages/{id}", ports[1])).send().await.unwrap().json().await.unwrap();
        assert_eq!((status["to"].as_str(), status["status"].as_str()), (Some(to.as_str()), Some("delivered")), "{status}");
    }
    let handed_off = relay.recipients.lock().len();
    println!("{total} accepted ({killed_at} before the kill), all handed off ({handed_off} hand-offs); {} sends retried", RETRIED.load(Ordering::Relaxed));

    stop_the_survivor(balancer, &mut nodes[1]);
    NatsQueues::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
    NatsStreams::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
    let db = tributary_sql::Db::connect(&tributary_sql::DbConfig::new(postgres_url()).in_schema(namespace.as_str())).await.unwrap();
    db.drop_schema().await.unwrap();
}

/// Every message of `channel` as `user` sees it, oldest first (history pages back by cursor).
async fn chat_history(client: &reqwest::Client, base: &str, channel: &str, user: &str) -> (Vec<Value>, u64) {
    let mut messages: Vec<Value> = Vec::new();
    let mut before = None;
    loop {
        let cursor = before.map(|b: u64| format!("&before={b}")).unwrap_or_default();
        let page: Value = client.get(format!("{base}/v1/chat/channels/{channel}/messages?user={user}&limit=200{cursor}")).send().await.unwrap().json().await.unwrap();
        let older = page["messages"].as_array().unwrap().clone();
        let more = page["more"].as_bool().unwrap();
        before = older.first().map(|m| m["seq"].as_u64().unwrap());
        messages.splice(0..0, older);
        if !more {
            return (messages, page["last_seq"].as_u64().unwrap());
        }
    }
}

/// Chat sends answered `"duplicate": true`: retried after the node that appended them died.
static REPEATED: AtomicUsize = AtomicUsize::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_a_killed_node_acknowledged_are_kept_once_by_the_other() {
    const SENDERS: u64 = 3;
    const PER_SENDER: u64 = 100;
    let namespace = namespace("multinode-c");
    let (_dirs, ports, mut nodes) = two_nodes(&namespace, &[]).await;
    let direct = reqwest::Client::new();
    let (base, balancer, client) = behind_a_balancer(ports).await;
    let members: Vec<String> = (0..SENDERS).map(|s| format!("s{s}")).collect();
    post_until(&client, &format!("{base}/v1/chat/channels?user=s0"), &json!({"id": "room", "visibility": "public", "members": members}), reqwest::StatusCode::CREATED, Duration::from_secs(30)).await;

    // Senders, each message with a client id, retried through the balancer until answered 201.
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (client, base, acked) = (client.clone(), base.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                let client_id = format!("s{sender}-{i}");
                let body = json!({"text": format!("message {i} of s{sender}"), "client_id": client_id});
                let answer = post_until(&client, &format!("{base}/v1/chat/channels/room/messages?user=s{sender}"), &body, reqwest::StatusCode::CREATED, Duration::from_secs(60)).await;
                acked.lock().insert(client_id, answer["seq"].as_u64().unwrap());
                if answer["duplicate"] == true {
                    REPEATED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let total = (SENDERS * PER_SENDER) as usize;
    let (killed_at, acked) = kill_at_a_third(&acked, total, &mut nodes[0], senders).await;
    assert_eq!(acked.len(), total, "every send was acknowledged in the end");

    // The survivor holds every acknowledged message once, at the seq its sender was told, and
    // the channel's seqs have no gap (seq 1 is the channel's creation).
    let (history, last_seq) = chat_history(&direct, &format!("http://127.0.0.1:{}", ports[1]), "room", "s0").await;
    let seqs: Vec<u64> = history.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (2..=last_seq).collect::<Vec<u64>>(), "one gapless sequence");
    let kept: BTreeMap<String, u64> = history.iter().map(|m| (m["client_id"].as_str().unwrap().to_string(), m["seq"].as_u64().unwrap())).collect();
    assert_eq!(history.len(), total, "no message twice: a retry whose answer was lost with the node is a duplicate, not a second message");
    assert_eq!(kept, acked, "every acknowledged message at the seq its sender was told");
    println!(
        "{total} messages acknowledged ({killed_at} before the kill), each kept once; {} sends retried, {} answered as repeats of a send already in the log",
        RETRIED.load(Ordering::Relaxed),
        REPEATED.load(Ordering::Relaxed)
    );

    stop_the_survivor(balancer, &mut nodes[1]);
    NatsStreams::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_ticks_a_killed_node_acknowledged_are_in_the_others_log_once() {
    const FEEDS: u64 = 3;
    const PER_FEED: u64 = 200;
    let namespace = namespace("multinode-s");
    let (_dirs, ports, mut nodes) = two_nodes(&namespace, &[]).await;
    let direct = reqwest::Client::new();
    let (base, balancer, client) = behind_a_balancer(ports).await;

    // Feeds, one tick per request with its seq, each retried through the balancer until a node
    // answers 201 (accepted) or refuses it as a duplicate (a retry of a tick already in the log,
    // its answer lost with the killed node).
    let acked: Arc<Mutex<BTreeMap<String, bool>>> = Arc::default();
    let (retried, repeated) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut feeds = Vec::new();
    for feed in 0..FEEDS {
        let (client, url, acked, retried, repeated) = (client.clone(), format!("{base}/v1/stocks/ticks"), acked.clone(), retried.clone(), repeated.clone());
        feeds.push(tokio::spawn(async move {
            for seq in 1..=PER_FEED {
                let body = format!("{}\n", json!({"symbol": format!("feed.{feed}"), "price": seq, "size": 1, "seq": seq}));
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if let Ok(response) = client.post(&url).header("content-type", "application/x-ndjson").body(body.clone()).send().await {
                        let status = response.status().as_u16();
                        let answer: Value = response.json().await.unwrap_or(Value::Null);
                        if status == 201 {
                            break;
                        }
                        if status == 400 && answer["error"]["message"].as_str().is_some_and(|m| m.contains("duplicate")) {
                            repeated.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    assert!(Instant::now() < deadline, "tick {seq} of feed {feed} was not accepted within 60 s");
                    retried.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                acked.lock().insert(format!("{feed}-{seq}"), true);
            }
        }));
    }
    let total = (FEEDS * PER_FEED) as usize;
    let (killed_at, acked) = kill_at_a_third(&acked, total, &mut nodes[0], feeds).await;
    assert_eq!(acked.len(), total, "every tick was acknowledged in the end");

    // The survivor's log: each feed's seqs 1 to PER_FEED, once each, in order.
    let survivor = format!("http://127.0.0.1:{}", ports[1]);
    let page: Value = direct.get(format!("{survivor}/v1/stocks/replay?from_ms=0&symbols=feed.*&limit=100000")).send().await.unwrap().json().await.unwrap();
    assert!(page["next"].is_null(), "one page holds the whole log");
    for feed in 0..FEEDS {
        let symbol = format!("feed.{feed}");
        let seqs: Vec<u64> = page["ticks"].as_array().unwrap().iter().filter(|t| t["symbol"] == symbol.as_str()).map(|t| t["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=PER_FEED).collect::<Vec<u64>>(), "feed {feed}: every acknowledged tick once, in seq order");
        let view: Value = direct.get(format!("{survivor}/v1/stocks/symbols/{symbol}")).send().await.unwrap().json().await.unwrap();
        assert_eq!((view["ticks"].as_u64(), view["seq"].as_u64()), (Some(PER_FEED), Some(PER_FEED)), "{view}");
    }
    println!(
        "{total} ticks acknowledged ({killed_at} before the kill), each in the log once; {} requests retried, {} refused as repeats of a tick already in the log",
        retried.load(Ordering::Relaxed),
        repeated.load(Ordering::Relaxed)
    );

    stop_the_survivor(balancer, &mut nodes[1]);
    NatsStreams::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
}

/// A push provider of the test's own: answers 200 and notes each delivery id it was sent.
async fn push_provider() -> (String, Arc<Mutex<Vec<String>>>) {
    let taken: Arc<Mutex<Vec<String>>> = Arc::default();
    let noted = taken.clone();
    let app = axum::Router::new().route(
        "/push",
        axum::routing::post(move |body: axum::Json<Value>| {
            let noted = noted.clone();
            async move {
                noted.lock().push(body["delivery_id"].as_str().unwrap_or_default().to_string());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, taken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_notifications_a_killed_node_acknowledged_reach_every_recipient() {
    const SENDERS: u64 = 3;
    const TRIGGERS_PER_SENDER: u64 = 30;
    const RECIPIENTS: usize = 40;
    let namespace = namespace("multinode-f");
    // A fan-out node's workers, triggers and writers query at once: a pool larger than the default.
    let (_dirs, ports, mut nodes) = two_nodes(&namespace, &["--db", &postgres_url(), "--db-connections", "16"]).await;
    let (base, balancer, client) = behind_a_balancer(ports).await;
    let (provider, taken) = push_provider().await;
    let config = json!({"providers": {"push": [{"name": "push", "url": provider}]}, "provider_timeout_ms": 1_000, "retry": {"attempts": 20, "base_ms": 100, "max_ms": 1_000}});
    let response = client.put(format!("{base}/v1/fanout/config")).json(&config).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let users: Vec<String> = (0..RECIPIENTS).map(|i| format!("u{i:02}")).collect();
    for user in &users {
        let response = client.put(format!("{base}/v1/fanout/subscribers/{user}")).json(&json!({"push_tokens": [format!("device-{user}")]})).send().await.unwrap();
        assert!(response.status().is_success());
    }
    let response = client.put(format!("{base}/v1/fanout/topics/all/members")).json(&json!({"add": users})).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // Senders trigger one notification per request to the topic, each with an idempotency key,
    // retried until a node answers 202.
    let accepted: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (client, base, accepted) = (client.clone(), base.clone(), accepted.clone());
        senders.push(tokio::spawn(async move {
            for n in 0..TRIGGERS_PER_SENDER {
                let key = format!("s{sender}-{n}");
                let body = json!({"notifications": [{"category": "news", "topics": ["all"], "channels": ["push"], "title": key, "idempotency_key": key}]});
                let answer = post_until(&client, &format!("{base}/v1/fanout/notifications"), &body, reqwest::StatusCode::ACCEPTED, Duration::from_secs(60)).await;
                accepted.lock().insert(key, answer["notifications"][0]["id"].as_str().unwrap().to_string());
            }
        }));
    }
    let total = (SENDERS * TRIGGERS_PER_SENDER) as usize;
    let (killed_at, accepted) = kill_at_a_third(&accepted, total, &mut nodes[0], senders).await;
    assert_eq!(accepted.len(), total);

    // Every recipient of every accepted notification is sent its push, by the survivor for what
    // the killed node held (its expanders' leases and its workers' batches run out).
    let survivor = format!("http://127.0.0.1:{}", ports[1]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let wanted: BTreeSet<String> = accepted.values().flat_map(|id| users.iter().map(move |user| format!("{id}.push.{user}"))).collect();
    loop {
        let got: BTreeSet<String> = taken.lock().iter().cloned().collect();
        let missing = wanted.difference(&got).count();
        if missing == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} of {} deliveries of accepted notifications never reached the provider", wanted.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in accepted.values().take(5) {
        let view: Value = client.get(format!("{survivor}/v1/fanout/notifications/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!((view["expanded"].as_bool(), view["counts"]["delivered"].as_u64()), (Some(true), Some(RECIPIENTS as u64)), "{view}");
    }
    let overview: Value = client.get(format!("{survivor}/v1/fanout")).send().await.unwrap().json().await.unwrap();
    assert!(overview["expanders"].as_array().unwrap().iter().all(|e| e["this_node"] == true), "the survivor expands every partition: {overview}");
    let sent = taken.lock().len();
    println!("{total} notifications accepted ({killed_at} before the kill), {} deliveries, all sent ({sent} sends); {} triggers retried", wanted.len(), RETRIED.load(Ordering::Relaxed));

    stop_the_survivor(balancer, &mut nodes[1]);
    NatsQueues::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
    NatsStreams::connect(&nats_url(), &namespace).await.unwrap().delete_namespace().await.unwrap();
    let db = tributary_sql::Db::connect(&tributary_sql::DbConfig::new(postgres_url()).in_schema(namespace.as_str())).await.unwrap();
    db.drop_schema().await.unwrap();
}
