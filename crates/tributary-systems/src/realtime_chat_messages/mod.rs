//! realtime-chat-messages: channels and direct messages on an ordered per-channel log, live over
//! WebSocket (SSE as the fallback), with gapless sync after a reconnect, history with cursor
//! pagination, full-text search, presence, typing indicators, read markers and unread counts,
//! edits and deletes.
//!
//! ```text
//!  Chat users ──HTTP /v1/chat/…──▶ Chat API ──validate, assign seq, append (fsync)──▶ Chat log
//!      ▲                              │                                           (topic `chat-events`,
//!      │                              │                                            key = channel)
//!      │                              └─ apply in log order: channel state (members, messages),
//!      │                                 search index, fan-out to the members' connections
//!      │                                        │                         │
//!      │                                        ▼                         ▼
//!      │                   one small queue per connection        Search index (engine search,
//!      │                   (≤ CONNECTION_PENDING_MAX)             `<data>/search/chat-messages`,
//!      │                                        │                  checkpointed against the log)
//!      └── WebSocket /v1/chat/ws · SSE /v1/chat/events ── gateway (limits, heartbeats)
//!                         │
//!                         ├─▶ Presence (tributary-server's registry: who is online, per channel)
//!                         └─▶ typing indicators (ephemeral, rate limited, never stored)
//!  Read markers ──▶ compacted topic `chat-read-markers` (key = channel + user, value = seq)
//! ```
//!
//! **Channels.** A channel is public (anyone may join) or private (members add members); a
//! direct message is a channel of two whose id is made from the two user ids
//! (`dm:<a>:<b>`, sorted), so both users open the same one. Creating a channel, members joining
//! and leaving, messages, edits and deletes are all events of the channel's own sequence.
//!
//! **Ordering.** Each channel has a sequence number assigned when its event is appended: the
//! assignment and the append happen under one lock, so log order is seq order, and seqs are
//! gapless (1, 2, 3, …). A send is answered `201` only once its event is durable (the log's
//! class is `always`: fsync, with group commit across concurrent sends); then events are applied
//! strictly in log order, which is per channel the seq order. Every reader (history, sync, live)
//! sees only applied, durable events.
//!
//! **Idempotent sends.** A message may carry a `client_id`: sending it again to the same channel
//! as the same user returns the first send's seq (`"duplicate": true`) and appends nothing.
//!
//! **Sync.** A connection names, per channel, the last seq it has seen (`since`); it first gets
//! exactly the events after it, then live ones. Every event a connection gets is checked against
//! its position in that channel: one at or below it is skipped (no duplicate), one beyond the
//! next fills the gap from the channel's events first (no gap). So a reconnect, a queue overflow
//! (a slow client), or a restart of the whole system on the same data folder all end with the
//! client holding every event once, in order.
//!
//! **Search.** Messages go into the engine's search index `chat-messages` (text, scoped by
//! channel) as they are applied; an edit replaces the text, a delete removes the message. The
//! index commits every `SEARCH_COMMIT_INTERVAL_MS` (searches lag sends by about that), and each
//! commit stores the log offset it covers: at start the log is replayed into the index from
//! there. A search is scoped to the channels the user is a member of.
//!
//! **Read markers and unread counts.** `PUT …/read {"seq"}` stores how far a user has read a
//! channel (durably, in a compacted topic; markers only move forward). The unread count of a
//! channel is the messages after the marker that others sent and that are not deleted.
//!
//! **Presence and typing.** Each connection joins tributary-server's [`Presence`] for the
//! channels its user is a member of when it connects; members' connections get join/leave events.
//! Typing indicators go only to the connections of the channel's other members, are never
//! stored, and a user may send one per channel every `TYPING_INTERVAL_MS_MIN`.
//!
//! **What is held only in memory, rebuilt at start.** Every channel's state (members, each
//! event's JSON for sync, each message's latest text for history) and the read markers are read
//! back from the log at start, so start-up time and memory grow with the history kept (no
//! retention is set: the history is the product). Presence (unless counted in a shared cache),
//! typing and the connection index are this process's and gone on restart by nature.
//!
//! **Several nodes.** On a node whose stream interface is shared (`tributary up --stream
//! nats://…`), the chat's topics are every node's, and no node may assign seqs on its own. A
//! send checks its ops against what its node has applied (most refusals are answered there,
//! before anything is appended), then appends them as a *proposal*: the events without seqs, one
//! record per partition, with an id in the `chat-proposal` header. Each node's follower (one
//! thread, `tributary_server::shared_log::follow`) reads every partition in log order and
//! decides each proposal against the state so far: all its ops valid, or the whole proposal
//! refused; repeated client ids and no-op joins append nothing; seqs are the channel's next.
//! The decision is a function of the log alone, so every node reaches the same state, seqs and
//! event JSON. The sender waits for its own follower's verdict (at most `FANOUT_WAIT_MAX`, then
//! `503`: the proposal is in the log and is applied wherever it is read). A proposal refused
//! at its place in the log (another node changed the channel first) stays in the log and changes
//! nothing. Read markers are a topic every node follows (not compacted: the largest per key
//! wins), typing indicators a topic kept `TYPING_RETENTION_MS` that every node fans out from.
//! Each node keeps its own search index under its data folder, checkpointed against the shared
//! log. A batch of sends spanning channels of several partitions is one proposal per partition,
//! each all or nothing (the default is one partition). The typing rate limit counts the
//! indicators of every node once this node's follower has read them (two sent through two nodes
//! within that lag, milliseconds, both pass). Presence join and leave events are every node's
//! with a shared cache (`--cache`), each node's own without one.
//!
//! **What it does not do.** Threads, reactions, attachments, mobile push, group DMs of more than
//! two, per-user signed identities (the platform's API tokens guard who may call at all; behind
//! them the caller names the user, as in realtime-notifications), moderation of others'
//! messages, and presence updates for channels joined after a connection opened (reconnect). A
//! failed append of the engine's log (the disk refused a write) stops writes to that log
//! partition with `503` until a restart, which rebuilds the state from what the log holds.

pub mod api;
pub mod process;
pub mod scenario;
pub mod topology;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tributary_core::limits::BATCH_BYTES_MAX;
use tributary_core::{Header, Record, StoredRecord, partition_for_key};
use tributary_engine::search::{Document, Edit, SearchConfig, SearchError, SearchIndex, SearchQuery, SearchSchema};
use tributary_engine::stream::{Topic, TopicConfig};
use tributary_engine::{Engine, StreamError};
use tributary_runtime::SystemMetrics;
use tributary_server::shared_log::{self, FANOUT_WAIT_MAX, Reader, SharedLog};
use tributary_server::{Gateway, Presence, SystemApi};

use crate::{Context, System};
use process::{Body, CHANNEL_MEMBERS_MAX, ChannelView, Event, Invalid, MessageView, Visibility};

