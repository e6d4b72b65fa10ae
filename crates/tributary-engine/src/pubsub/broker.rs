//! [`Broker`]: subscriptions with bounded buffers and a slow-consumer policy each, over the trie.
//!
//! Locking: one `RwLock` around the registry (trie, subscriber table, groups). A publish holds the
//! read lock only while matching; it delivers after releasing it, so a publish waiting on a
//! `Block` subscriber never holds up subscribe, unsubscribe or other publishers. Each subscriber
//! has its own `Mutex` + two `Condvar`s (readable for the subscriber, writable for a blocked
//! publisher).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use tributary_core::limits::{
    SUBSCRIBER_BLOCK_MS_MAX, SUBSCRIBER_BUFFER_MESSAGES_DEFAULT, SUBSCRIBER_BUFFER_MESSAGES_MAX,
    SUBSCRIPTIONS_MAX,
};
use tributary_core::{Subject, SubjectPattern};

use super::trie::{SubjectTrie, SubscriptionId};

/// Why a subscribe was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PubSubError {
    #[error("the broker holds {max} subscriptions already (SUBSCRIPTIONS_MAX or the broker's own bound)")]
    TooManySubscriptions { max: usize },
    #[error("buffer of {requested} messages: must be 1 to SUBSCRIBER_BUFFER_MESSAGES_MAX ({max})")]
    BufferSize { requested: usize, max: usize },
    #[error("block timeout of {requested_ms} ms is over SUBSCRIBER_BLOCK_MS_MAX ({max_ms} ms)")]
    BlockTimeout { requested_ms: u128, max_ms: u64 },
    #[error("bad subscriber group name: {0}")]
    GroupName(String),
    /// The backend does not offer what was asked (a slow-consumer policy, say); nothing was done.
    #[error("the {backend} backend does not offer {what}")]
    Unsupported { backend: &'static str, what: String },
    /// A distributed backend could not answer (connection lost, timeout).
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
}

/// What a publish does when a subscriber's buffer is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Wait up to `timeout` for room; then skip this subscriber for this message and report it in
    /// [`PublishReport::blocked`].
    Block { timeout: Duration },
    /// Evict the oldest buffered message to make room, and count it.
    DropOldest,
    /// Close the subscription: the subscriber drains what it has, then gets
    /// [`RecvError::Disconnected`] with [`DisconnectReason::SlowConsumer`].
    Disconnect,
    /// Stop buffering and mark the subscriber lagging from this message's offset; after draining
    /// its buffer it gets [`RecvError::Lagging`] and reads the log from that offset.
    CatchUp,
}

/// How to subscribe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberOptions {
    /// Messages buffered before `policy` applies (1 to `SUBSCRIBER_BUFFER_MESSAGES_MAX`).
    pub buffer_messages: usize,
    pub policy: SlowConsumerPolicy,
    /// Subscriptions with the same group and the same pattern share one stream: each message
    /// goes to one member, round robin.
    pub group: Option<String>,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            buffer_messages: SUBSCRIBER_BUFFER_MESSAGES_DEFAULT,
            policy: SlowConsumerPolicy::DropOldest,
            group: None,
        }
    }
}

/// Why a subscription is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Its buffer was full under [`SlowConsumerPolicy::Disconnect`].
    SlowConsumer,
    /// It was unsubscribed (its [`Subscription`] was dropped).
    Unsubscribed,
    /// A distributed backend's connection ended it.
    Backend,
}

/// Where a subscriber stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriberState {
    Active,
    /// Missed messages from `resume_from` on; read them from the log, then call
    /// [`Subscription::resume`].
    Lagging {
        resume_from: u64,
    },
    Disconnected {
        reason: DisconnectReason,
    },
}

/// A subscriber's lag and counters, from either side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberStats {
    pub id: SubscriptionId,
    pub pattern: String,
    pub group: Option<String>,
    pub policy: SlowConsumerPolicy,
    pub state: SubscriberState,
    /// Messages waiting in the buffer.
    pub buffered: usize,
    pub buffer_messages: usize,
    /// Messages put in the buffer, ever.
    pub delivered: u64,
    /// Messages this subscriber lost: evicted by `DropOldest` or skipped after a `Block` timeout.
    pub dropped: u64,
    /// Publishes that gave up waiting for room (`Block`).
    pub blocked: u64,
    /// Offset of the newest message put in the buffer.
    pub last_delivered_offset: Option<u64>,
    /// Offset of the newest message the subscriber took out of the buffer.
    pub last_received_offset: Option<u64>,
}

