//! The runtime's view of the 35 systems: what each one must be, as data.
//!
//! | module | what is here |
//! |---|---|
//! | [`topology`] | a system's components and connections as data, and their structural validation |
//!
//! What is deliberately not here (yet): wiring a topology into running workers, metrics, and
//! anything that does IO. This crate knows nothing of HTTP or tokio.

mod error;
pub mod topology;

pub use error::{Error, Result};
pub use topology::{Component, ComponentKind, ComponentParams, Connection, Topology};
