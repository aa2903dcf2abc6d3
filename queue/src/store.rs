//! The queue: request types, the writer thread (all mutations, one sled `Batch` per group of requests)
//! and the syncer thread (group flush + fdatasync, then the acknowledgements).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use sled::IVec;

use crate::codec::{self, Body, Meta};
use crate::filter::SuppressionFilter;
use crate::idem::{IdemHasher, IdemIndex};
use crate::runs::{self, Run, RunError};
use crate::schedule::{self, Schedule};
use crate::types::{from_millis, to_millis};
use crate::{lock, segments};
use crate::{
    Completed, Enqueued, Lease, MessageId, MessageInfo, NewMessage, Outcome, QueueError,
    QueueOptions, RecipientId, RecipientRecord, RecipientState, Stats, Suppression,
};

/// Longest accepted address (RFC 5321 §4.5.3.1: 64 local + 255 domain octets, plus '@').
const MAX_ADDRESS: usize = 320;
const MAX_IDEMPOTENCY_KEY: usize = 512;
/// Purge at most this many final records per sled batch, so one purge never builds a
/// batch as big as the queue. sled keeps every node copy a batch replaces until the batch
/// ends, so the batch size is also a peak of memory: 10,000 records per batch left RSS at
/// 435 MiB after purging 1,000,000 records, 1,000 at 333 MiB (BENCHMARKS.md, "Fifth
/// session").
const PURGE_CHUNK: usize = 1_000;
/// Records one final-index entry lists at most (12 bytes each): keeps its sled node small.
const FINAL_ENTRY_MAX: usize = 64;
/// How often the writer purges final records older than `final_retention` on its own.
const AUTO_PURGE_EVERY: Duration = Duration::from_secs(60);
/// What a key in the idempotency index's memory part costs, for
/// `QueueOptions::idempotency_memory_bytes`: 12 bytes and the shards' slack.
const IDEM_KEY_BYTES: u64 = 13;
/// Recovery applies its fixes in batches of this many writes.
const RECOVERY_CHUNK: usize = 10_000;
const REQUEST_QUEUE: usize = 4096;
/// Most requests handled in one sled batch.
const MAX_GROUP: usize = 1024;
const EXPIRED_REPLY: &str = "expired in queue";
/// Written next to sled's files once the store is initialised: tells "new, empty directory"
/// apart from "sled could not read the data that was here".
const MARKER: &str = "bulksend-queue";
/// Names the sled directory in use once the store has been compacted (`gen-NNNNNN`); without
/// it sled's files are in the queue directory itself (generation 0).
const CURRENT: &str = "CURRENT";
/// Locked (flock) by the process that has the queue open.
const LOCK: &str = "LOCK";
/// Files sled 0.34.7 keeps in its directory (besides `snap.*`): what a compaction removes of
/// generation 0.
const SLED_FILES: [&str; 3] = ["db", "conf", "blobs"];
/// After a change, wait this long before looking at whether to compact.
const COMPACT_CHECK_DELAY: Duration = Duration::from_secs(2);
/// A background compaction is abandoned when more keys than this were written while it
/// copied (the catch-up, done with writes held, would take too long and the set too much
/// memory).
const MAX_DIRTY_KEYS: usize = 2_000_000;
/// Rough bytes per stored key (key, value, sled's overhead), to estimate live data.
const BYTES_PER_KEY: u64 = 160;

type Res<T> = Result<T, QueueError>;

/// The persistent spool. Cheap to share: wrap it in an `Arc`. All methods block (call them
/// from `spawn_blocking` in async code). Dropping the last handle stops the writer threads
/// after the requests already submitted and flushes.
pub struct Queue {
    shared: Arc<Shared>,
    requests: Option<Sender<Request>>,
    /// The writer thread: unparked after sending it anything but an outcome that may wait
    /// (see the hold in `Writer::run`).
    writer: std::thread::Thread,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    /// The queue directory (as configured).
    path: PathBuf,
    /// The sled store in use; replaced by a compaction.
    store: RwLock<Arc<Store>>,
    /// Holds the queue directory's `LOCK` while open.
    _lock: File,
    /// While a background compaction copies: every key committed since it began.
    dirty: Mutex<Option<HashSet<IVec>>>,
    opts: QueueOptions,
    counters: Mutex<Counters>,
    /// Set when a flush or fsync failed: no write is acknowledged after that.
    closed: Mutex<Option<String>>,
    /// Body segment files (`bodies/`, outside sled's generations: a compaction does not
    /// copy them).
    seg_dir: PathBuf,
    segs: Mutex<segments::State>,
    /// Segment files kept open for body reads.
    seg_readers: segments::Readers,
    /// Due times and leases (in memory only; see `schedule`). Changed by the writer only.
    sched: Mutex<Schedule>,
    /// The idempotency index's memory part, and its hash (see `idem`). Used by the writer
    /// only.
    idem: Mutex<IdemIndex>,
    /// Tests: this many coming group commits fail as a failing sled batch would.
    #[cfg(test)]
    fail_commits: AtomicUsize,
    /// Tests: while true, a run write of the idempotency index waits before it writes.
    #[cfg(test)]
    hold_run_writes: (Mutex<bool>, std::sync::Condvar),
}

/// One generation of the sled store.
struct Store {
    db: sled::Db,
    /// sled's directory: the queue directory (generation 0) or `gen-NNNNNN` inside it.
    dir: PathBuf,
    generation: u64,
}

impl Shared {
    fn store(&self) -> Arc<Store> {
        Arc::clone(&self.store.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn db(&self) -> sled::Db {
        self.store().db.clone()
    }

    /// Refuses every write from now on (a write or sync failed: what was not synced cannot
    /// be trusted), and says why.
    fn close(&self, reason: &str) {
        tracing::error!(path = %self.path.display(), "{reason}; refusing further writes");
        *lock(&self.closed) = Some(reason.to_owned());
    }

    /// A record as read from sled, with its lease if it has one: on disk a leased recipient
    /// reads `Scheduled` (leases live in memory).
    fn with_lease(&self, mut rec: RecipientRecord) -> RecipientRecord {
        if rec.state == RecipientState::Scheduled {
            if let Some(at) = lock(&self.sched).leased_at(rec.id) {
                rec.state = RecipientState::Leased;
                rec.updated = from_millis(at);
            }
        }
        rec
    }
}

fn gen_dir(path: &Path, generation: u64) -> PathBuf {
    if generation == 0 {
        path.to_path_buf()
    } else {
        path.join(format!("gen-{generation:06}"))
    }
}

/// The generation named by `CURRENT` (0 when there is none).
fn current_generation(path: &Path) -> Res<u64> {
    match std::fs::read_to_string(path.join(CURRENT)) {
        Ok(s) => s
            .trim()
            .strip_prefix("gen-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                open_err(
                    path,
                    format!(
                        "{} names no generation: {s:?}",
                        path.join(CURRENT).display()
                    ),
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(open_err(path, e)),
    }
}

/// Removes what earlier generations (or an interrupted compaction) left behind.
fn remove_other_generations(path: &Path, keep: u64) -> std::io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = name == format!("{CURRENT}.tmp")
            || match name.strip_prefix("gen-") {
                Some(n) => n.parse::<u64>().is_ok_and(|n| n != keep),
                // Generation 0's sled files, once a later generation is current.
                None => {
                    keep > 0 && (SLED_FILES.contains(&name.as_ref()) || name.starts_with("snap."))
                }
            };
        if stale {
            let p = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}

/// Opens sled. It locks its `db` file and, after a store of this process was dropped, can
/// hold that lock for a moment longer (its thread pool finishes the last writes), so a lock
/// conflict is retried for up to 2 s; the queue's own `LOCK` already excludes other processes.
fn open_sled(path: &Path, config: &sled::Config) -> Res<sled::Db> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // sled 0.34.7 panics on some kinds of garbage instead of returning an error.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled panicked".into());
                open_err(path, format!("unreadable store (sled panicked: {msg})"))
            })?;
        match res {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.map_err(|e| open_err(path, e)),
        }
    }
}

/// Deletes sled snapshots it was still writing when the process died (`snap.*.generating`).
/// sled 0.34.7 writes a snapshot under that name, syncs it, renames it to `snap.*`, and only
/// then removes the older one; but at open it reads the snapshot file that sorts last, which
/// an unfinished one does (its suffix), and refuses to open ("Read corrupted data", sled
/// issue #1527). Removing it is the state of a kill just before the snapshot began: the
/// older snapshot and the log are still there. Found by the crash test.
fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a sled snapshot left unfinished by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn sled_config(dir: &Path, opts: &QueueOptions) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(opts.cache_capacity_bytes)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
}

/// `fdatasync` of sled's `db` file and blob files, then its directory.
fn sync_sled_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir.join("db"))?.sync_data()?;
    match std::fs::read_dir(dir.join("blobs")) {
        Ok(rd) => {
            for entry in rd {
                File::open(entry?.path())?.sync_data()?;
            }
            File::open(dir.join("blobs"))?.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    File::open(dir)?.sync_all()
}

#[derive(Default)]
struct Counters {
    by_state: [u64; 7],
    by_destination: HashMap<String, u64>,
    /// Bytes of bodies still stored (messages with a pending recipient).
    body_bytes: u64,
    /// Entries in the suppression list.
    suppressions: u64,
}

impl Counters {
    fn add(&mut self, state: RecipientState, dest: &str) {
        self.by_state[usize::from(state.to_u8())] += 1;
        if !state.is_final() {
            *self.by_destination.entry(dest.to_string()).or_default() += 1;
        }
    }

    fn sub(&mut self, state: RecipientState, dest: &str) {
        let n = &mut self.by_state[usize::from(state.to_u8())];
        *n = n.saturating_sub(1);
        if !state.is_final() {
            if let Some(n) = self.by_destination.get_mut(dest) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.by_destination.remove(dest);
                }
            }
        }
    }
}

/// A state change of one record, applied to the counters once its batch is committed.
struct Change {
    old: Option<RecipientState>,
    new: Option<RecipientState>,
    destination: String,
}

enum Op {
    Enqueue(Vec<Checked>),
    Take {
        destination: Option<String>,
        now_ms: u64,
        limit: usize,
    },
    /// `may_wait`: may be held up to `QueueOptions::outcome_commit_delay` (see `Writer::run`).
    Complete {
        items: Vec<(RecipientId, Outcome)>,
        now_ms: u64,
        may_wait: bool,
    },
    Expire(u64),
    Retry(MessageId, u64),
    Delete(MessageId),
    Purge(u64),
    SuppressAdd(String, String, u64),
    SuppressRemove(String),
    Flush,
    Compact,
}

enum Reply {
    Enqueued(Vec<Res<Enqueued>>),
    Leases(Vec<Lease>),
    Completed(Vec<Res<Completed>>),
    Records(Vec<RecipientRecord>),
    Count(usize),
    Bool(bool),
    Unit,
    Compacted(Compaction),
}

impl Reply {
    fn into_enqueued(self) -> Res<Vec<Res<Enqueued>>> {
        match self {
            Reply::Enqueued(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }
}

/// What [`Queue::compact`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// sled's size on disk before and after.
    pub disk_before: u64,
    pub disk_after: u64,
    /// Keys copied into the new store.
    pub keys: u64,
    pub duration: Duration,
}

struct Request {
    op: Op,
    reply: ReplyTo,
}

/// Where a request's reply goes: a thread blocked in a call, or a task awaiting an async call.
enum ReplyTo {
    Blocking(SlotSender),
    Async(tokio::sync::oneshot::Sender<Res<Reply>>),
    /// Nobody waits (the writer's own syncs).
    Nobody,
}

impl ReplyTo {
    fn send(self, r: Res<Reply>) {
        match self {
            ReplyTo::Blocking(tx) => tx.send(r),
            ReplyTo::Async(tx) => {
                let _ = tx.send(r);
            }
            ReplyTo::Nobody => {}
        }
    }
}

/// The reply of one blocking call. The caller parks on the condition variable at once: a
/// `crossbeam_channel::bounded(1)` spins and calls `sched_yield` before it parks, and with 64
/// callers each waiting a group commit (~1–2 ms) those yields were the most frequent
/// context switch of the whole queue benchmark (BENCHMARKS.md, "Fifth session").
struct Slot {
    reply: Mutex<Option<Res<Reply>>>,
    ready: Condvar,
}

impl Slot {
    fn pair() -> (SlotSender, Arc<Slot>) {
        let slot = Arc::new(Slot {
            reply: Mutex::new(None),
            ready: Condvar::new(),
        });
        (SlotSender(Some(Arc::clone(&slot))), slot)
    }

