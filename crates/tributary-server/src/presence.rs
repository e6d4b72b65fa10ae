//! Presence: who is connected, for any system whose connections belong to users.
//!
//! A connection [`Presence::join`]s with its user id and the scopes it is present in (topics,
//! channels, rooms: whatever the system calls them) and holds the returned [`PresenceGuard`]; the
//! guard leaves when dropped, so a connection that ends in any way (close, error, abort) is gone
//! from presence. Counts are per (scope, user): a user with two tabs open is one member with two
//! connections. A [`PresenceEvent`] is broadcast when a user becomes present in a scope (first
//! connection) and when they stop being present (last connection gone); extra tabs make no event.
//!
//! Events go through a bounded broadcast channel ([`PRESENCE_EVENTS_BUFFER`]): a receiver that
//! falls behind is told how many it missed (tokio's `Lagged`) and should re-read the members.
//!
//! **Across nodes.** [`Presence::shared`] also publishes this node's counts to a cache every node
//! shares (Redis): per scope and per user, a sorted set of `<node>/<user>` members scored by
//! when they expire, and a hash of their connection counts. A background writer writes each
//! change (the count as it is when written, so writes are idempotent) and renews
//! every member each [`PRESENCE_REFRESH`]; a member not renewed for [`PRESENCE_TTL`] (its node
//! died) is no longer counted and is removed by the next read. [`Presence::members`] and
//! [`Presence::user_connections`] then read the cache (after writing this node's pending
//! changes, so a node reads its own joins back), and every node answers for all.
//!
//! Events are global too: the first connection of a user in a scope on any node makes one join,
//! the last one gone from every node makes one leave, and every node's receivers hear both.
//! - Each node registers itself in `<prefix>nodes` (a sorted set scored by expiry, renewed each
//!   [`PRESENCE_REFRESH`]) and lists the (scope, user) pairs it holds in `<prefix>n/<node>`.
//! - When a pair starts or stops being held on a node, its writer updates that list, then
//!   announces the change on the cache channel `<prefix>events`. Changes that come and go
//!   between two writes are not announced.
//! - Every node follows the channel and keeps which other nodes hold each pair. An event fires
//!   where a pair goes from held nowhere to held somewhere, or back. A node's own joins and
//!   leaves count at once; another node's count once its announcement arrives (milliseconds).
//! - A node whose registration expired (it died) is dropped from every pair by each node's
//!   sweep, every [`PRESENCE_REFRESH`]: its users' leaves fire up to [`PRESENCE_TTL`] plus a
//!   refresh after the death.
//! - At start, after a gap in the channel (a lost connection to the cache, a follower that
//!   fell behind), and every [`PRESENCE_RESYNC`], a node reads every live node's list again and
//!   fires the differences. Announcements are at most once; the periodic read bounds how long a
//!   lost one leaves a node wrong about a pair (it costs one read of every pair every node
//!   holds, per node, each period).
//!
//! [`Presence::stats`] stays this node's own.
//!
//! What is not here: persistence (presence is the state of live connections, gone on restart by
//! definition), and any wire format.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, oneshot};
use tributary_engine::cache::{CacheError, CacheStore, Delivery, Limit, Order};

/// Presence events buffered for receivers before a slow one is told it lagged.
pub const PRESENCE_EVENTS_BUFFER: usize = 4096;
/// Most members one [`Presence::members`] call returns.
pub const PRESENCE_MEMBERS_PAGE_MAX: usize = 10_000;
/// How often a node renews its members in a shared cache, and looks for nodes that died.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(10);
/// How long a member in a shared cache counts without being renewed (its node stopped).
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// How often a node reads every other node's list of pairs again, whatever it heard meanwhile.
pub const PRESENCE_RESYNC: Duration = Duration::from_secs(60);
/// Counts the writer sends to the shared cache at once.
pub const PRESENCE_WRITES_IN_FLIGHT: usize = 64;
/// How long the writer and the follower wait before they try again after the shared cache failed.
pub const PRESENCE_RETRY: Duration = Duration::from_millis(500);

/// Who is present, per scope and in all.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<PresenceEvent>,
    shared: Option<Shared>,
}

impl Inner {
    /// The shared part, which the writer and the follower run for.
    fn shared(&self) -> &Shared {
        self.shared.as_ref().expect("the writer and the follower run for shared presence")
    }

    /// Tell the receivers (none listening is fine).
    fn send(&self, events: impl IntoIterator<Item = PresenceEvent>) {
        for event in events {
            let _ = self.events.send(event);
        }
    }
}

/// How often a shared presence renews, how long what it wrote lasts, and how often it reads the
/// other nodes' lists again.
#[derive(Clone, Copy)]
struct Timing {
    refresh: Duration,
    ttl: Duration,
    resync: Duration,
}

