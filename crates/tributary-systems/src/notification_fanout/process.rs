//! The fan-out's logic, free of IO: subscribers and their preferences, quiet hours, trigger
//! requests and their validation, the per-recipient delivery state kept on the events log, the
//! configuration (providers, rates, retries, circuit breaker, email leg, categories), and the
//! decisions made from them: which channels a recipient gets ([`decide`]), how long quiet hours
//! defer a delivery ([`quiet_hours_wait_ms`]), how long a retry waits ([`retry_delay_ms`]).
//!
//! Every refusal names the field and, where one applies, the limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tributary_runtime::shaping::Rate;
use tributary_server::ApiError;
use tributary_server::utoipa::{self, ToSchema};

/// Most notifications one trigger request carries.
pub const NOTIFICATIONS_PER_REQUEST_MAX: usize = 1_000;
/// Most user ids one notification names directly.
pub const RECIPIENT_USERS_MAX: usize = 1_000;
/// Most topics one notification names.
pub const RECIPIENT_TOPICS_MAX: usize = 10;
/// Most members one topic holds.
pub const TOPIC_MEMBERS_MAX: usize = 1_000_000;
/// Most topics.
pub const TOPICS_MAX: usize = 100_000;
/// Most member changes one request makes.
pub const MEMBERS_PER_REQUEST_MAX: usize = 10_000;
/// Most subscribers.
pub const SUBSCRIBERS_MAX: usize = 10_000_000;
/// Most subscribers one bulk registration (`POST /v1/fanout/subscribers`) creates or replaces.
pub const SUBSCRIBERS_PER_REQUEST_MAX: usize = 1_000;
/// Longest user id, topic name, category or provider name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// Largest `data` of a notification, serialized, in bytes.
pub const PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// Longest title, in bytes.
pub const TITLE_BYTES_MAX: usize = 256;
/// Longest body text, in bytes.
pub const TEXT_BYTES_MAX: usize = 4 * 1024;
/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// Most push device tokens of one subscriber.
pub const PUSH_TOKENS_MAX: usize = 10;
/// Longest push device token, in bytes.
pub const PUSH_TOKEN_BYTES_MAX: usize = 512;
/// Longest email address, in bytes (RFC 5321's path limit).
pub const EMAIL_BYTES_MAX: usize = 254;
/// Most per-category preferences of one subscriber.
pub const CATEGORY_PREFERENCES_MAX: usize = 256;
/// Furthest timezone offset from UTC, in minutes.
pub const TIMEZONE_OFFSET_MINUTES_MAX: i32 = 14 * 60;
/// Most categories a configuration declares.
pub const CATEGORIES_MAX: usize = 1_000;
/// Most providers per channel.
pub const PROVIDERS_PER_CHANNEL_MAX: usize = 8;
/// Longest digest window.
pub const DIGEST_WINDOW_MS_MAX: u64 = 24 * 60 * 60 * 1_000;
/// Most notifications one digest batches; the next one opens a new digest.
pub const DIGEST_ITEMS_MAX: usize = 100;
/// Attempts kept in a delivery's history (the newest).
pub const ATTEMPTS_LISTED_MAX: usize = 20;

/// Attempts before a delivery fails (the first one included).
pub const RETRY_ATTEMPTS_DEFAULT: u32 = 5;
/// Most attempts a configuration may ask for.
pub const RETRY_ATTEMPTS_MAX: u32 = 50;
/// Delay before the first retry; doubles per attempt.
pub const RETRY_BASE_MS_DEFAULT: u64 = 1_000;
/// Longest delay between two attempts.
pub const RETRY_MAX_MS_DEFAULT: u64 = 5 * 60 * 1_000;
/// How long a provider (or the email API) may take to answer, unless configured.
pub const PROVIDER_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Longest provider timeout a configuration may ask for.
pub const PROVIDER_TIMEOUT_MS_MAX: u64 = 60_000;
/// Failures in a row after which a provider is skipped for the cool-down, unless configured.
pub const CIRCUIT_FAILURES_DEFAULT: u32 = 5;
/// How long an open circuit skips its provider, unless configured.
pub const CIRCUIT_COOLDOWN_MS_DEFAULT: u64 = 30_000;
/// Deliveries per second per channel, unless configured.
pub const CHANNEL_RATE_PER_S_DEFAULT: f64 = 10_000.0;
/// Deliveries per second per provider, unless configured.
pub const PROVIDER_RATE_PER_S_DEFAULT: f64 = 5_000.0;
/// The email system's API, unless configured: the platform's default listen address.
pub const EMAIL_BASE_URL_DEFAULT: &str = "http://127.0.0.1:7400";
/// The sender of fan-out emails, unless configured.
pub const EMAIL_FROM_DEFAULT: &str = "Notifications <notifications@localhost.localdomain>";

