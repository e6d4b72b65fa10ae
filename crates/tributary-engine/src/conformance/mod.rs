//! The guarantees of the engine's interfaces, as executable cases that run against every
//! backend: the embedded engine here, Redis in `tributary-redis`, and so on. A backend that
//! cannot give a guarantee names the case in its gaps (with the reason); the suite skips that case
//! by name and reports it, so a difference is never silent. Compiled with the `conformance`
//! feature (and in this crate's tests).
//!
//! | interface | cases |
//! |---|---|
//! | cache ([`crate::cache::CacheStore`]) | [`cache::CASES`] |
//! | stream ([`crate::stream::StreamStore`]) | [`stream::CASES`] |
//! | queue ([`crate::queue::QueueStore`]) | [`queue::CASES`] |
//! | pub/sub ([`crate::pubsub::PubSubStore`]) | [`pubsub::CASES`] |

macro_rules! check {
    ($cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err(format!($($what)+));
        }
    };
}

macro_rules! check_eq {
    ($left:expr, $right:expr) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{} was {:?}, expected {:?}", stringify!($left), left, right));
        }
    }};
}

pub mod cache;
pub mod pubsub;
pub mod queue;
pub mod stream;

/// What one run of a suite found.
#[derive(Debug, Default)]
pub struct Report {
    pub backend: &'static str,
    pub passed: Vec<&'static str>,
    /// Cases the backend declares it does not give, with the reason.
    pub skipped: Vec<(&'static str, &'static str)>,
    /// Cases that failed, with what was wrong.
    pub failed: Vec<(&'static str, String)>,
}

impl Report {
    /// Panics with every failure listed, unless all cases passed or were declared gaps.
    pub fn assert_conforms(&self) {
        assert!(self.failed.is_empty(), "{self}");
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} backend: {} passed, {} skipped as gaps, {} failed", self.backend, self.passed.len(), self.skipped.len(), self.failed.len())?;
        for (case, reason) in &self.skipped {
            writeln!(f, "  gap  {case}: {reason}")?;
        }
        for (case, why) in &self.failed {
            writeln!(f, "  FAIL {case}: {why}")?;
        }
        Ok(())
    }
}

/// What a case's async body is: `Err` says what was wrong.
pub(crate) type CaseFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// The value of a call that must succeed, or the case's failure naming the call.
pub(crate) fn ok<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e}"))
}

/// A call that must fail with the error `expected` accepts.
pub(crate) fn refused<T: std::fmt::Debug, E: std::fmt::Debug>(result: Result<T, E>, what: &str, expected: fn(&E) -> bool) -> Result<(), String> {
    match result {
        Err(e) if expected(&e) => Ok(()),
        other => Err(format!("{what}: expected a specific refusal, got {other:?}")),
    }
}
