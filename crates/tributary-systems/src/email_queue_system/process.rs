//! The email system's logic, free of IO: request shapes and their validation, the stored email,
//! the delivery events, the configuration, how an SMTP reply is classified (delivered, deferred,
//! hard/soft bounce, block), and the retry backoff.
//!
//! Every refusal names the field and, where one applies, the limit. The handlers in `api.rs` and
//! the workers in `mod.rs` decide when to touch the engine or the network; what they check or
//! convert is here.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tributary_runtime::shaping::Rate;
use tributary_server::ApiError;
use tributary_server::utoipa::{self, IntoParams, ToSchema};

/// Most emails one `POST /v1/email/messages` carries.
pub const EMAILS_PER_REQUEST_MAX: usize = 1_000;
/// Largest email (subject, bodies, headers, metadata), in bytes.
pub const EMAIL_BYTES_MAX: usize = 512 * 1024;
/// Longest address, in bytes (RFC 5321's path limit).
pub const ADDRESS_BYTES_MAX: usize = 254;
/// Longest subject, in bytes (RFC 5322's line limit).
pub const SUBJECT_BYTES_MAX: usize = 998;
/// Most custom headers on one email.
pub const HEADERS_PER_EMAIL_MAX: usize = 32;
/// Most metadata entries on one email (returned with its status and every webhook event).
pub const METADATA_ENTRIES_MAX: usize = 16;
/// Longest metadata key or value, in bytes.
pub const METADATA_VALUE_BYTES_MAX: usize = 256;
/// Events listed with one email's status (newest first).
pub const EVENTS_LISTED_MAX: usize = 32;
/// Suppressions one page lists at most.
pub const SUPPRESSIONS_PAGE_MAX: usize = 1_000;
/// Most complaints one request reports.
pub const COMPLAINTS_PER_REQUEST_MAX: usize = 1_000;

/// SMTP attempts after the first one before a deferred email bounces (the seed's retry_attempts).
pub const RETRY_ATTEMPTS_DEFAULT: u32 = 3;
/// Most retries a configuration may ask for.
pub const RETRY_ATTEMPTS_MAX: u32 = 50;
/// Delay before the first retry; doubles per attempt.
pub const RETRY_BASE_MS_DEFAULT: u64 = 60_000;
/// Longest delay between two attempts.
pub const RETRY_MAX_MS_DEFAULT: u64 = 60 * 60 * 1_000;
/// Messages per second to one recipient domain, unless configured.
pub const DOMAIN_RATE_PER_S_DEFAULT: f64 = 100.0;
/// Messages one recipient domain may take at once after an idle time, unless configured.
pub const DOMAIN_BURST_DEFAULT: u32 = 100;
/// Most per-domain rate overrides in a configuration.
pub const DOMAIN_OVERRIDES_MAX: usize = 10_000;
/// SMTP connections kept open to the relay, unless configured.
pub const RELAY_POOL_MAX_DEFAULT: u32 = 16;
/// Most SMTP connections to the relay a configuration may ask for.
pub const RELAY_POOL_MAX_MAX: u32 = 1_000;
/// How long one SMTP command may take, unless configured.
pub const RELAY_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Header names an email may not set: the system writes them.
const RESERVED_HEADERS: &[&str] =
    &["from", "to", "cc", "bcc", "subject", "date", "message-id", "content-type", "content-transfer-encoding", "mime-version", "sender", "return-path"];

// ---------------------------------------------------------------------------------------------
// Classes

/// Which queue an email goes to. Transactional mail has its own queue and workers, so a bulk
/// campaign never delays a password reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Transactional,
    Bulk,
}

