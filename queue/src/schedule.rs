//! The schedule (which recipients are due when) and the leases, kept in memory: an entry
//! per zone of ~64 recipients, not per recipient.
//!
//! Both are derived state. The records on disk say which recipients are `Scheduled` and
//! when their next attempt is; `recover` rebuilds this index from them at open, in the scan
//! of every record that it does anyway. A lease lives only in memory: on disk a leased
//! recipient still reads `Scheduled`, which is exactly what a crash must turn a lease back
//! into. Keeping them out of sled saves, per delivered recipient, the schedule entry written
//! at enqueue and removed at the lease, and the record rewritten for the lease: three of
//! nine sled writes (BENCHMARKS.md, "Fourth session", has what that bought).
//!
//! # Zones
//!
//! The schedule does not hold an entry per scheduled recipient (that was ~31 bytes each, the
//! biggest part of what a queued message cost in memory beyond sled's cache: BENCHMARKS.md,
//! Queue, "Thirteenth session"). It splits the recipient ids, in their order (message id,
//! then index), into *zones* of about [`ZONE_SIZE`] consecutive recipients, and keeps per
//! zone only a lower bound of the due times and of the created times of its scheduled,
//! unleased recipients, and how many of them are leased. To find what is due, the queue
//! reads the records of the zones whose bound is due (a range of sled keys each), picks the
//! recipients that really are, and then sets the zone's bound to the exact one it just saw
//! ([`Schedule::settle`]).
//!
//! The invariant everything rests on: **every scheduled, unleased recipient is in a zone whose
//! bound is at most its due time and its created time.** Scheduling one lowers its zone's
//! bound ([`Schedule::add`]); a recipient leaving the schedule (leased, final, deleted)
//! changes nothing (the bound is still a lower bound); a read of the whole zone makes it
//! exact. So a bound can be too early (a zone read for nothing, or `oldest_due` earlier than
//! the true oldest until that zone is next read), never too late.
//!
//! New recipients come in ascending id order (message ids grow), so they go into the last
//! zone, and a new zone starts once the last one has had the zone size of them
//! ([`ZONE_SIZE`] to begin with). A zone
//! whose read found nothing scheduled, and that has no lease, is *empty*; two empty zones
//! next to each other are merged, so a drained queue keeps a handful of zones, not one per
//! 64 recipients it ever had. A merged zone is *closed*: its range may span many final
//! records (a zone read reads them too, until they are purged), so new recipients start a
//! zone of their own. A zone with a lease is not merged: its recipient may be
//! scheduled again (a deferral), and would then make a merged zone's whole range due.
//!
//! # Coarsening: memory bounded by the zone count, not the queue depth
//!
//! A zone costs ~140 bytes (a `BTreeMap` entry, and a `BTreeSet` entry when it has a bound:
//! 2.2 bytes per queued recipient at [`ZONE_SIZE`], measured, BENCHMARKS.md, Queue,
//! "Sixteenth session"), plus one `HashMap` entry per lease (bounded by what is in
//! flight). So that a deep queue does not cost memory in proportion, the schedule keeps
//! at most about `max_zones` zones: when a new zone would go past that, it first
//! *coarsens* ([`Schedule::coarsen`]): neighbouring zones are merged while together they
//! have had at most twice the zone size of recipients, and the zone size doubles for the
//! zones to come. A merged zone's bound is the lower of the two, so the invariant holds;
//! what it costs is reading more records per zone read (up to the zone size). When the
//! queue has drained to a quarter of `max_zones` zones, new zones are made smaller again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{MessageId, RecipientId};

/// New recipients per zone to begin with (coarsening doubles it, see the module docs). A
/// zone read costs one sled range scan of up to that many messages' metadata (and, for
/// messages of several recipients, a read per record); a zone costs [`ZONE_BYTES`].
pub(crate) const ZONE_SIZE: u32 = 64;

/// What a zone costs in memory: its `BTreeMap` entry and its `BTreeSet` entry, ~141 bytes as
/// measured (BENCHMARKS.md, Queue, "Sixteenth session"), rounded up.
pub(crate) const ZONE_BYTES: u64 = 144;

/// The first zone starts here, so that every recipient id is in some zone.
const FIRST: RecipientId = RecipientId {
    message: MessageId(0),
    index: 0,
};

/// Lower bounds of a zone's scheduled, unleased recipients' due times and created times
/// (milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bound {
    pub(crate) due: u64,
    pub(crate) created: u64,
}