/// One message as a subscriber receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery<T> {
    /// The subject it was published to (shared by every subscriber of that publish).
    pub subject: Arc<Subject>,
    /// The log offset the publisher gave.
    pub offset: u64,
    pub message: T,
}

/// Why nothing was received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    #[error("no message buffered")]
    Empty,
    #[error("no message within the timeout")]
    Timeout,
    #[error("lagging: resume reading the log from offset {resume_from}")]
    Lagging { resume_from: u64 },
    #[error("subscription closed: {reason:?}")]
    Disconnected { reason: DisconnectReason },
}

/// What one publish did. Group members count as one subscription per group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Subscriptions (and groups) whose pattern matched.
    pub matched: usize,
    /// Of those, how many now hold the message in their buffer.
    pub delivered: usize,
    /// Older messages evicted to make room (`DropOldest`).
    pub dropped: usize,
    /// Subscribers still full at the end of their `Block` timeout; they miss this message.
    pub blocked: usize,
    /// Subscribers closed by this publish (`Disconnect`).
    pub disconnected: usize,
    /// Subscribers catching up from the log (`CatchUp`), newly or already; they read it there.
    pub lagging: usize,
}

/// Bounds of one broker; each at most its limit in `tributary_core::limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrokerLimits {
    pub subscriptions_max: usize,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits { subscriptions_max: SUBSCRIPTIONS_MAX }
    }
}

#[derive(Debug)]
enum Status {
    Active,
    Lagging { resume_from: u64 },
    Closed { reason: DisconnectReason },
}

struct Buffer<T> {
    messages: VecDeque<Delivery<T>>,
    status: Status,
    delivered: u64,
    dropped: u64,
    blocked: u64,
    last_delivered_offset: Option<u64>,
    last_received_offset: Option<u64>,
}

struct Subscriber<T> {
    id: SubscriptionId,
    pattern: SubjectPattern,
    group: Option<String>,
    buffer_messages: usize,
    policy: SlowConsumerPolicy,
    buffer: Mutex<Buffer<T>>,
    readable: Condvar,
    writable: Condvar,
}

enum Offer {
    Delivered { evicted: bool },
    Blocked,
    Disconnected,
    Lagging,
    Closed,
}

impl<T> Subscriber<T> {
    fn push(&self, buffer: &mut Buffer<T>, delivery: Delivery<T>) {
        buffer.delivered += 1;
        buffer.last_delivered_offset = Some(delivery.offset);
        buffer.messages.push_back(delivery);
        self.readable.notify_one();
    }

    /// Buffer `delivery` if there is room now; never waits, never applies the policy.
    fn try_offer(&self, delivery: Delivery<T>) -> Result<(), Delivery<T>> {
        let mut buffer = self.buffer.lock();
        if matches!(buffer.status, Status::Active) && buffer.messages.len() < self.buffer_messages {
            self.push(&mut buffer, delivery);
            Ok(())
        } else {
            Err(delivery)
        }
    }

    /// Buffer `delivery`, applying the slow-consumer policy if the buffer is full.
    fn offer(&self, delivery: Delivery<T>) -> Offer {
        let mut buffer = self.buffer.lock();
        match buffer.status {
            Status::Active => {}
            Status::Lagging { .. } => return Offer::Lagging,
            Status::Closed { .. } => return Offer::Closed,
        }
        if buffer.messages.len() < self.buffer_messages {
            self.push(&mut buffer, delivery);
            return Offer::Delivered { evicted: false };
        }
        match self.policy {
            SlowConsumerPolicy::DropOldest => {
                buffer.messages.pop_front();
                buffer.dropped += 1;
                self.push(&mut buffer, delivery);
                Offer::Delivered { evicted: true }
            }
            SlowConsumerPolicy::Disconnect => {
                buffer.status = Status::Closed { reason: DisconnectReason::SlowConsumer };
                self.readable.notify_all();
                Offer::Disconnected
            }
            SlowConsumerPolicy::CatchUp => {
                buffer.status = Status::Lagging { resume_from: delivery.offset };
                self.readable.notify_all();
                Offer::Lagging
            }
            SlowConsumerPolicy::Block { timeout } => {
                let deadline = Instant::now() + timeout;
                loop {
                    match buffer.status {
                        Status::Active => {}
                        Status::Lagging { .. } => return Offer::Lagging,
                        Status::Closed { .. } => return Offer::Closed,
                    }
                    if buffer.messages.len() < self.buffer_messages {
                        self.push(&mut buffer, delivery);
                        return Offer::Delivered { evicted: false };
                    }
                    if self.writable.wait_until(&mut buffer, deadline).timed_out()
                        && buffer.messages.len() >= self.buffer_messages
                    {
                        buffer.blocked += 1;
                        buffer.dropped += 1;
                        return Offer::Blocked;
                    }
                }
            }
        }
    }

