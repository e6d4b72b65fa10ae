//! `tributary bench backends`: one workload through the engine's interfaces ([`StreamStore`],
//! [`QueueStore`], [`CacheStore`]) on the embedded engine and, with `--nats URL` and `--redis
//! URL`, on NATS JetStream and Redis, so the distributed mode's figures sit next to the embedded
//! ones, measured the same way.
//!
//! Per backend and interface:
//! - stream: `producers` tasks produce `messages` records in batches of `batch` to a
//!   one-partition topic (each batch awaited: its latency is the call's), then one reader fetches
//!   them all back;
//! - queue: the same publish, then `consumers` tasks receive (up to `batch`) and ack each batch
//!   until every message is acked;
//! - consumer group, on the stream's topic: `consumers` members join one group, then each makes
//!   `messages / batch / consumers` heartbeats (`group_heartbeat`), and the member owning the
//!   partition commits as a member `messages / batch` times, one offset further each
//!   (`member_commit`). A row's `messages` counts calls there.
//! - cache channels: `producers` tasks publish `messages / 10` messages to one channel that one
//!   subscriber reads (`channel_publish`; its latency is publish → delivery);
//! - presence, shared through the cache by two [`Presence`] nodes in this process: `messages /
//!   batch` users join one scope on the first node, one after another, each once the second
//!   node's receivers heard the last (`presence_event`; its latency is join → heard there).
//!
//! The embedded interfaces complete a call on the polling thread (an fsync, a long poll), so
//! they are called from the blocking pool, as the server does; NATS calls are awaited on the
//! runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use clap::Args;
use serde::Serialize;
use tributary_core::Record;
use futures_util::StreamExt;
use tributary_engine::cache::{Cache, CacheStore, Delivery};
use tributary_engine::queue::{NewMessage, QueueConfig, QueueDefaults, QueueStore, Queues};
use tributary_engine::stream::{StreamStore, TopicConfig, Topics};
use tributary_nats::{NatsQueues, NatsStreams};
use tributary_server::on_backend;
use tributary_server::presence::{Presence, PresenceChange, PresenceEvent};

use super::Machine;
use super::engine::DataDir;
use super::latency::{LatencyHistogram, LatencySummary};

/// Records one fetch asks for.
const FETCH_RECORDS: usize = 1_000;
/// A consumer gives up waiting when nothing came for this long and everything is acked.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);
/// Longest wait for a published message or a presence event before the bench fails.
const DELIVERY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct BackendsArgs {
    /// NATS server(s) for the distributed rows (comma-separated); the embedded rows always run.
    #[arg(long)]
    pub nats: Option<String>,
    /// Redis for the distributed cache rows (`redis://host:port`); the embedded rows always run.
    #[arg(long)]
    pub redis: Option<String>,
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    #[arg(long, default_value_t = 1024)]
    pub message_bytes: usize,
    /// Records per produce or publish call, and most messages per receive.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// An empty folder for the embedded data (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub backend: &'static str,
    /// What "acknowledged" means on this backend.
    pub durability: &'static str,
    pub interface: &'static str,
    /// `produce`, `fetch`, `publish`, `receive_ack`, `group_heartbeat`, `member_commit`,
    /// `channel_publish` or `presence_event`.
    pub phase: &'static str,
    pub messages: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
    /// Latency of one call (a batch), where the phase makes calls of a batch each; for
    /// `channel_publish` publish → delivery, for `presence_event` join → heard on the other node.
    pub call_ms: Option<LatencySummary>,
}

#[derive(Debug, Serialize)]
pub struct BackendsReport {
    pub bench: &'static str,
    pub messages: u64,
    pub message_bytes: usize,
    pub batch: usize,
    pub producers: usize,
    pub consumers: usize,
    pub rows: Vec<Row>,
    pub machine: Machine,
}

/// A backend's name and what "acknowledged" means on it, as its rows say.
type BackendId = (&'static str, &'static str);

/// A backend under test: its interfaces and how to call them.
struct Backend {
    name: &'static str,
    durability: &'static str,
    streams: Arc<dyn StreamStore>,
    queues: Arc<dyn QueueStore>,
    /// The embedded interfaces block the polling thread.
    blocking: bool,
}

