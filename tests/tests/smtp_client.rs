//! The SMTP client against a scripted server on loopback. Every assertion about what the
//! client did is checked from the server's side (its log), not from the client's view.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulksend_config::{SmtpSettings, Timeouts, TlsPolicy};
use bulksend_engine::smtp::data::normalise;
use bulksend_engine::smtp::{
    prepare, Address, ClientSettings, Phase, RcptResult, Session, SessionError,
};
use bulksend_tests::{reply, Action, Script, ScriptedServer, TestPki};

const LONG: Duration = Duration::from_secs(30);

/// A scripted server's answer to one event.
type Handler = fn(&bulksend_tests::Ctx<'_>) -> Option<Action>;

fn timeouts() -> Timeouts {
    Timeouts {
        connect: LONG,
        greeting: LONG,
        ehlo: LONG,
        starttls: LONG,
        mail: LONG,
        rcpt: LONG,
        data_init: LONG,
        data_block: LONG,
        data_done: LONG,
        rset: LONG,
        quit: Duration::from_secs(5),
        idle: LONG,
    }
}

fn settings_with(t: Timeouts, tls: TlsPolicy, ca: Option<&std::path::Path>) -> Arc<ClientSettings> {
    let smtp = SmtpSettings {
        helo_name: "client.test".into(),
        tls,
        tls_ca_file: ca.map(|p| p.to_owned()),
        timeouts: t,
        ..SmtpSettings::default()
    };
    Arc::new(ClientSettings::from_config(&smtp).unwrap())
}

fn settings() -> Arc<ClientSettings> {
    settings_with(timeouts(), TlsPolicy::Disabled, None)
}

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

fn rcpts(n: usize) -> Vec<Address> {
    (0..n)
        .map(|i| addr(&format!("user{i}@dest.test")))
        .collect()
}

const BODY: &[u8] = b"Subject: hello\r\n\r\nline one\n.dot line\r\nlast";

async fn connect(server: &ScriptedServer, s: Arc<ClientSettings>) -> Result<Session, SessionError> {
    Session::connect(server.addr, "mx.test", s).await
}

#[tokio::test]
async fn pipelined_envelope_arrives_in_one_batch() {
    let server = ScriptedServer::start(Script::default()).await;
    let mut session = connect(&server, settings()).await.unwrap();
    assert!(session.extensions().pipelining);
    let data = prepare(BODY, usize::MAX).unwrap();
    let tx = session
        .send(Some(&addr("bounce@esp.test")), &rcpts(3), &data)
        .await;
    assert!(tx.ended.is_none());
    assert!(
        tx.recipients
            .iter()
            .all(|r| matches!(r, RcptResult::Delivered(_))),
        "{tx:?}"
    );
    session.close().await;

    let conns = server.wait_closed(1).await;
    let c = &conns[0];
    let batch = c.batches.iter().find(|b| b[0].starts_with("MAIL")).unwrap();
    assert_eq!(
        batch,
        &vec![
            format!("MAIL FROM:<bounce@esp.test> SIZE={}", data.size),
            "RCPT TO:<user0@dest.test>".to_owned(),
            "RCPT TO:<user1@dest.test>".to_owned(),
            "RCPT TO:<user2@dest.test>".to_owned(),
            "DATA".to_owned(),
        ],
        "MAIL, every RCPT and DATA must arrive in one read"
    );
    assert_eq!(c.messages, vec![normalise(BODY)]);
    assert!(c.quit && c.client_closed);
}

#[tokio::test]
async fn lockstep_without_pipelining() {
    let server = ScriptedServer::start(Script::default().without("PIPELINING")).await;
    let mut session = connect(&server, settings()).await.unwrap();
    let data = prepare(BODY, usize::MAX).unwrap();
    let tx = session
        .send(Some(&addr("a@esp.test")), &rcpts(3), &data)
        .await;
    assert!(tx
        .recipients
        .iter()
        .all(|r| matches!(r, RcptResult::Delivered(_))));
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    // The client waited for each reply, so every read held exactly one command.
    assert!(c.batches.iter().all(|b| b.len() == 1), "{:?}", c.batches);
    assert_eq!(c.count("RCPT"), 3);
    assert_eq!(c.messages.len(), 1);
    assert!(c.quit);
}

#[tokio::test]
async fn quit_on_success_4xx_5xx_and_all_rejected() {
    // (name, handler, pipelining?)
    let cases: Vec<(&str, Handler)> = vec![
        ("success", |_| None),
        ("mail 5xx", |c| {
            (c.verb == "MAIL").then(|| reply("550 5.7.1 Sender rejected"))
        }),
        ("rcpt 4xx", |c| {
            (c.verb == "RCPT").then(|| reply("451 4.3.0 Try later"))
        }),
        ("data 5xx", |c| {
            (c.verb == "DATA").then(|| reply("554 5.5.1 No valid recipients"))
        }),
        ("dot 5xx", |c| {
            (c.line == "<DOT>").then(|| reply("554 5.7.1 Spam"))
        }),
        ("dot 4xx", |c| {
            (c.line == "<DOT>").then(|| reply("451 4.7.1 Greylisted"))
        }),
        ("all rcpt 5xx", |c| match c.verb.as_str() {
            "RCPT" => Some(reply("550 5.1.1 User unknown")),
            "DATA" => Some(reply("554 5.5.1 Error: no valid recipients")),
            _ => None,
        }),
    ];
    for pipelining in [true, false] {
        for (name, handler) in &cases {
            let mut script = Script::default().with_handler(*handler);
            if !pipelining {
                script = script.without("PIPELINING");
            }
            let server = ScriptedServer::start(script).await;
            let mut session = connect(&server, settings()).await.unwrap();
            let data = prepare(BODY, usize::MAX).unwrap();
            let tx = session
                .send(Some(&addr("a@esp.test")), &rcpts(2), &data)
                .await;
            assert!(tx.ended.is_none(), "{name}: {tx:?}");
            let want_delivered = *name == "success";
            assert_eq!(
                tx.recipients
                    .iter()
                    .all(|r| matches!(r, RcptResult::Delivered(_))),
                want_delivered,
                "{name} pipelining={pipelining}: {tx:?}"
            );
            session.close().await;
            let c = &server.wait_closed(1).await[0];
            assert!(
                c.quit,
                "{name} pipelining={pipelining}: no QUIT: {:?}",
                c.commands
            );
            assert_eq!(c.commands.last().unwrap(), "QUIT", "{name}");
            if *name == "all rcpt 5xx" {
                assert!(
                    c.messages.is_empty(),
                    "body sent although every RCPT was rejected"
                );
                assert!(tx.recipients.iter().all(|r| matches!(
                    r, RcptResult::Rejected { phase: Phase::Rcpt, reply } if reply.code == 550
                )));
                if !pipelining {
                    assert_eq!(c.count("DATA"), 0, "lock-step must not send DATA");
                }
            }
            if *name == "mail 5xx" {
                assert!(tx.recipients.iter().all(|r| matches!(
                    r,
                    RcptResult::Rejected {
                        phase: Phase::Mail,
                        ..
                    }
                )));
                if !pipelining {
                    assert_eq!(c.count("RCPT"), 0);
                }
            }
            if *name == "rcpt 4xx" {
                assert!(tx.recipients.iter().all(|r| matches!(
                    r,
                    RcptResult::Deferred {
                        phase: Phase::Rcpt,
                        ..
                    }
                )));
            }
        }
    }
}

#[tokio::test]
async fn mixed_recipients_share_one_transaction() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.verb == "RCPT" && c.line.contains("user1"))
            .then(|| reply("550 5.1.1 <user1@dest.test>: User unknown"))
    }))
    .await;
    let mut session = connect(&server, settings()).await.unwrap();
    let tx = session
        .send(
            Some(&addr("a@esp.test")),
            &rcpts(3),
            &prepare(BODY, usize::MAX).unwrap(),
        )
        .await;
    assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
    match &tx.recipients[1] {
        RcptResult::Rejected {
            phase: Phase::Rcpt,
            reply,
        } => {
            assert_eq!(reply.code, 550);
            assert_eq!(reply.enhanced.unwrap().to_string(), "5.1.1");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(tx.recipients[2], RcptResult::Delivered(_)));
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    assert_eq!(c.messages.len(), 1);
}

