//! One queue: its priority logs, its dead-letter log, its groups, its dedup map.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tributary_core::limits::{
    BATCH_RECORDS_MAX, HEADERS_COUNT_MAX, KEY_BYTES_MAX, MESSAGE_BYTES_MAX, QUEUE_DELAY_MS_MAX, QUEUE_LEASE_MS_MAX, QUEUE_PRIORITY_LEVELS, check_name,
};
use tributary_core::{Header, Record, StoredRecord};
use tributary_log::{Log, LogConfig, PendingAppend};

use super::clock::Clock;
use super::config::QueueConfig;
use super::error::{QueueError, Result, io};
use super::group::Group;
use super::message::{self, DeadLetter, Delivery, MessageId, NewMessage, Receipt, ReceiptOutcome, Redrive};
use super::{QUEUE_DEDUP_ID_BYTES_MAX, QUEUE_DEDUP_IDS_MAX, QUEUE_JOURNAL_SEGMENT_BYTES, QUEUE_RECEIVE_MESSAGES_MAX, QUEUE_RECEIVE_WAIT_MS_MAX};

/// What the groups of a queue share: its configuration, its clock and its logs.
pub(crate) struct Core {
    pub config: QueueConfig,
    pub clock: Arc<dyn Clock>,
    /// One log per priority level, `p0` (highest) first.
    pub levels: Vec<Log>,
    pub dlq: Log,
}

/// Numbers of one group (see [`QueueStats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStats {
    pub name: String,
    /// Messages the group has not acked or dead-lettered and that nobody holds: available now
    /// plus delayed (not yet due).
    pub depth: u64,
    /// Of `depth`, not yet due (delay or nack backoff), counted within the window.
    pub delayed: u64,
    pub in_flight: u64,
    /// Messages not yet acked or dead-lettered by the group (`depth + in_flight`).
    pub lag: u64,
    pub acked_total: u64,
    pub dead_lettered: u64,
    /// Age of the oldest message available now, if the window holds one.
    pub oldest_available_age_ms: Option<u64>,
}

/// A queue's numbers, summed over the groups asked for. O(window) to compute, never O(backlog).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    pub published_total: u64,
    pub depth: u64,
    pub delayed: u64,
    pub in_flight: u64,
    pub lag: u64,
    pub acked_total: u64,
    pub dead_lettered: u64,
    pub oldest_available_age_ms: Option<u64>,
    pub groups: Vec<GroupStats>,
}

impl QueueStats {
    /// The queue's numbers: `groups` listed, and summed (the oldest age is the largest).
    pub fn summed(published_total: u64, groups: Vec<GroupStats>) -> QueueStats {
        let mut stats = QueueStats {
            published_total,
            depth: 0,
            delayed: 0,
            in_flight: 0,
            lag: 0,
            acked_total: 0,
            dead_lettered: 0,
            oldest_available_age_ms: None,
            groups: Vec::new(),
        };
        for group in &groups {
            stats.depth += group.depth;
            stats.delayed += group.delayed;
            stats.in_flight += group.in_flight;
            stats.lag += group.lag;
            stats.acked_total += group.acked_total;
            stats.dead_lettered += group.dead_lettered;
            stats.oldest_available_age_ms = stats.oldest_available_age_ms.max(group.oldest_available_age_ms);
        }
        stats.groups = groups;
        stats
    }
}

/// Wakes long-polling receivers when something may have become available.
struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    fn current(&self) -> u64 {
        *self.generation.lock()
    }
    fn notify(&self) {
        *self.generation.lock() += 1;
        self.changed.notify_all();
    }
    fn wait(&self, seen: u64, until: Instant) {
        let mut generation = self.generation.lock();
        while *generation == seen {
            if self.changed.wait_until(&mut generation, until).timed_out() {
                return;
            }
        }
    }
}

/// Dedup ids seen within the window, oldest first.
#[derive(Default)]
struct Dedup {
    ids: HashMap<String, (MessageId, u64)>,
    order: VecDeque<(u64, String)>,
}

impl Dedup {
    fn insert(&mut self, dedup_id: String, id: MessageId, at_ms: u64) {
        self.ids.insert(dedup_id.clone(), (id, at_ms));
        self.order.push_back((at_ms, dedup_id));
    }

