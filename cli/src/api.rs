//! The HTTP injection API (`bulksend serve`, `[api]`): how an ESP backend puts mail into the
//! queue and looks at it.
//!
//! ```text
//! POST   /api/v1/messages                  one message, an array, or {"messages": [...]}
//! GET    /api/v1/messages/{id}             message and per-recipient state
//! GET    /api/v1/suppressions              the suppression list
//! POST   /api/v1/suppressions              {"address": "...", "reason": "..."}
//! GET    /api/v1/suppressions/{address}
//! DELETE /api/v1/suppressions/{address}
//! GET    /healthz                          200 while the process serves HTTP (no auth)
//! GET    /readyz                           200 once delivery runs, else 503 (no auth)
//! ```
//!
//! Every body is JSON; every error is `{"error": "...", "field": "..."}`, with `field` when one
//! field of the request is at fault (`messages[3].to[0]` in a batch). `/api/*` needs
//! `Authorization: Bearer <api.token>` when a token is configured.
//!
//! A `POST /api/v1/messages` is all or nothing at validation: every message is built first,
//! and one bad message rejects the request before anything is stored. The valid batch then
//! goes to the queue as one `enqueue_batch`, and the reply is sent only after the queue made
//! it durable (fsync), so a 200 means the mail survives a crash. Retries are safe with `id`
//! (the idempotency key): the first message's id comes back with `"duplicate": true`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bulksend_engine::delivery::Engine;
use bulksend_engine::metrics as m;
use bulksend_engine::smtp::Address;
use bulksend_queue::{
    Enqueued, MessageId, MessageInfo, NewMessage, Queue, QueueError, RecipientRecord, Suppression,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::client::Receipt;
use crate::compose::{FieldError, JsonMessage};

/// What the handlers share.
pub struct ApiState {
    pub queue: Arc<Queue>,
    /// The delivery engine, woken after an enqueue so new mail does not wait for the
    /// dispatcher's next poll. `None` when the API runs without delivery (tests, tools).
    pub wake: Option<Engine>,
    /// Bearer token for `/api/*`. `None` or empty: no authentication (config refuses that on
    /// a non-loopback listen address).
    pub token: Option<String>,
    /// Largest message (octets) accepted, as `smtp.max_message_size`.
    pub max_message_size: usize,
    /// Largest request body; larger requests get 413.
    pub max_request_bytes: usize,
    /// Set by the server while delivery runs; `/readyz` reports it.
    pub ready: Arc<AtomicBool>,
}

/// `/api/*` requests handled at once. Each may buffer up to `max_request_bytes`, so this
/// bounds the memory requests can take; more wait (unread) for a permit.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// After shutdown, requests in progress get this long to finish; then their connections are
/// dropped. A queue write already started still completes (it runs on its own thread), so
/// an enqueue is never half-done: at worst its reply is lost, and a retry with the same
/// `id` returns the stored message.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The API's routes, with authentication and the body size limit.
pub fn router(state: Arc<ApiState>) -> Router {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
    let api = Router::new()
        .route("/api/v1/messages", post(post_messages))
        .route("/api/v1/messages/{id}", get(get_message))
        .route(
            "/api/v1/suppressions",
            get(list_suppressions).post(add_suppression),
        )
        .route(
            "/api/v1/suppressions/{address}",
            get(get_suppression).delete(remove_suppression),
        )
        .route_layer(middleware::from_fn(move |req: Request, next: Next| {
            let permits = permits.clone();
            async move {
                // Held while the body is read and the queue works on it; the requests that
                // wait are not read, so TCP pushes back on their senders.
                let Ok(_permit) = permits.acquire_owned().await else {
                    return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                        .into_response();
                };
                next.run(req).await
            }
        }))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.max_request_bytes))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for requests in progress, at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        r = server => r,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "API requests still open after the shutdown grace period; dropping them"
            );
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors

