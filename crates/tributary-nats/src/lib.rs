//! Tributary's stream interface ([`StreamStore`]) on NATS JetStream, chosen with
//! `--stream nats://…`; the queue interface is in [`queue`] ([`NatsQueues`], on JetStream) and
//! the pub/sub interface in [`pubsub`] ([`NatsPubSub`], on core NATS).
//!
//! Every Tributary node points at the same NATS, so topics, their records and the groups'
//! committed offsets are held by JetStream, not by the node. The mapping:
//!
//! | Tributary | JetStream |
//! |---|---|
//! | a topic's configuration | key `topic.<topic>` of the KV bucket `trib_<namespace>` |
//! | partition `p` of a topic | the stream `TRIB_<namespace>_<topic>_<p>` (file storage), subject `trib.<namespace>.<topic>.<p>` |
//! | offset `n` | stream sequence `n + 1` |
//! | a record | one message whose payload is the record's envelope (postcard: key, value, headers, timestamp) |
//! | produce | publishes with acks, pipelined, awaited in order |
//! | produce_at (conditional) | the same, the first with `Nats-Expected-Last-Sequence`, each later one with `Nats-Expected-Last-Msg-Id` of the one before |
//! | fetch | direct gets of the sequences, pipelined; from `NATS_FETCH_CONSUMER_FROM` records on, one pull of a consumer made for the read |
//! | a committed offset | key `offset.<topic>.<group>.<p>` of the same KV bucket (`<offset>`, or `<offset>@<generation>` from a member) |
//! | a consumer group's members, generation and assignment | key `group.<topic>.<group>` of the same KV bucket, changed by compare-and-set (`groups`) |
//!
//! Topic and group names are escaped for NATS (`_` → `_5F`, `.` → `_2E`). The envelope keeps
//! headers in order and tells a tombstone from an empty value, which NATS headers and payloads
//! alone cannot; other NATS clients therefore see envelopes, not bare values.
//!
//! Differences from the embedded engine (also in the conformance suite's report when a case
//! is affected):
//! - `seek_timestamp` searches the server's append times, not the records' own timestamps; they
//!   agree for records stamped on produce, not for records produced with an older timestamp.
//! - Compaction is refused (`compact: true` is `Invalid`): JetStream keeps per-subject history,
//!   not per-key compaction. Retention maps to `max_bytes` and `max_age` per partition stream.
//! - Durability is JetStream's: the publish ack comes after the write to the leader's file store
//!   (and to a quorum of replicas with `replicas > 1`), not after an fsync (NATS syncs on an
//!   interval unless configured otherwise), whatever the topic's `durability` says.
//! - A record travels in one NATS message, bounded by the server's `max_payload` (1 MiB by
//!   default) together with its envelope and headers, so one near `MESSAGE_BYTES_MAX` is
//!   refused (`TooLarge`, naming `max_payload`) before anything of the produce is sent.
//! - A topic's configuration is read from the KV bucket on each call (one round trip); there is
//!   no node-local cache to go stale when another node deletes a topic.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tributary_core::{Header, Record, StoredRecord, limits, now_ms, partition_for_key};
use tributary_engine::stream::{Membership, Produced, StreamFuture, StreamStore, Tail, TopicConfig, check_produce, session_timeout};
use tributary_engine::{Gap, StreamError};
use tributary_log::LogError;

mod groups;
pub mod pubsub;
pub mod queue;

pub use groups::NATS_GROUP_CHANGE_ATTEMPTS_MAX;

pub use pubsub::NatsPubSub;
pub use queue::NatsQueues;

const BACKEND: &str = "nats";

/// How long a node waits, after creating a stream (or finding it made), for it to take publishes.
pub const NATS_STREAM_READY_WAIT: Duration = Duration::from_secs(10);

/// Direct gets in flight during one fetch or seek.
pub const NATS_FETCH_IN_FLIGHT_MAX: usize = 64;
/// Records a fetch asks for at least to read them through a consumer of its own (one pull)
/// rather than a direct get each.
pub const NATS_FETCH_CONSUMER_FROM: u64 = 128;
/// How long large fetches use direct gets after a fetch's consumer failed.
pub const NATS_FETCH_CONSUMER_PAUSE: Duration = Duration::from_secs(30);
/// How long the server keeps a fetch's consumer that its node failed to delete.
pub const NATS_FETCH_CONSUMER_INACTIVE: Duration = Duration::from_secs(10);

