//! The domain rules of realtime-notifications, free of IO: what a valid topic, user and
//! notification are, the resume token's format, the wire form of a notification, and how a
//! connection's pending notifications are cut into frames.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use tributary_core::Record;
use tributary_core::limits::{BATCH_RECORDS_MAX, NAME_BYTES_MAX, check_name};

/// Largest `data` of one notification, in bytes of JSON.
pub const NOTIFICATION_BYTES_MAX: usize = 64 * 1024;
/// Most notifications in one publish request (one appended batch per partition).
pub const PUBLISH_BATCH_MAX: usize = BATCH_RECORDS_MAX;
/// Most topics one connection subscribes to (its personal topic not counted).
pub const TOPICS_PER_CONNECTION_MAX: usize = 100;
/// Notifications in one frame unless the connection asks for fewer (`batch_max`).
pub const FRAME_NOTIFICATIONS_DEFAULT: usize = 100;
/// Most notifications a connection may ask to get in one frame.
pub const FRAME_NOTIFICATIONS_MAX: usize = 1_000;
/// A frame is closed once its notifications reach this many bytes (one larger notification
/// still goes, alone).
pub const FRAME_BYTES_MAX: usize = 256 * 1024;
/// Longest a connection may ask to wait for more notifications before a frame is sent.
pub const LINGER_MS_MAX: u64 = 1_000;
/// The prefix of personal topics: `user.<id>` reaches every connection of that user, and only
/// that user may subscribe to it.
pub const PERSONAL_PREFIX: &str = "user.";

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Forbidden(String),
    /// The token points below what the log still holds.
    #[error("{0}")]
    Expired(String),
    /// The token belongs to another log (the data folder was reset since it was issued).
    #[error("{0}")]
    UnknownEpoch(String),
}

/// A topic: a name of `[A-Za-z0-9._-]`, 1 to `NAME_BYTES_MAX` bytes.
pub fn check_topic(topic: &str) -> Result<(), Invalid> {
    check_name("topic", topic).map_err(Invalid::Bad)
}

/// A user id: as a topic name, and short enough that its personal topic is a valid topic.
pub fn check_user(user: &str) -> Result<(), Invalid> {
    if user.len() + PERSONAL_PREFIX.len() > NAME_BYTES_MAX {
        return Err(Invalid::Bad(format!("user id must be at most {} bytes, got {}", NAME_BYTES_MAX - PERSONAL_PREFIX.len(), user.len())));
    }
    check_name("user", user).map_err(Invalid::Bad)
}

pub fn personal_topic(user: &str) -> String {
    format!("{PERSONAL_PREFIX}{user}")
}

/// The topics a connection of `user` gets: the ones asked for (comma-separated, validated,
/// deduplicated) plus its personal topic. Another user's personal topic is refused.
pub fn connection_topics(user: &str, asked: Option<&str>) -> Result<Vec<String>, Invalid> {
    let mut topics: Vec<String> = Vec::new();
    for topic in asked.unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()) {
        check_topic(topic)?;
        if let Some(owner) = topic.strip_prefix(PERSONAL_PREFIX)
            && owner != user
        {
            return Err(Invalid::Forbidden(format!("topic {topic:?} is the personal topic of another user")));
        }
        if !topics.iter().any(|t| t == topic) {
            topics.push(topic.to_string());
        }
    }
    let own = personal_topic(user);
    topics.retain(|t| *t != own);
    if topics.len() > TOPICS_PER_CONNECTION_MAX {
        return Err(Invalid::TooLarge(format!("{} topics on one connection: at most TOPICS_PER_CONNECTION_MAX ({TOPICS_PER_CONNECTION_MAX})", topics.len())));
    }
    topics.push(own);
    Ok(topics)
}

/// One notification as a publisher hands it in.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishNotification {
    /// The topic (`orders`, `user.alice` for one user's connections).
    pub topic: String,
    /// Any JSON.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Validate a publish and turn it into records keyed by topic (the key picks the partition).
