//! Key layout and the compact binary encoding of stored values.
//!
//! All integers in keys are big-endian so sled's byte order is numeric order. Values start
//! with a format version byte so the encoding can evolve.

use crate::segments::SegRef;
use crate::types::{from_millis, to_millis};
use crate::{MessageId, RecipientId, RecipientRecord, RecipientState};

pub(crate) const P_VERSION: u8 = b'v';
/// Message metadata of stores before schema 6, one key per message; moved into packs
/// (`P_PACK`) at open. Still the key the writer's `Tx` names a message's metadata by.
pub(crate) const P_META: u8 = b'm';
/// Message metadata, `PACK` messages to a key (see `pack_key`).
pub(crate) const P_PACK: u8 = b'M';
pub(crate) const P_BODY: u8 = b'b';
pub(crate) const P_RCPT: u8 = b'r';
/// The on-disk schedule of stores written before the schedule moved into memory (see
/// `schedule`); no longer written, removed on open.
pub(crate) const P_SCHED: u8 = b's';
/// The per-destination schedule of schema 1 stores; no longer written, removed on open.
pub(crate) const P_DEST: u8 = b'd';
pub(crate) const P_FINAL: u8 = b'f';
pub(crate) const P_IDEM: u8 = b'i';
pub(crate) const P_SUPP: u8 = b'x';
/// The idempotency index of schema 7: `I` + bucket (16 bits, big-endian); removed on open
/// since its keys moved into run files (`runs`).
pub(crate) const P_IDEM_INDEX: u8 = b'I';
/// The idempotency index's hash key (16 bytes, see `idem::IdemHasher`).
pub(crate) const IDEM_SEED_KEY: &[u8] = b"k";
/// The idempotency index's watermark (message id, 8 bytes big-endian): the keys of messages
/// up to it are in the run files, the others only in their metadata (and in memory while
/// the queue is open; see `idem`). Absent: no key is in the runs.
pub(crate) const IDEM_MERGED_KEY: &[u8] = b"j";

/// Version 8: the stored part of the idempotency index moved from sled buckets into run
/// files (`runs`): a version-7 binary would find no key there. Version 7: the idempotency
/// index is stored again, in part, in buckets (`I` keys, see `idem`): a version-6 binary
/// would leave the entries of the messages it purges there. Version 6: message metadata lives in packs of 16 messages (`M` keys, see `pack_key`); a
/// version-5 binary would find no messages. Version 5: the idempotency index is no longer
/// stored (`i` keys; see `idem`): a version-4 binary would accept a duplicate. Version 4: a
/// final-index entry lists the records that became final at its time in one group commit,
/// up to 64 (see `final_entry`); a version-3 binary would purge only the first. Version 3:
/// the record of a message's only recipient lives in its metadata (see `Meta::record`).
/// Version 2: the schedule is no longer stored (see `schedule`). Older stores are upgraded
/// at open; a binary that knows only an older version refuses a newer store instead of
/// misreading it (a version-2 binary cannot decode format-4 metadata, a version-1 binary
/// took the schedule from sled and would find nothing due).
pub(crate) const SCHEMA_VERSION: &[u8] = b"bulksend-queue/8";
pub(crate) const SCHEMA_VERSION_7: &[u8] = b"bulksend-queue/7";
pub(crate) const SCHEMA_VERSION_6: &[u8] = b"bulksend-queue/6";
pub(crate) const SCHEMA_VERSION_5: &[u8] = b"bulksend-queue/5";
pub(crate) const SCHEMA_VERSION_4: &[u8] = b"bulksend-queue/4";
pub(crate) const SCHEMA_VERSION_3: &[u8] = b"bulksend-queue/3";
pub(crate) const SCHEMA_VERSION_2: &[u8] = b"bulksend-queue/2";
pub(crate) const SCHEMA_VERSION_1: &[u8] = b"bulksend-queue/1";