// ---------------------------------------------------------------------------------------------
// Channels

/// A delivery channel; each has its own engine queue and workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Push,
    Sms,
    InApp,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Email, Channel::Push, Channel::Sms, Channel::InApp];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Push => "push",
            Channel::Sms => "sms",
            Channel::InApp => "in_app",
        }
    }

    pub fn parse(text: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == text)
    }

    /// The engine queue of the channel.
    pub fn queue(self) -> &'static str {
        match self {
            Channel::Email => "fanout.email",
            Channel::Push => "fanout.push",
            Channel::Sms => "fanout.sms",
            Channel::InApp => "fanout.in_app",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// `true` if `name` is a valid user id, topic, category or provider name.
pub fn is_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= NAME_BYTES_MAX && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if is_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{field} {name:?} must be 1 to NAME_BYTES_MAX ({NAME_BYTES_MAX}) bytes of letters, digits, '-' and '_'")))
    }
}

// ---------------------------------------------------------------------------------------------
// Subscribers

/// A user who can receive notifications: contacts per channel, timezone, preferences.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subscriber {
    /// Set from the path.
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// E.164 (`+` and 8 to 15 digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Push device tokens (up to `PUSH_TOKENS_MAX`); push goes to every one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push_tokens: Vec<String>,
    /// Minutes east of UTC (`-840` to `840`): quiet hours are in local time.
    #[serde(default)]
    pub timezone_offset_minutes: i32,
    #[serde(default)]
    pub preferences: Preferences,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
}

/// Opt-outs: per channel for everything, and per category (all channels or some).
/// A `critical` notification overrides them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    /// `{"sms": false}`: no SMS at all. A channel not named is on.
    #[serde(default)]
    pub channels: BTreeMap<Channel, bool>,
    /// `{"marketing": {"enabled": false}}` or `{"orders": {"channels": {"push": false}}}`.
    #[serde(default)]
    pub categories: BTreeMap<String, CategoryPreference>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CategoryPreference {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub channels: BTreeMap<Channel, bool>,
}

fn yes() -> bool {
    true
}

/// A daily window, in the subscriber's local time, during which non-critical email, push and
/// SMS wait until its end. `start` after `end` spans midnight (`22:00` to `07:00`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
}

/// Minutes after midnight of `HH:MM`.
pub fn parse_clock(text: &str) -> Option<u32> {
    let (hours, minutes) = text.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let (hours, minutes): (u32, u32) = (hours.parse().ok()?, minutes.parse().ok()?);
    (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
}

fn is_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

fn is_email(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else { return false };
    address.len() <= EMAIL_BYTES_MAX
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && address.bytes().all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>' && b != b'"' && b != b',')
}

/// Check a subscriber named `id` by its path.
pub fn check_subscriber(id: &str, mut subscriber: Subscriber) -> Result<Subscriber, ApiError> {
    check_name("subscriber id", id)?;
    if !subscriber.id.is_empty() && subscriber.id != id {
        return Err(ApiError::bad_request(format!("id {:?} differs from the path's {id:?}", subscriber.id)));
    }
    subscriber.id = id.to_string();
    if let Some(email) = &subscriber.email
        && !is_email(email)
    {
        return Err(ApiError::bad_request(format!("email {email:?} is not an address (name@domain, at most {EMAIL_BYTES_MAX} bytes)")));
    }
    if let Some(phone) = &subscriber.phone
        && !is_phone(phone)
    {
        return Err(ApiError::bad_request(format!("phone {phone:?} is not an E.164 number (+ and 8 to 15 digits)")));
    }
    if subscriber.push_tokens.len() > PUSH_TOKENS_MAX {
        return Err(ApiError::too_large(format!("push_tokens holds {}; PUSH_TOKENS_MAX is {PUSH_TOKENS_MAX}", subscriber.push_tokens.len())));
    }
    if let Some(token) = subscriber.push_tokens.iter().find(|t| t.is_empty() || t.len() > PUSH_TOKEN_BYTES_MAX) {
        return Err(ApiError::bad_request(format!("a push token is {} bytes; it must be 1 to PUSH_TOKEN_BYTES_MAX ({PUSH_TOKEN_BYTES_MAX})", token.len())));
    }
    if subscriber.timezone_offset_minutes.abs() > TIMEZONE_OFFSET_MINUTES_MAX {
        return Err(ApiError::bad_request(format!("timezone_offset_minutes must be -{TIMEZONE_OFFSET_MINUTES_MAX} to {TIMEZONE_OFFSET_MINUTES_MAX}, got {}", subscriber.timezone_offset_minutes)));
    }
    if subscriber.preferences.categories.len() > CATEGORY_PREFERENCES_MAX {
        return Err(ApiError::too_large(format!("preferences.categories holds {}; CATEGORY_PREFERENCES_MAX is {CATEGORY_PREFERENCES_MAX}", subscriber.preferences.categories.len())));
    }
    for category in subscriber.preferences.categories.keys() {
        check_name("preferences.categories", category)?;
    }
    if let Some(quiet) = &subscriber.quiet_hours {
        for (field, value) in [("quiet_hours.start", &quiet.start), ("quiet_hours.end", &quiet.end)] {
            if parse_clock(value).is_none() {
                return Err(ApiError::bad_request(format!("{field} {value:?} is not a time of day (HH:MM)")));
            }
        }
    }
    Ok(subscriber)
}

/// `POST /v1/fanout/subscribers`: subscribers created or replaced together, each with its id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribersRequest {
    pub subscribers: Vec<Subscriber>,
}