/// How the record travels in a message's payload.
#[derive(Serialize, Deserialize)]
struct Envelope {
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Bytes)>,
    timestamp_ms: i64,
}

impl Envelope {
    /// The payload of `record`, stamped with `stamp` when it has no timestamp.
    fn of(record: Record, stamp: i64) -> Result<Bytes, StreamError> {
        let envelope = Envelope {
            key: record.key,
            value: record.value,
            headers: record.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            timestamp_ms: if record.timestamp_ms == 0 { stamp } else { record.timestamp_ms },
        };
        Ok(Bytes::from(postcard::to_allocvec(&envelope).map_err(backend)?))
    }
}

/// Bytes `headers` take in a NATS message ("NATS/1.0\r\n", each "name: value\r\n", "\r\n").
fn headers_wire_len(headers: &async_nats::HeaderMap) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let lines: usize = headers.iter().map(|(name, values)| values.iter().map(|value| name.to_string().len() + 2 + value.as_str().len() + 2).sum::<usize>()).sum();
    12 + lines
}

/// The first of `messages` (its index and size) over the server's `max_payload` (1 MiB unless
/// nats-server is configured otherwise), and that maximum. Callers refuse the whole request when
/// there is one, before anything is sent: a publish refused midway would leave the ones before
/// it written.
pub(crate) fn over_max_payload(jetstream: &jetstream::Context, messages: &[(String, async_nats::HeaderMap, Bytes)]) -> Option<(usize, usize, usize)> {
    let max = jetstream.client().server_info().max_payload;
    messages.iter().enumerate().map(|(index, (_, headers, payload))| (index, payload.len() + headers_wire_len(headers), max)).find(|&(_, size, max)| size > max)
}

/// The stream guarantees JetStream does not give (see the module docs).
const STREAM_GAPS: &[Gap] = &[Gap {
    case: "largest_record",
    reason: "a record travels in one NATS message, bounded by the server's max_payload (1 MiB by default) with its envelope (the record's bytes plus about 15, and 2 per header): a record that near MESSAGE_BYTES_MAX is refused as TooLarge before anything is sent (raise max_payload in nats-server's configuration to carry it)",
}];

/// Topics on NATS JetStream. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct NatsStreams {
    jetstream: jetstream::Context,
    meta: kv::Store,
    namespace: String,
    replicas: usize,
    next_unkeyed: std::sync::Arc<AtomicU32>,
    /// Until when (ms) large fetches use direct gets, after a fetch's consumer failed.
    consumer_fetch_paused_until: std::sync::Arc<AtomicI64>,
}

impl std::fmt::Debug for NatsStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStreams").field("namespace", &self.namespace).field("replicas", &self.replicas).finish()
    }
}

fn backend(message: impl std::fmt::Display) -> StreamError {
    StreamError::Backend { backend: BACKEND, message: message.to_string() }
}

/// A name as one NATS token: `_` and `.` escaped, so distinct names stay distinct.
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '_' => out.push_str("_5F"),
            '.' => out.push_str("_2E"),
            c => out.push(c),
        }
    }
    out
}

/// The name [`escape`] was given.
pub(crate) fn unescape(escaped: &str) -> String {
    escaped.replace("_2E", ".").replace("_5F", "_")
}

/// Publishes `messages` (subject, headers, payload) to JetStream in order and returns their
/// acknowledgements in order, or the first failure.
pub(crate) async fn publish_in_order(jetstream: &jetstream::Context, messages: impl IntoIterator<Item = (String, async_nats::HeaderMap, Bytes)>) -> Result<Vec<jetstream::publish::PublishAck>, String> {
    publish_each(jetstream, messages).await.into_iter().map(|answer| answer.map_err(|e| e.to_string())).collect()
}

/// Publishes `messages` to JetStream in order and returns every answer in order (after a
/// message that could not be sent, nothing more is sent). Each acknowledgement is awaited on a
/// task of its own as soon as it is sent: the client bounds the acknowledgements in flight on a
/// connection (a semaphore of `max_ack_inflight` permits, 5,000), and an acknowledgement nobody
/// polls keeps its permit, so concurrent callers that sent large batches before awaiting any
/// would wait on each other.
pub(crate) async fn publish_each(jetstream: &jetstream::Context, messages: impl IntoIterator<Item = (String, async_nats::HeaderMap, Bytes)>) -> Vec<Result<jetstream::publish::PublishAck, PublishError>> {
    let mut acks = Vec::new();
    let mut unsent = None;
    for (subject, headers, payload) in messages {
        match jetstream.publish_with_headers(subject, headers, payload).await {
            Ok(ack) => acks.push(tokio::spawn(std::future::IntoFuture::into_future(ack))),
            Err(error) => {
                unsent = Some(error);
                break;
            }
        }
    }
    let mut answers = Vec::with_capacity(acks.len() + 1);
    for ack in acks {
        answers.push(ack.await.unwrap_or_else(|e| Err(PublishError::with_source(PublishErrorKind::Other, e))));
    }
    answers.extend(unsent.map(Err));
    answers
}

