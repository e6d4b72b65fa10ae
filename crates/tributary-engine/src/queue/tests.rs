//! Feature tests of queues through the public API. Every test drives time with a
//! [`ManualClock`] and goes through [`Harness`], so an API change touches one place.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tributary_core::limits::QUEUE_PRIORITY_LEVELS;
use tributary_log::Durability;

use super::*;

const NO_WAIT: Duration = Duration::ZERO;

pub(super) struct Harness {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub queues: Option<Queues>,
}

impl Harness {
    pub fn new(config: QueueConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000_000);
        let queues = Queues::open(dir.path(), QueueDefaults { config: config.clone(), clock: clock.clone() }).unwrap();
        queues.create("q", config).unwrap();
        Harness { dir, clock, queues: Some(queues) }
    }

    pub fn queue(&self) -> Arc<Queue> {
        self.queues.as_ref().unwrap().get("q").unwrap()
    }

    /// Close everything and open it again from disk, as after a restart.
    pub fn reopen(&mut self) {
        let queues = self.queues.take().unwrap();
        queues.close().unwrap();
        drop(queues);
        let defaults = QueueDefaults { config: QueueConfig::default(), clock: self.clock.clone() };
        self.queues = Some(Queues::open(self.dir.path(), defaults).unwrap());
    }

    pub fn publish(&self, bodies: &[&str]) -> Vec<MessageId> {
        let messages: Vec<NewMessage> = bodies.iter().map(|b| NewMessage::new(b.to_string())).collect();
        self.queue().publish(&messages).unwrap()
    }

    pub fn receive(&self, group: &str, consumer: &str, max: usize) -> Vec<Delivery> {
        self.queue().receive(group, consumer, max, None, NO_WAIT).unwrap()
    }

    pub fn ack(&self, group: &str, deliveries: &[Delivery]) -> Vec<ReceiptOutcome> {
        let receipts: Vec<Receipt> = deliveries.iter().map(|d| d.receipt.clone()).collect();
        self.queue().ack(group, &receipts).unwrap()
    }
}

/// A fast config: no fsync (tests do not crash the machine), short leases.
pub(super) fn config() -> QueueConfig {
    QueueConfig {
        durability: Durability::Never,
        lease_ms_default: 1_000,
        backoff: Backoff { base_ms: 100, max_ms: 10_000 },
        deliveries_max: 3,
        segment_bytes: 1 << 20,
        ..QueueConfig::default()
    }
}

fn bodies(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| String::from_utf8(d.body.to_vec()).unwrap()).collect()
}

#[test]
fn an_acked_message_is_never_delivered_again() {
    let h = Harness::new(config());
    h.publish(&["a", "b"]);
    let got = h.receive("g", "c1", 10);
    assert_eq!(bodies(&got), ["a", "b"]);
    assert_eq!(got[0].delivery_count, 1);
    assert_eq!(h.ack("g", &got[..1]), [ReceiptOutcome::Ok]);
    h.clock.advance(5_000);
    let again = h.receive("g", "c1", 10);
    assert_eq!(bodies(&again), ["b"], "only the unacked message comes back after its lease");
    assert_eq!(again[0].delivery_count, 2);
    assert_eq!(h.ack("g", &got[..1]), [ReceiptOutcome::Stale], "a second ack of the same receipt is refused");
}

#[test]
fn nack_with_delay_redelivers_later() {
    let h = Harness::new(config());
    h.publish(&["a"]);
    let got = h.receive("g", "c1", 1);
    let q = h.queue();
    assert_eq!(q.nack("g", &[got[0].receipt.clone()], Some(500)).unwrap(), [ReceiptOutcome::Ok]);
    assert!(h.receive("g", "c1", 1).is_empty(), "not before the delay");
    h.clock.advance(499);
    assert!(h.receive("g", "c1", 1).is_empty());
    h.clock.advance(1);
    let again = h.receive("g", "c2", 1);
    assert_eq!(bodies(&again), ["a"]);
    assert_eq!(again[0].delivery_count, 2);
}

