//! Consumer-group membership on NATS: each group's [`GroupState`] is one key of the namespace's
//! KV bucket (`group.<topic>.<group>`, JSON), changed by compare-and-set on the key's revision,
//! so the rules of the embedded engine hold whichever node a member calls. A change that finds
//! the key moved since it was read (another node changed the group) reads it again and applies
//! itself anew.
//!
//! A member's committed offset is written as `<offset>@<generation>`, also by compare-and-set:
//! a commit at a generation older than the one stored is refused. So once the generation was
//! checked, a member that was replaced in between cannot put back an offset its successor
//! already moved (it can still land a commit between the check and a successor's first commit:
//! the successor then reads that offset, which is progress the old member made). A standalone
//! commit (`StreamStore::commit`) writes `<offset>` unconditionally.
//!
//! Sessions are timed by the wall clock of the node that handles each call: nodes whose clocks
//! differ by a large part of a session timeout expire members early or late.

use async_nats::jetstream::kv;
use bytes::Bytes;
use tributary_core::now_ms;
use tributary_engine::StreamError;
use tributary_engine::stream::GroupState;

use crate::{NatsStreams, backend, escape};

/// Attempts of one group change or member commit that found the key moved by another node.
pub const NATS_GROUP_CHANGE_ATTEMPTS_MAX: usize = 64;

/// An offset as stored: the offset and, for a member's commit, its generation.
pub(crate) fn parse_offset(bytes: &[u8]) -> Result<(u64, Option<u64>), StreamError> {
    let text = std::str::from_utf8(bytes).map_err(backend)?;
    let (offset, generation) = match text.split_once('@') {
        Some((offset, generation)) => (offset, Some(generation)),
        None => (text, None),
    };
    let number = |s: &str| s.parse::<u64>().map_err(|_| backend(format!("committed offset {text:?} does not parse")));
    Ok((number(offset)?, generation.map(number).transpose()?))
}

/// Writes `value` at `key` if its revision is still `revision` (`None`: the key did not exist);
/// false when another writer moved it since.
async fn write_if_unchanged(meta: &kv::Store, key: &str, value: Bytes, revision: Option<u64>) -> Result<bool, StreamError> {
    let outcome = match revision {
        Some(revision) => meta.update(key, value, revision).await.map(|_| ()).map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.to_string())),
        None => meta.create(key, value).await.map(|_| ()).map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.to_string())),
    };
    match outcome {
        Ok(()) => Ok(true),
        Err((true, _)) => Ok(false),
        Err((false, message)) => Err(backend(format!("writing {key}: {message}"))),
    }
}

/// Reads `key` (`None` when it was never written or was deleted), lets `decide` give the value
/// to write (`None`: nothing) and what to return, and writes it by compare-and-set; when
/// another node wrote in between, reads and decides again, up to
/// [`NATS_GROUP_CHANGE_ATTEMPTS_MAX`] times. An error from `decide` ends it unwritten.
async fn compare_and_set<R>(meta: &kv::Store, key: &str, decide: impl Fn(Option<&[u8]>) -> Result<(Option<Bytes>, R), StreamError>) -> Result<R, StreamError> {
    for _ in 0..NATS_GROUP_CHANGE_ATTEMPTS_MAX {
        let (value, revision) = match meta.entry(key).await.map_err(backend)? {
            Some(entry) if entry.operation == kv::Operation::Put => (Some(entry.value), Some(entry.revision)),
            Some(entry) => (None, Some(entry.revision)),
            None => (None, None),
        };
        let (write, outcome) = decide(value.as_deref())?;
        let Some(write) = write else { return Ok(outcome) };
        if write_if_unchanged(meta, key, write, revision).await? {
            return Ok(outcome);
        }
    }
    Err(backend(format!("{key} changed under each of NATS_GROUP_CHANGE_ATTEMPTS_MAX ({NATS_GROUP_CHANGE_ATTEMPTS_MAX}) attempts")))
}

impl NatsStreams {
    pub(crate) fn group_key(topic: &str, group: &str) -> String {
        format!("group.{}.{}", escape(topic), escape(group))
    }

    /// Applies `change` to the group's state as stored and writes it back when it changed.
    /// Returns what `change` gave (an error too, once a state it changed on the way, say an
    /// expiry, is written).
    pub(crate) async fn change_group<T>(&self, topic: &str, group: &str, change: impl Fn(&mut GroupState, i64) -> Result<T, StreamError>) -> Result<T, StreamError> {
        let key = NatsStreams::group_key(topic, group);
        compare_and_set(&self.meta, &key, |value| {
            let before: GroupState = match value {
                Some(bytes) => serde_json::from_slice(bytes).map_err(|e| backend(format!("{key} does not parse: {e}")))?,
                None => GroupState::default(),
            };
            let mut state = before.clone();
            let outcome = change(&mut state, now_ms());
            let write = (state != before).then(|| serde_json::to_vec(&state).map(Bytes::from)).transpose().map_err(backend)?;
            Ok((write, outcome))
        })
        .await?
    }

    /// Writes a member's commit of `offset` at `generation`, unless a later generation's
    /// commit is stored.
    pub(crate) async fn write_member_offset(&self, topic: &str, group: &str, member_id: &str, partition: u32, offset: u64, generation: u64) -> Result<(), StreamError> {
        let key = NatsStreams::offset_key(topic, group, partition);
        compare_and_set(&self.meta, &key, |value| {
            if let Some(current) = value.filter(|v| !v.is_empty()).map(parse_offset).transpose()?.and_then(|(_, g)| g)
                && current > generation
            {
                return Err(StreamError::StaleGeneration { group: group.to_string(), member: member_id.to_string(), given: generation, current });
            }
            Ok((Some(Bytes::from(format!("{offset}@{generation}"))), ()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::parse_offset;

    #[test]
    fn offsets_parse_with_and_without_a_generation() {
        assert_eq!(parse_offset(b"17").unwrap(), (17, None));
        assert_eq!(parse_offset(b"17@3").unwrap(), (17, Some(3)));
        assert!(parse_offset(b"x@3").is_err());
        assert!(parse_offset(b"17@").is_err());
    }
}
