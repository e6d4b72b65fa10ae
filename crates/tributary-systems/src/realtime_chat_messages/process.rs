//! The domain rules of realtime-chat-messages, free of IO: valid users, channels and messages,
//! the direct-message id of two users, the events of a channel's sequence and their wire form,
//! and the state a channel's events build (members, current messages, unread counts).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest message text, in bytes (UTF-8).
pub const MESSAGE_TEXT_BYTES_MAX: usize = 16 * 1024;
/// Longest client message id (the idempotency key of a send), in bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 64;
/// Longest user id and channel id, in bytes.
pub const ID_BYTES_MAX: usize = 64;
/// Longest channel display name, in bytes.
pub const CHANNEL_NAME_BYTES_MAX: usize = 128;
/// Most members of one channel.
pub const CHANNEL_MEMBERS_MAX: usize = 1_000;
/// Most messages in one send request.
pub const SEND_BATCH_MAX: usize = 1_000;
/// History entries per page unless `limit` says otherwise.
pub const HISTORY_PAGE_DEFAULT: usize = 50;
/// Most history entries per page.
pub const HISTORY_PAGE_MAX: usize = 200;
/// Search hits per page unless `limit` says otherwise.
pub const SEARCH_PAGE_DEFAULT: usize = 20;
/// Most search hits per page.
pub const SEARCH_PAGE_MAX: usize = 100;
/// Most channels one connection may name in its `since` positions.
pub const SYNC_CHANNELS_MAX: usize = 1_000;
/// Shortest interval between two typing indicators of one user in one channel, in ms; one sent
/// sooner is refused with `rate_limited` (clients send one every few seconds while typing).
pub const TYPING_INTERVAL_MS_MIN: u64 = 1_000;
/// The prefix of direct-message channel ids: `dm:<user a>:<user b>` with a < b.
pub const DM_PREFIX: &str = "dm:";

/// Why a request was refused (nothing of it was done).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    RateLimited(String),
}

fn check_id(what: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > ID_BYTES_MAX {
        return Err(Invalid::Bad(format!("{what} id must be 1 to {ID_BYTES_MAX} bytes (ID_BYTES_MAX), got {}", id.len())));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(Invalid::Bad(format!("{what} id {id:?} may hold only A-Z a-z 0-9 . _ -")));
    }
    Ok(())
}

/// A user id: 1 to `ID_BYTES_MAX` bytes of `[A-Za-z0-9._-]`.
pub fn check_user(user: &str) -> Result<(), Invalid> {
    check_id("user", user)
}

/// A channel id a client may create: as a user id (the `dm:` ids are made by [`dm_channel`]).
pub fn check_channel_name(channel: &str) -> Result<(), Invalid> {
    check_id("channel", channel)
}

/// Any channel id: a named channel, or `dm:<a>:<b>`.
pub fn check_channel(channel: &str) -> Result<(), Invalid> {
    match dm_users(channel) {
        Some(_) => Ok(()),
        None if channel.starts_with(DM_PREFIX) => Err(Invalid::Bad(format!("{channel:?} is not a direct-message id (dm:<user>:<user>, sorted, two different users)"))),
        None => check_channel_name(channel),
    }
}

/// The direct-message channel of two users: the same id whichever of them asks.
pub fn dm_channel(a: &str, b: &str) -> Result<String, Invalid> {
    check_user(a)?;
    check_user(b)?;
    if a == b {
        return Err(Invalid::Bad("a direct message needs two different users".into()));
    }
    let (first, second) = if a < b { (a, b) } else { (b, a) };
    Ok(format!("{DM_PREFIX}{first}:{second}"))
}

/// The two users of a direct-message channel id, if it is one.
pub fn dm_users(channel: &str) -> Option<(&str, &str)> {
    let (a, b) = channel.strip_prefix(DM_PREFIX)?.split_once(':')?;
    (check_user(a).is_ok() && check_user(b).is_ok() && a < b).then_some((a, b))
}

pub fn check_text(text: &str) -> Result<(), Invalid> {
    if text.trim().is_empty() {
        return Err(Invalid::Bad("text must not be empty".into()));
    }
    if text.len() > MESSAGE_TEXT_BYTES_MAX {
        return Err(Invalid::TooLarge(format!("text is {} bytes: at most MESSAGE_TEXT_BYTES_MAX ({MESSAGE_TEXT_BYTES_MAX})", text.len())));
    }
    Ok(())
}

pub fn check_client_id(client_id: &str) -> Result<(), Invalid> {
    if client_id.is_empty() || client_id.len() > CLIENT_ID_BYTES_MAX {
        return Err(Invalid::Bad(format!("client_id must be 1 to CLIENT_ID_BYTES_MAX ({CLIENT_ID_BYTES_MAX}) bytes, got {}", client_id.len())));
    }
    Ok(())
}

/// Who may see and join a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Anyone may join (and then read and send).
    Public,
    /// Only members see it; members add others.
    Private,
    /// A direct message: two users, fixed.
    Direct,
}

