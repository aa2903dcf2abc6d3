//! Bodies bigger than [`crate::codec::INLINE_BODY_MAX`] live outside sled: appended to
//! segment files in `bodies/` next to sled's directory, referenced from the message's
//! metadata by (segment, offset, CRC-32).
//!
//! Why: sled's cost is per key, and grows with its values' bytes (log writes, log cleaning,
//! cache). Stored in sled, a 20 KB body was five 4 KiB chunk keys (more than the rest of the
//! message), rewritten by sled's log cleaning while it waited, and copied again by every
//! compaction; even a 2 KB body inline in its metadata made every metadata update rewrite
//! it. In a segment it is one sequential write,
//! one `pread`, and nothing to delete: a segment file is removed as a whole once no pending
//! message refers to it.
//!
//! Order of durability, per group of requests:
//! 1. the writer appends the group's bodies (`write`, no sync) before it applies the group's
//!    sled batch, so after a `kill -9` every body a committed batch refers to is in the page
//!    cache, hence in the file;
//! 2. the syncer `fdatasync`s the segment written since its last sync (on a helper thread)
//!    while it flushes and `fdatasync`s sled, and acknowledges when both are done. A sealed
//!    segment is `fdatasync`ed by the writer when it is sealed, so only the newest segment
//!    can hold unsynced bodies. A power cut can thus leave sled with metadata whose body
//!    never reached the disk; such a message was never acknowledged, and opening the queue
//!    removes it: every reference is checked against its segment's length, and bodies in
//!    the two newest segments against their CRC.
//! 3. a segment is deleted by the syncer after the sync that made its last reference's
//!    removal durable, never before.
//!
//! A body whose message still has a pending recipient keeps its segment on disk. So that a
//! few deferred messages do not pin whole segments, a segment of at least 1 MiB whose live
//! bodies are at most a quarter of it is *relocated*: the writer copies those bodies to the
//! current segment and points their metadata there, after which the old segment is deleted
//! like any other. Message ids grow with time and a segment is filled in id order, so the
//! messages that can refer to a segment are found by a range scan over the ids it received.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::lock;

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

/// A change of a segment's references: (segment, bodies, bytes), ±.
pub(crate) type Delta = (u64, i64, i64);

/// What a segment still holds: bodies and bytes referenced, and the range of message ids
/// appended to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Live {
    pub(crate) bodies: u64,
    pub(crate) bytes: u64,
}

/// Per segment: what it still holds.
pub(crate) type LiveMap = HashMap<u64, Live>;
/// Per segment: the lowest and highest message id whose body went there.
pub(crate) type IdRanges = HashMap<u64, (u64, u64)>;

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

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The file is missing, too short, or the bytes do not match the checksum.
    Damaged(String),
    /// Opening or reading failed otherwise (too many open files, EIO, ...): may pass.
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Damaged(d) => f.write_str(d),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads a body and checks it against its reference. The error says what is wrong.
pub(crate) fn read(dir: &Path, r: SegRef, len: u64) -> Result<Vec<u8>, ReadError> {
    let path = path_of(dir, r.seg);
    let file = File::open(&path).map_err(|e| io_error(&path, e))?;
    read_at(&file, &path, None, r, len).map(|(body, _)| body)
}

fn io_error(path: &Path, e: std::io::Error) -> ReadError {
    let what = format!("{}: {e}", path.display());
    if e.kind() == ErrorKind::NotFound {
        ReadError::Damaged(what)
    } else {
        ReadError::Io(std::io::Error::new(e.kind(), what))
    }
}

