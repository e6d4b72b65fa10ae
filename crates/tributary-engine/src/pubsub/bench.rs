//! [`bench_subscriptions`]: build a trie of many wildcard subscriptions and time matching.
//!
//! Used by the big test below and, later, by the `tributary` binary. Deterministic: the same `n`
//! builds the same subscriptions and publishes the same subjects.

use std::time::Instant;

use tributary_core::{Subject, SubjectPattern};

use super::trie::{SubjectTrie, SubscriptionId};

/// What [`bench_subscriptions`] measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SubscriptionBenchReport {
    pub subscriptions: usize,
    pub trie_nodes: usize,
    pub build_ms: u64,
    /// Growth of this process's resident set while building (from `/proc/self/statm`; `None`
    /// where that file is missing). Noisy when other threads allocate at the same time.
    pub resident_bytes_delta: Option<u64>,
    /// The trie's own tables by capacity, allocator overhead not included.
    pub heap_bytes_estimate: usize,
    pub publishes: usize,
    /// Matches found over all publishes.
    pub matches: usize,
    pub match_p50_us: f64,
    pub match_p99_us: f64,
    pub match_max_us: f64,
}

/// The `i`th benchmark pattern: a mix of trailing `*`, inner `*` and trailing `>`, with many
/// distinct literal tokens (one per subscription at the device level).
pub fn bench_pattern(i: usize) -> String {
    match i % 4 {
        0 | 1 => format!("tenant.{}.device.{}.*", i % 1000, i),
        2 => format!("orders.{}.>", i % 5000),
        _ => format!("tenant.{}.*.{}.temp", i % 1000, i),
    }
}

/// The `k`th benchmark subject for `n` subscriptions: alternately a device reading (matching the
/// device's own patterns) and an order event (matching the subscriptions on its region).
pub fn bench_subject(k: usize, n: usize) -> String {
    let i = (splitmix(k as u64) % n.max(1) as u64) as usize;
    if k.is_multiple_of(2) {
        // A device whose patterns are device patterns (i % 4 != 2).
        let i = if i % 4 == 2 { i - 1 } else { i };
        format!("tenant.{}.device.{}.temp", i % 1000, i)
    } else {
        // A region that has order subscriptions (i % 4 == 2).
        let j = (i / 4) * 4 + 2;
        let j = if j < n { j } else { 2 };
        format!("orders.{}.eu.created", j % 5000)
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Resident set size of this process, in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux on x86-64 and most aarch64 kernels use 4 KiB pages.
    Some(pages * 4096)
}

/// Build `n` subscriptions ([`bench_pattern`]) into a [`SubjectTrie`], then match `publishes`
/// subjects ([`bench_subject`]) one at a time, timing each.
pub fn bench_subscriptions(n: usize, publishes: usize) -> SubscriptionBenchReport {
    let (trie, build_ms, resident_bytes_delta) = build(n);
    let mut out: Vec<u64> = Vec::new();
    let mut times_us: Vec<f64> = Vec::with_capacity(publishes);
    let mut matches = 0;
    for k in 0..publishes {
        let subject = Subject::parse(&bench_subject(k, n)).expect("bench subjects are valid");
        out.clear();
        let started = Instant::now();
        trie.match_subject(&subject, &mut out);
        times_us.push(started.elapsed().as_secs_f64() * 1e6);
        matches += out.len();
    }
    times_us.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        if times_us.is_empty() { 0.0 } else { times_us[((times_us.len() - 1) as f64 * p).round() as usize] }
    };
    SubscriptionBenchReport {
        subscriptions: trie.len(),
        trie_nodes: trie.node_count(),
        build_ms,
        resident_bytes_delta,
        heap_bytes_estimate: trie.heap_bytes_estimate(),
        publishes,
        matches,
        match_p50_us: percentile(0.50),
        match_p99_us: percentile(0.99),
        match_max_us: percentile(1.0),
    }
}

fn build(n: usize) -> (SubjectTrie<u64>, u64, Option<u64>) {
    let before = resident_bytes();
    let started = Instant::now();
    let mut trie = SubjectTrie::new();
    for i in 0..n {
        let pattern = SubjectPattern::parse(&bench_pattern(i)).expect("bench patterns are valid");
        trie.insert(&pattern, SubscriptionId(i as u64), i as u64);
    }
    let build_ms = started.elapsed().as_millis() as u64;
    let delta = before.zip(resident_bytes()).map(|(b, a)| a.saturating_sub(b));
    (trie, build_ms, delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1,000,000 with `TRIBUTARY_BIG=1`; 200,000 otherwise, to keep the debug build's test run short.
    fn big_n() -> usize {
        if std::env::var("TRIBUTARY_BIG").as_deref() == Ok("1") { 1_000_000 } else { 200_000 }
    }

    #[test]
    fn a_million_wildcard_subscriptions_match_like_the_reference_on_samples() {
        let n = big_n();
        let (trie, _, _) = build(n);
        assert_eq!(trie.len(), n);
        // The reference: each sample subject against every pattern that could match it. The
        // patterns of one tenant and of one order region are the only candidates, so the check
        // looks at those (a linear scan of all n patterns per sample would dominate the test).
        for k in 0..200 {
            let subject = Subject::parse(&bench_subject(k, n)).unwrap();
            let mut got = Vec::new();
            trie.match_subject(&subject, &mut got);
            got.sort_unstable();
            let candidates: Vec<usize> = if k % 2 == 0 {
                let tenant: usize = subject.tokens().nth(1).unwrap().parse().unwrap();
                (tenant..n).step_by(1000).collect()
            } else {
                let region: usize = subject.tokens().nth(1).unwrap().parse().unwrap();
                (region..n).step_by(5000).collect()
            };
            let want: Vec<u64> = candidates
                .into_iter()
                .filter(|&i| SubjectPattern::parse(&bench_pattern(i)).unwrap().matches(&subject))
                .map(|i| i as u64)
                .collect();
            assert!(!want.is_empty(), "sample {subject} should match something");
            assert_eq!(got, want, "subject {subject}");
        }
        // A subject outside every pattern's reach matches nothing.
        let mut none = Vec::new();
        trie.match_subject(&Subject::parse("billing.eu.created").unwrap(), &mut none);
        assert!(none.is_empty());
    }

    /// With `TRIBUTARY_BIG=1`, the numbers quoted for the million-subscription target: run it as
    /// `TRIBUTARY_BIG=1 cargo test --release -p tributary-engine bench_ -- --nocapture`.
    #[test]
    fn bench_subscriptions_stays_within_the_memory_target() {
        let n = big_n();
        let report = bench_subscriptions(n, if n >= 1_000_000 { 100_000 } else { 10_000 });
        eprintln!("{report:#?}");
        assert_eq!(report.subscriptions, n);
        // Target: 300 MB for a million wildcard subscriptions, scaled to n.
        assert!(report.heap_bytes_estimate <= 300_000_000 / 1_000_000 * n, "{report:?}");
    }

    #[test]
    fn bench_subscriptions_reports_sane_numbers() {
        let report = bench_subscriptions(10_000, 1000);
        assert_eq!((report.subscriptions, report.publishes), (10_000, 1000));
        assert!(report.matches > 0);
        assert!(report.match_p50_us <= report.match_p99_us && report.match_p99_us <= report.match_max_us);
        assert!(report.heap_bytes_estimate > 0);
    }
}