/// What happened in a channel: one entry of its sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Created { visibility: Visibility, name: String, members: Vec<String> },
    Joined { members: Vec<String> },
    Left { members: Vec<String> },
    Message { text: String, #[serde(default, skip_serializing_if = "Option::is_none")] client_id: Option<String> },
    Edited { target: u64, text: String },
    Deleted { target: u64 },
}

/// One event of a channel, as stored in the log and sent to clients:
/// `{"channel","seq","user","ts","kind",…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub channel: String,
    pub seq: u64,
    pub user: String,
    pub ts: i64,
    #[serde(flatten)]
    pub body: Body,
}

impl Event {
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }
}

/// A message as history and search show it: its latest text, or that it was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MessageView {
    pub channel: String,
    pub seq: u64,
    pub user: String,
    pub ts: i64,
    /// `null` once deleted.
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// When it was last edited, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<i64>,
    pub deleted: bool,
}

#[derive(Debug, Clone)]
pub struct MessageState {
    pub user: Arc<str>,
    pub ts: i64,
    pub text: Option<Arc<str>>,
    pub client_id: Option<Arc<str>>,
    pub edited_ts: Option<i64>,
}

/// A channel as its applied (durable) events built it.
#[derive(Debug, Clone)]
pub struct ChannelView {
    pub visibility: Visibility,
    pub name: String,
    pub members: BTreeSet<Arc<str>>,
    /// Every event's wire JSON; the event of seq `s` is at `s - 1`.
    pub events: Vec<Arc<str>>,
    pub messages: BTreeMap<u64, MessageState>,
}

impl ChannelView {
    pub fn new(visibility: Visibility, name: String) -> ChannelView {
        ChannelView { visibility, name, members: BTreeSet::new(), events: Vec::new(), messages: BTreeMap::new() }
    }

    /// The last applied seq (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.events.len() as u64
    }

    /// Apply the next event (its seq must follow the last one).
    pub fn apply(&mut self, event: &Event, json: Arc<str>) {
        assert_eq!(event.seq, self.last_seq() + 1, "channel {} applies seq {} after {}", event.channel, event.seq, self.last_seq());
        match &event.body {
            Body::Created { members, .. } | Body::Joined { members } => {
                self.members.extend(members.iter().map(|m| Arc::from(m.as_str())));
            }
            Body::Left { members } => {
                for member in members {
                    self.members.remove(member.as_str());
                }
            }
            Body::Message { text, client_id } => {
                let state = MessageState { user: Arc::from(event.user.as_str()), ts: event.ts, text: Some(Arc::from(text.as_str())), client_id: client_id.as_deref().map(Arc::from), edited_ts: None };
                self.messages.insert(event.seq, state);
            }
            Body::Edited { target, text } => {
                if let Some(message) = self.messages.get_mut(target) {
                    message.text = Some(Arc::from(text.as_str()));
                    message.edited_ts = Some(event.ts);
                }
            }
            Body::Deleted { target } => {
                if let Some(message) = self.messages.get_mut(target) {
                    message.text = None;
                }
            }
        }
        self.events.push(json);
    }

    pub fn view(&self, channel: &str, seq: u64) -> Option<MessageView> {
        let m = self.messages.get(&seq)?;
        Some(MessageView {
            channel: channel.to_string(),
            seq,
            user: m.user.to_string(),
            ts: m.ts,
            text: m.text.as_deref().map(str::to_string),
            client_id: m.client_id.as_deref().map(str::to_string),
            edited_ts: m.edited_ts,
            deleted: m.text.is_none(),
        })
    }

    /// A page of messages in seq order: after `after`, or before `before`, or the latest.
    /// Returns the page and whether more lie beyond it in the direction paged.
    pub fn history(&self, channel: &str, before: Option<u64>, after: Option<u64>, limit: usize) -> (Vec<MessageView>, bool) {
        let seqs: Vec<u64> = match (before, after) {
            (_, Some(after)) => self.messages.range(after.saturating_add(1)..).map(|(s, _)| *s).take(limit + 1).collect(),
            (Some(before), None) => self.messages.range(..before).rev().map(|(s, _)| *s).take(limit + 1).collect(),
            (None, None) => self.messages.keys().rev().copied().take(limit + 1).collect(),
        };
        let more = seqs.len() > limit;
        let mut page: Vec<u64> = seqs.into_iter().take(limit).collect();
        page.sort_unstable();
        (page.into_iter().filter_map(|s| self.view(channel, s)).collect(), more)
    }

    /// Messages after `read` that others sent and that are not deleted.
    pub fn unread(&self, user: &str, read: u64) -> u64 {
        self.messages.range(read.saturating_add(1)..).filter(|(_, m)| m.text.is_some() && &*m.user != user).count() as u64
    }
}

