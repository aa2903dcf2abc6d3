//! The real `bulksend` binary, run as an operator would. Receivers are loopback servers started
//! by the test; every delivery claim is checked against what they received.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;
use bulksend_tests::{reply, Script, ScriptedServer};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config file in a temp dir: queue, events, API and metrics on free loopback ports, and a
/// smarthost route to `smarthost` if given.
struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
    metrics_port: u16,
}

fn env(smarthost: Option<std::net::SocketAddr>, extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (api_port, metrics_port) = (free_port(), free_port());
    let route = smarthost
        .map(|a| format!("[routes]\n\"*\" = \"{a}\"\n"))
        .unwrap_or_default();
    let text = format!(
        r#"
[queue]
path = "{q}"
[events]
path = "{e}"
[api]
listen = "127.0.0.1:{api_port}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[smtp]
helo_name = "cli.test"
tls = "disabled"
[smtp.timeouts]
idle = "300ms"
[delivery]
max_connections_per_destination = 4
min_backoff = "1s"
max_backoff = "2s"
{route}
{extra}
"#,
        q = dir.path().join("queue").display(),
        e = dir.path().join("events.jsonl").display(),
    );
    let config = dir.path().join("bulksend.toml");
    std::fs::write(&config, text).unwrap();
    Env {
        dir,
        config,
        metrics_port,
    }
}

fn bulksend(env: &Env) -> Command {
    let mut c = Command::cargo_bin("bulksend").unwrap();
    c.arg("--config").arg(&env.config);
    // Nothing from the developer's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("BULKSEND_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c
}