/// Checks a bulk registration: 1 to `SUBSCRIBERS_PER_REQUEST_MAX` subscribers with distinct
/// ids, each as [`check_subscriber`] checks it (the error names the index).
pub fn check_subscribers(request: SubscribersRequest) -> Result<Vec<Subscriber>, ApiError> {
    let count = request.subscribers.len();
    if count == 0 {
        return Err(ApiError::bad_request("subscribers is empty"));
    }
    if count > SUBSCRIBERS_PER_REQUEST_MAX {
        return Err(ApiError::too_large(format!("subscribers holds {count}; SUBSCRIBERS_PER_REQUEST_MAX is {SUBSCRIBERS_PER_REQUEST_MAX}")));
    }
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut checked = Vec::with_capacity(count);
    for (index, subscriber) in request.subscribers.into_iter().enumerate() {
        let id = subscriber.id.clone();
        let subscriber = check_subscriber(&id, subscriber).map_err(|error| ApiError { message: format!("subscribers[{index}]: {}", error.message), ..error })?;
        if !seen.insert(id) {
            return Err(ApiError::bad_request(format!("subscribers[{index}]: id {:?} is given twice", subscriber.id)));
        }
        checked.push(subscriber);
    }
    Ok(checked)
}

/// How long quiet hours hold a delivery made at `now_ms` (0: not in quiet hours).
pub fn quiet_hours_wait_ms(now_ms: u64, offset_minutes: i32, quiet: &QuietHours) -> u64 {
    const DAY_MS: i64 = 24 * 60 * 60 * 1_000;
    let (Some(start), Some(end)) = (parse_clock(&quiet.start), parse_clock(&quiet.end)) else { return 0 };
    let (start, end) = (i64::from(start) * 60_000, i64::from(end) * 60_000);
    let local = (now_ms as i64 + i64::from(offset_minutes) * 60_000).rem_euclid(DAY_MS);
    let inside = match start.cmp(&end) {
        std::cmp::Ordering::Less => local >= start && local < end,
        std::cmp::Ordering::Greater => local >= start || local < end,
        std::cmp::Ordering::Equal => false,
    };
    if inside { (end - local).rem_euclid(DAY_MS) as u64 } else { 0 }
}

/// What one recipient gets on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send, not before this instant (quiet hours) if given.
    Send { not_before_ms: Option<u64> },
    /// Not sent, and why.
    Skip(String),
}

/// Preferences, contacts and quiet hours applied to one recipient and channel. A critical
/// notification overrides opt-outs and quiet hours, never a missing contact.
pub fn decide(subscriber: &Subscriber, channel: Channel, category: &str, critical: bool, now_ms: u64) -> Decision {
    let missing = match channel {
        Channel::Email if subscriber.email.is_none() => Some("the subscriber has no email address"),
        Channel::Sms if subscriber.phone.is_none() => Some("the subscriber has no phone number"),
        Channel::Push if subscriber.push_tokens.is_empty() => Some("the subscriber has no push device"),
        _ => None,
    };
    if let Some(reason) = missing {
        return Decision::Skip(reason.into());
    }
    if !critical {
        let preferences = &subscriber.preferences;
        if preferences.channels.get(&channel) == Some(&false) {
            return Decision::Skip(format!("the subscriber opted out of {}", channel.as_str()));
        }
        if let Some(preference) = preferences.categories.get(category) {
            if !preference.enabled {
                return Decision::Skip(format!("the subscriber opted out of category {category}"));
            }
            if preference.channels.get(&channel) == Some(&false) {
                return Decision::Skip(format!("the subscriber opted out of {} for category {category}", channel.as_str()));
            }
        }
        if channel != Channel::InApp
            && let Some(quiet) = &subscriber.quiet_hours
        {
            let wait = quiet_hours_wait_ms(now_ms, subscriber.timezone_offset_minutes, quiet);
            if wait > 0 {
                return Decision::Send { not_before_ms: Some(now_ms + wait) };
            }
        }
    }
    Decision::Send { not_before_ms: None }
}

