//! One share group of a queue: which messages it has acked, leased, released or dead-lettered.
//!
//! Per priority level the state is a start offset (everything below it is acked or archived)
//! plus a window of per-offset entries above it, bounded by [`QUEUE_WINDOW_RECORDS_MAX`] and
//! [`QUEUE_WINDOW_BYTES_MAX`]: the window is filled from the level's log as it advances, so
//! memory does not grow with the backlog. Every change that matters is journaled (see
//! [`super::journal`]) before the call that made it returns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use tributary_core::limits::QUEUE_PRIORITY_LEVELS;
use tributary_core::{Header, Record, StoredRecord};
use tributary_log::{Log, LogConfig, PendingAppend};

use super::error::{QueueError, Result};
use super::journal::{JournalRecord, SNAPSHOT_PART_ENTRIES_MAX, SnapshotEntry};
use super::message::{self, Delivery, MessageId, Receipt, ReceiptOutcome};
use super::queue::Core;
use super::{QUEUE_JOURNAL_SEGMENT_BYTES, QUEUE_PRIORITY_WEIGHTS, QUEUE_SNAPSHOT_EVERY_RECORDS, QUEUE_WINDOW_BYTES_MAX, QUEUE_WINDOW_RECORDS_MAX};

const LEVELS: usize = QUEUE_PRIORITY_LEVELS as usize;
/// Records read from a log per fill step.
const FILL_RECORDS_MAX: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Available { at_ms: u64 },
    Acquired { consumer: Arc<str>, deadline_ms: u64 },
    Acked,
    Archived,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    state: State,
    /// Deliveries so far.
    count: u32,
}

struct Entry {
    meta: Meta,
    /// The record while it may still be delivered or dead-lettered; dropped once done.
    record: Option<StoredRecord>,
    bytes: usize,
}

impl Entry {
    fn is_done(&self) -> bool {
        matches!(self.meta.state, State::Acked | State::Archived)
    }
}

#[derive(Default)]
struct Level {
    start: u64,
    entries: VecDeque<Entry>,
    /// States recovered for offsets not yet in the window; consumed as the window fills.
    overrides: BTreeMap<u64, Meta>,
    bytes: usize,
    in_flight: usize,
    done: usize,
    /// No entry below this index is in state AVAILABLE.
    hint: usize,
}

impl Level {
    fn end(&self) -> u64 {
        self.start + self.entries.len() as u64
    }

    fn index(&self, offset: u64) -> Option<usize> {
        let index = offset.checked_sub(self.start)? as usize;
        (index < self.entries.len()).then_some(index)
    }

    fn finish(&mut self, index: usize, state: State) {
        let entry = &mut self.entries[index];
        debug_assert!(!entry.is_done());
        if matches!(entry.meta.state, State::Acquired { .. }) {
            self.in_flight -= 1;
        }
        entry.meta.state = state;
        entry.record = None;
        self.bytes -= entry.bytes;
        entry.bytes = 0;
        self.done += 1;
    }

    fn make_available(&mut self, index: usize, at_ms: u64) {
        let entry = &mut self.entries[index];
        if matches!(entry.meta.state, State::Acquired { .. }) {
            self.in_flight -= 1;
        }
        entry.meta.state = State::Available { at_ms };
        self.hint = self.hint.min(index);
    }

    /// Drop done entries from the front, moving `start` up.
    fn advance(&mut self) {
        while self.entries.front().is_some_and(Entry::is_done) {
            self.entries.pop_front();
            self.start += 1;
            self.done -= 1;
            self.hint = self.hint.saturating_sub(1);
        }
        if self.entries.is_empty() {
            while let Some(entry) = self.overrides.first_entry() {
                if *entry.key() == self.start && matches!(entry.get().state, State::Acked | State::Archived) {
                    entry.remove();
                    self.start += 1;
                } else {
                    break;
                }
            }
        }
    }

