//! The idempotency index: which stored message an idempotency key belongs to.
//!
//! Two parts. The keys of the newest messages are in memory (`IdemIndex`, up to
//! `QueueOptions::idempotency_memory_bytes`, 8 MiB by default: ~640,000 keys); when it
//! holds more, the writer freezes all of it, has another thread write it into the stored
//! part, and a new memory part starts empty (`maybe_merge_idem` in `store.rs`); lookups
//! search the frozen part too until its run is in use. The stored part is sorted, immutable
//! run files outside sled (`runs`), one per such write, merged with each other as they pile
//! up; once a run is durable the writer puts it in use and stores in sled the highest
//! message id it covered (the "watermark", `codec::IDEM_MERGED_KEY`). Opening the queue
//! puts back into memory the keys of the messages above the watermark, from their
//! metadata. Before it freezes the memory part the writer waits until every group
//! committed so far is synced, so a run only ever names messages that are durable: a crash
//! between the run and the watermark leaves a run whose keys are also put back into
//! memory, which lookups do not mind. (Message ids are not reused after a crash either:
//! each open starts above `unix_millis << 20`.)
//!
//! Why: in memory alone (schemas 5 and 6) the index took ~13 bytes for every queued message
//! with a key, the largest part of the queue's memory that grew with its depth
//! (BENCHMARKS.md, Queue, "Fourteenth session"). Stored in sled, every enqueue with a key
//! rewrote its bucket (25–40 % fewer enqueues a second) or, merged in bulk into 65,536 sled
//! buckets (schema 7), sled kept every bucket's page in memory: its cache hears of an access
//! only per 64 to a shard, so ~16,000 pages stay resident beyond its size, and the buckets
//! are fewer pages than that, so memory grew ~6 bytes for every stored key (BENCHMARKS.md,
//! Queue, "Fifteenth session" and "Sixteenth session"). Runs are read with `pread`, through
//! the OS page cache: in the process's memory a run costs 8 bytes per 255 keys.
//!
//! A delete or purge does not touch the runs: an entry of a message that is gone points at
//! nothing (a lookup checks the message's metadata anyway) until a merge of runs drops the
//! entries below the oldest queued message, or a run whose ids are all below it is deleted.
//!
//! A key's hash is SipHash-1-3 keyed with 128 random bits stored in the queue
//! (`codec::IDEM_SEED_KEY`): the same on every open, and not steerable from outside. A hit is
//! only a candidate: the caller compares the key stored in that message's metadata, so keys
//! whose hashes agree all stay findable. 44 bits of the hash decide (the shard's 12 top
//! bits, and the low 32 bits as a tag; a run stores the same 44, `runs::run_key`): a false
//! candidate (one more metadata read)
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
//! Recovery fills the memory part unsorted (`push`) and sorts each shard once (`finish`):
//! inserting in hash order would move a quadratic amount.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;

use siphasher::sip::SipHasher13;

use crate::runs::{run_key, Run, RunError};
use crate::MessageId;

const SHARD_BITS: u32 = 12;

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
    /// Keys of messages up to this id are in the runs (or gone with their message), the
    /// others here or in `frozen`.
    pub(crate) merged: u64,
    /// The stored part, oldest first.
    pub(crate) runs: Vec<Arc<Run>>,
    /// The memory part as it was when the writer started writing it as a run on another
    /// thread: the keys of messages `merged + 1 ..= frozen.hi`, still looked up here until
    /// the run is in `runs` (see `Writer::maybe_merge_idem` in `store.rs`).
    frozen: Option<Frozen>,
}

/// A memory part being written as a run: its shards, shared with the thread writing them.
#[derive(Clone)]
pub(crate) struct Frozen {
    shards: Arc<Vec<Vec<Entry>>>,
    len: usize,
    /// The highest message id it may hold: the watermark once it is stored.
    pub(crate) hi: u64,
}