impl Bound {
    pub(crate) fn lower(a: Option<Bound>, b: Bound) -> Bound {
        match a {
            Some(a) => Bound {
                due: a.due.min(b.due),
                created: a.created.min(b.created),
            },
            None => b,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Zone {
    /// `None`: no scheduled, unleased recipient (as of the last read of the zone).
    bound: Option<Bound>,
    /// Leased recipients in the zone (exact).
    leased: u32,
    /// Recipients noted in its range (decides when the last zone is full, and how much a
    /// zone read of it may cost when coarsening; not lowered by a purge).
    added: u32,
    /// Takes no new recipients (a merge of empty zones, whose range may span any number
    /// of final records).
    closed: bool,
}

impl Zone {
    fn is_empty(&self) -> bool {
        self.bound.is_none() && self.leased == 0
    }
}

pub(crate) struct Schedule {
    /// Zone start → zone; a zone holds the ids from its start to the next zone's start.
    zones: BTreeMap<RecipientId, Zone>,
    /// (bound's due time, zone start) of every zone with a bound.
    by_due: BTreeSet<(u64, RecipientId)>,
    /// The highest recipient id ever added: an id above it is new, and goes to the last zone.
    newest: Option<RecipientId>,
    /// Leased recipient → when it was leased (ms).
    leased: HashMap<RecipientId, u64>,
    /// New recipients per new zone: [`ZONE_SIZE`], doubled by each coarsening.
    zone_size: u32,
    /// Coarsen when a new zone would make more zones than this.
    max_zones: usize,
    /// ... and at least this many (more than `max_zones` when a coarsening could not halve
    /// the zones, so that each one is paid for by as many new zones as it left).
    coarsen_at: usize,
}

impl Schedule {
    /// An empty schedule whose zones take about `bytes` of memory at most (see the module
    /// docs).
    pub(crate) fn with_memory(bytes: u64) -> Self {
        Schedule::new(usize::try_from(bytes / ZONE_BYTES).unwrap_or(usize::MAX))
    }

    /// An empty schedule that keeps about `max_zones` zones at most (see the module docs;
    /// at least 4).
    pub(crate) fn new(max_zones: usize) -> Self {
        let max_zones = max_zones.max(4);
        Schedule {
            zones: BTreeMap::from([(FIRST, Zone::default())]),
            by_due: BTreeSet::new(),
            newest: None,
            leased: HashMap::new(),
            zone_size: ZONE_SIZE,
            max_zones,
            coarsen_at: max_zones,
        }
    }
}

/// One change, as the undo log of a request records it. Undone newest first, each finds the
/// schedule as it left it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Undo {
    /// The zone starting here was this (`None`: did not exist; undo: put it back).
    Zone(RecipientId, Option<Zone>),
    /// This recipient was leased (undo: release it).
    Leased(RecipientId),
    /// This lease, taken at the given time, was dropped (undo: take it again).
    Unleased(RecipientId, u64),
    /// The zone size was this.
    ZoneSize(u32),
}

impl Schedule {
    /// The start of the zone that holds `rid`.
    fn start_of(&self, rid: RecipientId) -> RecipientId {
        self.zones
            .range(..=rid)
            .next_back()
            .map_or(FIRST, |(s, _)| *s)
    }

    /// Replaces the zone at `start` (keeping `by_due` in step); returns what was there.
    fn put(&mut self, start: RecipientId, zone: Option<Zone>) -> Option<Zone> {
        let old = match zone {
            Some(z) => self.zones.insert(start, z),
            None => self.zones.remove(&start),
        };
        let old_due = old.and_then(|z| z.bound).map(|b| b.due);
        let new_due = zone.and_then(|z| z.bound).map(|b| b.due);
        if old_due != new_due {
            if let Some(d) = old_due {
                self.by_due.remove(&(d, start));
            }
            if let Some(d) = new_due {
                self.by_due.insert((d, start));
            }
        }
        old
    }

    /// `put`, logged.
    fn change(&mut self, start: RecipientId, zone: Option<Zone>, log: &mut Vec<Undo>) {
        let old = self.put(start, zone);
        if old != zone {
            log.push(Undo::Zone(start, old));
        }
    }

    /// Notes that recipient `rid` exists (scheduled or not: the open notes final ones too,
    /// so that a zone spans about the zone size in recipients, not that many scheduled ones
    /// among any number of final ones). A new one (above every id noted so far) is counted
    /// in the last zone, and starts a new zone when that one is full or closed; an empty
    /// last zone is merged first, and the zones are coarsened first if there are too many.
    pub(crate) fn note(&mut self, rid: RecipientId, log: &mut Vec<Undo>) {
        if self.newest.is_some_and(|n| rid <= n) {
            return;
        }
        // Not undone: a failed enqueue's ids are never handed out again, so a later id is
        // still above it.
        self.newest = Some(rid);
        let (&last, &zone) = self.zones.last_key_value().expect("the first zone stays");
        if (zone.closed || zone.added >= self.zone_size) && rid > last {
            self.merge_empty(last, log);
            if self.zones.len() >= self.coarsen_at {
                self.coarsen(log);
            } else if self.zones.len() < self.max_zones / 4 && self.zone_size > ZONE_SIZE {
                self.set_zone_size(self.zone_size / 2, log);
                self.coarsen_at = self.max_zones;
            }
            // Coarsening may have merged the last zone into one that is not full yet.
            let (&last, &zone) = self.zones.last_key_value().expect("the first zone stays");
            if zone.closed || zone.added >= self.zone_size {
                debug_assert!(rid > last);
                self.change(rid, Some(Zone::default()), log);
            }
        }
        let start = self.start_of(rid);
        let mut zone = self.zones[&start];
        zone.added = zone.added.saturating_add(1);
        self.change(start, Some(zone), log);
    }

    /// Schedules `rid` at `due_ms` (created at `created_ms`): notes it, and lowers its zone's
    /// bound.
    pub(crate) fn add(
        &mut self,
        due_ms: u64,
        rid: RecipientId,
        created_ms: u64,
        log: &mut Vec<Undo>,
    ) {
        self.note(rid, log);
        let start = self.start_of(rid);
        let mut zone = self.zones[&start];
        zone.bound = Some(Bound::lower(
            zone.bound,
            Bound {
                due: due_ms,
                created: created_ms,
            },
        ));
        self.change(start, Some(zone), log);
    }

    /// The zone starting at `start` was read whole: `bound` is the exact bound of its
    /// scheduled, unleased recipients (`None`: it has none). An empty zone is merged with
    /// empty neighbours.
    pub(crate) fn settle(&mut self, start: RecipientId, bound: Option<Bound>, log: &mut Vec<Undo>) {
        let Some(&zone) = self.zones.get(&start) else {
            return;
        };
        self.change(start, Some(Zone { bound, ..zone }), log);
        self.merge_empty(start, log);
    }

    fn set_zone_size(&mut self, size: u32, log: &mut Vec<Undo>) {
        log.push(Undo::ZoneSize(self.zone_size));
        self.zone_size = size;
    }

    /// Doubles the zone size, and merges each run of neighbouring zones that together have
    /// had at most that many recipients into its first zone (bounds lowered to the lowest,
    /// leases added up). Runs of empty zones that were merged earlier may be too big to
    /// merge further: a queue that alternates such runs with zones in use keeps more zones
    /// (at most twice those in use), and the next coarsening then waits until their number
    /// has doubled.
    pub(crate) fn coarsen(&mut self, log: &mut Vec<Undo>) {
        let size = self.zone_size.saturating_mul(2);
        self.set_zone_size(size, log);
        let zones: Vec<(RecipientId, Zone)> = self.zones.iter().map(|(s, z)| (*s, *z)).collect();
        let mut run: Option<(RecipientId, Zone)> = None;
        for (start, zone) in zones {
            match &mut run {
                Some((_, r)) if u64::from(r.added) + u64::from(zone.added) <= u64::from(size) => {
                    self.change(start, None, log);
                    *r = Zone {
                        bound: match zone.bound {
                            Some(b) => Some(Bound::lower(r.bound, b)),
                            None => r.bound,
                        },
                        leased: r.leased.saturating_add(zone.leased),
                        added: r.added + zone.added,
                        closed: zone.closed,
                    };
                }
                _ => {
                    if let Some((s, z)) = run.replace((start, zone)) {
                        self.change(s, Some(z), log);
                    }
                }
            }
        }
        if let Some((s, z)) = run {
            self.change(s, Some(z), log);
        }
        self.coarsen_at = self.max_zones.max(2 * self.zones.len());
    }

    /// If the zone at `start` is empty, merges it with the next zone and into the previous
    /// one where those are empty too (the first zone is never removed).
    fn merge_empty(&mut self, start: RecipientId, log: &mut Vec<Undo>) {
        if !self.zones.get(&start).is_some_and(Zone::is_empty) {
            return;
        }
        use std::ops::Bound::{Excluded, Unbounded};
        let next = self
            .zones
            .range((Excluded(start), Unbounded))
            .next()
            .map(|(s, z)| (*s, *z));
        // A merged zone is closed, so that new recipients start a zone of their own instead
        // of joining a range that may span many final records (read with it).
        let merged = |a: Zone, b: Zone| Zone {
            added: a.added.saturating_add(b.added),
            closed: true,
            ..Zone::default()
        };
        if let Some((s, z)) = next.filter(|(_, z)| z.is_empty()) {
            let here = self.zones[&start];
            self.change(s, None, log);
            self.change(start, Some(merged(here, z)), log);
        }
        let prev = self.zones.range(..start).next_back().map(|(s, z)| (*s, *z));
        if let Some((s, z)) = prev.filter(|(_, z)| z.is_empty()) {
            let here = self.zones[&start];
            self.change(start, None, log);
            self.change(s, Some(merged(z, here)), log);
        }
    }

    /// The ids of the zone starting at `start`: from `start` up to (not including) the
    /// returned end, `None` for the last zone.
    pub(crate) fn zone_end(&self, start: RecipientId) -> Option<RecipientId> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.zones
            .range((Excluded(start), Unbounded))
            .next()
            .map(|(s, _)| *s)
    }

    pub(crate) fn lease(&mut self, rid: RecipientId, at_ms: u64) -> Option<Undo> {
        match self.leased.entry(rid) {
            std::collections::hash_map::Entry::Occupied(_) => None,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(at_ms);
                self.count_lease(rid, true);
                Some(Undo::Leased(rid))
            }
        }
    }