#[tokio::test]
async fn connection_reuse_and_rset_only_when_needed() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.verb == "RCPT" && c.line.contains("unknown")).then(|| reply("550 5.1.1 User unknown"))
    }))
    .await;
    let mut session = connect(&server, settings()).await.unwrap();
    let data = prepare(BODY, usize::MAX).unwrap();
    let from = addr("a@esp.test");
    for _ in 0..2 {
        let tx = session.send(Some(&from), &rcpts(1), &data).await;
        assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
    }
    // Every recipient refused: the transaction is left open on the server...
    let tx = session
        .send(Some(&from), &[addr("unknown@dest.test")], &data)
        .await;
    assert!(matches!(tx.recipients[0], RcptResult::Rejected { .. }));
    assert!(session.is_usable());
    // ...so the next one starts with RSET.
    let tx = session.send(Some(&from), &rcpts(1), &data).await;
    assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
    assert_eq!(session.transactions(), 4);
    session.close().await;

    let conns = server.wait_closed(1).await;
    assert_eq!(conns.len(), 1, "all four transactions on one connection");
    let c = &conns[0];
    assert_eq!(c.messages.len(), 3);
    assert_eq!(c.count("RSET"), 1, "{:?}", c.commands);
    let rset = c.commands.iter().position(|x| x == "RSET").unwrap();
    assert!(c.commands[rset + 1].starts_with("MAIL FROM"));
    assert!(c.commands[..rset].iter().any(|x| x.contains("unknown@")));
}