pub const ID: &str = "realtime-chat-messages";
/// The durable log of every channel's events, keyed by channel.
pub const EVENTS_TOPIC: &str = "chat-events";
/// Read markers: key `<channel>\n<user>`, value the last read seq (compacted).
pub const READ_MARKERS_TOPIC: &str = "chat-read-markers";
/// The engine search index of messages.
pub const SEARCH_INDEX: &str = "chat-messages";
/// Partitions of the chat log, unless configured otherwise. One, for the reason
/// realtime-notifications gives: under `always`, each partition's append is an fsync of its own,
/// while one partition shares one fsync among all concurrent sends.
pub const PARTITIONS_DEFAULT: u32 = 1;
/// Events and indicators queued for one connection before it stops taking live ones and catches
/// up from the channels' events instead.
pub const CONNECTION_PENDING_MAX: usize = 4_096;
/// How often the search index commits while messages wait (searches lag by about this).
pub const SEARCH_COMMIT_INTERVAL_MS: u64 = 250;
/// Commit the search index after this many changes even sooner.
pub const SEARCH_COMMIT_DOCS: usize = 20_000;
/// How long a duplicate send waits for the first one to be durable before answering.
pub const DUPLICATE_WAIT: Duration = Duration::from_secs(10);
/// Last-typing times kept before the ones older than `TYPING_INTERVAL_MS_MIN` are swept out.
pub const TYPING_ENTRIES_MAX: usize = 100_000;
/// Records read from the log per step at start.
pub const REBUILD_CHUNK_RECORDS: usize = 5_000;
/// On a shared log: typing indicators, one record each, kept this long (nodes read them live).
pub const TYPING_TOPIC: &str = "chat-typing";
/// How long a shared log keeps typing indicators, in milliseconds.
pub const TYPING_RETENTION_MS: u64 = 60_000;
/// On a shared log: the header naming a proposal, so its node's follower hands the verdict to
/// the waiting sender.
const PROPOSAL_HEADER: &str = "chat-proposal";
/// Records a node's follower reads from one partition per step.
const FOLLOW_CHUNK_RECORDS: usize = 1_000;

/// How the chat log is laid out.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    pub partitions: u32,
    pub segment_bytes: u64,
    pub search: SearchConfig,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            partitions: PARTITIONS_DEFAULT,
            segment_bytes: tributary_log::SEGMENT_BYTES_DEFAULT,
            search: SearchConfig { commit_interval_ms: SEARCH_COMMIT_INTERVAL_MS, commit_docs: SEARCH_COMMIT_DOCS },
        }
    }
}

/// Why a chat operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Search(#[from] SearchError),
    /// Writes to a log partition stopped after a failed append (see the module docs).
    #[error("{0}")]
    Unavailable(String),
}

/// One change a caller asks for.
#[derive(Debug, Clone)]
pub enum Op {
    Send { channel: String, user: String, text: String, client_id: Option<String> },
    Edit { channel: String, user: String, target: u64, text: String },
    Delete { channel: String, user: String, target: u64 },
    Create { channel: String, user: String, visibility: Visibility, name: String, members: Vec<String> },
    Join { channel: String, user: String, members: Vec<String> },
    Leave { channel: String, user: String, members: Vec<String> },
}

impl Op {
    fn channel(&self) -> &str {
        match self {
            Op::Send { channel, .. } | Op::Edit { channel, .. } | Op::Delete { channel, .. } | Op::Create { channel, .. } | Op::Join { channel, .. } | Op::Leave { channel, .. } => channel,
        }
    }

    /// The op as a shared log carries it: an event without a seq (its follower assigns one).
    fn proposal(&self, ts: i64) -> Event {
        let (channel, user, body) = match self.clone() {
            Op::Send { channel, user, text, client_id } => (channel, user, Body::Message { text, client_id }),
            Op::Edit { channel, user, target, text } => (channel, user, Body::Edited { target, text }),
            Op::Delete { channel, user, target } => (channel, user, Body::Deleted { target }),
            Op::Create { channel, user, visibility, name, members } => (channel, user, Body::Created { visibility, name, members }),
            Op::Join { channel, user, members } => (channel, user, Body::Joined { members }),
            Op::Leave { channel, user, members } => (channel, user, Body::Left { members }),
        };
        Event { channel, seq: 0, user, ts, body }
    }

    /// The op a proposal carries, and when it was sent.
    fn from_proposal(event: Event) -> (Op, i64) {
        let Event { channel, user, ts, body, .. } = event;
        let op = match body {
            Body::Message { text, client_id } => Op::Send { channel, user, text, client_id },
            Body::Edited { target, text } => Op::Edit { channel, user, target, text },
            Body::Deleted { target } => Op::Delete { channel, user, target },
            Body::Created { visibility, name, members } => Op::Create { channel, user, visibility, name, members },
            Body::Joined { members } => Op::Join { channel, user, members },
            Body::Left { members } => Op::Leave { channel, user, members },
        };
        (op, ts)
    }
}

/// Where an accepted change landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub channel: String,
    pub seq: u64,
    pub ts: i64,
    /// A repeated send (same client id) or a change that changed nothing: nothing was appended.
    pub duplicate: bool,
}

/// What a connection's queue holds.
#[derive(Clone)]
pub enum Item {
    Event { channel: Arc<str>, seq: u64, json: Arc<str>, accepted: Option<Instant> },
    /// A typing indicator or a read marker: JSON sent as is, never replayed.
    Ephemeral(Arc<str>),
}

/// One connection as the fan-out sees it.
pub struct Connection {
    pub id: u64,
    pub user: Arc<str>,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    overflowed: bool,
}

impl Connection {
    fn push(&self, item: Item) -> bool {
        let mut queue = self.queue.lock();
        if queue.overflowed {
            return false;
        }
        if queue.items.len() >= CONNECTION_PENDING_MAX {
            queue.overflowed = true;
            queue.items = VecDeque::new();
            return true;
        }
        queue.items.push_back(item);
        false
    }

    /// What is queued, and whether the queue overflowed (then the caller catches up instead; the
    /// connection takes live items again from here).
    pub fn take(&self) -> (Vec<Item>, bool) {
        let mut queue = self.queue.lock();
        let overflowed = std::mem::take(&mut queue.overflowed);
        (std::mem::take(&mut queue.items).into(), overflowed)
    }

    pub async fn woken(&self) {
        self.wake.notified().await
    }
}

/// The sequencer's view of a channel: what has been assigned, durable or not yet.
#[derive(Default)]
struct Assigned {
    last_seq: u64,
    visibility: Option<Visibility>,
    members: BTreeSet<Arc<str>>,
    /// Author and whether deleted, per message seq (to check edits and deletes).
    authors: HashMap<u64, (Arc<str>, bool)>,
    /// (user, client id) → seq of the first send.
    client_ids: HashMap<(Arc<str>, Arc<str>), u64>,
}

impl Assigned {
    fn apply(&mut self, event: &Event) {
        self.last_seq = event.seq;
        match &event.body {
            Body::Created { visibility, members, .. } => {
                self.visibility = Some(*visibility);
                self.members.extend(members.iter().map(|m| Arc::from(m.as_str())));
            }
            Body::Joined { members } => self.members.extend(members.iter().map(|m| Arc::from(m.as_str()))),
            Body::Left { members } => {
                for member in members {
                    self.members.remove(member.as_str());
                }
            }
            Body::Message { client_id, .. } => {
                let user: Arc<str> = Arc::from(event.user.as_str());
                if let Some(client_id) = client_id {
                    self.client_ids.insert((user.clone(), Arc::from(client_id.as_str())), event.seq);
                }
                self.authors.insert(event.seq, (user, false));
            }
            Body::Edited { .. } => {}
            Body::Deleted { target } => {
                if let Some(author) = self.authors.get_mut(target) {
                    author.1 = true;
                }
            }
        }
    }

    fn is_member(&self, user: &str) -> bool {
        self.members.contains(user)
    }
}

struct Channel {
    assigned: Assigned,
    view: ChannelView,
}

impl Channel {
    fn new() -> Channel {
        Channel { assigned: Assigned::default(), view: ChannelView::new(Visibility::Public, String::new()) }
    }
}

