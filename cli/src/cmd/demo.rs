//! `bulksend demo`: the README's first command. A self-contained run on loopback with embedded
//! defaults: it starts an accept-all SMTP sink on 127.0.0.1, opens a fresh queue in a temporary
//! directory, enqueues messages (lettre-built, several destination domains, a few unknown
//! users), delivers them through the real engine (pipelined SMTP, per-destination pools), and
//! checks the sink's counts against the engine's. Exit status 1 if they disagree.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulksend_config::{Settings, TlsPolicy};
use bulksend_engine::events::{EventKind, MemoryEvents};
use bulksend_engine::sink::{Sink, SinkOptions};
use tokio_util::sync::CancellationToken;

use crate::app;
use bulksend::compose::JsonMessage;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 5000)]
    pub(crate) messages: usize,
    /// Recipients per message.
    #[arg(long, default_value_t = 2)]
    pub(crate) recipients: usize,
}

const DOMAINS: &[&str] = &[
    "alpha.test",
    "bravo.test",
    "charlie.test",
    "delta.test",
    "echo.test",
];

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let sink = Sink::start(
        "127.0.0.1:0".parse()?,
        SinkOptions {
            reject_unknown: true,
        },
    )
    .await?;
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut s = Settings::default();
    s.queue.path = dir.path().join("queue");
    s.events.path = dir.path().join("events.jsonl");
    s.routes.insert("*".into(), sink.addr.to_string());
    s.smtp.helo_name = "demo.bulksend.test".into();
    s.smtp.tls = TlsPolicy::Disabled;
    s.smtp.timeouts.idle = Duration::from_millis(500);
    s.delivery.max_connections_per_destination = 4;
    let settings = Arc::new(s);
    if std::env::var_os("RUST_LOG").is_some() {
        app::init_logging(&settings);
    }
    let queue = app::open_queue(&settings)?;

    println!(
        "bulksend demo: sink on {}, queue in {}",
        sink.addr,
        settings.queue.path.display()
    );
    let t0 = Instant::now();
    let mut batch = Vec::with_capacity(500);
    let mut expected_unknown = 0u64;
    for i in 0..args.messages {
        let to: Vec<String> = (0..args.recipients.max(1))
            .map(|r| {
                let domain = DOMAINS[(i + r) % DOMAINS.len()];
                // One recipient in a hundred does not exist.
                if (i * args.recipients + r) % 100 == 7 {
                    expected_unknown += 1;
                    format!("unknown{i}.{r}@{domain}")
                } else {
                    format!("user{i}.{r}@{domain}")
                }
            })
            .collect();
        let m = JsonMessage {
            id: Some(format!("demo-{i}")),
            from: "newsletter@esp.test".into(),
            to,
            subject: Some(format!("Demo message {i} — grüße")),
            text: Some(format!(
                "Hello,\n\nthis is demo message {i}.\n.\nA line that starts with a dot, above.\n"
            )),
            headers: [("X-Campaign".to_owned(), "demo".to_owned())].into(),
            ..JsonMessage::default()
        };
        batch.push(
            m.build(settings.smtp.max_message_size)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        if batch.len() == 500 || i + 1 == args.messages {
            for r in queue.enqueue_batch(std::mem::take(&mut batch))? {
                r?;
            }
        }
    }
    let enqueue_s = t0.elapsed().as_secs_f64();
    let total_rcpts = (args.messages * args.recipients.max(1)) as u64;
    println!(
        "enqueued {} messages ({total_rcpts} recipients) durably in {enqueue_s:.2}s",
        args.messages
    );

    let events = Arc::new(MemoryEvents::default());
    let engine = app::engine(&settings, queue.clone(), events.clone())?;
    let t1 = Instant::now();
    let summary = engine.run(CancellationToken::new(), true).await;
    let deliver_s = t1.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let st = &sink.stats;
    let received = st.recipients.load(Ordering::Relaxed);
    let ev = events.snapshot();
    let suppressed = queue.suppress_list()?.len() as u64;
    println!(
        "delivered {} recipients in {} SMTP transactions over {} connections in {deliver_s:.2}s ({:.0} recipients/s)",
        summary.delivered,
        st.messages.load(Ordering::Relaxed),
        st.connections.load(Ordering::Relaxed),
        summary.delivered as f64 / deliver_s.max(1e-9)
    );
    println!(
        "bounced {} unknown users (550 5.1.1), now on the suppression list: {suppressed}",
        summary.bounced
    );
    println!(
        "connections ended with QUIT: {} of {}",
        st.quits.load(Ordering::Relaxed),
        st.connections.load(Ordering::Relaxed)
    );
    if let Some(e) = ev.iter().find(|e| e.event == EventKind::Bounced) {
        println!("a bounce event: {}", serde_json::to_string(e)?);
    }
    let ok = received == summary.delivered
        && summary.delivered + summary.bounced == total_rcpts
        && summary.bounced == expected_unknown
        && suppressed == expected_unknown
        && st.quits.load(Ordering::Relaxed) == st.connections.load(Ordering::Relaxed);
    if ok {
        println!("OK: the sink received exactly what the engine recorded as delivered");
        Ok(0)
    } else {
        eprintln!(
            "MISMATCH: sink received {received}, engine delivered {}, bounced {} (expected {expected_unknown})",
            summary.delivered, summary.bounced
        );
        Ok(1)
    }
}
