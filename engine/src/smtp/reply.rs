//! SMTP replies (RFC 5321 §4.2) and enhanced status codes (RFC 3463), parsed incrementally.
//!
//! The parser takes whatever bytes have arrived and returns either a whole reply with the number
//! of bytes it used, "need more", or a typed [`ReplyError`]. It never panics on any input (a
//! property test feeds it arbitrary bytes) and bounds what it buffers, so a server that sends
//! garbage or an endless line gets an error, not unbounded memory.

use std::fmt;

/// Longest reply line accepted, in octets including CRLF. RFC 5321 §4.5.3.1.5 sets 512; real
/// servers exceed it (long policy URLs), so allow some slack before calling it garbage.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply (EHLO replies have a few dozen at most).
pub const MAX_REPLY_LINES: usize = 256;

/// An enhanced mail system status code, `class.subject.detail` (RFC 3463 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    /// 2 = success, 4 = persistent transient failure, 5 = permanent failure.
    pub class: u8,
    /// 0 other, 1 addressing, 2 mailbox, 3 mail system, 4 network/routing, 5 protocol,
    /// 6 content, 7 security/policy.
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedStatus {
    /// Parses `c.s.d` at the start of `text` (followed by a space or the end). Returns the code
    /// and the rest of the text.
    pub fn parse_prefix(text: &str) -> Option<(EnhancedStatus, &str)> {
        let end = text.find(' ').unwrap_or(text.len());
        let mut parts = text[..end].split('.');
        let class: u8 = parse_digits(parts.next()?, 1)?;
        let subject: u16 = parse_digits(parts.next()?, 3)?;
        let detail: u16 = parse_digits(parts.next()?, 3)?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        let rest = text[end..].trim_start_matches(' ');
        Some((
            EnhancedStatus {
                class,
                subject,
                detail,
            },
            rest,
        ))
    }
}

fn parse_digits<T: std::str::FromStr>(s: &str, max_len: usize) -> Option<T> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// A complete (possibly multi-line) reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code, 200..=599.
    pub code: u16,
    /// From the first line, when it starts with one whose class matches the code.
    pub enhanced: Option<EnhancedStatus>,
    /// The text of every line without code, separator and enhanced code.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, text: &str) -> Reply {
        let (enhanced, text) = match EnhancedStatus::parse_prefix(text) {
            Some((e, rest)) if u16::from(e.class) == code / 100 => (Some(e), rest),
            _ => (None, text),
        };
        Reply {
            code,
            enhanced,
            lines: vec![text.to_owned()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// 421: the server is closing the transmission channel (RFC 5321 §3.8).
    pub fn is_closing(&self) -> bool {
        self.code == 421
    }

    /// All lines joined with a space: what goes into bounce reasons and events.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        let text = self.text();
        if !text.is_empty() {
            write!(f, " {text}")?;
        }
        Ok(())
    }
}

/// What is wrong with the bytes a server sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line does not start with a 3-digit code: {0:?}")]
    BadCode(String),
    #[error("reply code {0} out of range 200..=599")]
    CodeOutOfRange(u16),
    #[error("bad separator after reply code in {0:?}")]
    BadSeparator(String),
    #[error("multi-line reply changed code from {first} to {line}")]
    CodeChanged { first: u16, line: u16 },
    #[error("reply line longer than {MAX_REPLY_LINE} octets")]
    LineTooLong,
    #[error("reply has more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
}

/// Result of one parse attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole reply, and how many bytes of the input it used.
    Reply(Reply, usize),
    /// Not enough bytes yet; call again with more.
    Incomplete,
}