/// This node's part of a presence shared through a cache.
struct Shared {
    cache: Arc<dyn CacheStore>,
    /// `presence/<name>/`: keys are `<prefix>s/<scope>` and `<prefix>u/<user>` (sorted sets),
    /// each with its counts in the hash `<key>/n`; `<prefix>nodes` (the registry),
    /// `<prefix>n/<node>` (the pairs a node holds) and the channel `<prefix>events`.
    prefix: String,
    node: Arc<str>,
    timing: Timing,
    /// Counts changed since the last write.
    dirty: Mutex<HashSet<Counted>>,
    /// The (scope, user) pairs this node last announced it holds.
    announced: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    /// Held by a flush; holds whether this node's registration is current (a flush registers
    /// the node first when it is not, so the node is registered before it announces).
    writing: tokio::sync::Mutex<bool>,
    wake: Arc<Notify>,
    /// Dropped with the presence, which stops the follower.
    _stop: oneshot::Sender<()>,
}

/// A count this node publishes: one user's connections in one scope, or in all.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Counted {
    Scope(Arc<str>, Arc<str>),
    User(Arc<str>),
}

/// What a node announces on the presence channel: it now holds connections of `user` in
/// `scope`, or no longer does.
#[derive(Serialize, Deserialize)]
struct Announcement {
    node: String,
    scope: String,
    user: String,
    present: bool,
}

/// (scope, user) → the other nodes that hold connections of the user in the scope.
type Remote = HashMap<(Arc<str>, Arc<str>), HashSet<Arc<str>>>;

#[derive(Default)]
struct State {
    /// scope → user → connections.
    scopes: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    /// user → connections, whatever their scopes.
    users: HashMap<Arc<str>, u32>,
    connections: usize,
    /// Shared presence: where other nodes hold connections.
    remote: Remote,
}

impl State {
    fn local(&self, scope: &str, user: &str) -> u32 {
        self.scopes.get(scope).and_then(|users| users.get(user)).copied().unwrap_or(0)
    }

    /// Whether another node holds `user` in `scope` (never, unless shared).
    fn elsewhere(&self, scope: &Arc<str>, user: &Arc<str>) -> bool {
        !self.remote.is_empty() && self.remote.contains_key(&(scope.clone(), user.clone()))
    }

    /// Another node holds `user` in `scope`, or stopped holding them: the event, when that
    /// changes whether the user is present there at all.
    fn remote_change(&mut self, node: Arc<str>, scope: Arc<str>, user: Arc<str>, present: bool) -> Option<PresenceEvent> {
        let key = (scope, user);
        let change = if present {
            let nodes = self.remote.entry(key.clone()).or_default();
            let first = nodes.is_empty();
            nodes.insert(node);
            first.then_some(PresenceChange::Join)?
        } else {
            let nodes = self.remote.get_mut(&key)?;
            if !nodes.remove(&node) || !nodes.is_empty() {
                return None;
            }
            self.remote.remove(&key);
            PresenceChange::Leave
        };
        (self.local(&key.0, &key.1) == 0).then_some(PresenceEvent { scope: key.0, user: key.1, event: change })
    }

    /// Replace what other nodes hold by `fresh`: the events of every pair that is present now
    /// and was not, or the other way round.
    fn replace_remote(&mut self, fresh: Remote) -> Vec<PresenceEvent> {
        let old = std::mem::replace(&mut self.remote, fresh);
        let mut events = Vec::new();
        for ((scope, user), change) in old.keys().filter(|key| !self.remote.contains_key(*key)).map(|key| (key, PresenceChange::Leave)).chain(
            self.remote.keys().filter(|key| !old.contains_key(*key)).map(|key| (key, PresenceChange::Join)),
        ) {
            if self.local(scope, user) == 0 {
                events.push(PresenceEvent { scope: scope.clone(), user: user.clone(), event: change });
            }
        }
        events
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceChange {
    Join,
    Leave,
}

/// A user became present in a scope, or stopped being present there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub scope: Arc<str>,
    pub user: Arc<str>,
    pub event: PresenceChange,
}

/// A user present in a scope, with how many connections they have there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub user: String,
    pub connections: u32,
}

/// One scope's presence: its members (at most the page asked for) and its totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScopePresence {
    pub users: usize,
    pub connections: u64,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceStats {
    pub users: usize,
    pub connections: usize,
    pub scopes: usize,
}

/// Held by a connection while it is present; leaving happens on drop.
pub struct PresenceGuard {
    presence: Presence,
    user: Arc<str>,
    scopes: Vec<Arc<str>>,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.leave(&self.user, &self.scopes);
    }
}

impl PresenceGuard {
    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn scopes(&self) -> &[Arc<str>] {
        &self.scopes
    }
}

impl Default for Presence {
    fn default() -> Self {
        Presence::new()
    }
}

