//! Public value types: ids, records, options, outcomes, statistics.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::QueueError;

/// Tuning and retention knobs for [`crate::Queue::open`].
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// sled's page cache size. This, not the queue depth, bounds the resident memory
    /// (plus sled's own overhead, see BENCHMARKS.md). Default 64 MiB.
    pub cache_capacity_bytes: u64,
    /// A recipient not delivered within this time after enqueue expires. Default 5 days.
    pub max_queue_lifetime: Duration,
    /// Final records are kept this long (for status queries) and then purged automatically
    /// by the writer thread. Default 7 days.
    pub final_retention: Duration,
    /// `true` (default): `fdatasync` sled's files after every group flush, so an acknowledged
    /// write survives power loss. `false`: sled's `flush()` only, which survives a process
    /// crash (the data is in the OS page cache) but not necessarily a power loss.
    pub durable: bool,
    /// Compact on its own (see [`crate::Queue::compact`]): in the background, when sled's files
    /// are at least `compact_min_disk_bytes` and four times the estimated live data, and have
    /// doubled since the previous compaction (or the live data shrank to a quarter).
    /// Default `true`.
    pub auto_compact: bool,
    /// Default 16 MiB (with bodies in segment files sled's own files are small: a drained
    /// 50k-message store left 60 MiB behind under a 64 MiB floor).
    pub compact_min_disk_bytes: u64,
    /// ... and only when the estimated live data is at most this much: copying a big store
    /// in the background competes with delivery for CPU and memory (measured: a 20 KB drain
    /// 30 % slower with twice the peak RSS), so the automatic compaction waits until a drain
    /// is nearly done. Default 256 MiB.
    pub compact_max_live_bytes: u64,
    /// A lease older than this is taken back by the next [`crate::Queue::take_due`], as if
    /// released: its recipient is due again. A safety net for a lease its holder lost (a task
    /// that panicked or hung). A holder must renew ([`crate::Queue::renew_leases`]) what it
    /// keeps longer (the engine renews everything it holds), since a holder that completes
    /// after it may have caused a second delivery. `None`: leases return only with a
    /// restart. Default 1 hour.
    pub lease_timeout: Option<Duration>,
    /// How long the writer may hold a group commit open, gathering more, when everything in
    /// it is an outcome recorded through [`crate::Queue::complete_batch_async`] (the
    /// engine's), or a take. Any other request in the group (an enqueue, a blocking or
    /// urgent outcome) commits it at once. Outcomes arrive a few at a time from every
    /// connection; each commit costs a sled log write and an `fdatasync`, so a short wait
    /// means fewer of them (in a 20 KB drain: a third as many syncs, 22–27 % less CPU per
    /// message, BENCHMARKS.md, SMTP, "Eighth session") for outcomes that are durable that
    /// much later. Zero: commit at once. Default 3 ms.
    pub outcome_commit_delay: Duration,
    /// ... and only when the group before had at least this many such outcomes (as
    /// PostgreSQL's `commit_siblings`): at low load an outcome has no company to wait for,
    /// and waiting would only add the delay to it. 0: always. Default 4.
    pub outcome_commit_siblings: usize,
    /// The memory the idempotency index may take for the keys of the newest messages
    /// (~13 bytes a key) before the writer moves them all into a run file (see `idem.rs`).
    /// The keys of older messages cost next to no memory (8 bytes per 255), but an enqueue
    /// with a key then also reads a 4 KiB block of each run file (through the OS page
    /// cache). Default 8 MiB: ~640,000 keys.
    pub idempotency_memory_bytes: u64,
    /// The memory the schedule's zones may take (~144 bytes a zone, see `schedule.rs`).
    /// Past it, neighbouring zones are merged and new zones are twice as big: a zone read
    /// then reads more records, but the schedule's memory does not grow with the queue's
    /// depth. Default 4 MiB: ~29,000 zones, two million recipients before the first merge.
    pub schedule_memory_bytes: u64,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            cache_capacity_bytes: 64 * 1024 * 1024,
            max_queue_lifetime: Duration::from_secs(5 * 24 * 3600),
            final_retention: Duration::from_secs(7 * 24 * 3600),
            durable: true,
            auto_compact: true,
            compact_min_disk_bytes: 16 * 1024 * 1024,
            compact_max_live_bytes: 256 * 1024 * 1024,
            lease_timeout: Some(Duration::from_secs(3600)),
            outcome_commit_delay: Duration::from_millis(3),
            outcome_commit_siblings: 4,
            idempotency_memory_bytes: 8 << 20,
            schedule_memory_bytes: 4 << 20,
        }
    }
}

