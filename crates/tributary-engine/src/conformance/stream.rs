//! The stream interface's guarantees ([`StreamStore`]), one case each. Every case works on
//! topics of its own (`<namespace>-<case>`), deleted at its end.

use std::time::Duration;

use bytes::Bytes;
use tributary_core::{Header, Record, StoredRecord, limits, now_ms, partition_for_key};

use super::{CaseFuture, Report, ok, refused};
use tributary_log::LogError;
use tributary_log::batch::EncodeError;

use crate::StreamError;
use crate::stream::{Membership, SESSION_TIMEOUT_MS_MAX, SESSION_TIMEOUT_MS_MIN, StreamStore, TopicConfig};


/// One guarantee of the StreamStore interface.
pub type Case = super::Case<dyn StreamStore, String>;

/// Every case, in the order they run.
pub const CASES: &[Case] = &[
    Case { name: "round_trip", guarantee: "a record comes back as it went in (key, value, tombstone, empty value, headers in order, timestamp); a fetch past the end is OffsetOutOfRange", run: round_trip },
    Case { name: "stamped", guarantee: "a record produced with timestamp 0 is stamped with the append time", run: stamped },
    Case { name: "contiguous", guarantee: "offsets start at 0, are contiguous, and follow the order of a produce; a fetch, small or large, returns exactly the range asked for", run: contiguous },
    Case { name: "keyed", guarantee: "a keyed record goes to partition_for_key, and a key's records keep their order", run: keyed },
    Case { name: "unkeyed", guarantee: "the unkeyed records of one produce land together on one partition", run: unkeyed },
    Case { name: "conditional", guarantee: "produce_at appends only at the expected end, else EndMoved naming the end; of writers racing at one end exactly one gets in, its records together", run: conditional },
    Case { name: "limits", guarantee: "a produce with a record over a named limit, or with over BATCH_RECORDS_MAX records for one partition, is refused by name and writes nothing on any partition; an empty produce writes nothing; an empty conditional append is refused", run: limits },
    Case { name: "largest_record", guarantee: "a record of MESSAGE_BYTES_MAX bytes (key, value and headers together) goes in and comes back whole", run: largest_record },
    Case { name: "seek_time", guarantee: "seek_timestamp gives the first offset at or after a time, the end past the last", run: seek_time },
    Case { name: "errors", guarantee: "unknown topics and partitions, conflicting configurations and bad names are refused by name", run: errors },
    Case { name: "commits", guarantee: "committed offsets are per group and partition, and cannot pass the end", run: commits },
    Case { name: "membership", guarantee: "members of a group share its partitions, one owner each per generation; a join or a leave starts a new generation that heartbeats return; made-up member ids differ", run: membership },
    Case { name: "session_expiry", guarantee: "a member silent past its session timeout is removed and its partitions go to the others; out-of-range timeouts are refused", run: session_expiry },
    Case { name: "member_commits", guarantee: "a member commits only partitions it owns in the current generation, while live; a stale generation, another's partition or an unknown member is refused by name and changes nothing", run: member_commits },
    Case { name: "delete", guarantee: "a deleted topic is gone with its data, commits and members; one created again starts empty", run: delete },
];

