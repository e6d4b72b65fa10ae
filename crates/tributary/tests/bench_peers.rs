//! The peer drivers of `tributary bench engine --peer` against the machine's real services with a
//! tiny workload: NATS JetStream on 127.0.0.1:4222, Redis on 6379, RabbitMQ on 5672 (guest),
//! started by `.ci/run`. Each run checks that every message came back exactly once (the bench
//! fails otherwise), that the report names the peer, its version and its durability, and that
//! the bench deleted what it created. A service that is down fails its test: none passes
//! without having talked to its peer. Two more runs start private `redis-server` and
//! `nats-server` processes with `--spawn-peer`.

use serde_json::Value;
use tributary::bench::engine::EngineArgs;
use tributary::bench::peers::{self, PeerArgs, PeerKind};
use tributary_log::Durability;

fn args(messages: u64, durability: Durability, rate: Option<u64>) -> EngineArgs {
    EngineArgs { batch: Some(10), partitions: 2, producers: Some(3), durability, rate, ..EngineArgs::new(messages) }
}

fn run(kind: PeerKind, args: &EngineArgs, spawn_peer: bool) -> Value {
    let peer = PeerArgs { peer: Some(kind), peer_url: None, spawn_peer };
    let report = peers::run(args, &peer).unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
    assert!(report.human().contains("durability"));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["messages"], args.messages);
    assert_eq!(json["consumed_messages"], args.messages, "every message came back: {json:#}");
    assert!(json["produce_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["consume_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["peer_version"].as_str().unwrap().chars().any(|c| c.is_ascii_digit()), "a version number: {json:#}");
    assert!(!json["durability_label"].as_str().unwrap().is_empty());
    json
}

/// Names this process's runs give their streams, keys and queues start with this.
fn our_prefix() -> String {
    format!("tributary-bench-{}-", std::process::id())
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

fn nats_streams_left() -> Vec<String> {
    use futures_util::TryStreamExt;
    block_on(async {
        let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
        let names: Vec<String> = async_nats::jetstream::new(client).stream_names().try_collect().await.unwrap();
        names.into_iter().filter(|n| n.starts_with(&our_prefix().replace('-', "_"))).collect()
    })
}

fn redis_keys_left() -> Vec<String> {
    block_on(async {
        let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS").arg(format!("{}*", our_prefix())).query_async(&mut connection).await.unwrap()
    })
}

fn rabbitmq_queues_left() -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl").args(["list_queues", "--quiet", "--no-table-headers", "name"]).output().unwrap();
    assert!(output.status.success(), "rabbitmqctl list_queues: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.starts_with(&our_prefix())).map(str::to_string).collect()
}

#[test]
fn nats_jetstream_returns_every_message() {
    let json = run(PeerKind::Nats, &args(1003, Durability::Never, None), false);
    assert_eq!(json["peer"], "nats");
    assert_eq!(json["durability"], "never", "JetStream acks before fsync by default");
    assert!(json["peer_version"].as_str().unwrap().starts_with("nats-server"));
    let json = run(PeerKind::Nats, &args(500, Durability::Never, Some(2000)), false);
    assert_eq!(json["publish_ack_ms"]["count"], 500);
    assert_eq!(json["end_to_end_ms"]["count"], 500);
    assert_eq!(nats_streams_left(), Vec::<String>::new(), "the bench deletes its streams");
}

#[test]
fn redis_streams_return_every_message() {
    let json = run(PeerKind::Redis, &args(1003, Durability::Never, None), false);
    assert_eq!(json["peer"], "redis");
    // The machine's Redis keeps nothing on disk; the label says so instead of claiming `never`.
    let class = json["durability"].as_str().unwrap();
    assert!(["memory", "never", "always", "interval:1000"].contains(&class), "{class}");
    let json = run(PeerKind::Redis, &args(500, Durability::Never, Some(2000)), false);
    assert_eq!(json["end_to_end_ms"]["count"], 500);
    assert_eq!(redis_keys_left(), Vec::<String>::new(), "the bench deletes its keys");
}

#[test]
fn redis_spawned_with_fsync_always_is_labelled_always() {
    let json = run(PeerKind::Redis, &args(300, Durability::Always, None), true);
    assert_eq!(json["durability"], "always");
    assert!(json["durability_label"].as_str().unwrap().contains("appendfsync always"));
}

#[test]
fn rabbitmq_quorum_queues_and_streams_return_every_message() {
    let json = run(PeerKind::Rabbitmq, &args(1003, Durability::Always, None), false);
    assert_eq!(json["peer"], "rabbitmq-quorum");
    assert_eq!(json["durability"], "always");
    assert!(json["peer_version"].as_str().unwrap().starts_with("RabbitMQ"));
    let json = run(PeerKind::Rabbitmq, &args(1003, Durability::Never, None), false);
    assert_eq!(json["peer"], "rabbitmq-stream");
    assert_eq!(json["durability"], "never", "streams confirm without fsync");
    let json = run(PeerKind::RabbitmqQuorum, &args(500, Durability::Always, Some(2000)), false);
    assert_eq!(json["publish_ack_ms"]["count"], 500);
    assert_eq!(rabbitmq_queues_left(), Vec::<String>::new(), "the bench deletes its queues");
}

#[test]
fn a_spawned_nats_server_asked_for_fsync_always_runs_or_says_why_not() {
    let peer = PeerArgs { peer: Some(PeerKind::Nats), peer_url: None, spawn_peer: true };
    match peers::run(&args(300, Durability::Always, None), &peer) {
        Ok(report) => assert_eq!(report.durability, "always"),
        // nats-server before 2.10 has no `sync_interval`: the bench must say so, not run unlabelled.
        Err(error) => assert!(format!("{error:#}").contains("sync_interval"), "{error:#}"),
    }
    let json = run(PeerKind::Nats, &args(300, Durability::Never, None), true);
    assert_eq!(json["durability"], "never");
}