    /// Forget ids older than the window, and the oldest beyond `QUEUE_DEDUP_IDS_MAX`.
    fn expire(&mut self, now: u64, window_ms: u64) {
        while let Some((at_ms, _)) = self.order.front() {
            if at_ms.saturating_add(window_ms) > now && self.order.len() <= QUEUE_DEDUP_IDS_MAX {
                break;
            }
            let (at_ms, dedup_id) = self.order.pop_front().expect("front exists");
            if self.ids.get(&dedup_id).is_some_and(|(_, at)| *at == at_ms) {
                self.ids.remove(&dedup_id);
            }
        }
    }
}

/// Dead letters already republished, by dead-letter offset, persisted in `<queue>/dlq-redriven`.
struct Redriven {
    log: Log,
    offsets: BTreeSet<u64>,
}

/// A durable work queue. Cheap to share (`Arc<Queue>`); every method takes `&self`.
pub struct Queue {
    name: String,
    dir: PathBuf,
    core: Core,
    groups: RwLock<BTreeMap<String, Arc<Group>>>,
    dedup: Mutex<Dedup>,
    redriven: Mutex<Redriven>,
    signal: Signal,
    deleted: AtomicBool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).field("dir", &self.dir).finish()
    }
}

fn name_error(error: String) -> QueueError {
    QueueError::InvalidName(error)
}

impl Queue {
    /// Create the queue directory and its config, then open it.
    pub(crate) fn create(dir: &Path, name: &str, config: QueueConfig, clock: Arc<dyn Clock>) -> Result<Queue> {
        config.validate()?;
        std::fs::create_dir_all(dir).map_err(io(|| format!("creating {}", dir.display())))?;
        config.save(dir)?;
        if let Some(parent) = dir.parent() {
            super::config::sync_dir(parent)?;
        }
        Queue::open(dir, name, clock)
    }

