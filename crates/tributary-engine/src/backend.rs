//! What every backend of an engine interface shares: boxed futures for the async methods of a
//! `dyn` interface, and [`Gap`], a guarantee a backend declares it does not give.

use std::future::Future;
use std::pin::Pin;

/// A boxed future, as the async methods of a `dyn` interface return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A guarantee of an interface that a backend does not give, with the reason. The conformance
/// suite skips the named case and reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The conformance case it concerns (its name in the suite).
    pub case: &'static str,
    pub reason: &'static str,
}
