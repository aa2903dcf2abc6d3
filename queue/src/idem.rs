//! The idempotency index: which stored message an idempotency key belongs to.
//!
//! Two parts. The keys of the newest messages are in memory (`IdemIndex`, up to
//! `QueueOptions::idempotency_memory_bytes`, 8 MiB by default: ~640,000 keys); when it
//! holds more, the writer moves all of it into the stored part (`merge` in `store.rs`), and
//! it starts again empty. The stored part is a fixed number of sled keys ("buckets", `I` +
//! 16 bits of the key's hash), each holding the sorted entries of every key whose hash
//! falls in it; with the buckets the merge stores the highest message id it covered (the
//! "watermark", `codec::IDEM_MERGED_KEY`). Opening the queue puts back into memory the keys
//! of the messages above the watermark, from their metadata; the buckets and the watermark
//! are written in one sled batch, so the two parts never disagree after a crash.
//!
//! Why: in memory alone (schemas 5 and 6) the index took ~13 bytes for every queued message
//! with a key, the largest part of the queue's memory that grew with its depth
//! (BENCHMARKS.md, Queue, "Fourteenth session"). Stored alone, every enqueue with a key
//! rewrote its bucket: 25 % fewer durable enqueues a second at 200k queued, 25–40 % at a
//! million, and sled's own memory grew ~10 bytes a message with the scattered rewrites
//! (segment bookkeeping; BENCHMARKS.md, Queue, "Fifteenth session"). Merging in bulk writes
//! each bucket once per merge, in key order. What is left per enqueue, once buckets exist, is
//! one sled read of the key's bucket (a cache hit while sled's cache holds the buckets,
//! ~12 bytes a stored key). A purge or delete of a message at or below the watermark
//! rewrites its bucket in the same batch.
//!
//! A key's hash is SipHash-1-3 keyed with 128 random bits stored in the queue
//! (`codec::IDEM_SEED_KEY`): the same on every open, and not steerable from outside. A hit is
//! only a candidate: the caller compares the key stored in that message's metadata, so keys
//! whose hashes agree all stay findable. 44 bits of the hash decide (the bucket's or shard's
//! 12 top bits, and the low 32 bits as a tag): a false candidate (one more metadata read)
//! comes about once in 2^44 / keys lookups.
//!
//! Memory layout: 4,096 shards picked by the hash's top 12 bits, each a sorted `Vec` of 12-byte
//! entries (the tag, the message id), grown by an eighth at a time: ~13 bytes a key. Hash
//! tables (the first two versions) cost 30–38 bytes an entry at 16 bytes plus a control byte
//! and their load factor. And one big table had the trouble the shards avoid: reallocated to
//! 35 MiB as it grew, it was `mmap`ed by glibc, and freeing it raised glibc's dynamic mmap
//! threshold to its size, so that from then on the writer's and sled's big transient
//! buffers stayed in the heap (RSS after a 200k fill with an 8 MiB cache was 88–131 MiB
//! against 46–51 MiB; BENCHMARKS.md, Queue, "Ninth session"). So every allocation here stays
//! under glibc's initial 128 KiB threshold: the shard list (96 KiB) and each shard up to ~44M
//! entries in all. An insert or removal moves half a shard on average.
//!
//! A bucket is the shard's 12 bits and the tag's low 4 bits (so a shard's entries fall into 16
//! buckets, in order): 65,536 sled keys, so sled's own memory for them is fixed (~2 MiB; sled
//! keeps ~16 bytes for every key whatever its cache size, see `codec::PACK`). Its value is a
//! format byte and 12-byte entries (tag, message id), sorted.
//!
//! Recovery fills the memory part unsorted (`push`) and sorts each shard once (`finish`):
//! inserting in hash order would move a quadratic amount.

use std::hash::{BuildHasher, Hasher, RandomState};

use siphasher::sip::SipHasher13;

use crate::MessageId;

const SHARD_BITS: u32 = 12;
const FORMAT: u8 = 1;
const ENTRY: usize = 12;

/// 32 bits of a key's hash and the message: 12 bytes, ordered by tag, then id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    tag: u32,
    id: [u32; 2],
}

impl Entry {
    fn new(h: u64, id: MessageId) -> Entry {
        Entry {
            tag: h as u32,
            id: [(id.0 >> 32) as u32, id.0 as u32],
        }
    }

    fn id(&self) -> MessageId {
        MessageId(u64::from(self.id[0]) << 32 | u64::from(self.id[1]))
    }
}

