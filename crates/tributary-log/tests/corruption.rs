//! Corruption tests: flipped bits and truncations in data and index files are always detected.
//! A torn tail is cut; damage anywhere else refuses to open or fences the partition on read.
//! Bad bytes are never served.

mod common;

use std::path::Path;

use common::{Rng, batches, contents, flip_bit, index_files, segment_files};
use tributary_core::Record;
use tributary_log::batch::HEADER_BYTES;
use tributary_log::{Durability, Log, LogConfig, LogError};

type Contents = Vec<(u64, Option<String>)>;

fn config() -> LogConfig {
    LogConfig { durability: Durability::Never, segment_bytes_max: 4096, index_interval_bytes: 256, ..LogConfig::default() }
}

/// A log of at least three segments whose tail holds at least four batches of one to three
/// records. Values name their offset so a misplaced record cannot pass for another.
fn build(dir: &Path) -> Contents {
    let (log, _) = Log::open(dir, config()).unwrap();
    let mut rng = Rng::new(7);
    let mut expected = Vec::new();
    let mut tail_batches = 0;
    let mut segments = log.segment_count();
    while log.segment_count() < 3 || tail_batches < 4 {
        let base = log.high_watermark();
        let n = 1 + rng.below(3);
        let records: Vec<Record> = (base..base + n).map(|o| Record::keyed(format!("k{}", o % 5), format!("v{o}-{}", "x".repeat(rng.below(40) as usize)))).collect();
        expected.extend(records.iter().enumerate().map(|(i, r)| (base + i as u64, Some(String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()))));
        assert_eq!(log.append(&records).unwrap().base_offset, base);
        if log.segment_count() != segments {
            segments = log.segment_count();
            tail_batches = 0;
        }
        tail_batches += 1;
    }
    log.close().unwrap();
    expected
}

fn open(dir: &Path) -> tributary_log::Result<(Log, tributary_log::RecoveryReport)> {
    Log::open(dir, config())
}

fn is_corrupt(result: &tributary_log::Result<impl Sized>) -> bool {
    matches!(result, Err(LogError::Corrupt { .. }))
}

fn describe<T>(result: &tributary_log::Result<T>) -> String {
    match result {
        Ok(_) => "Ok".into(),
        Err(e) => format!("{e}"),
    }
}

/// Positions worth flipping in a batch: every bit of every header byte, and one bit of every
/// record byte.
fn flips_in_batch(position: usize, total: usize) -> Vec<(usize, u8)> {
    let mut flips: Vec<(usize, u8)> = (0..HEADER_BYTES).flat_map(|b| (0..8).map(move |bit| (position + b, bit))).collect();
    flips.extend((HEADER_BYTES..total).map(|b| (position + b, (b % 8) as u8)));
    flips
}

fn header_field(byte_in_batch: usize) -> &'static str {
    match byte_in_batch {
        0..8 => "base_offset",
        8..12 => "batch_length",
        12..16 => "crc",
        16 => "magic",
        17 => "attributes",
        18..22 => "record_count",
        22..30 => "first_timestamp",
        30..38 => "max_timestamp",
        38..46 => "producer_id",
        46..50 => "base_sequence",
        50..54 => "last_offset_delta",
        _ => "records",
    }
}

