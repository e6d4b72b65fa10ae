//! The stream conformance suite against the machine's NATS with JetStream (127.0.0.1:4222, or
//! `TRIBUTARY_TEST_NATS_URL`), started or checked by `.ci/run`.

use tributary_core::Record;
use tributary_engine::conformance;
use tributary_engine::stream::{StreamStore, TopicConfig};
use tributary_nats::{NatsPubSub, NatsQueues, NatsStreams};

fn nats_url() -> String {
    std::env::var("TRIBUTARY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A namespace no other run uses.
fn namespace(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("test-{what}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_conforms_to_the_stream_interface() {
    let streams = NatsStreams::connect(&nats_url(), &namespace("conf")).await.expect("NATS answers (is it running with -js on 127.0.0.1:4222?)");
    let report = conformance::stream::run(&streams, "conf").await;
    streams.delete_namespace().await.unwrap();
    println!("{report}");
    report.assert_conforms();
    assert_eq!(report.passed.len() + report.skipped.len(), conformance::stream::CASES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_one_topic_and_its_commits() {
    let shared = namespace("nodes");
    let a = NatsStreams::connect(&nats_url(), &shared).await.unwrap();
    let b = NatsStreams::connect(&nats_url(), &shared).await.unwrap();
    a.create_topic("orders", TopicConfig { partitions: 2, ..TopicConfig::default() }).await.unwrap();
    let produced = b.produce("orders", vec![Record::keyed("customer-7", "first"), Record::keyed("customer-7", "second")]).await.unwrap();
    let partition = produced[0].partition;
    let read = a.fetch("orders", partition, produced[0].offset, 10).await.unwrap();
    assert_eq!(read.iter().map(|r| r.value.clone().unwrap()).collect::<Vec<_>>(), vec!["first", "second"]);
    a.commit("orders", "billing", partition, produced[1].offset + 1).await.unwrap();
    assert_eq!(b.committed("orders", "billing", partition).await.unwrap(), Some(produced[1].offset + 1));
    a.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_through_several_nodes_at_once_share_one_assignment() {
    // 24 members join one group at once through three connections (nodes): every join must
    // land (a join that finds the group changed by another node applies itself again), and the
    // last generation must give each partition exactly one owner, whichever node answers.
    let shared = namespace("groups");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(std::sync::Arc::new(NatsStreams::connect(&nats_url(), &shared).await.unwrap()));
    }
    nodes[0].create_topic("events", TopicConfig { partitions: 16, ..TopicConfig::default() }).await.unwrap();
    let joins = (0..24).map(|i| {
        let node = nodes[i % 3].clone();
        tokio::spawn(async move { node.join_group("events", "readers", Some(&format!("m{i:02}")), Some(60_000)).await.unwrap() })
    });
    let joined: Vec<_> = futures_util::future::join_all(joins).await.into_iter().map(|j| j.unwrap()).collect();
    let generations: std::collections::HashSet<u64> = joined.iter().map(|m| m.generation).collect();
    assert_eq!(generations.len(), 24, "each join started a generation of its own: {generations:?}");
    let mut seen = None;
    for node in &nodes {
        let members = node.describe_group("events", "readers").await.unwrap();
        assert_eq!(members.len(), 24);
        assert!(members.iter().all(|m| m.generation == members[0].generation));
        let mut owned: Vec<u32> = members.iter().flat_map(|m| m.partitions.clone()).collect();
        owned.sort_unstable();
        assert_eq!(owned, (0..16).collect::<Vec<_>>());
        if let Some(seen) = &seen {
            assert_eq!(&members, seen, "two nodes describe the group differently");
        }
        seen = Some(members);
    }
    // A member's commit through one node is fenced by what a join through another changed.
    let m00 = nodes[1].heartbeat("events", "readers", "m00").await.unwrap();
    nodes[2].join_group("events", "readers", Some("late"), Some(60_000)).await.unwrap();
    let refused = nodes[0].commit_member("events", "readers", "m00", m00.generation, vec![(m00.partitions[0], 0)]).await.unwrap_err();
    assert!(matches!(refused, tributary_engine::StreamError::StaleGeneration { .. }), "{refused}");
    nodes[0].delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_make_one_namespace_its_topics_and_queues() {
    // Each round, four connections (nodes) open a new namespace and create the same topic and
    // queue at once: every create succeeds, as when nodes start together behind a balancer.
    for round in 0..10 {
        let shared = namespace(&format!("together{round}"));
        let creates = (0..4).map(|_| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let streams = NatsStreams::connect(&nats_url(), &shared).await.unwrap();
                streams.create_topic("events", TopicConfig { partitions: 3, ..TopicConfig::default() }).await.unwrap();
                let queues = NatsQueues::connect(&nats_url(), &shared).await.unwrap();
                tributary_engine::queue::QueueStore::create_queue(&queues, "jobs", tributary_engine::queue::QueueConfig::default()).await.unwrap();
                streams
            })
        });
        let nodes: Vec<NatsStreams> = futures_util::future::join_all(creates).await.into_iter().map(|n| n.unwrap()).collect();
        assert_eq!(nodes[3].partitions("events").await.unwrap(), 3);
        NatsQueues::connect(&nats_url(), &shared).await.unwrap().delete_namespace().await.unwrap();
        nodes[0].delete_namespace().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_gives_a_partition_in_order_from_an_offset_then_what_is_appended() {
    let streams = NatsStreams::connect(&nats_url(), &namespace("tail")).await.unwrap();
    streams.create_topic("feed", TopicConfig { partitions: 1, ..TopicConfig::default() }).await.unwrap();
    let before: Vec<Record> = (0..5).map(|i| Record::from_value(format!("r{i}"))).collect();
    streams.produce("feed", before).await.unwrap();
    let mut tail = streams.tail("feed", 0, 2).await.unwrap().expect("NATS has a live tail");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(tail.next().await.unwrap());
    }
    let wait = tokio::time::timeout(std::time::Duration::from_millis(200), tail.next()).await;
    assert!(wait.is_err(), "at the end, the tail waits");
    streams.produce("feed", vec![Record::from_value("r5"), Record::from_value("r6")]).await.unwrap();
    for _ in 0..2 {
        got.push(tail.next().await.unwrap());
    }
    let seen: Vec<(u64, String)> = got.iter().map(|r| (r.offset, String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())).collect();
    assert_eq!(seen, (2..7).map(|i| (i, format!("r{i}"))).collect::<Vec<_>>());
    streams.delete_namespace().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_nats_is_a_backend_error() {
    let error = NatsStreams::connect("nats://127.0.0.1:1", "x").await.expect_err("nothing listens on port 1");
    assert!(matches!(error, tributary_engine::StreamError::Backend { backend: "nats", .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_conforms_to_the_queue_interface() {
    let queues = NatsQueues::connect(&nats_url(), &namespace("queue")).await.expect("NATS answers (is it running with -js on 127.0.0.1:4222?)");
    let report = conformance::queue::run(&queues, "conf").await;
    queues.delete_namespace().await.unwrap();
    println!("{report}");
    report.assert_conforms();
    assert_eq!(report.passed.len() + report.skipped.len(), conformance::queue::CASES.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_queue_and_a_dead_nodes_leases_come_back() {
    use std::time::Duration;
    use tributary_engine::queue::{NewMessage, QueueConfig, QueueStore, ReceiptOutcome};
    let shared = namespace("qnodes");
    let a = NatsQueues::connect(&nats_url(), &shared).await.unwrap();
    let b = NatsQueues::connect(&nats_url(), &shared).await.unwrap();
    a.create_queue("jobs", QueueConfig { lease_ms_default: 500, ..QueueConfig::default() }).await.unwrap();
    let ids = b.publish("jobs", vec![NewMessage::new("one"), NewMessage::new("two")]).await.unwrap();
    // Node a leases one message and acks it through node b; it leases the other and dies.
    let first = a.receive("jobs", "workers", "a-1", 1, None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(b.ack("jobs", "workers", vec![first[0].receipt.clone()]).await.unwrap(), vec![ReceiptOutcome::Ok]);
    let second = a.receive("jobs", "workers", "a-1", 1, None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(second.len(), 1);
    drop(a);
    let again = b.receive("jobs", "workers", "b-1", 10, None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(again.len(), 1, "only the unacked message comes back: {again:?}");
    assert_eq!(again[0].id, second[0].id);
    assert_eq!(again[0].delivery_count, 2);
    assert!(ids.contains(&again[0].id));
    b.ack("jobs", "workers", vec![again[0].receipt.clone()]).await.unwrap();
    assert!(b.receive("jobs", "workers", "b-1", 10, None, Duration::from_millis(900)).await.unwrap().is_empty());
    b.delete_namespace().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_conforms_to_the_pubsub_interface() {
    let pubsub = NatsPubSub::connect(&nats_url(), &namespace("ps")).await.expect("NATS answers on 127.0.0.1:4222");
    let report = conformance::pubsub::run(&pubsub, "conf").await;
    println!("{report}");
    report.assert_conforms();
    assert_eq!(report.passed.len(), conformance::pubsub::CASES.len(), "core NATS declares no gap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_the_subscribers_of_another() {
    use std::time::Duration;
    use tributary_core::{Subject, SubjectPattern};
    use tributary_engine::pubsub::{PubSubStore, SubscriberOptions};
    let shared = namespace("psnodes");
    let a = NatsPubSub::connect(&nats_url(), &shared).await.unwrap();
    let b = NatsPubSub::connect(&nats_url(), &shared).await.unwrap();
    let other = NatsPubSub::connect(&nats_url(), &namespace("psother")).await.unwrap();
    let mut on_b = b.subscribe(&SubjectPattern::parse("chat.*").unwrap(), SubscriberOptions::default()).await.unwrap();
    let mut elsewhere = other.subscribe(&SubjectPattern::parse("chat.*").unwrap(), SubscriberOptions::default()).await.unwrap();
    a.publish(&Subject::parse("chat.general").unwrap(), 7, "hello".into()).await.unwrap();
    let got = on_b.recv(Duration::from_secs(3)).await.unwrap();
    assert_eq!((got.subject.as_str(), got.offset, &got.message[..]), ("chat.general", 7, &b"hello"[..]));
    assert!(elsewhere.recv(Duration::from_millis(300)).await.is_err(), "another namespace saw the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_max_payload_is_too_large_and_nothing_of_its_produce_is_written() {
    let streams = NatsStreams::connect(&nats_url(), &namespace("payload")).await.unwrap();
    streams.create_topic("big", TopicConfig { partitions: 1, ..TopicConfig::default() }).await.unwrap();
    let largest = Record::from_value(vec![b'v'; tributary_core::limits::MESSAGE_BYTES_MAX]);
    let refused = streams.produce("big", vec![Record::from_value("small"), largest]).await.unwrap_err();
    assert!(matches!(&refused, tributary_engine::StreamError::TooLarge(m) if m.contains("record 1") && m.contains("max_payload")), "{refused}");
    assert_eq!(streams.offsets("big", 0).await.unwrap(), (0, 0), "the record before the large one was not written");
    streams.produce("big", vec![Record::from_value("after")]).await.unwrap();
    assert_eq!(streams.offsets("big", 0).await.unwrap(), (0, 1));
    streams.delete_namespace().await.unwrap();
}
