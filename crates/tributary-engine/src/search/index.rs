//! One search index: the tantivy index, its reader, and the writer thread that applies changes
//! and commits them with their checkpoint.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tantivy::collector::{Count, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, Occur, Query, QueryParser, TermSetQuery};
use tantivy::schema::{Field, STORED, STRING, Schema, TEXT, Value};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::{FILTER_VALUES_MAX, PENDING_CHANGES_MAX, QUERY_BYTES_MAX, SEARCH_DEPTH_MAX, SEARCH_PAGE_MAX, SearchConfig, SearchError, SearchSchema, WRITER_MEMORY_BYTES};

/// Per partition of the caller's log, the next offset the index does not cover yet.
pub type Checkpoint = BTreeMap<u32, u64>;

const ID_FIELD: &str = "id";

/// A document: its id (unique in the index), text fields and filter fields by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Document {
    pub id: String,
    pub text: Vec<(String, String)>,
    pub filters: Vec<(String, String)>,
}

/// A search: words to match (every word must match, in any text field; `"quoted phrases"`,
/// `-excluded` and `a OR b` work too), optionally scoped to documents whose filter field holds
/// one of `values`, and a page of the hits by relevance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchQuery {
    pub text: String,
    pub filter: Option<(String, Vec<String>)>,
    pub offset: usize,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub score: f32,
}

/// One page of hits, best first, and how many documents matched in all.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchPage {
    pub total: usize,
    pub hits: Vec<Hit>,
}

/// One change to the documents of an index.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Add the document, replacing the one with its id.
    Upsert(Document),
    /// Remove the document with this id (nothing if there is none).
    Delete(String),
}

enum Change {
    /// Edits that came from one log record: one commit takes all of them or none.
    Record(Vec<Edit>, (u32, u64)),
    Commit(mpsc::Sender<Result<(), String>>),
    #[cfg(test)]
    Abandon,
}

struct Fields {
    id: Field,
    text: Vec<(String, Field)>,
    filters: Vec<(String, Field)>,
}

pub struct SearchIndex {
    name: String,
    schema: SearchSchema,
    index: Index,
    reader: IndexReader,
    fields: Arc<Fields>,
    changes: Mutex<Option<SyncSender<Change>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpoint: Arc<Mutex<Checkpoint>>,
    /// Why the writer thread stopped, when it failed.
    failure: Arc<Mutex<Option<String>>>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for SearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchIndex").field("name", &self.name).field("schema", &self.schema).finish()
    }
}

fn build_schema(schema: &SearchSchema) -> Result<(Schema, Fields), SearchError> {
    let mut names: Vec<&String> = schema.text_fields.iter().chain(&schema.filter_fields).collect();
    if schema.text_fields.is_empty() {
        return Err(SearchError::Invalid("a search index needs at least one text field".into()));
    }
    names.sort();
    let before = names.len();
    names.dedup();
    if names.len() != before || names.iter().any(|n| **n == ID_FIELD || n.is_empty()) {
        return Err(SearchError::Invalid(format!("search fields must be distinct, non-empty and not {ID_FIELD:?}: {schema:?}")));
    }
    let mut builder = Schema::builder();
    let id = builder.add_text_field(ID_FIELD, STRING | STORED);
    let text = schema.text_fields.iter().map(|n| (n.clone(), builder.add_text_field(n, TEXT))).collect();
    let filters = schema.filter_fields.iter().map(|n| (n.clone(), builder.add_text_field(n, STRING))).collect();
    Ok((builder.build(), Fields { id, text, filters }))
}

fn index_error(name: &str) -> impl Fn(tantivy::TantivyError) -> SearchError + '_ {
    move |source| SearchError::Index { name: name.to_string(), source }
}

fn read_checkpoint(index: &Index, name: &str) -> Result<Checkpoint, SearchError> {
    let metas = index.load_metas().map_err(index_error(name))?;
    match metas.payload {
        None => Ok(Checkpoint::new()),
        Some(payload) => serde_json::from_str(&payload).map_err(|e| SearchError::Invalid(format!("search index {name:?}: unreadable checkpoint {payload:?}: {e}"))),
    }
}

