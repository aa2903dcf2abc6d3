//! Message data as it goes on the wire after DATA (RFC 5321 §4.1.1.4, §4.5.2).
//!
//! [`prepare`] makes one pass over the message and:
//! - normalises every line ending to CRLF: a bare LF and a bare CR each become CRLF, so no
//!   `<LF>.<CR><LF>` or similar sequence from an ESP's input can end the data early on a
//!   lenient server ("SMTP smuggling");
//! - dot-stuffs lines that start with '.' (§4.5.2);
//! - refuses lines longer than 998 octets (§4.5.3.1.6) rather than silently breaking headers
//!   or MIME structure (an ESP should encode such content, e.g. quoted-printable);
//! - ends the data with CRLF `.` CRLF.
//!
//! The result is computed once per message and reused for every transaction that carries it.

/// Longest text line, excluding CRLF (RFC 5321 §4.5.3.1.6).
pub const MAX_LINE: usize = 998;

/// Why a message cannot be sent as it is. Permanent: retrying will not change it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("line {line} is {len} octets long; SMTP allows {MAX_LINE}")]
    LineTooLong { line: usize, len: usize },
    #[error("message is {size} octets; the limit is {max}")]
    TooLarge { size: usize, max: usize },
}

/// A message ready for the DATA phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageData {
    /// Normalised, dot-stuffed, terminated with `.\r\n`.
    pub wire: Vec<u8>,
    /// Octets of the normalised message before stuffing: the SIZE= value (RFC 1870 §3).
    pub size: usize,
    /// Has octets above 127 (then BODY=8BITMIME is declared when the server offers it).
    pub eight_bit: bool,
}

/// Normalises, checks and stuffs `body`. `max_size` bounds the normalised size.
pub fn prepare(body: &[u8], max_size: usize) -> Result<MessageData, DataError> {
    // A line at a time: `memchr2` finds the next line end, whole lines are copied. The
    // byte-at-a-time loop this replaced took ~31 µs per 20 KB of text (~1.5 ns per byte),
    // against ~5 µs now, a large share of the CPU per 20 KB message (BENCHMARKS.md, "Fourth session"); `reference` in the tests is that loop,
    // and a property test checks that both agree.
    let mut wire = Vec::with_capacity(body.len() + body.len() / 64 + 8);
    let mut size = 0usize;
    let mut line_no = 1usize;
    let mut eight_bit = false;
    let mut rest = body;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr2(b'\r', b'\n', rest) {
            // CRLF, bare CR and bare LF all end a line.
            Some(p) if rest[p] == b'\r' && rest.get(p + 1) == Some(&b'\n') => (&rest[..p], p + 2),
            Some(p) => (&rest[..p], p + 1),
            None => (rest, rest.len()),
        };
        if line.len() > MAX_LINE {
            return Err(DataError::LineTooLong {
                line: line_no,
                len: line.len(),
            });
        }
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        eight_bit |= !line.is_ascii();
        wire.extend_from_slice(line);
        wire.extend_from_slice(b"\r\n");
        size += line.len() + 2;
        line_no += 1;
        rest = &rest[next..];
    }
    finish(wire, size, eight_bit, max_size)
}

/// Checks the normalised size and appends the terminator.
fn finish(
    mut wire: Vec<u8>,
    size: usize,
    eight_bit: bool,
    max_size: usize,
) -> Result<MessageData, DataError> {
    if size > max_size {
        return Err(DataError::TooLarge {
            size,
            max: max_size,
        });
    }
    wire.extend_from_slice(b".\r\n");
    Ok(MessageData {
        wire,
        size,
        eight_bit,
    })
}

/// The inverse of the stuffing, as a receiver does it (RFC 5321 §4.5.2): strips the final
/// `.\r\n` and one leading '.' from each line. Returns `None` if the terminator is missing.
pub fn unstuff(wire: &[u8]) -> Option<Vec<u8>> {
    let body = if wire == b".\r\n" {
        &[][..]
    } else {
        wire.strip_suffix(b"\r\n.\r\n")
            .map(|b| &wire[..b.len() + 2])?
    };
    let mut out = Vec::with_capacity(body.len());
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            at_line_start = false;
            continue;
        }
        at_line_start = b == b'\n';
        out.push(b);
    }
    Some(out)
}