pub(crate) fn check_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() || !namespace.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("a NATS namespace is A-Z a-z 0-9 and -, got {namespace:?}"));
    }
    Ok(())
}

/// Connects to `url`: several servers of one cluster may be given, comma-separated; the client
/// also learns the others from the servers and reconnects to one of them when its server goes
/// away.
pub(crate) async fn connect_client(url: &str) -> Result<async_nats::Client, String> {
    let servers: Vec<&str> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    async_nats::connect(servers).await.map_err(|e| format!("connecting to {url}: {e}"))
}

/// Gets the stream of `config`, creating it when missing, and returns once it takes publishes.
/// Nodes starting together may all find it missing: the creates after the first then fail (its
/// name is taken, or its subjects overlap the first one's) and the stream the first made is the
/// one taken. Right after such concurrent creates, nats-server 2.9 was seen to answer a write to
/// the stream with no responder (the client's "no stream found for given subject"), hence
/// [`await_ingest`].
pub(crate) async fn ensure_stream(jetstream: &jetstream::Context, config: stream::Config) -> Result<(), String> {
    let name = config.name.clone();
    let probe = config.subjects.first().map(|subject| probe_subject(subject));
    if let Err(error) = jetstream.get_or_create_stream(config).await {
        jetstream.get_stream(&name).await.map_err(|_| error.to_string())?;
    }
    match probe {
        Some(subject) => await_ingest(jetstream, &name, subject).await,
        None => Ok(()),
    }
}

/// A subject of the stream whose subject filter is `filter` (wildcards made literal).
fn probe_subject(filter: &str) -> String {
    filter.split('.').map(|token| if token == "*" || token == ">" { "_probe" } else { token }).collect::<Vec<_>>().join(".")
}

/// Waits until the stream `name` answers a publish on `subject`, for at most
/// `NATS_STREAM_READY_WAIT`. The probe expects a last sequence no stream has, so the stream
/// refuses it and stores nothing: any answer from the stream means ready; a publish nobody
/// answers was not stored either.
async fn await_ingest(jetstream: &jetstream::Context, name: &str, subject: String) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Expected-Last-Sequence", i64::MAX.to_string().as_str());
        let answer = match jetstream.publish_with_headers(subject.clone(), headers, Bytes::new()).await {
            Ok(ack) => ack.await.map(drop),
            Err(error) => Err(error),
        };
        match answer {
            // No responder yet, or (in a cluster) no answer while the stream elects its leader.
            Err(error) if matches!(error.kind(), PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut) => {
                if started.elapsed() >= NATS_STREAM_READY_WAIT {
                    return Err(format!("stream {name} does not take publishes on {subject} after {NATS_STREAM_READY_WAIT:?}: {error}"));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(error) if error.kind() != PublishErrorKind::WrongLastSequence => return Err(format!("probing stream {name}: {error}")),
            _ => return Ok(()),
        }
    }
}

/// Deletes a stream; one that is not there is not an error.
pub(crate) async fn delete_stream_if_any(jetstream: &jetstream::Context, name: &str) -> Result<(), String> {
    match jetstream.delete_stream(name).await {
        Err(e) if !e.to_string().contains("not found") => Err(format!("deleting stream {name}: {e}")),
        _ => Ok(()),
    }
}

/// Deletes the streams whose names start with `prefix`, and the namespace's KV bucket.
pub(crate) async fn delete_streams(jetstream: &jetstream::Context, namespace: &str, prefix: &str) -> Result<(), String> {
    let names: Vec<String> = jetstream.stream_names().try_collect().await.map_err(|e| e.to_string())?;
    let bucket = format!("KV_trib_{namespace}");
    for name in names.into_iter().filter(|n| n.starts_with(prefix) || *n == bucket) {
        delete_stream_if_any(jetstream, &name).await?;
    }
    Ok(())
}

/// Why [`connect_namespace`] failed.
pub(crate) enum Connect {
    Invalid(String),
    Backend(String),
}

