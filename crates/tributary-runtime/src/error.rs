//! The crate's one error type: every variant is something a caller can act on (fix the
//! topology, fix the rule text, regenerate the catalogue).

/// Errors of `tributary-runtime`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// JSON (the catalogue or a topology) that does not match the types.
    #[error("JSON does not parse: {0}")]
    Json(#[from] serde_json::Error),
    /// A component kind that is not in the palette.
    #[error(
        "unknown component kind {0:?} (the palette: client, lb, app, stream, queue, worker, cache, db_primary, db_replica, search, cdn)"
    )]
    UnknownKind(String),
    /// A tier rule whose text is none of the shapes the seed uses.
    #[error("unreadable tier rule {0:?}")]
    UnreadableRule(String),
    /// Two components of one topology share a name.
    #[error("two components are named {0:?}")]
    DuplicateComponent(String),
    /// A connection names a component the topology does not have.
    #[error("connection {from:?} → {to:?} names no component {missing:?}")]
    DanglingConnection {
        from: String,
        to: String,
        missing: String,
    },
    /// A component parameter outside what the engine accepts.
    #[error("component {component:?}: {detail}")]
    InvalidParameter { component: String, detail: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
