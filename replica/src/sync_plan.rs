//! The sync of a rebuild as plain data and file steps, with no network: the plan that
//! matches the source's snapshots to the target's layers ([`plan`]), the block
//! checksums and their difference ([`layer_blocks`], [`diff_blocks`]), and the file
//! steps that apply them to a layer (link, open, punch).
//!
//! Floor: above the format's leaves (`meta`, `extent`); below `chain` (whose install
//! takes a [`SyncPlan`]) and `sync` (which fetches the source's side and re-exports
//! this module's items under `crate::sync`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, Extent};
use crate::meta::{LayerMeta, VolumeMeta, BLOCK_SIZE};

/// One snapshot layer of the source, as its control service describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLayer {
    /// The source's layer id (to ask for its data).
    pub id: u64,
    /// Snapshot name (unique in a replica).
    pub name: String,
    /// Name of the snapshot below, if any.
    pub parent: Option<String>,
    /// Layer file length.
    pub size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Deleted by the user, not yet purged.
    pub removed: bool,
}

/// How the target's snapshots will mirror the source's.
///
/// Every synced layer, and the head above them, get new ids above all the target's
/// (a layer's parent is always older than it). A source snapshot the target already
/// has under the same name starts as a hard link to the target's file, so only the
/// blocks that differ are copied into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// (source layer id, target layer metadata) for every source snapshot, in the
    /// source's id order (parents first).
    pub layers: Vec<(u64, LayerMeta)>,
    /// (target layer id, new id) of the snapshots the target already had.
    pub reuse: Vec<(u64, u64)>,
    /// The head's new id.
    pub head: u64,
    /// New id of the layer under the head (the source head's parent).
    pub head_parent: Option<u64>,
    /// Target layers the new chain drops (their files go after the install), the old
    /// head included.
    pub obsolete: Vec<u64>,
    /// The target's next free id after the plan.
    pub next_id: u64,
}

/// Matches the source's snapshots (`layers`, any order; `head_parent` names the one
/// under its head) to the target's metadata.
pub fn plan(layers: &[SourceLayer], head_parent: Option<&str>, target: &VolumeMeta) -> Result<SyncPlan> {
    let mut layers: Vec<&SourceLayer> = layers.iter().collect();
    layers.sort_by_key(|l| l.id);
    let by_name: HashMap<&str, &LayerMeta> = target
        .layers
        .iter()
        .filter_map(|l| l.name.as_deref().map(|n| (n, l)))
        .collect();
    let mut next_id = target.next_id;
    let mut ids: HashMap<&str, u64> = HashMap::new();
    let mut reuse = Vec::new();
    for l in &layers {
        let id = next_id;
        next_id += 1;
        if let Some(t) = by_name.get(l.name.as_str()) {
            reuse.push((t.id, id));
        }
        ids.insert(&l.name, id);
    }
    let head = next_id;
    next_id += 1;
    let mut out = Vec::new();
    for l in &layers {
        let parent = match &l.parent {
            Some(p) => Some(*ids.get(p.as_str()).ok_or_else(|| {
                ReplicaError::InvalidOperation(format!(
                    "the source's snapshot {} has parent {p}, which it does not list",
                    l.name
                ))
            })?),
            None => None,
        };
        out.push((
            l.id,
            LayerMeta {
                id: ids[l.name.as_str()],
                parent,
                size: l.size,
                name: Some(l.name.clone()),
                created: Some(l.created),
                labels: l.labels.clone(),
                removed: l.removed,
            },
        ));
    }
    let head_parent = match head_parent {
        Some(p) => Some(*ids.get(p).ok_or_else(|| {
            ReplicaError::InvalidOperation(format!("the source's head sits on {p}, which it does not list"))
        })?),
        None => None,
    };
    Ok(SyncPlan {
        layers: out,
        reuse,
        head,
        head_parent,
        obsolete: target.layers.iter().map(|l| l.id).collect(),
        next_id,
    })
}

/// The blocks of `[offset, offset + len)` that a layer file holds (data extents,
/// clipped), and the XXH3-64 of each of those blocks in order (unless `extents_only`).
pub fn layer_blocks(
    file: &File,
    path: &Path,
    size: u64,
    offset: u64,
    len: u64,
    extents_only: bool,
) -> Result<(Vec<Extent>, Vec<u64>)> {
    let end = offset.saturating_add(len).min(size);
    let extents: Vec<Extent> = data_extents(file, path, size)?
        .into_iter()
        .filter_map(|e| {
            let s = e.offset.max(offset);
            let t = e.end().min(end);
            // `then`, not `then_some`: the length is worked out only for a range that
            // is there (found by fuzzing: past the extent, `t - s` underflowed).
            (s < t).then(|| Extent {
                offset: s,
                len: t - s,
            })
        })
        .collect();
    let mut sums = Vec::new();
    if extents_only {
        return Ok((extents, sums));
    }
    let mut buf = vec![0u8; 1 << 20];
    for e in &extents {
        let mut at = e.offset;
        while at < e.end() {
            let n = (buf.len() as u64).min(e.end() - at) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|err| ReplicaError::io("read", path, err))?;
            sums.extend(
                buf[..n]
                    .chunks(BLOCK_SIZE as usize)
                    .map(xxhash_rust::xxh3::xxh3_64),
            );
            at += n as u64;
        }
    }
    Ok((extents, sums))
}