// ---------------------------------------------------------------------------------------------
// Topics

/// `PUT /v1/fanout/topics/{topic}/members`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MembersRequest {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Trigger

/// `POST /v1/fanout/notifications`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// 1 to `NOTIFICATIONS_PER_REQUEST_MAX`.
    pub notifications: Vec<NewNotification>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNotification {
    /// The workflow it belongs to: preferences, digests and default channels are per category.
    pub category: String,
    /// Subscriber ids (up to `RECIPIENT_USERS_MAX`).
    #[serde(default)]
    pub users: Vec<String>,
    /// Topics whose members receive it (up to `RECIPIENT_TOPICS_MAX`).
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    /// Any JSON, handed to providers and the inbox as is.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
    /// Channels to use; default: the category's, else all four.
    #[serde(default)]
    pub channels: Option<Vec<Channel>>,
    /// Overrides opt-outs, quiet hours and digests.
    #[serde(default)]
    pub critical: bool,
    /// The same key answers the same notification id (nothing is sent twice).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// An accepted notification, as kept on the notifications log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Notification {
    pub id: String,
    pub category: String,
    pub users: Vec<String>,
    pub topics: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<Channel>>,
    pub critical: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub accepted_at_ms: u64,
}

impl Notification {
    /// The channels this notification goes out on.
    pub fn channels(&self, config: &FanoutConfig) -> Vec<Channel> {
        let mut channels = self.channels.clone().or_else(|| config.categories.get(&self.category).and_then(|c| c.channels.clone())).unwrap_or_else(|| Channel::ALL.to_vec());
        channels.sort();
        channels.dedup();
        channels
    }

    /// What one recipient is sent: its title, body and data.
    pub fn content(&self) -> Content {
        Content { notification: self.id.clone(), title: self.title.clone(), body: self.body.clone(), data: self.data.clone() }
    }
}

/// The content of one notification as a delivery carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Content {
    pub notification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
}

/// Check one notification of a request; `id` names it, `now_ms` stamps it.
pub fn accept(i: usize, new: NewNotification, id: String, now_ms: u64) -> Result<Notification, ApiError> {
    let field = |name: &str| format!("notifications[{i}].{name}");
    check_name(&field("category"), &new.category)?;
    if new.users.is_empty() && new.topics.is_empty() {
        return Err(ApiError::bad_request(format!("{} needs at least one recipient in users or topics", field("users"))));
    }
    if new.users.len() > RECIPIENT_USERS_MAX {
        return Err(ApiError::too_large(format!("{} holds {} users; RECIPIENT_USERS_MAX is {RECIPIENT_USERS_MAX}", field("users"), new.users.len())));
    }
    if new.topics.len() > RECIPIENT_TOPICS_MAX {
        return Err(ApiError::too_large(format!("{} holds {} topics; RECIPIENT_TOPICS_MAX is {RECIPIENT_TOPICS_MAX}", field("topics"), new.topics.len())));
    }
    for user in &new.users {
        check_name(&field("users"), user)?;
    }
    for topic in &new.topics {
        check_name(&field("topics"), topic)?;
    }
    if new.title.as_ref().is_some_and(|t| t.len() > TITLE_BYTES_MAX) {
        return Err(ApiError::too_large(format!("{} is longer than TITLE_BYTES_MAX ({TITLE_BYTES_MAX})", field("title"))));
    }
    if new.body.as_ref().is_some_and(|t| t.len() > TEXT_BYTES_MAX) {
        return Err(ApiError::too_large(format!("{} is longer than TEXT_BYTES_MAX ({TEXT_BYTES_MAX})", field("body"))));
    }
    if let Some(data) = &new.data {
        let bytes = serde_json::to_vec(data).expect("JSON serializes").len();
        if bytes > PAYLOAD_BYTES_MAX {
            return Err(ApiError::too_large(format!("{} is {bytes} bytes; PAYLOAD_BYTES_MAX is {PAYLOAD_BYTES_MAX}", field("data"))));
        }
    }
    if let Some(channels) = &new.channels
        && channels.is_empty()
    {
        return Err(ApiError::bad_request(format!("{} must name at least one channel (or be left out)", field("channels"))));
    }
    if let Some(key) = &new.idempotency_key
        && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX)
    {
        return Err(ApiError::bad_request(format!("{} must be 1 to IDEMPOTENCY_KEY_BYTES_MAX ({IDEMPOTENCY_KEY_BYTES_MAX}) bytes", field("idempotency_key"))));
    }
    let mut users = new.users;
    users.sort();
    users.dedup();
    let mut topics = new.topics;
    topics.sort();
    topics.dedup();
    Ok(Notification {
        id,
        category: new.category,
        users,
        topics,
        title: new.title,
        body: new.body,
        data: new.data,
        channels: new.channels,
        critical: new.critical,
        idempotency_key: new.idempotency_key,
        accepted_at_ms: now_ms,
    })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TriggerResponse {
    pub notifications: Vec<Triggered>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Triggered {
    pub id: String,
    /// True when the idempotency key was seen before: this is that notification's id.
    pub duplicate: bool,
}

// ---------------------------------------------------------------------------------------------
// Deliveries

/// The id of the delivery of notification `notification` to `user` on `channel`.
pub fn delivery_id(notification: &str, channel: Channel, user: &str) -> String {
    format!("{notification}.{}.{user}", channel.as_str())
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In its channel's queue.
    Queued,
    /// In its channel's queue, held until the end of the recipient's quiet hours.
    Deferred,
    /// Joined a digest: sent with the digest's first delivery (`digest`).
    Batched,
    /// An attempt failed; the next one is at `next_attempt_at_ms`.
    Retrying,
    /// A provider (or the email system, or the inbox) took it.
    Delivered,
    /// Refused by the provider (4xx) or out of attempts.
    Failed,
    /// Not sent: opted out, no contact, unknown subscriber.
    Skipped,
}

impl Status {
    pub const ALL: [Status; 7] = [Status::Queued, Status::Deferred, Status::Batched, Status::Retrying, Status::Delivered, Status::Failed, Status::Skipped];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Deferred => "deferred",
            Status::Batched => "batched",
            Status::Retrying => "retrying",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }

    /// Delivered, failed or skipped: nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Delivered | Status::Failed | Status::Skipped)
    }
}

