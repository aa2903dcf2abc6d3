//! SMTP throughput against Postfix, measured in one run on the same `smtp-sink`:
//!
//! 1. **bulksend**: N messages already in its queue (1 recipient each), delivered by the engine
//!    in-process with `run(drain)` (what `bulksend serve --drain` does) to `smtp-sink`,
//!    writing the event file as `serve` does (one JSON line per outcome; `--no-events` leaves
//!    it out).
//! 2. **raw ceiling**: `smtp-source -d -s 20 -m N -l SIZE` → the same sink (20 parallel
//!    sessions, connection reuse, no pipelining).
//! 3. **Postfix**: a private Postfix instance holding the same N messages (injected through its
//!    `smtpd` by `smtp-source`, put on hold by `check_client_access static:HOLD`), released
//!    with `postsuper -H ALL` + `postqueue -f`, timed until its queue is empty; relayed with
//!    Postfix's default client settings (`relayhost = [127.0.0.1]:SINK`, 20 connections,
//!    connection cache).
//!
//! CPU: bulksend's from `/proc/self/stat` (utime + stime); smtp-source's from this process's
//! cutime + cstime after waiting for it; Postfix's from its master's stat (own + reaped
//! children) plus its live children. Peak RSS: bulksend's `VmHWM`, reset before the drain via
//! `/proc/self/clear_refs`.
//!
//! ```text
//! CARGO_TARGET_DIR=target-pf cargo bench -p bulksend-benches --bench smtp -- \
//!     [--n 20000] [--sizes 2048,20480] [--connections 20] [--skip-postfix]
//!     [--max-in-flight-bytes B] [--no-events]
//! ```
//! `--n` may also come from `BULKSEND_BENCH_N`. Needs root and Postfix (`apt-get install
//! postfix`) for the sink, the ceiling and the Postfix run; without Postfix, only bulksend's
//! own figures are measured, against the in-process accept-all sink.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulksend_config::{Settings, TlsPolicy};
use bulksend_engine::delivery::Engine;
use bulksend_engine::events::{EventSink, FileEvents, NoEvents, Rotation};
use bulksend_engine::route::{NoDns, Router};
use bulksend_queue::{NewMessage, Queue, QueueOptions};
use bulksend_tests::postfix::{
    clock_ticks, free_port, installed, proc_stat, run_bounded, self_stat, PostfixInstance,
    PostfixOptions,
};
use tokio_util::sync::CancellationToken;