    fn close(&self, reason: DisconnectReason) {
        let mut buffer = self.buffer.lock();
        if !matches!(buffer.status, Status::Closed { .. }) {
            buffer.status = Status::Closed { reason };
        }
        self.readable.notify_all();
        self.writable.notify_all();
    }

    fn stats(&self) -> SubscriberStats {
        let buffer = self.buffer.lock();
        SubscriberStats {
            id: self.id,
            pattern: self.pattern.as_str().to_string(),
            group: self.group.clone(),
            policy: self.policy,
            state: match buffer.status {
                Status::Active => SubscriberState::Active,
                Status::Lagging { resume_from } => SubscriberState::Lagging { resume_from },
                Status::Closed { reason } => SubscriberState::Disconnected { reason },
            },
            buffered: buffer.messages.len(),
            buffer_messages: self.buffer_messages,
            delivered: buffer.delivered,
            dropped: buffer.dropped,
            blocked: buffer.blocked,
            last_delivered_offset: buffer.last_delivered_offset,
            last_received_offset: buffer.last_received_offset,
        }
    }
}

struct Group<T> {
    id: SubscriptionId,
    members: RwLock<Vec<Arc<Subscriber<T>>>>,
    next: AtomicUsize,
}

/// What the trie maps a pattern to.
enum Route<T> {
    One(Arc<Subscriber<T>>),
    Group(Arc<Group<T>>),
}

impl<T> Clone for Route<T> {
    fn clone(&self) -> Self {
        match self {
            Route::One(s) => Route::One(Arc::clone(s)),
            Route::Group(g) => Route::Group(Arc::clone(g)),
        }
    }
}

struct Registry<T> {
    trie: SubjectTrie<Route<T>>,
    subscribers: HashMap<SubscriptionId, Arc<Subscriber<T>>>,
    /// Keyed by (group name, pattern text).
    groups: HashMap<(String, String), Arc<Group<T>>>,
}

impl<T> Registry<T> {
    /// Take `id` out of the trie (or its group) and the table; false if it was not there.
    fn remove(&mut self, id: SubscriptionId) -> bool {
        let Some(subscriber) = self.subscribers.remove(&id) else {
            return false;
        };
        match &subscriber.group {
            None => {
                let removed = self.trie.remove(&subscriber.pattern, id);
                debug_assert!(removed.is_some(), "subscriber {id:?} was not in the trie");
            }
            Some(name) => {
                let key = (name.clone(), subscriber.pattern.as_str().to_string());
                let group = Arc::clone(&self.groups[&key]);
                let mut members = group.members.write();
                members.retain(|m| m.id != id);
                if members.is_empty() {
                    self.trie.remove(&subscriber.pattern, group.id);
                    self.groups.remove(&key);
                }
            }
        }
        true
    }
}

struct Shared<T> {
    registry: RwLock<Registry<T>>,
    next_id: AtomicU64,
    limits: BrokerLimits,
}

impl<T> Shared<T> {
    fn unsubscribe(&self, subscriber: &Subscriber<T>, reason: DisconnectReason) {
        self.registry.write().remove(subscriber.id);
        subscriber.close(reason);
    }
}

/// A synchronous pub/sub registry: subscribe with a pattern and a policy, publish to a subject.
///
/// Cloning a `Broker` gives another handle on the same registry.
pub struct Broker<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Broker<T> {
    fn clone(&self) -> Self {
        Broker { shared: Arc::clone(&self.shared) }
    }
}

impl<T> Default for Broker<T> {
    fn default() -> Self {
        Broker::new()
    }
}

impl<T> Broker<T> {
    pub fn new() -> Broker<T> {
        Broker::with_limits(BrokerLimits::default())
    }