    /// Drops `rid`'s lease; if that leaves its zone empty, merges it (see `merge_empty`).
    pub(crate) fn unlease(&mut self, rid: RecipientId, log: &mut Vec<Undo>) {
        if let Some(at) = self.leased.remove(&rid) {
            self.count_lease(rid, false);
            log.push(Undo::Unleased(rid, at));
            let start = self.start_of(rid);
            self.merge_empty(start, log);
        }
    }

    fn count_lease(&mut self, rid: RecipientId, up: bool) {
        let start = self.start_of(rid);
        if let Some(z) = self.zones.get_mut(&start) {
            z.leased = if up {
                z.leased.saturating_add(1)
            } else {
                z.leased.saturating_sub(1)
            };
        }
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
            Undo::Zone(start, zone) => {
                self.put(start, zone);
            }
            Undo::Leased(rid) => {
                if self.leased.remove(&rid).is_some() {
                    self.count_lease(rid, false);
                }
            }
            Undo::Unleased(rid, at) => {
                if self.leased.insert(rid, at).is_none() {
                    self.count_lease(rid, true);
                }
            }
            Undo::ZoneSize(size) => self.zone_size = size,
        }
    }

    /// Up to `max` zones whose bound is due at or before `now_ms`, earliest first, starting
    /// after `after` (exclusive): `(due, zone start)`.
    pub(crate) fn due_zones(
        &self,
        now_ms: u64,
        after: Option<(u64, RecipientId)>,
        max: usize,
    ) -> Vec<(u64, RecipientId)> {
        use std::ops::Bound::{Excluded, Unbounded};
        let lower = match after {
            Some(k) => Excluded(k),
            None => Unbounded,
        };
        self.by_due
            .range((lower, Unbounded))
            .take_while(|(due, _)| *due <= now_ms)
            .take(max)
            .copied()
            .collect()
    }

    /// The zones that may hold a recipient due at or before `now_ms` that was created at or
    /// before `created_ms`.
    pub(crate) fn expiring_zones(&self, now_ms: u64, created_ms: u64) -> Vec<RecipientId> {
        self.zones
            .iter()
            .filter(|(_, z)| {
                z.bound
                    .is_some_and(|b| b.due <= now_ms && b.created <= created_ms)
            })
            .map(|(s, _)| *s)
            .collect()
    }

    /// The earliest due time (a lower bound: see the module docs).
    pub(crate) fn oldest_due(&self) -> Option<u64> {
        self.by_due.first().map(|&(due, _)| due)
    }

    /// The zone that holds `rid`: its start and bound.
    #[cfg(test)]
    pub(crate) fn zone_of(&self, rid: RecipientId) -> (RecipientId, Option<Bound>) {
        let start = self.start_of(rid);
        (start, self.zones[&start].bound)
    }

    /// Zones (with and without a bound).
    #[cfg(test)]
    pub(crate) fn zones(&self) -> usize {
        self.zones.len()
    }

    /// New recipients per new zone.
    #[cfg(test)]
    pub(crate) fn zone_size(&self) -> u32 {
        self.zone_size
    }

    /// The zones, their order by due time, the leases and the zone size (what an undo must
    /// restore).
    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> String {
        let mut leased: Vec<_> = self.leased.iter().collect();
        leased.sort();
        format!(
            "{:?} {:?} {:?} {}",
            self.zones, self.by_due, leased, self.zone_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(m: u64, i: u32) -> RecipientId {
        RecipientId {
            message: MessageId(m),
            index: i,
        }
    }

    fn bound(due: u64, created: u64) -> Option<Bound> {
        Some(Bound { due, created })
    }

    /// `n` new one-recipient messages 1..=n, due at `due(m)`, created at `m`.
    fn filled(n: u64, due: impl Fn(u64) -> u64) -> Schedule {
        let mut s = Schedule::new(1 << 20);
        let mut log = Vec::new();
        for m in 1..=n {
            s.add(due(m), rid(m, 0), m, &mut log);
        }
        s
    }

    #[test]
    fn new_recipients_fill_zones_of_zone_size_in_id_order() {
        let z = u64::from(ZONE_SIZE);
        let s = filled(2 * z + 10, |m| 1_000 - m);
        assert_eq!(s.zones(), 3);
        assert_eq!(s.zone_of(rid(1, 0)), (FIRST, bound(1_000 - z, 1)));
        assert_eq!(s.zone_of(rid(z, 0)).0, FIRST);
        assert_eq!(
            s.zone_of(rid(z + 1, 0)),
            (rid(z + 1, 0), bound(1_000 - 2 * z, z + 1))
        );
        assert_eq!(s.zone_end(FIRST), Some(rid(z + 1, 0)));
        assert_eq!(s.zone_end(rid(2 * z + 1, 0)), None);
        // Earliest bound first; only what is due.
        let all = s.due_zones(u64::MAX, None, 10);
        assert_eq!(all.len(), 3);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(all[0], (1_000 - 2 * z - 10, rid(2 * z + 1, 0)));
        assert_eq!(s.due_zones(1_000 - 2 * z - 1, None, 10).len(), 1);
        assert_eq!(s.due_zones(u64::MAX, Some(all[0]), 1), vec![all[1]]);
        assert_eq!(s.oldest_due(), Some(all[0].0));
        // Every recipient of a big message counts: its zones split inside it.
        let mut big = Schedule::new(1 << 20);
        let mut log = Vec::new();
        for i in 0..3 * ZONE_SIZE {
            big.add(5, rid(7, i), 1, &mut log);
        }
        assert_eq!(big.zones(), 3);
        assert_eq!(big.zone_of(rid(7, 2 * ZONE_SIZE)).0, rid(7, 2 * ZONE_SIZE));
    }

    /// The bound only falls when recipients are scheduled (a deferral, in a zone already
    /// read), goes to exactly what a read found when settled, and the expiry sweep finds the
    /// zones whose bound is due and old enough.
    #[test]
    fn a_bound_falls_on_add_and_is_exact_once_settled() {
        let mut s = filled(10, |_| 500);
        let mut log = Vec::new();
        s.add(900, rid(3, 0), 3, &mut log); // not new: no new zone, bound unchanged
        assert_eq!(s.zone_of(rid(3, 0)).1, bound(500, 1));
        s.settle(FIRST, bound(900, 3), &mut log);
        assert_eq!(s.due_zones(899, None, 9), vec![]);
        s.add(700, rid(5, 0), 5, &mut log);
        assert_eq!(s.zone_of(rid(5, 0)).1, bound(700, 3));
        assert_eq!(s.due_zones(800, None, 9), vec![(700, FIRST)]);
        assert_eq!(s.expiring_zones(800, 3), vec![FIRST]);
        assert_eq!(s.expiring_zones(800, 2), vec![], "created after the cutoff");
        assert_eq!(s.expiring_zones(699, 3), vec![], "not due");
    }

    /// Empty zones merge, a zone with a lease out does not (its recipient may come back,
    /// deferred), and new recipients still go to the last zone after merges.
    #[test]
    fn empty_zones_merge_but_not_while_a_lease_is_out() {
        let z = u64::from(ZONE_SIZE);
        let mut s = filled(3 * z, |_| 1);
        let mut log = Vec::new();
        let (second, third) = (rid(z + 1, 0), rid(2 * z + 1, 0));
        assert!(s.lease(rid(z + 5, 0), 1).is_some());
        assert!(s.lease(rid(z + 5, 0), 2).is_none(), "counted once");
        s.settle(FIRST, None, &mut log);
        s.settle(second, None, &mut log);
        s.settle(third, None, &mut log);
        assert_eq!(s.zones(), 3, "the leased zone keeps its neighbours apart");
        assert_eq!(s.oldest_due(), None);
        // A deferral: scheduled again, then unleased (as `complete` does it).
        s.add(50, rid(z + 5, 0), 1, &mut log);
        s.unlease(rid(z + 5, 0), &mut log);
        assert_eq!(s.zones(), 3);
        assert_eq!(s.due_zones(50, None, 9), vec![(50, second)]);
        s.settle(second, None, &mut log);
        assert_eq!(s.zones(), 1, "all empty: one zone");
        assert_eq!(s.zone_end(FIRST), None);
        // New recipients start a zone of their own, not in the merged range.
        s.add(60, rid(10 * z, 0), 60, &mut log);
        assert_eq!(s.zones(), 2);
        assert_eq!(s.zone_of(rid(10 * z, 0)), (rid(10 * z, 0), bound(60, 60)));
        // Released without a new schedule entry (final): the zone empties and merges.
        assert!(s.lease(rid(10 * z, 0), 61).is_some());
        s.settle(rid(10 * z, 0), None, &mut log);
        assert_eq!(s.zones(), 2);
        s.unlease(rid(10 * z, 0), &mut log);
        assert_eq!(s.zones(), 1);
    }

    /// A last zone that was not full when it emptied and merged does not take new
    /// recipients: its range now spans every final record before it.
    #[test]
    fn new_recipients_do_not_join_a_merged_zone() {
        let z = u64::from(ZONE_SIZE);
        let mut s = filled(z + 5, |_| 1);
        let mut log = Vec::new();
        s.settle(rid(z + 1, 0), None, &mut log);
        s.settle(FIRST, None, &mut log);
        assert_eq!(s.zones(), 1);
        s.add(9, rid(2 * z, 0), 9, &mut log);
        assert_eq!(s.zones(), 2);
        assert_eq!(s.zone_of(rid(2 * z, 0)), (rid(2 * z, 0), bound(9, 9)));
        assert_eq!(s.zone_of(rid(z, 0)), (FIRST, None));
    }

    /// At open, final recipients are noted too: a scheduled one's zone spans ~ZONE_SIZE
    /// ids, not everything since the previous scheduled one, and runs of final ones end up
    /// as one zone each.
    #[test]
    fn final_recipients_noted_at_open_keep_zones_small() {
        let z = u64::from(ZONE_SIZE);
        let mut s = Schedule::new(1 << 20);
        let mut log = Vec::new();
        for m in 1..=1000 {
            if m % 500 == 0 {
                s.add(7, rid(m, 0), m, &mut log);
            } else {
                s.note(rid(m, 0), &mut log);
            }
        }
        for m in [500, 1000] {
            let (start, b) = s.zone_of(rid(m, 0));
            assert!(start.message.0 + z > m, "zone of {m} starts at {start}");
            assert_eq!(b, bound(7, m));
        }
        assert_eq!(s.zones(), 4, "two merged runs of final ones, two zones");
    }

    #[test]
    fn undo_restores_zones_and_leases() {
        let z = u64::from(ZONE_SIZE);
        let mut s = filled(2 * z, |m| m);
        assert!(s.lease(rid(3, 0), 9).is_some());
        let before = s.snapshot();
        let mut log = Vec::new();
        log.extend(s.lease(rid(z + 2, 0), 10));
        s.settle(rid(z + 1, 0), None, &mut log);
        s.settle(FIRST, None, &mut log);
        s.add(70, rid(3, 0), 3, &mut log);
        s.unlease(rid(3, 0), &mut log);
        s.settle(FIRST, None, &mut log);
        for m in 2 * z + 1..=3 * z + 3 {
            s.add(m, rid(m, 0), m, &mut log);
        }
        s.unlease(rid(z + 2, 0), &mut log);
        assert_ne!(s.snapshot(), before);
        s.undo_all(log);
        assert_eq!(s.snapshot(), before);
        assert_eq!(s.leased_at(rid(3, 0)), Some(9));
        assert_eq!(s.leased_at(rid(z + 2, 0)), None);
    }

    /// Every scheduled recipient's zone has a bound at most its due and created times.
    fn assert_bounds_hold(s: &Schedule, scheduled: &[(RecipientId, u64, u64)]) {
        for &(r, due, created) in scheduled {
            let (start, b) = s.zone_of(r);
            let b = b.unwrap_or_else(|| panic!("{r} in {start}, which has no bound"));
            assert!(
                b.due <= due && b.created <= created,
                "{r}: {b:?} vs {due} {created}"
            );
        }
    }

    /// Past `max_zones` the zones merge in neighbouring runs and the zone size doubles, so
    /// their number stays bounded however many recipients come; every bound still holds,
    /// leases are still counted, and the due zones still lead to every due recipient.
    #[test]
    fn a_deep_queue_coarsens_its_zones_and_every_bound_holds() {
        let z = u64::from(ZONE_SIZE);
        let mut s = Schedule::new(8);
        let mut log = Vec::new();
        let mut scheduled = Vec::new();
        let mut most = 0;
        for m in 1..=100 * z {
            // Due times that go up and down, so a merge must take the lower bound.
            let due = 10_000 + (m * 7919) % 1000;
            s.add(due, rid(m, 0), m, &mut log);
            scheduled.push((rid(m, 0), due, m));
            most = most.max(s.zones());
            if m == 3 * z {
                assert!(s.lease(rid(2, 0), 5).is_some());
            }
        }
        assert!(most <= 8, "{most} zones");
        assert!(s.zone_size() >= 16 * ZONE_SIZE, "{}", s.zone_size());
        assert_bounds_hold(&s, &scheduled);
        // Every recipient is in a zone that due_zones names once the earliest is due.
        let due: BTreeSet<RecipientId> =
            s.due_zones(11_000, None, 100).iter().map(|z| z.1).collect();
        assert_eq!(due.len(), s.zones(), "all due");
        // The lease is still counted in its merged zone: read empty, the zone does not merge
        // with an empty neighbour until the lease is dropped.
        let (lz, _) = s.zone_of(rid(2, 0));
        s.settle(lz, None, &mut log);
        let next = s.zone_end(lz).expect("more zones");
        s.settle(next, None, &mut log);
        let n = s.zones();
        s.unlease(rid(2, 0), &mut log);
        assert_eq!(s.zones(), n - 1);
    }

    /// A drained queue goes back to small zones for new recipients, and a coarsening is
    /// undone with the request that caused it, zone size included.
    #[test]
    fn zones_shrink_again_after_a_drain_and_a_coarsening_is_undone_whole() {
        let z = u64::from(ZONE_SIZE);
        let mut s = Schedule::new(8);
        let mut log = Vec::new();
        for m in 1..=8 * z {
            s.add(m, rid(m, 0), m, &mut log);
        }
        assert_eq!(s.zone_size(), ZONE_SIZE);
        let before = s.snapshot();
        let mut log = Vec::new();
        s.add(9, rid(8 * z + 1, 0), 9, &mut log);
        assert_eq!(s.zone_size(), 2 * ZONE_SIZE, "the ninth zone coarsened");
        assert_eq!(
            s.zones(),
            5,
            "four pairs, and a new zone for the new recipient"
        );
        s.undo_all(log);
        assert_eq!(s.snapshot(), before);
        // Coarsen for real, then drain: everything settles empty and merges into one zone.
        let mut log = Vec::new();
        for m in 8 * z + 1..=40 * z {
            s.add(m, rid(m, 0), m, &mut log);
        }
        assert!(s.zone_size() > ZONE_SIZE);
        while let Some(&(_, start)) = s.due_zones(u64::MAX, None, 1).first() {
            s.settle(start, None, &mut log);
        }
        assert_eq!(s.zones(), 1);
        let big = s.zone_size();
        s.add(1, rid(41 * z, 0), 1, &mut log);
        assert_eq!(s.zone_size(), big / 2, "halved when the zones are few");
        assert_eq!(s.zone_of(rid(41 * z, 0)), (rid(41 * z, 0), bound(1, 1)));
    }
}
