//! Creating, serving, listing and deleting Horn's ublk devices.

use std::sync::Arc;

use horn_engine::Engine;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};

use crate::{check_available, CopyMode, Result, UblkError};

/// How to serve a volume.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Queues (each a thread); at most the driver's limit.
    pub queues: u16,
    /// Commands in flight per queue.
    pub depth: u16,
    /// Largest I/O in bytes (a multiple of 4 KiB).
    pub max_io_bytes: u32,
    /// The device id to ask for (None: the driver picks).
    pub id: Option<u32>,
    /// Name shown by `hornctl ublk list` (the volume's).
    pub volume: String,
    /// Serve the device read-only.
    pub read_only: bool,
    /// Reattach to existing device N, whose server died, instead of making a new one
    /// (its queues, depth and I/O size are the device's own).
    pub recover: Option<u32>,
    /// How command data moves (a recovered device keeps the mode it was made with).
    pub copy: CopyMode,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            queues: std::thread::available_parallelism().map_or(1, |n| n.get().min(16) as u16),
            depth: 128,
            max_io_bytes: 1 << 20,
            id: None,
            volume: "volume".into(),
            read_only: false,
            recover: None,
            copy: CopyMode::Auto,
        }
    }
}

/// A device as `hornctl ublk list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// Device id.
    pub id: u32,
    /// Block device path.
    pub path: String,
    /// The volume served (from the device's target data; empty if not Horn's).
    pub volume: String,
    /// Driver state.
    pub state: String,
    /// Queues.
    pub queues: u16,
    /// Depth per queue.
    pub depth: u16,
    /// Serving process (0 if none).
    pub pid: i32,
    /// Driver feature flags in use.
    pub flags: u64,
    /// Those flags by name.
    pub features: Vec<&'static str>,
    /// How command data moves: "user" (copy) or "buffer".
    pub copy: &'static str,
}

/// The ublk feature flags Horn knows, by name.
const FEATURE_NAMES: &[(u32, &str)] = &[
    (sys::UBLK_F_SUPPORT_ZERO_COPY, "zero-copy"),
    (sys::UBLK_F_URING_CMD_COMP_IN_TASK, "comp-in-task"),
    (sys::UBLK_F_NEED_GET_DATA, "need-get-data"),
    (sys::UBLK_F_USER_RECOVERY, "user-recovery"),
    (sys::UBLK_F_USER_RECOVERY_REISSUE, "recovery-reissue"),
    (sys::UBLK_F_UNPRIVILEGED_DEV, "unprivileged"),
    (sys::UBLK_F_CMD_IOCTL_ENCODE, "ioctl-encode"),
    (sys::UBLK_F_USER_COPY, "user-copy"),
    (sys::UBLK_F_ZONED, "zoned"),
    (sys::UBLK_F_USER_RECOVERY_FAIL_IO, "recovery-fail-io"),
    (sys::UBLK_F_UPDATE_SIZE, "update-size"),
    (sys::UBLK_F_AUTO_BUF_REG, "auto-buf-reg"),
    (sys::UBLK_F_QUIESCE, "quiesce"),
    (sys::UBLK_F_PER_IO_DAEMON, "per-io-daemon"),
];