impl Class {
    pub const ALL: [Class; 2] = [Class::Transactional, Class::Bulk];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Transactional => "transactional",
            Class::Bulk => "bulk",
        }
    }

    /// The engine queue of the class.
    pub fn queue(self) -> &'static str {
        match self {
            Class::Transactional => super::TRANSACTIONAL_QUEUE,
            Class::Bulk => super::BULK_QUEUE,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Send

/// `POST /v1/email/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// 1 to `EMAILS_PER_REQUEST_MAX` emails, each to one recipient.
    pub messages: Vec<OutgoingEmail>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutgoingEmail {
    /// `transactional` (its own queue and workers) or `bulk`.
    pub class: Class,
    /// Sender address (`name@domain`, or `Name <name@domain>`).
    pub from: String,
    /// The one recipient.
    pub to: String,
    pub subject: String,
    /// Plain-text body; at least one of `text` and `html`.
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Extra headers (`List-Unsubscribe`, `X-…`); structural ones (From, To, Subject, Date,
    /// Message-ID, Content-Type, …) are refused.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Up to `METADATA_ENTRIES_MAX` pairs, returned with the status and every webhook event.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// An accepted email as it waits in its queue (JSON in the queue message's body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    pub id: String,
    pub class: Class,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub reply_to: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub accepted_at_ms: u64,
}

impl Email {
    /// The recipient's domain, lower case: the key of its rate limit.
    pub fn domain(&self) -> String {
        recipient_domain(&self.to)
    }
}

/// What became of each email of a send request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SendResponse {
    pub messages: Vec<Accepted>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    /// `queued`, or `suppressed` (the recipient is on the suppression list: not sent).
    pub status: EventKind,
}

/// Check one email of a request; `now_ms` stamps it, `id` names it.
pub fn accept(i: usize, email: OutgoingEmail, id: String, now_ms: u64) -> Result<Email, ApiError> {
    let field = |name: &str| format!("messages[{i}].{name}");
    check_mailbox(&field("from"), &email.from)?;
    check_address(&field("to"), &email.to)?;
    if let Some(reply_to) = &email.reply_to {
        check_mailbox(&field("reply_to"), reply_to)?;
    }
    if email.subject.len() > SUBJECT_BYTES_MAX {
        return Err(ApiError::too_large(format!("{} is {} bytes; SUBJECT_BYTES_MAX is {SUBJECT_BYTES_MAX}", field("subject"), email.subject.len())));
    }
    if email.subject.contains(['\r', '\n']) {
        return Err(ApiError::bad_request(format!("{} must be one line", field("subject"))));
    }
    if email.text.is_none() && email.html.is_none() {
        return Err(ApiError::bad_request(format!("{} needs a text or an html body", field("text"))));
    }
    if email.headers.len() > HEADERS_PER_EMAIL_MAX {
        return Err(ApiError::too_large(format!("{} holds {} headers; HEADERS_PER_EMAIL_MAX is {HEADERS_PER_EMAIL_MAX}", field("headers"), email.headers.len())));
    }
    for (name, value) in &email.headers {
        let valid_name = !name.is_empty() && name.len() <= 76 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name {
            return Err(ApiError::bad_request(format!("{}: {name:?} is not a header name (printable ASCII, no ':', at most 76 bytes)", field("headers"))));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(ApiError::bad_request(format!("{}: {name:?} is set by the system; use the field of that name", field("headers"))));
        }
        if value.contains(['\r', '\n']) {
            return Err(ApiError::bad_request(format!("{}.{name} must be one line", field("headers"))));
        }
    }
    if email.metadata.len() > METADATA_ENTRIES_MAX {
        return Err(ApiError::too_large(format!("{} holds {} entries; METADATA_ENTRIES_MAX is {METADATA_ENTRIES_MAX}", field("metadata"), email.metadata.len())));
    }
    if let Some((key, _)) = email.metadata.iter().find(|(k, v)| k.is_empty() || k.len() > METADATA_VALUE_BYTES_MAX || v.len() > METADATA_VALUE_BYTES_MAX) {
        return Err(ApiError::too_large(format!("{}.{key:?}: keys are 1 and values at most METADATA_VALUE_BYTES_MAX ({METADATA_VALUE_BYTES_MAX}) bytes", field("metadata"))));
    }
    let size = email.subject.len()
        + email.text.as_ref().map_or(0, String::len)
        + email.html.as_ref().map_or(0, String::len)
        + email.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + email.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if size > EMAIL_BYTES_MAX {
        return Err(ApiError::too_large(format!("{} is {size} bytes; EMAIL_BYTES_MAX is {EMAIL_BYTES_MAX}", field("text"))));
    }
    Ok(Email {
        id,
        class: email.class,
        from: email.from,
        to: email.to,
        subject: email.subject,
        text: email.text,
        html: email.html,
        reply_to: email.reply_to,
        headers: email.headers,
        metadata: email.metadata,
        accepted_at_ms: now_ms,
    })
}

/// A bare address `local@domain`.
pub fn check_address(field: &str, address: &str) -> Result<(), ApiError> {
    if address.len() > ADDRESS_BYTES_MAX {
        return Err(ApiError::bad_request(format!("{field} is {} bytes; ADDRESS_BYTES_MAX is {ADDRESS_BYTES_MAX}", address.len())));
    }
    lettre::Address::from_str(address).map(|_| ()).map_err(|e| ApiError::bad_request(format!("{field}: {address:?} is not an email address ({e})")))
}

/// An address with an optional display name (`Name <local@domain>`).
fn check_mailbox(field: &str, mailbox: &str) -> Result<(), ApiError> {
    if mailbox.len() > ADDRESS_BYTES_MAX + 200 {
        return Err(ApiError::bad_request(format!("{field} is {} bytes; at most {}", mailbox.len(), ADDRESS_BYTES_MAX + 200)));
    }
    lettre::message::Mailbox::from_str(mailbox).map(|_| ()).map_err(|e| ApiError::bad_request(format!("{field}: {mailbox:?} is not a mailbox ({e})")))
}

/// The domain of `address` (after the last `@`), lower case.
pub fn recipient_domain(address: &str) -> String {
    address.rsplit_once('@').map_or(address, |(_, domain)| domain).trim_end_matches('>').to_ascii_lowercase()
}

/// The suppression list's key for an address: lower case (mailbox providers treat local parts
/// case-insensitively, and so do the suppression lists of SendGrid and Postmark).
pub fn suppression_key(address: &str) -> String {
    address.trim().to_ascii_lowercase()
}

// ---------------------------------------------------------------------------------------------
// Events and status

/// What happened to an email. Each is one record on the events log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Accepted and durably queued.
    Queued,
    /// Not sent: the recipient is on the suppression list.
    Suppressed,
    /// The relay answered 4xx (or could not be reached); another attempt is scheduled.
    Deferred,
    /// The relay took it (2xx): handed off.
    Delivered,
    /// Refused for good (see `bounce`).
    Bounced,
    /// The recipient reported it as spam (feedback loop).
    Complained,
}

