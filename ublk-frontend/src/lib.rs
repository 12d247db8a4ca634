//! # horn-ublk: a Horn volume as `/dev/ublkbN`
//!
//! The Linux ublk driver hands block I/O to a user-space server through io_uring
//! commands, one ring per hardware queue. Horn serves each ublk queue with one thread
//! whose ring carries both the queue's block commands and that queue's replica
//! connections ([`horn_engine::EngineQueue`]): a block command becomes data-wire sends
//! on the same ring, and the replicas' replies complete the command, with no thread hop
//! and no copy between the kernel's buffer and the socket beyond the one ublk makes.
//!
//! - [`device`]: creating, serving, listing and deleting devices;
//! - [`queue`]: one queue's loop, bridging ublk commands and the engine queue.
//!
//! Dependency note: `libublk` (listed in the brief) speaks the ublk control and I/O
//! protocols; its `-sys` crate runs bindgen, so building needs `libclang-dev`
//! (installed by `scripts/install-deps`).

#![warn(missing_docs)]

pub mod device;
pub mod queue;

pub use device::{delete, list, serve, DeviceInfo, UblkOptions};

/// How a command's data moves between the kernel and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// User copy where the driver offers it (`UBLK_F_USER_COPY`, kernel 6.5+), buffer
    /// copy otherwise.
    #[default]
    Auto,
    /// The driver copies each command's data into (writes) or out of (reads) a buffer
    /// the server registered for its tag, before handing the command over or as it
    /// completes it.
    Buffer,
    /// The server copies the data itself, with reads and writes of `/dev/ublkcN` at
    /// the command's position, on the queue's ring; no buffer is pinned per tag in the
    /// driver. Refused where the driver does not offer it.
    User,
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyMode::Auto => "auto",
            CopyMode::Buffer => "buffer",
            CopyMode::User => "user",
        })
    }
}

impl std::str::FromStr for CopyMode {
    type Err = UblkError;
    fn from_str(s: &str) -> Result<CopyMode> {
        match s {
            "auto" => Ok(CopyMode::Auto),
            "buffer" => Ok(CopyMode::Buffer),
            "user" => Ok(CopyMode::User),
            other => Err(UblkError::BadOptions(format!(
                "copy mode {other:?}: expected auto, buffer or user"
            ))),
        }
    }
}

/// Why a ublk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// The kernel has no ublk driver loaded.
    #[error("the kernel has no ublk_drv (no /dev/ublk-control): modprobe ublk_drv, kernel >= 6.1 needed")]
    NoDriver,
    /// ublk devices need root.
    #[error("ublk devices need root (CAP_SYS_ADMIN); run as root")]
    NotRoot,
    /// Bad options.
    #[error("{0}")]
    BadOptions(String),
    /// No such device.
    #[error("no ublk device {0}")]
    NoDevice(u32),
    /// The device is in use.
    #[error("ublk device {0} is busy: {1}")]
    Busy(u32, String),
    /// libublk or the driver refused.
    #[error("{what}: {source}")]
    Driver {
        /// What was being done.
        what: String,
        /// libublk's error.
        source: libublk::UblkError,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] horn_engine::VolumeError),
}

/// Result alias for this crate.
pub type Result<T, E = UblkError> = std::result::Result<T, E>;

/// Checks that ublk can be used here: the driver is loaded and we are root.
pub fn check_available() -> Result<()> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(UblkError::NoDriver);
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(UblkError::NotRoot);
    }
    Ok(())
}
