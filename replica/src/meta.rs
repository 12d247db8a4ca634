//! The replica's metadata file, `volume.json`: the chain's shape, written atomically.
//!
//! One small file describes every layer (id, parent, size, snapshot name, labels,
//! creation time, removed flag) and which layer is the head. Every change to the chain
//! is one atomic replacement of this file (write a temporary, fsync it, rename it over,
//! fsync the directory), so a crash leaves either the old or the new chain. A trailing
//! CRC-32C line catches a file damaged after it was written. See `docs/replica-format.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ReplicaError, Result};

/// File name of the metadata file inside a replica directory.
pub const META_FILE: &str = "volume.json";
/// Value of the `format` field.
pub const FORMAT_NAME: &str = "horn-replica";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The granule of the extent index and of layer ownership: 4 KiB.
pub const BLOCK_SIZE: u64 = 4096;
/// Largest volume the index can address (64 TiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Most layers a chain may hold (the index stores chain positions in 16 bits).
pub const MAX_CHAIN_LAYERS: usize = 65_534;

/// The whole metadata file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for files this code writes.
    pub version: u32,
    /// Volume size in bytes.
    pub size: u64,
    /// Sector size in bytes: 512 or 4096.
    pub sector_size: u32,
    /// Id of the writable head layer.
    pub head: u64,
    /// Id the next new layer gets; ids are never reused.
    pub next_id: u64,
    /// Set while an expansion is under way: the size being expanded to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expanding_to: Option<u64>,
    /// Every layer on disk, head included, in increasing id order.
    pub layers: Vec<LayerMeta>,
}

/// One layer: the head or a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// Unique, never reused; names the files `layer-<id>.img` and `layer-<id>.zeros`.
    pub id: u64,
    /// The layer below this one, `None` for the root of the tree.
    pub parent: Option<u64>,
    /// Length of the layer file in bytes (the volume size when the layer was created
    /// or, for the head, last expanded).
    pub size: u64,
    /// Snapshot name; `None` for the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the snapshot was taken, seconds since the Unix epoch (`None` for the head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// User labels of the snapshot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Deleted by the user; its data stays until a purge folds it away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

impl VolumeMeta {
    /// The metadata of a new replica: one empty head layer.
    pub fn new(size: u64, sector_size: u32) -> Self {
        VolumeMeta {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            size,
            sector_size,
            head: 1,
            next_id: 2,
            expanding_to: None,
            layers: vec![LayerMeta {
                id: 1,
                parent: None,
                size,
                name: None,
                created: None,
                labels: BTreeMap::new(),
                removed: false,
            }],
        }
    }

    /// The layer with this id.
    pub fn layer(&self, id: u64) -> Option<&LayerMeta> {
        let i = self.layers.binary_search_by_key(&id, |l| l.id).ok()?;
        Some(&self.layers[i])
    }

    /// The layer with this id, mutable.
    pub fn layer_mut(&mut self, id: u64) -> Option<&mut LayerMeta> {
        let i = self.layers.binary_search_by_key(&id, |l| l.id).ok()?;
        Some(&mut self.layers[i])
    }

    /// The snapshot with this name.
    pub fn snapshot(&self, name: &str) -> Option<&LayerMeta> {
        self.layers.iter().find(|l| l.name.as_deref() == Some(name))
    }

    /// The active chain, root first, head last: the layers reads go through.
    pub fn chain(&self) -> Vec<u64> {
        self.ancestry(self.head)
    }

