//! notification-fanout as deployed: services trigger through the notification API, which appends
//! to the fan-out stream; fan-out workers (one per partition, on the node holding its lease)
//! expand each notification with the subscribers, topics and preferences of the fan-out
//! database, write every delivery's state to the status log and its row, and put each delivery on
//! its channel's queue; delivery workers per channel send to the providers (push, SMS), to the
//! email system (email) or to the inbox (in-app, rows of the same database), and every node's
//! live connections get the inbox through the live stream.

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Services", "kind": "client"},
    {"name": "Notification API", "kind": "app"},
    {"name": "Fanout Stream", "kind": "stream", "params": {"partitions": 4}},
    {"name": "Fanout Workers", "kind": "worker", "params": {"replicas": 4}},
    {"name": "Fanout DB", "kind": "db_primary"},
    {"name": "Status log", "kind": "stream", "params": {"partitions": 1}},
    {"name": "Email Queue", "kind": "queue"},
    {"name": "Push Queue", "kind": "queue"},
    {"name": "SMS Queue", "kind": "queue"},
    {"name": "In-app Queue", "kind": "queue"},
    {"name": "Delivery Workers", "kind": "worker", "params": {"replicas": 16}},
    {"name": "Live stream", "kind": "stream", "params": {"partitions": 1}},
    {"name": "Inbox connections", "kind": "app"}
  ],
  "connections": [
    {"from": "Services", "to": "Notification API"},
    {"from": "Notification API", "to": "Fanout Stream"},
    {"from": "Notification API", "to": "Fanout DB"},
    {"from": "Fanout Stream", "to": "Fanout Workers"},
    {"from": "Fanout Workers", "to": "Fanout DB"},
    {"from": "Fanout Workers", "to": "Status log"},
    {"from": "Fanout Workers", "to": "Email Queue"},
    {"from": "Fanout Workers", "to": "Push Queue"},
    {"from": "Fanout Workers", "to": "SMS Queue"},
    {"from": "Fanout Workers", "to": "In-app Queue"},
    {"from": "Email Queue", "to": "Delivery Workers"},
    {"from": "Push Queue", "to": "Delivery Workers"},
    {"from": "SMS Queue", "to": "Delivery Workers"},
    {"from": "In-app Queue", "to": "Delivery Workers"},
    {"from": "Delivery Workers", "to": "Status log"},
    {"from": "Delivery Workers", "to": "Fanout DB"},
    {"from": "Delivery Workers", "to": "Live stream"},
    {"from": "Live stream", "to": "Inbox connections"},
    {"from": "Inbox connections", "to": "Fanout DB"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
