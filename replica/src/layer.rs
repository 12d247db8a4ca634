//! One layer's data file: a sparse file the size of the volume when it was written.
//!
//! Descriptors are opened on first use (a chain of 10,000 layers should not hold
//! 20,000 descriptors before anyone reads from it): an O_DIRECT one for aligned I/O
//! and a buffered one for the rest. The head is opened read-write, snapshots read-only.

use std::cell::OnceCell;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{ReplicaError, Result};

/// A layer file's descriptor held for I/O outside the replica's own ring (an
/// in-process engine's, see [`crate::shared`]): it stays open while held, whatever
/// happens to the chain meanwhile.
#[derive(Debug, Clone)]
pub struct HeldFile {
    /// The descriptor.
    pub file: Arc<File>,
    /// It is the O_DIRECT one: the I/O goes around the page cache.
    pub direct: bool,
}

/// A layer file and its lazily opened descriptors.
#[derive(Debug)]
pub struct LayerFile {
    /// Layer id from the metadata.
    pub id: u64,
    /// Path of the data file.
    pub path: PathBuf,
    /// Length of the file in bytes.
    pub size: u64,
    writable: bool,
    /// Shared so that I/O in flight outside the replica's own ring (an in-process
    /// replica's, see [`crate::shared`]) keeps its descriptor open.
    direct: OnceCell<Option<Arc<File>>>,
    buffered: OnceCell<Arc<File>>,
}

impl LayerFile {
    /// A layer whose file is opened on first use.
    pub fn new(id: u64, path: PathBuf, size: u64, writable: bool) -> Self {
        LayerFile {
            id,
            path,
            size,
            writable,
            direct: OnceCell::new(),
            buffered: OnceCell::new(),
        }
    }

    fn open(&self, direct: bool) -> std::io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(self.writable);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&self.path)
    }

    /// The same layer with no descriptor open yet.
    pub fn closed_copy(&self) -> LayerFile {
        LayerFile::new(self.id, self.path.clone(), self.size, self.writable)
    }

    /// The buffered descriptor (any alignment).
    pub fn buffered(&self) -> Result<&File> {
        self.buffered_arc().map(|f| &**f)
    }

    fn buffered_arc(&self) -> Result<&Arc<File>> {
        if let Some(f) = self.buffered.get() {
            return Ok(f);
        }
        let f = self
            .open(false)
            .map_err(|e| ReplicaError::io("open", &self.path, e))?;
        Ok(self.buffered.get_or_init(|| Arc::new(f)))
    }

    /// The O_DIRECT descriptor, or `None` where the filesystem refuses O_DIRECT (tmpfs).
    pub fn direct(&self) -> Result<Option<&File>> {
        Ok(self.direct_arc()?.map(|f| &**f))
    }

    fn direct_arc(&self) -> Result<Option<&Arc<File>>> {
        if let Some(f) = self.direct.get() {
            return Ok(f.as_ref());
        }
        let f = match self.open(true) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(ReplicaError::io("open O_DIRECT", &self.path, e)),
        };
        Ok(self.direct.get_or_init(|| f).as_ref())
    }

    /// The descriptor to use for I/O with the given alignment.
    pub fn fd_for(&self, aligned: bool) -> Result<RawFd> {
        if aligned {
            if let Some(f) = self.direct()? {
                return Ok(f.as_raw_fd());
            }
        }
        Ok(self.buffered()?.as_raw_fd())
    }

    /// The descriptor for I/O with the given alignment, held (see [`HeldFile`]).
    pub fn file_for(&self, aligned: bool) -> Result<HeldFile> {
        if aligned {
            if let Some(f) = self.direct_arc()? {
                return Ok(HeldFile {
                    file: f.clone(),
                    direct: true,
                });
            }
        }
        Ok(HeldFile {
            file: self.buffered_arc()?.clone(),
            direct: false,
        })
    }

    /// Descriptors currently open.
    pub fn open_fds(&self) -> usize {
        usize::from(matches!(self.direct.get(), Some(Some(_)))) + usize::from(self.buffered.get().is_some())
    }
}
