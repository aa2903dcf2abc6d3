//! End-to-end delivery: the real queue, the real engine and SMTP client, scripted SMTP servers
//! on loopback. Every claim is checked from what the servers received.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulksend_config::{Settings, TlsPolicy};
use bulksend_engine::delivery::{Engine, RunSummary};
use bulksend_engine::events::{EventKind, MemoryEvents};
use bulksend_engine::route::{NoDns, Router};
use bulksend_queue::{NewMessage, Queue, QueueOptions, RecipientState};
use bulksend_tests::{reply, Action, Script, ScriptedServer};
use tokio_util::sync::CancellationToken;

fn base_settings(dir: &std::path::Path, routes: &[(&str, std::net::SocketAddr)]) -> Settings {
    let mut s = Settings::default();
    s.queue.path = dir.join("queue");
    s.routes = routes
        .iter()
        .map(|(d, a)| (d.to_string(), a.to_string()))
        .collect::<BTreeMap<_, _>>();
    s.smtp.helo_name = "bulksend.test".into();
    s.smtp.tls = TlsPolicy::Disabled;
    let t = &mut s.smtp.timeouts;
    t.connect = Duration::from_secs(5);
    t.greeting = Duration::from_secs(10);
    t.idle = Duration::from_millis(300);
    t.quit = Duration::from_secs(2);
    let d = &mut s.delivery;
    d.max_connections_per_destination = 4;
    d.min_backoff = Duration::from_millis(300);
    d.max_backoff = Duration::from_secs(1);
    d.pause_min = Duration::from_secs(1);
    d.pause_max = Duration::from_secs(2);
    d.shutdown_grace = Duration::from_secs(10);
    s
}

struct Rig {
    _dir: tempfile::TempDir,
    queue: Arc<Queue>,
    engine: Engine,
    events: Arc<MemoryEvents>,
}

fn rig(dir: tempfile::TempDir, settings: Settings) -> Rig {
    rig_with(dir, settings, QueueOptions::default())
}

fn rig_with(dir: tempfile::TempDir, settings: Settings, opts: QueueOptions) -> Rig {
    let opts = QueueOptions {
        max_queue_lifetime: settings.delivery.max_queue_lifetime,
        ..opts
    };
    let queue = Arc::new(Queue::open(&settings.queue.path, opts).unwrap());
    let router = Arc::new(Router::new(
        &settings.routes,
        settings.dns.smtp_port,
        Arc::new(NoDns),
    ));
    let events = Arc::new(MemoryEvents::default());
    let engine = Engine::new(Arc::new(settings), queue.clone(), router, events.clone()).unwrap();
    Rig {
        _dir: dir,
        queue,
        engine,
        events,
    }
}

/// A rig whose queue takes back leases after 1 s (the default is an hour).
fn rig_with_one_second_leases(dir: tempfile::TempDir, settings: Settings) -> Rig {
    let opts = QueueOptions {
        lease_timeout: Some(Duration::from_secs(1)),
        ..QueueOptions::default()
    };
    rig_with(dir, settings, opts)
}

fn msg(from: &str, to: &[String], i: usize) -> NewMessage {
    NewMessage {
        idempotency_key: None,
        sender: from.to_owned(),
        recipients: to.to_vec(),
        body: format!("Subject: test {i}\r\nX-Seq: {i}\r\n\r\nHello {i}\r\n.leading dot\r\n")
            .into_bytes(),
    }
}

/// Enqueues `n` one-recipient messages, to `u0@domain`, `u1@domain`, ...
fn enqueue_users(q: &Queue, domain: &str, n: usize) {
    for i in 0..n {
        q.enqueue(msg("b@esp.test", &[format!("u{i}@{domain}")], i))
            .unwrap();
    }
}

/// `m` with `lines` more body lines of 78 octets (80 with CRLF).
fn padded(mut m: NewMessage, lines: usize) -> NewMessage {
    for _ in 0..lines {
        m.body.extend_from_slice(&[b'x'; 78]);
        m.body.extend_from_slice(b"\r\n");
    }
    m
}

/// A server that waits `delay` before each reply to the dot (blocking its thread).
async fn slow_server(delay: Duration) -> ScriptedServer {
    ScriptedServer::start(Script::default().with_handler(move |c| {
        (c.line == "<DOT>").then(|| {
            std::thread::sleep(delay);
            reply("250 2.0.0 Ok")
        })
    }))
    .await
}

/// Limits `destination` to one connection.
fn one_connection(s: &mut Settings, destination: &str) {
    s.destinations.insert(
        destination.into(),
        bulksend_config::DestinationOverrides {
            max_connections: Some(1),
            ..Default::default()
        },
    );
}

/// A slow destination ("slow.test": one connection, `delay` before each reply to the dot)
/// and a fast one ("fast.test"), both routed in settings based on `base_settings`.
async fn slow_and_fast(
    dir: &std::path::Path,
    delay: Duration,
) -> (ScriptedServer, ScriptedServer, Settings) {
    let slow = slow_server(delay).await;
    let fast = ScriptedServer::start(Script::default()).await;
    let mut s = base_settings(dir, &[("slow.test", slow.addr), ("fast.test", fast.addr)]);
    one_connection(&mut s, "slow.test");
    (slow, fast, s)
}

/// Drains (delivers until nothing is due or in flight, so a second copy would be sent too);
/// fails the test if that takes longer than `limit`.
async fn drain_within(engine: &Engine, limit: Duration) -> RunSummary {
    tokio::time::timeout(limit, engine.run(CancellationToken::new(), true))
        .await
        .expect("the drain did not finish in time")
}

