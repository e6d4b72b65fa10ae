//! RabbitMQ as a peer, over AMQP 0.9.1 (lapin): one durable queue per partition, either a quorum
//! queue or a stream (`x-queue-type`). Producers publish persistent messages on a channel in
//! confirm mode and wait for the publisher confirms; consumers use manual acks (one `multiple`
//! ack per poll) with a prefetch window, and read streams from `first`.
//!
//! Durability (RabbitMQ's own documentation): a quorum queue confirms once a majority of its
//! replicas (here the only one) wrote *and fsynced* the message to its log: `always`. Streams do
//! not fsync explicitly; they confirm once the message is written and replicated, relying on the
//! operating system to flush: `never`.

use std::io::{Read, Write};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::{Ack, Consumer, Peer, PeerDurability, Producer, Setup};

/// Unacknowledged deliveries a consumer may hold (streams require a prefetch).
const PREFETCH: u16 = 2000;
/// Deliveries one poll returns at most.
const POLL_MAX: usize = 10_000;

pub(crate) struct Rabbitmq {
    url: String,
    connection: Connection,
    channel: Channel,
    queues: Vec<String>,
    quorum: bool,
    version: String,
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default()).await.with_context(|| format!("connecting to RabbitMQ at {url}"))
}

impl Rabbitmq {
    pub(crate) async fn connect(setup: &Setup, quorum: bool) -> anyhow::Result<Rabbitmq> {
        let version = server_version(&setup.url).await.unwrap_or_else(|error| format!("RabbitMQ (version unknown: {error:#})"));
        let connection = connect(&setup.url).await?;
        let channel = connection.create_channel().await.context("opening a RabbitMQ channel")?;
        let mut rabbitmq = Rabbitmq { url: setup.url.clone(), connection, channel, queues: Vec::new(), quorum, version };
        for p in 0..setup.partitions {
            let name = setup.partition_name(p);
            let mut arguments = FieldTable::default();
            arguments.insert("x-queue-type".into(), AMQPValue::LongString(if quorum { "quorum" } else { "stream" }.into()));
            let options = QueueDeclareOptions { durable: true, ..Default::default() };
            if let Err(error) = rabbitmq.channel.queue_declare(name.as_str().into(), options, arguments).await {
                let _ = rabbitmq.clean_up().await;
                return Err(anyhow::Error::new(error).context(format!("declaring the queue {name}")));
            }
            rabbitmq.queues.push(name);
        }
        Ok(rabbitmq)
    }
}

impl Peer for Rabbitmq {
    type Producer = RabbitmqProducer;
    type Consumer = RabbitmqConsumer;

    fn server_version(&self) -> String {
        self.version.clone()
    }

    fn durability(&self) -> PeerDurability {
        if self.quorum {
            PeerDurability::new("always", "quorum queue, persistent messages, publisher confirms: confirmed after the Raft log write and fsync")
        } else {
            PeerDurability::new("never", "stream queue, publisher confirms: confirmed after the write, no explicit fsync")
        }
    }

    async fn producer(&self) -> anyhow::Result<RabbitmqProducer> {
        let connection = connect(&self.url).await?;
        let channel = connection.create_channel().await.context("opening a RabbitMQ channel")?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.context("enabling publisher confirms")?;
        Ok(RabbitmqProducer { _connection: connection, channel, queues: self.queues.clone() })
    }

    async fn consumer(&self, partition: u32) -> anyhow::Result<RabbitmqConsumer> {
        let queue = &self.queues[partition as usize];
        let connection = connect(&self.url).await?;
        let channel = connection.create_channel().await.context("opening a RabbitMQ channel")?;
        channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.context("setting the prefetch")?;
        let mut arguments = FieldTable::default();
        if !self.quorum {
            arguments.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        }
        let tag = format!("{queue}-consumer");
        let deliveries = channel
            .basic_consume(queue.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), arguments)
            .await
            .with_context(|| format!("consuming {queue}"))?;
        Ok(RabbitmqConsumer { _connection: connection, _channel: channel, deliveries })
    }

    async fn clean_up(&self) -> anyhow::Result<()> {
        let mut first_error = None;
        for queue in &self.queues {
            if let Err(error) = self.channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await {
                first_error.get_or_insert(anyhow::Error::new(error).context(format!("deleting the queue {queue}")));
            }
        }
        let _ = self.connection.close(200, "bench finished".into()).await;
        first_error.map_or(Ok(()), Err)
    }
}

pub(crate) struct RabbitmqProducer {
    _connection: Connection,
    channel: Channel,
    queues: Vec<String>,
}

impl Producer for RabbitmqProducer {
    async fn send(&mut self, partition: u32, values: Vec<Bytes>) -> anyhow::Result<Ack> {
        let queue = &self.queues[partition as usize];
        let mut confirms = Vec::with_capacity(values.len());
        for value in &values {
            let properties = BasicProperties::default().with_delivery_mode(2);
            let confirm = self
                .channel
                .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), value, properties)
                .await
                .with_context(|| format!("publishing to {queue}"))?;
            confirms.push(confirm);
        }
        Ok(Box::pin(async move {
            for confirm in confirms {
                let confirmation = confirm.await.context("waiting for a publisher confirm")?;
                if !confirmation.is_ack() {
                    bail!("RabbitMQ refused a message (publisher nack)");
                }
            }
            Ok(())
        }))
    }
}

pub(crate) struct RabbitmqConsumer {
    _connection: Connection,
    _channel: Channel,
    deliveries: lapin::Consumer,
}

impl Consumer for RabbitmqConsumer {
    async fn poll(&mut self, wait: Duration) -> anyhow::Result<Vec<Bytes>> {
        let first = match tokio::time::timeout(wait, self.deliveries.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(None) => bail!("RabbitMQ cancelled the consumer"),
            Ok(Some(delivery)) => delivery.context("receiving from RabbitMQ")?,
        };
        let mut values = vec![Bytes::from(first.data.clone())];
        let mut last = first;
        while values.len() < POLL_MAX {
            match self.deliveries.next().now_or_never() {
                Some(Some(delivery)) => {
                    last = delivery.context("receiving from RabbitMQ")?;
                    values.push(Bytes::from(std::mem::take(&mut last.data)));
                }
                Some(None) => bail!("RabbitMQ cancelled the consumer"),
                None => break,
            }
        }
        last.ack(BasicAckOptions { multiple: true }).await.context("acknowledging deliveries")?;
        Ok(values)
    }
}

/// The server's `product` and `version` from the `connection.start` it sends before any
/// authentication (lapin does not expose them).
async fn server_version(url: &str) -> anyhow::Result<String> {
    let uri = lapin::uri::AMQPUri::from_str(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    let address = (uri.authority.host.clone(), uri.authority.port);
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut stream = std::net::TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut header = [0u8; 7];
        stream.read_exact(&mut header)?;
        let size = u32::from_be_bytes(header[3..7].try_into().expect("4 bytes")) as usize;
        let mut payload = vec![0u8; size + 1];
        stream.read_exact(&mut payload)?;
        let (_, class) = lapin::protocol::parse_class(&payload[..size]).map_err(|e| anyhow::anyhow!("parsing connection.start: {e:?}"))?;
        let lapin::protocol::AMQPClass::Connection(lapin::protocol::connection::AMQPMethod::Start(start)) = class else {
            bail!("the server did not begin with connection.start");
        };
        let property = |name: &str| match start.server_properties.inner().get(name) {
            Some(AMQPValue::LongString(value)) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            _ => "?".to_string(),
        };
        Ok(format!("{} {}", property("product"), property("version")))
    })
    .await?
}