/// Bodies are split into chunks this big. sled 0.34.7 writes a tree node bigger than
/// segment_size / 4 (128 KiB by default) to a separate "blob" file; leaf nodes hold up to ~17
/// entries, so keeping every value small keeps everything in the one `db` file that the writer
/// fdatasyncs (blob files are still synced if they appear, see `Syncer`).
pub(crate) const BODY_CHUNK: usize = 4096;

/// Bodies up to this size live inside the message's metadata value, bigger ones in segment
/// files (see `segments`). Measured with 2 KB bodies (BENCHMARKS.md, "Third session"): in
/// segments rather than inline, durable enqueue with 64 producers went from ~21–28k to
/// ~31–33k msg/s, take + complete from ~20–29k to ~30–37k rcpt/s, and RSS after the fill
/// from 68 to 50 MiB: sled's values, log and cache stay small. One producer alone is ~10 %
/// slower (two files to `fdatasync` per group, in parallel).
pub(crate) const INLINE_BODY_MAX: usize = 256;

const FORMAT: u8 = 1;
/// Metadata format 2 added the inline body, format 3 the segment reference, format 4 the
/// record of a message's only recipient; values of formats 1 (no body field), 2 and 3 are
/// still read.
const META_FORMAT: u8 = 4;
const META_FORMAT_SEGMENT: u8 = 3;
const META_FORMAT_INLINE: u8 = 2;

pub(crate) fn version_key() -> [u8; 1] {
    [P_VERSION]
}

pub(crate) fn meta_key(id: MessageId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = P_META;
    k[1..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// The message id of a metadata key.
pub(crate) fn meta_id(k: &[u8]) -> Option<MessageId> {
    let b: [u8; 8] = k.get(1..9)?.try_into().ok()?;
    Some(MessageId(u64::from_be_bytes(b)))
}

/// Messages per pack: the metadata of messages `PACK·p … PACK·p + PACK − 1` is one sled
/// value under `M` + p. sled 0.34.7 keeps memory per page (its page table entry and the
/// list of where the page is on disk) whether the page is cached or not, and splits a leaf
/// at 16 keys, so its memory beyond the cache grows with the key count: 16.5 bytes per
/// record with a key each, 2.1 with 16 to a key (`benches/benches/sled_keys.rs`); in the
/// queue's own fill ~17 (tenth session) or ~2.7 (fourteenth) bytes per message with a key
/// each, flat with the packs (BENCHMARKS.md, Queue, "Fourteenth session"). A change to one
/// message rewrites its pack (16 metadata values of ~100–400 bytes); a group's changes to
/// one pack are written once.
pub(crate) const PACK: u64 = 16;
const PACK_FORMAT: u8 = 1;

/// The pack key of message `id`'s metadata.
pub(crate) fn pack_key(id: MessageId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = P_PACK;
    k[1..].copy_from_slice(&(id.0 / PACK).to_be_bytes());
    k
}

/// The first message id a pack key covers.
pub(crate) fn pack_first(k: &[u8]) -> Option<MessageId> {
    let b: [u8; 8] = k.get(1..9)?.try_into().ok()?;
    if k.len() != 9 || k[0] != P_PACK {
        return None;
    }
    u64::from_be_bytes(b).checked_mul(PACK).map(MessageId)
}

/// A pack's value: the format byte, then per message in id order its slot (id mod `PACK`,
/// one byte), the length of its metadata (4 bytes) and the metadata.
pub(crate) fn encode_pack<'a>(entries: impl IntoIterator<Item = (MessageId, &'a [u8])>) -> Vec<u8> {
    let mut v = vec![PACK_FORMAT];
    for (id, meta) in entries {
        v.push((id.0 % PACK) as u8);
        v.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_be_bytes());
        v.extend_from_slice(meta);
    }
    v
}