/// One try at one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    pub at_ms: u64,
    /// The provider's name (`email` for the email system, `inbox` for in-app).
    pub provider: String,
    /// `delivered`, `rejected` (4xx: final), `failed` (5xx, timeout, connection: next provider).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One recipient's delivery on one channel, whole, as each event on the events log holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryState {
    pub id: String,
    pub notification: String,
    pub user: String,
    pub channel: Channel,
    pub category: String,
    pub critical: bool,
    pub status: Status,
    pub accepted_at_ms: u64,
    pub updated_at_ms: u64,
    /// Attempts made (each may have tried several providers).
    pub attempts: u32,
    /// Held until then (quiet hours, or the digest window of a digest's first delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at_ms: Option<u64>,
    /// The provider that took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The email system's id of the email (email channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_id: Option<String>,
    /// Batched: the digest it joined (the id of the digest's first delivery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// A digest's first delivery: the window's end, while it collects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_until_ms: Option<u64>,
    /// A digest's first delivery, once sent: how many notifications it carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_items: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The newest `ATTEMPTS_LISTED_MAX` provider calls, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Attempt>,
}

impl DeliveryState {
    /// The delivery of `notification` to `user` on `channel`, as expanded at `now`: queued.
    pub fn queued(notification: &Notification, channel: Channel, user: &str, now_ms: u64) -> DeliveryState {
        DeliveryState {
            id: delivery_id(&notification.id, channel, user),
            notification: notification.id.clone(),
            user: user.to_string(),
            channel,
            category: notification.category.clone(),
            critical: notification.critical,
            status: Status::Queued,
            accepted_at_ms: notification.accepted_at_ms,
            updated_at_ms: now_ms,
            attempts: 0,
            not_before_ms: None,
            next_attempt_at_ms: None,
            provider: None,
            email_id: None,
            digest: None,
            digest_until_ms: None,
            digest_items: None,
            reason: None,
            history: Vec::new(),
        }
    }

    pub fn push_attempt(&mut self, attempt: Attempt) {
        if self.history.len() == ATTEMPTS_LISTED_MAX {
            self.history.remove(0);
        }
        self.history.push(attempt);
    }
}

/// What a channel queue's message holds: the delivery as queued, and what to send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub state: DeliveryState,
    pub content: Content,
}

/// The delay before attempt `attempt + 1` after `attempt` failed ones: doubling from `base_ms`,
/// capped at `max_ms`.
pub fn retry_delay_ms(retry: &RetrySpec, attempt: u32) -> u64 {
    tributary_runtime::shaping::backoff_ms(retry.base_ms, retry.max_ms, attempt)
}

/// How a provider's answer is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// 4xx: the provider refuses this recipient; final.
    Rejected,
    /// 5xx, timeout, connection error: try the next provider, then retry.
    Failed,
}

pub fn classify(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        400..=499 if status != 408 && status != 429 => Verdict::Rejected,
        _ => Verdict::Failed,
    }
}