/// Parses one reply from the start of `buf`. Stateless: on `Incomplete`, call again with the
/// same bytes plus more (the caller keeps the buffer). Lines end in CRLF; a bare LF is
/// tolerated because some servers send it.
pub fn parse_reply(buf: &[u8]) -> Result<Parsed, ReplyError> {
    let mut pos = 0;
    let mut first_code = None;
    let mut enhanced = None;
    let mut lines = Vec::new();
    loop {
        let rest = &buf[pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong);
            }
            return Ok(Parsed::Incomplete);
        };
        if nl + 1 > MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        let raw = &rest[..nl];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        pos += nl + 1;
        let line = String::from_utf8_lossy(raw);
        let (code, last, text) = split_line(&line)?;
        match first_code {
            None => {
                first_code = Some(code);
                let (e, text) = match EnhancedStatus::parse_prefix(text) {
                    Some((e, rest)) if u16::from(e.class) == code / 100 => (Some(e), rest),
                    _ => (None, text),
                };
                enhanced = e;
                lines.push(text.to_owned());
            }
            Some(first) if first != code => {
                return Err(ReplyError::CodeChanged { first, line: code });
            }
            Some(_) => {
                // Continuation lines often repeat the enhanced code; drop it from the text.
                let text = match (enhanced, EnhancedStatus::parse_prefix(text)) {
                    (Some(e), Some((e2, rest))) if e == e2 => rest,
                    _ => text,
                };
                lines.push(text.to_owned());
            }
        }
        if lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        if last {
            let code = first_code.unwrap_or(code);
            return Ok(Parsed::Reply(
                Reply {
                    code,
                    enhanced,
                    lines,
                },
                pos,
            ));
        }
    }
}

/// Splits `250-text` / `250 text` / `250` into (code, is_last_line, text).
fn split_line(line: &str) -> Result<(u16, bool, &str), ReplyError> {
    let bytes = line.as_bytes();
    if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
        return Err(ReplyError::BadCode(truncate(line)));
    }
    let code = u16::from(bytes[0] - b'0') * 100
        + u16::from(bytes[1] - b'0') * 10
        + u16::from(bytes[2] - b'0');
    if !(200..=599).contains(&code) {
        return Err(ReplyError::CodeOutOfRange(code));
    }
    match bytes.get(3) {
        None => Ok((code, true, "")),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(ReplyError::BadSeparator(truncate(line))),
    }
}