    fn wait(&self) -> Res<Reply> {
        let mut reply = lock(&self.reply);
        loop {
            if let Some(r) = reply.take() {
                return r;
            }
            reply = self.ready.wait(reply).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Fills its [`Slot`] once; dropped unfilled (the writer or syncer gone with the request),
/// it fills it with [`QueueError::Closed`] so that the caller never waits forever.
struct SlotSender(Option<Arc<Slot>>);

impl SlotSender {
    fn send(mut self, r: Res<Reply>) {
        self.fill(r);
    }

    fn fill(&mut self, r: Res<Reply>) {
        if let Some(slot) = self.0.take() {
            *lock(&slot.reply) = Some(r);
            slot.ready.notify_one();
        }
    }
}

impl Drop for SlotSender {
    fn drop(&mut self) {
        if self.0.is_some() {
            self.fill(Err(QueueError::Closed {
                reason: "writer thread stopped".into(),
            }));
        }
    }
}

/// A handled request waiting for the group flush before its reply is sent.
struct Done {
    reply: ReplyTo,
    result: Res<Reply>,
    /// Needs flush + fdatasync before the reply (enqueue, complete, ...). Leases do not, but
    /// their reply still waits for any flush in progress, so a lease never hands out a
    /// message whose enqueue is not yet durable.
    durable: bool,
}

/// A validated message, ready for the writer.
struct Checked {
    msg: NewMessage,
    /// (lowercased address, destination) per recipient.
    normalized: Vec<(String, String)>,
}

fn invalid(s: String) -> QueueError {
    QueueError::InvalidInput(s)
}

/// Checks an envelope address; returns its lowercased destination domain.
fn check_address(a: &str, what: &str) -> Res<String> {
    if a.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if a.len() > MAX_ADDRESS {
        return Err(invalid(format!("{what} longer than {MAX_ADDRESS} octets")));
    }
    if let Some(c) = a.chars().find(|c| c.is_control()) {
        return Err(invalid(format!(
            "{what} {a:?} contains control character {c:?} (CR, LF, NUL and other controls are \
             not allowed: SMTP command injection)"
        )));
    }
    if let Some(c) = a.chars().find(|c| matches!(c, ' ' | '<' | '>')) {
        return Err(invalid(format!("{what} {a:?} contains {c:?}")));
    }
    let Some((local, domain)) = a.rsplit_once('@') else {
        return Err(invalid(format!("{what} {a:?} has no '@'")));
    };
    if local.is_empty() || domain.is_empty() {
        return Err(invalid(format!(
            "{what} {a:?} needs a local part and a domain"
        )));
    }
    Ok(domain.to_lowercase())
}

/// Checks every message of a batch: the slots of the invalid ones (filled) and the valid ones.
fn check_batch(msgs: Vec<NewMessage>) -> (Vec<Option<Res<Enqueued>>>, Vec<Checked>) {
    let mut out = Vec::with_capacity(msgs.len());
    let mut valid = Vec::new();
    for m in msgs {
        match check_message(m) {
            Ok(c) => {
                valid.push(c);
                out.push(None);
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    (out, valid)
}

/// The one result of a one-message enqueue.
fn only(mut v: Vec<Res<Enqueued>>) -> Res<Enqueued> {
    match (v.pop(), v.is_empty()) {
        (Some(r), true) => r,
        _ => Err(unexpected()),
    }
}

/// Fills the empty slots of [`check_batch`] with the writer's results, in order.
fn merge_batch(out: Vec<Option<Res<Enqueued>>>, stored: Vec<Res<Enqueued>>) -> Vec<Res<Enqueued>> {
    let mut stored = stored.into_iter();
    out.into_iter()
        .map(|slot| slot.unwrap_or_else(|| stored.next().unwrap_or_else(|| Err(unexpected()))))
        .collect()
}

fn check_message(msg: NewMessage) -> Res<Checked> {
    if msg.recipients.is_empty() {
        return Err(invalid("message has no recipients".into()));
    }
    if u32::try_from(msg.recipients.len()).is_err() {
        return Err(invalid("too many recipients".into()));
    }
    if !msg.sender.is_empty() {
        check_address(&msg.sender, "sender")?;
    }
    if let Some(k) = &msg.idempotency_key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
            return Err(invalid(format!(
                "idempotency key must be 1..={MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
    }
    let normalized = msg
        .recipients
        .iter()
        .map(|r| Ok((r.to_lowercase(), check_address(r, "recipient")?)))
        .collect::<Res<Vec<_>>>()?;
    Ok(Checked { msg, normalized })
}

fn normalize_suppressed(address: &str) -> Res<String> {
    check_address(address, "address")?;
    Ok(address.to_lowercase())
}

fn lifetime_ms(opts: &QueueOptions) -> u64 {
    u64::try_from(opts.max_queue_lifetime.as_millis()).unwrap_or(u64::MAX)
}

fn open_err(path: &Path, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> QueueError {
    QueueError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

impl Queue {
    /// Opens (or creates) the queue in directory `path`.
    ///
    /// Recovery: every `Leased` record returns to `Scheduled` (its process died), records
    /// without a message and messages without records or without a body are removed (they
    /// can only be never-acknowledged leftovers), per-message counters are re-checked, and the
    /// in-memory statistics are rebuilt. This reads every record once.
    pub fn open(path: &Path, opts: QueueOptions) -> Res<Queue> {
        std::fs::create_dir_all(path).map_err(|e| open_err(path, e))?;
        // One process at a time, for every generation: sled's own lock covers only the
        // directory it opens, and a compaction moves to a new one.
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK))
            .map_err(|e| open_err(path, e))?;
        lock_file.try_lock().map_err(|e| {
            open_err(
                path,
                format!(
                    "could not lock {}: {e} (is bulksend already running on this queue?)",
                    path.join(LOCK).display()
                ),
            )
        })?;
        let generation = current_generation(path)?;
        let dir = gen_dir(path, generation);
        remove_other_generations(path, generation).map_err(|e| open_err(path, e))?;
        remove_unfinished_snapshots(&dir).map_err(|e| open_err(path, e))?;
        let config = sled_config(&dir, &opts);
        let db = open_sled(path, &config)?;
        let seg_dir = path.join(segments::DIR);
        let seg_files = segments::list(&seg_dir).map_err(|e| open_err(path, e))?;

        let marker = path.join(MARKER);
        let mut upgrade = false;
        match db
            .get(codec::version_key())
            .map_err(|e| open_err(path, e))?
        {
            Some(v) if v.as_ref() == codec::SCHEMA_VERSION => {}
            Some(v)
                if v.as_ref() == codec::SCHEMA_VERSION_1
                    || v.as_ref() == codec::SCHEMA_VERSION_2
                    || v.as_ref() == codec::SCHEMA_VERSION_3
                    || v.as_ref() == codec::SCHEMA_VERSION_4
                    || v.as_ref() == codec::SCHEMA_VERSION_5
                    || v.as_ref() == codec::SCHEMA_VERSION_6
                    || v.as_ref() == codec::SCHEMA_VERSION_7 =>
            {
                upgrade = true
            }
            Some(v) => {
                return Err(open_err(
                    path,
                    format!(
                        "unsupported schema version {:?} (expected {:?})",
                        String::from_utf8_lossy(&v),
                        String::from_utf8_lossy(codec::SCHEMA_VERSION)
                    ),
                ))
            }
            None => {
                if marker.exists() {
                    // sled treats a log it cannot read as empty: refuse instead of starting
                    // over on top of a queue that held data.
                    return Err(QueueError::Corrupt {
                        path: dir.join("db"),
                        key: String::from_utf8_lossy(&codec::version_key()).into_owned(),
                        detail: format!(
                            "{} says this directory holds a queue, but sled found no readable \
                             data in it (unreadable or replaced db file)",
                            marker.display()
                        ),
                    });
                }
                if !db.is_empty() {
                    return Err(open_err(path, "not a bulksend queue (no schema version)"));
                }
                db.insert(codec::version_key(), codec::SCHEMA_VERSION)
                    .map_err(|e| open_err(path, e))?;
                db.flush().map_err(|e| open_err(path, e))?;
                File::open(dir.join("db"))
                    .and_then(|f| f.sync_all())
                    .and_then(|()| std::fs::write(&marker, codec::SCHEMA_VERSION))
                    .and_then(|()| File::open(&marker))
                    .and_then(|f| f.sync_all())
                    .map_err(|e| open_err(path, e))?;
            }
        }
        let idem = Mutex::new(open_idem(path, &db, upgrade)?);

        let sched = Schedule::with_memory(opts.schedule_memory_bytes);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            store: RwLock::new(Arc::new(Store {
                db,
                dir,
                generation,
            })),
            _lock: lock_file,
            dirty: Mutex::new(None),
            opts,
            counters: Mutex::new(Counters::default()),
            closed: Mutex::new(None),
            seg_dir: seg_dir.clone(),
            segs: Mutex::new(segments::State::default()),
            seg_readers: segments::Readers::default(),
            sched: Mutex::new(sched),
            idem,
            #[cfg(test)]
            fail_commits: AtomicUsize::new(0),
            #[cfg(test)]
            hold_run_writes: (Mutex::new(false), std::sync::Condvar::new()),
        });
        if upgrade {
            // Marked before `recover` removes what older versions stored (the schedule, the
            // idempotency keys): sled's log keeps the order of writes, so a crash part-way
            // cannot leave a store an older binary would open without its keys (it refuses
            // the new version). Every open removes such leftovers again; the first sync below
            // makes it all durable.
            shared
                .db()
                .insert(codec::version_key(), codec::SCHEMA_VERSION)
                .map_err(|e| open_err(path, e))?;
            tracing::info!(path = %path.display(), "queue upgraded to {}", String::from_utf8_lossy(codec::SCHEMA_VERSION));
        }
        let (last_id, seg_live, seg_ids) = recover(&shared, &seg_files)?;
        let durable = shared.opts.durable;
        let next_seg = seg_files.keys().next_back().map_or(1, |s| s + 1);
        // Segments nothing refers to are deleted by the first sync below.
        *lock(&shared.segs) = segments::State::new(seg_files, seg_live, seg_ids);

        let mut syncer = Syncer::new(&shared).map_err(|e| open_err(path, e))?;
        syncer.sync().map_err(|e| open_err(path, e))?;
        // Make the directory entries (db, conf, blobs/) themselves durable.
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| open_err(path, e))?;

        let suppressions = lock(&shared.counters).suppressions;
        let supp_filter = SuppressionFilter::build(&shared.db(), codec::P_SUPP, suppressions)
            .map_err(|e| open_err(path, e))?;
        let (req_tx, req_rx) = crossbeam_channel::bounded::<Request>(REQUEST_QUEUE);
        let (done_tx, done_rx) = syncer_line();
        let s = Arc::clone(&shared);
        let writer_thread = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || {
                Writer {
                    shared: s,
                    last_id: last_id.max(to_millis(SystemTime::now()) << 20),
                    // Purge at once: records may have aged past `final_retention`
                    // while the process was down.
                    next_purge: Instant::now(),
                    next_compact_check: Some(Instant::now() + COMPACT_CHECK_DELAY),
                    background: None,
                    run_write: None,
                    run_merge: None,
                    compacted_size: 0,
                    compacted_live: 0,
                    compact_not_before: Instant::now(),
                    appender: segments::Appender::new(&seg_dir, next_seg, durable),
                    supp_filter,
                    next_lease_check_ms: 0,
                    last_outcomes: 0,
                }
                .run(req_rx, done_tx)
            })
            .map_err(|e| open_err(path, e))?;
        let writer = writer_thread.thread().clone();
        let mut threads = vec![writer_thread];
        threads.push(
            std::thread::Builder::new()
                .name("queue-syncer".into())
                .spawn(move || syncer.run(done_rx))
                .map_err(|e| open_err(path, e))?,
        );
        Ok(Queue {
            shared,
            requests: Some(req_tx),
            writer,
            threads: Mutex::new(threads),
        })
    }

    fn call(&self, op: Op) -> Res<Reply> {
        if let Some(reason) = lock(&self.shared.closed).clone() {
            return Err(QueueError::Closed { reason });
        }
        let closed = || QueueError::Closed {
            reason: "writer thread stopped".into(),
        };
        let (tx, slot) = Slot::pair();
        self.requests
            .as_ref()
            .ok_or_else(closed)?
            .send(Request {
                op,
                reply: ReplyTo::Blocking(tx),
            })
            .map_err(|_| closed())?;
        self.writer.unpark();
        slot.wait()
    }

    /// [`Queue::call`] for async callers: no thread waits for the reply. The request is
    /// handed over without blocking; only if the writer is 4096 requests behind does a
    /// blocking thread wait for room (tokio's blocking pool, or the polling thread itself
    /// outside a tokio runtime).
    async fn call_async(&self, op: Op) -> Res<Reply> {
        if let Some(reason) = lock(&self.shared.closed).clone() {
            return Err(QueueError::Closed { reason });
        }
        let closed = || QueueError::Closed {
            reason: "writer thread stopped".into(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let requests = self.requests.as_ref().ok_or_else(closed)?;
        let may_wait = matches!(op, Op::Complete { may_wait: true, .. });
        let req = Request {
            op,
            reply: ReplyTo::Async(tx),
        };
        match requests.try_send(req) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(req)) => {
                let sent = match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let requests = requests.clone();
                        rt.spawn_blocking(move || requests.send(req).is_ok())
                            .await
                            .unwrap_or(false)
                    }
                    // Polled outside a tokio runtime: wait for room on this thread, as
                    // `call` does (the writer frees room within a group commit).
                    Err(_) => requests.send(req).is_ok(),
                };
                if !sent {
                    return Err(closed());
                }
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(closed()),
        }
        if !may_wait {
            self.writer.unpark();
        }
        rx.await.map_err(|_| closed())?
    }

    /// Stores a message; returns once it is durable (see the crate docs).
    pub fn enqueue(&self, msg: NewMessage) -> Res<Enqueued> {
        let checked = check_message(msg)?;
        only(self.call(Op::Enqueue(vec![checked]))?.into_enqueued()?)
    }

    /// Stores several messages with one durable commit (one sled batch). Invalid messages get
    /// an `Err` in their slot; the rest are stored.
    pub fn enqueue_batch(&self, msgs: Vec<NewMessage>) -> Res<Vec<Res<Enqueued>>> {
        let (out, valid) = check_batch(msgs);
        let stored = if valid.is_empty() {
            Vec::new()
        } else {
            self.call(Op::Enqueue(valid))?.into_enqueued()?
        };
        Ok(merge_batch(out, stored))
    }

    /// [`Queue::enqueue`] for async code (call it from a tokio runtime): the task awaits the
    /// durable commit without holding a thread, so an injection API serving many clients at
    /// once needs no blocking thread per request.
    pub async fn enqueue_async(&self, msg: NewMessage) -> Res<Enqueued> {
        let checked = check_message(msg)?;
        only(
            self.call_async(Op::Enqueue(vec![checked]))
                .await?
                .into_enqueued()?,
        )
    }

    /// [`Queue::enqueue_batch`] for async code; see [`Queue::enqueue_async`].
    pub async fn enqueue_batch_async(&self, msgs: Vec<NewMessage>) -> Res<Vec<Res<Enqueued>>> {
        let (out, valid) = check_batch(msgs);
        let stored = if valid.is_empty() {
            Vec::new()
        } else {
            self.call_async(Op::Enqueue(valid)).await?.into_enqueued()?
        };
        Ok(merge_batch(out, stored))
    }

    /// Leases up to `limit` recipients due at `now`, marking them `Leased`; recipients of the
    /// same message and destination are returned adjacent. Roughly oldest `next_attempt`
    /// first: the schedule finds the due recipients by zones of ~64 consecutive ids
    /// (`schedule.rs`), earliest zone first, and takes each zone's in due order.
    /// Recipients past their lifetime are skipped (left for [`Queue::expire_due`]).
    /// Leases are not fsynced: a lease that survives a crash is undone on open.
    pub fn take_due(&self, now: SystemTime, limit: usize) -> Res<Vec<Lease>> {
        self.take(None, now, limit)
    }

    /// Like [`Queue::take_due`] for one destination (lowercased domain). There is no
    /// per-destination index (it cost two sled writes per schedule change and the engine does
    /// not need it): this reads every due zone of the schedule, so its cost grows with
    /// every destination's due backlog. Meant for tools and tests, not the delivery path.
    pub fn take_due_for(
        &self,
        destination: &str,
        now: SystemTime,
        limit: usize,
    ) -> Res<Vec<Lease>> {
        self.take(Some(destination.to_lowercase()), now, limit)
    }

    fn take(&self, destination: Option<String>, now: SystemTime, limit: usize) -> Res<Vec<Lease>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        match self.call(Op::Take {
            destination,
            now_ms: to_millis(now),
            limit,
        })? {
            Reply::Leases(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    /// Restarts the lease timeout (`QueueOptions::lease_timeout`) of these leased recipients,
    /// for a holder that keeps them longer than the timeout on purpose (the engine's ready
    /// queue of a slow destination). Returns how many were leased. In memory only, like the
    /// leases: nothing is written.
    pub fn renew_leases(&self, ids: &[RecipientId], now: SystemTime) -> usize {
        let now_ms = to_millis(now);
        let mut sched = lock(&self.shared.sched);
        ids.iter().filter(|id| sched.renew(**id, now_ms)).count()
    }

    /// `QueueOptions::lease_timeout`: how long a lease lasts without being renewed.
    pub fn lease_timeout(&self) -> Option<Duration> {
        self.shared.opts.lease_timeout
    }

    /// The message body, or `None` once every recipient is final (or the message is unknown).
    pub fn body(&self, id: MessageId) -> Res<Option<Vec<u8>>> {
        let mk = codec::meta_key(id);
        let mut last: Option<segments::SegRef> = None;
        loop {
            let db = self.shared.db();
            let Some(v) = db_meta(&self.shared.path, &db, id)? else {
                return Ok(None);
            };
            let meta = codec::decode_meta(&v).map_err(|d| self.corrupt(&mk, d))?;
            if meta.pending == 0 {
                return Ok(None);
            }
            match meta.body {
                Body::Inline(body) => return Ok(Some(body)),
                Body::Segment(r) => {
                    match self
                        .shared
                        .seg_readers
                        .read(&self.shared.seg_dir, r, meta.size)
                    {
                        Ok(body) => return Ok(Some(body)),
                        // Relocated (and its old segment deleted) between reading the metadata
                        // and the file: read the metadata again. A reference that fails twice
                        // is damage, or an I/O error that may pass (EMFILE, EIO).
                        Err(_) if last != Some(r) => last = Some(r),
                        Err(segments::ReadError::Damaged(d)) => return Err(self.corrupt(&mk, d)),
                        Err(segments::ReadError::Io(e)) => return Err(QueueError::Io(e)),
                    }
                }
                Body::Chunks => return self.chunked_body(&db, id),
            }
        }
    }

    /// A body stored in 4 KiB `b` chunks (stores written before segment files).
    fn chunked_body(&self, db: &sled::Db, id: MessageId) -> Res<Option<Vec<u8>>> {
        let mut body = Vec::new();
        let mut found = false;
        for item in db.scan_prefix(codec::body_prefix(id)) {
            let (_, v) = item?;
            body.extend_from_slice(&v);
            found = true;
        }
        Ok(found.then_some(body))
    }

    /// Records the outcome of a leased recipient; durable on return. Deletes the body when
    /// this was the message's last non-final recipient.
    pub fn complete(&self, id: RecipientId, outcome: Outcome) -> Res<Completed> {
        self.complete_batch(vec![(id, outcome)])?
            .pop()
            .unwrap_or_else(|| Err(unexpected()))
    }

    /// Several outcomes with one durable commit.
    pub fn complete_batch(&self, items: Vec<(RecipientId, Outcome)>) -> Res<Vec<Res<Completed>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        match self.call(Op::Complete {
            items,
            now_ms: to_millis(SystemTime::now()),
            may_wait: false,
        })? {
            Reply::Completed(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    /// [`Queue::complete_batch`] for async code (call it from a tokio runtime): the task
    /// awaits the durable commit without holding a thread. What it saves per call is a
    /// blocking-pool thread's wake-up, spin and park (BENCHMARKS.md, "Fourth session").
    /// The commit may wait up to [`QueueOptions::outcome_commit_delay`] for more outcomes to
    /// share it.
    pub async fn complete_batch_async(
        &self,
        items: Vec<(RecipientId, Outcome)>,
    ) -> Res<Vec<Res<Completed>>> {
        self.complete_async(items, true).await
    }

    /// [`Queue::complete_batch_async`] for an outcome its caller is about to wait for: it
    /// commits its group at once (and with it any outcomes held there).
    pub async fn complete_batch_async_urgent(
        &self,
        items: Vec<(RecipientId, Outcome)>,
    ) -> Res<Vec<Res<Completed>>> {
        self.complete_async(items, false).await
    }

    async fn complete_async(
        &self,
        items: Vec<(RecipientId, Outcome)>,
        may_wait: bool,
    ) -> Res<Vec<Res<Completed>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        match self
            .call_async(Op::Complete {
                items,
                now_ms: to_millis(SystemTime::now()),
                may_wait,
            })
            .await?
        {
            Reply::Completed(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    /// Moves scheduled recipients whose `created + max_queue_lifetime <= now` to `Expired`
    /// (reply: their last transient reply, or "expired in queue") and returns them, so the
    /// caller can emit events. Call it periodically. Only the schedule's zones whose bound is
    /// due and old enough are read: a deferral never schedules past the lifetime, so an
    /// expired recipient is always due.
    pub fn expire_due(&self, now: SystemTime) -> Res<Vec<RecipientRecord>> {
        match self.call(Op::Expire(to_millis(now)))? {
            Reply::Records(v) => Ok(v),
            _ => Err(unexpected()),
        }
    }

    /// A message and all its (not yet purged) recipient records.
    pub fn message(&self, id: MessageId) -> Res<Option<MessageInfo>> {
        let db = self.shared.db();
        let mk = codec::meta_key(id);
        let Some(v) = db_meta(&self.shared.path, &db, id)? else {
            return Ok(None);
        };
        let meta = codec::decode_meta(&v).map_err(|d| self.corrupt(&mk, d))?;
        let mut recipients = Vec::new();
        if let Some(rec) = codec::inline_record(id, &meta).map_err(|d| self.corrupt(&mk, d))? {
            recipients.push(self.shared.with_lease(rec));
        }
        for item in db.scan_prefix(codec::rcpt_prefix(id)) {
            let (k, v) = item?;
            recipients.push(self.shared.with_lease(self.decode_record_kv(&k, &v)?));
        }
        Ok(Some(MessageInfo {
            id,
            sender: meta.sender,
            created: from_millis(meta.created_ms),
            size: meta.size,
            idempotency_key: meta.idempotency_key,
            recipients,
        }))
    }

    /// Up to `limit` records (in message order), optionally only those in `state`. This is a
    /// filtered scan over all records: meant for operators, not the delivery path.
    pub fn list(&self, state: Option<RecipientState>, limit: usize) -> Res<Vec<RecipientRecord>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let db = self.shared.db();
        let mut keep = |rec: RecipientRecord| {
            let rec = self.shared.with_lease(rec);
            if state.is_none_or(|s| s == rec.state) {
                out.push(rec);
            }
            out.len() >= limit
        };
        for item in scan_metas(&self.shared.path, &db, MessageId(0), None) {
            let (id, mv) = item?;
            let mk = codec::meta_key(id);
            let meta = codec::decode_meta(&mv).map_err(|d| self.corrupt(&mk, d))?;
            if let Some(rec) = codec::inline_record(id, &meta).map_err(|d| self.corrupt(&mk, d))? {
                if keep(rec) {
                    break;
                }
            }
            for item in db.scan_prefix(codec::rcpt_prefix(id)) {
                let (k, v) = item?;
                if keep(self.decode_record_kv(&k, &v)?) {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Makes every scheduled recipient of the message due now; returns how many.
    pub fn retry(&self, id: MessageId) -> Res<usize> {
        match self.call(Op::Retry(id, to_millis(SystemTime::now())))? {
            Reply::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    /// Removes a message, its body, records and idempotency key. A lease
    /// still held on one of its recipients then fails to complete with `NotFound`.
    pub fn delete(&self, id: MessageId) -> Res<bool> {
        match self.call(Op::Delete(id))? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    /// Drops records that became final before `older_than`; a message's metadata and
    /// idempotency key go with its last record. Returns the number of records dropped.
    /// The writer also does this on its own every minute for records older than
    /// `final_retention`.
    pub fn purge_final(&self, older_than: SystemTime) -> Res<usize> {
        match self.call(Op::Purge(to_millis(older_than)))? {
            Reply::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    /// Counters kept in memory, like `oldest_due` (the earliest bound of the in-memory
    /// schedule's zones: it can be earlier than the true oldest due time until that zone is
    /// next read, never later);
    /// `disk_bytes` is a stat of sled's and the segments' files.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        {
            let c = lock(&self.shared.counters);
            for st in RecipientState::ALL {
                let n = c.by_state[usize::from(st.to_u8())];
                if n > 0 {
                    stats.by_state.insert(st, n);
                }
            }
            stats.by_destination = c
                .by_destination
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
        }
        stats.oldest_due = lock(&self.shared.sched).oldest_due().map(from_millis);
        let db = self.shared.db();
        stats.disk_bytes = db
            .size_on_disk()
            .unwrap_or(0)
            .saturating_add(lock(&self.shared.segs).disk_bytes());
        stats
    }

    /// Adds an address (lowercased) to the suppression list; durable on return. `false` if it
    /// was already there (the first reason is kept).
    pub fn suppress_add(&self, address: &str, reason: &str) -> Res<bool> {
        let a = normalize_suppressed(address)?;
        match self.call(Op::SuppressAdd(
            a,
            reason.to_string(),
            to_millis(SystemTime::now()),
        ))? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    pub fn suppress_remove(&self, address: &str) -> Res<bool> {
        match self.call(Op::SuppressRemove(address.to_lowercase()))? {
            Reply::Bool(b) => Ok(b),
            _ => Err(unexpected()),
        }
    }

    pub fn suppressed(&self, address: &str) -> Res<Option<Suppression>> {
        let a = address.to_lowercase();
        let k = codec::supp_key(&a);
        match self.shared.db().get(&k)? {
            None => Ok(None),
            Some(v) => {
                let (at, reason) =
                    codec::decode_suppression(&v).map_err(|d| self.corrupt(&k, d))?;
                Ok(Some(Suppression {
                    address: a,
                    reason,
                    at: from_millis(at),
                }))
            }
        }
    }

    pub fn suppress_list(&self) -> Res<Vec<Suppression>> {
        let mut out = Vec::new();
        for item in self.shared.db().scan_prefix([codec::P_SUPP]) {
            let (k, v) = item?;
            let (at, reason) = codec::decode_suppression(&v).map_err(|d| self.corrupt(&k, d))?;
            out.push(Suppression {
                address: String::from_utf8_lossy(&k[1..]).into_owned(),
                reason,
                at: from_millis(at),
            });
        }
        Ok(out)
    }

    /// Waits until everything submitted so far is durable, the run of the idempotency index
    /// being written (if one is) is in use, and the runs are merged as far as they will be
    /// (the writer waits for that meanwhile). The commit of the flush's own group may start
    /// the next run write, if the memory part is over its budget: a second flush waits for
    /// that one.
    pub fn flush(&self) -> Res<()> {
        match self.call(Op::Flush)? {
            Reply::Unit => Ok(()),
            _ => Err(unexpected()),
        }
    }

    /// Rewrites the store into a fresh sled directory holding only live data, giving the
    /// space of delivered and purged messages back to the file system (sled never shrinks its
    /// files). The queue also does this on its own, in the background, when the files are
    /// much bigger than the live data (see [`QueueOptions::auto_compact`]); this call compacts
    /// whatever the size, holding up every other write while it copies.
    pub fn compact(&self) -> Res<Compaction> {
        match self.call(Op::Compact)? {
            Reply::Compacted(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    /// The directory this queue lives in.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn corrupt(&self, key: &[u8], detail: String) -> QueueError {
        corrupt(&self.shared.path, key, detail)
    }

    fn decode_record_kv(&self, k: &[u8], v: &[u8]) -> Res<RecipientRecord> {
        decode_record_kv(&self.shared.path, k, v)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        drop(self.requests.take());
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        if let Err(e) = self.shared.db().flush() {
            tracing::error!(path = %self.shared.path.display(), "final queue flush failed: {e}");
        }
    }
}

/// The writer's end of the line to the syncer. It counts the groups handed over and not yet
/// answered, so that the writer can tell whether a sync is under way (see `Writer::run`).
struct ToSyncer {
    groups: Sender<Vec<Done>>,
    backlog: Arc<AtomicUsize>,
    /// Gets a token each time the syncer has answered everything it was handed.
    idle: Receiver<()>,
}

/// The syncer's end of the same line.
struct FromWriter {
    groups: Receiver<Vec<Done>>,
    backlog: Arc<AtomicUsize>,
    idle: Sender<()>,
}

fn syncer_line() -> (ToSyncer, FromWriter) {
    let (groups_tx, groups_rx) = crossbeam_channel::unbounded();
    let (idle_tx, idle_rx) = crossbeam_channel::bounded(1);
    let backlog = Arc::new(AtomicUsize::new(0));
    (
        ToSyncer {
            groups: groups_tx,
            backlog: Arc::clone(&backlog),
            idle: idle_rx,
        },
        FromWriter {
            groups: groups_rx,
            backlog,
            idle: idle_tx,
        },
    )
}

impl ToSyncer {
    /// Whether the syncer has groups it has not answered yet (is syncing, or about to).
    fn busy(&self) -> bool {
        self.backlog.load(Ordering::Acquire) > 0
    }
}

impl FromWriter {
    /// `n` groups were answered.
    fn answered(&self, n: usize) {
        if self.backlog.fetch_sub(n, Ordering::AcqRel) == n {
            // Full means a token is already waiting.
            let _ = self.idle.try_send(());
        }
    }
}

/// Hands replies to the syncer, all in one message (one wake-up per group, not per request).
fn forward_all(done: &ToSyncer, group: Vec<Done>) {
    if group.is_empty() {
        return;
    }
    done.backlog.fetch_add(1, Ordering::AcqRel);
    if let Err(e) = done.groups.send(group) {
        done.backlog.fetch_sub(1, Ordering::AcqRel);
        // The syncer is gone; answer directly.
        for d in e.0 {
            d.reply.send(Err(QueueError::Closed {
                reason: "syncer thread stopped".into(),
            }));
        }
    }
}

fn forward(done: &ToSyncer, d: Done) {
    forward_all(done, vec![d]);
}

/// Commits a group's `Tx` and passes its replies on to the syncer.
fn commit_group(tx: Tx<'_>, mut group: Vec<Done>, done: &ToSyncer) {
    let res = tx.commit();
    for d in &mut group {
        if let (Err(e), Ok(_)) = (&res, &d.result) {
            d.result = Err(match e {
                QueueError::Sled(e) => QueueError::Sled(e.clone()),
                QueueError::Corrupt { path, key, detail } => QueueError::Corrupt {
                    path: path.clone(),
                    key: key.clone(),
                    detail: detail.clone(),
                },
                e => QueueError::Closed {
                    reason: e.to_string(),
                },
            });
            d.durable = false;
        }
    }
    forward_all(done, group);
}

fn unexpected() -> QueueError {
    QueueError::Closed {
        reason: "internal error: unexpected reply from the writer".into(),
    }
}

/// The id below which every message is gone: the first of the first metadata pack
/// (`u64::MAX` when there is none).
fn oldest_message(db: &sled::Db) -> Res<u64> {
    Ok(match db.scan_prefix([codec::P_PACK]).next().transpose()? {
        Some((k, _)) => codec::pack_first(&k).map_or(0, |m| m.0),
        None => u64::MAX,
    })
}

fn run_error(e: RunError) -> QueueError {
    QueueError::Corrupt {
        path: e.path,
        key: e.at,
        detail: e.detail,
    }
}

fn corrupt(path: &Path, key: &[u8], detail: String) -> QueueError {
    QueueError::Corrupt {
        path: path.to_path_buf(),
        key: codec::show_key(key),
        detail,
    }
}

fn decode_record_kv(path: &Path, k: &[u8], v: &[u8]) -> Res<RecipientRecord> {
    let id =
        codec::rid_from(&k[1..]).ok_or_else(|| corrupt(path, k, "bad recipient key".into()))?;
    codec::decode_record(id, v).map_err(|d| corrupt(path, k, d))
}

/// The first message of `id`'s pack.
fn pack_start(id: MessageId) -> MessageId {
    MessageId(id.0 - id.0 % codec::PACK)
}

/// The messages of the pack stored under `k`, or a corrupt-data error naming it.
fn read_pack(path: &Path, k: &[u8], v: &IVec) -> Res<Vec<(MessageId, IVec)>> {
    let first = codec::pack_first(k).ok_or_else(|| corrupt(path, k, "bad pack key".into()))?;
    codec::decode_pack(first, v).map_err(|d| corrupt(path, k, d))
}

/// Message `id`'s metadata as sled holds it (not a group's writes), from its pack.
fn db_meta(path: &Path, db: &sled::Db, id: MessageId) -> Res<Option<IVec>> {
    let k = codec::pack_key(id);
    let Some(v) = db.get(k)? else {
        return Ok(None);
    };
    let first = codec::pack_first(&k).ok_or_else(|| corrupt(path, &k, "bad pack key".into()))?;
    // Every entry is checked, as `read_pack` does, without collecting them.
    let mut found = None;
    for entry in codec::pack_entries(first, &v) {
        let (m, meta) = entry.map_err(|d| corrupt(path, &k, d))?;
        if m == id {
            found = Some(meta);
        }
    }
    Ok(found)
}

/// The metadata of messages `lo` up to `hi` (inclusive; `None`: all) as sled holds it, in
/// id order, read pack by pack.
fn scan_metas<'p>(
    path: &'p Path,
    db: &sled::Db,
    lo: MessageId,
    hi: Option<MessageId>,
) -> MetaScan<'p> {
    let hi = hi.map_or(u64::MAX, |h| h.0);
    MetaScan {
        path,
        packs: db.range(codec::pack_key(lo)..=codec::pack_key(MessageId(hi))),
        lo: lo.0,
        hi,
        buf: Vec::new().into_iter(),
    }
}

struct MetaScan<'p> {
    path: &'p Path,
    packs: sled::Iter,
    lo: u64,
    hi: u64,
    buf: std::vec::IntoIter<(MessageId, IVec)>,
}

impl Iterator for MetaScan<'_> {
    type Item = Res<(MessageId, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((id, v)) = self.buf.next() {
                if id.0 < self.lo {
                    continue;
                }
                if id.0 > self.hi {
                    return None;
                }
                return Some(Ok((id, v)));
            }
            let (k, v) = match self.packs.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            match read_pack(self.path, &k, &v) {
                Ok(entries) => self.buf = entries.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Rewrites the packs that `changes` touch (message → its new metadata, `None`: removed; in
/// id order) over what sled holds, handing each to `write` (`None`: the pack is now empty).
fn repack<'a>(
    path: &Path,
    db: &sled::Db,
    changes: impl IntoIterator<Item = (MessageId, Option<&'a [u8]>)>,
    mut write: impl FnMut(IVec, Option<IVec>),
) -> Res<()> {
    let mut changes = changes.into_iter().peekable();
    while let Some(&(id, _)) = changes.peek() {
        let k = codec::pack_key(id);
        let mut metas: BTreeMap<MessageId, IVec> = match db.get(k)? {
            Some(v) => read_pack(path, &k, &v)?.into_iter().collect(),
            None => BTreeMap::new(),
        };
        while let Some((m, v)) = changes.next_if(|(m, _)| pack_start(*m) == pack_start(id)) {
            match v {
                Some(v) => metas.insert(m, IVec::from(v)),
                None => metas.remove(&m),
            };
        }
        let value = (!metas.is_empty())
            .then(|| IVec::from(codec::encode_pack(metas.iter().map(|(m, v)| (*m, &v[..])))));
        write(IVec::from(&k[..]), value);
    }
    Ok(())
}

/// Pending writes of one request: a sled `Batch` (applied atomically, also across a crash)
/// plus an overlay so later reads in the same request see earlier writes.
struct Tx<'a> {
    shared: &'a Shared,
    /// The store generation this group reads and writes.
    db: sled::Db,
    /// Writes in order; turned into one sled `Batch` (last write per key wins) at commit.
    ops: Vec<(IVec, Option<IVec>)>,
    overlay: HashMap<IVec, Option<IVec>>,
    /// Previous overlay values, for rolling back a failed request.
    undo: Vec<(IVec, Option<Option<IVec>>)>,
    changes: Vec<Change>,
    /// Change of `Counters::body_bytes` and `Counters::suppressions` once committed.
    body_delta: i64,
    supp_delta: i64,
    /// Body segment reference changes (segment, ±1), applied once committed.
    seg_delta: Vec<segments::Delta>,
    /// Schedule and lease changes. Unlike sled writes they are applied to `Shared::sched`
    /// at once (so later requests of the group see them); this log undoes a failed request,
    /// and the whole group when its sled batch fails (then none of it reached sled).
    sched_undo: Vec<schedule::Undo>,
    /// Records that became final in this group, with the time they did. They go into the
    /// final index at commit, one key per distinct time holding up to 64 of them (see
    /// `codec::final_entry`): one sled write per group instead of one per record, which was
    /// ~10 % of the CPU per message of the 2 KB SMTP drain (BENCHMARKS.md, SMTP, "Ninth
    /// session"). Never read back within the group.
    finals: Vec<(u64, RecipientId)>,
    /// Idempotency index changes in memory (key hash, message, inserted or removed).
    /// Applied to `Shared::idem` at once, like the schedule's, and undone the same way.
    idem_undo: Vec<(u64, MessageId, bool)>,
    /// Message ids whose metadata this group wrote (or removed): where a range read of
    /// metadata (`scheduled_in`) must look at the overlay.
    meta_ids: BTreeSet<u64>,
}

/// A `Tx` dropped without `commit` (a request or purge chunk that failed part-way, or bodies
/// that could not be written) reached sled with none of its writes: its in-memory schedule
/// and idempotency index changes are undone too.
impl Drop for Tx<'_> {
    fn drop(&mut self) {
        self.undo_idem(0);
        self.undo_sched(0);
    }
}

/// Where a request started inside the group's `Tx`.
struct Savepoint {
    ops: usize,
    undo: usize,
    changes: usize,
    body_delta: i64,
    supp_delta: i64,
    seg_delta: usize,
    sched_undo: usize,
    finals: usize,
    idem_undo: usize,
}

fn apply_delta(n: &mut u64, delta: i64) {
    *n = n.saturating_add_signed(delta);
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<'a> Tx<'a> {
    fn new(shared: &'a Shared) -> Self {
        Tx {
            shared,
            db: shared.db(),
            ops: Vec::new(),
            overlay: HashMap::new(),
            undo: Vec::new(),
            changes: Vec::new(),
            body_delta: 0,
            supp_delta: 0,
            seg_delta: Vec::new(),
            sched_undo: Vec::new(),
            finals: Vec::new(),
            idem_undo: Vec::new(),
            meta_ids: BTreeSet::new(),
        }
    }

    fn savepoint(&self) -> Savepoint {
        Savepoint {
            ops: self.ops.len(),
            undo: self.undo.len(),
            changes: self.changes.len(),
            body_delta: self.body_delta,
            supp_delta: self.supp_delta,
            seg_delta: self.seg_delta.len(),
            sched_undo: self.sched_undo.len(),
            finals: self.finals.len(),
            idem_undo: self.idem_undo.len(),
        }
    }

    /// Forgets every write made since `sp` (a request that failed half-way).
    fn rollback(&mut self, sp: Savepoint) {
        self.ops.truncate(sp.ops);
        self.changes.truncate(sp.changes);
        self.body_delta = sp.body_delta;
        self.supp_delta = sp.supp_delta;
        self.seg_delta.truncate(sp.seg_delta);
        self.finals.truncate(sp.finals);
        self.undo_idem(sp.idem_undo);
        self.undo_sched(sp.sched_undo);
        while self.undo.len() > sp.undo {
            if let Some((k, prev)) = self.undo.pop() {
                match prev {
                    Some(v) => self.overlay.insert(k, v),
                    None => self.overlay.remove(&k),
                };
            }
        }
    }

    /// Undoes the schedule and lease changes after the first `keep`.
    fn undo_sched(&mut self, keep: usize) {
        if self.sched_undo.len() > keep {
            lock(&self.shared.sched).undo_all(self.sched_undo.drain(keep..));
        }
    }

    /// Undoes the idempotency index changes in memory after the first `keep`.
    fn undo_idem(&mut self, keep: usize) {
        if self.idem_undo.len() > keep {
            let mut idem = lock(&self.shared.idem);
            for (h, id, inserted) in self.idem_undo.drain(keep..).rev() {
                if inserted {
                    idem.remove(h, id);
                } else {
                    idem.insert(h, id);
                }
            }
        }
    }

    /// The stored message that has idempotency key `key`, as this group sees it: a candidate
    /// from memory or from the runs whose metadata holds that key.
    fn idem_lookup(&self, key: &str) -> Res<Option<MessageId>> {
        let candidates = {
            let idem = lock(&self.shared.idem);
            let h = idem.hash(key);
            let mut c = idem.candidates(h);
            c.extend(idem.stored_candidates(h).map_err(run_error)?);
            c
        };
        for id in candidates {
            if self
                .meta(id)?
                .is_some_and(|m| m.idempotency_key.as_deref() == Some(key))
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Adds a new message's key to the idempotency index (in memory).
    fn idem_insert(&mut self, key: &str, id: MessageId) {
        let mut idem = lock(&self.shared.idem);
        let h = idem.hash(key);
        idem.insert(h, id);
        self.idem_undo.push((h, id, true));
    }

    /// Removes a message's key from the idempotency index's memory part. A key already in
    /// the runs (or in a frozen memory part being written as one) stays there, pointing at
    /// nothing, until a merge of runs drops it (see `idem`).
    fn idem_remove(&mut self, key: &str, id: MessageId) {
        let mut idem = lock(&self.shared.idem);
        let h = idem.hash(key);
        if id.0 > idem.memory_floor() {
            idem.remove(h, id);
            self.idem_undo.push((h, id, false));
        }
    }

    fn get(&self, key: &[u8]) -> Res<Option<IVec>> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None if key.first() == Some(&codec::P_META) => match codec::meta_id(key) {
                Some(id) => db_meta(&self.shared.path, &self.db, id),
                None => Ok(None),
            },
            None => Ok(self.db.get(key)?),
        }
    }

    fn set(&mut self, key: &[u8], value: Option<IVec>) {
        if key.first() == Some(&codec::P_META) {
            if let Some(id) = codec::meta_id(key) {
                // Kept on a rollback: the overlay then says whether there is a write.
                self.meta_ids.insert(id.0);
            }
        }
        let k = IVec::from(key);
        self.ops.push((k.clone(), value.clone()));
        let prev = self.overlay.insert(k.clone(), value);
        self.undo.push((k, prev));
    }

    fn insert(&mut self, key: &[u8], value: IVec) {
        self.set(key, Some(value));
    }

    fn insert_blind(&mut self, key: &[u8], value: &[u8]) {
        self.set(key, Some(IVec::from(value)));
    }

    fn remove(&mut self, key: &[u8]) {
        self.set(key, None);
    }

    fn corrupt(&self, key: &[u8], detail: String) -> QueueError {
        corrupt(&self.shared.path, key, detail)
    }

    fn meta(&self, id: MessageId) -> Res<Option<Meta>> {
        let k = codec::meta_key(id);
        match self.get(&k)? {
            None => Ok(None),
            Some(v) => codec::decode_meta(&v)
                .map(Some)
                .map_err(|d| self.corrupt(&k, d)),
        }
    }

    fn put_meta(&mut self, id: MessageId, m: &Meta) {
        self.insert(&codec::meta_key(id), codec::encode_meta(m).into());
    }

    /// The message's metadata if it holds the record of recipient `id` (see `Meta::record`).
    fn meta_with_record(&self, id: RecipientId) -> Res<Option<Meta>> {
        if id.index != 0 {
            return Ok(None);
        }
        Ok(self.meta(id.message)?.filter(|m| m.record.is_some()))
    }

    /// A recipient's record: in its message's metadata for a message of one recipient, under
    /// its own `r` key otherwise.
    fn record(&self, id: RecipientId) -> Res<Option<RecipientRecord>> {
        Ok(self.record_and_meta(id)?.map(|(r, _)| r))
    }

    /// `record`, with the metadata it was read from when it lives in it (to hand to
    /// `store_record`, which then neither reads nor decodes it again).
    fn record_and_meta(&self, id: RecipientId) -> Res<Option<(RecipientRecord, Option<Meta>)>> {
        if let Some(meta) = self.meta_with_record(id)? {
            return match codec::inline_record(id.message, &meta) {
                Ok(r) => Ok(r.map(|r| (self.shared.with_lease(r), Some(meta)))),
                Err(d) => Err(self.corrupt(&codec::meta_key(id.message), d)),
            };
        }
        let k = codec::rcpt_key(id);
        match self.get(&k)? {
            None => Ok(None),
            Some(v) => codec::decode_record(id, &v)
                .map(|r| Some((self.shared.with_lease(r), None)))
                .map_err(|d| self.corrupt(&k, d)),
        }
    }

    fn put_record(&mut self, old: Option<RecipientState>, rec: &RecipientRecord) -> Res<()> {
        self.store_record(old, rec, false, None)
    }

    /// Writes a changed record (and counts it going from `old` to its state), in its
    /// message's metadata or under its own key. When it `became_final`, also the
    /// bookkeeping of that: the final index, the message's pending count, and its body once
    /// nothing is pending. `meta` is the message's metadata if the caller has it (as read
    /// by `record_and_meta`): a one-recipient message's outcome then reads and decodes its
    /// metadata once and encodes it once, where it took three decodes and two encodes.
    fn store_record(
        &mut self,
        old: Option<RecipientState>,
        rec: &RecipientRecord,
        became_final: bool,
        meta: Option<Meta>,
    ) -> Res<()> {
        let mid = rec.id.message;
        let mut meta = match meta {
            Some(m) => Some(m),
            None if became_final || rec.id.index == 0 => self.meta(mid)?,
            None => None,
        };
        if became_final {
            self.finals.push((to_millis(rec.updated), rec.id));
            let Some(m) = meta.as_mut() else {
                return Err(self.corrupt(&codec::meta_key(mid), "missing message metadata".into()));
            };
            m.pending = m.pending.saturating_sub(1);
            if m.pending == 0 {
                self.remove_body(mid, m);
                m.body = Body::Chunks;
            }
        }
        let inline = match meta.as_mut() {
            Some(m) if rec.id.index == 0 && m.record.is_some() => {
                m.record = Some(codec::encode_record(rec));
                true
            }
            _ => false,
        };
        if !inline {
            self.insert(&codec::rcpt_key(rec.id), codec::encode_record(rec).into());
        }
        if let Some(m) = meta.filter(|_| inline || became_final) {
            self.put_meta(mid, &m);
        }
        self.count(old, Some(rec.state), &rec.destination);
        Ok(())
    }

    fn remove_record(&mut self, rec: &RecipientRecord) -> Res<()> {
        match self.meta_with_record(rec.id)? {
            Some(mut meta) => {
                meta.record = None;
                self.put_meta(rec.id.message, &meta);
            }
            None => self.remove(&codec::rcpt_key(rec.id)),
        }
        self.count(Some(rec.state), None, &rec.destination);
        Ok(())
    }

    /// Counts a recipient going from state `old` to `new` (`None`: not stored) when the group
    /// commits.
    fn count(
        &mut self,
        old: Option<RecipientState>,
        new: Option<RecipientState>,
        destination: &str,
    ) {
        self.changes.push(Change {
            old,
            new,
            destination: destination.to_string(),
        });
    }

    /// Notes a recipient (newly) scheduled at its `next_attempt`. There is no opposite: a
    /// recipient that leaves the schedule leaves its zone's bound as it is, a lower bound
    /// still (see `schedule.rs`).
    fn schedule(&mut self, rec: &RecipientRecord) {
        lock(&self.shared.sched).add(
            to_millis(rec.next_attempt),
            rec.id,
            to_millis(rec.created),
            &mut self.sched_undo,
        );
    }

    /// The zone starting at `start` was read whole; `bound` is what it holds now.
    fn settle(&mut self, start: RecipientId, bound: Option<schedule::Bound>) {
        lock(&self.shared.sched).settle(start, bound, &mut self.sched_undo);
    }

    /// The scheduled, unleased recipients from `start` up to `end` (exclusive; `None`: all
    /// after `start`), as this group sees them, with their message's sender: a range scan
    /// of the metadata in sled, with this group's writes over it.
    fn scheduled_in(
        &self,
        start: RecipientId,
        end: Option<RecipientId>,
    ) -> Res<Vec<(RecipientRecord, String)>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (last, id_end) = match end {
            Some(e) if e.index > 0 => (Some(e.message), Included(e.message.0)),
            Some(e) if e.message.0 == 0 => return Ok(Vec::new()),
            Some(e) => (Some(MessageId(e.message.0 - 1)), Excluded(e.message.0)),
            None => (None, Unbounded),
        };
        let mut metas: BTreeMap<u64, Option<IVec>> = BTreeMap::new();
        for item in scan_metas(&self.shared.path, &self.db, start.message, last) {
            let (id, v) = item?;
            metas.insert(id.0, Some(v));
        }
        for &id in self.meta_ids.range((Included(start.message.0), id_end)) {
            if let Some(v) = self.overlay.get(&codec::meta_key(MessageId(id))[..]) {
                metas.insert(id, v.clone());
            }
        }
        let mut out = Vec::new();
        for (id, v) in metas {
            let Some(v) = v else { continue };
            let id = MessageId(id);
            let k = codec::meta_key(id);
            let meta = codec::decode_meta(&v).map_err(|d| self.corrupt(&k, d))?;
            if meta.pending == 0 {
                continue;
            }
            let from = if id == start.message { start.index } else { 0 };
            let to = match end {
                Some(e) if e.message == id => e.index.min(meta.recipients),
                _ => meta.recipients,
            };
            for index in from..to {
                let rid = RecipientId { message: id, index };
                let rec = if index == 0 && meta.record.is_some() {
                    codec::inline_record(id, &meta)
                        .map_err(|d| self.corrupt(&k, d))?
                        .map(|r| self.shared.with_lease(r))
                } else {
                    self.record(rid)?
                };
                if let Some(rec) = rec.filter(|r| r.state == RecipientState::Scheduled) {
                    out.push((rec, meta.sender.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Leases a scheduled recipient: in memory only, nothing is written to sled.
    fn lease(&mut self, rec: &RecipientRecord, now_ms: u64) {
        let mut sched = lock(&self.shared.sched);
        self.sched_undo.extend(sched.lease(rec.id, now_ms));
        drop(sched);
        self.count(
            Some(RecipientState::Scheduled),
            Some(RecipientState::Leased),
            &rec.destination,
        );
    }

    fn unlease(&mut self, id: RecipientId) {
        lock(&self.shared.sched).unlease(id, &mut self.sched_undo);
    }

    /// The message's body is no longer needed (call only while it is stored, i.e. some
    /// recipient was pending): removes its `b` chunks, or drops its segment reference, and
    /// counts it gone.
    fn remove_body(&mut self, id: MessageId, meta: &Meta) {
        match &meta.body {
            Body::Inline(_) => self.body_delta -= signed(meta.size),
            Body::Chunks => {
                self.body_delta -= signed(meta.size);
                for c in 0..codec::body_chunks(meta.size) {
                    self.remove(&codec::body_key(id, c));
                }
            }
            Body::Segment(r) => self.seg_delta.push((r.seg, -1, -signed(meta.size))),
        }
    }

    /// Applies everything as one sled batch: atomic, also across a crash.
    fn commit(mut self) -> Res<()> {
        if !self.meta_ids.is_empty() {
            // The metadata writes name messages (`m` keys); sled gets the packs they change.
            self.ops.retain(|(k, _)| k.first() != Some(&codec::P_META));
            let overlay = &self.overlay;
            let changes = self.meta_ids.iter().filter_map(|&id| {
                let v = overlay.get(&codec::meta_key(MessageId(id))[..])?;
                Some((MessageId(id), v.as_deref()))
            });
            let mut packs = Vec::new();
            repack(&self.shared.path, &self.db, changes, |k, v| {
                packs.push((k, v))
            })?;
            self.ops.extend(packs);
        }
        if !self.finals.is_empty() {
            // Stable: a key's records keep the order they became final in.
            self.finals.sort_by_key(|&(at, _)| at);
            for same in self.finals.chunk_by(|a, b| a.0 == b.0) {
                for part in same.chunks(FINAL_ENTRY_MAX) {
                    let (key, value) =
                        codec::final_entry(part[0].0, part.iter().map(|&(_, id)| id));
                    self.ops
                        .push((IVec::from(&key[..]), Some(IVec::from(value))));
                }
            }
        }
        if !self.ops.is_empty() {
            let mut batch = sled::Batch::default();
            {
                let mut dirty = lock(&self.shared.dirty);
                for (k, v) in std::mem::take(&mut self.ops) {
                    if let Some(d) = dirty.as_mut() {
                        d.insert(k.clone());
                    }
                    match v {
                        Some(v) => batch.insert(k, v),
                        None => batch.remove(k),
                    }
                }
            }
            #[cfg(test)]
            if self
                .shared
                .fail_commits
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(sled::Error::Io(std::io::Error::other("injected failure")).into());
            }
            // On an error none of it reached sled: `drop` undoes the in-memory changes.
            self.db.apply_batch(batch)?;
        }
        if !self.seg_delta.is_empty() {
            lock(&self.shared.segs).apply(&self.seg_delta);
        }
        let mut c = lock(&self.shared.counters);
        apply_delta(&mut c.body_bytes, self.body_delta);
        apply_delta(&mut c.suppressions, self.supp_delta);
        for ch in &self.changes {
            if let Some(s) = ch.old {
                c.sub(s, &ch.destination);
            }
            if let Some(s) = ch.new {
                c.add(s, &ch.destination);
            }
        }
        // Committed: nothing for `drop` to undo.
        self.sched_undo.clear();
        self.idem_undo.clear();
        Ok(())
    }
}

/// Copies every key of `old` into a new sled store in `dir` (not yet flushed). Stops early
/// with an error when `cancel` is set.
fn copy_store(
    old: &sled::Db,
    dir: &Path,
    opts: &QueueOptions,
    cancel: &AtomicBool,
) -> Res<(sled::Db, u64)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let db = sled_config(dir, opts).open()?;
    let mut batch = sled::Batch::default();
    let (mut n, mut keys) = (0usize, 0u64);
    for item in old.iter() {
        let (k, v) = item?;
        batch.insert(k, v);
        n += 1;
        keys += 1;
        if n >= RECOVERY_CHUNK {
            if cancel.load(Ordering::Relaxed) {
                return Err(QueueError::Closed {
                    reason: "compaction cancelled".into(),
                });
            }
            db.apply_batch(std::mem::take(&mut batch))?;
            n = 0;
        }
    }
    db.apply_batch(batch)?;
    Ok((db, keys))
}

/// A compaction copying in the background while the writer goes on.
struct Background {
    handle: JoinHandle<Res<(sled::Db, u64)>>,
    cancel: Arc<AtomicBool>,
    generation: u64,
    dir: PathBuf,
    disk_before: u64,
    started: Instant,
}

/// The idempotency index's frozen memory part being written as a run on its own thread
/// (see `Writer::maybe_merge_idem`).
struct RunWrite {
    handle: std::thread::JoinHandle<Result<Option<Run>, RunError>>,
    keys: usize,
    /// The watermark once the run is stored.
    hi: u64,
    started: Instant,
}

/// A merge of two neighbouring runs on its own thread (see `Writer::start_run_merge`).
struct RunMerge {
    handle: std::thread::JoinHandle<Result<Option<Run>, RunError>>,
    older: Arc<Run>,
    newer: Arc<Run>,
}

/// What one `purge_chunk` did: final-index entries looked at (records listed), and records
/// dropped (those still there).
struct PurgeChunk {
    seen: usize,
    dropped: usize,
}

struct Writer {
    shared: Arc<Shared>,
    last_id: u64,
    next_purge: Instant,
    /// When to look at whether a compaction is worth it; `None`: nothing changed since.
    next_compact_check: Option<Instant>,
    background: Option<Background>,
    /// The idempotency index's memory part being written as a run on another thread.
    run_write: Option<RunWrite>,
    /// Two runs of the idempotency index being merged on another thread.
    run_merge: Option<RunMerge>,
    /// sled's size right after the last compaction, and the live data estimated when it began.
    compacted_size: u64,
    compacted_live: u64,
    compact_not_before: Instant,
    /// Appends bodies over 256 bytes to segment files.
    appender: segments::Appender,
    /// When (ms, on the clock of the `take_due` calls) to look for leases past
    /// `lease_timeout` next.
    next_lease_check_ms: u64,
    /// Which addresses may be suppressed: an enqueue reads sled only for those. The two
    /// sled reads per message (this one and the idempotency key's) were ~18 % of the
    /// writer's time in the 64-producer enqueue (BENCHMARKS.md, "Fifth session").
    supp_filter: SuppressionFilter,
    /// Outcomes that may wait (`Op::Complete { may_wait: true }`) in the last group.
    last_outcomes: usize,
}

impl Writer {
    /// Writes the group's bodies, then commits its `Tx` and passes the replies on. If the
    /// bodies cannot be written, nothing of the group is applied and the queue closes.
    fn commit(&mut self, tx: Tx<'_>, mut group: Vec<Done>, done: &ToSyncer) {
        if let Err(reason) = self.appender.write_pending(&self.shared.segs) {
            drop(tx);
            self.shared.close(&reason);
            for d in &mut group {
                d.result = Err(QueueError::Closed {
                    reason: reason.clone(),
                });
                d.durable = false;
            }
            forward_all(done, group);
            return;
        }
        commit_group(tx, group, done);
        if let Err(reason) = self.appender.release_retired(&self.shared.segs) {
            self.shared.close(&reason);
        }
        if self.supp_filter.is_full() {
            // Everything it was filled from is committed now. On an error the old filter
            // stays: it still finds every key, with more false positives.
            let suppressions = lock(&self.shared.counters).suppressions;
            match SuppressionFilter::build(&self.shared.db(), codec::P_SUPP, suppressions) {
                Ok(f) => self.supp_filter = f,
                Err(e) => tracing::warn!("cannot rebuild the suppression filter: {e}"),
            }
        }
    }

    /// Takes every request that has arrived, and while the syncer is still busy with the
    /// previous group every one that arrives until it is done, handles them all in one `Tx`
    /// and commits it as one sled batch (sled 0.34.7 writes out its log buffer twice per
    /// batch, so one batch per request would cost about one I/O each), then hands the replies
    /// to the syncer.
    fn run(mut self, requests: Receiver<Request>, done: ToSyncer) {
        let shared = Arc::clone(&self.shared);
        loop {
            let mut next = self
                .next_compact_check
                .map_or(self.next_purge, |c| c.min(self.next_purge));
            if self.background.is_some() || self.run_write.is_some() || self.run_merge.is_some() {
                next = next.min(Instant::now() + Duration::from_millis(50));
            }
            let wait = next.saturating_duration_since(Instant::now());
            let first = match requests.recv_timeout(wait) {
                Ok(req) => Some(req),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.abandon_background();
                    if let Some(w) = self.run_write.take() {
                        self.store_run_between_groups(w);
                    }
                    if let Some(m) = self.run_merge.take() {
                        self.apply_run_merge(m);
                    }
                    return;
                }
            };
            if let Some(first) = first {
                let mut tx = Tx::new(&shared);
                let mut group: Vec<Done> = Vec::new();
                // A token left from a sync that ended while nothing waited for it.
                let _ = done.idle.try_recv();
                let mut taken = 0;
                // Until when the group may stay open for more outcomes, if it holds nothing
                // else and the last one had company (`QueueOptions::outcome_commit_delay`).
                let hold_until = Instant::now()
                    .checked_add(shared.opts.outcome_commit_delay)
                    .unwrap_or_else(Instant::now);
                let had_company = self.last_outcomes >= shared.opts.outcome_commit_siblings;
                let mut only_outcomes = true;
                let mut outcomes = 0;
                let mut takes = 0;
                let mut next_req = Some(first);
                while let Some(req) = next_req.take() {
                    let outcome = matches!(req.op, Op::Complete { may_wait: true, .. });
                    let take = matches!(req.op, Op::Take { .. });
                    outcomes += usize::from(outcome);
                    takes += usize::from(take);
                    // A take writes nothing and the engine's take loop is no hurry: it waits
                    // along (else its periodic takes would cut every held group short), but
                    // only with outcomes.
                    only_outcomes &= outcome || take;
                    self.accept(&shared, &mut tx, &mut group, req, &done);
                    taken += 1;
                    if taken > MAX_GROUP {
                        break;
                    }
                    // While the syncer is still making the previous group durable, go on
                    // collecting into this one: sled 0.34.7 writes out its log buffer for every
                    // batch (a `pwrite` and a `sync_file_range`, each waking all of its idle
                    // I/O threads), so fewer, bigger batches cost less, and the replies would
                    // wait for that sync anyway. In the SMTP drain, where outcomes arrive a
                    // few at a time, this cut the CPU per message by ~30 % (BENCHMARKS.md,
                    // SMTP, "Sixth session"). A group of nothing but the engine's outcomes
                    // stays open longer still, up to `outcome_commit_delay`: in the 20 KB
                    // drain that made a third as many syncs (BENCHMARKS.md, SMTP, "Eighth
                    // session").
                    //
                    // While it holds, the writer parks instead of waiting on the channel, so
                    // that an outcome which may wait does not wake it (each wake-up was a
                    // futex call on both sides, for every outcome): anything else unparks it
                    // (`Queue::call`, `Queue::call_async`), and the deadline ends the park.
                    let hold = || {
                        if !(had_company && only_outcomes && outcomes > 0) {
                            return None;
                        }
                        loop {
                            match requests.try_recv() {
                                Ok(r) => return Some(r),
                                Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
                                Err(crossbeam_channel::TryRecvError::Empty) => {}
                            }
                            let now = Instant::now();
                            if now >= hold_until {
                                return None;
                            }
                            std::thread::park_timeout(hold_until - now);
                        }
                    };
                    next_req = match requests.try_recv() {
                        Ok(r) => Some(r),
                        Err(_) if !done.busy() => hold(),
                        Err(_) => crossbeam_channel::select! {
                            recv(requests) -> r => r.ok(),
                            recv(done.idle) -> _ => hold(),
                        },
                    };
                }
                // A group of takes alone says nothing about the outcomes' pace.
                if outcomes > 0 || taken > takes {
                    self.last_outcomes = outcomes;
                }
                if group.iter().any(|d| d.durable && d.result.is_ok()) {
                    self.next_compact_check
                        .get_or_insert_with(|| Instant::now() + COMPACT_CHECK_DELAY);
                }
                self.commit(tx, group, &done);
                self.maybe_merge_idem(&done);
            }
            if Instant::now() >= self.next_purge {
                self.auto_purge();
                self.next_compact_check
                    .get_or_insert_with(|| Instant::now() + COMPACT_CHECK_DELAY);
            }
            if self.next_compact_check.is_some_and(|c| Instant::now() >= c) {
                self.next_compact_check = None;
                self.relocate_segments(&done);
                self.maybe_compact();
            }
            self.poll_background();
            if let Some(w) = self.run_write.take_if(|w| w.handle.is_finished()) {
                self.store_run_between_groups(w);
            }
            if let Some(m) = self.run_merge.take_if(|m| m.handle.is_finished()) {
                self.apply_run_merge(m);
                self.start_run_merge();
            }
        }
    }

    /// Handles one request into the group's `Tx`.
    fn accept<'a>(
        &mut self,
        shared: &'a Shared,
        tx: &mut Tx<'a>,
        group: &mut Vec<Done>,
        req: Request,
        done: &ToSyncer,
    ) {
        if let Some(reason) = lock(&shared.closed).clone() {
            group.push(Done {
                reply: req.reply,
                result: Err(QueueError::Closed { reason }),
                durable: false,
            });
            return;
        }
        if matches!(req.op, Op::Compact | Op::Purge(_)) {
            // Both commit on their own (purging in chunks; compaction swaps the
            // store): commit what came before, and start afresh after.
            self.commit(
                std::mem::replace(tx, Tx::new(shared)),
                std::mem::take(group),
                done,
            );
            let result = match req.op {
                Op::Purge(cutoff) => self.purge_all(cutoff).map(Reply::Count),
                _ => self.compact().map(Reply::Compacted),
            };
            *tx = Tx::new(shared);
            forward(
                done,
                Done {
                    reply: req.reply,
                    result,
                    durable: true,
                },
            );
            return;
        }
        let sp = tx.savepoint();
        let (result, durable) = self.handle(tx, req.op);
        if result.is_err() {
            tx.rollback(sp);
        }
        group.push(Done {
            reply: req.reply,
            result,
            durable,
        });
    }

    /// Moves the few bodies still pending in mostly dead segments (≥ 1 MiB, live bodies ≤ ¼
    /// of it) to the current segment, so that those segments are deleted after the next
    /// sync (see `segments`). Checked with the compaction.
    fn relocate_segments(&mut self, done: &ToSyncer) {
        let shared = Arc::clone(&self.shared);
        if lock(&shared.closed).is_some() {
            return;
        }
        let mut result = Ok(());
        if lock(&shared.segs).current_mostly_dead() {
            result = self
                .appender
                .seal(&shared.segs)
                .map_err(|reason| QueueError::Closed { reason });
        }
        let candidates = lock(&shared.segs).relocation_candidates();
        let mut moved = 0;
        for &(seg, lo, hi) in &candidates {
            if result.is_err() {
                break;
            }
            result = self.relocate(&shared, seg, lo, hi).map(|n| moved += n);
        }
        match result {
            Err(QueueError::Closed { reason }) => shared.close(&reason),
            Err(e) => tracing::warn!(path = %shared.path.display(), "body relocation failed: {e}"),
            Ok(()) => {}
        }
        if !candidates.is_empty() {
            // A sync, after which the emptied segments are deleted.
            forward(
                done,
                Done {
                    reply: ReplyTo::Nobody,
                    result: Ok(Reply::Unit),
                    durable: true,
                },
            );
            tracing::info!(path = %shared.path.display(), segments = candidates.len(), bodies = moved, "relocated the live bodies of mostly empty body segments");
        }
    }

    /// Relocates the pending bodies of segment `seg` (given to messages `lo..=hi`). The
    /// copies are written and `fdatasync`ed before the metadata that points to them is
    /// committed: these messages were acknowledged long ago, so (unlike a new message's
    /// body) their copy must not be the one a power cut can lose.
    fn relocate(&mut self, shared: &Shared, seg: u64, lo: u64, hi: u64) -> Res<u64> {
        let mut tx = Tx::new(shared);
        let scanned = self.relocate_scan(shared, &mut tx, seg, lo, hi);
        // Whatever happened, nothing stays buffered (the bodies of a failed scan are just
        // unreferenced bytes).
        let written = self
            .appender
            .write_pending(&shared.segs)
            .and_then(|()| self.appender.sync_current())
            .map_err(|reason| QueueError::Closed { reason });
        let n = scanned?;
        written?;
        tx.commit()?;
        Ok(n)
    }

    fn relocate_scan(
        &mut self,
        shared: &Shared,
        tx: &mut Tx<'_>,
        seg: u64,
        lo: u64,
        hi: u64,
    ) -> Res<u64> {
        let mut n = 0;
        let db = tx.db.clone();
        for item in scan_metas(&shared.path, &db, MessageId(lo), Some(MessageId(hi))) {
            let (id, v) = item?;
            let k = codec::meta_key(id);
            let mut meta = codec::decode_meta(&v).map_err(|d| tx.corrupt(&k, d))?;
            let Body::Segment(r) = meta.body else {
                continue;
            };
            if r.seg != seg || meta.pending == 0 {
                continue;
            }
            let body = match segments::read(&shared.seg_dir, r, meta.size) {
                Ok(b) => b,
                Err(d) => {
                    // It stays where it is (and fails when delivered); the rest moves.
                    tracing::error!(message = %id, "cannot relocate a damaged body: {d}");
                    continue;
                }
            };
            let new = self
                .appender
                .append(&shared.segs, id.0, &body)
                .map_err(|reason| QueueError::Closed { reason })?;
            tx.seg_delta.push((seg, -1, -signed(meta.size)));
            tx.seg_delta.push((new.seg, 1, signed(meta.size)));
            meta.body = Body::Segment(new);
            tx.put_meta(id, &meta);
            n += 1;
        }
        Ok(n)
    }

    /// Starts a background compaction when sled's files are much bigger than the data still
    /// in them (after a drain, typically).
    fn maybe_compact(&mut self) {
        let opts = &self.shared.opts;
        if !opts.auto_compact
            || self.background.is_some()
            || Instant::now() < self.compact_not_before
        {
            return;
        }
        let live = {
            let c = lock(&self.shared.counters);
            let records: u64 = c.by_state.iter().sum();
            // A record (in its message's metadata, packed, or under its own key) and its
            // final-index entry: about two keys' worth each.
            let keys = records.saturating_mul(2).saturating_add(c.suppressions);
            c.body_bytes
                .saturating_add(keys.saturating_mul(BYTES_PER_KEY))
        };
        let disk = self.shared.db().size_on_disk().unwrap_or(0);
        // Not again until the files doubled since the last compaction or the live data shrank
        // to a quarter (so a wrong estimate cannot make it compact in a loop).
        let grown = disk >= self.compacted_size.saturating_mul(2)
            || live.saturating_mul(4) <= self.compacted_live;
        if disk < opts.compact_min_disk_bytes
            || disk < live.saturating_mul(4)
            || live > opts.compact_max_live_bytes
            || !grown
        {
            return;
        }
        self.compacted_live = live;
        let old = self.shared.store();
        let generation = old.generation + 1;
        let dir = gen_dir(&self.shared.path, generation);
        let cancel = Arc::new(AtomicBool::new(false));
        // From here on every committed key is noted, so the copy can be brought up to date.
        *lock(&self.shared.dirty) = Some(HashSet::new());
        let (c, d, o) = (Arc::clone(&cancel), dir.clone(), self.shared.opts.clone());
        let old_db = old.db.clone();
        let spawned = std::thread::Builder::new()
            .name("queue-compact".into())
            .spawn(move || copy_store(&old_db, &d, &o, &c));
        match spawned {
            Ok(handle) => {
                tracing::info!(path = %self.shared.path.display(), disk, "queue compaction started");
                self.background = Some(Background {
                    handle,
                    cancel,
                    generation,
                    dir,
                    disk_before: disk,
                    started: Instant::now(),
                });
            }
            Err(e) => {
                *lock(&self.shared.dirty) = None;
                tracing::warn!("cannot start the compaction thread: {e}");
            }
        }
    }

    /// Finishes a background compaction whose copy is done (or abandons one that has seen too
    /// many writes meanwhile).
    fn poll_background(&mut self) {
        let Some(bg) = self.background.as_ref() else {
            return;
        };
        let dirty = lock(&self.shared.dirty).as_ref().map_or(0, HashSet::len);
        if dirty > MAX_DIRTY_KEYS {
            tracing::warn!(
                dirty,
                "queue compaction abandoned: too many writes while copying; retried in 10 min"
            );
            self.abandon_background();
            self.compact_not_before = Instant::now() + Duration::from_secs(600);
            return;
        }
        if !bg.handle.is_finished() {
            return;
        }
        let Some(bg) = self.background.take() else {
            return;
        };
        let copied = bg.handle.join().unwrap_or_else(|_| Err(unexpected()));
        let dirty = lock(&self.shared.dirty).take().unwrap_or_default();
        let res = copied.and_then(|(db, keys)| {
            let disk_after = self.switch_to(db, bg.generation, bg.dir.clone(), Some(dirty))?;
            Ok((disk_after, keys))
        });
        match res {
            Ok((disk_after, keys)) => {
                self.compacted_size = disk_after;
                tracing::info!(
                    path = %self.shared.path.display(),
                    disk_before = bg.disk_before,
                    disk_after,
                    keys,
                    ms = bg.started.elapsed().as_millis() as u64,
                    "queue compacted"
                );
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bg.dir);
                self.compact_not_before = Instant::now() + Duration::from_secs(600);
                tracing::warn!(path = %self.shared.path.display(), "queue compaction failed: {e}");
            }
        }
    }

    fn abandon_background(&mut self) {
        if let Some(bg) = self.background.take() {
            bg.cancel.store(true, Ordering::Relaxed);
            let _ = bg.handle.join();
            *lock(&self.shared.dirty) = None;
            let _ = std::fs::remove_dir_all(&bg.dir);
        }
    }

    /// Compacts now, on the writer thread: no write happens during the copy.
    fn compact(&mut self) -> Res<Compaction> {
        self.abandon_background();
        let started = Instant::now();
        let old = self.shared.store();
        let disk_before = old.db.size_on_disk().unwrap_or(0);
        let generation = old.generation + 1;
        let dir = gen_dir(&self.shared.path, generation);
        let copied = copy_store(&old.db, &dir, &self.shared.opts, &AtomicBool::new(false));
        drop(old);
        let (disk_after, keys) = copied
            .and_then(|(db, keys)| Ok((self.switch_to(db, generation, dir.clone(), None)?, keys)))
            .inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
        self.compacted_size = disk_after;
        Ok(Compaction {
            disk_before,
            disk_after,
            keys,
            duration: started.elapsed(),
        })
    }

    /// Brings the copy up to date with the keys written since it began (`dirty`), makes it
    /// durable, switches `CURRENT` to it and drops the old store. Crash-safe: until `CURRENT`
    /// is renamed the old store is the queue (the new one is removed on open); after, the new
    /// one is complete and synced. Returns sled's size on disk afterwards.
    fn switch_to(
        &mut self,
        db: sled::Db,
        generation: u64,
        dir: PathBuf,
        dirty: Option<HashSet<IVec>>,
    ) -> Res<u64> {
        let path = self.shared.path.clone();
        let old = self.shared.store();
        if let Some(dirty) = dirty {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for k in dirty {
                match old.db.get(&k)? {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
                n += 1;
                if n >= RECOVERY_CHUNK {
                    db.apply_batch(std::mem::take(&mut batch))?;
                    n = 0;
                }
            }
            db.apply_batch(batch)?;
        }
        db.flush()?;
        sync_sled_dir(&dir)?;
        let tmp = path.join(format!("{CURRENT}.tmp"));
        std::fs::write(&tmp, format!("gen-{generation:06}\n"))?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path.join(CURRENT))?;
        File::open(&path)?.sync_all()?;
        let disk_after = db.size_on_disk().unwrap_or(0);
        *self.shared.store.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Store {
            db,
            dir,
            generation,
        });
        drop(old);
        if let Err(e) = remove_other_generations(&path, generation) {
            tracing::warn!(path = %path.display(), "removing the old queue generation: {e} (retried on next open)");
        }
        Ok(disk_after)
    }

    fn purge_all(&mut self, cutoff: u64) -> Res<usize> {
        let mut total = 0;
        loop {
            let c = self.purge_chunk(cutoff)?;
            total += c.dropped;
            if c.seen < PURGE_CHUNK {
                if total > 0 {
                    self.drop_dead_runs();
                }
                return Ok(total);
            }
        }
    }

    /// Starts writing the idempotency index's memory part as a new run once it holds more
    /// than `QueueOptions::idempotency_memory_bytes` allows (see `idem`). Runs between
    /// groups, so every message up to `last_id` is committed; it first waits for the syncer
    /// to have synced them all, so that the run names only durable messages. Then the
    /// memory part is frozen (still looked up, no longer changed: a delete leaves its key
    /// there, pointing at nothing, as in a run) and written on another thread while a new
    /// memory part takes the new keys. The writer goes on meanwhile (written on the writer
    /// thread, a run of ~645k keys held it 12–61 ms in the sixteenth session's 6M fills and
    /// 1–3 ms in the seventeenth's 4M fills, where it took 1–4 ms on its own thread).
    /// `store_run` puts the run in use once it is durable; one run is written at a time.
    fn maybe_merge_idem(&mut self, done: &ToSyncer) {
        let shared = Arc::clone(&self.shared);
        let budget = shared.opts.idempotency_memory_bytes / IDEM_KEY_BYTES;
        if self.run_write.is_some()
            || lock(&shared.idem).len() as u64 <= budget
            || lock(&shared.closed).is_some()
        {
            return;
        }
        let waited = Instant::now();
        while done.busy() {
            if done.idle.recv().is_err() {
                return;
            }
        }
        if lock(&shared.closed).is_some() {
            return;
        }
        let (frozen, lo) = {
            let mut idem = lock(&shared.idem);
            let lo = idem.merged + 1;
            match idem.freeze(self.last_id) {
                Some(f) => (f, lo),
                None => return,
            }
        };
        let (keys, hi) = (frozen.len(), frozen.hi);
        let dir = shared.path.join(runs::DIR);
        #[cfg(test)]
        let hold = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("bulksend-idem-run".into())
            .spawn(move || {
                #[cfg(test)]
                {
                    let (held, cv) = &hold.hold_run_writes;
                    let mut h = lock(held);
                    while *h {
                        h = cv
                            .wait(h)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                }
                Run::write(&dir, lo, hi, frozen.sorted_entries())
            });
        match spawned {
            Ok(handle) => {
                tracing::debug!(
                    keys,
                    wait_ms = waited.elapsed().as_millis() as u64,
                    "writing idempotency keys from memory into a run"
                );
                self.run_write = Some(RunWrite {
                    handle,
                    keys,
                    hi,
                    started: Instant::now(),
                });
            }
            Err(e) => {
                tracing::error!(path = %shared.path.display(), "cannot start writing idempotency keys into a run: {e}");
                lock(&shared.idem).thaw();
            }
        }
    }

    /// Puts the run `w` wrote in use and stages the new watermark in `tx` (committed with
    /// it; the run is durable already, so a watermark that is lost only puts the run's keys
    /// back into memory at the next open, which lookups do not mind). If the write failed
    /// the frozen keys go back into memory, and a later group tries again; a run file left
    /// behind is found, or removed as covered, at the next open.
    fn store_run(&mut self, w: RunWrite, tx: &mut Tx<'_>) {
        let shared = Arc::clone(&self.shared);
        let run = match w.handle.join() {
            Ok(Ok(run)) => run,
            Ok(Err(e)) => {
                tracing::error!(path = %shared.path.display(), "moving idempotency keys into a run failed: {}", run_error(e));
                lock(&shared.idem).thaw();
                return;
            }
            Err(_) => {
                tracing::error!(path = %shared.path.display(), "writing idempotency keys into a run panicked");
                lock(&shared.idem).thaw();
                return;
            }
        };
        tx.insert_blind(codec::IDEM_MERGED_KEY, &w.hi.to_be_bytes());
        let runs = {
            let mut idem = lock(&shared.idem);
            idem.stored(run.map(Arc::new));
            idem.runs.len()
        };
        tracing::info!(path = %shared.path.display(), keys = w.keys, runs, ms = w.started.elapsed().as_millis() as u64, "idempotency keys moved from memory into a run");
        self.start_run_merge();
    }

    /// [`Writer::store_run`] with a commit of its own, between groups.
    fn store_run_between_groups(&mut self, w: RunWrite) {
        let shared = Arc::clone(&self.shared);
        let mut tx = Tx::new(&shared);
        self.store_run(w, &mut tx);
        if let Err(e) = tx.commit() {
            tracing::warn!(path = %shared.path.display(), "cannot store the idempotency watermark (the next run stores it): {e}");
        }
    }

    /// Starts merging two neighbouring runs of the idempotency index on another thread, if
    /// none is being merged: the newest two where the newer is at least half the older, so
    /// sizes fall by half or more from the oldest on and there are about log2(keys / memory
    /// part) runs; each key is rewritten about as often. Runs whose messages are all gone
    /// are deleted first; the merged run leaves out the entries of messages gone. The
    /// writer goes on meanwhile (a merge rewrote up to 2.6M keys in 0.3 s at 6M queued, on
    /// the writer thread, before it moved here).
    fn start_run_merge(&mut self) {
        if self.run_merge.is_some() {
            return;
        }
        let Some(floor) = self.drop_dead_runs() else {
            return;
        };
        let (older, newer) = {
            let idem = lock(&self.shared.idem);
            let runs = &idem.runs;
            let Some(i) = (1..runs.len())
                .rev()
                .find(|&i| runs[i].len * 2 >= runs[i - 1].len)
            else {
                return;
            };
            (Arc::clone(&runs[i - 1]), Arc::clone(&runs[i]))
        };
        let dir = self.shared.path.join(runs::DIR);
        let (o, n) = (Arc::clone(&older), Arc::clone(&newer));
        match std::thread::Builder::new()
            .name("bulksend-idem-merge".into())
            .spawn(move || Run::merge(&dir, &o, &n, floor))
        {
            Ok(handle) => {
                self.run_merge = Some(RunMerge {
                    handle,
                    older,
                    newer,
                })
            }
            Err(e) => tracing::warn!("cannot start merging idempotency runs: {e}"),
        }
    }

    /// Puts a merged run in the place of its two inputs (still neighbours: runs are only
    /// added at the end, and removed from the start), and deletes their files. If they were
    /// deleted meanwhile (all their messages gone), so is its output. On an error the inputs
    /// stay in use; the output's `.tmp` goes at the next open.
    fn apply_run_merge(&mut self, m: RunMerge) {
        let out = match m.handle.join() {
            Ok(Ok(out)) => out.map(Arc::new),
            Ok(Err(e)) => {
                tracing::warn!(path = %self.shared.path.display(), "merging idempotency runs failed: {}", run_error(e));
                return;
            }
            Err(_) => {
                tracing::error!(path = %self.shared.path.display(), "merging idempotency runs panicked");
                return;
            }
        };
        let mut idem = lock(&self.shared.idem);
        let at = idem
            .runs
            .windows(2)
            .position(|w| Arc::ptr_eq(&w[0], &m.older) && Arc::ptr_eq(&w[1], &m.newer));
        match at {
            Some(i) => {
                idem.runs.splice(i..i + 2, out.clone());
                m.older.delete_file(out.as_deref());
                m.newer.delete_file(out.as_deref());
            }
            None => {
                if let Some(o) = out.filter(|o| idem.runs.iter().all(|r| r.path != o.path)) {
                    o.delete_file(None);
                }
            }
        }
        tracing::debug!(runs = idem.runs.len(), "idempotency runs merged");
    }

    /// Finishes the merge of runs under way and every one that follows (for a flush, so that
    /// what it leaves is settled).
    fn settle_run_merges(&mut self) {
        loop {
            if let Some(m) = self.run_merge.take() {
                self.apply_run_merge(m);
            }
            self.start_run_merge();
            if self.run_merge.is_none() {
                return;
            }
        }
    }

    /// Deletes the runs of the idempotency index whose messages are all gone.
    /// Returns the id below which every message is gone (`oldest_message`), `None` if it
    /// cannot be read.
    fn drop_dead_runs(&self) -> Option<u64> {
        let floor = match oldest_message(&self.shared.db()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot find the oldest message: {e}");
                return None;
            }
        };
        lock(&self.shared.idem).runs.retain(|r| {
            if r.hi >= floor {
                return true;
            }
            r.delete_file(None);
            false
        });
        Some(floor)
    }

    fn auto_purge(&mut self) {
        let retention = self.shared.opts.final_retention;
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .map(to_millis)
            .unwrap_or(0);
        match self.purge_chunk(cutoff) {
            // A full chunk: more to do, continue after the next request.
            Ok(c) if c.seen >= PURGE_CHUNK => self.next_purge = Instant::now(),
            Ok(c) => {
                if c.dropped > 0 {
                    tracing::debug!(records = c.dropped, "purged final records");
                    self.drop_dead_runs();
                }
                self.next_purge = Instant::now() + AUTO_PURGE_EVERY;
            }
            Err(e) => {
                tracing::warn!("automatic purge failed: {e}");
                self.next_purge = Instant::now() + AUTO_PURGE_EVERY;
            }
        }
    }

    fn handle(&mut self, tx: &mut Tx<'_>, op: Op) -> (Res<Reply>, bool) {
        match op {
            Op::Enqueue(msgs) => (self.enqueue(tx, msgs).map(Reply::Enqueued), true),
            Op::Take {
                destination,
                now_ms,
                limit,
            } => (
                self.take(tx, destination.as_deref(), now_ms, limit)
                    .map(Reply::Leases),
                false,
            ),
            Op::Complete { items, now_ms, .. } => {
                (self.complete(tx, items, now_ms).map(Reply::Completed), true)
            }
            Op::Expire(now_ms) => (self.expire(tx, now_ms).map(Reply::Records), true),
            Op::Retry(id, now_ms) => (self.retry(tx, id, now_ms).map(Reply::Count), true),
            Op::Delete(id) => (self.delete(tx, id).map(Reply::Bool), true),
            // Handled in `run` (commits on its own).
            Op::Purge(_) => (Err(unexpected()), false),
            Op::SuppressAdd(a, reason, at) => (
                self.suppress_add(tx, &a, &reason, at).map(Reply::Bool),
                true,
            ),
            Op::SuppressRemove(a) => (self.suppress_remove(tx, &a).map(Reply::Bool), true),
            Op::Flush => {
                if let Some(w) = self.run_write.take() {
                    self.store_run(w, tx);
                }
                self.settle_run_merges();
                (Ok(Reply::Unit), true)
            }
            // Handled in `run` (swaps the store).
            Op::Compact => (Err(unexpected()), false),
        }
    }

    /// Consecutive ids, whatever the enqueue rate, so that messages fill metadata packs
    /// (`codec::PACK`): with a jump to the clock at each millisecond (as before schema 6),
    /// one message a millisecond would have had a pack each. Unique across restarts: `open`
    /// starts above every stored id and above `unix_millis << 20`, which outruns this count
    /// unless over 2^20 messages a millisecond were enqueued since the last open.
    fn next_id(&mut self) -> MessageId {
        self.last_id += 1;
        MessageId(self.last_id)
    }

    fn enqueue(&mut self, tx: &mut Tx<'_>, msgs: Vec<Checked>) -> Res<Vec<Res<Enqueued>>> {
        let now = SystemTime::now();
        let now_ms = to_millis(now);
        let created = from_millis(now_ms);
        let mut out = Vec::with_capacity(msgs.len());
        for Checked { msg, normalized } in msgs {
            if let Some(key) = &msg.idempotency_key {
                if let Some(id) = tx.idem_lookup(key)? {
                    out.push(Ok(Enqueued {
                        id,
                        duplicate: true,
                        suppressed: Vec::new(),
                    }));
                    continue;
                }
            }
            let id = self.next_id();
            let n = u32::try_from(msg.recipients.len()).unwrap_or(u32::MAX);
            let mut suppressed = Vec::new();
            let mut record = None;
            for (i, (address, (lower, destination))) in
                msg.recipients.into_iter().zip(normalized).enumerate()
            {
                let sk = codec::supp_key(&lower);
                let is_suppressed = self.supp_filter.may_contain(&sk) && tx.get(&sk)?.is_some();
                let rec = RecipientRecord {
                    id: RecipientId {
                        message: id,
                        index: u32::try_from(i).unwrap_or(u32::MAX),
                    },
                    destination,
                    state: if is_suppressed {
                        RecipientState::Suppressed
                    } else {
                        RecipientState::Scheduled
                    },
                    attempts: 0,
                    next_attempt: created,
                    created,
                    updated: created,
                    last_reply: is_suppressed.then(|| "on the suppression list".to_string()),
                    address,
                };
                if is_suppressed {
                    suppressed.push(rec.address.clone());
                    tx.finals.push((now_ms, rec.id));
                } else {
                    tx.schedule(&rec);
                }
                tx.count(None, Some(rec.state), &rec.destination);
                if n == 1 {
                    record = Some(codec::encode_record(&rec));
                } else {
                    tx.insert(&codec::rcpt_key(rec.id), codec::encode_record(&rec).into());
                }
            }
            let pending = n - u32::try_from(suppressed.len()).unwrap_or(n);
            let size = msg.body.len() as u64;
            let body = if pending == 0 {
                Body::Chunks
            } else if msg.body.len() <= codec::INLINE_BODY_MAX {
                tx.body_delta += signed(size);
                Body::Inline(msg.body)
            } else {
                let r = self
                    .appender
                    .append(&self.shared.segs, id.0, &msg.body)
                    .map_err(|reason| QueueError::Closed { reason })?;
                tx.seg_delta.push((r.seg, 1, signed(size)));
                Body::Segment(r)
            };
            if let Some(key) = &msg.idempotency_key {
                tx.idem_insert(key, id);
            }
            tx.put_meta(
                id,
                &Meta {
                    created_ms: now_ms,
                    size,
                    recipients: n,
                    pending,
                    live: n,
                    sender: msg.sender,
                    idempotency_key: msg.idempotency_key,
                    body,
                    record,
                },
            );
            out.push(Ok(Enqueued {
                id,
                duplicate: false,
                suppressed,
            }));
        }
        Ok(out)
    }

    fn expired(&self, created_ms: u64, now_ms: u64) -> bool {
        created_ms.saturating_add(lifetime_ms(&self.shared.opts)) <= now_ms
    }

    /// Leases up to `limit` recipients due at or before `now_ms` (for `destination`, if
    /// given): reads the zones whose bound is due (see `schedule.rs`), earliest first, and
    /// takes their due recipients in (due time, id) order.
    fn take(
        &mut self,
        tx: &mut Tx<'_>,
        destination: Option<&str>,
        now_ms: u64,
        limit: usize,
    ) -> Res<Vec<Lease>> {
        const PAGE: usize = 64;
        self.reclaim_stale_leases(tx, now_ms)?;
        let mut leases = Vec::new();
        // A zone read here may stay due (a recipient for another destination, or expired
        // and waiting for `expire_due`) and come up again further on: read once per take.
        let mut read = HashSet::new();
        let mut after = None;
        'pages: while leases.len() < limit {
            let page = lock(&self.shared.sched).due_zones(now_ms, after, PAGE);
            after = page.last().copied();
            for &(_, start) in &page {
                if leases.len() >= limit {
                    break 'pages;
                }
                if read.insert(start) {
                    let room = limit - leases.len();
                    self.take_from_zone(tx, start, destination, now_ms, room, &mut leases)?;
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        // Keep the due order, but put each (message, destination) group together so the
        // engine can send one transaction for several recipients.
        let mut rank: HashMap<(MessageId, String), usize> = HashMap::new();
        let keys: Vec<usize> = leases
            .iter()
            .map(|l| {
                let n = rank.len();
                *rank
                    .entry((l.recipient.id.message, l.recipient.destination.clone()))
                    .or_insert(n)
            })
            .collect();
        let mut with_rank: Vec<(usize, Lease)> = keys.into_iter().zip(leases).collect();
        with_rank.sort_by_key(|(r, _)| *r);
        Ok(with_rank.into_iter().map(|(_, l)| l).collect())
    }

    /// Reads the zone starting at `start` whole, leases up to `room` of its due recipients
    /// (earliest due first) into `leases`, and settles the zone's bound on the rest.
    fn take_from_zone(
        &mut self,
        tx: &mut Tx<'_>,
        start: RecipientId,
        destination: Option<&str>,
        now_ms: u64,
        room: usize,
        leases: &mut Vec<Lease>,
    ) -> Res<()> {
        let end = lock(&self.shared.sched).zone_end(start);
        let mut rest = None;
        let mut due = Vec::new();
        for (rec, sender) in tx.scheduled_in(start, end)? {
            let at = schedule::Bound {
                due: to_millis(rec.next_attempt),
                created: to_millis(rec.created),
            };
            // An expired recipient is left for `expire_due`.
            if at.due <= now_ms
                && !self.expired(at.created, now_ms)
                && destination.is_none_or(|d| d == rec.destination)
            {
                due.push((at, rec, sender));
            } else {
                rest = Some(schedule::Bound::lower(rest, at));
            }
        }
        due.sort_by_key(|(at, rec, _)| (at.due, rec.id));
        for (i, (at, rec, sender)) in due.into_iter().enumerate() {
            if i >= room {
                rest = Some(schedule::Bound::lower(rest, at));
                continue;
            }
            tx.lease(&rec, now_ms);
            let mut leased = rec;
            leased.state = RecipientState::Leased;
            leased.updated = from_millis(now_ms);
            leases.push(Lease {
                recipient: leased,
                sender,
            });
        }
        tx.settle(start, rest);
        Ok(())
    }

    /// Releases the leases older than `lease_timeout` (looked for at most once a second, or
    /// twice per timeout if that is shorter): their recipients are due again at once.
    fn reclaim_stale_leases(&mut self, tx: &mut Tx<'_>, now_ms: u64) -> Res<()> {
        let Some(timeout) = self.shared.opts.lease_timeout else {
            return Ok(());
        };
        if now_ms < self.next_lease_check_ms {
            return Ok(());
        }
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.next_lease_check_ms = now_ms.saturating_add((timeout_ms / 2).clamp(1, 1000));
        let stale = lock(&self.shared.sched).leased_before(now_ms.saturating_sub(timeout_ms));
        if stale.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            recipients = stale.len(),
            timeout_secs = timeout.as_secs(),
            "leases held past the lease timeout were taken back; their recipients are due again"
        );
        let items = stale
            .into_iter()
            .map(|rid| (rid, Outcome::Released))
            .collect();
        for r in self.complete(tx, items, now_ms)? {
            r?;
        }
        Ok(())
    }

    fn complete(
        &mut self,
        tx: &mut Tx<'_>,
        items: Vec<(RecipientId, Outcome)>,
        now_ms: u64,
    ) -> Res<Vec<Res<Completed>>> {
        let shared = Arc::clone(&self.shared);
        let now = from_millis(now_ms);
        let lifetime = lifetime_ms(&shared.opts);
        let mut out = Vec::with_capacity(items.len());
        for (id, outcome) in items {
            let Some((mut rec, meta)) = tx.record_and_meta(id)? else {
                out.push(Err(QueueError::NotFound(id)));
                continue;
            };
            if rec.state != RecipientState::Leased {
                out.push(Err(QueueError::NotLeased {
                    id,
                    state: rec.state,
                }));
                continue;
            }
            rec.updated = now;
            let (state, attempted) = match outcome {
                Outcome::Delivered { reply } => {
                    rec.last_reply = Some(reply);
                    (RecipientState::Delivered, true)
                }
                Outcome::Bounced { reply } => {
                    rec.last_reply = Some(reply);
                    (RecipientState::Bounced, true)
                }
                Outcome::Unknown { reply } => {
                    rec.last_reply = Some(reply);
                    (RecipientState::Unknown, true)
                }
                Outcome::Suppressed { reason } => {
                    rec.last_reply = Some(reason);
                    (RecipientState::Suppressed, false)
                }
                Outcome::Deferred {
                    reply,
                    next_attempt,
                } => {
                    rec.last_reply = Some(reply);
                    let deadline = to_millis(rec.created).saturating_add(lifetime);
                    if to_millis(next_attempt) > deadline {
                        (RecipientState::Expired, true)
                    } else {
                        rec.next_attempt = from_millis(to_millis(next_attempt));
                        (RecipientState::Scheduled, true)
                    }
                }
                Outcome::Released => (RecipientState::Scheduled, false),
                Outcome::Postponed {
                    reason,
                    next_attempt,
                } => {
                    if rec.last_reply.is_none() {
                        rec.last_reply = Some(reason);
                    }
                    let deadline = to_millis(rec.created).saturating_add(lifetime);
                    if to_millis(next_attempt) > deadline {
                        (RecipientState::Expired, false)
                    } else {
                        rec.next_attempt = from_millis(to_millis(next_attempt));
                        (RecipientState::Scheduled, false)
                    }
                }
            };
            if attempted {
                rec.attempts = rec.attempts.saturating_add(1);
            }
            rec.state = state;
            let became_final = state != RecipientState::Scheduled;
            // Scheduled again before the lease goes, so that its zone is never empty
            // meanwhile: an empty zone is merged with its neighbours (`schedule.rs`).
            if !became_final {
                tx.schedule(&rec);
            }
            tx.unlease(id);
            tx.store_record(Some(RecipientState::Leased), &rec, became_final, meta)?;
            out.push(Ok(Completed { state }));
        }
        Ok(out)
    }

    fn expire(&mut self, tx: &mut Tx<'_>, now_ms: u64) -> Res<Vec<RecipientRecord>> {
        let now = from_millis(now_ms);
        let mut out = Vec::new();
        // Expired: created + lifetime <= now.
        let Some(cutoff) = now_ms.checked_sub(lifetime_ms(&self.shared.opts)) else {
            return Ok(out);
        };
        let zones = lock(&self.shared.sched).expiring_zones(now_ms, cutoff);
        for start in zones {
            let end = lock(&self.shared.sched).zone_end(start);
            let mut rest = None;
            for (mut rec, _) in tx.scheduled_in(start, end)? {
                let at = schedule::Bound {
                    due: to_millis(rec.next_attempt),
                    created: to_millis(rec.created),
                };
                if at.due > now_ms || !self.expired(at.created, now_ms) {
                    rest = Some(schedule::Bound::lower(rest, at));
                    continue;
                }
                rec.state = RecipientState::Expired;
                rec.updated = now;
                if rec.last_reply.is_none() {
                    rec.last_reply = Some(EXPIRED_REPLY.into());
                }
                tx.store_record(Some(RecipientState::Scheduled), &rec, true, None)?;
                out.push(rec);
            }
            tx.settle(start, rest);
        }
        Ok(out)
    }

    /// The records of a message as this group sees them (overlay included).
    fn records_of(tx: &Tx<'_>, id: MessageId, meta: &Meta) -> Res<Vec<RecipientRecord>> {
        let mut out = Vec::new();
        for index in 0..meta.recipients {
            if let Some(r) = tx.record(RecipientId { message: id, index })? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn retry(&mut self, tx: &mut Tx<'_>, id: MessageId, now_ms: u64) -> Res<usize> {
        let Some(meta) = tx.meta(id)? else {
            return Ok(0);
        };
        let mut n = 0;
        for mut rec in Self::records_of(tx, id, &meta)? {
            if rec.state != RecipientState::Scheduled {
                continue;
            }
            n += 1;
            if to_millis(rec.next_attempt) <= now_ms {
                continue;
            }
            rec.next_attempt = from_millis(now_ms);
            tx.schedule(&rec);
            tx.put_record(Some(RecipientState::Scheduled), &rec)?;
        }
        Ok(n)
    }

    fn delete(&mut self, tx: &mut Tx<'_>, id: MessageId) -> Res<bool> {
        let Some(meta) = tx.meta(id)? else {
            return Ok(false);
        };
        for rec in Self::records_of(tx, id, &meta)? {
            // A scheduled one stays in its zone's bound until the zone is next read.
            if rec.state == RecipientState::Leased {
                tx.unlease(rec.id);
            }
            // A final record's index entry stays: it may list other records too, and the
            // purge skips records that are gone.
            tx.remove_record(&rec)?;
        }
        if meta.pending > 0 {
            tx.remove_body(id, &meta);
        }
        if let Some(k) = &meta.idempotency_key {
            tx.idem_remove(k, id);
        }
        tx.remove(&codec::meta_key(id));
        Ok(true)
    }

    fn purge_chunk(&mut self, cutoff_ms: u64) -> Res<PurgeChunk> {
        let shared = Arc::clone(&self.shared);
        let mut tx = Tx::new(&shared);
        let mut end = vec![codec::P_FINAL];
        end.extend_from_slice(&cutoff_ms.to_be_bytes());
        let mut seen = 0;
        let mut dropped = 0;
        for item in tx.db.clone().range(vec![codec::P_FINAL]..end) {
            let (k, v) = item?;
            tx.remove(&k);
            let (at_ms, ids) = codec::parse_final_entry(&k[1..], &v).unwrap_or_else(|| {
                // Only an index: what it listed is still stored, counted and listed, and
                // `queue delete` removes it. Dropping the entry keeps the purge going.
                tracing::warn!(
                    path = %shared.path.display(),
                    key = %String::from_utf8_lossy(&k),
                    "unreadable final-index entry dropped; the records it listed stay until deleted"
                );
                (0, Vec::new())
            });
            seen += ids.len().max(1);
            for rid in ids {
                let Some(rec) = tx.record(rid)? else {
                    // Deleted since.
                    continue;
                };
                // Not final, or not the record this entry was written for: entries of deleted
                // messages stay, and a message id can be reused after the newest messages
                // were deleted and the clock stepped back. A record becomes final once, and
                // its entry carries that time.
                if !rec.state.is_final() || to_millis(rec.updated) != at_ms {
                    continue;
                }
                tx.remove_record(&rec)?;
                dropped += 1;
                if let Some(mut meta) = tx.meta(rid.message)? {
                    meta.live = meta.live.saturating_sub(1);
                    if meta.live == 0 {
                        if meta.pending > 0 {
                            tx.remove_body(rid.message, &meta);
                        }
                        if let Some(ik) = &meta.idempotency_key {
                            tx.idem_remove(ik, rid.message);
                        }
                        tx.remove(&codec::meta_key(rid.message));
                    } else {
                        tx.put_meta(rid.message, &meta);
                    }
                }
            }
            if seen >= PURGE_CHUNK {
                break;
            }
        }
        tx.commit()?;
        Ok(PurgeChunk { seen, dropped })
    }

    fn suppress_add(
        &mut self,
        tx: &mut Tx<'_>,
        address: &str,
        reason: &str,
        at_ms: u64,
    ) -> Res<bool> {
        let k = codec::supp_key(address);
        if tx.get(&k)?.is_some() {
            return Ok(false);
        }
        tx.insert_blind(&k, &codec::encode_suppression(at_ms, reason));
        self.supp_filter.insert(&k);
        tx.supp_delta += 1;
        Ok(true)
    }

    fn suppress_remove(&mut self, tx: &mut Tx<'_>, address: &str) -> Res<bool> {
        let k = codec::supp_key(address);
        if tx.get(&k)?.is_none() {
            return Ok(false);
        }
        tx.remove(&k);
        tx.supp_delta -= 1;
        Ok(true)
    }
}

/// Makes sled's writes durable: `db.flush()` (which in sled 0.34.7 only issues
/// `sync_file_range`, no device cache flush, no metadata), then `fdatasync` of the `db`
/// file and of any new blob file.
struct Syncer {
    shared: Arc<Shared>,
    /// The store generation `db_file` and `blob_dir` belong to.
    generation: u64,
    db_file: File,
    blob_dir: PathBuf,
    synced_blobs: HashSet<OsString>,
    /// A helper thread that `fdatasync`s body segments while this one syncs sled.
    seg_syncer: Option<SegSyncer>,
}

struct SegSyncer {
    work: Sender<BTreeSet<u64>>,
    result: Receiver<std::io::Result<()>>,
}

impl SegSyncer {
    fn start(dir: PathBuf) -> std::io::Result<SegSyncer> {
        let (work, work_rx) = crossbeam_channel::bounded::<BTreeSet<u64>>(1);
        let (result_tx, result) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("queue-segsync".into())
            .spawn(move || {
                for segs in work_rx {
                    if result_tx.send(segments::sync(&dir, &segs)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(SegSyncer { work, result })
    }
}

impl Syncer {
    fn new(shared: &Arc<Shared>) -> std::io::Result<Syncer> {
        let store = shared.store();
        Ok(Syncer {
            shared: Arc::clone(shared),
            generation: store.generation,
            db_file: File::open(store.dir.join("db"))?,
            blob_dir: store.dir.join("blobs"),
            synced_blobs: HashSet::new(),
            seg_syncer: Some(SegSyncer::start(shared.seg_dir.clone())?),
        })
    }

    /// Makes everything committed so far durable: the body segment written since the last
    /// sync (on the helper thread, at the same time) and sled. Then deletes the segments that
    /// the synced state no longer refers to. The order of the two syncs does not matter: a
    /// sealed segment was synced when it was sealed, and a body that sled refers to but a
    /// power cut lost is found on open (see `segments`).
    fn sync(&mut self) -> Res<()> {
        let (dirty, deletable) = lock(&self.shared.segs).take_for_sync();
        let mut pending = None;
        if self.shared.opts.durable && !dirty.is_empty() {
            match &self.seg_syncer {
                Some(h) if h.work.send(dirty.clone()).is_ok() => pending = Some(h.result.clone()),
                _ => segments::sync(&self.shared.seg_dir, &dirty)?,
            }
        }
        let sled = self.sync_sled();
        if let Some(result) = pending {
            match result.recv() {
                Ok(r) => r?,
                Err(_) => segments::sync(&self.shared.seg_dir, &dirty)?,
            }
        }
        sled?;
        if !deletable.is_empty() {
            segments::delete(
                &self.shared.seg_dir,
                &self.shared.segs,
                &self.shared.seg_readers,
                &deletable,
            );
        }
        Ok(())
    }

    fn sync_sled(&mut self) -> Res<()> {
        let store = self.shared.store();
        if store.generation != self.generation {
            // A compaction switched stores (and synced the new one completely).
            self.generation = store.generation;
            self.db_file = File::open(store.dir.join("db"))?;
            self.blob_dir = store.dir.join("blobs");
            self.synced_blobs.clear();
        }
        store.db.flush()?;
        if !self.shared.opts.durable {
            return Ok(());
        }
        self.db_file.sync_data()?;
        // sled writes nodes bigger than segment_size/4 to blobs/<lsn> without syncing them.
        let mut present = HashSet::new();
        let mut new_blob = false;
        match std::fs::read_dir(&self.blob_dir) {
            Ok(rd) => {
                for entry in rd {
                    let entry = entry?;
                    let name = entry.file_name();
                    if !self.synced_blobs.contains(&name) {
                        match File::open(entry.path()) {
                            Ok(f) => f.sync_data()?,
                            // removed by sled's gc in the meantime
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e.into()),
                        }
                        new_blob = true;
                    }
                    present.insert(name);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if new_blob {
            File::open(&self.blob_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }

    fn run(mut self, done: FromWriter) {
        while let Ok(mut group) = done.groups.recv() {
            let mut groups = 1;
            for more in done.groups.try_iter() {
                group.extend(more);
                groups += 1;
            }
            let needs_sync = group.iter().any(|d| d.durable && d.result.is_ok());
            if needs_sync {
                if let Err(e) = self.sync() {
                    let reason = format!("flush/fsync failed: {e}");
                    self.shared.close(&reason);
                    for d in group {
                        d.reply.send(Err(QueueError::Closed {
                            reason: reason.clone(),
                        }));
                    }
                    done.answered(groups);
                    continue;
                }
            }
            for d in group {
                d.reply.send(d.result);
            }
            done.answered(groups);
        }
        // Drain: the writer is gone; make what it did durable.
        if let Err(e) = self.sync() {
            tracing::error!(path = %self.shared.path.display(), "final sync failed: {e}");
        }
    }
}

/// Whether a pending message's body in a segment is all there. Bodies in the newest two
/// segments (the only ones a power cut can have left unsynced) are read and checked.
fn segment_body_ok(
    dir: &Path,
    files: &std::collections::BTreeMap<u64, u64>,
    r: segments::SegRef,
    size: u64,
) -> Res<bool> {
    let Some(&len) = files.get(&r.seg) else {
        return Ok(false);
    };
    if r.offset.saturating_add(size) > len {
        return Ok(false);
    }
    if !files.keys().rev().take(2).any(|&s| s == r.seg) {
        return Ok(true);
    }
    match segments::read(dir, r, size) {
        Ok(_) => Ok(true),
        Err(segments::ReadError::Damaged(_)) => Ok(false),
        // Not a reason to drop a message: fail the open instead.
        Err(segments::ReadError::Io(e)) => Err(QueueError::Io(e)),
    }
}

/// The idempotency index as stored: its hash key, watermark and runs, with nothing in
/// memory yet (`recover` adds the keys above the watermark). A store without a hash key
/// (new, or upgraded from before schema 8: `upgrade`) gets a new one, and loses any runs,
/// sled buckets (schema 7) and watermark it has (they were hashed with another key, if any:
/// their messages' keys are all put back into memory from the metadata instead).
fn open_idem(path: &Path, db: &sled::Db, upgrade: bool) -> Res<IdemIndex> {
    let oe = |e| open_err(path, e);
    let dir = path.join(runs::DIR);
    let seed = match db.get(codec::IDEM_SEED_KEY).map_err(oe)? {
        Some(seed) if !upgrade => seed.to_vec(),
        _ => {
            runs::remove_all(&dir).map_err(|e| open_err(path, e))?;
            let seed = IdemHasher::new_seed();
            let mut batch = sled::Batch::default();
            for item in db.scan_prefix([codec::P_IDEM_INDEX]) {
                batch.remove(item.map_err(oe)?.0);
            }
            batch.remove(codec::IDEM_MERGED_KEY);
            batch.insert(codec::IDEM_SEED_KEY, &seed[..]);
            db.apply_batch(batch).map_err(oe)?;
            seed.to_vec()
        }
    };
    let hasher = IdemHasher::from_seed(&seed).ok_or_else(|| {
        corrupt(
            path,
            codec::IDEM_SEED_KEY,
            format!(
                "the idempotency index's hash key is {} bytes, not {}",
                seed.len(),
                IdemHasher::SEED_LEN
            ),
        )
    })?;
    let merged = match db.get(codec::IDEM_MERGED_KEY).map_err(oe)? {
        None => 0,
        Some(v) => match <[u8; 8]>::try_from(&v[..]) {
            Ok(b) => u64::from_be_bytes(b),
            Err(_) => {
                return Err(corrupt(
                    path,
                    codec::IDEM_MERGED_KEY,
                    format!("idempotency index watermark of {} bytes, not 8", v.len()),
                ))
            }
        },
    };
    let runs = runs::open_all(&dir).map_err(run_error)?;
    Ok(IdemIndex::new(
        hasher,
        merged,
        runs.into_iter().map(Arc::new).collect(),
    ))
}

/// The fixes `recover` writes, a sled batch every `RECOVERY_CHUNK` of them.
struct RecoveryFixes<'a> {
    path: &'a Path,
    db: &'a sled::Db,
    batch: sled::Batch,
    /// Metadata fixes (message → new metadata, `None`: removed), written as packs.
    metas: BTreeMap<MessageId, Option<Vec<u8>>>,
    /// Fixes since the last batch.
    n: usize,
}

impl RecoveryFixes<'_> {
    /// Removes an orphan record. Its final-index entry, if any, stays (it may list other
    /// records); the purge skips records that are gone.
    fn drop_record(&mut self, rec: &RecipientRecord) {
        self.batch.remove(&codec::rcpt_key(rec.id));
        self.n += 1;
    }

    /// Writes what was gathered once there is a chunk of it, or anything at all (`force`).
    fn flush(&mut self, force: bool) -> Res<()> {
        if self.n == 0 || !(force || self.n >= RECOVERY_CHUNK) {
            return Ok(());
        }
        let (path, db, batch) = (self.path, self.db, &mut self.batch);
        repack(
            path,
            db,
            self.metas.iter().map(|(id, v)| (*id, v.as_deref())),
            |k, v| match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            },
        )?;
        self.metas.clear();
        db.apply_batch(std::mem::take(batch))?;
        self.n = 0;
        Ok(())
    }
}

/// Moves the metadata of stores before schema 6 (a key per message) into packs, whole packs
/// per sled batch. Runs at every open: a crash part-way leaves the rest for the next one.
fn migrate_metas(path: &Path, db: &sled::Db) -> Res<()> {
    let mut moved = 0u64;
    loop {
        let mut old: Vec<(MessageId, IVec)> = Vec::new();
        for item in db.scan_prefix([codec::P_META]) {
            let (k, v) = item?;
            let id =
                codec::meta_id(&k).ok_or_else(|| corrupt(path, &k, "bad message key".into()))?;
            if old.len() >= RECOVERY_CHUNK
                && old
                    .last()
                    .is_some_and(|(l, _)| pack_start(*l) != pack_start(id))
            {
                break;
            }
            old.push((id, v));
        }
        if old.is_empty() {
            break;
        }
        let mut batch = sled::Batch::default();
        repack(
            path,
            db,
            old.iter().map(|(id, v)| (*id, Some(&v[..]))),
            |k, v| match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            },
        )?;
        for (id, _) in &old {
            batch.remove(&codec::meta_key(*id));
        }
        db.apply_batch(batch)?;
        moved += old.len() as u64;
    }
    if moved > 0 {
        tracing::info!(path = %path.display(), messages = moved, "message metadata moved into packs");
    }
    Ok(())
}

/// Crash recovery and counter rebuild; returns the highest message id in use, the pending
/// bodies in each segment of `files` (segment → length), and the message ids they belong to.
fn recover(
    shared: &Shared,
    files: &std::collections::BTreeMap<u64, u64>,
) -> Res<(u64, segments::LiveMap, segments::IdRanges)> {
    let mut seg_live = segments::LiveMap::new();
    let mut seg_ids = segments::IdRanges::new();
    let db = &shared.db();
    let path = &shared.path;
    let mut counters = Counters::default();
    let mut fixes = RecoveryFixes {
        path,
        db,
        batch: sled::Batch::default(),
        metas: BTreeMap::new(),
        n: 0,
    };
    let mut released = 0u64;
    let mut orphans = 0u64;
    let mut max_id = 0u64;

    migrate_metas(path, db)?;
    let mut records = db.scan_prefix([codec::P_RCPT]).peekable();
    let metas = scan_metas(path, db, MessageId(0), None);
    let next_record =
        |records: &mut std::iter::Peekable<sled::Iter>| -> Res<Option<RecipientRecord>> {
            match records.next() {
                None => Ok(None),
                Some(item) => {
                    let (k, v) = item?;
                    decode_record_kv(path, &k, &v).map(Some)
                }
            }
        };
    let peek_msg = |records: &mut std::iter::Peekable<sled::Iter>| -> Option<MessageId> {
        match records.peek() {
            Some(Ok((k, _))) => codec::rid_from(&k[1..]).map(|r| r.message),
            _ => None,
        }
    };
    let mut sched = Schedule::with_memory(shared.opts.schedule_memory_bytes);
    // Nothing to undo here: the log is dropped as it grows.
    let mut sched_log = Vec::new();
    // Keys of messages above the watermark go into memory; the others are in the runs.
    let mut idem = lock(&shared.idem);
    let merged = idem.merged;

    for item in metas {
        let (mid, mv) = item?;
        let mk = codec::meta_key(mid);
        let mut meta = codec::decode_meta(&mv).map_err(|d| corrupt(path, &mk, d))?;
        max_id = max_id.max(mid.0);
        // Records of messages that have no metadata.
        while let Some(m) = peek_msg(&mut records) {
            if m >= mid {
                break;
            }
            if let Some(rec) = next_record(&mut records)? {
                fixes.drop_record(&rec);
                orphans += 1;
            }
        }
        let mut group: Vec<RecipientRecord> = codec::inline_record(mid, &meta)
            .map_err(|d| corrupt(path, &mk, d))?
            .into_iter()
            .collect();
        let mut rewrite_meta = false;
        while peek_msg(&mut records) == Some(mid) {
            if let Some(rec) = next_record(&mut records)? {
                group.push(rec);
            }
        }
        let pending = group.iter().filter(|r| !r.state.is_final()).count();
        let body_missing = pending > 0
            && match &meta.body {
                Body::Inline(_) => false,
                Body::Chunks => db.get(codec::body_key(mid, 0))?.is_none(),
                Body::Segment(r) => !segment_body_ok(&shared.seg_dir, files, *r, meta.size)?,
            };
        if group.is_empty() || body_missing {
            // Never acknowledged (or unusable): remove the whole message.
            tracing::warn!(message = %mid, records = group.len(), body_missing, "removing incomplete message");
            for rec in &group {
                fixes.drop_record(rec);
            }
            if meta.body == Body::Chunks {
                for c in 0..codec::body_chunks(meta.size) {
                    fixes.batch.remove(&codec::body_key(mid, c));
                }
            }
            fixes.metas.insert(mid, None);
            fixes.n += 3;
            orphans += 1;
            fixes.flush(false)?;
            continue;
        }
        for rec in &mut group {
            if rec.state == RecipientState::Leased {
                // Written by versions that stored leases.
                rec.state = RecipientState::Scheduled;
                if rec.id.index == 0 && meta.record.is_some() {
                    meta.record = Some(codec::encode_record(rec));
                    rewrite_meta = true;
                } else {
                    fixes
                        .batch
                        .insert(&codec::rcpt_key(rec.id), codec::encode_record(rec));
                    fixes.n += 1;
                }
                released += 1;
            }
            if rec.state == RecipientState::Scheduled {
                sched.add(
                    to_millis(rec.next_attempt),
                    rec.id,
                    to_millis(rec.created),
                    &mut sched_log,
                );
            } else {
                sched.note(rec.id, &mut sched_log);
            }
            sched_log.clear();
            counters.add(rec.state, &rec.destination);
        }
        if let Some(k) = meta.idempotency_key.as_deref().filter(|_| mid.0 > merged) {
            let h = idem.hash(k);
            idem.push(h, mid);
        }
        let pending = u32::try_from(pending).unwrap_or(u32::MAX);
        let live = u32::try_from(group.len()).unwrap_or(u32::MAX);
        if pending > 0 {
            match &meta.body {
                Body::Segment(r) => {
                    let l = seg_live.entry(r.seg).or_default();
                    l.bodies += 1;
                    l.bytes += meta.size;
                    segments::State::note_id(&mut seg_ids, r.seg, mid.0);
                }
                _ => counters.body_bytes += meta.size,
            }
        }
        if meta.pending != pending || meta.live != live || rewrite_meta {
            meta.pending = pending;
            meta.live = live;
            if pending == 0 {
                meta.body = Body::Chunks;
            }
            fixes.metas.insert(mid, Some(codec::encode_meta(&meta)));
            fixes.n += 1;
        }
        fixes.flush(false)?;
    }
    while let Some(rec) = next_record(&mut records)? {
        fixes.drop_record(&rec);
        orphans += 1;
        fixes.flush(false)?;
    }
    // Older stores kept the schedule in sled: under `d` per destination (schema 1), and
    // under `s` until it moved into memory; and the idempotency index under `i` (a key per
    // message) until schema 5. No longer used.
    for prefix in [codec::P_DEST, codec::P_SCHED, codec::P_IDEM] {
        for item in db.scan_prefix([prefix]) {
            let (k, _) = item?;
            fixes.batch.remove(k);
            fixes.n += 1;
            fixes.flush(false)?;
        }
    }
    fixes.flush(true)?;
    idem.finish();
    drop(idem);
    counters.suppressions = db.scan_prefix([codec::P_SUPP]).count() as u64;
    if released > 0 || orphans > 0 {
        tracing::info!(path = %path.display(), released, removed = orphans, "queue recovered");
    }
    *lock(&shared.counters) = counters;
    *lock(&shared.sched) = sched;
    Ok((max_id, seg_live, seg_ids))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::FileExt;

    fn message() -> NewMessage {
        NewMessage {
            idempotency_key: None,
            sender: "news@sender.test".into(),
            recipients: vec!["a@one.test".into()],
            body: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
        }
    }

    /// Enqueues `n` one-recipient messages.
    fn enqueue_n(q: &Queue, n: usize) {
        for r in q
            .enqueue_batch((0..n).map(|_| message()).collect())
            .unwrap()
        {
            r.unwrap();
        }
    }

    /// Leases up to `limit` recipients due at `at`: their ids, sorted.
    fn taken(q: &Queue, at: SystemTime, limit: usize) -> Vec<RecipientId> {
        let mut ids: Vec<RecipientId> = q
            .take_due(at, limit)
            .unwrap()
            .into_iter()
            .map(|l| l.recipient.id)
            .collect();
        ids.sort();
        ids
    }

    /// Completes leased `ids`: deferred to `later(id)` where that says so, else delivered.
    fn complete_all(
        q: &Queue,
        ids: &[RecipientId],
        later: impl Fn(RecipientId) -> Option<SystemTime>,
    ) {
        let items = ids
            .iter()
            .map(|&id| {
                let outcome = match later(id) {
                    Some(next_attempt) => Outcome::Deferred {
                        reply: "451 later".into(),
                        next_attempt,
                    },
                    None => Outcome::Delivered {
                        reply: "250 ok".into(),
                    },
                };
                (id, outcome)
            })
            .collect();
        for r in q.complete_batch(items).unwrap() {
            r.unwrap();
        }
    }

    /// The schedule keeps zones, not entries: recipients deferred in zones that were already
    /// read whole are found again when due (and not before), in a message of many recipients
    /// too, and a drained queue is left with one zone.
    #[test]
    fn deferred_recipients_are_found_again_in_zones_already_read() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let mut msgs: Vec<NewMessage> = (0..300).map(|_| message()).collect();
        let mut big = message();
        big.recipients = (0..150).map(|i| format!("r{i}@big.test")).collect();
        msgs.push(big);
        for r in q.enqueue_batch(msgs).unwrap() {
            r.unwrap();
        }
        let now = SystemTime::now() + Duration::from_secs(1);
        let leases = q.take_due(now, 10_000).unwrap();
        let ids: HashSet<RecipientId> = leases.iter().map(|l| l.recipient.id).collect();
        assert_eq!((leases.len(), ids.len()), (450, 450), "each recipient once");
        assert!(q.take_due(now, 10).unwrap().is_empty());
        let mut by_message: BTreeMap<MessageId, Vec<RecipientId>> = BTreeMap::new();
        for id in &ids {
            by_message.entry(id.message).or_default().push(*id);
        }
        let lone = *by_message.values().nth(100).unwrap().first().unwrap();
        let (big_id, mut big_rcpts) = by_message.pop_last().unwrap();
        big_rcpts.sort();
        // b0 and b1 share a zone, b2 is in another.
        let (b0, b1, b2) = (big_rcpts[3], big_rcpts[4], big_rcpts[140]);
        let later = |mins: u64| Outcome::Deferred {
            reply: "451 later".into(),
            next_attempt: now + Duration::from_secs(60 * mins),
        };
        let delivered = || Outcome::Delivered {
            reply: "250 ok".into(),
        };
        let items = ids
            .iter()
            .map(|&id| match id {
                _ if id == lone || id == b0 => (id, later(10)),
                _ if id == b2 => (id, later(5)),
                _ => (id, delivered()),
            })
            .filter(|(id, _)| *id != b1)
            .collect();
        for r in q.complete_batch(items).unwrap() {
            r.unwrap();
        }
        // Deferred to before b0, in b0's zone: the zone's bound must come down.
        q.complete(b1, later(5)).unwrap();
        assert!(q.take_due(now, 10).unwrap().is_empty(), "nothing due yet");
        let got = |at: SystemTime| taken(&q, at, 100);
        let five = got(now + Duration::from_secs(301));
        assert_eq!(five, vec![b1, b2], "message {big_id}'s two");
        let ten = got(now + Duration::from_secs(601));
        let mut want = vec![lone, b0];
        want.sort();
        assert_eq!(ten, want);
        let items = [b0, b1, b2, lone].map(|id| (id, delivered())).to_vec();
        for r in q.complete_batch(items).unwrap() {
            r.unwrap();
        }
        assert_eq!(lock(&q.shared.sched).zones(), 1, "drained: one zone");
        assert_eq!(q.stats().oldest_due, None);
    }

    /// A zone read sees the group's own writes over what sled has: a changed record, a new
    /// message and a removed one.
    #[test]
    fn a_zone_read_sees_the_writes_of_its_own_group() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let first = q.enqueue(message()).unwrap().id;
        let second = q.enqueue(message()).unwrap().id;
        let rid = |m| RecipientId {
            message: m,
            index: 0,
        };
        let start = RecipientId {
            message: MessageId(0),
            index: 0,
        };
        let mut tx = Tx::new(&q.shared);
        let seen = |tx: &Tx<'_>| -> Vec<(RecipientId, u64)> {
            tx.scheduled_in(start, None)
                .unwrap()
                .into_iter()
                .map(|(r, _)| (r.id, to_millis(r.next_attempt)))
                .collect()
        };
        assert_eq!(seen(&tx).len(), 2);
        let (mut rec, meta) = tx.record_and_meta(rid(first)).unwrap().unwrap();
        rec.next_attempt = from_millis(42);
        tx.store_record(Some(RecipientState::Scheduled), &rec, false, meta.clone())
            .unwrap();
        let third = MessageId(second.0 + 1);
        let mut copy = meta.unwrap();
        let mut rec3 = rec.clone();
        rec3.id = rid(third);
        rec3.next_attempt = from_millis(43);
        copy.record = Some(codec::encode_record(&rec3));
        tx.put_meta(third, &copy);
        tx.remove(&codec::meta_key(second));
        assert_eq!(seen(&tx), vec![(rid(first), 42), (rid(third), 43)]);
        let end = Some(rid(third));
        assert_eq!(
            tx.scheduled_in(start, end).unwrap().len(),
            1,
            "up to the end"
        );
    }

    /// The open counts final recipients into the zones too: a deferred recipient among
    /// delivered ones is in a zone of its neighbours, not of everything before it.
    #[test]
    fn the_open_builds_zones_over_final_recipients_too() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        enqueue_n(&q, 200);
        let now = SystemTime::now() + Duration::from_secs(1);
        let ids = taken(&q, now, 200);
        let lone = ids[150];
        let later = now + Duration::from_secs(60);
        complete_all(&q, &ids, |id| (id == lone).then_some(later));
        drop(q);
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let (start, _) = lock(&q.shared.sched).zone_of(lone);
        let first_id = ids[150 - schedule::ZONE_SIZE as usize];
        assert!(start > first_id, "zone of {lone} starts at {start}");
        let again = q.take_due(now + Duration::from_secs(61), 10).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].recipient.id, lone);
    }

    /// `complete` schedules a deferred recipient again before it drops the lease: the other
    /// way round its zone would be empty for a moment, and merged with its empty
    /// neighbours, so that the whole merged range would be read when it comes due.
    #[test]
    fn a_deferred_recipient_keeps_its_zone_apart() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let n = 3 * schedule::ZONE_SIZE as usize;
        enqueue_n(&q, n);
        let now = SystemTime::now() + Duration::from_secs(1);
        let ids = taken(&q, now, n);
        assert_eq!(ids.len(), n);
        assert_eq!(lock(&q.shared.sched).zones(), 3);
        let lone = ids[n / 2];
        let delivered = |id| {
            (
                id,
                Outcome::Delivered {
                    reply: "250 ok".into(),
                },
            )
        };
        let others = ids
            .iter()
            .filter(|&&id| id != lone)
            .map(|&id| delivered(id));
        for r in q.complete_batch(others.collect()).unwrap() {
            r.unwrap();
        }
        assert_eq!(lock(&q.shared.sched).zones(), 3, "the lease keeps it apart");
        let deferred = Outcome::Deferred {
            reply: "451 later".into(),
            next_attempt: now + Duration::from_secs(60),
        };
        q.complete(lone, deferred).unwrap();
        assert_eq!(
            lock(&q.shared.sched).zones(),
            3,
            "and then its schedule entry"
        );
        let again = q.take_due(now + Duration::from_secs(61), 10).unwrap();
        assert_eq!(again.len(), 1);
        q.complete(again[0].recipient.id, delivered(lone).1)
            .unwrap();
        assert_eq!(lock(&q.shared.sched).zones(), 1);
    }

    /// With room for 8 zones, a queue of 40 zones' worth of recipients keeps at most 8
    /// (coarser ones), at enqueue and when the open rebuilds them; every recipient is still
    /// taken once, and the deferred ones again when due, after a reopen too.
    #[test]
    fn a_queue_deeper_than_the_schedule_memory_keeps_its_zones_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || QueueOptions {
            schedule_memory_bytes: 8 * schedule::ZONE_BYTES,
            ..QueueOptions::default()
        };
        let q = Queue::open(dir.path(), opts()).unwrap();
        let n = 40 * schedule::ZONE_SIZE as usize;
        for _ in 0..8 {
            enqueue_n(&q, n / 8);
            assert!(lock(&q.shared.sched).zones() <= 8);
        }
        let now = SystemTime::now() + Duration::from_secs(1);
        let ids = taken(&q, now, 2 * n);
        assert_eq!(ids.len(), n);
        assert!(taken(&q, now, 10).is_empty());
        let later = now + Duration::from_secs(60);
        let (deferred, delivered): (Vec<RecipientId>, Vec<RecipientId>) =
            ids.iter().partition(|id| id.message.0 % 7 == 3);
        complete_all(&q, &ids, |id| deferred.contains(&id).then_some(later));
        assert!(!delivered.is_empty());
        drop(q);
        let q = Queue::open(dir.path(), opts()).unwrap();
        assert!(lock(&q.shared.sched).zones() <= 8);
        assert!(taken(&q, now, 10).is_empty(), "not due yet");
        let again = taken(&q, later + Duration::from_secs(1), 2 * n);
        assert_eq!(again, deferred);
        complete_all(&q, &again, |_| None);
        assert_eq!(lock(&q.shared.sched).zones(), 1, "drained: one zone");
    }

    /// Message `id`'s stored metadata, from its pack.
    fn stored_meta(db: &sled::Db, id: MessageId) -> Meta {
        codec::decode_meta(&db_meta(Path::new("test"), db, id).unwrap().unwrap()).unwrap()
    }

    /// The messages in the idempotency index's runs, in order.
    fn idem_ids(q: &Queue) -> Vec<MessageId> {
        let idem = lock(&q.shared.idem);
        let mut ids: Vec<MessageId> = idem
            .runs
            .iter()
            .flat_map(|r| r.entries().map(|e| MessageId(e.unwrap().1)))
            .collect();
        ids.sort();
        ids
    }

    /// Writes message `id`'s metadata `v` into its pack, in sled directly.
    fn store_meta(db: &sled::Db, id: MessageId, v: &[u8]) {
        let mut batch = sled::Batch::default();
        repack(Path::new("test"), db, [(id, Some(v))], |k, v| {
            batch.insert(k, v.unwrap())
        })
        .unwrap();
        db.apply_batch(batch).unwrap();
    }

    /// The stored record of `rid`, wherever it is (metadata or `r` key), without the lease
    /// overlay.
    fn stored_record(db: &sled::Db, rid: RecipientId) -> RecipientRecord {
        let meta = stored_meta(db, rid.message);
        match codec::inline_record(rid.message, &meta).unwrap() {
            Some(rec) if rid.index == 0 => rec,
            _ => {
                codec::decode_record(rid, &db.get(codec::rcpt_key(rid)).unwrap().unwrap()).unwrap()
            }
        }
    }

    /// Moves the record of a one-recipient message out of its metadata to an `r` key, as
    /// stores of schema versions 1 and 2 have it, with `state`.
    fn to_record_key(db: &sled::Db, rid: RecipientId, state: RecipientState) {
        let mut meta = stored_meta(db, rid.message);
        let mut rec = codec::decode_record(rid, &meta.record.take().unwrap()).unwrap();
        rec.state = state;
        db.insert(codec::rcpt_key(rid), codec::encode_record(&rec))
            .unwrap();
        store_meta(db, rid.message, &codec::encode_meta(&meta));
    }

    /// A message of one recipient is stored as one key (plus its idempotency key): the
    /// record is in the metadata, through every state change, a reopen and the purge. A
    /// message of several recipients keeps a key per record.
    #[test]
    fn one_recipient_message_keeps_its_record_in_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two);
        {
            let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
            one = q.enqueue(message()).unwrap().id;
            let mut m = message();
            m.recipients.push("b@two.test".into());
            two = q.enqueue(m).unwrap().id;
            let db = q.shared.db();
            let r_keys: Vec<RecipientId> = db
                .scan_prefix([codec::P_RCPT])
                .map(|kv| codec::rid_from(&kv.unwrap().0[1..]).unwrap())
                .collect();
            assert!(r_keys.iter().all(|r| r.message == two), "{r_keys:?}");
            assert_eq!(r_keys.len(), 2);
            let meta = |id| stored_meta(&db, id);
            assert!(meta(one).record.is_some());
            assert!(meta(two).record.is_none());

            let now = SystemTime::now() + Duration::from_secs(1);
            let later = now + Duration::from_secs(60);
            // Takes all three recipients due at `at` and completes each with `outcome`.
            let take_and_complete = |at: SystemTime, outcome: Outcome| {
                let leases = q.take_due(at, 10).unwrap();
                assert_eq!(leases.len(), 3);
                for l in &leases {
                    q.complete(l.recipient.id, outcome.clone()).unwrap();
                }
            };
            take_and_complete(
                now,
                Outcome::Deferred {
                    reply: "451 4.7.1 later".into(),
                    next_attempt: later,
                },
            );
            let rid = RecipientId {
                message: one,
                index: 0,
            };
            let rec = stored_record(&db, rid);
            assert_eq!(
                (rec.state, rec.attempts, to_millis(rec.next_attempt)),
                (RecipientState::Scheduled, 1, to_millis(later))
            );
            assert!(db.get(codec::rcpt_key(rid)).unwrap().is_none());
            take_and_complete(
                later,
                Outcome::Delivered {
                    reply: "250 ok".into(),
                },
            );
            assert_eq!(meta(one).pending, 0);
            assert_eq!(
                meta(one).body,
                Body::Chunks,
                "body gone with the last pending"
            );
        }
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let info = q.message(one).unwrap().unwrap();
        assert_eq!(info.recipients.len(), 1);
        let rec = &info.recipients[0];
        assert_eq!((rec.state, rec.attempts), (RecipientState::Delivered, 2));
        assert_eq!(rec.last_reply.as_deref(), Some("250 ok"));
        assert_eq!(rec.address, "a@one.test");
        assert_eq!(q.message(two).unwrap().unwrap().recipients.len(), 2);
        let listed = q.list(Some(RecipientState::Delivered), 10).unwrap();
        assert_eq!(
            listed.iter().map(|r| r.id.message).collect::<Vec<_>>(),
            vec![one, two, two]
        );
        assert_eq!(q.list(None, 2).unwrap().len(), 2, "limit");
        assert_eq!(q.stats().by_state.get(&RecipientState::Delivered), Some(&3));
        assert_eq!(
            q.purge_final(SystemTime::now() + Duration::from_secs(1))
                .unwrap(),
            3
        );
        assert!(q.message(one).unwrap().is_none());
        assert!(q.shared.db().scan_prefix([codec::P_PACK]).next().is_none());
        assert_eq!(q.stats().by_state.get(&RecipientState::Delivered), None);
    }

    /// Versions before the in-memory schedule (schema version 1) wrote the schedule under `s`
    /// and leases into the records, and versions before schema 3 kept every record under its
    /// own key. Open drops the schedule, turns leases back into scheduled recipients, due as
    /// before, marks the store version 3, and works with such a record as it is.
    #[test]
    fn on_disk_schedule_and_leases_of_older_stores_are_upgraded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let rid;
        let due;
        {
            let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
            let e = q.enqueue(message()).unwrap();
            rid = RecipientId {
                message: e.id,
                index: 0,
            };
            let db = q.shared.db();
            let rec = stored_record(&db, rid);
            assert_eq!(rec.state, RecipientState::Scheduled);
            due = to_millis(rec.next_attempt);
            to_record_key(&db, rid, RecipientState::Leased);
            let mut old_sched = codec::final_key(due, rid);
            old_sched[0] = codec::P_SCHED;
            db.insert(old_sched, &to_millis(rec.created).to_be_bytes())
                .unwrap();
            db.insert(codec::version_key(), codec::SCHEMA_VERSION_1)
                .unwrap();
            q.flush().unwrap();
        }
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        assert!(
            q.shared.db().scan_prefix([codec::P_SCHED]).next().is_none(),
            "old schedule entries removed"
        );
        assert_eq!(
            q.shared.db().get(codec::version_key()).unwrap().as_deref(),
            Some(codec::SCHEMA_VERSION),
            "upgraded: a binary that knows only version 1 now refuses the store"
        );
        let info = q.message(rid.message).unwrap().unwrap();
        assert_eq!(info.recipients[0].state, RecipientState::Scheduled);
        assert_eq!(q.stats().oldest_due, Some(from_millis(due)));
        let leases = q
            .take_due(SystemTime::now() + Duration::from_secs(1), 10)
            .unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].recipient.id, rid);
        q.complete(
            rid,
            Outcome::Bounced {
                reply: "550 5.1.1 unknown".into(),
            },
        )
        .unwrap();
        let rec = stored_record(&q.shared.db(), rid);
        assert_eq!((rec.state, rec.attempts), (RecipientState::Bounced, 1));
        assert!(q.shared.db().get(codec::rcpt_key(rid)).unwrap().is_some());
        assert_eq!(
            q.purge_final(SystemTime::now() + Duration::from_secs(1))
                .unwrap(),
            1
        );
        assert!(q.shared.db().scan_prefix([codec::P_RCPT]).next().is_none());
        assert!(q.message(rid.message).unwrap().is_none());
    }

    /// Marks `q`'s store as schema `version`, closes it, reopens it and checks that the open
    /// upgraded it to the current version.
    fn reopen_as_upgraded_from(q: Queue, dir: &Path, version: &[u8]) -> Queue {
        let db = q.shared.db();
        // Versions before 7 had no stored idempotency index.
        for item in db.scan_prefix([codec::P_IDEM_INDEX]) {
            db.remove(item.unwrap().0).unwrap();
        }
        db.remove(codec::IDEM_SEED_KEY).unwrap();
        db.insert(codec::version_key(), version).unwrap();
        drop(db);
        q.flush().unwrap();
        drop(q);
        let q = Queue::open(dir, QueueOptions::default()).unwrap();
        assert_eq!(
            q.shared.db().get(codec::version_key()).unwrap().as_deref(),
            Some(codec::SCHEMA_VERSION),
            "upgraded"
        );
        q
    }

    /// A schema-5 store (a metadata key per message) opens, and its messages move into packs
    /// with nothing lost: scheduled ones are taken, final ones stay listed, an idempotency key
    /// still finds its message, and a new message is taken with the old ones.
    #[test]
    fn schema_5_store_moves_its_metadata_into_packs() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        // 40 messages: three packs, the last part-full.
        for i in 0..40 {
            let mut m = message();
            m.idempotency_key = Some(format!("esp-{i}"));
            if i == 7 {
                m.recipients.push("b@two.test".into());
            }
            q.enqueue(m).unwrap();
        }
        let first = taken(&q, SystemTime::now() + Duration::from_secs(1), 5);
        let reply = || "250 ok".to_string();
        let done = first
            .iter()
            .map(|&id| (id, Outcome::Delivered { reply: reply() }));
        q.complete_batch(done.collect()).unwrap();
        // The metadata as version 5 stored it: one `m` key per message, no packs.
        let db = q.shared.db();
        let mut metas = 0;
        for item in db.scan_prefix([codec::P_PACK]) {
            let (k, v) = item.unwrap();
            for (id, meta) in read_pack(Path::new("test"), &k, &v).unwrap() {
                db.insert(codec::meta_key(id), meta).unwrap();
                metas += 1;
            }
            db.remove(k).unwrap();
        }
        assert_eq!(metas, 40);
        drop(db);
        let q = reopen_as_upgraded_from(q, dir.path(), codec::SCHEMA_VERSION_5);
        let db = q.shared.db();
        assert!(db.scan_prefix([codec::P_META]).next().is_none(), "moved");
        assert_eq!(db.scan_prefix([codec::P_PACK]).count(), 3);
        let stats = q.stats();
        assert_eq!(stats.by_state.get(&RecipientState::Delivered), Some(&5));
        assert_eq!(stats.by_state.get(&RecipientState::Scheduled), Some(&36));
        let mut again = message();
        again.idempotency_key = Some("esp-39".into());
        let dup = q.enqueue(again).unwrap();
        assert!(dup.duplicate);
        q.enqueue(message()).unwrap();
        let rest = taken(&q, SystemTime::now() + Duration::from_secs(1), 100);
        assert_eq!(rest.len(), 37);
        assert!(rest.iter().all(|r| !first.contains(r)));
        assert_eq!(
            q.message(dup.id)
                .unwrap()
                .unwrap()
                .idempotency_key
                .as_deref(),
            Some("esp-39")
        );
    }

    /// A schema-2 store (every record under its own key) opens, is marked version 3, and its
    /// records are read and changed where they are.
    #[test]
    fn schema_2_store_is_upgraded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let rid = RecipientId {
            message: q.enqueue(message()).unwrap().id,
            index: 0,
        };
        to_record_key(&q.shared.db(), rid, RecipientState::Scheduled);
        let q = reopen_as_upgraded_from(q, dir.path(), codec::SCHEMA_VERSION_2);
        let leases = q
            .take_due(SystemTime::now() + Duration::from_secs(1), 10)
            .unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].recipient.address, "a@one.test");
        q.complete(
            rid,
            Outcome::Delivered {
                reply: "250 ok".into(),
            },
        )
        .unwrap();
        assert_eq!(
            q.message(rid.message).unwrap().unwrap().recipients[0].state,
            RecipientState::Delivered
        );
        assert_eq!(
            stored_record(&q.shared.db(), rid).state,
            RecipientState::Delivered
        );
    }

    fn delivered(q: &Queue, key: Option<&str>) -> MessageId {
        let mut m = message();
        m.idempotency_key = key.map(str::to_string);
        let id = q.enqueue(m).unwrap().id;
        let rid = RecipientId {
            message: id,
            index: 0,
        };
        let l = q
            .take_due(SystemTime::now() + Duration::from_secs(1), 10)
            .unwrap();
        assert_eq!(l.len(), 1);
        let reply = "250 ok".to_string();
        q.complete(rid, Outcome::Delivered { reply }).unwrap();
        id
    }

    /// A purge that fails part-way commits nothing, and forgets none of the idempotency keys
    /// of the messages it had got to: they are still stored, so a retried enqueue is still
    /// a duplicate.
    #[test]
    fn a_failed_purge_keeps_the_idempotency_keys_of_what_it_did_not_remove() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let first = delivered(&q, Some("order-1"));
        std::thread::sleep(Duration::from_millis(5));
        let second = delivered(&q, None);
        // The second message's metadata becomes unreadable: the purge reaches it after the
        // first's (final later) and fails there.
        store_meta(&q.shared.db(), second, b"garbage");
        assert!(q
            .purge_final(SystemTime::now() + Duration::from_secs(1))
            .is_err());
        assert!(q.message(first).unwrap().is_some(), "nothing purged");
        let mut m = message();
        m.idempotency_key = Some("order-1".into());
        let again = q.enqueue(m).unwrap();
        assert!(again.duplicate, "key forgotten by the failed purge");
        assert_eq!(again.id, first);
    }

    /// A group commit whose sled batch fails leaves nothing behind, on disk or in memory:
    /// a failed enqueue is not in the schedule, the counters or the idempotency index (its
    /// retry is stored as new), and a failed outcome leaves its recipient leased as before,
    /// so that recording it again works.
    #[test]
    fn a_failed_group_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let mut m1 = message();
        m1.idempotency_key = Some("order-1".into());
        let first = q.enqueue(m1.clone()).unwrap();
        let before = q.stats();
        let sched_before = lock(&q.shared.sched).snapshot();

        let mut m2 = message();
        m2.idempotency_key = Some("order-2".into());
        m2.recipients = vec!["b@two.test".into(), "c@two.test".into()];
        q.shared.fail_commits.store(1, Ordering::Release);
        assert!(matches!(q.enqueue(m2.clone()), Err(QueueError::Sled(_))));
        assert_eq!(
            lock(&q.shared.sched).snapshot(),
            sched_before,
            "schedule changes undone"
        );
        assert_eq!(idem_memory_ids(&q), vec![first.id], "key undone");
        let after = q.stats();
        assert_eq!(after.by_state, before.by_state, "counters");
        assert_eq!(after.by_destination, before.by_destination);
        let leases = q
            .take_due(SystemTime::now() + Duration::from_secs(1), 10)
            .unwrap();
        assert_eq!(leases.len(), 1, "only the first message is scheduled");
        let rid = leases[0].recipient.id;
        assert_eq!(rid.message, first.id);
        let retried = q.enqueue(m2).unwrap();
        assert!(!retried.duplicate, "the failed enqueue's key was not kept");
        assert!(q.enqueue(m1).unwrap().duplicate);

        q.shared.fail_commits.store(1, Ordering::Release);
        let delivered = || Outcome::Delivered {
            reply: "250 ok".into(),
        };
        assert!(matches!(
            q.complete_batch(vec![(rid, delivered())]),
            Err(QueueError::Sled(_))
        ));
        assert_eq!(
            stored_record(&q.shared.db(), rid).state,
            RecipientState::Scheduled
        );
        assert!(
            lock(&q.shared.sched).leased_at(rid).is_some(),
            "still leased"
        );
        assert_eq!(q.stats().by_state.get(&RecipientState::Delivered), None);
        assert_eq!(
            q.complete(rid, delivered()).unwrap().state,
            RecipientState::Delivered
        );
        assert!(
            q.body(first.id).unwrap().is_none(),
            "body gone once delivered"
        );
        // Nothing of the failed enqueue shows after a reopen either.
        drop(q);
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        assert_eq!(q.list(None, 100).unwrap().len(), 3);
    }

    /// An index entry left by a deleted message, naming a record that is final at another
    /// time (its id reused after the clock stepped back), does not purge that record early.
    #[test]
    fn a_stale_final_entry_does_not_purge_a_later_record() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let id = delivered(&q, None);
        let rid = RecipientId {
            message: id,
            index: 0,
        };
        q.shared
            .db()
            .insert(codec::final_key(1_000, rid), &[][..])
            .unwrap();
        assert_eq!(
            q.purge_final(SystemTime::now() - Duration::from_secs(60))
                .unwrap(),
            0
        );
        assert!(q.message(id).unwrap().is_some());
        assert_eq!(
            q.purge_final(SystemTime::now() + Duration::from_secs(1))
                .unwrap(),
            1
        );
    }

    /// A schema-3 store (a final-index key per record, with no value) opens, is marked with
    /// the current version, and its final records are purged.
    #[test]
    fn schema_3_store_is_upgraded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut rids = Vec::new();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        for _ in 0..3 {
            q.enqueue(message()).unwrap();
        }
        let done = q
            .take_due(SystemTime::now() + Duration::from_secs(1), 10)
            .unwrap()
            .into_iter()
            .map(|l| {
                rids.push(l.recipient.id);
                let reply = "250 ok".to_string();
                (l.recipient.id, Outcome::Delivered { reply })
            })
            .collect();
        q.complete_batch(done).unwrap();
        // The index as version 3 wrote it.
        let db = q.shared.db();
        for item in db.scan_prefix([codec::P_FINAL]) {
            db.remove(item.unwrap().0).unwrap();
        }
        for &rid in &rids {
            let at = to_millis(stored_record(&db, rid).updated);
            db.insert(codec::final_key(at, rid), &[][..]).unwrap();
        }
        drop(db);
        let q = reopen_as_upgraded_from(q, dir.path(), codec::SCHEMA_VERSION_3);
        assert_eq!(
            q.shared.db().scan_prefix([codec::P_FINAL]).count(),
            3,
            "old keys read as they are"
        );
        assert_eq!(
            q.purge_final(SystemTime::now() + Duration::from_secs(1))
                .unwrap(),
            3
        );
        assert!(rids.iter().all(|r| q.message(r.message).unwrap().is_none()));
    }

    /// A schema-4 store (idempotency keys under `i`) opens, is marked version 5, loses its
    /// `i` keys, and still knows every key: from the messages' metadata.
    #[test]
    fn schema_4_store_is_upgraded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        for key in ["order-1", "order-2"] {
            let mut m = message();
            m.idempotency_key = Some(key.into());
            let id = q.enqueue(m).unwrap().id;
            q.shared
                .db()
                .insert(codec::idem_key(key), &id.0.to_be_bytes())
                .unwrap();
            ids.push(id);
        }
        let q = reopen_as_upgraded_from(q, dir.path(), codec::SCHEMA_VERSION_4);
        assert!(q.shared.db().scan_prefix([codec::P_IDEM]).next().is_none());
        for (key, id) in ["order-1", "order-2"].into_iter().zip(&ids) {
            let mut m = message();
            m.idempotency_key = Some(key.into());
            let e = q.enqueue(m).unwrap();
            assert!(e.duplicate, "{key}");
            assert_eq!(e.id, *id);
        }
        assert_eq!(idem_memory_ids(&q), ids);
    }

    /// A schema-6 store (no stored idempotency index) opens with every key in memory, from
    /// the metadata, and a new hash key stored.
    #[test]
    fn schema_6_store_keeps_its_idempotency_keys_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let mut ids = Vec::new();
        for i in 0..50 {
            let mut m = message();
            m.idempotency_key = Some(format!("esp-{i}"));
            ids.push(q.enqueue(m).unwrap().id);
        }
        q.enqueue(message()).unwrap();
        let q = reopen_as_upgraded_from(q, dir.path(), codec::SCHEMA_VERSION_6);
        let seed = q.shared.db().get(codec::IDEM_SEED_KEY).unwrap().unwrap();
        assert_eq!(seed.len(), IdemHasher::SEED_LEN);
        assert_eq!(lock(&q.shared.idem).len(), 50);
        for (i, id) in ids.iter().enumerate() {
            let mut m = message();
            m.idempotency_key = Some(format!("esp-{i}"));
            let e = q.enqueue(m).unwrap();
            assert!(e.duplicate && e.id == *id, "esp-{i}");
        }
    }