/// Reads a body from `file` (the segment at `path`). `known_len`: a length the file had
/// (files only grow); it is asked for again only when the body would end past it. Returns
/// the body and the file length it was checked against.
fn read_at(
    file: &File,
    path: &Path,
    known_len: Option<u64>,
    r: SegRef,
    len: u64,
) -> Result<(Vec<u8>, u64), ReadError> {
    let n = usize::try_from(len).map_err(|_| ReadError::Damaged(format!("body of {len} bytes")))?;
    let end = r.offset.saturating_add(len);
    // Check the length first: a damaged reference must not make us allocate its size.
    let flen = match known_len {
        Some(l) if end <= l => l,
        _ => file.metadata().map_err(|e| io_error(path, e))?.len(),
    };
    if end > flen {
        return Err(ReadError::Damaged(format!(
            "{}: {len} bytes at offset {} are past its end ({flen} bytes)",
            path.display(),
            r.offset
        )));
    }
    let mut body = vec![0u8; n];
    file.read_exact_at(&mut body, r.offset)
        .map_err(|e| io_error(path, e))?;
    if crc32fast::hash(&body) != r.crc {
        return Err(ReadError::Damaged(format!(
            "{}: checksum mismatch for {n} bytes at offset {}",
            path.display(),
            r.offset
        )));
    }
    Ok((body, flen))
}

/// Segment files kept open for reading bodies, so that a read is one `pread` instead of
/// open + stat + pread + close (the path lookup and the stat were most of a 2 KB body's
/// read). A file is forgotten and deleted under the same lock ([`Readers::remove`]), and a
/// file opened before its deletion is not kept once it is deleted ([`Readers::keep`]), so no
/// deleted segment's space is held; at most [`Readers::MAX_OPEN`] are open.
#[derive(Default)]
pub(crate) struct Readers {
    open: std::sync::Mutex<HashMap<u64, (std::sync::Arc<File>, u64)>>,
}

impl Readers {
    const MAX_OPEN: usize = 32;

    /// As [`read`], through a kept file.
    pub(crate) fn read(&self, dir: &Path, r: SegRef, len: u64) -> Result<Vec<u8>, ReadError> {
        let path = path_of(dir, r.seg);
        let kept = lock(&self.open).get(&r.seg).cloned();
        let (file, known) = match kept {
            Some(kept) => kept,
            None => {
                let f = std::sync::Arc::new(File::open(&path).map_err(|e| io_error(&path, e))?);
                let l = self.keep(r.seg, &f).map_err(|e| io_error(&path, e))?;
                (f, l)
            }
        };
        match read_at(&file, &path, Some(known), r, len) {
            Ok((body, flen)) => {
                // The file grew since its length was noted: note the new one.
                if flen > known {
                    if let Some(e) = lock(&self.open).get_mut(&r.seg) {
                        e.1 = e.1.max(flen);
                    }
                }
                Ok(body)
            }
            Err(e) => {
                // Whatever went wrong, the next read opens the file afresh.
                self.forget(r.seg);
                Err(e)
            }
        }
    }

    /// Keeps `file`, just opened, as segment `seg`'s, unless it was deleted since it was
    /// opened ([`Readers::remove`] may run between the open and this). Returns its length.
    fn keep(&self, seg: u64, file: &std::sync::Arc<File>) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut open = lock(&self.open);
        let meta = file.metadata()?;
        if meta.nlink() > 0 {
            if open.len() >= Self::MAX_OPEN {
                open.clear();
            }
            open.insert(seg, (std::sync::Arc::clone(file), meta.len()));
        }
        Ok(meta.len())
    }

    /// Closes segment `seg` (after a failed read).
    fn forget(&self, seg: u64) {
        lock(&self.open).remove(&seg);
    }

    /// Closes and deletes segment `seg`, holding the lock across both so that no reader
    /// keeps it open in between.
    fn remove(&self, seg: u64, path: &Path) -> std::io::Result<()> {
        let mut open = lock(&self.open);
        open.remove(&seg);
        std::fs::remove_file(path)
    }
}

/// Bookkeeping shared by the writer (appends, reference counts) and the syncer (fdatasync,
/// deletion).
#[derive(Default)]
pub(crate) struct State {
    /// Per segment, the bodies referenced by committed metadata of a message that still has
    /// a pending recipient. Absent: none.
    live: LiveMap,
    /// Lowest and highest message id whose body went to each segment.
    ids: IdRanges,
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
    /// The state after opening: `sizes` of the files present; `live` and `ids` as found by
    /// recovery. Segments nothing refers to are deletable at once.
    pub(crate) fn new(sizes: BTreeMap<u64, u64>, live: LiveMap, ids: IdRanges) -> State {
        let deletable = sizes
            .keys()
            .filter(|s| !live.contains_key(s))
            .copied()
            .collect();
        State {
            live,
            ids,
            // The previous process may have died before syncing its last segment: the first
            // sync after opening makes every present segment durable (cheap when clean).
            dirty: sizes.keys().copied().collect(),
            sizes: sizes.into_iter().collect(),
            deletable,
            ..State::default()
        }
    }

