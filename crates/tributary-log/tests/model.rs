//! Property test: random operations on a log, checked against a `Vec` of records.
//!
//! Appends (keys, values, tombstones, headers, explicit timestamps), reads from random offsets
//! with random limits, reopens, rolls (4 KiB segments), retention by bytes, time lookups, and
//! idempotent appends with retries, gaps and forgotten batches. `PROPTEST_CASES` sets the case
//! count.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;
use tributary_core::{Header, Record, StoredRecord, now_ms};
use tributary_log::{Durability, Log, LogConfig, LogError, PRODUCER_BATCHES_CACHED};

#[derive(Debug, Clone)]
struct Spec {
    key: Option<u8>,
    value: Option<Vec<u8>>,
    headers: Vec<(bool, Vec<u8>)>,
    timestamp_ms: i64,
}

impl Spec {
    fn record(&self) -> Record {
        Record {
            key: self.key.map(|k| Bytes::from(vec![b'a' + k])),
            value: self.value.clone().map(Bytes::from),
            headers: self.headers.iter().map(|(long, v)| Header { name: if *long { "x-trace".into() } else { "h".into() }, value: Bytes::from(v.clone()) }).collect(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

#[derive(Debug, Clone)]
enum Action {
    Next,
    Retry(u8),
    Gap(u8),
    Forgotten,
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Spec>),
    Read { pick: u16, max_records: usize, max_bytes: usize },
    Reopen,
    Retention,
    Time(i64),
    Produce { producer: u64, action: Action, records: Vec<Spec> },
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        proptest::option::weighted(0.6, 0u8..4),
        proptest::option::weighted(0.9, proptest::collection::vec(any::<u8>(), 0..120)),
        proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..8)), 0..3),
        1i64..1000,
    )
        .prop_map(|(key, value, headers, timestamp_ms)| Spec { key, value, headers, timestamp_ms })
}

fn batch() -> impl Strategy<Value = Vec<Spec>> {
    proptest::collection::vec(spec(), 1..6)
}

fn op(idempotent: bool) -> BoxedStrategy<Op> {
    let common = prop_oneof![
        6 => batch().prop_map(Op::Append),
        4 => (any::<u16>(), 0usize..20, prop_oneof![Just(1usize), 0usize..2000, Just(usize::MAX)])
            .prop_map(|(pick, max_records, max_bytes)| Op::Read { pick, max_records, max_bytes }),
        1 => Just(Op::Reopen),
        2 => (0i64..1100).prop_map(Op::Time),
    ];
    if idempotent {
        let action = prop_oneof![4 => Just(Action::Next), 2 => any::<u8>().prop_map(Action::Retry), 1 => any::<u8>().prop_map(Action::Gap), 1 => Just(Action::Forgotten)];
        prop_oneof![5 => common, 5 => (1u64..3, action, batch()).prop_map(|(producer, action, records)| Op::Produce { producer, action, records })].boxed()
    } else {
        prop_oneof![8 => common, 1 => Just(Op::Retention)].boxed()
    }
}

/// One idempotent batch as the model remembers it.
#[derive(Debug, Clone, Copy)]
struct Sent {
    base_sequence: u32,
    count: u32,
    base_offset: u64,
    last_offset: u64,
}

#[derive(Default)]
struct Model {
    records: Vec<StoredRecord>,
    start: u64,
    next: u64,
    producers: HashMap<u64, Vec<Sent>>,
}

impl Model {
    fn append(&mut self, specs: &[Spec]) -> (u64, u64) {
        let base = self.next;
        for spec in specs {
            let r = spec.record();
            self.records.push(StoredRecord { offset: self.next, timestamp_ms: r.timestamp_ms, key: r.key, value: r.value, headers: r.headers });
            self.next += 1;
        }
        (base, self.next - 1)
    }
}

fn open(dir: &Path, config: &LogConfig) -> Log {
    Log::open(dir, config.clone()).expect("open").0
}