pub fn prepare_publish(notifications: &[PublishNotification]) -> Result<Vec<Record>, Invalid> {
    if notifications.is_empty() {
        return Err(Invalid::Bad("notifications must hold at least one notification".into()));
    }
    if notifications.len() > PUBLISH_BATCH_MAX {
        return Err(Invalid::TooLarge(format!("{} notifications in one publish: at most PUBLISH_BATCH_MAX ({PUBLISH_BATCH_MAX})", notifications.len())));
    }
    let mut records = Vec::with_capacity(notifications.len());
    for (i, notification) in notifications.iter().enumerate() {
        check_topic(&notification.topic).map_err(|e| Invalid::Bad(format!("notifications[{i}]: {e}")))?;
        let data = serde_json::to_vec(&notification.data).expect("JSON values serialize");
        if data.len() > NOTIFICATION_BYTES_MAX {
            return Err(Invalid::TooLarge(format!("notifications[{i}]: data is {} bytes: at most NOTIFICATION_BYTES_MAX ({NOTIFICATION_BYTES_MAX})", data.len())));
        }
        records.push(Record::keyed(Bytes::copy_from_slice(notification.topic.as_bytes()), data));
    }
    Ok(records)
}

/// The wire form of one notification, the same live and replayed:
/// `{"topic","partition","offset","timestamp_ms","data"}`. `data` is the stored JSON, as is.
pub fn notification_json(topic: &str, partition: u32, offset: u64, timestamp_ms: i64, data: &[u8]) -> String {
    let topic = serde_json::to_string(topic).expect("strings serialize");
    let data = std::str::from_utf8(data).unwrap_or("null");
    format!(r#"{{"topic":{topic},"partition":{partition},"offset":{offset},"timestamp_ms":{timestamp_ms},"data":{data}}}"#)
}

/// A connection's position: for each partition of the log, the next offset it has not been
/// given. Everything below it that matched the connection's topics was delivered, nothing at or
/// above it was. `epoch` names the log, so a token from a reset data folder is refused rather
/// than misread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub epoch: u64,
    pub positions: Vec<u64>,
}

impl Token {
    /// `e<epoch hex>-<p0>.<p1>...`: URL- and header-safe, opaque to clients.
    pub fn encode(&self) -> String {
        let positions: Vec<String> = self.positions.iter().map(u64::to_string).collect();
        format!("e{:x}-{}", self.epoch, positions.join("."))
    }

    pub fn decode(text: &str) -> Result<Token, Invalid> {
        let bad = || Invalid::Bad(format!("resume token {text:?} is malformed (expected what a notification frame or the connected message carried)"));
        let rest = text.strip_prefix('e').ok_or_else(bad)?;
        let (epoch, positions) = rest.split_once('-').ok_or_else(bad)?;
        let epoch = u64::from_str_radix(epoch, 16).map_err(|_| bad())?;
        let positions = positions.split('.').map(|p| p.parse::<u64>().map_err(|_| bad())).collect::<Result<Vec<_>, _>>()?;
        Ok(Token { epoch, positions })
    }

    /// Check a decoded token against the log: its epoch, its partition count, and that every
    /// position is still held (`starts[p] ≤ position ≤ ends[p]`).
    pub fn check(&self, epoch: u64, starts: &[u64], ends: &[u64]) -> Result<(), Invalid> {
        if self.epoch != epoch {
            return Err(Invalid::UnknownEpoch(format!("resume token is from log epoch {:x}, this log is epoch {epoch:x} (its data was reset): reload the state and connect without a token", self.epoch)));
        }
        if self.positions.len() != starts.len() {
            return Err(Invalid::Bad(format!("resume token has {} partitions, the log has {}", self.positions.len(), starts.len())));
        }
        for (p, ((&position, &start), &end)) in self.positions.iter().zip(starts).zip(ends).enumerate() {
            if position < start {
                return Err(Invalid::Expired(format!(
                    "resume token is older than retention: partition {p} resumes at offset {position}, the log now starts at {start}; notifications in between are gone. Reload the state and connect without a token"
                )));
            }
            if position > end {
                return Err(Invalid::Bad(format!("resume token is ahead of the log: partition {p} at offset {position}, the log ends at {end}")));
            }
        }
        Ok(())
    }
}

