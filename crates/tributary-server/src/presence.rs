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
//! when they expire, and a hash of their connection counts. A background task writes each change
//! (the count as it is when written, so writes are idempotent) and renews
//! every member each [`PRESENCE_REFRESH`]; a member not renewed for [`PRESENCE_TTL`] (its node
//! died) is no longer counted and is removed by the next read. [`Presence::members`] and
//! [`Presence::user_connections`] then read the cache (after writing this node's pending
//! changes, so a node reads its own joins back), and every node answers for all. Events and
//! [`Presence::stats`] stay this node's own.
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
use serde::Serialize;
use tokio::sync::{Notify, broadcast};
use tributary_engine::cache::{CacheError, CacheStore, Limit, Order};

/// Presence events buffered for receivers before a slow one is told it lagged.
pub const PRESENCE_EVENTS_BUFFER: usize = 4096;
/// Most members one [`Presence::members`] call returns.
pub const PRESENCE_MEMBERS_PAGE_MAX: usize = 10_000;
/// How often a node renews its members in a shared cache.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(10);
/// How long a member in a shared cache counts without being renewed (its node stopped).
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// Counts the writer sends to the shared cache at once.
pub const PRESENCE_WRITES_IN_FLIGHT: usize = 64;
/// How long the writer waits before it tries again after the shared cache failed.
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

/// This node's part of a presence shared through a cache.
struct Shared {
    cache: Arc<dyn CacheStore>,
    /// `presence/<name>/`: keys are `<prefix>s/<scope>` and `<prefix>u/<user>` (sorted sets),
    /// each with its counts in the hash `<key>/n`.
    prefix: String,
    node: String,
    /// Counts changed since the last write.
    dirty: Mutex<HashSet<Counted>>,
    /// Held by a flush.
    writing: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
}

/// A count this node publishes: one user's connections in one scope, or in all.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Counted {
    Scope(Arc<str>, Arc<str>),
    User(Arc<str>),
}