/// The messages of the pack whose first id is `first`, in id order; each metadata value
/// shares `v`'s buffer.
pub(crate) fn decode_pack(
    first: MessageId,
    v: &sled::IVec,
) -> Result<Vec<(MessageId, sled::IVec)>, String> {
    pack_entries(first, v).collect()
}

/// `decode_pack` one message at a time, without collecting; ends after the first error.
pub(crate) fn pack_entries(first: MessageId, v: &sled::IVec) -> PackEntries<'_> {
    PackEntries {
        first,
        v,
        at: 0,
        last: None,
        done: false,
    }
}

pub(crate) struct PackEntries<'a> {
    first: MessageId,
    v: &'a sled::IVec,
    /// Where the next entry starts; 0 before the format byte is checked.
    at: usize,
    last: Option<u8>,
    done: bool,
}

impl PackEntries<'_> {
    fn entry(&mut self) -> Result<(MessageId, sled::IVec), String> {
        let v = self.v;
        let head = v.get(self.at..self.at + 5).ok_or("truncated pack entry")?;
        let slot = head[0];
        if u64::from(slot) >= PACK || self.last.is_some_and(|l| l >= slot) {
            return Err(format!("bad pack slot {slot}"));
        }
        self.last = Some(slot);
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let at = self.at + 5;
        if v.len() - at < len {
            return Err("truncated pack entry".into());
        }
        self.at = at + len;
        Ok((
            MessageId(self.first.0 + u64::from(slot)),
            v.subslice(at, len),
        ))
    }
}

impl Iterator for PackEntries<'_> {
    type Item = Result<(MessageId, sled::IVec), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.at == 0 {
            let format = match self.v.first() {
                Some(&PACK_FORMAT) => Ok(()),
                Some(f) => Err(format!("unknown pack format {f}")),
                None => Err("empty pack".into()),
            };
            if let Err(e) = format {
                self.done = true;
                return Some(Err(e));
            }
            self.at = 1;
        }
        if self.at >= self.v.len() {
            return None;
        }
        let e = self.entry();
        self.done = e.is_err();
        Some(e)
    }
}

pub(crate) fn body_prefix(id: MessageId) -> [u8; 9] {
    let mut k = meta_key(id);
    k[0] = P_BODY;
    k
}

pub(crate) fn body_key(id: MessageId, chunk: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[..9].copy_from_slice(&body_prefix(id));
    k[9..].copy_from_slice(&chunk.to_be_bytes());
    k
}

pub(crate) fn body_chunks(size: u64) -> u32 {
    let chunk = BODY_CHUNK as u64;
    u32::try_from(size.div_ceil(chunk).max(1)).unwrap_or(u32::MAX)
}

pub(crate) fn rcpt_prefix(id: MessageId) -> [u8; 9] {
    let mut k = meta_key(id);
    k[0] = P_RCPT;
    k
}

fn rid_bytes(id: RecipientId) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&id.message.0.to_be_bytes());
    b[8..].copy_from_slice(&id.index.to_be_bytes());
    b
}

pub(crate) fn rid_from(b: &[u8]) -> Option<RecipientId> {
    let m: [u8; 8] = b.get(..8)?.try_into().ok()?;
    let i: [u8; 4] = b.get(8..12)?.try_into().ok()?;
    Some(RecipientId {
        message: MessageId(u64::from_be_bytes(m)),
        index: u32::from_be_bytes(i),
    })
}

pub(crate) fn rcpt_key(id: RecipientId) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = P_RCPT;
    k[1..].copy_from_slice(&rid_bytes(id));
    k
}

/// Parses the tail `final_at_ms ++ rid` of a final-index key.
pub(crate) fn parse_final_tail(tail: &[u8]) -> Option<(u64, RecipientId)> {
    let d: [u8; 8] = tail.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(d), rid_from(tail.get(8..)?)?))
}

