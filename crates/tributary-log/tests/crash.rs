//! Crash test: a child process appends under `Durability::Always` from several threads and
//! prints each acknowledgement; the parent kills it with SIGKILL at a random moment, reopens
//! the log, and proves every acknowledged record is there, intact, at dense offsets, and that
//! idempotent producers still recognise their last acknowledged batch. Then the next child
//! appends to the same directory.
//!
//! `TRIBUTARY_CRASH_ITERATIONS` (default 20) sets the number of kills, `TRIBUTARY_SEED` the seed.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rng;
use tributary_core::{Record, key_hash};
use tributary_log::{Durability, Log, LogConfig};

const CHILD_DIR: &str = "TRIBUTARY_CRASH_CHILD";
const CHILD_ITERATION: &str = "TRIBUTARY_CRASH_CHILD_ITERATION";
const TEST_NAME: &str = "every_acknowledged_record_survives_kill_9_in_a_loop";
/// The child gives up on its own after this long, should the parent be gone.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(30);

fn config() -> LogConfig {
    LogConfig { durability: Durability::Always, segment_bytes_max: 64 * 1024, index_interval_bytes: 4096, ..LogConfig::default() }
}

/// Children of odd iterations append as idempotent producers.
fn idempotent(iteration: u64) -> bool {
    iteration % 2 == 1
}

fn producer_id(iteration: u64, thread: u64) -> u64 {
    iteration * 16 + thread + 1
}

/// Which record this is: written by `thread` of the child of `iteration`, record `index` of the
/// batch whose first record has producer sequence `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Id {
    iteration: u64,
    thread: u64,
    seq: u64,
    index: u64,
}

/// A value that names its record, padded to a length derived from it, with a hash of the rest.
fn value(id: Id) -> String {
    let pad = key_hash(format!("{id:?}").as_bytes()) % 300;
    let body = format!("{}.{}.{}.{}.{pad}.{}", id.iteration, id.thread, id.seq, id.index, "p".repeat(pad as usize));
    format!("{body}.{:016x}", key_hash(body.as_bytes()))
}

/// Parse and check a value written by [`value`].
fn parse(value: &[u8]) -> Result<Id, String> {
    let text = std::str::from_utf8(value).map_err(|e| e.to_string())?;
    let (body, hash) = text.rsplit_once('.').ok_or("no hash")?;
    if format!("{:016x}", key_hash(body.as_bytes())) != hash {
        return Err(format!("hash mismatch in {text:?}"));
    }
    let fields: Vec<&str> = body.split('.').collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or(format!("bad field {i} in {text:?}"));
    let id = Id { iteration: number(0)?, thread: number(1)?, seq: number(2)?, index: number(3)? };
    if value != self::value(id).as_bytes() {
        return Err(format!("{text:?} is not the value of {id:?}"));
    }
    Ok(id)
}

fn records(iteration: u64, thread: u64, seq: u64, count: u64) -> Vec<Record> {
    (0..count)
        .map(|index| {
            let id = Id { iteration, thread, seq, index };
            let mut record = Record::from_value(value(id));
            if index % 2 == 1 {
                record.key = Some(format!("t{thread}").into());
            }
            record
        })
        .collect()
}

/// One acknowledged append, as the child printed it.
#[derive(Debug, Clone, Copy)]
struct Ack {
    iteration: u64,
    thread: u64,
    seq: u64,
    count: u64,
    base: u64,
    last: u64,
}

fn child(dir: &Path, iteration: u64) {
    let (log, _) = Log::open(dir, config()).expect("the child opens the log");
    let threads = 2 + key_hash(&iteration.to_le_bytes()) % 3;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (log, out) = (log.clone(), out.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(iteration * 1000 + thread);
                let mut seq = 0u64;
                while started.elapsed() < CHILD_LIFETIME_MAX {
                    let count = if rng.below(2) == 0 { 1 } else { 1 + rng.below(8) };
                    let batch = records(iteration, thread, seq, count);
                    let appended = if idempotent(iteration) {
                        log.append_idempotent(producer_id(iteration, thread), seq as u32, &batch)
                    } else {
                        log.append(&batch)
                    }
                    .expect("append");
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ack {thread} {seq} {count} {} {} {}", appended.base_offset, appended.last_offset, appended.duplicate).unwrap();
                    out.flush().unwrap();
                    seq += count;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

/// Run one child, kill it after `delay`, and return what it acknowledged.
fn run_child(dir: &Path, iteration: u64, delay: Duration) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_ITERATION, iteration.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut acks = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).unwrap() == 0 || !line.ends_with(b"\n") {
                return acks; // EOF; a line cut by the kill was never acknowledged
            }
            let text = String::from_utf8(line.clone()).unwrap();
            let Some(rest) = text.strip_prefix("ack ") else { continue };
            let f: Vec<u64> = rest.split_whitespace().take(5).map(|f| f.parse().unwrap()).collect();
            assert!(rest.trim_end().ends_with("false"), "a child never retries, so never sees a duplicate: {text}");
            acks.push(Ack { iteration, thread: f[0], seq: f[1], count: f[2], base: f[3], last: f[4] });
        }
    });
    std::thread::sleep(delay);
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let acks = reader.join().unwrap();
    if !still_running {
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        panic!("iteration {iteration}: the child exited before the kill ({status}):\n{stderr}");
    }
    acks
}