/// Runs the engine (not draining) until `done` holds or `limit` passes, then shuts it down.
async fn run_until(engine: &Engine, limit: Duration, done: impl Fn() -> bool) -> RunSummary {
    let token = CancellationToken::new();
    let e = engine.clone();
    let t = token.clone();
    let run = tokio::spawn(async move { e.run(t, false).await });
    let start = Instant::now();
    while !done() && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel();
    run.await.unwrap()
}

fn state_count(q: &Queue, state: RecipientState) -> u64 {
    q.stats().by_state.get(&state).copied().unwrap_or(0)
}

#[tokio::test]
async fn delivers_through_the_queue_sharing_transactions() {
    let server = ScriptedServer::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    let r = rig(dir, s);
    let to: Vec<String> = (0..3).map(|i| format!("u{i}@dest.test")).collect();
    for i in 0..50 {
        r.queue.enqueue(msg("bounce@esp.test", &to, i)).unwrap();
    }
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(summary.delivered, 150, "{summary:?}");

    let conns = server.wait_closed(server.connections().len()).await;
    let messages: usize = conns.iter().map(|c| c.messages.len()).sum();
    assert_eq!(
        messages, 50,
        "each message once, its three recipients in one transaction"
    );
    let rcpts: usize = conns.iter().map(|c| c.count("RCPT")).sum();
    assert_eq!(rcpts, 150);
    for c in &conns {
        assert!(c.quit, "every connection ends with QUIT: {:?}", c.commands);
        // Every transaction's recipients arrived in one pipelined batch with MAIL and DATA.
        for b in c.batches.iter().filter(|b| b[0].starts_with("MAIL")) {
            assert_eq!(b.len(), 5, "{b:?}");
        }
    }
    assert!(
        conns.len() <= 4,
        "at most the connection limit: {}",
        conns.len()
    );
    assert!(server.max_concurrent() <= 4);
    assert_eq!(state_count(&r.queue, RecipientState::Delivered), 150);
    let ev = r.events.snapshot();
    assert_eq!(
        ev.iter()
            .filter(|e| e.event == EventKind::Delivered)
            .count(),
        150
    );
    assert!(ev
        .iter()
        .all(|e| e.code == Some(250) && e.destination.contains("127.0.0.1")));
}

#[tokio::test]
async fn transient_4xx_is_retried_after_backoff_and_delivered() {
    let refusals = Arc::new(AtomicUsize::new(0));
    let r2 = refusals.clone();
    // The first three RCPTs get 451; after that the server has "recovered".
    let server = ScriptedServer::start(Script::default().with_handler(move |c| {
        (c.verb == "RCPT" && r2.fetch_add(1, Ordering::SeqCst) < 3)
            .then(|| reply("451 4.3.0 Temporary lookup failure"))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    let r = rig(dir, s);
    enqueue_users(&r.queue, "dest.test", 3);
    let q = r.queue.clone();
    let summary = run_until(&r.engine, Duration::from_secs(30), || {
        state_count(&q, RecipientState::Delivered) == 3
    })
    .await;
    assert_eq!(
        state_count(&r.queue, RecipientState::Delivered),
        3,
        "{summary:?}"
    );
    let rcpt_cmds: Vec<String> = server
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("RCPT"))
        .collect();
    assert_eq!(
        rcpt_cmds.len(),
        6,
        "each recipient tried twice: {rcpt_cmds:?}"
    );
    let ev = r.events.snapshot();
    for i in 0..3 {
        let mine: Vec<_> = ev
            .iter()
            .filter(|e| e.recipient == format!("u{i}@dest.test"))
            .collect();
        assert_eq!(mine.len(), 2);
        assert_eq!(
            (mine[0].event, mine[0].code, mine[0].attempt),
            (EventKind::Deferred, Some(451), 1)
        );
        assert!(mine[0].next_attempt.is_some());
        assert_eq!((mine[1].event, mine[1].attempt), (EventKind::Delivered, 2));
    }
    // Not a reputation signal: the destination was never paused.
    assert!(r.engine.destinations().iter().all(|d| d.pauses == 0));
}

#[tokio::test]
async fn unknown_user_is_bounced_once_suppressed_and_never_tried_again() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.verb == "RCPT" && c.line.contains("ghost@"))
            .then(|| reply("550 5.1.1 <ghost@dest.test>: Recipient address rejected: User unknown"))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    // One connection: transactions are strictly sequential, so the suppression recorded after
    // the first must stop the second (checked right before sending).
    s.delivery.max_connections_per_destination = 1;
    let r = rig(dir, s);
    for i in 0..3 {
        r.queue
            .enqueue(msg(
                "b@esp.test",
                &["ghost@dest.test".into(), format!("ok{i}@dest.test")],
                i,
            ))
            .unwrap();
    }
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(
        (summary.delivered, summary.bounced, summary.suppressed),
        (3, 1, 2),
        "{summary:?}"
    );
    let ghost_rcpts = server
        .commands()
        .iter()
        .filter(|c| c.contains("ghost@"))
        .count();
    assert_eq!(
        ghost_rcpts, 1,
        "the unknown address was offered exactly once"
    );
    let sup = r
        .queue
        .suppressed("ghost@dest.test")
        .unwrap()
        .expect("suppressed");
    assert!(sup.reason.contains("5.1.1"), "{sup:?}");

    // A later enqueue is suppressed at once, and a run does not offer it.
    let e = r
        .queue
        .enqueue(msg("b@esp.test", &["GHOST@dest.test".into()], 9))
        .unwrap();
    assert_eq!(e.suppressed.len(), 1);
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(summary.delivered, 0);
    assert_eq!(
        server
            .commands()
            .iter()
            .filter(|c| c.to_lowercase().contains("ghost@"))
            .count(),
        1
    );
    let ev = r.events.snapshot();
    let bounce = ev.iter().find(|e| e.event == EventKind::Bounced).unwrap();
    assert_eq!(
        (
            bounce.code,
            bounce.enhanced.as_deref(),
            bounce.class.as_str()
        ),
        (Some(550), Some("5.1.1"), "invalid_recipient")
    );
}

