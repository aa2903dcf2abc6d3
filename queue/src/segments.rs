//! Bodies bigger than [`crate::codec::INLINE_BODY_MAX`] live outside sled: appended to
//! segment files in `bodies/` next to sled's directory, referenced from the message's
//! metadata by (segment, offset, CRC-32).
//!
//! Why: sled's cost is per key, not per byte. Stored in sled, a 20 KB body was five 4 KiB
//! chunk keys (more than the rest of the message), rewritten by sled's log cleaning while it
//! waited, and copied again by every compaction. In a segment it is one sequential write,
//! one `pread`, and nothing to delete: a segment file is removed as a whole once no pending
//! message refers to it.
//!
//! Order of durability, per group of requests:
//! 1. the writer appends the group's bodies (`write`, no sync) before it applies the group's
//!    sled batch, so after a `kill -9` every body a committed batch refers to is in the page
//!    cache, hence in the file;
//! 2. the syncer `fdatasync`s the segments written since its last sync *before* sled's
//!    flush + `fdatasync`, and only then acknowledges. A power cut can still leave sled with
//!    metadata whose body never reached the disk (sled may write its log earlier on its
//!    own); such a message was never acknowledged, and opening the queue removes it: every
//!    reference is checked against the segment's length, and bodies in the two newest
//!    segments (the only ones that can be unsynced) against their CRC.
//! 3. a segment is deleted by the syncer after the sync that made its last reference's
//!    removal durable, never before.
//!
//! A body whose message still has a pending recipient keeps its whole segment (at most
//! [`SEGMENT_MAX`] bytes) on disk: a message deferred for days pins one segment. Segments are
//! not compacted (see README: known limits).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The directory of segment files, inside the queue directory.
pub(crate) const DIR: &str = "bodies";
/// A new segment is started when the current one would grow past this.
pub(crate) const SEGMENT_MAX: u64 = 32 * 1024 * 1024;
/// The current segment is given up once nothing refers to it and it holds at least this
/// much (so a drained queue keeps less than this on disk, and a trickle of single messages
/// does not create a file each).
const RETIRE_MIN: u64 = 1024 * 1024;
/// Buffered bodies are written out once they reach this size (else at the group's commit).
const BUFFER_MAX: usize = 4 * 1024 * 1024;

/// Where a body is: `len` bytes (the message's size) at `offset` in segment `seg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegRef {
    pub(crate) seg: u64,
    pub(crate) offset: u64,
    pub(crate) crc: u32,
}

pub(crate) fn path_of(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:012}.seg"))
}

/// The segment files in `dir` (created if missing): number → length.
pub(crate) fn list(dir: &Path) -> std::io::Result<BTreeMap<u64, u64>> {
    std::fs::create_dir_all(dir)?;
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seg) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.insert(seg, entry.metadata()?.len());
    }
    Ok(out)
}

/// Reads a body and checks it against its reference. The error says what is wrong.
pub(crate) fn read(dir: &Path, r: SegRef, len: u64) -> Result<Vec<u8>, String> {
    let path = path_of(dir, r.seg);
    let n = usize::try_from(len).map_err(|_| format!("body of {len} bytes"))?;
    let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Check the length first: a damaged reference must not make us allocate its size.
    let flen = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if r.offset.saturating_add(len) > flen {
        return Err(format!(
            "{}: {len} bytes at offset {} are past its end ({flen} bytes)",
            path.display(),
            r.offset
        ));
    }
    let mut body = vec![0u8; n];
    file.read_exact_at(&mut body, r.offset)
        .map_err(|e| format!("{}: {n} bytes at offset {}: {e}", path.display(), r.offset))?;
    if crc32fast::hash(&body) != r.crc {
        return Err(format!(
            "{}: checksum mismatch for {n} bytes at offset {}",
            path.display(),
            r.offset
        ));
    }
    Ok(body)
}

/// Bookkeeping shared by the writer (appends, reference counts) and the syncer (fdatasync,
/// deletion).
#[derive(Default)]
pub(crate) struct State {
    /// Bodies per segment referenced by committed metadata of a message that still has a
    /// pending recipient. Absent: none.
    live: HashMap<u64, u64>,
    /// Segment file sizes.
    sizes: HashMap<u64, u64>,
    /// The segment being appended to: never deleted while it is.
    current: Option<u64>,
    /// Segments closed for appending since the last commit; deletable after it if nothing
    /// refers to them.
    sealed: Vec<u64>,
    /// Written since the syncer last took this set.
    dirty: BTreeSet<u64>,
    /// Referenced by no committed data: deleted after the syncer's next sync.
    deletable: BTreeSet<u64>,
}

