//! The routes of email-queue-system: each handler checks its request with `process`, calls the
//! system (whose backends are the context's queues, log and status DB), counts errors, and
//! answers JSON. The sending
//! itself happens in the workers of `mod.rs`, never in a request.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_server::utoipa::{self, IntoParams};
use tributary_server::utoipa_axum::router::OpenApiRouter;
use tributary_server::utoipa_axum::routes;
use tributary_server::{ApiError, Json};

use super::process::{self, ComplaintsRequest, EmailConfig, ReplayRequest, SendRequest, SendResponse, StatusView, SuppressRequest, Suppression, SuppressionPage, SuppressionReason, SuppressionsQuery};
use super::{EmailSystem, ID};

type Email = State<Arc<EmailSystem>>;

/// Events one page of `GET /v1/email/events` lists at most (and by default).
pub const EVENTS_PAGE_MAX: usize = 1_000;

pub fn router(system: Arc<EmailSystem>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(overview))
        .routes(routes!(send))
        .routes(routes!(message_status))
        .routes(routes!(events))
        .routes(routes!(get_config, put_config))
        .routes(routes!(list_suppressions))
        .routes(routes!(get_suppression, put_suppression, delete_suppression))
        .routes(routes!(complaints))
        .routes(routes!(replay))
        .with_state(system)
}

/// Count what a handler answered: an error is an error of the system.
fn counted<T>(system: &EmailSystem, result: Result<T, ApiError>) -> Result<T, ApiError> {
    if result.is_err() {
        system.metrics.error();
    }
    result
}

/// Queue depths, counters, the events log and the webhook's position.
#[utoipa::path(get, path = "/v1/email", tag = ID, responses((status = 200, description = "the system's figures")))]
async fn overview(State(system): Email) -> axum::Json<Value> {
    axum::Json(system.overview().await)
}

/// Queue emails; answered 202 once each is in its queue and its first event is on the log.
#[utoipa::path(post, path = "/v1/email/messages", tag = ID,
    request_body = SendRequest,
    responses((status = 202, body = SendResponse), (status = 400, description = "bad input, naming the field"), (status = 413, description = "over a named limit"),
        (status = 503, description = "a backend (queues, log, status DB) is unavailable")))]
async fn send(State(system): Email, body: Result<Json<SendRequest>, ApiError>) -> Result<(StatusCode, axum::Json<SendResponse>), ApiError> {
    let result = async { Ok((StatusCode::ACCEPTED, axum::Json(system.send(body?.0).await?))) }.await;
    counted(&system, result)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::bad_request(format!("{id:?} is not an email id")));
    }
    Ok(())
}

/// The status of one email, with its events newest first.
#[utoipa::path(get, path = "/v1/email/messages/{id}", tag = ID,
    params(("id" = String, Path, description = "the id the send answered")),
    responses((status = 200, body = StatusView), (status = 404, description = "unknown, or older than the events' retention")))]
async fn message_status(State(system): Email, Path(id): Path<String>) -> Result<axum::Json<StatusView>, ApiError> {
    let result = async {
        check_id(&id)?;
        match system.email_status(&id).await? {
            Some(view) => Ok(axum::Json(view)),
            None => Err(ApiError::not_found(format!("email {id:?} not found (unknown, or older than the events' retention of 7 days)"))),
        }
    }
    .await;
    counted(&system, result)
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventsQuery {
    /// First offset to list (default: the oldest held).
    #[serde(default)]
    pub from_offset: Option<u64>,
    /// At most this many (default and maximum `EVENTS_PAGE_MAX`).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Page through the events log in order; `next_offset` continues.
#[utoipa::path(get, path = "/v1/email/events", tag = ID, params(EventsQuery),
    responses((status = 200, description = "`{\"events\":[…],\"next_offset\":n}`"), (status = 400, description = "bad query")))]
async fn events(State(system): Email, query: Result<Query<EventsQuery>, QueryRejection>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = query.limit.unwrap_or(EVENTS_PAGE_MAX);
        if limit == 0 || limit > EVENTS_PAGE_MAX {
            return Err(ApiError::bad_request(format!("limit must be 1 to EVENTS_PAGE_MAX ({EVENTS_PAGE_MAX}), got {limit}")));
        }
        let (events, next) = system.events_page(query.from_offset.unwrap_or(0), limit).await?;
        Ok(axum::Json(json!({"events": events, "next_offset": next})))
    }
    .await;
    counted(&system, result)
}

/// The configuration (secrets shown as `***`).
#[utoipa::path(get, path = "/v1/email/config", tag = ID, responses((status = 200, body = EmailConfig)))]
async fn get_config(State(system): Email) -> axum::Json<EmailConfig> {
    axum::Json(system.config().redacted())
}

/// Replace the configuration: relay, webhook, per-domain rates, retry policy. Durable before
/// the answer; workers use it from their next batch.
#[utoipa::path(put, path = "/v1/email/config", tag = ID, request_body = EmailConfig,
    responses((status = 200, body = EmailConfig), (status = 400, description = "bad configuration, naming the field")))]