/// Reopen and check: every record intact and written once, offsets dense, every acknowledged
/// batch where its acknowledgement said, idempotent producers still know their last batch.
fn verify(dir: &Path, acked: &[Ack], check_from: u64, iteration: u64) -> u64 {
    let (log, report) = Log::open(dir, config()).unwrap_or_else(|e| panic!("iteration {iteration}: reopen failed: {e}"));
    let mut found: HashMap<u64, Id> = HashMap::new();
    let mut seen: HashMap<Id, u64> = HashMap::new();
    let mut next = check_from;
    while next < log.high_watermark() {
        let batch = log.read(next, 5000, 1 << 20).unwrap_or_else(|e| panic!("iteration {iteration}: read at {next}: {e}"));
        for record in batch {
            assert_eq!(record.offset, next, "iteration {iteration}: offsets are dense");
            let id = parse(record.value.as_deref().unwrap_or_default()).unwrap_or_else(|e| panic!("iteration {iteration}: offset {next}: {e}"));
            if let Some(other) = seen.insert(id, next) {
                panic!("iteration {iteration}: {id:?} written twice, at {other} and {next}");
            }
            found.insert(next, id);
            next += 1;
        }
    }
    assert_eq!(next, report.next_offset);
    for ack in acked.iter().filter(|a| a.base >= check_from) {
        assert_eq!(ack.last - ack.base + 1, ack.count, "{ack:?}");
        for index in 0..ack.count {
            let want = Id { iteration: ack.iteration, thread: ack.thread, seq: ack.seq, index };
            assert_eq!(found.get(&(ack.base + index)), Some(&want), "iteration {iteration}: acknowledged record lost or moved: {ack:?} (log ends at {next}, report {report:?})");
        }
    }
    // The last acknowledged batch of each idempotent producer of this iteration, retried.
    if idempotent(iteration) {
        let mut last: HashMap<u64, Ack> = HashMap::new();
        for ack in acked.iter().filter(|a| a.iteration == iteration) {
            last.insert(ack.thread, *ack);
        }
        for ack in last.values() {
            let retry = log
                .append_idempotent(producer_id(iteration, ack.thread), ack.seq as u32, &records(iteration, ack.thread, ack.seq, ack.count))
                .unwrap_or_else(|e| panic!("iteration {iteration}: retry of {ack:?}: {e}"));
            assert!(retry.duplicate && (retry.base_offset, retry.last_offset) == (ack.base, ack.last), "iteration {iteration}: retry of {ack:?} gave {retry:?}");
        }
        assert_eq!(log.high_watermark(), next, "retries write nothing");
    }
    next
}

#[test]
fn every_acknowledged_record_survives_kill_9_in_a_loop() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let iteration = std::env::var(CHILD_ITERATION).unwrap().parse().unwrap();
        child(Path::new(&dir), iteration);
        return;
    }
    let iterations: u64 = std::env::var("TRIBUTARY_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed = common::seed(0x5eed);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<Ack> = Vec::new();
    let mut end = 0u64;
    let mut acked_total = 0;
    for iteration in 0..iterations {
        // Mostly mid-append kills; now and then one during startup and recovery.
        let delay = Duration::from_millis(if rng.below(8) == 0 { rng.below(40) } else { 40 + rng.below(300) });
        let acks = run_child(dir.path(), iteration, delay);
        acked_total += acks.len();
        acked.extend(acks);
        // The whole log now and then; otherwise what the last few children wrote.
        let full = iteration % 10 == 9 || iteration + 1 == iterations;
        let check_from = if full { 0 } else { end.saturating_sub(2000) };
        end = verify(dir.path(), &acked, check_from, iteration);
    }
    let segments = common::segment_files(dir.path()).len();
    eprintln!("seed {seed}: {iterations} kills, {acked_total} acknowledged appends, {end} records in {segments} segments");
    assert!(acked_total > 0, "the children acknowledged something");
    assert!(segments > 1, "segments rolled during the test");
}