    /// Read records from `log` into the window, up to the window bounds (or, when `force_to` is
    /// set, at least up to that offset).
    fn fill(&mut self, log: &Log, group: &str, force_to: Option<u64>) -> Result<()> {
        if self.entries.is_empty() && self.start < log.start_offset() {
            self.start = log.start_offset();
            self.overrides = self.overrides.split_off(&self.start);
        }
        loop {
            let end = self.end();
            if end >= log.high_watermark() {
                return Ok(());
            }
            let forced = force_to.is_some_and(|to| end <= to);
            if !forced && (self.entries.len() >= QUEUE_WINDOW_RECORDS_MAX || self.bytes >= QUEUE_WINDOW_BYTES_MAX) {
                return Ok(());
            }
            let (records_max, bytes_max) = if forced {
                (FILL_RECORDS_MAX, QUEUE_WINDOW_BYTES_MAX)
            } else {
                ((QUEUE_WINDOW_RECORDS_MAX - self.entries.len()).min(FILL_RECORDS_MAX), QUEUE_WINDOW_BYTES_MAX - self.bytes)
            };
            let records = log.read(end, records_max, bytes_max)?;
            if records.is_empty() {
                return Ok(());
            }
            for record in records {
                assert_eq!(record.offset, self.end(), "a log read returns consecutive offsets");
                self.push(record, group);
            }
        }
    }

    fn push(&mut self, record: StoredRecord, group: &str) {
        let meta = self.overrides.remove(&record.offset).unwrap_or_else(|| {
            let for_other_group = message::header_str(&record.headers, message::HEADER_ONLY_GROUP).is_some_and(|only| only != group);
            if for_other_group {
                Meta { state: State::Acked, count: 0 }
            } else {
                let at_ms = message::header_u64(&record.headers, message::HEADER_DELIVER_AT).unwrap_or(0);
                Meta { state: State::Available { at_ms }, count: 0 }
            }
        });
        let index = self.entries.len();
        let entry = match meta.state {
            State::Acked | State::Archived => {
                self.done += 1;
                Entry { meta, record: None, bytes: 0 }
            }
            State::Available { .. } | State::Acquired { .. } => {
                if matches!(meta.state, State::Available { .. }) {
                    self.hint = self.hint.min(index);
                } else {
                    self.in_flight += 1;
                }
                let bytes = record_bytes(&record);
                self.bytes += bytes;
                Entry { meta, record: Some(record), bytes }
            }
        };
        self.entries.push_back(entry);
    }
}

fn record_bytes(record: &StoredRecord) -> usize {
    64 + record.value.as_ref().map_or(0, |v| v.len())
        + record.key.as_ref().map_or(0, |k| k.len())
        + record.headers.iter().map(|h| h.name.len() + h.value.len() + 32).sum::<usize>()
}

pub(crate) struct GroupState {
    levels: Vec<Level>,
    consumers: HashMap<Arc<str>, usize>,
    acked_total: u64,
    archived_total: u64,
    /// Smooth weighted round-robin credit per level.
    credit: [i64; LEVELS],
    /// No lease expires before this (a lower bound; recomputed on each expiry scan).
    next_expiry_ms: u64,
    journal_since_snapshot: u64,
    last_snapshot: Option<u64>,
}

/// A group: its name, its journal, its state behind one lock.
pub(crate) struct Group {
    pub name: String,
    pub hash: u32,
    journal: Log,
    state: Mutex<GroupState>,
}

/// What one receive attempt got.
pub(crate) struct Received {
    pub deliveries: Vec<Delivery>,
    pub pending: Vec<PendingAppend>,
    /// Leases returned to the pool (expired): other waiters may want to look.
    pub released: bool,
    /// The earliest time something not yet due becomes available, if known.
    pub next_due_ms: Option<u64>,
}

/// Per-group numbers for stats.
pub(crate) struct GroupNumbers {
    pub available: u64,
    pub delayed: u64,
    pub in_flight: u64,
    pub backlog: u64,
    pub acked_total: u64,
    pub archived_total: u64,
    pub oldest_available_enqueued_ms: Option<u64>,
}

pub(crate) fn group_hash(name: &str) -> u32 {
    let hash = tributary_core::key_hash(name.as_bytes());
    (hash ^ (hash >> 32)) as u32
}

