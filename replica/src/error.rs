//! The replica store's error type: every variant names what went wrong and where.

use std::io;
use std::path::PathBuf;

/// Result alias for the replica store.
pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// Everything the replica store can refuse or fail at.
///
/// Variants carry the file, offset or name a person needs to act on the error; the
/// `Display` text is meant to be shown to an operator as it is.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// An I/O system call failed on a file of the replica.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing ("read", "punch hole", ...).
        op: &'static str,
        /// The file it was doing it to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A metadata file exists but cannot be trusted (bad checksum, bad syntax, bad values).
    #[error("corrupt metadata file {path}: {reason}")]
    CorruptMetadata {
        /// The file that is corrupt.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The metadata file is missing: the directory is not a replica (or was damaged).
    #[error("missing metadata file {path}: the directory is not a Horn replica")]
    MissingMetadata {
        /// Where the metadata file should be.
        path: PathBuf,
    },

    /// A layer file named by the metadata is missing.
    #[error("layer file {path} is missing (layer {layer} of the chain)")]
    MissingLayer {
        /// The missing file.
        path: PathBuf,
        /// Which layer (snapshot name or "head").
        layer: String,
    },

    /// A layer file has a length other than the one the metadata records.
    #[error("layer file {path} has size {actual} bytes, the metadata says {expected}")]
    LayerSizeMismatch {
        /// The file.
        path: PathBuf,
        /// What the metadata records.
        expected: u64,
        /// What the file is.
        actual: u64,
    },

    /// An I/O request reaches past the end of the volume.
    #[error("I/O at offset {offset} length {len} reaches past the end of the volume ({size} bytes)")]
    OutOfRange {
        /// Start of the request in bytes.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Volume size in bytes.
        size: u64,
    },

    /// An I/O request is not aligned to the volume's sector size.
    #[error("I/O at offset {offset} length {len} is not a multiple of the sector size {sector_size}")]
    Misaligned {
        /// Start of the request in bytes.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The volume's sector size.
        sector_size: u32,
    },

    /// A create or expand asked for a size the store cannot take.
    #[error("invalid volume size {size}: {reason}")]
    InvalidSize {
        /// The size asked for, in bytes.
        size: u64,
        /// Why it is refused.
        reason: String,
    },

    /// The sector size is neither 512 nor 4096.
    #[error("invalid sector size {0}: Horn supports 512 and 4096")]
    InvalidSectorSize(u32),

    /// A snapshot name or label does not follow the naming rules.
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A snapshot of that name exists already.
    #[error("a snapshot named {0:?} exists already")]
    SnapshotExists(String),

    /// No snapshot of that name exists.
    #[error("no snapshot named {0:?}")]
    NoSuchSnapshot(String),

    /// The snapshot has been deleted (marked removed) and cannot be used.
    #[error("snapshot {0:?} has been deleted and waits for a purge")]
    SnapshotRemoved(String),

    /// The directory already holds a replica (or something else).
    #[error("{path} is not empty: refusing to create a replica over existing files")]
    DirectoryNotEmpty {
        /// The directory.
        path: PathBuf,
    },

    /// The filesystem cannot hold a replica faithfully.
    #[error("filesystem under {path} is unsuitable: {reason}")]
    UnsuitableFilesystem {
        /// The replica directory.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },

    /// Another process has the replica open.
    #[error("replica {path} is in use by another process")]
    Locked {
        /// The replica directory.
        path: PathBuf,
    },

    /// An operation that needs the head was given something else, or the reverse.
    #[error("{0}")]
    InvalidOperation(String),

    /// A generation older than the replica's was offered.
    #[error(
        "generation {given} is older than the replica's generation {current}: a newer engine has claimed it"
    )]
    StaleGeneration {
        /// The replica's generation.
        current: u64,
        /// The generation offered.
        given: u64,
    },

    /// The replica cannot take this I/O now (not claimed by the engine yet, or
    /// write-only while it is rebuilt).
    #[error("{0}")]
    Unavailable(String),

    /// The caller did not prove it holds the volume's key of a current generation.
    #[error("{0}")]
    Unauthenticated(String),

    /// A claim or a membership record the replica's membership rules refuse.
    #[error(transparent)]
    Membership(#[from] crate::membership::Refused),

    /// A request the replica refuses as it stands (with the reason).
    #[error("{0}")]
    Refused(String),

    /// The chain has as many layers as the index can address.
    #[error("the snapshot chain has reached its limit of {0} layers: delete and purge snapshots first")]
    ChainFull(usize),
}

impl ReplicaError {
    /// The data wire's status for this error: what an engine reads from it is whether
    /// the request was wrong (refused, the replica is fine), the engine stale, or the
    /// replica failing.
    pub fn wire_status(&self) -> horn_proto::wire::Status {
        use horn_proto::wire::Status;
        match self {
            ReplicaError::OutOfRange { .. } => Status::OutOfRange,
            ReplicaError::Misaligned { .. } => Status::Misaligned,
            ReplicaError::InvalidOperation(_) => Status::BadRequest,
            ReplicaError::StaleGeneration { .. } | ReplicaError::Membership(_) => Status::StaleGeneration,
            ReplicaError::Unavailable(_) => Status::Unavailable,
            ReplicaError::Unauthenticated(_) => Status::Unauthenticated,
            _ => Status::IoError,
        }
    }

    /// Wraps an `io::Error` with the operation and file it concerns.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ReplicaError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
