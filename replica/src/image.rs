//! A snapshot's image, read straight from a replica's files: what a backup reads.
//!
//! A snapshot's layers never change once it is taken (only the head is written), so
//! they can be read beside a running replica, without its server: each block comes
//! from the topmost layer of the snapshot's ancestry that holds data for it, reads as
//! zeros where that layer's zero log says so, and as zeros where no layer holds it.
//! [`SnapshotImage::changed_since`] gives the ranges that may differ from an older
//! snapshot of the same chain: what an incremental backup reads.
//!
//! The caller keeps the snapshot from being deleted while it reads (a deletion folds
//! layers into their children).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, merge, subtract, Extent};
use crate::meta::{layer_path, zeros_path, VolumeMeta};

/// One layer of the image: its file and what it holds.
struct Layer {
    id: u64,
    file: File,
    path: PathBuf,
    data: Vec<Extent>,
    zeros: Vec<Extent>,
}

/// The image of one snapshot of a replica directory.
pub struct SnapshotImage {
    /// Root first, the snapshot's own layer last.
    layers: Vec<Layer>,
    size: u64,
    name: String,
}

impl std::fmt::Debug for SnapshotImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotImage({}, {} layers)", self.name, self.layers.len())
    }
}

/// The extent of `list` (sorted, apart) holding `offset`, if any, and else the start
/// of the next one (where a run of bytes no extent holds ends).
fn find(list: &[Extent], offset: u64) -> Result<&Extent, u64> {
    let i = list.partition_point(|e| e.offset + e.len <= offset);
    match list.get(i) {
        Some(e) if e.offset <= offset => Ok(e),
        Some(e) => Err(e.offset),
        None => Err(u64::MAX),
    }
}

impl SnapshotImage {
    /// Snapshot `name` of the replica in `dir`.
    pub fn open(dir: &Path, name: &str) -> Result<SnapshotImage> {
        let meta = VolumeMeta::load(dir)?;
        let snap = meta.snapshot(name).filter(|l| !l.removed).ok_or_else(|| {
            ReplicaError::InvalidOperation(format!("no snapshot {name:?} in {}", dir.display()))
        })?;
        let size = snap.size;
        let layers = meta
            .ancestry(snap.id)
            .into_iter()
            .map(|id| {
                let l = meta.layer(id).expect("an ancestor is in the metadata");
                let path = layer_path(dir, id);
                let file = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
                let data = data_extents(&file, &path, l.size)?;
                let zeros = subtract(&crate::zeros::load(&zeros_path(dir, id), l.size)?, &data);
                Ok(Layer {
                    id,
                    file,
                    path,
                    data,
                    zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SnapshotImage {
            layers,
            size,
            name: name.to_string(),
        })
    }

    /// The volume's size at the snapshot.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes of the image at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or(ReplicaError::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.size,
            })?;
        let mut at = offset;
        while at < end {
            // The topmost layer that decides `at`, and how far its say goes.
            let mut upto = end;
            let mut source = None;
            for layer in self.layers.iter().rev() {
                match (find(&layer.data, at), find(&layer.zeros, at)) {
                    (Ok(e), _) => {
                        upto = upto.min(e.offset + e.len);
                        source = Some(layer);
                        break;
                    }
                    (_, Ok(z)) => {
                        upto = upto.min(z.offset + z.len);
                        break;
                    }
                    (Err(d), Err(z)) => upto = upto.min(d).min(z),
                }
            }
            let piece = &mut buf[(at - offset) as usize..(upto - offset) as usize];
            match source {
                Some(l) => l
                    .file
                    .read_exact_at(piece, at)
                    .map_err(|e| ReplicaError::io("read", &l.path, e))?,
                None => piece.fill(0),
            }
            at = upto;
        }
        Ok(())
    }

    /// The ranges that may hold data (anything not known to read as zeros).
    pub fn allocated(&self) -> Vec<Extent> {
        self.changed_since(None)
    }

    /// The ranges that may differ from snapshot `older` of the same chain (`None`:
    /// from an empty volume, so the ranges that may hold data): every range a layer
    /// above `older` holds data or zeros for; the whole volume if `older` is not an
    /// ancestor of this snapshot.
    pub fn changed_since(&self, older: Option<&SnapshotImage>) -> Vec<Extent> {
        let (above, with_zeros) = match older {
            None => (0, false),
            Some(o) => match o
                .layers
                .last()
                .and_then(|top| self.layers.iter().position(|l| l.id == top.id))
            {
                Some(i) => (i + 1, true),
                // Not an ancestor: anything may differ.
                None => {
                    return vec![Extent {
                        offset: 0,
                        len: self.size,
                    }]
                }
            },
        };
        let mut all = Vec::new();
        for l in &self.layers[above..] {
            all.extend(l.data.iter().copied());
            if with_zeros {
                all.extend(l.zeros.iter().copied());
            }
        }
        merge(all)
            .into_iter()
            .filter_map(|e| {
                let end = (e.offset + e.len).min(self.size);
                (end > e.offset).then_some(Extent {
                    offset: e.offset,
                    len: end - e.offset,
                })
            })
            .collect()
    }

