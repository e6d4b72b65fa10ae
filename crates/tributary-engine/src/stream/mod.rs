//! Streams: named topics of N partitions, consumer groups, committed offsets.
//!
//! Pick a **stream** when readers need the whole history in order, at their own pace, and may
//! replay it: event logs, change feeds, clickstreams. Each partition is an append-only
//! [`tributary_log::Log`]; a record's key picks its partition (stable FNV-1a hash), so records
//! of one key stay in order. Consumers track their position as an offset per partition; a
//! consumer group shares a topic's partitions among its members and commits offsets durably,
//! so a restarted member resumes where the group left off. Lag per group and partition is the
//! end offset minus the committed one, computed in O(1).
//!
//! Pick a queue (`crate::queue`) instead when each message is a job for exactly one worker,
//! acknowledged on its own. Pick pub/sub (`crate::pubsub`) when live subscribers need
//! subject-based fan-out.
//!
//! Not here: a network protocol (the server crate speaks HTTP), cross-partition transactions,
//! cooperative (incremental) rebalancing: a rebalance reassigns every partition.

mod groups;
mod store;
mod topic;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use tributary_core::limits;

pub use groups::{GROUP_MEMBERS_MAX, GroupState, Membership, PartitionLag, SESSION_TIMEOUT_MS_DEFAULT, SESSION_TIMEOUT_MS_MAX, SESSION_TIMEOUT_MS_MIN, session_timeout};
pub use store::{STREAM_FETCH_BYTES_MAX, StreamFuture, StreamStore, Tail, check_produce};
pub use topic::{Produced, Topic, TopicConfig};

use crate::error::{Result, StreamError};
use groups::Groups;

/// The wall clock in ms; injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// A summary of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub config: TopicConfig,
    /// `(start, end)` offsets per partition; `None` for a fenced partition.
    pub partitions: Vec<Option<(u64, u64)>>,
    pub fenced: Vec<(u32, String)>,
}

/// Every topic under one folder, and the consumer groups reading them.
pub struct Topics {
    dir: PathBuf,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    groups: Groups,
    clock: Clock,
}

const TOPIC_FILE: &str = "topic.json";

impl std::fmt::Debug for Topics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topics").field("dir", &self.dir).field("topics", &self.topics.read().len()).finish()
    }
}

impl Topics {
    /// Open every topic under `dir` (creating `dir` if needed).
    pub fn open(dir: impl AsRef<Path>) -> Result<Topics> {
        Self::open_with_clock(dir, Arc::new(tributary_core::now_ms))
    }