impl SearchIndex {
    pub(super) fn open(name: &str, dir: &Path, schema: SearchSchema, config: SearchConfig) -> Result<SearchIndex, SearchError> {
        let (tantivy_schema, fields) = build_schema(&schema)?;
        let io = |context: String| move |source| SearchError::Io { context, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let open_dir = || MmapDirectory::open(dir).map_err(|e| SearchError::Invalid(format!("search index {name:?}: opening {}: {e}", dir.display())));
        let same = |a: &Schema, b: &Schema| serde_json::to_string(a).ok() == serde_json::to_string(b).ok();
        let exists = Index::exists(&open_dir()?).map_err(|e| SearchError::Invalid(format!("search index {name:?}: {e}")))?;
        let index = match exists.then(|| Index::open(open_dir()?).map_err(index_error(name))).transpose()? {
            Some(index) if same(&index.schema(), &tantivy_schema) => index,
            other => {
                if other.is_some() {
                    // Another schema: the index is derived data, rebuilt from the caller's log.
                    drop(other);
                    std::fs::remove_dir_all(dir).map_err(io(format!("removing {}", dir.display())))?;
                    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
                }
                Index::create(open_dir()?, tantivy_schema, tantivy::IndexSettings::default()).map_err(index_error(name))?
            }
        };
        let checkpoint = read_checkpoint(&index, name)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(index_error(name))?;
        let writer: IndexWriter = index.writer_with_num_threads(1, WRITER_MEMORY_BYTES).map_err(index_error(name))?;
        let (tx, rx) = mpsc::sync_channel(PENDING_CHANGES_MAX);
        let fields = Arc::new(fields);
        let checkpoint = Arc::new(Mutex::new(checkpoint));
        let failure = Arc::new(Mutex::new(None));
        let commits = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            writer,
            reader: reader.clone(),
            fields: fields.clone(),
            config,
            pending: checkpoint.lock().clone(),
            checkpoint: checkpoint.clone(),
            commits: commits.clone(),
            dirty: 0,
            since: None,
        };
        let thread_failure = failure.clone();
        let handle = std::thread::Builder::new()
            .name(format!("search-{name}"))
            .spawn(move || {
                if let Err(error) = worker.run(rx) {
                    *thread_failure.lock() = Some(error);
                }
            })
            .map_err(io("starting the search writer thread".into()))?;
        Ok(SearchIndex {
            name: name.to_string(),
            schema,
            index,
            reader,
            fields,
            changes: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            checkpoint,
            failure,
            commits,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schema(&self) -> &SearchSchema {
        &self.schema
    }

    /// Per partition, the next offset of the caller's log that the last commit does not cover:
    /// replay from here after a restart.
    pub fn checkpoint(&self) -> Checkpoint {
        self.checkpoint.lock().clone()
    }

    /// Commits made since this handle opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Documents visible to searches now.
    pub fn documents(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    fn closed(&self) -> SearchError {
        let reason = self.failure.lock().clone().unwrap_or_else(|| "closed".into());
        SearchError::Closed { name: self.name.clone(), reason }
    }

    fn send(&self, change: Change) -> Result<(), SearchError> {
        let sender = self.changes.lock().clone().ok_or_else(|| self.closed())?;
        sender.send(change).map_err(|_| self.closed())
    }

    fn check_document(&self, document: &Document) -> Result<(), SearchError> {
        if document.id.is_empty() {
            return Err(SearchError::Invalid("a document needs an id".into()));
        }
        for (field, _) in &document.text {
            if !self.fields.text.iter().any(|(n, _)| n == field) {
                return Err(SearchError::Invalid(format!("{field:?} is not a text field of search index {:?}", self.name)));
            }
        }
        for (field, _) in &document.filters {
            if !self.fields.filters.iter().any(|(n, _)| n == field) {
                return Err(SearchError::Invalid(format!("{field:?} is not a filter field of search index {:?}", self.name)));
            }
        }
        Ok(())
    }

    /// Add `document`, replacing the one with its id; it came from `position` of the log.
    pub fn upsert(&self, document: Document, position: (u32, u64)) -> Result<(), SearchError> {
        self.record(vec![Edit::Upsert(document)], position)
    }

    /// Remove the document `id` (nothing if there is none); the delete came from `position`.
    pub fn delete(&self, id: &str, position: (u32, u64)) -> Result<(), SearchError> {
        self.record(vec![Edit::Delete(id.to_string())], position)
    }

    /// The edits one record of the log at `position` makes, in order. A commit holds all of
    /// them or none, so a checkpoint never passes a record that is only partly indexed. No
    /// edits is [`SearchIndex::advance`].
    pub fn record(&self, edits: Vec<Edit>, position: (u32, u64)) -> Result<(), SearchError> {
        for edit in &edits {
            if let Edit::Upsert(document) = edit {
                self.check_document(document)?;
            }
        }
        self.send(Change::Record(edits, position))
    }

    /// The record at `position` changes nothing in the index: let the checkpoint pass it.
    pub fn advance(&self, position: (u32, u64)) -> Result<(), SearchError> {
        self.record(Vec::new(), position)
    }

    /// Commit what was handed in so far and wait until searches see it.
    pub fn commit(&self) -> Result<(), SearchError> {
        let (tx, rx) = mpsc::channel();
        self.send(Change::Commit(tx))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(SearchError::Closed { name: self.name.clone(), reason: message }),
            Err(_) => Err(self.closed()),
        }
    }

    /// Commit and stop the writer thread.
    pub fn close(&self) -> Result<(), SearchError> {
        let sender = self.changes.lock().take();
        let Some(sender) = sender else { return Ok(()) };
        drop(sender);
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        match self.failure.lock().clone() {
            Some(reason) => Err(SearchError::Closed { name: self.name.clone(), reason }),
            None => Ok(()),
        }
    }

    /// Stop the writer without committing, as a crash would (for recovery tests).
    #[cfg(test)]
    pub(super) fn abandon(&self) {
        if let Some(sender) = self.changes.lock().take() {
            let _ = sender.send(Change::Abandon);
        }
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }

    /// The hits of `query` among committed documents.
    pub fn search(&self, query: &SearchQuery) -> Result<SearchPage, SearchError> {
        if query.text.len() > QUERY_BYTES_MAX {
            return Err(SearchError::Invalid(format!("the query is {} bytes: at most QUERY_BYTES_MAX ({QUERY_BYTES_MAX})", query.text.len())));
        }
        if query.limit == 0 || query.limit > SEARCH_PAGE_MAX {
            return Err(SearchError::Invalid(format!("limit must be 1 to SEARCH_PAGE_MAX ({SEARCH_PAGE_MAX}), got {}", query.limit)));
        }
        if query.offset + query.limit > SEARCH_DEPTH_MAX {
            return Err(SearchError::Invalid(format!("offset + limit is {}: at most SEARCH_DEPTH_MAX ({SEARCH_DEPTH_MAX})", query.offset + query.limit)));
        }
        if query.text.trim().is_empty() {
            return Err(SearchError::Invalid("the query has no words".into()));
        }
        let text_fields: Vec<Field> = self.fields.text.iter().map(|(_, f)| *f).collect();
        let mut parser = QueryParser::for_index(&self.index, text_fields);
        parser.set_conjunction_by_default();
        let (words, _ignored) = parser.parse_query_lenient(&query.text);
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, words)];
        if let Some((field, values)) = &query.filter {
            let Some((_, filter)) = self.fields.filters.iter().find(|(n, _)| n == field) else {
                return Err(SearchError::Invalid(format!("{field:?} is not a filter field of search index {:?}", self.name)));
            };
            if values.len() > FILTER_VALUES_MAX {
                return Err(SearchError::Invalid(format!("{} filter values: at most FILTER_VALUES_MAX ({FILTER_VALUES_MAX})", values.len())));
            }
            if values.is_empty() {
                return Ok(SearchPage::default());
            }
            let terms: Vec<Term> = values.iter().map(|v| Term::from_field_text(*filter, v)).collect();
            clauses.push((Occur::Must, Box::new(TermSetQuery::new(terms))));
        }
        let query_all = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let collector = (TopDocs::with_limit(query.limit).and_offset(query.offset).order_by_score(), Count);
        let (top, total) = searcher.search(&query_all, &collector).map_err(index_error(&self.name))?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, address) in top {
            let document: TantivyDocument = searcher.doc(address).map_err(index_error(&self.name))?;
            let id = document.get_first(self.fields.id).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            hits.push(Hit { id, score });
        }
        Ok(SearchPage { total, hits })
    }
}