/// What an op adds to its channel.
enum Assignment {
    /// This event, with the channel's next seq.
    Event(Event),
    /// Nothing: a repeated send, whose first send has this seq.
    Repeat(u64),
    /// Nothing: the op changes nothing (members who already joined or left); the channel's
    /// last seq.
    Unchanged(u64),
}

/// The event `op` (validated against this state) adds to its channel, stamped `ts`; the
/// sequencer's view takes it at once. The same on every node for the same state.
fn assign(state: &mut State, op: Op, ts: i64) -> Assignment {
    let key: Arc<str> = match state.channels.get_key_value(op.channel()) {
        Some((key, _)) => key.clone(),
        None => Arc::from(op.channel()),
    };
    let assigned = &mut state.channels.entry(key.clone()).or_insert_with(Channel::new).assigned;
    let (user, body) = match op {
        Op::Send { user, text, client_id, .. } => {
            if let Some(client_id) = &client_id
                && let Some(&seq) = assigned.client_ids.get(&(Arc::from(user.as_str()), Arc::from(client_id.as_str())))
            {
                return Assignment::Repeat(seq);
            }
            (user, Body::Message { text, client_id })
        }
        Op::Edit { user, target, text, .. } => (user, Body::Edited { target, text }),
        Op::Delete { user, target, .. } => (user, Body::Deleted { target }),
        Op::Create { user, visibility, name, mut members, .. } => {
            members.sort();
            members.dedup();
            (user, Body::Created { visibility, name, members })
        }
        Op::Join { user, members, .. } => {
            let mut new: Vec<String> = members.into_iter().filter(|m| !assigned.is_member(m)).collect();
            new.sort();
            new.dedup();
            if new.is_empty() {
                return Assignment::Unchanged(assigned.last_seq);
            }
            (user, Body::Joined { members: new })
        }
        Op::Leave { user, members, .. } => {
            let mut gone: Vec<String> = members.into_iter().filter(|m| assigned.is_member(m)).collect();
            gone.sort();
            gone.dedup();
            if gone.is_empty() {
                return Assignment::Unchanged(assigned.last_seq);
            }
            (user, Body::Left { members: gone })
        }
    };
    let event = Event { channel: key.to_string(), seq: assigned.last_seq + 1, user, ts, body };
    assigned.apply(&event);
    Assignment::Event(event)
}

/// An event to apply in log order.
struct Appended {
    event: Event,
    json: Arc<str>,
    offset: u64,
    /// When it was accepted, for the delivery latency (None: replayed at start).
    accepted: Option<Instant>,
}

struct PartitionState {
    /// The next offset to apply.
    next: u64,
    waiting: BTreeMap<u64, Vec<Appended>>,
    broken: Option<String>,
}

/// (channel, user) → last read seq.
type ReadMarkers = HashMap<(Arc<str>, Arc<str>), u64>;

struct State {
    channels: HashMap<Arc<str>, Channel>,
    partitions: Vec<PartitionState>,
    connections: HashMap<Arc<str>, HashMap<u64, Arc<Connection>>>,
    read: ReadMarkers,
    /// (channel, user) → last typing indicator.
    typing: HashMap<(Arc<str>, Arc<str>), Instant>,
}

impl State {
    /// Remembers a typing indicator sent `at` (the latest of each channel and user counts),
    /// sweeping out the ones past the rate limit's interval once there are
    /// `TYPING_ENTRIES_MAX`.
    fn note_typing(&mut self, key: (Arc<str>, Arc<str>), at: Instant) {
        if self.typing.len() > TYPING_ENTRIES_MAX {
            let now = Instant::now();
            self.typing.retain(|_, last| now.saturating_duration_since(*last) < Duration::from_millis(process::TYPING_INTERVAL_MS_MIN));
        }
        let last = self.typing.entry(key).or_insert(at);
        *last = (*last).max(at);
    }
}

/// A follower's decision on a proposal of a shared log: where each of its ops landed, or why
/// the whole proposal was refused.
type Verdict = Result<Vec<Outcome>, Invalid>;

/// Where the chat's topics live.
enum Log {
    /// The engine's topics in this process: a send is checked and sequenced under the state's
    /// lock, appended (group commit), and applied in log order.
    Local { events: Arc<Topic>, markers: Arc<Topic> },
    /// Topics every node appends to (NATS JetStream): a send appends a proposal, and each
    /// node's follower checks and sequences every proposal in log order (see "Several nodes").
    Shared(SharedChat),
}

struct SharedChat {
    log: SharedLog,
    partitions: u32,
    /// This node's proposals waiting for its follower's verdict, by proposal id.
    proposals: Mutex<HashMap<u64, std::sync::mpsc::Sender<Verdict>>>,
    next_proposal: AtomicU64,
    stopping: Arc<AtomicBool>,
}

impl Log {
    fn partitions(&self) -> u32 {
        match self {
            Log::Local { events, .. } => events.partition_count(),
            Log::Shared(shared) => shared.partitions,
        }
    }

    fn local<'a>(events: &'a Topic, markers: &'a Topic, topic: &str) -> &'a Topic {
        if topic == READ_MARKERS_TOPIC { markers } else { events }
    }

    fn fetch(&self, topic: &str, partition: u32, offset: u64, max: usize) -> Result<Vec<StoredRecord>, StreamError> {
        match self {
            Log::Local { events, markers } => Log::local(events, markers, topic).fetch(partition, offset, max, BATCH_BYTES_MAX),
            Log::Shared(shared) => shared.log.fetch(topic, partition, offset, max),
        }
    }

    fn offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64), StreamError> {
        match self {
            Log::Local { events, markers } => Log::local(events, markers, topic).offsets(partition),
            Log::Shared(shared) => shared.log.offsets(topic, partition),
        }
    }
}

pub struct Chat {
    gateway: Gateway,
    presence: Presence,
    log: Log,
    search: Arc<SearchIndex>,
    /// Per partition, the first offset the search index has not covered at start.
    index_from: Vec<u64>,
    state: Mutex<State>,
    metrics: SystemMetrics,
    next_connection: AtomicU64,
    connection_count: AtomicUsize,
    sent: AtomicU64,
    delivered: AtomicU64,
    overflows: AtomicU64,
    search_errors: AtomicU64,
}

pub fn start(context: &Context) -> anyhow::Result<Arc<dyn System>> {
    Ok(Chat::open(context, ChatConfig::default())?)
}

fn search_schema() -> SearchSchema {
    SearchSchema { text_fields: vec!["text".into()], filter_fields: vec!["channel".into()] }
}

fn message_doc(channel: &str, seq: u64, text: &str) -> Document {
    Document { id: format!("{channel}/{seq}"), text: vec![("text".into(), text.to_string())], filters: vec![("channel".into(), channel.to_string())] }
}

/// The search index change an applied event makes.
fn index_edit(event: &Event, deleted: bool) -> Option<Edit> {
    match &event.body {
        Body::Message { text, .. } => Some(Edit::Upsert(message_doc(&event.channel, event.seq, text))),
        Body::Edited { target, text } if !deleted => Some(Edit::Upsert(message_doc(&event.channel, *target, text))),
        Body::Deleted { target } => Some(Edit::Delete(format!("{}/{}", event.channel, target))),
        _ => None,
    }
}