/// Why an email bounced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BounceKind {
    /// The address does not exist (5.1.x, 550/551/553): the address is suppressed.
    Hard,
    /// A lasting but not address-level failure (mailbox full 5.2.x, message too big 5.3.4), or
    /// every retry of a deferral used up: not suppressed.
    Soft,
    /// Refused by policy (5.7.x, 554: spam, reputation, authentication): not suppressed.
    Block,
}

/// An SMTP reply, as the relay gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SmtpReply {
    pub code: u16,
    /// `x.y.z` when the reply carries an enhanced status code (RFC 3463).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enhanced: Option<String>,
    pub message: String,
}

/// One event on the log: the email's whole current status, so that the latest event of an email
/// answers a status query by itself; `previous` links to the event before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: String,
    pub event: EventKind,
    pub class: Class,
    pub to: String,
    pub at_ms: u64,
    pub accepted_at_ms: u64,
    /// SMTP attempts made so far.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub smtp: Option<SmtpReply>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bounce: Option<BounceKind>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_attempt_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub metadata: BTreeMap<String, String>,
    /// Offset of this email's previous event on the log.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub previous: Option<u64>,
}

impl Event {
    /// The first event of an accepted email.
    pub fn first(email: &Email, event: EventKind, at_ms: u64) -> Event {
        Event {
            id: email.id.clone(),
            event,
            class: email.class,
            to: email.to.clone(),
            at_ms,
            accepted_at_ms: email.accepted_at_ms,
            attempts: 0,
            smtp: None,
            bounce: None,
            reason: if event == EventKind::Suppressed { Some("the recipient is on the suppression list".into()) } else { None },
            next_attempt_at_ms: None,
            metadata: email.metadata.clone(),
            previous: None,
        }
    }

    /// The event that follows `self` (stored at `self_offset`).
    pub fn next(&self, self_offset: u64, event: EventKind, at_ms: u64) -> Event {
        Event { event, at_ms, smtp: None, bounce: None, reason: None, next_attempt_at_ms: None, previous: Some(self_offset), ..self.clone() }
    }

    /// Whether nothing more will be attempted.
    pub fn is_final(&self) -> bool {
        matches!(self.event, EventKind::Suppressed | EventKind::Delivered | EventKind::Bounced | EventKind::Complained)
    }
}

