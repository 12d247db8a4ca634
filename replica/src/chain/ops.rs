//! Operations on the snapshot chain: snapshot, delete, purge, revert, expand, and
//! installing the layers a rebuild synced.
//!
//! Each operation follows one pattern so that a crash at any point leaves the chain
//! either as it was or as it would be after the operation:
//! 1. create whatever new files are needed; they are not referenced yet, so a crash
//!    leaves only orphans, which open deletes;
//! 2. (purge only) copy data into the surviving layer, which changes no read;
//! 3. commit by replacing `volume.json` atomically: this is the single switch;
//! 4. delete the files the new metadata no longer references (orphans if interrupted).
//!
//! An operation that changes which file backs which block must not race I/O: the
//! caller (`Replica`) settles the ring before it calls in, after the operation's own
//! checks (`check_*`), so that a refused operation waits for nothing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::open::{commit_expansion, create_layer_file, layer_ownership, unlink_if_present};
use super::SnapshotChain;
use crate::crash;
use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, merge, subtract, Extent};
use crate::layer::LayerFile;
use crate::meta::{
    self, check_size, layer_path, validate_label, validate_name, zeros_path, LayerMeta, VolumeMeta,
    BLOCK_SIZE, MAX_CHAIN_LAYERS,
};
use crate::sync_plan::{link_layer, SyncPlan};
use crate::zeros;

/// What a purge did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeReport {
    /// Snapshots folded away or dropped.
    pub purged: Vec<String>,
    /// Deleted snapshots kept, and why.
    pub kept: Vec<(String, String)>,
}

