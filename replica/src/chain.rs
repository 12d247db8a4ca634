//! Operations on the snapshot chain: snapshot, delete, purge, revert, expand; the
//! listings (info, extents); and the clean-up that open does after a crash.
//!
//! Each operation follows one pattern so that a crash at any point leaves the chain
//! either as it was or as it would be after the operation:
//! 1. create whatever new files are needed; they are not referenced yet, so a crash
//!    leaves only orphans, which open deletes;
//! 2. (purge only) copy data into the surviving layer, which changes no read;
//! 3. commit by replacing `volume.json` atomically: this is the single switch;
//! 4. delete the files the new metadata no longer references (orphans if interrupted).
//!
//! Chain operations wait for in-flight I/O first; the engine quiesces I/O around them.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::crash;
use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, merge, subtract, Extent};
use crate::meta::{
    self, check_size, layer_path, validate_label, validate_name, zeros_path, LayerMeta, VolumeMeta,
    MAX_CHAIN_LAYERS,
};
use crate::replica::{create_layer_file, layer_ownership, Replica};
use crate::zeros;

/// One layer as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// Layer id.
    pub id: u64,
    /// Snapshot name; `None` for the head.
    pub name: Option<String>,
    /// Name of the parent snapshot.
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: Option<u64>,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Deleted, waiting for a purge.
    pub removed: bool,
    /// On the path from the head to the root (reads go through it).
    pub in_chain: bool,
    /// Length of the layer file.
    pub size: u64,
    /// Bytes the layer file occupies on disk.
    pub used_bytes: u64,
}

/// What `info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaInfo {
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Layers in the active chain, root first, head last.
    pub chain_length: usize,
    /// Every layer, active chain first (root to head), then the others by id.
    pub layers: Vec<LayerInfo>,
    /// Bytes all layer files occupy on disk.
    pub used_bytes: u64,
    /// Heap bytes of the in-memory extent index.
    pub index_bytes: usize,
}

/// What a purge did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeReport {
    /// Snapshots folded away or dropped.
    pub purged: Vec<String>,
    /// Deleted snapshots kept, and why.
    pub kept: Vec<(String, String)>,
}

/// A layer's own extents: where its file holds data, and where it reads as zeros
/// over older layers (zero-log ranges the file does not also hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LayerExtents {
    /// Ranges the layer file holds data for.
    pub data: Vec<Extent>,
    /// Ranges that read as zeros in this layer whatever the layers below hold.
    pub zeros: Vec<Extent>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unlink_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ReplicaError::io("remove", path, e)),
    }
}

/// Completes an interrupted expansion and removes files no metadata references.
pub(crate) fn finish_interrupted(dir: &Path, m: &mut VolumeMeta) -> Result<()> {
    if let Some(to) = m.expanding_to {
        // Rolling forward is always possible: nothing was written past the old size.
        let path = layer_path(dir, m.head);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| ReplicaError::io("open", &path, e))?;
        f.set_len(to)
            .map_err(|e| ReplicaError::io("truncate", &path, e))?;
        f.sync_all().map_err(|e| ReplicaError::io("fsync", &path, e))?;
        commit_expansion(m, to);
        m.store(dir)?;
        tracing::info!(dir = %dir.display(), size = to, "finished an interrupted expansion");
    }
    let keep: HashSet<String> = m
        .layers
        .iter()
        .flat_map(|l| [layer_path(dir, l.id), zeros_path(dir, l.id)])
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let entries = std::fs::read_dir(dir).map_err(|e| ReplicaError::io("list", dir, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| ReplicaError::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("layer-") && (name.ends_with(".img") || name.ends_with(".zeros"));
        let temp = name.ends_with(".tmp");
        if (ours && !keep.contains(&name)) || temp {
            tracing::info!(file = %entry.path().display(), "removing a file left by an interrupted operation");
            unlink_if_present(&entry.path())?;
            removed = true;
        }
    }
    if removed {
        meta::sync_dir(dir)?;
    }
    Ok(())
}

fn commit_expansion(m: &mut VolumeMeta, to: u64) {
    m.size = to;
    m.expanding_to = None;
    let head = m.head;
    m.layer_mut(head).expect("head exists").size = to;
}

impl Replica {
    fn find_snapshot(&self, name: &str) -> Result<&LayerMeta> {
        self.meta
            .snapshot(name)
            .ok_or_else(|| ReplicaError::NoSuchSnapshot(name.to_string()))
    }

