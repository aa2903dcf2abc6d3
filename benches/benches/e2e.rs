//! End-to-end time to last delivery with the release `bulksend` binary as a child process,
//! relaying through a smarthost route to the in-process accept-all sink on loopback.
//!
//! (a) **HTTP API**: `bulksend --config CFG serve` runs; N messages (1 recipient, ~2 KB text)
//!     are POSTed in batches of 500 to `/api/v1/messages` (each reply comes after the batch is
//!     durably written), timed from the first POST until the sink has counted N messages; then
//!     the child gets SIGTERM and is waited for.
//! (b) **CLI**: N JSON lines in a file; timed `bulksend --config CFG enqueue --jsonl FILE`,
//!     then `bulksend --config CFG serve --drain` (the sink must count N).
//!
//! The binary is not built by `cargo bench`; build it first (same target directory):
//!
//! ```text
//! CARGO_TARGET_DIR=target-sc cargo build --release -p bulksend
//! CARGO_TARGET_DIR=target-sc cargo bench -p bulksend-benches --bench e2e -- [--n 5000] [--batch 500]
//! ```
//! It is looked up as `$BULKSEND_BIN`, else `release/bulksend` next to this bench's `deps/`
//! directory, else `target/release/bulksend` in the workspace.
#![allow(clippy::unwrap_used)]

use bulksend_benches::arg;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bulksend_engine::sink::{Sink, SinkOptions};
use bulksend_tests::postfix::run_bounded;

