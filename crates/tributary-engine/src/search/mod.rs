//! Search: named full-text indexes (tantivy) that a system feeds from its log and queries with
//! a scope filter and pagination.
//!
//! Pick **search** when readers look things up by words ("who said *deploy* in the channels I
//! am in"): the log stays the truth, the index is a derived view of it. Each index lives under
//! `<data>/search/<name>`; a document has an id, text fields (tokenized, lowercased) and filter
//! fields (exact values, e.g. a channel id) that scope a query.
//!
//! **Writes are asynchronous.** [`SearchIndex::upsert`] and [`SearchIndex::delete`] hand the
//! change to the index's writer thread and return; the thread commits every
//! `commit_interval_ms` or every `commit_docs` changes, whichever comes first, and only then do
//! searches see them (near real time: a search lags the log by at most about one interval).
//! [`SearchIndex::commit`] commits now and waits (for tests, and for a caller that must read its
//! own write).
//!
//! **Checkpoint.** Every change carries the log position it came from (`partition`, `offset`);
//! each commit stores, atomically with the documents, per partition the next offset not yet
//! covered ([`SearchIndex::checkpoint`]). After a crash the index holds exactly what its last
//! commit held, and the caller replays its log from the checkpoint: upserts and deletes by id are
//! idempotent, so replaying a change twice is harmless. Changes must be handed in log order per
//! partition. [`SearchIndex::advance`] moves the checkpoint past records that change nothing in
//! the index, and [`SearchIndex::record`] hands in the several edits one record makes, which a
//! commit takes all of or none.
//!
//! A schema that differs from the one on disk (fields added or removed) wipes the index: its
//! checkpoint is then empty and the caller rebuilds it from the start of its log.
//!
//! Not here: highlighting, facets, per-field boosts, sorting by anything but relevance, and
//! any distribution of an index over nodes.

mod index;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

pub use index::{Checkpoint, Document, Edit, Hit, SearchIndex, SearchPage, SearchQuery};

/// Commit at least this often while changes wait, unless configured otherwise.
pub const COMMIT_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Commit after this many waiting changes, unless configured otherwise.
pub const COMMIT_DOCS_DEFAULT: usize = 10_000;
/// Changes queued towards an index's writer thread before `upsert` and `delete` wait.
pub const PENDING_CHANGES_MAX: usize = 65_536;
/// Memory of an index's writer, in bytes (tantivy's minimum for one thread is 15 MB).
pub const WRITER_MEMORY_BYTES: usize = 24 * 1024 * 1024;
/// Most hits one search returns.
pub const SEARCH_PAGE_MAX: usize = 1_000;
/// Deepest a search may page (`offset + limit`).
pub const SEARCH_DEPTH_MAX: usize = 10_000;
/// Longest query text, in bytes.
pub const QUERY_BYTES_MAX: usize = 1_024;
/// Most filter values (e.g. channels) one search may be scoped to.
pub const FILTER_VALUES_MAX: usize = 100_000;
/// Longest index name, in bytes.
pub const INDEX_NAME_BYTES_MAX: usize = 128;

/// Why a search or an index operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A bad query, schema, name or document; nothing was done.
    #[error("{0}")]
    Invalid(String),
    /// The index failed underneath (disk, a corrupt file).
    #[error("search index {name:?}: {source}")]
    Index { name: String, source: tantivy::TantivyError },
    /// The index's writer thread has stopped (closed, or it failed: see the message).
    #[error("search index {name:?} is closed: {reason}")]
    Closed { name: String, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// The fields of an index: text fields are tokenized for full-text matching, filter fields are
/// matched exactly (a channel id, a tenant). Every document also has an `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchSchema {
    pub text_fields: Vec<String>,
    pub filter_fields: Vec<String>,
}

/// When an index's writer commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchConfig {
    pub commit_interval_ms: u64,
    pub commit_docs: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig { commit_interval_ms: COMMIT_INTERVAL_MS_DEFAULT, commit_docs: COMMIT_DOCS_DEFAULT }
    }
}

/// Every search index under one folder (`<data>/search`).
pub struct Searches {
    dir: PathBuf,
    indexes: Mutex<HashMap<String, Arc<SearchIndex>>>,
}

impl Searches {
    /// Indexes live in `dir/<name>`; nothing is created until an index is opened.
    pub fn open(dir: impl AsRef<Path>) -> Searches {
        Searches { dir: dir.as_ref().to_path_buf(), indexes: Mutex::new(HashMap::new()) }
    }

    /// Open (or create) index `name` with `schema`; the same handle for the same name while it
    /// is open. A schema different from the one on disk wipes the index (see the module docs).
    pub fn index(&self, name: &str, schema: SearchSchema, config: SearchConfig) -> Result<Arc<SearchIndex>, SearchError> {
        check_name(name)?;
        let mut indexes = self.indexes.lock();
        if let Some(index) = indexes.get(name) {
            if index.schema() != &schema {
                return Err(SearchError::Invalid(format!("search index {name:?} is open with another schema")));
            }
            return Ok(index.clone());
        }
        let index = Arc::new(SearchIndex::open(name, &self.dir.join(name), schema, config)?);
        indexes.insert(name.to_string(), index.clone());
        Ok(index)
    }

    /// The names of the open indexes.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.indexes.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// Commit every open index and stop its writer (what is handed in afterwards is refused).
    pub fn close(&self) -> Result<(), SearchError> {
        let indexes: Vec<Arc<SearchIndex>> = self.indexes.lock().drain().map(|(_, index)| index).collect();
        let mut first = None;
        for index in indexes {
            if let Err(error) = index.close() {
                first.get_or_insert(error);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn check_name(name: &str) -> Result<(), SearchError> {
    let ok = !name.is_empty()
        && name.len() <= INDEX_NAME_BYTES_MAX
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SearchError::Invalid(format!("search index name {name:?}: use 1 to {INDEX_NAME_BYTES_MAX} of A-Z a-z 0-9 - _ . (not starting with a dot)")))
    }
}