struct Args {
    n: usize,
    sizes: Vec<usize>,
    connections: usize,
    skip_postfix: bool,
    /// `delivery.max_in_flight_bytes`; the default if unset.
    max_in_flight_bytes: Option<usize>,
    /// Write the event file as `serve` does (default); `--no-events` leaves it out.
    events: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        n: std::env::var("BULKSEND_BENCH_N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000),
        sizes: vec![2048, 20480],
        connections: 20,
        skip_postfix: false,
        max_in_flight_bytes: None,
        events: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--n" => a.n = val().parse().unwrap_or(a.n),
            "--connections" => a.connections = val().parse().unwrap_or(a.connections),
            "--sizes" => a.sizes = val().split(',').filter_map(|s| s.parse().ok()).collect(),
            "--skip-postfix" => a.skip_postfix = true,
            "--no-events" => a.events = false,
            "--max-in-flight-bytes" => a.max_in_flight_bytes = val().parse().ok(),
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    a
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Row {
    name: String,
    msgs: usize,
    secs: f64,
    /// CPU seconds (user + system).
    cpu: f64,
    peak_rss: Option<u64>,
    /// CPU seconds of the smtp-sink process during the run: the receiver is one
    /// single-threaded process, so its CPU per message bounds every run's rate.
    sink_cpu: Option<f64>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
    fn cpu_per_msg(&self) -> f64 {
        self.cpu / self.msgs as f64
    }
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_of(pid: u32) -> Option<f64> {
    let s = proc_stat(pid)?;
    Some((s.utime + s.stime) as f64 / clock_ticks() as f64)
}

/// Runs `f`, and sets the sink's CPU during it on the row it returns.
async fn with_sink_cpu<F: std::future::Future<Output = anyhow::Result<Row>>>(
    sink: u32,
    f: F,
) -> anyhow::Result<Row> {
    let c0 = cpu_of(sink);
    let mut row = f.await?;
    row.sink_cpu = c0.zip(cpu_of(sink)).map(|(a, b)| b - a);
    Ok(row)
}

fn ticks_self() -> (u64, u64) {
    let s = self_stat().unwrap_or_default();
    (s.utime + s.stime, s.cutime + s.cstime)
}

/// Starts `smtp-sink` on a free loopback port (as nobody, backlog 1000).
fn start_sink() -> anyhow::Result<(Child, SocketAddr)> {
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let child = Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "nobody", &addr.to_string(), "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "smtp-sink did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, addr))
}

fn body(seq: usize, size: usize) -> Vec<u8> {
    let mut b = format!(
        "From: news@esp.test\r\nTo: user@bench.test\r\nSubject: bench {seq}\r\n\
         Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{seq}@esp.test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n";
    while b.len() + line.len() <= size {
        b.extend_from_slice(line);
    }
    b
}

async fn bulksend_run(args: &Args, size: usize, sink: SocketAddr) -> anyhow::Result<Row> {
    let n = args.n;
    let dir = tempfile::tempdir()?;
    let mut s = Settings::default();
    s.queue.path = dir.path().join("queue");
    s.routes = BTreeMap::from([("bench.test".to_owned(), sink.to_string())]);
    s.smtp.helo_name = "bulksend.test".into();
    s.smtp.tls = TlsPolicy::Disabled;
    s.delivery.max_connections_per_destination = args.connections;
    if let Some(b) = args.max_in_flight_bytes {
        s.delivery.max_in_flight_bytes = b;
    }
    // Durable, as in production: every outcome is flushed and fdatasynced before it counts
    // (Postfix fsyncs its queue files too).
    let queue = Arc::new(Queue::open(&s.queue.path, QueueOptions::default())?);
    let fill = Instant::now();
    let mut seq = 0;
    while seq < n {
        let batch: Vec<NewMessage> = (seq..n.min(seq + 500))
            .map(|i| NewMessage {
                idempotency_key: None,
                sender: "bounces@esp.test".into(),
                recipients: vec![format!("user{}@bench.test", i % 1000)],
                body: body(i, size),
            })
            .collect();
        seq += batch.len();
        for r in queue.enqueue_batch(batch)? {
            r?;
        }
    }
    queue.flush()?;
    eprintln!(
        "  bulksend: {n} messages of {size} B in its queue ({:.1} s)",
        fill.elapsed().as_secs_f64()
    );
    let router = Arc::new(Router::new(&s.routes, None, Arc::new(NoDns)));
    // The event file as `serve` writes it (one JSON line per outcome, default rotation),
    // unless --no-events.
    let events: Arc<dyn EventSink> = if args.events {
        Arc::new(FileEvents::open_rotating(
            &dir.path().join("events.jsonl"),
            Rotation::from_settings(&s.events),
        )?)
    } else {
        Arc::new(NoEvents)
    };
    let engine = Engine::new(Arc::new(s), queue.clone(), router, events)?;
    // Reset VmHWM so the peak is the delivery's, not the fill's. It cannot go below what the
    // process already holds after the fill (sled's memory), so print that too.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    eprintln!(
        "  bulksend: RSS at the start of the drain {:.1} MiB",
        bulksend_tests::postfix::peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    let (c0, _) = ticks_self();
    let t0 = Instant::now();
    let summary = engine.run(CancellationToken::new(), true).await;
    let secs = t0.elapsed().as_secs_f64();
    let (c1, _) = ticks_self();
    anyhow::ensure!(
        summary.delivered == n as u64,
        "bulksend delivered {} of {n}: {summary:?}",
        summary.delivered
    );
    Ok(Row {
        name: "bulksend".into(),
        msgs: n,
        secs,
        cpu: (c1 - c0) as f64 / clock_ticks() as f64,
        peak_rss: bulksend_tests::postfix::peak_rss_kib().map(|k| k * 1024),
        sink_cpu: None,
    })
}

fn smtp_source(
    n: usize,
    size: usize,
    target: SocketAddr,
    limit: Duration,
) -> anyhow::Result<(f64, f64)> {
    let (_, cc0) = ticks_self();
    let t0 = Instant::now();
    let mut cmd = Command::new("/usr/sbin/smtp-source");
    cmd.args([
        "-d",
        "-s",
        "20",
        "-m",
        &n.to_string(),
        "-l",
        &size.to_string(),
        "-f",
        "bounces@esp.test",
        "-t",
        "user@bench.test",
        &target.to_string(),
    ]);
    let out = run_bounded(cmd, limit)?;
    let secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, cc1) = ticks_self();
    Ok((secs, (cc1 - cc0) as f64 / clock_ticks() as f64))
}

fn postfix_run(n: usize, size: usize, sink: SocketAddr) -> anyhow::Result<Row> {
    let pf = PostfixInstance::start(PostfixOptions {
        relayhost: Some(sink),
        hold: true,
        ..PostfixOptions::default()
    })?;
    let fill = Instant::now();
    smtp_source(n, size, pf.addr, Duration::from_secs(3600))?;
    let limit = 60 + n as u64 / 200;
    let deadline = Instant::now() + Duration::from_secs(limit);
    while pf.held() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} held after {limit} s",
            pf.held()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "  postfix: {n} messages on hold ({:.1} s)",
        fill.elapsed().as_secs_f64()
    );
    // Let the fill's smtpd/cleanup processes settle so their CPU is not counted below.
    std::thread::sleep(Duration::from_secs(2));
    let c0 = pf.cpu_ticks();
    let t0 = Instant::now();
    pf.release_held()?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while pf.queue_len() > 0 {
        anyhow::ensure!(Instant::now() < deadline, "postfix did not empty its queue");
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t0.elapsed().as_secs_f64();
    let c1 = pf.cpu_ticks();
    let sent = pf.log_count("status=sent");
    anyhow::ensure!(sent == n, "postfix logged {sent} sent of {n}");
    Ok(Row {
        name: "Postfix relay".into(),
        msgs: n,
        secs,
        cpu: c1.saturating_sub(c0) as f64 / clock_ticks() as f64,
        peak_rss: None,
        sink_cpu: None,
    })
}

