//! ESMTP service extensions advertised in the EHLO reply (RFC 5321 §4.1.1.1).

use super::reply::Reply;

/// The extensions bulksend acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920: the client may send MAIL, RCPT… and DATA in one write.
    pub pipelining: bool,
    /// RFC 1870: `Some(0)` means "SIZE without a limit"; `None` means not advertised.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    pub chunking: bool,
}

impl Extensions {
    /// From a 250 reply to EHLO; the first line is the server's greeting, not an extension.
    pub fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                "CHUNKING" => ext.chunking = true,
                _ => {}
            }
        }
        ext
    }

    /// The server's size limit, if it has one.
    pub fn size_limit(&self) -> Option<u64> {
        self.size.filter(|&n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::smtp::reply::{parse_reply, Parsed};

    fn ehlo(text: &str) -> Extensions {
        let Parsed::Reply(r, _) = parse_reply(text.as_bytes()).unwrap() else {
            panic!()
        };
        Extensions::from_ehlo(&r)
    }

    #[test]
    fn postfix_ehlo() {
        let e = ehlo(
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n\
             250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n\
             250-SMTPUTF8\r\n250 CHUNKING\r\n",
        );
        assert_eq!(
            e,
            Extensions {
                pipelining: true,
                size: Some(10_240_000),
                eight_bit_mime: true,
                smtputf8: true,
                starttls: true,
                enhanced_status_codes: true,
                chunking: true,
            }
        );
        assert_eq!(e.size_limit(), Some(10_240_000));
    }

    #[test]
    fn minimal_and_odd() {
        assert_eq!(ehlo("250 mx.test\r\n"), Extensions::default());
        let e = ehlo("250-PIPELINING is the greeting\r\n250-size\r\n250 pipelining\r\n");
        assert!(e.pipelining, "keywords are case-insensitive");
        assert_eq!(e.size, Some(0));
        assert_eq!(e.size_limit(), None);
    }
}
