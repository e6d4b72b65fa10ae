//! The errors of the queue module, each one a caller can act on.

use tributary_log::LogError;

/// Everything a queue operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No queue or group by that name.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// A queue or group by that name exists already.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// A queue, group or consumer name was refused (see `tributary_core::limits::check_name`).
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// A queue configuration was refused; nothing was created.
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),
    /// A message was refused (bad priority, reserved header); nothing of the batch was written.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A request broke a named limit; nothing was done. Ask for less, or ack before receiving more.
    #[error("{limit} exceeded: got {got}, the limit is {max}")]
    LimitExceeded { limit: &'static str, max: u64, got: u64 },
    /// The receipt no longer holds the message: its lease expired and it was redelivered, or it
    /// was acked or dead-lettered since. The message was not touched.
    #[error("stale receipt {receipt}: the message is no longer held by this delivery")]
    StaleReceipt { receipt: String },
    /// The queue was deleted while this handle was held.
    #[error("queue {0:?} was deleted")]
    Deleted(String),
    /// Stored queue state (configuration, journal) could not be decoded.
    #[error("corrupt queue state in {path}: {reason}")]
    Corrupt { path: String, reason: String },
    /// The log under the queue failed (disk full, corruption, fenced partition).
    #[error(transparent)]
    Log(#[from] LogError),
    /// A distributed backend could not answer (connection lost, timeout, an unexpected reply).
    /// Whether a write took effect is unknown.
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
    /// A file-system error outside the logs (creating directories, the config file).
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

pub(crate) fn io(context: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> QueueError {
    move |source| QueueError::Io { context: context(), source }
}