impl Group {
    /// Open (or create) the group whose journal lives in `dir`, rebuilding its state from the
    /// last snapshot and the journal tail.
    pub(crate) fn open(core: &Core, name: &str, dir: &Path) -> Result<Group> {
        let config = LogConfig { durability: core.config.durability, segment_bytes_max: QUEUE_JOURNAL_SEGMENT_BYTES, ..LogConfig::default() };
        let (journal, _report) = Log::open(dir.join("state"), config)?;
        let mut levels: Vec<Level> = core.levels.iter().map(|log| Level { start: log.start_offset(), ..Level::default() }).collect();
        let mut acked_total = 0;
        let mut archived_total = 0;
        let mut last_snapshot = None;
        let mut since = 0u64;
        let mut from = journal.start_offset();
        let end = journal.high_watermark();
        let path = journal.dir().display().to_string();
        while from < end {
            let records = journal.read(from, 4096, 16 << 20)?;
            if records.is_empty() {
                break;
            }
            for record in records {
                from = record.offset + 1;
                since += 1;
                let bytes = record.value.as_deref().unwrap_or_default();
                let entry = JournalRecord::decode(bytes).map_err(|reason| QueueError::Corrupt { path: path.clone(), reason: format!("journal record {}: {reason}", record.offset) })?;
                let set = |levels: &mut Vec<Level>, level: u8, offset: u64, meta: Meta| {
                    if let Some(level) = levels.get_mut(level as usize)
                        && offset >= level.start
                    {
                        level.overrides.insert(offset, meta);
                    }
                };
                match entry {
                    JournalRecord::Snapshot { starts, acked_total: acked, archived_total: archived } => {
                        for (level, start) in levels.iter_mut().zip(starts) {
                            level.start = start;
                            level.overrides.clear();
                        }
                        acked_total = acked;
                        archived_total = archived;
                        last_snapshot = Some(record.offset);
                        since = 0;
                    }
                    JournalRecord::SnapshotPart { level, entries } => {
                        for (offset, entry) in entries {
                            let meta = match entry {
                                SnapshotEntry::Available { count, at_ms } => Meta { state: State::Available { at_ms }, count },
                                SnapshotEntry::Acquired { count, consumer, deadline_ms } => Meta { state: State::Acquired { consumer: consumer.into(), deadline_ms }, count },
                                SnapshotEntry::Acked => Meta { state: State::Acked, count: 0 },
                                SnapshotEntry::Archived => Meta { state: State::Archived, count: 0 },
                            };
                            set(&mut levels, level, offset, meta);
                        }
                    }
                    JournalRecord::Acquire { consumer, deadline_ms, items } => {
                        let consumer: Arc<str> = consumer.into();
                        for (level, offset, count) in items {
                            set(&mut levels, level, offset, Meta { state: State::Acquired { consumer: consumer.clone(), deadline_ms }, count });
                        }
                    }
                    JournalRecord::Ack { items } => {
                        acked_total += items.len() as u64;
                        for (level, offset) in items {
                            set(&mut levels, level, offset, Meta { state: State::Acked, count: 0 });
                        }
                    }
                    JournalRecord::Archive { items } => {
                        archived_total += items.len() as u64;
                        for (level, offset) in items {
                            set(&mut levels, level, offset, Meta { state: State::Archived, count: 0 });
                        }
                    }
                    JournalRecord::Release { items } => {
                        for (level, offset, count, at_ms) in items {
                            set(&mut levels, level, offset, Meta { state: State::Available { at_ms }, count });
                        }
                    }
                    JournalRecord::Extend { deadline_ms, items } => {
                        for (level, offset) in items {
                            if let Some(level) = levels.get_mut(level as usize)
                                && let Some(Meta { state: State::Acquired { deadline_ms: deadline, .. }, .. }) = level.overrides.get_mut(&offset)
                            {
                                *deadline = deadline_ms;
                            }
                        }
                    }
                }
            }
        }
        let mut consumers: HashMap<Arc<str>, usize> = HashMap::new();
        let mut next_expiry_ms = u64::MAX;
        for (level, log) in levels.iter_mut().zip(&core.levels) {
            level.advance();
            // Every recovered lease and release must be back in the window.
            let force_to = level.overrides.last_key_value().map(|(offset, _)| *offset);
            level.fill(log, name, force_to)?;
            level.advance();
            for entry in &level.entries {
                if let State::Acquired { consumer, deadline_ms } = &entry.meta.state {
                    *consumers.entry(consumer.clone()).or_default() += 1;
                    next_expiry_ms = next_expiry_ms.min(*deadline_ms);
                }
            }
        }
        let state = GroupState {
            levels,
            consumers,
            acked_total,
            archived_total,
            credit: [0; LEVELS],
            next_expiry_ms,
            journal_since_snapshot: since,
            last_snapshot,
        };
        let group = Group { name: name.to_string(), hash: group_hash(name), journal, state: Mutex::new(state) };
        // Expiry is not journaled: leases whose deadline passed before the restart are released
        // now, as they would have been (or were) before it.
        let (_, pending) = group.tick(core)?;
        for appended in pending {
            appended.wait()?;
        }
        Ok(group)
    }

