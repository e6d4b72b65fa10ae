//! Feature tests of the rest of the public API: retention, truncation, compaction, time
//! lookup, durability classes, waiting for data, limits, big batches, write errors and
//! conditional appends.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{contents, index_files, segment_files};
use tributary_core::{Header, Record, limits, now_ms};
use tributary_log::{Durability, Log, LogConfig, LogError};

fn small(durability: Durability) -> LogConfig {
    LogConfig { durability, segment_bytes_max: 4096, index_interval_bytes: 256, ..LogConfig::default() }
}

/// Append `n` single-record batches whose values name their offset, padded to about 100 bytes.
fn fill(log: &Log, n: u64, timestamp_ms: impl Fn(u64) -> i64) {
    for _ in 0..n {
        let offset = log.high_watermark();
        let record = Record { timestamp_ms: timestamp_ms(offset), ..Record::from_value(format!("v{offset}-{}", "x".repeat(90))) };
        assert_eq!(log.append(&[record]).unwrap().base_offset, offset);
    }
}

fn offsets(log: &Log) -> Vec<u64> {
    contents(log).into_iter().map(|(o, _)| o).collect()
}

#[test]
fn retention_by_size_deletes_the_oldest_sealed_segments_and_moves_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { retention_bytes: Some(10_000), ..small(Durability::Never) };
    let (log, _) = Log::open(dir.path(), config.clone()).unwrap();
    fill(&log, 200, |_| 0);
    let before = log.segment_count();
    let report = log.enforce_retention(now_ms()).unwrap();
    assert!(report.segments_deleted > 0 && report.bytes_deleted > 0, "{report:?}");
    assert_eq!(log.segment_count(), before - report.segments_deleted);
    assert!(log.size_bytes() <= 10_000, "{} bytes left", log.size_bytes());
    assert!(log.size_bytes() + 4096 > 10_000, "no more than needed is deleted");
    let start = log.start_offset();
    assert_eq!(report.start_offset, start);
    assert_eq!(offsets(&log), (start..200).collect::<Vec<_>>());
    assert!(matches!(log.read(start - 1, 1, 1000), Err(LogError::OffsetOutOfRange { .. })));
    assert_eq!(segment_files(dir.path()).len(), log.segment_count());
    assert_eq!(log.enforce_retention(now_ms()).unwrap().segments_deleted, 0, "a second pass has nothing to do");
    drop(log);
    let (log, _) = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.start_offset(), start);
    assert_eq!(offsets(&log), (start..200).collect::<Vec<_>>());
}

#[test]
fn retention_by_age_deletes_sealed_segments_whose_newest_record_is_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let config = LogConfig { retention_ms: Some(60_000), ..small(Durability::Never) };
    let (log, _) = Log::open(dir.path(), config).unwrap();
    fill(&log, 100, |_| now - 3_600_000);
    let old_segments = log.segment_count();
    fill(&log, 100, |_| now);
    let report = log.enforce_retention(now).unwrap();
    // Every segment holding only hour-old records goes; the one straddling old and new stays.
    assert_eq!(report.segments_deleted, old_segments - 1, "{report:?}");
    assert!(log.start_offset() <= 100 && log.start_offset() > 0);
    assert_eq!(offsets(&log), (log.start_offset()..200).collect::<Vec<_>>());
    assert_eq!(log.enforce_retention(now).unwrap().segments_deleted, 0);
}

#[test]
fn truncate_before_drops_only_segments_wholly_below_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small(Durability::Never)).unwrap();
    fill(&log, 200, |_| 0);
    let removed = log.truncate_before(120).unwrap();
    assert!(removed > 0);
    let start = log.start_offset();
    assert!(start <= 120 && start > 0, "start {start}");
    assert_eq!(offsets(&log), (start..200).collect::<Vec<_>>());
    assert_eq!(log.truncate_before(0).unwrap(), 0);
    let sealed = log.segment_count() - 1;
    assert_eq!(log.truncate_before(u64::MAX).unwrap(), sealed, "the active segment stays");
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.append(&[Record::from_value("after")]).unwrap().base_offset, 200);
    drop(log);
    let (log, _) = Log::open(dir.path(), small(Durability::Never)).unwrap();
    assert_eq!(log.high_watermark(), 201);
}

/// Records of a compaction test: (key, value); `None` key is unkeyed, `None` value a tombstone.
type Written = Vec<(Option<String>, Option<String>)>;

