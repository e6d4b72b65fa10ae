//! The queue interface's guarantees ([`QueueStore`]), one case each. Every case works on a
//! queue of its own (`<namespace>-<case>`), deleted at its end. Leases and delays are real time
//! (hundreds of milliseconds), so the suite takes a few seconds.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tributary_core::Header;

use super::{CaseFuture, Report, ok, refused};
use crate::queue::{Backoff, Delivery, NewMessage, QueueConfig, QueueError, QueueStore, ReceiptOutcome, Redrive};

/// One guarantee of the QueueStore interface.
pub type Case = super::Case<dyn QueueStore, String>;

/// Every case, in the order they run.
pub const CASES: &[Case] = &[
    Case { name: "round_trip", guarantee: "a message is received with the id its publish returned, its body, key and headers in order, delivery count 1", run: round_trip },
    Case { name: "groups", guarantee: "every group sees every message; acks of one group do not touch another", run: groups },
    Case { name: "competing", guarantee: "within a group a leased message goes to one consumer at a time", run: competing },
    Case { name: "ack", guarantee: "an acked message never comes back to its group", run: ack },
    Case { name: "lease_expiry", guarantee: "an unacked message comes back after its lease, with its delivery count raised", run: lease_expiry },
    Case { name: "lease_per_call", guarantee: "a receive's own lease, shorter than the queue's default, is the one that expires", run: lease_per_call },
    Case { name: "extend", guarantee: "extending a lease keeps the message from coming back past the original deadline", run: extend },
    Case { name: "nack_delay", guarantee: "a nacked message comes back after the delay given, not before", run: nack_delay },
    Case { name: "dead_letter", guarantee: "a message nacked on its last allowed delivery is dead-lettered with its group and count, and not delivered again", run: dead_letter },
    Case { name: "largest_message", guarantee: "a message of MESSAGE_BYTES_MAX bytes (body, key and headers, less the queue's 512 of its own) comes back whole, and dead-lettered whole with the longest group name", run: largest_message },
    Case { name: "dead_letter_on_lease", guarantee: "a message whose last allowed lease expires is dead-lettered, not delivered again", run: dead_letter_on_lease },
    Case { name: "dedup", guarantee: "a dedup id published again within the window returns the first id and is delivered once", run: dedup },
    Case { name: "stale_receipt", guarantee: "the receipt of an earlier delivery attempt is Stale and does not ack the redelivery", run: stale_receipt },
    Case { name: "priority", guarantee: "level 0 is served before level 3 when both have work (weighted, without starvation)", run: priority },
    Case { name: "delay", guarantee: "a message published with a delay is not received before it is due", run: delay },
    Case { name: "in_flight_limit", guarantee: "a consumer holding in_flight_per_consumer_max leases is refused by name", run: in_flight_limit },
    Case { name: "errors", guarantee: "unknown queues, bad names, reserved headers, bad priorities, oversized receives and conflicting configurations are refused by name", run: errors },
    Case { name: "redrive", guarantee: "a redrive republishes a group's dead letters for that group only, each once, and marks them redriven", run: redrive },
    Case { name: "stats", guarantee: "stats count per group what waits, what is leased, what was acked and what was dead-lettered; the queue is listed with its configuration", run: stats },
    Case { name: "delete", guarantee: "a deleted queue is gone with its messages and dead letters; one created again starts empty", run: delete },
];

/// Runs every case against `store`, with queues under `namespace` (unique per run; keep it short:
/// queue names are at most `NAME_BYTES_MAX` bytes).
pub async fn run(store: &(dyn QueueStore + 'static), namespace: &str) -> Report {
    super::run_cases(store, store.backend(), store.gaps(), CASES, |case| format!("{namespace}-{}", case.replace('_', "-")), |s, queue| Box::pin(async move { let _ = s.delete_queue(&queue).await; })).await
}

/// A queue with a short default lease, `deliveries_max` deliveries and a 100 ms backoff.
fn config(lease_ms: u64, deliveries_max: u32) -> QueueConfig {
    QueueConfig { lease_ms_default: lease_ms, deliveries_max, backoff: Backoff { base_ms: 100, max_ms: 100 }, ..QueueConfig::default() }
}

fn text(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

/// Receives until `n` messages came or `within` passed.
async fn receive_n(s: &dyn QueueStore, queue: &str, group: &str, consumer: &str, n: usize, within: Duration) -> Result<Vec<Delivery>, String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        got.extend(ok(s.receive(queue, group, consumer, n - got.len(), None, left).await, "receive")?);
    }
    Ok(got)
}