impl Backend {
    fn id(&self) -> BackendId {
        (self.name, self.durability)
    }
}

pub async fn run_backends(args: &BackendsArgs) -> anyhow::Result<BackendsReport> {
    ensure!(args.messages > 0 && args.batch > 0 && args.producers > 0 && args.consumers > 0, "messages, batch, producers and consumers must be positive");
    let data = DataDir::prepare(args.data.as_deref())?;
    let machine = Machine::probe(data.path());
    let mut backends = vec![Backend {
        name: "embedded",
        durability: "always (fsync before the acknowledgement, group commit)",
        streams: Arc::new(Topics::open(data.path().join("topics")).context("opening the embedded topics")?),
        queues: Arc::new(Queues::open(data.path().join("queues"), QueueDefaults::default()).context("opening the embedded queues")?),
        blocking: true,
    }];
    let namespace = format!("bench-{}", std::process::id());
    let mut nats = None;
    if let Some(url) = &args.nats {
        let streams = NatsStreams::connect(url, &namespace).await.context("connecting the stream interface to NATS")?;
        let queues = NatsQueues::connect(url, &namespace).await.context("connecting the queue interface to NATS")?;
        nats = Some((streams.clone(), queues.clone()));
        backends.push(Backend {
            name: "nats",
            durability: "JetStream file store, one replica (the server's own sync interval, not fsync per acknowledgement)",
            streams: Arc::new(streams),
            queues: Arc::new(queues),
            blocking: false,
        });
    }
    let mut rows = Vec::new();
    for backend in &backends {
        rows.extend(bench_stream(backend, args).await.with_context(|| format!("the stream bench on {}", backend.name))?);
        rows.extend(bench_queue(backend, args).await.with_context(|| format!("the queue bench on {}", backend.name))?);
    }
    if let Some((streams, queues)) = nats {
        streams.delete_namespace().await?;
        queues.delete_namespace().await?;
    }
    let mut caches: Vec<(BackendId, Arc<dyn CacheStore>)> = vec![(("embedded", "in memory (snapshots on close)"), Arc::new(Cache::default()))];
    if let Some(url) = &args.redis {
        let redis = tributary_redis::RedisCache::connect(url, &namespace).await.context("connecting the cache interface to Redis")?;
        caches.push((("redis", "Redis's own (appendonly and appendfsync as configured); pub/sub at most once"), Arc::new(redis)));
    }
    for (id, cache) in caches {
        rows.extend(bench_cache(id, cache, args).await.with_context(|| format!("the cache bench on {}", id.0))?);
    }
    drop(backends);
    data.finish()?;
    Ok(BackendsReport {
        bench: "backends",
        messages: args.messages,
        message_bytes: args.message_bytes,
        batch: args.batch,
        producers: args.producers,
        consumers: args.consumers,
        rows,
        machine,
    })
}

fn row((backend, durability): BackendId, interface: &'static str, phase: &'static str, messages: u64, elapsed: Duration, calls: Option<&LatencyHistogram>) -> Row {
    let seconds = elapsed.as_secs_f64();
    Row {
        backend,
        durability,
        interface,
        phase,
        messages,
        seconds,
        msgs_per_s: messages as f64 / seconds.max(1e-9),
        call_ms: calls.map(LatencyHistogram::summary),
    }
}

/// The messages of one producer: `total` split over `producers`, the first ones taking the rest.
fn share(total: u64, producers: usize, producer: usize) -> u64 {
    let base = total / producers as u64;
    base + u64::from((producer as u64) < total % producers as u64)
}