    pub(crate) fn close(&self) -> Result<()> {
        Ok(self.journal.close()?)
    }

    /// Lease up to `max` messages to `consumer` without waiting. The caller waits on `pending`
    /// before handing the deliveries out.
    pub(crate) fn receive(&self, core: &Core, consumer: &str, max: usize, lease_ms: u64) -> Result<Received> {
        let now = core.clock.now_ms();
        let mut pending = Vec::new();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let released = self.expire(core, state, now, &mut pending)? > 0;
        let held = state.consumers.get(consumer).copied().unwrap_or(0);
        let limit = core.config.in_flight_per_consumer_max;
        if held >= limit {
            return Err(QueueError::LimitExceeded { limit: "in_flight_per_consumer_max", max: limit as u64, got: held as u64 + 1 });
        }
        let want = max.min(limit - held);
        for (level, log) in state.levels.iter_mut().zip(&core.levels) {
            level.fill(log, &self.name, None)?;
        }
        // Candidates per level, in offset order.
        let mut candidates: [Vec<usize>; LEVELS] = Default::default();
        let mut next_due_ms: Option<u64> = None;
        let mut to_archive = Vec::new();
        for (l, level) in state.levels.iter_mut().enumerate() {
            while level.hint < level.entries.len() && !matches!(level.entries[level.hint].meta.state, State::Available { .. }) {
                level.hint += 1;
            }
            for index in level.hint..level.entries.len() {
                let entry = &level.entries[index];
                if let State::Available { at_ms } = entry.meta.state {
                    if at_ms > now {
                        next_due_ms = Some(next_due_ms.map_or(at_ms, |due| due.min(at_ms)));
                    } else if entry.meta.count >= core.config.deliveries_max {
                        // Only after deliveries_max was lowered: dead-letter instead of delivering.
                        to_archive.push((l, index));
                    } else {
                        candidates[l].push(index);
                        if candidates[l].len() >= want {
                            break;
                        }
                    }
                }
            }
        }
        if !to_archive.is_empty() {
            self.archive(core, state, &to_archive, "delivery count reached deliveries_max", now, &mut pending)?;
        }
        // Smooth weighted round-robin over the levels that have work: no level starves.
        let mut chosen = Vec::with_capacity(want);
        let mut cursor = [0usize; LEVELS];
        while chosen.len() < want {
            let mut total = 0i64;
            let mut best: Option<usize> = None;
            for l in 0..LEVELS {
                if cursor[l] < candidates[l].len() {
                    let weight = i64::from(QUEUE_PRIORITY_WEIGHTS[l]);
                    total += weight;
                    state.credit[l] += weight;
                    if best.is_none_or(|b| state.credit[l] > state.credit[b]) {
                        best = Some(l);
                    }
                }
            }
            let Some(l) = best else { break };
            state.credit[l] -= total;
            chosen.push((l, candidates[l][cursor[l]]));
            cursor[l] += 1;
        }
        let mut deliveries = Vec::with_capacity(chosen.len());
        if !chosen.is_empty() {
            let consumer: Arc<str> = match state.consumers.get_key_value(consumer) {
                Some((name, _)) => name.clone(),
                None => consumer.into(),
            };
            let deadline_ms = now.saturating_add(lease_ms);
            let mut items = Vec::with_capacity(chosen.len());
            for &(l, index) in &chosen {
                let level = &mut state.levels[l];
                let entry = &mut level.entries[index];
                let offset = level.start + index as u64;
                entry.meta.count += 1;
                entry.meta.state = State::Acquired { consumer: consumer.clone(), deadline_ms };
                level.in_flight += 1;
                let record = entry.record.as_ref().expect("an available entry holds its record");
                let id = MessageId { priority: l as u8, offset };
                deliveries.push(Delivery {
                    id,
                    receipt: Receipt::new(self.hash, id, entry.meta.count),
                    body: record.value.clone().unwrap_or_default(),
                    key: record.key.clone(),
                    headers: message::user_headers(&record.headers),
                    priority: l as u8,
                    delivery_count: entry.meta.count,
                    enqueued_at_ms: record.timestamp_ms.max(0) as u64,
                });
                items.push((l as u8, offset, entry.meta.count));
            }
            *state.consumers.entry(consumer.clone()).or_default() += chosen.len();
            state.next_expiry_ms = state.next_expiry_ms.min(deadline_ms);
            pending.push(self.journal(state, &JournalRecord::Acquire { consumer: consumer.to_string(), deadline_ms, items })?);
        }
        advance(state);
        Ok(Received { deliveries, pending, released, next_due_ms })
    }