fn assert_no_failures(failures: &[String]) {
    assert!(failures.is_empty(), "{} damaged positions went unnoticed, first ones:\n{}", failures.len(), failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n"));
}

#[derive(Debug, Clone, Copy)]
enum Tear {
    /// Keep only this many bytes of the last batch.
    Partial(usize),
    /// Append this many random bytes.
    Garbage(usize),
    /// Append this many zero bytes (a file extended but never written, as after a power cut).
    Zeros(usize),
}

#[test]
fn recovery_cuts_a_torn_tail_and_keeps_every_earlier_record() {
    let mut rng = Rng::new(common::seed(11));
    let mut tears = vec![Tear::Partial(1), Tear::Partial(HEADER_BYTES - 1), Tear::Partial(HEADER_BYTES), Tear::Partial(HEADER_BYTES + 1)];
    tears.extend([1, 12, 53, 54, 55, 200, 5000].iter().flat_map(|&n| [Tear::Garbage(n), Tear::Zeros(n)]));
    tears.extend((0..8).map(|_| Tear::Garbage(1 + rng.below(3000) as usize)));
    for tear in tears {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = build(dir.path());
        let tail = segment_files(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&tail).unwrap();
        let original_len = bytes.len() as u64;
        match tear {
            Tear::Partial(keep) => {
                let (position, header) = *batches(&tail).last().unwrap();
                assert!(keep < header.total_bytes());
                bytes.truncate(position + keep);
                let first_lost = header.base_offset;
                expected.retain(|(o, _)| *o < first_lost);
            }
            Tear::Garbage(n) => bytes.extend(rng.bytes(n)),
            Tear::Zeros(n) => bytes.extend(std::iter::repeat_n(0u8, n)),
        }
        let damaged_len = bytes.len() as u64;
        std::fs::write(&tail, &bytes).unwrap();
        let (log, report) = open(dir.path()).unwrap_or_else(|e| panic!("{tear:?}: {e}"));
        assert!(report.truncated_bytes > 0, "{tear:?}: nothing was cut");
        assert_eq!(std::fs::metadata(&tail).unwrap().len(), damaged_len - report.truncated_bytes, "{tear:?}");
        if !matches!(tear, Tear::Partial(_)) {
            assert_eq!(report.truncated_bytes, damaged_len - original_len, "{tear:?}: only the garbage is cut");
        }
        assert_eq!(contents(&log), expected, "{tear:?}");
        let next = expected.last().unwrap().0 + 1;
        assert_eq!(report.next_offset, next, "{tear:?}");
        assert_eq!(log.append(&[Record::from_value(format!("v{next}"))]).unwrap().base_offset, next, "{tear:?}: offsets stay dense");
        expected.push((next, Some(format!("v{next}"))));
        drop(log);
        let (log, report) = open(dir.path()).unwrap();
        assert_eq!(report.truncated_bytes, 0, "{tear:?}: a second reopen finds nothing to cut");
        assert_eq!(contents(&log), expected, "{tear:?}");
    }
}

#[test]
fn a_damaged_batch_with_valid_batches_after_it_in_the_tail_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let tail = segment_files(dir.path()).pop().unwrap();
    let pristine = std::fs::read(&tail).unwrap();
    let tail_batches = batches(&tail);
    // Every batch but the last: damage to the last one is indistinguishable from a torn write.
    let mut failures = Vec::new();
    for (index, &(position, header)) in tail_batches[..tail_batches.len() - 1].iter().enumerate() {
        for (byte, bit) in flips_in_batch(position, header.total_bytes()) {
            flip_bit(&tail, byte, bit);
            let result = open(dir.path());
            if !is_corrupt(&result) {
                failures.push(format!("batch {index} {} byte {byte} bit {bit}: {}", header_field(byte - position), describe(&result)));
            }
            drop(result);
            common::rewrite(&tail, &pristine);
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_is_reported_on_read_and_fences_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let expected = build(dir.path());
    let sealed = segment_files(dir.path())[0].clone();
    let pristine = std::fs::read(&sealed).unwrap();
    let sealed_batches = batches(&sealed);
    let picks = [0, sealed_batches.len() / 2, sealed_batches.len() - 1];
    let mut failures = Vec::new();
    let mut fence_checked = false;
    for &pick in &picks {
        let (position, header) = sealed_batches[pick];
        for (byte, bit) in flips_in_batch(position, header.total_bytes()) {
            let at = format!("batch {pick} {} byte {byte} bit {bit}", header_field(byte - position));
            flip_bit(&sealed, byte, bit);
            // A read of the whole log, and a read of just the first record of the damaged batch.
            for (from, max_records, max_bytes) in [(0, usize::MAX, usize::MAX), (header.base_offset, 1, 1)] {
                let (log, _) = open(dir.path()).unwrap_or_else(|e| panic!("{at}: a sealed segment with a good index opens: {e}"));
                let result = log.read(from, max_records, max_bytes);
                if !is_corrupt(&result) {
                    let served = result.as_ref().map(|r| r.iter().map(|r| r.offset).collect::<Vec<_>>());
                    failures.push(format!("{at}: read({from}, {max_records}, {max_bytes}) gave {} {served:?}", describe(&result)));
                    continue;
                }
                assert!(log.fenced().is_some(), "{at}");
                if !fence_checked {
                    fence_checked = true;
                    assert_every_call_is_fenced(&log);
                }
            }
            common::rewrite(&sealed, &pristine);
        }
    }
    assert_no_failures(&failures);
    let (log, _) = open(dir.path()).unwrap();
    assert_eq!(contents(&log), expected, "the restored log reads whole");
}

fn assert_every_call_is_fenced(log: &Log) {
    let fenced = |what: &str, result: tributary_log::Result<String>| {
        assert!(matches!(result, Err(LogError::Fenced(_))), "{what} on a fenced log gave {result:?}");
    };
    fenced("read", log.read(log.start_offset(), 10, 1000).map(|r| format!("{r:?}")));
    fenced("append", log.append(&[Record::from_value("x")]).map(|a| format!("{a:?}")));
    fenced("append_idempotent", log.append_idempotent(3, 0, &[Record::from_value("x")]).map(|a| format!("{a:?}")));
    fenced("offset_for_timestamp", log.offset_for_timestamp(0).map(|o| format!("{o:?}")));
    fenced("compact", log.compact(i64::MAX).map(|r| format!("{r:?}")));
    fenced("enforce_retention", log.enforce_retention(i64::MAX).map(|r| format!("{r:?}")));
    fenced("truncate_before", log.truncate_before(u64::MAX).map(|r| format!("{r:?}")));
    fenced("flush", log.flush().map(|r| format!("{r:?}")));
    assert_eq!(segment_files(log.dir()).len(), log.segment_count(), "a fenced log deletes nothing");
}

#[test]
fn a_truncated_or_extended_sealed_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let files = segment_files(dir.path());
    for sealed in &files[..files.len() - 1] {
        let pristine = std::fs::read(sealed).unwrap();
        let sealed_batches = batches(sealed);
        let mut lengths = vec![0, 1, HEADER_BYTES, pristine.len() - 1];
        lengths.extend(sealed_batches.iter().skip(1).map(|(position, _)| *position)); // batch boundaries
        lengths.extend(sealed_batches.iter().map(|(position, _)| position + HEADER_BYTES + 1)); // mid-batch
        for len in lengths {
            common::rewrite(sealed, &pristine[..len]);
            let result = open(dir.path());
            assert!(is_corrupt(&result), "{} cut to {len} bytes: {}", sealed.display(), describe(&result));
        }
        for extra in [1, HEADER_BYTES, 300] {
            let mut longer = pristine.clone();
            longer.extend(std::iter::repeat_n(0xA5u8, extra));
            common::rewrite(sealed, &longer);
            let result = open(dir.path());
            assert!(is_corrupt(&result), "{} extended by {extra} bytes: {}", sealed.display(), describe(&result));
        }
        common::rewrite(sealed, &pristine);
    }
    assert!(open(dir.path()).is_ok());
}

#[test]
fn a_damaged_or_missing_index_is_rebuilt_and_reads_stay_correct() {
    let dir = tempfile::tempdir().unwrap();
    let expected = build(dir.path());
    let index = index_files(dir.path())[0].clone();
    let pristine = std::fs::read(&index).unwrap();
    let mut damages: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    // Each rebuild costs two fsyncs, so one bit per byte (rotating) rather than all eight.
    for byte in 0..pristine.len() {
        let bit = byte % 8;
        let mut bad = pristine.clone();
        bad[byte] ^= 1 << bit;
        damages.push((format!("byte {byte} bit {bit} flipped"), Some(bad)));
    }
    for len in (0..pristine.len()).step_by(5).chain([pristine.len() - 1]) {
        damages.push((format!("cut to {len} bytes"), Some(pristine[..len].to_vec())));
    }
    damages.push(("extended".into(), Some([pristine.as_slice(), &[0u8; 8]].concat())));
    damages.push(("deleted".into(), None));
    for (what, bytes) in damages {
        match &bytes {
            Some(bytes) => common::rewrite(&index, bytes),
            None => std::fs::remove_file(&index).unwrap(),
        }
        let (log, report) = open(dir.path()).unwrap_or_else(|e| panic!("index {what}: {e}"));
        assert!(report.rebuilt_indexes >= 1, "index {what}: not noticed");
        assert_eq!(contents(&log), expected, "index {what}");
        assert_eq!(std::fs::read(&index).unwrap(), pristine, "index {what}: the rebuilt index is the one written at roll");
        drop(log);
        let (_, report) = open(dir.path()).unwrap();
        assert_eq!(report.rebuilt_indexes, 0, "index {what}: the rebuilt index is trusted on the next open");
    }
}

#[test]
fn a_missing_segment_refuses_to_open() {
    for remove_index_too in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        build(dir.path());
        let files = segment_files(dir.path());
        let middle = &files[1];
        std::fs::remove_file(middle).unwrap();
        if remove_index_too {
            std::fs::remove_file(middle.with_extension("index")).unwrap();
        }
        let result = open(dir.path());
        assert!(is_corrupt(&result), "{}", describe(&result));
        assert!(describe(&result).contains("missing"), "the error says a segment is missing: {}", describe(&result));
    }
}