/// Connects to `url` and opens the namespace's KV bucket `trib_<namespace>` (where topic and
/// queue configurations live), made with `replicas` copies.
pub(crate) async fn connect_namespace(url: &str, namespace: &str, replicas: usize) -> Result<(jetstream::Context, kv::Store), Connect> {
    check_namespace(namespace).map_err(Connect::Invalid)?;
    if !(1..=5).contains(&replicas) {
        return Err(Connect::Invalid(format!("JetStream replicas are 1 to 5, got {replicas}")));
    }
    let client = connect_client(url).await.map_err(Connect::Backend)?;
    let jetstream = jetstream::new(client);
    let bucket = format!("trib_{namespace}");
    // The KV stream is made by hand: creating a KV bucket through the client fails on
    // nats-server 2.9 (its account-info reply does not parse); `get_key_value` then works.
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    ensure_stream(&jetstream, config).await.map_err(|e| Connect::Backend(format!("creating the KV stream of {bucket}: {e}")))?;
    let meta = jetstream.get_key_value(&bucket).await.map_err(|e| Connect::Backend(format!("opening the KV bucket {bucket}: {e}")))?;
    Ok((jetstream, meta))
}

impl NatsStreams {
    /// Connects to `url` and keeps everything under `namespace` (`A-Z a-z 0-9 -`), with one
    /// replica per stream.
    pub async fn connect(url: &str, namespace: &str) -> Result<NatsStreams, StreamError> {
        NatsStreams::connect_with_replicas(url, namespace, 1).await
    }

    /// As [`NatsStreams::connect`], with `replicas` copies of every stream (a NATS cluster of at
    /// least that many servers: a publish is acknowledged once a quorum holds it).
    pub async fn connect_with_replicas(url: &str, namespace: &str, replicas: usize) -> Result<NatsStreams, StreamError> {
        let (jetstream, meta) = connect_namespace(url, namespace, replicas).await.map_err(|e| match e {
            Connect::Invalid(message) => StreamError::Invalid(message),
            Connect::Backend(message) => backend(message),
        })?;
        Ok(NatsStreams { jetstream, meta, namespace: namespace.to_string(), replicas, next_unkeyed: Default::default(), consumer_fetch_paused_until: Default::default() })
    }

    /// Deletes every stream of the namespace and its KV bucket (tests and tear-down).
    pub async fn delete_namespace(&self) -> Result<(), StreamError> {
        delete_streams(&self.jetstream, &self.namespace, &format!("TRIB_{}_", self.namespace)).await.map_err(backend)
    }

    fn stream_name(&self, topic: &str, partition: u32) -> String {
        format!("TRIB_{}_{}_{partition}", self.namespace, escape(topic))
    }

    fn subject(&self, topic: &str, partition: u32) -> String {
        format!("trib.{}.{}.{partition}", self.namespace, escape(topic))
    }

    fn topic_key(topic: &str) -> String {
        format!("topic.{}", escape(topic))
    }

    fn offset_key(topic: &str, group: &str, partition: u32) -> String {
        format!("offset.{}.{}.{partition}", escape(topic), escape(group))
    }

    async fn config(&self, topic: &str) -> Result<TopicConfig, StreamError> {
        match self.meta.get(NatsStreams::topic_key(topic)).await.map_err(backend)? {
            Some(bytes) if !bytes.is_empty() => serde_json::from_slice(&bytes).map_err(|e| backend(format!("topic {topic:?} has a configuration that does not parse: {e}"))),
            _ => Err(StreamError::TopicNotFound(topic.to_string())),
        }
    }

    /// The partition's stream, after checking the topic and the partition exist.
    async fn partition(&self, topic: &str, partition: u32) -> Result<stream::Stream, StreamError> {
        let config = self.config(topic).await?;
        if partition >= config.partitions {
            return Err(StreamError::PartitionNotFound { topic: topic.to_string(), partition, partitions: config.partitions });
        }
        self.jetstream.get_stream(self.stream_name(topic, partition)).await.map_err(|e| backend(format!("partition {partition} of {topic:?}: {e}")))
    }

    /// Refuses a commit of `offset` past the end of the partition.
    async fn check_committable(&self, topic: &str, partition: u32, offset: u64) -> Result<(), StreamError> {
        let mut stream = self.partition(topic, partition).await?;
        let (_, end) = NatsStreams::bounds(&mut stream).await?;
        if offset > end {
            return Err(StreamError::Invalid(format!("cannot commit offset {offset} on partition {partition}: its end is {end}")));
        }
        Ok(())
    }

