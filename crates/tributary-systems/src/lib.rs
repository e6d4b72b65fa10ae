//! The streaming systems, one folder each, all of the same shape:
//!
//! ```text
//! <system>/mod.rs       what it does, an ASCII topology, its delivery guarantee, what it does not do
//! <system>/topology.rs  its components and connections, as data (checked against the seed's tiers)
//! <system>/api.rs       a thin router: HTTP JSON, WebSocket and SSE through the gateway
//! <system>/process.rs   the domain logic, as free of IO as the system allows
//! <system>/scenario.rs  its load shape and its targets from the seed
//! <system>/tests.rs     feature tests through the public HTTP API
//! ```
//!
//! [`entries`] lists every implemented system explicitly (no registration macros): adding a
//! system is a folder and a line there. No system imports another; what two systems share moves
//! down into the runtime, the engine or the server.

pub mod basic_message_queue;
pub mod email_queue_system;
pub mod notification_fanout;
pub mod realtime_chat_messages;
pub mod realtime_notifications;
pub mod simple_pubsub;
pub mod stock_price_updates;

#[cfg(test)]
mod test_support;

use std::sync::Arc;

use tributary_engine::Engine;
use tributary_engine::cache::CacheStore;
use tributary_engine::queue::QueueStore;
use tributary_engine::stream::StreamStore;
use tributary_runtime::{SystemMetrics, Topology};
use tributary_server::{Gateway, SystemApi};
use tributary_sql::Db;

/// What a running system gets from the platform.
#[derive(Clone)]
pub struct Context {
    /// The embedded engine in the node's data folder.
    pub engine: Arc<Engine>,
    pub gateway: Gateway,
    /// The queue interface: the engine's own queues, or a distributed backend's (NATS
    /// JetStream) shared by every node. Systems marked [`Entry::distributed`] use it and keep no
    /// state in the node.
    pub queues: Arc<dyn QueueStore>,
    /// The stream interface: the engine's own topics, or a distributed backend's (NATS
    /// JetStream), whose log every node appends to.
    pub streams: Arc<dyn StreamStore>,
    /// A cache every node shares (Redis), when the node runs with one (`--cache`). Without it,
    /// what systems keep of their live connections (presence) is this node's alone.
    pub shared_cache: Option<Arc<dyn CacheStore>>,
    /// The database (`db_primary` / `db_replica`) the node was given: PostgreSQL shared by
    /// every node (`--db`), or the embedded SQLite file. None: [`Context::db`] opens the SQLite
    /// file in the engine's folder.
    pub db: Option<Db>,
}

impl Context {
    /// Every interface on the embedded engine.
    pub fn embedded(engine: Arc<Engine>, gateway: Gateway) -> Context {
        let queues: Arc<dyn QueueStore> = engine.queues.clone();
        let streams: Arc<dyn StreamStore> = engine.topics.clone();
        Context { engine, gateway, queues, streams, shared_cache: None, db: None }
    }

    /// The database: the node's, else the SQLite file in the engine's folder. Called from a
    /// system's start, on a worker of the multi-thread runtime.
    pub fn db(&self) -> anyhow::Result<Db> {
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        let dir = self.engine.dir().to_path_buf();
        let opened = tributary_server::wait_in_place(false, Db::embedded(&dir)).ok_or_else(|| anyhow::anyhow!("opening the database needs a multi-thread tokio runtime"))?;
        Ok(opened?)
    }

    /// Rate limits for the system `name`: shared by every node through the shared cache when
    /// there is one (a rate then holds for the deployment), else this node's own.
    pub fn rate_limits(&self, name: &str) -> tributary_server::RateLimits {
        match &self.shared_cache {
            Some(cache) => tributary_server::RateLimits::shared(cache.clone(), name),
            None => tributary_server::RateLimits::local(),
        }
    }

    /// Presence for the system `name`: shared by every node through the shared cache when there
    /// is one, else this node's own.
    pub fn presence(&self, name: &str) -> tributary_server::Presence {
        match &self.shared_cache {
            Some(cache) => tributary_server::Presence::shared(cache.clone(), name),
            None => tributary_server::Presence::new(),
        }
    }
}

/// A running system.
pub trait System: Send + Sync + 'static {
    fn id(&self) -> &'static str;
    /// Its routes, mounted by the front door.
    fn api(self: Arc<Self>) -> SystemApi;
    /// Its live counters and latencies.
    fn metrics(&self) -> &SystemMetrics;
    /// Figures of its own for the dashboard (queue depth, lag, subscriptions, ...).
    fn status(&self) -> serde_json::Value;
    /// Ask background work to stop before the engine closes.
    fn shutdown(&self) {}
    /// Resolves once the background work asked to stop by [`System::shutdown`] has finished and
    /// let go of its engine handles (the platform closes the engine, and may reopen its folder,
    /// after this).
    fn stopped(&self) -> tributary_engine::BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// One implemented system: its id (as in the catalogue), its declared topology, how to start
/// it, and whether it runs on the distributed backends.
pub struct Entry {
    pub id: &'static str,
    pub topology: fn() -> Topology,
    pub start: fn(&Context) -> anyhow::Result<Arc<dyn System>>,
    /// True when all its state goes through the [`Context`]'s interfaces (no embedded engine of
    /// its own): with distributed backends, several nodes can serve it behind a balancer.
    pub distributed: bool,
    /// True when it keeps state in the db component: on the distributed backends it starts only
    /// with a database every node shares (`--db postgres://…`).
    pub needs_db: bool,
}

/// Every implemented system, in seed order.
pub fn entries() -> Vec<Entry> {
    vec![
        Entry { id: basic_message_queue::ID, topology: basic_message_queue::topology::declared, start: basic_message_queue::start, distributed: true, needs_db: false },
        Entry { id: realtime_notifications::ID, topology: realtime_notifications::topology::declared, start: realtime_notifications::start, distributed: true, needs_db: false },
        Entry { id: simple_pubsub::ID, topology: simple_pubsub::topology::declared, start: simple_pubsub::start, distributed: true, needs_db: false },
        Entry { id: realtime_chat_messages::ID, topology: realtime_chat_messages::topology::declared, start: realtime_chat_messages::start, distributed: true, needs_db: false },
        Entry { id: email_queue_system::ID, topology: email_queue_system::topology::declared, start: email_queue_system::start, distributed: true, needs_db: true },
        Entry { id: stock_price_updates::ID, topology: stock_price_updates::topology::declared, start: stock_price_updates::start, distributed: true, needs_db: false },
        Entry { id: notification_fanout::ID, topology: notification_fanout::topology::declared, start: notification_fanout::start, distributed: true, needs_db: true },
    ]
}

#[cfg(test)]
mod tests {
    use tributary_runtime::{Catalogue, check};

    use super::*;

    #[test]
    fn every_declared_topology_is_valid_and_passes_its_seed_tiers() {
        for entry in entries() {
            let system = Catalogue::get().system(entry.id).unwrap_or_else(|| panic!("{} is not in the catalogue", entry.id));
            let topology = (entry.topology)();
            topology.validate().unwrap();
            let report = check(&topology, system);
            assert!(report.holds, "{report}");
        }
    }
}