/// A stalled server trips exactly the timeout of the phase it stalled in.
#[tokio::test]
async fn stall_trips_the_timeout_of_that_phase() {
    let short = Duration::from_millis(300);
    let cases: Vec<(Phase, Handler)> = vec![
        (Phase::Greeting, |c| {
            (c.line == "<GREETING>").then_some(Action::Stall)
        }),
        (Phase::Ehlo, |c| (c.verb == "EHLO").then_some(Action::Stall)),
        (Phase::Mail, |c| (c.verb == "MAIL").then_some(Action::Stall)),
        (Phase::Rcpt, |c| (c.verb == "RCPT").then_some(Action::Stall)),
        (Phase::DataInit, |c| {
            (c.verb == "DATA").then_some(Action::Stall)
        }),
        (Phase::DataDone, |c| {
            (c.line == "<DOT>").then_some(Action::Stall)
        }),
    ];
    for pipelining in [true, false] {
        for (phase, handler) in &cases {
            let mut t = timeouts();
            match phase {
                Phase::Greeting => t.greeting = short,
                Phase::Ehlo => t.ehlo = short,
                Phase::Mail => t.mail = short,
                Phase::Rcpt => t.rcpt = short,
                Phase::DataInit => t.data_init = short,
                Phase::DataDone => t.data_done = short,
                _ => unreachable!(),
            }
            let mut script = Script::default().with_handler(*handler);
            if !pipelining {
                script = script.without("PIPELINING");
            }
            let server = ScriptedServer::start(script).await;
            let started = Instant::now();
            let result = connect(&server, settings_with(t, TlsPolicy::Disabled, None)).await;
            let err = match result {
                Err(e) => e,
                Ok(mut session) => {
                    let tx = session
                        .send(
                            Some(&addr("a@esp.test")),
                            &rcpts(2),
                            &prepare(BODY, usize::MAX).unwrap(),
                        )
                        .await;
                    let e = tx.ended.clone().expect("session must end on a timeout");
                    for r in &tx.recipients {
                        match (phase, r) {
                            (Phase::DataDone, RcptResult::Unknown(e)) => {
                                assert!(matches!(
                                    e,
                                    SessionError::Timeout {
                                        phase: Phase::DataDone,
                                        ..
                                    }
                                ))
                            }
                            (Phase::DataDone, other) => {
                                panic!("after the dot must be Unknown: {other:?}")
                            }
                            (_, RcptResult::Failed(SessionError::Timeout { .. })) => {}
                            (_, other) => panic!("{phase}: {other:?}"),
                        }
                    }
                    session.close().await;
                    e
                }
            };
            let elapsed = started.elapsed();
            assert!(
                matches!(err, SessionError::Timeout { phase: p, after } if p == *phase && after == short),
                "stalled in {phase} (pipelining={pipelining}), got {err:?}"
            );
            // Never gives up before the configured time (a lower bound, not a speed check).
            assert!(elapsed >= short, "{phase}: gave up after {elapsed:?}");
            let c = &server.connections()[0];
            // A timed-out dialogue is out of step: no QUIT is sent into it.
            assert!(!c.quit, "{phase}: QUIT sent after a timeout");
        }
    }
}