/// The memory part of the index, and what the writer knows of the stored part.
pub(crate) struct IdemIndex {
    hasher: IdemHasher,
    /// `1 << SHARD_BITS` sorted shards (unsorted between `push` and `finish`); a hash lives
    /// in the one its top bits name.
    shards: Vec<Vec<Entry>>,
    len: usize,
    /// Keys of messages up to this id are in the buckets (or gone with their message), the
    /// others here.
    pub(crate) merged: u64,
    /// Whether buckets may exist: lookups read none until then.
    pub(crate) stored: bool,
}

impl IdemIndex {
    pub(crate) fn new(hasher: IdemHasher, merged: u64, stored: bool) -> Self {
        IdemIndex {
            hasher,
            shards: (0..1 << SHARD_BITS).map(|_| Vec::new()).collect(),
            len: 0,
            merged,
            stored,
        }
    }

    fn shard(&self, h: u64) -> &Vec<Entry> {
        &self.shards[(h >> (64 - SHARD_BITS)) as usize]
    }

    fn shard_mut(&mut self, h: u64) -> &mut Vec<Entry> {
        &mut self.shards[(h >> (64 - SHARD_BITS)) as usize]
    }

    pub(crate) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash(key)
    }

    /// The number of keys in memory.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The messages whose key may be the one that hashed to `h`.
    pub(crate) fn candidates(&self, h: u64) -> Vec<MessageId> {
        let shard = self.shard(h);
        let tag = h as u32;
        let from = shard.partition_point(|e| e.tag < tag);
        shard[from..]
            .iter()
            .take_while(|e| e.tag == tag)
            .map(Entry::id)
            .collect()
    }

    /// Adds `id` under `h` (nothing if it is there already).
    pub(crate) fn insert(&mut self, h: u64, id: MessageId) {
        let e = Entry::new(h, id);
        let shard = self.shard_mut(h);
        if let Err(at) = shard.binary_search(&e) {
            if shard.len() == shard.capacity() {
                // An eighth more, not double: the slack is what costs memory here.
                shard.reserve_exact((shard.len() / 8).max(4));
            }
            shard.insert(at, e);
            self.len += 1;
        }
    }

    /// Adds `id` under `h` without keeping its shard sorted: for recovery, which calls
    /// [`IdemIndex::finish`] before the index is used.
    pub(crate) fn push(&mut self, h: u64, id: MessageId) {
        self.shard_mut(h).push(Entry::new(h, id));
        self.len += 1;
    }

    /// Sorts every shard after [`IdemIndex::push`] (dropping repeats) and trims its slack.
    pub(crate) fn finish(&mut self) {
        self.len = 0;
        for shard in &mut self.shards {
            shard.sort_unstable();
            shard.dedup();
            shard.shrink_to(shard.len() + shard.len() / 8);
            self.len += shard.len();
        }
    }

    pub(crate) fn remove(&mut self, h: u64, id: MessageId) {
        let e = Entry::new(h, id);
        let shard = self.shard_mut(h);
        if let Ok(at) = shard.binary_search(&e) {
            shard.remove(at);
            if shard.is_empty() {
                // Freed when empty, not shrunk on the way there: reallocating at every
                // halving during a purge left ~8 MiB more RSS after a 100k purge.
                *shard = Vec::new();
            }
            self.len -= 1;
        }
    }

    /// Every key in memory as (bucket, its new entries), in bucket order: what a merge
    /// adds to the buckets.
    pub(crate) fn by_bucket(&self) -> impl Iterator<Item = (u16, Vec<(u32, u64)>)> + '_ {
        self.shards.iter().enumerate().flat_map(|(s, shard)| {
            let mut parts: [Vec<(u32, u64)>; 16] = Default::default();
            for e in shard {
                parts[(e.tag & 0xf) as usize].push((e.tag, e.id().0));
            }
            parts
                .into_iter()
                .enumerate()
                .filter(|(_, p)| !p.is_empty())
                .map(move |(low, p)| ((s << 4 | low) as u16, p))
        })
    }

    /// Forgets every key in memory (after a merge stored them), freeing the shards.
    pub(crate) fn clear(&mut self) {
        for shard in &mut self.shards {
            *shard = Vec::new();
        }
        self.len = 0;
    }
}

/// The keyed hash of idempotency keys.
#[derive(Clone)]
pub(crate) struct IdemHasher {
    k0: u64,
    k1: u64,
}

impl IdemHasher {
    pub(crate) const SEED_LEN: usize = 16;