fn compaction_log(dir: &Path, config: LogConfig) -> (Log, Written) {
    let (log, _) = Log::open(dir, config).unwrap();
    let mut written = Vec::new();
    for i in 0..300u64 {
        // Key "gone" is written at 10 and deleted at 150 (in a sealed segment); every seventh
        // record is unkeyed; the rest cycle through ten keys.
        let key = match i {
            10 | 150 => Some("gone".to_string()),
            _ => (i % 7 != 0).then(|| format!("k{}", i % 10)),
        };
        let value = (i != 150).then(|| format!("v{i}-{}", "y".repeat(60)));
        let record = Record { key: key.clone().map(Bytes::from), value: value.clone().map(Bytes::from), ..Record::default() };
        assert_eq!(log.append(&[record]).unwrap().base_offset, i);
        written.push((key, value));
    }
    (log, written)
}

/// What compaction must leave: in sealed segments (below `active_base`), unkeyed records and
/// the newest record of each key, minus tombstones when they have expired.
fn compacted(written: &Written, active_base: u64, tombstones_expired: bool) -> Vec<(u64, Option<String>)> {
    let mut latest = std::collections::HashMap::new();
    for (offset, (key, _)) in written.iter().enumerate() {
        if let Some(key) = key {
            latest.insert(key.clone(), offset as u64);
        }
    }
    written
        .iter()
        .enumerate()
        .map(|(o, (k, v))| (o as u64, k, v))
        .filter(|(o, key, value)| {
            *o >= active_base
                || match key {
                    None => true,
                    Some(key) => latest[key] == *o && !(value.is_none() && tombstones_expired),
                }
        })
        .map(|(o, _, v)| (o, v.clone()))
        .collect()
}

#[test]
fn compaction_keeps_the_newest_record_per_key_and_unkeyed_records_at_their_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { compact: true, tombstone_retention_ms: 60_000, ..small(Durability::Never) };
    let (log, written) = compaction_log(dir.path(), config.clone());
    let files = segment_files(dir.path());
    let active_base: u64 = files.last().unwrap().file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let now = now_ms();
    let report = log.compact(now).unwrap();
    assert!(report.segments_rewritten > 0 && report.records_removed > 0, "{report:?}");
    assert!(report.bytes_after < report.bytes_before, "{report:?}");
    let expected = compacted(&written, active_base, false);
    assert!(expected.contains(&(150, None)) && !expected.iter().any(|(o, _)| *o == 10), "the test deletes a key");
    assert_eq!(contents(&log), expected, "tombstones are kept until they expire");
    assert_eq!(log.compact(now).unwrap().segments_rewritten, 0, "a second pass has nothing to do");
    drop(log);
    let (log, report) = Log::open(dir.path(), config.clone()).unwrap();
    assert_eq!(report.rebuilt_indexes, 0, "compaction wrote good indexes");
    assert_eq!(contents(&log), expected, "compaction survives a reopen");
    let report = log.compact(now + 3_600_000).unwrap();
    let expected = compacted(&written, active_base, true);
    assert_eq!(report.records_removed, 1, "the expired tombstone goes: {report:?}");
    assert_eq!(contents(&log), expected);
    assert_eq!(log.append(&[Record::from_value("next")]).unwrap().base_offset, 300, "offsets continue");
    drop(log);
    let (log, _) = Log::open(dir.path(), config).unwrap();
    assert_eq!(contents(&log)[..expected.len()], expected[..]);
}