#[derive(Default)]
struct State {
    /// scope → user → connections.
    scopes: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    /// user → connections, whatever their scopes.
    users: HashMap<Arc<str>, u32>,
    connections: usize,
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
    /// id). Starts this node's writer on the current tokio runtime; it stops once the presence
    /// is dropped.
    pub fn shared(cache: Arc<dyn CacheStore>, name: &str) -> Presence {
        let (events, _) = broadcast::channel(PRESENCE_EVENTS_BUFFER);
        let node = format!("{:016x}", tributary_core::unique_u64());
        let shared = Shared { cache, prefix: format!("presence/{name}/"), node, dirty: Mutex::new(HashSet::new()), writing: tokio::sync::Mutex::new(()), wake: Arc::new(Notify::new()) };
        let presence = Presence { inner: Arc::new(Inner { state: Mutex::new(State::default()), events, shared: Some(shared) }) };
        tokio::spawn(write_shared(Arc::downgrade(&presence.inner)));
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
            let mut state = self.inner.state.lock();
            state.connections += 1;
            *state.users.entry(user.clone()).or_default() += 1;
            for scope in unique {
                let key: Arc<str> = match state.scopes.get_key_value(scope.as_str()) {
                    Some((key, _)) => key.clone(),
                    None => Arc::from(scope.as_str()),
                };
                let members = state.scopes.entry(key.clone()).or_default();
                let count = members.entry(user.clone()).or_default();
                *count += 1;
                if *count == 1 {
                    joined.push(key.clone());
                }
                held.push(key);
            }
        }
        self.changed(&user, &held);
        for scope in joined {
            let _ = self.inner.events.send(PresenceEvent { scope, user: user.clone(), event: PresenceChange::Join });
        }
        PresenceGuard { presence: self.clone(), user, scopes: held }
    }

    fn leave(&self, user: &Arc<str>, scopes: &[Arc<str>]) {
        let mut left = Vec::new();
        {
            let mut state = self.inner.state.lock();
            state.connections = state.connections.saturating_sub(1);
            if let Some(n) = state.users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    state.users.remove(user);
                }
            }
            for scope in scopes {
                let Some(members) = state.scopes.get_mut(scope) else { continue };
                if let Some(n) = members.get_mut(user) {
                    *n -= 1;
                    if *n == 0 {
                        members.remove(user);
                        left.push(scope.clone());
                    }
                }
                if members.is_empty() {
                    state.scopes.remove(scope);
                }
            }
        }
        self.changed(user, scopes);
        for scope in left {
            let _ = self.inner.events.send(PresenceEvent { scope, user: user.clone(), event: PresenceChange::Leave });
        }
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

    fn member(&self, user: &str) -> String {
        format!("{}/{user}", self.node)
    }

    /// Publish this node's count of `user` under `key` (0 removes it), valid for PRESENCE_TTL.
    async fn write(&self, key: &str, user: &str, count: u32) -> Result<(), CacheError> {
        let (member, counts) = (self.member(user), format!("{key}/n"));
        if count == 0 {
            self.cache.zrem(key.as_bytes(), member.as_bytes()).await?;
            self.cache.hdel(counts.as_bytes(), member.as_bytes()).await?;
            return Ok(());
        }
        self.cache.hset(counts.as_bytes(), member.as_bytes(), Bytes::from(count.to_string())).await?;
        self.cache.zadd(key.as_bytes(), member.as_bytes(), now_ms() + PRESENCE_TTL.as_millis() as f64).await?;
        self.cache.expire(counts.as_bytes(), PRESENCE_TTL).await?;
        self.cache.expire(key.as_bytes(), PRESENCE_TTL).await?;
        Ok(())
    }

    /// Write every changed count (what failed stays marked, and the first error is returned).
    /// Flushes run one at a time and each writes the count as it is when written, so the last
    /// write of a count is never older than its last change.
    async fn flush(&self, state: &Mutex<State>) -> Result<(), CacheError> {
        let _one_at_a_time = self.writing.lock().await;
        let batch: Vec<Counted> = self.dirty.lock().drain().collect();
        let writes = batch.into_iter().map(|counted| {
            let (key, user, count) = {
                let state = state.lock();
                match &counted {
                    Counted::User(user) => (self.user_key(user), user.clone(), state.users.get(user).copied().unwrap_or(0)),
                    Counted::Scope(scope, user) => (self.scope_key(scope), user.clone(), state.scopes.get(scope).and_then(|users| users.get(user)).copied().unwrap_or(0)),
                }
            };
            async move { self.write(&key, &user, count).await.map_err(|error| (counted, error)) }
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
}

/// A node's writer of shared presence: writes changed counts as they come, renews every count
/// each PRESENCE_REFRESH, and retries what failed; stops once the presence is gone.
async fn write_shared(presence: Weak<Inner>) {
    let mut renewed = tokio::time::Instant::now();
    loop {
        let Some(inner) = presence.upgrade() else { return };
        let shared = inner.shared.as_ref().expect("the writer runs for shared presence");
        let wake = shared.wake.clone();
        if renewed.elapsed() >= PRESENCE_REFRESH {
            renewed = tokio::time::Instant::now();
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
        let pause = if retry { PRESENCE_RETRY } else { PRESENCE_REFRESH.saturating_sub(renewed.elapsed()) };
        tokio::select! {
            _ = wake.notified(), if !retry => {}
            _ = tokio::time::sleep(pause) => {}
        }
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

    /// Two nodes' presence on the machine's Redis (127.0.0.1:6379, or `TRIBUTARY_TEST_REDIS_URL`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_presence_counts_every_node_and_not_a_dead_one() {
        let url = std::env::var("TRIBUTARY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let namespace = format!("t-presence-{}-{}", std::process::id(), now_ms() as u64);
        let cache = tributary_redis::RedisCache::connect(&url, &namespace).await.expect("Redis on 127.0.0.1:6379 (.ci/services starts it)");
        let cache: Arc<dyn CacheStore> = Arc::new(cache);
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