/// The data-block timeout is per block: a slow reader whose total time exceeds one block
/// timeout still gets the whole message; a reader that stops trips the data-block timeout.
#[tokio::test]
async fn data_block_timeout_is_per_block() {
    let mut t = timeouts();
    t.data_block = Duration::from_millis(1500);
    let body: Vec<u8> = (0..200_000)
        .flat_map(|i| format!("line {i:08} of a large message body\r\n").into_bytes())
        .collect();
    let data = prepare(&body, usize::MAX).unwrap();

    let script = Script {
        recv_buffer: Some(32 * 1024),
        trickle: Some((Duration::from_millis(20), 64 * 1024)),
        ..Script::default()
    };
    let server = ScriptedServer::start(script).await;
    let mut session = connect(&server, settings_with(t.clone(), TlsPolicy::Disabled, None))
        .await
        .unwrap();
    let started = Instant::now();
    let tx = session
        .send(Some(&addr("a@esp.test")), &rcpts(1), &data)
        .await;
    let took = started.elapsed();
    assert!(
        matches!(tx.recipients[0], RcptResult::Delivered(_)),
        "{tx:?}"
    );
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    assert_eq!(c.messages[0].len(), body.len());
    // Meaningful only if the whole transfer took longer than one block's timeout.
    assert!(
        took > t.data_block,
        "transfer took {took:?}; the test needs it slower"
    );

    let stall = stall_after_354_server().await;
    let mut session = Session::connect(
        stall.0,
        "mx.test",
        settings_with(t.clone(), TlsPolicy::Disabled, None),
    )
    .await
    .unwrap();
    let big: Vec<u8> = body
        .iter()
        .copied()
        .cycle()
        .take(40 * 1024 * 1024)
        .collect();
    let data = prepare(&big, usize::MAX).unwrap();
    let tx = session
        .send(Some(&addr("a@esp.test")), &rcpts(1), &data)
        .await;
    assert!(
        matches!(
            &tx.recipients[0],
            RcptResult::Failed(SessionError::Timeout {
                phase: Phase::DataBlock,
                ..
            })
        ),
        "{:?}",
        tx.recipients[0]
    );
    session.close().await;
}

/// A raw server: greets, accepts the envelope, says 354, then never reads again.
async fn stall_after_354_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(32 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(8).unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"220 stall.test ESMTP\r\n").await.unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let up = line.to_ascii_uppercase();
            let answer: &[u8] = if up.starts_with("EHLO") {
                b"250-stall.test\r\n250 PIPELINING\r\n"
            } else if up.starts_with("DATA") {
                w.write_all(b"354 go\r\n").await.unwrap();
                // Hold both halves, read nothing more.
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            } else {
                b"250 ok\r\n"
            };
            w.write_all(answer).await.unwrap();
        }
    });
    (addr, task)
}