fn round_trip(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        let before = tributary_core::now_ms() as u64;
        let mut first = NewMessage::new("one").key("k-1");
        first.headers = vec![
            Header { name: "trace".into(), value: Bytes::from_static(b"a") },
            Header { name: "content-type".into(), value: Bytes::from_static(b"text/plain") },
            Header { name: "trace".into(), value: Bytes::from_static(b"b") },
        ];
        let second = NewMessage::new(Bytes::from(vec![0u8, 255, 10]));
        let ids = ok(s.publish(&queue, vec![first.clone(), second]).await, "publish")?;
        check_eq!(ids.len(), 2);
        check!(ids[0] != ids[1], "two messages got one id {:?}", ids[0]);
        let got = receive_n(s, &queue, "g", "c1", 2, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 2);
        let one = got.iter().find(|d| d.id == ids[0]).ok_or_else(|| format!("no delivery has the first id {:?}: {got:?}", ids[0]))?;
        let two = got.iter().find(|d| d.id == ids[1]).ok_or_else(|| format!("no delivery has the second id {:?}: {got:?}", ids[1]))?;
        check_eq!(text(one), "one");
        check_eq!(one.key.as_deref(), Some(&b"k-1"[..]));
        check_eq!(one.headers, first.headers);
        check_eq!(one.delivery_count, 1);
        check!(one.enqueued_at_ms >= before.saturating_sub(1_000) && one.enqueued_at_ms <= tributary_core::now_ms() as u64 + 1_000, "enqueued_at_ms {} is not the publish time", one.enqueued_at_ms);
        check_eq!(two.body.as_ref(), &[0u8, 255, 10][..]);
        check_eq!(two.key, None);
        check!(two.headers.is_empty(), "headers appeared: {:?}", two.headers);
        Ok(())
    })
}

fn groups(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        let ids = ok(s.publish(&queue, vec![NewMessage::new("a"), NewMessage::new("b"), NewMessage::new("c")]).await, "publish")?;
        let billing = receive_n(s, &queue, "billing", "w", 3, Duration::from_secs(5)).await?;
        let receipts = billing.iter().map(|d| d.receipt.clone()).collect();
        check_eq!(ok(s.ack(&queue, "billing", receipts).await, "ack billing")?, vec![ReceiptOutcome::Ok; 3]);
        let audit = receive_n(s, &queue, "audit", "w", 3, Duration::from_secs(5)).await?;
        let mut seen: Vec<_> = audit.iter().map(|d| d.id).collect();
        seen.sort();
        let mut expected = ids.clone();
        expected.sort();
        check_eq!(seen, expected);
        check!(audit.iter().all(|d| d.delivery_count == 1), "another group's acks changed counts: {audit:?}");
        Ok(())
    })
}

fn competing(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        ok(s.publish(&queue, (0..4).map(|i| NewMessage::new(format!("m{i}"))).collect()).await, "publish")?;
        let first = receive_n(s, &queue, "g", "c1", 2, Duration::from_secs(5)).await?;
        check_eq!(first.len(), 2);
        let second = receive_n(s, &queue, "g", "c2", 4, Duration::from_millis(1_500)).await?;
        check_eq!(second.len(), 2);
        check!(first.iter().all(|a| second.iter().all(|b| a.id != b.id)), "one message leased to two consumers: {first:?} {second:?}");
        let third = ok(s.receive(&queue, "g", "c3", 10, None, Duration::from_millis(300)).await, "receive c3")?;
        check!(third.is_empty(), "a third consumer got leased messages: {third:?}");
        Ok(())
    })
}

fn ack(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(400, 5)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("job")]).await, "publish")?;
        let got = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 1);
        check_eq!(ok(s.ack(&queue, "g", vec![got[0].receipt.clone()]).await, "ack")?, vec![ReceiptOutcome::Ok]);
        let again = ok(s.receive(&queue, "g", "c", 10, None, Duration::from_millis(1_200)).await, "receive after the lease")?;
        check!(again.is_empty(), "an acked message came back: {again:?}");
        Ok(())
    })
}