    /// `id` and its ancestors, root first.
    pub fn ancestry(&self, id: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            out.push(c);
            cur = self.layer(c).and_then(|l| l.parent);
        }
        out.reverse();
        out
    }

    /// The layers that name `id` as their parent.
    pub fn children(&self, id: u64) -> Vec<u64> {
        self.layers
            .iter()
            .filter(|l| l.parent == Some(id))
            .map(|l| l.id)
            .collect()
    }

    /// Every layer's children, in one pass.
    pub fn children_by_parent(&self) -> HashMap<u64, Vec<u64>> {
        let mut map: HashMap<u64, Vec<u64>> = HashMap::new();
        for l in &self.layers {
            if let Some(p) = l.parent {
                map.entry(p).or_default().push(l.id);
            }
        }
        map
    }

    /// Checks every invariant the rest of the store relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT_NAME {
            return Err(format!("format is {:?}, expected {FORMAT_NAME:?}", self.format));
        }
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.sector_size != 512 && self.sector_size != 4096 {
            return Err(format!("sector size {} is not 512 or 4096", self.sector_size));
        }
        check_size(self.size).map_err(|e| format!("size {}: {e}", self.size))?;
        if let Some(to) = self.expanding_to {
            check_size(to).map_err(|e| format!("expanding_to {to}: {e}"))?;
            if to <= self.size {
                return Err(format!("expanding_to {to} is not larger than size {}", self.size));
            }
        }
        if self.next_id > 1 << 62 {
            return Err(format!("next_id {} is implausibly large", self.next_id));
        }
        if self.layers.len() > MAX_CHAIN_LAYERS {
            return Err(format!(
                "{} layers, more than {MAX_CHAIN_LAYERS}",
                self.layers.len()
            ));
        }
        let mut names = HashSet::new();
        let mut prev = 0;
        for l in &self.layers {
            if l.id == 0 || l.id >= self.next_id {
                return Err(format!("layer id {} is outside 1..{}", l.id, self.next_id));
            }
            if l.id <= prev {
                return Err(format!("layer ids are not in increasing order at {}", l.id));
            }
            prev = l.id;
            if l.size > self.size || l.size % BLOCK_SIZE != 0 {
                return Err(format!("layer {} has size {}", l.id, l.size));
            }
            if let Some(n) = &l.name {
                validate_name(n).map_err(|e| e.to_string())?;
                if !names.insert(n.clone()) {
                    return Err(format!("snapshot name {n:?} appears twice"));
                }
            }
        }
        let by_id: HashMap<u64, &LayerMeta> = self.layers.iter().map(|l| (l.id, l)).collect();
        for l in &self.layers {
            if let Some(p) = l.parent {
                if !by_id.contains_key(&p) {
                    return Err(format!("layer {} names parent {p}, which does not exist", l.id));
                }
                // A layer is always newer than its parent; this also rules out cycles.
                if p >= l.id {
                    return Err(format!(
                        "layer {} names parent {p}, which is not older than it",
                        l.id
                    ));
                }
            }
        }
        let head = by_id
            .get(&self.head)
            .ok_or_else(|| format!("head layer {} does not exist", self.head))?;
        if head.name.is_some() || head.removed {
            return Err(format!("head layer {} is marked as a snapshot", self.head));
        }
        if head.size != self.size && self.expanding_to.is_none() {
            return Err(format!(
                "head layer {} has size {}, the volume {}",
                self.head, head.size, self.size
            ));
        }
        for l in &self.layers {
            if l.id != self.head && l.name.is_none() {
                return Err(format!("layer {} is neither the head nor a named snapshot", l.id));
            }
        }
        Ok(())
    }

    /// Reads and validates the metadata file of the replica in `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(META_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReplicaError::MissingMetadata { path })
            }
            Err(e) => return Err(ReplicaError::io("read", path, e)),
        };
        Self::parse(&text, &path)
    }

    /// Parses and validates metadata bytes; `path` names the file in errors.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |reason: String| ReplicaError::CorruptMetadata {
            path: path.to_path_buf(),
            reason,
        };
        let body = verify_checksum(text).map_err(corrupt)?;
        let meta: VolumeMeta =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("not valid metadata JSON: {e}")))?;
        meta.validate().map_err(corrupt)?;
        Ok(meta)
    }

    /// Replaces the metadata file atomically and durably.
    pub fn store(&self, dir: &Path) -> Result<()> {
        debug_assert_eq!(self.validate(), Ok(()));
        write_atomically(dir, META_FILE, &with_checksum(self))
    }
}

/// A value as one line of JSON followed by its `crc32c XXXXXXXX` line.
pub(crate) fn with_checksum(value: &impl Serialize) -> Vec<u8> {
    let mut body = serde_json::to_vec(value).expect("replica files always serialise");
    body.push(b'\n');
    let trailer = format!("crc32c {:08x}\n", crc32c::crc32c(&body));
    body.extend_from_slice(trailer.as_bytes());
    body
}

