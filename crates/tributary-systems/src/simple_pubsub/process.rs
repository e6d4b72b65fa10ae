//! The domain logic of simple-pubsub, free of IO: what a valid message and a valid subscription
//! are, how they are encoded in the log, the in-memory subscription registry, and the merge that
//! turns "replay from the log, then live" into one stream without gaps or duplicates.
//!
//! Deliberately not here: the engine, the broker and the network (see `mod.rs` and `api.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tributary_core::limits::{
    HEADERS_COUNT_MAX, MESSAGE_BYTES_MAX, SUBSCRIBER_BLOCK_MS_MAX, SUBSCRIBER_BUFFER_MESSAGES_MAX,
    SUBSCRIPTIONS_PER_CONNECTION_MAX, check_name,
};
use tributary_core::{Header, Record, StoredRecord, Subject, SubjectPattern};
use tributary_engine::pubsub::SlowConsumerPolicy;

/// Messages buffered for a registered subscription when its entry does not say: small, because
/// a million registered subscriptions each hold one buffer.
pub const SUBSCRIPTION_BUFFER_MESSAGES_DEFAULT: usize = 1024;
/// How long a publish waits for room in a `block` subscriber's buffer.
pub const BLOCK_TIMEOUT_MS: u64 = 1_000;
/// Registry entries in one batch registration (one appended batch of the registry topic).
pub const REGISTER_BATCH_MAX: usize = tributary_core::limits::BATCH_RECORDS_MAX;
/// Messages in one publish request.
pub const PUBLISH_BATCH_MAX: usize = tributary_core::limits::BATCH_RECORDS_MAX;

// A named subscription's patterns are attached one broker subscription each.
const _: () = assert!(SUBSCRIPTIONS_PER_CONNECTION_MAX >= 1);
const _: () = assert!(BLOCK_TIMEOUT_MS <= SUBSCRIBER_BLOCK_MS_MAX);

/// Why a request was refused: always the client's to fix (400, or 413 for sizes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    TooLarge(String),
}

/// A pattern as written by a client. A pattern containing `/`, `+` or `#` is read as an MQTT
/// topic filter (`sensors/+/temp`, `sensors/#`); any other as a NATS-style subject pattern
/// (`orders.*.created`, `orders.>`).
pub fn parse_pattern(text: &str) -> Result<SubjectPattern, Invalid> {
    let parsed = if is_mqtt(text) { SubjectPattern::from_mqtt_filter(text) } else { SubjectPattern::parse(text) };
    parsed.map_err(|e| Invalid::Bad(e.to_string()))
}

/// A subject to publish to, with the same MQTT rule as [`parse_pattern`] (`sensors/a/temp`).
pub fn parse_subject(text: &str) -> Result<Subject, Invalid> {
    let parsed = if is_mqtt(text) { Subject::from_mqtt_topic(text) } else { Subject::parse(text) };
    parsed.map_err(|e| Invalid::Bad(e.to_string()))
}

fn is_mqtt(text: &str) -> bool {
    text.contains(['/', '+', '#'])
}

/// Parse a list of patterns for one subscription or connection.
pub fn parse_patterns(texts: &[String]) -> Result<Vec<SubjectPattern>, Invalid> {
    if texts.is_empty() {
        return Err(Invalid::Bad("name at least one pattern".into()));
    }
    if texts.len() > SUBSCRIPTIONS_PER_CONNECTION_MAX {
        return Err(Invalid::Bad(format!(
            "{} patterns: at most SUBSCRIPTIONS_PER_CONNECTION_MAX ({SUBSCRIPTIONS_PER_CONNECTION_MAX})",
            texts.len()
        )));
    }
    texts.iter().map(|t| parse_pattern(t)).collect()
}

/// What a subscriber's buffer does when it is full, as clients name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Drop the oldest buffered message and count it.
    #[default]
    DropOldest,
    /// The publisher waits up to `BLOCK_TIMEOUT_MS` for room.
    Block,
    /// Close the connection with reason `slow_consumer`.
    Disconnect,
    /// Stop buffering; the connection reads the log from where it fell behind, then rejoins live.
    CatchUp,
}