#[test]
fn a_compacted_segment_whose_index_is_lost_is_refused_rather_than_misread() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { compact: true, ..small(Durability::Never) };
    // Three keys rewritten over and over: compaction leaves the sealed segments empty, as the
    // newest record of each key is in the active segment.
    let (log, _) = Log::open(dir.path(), config.clone()).unwrap();
    for i in 0..200u64 {
        log.append(&[Record::keyed(format!("k{}", i % 3), format!("v{i}-{}", "z".repeat(80)))]).unwrap();
    }
    let report = log.compact(now_ms()).unwrap();
    assert!(report.records_removed > 0);
    let expected = contents(&log);
    let active_base: u64 = segment_files(dir.path()).last().unwrap().file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(expected.first().map(|r| r.0), Some(active_base), "the sealed segments are empty");
    drop(log);
    let (log, report) = Log::open(dir.path(), config.clone()).unwrap();
    assert_eq!(report.rebuilt_indexes, 0);
    assert_eq!(contents(&log), expected);
    drop(log);
    for index in index_files(dir.path()) {
        std::fs::remove_file(index).unwrap();
    }
    // FIXME: without its index, a compacted segment whose last records were removed cannot
    // tell where it ended, and the gap to the next segment reads as a missing segment (as a
    // truncation at a batch boundary would). It is refused, never served wrong, but not
    // repaired: the index would need to say the segment is compacted, or compaction keep the
    // last batch of each segment.
    let result = Log::open(dir.path(), config);
    assert!(matches!(&result, Err(LogError::Corrupt { reason, .. }) if reason.contains("missing")), "{:?}", result.err());
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after_a_time_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small(Durability::Never)).unwrap();
    let base = 1_700_000_000_000i64;
    fill(&log, 300, |o| base + 10 * o as i64);
    assert!(log.segment_count() > 3);
    for target in [0, base - 1, base, base + 1, base + 9, base + 10, base + 1234, base + 2990, base + 2991] {
        let expected = (0..300u64).find(|o| base + 10 * *o as i64 >= target);
        assert_eq!(log.offset_for_timestamp(target).unwrap(), expected, "target {target}");
    }
    assert_eq!(log.offset_for_timestamp(i64::MAX).unwrap(), None);
    log.truncate_before(150).unwrap();
    assert_eq!(log.offset_for_timestamp(base).unwrap(), Some(log.start_offset()), "never an offset below the start");
}

#[test]
fn under_interval_and_never_an_append_is_readable_as_soon_as_it_returns() {
    for durability in [Durability::Never, Durability::Interval(Duration::from_secs(3600)), Durability::Interval(Duration::from_millis(5))] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = Log::open(dir.path(), small(durability)).unwrap();
            for i in 0..50u64 {
                let appended = log.append(&[Record::from_value(format!("v{i}"))]).unwrap();
                assert_eq!(log.high_watermark(), appended.last_offset + 1, "{durability}");
                assert_eq!(log.read(i, 1, 100).unwrap()[0].value.as_deref(), Some(format!("v{i}").as_bytes()), "{durability}");
            }
        }
        let (log, report) = Log::open(dir.path(), small(durability)).unwrap();
        assert_eq!(report.next_offset, 50, "{durability}: a clean close loses nothing");
        assert_eq!(offsets(&log), (0..50).collect::<Vec<_>>());
    }
}