#[test]
fn nack_without_delay_backs_off_exponentially_with_jitter() {
    let backoff = Backoff { base_ms: 100, max_ms: 1_000 };
    for count in 1..8 {
        let full = (100u64 << (count - 1)).min(1_000);
        for seed in 0..50 {
            let delay = backoff.delay_ms(count, seed);
            assert!((full / 2..=full).contains(&delay), "count {count}: {delay} not in [{}, {full}]", full / 2);
        }
    }
    let h = Harness::new(QueueConfig { deliveries_max: 10, ..config() });
    h.publish(&["a"]);
    let got = h.receive("g", "c1", 1);
    h.queue().nack("g", &[got[0].receipt.clone()], None).unwrap();
    assert!(h.receive("g", "c1", 1).is_empty(), "backoff holds it back");
    h.clock.advance(100);
    assert_eq!(h.receive("g", "c1", 1).len(), 1, "within base_ms after the first delivery");
}

#[test]
fn lease_expiry_redelivers_with_the_delivery_count_kept_and_refuses_the_old_receipt() {
    let h = Harness::new(config());
    h.publish(&["a"]);
    let first = h.receive("g", "c1", 1);
    assert!(h.receive("g", "c2", 1).is_empty(), "leased to c1");
    h.clock.advance(1_000);
    let second = h.receive("g", "c2", 1);
    assert_eq!(second[0].delivery_count, 2);
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(h.ack("g", &first), [ReceiptOutcome::Stale], "the stale receipt must not ack the redelivery");
    assert_eq!(
        h.queue().nack("g", &[first[0].receipt.clone()], Some(0)).unwrap(),
        [ReceiptOutcome::Stale]
    );
    assert!(matches!(ReceiptOutcome::Stale.into_result(&first[0].receipt), Err(QueueError::StaleReceipt { .. })));
    assert_eq!(h.ack("g", &second), [ReceiptOutcome::Ok]);
    let bogus = Receipt::from("not-a-receipt".to_string());
    assert_eq!(h.queue().ack("g", &[bogus]).unwrap(), [ReceiptOutcome::Invalid]);
}

#[test]
fn extend_keeps_a_lease_past_its_first_deadline() {
    let h = Harness::new(config());
    h.publish(&["a"]);
    let got = h.receive("g", "c1", 1);
    h.clock.advance(900);
    assert_eq!(h.queue().extend("g", &[got[0].receipt.clone()], 5_000).unwrap(), [ReceiptOutcome::Ok]);
    h.clock.advance(1_000);
    assert_eq!(h.queue().tick().unwrap(), 0);
    assert!(h.receive("g", "c2", 1).is_empty());
    assert_eq!(h.ack("g", &got), [ReceiptOutcome::Ok]);
}

#[test]
fn max_deliveries_dead_letters_then_lists_then_redrives_once() {
    let h = Harness::new(config());
    let ids = h.publish(&["poison", "fine"]);
    let q = h.queue();
    q.create_group("other").unwrap();
    for attempt in 1..=3 {
        let got = h.receive("g", "c1", 10);
        let poison: Vec<_> = got.iter().filter(|d| d.id == ids[0]).collect();
        assert_eq!(poison[0].delivery_count, attempt);
        if attempt == 1 {
            h.ack("g", &got.iter().filter(|d| d.id == ids[1]).cloned().collect::<Vec<_>>());
        }
        q.nack("g", &[poison[0].receipt.clone()], Some(0)).unwrap();
    }
    assert!(h.receive("g", "c1", 10).is_empty(), "dead-lettered after deliveries_max deliveries");
    let letters = q.dead_letters(Some("g"), 0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].id, letters[0].delivery_count, letters[0].group.as_str()), (ids[0], 3, "g"));
    assert_eq!(&letters[0].body[..], b"poison");
    assert!(letters[0].reason.contains("nack"), "{}", letters[0].reason);
    assert!(q.dead_letters(Some("other"), 0, 10).unwrap().is_empty());
    assert_eq!(q.stats(Some("g")).unwrap().dead_lettered, 1);

    assert_eq!(q.redrive("g", Redrive::All).unwrap(), 1);
    assert_eq!(q.redrive("g", Redrive::All).unwrap(), 0, "a second redrive does not duplicate");
    assert!(q.dead_letters(None, 0, 10).unwrap()[0].redriven);
    let again = h.receive("g", "c1", 10);
    assert_eq!(bodies(&again), ["poison"]);
    assert_eq!(again[0].delivery_count, 1, "a redriven message is a new message");
    assert_ne!(again[0].id, ids[0]);
    let other = h.receive("other", "c1", 10);
    assert_eq!(bodies(&other), ["poison", "fine"], "the redriven copy is for group g only");
}