/// `f ++ final_at_ms ++ rid`: final records by the time they became final (for purging).
pub(crate) fn final_key(at_ms: u64, id: RecipientId) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[0] = P_FINAL;
    k[1..9].copy_from_slice(&at_ms.to_be_bytes());
    k[9..].copy_from_slice(&rid_bytes(id));
    k
}

/// A final-index entry for records that became final at the same time in one group commit:
/// the key names the first (`final_key`), the value lists the others, 12 bytes each (empty
/// for one record, which is all that stores before schema 4 wrote).
pub(crate) fn final_entry(
    at_ms: u64,
    mut ids: impl Iterator<Item = RecipientId>,
) -> ([u8; 21], Vec<u8>) {
    let first = ids.next().unwrap_or(RecipientId {
        message: MessageId(0),
        index: 0,
    });
    let mut rest = Vec::with_capacity(ids.size_hint().0 * 12);
    for id in ids {
        rest.extend_from_slice(&rid_bytes(id));
    }
    (final_key(at_ms, first), rest)
}

/// The time and records of a final-index entry (key tail `final_at_ms ++ rid`, and its
/// value).
pub(crate) fn parse_final_entry(tail: &[u8], value: &[u8]) -> Option<(u64, Vec<RecipientId>)> {
    let (at, first) = parse_final_tail(tail)?;
    if !value.len().is_multiple_of(12) {
        return None;
    }
    let mut ids = Vec::with_capacity(1 + value.len() / 12);
    ids.push(first);
    for c in value.chunks_exact(12) {
        ids.push(rid_from(c)?);
    }
    Some((at, ids))
}

/// `i ++ key` → message id: the idempotency index of stores before schema 5 (removed at
/// open; schema 7 kept it in sled buckets, see `idem_bucket_key`, schema 8 in run files).
#[cfg(test)]
pub(crate) fn idem_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(P_IDEM);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The key of idempotency index bucket `b` of schema 7 (tests write them as it did).
#[cfg(test)]
pub(crate) fn idem_bucket_key(b: u16) -> [u8; 3] {
    let [hi, lo] = b.to_be_bytes();
    [P_IDEM_INDEX, hi, lo]
}

pub(crate) fn supp_key(address: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(address.len() + 1);
    k.push(P_SUPP);
    k.extend_from_slice(address.as_bytes());
    k
}

/// Where a message's body is while some recipient is pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// In [`BODY_CHUNK`] chunks under `b` (stores written before segments existed), or gone
    /// (no recipient pending).
    Chunks,
    /// In the metadata value itself (at most [`INLINE_BODY_MAX`] bytes).
    Inline(Vec<u8>),
    /// In a segment file (see `segments`).
    Segment(SegRef),
}