fn lease_expiry(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(400, 5)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("job")]).await, "publish")?;
        let first = receive_n(s, &queue, "g", "c1", 1, Duration::from_secs(5)).await?;
        check_eq!(first.len(), 1);
        let leased_at = Instant::now();
        let again = receive_n(s, &queue, "g", "c2", 1, Duration::from_secs(5)).await?;
        check_eq!(again.len(), 1);
        check!(leased_at.elapsed() >= Duration::from_millis(300), "redelivered after {:?}, before the 400 ms lease", leased_at.elapsed());
        check_eq!(again[0].id, first[0].id);
        check_eq!(again[0].delivery_count, 2);
        Ok(())
    })
}

fn lease_per_call(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("job")]).await, "publish")?;
        let first = ok(s.receive(&queue, "g", "c1", 1, Some(300), Duration::from_secs(5)).await, "receive with a 300 ms lease")?;
        check_eq!(first.len(), 1);
        let again = ok(s.receive(&queue, "g", "c2", 1, None, Duration::from_secs(3)).await, "receive after the short lease")?;
        check_eq!(again.len(), 1);
        check_eq!(again[0].delivery_count, 2);
        Ok(())
    })
}

fn extend(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(1_000, 5)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("long job")]).await, "publish")?;
        let got = receive_n(s, &queue, "g", "c1", 1, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 1);
        let leased_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        check_eq!(ok(s.extend(&queue, "g", vec![got[0].receipt.clone()], 1_000).await, "extend")?, vec![ReceiptOutcome::Ok]);
        let extended_at = Instant::now();
        // Past the original deadline (1,000 ms after the lease), before the extended one.
        tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(leased_at.elapsed())).await;
        let other = ok(s.receive(&queue, "g", "c2", 1, None, Duration::ZERO).await, "receive by another consumer")?;
        check!(
            other.is_empty() || extended_at.elapsed() >= Duration::from_millis(1_000),
            "an extended lease expired at its original deadline: {other:?}"
        );
        if other.is_empty() {
            check_eq!(ok(s.ack(&queue, "g", vec![got[0].receipt.clone()]).await, "ack")?, vec![ReceiptOutcome::Ok]);
        }
        Ok(())
    })
}

fn nack_delay(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("retry me")]).await, "publish")?;
        let got = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 1);
        check_eq!(ok(s.nack(&queue, "g", vec![got[0].receipt.clone()], Some(800)).await, "nack")?, vec![ReceiptOutcome::Ok]);
        let nacked_at = Instant::now();
        let early = ok(s.receive(&queue, "g", "c", 1, None, Duration::ZERO).await, "receive at once")?;
        check!(early.is_empty(), "a message nacked with 800 ms came back at once: {early:?}");
        let again = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
        check_eq!(again.len(), 1);
        check!(nacked_at.elapsed() >= Duration::from_millis(700), "came back after {:?}, before the 800 ms delay", nacked_at.elapsed());
        check_eq!(again[0].delivery_count, 2);
        Ok(())
    })
}

fn dead_letter(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 2)).await, "create")?;
        let ids = ok(s.publish(&queue, vec![NewMessage::new("doomed").key("k")]).await, "publish")?;
        for attempt in 1..=2 {
            let got = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
            check!(got.len() == 1, "delivery {attempt} did not come");
            check_eq!(got[0].delivery_count, attempt);
            check_eq!(ok(s.nack(&queue, "g", vec![got[0].receipt.clone()], Some(0)).await, "nack")?, vec![ReceiptOutcome::Ok]);
        }
        let after = ok(s.receive(&queue, "g", "c", 1, None, Duration::from_millis(600)).await, "receive after the last delivery")?;
        check!(after.is_empty(), "a message came back after its last allowed delivery: {after:?}");
        let letters = ok(s.dead_letters(&queue, Some("g"), 0, 10).await, "dead letters")?;
        check_eq!(letters.len(), 1);
        check_eq!(letters[0].id, ids[0]);
        check_eq!(letters[0].group.as_str(), "g");
        check_eq!(letters[0].delivery_count, 2);
        check_eq!(letters[0].body.as_ref(), b"doomed");
        check_eq!(letters[0].key.as_deref(), Some(&b"k"[..]));
        check!(ok(s.dead_letters(&queue, Some("other"), 0, 10).await, "dead letters of another group")?.is_empty(), "another group's filter returned letters");
        Ok(())
    })
}

