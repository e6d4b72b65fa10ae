//! email-queue-system as deployed: applications post to the email API, which writes each email to
//! the priority (transactional) or the bulk queue; sender workers drain both (separate pools),
//! shape per recipient domain and hand off to the SMTP relay. Every state change goes to the
//! events log, which answers status queries (the seed's "Status DB") and feeds the webhook
//! worker. The suppression list is a compacted log held in memory.

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Applications", "kind": "client"},
    {"name": "Email API", "kind": "app"},
    {"name": "Priority Queue", "kind": "queue"},
    {"name": "Bulk Queue", "kind": "queue"},
    {"name": "Sender Workers", "kind": "worker", "params": {"replicas": 12}},
    {"name": "Status log", "kind": "stream", "params": {"partitions": 1}},
    {"name": "Suppression list", "kind": "cache"},
    {"name": "Webhook worker", "kind": "worker"}
  ],
  "connections": [
    {"from": "Applications", "to": "Email API"},
    {"from": "Email API", "to": "Priority Queue"},
    {"from": "Email API", "to": "Bulk Queue"},
    {"from": "Email API", "to": "Suppression list"},
    {"from": "Email API", "to": "Status log"},
    {"from": "Priority Queue", "to": "Sender Workers"},
    {"from": "Bulk Queue", "to": "Sender Workers"},
    {"from": "Sender Workers", "to": "Status log"},
    {"from": "Sender Workers", "to": "Suppression list"},
    {"from": "Status log", "to": "Webhook worker"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
