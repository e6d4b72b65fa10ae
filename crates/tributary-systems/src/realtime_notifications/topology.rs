//! realtime-notifications as deployed: publishers and connected users reach the app through the
//! front door (which keeps a WebSocket's reconnects on the node holding its presence); the
//! notification API appends to the durable notification log and fans out to the WebSocket/SSE
//! servers; presence (who is connected, per topic) is the connection registry.
//!
//! The WebSocket/SSE servers are declared with 20 replicas (the seed's T1): the seed's
//! 1,000,000 connections at 50,000 per node. `tributary up` runs one node, where all of these
//! roles are one process; the replica count is the plan for the seed's scale, not what runs on
//! one machine.

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Connected users", "kind": "client"},
    {"name": "Front door", "kind": "lb"},
    {"name": "Notification API", "kind": "app"},
    {"name": "WebSocket / SSE servers", "kind": "app", "params": {"replicas": 20}},
    {"name": "Notification log", "kind": "stream", "params": {"partitions": 1}},
    {"name": "Presence registry", "kind": "cache"}
  ],
  "connections": [
    {"from": "Connected users", "to": "Front door"},
    {"from": "Front door", "to": "Notification API"},
    {"from": "Front door", "to": "WebSocket / SSE servers"},
    {"from": "Notification API", "to": "Notification log"},
    {"from": "Notification log", "to": "WebSocket / SSE servers"},
    {"from": "WebSocket / SSE servers", "to": "Presence registry"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
