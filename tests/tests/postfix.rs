//! bulksend against a real Postfix `smtpd` on loopback (a private instance, see
//! `bulksend_tests::postfix`). The judge is Postfix's own log and what Postfix delivered, never
//! bulksend's view of itself.
//!
//! Skips (passes with a notice) when /usr/sbin/postfix is not installed. CI installs it:
//! `echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections &&
//!  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulksend_config::{Settings, TlsPolicy};
use bulksend_engine::delivery::Engine;
use bulksend_engine::events::{EventKind, MemoryEvents};
use bulksend_engine::route::{NoDns, Router};
use bulksend_queue::{NewMessage, Queue, QueueOptions, RecipientState};
use bulksend_tests::postfix::{progress, to_lf, PostfixInstance, PostfixOptions};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "sink.test";
const USERS: usize = 50;
/// Messages with one to three recipients.
const SMALL: usize = 1_680;
/// Messages with all 50 users as recipients.
const WIDE: usize = 200;
/// 5 MB messages.
const LARGE: usize = 20;
/// Messages enqueued while Postfix defers every session.
const DEFERRED_PHASE: usize = 100;
const CONNECTIONS: usize = 10;

fn user(i: usize) -> String {
    format!("u{}@{DOMAIN}", i % USERS)
}

fn message(seq: usize, to: Vec<String>, body_text: &str) -> NewMessage {
    let body = format!(
        "From: Sender <news@esp.test>\r\n\
         To: {}\r\n\
         Subject: postfix test {seq}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\
         Message-ID: <{seq}.postfix-test@esp.test>\r\n\
         X-Seq: {seq}\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         {body_text}",
        to[0]
    );
    NewMessage {
        idempotency_key: Some(format!("pf-{seq}")),
        sender: "bounces@esp.test".into(),
        recipients: to,
        body: body.into_bytes(),
    }
}

fn small_text(seq: usize) -> String {
    format!("Hello {seq}.\r\n.A line that starts with a dot.\r\n..two dots\r\nThe end.\r\n")
}

/// About 5 MB of base64 in 996-character lines (RFC 5322's limit is 998 + CRLF).
fn large_text(seq: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seq as u64;
    let mut s = String::with_capacity(5 * 1024 * 1024 + 8192);
    while s.len() < 5 * 1024 * 1024 {
        for _ in 0..996 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push(B64[(x % 64) as usize] as char);
        }
        s.push_str("\r\n");
    }
    s
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn settings(dir: &std::path::Path, pf: std::net::SocketAddr) -> Settings {
    let mut s = Settings::default();
    s.queue.path = dir.join("queue");
    s.routes = BTreeMap::from([(DOMAIN.to_owned(), pf.to_string())]);
    s.smtp.helo_name = "bulksend.test".into();
    s.smtp.tls = TlsPolicy::Disabled;
    s.smtp.max_messages_per_connection = 100;
    let t = &mut s.smtp.timeouts;
    t.connect = Duration::from_secs(10);
    t.idle = Duration::from_secs(1);
    t.quit = Duration::from_secs(10);
    let d = &mut s.delivery;
    d.max_connections_per_destination = CONNECTIONS;
    d.min_backoff = Duration::from_millis(500);
    d.max_backoff = Duration::from_secs(2);
    d.pause_min = Duration::from_secs(1);
    d.pause_max = Duration::from_secs(2);
    d.shutdown_grace = Duration::from_secs(60);
    s
}