impl Presence {
    /// Presence of this node's connections alone.
    pub fn new() -> Presence {
        let (events, _) = broadcast::channel(PRESENCE_EVENTS_BUFFER);
        Presence { inner: Arc::new(Inner { state: Mutex::new(State::default()), events, shared: None }) }
    }

    /// Presence shared with every node that uses `cache` under the same `name` (the system's
    /// id). Starts this node's writer and follower on the current tokio runtime; they stop once
    /// the presence is dropped.
    pub fn shared(cache: Arc<dyn CacheStore>, name: &str) -> Presence {
        Presence::shared_timed(cache, name, Timing { refresh: PRESENCE_REFRESH, ttl: PRESENCE_TTL, resync: PRESENCE_RESYNC })
    }

    fn shared_timed(cache: Arc<dyn CacheStore>, name: &str, timing: Timing) -> Presence {
        let (events, _) = broadcast::channel(PRESENCE_EVENTS_BUFFER);
        let (stop, stopped) = oneshot::channel();
        let shared = Shared {
            cache,
            prefix: format!("presence/{name}/"),
            node: Arc::from(format!("{:016x}", tributary_core::unique_u64())),
            timing,
            dirty: Mutex::new(HashSet::new()),
            announced: Mutex::new(HashSet::new()),
            writing: tokio::sync::Mutex::new(false),
            wake: Arc::new(Notify::new()),
            _stop: stop,
        };
        let presence = Presence { inner: Arc::new(Inner { state: Mutex::new(State::default()), events, shared: Some(shared) }) };
        tokio::spawn(write_shared(Arc::downgrade(&presence.inner)));
        tokio::spawn(follow_shared(Arc::downgrade(&presence.inner), stopped));
        presence
    }

    /// Whether counts are read from a cache shared by every node.
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Mark counts changed for the shared writer.
    fn changed(&self, user: &Arc<str>, scopes: &[Arc<str>]) {
        if let Some(shared) = &self.inner.shared {
            let mut dirty = shared.dirty.lock();
            dirty.insert(Counted::User(user.clone()));
            dirty.extend(scopes.iter().map(|scope| Counted::Scope(scope.clone(), user.clone())));
            drop(dirty);
            shared.wake.notify_one();
        }
    }

    /// Count one connection of `user` present in each of `scopes` (duplicates count once).
    pub fn join(&self, user: &str, scopes: &[String]) -> PresenceGuard {
        let user: Arc<str> = Arc::from(user);
        let mut unique: Vec<&String> = scopes.iter().collect();
        unique.sort();
        unique.dedup();
        let mut held = Vec::with_capacity(unique.len());
        let mut joined = Vec::new();
        {
            let mut guard = self.inner.state.lock();
            let state = &mut *guard;
            state.connections += 1;
            *state.users.entry(user.clone()).or_default() += 1;
            for scope in unique {
                let key: Arc<str> = match state.scopes.get_key_value(scope.as_str()) {
                    Some((key, _)) => key.clone(),
                    None => Arc::from(scope.as_str()),
                };
                let count = state.scopes.entry(key.clone()).or_default().entry(user.clone()).or_default();
                *count += 1;
                if *count == 1 && !state.elsewhere(&key, &user) {
                    joined.push(PresenceEvent { scope: key.clone(), user: user.clone(), event: PresenceChange::Join });
                }
                held.push(key);
            }
        }
        self.changed(&user, &held);
        self.inner.send(joined);
        PresenceGuard { presence: self.clone(), user, scopes: held }
    }

    fn leave(&self, user: &Arc<str>, scopes: &[Arc<str>]) {
        let mut left = Vec::new();
        {
            let mut guard = self.inner.state.lock();
            let state = &mut *guard;
            state.connections = state.connections.saturating_sub(1);
            if let Some(n) = state.users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    state.users.remove(user);
                }
            }
            for scope in scopes {
                let Some(members) = state.scopes.get_mut(scope) else { continue };
                let mut gone = false;
                if let Some(n) = members.get_mut(user) {
                    *n -= 1;
                    if *n == 0 {
                        members.remove(user);
                        gone = true;
                    }
                }
                if members.is_empty() {
                    state.scopes.remove(scope);
                }
                if gone && !state.elsewhere(scope, user) {
                    left.push(PresenceEvent { scope: scope.clone(), user: user.clone(), event: PresenceChange::Leave });
                }
            }
        }
        self.changed(user, scopes);
        self.inner.send(left);
    }

    /// The members of `scope` (sorted by user, at most `limit`, capped at
    /// [`PRESENCE_MEMBERS_PAGE_MAX`]) and its totals: on every node when shared.
    pub async fn members(&self, scope: &str, limit: usize) -> Result<ScopePresence, CacheError> {
        let counts: HashMap<String, u32> = match &self.inner.shared {
            Some(shared) => {
                // This node's own changes are read back.
                shared.flush(&self.inner.state).await?;
                shared.read(&shared.scope_key(scope)).await?
            }
            None => {
                let state = self.inner.state.lock();
                state.scopes.get(scope).map(|members| members.iter().map(|(user, n)| (user.to_string(), *n)).collect()).unwrap_or_default()
            }
        };
        let mut page: Vec<Member> = counts.iter().map(|(user, n)| Member { user: user.clone(), connections: *n }).collect();
        page.sort_by(|a, b| a.user.cmp(&b.user));
        page.truncate(limit.min(PRESENCE_MEMBERS_PAGE_MAX));
        Ok(ScopePresence { users: counts.len(), connections: counts.values().map(|n| u64::from(*n)).sum(), members: page })
    }

    /// Connections `user` holds, in all scopes together (0: offline): on every node when shared.
    pub async fn user_connections(&self, user: &str) -> Result<u32, CacheError> {
        match &self.inner.shared {
            Some(shared) => {
                shared.flush(&self.inner.state).await?;
                Ok(shared.read(&shared.user_key(user)).await?.values().sum())
            }
            None => Ok(self.inner.state.lock().users.get(user).copied().unwrap_or(0)),
        }
    }

    /// This node's connections and users.
    pub fn stats(&self) -> PresenceStats {
        let state = self.inner.state.lock();
        PresenceStats { users: state.users.len(), connections: state.connections, scopes: state.scopes.len() }
    }

    /// Join and leave events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceEvent> {
        self.inner.events.subscribe()
    }
}