fn largest_message(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 1)).await, "create")?;
        let mut message = NewMessage::new(Bytes::from(vec![b'm'; tributary_core::limits::MESSAGE_BYTES_MAX - 512 - 3])).key("k");
        message.headers = vec![Header { name: "h".into(), value: Bytes::from_static(b"1") }];
        let ids = ok(s.publish(&queue, vec![message.clone()]).await, "a message of the largest size")?;
        let group = "g".repeat(tributary_core::limits::NAME_BYTES_MAX);
        let got = receive_n(s, &queue, &group, "c", 1, Duration::from_secs(5)).await?;
        check!(got.len() == 1, "the largest message was not delivered");
        check!(got[0].body == message.body && got[0].key == message.key && got[0].headers == message.headers, "the largest message came back changed");
        check_eq!(ok(s.nack(&queue, &group, vec![got[0].receipt.clone()], Some(0)).await, "nack")?, vec![ReceiptOutcome::Ok]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let letters = loop {
            let letters = ok(s.dead_letters(&queue, Some(&group), 0, 1).await, "dead letters")?;
            if !letters.is_empty() || Instant::now() >= deadline {
                break letters;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        check_eq!(letters.len(), 1);
        check_eq!(letters[0].id, ids[0]);
        check!(letters[0].body == message.body && letters[0].key == message.key, "the largest message was dead-lettered changed");
        Ok(())
    })
}

fn dead_letter_on_lease(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(300, 1)).await, "create")?;
        let ids = ok(s.publish(&queue, vec![NewMessage::new("abandoned")]).await, "publish")?;
        let got = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 1);
        let after = ok(s.receive(&queue, "g", "c", 1, None, Duration::from_millis(1_500)).await, "receive after the lease")?;
        check!(after.is_empty(), "a message came back after its only allowed delivery: {after:?}");
        let letters = ok(s.dead_letters(&queue, None, 0, 10).await, "dead letters")?;
        check_eq!(letters.len(), 1);
        check_eq!(letters[0].id, ids[0]);
        check_eq!(letters[0].delivery_count, 1);
        Ok(())
    })
}

fn dedup(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        let first = ok(s.publish(&queue, vec![NewMessage::new("charge 10").dedup_id("order-7")]).await, "publish")?;
        let retried = ok(s.publish(&queue, vec![NewMessage::new("charge 10").dedup_id("order-7")]).await, "publish again")?;
        check_eq!(retried, first);
        let got = receive_n(s, &queue, "g", "c", 2, Duration::from_millis(1_500)).await?;
        check_eq!(got.len(), 1);
        check_eq!(got[0].id, first[0]);
        Ok(())
    })
}

fn stale_receipt(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(300, 5)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("job")]).await, "publish")?;
        let first = receive_n(s, &queue, "g", "c1", 1, Duration::from_secs(5)).await?;
        check_eq!(first.len(), 1);
        let second = receive_n(s, &queue, "g", "c2", 1, Duration::from_secs(5)).await?;
        check_eq!(second.len(), 1);
        check_eq!(ok(s.ack(&queue, "g", vec![first[0].receipt.clone()]).await, "ack with the first receipt")?, vec![ReceiptOutcome::Stale]);
        check_eq!(ok(s.ack(&queue, "g", vec![second[0].receipt.clone()]).await, "ack with the second receipt")?, vec![ReceiptOutcome::Ok]);
        Ok(())
    })
}

fn priority(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        ok(s.publish(&queue, (0..20).map(|i| NewMessage::new(format!("low {i}")).priority(3)).collect()).await, "publish low")?;
        ok(s.publish(&queue, (0..20).map(|i| NewMessage::new(format!("high {i}")).priority(0)).collect()).await, "publish high")?;
        let got = receive_n(s, &queue, "g", "c", 9, Duration::from_secs(5)).await?;
        let high = got.iter().filter(|d| d.id.priority == 0).count();
        check!(high >= 7, "of the first {} deliveries only {high} were of level 0", got.len());
        Ok(())
    })
}

fn delay(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        let published = Instant::now();
        ok(s.publish(&queue, vec![NewMessage::new("later").delay_ms(700)]).await, "publish")?;
        let early = ok(s.receive(&queue, "g", "c", 1, None, Duration::ZERO).await, "receive at once")?;
        check!(early.is_empty(), "a delayed message came at once: {early:?}");
        let got = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 1);
        check!(published.elapsed() >= Duration::from_millis(600), "a 700 ms delay ended after {:?}", published.elapsed());
        Ok(())
    })
}

