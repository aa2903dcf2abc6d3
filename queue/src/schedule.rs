//! The schedule (which recipients are due when) and the leases, kept in memory.
//!
//! Both are derived state. The records on disk say which recipients are `Scheduled` and
//! when their next attempt is; `recover` rebuilds this index from them at open, in the scan
//! of every record that it does anyway. A lease lives only in memory: on disk a leased
//! recipient still reads `Scheduled`, which is exactly what a crash must turn a lease back
//! into. Keeping them out of sled saves, per delivered recipient, the schedule entry written
//! at enqueue and removed at the lease, and the record rewritten for the lease: three of
//! nine sled writes (BENCHMARKS.md, "Fourth session", has what that bought).
//!
//! Memory: one `BTreeMap` entry per scheduled recipient, and one `HashMap` entry per lease.
//! An entry is 24 bytes: the key packed as five `u32`s (due time, message id, recipient
//! index: 20 bytes, where the tuple `(u64, RecipientId)` takes 24 with its padding) and the
//! created time as a `u32` of milliseconds before the due time. That is exact from 0 to 49
//! days; a longer gap, or a due time before the created time (the clock stepped back between
//! them, or a caller's deferral into the past), is stored as "not known" and then whoever
//! needs the created time for expiry reads the record's own. Against 32 bytes unpacked that
//! is a quarter less.
//!
//! New entries mostly come in ascending order (a fresh message is due now), and the standard
//! `BTreeMap` splits a full node so that the left part keeps 6 of its 11 slots: a tree grown
//! by appends is about half full (61–66 bytes an unpacked entry). So once the entries added
//! since the last time outnumber a quarter of the tree (and 64Ki), `add` repacks it: `append`
//! of two non-empty maps rebuilds the whole tree from their merged, sorted entries with full
//! nodes.
//! That keeps ~31 bytes an entry (BENCHMARKS.md, Queue, "Tenth session"), for ~90 ns of
//! copying per added entry, paid in pauses that grow with the tree: ~25 ms at a million
//! entries on the benchmark machine. The writer holds the schedule's lock meanwhile, so a
//! `renew_leases` or `stats` call (the engine's, a metrics scrape) waits for it too.

use std::collections::{BTreeMap, HashMap};

use crate::RecipientId;

/// Schedule order: due time, then recipient id.
type Key = (u64, RecipientId);

/// A [`Key`] as five `u32`s, most significant first, so that the derived order is the key's.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Packed([u32; 5]);

impl Packed {
    fn new((due, rid): Key) -> Packed {
        let m = rid.message.0;
        Packed([
            (due >> 32) as u32,
            due as u32,
            (m >> 32) as u32,
            m as u32,
            rid.index,
        ])
    }

    fn key(self) -> Key {
        let [d1, d0, m1, m0, index] = self.0;
        (
            u64::from(d1) << 32 | u64::from(d0),
            RecipientId {
                message: crate::MessageId(u64::from(m1) << 32 | u64::from(m0)),
                index,
            },
        )
    }
}

/// The stored age of an entry whose created time is not `due - age` (see the module docs).
const INEXACT: u32 = u32::MAX;

/// The created time as stored next to its due time: milliseconds before it, or [`INEXACT`].
fn age(due_ms: u64, created_ms: u64) -> u32 {
    due_ms
        .checked_sub(created_ms)
        .and_then(|gap| u32::try_from(gap).ok())
        .filter(|&gap| gap != INEXACT)
        .unwrap_or(INEXACT)
}

fn created(due_ms: u64, age: u32) -> Option<u64> {
    (age != INEXACT).then(|| due_ms - u64::from(age))
}

/// The tree is repacked when more than `max(len / REPACK_DIVISOR, REPACK_MIN)` entries were
/// added since the last repack.
const REPACK_DIVISOR: usize = 4;
const REPACK_MIN: usize = 1 << 16;

