//! realtime-chat-messages as deployed: chat users reach the chat servers through the front door
//! (which keeps a WebSocket on the node holding its presence); the chat server assigns each
//! event its channel's seq and appends it to the chat log (the message bus, partitioned by
//! channel); applied in log order, events build the message history (each channel's members,
//! events and messages: the store history, sync and unread counts are read from, rebuilt from the
//! log at start), feed the search index, and go out to the members' connections. Presence is the
//! connection registry; read markers are a compacted log.
//!
//! The chat servers are declared with 2 replicas: the seed's 100,000 concurrent users fit on two
//! nodes of the gateway's 50,000-connection plan. `tributary up` runs one node, where all of these
//! roles are one process.

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Chat Users", "kind": "client"},
    {"name": "WebSocket LB", "kind": "lb"},
    {"name": "Chat Server", "kind": "app", "params": {"replicas": 2}},
    {"name": "Message Bus", "kind": "stream", "params": {"partitions": 1}},
    {"name": "Message DB", "kind": "db_primary"},
    {"name": "Presence Cache", "kind": "cache"},
    {"name": "Search Index", "kind": "search"},
    {"name": "Read Markers", "kind": "stream", "params": {"partitions": 1}}
  ],
  "connections": [
    {"from": "Chat Users", "to": "WebSocket LB"},
    {"from": "WebSocket LB", "to": "Chat Server"},
    {"from": "Chat Server", "to": "Message Bus"},
    {"from": "Chat Server", "to": "Presence Cache"},
    {"from": "Chat Server", "to": "Message DB"},
    {"from": "Chat Server", "to": "Search Index"},
    {"from": "Chat Server", "to": "Read Markers"},
    {"from": "Message Bus", "to": "Message DB"},
    {"from": "Message Bus", "to": "Search Index"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
