//! The injection API over real HTTP on loopback: a router on `127.0.0.1:0` with a real queue
//! in a temporary directory, driven by `ApiClient` and raw ureq requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bulksend::api::{self, ApiState};
use bulksend::client::{ApiClient, ClientError};
use bulksend::compose::JsonMessage;
use bulksend_queue::{MessageId, Queue, QueueOptions, RecipientState};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "s3cret-token";

/// A running API server. Dropping it shuts the server down and releases the queue.
struct Server {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    queue: Option<Arc<Queue>>,
    stop: CancellationToken,
    rt: Option<tokio::runtime::Runtime>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start(dir: &Path, token: Option<&str>, max_request_bytes: usize) -> Server {
        let queue = Arc::new(Queue::open(&dir.join("queue"), QueueOptions::default()).unwrap());
        let ready = Arc::new(AtomicBool::new(false));
        let state = Arc::new(ApiState {
            queue: queue.clone(),
            wake: None,
            token: token.map(str::to_string),
            max_message_size: 1 << 20,
            max_request_bytes,
            ready: ready.clone(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = rt.spawn(api::serve(listener, state, stop.clone()));
        Server {
            addr,
            ready,
            queue: Some(queue),
            stop,
            rt: Some(rt),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn queue(&self) -> &Queue {
        self.queue.as_ref().unwrap()
    }

    /// Graceful shutdown; afterwards nothing holds the queue but `self.queue`.
    fn shutdown(&mut self) {
        self.stop.cancel();
        if let (Some(rt), Some(task)) = (self.rt.take(), self.task.take()) {
            rt.block_on(task).unwrap().unwrap();
            drop(rt);
        }
        self.queue = None;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

struct Reply {
    status: u16,
    www_authenticate: Option<String>,
    body: Value,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// One raw request; `body` is sent as is (so malformed JSON can be sent).
fn request(
    srv: &Server,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let url = format!("{}{path}", srv.url());
    let a = agent();
    let resp = match (method, body) {
        ("GET", None) => with_auth(a.get(&url), auth).call(),
        ("DELETE", None) => with_auth(a.delete(&url), auth).call(),
        ("POST", Some(b)) => with_auth(a.post(&url), auth)
            .header("Content-Type", "application/json")
            .send(b),
        ("PUT", Some(b)) => with_auth(a.put(&url), auth).send(b),
        other => panic!("unsupported {other:?}"),
    };
    let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let www_authenticate = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e}): {text:?}"));
    Reply {
        status,
        www_authenticate,
        body,
    }
}

fn with_auth<B>(r: ureq::RequestBuilder<B>, auth: Option<&str>) -> ureq::RequestBuilder<B> {
    match auth {
        Some(t) => r.header("Authorization", format!("Bearer {t}")),
        None => r,
    }
}

fn get(srv: &Server, path: &str) -> Reply {
    request(srv, "GET", path, Some(TOKEN), None)
}

fn post(srv: &Server, path: &str, body: &str) -> Reply {
    request(srv, "POST", path, Some(TOKEN), Some(body))
}

fn msg(i: usize) -> JsonMessage {
    JsonMessage {
        from: "news@esp.test".into(),
        to: vec![
            format!("user{i}@example.test"),
            format!("other{i}@example.org"),
        ],
        subject: Some(format!("Issue {i}")),
        text: Some(format!("Hello number {i}")),
        ..JsonMessage::default()
    }
}

/// Recipient records in the queue, whatever their state.
fn total_records(q: &Queue) -> u64 {
    q.stats().by_state.values().sum()
}

#[test]
fn auth_is_required_on_api_but_not_on_health() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), Some(TOKEN), 1 << 20);
    let body = serde_json::to_string(&msg(1)).unwrap();

    for auth in [None, Some("wrong"), Some("s3cret-toke"), Some("")] {
        let r = request(&srv, "POST", "/api/v1/messages", auth, Some(&body));
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
        assert!(r.body["error"].as_str().unwrap().contains("bearer token"));
        let r = request(&srv, "GET", "/api/v1/suppressions", auth, None);
        assert_eq!(r.status, 401, "{auth:?}");
    }
    // Another scheme with the right credentials is still refused.
    let r = agent()
        .get(format!("{}/api/v1/suppressions", srv.url()))
        .header("Authorization", format!("Basic {TOKEN}"))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(total_records(srv.queue()), 0, "nothing stored without auth");

    let wrong = ApiClient::new(&srv.url(), Some("nope".into()));
    match wrong.post_messages(&[msg(1)]) {
        Err(ClientError::Http { status: 401, .. }) => {}
        other => panic!("expected 401, got {other:?}"),
    }

    let r = request(&srv, "POST", "/api/v1/messages", Some(TOKEN), Some(&body));
    assert_eq!(r.status, 200, "{}", r.body);
    let client = ApiClient::new(&format!("{}/", srv.url()), Some(TOKEN.into()));
    assert_eq!(client.post_messages(&[msg(2)]).unwrap().len(), 1);

    // Health endpoints need no token.
    let r = request(&srv, "GET", "/healthz", None, None);
    assert_eq!(r.status, 200);
    let r = request(&srv, "GET", "/readyz", None, None);
    assert_eq!(r.status, 503);
    assert!(r.body["error"].is_string());
    srv.ready.store(true, Ordering::SeqCst);
    let r = request(&srv, "GET", "/readyz", None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ready");
}

#[test]
fn batch_is_durable_before_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start(dir.path(), None, 8 << 20);
    let client = ApiClient::new(&srv.url(), None);
    let msgs: Vec<JsonMessage> = (0..100).map(msg).collect();
    let receipts = client.post_messages(&msgs).unwrap();
    assert_eq!(receipts.len(), 100);
    let ids: Vec<MessageId> = receipts.iter().map(|r| r.id.parse().unwrap()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 100, "ids are distinct");
    assert!(receipts
        .iter()
        .all(|r| !r.duplicate && r.suppressed.is_empty()));

    // Stop the server and drop the queue, then reopen it from disk.
    srv.shutdown();
    drop(srv);
    let q = Queue::open(&dir.path().join("queue"), QueueOptions::default()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let info = q
            .message(*id)
            .unwrap()
            .unwrap_or_else(|| panic!("message {i} lost"));
        let addrs: Vec<&str> = info.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(
            addrs,
            msgs[i].to.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert!(info
            .recipients
            .iter()
            .all(|r| r.state == RecipientState::Scheduled));
        let body = String::from_utf8(q.body(*id).unwrap().unwrap()).unwrap();
        assert!(body.contains(&format!("Hello number {i}")));
    }
    assert_eq!(total_records(&q), 200);
}

#[test]
fn idempotency_key_returns_the_first_message() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), Some(TOKEN), 1 << 20);
    let client = ApiClient::new(&srv.url(), Some(TOKEN.into()));
    let m = JsonMessage {
        id: Some("campaign-7/user-1".into()),
        ..msg(1)
    };
    let first = client.post_messages(std::slice::from_ref(&m)).unwrap();
    assert!(!first[0].duplicate);
    let again = client.post_messages(std::slice::from_ref(&m)).unwrap();
    assert_eq!(again[0].id, first[0].id);
    assert!(again[0].duplicate);
    // The same key in the single-message form, and twice within one batch.
    let r = post(
        &srv,
        "/api/v1/messages",
        &serde_json::to_string(&m).unwrap(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["messages"][0]["id"], first[0].id.as_str());
    assert_eq!(r.body["messages"][0]["duplicate"], true);
    let n = JsonMessage {
        id: Some("k2".into()),
        ..msg(2)
    };
    let both = client.post_messages(&[n.clone(), n]).unwrap();
    assert_eq!(both[0].id, both[1].id);
    assert!(!both[0].duplicate && both[1].duplicate);
    assert_eq!(
        total_records(srv.queue()),
        4,
        "two messages of two recipients"
    );
}

#[test]
fn bad_requests_name_the_field_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), Some(TOKEN), 1 << 20);
    let good = serde_json::to_value(msg(1)).unwrap();
    let with = |key: &str, v: Value| {
        let mut m = good.clone();
        m[key] = v;
        m
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("to", json!(["not an address"])), "to[0]"),
        (
            with("to", json!(["a@x.test", "b@y.test\r\nRCPT TO:<c@z.test>"])),
            "to[1]",
        ),
        (
            with("subject", json!("Hi\r\nBcc: victim@x.test")),
            "subject",
        ),
        (with("bogus", json!(1)), "bogus"),
        (with("to", json!("a@x.test")), "to"),
        (with("from", json!(null)), "from"),
        (
            json!({"messages": [good.clone(), with("to", json!(["nope"]))]}),
            "messages[1].to[0]",
        ),
        (
            json!([good.clone(), good.clone(), with("subject", json!("a\nb"))]),
            "messages[2].subject",
        ),
        (json!({"messages": [good.clone(), 5]}), "messages[1]"),
        (json!({"messages": []}), "messages"),
    ];
    for (body, field) in cases {
        let r = post(&srv, "/api/v1/messages", &body.to_string());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.body["field"], field, "{body}: {}", r.body);
        assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    for malformed in ["{\"from\": ", "not json", "", "[{\"from\": \"a@x.test\",}]"] {
        let r = post(&srv, "/api/v1/messages", malformed);
        assert_eq!(r.status, 400, "{malformed:?}");
        let err = r.body["error"].as_str().unwrap();
        assert!(
            err.starts_with("malformed JSON") && err.contains("line"),
            "{err}"
        );
    }
    assert_eq!(
        total_records(srv.queue()),
        0,
        "a rejected batch stores nothing"
    );

    // The client surfaces the server's field.
    let client = ApiClient::new(&srv.url(), Some(TOKEN.into()));
    let bad = JsonMessage {
        to: vec!["a@x.test".into(), "nope".into()],
        ..msg(1)
    };
    match client.post_messages(&[msg(0), bad]) {
        Err(e @ ClientError::Http { status: 400, .. }) => {
            let ClientError::Http { field, .. } = &e else {
                unreachable!()
            };
            assert_eq!(field.as_deref(), Some("messages[1].to[1]"));
            assert!(e.to_string().contains("messages[1].to[1]"), "{e}");
        }
        other => panic!("expected 400, got {other:?}"),
    }

    // Unknown endpoints and methods answer in the same JSON shape.
    let r = get(&srv, "/api/v1/nothing");
    assert_eq!(r.status, 404);
    assert!(r.body["error"].is_string());
    let r = request(&srv, "PUT", "/api/v1/messages", Some(TOKEN), Some("{}"));
    assert_eq!(r.status, 405);
    assert!(r.body["error"].is_string());
}

