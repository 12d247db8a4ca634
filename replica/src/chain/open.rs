//! Creating a replica directory, recovering what a crash interrupted, and loading the
//! layer files into the extent index.
//!
//! Open runs in two steps so that the replica's other files are read between them, in
//! the order they always were: [`recover`] finishes or discards what a crash left (an
//! interrupted expansion, orphan files) and checks every layer file the metadata
//! names; [`SnapshotChain::load`] then builds the index from the files (SEEK_DATA and
//! the zero logs).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{CacheMode, SnapshotChain};
use crate::error::{ReplicaError, Result};
use crate::extent::{data_extents, Extent};
use crate::index::BlockIndex;
use crate::layer::LayerFile;
use crate::meta::{self, layer_path, zeros_path, VolumeMeta, BLOCK_SIZE};
use crate::zeros::{self, ZeroLog};
use horn_uring::IoBuf;

/// Name of the lock file that keeps two processes from opening one replica.
const LOCK_FILE: &str = "volume.lock";
/// How long `open` waits for a replica's lock before calling it in use.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Takes the replica directory's lock, held for as long as the returned file is open.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ReplicaError::io("open", &path, e))?;
    // A lock is refused briefly while another thread of this process is spawning a
    // child: between fork and exec the child holds a copy of every descriptor, and
    // with it the flock of a replica closed meanwhile. Such a copy goes away within
    // milliseconds; a replica really held by another opener stays locked.
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(ReplicaError::io("lock", &path, err));
        }
        if std::time::Instant::now() >= deadline {
            return Err(ReplicaError::Locked {
                path: dir.to_path_buf(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(f)
}

/// Refuses filesystems whose allocation unit is larger than the index's 4 KiB block:
/// SEEK_DATA would report whole large blocks as written and hide older layers' data.
fn check_filesystem(dir: &Path) -> Result<()> {
    let st = nix::sys::statfs::statfs(dir)
        .map_err(|e| ReplicaError::io("statfs", dir, std::io::Error::from(e)))?;
    let bsize = st.block_size() as u64;
    if bsize > BLOCK_SIZE {
        return Err(ReplicaError::UnsuitableFilesystem {
            path: dir.to_path_buf(),
            reason: format!("its block size is {bsize} bytes; Horn needs 4096 or less"),
        });
    }
    Ok(())
}

/// Creates a sparse file of `size` bytes and makes it durable.
pub(super) fn create_layer_file(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ReplicaError::io("create", path, e))?;
    f.set_len(size)
        .map_err(|e| ReplicaError::io("truncate", path, e))?;
    f.sync_all().map_err(|e| ReplicaError::io("fsync", path, e))
}

pub(super) fn unlink_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ReplicaError::io("remove", path, e)),
    }
}

/// What [`recover`] leaves for [`SnapshotChain::load`].
pub(crate) struct Recovered {
    /// The metadata, with any interrupted expansion finished.
    pub meta: VolumeMeta,
    zero_log: ZeroLog,
}

/// The first step of open, under the directory's lock: checks the filesystem, loads
/// the metadata, finishes or discards whatever a crash interrupted, checks that every
/// layer file is there with its size, and opens the head's zero log (dropping a torn
/// tail).
pub(crate) fn recover(dir: &Path) -> Result<Recovered> {
    check_filesystem(dir)?;
    let mut m = VolumeMeta::load(dir)?;
    finish_interrupted(dir, &mut m)?;
    check_layer_files(dir, &m)?;
    let (zero_log, _) = ZeroLog::open(zeros_path(dir, m.head), m.size)?;
    Ok(Recovered { meta: m, zero_log })
}

impl SnapshotChain {
    /// Creates a replica directory of `size` bytes in `dir` (created if absent, must be
    /// empty): its metadata and an empty head.
    pub(crate) fn create(dir: &Path, size: u64, sector_size: u32) -> Result<()> {
        if sector_size != 512 && sector_size != 4096 {
            return Err(ReplicaError::InvalidSectorSize(sector_size));
        }
        meta::check_size(size).map_err(|reason| ReplicaError::InvalidSize {
            size,
            reason: reason.into(),
        })?;
        std::fs::create_dir_all(dir).map_err(|e| ReplicaError::io("create directory", dir, e))?;
        let mut entries = std::fs::read_dir(dir).map_err(|e| ReplicaError::io("list", dir, e))?;
        if entries.next().is_some() {
            return Err(ReplicaError::DirectoryNotEmpty {
                path: dir.to_path_buf(),
            });
        }
        check_filesystem(dir)?;
        let m = VolumeMeta::new(size, sector_size);
        create_layer_file(&layer_path(dir, m.head), size)?;
        m.store(dir)
    }