impl Chat {
    pub fn open(context: &Context, config: ChatConfig) -> anyhow::Result<Arc<Chat>> {
        let engine: &Engine = &context.engine;
        let events_config = TopicConfig { partitions: config.partitions, segment_bytes: config.segment_bytes, ..TopicConfig::default() };
        let log = if context.streams.blocking() {
            let events = engine.topics.create(EVENTS_TOPIC, events_config)?;
            let markers = engine.topics.create(READ_MARKERS_TOPIC, TopicConfig { partitions: 1, compact: true, ..TopicConfig::default() })?;
            Log::Local { events, markers }
        } else {
            let log = SharedLog::current(context.streams.clone());
            log.create_topic(EVENTS_TOPIC, events_config)?;
            // JetStream does not compact by key: every marker is kept, and the largest per key wins.
            log.create_topic(READ_MARKERS_TOPIC, TopicConfig { partitions: 1, ..TopicConfig::default() })?;
            log.create_topic(TYPING_TOPIC, TopicConfig { partitions: 1, retention_ms: Some(TYPING_RETENTION_MS), ..TopicConfig::default() })?;
            let partitions = log.partitions(EVENTS_TOPIC)?;
            let next_proposal = AtomicU64::new(tributary_core::unique_u64() >> 1);
            Log::Shared(SharedChat { log, partitions, proposals: Mutex::default(), next_proposal, stopping: Arc::new(AtomicBool::new(false)) })
        };
        let search = engine.search.index(SEARCH_INDEX, search_schema(), config.search)?;
        let checkpoint = search.checkpoint();
        let mut bounds = Vec::new();
        for partition in 0..log.partitions() {
            bounds.push(log.offsets(EVENTS_TOPIC, partition)?);
        }
        let (read, markers_end) = load_markers(&log)?;
        let partitions = bounds.iter().map(|&(start, _)| PartitionState { next: start, waiting: BTreeMap::new(), broken: None }).collect();
        let system = Chat {
            gateway: context.gateway.clone(),
            presence: context.presence(ID),
            index_from: (0..log.partitions()).map(|p| checkpoint.get(&p).copied().unwrap_or(0)).collect(),
            log,
            search,
            state: Mutex::new(State { channels: HashMap::new(), partitions, connections: HashMap::new(), read, typing: HashMap::new() }),
            metrics: SystemMetrics::new(ID),
            next_connection: AtomicU64::new(1),
            connection_count: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            search_errors: AtomicU64::new(0),
        };
        // On a shared log, the follower's readers: live tails, which read a long log far faster
        // than fetches, and stay open where the rebuild leaves them.
        let mut readers: Vec<Reader> = match &system.log {
            Log::Local { .. } => Vec::new(),
            Log::Shared(shared) => (0..shared.partitions).map(|p| Reader::new(&shared.log, EVENTS_TOPIC, p)).collect(),
        };
        for (partition, &(_, end)) in (0u32..).zip(&bounds) {
            loop {
                let next = system.state.lock().partitions[partition as usize].next;
                if next >= end {
                    break;
                }
                let mut records = match readers.get_mut(partition as usize) {
                    Some(reader) => reader.read(next, REBUILD_CHUNK_RECORDS)?,
                    None => Vec::new(),
                };
                if records.is_empty() {
                    // The engine's log, or a tail that has not delivered yet: fetch. Nothing
                    // there either: nothing below the end is left to read.
                    records = system.log.fetch(EVENTS_TOPIC, partition, next, REBUILD_CHUNK_RECORDS)?;
                }
                let Some(last) = records.last() else { break };
                let last = last.offset;
                match &system.log {
                    Log::Local { .. } => system.replay(partition, &records)?,
                    Log::Shared(_) => system.follow_events(partition, &records),
                }
                system.state.lock().partitions[partition as usize].next = last + 1;
            }
            // What is applied from here on starts at the end read at start, whatever lay below it.
            let mut state = system.state.lock();
            let next = &mut state.partitions[partition as usize].next;
            *next = (*next).max(end);
        }
        let system = Arc::new(system);
        if let Log::Shared(shared) = &system.log {
            let mut events = readers;
            let mut markers = (Reader::new(&shared.log, READ_MARKERS_TOPIC, 0), markers_end);
            let mut typing = (Reader::new(&shared.log, TYPING_TOPIC, 0), shared.log.offsets(TYPING_TOPIC, 0)?.1);
            let follow = move |system: &Chat| system.follow_once(&mut events, &mut markers, &mut typing);
            shared_log::follow("chat-follow", Arc::downgrade(&system), shared.stopping.clone(), follow)?;
        }
        Ok(system)
    }

    /// Apply events of the engine's own log read at start: their seqs were assigned before
    /// they were appended.
    fn replay(&self, partition: u32, records: &[StoredRecord]) -> anyhow::Result<()> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let mut wake = HashMap::new();
        for record in records {
            let Some(value) = record.value.as_deref() else { continue };
            let event: Event = serde_json::from_slice(value).map_err(|e| anyhow::anyhow!("{EVENTS_TOPIC} partition {partition} offset {}: unreadable event: {e}", record.offset))?;
            let channel = state.channels.entry(Arc::from(event.channel.as_str())).or_insert_with(Channel::new);
            anyhow::ensure!(event.seq == channel.view.last_seq() + 1, "{EVENTS_TOPIC}: channel {} has seq {} after {}", event.channel, event.seq, channel.view.last_seq());
            channel.assigned.apply(&event);
            let json: Arc<str> = Arc::from(std::str::from_utf8(value).unwrap_or_default());
            let mut edits = Vec::new();
            self.apply_event(state, Appended { event, json, offset: record.offset, accepted: None }, &mut edits, &mut wake);
            self.index(partition, record.offset, edits);
        }
        Ok(())
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    pub fn search_index(&self) -> &SearchIndex {
        &self.search
    }