    /// Return expired leases to the pool (or dead-letter them); returns how many expired.
    fn expire(&self, core: &Core, state: &mut GroupState, now: u64, pending: &mut Vec<PendingAppend>) -> Result<usize> {
        if now < state.next_expiry_ms {
            return Ok(0);
        }
        let mut next = u64::MAX;
        let mut expired = 0;
        let mut to_archive = Vec::new();
        for (l, level) in state.levels.iter_mut().enumerate() {
            if level.in_flight == 0 {
                continue;
            }
            for index in 0..level.entries.len() {
                let State::Acquired { consumer, deadline_ms } = &level.entries[index].meta.state else { continue };
                if *deadline_ms > now {
                    next = next.min(*deadline_ms);
                    continue;
                }
                release_consumer(&mut state.consumers, consumer);
                expired += 1;
                if level.entries[index].meta.count >= core.config.deliveries_max {
                    to_archive.push((l, index));
                }
                level.make_available(index, now);
            }
        }
        state.next_expiry_ms = next;
        if !to_archive.is_empty() {
            self.archive(core, state, &to_archive, "lease expired on the last allowed delivery", now, pending)?;
        }
        Ok(expired)
    }

    /// Dead-letter the entries at `(level, index)`: append them to the dead-letter log (durable
    /// first), then journal the archive. Entries must be AVAILABLE (release leases first).
    fn archive(&self, core: &Core, state: &mut GroupState, items: &[(usize, usize)], reason: &str, now: u64, pending: &mut Vec<PendingAppend>) -> Result<()> {
        let mut records = Vec::with_capacity(items.len());
        let mut journal_items = Vec::with_capacity(items.len());
        for &(l, index) in items {
            let level = &state.levels[l];
            let entry = &level.entries[index];
            let record = entry.record.as_ref().expect("an entry to archive holds its record");
            let id = MessageId { priority: l as u8, offset: level.start + index as u64 };
            let mut headers = message::user_headers(&record.headers);
            let header = |name: &str, value: Vec<u8>| Header { name: name.to_string(), value: value.into() };
            headers.push(header(message::HEADER_DLQ_ID, id.to_string().into_bytes()));
            headers.push(header(message::HEADER_DLQ_GROUP, self.name.clone().into_bytes()));
            headers.push(header(message::HEADER_DLQ_DELIVERIES, u64::from(entry.meta.count).to_be_bytes().to_vec()));
            headers.push(header(message::HEADER_DLQ_REASON, reason.as_bytes().to_vec()));
            headers.push(header(message::HEADER_DLQ_ENQUEUED_AT, (record.timestamp_ms.max(0) as u64).to_be_bytes().to_vec()));
            records.push(Record { key: record.key.clone(), value: Some(record.value.clone().unwrap_or_default()), headers, timestamp_ms: now as i64 });
            journal_items.push((l as u8, id.offset));
        }
        // The dead letter must be durable before the archive is: otherwise a crash between the
        // two could lose the message. A crash after it and before the journal dead-letters the
        // message a second time (at-least-once).
        for chunk in records.chunks(tributary_core::limits::BATCH_RECORDS_MAX) {
            core.dlq.append(chunk)?;
        }
        for &(l, index) in items {
            let level = &mut state.levels[l];
            if let State::Acquired { consumer, .. } = &level.entries[index].meta.state {
                let consumer = consumer.clone();
                release_consumer(&mut state.consumers, &consumer);
            }
            level.finish(index, State::Archived);
        }
        state.archived_total += items.len() as u64;
        pending.push(self.journal(state, &JournalRecord::Archive { items: journal_items })?);
        // No `advance` here: callers still hold window indices.
        Ok(())
    }