#[tokio::test]
async fn server_421_ends_the_session_at_once() {
    for pipelining in [true, false] {
        let mut script = Script::default().with_handler(|c| {
            (c.verb == "RCPT" && c.line.contains("user1"))
                .then(|| reply("421 4.7.0 Too many connections, closing"))
        });
        if !pipelining {
            script = script.without("PIPELINING");
        }
        let server = ScriptedServer::start(script).await;
        let mut session = connect(&server, settings()).await.unwrap();
        let tx = session
            .send(
                Some(&addr("a@esp.test")),
                &rcpts(3),
                &prepare(BODY, usize::MAX).unwrap(),
            )
            .await;
        assert!(
            matches!(
                tx.ended,
                Some(SessionError::ServerClosing {
                    phase: Phase::Rcpt,
                    ..
                })
            ),
            "{tx:?}"
        );
        assert!(!session.is_usable());
        for r in &tx.recipients {
            assert!(
                matches!(r, RcptResult::Deferred { reply, .. } if reply.code == 421),
                "pipelining={pipelining}: {r:?}"
            );
        }
        session.close().await;
        let c = &server.connections()[0];
        assert!(c.messages.is_empty());
        assert!(!c.quit, "no QUIT after 421");
    }

    // 421 as the greeting: connect fails with it, no QUIT.
    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.line == "<GREETING>").then(|| reply("421 4.3.2 Service not available"))
    }))
    .await;
    let err = connect(&server, settings()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::ServerClosing {
                phase: Phase::Greeting,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn garbage_replies_are_protocol_errors() {
    let cases: Vec<(Phase, Handler)> = vec![
        (Phase::Greeting, |c| {
            (c.line == "<GREETING>").then(|| Action::Raw(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()))
        }),
        (Phase::Ehlo, |c| {
            (c.verb == "EHLO").then(|| Action::Raw(b"HTTP/1.1 400 Bad Request\r\n".to_vec()))
        }),
        (Phase::Ehlo, |c| {
            (c.verb == "EHLO").then(|| Action::Raw(b"250-a\r\n550 b\r\n".to_vec()))
        }),
        (Phase::Mail, |c| {
            (c.verb == "MAIL").then(|| Action::Raw(vec![b'7'; 10_000]))
        }),
        (Phase::Rcpt, |c| {
            (c.verb == "RCPT").then(|| Action::Raw(b"\x00\xff\xfe garbage\r\n".to_vec()))
        }),
    ];
    for (phase, handler) in cases {
        let server = ScriptedServer::start(Script::default().with_handler(handler)).await;
        let err = match connect(&server, settings()).await {
            Err(e) => e,
            Ok(mut session) => {
                let tx = tokio::time::timeout(
                    Duration::from_secs(20),
                    session.send(
                        Some(&addr("a@esp.test")),
                        &rcpts(1),
                        &prepare(BODY, usize::MAX).unwrap(),
                    ),
                )
                .await
                .expect("garbage must not hang the client");
                assert!(matches!(
                    tx.recipients[0],
                    RcptResult::Failed(SessionError::Protocol { .. })
                ));
                session.close().await;
                tx.ended.unwrap()
            }
        };
        assert!(
            matches!(err, SessionError::Protocol { phase: p, .. } if p == phase),
            "{phase}: {err:?}"
        );
    }
}

#[tokio::test]
async fn ehlo_refused_falls_back_to_helo() {
    let server = ScriptedServer::start(
        Script::default()
            .with_handler(|c| (c.verb == "EHLO").then(|| reply("502 5.5.2 EHLO not supported"))),
    )
    .await;
    let mut session = connect(&server, settings()).await.unwrap();
    assert!(!session.extensions().pipelining);
    let tx = session
        .send(
            Some(&addr("a@esp.test")),
            &rcpts(1),
            &prepare(BODY, usize::MAX).unwrap(),
        )
        .await;
    assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    assert_eq!(&c.commands[..2], &["EHLO client.test", "HELO client.test"]);
    // No SIZE= without the SIZE extension.
    assert_eq!(c.commands[2], "MAIL FROM:<a@esp.test>");
}

#[tokio::test]
async fn size_limit_is_honoured() {
    let server =
        ScriptedServer::start(Script::default().without("SIZE").with_ext("SIZE 1000")).await;
    let mut session = connect(&server, settings()).await.unwrap();
    let big = prepare(
        format!("{}\r\n", "x".repeat(98)).repeat(50).as_bytes(),
        usize::MAX,
    )
    .unwrap();
    let tx = session
        .send(Some(&addr("a@esp.test")), &rcpts(1), &big)
        .await;
    assert!(
        matches!(tx.recipients[0], RcptResult::NotAttempted { .. }),
        "{tx:?}"
    );
    assert!(tx.ended.is_none());
    let small = prepare(b"hi", usize::MAX).unwrap();
    let tx = session.send(None, &rcpts(1), &small).await;
    assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    assert_eq!(
        c.count("MAIL"),
        1,
        "the oversized message was never offered"
    );
    assert_eq!(
        c.commands.iter().find(|x| x.starts_with("MAIL")).unwrap(),
        "MAIL FROM:<> SIZE=4"
    );
}

#[tokio::test]
async fn starttls_required_and_opportunistic() {
    let pki = TestPki::new();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    let script = Script {
        tls: Some(pki.server_config.clone()),
        ..Script::default()
    };

    // required + the test CA: verified TLS, EHLO again, message over TLS.
    let server = ScriptedServer::start(script.clone()).await;
    let mut session = connect(
        &server,
        settings_with(timeouts(), TlsPolicy::Required, Some(ca.path())),
    )
    .await
    .unwrap();
    assert!(session.is_tls());
    let tx = session
        .send(
            Some(&addr("a@esp.test")),
            &rcpts(1),
            &prepare(BODY, usize::MAX).unwrap(),
        )
        .await;
    assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    assert!(c.tls && c.quit);
    assert_eq!(c.count("EHLO"), 2, "EHLO again after STARTTLS");
    assert_eq!(c.messages.len(), 1);

    // required without the CA: the certificate does not verify.
    let server = ScriptedServer::start(script.clone()).await;
    let err = connect(
        &server,
        settings_with(timeouts(), TlsPolicy::Required, None),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SessionError::Tls { .. }), "{err:?}");

    // opportunistic: encrypts without verifying.
    let server = ScriptedServer::start(script).await;
    let session = connect(
        &server,
        settings_with(timeouts(), TlsPolicy::Opportunistic, None),
    )
    .await
    .unwrap();
    assert!(session.is_tls());
    session.close().await;

    // required against a server without STARTTLS: refused, and QUIT sent.
    let server = ScriptedServer::start(Script::default()).await;
    let err = connect(
        &server,
        settings_with(timeouts(), TlsPolicy::Required, Some(ca.path())),
    )
    .await
    .unwrap_err();
    assert_eq!(err, SessionError::TlsNotOffered);
    let c = &server.wait_closed(1).await[0];
    assert!(c.quit);
    assert_eq!(c.count("MAIL"), 0);

    // opportunistic against a server without STARTTLS: clear text.
    let server = ScriptedServer::start(Script::default()).await;
    let session = connect(
        &server,
        settings_with(timeouts(), TlsPolicy::Opportunistic, None),
    )
    .await
    .unwrap();
    assert!(!session.is_tls());
    session.close().await;
}

#[tokio::test]
async fn connect_refused_and_greeting_rejection() {
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let err = Session::connect(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "mx.test",
        settings(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SessionError::Connect { .. }), "{err:?}");

    let server = ScriptedServer::start(Script::default().with_handler(|c| {
        (c.line == "<GREETING>").then(|| reply("554 5.7.1 No SMTP service here"))
    }))
    .await;
    let err = connect(&server, settings()).await.unwrap_err();
    assert!(
        matches!(&err, SessionError::Refused { phase: Phase::Greeting, reply } if reply.code == 554)
    );
    let c = &server.wait_closed(1).await[0];
    assert!(c.quit, "QUIT after a 554 greeting");
}

/// RFC 2920 §3.1: a server may answer DATA with 354 although every RCPT was refused. The client
/// ends the empty data at once and the session stays in step.
#[tokio::test]
async fn data_354_without_recipients_sends_only_the_dot() {
    let server = ScriptedServer::start(Script::default().with_handler(|c| match c.verb.as_str() {
        "RCPT" => Some(reply("550 5.1.1 User unknown")),
        "DATA" => Some(reply("354 go ahead")),
        _ => None,
    }))
    .await;
    let mut session = connect(&server, settings()).await.unwrap();
    let tx = session
        .send(
            Some(&addr("a@esp.test")),
            &rcpts(2),
            &prepare(BODY, usize::MAX).unwrap(),
        )
        .await;
    assert!(tx.ended.is_none() && session.is_usable());
    assert!(tx.recipients.iter().all(|r| matches!(
        r,
        RcptResult::Rejected {
            phase: Phase::Rcpt,
            ..
        }
    )));
    session.close().await;
    let c = &server.wait_closed(1).await[0];
    assert_eq!(
        c.messages,
        vec![Vec::<u8>::new()],
        "only the terminating dot, no body"
    );
    assert!(c.quit);
}

#[tokio::test]
async fn server_closing_after_dot_is_unknown() {
    let server = ScriptedServer::start(
        Script::default().with_handler(|c| (c.line == "<DOT>").then_some(Action::Close)),
    )
    .await;
    let mut session = connect(&server, settings()).await.unwrap();
    let tx = session
        .send(
            Some(&addr("a@esp.test")),
            &rcpts(2),
            &prepare(BODY, usize::MAX).unwrap(),
        )
        .await;
    for r in &tx.recipients {
        assert!(
            matches!(
                r,
                RcptResult::Unknown(SessionError::Closed {
                    phase: Phase::DataDone
                })
            ),
            "{r:?}"
        );
    }
    session.close().await;
    assert_eq!(server.connections()[0].messages.len(), 1);
}

/// Before a pooled connection carries another message, `probe_stale` looks whether the
/// server has spoken unprompted (here "421 4.4.2 idle timeout" right after the reply to the
/// first message's dot): then the connection is dead, and closing it sends no QUIT into a
/// closing server. A quiet connection is reused.
#[tokio::test]
async fn probe_finds_an_idle_connection_the_server_gave_up() {
    for unprompted in [false, true] {
        let script = if unprompted {
            Script::default().with_handler(|c| {
                (c.line == "<DOT>" && c.messages == 1).then(|| {
                    Action::Raw(b"250 2.0.0 Ok: queued\r\n421 4.4.2 idle timeout\r\n".to_vec())
                })
            })
        } else {
            Script::default()
        };
        let server = ScriptedServer::start(script).await;
        let mut session = connect(&server, settings()).await.unwrap();
        let data = prepare(BODY, usize::MAX).unwrap();
        let tx = session
            .send(Some(&addr("a@esp.test")), &rcpts(1), &data)
            .await;
        assert!(tx.ended.is_none(), "{tx:?}");
        assert!(
            matches!(tx.recipients[0], RcptResult::Delivered(_)),
            "{tx:?}"
        );
        // The unprompted reply follows the 250 in the same write, but give it time to land.
        let deadline = Instant::now() + Duration::from_secs(5);
        let stale = loop {
            let stale = session.probe_stale().await;
            if stale == unprompted || Instant::now() > deadline {
                break stale;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(stale, unprompted, "unprompted={unprompted}");
        assert_eq!(session.is_usable(), !unprompted);
        if !unprompted {
            // Probing consumed nothing: the next transaction reads its own replies.
            let tx = session
                .send(Some(&addr("a@esp.test")), &rcpts(2), &data)
                .await;
            assert!(tx.ended.is_none(), "{tx:?}");
            assert_eq!(tx.recipients.len(), 2);
        }
        session.close().await;
        let c = &server.connections()[0];
        assert_eq!(c.messages.len(), if unprompted { 1 } else { 2 });
        assert_eq!(c.quit, !unprompted, "QUIT only on a live connection");
    }
}

/// With PIPELINING, the next message's envelope goes out in the same write as this
/// message's dot: the server here answers a dot only once the next DATA has arrived behind
/// it (or after 5 s), and logs what had.
#[tokio::test]
async fn next_envelope_goes_out_behind_the_dot() {
    let server = ScriptedServer::start(Script::default().holding_dot_reply(1)).await;
    let mut session = connect(&server, settings()).await.unwrap();
    let from = addr("a@esp.test");
    let first = prepare(BODY, usize::MAX).unwrap();
    let second = prepare(b"Subject: two\r\n\r\nsecond\r\n", usize::MAX).unwrap();
    let this = session.envelope(Some(&from), &rcpts(2), &first).unwrap();
    let next = session
        .envelope(Some(&from), &[addr("next@dest.test")], &second)
        .unwrap();
    assert!(!next.is_sent());
    let started = Instant::now();
    let (tx, ahead) = session.transact(this, &first, Some(next)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the server had to wait for the envelope: it was not sent behind the dot"
    );
    assert!(tx.ended.is_none(), "{tx:?}");
    assert!(tx
        .recipients
        .iter()
        .all(|r| matches!(r, RcptResult::Delivered(_))));
    let ahead = ahead.expect("the envelope went out behind the dot");
    assert!(ahead.is_sent());
    // Its replies are due: a probe must not take them for unprompted ones.
    assert!(!session.probe_stale().await);
    let (tx, none) = session.transact(ahead, &second, None).await;
    assert!(none.is_none());
    assert!(tx.ended.is_none(), "{tx:?}");
    assert!(
        matches!(tx.recipients[0], RcptResult::Delivered(_)),
        "{tx:?}"
    );
    assert_eq!(session.transactions(), 2);
    session.close().await;

    let c = &server.wait_closed(1).await[0];
    assert_eq!(
        c.behind_dot[0],
        vec![
            format!("MAIL FROM:<a@esp.test> SIZE={}", second.size),
            "RCPT TO:<next@dest.test>".to_owned(),
            "DATA".to_owned(),
        ]
    );
    assert!(c.behind_dot[1].is_empty(), "{:?}", c.behind_dot);
    assert_eq!(
        c.messages,
        vec![
            normalise(BODY),
            normalise(b"Subject: two\r\n\r\nsecond\r\n")
        ]
    );
    assert!(c.quit);
}

/// The next envelope waits for the reply to the dot when a recipient of this message was
/// refused (it may be an unknown user, whose suppression comes first) and when the server
/// does not offer PIPELINING.
#[tokio::test]
async fn next_envelope_waits_after_a_refused_recipient_or_without_pipelining() {
    for pipelining in [true, false] {
        let mut script = Script::default().with_handler(|c| {
            (c.verb == "RCPT" && c.line.contains("unknown"))
                .then(|| reply("550 5.1.1 User unknown"))
        });
        if !pipelining {
            script = script.without("PIPELINING");
        }
        let server = ScriptedServer::start(script).await;
        let mut session = connect(&server, settings()).await.unwrap();
        let from = addr("a@esp.test");
        let data = prepare(BODY, usize::MAX).unwrap();
        let to = if pipelining {
            vec![addr("user0@dest.test"), addr("unknown@dest.test")]
        } else {
            rcpts(1)
        };
        let this = session.envelope(Some(&from), &to, &data).unwrap();
        let next = session.envelope(Some(&from), &rcpts(1), &data).unwrap();
        let (tx, ahead) = session.transact(this, &data, Some(next)).await;
        assert!(ahead.is_none(), "pipelining={pipelining}");
        assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
        let tx = session.send(Some(&from), &rcpts(1), &data).await;
        assert!(matches!(tx.recipients[0], RcptResult::Delivered(_)));
        session.close().await;
        let c = &server.wait_closed(1).await[0];
        assert_eq!(c.messages.len(), 2);
        assert!(
            c.behind_dot.iter().all(|b| b.is_empty()),
            "pipelining={pipelining}: {:?}",
            c.behind_dot
        );
        assert!(c.quit);
    }
}

/// The reply to the dot decides what becomes of the envelope sent behind it: after a 4xx
/// that keeps the session, the envelope's replies are read and the message goes; after a
/// 421 the session is over, nothing of the envelope counts, and there is no QUIT.
#[tokio::test]
async fn reply_to_the_dot_decides_what_becomes_of_the_envelope_behind_it() {
    for closing in [false, true] {
        let server = ScriptedServer::start(Script::default().holding_dot_reply(1).with_handler(
            move |c| {
                (c.line == "<DOT>" && c.messages == 1).then(|| {
                    if closing {
                        reply("421 4.3.2 Service shutting down")
                    } else {
                        reply("451 4.3.0 Temporary failure, try again")
                    }
                })
            },
        ))
        .await;
        let mut session = connect(&server, settings()).await.unwrap();
        let from = addr("a@esp.test");
        let data = prepare(BODY, usize::MAX).unwrap();
        let this = session.envelope(Some(&from), &rcpts(1), &data).unwrap();
        let next = session.envelope(Some(&from), &rcpts(1), &data).unwrap();
        let (tx, ahead) = session.transact(this, &data, Some(next)).await;
        assert!(
            matches!(
                &tx.recipients[0],
                RcptResult::Deferred {
                    phase: Phase::DataDone,
                    ..
                }
            ),
            "{tx:?}"
        );
        if closing {
            assert!(ahead.is_none());
            assert!(tx.ended.is_some());
            assert!(!session.is_usable());
        } else {
            assert!(tx.ended.is_none(), "{tx:?}");
            let (tx, _) = session.transact(ahead.unwrap(), &data, None).await;
            assert!(
                matches!(tx.recipients[0], RcptResult::Delivered(_)),
                "{tx:?}"
            );
        }
        session.close().await;
        let c = &server.wait_closed(1).await[0];
        assert_eq!(c.behind_dot[0].len(), 3, "{:?}", c.behind_dot);
        assert_eq!(c.messages.len(), if closing { 1 } else { 2 });
        assert_eq!(
            c.quit, !closing,
            "QUIT only when the session was still in step"
        );
    }
}