impl Frozen {
    /// The number of keys.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every key as a run stores it, in order (see [`sorted_entries`]).
    pub(crate) fn sorted_entries(&self) -> impl Iterator<Item = Result<(u64, u64), RunError>> + '_ {
        sorted_entries(&self.shards)
    }
}

/// Every key of `shards` as a run stores it (see [`run_key`]), with its message, in order.
fn sorted_entries(
    shards: &[Vec<Entry>],
) -> impl Iterator<Item = Result<(u64, u64), RunError>> + '_ {
    shards.iter().enumerate().flat_map(|(s, shard)| {
        shard
            .iter()
            .map(move |e| Ok(((s as u64) << 32 | u64::from(e.tag), e.id().0)))
    })
}

/// The messages of a sorted `shard` under the tag `h as u32`, added to `out`.
fn shard_candidates(shard: &[Entry], h: u64, out: &mut Vec<MessageId>) {
    let tag = h as u32;
    let from = shard.partition_point(|e| e.tag < tag);
    out.extend(
        shard[from..]
            .iter()
            .take_while(|e| e.tag == tag)
            .map(Entry::id),
    );
}

impl IdemIndex {
    pub(crate) fn new(hasher: IdemHasher, merged: u64, runs: Vec<Arc<Run>>) -> Self {
        IdemIndex {
            hasher,
            shards: (0..1 << SHARD_BITS).map(|_| Vec::new()).collect(),
            len: 0,
            merged,
            runs,
            frozen: None,
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

    /// The messages whose key may be the one that hashed to `h`, in memory (the frozen part
    /// included).
    pub(crate) fn candidates(&self, h: u64) -> Vec<MessageId> {
        let mut out = Vec::new();
        shard_candidates(self.shard(h), h, &mut out);
        if let Some(f) = &self.frozen {
            shard_candidates(&f.shards[(h >> (64 - SHARD_BITS)) as usize], h, &mut out);
        }
        out
    }

    /// The id above which a key is in the (unfrozen) memory part: a removal below it leaves
    /// the key where it is, pointing at nothing.
    pub(crate) fn memory_floor(&self) -> u64 {
        self.frozen.as_ref().map_or(self.merged, |f| f.hi)
    }

    /// The memory part being written as a run, if one is.
    #[cfg(test)]
    pub(crate) fn frozen(&self) -> Option<&Frozen> {
        self.frozen.as_ref()
    }

    /// Hands the memory part, which holds the keys of messages up to `hi`, to a run writer:
    /// it stays found by lookups until [`IdemIndex::stored`] or [`IdemIndex::thaw`], and
    /// the memory part starts again empty. `None` if one is frozen already.
    pub(crate) fn freeze(&mut self, hi: u64) -> Option<Frozen> {
        if self.frozen.is_some() {
            return None;
        }
        let shards = std::mem::replace(
            &mut self.shards,
            (0..1 << SHARD_BITS).map(|_| Vec::new()).collect(),
        );
        let f = Frozen {
            shards: Arc::new(shards),
            len: std::mem::take(&mut self.len),
            hi,
        };
        self.frozen = Some(f.clone());
        Some(f)
    }

    /// The frozen part is stored as `run` (none if it was empty), and the watermark is its
    /// `hi`.
    pub(crate) fn stored(&mut self, run: Option<Arc<Run>>) {
        if let Some(f) = self.frozen.take() {
            self.merged = f.hi;
        }
        self.runs.extend(run);
    }

    /// The frozen part could not be stored: its keys go back into the memory part.
    pub(crate) fn thaw(&mut self) {
        let Some(f) = self.frozen.take() else {
            return;
        };
        for (shard, old) in self.shards.iter_mut().zip(f.shards.iter()) {
            if old.is_empty() {
                continue;
            }
            shard.extend_from_slice(old);
            shard.sort_unstable();
            shard.dedup();
        }
        self.len = self.shards.iter().map(Vec::len).sum();
    }

    /// The messages of the stored part whose key may be the one that hashed to `h`.
    pub(crate) fn stored_candidates(&self, h: u64) -> Result<Vec<MessageId>, RunError> {
        let mut out = Vec::new();
        for run in &self.runs {
            run.candidates(run_key(h), &mut out)?;
        }
        Ok(out)
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

    /// Every key in memory as a run stores it (see [`run_key`]), with its message, in order.
    #[cfg(test)]
    pub(crate) fn sorted_entries(&self) -> impl Iterator<Item = Result<(u64, u64), RunError>> + '_ {
        sorted_entries(&self.shards)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn index() -> IdemIndex {
        IdemIndex::new(
            IdemHasher::from_seed(&IdemHasher::new_seed()).unwrap(),
            0,
            Vec::new(),
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
        let frozen = idx.freeze(10).unwrap();
        assert_eq!((frozen.len(), idx.len()), (1, 0));
        assert_eq!(idx.candidates(9), vec![a], "found while frozen");
        assert!(idx.freeze(11).is_none(), "one at a time");
        idx.stored(None);
        assert!(idx.candidates(9).is_empty());
        assert_eq!((idx.merged, idx.memory_floor()), (10, 10));
    }

    /// A memory part that could not be stored goes back: every key, old and new, found once,
    /// the shards sorted, the watermark unchanged.
    #[test]
    fn a_thawed_memory_part_merges_back_into_the_new_one() {
        let mut idx = index();
        let keys: Vec<u64> = (0..3000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for (n, &h) in keys.iter().enumerate().take(2000) {
            idx.insert(h, MessageId(n as u64));
        }
        idx.freeze(1999).unwrap();
        assert_eq!(idx.memory_floor(), 1999);
        // Newer keys, and one sharing an old key's hash.
        for (n, &h) in keys.iter().enumerate().skip(2000) {
            idx.insert(h, MessageId(n as u64));
        }
        idx.insert(keys[5], MessageId(5000));
        assert_eq!(idx.candidates(keys[5]), vec![MessageId(5000), MessageId(5)]);
        idx.thaw();
        assert!(idx.frozen().is_none());
        assert_eq!((idx.len(), idx.merged, idx.memory_floor()), (3001, 0, 0));
        assert_eq!(idx.candidates(keys[5]), vec![MessageId(5), MessageId(5000)]);
        for (n, &h) in keys.iter().enumerate().filter(|&(n, _)| n != 5) {
            assert_eq!(idx.candidates(h), vec![MessageId(n as u64)], "key {n}");
        }
        assert!(idx.shards.iter().all(|s| s.windows(2).all(|w| w[0] < w[1])));
        assert!(idx.freeze(3000).is_some(), "and may be frozen again");
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
        let mut b = IdemIndex::new(a.hasher.clone(), 0, Vec::new());
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

    /// What a merge writes (the frozen memory part into a run) is what a lookup of the
    /// stored part finds, the memory part once stored finds nothing, and hashes that agree in
    /// the 44 bits kept are all candidates.
    #[test]
    fn the_memory_part_written_as_a_run_is_found_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = index();
        let hashes: Vec<u64> = (0..5000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        for (n, &x) in hashes.iter().enumerate() {
            idx.insert(x, MessageId(n as u64));
        }
        // Differs from hashes[0] only in bits a run does not keep.
        let twin = hashes[0] ^ 0x000f_ff00_0000_0000;
        idx.insert(twin, MessageId(9999));
        let frozen = idx.freeze(9999).unwrap();
        let run = Run::write(dir.path(), 0, 9999, frozen.sorted_entries())
            .unwrap()
            .unwrap();
        assert_eq!(run.len, 5001);
        idx.stored(Some(Arc::new(run)));
        assert!(idx.candidates(hashes[1]).is_empty());
        for (n, &x) in hashes.iter().enumerate().skip(1) {
            assert_eq!(idx.stored_candidates(x).unwrap(), vec![MessageId(n as u64)]);
        }
        assert_eq!(
            idx.stored_candidates(hashes[0]).unwrap(),
            vec![MessageId(0), MessageId(9999)]
        );
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