    pub fn with_limits(limits: BrokerLimits) -> Broker<T> {
        assert!(limits.subscriptions_max <= SUBSCRIPTIONS_MAX, "over SUBSCRIPTIONS_MAX");
        Broker {
            shared: Arc::new(Shared {
                registry: RwLock::new(Registry {
                    trie: SubjectTrie::new(),
                    subscribers: HashMap::new(),
                    groups: HashMap::new(),
                }),
                next_id: AtomicU64::new(1),
                limits,
            }),
        }
    }

    /// Subscriptions held (each group member counts).
    pub fn subscriptions(&self) -> usize {
        self.shared.registry.read().subscribers.len()
    }

    /// Lag and counters of every subscription, in id order.
    pub fn subscriber_stats(&self) -> Vec<SubscriberStats> {
        let subscribers: Vec<_> = self.shared.registry.read().subscribers.values().cloned().collect();
        let mut stats: Vec<_> = subscribers.iter().map(|s| s.stats()).collect();
        stats.sort_by_key(|s| s.id);
        stats
    }

    pub fn subscribe(
        &self,
        pattern: SubjectPattern,
        options: SubscriberOptions,
    ) -> Result<Subscription<T>, PubSubError> {
        if options.buffer_messages == 0 || options.buffer_messages > SUBSCRIBER_BUFFER_MESSAGES_MAX {
            return Err(PubSubError::BufferSize {
                requested: options.buffer_messages,
                max: SUBSCRIBER_BUFFER_MESSAGES_MAX,
            });
        }
        if let SlowConsumerPolicy::Block { timeout } = options.policy
            && timeout > Duration::from_millis(SUBSCRIBER_BLOCK_MS_MAX)
        {
            return Err(PubSubError::BlockTimeout {
                requested_ms: timeout.as_millis(),
                max_ms: SUBSCRIBER_BLOCK_MS_MAX,
            });
        }
        if let Some(name) = &options.group {
            tributary_core::limits::check_name("subscriber group", name).map_err(PubSubError::GroupName)?;
        }

        let mut registry = self.shared.registry.write();
        if registry.subscribers.len() >= self.shared.limits.subscriptions_max {
            return Err(PubSubError::TooManySubscriptions { max: self.shared.limits.subscriptions_max });
        }
        let id = SubscriptionId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let subscriber = Arc::new(Subscriber {
            id,
            pattern,
            group: options.group,
            buffer_messages: options.buffer_messages,
            policy: options.policy,
            buffer: Mutex::new(Buffer {
                messages: VecDeque::new(),
                status: Status::Active,
                delivered: 0,
                dropped: 0,
                blocked: 0,
                last_delivered_offset: None,
                last_received_offset: None,
            }),
            readable: Condvar::new(),
            writable: Condvar::new(),
        });
        match &subscriber.group {
            None => registry.trie.insert(&subscriber.pattern, id, Route::One(Arc::clone(&subscriber))),
            Some(name) => {
                let key = (name.clone(), subscriber.pattern.as_str().to_string());
                if let Some(group) = registry.groups.get(&key) {
                    group.members.write().push(Arc::clone(&subscriber));
                } else {
                    let group = Arc::new(Group {
                        id: SubscriptionId(self.shared.next_id.fetch_add(1, Ordering::Relaxed)),
                        members: RwLock::new(vec![Arc::clone(&subscriber)]),
                        next: AtomicUsize::new(0),
                    });
                    registry.trie.insert(&subscriber.pattern, group.id, Route::Group(Arc::clone(&group)));
                    registry.groups.insert(key, group);
                }
            }
        }
        registry.subscribers.insert(id, Arc::clone(&subscriber));
        drop(registry);
        Ok(Subscription { shared: Arc::clone(&self.shared), subscriber })
    }