/// A message in the spool. Ids grow with enqueue order (each open starts above
/// `unix_millis << 20` and every stored id, then counts up by one), so ordering by id is
/// ordering by age. Shown as 16 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(QueueError::InvalidInput(format!(
                "message id must be 16 hex digits, got {s:?}"
            )));
        }
        u64::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|e| QueueError::InvalidInput(format!("message id {s:?}: {e}")))
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for MessageId {
    type Error = QueueError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// One recipient of one message: the unit of delivery. Shown as `<message id>.<index>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct RecipientId {
    pub message: MessageId,
    /// Position in [`NewMessage::recipients`].
    pub index: u32,
}

impl fmt::Display for RecipientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.message, self.index)
    }
}

impl FromStr for RecipientId {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (m, i) = s.split_once('.').ok_or_else(|| {
            QueueError::InvalidInput(format!("recipient id must be <message>.<index>, got {s:?}"))
        })?;
        let index = i
            .parse::<u32>()
            .map_err(|e| QueueError::InvalidInput(format!("recipient index in {s:?}: {e}")))?;
        Ok(RecipientId {
            message: m.parse()?,
            index,
        })
    }
}

impl From<RecipientId> for String {
    fn from(id: RecipientId) -> String {
        id.to_string()
    }
}

impl TryFrom<String> for RecipientId {
    type Error = QueueError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What to enqueue.
#[derive(Clone, Debug, Default)]
pub struct NewMessage {
    /// Client-chosen key: enqueueing the same key again returns the first message's id and
    /// stores nothing (safe retries after a lost acknowledgement). Kept until the message's
    /// records are purged.
    pub idempotency_key: Option<String>,
    /// Envelope sender (MAIL FROM). May be empty for the null reverse-path.
    pub sender: String,
    /// Envelope recipients (RCPT TO), in order; recipient `i` gets index `i`.
    pub recipients: Vec<String>,
    /// The RFC 5322 message, stored once however many recipients it has.
    pub body: Vec<u8>,
}

/// Result of an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub id: MessageId,
    /// The idempotency key was seen before: `id` is the earlier message, nothing was stored.
    pub duplicate: bool,
    /// Recipients already on the suppression list: recorded as `Suppressed`, never scheduled.
    pub suppressed: Vec<String>,
}

/// State of one recipient. `Scheduled` and `Leased` are live; the rest are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Waiting for `next_attempt`.
    Scheduled,
    /// Handed out by `take_due*`, in flight. Returns to `Scheduled` on reopen after a crash.
    Leased,
    Delivered,
    /// Permanent failure (5xx).
    Bounced,
    /// Not delivered within `max_queue_lifetime`.
    Expired,
    /// On the suppression list at enqueue or right before sending.
    Suppressed,
    /// No reply after the final dot: possibly delivered (RFC 5321 §6.1). Final, never retried,
    /// to avoid duplicates.
    Unknown,
}

impl RecipientState {
    pub const ALL: [RecipientState; 7] = [
        RecipientState::Scheduled,
        RecipientState::Leased,
        RecipientState::Delivered,
        RecipientState::Bounced,
        RecipientState::Expired,
        RecipientState::Suppressed,
        RecipientState::Unknown,
    ];

