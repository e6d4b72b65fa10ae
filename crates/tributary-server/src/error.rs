//! Every error the HTTP API returns, and the one place engine errors become HTTP statuses.
//!
//! The body is always `{"error":{"code":"…","message":"…"}}`. `code` is stable and meant for
//! programs; `message` is for people and may change.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tributary_engine::StreamError;
use tributary_engine::cache::CacheError;
use tributary_engine::queue::QueueError;
use tributary_log::LogError;
use tributary_sql::{DbError, sqlx};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, sent as `Retry-After` on 429 and 503.
    pub retry_after_s: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after_s: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn overloaded(message: impl Into<String>, retry_after_s: u64) -> ApiError {
        ApiError { retry_after_s: Some(retry_after_s), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message) }
    }

    pub fn rate_limited(message: impl Into<String>, retry_after_s: u64) -> ApiError {
        ApiError { retry_after_s: Some(retry_after_s), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message) }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_string(), message: self.message } };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<LogError> for ApiError {
    fn from(error: LogError) -> ApiError {
        let message = error.to_string();
        match error {
            LogError::Limit(_) => ApiError::too_large(message),
            LogError::OffsetOutOfRange { .. } => ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "offset_out_of_range", message),
            LogError::OutOfOrderSequence { .. } => ApiError::new(StatusCode::CONFLICT, "out_of_order_sequence", message),
            LogError::EndMoved { .. } => ApiError::new(StatusCode::CONFLICT, "end_moved", message),
            LogError::Corrupt { .. } | LogError::Fenced(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "partition_fenced", message),
            LogError::Config(_) => ApiError::bad_request(message),
            LogError::Locked(_) | LogError::Io { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", message),
        }
    }
}

impl From<StreamError> for ApiError {
    fn from(error: StreamError) -> ApiError {
        let message = error.to_string();
        match error {
            StreamError::TopicNotFound(_) | StreamError::PartitionNotFound { .. } => ApiError::not_found(message),
            StreamError::TopicExists { .. } => ApiError::conflict(message),
            StreamError::Invalid(_) => ApiError::bad_request(message),
            StreamError::TooLarge(_) => ApiError::too_large(message),
            StreamError::UnknownMember { .. } | StreamError::StaleGeneration { .. } | StreamError::NotAssigned { .. } => {
                ApiError::new(StatusCode::CONFLICT, "rebalance", message)
            }
            StreamError::EndMoved { .. } => ApiError::new(StatusCode::CONFLICT, "end_moved", message),
            StreamError::Partition { source, .. } | StreamError::Log(source) => ApiError { message, ..ApiError::from(source) },
            StreamError::Io { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", message),
            StreamError::Backend { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", message),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> ApiError {
        let message = error.to_string();
        match error {
            QueueError::NotFound { .. } | QueueError::Deleted(_) => ApiError::not_found(message),
            QueueError::AlreadyExists { .. } => ApiError::conflict(message),
            QueueError::InvalidName(_) | QueueError::InvalidConfig(_) | QueueError::InvalidMessage(_) => ApiError::bad_request(message),
            // Holding the in-flight limit is not a bad request: ack or nack, then ask again.
            QueueError::LimitExceeded { limit: "in_flight_per_consumer_max", .. } => ApiError::rate_limited(message, 1),
            QueueError::LimitExceeded { .. } => ApiError::too_large(message),
            QueueError::StaleReceipt { .. } => ApiError::new(StatusCode::CONFLICT, "stale_receipt", message),
            QueueError::Corrupt { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_corrupt", message),
            QueueError::Log(source) => ApiError { message, ..ApiError::from(source) },
            QueueError::Io { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", message),
            QueueError::Backend { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", message),
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(error: CacheError) -> ApiError {
        let message = error.to_string();
        match error {
            CacheError::WrongType { .. } => ApiError::new(StatusCode::CONFLICT, "wrong_type", message),
            CacheError::KeyTooLarge { .. } | CacheError::ValueTooLarge { .. } | CacheError::MemberTooLarge { .. } | CacheError::CollectionFull { .. } => ApiError::too_large(message),
            CacheError::NotAnInteger | CacheError::NotAFloat | CacheError::Overflow | CacheError::NanScore | CacheError::InvalidTtl { .. } => ApiError::bad_request(message),
            CacheError::Full { .. } => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "cache_full", message),
            CacheError::Backend { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", message),
            CacheError::SnapshotIo { .. } | CacheError::SnapshotCorrupt { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", message),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(error: DbError) -> ApiError {
        let message = error.to_string();
        match error {
            DbError::Invalid(_) => ApiError::bad_request(message),
            DbError::Connect { .. }
            | DbError::Query(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend_unavailable", message)
            }
            DbError::Migrate { .. } | DbError::Query(_) => ApiError::internal(message),
        }
    }
}

/// A query's error, as the db component reports it.
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        ApiError::from(DbError::Query(error))
    }
}

/// A blocking engine call run off the async workers.
pub async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Into::into),
        Err(join) => Err(ApiError::internal(format!("engine task failed: {join}"))),
    }
}

/// Waits for `call` from synchronous code (a system's `status`, its start). Where the backend
/// answers on the polling thread (`blocking`: the embedded engine), the call runs in place;
/// otherwise a worker of the multi-thread runtime blocks for it (handed over meanwhile). None
/// when neither is possible here: a call that did not finish at once, or no multi-thread runtime.
pub fn wait_in_place<T>(blocking: bool, call: impl Future<Output = T>) -> Option<T> {
    use futures_util::FutureExt;
    if blocking {
        return call.now_or_never();
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => Some(tokio::task::block_in_place(|| runtime.block_on(call))),
        _ => None,
    }
}

/// Runs a call of an engine interface (`QueueStore`, `StreamStore`, ...): on the blocking pool
/// when the backend completes calls on the polling thread (`blocking`: the embedded engine
/// waits for its fsync and long polls there), else awaited on this task (network backends).
/// The one place where a system bridges the two.
pub async fn on_backend<T: Send + 'static>(blocking: bool, call: impl Future<Output = T> + Send + 'static) -> T {
    if blocking {
        let handle = tokio::runtime::Handle::current();
        match tokio::task::spawn_blocking(move || handle.block_on(call)).await {
            Ok(value) => value,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    } else {
        call.await
    }
}

/// Keeps a leased batch of `queue` leased while a worker works it: extends the receipts' leases
/// by `lease_ms` every third of it, until dropped (select it against the work). The lease is the
/// queue's default, the one every backend honours; a batch of a worker that died comes back
/// within one lease. A failed renewal is logged, and the next is tried on time.
pub async fn renew_leases(queues: &std::sync::Arc<dyn tributary_engine::queue::QueueStore>, queue: &'static str, group: &'static str, receipts: Vec<tributary_engine::queue::Receipt>, lease_ms: u64) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(lease_ms / 3)).await;
        let (queues, receipts) = (queues.clone(), receipts.clone());
        let extended = on_backend(queues.blocking(), async move { queues.extend(queue, group, receipts, lease_ms).await }).await;
        if let Err(error) = extended {
            tracing::warn!(queue, "renewing the leases of a worked batch: {error}");
        }
    }
}
