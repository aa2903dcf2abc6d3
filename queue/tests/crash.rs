#![allow(clippy::unwrap_used)]
//! Crash test: a child process (this test binary, re-executed) enqueues and completes
//! deliveries while the parent SIGKILLs it at random moments; after each kill the parent
//! reopens the queue and checks every acknowledgement the child printed.
//!
//! `BULKSEND_CRASH_CYCLES=200 cargo test -p bulksend-queue --release --test crash` for a
//! longer run (default 20 cycles).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bulksend_queue::{
    MessageId, NewMessage, Outcome, Queue, QueueOptions, RecipientId, RecipientState,
};

const CHILD_DIR: &str = "BULKSEND_CRASH_CHILD_DIR";
const CHILD_CYCLE: &str = "BULKSEND_CRASH_CHILD_CYCLE";

fn new_message(key: String, n: usize) -> NewMessage {
    NewMessage {
        idempotency_key: Some(key.clone()),
        sender: "bulk@sender.test".into(),
        recipients: (0..n)
            .map(|i| format!("r{i}-{key}@d{}.test", i % 2))
            .collect(),
        body: format!("Subject: {key}\r\n\r\n{}\r\n", "x".repeat(body_len(&key))).into_bytes(),
    }
}

/// Bodies of 1.5 to 11 KB (in segment files), and one in five of at most 256 bytes (inline in
/// sled). The header adds ~25 bytes.
fn body_len(key: &str) -> usize {
    let h = key
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    match h % 5 {
        0 => (h % 200) as usize,
        1 => 6_000 + (h % 5_000) as usize,
        _ => 1_500,
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.write_all(b"\n").unwrap();
    out.flush().unwrap();
}

/// The outcome the child chooses for a recipient (deterministic, so it is not printed twice).
fn outcome_for(id: RecipientId) -> Outcome {
    match (id.message.0 ^ u64::from(id.index)) % 7 {
        0 => Outcome::Bounced {
            reply: "550 5.1.1 no such user".into(),
        },
        1 => Outcome::Deferred {
            reply: "451 4.3.0 later".into(),
            next_attempt: SystemTime::now() + Duration::from_secs(86_400),
        },
        _ => Outcome::Delivered {
            reply: "250 2.0.0 ok".into(),
        },
    }
}

/// Room for ~300 idempotency keys in memory: the writer moves them into the store every few
/// hundred enqueues, so kills land in and around those moves too.
fn opts() -> QueueOptions {
    QueueOptions {
        idempotency_memory_bytes: 300 * 13,
        ..QueueOptions::default()
    }
}

/// Entry point of the child process; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let cycle: u64 = std::env::var(CHILD_CYCLE).unwrap().parse().unwrap();
    let q = Arc::new(Queue::open(Path::new(&dir), opts()).unwrap());
    say("READY");
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let q = Arc::clone(&q);
        threads.push(std::thread::spawn(move || {
            for i in 0u64.. {
                let n = 1 + ((i + t) % 3) as usize;
                if t == 0 && i % 4 == 0 {
                    // Some batches too.
                    let keys: Vec<String> =
                        (0..5).map(|j| format!("c{cycle}-t{t}-{i}-b{j}")).collect();
                    let res = q
                        .enqueue_batch(keys.iter().map(|k| new_message(k.clone(), n)).collect())
                        .unwrap();
                    for (k, r) in keys.iter().zip(res) {
                        let e = r.unwrap();
                        say(&format!("E {} {k} {n}", e.id));
                    }
                } else {
                    let key = format!("c{cycle}-t{t}-{i}");
                    let e = q.enqueue(new_message(key.clone(), n)).unwrap();
                    say(&format!("E {} {key} {n}", e.id));
                }
            }
        }));
    }
    {
        // Async producers too, as the HTTP API enqueues: 8 tasks on one runtime thread.
        // (A SIGKILL keeps what was written but not synced, so this catches an
        // acknowledgement sent before the write, not one sent before the fdatasync: the
        // async reply leaves from the same syncer step as the blocking one.)
        let q = Arc::clone(&q);
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tasks: Vec<_> = (0..8u64)
                    .map(|t| {
                        let q = Arc::clone(&q);
                        tokio::spawn(async move {
                            for i in 0u64.. {
                                let n = 1 + ((i + t) % 3) as usize;
                                if i % 5 == 0 {
                                    let keys: Vec<String> =
                                        (0..3).map(|j| format!("c{cycle}-a{t}-{i}-b{j}")).collect();
                                    let msgs = keys.iter().map(|k| new_message(k.clone(), n));
                                    let res = q.enqueue_batch_async(msgs.collect()).await.unwrap();
                                    for (k, r) in keys.iter().zip(res) {
                                        say(&format!("E {} {k} {n}", r.unwrap().id));
                                    }
                                } else {
                                    let key = format!("c{cycle}-a{t}-{i}");
                                    let e = q.enqueue_async(new_message(key.clone(), n)).await;
                                    say(&format!("E {} {key} {n}", e.unwrap().id));
                                }
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
        }));
    }
    {
        let q = Arc::clone(&q);
        threads.push(std::thread::spawn(move || loop {
            let leases = q.take_due(SystemTime::now(), 20).unwrap();
            if leases.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let items: Vec<_> = leases
                .iter()
                .map(|l| (l.recipient.id, outcome_for(l.recipient.id)))
                .collect();
            let ids: Vec<RecipientId> = items.iter().map(|(id, _)| *id).collect();
            let res = q.complete_batch(items).unwrap();
            for (id, r) in ids.into_iter().zip(res) {
                say(&format!("C {id} {}", r.unwrap().state));
            }
        }));
    }
    {
        // Compactions at random moments too: a kill can land in the middle of one.
        let q = Arc::clone(&q);
        threads.push(std::thread::spawn(move || {
            for i in 0u64.. {
                std::thread::sleep(Duration::from_millis(20 + (i * 37 + cycle * 11) % 60));
                let c = q.compact().unwrap();
                say(&format!("K {}", c.keys));
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
}

/// Kills the child if the parent panics, so a failed run leaves nothing behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Default)]
struct Acked {
    /// key → (id, recipients)
    enqueued: HashMap<String, (MessageId, usize)>,
    completed: HashMap<RecipientId, RecipientState>,
}

/// Every file under `dir` with its size, for a failure message.
fn listing(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) => out.push_str(&format!("  {} {}\n", p.display(), m.len())),
                Err(err) => out.push_str(&format!("  {} ({err})\n", p.display())),
            }
        }
    }
    if let Ok(c) = std::fs::read_to_string(dir.join("CURRENT")) {
        out.push_str(&format!("  CURRENT says {c:?}\n"));
    }
    out
}

fn check(dir: &Path, acked: &Acked) -> (usize, usize) {
    // An open that fails after a kill is a bug (once seen in ~2,300 cycles, error text lost):
    // say why, and what the directory held.
    let q = Queue::open(dir, opts()).unwrap_or_else(|e| {
        panic!(
            "reopen after SIGKILL failed: {e}\n{e:?}\nqueue directory:\n{}",
            listing(dir)
        )
    });
    // Open removed whatever an interrupted compaction left behind.
    let generations = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.starts_with("gen-") || n.ends_with(".tmp")
        })
        .count();
    assert!(generations <= 1, "{generations} store generations left");
    let records = q.list(None, usize::MAX).unwrap();
    let mut by_msg: BTreeMap<MessageId, Vec<_>> = BTreeMap::new();
    let mut counts: BTreeMap<RecipientState, u64> = BTreeMap::new();
    for r in records {
        assert_ne!(
            r.state,
            RecipientState::Leased,
            "lease survived reopen: {}",
            r.id
        );
        *counts.entry(r.state).or_default() += 1;
        by_msg.entry(r.id.message).or_default().push(r);
    }
    let stats = q.stats();
    assert_eq!(
        stats.by_state, counts,
        "rebuilt counters disagree with the records"
    );

    // Every stored message: consistent, and its key stored once.
    let mut key_to_id: HashMap<String, MessageId> = HashMap::new();
    for (id, recs) in &by_msg {
        let info = q.message(*id).unwrap().expect("records without message");
        let key = info
            .idempotency_key
            .clone()
            .expect("child always sets a key");
        if let Some(other) = key_to_id.insert(key.clone(), *id) {
            panic!("key {key} stored twice: {other} and {id}");
        }
        assert_eq!(info.recipients.len(), recs.len());
        let pending = recs.iter().any(|r| !r.state.is_final());
        let body = q.body(*id).unwrap();
        assert_eq!(body.is_some(), pending, "body presence wrong for {id}");
        if let Some(b) = body {
            assert_eq!(b, new_message(key.clone(), 1).body, "body of {id}");
        }
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.id.index as usize, i, "recipient indexes of {id}");
        }
    }
    // Every acknowledged enqueue is there, exactly once, with all its recipients.
    for (key, (id, n)) in &acked.enqueued {
        assert_eq!(
            key_to_id.get(key),
            Some(id),
            "acked message {id} ({key}) lost"
        );
        assert_eq!(by_msg[id].len(), *n, "recipients of {id}");
    }
    // Every acknowledged completion is recorded.
    for (rid, st) in &acked.completed {
        let rec = by_msg
            .get(&rid.message)
            .and_then(|v| v.get(rid.index as usize))
            .unwrap_or_else(|| panic!("completed recipient {rid} missing"));
        assert_eq!(rec.state, *st, "state of {rid}");
        assert!(rec.attempts >= 1, "attempts of {rid}");
    }
    // Every scheduled recipient is in the schedule, once: taking everything due in two days
    // (before any expires) leases each exactly once. The leases end with this process.
    let scheduled: BTreeSet<RecipientId> = by_msg
        .values()
        .flatten()
        .filter(|r| r.state == RecipientState::Scheduled)
        .map(|r| r.id)
        .collect();
    let mut leased = BTreeSet::new();
    let at = SystemTime::now() + Duration::from_secs(2 * 86_400);
    loop {
        let leases = q.take_due(at, 1000).unwrap();
        if leases.is_empty() {
            break;
        }
        for l in leases {
            assert!(
                leased.insert(l.recipient.id),
                "{} leased twice",
                l.recipient.id
            );
        }
    }
    let missing: Vec<_> = scheduled.difference(&leased).take(5).collect();
    let extra: Vec<_> = leased.difference(&scheduled).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} scheduled, {} taken: scheduled but never taken {missing:?}..., taken but not \
         scheduled {extra:?}...",
        scheduled.len(),
        leased.len()
    );
    // The stored idempotency index agrees with the messages: a retried enqueue of the key
    // of any stored message (acknowledged or not) is a duplicate with that message's id.
    let stored: Vec<(&String, &MessageId)> = key_to_id.iter().collect();
    for part in stored.chunks(500) {
        let res = q
            .enqueue_batch(
                part.iter()
                    .map(|(k, _)| new_message((*k).clone(), 1))
                    .collect(),
            )
            .unwrap();
        for ((key, id), e) in part.iter().zip(res) {
            let e = e.unwrap();
            assert!(e.duplicate, "key {key} of {id} not in the index");
            assert_eq!(e.id, **id, "key {key}");
        }
    }
    (by_msg.len(), acked.completed.len())
}

