//! The stored part of the idempotency index: sorted, immutable run files in `idem/`, read
//! with `pread`, outside sled (see `idem` for the whole index and why).
//!
//! A run holds the entries (44 bits of a key's hash, message id) of the messages with ids
//! `lo..=hi`, sorted, in blocks of 4 KiB: a block is a count (u16), a format byte, a spare
//! byte, the CRC-32 of its entries, then up to 255 entries of 16 bytes (both big-endian u64),
//! zero-padded. The file is `{lo:016x}-{hi:016x}.run`. In memory a run costs the first hash of
//! each block (8 bytes per 255 entries); a lookup reads one block per run through the OS
//! page cache, which is not the process's memory (two when the key is the first of a block:
//! the block before may end with it too).
//!
//! Runs are written whole to a `.tmp` file, `fdatasync`ed and renamed (the directory synced),
//! so a run file is always complete; nothing in them is ever changed. Entries of messages
//! that are gone stay until a merge of runs drops those below the oldest message still
//! queued (a lookup checks the message's metadata anyway), and a run whose every id is
//! below it is deleted whole. Two runs are merged into one covering both ranges; the open
//! deletes any run whose range another run covers (the inputs of a merge cut short).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::MessageId;

/// The directory in the queue's directory.
pub(crate) const DIR: &str = "idem";
const BLOCK: usize = 4096;
const HEADER: usize = 8;
const ENTRY: usize = 16;
const PER_BLOCK: usize = (BLOCK - HEADER) / ENTRY;
const FORMAT: u8 = 1;

/// What a run stores of a key's hash: the 44 bits the memory part decides by (its shard's
/// top 12 bits, then the low 32), in an order that sorts as the memory part's shards do.
pub(crate) fn run_key(h: u64) -> u64 {
    (h >> 52) << 32 | (h & 0xffff_ffff)
}

/// A problem with a run file: its path, where in it, what.
#[derive(Debug)]
pub(crate) struct RunError {
    pub(crate) path: PathBuf,
    pub(crate) at: String,
    pub(crate) detail: String,
}

/// One run file, open.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) path: PathBuf,
    pub(crate) lo: u64,
    pub(crate) hi: u64,
    file: File,
    /// The first key of each block.
    first: Vec<u64>,
    pub(crate) len: u64,
}

fn file_name(lo: u64, hi: u64) -> String {
    format!("{lo:016x}-{hi:016x}.run")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (lo, hi) = name.strip_suffix(".run")?.split_once('-')?;
    if lo.len() != 16 || hi.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(lo, 16).ok()?,
        u64::from_str_radix(hi, 16).ok()?,
    ))
}

/// Reads block `n` of a run file and checks its format, count and CRC: its bytes and its
/// number of entries.
fn read_block(file: &File, path: &Path, n: usize) -> Result<([u8; BLOCK], usize), RunError> {
    let err = |detail: String| RunError {
        path: path.to_path_buf(),
        at: format!("block {n}"),
        detail,
    };
    let mut b = [0u8; BLOCK];
    file.read_exact_at(&mut b, (n * BLOCK) as u64)
        .map_err(|e| err(e.to_string()))?;
    let count = usize::from(u16::from_be_bytes([b[0], b[1]]));
    if b[2] != FORMAT {
        return Err(err(format!("unknown format {}", b[2])));
    }
    if count == 0 || count > PER_BLOCK {
        return Err(err(format!("{count} entries")));
    }
    let crc = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    if crc32fast::hash(&b[HEADER..HEADER + count * ENTRY]) != crc {
        return Err(err("checksum mismatch".into()));
    }
    Ok((b, count))
}

/// Entry `i` of a block: (key, message id).
fn entry(b: &[u8; BLOCK], i: usize) -> (u64, u64) {
    let at = HEADER + i * ENTRY;
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(w)
    };
    (word(at), word(at + 8))
}

/// The entries of a block read by [`read_block`], checked to be in order.
fn decode_block(
    path: &Path,
    n: usize,
    b: &[u8; BLOCK],
    count: usize,
) -> Result<Vec<(u64, u64)>, RunError> {
    let out: Vec<(u64, u64)> = (0..count).map(|i| entry(b, i)).collect();
    if out.windows(2).any(|w| w[0] >= w[1]) {
        return Err(RunError {
            path: path.to_path_buf(),
            at: format!("block {n}"),
            detail: "entries out of order".into(),
        });
    }
    Ok(out)
}