impl Policy {
    pub fn broker(self) -> SlowConsumerPolicy {
        match self {
            Policy::DropOldest => SlowConsumerPolicy::DropOldest,
            Policy::Block => SlowConsumerPolicy::Block { timeout: Duration::from_millis(BLOCK_TIMEOUT_MS) },
            Policy::Disconnect => SlowConsumerPolicy::Disconnect,
            Policy::CatchUp => SlowConsumerPolicy::CatchUp,
        }
    }
}

/// A registered subscription as the client sends it and as it is persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// NATS-style patterns (`orders.*.created`, `orders.>`) or MQTT filters (any pattern with
    /// `/`, `+` or `#`: `sensors/+/temp`, `sensors/#`).
    pub patterns: Vec<String>,
    /// Subscriptions with the same group and pattern share its messages: each goes to one member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Messages buffered before the policy applies (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<usize>,
}

impl SubscriptionSpec {
    /// Check everything a broker subscription would refuse, before anything is persisted.
    pub fn validate(&self) -> Result<Vec<SubjectPattern>, Invalid> {
        let patterns = parse_patterns(&self.patterns)?;
        if let Some(group) = &self.group {
            check_name("subscriber group", group).map_err(Invalid::Bad)?;
        }
        let buffer = self.buffer_messages();
        if buffer == 0 || buffer > SUBSCRIBER_BUFFER_MESSAGES_MAX {
            return Err(Invalid::Bad(format!(
                "buffer of {buffer} messages: must be 1 to SUBSCRIBER_BUFFER_MESSAGES_MAX ({SUBSCRIBER_BUFFER_MESSAGES_MAX})"
            )));
        }
        Ok(patterns)
    }

    pub fn buffer_messages(&self) -> usize {
        self.buffer.unwrap_or(SUBSCRIPTION_BUFFER_MESSAGES_DEFAULT)
    }
}

pub fn check_subscription_name(name: &str) -> Result<(), Invalid> {
    check_name("subscription", name).map_err(Invalid::Bad)
}

/// One registry change as a record of the compacted registry topic: key = name, value = the
/// spec as JSON, no value = deleted.
pub fn registry_record(name: &str, spec: Option<&SubscriptionSpec>) -> Record {
    Record {
        key: Some(Bytes::copy_from_slice(name.as_bytes())),
        value: spec.map(|s| Bytes::from(serde_json::to_vec(s).expect("a spec serializes"))),
        headers: Vec::new(),
        timestamp_ms: 0,
    }
}

/// Read one registry record back: `(name, Some(spec))` or `(name, None)` for a deletion.
/// Records that do not decode are skipped by the caller (they were never written by us).
pub fn decode_registry_record(record: &StoredRecord) -> Option<(String, Option<SubscriptionSpec>)> {
    let name = std::str::from_utf8(record.key.as_deref()?).ok()?.to_string();
    match &record.value {
        None => Some((name, None)),
        Some(value) => Some((name, Some(serde_json::from_slice(value).ok()?))),
    }
}

/// A message as a client publishes it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishMessage {
    /// `orders.eu.created`, or an MQTT topic name `sensors/a/temp`.
    pub subject: String,
    /// Any JSON value.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A published message, once it has its log offset: what subscribers receive.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub offset: u64,
    #[serde(serialize_with = "subject_text")]
    pub subject: Subject,
    pub data: serde_json::Value,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// When the publish request arrived; `None` for messages read back from the log.
    #[serde(skip)]
    pub accepted: Option<Instant>,
}

fn subject_text<S: serde::Serializer>(subject: &Subject, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(subject.as_str())
}

/// A validated publish: the records to append and the messages to fan out (offsets filled in
/// after the append).
pub struct Prepared {
    pub records: Vec<Record>,
    pub messages: Vec<Message>,
}