#[tokio::test]
async fn reputation_421_pauses_one_destination_while_another_runs_at_full_speed() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let bad = ScriptedServer::start(Script::default().with_handler(move |c| {
        (!h.load(Ordering::SeqCst) && c.verb == "MAIL")
            .then(|| reply("421 4.7.0 Too many connections from your IP, closing"))
    }))
    .await;
    // The good server is slow enough per message that the engine needs parallel connections.
    let good = slow_server(Duration::from_millis(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(
        dir.path(),
        &[("bad.test", bad.addr), ("good.test", good.addr)],
    );
    let r = rig(dir, s);
    for i in 0..40 {
        r.queue
            .enqueue(msg("b@esp.test", &[format!("u{i}@bad.test")], i))
            .unwrap();
        r.queue
            .enqueue(msg("b@esp.test", &[format!("u{i}@good.test")], i))
            .unwrap();
    }
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(summary.delivered, 40, "{summary:?}");
    assert_eq!(
        good.messages().len(),
        40,
        "the healthy destination got everything"
    );
    assert_eq!(
        good.max_concurrent(),
        4,
        "and used its full connection limit"
    );
    assert!(bad.messages().is_empty());
    // The 421 paused the bad destination and halved its limit; nothing was bounced.
    let st = r.engine.destinations();
    let b = st
        .iter()
        .find(|d| d.key.0.contains(&bad.addr.port().to_string()))
        .unwrap();
    assert!(b.pauses >= 1 && b.limit <= 2, "{b:?}");
    assert_eq!(summary.bounced, 0);
    assert_eq!(state_count(&r.queue, RecipientState::Scheduled), 40);
    // It saw far fewer connections than messages: the engine stopped instead of hammering.
    // At most the full limit (4) before the first 421, then the halved limits (2, 1, ...)
    // once per pause that ended while the run lasted.
    assert!(
        bad.connections().len() <= 8,
        "{} connections",
        bad.connections().len()
    );
    assert!(
        bad.connections().iter().all(|c| !c.quit),
        "no QUIT after 421"
    );

    // The server recovers; after the pause the destination resumes by itself.
    healthy.store(true, Ordering::SeqCst);
    let q = r.queue.clone();
    run_until(&r.engine, Duration::from_secs(30), || {
        state_count(&q, RecipientState::Delivered) == 80
    })
    .await;
    assert_eq!(bad.messages().len(), 40);
}

#[tokio::test]
async fn harvesting_guard_pauses_a_destination() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.verb == "RCPT" && c.line.contains("bad")).then(|| reply("550 5.1.1 User unknown"))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    s.delivery.max_connections_per_destination = 1;
    s.delivery.harvest_min_sample = 20;
    s.delivery.harvest_threshold = 0.3;
    s.delivery.harvest_pause = Duration::from_secs(3600);
    let r = rig(dir, s);
    // Half of an ESP's list is bad: 100 messages, one recipient each.
    for i in 0..100 {
        let to = if i % 2 == 0 {
            format!("bad{i}@dest.test")
        } else {
            format!("ok{i}@dest.test")
        };
        r.queue.enqueue(msg("b@esp.test", &[to], i)).unwrap();
    }
    r.engine.run(CancellationToken::new(), true).await;
    let offered = server
        .commands()
        .iter()
        .filter(|c| c.starts_with("RCPT"))
        .count();
    assert!(
        (20..40).contains(&offered),
        "paused soon after the sample filled: {offered} offered"
    );
    let d = &r.engine.destinations()[0];
    assert!(d.paused_until.is_some() && d.pauses == 1, "{d:?}");
    // The rest wait (scheduled after the pause), not bounced.
    assert!(state_count(&r.queue, RecipientState::Scheduled) >= 60);
}