/// An error reply: `{"error": ..., "field": ...}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// Per-message results when the queue refused part of a batch it otherwise stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<Value>>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.into(),
                field: None,
                messages: None,
            },
        }
    }

    fn field(status: StatusCode, field: impl Into<String>, error: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(status, error);
        e.body.field = Some(field.into());
        e
    }

    fn bad_request(field: impl Into<String>, error: impl Into<String>) -> ApiError {
        ApiError::field(StatusCode::BAD_REQUEST, field, error)
    }

    /// A queue failure: 503 when the queue is closed (shutdown, or it refuses writes after a
    /// failed fsync), 400 for input it rejects, 500 otherwise.
    fn queue(e: &QueueError) -> ApiError {
        let status = match e {
            QueueError::Closed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            QueueError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            QueueError::Open { .. }
            | QueueError::Corrupt { .. }
            | QueueError::Io(_)
            | QueueError::Sled(_)
            | QueueError::NotFound(_)
            | QueueError::NotLeased { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "API request failed in the queue");
        }
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A body that could not be read: too large (413) or broken off.
fn body_error(rejection: &BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "request body is larger than api.max_request_bytes")
    } else {
        ApiError::new(status, rejection.body_text())
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Runs a blocking queue call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::queue(&e)),
        Err(e) => {
            tracing::error!(error = %e, "API queue task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Authentication

async fn require_token(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    match st.token.as_deref() {
        Some(token) if !token.is_empty() => {
            if authorized(req.headers(), token) {
                next.run(req).await
            } else {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (Authorization: Bearer <api.token>)",
                )
                .into_response()
            }
        }
        _ => next.run(req).await,
    }
}

/// `Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235 §2.1).
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed
/// token was right. (The length is not hidden; it says little about a random token.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

// ---------------------------------------------------------------------------------------
// Health

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

async fn readyz(State(st): State<Arc<ApiState>>) -> Response {
    if st.ready.load(Ordering::SeqCst) {
        Json(Status { status: "ready" }).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "delivery is not running").into_response()
    }
}

// ---------------------------------------------------------------------------------------
// Messages

#[derive(Serialize)]
struct Receipts {
    messages: Vec<Receipt>,
}

async fn post_messages(
    State(st): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Receipts>, ApiError> {
    let body = body.map_err(|r| body_error(&r))?;
    let built = parse_messages(&body, st.max_message_size)?;
    let counts: Vec<usize> = built.iter().map(|m| m.recipients.len()).collect();
    // Awaited, not on a blocking thread: many clients at once cost no thread each.
    let results = st
        .queue
        .enqueue_batch_async(built)
        .await
        .map_err(|e| ApiError::queue(&e))?;

    let (mut stored, mut scheduled, mut failed) = (0u64, 0usize, None);
    let mut receipts = Vec::with_capacity(results.len());
    let mut slots = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(Enqueued {
                id,
                duplicate,
                suppressed,
            }) => {
                if !duplicate {
                    stored += 1;
                    let n = counts.get(i).copied().unwrap_or_default();
                    scheduled += n.saturating_sub(suppressed.len());
                }
                let receipt = Receipt {
                    id: id.to_string(),
                    duplicate,
                    suppressed,
                };
                slots.push(serde_json::to_value(&receipt).unwrap_or(Value::Null));
                receipts.push(receipt);
            }
            Err(e) => {
                slots.push(serde_json::json!({ "error": e.to_string() }));
                failed.get_or_insert((i, e));
            }
        }
    }
    if stored > 0 {
        metrics::counter!(m::MESSAGES_ENQUEUED).increment(stored);
        metrics::counter!(m::RECIPIENTS_ENQUEUED).increment(scheduled as u64);
        if let Some(engine) = &st.wake {
            engine.wake();
        }
    }
    if let Some((i, e)) = failed {
        // Only reachable if the queue rejects what compose accepted: the rest of the batch
        // is stored, so say which slots were.
        let mut err = ApiError::queue(&e);
        err.body.field = Some(format!("messages[{i}]"));
        err.body.messages = Some(slots);
        return Err(err);
    }
    Ok(Json(Receipts { messages: receipts }))
}

/// Parses and builds the request's messages; the first bad one rejects the whole request.
fn parse_messages(body: &[u8], max_size: usize) -> Result<Vec<NewMessage>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}")))?;
    let (items, batch) = match value {
        Value::Array(items) => (items, true),
        Value::Object(mut obj) if obj.contains_key("messages") => {
            if let Some(extra) = obj.keys().find(|k| *k != "messages") {
                return Err(ApiError::bad_request(
                    extra.clone(),
                    format!("unknown field `{extra}` next to `messages`"),
                ));
            }
            match obj.remove("messages") {
                Some(Value::Array(items)) => (items, true),
                _ => {
                    return Err(ApiError::bad_request(
                        "messages",
                        "must be an array of messages",
                    ))
                }
            }
        }
        single => (vec![single], false),
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("messages", "no messages"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let prefix = if batch {
            format!("messages[{i}]")
        } else {
            String::new()
        };
        let built = decode_message(item).and_then(|msg| msg.build(max_size));
        match built {
            Ok(m) => out.push(m),
            Err(FieldError { field, message }) => {
                let field = match (prefix.is_empty(), field.is_empty()) {
                    (true, _) => field,
                    (false, true) => prefix,
                    (false, false) => format!("{prefix}.{field}"),
                };
                return Err(if field.is_empty() {
                    ApiError::new(StatusCode::BAD_REQUEST, message)
                } else {
                    ApiError::bad_request(field, message)
                });
            }
        }
    }
    Ok(out)
}