#[test]
fn lease_expiry_on_the_last_delivery_dead_letters() {
    let h = Harness::new(QueueConfig { deliveries_max: 1, ..config() });
    h.publish(&["a"]);
    h.receive("g", "c1", 1);
    h.clock.advance(1_000);
    assert_eq!(h.queue().tick().unwrap(), 1);
    let letters = h.queue().dead_letters(None, 0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].reason.contains("lease expired"));
    assert!(h.receive("g", "c1", 1).is_empty());
}

#[test]
fn a_delayed_message_is_receivable_at_deliver_at() {
    let h = Harness::new(config());
    let q = h.queue();
    q.publish(&[NewMessage::new("later").delay_ms(10_000), NewMessage::new("now")]).unwrap();
    let now = h.receive("g", "c1", 10);
    assert_eq!(bodies(&now), ["now"]);
    h.ack("g", &now);
    assert_eq!(q.stats(Some("g")).unwrap().delayed, 1);
    h.clock.advance(9_999);
    assert!(h.receive("g", "c1", 10).is_empty());
    h.clock.advance(1);
    assert_eq!(bodies(&h.receive("g", "c1", 10)), ["later"]);
    let too_late = NewMessage::new("x").delay_ms(tributary_core::limits::QUEUE_DELAY_MS_MAX + 1);
    assert!(matches!(q.publish(&[too_late]), Err(QueueError::LimitExceeded { limit: "QUEUE_DELAY_MS_MAX", .. })));
}

#[test]
fn a_dedup_id_within_the_window_returns_the_original_id_and_survives_a_restart() {
    let mut h = Harness::new(QueueConfig { dedup_window_ms: 60_000, ..config() });
    let q = h.queue();
    let first = q.publish(&[NewMessage::new("a").dedup_id("order-1"), NewMessage::new("a").dedup_id("order-1")]).unwrap();
    assert_eq!(first[0], first[1], "a duplicate in the same batch");
    let second = q.publish(&[NewMessage::new("a").dedup_id("order-1")]).unwrap();
    assert_eq!(second[0], first[0]);
    drop(q);
    h.reopen();
    h.clock.advance(30_000);
    assert_eq!(h.queue().publish(&[NewMessage::new("a").dedup_id("order-1")]).unwrap()[0], first[0], "rebuilt from the log");
    assert_eq!(h.receive("g", "c1", 10).len(), 1, "one copy only");
    h.clock.advance(30_001);
    assert_ne!(h.queue().publish(&[NewMessage::new("a").dedup_id("order-1")]).unwrap()[0], first[0], "after the window it is new");
}

/// Serve `rounds` receives of `batch` while every level always has work; count per level.
fn shares(levels: u8, rounds: usize, batch: usize) -> BTreeMap<u8, usize> {
    let h = Harness::new(QueueConfig { in_flight_per_consumer_max: 10_000, ..config() });
    let q = h.queue();
    let mut counts = BTreeMap::new();
    for level in 0..levels {
        let messages: Vec<NewMessage> = (0..rounds * batch).map(|i| NewMessage::new(format!("{level}-{i}")).priority(level)).collect();
        q.publish(&messages).unwrap();
    }
    for _ in 0..rounds {
        let got = h.receive("g", "c1", batch);
        assert_eq!(got.len(), batch);
        for d in &got {
            *counts.entry(d.priority).or_default() += 1;
        }
        h.ack("g", &got);
    }
    counts
}

