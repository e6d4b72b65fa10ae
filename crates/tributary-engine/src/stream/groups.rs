//! Consumer groups: membership with session timeouts, partition assignment by generation,
//! and durably committed offsets.
//!
//! Offsets live in one compacted log (`__consumer_offsets`): each commit appends
//! `topic \0 group \0 partition → offset`, so a commit is as durable as any append and the log
//! stays the size of the live offsets after compaction. On open the log is read once into a map.
//!
//! Membership follows [`GroupState`], the rules every backend shares. Rebalancing is eager: a
//! join, a leave or a member's session expiring bumps the group's generation and reassigns every
//! partition (round robin over members sorted by id). Members learn their new partitions on
//! their next heartbeat. A commit must come from a live member that owns the partition in the
//! current generation, so a member that was expired cannot overwrite its successor's progress.
//! Membership is held in memory: after a restart, members join again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tributary_core::{Record, limits};
use tributary_log::{Log, LogConfig};

use crate::error::{Result, StreamError};

/// Session timeout when a member does not name one.
pub const SESSION_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Shortest and longest session timeouts accepted.
pub const SESSION_TIMEOUT_MS_MIN: u64 = 100;
pub const SESSION_TIMEOUT_MS_MAX: u64 = 30 * 60 * 1000;
/// Most members in one group.
pub const GROUP_MEMBERS_MAX: usize = 1000;

/// What a member of a group owns now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub member_id: String,
    pub generation: u64,
    pub partitions: Vec<u32>,
}

/// Progress of a group on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: u32,
    /// Next offset the group will read (its committed offset), or the log start if none.
    pub committed: Option<u64>,
    pub end: u64,
    pub lag: u64,
}

/// The session timeout a member asked for (the default when it named none), or why it is
/// refused.
pub fn session_timeout(asked_ms: Option<u64>) -> Result<u64> {
    let session_timeout_ms = asked_ms.unwrap_or(SESSION_TIMEOUT_MS_DEFAULT);
    if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&session_timeout_ms) {
        return Err(StreamError::Invalid(format!(
            "session timeout must be SESSION_TIMEOUT_MS_MIN ({SESSION_TIMEOUT_MS_MIN}) to SESSION_TIMEOUT_MS_MAX ({SESSION_TIMEOUT_MS_MAX}) ms, got {session_timeout_ms}"
        )));
    }
    Ok(session_timeout_ms)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    session_timeout_ms: u64,
    last_seen_ms: i64,
}

/// One group's members, generation and assignment, and the rules that change them. The
/// embedded engine keeps one per group in memory; a network backend keeps it where every node
/// reads it (NATS: its KV bucket) and applies these same rules on whichever node is called, so
/// the backends assign alike.
///
/// Every method first expires the members whose session ran out at `now_ms`: a member stays
/// alive by joining and heartbeating, not by committing.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    generation: u64,
    members: BTreeMap<String, Member>,
    assignment: BTreeMap<String, Vec<u32>>,
}

impl GroupState {
    /// Adds `member_id` (or refreshes it when it is a member already); a new member rebalances.
    pub fn join(&mut self, group: &str, partitions: u32, member_id: &str, session_timeout_ms: u64, now_ms: i64) -> Result<Membership> {
        limits::check_name("member", member_id).map_err(StreamError::Invalid)?;
        let mut changed = self.expire(now_ms);
        if !self.members.contains_key(member_id) {
            if self.members.len() >= GROUP_MEMBERS_MAX {
                return Err(StreamError::Invalid(format!("group {group:?} already has GROUP_MEMBERS_MAX ({GROUP_MEMBERS_MAX}) members")));
            }
            changed = true;
        }
        self.members.insert(member_id.to_string(), Member { session_timeout_ms, last_seen_ms: now_ms });
        if changed {
            self.rebalance(partitions);
        }
        Ok(self.membership(member_id))
    }

    /// Keeps `member_id` alive and returns its (possibly new) assignment.
    pub fn heartbeat(&mut self, group: &str, partitions: u32, member_id: &str, now_ms: i64) -> Result<Membership> {
        self.expire_and_rebalance(partitions, now_ms);
        let Some(member) = self.members.get_mut(member_id) else {
            return Err(StreamError::UnknownMember { group: group.to_string(), member: member_id.to_string() });
        };
        member.last_seen_ms = now_ms;
        Ok(self.membership(member_id))
    }

