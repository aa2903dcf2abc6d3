//! Queue benchmark: durable enqueue throughput by producer count, take-and-complete
//! throughput, disk and memory after filling with N messages and after draining + purging.
//!
//! ```text
//! CARGO_TARGET_DIR=target-queue cargo bench -p bulksend-benches --bench queue -- \
//!     [--n 200000] [--secs 5] [--producers 1,8,64] [--rounds 1] [--cache-mib 64] [--dir PATH]
//!     [--idem-mib 8] [--sched-mib 4] [--skip-throughput] [--exit-after-fill] [--reopen-full]
//!     [--sample-every K]
//! ```
//! `--sample-every K` reads RSS each time the first fill passes a multiple of K messages
//! and prints the samples and their least-squares slope over the second half of the fill:
//! the growth with depth, with the idempotency memory part's cycle (it fills and empties)
//! averaged over rather than caught at one phase.
//! `--exit-after-fill` ends the process right after the first fill's figures, without
//! freeing anything: under `heaptrack` its "leaked" memory is what the full queue holds. It
//! leaves the store behind: give it a `--dir` to remove afterwards. `--reopen-full` closes
//! and reopens the queue after each fill and times the recovery of the full queue.
//! `--n` may also come from `BULKSEND_BENCH_N`. The queue's log goes to stderr at the level
//! `RUST_LOG` names (e.g. `RUST_LOG=bulksend_queue=info` shows each idempotency merge and how
//! long it held the writer).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bulksend_benches::{dir_size, mib, rss};
use bulksend_queue::{NewMessage, Outcome, Queue, QueueOptions};

struct Args {
    n: u64,
    secs: u64,
    producers: Vec<usize>,
    rounds: u32,
    cache_mib: u64,
    /// `QueueOptions::idempotency_memory_bytes` in MiB.
    idem_mib: u64,
    /// `QueueOptions::schedule_memory_bytes` in MiB.
    sched_mib: u64,
    dir: Option<PathBuf>,
    skip_throughput: bool,
    exit_after_fill: bool,
    reopen_full: bool,
    /// During the first fill, RSS every this many messages (0: not sampled).
    sample_every: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        n: std::env::var("BULKSEND_BENCH_N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200_000),
        secs: 5,
        producers: vec![1, 8, 64],
        rounds: 1,
        cache_mib: 64,
        idem_mib: QueueOptions::default().idempotency_memory_bytes >> 20,
        sched_mib: QueueOptions::default().schedule_memory_bytes >> 20,
        dir: None,
        skip_throughput: false,
        exit_after_fill: false,
        reopen_full: false,
        sample_every: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--n" => a.n = val().parse().unwrap_or(a.n),
            "--secs" => a.secs = val().parse().unwrap_or(a.secs),
            "--rounds" => a.rounds = val().parse().unwrap_or(a.rounds),
            "--cache-mib" => a.cache_mib = val().parse().unwrap_or(a.cache_mib),
            "--idem-mib" => a.idem_mib = val().parse().unwrap_or(a.idem_mib),
            "--sched-mib" => a.sched_mib = val().parse().unwrap_or(a.sched_mib),
            "--dir" => a.dir = Some(PathBuf::from(val())),
            "--producers" => {
                a.producers = val().split(',').filter_map(|s| s.parse().ok()).collect();
            }
            "--skip-throughput" => a.skip_throughput = true,
            "--exit-after-fill" => a.exit_after_fill = true,
            "--reopen-full" => a.reopen_full = true,
            "--sample-every" => a.sample_every = val().parse().unwrap_or(0),
            "--bench" => {} // passed by cargo bench
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    a
}

fn body() -> Vec<u8> {
    let mut b = b"From: news@sender.test\r\nTo: you\r\nSubject: benchmark\r\n\r\n".to_vec();
    b.resize(2048, b'x');
    b
}

fn message(p: usize, i: u64, body: &[u8]) -> NewMessage {
    NewMessage {
        idempotency_key: Some(format!("p{p}-{i}")),
        sender: "news@sender.test".into(),
        recipients: vec![format!("user{i}@d{}.test", i % 100)],
        body: body.to_vec(),
    }
}

fn opts(a: &Args, durable: bool) -> QueueOptions {
    QueueOptions {
        cache_capacity_bytes: a.cache_mib << 20,
        idempotency_memory_bytes: a.idem_mib << 20,
        schedule_memory_bytes: a.sched_mib << 20,
        durable,
        ..QueueOptions::default()
    }
}

/// `producers` threads enqueue one message at a time until `limit` messages or `secs`.
fn enqueue_run(q: &Arc<Queue>, producers: usize, limit: u64, secs: u64, offset: u64) -> (u64, f64) {
    let count = Arc::new(AtomicU64::new(0));
    enqueue_run_counted(q, producers, limit, secs, offset, &count, &Latency::new())
}

/// Enqueue call latencies: a histogram of 0.1 ms buckets up to 100 ms (and one above), and
/// the longest.
struct Latency {
    buckets: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl Latency {
    const BUCKET_US: u64 = 100;
    const BUCKETS: usize = 1001;

    fn new() -> Arc<Latency> {
        Arc::new(Latency {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        })
    }

    fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let b = usize::try_from(us / Self::BUCKET_US)
            .map_or(Self::BUCKETS - 1, |b| b.min(Self::BUCKETS - 1));
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The upper edge of the bucket holding quantile `q`, in ms ("> 100" past the last).
    fn quantile(&self, q: f64) -> String {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let want = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                if i == Self::BUCKETS - 1 {
                    return "> 100".into();
                }
                return format!("{:.1}", ((i as u64 + 1) * Self::BUCKET_US) as f64 / 1000.0);
            }
        }
        "-".into()
    }

