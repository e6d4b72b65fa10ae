//! Outgoing HTTP calls that systems make to their users' endpoints: webhooks (delivery status,
//! events) signed with HMAC-SHA256, and the backoff between their retries.
//!
//! A signed POST carries `X-Tributary-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>` (the scheme Stripe and Svix use: the timestamp is signed too, so a receiver
//! can refuse replays older than its tolerance). [`verify_signature`] is the receiver's side.
//!
//! Not here: the retry loop itself (callers own their cursor: a webhook consumer retries the same
//! batch until it is taken, then commits its offset), and TLS: the workspace builds reqwest
//! without a TLS stack, so endpoints are `http://` ([`check_endpoint`] refuses others with a
//! clear error instead of failing at the first call).

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-tributary-signature";
/// Longest a webhook endpoint may take to answer one POST.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest endpoint URL, in bytes.
pub const WEBHOOK_URL_BYTES_MAX: usize = 2_048;
/// Longest signing secret, in bytes.
pub const WEBHOOK_SECRET_BYTES_MAX: usize = 256;
/// First retry delay after a failed POST; doubles per failure up to [`WEBHOOK_RETRY_MAX`].
pub const WEBHOOK_RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay between two retries of one POST.
pub const WEBHOOK_RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a POST was not taken.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("POST {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
}

/// `Ok` if `url` is an endpoint we can call.
pub fn check_endpoint(field: &str, url: &str) -> Result<(), String> {
    if url.len() > WEBHOOK_URL_BYTES_MAX {
        return Err(format!("{field} is {} bytes; WEBHOOK_URL_BYTES_MAX is {WEBHOOK_URL_BYTES_MAX}", url.len()));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{field} {url:?} is not a URL: {e}"))?;
    if parsed.scheme() != "http" {
        return Err(format!("{field} must be an http:// URL (this build has no TLS client), got {url:?}"));
    }
    if parsed.host_str().is_none() {
        return Err(format!("{field} {url:?} names no host"));
    }
    Ok(())
}

/// The signature header's value for `body` sent at `timestamp_ms`.
pub fn sign(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(body.len() + 21);
    message.extend_from_slice(timestamp_ms.to_string().as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    format!("t={timestamp_ms},v1={}", hmac_sha256_hex(secret, &message))
}

/// HMAC-SHA256 of `message` under `secret`, in lower-case hex.
pub fn hmac_sha256_hex(secret: &[u8], message: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The receiver's check: the header is well formed, signed with `secret` over `body`, and its
/// timestamp is within `tolerance_ms` of `now_ms`. Compares in constant time.
pub fn verify_signature(secret: &[u8], header: &str, body: &[u8], now_ms: u64, tolerance_ms: u64) -> bool {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<u64>().ok(),
            Some(("v1", value)) => signature = Some(value),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else { return false };
    if timestamp.abs_diff(now_ms) > tolerance_ms {
        return false;
    }
    let expected = sign(secret, timestamp, body);
    let expected = expected.rsplit_once("v1=").map(|(_, hex)| hex).unwrap_or_default();
    expected.len() == signature.len() && expected.bytes().zip(signature.bytes()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

/// The delay before retry number `failures` (1 after the first failure): doubling from
/// [`WEBHOOK_RETRY_BASE`], capped at [`WEBHOOK_RETRY_MAX`].
pub fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    (WEBHOOK_RETRY_BASE * factor).min(WEBHOOK_RETRY_MAX)
}

/// POST `body` (JSON) to `url`, signed with `secret` when there is one. `Ok(status)` on a 2xx.
pub async fn post_json(client: &reqwest::Client, url: &str, secret: Option<&[u8]>, body: Vec<u8>) -> Result<u16, WebhookError> {
    post_json_within(client, url, secret, body, WEBHOOK_TIMEOUT).await
}

/// [`post_json`] with its own limit on how long the endpoint may take (providers that must answer
/// fast, so that a slow one is failed over).
pub async fn post_json_within(client: &reqwest::Client, url: &str, secret: Option<&[u8]>, body: Vec<u8>, timeout: Duration) -> Result<u16, WebhookError> {
    let mut request = client.post(url).timeout(timeout).header("content-type", "application/json");
    if let Some(secret) = secret {
        let now_ms = tributary_core::now_ms().max(0) as u64;
        request = request.header(SIGNATURE_HEADER, sign(secret, now_ms, &body));
    }
    let response = request.body(body).send().await.map_err(|source| WebhookError::Transport { url: url.to_string(), source })?;
    let status = response.status().as_u16();
    if response.status().is_success() {
        Ok(status)
    } else {
        Err(WebhookError::Status { url: url.to_string(), status })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_secret_body_and_time() {
        let header = sign(b"s3cret", 1_700_000_000_000, b"[{\"a\":1}]");
        assert!(header.starts_with("t=1700000000000,v1="));
        assert!(verify_signature(b"s3cret", &header, b"[{\"a\":1}]", 1_700_000_000_500, 5_000));
        assert!(!verify_signature(b"other", &header, b"[{\"a\":1}]", 1_700_000_000_500, 5_000));
        assert!(!verify_signature(b"s3cret", &header, b"[{\"a\":2}]", 1_700_000_000_500, 5_000));
        assert!(!verify_signature(b"s3cret", &header, b"[{\"a\":1}]", 1_700_000_060_000, 5_000));
        assert!(!verify_signature(b"s3cret", "v1=00", b"", 0, 5_000));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231, test case 2.
        assert_eq!(hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_eq!(sign(b"Jefe", 42, b"{}"), format!("t=42,v1={}", hmac_sha256_hex(b"Jefe", b"42.{}")));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        assert_eq!(retry_delay(1), WEBHOOK_RETRY_BASE);
        assert_eq!(retry_delay(2), WEBHOOK_RETRY_BASE * 2);
        assert_eq!(retry_delay(100), WEBHOOK_RETRY_MAX);
    }

    #[test]
    fn only_http_endpoints_are_accepted() {
        assert!(check_endpoint("url", "http://127.0.0.1:9/hook").is_ok());
        assert!(check_endpoint("url", "https://example.com/hook").unwrap_err().contains("http://"));
        assert!(check_endpoint("url", "not a url").is_err());
    }
}