#[test]
fn low_priority_gets_its_weighted_share_under_constant_high_priority_load() {
    // Levels 0 and 3 only: weights 8 and 1, so level 3 gets 1/9 of the deliveries.
    let counts = shares(4, 30, 45);
    let total: usize = counts.values().sum();
    assert_eq!(total, 1350);
    assert_eq!(counts[&0], 720, "{counts:?}");
    assert_eq!(counts[&1], 360);
    assert_eq!(counts[&2], 180);
    assert_eq!(counts[&3], 90, "the lowest level gets 1/15 under load on every level");
    let two = {
        let h = Harness::new(config());
        let q = h.queue();
        let high: Vec<NewMessage> = (0..900).map(|i| NewMessage::new(format!("h{i}"))).collect();
        let low: Vec<NewMessage> = (0..900).map(|i| NewMessage::new(format!("l{i}")).priority(QUEUE_PRIORITY_LEVELS - 1)).collect();
        q.publish(&high).unwrap();
        q.publish(&low).unwrap();
        let mut low_count = 0;
        for _ in 0..90 {
            let got = h.receive("g", "c1", 5);
            low_count += got.iter().filter(|d| d.priority == 3).count();
            h.ack("g", &got);
        }
        low_count
    };
    assert_eq!(two, 50, "450 deliveries under high-priority load: 1/9 go to the low level");
}

#[test]
fn a_consumer_at_its_in_flight_bound_is_refused_until_it_acks() {
    let h = Harness::new(QueueConfig { in_flight_per_consumer_max: 3, ..config() });
    h.publish(&["a", "b", "c", "d", "e"]);
    let got = h.receive("g", "c1", 10);
    assert_eq!(got.len(), 3, "capped at the bound");
    let refused = h.queue().receive("g", "c1", 1, None, NO_WAIT);
    assert!(matches!(refused, Err(QueueError::LimitExceeded { limit: "in_flight_per_consumer_max", max: 3, .. })), "{refused:?}");
    assert_eq!(h.receive("g", "c2", 10).len(), 2, "other consumers are not affected");
    h.ack("g", &got[..1]);
    assert_eq!(h.queue().receive("g", "c1", 1, None, NO_WAIT).unwrap().len(), 0, "room again, nothing left");
}

#[test]
fn two_groups_each_see_every_message() {
    let h = Harness::new(config());
    h.publish(&["a", "b", "c"]);
    let one = h.receive("billing", "c1", 10);
    let two = h.receive("shipping", "c1", 10);
    assert_eq!(bodies(&one), ["a", "b", "c"]);
    assert_eq!(bodies(&two), ["a", "b", "c"]);
    h.ack("billing", &one);
    assert_eq!(h.queue().stats(Some("shipping")).unwrap().in_flight, 3);
    assert_eq!(h.queue().stats(Some("billing")).unwrap().lag, 0);
}