/// Runs every case against `store`, with topics under `namespace` (unique per run; keep it short:
/// topic names are at most `NAME_BYTES_MAX` bytes).
pub async fn run(store: &(dyn StreamStore + 'static), namespace: &str) -> Report {
    super::run_cases(store, store.backend(), store.gaps(), CASES, |case| format!("{namespace}-{}", case.replace('_', "-")), |s, topic| Box::pin(async move { let _ = s.delete_topic(&topic).await; })).await
}





fn topic_config(partitions: u32) -> TopicConfig {
    TopicConfig { partitions, ..TopicConfig::default() }
}

fn value(record: &StoredRecord) -> String {
    record.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
}

fn round_trip(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(1)).await, "create")?;
        let headers = vec![
            Header { name: "trace".into(), value: Bytes::from_static(b"abc") },
            Header { name: "content-type".into(), value: Bytes::from_static(b"application/json") },
            Header { name: "trace".into(), value: Bytes::from_static(b"second") },
        ];
        let sent = vec![
            Record { key: Some(Bytes::from_static(b"user-1")), value: Some(Bytes::from_static(b"{\"n\":1}")), headers: headers.clone(), timestamp_ms: 1_700_000_000_123 },
            Record { key: Some(Bytes::from_static(b"user-1")), value: None, headers: Vec::new(), timestamp_ms: 1_700_000_000_124 },
            Record { key: None, value: Some(Bytes::new()), headers: Vec::new(), timestamp_ms: 1_700_000_000_125 },
            Record { key: None, value: Some(Bytes::from(vec![0u8, 255, 10, 13])), headers: Vec::new(), timestamp_ms: 1_700_000_000_126 },
        ];
        let produced = ok(s.produce(&topic, sent.clone()).await, "produce")?;
        check_eq!(produced.iter().map(|p| (p.partition, p.offset)).collect::<Vec<_>>(), vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
        let got = ok(s.fetch(&topic, 0, 0, 100).await, "fetch")?;
        check_eq!(got.len(), sent.len());
        for (i, (record, want)) in got.iter().zip(&sent).enumerate() {
            check_eq!(record.offset, i as u64);
            check_eq!(record.key, want.key);
            check_eq!(record.value, want.value);
            check_eq!(record.headers, want.headers);
            check_eq!(record.timestamp_ms, want.timestamp_ms);
        }
        let one = ok(s.fetch(&topic, 0, 1, 1).await, "fetch one")?;
        check_eq!(one.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![1]);
        check!(ok(s.fetch(&topic, 0, 4, 10).await, "fetch at the end")?.is_empty(), "a fetch at the end returned records");
        let out_of_range = |e: &StreamError| matches!(e, StreamError::Partition { source: LogError::OffsetOutOfRange { requested: 40, start: 0, end: 4 }, .. });
        refused(s.fetch(&topic, 0, 40, 10).await, "fetch past the end", out_of_range)?;
        check_eq!(ok(s.offsets(&topic, 0).await, "offsets")?, (0, 4));
        Ok(())
    })
}

fn stamped(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(1)).await, "create")?;
        let before = now_ms();
        ok(s.produce(&topic, vec![Record::from_value("x")]).await, "produce")?;
        let after = now_ms();
        let got = ok(s.fetch(&topic, 0, 0, 1).await, "fetch")?;
        let stamp = got.first().map(|r| r.timestamp_ms).ok_or("the record is missing")?;
        check!(stamp >= before - 1 && stamp <= after + 1, "stamped {stamp}, produced between {before} and {after}");
        Ok(())
    })
}

fn contiguous(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(1)).await, "create")?;
        check_eq!(ok(s.offsets(&topic, 0).await, "offsets of an empty topic")?, (0, 0));
        let first: Vec<Record> = (0..300).map(|i| Record::from_value(format!("m{i}"))).collect();
        let produced = ok(s.produce(&topic, first).await, "produce")?;
        check_eq!(produced.iter().map(|p| p.offset).collect::<Vec<_>>(), (0..300).collect::<Vec<u64>>());
        let produced = ok(s.produce(&topic, vec![Record::from_value("m300"), Record::from_value("m301")]).await, "produce")?;
        check_eq!(produced.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![300, 301]);
        let mut offset = 0;
        while offset < 302 {
            let batch = ok(s.fetch(&topic, 0, offset, 64).await, "fetch")?;
            check!(!batch.is_empty() && batch.len() <= 64, "a fetch of at most 64 from {offset} returned {}", batch.len());
            for record in &batch {
                check_eq!(record.offset, offset);
                check_eq!(value(record), format!("m{offset}"));
                offset += 1;
            }
        }
        check_eq!(ok(s.offsets(&topic, 0).await, "offsets")?, (0, 302));
        // Large reads (a backend may read them another way): exactly the range asked for.
        for (from, max, want) in [(0, 1_000, 0..302), (10, 130, 10..140), (150, 200, 150..302)] {
            let batch = ok(s.fetch(&topic, 0, from, max).await, "a large fetch")?;
            check_eq!(batch.iter().map(|r| r.offset).collect::<Vec<_>>(), want.clone().collect::<Vec<u64>>());
            check!(batch.iter().all(|r| value(r) == format!("m{}", r.offset)), "a large fetch from {from} returned other values");
        }
        Ok(())
    })
}

