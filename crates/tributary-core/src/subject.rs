//! Hierarchical subjects (`orders.eu.created`) and the patterns that match them.
//!
//! Tokens are separated by `.`. A pattern may use `*` for exactly one token and `>` as its last
//! token for one or more remaining tokens (NATS semantics). MQTT topic filters map onto the same
//! shapes: `/` becomes `.`, `+` becomes `*`, `#` becomes `>`; MQTT's rule that `a/#` also matches
//! `a` itself is kept by [`SubjectPattern::matches_parent`].

use std::fmt;

use crate::limits::{SUBJECT_BYTES_MAX, SUBJECT_TOKENS_MAX};

/// Why a subject or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject {subject:?}: {reason}")]
pub struct SubjectError {
    pub subject: String,
    pub reason: &'static str,
}

fn refuse(subject: &str, reason: &'static str) -> SubjectError {
    SubjectError { subject: subject.to_string(), reason }
}

fn check_common(text: &str) -> Result<(), SubjectError> {
    if text.is_empty() {
        return Err(refuse(text, "empty"));
    }
    if text.len() > SUBJECT_BYTES_MAX {
        return Err(refuse(text, "longer than SUBJECT_BYTES_MAX (1024 bytes)"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refuse(text, "contains white space or a control character"));
    }
    if text.split('.').count() > SUBJECT_TOKENS_MAX {
        return Err(refuse(text, "more than SUBJECT_TOKENS_MAX (32) tokens"));
    }
    if text.split('.').any(str::is_empty) {
        return Err(refuse(text, "has an empty token"));
    }
    Ok(())
}

/// A concrete subject a message is published to: no wildcards.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl Subject {
    pub fn parse(text: &str) -> Result<Subject, SubjectError> {
        check_common(text)?;
        if text.split('.').any(|t| t == "*" || t == ">") {
            return Err(refuse(text, "wildcards are for subscriptions, not for publishing"));
        }
        Ok(Subject(text.to_string()))
    }

    /// An MQTT topic name (`a/b/c`) as a subject (`a.b.c`).
    pub fn from_mqtt_topic(topic: &str) -> Result<Subject, SubjectError> {
        if topic.contains(['+', '#']) {
            return Err(refuse(topic, "MQTT topic names may not contain + or #"));
        }
        Subject::parse(&topic.replace('/', "."))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One token of a pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more tokens; only last.
    Rest,
}

/// A subscription pattern: literals, `*` and a trailing `>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubjectPattern {
    text: String,
    tokens: Vec<Token>,
    /// MQTT `a/#` also matches `a`.
    matches_parent: bool,
}

impl SubjectPattern {
    pub fn parse(text: &str) -> Result<SubjectPattern, SubjectError> {
        check_common(text)?;
        let parts: Vec<&str> = text.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            tokens.push(match *part {
                "*" => Token::One,
                ">" if i + 1 == parts.len() => Token::Rest,
                ">" => return Err(refuse(text, "> may only be the last token")),
                literal if literal.contains(['*', '>']) => {
                    return Err(refuse(text, "wildcards must be whole tokens"));
                }
                literal => Token::Literal(literal.to_string()),
            });
        }
        Ok(SubjectPattern { text: text.to_string(), tokens, matches_parent: false })
    }

    /// An MQTT topic filter (`sensors/+/temp`, `sensors/#`) as a pattern.
    pub fn from_mqtt_filter(filter: &str) -> Result<SubjectPattern, SubjectError> {
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('.') || level.contains(['*', '>']) {
                return Err(refuse(filter, "MQTT levels may not contain . * or >"));
            }
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(refuse(filter, "# must be the whole last level"));
            }
            if level.contains('+') && *level != "+" {
                return Err(refuse(filter, "+ must be a whole level"));
            }
        }
        let matches_parent = levels.len() > 1 && levels.last() == Some(&"#");
        let text: Vec<&str> = levels
            .iter()
            .map(|l| match *l {
                "+" => "*",
                "#" => ">",
                other => other,
            })
            .collect();
        let mut pattern = SubjectPattern::parse(&text.join("."))?;
        pattern.matches_parent = matches_parent;
        Ok(pattern)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// True for an MQTT `x/#` filter, which also matches `x`.
    pub fn matches_parent(&self) -> bool {
        self.matches_parent
    }

    /// True when the pattern has no wildcard.
    pub fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }

    /// Does this pattern match `subject`? (The trie in the engine answers the same question for
    /// many patterns at once; this is the reference it is tested against.)
    pub fn matches(&self, subject: &Subject) -> bool {
        let subject_tokens: Vec<&str> = subject.tokens().collect();
        if self.matches_parent && subject_tokens.len() + 1 == self.tokens.len() {
            let prefix = &self.tokens[..self.tokens.len() - 1];
            if prefix_matches(prefix, &subject_tokens) {
                return true;
            }
        }
        let mut i = 0;
        for token in &self.tokens {
            match token {
                Token::Rest => return i < subject_tokens.len(),
                Token::One => {
                    if i >= subject_tokens.len() {
                        return false;
                    }
                }
                Token::Literal(literal) => {
                    if subject_tokens.get(i) != Some(&literal.as_str()) {
                        return false;
                    }
                }
            }
            i += 1;
        }
        i == subject_tokens.len()
    }
}

fn prefix_matches(pattern: &[Token], subject: &[&str]) -> bool {
    pattern.len() == subject.len()
        && pattern.iter().zip(subject).all(|(p, s)| match p {
            Token::Literal(l) => l == s,
            Token::One => true,
            Token::Rest => false,
        })
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, subject: &str, expected: bool) {
        let p = SubjectPattern::parse(pattern).unwrap();
        let s = Subject::parse(subject).unwrap();
        assert_eq!(p.matches(&s), expected, "{pattern} vs {subject}");
    }

    #[test]
    fn wildcards_match_as_nats_does() {
        check("orders.eu.created", "orders.eu.created", true);
        check("orders.*.created", "orders.eu.created", true);
        check("orders.*", "orders.eu.created", false);
        check("orders.>", "orders.eu.created", true);
        check("orders.>", "orders", false);
        check(">", "a", true);
        check("*.*", "a.b", true);
        check("*.*", "a", false);
    }

    #[test]
    fn bad_subjects_are_refused_with_a_reason() {
        assert!(Subject::parse("").is_err());
        assert!(Subject::parse("a..b").is_err());
        assert!(Subject::parse("a.*").is_err());
        assert!(Subject::parse("a b").is_err());
        assert!(SubjectPattern::parse("a.>.b").is_err());
        assert!(SubjectPattern::parse("a.b*").is_err());
    }

    #[test]
    fn mqtt_filters_map_onto_patterns() {
        let p = SubjectPattern::from_mqtt_filter("sensors/+/temp").unwrap();
        assert_eq!(p.as_str(), "sensors.*.temp");
        let all = SubjectPattern::from_mqtt_filter("sensors/#").unwrap();
        assert!(all.matches(&Subject::from_mqtt_topic("sensors/a/b").unwrap()));
        assert!(all.matches(&Subject::from_mqtt_topic("sensors").unwrap()));
        assert!(SubjectPattern::from_mqtt_filter("a/#/b").is_err());
        assert!(SubjectPattern::from_mqtt_filter("a/b+").is_err());
    }
}
