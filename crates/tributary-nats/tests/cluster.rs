//! A three-node NATS cluster started by the test on loopback ports (`nats-server` routes,
//! JetStream with three replicas): the node leading a topic's partition and a queue's stream is
//! killed with SIGKILL under load, and the stream and the queue keep serving and lose nothing
//! they acknowledged.
//!
//! Needs `nats-server` on the PATH (Debian's `nats-server`, which `.ci/services` checks).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tributary_core::Record;
use tributary_engine::queue::{NewMessage, QueueConfig, QueueStore};
use tributary_engine::stream::{StreamStore, TopicConfig};
use tributary_nats::{NatsQueues, NatsStreams};

struct Node {
    name: String,
    client_port: u16,
    child: Option<Child>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// How long the stream and the queue may take to acknowledge again after the kill.
const FAILOVER_MAX: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    fn start(size: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (i, (client_port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let routes: Vec<String> = ports.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, (_, c))| format!("\"nats-route://127.0.0.1:{c}\"")).collect();
            let store = dir.path().join(&name);
            let config = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\njetstream {{ store_dir: \"{}\" }}\ncluster {{ name: tributary-test, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                store.display(),
                routes.join(", ")
            );
            let config_path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new("nats-server")
                .arg("-c")
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server is on the PATH (Debian package nats-server)");
            nodes.push(Node { name, client_port: *client_port, child: Some(child) });
        }
        Cluster { _dir: dir, nodes }
    }

    fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.client_port)).collect::<Vec<_>>().join(",")
    }

    fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"));
        let mut child = node.child.take().expect("the node runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Retries `connect` until the cluster has a JetStream leader and three peers (up to 60 s).
async fn until_ready<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(mut connect: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match connect().await {
            Ok(value) => return value,
            Err(e) if Instant::now() > deadline => panic!("the cluster did not come up: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The server leading a stream, from JetStream's stream info.
async fn leader(urls: &str, stream: &str) -> String {
    let servers: Vec<&str> = urls.split(',').collect();
    let jetstream = async_nats::jetstream::new(async_nats::connect(servers).await.unwrap());
    let mut stream = jetstream.get_stream(stream).await.unwrap();
    let info = stream.info().await.unwrap();
    info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("a replicated stream has a leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leading_nats_node_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3);
    let urls = cluster.urls();
    let streams = until_ready(|| NatsStreams::connect_with_replicas(&urls, "ha", 3)).await;
    let queues = until_ready(|| NatsQueues::connect_with_replicas(&urls, "ha", 3)).await;
    until_ready(|| streams.create_topic("orders", TopicConfig { partitions: 1, ..TopicConfig::default() })).await;
    until_ready(|| queues.create_queue("jobs", QueueConfig { lease_ms_default: 2_000, ..QueueConfig::default() })).await;

    // Load: a producer and a queue publisher, each recording what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(Mutex::new(Vec::<u64>::new()));
    let published = Arc::new(Mutex::new(Vec::<u64>::new()));
    let errors = Arc::new(Mutex::new(0u64));
    let producer = {
        let (streams, stop, produced, errors) = (streams.clone(), stop.clone(), produced.clone(), errors.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match streams.produce("orders", vec![Record::from_value(i.to_string())]).await {
                    Ok(_) => produced.lock().push(i),
                    Err(_) => {
                        *errors.lock() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += 1;
            }
        })
    };
    let publisher = {
        let (queues, stop, published, errors) = (queues.clone(), stop.clone(), published.clone(), errors.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match queues.publish("jobs", vec![NewMessage::new(i.to_string())]).await {
                    Ok(_) => published.lock().push(i),
                    Err(_) => {
                        *errors.lock() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let topic_leader = leader(&urls, "TRIB_ha_orders_0").await;
    let before_kill = (produced.lock().len(), published.lock().len());
    assert!(before_kill.0 > 0 && before_kill.1 > 0, "nothing was acknowledged before the kill: {before_kill:?}");
    let killed_at = Instant::now();
    cluster.kill(&topic_leader);
    // The two survivors keep a quorum of the three replicas: both must acknowledge again once
    // JetStream has elected new leaders (its Raft election timeout is several seconds).
    let mut recovered = None;
    while killed_at.elapsed() < FAILOVER_MAX {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if produced.lock().len() > before_kill.0 + 10 && published.lock().len() > before_kill.1 + 10 {
            recovered = Some(killed_at.elapsed());
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    publisher.await.unwrap();
    let produced = produced.lock().clone();
    let published = published.lock().clone();
    let recovered = recovered.unwrap_or_else(|| {
        panic!("the stream and the queue did not both acknowledge again within {FAILOVER_MAX:?} of killing {topic_leader}: {before_kill:?} then {} and {}", produced.len(), published.len())
    });

    // Every acknowledged record is in the partition.
    let (start, end) = streams.offsets("orders", 0).await.unwrap();
    let mut stored = BTreeSet::new();
    let mut offset = start;
    while offset < end {
        let records = streams.fetch("orders", 0, offset, 1_000).await.unwrap();
        offset += records.len() as u64;
        stored.extend(records.iter().map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).parse::<u64>().unwrap()));
    }
    let lost: Vec<&u64> = produced.iter().filter(|i| !stored.contains(i)).collect();
    assert!(lost.is_empty(), "{} acknowledged records lost after killing {topic_leader}, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);

    // Every acknowledged queue message is delivered.
    let mut delivered = BTreeSet::new();
    loop {
        let got = queues.receive("jobs", "workers", "w", 1_000, None, Duration::from_secs(1)).await.unwrap();
        if got.is_empty() {
            break;
        }
        delivered.extend(got.iter().map(|d| String::from_utf8_lossy(&d.body).parse::<u64>().unwrap()));
        queues.ack("jobs", "workers", got.into_iter().map(|d| d.receipt).collect()).await.unwrap();
    }
    let lost: Vec<&u64> = published.iter().filter(|i| !delivered.contains(i)).collect();
    assert!(lost.is_empty(), "{} acknowledged queue messages lost after killing {topic_leader}, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    println!(
        "killed {topic_leader}: acknowledging again after {recovered:?}; {} records and {} queue messages acknowledged ({} before the kill), {} publish errors during the failover, none lost",
        produced.len(),
        published.len(),
        before_kill.0 + before_kill.1,
        *errors.lock()
    );
}
