//! stock-price-updates as deployed: feeds post ticks to the feed handler, which appends them to
//! the price stream (partitioned by symbol); the partition workers keep the last-price cache and
//! the indicators and fan out to the WebSocket/SSE servers. The stream is also the tick store
//! that replays serve from (the seed's "Tick DB" role: QuestDB-style storage on the same log).
//!
//! The seed's scale tier (T2) counts 100 app instances: its 100,000 subscribers spread over
//! WebSocket servers of about 1,000 connections each. One Tributary node plays every instance
//! (its gateway holds up to 200,000 connections); `replicas: 100` states the scaled deployment
//! the seed grades, not the count of processes one node runs.

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Exchanges", "kind": "client"},
    {"name": "Feed handler", "kind": "app"},
    {"name": "Price stream", "kind": "stream", "params": {"partitions": 8}},
    {"name": "Last price cache", "kind": "cache"},
    {"name": "WebSocket servers", "kind": "app", "params": {"replicas": 100}},
    {"name": "Traders", "kind": "client"}
  ],
  "connections": [
    {"from": "Exchanges", "to": "Feed handler"},
    {"from": "Feed handler", "to": "Price stream"},
    {"from": "Price stream", "to": "Last price cache"},
    {"from": "Price stream", "to": "WebSocket servers"},
    {"from": "Last price cache", "to": "WebSocket servers"},
    {"from": "WebSocket servers", "to": "Traders"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