/// Per-message bookkeeping. The body lives in `body` when it is at most [`INLINE_BODY_MAX`]
/// bytes, otherwise in a segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) created_ms: u64,
    pub(crate) size: u64,
    pub(crate) recipients: u32,
    /// Recipients not yet final; the body is deleted when this reaches 0.
    pub(crate) pending: u32,
    /// Recipient records not yet purged; the meta (and idempotency key) go when this reaches 0.
    pub(crate) live: u32,
    pub(crate) sender: String,
    pub(crate) idempotency_key: Option<String>,
    /// Where the body is. Reset to `Chunks` (nothing) when the last recipient becomes final.
    pub(crate) body: Body,
    /// The encoded record (see [`encode_record`]) of recipient 0 when it is kept here
    /// instead of under its own `r` key: for messages of one recipient, the common case in
    /// bulk mail, so that an enqueue writes two sled keys instead of three, and an outcome
    /// two instead of three (sled's per-key insert cost is what limits the queue, see
    /// BENCHMARKS.md).
    pub(crate) record: Option<Vec<u8>>,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(s.as_bytes());
    }
    fn body(&mut self, b: &Body) {
        match b {
            Body::Chunks => self.u8(0),
            Body::Inline(b) => {
                self.u8(1);
                self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
                self.0.extend_from_slice(b);
            }
            Body::Segment(r) => {
                self.u8(2);
                self.u64(r.seg);
                self.u64(r.offset);
                self.u32(r.crc);
            }
        }
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated value: need {n} bytes, have {}",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b: [u8; 4] = self.take(4)?.try_into().map_err(|_| "u32".to_string())?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| "u64".to_string())?;
        Ok(u64::from_be_bytes(b))
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|e| format!("invalid utf-8: {e}"))
    }
    fn opt_str(&mut self) -> Result<Option<String>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            t => Err(format!("bad option tag {t}")),
        }
    }
    fn body(&mut self, format: u8) -> Result<Body, String> {
        match self.u8()? {
            0 => Ok(Body::Chunks),
            1 => {
                let n = self.u32()? as usize;
                Ok(Body::Inline(self.take(n)?.to_vec()))
            }
            2 if format >= META_FORMAT_SEGMENT => Ok(Body::Segment(SegRef {
                seg: self.u64()?,
                offset: self.u64()?,
                crc: self.u32()?,
            })),
            t => Err(format!("bad body tag {t}")),
        }
    }
    fn format(&mut self) -> Result<(), String> {
        match self.u8()? {
            FORMAT => Ok(()),
            v => Err(format!("unknown value format {v}")),
        }
    }
    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.0.len()))
        }
    }
}

pub(crate) fn encode_meta(m: &Meta) -> Vec<u8> {
    let inline = match &m.body {
        Body::Inline(b) => b.len(),
        _ => 20,
    };
    let record = m.record.as_ref().map_or(0, Vec::len);
    let mut w = Writer(Vec::with_capacity(72 + m.sender.len() + inline + record));
    w.u8(META_FORMAT);
    w.u64(m.created_ms);
    w.u64(m.size);
    w.u32(m.recipients);
    w.u32(m.pending);
    w.u32(m.live);
    w.str(&m.sender);
    w.opt_str(m.idempotency_key.as_deref());
    w.body(&m.body);
    match &m.record {
        Some(r) => {
            w.u8(1);
            w.u32(u32::try_from(r.len()).unwrap_or(u32::MAX));
            w.0.extend_from_slice(r);
        }
        None => w.u8(0),
    }
    w.0
}

pub(crate) fn decode_meta(v: &[u8]) -> Result<Meta, String> {
    let mut r = Reader(v);
    let format = r.u8()?;
    if ![FORMAT, META_FORMAT_INLINE, META_FORMAT_SEGMENT, META_FORMAT].contains(&format) {
        return Err(format!("unknown value format {format}"));
    }
    let mut m = Meta {
        created_ms: r.u64()?,
        size: r.u64()?,
        recipients: r.u32()?,
        pending: r.u32()?,
        live: r.u32()?,
        sender: r.str()?,
        idempotency_key: r.opt_str()?,
        body: if format == FORMAT {
            Body::Chunks
        } else {
            r.body(format)?
        },
        record: None,
    };
    if format >= META_FORMAT {
        m.record = match r.u8()? {
            0 => None,
            1 => {
                let n = r.u32()? as usize;
                Some(r.take(n)?.to_vec())
            }
            t => return Err(format!("bad record tag {t}")),
        };
    }
    r.end()?;
    Ok(m)
}

pub(crate) fn encode_record(rec: &RecipientRecord) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(
        48 + rec.address.len() + rec.destination.len(),
    ));
    w.u8(FORMAT);
    w.u8(rec.state.to_u8());
    w.u32(rec.attempts);
    w.u64(to_millis(rec.next_attempt));
    w.u64(to_millis(rec.created));
    w.u64(to_millis(rec.updated));
    w.str(&rec.address);
    w.str(&rec.destination);
    w.opt_str(rec.last_reply.as_deref());
    w.0
}