    /// Notes that message `id`'s body went to `seg` (recovery, appends).
    pub(crate) fn note_id(ids: &mut IdRanges, seg: u64, id: u64) {
        let e = ids.entry(seg).or_insert((id, id));
        e.0 = e.0.min(id);
        e.1 = e.1.max(id);
    }

    fn mostly_dead(&self, seg: u64) -> bool {
        let size = self.sizes.get(&seg).copied().unwrap_or(0);
        let live = self.live.get(&seg).copied().unwrap_or_default();
        size >= RETIRE_MIN && live.bodies > 0 && live.bytes.saturating_mul(4) <= size
    }

    /// Whether the current segment is big and mostly dead (to be sealed, then relocated).
    pub(crate) fn current_mostly_dead(&self) -> bool {
        self.current.is_some_and(|c| self.mostly_dead(c))
    }

    /// Sealed segments worth relocating, with the message id range to scan for each.
    pub(crate) fn relocation_candidates(&self) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<(u64, u64, u64)> = self
            .sizes
            .keys()
            .filter(|&&s| Some(s) != self.current && self.mostly_dead(s))
            .filter_map(|&s| self.ids.get(&s).map(|&(lo, hi)| (s, lo, hi)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Applies a committed group's reference changes (+1 per body written, −1 per body no
    /// longer needed), netted per segment first so that a segment both emptied and appended
    /// to in one group is not deleted.
    pub(crate) fn apply(&mut self, deltas: &[Delta]) {
        let mut net: HashMap<u64, (i64, i64)> = HashMap::new();
        for &(seg, d, b) in deltas {
            let e = net.entry(seg).or_default();
            e.0 += d;
            e.1 += b;
        }
        for (seg, (d, b)) in net {
            let n = self.live.entry(seg).or_default();
            n.bodies = n.bodies.saturating_add_signed(d);
            n.bytes = n.bytes.saturating_add_signed(b);
            if n.bodies == 0 {
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
        self.ids.remove(&seg);
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
    /// `fdatasync` a segment when it is sealed.
    durable: bool,
}

impl Appender {
    /// Appends go to new segments numbered from `next_seg` (one past the highest present).
    pub(crate) fn new(dir: &Path, next_seg: u64, durable: bool) -> Appender {
        Appender {
            dir: dir.to_path_buf(),
            next_seg,
            file: None,
            buf: Vec::new(),
            error: None,
            durable,
        }
    }

    /// Buffers `body` for the current segment (starting a new one when it is full) and
    /// returns where it will be. The caller counts the reference in its transaction.
    pub(crate) fn append(
        &mut self,
        state: &std::sync::Mutex<State>,
        id: u64,
        body: &[u8],
    ) -> Result<SegRef, String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let len = body.len() as u64;
        self.release_retired(state)?;
        if self
            .file
            .as_ref()
            .is_some_and(|(_, _, l)| *l > 0 && l + len > SEGMENT_MAX)
        {
            self.seal(state)?;
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
        State::note_id(&mut lock(state).ids, r.seg, id);
        self.buf.extend_from_slice(body);
        if self.buf.len() >= BUFFER_MAX {
            self.write_pending(state)?;
        }
        Ok(r)
    }

    /// Lets go of the current segment if `State::apply` retired it (nothing refers to it any
    /// more; the syncer deletes it after its next sync), so its space is freed. Retirement
    /// happens only at a commit, after the buffer was written; buffered bodies for a retired
    /// segment would be lost, so that is an error, never silently written.
    pub(crate) fn release_retired(
        &mut self,
        state: &std::sync::Mutex<State>,
    ) -> Result<(), String> {
        if let Some((seg, _, _)) = &self.file {
            let seg = *seg;
            if lock(state).current != Some(seg) {
                if !self.buf.is_empty() {
                    return Err(self.fail(format!(
                        "internal error: bodies buffered for retired segment {seg}"
                    )));
                }
                self.file = None;
            }
        }
        Ok(())
    }

    /// `fdatasync` of the current segment (after `write_pending`), when durable.
    pub(crate) fn sync_current(&mut self) -> Result<(), String> {
        if !self.durable {
            return Ok(());
        }
        let Some((seg, file, _)) = &self.file else {
            return Ok(());
        };
        let seg = *seg;
        if let Err(e) = file.sync_data() {
            let msg = format!("{}: {e}", path_of(&self.dir, seg).display());
            return Err(self.fail(msg));
        }
        Ok(())
    }

    /// Closes the current segment for appending (the next body starts a new one). It is
    /// synced now, so that only the newest segment can lose data in a power cut (what opening
    /// the queue checks).
    pub(crate) fn seal(&mut self, state: &std::sync::Mutex<State>) -> Result<(), String> {
        self.write_pending(state)?;
        self.sync_current()?;
        if let Some((seg, _, _)) = self.file.take() {
            let mut st = lock(state);
            st.current = None;
            st.sealed.push(seg);
        }
        Ok(())
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

/// Deletes segments nothing refers to any more; returns how many were removed. Each is
/// forgotten before its file goes, so the counted size is never below what is on disk (a
/// file that cannot be removed is left for the next open, which deletes unreferenced ones).
pub(crate) fn delete(
    dir: &Path,
    state: &std::sync::Mutex<State>,
    readers: &Readers,
    segs: &BTreeSet<u64>,
) -> usize {
    let mut n = 0;
    for &seg in segs {
        lock(state).removed(seg);
        match readers.remove(seg, &path_of(dir, seg)) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(segment = seg, "cannot remove body segment: {e}"),
        }
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
        let mut a = Appender::new(dir.path(), 1, true);
        let big = vec![b'x'; (SEGMENT_MAX / 2) as usize + 1];
        let r1 = a.append(&state, 1, b"hello").unwrap();
        let r2 = a.append(&state, 2, &big).unwrap();
        // Would pass SEGMENT_MAX: a new segment.
        let r3 = a.append(&state, 3, &big).unwrap();
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
        assert!(
            matches!(read(dir.path(), bad, 5), Err(ReadError::Damaged(d)) if d.contains("checksum"))
        );
        let gone = SegRef { seg: 99, ..r1 };
        assert!(matches!(
            read(dir.path(), gone, 5),
            Err(ReadError::Damaged(_))
        ));
        assert!(read(dir.path(), r1, 1 << 40).is_err());
    }

    #[test]
    fn a_deleted_segment_is_not_kept_open() {
        let dir = tempfile::tempdir().unwrap();
        let state = Mutex::new(State::default());
        let mut a = Appender::new(dir.path(), 1, true);
        let readers = Readers::default();
        let r1 = a.append(&state, 1, b"body").unwrap();
        a.write_pending(&state).unwrap();
        a.seal(&state).unwrap();
        let r2 = a.append(&state, 2, b"other").unwrap();
        a.write_pending(&state).unwrap();
        assert_ne!(r1.seg, r2.seg);
        // Kept by a read, closed by its deletion.
        assert_eq!(readers.read(dir.path(), r1, 4).unwrap(), b"body");
        assert!(lock(&readers.open).contains_key(&r1.seg));
        assert_eq!(delete(dir.path(), &state, &readers, &[r1.seg].into()), 1);
        assert!(!lock(&readers.open).contains_key(&r1.seg));
        // A reader that opened the file just before it was deleted does not keep it.
        let path = path_of(dir.path(), r2.seg);
        let f = std::sync::Arc::new(File::open(&path).unwrap());
        assert_eq!(delete(dir.path(), &state, &readers, &[r2.seg].into()), 1);
        assert_eq!(readers.keep(r2.seg, &f).unwrap(), 5);
        assert!(
            lock(&readers.open).is_empty(),
            "a deleted segment would hold its disk space while kept open"
        );
    }

    #[test]
    fn kept_files_read_bodies_appended_later_and_damage_is_still_found() {
        let dir = tempfile::tempdir().unwrap();
        let state = Mutex::new(State::default());
        let mut a = Appender::new(dir.path(), 1, true);
        let readers = Readers::default();
        let r1 = a.append(&state, 1, b"first").unwrap();
        a.write_pending(&state).unwrap();
        assert_eq!(readers.read(dir.path(), r1, 5).unwrap(), b"first");
        // Appended after the file was opened and its length noted.
        let r2 = a.append(&state, 2, b"second body").unwrap();
        a.write_pending(&state).unwrap();
        assert_eq!(r2.seg, r1.seg);
        assert_eq!(readers.read(dir.path(), r2, 11).unwrap(), b"second body");
        assert_eq!(lock(&readers.open)[&1].1, 16, "the new length is noted");
        let bad = SegRef {
            crc: r2.crc ^ 1,
            ..r2
        };
        assert!(
            matches!(readers.read(dir.path(), bad, 11), Err(ReadError::Damaged(d)) if d.contains("checksum"))
        );
        assert!(readers.read(dir.path(), r1, 1 << 40).is_err());
        let gone = SegRef { seg: 99, ..r1 };
        assert!(matches!(
            readers.read(dir.path(), gone, 5),
            Err(ReadError::Damaged(_))
        ));
        // After errors the good references still read.
        assert_eq!(readers.read(dir.path(), r1, 5).unwrap(), b"first");
    }

    #[test]
    fn sealed_segment_becomes_deletable_only_when_unreferenced() {
        let dir = tempfile::tempdir().unwrap();
        let state = Mutex::new(State::default());
        let mut a = Appender::new(dir.path(), 7, true);
        let big = vec![0u8; SEGMENT_MAX as usize];
        let r1 = a.append(&state, 1, &big).unwrap();
        lock(&state).apply(&[(r1.seg, 1, 1)]);
        // Seals segment 7 (still referenced), starts 8.
        let r2 = a.append(&state, 2, b"x").unwrap();
        a.write_pending(&state).unwrap();
        lock(&state).apply(&[(r2.seg, 1, 1)]);
        let (dirty, deletable) = lock(&state).take_for_sync();
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![7, 8]);
        assert!(deletable.is_empty());
        // The current segment is never deletable; the sealed one is once unreferenced.
        lock(&state).apply(&[(r2.seg, -1, -1), (r1.seg, -1, -1)]);
        let (dirty, deletable) = lock(&state).take_for_sync();
        assert!(dirty.is_empty());
        assert_eq!(deletable.iter().copied().collect::<Vec<_>>(), vec![7]);
        let readers = Readers::default();
        assert_eq!(readers.read(dir.path(), r1, big.len() as u64).unwrap(), big);
        assert!(lock(&readers.open).contains_key(&7));
        assert_eq!(delete(dir.path(), &state, &readers, &deletable), 1);
        assert!(
            !lock(&readers.open).contains_key(&7),
            "a deleted segment is not kept open"
        );
        assert_eq!(
            list(dir.path())
                .unwrap()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![8]
        );
        // Emptied and appended to in one group: kept.
        lock(&state).apply(&[(r2.seg, 1, 1), (r2.seg, -1, -1), (r2.seg, 1, 1)]);
        assert!(lock(&state).take_for_sync().1.is_empty());
        // The current segment, once unreferenced and at least RETIRE_MIN big, is given up:
        // the next body goes to a new one.
        let r3 = a
            .append(&state, 3, &vec![1u8; RETIRE_MIN as usize])
            .unwrap();
        a.write_pending(&state).unwrap();
        lock(&state).apply(&[(r3.seg, 1, 1)]);
        lock(&state).apply(&[(r2.seg, -1, -1), (r3.seg, -1, -1)]);
        assert_eq!(r3.seg, 8);
        assert_eq!(
            lock(&state)
                .take_for_sync()
                .1
                .into_iter()
                .collect::<Vec<_>>(),
            vec![8]
        );
        assert_eq!(a.append(&state, 4, b"y").unwrap().seg, 9);
    }
}
