//! Redis Streams as a peer: one stream key per partition; a batch is a pipeline of `XADD`s (one
//! entry per message, field `v`), acknowledged by their replies; consumers `XREAD` from `0`.
//!
//! Durability is read from the server (`CONFIG GET appendonly appendfsync`): no AOF is `memory`
//! (the machine's shared Redis keeps nothing on disk), `appendfsync always` is `always` (Redis 7
//! writes and fsyncs the AOF before it sends the replies of that event-loop turn), `everysec` is
//! `interval:1000`, `no` is `never` (written to the AOF before the reply, never fsynced by Redis).
//! `--spawn-peer` starts a private `redis-server` with the AOF set for `--durability`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tributary_log::Durability;

use super::{Ack, Consumer, Peer, PeerDurability, Producer, Setup, SpawnedConfig};

/// Entries one `XREAD` returns at most.
const READ_COUNT: usize = 10_000;
/// How long a request may take before the client gives up (fsync-per-write servers are slow).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct Redis {
    client: redis::Client,
    control: MultiplexedConnection,
    keys: Vec<String>,
    version: String,
    durability: PeerDurability,
}

async fn connection(client: &redis::Client) -> anyhow::Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
    client.get_multiplexed_async_connection_with_config(&config).await.context("connecting to Redis")
}

impl Redis {
    pub(crate) async fn connect(setup: &Setup) -> anyhow::Result<Redis> {
        let client = redis::Client::open(setup.url.as_str()).with_context(|| format!("parsing the Redis address {}", setup.url))?;
        let mut control = connection(&client).await.with_context(|| format!("at {}", setup.url))?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut control).await.context("INFO server")?;
        let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).map_or_else(|| "unknown".to_string(), |v| v.trim().to_string());
        let config: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("appendonly").arg("appendfsync").query_async(&mut control).await.context("CONFIG GET")?;
        let setting = |name: &str| config.chunks(2).find(|pair| pair[0] == name).map(|pair| pair[1].clone()).unwrap_or_default();
        let durability = durability_of(&setting("appendonly"), &setting("appendfsync"));
        let keys = (0..setup.partitions).map(|p| setup.partition_name(p)).collect();
        Ok(Redis { client, control, keys, version: format!("redis {version}"), durability })
    }
}

/// The class a Redis server gives, from its `appendonly` and `appendfsync` settings.
fn durability_of(appendonly: &str, appendfsync: &str) -> PeerDurability {
    match (appendonly, appendfsync) {
        ("yes", "always") => PeerDurability::new("always", "appendonly yes, appendfsync always (AOF fsync before the reply)"),
        ("yes", "everysec") => PeerDurability::new("interval:1000", "appendonly yes, appendfsync everysec (AOF written before the reply, fsync every second)"),
        ("yes", "no") => PeerDurability::new("never", "appendonly yes, appendfsync no (AOF written before the reply, never fsynced by Redis)"),
        (appendonly, appendfsync) => PeerDurability::new("memory", format!("appendonly {appendonly}, appendfsync {appendfsync}: nothing written to disk before the reply")),
    }
}

impl Peer for Redis {
    type Producer = RedisProducer;
    type Consumer = RedisConsumer;

    fn server_version(&self) -> String {
        self.version.clone()
    }

    fn durability(&self) -> PeerDurability {
        self.durability.clone()
    }

    async fn producer(&self) -> anyhow::Result<RedisProducer> {
        Ok(RedisProducer { connection: connection(&self.client).await?, keys: self.keys.clone() })
    }

    async fn consumer(&self, partition: u32) -> anyhow::Result<RedisConsumer> {
        Ok(RedisConsumer { connection: connection(&self.client).await?, key: self.keys[partition as usize].clone(), last_id: "0".to_string() })
    }

    async fn clean_up(&self) -> anyhow::Result<()> {
        let mut control = self.control.clone();
        let _: i64 = redis::cmd("DEL").arg(&self.keys).query_async(&mut control).await.context("deleting the bench's stream keys")?;
        Ok(())
    }
}

pub(crate) struct RedisProducer {
    connection: MultiplexedConnection,
    keys: Vec<String>,
}

