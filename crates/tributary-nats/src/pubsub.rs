//! Tributary's pub/sub interface ([`PubSubStore`]) on core NATS: every node publishes to and
//! subscribes on the same NATS, so a message published on one node reaches the subscribers of
//! all of them.
//!
//! | Tributary | core NATS |
//! |---|---|
//! | subject `a.b` | subject `tribps.<namespace>.a.b` |
//! | pattern `a.*.c`, `a.>` | the same wildcards under the prefix (NATS has the same syntax) |
//! | MQTT filter `a/#` (also matches `a`) | two subscriptions, `…a.>` and `…a`, merged |
//! | a group | a queue group of that name: each message goes to one member |
//! | the publisher's log offset | the header `Tributary-Offset` |
//!
//! Each subscription has a task that moves messages from the NATS connection into a buffer of
//! `buffer_messages`, applying the slow-consumer policy there: `DropOldest` evicts the oldest,
//! `Disconnect` closes the subscription with `SlowConsumer`. `Block` (it would have to slow a
//! publisher on another node) and `CatchUp` (it needs a log to catch up from) are refused with
//! [`PubSubError::Unsupported`].
//!
//! Core NATS is at-most-once, like the embedded broker: a publish is handed to the connection and
//! returns; nothing is kept for a subscriber that is not there. A lost connection ends every
//! subscription of it with [`DisconnectReason::Backend`] once the client gives up reconnecting.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tributary_core::limits::{SUBSCRIBER_BUFFER_MESSAGES_MAX, check_name};
use tributary_core::{Subject, SubjectPattern};
use tributary_engine::BoxFuture;
use tributary_engine::pubsub::{Delivery, DisconnectReason, PubSubError, PubSubFuture, PubSubStore, RecvError, SlowConsumerPolicy, Subscribed, SubscriberOptions};

const BACKEND: &str = "nats";
const OFFSET_HEADER: &str = "Tributary-Offset";

fn backend(message: impl std::fmt::Display) -> PubSubError {
    PubSubError::Backend { backend: BACKEND, message: message.to_string() }
}

/// Pub/sub on core NATS. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct NatsPubSub {
    client: async_nats::Client,
    prefix: String,
}

impl std::fmt::Debug for NatsPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPubSub").field("prefix", &self.prefix).finish()
    }
}

impl NatsPubSub {
    /// Connects to `url`; subjects live under `tribps.<namespace>` (`A-Z a-z 0-9 -`).
    pub async fn connect(url: &str, namespace: &str) -> Result<NatsPubSub, PubSubError> {
        crate::check_namespace(namespace).map_err(backend)?;
        let client = crate::connect_client(url).await.map_err(backend)?;
        Ok(NatsPubSub { client, prefix: format!("tribps.{namespace}.") })
    }
}

/// How long subscribe waits for the server to confirm the subscription.
const SUBSCRIBE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

impl NatsPubSub {
    /// Returns once the server has processed everything this connection sent before: a message
    /// to a fresh inbox of its own comes back. (`flush` only empties the socket buffer.) After
    /// it, a subscription is registered, so a publish from any node reaches it.
    async fn barrier(&self) -> Result<(), PubSubError> {
        let inbox = self.client.new_inbox();
        let mut echo = self.client.subscribe(inbox.clone()).await.map_err(backend)?;
        self.client.publish(inbox, Bytes::new()).await.map_err(backend)?;
        match tokio::time::timeout(SUBSCRIBE_CONFIRM_TIMEOUT, echo.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(backend("the connection closed while subscribing")),
            Err(_) => Err(backend(format!("the server did not confirm the subscription within {SUBSCRIBE_CONFIRM_TIMEOUT:?}"))),
        }
    }
}

/// What a subscription's task and its owner share.
struct Buffer {
    messages: VecDeque<Delivery<Bytes>>,
    closed: Option<DisconnectReason>,
}

struct NatsSubscription {
    shared: Arc<(Mutex<Buffer>, tokio::sync::Notify)>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        // Dropping the NATS subscriber with the task unsubscribes.
        self.pump.abort();
    }
}

