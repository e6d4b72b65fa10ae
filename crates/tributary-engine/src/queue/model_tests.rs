//! A property test of the queue against a simple in-memory model: random sequences of
//! publish, receive, ack, nack, clock moves, lease expiry and restarts, checked at every step.
//!
//! Invariants: a message is delivered only when the model says it is available (so an acked or
//! dead-lettered message is never redelivered, and two consumers never hold one at once);
//! delivery counts are exact; receive returns as many messages as the model has available (up
//! to `max` and the in-flight bound); receipt outcomes match; and after a final drain every
//! published message is acked or dead-lettered, each dead letter exactly once.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::tests::{Harness, config};
use super::*;

const LEASE_MS: u64 = 1_000;
const IN_FLIGHT_MAX: usize = 5;
const DELIVERIES_MAX: u32 = 3;

#[derive(Clone, Debug)]
enum Op {
    Publish { count: u8, priority: u8, delay_ms: u64 },
    Receive { consumer: u8, max: u8 },
    Ack { consumer: u8, mask: u8 },
    Nack { consumer: u8, mask: u8, delay_ms: u64 },
    Advance(u64),
    Tick,
    Reopen,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Available { at_ms: u64 },
    Acquired { consumer: u8, deadline_ms: u64 },
    Acked,
    Dead,
}

#[derive(Debug)]
struct Message {
    state: State,
    count: u32,
}

#[derive(Default)]
struct Model {
    messages: BTreeMap<MessageId, Message>,
}

impl Model {
    fn expire(&mut self, now: u64) {
        for message in self.messages.values_mut() {
            if let State::Acquired { deadline_ms, .. } = message.state
                && deadline_ms <= now
            {
                message.state = if message.count >= DELIVERIES_MAX { State::Dead } else { State::Available { at_ms: now } };
            }
        }
    }

    fn held(&self, consumer: u8) -> usize {
        self.messages.values().filter(|m| matches!(m.state, State::Acquired { consumer: c, .. } if c == consumer)).count()
    }

    fn available(&self, now: u64) -> usize {
        self.messages.values().filter(|m| matches!(m.state, State::Available { at_ms } if at_ms <= now)).count()
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..4, 0u8..4, prop::sample::select(vec![0u64, 0, 500, 3_000]))
            .prop_map(|(count, priority, delay_ms)| Op::Publish { count, priority, delay_ms }),
        4 => (0u8..3, 1u8..7).prop_map(|(consumer, max)| Op::Receive { consumer, max }),
        3 => (0u8..3, any::<u8>()).prop_map(|(consumer, mask)| Op::Ack { consumer, mask }),
        2 => (0u8..3, any::<u8>(), prop::sample::select(vec![0u64, 200, 2_000]))
            .prop_map(|(consumer, mask, delay_ms)| Op::Nack { consumer, mask, delay_ms }),
        2 => prop::sample::select(vec![10u64, 500, 1_000, 5_000]).prop_map(Op::Advance),
        1 => Just(Op::Tick),
        1 => Just(Op::Reopen),
    ]
}

/// Take the deliveries of `held` whose index bit is set in `mask`.
fn pick(held: &mut Vec<Delivery>, mask: u8) -> Vec<Delivery> {
    let mut picked = Vec::new();
    let mut kept = Vec::new();
    for (i, delivery) in held.drain(..).enumerate() {
        if mask & (1 << (i % 8)) != 0 { picked.push(delivery) } else { kept.push(delivery) }
    }
    *held = kept;
    picked
}

fn receive(h: &Harness, model: &mut Model, held: &mut HashMap<u8, Vec<Delivery>>, consumer: u8, max: usize) -> usize {
    let now = h.clock.now_ms();
    model.expire(now);
    let result = h.queue().receive("g", &format!("c{consumer}"), max, Some(LEASE_MS), std::time::Duration::ZERO);
    let in_flight = model.held(consumer);
    if in_flight >= IN_FLIGHT_MAX {
        assert!(matches!(result, Err(QueueError::LimitExceeded { .. })), "consumer holds {in_flight}: {result:?}");
        return 0;
    }
    let deliveries = result.unwrap();
    let expected = max.min(IN_FLIGHT_MAX - in_flight).min(model.available(now));
    assert_eq!(deliveries.len(), expected, "receive of {max} with {} available", model.available(now));
    for delivery in &deliveries {
        let message = model.messages.get_mut(&delivery.id).expect("only published messages are delivered");
        assert!(matches!(message.state, State::Available { at_ms } if at_ms <= now), "{} delivered while {:?}", delivery.id, message.state);
        message.count += 1;
        assert_eq!(delivery.delivery_count, message.count);
        message.state = State::Acquired { consumer, deadline_ms: now + LEASE_MS };
    }
    let n = deliveries.len();
    held.entry(consumer).or_default().extend(deliveries);
    n
}