    pub(crate) fn ack(&self, core: &Core, receipts: &[Receipt]) -> Result<(Vec<ReceiptOutcome>, Vec<PendingAppend>)> {
        let _ = core;
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut items = Vec::new();
        let outcomes = self.settle_each(state, receipts, |state, l, index| {
            let level = &mut state.levels[l];
            match &level.entries[index].meta.state {
                State::Acquired { consumer, .. } => {
                    let consumer = consumer.clone();
                    release_consumer(&mut state.consumers, &consumer);
                }
                State::Available { .. } => {}
                State::Acked | State::Archived => unreachable!("locate refuses done entries"),
            }
            level.finish(index, State::Acked);
            items.push((l as u8, level.start + index as u64));
            ReceiptOutcome::Ok
        });
        let mut pending = Vec::new();
        if !items.is_empty() {
            state.acked_total += items.len() as u64;
            advance(state);
            pending.push(self.journal(state, &JournalRecord::Ack { items })?);
        }
        Ok((outcomes, pending))
    }

    /// Release leased messages: available again after `delay_ms` (or the queue's backoff), or
    /// dead-lettered when they reached `deliveries_max`.
    pub(crate) fn nack(&self, core: &Core, receipts: &[Receipt], delay_ms: Option<u64>) -> Result<(Vec<ReceiptOutcome>, Vec<PendingAppend>)> {
        let now = core.clock.now_ms();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut released = Vec::new();
        let mut to_archive = Vec::new();
        let hash = self.hash;
        let outcomes = self.settle_each(state, receipts, |state, l, index| {
            let level = &mut state.levels[l];
            let entry = &level.entries[index];
            let offset = level.start + index as u64;
            match &entry.meta.state {
                State::Acquired { consumer, .. } => {
                    let consumer = consumer.clone();
                    let count = entry.meta.count;
                    release_consumer(&mut state.consumers, &consumer);
                    if count >= core.config.deliveries_max {
                        level.make_available(index, now);
                        to_archive.push((l, index));
                    } else {
                        let delay = delay_ms.unwrap_or_else(|| core.config.backoff.delay_ms(count, offset ^ (u64::from(hash) << 32) ^ u64::from(count)));
                        let at_ms = now.saturating_add(delay);
                        level.make_available(index, at_ms);
                        released.push((l as u8, offset, count, at_ms));
                    }
                    ReceiptOutcome::Ok
                }
                // The lease expired already: nothing to release.
                _ => ReceiptOutcome::Stale,
            }
        });
        let mut pending = Vec::new();
        if !released.is_empty() {
            pending.push(self.journal(state, &JournalRecord::Release { items: released })?);
        }
        if !to_archive.is_empty() {
            self.archive(core, state, &to_archive, "nacked on the last allowed delivery", now, &mut pending)?;
        }
        advance(state);
        Ok((outcomes, pending))
    }