    /// Takes a snapshot: the head becomes read-only layer `name` and a new empty head
    /// goes on top. Returns the new snapshot's id.
    pub fn snapshot(&mut self, name: &str, labels: &BTreeMap<String, String>) -> Result<u64> {
        validate_name(name)?;
        for (k, v) in labels {
            validate_label(k, v)?;
        }
        if self.meta.snapshot(name).is_some() {
            return Err(ReplicaError::SnapshotExists(name.to_string()));
        }
        if self.meta.layers.len() >= MAX_CHAIN_LAYERS {
            return Err(ReplicaError::ChainFull(MAX_CHAIN_LAYERS));
        }
        // The frozen layer must hold everything acknowledged so far, durably.
        self.quiesce()?;
        self.flush()?;
        let old_head = self.meta.head;
        let new_head = self.meta.next_id;
        create_layer_file(&layer_path(&self.dir, new_head), self.meta.size)?;
        meta::sync_dir(&self.dir)?;
        crash::point("snapshot:new-head-created");

        let mut m = self.meta.clone();
        let h = m.layer_mut(old_head).expect("head exists");
        h.name = Some(name.to_string());
        h.created = Some(now());
        h.labels = labels.clone();
        m.layers.push(LayerMeta {
            id: new_head,
            parent: Some(old_head),
            size: m.size,
            name: None,
            created: None,
            labels: BTreeMap::new(),
            removed: false,
        });
        m.head = new_head;
        m.next_id += 1;
        m.store(&self.dir)?;
        crash::point("snapshot:committed");
        self.meta = m;
        self.switch_head_after_snapshot()?;
        Ok(old_head)
    }

    /// After a snapshot: the old head stays in the chain read-only, with the same
    /// position, so the index is unchanged; the new head goes on top.
    fn switch_head_after_snapshot(&mut self) -> Result<()> {
        let ids = self.meta.chain();
        let old = self.chain.pop().expect("chain has a head");
        self.chain
            .push(crate::layer::LayerFile::new(old.id, old.path, old.size, false));
        let head = *ids.last().expect("chain has a head");
        self.chain.push(crate::layer::LayerFile::new(
            head,
            layer_path(&self.dir, head),
            self.meta.size,
            true,
        ));
        let (log, _) = zeros::ZeroLog::open(zeros_path(&self.dir, head), self.meta.size)?;
        self.zero_log = log;
        Ok(())
    }