#[test]
fn wait_for_data_wakes_when_an_append_lands_and_times_out_otherwise() {
    for durability in [Durability::Always, Durability::Never] {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::open(dir.path(), small(durability)).unwrap();
        let started = Instant::now();
        assert!(!log.wait_for_data(0, Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        let waiter = {
            let log = log.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                (log.wait_for_data(0, Duration::from_secs(20)), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        log.append(&[Record::from_value("wake")]).unwrap();
        let (ready, waited) = waiter.join().unwrap();
        assert!(ready, "{durability}");
        assert!(waited < Duration::from_secs(10), "{durability}: woke after {waited:?}");
        assert!(log.wait_for_data(0, Duration::ZERO), "data already there needs no wait");
        assert!(!log.wait_for_data(1, Duration::from_millis(10)));
    }
}

#[test]
fn segments_roll_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig { segment_ms_max: Some(5), ..small(Durability::Never) };
    let (log, _) = Log::open(dir.path(), config).unwrap();
    for i in 0..4 {
        log.append(&[Record::from_value(format!("v{i}"))]).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(log.segment_count() >= 4, "{} segments", log.segment_count());
    assert_eq!(offsets(&log), vec![0, 1, 2, 3]);
}

#[test]
fn requests_over_a_limit_are_refused_with_an_error_naming_it_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small(Durability::Never)).unwrap();
    let many_headers = Record { headers: (0..=limits::HEADERS_COUNT_MAX).map(|i| Header { name: format!("h{i}"), value: Bytes::new() }).collect(), ..Record::from_value("v") };
    let near_max = Record::from_value(vec![0u8; limits::MESSAGE_BYTES_MAX - 64]);
    let cases: Vec<(&str, Vec<Record>)> = vec![
        ("BATCH_RECORDS_MAX", vec![]),
        ("BATCH_RECORDS_MAX", vec![Record::from_value("v"); limits::BATCH_RECORDS_MAX + 1]),
        ("MESSAGE_BYTES_MAX", vec![Record::from_value(vec![0u8; limits::MESSAGE_BYTES_MAX + 1])]),
        ("KEY_BYTES_MAX", vec![Record::keyed(vec![0u8; limits::KEY_BYTES_MAX + 1], "v")]),
        ("HEADERS_COUNT_MAX", vec![many_headers]),
        ("BATCH_BYTES_MAX", vec![near_max; limits::BATCH_BYTES_MAX / limits::MESSAGE_BYTES_MAX + 1]),
    ];
    for (limit, records) in cases {
        let err = log.append(&records).unwrap_err();
        assert!(matches!(err, LogError::Limit(_)) && err.to_string().contains(limit), "{limit}: {err}");
        let err = log.append_idempotent(5, 0, &records).unwrap_err();
        assert!(err.to_string().contains(limit), "{limit}: {err}");
    }
    assert_eq!(log.high_watermark(), 0, "nothing was written");
    assert_eq!(log.size_bytes(), 0);
    let err = Log::open(tempfile::tempdir().unwrap().path(), LogConfig { segment_bytes_max: 100, ..LogConfig::default() }).err().unwrap();
    assert!(matches!(err, LogError::Config(_)) && err.to_string().contains("SEGMENT_BYTES_MIN"), "{err}");
}

#[test]
fn idempotent_retries_get_their_original_offsets_across_rolls_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = small(Durability::Never);
    let (log, _) = Log::open(dir.path(), config.clone()).unwrap();
    let batch = |seq: u32| vec![Record::from_value(format!("p{seq}-{}", "w".repeat(200))), Record::from_value(format!("p{}", seq + 1))];
    let mut acked = Vec::new();
    for i in 0..40u32 {
        let a = log.append_idempotent(77, 2 * i, &batch(2 * i)).unwrap();
        assert!(!a.duplicate);
        acked.push(a);
        log.append(&[Record::from_value("other")]).unwrap();
    }
    assert!(log.segment_count() > 2);
    let retry = log.append_idempotent(77, 78, &batch(78)).unwrap();
    assert_eq!((retry.base_offset, retry.last_offset, retry.duplicate), (acked[39].base_offset, acked[39].last_offset, true));
    let err = log.append_idempotent(77, 90, &batch(90)).unwrap_err();
    assert!(matches!(err, LogError::OutOfOrderSequence { producer_id: 77, got: 90, expected: 80 }), "{err}");
    let hw = log.high_watermark();
    drop(log);
    let (log, _) = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.high_watermark(), hw);
    for (i, a) in acked.iter().enumerate().skip(40 - tributary_log::PRODUCER_BATCHES_CACHED) {
        let retry = log.append_idempotent(77, 2 * i as u32, &batch(2 * i as u32)).unwrap();
        assert_eq!((retry.base_offset, retry.last_offset, retry.duplicate), (a.base_offset, a.last_offset, true), "batch {i} after reopen");
    }
    assert_eq!(log.high_watermark(), hw, "retries write nothing");
    assert!(matches!(log.append_idempotent(77, 0, &batch(0)), Err(LogError::OutOfOrderSequence { .. })), "a batch no longer remembered is refused");
    assert_eq!(log.append_idempotent(77, 80, &batch(80)).unwrap().base_offset, hw);
}

/// Batches up to `BATCH_BYTES_MAX` (16 MiB) are legal; recovery reads the tail in 4 MiB chunks.
#[test]
fn a_batch_larger_than_the_recovery_read_chunk_survives_a_reopen() {
    for followed_by_small_batch in [false, true] {
        for sealed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = LogConfig { segment_bytes_max: 64 << 20, ..small(Durability::Never) };
            let (log, _) = Log::open(dir.path(), config.clone()).unwrap();
            let big: Vec<Record> = (0..5).map(|i| Record::from_value(vec![b'a' + i as u8; limits::MESSAGE_BYTES_MAX - 16])).collect();
            log.append(&[Record::from_value("first")]).unwrap();
            log.append(&big).unwrap();
            if followed_by_small_batch {
                log.append(&[Record::from_value("small")]).unwrap();
            }
            let expected: Vec<_> = log.read(0, usize::MAX, usize::MAX).unwrap();
            drop(log);
            if sealed {
                // Seal it by reopening with small segments and appending once, then lose the index.
                let (log, _) = Log::open(dir.path(), small(Durability::Never)).unwrap();
                log.append(&[Record::from_value("roll")]).unwrap();
                drop(log);
                for index in index_files(dir.path()) {
                    std::fs::remove_file(index).unwrap();
                }
            }
            let case = format!("followed by a small batch: {followed_by_small_batch}, sealed: {sealed}");
            let (log, report) = Log::open(dir.path(), small(Durability::Never)).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(report.truncated_bytes, 0, "{case}");
            assert_eq!(log.read(0, expected.len(), usize::MAX).unwrap(), expected, "{case}");
        }
    }
}