fn in_flight_limit(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, QueueConfig { in_flight_per_consumer_max: 2, ..config(30_000, 5) }).await, "create")?;
        ok(s.publish(&queue, (0..3).map(|i| NewMessage::new(format!("m{i}"))).collect()).await, "publish")?;
        let got = receive_n(s, &queue, "g", "c", 2, Duration::from_secs(5)).await?;
        check_eq!(got.len(), 2);
        refused(s.receive(&queue, "g", "c", 1, None, Duration::ZERO).await, "receive over the in-flight limit", |e| {
            matches!(e, QueueError::LimitExceeded { limit: "in_flight_per_consumer_max", .. })
        })
    })
}

fn errors(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        refused(s.publish(&queue, vec![NewMessage::new("x")]).await, "publish to a missing queue", |e| matches!(e, QueueError::NotFound { .. }))?;
        refused(s.create_queue("bad name!", config(30_000, 5)).await, "a bad queue name", |e| matches!(e, QueueError::InvalidName(_)))?;
        refused(s.create_queue(&queue, QueueConfig { deliveries_max: 0, ..config(30_000, 5) }).await, "deliveries_max 0", |e| matches!(e, QueueError::InvalidConfig(_)))?;
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create")?;
        ok(s.create_queue(&queue, config(30_000, 5)).await, "create again with the same configuration")?;
        refused(s.create_queue(&queue, config(30_000, 7)).await, "create again with another configuration", |e| matches!(e, QueueError::AlreadyExists { .. }))?;
        refused(s.publish(&queue, vec![NewMessage::new("x").header("tributary.queue.deliver-at", "0")]).await, "a reserved header", |e| matches!(e, QueueError::InvalidMessage(_)))?;
        refused(s.publish(&queue, vec![NewMessage::new("x").priority(9)]).await, "priority 9", |e| matches!(e, QueueError::InvalidMessage(_)))?;
        refused(s.receive(&queue, "g", "c", 1_001, None, Duration::ZERO).await, "receive 1,001", |e| matches!(e, QueueError::LimitExceeded { .. }))?;
        refused(s.receive(&queue, "g", "bad consumer!", 1, None, Duration::ZERO).await, "a bad consumer name", |e| matches!(e, QueueError::InvalidName(_)))?;
        refused(s.receive(&queue, "bad group!", "c", 1, None, Duration::ZERO).await, "a bad group name", |e| matches!(e, QueueError::InvalidName(_)))?;
        // Nothing refused was written.
        let got = ok(s.receive(&queue, "g", "c", 10, None, Duration::from_millis(300)).await, "receive")?;
        check!(got.is_empty(), "a refused publish wrote messages: {got:?}");
        Ok(())
    })
}

fn redrive(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 1)).await, "create")?;
        let ids = ok(s.publish(&queue, vec![NewMessage::new("x"), NewMessage::new("y")]).await, "publish")?;
        let failed = receive_n(s, &queue, "g", "c", 2, Duration::from_secs(5)).await?;
        check_eq!(failed.len(), 2);
        let receipts = failed.iter().map(|d| d.receipt.clone()).collect();
        check_eq!(ok(s.nack(&queue, "g", receipts, Some(0)).await, "nack the only delivery")?, vec![ReceiptOutcome::Ok; 2]);
        let done = receive_n(s, &queue, "h", "c", 2, Duration::from_secs(5)).await?;
        check_eq!(done.len(), 2);
        ok(s.ack(&queue, "h", done.iter().map(|d| d.receipt.clone()).collect()).await, "ack in h")?;
        let letters = ok(s.dead_letters(&queue, Some("g"), 0, 10).await, "dead letters")?;
        check_eq!(letters.len(), 2);
        check!(letters.iter().all(|l| !l.redriven), "letters are redriven before any redrive: {letters:?}");
        check_eq!(ok(s.redrive(&queue, "g", Redrive::Ids(vec![ids[0]])).await, "redrive one")?, 1);
        check_eq!(ok(s.redrive(&queue, "g", Redrive::All).await, "redrive the rest")?, 1);
        check_eq!(ok(s.redrive(&queue, "g", Redrive::All).await, "redrive again")?, 0);
        let letters = ok(s.dead_letters(&queue, Some("g"), 0, 10).await, "dead letters after the redrive")?;
        check!(letters.len() == 2 && letters.iter().all(|l| l.redriven), "letters are not all marked redriven: {letters:?}");
        let again = receive_n(s, &queue, "g", "c", 3, Duration::from_millis(1_500)).await?;
        let mut bodies: Vec<String> = again.iter().map(text).collect();
        bodies.sort();
        check_eq!(bodies, vec!["x".to_string(), "y".to_string()]);
        check!(again.iter().all(|d| d.delivery_count == 1 && !ids.contains(&d.id)), "redriven messages are not new messages: {again:?}");
        let other = ok(s.receive(&queue, "h", "c", 10, None, Duration::from_millis(600)).await, "receive in h")?;
        check!(other.is_empty(), "another group received redriven messages: {other:?}");
        Ok(())
    })
}

