//! Idempotent producers: per producer id, the last few batches and their offsets, so that a
//! retried batch gets its original offsets back instead of being written twice.
//!
//! The table is rebuilt on open from the snapshot stored with the last sealed segment plus the
//! batches of the tail segment, so deduplication holds across restarts.

use std::collections::{HashMap, VecDeque};

/// Batches remembered per producer (Kafka keeps five in flight).
pub const PRODUCER_BATCHES_CACHED: usize = 5;
/// Producers remembered per partition; past this the least recently active is forgotten.
pub const PRODUCERS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedBatch {
    pub base_sequence: u32,
    pub last_sequence: u32,
    pub base_offset: u64,
    pub last_offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerState {
    pub batches: VecDeque<CachedBatch>,
    pub last_active_ms: i64,
}

/// What an idempotent append must do.
#[derive(Debug, PartialEq, Eq)]
pub enum SequenceCheck {
    /// The next expected sequence: append it.
    Append,
    /// A retry of a batch already written: answer with its offsets.
    Duplicate(CachedBatch),
    /// A gap or an old batch no longer remembered: refuse.
    OutOfOrder { expected: u32 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerTable {
    producers: HashMap<u64, ProducerState>,
}

impl ProducerTable {
    pub fn check(&self, producer_id: u64, base_sequence: u32, record_count: u32) -> SequenceCheck {
        let Some(state) = self.producers.get(&producer_id) else {
            // A producer we do not know (new, or forgotten) starts where it says it starts.
            return SequenceCheck::Append;
        };
        let last_sequence = base_sequence.wrapping_add(record_count - 1);
        if let Some(batch) = state.batches.iter().find(|b| b.base_sequence == base_sequence && b.last_sequence == last_sequence) {
            return SequenceCheck::Duplicate(*batch);
        }
        let expected = state.batches.back().map_or(0, |b| b.last_sequence.wrapping_add(1));
        if base_sequence == expected { SequenceCheck::Append } else { SequenceCheck::OutOfOrder { expected } }
    }

    pub fn record(&mut self, producer_id: u64, batch: CachedBatch, now_ms: i64) {
        if producer_id == 0 {
            return;
        }
        let full = !self.producers.contains_key(&producer_id) && self.producers.len() >= PRODUCERS_MAX;
        if let Some(oldest) = self.producers.iter().filter(|_| full).min_by_key(|(_, s)| s.last_active_ms).map(|(id, _)| *id) {
            self.producers.remove(&oldest);
        }
        let state = self.producers.entry(producer_id).or_default();
        state.batches.push_back(batch);
        while state.batches.len() > PRODUCER_BATCHES_CACHED {
            state.batches.pop_front();
        }
        state.last_active_ms = state.last_active_ms.max(now_ms);
    }

    /// Serialize for a segment's index file.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        let mut ids: Vec<&u64> = self.producers.keys().collect();
        ids.sort();
        for id in ids {
            let state = &self.producers[id];
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&state.last_active_ms.to_le_bytes());
            out.push(state.batches.len() as u8);
            for b in &state.batches {
                out.extend_from_slice(&b.base_sequence.to_le_bytes());
                out.extend_from_slice(&b.last_sequence.to_le_bytes());
                out.extend_from_slice(&b.base_offset.to_le_bytes());
                out.extend_from_slice(&b.last_offset.to_le_bytes());
            }
        }
    }

    /// Parse what [`ProducerTable::encode`] wrote; `None` when the bytes do not fit.
    pub fn decode(bytes: &mut &[u8]) -> Option<ProducerTable> {
        let count = take_u32(bytes)? as usize;
        if count > PRODUCERS_MAX {
            return None;
        }
        let mut producers = HashMap::with_capacity(count);
        for _ in 0..count {
            let id = take_u64(bytes)?;
            let last_active_ms = take_u64(bytes)? as i64;
            let n = *bytes.first()? as usize;
            *bytes = &bytes[1..];
            if n > PRODUCER_BATCHES_CACHED {
                return None;
            }
            let mut batches = VecDeque::with_capacity(n);
            for _ in 0..n {
                batches.push_back(CachedBatch {
                    base_sequence: take_u32(bytes)?,
                    last_sequence: take_u32(bytes)?,
                    base_offset: take_u64(bytes)?,
                    last_offset: take_u64(bytes)?,
                });
            }
            producers.insert(id, ProducerState { batches, last_active_ms });
        }
        Some(ProducerTable { producers })
    }
}

pub(crate) fn take_u32(bytes: &mut &[u8]) -> Option<u32> {
    let (head, rest) = bytes.split_at_checked(4)?;
    *bytes = rest;
    Some(u32::from_le_bytes(head.try_into().ok()?))
}

pub(crate) fn take_u64(bytes: &mut &[u8]) -> Option<u64> {
    let (head, rest) = bytes.split_at_checked(8)?;
    *bytes = rest;
    Some(u64::from_le_bytes(head.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_batch_is_recognised_and_a_gap_is_refused() {
        let mut table = ProducerTable::default();
        assert_eq!(table.check(9, 0, 3), SequenceCheck::Append);
        let batch = CachedBatch { base_sequence: 0, last_sequence: 2, base_offset: 10, last_offset: 12 };
        table.record(9, batch, 1);
        assert_eq!(table.check(9, 0, 3), SequenceCheck::Duplicate(batch));
        assert_eq!(table.check(9, 3, 1), SequenceCheck::Append);
        assert_eq!(table.check(9, 5, 1), SequenceCheck::OutOfOrder { expected: 3 });
        let mut bytes = Vec::new();
        table.encode(&mut bytes);
        assert_eq!(ProducerTable::decode(&mut bytes.as_slice()), Some(table));
    }
}