    /// Offer `message` (published at log `offset`) to every subscription matching `subject`.
    ///
    /// Waits only for `Block` subscribers, each at most its timeout, and never while holding the
    /// registry lock.
    pub fn publish(&self, subject: &Subject, offset: u64, message: T) -> PublishReport
    where
        T: Clone,
    {
        let mut routes = Vec::new();
        self.shared.registry.read().trie.match_subject(subject, &mut routes);
        let mut report = PublishReport { matched: routes.len(), ..PublishReport::default() };
        if routes.is_empty() {
            return report;
        }
        let subject = Arc::new(subject.clone());
        let mut slow: Vec<Arc<Subscriber<T>>> = Vec::new();
        for route in routes {
            let delivery = Delivery { subject: Arc::clone(&subject), offset, message: message.clone() };
            let target = match route {
                Route::One(subscriber) => subscriber,
                Route::Group(group) => {
                    let members = group.members.read().clone();
                    if members.is_empty() {
                        continue;
                    }
                    let start = group.next.fetch_add(1, Ordering::Relaxed) % members.len();
                    // Round robin, but a member with room beats a full one; only when every
                    // member is full does the chosen member's policy apply.
                    let mut delivery = Some(delivery);
                    for k in 0..members.len() {
                        match members[(start + k) % members.len()].try_offer(delivery.take().unwrap()) {
                            Ok(()) => break,
                            Err(back) => delivery = Some(back),
                        }
                    }
                    match delivery {
                        None => {
                            report.delivered += 1;
                            continue;
                        }
                        Some(d) => {
                            let chosen = Arc::clone(&members[start]);
                            self.apply(&chosen, d, &mut report, &mut slow);
                            continue;
                        }
                    }
                }
            };
            self.apply(&target, delivery, &mut report, &mut slow);
        }
        if !slow.is_empty() {
            let mut registry = self.shared.registry.write();
            for subscriber in &slow {
                registry.remove(subscriber.id);
            }
        }
        report
    }

    fn apply(
        &self,
        subscriber: &Arc<Subscriber<T>>,
        delivery: Delivery<T>,
        report: &mut PublishReport,
        slow: &mut Vec<Arc<Subscriber<T>>>,
    ) {
        match subscriber.offer(delivery) {
            Offer::Delivered { evicted } => {
                report.delivered += 1;
                report.dropped += usize::from(evicted);
            }
            Offer::Blocked => report.blocked += 1,
            Offer::Disconnected => {
                report.disconnected += 1;
                slow.push(Arc::clone(subscriber));
            }
            Offer::Lagging => report.lagging += 1,
            Offer::Closed => {}
        }
    }
}

/// A subscriber's end: drain it with [`try_recv`](Subscription::try_recv) or
/// [`recv_timeout`](Subscription::recv_timeout). Dropping it unsubscribes.
pub struct Subscription<T> {
    shared: Arc<Shared<T>>,
    subscriber: Arc<Subscriber<T>>,
}

impl<T> Subscription<T> {
    pub fn id(&self) -> SubscriptionId {
        self.subscriber.id
    }

    pub fn pattern(&self) -> &SubjectPattern {
        &self.subscriber.pattern
    }

    pub fn stats(&self) -> SubscriberStats {
        self.subscriber.stats()
    }

    fn take(&self, buffer: &mut Buffer<T>) -> Result<Delivery<T>, RecvError> {
        if let Some(delivery) = buffer.messages.pop_front() {
            buffer.last_received_offset = Some(delivery.offset);
            self.subscriber.writable.notify_one();
            return Ok(delivery);
        }
        match buffer.status {
            Status::Active => Err(RecvError::Empty),
            Status::Lagging { resume_from } => Err(RecvError::Lagging { resume_from }),
            Status::Closed { reason } => Err(RecvError::Disconnected { reason }),
        }
    }

    /// The oldest buffered message, or why there is none. Buffered messages come out before a
    /// lagging or closed state is reported.
    pub fn try_recv(&self) -> Result<Delivery<T>, RecvError> {
        self.take(&mut self.subscriber.buffer.lock())
    }

