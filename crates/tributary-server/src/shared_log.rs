//! A log every node appends to (the stream interface on NATS JetStream), as systems with
//! synchronous fan-out code use it: [`SharedLog`] calls a [`StreamStore`] and waits for the
//! answer, and [`follow`] runs a node's one reader of the log on a thread of its own.
//!
//! The pattern: a publish only appends; each node's follower reads the log in offset order and
//! fans out to the node's own connections, raising a watermark; the publish is answered once its
//! node's watermark has passed its offsets. One reader per node, however many publishers: they
//! wait for the follower rather than read the log themselves.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tributary_core::{Record, StoredRecord};
use tributary_engine::StreamError;
use tributary_engine::stream::{Produced, StreamStore, TopicConfig};

/// How often a follower looks for new records when it found none.
pub const FOLLOW_IDLE_POLL: Duration = Duration::from_millis(5);
/// How long a follower waits before it tries again after a failed read.
pub const FOLLOW_RETRY: Duration = Duration::from_millis(250);

/// A stream interface called from synchronous code: a blocking-pool thread, a follower's thread,
/// or an async worker of the multi-thread runtime (handed over meanwhile, so a current-thread
/// runtime would panic).
#[derive(Clone)]
pub struct SharedLog {
    streams: Arc<dyn StreamStore>,
    runtime: tokio::runtime::Handle,
}

impl SharedLog {
    /// On the runtime this is called from.
    pub fn current(streams: Arc<dyn StreamStore>) -> SharedLog {
        SharedLog { streams, runtime: tokio::runtime::Handle::current() }
    }

    /// Wait for `call` on the log's runtime.
    pub fn wait<T>(&self, call: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(call))
    }

    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<(), StreamError> {
        self.wait(self.streams.create_topic(name, config))
    }

    pub fn partitions(&self, topic: &str) -> Result<u32, StreamError> {
        self.wait(self.streams.partitions(topic))
    }

    pub fn produce(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Produced>, StreamError> {
        self.wait(self.streams.produce(topic, records))
    }

    pub fn fetch(&self, topic: &str, partition: u32, offset: u64, max_records: usize) -> Result<Vec<StoredRecord>, StreamError> {
        self.wait(self.streams.fetch(topic, partition, offset, max_records))
    }

    /// The first offset the partition holds and its end.
    pub fn offsets(&self, topic: &str, partition: u32) -> Result<(u64, u64), StreamError> {
        self.wait(self.streams.offsets(topic, partition))
    }
}

/// Run a node's reader of a shared log on a thread named `name`: `step` reads what is new and
/// fans it out, returning whether it found anything. It runs again at once after a find, after
/// [`FOLLOW_IDLE_POLL`] otherwise, and after [`FOLLOW_RETRY`] when it failed (logged). It stops
/// when `stopping` is set or its owner is gone; the owner is held only during a step.
pub fn follow<T, F>(name: &str, owner: Weak<T>, stopping: Arc<AtomicBool>, mut step: F) -> std::io::Result<()>
where
    T: Send + Sync + 'static,
    F: FnMut(&T) -> Result<bool, StreamError> + Send + 'static,
{
    let thread = name.to_string();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        while !stopping.load(Ordering::Acquire) {
            let Some(owner) = owner.upgrade() else { return };
            let pause = match step(&owner) {
                Ok(true) => None,
                Ok(false) => Some(FOLLOW_IDLE_POLL),
                Err(error) => {
                    tracing::warn!(%error, thread, "reading a shared log failed; retrying");
                    Some(FOLLOW_RETRY)
                }
            };
            drop(owner);
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            }
        }
    })?;
    Ok(())
}
