//! Helpers shared by the integration tests: reading a log whole, finding its files and batches,
//! and a tiny seeded random number generator (so a failing seed can be replayed).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tributary_log::Log;
use tributary_log::batch::BatchHeader;

/// Every readable record as `(offset, value)`, values as UTF-8 (tombstones as `None`).
pub fn contents(log: &Log) -> Vec<(u64, Option<String>)> {
    let mut out = Vec::new();
    let mut from = log.start_offset();
    while from < log.high_watermark() {
        let records = log.read(from, 10_000, 1 << 20).expect("reading the log");
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        out.extend(records.into_iter().map(|r| (r.offset, r.value.map(|v| String::from_utf8(v.to_vec()).expect("utf-8 value")))));
    }
    out
}

/// The data files of a log directory, oldest first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    files_with_extension(dir, "log")
}

/// The index files of a log directory, oldest first.
pub fn index_files(dir: &Path) -> Vec<PathBuf> {
    files_with_extension(dir, "index")
}

fn files_with_extension(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

/// `(position, header)` of every batch in a segment file, walking the length fields.
pub fn batches(path: &Path) -> Vec<(usize, BatchHeader)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = BatchHeader::parse(&bytes[at..]).expect("an intact segment parses");
        out.push((at, header));
        at += header.total_bytes();
    }
    out
}

/// Flip one bit of a file in place.
pub fn flip_bit(path: &Path, byte: usize, bit: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut one = [0u8];
    file.read_exact_at(&mut one, byte as u64).unwrap();
    one[0] ^= 1 << bit;
    file.write_all_at(&one, byte as u64).unwrap();
}

/// Make a file hold exactly `bytes`, writing in place. (`std::fs::write` truncates first, and
/// ext4 then flushes the file on close: thousands of those make a test slow.)
pub fn rewrite(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).unwrap();
    file.write_all_at(bytes, 0).unwrap();
    file.set_len(bytes.len() as u64).unwrap();
}

/// xorshift64*: deterministic, seedable, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The seed for a randomized test: `TRIBUTARY_SEED` if set, else a fixed default.
pub fn seed(default: u64) -> u64 {
    std::env::var("TRIBUTARY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}