fn ack(h: &Harness, model: &mut Model, picked: &[Delivery]) {
    let receipts: Vec<Receipt> = picked.iter().map(|d| d.receipt.clone()).collect();
    let outcomes = h.queue().ack("g", &receipts).unwrap();
    for (delivery, outcome) in picked.iter().zip(outcomes) {
        let message = model.messages.get_mut(&delivery.id).unwrap();
        let holds = message.count == delivery.delivery_count && matches!(message.state, State::Acquired { .. } | State::Available { .. });
        assert_eq!(outcome, if holds { ReceiptOutcome::Ok } else { ReceiptOutcome::Stale }, "ack of {} while {message:?}", delivery.id);
        if holds {
            message.state = State::Acked;
        }
    }
}

fn run(ops: Vec<Op>, snapshot_every: u64) {
    super::group::SNAPSHOT_EVERY_FOR_TESTS.with(|c| c.set(Some(snapshot_every)));
    let mut h = Harness::new(QueueConfig {
        deliveries_max: DELIVERIES_MAX,
        in_flight_per_consumer_max: IN_FLIGHT_MAX,
        dedup_window_ms: 0,
        ..config()
    });
    h.queue().create_group("g").unwrap();
    let mut model = Model::default();
    let mut held: HashMap<u8, Vec<Delivery>> = HashMap::new();
    for op in ops {
        let now = h.clock.now_ms();
        match op {
            Op::Publish { count, priority, delay_ms } => {
                let messages: Vec<NewMessage> = (0..count).map(|i| NewMessage::new(format!("m{i}")).priority(priority).delay_ms(delay_ms)).collect();
                for id in h.queue().publish(&messages).unwrap() {
                    let previous = model.messages.insert(id, Message { state: State::Available { at_ms: now + delay_ms }, count: 0 });
                    assert!(previous.is_none(), "{id} handed out twice");
                }
            }
            Op::Receive { consumer, max } => {
                receive(&h, &mut model, &mut held, consumer, max as usize);
            }
            Op::Ack { consumer, mask } => {
                let picked = pick(held.entry(consumer).or_default(), mask);
                ack(&h, &mut model, &picked);
            }
            Op::Nack { consumer, mask, delay_ms } => {
                let picked = pick(held.entry(consumer).or_default(), mask);
                let receipts: Vec<Receipt> = picked.iter().map(|d| d.receipt.clone()).collect();
                let outcomes = h.queue().nack("g", &receipts, Some(delay_ms)).unwrap();
                for (delivery, outcome) in picked.iter().zip(outcomes) {
                    let message = model.messages.get_mut(&delivery.id).unwrap();
                    let holds = message.count == delivery.delivery_count && matches!(message.state, State::Acquired { .. });
                    assert_eq!(outcome, if holds { ReceiptOutcome::Ok } else { ReceiptOutcome::Stale }, "nack of {} while {message:?}", delivery.id);
                    if holds {
                        message.state = if message.count >= DELIVERIES_MAX { State::Dead } else { State::Available { at_ms: now + delay_ms } };
                    }
                }
            }
            Op::Advance(ms) => h.clock.advance(ms),
            Op::Tick => {
                h.queue().tick().unwrap();
                model.expire(now);
            }
            Op::Reopen => {
                h.reopen();
                model.expire(now);
            }
        }
    }
    // Drain: keep receiving and acking; everything ends acked or dead-lettered.
    for _ in 0..1_000 {
        h.clock.advance(1_000_000);
        let mut drained = HashMap::new();
        if receive(&h, &mut model, &mut drained, 9, IN_FLIGHT_MAX) == 0 {
            break;
        }
        let picked = drained.remove(&9).unwrap();
        ack(&h, &mut model, &picked);
    }
    let mut dead: Vec<MessageId> = model.messages.iter().filter(|(_, m)| m.state == State::Dead).map(|(id, _)| *id).collect();
    for (id, message) in &model.messages {
        assert!(matches!(message.state, State::Acked | State::Dead), "{id} lost: {message:?}");
    }
    let mut letters: Vec<MessageId> = h.queue().dead_letters(Some("g"), 0, 10_000).unwrap().iter().map(|l| l.id).collect();
    letters.sort();
    dead.sort();
    assert_eq!(letters, dead, "each dead message is dead-lettered exactly once");
    let stats = h.queue().stats(Some("g")).unwrap();
    assert_eq!(stats.lag, 0);
    assert_eq!(stats.acked_total + stats.dead_lettered, model.messages.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..40), snapshot_every in 1u64..6) {
        // Snapshots every few journal records, so recovery from snapshot + tail is exercised.
        run(ops, snapshot_every);
    }
}