    /// A hasher with the stored `seed` (`SEED_LEN` bytes), or `None` if it is not that long.
    pub(crate) fn from_seed(seed: &[u8]) -> Option<IdemHasher> {
        let k0 = u64::from_be_bytes(seed.get(..8)?.try_into().ok()?);
        let k1 = u64::from_be_bytes(seed.get(8..)?.try_into().ok()?);
        (seed.len() == Self::SEED_LEN).then_some(IdemHasher { k0, k1 })
    }

    /// 128 new random bits: two outputs of std's `RandomState`, whose own keys come from the
    /// operating system's random source.
    pub(crate) fn new_seed() -> [u8; Self::SEED_LEN] {
        let s = RandomState::new();
        let mut seed = [0u8; Self::SEED_LEN];
        seed[..8].copy_from_slice(&s.hash_one(0u8).to_be_bytes());
        seed[8..].copy_from_slice(&s.hash_one(1u8).to_be_bytes());
        seed
    }

    pub(crate) fn hash(&self, key: &str) -> u64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        h.write(key.as_bytes());
        h.finish()
    }
}

/// The bucket a hash falls in: its shard's bits, then the tag's low 4.
pub(crate) fn bucket(h: u64) -> u16 {
    ((h >> (64 - SHARD_BITS)) << 4 | (h & 0xf)) as u16
}

fn tag(h: u64) -> u32 {
    h as u32
}

/// A bucket's entries: (tag, message id), sorted, without repeats.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Bucket(Vec<(u32, u64)>);