fn keyed(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(4)).await, "create")?;
        check_eq!(ok(s.partitions(&topic).await, "partitions")?, 4);
        let records: Vec<Record> = (0..40).map(|i| Record::keyed(format!("key-{}", i % 10), format!("{i}"))).collect();
        let produced = ok(s.produce(&topic, records).await, "produce")?;
        for (i, p) in produced.iter().enumerate() {
            let key = format!("key-{}", i % 10);
            check_eq!(p.partition, partition_for_key(key.as_bytes(), 4));
        }
        for partition in 0..4 {
            let got = ok(s.fetch(&topic, partition, 0, 100).await, "fetch")?;
            let mut last_per_key = std::collections::HashMap::new();
            for record in got {
                let key = record.key.clone().ok_or("a keyed record came back without its key")?;
                check_eq!(partition_for_key(&key, 4), partition);
                let n: i64 = value(&record).parse().map_err(|_| "a value is not the number sent")?;
                let last = last_per_key.insert(key, n);
                check!(last.is_none_or(|last| last < n), "records of one key came back out of order");
            }
        }
        Ok(())
    })
}

fn unkeyed(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(3)).await, "create")?;
        for batch in 0..3 {
            let produced = ok(s.produce(&topic, vec![Record::from_value(format!("{batch}a")), Record::from_value(format!("{batch}b"))]).await, "produce")?;
            check!(produced[0].partition == produced[1].partition, "one produce's unkeyed records went to two partitions");
            check_eq!(produced[1].offset, produced[0].offset + 1);
        }
        Ok(())
    })
}

fn conditional(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(2)).await, "create")?;
        let records = |names: &[&str]| names.iter().map(|n| Record::from_value(n.to_string())).collect::<Vec<_>>();
        check_eq!(ok(s.produce_at(&topic, 1, 0, records(&["a", "b"])).await, "an append at the end of an empty partition")?, 0);
        check_eq!(ok(s.produce_at(&topic, 1, 2, records(&["c"])).await, "an append at the new end")?, 2);
        let passed = |e: &StreamError| matches!(e, StreamError::EndMoved { expected: 2, end: 3, appended: 0, partition: 1, .. });
        refused(s.produce_at(&topic, 1, 2, records(&["late", "later"])).await, "an append expecting an end passed", passed)?;
        let ahead = |e: &StreamError| matches!(e, StreamError::EndMoved { expected: 5, end: 3, appended: 0, partition: 1, .. });
        refused(s.produce_at(&topic, 1, 5, records(&["early"])).await, "an append expecting an end not reached", ahead)?;
        check_eq!(ok(s.offsets(&topic, 1).await, "offsets")?, (0, 3));
        check_eq!(ok(s.fetch(&topic, 1, 0, 10).await, "fetch")?.iter().map(value).collect::<Vec<_>>(), vec!["a", "b", "c"]);
        check_eq!(ok(s.offsets(&topic, 0).await, "offsets of the other partition")?, (0, 0));
        refused(s.produce_at(&topic, 2, 0, records(&["x"])).await, "an append to partition 2 of 2", |e| matches!(e, StreamError::PartitionNotFound { partition: 2, .. }))?;
        refused(s.produce_at(&format!("{topic}-missing"), 0, 0, records(&["x"])).await, "an append to a missing topic", |e| matches!(e, StreamError::TopicNotFound(_)))?;

        // Writers that each read the end and append three records at it, concurrently. Every
        // record of the log then follows the one before it in its own append, and the log
        // holds exactly what the answers say went in.
        let topic = topic.as_str();
        let writer = |w: u32| async move {
            let mut went_in = 0usize;
            for round in 0..8 {
                let (_, end) = s.offsets(topic, 0).await?;
                let batch = (0..3).map(|i| Record::from_value(format!("{w}-{round}-{i}"))).collect();
                match s.produce_at(topic, 0, end, batch).await {
                    Ok(offset) if offset == end => went_in += 3,
                    Ok(offset) => return Err(StreamError::Invalid(format!("appended at {offset}, expected {end}"))),
                    Err(StreamError::EndMoved { expected, end: moved, appended, .. }) if moved > expected => went_in += appended,
                    Err(error) => return Err(error),
                }
            }
            Ok(went_in)
        };
        let results = futures_util::future::join_all((0..4).map(writer)).await;
        let mut went_in = 0;
        for result in results {
            went_in += ok(result, "a racing writer")?;
        }
        let end = ok(s.offsets(topic, 0).await, "offsets after the race")?.1;
        check_eq!(end as usize, went_in);
        let mut log = Vec::new();
        while (log.len() as u64) < end {
            let batch = ok(s.fetch(topic, 0, log.len() as u64, 100).await, "fetch")?;
            check!(!batch.is_empty(), "the log ends early, at {}", log.len());
            log.extend(batch.iter().map(value));
        }
        check!(log.len() >= 3, "no racing writer got in");
        for (i, name) in log.iter().enumerate() {
            let (run, n) = name.rsplit_once('-').ok_or("a record without its index")?;
            if n != "0" {
                let before = format!("{run}-{}", n.parse::<u32>().map_err(|e| e.to_string())? - 1);
                check!(i > 0 && log[i - 1] == before, "record {i} ({name}) does not follow {before}: {log:?}");
            }
        }
        Ok(())
    })
}