/// Validate a publish batch and encode it: key = subject, value = the data as JSON, headers as
/// record headers.
pub fn prepare_publish(batch: Vec<PublishMessage>, accepted: Instant) -> Result<Prepared, Invalid> {
    if batch.is_empty() {
        return Err(Invalid::Bad("publish at least one message".into()));
    }
    if batch.len() > PUBLISH_BATCH_MAX {
        return Err(Invalid::TooLarge(format!("{} messages in one publish: at most PUBLISH_BATCH_MAX ({PUBLISH_BATCH_MAX})", batch.len())));
    }
    let mut records = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    for (i, message) in batch.into_iter().enumerate() {
        let subject = parse_subject(&message.subject).map_err(|e| Invalid::Bad(format!("message {i}: {e}")))?;
        if message.headers.len() > HEADERS_COUNT_MAX {
            return Err(Invalid::Bad(format!("message {i}: {} headers, at most HEADERS_COUNT_MAX ({HEADERS_COUNT_MAX})", message.headers.len())));
        }
        let value = serde_json::to_vec(&message.data).expect("JSON values serialize");
        let bytes = value.len() + subject.as_str().len() + message.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if bytes > MESSAGE_BYTES_MAX {
            return Err(Invalid::TooLarge(format!("message {i} is {bytes} bytes: at most MESSAGE_BYTES_MAX ({MESSAGE_BYTES_MAX})")));
        }
        records.push(Record {
            key: Some(Bytes::copy_from_slice(subject.as_str().as_bytes())),
            value: Some(Bytes::from(value)),
            headers: message.headers.iter().map(|(k, v)| Header { name: k.clone(), value: Bytes::copy_from_slice(v.as_bytes()) }).collect(),
            timestamp_ms: 0,
        });
        messages.push(Message { offset: 0, subject, data: message.data, headers: message.headers, accepted: Some(accepted) });
    }
    Ok(Prepared { records, messages })
}

/// A message read back from the log (for replay and catch-up). `None` for a record that is not
/// one of ours.
pub fn decode_message(record: &StoredRecord) -> Option<Message> {
    let subject = Subject::parse(std::str::from_utf8(record.key.as_deref()?).ok()?).ok()?;
    let data = serde_json::from_slice(record.value.as_deref()?).ok()?;
    let headers = record.headers.iter().map(|h| (h.name.clone(), String::from_utf8_lossy(&h.value).into_owned())).collect();
    Some(Message { offset: record.offset, subject, data, headers, accepted: None })
}

/// The subscription cache: every registered subscription by name, as the registry topic says.
#[derive(Default)]
pub struct Registry<V> {
    entries: HashMap<String, V>,
}

impl<V> Registry<V> {
    pub fn new() -> Registry<V> {
        Registry { entries: HashMap::new() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&V> {
        self.entries.get(name)
    }

    /// Insert or replace; returns the entry replaced.
    pub fn put(&mut self, name: String, value: V) -> Option<V> {
        self.entries.insert(name, value)
    }

    pub fn remove(&mut self, name: &str) -> Option<V> {
        self.entries.remove(name)
    }

    /// Names in order, after `after`, at most `limit`: a page of the listing.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Vec<(&str, &V)> {
        let mut names: Vec<&String> = self.entries.keys().filter(|n| after.is_none_or(|a| n.as_str() > a)).collect();
        names.sort_unstable();
        names.truncate(limit);
        names.into_iter().map(|n| (n.as_str(), &self.entries[n])).collect()
    }
}

/// The one stream a connection sees, merged from the broker buffers of its patterns and, when it
/// resumes or falls behind, from the log.
///
/// The rule that makes it exact: the fan-out publishes offsets in log order and then raises a
/// watermark (`end`: every offset below it has been offered to every match). A connection drains
/// its buffers into `pending`, then emits in offset order only what lies below the watermark it
/// read *before* draining; anything at or past it may still be missing a sibling (a message that
/// matches two patterns of one connection lands in two buffers) and waits for the next round.
/// Offsets at or below `last_sent` are dropped, so a message that arrives both from the log and
/// live, or through two patterns, is sent once.
#[derive(Default)]
pub struct Merge {
    pending: BTreeMap<u64, Arc<Message>>,
    last_sent: Option<u64>,
}

impl Merge {
    pub fn new() -> Merge {
        Merge::default()
    }

    /// Start after `offset` (a resume: everything up to it counts as sent).
    pub fn starting_after(offset: Option<u64>) -> Merge {
        Merge { pending: BTreeMap::new(), last_sent: offset }
    }

    pub fn last_sent(&self) -> Option<u64> {
        self.last_sent
    }

