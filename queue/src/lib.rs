//! bulksend's persistent spool, on sled 0.34.7.
//!
//! # What it owns
//!
//! * message bodies, stored **once** per message however many recipients it has, deleted as
//!   soon as the last recipient is final;
//! * one delivery record per recipient ([`RecipientRecord`]) with its [`RecipientState`]:
//!   `Scheduled` → `Leased` (in flight) → `Delivered` / `Bounced` / `Expired` / `Suppressed`
//!   / `Unknown` (final), or back to `Scheduled` (deferred, released);
//! * the schedule (which zones of recipients are due when) and the leases, in memory: both
//!   are rebuilt from the records at open (see "Schedule and leases" below);
//! * the suppression list (addresses, lowercased);
//! * idempotency keys (a retried enqueue returns the first message's id): each is stored in
//!   its message's metadata; the index from key to message holds the newest keys in memory
//!   (~13 bytes each, up to `QueueOptions::idempotency_memory_bytes`), and moves them in
//!   bulk into sorted run files in `idem/` past that (`idem.rs`, `runs.rs`);
//! * crash recovery: on [`Queue::open`] leases of a dead process return to `Scheduled`; in a
//!   running process, a lease neither completed nor renewed ([`Queue::renew_leases`]) within
//!   `QueueOptions::lease_timeout` returns at the next [`Queue::take_due`].
//!
//! Callers (the engine, the CLI) see only [`Queue`] and plain value types; sled stays behind
//! this interface so another store can be swapped in.
//!
//! # Layout
//!
//! Everything lives in sled's default tree, one key prefix per logical table, so that one
//! sled `Batch` — atomic also across a crash, but limited to one tree — covers every write of
//! a group of requests (a message's metadata, body, records and idempotency key land
//! together or not at all). Integers in keys are big-endian so byte order is numeric order.
//!
//! | key | value |
//! |---|---|
//! | `v` | schema version |
//! | `m` id | message metadata (stores before schema 6; the writer still names metadata by this key in memory): created, size, sender, idempotency key, recipient counts, and the body itself when it is at most 256 bytes, else where it is in a segment file |
//! | `b` id chunk | a body over 4 KiB in 4 KiB chunks: stores written before segment files existed (still read, no longer written) |
//! | `r` id index | recipient record (compact binary, format byte first) |
//! | `s` due_ms id index | the schedule of stores written before it moved into memory: removed on open |
//! | `f` final_ms id index | final records by the time they became final, for purging: the key names the first record of a group commit that became final at that time, the value lists the others (12 bytes each, at most 63; empty in stores before schema 4) |
//! | `M` id/16 | message metadata, 16 messages to a key (schema 6; `m` keys of older stores are moved into packs at open) |
//! | `I` bucket | the idempotency index's stored part in schema 7 (65,536 buckets of (32-bit hash tag, message id)): removed on open, the keys are now in run files (`idem/`, see `runs.rs`) |
//! | `k` | the idempotency index's hash key (128 random bits) |
//! | `j` | the idempotency index's watermark: keys of messages up to this id are in the run files, the newer ones in memory (rebuilt at open from the metadata) |
//! | `i` key | idempotency key → message id: stores before schema 5, removed at open |
//! | `x` address | suppression: reason and time |
//!
//! Bodies over 256 bytes are not in sled: they are appended to *segment files*
//! `bodies/NNN.seg` (at most 32 MiB each) and referenced by (segment, offset, CRC-32). sled's
//! cost is per key and grows with the bytes it logs, caches and cleans: a 20 KB body in 4 KiB
//! chunks cost more than the rest of its message, and sled kept rewriting and compacting it.
//! A segment file is deleted as a whole once no message with a
//! pending recipient refers to it (after the sync that made that durable). See
//! `segments.rs` for the order of writes and syncs, and how opening the queue removes a
//! message whose body a power cut cut short (never acknowledged). The few bodies still
//! pending in a mostly empty segment (≥ 1 MiB, ≤ ¼ live) are moved to the current one, so
//! deferred messages do not pin old segments.
//!
//! Message ids are unique and ordered by age: each open starts above `unix_millis << 20` and
//! every id still stored, then counts up by one, so that messages enqueued together share
//! metadata packs (see `codec::PACK`) however slowly they come. Times are stored with
//! millisecond precision.
//!
//! # Durability and group commit
//!
//! All mutations go through one *writer* thread fed by a bounded crossbeam channel. It takes
//! every request that has arrived, handles them in order against one pending write set (each
//! request with a savepoint, so a request that fails is rolled back alone) and applies the
//! whole group as **one** sled `Batch` — one per group, not per request, because sled 0.34.7
//! writes out its log buffer before and after every batch. It then hands the replies to a
//! *syncer* thread. The syncer takes every reply that has accumulated, `fdatasync`s the body
//! segments written since its last sync, calls `db.flush()` once, then — because sled 0.34.7's flush only uses `sync_file_range`, which flushes neither
//! the device cache nor the file's metadata — `fdatasync`s sled's `db` file (and any file in
//! `blobs/`, which sled writes without syncing), and only then answers all of
//! them. While the syncer syncs, the writer applies the next requests, so the cost of one
//! flush is shared by every concurrent caller: throughput grows with concurrency. A group
//! holding nothing but outcomes recorded through [`Queue::complete_batch_async`] (the
//! engine's) and takes may stay open up to [`QueueOptions::outcome_commit_delay`] (3 ms) for
//! more to share its sync, when the group before had at least
//! [`QueueOptions::outcome_commit_siblings`] (4) such outcomes; any other request commits it
//! at once.
//! [`Queue::enqueue`], [`Queue::complete`], suppression changes, retry, delete and expiry
//! return only after that sync; so do the async [`Queue::enqueue_async`] and
//! [`Queue::enqueue_batch_async`] (the HTTP API's), whose callers wait as tasks, not threads.
//! With [`QueueOptions::durable`] `= false` the fdatasync is skipped: acknowledged data then
//! survives a process crash (it is in the page cache) but not necessarily a power loss.
//!
//! # Schedule and leases
//!
//! Which recipients are due when, and which are leased, is kept in memory (`schedule.rs`),
//! not in sled. The records are the truth: a `Scheduled` record has its `next_attempt`, and
//! open rebuilds the schedule from them during the scan of every record that recovery does
//! anyway. A lease is never written: on disk a leased recipient still reads `Scheduled`, which
//! is what a crash must return it to. This takes three of the nine sled writes a delivered
//! recipient used to cost (the schedule entry written at enqueue and removed at the lease, and
//! the record rewritten for the lease). The schedule holds no entry per queued recipient:
//! it keeps, per zone of ~64 consecutive recipient ids, a lower bound of their due times, and finds what is due by reading the records of the zones whose bound
//! is due (a range scan of their metadata in sled); see `schedule.rs`.
//!
//! Reads ([`Queue::message`], [`Queue::list`]) show the lease: they combine sled's committed
//! records with the in-memory leases, which the writer changes while it handles a group,
//! before the group's sled batch, so for that moment a read can show a lease as already taken
//! or already released.
//!
//! Leases ([`Queue::take_due`]) are not synced (there is nothing to sync), but their reply
//! waits behind any sync in progress, so a lease is never handed out for a message whose
//! enqueue is not yet durable.
//! If a flush or fsync fails the queue refuses all further writes ([`QueueError::Closed`]):
//! after a failed fsync the state of the unsynced writes is unknown.
//!
//! Because every group is one atomic batch, a crash cannot leave half a message behind;
//! recovery still removes records without a message and messages without records or body,
//! should any appear.
//!
//! # Duplicate-delivery window
//!
//! A recipient can be delivered twice only if the process dies after the receiving server
//! answered 250 to the final dot and before [`Queue::complete`] returned: the lease is then
//! undone on restart and the recipient sent again. Nothing can close that window on the
//! sender's side (RFC 5321 §6.1); it is as short as one group commit. A timeout waiting for
//! that reply is recorded as `Unknown` (final), never retried.
//!
//! # Expiry and retention
//!
//! A deferral past `created + max_queue_lifetime` is recorded as `Expired` directly, so a
//! scheduled recipient's `next_attempt` never exceeds its deadline, and [`Queue::expire_due`]
//! only reads the zones whose bound is due and created long enough ago. Final records are
//! purged by the writer thread (every minute, in chunks) once older than
//! [`QueueOptions::final_retention`], or on demand with [`Queue::purge_final`].
//!
//! # Space: compaction into a new generation
//!
//! sled reuses freed log space but never shrinks its file, and a drain first *grows* it (new
//! record versions, tombstones). So the store can be rewritten: [`Queue::compact`] copies every
//! live key into a fresh sled directory `gen-NNNNNN` inside the queue directory, flushes and
//! fdatasyncs it, then atomically replaces the `CURRENT` file (write, fsync, rename, fsync the
//! directory) and removes the old generation. Until the rename the old store is the queue (an
//! interrupted compaction's directory is removed on open); after it the new one is complete.
//! [`Queue::compact`] does it on the writer thread (no write happens meanwhile). On its own
//! ([`QueueOptions::auto_compact`]) the queue compacts in the background: when sled's files
//! are at least [`QueueOptions::compact_min_disk_bytes`] and four times the estimated live
//! data, that live data is at most [`QueueOptions::compact_max_live_bytes`] (so it happens
//! near the end of a drain, not in the middle of a big one), and the files have doubled since
//! the last compaction (or the live data shrank to a quarter),
//! a thread copies the store while the writer
//! goes on noting every key it commits; when the copy is done the writer brings those keys up
//! to date from the old store (writes held only for that catch-up), syncs and switches. A
//! compaction that sees more than two million writes during its copy is abandoned (retried
//! ten minutes later). A store
//! without `CURRENT` keeps sled's files in the queue directory itself (generation 0: stores
//! made before compaction existed open unchanged). A `LOCK` file (flock) in the queue
//! directory keeps a second process out of every generation. Figures in BENCHMARKS.md
//! ("Queue").

mod codec;
mod error;
mod filter;
mod idem;
mod runs;
mod schedule;
mod segments;
mod store;
mod types;

/// Locks a mutex, also after a panic elsewhere poisoned it (the data is still consistent:
/// every critical section here is a plain update).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub use error::QueueError;
pub use store::{Compaction, Queue};
pub use types::{
    Completed, Enqueued, Lease, MessageId, MessageInfo, NewMessage, Outcome, QueueOptions,
    RecipientId, RecipientRecord, RecipientState, Stats, Suppression,
};
