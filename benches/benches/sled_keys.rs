//! sled alone: does its memory grow with the number of keys or with the bytes stored?
//!
//! Writes `--n` records of `--value` bytes the way the queue writes message metadata (ids in
//! order, one sled `Batch` per group of `--group` records, each batch flushed and the `db`
//! file fdatasynced), then rewrites every record once (an outcome), then removes them all.
//! With `--pack P` the records are packed P to a key: key = id / P, value = the P records
//! end to end, so a group rewrites each packed key it touches whole. RSS is read at each
//! `--step` records and after each phase, with sled's cache at `--cache-mib`. Nothing here
//! calls sled's `len`: it reads every node into memory, which hides what the cache holds.
//!
//! ```text
//! CARGO_TARGET_DIR=target-queue cargo bench -p bulksend-benches --bench sled_keys -- \
//!     [--n 1000000] [--step 200000] [--pack 1] [--value 150] [--group 512] [--cache-mib 8]
//! ```
//!
//! Results: BENCHMARKS.md, Queue, "Fourteenth session".

use std::collections::BTreeMap;
use std::fs::File;
use std::time::Instant;

use bulksend_benches::{arg, dir_size, mib, rss};

fn key(k: u64) -> [u8; 9] {
    let mut b = [b'm'; 9];
    b[1..].copy_from_slice(&k.to_be_bytes());
    b
}

/// A record's bytes: its id and a state byte, padded to `len`.
fn record(id: u64, state: u8, len: usize) -> Vec<u8> {
    let mut v = vec![state; len.max(9)];
    v[..8].copy_from_slice(&id.to_be_bytes());
    v
}

struct Bench {
    db: sled::Db,
    dir: std::path::PathBuf,
    pack: u64,
    value: usize,
}

impl Bench {
    /// Writes records `ids` with `state` in one batch, flushed and synced. Packed keys are
    /// read, changed and written whole; `remove` drops the records instead.
    fn group(&self, ids: std::ops::Range<u64>, state: u8, remove: bool) {
        let mut batch = sled::Batch::default();
        if self.pack == 1 {
            for id in ids {
                if remove {
                    batch.remove(&key(id));
                } else {
                    batch.insert(&key(id), record(id, state, self.value));
                }
            }
        } else {
            let mut packed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for id in ids {
                let k = id / self.pack;
                let v = packed.entry(k).or_insert_with(|| {
                    self.db
                        .get(key(k))
                        .expect("sled get")
                        .map(|v| v.to_vec())
                        .unwrap_or_default()
                });
                let slot = (id % self.pack) as usize * self.value;
                if v.len() < slot + self.value {
                    v.resize(slot + self.value, 0);
                }
                let r = if remove {
                    vec![0; self.value]
                } else {
                    record(id, state, self.value)
                };
                v[slot..slot + self.value].copy_from_slice(&r);
            }
            for (k, v) in packed {
                if remove && v.iter().all(|&b| b == 0) {
                    batch.remove(&key(k));
                } else {
                    batch.insert(&key(k), v);
                }
            }
        }
        self.db.apply_batch(batch).expect("sled batch");
        self.db.flush().expect("sled flush");
        File::open(self.dir.join("db"))
            .and_then(|f| f.sync_data())
            .expect("fdatasync");
    }

    fn phase(&self, name: &str, n: u64, group: u64, step: u64, state: u8, remove: bool) {
        let t = Instant::now();
        let mut id = 0;
        while id < n {
            let end = (id + group).min(n);
            self.group(id..end, state, remove);
            if end / step != id / step || end == n {
                let (now, peak) = rss();
                println!(
                    "{name} {end:>9}: RSS {} (peak {}), disk {}, {:.0} rec/s",
                    mib(now),
                    mib(peak),
                    mib(dir_size(&self.dir)),
                    end as f64 / t.elapsed().as_secs_f64()
                );
            }
            id = end;
        }
    }
}

fn main() {
    let n = arg("--n", 1_000_000) as u64;
    let step = arg("--step", 200_000).max(1) as u64;
    let pack = arg("--pack", 1).max(1) as u64;
    let value = arg("--value", 150);
    let group = arg("--group", 512).max(1) as u64;
    let cache_mib = arg("--cache-mib", 8) as u64;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("sled");
    println!(
        "sled_keys: --n {n} --pack {pack} --value {value} --group {group} --cache-mib {cache_mib}"
    );
    let (now, _) = rss();
    println!("before open: RSS {}", mib(now));
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(cache_mib * 1024 * 1024)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open sled");
    let b = Bench {
        db,
        dir: dir.clone(),
        pack,
        value,
    };
    b.phase("fill   ", n, group, step, 1, false);
    b.phase("rewrite", n, group, step, 2, false);
    b.phase("remove ", n, group, step, 0, true);
}