    /// Removes `member_id`; the others rebalance. False when it was not a member.
    pub fn leave(&mut self, partitions: u32, member_id: &str, now_ms: i64) -> bool {
        let expired = self.expire(now_ms);
        let left = self.members.remove(member_id).is_some();
        if expired || left {
            self.rebalance(partitions);
        }
        left
    }

    /// The live members with their partitions.
    pub fn describe(&mut self, partitions: u32, now_ms: i64) -> Vec<Membership> {
        self.expire_and_rebalance(partitions, now_ms);
        self.members.keys().map(|id| self.membership(id)).collect()
    }

    /// Whether `member_id`, at `generation`, may commit offsets of `committing`: it must be a
    /// live member, at the current generation, owning each of them.
    pub fn check_commit(&mut self, group: &str, partitions: u32, member_id: &str, generation: u64, committing: &[u32], now_ms: i64) -> Result<()> {
        self.expire_and_rebalance(partitions, now_ms);
        if !self.members.contains_key(member_id) {
            return Err(StreamError::UnknownMember { group: group.to_string(), member: member_id.to_string() });
        }
        if generation != self.generation {
            return Err(StreamError::StaleGeneration { group: group.to_string(), member: member_id.to_string(), given: generation, current: self.generation });
        }
        let owned = self.assignment.get(member_id).map(Vec::as_slice).unwrap_or_default();
        if let Some(&partition) = committing.iter().find(|p| !owned.contains(p)) {
            return Err(StreamError::NotAssigned { group: group.to_string(), member: member_id.to_string(), partition, generation });
        }
        Ok(())
    }

    /// Eager rebalance: a new generation, every partition reassigned round robin over the
    /// members sorted by id.
    fn rebalance(&mut self, partitions: u32) {
        self.generation += 1;
        self.assignment.clear();
        let ids: Vec<&String> = self.members.keys().collect();
        if ids.is_empty() {
            return;
        }
        for p in 0..partitions {
            let owner = ids[p as usize % ids.len()];
            self.assignment.entry(owner.clone()).or_default().push(p);
        }
    }

    /// Expires the silent members and rebalances when there were any.
    fn expire_and_rebalance(&mut self, partitions: u32, now_ms: i64) {
        if self.expire(now_ms) {
            self.rebalance(partitions);
        }
    }

    fn expire(&mut self, now_ms: i64) -> bool {
        let before = self.members.len();
        self.members.retain(|_, m| now_ms - m.last_seen_ms <= m.session_timeout_ms as i64);
        self.members.len() != before
    }

    fn membership(&self, member_id: &str) -> Membership {
        Membership {
            member_id: member_id.to_string(),
            generation: self.generation,
            partitions: self.assignment.get(member_id).cloned().unwrap_or_default(),
        }
    }
}

pub(crate) struct Groups {
    offsets_log: Log,
    committed: Mutex<HashMap<(String, String, u32), u64>>,
    groups: Mutex<HashMap<(String, String), GroupState>>,
    next_member: AtomicU64,
}

fn offset_key(topic: &str, group: &str, partition: u32) -> Vec<u8> {
    format!("{topic}\0{group}\0{partition}").into_bytes()
}

impl Groups {
    pub(crate) fn open(dir: &Path) -> Result<Groups> {
        let config = LogConfig { compact: true, segment_bytes_max: 16 * 1024 * 1024, ..LogConfig::default() };
        let (offsets_log, _) = Log::open(dir.join("__consumer_offsets"), config)?;
        let mut committed = HashMap::new();
        let mut from = offsets_log.start_offset();
        while from < offsets_log.high_watermark() {
            let records = offsets_log.read(from, 10_000, 4 * 1024 * 1024)?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for record in records {
                let Some(key) = record.key.as_deref() else { continue };
                let text = String::from_utf8_lossy(key);
                let mut parts = text.split('\0');
                let (Some(topic), Some(group), Some(Ok(partition))) = (parts.next(), parts.next(), parts.next().map(str::parse::<u32>)) else { continue };
                let id = (topic.to_string(), group.to_string(), partition);
                match record.value.as_deref().and_then(|v| <[u8; 8]>::try_from(v).ok()) {
                    Some(bytes) => committed.insert(id, u64::from_le_bytes(bytes)),
                    None => committed.remove(&id),
                };
            }
        }
        Ok(Groups { offsets_log, committed: Mutex::new(committed), groups: Mutex::new(HashMap::new()), next_member: AtomicU64::new(1) })
    }