/// The names of the feature flags set in `flags`.
pub fn feature_names(flags: u64) -> Vec<&'static str> {
    FEATURE_NAMES
        .iter()
        .filter(|(bit, _)| flags & *bit as u64 != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// The copy mode to make a new device with, given what the driver offers.
fn resolve_copy(asked: CopyMode, offered: u64) -> Result<CopyMode> {
    let user = offered & sys::UBLK_F_USER_COPY as u64 != 0;
    match asked {
        CopyMode::Auto if user => Ok(CopyMode::User),
        CopyMode::Auto | CopyMode::Buffer => Ok(CopyMode::Buffer),
        CopyMode::User if user => Ok(CopyMode::User),
        CopyMode::User => Err(UblkError::BadOptions(
            "the ublk driver does not offer user copy (UBLK_F_USER_COPY, kernel >= 6.5); \
             use --copy buffer or auto"
                .into(),
        )),
    }
}

fn driver(what: impl Into<String>) -> impl FnOnce(libublk::UblkError) -> UblkError {
    let what = what.into();
    move |source| UblkError::Driver { what, source }
}

/// Serves `engine`'s volume as a new ublk device until the device is deleted (or
/// `hornctl ublk del`). `ready` is called once the block device exists.
pub fn serve(
    engine: Arc<Engine>,
    opts: &UblkOptions,
    ready: impl FnOnce(&DeviceInfo) + Send + Sync + 'static,
) -> Result<()> {
    check_available()?;
    if opts.queues == 0 || opts.depth == 0 {
        return Err(UblkError::BadOptions(
            "queues and depth must be at least 1".into(),
        ));
    }
    if opts.max_io_bytes < 4096 || opts.max_io_bytes % 4096 != 0 {
        return Err(UblkError::BadOptions(format!(
            "the largest I/O ({} bytes) must be a multiple of 4096",
            opts.max_io_bytes
        )));
    }
    // A device survives its server (USER_RECOVERY): when the daemon dies, I/O waits
    // for a new one, and the commands it had in flight are issued again to it
    // (RECOVERY_REISSUE; block writes are idempotent).
    let recovery_flags = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    // Zero copy (UBLK_F_SUPPORT_ZERO_COPY, kernel 6.15+) is not used: Horn's data goes
    // to sockets, and the driver's zero copy lends pages to io_uring file operations.
    let offered = UblkCtrl::get_features().unwrap_or(0);
    let ctrl = match opts.recover {
        None => {
            let copy_flag = match resolve_copy(opts.copy, offered)? {
                CopyMode::User => sys::UBLK_F_USER_COPY as u64,
                _ => 0,
            };
            UblkCtrlBuilder::default()
                .name("horn")
                .id(opts.id.map_or(-1, |i| i as i32))
                .nr_queues(opts.queues)
                .depth(opts.depth)
                .io_buf_bytes(opts.max_io_bytes)
                .ctrl_flags(recovery_flags | copy_flag)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(driver("creating the ublk device"))?
        }
        Some(id) => {
            check_recoverable(id)?;
            let old = UblkCtrl::new_simple(id as i32).map_err(|_| UblkError::NoDevice(id))?;
            let info = old.dev_info();
            let copy_flag = info.flags & sys::UBLK_F_USER_COPY as u64;
            if opts.copy == CopyMode::Buffer && copy_flag != 0 {
                return Err(UblkError::BadOptions(format!(
                    "ublk device {id} was made with user copy and keeps it; drop --copy buffer"
                )));
            }
            if opts.copy == CopyMode::User && copy_flag == 0 {
                return Err(UblkError::BadOptions(format!(
                    "ublk device {id} was made with buffer copy and keeps it; drop --copy user"
                )));
            }
            old.start_user_recover()
                .map_err(driver(format!("starting the recovery of ublk device {id}")))?;
            UblkCtrlBuilder::default()
                .name("horn")
                .id(id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .ctrl_flags(recovery_flags | copy_flag)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(driver(format!("reattaching to ublk device {id}")))?
        }
    };
    let flags = ctrl.dev_info().flags;
    tracing::info!(
        offered = feature_names(offered).join(","),
        in_use = feature_names(flags).join(","),
        copy = copy_name(flags),
        "ublk driver features offered; device flags and copy mode in use"
    );
    let size = engine.size();
    let sector_shift = engine.sector_size().trailing_zeros() as u8;
    let read_only = opts.read_only;
    let volume = opts.volume.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
        dev.tgt.dev_size = size;
        dev.tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
            basic: sys::ublk_param_basic {
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE
                    | sys::UBLK_ATTR_FUA
                    | if read_only { sys::UBLK_ATTR_READ_ONLY } else { 0 },
                logical_bs_shift: sector_shift,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: sector_shift,
                max_sectors,
                dev_sectors: size >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_granularity: 4096,
                max_discard_sectors: max_sectors,
                max_write_zeroes_sectors: max_sectors,
                max_discard_segments: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        dev.set_target_json(serde_json::json!({ "horn": { "volume": volume } }));
        Ok(())
    };
    let q_engine = engine.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| crate::queue::serve_queue(qid, dev, &q_engine);
    let on_started = move |ctrl: &UblkCtrl| {
        let info = describe(ctrl);
        tracing::info!(device = %info.path, queues = info.queues, depth = info.depth, "ublk device started");
        ready(&info);
    };
    ctrl.run_target(tgt_init, q_fn, on_started)
        .map_err(driver("serving the ublk device"))?;
    Ok(())
}

fn describe(ctrl: &UblkCtrl) -> DeviceInfo {
    let info = ctrl.dev_info();
    let state = match info.state as u32 {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        _ => "unknown",
    };
    let volume = ctrl
        .get_target_data_from_json()
        .and_then(|v| v["horn"]["volume"].as_str().map(str::to_string))
        .unwrap_or_default();
    DeviceInfo {
        id: info.dev_id,
        path: ctrl.get_bdev_path(),
        volume,
        state: state.into(),
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        pid: info.ublksrv_pid,
        flags: info.flags,
        features: feature_names(info.flags),
        copy: copy_name(info.flags),
    }
}

fn copy_name(flags: u64) -> &'static str {
    if flags & sys::UBLK_F_USER_COPY as u64 != 0 {
        "user"
    } else {
        "buffer"
    }
}

/// Every ublk device on this machine (Horn's show their volume).
pub fn list() -> Result<Vec<DeviceInfo>> {
    check_available()?;
    let found = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let out = found.clone();
    UblkCtrl::for_each_dev_id(move |id| {
        if let Ok(ctrl) = UblkCtrl::new_simple(id as i32) {
            out.borrow_mut().push(describe(&ctrl));
        }
    });
    let mut v = found.take();
    v.sort_by_key(|d| d.id);
    Ok(v)
}

/// Stops and removes device `id` whatever holds it (the serving daemon's own orderly
/// stop).
pub fn stop(id: u32) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|_| UblkError::NoDevice(id))?;
    let _ = ctrl.kill_dev();
    ctrl.del_dev()
        .map_err(driver(format!("deleting ublk device {id}")))?;
    Ok(())
}