/// A write error (here EFBIG from `RLIMIT_FSIZE`, standing in for a full disk) fails the append,
/// cuts back what was partly written, and leaves everything acknowledged readable and the log
/// appendable. The limit applies to the whole process, so this runs in a child process.
#[test]
fn a_failed_write_is_cut_back_and_acknowledged_data_stays_readable() {
    const CHILD: &str = "TRIBUTARY_FSIZE_CHILD";
    const NAME: &str = "a_failed_write_is_cut_back_and_acknowledged_data_stays_readable";
    if let Ok(dir) = std::env::var(CHILD) {
        write_until_the_file_size_limit(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("child done"), "child failed: {}\n{stdout}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
}

fn write_until_the_file_size_limit(dir: &Path) {
    const LIMIT_BYTES: u64 = 64 * 1024;
    // SAFETY: plain libc calls on this process; no memory is shared.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit { rlim_cur: LIMIT_BYTES, rlim_max: libc::RLIM_INFINITY };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let config = LogConfig { segment_bytes_max: 1 << 20, ..LogConfig::default() };
    let (log, _) = Log::open(dir, config.clone()).unwrap();
    let mut acked = Vec::new();
    let error = loop {
        let offset = log.high_watermark();
        match log.append(&[Record::from_value(format!("v{offset}-{}", "q".repeat(1000)))]) {
            Ok(a) => acked.push((a.base_offset, Some(format!("v{offset}-{}", "q".repeat(1000))))),
            Err(e) => break e,
        }
    };
    assert!(matches!(error, LogError::Io { .. }), "{error}");
    assert!(!acked.is_empty());
    let data = segment_files(dir).pop().unwrap();
    assert_eq!(std::fs::metadata(&data).unwrap().len(), log.size_bytes(), "the partial write was cut back");
    assert_eq!(contents(&log), acked);
    let small = log.append(&[Record::from_value("s")]).unwrap();
    assert_eq!(small.base_offset, acked.len() as u64, "the log stays appendable where there is room");
    acked.push((small.base_offset, Some("s".into())));
    drop(log);
    let (log, report) = Log::open(dir, config).unwrap();
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(contents(&log), acked);
    println!("child done");
}

#[test]
fn a_conditional_append_goes_in_only_at_the_expected_end_and_of_racing_ones_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), small(Durability::Always)).unwrap();
    let appended = log.append_at(0, &[Record::from_value("a"), Record::from_value("b")]).unwrap();
    assert_eq!((appended.base_offset, appended.last_offset), (0, 1));
    for stale in [0, 1, 3] {
        match log.append_at(stale, &[Record::from_value("late")]) {
            Err(LogError::EndMoved { expected, end }) => assert_eq!((expected, end), (stale, 2)),
            other => panic!("an append expecting end {stale} of a log ending at 2: {other:?}"),
        }
    }
    assert_eq!(log.high_watermark(), 2, "a refused append writes nothing");
    // Writers that each read the end, then append at it: every round, one of them gets in.
    let log = std::sync::Arc::new(log);
    let wins: Vec<u64> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let log = log.clone();
                scope.spawn(move || {
                    let mut won = 0;
                    for _ in 0..50 {
                        let end = log.high_watermark();
                        match log.append_at(end, &[Record::from_value(format!("w{w}"))]) {
                            Ok(appended) => {
                                assert_eq!(appended.base_offset, end);
                                won += 1;
                            }
                            Err(LogError::EndMoved { expected, end: now }) => assert!(now > expected),
                            Err(other) => panic!("{other}"),
                        }
                    }
                    won
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let won: u64 = wins.iter().sum();
    assert_eq!(log.high_watermark(), 2 + won, "every win is one record, and nothing else went in");
    assert_eq!(offsets(&log), (0..2 + won).collect::<Vec<_>>());
}