impl Drop for SearchIndex {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

struct Worker {
    writer: IndexWriter,
    reader: IndexReader,
    fields: Arc<Fields>,
    config: SearchConfig,
    /// The checkpoint the next commit stores.
    pending: Checkpoint,
    /// The checkpoint of the last commit, shared with the handle.
    checkpoint: Arc<Mutex<Checkpoint>>,
    commits: Arc<AtomicU64>,
    /// Changes since the last commit.
    dirty: usize,
    /// When the first of them arrived.
    since: Option<Instant>,
}

impl Worker {
    fn run(mut self, changes: mpsc::Receiver<Change>) -> Result<(), String> {
        let interval = Duration::from_millis(self.config.commit_interval_ms);
        loop {
            let wait = match self.since {
                Some(since) => interval.saturating_sub(since.elapsed()),
                None => Duration::from_secs(3600),
            };
            match changes.recv_timeout(wait) {
                Ok(Change::Record(edits, position)) => {
                    let count = edits.len();
                    for edit in edits {
                        match edit {
                            Edit::Upsert(document) => self.upsert(document)?,
                            Edit::Delete(id) => {
                                self.writer.delete_term(Term::from_field_text(self.fields.id, &id));
                            }
                        }
                    }
                    self.changed(position, count);
                }
                Ok(Change::Commit(reply)) => {
                    let result = self.commit();
                    let failed = result.as_ref().err().cloned();
                    let _ = reply.send(result);
                    if let Some(error) = failed {
                        return Err(error);
                    }
                }
                #[cfg(test)]
                Ok(Change::Abandon) => return Ok(()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.commit(),
            }
            let due = self.since.is_some_and(|since| since.elapsed() >= interval);
            if self.dirty >= self.config.commit_docs.max(1) || due {
                self.commit()?;
            }
        }
    }

    fn upsert(&mut self, document: Document) -> Result<(), String> {
        let id = Term::from_field_text(self.fields.id, &document.id);
        self.writer.delete_term(id);
        let mut doc = TantivyDocument::default();
        doc.add_text(self.fields.id, &document.id);
        for (name, value) in &document.text {
            if let Some((_, field)) = self.fields.text.iter().find(|(n, _)| n == name) {
                doc.add_text(*field, value);
            }
        }
        for (name, value) in &document.filters {
            if let Some((_, field)) = self.fields.filters.iter().find(|(n, _)| n == name) {
                doc.add_text(*field, value);
            }
        }
        self.writer.add_document(doc).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn changed(&mut self, (partition, offset): (u32, u64), changes: usize) {
        let next = self.pending.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
        self.dirty += changes.max(1);
        self.since.get_or_insert_with(Instant::now);
    }

    fn commit(&mut self) -> Result<(), String> {
        if self.dirty == 0 {
            return Ok(());
        }
        let payload = serde_json::to_string(&self.pending).expect("a checkpoint serializes");
        let mut prepared = self.writer.prepare_commit().map_err(|e| e.to_string())?;
        prepared.set_payload(&payload);
        prepared.commit().map_err(|e| e.to_string())?;
        self.reader.reload().map_err(|e| e.to_string())?;
        *self.checkpoint.lock() = self.pending.clone();
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.dirty = 0;
        self.since = None;
        Ok(())
    }
}
