//! One structured event per recipient outcome, as JSON lines (the field names are part of the
//! external contract in DESIGN.md; add fields, rename none).
//!
//! Emitting never blocks delivery: events go through a bounded channel to a writer thread that
//! appends to the file in batches. If the writer falls behind by more than the channel holds,
//! events are counted as dropped (metric) rather than stalling sending; the queue itself remains
//! the record of truth.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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

/// Appends JSON lines to a file from a writer thread.
pub struct FileEvents {
    tx: crossbeam_channel::Sender<Msg>,
    path: PathBuf,
}

impl FileEvents {
    pub fn open(path: &Path) -> std::io::Result<FileEvents> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, rx) = crossbeam_channel::bounded::<Msg>(65_536);
        let shown = path.to_owned();
        std::thread::Builder::new()
            .name("bulksend-events".into())
            .spawn(move || writer(file, rx, shown))?;
        Ok(FileEvents {
            tx,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn writer(file: std::fs::File, rx: crossbeam_channel::Receiver<Msg>, path: PathBuf) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    while let Ok(first) = rx.recv() {
        let mut waiters = Vec::new();
        let mut next = Some(first);
        // Drain whatever has queued up, then write once.
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Msg::Event(e) => {
                    if serde_json::to_writer(&mut out, &e).is_ok() {
                        let _ = out.write_all(b"\n");
                    }
                }
                Msg::Flush(done) => waiters.push(done),
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!(path = %path.display(), error = %e, "cannot write events");
        }
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
            let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