    /// Check `ops` against what has been assigned; nothing changes.
    fn validate(state: &State, op: &Op) -> Result<(), Invalid> {
        let channel_id = op.channel();
        let channel = state.channels.get(channel_id).map(|c| &c.assigned);
        let existing = || channel.filter(|c| c.visibility.is_some()).ok_or_else(|| Invalid::NotFound(format!("channel {channel_id:?} does not exist")));
        let member = |user: &str| -> Result<&Assigned, Invalid> {
            let channel = existing()?;
            if !channel.is_member(user) {
                return Err(Invalid::Forbidden(format!("{user:?} is not a member of channel {channel_id:?}")));
            }
            Ok(channel)
        };
        match op {
            Op::Send { user, text, client_id, .. } => {
                process::check_text(text)?;
                if let Some(client_id) = client_id {
                    process::check_client_id(client_id)?;
                }
                member(user)?;
            }
            Op::Edit { user, target, text, .. } => {
                process::check_text(text)?;
                check_author(member(user)?, channel_id, user, *target)?;
            }
            Op::Delete { user, target, .. } => {
                check_author(member(user)?, channel_id, user, *target)?;
            }
            Op::Create { user, visibility, name, members, .. } => {
                if channel.is_some_and(|c| c.visibility.is_some()) {
                    return Err(Invalid::Conflict(format!("channel {channel_id:?} exists already")));
                }
                if name.len() > process::CHANNEL_NAME_BYTES_MAX {
                    return Err(Invalid::TooLarge(format!("name is {} bytes: at most CHANNEL_NAME_BYTES_MAX ({})", name.len(), process::CHANNEL_NAME_BYTES_MAX)));
                }
                for m in members {
                    process::check_user(m)?;
                }
                if !members.contains(user) {
                    return Err(Invalid::Bad("the creator is one of the members".into()));
                }
                if members.len() > CHANNEL_MEMBERS_MAX {
                    return Err(Invalid::TooLarge(format!("{} members: at most CHANNEL_MEMBERS_MAX ({CHANNEL_MEMBERS_MAX})", members.len())));
                }
                if *visibility == Visibility::Direct && process::dm_users(channel_id).is_none() {
                    return Err(Invalid::Bad("direct-message channels are opened with POST /v1/chat/dms".into()));
                }
            }
            Op::Join { user, members, .. } => {
                let channel = existing()?;
                for m in members {
                    process::check_user(m)?;
                }
                match channel.visibility {
                    Some(Visibility::Direct) => return Err(Invalid::Forbidden(format!("{channel_id:?} is a direct message: its members are fixed"))),
                    Some(Visibility::Public) if members.iter().all(|m| m == user) => {}
                    _ if channel.is_member(user) => {}
                    _ => return Err(Invalid::Forbidden(format!("{user:?} is not a member of channel {channel_id:?} and may not add members to it"))),
                }
                let new = members.iter().filter(|m| !channel.is_member(m)).collect::<HashSet<_>>().len();
                if channel.members.len() + new > CHANNEL_MEMBERS_MAX {
                    return Err(Invalid::TooLarge(format!("channel {channel_id:?} would have {} members: at most CHANNEL_MEMBERS_MAX ({CHANNEL_MEMBERS_MAX})", channel.members.len() + new)));
                }
            }
            Op::Leave { user, members, .. } => {
                let channel = existing()?;
                if channel.visibility == Some(Visibility::Direct) {
                    return Err(Invalid::Forbidden(format!("{channel_id:?} is a direct message: its members are fixed")));
                }
                if members.iter().any(|m| m != user) && !channel.is_member(user) {
                    return Err(Invalid::Forbidden(format!("{user:?} is not a member of channel {channel_id:?} and may not remove members")));
                }
            }
        }
        Ok(())
    }