/// Checks the `crc32c XXXXXXXX` trailer line and returns the JSON body before it.
pub(crate) fn verify_checksum(text: &[u8]) -> std::result::Result<&[u8], String> {
    let trimmed = text
        .strip_suffix(b"\n")
        .ok_or("file does not end in a newline (truncated?)")?;
    let split = trimmed
        .iter()
        .rposition(|&b| b == b'\n')
        .ok_or("no checksum line (truncated?)")?;
    let (body, trailer) = trimmed.split_at(split + 1);
    let trailer = std::str::from_utf8(trailer).map_err(|_| "checksum line is not text")?;
    let hex = trailer
        .strip_prefix("crc32c ")
        .ok_or_else(|| format!("last line {trailer:?} is not a checksum line"))?;
    let want = u32::from_str_radix(hex, 16).map_err(|_| format!("bad checksum {hex:?}"))?;
    let got = crc32c::crc32c(body);
    if want != got {
        return Err(format!(
            "checksum mismatch: file says {want:08x}, contents give {got:08x}"
        ));
    }
    Ok(body)
}

/// Is `size` acceptable as a volume size?
pub fn check_size(size: u64) -> std::result::Result<(), &'static str> {
    if size == 0 {
        Err("a volume cannot be empty")
    } else if size % BLOCK_SIZE != 0 {
        Err("must be a multiple of 4096 bytes")
    } else if size > MAX_VOLUME_SIZE {
        Err("larger than the 64 TiB maximum")
    } else {
        Ok(())
    }
}

/// Snapshot names: 1 to 63 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
/// They appear in file listings and command lines, so they stay shell- and path-safe.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(ReplicaError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it starts with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Label keys follow the snapshot-name rules; values are at most 255 bytes without
/// control characters.
pub fn validate_label(key: &str, value: &str) -> Result<()> {
    validate_name(key).map_err(|_| ReplicaError::InvalidName {
        name: key.to_string(),
        reason: "label keys follow the snapshot name rules (1-63 of A-Z a-z 0-9 . _ -)",
    })?;
    if value.len() > 255 || value.chars().any(char::is_control) {
        return Err(ReplicaError::InvalidName {
            name: value.to_string(),
            reason: "label values are at most 255 bytes without control characters",
        });
    }
    Ok(())
}

/// Writes `dir/name` so that a crash leaves either the old file or the new one whole:
/// temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| ReplicaError::io("create", &tmp, e))?;
    f.write_all(contents)
        .map_err(|e| ReplicaError::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| ReplicaError::io("fsync", &tmp, e))?;
    drop(f);
    crate::crash::point("meta:before-rename");
    fs::rename(&tmp, &dst).map_err(|e| ReplicaError::io("rename", &dst, e))?;
    sync_dir(dir)
}

/// fsyncs a directory so that creations, renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ReplicaError::io("fsync directory", dir, e))
}

/// Path of a layer's data file.
pub fn layer_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("layer-{id:08}.img"))
}

/// Path of a layer's zero-extent log.
pub fn zeros_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("layer-{id:08}.zeros"))
}

/// A layer's display name: its snapshot name, or "head".
pub fn display_name(l: &LayerMeta) -> String {
    l.name.clone().unwrap_or_else(|| "head".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        for ok in ["a", "snap-1", "daily.2026-11-21", "A_b", &"x".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", "ü", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn checksum_catches_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        VolumeMeta::new(1 << 20, 512).store(dir.path()).unwrap();
        let path = dir.path().join(META_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[10] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = VolumeMeta::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("volume.json") && err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_parent_cycle_is_refused_because_parents_must_be_older() {
        let mut m = VolumeMeta::new(1 << 20, 512);
        m.layers.push(LayerMeta {
            id: 2,
            parent: Some(3),
            size: 1 << 20,
            name: Some("a".into()),
            created: Some(0),
            labels: BTreeMap::new(),
            removed: false,
        });
        m.layers.push(LayerMeta {
            id: 3,
            parent: Some(2),
            size: 1 << 20,
            name: Some("b".into()),
            created: Some(0),
            labels: BTreeMap::new(),
            removed: false,
        });
        m.next_id = 4;
        assert!(
            m.validate().unwrap_err().contains("not older"),
            "{:?}",
            m.validate()
        );
    }
}
