//! The errors of the log, each one a caller can act on.

use std::path::PathBuf;

use crate::batch::EncodeError;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The request broke a named limit; nothing was written.
    #[error(transparent)]
    Limit(#[from] EncodeError),
    /// A read asked for an offset the log does not hold.
    #[error("offset {requested} is out of range: the log holds {start} to {end}")]
    OffsetOutOfRange { requested: u64, start: u64, end: u64 },
    /// An idempotent producer skipped or reordered a sequence number; nothing was written.
    #[error("producer {producer_id}: sequence {got} is out of order, expected {expected}")]
    OutOfOrderSequence { producer_id: u64, got: u32, expected: u32 },
    /// A conditional append ([`Log::append_at`](crate::Log::append_at)) expected the log to end
    /// elsewhere: another append came first. Nothing was written.
    #[error("the log ends at offset {end}, not at {expected} as the append expected; nothing was written")]
    EndMoved { expected: u64, end: u64 },
    /// Stored bytes failed their checksum or structure check. The partition is fenced: no
    /// further reads or writes until an operator repairs or removes it.
    #[error("corruption in {path} at byte {position}: {reason}; the partition is fenced")]
    Corrupt { path: PathBuf, position: u64, reason: String },
    /// The partition was fenced earlier (see the first error for the cause).
    #[error("the partition is fenced: {0}")]
    Fenced(String),
    /// Another process holds this log open.
    #[error("log {0} is locked by another process")]
    Locked(PathBuf),
    /// The configuration was refused.
    #[error("invalid log configuration: {0}")]
    Config(String),
    /// An IO error (disk full, permissions). Data acknowledged before it stays readable.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| LogError::Io { context: context(), source })
    }
}