    /// The next offset this connection wants.
    pub fn next_offset(&self) -> u64 {
        self.last_sent.map_or(0, |o| o + 1)
    }

    /// Where a catch-up replay starts when a buffer stopped at `lagging_from`: after the last
    /// sent message, or (nothing sent yet) at the first offset not yet held.
    pub fn replay_start(&self, lagging_from: u64) -> u64 {
        match self.last_sent {
            Some(last) => last + 1,
            None => self.pending.keys().next().map_or(lagging_from, |&p| p.min(lagging_from)),
        }
    }

    /// A message from a live buffer.
    pub fn offer(&mut self, message: Arc<Message>) {
        if self.last_sent.is_none_or(|last| message.offset > last) {
            self.pending.insert(message.offset, message);
        }
    }

    /// The messages ready to send, in order: pending ones below `end`, also below `before` if
    /// given (a buffer that fell behind there must be filled from the log first).
    pub fn ready(&mut self, end: u64, before: Option<u64>) -> Vec<Arc<Message>> {
        let limit = before.map_or(end, |b| b.min(end));
        let rest = self.pending.split_off(&limit);
        let ready: Vec<Arc<Message>> = std::mem::replace(&mut self.pending, rest).into_values().collect();
        if let Some(last) = ready.last() {
            self.mark_sent(last.offset);
        }
        ready
    }

    /// Record that everything up to `offset` has been sent (or replayed from the log): live
    /// copies at or below it are dropped.
    pub fn mark_sent(&mut self, offset: u64) {
        debug_assert!(self.last_sent.is_none_or(|last| offset >= last), "offsets go forward");
        self.last_sent = Some(offset);
        let rest = self.pending.split_off(&(offset + 1));
        self.pending = rest;
    }

    /// A message from the log replay: send it unless already sent.
    pub fn accept_replayed(&mut self, offset: u64) -> bool {
        if self.last_sent.is_some_and(|last| offset <= last) {
            return false;
        }
        true
    }
}

/// True if any pattern matches the subject.
pub fn matches_any(patterns: &[SubjectPattern], subject: &Subject) -> bool {
    patterns.iter().any(|p| p.matches(subject))
}

#[cfg(test)]
mod unit {
    use super::*;

    fn message(offset: u64) -> Arc<Message> {
        Arc::new(Message { offset, subject: Subject::parse("a").unwrap(), data: serde_json::Value::Null, headers: BTreeMap::new(), accepted: None })
    }

    #[test]
    fn merge_emits_in_order_below_the_watermark_and_each_offset_once() {
        let mut merge = Merge::new();
        for o in [3, 1, 2, 2, 5] {
            merge.offer(message(o));
        }
        let ready: Vec<u64> = merge.ready(4, None).iter().map(|m| m.offset).collect();
        assert_eq!(ready, vec![1, 2, 3]);
        merge.offer(message(3));
        let ready: Vec<u64> = merge.ready(10, None).iter().map(|m| m.offset).collect();
        assert_eq!(ready, vec![5]);
    }

    #[test]
    fn merge_holds_back_what_a_lagging_buffer_must_fill_from_the_log() {
        let mut merge = Merge::new();
        for o in [1, 7, 9] {
            merge.offer(message(o));
        }
        let ready: Vec<u64> = merge.ready(10, Some(5)).iter().map(|m| m.offset).collect();
        assert_eq!(ready, vec![1]);
        merge.mark_sent(8);
        assert!(!merge.accept_replayed(8));
        let ready: Vec<u64> = merge.ready(10, None).iter().map(|m| m.offset).collect();
        assert_eq!(ready, vec![9]);
    }

    #[test]
    fn mqtt_forms_are_marked_by_slash_plus_or_hash() {
        assert_eq!(parse_pattern("sensors/+/temp").unwrap().as_str(), "sensors.*.temp");
        assert_eq!(parse_pattern("#").unwrap().as_str(), ">");
        assert_eq!(parse_pattern("orders.*.created").unwrap().as_str(), "orders.*.created");
        assert_eq!(parse_subject("sensors/a/temp").unwrap().as_str(), "sensors.a.temp");
        assert!(parse_pattern("orders.>.x").is_err());
        assert!(parse_subject("orders.*").is_err());
    }
}
