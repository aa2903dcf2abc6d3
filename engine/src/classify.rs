//! Turns what happened to a recipient (an SMTP reply in a phase, or a session error) into an
//! outcome class that decides what the engine does next (DESIGN.md, "Reply classification").
//!
//! The patterns live in one ordered table ([`BUILTIN`]); operators can put rules of their own in
//! front of it (`[[classify.rules]]` in the config). The mapping from [`RcptResult`] and
//! [`SessionError`] is an exhaustive `match` with no catch-all, so a new error variant forces a
//! decision here.

use bulksend_config::ClassifyRule;

use crate::smtp::{EnhancedStatus, Phase, RcptResult, Reply, SessionError};

/// What the engine does with a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// 2xx after the dot: record, event, metric.
    Delivered,
    /// The address does not exist (5.1.1 and the like): bounce and suppress.
    InvalidRecipient,
    /// Any other permanent failure (policy, content, size, blocklist): bounce.
    Permanent,
    /// Try this recipient again after its back-off.
    Transient,
    /// The receiver is throttling or distrusts us: back off the whole destination; the
    /// recipient goes back to scheduled, not bounced.
    Reputation,
    /// The destination could not be reached or talked to (connect, TLS, timeout, I/O,
    /// garbage before the data): try the next MX, then back off.
    Unreachable,
    /// No reply after the dot: possibly delivered (RFC 5321 §6.1).
    Unknown,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Delivered => "delivered",
            Class::InvalidRecipient => "invalid_recipient",
            Class::Permanent => "permanent",
            Class::Transient => "transient",
            Class::Reputation => "reputation",
            Class::Unreachable => "unreachable",
            Class::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> Option<Class> {
        Some(match s {
            "invalid_recipient" => Class::InvalidRecipient,
            "permanent" => Class::Permanent,
            "transient" => Class::Transient,
            "reputation" => Class::Reputation,
            _ => return None,
        })
    }
}

/// A classified outcome with everything an event or bounce needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    pub class: Class,
    pub phase: Phase,
    pub code: Option<u16>,
    pub enhanced: Option<EnhancedStatus>,
    /// The server's text, or a description of the local error.
    pub text: String,
    /// A permanent failure that also says something about our reputation (a blocklist
    /// rejection): counts as a destination signal although the recipient is bounced.
    pub reputation_signal: bool,
    /// Which rule decided (for events and debugging).
    pub rule: &'static str,
}

impl Classified {
    /// "550 5.1.1 text" or "timeout after 300s in rcpt": the reason in events and bounces.
    pub fn reason(&self) -> String {
        match (self.code, self.enhanced) {
            (Some(c), Some(e)) => format!("{c} {e} {}", self.text),
            (Some(c), None) => format!("{c} {}", self.text),
            _ => self.text.clone(),
        }
    }
}

/// Which replies a rule matches.
#[derive(Clone, Copy, Debug)]
enum Codes {
    Exact(u16),
    Class(u16),
}

/// One row of the table. Every field that is `Some`/non-empty must match.
#[derive(Clone, Debug)]
struct Rule {
    name: &'static str,
    codes: Codes,
    phases: &'static [Phase],
    /// Enhanced status prefix, like "5.1.1" or "4.7".
    enhanced: &'static [&'static str],
    /// Case-insensitive substrings; one suffices. With `enhanced` also given, either matches.
    text: &'static [&'static str],
    class: Class,
    reputation_signal: bool,
}

const ANY_PHASE: &[Phase] = &[];

/// Texts receivers use when they block by reputation or list membership.
const BLOCK_TEXTS: &[&str] = &[
    "blocked using",
    "blocklist",
    "blacklist",
    "spamhaus",
    "spamcop",
    "barracuda",
    "listed at",
    "listed in",
    "dnsbl",
    "poor reputation",
    "reputation",
];