#[derive(Default)]
pub(crate) struct Schedule {
    /// (due ms, recipient) → ms from created to due (for expiry without reading the record).
    due: BTreeMap<Packed, u32>,
    /// Entries added to `due` since it was last repacked.
    added: usize,
    /// Leased recipient → when it was leased (ms).
    leased: HashMap<RecipientId, u64>,
}

/// One change, as the undo log of a request records it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Undo {
    /// `due` gained this entry (undo: remove it).
    Added(u64, RecipientId),
    /// `due` lost this entry, with its stored age (undo: put it back).
    Removed(u64, RecipientId, u32),
    /// This recipient was leased (undo: release it).
    Leased(RecipientId),
    /// This lease, taken at the given time, was dropped (undo: take it again).
    Unleased(RecipientId, u64),
}

impl Schedule {
    /// Schedules `rid` at `due_ms`. Returns the undo entry, or `None` if it was already there.
    pub(crate) fn add(&mut self, due_ms: u64, rid: RecipientId, created_ms: u64) -> Option<Undo> {
        let key = Packed::new((due_ms, rid));
        match self.due.insert(key, age(due_ms, created_ms)) {
            None => {
                self.added += 1;
                if self.added > REPACK_MIN.max(self.due.len() / REPACK_DIVISOR) {
                    self.repack();
                }
                Some(Undo::Added(due_ms, rid))
            }
            Some(_) => None,
        }
    }

    /// Rebuilds `due` with full nodes (see the module docs). Its entries do not change, so
    /// undo logs stay valid.
    pub(crate) fn repack(&mut self) {
        self.added = 0;
        let Some(&first) = self.due.keys().next() else {
            return;
        };
        // `append` only rebuilds when both maps have entries: one map of the first entry,
        // one of the rest.
        let mut rest = self.due.split_off(&first);
        if let Some((k, v)) = rest.pop_first() {
            self.due.insert(k, v);
        }
        self.due.append(&mut rest);
    }

    pub(crate) fn remove(&mut self, due_ms: u64, rid: RecipientId) -> Option<Undo> {
        self.due
            .remove(&Packed::new((due_ms, rid)))
            .map(|age| Undo::Removed(due_ms, rid, age))
    }