    pub(crate) fn extend(&self, core: &Core, receipts: &[Receipt], lease_ms: u64) -> Result<(Vec<ReceiptOutcome>, Vec<PendingAppend>)> {
        let now = core.clock.now_ms();
        let deadline = now.saturating_add(lease_ms);
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut items = Vec::new();
        let outcomes = self.settle_each(state, receipts, |state, l, index| {
            let level = &mut state.levels[l];
            let offset = level.start + index as u64;
            match &mut level.entries[index].meta.state {
                State::Acquired { deadline_ms, .. } => {
                    *deadline_ms = deadline;
                    items.push((l as u8, offset));
                    ReceiptOutcome::Ok
                }
                _ => ReceiptOutcome::Stale,
            }
        });
        let mut pending = Vec::new();
        if !items.is_empty() {
            state.next_expiry_ms = state.next_expiry_ms.min(deadline);
            pending.push(self.journal(state, &JournalRecord::Extend { deadline_ms: deadline, items })?);
        }
        Ok((outcomes, pending))
    }

    /// Process lease expiry now; returns how many leases expired.
    pub(crate) fn tick(&self, core: &Core) -> Result<(usize, Vec<PendingAppend>)> {
        let now = core.clock.now_ms();
        let mut pending = Vec::new();
        let mut guard = self.state.lock();
        let expired = self.expire(core, &mut guard, now, &mut pending)?;
        advance(&mut guard);
        Ok((expired, pending))
    }

    /// The window entry a receipt names, if the receipt still holds it: `(level, index, attempt)`.
    /// Apply `settle` to each receipt that names a live delivery of this group (its level and
    /// window index); receipts that do not get their outcome from [`Group::locate`].
    fn settle_each(&self, state: &mut GroupState, receipts: &[Receipt], mut settle: impl FnMut(&mut GroupState, usize, usize) -> ReceiptOutcome) -> Vec<ReceiptOutcome> {
        receipts
            .iter()
            .map(|receipt| match self.locate(state, receipt) {
                Err(outcome) => outcome,
                Ok((l, index, _)) => settle(state, l, index),
            })
            .collect()
    }

    fn locate(&self, state: &GroupState, receipt: &Receipt) -> Result<(usize, usize, u32), ReceiptOutcome> {
        let parts = receipt.parse().ok_or(ReceiptOutcome::Invalid)?;
        if parts.group_hash != self.hash || parts.id.priority >= QUEUE_PRIORITY_LEVELS || parts.attempt == 0 {
            return Err(ReceiptOutcome::Invalid);
        }
        let l = parts.id.priority as usize;
        let level = &state.levels[l];
        let index = level.index(parts.id.offset).ok_or(ReceiptOutcome::Stale)?;
        let entry = &level.entries[index];
        if entry.meta.count != parts.attempt || entry.is_done() {
            return Err(ReceiptOutcome::Stale);
        }
        Ok((l, index, parts.attempt))
    }

    /// Append one journal record (under the state lock, so the journal order is the order of
    /// the changes), and a snapshot every `QUEUE_SNAPSHOT_EVERY_RECORDS` records.
    fn journal(&self, state: &mut GroupState, record: &JournalRecord) -> Result<PendingAppend> {
        let appended = self.journal.append_pending(&[Record::from_value(record.encode())], 0, 0)?;
        state.journal_since_snapshot += 1;
        if state.journal_since_snapshot >= snapshot_every() {
            self.snapshot(state)?;
        }
        Ok(appended)
    }