#[tokio::test]
async fn expiry_bounces_with_the_last_transient_reason() {
    let server = ScriptedServer::start(
        Script::default()
            .with_handler(|c| (c.verb == "RCPT").then(|| reply("452 4.2.2 Mailbox full"))),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    s.delivery.max_queue_lifetime = Duration::from_secs(2);
    let r = rig(dir, s);
    r.queue
        .enqueue(msg("b@esp.test", &["full@dest.test".into()], 0))
        .unwrap();
    let q = r.queue.clone();
    run_until(&r.engine, Duration::from_secs(30), || {
        state_count(&q, RecipientState::Expired) == 1
    })
    .await;
    assert_eq!(state_count(&r.queue, RecipientState::Expired), 1);
    let ev = r.events.snapshot();
    let exp = ev
        .iter()
        .find(|e| e.event == EventKind::Expired)
        .expect("expired event");
    assert!(exp.text.contains("Mailbox full"), "{exp:?}");
    assert!(
        server
            .commands()
            .iter()
            .filter(|c| c.starts_with("RCPT"))
            .count()
            >= 2
    );
}

#[tokio::test]
async fn shutdown_mid_delivery_loses_nothing_and_quits_every_connection() {
    // Slow replies after the dot keep transactions in flight when shutdown comes.
    let server = slow_server(Duration::from_millis(50)).await;
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    let path = s.queue.path.clone();
    let r = rig(dir, s);
    enqueue_users(&r.queue, "dest.test", 200);
    let token = CancellationToken::new();
    let (e, t) = (r.engine.clone(), token.clone());
    let run = tokio::spawn(async move { e.run(t, false).await });
    while server.messages().len() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    token.cancel();
    let summary = run.await.unwrap();
    assert!(
        summary.delivered < 200,
        "shutdown came mid-run: {summary:?}"
    );
    let conns = server.wait_closed(server.connections().len()).await;
    for c in &conns {
        assert!(
            c.quit,
            "connection ended without QUIT: {:?}",
            c.commands.last()
        );
    }
    // What the server accepted is recorded as delivered; everything else is scheduled again.
    let received = server.messages().len() as u64;
    assert_eq!(state_count(&r.queue, RecipientState::Delivered), received);
    assert_eq!(
        state_count(&r.queue, RecipientState::Scheduled),
        200 - received
    );
    assert_eq!(state_count(&r.queue, RecipientState::Leased), 0);
    // And it is all still there after reopening.
    let Rig { queue, engine, .. } = r;
    drop(engine);
    drop(queue);
    let q = Queue::open(&path, QueueOptions::default()).unwrap();
    assert_eq!(
        state_count(&q, RecipientState::Delivered) + state_count(&q, RecipientState::Scheduled),
        200
    );
}

#[tokio::test]
async fn unreachable_destination_is_deferred_not_bounced() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(dir.path(), &[("dead.test", dead)]);
    let r = rig(dir, s);
    r.queue
        .enqueue(msg("b@esp.test", &["x@dead.test".into()], 0))
        .unwrap();
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!((summary.deferred, summary.bounced), (1, 0), "{summary:?}");
    let ev = r.events.snapshot();
    assert_eq!(ev[0].class, "unreachable");
    assert_eq!(state_count(&r.queue, RecipientState::Scheduled), 1);
}

#[tokio::test]
async fn stalled_server_after_dot_is_unknown_and_retried() {
    let stalls = Arc::new(AtomicUsize::new(0));
    let s2 = stalls.clone();
    let server = ScriptedServer::start(Script::default().with_handler(move |c| {
        (c.line == "<DOT>" && s2.fetch_add(1, Ordering::SeqCst) == 0).then_some(Action::Stall)
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    s.smtp.timeouts.data_done = Duration::from_millis(500);
    let r = rig(dir, s);
    r.queue
        .enqueue(msg("b@esp.test", &["x@dest.test".into()], 0))
        .unwrap();
    let q = r.queue.clone();
    run_until(&r.engine, Duration::from_secs(20), || {
        state_count(&q, RecipientState::Delivered) == 1
    })
    .await;
    let ev = r.events.snapshot();
    assert_eq!(ev[0].event, EventKind::Unknown, "{ev:?}");
    assert_eq!(ev.last().unwrap().event, EventKind::Delivered);
    assert_eq!(
        server.messages().len(),
        2,
        "retried (policy retry): a possible duplicate, never a loss"
    );
}

/// MX routing on real DNS (hickory-resolver against a DNS server on loopback), with receivers
/// on different 127.0.0.x addresses sharing one port.
#[tokio::test]
async fn mx_preference_fallback_implicit_and_null_mx() {
    use bulksend_engine::route::HickoryDns;
    use bulksend_tests::dns::TestDns;

    // The primary MX (preference 10) is down: nothing listens on 127.0.0.2:port.
    let backup = ScriptedServer::start_on("127.0.0.3:0".parse().unwrap(), Script::default()).await;
    let port = backup.addr.port();
    let best = ScriptedServer::start_on(
        format!("127.0.0.4:{port}").parse().unwrap(),
        Script::default(),
    )
    .await;
    let implicit = ScriptedServer::start_on(
        format!("127.0.0.5:{port}").parse().unwrap(),
        Script::default(),
    )
    .await;

    let dns = TestDns::start().await;
    // fallback.test: 10 → down, 20 → backup.
    dns.add_mx("fallback.test", 10, "mx1.fallback.test", 300);
    dns.add_a("mx1.fallback.test", "127.0.0.2", 300);
    dns.add_mx("fallback.test", 20, "mx2.fallback.test", 300);
    dns.add_a("mx2.fallback.test", "127.0.0.3", 300);
    // pref.test: the lower preference wins while it works.
    dns.add_mx("pref.test", 50, "mx-low.pref.test", 300);
    dns.add_a("mx-low.pref.test", "127.0.0.3", 300);
    dns.add_mx("pref.test", 5, "mx-best.pref.test", 300);
    dns.add_a("mx-best.pref.test", "127.0.0.4", 300);
    // implicit.test: no MX, an A record.
    dns.add_a("implicit.test", "127.0.0.5", 300);
    // null.test: null MX (RFC 7505).
    dns.add_mx("null.test", 0, ".", 300);

    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[]);
    s.dns.smtp_port = Some(port);
    s.dns.nameservers = vec![dns.addr];
    s.smtp.timeouts.connect = Duration::from_secs(2);
    let opts = QueueOptions::default();
    let queue = Arc::new(Queue::open(&s.queue.path, opts).unwrap());
    let resolver = HickoryDns::new(&s.dns.nameservers, Duration::from_secs(2)).unwrap();
    let router = Arc::new(Router::new(&s.routes, s.dns.smtp_port, Arc::new(resolver)));
    let events = Arc::new(MemoryEvents::default());
    let engine = Engine::new(Arc::new(s), queue.clone(), router, events.clone()).unwrap();

    for (i, d) in ["fallback.test", "pref.test", "implicit.test", "null.test"]
        .iter()
        .enumerate()
    {
        queue
            .enqueue(msg("b@esp.test", &[format!("user@{d}")], i))
            .unwrap();
    }
    let summary = engine.run(CancellationToken::new(), true).await;
    assert_eq!((summary.delivered, summary.bounced), (3, 1), "{summary:?}");
    // fallback.test went to the backup after the primary refused the connection;
    // pref.test went to its best MX only.
    let backup_rcpts: Vec<String> = backup
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("RCPT"))
        .collect();
    assert_eq!(backup_rcpts, vec!["RCPT TO:<user@fallback.test>"]);
    let best_rcpts: Vec<String> = best
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("RCPT"))
        .collect();
    assert_eq!(best_rcpts, vec!["RCPT TO:<user@pref.test>"]);
    assert_eq!(implicit.messages().len(), 1);
    let ev = events.snapshot();
    let null = ev.iter().find(|e| e.recipient == "user@null.test").unwrap();
    assert_eq!(null.event, EventKind::Bounced);
    assert!(null.text.contains("null MX"), "{null:?}");
    let fb = ev
        .iter()
        .find(|e| e.recipient == "user@fallback.test")
        .unwrap();
    assert_eq!(fb.mx.as_deref(), Some("mx2.fallback.test"));
}