    pub(crate) fn lease(&mut self, rid: RecipientId, at_ms: u64) -> Option<Undo> {
        match self.leased.entry(rid) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(at_ms);
                Some(Undo::Leased(rid))
            }
        }
    }

    pub(crate) fn unlease(&mut self, rid: RecipientId) -> Option<Undo> {
        self.leased.remove(&rid).map(|at| Undo::Unleased(rid, at))
    }

    /// The recipients leased before `cutoff_ms`.
    pub(crate) fn leased_before(&self, cutoff_ms: u64) -> Vec<RecipientId> {
        self.leased
            .iter()
            .filter(|(_, at)| **at < cutoff_ms)
            .map(|(rid, _)| *rid)
            .collect()
    }

    /// Restarts the clock of `rid`'s lease, if it is leased.
    pub(crate) fn renew(&mut self, rid: RecipientId, at_ms: u64) -> bool {
        match self.leased.get_mut(&rid) {
            Some(at) => {
                *at = (*at).max(at_ms);
                true
            }
            None => false,
        }
    }

    /// When `rid` was leased, if it is.
    pub(crate) fn leased_at(&self, rid: RecipientId) -> Option<u64> {
        self.leased.get(&rid).copied()
    }

    /// Undoes a log of changes, newest first.
    pub(crate) fn undo_all(
        &mut self,
        log: impl IntoIterator<Item = Undo, IntoIter: DoubleEndedIterator>,
    ) {
        for u in log.into_iter().rev() {
            self.undo(u);
        }
    }

    pub(crate) fn undo(&mut self, u: Undo) {
        match u {
            Undo::Added(due, rid) => {
                self.due.remove(&Packed::new((due, rid)));
            }
            Undo::Removed(due, rid, age) => {
                self.due.insert(Packed::new((due, rid)), age);
            }
            Undo::Leased(rid) => {
                self.leased.remove(&rid);
            }
            Undo::Unleased(rid, at) => {
                self.leased.insert(rid, at);
            }
        }
    }

    /// Up to `max` entries due at or before `now_ms`, in schedule order, starting after
    /// `after` (exclusive): `(due, recipient, created)`, created `None` where the schedule
    /// does not know it exactly (see the module docs).
    pub(crate) fn due(
        &self,
        now_ms: u64,
        after: Option<Key>,
        max: usize,
    ) -> Vec<(u64, RecipientId, Option<u64>)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let lower = match after {
            Some(k) => Excluded(Packed::new(k)),
            None => Unbounded,
        };
        self.due
            .range((lower, Unbounded))
            .map(|(k, &age)| (k.key(), age))
            .take_while(|((due, _), _)| *due <= now_ms)
            .take(max)
            .map(|((due, rid), age)| (due, rid, created(due, age)))
            .collect()
    }

    /// The earliest due time.
    pub(crate) fn oldest_due(&self) -> Option<u64> {
        self.due.keys().next().map(|k| k.key().0)
    }

    /// Scheduled entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageId;

    fn rid(m: u64, i: u32) -> RecipientId {
        RecipientId {
            message: MessageId(m),
            index: i,
        }
    }

    #[test]
    fn due_entries_come_in_order_and_in_pages() {
        let mut s = Schedule::default();
        s.add(30, rid(1, 0), 1);
        s.add(10, rid(2, 1), 2);
        s.add(10, rid(2, 0), 2);
        s.add(99, rid(3, 0), 3);
        let all = s.due(50, None, 10);
        let order: Vec<_> = all.iter().map(|(d, r, _)| (*d, *r)).collect();
        assert_eq!(
            order,
            vec![(10, rid(2, 0)), (10, rid(2, 1)), (30, rid(1, 0))],
            "due ≤ 50 only, by (due, id)"
        );
        let first = s.due(50, None, 2);
        assert_eq!(first.len(), 2);
        let (d, r, _) = first[1];
        let rest = s.due(50, Some((d, r)), 2);
        assert_eq!(rest, vec![(30, rid(1, 0), Some(1))]);
        assert_eq!(s.oldest_due(), Some(10));
    }

    #[test]
    fn undo_reverses_every_change() {
        let mut s = Schedule::default();
        s.add(5, rid(1, 0), 1);
        let mut log = Vec::new();
        log.extend(s.remove(5, rid(1, 0)));
        log.extend(s.lease(rid(1, 0), 7));
        log.extend(s.add(9, rid(2, 0), 2));
        log.extend(s.unlease(rid(1, 0)));
        assert_eq!(log.len(), 4);
        assert!(s.leased_at(rid(1, 0)).is_none());
        s.undo_all(log);
        assert_eq!(s.due(100, None, 10), vec![(5, rid(1, 0), Some(1))]);
        assert!(s.leased_at(rid(1, 0)).is_none());
        assert_eq!(s.len(), 1);
    }

    /// Repacking keeps every entry and its order, and happens on its own once enough was
    /// added (it changes no entry, so an undo log written across it still applies). That it
    /// saves memory is measured by the queue benchmark, not here.
    #[test]
    fn repacking_keeps_every_entry() {
        let mut s = Schedule::default();
        let n = REPACK_MIN as u64 + 10;
        let mut log = Vec::new();
        for m in 0..n {
            log.extend(s.add(1_000 + m / 3, rid(m, 0), m / 3));
        }
        assert!(s.added < 11, "repacked on the way: {} added since", s.added);
        assert_eq!(s.len() as u64, n);
        s.add(5, rid(n, 1), 2);
        s.repack();
        assert_eq!(s.added, 0);
        let all = s.due(u64::MAX, None, usize::MAX);
        assert_eq!(all.len() as u64, n + 1);
        assert_eq!(all[0], (5, rid(n, 1), Some(2)));
        assert!(all.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)));
        assert_eq!(
            all[1..].iter().map(|e| e.2).collect::<Vec<_>>(),
            (0..n).map(|m| Some(m / 3)).collect::<Vec<_>>()
        );
        s.undo_all(log);
        assert_eq!(s.due(u64::MAX, None, 10), vec![(5, rid(n, 1), Some(2))]);
        // Empty and one-entry trees too.
        let mut e = Schedule::default();
        e.repack();
        e.add(1, rid(1, 0), 1);
        e.repack();
        assert_eq!(e.due(9, None, 9), vec![(1, rid(1, 0), Some(1))]);
    }

    /// Packed keys order as the keys do and unpack to them, and entries come back with their
    /// exact created time, or `None` where it is not `due - age` for a `u32` age.
    #[test]
    fn packed_entries_keep_order_and_created_time() {
        let edges = [
            0u64,
            1,
            2,
            u32::MAX as u64,
            1 << 32,
            (1 << 32) + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut keys = Vec::new();
        for &due in &edges {
            for &m in &edges {
                for index in [0, 1, u32::MAX] {
                    keys.push((due, rid(m, index)));
                }
            }
        }
        for &a in &keys {
            assert_eq!(Packed::new(a).key(), a);
            for &b in &keys {
                assert_eq!(
                    Packed::new(a).cmp(&Packed::new(b)),
                    a.cmp(&b),
                    "{a:?} {b:?}"
                );
            }
        }
        let mut s = Schedule::default();
        for (i, &(due, r)) in keys.iter().enumerate() {
            s.add(due, r, due.saturating_sub(i as u64));
        }
        let got = s.due(u64::MAX, None, usize::MAX);
        let mut want = keys.clone();
        want.sort();
        assert_eq!(
            got.iter().map(|&(d, r, _)| (d, r)).collect::<Vec<_>>(),
            want
        );
        for &(due, r, created) in &got {
            let i = keys.iter().position(|k| *k == (due, r)).expect("added") as u64;
            assert_eq!(created, Some(due.saturating_sub(i)), "{r}");
        }
        // Not known: a gap of 2^32 - 1 ms or more (49.7 days), a due time before the
        // created time (a clock step, a caller's deferral into the past). An undo puts
        // such an entry back as it was.
        let mut far = Schedule::default();
        let due = 100 * 86_400_000;
        far.add(due, rid(1, 0), 0);
        far.add(due, rid(1, 1), due - (u32::MAX as u64 - 1));
        far.add(due, rid(1, 2), due - u32::MAX as u64);
        far.add(due, rid(2, 0), due + 10);
        assert_eq!(
            far.due(due, None, 9),
            vec![
                (due, rid(1, 0), None),
                (due, rid(1, 1), Some(due - (u32::MAX as u64 - 1))),
                (due, rid(1, 2), None),
                (due, rid(2, 0), None),
            ]
        );
        let undo = far.remove(due, rid(1, 0)).expect("there");
        far.undo(undo);
        assert_eq!(far.due(due, None, 1), vec![(due, rid(1, 0), None)]);
    }

    #[test]
    fn adding_twice_or_removing_what_is_absent_changes_nothing() {
        let mut s = Schedule::default();
        assert!(s.add(5, rid(1, 0), 1).is_some());
        assert!(s.add(5, rid(1, 0), 1).is_none());
        assert!(s.remove(6, rid(1, 0)).is_none());
        assert!(s.lease(rid(1, 0), 1).is_some());
        assert!(s.lease(rid(1, 0), 2).is_none());
        assert_eq!(s.leased_at(rid(1, 0)), Some(1));
        assert_eq!(s.len(), 1);
    }
}