impl State {
    /// The state after opening: `sizes` of the files present, `live` counted by recovery.
    /// Segments nothing refers to are deletable at once.
    pub(crate) fn new(sizes: BTreeMap<u64, u64>, live: HashMap<u64, u64>) -> State {
        let deletable = sizes
            .keys()
            .filter(|s| !live.contains_key(s))
            .copied()
            .collect();
        State {
            live,
            sizes: sizes.into_iter().collect(),
            deletable,
            ..State::default()
        }
    }

    /// Applies a committed group's reference changes (+1 per body written, −1 per body no
    /// longer needed), netted per segment first so that a segment both emptied and appended
    /// to in one group is not deleted.
    pub(crate) fn apply(&mut self, deltas: &[(u64, i64)]) {
        let mut net: HashMap<u64, i64> = HashMap::new();
        for &(seg, d) in deltas {
            *net.entry(seg).or_default() += d;
        }
        for (seg, d) in net {
            let n = self.live.entry(seg).or_default();
            *n = n.saturating_add_signed(d);
            if *n == 0 {
                self.live.remove(&seg);
                if self.current != Some(seg) {
                    self.deletable.insert(seg);
                } else if self.sizes.get(&seg).is_some_and(|&s| s >= RETIRE_MIN) {
                    // The appender notices and starts a new segment at its next append.
                    self.current = None;
                    self.deletable.insert(seg);
                }
            }
        }
        for seg in std::mem::take(&mut self.sealed) {
            if !self.live.contains_key(&seg) {
                self.deletable.insert(seg);
            }
        }
    }

    /// Segments written since the last call (to `fdatasync`) and segments to delete after
    /// that sync.
    pub(crate) fn take_for_sync(&mut self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        (
            std::mem::take(&mut self.dirty),
            std::mem::take(&mut self.deletable),
        )
    }

    pub(crate) fn removed(&mut self, seg: u64) {
        self.sizes.remove(&seg);
    }

    /// Bytes in segment files.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.sizes.values().sum()
    }
}

/// The writer's side: appends bodies to the current segment, buffered until the group's
/// commit. A write error is kept: every later [`Appender::write_pending`] fails with it, so
/// no batch that refers to a lost body is ever applied.
pub(crate) struct Appender {
    dir: PathBuf,
    next_seg: u64,
    /// (segment, file, length including `buf`).
    file: Option<(u64, File, u64)>,
    buf: Vec<u8>,
    error: Option<String>,
}

fn lock(m: &std::sync::Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Appender {
    /// Appends go to new segments numbered from `next_seg` (one past the highest present).
    pub(crate) fn new(dir: &Path, next_seg: u64) -> Appender {
        Appender {
            dir: dir.to_path_buf(),
            next_seg,
            file: None,
            buf: Vec::new(),
            error: None,
        }
    }

    /// Buffers `body` for the current segment (starting a new one when it is full) and
    /// returns where it will be. The caller counts the reference in its transaction.
    pub(crate) fn append(
        &mut self,
        state: &std::sync::Mutex<State>,
        body: &[u8],
    ) -> Result<SegRef, String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let len = body.len() as u64;
        if let Some((seg, _, _)) = &self.file {
            // Retired by `State::apply` (nothing refers to it any more; deleted after the next
            // sync). Only ever between groups, so nothing is buffered for it.
            if self.buf.is_empty() && lock(state).current != Some(*seg) {
                self.file = None;
            }
        }
        if self
            .file
            .as_ref()
            .is_some_and(|(_, _, l)| *l > 0 && l + len > SEGMENT_MAX)
        {
            self.write_pending(state)?;
            if let Some((seg, _, _)) = self.file.take() {
                let mut st = lock(state);
                st.current = None;
                st.sealed.push(seg);
            }
        }
        if self.file.is_none() {
            let seg = self.next_seg;
            let path = path_of(&self.dir, seg);
            let created = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)
                // The new name must survive a power cut too.
                .and_then(|f| File::open(&self.dir)?.sync_all().map(|()| f));
            let file = created.map_err(|e| self.fail(format!("{}: {e}", path.display())))?;
            self.next_seg += 1;
            let mut st = lock(state);
            st.current = Some(seg);
            st.sizes.insert(seg, 0);
            self.file = Some((seg, file, 0));
        }
        let (seg, _, flen) = self.file.as_mut().ok_or("no segment")?;
        let r = SegRef {
            seg: *seg,
            offset: *flen,
            crc: crc32fast::hash(body),
        };
        *flen += len;
        self.buf.extend_from_slice(body);
        if self.buf.len() >= BUFFER_MAX {
            self.write_pending(state)?;
        }
        Ok(r)
    }

    /// Writes the buffered bodies (no sync: the syncer does that). Call before applying
    /// the batch that refers to them.
    pub(crate) fn write_pending(&mut self, state: &std::sync::Mutex<State>) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some((seg, file, _)) = self.file.as_mut() else {
            return Err(self.fail("buffered bodies without a segment".into()));
        };
        let seg = *seg;
        if let Err(e) = file.write_all(&self.buf) {
            let msg = format!("{}: {e}", path_of(&self.dir, seg).display());
            return Err(self.fail(msg));
        }
        let n = self.buf.len() as u64;
        self.buf.clear();
        let mut st = lock(state);
        st.dirty.insert(seg);
        *st.sizes.entry(seg).or_default() += n;
        Ok(())
    }

    fn fail(&mut self, msg: String) -> String {
        let msg = format!("cannot write message bodies: {msg}");
        self.error = Some(msg.clone());
        msg
    }
}