fn print(size: usize, rows: &[Row]) {
    println!();
    println!("### {size}-byte messages");
    println!("| run | messages | seconds | msg/s | CPU s/msg | peak RSS | smtp-sink CPU s/msg |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.6} | {} | {} |",
            r.name,
            r.msgs,
            r.secs,
            r.rate(),
            r.cpu_per_msg(),
            r.peak_rss.map_or("–".into(), bulksend_benches::mib),
            r.sink_cpu
                .map_or("–".into(), |c| format!("{:.6}", c / r.msgs as f64))
        );
    }
    let find = |p: &str| rows.iter().find(|r| r.name.starts_with(p));
    if let Some(b) = find("bulksend") {
        if let Some(p) = find("Postfix") {
            println!(
                "bulksend / Postfix: {:.2}x msg/s (target ≥ 3), CPU per message {:.2}x of Postfix's (target ≤ 0.2)",
                b.rate() / p.rate(),
                b.cpu_per_msg() / p.cpu_per_msg()
            );
        }
        if let Some(c) = find("raw") {
            println!(
                "bulksend / raw ceiling: {:.2}x msg/s (target ≥ 1)",
                b.rate() / c.rate()
            );
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let have_postfix = installed() && std::path::Path::new("/usr/sbin/smtp-sink").exists();
    println!(
        "SMTP throughput: N = {}, sizes {:?}, {} connections, nproc {}",
        args.n,
        args.sizes,
        args.connections,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if !have_postfix {
        println!("postfix not installed (apt-get install postfix): bulksend against its in-process sink only");
    }
    for &size in &args.sizes {
        let mut rows = Vec::new();
        if have_postfix {
            let (mut sink, addr) = start_sink()?;
            let pid = sink.id();
            let res = async {
                rows.push(with_sink_cpu(pid, bulksend_run(&args, size, addr)).await?);
                let ceiling = async {
                    let (secs, cpu) = smtp_source(args.n, size, addr, Duration::from_secs(3600))?;
                    Ok(Row {
                        name: "raw ceiling (smtp-source -d -s 20)".into(),
                        msgs: args.n,
                        secs,
                        cpu,
                        ..Row::default()
                    })
                };
                rows.push(with_sink_cpu(pid, ceiling).await?);
                if !args.skip_postfix {
                    let (n, a) = (args.n, addr);
                    let relay = async {
                        tokio::task::spawn_blocking(move || postfix_run(n, size, a)).await?
                    };
                    rows.push(with_sink_cpu(pid, relay).await?);
                }
                anyhow::Ok(())
            }
            .await;
            let _ = sink.kill();
            let _ = sink.wait();
            res?;
        } else {
            let sink = bulksend_engine::sink::Sink::start(
                "127.0.0.1:0".parse()?,
                bulksend_engine::sink::SinkOptions::default(),
            )
            .await?;
            let mut r = bulksend_run(&args, size, sink.addr).await?;
            r.name = "bulksend (in-process sink)".into();
            rows.push(r);
        }
        print(size, &rows);
    }
    Ok(())
}