/// One message from JSON; a type error names the field (serde_json's own message only has a
/// line and column, which mean little in a batch).
fn decode_message(v: &Value) -> Result<JsonMessage, FieldError> {
    JsonMessage::deserialize(v).map_err(|e| {
        let text = e.to_string();
        let field = match v {
            Value::Object(obj) => misplaced_field(obj)
                .or_else(|| quoted_after(&text, "missing field `"))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let message = if matches!(v, Value::Object(_)) {
            text
        } else {
            "a message must be a JSON object".to_string()
        };
        FieldError { field, message }
    })
}

/// The first field of a message object that is unknown or has the wrong JSON type.
fn misplaced_field(obj: &Map<String, Value>) -> Option<String> {
    for (key, v) in obj {
        let ok = match key.as_str() {
            "id" | "subject" | "text" | "html" | "raw" => v.is_string() || v.is_null(),
            "from" => v.is_string(),
            "to" => match v.as_array() {
                Some(list) => {
                    if let Some(i) = list.iter().position(|x| !x.is_string()) {
                        return Some(format!("to[{i}]"));
                    }
                    true
                }
                None => false,
            },
            "headers" => match v.as_object() {
                Some(h) => {
                    if let Some((name, _)) = h.iter().find(|(_, x)| !x.is_string()) {
                        return Some(format!("headers.{name}"));
                    }
                    true
                }
                None => false,
            },
            _ => false,
        };
        if !ok {
            return Some(key.clone());
        }
    }
    None
}

/// `name` from serde's "missing field `name`".
fn quoted_after(text: &str, prefix: &str) -> Option<String> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('`')?].to_string())
}

#[derive(Serialize)]
struct MessageView {
    id: String,
    sender: String,
    created: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
    recipients: Vec<RecipientView>,
}

#[derive(Serialize)]
struct RecipientView {
    /// `<message id>.<index>`.
    id: String,
    address: String,
    destination: String,
    state: &'static str,
    attempts: u32,
    next_attempt: String,
    updated: String,
    last_reply: Option<String>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<MessageInfo> for MessageView {
    fn from(m: MessageInfo) -> MessageView {
        MessageView {
            id: m.id.to_string(),
            sender: m.sender,
            created: rfc3339(m.created),
            size: m.size,
            idempotency_key: m.idempotency_key,
            recipients: m.recipients.into_iter().map(RecipientView::from).collect(),
        }
    }
}

impl From<RecipientRecord> for RecipientView {
    fn from(r: RecipientRecord) -> RecipientView {
        RecipientView {
            id: r.id.to_string(),
            address: r.address,
            destination: r.destination,
            state: r.state.as_str(),
            attempts: r.attempts,
            next_attempt: rfc3339(r.next_attempt),
            updated: rfc3339(r.updated),
            last_reply: r.last_reply,
        }
    }
}

async fn get_message(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|e: QueueError| ApiError::bad_request("id", e.to_string()))?;
    let queue = st.queue.clone();
    match blocking(move || queue.message(id)).await? {
        Some(info) => Ok(Json(info.into())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no message {id} in the queue"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Suppressions

#[derive(Serialize)]
struct SuppressionView {
    address: String,
    reason: String,
    at: String,
}

impl From<Suppression> for SuppressionView {
    fn from(s: Suppression) -> SuppressionView {
        SuppressionView {
            address: s.address,
            reason: s.reason,
            at: rfc3339(s.at),
        }
    }
}

#[derive(Serialize)]
struct SuppressionList {
    suppressions: Vec<SuppressionView>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddSuppression {
    address: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Serialize)]
struct Changed {
    address: String,
    /// `false` when there was nothing to do (already listed / not listed).
    changed: bool,
}

fn parse_address(s: &str) -> Result<Address, ApiError> {
    Address::parse(s).map_err(|e| ApiError::bad_request("address", e.to_string()))
}

async fn list_suppressions(
    State(st): State<Arc<ApiState>>,
) -> Result<Json<SuppressionList>, ApiError> {
    let queue = st.queue.clone();
    let list = blocking(move || queue.suppress_list()).await?;
    Ok(Json(SuppressionList {
        suppressions: list.into_iter().map(SuppressionView::from).collect(),
    }))
}

async fn get_suppression(
    State(st): State<Arc<ApiState>>,
    Path(address): Path<String>,
) -> Result<Json<SuppressionView>, ApiError> {
    let address = parse_address(&address)?;
    let queue = st.queue.clone();
    let a = address.as_str().to_owned();
    match blocking(move || queue.suppressed(&a)).await? {
        Some(s) => Ok(Json(s.into())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{address} is not suppressed"),
        )),
    }
}

async fn add_suppression(
    State(st): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Changed>), ApiError> {
    let body = body.map_err(|r| body_error(&r))?;
    let req: AddSuppression = serde_json::from_slice(&body).map_err(|e| {
        let text = e.to_string();
        match quoted_after(&text, "unknown field `")
            .or_else(|| quoted_after(&text, "missing field `"))
        {
            Some(field) => ApiError::bad_request(field, text),
            None => ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {text}")),
        }
    })?;
    let address = parse_address(&req.address)?;
    let reason = req
        .reason
        .unwrap_or_else(|| "added through the API".to_string());
    if reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "reason",
            "must not contain control characters",
        ));
    }
    let queue = st.queue.clone();
    let a = address.as_str().to_owned();
    let added = blocking(move || queue.suppress_add(&a, &reason)).await?;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(Changed {
            address: address.as_str().to_lowercase(),
            changed: added,
        }),
    ))
}