    /// A schema-7 store (its stored keys in sled buckets, no runs) opens with its buckets
    /// and watermark removed and every key in memory, from the metadata; the first merge
    /// then writes a run.
    #[test]
    fn schema_7_store_drops_its_sled_buckets_and_keeps_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let keys: Vec<String> = (0..30).map(|i| format!("esp-{i}")).collect();
        let ids: Vec<MessageId> = keys
            .iter()
            .map(|k| q.enqueue(keyed(k)).unwrap().id)
            .collect();
        let db = q.shared.db();
        for b in [3u16, 0xfff0] {
            db.insert(codec::idem_bucket_key(b), &b"\x01garbage-of-schema-7"[..])
                .unwrap();
        }
        db.insert(codec::IDEM_MERGED_KEY, &ids[20].0.to_be_bytes())
            .unwrap();
        db.insert(codec::version_key(), codec::SCHEMA_VERSION_7)
            .unwrap();
        drop(db);
        q.flush().unwrap();
        drop(q);
        let q = Queue::open(dir.path(), small_idem_memory(40)).unwrap();
        assert_eq!(
            q.shared.db().get(codec::version_key()).unwrap().as_deref(),
            Some(codec::SCHEMA_VERSION)
        );
        let db = q.shared.db();
        assert_eq!(db.scan_prefix([codec::P_IDEM_INDEX]).count(), 0);
        assert_eq!(db.get(codec::IDEM_MERGED_KEY).unwrap(), None);
        assert_eq!(idem_memory_ids(&q), ids, "every key in memory");
        for (k, id) in keys.iter().zip(&ids) {
            let e = q.enqueue(keyed(k)).unwrap();
            assert!(e.duplicate && e.id == *id, "{k}");
        }
        for i in 30..45 {
            q.enqueue(keyed(&format!("esp-{i}"))).unwrap();
        }
        q.flush().unwrap();
        assert!(idem_ids(&q).starts_with(&ids), "merged into a run");
    }

