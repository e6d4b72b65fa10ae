//! A system's topology as data: named components of the palette's kinds, and the directed
//! connections between them, as in the seed's reference solutions.
//!
//! A component is a role, not an instance: "Consumer A (worker)" may run as many replicas as
//! its [`ComponentParams::replicas`] says (one when unset). Tier rules that count ("Minimum 3
//! of type: worker") count instances, so one component with `replicas: 3` satisfies them.
//!
//! What is here: the types, their JSON shape, and [`Topology::validate`] (names unique,
//! connections name existing components, parameters within the engine's limits). What is not:
//! whether the topology meets a system's design checkpoints (that is [`crate::tiers`]), and
//! wiring it into running components.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tributary_core::limits::PARTITIONS_MAX;

use crate::{Error, Result};

/// The component palette: every system is built from these kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    /// A traffic source: the load generator or a test client. The seed's reference solutions
    /// call it `redirect_client`, accepted here as an alias.
    #[serde(alias = "redirect_client")]
    Client,
    /// The HTTP front door: routing, auth, rate limits, sticky routing.
    Lb,
    /// A system's HTTP / WebSocket / SSE handlers.
    App,
    /// A partitioned, replayable log.
    Stream,
    /// A work queue: lease, ack, nack, dead-letter.
    Queue,
    /// A consumer runtime.
    Worker,
    /// KV with TTL, counters, sorted sets.
    Cache,
    /// The SQL primary.
    DbPrimary,
    /// A read replica of the SQL primary.
    DbReplica,
    /// A full-text index.
    Search,
    /// An edge collector that batches and forwards to the core.
    Cdn,
}

impl ComponentKind {
    /// Every kind, in the palette's order.
    pub const ALL: [ComponentKind; 11] = [
        ComponentKind::Client,
        ComponentKind::Lb,
        ComponentKind::App,
        ComponentKind::Stream,
        ComponentKind::Queue,
        ComponentKind::Worker,
        ComponentKind::Cache,
        ComponentKind::DbPrimary,
        ComponentKind::DbReplica,
        ComponentKind::Search,
        ComponentKind::Cdn,
    ];

    /// The kind's name as the seed writes it (`db_primary`).
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Client => "client",
            ComponentKind::Lb => "lb",
            ComponentKind::App => "app",
            ComponentKind::Stream => "stream",
            ComponentKind::Queue => "queue",
            ComponentKind::Worker => "worker",
            ComponentKind::Cache => "cache",
            ComponentKind::DbPrimary => "db_primary",
            ComponentKind::DbReplica => "db_replica",
            ComponentKind::Search => "search",
            ComponentKind::Cdn => "cdn",
        }
    }
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ComponentKind {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        if text == "redirect_client" {
            return Ok(ComponentKind::Client);
        }
        ComponentKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| Error::UnknownKind(text.to_owned()))
    }
}

/// Parameters of a component. Typed rather than a free map so that a misspelt parameter is an
/// error when the topology is read, not a silently ignored setting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComponentParams {
    /// Partitions of a stream (1..=`PARTITIONS_MAX`). Meaningful for `stream` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
    /// Instances of this role; one when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

impl ComponentParams {
    /// True when no parameter is set (the JSON then leaves `params` out).
    pub fn is_empty(&self) -> bool {
        *self == ComponentParams::default()
    }
}

/// One named component of a topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Unique within its topology; connections refer to it.
    pub name: String,
    pub kind: ComponentKind,
    #[serde(default, skip_serializing_if = "ComponentParams::is_empty")]
    pub params: ComponentParams,
}

impl Component {
    /// A component with no parameters set.
    pub fn new(name: impl Into<String>, kind: ComponentKind) -> Component {
        Component {
            name: name.into(),
            kind,
            params: ComponentParams::default(),
        }
    }

    /// How many instances this role runs (its `replicas`, one when unset).
    pub fn instances(&self) -> u32 {
        self.params.replicas.unwrap_or(1)
    }
}

/// A directed edge: data or requests flow from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    pub from: String,
    pub to: String,
}

impl Connection {
    pub fn new(from: impl Into<String>, to: impl Into<String>) -> Connection {
        Connection {
            from: from.into(),
            to: to.into(),
        }
    }
}

/// Components and connections: a system's design as data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub components: Vec<Component>,
    pub connections: Vec<Connection>,
}

impl Topology {
    /// Reads a topology from its JSON form and validates it.
    pub fn from_json(text: &str) -> Result<Topology> {
        let topology: Topology = serde_json::from_str(text)?;
        topology.validate()?;
        Ok(topology)
    }

