//! One structured event per recipient outcome, as JSON lines (the field names are part of the
//! external contract in DESIGN.md; add fields, rename none).
//!
//! Emitting never blocks delivery: every sink that does I/O hands events to a thread of its own
//! through a bounded buffer, and counts what does not fit in `EVENTS_DROPPED` rather than
//! stalling sending; the queue itself remains the record of truth.
//!
//! - [`FileEvents`] appends to a file in batches and rotates it by size (`events.jsonl` →
//!   `events.jsonl.1` → …), never splitting a line.
//! - [`WebhookEvents`] POSTs JSON arrays to an HTTP receiver, in order and at least once: a
//!   failed POST is retried with the same batch, with exponential back-off.
//! - [`Fanout`] sends to several.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// What became of a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Delivered,
    Deferred,
    Bounced,
    Suppressed,
    Expired,
    Unknown,
}

/// One line of the event log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub event: EventKind,
    pub message_id: String,
    pub recipient: String,
    pub destination: String,
    /// The MX host that answered, when there was a connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<String>,
    pub text: String,
    /// Outcome class from `classify` (e.g. "invalid_recipient", "reputation").
    pub class: String,
    /// SMTP phase the outcome came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    pub attempt: u32,
    /// RFC 3339, UTC.
    pub at: String,
    /// For deferrals: when the next attempt is due (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Where events go.
pub trait EventSink: Send + Sync + 'static {
    fn emit(&self, event: Event);
    /// Blocks until everything emitted so far is written (shutdown, tests).
    fn flush(&self) {}
}

/// Discards events.
#[derive(Debug, Default)]
pub struct NoEvents;
impl EventSink for NoEvents {
    fn emit(&self, _: Event) {}
}

/// Keeps events in memory (tests, demo summaries).
#[derive(Debug, Default)]
pub struct MemoryEvents(pub Mutex<Vec<Event>>);
impl EventSink for MemoryEvents {
    fn emit(&self, event: Event) {
        if let Ok(mut v) = self.0.lock() {
            v.push(event);
        }
    }
}
impl MemoryEvents {
    pub fn take(&self) -> Vec<Event> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
    pub fn snapshot(&self) -> Vec<Event> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Sends to several sinks.
pub struct Fanout(pub Vec<Arc<dyn EventSink>>);
impl EventSink for Fanout {
    fn emit(&self, event: Event) {
        for s in &self.0 {
            s.emit(event.clone());
        }
    }
    fn flush(&self) {
        for s in &self.0 {
            s.flush();
        }
    }
}

enum Msg {
    Event(Box<Event>),
    Flush(crossbeam_channel::Sender<()>),
}

/// When [`FileEvents`] starts a new file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before a line would take the file past this many bytes; 0 = never.
    pub max_file_bytes: u64,
    /// Rotated files kept: `path.1` (newest) … `path.N`; older ones are overwritten.
    pub keep_files: usize,
}

impl Rotation {
    pub const NEVER: Rotation = Rotation {
        max_file_bytes: 0,
        keep_files: 0,
    };

    pub fn from_settings(s: &bulksend_config::EventsSettings) -> Rotation {
        Rotation {
            max_file_bytes: s.max_file_bytes,
            keep_files: s.keep_files,
        }
    }

    fn enabled(&self) -> bool {
        self.max_file_bytes > 0 && self.keep_files > 0
    }
}

/// Appends JSON lines to a file from a writer thread.
pub struct FileEvents {
    tx: crossbeam_channel::Sender<Msg>,
    path: PathBuf,
}

impl FileEvents {
    /// Appends to `path` forever (no rotation).
    pub fn open(path: &Path) -> std::io::Result<FileEvents> {
        Self::open_rotating(path, Rotation::NEVER)
    }

