//! A blocking client for the injection API (`bulksend enqueue --server URL`).
//!
//! It speaks the same JSON as [`crate::api`]: the receipts it reads are the type the server
//! writes. Errors keep apart what an operator has to do differently: the server is not
//! reachable (wrong URL, not running), the server refused the request (its JSON error, with the
//! field at fault), or the reply is not what a bulksend server sends.

use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::compose::JsonMessage;

/// Time to establish the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole request, including the server's durable commit of the batch.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The server's answer for one stored message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The queue's message id (16 hex digits).
    pub id: String,
    /// The idempotency key was seen before; `id` is the first message's, nothing was stored.
    pub duplicate: bool,
    /// Recipients on the suppression list: recorded as suppressed, never sent.
    #[serde(default)]
    pub suppressed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection: the server is not running there, the host is unknown, or the connect
    /// timed out.
    #[error("cannot reach bulksend at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error status.
    #[error("bulksend at {url} refused the request ({status}): {error}{}", field.as_ref().map(|f| format!(" [field {f}]")).unwrap_or_default())]
    Http {
        url: String,
        status: u16,
        error: String,
        field: Option<String>,
    },
    /// Connected, but the exchange failed midway (reset, timeout, TLS, ...).
    #[error("request to bulksend at {url} failed: {reason}")]
    Transport { url: String, reason: String },
    /// A 2xx reply that is not the API's JSON.
    #[error("bad response from bulksend at {url}: {reason}")]
    BadResponse { url: String, reason: String },
}

/// The error body every API error has.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Deserialize)]
struct Receipts {
    messages: Vec<Receipt>,
}

#[derive(Serialize)]
struct Batch<'a> {
    messages: &'a [JsonMessage],
}

/// Blocking API client; one keep-alive connection pool per client.
pub struct ApiClient {
    agent: ureq::Agent,
    /// Without a trailing slash.
    base: String,
    /// `Authorization` header value.
    auth: Option<String>,
}

impl ApiClient {
    /// `base_url` is the server root, e.g. `http://127.0.0.1:8025` (a trailing `/` or
    /// `/api/v1` is accepted too).
    pub fn new(base_url: &str, token: Option<String>) -> ApiClient {
        let base = base_url.trim().trim_end_matches('/');
        let base = base.strip_suffix("/api/v1").unwrap_or(base).to_string();
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        ApiClient {
            agent,
            base,
            auth: token
                .filter(|t| !t.is_empty())
                .map(|t| format!("Bearer {t}")),
        }
    }

    /// Enqueues `msgs` in one request; returns a receipt per message, in order. Returns only
    /// after the server made them durable. Safe to retry with idempotency keys (`id`).
    pub fn post_messages(&self, msgs: &[JsonMessage]) -> Result<Vec<Receipt>, ClientError> {
        let url = format!("{}/api/v1/messages", self.base);
        let mut req = self.agent.post(&url);
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        let mut resp = req
            .send_json(Batch { messages: msgs })
            .map_err(|e| transport_error(&url, e))?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| transport_error(&url, e))?;
        if !status.is_success() {
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(b) => ClientError::Http {
                    url,
                    status: status.as_u16(),
                    error: b.error,
                    field: b.field,
                },
                Err(_) => ClientError::Http {
                    url,
                    status: status.as_u16(),
                    error: snippet(&text),
                    field: None,
                },
            });
        }
        let receipts: Receipts =
            serde_json::from_str(&text).map_err(|e| ClientError::BadResponse {
                url: url.clone(),
                reason: format!("{e} in {:?}", snippet(&text)),
            })?;
        if receipts.messages.len() != msgs.len() {
            return Err(ClientError::BadResponse {
                url,
                reason: format!(
                    "{} receipts for {} messages",
                    receipts.messages.len(),
                    msgs.len()
                ),
            });
        }
        Ok(receipts.messages)
    }
}

/// At most 200 characters of a body, for error messages.
fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None if t.is_empty() => "(empty body)".to_string(),
        None => t.to_string(),
    }
}

fn transport_error(url: &str, e: ureq::Error) -> ClientError {
    let unreachable = |reason: String| ClientError::Unreachable {
        url: url.to_string(),
        reason,
    };
    match e {
        ureq::Error::Io(io) if is_connect_failure(&io) => unreachable(io_reason(&io)),
        ureq::Error::HostNotFound => unreachable("host not found".to_string()),
        ureq::Error::ConnectionFailed => unreachable("connection failed".to_string()),
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve) => unreachable(
            format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
        ),
        other => ClientError::Transport {
            url: url.to_string(),
            reason: other.to_string(),
        },
    }
}

fn is_connect_failure(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::HostUnreachable => "host unreachable".to_string(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".to_string(),
        _ => e.to_string(),
    }
}