/// `GET /v1/fanout/notifications/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationView {
    pub notification: Notification,
    /// True once every recipient has its deliveries.
    pub expanded: bool,
    /// Deliveries by status.
    pub counts: BTreeMap<String, u64>,
    /// A page of deliveries, by id.
    pub deliveries: Vec<DeliverySummary>,
    /// Continue with `?after=` this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliverySummary {
    pub id: String,
    pub status: Status,
}

// ---------------------------------------------------------------------------------------------
// Inbox

/// One item of a user's in-app inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InboxItem {
    /// The delivery's id.
    pub id: String,
    pub category: String,
    /// The notification (the first of a digest).
    pub notification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub data: Option<Value>,
    /// A digest: every notification it batches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Content>,
    pub created_at_ms: u64,
    pub read: bool,
}

/// `POST /v1/fanout/inbox/{user}/read`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    pub rate_per_s: f64,
    pub burst: u32,
}

impl RateSpec {
    pub fn rate(&self) -> Rate {
        Rate::new(self.rate_per_s, self.burst)
    }
}

/// One HTTP provider of a channel (push or SMS): JSON POSTs, signed when it has a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Its own token bucket; default `PROVIDER_RATE_PER_S_DEFAULT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateSpec>,
}

impl ProviderSpec {
    pub fn rate(&self) -> Rate {
        self.rate.map_or_else(|| Rate::new(PROVIDER_RATE_PER_S_DEFAULT, PROVIDER_RATE_PER_S_DEFAULT as u32), |r| r.rate())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Providers {
    /// In priority order: the first that takes a delivery wins.
    #[serde(default)]
    pub push: Vec<ProviderSpec>,
    #[serde(default)]
    pub sms: Vec<ProviderSpec>,
}

impl Providers {
    pub fn of(&self, channel: Channel) -> &[ProviderSpec] {
        match channel {
            Channel::Push => &self.push,
            Channel::Sms => &self.sms,
            Channel::Email | Channel::InApp => &[],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts before a delivery fails (the first included).
    pub attempts: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec { attempts: RETRY_ATTEMPTS_DEFAULT, base_ms: RETRY_BASE_MS_DEFAULT, max_ms: RETRY_MAX_MS_DEFAULT }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitSpec {
    /// Failures in a row that open a provider's circuit.
    pub failures: u32,
    /// How long an open circuit skips its provider.
    pub cooldown_ms: u64,
}

impl Default for CircuitSpec {
    fn default() -> Self {
        CircuitSpec { failures: CIRCUIT_FAILURES_DEFAULT, cooldown_ms: CIRCUIT_COOLDOWN_MS_DEFAULT }
    }
}

/// The email leg: the email system's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailLeg {
    /// Base URL of a Tributary serving email-queue-system (`POST {base_url}/v1/email/messages`).
    #[serde(default = "email_base_url_default")]
    pub base_url: String,
    #[serde(default = "email_from_default")]
    pub from: String,
    /// `transactional` or `bulk`.
    #[serde(default = "email_class_default")]
    pub class: String,
}

fn email_base_url_default() -> String {
    EMAIL_BASE_URL_DEFAULT.into()
}

fn email_from_default() -> String {
    EMAIL_FROM_DEFAULT.into()
}

fn email_class_default() -> String {
    "transactional".into()
}

impl Default for EmailLeg {
    fn default() -> Self {
        EmailLeg { base_url: email_base_url_default(), from: email_from_default(), class: email_class_default() }
    }
}

/// Settings of one category (workflow).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    /// Default channels of its notifications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<Channel>>,
    /// Deliveries of this category to one user on one channel within this window go out as one
    /// digest (sent at the window's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_window_ms: Option<u64>,
}

/// The configuration (`PUT /v1/fanout/config`), persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FanoutConfig {
    #[serde(default)]
    pub providers: Providers,
    /// Per channel; default `CHANNEL_RATE_PER_S_DEFAULT` with as much burst.
    #[serde(default)]
    pub channel_rates: BTreeMap<Channel, RateSpec>,
    #[serde(default)]
    pub retry: RetrySpec,
    #[serde(default = "provider_timeout_default")]
    pub provider_timeout_ms: u64,
    #[serde(default)]
    pub circuit: CircuitSpec,
    #[serde(default)]
    pub email: EmailLeg,
    #[serde(default)]
    pub categories: BTreeMap<String, CategorySpec>,
}

fn provider_timeout_default() -> u64 {
    PROVIDER_TIMEOUT_MS_DEFAULT
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            providers: Providers::default(),
            channel_rates: BTreeMap::new(),
            retry: RetrySpec::default(),
            provider_timeout_ms: PROVIDER_TIMEOUT_MS_DEFAULT,
            circuit: CircuitSpec::default(),
            email: EmailLeg::default(),
            categories: BTreeMap::new(),
        }
    }
}