fn truncate(line: &str) -> String {
    line.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn one(input: &str) -> (Reply, usize) {
        match parse_reply(input.as_bytes()).unwrap() {
            Parsed::Reply(r, n) => (r, n),
            Parsed::Incomplete => panic!("incomplete: {input:?}"),
        }
    }

    #[test]
    fn table() {
        // (input, code, enhanced, lines)
        let cases: &[(&str, u16, Option<&str>, &[&str])] = &[
            ("220 mx.test ESMTP\r\n", 220, None, &["mx.test ESMTP"]),
            ("250 2.1.0 Ok\r\n", 250, Some("2.1.0"), &["Ok"]),
            ("250\r\n", 250, None, &[""]),
            ("550 5.1.1 <a@b>: Recipient address rejected: User unknown\r\n", 550, Some("5.1.1"),
                &["<a@b>: Recipient address rejected: User unknown"]),
            ("250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n", 250, None,
                &["mx.test", "PIPELINING", "SIZE 10240000", "8BITMIME"]),
            ("421 4.7.0 Try again later\n", 421, Some("4.7.0"), &["Try again later"]),
            // Class must match the code's first digit, else the text is kept whole.
            ("550 2.0.0 odd\r\n", 550, None, &["2.0.0 odd"]),
            // Continuation lines that repeat the enhanced code lose it.
            ("451-4.7.1 first\r\n451 4.7.1 second\r\n", 451, Some("4.7.1"), &["first", "second"]),
            ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org\r\n",
                554, Some("5.7.1"), &["Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"]),
        ];
        for (input, code, enhanced, lines) in cases {
            let (reply, used) = one(input);
            assert_eq!(used, input.len(), "{input:?}");
            assert_eq!(reply.code, *code, "{input:?}");
            assert_eq!(
                reply.enhanced.map(|e| e.to_string()).as_deref(),
                *enhanced,
                "{input:?}"
            );
            assert_eq!(reply.lines, *lines, "{input:?}");
        }
    }

    #[test]
    fn incomplete_until_the_last_line() {
        assert_eq!(parse_reply(b"").unwrap(), Parsed::Incomplete);
        assert_eq!(parse_reply(b"250-a\r\n250-b").unwrap(), Parsed::Incomplete);
        assert_eq!(parse_reply(b"250-a\r\n").unwrap(), Parsed::Incomplete);
        assert_eq!(parse_reply(b"250 a").unwrap(), Parsed::Incomplete);
    }

    #[test]
    fn consumes_one_reply_of_several() {
        let input = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n";
        let (r1, n1) = match parse_reply(input).unwrap() {
            Parsed::Reply(r, n) => (r, n),
            Parsed::Incomplete => unreachable!(),
        };
        assert_eq!((r1.code, n1), (250, 14));
        let Parsed::Reply(r3, _) = parse_reply(&input[28..]).unwrap() else {
            panic!()
        };
        assert_eq!(r3.code, 354);
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(matches!(
            parse_reply(b"HTTP/1.1 400 Bad\r\n"),
            Err(ReplyError::BadCode(_))
        ));
        assert!(matches!(
            parse_reply(b"25\r\n"),
            Err(ReplyError::BadCode(_))
        ));
        assert!(matches!(
            parse_reply(b"999 x\r\n"),
            Err(ReplyError::CodeOutOfRange(999))
        ));
        assert!(matches!(
            parse_reply(b"100 x\r\n"),
            Err(ReplyError::CodeOutOfRange(100))
        ));
        assert!(matches!(
            parse_reply(b"250_x\r\n"),
            Err(ReplyError::BadSeparator(_))
        ));
        assert!(matches!(
            parse_reply(b"250-a\r\n550 b\r\n"),
            Err(ReplyError::CodeChanged {
                first: 250,
                line: 550
            })
        ));
        assert!(matches!(
            parse_reply(&vec![b'2'; MAX_REPLY_LINE + 1]),
            Err(ReplyError::LineTooLong)
        ));
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert!(matches!(
            parse_reply(many.as_bytes()),
            Err(ReplyError::TooManyLines)
        ));
    }

    #[test]
    fn enhanced_prefix_rules() {
        assert!(EnhancedStatus::parse_prefix("5.1.1 x").is_some());
        assert!(EnhancedStatus::parse_prefix("4.7.650 x").is_some());
        assert!(EnhancedStatus::parse_prefix("3.1.1 x").is_none());
        assert!(EnhancedStatus::parse_prefix("5.1 x").is_none());
        assert!(EnhancedStatus::parse_prefix("5.1.1.1 x").is_none());
        assert!(EnhancedStatus::parse_prefix("5.1000.1 x").is_none());
        assert!(EnhancedStatus::parse_prefix("Ok").is_none());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_reply(&input);
        }

        #[test]
        fn never_panics_on_reply_like_lines(lines in proptest::collection::vec("[0-9]{0,4}[ -_]?[ -~]{0,40}", 0..8)) {
            let input = lines.join("\r\n");
            if let Ok(Parsed::Reply(_, used)) = parse_reply(input.as_bytes()) {
                prop_assert!(used <= input.len());
            }
        }

        #[test]
        fn well_formed_replies_round_trip(code in 200u16..600, texts in proptest::collection::vec("[ -~]{0,60}", 1..6)) {
            let mut input = String::new();
            for (i, t) in texts.iter().enumerate() {
                let sep = if i + 1 == texts.len() { ' ' } else { '-' };
                input.push_str(&format!("{code}{sep}{t}\r\n"));
            }
            let Parsed::Reply(reply, used) = parse_reply(input.as_bytes()).unwrap() else {
                panic!("incomplete");
            };
            prop_assert_eq!(used, input.len());
            prop_assert_eq!(reply.code, code);
            prop_assert_eq!(reply.lines.len(), texts.len());
        }
    }
}
