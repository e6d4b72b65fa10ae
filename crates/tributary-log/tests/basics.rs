//! Feature tests of the log through its public API.

use std::sync::Arc;

use tributary_core::Record;
use tributary_log::{Durability, Log, LogConfig, LogError};

fn small_segments() -> LogConfig {
    LogConfig { segment_bytes_max: 4096, index_interval_bytes: 256, ..LogConfig::default() }
}

fn values(log: &Log, from: u64) -> Vec<(u64, String)> {
    log.read(from, usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| (r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap()))
        .collect()
}

#[test]
fn appends_get_consecutive_offsets_and_read_back_across_segments_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Log::open(dir.path(), small_segments()).unwrap();
        for i in 0..300u64 {
            let appended = log.append(&[Record::from_value(format!("v{i}"))]).unwrap();
            assert_eq!(appended.base_offset, i);
        }
        assert!(log.segment_count() > 2, "small segments roll");
        assert_eq!(values(&log, 0).len(), 300);
        assert_eq!(values(&log, 123)[0], (123, "v123".to_string()));
    }
    let (log, report) = Log::open(dir.path(), small_segments()).unwrap();
    assert_eq!(report.next_offset, 300);
    assert_eq!(report.truncated_bytes, 0);
    let all = values(&log, 0);
    assert_eq!(all.len(), 300);
    assert!(all.iter().enumerate().all(|(i, (o, v))| *o == i as u64 && *v == format!("v{i}")));
    assert_eq!(log.append(&[Record::from_value("next")]).unwrap().base_offset, 300);
}

#[test]
fn concurrent_appends_under_always_share_syncs_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
    let log = Arc::new(log);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..200).map(|i| log.append(&[Record::from_value(format!("{t}-{i}"))]).unwrap().base_offset).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut offsets: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    offsets.sort();
    assert_eq!(offsets, (0..1600).collect::<Vec<_>>());
    assert_eq!(log.high_watermark(), 1600);
}

#[test]
fn reading_outside_the_log_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Log::open(dir.path(), LogConfig { durability: Durability::Never, ..LogConfig::default() }).unwrap();
    log.append(&[Record::from_value("a")]).unwrap();
    assert!(log.read(1, 10, 1000).unwrap().is_empty());
    let err = log.read(5, 10, 1000).unwrap_err();
    assert!(matches!(err, LogError::OffsetOutOfRange { requested: 5, start: 0, end: 1 }), "{err}");
}

#[test]
fn a_second_process_cannot_open_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = Log::open(dir.path(), LogConfig::default()).unwrap();
    assert!(matches!(Log::open(dir.path(), LogConfig::default()), Err(LogError::Locked(_))));
}