fn count(q: &Queue, st: RecipientState) -> u64 {
    q.stats().by_state.get(&st).copied().unwrap_or(0)
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress(&format!("  {what}: {:.1} s", start.elapsed().as_secs_f64()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_messages_to_a_real_postfix() {
    if !bulksend_tests::postfix::installed() {
        println!("SKIPPED: postfix not installed (apt-get install postfix)");
        return;
    }
    let started = Instant::now();
    let users: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let pf = tokio::task::spawn_blocking(move || {
        PostfixInstance::start(PostfixOptions {
            users,
            process_limit: 100,
            ..PostfixOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    progress(&format!(
        "postfix {} on {} in {}",
        pf.name,
        pf.addr,
        pf.dir().display()
    ));

    // Phase 1: Postfix refuses every session with a 4xx greeting.
    pf.set_client_reply(Some("450 4.7.1 Service busy, try again later"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), pf.addr);
    let queue = Arc::new(
        Queue::open(
            &s.queue.path,
            QueueOptions {
                durable: false,
                ..QueueOptions::default()
            },
        )
        .unwrap(),
    );
    let router = Arc::new(Router::new(&s.routes, None, Arc::new(NoDns)));
    let events = Arc::new(MemoryEvents::default());
    let engine = Engine::new(Arc::new(s), queue.clone(), router, events.clone()).unwrap();

    // What Postfix must deliver: content hash (LF endings) → recipients still owed.
    let mut expected: HashMap<[u8; 32], Vec<String>> = HashMap::new();
    let mut total_rcpts = 0u64;
    let mut seq = 0usize;
    let mut enqueue = |msgs: Vec<NewMessage>, expected: &mut HashMap<[u8; 32], Vec<String>>| {
        for m in &msgs {
            let good: Vec<String> = m
                .recipients
                .iter()
                .filter(|r| !r.starts_with("ghost@"))
                .cloned()
                .collect();
            expected.insert(sha(&to_lf(&m.body)), good);
            total_rcpts += m.recipients.len() as u64;
        }
        for r in queue.enqueue_batch(msgs).unwrap() {
            let r = r.unwrap();
            assert!(!r.duplicate && r.suppressed.is_empty(), "{r:?}");
        }
    };
    let batch: Vec<NewMessage> = (0..DEFERRED_PHASE)
        .map(|_| {
            seq += 1;
            message(seq, vec![user(seq)], &small_text(seq))
        })
        .collect();
    enqueue(batch, &mut expected);

    let token = CancellationToken::new();
    let run = {
        let (e, t) = (engine.clone(), token.clone());
        tokio::spawn(async move { e.run(t, false).await })
    };
    let ev = events.clone();
    wait_for("deferred by Postfix's 450", Duration::from_secs(30), || {
        ev.snapshot().iter().any(|e| e.event == EventKind::Deferred)
            && pf.log_count("reject: CONNECT from") > 0
    })
    .await;
    // Let the pause and the back-off play out once more against the refusing server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    pf.set_client_reply(None).unwrap();
    progress("  deferral switched off");

    // Phase 2: the bulk, while the deferred ones come due again.
    let mut batch = Vec::new();
    for i in 0..SMALL {
        seq += 1;
        let n = 1 + i % 3;
        let to = (0..n).map(|k| user(seq + k * 7)).collect();
        batch.push(message(seq, to, &small_text(seq)));
        if i == SMALL / 2 {
            seq += 1;
            batch.push(message(
                seq,
                vec![format!("ghost@{DOMAIN}"), user(seq)],
                &small_text(seq),
            ));
        }
        if batch.len() >= 100 {
            enqueue(std::mem::take(&mut batch), &mut expected);
        }
        if i % (SMALL / WIDE) == 0 {
            seq += 1;
            let all = (0..USERS).map(user).collect();
            batch.push(message(seq, all, &small_text(seq)));
        }
        if i % (SMALL / LARGE) == 0 {
            seq += 1;
            enqueue(
                vec![message(seq, vec![user(seq)], &large_text(seq))],
                &mut expected,
            );
        }
    }
    enqueue(batch, &mut expected);
    engine.wake();
    let messages = expected.len();
    progress(&format!(
        "  enqueued {messages} messages, {total_rcpts} recipients ({:.1} s)",
        started.elapsed().as_secs_f64()
    ));

    let q = queue.clone();
    wait_for(
        "every recipient final in bulksend's queue",
        Duration::from_secs(150),
        || {
            count(&q, RecipientState::Delivered)
                + count(&q, RecipientState::Bounced)
                + count(&q, RecipientState::Suppressed)
                >= total_rcpts
        },
    )
    .await;

    // The unknown recipient is suppressed: a later message to it is not even scheduled.
    seq += 1;
    let later = message(
        seq,
        vec![format!("Ghost@{DOMAIN}"), user(seq)],
        &small_text(seq),
    );
    expected.insert(sha(&to_lf(&later.body)), vec![user(seq)]);
    let later = queue.enqueue(later).unwrap();
    assert_eq!(later.suppressed.len(), 1, "{later:?}");
    engine.wake();
    let q = queue.clone();
    wait_for(
        "the later message delivered",
        Duration::from_secs(30),
        || count(&q, RecipientState::Delivered) >= total_rcpts,
    )
    .await;
    token.cancel();
    let summary = run.await.unwrap();
    progress(&format!("  engine: {summary:?}"));

    // Postfix delivers what it accepted (a pipe per message); wait until its queue is empty.
    wait_for("postfix queue empty", Duration::from_secs(90), || {
        pf.queue_len() == 0
    })
    .await;
    // Sessions log their "disconnect" after the client's QUIT; give postlogd a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // --- The judge: Postfix's log. ---
    let log = pf.maillog();
    let problems = pf.client_problems();
    assert!(
        problems.is_empty(),
        "Postfix complained about its client:\n{}",
        problems.join("\n")
    );
    let sessions = pf.sessions();
    // Concurrency as Postfix saw it: sessions open at once, in log order.
    let (mut open, mut max_open, mut connects) = (0i64, 0i64, 0usize);
    for l in log.lines().filter(|l| l.contains("/smtpd[")) {
        if l.contains(": connect from ") {
            connects += 1;
            open += 1;
            max_open = max_open.max(open);
        } else if l.contains(": disconnect from ") {
            open -= 1;
        }
    }
    assert_eq!(
        sessions.len(),
        connects,
        "every session Postfix saw has its disconnect record"
    );
    let no_quit: Vec<&str> = sessions
        .iter()
        .filter(|s| !s.quit)
        .map(|s| s.line.as_str())
        .collect();
    assert!(
        no_quit.is_empty(),
        "{} of {} sessions ended without QUIT:\n{}",
        no_quit.len(),
        sessions.len(),
        no_quit.join("\n")
    );
    let refused = pf.log_count("reject: CONNECT from");
    assert!(refused > 0, "the deferral phase happened");
    // Postfix runs with smtpd_forbid_unauth_pipelining and reject_unauth_pipelining, and
    // found nothing to complain about above; this says the envelopes sent behind the dot
    // were among what it checked.
    assert!(
        summary.pipelined > 100,
        "envelopes went out behind the previous dot: {summary:?}"
    );
    let ghost_rejects = log
        .lines()
        .filter(|l| l.contains("reject: RCPT") && l.to_lowercase().contains("<ghost@sink.test>"))
        .count();
    assert_eq!(
        ghost_rejects, 1,
        "the unknown user was offered exactly once"
    );
    assert!(
        log.contains("550 5.1.1 <ghost@sink.test>"),
        "rejected as unknown"
    );
    assert!(
        max_open >= CONNECTIONS as i64 / 2,
        "many concurrent sessions: at most {max_open} were open at once"
    );

    // --- Every accepted message arrived, with its content, once per recipient. ---
    let delivered = pf.delivered().unwrap();
    let mut owed = expected.clone();
    let mut unexpected = 0;
    for d in &delivered {
        match owed.get_mut(&sha(&d.content)) {
            Some(rcpts) => {
                for r in &d.recipients {
                    let pos = rcpts.iter().position(|x| x.eq_ignore_ascii_case(r));
                    assert!(pos.is_some(), "{r} delivered twice or not addressed");
                    rcpts.remove(pos.unwrap());
                }
            }
            None => unexpected += 1,
        }
    }
    assert_eq!(unexpected, 0, "deliveries whose content matches no message");
    let missing: usize = owed.values().map(Vec::len).sum();
    assert_eq!(missing, 0, "recipients Postfix never delivered");
    let delivered_rcpts: usize = delivered.iter().map(|d| d.recipients.len()).sum();

    // --- bulksend's side agrees. ---
    let sup = queue
        .suppressed(&format!("ghost@{DOMAIN}"))
        .unwrap()
        .expect("ghost is on the suppression list");
    assert!(sup.reason.contains("5.1.1"), "{sup:?}");
    let evs = events.snapshot();
    let deferred = evs
        .iter()
        .filter(|e| e.event == EventKind::Deferred)
        .count();
    let bounced: Vec<_> = evs
        .iter()
        .filter(|e| e.event == EventKind::Bounced)
        .collect();
    assert_eq!(bounced.len(), 1, "{bounced:?}");
    assert_eq!(bounced[0].code, Some(550));
    assert!(deferred > 0);

    progress(&format!(
        "postfix judged: {} sessions (all quit=1), {refused} refused with 450 at connect, \
         {} deliveries = {} messages / {delivered_rcpts} recipients, content hashes match, \
         up to {max_open} concurrent sessions, ghost rejected once and suppressed, {deferred} deferred events; \
         {:.1} s",
        sessions.len(),
        delivered.len(),
        expected.len(),
        started.elapsed().as_secs_f64()
    ));
}
