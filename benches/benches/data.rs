//! Cost of preparing message data for DATA (line-ending normalisation, dot-stuffing, line
//! checks: `bulksend_engine::smtp::data::prepare`), against a plain copy of the same bytes
//! measured in the same run.
//!
//! ```text
//! cargo bench -p bulksend-benches --bench data [-- --iters 20000]
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use bulksend_engine::smtp::data::prepare;

fn text_body(size: usize, line: &[u8]) -> Vec<u8> {
    let mut body = b"From: news@sender.test\r\nSubject: benchmark\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(line);
    }
    body.truncate(size);
    body
}

fn time(iters: u32, mut f: impl FnMut()) -> Duration {
    f(); // warm up
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed() / iters
}

fn main() {
    let mut iters = 20_000u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iters" => iters = args.next().and_then(|s| s.parse().ok()).unwrap_or(iters),
            "--bench" => {}
            other => eprintln!("ignoring argument {other:?}"),
        }
    }
    let prose =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    // Short lines, bare LFs and lines that need stuffing: the slow case for a line-wise pass.
    let awkward = b".a\n..b\r\nc\rd\r\n";
    println!("### Message data preparation ({iters} iterations each)\n");
    println!("| body | bytes | prepare | copy (to_vec) | prepare / copy | prepare MB/s |");
    println!("|---|---|---|---|---|---|");
    for (name, size, line) in [
        ("text, 80-byte lines", 2048usize, &prose[..]),
        ("text, 80-byte lines", 20480, &prose[..]),
        ("short lines, dots, bare LF/CR", 20480, &awkward[..]),
    ] {
        let body = text_body(size, line);
        let p = time(iters, || {
            black_box(prepare(black_box(&body), usize::MAX).ok());
        });
        let c = time(iters, || {
            black_box(black_box(&body).to_vec());
        });
        let mbs = size as f64 / p.as_secs_f64().max(1e-12) / 1e6;
        println!(
            "| {name} | {size} | {:.2} µs | {:.2} µs | {:.1}x | {mbs:.0} |",
            p.as_secs_f64() * 1e6,
            c.as_secs_f64() * 1e6,
            p.as_secs_f64() / c.as_secs_f64().max(1e-12)
        );
    }
}