impl Bucket {
    /// Reads a stored bucket; refuses a wrong length, an unknown format and unsorted
    /// entries (the lookups' binary search would miss keys).
    pub(crate) fn decode(v: &[u8]) -> Result<Bucket, String> {
        let Some((&format, body)) = v.split_first() else {
            return Err("empty idempotency index bucket".into());
        };
        if format != FORMAT {
            return Err(format!("unknown idempotency index bucket format {format}"));
        }
        if !body.len().is_multiple_of(ENTRY) {
            return Err(format!(
                "idempotency index bucket of {} bytes (entries are {ENTRY})",
                v.len()
            ));
        }
        let mut entries = Vec::with_capacity(body.len() / ENTRY);
        for c in body.chunks_exact(ENTRY) {
            let (t, id) = c.split_at(4);
            let e = (
                u32::from_be_bytes(t.try_into().unwrap_or_default()),
                u64::from_be_bytes(id.try_into().unwrap_or_default()),
            );
            if entries.last().is_some_and(|last| *last >= e) {
                return Err("idempotency index bucket out of order".into());
            }
            entries.push(e);
        }
        Ok(Bucket(entries))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + self.0.len() * ENTRY);
        v.push(FORMAT);
        for (t, id) in &self.0 {
            v.extend_from_slice(&t.to_be_bytes());
            v.extend_from_slice(&id.to_be_bytes());
        }
        v
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub(crate) fn ids(&self) -> impl Iterator<Item = MessageId> + '_ {
        self.0.iter().map(|e| MessageId(e.1))
    }

    /// The messages whose key may be the one that hashed to `h`.
    pub(crate) fn candidates(&self, h: u64) -> impl Iterator<Item = MessageId> + '_ {
        let t = tag(h);
        let from = self.0.partition_point(|e| e.0 < t);
        self.0[from..]
            .iter()
            .take_while(move |e| e.0 == t)
            .map(|e| MessageId(e.1))
    }

    /// Adds entries (tag, message id) sorted as `IdemIndex::by_bucket` gives them.
    pub(crate) fn merge(&mut self, entries: &[(u32, u64)]) {
        let mut all = Vec::with_capacity(self.0.len() + entries.len());
        let (mut a, mut b) = (self.0.iter().peekable(), entries.iter().peekable());
        while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
            match x.cmp(y) {
                std::cmp::Ordering::Less => all.extend(a.next()),
                std::cmp::Ordering::Greater => all.extend(b.next()),
                std::cmp::Ordering::Equal => {
                    all.extend(a.next());
                    b.next();
                }
            }
        }
        all.extend(a);
        all.extend(b);
        self.0 = all;
    }

    /// Removes `id` under `h`; false if it was not there.
    pub(crate) fn remove(&mut self, h: u64, id: MessageId) -> bool {
        match self.0.binary_search(&(tag(h), id.0)) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index() -> IdemIndex {
        IdemIndex::new(
            IdemHasher::from_seed(&IdemHasher::new_seed()).unwrap(),
            0,
            false,
        )
    }

    #[test]
    fn keys_sharing_a_hash_are_all_found_until_removed() {
        let mut idx = index();
        let (a, b, c) = (MessageId(1), MessageId(2), MessageId(3));
        // As if three keys had hashed alike.
        idx.insert(7, a);
        idx.insert(7, b);
        idx.insert(7, c);
        idx.insert(7, b);
        idx.insert(9, a);
        assert_eq!(idx.candidates(7), vec![a, b, c]);
        assert_eq!(idx.len(), 4);
        idx.remove(7, a);
        let mut left = idx.candidates(7);
        left.sort();
        assert_eq!(left, vec![b, c]);
        idx.remove(7, c);
        assert_eq!(idx.candidates(7), vec![b]);
        idx.remove(7, MessageId(99));
        idx.remove(7, b);
        assert!(idx.candidates(7).is_empty());
        assert_eq!(idx.candidates(9), vec![a]);
        assert_eq!(idx.len(), 1);
        idx.clear();
        assert!(idx.candidates(9).is_empty());
        assert_eq!(idx.len(), 0);
    }

    #[test]
    fn ids_round_trip_and_shards_stay_sorted_through_growth_and_removal() {
        let mut idx = index();
        let big = MessageId(0x0123_4567_89ab_cdef);
        idx.insert(u64::MAX, big);
        assert_eq!(idx.candidates(u64::MAX), vec![big]);
        // Many entries in one shard (same top bits), added out of order.
        let hs: Vec<u64> = (0..1000u64).map(|i| (i * 7919) % 1000 + 1).collect();
        for (n, &h) in hs.iter().enumerate() {
            idx.insert(h, MessageId(n as u64));
        }
        for (n, &h) in hs.iter().enumerate() {
            assert_eq!(idx.candidates(h), vec![MessageId(n as u64)], "hash {h}");
        }
        assert_eq!(idx.len(), 1001);
        for (n, &h) in hs.iter().enumerate().filter(|(n, _)| n % 3 != 0) {
            idx.remove(h, MessageId(n as u64));
        }
        for (n, &h) in hs.iter().enumerate() {
            let want = if n % 3 == 0 {
                vec![MessageId(n as u64)]
            } else {
                vec![]
            };
            assert_eq!(idx.candidates(h), want, "hash {h} after removals");
        }
        // Hashes 1..=1000 have top bits 0: all in shard 0, the one `shard(0)` names.
        assert!(idx.shard(0).windows(2).all(|w| w[0] < w[1]));
        let len = idx.shard(0).len();
        for (n, &h) in hs.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
            idx.remove(h, MessageId(n as u64));
        }
        assert_eq!(len, 334);
        assert_eq!(idx.shard(0).capacity(), 0, "freed when empty");
    }

    #[test]
    fn pushed_then_finished_is_the_same_index() {
        let mut a = index();
        let mut b = IdemIndex::new(a.hasher.clone(), 0, false);
        let keys: Vec<u64> = (0..5000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for (n, &h) in keys.iter().enumerate() {
            a.insert(h, MessageId(n as u64 / 2));
            b.push(h, MessageId(n as u64 / 2));
        }
        b.push(keys[7], MessageId(3)); // a repeat
        b.finish();
        assert_eq!(a.len(), b.len());
        for &h in &keys {
            assert_eq!(a.candidates(h), b.candidates(h));
        }
        b.insert(keys[0], MessageId(99));
        assert_eq!(b.candidates(keys[0]), vec![MessageId(0), MessageId(99)]);
    }

    /// A hash whose top 12 bits are `top` and whose low 32 are `t`: bucket `top << 4 | t & 0xf`.
    fn h(top: u16, t: u32) -> u64 {
        u64::from(top) << 52 | 0xabc_0000_0000 | u64::from(t)
    }

    #[test]
    fn a_bucket_finds_what_was_merged_into_it_until_removed() {
        let mut b = Bucket::default();
        let (x, y, z) = (MessageId(1), MessageId(2), MessageId(3));
        assert_eq!(bucket(h(5, 0x71)), 5 << 4 | 1);
        // As if three keys had hashed alike (tag 0x71), one apart (0x91), merged twice.
        b.merge(&[(0x71, 3)]);
        b.merge(&[(0x71, 1), (0x71, 2), (0x71, 3), (0x91, 1)]);
        assert_eq!(b.len(), 4, "no repeat");
        assert_eq!(b.candidates(h(5, 0x71)).collect::<Vec<_>>(), vec![x, y, z]);
        assert!(b.remove(h(5, 0x71), x));
        assert!(!b.remove(h(5, 0x71), MessageId(99)));
        assert_eq!(b.candidates(h(5, 0x71)).collect::<Vec<_>>(), vec![y, z]);
        assert!(b.remove(h(5, 0x71), y) && b.remove(h(5, 0x71), z));
        assert_eq!(b.candidates(h(5, 0x71)).count(), 0);
        assert_eq!(b.candidates(h(5, 0x91)).collect::<Vec<_>>(), vec![x]);
        assert!(b.remove(h(5, 0x91), x));
        assert!(b.is_empty());
    }

    #[test]
    fn a_bucket_round_trips_and_garbage_is_refused() {
        let mut b = Bucket::default();
        let big = 0x0123_4567_89ab_cdef;
        b.merge(&[(0, 3), (77, 4), (u32::MAX, big)]);
        let v = b.encode();
        assert_eq!(v.len(), 1 + 3 * ENTRY);
        let back = Bucket::decode(&v).unwrap();
        assert_eq!(back, b);
        assert_eq!(
            back.candidates(h(1, u32::MAX)).collect::<Vec<_>>(),
            vec![MessageId(big)]
        );
        assert!(Bucket::decode(&[]).is_err());
        assert!(Bucket::decode(&v[..v.len() - 1]).is_err(), "truncated");
        let mut unknown = v.clone();
        unknown[0] = 9;
        assert!(Bucket::decode(&unknown).is_err());
        // The first two entries swapped.
        let mut swapped = vec![FORMAT];
        swapped.extend_from_slice(&v[1 + ENTRY..1 + 2 * ENTRY]);
        swapped.extend_from_slice(&v[1..1 + ENTRY]);
        swapped.extend_from_slice(&v[1 + 2 * ENTRY..]);
        assert!(Bucket::decode(&swapped).is_err(), "out of order");
        assert_eq!(Bucket::decode(&[FORMAT]).unwrap(), Bucket::default());
    }

    /// What a merge writes (`by_bucket` into buckets) is what a lookup of the bucket finds.
    #[test]
    fn the_memory_part_merged_into_buckets_is_found_there() {
        let mut idx = index();
        let hashes: Vec<u64> = (0..5000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for (n, &x) in hashes.iter().enumerate() {
            idx.insert(x, MessageId(n as u64));
        }
        let mut buckets: std::collections::BTreeMap<u16, Bucket> = Default::default();
        // One bucket already holds an entry the merge repeats.
        let first = hashes[0];
        buckets
            .entry(bucket(first))
            .or_default()
            .merge(&[(tag(first), 0)]);
        let mut last = None;
        for (b, entries) in idx.by_bucket() {
            assert!(last < Some(b), "bucket order");
            last = Some(b);
            assert!(entries.windows(2).all(|w| w[0] < w[1]), "sorted");
            buckets.entry(b).or_default().merge(&entries);
        }
        for (n, &x) in hashes.iter().enumerate() {
            let found: Vec<MessageId> = buckets[&bucket(x)].candidates(x).collect();
            assert_eq!(found, vec![MessageId(n as u64)], "hash {x:x}");
        }
        assert_eq!(buckets.values().map(Bucket::len).sum::<usize>(), 5000);
    }

    #[test]
    fn the_hash_depends_on_the_key_and_the_seed_only() {
        let seed = IdemHasher::new_seed();
        assert_ne!(seed, IdemHasher::new_seed(), "a new seed each time");
        let a = IdemHasher::from_seed(&seed).unwrap();
        let b = IdemHasher::from_seed(&seed).unwrap();
        assert_eq!(a.hash("order-42"), b.hash("order-42"));
        assert_ne!(a.hash("order-42"), a.hash("order-43"));
        let other = IdemHasher::from_seed(&IdemHasher::new_seed()).unwrap();
        assert_ne!(a.hash("order-42"), other.hash("order-42"));
        // A stored index needs the same bits from every build: this pins them (seed 00..0f).
        // If it fails, stores written before would lose their keys: bump the schema instead.
        let fixed = IdemHasher::from_seed(&(0u8..16).collect::<Vec<_>>()).unwrap();
        assert_eq!(fixed.hash("order-42"), 4_122_871_165_108_423_200);
        assert!(IdemHasher::from_seed(&seed[..15]).is_none());
        assert!(IdemHasher::from_seed(&[0u8; 17]).is_none());
    }
}