    fn small_idem_memory(keys: u64) -> QueueOptions {
        QueueOptions {
            idempotency_memory_bytes: keys * IDEM_KEY_BYTES,
            ..QueueOptions::default()
        }
    }

    fn keyed(key: &str) -> NewMessage {
        let mut m = message();
        m.idempotency_key = Some(key.into());
        m
    }

    /// The idempotency watermark as sled holds it.
    fn stored_watermark(q: &Queue) -> Option<IVec> {
        q.shared.db().get(codec::IDEM_MERGED_KEY).unwrap()
    }

    /// The keys in memory, in order.
    fn idem_memory_ids(q: &Queue) -> Vec<MessageId> {
        let idem = lock(&q.shared.idem);
        let mut ids: Vec<MessageId> = idem
            .sorted_entries()
            .map(|e| MessageId(e.unwrap().1))
            .collect();
        ids.sort();
        ids
    }

    /// Past `idempotency_memory_bytes` the keys move into runs; every key still finds its
    /// message, before and after a reopen (which puts back into memory only the keys above
    /// the watermark); a deleted message's key finds nothing, and a purge of everything
    /// deletes the runs.
    #[test]
    fn idempotency_keys_move_into_the_store_past_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), small_idem_memory(10)).unwrap();
        let keys: Vec<String> = (0..50).map(|i| format!("esp-{i}")).collect();
        let ids: Vec<MessageId> = keys
            .iter()
            .map(|k| q.enqueue(keyed(k)).unwrap().id)
            .collect();
        // The writer starts a run write after a group's commit, which the reply does not
        // wait for; a flush stores the run being written, and the group it commits starts
        // the next if the memory part grew past its budget meanwhile, which a second flush
        // stores.
        q.flush().unwrap();
        q.flush().unwrap();
        let stored = idem_ids(&q);
        let memory = idem_memory_ids(&q);
        {
            // Merged on another thread as they pile up; a flush waits for that.
            let idem = lock(&q.shared.idem);
            let n = idem.runs.len();
            assert!((1..=3).contains(&n), "{n} runs");
            assert!(idem.runs.windows(2).all(|w| w[1].len * 2 < w[0].len));
            let listed: BTreeSet<PathBuf> = idem.runs.iter().map(|r| r.path.clone()).collect();
            let files: BTreeSet<PathBuf> = std::fs::read_dir(dir.path().join(runs::DIR))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(files, listed, "a merge's inputs are deleted");
        }
        assert!(memory.len() <= 10, "{} keys in memory", memory.len());
        assert!(stored.len() >= 40, "{} keys stored", stored.len());
        let mut all = [stored.clone(), memory.clone()].concat();
        all.sort();
        assert_eq!(all, ids, "each key in one part");
        let merged = lock(&q.shared.idem).merged;
        assert_eq!(
            stored_watermark(&q).as_deref(),
            Some(&merged.to_be_bytes()[..])
        );
        assert!(stored.iter().all(|id| id.0 <= merged) && memory.iter().all(|id| id.0 > merged));
        let check = |q: &Queue| {
            for (k, id) in keys.iter().zip(&ids) {
                let e = q.enqueue(keyed(k)).unwrap();
                assert!(e.duplicate && e.id == *id, "{k}");
            }
        };
        check(&q);
        q.flush().unwrap();
        drop(q);
        let q = Queue::open(dir.path(), small_idem_memory(10)).unwrap();
        assert_eq!(idem_ids(&q), stored);
        assert_eq!(idem_memory_ids(&q), memory, "the keys above the watermark");
        check(&q);

        // A delete leaves the key in its run, pointing at nothing: the retry is a new message.
        assert!(q.delete(ids[0]).unwrap());
        assert!(idem_ids(&q).contains(&ids[0]));
        let again = q.enqueue(keyed(&keys[0])).unwrap();
        assert!(!again.duplicate);

        // A purge of everything empties both parts and deletes the runs.
        loop {
            let leases = q
                .take_due(SystemTime::now() + Duration::from_secs(1), 100)
                .unwrap();
            if leases.is_empty() {
                break;
            }
            for l in leases {
                let reply = "250 ok".to_string();
                q.complete(l.recipient.id, Outcome::Delivered { reply })
                    .unwrap();
            }
        }
        q.purge_final(SystemTime::now() + Duration::from_secs(1))
            .unwrap();
        assert!(q.list(None, 10).unwrap().is_empty());
        assert!(idem_ids(&q).is_empty());
        assert!(idem_memory_ids(&q).is_empty());
        let files = std::fs::read_dir(dir.path().join(runs::DIR))
            .unwrap()
            .count();
        assert_eq!(files, 0, "run files deleted");
    }

    /// While the memory part is written as a run on another thread, its keys are still
    /// found, new keys go into a new memory part, and a delete of a frozen key leaves it
    /// pointing at nothing; once the run is stored, the watermark is its last id, and the
    /// keys are found in it.
    #[test]
    fn keys_are_found_while_their_run_is_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), small_idem_memory(10)).unwrap();
        /// Holds run writes until dropped, so that a failed assertion ends the test rather
        /// than leaving the writer's exit waiting for a held write.
        struct Hold(Arc<Shared>);
        impl Drop for Hold {
            fn drop(&mut self) {
                let (held, cv) = &self.0.hold_run_writes;
                *lock(held) = false;
                cv.notify_all();
            }
        }
        *lock(&q.shared.hold_run_writes.0) = true;
        let hold = Hold(Arc::clone(&q.shared));
        let keys: Vec<String> = (0..11).map(|i| format!("esp-{i}")).collect();
        let ids: Vec<MessageId> = keys
            .iter()
            .map(|k| q.enqueue(keyed(k)).unwrap().id)
            .collect();
        // The next request is handled after the write started (see the test above).
        let extra = q.enqueue(keyed("esp-new")).unwrap().id;
        {
            let idem = lock(&q.shared.idem);
            let frozen = idem.frozen().expect("a run being written");
            assert_eq!((frozen.len(), frozen.hi), (11, ids[10].0));
            assert_eq!((idem.len(), idem.runs.len(), idem.merged), (1, 0, 0));
        }
        for (k, id) in keys.iter().zip(&ids) {
            let e = q.enqueue(keyed(k)).unwrap();
            assert!(e.duplicate && e.id == *id, "{k} while frozen");
        }
        assert!(q.delete(ids[3]).unwrap());
        assert!(
            !q.enqueue(keyed(&keys[3])).unwrap().duplicate,
            "points at nothing"
        );
        assert!(
            lock(&q.shared.idem).frozen().is_some(),
            "still being written"
        );
        drop(hold);
        q.flush().unwrap();
        {
            let idem = lock(&q.shared.idem);
            assert!(idem.frozen().is_none());
            assert_eq!((idem.runs.len(), idem.merged), (1, ids[10].0));
        }
        assert_eq!(
            stored_watermark(&q).as_deref(),
            Some(&ids[10].0.to_be_bytes()[..])
        );
        assert_eq!(idem_ids(&q), ids, "the frozen keys, the deleted one's too");
        for (k, id) in keys.iter().zip(&ids).filter(|(_, id)| **id != ids[3]) {
            let e = q.enqueue(keyed(k)).unwrap();
            assert!(e.duplicate && e.id == *id, "{k} from the run");
        }
        let e = q.enqueue(keyed("esp-new")).unwrap();
        assert!(e.duplicate && e.id == extra);
    }

    /// A damaged run of the idempotency index, or a hash key or watermark of the wrong
    /// length, is a clear error naming the file or store and where: an enqueue whose key
    /// falls in the damaged block fails (nothing stored), others go on; the open refuses
    /// them.
    #[test]
    fn a_damaged_idempotency_index_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), small_idem_memory(0)).unwrap();
        q.enqueue(keyed("order-0")).unwrap();
        q.flush().unwrap(); // after the merge
        let run = lock(&q.shared.idem).runs[0].path.clone();
        runs::open_for_damage(&run)
            .write_all_at(&[0xff], 20)
            .unwrap();
        let is_damaged_run = |e: QueueError| match e {
            QueueError::Corrupt { path, key, detail } => {
                assert_eq!((path, key.as_str()), (run.clone(), "block 0"));
                assert!(detail.contains("checksum"), "{detail}");
            }
            other => panic!("not the damaged run: {other:?}"),
        };
        // The block that would hold the key is read, and found damaged.
        is_damaged_run(q.enqueue(keyed("order-0")).unwrap_err());
        assert_eq!(q.list(None, 10).unwrap().len(), 1, "nothing stored");
        assert!(!q.enqueue(message()).unwrap().duplicate);
        q.flush().unwrap();
        drop(q);
        match Queue::open(dir.path(), QueueOptions::default()) {
            Err(e) => is_damaged_run(e),
            Ok(_) => panic!("open with a damaged run succeeded"),
        }

        for (key, value, says) in [
            (codec::IDEM_MERGED_KEY, &[1u8; 3][..], "3 bytes"),
            (codec::IDEM_SEED_KEY, &[1u8; 15][..], "15 bytes"),
        ] {
            {
                let db = sled::open(gen_dir(dir.path(), 0)).unwrap();
                db.insert(key, value).unwrap();
                db.flush().unwrap();
            }
            match Queue::open(dir.path(), QueueOptions::default()) {
                Err(QueueError::Corrupt { path, detail, .. }) => {
                    assert_eq!(path, dir.path());
                    assert!(detail.contains(says), "{detail}");
                }
                Err(e) => panic!("open with a bad {key:?}: {e}"),
                Ok(_) => panic!("open with a bad {key:?} succeeded"),
            }
        }
    }

    /// A message that recovery removes (its body was cut short by a crash) is not found by
    /// its key any more, though its entry stays in its run; the other one still is.
    #[test]
    fn a_message_removed_at_open_is_not_found_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), small_idem_memory(0)).unwrap();
        let kept = q.enqueue(keyed("kept")).unwrap().id;
        let mut cut = keyed("cut");
        cut.body = vec![b'x'; 10_000];
        let cut_id = q.enqueue(cut.clone()).unwrap().id;
        // The first flush stores the run of "kept" (its write started after its group), and
        // its own group's commit starts writing "cut", which the second stores.
        q.flush().unwrap();
        q.flush().unwrap();
        assert_eq!(idem_ids(&q), vec![kept, cut_id]);
        drop(q);
        let seg_dir = dir.path().join(segments::DIR);
        for e in std::fs::read_dir(&seg_dir).unwrap() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(e.unwrap().path())
                .unwrap();
            f.set_len(5_000).unwrap();
        }
        let q = Queue::open(dir.path(), small_idem_memory(0)).unwrap();
        assert!(q.message(cut_id).unwrap().is_none(), "removed at open");
        assert_eq!(idem_ids(&q), vec![kept, cut_id], "a stale entry");
        let again = q.enqueue(cut).unwrap();
        assert!(!again.duplicate, "stored anew");
        let kept_again = q.enqueue(keyed("kept")).unwrap();
        assert!(kept_again.duplicate && kept_again.id == kept);
    }

    /// A store written by a newer version than this one knows is refused, naming the path
    /// and the version, rather than read wrongly.
    #[test]
    fn unknown_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
            q.shared
                .db()
                .insert(codec::version_key(), b"bulksend-queue/9".as_slice())
                .unwrap();
            q.flush().unwrap();
        }
        let err = Queue::open(dir.path(), QueueOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bulksend-queue/9"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }

    /// A lease is in memory only; deleting its message drops it, and completing it then
    /// finds nothing.
    #[test]
    fn lease_is_not_stored_and_goes_with_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path(), QueueOptions::default()).unwrap();
        let e = q.enqueue(message()).unwrap();
        let leases = q
            .take_due(SystemTime::now() + Duration::from_secs(1), 10)
            .unwrap();
        let rid = leases[0].recipient.id;
        assert_eq!(
            stored_record(&q.shared.db(), rid).state,
            RecipientState::Scheduled,
            "on disk a leased recipient reads scheduled"
        );
        assert_eq!(
            q.message(e.id).unwrap().unwrap().recipients[0].state,
            RecipientState::Leased
        );
        assert_eq!(q.list(Some(RecipientState::Leased), 10).unwrap().len(), 1);
        assert!(q.delete(e.id).unwrap());
        assert_eq!(q.stats().by_state.get(&RecipientState::Leased), None);
        assert!(lock(&q.shared.sched).leased_at(rid).is_none());
        assert!(matches!(
            q.complete(
                rid,
                Outcome::Delivered {
                    reply: "250 ok".into()
                }
            ),
            Err(QueueError::NotFound(_))
        ));
    }
}