    /// Refuses a produce with a record over the server's `max_payload` ([`over_max_payload`]).
    fn check_payloads(&self, messages: &[(String, async_nats::HeaderMap, Bytes)]) -> Result<(), StreamError> {
        match over_max_payload(&self.jetstream, messages) {
            Some((index, size, max)) => Err(StreamError::TooLarge(format!("record {index} is {size} bytes as a NATS message (in its envelope), over the server's max_payload ({max})"))),
            None => Ok(()),
        }
    }

    /// (start, end) of a partition's stream.
    async fn bounds(stream: &mut stream::Stream) -> Result<(u64, u64), StreamError> {
        let state = &stream.info().await.map_err(backend)?.state;
        let end = state.last_sequence;
        let start = if state.messages == 0 { end } else { state.first_sequence.saturating_sub(1) };
        Ok((start, end))
    }

    fn decode(offset: u64, message: &jetstream::message::StreamMessage) -> Result<StoredRecord, StreamError> {
        NatsStreams::decode_payload(offset, &message.payload)
    }

    fn decode_payload(offset: u64, payload: &[u8]) -> Result<StoredRecord, StreamError> {
        let envelope: Envelope = postcard::from_bytes(payload).map_err(|e| backend(format!("the message at offset {offset} is not a Tributary record: {e}")))?;
        Ok(StoredRecord {
            offset,
            timestamp_ms: envelope.timestamp_ms,
            key: envelope.key,
            value: envelope.value,
            headers: envelope.headers.into_iter().map(|(name, value)| Header { name, value }).collect(),
        })
    }

    /// At most `count` records from `offset` on, below `end`, read through a consumer made for
    /// this read: one pull answered with the whole range instead of a direct get per record.
    /// The consumer (one replica, in memory) is deleted afterwards (and left to the server's
    /// inactivity threshold if that fails). Records removed by retention meanwhile are skipped,
    /// so the first offset may be above `offset`, as on a tail. The caller falls back to direct
    /// gets when this fails.
    async fn fetch_by_consumer(stream: &stream::Stream, topic: &str, partition: u32, offset: u64, end: u64, count: usize) -> Result<Vec<StoredRecord>, StreamError> {
        let failed = |e: &dyn std::fmt::Display| backend(format!("reading partition {partition} of {topic:?} from offset {offset}: {e}"));
        let config = jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: offset + 1 },
            ack_policy: jetstream::consumer::AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: NATS_FETCH_CONSUMER_INACTIVE,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(|e| failed(&e))?;
        let name = consumer.cached_info().name.clone();
        let read = async {
            let mut messages = consumer.fetch().max_messages(count).messages().await.map_err(|e| failed(&e))?;
            let mut records = Vec::with_capacity(count);
            while records.len() < count {
                let Some(message) = messages.next().await else { break };
                let message = message.map_err(|e| failed(&e))?;
                let seq = message.info().map_err(|e| failed(&e))?.stream_sequence;
                if seq > end {
                    break;
                }
                records.push(NatsStreams::decode_payload(seq - 1, &message.payload)?);
            }
            Ok(records)
        }
        .await;
        // On failure the server removes it once inactive.
        let _ = stream.delete_consumer(&name).await;
        read
    }

    /// The server's append time of sequence `seq`, in ms.
    async fn appended_ms(stream: &stream::Stream, seq: u64) -> Result<i64, StreamError> {
        let message = stream.direct_get(seq).await.map_err(backend)?;
        Ok((message.time.unix_timestamp_nanos() / 1_000_000) as i64)
    }
}