    /// Appends to `path`, rotating it by size.
    pub fn open_rotating(path: &Path, rotation: Rotation) -> std::io::Result<FileEvents> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let log = LogFile::open(path, rotation)?;
        let (tx, rx) = crossbeam_channel::bounded::<Msg>(65_536);
        std::thread::Builder::new()
            .name("bulksend-events".into())
            .spawn(move || writer(log, rx))?;
        Ok(FileEvents {
            tx,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The file being appended to, and how big it is (counting what is still buffered), so the
/// rotation decision is made per whole line.
struct LogFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    size: u64,
    rotation: Rotation,
    /// After a failed rotation, don't try again (a rename per line) until the file has grown by
    /// another `max_file_bytes`.
    retry_at: u64,
}

impl LogFile {
    fn open(path: &Path, rotation: Rotation) -> std::io::Result<LogFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_owned(),
            out: std::io::BufWriter::with_capacity(256 * 1024, file),
            size,
            rotation,
            retry_at: 0,
        })
    }

    fn write_line(&mut self, line: &[u8]) {
        let len = line.len() as u64;
        if self.rotation.enabled()
            && self.size > 0
            && self.size.saturating_add(len) > self.rotation.max_file_bytes
            && self.size >= self.retry_at
        {
            self.rotate();
        }
        match self.out.write_all(line) {
            Ok(()) => self.size += len,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write events");
            }
        }
    }

    /// `path.{N-1}` → `path.N`, …, `path` → `path.1`, then a fresh `path`. On any failure the
    /// current file stays open and appending goes on: an event is never lost to rotation.
    fn rotate(&mut self) {
        let result = self
            .out
            .flush()
            .and_then(|()| shift_files(&self.path, self.rotation.keep_files))
            .and_then(|()| open_append(&self.path));
        match result {
            Ok(file) => {
                // The old handle now names `path.1`; everything buffered was flushed into it.
                self.out = std::io::BufWriter::with_capacity(256 * 1024, file);
                self.size = 0;
                self.retry_at = 0;
            }
            Err(e) => {
                tracing::error!(
                    path = %self.path.display(), error = %e,
                    "cannot rotate the events file; appending to it as it is"
                );
                self.retry_at = self.size.saturating_add(self.rotation.max_file_bytes);
            }
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write events");
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Renames oldest first so nothing is overwritten but `path.{keep}`. A missing file (a gap) is
/// fine; any other failure stops before `path` itself is renamed.
fn shift_files(path: &Path, keep: usize) -> std::io::Result<()> {
    for n in (1..keep).rev() {
        match std::fs::rename(numbered(path, n), numbered(path, n + 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, numbered(path, 1))
}

fn writer(mut log: LogFile, rx: crossbeam_channel::Receiver<Msg>) {
    let mut line = Vec::with_capacity(1024);
    while let Ok(first) = rx.recv() {
        let mut waiters = Vec::new();
        let mut next = Some(first);
        // Drain whatever has queued up, then flush once.
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Event(e) => {
                    line.clear();
                    if serde_json::to_writer(&mut line, &e).is_ok() {
                        line.push(b'\n');
                        log.write_line(&line);
                    }
                }
                Msg::Flush(done) => waiters.push(done),
            }
        }
        log.flush();
        for w in waiters {
            let _ = w.send(());
        }
    }
}

impl EventSink for FileEvents {
    fn emit(&self, event: Event) {
        if self.tx.try_send(Msg::Event(Box::new(event))).is_err() {
            metrics::counter!(crate::metrics::EVENTS_DROPPED).increment(1);
        }
    }
    fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// How [`WebhookEvents`] talks to its receiver.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// http:// or https://.
    pub url: String,
    /// Sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Most events in one POST.
    pub batch: usize,
    /// Longest the oldest buffered event waits for a batch to fill.
    pub interval: Duration,
    /// First retry delay; it doubles up to `max_backoff` (each with ±20 % jitter).
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Events held while the receiver is down, not counting the batch being sent.
    pub buffer: usize,
    /// One POST's deadline, connect to last byte of the reply.
    pub request_timeout: Duration,
    /// Longest [`EventSink::flush`] waits.
    pub flush_timeout: Duration,
}

impl WebhookOptions {
    /// `None` when no `events.webhook_url` is set.
    pub fn from_settings(s: &bulksend_config::EventsSettings) -> Option<WebhookOptions> {
        let url = s.webhook_url.clone()?;
        Some(WebhookOptions {
            url,
            token: s.webhook_token.clone().filter(|t| !t.is_empty()),
            batch: s.webhook_batch,
            interval: s.webhook_interval,
            min_backoff: Duration::from_secs(1),
            max_backoff: s.webhook_max_backoff,
            buffer: s.webhook_buffer,
            request_timeout: Duration::from_secs(30),
            flush_timeout: Duration::from_secs(10),
        })
    }
}

/// Sends events to an HTTP receiver as JSON arrays, from a thread of its own.
///
/// Delivery is at least once and in order: the sender takes the oldest `batch` events out of
/// the buffer and POSTs them until the receiver answers 2xx, however many attempts that takes
/// (so a receiver must tolerate duplicates). Meanwhile `emit` only appends to a bounded buffer;
/// when the receiver is down long enough for it to fill, the oldest events are dropped and
/// counted. Dropping the sink stops the sender without draining: call `flush` first.
pub struct WebhookEvents {
    shared: Arc<Shared>,
    buffer: usize,
    batch: usize,
    flush_timeout: Duration,
}

struct Shared {
    state: Mutex<WebhookState>,
    /// Wakes the sender: a batch filled, the first event arrived, a flush, or close.
    wake: Condvar,
    /// Wakes flushers: a batch was accepted.
    settled: Condvar,
}

struct Pending {
    seq: u64,
    queued: Instant,
    event: Event,
}

#[derive(Default)]
struct WebhookState {
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// First sequence number of the batch being sent.
    in_flight: Option<u64>,
    flushers: usize,
    closed: bool,
    dropped: u64,
}

impl WebhookState {
    /// Everything before `target` was accepted (or dropped).
    fn settled(&self, target: u64) -> bool {
        self.in_flight.is_none_or(|s| s >= target)
            && self.pending.front().is_none_or(|p| p.seq >= target)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, WebhookState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WebhookEvents {
    pub fn start(opts: WebhookOptions) -> std::io::Result<WebhookEvents> {
        let shared = Arc::new(Shared {
            state: Mutex::new(WebhookState::default()),
            wake: Condvar::new(),
            settled: Condvar::new(),
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(opts.request_timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(concat!("bulksend/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let sink = WebhookEvents {
            shared: shared.clone(),
            buffer: opts.buffer.max(1),
            batch: opts.batch.max(1),
            flush_timeout: opts.flush_timeout,
        };
        std::thread::Builder::new()
            .name("bulksend-webhook".into())
            .spawn(move || sender(&shared, &opts, &agent))?;
        Ok(sink)
    }

    /// Events dropped because the buffer was full (also in `EVENTS_DROPPED`).
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

impl EventSink for WebhookEvents {
    fn emit(&self, event: Event) {
        let mut st = self.shared.lock();
        if st.closed {
            return;
        }
        let mut dropped = 0;
        while st.pending.len() >= self.buffer {
            st.pending.pop_front();
            dropped += 1;
        }
        st.dropped += dropped;
        let seq = st.next_seq;
        st.next_seq += 1;
        st.pending.push_back(Pending {
            seq,
            queued: Instant::now(),
            event,
        });
        // Only the transitions the sender waits for, not every event.
        let len = st.pending.len();
        drop(st);
        if len == 1 || len == self.batch {
            self.shared.wake.notify_one();
        }
        if dropped > 0 {
            metrics::counter!(crate::metrics::EVENTS_DROPPED).increment(dropped);
        }
    }

    fn flush(&self) {
        let deadline = Instant::now() + self.flush_timeout;
        let mut st = self.shared.lock();
        let target = st.next_seq;
        st.flushers += 1;
        self.shared.wake.notify_one();
        while !st.settled(target) && !st.closed {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    buffered = st.pending.len(),
                    "events webhook: flush timed out with events not yet accepted"
                );
                break;
            }
            st = self
                .shared
                .settled
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.flushers -= 1;
    }
}

impl Drop for WebhookEvents {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        self.shared.settled.notify_all();
    }
}

/// The sender thread: one batch at a time, oldest first, each until accepted.
fn sender(shared: &Shared, opts: &WebhookOptions, agent: &ureq::Agent) {
    let batch_max = opts.batch.max(1);
    let auth = opts.token.as_ref().map(|t| format!("Bearer {t}"));
    loop {
        let batch: Vec<Pending> = {
            let mut st = shared.lock();
            loop {
                if st.closed {
                    return;
                }
                let wait = match st.pending.front() {
                    None => None,
                    Some(front) => {
                        let due = front.queued + opts.interval;
                        let now = Instant::now();
                        if st.pending.len() >= batch_max || st.flushers > 0 || now >= due {
                            break;
                        }
                        Some(due - now)
                    }
                };
                st = match wait {
                    None => shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                    Some(d) => {
                        shared
                            .wake
                            .wait_timeout(st, d)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                };
            }
            let n = st.pending.len().min(batch_max);
            let batch: Vec<Pending> = st.pending.drain(..n).collect();
            st.in_flight = batch.first().map(|p| p.seq);
            batch
        };
        let events: Vec<&Event> = batch.iter().map(|p| &p.event).collect();
        let body = match serde_json::to_vec(&events) {
            Ok(b) => b,
            Err(e) => {
                // Not expected for these types; skip rather than retry forever.
                tracing::error!(error = %e, "events webhook: cannot serialize a batch");
                Vec::new()
            }
        };
        if !body.is_empty()
            && !post_until_accepted(shared, opts, agent, auth.as_deref(), &body, batch.len())
        {
            return;
        }
        shared.lock().in_flight = None;
        shared.settled.notify_all();
    }
}

/// POSTs `body` until a 2xx. Returns false if the sink was closed while waiting to retry.
fn post_until_accepted(
    shared: &Shared,
    opts: &WebhookOptions,
    agent: &ureq::Agent,
    auth: Option<&str>,
    body: &[u8],
    events: usize,
) -> bool {
    let mut attempt = 0u32;
    loop {
        let error = match post(agent, &opts.url, auth, body) {
            Ok(()) => return true,
            Err(e) => e,
        };
        let delay = backoff(
            attempt,
            opts.min_backoff,
            opts.max_backoff,
            rand::random::<f64>(),
        );
        attempt = attempt.saturating_add(1);
        tracing::warn!(
            url = %opts.url, events, attempt, error = %error,
            retry_in = %humantime::format_duration(round_ms(delay)),
            "events webhook: POST failed; will retry the same batch"
        );
        let deadline = Instant::now() + delay;
        let mut st = shared.lock();
        loop {
            if st.closed {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = shared
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, auth: Option<&str>, body: &[u8]) -> Result<(), String> {
    let mut req = agent.post(url).header("Content-Type", "application/json");
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    let mut resp = req.send(body).map_err(|e| e.to_string())?;
    // Read (a bounded amount of) the reply so the connection can be reused.
    let _ = resp.body_mut().with_config().limit(64 * 1024).read_to_vec();
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

/// The wait before retry number `attempt` (0-based): `min` doubling up to `max`, scaled by a
/// jitter factor in [0.8, 1.2) from `unit` in [0, 1) so that many senders do not retry in step.
fn backoff(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let base = min
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    base.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(i: usize) -> Event {
        Event {
            event: EventKind::Delivered,
            message_id: format!("{i:016x}"),
            recipient: format!("u{i}@x.test"),
            destination: "mx.x.test".into(),
            mx: None,
            code: Some(250),
            enhanced: None,
            text: "ok".repeat(i % 7),
            class: "delivered".into(),
            phase: None,
            attempt: 1,
            at: rfc3339(SystemTime::UNIX_EPOCH),
            next_attempt: None,
        }
    }

    /// The files oldest first: `path.N` … `path.1`, `path`.
    fn files_oldest_first(path: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = (1..1000)
            .map(|n| numbered(path, n))
            .take_while(|p| p.exists())
            .collect();
        files.reverse();
        files.push(path.to_owned());
        files
    }

    /// Recipients' numbers, file by file; panics on a line that is not whole JSON.
    fn read_numbers(file: &Path) -> Vec<usize> {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{}",
            file.display()
        );
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("split line in {}: {e}: {l}", file.display()));
                v["recipient"].as_str().unwrap()[1..]
                    .split('@')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    fn line_len(i: usize) -> u64 {
        serde_json::to_vec(&event(i)).unwrap().len() as u64 + 1
    }

    #[test]
    fn rotates_at_the_size_without_splitting_or_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let max = 2_000;
        let sink = FileEvents::open_rotating(
            &path,
            Rotation {
                max_file_bytes: max,
                keep_files: 1_000,
            },
        )
        .unwrap();
        for i in 0..300 {
            sink.emit(event(i));
        }
        sink.flush();
        let files = files_oldest_first(&path);
        assert!(files.len() > 10, "{files:?}");
        let mut all = Vec::new();
        for (k, f) in files.iter().enumerate() {
            let size = std::fs::metadata(f).unwrap().len();
            assert!(size <= max, "{} is {size} bytes", f.display());
            let numbers = read_numbers(f);
            assert!(!numbers.is_empty());
            // Rotation happens at the size: the next line would not have fitted.
            if k + 1 < files.len() {
                let next = numbers[numbers.len() - 1] + 1;
                assert!(size + line_len(next) > max, "{} rotated early", f.display());
            }
            all.extend(numbers);
        }
        assert_eq!(all, (0..300).collect::<Vec<_>>());
    }

    #[test]
    fn keeps_only_keep_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sink = FileEvents::open_rotating(
            &path,
            Rotation {
                max_file_bytes: 1_000,
                keep_files: 3,
            },
        )
        .unwrap();
        for i in 0..200 {
            sink.emit(event(i));
        }
        sink.flush();
        assert!(numbered(&path, 3).exists());
        assert!(!numbered(&path, 4).exists());
        let all: Vec<usize> = files_oldest_first(&path)
            .iter()
            .flat_map(|f| read_numbers(f))
            .collect();
        // The newest events, contiguous and in order; only whole older files are gone.
        assert!(all.len() > 10 && all.len() < 200, "{}", all.len());
        let first = all[0];
        assert_eq!(all, (first..200).collect::<Vec<_>>());
    }

    #[test]
    fn a_line_bigger_than_the_limit_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sink = FileEvents::open_rotating(
            &path,
            Rotation {
                max_file_bytes: 10,
                keep_files: 5,
            },
        )
        .unwrap();
        for i in 0..3 {
            sink.emit(event(i));
        }
        sink.flush();
        let files = files_oldest_first(&path);
        assert_eq!(files.len(), 3);
        for (i, f) in files.iter().enumerate() {
            assert_eq!(read_numbers(f), vec![i]);
        }
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "x".repeat(990) + "\n").unwrap();
        let sink = FileEvents::open_rotating(
            &path,
            Rotation {
                max_file_bytes: 1_000,
                keep_files: 2,
            },
        )
        .unwrap();
        sink.emit(event(0));
        sink.flush();
        assert_eq!(
            std::fs::read_to_string(numbered(&path, 1)).unwrap().len(),
            991
        );
        assert_eq!(read_numbers(&path), vec![0]);
    }

    #[test]
    fn a_failed_rotation_keeps_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        // `events.jsonl.1` is a non-empty directory: renaming the file onto it fails.
        std::fs::create_dir(numbered(&path, 1)).unwrap();
        std::fs::write(numbered(&path, 1).join("keep"), "x").unwrap();
        let sink = FileEvents::open_rotating(
            &path,
            Rotation {
                max_file_bytes: 500,
                keep_files: 1,
            },
        )
        .unwrap();
        for i in 0..100 {
            sink.emit(event(i));
        }
        sink.flush();
        assert_eq!(read_numbers(&path), (0..100).collect::<Vec<_>>());
        // Once the obstacle is gone, rotation resumes.
        std::fs::remove_dir_all(numbered(&path, 1)).unwrap();
        for i in 100..200 {
            sink.emit(event(i));
        }
        sink.flush();
        assert!(numbered(&path, 1).is_file());
        let all: Vec<usize> = files_oldest_first(&path)
            .iter()
            .flat_map(|f| read_numbers(f))
            .collect();
        assert_eq!(
            all,
            (0..all.len())
                .map(|i| i + 200 - all.len())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let mid: Vec<u64> = (0..12)
            .map(|a| backoff(a, min, max, 0.5).as_secs())
            .collect();
        assert_eq!(mid, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(0, min, max, 0.0), Duration::from_millis(800));
        assert_eq!(backoff(0, min, max, 1.0), Duration::from_millis(1200));
        assert_eq!(backoff(u32::MAX, min, max, 0.5), max);
    }

    #[test]
    fn writes_contract_fields_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/events.jsonl");
        let sink = FileEvents::open(&path).unwrap();
        for i in 0..3 {
            sink.emit(Event {
                event: EventKind::Bounced,
                message_id: "00000000000000ab".into(),
                recipient: format!("u{i}@x.test"),
                destination: "mx.x.test".into(),
                mx: Some("mx.x.test".into()),
                code: Some(550),
                enhanced: Some("5.1.1".into()),
                text: "User unknown".into(),
                class: "invalid_recipient".into(),
                phase: Some("rcpt".into()),
                attempt: 1,
                at: rfc3339(SystemTime::UNIX_EPOCH),
                next_attempt: None,
            });
        }
        sink.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        let l = &lines[2];
        assert_eq!(l["event"], "bounced");
        assert_eq!(l["recipient"], "u2@x.test");
        assert_eq!(l["code"], 550);
        assert_eq!(l["enhanced"], "5.1.1");
        assert_eq!(l["attempt"], 1);
        assert_eq!(l["at"], "1970-01-01T00:00:00.000Z");
        for key in ["message_id", "destination", "text"] {
            assert!(l.get(key).is_some(), "{key}");
        }
    }
}
