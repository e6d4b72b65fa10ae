//! Feature tests of topics and consumer groups through the public API.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tributary_core::Record;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    clock: Arc<AtomicI64>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture { dir: tempfile::tempdir().unwrap(), clock: Arc::new(AtomicI64::new(1_000_000)) }
    }

    fn open(&self) -> Topics {
        let clock = self.clock.clone();
        Topics::open_with_clock(self.dir.path(), Arc::new(move || clock.load(Ordering::SeqCst))).unwrap()
    }

    fn advance(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }
}

fn config(partitions: u32) -> TopicConfig {
    TopicConfig { partitions, ..TopicConfig::default() }
}

#[test]
fn records_of_one_key_stay_on_one_partition_in_order() {
    let f = Fixture::new();
    let topics = f.open();
    let topic = topics.create("orders", config(4)).unwrap();
    let mut placed = Vec::new();
    for i in 0..50 {
        let records = [Record::keyed(format!("user-{}", i % 5), format!("{i}"))];
        placed.push((i % 5, topic.produce(&records).unwrap()[0]));
    }
    for user in 0..5 {
        let mine: Vec<Produced> = placed.iter().filter(|(u, _)| *u == user).map(|(_, p)| *p).collect();
        assert!(mine.iter().all(|p| p.partition == mine[0].partition), "one key, one partition");
        assert!(mine.windows(2).all(|w| w[0].offset < w[1].offset), "in order");
    }
}

#[test]
fn a_batch_is_split_by_partition_and_every_record_is_reported_where_it_landed() {
    let f = Fixture::new();
    let topics = f.open();
    let topic = topics.create("events", config(3)).unwrap();
    let records: Vec<Record> = (0..30).map(|i| Record::keyed(format!("k{i}"), format!("v{i}"))).collect();
    let produced = topic.produce(&records).unwrap();
    for (record, at) in records.iter().zip(&produced) {
        let back = topic.fetch(at.partition, at.offset, 1, 1 << 20).unwrap();
        assert_eq!(back[0].value, record.value);
    }
}

#[test]
fn topics_and_their_data_survive_a_restart() {
    let f = Fixture::new();
    {
        let topics = f.open();
        let topic = topics.create("audit", config(2)).unwrap();
        topic.produce_to(1, &[Record::from_value("kept")]).unwrap();
        topics.close();
    }
    let topics = f.open();
    let topic = topics.get("audit").unwrap();
    assert_eq!(topic.partition_count(), 2);
    assert_eq!(topic.fetch(1, 0, 10, 1 << 20).unwrap()[0].value.as_deref(), Some(&b"kept"[..]));
    assert_eq!(topics.list()[0].partitions, vec![Some((0, 0)), Some((0, 1))]);
}

#[test]
fn creating_an_existing_topic_with_another_config_is_a_conflict() {
    let f = Fixture::new();
    let topics = f.open();
    topics.create("t", config(2)).unwrap();
    topics.create("t", config(2)).unwrap();
    assert!(matches!(topics.create("t", config(3)), Err(StreamError::TopicExists { .. })));
    assert!(matches!(topics.create("bad name", config(1)), Err(StreamError::Invalid(_))));
    assert!(matches!(topics.create("__internal", config(1)), Err(StreamError::Invalid(_))));
    assert!(matches!(topics.create("zero", config(0)), Err(StreamError::Invalid(_))));
    assert!(matches!(topics.get("missing"), Err(StreamError::TopicNotFound(_))));
}

#[test]
fn seek_by_timestamp_finds_the_first_record_at_or_after_it() {
    let f = Fixture::new();
    let topics = f.open();
    let topic = topics.create("ticks", config(1)).unwrap();
    for ts in [100, 200, 300, 400] {
        topic.produce_to(0, &[Record { timestamp_ms: ts, ..Record::from_value("x") }]).unwrap();
    }
    assert_eq!(topic.seek_timestamp(0, 250).unwrap(), 2);
    assert_eq!(topic.seek_timestamp(0, 50).unwrap(), 0);
    assert_eq!(topic.seek_timestamp(0, 500).unwrap(), 4, "past the end seeks to the end");
}

#[test]
fn a_retried_idempotent_batch_gets_its_original_offsets_even_after_a_restart() {
    let f = Fixture::new();
    let first = {
        let topics = f.open();
        let topic = topics.create("payments", config(1)).unwrap();
        topic.produce_idempotent(0, 42, 0, &[Record::from_value("a"), Record::from_value("b")]).unwrap()
    };
    let topics = f.open();
    let topic = topics.get("payments").unwrap();
    let retry = topic.produce_idempotent(0, 42, 0, &[Record::from_value("a"), Record::from_value("b")]).unwrap();
    assert!(retry.duplicate);
    assert_eq!((retry.base_offset, retry.last_offset), (first.base_offset, first.last_offset));
    assert_eq!(topic.offsets(0).unwrap().1, 2, "nothing written twice");
    assert!(topic.produce_idempotent(0, 42, 5, &[Record::from_value("gap")]).is_err());
}

#[test]
fn committed_offsets_survive_a_restart_and_lag_follows_them() {
    let f = Fixture::new();
    {
        let topics = f.open();
        let topic = topics.create("clicks", config(2)).unwrap();
        for _ in 0..10 {
            topic.produce_to(0, &[Record::from_value("x")]).unwrap();
        }
        topics.commit("clicks", "analytics", None, &[(0, 4)]).unwrap();
    }
    let topics = f.open();
    assert_eq!(topics.committed("clicks", "analytics", 0), Some(4));
    let lag = topics.lag("clicks", "analytics").unwrap();
    assert_eq!(lag[0], PartitionLag { partition: 0, committed: Some(4), end: 10, lag: 6 });
    assert_eq!(lag[1].lag, 0);
    assert!(topics.commit("clicks", "analytics", None, &[(0, 11)]).is_err(), "cannot commit past the end");
}