    /// Validate `ops` (all or nothing), assign each its channel's next seq, append them durably,
    /// apply them in log order, and say where each landed. On a shared log: see
    /// [`Chat::submit_shared`].
    pub fn submit(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, ChatError> {
        let topic = match &self.log {
            Log::Local { events, .. } => events,
            Log::Shared(shared) => return self.submit_shared(shared, ops),
        };
        let now = tributary_core::now_ms();
        let accepted = Instant::now();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; ops.len()];
        let mut waits: Vec<(usize, String, u64)> = Vec::new();
        let mut appends = Vec::new();
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            for op in &ops {
                Self::validate(state, op)?;
            }
            let mut by_partition: BTreeMap<u32, Vec<Event>> = BTreeMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                let partition = topic.partition_for(Some(op.channel().as_bytes()), 0);
                if let Some(reason) = &state.partitions[partition as usize].broken {
                    return Err(ChatError::Unavailable(format!("writes to the chat log are stopped until a restart: {reason}")));
                }
                let channel = op.channel().to_string();
                match assign(state, op, now) {
                    Assignment::Repeat(seq) => waits.push((i, channel, seq)),
                    Assignment::Unchanged(seq) => outcomes[i] = Some(Outcome { channel, seq, ts: now, duplicate: true }),
                    Assignment::Event(event) => {
                        outcomes[i] = Some(Outcome { channel, seq: event.seq, ts: now, duplicate: false });
                        by_partition.entry(partition).or_default().push(event);
                    }
                }
            }
            for (partition, events) in by_partition {
                let records: Vec<Record> = events.iter().map(|e| Record::keyed(Bytes::copy_from_slice(e.channel.as_bytes()), e.json())).collect();
                let pending = topic.log(partition).and_then(|log| log.append_pending(&records, 0, 0).map_err(StreamError::Log));
                match pending {
                    Ok(pending) => appends.push((partition, events, records, pending)),
                    Err(error) => {
                        state.partitions[partition as usize].broken = Some(error.to_string());
                        self.metrics.error();
                        return Err(error.into());
                    }
                }
            }
        }
        let mut count = 0;
        for (partition, events, records, pending) in appends {
            let appended = match pending.wait() {
                Ok(appended) => appended,
                Err(error) => {
                    self.state.lock().partitions[partition as usize].broken = Some(error.to_string());
                    self.metrics.error();
                    return Err(StreamError::Log(error).into());
                }
            };
            count += events.iter().filter(|e| matches!(e.body, Body::Message { .. })).count() as u64;
            let batch = events
                .into_iter()
                .zip(records)
                .enumerate()
                .map(|(n, (event, record))| {
                    let json: Arc<str> = Arc::from(std::str::from_utf8(record.value.as_deref().unwrap_or_default()).unwrap_or_default());
                    Appended { event, json, offset: appended.base_offset + n as u64, accepted: Some(accepted) }
                })
                .collect();
            self.apply(partition, appended.base_offset, batch);
        }
        self.count_sent(count);
        // Repeated sends answer once the first one is applied (durable).
        for (i, channel, seq) in waits {
            let deadline = Instant::now() + DUPLICATE_WAIT;
            loop {
                let applied = self.state.lock().channels.get(channel.as_str()).map_or(0, |c| c.view.last_seq());
                if applied >= seq {
                    let ts = self.message(&channel, seq).map_or(now, |m| m.ts);
                    outcomes[i] = Some(Outcome { channel: channel.clone(), seq, ts, duplicate: true });
                    break;
                }
                if Instant::now() > deadline {
                    return Err(ChatError::Unavailable(format!("the first send of this client_id (seq {seq} of {channel:?}) is not durable yet: retry")));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(outcomes.into_iter().map(|o| o.expect("every op has an outcome")).collect())
    }

    fn count_sent(&self, count: u64) {
        self.metrics.messages_in(count);
        self.sent.fetch_add(count, Ordering::Relaxed);
    }

    /// On a shared log: check `ops` against what this node has applied (most refusals are
    /// answered here, before anything is appended), append them as one proposal per partition,
    /// and wait for this node's follower's verdict on each. A proposal is all or nothing: ops
    /// on channels of one partition (all of them, with the default single partition) are
    /// accepted together or refused together.
    fn submit_shared(&self, shared: &SharedChat, ops: Vec<Op>) -> Result<Vec<Outcome>, ChatError> {
        {
            let state = self.state.lock();
            for op in &ops {
                Self::validate(&state, op)?;
            }
        }
        let now = tributary_core::now_ms();
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            groups.entry(partition_for_key(op.channel().as_bytes(), shared.partitions)).or_default().push(i);
        }
        let mut records = Vec::with_capacity(groups.len());
        let mut waiting = Vec::with_capacity(groups.len());
        for indexes in groups.values() {
            let proposal: Vec<Event> = indexes.iter().map(|&i| ops[i].proposal(now)).collect();
            let id = shared.next_proposal.fetch_add(1, Ordering::Relaxed);
            let (verdict, verdict_of) = std::sync::mpsc::channel();
            shared.proposals.lock().insert(id, verdict);
            let headers = vec![Header { name: PROPOSAL_HEADER.into(), value: Bytes::from(id.to_string()) }];
            let value = serde_json::to_vec(&proposal).expect("events serialize");
            records.push(Record { key: Some(Bytes::copy_from_slice(ops[indexes[0]].channel().as_bytes())), value: Some(value.into()), headers, timestamp_ms: 0 });
            waiting.push((id, verdict_of));
        }
        if let Err(error) = shared.log.produce(EVENTS_TOPIC, records) {
            let mut proposals = shared.proposals.lock();
            for (id, _) in &waiting {
                proposals.remove(id);
            }
            self.metrics.error();
            return Err(error.into());
        }
        let deadline = Instant::now() + FANOUT_WAIT_MAX;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; ops.len()];
        let mut refused = None;
        let mut undecided = false;
        for ((id, verdict_of), indexes) in waiting.iter().zip(groups.values()) {
            match verdict_of.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(landed)) => {
                    for (&i, outcome) in indexes.iter().zip(landed) {
                        outcomes[i] = Some(outcome);
                    }
                }
                Ok(Err(invalid)) => refused = refused.or(Some(invalid)),
                Err(_) => undecided = true,
            }
            shared.proposals.lock().remove(id);
        }
        if undecided {
            return Err(ChatError::Unavailable(format!(
                "appended, but this node's follower has not decided it within FANOUT_WAIT_MAX ({FANOUT_WAIT_MAX:?}); the nodes that read it apply it, and a retry with the same client_id is safe"
            )));
        }
        if let Some(invalid) = refused {
            return Err(invalid.into());
        }
        let outcomes: Vec<Outcome> = outcomes.into_iter().map(|o| o.expect("every op has an outcome")).collect();
        self.count_sent(ops.iter().zip(&outcomes).filter(|(op, outcome)| matches!(op, Op::Send { .. }) && !outcome.duplicate).count() as u64);
        Ok(outcomes)
    }

    /// A step of this node's follower of a shared log: what is new in each partition of the
    /// chat log, then read markers and typing indicators.
    fn follow_once(&self, events: &mut [Reader], markers: &mut (Reader, u64), typing: &mut (Reader, u64)) -> Result<(), StreamError> {
        for (partition, reader) in (0u32..).zip(events.iter_mut()) {
            let next = self.state.lock().partitions[partition as usize].next;
            let records = reader.read(next, FOLLOW_CHUNK_RECORDS)?;
            if let Some(last) = records.last() {
                let last = last.offset;
                self.follow_events(partition, &records);
                self.state.lock().partitions[partition as usize].next = last + 1;
            }
        }
        let (reader, next) = markers;
        for record in reader.read(*next, FOLLOW_CHUNK_RECORDS)? {
            *next = record.offset + 1;
            if let Some((channel, user, seq)) = marker_of(&record) {
                let wake = self.raise_marker(&mut self.state.lock(), channel, user, seq);
                wake_all(wake);
            }
        }
        let (reader, next) = typing;
        for record in reader.read(*next, FOLLOW_CHUNK_RECORDS)? {
            *next = record.offset + 1;
            let Some(json) = record.value.as_deref().and_then(|v| std::str::from_utf8(v).ok()) else { continue };
            let Ok(indicator) = serde_json::from_str::<serde_json::Value>(json) else { continue };
            let (Some(channel), Some(user)) = (indicator["typing"]["channel"].as_str(), indicator["typing"]["user"].as_str()) else { continue };
            let mut state = self.state.lock();
            // The rate limit counts indicators sent through any node, from when they were appended.
            state.note_typing((Arc::from(channel), Arc::from(user)), shared_log::accepted_at(&record, Instant::now(), tributary_core::now_ms()));
            let Some(members) = state.channels.get(channel).map(|c| c.view.members.iter().filter(|m| &***m != user).cloned().collect::<Vec<_>>()) else { continue };
            let wake = queue_ephemeral(&state, members.iter().map(|m| &**m), &Arc::from(json));
            drop(state);
            wake_all(wake);
        }
        Ok(())
    }

    /// Decide and apply proposals read from a shared log, in log order (the same way on every
    /// node), and hand this node's senders their verdicts.
    fn follow_events(&self, partition: u32, records: &[StoredRecord]) {
        let mut wake = HashMap::new();
        let mut verdicts = Vec::new();
        {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            for record in records {
                let id = record.headers.iter().find(|h| h.name == PROPOSAL_HEADER).and_then(|h| std::str::from_utf8(&h.value).ok()?.parse::<u64>().ok());
                let verdict = self.decide(state, partition, record, &mut wake);
                if let Some(id) = id {
                    verdicts.push((id, verdict));
                }
            }
        }
        wake_all(wake.into_values());
        if let Log::Shared(shared) = &self.log
            && !verdicts.is_empty()
        {
            let proposals = shared.proposals.lock();
            for (id, verdict) in verdicts {
                if let Some(waiting) = proposals.get(&id) {
                    let _ = waiting.send(verdict);
                }
            }
        }
    }

    /// One proposal: every op valid against the state so far, or the proposal is refused whole.
    fn decide(&self, state: &mut State, partition: u32, record: &StoredRecord, wake: &mut HashMap<u64, Arc<Connection>>) -> Verdict {
        let proposal: Vec<Event> = match record.value.as_deref().map(serde_json::from_slice) {
            Some(Ok(proposal)) => proposal,
            _ => {
                tracing::warn!(partition, offset = record.offset, "{EVENTS_TOPIC}: an unreadable proposal is skipped");
                self.index(partition, record.offset, Vec::new());
                return Err(Invalid::Bad("the proposal is unreadable".into()));
            }
        };
        let ops: Vec<(Op, i64)> = proposal.into_iter().map(Op::from_proposal).collect();
        if let Some(invalid) = ops.iter().find_map(|(op, _)| Self::validate(state, op).err()) {
            self.index(partition, record.offset, Vec::new());
            return Err(invalid);
        }
        let accepted = Some(shared_log::accepted_at(record, Instant::now(), tributary_core::now_ms()));
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut edits = Vec::new();
        for (op, ts) in ops {
            let channel = op.channel().to_string();
            let outcome = match assign(state, op, ts) {
                Assignment::Repeat(seq) => {
                    let ts = state.channels.get(channel.as_str()).and_then(|c| c.view.view(&channel, seq)).map_or(ts, |m| m.ts);
                    Outcome { channel, seq, ts, duplicate: true }
                }
                Assignment::Unchanged(seq) => Outcome { channel, seq, ts, duplicate: true },
                Assignment::Event(event) => {
                    let json: Arc<str> = Arc::from(event.json());
                    let outcome = Outcome { channel, seq: event.seq, ts, duplicate: false };
                    self.apply_event(state, Appended { event, json, offset: record.offset, accepted }, &mut edits, wake);
                    outcome
                }
            };
            outcomes.push(outcome);
        }
        self.index(partition, record.offset, edits);
        Ok(outcomes)
    }

    /// Apply a durable batch once every batch before it in the partition is applied.
    fn apply(&self, partition: u32, base: u64, batch: Vec<Appended>) {
        let mut wake: HashMap<u64, Arc<Connection>> = HashMap::new();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let p = partition as usize;
        state.partitions[p].waiting.insert(base, batch);
        loop {
            let next = state.partitions[p].next;
            let Some(batch) = state.partitions[p].waiting.remove(&next) else { break };
            for appended in batch {
                state.partitions[p].next = appended.offset + 1;
                let offset = appended.offset;
                let mut edits = Vec::new();
                self.apply_event(state, appended, &mut edits, &mut wake);
                self.index(partition, offset, edits);
            }
        }
        drop(guard);
        wake_all(wake.into_values());
    }

    /// Apply one event to its channel's view, queue it for the connections of its members (and
    /// of members it removes), and add its search index change to `edits`.
    fn apply_event(&self, state: &mut State, appended: Appended, edits: &mut Vec<Edit>, wake: &mut HashMap<u64, Arc<Connection>>) {
        let Appended { event, json, accepted, .. } = appended;
        let Some(key) = state.channels.get_key_value(event.channel.as_str()).map(|(key, _)| key.clone()) else { return };
        let channel = state.channels.get_mut(&key).expect("the channel exists");
        if let Body::Created { visibility, name, .. } = &event.body {
            channel.view.visibility = *visibility;
            channel.view.name = name.clone();
        }
        let deleted = event_target_deleted(&channel.view, &event);
        let mut recipients: Vec<Arc<str>> = Vec::new();
        if let Body::Left { members } = &event.body {
            recipients.extend(members.iter().map(|m| Arc::from(m.as_str())));
        }
        channel.view.apply(&event, json.clone());
        recipients.extend(channel.view.members.iter().cloned());
        edits.extend(index_edit(&event, deleted));
        let item = Item::Event { channel: key, seq: event.seq, json, accepted };
        for user in recipients {
            if let Some(connections) = state.connections.get(&user) {
                for connection in connections.values() {
                    if connection.push(item.clone()) {
                        self.overflows.fetch_add(1, Ordering::Relaxed);
                    }
                    wake.entry(connection.id).or_insert_with(|| connection.clone());
                }
            }
        }
    }

    /// Hand the search index what the record at `offset` changes (nothing: its checkpoint
    /// passes it), unless the index covered it before this start.
    fn index(&self, partition: u32, offset: u64, edits: Vec<Edit>) {
        if offset < self.index_from[partition as usize] {
            return;
        }
        if let Err(error) = self.search.record(edits, (partition, offset)) {
            self.search_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "chat search index");
        }
    }

    /// Register a connection of `user`: from now on it is offered every event of its user's
    /// channels.
    pub fn register(&self, user: &str) -> Arc<Connection> {
        let user: Arc<str> = Arc::from(user);
        let connection = Arc::new(Connection { id: self.next_connection.fetch_add(1, Ordering::Relaxed), user: user.clone(), queue: Mutex::new(Queue::default()), wake: Notify::new() });
        self.state.lock().connections.entry(user).or_default().insert(connection.id, connection.clone());
        self.connection_count.fetch_add(1, Ordering::Relaxed);
        connection
    }

    pub fn unregister(&self, connection: &Connection) {
        let mut state = self.state.lock();
        if let Some(connections) = state.connections.get_mut(&connection.user) {
            connections.remove(&connection.id);
            if connections.is_empty() {
                state.connections.remove(&connection.user);
            }
        }
        self.connection_count.fetch_sub(1, Ordering::Relaxed);
    }

    /// The wire JSON of `channel`'s events after seq `after` up to `until` (inclusive), if the
    /// user may read it.
    pub fn events_after(&self, channel: &str, after: u64, until: Option<u64>) -> Vec<(u64, Arc<str>)> {
        let state = self.state.lock();
        let Some(channel) = state.channels.get(channel) else { return Vec::new() };
        let last = until.unwrap_or(u64::MAX).min(channel.view.last_seq());
        (after + 1..=last).map(|seq| (seq, channel.view.events[(seq - 1) as usize].clone())).collect()
    }

    /// A user's channels: id, visibility, name, members, last seq, read seq, unread count.
    pub fn channels_of(&self, user: &str) -> Vec<ChannelSummary> {
        let state = self.state.lock();
        let mut out: Vec<ChannelSummary> = state
            .channels
            .iter()
            .filter(|(_, c)| c.view.last_seq() > 0 && c.view.members.contains(user))
            .map(|(id, c)| summary(&state, id, c, user))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One channel as `user` sees it (members may see any channel; others only public ones).
    pub fn channel(&self, id: &str, user: &str) -> Result<(ChannelSummary, Vec<String>), Invalid> {
        let state = self.state.lock();
        let (key, channel) = state.channels.get_key_value(id).filter(|(_, c)| c.view.last_seq() > 0).ok_or_else(|| Invalid::NotFound(format!("channel {id:?} does not exist")))?;
        if !channel.view.members.contains(user) && channel.view.visibility != Visibility::Public {
            return Err(Invalid::NotFound(format!("channel {id:?} does not exist")));
        }
        Ok((summary(&state, key, channel, user), channel.view.members.iter().map(|m| m.to_string()).collect()))
    }

    fn readable<'a>(state: &'a State, id: &str, user: &str) -> Result<&'a Channel, Invalid> {
        let channel = state.channels.get(id).filter(|c| c.view.last_seq() > 0).ok_or_else(|| Invalid::NotFound(format!("channel {id:?} does not exist")))?;
        if !channel.view.members.contains(user) {
            return Err(Invalid::Forbidden(format!("{user:?} is not a member of channel {id:?}")));
        }
        Ok(channel)
    }

    /// A page of history (see [`ChannelView::history`]).
    pub fn history(&self, id: &str, user: &str, before: Option<u64>, after: Option<u64>, limit: usize) -> Result<(Vec<MessageView>, bool, u64), Invalid> {
        let state = self.state.lock();
        let channel = Self::readable(&state, id, user)?;
        let (page, more) = channel.view.history(id, before, after, limit);
        Ok((page, more, channel.view.last_seq()))
    }

    pub fn message(&self, id: &str, seq: u64) -> Option<MessageView> {
        self.state.lock().channels.get(id)?.view.view(id, seq)
    }

    /// Store that `user` has read `channel` up to `seq` (durably; markers only move forward).
    /// Returns the marker and the unread count.
    pub fn mark_read(&self, id: &str, user: &str, seq: u64) -> Result<(u64, u64), ChatError> {
        {
            let state = self.state.lock();
            let channel = Self::readable(&state, id, user)?;
            if seq > channel.view.last_seq() {
                return Err(Invalid::Bad(format!("seq {seq} is beyond the channel's last seq {}", channel.view.last_seq())).into());
            }
            let marker = state.read.get(&(Arc::from(id), Arc::from(user))).copied().unwrap_or(0);
            if seq <= marker {
                // Markers only move forward: nothing to store or tell.
                return Ok((marker, channel.view.unread(user, marker)));
            }
        }
        let record = Record::keyed(Bytes::from(format!("{id}\n{user}")), seq.to_string());
        match &self.log {
            Log::Local { markers, .. } => markers.produce_to(0, &[record]).map(drop)?,
            Log::Shared(shared) => shared.log.produce(READ_MARKERS_TOPIC, vec![record]).map(drop)?,
        }
        let mut guard = self.state.lock();
        let wake = self.raise_marker(&mut guard, id, user, seq);
        let marker = guard.read.get(&(Arc::from(id), Arc::from(user))).copied().unwrap_or(0);
        let unread = guard.channels.get(id).map_or(0, |c| c.view.unread(user, marker));
        drop(guard);
        wake_all(wake);
        Ok((marker, unread))
    }

    /// Move `user`'s read marker of `channel` up to `seq`; if it moved, its connections are told
    /// (returned to be woken once the lock is released).
    fn raise_marker(&self, state: &mut State, channel: &str, user: &str, seq: u64) -> Vec<Arc<Connection>> {
        let marker = state.read.entry((Arc::from(channel), Arc::from(user))).or_insert(0);
        if seq <= *marker {
            return Vec::new();
        }
        *marker = seq;
        let unread = state.channels.get(channel).map_or(0, |c| c.view.unread(user, seq));
        let json: Arc<str> = Arc::from(serde_json::json!({"read": {"channel": channel, "seq": seq, "unread": unread}}).to_string());
        queue_ephemeral(state, [user], &json)
    }

    /// A typing indicator of `user` in `channel`, to the other members' connections (on a
    /// shared log, through its typing topic, to every node's).
    pub fn typing(&self, id: &str, user: &str) -> Result<(), ChatError> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let channel = Self::readable(state, id, user)?;
        let members: Vec<Arc<str>> = channel.view.members.iter().filter(|m| &***m != user).cloned().collect();
        let key = (Arc::from(id), Arc::from(user));
        let now = Instant::now();
        if let Some(last) = state.typing.get(&key)
            && now.saturating_duration_since(*last) < Duration::from_millis(process::TYPING_INTERVAL_MS_MIN)
        {
            return Err(Invalid::RateLimited(format!("one typing indicator per channel every TYPING_INTERVAL_MS_MIN ({} ms)", process::TYPING_INTERVAL_MS_MIN)).into());
        }
        state.note_typing(key, now);
        let json: Arc<str> = Arc::from(serde_json::json!({"typing": {"channel": id, "user": user}}).to_string());
        if let Log::Shared(shared) = &self.log {
            drop(guard);
            let record = Record::keyed(Bytes::copy_from_slice(id.as_bytes()), Bytes::copy_from_slice(json.as_bytes()));
            shared.log.produce(TYPING_TOPIC, vec![record])?;
            return Ok(());
        }
        let wake = queue_ephemeral(state, members.iter().map(|m| &**m), &json);
        drop(guard);
        wake_all(wake);
        Ok(())
    }

    /// Search the messages of `user`'s channels (or of one of them).
    pub fn search(&self, user: &str, text: &str, channel: Option<&str>, offset: usize, limit: usize) -> Result<(usize, Vec<MessageView>), ChatError> {
        let scope: Vec<String> = match channel {
            Some(id) => {
                let state = self.state.lock();
                Self::readable(&state, id, user)?;
                vec![id.to_string()]
            }
            None => self.channels_of(user).into_iter().map(|c| c.id).collect(),
        };
        let page = self.search.search(&SearchQuery { text: text.to_string(), filter: Some(("channel".into(), scope)), offset, limit })?;
        let state = self.state.lock();
        let mut hits = Vec::with_capacity(page.hits.len());
        for hit in page.hits {
            let Some((id, seq)) = hit.id.rsplit_once('/') else { continue };
            let Ok(seq) = seq.parse::<u64>() else { continue };
            // The index may lag the log by a commit: show the message as it is now.
            if let Some(view) = state.channels.get(id).and_then(|c| c.view.view(id, seq)).filter(|v| !v.deleted) {
                hits.push(view);
            }
        }
        Ok((page.total, hits))
    }

    fn count_delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        self.metrics.messages_out(n);
    }

    pub fn connections(&self) -> usize {
        self.connection_count.load(Ordering::Relaxed)
    }
}