    /// Whether `older` is an ancestor snapshot of this one (an incremental backup
    /// from it then reads only [`SnapshotImage::changed_since`]).
    pub fn descends_from(&self, older: &SnapshotImage) -> bool {
        older
            .layers
            .last()
            .is_some_and(|top| self.layers.iter().any(|l| l.id == top.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Replica;
    use std::collections::BTreeMap;

    const MIB: u64 = 1 << 20;

    fn fill(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_snapshot_reads_as_it_was_taken_whatever_came_after() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("r");
        let mut r = Replica::create(&d, 8 * MIB, 512).unwrap();
        let none = BTreeMap::new();
        r.write_at(0, &fill(1, MIB as usize)).unwrap();
        r.write_at(4 * MIB, &fill(2, 64 << 10)).unwrap();
        r.snapshot("a", &none).unwrap();
        let mut at_a = vec![0u8; 8 * MIB as usize];
        r.read_at(0, &mut at_a).unwrap();
        // After a: overwrite part, discard part, zero part, write new.
        r.write_at(64 << 10, &fill(3, 128 << 10)).unwrap();
        r.discard(4 * MIB, 32 << 10).unwrap();
        r.write_zeroes(512 << 10, 64 << 10).unwrap();
        r.write_at(6 * MIB, &fill(4, 8192)).unwrap();
        r.snapshot("b", &none).unwrap();
        let mut at_b = vec![0u8; 8 * MIB as usize];
        r.read_at(0, &mut at_b).unwrap();
        // The head moves on; the snapshots do not.
        r.write_at(0, &fill(5, 2 * MIB as usize)).unwrap();
        r.flush().unwrap();

        let a = SnapshotImage::open(&d, "a").unwrap();
        let b = SnapshotImage::open(&d, "b").unwrap();
        let mut got = vec![0u8; 8 * MIB as usize];
        a.read_at(0, &mut got).unwrap();
        assert!(got == at_a, "snapshot a reads otherwise");
        b.read_at(0, &mut got).unwrap();
        assert!(got == at_b, "snapshot b reads otherwise");
        // Unaligned reads across the pieces agree too.
        let mut piece = vec![0u8; 300_001];
        b.read_at(4 * MIB - 7, &mut piece).unwrap();
        assert!(piece[..] == at_b[(4 * MIB - 7) as usize..(4 * MIB - 7) as usize + 300_001]);

        // What changed from a to b: the overwrite, the discard, the zeroing, the new
        // write (and nothing of the head's later writes).
        let changed = b.changed_since(Some(&a));
        let covers = |off: u64, len: u64| {
            changed
                .iter()
                .any(|e| e.offset <= off && off + len <= e.offset + e.len)
        };
        assert!(covers(64 << 10, 128 << 10), "{changed:?}");
        assert!(covers(4 * MIB, 32 << 10), "{changed:?}");
        assert!(covers(512 << 10, 64 << 10), "{changed:?}");
        assert!(covers(6 * MIB, 8192), "{changed:?}");
        assert!(!covers(2 * MIB, 4096), "{changed:?}");
        assert!(b.descends_from(&a) && !a.descends_from(&b));
        // Everything a holds is in its allocation.
        let alloc = a.allocated();
        assert!(alloc.iter().any(|e| e.offset == 0 && e.len >= MIB), "{alloc:?}");

        assert!(SnapshotImage::open(&d, "nope").is_err());
        assert!(a.read_at(8 * MIB - 10, &mut [0u8; 11]).is_err());
        r.close().unwrap();
    }

    /// Random writes, discards and zeroings between snapshots (seeded: the seed is
    /// printed, and `HORN_IMAGE_SEED` replays one): every snapshot's image reads as
    /// the volume did when it was taken, and what changed between consecutive
    /// snapshots covers every byte that differs.
    #[test]
    fn random_histories_read_back_snapshot_by_snapshot() {
        let seed: u64 = std::env::var("HORN_IMAGE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("snapshot image history: seed {seed} (HORN_IMAGE_SEED={seed} replays it)");
        let mut x = seed | 1;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("r");
        let size = 4 * MIB;
        let mut r = Replica::create(&d, size, 512).unwrap();
        let mut taken = Vec::new();
        for s in 0..6 {
            for _ in 0..20 {
                let off = next(size / 4096) * 4096;
                let len = ((next(16) + 1) * 4096).min(size - off);
                match next(4) {
                    0 => r.discard(off, len).unwrap(),
                    1 => r.write_zeroes(off, len).unwrap(),
                    _ => r.write_at(off, &fill(next(256) as u8, len as usize)).unwrap(),
                }
            }
            let name = format!("s{s}");
            r.snapshot(&name, &BTreeMap::new()).unwrap();
            let mut image = vec![0u8; size as usize];
            r.read_at(0, &mut image).unwrap();
            taken.push((name, image));
        }
        r.flush().unwrap();
        let mut prev: Option<(SnapshotImage, &Vec<u8>)> = None;
        for (name, want) in &taken {
            let img = SnapshotImage::open(&d, name).unwrap();
            let mut got = vec![0u8; size as usize];
            img.read_at(0, &mut got).unwrap();
            assert!(&got == want, "seed {seed}: snapshot {name} reads otherwise");
            if let Some((p, before)) = &prev {
                let changed = img.changed_since(Some(p));
                for (i, (a, b)) in before.iter().zip(want.iter()).enumerate() {
                    if a != b {
                        let o = i as u64;
                        assert!(
                            changed.iter().any(|e| e.offset <= o && o < e.offset + e.len),
                            "seed {seed}: byte {o} changed before {name} and is not in {changed:?}"
                        );
                    }
                }
            }
            prev = Some((img, want));
        }
        r.close().unwrap();
    }
}