impl Producer for RedisProducer {
    async fn send(&mut self, partition: u32, values: Vec<Bytes>) -> anyhow::Result<Ack> {
        let key = &self.keys[partition as usize];
        let mut pipe = redis::pipe();
        for value in &values {
            pipe.cmd("XADD").arg(key).arg("*").arg("v").arg(value.as_ref()).ignore();
        }
        let mut connection = self.connection.clone();
        // The multiplexed connection sends when the request is first polled: spawn it now so the
        // pipeline is on the wire while the caller goes on; the acknowledgement is its reply.
        let reply = tokio::spawn(async move { pipe.query_async::<()>(&mut connection).await });
        Ok(Box::pin(async move { reply.await.context("the XADD task panicked")?.context("XADD") }))
    }
}

pub(crate) struct RedisConsumer {
    connection: MultiplexedConnection,
    key: String,
    last_id: String,
}

impl Consumer for RedisConsumer {
    async fn poll(&mut self, wait: Duration) -> anyhow::Result<Vec<Bytes>> {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last_id)
            .query_async(&mut self.connection)
            .await
            .with_context(|| format!("XREAD {}", self.key))?;
        let mut values = Vec::new();
        if let Some(last) = entries(reply, &mut values)? {
            self.last_id = last;
        }
        Ok(values)
    }
}

/// The values of an `XREAD` reply for one key, and the id of its last entry.
fn entries(reply: Value, values: &mut Vec<Bytes>) -> anyhow::Result<Option<String>> {
    let streams = match reply {
        Value::Nil => return Ok(None),
        Value::Array(streams) => streams.into_iter().map(|s| match s {
            Value::Array(mut pair) if pair.len() == 2 => Ok(pair.pop().expect("two items")),
            other => bail!("unexpected XREAD stream item {other:?}"),
        }).collect::<anyhow::Result<Vec<Value>>>()?,
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        other => bail!("unexpected XREAD reply {other:?}"),
    };
    let mut last = None;
    for stream in streams {
        let Value::Array(items) = stream else { bail!("unexpected XREAD entries {stream:?}") };
        for item in items {
            let Value::Array(mut entry) = item else { bail!("unexpected XREAD entry {item:?}") };
            let (Some(fields), Some(id)) = (entry.pop(), entry.pop()) else { bail!("an XREAD entry without id and fields") };
            let Value::BulkString(id) = id else { bail!("unexpected entry id {id:?}") };
            let Value::Array(mut fields) = fields else { bail!("unexpected entry fields {fields:?}") };
            let Some(Value::BulkString(value)) = fields.pop() else { bail!("an entry without its value") };
            values.push(Bytes::from(value));
            last = Some(String::from_utf8(id).context("a non-UTF-8 entry id")?);
        }
    }
    Ok(last)
}

/// A private `redis-server` on `port` keeping its AOF in `dir`, synced as `durability` asks.
pub(crate) fn spawn_command(dir: &Path, port: u16, durability: Durability) -> (Command, String, SpawnedConfig) {
    let appendfsync = match durability {
        Durability::Always => "always",
        Durability::Interval(_) => "everysec",
        Durability::Never => "no",
    };
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync])
        .arg("--dir")
        .arg(dir);
    let durability = durability_of("yes", appendfsync);
    (command, format!("redis://127.0.0.1:{port}"), SpawnedConfig { durability })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_name_the_class() {
        assert_eq!(durability_of("yes", "always").class, "always");
        assert_eq!(durability_of("yes", "no").class, "never");
        assert_eq!(durability_of("no", "everysec").class, "memory");
    }

    #[test]
    fn an_xread_reply_yields_values_and_the_last_id() {
        let entry = |id: &str, v: &str| {
            Value::Array(vec![Value::BulkString(id.into()), Value::Array(vec![Value::BulkString(b"v".to_vec()), Value::BulkString(v.into())])])
        };
        let reply = Value::Array(vec![Value::Array(vec![Value::BulkString(b"k".to_vec()), Value::Array(vec![entry("1-0", "a"), entry("1-1", "b")])])]);
        let mut values = Vec::new();
        assert_eq!(entries(reply, &mut values).unwrap().as_deref(), Some("1-1"));
        assert_eq!(values, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert_eq!(entries(Value::Nil, &mut values).unwrap(), None);
    }
}