    pub(crate) fn join(&self, topic: &str, partitions: u32, group: &str, member_id: Option<&str>, session_timeout_ms: Option<u64>, now_ms: i64) -> Result<Membership> {
        let session_timeout_ms = session_timeout(session_timeout_ms)?;
        let member_id = match member_id {
            Some(id) => id.to_string(),
            None => format!("member-{}-{}", now_ms, self.next_member.fetch_add(1, Ordering::Relaxed)),
        };
        self.state(topic, group, |state| state.join(group, partitions, &member_id, session_timeout_ms, now_ms))
    }

    pub(crate) fn heartbeat(&self, topic: &str, partitions: u32, group: &str, member_id: &str, now_ms: i64) -> Result<Membership> {
        self.state(topic, group, |state| state.heartbeat(group, partitions, member_id, now_ms))
    }

    pub(crate) fn leave(&self, topic: &str, partitions: u32, group: &str, member_id: &str, now_ms: i64) {
        self.state(topic, group, |state| state.leave(partitions, member_id, now_ms));
    }

    /// Members and their partitions, after expiring the silent ones.
    pub(crate) fn describe(&self, topic: &str, partitions: u32, group: &str, now_ms: i64) -> Vec<Membership> {
        self.state(topic, group, |state| state.describe(partitions, now_ms))
    }

    /// `change` applied to the state of `group` on `topic`, under the lock.
    fn state<T>(&self, topic: &str, group: &str, change: impl FnOnce(&mut GroupState) -> T) -> T {
        change(self.groups.lock().entry((topic.to_string(), group.to_string())).or_default())
    }

    /// Durably commit offsets. With `member` given (id and generation), the member must own
    /// every partition it commits ([`GroupState::check_commit`]); without, the commit is
    /// unconditional (a standalone consumer).
    pub(crate) fn commit(&self, topic: &str, partitions: u32, group: &str, member: Option<(&str, u64)>, offsets: &[(u32, u64)], now_ms: i64) -> Result<()> {
        // A member's check holds the groups' lock until its offsets are appended, so no
        // rebalance falls between the two.
        let _checked = match member {
            Some((member_id, generation)) => {
                let committing: Vec<u32> = offsets.iter().map(|&(p, _)| p).collect();
                let mut groups = self.groups.lock();
                groups.entry((topic.to_string(), group.to_string())).or_default().check_commit(group, partitions, member_id, generation, &committing, now_ms)?;
                Some(groups)
            }
            None => None,
        };
        let records: Vec<Record> = offsets
            .iter()
            .map(|&(partition, offset)| Record::keyed(offset_key(topic, group, partition), Bytes::copy_from_slice(&offset.to_le_bytes())))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        self.offsets_log.append(&records)?;
        let mut committed = self.committed.lock();
        for &(partition, offset) in offsets {
            committed.insert((topic.to_string(), group.to_string(), partition), offset);
        }
        Ok(())
    }

    pub(crate) fn committed(&self, topic: &str, group: &str, partition: u32) -> Option<u64> {
        self.committed.lock().get(&(topic.to_string(), group.to_string(), partition)).copied()
    }

    /// Groups with committed offsets or members on `topic`.
    pub(crate) fn group_names(&self, topic: &str) -> Vec<String> {
        let mut names: Vec<String> = self.committed.lock().keys().filter(|(t, _, _)| t == topic).map(|(_, g, _)| g.clone()).collect();
        names.extend(self.groups.lock().keys().filter(|(t, _)| t == topic).map(|(_, g)| g.clone()));
        names.sort();
        names.dedup();
        names
    }

    /// Forget every offset and member of `topic` (the topic was deleted).
    pub(crate) fn forget_topic(&self, topic: &str) -> Result<()> {
        let keys: Vec<(String, String, u32)> = self.committed.lock().keys().filter(|(t, _, _)| t == topic).cloned().collect();
        let tombstones: Vec<Record> = keys.iter().map(|(t, g, p)| Record::tombstone(offset_key(t, g, *p))).collect();
        for chunk in tombstones.chunks(1000) {
            self.offsets_log.append(chunk)?;
        }
        let mut committed = self.committed.lock();
        for key in keys {
            committed.remove(&key);
        }
        self.groups.lock().retain(|(t, _), _| t != topic);
        Ok(())
    }

    pub(crate) fn maintain(&self, now_ms: i64) -> Result<()> {
        self.offsets_log.compact(now_ms)?;
        Ok(())
    }

    pub(crate) fn close(&self) {
        let _ = self.offsets_log.close();
    }
}