#[test]
fn sigkill_at_random_moments() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let cycles: u64 = std::env::var("BULKSEND_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}, {cycles} cycles");
    let mut rng = Rng(seed);
    let mut acked = Acked::default();
    let mut compactions = 0;
    for cycle in 0..cycles {
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR, dir.path())
                .env(CHILD_CYCLE, cycle.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    // Only complete lines count: the child may die mid-line.
                    Ok(n) if n > 0 && line.ends_with('\n') => {
                        let _ = line_tx.send(line.trim_end().to_string());
                    }
                    _ => return,
                }
            }
        });
        // One cycle in ten dies during open/recovery; the rest while working.
        let delay = if rng.below(10) == 0 {
            rng.below(40)
        } else {
            // (libtest's own "running 1 test" lines come first)
            // and libtest prints "test crash_child ... " before the child's first line.
            while !line_rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap()
                .ends_with("READY")
            {}
            rng.below(500)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.0.kill().unwrap(); // SIGKILL
        let status = child.0.wait().unwrap();
        assert!(!status.success(), "child exited on its own: {status}");
        reader.join().unwrap();
        let lines: Vec<String> = line_rx.try_iter().collect();
        let (mut e, mut c) = (0, 0);
        for line in &lines {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["E", id, key, n] => {
                    let id: MessageId = id.parse().unwrap();
                    let prev = acked
                        .enqueued
                        .insert(key.to_string(), (id, n.parse().unwrap()));
                    assert!(prev.is_none(), "key {key} acked twice");
                    e += 1;
                }
                ["C", rid, st] => {
                    acked
                        .completed
                        .insert(rid.parse().unwrap(), st.parse().unwrap());
                    c += 1;
                }
                ["K", _] => compactions += 1,
                _ => {}
            }
        }
        let (stored, _) = check(dir.path(), &acked);
        eprintln!(
            "cycle {cycle}: killed after {delay} ms, {e} enqueues and {c} completions acked; \
             {stored} messages stored, {} acked in total",
            acked.enqueued.len()
        );
    }
    assert!(
        !acked.enqueued.is_empty(),
        "the child never acknowledged anything"
    );
    assert!(
        acked.enqueued.keys().any(|k| k.contains("-a")),
        "the child never acknowledged an async enqueue"
    );
    assert!(
        !acked.completed.is_empty(),
        "the child never completed anything"
    );
    assert!(compactions > 0, "the child never compacted");
    // The final index came through every kill: purging everything final drops exactly the
    // final records (an entry lost or left half-written would leave some behind).
    let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
    let records = q.list(None, usize::MAX).unwrap();
    let finals = records.iter().filter(|r| r.state.is_final()).count();
    assert!(finals > 0, "nothing final to purge");
    let purged = q
        .purge_final(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    assert_eq!(purged, finals, "records dropped by the purge");
    let left = q.list(None, usize::MAX).unwrap();
    assert_eq!(left.len(), records.len() - finals);
    assert!(left.iter().all(|r| !r.state.is_final()));
    eprintln!("{compactions} compactions completed in all");
}
