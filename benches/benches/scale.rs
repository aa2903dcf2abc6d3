//! Delivery rate against many destination domains vs one, through the real resolver.
//!
//! Four in-process accept-all sinks listen on 127.0.0.2..127.0.0.5 on the same port; a
//! loopback DNS server (`bulksend_tests::dns::TestDns`) answers MX and A queries; the engine
//! runs in-process with `HickoryDns` pointed at it, `dns.smtp_port` = the sinks' port, TLS
//! disabled, a non-durable queue (as the `smtp` bench), and `run(drain)`. Three runs of N
//! messages (1 recipient, ~2 KB):
//!
//! 1. **1 domain**: every recipient at `one.test` (MX `mx0.pool.test`) → 1 destination.
//! 2. **1,000 domains / 4 destinations**: `d{i}.test` has MX `mx{i%4}.pool.test`; destinations
//!    are keyed by MX host set, so the 1,000 domains share 4 destinations (4 pools).
//! 3. **1,000 domains / 1,000 destinations**: `e{i}.test` has MX `mx.e{i}.test`, whose A
//!    record is one of the 4 sink addresses → 1,000 destinations, each with its own pool.
//!
//! Connections per destination: `--conns-few` (default 20) for runs 1 and 2, `--conns-many`
//! (default 2) for run 3. The table gives msg/s and the connections the sinks accepted.
//!
//! ```text
//! CARGO_TARGET_DIR=target-sc cargo bench -p bulksend-benches --bench scale -- \
//!     [--n 20000] [--domains 1000] [--conns-few 20] [--conns-many 2]
//! ```
#![allow(clippy::unwrap_used)]

use bulksend_benches::arg;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulksend_config::{Settings, TlsPolicy};
use bulksend_engine::delivery::Engine;
use bulksend_engine::events::NoEvents;
use bulksend_engine::route::{HickoryDns, Router};
use bulksend_engine::sink::{Sink, SinkOptions};
use bulksend_queue::{NewMessage, Queue, QueueOptions};
use bulksend_tests::dns::TestDns;
use tokio_util::sync::CancellationToken;