    /// The second step of open: the chain of a recovered directory, its index built
    /// from the layer files.
    pub(crate) fn load(dir: PathBuf, recovered: Recovered) -> Result<SnapshotChain> {
        let Recovered { meta, zero_log } = recovered;
        let mut chain = SnapshotChain {
            index: BlockIndex::new(meta.size),
            layers: Vec::new(),
            zero_log,
            suspect: Default::default(),
            dio_align: BLOCK_SIZE,
            cache: CacheMode::Direct,
            dir,
            meta,
        };
        chain.reload()?;
        chain.dio_align = probe_dio_align(chain.head())?;
        Ok(chain)
    }

    /// (Re)builds the active chain's layer list, the extent index and the head's zero
    /// log from the files, after the metadata changed which layers are active.
    pub(super) fn reload(&mut self) -> Result<()> {
        let ids = self.meta.chain();
        if ids.len() > crate::index::MAX_VALUE as usize - 1 {
            return Err(ReplicaError::ChainFull(ids.len()));
        }
        raise_fd_limit(ids.len() as u64 * 2 + 256);
        self.layers = ids
            .iter()
            .map(|&id| {
                let l = self.meta.layer(id).expect("chain ids come from the metadata");
                LayerFile::new(id, layer_path(&self.dir, id), l.size, id == self.meta.head)
            })
            .collect();
        self.index = BlockIndex::new(self.meta.size);
        for (pos, layer) in self.layers.iter().enumerate() {
            let value = (pos + 1) as u16;
            for e in layer_ownership(&self.dir, layer.id, layer.size)? {
                self.index
                    .set_range(e.offset / BLOCK_SIZE, e.len / BLOCK_SIZE, value);
            }
        }
        let (log, _) = ZeroLog::open(zeros_path(&self.dir, self.meta.head), self.meta.size)?;
        self.zero_log = log;
        Ok(())
    }
}

/// Completes an interrupted expansion and removes files no metadata references.
fn finish_interrupted(dir: &Path, m: &mut VolumeMeta) -> Result<()> {
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

/// The metadata of an expansion to `to` bytes, committed.
pub(super) fn commit_expansion(m: &mut VolumeMeta, to: u64) {
    m.size = to;
    m.expanding_to = None;
    let head = m.head;
    m.layer_mut(head).expect("head exists").size = to;
}

/// The blocks a layer holds: its file's data extents and its zero-log extents.
pub(super) fn layer_ownership(dir: &Path, id: u64, size: u64) -> Result<Vec<Extent>> {
    let path = layer_path(dir, id);
    let f = File::open(&path).map_err(|e| ReplicaError::io("open", &path, e))?;
    let mut v = data_extents(&f, &path, size)?;
    v.extend(zeros::load(&zeros_path(dir, id), size)?);
    Ok(crate::extent::merge(v))
}

/// Every layer file the metadata names exists and has the recorded size.
fn check_layer_files(dir: &Path, m: &VolumeMeta) -> Result<()> {
    for l in &m.layers {
        let path = layer_path(dir, l.id);
        let md = match std::fs::metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ReplicaError::MissingLayer {
                    path,
                    layer: meta::display_name(l),
                })
            }
            Err(e) => return Err(ReplicaError::io("stat", &path, e)),
        };
        if md.len() != l.size {
            return Err(ReplicaError::LayerSizeMismatch {
                path,
                expected: l.size,
                actual: md.len(),
            });
        }
    }
    Ok(())
}

/// Every layer read from keeps a descriptor or two open: raise the soft limit toward
/// the hard one when a long chain needs it. Best effort: failure shows up later, as
/// an error naming the layer file that could not be opened.
fn raise_fd_limit(wanted: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < wanted {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, wanted.min(hard), hard);
        }
    }
}

/// The smallest alignment O_DIRECT accepts on the head's filesystem: 512 or 4096.
fn probe_dio_align(head: &LayerFile) -> Result<u64> {
    let Some(f) = head.direct()? else {
        return Ok(BLOCK_SIZE);
    };
    let mut buf = IoBuf::zeroed(1024);
    match f.read_at(&mut buf.as_mut_slice()[512..], 512) {
        Ok(_) => Ok(512),
        Err(_) => Ok(BLOCK_SIZE),
    }
}