fn run(ops: Vec<Op>, config: LogConfig) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), &config);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(specs) => {
                let records: Vec<Record> = specs.iter().map(Spec::record).collect();
                let appended = log.append(&records).unwrap();
                let (base, last) = model.append(&specs);
                prop_assert_eq!((appended.base_offset, appended.last_offset, appended.duplicate), (base, last, false));
            }
            Op::Read { pick, max_records, max_bytes } => {
                let low = model.start.saturating_sub(1);
                let from = low + u64::from(pick) % (model.next + 2 - low);
                let result = log.read(from, max_records, max_bytes);
                if from < model.start || from > model.next {
                    let out_of_range = matches!(result, Err(LogError::OffsetOutOfRange { .. }));
                    prop_assert!(out_of_range, "read({}) outside {}..{}: {:?}", from, model.start, model.next, result);
                    continue;
                }
                let got = result.unwrap();
                let want: Vec<&StoredRecord> = model.records.iter().filter(|r| r.offset >= from).collect();
                prop_assert!(got.len() <= max_records, "{} records for max_records {}", got.len(), max_records);
                if max_records > 0 && !want.is_empty() {
                    prop_assert!(!got.is_empty(), "read({}, {}, {}) returned nothing", from, max_records, max_bytes);
                }
                for (g, w) in got.iter().zip(&want) {
                    prop_assert_eq!(g, *w);
                }
                prop_assert!(got.len() <= want.len());
            }
            Op::Reopen => {
                drop(log);
                let (reopened, report) = Log::open(dir.path(), config.clone()).unwrap();
                log = reopened;
                prop_assert_eq!(report.truncated_bytes, 0);
                prop_assert_eq!(report.next_offset, model.next);
                prop_assert_eq!(log.start_offset(), model.start);
            }
            Op::Retention => {
                log.enforce_retention(now_ms()).unwrap();
                let start = log.start_offset();
                prop_assert!(start >= model.start && start <= model.next, "start {} outside {}..{}", start, model.start, model.next);
                let limit = config.retention_bytes.unwrap();
                prop_assert!(log.size_bytes() <= limit || log.segment_count() == 1, "{} bytes over {} in {} segments", log.size_bytes(), limit, log.segment_count());
                model.records.retain(|r| r.offset >= start);
                model.start = start;
            }
            Op::Time(target) => {
                let want = model.records.iter().find(|r| r.timestamp_ms >= target).map(|r| r.offset);
                prop_assert_eq!(log.offset_for_timestamp(target).unwrap(), want, "offset_for_timestamp({})", target);
            }
            Op::Produce { producer, action, records: specs } => {
                let sent = model.producers.entry(producer).or_default();
                let next_sequence = sent.last().map_or(0, |s| s.base_sequence + s.count);
                let cached = &sent[sent.len().saturating_sub(PRODUCER_BATCHES_CACHED)..];
                match action {
                    Action::Retry(k) if !cached.is_empty() => {
                        let s = cached[k as usize % cached.len()];
                        let specs: Vec<Spec> = (0..s.count as usize).map(|i| specs[i % specs.len()].clone()).collect();
                        let records: Vec<Record> = specs.iter().map(Spec::record).collect();
                        let a = log.append_idempotent(producer, s.base_sequence, &records).unwrap();
                        prop_assert_eq!((a.base_offset, a.last_offset, a.duplicate), (s.base_offset, s.last_offset, true), "retry of {:?}", s);
                    }
                    Action::Gap(d) if !sent.is_empty() => {
                        let records: Vec<Record> = specs.iter().map(Spec::record).collect();
                        let got = next_sequence + 1 + u32::from(d);
                        let result = log.append_idempotent(producer, got, &records);
                        let refused = matches!(result, Err(LogError::OutOfOrderSequence { expected, .. }) if expected == next_sequence);
                        prop_assert!(refused, "a gap to {} after {}: {:?}", got, next_sequence, result);
                    }
                    Action::Forgotten if sent.len() > PRODUCER_BATCHES_CACHED => {
                        let s = sent[sent.len() - PRODUCER_BATCHES_CACHED - 1];
                        let records: Vec<Record> = (0..s.count as usize).map(|i| specs[i % specs.len()].record()).collect();
                        let result = log.append_idempotent(producer, s.base_sequence, &records);
                        let refused = matches!(result, Err(LogError::OutOfOrderSequence { .. }));
                        prop_assert!(refused, "a batch no longer remembered: {:?}", result);
                    }
                    _ => {
                        let records: Vec<Record> = specs.iter().map(Spec::record).collect();
                        let a = log.append_idempotent(producer, next_sequence, &records).unwrap();
                        let (base_offset, last_offset) = model.append(&specs);
                        prop_assert_eq!((a.base_offset, a.last_offset, a.duplicate), (base_offset, last_offset, false));
                        let count = specs.len() as u32;
                        model.producers.get_mut(&producer).unwrap().push(Sent { base_sequence: next_sequence, count, base_offset, last_offset });
                    }
                }
            }
        }
        prop_assert_eq!(log.high_watermark(), model.next);
    }
    // Finally the whole log, read in one go, is the model.
    let all = log.read(model.start, usize::MAX, usize::MAX).unwrap();
    prop_assert_eq!(all, model.records);
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(128)
}

fn config() -> impl Strategy<Value = LogConfig> {
    (prop_oneof![Just(64u64), Just(256), Just(4096)], 4_000u64..20_000).prop_map(|(index_interval_bytes, retention)| LogConfig {
        durability: Durability::Never,
        segment_bytes_max: 4096,
        index_interval_bytes,
        retention_bytes: Some(retention),
        ..LogConfig::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_log_behaves_like_a_vec_of_records(ops in proptest::collection::vec(op(false), 1..80), config in config()) {
        run(ops, config)?;
    }

    #[test]
    fn idempotent_producers_behave_like_a_table_of_their_last_batches(ops in proptest::collection::vec(op(true), 1..80), config in config()) {
        run(ops, config)?;
    }
}