    fn snapshot(&self, state: &mut GroupState) -> Result<()> {
        let mut records = vec![Record::from_value(
            JournalRecord::Snapshot { starts: state.levels.iter().map(|l| l.start).collect(), acked_total: state.acked_total, archived_total: state.archived_total }
                .encode(),
        )];
        for (l, level) in state.levels.iter().enumerate() {
            let mut entries = Vec::new();
            let window = level.entries.iter().enumerate().map(|(i, e)| (level.start + i as u64, &e.meta));
            for (offset, meta) in window.chain(level.overrides.iter().map(|(o, m)| (*o, m))) {
                let entry = match &meta.state {
                    State::Available { .. } if meta.count == 0 => continue,
                    State::Available { at_ms } => SnapshotEntry::Available { count: meta.count, at_ms: *at_ms },
                    State::Acquired { consumer, deadline_ms } => SnapshotEntry::Acquired { count: meta.count, consumer: consumer.to_string(), deadline_ms: *deadline_ms },
                    State::Acked => SnapshotEntry::Acked,
                    State::Archived => SnapshotEntry::Archived,
                };
                entries.push((offset, entry));
                if entries.len() >= SNAPSHOT_PART_ENTRIES_MAX {
                    records.push(Record::from_value(JournalRecord::SnapshotPart { level: l as u8, entries: std::mem::take(&mut entries) }.encode()));
                }
            }
            if !entries.is_empty() {
                records.push(Record::from_value(JournalRecord::SnapshotPart { level: l as u8, entries }.encode()));
            }
        }
        let appended = self.journal.append_pending(&records, 0, 0)?;
        let offset = appended.offsets().base_offset;
        // Not waited for here: the caller's wait on a later record covers it.
        drop(appended);
        state.journal_since_snapshot = 0;
        if let Some(previous) = state.last_snapshot.replace(offset)
            && self.journal.high_watermark() > previous
        {
            // The previous snapshot is durable: everything before it can go.
            self.journal.truncate_before(previous)?;
        }
        Ok(())
    }

    /// Per priority level, the offset below which this group is done with every message.
    pub(crate) fn level_starts(&self) -> Vec<u64> {
        self.state.lock().levels.iter().map(|level| level.start).collect()
    }

    pub(crate) fn numbers(&self, core: &Core) -> GroupNumbers {
        let now = core.clock.now_ms();
        let state = self.state.lock();
        let mut numbers = GroupNumbers {
            available: 0,
            delayed: 0,
            in_flight: 0,
            backlog: 0,
            acked_total: state.acked_total,
            archived_total: state.archived_total,
            oldest_available_enqueued_ms: None,
        };
        for (level, log) in state.levels.iter().zip(&core.levels) {
            numbers.in_flight += level.in_flight as u64;
            numbers.backlog += log.high_watermark().saturating_sub(level.end());
            for entry in level.entries.iter().skip(level.hint) {
                if let State::Available { at_ms } = entry.meta.state {
                    if at_ms > now {
                        numbers.delayed += 1;
                    } else {
                        numbers.available += 1;
                        let enqueued = entry.record.as_ref().map_or(now, |r| r.timestamp_ms.max(0) as u64);
                        numbers.oldest_available_enqueued_ms = Some(numbers.oldest_available_enqueued_ms.map_or(enqueued, |o| o.min(enqueued)));
                    }
                }
            }
        }
        numbers
    }
}

#[cfg(test)]
thread_local! {
    /// Tests on this thread snapshot after this many journal records instead.
    pub(crate) static SNAPSHOT_EVERY_FOR_TESTS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn snapshot_every() -> u64 {
    #[cfg(test)]
    if let Some(every) = SNAPSHOT_EVERY_FOR_TESTS.with(std::cell::Cell::get) {
        return every;
    }
    QUEUE_SNAPSHOT_EVERY_RECORDS
}

fn advance(state: &mut GroupState) {
    for level in &mut state.levels {
        level.advance();
    }
}

fn release_consumer(consumers: &mut HashMap<Arc<str>, usize>, consumer: &Arc<str>) {
    if let Some(held) = consumers.get_mut(consumer) {
        *held -= 1;
        if *held == 0 {
            consumers.remove(consumer);
        }
    }
}

#[cfg(test)]
impl Group {
    pub(crate) fn window_records(&self) -> usize {
        self.state.lock().levels.iter().map(|l| l.entries.len()).sum()
    }
}
