//! simple-pubsub as deployed: publishers post to the broker API, which appends each message to
//! a durable stream and fans it out through the subject trie to subscriber workers on WebSocket
//! or SSE; the subscription registry is cached in memory and persisted. (The seed's palette for
//! this system has no lb: the front door is part of the app here.)

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Publishers", "kind": "client"},
    {"name": "Broker API", "kind": "app"},
    {"name": "Message log", "kind": "stream", "params": {"partitions": 1}},
    {"name": "Subscription registry", "kind": "cache"},
    {"name": "Subscribers", "kind": "worker"}
  ],
  "connections": [
    {"from": "Publishers", "to": "Broker API"},
    {"from": "Broker API", "to": "Message log"},
    {"from": "Broker API", "to": "Subscription registry"},
    {"from": "Message log", "to": "Subscribers"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
