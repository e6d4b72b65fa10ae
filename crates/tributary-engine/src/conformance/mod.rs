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

/// One guarantee of the interface `S`, checked by `run` against a backend, given the case's own
/// namespace `A` (a topic or queue name, a key prefix, a subject prefix).
pub struct Case<S: ?Sized, A> {
    pub name: &'static str,
    pub guarantee: &'static str,
    pub(crate) run: for<'a> fn(&'a S, A) -> CaseFuture<'a>,
}

/// The one loop of every suite: runs each case the backend does not declare a gap, with its own
/// namespace from `namespace_of(case name)`, then `tidy` with that namespace again (deleting the
/// case's topic or queue, whatever the outcome).
pub(crate) async fn run_cases<S: ?Sized, A>(
    store: &S,
    backend: &'static str,
    gaps: &[crate::Gap],
    cases: &[Case<S, A>],
    namespace_of: impl Fn(&str) -> A,
    tidy: Tidy<S, A>,
) -> Report {
    let mut report = Report { backend, ..Report::default() };
    for case in cases {
        if let Some(gap) = gaps.iter().find(|g| g.case == case.name) {
            report.skipped.push((case.name, gap.reason));
            continue;
        }
        let result = (case.run)(store, namespace_of(case.name)).await;
        tidy(store, namespace_of(case.name)).await;
        match result {
            Ok(()) => report.passed.push(case.name),
            Err(why) => report.failed.push((case.name, why)),
        }
    }
    report
}

/// What [`run_cases`] does after each case with the case's namespace.
pub(crate) type Tidy<S, A> = for<'a> fn(&'a S, A) -> crate::BoxFuture<'a, ()>;

/// A `tidy` for suites whose cases leave nothing behind.
pub(crate) fn nothing_to_tidy<S: ?Sized, A>(_: &S, _: A) -> crate::BoxFuture<'_, ()> {
    Box::pin(async {})
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