/// An event as the API and webhooks show it: with its offset on the log (unique and ordered:
/// receivers deduplicate by it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub offset: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// `GET /v1/email/messages/{id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    pub id: String,
    /// The latest event.
    pub status: EventKind,
    pub class: Class,
    pub to: String,
    pub attempts: u32,
    pub accepted_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub smtp: Option<SmtpReply>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bounce: Option<BounceKind>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_attempt_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub metadata: BTreeMap<String, String>,
    /// Newest first, at most `EVENTS_LISTED_MAX`.
    pub events: Vec<EventView>,
}

pub fn status_view(latest: &Event, events: Vec<EventView>) -> StatusView {
    StatusView {
        id: latest.id.clone(),
        status: latest.event,
        class: latest.class,
        to: latest.to.clone(),
        attempts: latest.attempts,
        accepted_at_ms: latest.accepted_at_ms,
        updated_at_ms: latest.at_ms,
        smtp: latest.smtp.clone(),
        bounce: latest.bounce,
        reason: latest.reason.clone(),
        next_attempt_at_ms: latest.next_attempt_at_ms,
        metadata: latest.metadata.clone(),
        events,
    }
}

// ---------------------------------------------------------------------------------------------
// Classifying SMTP outcomes

/// What to do after an SMTP attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again later (4xx, or no answer).
    Defer,
    Bounce(BounceKind),
}

/// The enhanced status code (`x.y.z`, RFC 3463) a reply text starts with, if any.
pub fn enhanced_code(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?;
    let mut parts = first.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let ok = parts.next().is_none()
        && matches!(class, "2" | "4" | "5")
        && (1..=3).contains(&subject.len())
        && (1..=3).contains(&detail.len())
        && subject.bytes().chain(detail.bytes()).all(|b| b.is_ascii_digit());
    ok.then(|| first.to_string())
}

/// Classify a reply: 2xx delivered, 4xx deferred, 5xx a bounce whose kind follows the enhanced
/// code when there is one (5.1.x hard, 5.2.x and 5.3.4 soft, 5.7.x block), else the basic code
/// (550/551/553 hard, 552 soft, 554 block).
pub fn classify(code: u16, text: &str) -> Verdict {
    match code {
        200..=299 => Verdict::Delivered,
        400..=499 => Verdict::Defer,
        _ => {
            if let Some(enhanced) = enhanced_code(text)
                && enhanced.starts_with("5.")
            {
                let rest = &enhanced[2..];
                return Verdict::Bounce(if rest.starts_with("1.") {
                    BounceKind::Hard
                } else if rest.starts_with("2.") || rest == "3.4" {
                    BounceKind::Soft
                } else if rest.starts_with("7.") {
                    BounceKind::Block
                } else {
                    BounceKind::Hard
                });
            }
            Verdict::Bounce(match code {
                552 => BounceKind::Soft,
                554 => BounceKind::Block,
                _ => BounceKind::Hard,
            })
        }
    }
}

/// Delay before attempt `attempts + 1`, after `attempts` failed ones: `base * 2^(attempts-1)`,
/// capped.
pub fn retry_delay_ms(retry: &RetrySpec, attempts: u32) -> u64 {
    tributary_runtime::shaping::backoff_ms(retry.base_ms, retry.max_ms, attempts)
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// `PUT /v1/email/config` (every field optional; what is left out gets its default) and what
/// `GET` shows (secrets replaced by `"***"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Where mail is handed off. Until one is set, accepted mail waits in its queue.
    #[serde(default)]
    pub relay: Option<RelaySpec>,
    /// Where delivery events are POSTed (signed with HMAC-SHA256 when it has a secret).
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
    /// Rate of every recipient domain without an override.
    #[serde(default)]
    pub domain_rate: RateSpec,
    /// Per-domain overrides (`"gmail.com": {"rate_per_s": 50, "burst": 10}`).
    #[serde(default)]
    pub domains: BTreeMap<String, RateSpec>,
    #[serde(default)]
    pub retry: RetrySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    pub host: String,
    pub port: u16,
    /// `none` (plain SMTP, for a relay on a trusted network), `starttls` or `tls`.
    #[serde(default)]
    pub tls: RelayTls,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// SMTP connections kept open to the relay (the pool of every worker).
    #[serde(default = "relay_pool_max_default")]
    pub pool_max: u32,
    /// Longest one SMTP command may take.
    #[serde(default = "relay_timeout_ms_default")]
    pub timeout_ms: u64,
    /// Name given in EHLO; default `localhost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello_name: Option<String>,
}