/// The record that `meta` holds for recipient 0 of message `id`, if it holds one (see
/// [`Meta::record`]).
pub(crate) fn inline_record(id: MessageId, meta: &Meta) -> Result<Option<RecipientRecord>, String> {
    meta.record
        .as_deref()
        .map(|v| {
            decode_record(
                RecipientId {
                    message: id,
                    index: 0,
                },
                v,
            )
        })
        .transpose()
}

pub(crate) fn decode_record(id: RecipientId, v: &[u8]) -> Result<RecipientRecord, String> {
    let mut r = Reader(v);
    r.format()?;
    let st = r.u8()?;
    let state = RecipientState::from_u8(st).ok_or_else(|| format!("bad state {st}"))?;
    let rec = RecipientRecord {
        id,
        state,
        attempts: r.u32()?,
        next_attempt: from_millis(r.u64()?),
        created: from_millis(r.u64()?),
        updated: from_millis(r.u64()?),
        address: r.str()?,
        destination: r.str()?,
        last_reply: r.opt_str()?,
    };
    r.end()?;
    Ok(rec)
}

pub(crate) fn encode_suppression(at_ms: u64, reason: &str) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(16 + reason.len()));
    w.u8(FORMAT);
    w.u64(at_ms);
    w.str(reason);
    w.0
}

pub(crate) fn decode_suppression(v: &[u8]) -> Result<(u64, String), String> {
    let mut r = Reader(v);
    r.format()?;
    let at = r.u64()?;
    let reason = r.str()?;
    r.end()?;
    Ok((at, reason))
}