/// Runs `producers` tasks, each sending its share in batches through `send`; returns the
/// elapsed time and the per-call latencies.
async fn send_all<F, Fut>(backend: &Backend, args: &BackendsArgs, send: F) -> anyhow::Result<(Duration, LatencyHistogram)>
where
    F: Fn(Vec<Bytes>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let body = Bytes::from(vec![b'x'; args.message_bytes]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for producer in 0..args.producers {
        let (send, body, batch, blocking, mut left) = (send.clone(), body.clone(), args.batch, backend.blocking, share(args.messages, args.producers, producer));
        tasks.push(tokio::spawn(async move {
            let mut calls = LatencyHistogram::new();
            while left > 0 {
                let n = left.min(batch as u64);
                let bodies = vec![body.clone(); n as usize];
                let call_started = Instant::now();
                on_backend(blocking, send(bodies)).await?;
                calls.record_ns(call_started.elapsed().as_nanos() as u64);
                left -= n;
            }
            Ok::<_, anyhow::Error>(calls)
        }));
    }
    let mut calls = LatencyHistogram::new();
    for task in tasks {
        calls.merge(&task.await??);
    }
    Ok((started.elapsed(), calls))
}

async fn bench_stream(backend: &Backend, args: &BackendsArgs) -> anyhow::Result<Vec<Row>> {
    let topic = "bench-stream";
    backend.streams.create_topic(topic, TopicConfig { partitions: 1, ..TopicConfig::default() }).await?;
    let streams = backend.streams.clone();
    let (elapsed, calls) = send_all(backend, args, move |bodies| {
        let streams = streams.clone();
        async move {
            let records: Vec<Record> = bodies.into_iter().map(|b| Record { key: None, value: Some(b), headers: Vec::new(), timestamp_ms: 0 }).collect();
            streams.produce(topic, records).await?;
            Ok(())
        }
    })
    .await?;
    let mut rows = vec![row(backend.id(), "stream", "produce", args.messages, elapsed, Some(&calls))];
    let started = Instant::now();
    let mut offset = 0;
    while offset < args.messages {
        let streams = backend.streams.clone();
        let fetched = on_backend(backend.blocking, async move { streams.fetch(topic, 0, offset, FETCH_RECORDS).await }).await?;
        ensure!(!fetched.is_empty(), "the topic ended at offset {offset}, before the {} records produced", args.messages);
        offset += fetched.len() as u64;
    }
    rows.push(row(backend.id(), "stream", "fetch", args.messages, started.elapsed(), None));
    rows.extend(bench_group(backend, args, topic).await?);
    backend.streams.delete_topic(topic).await?;
    Ok(rows)
}

/// Calls `call` `times` times in a row from the runtime (on the blocking pool for the embedded
/// engine); returns the per-call latencies.
async fn timed_calls<F, Fut>(blocking: bool, times: u64, call: F) -> anyhow::Result<LatencyHistogram>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Result<(), tributary_engine::StreamError>> + Send + 'static,
{
    let mut calls = LatencyHistogram::new();
    for i in 0..times {
        let call_started = Instant::now();
        on_backend(blocking, call(i)).await?;
        calls.record_ns(call_started.elapsed().as_nanos() as u64);
    }
    Ok(calls)
}

async fn bench_group(backend: &Backend, args: &BackendsArgs, topic: &'static str) -> anyhow::Result<Vec<Row>> {
    let group = "bench-group";
    let mut members = Vec::new();
    for consumer in 0..args.consumers {
        let streams = backend.streams.clone();
        let id = format!("c{consumer}");
        members.push(on_backend(backend.blocking, async move { streams.join_group(topic, group, Some(&id), Some(60_000)).await }).await?);
    }
    let heartbeats = (args.messages / args.batch as u64 / args.consumers as u64).max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for member in &members {
        let (streams, blocking, id) = (backend.streams.clone(), backend.blocking, member.member_id.clone());
        tasks.push(tokio::spawn(async move {
            timed_calls(blocking, heartbeats, |_| {
                let (streams, id) = (streams.clone(), id.clone());
                async move { streams.heartbeat(topic, group, &id).await.map(drop) }
            })
            .await
        }));
    }
    let mut calls = LatencyHistogram::new();
    for task in tasks {
        calls.merge(&task.await??);
    }
    let mut rows = vec![row(backend.id(), "group", "group_heartbeat", heartbeats * members.len() as u64, started.elapsed(), Some(&calls))];
    let owner = on_backend(backend.blocking, {
        let streams = backend.streams.clone();
        async move { streams.describe_group(topic, group).await }
    })
    .await?
    .into_iter()
    .find(|m| m.partitions.contains(&0))
    .context("no member owns partition 0")?;
    let commits = (args.messages / args.batch as u64).max(1);
    let started = Instant::now();
    let calls = timed_calls(backend.blocking, commits, |i| {
        let (streams, owner) = (backend.streams.clone(), owner.clone());
        async move { streams.commit_member(topic, group, &owner.member_id, owner.generation, vec![(0, i + 1)]).await }
    })
    .await?;
    rows.push(row(backend.id(), "group", "member_commit", commits, started.elapsed(), Some(&calls)));
    let streams = backend.streams.clone();
    ensure!(on_backend(backend.blocking, async move { streams.committed(topic, group, 0).await }).await? == Some(commits), "the group's committed offset is not the last member commit");
    Ok(rows)
}

async fn bench_queue(backend: &Backend, args: &BackendsArgs) -> anyhow::Result<Vec<Row>> {
    let queue = "bench-queue";
    backend.queues.create_queue(queue, QueueConfig::default()).await?;
    let queues = backend.queues.clone();
    let (elapsed, calls) = send_all(backend, args, move |bodies| {
        let queues = queues.clone();
        async move {
            queues.publish(queue, bodies.into_iter().map(NewMessage::new).collect()).await?;
            Ok(())
        }
    })
    .await?;
    let mut rows = vec![row(backend.id(), "queue", "publish", args.messages, elapsed, Some(&calls))];
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for consumer in 0..args.consumers {
        let (queues, acked, blocking, batch, total) = (backend.queues.clone(), acked.clone(), backend.blocking, args.batch, args.messages);
        tasks.push(tokio::spawn(async move {
            let mut calls = LatencyHistogram::new();
            let name = format!("c{consumer}");
            while acked.load(Ordering::Relaxed) < total {
                let call_started = Instant::now();
                let (queues_call, name_call) = (queues.clone(), name.clone());
                let got = on_backend(blocking, async move { queues_call.receive(queue, "bench", &name_call, batch, None, RECEIVE_WAIT).await }).await?;
                if got.is_empty() {
                    continue;
                }
                let receipts = got.into_iter().map(|d| d.receipt).collect::<Vec<_>>();
                let n = receipts.len() as u64;
                let queues_call = queues.clone();
                on_backend(blocking, async move { queues_call.ack(queue, "bench", receipts).await }).await?;
                calls.record_ns(call_started.elapsed().as_nanos() as u64);
                acked.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(calls)
        }));
    }
    let mut calls = LatencyHistogram::new();
    for task in tasks {
        calls.merge(&task.await??);
    }
    rows.push(row(backend.id(), "queue", "receive_ack", acked.load(Ordering::Relaxed), started.elapsed(), Some(&calls)));
    backend.queues.delete_queue(queue).await?;
    Ok(rows)
}

async fn bench_cache(id: BackendId, cache: Arc<dyn CacheStore>, args: &BackendsArgs) -> anyhow::Result<Vec<Row>> {
    let channel = b"bench-channel";
    let total = (args.messages / 10).max(1);
    let mut subscription = cache.subscribe(channel).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for producer in 0..args.producers {
        let mine = share(total, args.producers, producer);
        let (cache, size) = (cache.clone(), args.message_bytes.max(8));
        tasks.push(tokio::spawn(async move {
            for _ in 0..mine {
                // The publish time, as nanoseconds since the start, leads the message.
                let mut message = vec![b'x'; size];
                message[..8].copy_from_slice(&(started.elapsed().as_nanos() as u64).to_le_bytes());
                cache.publish(channel, Bytes::from(message)).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut deliveries = LatencyHistogram::new();
    for _ in 0..total {
        let delivery = tokio::time::timeout(DELIVERY_WAIT, subscription.next()).await.context("a published message did not arrive")?;
        let Some(Delivery::Message(message)) = delivery else { anyhow::bail!("the subscription missed messages: {delivery:?}") };
        let sent = u64::from_le_bytes(message[..8].try_into().expect("eight bytes"));
        deliveries.record_ns((started.elapsed().as_nanos() as u64).saturating_sub(sent));
    }
    let elapsed = started.elapsed();
    for task in tasks {
        task.await??;
    }
    let mut rows = vec![row(id, "cache", "channel_publish", total, elapsed, Some(&deliveries))];

    let (name, scope) = (format!("bench-{}", tributary_core::unique_u64()), ["room".to_string()]);
    let (a, b) = (Presence::shared(cache.clone(), &name), Presence::shared(cache, &name));
    let mut heard = b.subscribe();
    // Both nodes' followers are running once the second hears a first join.
    let warm_up = a.join("warm-up", &scope);
    heard_next(&mut heard).await?;
    let joins = (args.messages / args.batch as u64).max(1);
    let mut latencies = LatencyHistogram::new();
    let mut guards = vec![warm_up];
    let started = Instant::now();
    for i in 0..joins {
        let user = format!("u{i}");
        let joined = Instant::now();
        guards.push(a.join(&user, &scope));
        let event = heard_next(&mut heard).await?;
        ensure!(*event.user == *user && event.event == PresenceChange::Join, "expected {user} to join, heard {event:?}");
        latencies.record_ns(joined.elapsed().as_nanos() as u64);
    }
    rows.push(row(id, "cache", "presence_event", joins, started.elapsed(), Some(&latencies)));
    Ok(rows)
}

/// The next presence event a node's receiver hears, within DELIVERY_WAIT.
async fn heard_next(heard: &mut tokio::sync::broadcast::Receiver<PresenceEvent>) -> anyhow::Result<PresenceEvent> {
    Ok(tokio::time::timeout(DELIVERY_WAIT, heard.recv()).await.context("no presence event on the other node")??)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_backends_carry_the_workload_and_count_every_message() {
        let nats = std::env::var("TRIBUTARY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let redis = std::env::var("TRIBUTARY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let args = BackendsArgs { nats: Some(nats), redis: Some(redis), messages: 1_000, message_bytes: 64, batch: 50, producers: 4, consumers: 2, data: None };
        let report = run_backends(&args).await.unwrap();
        let phases: Vec<(&str, &str, &str)> = report.rows.iter().map(|r| (r.backend, r.interface, r.phase)).collect();
        assert_eq!(
            phases,
            vec![
                ("embedded", "stream", "produce"),
                ("embedded", "stream", "fetch"),
                ("embedded", "group", "group_heartbeat"),
                ("embedded", "group", "member_commit"),
                ("embedded", "queue", "publish"),
                ("embedded", "queue", "receive_ack"),
                ("nats", "stream", "produce"),
                ("nats", "stream", "fetch"),
                ("nats", "group", "group_heartbeat"),
                ("nats", "group", "member_commit"),
                ("nats", "queue", "publish"),
                ("nats", "queue", "receive_ack"),
                ("embedded", "cache", "channel_publish"),
                ("embedded", "cache", "presence_event"),
                ("redis", "cache", "channel_publish"),
                ("redis", "cache", "presence_event"),
            ]
        );
        let (caches, rest): (Vec<&Row>, Vec<&Row>) = report.rows.iter().partition(|r| r.interface == "cache");
        let calls: Vec<(&str, u64, u64)> = caches.iter().map(|r| (r.phase, r.messages, r.call_ms.as_ref().unwrap().count)).collect();
        assert_eq!(calls, [("channel_publish", 100, 100), ("presence_event", 20, 20)].repeat(2), "1,000 / 10 messages, 1,000 / 50 joins, each timed");
        let (groups, others): (Vec<&Row>, Vec<&Row>) = rest.into_iter().partition(|r| r.interface == "group");
        assert!(others.iter().all(|r| r.messages == 1_000 && r.msgs_per_s > 0.0), "{:?}", report.rows);
        let calls: Vec<(&str, u64)> = groups.iter().map(|r| (r.phase, r.messages)).collect();
        assert_eq!(calls, [("group_heartbeat", 20), ("member_commit", 20)].repeat(2), "2 members of 10 heartbeats, 1,000 / 50 commits");
        let produce_calls = report.rows[0].call_ms.as_ref().unwrap();
        assert_eq!(produce_calls.count, 20, "4 producers of 250 records in batches of 50");
    }
}
