//! The idempotency index: which stored message an idempotency key belongs to.
//!
//! It lives in memory and is rebuilt at open from the messages' metadata, which holds each
//! one's key (as the schedule is; see `schedule`). Stores before schema 5 kept it in sled,
//! one `i` key per message: a sled write at enqueue and a removal at purge, at keys spread
//! over the whole tree (an ESP's own ids), which cost the 64-producer enqueue ~25–35 % of
//! its rate (BENCHMARKS.md, Queue, "Ninth session").
//!
//! It maps a 64-bit hash of the key (SipHash with a key drawn at open, so it cannot be
//! steered from outside) to a message id. A hit is only a candidate: the caller compares the
//! key stored in that message's metadata, so keys whose hashes agree all stay findable.
//!
//! Layout: 4,096 shards picked by the hash's top 12 bits, each a sorted `Vec` of 12-byte
//! entries (32 more bits of the hash, the message id), grown by an eighth at a time: ~13
//! bytes a queued message. Hash tables (the first two versions) cost 30–38 bytes an entry at
//! 16 bytes plus a control byte and their load factor. And one big table had the trouble the
//! shards avoid: reallocated to 35 MiB as it grew, it was `mmap`ed by glibc, and freeing it
//! raised glibc's dynamic mmap threshold to its size, so that from then on the writer's and
//! sled's big transient buffers stayed in the heap (RSS after a 200k fill with an 8 MiB
//! cache was 88–131 MiB against 46–51 MiB; BENCHMARKS.md, Queue, "Ninth session"). So every
//! allocation here stays under glibc's initial 128 KiB threshold: the shard list (96 KiB)
//! and each shard up to ~44M entries in all. An insert or removal moves half a shard on
//! average: ~120 entries at a million. 44 bits of hash in all: a false candidate (one more
//! metadata read) comes about once in 2^44 / entries lookups.
//!
//! Recovery fills the index unsorted (`push`) and sorts each shard once (`finish`): inserting
//! in hash order would move a quadratic amount.

use std::hash::{BuildHasher, RandomState};

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

pub(crate) struct IdemIndex {
    hasher: RandomState,
    /// `1 << SHARD_BITS` sorted shards (unsorted between `push` and `finish`); a hash lives
    /// in the one its top bits name.
    shards: Vec<Vec<Entry>>,
}

impl Default for IdemIndex {
    fn default() -> Self {
        IdemIndex {
            hasher: RandomState::new(),
            shards: (0..1 << SHARD_BITS).map(|_| Vec::new()).collect(),
        }
    }
}

impl IdemIndex {
    fn shard(&self, h: u64) -> &Vec<Entry> {
        &self.shards[(h >> (64 - SHARD_BITS)) as usize]
    }

    fn shard_mut(&mut self, h: u64) -> &mut Vec<Entry> {
        &mut self.shards[(h >> (64 - SHARD_BITS)) as usize]
    }

    pub(crate) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
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
        }
    }

    /// Adds `id` under `h` without keeping its shard sorted: for recovery, which calls
    /// [`IdemIndex::finish`] before the index is used.
    pub(crate) fn push(&mut self, h: u64, id: MessageId) {
        self.shard_mut(h).push(Entry::new(h, id));
    }

    /// Sorts every shard after [`IdemIndex::push`] (dropping repeats) and trims its slack.
    pub(crate) fn finish(&mut self) {
        for shard in &mut self.shards {
            shard.sort_unstable();
            shard.dedup();
            shard.shrink_to(shard.len() + shard.len() / 8);
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
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sharing_a_hash_are_all_found_until_removed() {
        let mut idx = IdemIndex::default();
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
    }

    #[test]
    fn ids_round_trip_and_shards_stay_sorted_through_growth_and_removal() {
        let mut idx = IdemIndex::default();
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
        let mut a = IdemIndex::default();
        let mut b = IdemIndex {
            hasher: a.hasher.clone(),
            ..IdemIndex::default()
        };
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

    #[test]
    fn the_same_key_hashes_alike_and_others_apart() {
        let idx = IdemIndex::default();
        assert_eq!(idx.hash("order-42"), idx.hash("order-42"));
        assert_ne!(idx.hash("order-42"), idx.hash("order-43"));
    }
}