/// What a receiver sees: `body` with every line ending normalised to CRLF and a final CRLF.
pub fn normalise(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 2);
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\r' | b'\n' => {
                if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
            }
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// The byte-at-a-time loop `prepare` had before: the reference it must agree with (the
    /// size check and terminator, `finish`, are shared; `size_limit` and `table` test them).
    fn reference(body: &[u8], max_size: usize) -> Result<MessageData, DataError> {
        let mut wire = Vec::with_capacity(body.len() + body.len() / 64 + 8);
        let mut size = 0usize;
        let mut line_len = 0usize;
        let mut line_no = 1usize;
        let mut eight_bit = false;
        let mut i = 0;
        while i < body.len() {
            let b = body[i];
            match b {
                b'\r' | b'\n' => {
                    // CRLF, bare CR and bare LF all end a line.
                    if b == b'\r' && body.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                    wire.extend_from_slice(b"\r\n");
                    size += 2;
                    line_len = 0;
                    line_no += 1;
                }
                _ => {
                    if line_len == 0 && b == b'.' {
                        wire.push(b'.');
                    }
                    line_len += 1;
                    if line_len > MAX_LINE {
                        let len = line_len + memchr_line_rest(&body[i + 1..]);
                        return Err(DataError::LineTooLong { line: line_no, len });
                    }
                    eight_bit |= b >= 0x80;
                    wire.push(b);
                    size += 1;
                }
            }
            i += 1;
        }
        if line_len > 0 {
            wire.extend_from_slice(b"\r\n");
            size += 2;
        }
        finish(wire, size, eight_bit, max_size)
    }

    fn memchr_line_rest(rest: &[u8]) -> usize {
        rest.iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(rest.len())
    }

    fn wire(body: &str) -> String {
        String::from_utf8(prepare(body.as_bytes(), usize::MAX).unwrap().wire).unwrap()
    }

    #[test]
    fn table() {
        let cases = [
            ("", ".\r\n"),
            ("a", "a\r\n.\r\n"),
            ("a\r\n", "a\r\n.\r\n"),
            ("a\nb\n", "a\r\nb\r\n.\r\n"),
            ("a\rb", "a\r\nb\r\n.\r\n"),
            (".", "..\r\n.\r\n"),
            ("x\r\n.\r\ny", "x\r\n..\r\ny\r\n.\r\n"),
            ("..hidden\r\n", "...hidden\r\n.\r\n"),
            ("mid.dot\r\n", "mid.dot\r\n.\r\n"),
            // Smuggling attempts: bare-LF dot lines become stuffed CRLF lines.
            (
                "a\n.\nMAIL FROM:<x@y>\n",
                "a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n",
            ),
            ("a\r\n.\nb", "a\r\n..\r\nb\r\n.\r\n"),
            ("a\r.\rb", "a\r\n..\r\nb\r\n.\r\n"),
        ];
        for (body, want) in cases {
            assert_eq!(wire(body), want, "{body:?}");
        }
    }

    #[test]
    fn size_and_eight_bit() {
        let d = prepare("héllo\n.x\n".as_bytes(), usize::MAX).unwrap();
        assert!(d.eight_bit);
        assert_eq!(d.size, normalise("héllo\n.x\n".as_bytes()).len());
        assert!(!prepare(b"plain", 100).unwrap().eight_bit);
    }

    #[test]
    fn line_limit() {
        let ok = "a".repeat(MAX_LINE);
        assert!(prepare(ok.as_bytes(), usize::MAX).is_ok());
        let long = format!("Subject: x\r\n{}\r\nnext", "b".repeat(MAX_LINE + 5));
        assert_eq!(
            prepare(long.as_bytes(), usize::MAX),
            Err(DataError::LineTooLong {
                line: 2,
                len: MAX_LINE + 5
            })
        );
    }

    #[test]
    fn size_limit() {
        assert_eq!(
            prepare(b"0123456789", 5),
            Err(DataError::TooLarge { size: 12, max: 5 })
        );
    }

    proptest! {
        #[test]
        fn stuffing_round_trips(body in proptest::collection::vec(
            prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..600)) {
            let d = prepare(&body, usize::MAX).unwrap();
            // The wire form never contains a bare CR or LF.
            for (i, &b) in d.wire.iter().enumerate() {
                if b == b'\n' { prop_assert!(i > 0 && d.wire[i - 1] == b'\r'); }
                if b == b'\r' { prop_assert_eq!(d.wire.get(i + 1), Some(&b'\n')); }
            }
            // The terminator appears only at the end.
            let body_part = &d.wire[..d.wire.len() - 3];
            prop_assert!(!body_part.windows(5).any(|w| w == b"\r\n.\r\n"));
            prop_assert!(!body_part.starts_with(b".\r\n"));
            prop_assert_eq!(unstuff(&d.wire).unwrap(), normalise(&body));
            prop_assert_eq!(d.size, normalise(&body).len());
        }

        #[test]
        fn same_result_as_the_byte_at_a_time_reference(
            body in proptest::collection::vec(
                prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(0x80u8), any::<u8>()],
                0..3000,
            ),
            max in prop_oneof![Just(usize::MAX), 0usize..3000],
        ) {
            prop_assert_eq!(prepare(&body, max), reference(&body, max));
        }

        #[test]
        fn long_lines_are_reported_like_the_reference(
            len in (MAX_LINE - 2)..(MAX_LINE + 3),
            before in "[a-z\r\n]{0,10}",
            after in "[a-z\r\n]{0,10}",
        ) {
            let body = format!("{before}\n{}{after}", "x".repeat(len));
            prop_assert_eq!(
                prepare(body.as_bytes(), usize::MAX),
                reference(body.as_bytes(), usize::MAX)
            );
        }

        #[test]
        fn text_bodies_round_trip(lines in proptest::collection::vec("[.a-z ]{0,20}", 0..20)) {
            let body = lines.iter().map(|l| format!("{l}\r\n")).collect::<String>();
            let d = prepare(body.as_bytes(), usize::MAX).unwrap();
            prop_assert_eq!(unstuff(&d.wire).unwrap(), body.into_bytes());
        }
    }
}