/// Per-block view of [`layer_blocks`]: block number to checksum.
pub fn block_map(extents: &[Extent], sums: &[u64]) -> HashMap<u64, u64> {
    let mut map = HashMap::with_capacity(sums.len());
    let mut i = 0;
    for e in extents {
        for b in e.offset / BLOCK_SIZE..e.end() / BLOCK_SIZE {
            map.insert(b, sums[i]);
            i += 1;
        }
    }
    map
}

/// Runs of blocks: (first block, count).
pub type BlockRuns = Vec<(u64, u64)>;

/// What to do to the target's layer so that its data file matches the source's:
/// block runs to copy, and block runs to punch out.
pub fn diff_blocks(source: &HashMap<u64, u64>, target: &HashMap<u64, u64>) -> (BlockRuns, BlockRuns) {
    let mut copy: Vec<u64> = source
        .iter()
        .filter(|(b, s)| target.get(b) != Some(s))
        .map(|(b, _)| *b)
        .collect();
    let mut punch: Vec<u64> = target
        .keys()
        .filter(|b| !source.contains_key(b))
        .copied()
        .collect();
    copy.sort_unstable();
    punch.sort_unstable();
    (runs(&copy), runs(&punch))
}

fn runs(blocks: &[u64]) -> BlockRuns {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((s, n)) if *s + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

/// Gives layer `old`'s files (data, zero log) the names of layer `new` too, unless it
/// has them already (a sync that ran before).
pub fn link_layer(dir: &Path, old: u64, new: u64) -> Result<()> {
    use crate::meta::{layer_path, zeros_path};
    for (from, to) in [
        (layer_path(dir, old), layer_path(dir, new)),
        (zeros_path(dir, old), zeros_path(dir, new)),
    ] {
        if to.exists() || !from.exists() {
            continue;
        }
        std::fs::hard_link(&from, &to).map_err(|e| ReplicaError::io("link", &to, e))?;
    }
    Ok(())
}

/// Opens (creating sparse, of `size` bytes, if absent) a layer file for syncing into.
pub fn open_for_sync(path: &Path, size: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| ReplicaError::io("open", path, e))?;
    let len = f.metadata().map_err(|e| ReplicaError::io("stat", path, e))?.len();
    if len != size {
        f.set_len(size)
            .map_err(|e| ReplicaError::io("truncate", path, e))?;
    }
    Ok(f)
}

/// Punches `count` blocks from `first` out of a layer file.
pub fn punch(f: &File, path: &Path, first: u64, count: u64) -> Result<()> {
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        (first * BLOCK_SIZE) as i64,
        (count * BLOCK_SIZE) as i64,
    )
    .map_err(|e| ReplicaError::io("punch hole", path, std::io::Error::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(id: u64, name: &str, parent: Option<&str>) -> SourceLayer {
        SourceLayer {
            id,
            name: name.into(),
            parent: parent.map(Into::into),
            size: 1 << 20,
            created: 7,
            labels: Default::default(),
            removed: false,
        }
    }

    #[test]
    fn every_synced_layer_and_the_head_get_new_ids_and_same_names_are_reused() {
        // Target: snapshot "a" (id 1), old snapshot "old" (id 2), rebuild snapshot
        // "r" (id 3), head 4.
        let mut t = VolumeMeta::new(1 << 20, 512);
        t.layers[0].name = Some("a".into());
        for (id, name, parent) in [(2, Some("old"), 1), (3, Some("r"), 2), (4, None, 3)] {
            t.layers.push(LayerMeta {
                id,
                parent: Some(parent),
                size: 1 << 20,
                name: name.map(Into::into),
                created: None,
                labels: Default::default(),
                removed: false,
            });
        }
        t.head = 4;
        t.next_id = 5;
        // Source: a (10) <- b (11) <- r (12) <- head.
        let layers = [
            src(12, "r", Some("b")),
            src(10, "a", None),
            src(11, "b", Some("a")),
        ];
        let p = plan(&layers, Some("r"), &t).unwrap();
        let ids: Vec<(u64, u64, Option<u64>)> = p.layers.iter().map(|(s, m)| (*s, m.id, m.parent)).collect();
        assert_eq!(ids, vec![(10, 5, None), (11, 6, Some(5)), (12, 7, Some(6))]);
        assert_eq!(p.reuse, vec![(1, 5), (3, 7)]);
        assert_eq!((p.head, p.head_parent, p.next_id), (8, Some(7), 9));
        assert_eq!(p.obsolete, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_range_past_every_extent_gives_no_blocks_and_no_overflow() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.set_len(1 << 20).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // Data at [0, 8 KiB); ask for ranges after it, inside and past the file.
        for (offset, len) in [(65536, 4096), (1 << 20, 4096), (u64::MAX - 10, 20), (8192, 0)] {
            let (extents, sums) = layer_blocks(&f, &path, 1 << 20, offset, len, false).unwrap();
            assert!(
                extents.is_empty() && sums.is_empty(),
                "{offset}+{len}: {extents:?}"
            );
        }
        let (extents, sums) = layer_blocks(&f, &path, 1 << 20, 4096, 65536, false).unwrap();
        assert_eq!((extents.len(), sums.len()), (1, 1), "{extents:?}");
    }

    #[test]
    fn differing_missing_and_extra_blocks() {
        let s: HashMap<u64, u64> = [(1, 10), (2, 20), (3, 30), (7, 70)].into();
        let t: HashMap<u64, u64> = [(1, 10), (2, 99), (5, 50), (6, 60)].into();
        let (copy, punch) = diff_blocks(&s, &t);
        assert_eq!(copy, vec![(2, 2), (7, 1)]);
        assert_eq!(punch, vec![(5, 2)]);
    }
}