/// One notification waiting to be framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub partition: u32,
    pub offset: u64,
    pub json: std::sync::Arc<str>,
}

/// How a connection wants its frames cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub notifications_max: usize,
    pub bytes_max: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { notifications_max: FRAME_NOTIFICATIONS_DEFAULT, bytes_max: FRAME_BYTES_MAX }
    }
}

/// Cut `pending` (in delivery order) into frames within `limits`: each frame holds at least one
/// notification, at most `notifications_max`, and is closed once its notifications reach
/// `bytes_max` bytes.
pub fn cut_frames(pending: &[Pending], limits: FrameLimits) -> Vec<&[Pending]> {
    let mut frames = Vec::new();
    let mut start = 0;
    while start < pending.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < pending.len() && end - start < limits.notifications_max.max(1) && (end == start || bytes + pending[end].json.len() <= limits.bytes_max) {
            bytes += pending[end].json.len();
            end += 1;
        }
        frames.push(&pending[start..end]);
        start = end;
    }
    frames
}

/// Advance `positions` past a frame's notifications.
pub fn advance(positions: &mut [u64], frame: &[Pending]) {
    for n in frame {
        let p = &mut positions[n.partition as usize];
        *p = (*p).max(n.offset + 1);
    }
}

/// A frame on the wire: `{"notifications":[…],"token":"…"}`; the token resumes after it.
pub fn frame_json(frame: &[Pending], token: &str) -> String {
    let mut out = String::with_capacity(frame.iter().map(|n| n.json.len() + 1).sum::<usize>() + token.len() + 40);
    out.push_str(r#"{"notifications":["#);
    for (i, n) in frame.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&n.json);
    }
    out.push_str(r#"],"token":""#);
    out.push_str(token);
    out.push_str("\"}");
    out
}

/// Options a connection asks for in its query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    pub limits: FrameLimits,
    pub linger_ms: u64,
    pub presence_events: bool,
}

