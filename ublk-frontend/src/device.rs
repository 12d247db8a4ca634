//! Creating, serving, listing and deleting Horn's ublk devices.

use std::sync::Arc;

use horn_engine::Engine;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};

use crate::{check_available, Result, UblkError};

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
    let ctrl = match opts.recover {
        None => UblkCtrlBuilder::default()
            .name("horn")
            .id(opts.id.map_or(-1, |i| i as i32))
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .io_buf_bytes(opts.max_io_bytes)
            .ctrl_flags(recovery_flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(driver("creating the ublk device"))?,
        Some(id) => {
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
            old.start_user_recover()
                .map_err(driver(format!("starting the recovery of ublk device {id}")))?;
            UblkCtrlBuilder::default()
                .name("horn")
                .id(id as i32)
                .nr_queues(info.nr_hw_queues)
                .depth(info.queue_depth)
                .io_buf_bytes(info.max_io_buf_bytes)
                .ctrl_flags(recovery_flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(driver(format!("reattaching to ublk device {id}")))?
        }
    };
    tracing::info!(
        features = format!("{:#x}", UblkCtrl::get_features().unwrap_or(0)),
        flags = format!("{:#x}", ctrl.dev_info().flags),
        "ublk driver features; device flags in use (data is copied by the driver into per-tag buffers)"
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