    /// "p50 / p99 / p99.9 / max" in ms (a quantile as its 0.1 ms bucket's upper edge).
    fn summary(&self) -> String {
        format!(
            "{} / {} / {} / {:.1} ms",
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
        )
    }
}

/// [`enqueue_run`] counting the messages taken on in `count` (which starts at 0), for a
/// thread that watches the fill.
fn enqueue_run_counted(
    q: &Arc<Queue>,
    producers: usize,
    limit: u64,
    secs: u64,
    offset: u64,
    count: &Arc<AtomicU64>,
    latency: &Arc<Latency>,
) -> (u64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(start + Duration::from_secs(10 * 365 * 86_400));
    let threads: Vec<_> = (0..producers)
        .map(|p| {
            let (q, count, stop) = (Arc::clone(q), Arc::clone(count), Arc::clone(&stop));
            let latency = Arc::clone(latency);
            std::thread::spawn(move || {
                let body = body();
                while !stop.load(Ordering::Relaxed) {
                    let i = count.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        count.fetch_sub(1, Ordering::Relaxed);
                        break;
                    }
                    let m = message(p, offset + i, &body);
                    let called = Instant::now();
                    let r = q.enqueue(m);
                    latency.record(called.elapsed());
                    if let Err(e) = r {
                        eprintln!("enqueue failed: {e}");
                        stop.store(true, Ordering::Relaxed);
                    }
                    if Instant::now() >= deadline {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let n = count.load(Ordering::Relaxed);
    (n, n as f64 / start.elapsed().as_secs_f64())
}

/// Like [`enqueue_run`] with `tasks` tokio tasks calling `enqueue_async` on a runtime with one
/// worker per core, the way the HTTP injection API calls the queue.
fn enqueue_run_async(q: &Arc<Queue>, tasks: usize, secs: u64) -> (u64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    rt.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|p| {
                let (q, count) = (Arc::clone(q), Arc::clone(&count));
                tokio::spawn(async move {
                    let body = body();
                    while Instant::now() < deadline {
                        let i = count.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = q.enqueue_async(message(p, i, &body)).await {
                            eprintln!("enqueue_async failed: {e}");
                            count.fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            let _ = h.await;
        }
    });
    let n = count.load(Ordering::Relaxed);
    (n, n as f64 / start.elapsed().as_secs_f64())
}

fn row(name: &str, value: String) {
    println!("| {name:<58} | {value:>26} |");
}

fn throughput(a: &Args, base: &Path) {
    println!(
        "\n### Enqueue throughput (2 KiB bodies, 1 recipient, idempotency key; {} s per run)\n",
        a.secs
    );
    println!("| {:<58} | {:>26} |", "run", "msg/s");
    println!("|{}|{}|", "-".repeat(60), "-".repeat(28));
    let mut runs: Vec<(usize, bool)> = a.producers.iter().map(|&p| (p, true)).collect();
    if let Some(&max) = a.producers.iter().max() {
        runs.push((max, false));
        runs.push((1, false));
    }
    for (p, durable) in runs {
        let dir = base.join(format!("tp-{p}-{durable}"));
        let q = Arc::new(Queue::open(&dir, opts(a, durable)).unwrap_or_else(|e| panic!("{e}")));
        let (n, rate) = enqueue_run(&q, p, u64::MAX, a.secs, 0);
        let what = if durable {
            "durable (flush + fdatasync)"
        } else {
            "durable: false (flush only)"
        };
        row(
            &format!("enqueue, {p} producers, {what}"),
            format!("{rate:.0} ({n} msgs)"),
        );
        drop(q);
        let _ = std::fs::remove_dir_all(&dir);
    }
    for &p in &a.producers {
        let dir = base.join(format!("tp-async-{p}"));
        let q = Arc::new(Queue::open(&dir, opts(a, true)).unwrap_or_else(|e| panic!("{e}")));
        let (n, rate) = enqueue_run_async(&q, p, a.secs);
        row(
            &format!("enqueue_async, {p} tokio tasks, durable"),
            format!("{rate:.0} ({n} msgs)"),
        );
        drop(q);
        let _ = std::fs::remove_dir_all(&dir);
    }
    // enqueue_batch: 8 producers x batches of 100.
    let dir = base.join("tp-batch");
    let q = Arc::new(Queue::open(&dir, opts(a, true)).unwrap_or_else(|e| panic!("{e}")));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.secs);
    let threads: Vec<_> = (0..8)
        .map(|p| {
            let (q, count) = (Arc::clone(&q), Arc::clone(&count));
            std::thread::spawn(move || {
                let body = body();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let batch: Vec<_> = (0..100).map(|j| message(p, i * 100 + j, &body)).collect();
                    if q.enqueue_batch(batch).is_err() {
                        break;
                    }
                    count.fetch_add(100, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let n = count.load(Ordering::Relaxed);
    row(
        "enqueue_batch(100), 8 producers, durable",
        format!("{:.0} ({n} msgs)", n as f64 / start.elapsed().as_secs_f64()),
    );
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first fill with RSS read each time it passes a multiple of `every` messages (polled
/// every 20 ms, so a sample is a little past its mark): (messages, rate, samples of
/// (messages, RSS bytes)).
fn sampled_fill(
    q: &Arc<Queue>,
    producers: usize,
    n: u64,
    every: u64,
    latency: &Arc<Latency>,
) -> (u64, f64, Vec<(u64, u64)>) {
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (count, done) = (Arc::clone(&count), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = every;
            while !done.load(Ordering::Relaxed) {
                let c = count.load(Ordering::Relaxed);
                if c >= next {
                    samples.push((c, rss().0));
                    next = (c / every + 1) * every;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        })
    };
    let (m, rate) = enqueue_run_counted(q, producers, n, u64::MAX, 0, &count, latency);
    done.store(true, Ordering::Relaxed);
    (m, rate, watcher.join().unwrap_or_default())
}

/// The least-squares slope of RSS over messages, in bytes per message, of the samples from
/// `from` messages on (None with fewer than two).
fn slope(samples: &[(u64, u64)], from: u64) -> Option<(f64, usize)> {
    let late: Vec<(f64, f64)> = samples
        .iter()
        .filter(|&&(c, _)| c >= from)
        .map(|&(c, r)| (c as f64, r as f64))
        .collect();
    if late.len() < 2 {
        return None;
    }
    let k = late.len() as f64;
    let (mx, my) = late
        .iter()
        .fold((0.0, 0.0), |(x, y), &(c, r)| (x + c / k, y + r / k));
    let (sxy, sxx) = late.iter().fold((0.0, 0.0), |(sxy, sxx), &(c, r)| {
        (sxy + (c - mx) * (r - my), sxx + (c - mx) * (c - mx))
    });
    Some((sxy / sxx, late.len()))
}

fn lifecycle(a: &Args, base: &Path) {
    let dir = base.join("lifecycle");
    let producers = a.producers.iter().copied().max().unwrap_or(64);
    println!(
        "\n### Fill / drain (N = {}, {} round(s), {} producers, cache_capacity {} MiB, idempotency memory {} MiB, schedule memory {} MiB)\n",
        a.n, a.rounds, producers, a.cache_mib, a.idem_mib, a.sched_mib
    );
    println!("| {:<58} | {:>26} |", "step", "value");
    println!("|{}|{}|", "-".repeat(60), "-".repeat(28));
    let (r, h) = rss();
    row(
        "RSS before open (VmRSS / VmHWM)",
        format!("{} / {}", mib(r), mib(h)),
    );
    let mut q = Arc::new(Queue::open(&dir, opts(a, true)).unwrap_or_else(|e| panic!("{e}")));
    for round in 0..a.rounds {
        let offset = u64::from(round) * a.n;
        let latency = Latency::new();
        let (n, rate, samples) = if round == 0 && a.sample_every > 0 {
            sampled_fill(&q, producers, a.n, a.sample_every, &latency)
        } else {
            let count = Arc::new(AtomicU64::new(0));
            let (n, rate) =
                enqueue_run_counted(&q, producers, a.n, u64::MAX, offset, &count, &latency);
            (n, rate, Vec::new())
        };
        row(
            &format!("round {round}: fill {n} msgs, durable enqueue"),
            format!("{rate:.0} msg/s"),
        );
        row(
            &format!("round {round}: fill, enqueue call p50 / p99 / p99.9 / max"),
            latency.summary(),
        );
        let s = q.stats();
        row(
            &format!("round {round}: disk after fill (sled / dir)"),
            format!("{} / {}", mib(s.disk_bytes), mib(dir_size(&dir))),
        );
        let (r, h) = rss();
        row(
            &format!("round {round}: RSS after fill (VmRSS / VmHWM)"),
            format!("{} / {}", mib(r), mib(h)),
        );
        if !samples.is_empty() {
            let line: Vec<String> = samples
                .iter()
                .map(|&(c, r)| {
                    format!(
                        "{:.1}M {:.1}",
                        c as f64 / 1e6,
                        r as f64 / f64::from(1 << 20)
                    )
                })
                .collect();
            row(
                &format!("round {round}: RSS during fill (messages RSS-MiB)"),
                line.join(", "),
            );
            if let Some((b, k)) = slope(&samples, a.n / 2) {
                row(
                    &format!("round {round}: RSS slope, second half of fill"),
                    format!("{b:.2} bytes/msg ({k} samples)"),
                );
            }
        }
        if a.exit_after_fill {
            std::process::exit(0);
        }
        if a.reopen_full {
            // A restart with everything queued: recovery scans every record and rebuilds
            // the schedule and the idempotency index. Not a new process: glibc keeps the
            // first instance's freed memory (in its writer thread's arena), so RSS from
            // here on is not comparable with runs without this option.
            drop(q);
            let start = Instant::now();
            q = Arc::new(Queue::open(&dir, opts(a, true)).unwrap_or_else(|e| panic!("{e}")));
            row(
                &format!("round {round}: reopen of the full queue"),
                format!("{:.2} s", start.elapsed().as_secs_f64()),
            );
        }

        // Drain: one thread takes 1000 at a time and completes them as delivered.
        let start = Instant::now();
        let mut done = 0u64;
        loop {
            let leases = q
                .take_due(SystemTime::now(), 1000)
                .unwrap_or_else(|e| panic!("{e}"));
            if leases.is_empty() {
                break;
            }
            let items: Vec<_> = leases
                .iter()
                .map(|l| {
                    (
                        l.recipient.id,
                        Outcome::Delivered {
                            reply: "250 2.0.0 ok".into(),
                        },
                    )
                })
                .collect();
            done += items.len() as u64;
            for r in q.complete_batch(items).unwrap_or_else(|e| panic!("{e}")) {
                r.unwrap_or_else(|e| panic!("{e}"));
            }
        }
        row(
            &format!("round {round}: take_due(1000) + complete_batch, 1 thread"),
            format!("{:.0} rcpt/s", done as f64 / start.elapsed().as_secs_f64()),
        );
        let s = q.stats();
        row(
            &format!("round {round}: disk after drain (sled / dir)"),
            format!("{} / {}", mib(s.disk_bytes), mib(dir_size(&dir))),
        );
        let start = Instant::now();
        let purged = q
            .purge_final(SystemTime::now() + Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"));
        row(
            &format!("round {round}: purge_final ({purged} records)"),
            format!("{:.0} rec/s", purged as f64 / start.elapsed().as_secs_f64()),
        );
        q.flush().unwrap_or_else(|e| panic!("{e}"));
        let s = q.stats();
        row(
            &format!("round {round}: disk after purge (sled / dir)"),
            format!("{} / {}", mib(s.disk_bytes), mib(dir_size(&dir))),
        );
        let (r, h) = rss();
        row(
            &format!("round {round}: RSS after drain + purge (VmRSS / VmHWM)"),
            format!("{} / {}", mib(r), mib(h)),
        );
        // The writer compacts on its own ~2 s after the last change when the files are
        // mostly dead space; wait up to 60 s for it.
        let start = Instant::now();
        let before = dir_size(&dir);
        while before > 16 << 20
            && dir_size(&dir) * 2 > before
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let s = q.stats();
        row(
            &format!("round {round}: disk after automatic compaction (sled / dir)"),
            format!(
                "{} / {} (after {:.1} s)",
                mib(s.disk_bytes),
                mib(dir_size(&dir)),
                start.elapsed().as_secs_f64()
            ),
        );
        let (r, h) = rss();
        row(
            &format!("round {round}: RSS after compaction (VmRSS / VmHWM)"),
            format!("{} / {}", mib(r), mib(h)),
        );
    }
    drop(q);
    let start = Instant::now();
    let q = Queue::open(&dir, opts(a, true)).unwrap_or_else(|e| panic!("{e}"));
    row(
        "reopen of the drained queue",
        format!("{:.2} s", start.elapsed().as_secs_f64()),
    );
    row(
        "disk after reopen (sled / dir)",
        format!("{} / {}", mib(q.stats().disk_bytes), mib(dir_size(&dir))),
    );
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let a = parse_args();
    let tmp;
    let base = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
            tmp.path().to_path_buf()
        }
    };
    println!("queue benchmark in {}", base.display());
    // Fill/drain first, so its RSS figures are not inflated by the throughput runs.
    lifecycle(&a, &base);
    if !a.skip_throughput {
        throughput(&a, &base);
    }
}