/// Whether the message an edit targets is deleted (an edit of a deleted message must not put
/// it back into the index).
fn event_target_deleted(view: &ChannelView, event: &Event) -> bool {
    match &event.body {
        Body::Edited { target, .. } => view.messages.get(target).is_none_or(|m| m.text.is_none()),
        _ => false,
    }
}

fn check_author(channel: &Assigned, channel_id: &str, user: &str, target: u64) -> Result<(), Invalid> {
    match channel.authors.get(&target) {
        None => Err(Invalid::NotFound(format!("channel {channel_id:?} has no message {target}"))),
        Some((_, true)) => Err(Invalid::NotFound(format!("message {target} of channel {channel_id:?} was deleted"))),
        Some((author, false)) if &**author != user => Err(Invalid::Forbidden(format!("message {target} of channel {channel_id:?} is {author:?}'s: only its author may change it"))),
        Some(_) => Ok(()),
    }
}

/// A channel as listed for one user.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ChannelSummary {
    pub id: String,
    pub visibility: Visibility,
    pub name: String,
    pub members: usize,
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
}

fn summary(state: &State, id: &Arc<str>, channel: &Channel, user: &str) -> ChannelSummary {
    let read_seq = state.read.get(&(id.clone(), Arc::from(user))).copied().unwrap_or(0);
    ChannelSummary {
        id: id.to_string(),
        visibility: channel.view.visibility,
        name: channel.view.name.clone(),
        members: channel.view.members.len(),
        last_seq: channel.view.last_seq(),
        read_seq,
        unread: if channel.view.members.contains(user) { channel.view.unread(user, read_seq) } else { 0 },
    }
}