/// `since` of a connection: `{"<channel>": <last seq seen>, …}`.
pub fn parse_since(text: &str) -> Result<BTreeMap<String, u64>, Invalid> {
    let since: BTreeMap<String, u64> =
        serde_json::from_str(text).map_err(|e| Invalid::Bad(format!("since must be a JSON object of channel to last seen seq, like {{\"general\":41}}: {e}")))?;
    if since.len() > SYNC_CHANNELS_MAX {
        return Err(Invalid::TooLarge(format!("since names {} channels: at most SYNC_CHANNELS_MAX ({SYNC_CHANNELS_MAX})", since.len())));
    }
    for channel in since.keys() {
        check_channel(channel)?;
    }
    Ok(since)
}

/// A page size: `limit` or `default`, at most `max`.
pub fn page_limit(limit: Option<usize>, default: usize, max: usize, name: &str) -> Result<usize, Invalid> {
    match limit {
        None => Ok(default),
        Some(0) => Err(Invalid::Bad("limit must be at least 1".into())),
        Some(n) if n > max => Err(Invalid::TooLarge(format!("limit {n}: at most {name} ({max})"))),
        Some(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, user: &str, body: Body) -> Event {
        Event { channel: "c".into(), seq, user: user.into(), ts: seq as i64, body }
    }

    fn apply(view: &mut ChannelView, event: Event) {
        let json = Arc::from(event.json());
        view.apply(&event, json);
    }

    #[test]
    fn a_dm_id_is_the_same_whoever_asks_and_is_checked() {
        assert_eq!(dm_channel("bob", "alice").unwrap(), "dm:alice:bob");
        assert_eq!(dm_channel("alice", "bob").unwrap(), "dm:alice:bob");
        assert_eq!(dm_users("dm:alice:bob"), Some(("alice", "bob")));
        assert!(dm_channel("alice", "alice").is_err());
        assert!(check_channel("dm:bob:alice").is_err(), "unsorted");
        assert!(check_channel("dm:x").is_err());
        assert!(check_channel("general").is_ok());
        assert!(check_channel("no spaces").is_err());
        assert!(check_channel(&"x".repeat(ID_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn events_round_trip_through_their_wire_form() {
        let e = event(3, "ann", Body::Edited { target: 2, text: "hi".into() });
        let json = e.json();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap(), serde_json::json!({"channel":"c","seq":3,"user":"ann","ts":3,"kind":"edited","target":2,"text":"hi"}));
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
    }

    #[test]
    fn a_channel_applies_its_events_into_members_history_and_unread_counts() {
        let mut view = ChannelView::new(Visibility::Public, "c".into());
        apply(&mut view, event(1, "ann", Body::Created { visibility: Visibility::Public, name: "c".into(), members: vec!["ann".into(), "bob".into()] }));
        for seq in 2..=6 {
            apply(&mut view, event(seq, if seq % 2 == 0 { "ann" } else { "bob" }, Body::Message { text: format!("m{seq}"), client_id: None }));
        }
        apply(&mut view, event(7, "ann", Body::Edited { target: 2, text: "m2!".into() }));
        apply(&mut view, event(8, "bob", Body::Deleted { target: 3 }));
        apply(&mut view, event(9, "ann", Body::Left { members: vec!["ann".into()] }));
        assert_eq!(view.last_seq(), 9);
        assert_eq!(view.members.iter().map(|m| m.to_string()).collect::<Vec<_>>(), vec!["bob"]);
        let (page, more) = view.history("c", None, None, 2);
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![5, 6]);
        assert!(more);
        let (page, more) = view.history("c", Some(5), None, 10);
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(!more);
        assert_eq!(page[0].text.as_deref(), Some("m2!"));
        assert!(page[0].edited_ts.is_some());
        assert!(page[1].deleted && page[1].text.is_none());
        let (page, more) = view.history("c", None, Some(4), 1);
        assert_eq!((page[0].seq, more), (5, true));
        // bob's unread after seq 1: ann's messages 2, 4, 6 (3 and 5 are his; 3 is deleted anyway).
        assert_eq!(view.unread("bob", 1), 3);
        assert_eq!(view.unread("bob", 4), 1);
        assert_eq!(view.unread("ann", 0), 1, "bob's 3 is deleted, 5 counts");
    }

    #[test]
    fn since_and_limits_are_checked() {
        assert_eq!(parse_since(r#"{"general":4,"dm:a:b":0}"#).unwrap().len(), 2);
        assert!(parse_since("general:4").is_err());
        assert!(parse_since(r#"{"no spaces":1}"#).is_err());
        assert!(parse_since(r#"{"general":-1}"#).is_err());
        assert_eq!(page_limit(None, 50, 200, "HISTORY_PAGE_MAX").unwrap(), 50);
        assert!(matches!(page_limit(Some(201), 50, 200, "HISTORY_PAGE_MAX"), Err(Invalid::TooLarge(_))));
        assert!(matches!(page_limit(Some(0), 50, 200, "HISTORY_PAGE_MAX"), Err(Invalid::Bad(_))));
        assert!(matches!(check_text(&"x".repeat(MESSAGE_TEXT_BYTES_MAX + 1)), Err(Invalid::TooLarge(_))));
        assert!(check_text("  ").is_err());
    }
}