/// Parse `batch_max`, `linger_ms` and `presence` (`true`/`false`).
pub fn connect_options(query: &BTreeMap<String, String>) -> Result<ConnectOptions, Invalid> {
    let number = |field: &str| -> Result<Option<u64>, Invalid> {
        query.get(field).map(|t| t.parse::<u64>().map_err(|_| Invalid::Bad(format!("{field} must be a non-negative integer, got {t:?}")))).transpose()
    };
    let notifications_max = match number("batch_max")? {
        None => FRAME_NOTIFICATIONS_DEFAULT,
        Some(n) if n == 0 || n as usize > FRAME_NOTIFICATIONS_MAX => {
            return Err(Invalid::Bad(format!("batch_max must be 1 to FRAME_NOTIFICATIONS_MAX ({FRAME_NOTIFICATIONS_MAX}), got {n}")));
        }
        Some(n) => n as usize,
    };
    let linger_ms = match number("linger_ms")? {
        Some(n) if n > LINGER_MS_MAX => return Err(Invalid::Bad(format!("linger_ms must be at most LINGER_MS_MAX ({LINGER_MS_MAX}), got {n}"))),
        other => other.unwrap_or(0),
    };
    let presence_events = match query.get("presence").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(Invalid::Bad(format!("presence must be true or false, got {other:?}"))),
    };
    Ok(ConnectOptions { limits: FrameLimits { notifications_max, bytes_max: FRAME_BYTES_MAX }, linger_ms, presence_events })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_token_round_trips_and_refuses_garbage() {
        let token = Token { epoch: 0xbeef, positions: vec![0, 17, 3] };
        assert_eq!(token.encode(), "ebeef-0.17.3");
        assert_eq!(Token::decode(&token.encode()).unwrap(), token);
        for bad in ["", "beef-1", "ebeef", "ebeef-", "ebeef-1.x", "ezz-1", "ebeef-1..2"] {
            assert!(matches!(Token::decode(bad), Err(Invalid::Bad(_))), "{bad}");
        }
    }

    #[test]
    fn a_token_is_checked_against_the_log() {
        let token = Token { epoch: 7, positions: vec![5, 9] };
        assert!(token.check(7, &[0, 9], &[10, 9]).is_ok());
        assert!(matches!(token.check(8, &[0, 0], &[10, 10]), Err(Invalid::UnknownEpoch(_))));
        assert!(matches!(token.check(7, &[6, 0], &[10, 10]), Err(Invalid::Expired(_))));
        assert!(matches!(token.check(7, &[0, 0], &[10, 8]), Err(Invalid::Bad(_))));
        assert!(matches!(token.check(7, &[0], &[10]), Err(Invalid::Bad(_))));
    }

    #[test]
    fn topics_of_a_connection_include_its_personal_topic_and_not_another_users() {
        assert_eq!(connection_topics("alice", Some("news, sport,news,,user.alice")).unwrap(), vec!["news", "sport", "user.alice"]);
        assert_eq!(connection_topics("alice", None).unwrap(), vec!["user.alice"]);
        assert!(matches!(connection_topics("alice", Some("user.bob")), Err(Invalid::Forbidden(_))));
        assert!(matches!(connection_topics("alice", Some("a b")), Err(Invalid::Bad(_))));
        let many: Vec<String> = (0..=TOPICS_PER_CONNECTION_MAX).map(|i| format!("t{i}")).collect();
        assert!(matches!(connection_topics("alice", Some(&many.join(","))), Err(Invalid::TooLarge(_))));
    }

    fn pending(partition: u32, offset: u64, bytes: usize) -> Pending {
        Pending { partition, offset, json: Arc::from("x".repeat(bytes)) }
    }

    #[test]
    fn frames_are_cut_by_count_and_by_bytes() {
        let items: Vec<Pending> = (0..7).map(|i| pending(0, i, 10)).collect();
        let sizes: Vec<usize> = cut_frames(&items, FrameLimits { notifications_max: 3, bytes_max: 1000 }).iter().map(|f| f.len()).collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        let sizes: Vec<usize> = cut_frames(&items, FrameLimits { notifications_max: 100, bytes_max: 25 }).iter().map(|f| f.len()).collect();
        assert_eq!(sizes, vec![2, 2, 2, 1]);
        let big = vec![pending(0, 0, 100), pending(0, 1, 1)];
        let sizes: Vec<usize> = cut_frames(&big, FrameLimits { notifications_max: 100, bytes_max: 25 }).iter().map(|f| f.len()).collect();
        assert_eq!(sizes, vec![1, 1], "an oversized notification goes alone");
    }

    #[test]
    fn a_frame_advances_each_partition_past_its_notifications() {
        let mut positions = vec![0, 5];
        advance(&mut positions, &[pending(1, 7, 1), pending(0, 2, 1), pending(1, 8, 1)]);
        assert_eq!(positions, vec![3, 9]);
        let frame = frame_json(&[Pending { partition: 0, offset: 0, json: Arc::from(r#"{"a":1}"#) }], "e1-3.9");
        assert_eq!(frame, r#"{"notifications":[{"a":1}],"token":"e1-3.9"}"#);
        let value: serde_json::Value = serde_json::from_str(&notification_json("t\"x", 1, 2, 3, br#"{"k":[1]}"#)).unwrap();
        assert_eq!(value, serde_json::json!({"topic": "t\"x", "partition": 1, "offset": 2, "timestamp_ms": 3, "data": {"k": [1]}}));
    }

    #[test]
    fn publishes_are_validated() {
        let ok = PublishNotification { topic: "news".into(), data: serde_json::json!({"x": 1}) };
        assert_eq!(prepare_publish(std::slice::from_ref(&ok)).unwrap()[0].key.as_deref(), Some(&b"news"[..]));
        assert!(matches!(prepare_publish(&[]), Err(Invalid::Bad(_))));
        let bad = PublishNotification { topic: "no spaces".into(), data: serde_json::Value::Null };
        assert!(matches!(prepare_publish(&[bad]), Err(Invalid::Bad(_))));
        let big = PublishNotification { topic: "news".into(), data: serde_json::Value::String("x".repeat(NOTIFICATION_BYTES_MAX)) };
        assert!(matches!(prepare_publish(&[big]), Err(Invalid::TooLarge(_))));
    }
}
