//! The embedded engine in one value: every topic, queue, search index and the cache under one
//! data folder.
//!
//! Layout of the folder: `streams/` (topics and the consumer-offsets log), `queues/` (one folder
//! per queue), `search/` (one folder per search index, see [`crate::search`]), `cache.snapshot`
//! (written by [`Engine::close`], read back by [`Engine::open`]).
//! Pub/sub brokers are made by the systems that use them, over topics of this engine, because
//! what a subscriber receives is theirs to define.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::{Cache, CacheConfig};
use crate::queue::{QueueDefaults, QueueError, Queues};
use crate::search::{SearchError, Searches};
use crate::stream::Topics;
use crate::StreamError;

/// Why the engine could not open or close.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("streams: {0}")]
    Stream(#[from] StreamError),
    #[error("queues: {0}")]
    Queue(#[from] QueueError),
    #[error("cache snapshot: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("search: {0}")]
    Search(#[from] SearchError),
}

pub struct Engine {
    dir: PathBuf,
    /// Shared, so that it also serves as the `dyn StreamStore` of systems on the embedded engine.
    pub topics: Arc<Topics>,
    /// Shared, so that it also serves as the `dyn QueueStore` of systems on the embedded engine.
    pub queues: Arc<Queues>,
    pub cache: Cache,
    pub search: Searches,
}

const CACHE_SNAPSHOT: &str = "cache.snapshot";

impl Engine {
    /// Open (or create) the engine under `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Engine, EngineError> {
        let dir = dir.as_ref().to_path_buf();
        let topics = Arc::new(Topics::open(dir.join("streams"))?);
        let queues = Arc::new(Queues::open(dir.join("queues"), QueueDefaults::default())?);
        let cache = Cache::new(CacheConfig::default());
        let snapshot = dir.join(CACHE_SNAPSHOT);
        if snapshot.exists() {
            cache.load_from(&snapshot)?;
        }
        let search = Searches::open(dir.join("search"));
        Ok(Engine { dir, topics, queues, cache, search })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Periodic upkeep: retention and compaction of topics, expiry of cache keys, lease expiry
    /// of queues.
    pub fn maintain(&self) -> Result<(), EngineError> {
        self.topics.maintain()?;
        for name in self.queues.list() {
            if let Ok(queue) = self.queues.get(&name) {
                queue.tick()?;
            }
        }
        self.cache.expire_tick(self.cache.now_ms(), 10_000);
        Ok(())
    }

    /// Sync everything, commit every search index and snapshot the cache.
    pub fn close(&self) -> Result<(), EngineError> {
        self.search.close()?;
        self.topics.close();
        self.queues.close()?;
        self.cache.snapshot_to(self.dir.join(CACHE_SNAPSHOT))?;
        Ok(())
    }
}