fn check_rate(field: &str, rate: &RateSpec) -> Result<(), ApiError> {
    if !(rate.rate_per_s > 0.0 && rate.rate_per_s.is_finite() && rate.rate_per_s <= 1e9) || rate.burst == 0 {
        return Err(ApiError::bad_request(format!("{field} needs rate_per_s > 0 (at most 1e9) and burst ≥ 1")));
    }
    Ok(())
}

impl FanoutConfig {
    pub fn channel_rate(&self, channel: Channel) -> Rate {
        self.channel_rates.get(&channel).map_or_else(|| Rate::new(CHANNEL_RATE_PER_S_DEFAULT, CHANNEL_RATE_PER_S_DEFAULT as u32), |r| r.rate())
    }

    pub fn digest_window_ms(&self, category: &str) -> Option<u64> {
        self.categories.get(category).and_then(|c| c.digest_window_ms).filter(|w| *w > 0)
    }

    pub fn validated(self) -> Result<FanoutConfig, ApiError> {
        for (channel, providers) in [(Channel::Push, &self.providers.push), (Channel::Sms, &self.providers.sms)] {
            if providers.len() > PROVIDERS_PER_CHANNEL_MAX {
                return Err(ApiError::too_large(format!("providers.{} holds {}; PROVIDERS_PER_CHANNEL_MAX is {PROVIDERS_PER_CHANNEL_MAX}", channel.as_str(), providers.len())));
            }
            for (i, provider) in providers.iter().enumerate() {
                let field = format!("providers.{}[{i}]", channel.as_str());
                check_name(&format!("{field}.name"), &provider.name)?;
                if providers.iter().filter(|p| p.name == provider.name).count() > 1 {
                    return Err(ApiError::bad_request(format!("{field}.name {:?} is used twice", provider.name)));
                }
                tributary_server::webhook::check_endpoint(&format!("{field}.url"), &provider.url).map_err(ApiError::bad_request)?;
                if let Some(secret) = &provider.secret
                    && (secret.is_empty() || secret.len() > tributary_server::webhook::WEBHOOK_SECRET_BYTES_MAX)
                {
                    return Err(ApiError::bad_request(format!("{field}.secret must be 1 to WEBHOOK_SECRET_BYTES_MAX ({}) bytes", tributary_server::webhook::WEBHOOK_SECRET_BYTES_MAX)));
                }
                if let Some(rate) = &provider.rate {
                    check_rate(&format!("{field}.rate"), rate)?;
                }
            }
        }
        for (channel, rate) in &self.channel_rates {
            check_rate(&format!("channel_rates.{}", channel.as_str()), rate)?;
        }
        let retry = &self.retry;
        if retry.attempts == 0 || retry.attempts > RETRY_ATTEMPTS_MAX {
            return Err(ApiError::bad_request(format!("retry.attempts must be 1 to RETRY_ATTEMPTS_MAX ({RETRY_ATTEMPTS_MAX}), got {}", retry.attempts)));
        }
        if retry.base_ms == 0 || retry.base_ms > retry.max_ms || retry.max_ms > tributary_core::limits::QUEUE_DELAY_MS_MAX {
            return Err(ApiError::bad_request("retry.base_ms must be at least 1 and at most retry.max_ms, itself at most QUEUE_DELAY_MS_MAX"));
        }
        if !(1..=PROVIDER_TIMEOUT_MS_MAX).contains(&self.provider_timeout_ms) {
            return Err(ApiError::bad_request(format!("provider_timeout_ms must be 1 to PROVIDER_TIMEOUT_MS_MAX ({PROVIDER_TIMEOUT_MS_MAX}), got {}", self.provider_timeout_ms)));
        }
        if self.circuit.failures == 0 || self.circuit.cooldown_ms == 0 || self.circuit.cooldown_ms > RETRY_MAX_MS_DEFAULT * 12 {
            return Err(ApiError::bad_request("circuit.failures must be at least 1 and circuit.cooldown_ms 1 to 3600000"));
        }
        tributary_server::webhook::check_endpoint("email.base_url", &self.email.base_url).map_err(ApiError::bad_request)?;
        if !is_email(self.email.from.rsplit_once('<').map_or(self.email.from.as_str(), |(_, a)| a.trim_end_matches('>'))) {
            return Err(ApiError::bad_request(format!("email.from {:?} is not an address", self.email.from)));
        }
        if self.email.class != "transactional" && self.email.class != "bulk" {
            return Err(ApiError::bad_request(format!("email.class must be transactional or bulk, got {:?}", self.email.class)));
        }
        if self.categories.len() > CATEGORIES_MAX {
            return Err(ApiError::too_large(format!("categories holds {}; CATEGORIES_MAX is {CATEGORIES_MAX}", self.categories.len())));
        }
        for (name, category) in &self.categories {
            check_name("categories", name)?;
            if category.digest_window_ms.is_some_and(|w| w > DIGEST_WINDOW_MS_MAX) {
                return Err(ApiError::bad_request(format!("categories.{name}.digest_window_ms must be at most DIGEST_WINDOW_MS_MAX ({DIGEST_WINDOW_MS_MAX})")));
            }
            if category.channels.as_ref().is_some_and(Vec::is_empty) {
                return Err(ApiError::bad_request(format!("categories.{name}.channels must name at least one channel (or be left out)")));
            }
        }
        Ok(self)
    }