    /// Open an existing queue: its logs, its groups (from their snapshots and journals), its
    /// dedup map (from the tail of the logs within the window) and its redrive marks.
    pub(crate) fn open(dir: &Path, name: &str, clock: Arc<dyn Clock>) -> Result<Queue> {
        let config = QueueConfig::load(dir)?;
        let log_config = LogConfig { durability: config.durability, segment_bytes_max: config.segment_bytes, ..LogConfig::default() };
        let mut levels = Vec::with_capacity(QUEUE_PRIORITY_LEVELS as usize);
        for level in 0..QUEUE_PRIORITY_LEVELS {
            levels.push(Log::open(dir.join(format!("p{level}")), log_config.clone())?.0);
        }
        let dlq = Log::open(dir.join("dlq"), log_config)?.0;
        let redriven_config = LogConfig { durability: config.durability, segment_bytes_max: QUEUE_JOURNAL_SEGMENT_BYTES, ..LogConfig::default() };
        let redriven_log = Log::open(dir.join("dlq-redriven"), redriven_config)?.0;
        let mut redriven = BTreeSet::new();
        for record in read_all(&redriven_log, redriven_log.start_offset())? {
            let offsets: Vec<u64> = postcard::from_bytes(record.value.as_deref().unwrap_or_default())
                .map_err(|e| QueueError::Corrupt { path: redriven_log.dir().display().to_string(), reason: e.to_string() })?;
            redriven.extend(offsets);
        }
        let core = Core { config, clock, levels, dlq };
        let dedup = rebuild_dedup(&core)?;
        let mut groups = BTreeMap::new();
        let groups_dir = dir.join("groups");
        if groups_dir.exists() {
            for entry in std::fs::read_dir(&groups_dir).map_err(io(|| format!("listing {}", groups_dir.display())))? {
                let entry = entry.map_err(io(|| format!("listing {}", groups_dir.display())))?;
                let Some(group) = entry.file_name().to_str().map(str::to_string) else { continue };
                if check_name("group", &group).is_err() || !entry.path().is_dir() {
                    continue;
                }
                groups.insert(group.clone(), Arc::new(Group::open(&core, &group, &entry.path())?));
            }
        }
        Ok(Queue {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            core,
            groups: RwLock::new(groups),
            dedup: Mutex::new(dedup),
            redriven: Mutex::new(Redriven { log: redriven_log, offsets: redriven }),
            signal: Signal { generation: Mutex::new(0), changed: Condvar::new() },
            deleted: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &QueueConfig {
        &self.core.config
    }

    fn check_live(&self) -> Result<()> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(QueueError::Deleted(self.name.clone()));
        }
        Ok(())
    }

    /// Publish a batch; returns once it is durable per the queue's durability class, with one id
    /// per message in order. A `dedup_id` seen within the dedup window (or earlier in the same
    /// batch) returns the first message's id and writes nothing.
    pub fn publish(&self, messages: &[NewMessage]) -> Result<Vec<MessageId>> {
        check_publish(messages)?;
        self.publish_inner(messages, None)
    }

    /// Appends messages already checked by [`check_publish`].
    fn publish_inner(&self, messages: &[NewMessage], only_group: Option<&str>) -> Result<Vec<MessageId>> {
        self.check_live()?;
        let now = self.core.clock.now_ms();
        let levels = QUEUE_PRIORITY_LEVELS as usize;
        let mut ids: Vec<Option<MessageId>> = vec![None; messages.len()];
        let mut same_as: Vec<(usize, usize)> = Vec::new();
        let mut records: Vec<Vec<Record>> = vec![Vec::new(); levels];
        let mut positions: Vec<Vec<usize>> = vec![Vec::new(); levels];
        let mut pending: Vec<PendingAppend> = Vec::new();
        {
            let mut dedup = self.dedup.lock();
            dedup.expire(now, self.core.config.dedup_window_ms);
            let mut first_in_batch: HashMap<&str, usize> = HashMap::new();
            for (i, message) in messages.iter().enumerate() {
                if let Some(dedup_id) = message.dedup_id.as_deref() {
                    if let Some((id, _)) = dedup.ids.get(dedup_id) {
                        ids[i] = Some(*id);
                        continue;
                    }
                    if let Some(&first) = first_in_batch.get(dedup_id) {
                        same_as.push((i, first));
                        continue;
                    }
                    first_in_batch.insert(dedup_id, i);
                }
                let mut headers = message.headers.clone();
                if message.delay_ms > 0 {
                    let at = now.saturating_add(message.delay_ms);
                    headers.push(Header { name: message::HEADER_DELIVER_AT.to_string(), value: Bytes::copy_from_slice(&at.to_be_bytes()) });
                }
                if let Some(dedup_id) = &message.dedup_id {
                    headers.push(Header { name: message::HEADER_DEDUP_ID.to_string(), value: Bytes::copy_from_slice(dedup_id.as_bytes()) });
                }
                if let Some(group) = only_group {
                    headers.push(Header { name: message::HEADER_ONLY_GROUP.to_string(), value: Bytes::copy_from_slice(group.as_bytes()) });
                }
                let level = message.priority as usize;
                records[level].push(Record { key: message.key.clone(), value: Some(message.body.clone()), headers, timestamp_ms: now as i64 });
                positions[level].push(i);
            }
            // Appended under the dedup lock so that two publishers of one dedup id cannot both
            // write it; durability is awaited after the lock is released (group commit).
            for level in 0..levels {
                if records[level].is_empty() {
                    continue;
                }
                let appended = self.core.levels[level].append_pending(&records[level], 0, 0)?;
                let base = appended.offsets().base_offset;
                for (k, &i) in positions[level].iter().enumerate() {
                    let id = MessageId { priority: level as u8, offset: base + k as u64 };
                    ids[i] = Some(id);
                    if let Some(dedup_id) = &messages[i].dedup_id {
                        dedup.insert(dedup_id.clone(), id, now);
                    }
                }
                pending.push(appended);
            }
        }
        for (i, first) in same_as {
            ids[i] = ids[first];
        }
        for appended in pending {
            appended.wait()?;
        }
        self.signal.notify();
        Ok(ids.into_iter().map(|id| id.expect("every message got an id")).collect())
    }

    fn group(&self, name: &str) -> Result<Arc<Group>> {
        self.check_live()?;
        self.groups.read().get(name).cloned().ok_or_else(|| QueueError::NotFound { kind: "group", name: name.to_string() })
    }

    fn group_or_create(&self, name: &str) -> Result<Arc<Group>> {
        if let Ok(group) = self.group(name) {
            return Ok(group);
        }
        self.check_live()?;
        check_name("group", name).map_err(name_error)?;
        let mut groups = self.groups.write();
        if let Some(group) = groups.get(name) {
            return Ok(group.clone());
        }
        let group = Arc::new(Group::open(&self.core, name, &self.dir.join("groups").join(name))?);
        groups.insert(name.to_string(), group.clone());
        Ok(group)
    }

    /// Create a group explicitly (receive creates one on first use). A new group starts at the
    /// oldest message the queue holds: it sees every message.
    pub fn create_group(&self, name: &str) -> Result<()> {
        if self.groups.read().contains_key(name) {
            return Err(QueueError::AlreadyExists { kind: "group", name: name.to_string() });
        }
        self.group_or_create(name).map(|_| ())
    }

    /// Delete a group and its state; its leases and acks are forgotten.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        let group = self.groups.write().remove(name).ok_or_else(|| QueueError::NotFound { kind: "group", name: name.to_string() })?;
        group.close()?;
        let dir = self.dir.join("groups").join(name);
        std::fs::remove_dir_all(&dir).map_err(io(|| format!("removing {}", dir.display())))
    }