fn seek_time(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(1)).await, "create")?;
        ok(s.produce(&topic, vec![Record::from_value("early"), Record::from_value("early too")]).await, "produce")?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let between = now_ms();
        tokio::time::sleep(Duration::from_millis(30)).await;
        ok(s.produce(&topic, vec![Record::from_value("late")]).await, "produce")?;
        check_eq!(ok(s.seek_timestamp(&topic, 0, between).await, "seek between")?, 2);
        check_eq!(ok(s.seek_timestamp(&topic, 0, 0).await, "seek to the start")?, 0);
        check_eq!(ok(s.seek_timestamp(&topic, 0, now_ms() + 60_000).await, "seek past the last")?, 3);
        Ok(())
    })
}

/// A produce refused for a record over a limit that `check` accepts.
fn over_limit(e: &StreamError, check: fn(&EncodeError) -> bool) -> bool {
    matches!(e, StreamError::Log(LogError::Limit(limit)) if check(limit))
}

fn limits(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(2)).await, "create")?;
        let key_to = |partition: u32| (0..).map(|i| format!("k{i}")).find(|k| partition_for_key(k.as_bytes(), 2) == partition).expect("some key lands on each partition");
        let (k0, k1) = (key_to(0), key_to(1));
        let fine = || Record::keyed(k0.clone(), "fine");
        let too_large = Record::keyed(k1.clone(), Bytes::from(vec![b'x'; limits::MESSAGE_BYTES_MAX + 1]));
        refused(s.produce(&topic, vec![fine(), too_large.clone()]).await, "a record over MESSAGE_BYTES_MAX", |e| over_limit(e, |l| matches!(l, EncodeError::MessageTooLarge { index: 1, .. })))?;
        let long_key = Record::keyed(vec![b'k'; limits::KEY_BYTES_MAX + 1], "v");
        refused(s.produce(&topic, vec![fine(), long_key]).await, "a key over KEY_BYTES_MAX", |e| over_limit(e, |l| matches!(l, EncodeError::KeyTooLarge { index: 1, .. })))?;
        let headers = (0..=limits::HEADERS_COUNT_MAX).map(|i| Header { name: format!("h{i}"), value: Bytes::new() }).collect();
        let many_headers = Record { key: Some(Bytes::from(k1.clone())), value: Some(Bytes::from_static(b"v")), headers, timestamp_ms: 0 };
        refused(s.produce(&topic, vec![fine(), many_headers]).await, "over HEADERS_COUNT_MAX headers", |e| over_limit(e, |l| matches!(l, EncodeError::TooManyHeaders { index: 1, .. })))?;
        let mut crowd: Vec<Record> = (0..=limits::BATCH_RECORDS_MAX).map(|_| fine()).collect();
        crowd.push(Record::keyed(k1.clone(), "other"));
        let crowded = |e: &StreamError| matches!(e, StreamError::Partition { partition: 0, source: LogError::Limit(EncodeError::RecordCount { .. }), .. });
        refused(s.produce(&topic, crowd).await, "over BATCH_RECORDS_MAX records for one partition", crowded)?;
        check_eq!(ok(s.produce(&topic, Vec::new()).await, "an empty produce")?.len(), 0);
        let empty = |e: &StreamError| matches!(e, StreamError::Partition { partition: 1, source: LogError::Limit(EncodeError::RecordCount { got: 0, .. }), .. });
        refused(s.produce_at(&topic, 1, 0, Vec::new()).await, "an empty conditional append", empty)?;
        refused(s.produce_at(&topic, 1, 0, vec![too_large]).await, "a conditional append of a record over MESSAGE_BYTES_MAX", |e| over_limit(e, |l| matches!(l, EncodeError::MessageTooLarge { index: 0, .. })))?;
        for partition in 0..2 {
            check_eq!(ok(s.offsets(&topic, partition).await, "offsets after refused produces")?, (0, 0));
        }
        Ok(())
    })
}