    pub fn is_final(self) -> bool {
        !matches!(self, RecipientState::Scheduled | RecipientState::Leased)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecipientState::Scheduled => "scheduled",
            RecipientState::Leased => "leased",
            RecipientState::Delivered => "delivered",
            RecipientState::Bounced => "bounced",
            RecipientState::Expired => "expired",
            RecipientState::Suppressed => "suppressed",
            RecipientState::Unknown => "unknown",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        match self {
            RecipientState::Scheduled => 0,
            RecipientState::Leased => 1,
            RecipientState::Delivered => 2,
            RecipientState::Bounced => 3,
            RecipientState::Expired => 4,
            RecipientState::Suppressed => 5,
            RecipientState::Unknown => 6,
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<RecipientState> {
        RecipientState::ALL.get(usize::from(b)).copied()
    }
}

impl fmt::Display for RecipientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecipientState {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RecipientState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| QueueError::InvalidInput(format!("unknown recipient state {s:?}")))
    }
}

/// The delivery record of one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientRecord {
    pub id: RecipientId,
    pub address: String,
    /// Lowercased domain of `address`: the routing key.
    pub destination: String,
    pub state: RecipientState,
    /// Delivery attempts made (Delivered, Deferred, Bounced, Unknown count; Released and
    /// Suppressed do not).
    pub attempts: u32,
    pub next_attempt: SystemTime,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Last SMTP reply or reason (for expiry: the last transient reason).
    pub last_reply: Option<String>,
}

/// A leased (in-flight) recipient. Finish it with [`crate::Queue::complete`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub recipient: RecipientRecord,
    pub sender: String,
}

/// How a delivery attempt for a leased recipient ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        reply: String,
    },
    /// Retry at `next_attempt`. If that is past `created + max_queue_lifetime` the queue
    /// records `Expired` with this reply instead.
    Deferred {
        reply: String,
        next_attempt: SystemTime,
    },
    Bounced {
        reply: String,
    },
    /// Found on the suppression list right before sending. Only records the state; adding an
    /// address to the list is [`crate::Queue::suppress_add`].
    Suppressed {
        reason: String,
    },
    /// Possibly delivered (no reply after the dot): final, never retried.
    Unknown {
        reply: String,
    },
    /// Not attempted (e.g. shutdown): back to `Scheduled` unchanged, attempts not incremented.
    Released,
    /// Not attempted, due again at `next_attempt` (e.g. its destination's ready queue is
    /// full): attempts not incremented, the last reply kept (`reason` is recorded only when
    /// there is none). Past the lifetime it expires like `Deferred`.
    Postponed {
        reason: String,
        next_attempt: SystemTime,
    },
}

/// What `complete` actually recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    pub state: RecipientState,
}

/// A message with all its recipient records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    pub id: MessageId,
    pub sender: String,
    pub created: SystemTime,
    /// Body size in bytes (also after the body was deleted).
    pub size: u64,
    pub idempotency_key: Option<String>,
    pub recipients: Vec<RecipientRecord>,
}

/// An entry of the suppression list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    /// Lowercased.
    pub address: String,
    pub reason: String,
    pub at: SystemTime,
}

/// Queue statistics, from in-memory counters (rebuilt on open).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Recipient records by state (final records count until purged).
    pub by_state: BTreeMap<RecipientState, u64>,
    /// Non-final (scheduled + leased) recipients per destination.
    pub by_destination: BTreeMap<String, u64>,
    /// Earliest `next_attempt` of a scheduled recipient, as far as the schedule knows: it
    /// can be earlier than the truth (a recipient deleted or expired since) until the
    /// schedule next reads that recipient's zone, never later.
    pub oldest_due: Option<SystemTime>,
    /// Bytes sled uses on disk.
    pub disk_bytes: u64,
}

pub(crate) fn to_millis(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Err(_) => 0,
    }
}

pub(crate) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