/// `fdatasync` of segments (a segment deleted meanwhile is skipped).
pub(crate) fn sync(dir: &Path, segs: &BTreeSet<u64>) -> std::io::Result<()> {
    for &seg in segs {
        match File::open(path_of(dir, seg)) {
            Ok(f) => f.sync_data()?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes segments nothing refers to any more; returns how many were removed.
pub(crate) fn delete(dir: &Path, state: &std::sync::Mutex<State>, segs: &BTreeSet<u64>) -> usize {
    let mut n = 0;
    for &seg in segs {
        match std::fs::remove_file(path_of(dir, seg)) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(segment = seg, "cannot remove body segment: {e}");
                continue;
            }
        }
        lock(state).removed(seg);
    }
    n
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn append_read_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let state = Mutex::new(State::default());
        let mut a = Appender::new(dir.path(), 1);
        let big = vec![b'x'; (SEGMENT_MAX / 2) as usize + 1];
        let r1 = a.append(&state, b"hello").unwrap();
        let r2 = a.append(&state, &big).unwrap();
        // Would pass SEGMENT_MAX: a new segment.
        let r3 = a.append(&state, &big).unwrap();
        a.write_pending(&state).unwrap();
        assert_eq!((r1.seg, r1.offset), (1, 0));
        assert_eq!((r2.seg, r2.offset), (1, 5));
        assert_eq!((r3.seg, r3.offset), (2, 0));
        assert_eq!(read(dir.path(), r1, 5).unwrap(), b"hello");
        assert_eq!(read(dir.path(), r3, big.len() as u64).unwrap(), big);
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[&1], 5 + big.len() as u64);
        // A wrong checksum or a reference past the end is an error, not garbage.
        let bad = SegRef {
            crc: r1.crc ^ 1,
            ..r1
        };
        assert!(read(dir.path(), bad, 5).unwrap_err().contains("checksum"));
        assert!(read(dir.path(), r1, 1 << 40).is_err());
    }

    #[test]
    fn sealed_segment_becomes_deletable_only_when_unreferenced() {
        let dir = tempfile::tempdir().unwrap();
        let state = Mutex::new(State::default());
        let mut a = Appender::new(dir.path(), 7);
        let big = vec![0u8; SEGMENT_MAX as usize];
        let r1 = a.append(&state, &big).unwrap();
        lock(&state).apply(&[(r1.seg, 1)]);
        // Seals segment 7 (still referenced), starts 8.
        let r2 = a.append(&state, b"x").unwrap();
        a.write_pending(&state).unwrap();
        lock(&state).apply(&[(r2.seg, 1)]);
        let (dirty, deletable) = lock(&state).take_for_sync();
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![7, 8]);
        assert!(deletable.is_empty());
        // The current segment is never deletable; the sealed one is once unreferenced.
        lock(&state).apply(&[(r2.seg, -1), (r1.seg, -1)]);
        let (dirty, deletable) = lock(&state).take_for_sync();
        assert!(dirty.is_empty());
        assert_eq!(deletable.iter().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(delete(dir.path(), &state, &deletable), 1);
        assert_eq!(
            list(dir.path())
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![8]
        );
        // Emptied and appended to in one group: kept.
        lock(&state).apply(&[(r2.seg, 1), (r2.seg, -1), (r2.seg, 1)]);
        assert!(lock(&state).take_for_sync().1.is_empty());
        // The current segment, once unreferenced and at least RETIRE_MIN big, is given up:
        // the next body goes to a new one.
        let r3 = a.append(&state, &vec![1u8; RETIRE_MIN as usize]).unwrap();
        a.write_pending(&state).unwrap();
        lock(&state).apply(&[(r3.seg, 1)]);
        lock(&state).apply(&[(r2.seg, -1), (r3.seg, -1)]);
        assert_eq!(r3.seg, 8);
        assert_eq!(
            lock(&state)
                .take_for_sync()
                .1
                .into_iter()
                .collect::<Vec<_>>(),
            vec![8]
        );
        assert_eq!(a.append(&state, b"y").unwrap().seg, 9);
    }
}
