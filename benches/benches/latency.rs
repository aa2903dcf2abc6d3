//! Enqueue-to-delivered latency at low load: messages are enqueued one at a time (durably,
//! then `Engine::wake`) at a steady rate while the engine runs, and each is timed from the
//! start of its `enqueue` call to the moment the engine recorded it delivered (the event,
//! emitted after the durable write of the outcome). The receiver is the in-process accept-all
//! sink on loopback. Prints p50/p90/p99/max.
//!
//! `cargo bench -p bulksend-benches --bench latency -- [--n 500] [--rate 50]`
#![allow(clippy::unwrap_used)]

use bulksend_benches::arg;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulksend_config::{Settings, TlsPolicy};
use bulksend_engine::delivery::Engine;
use bulksend_engine::events::{Event, EventKind, EventSink};
use bulksend_engine::route::{NoDns, Router};
use bulksend_engine::sink::{Sink, SinkOptions};
use bulksend_queue::{NewMessage, Queue, QueueOptions};
use tokio_util::sync::CancellationToken;

/// Records when each message's delivered event was emitted.
#[derive(Default)]
struct Timing(Mutex<HashMap<String, Instant>>);
impl EventSink for Timing {
    fn emit(&self, e: Event) {
        if e.event == EventKind::Delivered {
            self.0.lock().unwrap().insert(e.message_id, Instant::now());
        }
    }
}

fn main() {
    let (n, rate) = (arg("--n", 500), arg("--rate", 50).max(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sink = Sink::start("127.0.0.1:0".parse().unwrap(), SinkOptions::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::default();
        s.queue.path = dir.path().join("queue");
        s.routes.insert("*".into(), sink.addr.to_string());
        s.smtp.tls = TlsPolicy::Disabled;
        s.smtp.timeouts.idle = Duration::from_secs(30);
        let queue = Arc::new(Queue::open(&s.queue.path, QueueOptions::default()).unwrap());
        let router = Arc::new(Router::new(&s.routes, None, Arc::new(NoDns)));
        let timing = Arc::new(Timing::default());
        let engine = Engine::new(Arc::new(s), queue.clone(), router, timing.clone()).unwrap();
        let stop = CancellationToken::new();
        let run = {
            let (e, t) = (engine.clone(), stop.clone());
            tokio::spawn(async move { e.run(t, false).await })
        };
        let body = format!("Subject: latency\r\n\r\n{}", format!("{}\r\n", "x".repeat(76)).repeat(26)).into_bytes();
        let mut started: HashMap<String, Instant> = HashMap::new();
        let gap = Duration::from_secs_f64(1.0 / rate as f64);
        for i in 0..n {
            let t0 = Instant::now();
            let q = queue.clone();
            let m = NewMessage {
                idempotency_key: None,
                sender: "b@esp.test".into(),
                recipients: vec![format!("u{i}@dest.test")],
                body: body.clone(),
            };
            let id = tokio::task::spawn_blocking(move || q.enqueue(m)).await.unwrap().unwrap().id;
            engine.wake();
            started.insert(id.to_string(), t0);
            tokio::time::sleep_until((t0 + gap).into()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while timing.0.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        let summary = run.await.unwrap();
        assert_eq!(summary.delivered as usize, n, "{summary:?}");
        let done = timing.0.lock().unwrap();
        let mut lat: Vec<f64> = started
            .iter()
            .filter_map(|(id, t0)| done.get(id).map(|t| t.duration_since(*t0).as_secs_f64() * 1000.0))
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        assert!(!lat.is_empty(), "nothing delivered");
        let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
        println!("enqueue-to-delivered latency, {} of {n} messages delivered, {rate} msg/s offered, 2 KB, loopback sink", lat.len());
        println!("| p50 | p90 | p99 | max |");
        println!("|---|---|---|---|");
        println!("| {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |", pct(0.5), pct(0.9), pct(0.99), lat[lat.len() - 1]);
    });
}