    /// Marks snapshot `name` removed. Its data stays, and reads are unchanged, until
    /// [`Replica::purge`] folds it away.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        let id = self.find_snapshot(name)?.id;
        let mut m = self.meta.clone();
        m.layer_mut(id).expect("found above").removed = true;
        m.store(&self.dir)?;
        self.meta = m;
        Ok(())
    }

    /// Folds every removed snapshot away: a removed snapshot with one child is merged
    /// into that child (the child's data wins), one with no child is dropped, one with
    /// several children (after a revert) is kept until all but one are gone.
    pub fn purge(&mut self) -> Result<PurgeReport> {
        self.quiesce()?;
        let mut report = PurgeReport::default();
        let mut chain_changed = false;
        loop {
            let children = self.meta.children_by_parent();
            let candidate = self
                .meta
                .layers
                .iter()
                .filter(|l| l.removed && children.get(&l.id).map_or(0, Vec::len) <= 1)
                .map(|l| (l.id, children.get(&l.id).and_then(|c| c.first().copied())))
                .next();
            let Some((id, child)) = candidate else { break };
            let name = meta::display_name(self.meta.layer(id).expect("candidate exists"));
            let in_chain = self.chain.iter().any(|l| l.id == id);
            match child {
                Some(child) => self.fold_into_child(id, child)?,
                None => self.drop_leaf(id)?,
            }
            chain_changed |= in_chain;
            report.purged.push(name);
        }
        for l in self.meta.layers.iter().filter(|l| l.removed) {
            report.kept.push((
                meta::display_name(l),
                format!(
                    "it is the parent of {} snapshots or heads; delete all but one of them first",
                    self.meta.children(l.id).len()
                ),
            ));
        }
        if chain_changed {
            self.load_chain()?;
        }
        Ok(report)
    }

    fn drop_leaf(&mut self, id: u64) -> Result<()> {
        let mut m = self.meta.clone();
        m.layers.retain(|l| l.id != id);
        m.store(&self.dir)?;
        crash::point("purge:committed");
        self.meta = m;
        unlink_if_present(&layer_path(&self.dir, id))?;
        unlink_if_present(&zeros_path(&self.dir, id))?;
        meta::sync_dir(&self.dir)
    }

    /// Copies what `parent` holds and `child` does not into `child`, then drops
    /// `parent`. Every step before the commit leaves reads unchanged: the copied
    /// blocks held the same bytes one layer down.
    fn fold_into_child(&mut self, parent: u64, child: u64) -> Result<()> {
        let psize = self.meta.layer(parent).expect("exists").size;
        let csize = self.meta.layer(child).expect("exists").size;
        let ppath = layer_path(&self.dir, parent);
        let cpath = layer_path(&self.dir, child);
        let child_owns = layer_ownership(&self.dir, child, csize)?;
        let pfile = File::open(&ppath).map_err(|e| ReplicaError::io("open", &ppath, e))?;
        let pdata = data_extents(&pfile, &ppath, psize)?;
        let pzeros = zeros::load(&zeros_path(&self.dir, parent), psize)?;

        let cfile = OpenOptions::new()
            .write(true)
            .open(&cpath)
            .map_err(|e| ReplicaError::io("open", &cpath, e))?;
        for e in subtract(&pdata, &child_owns) {
            copy_range(&pfile, &cfile, e, &ppath, &cpath)?;
            crash::point("purge:copying");
        }
        cfile
            .sync_all()
            .map_err(|e| ReplicaError::io("fsync", &cpath, e))?;

        let new_zeros = subtract(&subtract(&pzeros, &pdata), &child_owns);
        if !new_zeros.is_empty() {
            let mut all = zeros::load(&zeros_path(&self.dir, child), csize)?;
            all.extend(new_zeros);
            let name = zeros_path(&self.dir, child);
            let fname = name
                .file_name()
                .expect("has a name")
                .to_string_lossy()
                .into_owned();
            zeros::rewrite(&self.dir, &fname, &merge(all))?;
        }
        crash::point("purge:copied");

        let mut m = self.meta.clone();
        let grand = m.layer(parent).expect("exists").parent;
        m.layer_mut(child).expect("exists").parent = grand;
        m.layers.retain(|l| l.id != parent);
        m.store(&self.dir)?;
        crash::point("purge:committed");
        self.meta = m;
        unlink_if_present(&ppath)?;
        unlink_if_present(&zeros_path(&self.dir, parent))?;
        meta::sync_dir(&self.dir)?;
        if child == self.meta.head {
            // The head's zero log may have been replaced by rename: reopen it.
            let (log, _) = zeros::ZeroLog::open(zeros_path(&self.dir, child), self.meta.size)?;
            self.zero_log = log;
        }
        Ok(())
    }

    /// Drops the head and puts a new empty head over snapshot `name`. Snapshots newer
    /// than `name` are kept (they form a branch no longer read through).
    pub fn revert(&mut self, name: &str) -> Result<()> {
        let target = self.find_snapshot(name)?;
        if target.removed {
            return Err(ReplicaError::SnapshotRemoved(name.to_string()));
        }
        let target = target.id;
        self.quiesce()?;
        let old_head = self.meta.head;
        let new_head = self.meta.next_id;
        create_layer_file(&layer_path(&self.dir, new_head), self.meta.size)?;
        meta::sync_dir(&self.dir)?;
        crash::point("revert:new-head-created");

        let mut m = self.meta.clone();
        m.layers.retain(|l| l.id != old_head);
        m.layers.push(LayerMeta {
            id: new_head,
            parent: Some(target),
            size: m.size,
            name: None,
            created: None,
            labels: BTreeMap::new(),
            removed: false,
        });
        m.head = new_head;
        m.next_id += 1;
        m.store(&self.dir)?;
        crash::point("revert:committed");
        self.meta = m;
        self.chain.clear(); // close the old head's descriptors before removing it
        unlink_if_present(&layer_path(&self.dir, old_head))?;
        unlink_if_present(&zeros_path(&self.dir, old_head))?;
        meta::sync_dir(&self.dir)?;
        self.load_chain()
    }

    /// Grows the volume to `new_size` bytes; the new range reads as zeros.
    pub fn expand(&mut self, new_size: u64) -> Result<()> {
        check_size(new_size).map_err(|reason| ReplicaError::InvalidSize {
            size: new_size,
            reason: reason.into(),
        })?;
        if new_size < self.meta.size {
            return Err(ReplicaError::InvalidSize {
                size: new_size,
                reason: format!(
                    "smaller than the current {} bytes; shrinking is not supported",
                    self.meta.size
                ),
            });
        }
        if new_size == self.meta.size {
            return Ok(());
        }
        self.quiesce()?;
        let mut m = self.meta.clone();
        m.expanding_to = Some(new_size);
        m.store(&self.dir)?;
        crash::point("expand:intent-recorded");
        let head = self.head();
        let f = head.buffered()?;
        f.set_len(new_size)
            .map_err(|e| ReplicaError::io("truncate", &head.path, e))?;
        f.sync_all()
            .map_err(|e| ReplicaError::io("fsync", &head.path, e))?;
        crash::point("expand:head-grown");
        commit_expansion(&mut m, new_size);
        m.store(&self.dir)?;
        self.meta = m;
        let last = self.chain.len() - 1;
        self.chain[last].size = new_size;
        self.index.grow(new_size);
        self.intent.resize(new_size)
    }

    /// Size, chain and space used.
    pub fn info(&self) -> Result<ReplicaInfo> {
        let chain = self.meta.chain();
        let in_chain: HashSet<u64> = chain.iter().copied().collect();
        let mut order: Vec<u64> = chain.clone();
        let mut rest: Vec<u64> = self
            .meta
            .layers
            .iter()
            .map(|l| l.id)
            .filter(|id| !in_chain.contains(id))
            .collect();
        rest.sort_unstable();
        order.extend(rest);
        let mut layers = Vec::with_capacity(order.len());
        let mut used_total = 0;
        for id in order {
            let l = self.meta.layer(id).expect("ids come from the metadata");
            let path = layer_path(&self.dir, id);
            let used = std::fs::metadata(&path)
                .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
                .map_err(|e| ReplicaError::io("stat", &path, e))?;
            used_total += used;
            layers.push(LayerInfo {
                id,
                name: l.name.clone(),
                parent: l.parent.and_then(|p| self.meta.layer(p)).map(meta::display_name),
                created: l.created,
                labels: l.labels.clone(),
                removed: l.removed,
                in_chain: in_chain.contains(&id),
                size: l.size,
                used_bytes: used,
            });
        }
        Ok(ReplicaInfo {
            size: self.meta.size,
            sector_size: self.meta.sector_size,
            chain_length: chain.len(),
            layers,
            used_bytes: used_total,
            index_bytes: self.index.heap_bytes(),
        })
    }

    /// Resolves a snapshot name, or the head for `None`, to a layer id.
    fn layer_id(&self, name: Option<&str>) -> Result<u64> {
        match name {
            None => Ok(self.meta.head),
            Some(n) => Ok(self.find_snapshot(n)?.id),
        }
    }

    /// One layer's own data and zero extents (`None`: the head).
    pub fn layer_extents(&mut self, name: Option<&str>) -> Result<LayerExtents> {
        let id = self.layer_id(name)?;
        if id == self.meta.head {
            self.drain()?;
        }
        let size = self.meta.layer(id).expect("resolved above").size;
        let path = layer_path(&self.dir, id);
        let f = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
        let data = data_extents(&f, &path, size)?;
        let z = zeros::load(&zeros_path(&self.dir, id), size)?;
        Ok(LayerExtents {
            zeros: subtract(&z, &data),
            data,
        })
    }

    /// The ranges that may differ between snapshot `from` and layer `to` (a snapshot
    /// name, or `None` for the head): the union of the extents of every layer above
    /// `from` up to `to`. With `from = None`, every allocated range of `to`'s chain.
    pub fn changed_extents(&mut self, from: Option<&str>, to: Option<&str>) -> Result<Vec<Extent>> {
        let to_id = self.layer_id(to)?;
        let path = self.meta.ancestry(to_id);
        let start = match from {
            None => 0,
            Some(n) => {
                let from_id = self.find_snapshot(n)?.id;
                let pos = path.iter().position(|&id| id == from_id).ok_or_else(|| {
                    ReplicaError::InvalidOperation(format!(
                        "snapshot {n:?} is not an ancestor of {}",
                        to.unwrap_or("the head")
                    ))
                })?;
                pos + 1
            }
        };
        if to_id == self.meta.head {
            self.drain()?;
        }
        let mut all = Vec::new();
        for &id in &path[start..] {
            let size = self.meta.layer(id).expect("in the metadata").size;
            all.extend(layer_ownership(&self.dir, id, size)?);
        }
        Ok(merge(all))
    }

    /// Every allocated range of the chain ending at `of` (`None`: the head).
    pub fn allocated_extents(&mut self, of: Option<&str>) -> Result<Vec<Extent>> {
        self.changed_extents(None, of)
    }
}

/// Copies one extent between layer files in the kernel.
fn copy_range(src: &File, dst: &File, e: Extent, spath: &Path, dpath: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let mut off_in = e.offset as i64;
    let mut off_out = e.offset as i64;
    let mut left = e.len as usize;
    while left > 0 {
        // SAFETY: both descriptors are open files we own; the offsets are plain integers
        // the kernel reads and advances.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            return Err(ReplicaError::io(
                "copy",
                format!("{} -> {}", spath.display(), dpath.display()),
                err,
            ));
        }
        if n == 0 {
            return Err(ReplicaError::io(
                "copy",
                spath,
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source ended early"),
            ));
        }
        left -= n as usize;
    }
    Ok(())
}