/// The wall clock as a sorted-set score.
fn now_ms() -> f64 {
    tributary_core::now_ms() as f64
}

impl Shared {
    fn scope_key(&self, scope: &str) -> String {
        format!("{}s/{scope}", self.prefix)
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}u/{user}", self.prefix)
    }

    fn registry_key(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    fn held_key(&self, node: &str) -> String {
        format!("{}n/{node}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    fn member(&self, user: &str) -> String {
        format!("{}/{user}", self.node)
    }

    /// A score `timing.ttl` from now.
    fn deadline(&self) -> f64 {
        now_ms() + self.timing.ttl.as_millis() as f64
    }

    /// Publish this node's count of `user` under `key` (0 removes it), valid for the TTL.
    async fn write(&self, key: &str, user: &str, count: u32) -> Result<(), CacheError> {
        let (member, counts) = (self.member(user), format!("{key}/n"));
        if count == 0 {
            self.cache.zrem(key.as_bytes(), member.as_bytes()).await?;
            self.cache.hdel(counts.as_bytes(), member.as_bytes()).await?;
            return Ok(());
        }
        self.cache.hset(counts.as_bytes(), member.as_bytes(), Bytes::from(count.to_string())).await?;
        self.cache.zadd(key.as_bytes(), member.as_bytes(), self.deadline()).await?;
        self.cache.expire(counts.as_bytes(), self.timing.ttl).await?;
        self.cache.expire(key.as_bytes(), self.timing.ttl).await?;
        Ok(())
    }

    /// Register this node (or renew it) and the list of what it holds, for the TTL. A node
    /// found missing from the registry (its renewal came too late, and another node swept it
    /// out with its list) announces everything it holds again.
    async fn register(&self) -> Result<(), CacheError> {
        let registry = self.registry_key();
        if self.cache.zadd(registry.as_bytes(), self.node.as_bytes(), self.deadline()).await? {
            self.announced.lock().clear();
        }
        self.cache.expire(registry.as_bytes(), self.timing.ttl).await?;
        self.cache.expire(self.held_key(&self.node).as_bytes(), self.timing.ttl).await?;
        Ok(())
    }

    /// When this node starts or stops holding `user` in `scope`: update its list, then
    /// announce it.
    async fn announce(&self, scope: &Arc<str>, user: &Arc<str>, present: bool) -> Result<(), CacheError> {
        let pair = (scope.clone(), user.clone());
        if self.announced.lock().contains(&pair) == present {
            return Ok(());
        }
        let (held, field) = (self.held_key(&self.node), held_field(scope, user));
        if present {
            self.cache.hset(held.as_bytes(), &field, Bytes::from_static(b"1")).await?;
        } else {
            self.cache.hdel(held.as_bytes(), &field).await?;
        }
        let announcement = Announcement { node: self.node.to_string(), scope: scope.to_string(), user: user.to_string(), present };
        self.cache.publish(self.channel().as_bytes(), Bytes::from(serde_json::to_vec(&announcement).expect("an announcement serializes"))).await?;
        let mut announced = self.announced.lock();
        if present {
            announced.insert(pair);
        } else {
            announced.remove(&pair);
        }
        Ok(())
    }

    /// Write every changed count, and announce the pairs this node started or stopped holding
    /// (what failed stays marked, and the first error is returned). Flushes run one at a time
    /// and each writes the count as it is when written, so the last write of a count is never
    /// older than its last change.
    async fn flush(&self, state: &Mutex<State>) -> Result<(), CacheError> {
        let mut registered = self.writing.lock().await;
        if !*registered {
            self.register().await?;
            *registered = true;
        }
        let batch: Vec<Counted> = self.dirty.lock().drain().collect();
        let writes = batch.into_iter().map(|counted| {
            let (key, user, count) = {
                let state = state.lock();
                match &counted {
                    Counted::User(user) => (self.user_key(user), user.clone(), state.users.get(user).copied().unwrap_or(0)),
                    Counted::Scope(scope, user) => (self.scope_key(scope), user.clone(), state.local(scope, user)),
                }
            };
            async move {
                let written = match &counted {
                    Counted::User(_) => self.write(&key, &user, count).await,
                    Counted::Scope(scope, _) => match self.write(&key, &user, count).await {
                        Ok(()) => self.announce(scope, &user, count > 0).await,
                        Err(error) => Err(error),
                    },
                };
                written.map_err(|error| (counted, error))
            }
        });
        let results: Vec<_> = futures_util::stream::iter(writes).buffer_unordered(PRESENCE_WRITES_IN_FLIGHT).collect().await;
        let mut first = None;
        let mut dirty = self.dirty.lock();
        for (counted, error) in results.into_iter().filter_map(Result::err) {
            dirty.insert(counted);
            first.get_or_insert(error);
        }
        first.map_or(Ok(()), Err)
    }

    /// Connections per user under `key`, summed over the live members of every node; members
    /// whose node stopped renewing them are removed.
    async fn read(&self, key: &str) -> Result<HashMap<String, u32>, CacheError> {
        let now = now_ms();
        let counts_key = format!("{key}/n");
        let live = self.cache.zrange_by_score(key.as_bytes(), Bound::Included(now), Bound::Unbounded, Order::Asc, Limit::ALL).await?;
        let counts: HashMap<Bytes, Bytes> = self.cache.hgetall(counts_key.as_bytes()).await?.into_iter().collect();
        let mut users: HashMap<String, u32> = HashMap::new();
        for (member, _) in &live {
            let Some(user) = std::str::from_utf8(member).ok().and_then(|m| m.split_once('/')).map(|(_, user)| user) else { continue };
            let count = counts.get(member).and_then(|n| std::str::from_utf8(n).ok()).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
            if count > 0 {
                *users.entry(user.to_string()).or_default() += count;
            }
        }
        let expired = self.cache.zrange_by_score(key.as_bytes(), Bound::Unbounded, Bound::Excluded(now), Order::Asc, Limit::ALL).await?;
        for (member, _) in expired {
            self.cache.zrem(key.as_bytes(), &member).await?;
            self.cache.hdel(counts_key.as_bytes(), &member).await?;
        }
        Ok(users)
    }

    /// The other nodes whose registration is live; the expired ones are removed with their lists.
    async fn live_nodes(&self) -> Result<HashSet<Arc<str>>, CacheError> {
        let (registry, now) = (self.registry_key(), now_ms());
        let expired = self.cache.zrange_by_score(registry.as_bytes(), Bound::Unbounded, Bound::Excluded(now), Order::Asc, Limit::ALL).await?;
        for (node, _) in expired {
            self.cache.zrem(registry.as_bytes(), &node).await?;
            self.cache.del(self.held_key(&String::from_utf8_lossy(&node)).as_bytes()).await?;
        }
        let live = self.cache.zrange_by_score(registry.as_bytes(), Bound::Included(now), Bound::Unbounded, Order::Asc, Limit::ALL).await?;
        Ok(live.into_iter().map(|(node, _)| Arc::from(String::from_utf8_lossy(&node).as_ref())).filter(|node: &Arc<str>| *node != self.node).collect())
    }

    /// What every other live node holds, read from their lists: the events of what changed.
    async fn resync(&self, state: &Mutex<State>) -> Result<Vec<PresenceEvent>, CacheError> {
        let mut fresh = Remote::new();
        for node in self.live_nodes().await? {
            for (field, _) in self.cache.hgetall(self.held_key(&node).as_bytes()).await? {
                let Ok((scope, user)) = serde_json::from_slice::<(String, String)>(&field) else { continue };
                fresh.entry((Arc::from(scope), Arc::from(user))).or_default().insert(node.clone());
            }
        }
        Ok(state.lock().replace_remote(fresh))
    }

    /// Forget the nodes that died: the events of the users that were present only there.
    async fn sweep(&self, state: &Mutex<State>) -> Result<Vec<PresenceEvent>, CacheError> {
        let live = self.live_nodes().await?;
        let mut state = state.lock();
        if state.remote.values().flatten().all(|node| live.contains(node)) {
            return Ok(Vec::new());
        }
        let mut fresh = state.remote.clone();
        fresh.retain(|_, nodes| {
            nodes.retain(|node| live.contains(node));
            !nodes.is_empty()
        });
        Ok(state.replace_remote(fresh))
    }

    /// Apply one node's announcement (this node's own are skipped: it counts its own at once).
    fn apply(&self, state: &Mutex<State>, message: &[u8]) -> Option<PresenceEvent> {
        let announcement: Announcement = match serde_json::from_slice(message) {
            Ok(announcement) => announcement,
            Err(error) => {
                tracing::warn!(%error, "an unreadable presence announcement is skipped");
                return None;
            }
        };
        if *announcement.node == *self.node {
            return None;
        }
        state.lock().remote_change(Arc::from(announcement.node), Arc::from(announcement.scope), Arc::from(announcement.user), announcement.present)
    }
}

/// A (scope, user) pair as a field of a node's list.
fn held_field(scope: &str, user: &str) -> Vec<u8> {
    serde_json::to_vec(&(scope, user)).expect("two strings serialize")
}

/// A node's writer of shared presence: registers the node and renews it with every count each
/// refresh, writes changed counts as they come, and retries what failed; stops once the
/// presence is gone.
async fn write_shared(presence: Weak<Inner>) {
    let mut renewed: Option<tokio::time::Instant> = None;
    loop {
        let Some(inner) = presence.upgrade() else { return };
        let shared = inner.shared();
        let (wake, refresh) = (shared.wake.clone(), shared.timing.refresh);
        if renewed.is_none_or(|at| at.elapsed() >= refresh) {
            renewed = Some(tokio::time::Instant::now());
            *shared.writing.lock().await = false;
            let state = inner.state.lock();
            let mut dirty = shared.dirty.lock();
            dirty.extend(state.users.keys().map(|user| Counted::User(user.clone())));
            dirty.extend(state.scopes.iter().flat_map(|(scope, users)| users.keys().map(|user| Counted::Scope(scope.clone(), user.clone()))));
        }
        let retry = match shared.flush(&inner.state).await {
            Ok(()) => false,
            Err(error) => {
                tracing::warn!(%error, "writing presence to the shared cache failed; retrying");
                true
            }
        };
        drop(inner);
        let pause = match renewed {
            Some(at) if !retry => refresh.saturating_sub(at.elapsed()),
            _ => PRESENCE_RETRY,
        };
        tokio::select! {
            _ = wake.notified(), if !retry => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// A node's follower of shared presence: reads the other nodes' lists, then applies their
/// announcements as they come and sweeps out dead nodes each refresh; reads the lists again
/// after a gap and each resync period. Stops once the presence is gone.
async fn follow_shared(presence: Weak<Inner>, mut stopped: oneshot::Receiver<()>) {
    let Some((mut subscription, timing)) = (async {
        loop {
            let inner = presence.upgrade()?;
            let shared = inner.shared();
            match shared.cache.subscribe(shared.channel().as_bytes()).await {
                Ok(subscription) => return Some((subscription, shared.timing)),
                Err(error) => tracing::warn!(%error, "subscribing to presence announcements failed; retrying"),
            }
            drop(inner);
            tokio::time::sleep(PRESENCE_RETRY).await;
        }
    })
    .await
    else {
        return;
    };
    let mut sweeps = tokio::time::interval(timing.refresh);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync = true;
    let mut resynced = tokio::time::Instant::now();
    loop {
        if resync {
            let Some(inner) = presence.upgrade() else { return };
            let shared = inner.shared();
            match shared.resync(&inner.state).await {
                Ok(events) => {
                    inner.send(events);
                    resync = false;
                    resynced = tokio::time::Instant::now();
                }
                Err(error) => {
                    tracing::warn!(%error, "reading shared presence failed; retrying");
                    drop(inner);
                    tokio::time::sleep(PRESENCE_RETRY).await;
                    continue;
                }
            }
        }
        let next = tokio::select! {
            delivery = subscription.next() => Some(delivery),
            _ = sweeps.tick() => None,
            _ = &mut stopped => return,
        };
        let Some(inner) = presence.upgrade() else { return };
        let shared = inner.shared();
        let events = match next {
            Some(Some(Delivery::Message(message))) => shared.apply(&inner.state, &message).into_iter().collect(),
            Some(Some(Delivery::Gap)) => {
                resync = true;
                Vec::new()
            }
            Some(None) => {
                tracing::warn!("the presence announcements' subscription ended; this node hears no other node's joins and leaves");
                return;
            }
            // The lists are read again (which drops dead nodes too).
            None if resynced.elapsed() >= timing.resync => {
                resync = true;
                Vec::new()
            }
            None => shared.sweep(&inner.state).await.unwrap_or_else(|error| {
                tracing::warn!(%error, "looking for dead nodes in shared presence failed");
                Vec::new()
            }),
        };
        inner.send(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A read of local presence, which answers at once and cannot fail.
    fn local<T>(read: impl std::future::Future<Output = Result<T, CacheError>>) -> T {
        read.now_or_never().expect("local presence answers at once").expect("local presence cannot fail")
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_second_connection_of_a_user_counts_but_makes_no_event() {
        let presence = Presence::new();
        let mut events = presence.subscribe();
        let first = presence.join("alice", &scopes(&["news", "sport", "news"]));
        let second = presence.join("alice", &scopes(&["news"]));
        let bob = presence.join("bob", &scopes(&["news"]));
        let news = local(presence.members("news", 10));
        assert_eq!((news.users, news.connections), (2, 3));
        assert_eq!(news.members, vec![Member { user: "alice".into(), connections: 2 }, Member { user: "bob".into(), connections: 1 }]);
        assert_eq!(local(presence.user_connections("alice")), 2);
        let joins: Vec<(String, String)> = std::iter::from_fn(|| events.try_recv().ok()).map(|e| (e.scope.to_string(), e.user.to_string())).collect();
        assert_eq!(joins, vec![("news".into(), "alice".into()), ("sport".into(), "alice".into()), ("news".into(), "bob".into())]);

        drop(second);
        assert!(events.try_recv().is_err(), "alice still has a connection in news");
        drop(first);
        let left: Vec<PresenceEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert!(left.iter().all(|e| e.event == PresenceChange::Leave && &*e.user == "alice"));
        assert_eq!(left.len(), 2);
        assert_eq!(local(presence.members("sport", 10)).users, 0);
        assert_eq!(local(presence.user_connections("alice")), 0);
        drop(bob);
        assert_eq!(presence.stats(), PresenceStats { users: 0, connections: 0, scopes: 0 });
    }

    #[test]
    fn members_are_paged_by_the_limit() {
        let presence = Presence::new();
        let guards: Vec<_> = (0..5).map(|i| presence.join(&format!("u{i}"), &scopes(&["room"]))).collect();
        let page = local(presence.members("room", 2));
        assert_eq!(page.users, 5);
        assert_eq!(page.members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(), vec!["u0", "u1"]);
        drop(guards);
    }

    /// The next event a node's receiver hears, as (scope, user, change).
    async fn next(events: &mut broadcast::Receiver<PresenceEvent>) -> (String, String, PresenceChange) {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("an event within 10 s").expect("no event missed");
        (event.scope.to_string(), event.user.to_string(), event.event)
    }

    fn heard(user: &str, event: PresenceChange) -> (String, String, PresenceChange) {
        ("room".into(), user.into(), event)
    }

    /// Join and leave events across three nodes on one `cache`: the first connection anywhere
    /// is one join on every node, the last one gone from every node is one leave, and a node
    /// that dies without a word leaves once its registration expires.
    async fn events_are_global(cache: Arc<dyn CacheStore>) {
        use PresenceChange::{Join, Leave};
        let timing = Timing { refresh: Duration::from_millis(100), ttl: Duration::from_millis(500), resync: Duration::from_millis(300) };
        let (a, b) = (Presence::shared_timed(cache.clone(), "sys", timing), Presence::shared_timed(cache.clone(), "sys", timing));
        let (mut on_a, mut on_b) = (a.subscribe(), b.subscribe());
        let room = scopes(&["room"]);

        let alice_a = a.join("alice", &room);
        assert_eq!(next(&mut on_a).await, heard("alice", Join));
        assert_eq!(next(&mut on_b).await, heard("alice", Join));

        // Alice's second connection, on b, makes no event anywhere: the next thing both hear is
        // a marker joined after it (a read writes the node's changes, announcements included).
        let alice_b = b.join("alice", &room);
        b.members("room", 1).await.unwrap();
        let marker = b.join("marker-1", &room);
        assert_eq!(next(&mut on_a).await, heard("marker-1", Join));
        assert_eq!(next(&mut on_b).await, heard("marker-1", Join));

        // Her connection on a goes: she is still on b, so no leave.
        drop(alice_a);
        a.members("room", 1).await.unwrap();
        let marker_a = a.join("marker-2", &room);
        assert_eq!(next(&mut on_a).await, heard("marker-2", Join));
        assert_eq!(next(&mut on_b).await, heard("marker-2", Join));

        // Her last connection goes: one leave on each node.
        drop(alice_b);
        assert_eq!(next(&mut on_b).await, heard("alice", Leave));
        assert_eq!(next(&mut on_a).await, heard("alice", Leave));
        drop((marker, marker_a));
        for events in [&mut on_a, &mut on_b] {
            let mut left = vec![next(events).await, next(events).await];
            left.sort_by(|x, y| x.1.cmp(&y.1));
            assert_eq!(left, vec![heard("marker-1", Leave), heard("marker-2", Leave)]);
        }

        // A third node on a runtime of its own holds dave, then its runtime is dropped (its
        // writer and follower are gone, as in a killed process): the other nodes hear dave
        // leave once its registration expires.
        let cache_c = cache.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let c = Presence::shared_timed(cache_c, "sys", timing);
                let dave = c.join("dave", &scopes(&["room"]));
                c.members("room", 1).await.unwrap();
                std::mem::forget(dave);
                std::mem::forget(c);
            });
        })
        .join()
        .unwrap();
        for events in [&mut on_a, &mut on_b] {
            assert_eq!(next(events).await, heard("dave", Join));
        }
        let died = std::time::Instant::now();
        for events in [&mut on_a, &mut on_b] {
            assert_eq!(next(events).await, heard("dave", Leave));
        }
        assert!(died.elapsed() < Duration::from_secs(5), "dave left {:?} after his node died", died.elapsed());
        assert_eq!(a.members("room", 10).await.unwrap().users, 0);

        // A node lists erin but its announcement never came (lost without a gap): the periodic
        // read of the lists finds her, and the node's registration running out takes her away.
        let (registry, list) = ("presence/sys/nodes", "presence/sys/n/silent-node");
        let lasts = Duration::from_millis(1_500);
        cache.hset(list.as_bytes(), &held_field("room", "erin"), Bytes::from_static(b"1")).await.unwrap();
        cache.expire(list.as_bytes(), lasts).await.unwrap();
        cache.zadd(registry.as_bytes(), b"silent-node", now_ms() + lasts.as_millis() as f64).await.unwrap();
        for events in [&mut on_a, &mut on_b] {
            assert_eq!(next(events).await, heard("erin", Join));
        }
        for events in [&mut on_a, &mut on_b] {
            assert_eq!(next(events).await, heard("erin", Leave));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_global_on_a_shared_embedded_cache() {
        events_are_global(Arc::new(tributary_engine::cache::Cache::default())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_global_on_redis() {
        events_are_global(Arc::new(redis_cache().await)).await;
    }

    /// A cache on the machine's Redis (127.0.0.1:6379, or `TRIBUTARY_TEST_REDIS_URL`), under a
    /// namespace of its own.
    async fn redis_cache() -> tributary_redis::RedisCache {
        let url = std::env::var("TRIBUTARY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let namespace = format!("t-presence-{}-{}", tributary_core::unique_u64(), now_ms() as u64);
        tributary_redis::RedisCache::connect(&url, &namespace).await.expect("Redis on 127.0.0.1:6379 (.ci/services starts it)")
    }

    /// Two nodes' presence on the machine's Redis (127.0.0.1:6379, or `TRIBUTARY_TEST_REDIS_URL`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_presence_counts_every_node_and_not_a_dead_one() {
        let cache: Arc<dyn CacheStore> = Arc::new(redis_cache().await);
        let (a, b) = (Presence::shared(cache.clone(), "sys"), Presence::shared(cache.clone(), "sys"));
        assert!(a.is_shared());
        let alice_a = a.join("alice", &scopes(&["room"]));
        let alice_b = b.join("alice", &scopes(&["room", "lobby"]));
        let bob_b = b.join("bob", &scopes(&["room"]));
        // A read writes the reading node's own changes first; the other node's writer runs on
        // its own, so wait for it with a read through that node.
        b.members("room", 10).await.unwrap();
        let room = a.members("room", 10).await.unwrap();
        assert_eq!((room.users, room.connections), (2, 3));
        assert_eq!(room.members, vec![Member { user: "alice".into(), connections: 2 }, Member { user: "bob".into(), connections: 1 }]);
        assert_eq!(a.user_connections("alice").await.unwrap(), 2);
        assert_eq!(a.members("lobby", 10).await.unwrap().users, 1);
        assert_eq!(a.stats().connections, 1, "stats are the node's own");

        drop(bob_b);
        b.user_connections("bob").await.unwrap();
        assert_eq!(a.user_connections("bob").await.unwrap(), 0);
        assert_eq!(a.members("room", 10).await.unwrap().users, 1);

        // A member whose node stopped renewing it (the node died) no longer counts, and the
        // read removes it.
        let (key, counts) = (b"presence/sys/s/room".as_slice(), b"presence/sys/s/room/n".as_slice());
        cache.zadd(key, b"deadnode/carol", now_ms() - 1.0).await.unwrap();
        cache.hset(counts, b"deadnode/carol", Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(a.members("room", 10).await.unwrap().members, vec![Member { user: "alice".into(), connections: 2 }]);
        assert_eq!(cache.zscore(key, b"deadnode/carol").await.unwrap(), None);
        assert_eq!(cache.hget(counts, b"deadnode/carol").await.unwrap(), None);

        drop(alice_a);
        drop(alice_b);
        a.members("room", 1).await.unwrap();
        assert_eq!(b.members("room", 10).await.unwrap().users, 0);
        assert_eq!(b.user_connections("alice").await.unwrap(), 0);
    }
}