    pub fn open_with_clock(dir: impl AsRef<Path>, clock: Clock) -> Result<Topics> {
        let dir = dir.as_ref().to_path_buf();
        let topics_dir = dir.join("topics");
        std::fs::create_dir_all(&topics_dir).map_err(|source| StreamError::Io { context: format!("creating {}", topics_dir.display()), source })?;
        let mut topics = HashMap::new();
        let entries = std::fs::read_dir(&topics_dir).map_err(|source| StreamError::Io { context: format!("listing {}", topics_dir.display()), source })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let config_path = path.join(TOPIC_FILE);
            if !config_path.exists() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&config_path).map_err(|source| StreamError::Io { context: format!("reading {}", config_path.display()), source })?;
            let config: TopicConfig = serde_json::from_str(&text).map_err(|e| StreamError::Invalid(format!("{}: {e}", config_path.display())))?;
            topics.insert(name.clone(), Arc::new(Topic::open(&path, &name, config)?));
        }
        let groups = Groups::open(&dir)?;
        Ok(Topics { dir, topics: RwLock::new(topics), groups, clock })
    }

    /// Create a topic. Creating one that exists with the same configuration is a no-op.
    pub fn create(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        limits::check_name("topic", name).map_err(StreamError::Invalid)?;
        if name.starts_with("__") {
            return Err(StreamError::Invalid(format!("topic names starting with __ are internal: {name:?}")));
        }
        config.validate()?;
        let mut topics = self.topics.write();
        if let Some(existing) = topics.get(name) {
            if *existing.config() == config {
                return Ok(existing.clone());
            }
            return Err(StreamError::TopicExists { name: name.to_string(), existing: format!("{:?}", existing.config()) });
        }
        let path = self.dir.join("topics").join(name);
        std::fs::create_dir_all(&path).map_err(|source| StreamError::Io { context: format!("creating {}", path.display()), source })?;
        let topic = Arc::new(Topic::open(&path, name, config.clone())?);
        let text = serde_json::to_string_pretty(&config).expect("a topic config serializes");
        write_atomically(&path, &path.join(TOPIC_FILE), text.as_bytes())?;
        topics.insert(name.to_string(), topic.clone());
        Ok(topic)
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics.read().get(name).cloned().ok_or_else(|| StreamError::TopicNotFound(name.to_string()))
    }

    /// Every topic, sorted by name.
    pub fn list(&self) -> Vec<TopicInfo> {
        let mut out: Vec<TopicInfo> = self
            .topics
            .read()
            .values()
            .map(|t| TopicInfo {
                name: t.name().to_string(),
                config: t.config().clone(),
                partitions: (0..t.partition_count()).map(|p| t.offsets(p).ok()).collect(),
                fenced: t.fenced_partitions(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Delete a topic, its data and its groups' offsets.
    pub fn delete(&self, name: &str) -> Result<()> {
        let topic = self.topics.write().remove(name).ok_or_else(|| StreamError::TopicNotFound(name.to_string()))?;
        topic.close();
        self.groups.forget_topic(name)?;
        // Remove the config first: a crash half-way leaves a folder that is not reopened.
        let _ = std::fs::remove_file(topic.dir().join(TOPIC_FILE));
        std::fs::remove_dir_all(topic.dir()).map_err(|source| StreamError::Io { context: format!("removing {}", topic.dir().display()), source })
    }

    /// Join (or rejoin) `group` on `topic`. Without a member id, one is made up and returned.
    pub fn join_group(&self, topic: &str, group: &str, member_id: Option<&str>, session_timeout_ms: Option<u64>) -> Result<Membership> {
        limits::check_name("group", group).map_err(StreamError::Invalid)?;
        let t = self.get(topic)?;
        self.groups.join(topic, t.partition_count(), group, member_id, session_timeout_ms, (self.clock)())
    }

    /// Keep a member alive; returns its (possibly new) assignment.
    pub fn heartbeat(&self, topic: &str, group: &str, member_id: &str) -> Result<Membership> {
        let t = self.get(topic)?;
        self.groups.heartbeat(topic, t.partition_count(), group, member_id, (self.clock)())
    }

    pub fn leave_group(&self, topic: &str, group: &str, member_id: &str) -> Result<()> {
        let t = self.get(topic)?;
        self.groups.leave(topic, t.partition_count(), group, member_id, (self.clock)());
        Ok(())
    }

    /// The live members of a group with their partitions.
    pub fn describe_group(&self, topic: &str, group: &str) -> Result<Vec<Membership>> {
        let t = self.get(topic)?;
        Ok(self.groups.describe(topic, t.partition_count(), group, (self.clock)()))
    }

    /// Durably commit `offsets` (partition, next offset to read) for `group`. `member` is
    /// `(member id, generation)` for group members; `None` for a standalone consumer.
    pub fn commit(&self, topic: &str, group: &str, member: Option<(&str, u64)>, offsets: &[(u32, u64)]) -> Result<()> {
        limits::check_name("group", group).map_err(StreamError::Invalid)?;
        let t = self.get(topic)?;
        for &(partition, offset) in offsets {
            let (_, end) = t.offsets(partition)?;
            if offset > end {
                return Err(StreamError::Invalid(format!("cannot commit offset {offset} on partition {partition}: its end is {end}")));
            }
        }
        self.groups.commit(topic, t.partition_count(), group, member, offsets, (self.clock)())
    }

    pub fn committed(&self, topic: &str, group: &str, partition: u32) -> Option<u64> {
        self.groups.committed(topic, group, partition)
    }

    /// Lag of `group` on every partition of `topic`: O(1) per partition.
    pub fn lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>> {
        let t = self.get(topic)?;
        (0..t.partition_count())
            .map(|partition| {
                let (start, end) = t.offsets(partition)?;
                let committed = self.groups.committed(topic, group, partition);
                let position = committed.unwrap_or(start).max(start);
                Ok(PartitionLag { partition, committed, end, lag: end.saturating_sub(position) })
            })
            .collect()
    }

    /// Groups known on `topic`.
    pub fn groups(&self, topic: &str) -> Vec<String> {
        self.groups.group_names(topic)
    }

    /// Retention and compaction for every topic, compaction of the offsets log.
    pub fn maintain(&self) -> Result<()> {
        let now = (self.clock)();
        let topics: Vec<Arc<Topic>> = self.topics.read().values().cloned().collect();
        for topic in topics {
            topic.maintain(now)?;
        }
        self.groups.maintain(now)
    }

    /// Sync every partition and the offsets log.
    pub fn close(&self) {
        for topic in self.topics.read().values() {
            topic.close();
        }
        self.groups.close();
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    tributary_log::write_atomically(dir, path, bytes).map_err(|source| StreamError::Io { context: format!("writing {}", path.display()), source })
}

#[cfg(test)]
mod tests;