/// The built-in table, checked in order; the first match wins.
const BUILTIN: &[Rule] = &[
    // 421 at any point: the server is closing, usually for load or reputation reasons.
    Rule {
        name: "421-closing",
        codes: Codes::Exact(421),
        phases: ANY_PHASE,
        enhanced: &[],
        text: &[],
        class: Class::Reputation,
        reputation_signal: true,
    },
    // Greylisting is per message and expected: retry that recipient, leave the destination.
    Rule {
        name: "greylist",
        codes: Codes::Class(4),
        phases: ANY_PHASE,
        enhanced: &[],
        text: &["greylist", "graylist", "grey-list"],
        class: Class::Transient,
        reputation_signal: false,
    },
    // "452 4.5.3 Too many recipients" is about this transaction (RFC 5321 §4.5.3.1.10), not
    // about us: retry those recipients, leave the destination alone.
    Rule {
        name: "too-many-recipients",
        codes: Codes::Class(4),
        phases: ANY_PHASE,
        // By code only: "too many recipients this hour" without 4.5.3 is a rate limit.
        enhanced: &["4.5.3"],
        text: &[],
        class: Class::Transient,
        reputation_signal: false,
    },
    Rule {
        name: "4xx-reputation",
        codes: Codes::Class(4),
        phases: ANY_PHASE,
        enhanced: &["4.7"],
        text: &[
            "try again later",
            "rate limit",
            "rate-limit",
            "ratelimit",
            "too many",
            "reputation",
            "throttl",
            "blocked",
            "blocklist",
            "blacklist",
            "spamhaus",
            "temporarily deferred",
            "deferred due to",
            "unusual rate",
        ],
        class: Class::Reputation,
        reputation_signal: true,
    },
    Rule {
        name: "4xx",
        codes: Codes::Class(4),
        phases: ANY_PHASE,
        enhanced: &[],
        text: &[],
        class: Class::Transient,
        reputation_signal: false,
    },
    Rule {
        name: "5xx-unknown-user",
        codes: Codes::Class(5),
        phases: &[Phase::Rcpt],
        enhanced: &["5.1.1", "5.1.0", "5.1.6"],
        text: &[
            "user unknown",
            "unknown user",
            "no such user",
            "mailbox unavailable",
            "mailbox not found",
            "no mailbox",
            "does not exist",
            "doesn't exist",
            "recipient not found",
            "invalid recipient",
            "unknown recipient",
            "not a valid mailbox",
        ],
        class: Class::InvalidRecipient,
        reputation_signal: false,
    },
    // A blocklist rejection names no bad address; bounce, and tell the destination.
    Rule {
        name: "5xx-blocklist",
        codes: Codes::Class(5),
        phases: ANY_PHASE,
        enhanced: &[],
        text: BLOCK_TEXTS,
        class: Class::Permanent,
        reputation_signal: true,
    },
    // With one recipient, a 5.1.1 after the dot also names that recipient (some servers
    // only check after DATA).
    Rule {
        name: "5xx-unknown-user-after-data",
        codes: Codes::Class(5),
        phases: &[Phase::DataDone],
        enhanced: &["5.1.1"],
        text: &[],
        class: Class::InvalidRecipient,
        reputation_signal: false,
    },
    Rule {
        name: "5xx",
        codes: Codes::Class(5),
        phases: ANY_PHASE,
        enhanced: &[],
        text: &[],
        class: Class::Permanent,
        reputation_signal: false,
    },
];

/// Operator rule from the config, compiled.
#[derive(Clone, Debug)]
struct CustomRule {
    class: Class,
    code: Option<Codes>,
    enhanced: Option<String>,
    phase: Option<String>,
    text: Option<String>,
}

/// The classifier: operator rules, then [`BUILTIN`].
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    custom: Vec<CustomRule>,
}

/// Why an operator rule is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("classify.rules[{index}]: {detail}")]
pub struct RuleError {
    pub index: usize,
    pub detail: String,
}