fn relay_pool_max_default() -> u32 {
    RELAY_POOL_MAX_DEFAULT
}

fn relay_timeout_ms_default() -> u64 {
    RELAY_TIMEOUT_MS_DEFAULT
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RelayTls {
    #[default]
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// An `http://` URL.
    pub url: String,
    /// Signs every POST (`X-Tributary-Signature: t=<ms>,v1=<hex HMAC-SHA256(secret, "t.body")>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateSpec {
    pub rate_per_s: f64,
    pub burst: u32,
}

impl Default for RateSpec {
    fn default() -> Self {
        RateSpec { rate_per_s: DOMAIN_RATE_PER_S_DEFAULT, burst: DOMAIN_BURST_DEFAULT }
    }
}

impl RateSpec {
    pub fn rate(&self) -> Rate {
        Rate::new(self.rate_per_s, self.burst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts after the first before a deferred email bounces (soft).
    pub attempts: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        RetrySpec { attempts: RETRY_ATTEMPTS_DEFAULT, base_ms: RETRY_BASE_MS_DEFAULT, max_ms: RETRY_MAX_MS_DEFAULT }
    }
}

impl EmailConfig {
    /// The rate of recipient domain `domain`.
    pub fn rate_of(&self, domain: &str) -> Rate {
        self.domains.get(domain).unwrap_or(&self.domain_rate).rate()
    }

    /// Check a configuration; domain keys are lower-cased.
    pub fn validated(mut self) -> Result<EmailConfig, ApiError> {
        if let Some(relay) = &self.relay {
            if relay.host.is_empty() || relay.host.len() > 253 {
                return Err(ApiError::bad_request("relay.host must be 1 to 253 bytes"));
            }
            if relay.port == 0 {
                return Err(ApiError::bad_request("relay.port must be 1 to 65535"));
            }
            if !(1..=RELAY_POOL_MAX_MAX).contains(&relay.pool_max) {
                return Err(ApiError::bad_request(format!("relay.pool_max must be 1 to RELAY_POOL_MAX_MAX ({RELAY_POOL_MAX_MAX}), got {}", relay.pool_max)));
            }
            if !(100..=600_000).contains(&relay.timeout_ms) {
                return Err(ApiError::bad_request(format!("relay.timeout_ms must be 100 to 600000, got {}", relay.timeout_ms)));
            }
            if relay.username.is_some() != relay.password.is_some() {
                return Err(ApiError::bad_request("relay.username and relay.password go together"));
            }
        }
        if let Some(webhook) = &self.webhook {
            tributary_server::webhook::check_endpoint("webhook.url", &webhook.url).map_err(ApiError::bad_request)?;
            if let Some(secret) = &webhook.secret
                && (secret.is_empty() || secret.len() > tributary_server::webhook::WEBHOOK_SECRET_BYTES_MAX)
            {
                return Err(ApiError::bad_request(format!("webhook.secret must be 1 to WEBHOOK_SECRET_BYTES_MAX ({}) bytes", tributary_server::webhook::WEBHOOK_SECRET_BYTES_MAX)));
            }
        }
        check_rate("domain_rate", &self.domain_rate)?;
        if self.domains.len() > DOMAIN_OVERRIDES_MAX {
            return Err(ApiError::too_large(format!("domains holds {} entries; DOMAIN_OVERRIDES_MAX is {DOMAIN_OVERRIDES_MAX}", self.domains.len())));
        }
        for (domain, rate) in &self.domains {
            check_rate(&format!("domains.{domain}"), rate)?;
        }
        self.domains = self.domains.into_iter().map(|(domain, rate)| (domain.to_ascii_lowercase(), rate)).collect();
        let retry = &self.retry;
        if retry.attempts > RETRY_ATTEMPTS_MAX {
            return Err(ApiError::bad_request(format!("retry.attempts must be at most RETRY_ATTEMPTS_MAX ({RETRY_ATTEMPTS_MAX}), got {}", retry.attempts)));
        }
        if retry.base_ms == 0 || retry.base_ms > retry.max_ms || retry.max_ms > tributary_core::limits::QUEUE_DELAY_MS_MAX {
            return Err(ApiError::bad_request("retry.base_ms must be at least 1 and at most retry.max_ms, itself at most QUEUE_DELAY_MS_MAX"));
        }
        Ok(self)
    }

    /// The configuration as `GET` shows it: secrets masked.
    pub fn redacted(&self) -> EmailConfig {
        let mut shown = self.clone();
        if let Some(relay) = &mut shown.relay
            && relay.password.is_some()
        {
            relay.password = Some("***".into());
        }
        if let Some(webhook) = &mut shown.webhook
            && webhook.secret.is_some()
        {
            webhook.secret = Some("***".into());
        }
        shown
    }
}

fn check_rate(field: &str, rate: &RateSpec) -> Result<(), ApiError> {
    if !(rate.rate_per_s > 0.0 && rate.rate_per_s <= 1_000_000.0) || rate.burst == 0 || rate.burst > 1_000_000 {
        return Err(ApiError::bad_request(format!("{field}: rate_per_s must be above 0 and at most 1000000, burst 1 to 1000000")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Suppressions and complaints

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    HardBounce,
    Complaint,
    Manual,
}

impl SuppressionReason {
    /// As stored in the status DB's `reason` column (the JSON name).
    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::HardBounce => "hard_bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Manual => "manual",
        }
    }

    pub fn parse(stored: &str) -> Option<SuppressionReason> {
        [SuppressionReason::HardBounce, SuppressionReason::Complaint, SuppressionReason::Manual].into_iter().find(|r| r.as_str() == stored)
    }
}

/// One entry of the suppression list (a row of the status DB's `email_suppressions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Suppression {
    pub address: String,
    pub reason: SuppressionReason,
    pub at_ms: u64,
    /// The email whose bounce or complaint caused it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
}

/// `PUT /v1/email/suppressions/{address}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuppressRequest {
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct SuppressionsQuery {
    /// List addresses after this one (the last of the previous page).
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many (default and maximum `SUPPRESSIONS_PAGE_MAX`).
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SuppressionPage {
    pub suppressions: Vec<Suppression>,
    pub total: usize,
}

/// `POST /v1/email/complaints`: feedback-loop reports (ARF), parsed by the caller.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ComplaintsRequest {
    pub complaints: Vec<Complaint>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Complaint {
    /// The complaining recipient.
    pub address: String,
    /// The email complained about, when known: it gets a `complained` event.
    #[serde(default)]
    pub message_id: Option<String>,
    /// ARF `Feedback-Type` (`abuse`, `fraud`, …).
    #[serde(default)]
    pub feedback_type: Option<String>,
}

pub fn check_complaints(request: &ComplaintsRequest) -> Result<(), ApiError> {
    if request.complaints.is_empty() {
        return Err(ApiError::bad_request("complaints must hold at least one complaint"));
    }
    if request.complaints.len() > COMPLAINTS_PER_REQUEST_MAX {
        return Err(ApiError::too_large(format!("complaints holds {}; COMPLAINTS_PER_REQUEST_MAX is {COMPLAINTS_PER_REQUEST_MAX}", request.complaints.len())));
    }
    for (i, complaint) in request.complaints.iter().enumerate() {
        check_address(&format!("complaints[{i}].address"), &complaint.address)?;
        if complaint.feedback_type.as_ref().is_some_and(|t| t.len() > 64) {
            return Err(ApiError::bad_request(format!("complaints[{i}].feedback_type is longer than 64 bytes")));
        }
    }
    Ok(())
}

/// `POST /v1/email/webhook/replay`: send events again from an offset of the events log.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    pub from_offset: u64,
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn replies_are_classified_by_their_enhanced_code_first() {
        assert_eq!(classify(250, "2.0.0 OK queued"), Verdict::Delivered);
        assert_eq!(classify(451, "4.3.0 try again later"), Verdict::Defer);
        assert_eq!(classify(421, "service not available"), Verdict::Defer);
        assert_eq!(classify(550, "5.1.1 <x@example.com>: user unknown"), Verdict::Bounce(BounceKind::Hard));
        assert_eq!(classify(550, "5.7.1 message rejected as spam"), Verdict::Bounce(BounceKind::Block));
        assert_eq!(classify(552, "5.2.2 mailbox full"), Verdict::Bounce(BounceKind::Soft));
        assert_eq!(classify(550, "5.2.2 mailbox full"), Verdict::Bounce(BounceKind::Soft));
        assert_eq!(classify(552, "5.3.4 message too big"), Verdict::Bounce(BounceKind::Soft));
        assert_eq!(classify(550, "no such user"), Verdict::Bounce(BounceKind::Hard));
        assert_eq!(classify(554, "transaction failed"), Verdict::Bounce(BounceKind::Block));
        assert_eq!(classify(552, "too much mail"), Verdict::Bounce(BounceKind::Soft));
    }

    #[test]
    fn enhanced_codes_are_recognised_only_in_their_shape() {
        assert_eq!(enhanced_code("5.1.1 user unknown").as_deref(), Some("5.1.1"));
        assert_eq!(enhanced_code("4.7.0 greylisted").as_deref(), Some("4.7.0"));
        assert_eq!(enhanced_code("user 5.1.1 unknown"), None);
        assert_eq!(enhanced_code("1.2.3 no"), None);
        assert_eq!(enhanced_code("5.1 short"), None);
        assert_eq!(enhanced_code(""), None);
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let retry = RetrySpec { attempts: 3, base_ms: 1_000, max_ms: 5_000 };
        assert_eq!((1..=5).map(|a| retry_delay_ms(&retry, a)).collect::<Vec<_>>(), vec![1_000, 2_000, 4_000, 5_000, 5_000]);
    }

    #[test]
    fn the_rate_key_is_the_lower_case_recipient_domain() {
        assert_eq!(recipient_domain("Ann@Example.COM"), "example.com");
        assert_eq!(suppression_key(" Ann@Example.com "), "ann@example.com");
    }

    fn outgoing() -> OutgoingEmail {
        OutgoingEmail {
            class: Class::Transactional,
            from: "Shop <shop@example.com>".into(),
            to: "ann@example.org".into(),
            subject: "Your order".into(),
            text: Some("Thanks".into()),
            html: None,
            reply_to: None,
            headers: BTreeMap::new(),
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn accept_refuses_what_would_make_a_broken_or_injected_message() {
        assert!(accept(0, outgoing(), "x".into(), 1).is_ok());
        let refused = |email: OutgoingEmail| accept(3, email, "x".into(), 1).unwrap_err().message;
        assert!(refused(OutgoingEmail { to: "not an address".into(), ..outgoing() }).contains("messages[3].to"));
        assert!(refused(OutgoingEmail { subject: "a\r\nBcc: victim@example.com".into(), ..outgoing() }).contains("one line"));
        assert!(refused(OutgoingEmail { text: None, ..outgoing() }).contains("text or an html"));
        let headers = BTreeMap::from([("Bcc".to_string(), "x@example.com".to_string())]);
        assert!(refused(OutgoingEmail { headers, ..outgoing() }).contains("set by the system"));
        let headers = BTreeMap::from([("X-Tag".to_string(), "a\nb".to_string())]);
        assert!(refused(OutgoingEmail { headers, ..outgoing() }).contains("one line"));
        let error = accept(0, OutgoingEmail { text: Some("x".repeat(EMAIL_BYTES_MAX + 1)), ..outgoing() }, "x".into(), 1).unwrap_err();
        assert_eq!(error.status, 413);
        assert!(error.message.contains("EMAIL_BYTES_MAX"));
    }

    #[test]
    fn a_configuration_is_checked_and_its_secrets_are_masked() {
        let config: EmailConfig = serde_json::from_value(serde_json::json!({
            "relay": {"host": "127.0.0.1", "port": 2525, "username": "u", "password": "p"},
            "webhook": {"url": "http://127.0.0.1:1/hook", "secret": "s"},
            "domains": {"Example.COM": {"rate_per_s": 2.0, "burst": 1}},
        }))
        .unwrap();
        let config = config.validated().unwrap();
        assert_eq!(config.rate_of("example.com"), Rate::new(2.0, 1));
        assert_eq!(config.rate_of("other.org"), Rate::new(DOMAIN_RATE_PER_S_DEFAULT, DOMAIN_BURST_DEFAULT));
        let shown = config.redacted();
        assert_eq!(shown.relay.unwrap().password.as_deref(), Some("***"));
        assert_eq!(shown.webhook.unwrap().secret.as_deref(), Some("***"));
        let bad = EmailConfig { retry: RetrySpec { attempts: 3, base_ms: 10, max_ms: 5 }, ..EmailConfig::default() };
        assert!(bad.validated().unwrap_err().message.contains("retry.base_ms"));
    }
}
