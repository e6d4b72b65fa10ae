//! API tokens. Bound to loopback the server needs none; bound to any other address it refuses
//! to start without them. A token is scoped to systems (`*` for all); it is presented as
//! `Authorization: Bearer <token>`, or as `?access_token=<token>` where a browser cannot set
//! headers (EventSource, WebSocket, the dashboard).
//!
//! Behind the tokens, a caller names the user it acts for ([`named_user`]: `?user=` or the
//! `Tributary-User` header); there are no per-user signed identities, so the caller vouches for it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The header naming the user a request acts for, where a query parameter is not wanted.
pub const USER_HEADER: &str = "tributary-user";

/// The user a request names: `?user=` first, else the `Tributary-User` header; a clear 400 when
/// neither is there, naming the user by its `role` ("calling", "connecting"). The system checks
/// the id's form itself.
pub fn named_user(query_user: Option<&str>, headers: &axum::http::HeaderMap, role: &str) -> Result<String, ApiError> {
    match (query_user, headers.get(USER_HEADER)) {
        (Some(user), _) => Ok(user.to_string()),
        (None, Some(value)) => Ok(value.to_str().map_err(|_| ApiError::bad_request("the Tributary-User header is not text"))?.to_string()),
        (None, None) => Err(ApiError::bad_request(format!("name the {role} user: ?user=<id> or the Tributary-User header"))),
    }
}

/// Shortest token accepted: a guessable token is no protection.
pub const TOKEN_BYTES_MIN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub token: String,
    /// System ids this token may use; `*` for every system.
    pub scopes: Vec<String>,
}

impl ApiToken {
    /// Parse `TOKEN` (all systems) or `TOKEN:system-a,system-b`.
    pub fn parse(text: &str) -> Result<ApiToken, String> {
        let (token, scopes) = match text.split_once(':') {
            Some((token, scopes)) => (token, scopes.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()),
            None => (text, vec!["*".to_string()]),
        };
        if token.len() < TOKEN_BYTES_MIN || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(format!("an API token must be at least TOKEN_BYTES_MIN ({TOKEN_BYTES_MIN}) printable ASCII characters"));
        }
        if scopes.is_empty() {
            return Err(format!("token {}…: name at least one system after ':' or use '*'", &token[..4]));
        }
        Ok(ApiToken { token: token.to_string(), scopes })
    }

    fn allows(&self, system: Option<&str>) -> bool {
        self.scopes.iter().any(|s| s == "*" || Some(s.as_str()) == system)
    }
}

/// Refuse to listen beyond loopback without tokens.
pub fn check_exposure(listen: SocketAddr, tokens: &[ApiToken]) -> Result<(), String> {
    if !listen.ip().is_loopback() && tokens.is_empty() {
        return Err(format!(
            "refusing to listen on {listen} without API tokens: anyone who can reach it could read and write every system. \
             Give --token (or TRIBUTARY_TOKENS), or listen on 127.0.0.1"
        ));
    }
    Ok(())
}

/// Which system a path belongs to: `(path prefix, system id)` pairs.
#[derive(Clone, Default)]
pub struct Scopes {
    pub tokens: Vec<ApiToken>,
    pub prefixes: Vec<(String, String)>,
}

impl Scopes {
    /// The system whose prefix covers `path` whole segments at a time (`/v1/queue` covers
    /// `/v1/queue/x`, not `/v1/queue-admin/x`); the longest such prefix wins.
    fn system_of(&self, path: &str) -> Option<&str> {
        self.prefixes
            .iter()
            .filter(|(prefix, _)| {
                path.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'))
            })
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, id)| id.as_str())
    }
}

fn presented(request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    request.uri().query()?.split('&').find_map(|pair| pair.strip_prefix("access_token=").map(String::from))
}

pub async fn require_token(State(scopes): State<Arc<Scopes>>, request: Request, next: Next) -> Response {
    if scopes.tokens.is_empty() || request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let Some(given) = presented(&request) else {
        return ApiError::unauthorized("this server requires an API token: send Authorization: Bearer <token>").into_response();
    };
    let Some(token) = scopes.tokens.iter().find(|t| constant_time_eq(t.token.as_bytes(), given.as_bytes())) else {
        return ApiError::unauthorized("unknown API token").into_response();
    };
    let system = scopes.system_of(request.uri().path());
    if request.uri().path().starts_with("/v1/") && !token.allows(system) {
        let what = system.unwrap_or("this route");
        return ApiError::forbidden(format!("this token is not scoped for {what}")).into_response();
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_and_without_scopes() {
        let t = ApiToken::parse("0123456789abcdef:basic-message-queue,simple-pubsub").unwrap();
        assert_eq!(t.scopes, vec!["basic-message-queue", "simple-pubsub"]);
        assert!(t.allows(Some("simple-pubsub")));
        assert!(!t.allows(Some("other")));
        assert_eq!(ApiToken::parse("0123456789abcdef").unwrap().scopes, vec!["*"]);
        assert!(ApiToken::parse("short").is_err());
    }

    #[test]
    fn a_prefix_covers_whole_segments_and_the_longest_wins() {
        let pairs = [("/v1/queue", "queue"), ("/v1/queue/admin", "admin"), ("/v1/pubsub/", "pubsub")];
        let scopes = Scopes { tokens: Vec::new(), prefixes: pairs.iter().map(|(p, id)| (p.to_string(), id.to_string())).collect() };
        assert_eq!(scopes.system_of("/v1/queue"), Some("queue"));
        assert_eq!(scopes.system_of("/v1/queue/jobs"), Some("queue"));
        assert_eq!(scopes.system_of("/v1/queue-groups/jobs"), None);
        assert_eq!(scopes.system_of("/v1/queue/admin/x"), Some("admin"));
        assert_eq!(scopes.system_of("/v1/pubsub/topics"), Some("pubsub"));
        assert_eq!(scopes.system_of("/v1/pubsubx"), None);
    }

    #[test]
    fn listening_beyond_loopback_needs_tokens() {
        assert!(check_exposure("127.0.0.1:7400".parse().unwrap(), &[]).is_ok());
        assert!(check_exposure("0.0.0.0:7400".parse().unwrap(), &[]).is_err());
        let token = ApiToken::parse("0123456789abcdef").unwrap();
        assert!(check_exposure("0.0.0.0:7400".parse().unwrap(), &[token]).is_ok());
    }
}