/// Makes `id` (the next free id) the head of `m`: an empty layer over `parent`.
fn put_new_head(m: &mut VolumeMeta, id: u64, parent: u64) {
    debug_assert_eq!(id, m.next_id, "a new head takes the next free id");
    m.layers.push(LayerMeta {
        id,
        parent: Some(parent),
        size: m.size,
        name: None,
        created: None,
        labels: BTreeMap::new(),
        removed: false,
    });
    m.head = id;
    m.next_id += 1;
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SnapshotChain {
    /// Refuses a snapshot named `name` with `labels` that [`SnapshotChain::snapshot`]
    /// could not take.
    pub(crate) fn check_snapshot(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
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
        Ok(())
    }

    /// Takes a snapshot: the head becomes read-only layer `name` and a new empty head
    /// goes on top. Returns the new snapshot's id. The caller has checked it
    /// ([`SnapshotChain::check_snapshot`]), drained the ring and flushed the head: the
    /// frozen layer must hold everything acknowledged so far, durably.
    pub(crate) fn snapshot(&mut self, name: &str, labels: &BTreeMap<String, String>) -> Result<u64> {
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
        put_new_head(&mut m, new_head, old_head);
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
        let old = self.layers.pop().expect("chain has a head");
        self.layers
            .push(LayerFile::new(old.id, old.path, old.size, false));
        let head = *ids.last().expect("chain has a head");
        self.layers.push(LayerFile::new(
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
    /// [`SnapshotChain::purge`] folds it away.
    pub(crate) fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        let id = self.find_snapshot(name)?.id;
        let mut m = self.meta.clone();
        m.layer_mut(id).expect("found above").removed = true;
        m.store(&self.dir)?;
        self.meta = m;
        Ok(())
    }

    /// Folds every removed snapshot away: a removed snapshot with one child is merged
    /// into that child (the child's data wins), one with no child is dropped, one with
    /// several children (after a revert) is kept until all but one are gone. The
    /// caller has drained the ring.
    pub(crate) fn purge(&mut self) -> Result<PurgeReport> {
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
            let in_chain = self.layers.iter().any(|l| l.id == id);
            match child {
                Some(head) if head == self.meta.head && self.head_is_cheaper_to_fold(id)? => {
                    self.fold_head_into_parent(id, head)?
                }
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
            self.reload()?;
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
            self.rewrite_zeros(child, all)?;
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

    /// Does the head hold fewer bytes than [`SnapshotChain::fold_into_child`] would
    /// copy out of its removed parent `parent`? Then the head goes down into the
    /// parent instead: after a rebuild, say, the parent holds the whole volume and the
    /// head only the writes since. Only when the parent has the volume's size (no
    /// expansion since it was taken): the parent's file then needs no growing.
    fn head_is_cheaper_to_fold(&self, parent: u64) -> Result<bool> {
        let head = self.meta.head;
        let size = self.meta.size;
        if self.meta.layer(parent).expect("exists").size != size {
            return Ok(false);
        }
        let bytes = |v: &[Extent]| v.iter().map(|e| e.len).sum::<u64>();
        let path = layer_path(&self.dir, head);
        let hfile = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
        let head_data = bytes(&data_extents(&hfile, &path, size)?);
        let path = layer_path(&self.dir, parent);
        let pfile = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
        let pdata = data_extents(&pfile, &path, size)?;
        let into_child = bytes(&subtract(&pdata, &layer_ownership(&self.dir, head, size)?));
        Ok(head_data < into_child)
    }

    /// Copies what the head holds (data and zero extents) into its removed parent
    /// `parent`, which then becomes the head; the old head is dropped. Every step
    /// before the commit leaves reads unchanged: the parent changes only where the
    /// head shadows it.
    fn fold_head_into_parent(&mut self, parent: u64, head: u64) -> Result<()> {
        let size = self.meta.size;
        let ppath = layer_path(&self.dir, parent);
        let hpath = layer_path(&self.dir, head);
        let hfile = File::open(&hpath).map_err(|e| ReplicaError::io("open", &hpath, e))?;
        let hdata = data_extents(&hfile, &hpath, size)?;
        let hzeros = subtract(&zeros::load(&zeros_path(&self.dir, head), size)?, &hdata);
        let pfile = OpenOptions::new()
            .write(true)
            .open(&ppath)
            .map_err(|e| ReplicaError::io("open", &ppath, e))?;
        for e in &hdata {
            copy_range(&hfile, &pfile, *e, &hpath, &ppath)?;
            crash::point("purge:copying");
        }
        // Where the head reads zeros, so does the new head: no data under them.
        for e in &hzeros {
            crate::sync_plan::punch(&pfile, &ppath, e.offset / BLOCK_SIZE, e.len / BLOCK_SIZE)?;
        }
        pfile
            .sync_all()
            .map_err(|e| ReplicaError::io("fsync", &ppath, e))?;
        let pzeros = zeros::load(&zeros_path(&self.dir, parent), size)?;
        let mut all = subtract(&pzeros, &hdata);
        all.extend(hzeros);
        self.rewrite_zeros(parent, all)?;
        crash::point("purge:copied");

        let mut m = self.meta.clone();
        m.layers.retain(|l| l.id != head);
        let p = m.layer_mut(parent).expect("exists");
        p.name = None;
        p.created = None;
        p.labels.clear();
        p.removed = false;
        m.head = parent;
        m.store(&self.dir)?;
        crash::point("purge:committed");
        self.meta = m;
        self.layers.clear(); // close the old head's descriptors before removing it
        unlink_if_present(&hpath)?;
        unlink_if_present(&zeros_path(&self.dir, head))?;
        meta::sync_dir(&self.dir)?;
        self.reload()
    }

    /// Replaces layer `id`'s zero-extent log with `extents` (merged), atomically.
    fn rewrite_zeros(&self, id: u64, extents: Vec<Extent>) -> Result<()> {
        let path = zeros_path(&self.dir, id);
        let name = path
            .file_name()
            .expect("has a name")
            .to_string_lossy()
            .into_owned();
        zeros::rewrite(&self.dir, &name, &merge(extents))
    }

    /// The id of snapshot `name`, which a revert may go back to.
    pub(crate) fn revert_target(&self, name: &str) -> Result<u64> {
        let target = self.find_snapshot(name)?;
        if target.removed {
            return Err(ReplicaError::SnapshotRemoved(name.to_string()));
        }
        Ok(target.id)
    }

    /// Drops the head and puts a new empty head over snapshot `target` (from
    /// [`SnapshotChain::revert_target`]). Snapshots newer than it are kept (they form
    /// a branch no longer read through). The caller has drained the ring.
    pub(crate) fn revert(&mut self, target: u64) -> Result<()> {
        let old_head = self.meta.head;
        let new_head = self.meta.next_id;
        create_layer_file(&layer_path(&self.dir, new_head), self.meta.size)?;
        meta::sync_dir(&self.dir)?;
        crash::point("revert:new-head-created");

        let mut m = self.meta.clone();
        m.layers.retain(|l| l.id != old_head);
        put_new_head(&mut m, new_head, target);
        m.store(&self.dir)?;
        crash::point("revert:committed");
        self.meta = m;
        self.layers.clear(); // close the old head's descriptors before removing it
        unlink_if_present(&layer_path(&self.dir, old_head))?;
        unlink_if_present(&zeros_path(&self.dir, old_head))?;
        meta::sync_dir(&self.dir)?;
        self.reload()
    }

    /// Refuses a size the volume cannot grow to; the size it has already passes.
    pub(crate) fn check_expand(&self, new_size: u64) -> Result<()> {
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
        Ok(())
    }

    /// Grows the volume to `new_size` bytes (checked by
    /// [`SnapshotChain::check_expand`], larger than now); the new range reads as
    /// zeros. The caller has drained the ring.
    pub(crate) fn expand(&mut self, new_size: u64) -> Result<()> {
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
        let last = self.layers.len() - 1;
        self.layers[last].size = new_size;
        self.index.grow(new_size);
        Ok(())
    }

    /// Puts the layers a rebuild synced (`plan`, their files written) under the head,
    /// drops the layers the plan leaves out, and returns the suspect blocks (see
    /// [`crate::sync`]) for the engine to copy whole. The caller has drained the ring.
    pub(crate) fn install(&mut self, plan: &SyncPlan) -> Result<Vec<u64>> {
        let old_head = self.meta.head;
        let mut m = self.meta.clone();
        let mut head = m.layer(old_head).cloned().expect("the head is in the metadata");
        head.id = plan.head;
        head.parent = plan.head_parent;
        let mut layers: Vec<LayerMeta> = plan.layers.iter().map(|(_, l)| l.clone()).collect();
        layers.push(head);
        layers.sort_by_key(|l| l.id);
        m.layers = layers;
        m.head = plan.head;
        m.next_id = m.next_id.max(plan.next_id);
        m.validate().map_err(|reason| ReplicaError::CorruptMetadata {
            path: self.dir.join(meta::META_FILE),
            reason: format!("the synced chain would be invalid: {reason}"),
        })?;
        // The head keeps its files under a second name until the new metadata names
        // them: a crash on the way leaves one valid chain or the other.
        link_layer(&self.dir, old_head, plan.head)?;
        meta::sync_dir(&self.dir)?;
        m.store(&self.dir)?;
        self.meta = m;
        self.reload()?;
        for id in &plan.obsolete {
            for path in [layer_path(&self.dir, *id), zeros_path(&self.dir, *id)] {
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a layer the rebuild replaced");
                    }
                }
            }
        }
        Ok(std::mem::take(&mut self.suspect).into_iter().collect())
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