fn binary() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("BULKSEND_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        // <target>/release/deps/e2e-HASH → <target>/release/bulksend
        if let Some(release) = exe.parent().and_then(Path::parent) {
            candidates.push(release.join("bulksend"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/bulksend"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "bulksend binary not found: run `cargo build --release -p bulksend` with the same \
                 CARGO_TARGET_DIR first, or set BULKSEND_BIN"
        )
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes a config for a fresh queue under `dir`, relaying everything to `sink`.
fn config(dir: &Path, sink: SocketAddr, api: u16) -> anyhow::Result<PathBuf> {
    let path = dir.join("bulksend.toml");
    let metrics = free_port()?;
    std::fs::write(
        &path,
        format!(
            "[queue]\npath = {q:?}\n\n[events]\npath = {e:?}\n\n[routes]\n\"*\" = \"{sink}\"\n\n\
             [smtp]\nhelo_name = \"bulksend.test\"\ntls = \"disabled\"\n\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n\
             [log]\nlevel = \"warn\"\n",
            q = dir.join("queue").display().to_string(),
            e = dir.join("events").display().to_string(),
        ),
    )?;
    Ok(path)
}

/// One message as JSON (about 2 KB of text in 76-character lines).
fn json_message(i: usize) -> String {
    let text =
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\\n".repeat(25);
    format!(
        "{{\"id\":\"e2e-{i}\",\"from\":\"news@esp.test\",\"to\":[\"user{i}@bench.test\"],\
         \"subject\":\"e2e {i}\",\"text\":\"{text}\"}}"
    )
}

fn sink_count(sink: &Sink) -> usize {
    sink.stats.messages.load(Ordering::Relaxed) as usize
}

fn wait_count(sink: &Sink, n: usize, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while sink_count(sink) < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "sink counted {} of {n} after {limit:?}",
            sink_count(sink)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// SIGTERM, then wait up to `limit` (SIGKILL after that).
fn stop(child: &mut Child, limit: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Http {
    post_secs: f64,
    total_secs: f64,
}

fn http_run(bin: &Path, sink: &Sink, n: usize, batch: usize) -> anyhow::Result<Http> {
    let dir = tempfile::tempdir()?;
    let api = free_port()?;
    let cfg = config(dir.path(), sink.addr, api)?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{api}");
    let res = (|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ureq::get(&format!("{base}/readyz")).call().is_ok() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "bulksend serve not ready in 30 s"
            );
            if let Some(st) = child.try_wait()? {
                anyhow::bail!("bulksend serve exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let bodies: Vec<String> = (0..n)
            .step_by(batch)
            .map(|s| {
                let msgs: Vec<String> = (s..n.min(s + batch)).map(json_message).collect();
                format!("[{}]", msgs.join(","))
            })
            .collect();
        let before = sink_count(sink);
        let url = format!("{base}/api/v1/messages");
        let t0 = Instant::now();
        for b in &bodies {
            ureq::post(&url)
                .header("content-type", "application/json")
                .send(b.as_str())?;
        }
        let post_secs = t0.elapsed().as_secs_f64();
        wait_count(sink, before + n, Duration::from_secs(300))?;
        let total_secs = t0.elapsed().as_secs_f64();
        Ok(Http {
            post_secs,
            total_secs,
        })
    })();
    let status = stop(&mut child, Duration::from_secs(60))?;
    eprintln!("  serve after SIGTERM: {status:?}");
    res
}

struct Cli {
    enqueue_secs: f64,
    drain_secs: f64,
}

fn cli_run(bin: &Path, sink: &Sink, n: usize) -> anyhow::Result<Cli> {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path(), sink.addr, free_port()?)?;
    let jsonl = dir.path().join("messages.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&jsonl)?);
        for i in 0..n {
            writeln!(f, "{}", json_message(i))?;
        }
        f.flush()?;
    }
    let before = sink_count(sink);
    let mut enqueue = Command::new(bin);
    enqueue
        .arg("--config")
        .arg(&cfg)
        .arg("enqueue")
        .arg("--jsonl")
        .arg(&jsonl);
    let t0 = Instant::now();
    let out = run_bounded(enqueue, Duration::from_secs(300))?;
    let enqueue_secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "enqueue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut drain = Command::new(bin);
    drain.arg("--config").arg(&cfg).arg("serve").arg("--drain");
    let t1 = Instant::now();
    let out = run_bounded(drain, Duration::from_secs(300))?;
    let drain_secs = t1.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "serve --drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink_count(sink) - before;
    anyhow::ensure!(got == n, "sink counted {got} of {n} after serve --drain");
    Ok(Cli {
        enqueue_secs,
        drain_secs,
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let n = arg("--n", 5000).max(1);
    let batch = arg("--batch", 500).max(1);
    let bin = binary()?;
    let sink = Sink::start("127.0.0.1:0".parse()?, SinkOptions::default()).await?;
    println!(
        "e2e: N = {n} messages (1 recipient, ~2 KB text), binary {}, sink {}, nproc {}",
        bin.display(),
        sink.addr,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let sink = std::sync::Arc::new(sink);
    let (b, s) = (bin.clone(), sink.clone());
    let http = tokio::task::spawn_blocking(move || http_run(&b, &s, n, batch)).await??;
    let (b, s) = (bin.clone(), sink.clone());
    let cli = tokio::task::spawn_blocking(move || cli_run(&b, &s, n)).await??;

    println!("| path | messages | seconds | msg/s | detail |");
    println!("|---|---|---|---|---|");
    println!(
        "| HTTP API (POST x{batch}) → serve → sink | {n} | {:.2} | {:.0} | POSTs done at {:.2} s ({:.0} msg/s accepted) |",
        http.total_secs,
        n as f64 / http.total_secs,
        http.post_secs,
        n as f64 / http.post_secs
    );
    let total = cli.enqueue_secs + cli.drain_secs;
    println!(
        "| CLI enqueue --jsonl + serve --drain | {n} | {total:.2} | {:.0} | enqueue {:.2} s ({:.0} msg/s), serve --drain {:.2} s ({:.0} msg/s, incl. process start) |",
        n as f64 / total,
        cli.enqueue_secs,
        n as f64 / cli.enqueue_secs,
        cli.drain_secs,
        n as f64 / cli.drain_secs
    );
    Ok(())
}