fn stats(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let made = config(30_000, 1);
        ok(s.create_queue(&queue, made.clone()).await, "create")?;
        check!(ok(s.list_queues().await, "list")?.contains(&queue), "the queue is not listed");
        check_eq!(ok(s.queue_config(&queue).await, "config")?, made);
        refused(s.queue_config("never-made").await, "the config of a missing queue", |e| matches!(e, QueueError::NotFound { .. }))?;
        ok(s.publish(&queue, (0..4).map(|i| NewMessage::new(format!("m{i}"))).collect()).await, "publish")?;
        // g: three leased, of which one acked and one dead-lettered; one never received.
        let leased = receive_n(s, &queue, "g", "c", 3, Duration::from_secs(5)).await?;
        check_eq!(leased.len(), 3);
        ok(s.ack(&queue, "g", vec![leased[0].receipt.clone()]).await, "ack")?;
        ok(s.nack(&queue, "g", vec![leased[1].receipt.clone()], Some(0)).await, "nack the only delivery")?;
        // h: one received and acked.
        let one = receive_n(s, &queue, "h", "c", 1, Duration::from_secs(5)).await?;
        ok(s.ack(&queue, "h", vec![one[0].receipt.clone()]).await, "ack in h")?;
        let stats = ok(s.stats(&queue).await, "stats")?;
        check_eq!(stats.published_total, 4);
        let group = |name: &str| stats.groups.iter().find(|g| g.name == name).cloned().ok_or_else(|| format!("group {name} is missing: {stats:?}"));
        let g = group("g")?;
        check_eq!((g.depth, g.in_flight, g.acked_total, g.dead_lettered, g.lag), (1, 1, 1, 1, 2));
        let h = group("h")?;
        check_eq!((h.depth, h.in_flight, h.acked_total, h.dead_lettered, h.lag), (3, 0, 1, 0, 3));
        check_eq!((stats.depth, stats.in_flight, stats.acked_total, stats.dead_lettered, stats.lag), (4, 1, 2, 1, 5));
        ok(s.delete_queue(&queue).await, "delete")?;
        check!(!ok(s.list_queues().await, "list")?.contains(&queue), "a deleted queue is listed");
        refused(s.stats(&queue).await, "stats of a deleted queue", |e| matches!(e, QueueError::NotFound { .. }))?;
        Ok(())
    })
}

fn delete(s: &dyn QueueStore, queue: String) -> CaseFuture<'_> {
    Box::pin(async move {
        ok(s.create_queue(&queue, config(30_000, 1)).await, "create")?;
        ok(s.publish(&queue, vec![NewMessage::new("a"), NewMessage::new("b")]).await, "publish")?;
        let got = receive_n(s, &queue, "g", "c", 1, Duration::from_secs(5)).await?;
        check_eq!(ok(s.nack(&queue, "g", vec![got[0].receipt.clone()], Some(0)).await, "nack to the dead letters")?, vec![ReceiptOutcome::Ok]);
        ok(s.delete_queue(&queue).await, "delete")?;
        refused(s.publish(&queue, vec![NewMessage::new("x")]).await, "publish to a deleted queue", |e| matches!(e, QueueError::NotFound { .. }))?;
        refused(s.delete_queue(&queue).await, "delete again", |e| matches!(e, QueueError::NotFound { .. }))?;
        ok(s.create_queue(&queue, config(30_000, 1)).await, "create again")?;
        let again = ok(s.receive(&queue, "g", "c", 10, None, Duration::from_millis(300)).await, "receive")?;
        check!(again.is_empty(), "a queue created again still has messages: {again:?}");
        check!(ok(s.dead_letters(&queue, None, 0, 10).await, "dead letters")?.is_empty(), "a queue created again still has dead letters");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_embedded_engine_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let queues = crate::queue::Queues::open(dir.path(), crate::queue::QueueDefaults::default()).unwrap();
        let report = super::run(&queues, "conf").await;
        println!("{report}");
        report.assert_conforms();
        assert_eq!(report.passed.len(), super::CASES.len(), "the embedded engine declares no gap");
    }
}
