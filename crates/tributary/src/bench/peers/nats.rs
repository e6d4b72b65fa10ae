//! NATS JetStream as a peer: one file-storage stream per partition (one replica), publishes with
//! a publish ack per message, pull consumers without acks reading from the first message.
//!
//! Durability: JetStream acknowledges a publish once the message is in the stream's file store,
//! without an fsync; the store is synced every `sync_interval` (2 minutes by default). Servers
//! from 2.10 accept `sync_interval: always` (fsync before every ack); nats-server 2.9 rejects the
//! field, so `--spawn-peer --durability always` fails there with the server's own message. A
//! server this bench did not start is labelled with the default (`never`): its configuration
//! cannot be read over the client protocol.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tributary_log::Durability;

use super::{Ack, Consumer, Peer, PeerDurability, Producer, Setup, SpawnedConfig};

/// Messages a pull consumer asks the server for at a time.
const PULL_BATCH: usize = 1000;
/// Messages one poll returns at most.
const POLL_MAX: usize = 10_000;

pub(crate) struct Nats {
    url: String,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    streams: Vec<String>,
    durability: PeerDurability,
}

impl Nats {
    pub(crate) async fn connect(setup: &Setup) -> anyhow::Result<Nats> {
        let client = async_nats::connect(&setup.url).await.with_context(|| format!("connecting to NATS at {}", setup.url))?;
        let jetstream = jetstream::new(client.clone());
        let mut nats = Nats {
            url: setup.url.clone(),
            client,
            jetstream,
            streams: Vec::new(),
            durability: setup.spawned.as_ref().map(|s| s.durability.clone()).unwrap_or_else(|| {
                PeerDurability::new("never", "JetStream file storage; publish ack before fsync (server default sync_interval, assumed: not readable over the client protocol)")
            }),
        };
        for p in 0..setup.partitions {
            let name = setup.partition_name(p).replace('-', "_");
            let config = stream::Config { name: name.clone(), subjects: vec![name.clone()], storage: stream::StorageType::File, num_replicas: 1, ..Default::default() };
            let created = nats.jetstream.create_stream(config).await;
            if let Err(error) = created {
                let _ = nats.clean_up().await;
                return Err(anyhow::Error::new(error).context(format!("creating the JetStream stream {name}")));
            }
            nats.streams.push(name);
        }
        Ok(nats)
    }
}

impl Peer for Nats {
    type Producer = NatsProducer;
    type Consumer = NatsConsumer;

    fn server_version(&self) -> String {
        format!("nats-server {}", self.client.server_info().version)
    }

    fn durability(&self) -> PeerDurability {
        self.durability.clone()
    }

    async fn producer(&self) -> anyhow::Result<NatsProducer> {
        // One connection per producer, as separate publishing processes would have.
        let client = async_nats::connect(&self.url).await.with_context(|| format!("connecting to NATS at {}", self.url))?;
        Ok(NatsProducer { jetstream: jetstream::new(client), subjects: self.streams.clone() })
    }

    async fn consumer(&self, partition: u32) -> anyhow::Result<NatsConsumer> {
        let name = &self.streams[partition as usize];
        let client = async_nats::connect(&self.url).await.with_context(|| format!("connecting to NATS at {}", self.url))?;
        let stream = jetstream::new(client).get_stream(name).await.with_context(|| format!("opening the stream {name}"))?;
        let config = consumer::pull::Config { ack_policy: consumer::AckPolicy::None, deliver_policy: consumer::DeliverPolicy::All, ..Default::default() };
        let consumer = stream.create_consumer(config).await.with_context(|| format!("creating a pull consumer on {name}"))?;
        let messages = consumer.stream().max_messages_per_batch(PULL_BATCH).messages().await.with_context(|| format!("pulling from {name}"))?;
        Ok(NatsConsumer { messages })
    }

    async fn clean_up(&self) -> anyhow::Result<()> {
        let mut first_error = None;
        for name in &self.streams {
            if let Err(error) = self.jetstream.delete_stream(name).await {
                first_error.get_or_insert(anyhow::Error::new(error).context(format!("deleting the stream {name}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

pub(crate) struct NatsProducer {
    jetstream: jetstream::Context,
    subjects: Vec<String>,
}

impl Producer for NatsProducer {
    async fn send(&mut self, partition: u32, values: Vec<Bytes>) -> anyhow::Result<Ack> {
        let subject = &self.subjects[partition as usize];
        let mut acks = Vec::with_capacity(values.len());
        for value in values {
            acks.push(self.jetstream.publish(subject.clone(), value).await.context("publishing to JetStream")?);
        }
        Ok(Box::pin(async move {
            for ack in acks {
                ack.await.context("waiting for a JetStream publish ack")?;
            }
            Ok(())
        }))
    }
}

pub(crate) struct NatsConsumer {
    messages: consumer::pull::Stream,
}

impl Consumer for NatsConsumer {
    async fn poll(&mut self, wait: Duration) -> anyhow::Result<Vec<Bytes>> {
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => anyhow::bail!("the JetStream pull stream ended"),
            Ok(Some(message)) => message.context("pulling from JetStream")?,
        };
        let mut values = vec![first.message.payload];
        while values.len() < POLL_MAX {
            match self.messages.next().now_or_never() {
                Some(Some(message)) => values.push(message.context("pulling from JetStream")?.message.payload),
                Some(None) => anyhow::bail!("the JetStream pull stream ended"),
                None => break,
            }
        }
        Ok(values)
    }
}

/// `nats-server` on `port` with JetStream in `dir`; under `always`, `sync_interval: always`.
pub(crate) fn spawn_command(dir: &Path, port: u16, durability: Durability) -> anyhow::Result<(Command, String, SpawnedConfig)> {
    let store = dir.join("jetstream");
    let (sync, class, label) = match durability {
        Durability::Always => ("sync_interval: always".to_string(), "always".to_string(), "JetStream file storage, sync_interval: always (fsync before the publish ack)".to_string()),
        Durability::Interval(every) => (
            format!("sync_interval: \"{}ms\"", every.as_millis()),
            durability.to_string(),
            format!("JetStream file storage, sync_interval {} ms (publish ack before fsync)", every.as_millis()),
        ),
        Durability::Never => (String::new(), "never".to_string(), "JetStream file storage, default sync_interval (publish ack before fsync)".to_string()),
    };
    ensure!(store.to_str().is_some(), "the peer's data directory {} is not UTF-8", dir.display());
    let config = format!("listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {:?}\n  {sync}\n}}\n", store.to_str().expect("checked above"));
    let config_path = dir.join("nats-server.conf");
    std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
    let mut command = Command::new("nats-server");
    command.arg("-c").arg(&config_path);
    Ok((command, format!("nats://127.0.0.1:{port}"), SpawnedConfig { durability: PeerDurability::new(class, label) }))
}