fn body(seq: usize, to: &str) -> Vec<u8> {
    let mut b = format!(
        "From: news@esp.test\r\nTo: {to}\r\nSubject: scale {seq}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{seq}@esp.test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n";
    while b.len() + line.len() <= 2048 {
        b.extend_from_slice(line);
    }
    b
}

struct Row {
    name: String,
    domains: usize,
    destinations: usize,
    conns_per_dest: usize,
    n: usize,
    secs: f64,
    connections: u64,
    dns_queries: usize,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    name: &str,
    domain: impl Fn(usize) -> String,
    domains: usize,
    destinations: usize,
    conns: usize,
    n: usize,
    port: u16,
    dns: &TestDns,
    sinks: &[Sink],
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let mut s = Settings::default();
    s.queue.path = dir.path().join("queue");
    s.events.path = dir.path().join("events");
    s.smtp.helo_name = "bulksend.test".into();
    s.smtp.tls = TlsPolicy::Disabled;
    s.dns.smtp_port = Some(port);
    s.dns.nameservers = vec![dns.addr];
    s.delivery.max_connections_per_destination = conns;
    let queue = Arc::new(Queue::open(
        &s.queue.path,
        QueueOptions {
            durable: false,
            ..QueueOptions::default()
        },
    )?);
    let mut seq = 0;
    while seq < n {
        let batch: Vec<NewMessage> = (seq..n.min(seq + 500))
            .map(|i| {
                let to = format!("user{}@{}", i / domains, domain(i % domains));
                NewMessage {
                    idempotency_key: None,
                    sender: "bounces@esp.test".into(),
                    body: body(i, &to),
                    recipients: vec![to],
                }
            })
            .collect();
        seq += batch.len();
        for r in queue.enqueue_batch(batch)? {
            r?;
        }
    }
    queue.flush()?;
    let resolver = HickoryDns::new(&s.dns.nameservers, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("resolver: {e}"))?;
    let router = Arc::new(Router::new(
        &BTreeMap::new(),
        s.dns.smtp_port,
        Arc::new(resolver),
    ));
    let engine = Engine::new(Arc::new(s), queue.clone(), router, Arc::new(NoEvents))?;
    let conn0: u64 = sinks
        .iter()
        .map(|k| k.stats.connections.load(Ordering::Relaxed))
        .sum();
    let msgs0: u64 = sinks
        .iter()
        .map(|k| k.stats.messages.load(Ordering::Relaxed))
        .sum();
    let q0 = dns.queries();
    let t0 = Instant::now();
    let summary = tokio::time::timeout(
        Duration::from_secs(600),
        engine.run(CancellationToken::new(), true),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{name}: drain did not finish in 600 s"))?;
    let secs = t0.elapsed().as_secs_f64();
    let conn1: u64 = sinks
        .iter()
        .map(|k| k.stats.connections.load(Ordering::Relaxed))
        .sum();
    let msgs1: u64 = sinks
        .iter()
        .map(|k| k.stats.messages.load(Ordering::Relaxed))
        .sum();
    anyhow::ensure!(
        summary.delivered == n as u64 && msgs1 - msgs0 == n as u64,
        "{name}: delivered {} (sinks counted {}) of {n}: {summary:?}",
        summary.delivered,
        msgs1 - msgs0
    );
    Ok(Row {
        name: name.into(),
        domains,
        destinations,
        conns_per_dest: conns,
        n,
        secs,
        connections: conn1 - conn0,
        dns_queries: dns.queries() - q0,
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let n = arg("--n", 20_000);
    let domains = arg("--domains", 1000).max(1);
    let few = arg("--conns-few", 20).max(1);
    let many = arg("--conns-many", 2).max(1);

    // Four sinks on 127.0.0.2..5, same port.
    let first = Sink::start("127.0.0.2:0".parse()?, SinkOptions::default()).await?;
    let port = first.addr.port();
    let mut sinks = vec![first];
    for k in 3..=5u8 {
        let a: SocketAddr = ([127, 0, 0, k], port).into();
        sinks.push(Sink::start(a, SinkOptions::default()).await?);
    }
    let ip = |k: usize| format!("127.0.0.{}", 2 + k % 4);

    let dns = TestDns::start().await;
    for k in 0..4 {
        dns.add_a(&format!("mx{k}.pool.test"), &ip(k), 3600);
    }
    dns.add_mx("one.test", 10, "mx0.pool.test", 3600);
    for i in 0..domains {
        dns.add_mx(
            &format!("d{i}.test"),
            10,
            &format!("mx{}.pool.test", i % 4),
            3600,
        );
        let mx = format!("mx.e{i}.test");
        dns.add_mx(&format!("e{i}.test"), 10, &mx, 3600);
        dns.add_a(&mx, &ip(i), 3600);
    }

    println!(
        "scale: N = {n} messages (1 recipient, 2 KB), 4 sinks on 127.0.0.2-5:{port}, DNS {}, nproc {}",
        dns.addr,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let mut rows = Vec::new();
    rows.push(
        run(
            "1 domain",
            |_| "one.test".to_owned(),
            1,
            1,
            few,
            n,
            port,
            &dns,
            &sinks,
        )
        .await?,
    );
    eprintln!("  done: {}", rows[rows.len() - 1].name);
    rows.push(
        run(
            "domains sharing 4 MX hosts",
            |i| format!("d{i}.test"),
            domains,
            4.min(domains),
            few,
            n,
            port,
            &dns,
            &sinks,
        )
        .await?,
    );
    eprintln!("  done: {}", rows[rows.len() - 1].name);
    rows.push(
        run(
            "domains with own MX name",
            |i| format!("e{i}.test"),
            domains,
            domains,
            many,
            n,
            port,
            &dns,
            &sinks,
        )
        .await?,
    );
    eprintln!("  done: {}", rows[rows.len() - 1].name);

    println!("| run | domains | destinations | max conns/dest | messages | seconds | msg/s | sink connections | DNS queries |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} |",
            r.name,
            r.domains,
            r.destinations,
            r.conns_per_dest,
            r.n,
            r.secs,
            r.n as f64 / r.secs,
            r.connections,
            r.dns_queries
        );
    }
    Ok(())
}