/// Head-of-line isolation: a slow destination queued ahead of a fast one cannot take the whole
/// in-flight budget; its overflow is postponed and the fast destination goes ahead.
#[tokio::test]
async fn slow_destination_does_not_hold_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let (slow, fast, mut s) = slow_and_fast(dir.path(), Duration::from_millis(300)).await;
    s.delivery.max_in_flight = 40;
    let r = rig(dir, s);
    // Oldest first: every slow recipient is due before any fast one.
    enqueue_users(&r.queue, "slow.test", 100);
    enqueue_users(&r.queue, "fast.test", 30);
    let f = &fast;
    run_until(&r.engine, Duration::from_secs(20), || {
        f.messages().len() == 30
    })
    .await;
    assert_eq!(
        fast.messages().len(),
        30,
        "the fast destination was held up"
    );
    // With one connection at 300 ms a message, the slow one had done only a fraction.
    let slow_done = slow.messages().len();
    assert!(
        slow_done < 70,
        "slow delivered {slow_done}: the test did not exercise the overflow"
    );
    // Nothing was lost or counted as an attempt by the postponement.
    let stats = r.queue.stats();
    let total: u64 = stats.by_state.values().sum();
    assert_eq!(total, 130);
    let listed = r.queue.list(Some(RecipientState::Scheduled), 1000).unwrap();
    assert!(
        listed.iter().all(|rec| rec.attempts == 0),
        "postponed recipients have no attempt"
    );
}

/// Regression: one destination with many times its share of the in-flight budget is drained
/// completely (no early exit, nothing left postponed) and without re-leasing churn.
#[tokio::test]
async fn drain_of_one_big_destination_delivers_everything() {
    let server = ScriptedServer::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    s.delivery.max_in_flight = 40;
    let r = rig(dir, s);
    enqueue_users(&r.queue, "dest.test", 300);
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(summary.delivered, 300, "{summary:?}");
    assert_eq!(server.messages().len(), 300);
    assert_eq!(state_count(&r.queue, RecipientState::Scheduled), 0);
}

/// A "5.1.1" after the dot is one verdict for the whole transaction: with several recipients
/// it must not suppress them all (nor feed the harvesting guard).
#[tokio::test]
async fn unknown_user_after_the_dot_suppresses_only_a_single_recipient() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.line == "<DOT>").then(|| reply("550 5.1.1 Recipient address rejected: User unknown"))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    let r = rig(dir, s);
    r.queue
        .enqueue(msg(
            "b@esp.test",
            &["a@dest.test".into(), "b@dest.test".into()],
            0,
        ))
        .unwrap();
    r.queue
        .enqueue(msg("b@esp.test", &["solo@dest.test".into()], 1))
        .unwrap();
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(summary.bounced, 3, "{summary:?}");
    assert!(r.queue.suppressed("a@dest.test").unwrap().is_none());
    assert!(r.queue.suppressed("b@dest.test").unwrap().is_none());
    assert!(r.queue.suppressed("solo@dest.test").unwrap().is_some());
}