    /// The configuration as shown: secrets as `***`.
    pub fn redacted(&self) -> FanoutConfig {
        let mut shown = self.clone();
        for provider in shown.providers.push.iter_mut().chain(shown.providers.sms.iter_mut()) {
            if provider.secret.is_some() {
                provider.secret = Some("***".into());
            }
        }
        shown
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    const HOUR: u64 = 60 * 60 * 1_000;

    fn quiet(start: &str, end: &str) -> QuietHours {
        QuietHours { start: start.into(), end: end.into() }
    }

    #[test]
    fn quiet_hours_across_midnight_hold_until_their_end_in_local_time() {
        let night = quiet("22:00", "07:00");
        // 23:00 UTC, offset 0: 8 hours to 07:00.
        assert_eq!(quiet_hours_wait_ms(23 * HOUR, 0, &night), 8 * HOUR);
        // 03:30 UTC: 3.5 hours left.
        assert_eq!(quiet_hours_wait_ms(3 * HOUR + HOUR / 2, 0, &night), 3 * HOUR + HOUR / 2);
        // 12:00 UTC: outside.
        assert_eq!(quiet_hours_wait_ms(12 * HOUR, 0, &night), 0);
        // 12:00 UTC is 23:00 at +11:00.
        assert_eq!(quiet_hours_wait_ms(12 * HOUR, 11 * 60, &night), 8 * HOUR);
        // 02:00 UTC is 21:00 at -05:00: outside.
        assert_eq!(quiet_hours_wait_ms(2 * HOUR, -5 * 60, &night), 0);
        // A window within one day; an empty window never holds.
        assert_eq!(quiet_hours_wait_ms(13 * HOUR, 0, &quiet("12:00", "14:00")), HOUR);
        assert_eq!(quiet_hours_wait_ms(13 * HOUR, 0, &quiet("12:00", "12:00")), 0);
    }

    #[test]
    fn critical_overrides_opt_outs_and_quiet_hours_but_not_a_missing_contact() {
        let mut subscriber = Subscriber { id: "ann".into(), email: Some("ann@example.org".into()), ..Subscriber::default() };
        subscriber.preferences.channels.insert(Channel::Email, false);
        subscriber.quiet_hours = Some(quiet("00:00", "23:59"));
        assert!(matches!(decide(&subscriber, Channel::Email, "news", false, HOUR), Decision::Skip(_)));
        assert_eq!(decide(&subscriber, Channel::Email, "news", true, HOUR), Decision::Send { not_before_ms: None });
        assert!(matches!(decide(&subscriber, Channel::Sms, "news", true, HOUR), Decision::Skip(_)));
        subscriber.preferences.channels.clear();
        assert_eq!(decide(&subscriber, Channel::Email, "news", false, HOUR), Decision::Send { not_before_ms: Some(HOUR + quiet_hours_wait_ms(HOUR, 0, &quiet("00:00", "23:59"))) });
        // In-app is never held by quiet hours.
        assert_eq!(decide(&subscriber, Channel::InApp, "news", false, HOUR), Decision::Send { not_before_ms: None });
        subscriber.preferences.categories.insert("news".into(), CategoryPreference { enabled: true, channels: [(Channel::InApp, false)].into() });
        assert!(matches!(decide(&subscriber, Channel::InApp, "news", false, HOUR), Decision::Skip(_)));
        assert_eq!(decide(&subscriber, Channel::InApp, "orders", false, HOUR), Decision::Send { not_before_ms: None });
    }

    #[test]
    fn retries_double_up_to_the_cap_and_answers_are_classified() {
        let retry = RetrySpec { attempts: 5, base_ms: 100, max_ms: 350 };
        assert_eq!([1, 2, 3, 4].map(|a| retry_delay_ms(&retry, a)), [100, 200, 350, 350]);
        assert_eq!([200, 204, 400, 404, 408, 429, 500, 503].map(classify), [
            Verdict::Delivered,
            Verdict::Delivered,
            Verdict::Rejected,
            Verdict::Rejected,
            Verdict::Failed,
            Verdict::Failed,
            Verdict::Failed,
            Verdict::Failed
        ]);
    }
}
