//! Client commands, their encoding, the phase each belongs to, and mailbox validation.
//!
//! Addresses are validated before they can become a [`Command`], so no CR, LF, NUL, space or
//! angle bracket from an ESP's input can ever reach the wire as an injected command.

use std::fmt;
use std::time::Duration;

use bulksend_config::Timeouts;

/// The phase of an SMTP session. Every timeout, error and rejection names one, because what a
/// rejection means depends on where it happened (see DESIGN.md, "Reply classification").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    Mail,
    Rcpt,
    DataInit,
    DataBlock,
    /// Awaiting the reply after the final dot.
    DataDone,
    Rset,
    Quit,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::Ehlo => "ehlo",
            Phase::StartTls => "starttls",
            Phase::Mail => "mail",
            Phase::Rcpt => "rcpt",
            Phase::DataInit => "data_init",
            Phase::DataBlock => "data_block",
            Phase::DataDone => "data_done",
            Phase::Rset => "rset",
            Phase::Quit => "quit",
        }
    }

    /// The configured timeout for this phase (RFC 5321 §4.5.3.2).
    pub fn timeout(self, t: &Timeouts) -> Duration {
        match self {
            Phase::Connect => t.connect,
            Phase::Greeting => t.greeting,
            Phase::Ehlo => t.ehlo,
            Phase::StartTls => t.starttls,
            Phase::Mail => t.mail,
            Phase::Rcpt => t.rcpt,
            Phase::DataInit => t.data_init,
            Phase::DataBlock => t.data_block,
            Phase::DataDone => t.data_done,
            Phase::Rset => t.rset,
            Phase::Quit => t.quit,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest mailbox accepted (RFC 5321 §4.5.3.1.3: path 256 octets including the brackets).
pub const MAX_ADDRESS_LEN: usize = 254;

/// Why an address was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address is longer than {MAX_ADDRESS_LEN} octets")]
    TooLong,
    #[error("address contains a control character, space or angle bracket")]
    ForbiddenCharacter,
    #[error("address has no '@' or an empty local part or domain")]
    NotAMailbox,
    #[error("address domain {0:?} is not a valid hostname or address literal")]
    BadDomain(String),
}

/// A validated mailbox `local@domain`, safe to put in MAIL FROM / RCPT TO.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(String);

impl Address {
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        let s = s.trim();
        let s = s
            .strip_prefix('<')
            .and_then(|s| s.strip_suffix('>'))
            .unwrap_or(s);
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if s.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        if s.chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>')
        {
            return Err(AddressError::ForbiddenCharacter);
        }
        let (local, domain) = s.rsplit_once('@').ok_or(AddressError::NotAMailbox)?;
        if local.is_empty() || domain.is_empty() || local.len() > 64 {
            return Err(AddressError::NotAMailbox);
        }
        if !valid_domain(domain) {
            return Err(AddressError::BadDomain(domain.to_owned()));
        }
        Ok(Address(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The domain, lowercased: the routing key.
    pub fn domain(&self) -> String {
        self.0
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// Needs the SMTPUTF8 extension (RFC 6531) to be sent.
    pub fn is_utf8(&self) -> bool {
        !self.0.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_domain(d: &str) -> bool {
    if let Some(lit) = d.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return lit.parse::<std::net::Ipv4Addr>().is_ok()
            || lit
                .strip_prefix("IPv6:")
                .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

/// MAIL FROM parameters chosen from the server's extensions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// SIZE= (RFC 1870), when the server advertised SIZE.
    pub size: Option<usize>,
    /// BODY=8BITMIME (RFC 6152), when the body has 8-bit octets and the server offers it.
    pub eight_bit: bool,
    /// SMTPUTF8 (RFC 6531), when an address needs it.
    pub smtputf8: bool,
}

/// A client command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    /// `None` is the null reverse-path `<>` (bounces).
    MailFrom(Option<Address>, MailParams),
    RcptTo(Address),
    Data,
    Rset,
    Quit,
}

impl Command {
    /// The phase whose timeout applies to this command's reply.
    pub fn phase(&self) -> Phase {
        match self {
            Command::Ehlo(_) | Command::Helo(_) => Phase::Ehlo,
            Command::StartTls => Phase::StartTls,
            Command::MailFrom(..) => Phase::Mail,
            Command::RcptTo(_) => Phase::Rcpt,
            Command::Data => Phase::DataInit,
            Command::Rset => Phase::Rset,
            Command::Quit => Phase::Quit,
        }
    }

    /// Appends the wire form, CRLF included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Command::Ehlo(name) => push(out, &["EHLO ", name]),
            Command::Helo(name) => push(out, &["HELO ", name]),
            Command::StartTls => push(out, &["STARTTLS"]),
            Command::MailFrom(from, params) => {
                push(
                    out,
                    &["MAIL FROM:<", from.as_ref().map_or("", |a| a.as_str()), ">"],
                );
                if let Some(size) = params.size {
                    push(out, &[" SIZE=", &size.to_string()]);
                }
                if params.eight_bit {
                    push(out, &[" BODY=8BITMIME"]);
                }
                if params.smtputf8 {
                    push(out, &[" SMTPUTF8"]);
                }
            }
            Command::RcptTo(to) => push(out, &["RCPT TO:<", to.as_str(), ">"]),
            Command::Data => push(out, &["DATA"]),
            Command::Rset => push(out, &["RSET"]),
            Command::Quit => push(out, &["QUIT"]),
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn push(out: &mut Vec<u8>, parts: &[&str]) {
    for p in parts {
        out.extend_from_slice(p.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn enc(c: Command) -> String {
        let mut v = Vec::new();
        c.encode(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn encodes() {
        let a = Address::parse("a@b.test").unwrap();
        assert_eq!(enc(Command::Ehlo("mta.test".into())), "EHLO mta.test\r\n");
        assert_eq!(
            enc(Command::MailFrom(Some(a.clone()), MailParams::default())),
            "MAIL FROM:<a@b.test>\r\n"
        );
        assert_eq!(
            enc(Command::MailFrom(
                None,
                MailParams {
                    size: Some(1234),
                    eight_bit: true,
                    smtputf8: true
                }
            )),
            "MAIL FROM:<> SIZE=1234 BODY=8BITMIME SMTPUTF8\r\n"
        );
        assert_eq!(enc(Command::RcptTo(a)), "RCPT TO:<a@b.test>\r\n");
        assert_eq!(enc(Command::Quit), "QUIT\r\n");
    }

    #[test]
    fn addresses() {
        for ok in [
            "a@b.test",
            "<a@b.test>",
            "first.last+tag@sub.example.co.uk",
            "x@[127.0.0.1]",
            "x@[IPv6:::1]",
            "用户@例子.测试",
            "a@b.test.",
        ] {
            assert!(Address::parse(ok).is_ok(), "{ok}");
        }
        let bad: &[(&str, AddressError)] = &[
            ("", AddressError::Empty),
            (
                "a@b.test\r\nRCPT TO:<x@y>",
                AddressError::ForbiddenCharacter,
            ),
            ("a b@c.test", AddressError::ForbiddenCharacter),
            ("a\0@c.test", AddressError::ForbiddenCharacter),
            ("a>@c.test", AddressError::ForbiddenCharacter),
            ("nobody", AddressError::NotAMailbox),
            ("@c.test", AddressError::NotAMailbox),
            ("a@", AddressError::NotAMailbox),
            ("a@-bad-.test", AddressError::BadDomain("-bad-.test".into())),
            ("a@b..test", AddressError::BadDomain("b..test".into())),
            (
                "a@[999.1.1.1]",
                AddressError::BadDomain("[999.1.1.1]".into()),
            ),
        ];
        for (input, want) in bad {
            assert_eq!(
                Address::parse(input).as_ref().err(),
                Some(want),
                "{input:?}"
            );
        }
        assert_eq!(
            Address::parse(&format!("{}@b.test", "a".repeat(65))),
            Err(AddressError::NotAMailbox)
        );
        assert_eq!(
            Address::parse(&format!("a@{}.test", "b.".repeat(130))),
            Err(AddressError::TooLong)
        );
        // Surrounding whitespace is trimmed; an interior line break is never accepted.
        assert_eq!(
            Address::parse(" a@b.test\r\n").unwrap().as_str(),
            "a@b.test"
        );
        assert_eq!(
            Address::parse("A@Example.TEST").unwrap().domain(),
            "example.test"
        );
    }
}