    pub fn groups(&self) -> Vec<String> {
        self.groups.read().keys().cloned().collect()
    }

    /// Lease up to `max` messages of `group` to `consumer` for `lease_ms` (None: the queue's
    /// default). Blocks up to `wait` until at least one is available, then returns what there
    /// is (possibly nothing). When the consumer already holds its in-flight limit, returns
    /// `LimitExceeded { limit: "in_flight_per_consumer_max" }` at once: ack or nack first.
    pub fn receive(&self, group: &str, consumer: &str, max: usize, lease_ms: Option<u64>, wait: Duration) -> Result<Vec<Delivery>> {
        let lease_ms = lease_ms.unwrap_or(self.core.config.lease_ms_default);
        check_receive(consumer, max, lease_ms, wait)?;
        let group = self.group_or_create(group)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        loop {
            let seen = self.signal.current();
            let received = group.receive(&self.core, consumer, max, lease_ms)?;
            for appended in received.pending {
                appended.wait()?;
            }
            if received.released {
                self.signal.notify();
            }
            if !received.deliveries.is_empty() {
                return Ok(received.deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            // Wake on a publish or release, on the next due time, and at least every 100 ms
            // (leases expire without a signal; an injected clock moves without one).
            let mut slice = Duration::from_millis(100);
            if let Some(due) = received.next_due_ms {
                slice = slice.min(Duration::from_millis(due.saturating_sub(self.core.clock.now_ms()).max(1)));
            }
            self.signal.wait(seen, deadline.min(now + slice));
        }
    }

    /// Acknowledge deliveries: each one is never delivered again to this group, also across
    /// restarts, once this returns. One journal record per call.
    pub fn ack(&self, group: &str, receipts: &[Receipt]) -> Result<Vec<ReceiptOutcome>> {
        check_receipts(receipts)?;
        let group = self.group(group)?;
        let (outcomes, pending) = group.ack(&self.core, receipts)?;
        for appended in pending {
            appended.wait()?;
        }
        Ok(outcomes)
    }

    /// Give deliveries back: available again after `delay_ms`, or after the queue's exponential
    /// backoff by delivery count when `None`. A delivery that was the last allowed one
    /// (`deliveries_max`) is dead-lettered instead.
    pub fn nack(&self, group: &str, receipts: &[Receipt], delay_ms: Option<u64>) -> Result<Vec<ReceiptOutcome>> {
        check_receipts(receipts)?;
        if let Some(delay) = delay_ms
            && delay > QUEUE_DELAY_MS_MAX
        {
            return Err(QueueError::LimitExceeded { limit: "QUEUE_DELAY_MS_MAX", max: QUEUE_DELAY_MS_MAX, got: delay });
        }
        let group = self.group(group)?;
        let (outcomes, pending) = group.nack(&self.core, receipts, delay_ms)?;
        for appended in pending {
            appended.wait()?;
        }
        self.signal.notify();
        Ok(outcomes)
    }

    /// Move the lease deadline of deliveries to now + `lease_ms`.
    pub fn extend(&self, group: &str, receipts: &[Receipt], lease_ms: u64) -> Result<Vec<ReceiptOutcome>> {
        check_receipts(receipts)?;
        check_lease(lease_ms)?;
        let group = self.group(group)?;
        let (outcomes, pending) = group.extend(&self.core, receipts, lease_ms)?;
        for appended in pending {
            appended.wait()?;
        }
        Ok(outcomes)
    }

    /// Expire leases whose deadline passed (by the queue's clock) in every group; returns how
    /// many. Receive does this too, lazily; call `tick` to make stats and waiters current.
    pub fn tick(&self) -> Result<usize> {
        self.check_live()?;
        let groups: Vec<Arc<Group>> = self.groups.read().values().cloned().collect();
        let mut expired = 0;
        for group in groups {
            let (count, pending) = group.tick(&self.core)?;
            for appended in pending {
                appended.wait()?;
            }
            expired += count;
        }
        if expired > 0 {
            self.signal.notify();
        }
        self.release_consumed_segments()?;
        Ok(expired)
    }

    /// Delete the priority logs' sealed segments that every group has finished with, so a
    /// queue's disk use follows its backlog rather than its history. With no group yet, nothing
    /// is consumed and nothing is deleted.
    fn release_consumed_segments(&self) -> Result<()> {
        let groups: Vec<Arc<Group>> = self.groups.read().values().cloned().collect();
        if groups.is_empty() {
            return Ok(());
        }
        let starts: Vec<Vec<u64>> = groups.iter().map(|g| g.level_starts()).collect();
        for (level, log) in self.core.levels.iter().enumerate() {
            if let Some(done_below) = starts.iter().map(|s| s[level]).min() {
                log.truncate_before(done_below)?;
            }
        }
        Ok(())
    }

    /// Dead letters from dead-letter offset `from` on, at most `max`, of one group or all.
    pub fn dead_letters(&self, group: Option<&str>, from: u64, max: usize) -> Result<Vec<DeadLetter>> {
        self.check_live()?;
        let dlq = &self.core.dlq;
        let redriven = self.redriven.lock().offsets.clone();
        let mut from = from.max(dlq.start_offset());
        let end = dlq.high_watermark();
        let mut out = Vec::new();
        while from < end && out.len() < max {
            let records = dlq.read(from, 1024, 8 << 20)?;
            let Some(last) = records.last() else { break };
            from = last.offset + 1;
            for record in records {
                let letter = parse_dead_letter(record, &redriven)?;
                if group.is_none_or(|g| g == letter.group) && out.len() < max {
                    out.push(letter);
                }
            }
        }
        Ok(out)
    }

    /// Republish dead letters of `group` as new messages that only `group` sees (other groups
    /// skip them), and mark them redriven so a second redrive does not duplicate them. Returns
    /// how many were republished. Scans the whole dead-letter log.
    pub fn redrive(&self, group: &str, which: Redrive) -> Result<usize> {
        self.check_live()?;
        check_name("group", group).map_err(name_error)?;
        let mut redriven = self.redriven.lock();
        let wanted: Option<BTreeSet<MessageId>> = match &which {
            Redrive::All => None,
            Redrive::Ids(ids) => Some(ids.iter().copied().collect()),
        };
        let mut letters = Vec::new();
        for record in read_all(&self.core.dlq, self.core.dlq.start_offset())? {
            let letter = parse_dead_letter(record, &redriven.offsets)?;
            if letter.group == group && !letter.redriven && wanted.as_ref().is_none_or(|w| w.contains(&letter.id)) {
                letters.push(letter);
            }
        }
        for chunk in letters.chunks(BATCH_RECORDS_MAX) {
            let messages: Vec<NewMessage> = chunk.iter().map(DeadLetter::redriven).collect();
            check_publish(&messages)?;
            self.publish_inner(&messages, Some(group))?;
            let offsets: Vec<u64> = chunk.iter().map(|l| l.dlq_offset).collect();
            redriven.log.append(&[Record::from_value(postcard::to_stdvec(&offsets).expect("offsets encode"))])?;
            redriven.offsets.extend(offsets);
        }
        Ok(letters.len())
    }

    /// Numbers of one group, or of all groups summed (with each group listed).
    pub fn stats(&self, group: Option<&str>) -> Result<QueueStats> {
        self.check_live()?;
        let groups: Vec<Arc<Group>> = match group {
            Some(name) => vec![self.group(name)?],
            None => self.groups.read().values().cloned().collect(),
        };
        let now = self.core.clock.now_ms();
        let numbers = groups
            .iter()
            .map(|group| {
                let n = group.numbers(&self.core);
                let depth = n.available + n.delayed + n.backlog;
                GroupStats {
                    name: group.name.clone(),
                    depth,
                    delayed: n.delayed,
                    in_flight: n.in_flight,
                    lag: depth + n.in_flight,
                    acked_total: n.acked_total,
                    dead_lettered: n.archived_total,
                    oldest_available_age_ms: n.oldest_available_enqueued_ms.map(|at| now.saturating_sub(at)),
                }
            })
            .collect();
        Ok(QueueStats::summed(self.core.levels.iter().map(Log::high_watermark).sum(), numbers))
    }

    /// Sync and close every log of the queue. Also happens on drop.
    pub fn close(&self) -> Result<()> {
        for group in self.groups.read().values() {
            group.close()?;
        }
        for log in self.core.levels.iter().chain([&self.core.dlq, &self.redriven.lock().log]) {
            log.close()?;
        }
        Ok(())
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
        self.signal.notify();
    }
}

/// Refuses a publish batch as every backend does: too many messages, a reserved header, a bad
/// priority, delay, dedup id or size. Nothing of a refused batch is written.
pub fn check_publish(messages: &[NewMessage]) -> Result<()> {
    if messages.len() > BATCH_RECORDS_MAX {
        return Err(QueueError::LimitExceeded { limit: "BATCH_RECORDS_MAX", max: BATCH_RECORDS_MAX as u64, got: messages.len() as u64 });
    }
    for message in messages {
        if let Some(header) = message.headers.iter().find(|h| h.name.starts_with(message::RESERVED_HEADER_PREFIX)) {
            return Err(QueueError::InvalidMessage(format!("header {:?} uses the reserved prefix {:?}", header.name, message::RESERVED_HEADER_PREFIX)));
        }
        check_message(message)?;
    }
    Ok(())
}

/// Refuses a receive as every backend does: a bad consumer name, too many messages, a lease or a
/// wait out of range.
pub fn check_receive(consumer: &str, max: usize, lease_ms: u64, wait: Duration) -> Result<()> {
    check_name("consumer", consumer).map_err(name_error)?;
    if max > QUEUE_RECEIVE_MESSAGES_MAX {
        return Err(QueueError::LimitExceeded { limit: "QUEUE_RECEIVE_MESSAGES_MAX", max: QUEUE_RECEIVE_MESSAGES_MAX as u64, got: max as u64 });
    }
    check_lease(lease_ms)?;
    if wait.as_millis() > u128::from(QUEUE_RECEIVE_WAIT_MS_MAX) {
        return Err(QueueError::LimitExceeded { limit: "QUEUE_RECEIVE_WAIT_MS_MAX", max: QUEUE_RECEIVE_WAIT_MS_MAX, got: wait.as_millis() as u64 });
    }
    Ok(())
}

/// Refuses a lease of 0 or above `QUEUE_LEASE_MS_MAX`.
pub fn check_lease(lease_ms: u64) -> Result<()> {
    if lease_ms == 0 || lease_ms > QUEUE_LEASE_MS_MAX {
        return Err(QueueError::LimitExceeded { limit: "QUEUE_LEASE_MS_MAX", max: QUEUE_LEASE_MS_MAX, got: lease_ms });
    }
    Ok(())
}

/// Refuses more receipts in one call than `BATCH_RECORDS_MAX`.
pub fn check_receipts(receipts: &[Receipt]) -> Result<()> {
    if receipts.len() > BATCH_RECORDS_MAX {
        return Err(QueueError::LimitExceeded { limit: "BATCH_RECORDS_MAX", max: BATCH_RECORDS_MAX as u64, got: receipts.len() as u64 });
    }
    Ok(())
}

fn check_message(message: &NewMessage) -> Result<()> {
    if message.priority >= QUEUE_PRIORITY_LEVELS {
        return Err(QueueError::InvalidMessage(format!("priority must be below QUEUE_PRIORITY_LEVELS ({QUEUE_PRIORITY_LEVELS}), got {}", message.priority)));
    }
    if message.delay_ms > QUEUE_DELAY_MS_MAX {
        return Err(QueueError::LimitExceeded { limit: "QUEUE_DELAY_MS_MAX", max: QUEUE_DELAY_MS_MAX, got: message.delay_ms });
    }
    if let Some(dedup_id) = &message.dedup_id
        && (dedup_id.is_empty() || dedup_id.len() > QUEUE_DEDUP_ID_BYTES_MAX)
    {
        return Err(QueueError::LimitExceeded { limit: "QUEUE_DEDUP_ID_BYTES_MAX", max: QUEUE_DEDUP_ID_BYTES_MAX as u64, got: dedup_id.len() as u64 });
    }
    if message.headers.len() > HEADERS_COUNT_MAX - 4 {
        return Err(QueueError::LimitExceeded { limit: "HEADERS_COUNT_MAX", max: HEADERS_COUNT_MAX as u64 - 4, got: message.headers.len() as u64 });
    }
    let key_bytes = message.key.as_ref().map_or(0, |k| k.len());
    if key_bytes > KEY_BYTES_MAX {
        return Err(QueueError::LimitExceeded { limit: "KEY_BYTES_MAX", max: KEY_BYTES_MAX as u64, got: key_bytes as u64 });
    }
    // Room is kept for the queue's own headers (delay, dedup id, redrive target).
    let bytes = message.body.len() + key_bytes + message.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>() + 512;
    if bytes > MESSAGE_BYTES_MAX {
        return Err(QueueError::LimitExceeded { limit: "MESSAGE_BYTES_MAX", max: MESSAGE_BYTES_MAX as u64 - 512, got: bytes as u64 - 512 });
    }
    Ok(())
}

fn read_all(log: &Log, from: u64) -> Result<Vec<StoredRecord>> {
    let mut out = Vec::new();
    let mut from = from.max(log.start_offset());
    let end = log.high_watermark();
    while from < end {
        let records = log.read(from, 4096, 16 << 20)?;
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        out.extend(records);
    }
    Ok(out)
}

/// The dedup ids published within the window before `now`, read back from the logs' tails.
fn rebuild_dedup(core: &Core) -> Result<Dedup> {
    let mut dedup = Dedup::default();
    let window = core.config.dedup_window_ms;
    if window == 0 {
        return Ok(dedup);
    }
    let now = core.clock.now_ms();
    let since = now.saturating_sub(window) as i64;
    let mut seen = Vec::new();
    for (level, log) in core.levels.iter().enumerate() {
        let Some(from) = log.offset_for_timestamp(since)? else { continue };
        for record in read_all(log, from)? {
            if let Some(dedup_id) = message::header_str(&record.headers, message::HEADER_DEDUP_ID) {
                seen.push((record.timestamp_ms.max(0) as u64, dedup_id.to_string(), MessageId { priority: level as u8, offset: record.offset }));
            }
        }
    }
    seen.sort();
    for (at_ms, dedup_id, id) in seen {
        if !dedup.ids.contains_key(&dedup_id) {
            dedup.insert(dedup_id, id, at_ms);
        }
    }
    dedup.expire(now, window);
    Ok(dedup)
}

fn parse_dead_letter(record: StoredRecord, redriven: &BTreeSet<u64>) -> Result<DeadLetter> {
    let headers = &record.headers;
    let corrupt = |what: &str| QueueError::Corrupt { path: "dlq".into(), reason: format!("dead letter {} has no valid {what} header", record.offset) };
    let id: MessageId = message::header_str(headers, message::HEADER_DLQ_ID).ok_or_else(|| corrupt("id"))?.parse()?;
    Ok(DeadLetter {
        dlq_offset: record.offset,
        id,
        group: message::header_str(headers, message::HEADER_DLQ_GROUP).ok_or_else(|| corrupt("group"))?.to_string(),
        delivery_count: message::header_u64(headers, message::HEADER_DLQ_DELIVERIES).ok_or_else(|| corrupt("deliveries"))? as u32,
        reason: message::header_str(headers, message::HEADER_DLQ_REASON).unwrap_or_default().to_string(),
        body: record.value.clone().unwrap_or_default(),
        key: record.key.clone(),
        headers: message::user_headers(headers),
        enqueued_at_ms: message::header_u64(headers, message::HEADER_DLQ_ENQUEUED_AT).unwrap_or(0),
        dead_lettered_at_ms: record.timestamp_ms.max(0) as u64,
        redriven: redriven.contains(&record.offset),
    })
}

#[cfg(test)]
impl Queue {
    /// Records of all levels held in the group's window (tests of the memory bound).
    pub(crate) fn window_records(&self, group: &str) -> usize {
        self.group(group).unwrap().window_records()
    }
}
