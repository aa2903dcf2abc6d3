//! The idempotency index: which stored message an idempotency key belongs to.
//!
//! It lives in memory and is rebuilt at open from the messages' metadata, which holds each
//! one's key (as the schedule is; see `schedule`). Stores before schema 5 kept it in sled,
//! one `i` key per message: a sled write at enqueue and a removal at purge, at keys spread
//! over the whole tree (an ESP's own ids), which cost the 64-producer enqueue ~25–35 % of
//! its rate (BENCHMARKS.md, Queue, "Ninth session").
//!
//! It maps a 64-bit hash of the key (SipHash with a key drawn at open, so it cannot be
//! steered from outside) to a message id: 16 bytes an entry, where the key itself would be
//! up to 512. A hit is only a candidate: the caller compares the key stored in that
//! message's metadata. Two keys with the same hash both stay findable (`more`).
//!
//! The map is split in 2,048 small tables by the hash's top bits. One table of a million
//! entries is reallocated to 35 MiB as it grows, and freeing such a table (glibc allocates
//! it with `mmap`) raises glibc's dynamic mmap threshold to its size: from then on the
//! writer's and sled's big transient buffers stay in the heap, and RSS after a 200k fill
//! with an 8 MiB cache was 88–131 MiB against 46–51 MiB (43 MiB with the threshold pinned
//! by `MALLOC_MMAP_THRESHOLD_`; BENCHMARKS.md, Queue, "Ninth session"). A table of the
//! split map stays under glibc's initial 128 KiB threshold up to ~7M entries in all.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasher, RandomState};

use crate::MessageId;

const SHARD_BITS: u32 = 11;

pub(crate) struct IdemIndex {
    hasher: RandomState,
    /// `1 << SHARD_BITS` tables; a hash lives in the one its top bits name.
    ids: Vec<HashMap<u64, MessageId>>,
    /// Further messages whose key has a hash already in `ids` (practically always empty).
    more: HashMap<u64, Vec<MessageId>>,
}

impl Default for IdemIndex {
    fn default() -> Self {
        IdemIndex {
            hasher: RandomState::new(),
            ids: (0..1 << SHARD_BITS).map(|_| HashMap::new()).collect(),
            more: HashMap::new(),
        }
    }
}

impl IdemIndex {
    fn table(&mut self, h: u64) -> &mut HashMap<u64, MessageId> {
        &mut self.ids[(h >> (64 - SHARD_BITS)) as usize]
    }

    pub(crate) fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The messages whose key may be the one that hashed to `h`.
    pub(crate) fn candidates(&self, h: u64) -> Vec<MessageId> {
        let table = &self.ids[(h >> (64 - SHARD_BITS)) as usize];
        let mut out: Vec<MessageId> = table.get(&h).copied().into_iter().collect();
        if let Some(more) = self.more.get(&h) {
            out.extend_from_slice(more);
        }
        out
    }

    pub(crate) fn insert(&mut self, h: u64, id: MessageId) {
        match self.table(h).entry(h) {
            Entry::Vacant(e) => {
                e.insert(id);
            }
            Entry::Occupied(e) if *e.get() == id => {}
            Entry::Occupied(_) => {
                let more = self.more.entry(h).or_default();
                if !more.contains(&id) {
                    more.push(id);
                }
            }
        }
    }

    pub(crate) fn remove(&mut self, h: u64, id: MessageId) {
        if self.table(h).get(&h) == Some(&id) {
            match self.more.get_mut(&h).and_then(Vec::pop) {
                Some(next) => {
                    self.table(h).insert(h, next);
                    if self.more.get(&h).is_some_and(Vec::is_empty) {
                        self.more.remove(&h);
                    }
                }
                None => {
                    self.table(h).remove(&h);
                }
            }
        } else if let Some(more) = self.more.get_mut(&h) {
            more.retain(|&m| m != id);
            if more.is_empty() {
                self.more.remove(&h);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ids.iter().map(HashMap::len).sum::<usize>()
            + self.more.values().map(Vec::len).sum::<usize>()
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
        assert!(idx.more.is_empty());
    }

    #[test]
    fn the_same_key_hashes_alike_and_others_apart() {
        let idx = IdemIndex::default();
        assert_eq!(idx.hash("order-42"), idx.hash("order-42"));
        assert_ne!(idx.hash("order-42"), idx.hash("order-43"));
    }
}