/// The read markers, from their topic (the last value per key wins on the engine's compacted
/// topic; markers only move forward, so the largest is kept), and the offset after the last
/// one read.
fn load_markers(log: &Log) -> anyhow::Result<(ReadMarkers, u64)> {
    let mut read = HashMap::new();
    let (start, end) = log.offsets(READ_MARKERS_TOPIC, 0)?;
    let mut offset = start;
    while offset < end {
        let records = log.fetch(READ_MARKERS_TOPIC, 0, offset, REBUILD_CHUNK_RECORDS)?;
        let Some(last) = records.last() else { break };
        offset = last.offset + 1;
        for (channel, user, seq) in records.iter().filter_map(marker_of) {
            let marker = read.entry((Arc::from(channel), Arc::from(user))).or_insert(0);
            *marker = seq.max(*marker);
        }
    }
    Ok((read, offset.max(end)))
}

/// The channel, user and seq of a read marker record.
fn marker_of(record: &StoredRecord) -> Option<(&str, &str, u64)> {
    let (channel, user) = std::str::from_utf8(record.key.as_deref()?).ok()?.split_once('\n')?;
    let seq = std::str::from_utf8(record.value.as_deref()?).ok()?.parse::<u64>().ok()?;
    Some((channel, user, seq))
}

/// Queue an ephemeral message (typing, a read marker) for every connection of `users`; the
/// connections are returned to be woken once the state lock is released.
fn queue_ephemeral<'a>(state: &State, users: impl IntoIterator<Item = &'a str>, json: &Arc<str>) -> Vec<Arc<Connection>> {
    let mut wake = Vec::new();
    for user in users {
        for connection in state.connections.get(user).into_iter().flat_map(|c| c.values()) {
            connection.push(Item::Ephemeral(json.clone()));
            wake.push(connection.clone());
        }
    }
    wake
}

fn wake_all(connections: impl IntoIterator<Item = Arc<Connection>>) {
    for connection in connections {
        connection.wake.notify_one();
    }
}

impl System for Chat {
    fn id(&self) -> &'static str {
        ID
    }

    fn api(self: Arc<Self>) -> SystemApi {
        api::router(self)
    }

    fn metrics(&self) -> &SystemMetrics {
        &self.metrics
    }

    fn shutdown(&self) {
        if let Log::Shared(shared) = &self.log {
            shared.stopping.store(true, Ordering::Release);
        }
    }

    fn status(&self) -> serde_json::Value {
        let presence = self.presence.stats();
        let channels = self.state.lock().channels.len();
        serde_json::json!({
            "connections": self.connections(),
            "users_online": presence.users,
            "channels": channels,
            "sent_total": self.sent.load(Ordering::Relaxed),
            "delivered_total": self.delivered.load(Ordering::Relaxed),
            "queue_overflows_total": self.overflows.load(Ordering::Relaxed),
            "search_documents": self.search.documents(),
            "search_errors_total": self.search_errors.load(Ordering::Relaxed),
        })
    }
}