#[test]
fn members_share_partitions_and_a_silent_member_is_rebalanced_away() {
    let f = Fixture::new();
    let topics = f.open();
    topics.create("jobs", config(4)).unwrap();
    let a = topics.join_group("jobs", "g", Some("a"), Some(1000)).unwrap();
    assert_eq!(a.partitions, vec![0, 1, 2, 3]);
    let b = topics.join_group("jobs", "g", Some("b"), Some(1000)).unwrap();
    assert_eq!(b.generation, a.generation + 1);
    let a = topics.heartbeat("jobs", "g", "a").unwrap();
    assert_eq!(a.partitions.len() + b.partitions.len(), 4);
    assert!(a.partitions.iter().all(|p| !b.partitions.contains(p)), "no partition owned twice");

    // b goes silent: after its session timeout a owns everything again.
    f.advance(600);
    topics.heartbeat("jobs", "g", "a").unwrap();
    f.advance(600);
    let a = topics.heartbeat("jobs", "g", "a").unwrap();
    assert_eq!(a.partitions, vec![0, 1, 2, 3]);
    assert!(matches!(topics.heartbeat("jobs", "g", "b"), Err(StreamError::UnknownMember { .. })));
}

#[test]
fn a_member_may_only_commit_what_it_owns_in_the_current_generation() {
    let f = Fixture::new();
    let topics = f.open();
    topics.create("jobs", config(2)).unwrap();
    let a = topics.join_group("jobs", "g", Some("a"), None).unwrap();
    topics.commit("jobs", "g", Some(("a", a.generation)), &[(0, 0)]).unwrap();
    let b = topics.join_group("jobs", "g", Some("b"), None).unwrap();
    let err = topics.commit("jobs", "g", Some(("a", a.generation)), &[(0, 0)]).unwrap_err();
    assert!(matches!(err, StreamError::StaleGeneration { .. }), "{err}");
    let not_mine = if b.partitions.contains(&0) { 0 } else { 1 };
    let a = topics.heartbeat("jobs", "g", "a").unwrap();
    let err = topics.commit("jobs", "g", Some(("a", a.generation)), &[(not_mine, 0)]).unwrap_err();
    assert!(matches!(err, StreamError::NotAssigned { .. }), "{err}");
    topics.leave_group("jobs", "g", "b").unwrap();
    assert_eq!(topics.describe_group("jobs", "g").unwrap().len(), 1);
}

#[test]
fn deleting_a_topic_removes_its_data_and_offsets() {
    let f = Fixture::new();
    {
        let topics = f.open();
        topics.create("tmp", config(1)).unwrap().produce_to(0, &[Record::from_value("x")]).unwrap();
        topics.commit("tmp", "g", None, &[(0, 1)]).unwrap();
        topics.delete("tmp").unwrap();
        assert!(topics.get("tmp").is_err());
    }
    let topics = f.open();
    assert!(topics.get("tmp").is_err());
    assert_eq!(topics.committed("tmp", "g", 0), None);
    let topic = topics.create("tmp", config(1)).unwrap();
    assert_eq!(topic.offsets(0).unwrap(), (0, 0), "a new topic of the same name starts empty");
}

#[test]
fn a_corrupt_partition_is_fenced_while_the_others_keep_working() {
    let f = Fixture::new();
    {
        let topics = f.open();
        let topic = topics.create("mixed", TopicConfig { partitions: 2, segment_bytes: 4096, ..TopicConfig::default() }).unwrap();
        for i in 0..100 {
            topic.produce_to(0, &[Record::from_value(format!("record number {i}"))]).unwrap();
            topic.produce_to(1, &[Record::from_value(format!("record number {i}"))]).unwrap();
        }
    }
    // Flip a byte in the middle of partition 0's tail segment, leaving good batches after it.
    let part = f.dir.path().join("topics/mixed/0");
    let mut logs: Vec<_> = std::fs::read_dir(&part).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
    logs.sort();
    let tail = logs.last().unwrap();
    let mut bytes = std::fs::read(tail).unwrap();
    assert!(bytes.len() > 200, "the tail segment has several batches");
    bytes[60] ^= 0xff;
    std::fs::write(tail, bytes).unwrap();

    let topics = f.open();
    let topic = topics.get("mixed").unwrap();
    let fenced = topic.fenced_partitions();
    assert_eq!(fenced.len(), 1);
    assert_eq!(fenced[0].0, 0);
    assert!(topic.fetch(0, 0, 1, 100).is_err());
    assert_eq!(topic.fetch(1, 0, 1000, 1 << 20).unwrap().len(), 100);
}

#[test]
fn retention_drops_old_segments_in_maintenance() {
    let f = Fixture::new();
    let topics = f.open();
    let topic = topics.create("logs", TopicConfig { partitions: 1, segment_bytes: 4096, retention_bytes: Some(8192), ..TopicConfig::default() }).unwrap();
    for i in 0..500 {
        topic.produce_to(0, &[Record::from_value(format!("line {i:>40}"))]).unwrap();
    }
    topics.maintain().unwrap();
    let (start, end) = topic.offsets(0).unwrap();
    assert_eq!(end, 500);
    assert!(start > 0, "old segments were deleted");
    assert!(topic.log(0).unwrap().size_bytes() <= 8192 + 4096);
    assert!(topic.fetch(0, 0, 1, 100).is_err(), "reading below the start is out of range");
}