#[test]
fn request_size_limit_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), Some(TOKEN), 16 * 1024);
    let big = JsonMessage {
        text: Some("x".repeat(20 * 1024)),
        ..msg(1)
    };
    let r = post(
        &srv,
        "/api/v1/messages",
        &serde_json::to_string(&big).unwrap(),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("max_request_bytes"));
    let client = ApiClient::new(&srv.url(), Some(TOKEN.into()));
    match client.post_messages(&[big]) {
        Err(ClientError::Http { status: 413, .. }) => {}
        other => panic!("expected 413, got {other:?}"),
    }
    // Just under the limit is fine.
    let ok = JsonMessage {
        text: Some("x".repeat(12 * 1024)),
        ..msg(2)
    };
    assert_eq!(client.post_messages(&[ok]).unwrap().len(), 1);
    assert_eq!(total_records(srv.queue()), 2);
}

#[test]
fn message_status_and_suppressions() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), Some(TOKEN), 1 << 20);
    let client = ApiClient::new(&srv.url(), Some(TOKEN.into()));
    let before = SystemTime::now() - std::time::Duration::from_secs(1);

    let id = &client.post_messages(&[msg(1)]).unwrap()[0].id;
    let r = get(&srv, &format!("/api/v1/messages/{id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(r.body["sender"], "news@esp.test");
    let rcpts = r.body["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 2);
    for (rcpt, addr) in rcpts
        .iter()
        .zip(["user1@example.test", "other1@example.org"])
    {
        assert_eq!(rcpt["address"], addr);
        assert_eq!(rcpt["state"], "scheduled");
        assert_eq!(rcpt["attempts"], 0);
        assert!(rcpt["last_reply"].is_null());
        let next = humantime::parse_rfc3339(rcpt["next_attempt"].as_str().unwrap()).unwrap();
        assert!(next >= before, "{rcpt}");
    }
    let r = get(&srv, "/api/v1/messages/00000000000000ff");
    assert_eq!(r.status, 404);
    assert!(r.body["error"].is_string());
    let r = get(&srv, "/api/v1/messages/not-an-id");
    assert_eq!(r.status, 400);
    assert_eq!(r.body["field"], "id");

    // Suppression round trip.
    let r = get(&srv, "/api/v1/suppressions");
    assert_eq!(r.status, 200);
    assert_eq!(r.body["suppressions"], json!([]));
    let add = json!({"address": "Blocked@Example.test", "reason": "complaint"}).to_string();
    let r = post(&srv, "/api/v1/suppressions", &add);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["changed"], true);
    let r = post(&srv, "/api/v1/suppressions", &add);
    assert_eq!(r.status, 200, "adding twice is not an error");
    assert_eq!(r.body["changed"], false);
    let r = get(&srv, "/api/v1/suppressions/blocked@example.test");
    assert_eq!(r.status, 200);
    assert_eq!(r.body["address"], "blocked@example.test");
    assert_eq!(r.body["reason"], "complaint");
    assert!(humantime::parse_rfc3339(r.body["at"].as_str().unwrap()).is_ok());
    let r = get(&srv, "/api/v1/suppressions");
    assert_eq!(r.body["suppressions"][0]["address"], "blocked@example.test");
    let r = get(&srv, "/api/v1/suppressions/fine@example.test");
    assert_eq!(r.status, 404);
    for bad in [
        json!({"address": "no-at-sign"}),
        json!({"address": "a@b.test\r\nx"}),
    ] {
        let r = post(&srv, "/api/v1/suppressions", &bad.to_string());
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.body["field"], "address");
    }
    let r = post(
        &srv,
        "/api/v1/suppressions",
        r#"{"address":"a@b.test","bogus":1}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.body["field"], "bogus");

    // A message to a suppressed address reports it and does not schedule it.
    let m = JsonMessage {
        to: vec!["ok@example.test".into(), "blocked@example.test".into()],
        ..msg(2)
    };
    let receipt = &client.post_messages(&[m]).unwrap()[0];
    assert_eq!(receipt.suppressed, vec!["blocked@example.test".to_string()]);
    let r = get(&srv, &format!("/api/v1/messages/{}", receipt.id));
    let states: Vec<&str> = r.body["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["scheduled", "suppressed"]);

    let r = request(
        &srv,
        "DELETE",
        "/api/v1/suppressions/blocked@example.test",
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body["changed"], true);
    let r = get(&srv, "/api/v1/suppressions/blocked@example.test");
    assert_eq!(r.status, 404);
    let r = request(
        &srv,
        "DELETE",
        "/api/v1/suppressions/blocked@example.test",
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 404);
    let r = get(&srv, "/api/v1/suppressions");
    assert_eq!(r.body["suppressions"], json!([]));
}

#[test]
fn client_reports_an_unreachable_server() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let client = ApiClient::new(&url, None);
    let err = client.post_messages(&[msg(1)]).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot reach bulksend at {url}/api/v1/messages")),
        "{text}"
    );
    assert!(text.ends_with("connection refused"), "{text}");
}