/// Writes sorted entries into blocks.
struct Writer {
    out: BufWriter<File>,
    block: Vec<(u64, u64)>,
    len: u64,
    first: Vec<u64>,
    last: Option<(u64, u64)>,
}

impl Writer {
    fn push(&mut self, e: (u64, u64)) -> std::io::Result<()> {
        if self.last.is_some_and(|l| l >= e) {
            // Repeats (the same key of the same message in two runs) are dropped; anything
            // else out of order is a bug in the caller, refused rather than written.
            if self.last == Some(e) {
                return Ok(());
            }
            return Err(std::io::Error::other(
                "idempotency run entries out of order",
            ));
        }
        self.last = Some(e);
        self.block.push(e);
        self.len += 1;
        if self.block.len() == PER_BLOCK {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> std::io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let mut b = vec![0u8; BLOCK];
        let count = self.block.len();
        b[0..2].copy_from_slice(&(count as u16).to_be_bytes());
        b[2] = FORMAT;
        for (i, (k, id)) in self.block.iter().enumerate() {
            let at = HEADER + i * ENTRY;
            b[at..at + 8].copy_from_slice(&k.to_be_bytes());
            b[at + 8..at + 16].copy_from_slice(&id.to_be_bytes());
        }
        let crc = crc32fast::hash(&b[HEADER..HEADER + count * ENTRY]);
        b[4..8].copy_from_slice(&crc.to_be_bytes());
        self.first.push(self.block[0].0);
        self.block.clear();
        self.out.write_all(&b)
    }
}

impl Run {
    /// Writes the run of ids `lo..=hi` from `entries` (sorted by key, then id) into `dir`:
    /// durable, under its name, when this returns. `None` if there was no entry (nothing is
    /// written).
    pub(crate) fn write(
        dir: &Path,
        lo: u64,
        hi: u64,
        entries: impl Iterator<Item = Result<(u64, u64), RunError>>,
    ) -> Result<Option<Run>, RunError> {
        let path = dir.join(file_name(lo, hi));
        let tmp = path.with_extension("tmp");
        let io = |e: std::io::Error| RunError {
            path: tmp.clone(),
            at: "write".into(),
            detail: e.to_string(),
        };
        let file = File::create(&tmp).map_err(io)?;
        let mut w = Writer {
            out: BufWriter::with_capacity(64 * 1024, file),
            block: Vec::with_capacity(PER_BLOCK),
            len: 0,
            first: Vec::new(),
            last: None,
        };
        for e in entries {
            w.push(e?).map_err(io)?;
        }
        w.flush_block().map_err(io)?;
        let Writer {
            out, len, first, ..
        } = w;
        if len == 0 {
            drop(out);
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_data().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        let file = File::open(&path).map_err(io)?;
        Ok(Some(Run {
            path,
            lo,
            hi,
            file,
            first,
            len,
        }))
    }

    /// Opens and checks a run file (every block: its CRC, and the order across blocks).
    fn open(path: PathBuf, lo: u64, hi: u64) -> Result<Run, RunError> {
        let io = |e: std::io::Error| RunError {
            path: path.clone(),
            at: "open".into(),
            detail: e.to_string(),
        };
        let file = File::open(&path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size % BLOCK as u64 != 0 {
            return Err(RunError {
                path: path.clone(),
                at: "size".into(),
                detail: format!("{size} bytes, not a whole number of {BLOCK}-byte blocks"),
            });
        }
        let mut first = Vec::new();
        let mut len = 0;
        let mut last = None;
        for n in 0..(size / BLOCK as u64) as usize {
            let (b, count) = read_block(&file, &path, n)?;
            let entries = decode_block(&path, n, &b, count)?;
            if last.is_some_and(|l| l >= entries[0]) {
                return Err(RunError {
                    path: path.clone(),
                    at: format!("block {n}"),
                    detail: "blocks out of order".into(),
                });
            }
            last = entries.last().copied();
            first.push(entries[0].0);
            len += entries.len() as u64;
        }
        Ok(Run {
            path,
            lo,
            hi,
            file,
            first,
            len,
        })
    }

    /// Adds to `out` the messages under `key` (see [`run_key`]). A lookup searches the
    /// block's bytes once its CRC is right, without decoding it: the order was checked when
    /// the run was opened or written.
    pub(crate) fn candidates(&self, key: u64, out: &mut Vec<MessageId>) -> Result<(), RunError> {
        // The last block that starts below `key` may end with it; later ones start at it.
        let mut n = self.first.partition_point(|&f| f < key).saturating_sub(1);
        while n < self.first.len() && self.first[n] <= key {
            let (b, count) = read_block(&self.file, &self.path, n)?;
            let (mut i, mut end) = (0, count);
            while i < end {
                let mid = (i + end) / 2;
                if entry(&b, mid).0 < key {
                    i = mid + 1;
                } else {
                    end = mid;
                }
            }
            out.extend(
                (i..count)
                    .map(|i| entry(&b, i))
                    .take_while(|e| e.0 == key)
                    .map(|e| MessageId(e.1)),
            );
            if entry(&b, count - 1).0 > key {
                break;
            }
            n += 1;
        }
        Ok(())
    }

    /// Every entry, in order (checked).
    pub(crate) fn entries(&self) -> impl Iterator<Item = Result<(u64, u64), RunError>> + '_ {
        (0..self.first.len()).flat_map(move |n| {
            let block = read_block(&self.file, &self.path, n)
                .and_then(|(b, count)| decode_block(&self.path, n, &b, count));
            match block {
                Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }
        })
    }

    /// Writes one run covering `older` and `newer`, without the entries of messages below
    /// `floor` (gone); the caller deletes the two (see [`Run::delete_file`]). `None`: nothing was
    /// left.
    pub(crate) fn merge(
        dir: &Path,
        older: &Run,
        newer: &Run,
        floor: u64,
    ) -> Result<Option<Run>, RunError> {
        let (lo, hi) = (older.lo.min(newer.lo), older.hi.max(newer.hi));
        let mut a = older.entries().peekable();
        let mut b = newer.entries().peekable();
        let merged = std::iter::from_fn(|| loop {
            let e = match (a.peek(), b.peek()) {
                (Some(Err(_)), _) => a.next(),
                (_, Some(Err(_))) => b.next(),
                (Some(Ok(x)), Some(Ok(y))) if x > y => b.next(),
                (Some(_), _) => a.next(),
                (None, _) => b.next(),
            }?;
            match e {
                Ok((_, id)) if id < floor => continue,
                other => return Some(other),
            }
        });
        Run::write(dir, lo, hi, merged)
    }

    /// Deletes the file of a run that is no longer used, unless `kept` has taken its name.
    pub(crate) fn delete_file(&self, kept: Option<&Run>) {
        if kept.is_none_or(|k| k.path != self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Opens the runs in `dir` (creating it), oldest first: removes unfinished `.tmp` files and
/// runs covered by another run (the inputs of a merge that was cut short).
pub(crate) fn open_all(dir: &Path) -> Result<Vec<Run>, RunError> {
    let io = |e: std::io::Error| RunError {
        path: dir.to_path_buf(),
        at: "directory".into(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path);
        } else if let Some((lo, hi)) = parse_name(name) {
            found.push((lo, std::cmp::Reverse(hi), path));
        }
    }
    found.sort();
    let mut runs: Vec<Run> = Vec::new();
    let mut covered_to = None;
    for (lo, std::cmp::Reverse(hi), path) in found {
        if covered_to.is_some_and(|c| hi <= c) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        covered_to = Some(hi);
        runs.push(Run::open(path, lo, hi)?);
    }
    Ok(runs)
}

/// Removes every run file in `dir` (a new hash key makes them meaningless).
pub(crate) fn remove_all(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Opens `path` for appending garbage in tests.
#[cfg(test)]
pub(crate) fn open_for_damage(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ok(v: Vec<(u64, u64)>) -> impl Iterator<Item = Result<(u64, u64), RunError>> {
        v.into_iter().map(Ok)
    }

    fn found(r: &Run, key: u64) -> Vec<u64> {
        let mut out = Vec::new();
        r.candidates(key, &mut out).unwrap();
        out.into_iter().map(|m| m.0).collect()
    }

    /// Entries over many blocks are found where they are, also a key whose entries straddle
    /// a block boundary, and a reopened run is the same.
    #[test]
    fn a_run_finds_its_entries_across_blocks_and_reopens_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries: Vec<(u64, u64)> = (0..2000u64).map(|i| (i * 3, i)).collect();
        // Key 1500 three times around the end of the second block (entries 255..510).
        let at = 2 * PER_BLOCK - 2;
        entries.truncate(at);
        let k = entries[at - 1].0 + 1;
        entries.extend([(k, 7), (k, 8), (k, 9)]);
        entries.extend((at as u64 + 1..2000).map(|i| (i * 3 + 10_000, i)));
        let run = Run::write(dir.path(), 1, 2000, ok(entries.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(run.len, entries.len() as u64);
        assert_eq!(found(&run, k), vec![7, 8, 9]);
        assert_eq!(found(&run, 0), vec![0]);
        assert_eq!(found(&run, 3), vec![1]);
        assert_eq!(found(&run, 4), Vec::<u64>::new());
        let (lk, lid) = *entries.last().unwrap();
        assert_eq!(found(&run, lk), vec![lid]);
        assert_eq!(found(&run, u64::MAX), Vec::<u64>::new());
        let back: Vec<_> = run.entries().map(Result::unwrap).collect();
        assert_eq!(back, entries);
        let runs = open_all(dir.path()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].lo, runs[0].hi, runs[0].len), (1, 2000, run.len));
        assert_eq!(found(&runs[0], k), vec![7, 8, 9]);
        assert!(Run::write(dir.path(), 5, 6, ok(vec![])).unwrap().is_none());
        assert_eq!(open_all(dir.path()).unwrap().len(), 1, "nothing written");
    }

    /// A merge keeps both runs' entries in order but those below the floor, and replaces
    /// them; an open after a merge cut short (inputs left beside the output) keeps only the
    /// output; an unfinished file is removed.
    #[test]
    fn runs_merge_without_what_is_gone_and_an_unfinished_merge_is_tidied_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let older: Vec<_> = (1..=600u64).map(|id| (id * 7919 % 1000, id)).collect();
        let newer: Vec<_> = (601..=900u64).map(|id| (id * 7919 % 1000, id)).collect();
        let sorted = |mut v: Vec<(u64, u64)>| {
            v.sort();
            v
        };
        let a = Run::write(dir.path(), 1, 600, ok(sorted(older.clone())))
            .unwrap()
            .unwrap();
        let b = Run::write(dir.path(), 601, 900, ok(sorted(newer.clone())))
            .unwrap()
            .unwrap();
        // Copies of the inputs, to play the merge cut short afterwards.
        let (ca, cb) = (a.path.with_extension("a"), b.path.with_extension("b"));
        std::fs::copy(&a.path, &ca).unwrap();
        std::fs::copy(&b.path, &cb).unwrap();
        let m = Run::merge(dir.path(), &a, &b, 100).unwrap().unwrap();
        a.delete_file(Some(&m));
        b.delete_file(Some(&m));
        let want = sorted(
            older
                .iter()
                .chain(&newer)
                .copied()
                .filter(|e| e.1 >= 100)
                .collect(),
        );
        assert_eq!((m.lo, m.hi), (1, 900));
        let got: Vec<_> = m.entries().map(Result::unwrap).collect();
        assert_eq!(got, want);
        let (mp, mlen) = (m.path.clone(), m.len);
        drop(m);
        std::fs::rename(&ca, dir.path().join(file_name(1, 600))).unwrap();
        std::fs::rename(&cb, dir.path().join(file_name(601, 900))).unwrap();
        std::fs::write(
            dir.path().join("0000000000000001-0000000000000009.tmp"),
            b"x",
        )
        .unwrap();
        let runs = open_all(dir.path()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!((&runs[0].path, runs[0].len), (&mp, mlen));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "inputs and the unfinished file removed");
        // Everything below the floor: nothing left, inputs gone.
        let runs = open_all(dir.path()).unwrap();
        let mut it = runs.into_iter();
        let only = it.next().unwrap();
        let c = Run::write(dir.path(), 901, 901, ok(vec![(5, 901)]))
            .unwrap()
            .unwrap();
        assert!(Run::merge(dir.path(), &only, &c, 10_000).unwrap().is_none());
        only.delete_file(None);
        c.delete_file(None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A damaged block is an error naming the file and the block, at open and at a lookup.
    #[test]
    fn a_damaged_run_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<_> = (0..600u64).map(|i| (i, i)).collect();
        let run = Run::write(dir.path(), 0, 599, ok(entries))
            .unwrap()
            .unwrap();
        open_for_damage(&run.path)
            .write_all_at(&[0xff], (BLOCK + HEADER + 5) as u64)
            .unwrap();
        let mut out = Vec::new();
        let e = run.candidates(300, &mut out).unwrap_err();
        assert_eq!(
            (e.path.clone(), e.at.as_str()),
            (run.path.clone(), "block 1")
        );
        assert!(e.detail.contains("checksum"), "{e:?}");
        assert!(found(&run, 3) == vec![3], "the other blocks still read");
        let e = open_all(dir.path()).unwrap_err();
        assert_eq!(e.at, "block 1");
        open_for_damage(&run.path).set_len(100).unwrap();
        let e = open_all(dir.path()).unwrap_err();
        assert_eq!(e.at, "size");
    }
}