    /// The component of that name.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components
            .iter()
            .find(|component| component.name == name)
    }

    /// The components of one kind, in declaration order.
    pub fn of_kind(&self, kind: ComponentKind) -> impl Iterator<Item = &Component> {
        self.components
            .iter()
            .filter(move |component| component.kind == kind)
    }

    /// Structural checks: names unique, every connection names existing components, parameters
    /// within the engine's limits. The first problem found is returned.
    pub fn validate(&self) -> Result<()> {
        let mut names = BTreeSet::new();
        for component in &self.components {
            if !names.insert(component.name.as_str()) {
                return Err(Error::DuplicateComponent(component.name.clone()));
            }
            validate_params(component)?;
        }
        for connection in &self.connections {
            for end in [&connection.from, &connection.to] {
                if !names.contains(end.as_str()) {
                    return Err(Error::DanglingConnection {
                        from: connection.from.clone(),
                        to: connection.to.clone(),
                        missing: end.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn validate_params(component: &Component) -> Result<()> {
    let invalid = |detail: String| Error::InvalidParameter {
        component: component.name.clone(),
        detail,
    };
    if let Some(partitions) = component.params.partitions {
        if component.kind != ComponentKind::Stream {
            return Err(invalid(format!(
                "partitions apply to a stream, not a {}",
                component.kind
            )));
        }
        if !(1..=PARTITIONS_MAX).contains(&partitions) {
            return Err(invalid(format!(
                "partitions {partitions} outside 1..={PARTITIONS_MAX}"
            )));
        }
    }
    if component.params.replicas == Some(0) {
        return Err(invalid("replicas must be at least 1".to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> Topology {
        Topology {
            components: vec![
                Component::new("Producers", ComponentKind::Client),
                Component::new("Log", ComponentKind::Stream),
                Component::new("Consumer", ComponentKind::Worker),
            ],
            connections: vec![
                Connection::new("Producers", "Log"),
                Connection::new("Log", "Consumer"),
            ],
        }
    }

    #[test]
    fn a_well_formed_topology_validates() {
        pipeline().validate().unwrap();
    }

    #[test]
    fn two_components_with_one_name_are_refused() {
        let mut topology = pipeline();
        topology
            .components
            .push(Component::new("Log", ComponentKind::Queue));
        assert!(
            matches!(topology.validate(), Err(Error::DuplicateComponent(name)) if name == "Log")
        );
    }

    #[test]
    fn a_connection_to_a_missing_component_is_refused() {
        let mut topology = pipeline();
        topology
            .connections
            .push(Connection::new("Consumer", "Warehouse"));
        let error = topology.validate().unwrap_err();
        assert!(
            matches!(&error, Error::DanglingConnection { missing, .. } if missing == "Warehouse")
        );
        assert_eq!(
            error.to_string(),
            "connection \"Consumer\" → \"Warehouse\" names no component \"Warehouse\""
        );
    }

    #[test]
    fn partitions_outside_the_engine_limit_or_off_a_stream_are_refused() {
        for (kind, partitions) in [
            (ComponentKind::Stream, 0),
            (ComponentKind::Stream, PARTITIONS_MAX + 1),
            (ComponentKind::Worker, 4),
        ] {
            let mut topology = pipeline();
            topology.components[1].kind = kind;
            topology.components[1].params.partitions = Some(partitions);
            assert!(
                matches!(topology.validate(), Err(Error::InvalidParameter { .. })),
                "{kind} {partitions}"
            );
        }
    }

    #[test]
    fn kinds_read_and_print_as_the_seed_writes_them() {
        for kind in ComponentKind::ALL {
            assert_eq!(kind.as_str().parse::<ComponentKind>().unwrap(), kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        assert_eq!(
            "redirect_client".parse::<ComponentKind>().unwrap(),
            ComponentKind::Client
        );
        let kind: ComponentKind = serde_json::from_str("\"redirect_client\"").unwrap();
        assert_eq!(kind, ComponentKind::Client);
        assert!("database".parse::<ComponentKind>().is_err());
    }

    #[test]
    fn a_topology_round_trips_through_json_and_rejects_unknown_parameters() {
        let text = r#"{"components":[{"name":"Log","kind":"stream","params":{"partitions":8}}],"connections":[]}"#;
        let topology = Topology::from_json(text).unwrap();
        assert_eq!(topology.components[0].params.partitions, Some(8));
        assert_eq!(serde_json::to_string(&topology).unwrap(), text);
        let misspelt = r#"{"components":[{"name":"Log","kind":"stream","params":{"partition":8}}],"connections":[]}"#;
        assert!(matches!(Topology::from_json(misspelt), Err(Error::Json(_))));
    }
}
