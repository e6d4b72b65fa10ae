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

pub mod cache;
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