#[test]
fn competing_consumers_never_hold_the_same_message_at_once() {
    let h = Harness::new(QueueConfig { lease_ms_default: 3_600_000, ..config() });
    let messages: Vec<NewMessage> = (0..2_000).map(|i| NewMessage::new(format!("m{i}"))).collect();
    h.queue().publish(&messages).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|c| {
            let q = h.queue();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                loop {
                    let got = q.receive("g", &format!("c{c}"), 37, None, NO_WAIT).unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.iter().map(|d| d.id));
                    // Ack half, keep the other half leased: both must stay exclusive.
                    let receipts: Vec<Receipt> = got.iter().step_by(2).map(|d| d.receipt.clone()).collect();
                    q.ack("g", &receipts).unwrap();
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in threads {
        for id in t.join().unwrap() {
            assert!(seen.insert(id), "{id} delivered twice");
        }
    }
    assert_eq!(seen.len(), 2_000);
}

#[test]
fn a_restart_preserves_acks_leases_dead_letters_and_redrive_marks() {
    let mut h = Harness::new(QueueConfig { durability: Durability::Always, ..config() });
    let mut ids = h.publish(&["acked", "leased", "dead"]);
    let got = h.receive("g", "c1", 3);
    h.ack("g", &got[..1]);
    let q = h.queue();
    q.nack("g", &[got[2].receipt.clone()], Some(0)).unwrap();
    for _ in 0..2 {
        let dead = h.receive("g", "c9", 10);
        assert_eq!(bodies(&dead), ["dead"]);
        q.nack("g", &[dead[0].receipt.clone()], Some(0)).unwrap();
    }
    ids.extend(h.publish(&["fresh"]));
    let letters = q.dead_letters(None, 0, 10).unwrap();
    assert_eq!(letters.len(), 1);
    drop(q);
    h.reopen();
    let q = h.queue();
    assert_eq!(q.dead_letters(None, 0, 10).unwrap(), letters);
    let leased = got.iter().find(|d| d.id == ids[1]).unwrap().clone();
    // "leased" stays leased to c1 until its original deadline; "fresh" is available.
    assert_eq!(bodies(&h.receive("g", "c2", 10)), ["fresh"]);
    assert_eq!(q.stats(Some("g")).unwrap().in_flight, 2);
    assert_eq!(q.extend("g", std::slice::from_ref(&leased.receipt), 1_000).unwrap(), [ReceiptOutcome::Ok], "the receipt survives the restart");
    h.clock.advance(1_000);
    let again = h.receive("g", "c2", 10);
    assert_eq!(bodies(&again), ["leased", "fresh"]);
    assert_eq!(again[0].delivery_count, 2);
    h.ack("g", &again);
    assert_eq!(q.redrive("g", Redrive::Ids(vec![ids[2]])).unwrap(), 1);
    drop(q);
    h.reopen();
    let q = h.queue();
    assert_eq!(q.redrive("g", Redrive::All).unwrap(), 0, "redrive marks survive a restart");
    assert_eq!(bodies(&h.receive("g", "c1", 10)), ["dead"]);
    h.clock.advance(10_000);
    assert_eq!(bodies(&h.receive("g", "c1", 10)), ["dead"], "the acked ones never come back");
    let stats = q.stats(Some("g")).unwrap();
    assert_eq!((stats.acked_total, stats.dead_lettered, stats.published_total), (3, 1, 5));
}

#[test]
fn recovery_from_snapshots_and_journal_tail_keeps_every_ack() {
    let mut h = Harness::new(config());
    let n = 2_500;
    let messages: Vec<NewMessage> = (0..n).map(|i| NewMessage::new(format!("m{i}"))).collect();
    h.queue().publish(&messages).unwrap();
    // One receive and one ack per message: 5,000 journal records, several snapshots. Every
    // seventh message is left unacked.
    let mut unacked = Vec::new();
    for i in 0..n {
        let got = h.receive("g", "c1", 1);
        if i % 7 == 0 {
            h.queue().nack("g", &[got[0].receipt.clone()], Some(1_000_000)).unwrap();
            unacked.push(got[0].id);
        } else {
            h.ack("g", &got);
        }
    }
    h.reopen();
    h.clock.advance(1_000_000);
    let mut again: Vec<MessageId> = h.receive("g", "c1", 1_000).iter().map(|d| d.id).collect();
    again.sort();
    assert_eq!(again, unacked);
    assert_eq!(h.queue().stats(Some("g")).unwrap().acked_total, (n - unacked.len()) as u64);
}

#[test]
fn the_window_holds_a_bounded_part_of_a_large_backlog() {
    let h = Harness::new(QueueConfig { in_flight_per_consumer_max: 10_000, ..config() });
    let q = h.queue();
    let total = QUEUE_WINDOW_RECORDS_MAX * 2 + 500;
    for chunk in 0..(total / 5_000 + 1) {
        let n = 5_000.min(total - chunk * 5_000);
        let messages: Vec<NewMessage> = (0..n).map(|_| NewMessage::new("x")).collect();
        q.publish(&messages).unwrap();
    }
    let got = h.receive("g", "c1", 1);
    assert_eq!(q.window_records("g"), QUEUE_WINDOW_RECORDS_MAX, "the window is full, not the whole backlog");
    assert_eq!(q.stats(Some("g")).unwrap().lag, total as u64);
    h.ack("g", &got);
    let mut acked = 1;
    while acked < total {
        let got = h.receive("g", "c1", 1_000);
        assert!(!got.is_empty());
        acked += got.len();
        h.ack("g", &got);
        assert!(q.window_records("g") <= QUEUE_WINDOW_RECORDS_MAX);
    }
    assert_eq!(q.stats(Some("g")).unwrap().lag, 0);
}

#[test]
fn a_long_poll_returns_as_soon_as_a_message_is_published() {
    let h = Harness::new(config());
    let q = h.queue();
    let waiter = std::thread::spawn(move || q.receive("g", "c1", 10, None, Duration::from_secs(10)).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let start = std::time::Instant::now();
    h.publish(&["wake"]);
    let got = waiter.join().unwrap();
    assert_eq!(bodies(&got), ["wake"]);
    assert!(start.elapsed() < Duration::from_secs(5));
    let empty_start = std::time::Instant::now();
    assert!(h.queue().receive("g", "c1", 10, None, Duration::from_millis(150)).unwrap().is_empty());
    assert!(empty_start.elapsed() >= Duration::from_millis(150));
}

#[test]
fn bad_requests_are_refused_with_the_limit_they_break() {
    let h = Harness::new(config());
    let q = h.queue();
    assert!(matches!(q.publish(&[NewMessage::new("x").priority(QUEUE_PRIORITY_LEVELS)]), Err(QueueError::InvalidMessage(_))));
    assert!(matches!(q.publish(&[NewMessage::new("x").header("tributary.queue.deliver-at", "0")]), Err(QueueError::InvalidMessage(_))));
    assert!(matches!(q.receive("g", "c1", QUEUE_RECEIVE_MESSAGES_MAX + 1, None, NO_WAIT), Err(QueueError::LimitExceeded { limit: "QUEUE_RECEIVE_MESSAGES_MAX", .. })));
    assert!(matches!(q.receive("g", "c1", 1, Some(0), NO_WAIT), Err(QueueError::LimitExceeded { limit: "QUEUE_LEASE_MS_MAX", .. })));
    assert!(matches!(q.receive("bad/group", "c1", 1, None, NO_WAIT), Err(QueueError::InvalidName(_))));
    assert!(matches!(q.ack("nobody", &[]), Err(QueueError::NotFound { kind: "group", .. })));
    let too_big = NewMessage::new(vec![0u8; tributary_core::limits::MESSAGE_BYTES_MAX]);
    assert!(matches!(q.publish(&[too_big]), Err(QueueError::LimitExceeded { limit: "MESSAGE_BYTES_MAX", .. })));
}

#[test]
fn the_registry_creates_lists_reopens_and_deletes_queues() {
    let mut h = Harness::new(config());
    let queues = h.queues.as_ref().unwrap();
    queues.create("orders", QueueConfig { deliveries_max: 7, ..config() }).unwrap();
    assert!(matches!(queues.create("orders", config()), Err(QueueError::AlreadyExists { .. })));
    assert!(matches!(queues.create("no/slash", config()), Err(QueueError::InvalidName(_))));
    assert!(matches!(queues.create("x", QueueConfig { deliveries_max: 0, ..config() }), Err(QueueError::InvalidConfig(_))));
    assert_eq!(queues.list(), ["orders", "q"]);
    h.reopen();
    let queues = h.queues.as_ref().unwrap();
    assert_eq!(queues.list(), ["orders", "q"]);
    assert_eq!(queues.get("orders").unwrap().config().deliveries_max, 7, "the config is persisted");
    let orders = queues.get("orders").unwrap();
    queues.delete("orders").unwrap();
    assert!(matches!(orders.publish(&[NewMessage::new("x")]), Err(QueueError::Deleted(_))));
    assert!(matches!(queues.get("orders"), Err(QueueError::NotFound { .. })));
    h.reopen();
    assert_eq!(h.queues.as_ref().unwrap().list(), ["q"]);
}

#[test]
fn stats_count_depth_in_flight_and_age() {
    let h = Harness::new(config());
    let q = h.queue();
    q.create_group("g").unwrap();
    assert!(matches!(q.create_group("g"), Err(QueueError::AlreadyExists { .. })));
    h.publish(&["a", "b", "c"]);
    h.clock.advance(250);
    let got = h.receive("g", "c1", 1);
    let stats = q.stats(None).unwrap();
    assert_eq!((stats.published_total, stats.depth, stats.in_flight, stats.lag), (3, 2, 1, 3));
    assert_eq!(stats.oldest_available_age_ms, Some(250));
    h.ack("g", &got);
    let stats = q.stats(Some("g")).unwrap();
    assert_eq!((stats.depth, stats.in_flight, stats.acked_total), (2, 0, 1));
    assert_eq!(q.groups(), ["g"]);
    q.delete_group("g").unwrap();
    assert!(q.groups().is_empty());
}

#[test]
fn the_journal_is_truncated_behind_snapshots_and_recovery_still_holds() {
    super::group::SNAPSHOT_EVERY_FOR_TESTS.with(|c| c.set(Some(1)));
    let mut h = Harness::new(QueueConfig { in_flight_per_consumer_max: 10_000, ..config() });
    let q = h.queue();
    let messages: Vec<NewMessage> = (0..5_000).map(|i| NewMessage::new(format!("held-{i}"))).collect();
    q.publish(&messages).unwrap();
    // 5,000 released messages in the window make every snapshot about 50 KB.
    let mut nacked = Vec::new();
    for _ in 0..5 {
        let got = h.receive("g", "c1", 1_000);
        let receipts: Vec<Receipt> = got.iter().map(|d| d.receipt.clone()).collect();
        q.nack("g", &receipts, Some(1_000_000_000)).unwrap();
        nacked.extend(got.iter().map(|d| d.id));
    }
    let extra: Vec<NewMessage> = (0..200).map(|i| NewMessage::new(format!("acked-{i}"))).collect();
    q.publish(&extra).unwrap();
    for _ in 0..200 {
        let got = h.receive("g", "c1", 1);
        h.ack("g", &got);
    }
    let journal = h.dir.path().join("q/groups/g/state");
    let segments = std::fs::read_dir(&journal).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log")).count();
    let bytes: u64 = std::fs::read_dir(&journal).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(segments <= 3, "{segments} journal segments: the old ones must be truncated");
    assert!(bytes < 3 * QUEUE_JOURNAL_SEGMENT_BYTES, "{bytes} bytes of journal");
    drop(q);
    h.reopen();
    h.clock.advance(1_000_000_000);
    let mut again = Vec::new();
    loop {
        let got = h.receive("g", "c1", 1_000);
        if got.is_empty() {
            break;
        }
        assert!(got.iter().all(|d| d.delivery_count == 2));
        again.extend(got.iter().map(|d| d.id));
        h.ack("g", &got);
    }
    again.sort();
    nacked.sort();
    assert_eq!(again, nacked, "exactly the released messages come back, none of the acked");
}

fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "log")).count()
}

