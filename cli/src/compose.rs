//! The message format shared by `bulksend enqueue --jsonl` and `POST /api/v1/messages`
//! (DESIGN.md's external contract), and its validation. Messages given as parts are built with
//! lettre (Date, Message-ID, MIME and RFC 2047 encoding of non-ASCII text); `raw` messages are
//! taken as they are, after checks.

use std::collections::BTreeMap;

use bulksend_engine::smtp::Address;
use bulksend_queue::NewMessage;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use serde::{Deserialize, Serialize};

/// One message as an ESP sends it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JsonMessage {
    /// Idempotency key (the ESP's own id): the same key twice is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A complete RFC 5322 message; excludes subject/text/html/headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// A bad message, naming the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Headers the builder sets itself; an ESP may not override them through `headers`.
const RESERVED: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// Most recipients in one message (each becomes a queue record).
pub const MAX_RECIPIENTS: usize = 10_000;

impl JsonMessage {
    /// Validates and builds the message for the queue. `max_size` bounds the message octets.
    pub fn build(&self, max_size: usize) -> Result<NewMessage, FieldError> {
        let from = Address::parse(&self.from).map_err(|e| bad("from", e.to_string()))?;
        if self.to.is_empty() {
            return Err(bad("to", "at least one recipient is required"));
        }
        if self.to.len() > MAX_RECIPIENTS {
            return Err(bad("to", format!("more than {MAX_RECIPIENTS} recipients")));
        }
        let mut to = Vec::with_capacity(self.to.len());
        for (i, t) in self.to.iter().enumerate() {
            to.push(Address::parse(t).map_err(|e| bad(format!("to[{i}]"), e.to_string()))?);
        }
        if let Some(key) = &self.id {
            if key.is_empty() || key.len() > 256 || key.chars().any(char::is_control) {
                return Err(bad("id", "must be 1-256 printable characters"));
            }
        }
        let body = match &self.raw {
            Some(raw) => {
                if self.subject.is_some()
                    || self.text.is_some()
                    || self.html.is_some()
                    || !self.headers.is_empty()
                {
                    return Err(bad("raw", "raw excludes subject, text, html and headers"));
                }
                check_raw(raw.as_bytes())?;
                raw.clone().into_bytes()
            }
            None => self.compose(&from, &to)?,
        };
        if body.len() > max_size {
            return Err(bad(
                if self.raw.is_some() { "raw" } else { "text" },
                format!("message is {} bytes; the limit is {max_size}", body.len()),
            ));
        }
        Ok(NewMessage {
            idempotency_key: self.id.clone(),
            sender: from.as_str().to_owned(),
            recipients: to.iter().map(|a| a.as_str().to_owned()).collect(),
            body,
        })
    }

    fn compose(&self, from: &Address, to: &[Address]) -> Result<Vec<u8>, FieldError> {
        let mbox = |a: &Address, field: &str| -> Result<Mailbox, FieldError> {
            a.as_str()
                .parse::<Mailbox>()
                .map_err(|e| bad(field, e.to_string()))
        };
        let mut b = lettre::Message::builder().from(mbox(from, "from")?);
        for (i, t) in to.iter().enumerate() {
            b = b.to(mbox(t, &format!("to[{i}]"))?);
        }
        if let Some(s) = &self.subject {
            if s.contains(['\r', '\n']) {
                return Err(bad("subject", "must not contain CR or LF"));
            }
            b = b.subject(s.clone());
        }
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(bad(field, "set by bulksend; use the matching field"));
            }
            if value.contains(['\r', '\n']) {
                return Err(bad(field, "value must not contain CR or LF"));
            }
            let hn = HeaderName::new_from_ascii(name.clone())
                .map_err(|_| bad(&field, "not a valid header name"))?;
            b = b.raw_header(HeaderValue::new(hn, value.clone()));
        }
        b = b.date_now().message_id(None);
        let msg = match (&self.text, &self.html) {
            (Some(t), Some(h)) => {
                b.multipart(MultiPart::alternative_plain_html(t.clone(), h.clone()))
            }
            (Some(t), None) => b.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(t.clone()),
            ),
            (None, Some(h)) => b.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(h.clone()),
            ),
            (None, None) => return Err(bad("text", "one of text, html or raw is required")),
        }
        .map_err(|e| bad("message", e.to_string()))?;
        Ok(msg.formatted())
    }
}

/// A raw message must at least look like one: header lines, then a blank line.
fn check_raw(raw: &[u8]) -> Result<(), FieldError> {
    if raw.is_empty() {
        return Err(bad("raw", "empty message"));
    }
    let head_end = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .or_else(|| raw.windows(4).position(|w| w == b"\r\n\r\n"));
    let head = &raw[..head_end.unwrap_or(raw.len())];
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let looks_like_header = first
        .iter()
        .position(|&b| b == b':')
        .is_some_and(|i| i > 0 && first[..i].iter().all(|&b| b.is_ascii_graphic()));
    if !looks_like_header {
        return Err(bad("raw", "does not start with a header field"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(json: &str) -> JsonMessage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn builds_with_lettre() {
        let m = parse(
            r#"{"id":"k1","from":"news@esp.test","to":["a@x.test","b@y.test"],"subject":"Grüße","text":"hello","html":"<p>hello</p>","headers":{"X-Campaign":"c42"}}"#,
        )
        .build(1 << 20)
        .unwrap();
        assert_eq!(m.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(m.recipients, vec!["a@x.test", "b@y.test"]);
        let text = String::from_utf8(m.body).unwrap();
        for needle in [
            "Date: ",
            "Message-ID: <",
            "X-Campaign: c42",
            "multipart/alternative",
            "Subject: =?utf-8?",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"from":"nope","to":["a@x.test"],"text":"x"}"#, "from"),
            (r#"{"from":"f@x.test","to":[],"text":"x"}"#, "to"),
            (
                r#"{"from":"f@x.test","to":["a@x.test","bad\r\nRCPT"],"text":"x"}"#,
                "to[1]",
            ),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"subject":"a\r\nBcc: x@y","text":"x"}"#,
                "subject",
            ),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"text":"x","headers":{"X-A":"1\r\nBcc: v@w"}}"#,
                "headers.X-A",
            ),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"text":"x","headers":{"From":"x@y"}}"#,
                "headers.From",
            ),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"text":"x","headers":{"Bad Name":"v"}}"#,
                "headers.Bad Name",
            ),
            (r#"{"from":"f@x.test","to":["a@x.test"]}"#, "text"),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"raw":"no header here"}"#,
                "raw",
            ),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"raw":"Subject: x\n\nbody","text":"x"}"#,
                "raw",
            ),
            (
                r#"{"from":"f@x.test","to":["a@x.test"],"text":"x","id":""}"#,
                "id",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).build(1 << 20).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
        let big = JsonMessage {
            from: "f@x.test".into(),
            to: vec!["a@x.test".into()],
            text: Some("x".repeat(2000)),
            ..JsonMessage::default()
        };
        assert!(big.build(1000).unwrap_err().message.contains("limit"));
        assert!(
            serde_json::from_str::<JsonMessage>(r#"{"from":"f@x.test","to":[],"bogus":1}"#)
                .is_err()
        );
    }

    #[test]
    fn raw_is_kept() {
        let m =
            parse(r#"{"from":"f@x.test","to":["a@x.test"],"raw":"Subject: x\r\n\r\nbody\r\n"}"#)
                .build(1 << 20)
                .unwrap();
        assert_eq!(m.body, b"Subject: x\r\n\r\nbody\r\n");
    }
}