async fn put_config(State(system): Email, body: Result<Json<EmailConfig>, ApiError>) -> Result<axum::Json<EmailConfig>, ApiError> {
    let result = async {
        let config = body?.0.validated()?;
        system.set_config(config).await?;
        Ok(axum::Json(system.config().redacted()))
    }
    .await;
    counted(&system, result)
}

/// The suppression list, by address.
#[utoipa::path(get, path = "/v1/email/suppressions", tag = ID, params(SuppressionsQuery),
    responses((status = 200, body = SuppressionPage), (status = 400, description = "bad query")))]
async fn list_suppressions(State(system): Email, query: Result<Query<SuppressionsQuery>, QueryRejection>) -> Result<axum::Json<SuppressionPage>, ApiError> {
    let result = async {
        let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = query.limit.unwrap_or(process::SUPPRESSIONS_PAGE_MAX);
        if limit == 0 || limit > process::SUPPRESSIONS_PAGE_MAX {
            return Err(ApiError::bad_request(format!("limit must be 1 to SUPPRESSIONS_PAGE_MAX ({}), got {limit}", process::SUPPRESSIONS_PAGE_MAX)));
        }
        let after = query.after.map(|a| process::suppression_key(&a));
        Ok(axum::Json(system.suppressions_page(after.as_deref(), limit).await?))
    }
    .await;
    counted(&system, result)
}

/// One address's entry.
#[utoipa::path(get, path = "/v1/email/suppressions/{address}", tag = ID, params(("address" = String, Path)),
    responses((status = 200, body = Suppression), (status = 404, description = "not suppressed")))]
async fn get_suppression(State(system): Email, Path(address): Path<String>) -> Result<axum::Json<Suppression>, ApiError> {
    let result = match system.suppression(&address).await {
        Ok(Some(entry)) => Ok(axum::Json(entry)),
        Ok(None) => Err(ApiError::not_found(format!("{address:?} is not on the suppression list"))),
        Err(error) => Err(error),
    };
    counted(&system, result)
}

/// Suppress an address by hand (reason `manual`); the body is `{}` or `{"detail":"…"}`.
#[utoipa::path(put, path = "/v1/email/suppressions/{address}", tag = ID, params(("address" = String, Path)), request_body = SuppressRequest,
    responses((status = 200, body = Suppression), (status = 400, description = "not an address")))]
async fn put_suppression(State(system): Email, Path(address): Path<String>, body: Result<Json<SuppressRequest>, ApiError>) -> Result<axum::Json<Suppression>, ApiError> {
    let result = async {
        process::check_address("address", &address)?;
        let detail = body?.0.detail;
        if detail.as_ref().is_some_and(|d| d.len() > 1_024) {
            return Err(ApiError::bad_request("detail is longer than 1024 bytes"));
        }
        let entry = Suppression { address: process::suppression_key(&address), reason: SuppressionReason::Manual, at_ms: tributary_core::now_ms().max(0) as u64, message_id: None, detail };
        system.suppress(vec![entry.clone()], true).await?;
        Ok(axum::Json(entry))
    }
    .await;
    counted(&system, result)
}

/// Take an address off the list: mail to it is sent again.
#[utoipa::path(delete, path = "/v1/email/suppressions/{address}", tag = ID, params(("address" = String, Path)),
    responses((status = 204, description = "removed"), (status = 404, description = "not suppressed")))]
async fn delete_suppression(State(system): Email, Path(address): Path<String>) -> Result<StatusCode, ApiError> {
    let result = async {
        if system.unsuppress(&address).await? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::not_found(format!("{address:?} is not on the suppression list")))
        }
    }
    .await;
    counted(&system, result)
}

/// Feedback-loop complaints: each address is suppressed; a named email gets a `complained` event
/// (and a webhook call).
#[utoipa::path(post, path = "/v1/email/complaints", tag = ID, request_body = ComplaintsRequest,
    responses((status = 200, description = "`{\"suppressed\":n,\"events\":m}`"), (status = 400, description = "bad input")))]
async fn complaints(State(system): Email, body: Result<Json<ComplaintsRequest>, ApiError>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        let request = body?.0;
        process::check_complaints(&request)?;
        let (suppressed, events) = system.complain(request.complaints).await?;
        Ok(axum::Json(json!({"suppressed": suppressed, "events": events})))
    }
    .await;
    counted(&system, result)
}

/// POST the events again, from `from_offset` on (clamped to what the log holds).
#[utoipa::path(post, path = "/v1/email/webhook/replay", tag = ID, request_body = ReplayRequest,
    responses((status = 200, description = "`{\"from_offset\":n}`"), (status = 409, description = "no webhook configured")))]
async fn replay(State(system): Email, body: Result<Json<ReplayRequest>, ApiError>) -> Result<axum::Json<Value>, ApiError> {
    let result = async {
        let from = body?.0.from_offset;
        let from = system.replay(from).await?;
        Ok(axum::Json(json!({"from_offset": from})))
    }
    .await;
    counted(&system, result)
}