#[test]
fn segments_every_group_has_finished_with_are_deleted_and_the_rest_stay() {
    let h = Harness::new(QueueConfig { segment_bytes: 4096, in_flight_per_consumer_max: 10_000, ..config() });
    let q = h.queue();
    let texts: Vec<String> = (0..2_000).map(|i| format!("message {i:>40}")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for chunk in refs.chunks(20) {
        h.publish(chunk);
    }
    let level0 = h.dir.path().join("q").join("p0");
    let before = segment_files(&level0);
    assert!(before > 10, "small segments roll: {before}");
    // Group a finishes everything; group b nothing yet: nothing may go.
    let mut acked = 0;
    while acked < 2_000 {
        let got = h.receive("a", "c1", 1_000);
        acked += got.len();
        h.ack("a", &got);
    }
    q.create_group("b").unwrap();
    q.tick().unwrap();
    assert_eq!(segment_files(&level0), before, "group b still needs every message");
    // Now b finishes too: the sealed segments go, and b's and a's view is unchanged.
    let mut acked = 0;
    while acked < 2_000 {
        let got = h.receive("b", "c1", 1_000);
        acked += got.len();
        h.ack("b", &got);
    }
    q.tick().unwrap();
    assert!(segment_files(&level0) <= 2, "only the active segment (and at most one more) remain");
    h.publish(&["after"]);
    assert_eq!(bodies(&h.receive("a", "c1", 10)), ["after"]);
    assert_eq!(q.stats(Some("b")).unwrap().lag, 1);
}