async fn remove_suppression(
    State(st): State<Arc<ApiState>>,
    Path(address): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let address = parse_address(&address)?;
    let queue = st.queue.clone();
    let a = address.as_str().to_owned();
    if blocking(move || queue.suppress_remove(&a)).await? {
        Ok(Json(Changed {
            address: address.as_str().to_lowercase(),
            changed: true,
        }))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{address} is not suppressed"),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bearer_comparison() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(authorized(&h, "s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer s3cret"),
        );
        assert!(authorized(&h, "s3cret"));
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(!authorized(&h, "s3cret"), "{bad}");
        }
    }

    #[test]
    fn shapes_and_fields() {
        let one = r#"{"from":"f@x.test","to":["a@x.test"],"text":"x"}"#;
        assert_eq!(parse_messages(one.as_bytes(), 1 << 20).unwrap().len(), 1);
        let arr = format!("[{one},{one}]");
        assert_eq!(parse_messages(arr.as_bytes(), 1 << 20).unwrap().len(), 2);
        let wrapped = format!(r#"{{"messages":[{one},{one},{one}]}}"#);
        assert_eq!(
            parse_messages(wrapped.as_bytes(), 1 << 20).unwrap().len(),
            3
        );

        let field = |body: &str| {
            parse_messages(body.as_bytes(), 1 << 20)
                .unwrap_err()
                .body
                .field
                .unwrap_or_default()
        };
        assert_eq!(
            field(r#"{"from":"f@x.test","to":["nope"],"text":"x"}"#),
            "to[0]"
        );
        assert_eq!(
            field(&format!(
                r#"[{one},{{"from":"f@x.test","to":["a@x.test",7],"text":"x"}}]"#
            )),
            "messages[1].to[1]"
        );
        assert_eq!(
            field(r#"{"from":"f@x.test","to":["a@x.test"],"text":"x","bogus":1}"#),
            "bogus"
        );
        assert_eq!(field(r#"{"to":["a@x.test"],"text":"x"}"#), "from");
        assert_eq!(
            field(r#"{"from":"f@x.test","to":"a@x.test","text":"x"}"#),
            "to"
        );
        assert_eq!(
            field(r#"{"from":"f@x.test","to":["a@x.test"],"text":"x","headers":{"X-A":1}}"#),
            "headers.X-A"
        );
        assert_eq!(
            field(&format!(r#"{{"messages":[{one},3]}}"#)),
            "messages[1]"
        );
        assert_eq!(field(r#"{"messages":[]}"#), "messages");
        assert_eq!(field(r#"{"messages":{}}"#), "messages");
        assert_eq!(field(r#"{"messages":[], "x": 1}"#), "x");
        assert_eq!(field("[]"), "messages");
        let e = parse_messages(b"{\"from\": ", 1 << 20).unwrap_err();
        assert!(e.body.error.starts_with("malformed JSON"), "{:?}", e.body);
    }

    #[test]
    fn constant_time() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
