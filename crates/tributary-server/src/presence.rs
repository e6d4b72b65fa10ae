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
//! What is not here: persistence (presence is the state of this process's connections, gone on
//! restart by definition), presence across several nodes, and any wire format.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

/// Presence events buffered for receivers before a slow one is told it lagged.
pub const PRESENCE_EVENTS_BUFFER: usize = 4096;
/// Most members one [`Presence::members`] call returns.
pub const PRESENCE_MEMBERS_PAGE_MAX: usize = 10_000;

/// Who is present, per scope and in all.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<PresenceEvent>,
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
    pub fn new() -> Presence {
        let (events, _) = broadcast::channel(PRESENCE_EVENTS_BUFFER);
        Presence { inner: Arc::new(Inner { state: Mutex::new(State::default()), events }) }
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
        for scope in left {
            let _ = self.inner.events.send(PresenceEvent { scope, user: user.clone(), event: PresenceChange::Leave });
        }
    }

    /// The members of `scope` (sorted by user, at most `limit`, capped at
    /// [`PRESENCE_MEMBERS_PAGE_MAX`]) and its totals.
    pub fn members(&self, scope: &str, limit: usize) -> ScopePresence {
        let state = self.inner.state.lock();
        let Some(members) = state.scopes.get(scope) else {
            return ScopePresence { users: 0, connections: 0, members: Vec::new() };
        };
        let mut page: Vec<Member> = members.iter().map(|(user, n)| Member { user: user.to_string(), connections: *n }).collect();
        page.sort_by(|a, b| a.user.cmp(&b.user));
        page.truncate(limit.min(PRESENCE_MEMBERS_PAGE_MAX));
        ScopePresence { users: members.len(), connections: members.values().map(|n| u64::from(*n)).sum(), members: page }
    }

    /// Connections `user` holds, in all scopes together (0: offline).
    pub fn user_connections(&self, user: &str) -> u32 {
        self.inner.state.lock().users.get(user).copied().unwrap_or(0)
    }

    pub fn stats(&self) -> PresenceStats {
        let state = self.inner.state.lock();
        PresenceStats { users: state.users.len(), connections: state.connections, scopes: state.scopes.len() }
    }

    /// Join and leave events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceEvent> {
        self.inner.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let news = presence.members("news", 10);
        assert_eq!((news.users, news.connections), (2, 3));
        assert_eq!(news.members, vec![Member { user: "alice".into(), connections: 2 }, Member { user: "bob".into(), connections: 1 }]);
        assert_eq!(presence.user_connections("alice"), 2);
        let joins: Vec<(String, String)> = std::iter::from_fn(|| events.try_recv().ok()).map(|e| (e.scope.to_string(), e.user.to_string())).collect();
        assert_eq!(joins, vec![("news".into(), "alice".into()), ("sport".into(), "alice".into()), ("news".into(), "bob".into())]);

        drop(second);
        assert!(events.try_recv().is_err(), "alice still has a connection in news");
        drop(first);
        let left: Vec<PresenceEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert!(left.iter().all(|e| e.event == PresenceChange::Leave && &*e.user == "alice"));
        assert_eq!(left.len(), 2);
        assert_eq!(presence.members("sport", 10).users, 0);
        assert_eq!(presence.user_connections("alice"), 0);
        drop(bob);
        assert_eq!(presence.stats(), PresenceStats { users: 0, connections: 0, scopes: 0 });
    }

    #[test]
    fn members_are_paged_by_the_limit() {
        let presence = Presence::new();
        let guards: Vec<_> = (0..5).map(|i| presence.join(&format!("u{i}"), &scopes(&["room"]))).collect();
        let page = presence.members("room", 2);
        assert_eq!(page.users, 5);
        assert_eq!(page.members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(), vec!["u0", "u1"]);
        drop(guards);
    }
}