/// A 5xx greeting (e.g. an IP-level block) is not a verdict on the recipients: they wait and
/// the destination backs off (as Postfix's smtp_skip_5xx_greeting), nothing is bounced.
#[tokio::test]
async fn greeting_5xx_defers_and_backs_off_instead_of_bouncing() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.line == "<GREETING>").then(|| {
            reply(
                "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.spamhaus.org",
            )
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    let r = rig(dir, s);
    enqueue_users(&r.queue, "dest.test", 20);
    let summary = r.engine.run(CancellationToken::new(), true).await;
    assert_eq!(summary.bounced, 0, "{summary:?}");
    assert_eq!(state_count(&r.queue, RecipientState::Scheduled), 20);
    let d = &r.engine.destinations()[0];
    assert!(d.pauses >= 1, "{d:?}");
    // Every refused session was ended with QUIT (the server said 554, the dialogue is in step).
    let conns = server.wait_closed(server.connections().len()).await;
    assert!(conns.iter().all(|c| c.quit), "QUIT after a 554 greeting");
    assert!(
        conns.len() <= 4,
        "{} connections: no hammering",
        conns.len()
    );
}

/// A server that ends an idle connection with an unprompted "421 4.4.2 idle timeout": the
/// next message must go out on a fresh connection, and the 421 must not read as a reputation
/// deferral that pauses the destination.
#[tokio::test]
async fn pooled_connection_closed_by_the_server_is_not_reused() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let delivered = Arc::new(AtomicUsize::new(0));
    let d2 = delivered.clone();
    let server = tokio::spawn(async move {
        let mut conn = 0;
        while let Ok((stream, _)) = listener.accept().await {
            conn += 1;
            let first = conn == 1;
            let d3 = d2.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 idle.test ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if in_data {
                        if line == ".\r\n" {
                            in_data = false;
                            d3.fetch_add(1, Ordering::SeqCst);
                            w.write_all(b"250 2.0.0 Ok\r\n").await.unwrap();
                            if first {
                                // Idle timeout on the server side, announced, then closed.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let _ = w
                                    .write_all(b"421 4.4.2 idle.test Error: timeout exceeded\r\n")
                                    .await;
                                return;
                            }
                        }
                        continue;
                    }
                    let up = line.to_ascii_uppercase();
                    let answer: &[u8] = if up.starts_with("EHLO") {
                        b"250-idle.test\r\n250 PIPELINING\r\n"
                    } else if up.starts_with("DATA") {
                        in_data = true;
                        b"354 go\r\n"
                    } else if up.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    w.write_all(answer).await.unwrap();
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", addr)]);
    s.delivery.max_connections_per_destination = 1;
    s.smtp.timeouts.idle = Duration::from_secs(10);
    let r = rig(dir, s);
    r.queue
        .enqueue(msg("b@esp.test", &["one@dest.test".into()], 0))
        .unwrap();
    let token = CancellationToken::new();
    let (e, t) = (r.engine.clone(), token.clone());
    let run = tokio::spawn(async move { e.run(t, false).await });
    let start = Instant::now();
    while delivered.load(Ordering::SeqCst) < 1 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the server's idle timeout fire while the worker holds the connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    r.queue
        .enqueue(msg("b@esp.test", &["two@dest.test".into()], 1))
        .unwrap();
    r.engine.wake();
    while delivered.load(Ordering::SeqCst) < 2 && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    token.cancel();
    let summary = run.await.unwrap();
    server.abort();
    assert_eq!(delivered.load(Ordering::SeqCst), 2, "{summary:?}");
    assert_eq!(
        r.engine.destinations()[0].pauses,
        0,
        "the idle 421 paused the destination"
    );
}

/// The engine renews the leases of jobs waiting in a slow destination's ready queue, so the
/// queue's lease timeout never hands them out a second time while they wait: with a 1 s
/// timeout and ~6 s of work queued behind one slow connection, every message arrives once.
#[tokio::test]
async fn jobs_waiting_longer_than_the_lease_timeout_are_not_sent_twice() {
    let slow = slow_server(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("slow.test", slow.addr)]);
    one_connection(&mut s, "slow.test");
    let r = rig_with_one_second_leases(dir, s);
    enqueue_users(&r.queue, "slow.test", 20);
    let q = &r.queue;
    run_until(&r.engine, Duration::from_secs(30), || {
        state_count(q, RecipientState::Delivered) == 20
    })
    .await;
    assert_eq!(state_count(&r.queue, RecipientState::Delivered), 20);
    let got = slow.messages();
    let mut seqs: Vec<String> = got
        .iter()
        .filter_map(|m| {
            String::from_utf8_lossy(m)
                .lines()
                .find(|l| l.starts_with("X-Seq: "))
                .map(str::to_owned)
        })
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 20);
    assert_eq!(got.len(), 20, "some messages were sent twice");
}

/// A transaction in progress keeps its leases, however long the server takes: with a 1 s
/// lease timeout and a server that answers each connection's first dot after 5 s (nothing
/// is pipelined behind it), no recipient is handed out again and sent a second time, on
/// another connection, while its first transaction waits for the reply.
#[tokio::test]
async fn a_transaction_longer_than_the_lease_timeout_is_not_sent_twice() {
    let slow = ScriptedServer::start(Script::default().holding_dot_reply(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("slow.test", slow.addr)]);
    s.smtp.pipeline_transactions = false;
    let r = rig_with_one_second_leases(dir, s);
    enqueue_users(&r.queue, "slow.test", 3);
    let summary = drain_within(&r.engine, Duration::from_secs(60)).await;
    assert_eq!(summary.delivered, 3, "{summary:?}");
    assert_eq!(state_count(&r.queue, RecipientState::Delivered), 3);
    assert_eq!(slow.messages().len(), 3, "some messages were sent twice");
}

/// A job waiting in a worker for its rate-limit slot holds its leases until the slot: at one
/// message per 2 s each job waits ~2 s for its turn, past a 1 s lease timeout, and is still
/// sent once.
#[tokio::test]
async fn jobs_waiting_for_a_rate_limit_slot_are_not_sent_twice() {
    let server = ScriptedServer::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("rated.test", server.addr)]);
    s.destinations.insert(
        "rated.test".into(),
        bulksend_config::DestinationOverrides {
            max_connections: Some(2),
            rate_limit: Some("30/min".into()),
            ..Default::default()
        },
    );
    let r = rig_with_one_second_leases(dir, s);
    enqueue_users(&r.queue, "rated.test", 5);
    let summary = drain_within(&r.engine, Duration::from_secs(60)).await;
    assert_eq!(summary.delivered, 5, "{summary:?}");
    assert_eq!(state_count(&r.queue, RecipientState::Delivered), 5);
    assert_eq!(server.messages().len(), 5, "some messages were sent twice");
}