/// Deletes device `id`: stops it (its server's queues end) and removes it. A device
/// whose block device is open (mounted, or held by a process) is refused.
pub fn delete(id: u32) -> Result<()> {
    check_available()?;
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|_| UblkError::NoDevice(id))?;
    let path = ctrl.get_bdev_path();
    if let Some(holder) = busy(&path) {
        return Err(UblkError::Busy(id, holder));
    }
    stop(id)
}

/// Can device `id` take a new server: it exists, was made for recovery, and its
/// server is gone? Checked before an engine claims the replicas, so that a recovery
/// that cannot happen never fences the engine still serving the device.
pub fn check_recoverable(id: u32) -> Result<()> {
    let old = UblkCtrl::new_simple(id as i32).map_err(|_| UblkError::NoDevice(id))?;
    let info = old.dev_info();
    if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        return Err(UblkError::BadOptions(format!(
            "ublk device {id} was not made for recovery; delete it and add it again"
        )));
    }
    if info.ublksrv_pid > 0 && pid_alive(info.ublksrv_pid) {
        return Err(UblkError::Busy(
            id,
            format!("its server (pid {}) is still running", info.ublksrv_pid),
        ));
    }
    Ok(())
}

/// Why device `id`'s block device is in use (mounted, or held open exclusively), if
/// it is: such a device is never removed by its own server's stop.
pub fn in_use(id: u32) -> Option<String> {
    let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
    busy(&ctrl.get_bdev_path())
}

/// Is process `pid` running? A zombie (dead, not yet reaped by its parent) is not.
fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Why the block device is busy, if it is: opened exclusively (mounted, or in use by
/// another exclusive opener) makes O_EXCL fail with EBUSY.
fn busy(path: &str) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Some(format!(
            "{path} is in use (mounted or held open exclusively); unmount it first"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_mode_follows_what_the_driver_offers() {
        let user = sys::UBLK_F_USER_COPY as u64 | sys::UBLK_F_USER_RECOVERY as u64;
        let none = sys::UBLK_F_USER_RECOVERY as u64;
        assert_eq!(resolve_copy(CopyMode::Auto, user).unwrap(), CopyMode::User);
        assert_eq!(resolve_copy(CopyMode::Auto, none).unwrap(), CopyMode::Buffer);
        assert_eq!(resolve_copy(CopyMode::Buffer, user).unwrap(), CopyMode::Buffer);
        assert_eq!(resolve_copy(CopyMode::User, user).unwrap(), CopyMode::User);
        let err = resolve_copy(CopyMode::User, none).unwrap_err().to_string();
        assert!(err.contains("does not offer user copy"), "{err}");
    }

    #[test]
    fn features_are_named() {
        let flags = (sys::UBLK_F_USER_COPY | sys::UBLK_F_USER_RECOVERY) as u64;
        assert_eq!(feature_names(flags), ["user-recovery", "user-copy"]);
        assert_eq!(copy_name(flags), "user");
        assert_eq!(copy_name(0), "buffer");
    }
}
