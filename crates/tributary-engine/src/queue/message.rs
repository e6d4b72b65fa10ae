//! What goes in and comes out of a queue: messages, ids, deliveries, receipts, dead letters.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use tributary_core::Header;

use super::error::QueueError;

/// Header names starting with this are the queue's own and refused on publish.
pub const RESERVED_HEADER_PREFIX: &str = "tributary.";
pub(crate) const HEADER_DELIVER_AT: &str = "tributary.queue.deliver-at";
pub(crate) const HEADER_DEDUP_ID: &str = "tributary.queue.dedup-id";
/// On a redriven message: only this group sees it (the others skip it as acked).
pub(crate) const HEADER_ONLY_GROUP: &str = "tributary.queue.only-group";
pub(crate) const HEADER_DLQ_ID: &str = "tributary.dlq.id";
pub(crate) const HEADER_DLQ_GROUP: &str = "tributary.dlq.group";
pub(crate) const HEADER_DLQ_DELIVERIES: &str = "tributary.dlq.deliveries";
pub(crate) const HEADER_DLQ_REASON: &str = "tributary.dlq.reason";
pub(crate) const HEADER_DLQ_ENQUEUED_AT: &str = "tributary.dlq.enqueued-at";

/// A message to publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewMessage {
    pub body: Bytes,
    pub key: Option<Bytes>,
    pub headers: Vec<Header>,
    /// 0 is the highest; below `QUEUE_PRIORITY_LEVELS`.
    pub priority: u8,
    /// Receivable only this long after publish (at most `QUEUE_DELAY_MS_MAX`).
    pub delay_ms: u64,
    /// Publishing the same id again within the queue's dedup window returns the first id.
    pub dedup_id: Option<String>,
}

impl NewMessage {
    pub fn new(body: impl Into<Bytes>) -> NewMessage {
        NewMessage { body: body.into(), ..NewMessage::default() }
    }
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }
    pub fn delay_ms(mut self, delay_ms: u64) -> Self {
        self.delay_ms = delay_ms;
        self
    }
    pub fn dedup_id(mut self, id: impl Into<String>) -> Self {
        self.dedup_id = Some(id.into());
        self
    }
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header { name: name.into(), value: value.into() });
        self
    }
}

/// A message's stable id: its priority level and its offset in that level's log. Printed as
/// `p<priority>-<offset>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    pub priority: u8,
    pub offset: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}-{}", self.priority, self.offset)
    }
}

impl FromStr for MessageId {
    type Err = QueueError;
    fn from_str(text: &str) -> Result<Self, QueueError> {
        let bad = || QueueError::InvalidMessage(format!("{text:?} is not a message id (p<priority>-<offset>)"));
        let (priority, offset) = text.strip_prefix('p').and_then(|t| t.split_once('-')).ok_or_else(bad)?;
        Ok(MessageId { priority: priority.parse().map_err(|_| bad())?, offset: offset.parse().map_err(|_| bad())? })
    }
}

/// Proof of one delivery attempt, handed back to `ack`, `nack` and `extend`. Opaque and
/// printable; it names the group, the message and the attempt, so the receipt of an earlier
/// attempt never touches a later delivery.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Receipt(String);

impl Receipt {
    pub(crate) fn new(group_hash: u32, id: MessageId, attempt: u32) -> Receipt {
        Receipt(format!("{group_hash:08x}-{}-{}-{attempt}", id.priority, id.offset))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub(crate) fn parse(&self) -> Option<ReceiptParts> {
        let mut parts = self.0.split('-');
        let group_hash = u32::from_str_radix(parts.next()?, 16).ok()?;
        let priority = parts.next()?.parse().ok()?;
        let offset = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(ReceiptParts { group_hash, id: MessageId { priority, offset }, attempt })
    }
}

impl From<String> for Receipt {
    fn from(text: String) -> Self {
        Receipt(text)
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) struct ReceiptParts {
    pub group_hash: u32,
    pub id: MessageId,
    pub attempt: u32,
}

/// What `ack`, `nack` or `extend` did with one receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptOutcome {
    /// Done.
    Ok,
    /// The receipt no longer holds its message (lease lost and redelivered, acked, dead-lettered).
    Stale,
    /// Not a receipt of this queue and group.
    Invalid,
}

impl ReceiptOutcome {
    /// `Ok(())`, or the error that says why not.
    pub fn into_result(self, receipt: &Receipt) -> Result<(), QueueError> {
        match self {
            ReceiptOutcome::Ok => Ok(()),
            ReceiptOutcome::Stale => Err(QueueError::StaleReceipt { receipt: receipt.to_string() }),
            ReceiptOutcome::Invalid => Err(QueueError::InvalidMessage(format!("{receipt} is not a receipt of this group"))),
        }
    }
}

/// One leased message, handed to one consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: MessageId,
    pub receipt: Receipt,
    pub body: Bytes,
    pub key: Option<Bytes>,
    pub headers: Vec<Header>,
    pub priority: u8,
    /// 1 on the first delivery.
    pub delivery_count: u32,
    pub enqueued_at_ms: u64,
}

/// A message moved to the dead-letter log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// Position in the dead-letter log (page with `dead_letters(.., from = dlq_offset + 1, ..)`).
    pub dlq_offset: u64,
    /// The id the message had in the queue.
    pub id: MessageId,
    pub group: String,
    pub delivery_count: u32,
    pub reason: String,
    pub body: Bytes,
    pub key: Option<Bytes>,
    pub headers: Vec<Header>,
    pub enqueued_at_ms: u64,
    pub dead_lettered_at_ms: u64,
    /// Already republished by `redrive`.
    pub redriven: bool,
}

impl DeadLetter {
    /// The message a redrive republishes for this letter: its body, key, headers and priority,
    /// with a dedup id naming the letter, so that a redrive retried after a crash (republished,
    /// not yet marked) publishes nothing twice within the dedup window. Dead letters hold only
    /// the user's headers, so the publish checks apply to it as they are.
    pub fn redriven(&self) -> NewMessage {
        NewMessage {
            body: self.body.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            priority: self.id.priority,
            delay_ms: 0,
            dedup_id: Some(format!("tributary.redrive.{}", self.dlq_offset)),
        }
    }
}

/// Which dead letters of a group to republish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redrive {
    All,
    Ids(Vec<MessageId>),
}

pub(crate) fn header_u64(headers: &[Header], name: &str) -> Option<u64> {
    let value = headers.iter().find(|h| h.name == name)?;
    Some(u64::from_be_bytes(value.value.as_ref().try_into().ok()?))
}

pub(crate) fn header_str<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    std::str::from_utf8(&headers.iter().find(|h| h.name == name)?.value).ok()
}

/// The headers a user published, without the queue's own.
pub(crate) fn user_headers(headers: &[Header]) -> Vec<Header> {
    if headers.iter().all(|h| !h.name.starts_with(RESERVED_HEADER_PREFIX)) {
        return headers.to_vec();
    }
    headers.iter().filter(|h| !h.name.starts_with(RESERVED_HEADER_PREFIX)).cloned().collect()
}