impl Subscribed for NatsSubscription {
    fn recv(&mut self, timeout: Duration) -> BoxFuture<'_, Result<Delivery<Bytes>, RecvError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let (buffer, ready) = &*self.shared;
            loop {
                let notified = ready.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut buffer = buffer.lock();
                    if let Some(delivery) = buffer.messages.pop_front() {
                        return Ok(delivery);
                    }
                    if let Some(reason) = buffer.closed {
                        return Err(RecvError::Disconnected { reason });
                    }
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(RecvError::Timeout);
                }
            }
        })
    }
}

impl PubSubStore for NatsPubSub {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn publish<'a>(&'a self, subject: &'a Subject, offset: u64, payload: Bytes) -> PubSubFuture<'a, ()> {
        Box::pin(async move {
            let mut headers = HeaderMap::new();
            headers.insert(OFFSET_HEADER, offset.to_string().as_str());
            self.client.publish_with_headers(format!("{}{}", self.prefix, subject.as_str()), headers, payload).await.map_err(backend)
        })
    }

    fn subscribe<'a>(&'a self, pattern: &'a SubjectPattern, options: SubscriberOptions) -> PubSubFuture<'a, Box<dyn Subscribed>> {
        Box::pin(async move {
            if options.buffer_messages == 0 || options.buffer_messages > SUBSCRIBER_BUFFER_MESSAGES_MAX {
                return Err(PubSubError::BufferSize { requested: options.buffer_messages, max: SUBSCRIBER_BUFFER_MESSAGES_MAX });
            }
            if let Some(name) = &options.group {
                check_name("subscriber group", name).map_err(PubSubError::GroupName)?;
            }
            if matches!(options.policy, SlowConsumerPolicy::Block { .. } | SlowConsumerPolicy::CatchUp) {
                return Err(PubSubError::Unsupported { backend: BACKEND, what: format!("the slow-consumer policy {:?} (DropOldest and Disconnect are offered)", options.policy) });
            }
            let mut subjects = vec![format!("{}{}", self.prefix, pattern.as_str())];
            if pattern.matches_parent()
                && let Some(parent) = pattern.as_str().strip_suffix(".>")
            {
                subjects.push(format!("{}{parent}", self.prefix));
            }
            let mut streams = Vec::with_capacity(subjects.len());
            for subject in subjects {
                let subscriber = match &options.group {
                    Some(group) => self.client.queue_subscribe(subject, group.clone()).await,
                    None => self.client.subscribe(subject).await,
                };
                streams.push(subscriber.map_err(backend)?);
            }
            self.barrier().await?;
            let shared = Arc::new((Mutex::new(Buffer { messages: VecDeque::new(), closed: None }), tokio::sync::Notify::new()));
            let pump = tokio::spawn(pump(futures_util::stream::select_all(streams), shared.clone(), self.prefix.clone(), options));
            Ok(Box::new(NatsSubscription { shared, pump }) as Box<dyn Subscribed>)
        })
    }
}

/// Moves messages from NATS into the buffer, applying the slow-consumer policy.
async fn pump(mut messages: futures_util::stream::SelectAll<async_nats::Subscriber>, shared: Arc<(Mutex<Buffer>, tokio::sync::Notify)>, prefix: String, options: SubscriberOptions) {
    let (buffer, ready) = &*shared;
    while let Some(message) = messages.next().await {
        let Some(subject) = message.subject.as_str().strip_prefix(&prefix).and_then(|s| Subject::parse(s).ok()) else { continue };
        let offset = message.headers.as_ref().and_then(|h| h.get(OFFSET_HEADER)).and_then(|v| v.as_str().parse().ok()).unwrap_or(0);
        let delivery = Delivery { subject: Arc::new(subject), offset, message: message.payload };
        {
            let mut buffer = buffer.lock();
            if buffer.messages.len() >= options.buffer_messages {
                if options.policy == SlowConsumerPolicy::Disconnect {
                    buffer.closed = Some(DisconnectReason::SlowConsumer);
                    drop(buffer);
                    ready.notify_one();
                    return;
                }
                buffer.messages.pop_front();
            }
            buffer.messages.push_back(delivery);
        }
        ready.notify_one();
    }
    buffer.lock().closed = Some(DisconnectReason::Backend);
    ready.notify_one();
}