fn largest_record(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(1)).await, "create")?;
        let header = Header { name: "h".into(), value: Bytes::from_static(b"1") };
        let value = Bytes::from(vec![b'v'; limits::MESSAGE_BYTES_MAX - 3]);
        let record = Record { key: Some(Bytes::from_static(b"k")), value: Some(value), headers: vec![header], timestamp_ms: 0 };
        check_eq!(record.payload_bytes(), limits::MESSAGE_BYTES_MAX);
        ok(s.produce(&topic, vec![record.clone()]).await, "a record of MESSAGE_BYTES_MAX bytes")?;
        let got = ok(s.fetch(&topic, 0, 0, 1).await, "fetch")?;
        check_eq!(got.len(), 1);
        check!(got[0].key == record.key && got[0].value == record.value && got[0].headers == record.headers, "the largest record came back changed");
        Ok(())
    })
}

fn errors(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let missing = format!("{topic}-missing");
        let not_found = |e: &StreamError| matches!(e, StreamError::TopicNotFound(_));
        refused(s.fetch(&missing, 0, 0, 1).await, "fetch from a missing topic", not_found)?;
        refused(s.produce(&missing, vec![Record::from_value("x")]).await, "produce to a missing topic", not_found)?;
        refused(s.partitions(&missing).await, "partitions of a missing topic", not_found)?;
        ok(s.create_topic(&topic, topic_config(2)).await, "create")?;
        ok(s.create_topic(&topic, topic_config(2)).await, "create again, the same")?;
        refused(s.create_topic(&topic, topic_config(3)).await, "create again, different", |e| matches!(e, StreamError::TopicExists { .. }))?;
        check_eq!(ok(s.partitions(&topic).await, "partitions")?, 2);
        let no_partition = |e: &StreamError| matches!(e, StreamError::PartitionNotFound { partition: 2, .. });
        refused(s.fetch(&topic, 2, 0, 1).await, "fetch from partition 2 of 2", no_partition)?;
        refused(s.offsets(&topic, 2).await, "offsets of partition 2 of 2", no_partition)?;
        refused(s.create_topic("bad name!", topic_config(1)).await, "a name with a space", |e| matches!(e, StreamError::Invalid(_)))?;
        refused(s.create_topic(&format!("{topic}-zero"), topic_config(0)).await, "zero partitions", |e| matches!(e, StreamError::Invalid(_)))?;
        Ok(())
    })
}

fn commits(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(2)).await, "create")?;
        ok(s.produce(&topic, (0..5).map(|i| Record::from_value(format!("{i}"))).collect()).await, "produce")?;
        let p = ok(s.produce(&topic, vec![Record::keyed("k", "v")]).await, "produce")?[0].partition;
        let other = 1 - p;
        let p_end = ok(s.offsets(&topic, p).await, "offsets")?.1;
        check_eq!(ok(s.committed(&topic, "billing", p).await, "committed before any commit")?, None);
        ok(s.commit(&topic, "billing", p, 1).await, "commit")?;
        check_eq!(ok(s.committed(&topic, "billing", p).await, "committed")?, Some(1));
        ok(s.commit(&topic, "billing", p, p_end).await, "commit the end")?;
        check_eq!(ok(s.committed(&topic, "billing", p).await, "committed")?, Some(p_end));
        ok(s.commit(&topic, "billing", p, 0).await, "commit back to 0 (a reset)")?;
        check_eq!(ok(s.committed(&topic, "billing", p).await, "committed after a reset")?, Some(0));
        check_eq!(ok(s.committed(&topic, "audit", p).await, "another group")?, None);
        check_eq!(ok(s.committed(&topic, "billing", other).await, "another partition")?, None);
        refused(s.commit(&topic, "billing", p, p_end + 1).await, "a commit past the end", |e| matches!(e, StreamError::Invalid(_)))?;
        check_eq!(ok(s.committed(&topic, "billing", p).await, "committed after a refused commit")?, Some(0));
        Ok(())
    })
}