impl Classifier {
    pub fn new(rules: &[ClassifyRule]) -> Result<Classifier, RuleError> {
        let mut custom = Vec::with_capacity(rules.len());
        for (index, r) in rules.iter().enumerate() {
            let err = |detail: String| RuleError { index, detail };
            let class =
                Class::parse(&r.class).ok_or_else(|| err(format!("bad class {:?}", r.class)))?;
            let code = match r.code.as_deref() {
                None => None,
                Some(c) if c.len() == 3 && c.ends_with("xx") => Some(Codes::Class(
                    c[..1].parse().map_err(|_| err(format!("bad code {c:?}")))?,
                )),
                Some(c) => Some(Codes::Exact(
                    c.parse().map_err(|_| err(format!("bad code {c:?}")))?,
                )),
            };
            custom.push(CustomRule {
                class,
                code,
                enhanced: r.enhanced.clone(),
                phase: r.phase.clone(),
                text: r.text.as_ref().map(|t| t.to_lowercase()),
            });
        }
        Ok(Classifier { custom })
    }

    /// Classifies one recipient's result.
    pub fn classify(&self, result: &RcptResult) -> Classified {
        match result {
            RcptResult::Delivered(reply) => {
                from_reply(Class::Delivered, Phase::DataDone, reply, "2xx", false)
            }
            RcptResult::Rejected { phase, reply } | RcptResult::Deferred { phase, reply } => {
                self.reply(*phase, reply)
            }
            RcptResult::Failed(e) => self.error(e, false),
            RcptResult::Unknown(e) => self.error(e, true),
            RcptResult::NotAttempted { reason } => Classified {
                class: Class::Permanent,
                phase: Phase::Mail,
                code: None,
                enhanced: None,
                text: reason.clone(),
                reputation_signal: false,
                rule: "not-attempted",
            },
        }
    }

    /// Classifies a reply (4xx/5xx) received in `phase`.
    pub fn reply(&self, phase: Phase, reply: &Reply) -> Classified {
        // Match on the text without the addresses it echoes: "<marbles@x>" must not read as
        // "rbl", nor "<reputation@x>" as a reputation block.
        let text = strip_addresses(&reply.text()).to_lowercase();
        let enhanced = reply.enhanced.map(|e| e.to_string());
        for r in &self.custom {
            let code_ok = r.code.is_none_or(|c| codes_match(c, reply.code));
            let phase_ok = r.phase.as_deref().is_none_or(|p| p == phase.as_str());
            let enh_ok = r
                .enhanced
                .as_deref()
                .is_none_or(|p| enhanced.as_deref().is_some_and(|e| enhanced_prefix(e, p)));
            let text_ok = r.text.as_deref().is_none_or(|t| text.contains(t));
            if code_ok && phase_ok && enh_ok && text_ok {
                return from_reply(
                    r.class,
                    phase,
                    reply,
                    "custom",
                    r.class == Class::Reputation,
                );
            }
        }
        for r in BUILTIN {
            if !codes_match(r.codes, reply.code) {
                continue;
            }
            if !r.phases.is_empty() && !r.phases.contains(&phase) {
                continue;
            }
            let by_enhanced = !r.enhanced.is_empty()
                && enhanced
                    .as_deref()
                    .is_some_and(|e| r.enhanced.iter().any(|p| enhanced_prefix(e, p)));
            let by_text = !r.text.is_empty() && r.text.iter().any(|t| text.contains(t));
            let unconditional = r.enhanced.is_empty() && r.text.is_empty();
            if unconditional || by_enhanced || by_text {
                return from_reply(r.class, phase, reply, r.name, r.reputation_signal);
            }
        }
        // 2xx/3xx where a failure was expected: treat as a transient oddity.
        from_reply(Class::Transient, phase, reply, "unexpected", false)
    }

    fn error(&self, e: &SessionError, after_dot: bool) -> Classified {
        let (class, rule) = match e {
            _ if after_dot => (Class::Unknown, "no-reply-after-dot"),
            SessionError::ServerClosing { phase, reply } => return self.reply(*phase, reply),
            SessionError::Refused { phase, reply } | SessionError::Unexpected { phase, reply } => {
                return self.reply(*phase, reply)
            }
            SessionError::Connect { .. } => (Class::Unreachable, "connect"),
            SessionError::Timeout { .. } => (Class::Unreachable, "timeout"),
            SessionError::Io { .. } => (Class::Unreachable, "io"),
            SessionError::Closed { .. } => (Class::Unreachable, "closed"),
            SessionError::Protocol { .. } => (Class::Unreachable, "protocol"),
            SessionError::Tls { .. } => (Class::Unreachable, "tls"),
            SessionError::TlsNotOffered => (Class::Unreachable, "tls-not-offered"),
        };
        Classified {
            class,
            phase: e.phase(),
            code: e.reply().map(|r| r.code),
            enhanced: e.reply().and_then(|r| r.enhanced),
            text: e.to_string(),
            reputation_signal: false,
            rule,
        }
    }
}

