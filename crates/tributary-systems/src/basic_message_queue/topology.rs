//! basic-message-queue as deployed: producers post to the front door, the publisher API writes
//! to a durable queue, and consumer workers (three in the seed's scenario) receive over HTTP long
//! polls or a WebSocket with credit.

use tributary_runtime::Topology;

pub const TOPOLOGY: &str = r#"{
  "components": [
    {"name": "Producers", "kind": "client"},
    {"name": "Front door", "kind": "lb"},
    {"name": "Publisher API", "kind": "app"},
    {"name": "Queue", "kind": "queue"},
    {"name": "Consumers", "kind": "worker", "params": {"replicas": 3}},
    {"name": "Dead letters", "kind": "queue"}
  ],
  "connections": [
    {"from": "Producers", "to": "Front door"},
    {"from": "Front door", "to": "Publisher API"},
    {"from": "Publisher API", "to": "Queue"},
    {"from": "Queue", "to": "Consumers"},
    {"from": "Queue", "to": "Dead letters"},
    {"from": "Dead letters", "to": "Queue"}
  ]
}"#;

pub fn declared() -> Topology {
    Topology::from_json(TOPOLOGY).expect("the declared topology is valid")
}
