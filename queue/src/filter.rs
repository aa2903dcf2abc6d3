//! A Bloom filter of the suppression list's keys, kept by the writer, so that an enqueue
//! reads sled only for the recipients that may be on the list.
//!
//! It never forgets: a suppression that is removed, or whose request is rolled back, stays
//! a (harmless) false positive until the filter is rebuilt from sled, which happens when it
//! holds more keys than it was sized for. A miss is therefore always a true miss.

use std::hash::BuildHasher;

/// Bits per key the filter is sized for; with [`PROBES`] probes about 1 % false positives.
const BITS_PER_KEY: u64 = 10;
const PROBES: u64 = 7;
/// Smallest number of keys a filter is sized for (8 KiB of bits).
const MIN_CAPACITY: u64 = 1 << 12;

pub(crate) struct SuppressionFilter {
    bits: Vec<u64>,
    /// Number of bits minus one; the number of bits is a power of two.
    mask: u64,
    hasher: std::collections::hash_map::RandomState,
    inserted: u64,
    capacity: u64,
}

impl SuppressionFilter {
    /// An empty filter sized for twice `keys`, at least [`MIN_CAPACITY`].
    pub(crate) fn with_room_for(keys: u64) -> SuppressionFilter {
        let capacity = keys.saturating_mul(2).max(MIN_CAPACITY);
        let nbits = capacity.saturating_mul(BITS_PER_KEY).next_power_of_two();
        SuppressionFilter {
            bits: vec![0; usize::try_from(nbits / 64).unwrap_or(usize::MAX)],
            mask: nbits - 1,
            hasher: std::collections::hash_map::RandomState::new(),
            inserted: 0,
            capacity,
        }
    }

    /// The filter of every key of sled's suppression list (`prefix`), which holds about
    /// `keys` keys (the queue's count; it only sizes the filter).
    pub(crate) fn build(
        db: &sled::Db,
        prefix: u8,
        keys: u64,
    ) -> Result<SuppressionFilter, sled::Error> {
        let mut f = SuppressionFilter::with_room_for(keys);
        for k in db.scan_prefix([prefix]).keys() {
            f.insert(&k?);
        }
        Ok(f)
    }

    /// The bit positions of `key` (double hashing from one 64-bit hash).
    fn probes(&self, key: &[u8]) -> impl Iterator<Item = u64> {
        let h = self.hasher.hash_one(key);
        let step = h.rotate_left(32) | 1;
        let mask = self.mask;
        (0..PROBES).map(move |i| h.wrapping_add(i.wrapping_mul(step)) & mask)
    }

    pub(crate) fn insert(&mut self, key: &[u8]) {
        for bit in self.probes(key) {
            if let Some(word) = self.bits.get_mut((bit / 64) as usize) {
                *word |= 1 << (bit % 64);
            }
        }
        self.inserted += 1;
    }

    /// False only if `key` was never inserted.
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        self.probes(key).all(|bit| {
            self.bits
                .get((bit / 64) as usize)
                .is_none_or(|word| word & (1 << (bit % 64)) != 0)
        })
    }

    /// More keys inserted than it was sized for: time to rebuild it from sled.
    pub(crate) fn is_full(&self) -> bool {
        self.inserted > self.capacity
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn inserted_keys_are_always_found_and_few_others_are() {
        let mut f = SuppressionFilter::with_room_for(10_000);
        for i in 0..20_000 {
            f.insert(format!("xuser{i}@x.test").as_bytes());
        }
        for i in 0..20_000 {
            assert!(f.may_contain(format!("xuser{i}@x.test").as_bytes()));
        }
        let false_positives = (0..100_000)
            .filter(|i| f.may_contain(format!("xother{i}@y.test").as_bytes()))
            .count();
        // Sized for 20,000 keys at >= 10 bits each: ~1 % false positives.
        assert!(false_positives < 1_000, "{false_positives} false positives");
        assert!(!f.is_full());
    }

    #[test]
    fn full_after_more_keys_than_its_capacity() {
        let mut f = SuppressionFilter::with_room_for(0);
        for i in 0..=MIN_CAPACITY {
            assert!(!f.is_full());
            f.insert(&i.to_be_bytes());
        }
        assert!(f.is_full());
    }

    #[test]
    fn built_from_sled_holds_every_key_with_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        for i in 0..1_000u32 {
            db.insert([&[b'x'][..], &i.to_be_bytes()].concat(), &[])
                .unwrap();
        }
        db.insert(b"other", &[]).unwrap();
        let f = SuppressionFilter::build(&db, b'x', 1_000).unwrap();
        for i in 0..1_000u32 {
            assert!(f.may_contain(&[&[b'x'][..], &i.to_be_bytes()].concat()));
        }
        assert_eq!(f.inserted, 1_000);
    }
}
