//! What the chain reports: size, layers and space used ([`ReplicaInfo`]), one layer's
//! own extents ([`LayerExtents`]), and the ranges that may differ between layers.
//!
//! Reports on the head read its file's extents, which writes in flight change: the
//! caller drains the ring first where the head is among the layers asked about.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;

use serde::Serialize;

use super::open::layer_ownership;
use super::SnapshotChain;
use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, merge, subtract, Extent};
use crate::meta::{self, layer_path, zeros_path};
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

/// A layer's own extents: where its file holds data, and where it reads as zeros
/// over older layers (zero-log ranges the file does not also hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LayerExtents {
    /// Ranges the layer file holds data for.
    pub data: Vec<Extent>,
    /// Ranges that read as zeros in this layer whatever the layers below hold.
    pub zeros: Vec<Extent>,
}

impl SnapshotChain {
    /// Size, chain and space used.
    pub(crate) fn info(&self) -> Result<ReplicaInfo> {
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
    pub(crate) fn layer_id(&self, name: Option<&str>) -> Result<u64> {
        match name {
            None => Ok(self.meta.head),
            Some(n) => Ok(self.find_snapshot(n)?.id),
        }
    }

    /// The length of snapshot layer `id`, whose file a rebuild reads. The head is
    /// refused: it changes under I/O.
    pub(crate) fn snapshot_layer_size(&self, id: u64) -> Result<u64> {
        let l = self
            .meta
            .layer(id)
            .ok_or_else(|| ReplicaError::InvalidOperation(format!("this replica has no layer {id}")))?;
        if id == self.meta.head {
            return Err(ReplicaError::InvalidOperation(format!(
                "layer {id} is the head, which changes under I/O; only snapshot layers are synced"
            )));
        }
        Ok(l.size)
    }

    /// Layer `id`'s own data and zero extents (the caller has drained the ring if it
    /// is the head).
    pub(crate) fn layer_extents(&self, id: u64) -> Result<LayerExtents> {
        let size = self.meta.layer(id).expect("resolved by layer_id").size;
        let path = layer_path(&self.dir, id);
        let f = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
        let data = data_extents(&f, &path, size)?;
        let z = zeros::load(&zeros_path(&self.dir, id), size)?;
        Ok(LayerExtents {
            zeros: subtract(&z, &data),
            data,
        })
    }

    /// The layers whose extents may differ between snapshot `from` and layer `to` (a
    /// snapshot name, or `None` for the head): every layer above `from` up to `to`,
    /// or with `from = None` all of `to`'s chain.
    pub(crate) fn changed_layers(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<u64>> {
        let to_id = self.layer_id(to)?;
        let mut path = self.meta.ancestry(to_id);
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
        path.drain(..start);
        Ok(path)
    }

    /// The union of what `layers` hold (from [`SnapshotChain::changed_layers`]; the
    /// caller has drained the ring if the head is among them).
    pub(crate) fn ownership(&self, layers: &[u64]) -> Result<Vec<Extent>> {
        let mut all = Vec::new();
        for &id in layers {
            let size = self.meta.layer(id).expect("in the metadata").size;
            all.extend(layer_ownership(&self.dir, id, size)?);
        }
        Ok(merge(all))
    }
}