/// The text with every `<...>` part removed.
fn strip_addresses(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0u32;
    for ch in text.chars() {
        match ch {
            '<' => depth += 1,
            '>' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    out
}

fn codes_match(c: Codes, code: u16) -> bool {
    match c {
        Codes::Exact(x) => x == code,
        Codes::Class(x) => code / 100 == x,
    }
}

/// "5.1.1" matches the prefix "5.1" and "5.1.1" but "5.1.10" does not match "5.1.1".
fn enhanced_prefix(code: &str, prefix: &str) -> bool {
    code == prefix
        || code
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn from_reply(
    class: Class,
    phase: Phase,
    reply: &Reply,
    rule: &'static str,
    signal: bool,
) -> Classified {
    Classified {
        class,
        phase,
        code: Some(reply.code),
        enhanced: reply.enhanced,
        text: reply.text(),
        reputation_signal: signal,
        rule,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn r(code: u16, text: &str) -> Reply {
        Reply::new(code, text)
    }

    /// One row per rule of the table (and then some), with real-world reply texts.
    #[test]
    fn table() {
        let c = Classifier::default();
        let cases: &[(Phase, u16, &str, Class, &str)] = &[
            (Phase::Rcpt, 550, "5.1.1 <x@gmail.com>: The email account that you tried to reach does not exist", Class::InvalidRecipient, "5xx-unknown-user"),
            (Phase::Rcpt, 550, "5.1.1 <x@y>: Recipient address rejected: User unknown in local recipient table", Class::InvalidRecipient, "5xx-unknown-user"),
            (Phase::Rcpt, 550, "No such user here", Class::InvalidRecipient, "5xx-unknown-user"),
            (Phase::Rcpt, 550, "Requested action not taken: mailbox unavailable", Class::InvalidRecipient, "5xx-unknown-user"),
            (Phase::Rcpt, 553, "5.1.0 Address rejected", Class::InvalidRecipient, "5xx-unknown-user"),
            // A policy refusal must never suppress an address.
            (Phase::Rcpt, 554, "5.7.1 <x@y>: Recipient address rejected: Access denied", Class::Permanent, "5xx"),
            (Phase::DataDone, 550, "5.1.1 user unknown", Class::InvalidRecipient, "5xx-unknown-user-after-data"),
            // A 5.1.1 at MAIL is about our sender, not a recipient.
            (Phase::Mail, 550, "5.1.1 sender unknown", Class::Permanent, "5xx"),
            (Phase::Rcpt, 554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", Class::Permanent, "5xx-blocklist"),
            (Phase::Greeting, 554, "mx.test ESMTP not accepting messages from 192.0.2.1: listed at bl.spamcop.net", Class::Permanent, "5xx-blocklist"),
            (Phase::DataDone, 550, "5.7.1 Message rejected as spam", Class::Permanent, "5xx"),
            (Phase::DataDone, 552, "5.3.4 Message size exceeds fixed limit", Class::Permanent, "5xx"),
            (Phase::Rcpt, 421, "4.7.0 Too many connections from your IP", Class::Reputation, "421-closing"),
            (Phase::Rcpt, 450, "4.7.1 Client host rejected: cannot find your hostname", Class::Reputation, "4xx-reputation"),
            (Phase::Mail, 451, "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation", Class::Reputation, "4xx-reputation"),
            (Phase::Rcpt, 452, "Too many recipients received this hour", Class::Reputation, "4xx-reputation"),
            (Phase::DataDone, 421, "4.7.28 Our system has detected an unusual rate of unsolicited mail", Class::Reputation, "421-closing"),
            (Phase::Rcpt, 450, "Throttled, try again later", Class::Reputation, "4xx-reputation"),
            (Phase::Rcpt, 450, "4.2.0 <x@y>: Recipient address rejected: Greylisted, see http://postgrey", Class::Transient, "greylist"),
            (Phase::Rcpt, 451, "4.7.1 Greylisting in action, please come back later", Class::Transient, "greylist"),
            (Phase::Rcpt, 452, "4.2.2 Mailbox full", Class::Transient, "4xx"),
            (Phase::Rcpt, 452, "4.5.3 Error: too many recipients", Class::Transient, "too-many-recipients"),
            // Addresses echoed in the text are not read as block texts.
            (Phase::Rcpt, 550, "5.1.1 <marbles@x.test>: Recipient address rejected: User unknown", Class::InvalidRecipient, "5xx-unknown-user"),
            (Phase::Rcpt, 550, "<reputation@x.test>: no such user", Class::InvalidRecipient, "5xx-unknown-user"),
            (Phase::DataDone, 451, "4.3.0 Error: queue file write error", Class::Transient, "4xx"),
        ];
        for (phase, code, text, class, rule) in cases {
            let got = c.reply(*phase, &r(*code, text));
            assert_eq!(
                (got.class, got.rule),
                (*class, *rule),
                "{code} {text} in {phase}"
            );
        }
    }

    #[test]
    fn results_and_errors() {
        let c = Classifier::default();
        let t = SessionError::Timeout {
            phase: Phase::DataDone,
            after: Duration::from_secs(600),
        };
        assert_eq!(
            c.classify(&RcptResult::Unknown(t.clone())).class,
            Class::Unknown
        );
        assert_eq!(c.classify(&RcptResult::Failed(t)).class, Class::Unreachable);
        let closing = SessionError::ServerClosing {
            phase: Phase::Mail,
            reply: r(421, "4.3.2 shutting down"),
        };
        assert_eq!(
            c.classify(&RcptResult::Failed(closing)).class,
            Class::Reputation
        );
        let d = c.classify(&RcptResult::Delivered(r(250, "2.0.0 Ok: queued as ABC")));
        assert_eq!(d.class, Class::Delivered);
        assert_eq!(d.reason(), "250 2.0.0 Ok: queued as ABC");
        assert_eq!(
            c.classify(&RcptResult::NotAttempted {
                reason: "too big".into()
            })
            .class,
            Class::Permanent
        );
        let refused = c.classify(&RcptResult::Failed(SessionError::Connect {
            peer: "127.0.0.1:25".parse().unwrap(),
            detail: "refused".into(),
        }));
        assert_eq!(
            (refused.class, refused.phase),
            (Class::Unreachable, Phase::Connect)
        );
    }

    #[test]
    fn operator_rules_come_first() {
        let rules = vec![
            ClassifyRule {
                class: "reputation".into(),
                code: Some("5xx".into()),
                text: Some("policy violation 17".into()),
                ..ClassifyRule::default()
            },
            ClassifyRule {
                class: "invalid_recipient".into(),
                code: Some("550".into()),
                enhanced: Some("5.2".into()),
                phase: Some("rcpt".into()),
                ..ClassifyRule::default()
            },
        ];
        let c = Classifier::new(&rules).unwrap();
        assert_eq!(
            c.reply(Phase::Rcpt, &r(554, "Policy Violation 17")).class,
            Class::Reputation
        );
        assert_eq!(
            c.reply(Phase::Rcpt, &r(550, "5.2.1 mailbox disabled"))
                .class,
            Class::InvalidRecipient
        );
        // Not matching the phase: built-in table.
        assert_eq!(
            c.reply(Phase::DataDone, &r(550, "5.2.1 mailbox disabled"))
                .class,
            Class::Permanent
        );
        let bad = Classifier::new(&[ClassifyRule {
            class: "meh".into(),
            ..ClassifyRule::default()
        }]);
        assert_eq!(bad.unwrap_err().index, 0);
    }

    #[test]
    fn enhanced_prefixes() {
        assert!(enhanced_prefix("5.1.1", "5.1"));
        assert!(enhanced_prefix("5.1.1", "5.1.1"));
        assert!(!enhanced_prefix("5.1.10", "5.1.1"));
        assert!(!enhanced_prefix("5.11.1", "5.1"));
    }
}