/// Where [`child_server`] puts its queue; set only in the child process.
const CHILD_DIR: &str = "BULKSEND_API_TEST_CHILD_DIR";

/// The server half of [`acknowledged_batch_survives_sigkill`], run in a child process.
#[test]
#[ignore = "run by acknowledged_batch_survives_sigkill in a child process"]
fn child_server() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let srv = Server::start(Path::new(&dir), None, 8 << 20);
    println!("LISTENING {}", srv.addr);
    loop {
        std::thread::park();
    }
}

/// A 200 means durable: SIGKILL the server process right after the reply (no Drop, no
/// flush on the way out), then every acknowledged message must be in the reopened queue.
#[test]
fn acknowledged_batch_survives_sigkill() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// Kills the child on every path, also when an assertion fails first.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let mut child = Child(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_server",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // libtest prints "test child_server ... " before the test's own output, on the same line.
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("child exited before listening")
            .unwrap();
        if let Some((_, a)) = line.split_once("LISTENING ") {
            break a.trim().to_string();
        }
    };
    let client = ApiClient::new(&format!("http://{addr}"), None);
    let msgs: Vec<JsonMessage> = (0..100).map(msg).collect();
    let receipts = client.post_messages(&msgs).unwrap();
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    drop(child);

    let q = Queue::open(&dir.path().join("queue"), QueueOptions::default()).unwrap();
    for (i, r) in receipts.iter().enumerate() {
        let info = q.message(r.id.parse().unwrap()).unwrap();
        assert!(
            info.is_some_and(|m| m.recipients.len() == 2),
            "message {i} lost"
        );
    }
}
