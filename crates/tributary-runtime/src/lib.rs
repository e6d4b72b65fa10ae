//! The runtime's view of the 35 systems: what each one must be, as data, and the checks that
//! tell whether a topology is it.
//!
//! | module | what is here |
//! |---|---|
//! | [`catalogue`] | the seed's 35 systems (requirements, targets, constants, tiers, reference design), parsed once from the committed `catalogue.json` |
//! | [`topology`] | a system's components and connections as data, and their structural validation |
//! | [`metrics`] | live counters and latency percentiles of a running system, for the dashboard |
//! | [`tiers`] | the design checkpoints as [`Rule`]s and [`check`], which grades a topology against them |
//! | [`shaping`] | token buckets by key (rate and burst per key), shared by the systems that send to the outside world |
//!
//! What is deliberately not here (yet): wiring a topology into running workers, and anything
//! that does IO. This crate reads no file at run time (the catalogue is embedded with
//! `include_str!`) and knows nothing of HTTP or tokio.
//!
//! Where the catalogue comes from: `tools/seed_to_catalogue.py` parses
//! `seed/streaming-systems.md` into `catalogue.json`; both are committed, and the tests here
//! fail if the JSON loses a system, an id, a latency target or a request rate.

pub mod catalogue;
mod error;
pub mod metrics;
pub mod shaping;
pub mod tiers;
pub mod topology;

pub use catalogue::{Catalogue, System};
pub use error::{Error, Result};
pub use metrics::{MetricsSnapshot, SystemMetrics};
pub use tiers::{CheckReport, Parameter, Rule, RuleResult, TierResult, check};
pub use topology::{Component, ComponentKind, ComponentParams, Connection, Topology};