/// Runs `bulksend --config … ARGS` to completion.
fn bs(e: &Env, args: &[&str]) -> Out {
    let mut c = bulksend(e);
    c.args(args);
    run(c)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(mut c: Command) -> Out {
    let o = c.output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn config_check_prints_effective_config_and_names_bad_keys() {
    let e = env(None, "");
    let o = bs(&e, &["config", "check"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("[smtp.timeouts]") && o.stdout.contains("data_done = \"10m\""),
        "{}",
        o.stdout
    );

    let e = env(None, "[log]\nlevle = \"debug\"\n");
    let o = bs(&e, &["config", "check"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("levle"), "{}", o.stderr);

    // Environment overrides are applied and validated too.
    let e = env(None, "");
    let o = run({
        let mut c = bulksend(&e);
        c.args(["config", "check"])
            .env("BULKSEND_SMTP__TLS", "sometimes");
        c
    });
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("sometimes"), "{}", o.stderr);
}

#[test]
fn enqueue_from_flags_then_queue_commands() {
    let e = env(None, "");
    let o = run({
        let mut c = bulksend(&e);
        c.args([
            "enqueue",
            "--from",
            "news@esp.test",
            "--to",
            "a@x.test",
            "--to",
            "b@y.test",
        ])
        .args([
            "--subject",
            "Hello",
            "--body",
            "Hi there",
            "--id",
            "campaign-1-42",
        ]);
        c
    });
    assert_eq!(o.code, 0, "{}", o.stderr);
    let s = json(&o.stdout);
    assert_eq!(s["enqueued"], 1);
    let id = s["ids"][0].as_str().unwrap().to_owned();

    // The same idempotency key again: stored once.
    let o = run({
        let mut c = bulksend(&e);
        c.args([
            "enqueue",
            "--from",
            "news@esp.test",
            "--to",
            "a@x.test",
            "--to",
            "b@y.test",
        ])
        .args([
            "--subject",
            "Hello",
            "--body",
            "Hi there",
            "--id",
            "campaign-1-42",
        ]);
        c
    });
    assert_eq!(json(&o.stdout)["duplicates"], 1);

    let o = bs(&e, &["queue", "stats", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(json(&o.stdout)["by_state"]["scheduled"], 2);

    let o = bs(&e, &["queue", "show", &id, "--json"]);
    let v = json(&o.stdout);
    assert_eq!(v["recipients"].as_array().unwrap().len(), 2);
    assert_eq!(v["idempotency_key"], "campaign-1-42");

    let o = bs(&e, &["queue", "list", "--state", "scheduled"]);
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);

    let o = bs(&e, &["queue", "retry", &id]);
    assert_eq!(o.code, 0, "{}", o.stderr);

    // An offline compaction keeps the message.
    let o = bs(&e, &["queue", "compact", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        json(&o.stdout)["keys"].as_u64().unwrap() > 0,
        "{}",
        o.stdout
    );
    let o = bs(&e, &["queue", "show", &id, "--json"]);
    assert_eq!(json(&o.stdout)["recipients"].as_array().unwrap().len(), 2);

    let o = bs(&e, &["queue", "show", "not-an-id"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("not a message id"), "{}", o.stderr);

    let o = bs(&e, &["queue", "delete", &id]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = bs(&e, &["queue", "stats", "--json"]);
    assert!(
        json(&o.stdout)["by_state"]
            .get("scheduled")
            .is_none_or(|v| v == 0),
        "{}",
        o.stdout
    );
}

#[test]
fn enqueue_jsonl_reports_bad_lines_and_keeps_good_ones() {
    let e = env(None, "");
    let path = e.dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(
        f,
        r#"{{"from":"n@esp.test","to":["a@x.test"],"subject":"s","text":"t"}}"#
    )
    .unwrap();
    writeln!(
        f,
        r#"{{"from":"n@esp.test","to":["b@x.test"],"subject":"s","#
    )
    .unwrap(); // truncated
    writeln!(
        f,
        r#"{{"from":"n@esp.test","to":["c@x.test"],"raw":"Subject: r\r\n\r\nbody\r\n"}}"#
    )
    .unwrap();
    writeln!(
        f,
        r#"{{"from":"n@esp.test","to":["not an address"],"text":"t"}}"#
    )
    .unwrap();
    writeln!(f).unwrap();
    writeln!(f, r#"{{"from":"n@esp.test","to":["d@x.test"],"html":"<b>x</b>","headers":{{"X-Campaign":"7"}}}}"#).unwrap();
    drop(f);
    let o = run({
        let mut c = bulksend(&e);
        c.args(["enqueue", "--jsonl"]).arg(&path);
        c
    });
    assert_eq!(o.code, 2, "partial success: {}", o.stderr);
    let s = json(&o.stdout);
    assert_eq!(
        (s["enqueued"].as_u64(), s["rejected"].as_u64()),
        (Some(3), Some(2)),
        "{s}"
    );
    assert!(o.stderr.contains("line 2: invalid JSON"), "{}", o.stderr);
    assert!(o.stderr.contains("line 4: to[0]"), "{}", o.stderr);

    // From stdin.
    let mut child = {
        let mut c = bulksend(&e);
        c.args(["enqueue", "--jsonl", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        c.spawn().unwrap()
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"from\":\"n@esp.test\",\"to\":[\"e@x.test\"],\"text\":\"t\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(json(&String::from_utf8_lossy(&out.stdout))["enqueued"], 1);
}

#[test]
fn enqueue_bad_input_and_unreachable_server() {
    let e = env(None, "");
    let o = bs(
        &e,
        &[
            "enqueue",
            "--from",
            "n@esp.test",
            "--to",
            "x@y.test\r\nRCPT TO:<evil@z.test>",
            "--body",
            "b",
        ],
    );
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("to[0]"), "{}", o.stderr);

    let eml = e.dir.path().join("m.eml");
    std::fs::write(
        &eml,
        "Subject: from a file\r\nFrom: n@esp.test\r\n\r\nbody\r\n",
    )
    .unwrap();
    let o = run({
        let mut c = bulksend(&e);
        c.args([
            "enqueue",
            "--from",
            "n@esp.test",
            "--to",
            "x@y.test",
            "--eml",
        ])
        .arg(&eml);
        c
    });
    assert_eq!(o.code, 0, "{}", o.stderr);

    let o = run({
        let mut c = bulksend(&e);
        c.args([
            "enqueue",
            "--server",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .args(["--from", "n@esp.test", "--to", "x@y.test", "--body", "b"]);
        c
    });
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("cannot reach"), "{}", o.stderr);
}

#[test]
fn suppress_commands() {
    let e = env(None, "");
    let cmd = |args: &[&str]| bs(&e, args);
    assert_eq!(
        cmd(&["suppress", "add", "Bad@X.test", "--reason", "complaint"]).code,
        0
    );
    let list = json(&cmd(&["suppress", "list", "--json"]).stdout);
    assert_eq!(list[0]["address"], "bad@x.test");
    assert_eq!(list[0]["reason"], "complaint");
    let file = e.dir.path().join("import.txt");
    std::fs::write(
        &file,
        "# comment\nc@x.test\nd@x.test,hard bounce\nnot-an-address\n",
    )
    .unwrap();
    let o = cmd(&["suppress", "import", file.to_str().unwrap()]);
    assert_eq!(o.code, 2, "one bad line");
    assert_eq!(json(&o.stdout)["added"], 2);
    let o = cmd(&["suppress", "export"]);
    assert_eq!(o.stdout.lines().count(), 3, "{}", o.stdout);
    assert!(o.stdout.contains("d@x.test,hard bounce,"));
    assert_eq!(cmd(&["suppress", "remove", "c@x.test"]).code, 0);
    assert_eq!(cmd(&["suppress", "remove", "c@x.test"]).code, 1);
    // Enqueueing to a suppressed address: reported, never scheduled.
    let o = cmd(&[
        "enqueue",
        "--from",
        "n@esp.test",
        "--to",
        "bad@x.test",
        "--body",
        "b",
    ]);
    assert_eq!(json(&o.stdout)["suppressed"], 1);
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

fn enqueue_n(e: &Env, n: usize) {
    let path = e.dir.path().join("batch.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..n {
        writeln!(
            f,
            r#"{{"from":"n@esp.test","to":["u{i}@dest.test"],"subject":"m{i}","text":"body {i}"}}"#
        )
        .unwrap();
    }
    drop(f);
    let mut c = bulksend(e);
    c.args(["enqueue", "--jsonl"]).arg(&path);
    let o = run(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn serve_drain_delivers_everything_and_exits() {
    let rt = rt();
    let server = rt.block_on(ScriptedServer::start(Script::default()));
    let e = env(Some(server.addr), "");
    enqueue_n(&e, 30);
    let o = bs(&e, &["serve", "--drain"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let s = json(&o.stdout);
    assert_eq!(s["summary"]["delivered"], 30, "{s}");
    assert_eq!(server.messages().len(), 30);
    assert!(server.connections().iter().all(|c| c.quit));
    // The events file has one line per outcome.
    let events = std::fs::read_to_string(e.dir.path().join("events.jsonl")).unwrap();
    let delivered = events
        .lines()
        .filter(|l| json(l)["event"] == "delivered")
        .count();
    assert_eq!(delivered, 30);
}

#[test]
fn sigterm_mid_delivery_loses_nothing_and_quits_every_connection() {
    let rt = rt();
    let server = rt.block_on(ScriptedServer::start(Script::default().with_handler(|c| {
        (c.line == "<DOT>").then(|| {
            std::thread::sleep(Duration::from_millis(40));
            reply("250 2.0.0 Ok")
        })
    })));
    let e = env(Some(server.addr), "");
    enqueue_n(&e, 300);
    let mut child = {
        let mut c = bulksend(&e);
        c.arg("serve").stdout(Stdio::null()).stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let start = Instant::now();
    while server.messages().len() < 20 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.messages().len() >= 20, "delivery never started");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)),
        Some(0),
        "exit 0 after SIGTERM"
    );
    let received = server.messages().len();
    assert!(received < 300, "SIGTERM came mid-delivery");
    let conns = rt.block_on(server.wait_closed(server.connections().len()));
    for c in &conns {
        assert!(
            c.quit,
            "a connection ended without QUIT: {:?}",
            c.commands.last()
        );
    }
    // Nothing lost: what the server got is delivered, the rest scheduled.
    let o = bs(&e, &["queue", "stats", "--json"]);
    let s = json(&o.stdout);
    let get = |k: &str| s["by_state"].get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(get("delivered"), received as u64, "{s}");
    assert_eq!(get("scheduled"), 300 - received as u64, "{s}");
    assert_eq!(get("leased"), 0);
}

fn scrape(port: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        .unwrap_or_default()
}

/// Sums every sample of `name` (over all label sets).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_during_a_run_match_what_the_server_received() {
    let rt = rt();
    let server = rt.block_on(ScriptedServer::start(Script::default().with_handler(|c| {
        (c.verb == "RCPT" && c.line.contains("u7@")).then(|| reply("550 5.1.1 User unknown"))
    })));
    let e = env(Some(server.addr), "");
    enqueue_n(&e, 50);
    let mut child = {
        let mut c = bulksend(&e);
        c.arg("serve").stdout(Stdio::null()).stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let start = Instant::now();
    let mut text = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        text = scrape(e.metrics_port);
        if metric_sum(&text, "bulksend_messages_delivered_total")
            + metric_sum(&text, "bulksend_messages_bounced_total")
            >= 50.0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(0));
    assert_eq!(
        metric_sum(&text, "bulksend_messages_delivered_total"),
        server.messages().len() as f64,
        "{text}"
    );
    assert_eq!(metric_sum(&text, "bulksend_messages_bounced_total"), 1.0);
    assert!(text.contains("# HELP bulksend_messages_delivered_total"));
    assert!(
        text.contains("bulksend_smtp_transaction_seconds_bucket"),
        "histograms are exported with buckets"
    );
    assert!(
        text.contains("bulksend_smtp_phase_seconds_bucket{phase=\"rcpt\""),
        "per-phase latency"
    );
    assert!(text.contains("bulksend_destinations_paused"));
    assert!(
        text.contains("bulksend_queue_recipients{state="),
        "queue depth gauge"
    );
}

#[test]
fn demo_runs_on_embedded_defaults() {
    let o = run({
        let mut c = Command::cargo_bin("bulksend").unwrap();
        c.args(["demo", "--messages", "300"]);
        for (k, _) in std::env::vars() {
            if k.starts_with("BULKSEND_") {
                c.env_remove(k);
            }
        }
        c
    });
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout
            .contains("OK: the sink received exactly what the engine recorded as delivered"),
        "{}",
        o.stdout
    );
}