/// `delivery.max_in_flight_bytes` bounds the prepared bodies held in memory: with 50 KB
/// messages, a slow receiver and room for about two bodies, the engine never holds much more
/// than that (one message always goes), and still delivers everything.
#[tokio::test]
async fn prepared_bodies_stay_within_the_byte_budget() {
    let server = slow_server(Duration::from_millis(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    const BODY: usize = 50_000;
    const BUDGET: usize = 120_000;
    s.delivery.max_in_flight_bytes = BUDGET;
    let r = rig(dir, s);
    let n = 30;
    for i in 0..n {
        let m = padded(
            msg("b@esp.test", &[format!("u{i}@dest.test")], i),
            BODY / 80,
        );
        r.queue.enqueue(m).unwrap();
    }
    let most = AtomicUsize::new(0);
    let (e, srv) = (&r.engine, &server);
    run_until(&r.engine, Duration::from_secs(60), || {
        most.fetch_max(e.in_flight_bytes(), Ordering::Relaxed);
        srv.messages().len() == n
    })
    .await;
    assert_eq!(server.messages().len(), n, "everything delivered");
    let most = most.into_inner();
    assert!(most > 0, "the bodies were seen in flight");
    assert!(
        most <= BUDGET + BODY + 1_000,
        "held {most} bytes of bodies, budget {BUDGET}"
    );
    assert_eq!(r.engine.in_flight_bytes(), 0, "all released after the run");
}

/// Head-of-line isolation also holds for body bytes: a slow destination (1.5 s a message,
/// so its ready jobs wait past `STUCK_AFTER`) whose big messages fill
/// `delivery.max_in_flight_bytes` gives its overflow back, so a fast destination's mail,
/// due after all of the slow one's, is taken and delivered meanwhile.
// Multi-threaded: the slow server's handler blocks the thread it runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_destination_does_not_hold_the_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (_slow, fast, mut s) = slow_and_fast(dir.path(), Duration::from_millis(1500)).await;
    // Room for ~10 bodies; the recipient budget is no limit here.
    s.delivery.max_in_flight_bytes = 500_000;
    let r = rig(dir, s);
    let big = |to: String, i: usize| padded(msg("b@esp.test", &[to], i), 600);
    // Oldest first: every slow recipient is due before any fast one.
    for i in 0..40 {
        r.queue.enqueue(big(format!("u{i}@slow.test"), i)).unwrap();
    }
    for i in 0..30 {
        r.queue.enqueue(big(format!("u{i}@fast.test"), i)).unwrap();
    }
    let f = &fast;
    // Without the byte-aware give-back, the fast mail waits for all 40 slow messages (60 s).
    run_until(&r.engine, Duration::from_secs(40), || {
        f.messages().len() == 30
    })
    .await;
    assert_eq!(
        fast.messages().len(),
        30,
        "the fast destination was held up"
    );
    let total: u64 = r.queue.stats().by_state.values().sum();
    assert_eq!(total, 70);
}

/// A reputation deferral in reply to a dot that already has the next envelope behind it: the
/// connection still carries that transaction (the server will answer its DATA with 354, and
/// anything but the message would be read as content), sends nothing more ahead, QUITs, and
/// the destination pauses. Nothing is lost or sent twice.
#[tokio::test]
async fn reputation_reply_to_a_dot_with_an_envelope_behind_it() {
    let deferred = Arc::new(AtomicBool::new(false));
    let d = deferred.clone();
    let server = ScriptedServer::start(Script::default().holding_dot_reply(2).with_handler(
        move |c| {
            (c.line == "<DOT>" && c.conn == 0 && c.messages == 2).then(|| {
                d.store(true, Ordering::SeqCst);
                reply("451 4.7.650 The mail server has been temporarily rate limited due to IP reputation")
            })
        },
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    s.delivery.max_connections_per_destination = 1;
    let r = rig(dir, s);
    enqueue_users(&r.queue, "dest.test", 6);
    let q = r.queue.clone();
    let summary = run_until(&r.engine, Duration::from_secs(30), || {
        state_count(&q, RecipientState::Delivered) == 6
    })
    .await;
    assert!(deferred.load(Ordering::SeqCst));
    assert_eq!(
        state_count(&r.queue, RecipientState::Delivered),
        6,
        "{summary:?}"
    );
    // The refused message, and those waiting when the destination paused.
    assert!(summary.deferred >= 1, "{summary:?}");
    assert!(summary.pipelined >= 2, "{summary:?}");
    let conns = server.wait_closed(server.connections().len()).await;
    let first = &conns[0];
    // Message 2's dot had message 3's envelope behind it; message 3 went on this connection,
    // with nothing behind its own dot, and then the connection ended with QUIT.
    assert_eq!(first.behind_dot[1].len(), 3, "{:?}", first.behind_dot);
    assert_eq!(first.messages.len(), 3, "{:?}", first.commands);
    assert!(first.behind_dot[2].is_empty(), "{:?}", first.behind_dot);
    assert_eq!(first.count("MAIL"), 3, "{:?}", first.commands);
    assert!(first.quit);
    let d = &r.engine.destinations()[0];
    assert!(d.pauses >= 1, "{d:?}");
    // Every message arrived once, the deferred one twice (its first copy was refused).
    let received: usize = conns.iter().map(|c| c.messages.len()).sum();
    assert_eq!(received, 7);
    assert!(conns.iter().all(|c| c.quit));
}

/// `delivery.max_unrecorded_per_connection = 0`: no message's data goes out while an earlier
/// outcome on its connection is still being written. Checked from the server: when a
/// message's data ends, every message it answered before is a delivered record in the queue.
/// The queue holds each outcome's commit for 500 ms, so an overlap cannot hide; with the
/// default (8) the same check sees it.
#[tokio::test]
async fn with_no_unrecorded_outcomes_each_is_durable_before_the_next_message_goes_out() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    for (max_unrecorded, overlap_expected) in [(0, false), (8, true)] {
        let queue: Arc<std::sync::OnceLock<Arc<Queue>>> = Arc::default();
        let overlaps = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (q, o, a) = (queue.clone(), overlaps.clone(), answered.clone());
        let server = ScriptedServer::start(Script::default().with_handler(move |c| {
            (c.line == "<DOT>").then(|| {
                let before = a.fetch_add(1, SeqCst) as u64;
                if q.get()
                    .is_some_and(|q| state_count(q, RecipientState::Delivered) < before)
                {
                    o.fetch_add(1, SeqCst);
                }
                reply("250 2.0.0 Ok")
            })
        }))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
        one_connection(&mut s, "dest.test");
        s.delivery.max_unrecorded_per_connection = max_unrecorded;
        let opts = QueueOptions {
            outcome_commit_delay: Duration::from_millis(500),
            outcome_commit_siblings: 0,
            ..QueueOptions::default()
        };
        let r = rig_with(dir, s, opts);
        let _ = queue.set(r.queue.clone());
        enqueue_users(&r.queue, "dest.test", 4);
        let summary = r.engine.run(CancellationToken::new(), true).await;
        assert_eq!(summary.delivered, 4, "{summary:?}");
        assert_eq!(server.messages().len(), 4);
        let seen = overlaps.load(SeqCst);
        assert_eq!(
            seen > 0,
            overlap_expected,
            "max_unrecorded_per_connection = {max_unrecorded}: {seen} messages went out with \
             an earlier outcome unrecorded"
        );
    }
}

/// Recipients in a long transaction can keep the in-flight count above the take loop's refill
/// mark (¾ of `max_in_flight`) for as long as the transaction lasts; the room left still goes
/// to other destinations meanwhile.
#[tokio::test]
async fn room_above_the_refill_mark_still_serves_other_destinations() {
    // "slow.test" never answers the dot: its transaction holds 7 of 8 until `data_done`.
    let slow = ScriptedServer::start(
        Script::default().with_handler(|c| (c.line == "<DOT>").then_some(Action::Stall)),
    )
    .await;
    let fast = ScriptedServer::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(
        dir.path(),
        &[("slow.test", slow.addr), ("fast.test", fast.addr)],
    );
    s.delivery.max_in_flight = 8; // refill mark: 6
    s.smtp.timeouts.data_done = Duration::from_secs(5);
    let r = rig(dir, s);
    let slow_rcpts: Vec<String> = (0..7).map(|i| format!("u{i}@slow.test")).collect();
    r.queue.enqueue(msg("b@esp.test", &slow_rcpts, 0)).unwrap();
    let (q, f) = (r.queue.clone(), &fast);
    let enqueued = AtomicBool::new(false);
    let slow_still_open = AtomicBool::new(false);
    run_until(&r.engine, Duration::from_secs(20), || {
        let leased = q.stats().by_state.get(&RecipientState::Leased).copied();
        // Once the slow transaction holds its 7, the fast message arrives.
        if !enqueued.load(Ordering::Relaxed) && leased == Some(7) {
            q.enqueue(msg("b@esp.test", &["v@fast.test".to_owned()], 1))
                .unwrap();
            r.engine.wake();
            enqueued.store(true, Ordering::Relaxed);
        }
        let done = f.messages().len() == 1;
        if done {
            // The fast one is at most 1 of them: the slow transaction is still open.
            slow_still_open.store(leased >= Some(7), Ordering::Relaxed);
        }
        done
    })
    .await;
    assert_eq!(fast.messages().len(), 1);
    assert!(
        slow_still_open.load(Ordering::Relaxed),
        "the fast message went while the slow transaction held 7 of 8"
    );
}

/// An outcome its worker is about to wait for (the connection has
/// `max_unrecorded_per_connection` in writing) is committed at once, even where the queue holds
/// groups of outcomes for company: with a 10 s hold, 30 messages over one connection all reach
/// the server in well under one hold.
#[tokio::test]
async fn a_worker_waiting_for_its_outcomes_does_not_wait_out_the_commit_delay() {
    let server = ScriptedServer::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = base_settings(dir.path(), &[("dest.test", server.addr)]);
    one_connection(&mut s, "dest.test");
    let opts = QueueOptions {
        outcome_commit_delay: Duration::from_secs(10),
        outcome_commit_siblings: 0,
        ..QueueOptions::default()
    };
    let r = rig_with(dir, s, opts);
    enqueue_users(&r.queue, "dest.test", 30);
    let started = Instant::now();
    let all_sent = std::sync::Mutex::new(None);
    let srv = &server;
    run_until(&r.engine, Duration::from_secs(60), || {
        let done = srv.messages().len() == 30;
        if done {
            all_sent.lock().unwrap().get_or_insert(started.elapsed());
        }
        done
    })
    .await;
    let took = all_sent.lock().unwrap().expect("all 30 reached the server");
    assert!(
        took < Duration::from_secs(9),
        "took {took:?}: a worker waited out the hold"
    );
    assert_eq!(state_count(&r.queue, RecipientState::Delivered), 30);
}