impl StreamStore for NatsStreams {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn gaps(&self) -> &'static [Gap] {
        STREAM_GAPS
    }

    fn create_topic<'a>(&'a self, name: &'a str, config: TopicConfig) -> StreamFuture<'a, ()> {
        Box::pin(async move {
            limits::check_name("topic", name).map_err(StreamError::Invalid)?;
            if name.starts_with("__") {
                return Err(StreamError::Invalid(format!("topic names starting with __ are internal: {name:?}")));
            }
            config.validate()?;
            if config.compact {
                return Err(StreamError::Invalid("compaction is not available on the nats backend (JetStream has no per-key compaction)".into()));
            }
            let text = serde_json::to_vec(&config).expect("a topic config serializes");
            if let Err(e) = self.meta.create(NatsStreams::topic_key(name), Bytes::from(text)).await {
                if e.kind() != kv::CreateErrorKind::AlreadyExists {
                    return Err(backend(e));
                }
                let existing = self.config(name).await?;
                if existing != config {
                    return Err(StreamError::TopicExists { name: name.to_string(), existing: format!("{existing:?}") });
                }
            }
            for partition in 0..config.partitions {
                let stream = stream::Config {
                    name: self.stream_name(name, partition),
                    subjects: vec![self.subject(name, partition)],
                    storage: stream::StorageType::File,
                    num_replicas: self.replicas,
                    allow_direct: true,
                    max_bytes: config.retention_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64),
                    max_age: config.retention_ms.map_or(Duration::ZERO, Duration::from_millis),
                    ..Default::default()
                };
                ensure_stream(&self.jetstream, stream).await.map_err(|e| backend(format!("creating partition {partition} of {name:?}: {e}")))?;
            }
            Ok(())
        })
    }

    fn delete_topic<'a>(&'a self, name: &'a str) -> StreamFuture<'a, ()> {
        Box::pin(async move {
            let config = self.config(name).await?;
            let (offsets, groups) = (format!("offset.{}.", escape(name)), format!("group.{}.", escape(name)));
            let keys: Vec<String> = self.meta.keys().await.map_err(backend)?.try_collect().await.map_err(backend)?;
            for key in keys.into_iter().filter(|k| k.starts_with(&offsets) || k.starts_with(&groups)) {
                self.meta.delete(&key).await.map_err(backend)?;
            }
            for partition in 0..config.partitions {
                delete_stream_if_any(&self.jetstream, &self.stream_name(name, partition)).await.map_err(backend)?;
            }
            self.meta.delete(NatsStreams::topic_key(name)).await.map_err(backend)
        })
    }

    fn partitions<'a>(&'a self, topic: &'a str) -> StreamFuture<'a, u32> {
        Box::pin(async move { Ok(self.config(topic).await?.partitions) })
    }

    fn produce<'a>(&'a self, topic: &'a str, records: Vec<Record>) -> StreamFuture<'a, Vec<Produced>> {
        Box::pin(async move {
            let partitions = self.config(topic).await?.partitions;
            let unkeyed = self.next_unkeyed.fetch_add(1, Ordering::Relaxed) % partitions;
            let partitions_of: Vec<u32> = records.iter().map(|record| record.key.as_deref().map_or(unkeyed, |key| partition_for_key(key, partitions))).collect();
            let mut per_partition = std::collections::HashMap::<u32, usize>::new();
            for &partition in &partitions_of {
                *per_partition.entry(partition).or_default() += 1;
            }
            check_produce(topic, &records, per_partition)?;
            let stamp = now_ms();
            let mut messages = Vec::with_capacity(records.len());
            for (record, &partition) in records.into_iter().zip(&partitions_of) {
                messages.push((self.subject(topic, partition), async_nats::HeaderMap::new(), Envelope::of(record, stamp)?));
            }
            self.check_payloads(&messages)?;
            let acks = publish_in_order(&self.jetstream, messages).await.map_err(backend)?;
            let produced: Vec<Produced> = partitions_of.into_iter().zip(acks).map(|(partition, ack)| Produced { partition, offset: ack.sequence - 1 }).collect();
            Ok(produced)
        })
    }

    /// The first record expects the stream's last sequence to be `expected_end`
    /// (`Nats-Expected-Last-Sequence`); each later one expects the message id of the one before
    /// it (`Nats-Expected-Last-Msg-Id`, ids unique per call), so once one is refused, none after
    /// it goes in, whoever appended in between.
    fn produce_at<'a>(&'a self, topic: &'a str, partition: u32, expected_end: u64, records: Vec<Record>) -> StreamFuture<'a, u64> {
        Box::pin(async move {
            let partitions = self.config(topic).await?.partitions;
            if partition >= partitions {
                return Err(StreamError::PartitionNotFound { topic: topic.to_string(), partition, partitions });
            }
            check_produce(topic, &records, [(partition, records.len())])?;
            let chain = format!("{:016x}", tributary_core::unique_u64());
            let subject = self.subject(topic, partition);
            let stamp = now_ms();
            let mut messages = Vec::with_capacity(records.len());
            for (i, record) in records.into_iter().enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{chain}-{i}").as_str());
                match i {
                    0 => headers.insert(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE, expected_end.to_string().as_str()),
                    _ => headers.insert(async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID, format!("{chain}-{}", i - 1).as_str()),
                }
                messages.push((subject.clone(), headers, Envelope::of(record, stamp)?));
            }
            self.check_payloads(&messages)?;
            let mut appended = 0;
            for answer in publish_each(&self.jetstream, messages).await {
                match answer {
                    Ok(ack) if ack.sequence == expected_end + appended as u64 + 1 => appended += 1,
                    Ok(ack) => return Err(backend(format!("a conditional append to partition {partition} of {topic:?} landed at sequence {}, expected {}", ack.sequence, expected_end + appended as u64 + 1))),
                    Err(error) if matches!(error.kind(), PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId) => {
                        let (_, end) = NatsStreams::bounds(&mut self.partition(topic, partition).await?).await?;
                        return Err(StreamError::EndMoved { topic: topic.to_string(), partition, expected: expected_end, end, appended });
                    }
                    Err(error) => return Err(backend(format!("appending to partition {partition} of {topic:?}: {error}"))),
                }
            }
            Ok(expected_end)
        })
    }

    fn fetch<'a>(&'a self, topic: &'a str, partition: u32, offset: u64, max_records: usize) -> StreamFuture<'a, Vec<tributary_core::StoredRecord>> {
        Box::pin(async move {
            let mut stream = self.partition(topic, partition).await?;
            let (start, end) = NatsStreams::bounds(&mut stream).await?;
            if offset < start || offset > end {
                let source = LogError::OffsetOutOfRange { requested: offset, start, end };
                return Err(StreamError::Partition { topic: topic.to_string(), partition, source });
            }
            let count = (end - offset).min(max_records as u64);
            if count >= NATS_FETCH_CONSUMER_FROM && now_ms() >= self.consumer_fetch_paused_until.load(Ordering::Relaxed) {
                // A consumer needs the cluster's metadata leader (not there for a while after it
                // died); the direct gets below do not, so they are the way when it fails, for
                // every fetch of the next NATS_FETCH_CONSUMER_PAUSE.
                match NatsStreams::fetch_by_consumer(&stream, topic, partition, offset, end, count as usize).await {
                    Ok(records) => return Ok(records),
                    Err(_) => self.consumer_fetch_paused_until.store(now_ms() + NATS_FETCH_CONSUMER_PAUSE.as_millis() as i64, Ordering::Relaxed),
                }
            }
            let stream = &stream;
            futures_util::stream::iter(offset..offset + count)
                .map(|o| async move {
                    let message = stream.direct_get(o + 1).await.map_err(|e| backend(format!("reading offset {o} of partition {partition} of {topic:?}: {e}")))?;
                    NatsStreams::decode(o, &message)
                })
                .buffered(NATS_FETCH_IN_FLIGHT_MAX)
                .try_collect()
                .await
        })
    }

    fn offsets<'a>(&'a self, topic: &'a str, partition: u32) -> StreamFuture<'a, (u64, u64)> {
        Box::pin(async move {
            let mut stream = self.partition(topic, partition).await?;
            NatsStreams::bounds(&mut stream).await
        })
    }

    fn seek_timestamp<'a>(&'a self, topic: &'a str, partition: u32, timestamp_ms: i64) -> StreamFuture<'a, u64> {
        Box::pin(async move {
            let mut stream = self.partition(topic, partition).await?;
            let (start, end) = NatsStreams::bounds(&mut stream).await?;
            // The first offset in start..end appended at or after the time (append times are
            // monotonic within a stream: one leader appends them).
            let (mut low, mut high) = (start, end);
            while low < high {
                let middle = low + (high - low) / 2;
                if NatsStreams::appended_ms(&stream, middle + 1).await? >= timestamp_ms {
                    high = middle;
                } else {
                    low = middle + 1;
                }
            }
            Ok(low)
        })
    }

    fn commit<'a>(&'a self, topic: &'a str, group: &'a str, partition: u32, offset: u64) -> StreamFuture<'a, ()> {
        Box::pin(async move {
            limits::check_name("group", group).map_err(StreamError::Invalid)?;
            self.check_committable(topic, partition, offset).await?;
            self.meta.put(NatsStreams::offset_key(topic, group, partition), Bytes::from(offset.to_string())).await.map_err(backend)?;
            Ok(())
        })
    }

    fn committed<'a>(&'a self, topic: &'a str, group: &'a str, partition: u32) -> StreamFuture<'a, Option<u64>> {
        Box::pin(async move {
            self.config(topic).await?;
            match self.meta.get(NatsStreams::offset_key(topic, group, partition)).await.map_err(backend)? {
                Some(bytes) if !bytes.is_empty() => Ok(Some(groups::parse_offset(&bytes)?.0)),
                _ => Ok(None),
            }
        })
    }

    fn join_group<'a>(&'a self, topic: &'a str, group: &'a str, member_id: Option<&'a str>, session_timeout_ms: Option<u64>) -> StreamFuture<'a, Membership> {
        Box::pin(async move {
            limits::check_name("group", group).map_err(StreamError::Invalid)?;
            let session_timeout_ms = session_timeout(session_timeout_ms)?;
            let partitions = self.config(topic).await?.partitions;
            let member_id = member_id.map_or_else(|| format!("member-{}", nuid::next()), str::to_string);
            self.change_group(topic, group, |state, now| state.join(group, partitions, &member_id, session_timeout_ms, now)).await
        })
    }

    fn heartbeat<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str) -> StreamFuture<'a, Membership> {
        Box::pin(async move {
            let partitions = self.config(topic).await?.partitions;
            self.change_group(topic, group, |state, now| state.heartbeat(group, partitions, member_id, now)).await
        })
    }

    fn leave_group<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str) -> StreamFuture<'a, ()> {
        Box::pin(async move {
            let partitions = self.config(topic).await?.partitions;
            self.change_group(topic, group, |state, now| Ok(state.leave(partitions, member_id, now))).await.map(drop)
        })
    }

    fn describe_group<'a>(&'a self, topic: &'a str, group: &'a str) -> StreamFuture<'a, Vec<Membership>> {
        Box::pin(async move {
            let partitions = self.config(topic).await?.partitions;
            self.change_group(topic, group, |state, now| Ok(state.describe(partitions, now))).await
        })
    }

    fn commit_member<'a>(&'a self, topic: &'a str, group: &'a str, member_id: &'a str, generation: u64, offsets: Vec<(u32, u64)>) -> StreamFuture<'a, ()> {
        Box::pin(async move {
            limits::check_name("group", group).map_err(StreamError::Invalid)?;
            let partitions = self.config(topic).await?.partitions;
            for &(partition, offset) in &offsets {
                self.check_committable(topic, partition, offset).await?;
            }
            let committing: Vec<u32> = offsets.iter().map(|&(p, _)| p).collect();
            self.change_group(topic, group, |state, now| state.check_commit(group, partitions, member_id, generation, &committing, now)).await?;
            for (partition, offset) in offsets {
                self.write_member_offset(topic, group, member_id, partition, offset, generation).await?;
            }
            Ok(())
        })
    }

    /// An ordered pull consumer from the offset's sequence: the server pushes the partition's
    /// messages in order, in batches, with no request per record; the client recreates the
    /// consumer after a gap or a lost connection.
    fn tail<'a>(&'a self, topic: &'a str, partition: u32, offset: u64) -> StreamFuture<'a, Option<Box<dyn Tail>>> {
        Box::pin(async move {
            let stream = self.partition(topic, partition).await?;
            let config = jetstream::consumer::pull::OrderedConfig { deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: offset + 1 }, ..Default::default() };
            let consumer = stream.create_consumer(config).await.map_err(|e| backend(format!("following partition {partition} of {topic:?}: {e}")))?;
            let messages = consumer.messages().await.map_err(|e| backend(format!("following partition {partition} of {topic:?}: {e}")))?;
            Ok(Some(Box::new(NatsTail { messages }) as Box<dyn Tail>))
        })
    }
}

/// A partition's live tail on an ordered consumer.
struct NatsTail {
    messages: jetstream::consumer::pull::Ordered,
}

impl Tail for NatsTail {
    fn next(&mut self) -> tributary_engine::BoxFuture<'_, Result<StoredRecord, StreamError>> {
        Box::pin(async move {
            let message = self.messages.next().await.ok_or_else(|| backend("the partition's consumer ended"))?.map_err(backend)?;
            let offset = message.info().map_err(|e| backend(format!("a followed message without its metadata: {e}")))?.stream_sequence - 1;
            NatsStreams::decode_payload(offset, &message.payload)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escaped_names_stay_distinct_and_are_one_nats_token() {
        let names = ["a.b", "a_b", "a_2Eb", "a-b", "a__b", "a._b"];
        let escaped: std::collections::HashSet<String> = names.iter().map(|n| escape(n)).collect();
        assert_eq!(escaped.len(), names.len());
        assert!(escaped.iter().all(|e| !e.contains('.')));
    }
}