    /// Like [`try_recv`](Subscription::try_recv), waiting up to `timeout` for a message.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Delivery<T>, RecvError> {
        let deadline = Instant::now() + timeout;
        let mut buffer = self.subscriber.buffer.lock();
        loop {
            match self.take(&mut buffer) {
                Err(RecvError::Empty) => {}
                other => return other,
            }
            if self.subscriber.readable.wait_until(&mut buffer, deadline).timed_out() {
                return match self.take(&mut buffer) {
                    Err(RecvError::Empty) => Err(RecvError::Timeout),
                    other => other,
                };
            }
        }
    }

    /// After catching up from the log, buffer new messages again. Messages published while the
    /// subscriber was reading the log may arrive both ways: skip offsets already read.
    ///
    /// Call it before the last read of the log, so that no offset falls between the two.
    pub fn resume(&self) {
        let mut buffer = self.subscriber.buffer.lock();
        if matches!(buffer.status, Status::Lagging { .. }) {
            buffer.status = Status::Active;
        }
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        self.shared.unsubscribe(&self.subscriber, DisconnectReason::Unsubscribed);
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    fn subject(text: &str) -> Subject {
        Subject::parse(text).unwrap()
    }

    fn subscribe(
        broker: &Broker<u32>,
        pattern: &str,
        buffer_messages: usize,
        policy: SlowConsumerPolicy,
    ) -> Subscription<u32> {
        let options = SubscriberOptions { buffer_messages, policy, group: None };
        broker.subscribe(SubjectPattern::parse(pattern).unwrap(), options).unwrap()
    }

    fn drain(subscription: &Subscription<u32>) -> Vec<u32> {
        std::iter::from_fn(|| subscription.try_recv().ok()).map(|d| d.message).collect()
    }

    #[test]
    fn subscribers_receive_what_their_pattern_matches_with_subject_and_offset() {
        let broker = Broker::new();
        let all = subscribe(&broker, "orders.>", 10, SlowConsumerPolicy::DropOldest);
        let eu = subscribe(&broker, "orders.eu.*", 10, SlowConsumerPolicy::DropOldest);
        let report = broker.publish(&subject("orders.eu.created"), 41, 1);
        assert_eq!(report, PublishReport { matched: 2, delivered: 2, ..PublishReport::default() });
        broker.publish(&subject("orders.us.created"), 42, 2);
        let first = all.try_recv().unwrap();
        assert_eq!((first.subject.as_str(), first.offset, first.message), ("orders.eu.created", 41, 1));
        assert_eq!(drain(&all), vec![2]);
        assert_eq!(drain(&eu), vec![1]);
        assert_eq!(eu.try_recv(), Err(RecvError::Empty));
    }

    #[test]
    fn drop_oldest_counts_what_it_dropped() {
        let broker = Broker::new();
        let sub = subscribe(&broker, "a", 3, SlowConsumerPolicy::DropOldest);
        let dropped: usize = (0..5).map(|i| broker.publish(&subject("a"), i, i as u32).dropped).sum();
        assert_eq!(dropped, 2);
        let stats = sub.stats();
        assert_eq!((stats.buffered, stats.dropped, stats.delivered), (3, 2, 5));
        assert_eq!(stats.last_delivered_offset, Some(4));
        assert_eq!(drain(&sub), vec![2, 3, 4]);
        assert_eq!(sub.stats().last_received_offset, Some(4));
    }

    #[test]
    fn block_waits_for_room_then_delivers() {
        let broker = Broker::new();
        let sub = subscribe(&broker, "a", 1, SlowConsumerPolicy::Block { timeout: Duration::from_secs(10) });
        broker.publish(&subject("a"), 0, 0);
        let publisher = {
            let broker = broker.clone();
            thread::spawn(move || broker.publish(&subject("a"), 1, 1))
        };
        thread::sleep(Duration::from_millis(50));
        assert_eq!(sub.try_recv().unwrap().message, 0);
        let report = publisher.join().unwrap();
        assert_eq!((report.delivered, report.blocked), (1, 0));
        assert_eq!(sub.recv_timeout(Duration::from_secs(1)).unwrap().message, 1);
    }

    #[test]
    fn block_gives_up_after_its_timeout_and_reports_the_subscriber_blocked() {
        let broker = Broker::new();
        let sub =
            subscribe(&broker, "a", 1, SlowConsumerPolicy::Block { timeout: Duration::from_millis(20) });
        broker.publish(&subject("a"), 0, 0);
        let started = Instant::now();
        let report = broker.publish(&subject("a"), 1, 1);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!((report.matched, report.delivered, report.blocked), (1, 0, 1));
        let stats = sub.stats();
        assert_eq!((stats.blocked, stats.dropped, stats.buffered), (1, 1, 1));
        assert_eq!(stats.state, SubscriberState::Active);
    }

    #[test]
    fn a_blocked_publish_does_not_stop_others_from_subscribing() {
        let broker = Broker::new();
        let _full =
            subscribe(&broker, "a", 1, SlowConsumerPolicy::Block { timeout: Duration::from_millis(300) });
        broker.publish(&subject("a"), 0, 0);
        let publisher = {
            let broker = broker.clone();
            thread::spawn(move || broker.publish(&subject("a"), 1, 1))
        };
        thread::sleep(Duration::from_millis(30));
        let started = Instant::now();
        let other = subscribe(&broker, "b", 1, SlowConsumerPolicy::DropOldest);
        assert!(started.elapsed() < Duration::from_millis(200));
        assert_eq!(broker.publish(&subject("b"), 2, 2).delivered, 1);
        assert_eq!(publisher.join().unwrap().blocked, 1);
        drop(other);
    }

    #[test]
    fn disconnect_closes_a_slow_subscriber_with_a_reason() {
        let broker = Broker::new();
        let sub = subscribe(&broker, "a", 2, SlowConsumerPolicy::Disconnect);
        broker.publish(&subject("a"), 0, 0);
        broker.publish(&subject("a"), 1, 1);
        let report = broker.publish(&subject("a"), 2, 2);
        assert_eq!((report.matched, report.delivered, report.disconnected), (1, 0, 1));
        assert_eq!(broker.subscriptions(), 0, "a disconnected subscriber leaves the trie");
        assert_eq!(broker.publish(&subject("a"), 3, 3).matched, 0);
        assert_eq!(drain(&sub), vec![0, 1], "what was buffered can still be drained");
        let closed = RecvError::Disconnected { reason: DisconnectReason::SlowConsumer };
        assert_eq!(sub.try_recv(), Err(closed));
        assert_eq!(sub.recv_timeout(Duration::from_millis(1)), Err(closed));
    }

    #[test]
    fn catch_up_tells_the_subscriber_where_to_resume_in_the_log() {
        let broker = Broker::new();
        let sub = subscribe(&broker, "a.*", 2, SlowConsumerPolicy::CatchUp);
        for offset in 100..105 {
            broker.publish(&subject("a.b"), offset, offset as u32);
        }
        assert_eq!(sub.stats().state, SubscriberState::Lagging { resume_from: 102 });
        assert_eq!(broker.publish(&subject("a.b"), 105, 105).lagging, 1);
        assert_eq!(drain(&sub), vec![100, 101]);
        assert_eq!(sub.try_recv(), Err(RecvError::Lagging { resume_from: 102 }));
        sub.resume();
        assert_eq!(broker.publish(&subject("a.b"), 106, 106).delivered, 1);
        assert_eq!(drain(&sub), vec![106]);
        assert_eq!(sub.stats().state, SubscriberState::Active);
    }

    #[test]
    fn group_members_share_the_stream_round_robin() {
        let broker = Broker::new();
        let member = |name: &str| {
            let options = SubscriberOptions {
                buffer_messages: 100,
                policy: SlowConsumerPolicy::DropOldest,
                group: Some(name.into()),
            };
            broker.subscribe(SubjectPattern::parse("jobs.*").unwrap(), options).unwrap()
        };
        let (a, b, c) = (member("workers"), member("workers"), member("workers"));
        let other_group = member("auditors");
        let loner = subscribe(&broker, "jobs.*", 100, SlowConsumerPolicy::DropOldest);
        for i in 0..9 {
            let report = broker.publish(&subject("jobs.x"), i, i as u32);
            assert_eq!((report.matched, report.delivered), (3, 3));
        }
        let (a, b, c) = (drain(&a), drain(&b), drain(&c));
        assert_eq!((a.len(), b.len(), c.len()), (3, 3, 3));
        let mut all: Vec<u32> = [a, b, c].concat();
        all.sort_unstable();
        assert_eq!(all, (0..9).collect::<Vec<_>>(), "each message goes to exactly one member");
        assert_eq!(drain(&other_group).len(), 9);
        assert_eq!(drain(&loner).len(), 9);
    }

    #[test]
    fn a_group_skips_a_full_member_while_another_has_room() {
        let broker = Broker::new();
        let member = |buffer_messages| {
            let options = SubscriberOptions {
                buffer_messages,
                policy: SlowConsumerPolicy::DropOldest,
                group: Some("g".into()),
            };
            broker.subscribe(SubjectPattern::parse("q").unwrap(), options).unwrap()
        };
        let (small, big) = (member(1), member(100));
        for i in 0..10 {
            assert_eq!(broker.publish(&subject("q"), i, i as u32).dropped, 0);
        }
        assert_eq!((drain(&small).len(), drain(&big).len()), (1, 9));
        drop(small);
        drop(big);
        assert_eq!(broker.publish(&subject("q"), 10, 10).matched, 0, "the last member out removes the group");
    }

    #[test]
    fn dropping_a_subscription_unsubscribes_it() {
        let broker = Broker::new();
        let sub = subscribe(&broker, "a.>", 10, SlowConsumerPolicy::DropOldest);
        assert_eq!(broker.subscriptions(), 1);
        drop(sub);
        assert_eq!(broker.subscriptions(), 0);
        assert_eq!(broker.publish(&subject("a.b"), 0, 0).matched, 0);
        assert_eq!(broker.shared.registry.read().trie.node_count(), 1);
    }

    #[test]
    fn dropping_a_subscription_releases_a_publisher_blocked_on_it() {
        let broker = Broker::new();
        let sub = subscribe(&broker, "a", 1, SlowConsumerPolicy::Block { timeout: Duration::from_secs(20) });
        broker.publish(&subject("a"), 0, 0);
        let publisher = {
            let broker = broker.clone();
            thread::spawn(move || broker.publish(&subject("a"), 1, 1))
        };
        thread::sleep(Duration::from_millis(30));
        let started = Instant::now();
        drop(sub);
        let report = publisher.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((report.delivered, report.blocked), (0, 0));
    }

    #[test]
    fn subscriptions_over_the_limit_are_refused() {
        let broker = Broker::with_limits(BrokerLimits { subscriptions_max: 2 });
        let _a = subscribe(&broker, "a", 1, SlowConsumerPolicy::DropOldest);
        let _b = subscribe(&broker, "b", 1, SlowConsumerPolicy::DropOldest);
        let refused = broker.subscribe(SubjectPattern::parse("c").unwrap(), SubscriberOptions::default());
        assert_eq!(refused.err(), Some(PubSubError::TooManySubscriptions { max: 2 }));
    }

    #[test]
    fn bad_options_are_refused_with_the_limit_they_break() {
        let broker: Broker<u32> = Broker::new();
        let p = || SubjectPattern::parse("a").unwrap();
        let zero = SubscriberOptions { buffer_messages: 0, ..SubscriberOptions::default() };
        assert!(matches!(broker.subscribe(p(), zero), Err(PubSubError::BufferSize { requested: 0, .. })));
        let long = SubscriberOptions {
            policy: SlowConsumerPolicy::Block { timeout: Duration::from_secs(3600) },
            ..SubscriberOptions::default()
        };
        assert!(matches!(broker.subscribe(p(), long), Err(PubSubError::BlockTimeout { .. })));
        let bad_group = SubscriberOptions { group: Some("a b".into()), ..SubscriberOptions::default() };
        assert!(matches!(broker.subscribe(p(), bad_group), Err(PubSubError::GroupName(_))));
    }

    #[test]
    fn lag_is_visible_per_subscriber() {
        let broker = Broker::new();
        let fast = subscribe(&broker, "a", 10, SlowConsumerPolicy::DropOldest);
        let slow = subscribe(&broker, "a", 2, SlowConsumerPolicy::CatchUp);
        for i in 0..4 {
            broker.publish(&subject("a"), i, i as u32);
        }
        drain(&fast);
        let stats = broker.subscriber_stats();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].id, fast.id());
        assert_eq!((stats[0].buffered, stats[0].last_received_offset), (0, Some(3)));
        assert_eq!(stats[1].state, SubscriberState::Lagging { resume_from: 2 });
        assert_eq!((stats[1].buffered, stats[1].last_delivered_offset), (2, Some(1)));
        drop(slow);
    }

    #[test]
    fn publishers_on_many_threads_deliver_every_message_once() {
        let broker = Broker::new();
        let sub = subscribe(
            &broker,
            "t.*",
            100_000,
            SlowConsumerPolicy::Block { timeout: Duration::from_secs(10) },
        );
        let group: Vec<_> = (0..3)
            .map(|_| {
                let options = SubscriberOptions {
                    buffer_messages: 100_000,
                    policy: SlowConsumerPolicy::DropOldest,
                    group: Some("g".into()),
                };
                broker.subscribe(SubjectPattern::parse("t.>").unwrap(), options).unwrap()
            })
            .collect();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let broker = broker.clone();
                thread::spawn(move || {
                    for i in 0..1000u64 {
                        let offset = t * 1000 + i;
                        let report = broker.publish(&subject(&format!("t.{t}")), offset, offset as u32);
                        assert_eq!(report.delivered, 2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut got = drain(&sub);
        got.sort_unstable();
        assert_eq!(got, (0..4000).collect::<Vec<_>>());
        let mut shared: Vec<u32> = group.iter().flat_map(drain).collect();
        shared.sort_unstable();
        assert_eq!(shared, (0..4000).collect::<Vec<_>>());
    }
}