/// Printable form of a key for error messages.
pub(crate) fn show_key(k: &[u8]) -> String {
    let mut s = String::new();
    if let Some((&p, rest)) = k.split_first() {
        s.push(char::from(p));
        s.push(':');
        for b in rest {
            s.push_str(&format!("{b:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn record_roundtrip() {
        let id = RecipientId {
            message: MessageId(0x0123_4567_89ab_cdef),
            index: 7,
        };
        let rec = RecipientRecord {
            id,
            address: "Bob@Example.test".into(),
            destination: "example.test".into(),
            state: RecipientState::Bounced,
            attempts: 3,
            next_attempt: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            created: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            updated: UNIX_EPOCH + Duration::from_millis(1_700_000_001_000),
            last_reply: Some("550 5.1.1 no".into()),
        };
        assert_eq!(decode_record(id, &encode_record(&rec)).unwrap(), rec);
        assert!(decode_record(id, &encode_record(&rec)[..10]).is_err());
        let meta = Meta {
            created_ms: 5,
            size: 2048,
            recipients: 3,
            pending: 2,
            live: 3,
            sender: "a@b".into(),
            idempotency_key: Some("k".into()),
            body: Body::Inline(b"Subject: x\r\n\r\nhi\r\n".to_vec()),
            record: None,
        };
        assert_eq!(decode_meta(&encode_meta(&meta)).unwrap(), meta);
        let with_record = Meta {
            recipients: 1,
            record: Some(encode_record(&rec)),
            ..meta.clone()
        };
        let v = encode_meta(&with_record);
        assert_eq!(decode_meta(&v).unwrap(), with_record);
        assert!(decode_meta(&v[..v.len() - 1]).is_err(), "truncated record");
        // Formats 2 (inline bodies, no segments) and 3 (no record) still read.
        let mut v2 = encode_meta(&meta);
        v2[0] = META_FORMAT_INLINE;
        v2.pop();
        assert_eq!(decode_meta(&v2).unwrap(), meta);
        let mut v3 = encode_meta(&meta);
        v3[0] = META_FORMAT_SEGMENT;
        v3.pop();
        assert_eq!(decode_meta(&v3).unwrap(), meta);
        let segment = Meta {
            body: Body::Segment(SegRef {
                seg: 3,
                offset: 1 << 33,
                crc: 0xdead_beef,
            }),
            ..meta.clone()
        };
        assert_eq!(decode_meta(&encode_meta(&segment)).unwrap(), segment);
        // A segment reference is not valid in a format-2 value.
        let mut bad = encode_meta(&segment);
        bad[0] = META_FORMAT_INLINE;
        bad.pop();
        assert!(decode_meta(&bad).is_err());
        let chunked = Meta {
            body: Body::Chunks,
            ..meta
        };
        assert_eq!(decode_meta(&encode_meta(&chunked)).unwrap(), chunked);
        // A schema-1 value (format 1, no body field) still reads.
        let mut v1 = encode_meta(&chunked);
        v1[0] = FORMAT;
        v1.truncate(v1.len() - 2);
        assert_eq!(decode_meta(&v1).unwrap(), chunked);
    }

    #[test]
    fn a_pack_gives_back_its_messages_and_refuses_garbage() {
        let first = MessageId(32);
        let key = pack_key(MessageId(45));
        assert_eq!(pack_first(&key), Some(first));
        assert_eq!(pack_key(MessageId(47)), key);
        assert_ne!(pack_key(MessageId(48)), key);
        let v = sled::IVec::from(encode_pack([
            (MessageId(33), &b"one"[..]),
            (MessageId(40), &b""[..]),
            (MessageId(47), &b"three"[..]),
        ]));
        let got: Vec<(u64, Vec<u8>)> = decode_pack(first, &v)
            .unwrap()
            .into_iter()
            .map(|(id, m)| (id.0, m.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (33, b"one".to_vec()),
                (40, Vec::new()),
                (47, b"three".to_vec())
            ]
        );
        assert_eq!(
            decode_pack(first, &sled::IVec::from(encode_pack([])))
                .unwrap()
                .len(),
            0
        );
        for bad in [
            &v[..v.len() - 1],
            &v[..3],
            &[9u8][..],
            &[],
            &[PACK_FORMAT, 16, 0, 0, 0, 0],
        ] {
            assert!(
                decode_pack(first, &sled::IVec::from(bad)).is_err(),
                "{bad:?}"
            );
        }
        // Slots out of order.
        let swapped = encode_pack([(MessageId(40), &b""[..]), (MessageId(33), &b""[..])]);
        assert!(decode_pack(first, &sled::IVec::from(swapped)).is_err());
    }

    #[test]
    fn meta_key_gives_its_id_back() {
        let id = MessageId(0x0123_4567_89ab_cdef);
        assert_eq!(meta_id(&meta_key(id)), Some(id));
        assert_eq!(meta_id(&[P_META, 1, 2]), None);
    }

    #[test]
    fn final_keys_sort_by_time_then_id() {
        let a = RecipientId {
            message: MessageId(9),
            index: 0,
        };
        let b = RecipientId {
            message: MessageId(1),
            index: 5,
        };
        assert!(final_key(1, a) < final_key(2, b));
        assert!(final_key(2, b) < final_key(2, a));
        assert!(final_key(255, b) < final_key(256, a), "big-endian time");
        assert_eq!(parse_final_tail(&final_key(42, a)[1..]), Some((42, a)));
    }

    #[test]
    fn final_entries_list_every_record_and_read_old_single_keys() {
        let id = |m, i| RecipientId {
            message: MessageId(m),
            index: i,
        };
        let ids = [id(7, 0), id(3, 2), id(9, 1)];
        let (k, v) = final_entry(42, ids.iter().copied());
        assert_eq!(k, final_key(42, id(7, 0)));
        assert_eq!(parse_final_entry(&k[1..], &v), Some((42, ids.to_vec())));
        // A key of a store before schema 4: no value, one record.
        let old = final_key(5, id(1, 0));
        assert_eq!(parse_final_entry(&old[1..], &[]), Some((5, vec![id(1, 0)])));
        assert_eq!(parse_final_entry(&k[1..], &v[..13]), None, "cut short");
    }
}