fn delete(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(1)).await, "create")?;
        ok(s.produce(&topic, vec![Record::from_value("a"), Record::from_value("b")]).await, "produce")?;
        ok(s.commit(&topic, "g", 0, 2).await, "commit")?;
        ok(s.join_group(&topic, "g", Some("m1"), None).await, "join")?;
        ok(s.delete_topic(&topic).await, "delete")?;
        refused(s.fetch(&topic, 0, 0, 10).await, "fetch from a deleted topic", |e| matches!(e, StreamError::TopicNotFound(_)))?;
        refused(s.delete_topic(&topic).await, "delete again", |e| matches!(e, StreamError::TopicNotFound(_)))?;
        ok(s.create_topic(&topic, topic_config(1)).await, "create again")?;
        check_eq!(ok(s.offsets(&topic, 0).await, "offsets")?, (0, 0));
        check!(ok(s.fetch(&topic, 0, 0, 10).await, "fetch")?.is_empty(), "a topic created again still has records");
        check_eq!(ok(s.committed(&topic, "g", 0).await, "committed")?, None);
        check!(ok(s.describe_group(&topic, "g").await, "describe")?.is_empty(), "a topic created again still has members");
        Ok(())
    })
}

/// Checks that `members` own every partition of `0..partitions` exactly once, all at one
/// generation.
fn check_assignment(members: &[Membership], partitions: u32) -> Result<(), String> {
    let mut owned: Vec<u32> = members.iter().flat_map(|m| m.partitions.iter().copied()).collect();
    owned.sort_unstable();
    check_eq!(owned, (0..partitions).collect::<Vec<_>>());
    check!(members.windows(2).all(|w| w[0].generation == w[1].generation), "members at different generations: {members:?}");
    Ok(())
}

fn membership(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(4)).await, "create")?;
        let a = ok(s.join_group(&topic, "g", Some("a"), Some(60_000)).await, "join a")?;
        check_eq!(a.partitions, vec![0, 1, 2, 3]);
        let b = ok(s.join_group(&topic, "g", Some("b"), Some(60_000)).await, "join b")?;
        check_eq!(b.generation, a.generation + 1);
        let a = ok(s.heartbeat(&topic, "g", "a").await, "heartbeat a")?;
        check_eq!(a.generation, b.generation);
        check!(!a.partitions.is_empty() && !b.partitions.is_empty(), "a member of two owns nothing: {a:?} {b:?}");
        check_assignment(&[a.clone(), b.clone()], 4)?;
        check_eq!(ok(s.describe_group(&topic, "g").await, "describe")?, vec![a.clone(), b.clone()]);
        let again = ok(s.join_group(&topic, "g", Some("b"), Some(60_000)).await, "join b again")?;
        check_eq!(again, b);
        check!(ok(s.describe_group(&topic, "other").await, "describe another group")?.is_empty(), "another group has members");

        ok(s.leave_group(&topic, "g", "b").await, "leave b")?;
        let a = ok(s.heartbeat(&topic, "g", "a").await, "heartbeat a after b left")?;
        check_eq!(a.generation, b.generation + 1);
        check_eq!(a.partitions, vec![0, 1, 2, 3]);
        refused(s.heartbeat(&topic, "g", "b").await, "heartbeat of a member that left", |e| matches!(e, StreamError::UnknownMember { .. }))?;

        let c = ok(s.join_group(&topic, "g", None, None).await, "join with a made-up id")?;
        let d = ok(s.join_group(&topic, "g", None, None).await, "join with a made-up id")?;
        check!(c.member_id != d.member_id && c.member_id != "a", "made-up ids collide: {c:?} {d:?}");
        let members = ok(s.describe_group(&topic, "g").await, "describe three")?;
        check_eq!(members.len(), 3);
        check_assignment(&members, 4)?;
        refused(s.join_group(&topic, "g", Some("bad id!"), None).await, "a member id with a space", |e| matches!(e, StreamError::Invalid(_)))?;
        refused(s.join_group(&format!("{topic}-missing"), "g", Some("a"), None).await, "join on a missing topic", |e| matches!(e, StreamError::TopicNotFound(_)))?;
        Ok(())
    })
}

fn session_expiry(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(3)).await, "create")?;
        let too_short = |e: &StreamError| matches!(e, StreamError::Invalid(_));
        refused(s.join_group(&topic, "g", Some("a"), Some(SESSION_TIMEOUT_MS_MIN - 1)).await, "a session below the minimum", too_short)?;
        refused(s.join_group(&topic, "g", Some("a"), Some(SESSION_TIMEOUT_MS_MAX + 1)).await, "a session above the maximum", too_short)?;
        ok(s.join_group(&topic, "g", Some("steady"), Some(60_000)).await, "join steady")?;
        let brief = ok(s.join_group(&topic, "g", Some("brief"), Some(SESSION_TIMEOUT_MS_MIN)).await, "join brief")?;
        check!(!brief.partitions.is_empty(), "the second of two members owns nothing");
        tokio::time::sleep(Duration::from_millis(SESSION_TIMEOUT_MS_MIN * 3)).await;
        let steady = ok(s.heartbeat(&topic, "g", "steady").await, "heartbeat steady")?;
        check_eq!(steady.partitions, vec![0, 1, 2]);
        check!(steady.generation > brief.generation, "no new generation after a member expired: {steady:?}");
        check_eq!(ok(s.describe_group(&topic, "g").await, "describe")?, vec![steady]);
        refused(s.heartbeat(&topic, "g", "brief").await, "heartbeat of an expired member", |e| matches!(e, StreamError::UnknownMember { .. }))?;
        Ok(())
    })
}

fn member_commits(s: &dyn StreamStore, topic: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_topic(&topic, topic_config(2)).await, "create")?;
        for partition in 0..2 {
            ok(s.produce_at(&topic, partition, 0, vec![Record::from_value("x")]).await, "produce one record to each partition")?;
        }
        let a = ok(s.join_group(&topic, "g", Some("a"), Some(60_000)).await, "join a")?;
        ok(s.commit_member(&topic, "g", "a", a.generation, vec![(0, 1), (1, 1)]).await, "commit as the only member")?;
        check_eq!(ok(s.committed(&topic, "g", 0).await, "committed")?, Some(1));
        let b = ok(s.join_group(&topic, "g", Some("b"), Some(60_000)).await, "join b")?;
        let stale = |e: &StreamError| matches!(e, StreamError::StaleGeneration { .. });
        refused(s.commit_member(&topic, "g", "a", a.generation, vec![(0, 0)]).await, "a commit at the generation before b joined", stale)?;
        let a = ok(s.heartbeat(&topic, "g", "a").await, "heartbeat a")?;
        let (mine, theirs) = (a.partitions[0], b.partitions[0]);
        refused(s.commit_member(&topic, "g", "a", a.generation, vec![(mine, 0), (theirs, 0)]).await, "a commit of b's partition", |e| matches!(e, StreamError::NotAssigned { .. }))?;
        refused(s.commit_member(&topic, "g", "nobody", a.generation, vec![(mine, 0)]).await, "a commit by a stranger", |e| matches!(e, StreamError::UnknownMember { .. }))?;
        refused(s.commit_member(&topic, "g", "a", a.generation, vec![(mine, 2)]).await, "a commit past the end", |e| matches!(e, StreamError::Invalid(_)))?;
        check_eq!(ok(s.committed(&topic, "g", mine).await, "committed after refused commits")?, Some(1));
        check_eq!(ok(s.committed(&topic, "g", theirs).await, "committed after refused commits")?, Some(1));
        ok(s.commit_member(&topic, "g", "b", b.generation, vec![(theirs, 0)]).await, "b commits its own")?;
        check_eq!(ok(s.committed(&topic, "g", theirs).await, "committed by b")?, Some(0));
        ok(s.leave_group(&topic, "g", "b").await, "leave b")?;
        refused(s.commit_member(&topic, "g", "b", b.generation, vec![(theirs, 1)]).await, "a commit after leaving", |e| matches!(e, StreamError::UnknownMember { .. }))?;
        check_eq!(ok(s.committed(&topic, "g", theirs).await, "committed after b left")?, Some(0));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_embedded_engine_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let topics = crate::stream::Topics::open(dir.path()).unwrap();
        let report = super::run(&topics, "conf").await;
        println!("{report}");
        report.assert_conforms();
        assert_eq!(report.passed.len(), super::CASES.len(), "the embedded engine declares no gap");
    }
}
